#!lua
-- name: simple_reply
-- version: 3
-- Simple mode: delivers a job's outcome (result or error) to the client that
-- submitted it, on that client's reply channel for this queue.
--
-- KEYS[1]  queue metadata hash   <prefix>:{<queue>}:meta  (routing only: it
--          gives the script the queue's hash slot; it is not read)
-- ARGV[1]  reply channel         <prefix>:{<queue>}:reply:<client id>, not empty
-- ARGV[2]  reply message         MessagePack map (see protocol.md)
-- ARGV[3]  notify                "publish" (default) or "spublish" (sharded
--                                pub/sub, used on Redis Cluster)
--
-- Reply:   number of subscribers that received the message (0 when the
--          client is gone: in simple mode the outcome is then lost).
-- Errors:  JQ_BAD_ARGS <detail>

if #KEYS ~= 1 or #ARGV < 2 or #ARGV > 3 then
  return redis.error_reply('JQ_BAD_ARGS expected 1 key (meta), a channel, a message and optionally publish or spublish')
end
if ARGV[1] == '' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] reply channel must not be empty')
end
local notify = ARGV[3] or 'publish'
if notify ~= 'publish' and notify ~= 'spublish' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] notify must be publish or spublish')
end
return redis.call(notify == 'spublish' and 'SPUBLISH' or 'PUBLISH', ARGV[1], ARGV[2])
