-- Append a loop transition if the phase is still in the state the caller checked it against
-- (compare-and-set), so two processes can never both move a phase out of one state.
-- KEYS[1] loop events stream, KEYS[2] loop state hash
-- ARGV[1] field (phase, or '*epic' for the epic record), ARGV[2] expected current value
-- ('' = absent), ARGV[3] new value, ARGV[4] event, ARGV[5] entry field, ARGV[6] ttl (s)
-- Returns {1, id} appended, {0, current value} someone else moved it first.
local current = redis.call('HGET', KEYS[2], ARGV[1]) or ''
if current ~= ARGV[2] then
  return {0, current}
end
local id = redis.call('XADD', KEYS[1], '*', ARGV[5], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {1, id}
