#!lua
-- name: job_watch
-- version: 4
-- Recoverable mode: a client's look at a job it awaits. When the job has an
-- outcome, returns it. Otherwise makes the caller the client whose reply
-- channel will announce the outcome (the latest watcher gets the doorbell;
-- every watcher also re-reads on its own schedule), and returns the state.
-- Call it after subscribing to the channel, so that no outcome can slip
-- between the read and the subscription.
--
-- KEYS[1]  job hash        <prefix>:{<queue>}:job:<id>
-- ARGV[1]  client ID       at most 64 bytes, or "" to only read
--
-- Reply:   {"missing"}                          no such job (expired or never existed)
--          {state}                              "queued" or "active", or
--                                               "invalid" for a hash with no state
--                                               (a worker will fail it)
--          {"completed", enc, result}
--          {"failed" | "dead", error kind, error message}   a kind the hash
--                                               lacks is "unknown"
--          {"failed", "decode", message}   the job key holds another Redis type
-- Errors:  JQ_BAD_ARGS <detail>
-- Writes nothing when it refuses.

if #KEYS ~= 1 or #ARGV ~= 1 then
  return redis.error_reply('JQ_BAD_ARGS expected 1 key (the job) and 1 argument (client ID)')
end
if #ARGV[1] > 64 then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] client ID longer than 64 bytes')
end
local job = redis.pcall('HMGET', KEYS[1], 'state', 'enc', 'result', 'error_kind', 'error')
if job.err then
  return {'failed', 'decode', 'the job key is not a hash: it holds a ' .. redis.call('TYPE', KEYS[1]).ok}
end
local state = job[1]
if not state and redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing'}
end
if state == 'completed' then
  return {state, job[2] or '', job[3] or ''}
end
if state == 'failed' or state == 'dead' then
  return {state, (job[4] and job[4] ~= '') and job[4] or 'unknown', job[5] or ''}
end
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'client', ARGV[1])
end
return {state or 'invalid'}
