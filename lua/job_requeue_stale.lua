#!lua
-- name: job_requeue_stale
-- version: 3
-- Recoverable mode: puts every job whose lease has run out back at the
-- front of its queue (its worker died, hung, or lost its connection). Only
-- one worker sweeps a queue per interval: the first to take the sweep
-- guard (SET NX PX); the others get -1. The guard always expires: one
-- without a TTL (left by another program, or by a PERSIST), of any type, is
-- replaced and the sweep runs; one of another type with a TTL is waited
-- for. The job's hash is not touched here: job_start counts the stall when
-- the job is next claimed. Lease members are handled as bytes: an ID that
-- is no valid job ID goes back too, and job_start dead-letters it. Each
-- requeued job frees a slot of a concurrency limit (protocol.md 8.9): the
-- gate list is pushed (when empty), so that a worker held back wakes.
--
-- KEYS[1]  lease set       <prefix>:{<queue>}:leases
-- KEYS[2]  pending list    <prefix>:{<queue>}:pending
-- KEYS[3]  tickets list    <prefix>:{<queue>}:tickets
-- KEYS[4]  sweep guard     <prefix>:{<queue>}:sweep
-- KEYS[5]  gate list       <prefix>:{<queue>}:gate
-- ARGV[1]  guard ms        how long this sweep excludes others, 1 to 10^12
-- ARGV[2]  limit           most jobs to requeue in this call, 1 to 10^6
--
-- Reply:   number of jobs requeued, or -1 when another sweep holds the guard.
-- Errors:  JQ_WRONGTYPE <key> <expected type> <found type>  leases (zset),
--          pending, tickets or gate (list)
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

if #KEYS ~= 5 or #ARGV ~= 2 then
  return redis.error_reply('JQ_BAD_ARGS expected 5 keys (leases, pending, tickets, sweep, gate) and 2 arguments (guard ms, limit)')
end
local guard = integer(ARGV[1], 1, 1000000000000)
if not guard then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] guard ms must be an integer from 1 to 1000000000000')
end
local limit = integer(ARGV[2], 1, 1000000)
if not limit then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] limit must be an integer from 1 to 1000000')
end
local refusal = wrongtype(KEYS[1], 'zset') or wrongtype(KEYS[2], 'list') or wrongtype(KEYS[3], 'list')
  or wrongtype(KEYS[5], 'list')
if refusal then
  return redis.error_reply(refusal)
end
local guard_ms = string.format('%d', guard)
if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', guard_ms) then
  if redis.call('PTTL', KEYS[4]) ~= -1 then
    return -1
  end
  -- A guard that would never expire: replace it (SET replaces any type).
  redis.call('SET', KEYS[4], '1', 'PX', guard_ms)
end
local now = redis.call('TIME')
local now_ms = string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000))
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', '0', string.format('%d', limit))
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('RPUSH', KEYS[2], id)
  redis.call('LPUSH', KEYS[3], '1')
end
if #expired > 0 and redis.call('LLEN', KEYS[5]) == 0 then
  redis.call('LPUSH', KEYS[5], '1')
end
return #expired
