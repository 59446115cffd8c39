-- End a coordinator's open wait with an outcome other than a signal (timeout, cancel, ...).
-- Does nothing if that wait already ended (a signal may have won the race): returns 0 then.
-- KEYS[1] state hash, KEYS[2] events stream, KEYS[3] coordinators zset
-- ARGV[1] channel, ARGV[2] iteration, ARGV[3] new state, ARGV[4] BlockingEnded event,
-- ARGV[5] entry field, ARGV[6] state ttl (s), ARGV[7] events maxlen
local st = redis.call('HMGET', KEYS[1], 'state', 'channel', 'iteration', 'coordinator')
if st[1] ~= 'waiting' or st[2] ~= ARGV[1] or tonumber(st[3]) ~= tonumber(ARGV[2]) then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'outcome', cjson.decode(ARGV[4])['outcome'],
  'updated_ms', string.format('%d', now), 'ended_ms', string.format('%d', now))
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[3], now, st[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', ARGV[5], ARGV[4])
return 1
