#!lua
-- name: reliable_take
-- version: 1
-- Reliable mode: moves up to COUNT job IDs from the queue's pending list
-- into the worker's in-flight list, at once, without blocking. A worker
-- uses it to fill its free slots after a BLMOVE (which moves one ID) has
-- returned. Every ID is in exactly one of the two lists at every moment.
--
-- KEYS[1]  pending list     <prefix>:{<queue>}:pending
-- KEYS[2]  in-flight list   <prefix>:{<queue>}:inflight:<worker>
-- ARGV[1]  count            most IDs to move, >= 1
--
-- Reply:   array of the IDs moved, oldest first (empty: nothing waiting).
-- Errors:  JQ_BAD_ARGS <detail>

local count = tonumber(ARGV[1])
if not count or count < 1 then
  return redis.error_reply('JQ_BAD_ARGS expected count >= 1')
end
local out = {}
for _ = 1, count do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not id then
    break
  end
  out[#out + 1] = id
end
return out
