#!lua
-- name: job_extend
-- version: 2
-- Recoverable mode: renews the leases of a worker's running jobs in one
-- call (the worker's heartbeat). A lease is renewed only while the job is
-- active under the given token and still has a lease: a job whose lease
-- already ran out and was requeued is reported lost rather than renewed, and
-- so is a job whose key holds another Redis type.
--
-- KEYS[1]    lease set       <prefix>:{<queue>}:leases
-- KEYS[1+i]  job hash of job i
-- ARGV[1]    lease ms        the worker's default, used when a job has none;
--                            1 to 10^12
-- ARGV[2..]  two arguments per job, in KEYS order: id, token (1 to
--            999999999999999)
--
-- Reply:   array of the IDs whose leases were not renewed (lost).
-- Errors:  JQ_WRONGTYPE <leases key> zset <found type>
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

local n = #KEYS - 1
if n < 1 or #ARGV ~= 1 + 2 * n then
  return redis.error_reply('JQ_BAD_ARGS expected 1 key (leases) and a job key per job; a lease and an id and a token per job key')
end
local default_lease = integer(ARGV[1], 1, 1000000000000)
if not default_lease then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] lease ms must be an integer from 1 to 1000000000000')
end
local tokens = {}
for i = 1, n do
  tokens[i] = integer(ARGV[2 * i + 1], 1, 999999999999999)
  if not tokens[i] then
    return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (2 * i + 1) .. '] token must be an integer from 1 to 999999999999999')
  end
end
local found = redis.call('TYPE', KEYS[1]).ok
if found ~= 'none' and found ~= 'zset' then
  return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[1]) .. ' zset ' .. found)
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local lost = {}
for i = 1, n do
  local id = ARGV[2 * i]
  local job = redis.pcall('HMGET', KEYS[1 + i], 'state', 'token', 'lease_ms')
  if not job.err and job[1] == 'active' and integer(job[2], 0, 999999999999999) == tokens[i]
      and redis.call('ZSCORE', KEYS[1], id) then
    local lease = integer(job[3], 1, 1000000000000) or default_lease
    redis.call('ZADD', KEYS[1], string.format('%d', now_ms + lease), id)
  else
    lost[#lost + 1] = id
  end
end
return lost
