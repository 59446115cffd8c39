-- Append a retry request for a coordinator, once per request id, unless its backlog is full.
-- KEYS[1] dedupe key, KEYS[2] the coordinator's retry stream, KEYS[3] backlog hash
-- ARGV[1] coordinator, ARGV[2] RetryRequest event, ARGV[3] backlog limit, ARGV[4] dedupe ttl (s),
-- ARGV[5] entry field
-- Returns {0, id} appended, {1, id} duplicate, {2, backlog} backlog full (nothing appended).
local prior = redis.call('GET', KEYS[1])
if prior then
  return {1, prior}
end
local backlog = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if backlog >= tonumber(ARGV[3]) then
  return {2, backlog}
end
local id = redis.call('XADD', KEYS[2], '*', ARGV[5], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
redis.call('SET', KEYS[1], id, 'EX', ARGV[4])
return {0, id}
