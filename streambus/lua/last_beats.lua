#!lua flags=no-writes
-- Server time and the last beat of each peer, read together so ages are in server time.
-- KEYS[1] alive zset; ARGV peers. Returns {now_ms, beat_ms or false, ...}.
local t = redis.call('TIME')
local out = {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
for i = 1, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  out[i + 1] = score and tonumber(score) or -1
end
return out
