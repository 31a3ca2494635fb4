#!lua
-- name: job_submit
-- version: 5
-- Recoverable and reliable modes: stores one or more jobs, each in its own
-- hash in state "queued", and appends their IDs to the queue's pending
-- list, all at once. In recoverable mode it also pushes one ticket per job
-- (workers block on tickets, never on the IDs themselves).
--
-- KEYS[1]    queue metadata hash   <prefix>:{<queue>}:meta
-- KEYS[2]    pending list          <prefix>:{<queue>}:pending
-- KEYS[3]    tickets list          <prefix>:{<queue>}:tickets
-- KEYS[3+i]  job hash of job i     <prefix>:{<queue>}:job:<id i>
-- ARGV[1]    mode                  "recoverable" | "reliable"
-- ARGV[2]    protocol version      decimal integer
-- ARGV[3..]  six arguments per job, in KEYS order:
--            id, enc, payload, client ID to notify ("" for none; at most
--            64 bytes: the outcome is announced on <prefix>:{<queue>}:reply:<client ID>),
--            lease ms ("0": the worker's default), max attempts (>= 1)
--
-- Reply:   length of the pending list after the push.
-- Errors:  JQ_QUEUE_UNKNOWN <meta key>
--          JQ_MODE_MISMATCH <queue mode> <requested mode>
--          JQ_PROTOCOL_MISMATCH <queue protocol> <requested protocol>
--          JQ_DUPLICATE <id>     a job with this ID exists, or the ID
--                                appears twice in this call
--          JQ_BAD_ARGS <detail>
-- Checks every job before writing anything; writes nothing when it refuses.

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
if ARGV[1] ~= 'recoverable' and ARGV[1] ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS job_submit is for recoverable and reliable modes')
end
local n = #KEYS - 3
if n < 1 or #ARGV ~= 2 + 6 * n then
  return redis.error_reply('JQ_BAD_ARGS expected six arguments per job key')
end
local base = string.sub(KEYS[1], 1, -6) -- strip ":meta"
local seen = {}
for i = 1, n do
  local a = 2 + 6 * (i - 1)
  local id = ARGV[a + 1]
  if id == '' or #id > 256 or KEYS[3 + i] ~= base .. ':job:' .. id then
    return redis.error_reply('JQ_BAD_ARGS job key ' .. KEYS[3 + i] .. ' does not match id ' .. id)
  end
  if #ARGV[a + 4] > 64 then
    return redis.error_reply('JQ_BAD_ARGS client ID longer than 64 bytes')
  end
  local lease, attempts = ARGV[a + 5], ARGV[a + 6]
  if (lease ~= '0' or attempts ~= '1') and (not tonumber(lease) or (tonumber(attempts) or 0) < 1) then
    return redis.error_reply('JQ_BAD_ARGS lease ms and max attempts must be numbers, max attempts >= 1')
  end
  if seen[id] then
    return redis.error_reply('JQ_DUPLICATE ' .. id)
  end
  seen[id] = true
end
-- Existing IDs: one EXISTS per thousand keys; find which only when one does.
for first = 4, 3 + n, 1000 do
  local last = math.min(first + 999, 3 + n)
  if redis.call('EXISTS', unpack(KEYS, first, last)) > 0 then
    for k = first, last do
      if redis.call('EXISTS', KEYS[k]) == 1 then
        return redis.error_reply('JQ_DUPLICATE ' .. ARGV[2 + 6 * (k - 4) + 1])
      end
    end
  end
end
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local function int(n) return string.format('%d', n) end
local now = redis.call('TIME')
local now_ms = int(now[1] * 1000 + math.floor(now[2] / 1000))
for i = 1, n do
  local a = 2 + 6 * (i - 1)
  local key, client, lease, attempts = KEYS[3 + i], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  -- Fields at their default value (client "", lease_ms 0, max_attempts 1,
  -- attempt, stalls and token 0) are not written: less memory and CPU.
  if lease == '0' and attempts == '1' then
    if client ~= '' then
      redis.call('HSET', key, 'state', 'queued', 'enc', ARGV[a + 2], 'payload', ARGV[a + 3],
        'submitted_ms', now_ms, 'client', client)
    else
      redis.call('HSET', key, 'state', 'queued', 'enc', ARGV[a + 2], 'payload', ARGV[a + 3],
        'submitted_ms', now_ms)
    end
  else
    local fields = {'state', 'queued', 'enc', ARGV[a + 2], 'payload', ARGV[a + 3], 'submitted_ms', now_ms}
    if client ~= '' then
      fields[#fields + 1] = 'client'
      fields[#fields + 1] = client
    end
    if tonumber(lease) ~= 0 then
      fields[#fields + 1] = 'lease_ms'
      fields[#fields + 1] = lease
    end
    if tonumber(attempts) ~= 1 then
      fields[#fields + 1] = 'max_attempts'
      fields[#fields + 1] = attempts
    end
    redis.call('HSET', key, unpack(fields))
  end
end
-- The IDs (and, in recoverable mode, one ticket per job), pushed a
-- thousand at a time: oldest first, as one LPUSH per job would.
local len = 0
for first = 1, n, 1000 do
  local ids, tickets = {}, {}
  for i = first, math.min(first + 999, n) do
    ids[#ids + 1] = ARGV[2 + 6 * (i - 1) + 1]
    tickets[#tickets + 1] = '1'
  end
  len = redis.call('LPUSH', KEYS[2], unpack(ids))
  if ARGV[1] == 'recoverable' then
    redis.call('LPUSH', KEYS[3], unpack(tickets))
  end
end
return len
