#!lua
-- name: job_claim
-- version: 2
-- Recoverable mode, first half of a claim: takes up to COUNT job IDs from
-- the pending list and gives each a fencing token and a lease, at once.
-- The job's hash is updated by job_start, which the worker calls next with
-- the job's key in KEYS. A worker that dies between the two leaves the ID
-- in the lease set, and job_requeue_stale puts it back when the lease ends:
-- no job is ever stranded.
--
-- KEYS[1]  pending list    <prefix>:{<queue>}:pending
-- KEYS[2]  tickets list    <prefix>:{<queue>}:tickets
-- KEYS[3]  lease set       <prefix>:{<queue>}:leases   (sorted set: id -> deadline ms)
-- KEYS[4]  fencing counter <prefix>:{<queue>}:fence
-- ARGV[1]  count           most IDs to take, >= 1
-- ARGV[2]  lease ms        provisional lease, until job_start sets the job's own
-- ARGV[3]  tickets taken   how many tickets the worker already popped (0 or 1)
--
-- Reply:   flat array: id 1, token 1, id 2, token 2, ... (empty when the
--          queue is empty). Tokens are decimal integers, increasing per queue.
-- Errors:  JQ_BAD_ARGS <detail>

local count = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local taken = tonumber(ARGV[3])
if not count or count < 1 or not lease or lease < 1 or not taken then
  return redis.error_reply('JQ_BAD_ARGS expected count >= 1, lease ms >= 1, tickets taken')
end
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local function int(n) return string.format('%d', n) end
local now = redis.call('TIME')
local deadline = int(now[1] * 1000 + math.floor(now[2] / 1000) + lease)
local out = {}
for _ = 1, count do
  local id = redis.call('RPOP', KEYS[1])
  if not id then
    break
  end
  local token = redis.call('INCR', KEYS[4])
  redis.call('ZADD', KEYS[3], deadline, id)
  out[#out + 1] = id
  out[#out + 1] = int(token)
end
local claimed = #out / 2
if redis.call('LLEN', KEYS[1]) == 0 then
  -- Resynchronise: no job waits, so no ticket should either.
  redis.call('DEL', KEYS[2])
elseif claimed > taken then
  redis.call('LPOP', KEYS[2], claimed - taken)
end
return out
