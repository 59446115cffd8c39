-- Waiting coordinators received signals: acknowledge each and record each receipt, in one step.
-- Idempotent per (signal, coordinator): running it twice appends nothing twice.
-- KEYS[1] acks stream, KEYS[2] events stream, KEYS[3] coordinators zset, then per receipt i:
--   KEYS[3i+1] channel stream, KEYS[3i+2] acked hash of the signal, KEYS[3i+3] state hash
-- ARGV[1] entry field, ARGV[2] state ttl (s), ARGV[3] events maxlen, ARGV[4] acked ttl (s),
-- then per receipt i, from ARGV[6i-1]: coordinator (= group), entry id, signal id, channel,
--   the wait's iteration, when the wait started (ms)
-- The Ack, SignalReceived and BlockingEnded events are built here (same fields as their
-- streambus.schema Structs): six short arguments per receipt instead of three encoded events,
-- which matters when one signal reaches a thousand waiters of a process.
-- Returns the Ack entry id of each receipt.
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local field, ttl, maxlen, acked_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local out = {}
for i = 1, (#KEYS - 3) / 3 do
  local stream, acked, state = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local a = 6 * i - 1
  local coordinator, entry_id, signal_id = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local channel, iteration, started = ARGV[a + 3], tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  redis.call('XACK', stream, coordinator, entry_id)
  local ack_id = redis.call('HGET', acked, coordinator)
  if not ack_id then
    ack_id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', field, cjson.encode({
      type = 'ack', v = 1, coordinator = coordinator, signal_id = signal_id,
      channel = channel, stream_id = entry_id, iteration = iteration}))
    redis.call('HSET', acked, coordinator, ack_id)
    redis.call('EXPIRE', acked, acked_ttl)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', field, cjson.encode({
      type = 'signal_received', v = 1, coordinator = coordinator, channel = channel,
      signal_id = signal_id, stream_id = entry_id, iteration = iteration,
      started_ms = started}))
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', field, cjson.encode({
      type = 'blocking_ended', v = 1, coordinator = coordinator, channel = channel,
      iteration = iteration, outcome = 'signaled', signal_id = signal_id,
      started_ms = started}))
  end
  -- Only the wait that took the signal is closed by it: a receipt confirmed late (its first
  -- reply was lost) must not overwrite a newer wait of the same coordinator.
  local was = redis.call('HMGET', state, 'iteration', 'state')
  if was[1] == ARGV[a + 4] then
    -- A receipt applied after its wait ended (its reply was given up on): nobody handed the
    -- signal over, so the coordinator's next wait returns it.
    if was[2] ~= 'waiting' and was[2] ~= 'signaled' then
      redis.call('HSET', state, 'unclaimed', '1')
    end
    redis.call('HSET', state, 'state', 'signaled', 'outcome', 'signaled',
      'last_signal', signal_id, 'last_stream_id', entry_id, 'updated_ms', now, 'ended_ms', now)
    redis.call('EXPIRE', state, ttl)
  end
  redis.call('ZADD', KEYS[3], now, coordinator)
  out[i] = ack_id
end
return out
