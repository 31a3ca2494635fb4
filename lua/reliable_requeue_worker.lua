#!lua
-- name: reliable_requeue_worker
-- version: 3
-- Reliable mode: moves every job ID in a worker's in-flight list back to
-- the front of the queue, oldest first. Recovery runs it for a worker whose
-- heartbeat expired (ONLY IF DEAD = 1: refused, doing nothing, when the
-- heartbeat came back meanwhile); the dead worker stays in the worker set,
-- so that IDs a paused "dead" worker moves later are found by later sweeps,
-- until it has been dead for RETENTION ms. A worker runs it for itself when
-- it leaves (ONLY IF DEAD = 0): its list goes back too, and the worker is
-- then marked dead (deadline now - 1) rather than removed, because a
-- blocking BLMOVE it abandoned at shutdown may still be served after this
-- call and move an ID into its list: the next recovery passes find that ID
-- like any dead worker's, and the retention rule removes the worker later,
-- only after moving its list. IDs that were moved but never started are
-- requeued too. The job hashes are not touched: the next reliable_start
-- counts a stall for jobs that were active. Each requeued ID leaves the
-- running set (protocol.md 8.9); when one was there, the gate list is
-- pushed (when empty), so that a worker held back by a concurrency limit
-- wakes.
--
-- KEYS[1]  worker set       <prefix>:{<queue>}:workers
-- KEYS[2]  in-flight list   <prefix>:{<queue>}:inflight:<worker>
-- KEYS[3]  pending list     <prefix>:{<queue>}:pending
-- KEYS[4]  running set      <prefix>:{<queue>}:running
-- KEYS[5]  gate list        <prefix>:{<queue>}:gate
-- ARGV[1]  worker id        as stored in the worker set (any bytes)
-- ARGV[2]  only if dead     "1" | "0"
-- ARGV[3]  retention ms     with ONLY IF DEAD = 1: forget a worker dead this
--                           long; 1 to 10^12
--
-- Reply:   number of IDs requeued, or -1 when the worker is alive (ONLY IF DEAD = 1).
-- Errors:  JQ_WRONGTYPE <key> <expected type> <found type>  workers (zset),
--          the in-flight list, pending or gate (list), running (zset)
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

if #KEYS ~= 5 or #ARGV ~= 3 then
  return redis.error_reply('JQ_BAD_ARGS expected 5 keys (workers, inflight, pending, running, gate) and 3 arguments (worker id, only if dead, retention ms)')
end
-- The worker ID is any bytes, even empty: recovery passes every member
-- of the worker set, including those another program wrote, so that each
-- is recovered and then forgotten.
local worker, only_if_dead = ARGV[1], ARGV[2]
if only_if_dead ~= '1' and only_if_dead ~= '0' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] only if dead must be 1 or 0')
end
local retention = integer(ARGV[3], 1, 1000000000000)
if not retention then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] retention ms must be an integer from 1 to 1000000000000')
end
if KEYS[2] == KEYS[3] then
  return redis.error_reply('JQ_BAD_ARGS KEYS[2] (the in-flight list) and KEYS[3] (pending) must differ')
end
local refusal = wrongtype(KEYS[1], 'zset') or wrongtype(KEYS[2], 'list') or wrongtype(KEYS[3], 'list')
  or wrongtype(KEYS[4], 'zset') or wrongtype(KEYS[5], 'list')
if refusal then
  return redis.error_reply(refusal)
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
-- A deadline that is not an integer (not written by reliable_heartbeat)
-- counts as none.
local deadline = integer(redis.call('ZSCORE', KEYS[1], worker), -999999999999999, 999999999999999)
if only_if_dead == '1' and deadline and deadline >= now_ms then
  return -1
end
-- The newest ID is on the left: move it first, so the oldest ends up
-- nearest the right end, where workers take from. As many moves as the list
-- holds, never "until empty": a loop that cannot end would stop the server.
local moved = redis.call('LLEN', KEYS[2])
local freed = 0
for _ = 1, moved do
  local id = redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT')
  freed = freed + redis.call('ZREM', KEYS[4], id)
end
if freed > 0 and redis.call('LLEN', KEYS[5]) == 0 then
  redis.call('LPUSH', KEYS[5], '1')
end
if only_if_dead == '0' then
  -- Leaving: dead from now on, found by recovery until the retention ends.
  redis.call('ZADD', KEYS[1], string.format('%d', now_ms - 1), worker)
elseif not deadline or deadline < now_ms - retention then
  redis.call('ZREM', KEYS[1], worker)
end
return moved
