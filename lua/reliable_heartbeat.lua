#!lua
-- name: reliable_heartbeat
-- version: 1
-- Reliable mode: records that a worker is alive until now + TTL. The
-- worker's heartbeat is the lease of every job in its in-flight list, so
-- one call keeps all of them.
--
-- KEYS[1]  worker set       <prefix>:{<queue>}:workers  (sorted set: worker -> deadline ms)
-- ARGV[1]  worker id
-- ARGV[2]  ttl ms           >= 1
--
-- Reply:   1 when the worker was registered and alive, 0 when it was not
--          (a new worker, or one whose jobs recovery already took back).
-- Errors:  JQ_BAD_ARGS <detail>

local ttl = tonumber(ARGV[2])
if not ttl or ttl < 1 or ARGV[1] == '' then
  return redis.error_reply('JQ_BAD_ARGS expected a worker id and ttl ms >= 1')
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now_ms + ttl, ARGV[1])
if known and tonumber(known) >= now_ms then
  return 1
end
return 0
