#!lua
-- name: job_start
-- version: 3
-- Recoverable mode, second half of a claim: marks the job active under the
-- claim's fencing token, or tells the worker not to run it. An attempt that
-- finds the job still "active" proves that the previous attempt's worker
-- died or stalled past its lease: that counts as a stall, and a job that
-- stalled more than MAX STALLS times goes to the dead-letter set instead of
-- running again (a poison pill), and its client is told.
--
-- KEYS[1]  job hash        <prefix>:{<queue>}:job:<id>
-- KEYS[2]  lease set       <prefix>:{<queue>}:leases
-- KEYS[3]  dead-letter set <prefix>:{<queue>}:dead_jobs  (sorted set: id -> time ms)
-- ARGV[1]  id
-- ARGV[2]  token           from job_claim
-- ARGV[3]  lease ms        the worker's default, used when the job has none
-- ARGV[4]  max stalls      >= 0
-- ARGV[5]  worker id
-- ARGV[6]  result ttl ms   how long a dead job's hash is kept
-- ARGV[7]  dead max        most entries kept in the dead-letter set
-- ARGV[8]  notify          "publish" (default) or "spublish" (sharded pub/sub,
--                          used on Redis Cluster) for the client's doorbell
--
-- Reply:   {"run", enc, payload, attempt, stalls, lease ms}  run it
--          {"dead"}           stalled too often: now dead, client told
--          {"gone", state}    finished or missing: do not run
--          {"gone", "failed"} the hash is not a valid job (no or unknown state):
--                             now failed (kind "decode"), client told
--          {"gone", "not a hash"}  the job key holds another Redis type: its ID
--                             goes to the dead-letter set
--          {"lost"}           a newer claim owns the job: do not run
-- Errors:  JQ_BAD_ARGS <detail>

local id, token = ARGV[1], tonumber(ARGV[2])
local max_stalls, ttl, dead_max = tonumber(ARGV[4]), tonumber(ARGV[6]), tonumber(ARGV[7])
if not token or not tonumber(ARGV[3]) or not max_stalls or not ttl or not dead_max then
  return redis.error_reply('JQ_BAD_ARGS expected numeric token, lease, max stalls, ttl, dead max')
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local job = redis.pcall('HMGET', KEYS[1], 'state', 'token', 'client', 'enc', 'payload',
  'lease_ms', 'attempt', 'stalls')
if job.err then
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[3], now_ms, id)
  return {'gone', 'not a hash'}
end
local state = job[1]
if (tonumber(job[2]) or 0) > token then
  return {'lost'}
end
if state == 'completed' or state == 'failed' or state == 'dead' then
  redis.call('ZREM', KEYS[2], id)
  return {'gone', state}
end
if state ~= 'queued' and state ~= 'active' then
  redis.call('ZREM', KEYS[2], id)
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return {'gone', 'missing'}
  end
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_ms', now_ms, 'error_kind', 'decode',
    'error', 'not a valid job: state ' .. (state and ('"' .. state .. '"') or 'missing'))
  redis.call('PEXPIRE', KEYS[1], ttl)
  if job[3] and job[3] ~= '' then
    redis.call(ARGV[8] == 'spublish' and 'SPUBLISH' or 'PUBLISH', string.match(KEYS[1], '^[^}]*}') .. ':reply:' .. job[3],
      cmsgpack.pack({id = id, status = 'failed'}))
  end
  return {'gone', 'failed'}
end
local stalls = tonumber(job[8]) or 0
if state == 'active' then
  stalls = stalls + 1
  if stalls > max_stalls then
    redis.call('HSET', KEYS[1], 'state', 'dead', 'stalls', stalls, 'finished_ms', now_ms,
      'error_kind', 'stalled',
      'error', 'the job stalled ' .. stalls .. ' times (limit ' .. max_stalls .. '): its worker died or hung each time')
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[3], now_ms, id)
    redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -dead_max - 1)
    redis.call('PEXPIRE', KEYS[1], ttl)
    if job[3] and job[3] ~= '' then
      redis.call(ARGV[8] == 'spublish' and 'SPUBLISH' or 'PUBLISH', string.match(KEYS[1], '^[^}]*}') .. ':reply:' .. job[3], cmsgpack.pack({id = id, status = 'dead'}))
    end
    return {'dead'}
  end
end
local lease = tonumber(job[6]) or 0
if lease < 1 then
  lease = tonumber(ARGV[3])
end
local attempt = (tonumber(job[7]) or 0) + 1
redis.call('HSET', KEYS[1], 'state', 'active', 'token', token, 'attempt', attempt,
  'stalls', stalls, 'started_ms', now_ms, 'worker', ARGV[5])
redis.call('ZADD', KEYS[2], now_ms + lease, id)
return {'run', job[4] or '', job[5] or '', tostring(attempt), tostring(stalls), tostring(lease)}
