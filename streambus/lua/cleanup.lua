-- Remove stale coordinators of one swarm, re-checking each one at execution time, atomically,
-- so a coordinator that beat or changed state since it was listed is left alone, and two
-- cleanups running at once never half-remove anything (the second finds nothing to do).
-- KEYS[1] coordinators zset, KEYS[2] alive zset, KEYS[3] reported-dead hash,
-- KEYS[4] retry-backlog hash, KEYS[5..4+C] the swarm's channel streams,
-- then per candidate i: KEYS[4+C+2i-1] its state hash, KEYS[4+C+2i] its retry stream
-- ARGV[1] stale after (ms), ARGV[2] number of channel streams C, ARGV[3] dry run (1/0),
-- ARGV[3+i] candidate i's id
-- Returns {removed ids..., '|', groups destroyed, retry streams removed}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - tonumber(ARGV[1])
local channels = tonumber(ARGV[2])
local dry = ARGV[3] == '1'
local removed, groups, retries = {}, 0, 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local n = i - 3
  local state_key = KEYS[4 + channels + 2 * n - 1]
  local retry_key = KEYS[4 + channels + 2 * n]
  local beat = redis.call('ZSCORE', KEYS[2], id)
  local st = redis.call('HMGET', state_key, 'state', 'updated_ms', 'deadline_ms')
  local listed = redis.call('ZSCORE', KEYS[1], id)
  local updated = tonumber(st[2]) or tonumber(listed or '0')
  local stale
  if not beat and not listed and not st[1] then
    stale = false  -- already gone (another cleanup got here first)
  elseif beat then
    -- It heartbeats: its beats alone tell whether it lives.
    stale = tonumber(beat) < cutoff
  elseif st[1] == 'waiting' then
    -- Waiting without beats: only once its deadline is long past (nobody closed the wait).
    stale = (tonumber(st[3]) or 0) < cutoff
  else
    stale = updated < cutoff
  end
  if stale then
    removed[#removed + 1] = id
    if not dry then
      redis.call('DEL', state_key)
      redis.call('ZREM', KEYS[1], id)
      redis.call('ZREM', KEYS[2], id)
      redis.call('HDEL', KEYS[3], id)
      redis.call('HDEL', KEYS[4], id)
      retries = retries + redis.call('DEL', retry_key)
      for c = 1, channels do
        local ok, destroyed = pcall(redis.call, 'XGROUP', 'DESTROY', KEYS[4 + c], id)
        if ok then groups = groups + destroyed end
      end
    end
  end
end
removed[#removed + 1] = '|'
removed[#removed + 1] = groups
removed[#removed + 1] = retries
return removed
