-- Take, renew or release a lease: one holder at a time for a job of a swarm.
-- KEYS[1] lease key
-- ARGV[1] holder, ARGV[2] time to live (ms), ARGV[3] 'hold' (take or renew) | 'release'
-- Returns {1 held | 0 held by another, the holder, its time left (ms)}
local holder = redis.call('GET', KEYS[1])
if ARGV[3] == 'release' then
  if holder == ARGV[1] then
    redis.call('DEL', KEYS[1])
  end
  return {0, '', 0}
end
if holder and holder ~= ARGV[1] then
  return {0, holder, redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, ARGV[1], tonumber(ARGV[2])}
