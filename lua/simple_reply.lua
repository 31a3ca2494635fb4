#!lua
-- name: simple_reply
-- version: 2
-- Simple mode: delivers a job's outcome (result or error) to the client that
-- submitted it, on that client's reply channel for this queue.
--
-- KEYS[1]  queue metadata hash   <prefix>:{<queue>}:meta  (routing only: it
--          gives the script the queue's hash slot; it is not read)
-- ARGV[1]  reply channel         <prefix>:{<queue>}:reply:<client id>
-- ARGV[2]  reply message         MessagePack map (see protocol.md)
-- ARGV[3]  notify                "publish" (default) or "spublish" (sharded
--                                pub/sub, used on Redis Cluster)
--
-- Reply:   number of subscribers that received the message (0 when the
--          client is gone: in simple mode the outcome is then lost).
-- Errors:  JQ_BAD_ARGS <detail>

if #ARGV < 2 or #ARGV > 3 then
  return redis.error_reply('JQ_BAD_ARGS expected a channel, a message and optionally publish or spublish')
end
return redis.call(ARGV[3] == 'spublish' and 'SPUBLISH' or 'PUBLISH', ARGV[1], ARGV[2])
