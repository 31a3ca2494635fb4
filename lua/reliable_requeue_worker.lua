#!lua
-- name: reliable_requeue_worker
-- version: 1
-- Reliable mode: moves every job ID in a worker's in-flight list back to
-- the front of the queue, oldest first. Recovery runs it for a worker whose
-- heartbeat expired (ONLY IF DEAD = 1: refused, doing nothing, when the
-- heartbeat came back meanwhile); the dead worker stays in the worker set,
-- so that IDs a paused "dead" worker moves later are found by later sweeps,
-- until it has been dead for RETENTION ms. A worker runs it for itself when
-- it shuts down (ONLY IF DEAD = 0), which also forgets it. IDs that were
-- moved but never started are requeued too. The job hashes are not touched:
-- the next reliable_start counts a stall for jobs that were active.
--
-- KEYS[1]  worker set       <prefix>:{<queue>}:workers
-- KEYS[2]  in-flight list   <prefix>:{<queue>}:inflight:<worker>
-- KEYS[3]  pending list     <prefix>:{<queue>}:pending
-- ARGV[1]  worker id
-- ARGV[2]  only if dead     "1" | "0"
-- ARGV[3]  retention ms     with ONLY IF DEAD = 1: forget a worker dead this long
--
-- Reply:   number of IDs requeued, or -1 when the worker is alive (ONLY IF DEAD = 1).
-- Errors:  JQ_BAD_ARGS <detail>

local retention = tonumber(ARGV[3])
if ARGV[1] == '' or (ARGV[2] ~= '1' and ARGV[2] ~= '0') or not retention then
  return redis.error_reply('JQ_BAD_ARGS expected a worker id, 1 or 0, and retention ms')
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local deadline = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if ARGV[2] == '1' and deadline and deadline >= now_ms then
  return -1
end
local moved = 0
-- The newest ID is on the left: move it first, so the oldest ends up
-- nearest the right end, where workers take from.
while redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT') do
  moved = moved + 1
end
if ARGV[2] == '0' or not deadline or deadline < now_ms - retention then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return moved
