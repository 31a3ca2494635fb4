#!lua
-- name: queue_register
-- version: 2
-- Records a queue's mode and protocol version the first time the queue is
-- used, and checks them on every later use. Clients and workers run it when
-- they open a queue. Metadata that exists but lacks a field (written by
-- another program) is refused, never overwritten.
--
-- KEYS[1]  queue metadata hash   <prefix>:{<queue>}:meta
-- ARGV[1]  mode                  "simple" | "recoverable" | "reliable"
-- ARGV[2]  protocol version      decimal integer from 1 to 1000000, e.g. "1"
--
-- Reply:   1 when this call created the metadata, 0 when it already matched.
-- Errors:  JQ_MODE_MISMATCH <queue mode> <requested mode>
--          JQ_PROTOCOL_MISMATCH <queue protocol> <requested protocol>
--            (a field the metadata lacks is written "(missing)")
--          JQ_WRONGTYPE <meta key> hash <found type>
--          JQ_BAD_ARGS <detail>
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

if #KEYS ~= 1 or #ARGV ~= 2 then
  return redis.error_reply('JQ_BAD_ARGS expected 1 key (meta) and 2 arguments (mode, protocol version)')
end
local mode = ARGV[1]
if mode ~= 'simple' and mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] mode must be simple, recoverable or reliable')
end
if not integer(ARGV[2], 1, 1000000) then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] protocol version must be an integer from 1 to 1000000')
end
local meta = redis.pcall('HMGET', KEYS[1], 'mode', 'protocol')
if meta.err then
  return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[1]) .. ' hash ' .. redis.call('TYPE', KEYS[1]).ok)
end
if not meta[1] and not meta[2] and redis.call('EXISTS', KEYS[1]) == 0 then
  local now = redis.call('TIME')
  local created_ms = string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000))
  redis.call('HSET', KEYS[1], 'mode', mode, 'protocol', ARGV[2], 'created_ms', created_ms)
  return 1
end
if meta[1] ~= mode then
  return redis.error_reply('JQ_MODE_MISMATCH ' .. (meta[1] and text(meta[1]) or '(missing)') .. ' ' .. mode)
end
if meta[2] ~= ARGV[2] then
  return redis.error_reply('JQ_PROTOCOL_MISMATCH ' .. (meta[2] and text(meta[2]) or '(missing)') .. ' ' .. ARGV[2])
end
return 0
