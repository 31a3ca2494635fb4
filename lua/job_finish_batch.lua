#!lua
-- name: job_finish_batch
-- version: 13
-- Recoverable and reliable modes: job_finish for several jobs of one queue
-- in one call, so that a busy worker pays the cost of a script call once
-- for all the jobs that finished meanwhile. Each job is checked and
-- finished exactly as job_finish would; one job's refusal does not affect
-- the others. The doorbells of one client's jobs go out as one message: the
-- outcome record when there is one, an array of outcome records when there
-- are several. A job started under a concurrency limit gives its slot back
-- as in job_finish (the gate list is pushed once per call); unique locks and
-- events as in job_finish.
--
-- KEYS[1]    claim           recoverable: lease set <prefix>:{<queue>}:leases
--                            reliable: the worker's in-flight list
-- KEYS[2]    pending list    <prefix>:{<queue>}:pending
-- KEYS[3]    tickets list    <prefix>:{<queue>}:tickets  (recoverable only)
-- KEYS[4]    delayed set     <prefix>:{<queue>}:delayed
-- KEYS[5]    clock list      <prefix>:{<queue>}:clock
-- KEYS[6]    running set     <prefix>:{<queue>}:running  (reliable mode)
-- KEYS[7]    gate list       <prefix>:{<queue>}:gate
-- KEYS[8]    event stream    <prefix>:{<queue>}:events
-- KEYS[8+i]  job hash of job i
-- ARGV[1]    result ttl ms   1 to 10^12
-- ARGV[2]    mode            "recoverable" | "reliable"
-- ARGV[3]    notify          "publish" or "spublish" (sharded pub/sub)
-- ARGV[4..]  seven arguments per job, in KEYS order: id, token (1 to
--            999999999999999), status ("completed" | "failed"), result
--            bytes or failure kind, failure message ("" when completed),
--            retry ("1" | "0"), retry delay ("-1": the job's backoff, else
--            0 to 10^12 ms), as job_finish's ARGV[1] to ARGV[6] and ARGV[10]
--
-- Reply:   array with one string per job: its new state ("completed",
--          "failed" or "queued"), or the error job_finish would have
--          returned ("JQ_NO_JOB <id>", "JQ_LEASE_LOST <token>",
--          "JQ_ALREADY_FINISHED <state>", "JQ_WRONGTYPE <job key> hash
--          <found type>" when the job key holds another type: nothing of
--          that job is touched).
-- Errors:  JQ_WRONGTYPE <key> <expected type> <found type>  the claim (zset
--          or list), the running set (zset) or the gate list, or, when a job
--          of the call may be retried, pending, tickets or clock (list) or
--          delayed (zset)
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

local n = #KEYS - 8
if n < 1 or #ARGV ~= 3 + 7 * n then
  return redis.error_reply('JQ_BAD_ARGS expected 8 keys (claim, pending, tickets, delayed, clock, running, gate, events) and a job key per job; 3 arguments and seven per job key')
end
local mode, notify = ARGV[2], ARGV[3]
local ttl = integer(ARGV[1], 1, 1000000000000)
if not ttl then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] result ttl ms must be an integer from 1 to 1000000000000')
end
if mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] mode must be recoverable or reliable')
end
if notify ~= 'publish' and notify ~= 'spublish' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] notify must be publish or spublish')
end
local tokens, delays, retries = {}, {}, false
for i = 1, n do
  local a = 3 + 7 * (i - 1)
  tokens[i] = integer(ARGV[a + 2], 1, 999999999999999)
  if not tokens[i] then
    return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 2) .. '] token must be an integer from 1 to 999999999999999')
  end
  local status, retry = ARGV[a + 3], ARGV[a + 6]
  if status ~= 'completed' and status ~= 'failed' then
    return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 3) .. '] status must be completed or failed')
  end
  if retry ~= '0' and retry ~= '1' then
    return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 6) .. '] retry must be 0 or 1')
  end
  delays[i] = ARGV[a + 7] == '-1' and -1 or integer(ARGV[a + 7], -1, 1000000000000)
  if not delays[i] then
    return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 7) .. '] retry delay must be -1 or an integer from 0 to 1000000000000')
  end
  retries = retries or (status == 'failed' and retry == '1')
end
-- Doorbells go to <prefix>:{<queue>}:reply:<client>.
local base = string.match(KEYS[1], '^[^{]*{[^}]+}')
if not base then
  return redis.error_reply('JQ_BAD_ARGS KEYS[1] has no {<queue>} hash tag')
end
-- Every queue key it may write, checked before the first write.
local refusal = wrongtype(KEYS[1], mode == 'reliable' and 'list' or 'zset')
  or (retries and wrongtype(KEYS[2], 'list'))
  or (retries and mode == 'recoverable' and wrongtype(KEYS[3], 'list'))
  or (retries and (wrongtype(KEYS[4], 'zset') or wrongtype(KEYS[5], 'list')))
  or wrongtype(KEYS[6], 'zset') or wrongtype(KEYS[7], 'list')
if refusal then
  return redis.error_reply(refusal)
end
local publish = notify == 'spublish' and 'SPUBLISH' or 'PUBLISH'
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local function int(n) return string.format('%d', n) end
local ttl_ms = int(ttl)
local now = redis.call('TIME')
local now_ms = int(now[1] * 1000 + math.floor(now[2] / 1000))

-- MessagePack by hand (as in job_finish): Lua's cmsgpack has no bin type.
-- The fixed keys and statuses are written as literal fixstr bytes.
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
local function bin(s) return header(nil, 0xc4, #s) .. s end

-- Doorbells per client, in the order of the clients' first jobs.
local bells, clients = {}, {}
-- Whether a job gave back a slot of the concurrency limit.
local freed = false

local function finish(key, id, token, status, a4, a5, retry, retry_delay)
  local job = redis.pcall('HMGET', key, 'state', 'token', 'client', 'enc', 'error_kind',
    'attempt', 'max_attempts', 'backoff', 'extras')
  if job.err then
    -- Not the worker's to fix: refused for this job alone, nothing written.
    -- Its claim stays, so the sweep or recovery dead-letters it.
    return 'JQ_WRONGTYPE ' .. text(key) .. ' hash ' .. redis.call('TYPE', key).ok
  end
  if not job[1] then
    return 'JQ_NO_JOB ' .. text(id)
  end
  local current = integer(job[2], 0, 999999999999999) or 0
  if current ~= token then
    return 'JQ_LEASE_LOST ' .. int(current)
  end
  if job[1] ~= 'active' then
    return 'JQ_ALREADY_FINISHED ' .. text(job[1])
  end
  -- Still claimed? Not when the sweep (or recovery) already put the ID
  -- back on pending: then it must not be queued twice.
  local claimed
  if mode == 'reliable' then
    claimed = redis.call('LREM', KEYS[1], '-1', id)
  else
    claimed = redis.call('ZREM', KEYS[1], id)
  end
  -- A job's slot, unique key and events (protocol.md 8.13) are read only
  -- when its extras field says it may have one.
  local slot_f, unique_f, events_f, worker_f
  if job[9] == '1' then
    local extra = redis.call('HMGET', key, 'slot', 'unique', 'events', 'worker')
    slot_f, unique_f, events_f, worker_f = extra[1], extra[2], extra[3], extra[4]
  end
  if slot_f == '1' then
    -- A slot of the concurrency limit is free again.
    if mode == 'reliable' then
      redis.call('ZREM', KEYS[6], id)
    end
    freed = true
  end
  local attempt = integer(job[6], 0, 1000000000) or 0
  local events = events_f and integer(events_f, 1, 1000000000)
    local attempt_s = events and int(attempt)
  local worker_s = events and (worker_f or '')
  if status == 'failed' and retry == '1' and attempt < (integer(job[7], 1, 1000000) or 1) then
    local wait = retry_delay >= 0 and retry_delay or backoff_ms(job[8], id, attempt)
    if claimed > 0 and wait > 0 then
      local due = now[1] * 1000 + math.floor(now[2] / 1000) + wait
      redis.call('HSET', key, 'state', 'queued', 'error_kind', a4, 'error', a5, 'due_ms', int(due))
      delay_job(KEYS[4], KEYS[5], id, due)
      if events then
        event(KEYS[8], events, 'event', 'retried', 'id', id, 'attempt', attempt_s, 'worker', worker_s,
          'kind', a4, 'due_ms', int(due))
      end
      return 'queued'
    end
    redis.call('HSET', key, 'state', 'queued', 'error_kind', a4, 'error', a5)
    if events then
      event(KEYS[8], events, 'event', 'retried', 'id', id, 'attempt', attempt_s, 'worker', worker_s,
        'kind', a4)
    end
    if claimed > 0 then
      redis.call('LPUSH', KEYS[2], id)
      if mode == 'recoverable' then
        redis.call('LPUSH', KEYS[3], '1')
      end
    end
    return 'queued'
  end
  local bell
  if status == 'completed' then
    redis.call('HSET', key, 'state', 'completed', 'result', a4, 'finished_ms', now_ms, 'payload', '')
    if job[5] then
      redis.call('HDEL', key, 'error_kind', 'error')
    end
    bell = '\132\162id' .. str(id) .. '\166status\169completed\163enc' .. str(job[4] or '')
      .. '\166result' .. bin(a4)
  else
    redis.call('HSET', key, 'state', 'failed', 'error_kind', a4, 'error', a5, 'finished_ms', now_ms)
    bell = '\131\162id' .. str(id) .. '\166status\166failed\165error\130\164kind' .. str(a4)
      .. '\167message' .. str(a5)
  end
  redis.call('PEXPIRE', key, ttl_ms)
  release_unique(base, unique_f, id)
  if events then
    if status == 'completed' then
      event(KEYS[8], events, 'event', 'completed', 'id', id, 'attempt', attempt_s, 'worker', worker_s)
    else
      event(KEYS[8], events, 'event', 'failed', 'id', id, 'attempt', attempt_s, 'worker', worker_s,
        'kind', a4)
    end
  end
  local client = job[3]
  if client and client ~= '' then
    if not bells[client] then
      bells[client] = {}
      clients[#clients + 1] = client
    end
    local list = bells[client]
    list[#list + 1] = bell
  end
  return status
end

local out = {}
for i = 1, n do
  local a = 3 + 7 * (i - 1)
  out[i] = finish(KEYS[8 + i], ARGV[a + 1], tokens[i], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6],
    delays[i])
end
if freed and redis.call('LLEN', KEYS[7]) == 0 then
  redis.call('LPUSH', KEYS[7], '1')
end
for _, client in ipairs(clients) do
  local list = bells[client]
  local message = list[1]
  if #list > 1 then
    -- A MessagePack array of the outcome records.
    local count = #list
    if count < 16 then
      message = string.char(0x90 + count)
    elseif count < 65536 then
      message = string.char(0xdc, math.floor(count / 256), count % 256)
    else
      message = string.char(0xdd, math.floor(count / 16777216) % 256, math.floor(count / 65536) % 256,
        math.floor(count / 256) % 256, count % 256)
    end
    message = message .. table.concat(list)
  end
  redis.call(publish, base .. ':reply:' .. client, message)
end
return out
