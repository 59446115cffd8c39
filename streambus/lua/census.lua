#!lua flags=no-writes
-- Count coordinators by (state, channel) of their blocking-state hashes, for metrics.
-- KEYS[1..n] state hashes (one swarm). Hashes gone (expired) are not counted.
-- Returns {state, channel, count, ...} (channel '' when the hash has none).
local counts = {}
for i = 1, #KEYS do
  local st = redis.call('HMGET', KEYS[i], 'state', 'channel')
  if st[1] then
    local state, channel = st[1], st[2] or ''
    counts[state] = counts[state] or {}
    counts[state][channel] = (counts[state][channel] or 0) + 1
  end
end
local out = {}
for state, by_channel in pairs(counts) do
  for channel, n in pairs(by_channel) do
    out[#out + 1] = state
    out[#out + 1] = channel
    out[#out + 1] = n
  end
end
return out
