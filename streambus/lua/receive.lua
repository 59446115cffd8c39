-- A waiting coordinator received a signal: acknowledge it and record the receipt, in one step.
-- Idempotent per (signal, coordinator): running it twice appends nothing twice.
-- KEYS[1] channel stream, KEYS[2] acks stream, KEYS[3] acked hash of the signal,
-- KEYS[4] state hash, KEYS[5] events stream, KEYS[6] coordinators zset
-- ARGV[1] coordinator (= group), ARGV[2] entry id, ARGV[3] Ack event, ARGV[4] SignalReceived
-- event, ARGV[5] BlockingEnded event, ARGV[6] entry field, ARGV[7] state ttl (s),
-- ARGV[8] events maxlen, ARGV[9] acked-hash ttl (s)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
local ack_id = redis.call('HGET', KEYS[3], ARGV[1])
if not ack_id then
  ack_id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', ARGV[6], ARGV[3])
  redis.call('HSET', KEYS[3], ARGV[1], ack_id)
  redis.call('EXPIRE', KEYS[3], ARGV[9])
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', ARGV[6], ARGV[4])
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', ARGV[6], ARGV[5])
end
redis.call('HSET', KEYS[4], 'state', 'signaled', 'outcome', 'signaled',
  'last_signal', cjson.decode(ARGV[3])['signal_id'], 'last_stream_id', ARGV[2],
  'updated_ms', string.format('%d', now), 'ended_ms', string.format('%d', now))
redis.call('EXPIRE', KEYS[4], ARGV[7])
redis.call('ZADD', KEYS[6], now, ARGV[1])
return ack_id
