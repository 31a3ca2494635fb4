#!lua
-- name: schedule_set
-- version: 2
-- Recoverable and reliable modes: creates or changes a recurring schedule
-- of a queue: a record (hash) with the job each fire submits and when the
-- next fire is due, and its entry in the queue's schedules set, scored by
-- that time. The schedule's history (last fire, last job, fire count) is
-- kept when it is changed; so is its next fire when its spec and time zone
-- are unchanged (setting the same schedule again, as a fleet that upserts
-- its schedules at every start does, neither delays nor drops a fire). The clock list is pushed (when empty), so that
-- the queue's timekeeper learns the new due time. Workers fire schedules
-- with schedule_fire; this script only records them.
--
-- KEYS[1]  queue metadata hash   <prefix>:{<queue>}:meta
-- KEYS[2]  schedules set         <prefix>:{<queue>}:schedules
-- KEYS[3]  schedule hash         <prefix>:{<queue>}:schedule:<name>
-- KEYS[4]  clock list            <prefix>:{<queue>}:clock
-- ARGV[1]  mode                  "recoverable" | "reliable"
-- ARGV[2]  protocol version      decimal integer from 1 to 1000000
-- ARGV[3]  name                  1 to 200 bytes of valid UTF-8, no control
--                                characters
-- ARGV[4]  spec                  "every:<ms>" (1 to 10^12) or "cron:<pattern>"
--                                (1 to 200 bytes; workers parse it)
-- ARGV[5]  time zone             IANA name for cron patterns ("UTC", ...),
--                                1 to 64 bytes; "UTC" for every:<ms>
-- ARGV[6]  missed                "skip" | "once": what a fire later than
--                                GRACE does (protocol.md 8.8)
-- ARGV[7]  grace ms              1 to 10^12
-- ARGV[8]  next ms               the first fire, server time in ms (1 to
--                                999999999999999)
-- ARGV[9..14] the job of each fire: enc, payload, lease ms (0 or 1 to 10^12),
--                                max attempts (1 to 10^6), timeout ms (0 or 1
--                                to 10^12), backoff ("" or a policy, as in
--                                job_submit)
--
-- Reply:   "created" or "updated".
-- Errors:  JQ_QUEUE_UNKNOWN, JQ_MODE_MISMATCH, JQ_PROTOCOL_MISMATCH (as
--          job_submit); JQ_WRONGTYPE <key> <expected> <found> (meta, the
--          schedules set, the schedule hash, clock); JQ_BAD_ARGS <detail>
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

-- True when s is valid UTF-8. ASCII, the common case, is one string.find.
local function utf8(s)
  if not string.find(s, '[\128-\255]') then
    return true
  end
  local i, n = 1, #s
  while i <= n do
    local len = utf8_at(s, i)
    if len == 0 then
      return false
    end
    i = i + len
  end
  return true
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

if #KEYS ~= 4 or #ARGV ~= 14 then
  return redis.error_reply('JQ_BAD_ARGS expected 4 keys (meta, schedules, schedule, clock) and 14 arguments')
end
local mode, name, spec, tz, missed = ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] mode must be recoverable or reliable (simple mode has no schedules)')
end
if not integer(ARGV[2], 1, 1000000) then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] protocol version must be an integer from 1 to 1000000')
end
if name == '' or #name > 200 or not utf8(name) or string.find(name, '[%c]') then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] name must be 1 to 200 bytes of UTF-8 without control characters')
end
local base = string.match(KEYS[1], '^(.*):meta$')
if not base or KEYS[3] ~= base .. ':schedule:' .. name then
  return redis.error_reply('JQ_BAD_ARGS KEYS[3] must be the schedule key of the name')
end
local every = string.match(spec, '^every:([0-9]+)$')
if every then
  if not integer(every, 1, 1000000000000) then
    return redis.error_reply('JQ_BAD_ARGS ARGV[4] every:<ms> must be 1 to 1000000000000 ms')
  end
elseif string.sub(spec, 1, 5) ~= 'cron:' or #spec < 6 or #spec > 205 or not utf8(spec) then
  return redis.error_reply('JQ_BAD_ARGS ARGV[4] spec must be every:<ms> or cron:<pattern>')
end
if tz == '' or #tz > 64 or not string.find(tz, '^[%w/_+%-]+$') then
  return redis.error_reply('JQ_BAD_ARGS ARGV[5] time zone must be an IANA name')
end
if missed ~= 'skip' and missed ~= 'once' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[6] missed must be skip or once')
end
if not integer(ARGV[7], 1, 1000000000000) then
  return redis.error_reply('JQ_BAD_ARGS ARGV[7] grace ms must be an integer from 1 to 1000000000000')
end
local next_n = integer(ARGV[8], 1, 999999999999999)
if not next_n then
  return redis.error_reply('JQ_BAD_ARGS ARGV[8] next ms must be an integer from 1 to 999999999999999')
end
if not integer(ARGV[11], 0, 1000000000000) then
  return redis.error_reply('JQ_BAD_ARGS ARGV[11] lease ms must be an integer from 0 to 1000000000000')
end
if not integer(ARGV[12], 1, 1000000) then
  return redis.error_reply('JQ_BAD_ARGS ARGV[12] max attempts must be an integer from 1 to 1000000')
end
if not integer(ARGV[13], 0, 1000000000000) then
  return redis.error_reply('JQ_BAD_ARGS ARGV[13] timeout ms must be an integer from 0 to 1000000000000')
end
local policy = ARGV[14]
if policy ~= '' then
  local kind, b, m, j = string.match(policy, '^(%l+):([0-9]+):([0-9]+):([0-9]+)$')
  local base_n, max_n, jitter_n = integer(b, 1, 1000000000000), integer(m, 1, 1000000000000), integer(j, 0, 1000)
  if (kind ~= 'fixed' and kind ~= 'exponential') or not base_n or not max_n or not jitter_n
      or base_n > max_n then
    return redis.error_reply('JQ_BAD_ARGS ARGV[14] backoff must be "" or <fixed|exponential>:<base ms>:<max ms>:<jitter>')
  end
end
local meta = redis.pcall('HMGET', KEYS[1], 'mode', 'protocol')
if meta.err then
  return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[1]) .. ' hash ' .. redis.call('TYPE', KEYS[1]).ok)
end
if not meta[1] and not meta[2] and redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('JQ_QUEUE_UNKNOWN ' .. text(KEYS[1]))
end
if meta[1] ~= mode then
  return redis.error_reply('JQ_MODE_MISMATCH ' .. (meta[1] and text(meta[1]) or '(missing)') .. ' ' .. mode)
end
if meta[2] ~= ARGV[2] then
  return redis.error_reply('JQ_PROTOCOL_MISMATCH ' .. (meta[2] and text(meta[2]) or '(missing)') .. ' ' .. ARGV[2])
end
local refusal = wrongtype(KEYS[2], 'zset') or wrongtype(KEYS[3], 'hash') or wrongtype(KEYS[4], 'list')
if refusal then
  return redis.error_reply(refusal)
end

local old = redis.call('HMGET', KEYS[3], 'spec', 'tz', 'next_ms')
local existed = redis.call('EXISTS', KEYS[3]) == 1
local kept = old[1] == spec and old[2] == tz and integer(old[3], 1, 999999999999999)
if kept then
  next_n = kept
end
local now = redis.call('TIME')
local now_ms = string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000))
-- The definition is replaced as a whole; the history fields stay.
redis.call('HDEL', KEYS[3], 'lease_ms', 'max_attempts', 'timeout_ms', 'backoff')
local fields = {'name', name, 'spec', spec, 'tz', tz, 'missed', missed, 'grace_ms', ARGV[7],
  'next_ms', string.format('%d', next_n), 'enc', ARGV[9], 'payload', ARGV[10], 'updated_ms', now_ms}
if ARGV[11] ~= '0' then
  fields[#fields + 1] = 'lease_ms'
  fields[#fields + 1] = ARGV[11]
end
if ARGV[12] ~= '1' then
  fields[#fields + 1] = 'max_attempts'
  fields[#fields + 1] = ARGV[12]
end
if ARGV[13] ~= '0' then
  fields[#fields + 1] = 'timeout_ms'
  fields[#fields + 1] = ARGV[13]
end
if policy ~= '' then
  fields[#fields + 1] = 'backoff'
  fields[#fields + 1] = policy
end
redis.call('HSET', KEYS[3], unpack(fields))
redis.call('ZADD', KEYS[2], string.format('%d', next_n), name)
if redis.call('LLEN', KEYS[4]) == 0 then
  redis.call('LPUSH', KEYS[4], '1')
end
return existed and 'updated' or 'created'
