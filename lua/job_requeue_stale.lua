#!lua
-- name: job_requeue_stale
-- version: 1
-- Recoverable mode: puts every job whose lease has run out back at the
-- front of its queue (its worker died, hung, or lost its connection). Only
-- one worker sweeps a queue per interval: the first to take the sweep
-- guard (SET NX PX); the others get -1. The job's hash is not touched here:
-- job_start counts the stall when the job is next claimed.
--
-- KEYS[1]  lease set       <prefix>:{<queue>}:leases
-- KEYS[2]  pending list    <prefix>:{<queue>}:pending
-- KEYS[3]  tickets list    <prefix>:{<queue>}:tickets
-- KEYS[4]  sweep guard     <prefix>:{<queue>}:sweep
-- ARGV[1]  guard ms        how long this sweep excludes others, >= 1
-- ARGV[2]  limit           most jobs to requeue in this call, >= 1
--
-- Reply:   number of jobs requeued, or -1 when another sweep holds the guard.
-- Errors:  JQ_BAD_ARGS <detail>

local guard, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if not guard or guard < 1 or not limit or limit < 1 then
  return redis.error_reply('JQ_BAD_ARGS expected guard ms >= 1 and limit >= 1')
end
if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', guard) then
  return -1
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, limit)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('RPUSH', KEYS[2], id)
  redis.call('LPUSH', KEYS[3], '1')
end
return #expired
