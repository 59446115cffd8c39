-- Deliver to many waiters at once: one non-blocking XREADGROUP COUNT 1 per waiter.
-- (A pipeline of the same reads costs the client ~20 us of Python per command; one script call
-- costs it one command.) Each read either delivers into the waiter's PEL or returns nothing;
-- nothing is acknowledged here: that is the receive script's job, after the client has it.
-- KEYS[i] the channel stream of read i
-- ARGV[2i-1] the group (= coordinator = consumer) of read i, ARGV[2i] '0' (its pending entry,
--   or, when it has none, a new one: the two reads a waiter starts with, in one step) or '>'
-- Returns per read: {} (nothing), {'ERR', message} (e.g. NOGROUP), {'E', id, fields} (fields
-- flat, or 0 for an entry deleted while pending) or {'S', id}: the same entry of the same
-- stream as an earlier read of this call, whose fields the client already has (one signal
-- reaching a thousand waiters is sent back once, not a thousand times).
local out, sent = {}, {}
for i = 1, #KEYS do
  local group, stream = ARGV[2 * i - 1], KEYS[i]
  local ok, reply = pcall(redis.call, 'XREADGROUP', 'GROUP', group, group, 'COUNT', 1,
    'STREAMS', stream, ARGV[2 * i])
  if ok and ARGV[2 * i] == '0' and not (reply and reply[1][2][1]) then
    ok, reply = pcall(redis.call, 'XREADGROUP', 'GROUP', group, group, 'COUNT', 1,
      'STREAMS', stream, '>')
  end
  if not ok then
    out[i] = {'ERR', type(reply) == 'table' and reply.err or tostring(reply)}
  elseif not reply or not reply[1][2][1] then
    out[i] = {}
  else
    local entry = reply[1][2][1]
    local id, fields = entry[1], entry[2]
    local key = stream .. '\0' .. id
    if fields and sent[key] then
      out[i] = {'S', id}
    else
      out[i] = {'E', id, fields or 0}
      if fields then sent[key] = true end
    end
  end
end
return out
