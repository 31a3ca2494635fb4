#!lua
-- name: simple_requeue
-- version: 1
-- Simple mode: gives job envelopes that a worker popped but never started
-- back to the queue, at the end workers pop from, so they run next. A worker
-- runs it when it shuts down with popped jobs that it did not start.
--
-- KEYS[1]  pending list          <prefix>:{<queue>}:pending
-- ARGV[1..n] job envelopes       exactly as popped, oldest first
--
-- Reply:   length of the pending list after the push.
-- Errors:  JQ_BAD_ARGS <detail>

if #ARGV < 1 then
  return redis.error_reply('JQ_BAD_ARGS no job envelopes given')
end
local len = 0
-- Oldest first must be popped first: push the newest first.
for i = #ARGV, 1, -1 do
  len = redis.call('RPUSH', KEYS[1], ARGV[i])
end
return len
