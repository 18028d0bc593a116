-- Point serving at an older version and tell the replicas; the history keeps its newest entries.
-- KEYS[1] version, KEYS[2] history, KEYS[3] events
-- ARGV[1] version, ARGV[2] history JSON, ARGV[3] history length to keep
if not string.match(ARGV[1], '^%d+$') then
  return {'bad_version', ARGV[1]}
end
if not string.match(ARGV[3], '^%d+$') or tonumber(ARGV[3]) < 1 then
  return {'bad_history_max', ARGV[3]}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
redis.call('PUBLISH', KEYS[3], '{"type":"rollback","version":' .. ARGV[1] .. '}')
return {'ok'}
