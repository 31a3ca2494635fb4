#!lua
-- name: job_finish
-- version: 15
-- Recoverable and reliable modes: records a job's outcome under its fencing
-- token, drops its claim (lease or in-flight entry) and rings the client's
-- doorbell. The doorbell carries the outcome (the same record as a
-- simple-mode reply), so that a waiting client need not read the hash; the
-- hash stays the source of truth. A failure with
-- attempts left (and RETRY = 1) is queued again instead: after RETRY DELAY,
-- or the job's backoff (protocol.md 8.7), in the delayed set (its hash gets
-- due_ms; the clock list is pushed when it is the new earliest), else at
-- the back of its queue. Its ID is queued only when the claim still held it
-- (a sweep or a recovery that already put the ID back on pending after the
-- lease ran out must not make it twice; that retry then runs without delay).
-- A completed job's payload is emptied; a failed job keeps it.
-- A job started under a concurrency limit (slot = "1") gives its slot back:
-- in reliable mode it leaves the running set; either way the gate list is
-- pushed (when empty), so that a worker held back by the limit wakes.
-- A job that ends (not retried) gives its unique lock back (protocol.md
-- 8.10), and a job that records events appends "retried", "completed" or
-- "failed" to the event stream (protocol.md 8.12).
-- A completion from a worker whose job was taken over by a newer attempt is
-- refused; a late completion when nobody else started the job is accepted.
--
-- KEYS[1]  job hash        <prefix>:{<queue>}:job:<id>
-- KEYS[2]  claim           recoverable: lease set <prefix>:{<queue>}:leases
--                          reliable: the worker's in-flight list
--                          <prefix>:{<queue>}:inflight:<worker>
-- KEYS[3]  pending list    <prefix>:{<queue>}:pending
-- KEYS[4]  tickets list    <prefix>:{<queue>}:tickets  (recoverable only)
-- KEYS[5]  delayed set     <prefix>:{<queue>}:delayed
-- KEYS[6]  clock list      <prefix>:{<queue>}:clock
-- KEYS[7]  running set     <prefix>:{<queue>}:running  (reliable mode)
-- KEYS[8]  gate list       <prefix>:{<queue>}:gate
-- KEYS[9]  event stream    <prefix>:{<queue>}:events
-- ARGV[1]  id
-- ARGV[2]  token           the token job_start accepted (1 to 999999999999999)
-- ARGV[3]  status          "completed" | "failed"
-- ARGV[4]  completed: result bytes (in the job's enc); failed: error kind
-- ARGV[5]  failed: error message ("" when completed)
-- ARGV[6]  retry           "1" when a failure may be retried, else "0"
-- ARGV[7]  result ttl ms   how long the finished job's hash is kept; 1 to 10^12
-- ARGV[8]  mode            "recoverable" | "reliable"
-- ARGV[9]  notify          "publish" or "spublish" (sharded pub/sub, used on
--                          Redis Cluster) for the client's doorbell
-- ARGV[10] retry delay     "-1": the job's backoff decides; else 0 to 10^12 ms,
--                          the delay the handler asked for
--
-- Reply:   the job's new state: "completed", "failed" or "queued" (retried).
-- Errors:  JQ_NO_JOB <id>              no such job (expired or never existed)
--          JQ_LEASE_LOST <current token>  a newer attempt owns the job (0: the
--                                         hash has no valid token)
--          JQ_ALREADY_FINISHED <state>    the job is no longer active (it has an
--                                         outcome, or was already put back)
--          JQ_WRONGTYPE <key> <expected type> <found type>  the job key (hash),
--                                         the claim (zset or list), or, for a
--                                         retry, pending, tickets or clock
--                                         (list) or delayed (zset); for a job
--                                         with a slot, running (zset) or gate
--                                         (list)
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

-- The first 8 hex digits of s (lowercase, as redis.sha1hex writes them)
-- read as an unsigned integer, digit by digit.
local function hex8(s)
  local v = 0
  for i = 1, 8 do
    local b = string.byte(s, i)
    v = v * 16 + (b <= 57 and b - 48 or b - 87)
  end
  return v
end

-- The delay in ms before the retry of a job whose attempt number ATTEMPT
-- failed, under its backoff POLICY (its hash's backoff field, protocol.md
-- 8.7): 0 without a policy, or with one that does not parse. Evaluated in
-- IEEE 754 doubles in this order, so that every implementation agrees.
local function backoff_ms(policy, id, attempt)
  if not policy then
    return 0
  end
  local kind, b, m, j = string.match(policy, '^(%l+):([0-9]+):([0-9]+):([0-9]+)$')
  local base, max, jitter = integer(b, 1, 1000000000000), integer(m, 1, 1000000000000), integer(j, 0, 1000)
  if not base or not max or not jitter or base > max then
    return 0
  end
  local delay
  if kind == 'fixed' then
    delay = base
  elseif kind == 'exponential' then
    local doublings = math.max(attempt, 1) - 1
    delay = doublings >= 40 and max or math.min(max, base * 2 ^ doublings)
  else
    return 0
  end
  if jitter > 0 then
    -- Deterministic jitter: the first 8 hex digits of SHA1("<id>:<attempt>").
    local h = hex8(redis.sha1hex(id .. ':' .. string.format('%d', attempt)))
    delay = delay - math.floor(delay * jitter / 1000 * h / 4294967296)
  end
  return delay
end

-- True when DUE (ms) is before the earliest due time in the delayed set,
-- whose lowest entry's score is S (nil when the set is empty). A score that
-- is not a strict integer (inf, a fraction: another program wrote it)
-- counts as no earliest, so the clock is rung: one extra wake-up at most.
local function before_earliest(due, s)
  local earliest = s and integer(s, -999999999999999, 999999999999999)
  return not earliest or due < earliest
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

-- Puts ID in the delayed set, due at DUE (ms), and rings the clock when it
-- is due before every job already there.
local function delay_job(delayed, clock, id, due)
  local first = redis.call('ZRANGE', delayed, '0', '0', 'WITHSCORES')
  redis.call('ZADD', delayed, string.format('%d', due), id)
  if before_earliest(due, first[2]) and redis.call('LLEN', clock) == 0 then
    redis.call('LPUSH', clock, '1')
  end
end

if #KEYS ~= 9 or #ARGV ~= 10 then
  return redis.error_reply('JQ_BAD_ARGS expected 9 keys (job, claim, pending, tickets, delayed, clock, running, gate, events) and 10 arguments')
end
local id, status, mode = ARGV[1], ARGV[3], ARGV[8]
local token = integer(ARGV[2], 1, 999999999999999)
if not token then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] token must be an integer from 1 to 999999999999999')
end
if status ~= 'completed' and status ~= 'failed' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] status must be completed or failed')
end
if ARGV[6] ~= '0' and ARGV[6] ~= '1' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[6] retry must be 0 or 1')
end
local ttl = integer(ARGV[7], 1, 1000000000000)
if not ttl then
  return redis.error_reply('JQ_BAD_ARGS ARGV[7] result ttl ms must be an integer from 1 to 1000000000000')
end
if mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[8] mode must be recoverable or reliable')
end
local notify = ARGV[9]
if notify ~= 'publish' and notify ~= 'spublish' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[9] notify must be publish or spublish')
end
local retry_delay = integer(ARGV[10], -1, 1000000000000)
if not retry_delay then
  return redis.error_reply('JQ_BAD_ARGS ARGV[10] retry delay must be -1 or an integer from 0 to 1000000000000')
end
-- The doorbell goes to <prefix>:{<queue>}:reply:<client>.
local base = string.match(KEYS[1], '^[^{]*{[^}]+}')
if not base then
  return redis.error_reply('JQ_BAD_ARGS KEYS[1] has no {<queue>} hash tag')
end
local job = redis.pcall('HMGET', KEYS[1], 'state', 'token', 'client', 'enc', 'error_kind',
  'attempt', 'max_attempts', 'backoff', 'extras')
if job.err then
  return redis.error_reply(wrongtype(KEYS[1], 'hash') or job.err)
end
local state = job[1]
if not state then
  return redis.error_reply('JQ_NO_JOB ' .. text(id))
end
local current = integer(job[2], 0, 999999999999999) or 0
if current ~= token then
  return redis.error_reply('JQ_LEASE_LOST ' .. string.format('%d', current))
end
if state ~= 'active' then
  return redis.error_reply('JQ_ALREADY_FINISHED ' .. text(state))
end
local attempt = integer(job[6], 0, 1000000000) or 0
local retry = status == 'failed' and ARGV[6] == '1' and attempt < (integer(job[7], 1, 1000000) or 1)
local wait = 0
if retry then
  wait = retry_delay >= 0 and retry_delay or backoff_ms(job[8], id, attempt)
end
-- A job's slot, unique key and events (protocol.md 8.13) are read only when
-- its extras field says it may have one: one absent field on the common
-- path instead of three.
local slot_f, unique_f, events_f, worker_f
if job[9] == '1' then
  local extra = redis.call('HMGET', KEYS[1], 'slot', 'unique', 'events', 'worker')
  slot_f, unique_f, events_f, worker_f = extra[1], extra[2], extra[3], extra[4]
end
local slot = slot_f == '1'
local events = events_f and integer(events_f, 1, 1000000000)
local attempt_s = events and string.format('%d', attempt)
local worker_s = events and (worker_f or '')
-- Every key it will write, checked before the first write.
local refusal = wrongtype(KEYS[2], mode == 'reliable' and 'list' or 'zset')
  or (retry and wrongtype(KEYS[3], 'list'))
  or (retry and mode == 'recoverable' and wrongtype(KEYS[4], 'list'))
  or (retry and (wrongtype(KEYS[5], 'zset') or wrongtype(KEYS[6], 'list')))
  or (slot and (wrongtype(KEYS[7], 'zset') or wrongtype(KEYS[8], 'list')))
if refusal then
  return redis.error_reply(refusal)
end
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local function int(n) return string.format('%d', n) end
local ttl_ms = int(ttl)
local now = redis.call('TIME')
local now_ms = int(now[1] * 1000 + math.floor(now[2] / 1000))
-- Still claimed? Not when the sweep (or recovery) already put the ID back
-- on pending after the lease ran out: then it must not be queued twice.
local claimed
if mode == 'reliable' then
  claimed = redis.call('LREM', KEYS[2], '-1', id)
else
  claimed = redis.call('ZREM', KEYS[2], id)
end
if slot then
  if mode == 'reliable' then
    redis.call('ZREM', KEYS[7], id)
  end
  if redis.call('LLEN', KEYS[8]) == 0 then
    redis.call('LPUSH', KEYS[8], '1')
  end
end
if retry then
  if claimed > 0 and wait > 0 then
    local due = now[1] * 1000 + math.floor(now[2] / 1000) + wait
    redis.call('HSET', KEYS[1], 'state', 'queued', 'error_kind', ARGV[4], 'error', ARGV[5],
      'due_ms', int(due))
    delay_job(KEYS[5], KEYS[6], id, due)
    if events then
      event(KEYS[9], events, 'event', 'retried', 'id', id, 'attempt', attempt_s, 'worker', worker_s,
        'kind', ARGV[4], 'due_ms', int(due))
    end
    return 'queued'
  end
  redis.call('HSET', KEYS[1], 'state', 'queued', 'error_kind', ARGV[4], 'error', ARGV[5])
  if events then
    event(KEYS[9], events, 'event', 'retried', 'id', id, 'attempt', attempt_s, 'worker', worker_s,
      'kind', ARGV[4])
  end
  if claimed > 0 then
    redis.call('LPUSH', KEYS[3], id)
    if mode == 'recoverable' then
      redis.call('LPUSH', KEYS[4], '1')
    end
  end
  return 'queued'
end
if status == 'completed' then
  redis.call('HSET', KEYS[1], 'state', 'completed', 'result', ARGV[4], 'finished_ms', now_ms,
    'payload', '')
  if job[5] then
    redis.call('HDEL', KEYS[1], 'error_kind', 'error')
  end
else
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error_kind', ARGV[4], 'error', ARGV[5],
    'finished_ms', now_ms)
end
redis.call('PEXPIRE', KEYS[1], ttl_ms)
release_unique(base, unique_f, id)
if events then
  if status == 'completed' then
    event(KEYS[9], events, 'event', 'completed', 'id', id, 'attempt', attempt_s, 'worker', worker_s)
  else
    event(KEYS[9], events, 'event', 'failed', 'id', id, 'attempt', attempt_s, 'worker', worker_s,
      'kind', ARGV[4])
  end
end
-- MessagePack by hand: Lua's cmsgpack has no bin type for the result.
-- The fixed keys and statuses are written as literal fixstr bytes.
local function header(small, code, n)
  if small and n < 32 then
    return string.char(small + n)
  elseif n < 256 then
    return string.char(code, n)
  elseif n < 65536 then
    return string.char(code + 1, math.floor(n / 256), n % 256)
  end
  return string.char(code + 2, math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256, n % 256)
end
local function str(s) return header(0xa0, 0xd9, #s) .. s end
local function bin(s) return header(nil, 0xc4, #s) .. s end
if job[3] and job[3] ~= '' then
  local bell
  if status == 'completed' then
    bell = '\132\162id' .. str(id) .. '\166status\169completed\163enc' .. str(job[4] or '')
      .. '\166result' .. bin(ARGV[4])
  else
    bell = '\131\162id' .. str(id) .. '\166status\166failed\165error\130\164kind' .. str(ARGV[4])
      .. '\167message' .. str(ARGV[5])
  end
  redis.call(notify == 'spublish' and 'SPUBLISH' or 'PUBLISH', base .. ':reply:' .. job[3], bell)
end
return status
