#!lua
-- name: simple_submit
-- version: 1
-- Simple mode: appends one or more job envelopes to a queue's pending list,
-- after checking that the queue is registered in simple mode with the same
-- protocol version. Workers pop from the other end (RPOP side), so the list
-- is first in, first out.
--
-- KEYS[1]  queue metadata hash   <prefix>:{<queue>}:meta
-- KEYS[2]  pending list          <prefix>:{<queue>}:pending
-- ARGV[1]  mode                  must be "simple"
-- ARGV[2]  protocol version      decimal integer
-- ARGV[3..n] job envelopes       MessagePack maps (see protocol.md)
--
-- Reply:   length of the pending list after the push.
-- Errors:  JQ_QUEUE_UNKNOWN <meta key>    the queue has no metadata yet
--          JQ_MODE_MISMATCH <queue mode> <requested mode>
--          JQ_PROTOCOL_MISMATCH <queue protocol> <requested protocol>
--          JQ_BAD_ARGS <detail>
-- Writes nothing when it refuses.

local meta = redis.call('HMGET', KEYS[1], 'mode', 'protocol')
if not meta[1] then
  return redis.error_reply('JQ_QUEUE_UNKNOWN ' .. KEYS[1])
end
if meta[1] ~= ARGV[1] then
  return redis.error_reply('JQ_MODE_MISMATCH ' .. meta[1] .. ' ' .. ARGV[1])
end
if meta[2] ~= ARGV[2] then
  return redis.error_reply('JQ_PROTOCOL_MISMATCH ' .. tostring(meta[2]) .. ' ' .. ARGV[2])
end
if ARGV[1] ~= 'simple' then
  return redis.error_reply('JQ_BAD_ARGS simple_submit is for simple mode; use job_submit')
end
if #ARGV < 3 then
  return redis.error_reply('JQ_BAD_ARGS no job envelopes given')
end
local len = 0
-- Push in slices so that a large batch stays under Lua's unpack limit.
local first = 3
while first <= #ARGV do
  local last = math.min(first + 499, #ARGV)
  len = redis.call('LPUSH', KEYS[2], unpack(ARGV, first, last))
  first = last + 1
end
return len
