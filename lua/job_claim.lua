#!lua
-- name: job_claim
-- version: 3
-- Recoverable mode, first half of a claim: takes up to COUNT job IDs from
-- the pending list and gives each a fencing token and a lease, at once.
-- The job's hash is updated by job_start, which the worker calls next with
-- the job's key in KEYS. A worker that dies between the two leaves the ID
-- in the lease set, and job_requeue_stale puts it back when the lease ends:
-- no job is ever stranded.
--
-- KEYS[1]  pending list    <prefix>:{<queue>}:pending
-- KEYS[2]  tickets list    <prefix>:{<queue>}:tickets
-- KEYS[3]  lease set       <prefix>:{<queue>}:leases   (sorted set: id -> deadline ms)
-- KEYS[4]  fencing counter <prefix>:{<queue>}:fence    (absent, or an integer >= 0)
-- ARGV[1]  count           most IDs to take, 1 to 1000000
-- ARGV[2]  lease ms        provisional lease, until job_start sets the job's
--                          own; 1 to 10^12
-- ARGV[3]  tickets taken   how many tickets the worker already popped (0 or 1)
--
-- Reply:   flat array: id 1, token 1, id 2, token 2, ... (empty when the
--          queue is empty). Tokens are decimal integers, increasing per queue.
-- Errors:  JQ_WRONGTYPE <key> <expected type> <found type>   a queue key of
--          another type, or a fencing counter that is not an integer
--          ("integer string")
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

-- The refusal when key holds a Redis type other than want (absent is fine).
local function wrongtype(key, want)
  local found = redis.call('TYPE', key).ok
  if found ~= 'none' and found ~= want then
    return 'JQ_WRONGTYPE ' .. text(key) .. ' ' .. want .. ' ' .. found
  end
end

-- The refusal when the fencing counter is neither absent nor a string
-- holding an integer >= 0 in the form INCR accepts (no sign, no leading 0).
local function bad_fence(key)
  local value = redis.pcall('GET', key)
  if type(value) == 'table' then
    return 'JQ_WRONGTYPE ' .. text(key) .. ' integer ' .. redis.call('TYPE', key).ok
  end
  if value and value ~= '0' and (#value > 15 or not string.find(value, '^[1-9][0-9]*$')) then
    return 'JQ_WRONGTYPE ' .. text(key) .. ' integer string'
  end
end

if #KEYS ~= 4 or #ARGV ~= 3 then
  return redis.error_reply('JQ_BAD_ARGS expected 4 keys (pending, tickets, leases, fence) and 3 arguments (count, lease ms, tickets taken)')
end
local count = integer(ARGV[1], 1, 1000000)
if not count then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] count must be an integer from 1 to 1000000')
end
local lease = integer(ARGV[2], 1, 1000000000000)
if not lease then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] lease ms must be an integer from 1 to 1000000000000')
end
local taken = ARGV[3] == '1' and 1 or ARGV[3] == '0' and 0
if not taken then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] tickets taken must be 0 or 1')
end
-- LLEN checks the pending list's type and says how many IDs wait.
local waiting = redis.pcall('LLEN', KEYS[1])
if type(waiting) == 'table' then
  return redis.error_reply(wrongtype(KEYS[1], 'list') or waiting.err)
end
local refusal = wrongtype(KEYS[2], 'list')
if refusal then
  return redis.error_reply(refusal)
end
if waiting == 0 then
  -- Resynchronise: no job waits, so no ticket should either.
  redis.call('DEL', KEYS[2])
  return {}
end
refusal = wrongtype(KEYS[3], 'zset') or bad_fence(KEYS[4])
if refusal then
  return redis.error_reply(refusal)
end
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local function int(n) return string.format('%d', n) end
local now = redis.call('TIME')
local deadline = int(now[1] * 1000 + math.floor(now[2] / 1000) + lease)
local out = {}
for _ = 1, math.min(count, waiting) do
  local id = redis.call('RPOP', KEYS[1])
  local token = redis.call('INCR', KEYS[4])
  redis.call('ZADD', KEYS[3], deadline, id)
  out[#out + 1] = id
  out[#out + 1] = int(token)
end
local claimed = #out / 2
if claimed == waiting then
  -- Resynchronise: no job waits, so no ticket should either.
  redis.call('DEL', KEYS[2])
elseif claimed > taken then
  redis.call('LPOP', KEYS[2], int(claimed - taken))
end
return out
