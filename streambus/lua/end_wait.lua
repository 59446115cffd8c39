-- End a coordinator's open wait with an outcome other than a signal (timeout, cancel, ...).
-- KEYS[1] state hash, KEYS[2] events stream, KEYS[3] coordinators zset
-- ARGV[1] channel, ARGV[2] iteration (0: the wait begun with token ARGV[8], whose begin_wait
-- reply was lost to a cancellation), ARGV[3] new state, ARGV[4] BlockingEnded event,
-- ARGV[5] entry field, ARGV[6] state ttl (s), ARGV[7] events maxlen, ARGV[8] the wait's token
-- Returns 1 ended; 2 that wait had already received its signal, which its coordinator never
-- handed over (now marked 'unclaimed': the next wait returns it); 0 nothing to end.
local st = redis.call('HMGET', KEYS[1], 'state', 'channel', 'iteration', 'coordinator',
  'wait_token')
local iteration, event = tonumber(ARGV[2]), ARGV[4]
if iteration == 0 then
  if ARGV[8] == nil or ARGV[8] == '' then
    return 0
  end
  if st[5] ~= ARGV[8] then
    -- Its begin_wait has not run yet (or never will): leave the token, so it starts nothing.
    redis.call('HSET', KEYS[1], 'withdrawn_token', ARGV[8])
    redis.call('EXPIRE', KEYS[1], ARGV[6])
    return 0
  end
  iteration = tonumber(st[3])
  local decoded = cjson.decode(event)
  decoded['iteration'] = iteration
  event = cjson.encode(decoded)
end
if st[2] ~= ARGV[1] or tonumber(st[3]) ~= iteration then
  return 0
end
if st[1] == 'signaled' then
  redis.call('HSET', KEYS[1], 'unclaimed', '1')
  return 2
end
if st[1] ~= 'waiting' then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'outcome', cjson.decode(event)['outcome'],
  'updated_ms', string.format('%d', now), 'ended_ms', string.format('%d', now))
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[3], now, st[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', ARGV[5], event)
return 1
