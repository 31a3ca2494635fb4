#!lua
-- name: job_extend
-- version: 1
-- Recoverable mode: renews the leases of a worker's running jobs in one
-- call (the worker's heartbeat). A lease is renewed only while the job is
-- active under the given token and still has a lease: a job whose lease
-- already ran out and was requeued is reported lost rather than renewed.
--
-- KEYS[1]    lease set       <prefix>:{<queue>}:leases
-- KEYS[1+i]  job hash of job i
-- ARGV[1]    lease ms        the worker's default, used when a job has none
-- ARGV[2..]  two arguments per job, in KEYS order: id, token
--
-- Reply:   array of the IDs whose leases were not renewed (lost).
-- Errors:  JQ_BAD_ARGS <detail>

local n = #KEYS - 1
if n < 1 or #ARGV ~= 1 + 2 * n or not tonumber(ARGV[1]) then
  return redis.error_reply('JQ_BAD_ARGS expected a lease and an id and token per job key')
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local lost = {}
for i = 1, n do
  local id, token = ARGV[2 * i], ARGV[2 * i + 1]
  local job = redis.call('HMGET', KEYS[1 + i], 'state', 'token', 'lease_ms')
  local lease = tonumber(job[3]) or 0
  if lease < 1 then
    lease = tonumber(ARGV[1])
  end
  if job[1] == 'active' and job[2] == token and redis.call('ZSCORE', KEYS[1], id) then
    redis.call('ZADD', KEYS[1], now_ms + lease, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
