-- Deliver to many waiters at once: one non-blocking XREADGROUP COUNT 1 per waiter.
-- (A pipeline of the same reads costs the client ~20 us of Python per command; one script call
-- costs it one command.) Each read either delivers into the waiter's PEL or returns nothing;
-- nothing is acknowledged here: that is the receive script's job, after the client has it.
-- KEYS[i] the channel stream of read i
-- ARGV[2i-1] the group (= coordinator = consumer) of read i, ARGV[2i] '0' (pending) or '>'
-- Returns per read: the XREADGROUP reply, or {'ERR', message} (e.g. NOGROUP).
local out = {}
for i = 1, #KEYS do
  local group = ARGV[2 * i - 1]
  local ok, reply = pcall(redis.call, 'XREADGROUP', 'GROUP', group, group, 'COUNT', 1,
    'STREAMS', KEYS[i], ARGV[2 * i])
  if ok then
    out[i] = reply or {}
  else
    out[i] = {'ERR', type(reply) == 'table' and reply.err or tostring(reply)}
  end
end
return out
