#!lua
-- name: simple_dead
-- version: 1
-- Simple mode: keeps a list entry that no worker can run (it is not a valid
-- job envelope, so nobody can be told) in the queue's dead-letter list, with
-- the reason, newest first, trimmed to a maximum length.
--
-- KEYS[1]  dead-letter list      <prefix>:{<queue>}:dead
-- ARGV[1]  dead-letter record    MessagePack map (see protocol.md)
-- ARGV[2]  maximum list length   decimal integer >= 1
--
-- Reply:   length of the dead-letter list after the push and trim.
-- Errors:  JQ_BAD_ARGS <detail>

local max = tonumber(ARGV[2])
if #ARGV ~= 2 or not max or max < 1 then
  return redis.error_reply('JQ_BAD_ARGS expected a record and a maximum length >= 1')
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, max - 1)
return redis.call('LLEN', KEYS[1])
