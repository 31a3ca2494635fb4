#!lua
-- name: job_finish
-- version: 7
-- Recoverable and reliable modes: records a job's outcome under its fencing
-- token, drops its claim (lease or in-flight entry) and rings the client's
-- doorbell. The doorbell carries the outcome (the same record as a
-- simple-mode reply), so that a waiting client need not read the hash; the
-- hash stays the source of truth. A failure with
-- attempts left (and RETRY = 1) goes to the back of its queue instead.
-- A completed job's payload is emptied; a failed job keeps it.
-- A completion from a worker whose job was taken over by a newer attempt is
-- refused; a late completion when nobody else started the job is accepted.
--
-- KEYS[1]  job hash        <prefix>:{<queue>}:job:<id>
-- KEYS[2]  claim           recoverable: lease set <prefix>:{<queue>}:leases
--                          reliable: the worker's in-flight list
--                          <prefix>:{<queue>}:inflight:<worker>
-- KEYS[3]  pending list    <prefix>:{<queue>}:pending
-- KEYS[4]  tickets list    <prefix>:{<queue>}:tickets  (recoverable only)
-- ARGV[1]  id
-- ARGV[2]  token           the token job_start accepted
-- ARGV[3]  status          "completed" | "failed"
-- ARGV[4]  completed: result bytes (in the job's enc); failed: error kind
-- ARGV[5]  failed: error message ("" when completed)
-- ARGV[6]  retry           "1" when a failure may be retried, else "0"
-- ARGV[7]  result ttl ms   how long the finished job's hash is kept
-- ARGV[8]  mode            "recoverable" | "reliable"
-- ARGV[9]  notify          "publish" (default) or "spublish" (sharded pub/sub,
--                          used on Redis Cluster) for the client's doorbell
--
-- Reply:   the job's new state: "completed", "failed" or "queued" (retried).
-- Errors:  JQ_NO_JOB <id>              no such job (expired or never existed)
--          JQ_LEASE_LOST <current token>  a newer attempt owns the job
--          JQ_ALREADY_FINISHED <state>    the job is no longer active (it has an
--                                         outcome, or was already put back)
--          JQ_BAD_ARGS <detail>

local id, token, status = ARGV[1], ARGV[2], ARGV[3]
local ttl, mode = tonumber(ARGV[7]), ARGV[8]
if (status ~= 'completed' and status ~= 'failed') or not ttl or ttl < 1
    or (mode ~= 'recoverable' and mode ~= 'reliable') then
  return redis.error_reply('JQ_BAD_ARGS expected status completed or failed, a ttl and a mode')
end
local job = redis.call('HMGET', KEYS[1], 'state', 'token', 'client', 'enc', 'error_kind')
local state = job[1]
if not state then
  return redis.error_reply('JQ_NO_JOB ' .. id)
end
if job[2] ~= token then
  return redis.error_reply('JQ_LEASE_LOST ' .. tostring(job[2]))
end
if state ~= 'active' then
  return redis.error_reply('JQ_ALREADY_FINISHED ' .. state)
end
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local function int(n) return string.format('%d', n) end
local ttl_ms = int(ttl)
local now = redis.call('TIME')
local now_ms = int(now[1] * 1000 + math.floor(now[2] / 1000))
if mode == 'reliable' then
  redis.call('LREM', KEYS[2], -1, id)
else
  redis.call('ZREM', KEYS[2], id)
end
local attempts = status == 'failed' and ARGV[6] == '1' and redis.call('HMGET', KEYS[1], 'attempt', 'max_attempts')
if attempts and (tonumber(attempts[1]) or 0) < (tonumber(attempts[2]) or 1) then
  redis.call('HSET', KEYS[1], 'state', 'queued', 'error_kind', ARGV[4], 'error', ARGV[5])
  redis.call('LPUSH', KEYS[3], id)
  if mode == 'recoverable' then
    redis.call('LPUSH', KEYS[4], '1')
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
  redis.call(ARGV[9] == 'spublish' and 'SPUBLISH' or 'PUBLISH', string.match(KEYS[1], '^[^}]*}') .. ':reply:' .. job[3], bell)
end
return status
