-- One heartbeat: append it and move the coordinator in the liveness index, in server time.
-- KEYS[1] heartbeat stream, KEYS[2] alive zset, KEYS[3] counters hash
-- ARGV[1] coordinator, ARGV[2] Heartbeat event, ARGV[3] stream retention (ms), ARGV[4] field,
-- ARGV[5] beats of this coordinator that failed since its last successful one
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now, ARGV[1])
local minid = now - tonumber(ARGV[3])
if minid < 0 then minid = 0 end
redis.call('XADD', KEYS[1], 'MINID', '~', string.format('%d', minid), '*', ARGV[4], ARGV[2])
local failed = tonumber(ARGV[5] or '0') or 0
if KEYS[3] and failed > 0 then
  redis.call('HINCRBY', KEYS[3], 'heartbeat_failures', failed)
end
return now
