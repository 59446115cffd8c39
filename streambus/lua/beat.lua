-- Heartbeats of one or more coordinators of a swarm, in one step: append each and move each in
-- the liveness index, in server time. One call per batch, not per coordinator: a process with
-- a thousand coordinators beats them all with one command.
-- KEYS[1] heartbeat stream, KEYS[2] alive zset, KEYS[3] counters hash
-- ARGV[1] stream retention (ms), ARGV[2] entry field, then per beat i, from ARGV[3i]:
--   coordinator, Heartbeat event, beats of it that failed since its last successful one
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minid = now - tonumber(ARGV[1])
if minid < 0 then minid = 0 end
local trim = string.format('%d', minid)
local failed = 0
for i = 3, #ARGV, 3 do
  redis.call('ZADD', KEYS[2], now, ARGV[i])
  redis.call('XADD', KEYS[1], 'MINID', '~', trim, '*', ARGV[2], ARGV[i + 1])
  failed = failed + (tonumber(ARGV[i + 2]) or 0)
end
if failed > 0 then
  -- A beat that fails cannot count itself; the next successful one reports it.
  redis.call('HINCRBY', KEYS[3], 'heartbeat_failures', failed)
end
return now
