#!lua
-- name: reliable_start
-- version: 16
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
-- KEYS[5]    queue metadata   <prefix>:{<queue>}:meta     (the gate's settings)
-- KEYS[6]    running set      <prefix>:{<queue>}:running  (sorted set: id -> start ms)
-- KEYS[7]    rate set         <prefix>:{<queue>}:rate     (sorted set: token -> start ms)
-- KEYS[8]    gate list        <prefix>:{<queue>}:gate
-- KEYS[9]    event stream     <prefix>:{<queue>}:events
-- KEYS[9+i]  job hash of job i  <prefix>:{<queue>}:job:<id i>
-- ARGV[1]    max stalls       0 to 10^6
-- ARGV[2]    worker id        not empty
-- ARGV[3]    result ttl ms    how long a dead job's hash is kept; 1 to 10^12
-- ARGV[4]    dead max         most entries kept in the dead-letter set; 1 to 10^9
-- ARGV[5]    notify           "publish" or "spublish" (sharded pub/sub, used
--                             on Redis Cluster) for the client's doorbell
-- ARGV[6]    source           "inflight" | "pending"
-- ARGV[7]    held             "1" when the worker's last call was held back by
--                             the gate, else "0"
-- ARGV[7+i]  id of job i, in KEYS order (from "pending": oldest first)
--
-- The queue's gate (protocol.md 8.9) comes first: while the queue is paused
-- no job starts, and under a concurrency limit (the running set's size) or a
-- rate limit (the rate set: one entry per start within the window) at most
-- what the limits leave. The jobs held back are "held": from "pending" they
-- stay where they are; from "inflight" they go back to the tail of the
-- pending list (next in line). A job started under a concurrency limit
-- enters the running set and gets slot = "1" and extras = "1" (its finish
-- leaves the set and wakes a held worker); an ID started again from
-- "inflight" that is still in the running set (its earlier start's reply
-- was lost) keeps its slot,
-- and one that is held back, finished, dead or invalid leaves the set
-- (the gate list is pushed). As in job_claim, a held call deletes the gate
-- list's entry, and a call after a hold that leaves room pushes it.
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
--          {"held", why, wait ms}  held back by the gate: why is "paused",
--                            "concurrency" or "rate"; wait ms is, for "rate"
--                            with no room at all, the time until one more
--                            start may pass, else "-1" (wait on the gate list)
--          {"missed"}        source "pending": not at the tail of the pending
--                            list any more; source "inflight": not in the
--                            in-flight list; untouched, do not run
-- Errors:  JQ_WRONGTYPE <key> <expected type> <found type>  the in-flight
--          list, the dead-letter set, the pending list (from "pending", or
--          from "inflight" when the gate holds jobs back), the metadata, the
--          running or rate set, the gate list, or a fencing counter of
--          another type or not an integer ("integer")
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

local n, source = #KEYS - 9, ARGV[6]
if n < 1 or #ARGV ~= 7 + n then
  return redis.error_reply('JQ_BAD_ARGS expected 9 keys (inflight, dead_jobs, fence, pending, meta, running, rate, gate, events) and a job key per job; 7 arguments and an id per job key')
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
if ARGV[7] ~= '0' and ARGV[7] ~= '1' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[7] held must be 0 or 1')
end
-- Doorbells go to <prefix>:{<queue>}:reply:<client>.
local base = string.match(KEYS[2], '^[^{]*{[^}]+}')
if not base then
  return redis.error_reply('JQ_BAD_ARGS KEYS[2] has no {<queue>} hash tag')
end
local refusal = wrongtype(KEYS[1], 'list') or wrongtype(KEYS[2], 'zset') or bad_fence(KEYS[3])
  or (source == 'pending' and wrongtype(KEYS[4], 'list'))
  or (ARGV[7] == '1' and wrongtype(KEYS[8], 'list'))
if refusal then
  return redis.error_reply(refusal)
end
local publish = ARGV[5] == 'spublish' and 'SPUBLISH' or 'PUBLISH'
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local function int(n) return string.format('%d', n) end
local ttl_ms, dead_trim = int(ttl), int(-dead_max - 1)
local now = redis.call('TIME')
local now_n = now[1] * 1000 + math.floor(now[2] / 1000)
local now_ms = int(now_n)
local room, reason, wait, cmax, rmax, rwin
refusal, room, reason, wait, cmax, rmax, rwin = gate(KEYS[5], KEYS[7], KEYS[8], KEYS[6],
  KEYS[6], now_n)
if refusal then
  return redis.error_reply(refusal)
end
-- From "inflight", jobs the gate holds back go to pending: checked (before
-- the first write) only then.
if source == 'inflight' and room < n then
  refusal = wrongtype(KEYS[4], 'list')
  if refusal then
    return redis.error_reply(refusal)
  end
end
if cmax and source == 'inflight' then
  -- IDs of this call that already hold a slot (a start whose reply was
  -- lost, started again from the in-flight list) need no other.
  for i = 1, n do
    if redis.call('ZSCORE', KEYS[6], ARGV[7 + i]) then
      room = room + 1
    end
  end
end
-- Whether a slot of the concurrency limit was given back (the gate list
-- is pushed at the end). pcall: the running set and the gate list are
-- type-checked only while the queue has limits; a stale entry may outlive
-- them.
local freed = false
local function release_slot(id)
  if redis.pcall('ZREM', KEYS[6], id) == 1 then
    freed = true
  end
end
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
  release_slot(id)
  redis.call('ZADD', KEYS[2], now_ms, id)
  redis.call('ZREMRANGEBYRANK', KEYS[2], '0', dead_trim)
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
    'timeout_ms', 'events')
  if job.err then
    bury(id)
    return {'gone', 'not a hash'}
  end
  local state = job[1]
  local events = integer(job[7], 1, 1000000000)
  if state == 'completed' or state == 'failed' or state == 'dead' then
    redis.call('LREM', KEYS[1], '1', id)
    release_slot(id)
    return {'gone', state}
  end
  if state ~= 'queued' and state ~= 'active' then
    redis.call('LREM', KEYS[1], '1', id)
    release_slot(id)
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
      release_unique(base, redis.call('HGET', key, 'unique'), id)
      if events then
        event(KEYS[9], events, 'event', 'dead', 'id', id, 'kind', 'stalled')
      end
      return {'dead'}
    end
  end
  local attempt = int((integer(job[4], 0, 1000000000) or 0) + 1)
  local stalled, fence = int(stalls), int(token)
  local same = job[5] == stalled or (not job[5] and stalls == 0)
  if same and not cmax then
    -- The common case, without building a table: stalls unchanged (0 is
    -- the default when the field is missing), no slot.
    redis.call('HSET', key, 'state', 'active', 'token', fence, 'attempt', attempt,
      'started_ms', now_ms, 'worker', worker)
  else
    local fields = {'state', 'active', 'token', fence, 'attempt', attempt,
      'started_ms', now_ms, 'worker', worker}
    if not same then
      fields[#fields + 1] = 'stalls'
      fields[#fields + 1] = stalled
    end
    if cmax then
      fields[#fields + 1] = 'slot'
      fields[#fields + 1] = '1'
      fields[#fields + 1] = 'extras'
      fields[#fields + 1] = '1'
      redis.call('ZADD', KEYS[6], now_ms, id)
    end
    redis.call('HSET', key, unpack(fields))
  end
  if rmax then
    redis.call('ZADD', KEYS[7], now_ms, fence)
  end
  if events then
    event(KEYS[9], events, 'event', 'started', 'id', id, 'attempt', attempt, 'worker', worker)
  end
  return {'run', job[2] or '', job[3] or '', attempt, stalled, fence,
    timeout_of(job[6])}
end

-- The jobs after the first ROOM are held back. From "inflight" they go
-- back to the tail of the pending list, oldest nearest the tail.
local allowed = math.min(n, room)
if source == 'inflight' then
  for i = n, allowed + 1, -1 do
    if redis.call('LREM', KEYS[1], '1', ARGV[7 + i]) > 0 then
      redis.call('RPUSH', KEYS[4], ARGV[7 + i])
      release_slot(ARGV[7 + i])
    end
  end
end
if allowed == 0 then
  -- The gate is shut: a wake-up waiting on the gate list is stale.
  redis.call('DEL', KEYS[8])
elseif ARGV[7] == '1' and room > allowed and redis.call('LLEN', KEYS[8]) == 0 then
  -- Woken from a hold with room to spare: wake the next held worker.
  redis.call('LPUSH', KEYS[8], '1')
end

-- From pending: the longest run of the expected IDs (oldest first) still at
-- the tail, among those the gate lets through, moves to the in-flight list,
-- in the order one LMOVE RIGHT LEFT per ID would give; the rest is missed.
local taken = allowed
if source == 'pending' then
  -- (LRANGE -0 -1 would be the whole list: nothing to read when none may start.)
  local tail = allowed > 0 and redis.call('LRANGE', KEYS[4], int(-allowed), '-1') or {}
  taken = 0
  while taken < allowed and tail[#tail - taken] == ARGV[8 + taken] do
    taken = taken + 1
  end
  if taken > 0 then
    redis.call('LTRIM', KEYS[4], '0', int(-taken - 1))
    for first = 1, taken, 1000 do
      local ids = {}
      for i = first, math.min(first + 999, taken) do
        ids[#ids + 1] = ARGV[7 + i]
      end
      redis.call('LPUSH', KEYS[1], unpack(ids))
    end
  end
end

-- IDs met in this call (a table only when there can be two).
local out, seen = {}, n > 1 and {}
local held = allowed < n and {'held', reason or '', int(wait or -1)}
for i = 1, n do
  local id = ARGV[7 + i]
  if i > allowed then
    out[i] = held
  elseif i > taken then
    out[i] = {'missed'}
  elseif seen and seen[id] then
    -- The same ID twice in one call (it was in the list twice): one start
    -- only; the extra copy leaves the in-flight list.
    redis.call('LREM', KEYS[1], '-1', id)
    out[i] = {'gone', 'duplicate'}
  elseif source == 'inflight' and not redis.call('LPOS', KEYS[1], id) then
    -- Not in the worker's in-flight list (any more): not the worker's.
    out[i] = {'missed'}
  else
    if seen then
      seen[id] = true
    end
    out[i] = start(KEYS[9 + i], id)
  end
end
if rmax and allowed > 0 then
  -- The rate set outlives its window only while starts come.
  redis.call('PEXPIRE', KEYS[7], int(rwin))
end
if freed and redis.pcall('LLEN', KEYS[8]) == 0 then
  redis.pcall('LPUSH', KEYS[8], '1')
end
return out
