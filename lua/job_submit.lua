#!lua
-- name: job_submit
-- version: 13
-- Recoverable and reliable modes: stores one or more jobs, each in its own
-- hash in state "queued", and appends their IDs to the queue's pending
-- list, all at once. In recoverable mode it also pushes one ticket per job
-- (workers block on tickets, never on the IDs themselves). A job with a
-- due time in the future goes to the delayed set instead, scored by its due
-- time (its hash is "queued" with a due_ms field); job_promote moves it to
-- pending when it is due. When such a job is due before every job already
-- delayed, the clock list is pushed (unless it holds an entry already), so
-- that a worker blocked on it learns the new earliest due time.
-- A job with a unique key (protocol.md 8.10) is enqueued only when no job
-- holds the key: the lock <prefix>:{<queue>}:unique:<key> names its holder.
-- Mode "active" holds it while the holder is queued, delayed or running;
-- mode "throttle" holds it for its TTL, whatever becomes of the holder.
-- Whether a lock still holds depends on its holder, not on the job being
-- submitted: a lock whose holder is an active-mode job (its hash's unique
-- field is the key) that has finished, or whose holder is gone while the
-- lock has no expiry, is stale and taken over; any other lock holds (a
-- throttle lock, or a lock with an expiry, until it expires). The finishing
-- scripts delete active-mode locks. A job refused this way is not written:
-- the reply names the holder instead. When the queue's metadata has
-- "events" (protocol.md 8.12), each job written carries it and a
-- "submitted" (or "delayed") event is appended to the event stream. A job
-- written with a unique key (mode "active") or with events also gets the
-- field extras = "1", which tells the finishing scripts to read those
-- fields (protocol.md 8.13).
--
-- KEYS[1]    queue metadata hash   <prefix>:{<queue>}:meta
-- KEYS[2]    pending list          <prefix>:{<queue>}:pending
-- KEYS[3]    tickets list          <prefix>:{<queue>}:tickets
-- KEYS[4]    delayed set           <prefix>:{<queue>}:delayed
-- KEYS[5]    clock list            <prefix>:{<queue>}:clock
-- KEYS[6]    event stream          <prefix>:{<queue>}:events
-- KEYS[6+i]  job hash of job i     <prefix>:{<queue>}:job:<id i>
-- KEYS[6+n+j]  the unique lock of the j-th job with a unique key, in job
--            order               <prefix>:{<queue>}:unique:<key>
-- ARGV[1]    mode                  "recoverable" | "reliable"
-- ARGV[2]    protocol version      decimal integer from 1 to 1000000
-- ARGV[3..]  eleven arguments per job, in KEYS order:
--            id (1 to 256 bytes of valid UTF-8), enc, payload, client ID to
--            notify ("" for none; at most 64 bytes: the outcome is announced
--            on <prefix>:{<queue>}:reply:<client ID>), lease ms (0: the
--            worker's default, else 1 to 10^12), max attempts (1 to 10^6),
--            timeout ms (how long the handler may run; 0: the worker's
--            default, else 1 to 10^12), delay ms (0 to 10^12: due that long
--            after the server's time), run at ms (0, or 1 to
--            999999999999999: due at that server time, ms since the Unix
--            epoch; at most one of delay and run at is not 0), backoff (""
--            for none, else "<kind>:<base ms>:<max ms>:<jitter>" with kind
--            "fixed" or "exponential", 1 <= base <= max <= 10^12, jitter
--            0 to 1000 thousandths; protocol.md 8.7), unique ("" for
--            none, else "<mode>:<ttl ms>:<key>": mode "active" with ttl 0
--            (no expiry) to 10^12, or "throttle" with ttl 1 to 10^12; key
--            1 to 256 bytes of valid UTF-8)
--
-- Reply:   the length of the pending list after the call (an integer) when
--          no job was refused; else a flat array: that length, then for
--          each job refused for its unique key, its index (1-based, in KEYS
--          order) and the ID of the job holding the key.
-- Errors:  JQ_QUEUE_UNKNOWN <meta key>
--          JQ_MODE_MISMATCH <queue mode> <requested mode>
--          JQ_PROTOCOL_MISMATCH <queue protocol> <requested protocol>
--            (a field the metadata lacks is written "(missing)")
--          JQ_DUPLICATE <id>     a key exists at the job's key (of any type),
--                                or the ID appears twice in this call
--          JQ_WRONGTYPE <key> <expected type> <found type>   meta, pending,
--                                (recoverable mode) tickets, or, when a job
--                                of the call is delayed, delayed or clock;
--                                a unique lock (string); with events on, the
--                                event stream (stream)
--          JQ_BAD_ARGS <detail>
-- Checks every job before writing anything; writes nothing when it refuses.

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

local n = (#ARGV - 2) / 11
if n < 1 or n ~= math.floor(n) or #KEYS < 6 + n then
  return redis.error_reply('JQ_BAD_ARGS expected 6 keys (meta, pending, tickets, delayed, clock, events), a job key per job and a lock key per unique job; a mode, a protocol version and eleven arguments per job')
end
local mode = ARGV[1]
if mode ~= 'simple' and mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS ARGV[1] mode must be simple, recoverable or reliable')
end
if not integer(ARGV[2], 1, 1000000) then
  return redis.error_reply('JQ_BAD_ARGS ARGV[2] protocol version must be an integer from 1 to 1000000')
end
local base = string.sub(KEYS[1], 1, -6) -- strip ":meta"
local seen = {}
-- Per job, the lease, max attempts, timeout and backoff to store (nil: the
-- default), and its delay or due time (nil: none).
local leases, attempts, timeouts, backoffs, delays, run_ats = {}, {}, {}, {}, {}, {}
-- Per job with a unique key: its mode, TTL (ms; 0: none), key and lock key
-- (nil while no job of the call has one: the common case builds no table).
local uniques, locks = nil, 0
local any_delayed = false
for i = 1, n do
  local a = 2 + 11 * (i - 1)
  local id = ARGV[a + 1]
  if id == '' or #id > 256 then
    return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 1) .. '] job ID must be 1 to 256 bytes')
  end
  if not utf8(id) then
    return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 1) .. '] job ID is not valid UTF-8')
  end
  if KEYS[6 + i] ~= base .. ':job:' .. id then
    return redis.error_reply('JQ_BAD_ARGS job key ' .. text(KEYS[6 + i]) .. ' does not match id ' .. id)
  end
  if #ARGV[a + 4] > 64 then
    return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 4) .. '] client ID longer than 64 bytes')
  end
  local lease, max = ARGV[a + 5], ARGV[a + 6]
  if lease ~= '0' or max ~= '1' then
    local lease_n, max_n = integer(lease, 0, 1000000000000), integer(max, 1, 1000000)
    if not lease_n then
      return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 5) .. '] lease ms must be an integer from 0 to 1000000000000')
    end
    if not max_n then
      return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 6) .. '] max attempts must be an integer from 1 to 1000000')
    end
    if lease_n ~= 0 then
      leases[i] = string.format('%d', lease_n)
    end
    if max_n ~= 1 then
      attempts[i] = string.format('%d', max_n)
    end
  end
  if ARGV[a + 7] ~= '0' then
    local timeout_n = integer(ARGV[a + 7], 1, 1000000000000)
    if not timeout_n then
      return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 7) .. '] timeout ms must be an integer from 0 to 1000000000000')
    end
    timeouts[i] = string.format('%d', timeout_n)
  end
  if ARGV[a + 8] ~= '0' or ARGV[a + 9] ~= '0' then
    local delay_n = integer(ARGV[a + 8], 0, 1000000000000)
    local run_at_n = integer(ARGV[a + 9], 0, 999999999999999)
    if not delay_n then
      return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 8) .. '] delay ms must be an integer from 0 to 1000000000000')
    end
    if not run_at_n then
      return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 9) .. '] run at ms must be an integer from 0 to 999999999999999')
    end
    if delay_n ~= 0 and run_at_n ~= 0 then
      return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 8) .. '] and ARGV[' .. (a + 9) .. '] a job has a delay or a run at time, not both')
    end
    delays[i] = delay_n ~= 0 and delay_n or nil
    run_ats[i] = run_at_n ~= 0 and run_at_n or nil
    any_delayed = true
  end
  local policy = ARGV[a + 10]
  if policy ~= '' then
    local kind, b, m, j = string.match(policy, '^(%l+):([0-9]+):([0-9]+):([0-9]+)$')
    local base_n, max_n, jitter_n = integer(b, 1, 1000000000000), integer(m, 1, 1000000000000), integer(j, 0, 1000)
    if (kind ~= 'fixed' and kind ~= 'exponential') or not base_n or not max_n or not jitter_n
        or base_n > max_n then
      return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 10) .. '] backoff must be "" or <fixed|exponential>:<base ms>:<max ms>:<jitter>, 1 <= base <= max <= 10^12, jitter 0 to 1000')
    end
    backoffs[i] = policy
  end
  local spec = ARGV[a + 11]
  if spec ~= '' then
    local umode, ttl, ukey = string.match(spec, '^(%l+):([0-9]+):(.*)$')
    local ttl_n = integer(ttl, umode == 'throttle' and 1 or 0, 1000000000000)
    if (umode ~= 'active' and umode ~= 'throttle') or not ttl_n or ukey == '' or #ukey > 256
        or not utf8(ukey) then
      return redis.error_reply('JQ_BAD_ARGS ARGV[' .. (a + 11) .. '] unique must be "" or <active|throttle>:<ttl ms>:<key> (active: ttl 0 to 10^12, throttle: 1 to 10^12; key 1 to 256 bytes of UTF-8)')
    end
    locks = locks + 1
    local lock = KEYS[6 + n + locks]
    if lock ~= base .. ':unique:' .. ukey then
      return redis.error_reply('JQ_BAD_ARGS lock key ' .. (lock and text(lock) or '(missing)') .. ' does not match unique key ' .. ukey)
    end
    uniques = uniques or {}
    uniques[i] = {mode = umode, ttl = ttl_n, key = ukey, lock = lock}
  end
  if seen[id] then
    return redis.error_reply('JQ_DUPLICATE ' .. id)
  end
  seen[id] = true
end
if #KEYS ~= 6 + n + locks then
  return redis.error_reply('JQ_BAD_ARGS expected ' .. (6 + n + locks) .. ' keys: 6, a job key per job and a lock key per unique job')
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
if mode ~= 'recoverable' and mode ~= 'reliable' then
  return redis.error_reply('JQ_BAD_ARGS job_submit is for recoverable and reliable modes')
end
-- The lists it will push to: refused before anything is written.
local found = redis.call('TYPE', KEYS[2]).ok
if found ~= 'none' and found ~= 'list' then
  return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[2]) .. ' list ' .. found)
end
if mode == 'recoverable' then
  found = redis.call('TYPE', KEYS[3]).ok
  if found ~= 'none' and found ~= 'list' then
    return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[3]) .. ' list ' .. found)
  end
end
if any_delayed then
  found = redis.call('TYPE', KEYS[4]).ok
  if found ~= 'none' and found ~= 'zset' then
    return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[4]) .. ' zset ' .. found)
  end
  found = redis.call('TYPE', KEYS[5]).ok
  if found ~= 'none' and found ~= 'list' then
    return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[5]) .. ' list ' .. found)
  end
end
-- Existing IDs: one EXISTS per thousand keys; find which only when one does.
for first = 7, 6 + n, 1000 do
  local last = math.min(first + 999, 6 + n)
  if redis.call('EXISTS', unpack(KEYS, first, last)) > 0 then
    for k = first, last do
      if redis.call('EXISTS', KEYS[k]) == 1 then
        return redis.error_reply('JQ_DUPLICATE ' .. ARGV[2 + 11 * (k - 7) + 1])
      end
    end
  end
end
-- The event stream's length when the queue records events (else nil).
local events = meta[3] and integer(meta[3], 1, 1000000000)
if events then
  found = redis.call('TYPE', KEYS[6]).ok
  if found ~= 'none' and found ~= 'stream' then
    return redis.error_reply('JQ_WRONGTYPE ' .. text(KEYS[6]) .. ' stream ' .. found)
  end
  events = string.format('%d', events)
end
-- Unique keys: which jobs are refused because another job holds the key
-- (refused[i] = the holder's ID; nil when no job of the call has a unique
-- key). Read only: nothing is written yet.
local refused, holders, any_refused = uniques and {}, uniques and {}, false
for i = 1, uniques and n or 0 do
  local u = uniques[i]
  if u then
    local holder = holders[u.lock]
    if not holder then
      local value = redis.pcall('GET', u.lock)
      if type(value) == 'table' then
        return redis.error_reply('JQ_WRONGTYPE ' .. text(u.lock) .. ' string ' .. redis.call('TYPE', u.lock).ok)
      end
      if value then
        -- Stale? Decided by the holder (its key is derived from the lock's
        -- value, in this queue), whatever this job's mode.
        local holder = redis.pcall('HMGET', base .. ':job:' .. value, 'state', 'unique')
        if holder.err or not holder[1] then
          -- Gone (or not a job): stale unless the lock expires by itself.
          if redis.call('PTTL', u.lock) == -1 then
            value = nil
          end
        elseif holder[2] == u.key and holder[1] ~= 'queued' and holder[1] ~= 'active' then
          value = nil
        end
      end
      holder = value
    end
    if holder then
      refused[i] = holder
      any_refused = true
    else
      holders[u.lock] = ARGV[2 + 11 * (i - 1) + 1]
    end
  end
end
-- Numbers go to Redis as decimal strings made once: Redis formats a Lua
-- number argument with "%.17g", which costs more than the command itself.
local now = redis.call('TIME')
local now_n = now[1] * 1000 + math.floor(now[2] / 1000)
local now_ms = string.format('%d', now_n)
-- Due times (ms, server time) of the jobs that wait in the delayed set.
local dues = {}
for i = 1, n do
  local due = run_ats[i] or (delays[i] and now_n + delays[i])
  if due and due > now_n and not (refused and refused[i]) then
    dues[i] = due
  end
end
for i = 1, n do
  local a = 2 + 11 * (i - 1)
  local key, client, lease, max, timeout = KEYS[6 + i], ARGV[a + 4], leases[i], attempts[i], timeouts[i]
  local u = uniques and uniques[i]
  if refused and refused[i] then
    -- Not written: the reply names the holder.
  elseif
  -- Fields at their default value (client "", lease_ms 0, max_attempts 1,
  -- timeout_ms 0, attempt, stalls and token 0, no backoff, no due time)
  -- are not written: less memory and CPU.
  not lease and not max and not timeout and not backoffs[i] and not dues[i] and not u
      and not events then
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
    if lease then
      fields[#fields + 1] = 'lease_ms'
      fields[#fields + 1] = lease
    end
    if max then
      fields[#fields + 1] = 'max_attempts'
      fields[#fields + 1] = max
    end
    if timeout then
      fields[#fields + 1] = 'timeout_ms'
      fields[#fields + 1] = timeout
    end
    if backoffs[i] then
      fields[#fields + 1] = 'backoff'
      fields[#fields + 1] = backoffs[i]
    end
    if dues[i] then
      fields[#fields + 1] = 'due_ms'
      fields[#fields + 1] = string.format('%d', dues[i])
    end
    if u and u.mode == 'active' then
      fields[#fields + 1] = 'unique'
      fields[#fields + 1] = u.key
    end
    if events then
      fields[#fields + 1] = 'events'
      fields[#fields + 1] = events
    end
    if events or (u and u.mode == 'active') then
      fields[#fields + 1] = 'extras'
      fields[#fields + 1] = '1'
    end
    redis.call('HSET', key, unpack(fields))
  end
  if u and not refused[i] then
    if u.ttl > 0 then
      redis.call('SET', u.lock, ARGV[a + 1], 'PX', string.format('%d', u.ttl))
    else
      redis.call('SET', u.lock, ARGV[a + 1])
    end
  end
  if events and not (refused and refused[i]) then
    if dues[i] then
      redis.pcall('XADD', KEYS[6], 'MAXLEN', '~', events, '*', 'event', 'delayed', 'id', ARGV[a + 1],
        'due_ms', string.format('%d', dues[i]))
    else
      redis.pcall('XADD', KEYS[6], 'MAXLEN', '~', events, '*', 'event', 'submitted', 'id', ARGV[a + 1])
    end
  end
end
-- Delayed jobs go to the delayed set; a new earliest due time rings the
-- clock (one entry at most: whoever pops it reads the set anyway).
local earliest = false
if any_delayed then
  local first = redis.call('ZRANGE', KEYS[4], '0', '0', 'WITHSCORES')
  earliest = first[2] and integer(first[2], -999999999999999, 999999999999999)
  local ring = false
  for i = 1, n do
    if dues[i] then
      redis.call('ZADD', KEYS[4], string.format('%d', dues[i]), ARGV[2 + 11 * (i - 1) + 1])
      if not earliest or dues[i] < earliest then
        ring = true
      end
    end
  end
  if ring and redis.call('LLEN', KEYS[5]) == 0 then
    redis.call('LPUSH', KEYS[5], '1')
  end
end
-- The other IDs (and, in recoverable mode, one ticket per job), pushed a
-- thousand at a time: oldest first, as one LPUSH per job would. A single
-- job is pushed without building tables.
local len = nil
if n == 1 then
  if not dues[1] and not (refused and refused[1]) then
    len = redis.call('LPUSH', KEYS[2], ARGV[3])
    if mode == 'recoverable' then
      redis.call('LPUSH', KEYS[3], '1')
    end
  end
else
  local ids, tickets = {}, {}
  local function push()
    if #ids > 0 then
      len = redis.call('LPUSH', KEYS[2], unpack(ids))
      if mode == 'recoverable' then
        redis.call('LPUSH', KEYS[3], unpack(tickets))
      end
      ids, tickets = {}, {}
    end
  end
  for i = 1, n do
    if not dues[i] and not (refused and refused[i]) then
      ids[#ids + 1] = ARGV[2 + 11 * (i - 1) + 1]
      tickets[#tickets + 1] = '1'
      if #ids == 1000 then
        push()
      end
    end
  end
  push()
end
len = len or redis.call('LLEN', KEYS[2])
if not any_refused then
  return len
end
local out = {len}
for i = 1, n do
  if refused[i] then
    out[#out + 1] = string.format('%d', i)
    out[#out + 1] = refused[i]
  end
end
return out
