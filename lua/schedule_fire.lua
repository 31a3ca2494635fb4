#!lua
-- name: schedule_fire
-- version: 4
-- Recoverable and reliable modes: fires a recurring schedule once. The
-- caller read the schedule's due time DUE (its next_ms) and computed, from
-- the spec and time zone, the fire after it, NEXT, and the first fire after
-- the server's time, RESUME. The fire happens only
-- while the schedule's next_ms is still DUE, so two workers that try the
-- same fire produce one job: the first moves next_ms to NEXT, the second
-- gets "moved". The job's ID is "<name>@<DUE>", so even a fire replayed
-- after a failover finds its job already there ("duplicate"). A fire at
-- most the schedule's grace late submits its job and moves the schedule to
-- NEXT, so that fires late after an outage are caught up one by one. A
-- fire later than that is "missed": the schedule moves to RESUME, and with
-- missed = skip nothing is submitted ("skipped"), with once one job stands
-- for all the missed fires. When the queue's metadata has "events"
-- (protocol.md 8.12), the job carries it and "submitted" is appended to the
-- event stream.
--
-- KEYS[1]  queue metadata hash   <prefix>:{<queue>}:meta
-- KEYS[2]  schedules set         <prefix>:{<queue>}:schedules
-- KEYS[3]  schedule hash         <prefix>:{<queue>}:schedule:<name>
-- KEYS[4]  pending list          <prefix>:{<queue>}:pending
-- KEYS[5]  tickets list          <prefix>:{<queue>}:tickets
-- KEYS[6]  job hash              <prefix>:{<queue>}:job:<name>@<DUE>
-- KEYS[7]  event stream          <prefix>:{<queue>}:events
-- ARGV[1]  mode                  "recoverable" | "reliable"
-- ARGV[2]  protocol version      decimal integer from 1 to 1000000
-- ARGV[3]  name
-- ARGV[4]  DUE                   the schedule's next_ms as read (ms)
-- ARGV[5]  NEXT                  the fire after DUE (ms), > DUE
-- ARGV[6]  RESUME                the first fire after the server's time as
--                                the caller knew it (ms), > DUE
--
-- Reply:   {outcome, job ID}: outcome "fired" (the job was queued),
--          "skipped" (missed, skip), "duplicate" (its job exists already),
--          with the schedule moved on to NEXT (or RESUME); or, changing nothing,
--          "moved" (next_ms is not DUE: fired by another worker, or
--          changed), "early" (DUE is later than the server's time), "gone"
--          (no such schedule: its entry in the schedules set is removed).
--          The job ID is "" unless fired.
-- Errors:  JQ_QUEUE_UNKNOWN, JQ_MODE_MISMATCH, JQ_PROTOCOL_MISMATCH;
--          JQ_WRONGTYPE <key> <expected> <found> (meta, schedules, the
--          schedule hash, pending, tickets); JQ_BAD_ARGS <detail>
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

-- Appends a lifecycle event to the queue's event stream (protocol.md 8.12),
-- capped near MAXLEN entries (the job's events field, a number). Best effort: a
-- stream key of another type drops the event, never the transition.
local function event(stream, maxlen, ...)
  redis.pcall('XADD', stream, 'MAXLEN', '~', string.format('%d', maxlen), '*', ...)
end

if #KEYS ~= 7 or #ARGV ~= 6 then
  return redis.error_reply('JQ_BAD_ARGS expected 7 keys (meta, schedules, schedule, pending, tickets, job, events) and 6 arguments (mode, protocol version, name, due, next, resume)')
end
local mode, name = ARGV[1], ARGV[3]
if mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] mode must be recoverable or reliable')
end
if not integer(ARGV[2], 1, 1000000) then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] protocol version must be an integer from 1 to 1000000')
end
if name == '' or #name > 200 or not utf8(name) or string.find(name, '[%c]') then
  return redis.error_reply('JQ_BAD_ARGS ARGV[3] name must be 1 to 200 bytes of UTF-8 without control characters')
end
local due = integer(ARGV[4], 1, 999999999999999)
local next_n = integer(ARGV[5], 1, 999999999999999)
local resume = integer(ARGV[6], 1, 999999999999999)
if not due or not next_n or not resume or next_n <= due or resume <= due then
  return redis.error_reply('JQ_BAD_ARGS ARGV[4] to ARGV[6] due, next and resume must be integers from 1 to 999999999999999, next and resume after due')
end
local base = string.match(KEYS[1], '^(.*):meta$')
local id = name .. '@' .. ARGV[4]
if not base or KEYS[3] ~= base .. ':schedule:' .. name or KEYS[6] ~= base .. ':job:' .. id then
  return redis.error_reply('JQ_BAD_ARGS KEYS[3] and KEYS[6] must be the schedule key of the name and the job key of <name>@<due>')
end
local meta = redis.pcall('HMGET', KEYS[1], 'mode', 'protocol', 'events')
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
  or (mode == 'recoverable' and wrongtype(KEYS[5], 'list'))
if refusal then
  return redis.error_reply(refusal)
end

local rec = redis.call('HMGET', KEYS[3], 'next_ms', 'missed', 'grace_ms', 'enc', 'payload',
  'lease_ms', 'max_attempts', 'timeout_ms', 'backoff', 'fires', 'skipped')
if not rec[1] then
  redis.call('ZREM', KEYS[2], name)
  return {'gone', ''}
end
if rec[1] ~= ARGV[4] then
  return {'moved', ''}
end
local now = redis.call('TIME')
local now_n = now[1] * 1000 + math.floor(now[2] / 1000)
if due > now_n then
  return {'early', ''}
end
local grace = integer(rec[3], 1, 1000000000000) or 60000
local missed = now_n - due > grace
-- Stored as canonical decimals, whatever form the arguments had.
local moved_to = string.format('%d', missed and resume or next_n)
-- The counters are rewritten (not HINCRBY, which fails on a value that is
-- not an integer, after the job was written): one that is not a valid
-- count starts over.
local fires = (integer(rec[10], 0, 999999999999999) or 0) + 1
local skipped = (integer(rec[11], 0, 999999999999999) or 0) + 1
local outcome = 'fired'
if missed and rec[2] == 'skip' then
  outcome = 'skipped'
elseif redis.call('EXISTS', KEYS[6]) == 1 then
  outcome = 'duplicate'
end
local now_ms = string.format('%d', now_n)
if outcome == 'fired' then
  local fields = {'state', 'queued', 'enc', rec[4] or '', 'payload', rec[5] or '',
    'submitted_ms', now_ms, 'schedule', name}
  local optional = {{'lease_ms', rec[6], 1, 1000000000000}, {'max_attempts', rec[7], 2, 1000000},
    {'timeout_ms', rec[8], 1, 1000000000000}}
  for _, o in ipairs(optional) do
    if integer(o[2], o[3], o[4]) then
      fields[#fields + 1] = o[1]
      fields[#fields + 1] = o[2]
    end
  end
  if rec[9] and rec[9] ~= '' then
    fields[#fields + 1] = 'backoff'
    fields[#fields + 1] = rec[9]
  end
  local events = integer(meta[3], 1, 1000000000)
  if events then
    fields[#fields + 1] = 'events'
    fields[#fields + 1] = string.format('%d', events)
    fields[#fields + 1] = 'extras'
    fields[#fields + 1] = '1'
  end
  redis.call('HSET', KEYS[6], unpack(fields))
  if events then
    event(KEYS[7], events, 'event', 'submitted', 'id', id)
  end
  redis.call('LPUSH', KEYS[4], id)
  if mode == 'recoverable' then
    redis.call('LPUSH', KEYS[5], '1')
  end
  redis.call('HSET', KEYS[3], 'next_ms', moved_to, 'last_due_ms', ARGV[4], 'last_fired_ms', now_ms,
    'last_job', id, 'fires', string.format('%d', fires))
else
  redis.call('HSET', KEYS[3], 'next_ms', moved_to, 'last_due_ms', ARGV[4])
  if outcome == 'skipped' then
    redis.call('HSET', KEYS[3], 'skipped', string.format('%d', skipped))
  end
end
redis.call('ZADD', KEYS[2], moved_to, name)
return {outcome, outcome == 'fired' and id or ''}
