-- Take the leader lease if free, or again if this owner still holds it (it dropped the lease locally to
-- rebuild its state: a lost Redis connection, a refused publish); every successful take bumps the
-- fencing token, so the owner's older token is stale from then on.
-- KEYS[1] lock, KEYS[2] fence; ARGV[1] owner, ARGV[2] ttl ms. Returns the new token or nil.
local took = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if not took and redis.call('GET', KEYS[1]) == ARGV[1] then
  took = redis.call('SET', KEYS[1], ARGV[1], 'XX', 'PX', ARGV[2])
end
if took then
  return redis.call('INCR', KEYS[2])
end
return false
