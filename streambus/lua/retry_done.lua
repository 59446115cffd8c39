-- A coordinator processed retry requests: acknowledge them and shrink its backlog, together.
-- KEYS[1] retry stream, KEYS[2] backlog hash; ARGV[1] group (= coordinator), ARGV[2..] ids
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
if acked > 0 then
  local left = redis.call('HINCRBY', KEYS[2], ARGV[1], -acked)
  if left < 0 then redis.call('HSET', KEYS[2], ARGV[1], 0) end
end
return acked
