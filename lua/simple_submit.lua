#!lua
-- name: simple_submit
-- version: 4
-- Simple mode: appends one or more job envelopes to a queue's pending list,
-- after checking that the queue is registered in simple mode with the same
-- protocol version. Workers pop from the other end (RPOP side), so the list
-- is first in, first out. Envelopes with a due time in the future go to the
-- delayed set instead, as members scored by their due time (server time,
-- ms); job_promote moves them to pending when they are due. When they are
-- due before every member already there, the clock list is pushed (unless
-- it holds an entry already).
--
-- KEYS[1]  queue metadata hash   <prefix>:{<queue>}:meta
-- KEYS[2]  pending list          <prefix>:{<queue>}:pending
-- KEYS[3]  delayed set           <prefix>:{<queue>}:delayed
-- KEYS[4]  clock list            <prefix>:{<queue>}:clock
-- ARGV[1]  mode                  must be "simple"
-- ARGV[2]  protocol version      decimal integer from 1 to 1000000
-- ARGV[3]  delay ms              0 to 10^12: the envelopes are due that long
--                                after the server's time
-- ARGV[4]  run at ms             0, or 1 to 999999999999999: due at that
--                                server time (ms since the Unix epoch); at
--                                most one of ARGV[3] and ARGV[4] is not 0
-- ARGV[5..n] job envelopes       MessagePack maps (see protocol.md), at least one
--
-- Reply:   length of the pending list after the call.
-- Errors:  JQ_QUEUE_UNKNOWN <meta key>    the queue has no metadata yet
--          JQ_MODE_MISMATCH <queue mode> <requested mode>
--          JQ_PROTOCOL_MISMATCH <queue protocol> <requested protocol>
--            (a field the metadata lacks is written "(missing)")
--          JQ_WRONGTYPE <key> <expected type> <found type>   meta or pending,
--                                or, for delayed envelopes, delayed or clock
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

-- True when DUE (ms) is before the earliest due time in the delayed set,
-- whose lowest entry's score is S (nil when the set is empty). A score that
-- is not a strict integer (inf, a fraction: another program wrote it)
-- counts as no earliest, so the clock is rung: one extra wake-up at most.
local function before_earliest(due, s)
  local earliest = s and integer(s, -999999999999999, 999999999999999)
  return not earliest or due < earliest
end

if #KEYS ~= 4 or #ARGV < 5 then
  return redis.error_reply('JQ_BAD_ARGS expected 4 keys (meta, pending, delayed, clock), a mode, a protocol version, a delay, a run at time and at least one job envelope')
end
local mode = ARGV[1]
if mode ~= 'simple' and mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] mode must be simple, recoverable or reliable')
end
if not integer(ARGV[2], 1, 1000000) then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] protocol version must be an integer from 1 to 1000000')
end
local delay = integer(ARGV[3], 0, 1000000000000)
if not delay then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] delay ms must be an integer from 0 to 1000000000000')
end
local run_at = integer(ARGV[4], 0, 999999999999999)
if not run_at then
  return redis.error_reply('JQ_BAD_ARGS ARGV[4] run at ms must be an integer from 0 to 999999999999999')
end
if delay ~= 0 and run_at ~= 0 then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] and ARGV[4] envelopes have a delay or a run at time, not both')
end
local meta = redis.pcall('HMGET', KEYS[1], 'mode', 'protocol')
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
if mode ~= 'simple' then
  return redis.error_reply('JQ_BAD_ARGS simple_submit is for simple mode; use job_submit')
end
local due = nil
if delay ~= 0 or run_at ~= 0 then
  local now = redis.call('TIME')
  local now_n = now[1] * 1000 + math.floor(now[2] / 1000)
  due = run_at ~= 0 and run_at or now_n + delay
  if due <= now_n then
    due = nil
  end
end
if due then
  -- Every key it writes, checked first.
  for k, want in pairs({[2] = 'list', [3] = 'zset', [4] = 'list'}) do
    local found = redis.call('TYPE', KEYS[k]).ok
    if found ~= 'none' and found ~= want then
      return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[k]) .. ' ' .. want .. ' ' .. found)
    end
  end
  local first = redis.call('ZRANGE', KEYS[3], '0', '0', 'WITHSCORES')
  local score = string.format('%d', due)
  for i = 5, #ARGV do
    redis.call('ZADD', KEYS[3], score, ARGV[i])
  end
  if before_earliest(due, first[2]) and redis.call('LLEN', KEYS[4]) == 0 then
    redis.call('LPUSH', KEYS[4], '1')
  end
  return redis.call('LLEN', KEYS[2])
end
-- Push in slices so that a large batch stays under Lua's unpack limit. The
-- first push is the script's first write and checks the pending list's
-- type for free: refused, it wrote nothing; after it, the key is a list.
local last = math.min(504, #ARGV)
local len = redis.pcall('LPUSH', KEYS[2], unpack(ARGV, 5, last))
if type(len) == 'table' then
  local found = redis.call('TYPE', KEYS[2]).ok
  if found == 'list' then
    return redis.error_reply(len.err)
  end
  return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[2]) .. ' list ' .. found)
end
local first = last + 1
while first <= #ARGV do
  last = math.min(first + 499, #ARGV)
  len = redis.call('LPUSH', KEYS[2], unpack(ARGV, first, last))
  first = last + 1
end
return len
