#!lua
-- name: job_release
-- version: 5
-- Recoverable and reliable modes: gives a running job back to the front of its queue at
-- once, without counting a stall or an attempt: its worker is shutting down
-- and will not finish it. Refused when the job is not active under the token.
-- The ID is pushed only when the claim still held it (a sweep or a recovery
-- may already have put it back after the lease ran out). A job started
-- under a concurrency limit gives its slot back, as in job_finish.
--
-- KEYS[1]  job hash        <prefix>:{<queue>}:job:<id>
-- KEYS[2]  claim           recoverable: lease set <prefix>:{<queue>}:leases
--                          reliable: the worker's in-flight list
-- KEYS[3]  pending list    <prefix>:{<queue>}:pending
-- KEYS[4]  tickets list    <prefix>:{<queue>}:tickets  (recoverable only)
-- KEYS[5]  running set     <prefix>:{<queue>}:running  (reliable mode)
-- KEYS[6]  gate list       <prefix>:{<queue>}:gate
-- ARGV[1]  id
-- ARGV[2]  token           the token job_start accepted (1 to 999999999999999)
-- ARGV[3]  mode            "recoverable" | "reliable"
--
-- Reply:   1
-- Errors:  JQ_NO_JOB <id>
--          JQ_LEASE_LOST <current token>   (0: the hash has no valid token)
--          JQ_ALREADY_FINISHED <state>
--          JQ_WRONGTYPE <key> <expected type> <found type>  the job key (hash),
--          the claim (zset or list), pending or tickets (list); for a job
--          with a slot, running (zset) or gate (list)
--          JQ_BAD_ARGS <detail>
-- Writes nothing when it refuses.

-- Strict decimal integer (protocol.md 10, "Numbers"): the value of s when
-- it matches ^-?[0-9]+$ with at most 15 digits and lies in [lo, hi], else
-- nil. (tonumber would also take " 1", "1e3", "0x10", "inf" and "nan".)
local function integer(s, lo, hi)
  if type(s) ~= 'string' or #s > 16 or not string.find(s, '^%-?[0-9]+$')
      or (#s == 16 and string.byte(s) ~= 45) then
    return nil
  end
  local v = tonumber(s)
  if v < lo or v > hi then
    return nil
  end
  return v
end

-- Length of the valid UTF-8 sequence (RFC 3629: no overlong forms, no
-- surrogates, nothing above U+10FFFF) that starts at byte i of s, or 0.
local function utf8_at(s, i)
  local c = string.byte(s, i)
  if c < 0x80 then
    return 1
  elseif c >= 0xC2 and c <= 0xDF then
    local c2 = string.byte(s, i + 1)
    if c2 and c2 >= 0x80 and c2 <= 0xBF then
      return 2
    end
  elseif c >= 0xE0 and c <= 0xEF then
    local c2, c3 = string.byte(s, i + 1, i + 2)
    if c3 and c2 >= (c == 0xE0 and 0xA0 or 0x80) and c2 <= (c == 0xED and 0x9F or 0xBF)
        and c3 >= 0x80 and c3 <= 0xBF then
      return 3
    end
  elseif c >= 0xF0 and c <= 0xF4 then
    local c2, c3, c4 = string.byte(s, i + 1, i + 3)
    if c4 and c2 >= (c == 0xF0 and 0x90 or 0x80) and c2 <= (c == 0xF4 and 0x8F or 0xBF)
        and c3 >= 0x80 and c3 <= 0xBF and c4 >= 0x80 and c4 <= 0xBF then
      return 4
    end
  end
  return 0
end

-- s as a part of an error message, which clients read as UTF-8 text: each
-- byte that is not part of a valid UTF-8 sequence is written \xHH.
local function text(s)
  if not string.find(s, '[\128-\255]') then
    return s
  end
  local out, i, n = {}, 1, #s
  while i <= n do
    local len = utf8_at(s, i)
    if len == 0 then
      out[#out + 1] = string.format('\\x%02x', string.byte(s, i))
      i = i + 1
    else
      out[#out + 1] = string.sub(s, i, i + len - 1)
      i = i + len
    end
  end
  return table.concat(out)
end

-- The refusal when key holds a Redis type other than want (absent is fine).
local function wrongtype(key, want)
  local found = redis.call('TYPE', key).ok
  if found ~= 'none' and found ~= want then
    return 'JQ_WRONGTYPE ' .. text(key) .. ' ' .. want .. ' ' .. found
  end
end

if #KEYS ~= 6 or #ARGV ~= 3 then
  return redis.error_reply('JQ_BAD_ARGS expected 6 keys (job, claim, pending, tickets, running, gate) and 3 arguments (id, token, mode)')
end
local id, mode = ARGV[1], ARGV[3]
local token = integer(ARGV[2], 1, 999999999999999)
if not token then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] token must be an integer from 1 to 999999999999999')
end
if mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] mode must be recoverable or reliable')
end
local job = redis.pcall('HMGET', KEYS[1], 'state', 'token', 'attempt', 'slot')
if job.err then
  return redis.error_reply(wrongtype(KEYS[1], 'hash') or job.err)
end
if not job[1] then
  return redis.error_reply('JQ_NO_JOB ' .. text(id))
end
local current = integer(job[2], 0, 999999999999999) or 0
if current ~= token then
  return redis.error_reply('JQ_LEASE_LOST ' .. string.format('%d', current))
end
if job[1] ~= 'active' then
  return redis.error_reply('JQ_ALREADY_FINISHED ' .. text(job[1]))
end
local refusal = wrongtype(KEYS[2], mode == 'reliable' and 'list' or 'zset')
  or wrongtype(KEYS[3], 'list')
  or (mode == 'recoverable' and wrongtype(KEYS[4], 'list'))
  or (job[4] == '1' and (wrongtype(KEYS[5], 'zset') or wrongtype(KEYS[6], 'list')))
if refusal then
  return redis.error_reply(refusal)
end
-- The attempt is given back (an invalid count is absent: 0).
local attempt = integer(job[3], 0, 1000000000) or 0
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempt', string.format('%d', math.max(attempt - 1, 0)))
-- Still claimed? Not when the sweep (or recovery) already put the ID back
-- on pending after the lease ran out: then it must not be queued twice.
local claimed
if mode == 'reliable' then
  claimed = redis.call('LREM', KEYS[2], '1', id)
else
  claimed = redis.call('ZREM', KEYS[2], id)
end
if job[4] == '1' then
  -- A slot of the concurrency limit is free again.
  if mode == 'reliable' then
    redis.call('ZREM', KEYS[5], id)
  end
  if redis.call('LLEN', KEYS[6]) == 0 then
    redis.call('LPUSH', KEYS[6], '1')
  end
end
if claimed > 0 then
  if mode == 'recoverable' then
    redis.call('LPUSH', KEYS[4], '1')
  end
  redis.call('RPUSH', KEYS[3], id)
end
return 1
