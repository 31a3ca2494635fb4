#!lua
-- name: queue_register
-- version: 1
-- Records a queue's mode and protocol version the first time the queue is
-- used, and checks them on every later use. Clients and workers run it when
-- they open a queue.
--
-- KEYS[1]  queue metadata hash   <prefix>:{<queue>}:meta
-- ARGV[1]  mode                  "simple" | "recoverable" | "reliable"
-- ARGV[2]  protocol version      decimal integer, e.g. "1"
--
-- Reply:   1 when this call created the metadata, 0 when it already matched.
-- Errors:  JQ_MODE_MISMATCH <queue mode> <requested mode>
--          JQ_PROTOCOL_MISMATCH <queue protocol> <requested protocol>
-- Writes nothing when it refuses.

local meta = redis.call('HMGET', KEYS[1], 'mode', 'protocol')
if not meta[1] then
  local now = redis.call('TIME')
  local created_ms = now[1] * 1000 + math.floor(now[2] / 1000)
  redis.call('HSET', KEYS[1], 'mode', ARGV[1], 'protocol', ARGV[2], 'created_ms', created_ms)
  return 1
end
if meta[1] ~= ARGV[1] then
  return redis.error_reply('JQ_MODE_MISMATCH ' .. meta[1] .. ' ' .. ARGV[1])
end
if meta[2] ~= ARGV[2] then
  return redis.error_reply('JQ_PROTOCOL_MISMATCH ' .. tostring(meta[2]) .. ' ' .. ARGV[2])
end
return 0
