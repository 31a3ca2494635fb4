#!lua
-- name: simple_requeue
-- version: 2
-- Simple mode: gives job envelopes that a worker popped but never started
-- back to the queue, at the end workers pop from, so they run next. A worker
-- runs it when it shuts down with popped jobs that it did not start.
--
-- KEYS[1]  pending list          <prefix>:{<queue>}:pending
-- ARGV[1..n] job envelopes       exactly as popped, oldest first; at least one
--
-- Reply:   length of the pending list after the push.
-- Errors:  JQ_WRONGTYPE <pending key> list <found type>
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

if #KEYS ~= 1 or #ARGV < 1 then
  return redis.error_reply('JQ_BAD_ARGS expected 1 key (pending) and at least one job envelope')
end
local found = redis.call('TYPE', KEYS[1]).ok
if found ~= 'none' and found ~= 'list' then
  return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[1]) .. ' list ' .. found)
end
local len = 0
-- Oldest first must be popped first: push the newest first.
for i = #ARGV, 1, -1 do
  len = redis.call('RPUSH', KEYS[1], ARGV[i])
end
return len
