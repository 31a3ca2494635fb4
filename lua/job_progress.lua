#!lua
-- name: job_progress
-- version: 1
-- Recoverable and reliable modes: records a running job's progress
-- (protocol.md 8.13), under the attempt's fencing token: the value (any
-- bytes, in the job's encoding) goes to the job hash's progress field, with
-- progress_ms and progress_seq (1, 2, ...: its number among the job's
-- progress values), and is published, with its number, on
-- <prefix>:{<queue>}:progress:<id> for the clients that follow it (a
-- follower that read the hash skips the messages numbered up to what it
-- read). Refused once the job has finished or another
-- attempt took it over. A job that records events appends "progress".
--
-- KEYS[1]  job hash        <prefix>:{<queue>}:job:<id>
-- KEYS[2]  event stream    <prefix>:{<queue>}:events
-- ARGV[1]  id
-- ARGV[2]  token           the token of the running attempt (1 to 999999999999999)
-- ARGV[3]  progress        bytes, in the job's enc
-- ARGV[4]  notify          "publish" or "spublish" (sharded pub/sub, used
--                          on Redis Cluster)
--
-- Reply:   1
-- Errors:  JQ_NO_JOB <id>              no such job (expired or never existed)
--          JQ_LEASE_LOST <current token>  a newer attempt owns the job (0: the
--                                         hash has no valid token)
--          JQ_ALREADY_FINISHED <state>    the job is not running
--          JQ_WRONGTYPE <job key> hash <found type>
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

-- Appends a lifecycle event to the queue's event stream (protocol.md 8.12),
-- capped near MAXLEN entries (the job's events field, a number). Best effort: a
-- stream key of another type drops the event, never the transition.
local function event(stream, maxlen, ...)
  redis.pcall('XADD', stream, 'MAXLEN', '~', string.format('%d', maxlen), '*', ...)
end


-- MessagePack by hand (as in job_finish): Lua's cmsgpack has no bin type.
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

if #KEYS ~= 2 or #ARGV ~= 4 then
  return redis.error_reply('JQ_BAD_ARGS expected 2 keys (job, events) and 4 arguments (id, token, progress, notify)')
end
local id = ARGV[1]
local token = integer(ARGV[2], 1, 999999999999999)
if not token then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] token must be an integer from 1 to 999999999999999')
end
if ARGV[4] ~= 'publish' and ARGV[4] ~= 'spublish' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[4] notify must be publish or spublish')
end
local base = string.match(KEYS[1], '^[^{]*{[^}]+}')
if not base or KEYS[1] ~= base .. ':job:' .. id then
  return redis.error_reply('JQ_BAD_ARGS KEYS[1] must be the job key of ARGV[1]')
end
local job = redis.pcall('HMGET', KEYS[1], 'state', 'token', 'enc', 'events', 'attempt', 'worker',
  'progress_seq')
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
local now = redis.call('TIME')
local now_ms = string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000))
local seq = string.format('%d', (integer(job[7], 0, 999999999999999) or 0) + 1)
redis.call('HSET', KEYS[1], 'progress', ARGV[3], 'progress_ms', now_ms, 'progress_seq', seq)
redis.call(ARGV[4] == 'spublish' and 'SPUBLISH' or 'PUBLISH', base .. ':progress:' .. id,
  '\132\162id' .. str(id) .. '\163enc' .. str(job[3] or '') .. '\168progress' .. bin(ARGV[3])
  .. '\163seq' .. str(seq))
local events = integer(job[4], 1, 1000000000)
if events then
  event(KEYS[2], events, 'event', 'progress', 'id', id, 'attempt', job[5] or '0',
    'worker', job[6] or '')
end
return 1
