#!lua
-- name: job_start
-- version: 14
-- Recoverable mode, second half of a claim, for one or many claimed jobs of
-- a queue in one call: marks each job active under its claim's fencing
-- token, or tells the worker not to run it. An attempt that finds the job
-- still "active" proves that the previous attempt's worker died or stalled
-- past its lease: that counts as a stall, and a job that stalled more than
-- MAX STALLS times goes to the dead-letter set instead of running again (a
-- poison pill), and its client is told. Each job is decided on its own.
-- Numbers read from a job's hash that are not integers in range count as
-- absent (protocol.md 10, "Numbers").
--
-- KEYS[1]    lease set        <prefix>:{<queue>}:leases
-- KEYS[2]    dead-letter set  <prefix>:{<queue>}:dead_jobs  (sorted set: id -> time ms)
-- KEYS[3]    event stream     <prefix>:{<queue>}:events
-- KEYS[3+i]  job hash of job i  <prefix>:{<queue>}:job:<id i>
-- ARGV[1]    lease ms         the worker's default, used when the job has
--                             none; 1 to 10^12
-- ARGV[2]    max stalls       0 to 10^6
-- ARGV[3]    worker id        not empty
-- ARGV[4]    result ttl ms    how long a dead job's hash is kept; 1 to 10^12
-- ARGV[5]    dead max         most entries kept in the dead-letter set; 1 to 10^9
-- ARGV[6]    notify           "publish" or "spublish" (sharded pub/sub, used
--                             on Redis Cluster) for the client's doorbell
-- ARGV[7]    limited          "1" when job_claim said the queue has a
--                             concurrency limit: each job that runs gets
--                             slot = "1" (and extras = "1"), so that its
--                             finish wakes a worker held back by the limit
--                             (protocol.md 8.9); else "0"
-- ARGV[8..]  two arguments per job, in KEYS order: id, token (from
--            job_claim; 1 to 999999999999999)
--
-- Reply:   array with one decision per job, in KEYS order:
--          {"run", enc, payload, attempt, stalls, lease ms, timeout ms}  run it
--                             (timeout ms: the job's own handler timeout,
--                             "0" for none: the worker's default)
--          {"dead"}           stalled too often: now dead, client told
--          {"gone", state}    finished or missing: do not run
--          {"gone", "failed"} the hash is not a valid job (no or unknown state):
--                             now failed (kind "decode"), client told
--          {"gone", "not a hash"}  the job key holds another Redis type: its ID
--                             goes to the dead-letter set
--          {"gone", "invalid id"}  the ID is not 1 to 256 bytes of valid UTF-8:
--                             it goes to the dead-letter set; its hash, if
--                             any, is failed (kind "decode"), client told
--          {"lost"}           a newer claim owns the job, or this claim is no
--                             longer in the lease set: do not run
--          {"gone", "duplicate"}  the ID came earlier in this call: do not run
-- Errors:  JQ_WRONGTYPE <key> zset <found type>   the lease or dead-letter set
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

local n = #KEYS - 3
if n < 1 or #ARGV ~= 7 + 2 * n then
  return redis.error_reply('JQ_BAD_ARGS expected 3 keys (leases, dead_jobs, events) and a job key per job; 7 arguments and an id and a token per job key')
end
local default_lease = integer(ARGV[1], 1, 1000000000000)
if not default_lease then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] lease ms must be an integer from 1 to 1000000000000')
end
local max_stalls = integer(ARGV[2], 0, 1000000)
if not max_stalls then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] max stalls must be an integer from 0 to 1000000')
end
local worker = ARGV[3]
if worker == '' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] worker id must not be empty')
end
local ttl = integer(ARGV[4], 1, 1000000000000)
if not ttl then
  return redis.error_reply('JQ_BAD_ARGS ARGV[4] result ttl ms must be an integer from 1 to 1000000000000')
end
local dead_max = integer(ARGV[5], 1, 1000000000)
if not dead_max then
  return redis.error_reply('JQ_BAD_ARGS ARGV[5] dead max must be an integer from 1 to 1000000000')
end
if ARGV[6] ~= 'publish' and ARGV[6] ~= 'spublish' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[6] notify must be publish or spublish')
end
if ARGV[7] ~= '0' and ARGV[7] ~= '1' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[7] limited must be 0 or 1')
end
local limited = ARGV[7] == '1'
local tokens = {}
for i = 1, n do
  tokens[i] = integer(ARGV[7 + 2 * i], 1, 999999999999999)
  if not tokens[i] then
    return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (7 + 2 * i) .. '] token must be an integer from 1 to 999999999999999')
  end
end
-- Doorbells go to <prefix>:{<queue>}:reply:<client>.
local base = string.match(KEYS[1], '^[^{]*{[^}]+}')
if not base then
  return redis.error_reply('JQ_BAD_ARGS KEYS[1] has no {<queue>} hash tag')
end
local refusal = wrongtype(KEYS[1], 'zset') or wrongtype(KEYS[2], 'zset')
if refusal then
  return redis.error_reply(refusal)
end
local publish = ARGV[6] == 'spublish' and 'SPUBLISH' or 'PUBLISH'
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local function int(n) return string.format('%d', n) end
local ttl_ms, dead_trim = int(ttl), int(-dead_max - 1)
local now = redis.call('TIME')
local now_n = now[1] * 1000 + math.floor(now[2] / 1000)
local now_ms = int(now_n)

-- Rings the job's client (rare paths only: the client is read here, not in
-- the HMGET every start does).
local function tell(key, id, status)
  local client = redis.call('HGET', key, 'client')
  if client and client ~= '' then
    redis.call(publish, base .. ':reply:' .. client, cmsgpack.pack({id = id, status = status}))
  end
end

-- Drops the lease and adds the ID to the dead-letter set (trimmed).
local function bury(id)
  redis.call('ZREM', KEYS[1], id)
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

local function start(key, id, token)
  if id == '' or #id > 256 then
    return invalid(key, id, 'job ID is empty or longer than 256 bytes')
  end
  if not utf8(id) then
    return invalid(key, id, 'job ID is not valid UTF-8')
  end
  local job = redis.pcall('HMGET', key, 'state', 'token', 'enc', 'payload', 'lease_ms',
    'attempt', 'stalls', 'timeout_ms', 'events')
  if job.err then
    bury(id)
    return {'gone', 'not a hash'}
  end
  local state = job[1]
  local events = integer(job[9], 1, 1000000000)
  if (integer(job[2], 0, 999999999999999) or 0) > token then
    return {'lost'}
  end
  -- The claim must still stand: a sweep (lease ran out between claim and
  -- start) or a late job_finish/job_release of an older attempt may have
  -- dropped it and put the ID back on pending, where another claim will
  -- start the job. Starting it here too would run it twice at once.
  if not redis.call('ZSCORE', KEYS[1], id) then
    return {'lost'}
  end
  if state == 'completed' or state == 'failed' or state == 'dead' then
    redis.call('ZREM', KEYS[1], id)
    return {'gone', state}
  end
  if state ~= 'queued' and state ~= 'active' then
    redis.call('ZREM', KEYS[1], id)
    if redis.call('EXISTS', key) == 0 then
      return {'gone', 'missing'}
    end
    redis.call('HSET', key, 'state', 'failed', 'finished_ms', now_ms, 'error_kind', 'decode',
      'error', 'not a valid job: state ' .. (state and ('"' .. state .. '"') or 'missing'))
    redis.call('PEXPIRE', key, ttl_ms)
    tell(key, id, 'failed')
    return {'gone', 'failed'}
  end
  local stalls = integer(job[7], 0, 1000000000) or 0
  if state == 'active' then
    stalls = stalls + 1
    if stalls > max_stalls then
      redis.call('HSET', key, 'state', 'dead', 'stalls', int(stalls), 'finished_ms', now_ms,
        'error_kind', 'stalled',
        'error', 'the job stalled ' .. int(stalls) .. ' times (limit ' .. int(max_stalls) .. '): its worker died or hung each time')
      bury(id)
      redis.call('PEXPIRE', key, ttl_ms)
      tell(key, id, 'dead')
      release_unique(base, redis.call('HGET', key, 'unique'), id)
      if events then
        event(KEYS[3], events, 'event', 'dead', 'id', id, 'kind', 'stalled')
      end
      return {'dead'}
    end
  end
  local lease = integer(job[5], 1, 1000000000000) or default_lease
  local attempt = int((integer(job[6], 0, 1000000000) or 0) + 1)
  local stalled, leased = int(stalls), int(lease)
  local same = job[7] == stalled or (not job[7] and stalls == 0)
  if same and not limited then
    -- The common case, without building a table: stalls unchanged (0 is
    -- the default when the field is missing), no slot.
    redis.call('HSET', key, 'state', 'active', 'token', int(token), 'attempt', attempt,
      'started_ms', now_ms, 'worker', worker)
  else
    local fields = {'state', 'active', 'token', int(token), 'attempt', attempt,
      'started_ms', now_ms, 'worker', worker}
    if not same then
      fields[#fields + 1] = 'stalls'
      fields[#fields + 1] = stalled
    end
    if limited then
      fields[#fields + 1] = 'slot'
      fields[#fields + 1] = '1'
      fields[#fields + 1] = 'extras'
      fields[#fields + 1] = '1'
    end
    redis.call('HSET', key, unpack(fields))
  end
  redis.call('ZADD', KEYS[1], int(now_n + lease), id)
  if events then
    event(KEYS[3], events, 'event', 'started', 'id', id, 'attempt', attempt, 'worker', worker)
  end
  return {'run', job[3] or '', job[4] or '', attempt, stalled, leased,
    timeout_of(job[8])}
end

local out, seen = {}, {}
for i = 1, n do
  local id = ARGV[6 + 2 * i]
  if seen[id] then
    -- The same ID claimed twice (it was in the queue twice): one start only.
    out[i] = {'gone', 'duplicate'}
  else
    seen[id] = true
    out[i] = start(KEYS[3 + i], id, tokens[i])
  end
end
return out
