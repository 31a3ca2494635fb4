#!lua
-- name: simple_dead
-- version: 2
-- Simple mode: keeps a list entry that no worker can run (it is not a valid
-- job envelope, so nobody can be told) in the queue's dead-letter list, with
-- the reason, newest first, trimmed to a maximum length. When the list key
-- holds another type it refuses, writing nothing: the worker keeps the entry.
--
-- KEYS[1]  dead-letter list      <prefix>:{<queue>}:dead
-- ARGV[1]  dead-letter record    MessagePack map (see protocol.md)
-- ARGV[2]  maximum list length   decimal integer from 1 to 1000000000
--
-- Reply:   length of the dead-letter list after the push and trim.
-- Errors:  JQ_WRONGTYPE <dead key> list <found type>
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
  return redis.error_reply('JQ_BAD_ARGS expected 1 key (dead) and 2 arguments (record, maximum length)')
end
local max = integer(ARGV[2], 1, 1000000000)
if not max then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] maximum length must be an integer from 1 to 1000000000')
end
local found = redis.call('TYPE', KEYS[1]).ok
if found ~= 'none' and found ~= 'list' then
  return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[1]) .. ' list ' .. found)
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], '0', string.format('%d', max - 1))
return redis.call('LLEN', KEYS[1])
