-- Take the leader lease if free; every successful take bumps the fencing token.
-- KEYS[1] lock, KEYS[2] fence; ARGV[1] owner, ARGV[2] ttl ms. Returns the new token or nil.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return false
