#!lua
-- name: reliable_find_dead
-- version: 2
-- Reliable mode: lists the workers whose heartbeat has expired, for
-- recovery. Only one worker per interval gets the list: the first to take
-- the recovery guard (SET NX PX); the others get -1. The guard always
-- expires: one without a TTL (left by another program, or by a PERSIST), of
-- any type, is replaced and the pass runs; one of another type with a TTL
-- is waited for. Members are returned as the bytes stored: the caller
-- handles IDs that are not its own format.
--
-- KEYS[1]  worker set       <prefix>:{<queue>}:workers
-- KEYS[2]  recovery guard   <prefix>:{<queue>}:sweep
-- ARGV[1]  guard ms         1 to 10^12
-- ARGV[2]  limit            most workers to list, 1 to 10^6
--
-- Reply:   array of dead worker IDs, the most recently dead first (at most
--          LIMIT of them), or -1 when another worker holds the guard.
-- Errors:  JQ_WRONGTYPE <workers key> zset <found type>
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

if #KEYS ~= 2 or #ARGV ~= 2 then
  return redis.error_reply('JQ_BAD_ARGS expected 2 keys (workers, sweep) and 2 arguments (guard ms, limit)')
end
local guard = integer(ARGV[1], 1, 1000000000000)
if not guard then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] guard ms must be an integer from 1 to 1000000000000')
end
local limit = integer(ARGV[2], 1, 1000000)
if not limit then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] limit must be an integer from 1 to 1000000')
end
local found = redis.call('TYPE', KEYS[1]).ok
if found ~= 'none' and found ~= 'zset' then
  return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[1]) .. ' zset ' .. found)
end
local guard_ms = string.format('%d', guard)
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', guard_ms) then
  if redis.call('PTTL', KEYS[2]) ~= -1 then
    return -1
  end
  -- A guard that would never expire: replace it (SET replaces any type).
  redis.call('SET', KEYS[2], '1', 'PX', guard_ms)
end
local now = redis.call('TIME')
local now_ms = string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000))
-- Most recently dead first: workers that cannot be recovered (another
-- program broke their in-flight list) or that stay for the retention after
-- recovery have older deadlines, so however many there are, they never hide
-- a worker that died since; they come up again once fewer are newer.
return redis.call('ZREVRANGEBYSCORE', KEYS[1], '(' .. now_ms, '-inf', 'LIMIT', '0', string.format('%d', limit))
