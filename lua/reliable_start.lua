#!lua
-- name: reliable_start
-- version: 8
-- Reliable mode: starts one or many jobs in one call: issues each attempt's
-- fencing token and marks the job active, or tells the worker not to run
-- it. With source "inflight" the IDs are already in the worker's in-flight
-- list (moved there by BLMOVE). With source "pending" the script first
-- moves them there itself from the tail of the pending list, where the
-- worker saw them (LRANGE <pending> -n -1, oldest first): an ID that is no
-- longer where the worker saw it (another worker took it) stops the move,
-- and it and the IDs after it are "missed", untouched. With source
-- "inflight", an ID no longer in the in-flight list is "missed" too.
-- An attempt that finds the job still "active" proves that the previous
-- attempt's worker died (its in-flight list was recovered): that counts as
-- a redelivery (stall), and a job that stalled more than MAX STALLS times
-- goes to the dead-letter set instead of running again (a poison pill), and
-- its client is told. Each job is decided on its own; an ID given twice is
-- started once.
--
-- KEYS[1]    in-flight list   <prefix>:{<queue>}:inflight:<worker>
-- KEYS[2]    dead-letter set  <prefix>:{<queue>}:dead_jobs
-- KEYS[3]    fencing counter  <prefix>:{<queue>}:fence
-- KEYS[4]    pending list     <prefix>:{<queue>}:pending
-- KEYS[4+i]  job hash of job i  <prefix>:{<queue>}:job:<id i>
-- ARGV[1]    max stalls       >= 0
-- ARGV[2]    worker id
-- ARGV[3]    result ttl ms    how long a dead job's hash is kept
-- ARGV[4]    dead max         most entries kept in the dead-letter set
-- ARGV[5]    notify           "publish" or "spublish" (sharded pub/sub, used
--                             on Redis Cluster) for the client's doorbell
-- ARGV[6]    source           "inflight" | "pending"
-- ARGV[6+i]  id of job i, in KEYS order (from "pending": oldest first)
--
-- Reply:   array with one decision per job, in KEYS order:
--          {"run", enc, payload, attempt, stalls, token}  run it
--          {"dead"}          stalled too often: now dead, client told
--          {"gone", state}   finished or missing: dropped from the in-flight list
--          {"gone", "failed"} the hash is not a valid job (no or unknown state):
--                            now failed (kind "decode"), client told
--          {"gone", "not a hash"}  the job key holds another Redis type: its ID
--                            goes to the dead-letter set
--          {"gone", "duplicate"}  the ID came earlier in this call: the
--                            extra copy left the in-flight list
--          {"missed"}        source "pending": not at the tail of the pending
--                            list any more; source "inflight": not in the
--                            in-flight list; untouched, do not run
-- Errors:  JQ_BAD_ARGS <detail>   (nothing is written)

local max_stalls, ttl, dead_max = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local n, source = #KEYS - 4, ARGV[6]
if not max_stalls or not ttl or ttl < 1 or not dead_max then
  return redis.error_reply('JQ_BAD_ARGS expected numeric max stalls, ttl, dead max')
end
if source ~= 'inflight' and source ~= 'pending' then
  return redis.error_reply('JQ_BAD_ARGS source must be inflight or pending')
end
if n < 1 or #ARGV ~= 6 + n then
  return redis.error_reply('JQ_BAD_ARGS expected one id per job key')
end
local publish = ARGV[5] == 'spublish' and 'SPUBLISH' or 'PUBLISH'
local worker = ARGV[2]
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local function int(n) return string.format('%d', n) end
local ttl_ms = int(ttl)
local now = redis.call('TIME')
local now_ms = int(now[1] * 1000 + math.floor(now[2] / 1000))
-- One token per job, issued at once; a job that does not run leaves a gap.
local token = redis.call('INCRBY', KEYS[3], n) - n

-- Rings the job's client (rare paths only: the client is read here, not in
-- the HMGET every start does).
local function tell(key, id, status)
  local client = redis.call('HGET', key, 'client')
  if client and client ~= '' then
    redis.call(publish, string.match(key, '^[^}]*}') .. ':reply:' .. client,
      cmsgpack.pack({id = id, status = status}))
  end
end

local function start(key, id)
  token = token + 1
  local job = redis.pcall('HMGET', key, 'state', 'enc', 'payload', 'attempt', 'stalls')
  if job.err then
    redis.call('LREM', KEYS[1], 1, id)
    redis.call('ZADD', KEYS[2], now_ms, id)
    return {'gone', 'not a hash'}
  end
  local state = job[1]
  if state == 'completed' or state == 'failed' or state == 'dead' then
    redis.call('LREM', KEYS[1], 1, id)
    return {'gone', state}
  end
  if state ~= 'queued' and state ~= 'active' then
    redis.call('LREM', KEYS[1], 1, id)
    if redis.call('EXISTS', key) == 0 then
      return {'gone', 'missing'}
    end
    redis.call('HSET', key, 'state', 'failed', 'finished_ms', now_ms, 'error_kind', 'decode',
      'error', 'not a valid job: state ' .. (state and ('"' .. state .. '"') or 'missing'))
    redis.call('PEXPIRE', key, ttl_ms)
    tell(key, id, 'failed')
    return {'gone', 'failed'}
  end
  local stalls = tonumber(job[5]) or 0
  if state == 'active' then
    stalls = stalls + 1
    if stalls > max_stalls then
      redis.call('HSET', key, 'state', 'dead', 'stalls', int(stalls), 'finished_ms', now_ms,
        'error_kind', 'stalled',
        'error', 'the job stalled ' .. stalls .. ' times (limit ' .. max_stalls .. '): its worker died each time')
      redis.call('LREM', KEYS[1], 1, id)
      redis.call('ZADD', KEYS[2], now_ms, id)
      redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -dead_max - 1)
      redis.call('PEXPIRE', key, ttl_ms)
      tell(key, id, 'dead')
      return {'dead'}
    end
  end
  local attempt, stalled, fence = int((tonumber(job[4]) or 0) + 1), int(stalls), int(token)
  if job[5] == stalled or (not job[5] and stalls == 0) then
    -- Stalls unchanged (0 is the default when the field is missing).
    redis.call('HSET', key, 'state', 'active', 'token', fence, 'attempt', attempt,
      'started_ms', now_ms, 'worker', worker)
  else
    redis.call('HSET', key, 'state', 'active', 'token', fence, 'attempt', attempt,
      'stalls', stalled, 'started_ms', now_ms, 'worker', worker)
  end
  return {'run', job[2] or '', job[3] or '', attempt, stalled, fence}
end

-- From pending: the longest run of the expected IDs (oldest first) still at
-- the tail moves to the in-flight list, in the order one LMOVE RIGHT LEFT
-- per ID would give; the rest is missed.
local taken = n
if source == 'pending' then
  local tail = redis.call('LRANGE', KEYS[4], -n, -1)
  taken = 0
  while taken < n and tail[#tail - taken] == ARGV[7 + taken] do
    taken = taken + 1
  end
  if taken > 0 then
    redis.call('LTRIM', KEYS[4], 0, -taken - 1)
    for first = 1, taken, 1000 do
      local ids = {}
      for i = first, math.min(first + 999, taken) do
        ids[#ids + 1] = ARGV[6 + i]
      end
      redis.call('LPUSH', KEYS[1], unpack(ids))
    end
  end
end

local out, seen = {}, {}
for i = 1, n do
  local id = ARGV[6 + i]
  if i > taken then
    out[i] = {'missed'}
  elseif seen[id] then
    -- The same ID twice in one call (it was in the list twice): one start
    -- only; the extra copy leaves the in-flight list.
    redis.call('LREM', KEYS[1], -1, id)
    out[i] = {'gone', 'duplicate'}
  elseif source == 'inflight' and not redis.call('LPOS', KEYS[1], id) then
    -- Not in the worker's in-flight list (any more): not the worker's.
    out[i] = {'missed'}
  else
    seen[id] = true
    out[i] = start(KEYS[4 + i], id)
  end
end
return out
