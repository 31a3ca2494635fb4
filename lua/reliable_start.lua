#!lua
-- name: reliable_start
-- version: 1
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
--
-- Reply:   {"run", enc, payload, attempt, stalls, token}  run it
--          {"dead"}          stalled too often: now dead, client told
--          {"gone", state}   finished or missing: dropped from the in-flight list
-- Errors:  JQ_BAD_ARGS <detail>

local id = ARGV[1]
local max_stalls, ttl, dead_max = tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5])
if not max_stalls or not ttl or not dead_max then
  return redis.error_reply('JQ_BAD_ARGS expected numeric max stalls, ttl, dead max')
end
local job = redis.call('HMGET', KEYS[1], 'state', 'client', 'enc', 'payload', 'attempt', 'stalls')
local state = job[1]
if not state then
  redis.call('LREM', KEYS[2], 1, id)
  return {'gone', 'missing'}
end
if state ~= 'queued' and state ~= 'active' then
  redis.call('LREM', KEYS[2], 1, id)
  return {'gone', state}
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
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
      redis.call('PUBLISH', string.match(KEYS[1], '^[^}]*}') .. ':reply:' .. job[2],
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
