-- Publish a signal once per signal id (idempotent: safe to retry after a lost reply).
-- KEYS[1] dedupe key, KEYS[2] channel stream
-- ARGV[1] encoded event, ARGV[2] dedupe ttl (s), ARGV[3] channel retention (ms, 0 = none),
-- ARGV[4] entry field
local prior = redis.call('GET', KEYS[1])
if prior then
  return {1, prior}
end
local id
local retention = tonumber(ARGV[3])
if retention > 0 then
  -- Trim by age, approximately, in the same step: entries older than the retention are gone,
  -- pending or not, so the retention must stay well past any deadline.
  local t = redis.call('TIME')
  local minid = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - retention
  if minid < 0 then minid = 0 end
  id = redis.call('XADD', KEYS[2], 'MINID', '~', string.format('%d', minid), '*', ARGV[4], ARGV[1])
else
  id = redis.call('XADD', KEYS[2], '*', ARGV[4], ARGV[1])
end
redis.call('SET', KEYS[1], id, 'EX', ARGV[2])
return {0, id}
