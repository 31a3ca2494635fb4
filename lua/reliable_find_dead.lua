#!lua
-- name: reliable_find_dead
-- version: 1
-- Reliable mode: lists the workers whose heartbeat has expired, for
-- recovery. Only one worker per interval gets the list: the first to take
-- the recovery guard (SET NX PX); the others get -1.
--
-- KEYS[1]  worker set       <prefix>:{<queue>}:workers
-- KEYS[2]  recovery guard   <prefix>:{<queue>}:sweep
-- ARGV[1]  guard ms         >= 1
-- ARGV[2]  limit            most workers to list, >= 1
--
-- Reply:   array of dead worker IDs, or -1 when another worker holds the guard.
-- Errors:  JQ_BAD_ARGS <detail>

local guard, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if not guard or guard < 1 or not limit or limit < 1 then
  return redis.error_reply('JQ_BAD_ARGS expected guard ms >= 1 and limit >= 1')
end
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', guard) then
  return -1
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now_ms, 'LIMIT', 0, limit)
