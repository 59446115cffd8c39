-- Report every coordinator whose last beat is older than dead_after, once per last beat.
-- Atomic, so watchdogs running side by side never report the same death twice; a coordinator
-- that beats again and dies again is reported again (its last beat changed).
-- KEYS[1] alive zset, KEYS[2] reported-dead hash, KEYS[3] events stream
-- ARGV[1] dead_after (ms), ARGV[2] entry field, ARGV[3] events maxlen, ARGV[4] max reports
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - tonumber(ARGV[1])
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%d', cutoff),
  'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for i = 1, #stale, 2 do
  local coordinator, beat = stale[i], stale[i + 1]
  if redis.call('HGET', KEYS[2], coordinator) ~= beat then
    redis.call('HSET', KEYS[2], coordinator, beat)
    local event = cjson.encode({
      type = 'coordinator_dead', v = 1, coordinator = coordinator,
      last_beat_ms = tonumber(beat), dead_after_ms = tonumber(ARGV[1]), detected_ms = now,
    })
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', ARGV[2], event)
    out[#out + 1] = coordinator
  end
end
return out
