#!lua
-- name: job_release
-- version: 2
-- Recoverable and reliable modes: gives a running job back to the front of its queue at
-- once, without counting a stall or an attempt: its worker is shutting down
-- and will not finish it. Refused when the job is not active under the token.
--
-- KEYS[1]  job hash        <prefix>:{<queue>}:job:<id>
-- KEYS[2]  claim           recoverable: lease set <prefix>:{<queue>}:leases
--                          reliable: the worker's in-flight list
-- KEYS[3]  pending list    <prefix>:{<queue>}:pending
-- KEYS[4]  tickets list    <prefix>:{<queue>}:tickets  (recoverable only)
-- ARGV[1]  id
-- ARGV[2]  token           the token job_start accepted
-- ARGV[3]  mode            "recoverable" | "reliable"
--
-- Reply:   1
-- Errors:  JQ_NO_JOB <id>
--          JQ_LEASE_LOST <current token>
--          JQ_ALREADY_FINISHED <state>
--          JQ_BAD_ARGS <detail>

local id, token, mode = ARGV[1], ARGV[2], ARGV[3]
if mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS expected a mode')
end
local job = redis.call('HMGET', KEYS[1], 'state', 'token', 'attempt')
if not job[1] then
  return redis.error_reply('JQ_NO_JOB ' .. id)
end
if job[2] ~= token then
  return redis.error_reply('JQ_LEASE_LOST ' .. tostring(job[2]))
end
if job[1] ~= 'active' then
  return redis.error_reply('JQ_ALREADY_FINISHED ' .. job[1])
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempt', math.max((tonumber(job[3]) or 1) - 1, 0))
if mode == 'reliable' then
  redis.call('LREM', KEYS[2], 1, id)
else
  redis.call('ZREM', KEYS[2], id)
  redis.call('LPUSH', KEYS[4], '1')
end
redis.call('RPUSH', KEYS[3], id)
return 1
