-- Waiting coordinators received signals: acknowledge each and record each receipt, in one step.
-- Idempotent per (signal, coordinator): running it twice appends nothing twice.
-- Receipts come grouped by the entry they received (a fan-out: one signal, many waiters), so
-- what they share is sent and written once per group, not once per receipt.
-- KEYS[1] acks stream, KEYS[2] events stream,
--   then per group g: KEYS[2g+1] channel stream, KEYS[2g+2] acked hash of the signal,
--   then per receipt, in group order: its coordinator's state hash
-- ARGV[1] entry field, ARGV[2] events maxlen, ARGV[3] acked ttl (s),
--   ARGV[4] number of groups G, then per group g from ARGV[4g+1]: channel, signal id, entry id,
--   receipts in the group; then per receipt, from ARGV[4G+5]: coordinator (= group), the
--   wait's iteration, when the wait started (ms), the Ack's signing key id and signature
--   (both '' when unsigned; streambus.signing)
-- The Ack and BlockingEnded(signaled) events are built here (same fields as their
-- streambus.schema Structs). BlockingEnded carries the entry's stream id, so the receipt needs
-- no SignalReceived event of its own (older writers appended one; readers still decode it).
-- Every call to Redis from here costs the server several microseconds, and a fan-out to a
-- hundred processes runs this once per process, so it calls only what each receipt needs:
-- * The state hash is not given an expiry here: begin_wait gave it one that outlasts the wait's
--   deadline by the state ttl, and HSET keeps it.
-- * The acked hash gets its expiry once, from its first writer, which marks it with the field
--   ':expires' (no coordinator id starts with ':'); a later receipt finds the mark.
-- * The coordinators index is not touched: begin_wait and end_wait keep it, and cleanup re-checks
--   each candidate against the state hash's updated_ms, which the receipt does set.
-- * The time is the server's, read from the new Ack's stream id (XADD's clock); TIME is asked
--   only when nothing was appended (every receipt of the call was already recorded).
-- Returns the Ack entry id of each receipt, in the order given.
local now
local function clock()
  if not now then
    local t = redis.call('TIME')
    now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  end
  return now
end
local MARK = ':expires'
-- The events are JSON with the same fields as their streambus.schema Structs, written out
-- rather than built with cjson.encode (a table encode costs the server more than the XADD),
-- and without checking each value with a pattern (that alone cost a tenth of a receipt):
-- channel, signal and coordinator ids need no escaping, as the caller built this call's keys
-- from them, which validates them (streambus.keys: letters, digits, '.', '_', '-'); entry ids
-- are the server's; iterations and start times are the caller's integers. The signing
-- fields are escaped.
local field, maxlen, acked_ttl = ARGV[1], ARGV[2], ARGV[3]
local groups = tonumber(ARGV[4])
local out, seen = {}, {}
local k, a = 2 + 2 * groups, 5 + 4 * groups
for g = 1, groups do
  local stream, acked = KEYS[2 * g + 1], KEYS[2 * g + 2]
  local b = 4 * g + 1
  local channel, signal_id, entry_id = ARGV[b], ARGV[b + 1], ARGV[b + 2]
  -- What the group's events share, encoded once.
  local shared = ',"channel":"' .. channel .. '","signal_id":"' .. signal_id ..
    '","stream_id":"' .. entry_id .. '"'
  local n, recorded, members = tonumber(ARGV[b + 3]), {}, {}
  for j = 1, n do
    members[j] = ARGV[a + 5 * (j - 1)]
  end
  -- Who already acknowledged, asked once for the whole group; and whether the hash has its
  -- expiry (its mark, asked last).
  members[n + 1] = MARK
  local known = redis.call('HMGET', acked, unpack(members))
  local marked = known[n + 1]
  for j = 1, n do
    k = k + 1
    local state, coordinator, iteration = KEYS[k], ARGV[a], ARGV[a + 1]
    local started = ARGV[a + 2]
    local key_id, sig = ARGV[a + 3], ARGV[a + 4]
    a = a + 5
    redis.call('XACK', stream, coordinator, entry_id)
    -- The same receipt twice in one call (a retried chunk joined by a new one) must find the
    -- first: the acked hash is written once per group, after the loop.
    local once = acked .. '\0' .. coordinator
    local ack_id = seen[once] or known[j]
    if not ack_id then
      local own = ',"coordinator":"' .. coordinator .. '","iteration":' .. iteration
      local signed = ''
      if sig ~= '' then
        signed = ',"key_id":' .. cjson.encode(key_id) .. ',"sig":' .. cjson.encode(sig)
      end
      ack_id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', field,
        '{"type":"ack","v":1' .. own .. shared .. signed .. '}')
      now = now or string.sub(ack_id, 1, string.find(ack_id, '-', 1, true) - 1)
      seen[once] = ack_id
      recorded[#recorded + 1] = coordinator
      recorded[#recorded + 1] = ack_id
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', field,
        '{"type":"blocking_ended","v":1,"outcome":"signaled"' .. own .. shared ..
        ',"started_ms":' .. started .. '}')
    end
    -- Only the wait that took the signal is closed by it: a receipt confirmed late (its first
    -- reply was lost) must not overwrite a newer wait of the same coordinator.
    local was = redis.call('HMGET', state, 'iteration', 'state', 'channel')
    if was[1] ~= iteration and not known[j] and tonumber(was[1] or '0') > tonumber(iteration) then
      -- Applied only after the coordinator began a later wait (the reply was given up on):
      -- nobody handed this signal over; park it for its channel (see begin_wait).
      redis.call('HSET', state, 'parked:' .. channel,
        iteration .. ' ' .. entry_id .. ' ' .. started .. ' 1')
    end
    if was[1] == iteration then
      -- A receipt applied after its wait ended (its reply was given up on): nobody handed the
      -- signal over, so the coordinator's next wait returns it.
      if was[2] ~= 'waiting' and was[2] ~= 'signaled' then
        redis.call('HSET', state, 'unclaimed', '1')
      end
      redis.call('HSET', state, 'state', 'signaled', 'outcome', 'signaled',
        'last_signal', signal_id, 'last_stream_id', entry_id, 'updated_ms', clock(),
        'ended_ms', clock())
    end
    out[#out + 1] = ack_id
  end
  if #recorded > 0 then
    if not marked then
      recorded[#recorded + 1] = MARK
      recorded[#recorded + 1] = '1'
    end
    redis.call('HSET', acked, unpack(recorded))
    if not marked then
      redis.call('EXPIRE', acked, acked_ttl)
    end
  end
end
return out
