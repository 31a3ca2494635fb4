#!lua
-- name: job_finish_batch
-- version: 4
-- Recoverable and reliable modes: job_finish for several jobs of one queue
-- in one call, so that a busy worker pays the cost of a script call once
-- for all the jobs that finished meanwhile. Each job is checked and
-- finished exactly as job_finish would; one job's refusal does not affect
-- the others. The doorbells of one client's jobs go out as one message: the
-- outcome record when there is one, an array of outcome records when there
-- are several.
--
-- KEYS[1]    claim           recoverable: lease set <prefix>:{<queue>}:leases
--                            reliable: the worker's in-flight list
-- KEYS[2]    pending list    <prefix>:{<queue>}:pending
-- KEYS[3]    tickets list    <prefix>:{<queue>}:tickets  (recoverable only)
-- KEYS[3+i]  job hash of job i
-- ARGV[1]    result ttl ms
-- ARGV[2]    mode            "recoverable" | "reliable"
-- ARGV[3]    notify          "publish" or "spublish" (sharded pub/sub)
-- ARGV[4..]  six arguments per job, in KEYS order: id, token, status
--            ("completed" | "failed"), result bytes or failure kind,
--            failure message ("" when completed), retry ("1" | "0")
--
-- Reply:   array with one string per job: its new state ("completed",
--          "failed" or "queued"), or the error job_finish would have
--          returned ("JQ_NO_JOB <id>", "JQ_LEASE_LOST <token>",
--          "JQ_ALREADY_FINISHED <state>").
-- Errors:  JQ_BAD_ARGS <detail>   (nothing is written)

local ttl, mode, notify = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local n = #KEYS - 3
if not ttl or ttl < 1 or (mode ~= 'recoverable' and mode ~= 'reliable') or n < 1 or #ARGV ~= 3 + 6 * n then
  return redis.error_reply('JQ_BAD_ARGS expected ttl, mode, notify and six arguments per job key')
end
for i = 1, n do
  local status = ARGV[3 + 6 * (i - 1) + 3]
  if status ~= 'completed' and status ~= 'failed' then
    return redis.error_reply('JQ_BAD_ARGS status must be completed or failed')
  end
end
local publish = notify == 'spublish' and 'SPUBLISH' or 'PUBLISH'
local base = string.match(KEYS[4], '^[^}]*}')
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local function int(n) return string.format('%d', n) end
local ttl_ms = int(ttl)
local now = redis.call('TIME')
local now_ms = int(now[1] * 1000 + math.floor(now[2] / 1000))

-- MessagePack by hand (as in job_finish): Lua's cmsgpack has no bin type.
-- The fixed keys and statuses are written as literal fixstr bytes.
local function header(small, code, len)
  if small and len < 32 then
    return string.char(small + len)
  elseif len < 256 then
    return string.char(code, len)
  elseif len < 65536 then
    return string.char(code + 1, math.floor(len / 256), len % 256)
  end
  return string.char(code + 2, math.floor(len / 16777216) % 256, math.floor(len / 65536) % 256,
    math.floor(len / 256) % 256, len % 256)
end
local function str(s) return header(0xa0, 0xd9, #s) .. s end
local function bin(s) return header(nil, 0xc4, #s) .. s end

-- Doorbells per client, in the order of the clients' first jobs.
local bells, clients = {}, {}

local function finish(key, id, token, status, a4, a5, retry)
  local job = redis.call('HMGET', key, 'state', 'token', 'client', 'enc', 'error_kind')
  if not job[1] then
    return 'JQ_NO_JOB ' .. id
  end
  if job[2] ~= token then
    return 'JQ_LEASE_LOST ' .. tostring(job[2])
  end
  if job[1] ~= 'active' then
    return 'JQ_ALREADY_FINISHED ' .. job[1]
  end
  if mode == 'reliable' then
    redis.call('LREM', KEYS[1], -1, id)
  else
    redis.call('ZREM', KEYS[1], id)
  end
  local attempts = status == 'failed' and retry == '1' and redis.call('HMGET', key, 'attempt', 'max_attempts')
  if attempts and (tonumber(attempts[1]) or 0) < (tonumber(attempts[2]) or 1) then
    redis.call('HSET', key, 'state', 'queued', 'error_kind', a4, 'error', a5)
    redis.call('LPUSH', KEYS[2], id)
    if mode == 'recoverable' then
      redis.call('LPUSH', KEYS[3], '1')
    end
    return 'queued'
  end
  local bell
  if status == 'completed' then
    redis.call('HSET', key, 'state', 'completed', 'result', a4, 'finished_ms', now_ms, 'payload', '')
    if job[5] then
      redis.call('HDEL', key, 'error_kind', 'error')
    end
    bell = '\132\162id' .. str(id) .. '\166status\169completed\163enc' .. str(job[4] or '')
      .. '\166result' .. bin(a4)
  else
    redis.call('HSET', key, 'state', 'failed', 'error_kind', a4, 'error', a5, 'finished_ms', now_ms)
    bell = '\131\162id' .. str(id) .. '\166status\166failed\165error\130\164kind' .. str(a4)
      .. '\167message' .. str(a5)
  end
  redis.call('PEXPIRE', key, ttl_ms)
  local client = job[3]
  if client and client ~= '' then
    if not bells[client] then
      bells[client] = {}
      clients[#clients + 1] = client
    end
    local list = bells[client]
    list[#list + 1] = bell
  end
  return status
end

local out = {}
for i = 1, n do
  local a = 3 + 6 * (i - 1)
  out[i] = finish(KEYS[3 + i], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6])
end
for _, client in ipairs(clients) do
  local list = bells[client]
  local message = list[1]
  if #list > 1 then
    -- A MessagePack array of the outcome records.
    local count = #list
    if count < 16 then
      message = string.char(0x90 + count)
    elseif count < 65536 then
      message = string.char(0xdc, math.floor(count / 256), count % 256)
    else
      message = string.char(0xdd, math.floor(count / 16777216) % 256, math.floor(count / 65536) % 256,
        math.floor(count / 256) % 256, count % 256)
    end
    message = message .. table.concat(list)
  end
  redis.call(publish, base .. ':reply:' .. client, message)
end
return out
