#!lua
-- name: job_promote
-- version: 2
-- Every mode: moves the queue's due delayed jobs (due time <= server time)
-- onto its pending list, oldest due first, at most LIMIT of them, and says
-- when the next one is due. It also keeps the queue's timekeeper lease: the
-- caller becomes (or stays) the timekeeper, the one worker that sleeps
-- until the next due time, when the lease is free or already its own. With
-- KEEPER MS 0 the caller gives the role up (if it holds it) and, when
-- delayed jobs or schedules remain, pushes the clock list so that another worker takes
-- it at once.
-- Recoverable mode pushes one ticket per promoted job; simple mode's
-- delayed members are whole envelopes, the other modes' are job IDs. The
-- job hashes are not touched: a delayed job's hash is "queued" with a
-- due_ms field all along. Members are moved as bytes; the start scripts
-- vet them as for any pending entry. It also says when the queue's next
-- recurring schedule is due (the worker fires it with schedule_fire), and
-- the server's time.
--
-- KEYS[1]  queue metadata hash   <prefix>:{<queue>}:meta
-- KEYS[2]  delayed set           <prefix>:{<queue>}:delayed
-- KEYS[3]  pending list          <prefix>:{<queue>}:pending
-- KEYS[4]  tickets list          <prefix>:{<queue>}:tickets
-- KEYS[5]  timekeeper lease      <prefix>:{<queue>}:timekeeper
-- KEYS[6]  clock list            <prefix>:{<queue>}:clock
-- KEYS[7]  schedules set         <prefix>:{<queue>}:schedules (read only)
-- ARGV[1]  mode                  "simple" | "recoverable" | "reliable"
-- ARGV[2]  protocol version      decimal integer from 1 to 1000000
-- ARGV[3]  worker ID             not empty
-- ARGV[4]  limit                 most jobs to move in this call, 1 to 10^5
-- ARGV[5]  keeper ms             0: give the timekeeper role up; else 1 to
--                                10^12, the lease the caller takes or renews
--
-- Reply:   {moved, next in ms, keeper, schedule in ms, now ms}: the number
--          of jobs moved; the time from now until the earliest job still
--          delayed is due (0 when it is due already, more than LIMIT having
--          been due; -1 when none is delayed; at most 10^12); 1 when the
--          caller is the timekeeper after this call, else 0; the time until
--          the earliest schedule is due (0: due now; -1: none; at most
--          10^12); the server's time in ms.
-- Errors:  JQ_QUEUE_UNKNOWN <meta key>
--          JQ_MODE_MISMATCH <queue mode> <requested mode>
--          JQ_PROTOCOL_MISMATCH <queue protocol> <requested protocol>
--          JQ_WRONGTYPE <key> <expected type> <found type>  meta (hash),
--            delayed or schedules (zset), pending, tickets or clock (list)
--          JQ_BAD_ARGS <detail>
-- Writes nothing when it refuses. A timekeeper lease without a TTL, or of
-- another type, is replaced (it always expires).

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

if #KEYS ~= 7 or #ARGV ~= 5 then
  return redis.error_reply('JQ_BAD_ARGS expected 7 keys (meta, delayed, pending, tickets, timekeeper, clock, schedules) and 5 arguments (mode, protocol version, worker ID, limit, keeper ms)')
end
local mode = ARGV[1]
if mode ~= 'simple' and mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] mode must be simple, recoverable or reliable')
end
if not integer(ARGV[2], 1, 1000000) then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] protocol version must be an integer from 1 to 1000000')
end
local worker = ARGV[3]
if worker == '' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] worker ID must not be empty')
end
local limit = integer(ARGV[4], 1, 100000)
if not limit then
  return redis.error_reply('JQ_BAD_ARGS ARGV[4] limit must be an integer from 1 to 100000')
end
local keeper_ms = integer(ARGV[5], 0, 1000000000000)
if not keeper_ms then
  return redis.error_reply('JQ_BAD_ARGS ARGV[5] keeper ms must be an integer from 0 to 1000000000000')
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
local refusal = wrongtype(KEYS[2], 'zset') or wrongtype(KEYS[3], 'list')
  or (mode == 'recoverable' and wrongtype(KEYS[4], 'list')) or wrongtype(KEYS[6], 'list')
  or wrongtype(KEYS[7], 'zset')
if refusal then
  return redis.error_reply(refusal)
end

local now = redis.call('TIME')
local now_n = now[1] * 1000 + math.floor(now[2] / 1000)
local now_ms = string.format('%d', now_n)
-- The due members are the lowest ranks: read them, then remove them by rank
-- (O(log N + moved), whatever the size of the set).
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', '0', string.format('%d', limit))
local moved = #due
if moved > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[2], '0', string.format('%d', moved - 1))
  for first = 1, moved, 1000 do
    local last = math.min(first + 999, moved)
    redis.call('LPUSH', KEYS[3], unpack(due, first, last))
    if mode == 'recoverable' then
      local tickets = {}
      for i = first, last do
        tickets[#tickets + 1] = '1'
      end
      redis.call('LPUSH', KEYS[4], unpack(tickets))
    end
  end
end

-- Time from now until the earliest member of the sorted set key is due.
local function due_in(key)
  local earliest = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')
  if not earliest[2] then
    return -1
  end
  local due = integer(earliest[2], -999999999999999, 999999999999999)
  if not due then
    -- Not a strict integer (another program wrote it): "inf" is never due;
    -- -inf or a fraction is treated as due now (the pass moves it by score).
    return earliest[2] == 'inf' and 1000000000000 or 0
  end
  local left = due - now_n
  if left < 0 then
    return 0
  elseif left > 1000000000000 then
    return 1000000000000
  end
  return left
end
local next_in = due_in(KEYS[2])
local schedule_in = due_in(KEYS[7])

-- The timekeeper lease. GET on a key of another type fails: such a lease
-- is not anyone's and is replaced, as is one without a TTL.
local holder = redis.pcall('GET', KEYS[5])
if type(holder) == 'table' or (holder and redis.call('PTTL', KEYS[5]) == -1) then
  holder = false
  redis.call('DEL', KEYS[5])
end
local keeper = 0
if keeper_ms == 0 then
  if holder == worker then
    redis.call('DEL', KEYS[5])
    if (next_in >= 0 or schedule_in >= 0) and redis.call('LLEN', KEYS[6]) == 0 then
      redis.call('LPUSH', KEYS[6], '1')
    end
  end
elseif not holder or holder == worker then
  redis.call('SET', KEYS[5], worker, 'PX', string.format('%d', keeper_ms))
  keeper = 1
end
return {moved, next_in, keeper, schedule_in, now_n}
