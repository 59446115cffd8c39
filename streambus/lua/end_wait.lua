-- End a coordinator's open wait with an outcome other than a signal (timeout, cancel, ...).
-- KEYS[1] state hash, KEYS[2] events stream, KEYS[3] coordinators zset, KEYS[4] the
-- coordinator's withdrawn-wait token
-- ARGV[1] channel, ARGV[2] iteration (0: the wait begun with token ARGV[8], whose begin_wait
-- reply was lost to a cancellation), ARGV[3] new state, ARGV[4] BlockingEnded event,
-- ARGV[5] entry field, ARGV[6] state ttl (s), ARGV[7] events maxlen, ARGV[8] the wait's token
-- Returns 1 ended; 2 that wait held a signal it never handed over (now marked 'unclaimed' =
-- '1': the coordinator's next wait on the channel returns it); 0 nothing to end.
local st = redis.call('HMGET', KEYS[1], 'state', 'channel', 'iteration', 'coordinator',
  'wait_token', 'unclaimed')
local iteration, event, token = tonumber(ARGV[2]), ARGV[4], ARGV[8] or ''
if iteration == 0 then
  if token == '' then
    return 0
  end
  -- Whether or not its begin_wait has run yet: if it runs later, it starts nothing.
  redis.call('SET', KEYS[4], token, 'EX', ARGV[6])
  if st[5] ~= token then
    return 0
  end
  iteration = tonumber(st[3])
  local decoded = cjson.decode(event)
  decoded['iteration'] = iteration
  event = cjson.encode(decoded)
end
if st[2] ~= ARGV[1] or tonumber(st[3]) ~= iteration then
  -- A parked signal this wait was handing over (see begin_wait): give it back.
  local parked_field = 'parked:' .. ARGV[1]
  local parked = redis.call('HGET', KEYS[1], parked_field)
  if parked and token ~= '' then
    local it, sid, started, holder = string.match(parked, '^(%d+) (%S+) (%d+) (%S+)$')
    if holder == token and tonumber(it) == iteration then
      redis.call('HSET', KEYS[1], parked_field, it .. ' ' .. sid .. ' ' .. started .. ' 1')
      return 2
    end
  end
  return 0
end
if st[1] == 'signaled' then
  -- Only the wait that holds the signal can give it back: the one that took it (nobody has
  -- handed it over since), or the one that took over handing it over.
  if token ~= '' and (st[6] == token or (not st[6] and st[5] == token)) then
    redis.call('HSET', KEYS[1], 'unclaimed', '1')
    return 2
  end
  return 0
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
