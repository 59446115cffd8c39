-- Record that an item of a task is done, once: the first record wins, repeats change nothing.
-- KEYS[1] the task's progress stream, KEYS[2] the task's done hash (item -> entry id)
-- ARGV[1] item id, ARGV[2] ProgressRecorded event, ARGV[3] entry field, ARGV[4] ttl (s)
-- Returns {1, id} recorded now, {0, id} already recorded.
local prior = redis.call('HGET', KEYS[2], ARGV[1])
if prior then
  return {0, prior}
end
local id = redis.call('XADD', KEYS[1], '*', ARGV[3], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], id)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {1, id}
