#!lua
-- name: reliable_start
-- version: 10
-- Reliable mode: starts one or many jobs in one call: issues each attempt's
-- fencing token and marks the job active, or tells the worker not to run
-- it. With source "inflight" the IDs are already in the worker's in-flight
-- list (moved there by BLMOVE). With source "pending" the script first
-- moves them there itself from the tail of the pending list, where the
-- worker saw them (LRANGE <pending> -n -1, oldest first): an ID that is no
-- longer where the worker saw it (another worker took it) stops the move,
-- and it and the IDs after it are "missed", untouched. With source
-- "inflight", an ID no longer in the in-flight list is "missed" too.
-- An attempt that finds the job still "active" proves that the previous
-- attempt's worker died (its in-flight list was recovered): that counts as
-- a redelivery (stall), and a job that stalled more than MAX STALLS times
-- goes to the dead-letter set instead of running again (a poison pill), and
-- its client is told. Each job is decided on its own; an ID given twice is
-- started once. Numbers read from a job's hash that are not integers in
-- range count as absent (protocol.md 10, "Numbers").
--
-- KEYS[1]    in-flight list   <prefix>:{<queue>}:inflight:<worker>
-- KEYS[2]    dead-letter set  <prefix>:{<queue>}:dead_jobs
-- KEYS[3]    fencing counter  <prefix>:{<queue>}:fence   (absent, or an integer >= 0)
-- KEYS[4]    pending list     <prefix>:{<queue>}:pending
-- KEYS[4+i]  job hash of job i  <prefix>:{<queue>}:job:<id i>
-- ARGV[1]    max stalls       0 to 10^6
-- ARGV[2]    worker id        not empty
-- ARGV[3]    result ttl ms    how long a dead job's hash is kept; 1 to 10^12
-- ARGV[4]    dead max         most entries kept in the dead-letter set; 1 to 10^9
-- ARGV[5]    notify           "publish" or "spublish" (sharded pub/sub, used
--                             on Redis Cluster) for the client's doorbell
-- ARGV[6]    source           "inflight" | "pending"
-- ARGV[6+i]  id of job i, in KEYS order (from "pending": oldest first)
--
-- Reply:   array with one decision per job, in KEYS order:
--          {"run", enc, payload, attempt, stalls, token, timeout ms}  run it
--                            (timeout ms: the job's own handler timeout,
--                            "0" for none: the worker's default)
--          {"dead"}          stalled too often: now dead, client told
--          {"gone", state}   finished or missing: dropped from the in-flight list
--          {"gone", "failed"} the hash is not a valid job (no or unknown state):
--                            now failed (kind "decode"), client told
--          {"gone", "not a hash"}  the job key holds another Redis type: its ID
--                            goes to the dead-letter set
--          {"gone", "invalid id"}  the ID is not 1 to 256 bytes of valid UTF-8:
--                            it leaves the in-flight list for the dead-letter
--                            set; its hash, if any, is failed (kind "decode"),
--                            client told
--          {"gone", "duplicate"}  the ID came earlier in this call: the
--                            extra copy left the in-flight list
--          {"missed"}        source "pending": not at the tail of the pending
--                            list any more; source "inflight": not in the
--                            in-flight list; untouched, do not run
-- Errors:  JQ_WRONGTYPE <key> <expected type> <found type>  the in-flight
--          list, the dead-letter set, the pending list (source "pending"), or
--          a fencing counter of another type or not an integer ("integer")
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

-- A job's own handler timeout as stored, canonical ("0": none, the
-- worker's default; a value that is not an integer in range counts as none).
local function timeout_of(v)
  local t = integer(v, 1, 1000000000000)
  return t and string.format('%d', t) or '0'
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

-- True when s is valid UTF-8. ASCII, the common case, is one string.find.
local function utf8(s)
  if not string.find(s, '[\128-\255]') then
    return true
  end
  local i, n = 1, #s
  while i <= n do
    local len = utf8_at(s, i)
    if len == 0 then
      return false
    end
    i = i + len
  end
  return true
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

local n, source = #KEYS - 4, ARGV[6]
if n < 1 or #ARGV ~= 6 + n then
  return redis.error_reply('JQ_BAD_ARGS expected 4 keys (inflight, dead_jobs, fence, pending) and a job key per job; 6 arguments and an id per job key')
end
local max_stalls = integer(ARGV[1], 0, 1000000)
if not max_stalls then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] max stalls must be an integer from 0 to 1000000')
end
local worker = ARGV[2]
if worker == '' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] worker id must not be empty')
end
local ttl = integer(ARGV[3], 1, 1000000000000)
if not ttl then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] result ttl ms must be an integer from 1 to 1000000000000')
end
local dead_max = integer(ARGV[4], 1, 1000000000)
if not dead_max then
  return redis.error_reply('JQ_BAD_ARGS ARGV[4] dead max must be an integer from 1 to 1000000000')
end
if ARGV[5] ~= 'publish' and ARGV[5] ~= 'spublish' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[5] notify must be publish or spublish')
end
if source ~= 'inflight' and source ~= 'pending' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[6] source must be inflight or pending')
end
-- Doorbells go to <prefix>:{<queue>}:reply:<client>.
local base = string.match(KEYS[2], '^[^{]*{[^}]+}')
if not base then
  return redis.error_reply('JQ_BAD_ARGS KEYS[2] has no {<queue>} hash tag')
end
local refusal = wrongtype(KEYS[1], 'list') or wrongtype(KEYS[2], 'zset') or bad_fence(KEYS[3])
  or (source == 'pending' and wrongtype(KEYS[4], 'list'))
if refusal then
  return redis.error_reply(refusal)
end
local publish = ARGV[5] == 'spublish' and 'SPUBLISH' or 'PUBLISH'
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local function int(n) return string.format('%d', n) end
local ttl_ms, dead_trim = int(ttl), int(-dead_max - 1)
local now = redis.call('TIME')
local now_ms = int(now[1] * 1000 + math.floor(now[2] / 1000))
-- One token per job, issued at once; a job that does not run leaves a gap.
local token = redis.call('INCRBY', KEYS[3], int(n)) - n

-- Rings the job's client (rare paths only: the client is read here, not in
-- the HMGET every start does).
local function tell(key, id, status)
  local client = redis.call('HGET', key, 'client')
  if client and client ~= '' then
    redis.call(publish, base .. ':reply:' .. client, cmsgpack.pack({id = id, status = status}))
  end
end

-- Drops the ID from the in-flight list and adds it to the dead-letter set
-- (trimmed).
local function bury(id)
  redis.call('LREM', KEYS[1], '1', id)
  redis.call('ZADD', KEYS[2], now_ms, id)
  redis.call('ZREMRANGEBYRANK', KEYS[2], '0', dead_trim)
end

-- An ID no job may have: never run. Its hash, if any, fails.
local function invalid(key, id, why)
  bury(id)
  if redis.call('TYPE', key).ok == 'hash' then
    redis.call('HSET', key, 'state', 'failed', 'finished_ms', now_ms, 'error_kind', 'decode', 'error', why)
    redis.call('PEXPIRE', key, ttl_ms)
    tell(key, id, 'failed')
  end
  return {'gone', 'invalid id'}
end

local function start(key, id)
  token = token + 1
  if id == '' or #id > 256 then
    return invalid(key, id, 'job ID is empty or longer than 256 bytes')
  end
  if not utf8(id) then
    return invalid(key, id, 'job ID is not valid UTF-8')
  end
  local job = redis.pcall('HMGET', key, 'state', 'enc', 'payload', 'attempt', 'stalls',
    'timeout_ms')
  if job.err then
    bury(id)
    return {'gone', 'not a hash'}
  end
  local state = job[1]
  if state == 'completed' or state == 'failed' or state == 'dead' then
    redis.call('LREM', KEYS[1], '1', id)
    return {'gone', state}
  end
  if state ~= 'queued' and state ~= 'active' then
    redis.call('LREM', KEYS[1], '1', id)
    if redis.call('EXISTS', key) == 0 then
      return {'gone', 'missing'}
    end
    redis.call('HSET', key, 'state', 'failed', 'finished_ms', now_ms, 'error_kind', 'decode',
      'error', 'not a valid job: state ' .. (state and ('"' .. state .. '"') or 'missing'))
    redis.call('PEXPIRE', key, ttl_ms)
    tell(key, id, 'failed')
    return {'gone', 'failed'}
  end
  local stalls = integer(job[5], 0, 1000000000) or 0
  if state == 'active' then
    stalls = stalls + 1
    if stalls > max_stalls then
      redis.call('HSET', key, 'state', 'dead', 'stalls', int(stalls), 'finished_ms', now_ms,
        'error_kind', 'stalled',
        'error', 'the job stalled ' .. int(stalls) .. ' times (limit ' .. int(max_stalls) .. '): its worker died each time')
      bury(id)
      redis.call('PEXPIRE', key, ttl_ms)
      tell(key, id, 'dead')
      return {'dead'}
    end
  end
  local attempt = int((integer(job[4], 0, 1000000000) or 0) + 1)
  local stalled, fence = int(stalls), int(token)
  if job[5] == stalled or (not job[5] and stalls == 0) then
    -- Stalls unchanged (0 is the default when the field is missing).
    redis.call('HSET', key, 'state', 'active', 'token', fence, 'attempt', attempt,
      'started_ms', now_ms, 'worker', worker)
  else
    redis.call('HSET', key, 'state', 'active', 'token', fence, 'attempt', attempt,
      'stalls', stalled, 'started_ms', now_ms, 'worker', worker)
  end
  return {'run', job[2] or '', job[3] or '', attempt, stalled, fence,
    timeout_of(job[6])}
end

-- From pending: the longest run of the expected IDs (oldest first) still at
-- the tail moves to the in-flight list, in the order one LMOVE RIGHT LEFT
-- per ID would give; the rest is missed.
local taken = n
if source == 'pending' then
  local tail = redis.call('LRANGE', KEYS[4], -n, -1)
  taken = 0
  while taken < n and tail[#tail - taken] == ARGV[7 + taken] do
    taken = taken + 1
  end
  if taken > 0 then
    redis.call('LTRIM', KEYS[4], '0', int(-taken - 1))
    for first = 1, taken, 1000 do
      local ids = {}
      for i = first, math.min(first + 999, taken) do
        ids[#ids + 1] = ARGV[6 + i]
      end
      redis.call('LPUSH', KEYS[1], unpack(ids))
    end
  end
end

local out, seen = {}, {}
for i = 1, n do
  local id = ARGV[6 + i]
  if i > taken then
    out[i] = {'missed'}
  elseif seen[id] then
    -- The same ID twice in one call (it was in the list twice): one start
    -- only; the extra copy leaves the in-flight list.
    redis.call('LREM', KEYS[1], '-1', id)
    out[i] = {'gone', 'duplicate'}
  elseif source == 'inflight' and not redis.call('LPOS', KEYS[1], id) then
    -- Not in the worker's in-flight list (any more): not the worker's.
    out[i] = {'missed'}
  else
    seen[id] = true
    out[i] = start(KEYS[4 + i], id)
  end
end
return out
