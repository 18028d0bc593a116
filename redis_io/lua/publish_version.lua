-- Publish a new model version: fence and parent checks, version + history (trimmed to its newest
-- entries), XACK of the entries it used, event, and a trim of the feedback stream that never drops a
-- pending or undelivered entry.
-- KEYS[1] version, KEYS[2] fence, KEYS[3] history, KEYS[4] feedback stream, KEYS[5] events
-- ARGV[1] fencing token, ARGV[2] new version, ARGV[3] history JSON, ARGV[4] group,
-- ARGV[5] expected current version (what KEYS[1] read when the caller planned; '' when it was unset),
-- ARGV[6] history length to keep, ARGV[7..] stream entry ids to acknowledge.
-- An empty ARGV[2] records a refused candidate (the validation guard): the same checks, history and
-- acknowledgements, but the version key stays and no event is sent.
-- Returns {'ok', acked, trimmed} or {'stale_token', fence} / {'moved', current} /
-- {'bad_version', v} / {'bad_expected', v} / {'bad_history_max', n} / {'bad_id', id} /
-- {'no_group', group} / {'not_pending', id}. Every check runs before the first write, so a refusal
-- changes nothing.
-- Every entry must still be pending in the group: one that another publish acknowledged (or that Redis
-- lost) is refused, so no entry is ever used by two versions, whatever the caller believes (a second
-- leader holding the same token after Redis lost the fence's last INCR under appendfsync everysec).
local FIRST_ID = 7
local function parse_id(s)
  local ms, seq = string.match(s, '^(%d+)%-(%d+)$')
  return tonumber(ms), tonumber(seq), ms, seq
end
local function less(a, b)
  local ams, aseq = parse_id(a)
  local bms, bseq = parse_id(b)
  return ams < bms or (ams == bms and aseq < bseq)
end
local fence_raw = redis.call('GET', KEYS[2]) or '0'
-- Only the holder of the newest token may publish: an older token is a stale leader, and a newer
-- one than the fence was never handed out.
if not string.match(ARGV[1], '^%d+$') or tonumber(ARGV[1]) ~= tonumber(fence_raw) then
  return {'stale_token', fence_raw}
end
local refused = ARGV[2] == ''
if not refused and not string.match(ARGV[2], '^%d+$') then
  return {'bad_version', ARGV[2]}
end
if ARGV[5] ~= '' and not string.match(ARGV[5], '^%d+$') then
  return {'bad_expected', ARGV[5]}
end
if not string.match(ARGV[6], '^%d+$') or tonumber(ARGV[6]) < 1 then
  return {'bad_history_max', ARGV[6]}
end
-- The version serving uses must still be the one the caller built on: an admin rollback (or any
-- other publish) in between would otherwise be silently undone.
local current = redis.call('GET', KEYS[1])
if current and (ARGV[5] == '' or tonumber(current) ~= tonumber(ARGV[5])) then
  return {'moved', current}
end
for i = FIRST_ID, #ARGV do
  if not string.match(ARGV[i], '^%d+%-%d+$') then
    return {'bad_id', ARGV[i]}
  end
end

local stream, group = KEYS[4], ARGV[4]
-- XINFO GROUPS errors on a missing key; a missing stream simply has no groups.
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
if not ok then
  groups = {}
end
local infos = {}
local found = false
for _, g in ipairs(groups) do
  local info = {}
  for j = 1, #g, 2 do
    info[g[j]] = g[j + 1]
  end
  infos[#infos + 1] = info
  if info['name'] == group then
    found = true
  end
end
if #ARGV >= FIRST_ID and not found then
  return {'no_group', group}
end
if #ARGV >= FIRST_ID then
  local npending = 0
  for _, info in ipairs(infos) do
    if info['name'] == group then npending = tonumber(info['pending']) end
  end
  local pending = {}
  if npending > 0 then  -- the whole PEL: about as many entries as the worker's buffer
    for _, row in ipairs(redis.call('XPENDING', stream, group, '-', '+', npending)) do
      pending[row[1]] = true
    end
  end
  for i = FIRST_ID, #ARGV do
    if not pending[ARGV[i]] then
      return {'not_pending', ARGV[i]}
    end
  end
end

if not refused then
  redis.call('SET', KEYS[1], ARGV[2])
end
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[6]), -1)

local acked = 0
local chunk = 256
for i = FIRST_ID, #ARGV, chunk do
  local j = math.min(i + chunk - 1, #ARGV)
  acked = acked + redis.call('XACK', stream, group, unpack(ARGV, i, j))
end

if not refused then
  redis.call('PUBLISH', KEYS[5], '{"type":"publish","version":' .. ARGV[2] .. '}')
end

-- Trim bound: for every group, its oldest pending entry, or (nothing pending) the entry just
-- after its last-delivered-id. The smallest bound over all groups is safe for all of them.
local minid = nil
for _, info in ipairs(infos) do
  local bound
  local pend = redis.call('XPENDING', stream, info['name'])
  if tonumber(pend[1]) > 0 then
    bound = pend[2]
  else
    local last = info['last-delivered-id']
    local _, seqn, ms, seq = parse_id(last)
    if last == '0-0' then
      bound = '0-0'
    elseif #seq <= 12 then
      bound = ms .. '-' .. tostring(seqn + 1)
    else
      bound = last -- keep one extra entry rather than risk float rounding
    end
  end
  if minid == nil or less(bound, minid) then
    minid = bound
  end
end
local trimmed = 0
if minid ~= nil and minid ~= '0-0' then
  trimmed = redis.call('XTRIM', stream, 'MINID', minid)
end
return {'ok', acked, trimmed}
