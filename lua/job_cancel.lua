#!lua
-- name: job_cancel
-- version: 1
-- Recoverable and reliable modes: cancels jobs (protocol.md 8.11). A job
-- that is queued or delayed never runs; a running job's worker is told at
-- once on its control channel (<prefix>:{<queue>}:worker:<worker>), and
-- the job is finished here and now: state "failed", error kind "cancelled",
-- never retried, its client's doorbell rung with that outcome. A job that
-- has already finished is left as it is. Each job is decided on its own.
-- The ID of a cancelled queued job stays on the pending list: the start
-- scripts drop it (the job is finished). A delayed job leaves the delayed
-- set; a running job leaves the lease set (recoverable mode) or, in
-- reliable mode, its worker's in-flight list is cleaned by that worker. A
-- job holding a slot of the concurrency limit gives it back; its unique
-- lock is released; a job that records events appends "cancelled".
--
-- KEYS[1]    delayed set      <prefix>:{<queue>}:delayed
-- KEYS[2]    lease set        <prefix>:{<queue>}:leases   (recoverable mode)
-- KEYS[3]    running set      <prefix>:{<queue>}:running  (reliable mode)
-- KEYS[4]    gate list        <prefix>:{<queue>}:gate
-- KEYS[5]    event stream     <prefix>:{<queue>}:events
-- KEYS[5+i]  job hash of job i  <prefix>:{<queue>}:job:<id i>
-- ARGV[1]    mode             "recoverable" | "reliable"
-- ARGV[2]    result ttl ms    how long the cancelled job's hash is kept; 1 to 10^12
-- ARGV[3]    notify           "publish" or "spublish" (sharded pub/sub, used
--                             on Redis Cluster)
-- ARGV[4]    message          the failure message recorded ("": "cancelled");
--                             at most 1024 bytes
-- ARGV[4+i]  id of job i, in KEYS order
--
-- Reply:   array with one decision per job, in KEYS order:
--          {"cancelled", "queued" | "active"}  cancelled now (a delayed job
--                            was "queued")
--          {"finished", state}   it had finished already (an ID given twice:
--                            as after its first decision) ("completed",
--                            "failed", "dead", or "cancelled" for a failed job
--                            of kind cancelled; a state this script does not
--                            know is reported as it is): untouched
--          {"missing"}       no such job (never submitted, or expired)
--          {"not a hash"}    the job key holds another Redis type: untouched
-- Errors:  JQ_WRONGTYPE <key> <expected type> <found type>  delayed, leases,
--          running (zset) or gate (list)
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

-- Appends a lifecycle event to the queue's event stream (protocol.md 8.12),
-- capped near MAXLEN entries (the job's events field, a number). Best effort: a
-- stream key of another type drops the event, never the transition.
local function event(stream, maxlen, ...)
  redis.pcall('XADD', stream, 'MAXLEN', '~', string.format('%d', maxlen), '*', ...)
end

-- Deletes the job's unique lock (protocol.md 8.10) while the job still
-- holds it. The lock's key is derived from the job's unique field, inside
-- this queue (BASE is <prefix>:{<queue>}); a lock of another type is left.
local function release_unique(base, ukey, id)
  if ukey then
    local lock = base .. ':unique:' .. ukey
    if redis.pcall('GET', lock) == id then
      redis.call('DEL', lock)
    end
  end
end

-- MessagePack by hand (as in job_finish): the error map's keys in order.
local function header(small, code, len)
  if small and len < 32 then
    return string.char(small + len)
  elseif len < 256 then
    return string.char(code, len)
  elseif len < 65536 then
    return string.char(code + 1, math.floor(len / 256), len % 256)
  end
  return string.char(code + 2, math.floor(len / 16777216) % 256, math.floor(len / 65536) % 256,
    math.floor(len / 256) % 256, len % 256)
end
local function str(s) return header(0xa0, 0xd9, #s) .. s end

local n = #KEYS - 5
if n < 1 or #ARGV ~= 4 + n then
  return redis.error_reply('JQ_BAD_ARGS expected 5 keys (delayed, leases, running, gate, events) and a job key per job; 4 arguments and an id per job key')
end
local mode = ARGV[1]
if mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] mode must be recoverable or reliable (simple mode jobs cannot be cancelled)')
end
local ttl = integer(ARGV[2], 1, 1000000000000)
if not ttl then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] result ttl ms must be an integer from 1 to 1000000000000')
end
if ARGV[3] ~= 'publish' and ARGV[3] ~= 'spublish' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] notify must be publish or spublish')
end
if #ARGV[4] > 1024 then
  return redis.error_reply('JQ_BAD_ARGS ARGV[4] message longer than 1024 bytes')
end
local message = ARGV[4] ~= '' and ARGV[4] or 'cancelled'
local base = string.match(KEYS[1], '^[^{]*{[^}]+}')
if not base then
  return redis.error_reply('JQ_BAD_ARGS KEYS[1] has no {<queue>} hash tag')
end
for i = 1, n do
  if KEYS[5 + i] ~= base .. ':job:' .. ARGV[4 + i] then
    return redis.error_reply('JQ_BAD_ARGS job key ' .. text(KEYS[5 + i]) .. ' does not match id ' .. text(ARGV[4 + i]))
  end
end
local refusal = wrongtype(KEYS[1], 'zset') or wrongtype(KEYS[2], 'zset')
  or wrongtype(KEYS[3], 'zset') or wrongtype(KEYS[4], 'list')
if refusal then
  return redis.error_reply(refusal)
end
local publish = ARGV[3] == 'spublish' and 'SPUBLISH' or 'PUBLISH'
local ttl_ms = string.format('%d', ttl)
local now = redis.call('TIME')
local now_ms = string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000))
local freed = false

local function cancel(key, id)
  local job = redis.pcall('HMGET', key, 'state', 'client', 'worker', 'slot', 'unique', 'events',
    'attempt', 'error_kind')
  if job.err then
    return {'not a hash'}
  end
  local state = job[1]
  if not state then
    if redis.call('EXISTS', key) == 0 then
      return {'missing'}
    end
    return {'finished', ''}
  end
  if state ~= 'queued' and state ~= 'active' then
    -- A job cancelled before reads "cancelled" (on the wire: failed).
    return {'finished', (state == 'failed' and job[8] == 'cancelled') and 'cancelled' or state}
  end
  if state == 'queued' then
    redis.call('ZREM', KEYS[1], id)
  else
    if mode == 'recoverable' then
      redis.call('ZREM', KEYS[2], id)
    end
    if job[3] and job[3] ~= '' then
      -- Tell the running job's worker at once.
      redis.call(publish, base .. ':worker:' .. job[3],
        '\130\162id' .. str(id) .. '\166status\169cancelled')
    end
    if job[4] == '1' then
      if mode == 'reliable' then
        redis.call('ZREM', KEYS[3], id)
      end
      freed = true
    end
  end
  redis.call('HSET', key, 'state', 'failed', 'error_kind', 'cancelled', 'error', message,
    'finished_ms', now_ms)
  redis.call('PEXPIRE', key, ttl_ms)
  release_unique(base, job[5], id)
  local events = integer(job[6], 1, 1000000000)
  if events then
    event(KEYS[5], events, 'event', 'cancelled', 'id', id, 'attempt', job[7] or '0',
      'worker', job[3] or '')
  end
  if job[2] and job[2] ~= '' then
    redis.call(publish, base .. ':reply:' .. job[2],
      '\131\162id' .. str(id) .. '\166status\166failed\165error\130\164kind\169cancelled'
      .. '\167message' .. str(message))
  end
  return {'cancelled', state}
end

local out, seen = {}, {}
for i = 1, n do
  local id = ARGV[4 + i]
  local first = seen[id]
  if first then
    -- The same ID again: as it stands after its first decision.
    out[i] = first[1] == 'cancelled' and {'finished', 'cancelled'} or first
  else
    out[i] = cancel(KEYS[5 + i], id)
    seen[id] = out[i]
  end
end
if freed and redis.call('LLEN', KEYS[4]) == 0 then
  redis.call('LPUSH', KEYS[4], '1')
end
return out
