#!lua
-- name: job_requeue
-- version: 1
-- Recoverable and reliable modes: puts finished jobs back on the queue, for
-- an operator (protocol.md 8.14): a dead job (its worker died too often) or
-- a failed one (its handler failed with no attempts left, or it was
-- cancelled) becomes "queued" again, with all its attempts (attempt and
-- stalls start over), and its ID is pushed on the pending list like a new
-- job's (in recoverable mode with a ticket). It leaves the dead-letter set,
-- and its hash no longer expires. Its last error stays in the hash until it
-- finishes again. Every other job is left as it is. Each job is decided on
-- its own; the caller passes the IDs (a page of the dead-letter set, say),
-- so that every key the script touches is in KEYS.
--
-- KEYS[1]    queue metadata   <prefix>:{<queue>}:meta
-- KEYS[2]    dead-letter set  <prefix>:{<queue>}:dead_jobs
-- KEYS[3]    pending list     <prefix>:{<queue>}:pending
-- KEYS[4]    tickets list     <prefix>:{<queue>}:tickets  (recoverable mode)
-- KEYS[4+i]  job hash of job i  <prefix>:{<queue>}:job:<id i>
-- ARGV[1]    mode             "recoverable" | "reliable"
-- ARGV[2]    protocol version  decimal integer from 1 to 1000000
-- ARGV[2+i]  id of job i, in KEYS order (1 to 1000 jobs)
--
-- Reply:   array with one decision per job, in KEYS order:
--          "requeued"        it was dead or failed: now queued
--          "missing"         no such job (expired, or never submitted); an
--                            entry of the dead-letter set leaves it
--          "not a hash"      the job key holds another Redis type: untouched
--          ""                a hash without a state: untouched
--          its state         "queued", "active", "completed" (or a state this
--                            script does not know): the job is untouched, a
--                            stale entry of the dead-letter set leaves it; an
--                            ID given twice is "queued" the second time
-- Errors:  JQ_QUEUE_UNKNOWN <meta key>
--          JQ_MODE_MISMATCH <queue mode> <requested mode>
--          JQ_PROTOCOL_MISMATCH <queue protocol> <requested protocol>
--          JQ_WRONGTYPE <key> <expected type> <found type>  meta (hash),
--                                dead_jobs (zset), pending or, in
--                                recoverable mode, tickets (list)
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

local n = #KEYS - 4
if n < 1 or n > 1000 or #ARGV ~= 2 + n then
  return redis.error_reply('JQ_BAD_ARGS expected 4 keys (meta, dead_jobs, pending, tickets) and 1 to 1000 job keys; a mode, a protocol version and an id per job key')
end
local mode = ARGV[1]
if mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] mode must be recoverable or reliable (simple mode keeps no job records)')
end
if not integer(ARGV[2], 1, 1000000) then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] protocol version must be an integer from 1 to 1000000')
end
local base = string.sub(KEYS[1], 1, -6) -- strip ":meta"
if string.sub(KEYS[1], -5) ~= ':meta' then
  return redis.error_reply('JQ_BAD_ARGS KEYS[1] must be the queue metadata <prefix>:{<queue>}:meta')
end
for i = 1, n do
  if KEYS[4 + i] ~= base .. ':job:' .. ARGV[2 + i] then
    return redis.error_reply('JQ_BAD_ARGS job key ' .. text(KEYS[4 + i]) .. ' does not match id ' .. text(ARGV[2 + i]))
  end
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
  or (mode == 'recoverable' and wrongtype(KEYS[4], 'list'))
if refusal then
  return redis.error_reply(refusal)
end

local function requeue(key, id)
  local state = redis.pcall('HGET', key, 'state')
  if type(state) == 'table' then
    return 'not a hash'
  end
  if not state then
    if redis.call('EXISTS', key) == 1 then
      return ''
    end
    redis.call('ZREM', KEYS[2], id)
    return 'missing'
  end
  if state ~= 'dead' and state ~= 'failed' then
    -- Not dead (any more): an entry of the dead-letter set was stale.
    redis.call('ZREM', KEYS[2], id)
    return state
  end
  redis.call('HSET', key, 'state', 'queued')
  redis.call('HDEL', key, 'attempt', 'stalls', 'finished_ms', 'due_ms', 'slot')
  redis.call('PERSIST', key)
  redis.call('ZREM', KEYS[2], id)
  redis.call('LPUSH', KEYS[3], id)
  if mode == 'recoverable' then
    redis.call('LPUSH', KEYS[4], '1')
  end
  return 'requeued'
end

local out = {}
for i = 1, n do
  out[i] = requeue(KEYS[4 + i], ARGV[2 + i])
end
return out
