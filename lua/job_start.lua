#!lua
-- name: job_start
-- version: 8
-- Recoverable mode, second half of a claim, for one or many claimed jobs of
-- a queue in one call: marks each job active under its claim's fencing
-- token, or tells the worker not to run it. An attempt that finds the job
-- still "active" proves that the previous attempt's worker died or stalled
-- past its lease: that counts as a stall, and a job that stalled more than
-- MAX STALLS times goes to the dead-letter set instead of running again (a
-- poison pill), and its client is told. Each job is decided on its own.
--
-- KEYS[1]    lease set        <prefix>:{<queue>}:leases
-- KEYS[2]    dead-letter set  <prefix>:{<queue>}:dead_jobs  (sorted set: id -> time ms)
-- KEYS[2+i]  job hash of job i  <prefix>:{<queue>}:job:<id i>
-- ARGV[1]    lease ms         the worker's default, used when the job has none
-- ARGV[2]    max stalls       >= 0
-- ARGV[3]    worker id
-- ARGV[4]    result ttl ms    how long a dead job's hash is kept
-- ARGV[5]    dead max         most entries kept in the dead-letter set
-- ARGV[6]    notify           "publish" or "spublish" (sharded pub/sub, used
--                             on Redis Cluster) for the client's doorbell
-- ARGV[7..]  two arguments per job, in KEYS order: id, token (from job_claim)
--
-- Reply:   array with one decision per job, in KEYS order:
--          {"run", enc, payload, attempt, stalls, lease ms}  run it
--          {"dead"}           stalled too often: now dead, client told
--          {"gone", state}    finished or missing: do not run
--          {"gone", "failed"} the hash is not a valid job (no or unknown state):
--                             now failed (kind "decode"), client told
--          {"gone", "not a hash"}  the job key holds another Redis type: its ID
--                             goes to the dead-letter set
--          {"lost"}           a newer claim owns the job: do not run
--          {"gone", "duplicate"}  the ID came earlier in this call: do not run
-- Errors:  JQ_BAD_ARGS <detail>   (nothing is written)

local default_lease, max_stalls = tonumber(ARGV[1]), tonumber(ARGV[2])
local ttl, dead_max = tonumber(ARGV[4]), tonumber(ARGV[5])
local n = #KEYS - 2
if not default_lease or not max_stalls or not ttl or ttl < 1 or not dead_max then
  return redis.error_reply('JQ_BAD_ARGS expected numeric lease, max stalls, ttl, dead max')
end
if n < 1 or #ARGV ~= 6 + 2 * n then
  return redis.error_reply('JQ_BAD_ARGS expected an id and a token per job key')
end
for i = 1, n do
  if not tonumber(ARGV[6 + 2 * i]) then
    return redis.error_reply('JQ_BAD_ARGS expected numeric tokens')
  end
end
local publish = ARGV[6] == 'spublish' and 'SPUBLISH' or 'PUBLISH'
local worker = ARGV[3]
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local function int(n) return string.format('%d', n) end
local ttl_ms = int(ttl)
local now = redis.call('TIME')
local now_n = now[1] * 1000 + math.floor(now[2] / 1000)
local now_ms = int(now_n)

-- Rings the job's client (rare paths only: the client is read here, not in
-- the HMGET every start does).
local function tell(key, id, status)
  local client = redis.call('HGET', key, 'client')
  if client and client ~= '' then
    redis.call(publish, string.match(key, '^[^}]*}') .. ':reply:' .. client,
      cmsgpack.pack({id = id, status = status}))
  end
end

local function start(key, id, token)
  local job = redis.pcall('HMGET', key, 'state', 'token', 'enc', 'payload', 'lease_ms',
    'attempt', 'stalls')
  if job.err then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], now_ms, id)
    return {'gone', 'not a hash'}
  end
  local state = job[1]
  if (tonumber(job[2]) or 0) > token then
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
  local stalls = tonumber(job[7]) or 0
  if state == 'active' then
    stalls = stalls + 1
    if stalls > max_stalls then
      redis.call('HSET', key, 'state', 'dead', 'stalls', int(stalls), 'finished_ms', now_ms,
        'error_kind', 'stalled',
        'error', 'the job stalled ' .. stalls .. ' times (limit ' .. max_stalls .. '): its worker died or hung each time')
      redis.call('ZREM', KEYS[1], id)
      redis.call('ZADD', KEYS[2], now_ms, id)
      redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -dead_max - 1)
      redis.call('PEXPIRE', key, ttl_ms)
      tell(key, id, 'dead')
      return {'dead'}
    end
  end
  local lease = tonumber(job[5]) or 0
  if lease < 1 then
    lease = default_lease
  end
  local attempt, stalled, leased = int((tonumber(job[6]) or 0) + 1), int(stalls), int(lease)
  if job[7] == stalled or (not job[7] and stalls == 0) then
    -- Stalls unchanged (0 is the default when the field is missing).
    redis.call('HSET', key, 'state', 'active', 'token', int(token), 'attempt', attempt,
      'started_ms', now_ms, 'worker', worker)
  else
    redis.call('HSET', key, 'state', 'active', 'token', int(token), 'attempt', attempt,
      'stalls', stalled, 'started_ms', now_ms, 'worker', worker)
  end
  redis.call('ZADD', KEYS[1], int(now_n + lease), id)
  return {'run', job[3] or '', job[4] or '', attempt, stalled, leased}
end

local out, seen = {}, {}
for i = 1, n do
  local id = ARGV[5 + 2 * i]
  if seen[id] then
    -- The same ID claimed twice (it was in the queue twice): one start only.
    out[i] = {'gone', 'duplicate'}
  else
    seen[id] = true
    out[i] = start(KEYS[2 + i], id, tonumber(ARGV[6 + 2 * i]))
  end
end
return out
