#!lua
-- name: queue_control
-- version: 3
-- Recoverable and reliable modes: sets or clears a queue's controls, kept in
-- its metadata hash (protocol.md 8.9): "paused" ("1"), "rate"
-- ("<max>:<window ms>": at most max starts in any window of that length)
-- and "concurrency" ("<max>": at most max jobs running at once), and
-- "events" ("<max length>": the jobs submitted from now on record their
-- lifecycle events in the queue's event stream, capped near that length;
-- protocol.md 8.12). The start
-- scripts (job_claim, reliable_start) enforce them atomically. A change
-- that may let more jobs start (a resume, a limit raised, changed or
-- cleared) pushes the gate list (when empty), so that a worker held back
-- wakes at once and passes the wake-up on. It keeps the metadata's "gate"
-- field equal to "1" while any of paused, rate and concurrency is set, and
-- absent otherwise: the start scripts read that one field, and the three
-- settings only when it is there.
--
-- KEYS[1]  queue metadata  <prefix>:{<queue>}:meta
-- KEYS[2]  gate list       <prefix>:{<queue>}:gate
-- ARGV[1]  mode            "recoverable" | "reliable"
-- ARGV[2]  protocol version  decimal integer from 1 to 1000000
-- ARGV[3..]  pairs of a control and its new value, "" to clear it:
--            paused        "1"
--            rate          "<max>:<window ms>", max 1 to 10^6, window 1 to 10^12
--            concurrency   "<max>", 1 to 10^6
--            events        "<max length>", 1 to 10^9
--            (each control at most once per call)
--
-- Reply:   array with the previous value of each control given, in order
--          ("" when it was not set).
-- Errors:  JQ_QUEUE_UNKNOWN <meta key>
--          JQ_MODE_MISMATCH <queue mode> <requested mode>
--          JQ_PROTOCOL_MISMATCH <queue protocol> <requested protocol>
--            (a field the metadata lacks is written "(missing)")
--          JQ_WRONGTYPE <key> <expected type> <found type>  meta (hash), gate (list)
--          JQ_BAD_ARGS <detail>   (also: simple mode, which has no controls)
-- Writes nothing when it refuses.

-- Strict decimal integer (protocol.md 10, "Numbers"): the value of s when
-- it matches ^-?[0-9]+$ with at most 15 digits and lies in [lo, hi], else
-- nil. (tonumber would also take " 1", "1e3", "0x10", "inf" and "nan".)
local function integer(s, lo, hi)
  if type(s) ~= 'string' or #s > 16 or not string.find(s, '^%-?[0-9]+$')
      or (#s == 16 and string.byte(s) ~= 45) then
    return nil
  end
  local v = tonumber(s)
  if v < lo or v > hi then
    return nil
  end
  return v
end

-- Length of the valid UTF-8 sequence (RFC 3629: no overlong forms, no
-- surrogates, nothing above U+10FFFF) that starts at byte i of s, or 0.
local function utf8_at(s, i)
  local c = string.byte(s, i)
  if c < 0x80 then
    return 1
  elseif c >= 0xC2 and c <= 0xDF then
    local c2 = string.byte(s, i + 1)
    if c2 and c2 >= 0x80 and c2 <= 0xBF then
      return 2
    end
  elseif c >= 0xE0 and c <= 0xEF then
    local c2, c3 = string.byte(s, i + 1, i + 2)
    if c3 and c2 >= (c == 0xE0 and 0xA0 or 0x80) and c2 <= (c == 0xED and 0x9F or 0xBF)
        and c3 >= 0x80 and c3 <= 0xBF then
      return 3
    end
  elseif c >= 0xF0 and c <= 0xF4 then
    local c2, c3, c4 = string.byte(s, i + 1, i + 3)
    if c4 and c2 >= (c == 0xF0 and 0x90 or 0x80) and c2 <= (c == 0xF4 and 0x8F or 0xBF)
        and c3 >= 0x80 and c3 <= 0xBF and c4 >= 0x80 and c4 <= 0xBF then
      return 4
    end
  end
  return 0
end

-- s as a part of an error message, which clients read as UTF-8 text: each
-- byte that is not part of a valid UTF-8 sequence is written \xHH.
local function text(s)
  if not string.find(s, '[\128-\255]') then
    return s
  end
  local out, i, n = {}, 1, #s
  while i <= n do
    local len = utf8_at(s, i)
    if len == 0 then
      out[#out + 1] = string.format('\\x%02x', string.byte(s, i))
      i = i + 1
    else
      out[#out + 1] = string.sub(s, i, i + len - 1)
      i = i + len
    end
  end
  return table.concat(out)
end


-- The refusal when key holds a Redis type other than want (absent is fine).
local function wrongtype(key, want)
  local found = redis.call('TYPE', key).ok
  if found ~= 'none' and found ~= want then
    return 'JQ_WRONGTYPE ' .. text(key) .. ' ' .. want .. ' ' .. found
  end
end

if #KEYS ~= 2 or #ARGV < 4 or #ARGV % 2 ~= 0 then
  return redis.error_reply('JQ_BAD_ARGS expected 2 keys (meta, gate), a mode, a protocol version and pairs of a control and its value')
end
local mode = ARGV[1]
if mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] mode must be recoverable or reliable (simple mode has no queue controls)')
end
if not integer(ARGV[2], 1, 1000000) then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] protocol version must be an integer from 1 to 1000000')
end
-- The controls named, and their values as stored (decimals without
-- leading zeros, so that every script reads them alike).
local fields, values, seen = {}, {}, {}
for i = 3, #ARGV, 2 do
  local field, value = ARGV[i], ARGV[i + 1]
  if seen[field] then
    return redis.error_reply('JQ_BAD_ARGS ARGV[' .. i .. '] ' .. text(field) .. ' given twice')
  end
  seen[field] = true
  local ok, normal = nil, value
  if value == '' then
    ok = field == 'paused' or field == 'rate' or field == 'concurrency' or field == 'events'
  elseif field == 'paused' then
    ok = value == '1'
  elseif field == 'rate' then
    local a, b = string.match(value, '^([0-9]+):([0-9]+)$')
    local max, window = integer(a, 1, 1000000), integer(b, 1, 1000000000000)
    ok = max and window
    normal = ok and string.format('%d:%d', max, window)
  elseif field == 'concurrency' then
    ok = integer(value, 1, 1000000)
    normal = ok and string.format('%d', ok)
  elseif field == 'events' then
    ok = integer(value, 1, 1000000000)
    normal = ok and string.format('%d', ok)
  end
  if not ok then
    return redis.error_reply('JQ_BAD_ARGS ARGV[' .. i .. '] ' .. text(field) .. ' = ' .. text(value)
      .. ': expected paused "1", rate "<max>:<window ms>" (max 1 to 1000000, window 1 to 1000000000000), concurrency 1 to 1000000, events 1 to 1000000000, or "" to clear')
  end
  fields[#fields + 1] = field
  values[#values + 1] = normal
end
local meta = redis.pcall('HMGET', KEYS[1], 'mode', 'protocol', unpack(fields))
if meta.err then
  return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[1]) .. ' hash ' .. redis.call('TYPE', KEYS[1]).ok)
end
if not meta[1] and not meta[2] and redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('JQ_QUEUE_UNKNOWN ' .. text(KEYS[1]))
end
if meta[1] ~= mode then
  return redis.error_reply('JQ_MODE_MISMATCH ' .. (meta[1] and text(meta[1]) or '(missing)') .. ' ' .. mode)
end
if meta[2] ~= ARGV[2] then
  return redis.error_reply('JQ_PROTOCOL_MISMATCH ' .. (meta[2] and text(meta[2]) or '(missing)') .. ' ' .. ARGV[2])
end
local refusal = wrongtype(KEYS[2], 'list')
if refusal then
  return redis.error_reply(refusal)
end
local previous, opens = {}, false
for k, field in ipairs(fields) do
  local old, value = meta[2 + k] or '', values[k]
  previous[k] = old
  if value == '' then
    if old ~= '' then
      redis.call('HDEL', KEYS[1], field)
    end
  else
    redis.call('HSET', KEYS[1], field, value)
  end
  -- Anything but a pause or events (or no change) may let more jobs start.
  if value ~= old and not (field == 'paused' and value == '1') and field ~= 'events' then
    opens = true
  end
end
local gated = redis.call('HMGET', KEYS[1], 'paused', 'rate', 'concurrency')
if gated[1] or gated[2] or gated[3] then
  redis.call('HSET', KEYS[1], 'gate', '1')
else
  redis.call('HDEL', KEYS[1], 'gate')
end
if opens and redis.call('LLEN', KEYS[2]) == 0 then
  redis.call('LPUSH', KEYS[2], '1')
end
return previous
