-- Start (or resume) a coordinator's blocking wait on a channel, in server time.
-- KEYS[1] state hash, KEYS[2] channel stream, KEYS[3] events stream, KEYS[4] coordinators zset,
-- KEYS[5] the coordinator's withdrawn-wait token (end_wait leaves it)
-- ARGV[1] coordinator, ARGV[2] channel, ARGV[3] timeout (ms), ARGV[4] state ttl (s),
-- ARGV[5] iteration (0 = previous + 1), ARGV[6] entry field, ARGV[7] events maxlen,
-- ARGV[8] the peers it watches, comma-separated, ARGV[9] the wait's token (client-made, one per
-- wait_for call: a retried call is the same wait), ARGV[10] the token of a wait of this process
-- that may have received a signal it did not hand over ('': none)
-- Returns {now, deadline, iteration, 0 new | 1 resumed | 2 already signaled | 3 withdrawn,
--   stream id if 2 (else ''), started (ms: when this wait began, kept when resumed)}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- The coordinator's own group, created at the start of the stream: a signal published before
-- the coordinator ever waited is still delivered to it.
local ok, err = pcall(redis.call, 'XGROUP', 'CREATE', KEYS[2], ARGV[1], '0', 'MKSTREAM')
if not ok then
  local msg = type(err) == 'table' and err.err or tostring(err)
  if not string.find(msg, 'BUSYGROUP', 1, true) then
    return redis.error_reply(msg)
  end
end

local st = redis.call('HMGET', KEYS[1], 'state', 'channel', 'deadline_ms', 'iteration', 'started_ms',
  'last_stream_id', 'unclaimed', 'wait_token')
local token, wanted, claim = ARGV[9] or '', tonumber(ARGV[5]), ARGV[10] or ''
-- This wait was cancelled before this script ran (end_wait left its token): start nothing.
if token ~= '' and redis.call('GET', KEYS[5]) == token then
  return {now, 0, 0, 3, '', now}
end
-- Answer with the signal an iteration already received, instead of starting the next one.
-- 'unclaimed' says who may hand it over: '1' anyone (the wait that took it ended without handing
-- it over), or the token of the wait now handing it over (so a retry of that same call gets it
-- again, its failure marks it '1' again, and any other wait starts the next iteration).
if st[1] == 'signaled' and st[2] == ARGV[2] and st[6] then
  local iteration = tonumber(st[4])
  local free = st[7] == '1' or (token ~= '' and st[7] == token)
    or (claim ~= '' and st[8] == claim and (not st[7] or st[7] == claim))
  local by_number = wanted > 0 and wanted == iteration
  if by_number or (wanted == 0 and free) then
    if free and token ~= '' then  -- this wait takes over the handing over
      redis.call('HSET', KEYS[1], 'unclaimed', token, 'wait_token', token)
    end
    return {now, tonumber(st[3]), iteration, 2, st[6], tonumber(st[5]) or now}
  end
end
-- A signal parked for this channel: received by an earlier iteration and never handed over,
-- while the coordinator went on to wait on another channel. Held the same way, by token.
local parked_field = 'parked:' .. ARGV[2]
if wanted == 0 then
  local parked = redis.call('HGET', KEYS[1], parked_field)
  if parked then
    local it, sid, started, holder = string.match(parked, '^(%d+) (%S+) (%d+) (%S+)$')
    if holder == '1' or holder == token then
      if token ~= '' then
        redis.call('HSET', KEYS[1], parked_field, it .. ' ' .. sid .. ' ' .. started .. ' ' .. token)
      end
      return {now, now, tonumber(it), 2, sid, tonumber(started)}
    end
    redis.call('HDEL', KEYS[1], parked_field)  -- handed over by the wait that held it
  end
end
-- A coordinator that restarts and waits again on the same channel keeps its deadline.
local resumed = st[1] == 'waiting' and st[2] == ARGV[2] and st[3] ~= false
local deadline, iteration, started
if resumed then
  deadline = tonumber(st[3])
  iteration = tonumber(st[4]) or 1
  started = tonumber(st[5]) or now
else
  iteration = tonumber(ARGV[5])
  if iteration == 0 then
    iteration = (tonumber(st[4]) or 0) + 1
  end
  deadline = now + tonumber(ARGV[3])
  started = now
end

-- A new iteration replaces the state: a signal the last one received and never handed over is
-- parked for its channel first, so the next wait there still returns it.
if not resumed and st[1] == 'signaled' and st[6]
    and (st[7] == '1' or (claim ~= '' and st[8] == claim and not st[7])) then
  redis.call('HSET', KEYS[1], 'parked:' .. st[2],
    st[4] .. ' ' .. st[6] .. ' ' .. (st[5] or '0') .. ' 1')
end
redis.call('HSET', KEYS[1],
  'coordinator', ARGV[1], 'state', 'waiting', 'channel', ARGV[2],
  'started_ms', string.format('%d', started), 'deadline_ms', string.format('%d', deadline),
  'iteration', iteration, 'updated_ms', string.format('%d', now), 'watches', ARGV[8] or '',
  'wait_token', token)
redis.call('HDEL', KEYS[1], 'ended_ms', 'outcome', 'unclaimed')
-- Kept for the state ttl after the deadline, so the receipt (which must not cost an EXPIRE of
-- its own) and a late-confirmed one leave it at least that long.
redis.call('EXPIRE', KEYS[1], string.format('%d',
  tonumber(ARGV[4]) + math.max(0, math.ceil((deadline - now) / 1000))))
redis.call('ZADD', KEYS[4], now, ARGV[1])

local event = cjson.encode({
  type = 'blocking_started', v = 1, coordinator = ARGV[1], channel = ARGV[2],
  iteration = iteration, started_ms = started, deadline_ms = deadline, resumed = resumed,
})
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', ARGV[6], event)
return {now, deadline, iteration, resumed and 1 or 0, '', started}
