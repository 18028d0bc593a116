-- Attach a label to a served prediction and queue it for reconciliation, atomically.
-- KEYS[1] pred hash, KEYS[2] feedback stream, KEYS[3] replay stream (recent labelled inputs), KEYS[4] the
-- prediction's kept input (a string, present for the share of predictions the API keeps)
-- ARGV[1] label, ARGV[2] loss, ARGV[3] now_ms, ARGV[4] prediction id,
-- ARGV[5] '1'/'0' whether the answer the user got was right ('' when unknown), ARGV[6] API client ('' for none),
-- ARGV[7] paired probes: the leader's loss on the same input ('' for none), ARGV[8] '1'/'0' whether the probe
-- path was right ('' for none), ARGV[9] how many labelled inputs the replay stream keeps ('0': none)
-- A prediction the API kept the input of moves that input, with its label, to the replay stream.
-- With paired probes the entry also carries the prediction's two logit vectors (float32 bytes, copied from its
-- hash): the probe's ('logits') and the leader's ('leader'), from which the worker estimates the head's gradient.
-- Returns {status} or {status, existing_label}; status in ok | duplicate | conflict | not_found.
local h = redis.call('HMGET', KEYS[1], 'version', 'path', 'label', 'logits', 'leader')
if not h[1] then
  return {'not_found'}
end
local label = ARGV[1]
if h[3] then
  if h[3] == label then
    return {'duplicate', h[3]}
  end
  return {'conflict', h[3]}
end
redis.call('HSET', KEYS[1], 'label', label)
local entry = {'id', ARGV[4], 'version', h[1], 'path', h[2] or '', 'loss', ARGV[2], 'label', label, 'ts', ARGV[3],
  'hit', ARGV[5] or ''}
if ARGV[6] and ARGV[6] ~= '' then  -- the API client that gave the label, when the server has API keys
  entry[#entry + 1] = 'client'
  entry[#entry + 1] = ARGV[6]
end
if ARGV[7] and ARGV[7] ~= '' then
  entry[#entry + 1] = 'base'
  entry[#entry + 1] = ARGV[7]
  entry[#entry + 1] = 'probe_hit'
  entry[#entry + 1] = ARGV[8] or ''
  if h[4] and h[5] then
    entry[#entry + 1] = 'logits'
    entry[#entry + 1] = h[4]
    entry[#entry + 1] = 'leader'
    entry[#entry + 1] = h[5]
  end
end
redis.call('XADD', KEYS[2], '*', unpack(entry))
local keep = tonumber(ARGV[9] or '0') or 0
if keep > 0 and KEYS[4] then
  local x = redis.call('GET', KEYS[4])
  if x then
    redis.call('XADD', KEYS[3], 'MAXLEN', keep, '*', 'x', x, 'label', label, 'id', ARGV[4])
    redis.call('DEL', KEYS[4])
  end
end
return {'ok'}
