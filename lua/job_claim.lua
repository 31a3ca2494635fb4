#!lua
-- name: job_claim
-- version: 7
-- Recoverable mode, first half of a claim: takes up to COUNT job IDs from
-- the pending list and gives each a fencing token and a lease, at once.
-- The job's hash is updated by job_start, which the worker calls next with
-- the job's key in KEYS. A worker that dies between the two leaves the ID
-- in the lease set, and job_requeue_stale puts it back when the lease ends:
-- no job is ever stranded.
-- The queue's gate (protocol.md 8.9) comes first: while the queue is paused
-- nothing is claimed, and under a concurrency limit (counted as the lease
-- set's size) or a rate limit (the rate set: one entry per claim within the
-- window) at most what the limits leave. A worker held back this way waits
-- on the gate list, and says so in its next call (HELD 1); a call made after
-- a hold that leaves room passes the wake-up on (pushes the gate list), so
-- that every held worker wakes in turn. A call that is held deletes the gate
-- list's entry: at that moment the gate is shut, so no one needs it.
--
-- KEYS[1]  pending list    <prefix>:{<queue>}:pending
-- KEYS[2]  tickets list    <prefix>:{<queue>}:tickets
-- KEYS[3]  lease set       <prefix>:{<queue>}:leases   (sorted set: id -> deadline ms)
-- KEYS[4]  fencing counter <prefix>:{<queue>}:fence    (absent, or an integer >= 0)
-- KEYS[5]  queue metadata  <prefix>:{<queue>}:meta     (the gate's settings)
-- KEYS[6]  rate set        <prefix>:{<queue>}:rate     (sorted set: token -> claim ms)
-- KEYS[7]  gate list       <prefix>:{<queue>}:gate
-- ARGV[1]  count           most IDs to take, 1 to 1000000
-- ARGV[2]  lease ms        provisional lease, until job_start sets the job's
--                          own; 1 to 10^12
-- ARGV[3]  tickets taken   how many tickets the worker already popped (0 or 1)
-- ARGV[4]  held            "1" when the worker's last call on this queue was
--                          held back by the gate, else "0"
--
-- Reply:   flat array: hold, wait ms, limited, id 1, token 1, id 2, token 2,
--          ... Hold is "" when the gate did not hold anything back, else
--          why fewer than COUNT were claimed although jobs wait: "paused",
--          "concurrency" or "rate"; wait ms is, for "rate", the time until
--          one more claim may pass, else "-1" (wait on the gate list); limited is "1" when the queue has a concurrency
--          limit (the worker passes it to job_start), else "0". Tokens are
--          decimal integers, increasing per queue. A popped ticket whose job
--          was held back is pushed back.
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

-- The queue's gate (protocol.md 8.9): its pause and limits, read from its
-- metadata only while its "gate" field is "1" (one field on the common
-- path). Returns the refusal when a key of the gate has another type;
-- else nil and: ROOM, how many jobs may start now (math.huge: no limit);
-- REASON, what set ROOM ("paused", "concurrency" or "rate"; nil: nothing);
-- WAIT, when the rate set ROOM, the ms until one more may start beyond it
-- (else -1: until a wake-up on the gate list); CMAX, the concurrency limit; RMAX
-- and RWIN, the rate limit. Limits that do not parse count as absent.
-- The size of the sorted set COUNTED is the number of running jobs
-- (RUNNING_KEY, type-checked, is the running set in reliable mode). Nothing
-- is written when
-- there are no limits; with a rate limit, starts older than its window
-- leave the rate set.
local function gate(meta, rate, gate_list, running_key, counted, now_n)
  local on = redis.pcall('HGET', meta, 'gate')
  if type(on) == 'table' then
    return wrongtype(meta, 'hash') or on.err
  end
  if on ~= '1' then
    return nil, math.huge
  end
  local m = redis.call('HMGET', meta, 'paused', 'rate', 'concurrency')
  if not m[1] and not m[2] and not m[3] then
    return nil, math.huge
  end
  local refusal = wrongtype(rate, 'zset') or wrongtype(gate_list, 'list')
    or (running_key and wrongtype(running_key, 'zset'))
  if refusal then
    return refusal
  end
  if m[1] == '1' then
    return nil, 0, 'paused', -1
  end
  local room, reason, wait = math.huge, nil, -1
  local cmax = integer(m[3], 1, 1000000)
  if cmax then
    room, reason = math.max(cmax - redis.call('ZCARD', counted), 0), 'concurrency'
  end
  local rmax, rwin
  if m[2] then
    local a, b = string.match(m[2], '^([0-9]+):([0-9]+)$')
    rmax, rwin = integer(a, 1, 1000000), integer(b, 1, 1000000000000)
    if not rmax or not rwin then
      rmax, rwin = nil, nil
    end
  end
  if rmax then
    redis.call('ZREMRANGEBYSCORE', rate, '-inf', string.format('%d', now_n - rwin))
    local left = math.max(rmax - redis.call('ZCARD', rate), 0)
    if left < room or (left == 0 and room == 0) then
      room, reason = left, 'rate'
      -- When one more start may pass: when the oldest start in the window
      -- leaves it (with none yet: a window after the starts to come).
      local oldest = redis.call('ZRANGE', rate, '0', '0', 'WITHSCORES')
      local at = integer(oldest[2], 0, 999999999999999)
      wait = at and math.max(at + rwin - now_n, 1) or rwin
    end
  end
  return nil, room, reason, wait, cmax, rmax, rwin
end

if #KEYS ~= 7 or #ARGV ~= 4 then
  return redis.error_reply('JQ_BAD_ARGS expected 7 keys (pending, tickets, leases, fence, meta, rate, gate) and 4 arguments (count, lease ms, tickets taken, held)')
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
if ARGV[4] ~= '0' and ARGV[4] ~= '1' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[4] held must be 0 or 1')
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
  return {'', '-1', '0'}
end
refusal = wrongtype(KEYS[3], 'zset') or bad_fence(KEYS[4])
  or (ARGV[4] == '1' and wrongtype(KEYS[7], 'list'))
if refusal then
  return redis.error_reply(refusal)
end
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local function int(n) return string.format('%d', n) end
local now = redis.call('TIME')
local now_n = now[1] * 1000 + math.floor(now[2] / 1000)
local room, reason, wait, cmax, rmax, rwin
refusal, room, reason, wait, cmax, rmax, rwin = gate(KEYS[5], KEYS[6], KEYS[7], nil,
  KEYS[3], now_n)
if refusal then
  return redis.error_reply(refusal)
end
local limited = cmax and '1' or '0'
if room == 0 then
  -- Held back: the popped ticket goes back; the gate is shut, so a wake-up
  -- waiting on the gate list is stale.
  if taken == 1 then
    redis.call('LPUSH', KEYS[2], '1')
  end
  redis.call('DEL', KEYS[7])
  return {reason, int(wait), limited}
end
local deadline = int(now_n + lease)
local short = reason and math.min(count, waiting) > room
local out = {short and reason or '', short and reason == 'rate' and int(wait) or '-1', limited}
for _ = 1, math.min(count, waiting, room) do
  local id = redis.call('RPOP', KEYS[1])
  local token = int(redis.call('INCR', KEYS[4]))
  redis.call('ZADD', KEYS[3], deadline, id)
  if rmax then
    redis.call('ZADD', KEYS[6], int(now_n), token)
  end
  out[#out + 1] = id
  out[#out + 1] = token
end
local claimed = (#out - 3) / 2
if rmax then
  redis.call('PEXPIRE', KEYS[6], int(rwin))
end
if claimed == waiting then
  -- Resynchronise: no job waits, so no ticket should either.
  redis.call('DEL', KEYS[2])
elseif claimed > taken then
  redis.call('LPOP', KEYS[2], int(claimed - taken))
end
if ARGV[4] == '1' and room > claimed and redis.call('LLEN', KEYS[7]) == 0 then
  -- Woken from a hold with room to spare: wake the next held worker.
  redis.call('LPUSH', KEYS[7], '1')
end
return out
