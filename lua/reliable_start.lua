#!lua
-- name: reliable_start
-- version: 3
-- Reliable mode: starts a job whose ID the worker moved into its in-flight
-- list (BLMOVE or reliable_take): issues the attempt's fencing token and
-- marks the job active, or tells the worker not to run it. An attempt that
-- finds the job still "active" proves that the previous attempt's worker
-- died (its in-flight list was recovered): that counts as a redelivery
-- (stall), and a job that stalled more than MAX STALLS times goes to the
-- dead-letter set instead of running again (a poison pill), and its client
-- is told.
--
-- KEYS[1]  job hash         <prefix>:{<queue>}:job:<id>
-- KEYS[2]  in-flight list   <prefix>:{<queue>}:inflight:<worker>
-- KEYS[3]  dead-letter set  <prefix>:{<queue>}:dead_jobs
-- KEYS[4]  fencing counter  <prefix>:{<queue>}:fence
-- ARGV[1]  id
-- ARGV[2]  max stalls       >= 0
-- ARGV[3]  worker id
-- ARGV[4]  result ttl ms    how long a dead job's hash is kept
-- ARGV[5]  dead max         most entries kept in the dead-letter set
-- ARGV[6]  notify          "publish" (default) or "spublish" (sharded pub/sub,
--                          used on Redis Cluster) for the client's doorbell
--
-- Reply:   {"run", enc, payload, attempt, stalls, token}  run it
--          {"dead"}          stalled too often: now dead, client told
--          {"gone", state}   finished or missing: dropped from the in-flight list
--          {"gone", "failed"} the hash is not a valid job (no or unknown state):
--                            now failed (kind "decode"), client told
--          {"gone", "not a hash"}  the job key holds another Redis type: its ID
--                            goes to the dead-letter set
-- Errors:  JQ_BAD_ARGS <detail>

local id = ARGV[1]
local max_stalls, ttl, dead_max = tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5])
if not max_stalls or not ttl or not dead_max then
  return redis.error_reply('JQ_BAD_ARGS expected numeric max stalls, ttl, dead max')
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local job = redis.pcall('HMGET', KEYS[1], 'state', 'client', 'enc', 'payload', 'attempt', 'stalls')
if job.err then
  redis.call('LREM', KEYS[2], 1, id)
  redis.call('ZADD', KEYS[3], now_ms, id)
  return {'gone', 'not a hash'}
end
local state = job[1]
if state == 'completed' or state == 'failed' or state == 'dead' then
  redis.call('LREM', KEYS[2], 1, id)
  return {'gone', state}
end
if state ~= 'queued' and state ~= 'active' then
  redis.call('LREM', KEYS[2], 1, id)
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return {'gone', 'missing'}
  end
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_ms', now_ms, 'error_kind', 'decode',
    'error', 'not a valid job: state ' .. (state and ('"' .. state .. '"') or 'missing'))
  redis.call('PEXPIRE', KEYS[1], ttl)
  if job[2] and job[2] ~= '' then
    redis.call(ARGV[6] == 'spublish' and 'SPUBLISH' or 'PUBLISH', string.match(KEYS[1], '^[^}]*}') .. ':reply:' .. job[2],
      cmsgpack.pack({id = id, status = 'failed'}))
  end
  return {'gone', 'failed'}
end
local stalls = tonumber(job[6]) or 0
if state == 'active' then
  stalls = stalls + 1
  if stalls > max_stalls then
    redis.call('HSET', KEYS[1], 'state', 'dead', 'stalls', stalls, 'finished_ms', now_ms,
      'error_kind', 'stalled',
      'error', 'the job stalled ' .. stalls .. ' times (limit ' .. max_stalls .. '): its worker died each time')
    redis.call('LREM', KEYS[2], 1, id)
    redis.call('ZADD', KEYS[3], now_ms, id)
    redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -dead_max - 1)
    redis.call('PEXPIRE', KEYS[1], ttl)
    if job[2] and job[2] ~= '' then
      redis.call(ARGV[6] == 'spublish' and 'SPUBLISH' or 'PUBLISH', string.match(KEYS[1], '^[^}]*}') .. ':reply:' .. job[2],
        cmsgpack.pack({id = id, status = 'dead'}))
    end
    return {'dead'}
  end
end
local token = redis.call('INCR', KEYS[4])
local attempt = (tonumber(job[5]) or 0) + 1
redis.call('HSET', KEYS[1], 'state', 'active', 'token', token, 'attempt', attempt,
  'stalls', stalls, 'started_ms', now_ms, 'worker', ARGV[3])
return {'run', job[3] or '', job[4] or '', tostring(attempt), tostring(stalls), tostring(token)}
