#!lua
-- name: schedule_remove
-- version: 1
-- Recoverable and reliable modes: removes a recurring schedule (its record
-- and its entry in the schedules set). Jobs it already submitted are not
-- touched.
--
-- KEYS[1]  schedules set         <prefix>:{<queue>}:schedules
-- KEYS[2]  schedule hash         <prefix>:{<queue>}:schedule:<name>
-- ARGV[1]  name                  1 to 200 bytes
--
-- Reply:   1 when the schedule existed, else 0.
-- Errors:  JQ_WRONGTYPE <key> <expected> <found> (schedules: zset; the
--          schedule: hash)
--          JQ_BAD_ARGS <detail>
-- Writes nothing when it refuses.

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

if #KEYS ~= 2 or #ARGV ~= 1 then
  return redis.error_reply('JQ_BAD_ARGS expected 2 keys (schedules, schedule) and 1 argument (name)')
end
local name = ARGV[1]
if name == '' or #name > 200 then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] name must be 1 to 200 bytes')
end
local base = string.match(KEYS[1], '^(.*):schedules$')
if not base or KEYS[2] ~= base .. ':schedule:' .. name then
  return redis.error_reply('JQ_BAD_ARGS KEYS[2] must be the schedule key of the name, next to KEYS[1]')
end
local found = redis.call('TYPE', KEYS[1]).ok
if found ~= 'none' and found ~= 'zset' then
  return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[1]) .. ' zset ' .. found)
end
found = redis.call('TYPE', KEYS[2]).ok
if found ~= 'none' and found ~= 'hash' then
  return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[2]) .. ' hash ' .. found)
end
local removed = redis.call('ZREM', KEYS[1], name)
-- HDEL of every field deletes the hash without DEL, which the client ACL
-- role does not have.
local fields = redis.call('HKEYS', KEYS[2])
for first = 1, #fields, 1000 do
  redis.call('HDEL', KEYS[2], unpack(fields, first, math.min(first + 999, #fields)))
  removed = 1
end
return removed
