"""A second implementation of the job-async-redis protocol, in Python.

Written from protocol.md and the scripts in lua/ alone (it loads those exact
files), with redis-py and msgpack. It is small and synchronous: a client
for all three modes, and a worker that runs one job at a time. It does not
renew leases while a handler runs (recoverable mode) or heartbeat during a
handler (reliable mode): its jobs must finish within the lease. It honours
handler timeouts (the job's own, else the worker's default; kind `timeout`,
retried like `handler`): an `async def` handler's task is cancelled, a plain
function is interrupted by SIGALRM (protocol.md section 8.4). Records are
written and read by the rules of protocol.md section 6.4 (pack_record,
read_record, read_message), the same code that checks the golden vectors.

Delayed jobs and retry backoff (protocol.md 8.7): the client submits a job
with a delay or a run-at time, and a backoff policy (backoff_policy); the
scripts keep it in the queue's delayed set until it is due, and compute the
retry delay of a failed attempt from the policy (backoff_ms is the same
formula). A handler may ask for a retry delay of its own (raise RetryAfter)
or for no retry (raise NoRetry).

What the worker does about delayed jobs: it calls job_promote (which moves
the due ones onto the queue) when it starts, before each blocking wait, and
whenever the next delayed job it heard of is due or `block_s` has passed
(checked between jobs), and it cuts each blocking wait short when the next
delayed job is due. So a queue served by this worker alone runs a delayed
job no earlier than it is due and, while the worker is idle, at most about
`block_s` after (plus the lateness of Redis's timer for blocking commands,
up to about 100 ms); a busy worker promotes between two jobs. It never
takes the queue's timekeeper role (protocol.md 8.7): it runs one job at a
time, so as the timekeeper it would hold up every other worker's delayed
jobs while its handler runs. It calls job_promote with keeper ms 0, which
never takes the role (and only gives it up if it held it), and does not
wait on the clock list, leaving both to the workers that do (the Rust
workers). It never fires recurring schedules (protocol.md 8.8: it does not
read job_promote's "schedule in ms", nor run schedule_fire): a queue with
schedules needs a worker that fires them. The client side has no
schedules either (schedule_set and schedule_remove are the Rust client's).

Queue controls (protocol.md 8.9): the client pauses and resumes a queue and
sets or clears its rate and concurrency limits (queue_control); the start
scripts (job_claim, reliable_start) enforce them. The worker honours them
as the Rust worker does: a call that the queue's gate held back says why
and, for a rate limit, for how long; the worker then stops asking the
queue and stops blocking on its tickets (recoverable) or pending list
(reliable), and blocks on the queue's gate list instead (pushed when more
jobs may start), for at most the rate's wait or `block_s`; then it asks
again, telling the script it was held ("held" 1), so that a wake-up it
does not use passes on to the next held worker. It never spins on a shut
gate.

Cancellation (protocol.md 8.11): the client cancels jobs (job_cancel). A
queued or delayed job never runs; a running one is finished in Redis at
once (state "failed", kind "cancelled", never retried) and its worker is
told on its control channel, <prefix>:{<queue>}:worker:<worker id>. This
worker subscribes there before it takes a job, and stops the handler of a
job cancelled while it runs: an `async def` handler's task is cancelled, a
plain function running on the main thread is interrupted with SIGUSR1
(else it runs to its end); either way its result is discarded and nothing
is recorded (the job has its outcome). In reliable mode the ID is still in
the worker's in-flight list: the worker starts it again from "inflight"
(protocol.md 9.1 step 4, an outcome not recorded), and reliable_start,
finding the job finished, drops it. A handler can also look: `job.cancelled()`.

Progress (protocol.md 8.13): a handler reports progress with
`job.progress(value)` (job_progress, under the attempt's fencing token);
the client reads the latest (Queue.progress) or follows it on the job's
progress channel (Queue.follow_progress).

Unique jobs (protocol.md 8.10): Queue.submit(..., unique=unique_spec(key))
enqueues the job only when no job holds the key, else returns the holder's
ID. Events (protocol.md 8.12): Queue.set_events(maxlen) makes the jobs
submitted from then on record their lifecycle in the queue's event stream,
which Queue.events reads.

As a program (used by the Rust interop and conformance tests):

    python3 jobqueue.py worker --url URL --queue Q --mode MODE --count N
        [--handler interop|nap|nap-sync|clock|plan|progress] [--timeout-ms MS]
    python3 jobqueue.py client-check --url URL --queue Q --mode MODE --enc ENC --count N
    python3 jobqueue.py client-timeouts --url URL --queue Q --mode MODE
    python3 jobqueue.py client-delayed --url URL --queue Q --mode MODE
    python3 jobqueue.py pause|resume|controls --url URL --queue Q --mode MODE
    python3 jobqueue.py rate-limit --url URL --queue Q --mode MODE (--max N --window-ms MS | --clear)
    python3 jobqueue.py concurrency-limit --url URL --queue Q --mode MODE (--max N | --clear)
    python3 jobqueue.py client-cancel|client-progress --url URL --queue Q --mode MODE
    python3 jobqueue.py submit --url URL --queue Q --mode MODE [--payload JSON]
        [--enc ENC] [--id ID] [--unique SPEC]        (prints the ID, or the holder's)
    python3 jobqueue.py cancel --url URL --queue Q --mode MODE --id ID [--id ID ...]
    python3 jobqueue.py progress --url URL --queue Q --mode MODE --id ID [--follow N]
    python3 jobqueue.py events --url URL --queue Q --mode MODE (--max N | --clear | --read)
    python3 jobqueue.py conformance --url URL FILE.json
    python3 jobqueue.py vectors FILE.json      (vectors.json or backoff.json)
"""

import argparse
import asyncio
import hashlib
import inspect
import json
import math
import pathlib
import re
import signal
import sys
import threading
import time
import uuid

import msgpack
import redis

PROTOCOL_VERSION = "1"
# Durations in ms, such as a handler timeout: 1 to 10^12 (section 10, "Numbers").
MAX_MS = 10**12
# The latest run-at time the submit scripts take, in ms since the Unix epoch.
MAX_RUN_AT_MS = 999_999_999_999_999
# Most delayed jobs one job_promote call moves (the Rust worker's batch).
PROMOTE_LIMIT = 1000
# Most starts per window of a rate limit, and most running jobs of a
# concurrency limit (protocol.md 8.9).
MAX_LIMIT = 1_000_000
# Most entries of a queue's event stream (queue_control "events").
MAX_EVENTS = 10**9
# The longest unique key, in bytes (job_submit).
MAX_UNIQUE_KEY = 256
# How long a cancelled job's hash is kept by default (the result TTL).
CANCELLED_TTL_MS = 86_400_000
LUA_DIR = pathlib.Path(__file__).resolve().parents[2] / "lua"
MODES = ("simple", "recoverable", "reliable")
FINISHED = ("completed", "failed", "dead")


class ProtocolError(Exception):
    """A script refused with a JQ_ error code (protocol.md section 10)."""

    def __init__(self, code, detail):
        super().__init__(f"{code} {detail}".strip())
        self.code = code
        self.detail = detail


class RetryAfter(Exception):
    """Raised by a handler: the attempt failed (kind `handler`, this
    message), and the job, while it has attempts left, runs again after
    `seconds` instead of after its backoff (job_finish's retry delay; 0:
    queued again at once). Recoverable and reliable modes."""

    def __init__(self, seconds, message=""):
        if not seconds >= 0:
            raise ValueError(f"a retry delay must be 0 s or more, not {seconds!r}")
        super().__init__(message)
        # Rounded to the ms (0.57 * 1000 is 569.99...), at most 10^12.
        self.delay_ms = round(min(seconds * 1000, MAX_MS))
        self.message = message


class NoRetry(Exception):
    """Raised by a handler: the attempt failed (kind `handler`, this
    message), and the job is not retried, whatever attempts it has left."""

    def __init__(self, message=""):
        super().__init__(message)
        self.message = message


class JobFailed(Exception):
    """The job ran and failed; `kind` is a failure kind of section 6.2."""

    def __init__(self, job_id, kind, message):
        super().__init__(f"job {job_id} failed ({kind}): {message}")
        self.job_id = job_id
        self.kind = kind
        self.message = message


def now_ms():
    return int(time.time() * 1000)


def encode(enc, value):
    """Encodes a payload or result (section 6)."""
    if enc == "msgpack":
        return msgpack.packb(value, use_bin_type=True)
    if enc == "json":
        # No NaN or Infinity tokens: they are not JSON (section 6.6).
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    raise ValueError(f"unknown encoding {enc!r}")


def decode(enc, data):
    if enc == "msgpack":
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    if enc == "json":
        # UTF-8 JSON text (section 6.6): json.loads would also guess UTF-16
        # and UTF-32 from the bytes.
        return json.loads(data.decode("utf-8"))
    raise ValueError(f"unknown encoding {enc!r}")


# Retry backoff (protocol.md 8.7). A policy travels with its job as a string,
# "<kind>:<base ms>:<max ms>:<jitter thousandths>", and job_finish computes
# the delay before a retry from it; backoff_ms is the same computation.
BACKOFF_KINDS = ("fixed", "exponential")
# The scripts' pattern, '^(%l+):([0-9]+):([0-9]+):([0-9]+)$', matched with
# fullmatch: re's "$" would also take a final newline, and \d other digits.
_BACKOFF = re.compile(r"([a-z]+):([0-9]+):([0-9]+):([0-9]+)")


def backoff_policy(kind, base_ms, max_ms=None, jitter=0.0):
    """A backoff policy for Queue.submit. "fixed" waits `base_ms` before
    every retry (`max_ms` is ignored); "exponential" waits base_ms * 2^(n-1)
    after failed attempt n, at most `max_ms` (default 10^12). `jitter`, 0
    to 1, shortens each delay by a pseudo-random part of up to that
    fraction of it (stored in thousandths)."""
    if kind not in BACKOFF_KINDS:
        raise ValueError(f"backoff kind must be fixed or exponential, not {kind!r}")
    if kind == "fixed" or max_ms is None:
        max_ms = base_ms if kind == "fixed" else MAX_MS
    if not (type(base_ms) is int and type(max_ms) is int and 1 <= base_ms <= max_ms <= MAX_MS):
        raise ValueError(f"a backoff needs integers 1 <= base_ms <= max_ms <= {MAX_MS}")
    if not 0 <= jitter <= 1:
        raise ValueError("jitter must be from 0 to 1")
    # Half up, as the Rust library rounds (Python's round() halves to even).
    thousandths = math.floor(jitter * 1000 + 0.5)
    return f"{kind}:{base_ms}:{max_ms}:{thousandths}"


def parse_backoff(policy):
    """(kind, base ms, max ms, jitter thousandths) of a policy (str or
    bytes), or None when the scripts would not take it: each number 1 to
    15 decimal digits, 1 <= base <= max <= 10^12, jitter 0 to 1000."""
    if isinstance(policy, bytes):
        try:
            policy = policy.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(policy, str):
        return None
    m = _BACKOFF.fullmatch(policy)
    if not m or m.group(1) not in BACKOFF_KINDS or any(len(g) > 15 for g in m.groups()[1:]):
        return None
    base, cap, jitter = (int(g) for g in m.groups()[1:])
    if not (1 <= base <= cap <= MAX_MS and jitter <= 1000):
        return None
    return m.group(1), base, cap, jitter


def backoff_ms(policy, job_id, attempt):
    """The delay in ms before the retry that follows failed attempt number
    `attempt` (the job hash's `attempt`) of job `job_id` (str, or its bytes),
    under `policy` (None, or a policy that does not parse: 0, queued again
    at once). job_finish's computation, in IEEE 754 doubles in the same
    order, so that both agree to the ms:

        fixed: d = base; exponential: k = max(n, 1) - 1,
            d = max if k >= 40 else min(max, base * 2^k)
        jitter j > 0: h = the first 8 hex digits of sha1("<id>:<n>");
            d = d - floor(d * j / 1000 * h / 2^32)
    """
    parsed = parse_backoff(policy)
    if parsed is None:
        return 0
    kind, base, cap, jitter = parsed
    # Every operand a float: Python's int arithmetic would be exact, where
    # the script's is not.
    if kind == "fixed":
        delay = float(base)
    else:
        doublings = max(attempt, 1) - 1
        delay = float(cap) if doublings >= 40 else min(float(cap), float(base) * 2.0 ** doublings)
    if jitter > 0:
        if isinstance(job_id, str):
            job_id = job_id.encode("utf-8")
        h = float(int(hashlib.sha1(job_id + b":%d" % attempt).hexdigest()[:8], 16))
        delay = delay - math.floor(delay * float(jitter) / 1000.0 * h / 4294967296.0)
    return int(delay)


# Unique jobs (protocol.md 8.10). A job's unique key travels as a string,
# "<mode>:<ttl ms>:<key>", job_submit's eleventh argument per job.
UNIQUE_MODES = ("active", "throttle")


def unique_spec(key, mode="active", ttl_ms=0):
    """A unique spec for Queue.submit. Mode "active": the key is held while
    its job is queued, delayed or running (a lock whose holder has ended is
    taken over), with an expiry of `ttl_ms` (0: none); "throttle": it is
    held for `ttl_ms` (1 ms at least) from the submit, whatever becomes of
    the job. `key`: 1 to 256 bytes of UTF-8, per queue."""
    if mode not in UNIQUE_MODES:
        raise ValueError(f"unique mode must be active or throttle, not {mode!r}")
    low = 1 if mode == "throttle" else 0
    if not (type(ttl_ms) is int and low <= ttl_ms <= MAX_MS):
        raise ValueError(f"a {mode} unique key's ttl_ms is {low} to {MAX_MS}")
    if not isinstance(key, str) or not 1 <= len(key.encode()) <= MAX_UNIQUE_KEY:
        raise ValueError(f"a unique key is 1 to {MAX_UNIQUE_KEY} bytes of UTF-8")
    return f"{mode}:{ttl_ms}:{key}"


def unique_key(spec):
    """The key of a unique spec (everything after the second colon: a key
    may hold colons), or ValueError when the spec has no such form."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or parts[0] not in UNIQUE_MODES or not parts[2]:
        raise ValueError(f"a unique spec is <active|throttle>:<ttl ms>:<key>, not {spec!r}")
    return parts[2]


# Records (protocol.md section 6): each key with its type and whether it is
# required, in the order writers emit them (part of the exact encoding,
# section 6.4). Types: "str" (valid UTF-8), "bytes" (bin; str accepted when
# reading), "uint" (an integer 0 to 2^64-1), "ms" (an integer 1 to 10^12;
# any other value is of the wrong type), "error" (a map as ERROR).
ENVELOPE = (("id", "str", True), ("reply", "str", False), ("enc", "str", True),
            ("payload", "bytes", True), ("submitted_ms", "uint", False), ("timeout_ms", "ms", False))
REPLY = (("id", "str", True), ("status", "str", True), ("enc", "str", False),
         ("result", "bytes", False), ("error", "error", False))
ERROR = (("kind", "str", True), ("message", "str", True))
DEAD = (("reason", "str", True), ("entry", "bytes", True), ("at_ms", "uint", True))
RECORDS = {"envelope": ENVELOPE, "reply": REPLY, "doorbell": REPLY, "dead": DEAD}
# A message on a job's progress channel (job_progress, protocol.md 8.13).
PROGRESS = (("id", "str", True), ("enc", "str", False), ("progress", "bytes", True))


class InvalidRecord(ValueError):
    """A record that section 6.4 calls invalid, with the reason."""


class _Map(list):
    """A MessagePack map as read: its (key, value) pairs in order, so that
    repeated keys and keys of any type can be seen (section 6.4)."""


def _unpack_first(data):
    """The first MessagePack value of `data`, and whether bytes follow it.
    Maps come as _Map; str values that are not valid UTF-8 keep their bytes
    as surrogate escapes (see _typed)."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, unicode_errors="surrogateescape",
                                object_pairs_hook=_Map, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    try:
        value = unpacker.unpack()
    except msgpack.OutOfData:
        raise InvalidRecord("not MessagePack: truncated") from None
    except Exception as e:  # noqa: BLE001 - any malformed input
        raise InvalidRecord(f"not MessagePack: {e}") from None
    trailing = unpacker.tell() < len(data)
    return value, trailing


def _typed(kind, value):
    """(True, the value as read) when `value` has the type `kind`, else
    (False, None). Nil has no type."""
    if kind == "str":
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return False, None  # a str that is not valid UTF-8
            return True, value
        return False, None
    if kind == "bytes":
        if isinstance(value, bytes):
            return True, value
        if isinstance(value, str):  # str accepted: its bytes are the value
            return True, value.encode("utf-8", "surrogateescape")
        return False, None
    if kind == "uint":
        # Any integer width; never a float (nor a bool, which Python counts
        # as an int).
        if type(value) is int and 0 <= value < 2**64:
            return True, value
        return False, None
    if kind == "ms":
        # An integer of any width from 1 to 10^12 (section 6.1: timeout_ms);
        # 0, a larger value, a float or a str counts as absent.
        if type(value) is int and 1 <= value <= MAX_MS:
            return True, value
        return False, None
    if kind == "error":
        try:
            return True, _read_map(ERROR, value)
        except InvalidRecord:
            return False, None
    raise ValueError(kind)


def _read_map(table, value):
    if not isinstance(value, _Map):
        raise InvalidRecord("not a map")
    known = {key for key, _, _ in table}
    seen = {}
    for key, v in value:
        # Keys are matched as str; others, and unknown keys, are ignored.
        if isinstance(key, str) and key in known:
            if key in seen:
                raise InvalidRecord(f"key {key!r} appears twice")
            seen[key] = v
    out = {}
    for key, kind, required in table:
        if key not in seen:
            if required:
                raise InvalidRecord(f"required key {key!r} is missing")
            continue
        ok, v = _typed(kind, seen[key])
        if ok:
            out[key] = v
        elif required:
            raise InvalidRecord(f"required key {key!r} is of the wrong type")
        # An optional key of the wrong type counts as absent.
    return out


def read_record(table, data):
    """Reads one record (section 6.4): a dict of the fields it holds, or
    InvalidRecord."""
    value, trailing = _unpack_first(data)
    if trailing:
        raise InvalidRecord("bytes follow the record")
    return _read_map(table, value)


def read_message(data):
    """Reads a reply message or doorbell: a list of records (one, or the
    elements of an array from job_finish_batch), or InvalidRecord. Invalid
    elements of an array are left out."""
    value, trailing = _unpack_first(data)
    if trailing:
        raise InvalidRecord("bytes follow the message")
    if isinstance(value, list) and not isinstance(value, _Map):
        records = []
        for element in value:
            try:
                records.append(_read_map(REPLY, element))
            except InvalidRecord:
                pass
        return records
    return [_read_map(REPLY, value)]


def pack_record(table, values):
    """Writes a record (section 6.4): the keys present, in the table's order;
    text as str, byte strings as bin, integers as integers in their shortest
    form (msgpack does both)."""
    columns = {key for key, _, _ in table}
    unknown = set(values) - columns
    if unknown:
        raise ValueError(f"keys not in the record's table: {sorted(unknown)}")
    out = {}
    for key, kind, required in table:
        value = values.get(key)
        if value is None:
            if required:
                raise ValueError(f"required key {key!r} is missing")
            continue
        if kind == "error":
            value = {k: value[k] for k, _, _ in ERROR}
            ok = all(isinstance(v, str) for v in value.values())
        elif kind == "bytes":
            ok = isinstance(value, bytes)
        else:
            ok = _typed(kind, value)[0]
        if not ok:
            raise ValueError(f"key {key!r}: {value!r} is not of type {kind}")
        out[key] = value
    return msgpack.packb(out, use_bin_type=True)


def envelope_client(entry, keys):
    """For an entry that is not a valid envelope: (id, reply channel) when
    its client can still be told (section 7.2: its first value is a map with
    a valid id and a reply channel of this queue), else None."""
    try:
        value, _ = _unpack_first(entry)
        fields = _read_map((("id", "str", True), ("reply", "str", True)), value)
    except InvalidRecord:
        return None
    if not keys.owns_reply_channel(fields["reply"]):
        return None
    return fields["id"], fields["reply"]


def text(value):
    return value.decode() if isinstance(value, bytes) else value


class Scripts:
    """The scripts of lua/, run with EVALSHA. redis-py's Script loads a
    script again on NOSCRIPT (after a restart, failover or SCRIPT FLUSH)."""

    def __init__(self, r):
        self.by_name = {}
        for path in sorted(LUA_DIR.glob("*.lua")):
            self.by_name[path.stem] = r.register_script(path.read_bytes())

    def sha1(self, name):
        return self.by_name[name].sha

    def __call__(self, name, keys, args):
        try:
            return self.by_name[name](keys=keys, args=args)
        except redis.ResponseError as e:
            code, _, detail = str(e).partition(" ")
            if code.startswith("JQ_"):
                raise ProtocolError(code, detail) from None
            raise


class Keys:
    """Key and channel names (section 4)."""

    def __init__(self, prefix, queue):
        if not queue or "{" in queue or "}" in queue or len(queue.encode()) > 256:
            raise ValueError(f"invalid queue name {queue!r}")
        self.queue = queue
        self.base = f"{prefix}:{{{queue}}}"

    def __getattr__(self, name):
        if name in ("meta", "pending", "dead", "tickets", "leases", "fence", "dead_jobs", "sweep", "workers",
                    "delayed", "timekeeper", "clock", "schedules", "rate", "running", "gate", "events"):
            return f"{self.base}:{name}"
        raise AttributeError(name)

    def worker_channel(self, worker_id):
        """A worker's control channel (protocol.md 8.11): job_cancel tells
        it there that a job it runs was cancelled."""
        return f"{self.base}:worker:{worker_id}"

    def progress_channel(self, job_id):
        """A job's progress channel (protocol.md 8.13)."""
        return f"{self.base}:progress:{job_id}"

    def unique(self, key):
        """The lock of a unique key (protocol.md 8.10): its value is the
        ID of the job that holds the key."""
        return f"{self.base}:unique:{key}"

    def job(self, job_id):
        """A job's key. An ID read from Redis is bytes, and may not be
        UTF-8 (another program wrote it): the key is built from its bytes."""
        if isinstance(job_id, bytes):
            return self.base.encode() + b":job:" + job_id
        return f"{self.base}:job:{job_id}"

    def inflight(self, worker_id):
        if isinstance(worker_id, bytes):
            return self.base.encode() + b":inflight:" + worker_id
        return f"{self.base}:inflight:{worker_id}"

    def reply(self, client_id):
        return f"{self.base}:reply:{client_id}"

    def owns_reply_channel(self, channel):
        """True for a reply channel of this queue (section 6.1)."""
        prefix = self.reply("")
        return isinstance(channel, str) and channel.startswith(prefix) and len(channel) > len(prefix)


def register(scripts, keys, mode):
    scripts("queue_register", [keys.meta], [mode, PROTOCOL_VERSION])


class Client:
    """Submits jobs and awaits their outcomes (sections 7.1 and 8.3)."""

    def __init__(self, url, prefix="jq"):
        self.r = redis.Redis.from_url(url)
        self.prefix = prefix
        self.id = uuid.uuid4().hex
        self.scripts = Scripts(self.r)
        self.pubsub = self.r.pubsub()
        self.subscribed = set()
        self.inbox = {}  # job id -> message received on a reply channel

    def queue(self, name, mode):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        keys = Keys(self.prefix, name)
        register(self.scripts, keys, mode)
        return Queue(self, keys, mode)

    def subscribe(self, channel):
        if channel in self.subscribed:
            return
        self.subscribe_with(self.pubsub, channel, self.keep)
        self.subscribed.add(channel)

    @staticmethod
    def subscribe_with(pubsub, channel, keep=lambda message: None):
        """Subscribes `pubsub` to `channel` and waits until Redis confirms
        it; messages read meanwhile go to `keep`."""
        pubsub.subscribe(channel)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
            if message and message["type"] == "subscribe" and text(message["channel"]) == channel:
                return
            keep(message)
        raise TimeoutError(f"could not subscribe to {channel}")

    def keep(self, message):
        if message and message["type"] == "message":
            # One outcome record, or an array of them (job_finish_batch).
            # A message that is not valid (section 6.4) is ignored.
            try:
                records = read_message(message["data"])
            except InvalidRecord as e:
                print(f"ignoring an invalid reply message: {e}", file=sys.stderr)
                return
            for record in records:
                self.inbox[record["id"]] = record

    def wait_message(self, job_id, seconds):
        """Waits up to `seconds` for a message about `job_id`."""
        deadline = time.monotonic() + seconds
        while job_id not in self.inbox:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.keep(self.pubsub.get_message(timeout=min(left, 0.2)))
        return self.inbox.pop(job_id)


class Queue:
    def __init__(self, client, keys, mode):
        self.client = client
        self.keys = keys
        self.mode = mode
        self.channel = keys.reply(client.id)

    def submit(self, payload, enc="msgpack", job_id=None, max_attempts=1, lease_ms=0, timeout_ms=0,
               delay_ms=0, run_at_ms=0, backoff="", unique=""):
        """Submits one job; returns its ID. `timeout_ms`: how long its
        handler may run (0: the worker's default), in every mode.
        `delay_ms` (0 to 10^12) or `run_at_ms` (ms since the Unix epoch, on
        the Redis server's clock; 0: none): the job waits in the queue's
        delayed set until then, in every mode; at most one of them. A due
        time that is not in the future queues it at once. `backoff` (from
        backoff_policy; "": none): how long a failed attempt waits before
        the next, recoverable and reliable modes. `unique` (from
        unique_spec; "": none): while another job holds the key nothing is
        written, and the ID returned is the holder's (recoverable and
        reliable modes)."""
        if timeout_ms != 0 and not 1 <= timeout_ms <= MAX_MS:
            raise ValueError(f"timeout_ms must be 0 or 1 to {MAX_MS}")
        if not 0 <= delay_ms <= MAX_MS or not 0 <= run_at_ms <= MAX_RUN_AT_MS:
            raise ValueError(f"delay_ms must be 0 to {MAX_MS}, run_at_ms 0 to {MAX_RUN_AT_MS}")
        if delay_ms and run_at_ms:
            raise ValueError("a job has a delay or a run-at time, not both")
        if backoff and (self.mode == "simple" or parse_backoff(backoff) is None):
            raise ValueError(f"invalid backoff {backoff!r} (see backoff_policy; not in simple mode)")
        if unique and self.mode == "simple":
            raise ValueError("simple mode jobs have no unique keys: a queued job is only a list entry")
        self.client.subscribe(self.channel)
        job_id = job_id or str(uuid.uuid4())
        body = encode(enc, payload)
        if self.mode == "simple":
            # timeout_ms only when the job has its own (section 6.1).
            envelope = pack_record(
                ENVELOPE, {"id": job_id, "reply": self.channel, "enc": enc, "payload": body, "submitted_ms": now_ms(),
                           "timeout_ms": timeout_ms or None})
            # simple_submit 3: the delay and run-at time of every envelope
            # of the call come before them.
            k = self.keys
            call = ("simple_submit", [k.meta, k.pending, k.delayed, k.clock],
                    [self.mode, PROTOCOL_VERSION, str(delay_ms), str(run_at_ms), envelope])
        else:
            # Eleven arguments per job (job_submit 10, section 10.6), the
            # last its unique spec; the event stream's key after the clock,
            # and after the job keys the lock of each job with a unique key.
            k = self.keys
            locks = [k.unique(unique_key(unique))] if unique else []
            call = (
                "job_submit",
                [k.meta, k.pending, k.tickets, k.delayed, k.clock, k.events, k.job(job_id)] + locks,
                [self.mode, PROTOCOL_VERSION, job_id, enc, body, self.client.id, str(lease_ms), str(max_attempts),
                 str(timeout_ms), str(delay_ms), str(run_at_ms), backoff, unique],
            )
        try:
            reply = self.client.scripts(*call)
        except ProtocolError as e:
            if e.code != "JQ_QUEUE_UNKNOWN":
                raise
            register(self.client.scripts, self.keys, self.mode)
            reply = self.client.scripts(*call)
        if self.mode != "simple" and isinstance(reply, list) and len(reply) >= 3:
            # A flat array: the pending list's length, then (index, holder)
            # per job refused for its unique key. One job here: index 1.
            return text(reply[2])
        return job_id

    def result(self, job_id, timeout=10.0, enc="msgpack"):
        """Awaits a job's outcome: its decoded result, or JobFailed. `enc`:
        the encoding the job was submitted in."""
        deadline = time.monotonic() + timeout
        if self.mode == "simple":
            reply = self.client.wait_message(job_id, timeout)
            if reply is None:
                raise TimeoutError(f"no outcome for job {job_id}")
            if reply["status"] == "completed":
                # Without enc: the encoding the job was submitted in (6.2).
                return decode(reply.get("enc", enc), reply.get("result", b""))
            # Without a valid error the kind is unknown: reported as the
            # status, as the Rust library does (6.2).
            error = reply.get("error") or {}
            raise JobFailed(job_id, error.get("kind", reply["status"]), error.get("message", ""))
        self.client.subscribe(self.channel)
        while True:
            seen = self.client.scripts("job_watch", [self.keys.job(job_id)], [self.client.id])
            state = text(seen[0])
            if state == "missing":
                raise ProtocolError("JQ_NO_JOB", job_id)
            if state == "completed":
                return decode(text(seen[1]), seen[2])
            if state in ("failed", "dead"):
                raise JobFailed(job_id, text(seen[1]), text(seen[2]))
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no outcome for job {job_id}")
            # The doorbell, or a re-read every second (doorbells can be
            # missed). This client reads the outcome from the hash even when
            # the doorbell carries it (section 8.3 allows either), so a
            # doorbell without the outcome (dead, or failed without an error
            # record) needs nothing special.
            self.client.wait_message(job_id, min(left, 1.0))

    # cancellation and progress (protocol.md 8.11, 8.13) ---------------------

    def cancel(self, ids, message="", ttl_ms=CANCELLED_TTL_MS):
        """job_cancel 1: cancels jobs `ids` (a list of IDs, or one ID), in
        one call. A queued or delayed job never runs; a running job is
        finished now and its worker is told to stop it. Either way the job
        is "failed" with kind "cancelled" and `message` ("": "cancelled"),
        is never retried, its hash kept for `ttl_ms`, and its client's
        doorbell carries that outcome. Returns one decision per ID, in
        order, as a tuple of str: ("cancelled", "queued" | "active") (its
        state before), ("finished", state) (it had finished: untouched),
        ("missing",) or ("not a hash",). Recoverable and reliable modes: a
        simple-mode job is only a list entry."""
        if self.mode == "simple":
            raise ValueError("simple mode jobs cannot be cancelled: a queued job is only a list entry")
        if isinstance(ids, (str, bytes)):
            ids = [ids]
        if not ids:
            return []
        if not 1 <= ttl_ms <= MAX_MS or len(message.encode()) > 1024:
            raise ValueError(f"ttl_ms is 1 to {MAX_MS}, a message at most 1024 bytes")
        k = self.keys
        decisions = self.client.scripts("job_cancel", [k.delayed, k.leases, k.running, k.gate, k.events]
                                        + [k.job(i) for i in ids],
                                        [self.mode, str(ttl_ms), "publish", message] + list(ids))
        return [tuple(text(v) for v in d) for d in decisions]

    def progress(self, job_id):
        """A job's latest progress (job.progress in its handler), decoded
        in the job's encoding; None when it has reported none, or the job
        is gone."""
        if self.mode == "simple":
            raise ValueError("simple mode jobs have no record to keep progress in")
        value, enc = self.client.r.hmget(self.keys.job(job_id), "progress", "enc")
        return None if value is None else decode(text(enc) or "msgpack", value)

    def follow_progress(self, job_id, timeout=30.0):
        """Yields a job's progress: the latest value first (a follower that
        joins late sees where the job is), then each one its handler
        reports, until the job has finished (its state is read every
        second) or `timeout` seconds have passed. It subscribes to the
        job's progress channel before it reads the latest value, so that
        nothing reported in between is lost (a value may then come twice).
        Values published while the connection was down are missed."""
        if self.mode == "simple":
            raise ValueError("simple mode jobs have no record to keep progress in")
        pubsub = self.client.r.pubsub()

        def published(wait_s):
            """The values of the messages that arrive within `wait_s`."""
            m = pubsub.get_message(timeout=wait_s)
            if m is None or m["type"] != "message":
                return []
            try:
                fields = read_record(PROGRESS, m["data"])
            except InvalidRecord as e:
                print(f"ignoring an invalid progress message: {e}", file=sys.stderr)
                return []
            if fields["id"] != job_id:
                return []
            return [decode(fields.get("enc") or "msgpack", fields["progress"])]

        try:
            self.client.subscribe_with(pubsub, self.keys.progress_channel(job_id))
            state, value, enc = self.client.r.hmget(self.keys.job(job_id), "state", "progress", "enc")
            if value is not None:
                yield decode(text(enc) or "msgpack", value)
            deadline = time.monotonic() + timeout
            while text(state) in ("queued", "active") and time.monotonic() < deadline:
                read_at = time.monotonic() + 1.0
                while (left := min(read_at, deadline) - time.monotonic()) > 0:
                    yield from published(left)
                state = self.client.r.hget(self.keys.job(job_id), "state")
            # What was published before the job finished is still buffered.
            while True:
                values = published(0.05)
                if not values:
                    break
                yield from values
        finally:
            pubsub.close()

    # lifecycle events (protocol.md 8.12) -----------------------------------

    def set_events(self, maxlen):
        """queue_control "events": the jobs submitted from now on record
        their lifecycle events ("submitted", "delayed", "started",
        "progress", "retried", "completed", "failed", "dead", "cancelled")
        in the queue's event stream, capped near `maxlen` entries (1 to
        10^9); None turns it off for jobs submitted from then on. Returns
        the previous value as stored ("" for none)."""
        if maxlen is None:
            return self.control([("events", "")])[0]
        if not (type(maxlen) is int and 1 <= maxlen <= MAX_EVENTS):
            raise ValueError(f"the event stream's length is 1 to {MAX_EVENTS}")
        return self.control([("events", str(maxlen))])[0]

    def events(self, after=None, count=1000):
        """Up to `count` entries of the queue's event stream, oldest first,
        after the entry ID `after` (None: from the oldest): a list of dicts
        with the entry's fields as str ("event", "id", and "attempt",
        "worker", "kind", "due_ms" where the event has them) and its entry
        ID as "stream_id"."""
        start = f"({after}" if after else "-"
        out = []
        for stream_id, fields in self.client.r.xrange(self.keys.events, start, "+", count=count):
            entry = {text(k): text(v) for k, v in fields.items()}
            entry["stream_id"] = text(stream_id)
            out.append(entry)
        return out

    # queue controls (protocol.md 8.9) --------------------------------------

    def control(self, changes):
        """queue_control 2: sets each control of `changes`, a list of
        (control, value) pairs ("paused" "1", "rate" "<max>:<window ms>",
        "concurrency" "<max>", "events" "<max length>"; the value "" clears
        it), in one atomic call.
        Returns their previous values, in order ("" when one was not set).
        A change that may let more jobs start (anything but a pause or
        events) pushes the queue's gate list, which wakes the workers it
        held back.
        Recoverable and reliable modes only: simple-mode workers pop jobs
        without a script, so nothing could enforce them."""
        if self.mode == "simple":
            raise ValueError("simple mode has no queue controls: its workers pop jobs without a script")
        args = [self.mode, PROTOCOL_VERSION]
        for control, value in changes:
            args += [control, value]
        call = ("queue_control", [self.keys.meta, self.keys.gate], args)
        try:
            previous = self.client.scripts(*call)
        except ProtocolError as e:
            if e.code != "JQ_QUEUE_UNKNOWN":
                raise
            # The metadata is gone (deleted, or Redis lost its data): as
            # for a submit, register the queue and send the call again.
            register(self.client.scripts, self.keys, self.mode)
            previous = self.client.scripts(*call)
        return [text(v) for v in previous]

    def pause(self):
        """Pauses the queue: from now on no worker starts a job from it
        (running jobs finish; submits and delayed jobs go on). Returns
        whether it was paused already."""
        return self.control([("paused", "1")])[0] != ""

    def resume(self):
        """Resumes the queue: the workers its pause held back start jobs at
        once. Returns whether it was paused."""
        return self.control([("paused", "")])[0] != ""

    def set_rate_limit(self, max_starts, window_ms=None):
        """At most `max_starts` (1 to 10^6) jobs start in any window of
        `window_ms` (1 to 10^12), across all the queue's workers; None
        removes the limit. Returns the previous limit as stored ("" for
        none)."""
        if max_starts is None:
            return self.control([("rate", "")])[0]
        if not (type(max_starts) is int and type(window_ms) is int and 1 <= max_starts <= MAX_LIMIT
                and 1 <= window_ms <= MAX_MS):
            raise ValueError(f"a rate limit is 1 to {MAX_LIMIT} starts per window of 1 to {MAX_MS} ms")
        return self.control([("rate", f"{max_starts}:{window_ms}")])[0]

    def set_concurrency_limit(self, max_running):
        """At most `max_running` (1 to 10^6) of the queue's jobs run at once,
        across all its workers; None removes the limit. Returns the previous
        limit as stored ("" for none). The count is the lease set's size
        (recoverable mode: jobs running when the limit is set count) or the
        running set's (reliable mode: only jobs started under a limit)."""
        if max_running is None:
            return self.control([("concurrency", "")])[0]
        if not (type(max_running) is int and 1 <= max_running <= MAX_LIMIT):
            raise ValueError(f"a concurrency limit is 1 to {MAX_LIMIT}")
        return self.control([("concurrency", str(max_running))])[0]

    def controls(self):
        """The queue's controls, read as the scripts read them (a value
        that does not parse counts as absent): {"paused": bool, "rate":
        (max, window ms) or None, "concurrency": int or None, "events": the
        event stream's length for jobs submitted now, or None}."""
        paused, rate, concurrency, events = (text(v) for v in self.client.r.hmget(
            self.keys.meta, "paused", "rate", "concurrency", "events"))
        parsed_rate = None
        m = re.fullmatch(r"([0-9]{1,15}):([0-9]{1,15})", rate or "")
        if m and 1 <= int(m.group(1)) <= MAX_LIMIT and 1 <= int(m.group(2)) <= MAX_MS:
            parsed_rate = (int(m.group(1)), int(m.group(2)))
        limit = int(concurrency) if re.fullmatch(r"[0-9]{1,15}", concurrency or "") else None
        length = int(events) if re.fullmatch(r"[0-9]{1,15}", events or "") else None
        return {"paused": paused == "1", "rate": parsed_rate,
                "concurrency": limit if limit is not None and 1 <= limit <= MAX_LIMIT else None,
                "events": length if length is not None and 1 <= length <= MAX_EVENTS else None}


class Abandoned(Exception):
    """The worker is being stopped (KeyboardInterrupt, SystemExit) while a
    handler runs: not a failure of the job (section 6.2)."""


class HandlerTimeout(BaseException):
    """Raised inside a plain-function handler when its timeout runs out. A
    BaseException, so that a handler's `except Exception` does not swallow
    it; a handler that swallows it anyway is still reported `timeout`."""


class HandlerCancelled(BaseException):
    """Raised inside a plain-function handler when its job is cancelled
    (protocol.md 8.11). A BaseException, like HandlerTimeout; whatever the
    handler does after it is discarded."""


class Attempt:
    """The cancellation of one running attempt (protocol.md 8.11), shared
    by the thread that listens on the worker's control channel and the one
    that runs the handler. `cancel` marks it cancelled and calls the
    interrupt the handler's runner registered (cancelling an asyncio task,
    or signalling the main thread), at most once."""

    def __init__(self):
        self.cancelled = threading.Event()
        self._interrupt = None
        self._lock = threading.Lock()

    def cancel(self):
        with self._lock:
            self.cancelled.set()
            interrupt, self._interrupt = self._interrupt, None
        if interrupt is not None:
            try:
                interrupt()
            except RuntimeError:
                pass  # the handler's event loop closed meanwhile: it ended

    def on_cancel(self, interrupt):
        """Registers how to stop the handler; False (nothing registered)
        when the attempt is already cancelled: do not run it."""
        with self._lock:
            if self.cancelled.is_set():
                return False
            self._interrupt = interrupt
            return True

    def done(self):
        """The handler ended: nothing to interrupt any more."""
        with self._lock:
            self._interrupt = None


class Job(dict):
    """What a handler gets about its job: a dict with "id", "attempt" and
    "enc", and, in recoverable and reliable modes, `progress(value)` and
    `cancelled()`."""

    def __init__(self, job_id, attempt, enc, worker=None, token=None, control=None):
        super().__init__(id=job_id, attempt=attempt, enc=enc)
        self._worker = worker
        self._token = token
        self._control = control

    def cancelled(self):
        """True once the job was cancelled while this attempt runs (never
        in simple mode). The worker also stops the handler (section 8.11);
        a handler that looks can end early, whatever it returns is
        discarded."""
        return self._control is not None and self._control.cancelled.is_set()

    def progress(self, value):
        """Records the job's progress (job_progress 1, under this attempt's
        fencing token): `value`, encoded in the job's encoding, becomes the
        job's progress field and is published on its progress channel.
        Raises ProtocolError when it is refused (JQ_ALREADY_FINISHED: the
        job finished or was cancelled; JQ_LEASE_LOST: another attempt took
        it over), ValueError in simple mode or when the encoded value is
        larger than the worker's maximum result size."""
        if self._token is None:
            raise ValueError("simple mode jobs have no record to keep progress in")
        worker = self._worker
        body = encode(self["enc"], value)
        if len(body) > worker.max_result_bytes:
            raise ValueError(f"progress of {len(body)} bytes exceeds the maximum of {worker.max_result_bytes} bytes")
        k = worker.keys
        worker.scripts("job_progress", [k.job(self["id"]), k.events], [self["id"], self._token, body, "publish"])


# The attempt whose plain-function handler runs on the main thread now, for
# the SIGUSR1 handler (Worker.run installs it while the worker runs).
_ON_MAIN = None


def _on_cancel_signal(_signum, _frame):
    # Raises only inside a cancelled attempt's handler: a signal that
    # arrives late (the handler returned) does nothing.
    attempt = _ON_MAIN
    if attempt is not None and attempt.cancelled.is_set():
        raise HandlerCancelled()


def run_handler(handler, payload, job, timeout_ms, attempt=None):
    """Runs `handler(payload, job)` for at most `timeout_ms` (None: no
    limit), and until `attempt` (an Attempt; None: never) is cancelled.
    Returns ("ok", value), ("timeout", None) when the timeout ran out and
    the handler was abandoned, or ("cancelled", None) when the job was
    cancelled (before or while it ran; what the handler did is discarded).
    An `async def` handler's task is cancelled; a plain function is
    interrupted with SIGALRM (timeout) or SIGUSR1 (cancel, once Worker.run
    installed its handler) when it runs on the main thread (Unix), and
    otherwise cannot be stopped: it is then reported timed out when it
    returns late, cancelled when cancelled meanwhile. Exceptions of the
    handler propagate."""
    attempt = attempt or Attempt()
    if inspect.iscoroutinefunction(handler):
        async def supervise():
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            if not attempt.on_cancel(lambda: loop.call_soon_threadsafe(stop.set)):
                return "cancelled", None
            task = asyncio.ensure_future(handler(payload, job))
            stopped = asyncio.ensure_future(stop.wait())
            try:
                done, _ = await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED,
                                             timeout=None if timeout_ms is None else timeout_ms / 1000)
            finally:
                attempt.done()
                stopped.cancel()
            if task in done and not attempt.cancelled.is_set():
                return "ok", task.result()
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - the abandoned handler's end is not its outcome
                pass
            return ("cancelled" if attempt.cancelled.is_set() else "timeout"), None

        return asyncio.run(supervise())
    global _ON_MAIN
    on_main = threading.current_thread() is threading.main_thread()
    interruptible = (on_main and signal.getsignal(signal.SIGUSR1) is _on_cancel_signal
                     if hasattr(signal, "SIGUSR1") else False)
    main_ident = threading.get_ident()
    # Armed before the interrupt is registered: a signal sent at once
    # finds the attempt.
    if interruptible:
        _ON_MAIN = attempt
    try:
        if not attempt.on_cancel((lambda: signal.pthread_kill(main_ident, signal.SIGUSR1)) if interruptible else None):
            return "cancelled", None
        status, value = _run_plain(handler, payload, job, timeout_ms, on_main)
    except HandlerCancelled:
        status, value = "cancelled", None
    except Exception:
        # A cancelled handler that raised something else: what the
        # cancellation made it do is not its outcome.
        if attempt.cancelled.is_set():
            return "cancelled", None
        raise
    finally:
        _ON_MAIN = None
        attempt.done()
    if attempt.cancelled.is_set():
        return "cancelled", None
    return status, value


def _run_plain(handler, payload, job, timeout_ms, on_main):
    """run_handler for a plain function: ("ok", value) or ("timeout", None)."""
    if timeout_ms is None:
        return "ok", handler(payload, job)
    if not on_main or not hasattr(signal, "setitimer"):
        started = time.monotonic()
        value = handler(payload, job)
        return ("timeout", None) if (time.monotonic() - started) * 1000 > timeout_ms else ("ok", value)
    fired = False

    def on_alarm(_signum, _frame):
        nonlocal fired
        fired = True
        raise HandlerTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_ms / 1000)
        try:
            value = handler(payload, job)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except HandlerTimeout:
        return "timeout", None
    except Exception:
        # The handler caught the alarm and raised something else: what the
        # abandonment made it do is not its outcome (section 6.2, item 6).
        if fired:
            return "timeout", None
        raise
    finally:
        signal.signal(signal.SIGALRM, previous)
    # The alarm fired but the handler caught it and returned: it overran.
    return ("timeout", None) if fired else ("ok", value)


class Worker:
    """Runs `handler(payload, job)` on one queue, one job at a time
    (sections 7.2, 8.4 and 9.1). `job` is a Job: a dict with id, attempt,
    enc, and (recoverable and reliable modes) progress() and cancelled(). The
    handler is a plain function or an `async def` (run to completion with
    asyncio.run). An exception fails the attempt, which is retried (while
    attempts are left) after the job's backoff; RetryAfter chooses the
    delay, NoRetry fails the job at once.

    Delayed jobs: the worker calls job_promote when it starts, before each
    blocking wait, and between jobs whenever the next delayed job is due or
    `block_s` has passed, and cuts each blocking wait short when the next
    delayed job is due. It calls it with keeper ms 0: it never takes the
    timekeeper role (one job at a time: as the timekeeper it would delay
    promotions while its handler runs), never waits on the clock list, and
    never fires recurring schedules; those are left to workers that do (the
    Rust workers). Alone on a queue, it runs a delayed job no earlier than
    it is due and, when idle, at most about `block_s` late.

    Queue controls (section 8.9): a job_claim or reliable_start call that
    the queue's gate (pause, rate or concurrency limit) held back makes the
    worker "held": it no longer claims, nor blocks on the tickets
    (recoverable) or BLMOVEs from the pending list (reliable), but blocks
    on the queue's gate list, until it is pushed (a resume, a limit
    changed, a slot given back) or the hold's time to ask again comes (a
    rate limit's wait, at most `block_s`: a wake-up can be lost with a
    connection). Then it calls the start script again with "held" 1,
    which passes the wake-up on when room is left. A call that is not held
    back ends the hold.

    Cancellation (section 8.11, recoverable and reliable modes): before it
    takes a job the worker subscribes to its control channel, which a
    thread of its own reads. A cancel for the job it runs stops the handler
    (see run_handler) and its outcome is not recorded: job_cancel finished
    the job. One for a job it does not run (yet) is kept for a minute, in
    case the attempt it is about starts after the message arrived. A
    message lost while the connection was down is looked for: after each
    reconnection the thread reads the running job's state. In reliable
    mode the ID of a job whose outcome was not recorded (cancelled, or
    refused with JQ_ALREADY_FINISHED) stays in the in-flight list: the
    worker starts it again from "inflight", and reliable_start drops it.

    Settings (section 18) keep this library's and the Rust library's
    defaults, except `block_s`: this worker renews its heartbeat on the
    thread that blocks, so the block timeout must stay well below a third of
    the lease. `timeout_ms`: the handler timeout of jobs without one of
    their own (None: no limit), independent of the lease."""

    def __init__(self, url, queue, mode, handler, prefix="jq", lease_ms=30000, max_stalls=3,
                 result_ttl_ms=86_400_000, block_s=1.0, dead_max=10_000, max_result_bytes=1024 * 1024,
                 timeout_ms=None):
        if not 0 < block_s * 1000 < lease_ms / 3:
            raise ValueError("block_s must be positive and below a third of the lease")
        if timeout_ms is not None and not 1 <= timeout_ms <= MAX_MS:
            raise ValueError(f"timeout_ms must be None or 1 to {MAX_MS}")
        self.timeout_ms = timeout_ms
        self.r = redis.Redis.from_url(url)
        self.scripts = Scripts(self.r)
        self.keys = Keys(prefix, queue)
        self.mode = mode
        self.handler = handler
        self.id = uuid.uuid4().hex
        self.lease_ms = lease_ms
        self.max_stalls = max_stalls
        self.ttl = result_ttl_ms
        self.block_s = block_s
        self.dead_max = dead_max
        self.max_result_bytes = max_result_bytes
        # Sweep and recovery: every half lease, with a guard of the same
        # length; dead workers are remembered for ten TTLs, at least a minute.
        self.sweep_ms = max(lease_ms // 2, 10)
        self.retention_ms = max(lease_ms * 10, 60_000)
        self.last_sweep = 0.0
        self.registered = False
        # When to call job_promote next at the latest (time.monotonic()).
        self.promote_at = 0.0
        # Why the queue's gate held this worker back at its last start call
        # ("paused", "concurrency", "rate"; None: not held), and when to
        # ask again without a wake-up (time.monotonic()).
        self.held = None
        self.ask_at = 0.0
        # Cancellation (section 8.11): the running attempt (job ID, Attempt),
        # cancels that came for jobs not running (ID -> when), and the
        # thread that reads the control channel.
        self.lock = threading.Lock()
        self.running = None
        self.early_cancels = {}
        self.listening = None
        register(self.scripts, self.keys, mode)

    def run(self, count=None, idle_exit_s=None):
        """Processes jobs until `count` jobs ran, or nothing came for
        `idle_exit_s` seconds. Returns how many ran."""
        done, idle_since = 0, time.monotonic()
        previous_usr1 = None
        if self.mode != "simple":
            # Subscribed before the first start: a cancel is never missed.
            self.listen_for_cancels()
            if threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_kill"):
                previous_usr1 = signal.signal(signal.SIGUSR1, _on_cancel_signal)
        if self.mode == "reliable":
            self.heartbeat()
        try:
            self.promote()
            while count is None or done < count:
                ran = {"simple": self.simple_once, "recoverable": self.recoverable_once, "reliable": self.reliable_once}[self.mode]()
                if ran:
                    done += ran
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
        finally:
            if self.mode == "reliable":
                # Leave: anything still in flight goes back at once, and the
                # worker is marked dead (recovery finds anything moved into
                # its list later; the retention then forgets it).
                k = self.keys
                self.scripts("reliable_requeue_worker", [k.workers, k.inflight(self.id), k.pending, k.running, k.gate],
                             [self.id, "0", str(self.retention_ms)])
            # Nothing to give up at exit: it never holds the timekeeper role.
            if self.listening is not None:
                stop, thread = self.listening
                stop.set()
                thread.join()
                self.listening = None
            if previous_usr1 is not None:
                signal.signal(signal.SIGUSR1, previous_usr1)
        return done

    # cancellation (protocol.md 8.11) ---------------------------------------

    def listen_for_cancels(self):
        """Subscribes to this worker's control channel and starts the
        thread that reads it."""
        pubsub = self.r.pubsub()
        Client.subscribe_with(pubsub, self.keys.worker_channel(self.id))
        stop = threading.Event()
        thread = threading.Thread(target=self.read_control, args=(pubsub, stop), daemon=True,
                                  name=f"control {self.id}")
        self.listening = (stop, thread)
        thread.start()

    def read_control(self, pubsub, stop):
        """The control channel's thread: applies each cancel (a message
        {"id", "status": "cancelled"}; others are ignored) until `stop`.
        redis-py reconnects and subscribes again by itself after a
        connection error; a cancel published meanwhile may be lost, so the
        running job's state is read after each error."""
        try:
            while not stop.is_set():
                try:
                    message = pubsub.get_message(timeout=0.5)
                except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                    print(f"control channel: {e}; reconnecting", file=sys.stderr)
                    stop.wait(0.2)
                    self.check_running()
                    continue
                if message is None or message["type"] != "message":
                    continue
                try:
                    control = read_record(REPLY, message["data"])
                except InvalidRecord as e:
                    print(f"ignoring an invalid control message: {e}", file=sys.stderr)
                    continue
                if control["status"] == "cancelled":
                    self.cancelled(control["id"])
        finally:
            pubsub.close()

    def cancelled(self, job_id):
        """A cancel for `job_id`: its attempt is stopped if it runs, else the
        cancel is kept (a minute) for an attempt that registers later."""
        with self.lock:
            running = self.running
            if running is None or running[0] != job_id:
                now = time.monotonic()
                self.early_cancels = {i: t for i, t in self.early_cancels.items() if now - t < 60}
                self.early_cancels[job_id] = now
                return
        print(f"job {job_id} cancelled while it ran", file=sys.stderr)
        running[1].cancel()

    def check_running(self):
        """Reads the running job's state: one that was cancelled (failed,
        kind "cancelled") is stopped, for a control message may have been
        lost."""
        with self.lock:
            running = self.running
        if running is None:
            return
        try:
            state, kind = (text(v) for v in self.r.hmget(self.keys.job(running[0]), "state", "error_kind"))
        except redis.RedisError as e:
            print(f"cannot read the state of {running[0]}: {e}", file=sys.stderr)
            return
        if state == "failed" and kind == "cancelled":
            running[1].cancel()

    def attempt(self, job_id):
        """Registers the attempt of `job_id` that starts now: an Attempt,
        already cancelled when a cancel for it came first."""
        attempt = Attempt()
        with self.lock:
            self.running = (job_id, attempt)
            if self.early_cancels.pop(job_id, None) is not None:
                attempt.cancelled.set()
        return attempt

    def attempt_ended(self):
        with self.lock:
            self.running = None

    # delayed jobs ----------------------------------------------------------

    def promote(self):
        """Moves the queue's due delayed jobs to pending (job_promote, in
        batches of PROMOTE_LIMIT) and sets when to call again: when the next
        delayed job is due, at the latest after `block_s` (a job delayed
        meanwhile by someone else, which this worker does not hear of).
        Keeper ms 0: the call never takes the timekeeper role, and gives it
        up only if this worker held it (it never takes it)."""
        k = self.keys
        while True:
            try:
                # The reply goes on with the keeper flag (always 0 here),
                # when the next recurring schedule is due and the server's
                # time: this worker fires no schedules.
                moved, next_in = self.scripts(
                    "job_promote", [k.meta, k.delayed, k.pending, k.tickets, k.timekeeper, k.clock, k.schedules],
                    [self.mode, PROTOCOL_VERSION, self.id, str(PROMOTE_LIMIT), "0"])[:2]
            except ProtocolError as e:
                # Not this worker's to fix (a key of another type, say): it
                # serves what is on pending meanwhile, and tries again later.
                print(f"job_promote refused: {e}", file=sys.stderr)
                moved, next_in = 0, -1
            if moved < PROMOTE_LIMIT:
                break  # else more are due: the next batch at once
        wait_s = self.block_s if next_in < 0 else min(next_in / 1000, self.block_s)
        self.promote_at = time.monotonic() + wait_s

    def promote_if_due(self):
        """job_promote when the next delayed job is due, or `block_s` has
        passed: a busy worker, which never blocks, still moves due jobs."""
        if time.monotonic() >= self.promote_at:
            self.promote()

    def wait_s(self):
        """Before a blocking wait: job_promote, then the block timeout in
        seconds, cut short when the next delayed job is due (1 ms at least:
        0 would block forever). The job is promoted by the call before the
        next wait."""
        self.promote()
        return min(self.block_s, max(self.promote_at - time.monotonic(), 0.001))

    # the queue's gate (protocol.md 8.9) ------------------------------------

    def note_gate(self, reason, wait_ms):
        """Remembers what a start call (job_claim, reliable_start) said of
        the queue's gate: `reason` "" when it held nothing back (any hold
        ends), else why it held this worker back, and `wait_ms`: for a rate
        limit with no room at all, how long until the next start may pass;
        -1 (anything else): until the gate list is pushed. Either way the
        worker asks again after `block_s` at the latest: a wake-up can be
        lost with a connection (the Rust worker's block timeout)."""
        if not reason:
            self.held = None
            return
        wait_s = self.block_s if wait_ms < 0 else min(wait_ms / 1000, self.block_s)
        self.held = reason
        self.ask_at = time.monotonic() + wait_s

    def may_ask(self):
        """True when the worker may call the start script: it is not held,
        or its time to ask again came (or the gate list woke it)."""
        return self.held is None or time.monotonic() >= self.ask_at

    def wait_gate(self):
        """Held back: blocks on the queue's gate list, never on its tickets
        or pending list, until it is pushed or the time to ask again comes
        (cut short, like every blocking wait, when the next delayed job is
        due). Popping the entry takes the wake-up: the next start call
        (with "held" 1) pushes it again when it leaves room, for the next
        held worker."""
        timeout = min(self.wait_s(), max(self.ask_at - time.monotonic(), 0.001))
        if self.r.execute_command("BLMPOP", timeout, 1, self.keys.gate, "LEFT", "COUNT", 1):
            self.ask_at = time.monotonic()  # more jobs may start: ask at once

    def execute(self, job_id, enc, body, attempt, timeout_ms=0, token=None):
        """Decodes, runs the handler, encodes: ("completed", bytes) or
        ("failed", kind, message, retryable, retry delay ms), with the
        failure kinds of section 6.2; the retry delay is -1 (the job's
        backoff decides) unless the handler raised RetryAfter; or
        ("cancelled",) when the job was cancelled before or while the
        handler ran (recoverable and reliable modes: nothing to record).
        `timeout_ms`: the job's own handler timeout (0: the worker's
        default); `token`: the attempt's fencing token (None in simple
        mode), for job.progress. Raises Abandoned when the worker is being
        stopped."""
        job_id = text(job_id)  # the start scripts run UTF-8 IDs only
        limit = timeout_ms or self.timeout_ms
        control = self.attempt(job_id) if token is not None else None
        try:
            return self.execute_attempt(job_id, enc, body, attempt, limit, token, control)
        finally:
            if control is not None:
                self.attempt_ended()

    def execute_attempt(self, job_id, enc, body, attempt, limit, token, control):
        if control is not None and control.cancelled.is_set():
            return ("cancelled",)  # the cancel came before the attempt started
        try:
            payload = decode(enc, body)
        except Exception as e:  # noqa: BLE001 - any undecodable input fails the job
            return ("failed", "decode", f"cannot decode payload ({enc!r}): {e}", False, -1)
        job = Job(job_id, attempt, enc, self, token, control)
        try:
            status, value = run_handler(self.handler, payload, job, limit, control)
            if status == "cancelled":
                return ("cancelled",)
            if status == "timeout":
                # Abandoned; retried like a failure of the handler (8.4 step 6).
                return ("failed", "timeout", f"the handler ran longer than its timeout of {limit} ms", True, -1)
        except HandlerCancelled:
            return ("cancelled",)  # the cancel's signal came as run_handler ended
        except RetryAfter as e:
            # The handler's own delay replaces the backoff (no jitter).
            return ("failed", "handler", e.message, True, e.delay_ms)
        except NoRetry as e:
            return ("failed", "handler", e.message, False, -1)
        except Exception as e:  # noqa: BLE001 - every exception the handler raises is its own failure
            return ("failed", "handler", f"{type(e).__name__}: {e}", True, -1)
        except (KeyboardInterrupt, SystemExit) as e:
            raise Abandoned(type(e).__name__) from e
        except BaseException as e:  # noqa: BLE001 - not meant to be caught: the handler crashed
            return ("failed", "panic", f"{type(e).__name__}: {e}", True, -1)
        if control is not None and control.cancelled.is_set():
            return ("cancelled",)  # cancelled as it returned: discarded
        try:
            result = encode(enc, value)
        except Exception as e:  # noqa: BLE001
            return ("failed", "encode", str(e), False, -1)
        if len(result) > self.max_result_bytes:
            return ("failed", "too_large",
                    f"result of {len(result)} bytes exceeds the maximum of {self.max_result_bytes} bytes", False, -1)
        return ("completed", result)

    # simple mode -----------------------------------------------------------

    def simple_once(self):
        self.promote_if_due()
        entry = self.r.rpop(self.keys.pending)
        if entry is None:
            popped = self.r.execute_command("BLMPOP", self.wait_s(), 1, self.keys.pending, "RIGHT", "COUNT", 1)
            if not popped:
                return 0
            entry = popped[1][0]
        try:
            # Optional fields of the wrong type are absent; a reply that is
            # text but not a channel of this queue makes the entry invalid.
            envelope = read_record(ENVELOPE, entry)
            if "reply" in envelope and not self.keys.owns_reply_channel(envelope["reply"]):
                raise InvalidRecord("reply is not a reply channel of this queue")
        except InvalidRecord as e:
            # Not a job: its client is told when it can be, and the entry is
            # kept, with the reason.
            client = envelope_client(entry, self.keys)
            if client is not None:
                self.send_reply(client[0], client[1], None,
                                ("failed", "decode", f"invalid job envelope: {e}", False, -1))
            record = pack_record(DEAD, {"reason": f"invalid job envelope: {e}", "entry": entry, "at_ms": now_ms()})
            self.scripts("simple_dead", [self.keys.dead], [record, str(self.dead_max)])
            return 1
        job_id, enc, reply = envelope["id"], envelope["enc"], envelope.get("reply")
        try:
            # timeout_ms: absent (or of the wrong type, 6.4) is the worker's default.
            outcome = self.execute(job_id, enc, envelope["payload"], 1, envelope.get("timeout_ms", 0))
        except Abandoned:
            if reply is not None:
                self.send_reply(job_id, reply, enc,
                                ("failed", "shutdown", "worker shut down before the job finished", False, -1))
            raise
        if reply is not None:
            self.send_reply(job_id, reply, enc, outcome)
        return 1

    def send_reply(self, job_id, channel, enc, outcome):
        if outcome[0] == "completed":
            message = {"id": job_id, "status": "completed", "enc": enc, "result": outcome[1]}
        else:
            message = {"id": job_id, "status": "failed", "error": {"kind": outcome[1], "message": outcome[2]}}
        self.scripts("simple_reply", [self.keys.meta], [channel, pack_record(REPLY, message)])

    # recoverable mode ------------------------------------------------------

    def sweep(self):
        # The guard equals the interval (section 18).
        if time.monotonic() - self.last_sweep < self.sweep_ms / 1000:
            return
        self.last_sweep = time.monotonic()
        k = self.keys
        if self.mode == "recoverable":
            # job_requeue_stale 3: a requeued job frees a slot of a
            # concurrency limit, so the script pushes the gate list.
            self.scripts("job_requeue_stale", [k.leases, k.pending, k.tickets, k.sweep, k.gate],
                         [str(self.sweep_ms), "1000"])
        else:
            dead = self.scripts("reliable_find_dead", [k.workers, k.sweep], [str(self.sweep_ms), "100"])
            if isinstance(dead, list):
                # Worker IDs are bytes: the set may hold members another
                # program wrote.
                for worker in dead:
                    if worker != self.id.encode():
                        self.scripts("reliable_requeue_worker",
                                     [k.workers, k.inflight(worker), k.pending, k.running, k.gate],
                                     [worker, "1", str(self.retention_ms)])

    def claim(self, tickets_taken):
        """job_claim 4 of one job (this worker has one slot): (id, token,
        limited) or None. Its reply starts with what the queue's gate did
        (hold reason, wait ms, limited), which note_gate records; "held" 1
        when the last call was held back. A ticket this worker popped
        (`tickets_taken` 1) whose job the gate held back is pushed back by
        the script."""
        k = self.keys
        reply = self.scripts("job_claim", [k.pending, k.tickets, k.leases, k.fence, k.meta, k.rate, k.gate],
                             ["1", str(self.lease_ms), str(tickets_taken), "1" if self.held else "0"])
        self.note_gate(text(reply[0]), int(reply[1]))
        if len(reply) < 5:
            return None
        # limited: the queue has a concurrency limit; job_start marks the
        # job's slot, so that its finish wakes a worker the limit held back.
        return reply[3], text(reply[4]), text(reply[2])

    def recoverable_once(self):
        k = self.keys
        self.sweep()
        self.promote_if_due()
        if not self.may_ask():
            # Held back by the queue's gate: no claim, no ticket wait.
            self.wait_gate()
            return 0
        claimed = self.claim(0)
        if not claimed:
            if self.held:
                return 0  # the gate held it back: the next call waits on the gate list
            # The block timeout is in seconds, as Redis takes it.
            if not self.r.execute_command("BLMPOP", self.wait_s(), 1, k.tickets, "RIGHT", "COUNT", 1):
                return 0
            # After a ticket: ask for every free slot (one here), tickets taken 1.
            claimed = self.claim(1)
            if not claimed:
                return 0
        # The ID as bytes: job_start never runs one that is not UTF-8.
        job_id, token, limited = claimed
        # job_start 12: the event stream after the dead-letter set;
        # "limited" (from job_claim) before the id/token pairs.
        start = self.scripts("job_start", [k.leases, k.dead_jobs, k.events, k.job(job_id)],
                             [str(self.lease_ms), str(self.max_stalls), self.id, str(self.ttl), str(self.dead_max),
                              "publish", limited, job_id, token])[0]
        if text(start[0]) != "run":
            return 1
        # The sixth element of job_start's decision is the job's lease in
        # ms (reliable_start's is the token): this worker does not renew
        # leases, so its jobs must end within it.
        self.run_started(job_id, token, start, k.leases)
        return 1

    def run_started(self, job_id, token, start, claim):
        """Runs a started job and records its outcome; gives it back when
        the worker is stopped meanwhile. A job cancelled meanwhile has its
        outcome already (job_cancel): nothing is recorded."""
        try:
            outcome = self.execute(job_id, text(start[1]), start[2], int(start[3]), start_timeout(start), token)
        except Abandoned:
            k = self.keys
            try:
                # job_release 5: a job with a slot gives it back (running
                # set, gate list).
                self.scripts("job_release", [k.job(job_id), claim, k.pending, k.tickets, k.running, k.gate],
                             [job_id, token, self.mode])
            except ProtocolError as e:
                print(f"could not give {text(job_id)} back: {e}", file=sys.stderr)
            raise
        if outcome[0] == "cancelled":
            print(f"job {text(job_id)} was cancelled: nothing recorded", file=sys.stderr)
            self.unrecorded(job_id)
            return
        self.finish(job_id, token, outcome, claim)

    def unrecorded(self, job_id):
        """Reliable mode, after a job whose outcome was not recorded (it was
        cancelled, or job_finish refused it because it had finished): its
        ID may still be in this worker's in-flight list. It is started
        again from "inflight" (section 9.1 step 4): reliable_start, finding
        the job finished, drops it ("gone"); an ID no longer there is
        "missed". Recoverable mode: job_cancel dropped the lease itself."""
        if self.mode == "reliable":
            self.reliable_start_one("inflight", job_id)

    def finish(self, job_id, token, outcome, claim):
        k = self.keys
        # job_finish 13: the retry delay comes last, ARGV[10] ("-1": the
        # job's backoff).
        if outcome[0] == "completed":
            args = [job_id, token, "completed", outcome[1], "", "0", str(self.ttl), self.mode, "publish", "-1"]
        else:
            args = [job_id, token, "failed", outcome[1], outcome[2], "1" if outcome[3] else "0", str(self.ttl),
                    self.mode, "publish", str(outcome[4])]
        try:
            # job_finish 13: a job with a slot gives it back (it leaves the
            # running set in reliable mode; the gate list is pushed); the
            # event stream comes last.
            self.scripts("job_finish", [k.job(job_id), claim, k.pending, k.tickets, k.delayed, k.clock, k.running,
                                        k.gate, k.events], args)
        except ProtocolError as e:
            if e.code not in ("JQ_LEASE_LOST", "JQ_ALREADY_FINISHED"):
                raise
            print(f"outcome of {text(job_id)} refused: {e}", file=sys.stderr)
            if e.code == "JQ_ALREADY_FINISHED":
                # Cancelled as it ended, say (a refusal writes nothing).
                self.unrecorded(job_id)

    # reliable mode ---------------------------------------------------------

    def heartbeat(self):
        alive = self.scripts("reliable_heartbeat", [self.keys.workers], [self.id, str(self.lease_ms)])
        if not alive and self.registered:
            # Declared dead (paused past its TTL): recovery may have put its
            # in-flight IDs back. It is registered again from this call on.
            # This worker runs one job at a time, between heartbeats, so it
            # holds no running job here (section 9.1, step 2).
            print(f"worker {self.id} was declared dead; registered again", file=sys.stderr)
        self.registered = True

    def reliable_once(self):
        k = self.keys
        self.heartbeat()
        self.sweep()
        self.promote_if_due()
        if not self.may_ask():
            # Held back by the queue's gate: no BLMOVE from pending.
            self.wait_gate()
            return 0
        inflight = k.inflight(self.id)
        # One slot: look at the oldest ID waiting and take it with the
        # start; when nothing waits, block on BLMOVE.
        # IDs stay bytes: reliable_start never runs one that is not UTF-8.
        seen = self.r.lrange(k.pending, -1, -1)
        if seen:
            source, job_id = "pending", seen[0]
        else:
            moved = self.r.execute_command("BLMOVE", k.pending, inflight, "RIGHT", "LEFT", self.wait_s())
            if moved is None:
                return 0
            source, job_id = "inflight", moved
        return self.reliable_start_one(source, job_id)

    def reliable_start_one(self, source, job_id):
        """reliable_start of one ID from `source`, and runs it when the
        decision is "run": 1 when it was taken (run, or not to be run), 0
        when the gate held it back or another worker took it first."""
        k = self.keys
        inflight = k.inflight(self.id)
        # reliable_start 12: the gate's keys before the job's, the event
        # stream last of them, and "held" 1 when the last call was held back.
        start = self.scripts("reliable_start",
                             [inflight, k.dead_jobs, k.fence, k.pending, k.meta, k.running, k.rate, k.gate,
                              k.events, k.job(job_id)],
                             [str(self.max_stalls), self.id, str(self.ttl), str(self.dead_max), "publish",
                              source, "1" if self.held else "0", job_id])[0]
        decision = text(start[0])
        if decision == "held":
            # The gate held it back: it waits on pending (moved back there
            # from "inflight"), and this worker on the gate list.
            self.note_gate(text(start[1]), int(start[2]))
            return 0
        self.note_gate("", -1)
        if decision == "missed":
            return 0  # another worker took it first: look again
        if decision != "run":
            return 1
        token = text(start[5])  # reliable_start: the sixth element is the token
        self.run_started(job_id, token, start, inflight)
        return 1


def start_timeout(start):
    """The seventh element of a `run` decision (job_start 12, reliable_start
    12): the job's own handler timeout in ms, 0 for none (the worker's
    default). Anything that is not an integer from 1 to 10^12 counts as 0."""
    try:
        ms = int(text(start[6]))
    except (IndexError, ValueError):
        return 0
    return ms if 1 <= ms <= MAX_MS else 0


# The interop payload: the same value as `Sample::new()` in tests/interop.rs.
def sample(enc):
    return {
        "name": "zoë ✓ 日本語 🚀",
        "nested": {"a": [1, -2, 3], "b": []},
        "list": ["x", "", "y z"],
        "big": 2**64 - 1,
        "neg": -(2**63),
        "bytes": bytes(range(256)) if enc == "msgpack" else list(range(256)),
        "flag": True,
        "nothing": None,
        "ratio": 0.25,
    }


def interop_handler(payload, job):
    """Checks what arrived, and answers with an echo."""
    expected = sample(job["enc"])
    if payload != expected:
        raise ValueError(f"payload differs from the sample: {payload!r}")
    return {"ok": True, "echo": payload, "seen_by": "python"}


# The timeout interop jobs: {"name": str, "sleep_ms": int}. The handler
# sleeps, then answers "slept <name>"; `nap_handler` is an `async def` (its
# task is cancelled when its timeout runs out), `nap_sync_handler` a plain
# function (interrupted by SIGALRM).
async def nap_handler(payload, job):
    await asyncio.sleep(payload["sleep_ms"] / 1000)
    return f"slept {payload['name']}"


def nap_sync_handler(payload, job):
    time.sleep(payload["sleep_ms"] / 1000)
    return f"slept {payload['name']}"


# The delayed-job interop jobs: {"name": str}. The handler answers when it
# ran, on this machine's clock (the tests run Redis on the same machine, so
# that it is the server's too): {"name", "ran_ms", "attempt"}.
def clock_handler(payload, job):
    return {"name": payload["name"], "ran_ms": now_ms(), "attempt": job["attempt"]}


# The retry interop jobs: {"name": str, "plan": [str, ...]}. Attempt n does
# plan[n - 1]: "fail" (an exception: retried after the job's backoff),
# "retry-after:<ms>" (RetryAfter) or "no-retry" (NoRetry); an attempt past
# the plan completes with {"name", "runs"}: when each attempt of the job
# that this worker ran started (ms, this machine's clock).
RUNS = {}


def plan_handler(payload, job):
    runs = RUNS.setdefault(job["id"], [])
    runs.append(now_ms())
    plan = payload.get("plan", [])
    step = plan[job["attempt"] - 1] if job["attempt"] <= len(plan) else "ok"
    if step == "fail":
        raise RuntimeError(f"planned failure of attempt {job['attempt']}")
    if step.startswith("retry-after:"):
        raise RetryAfter(int(step.split(":", 1)[1]) / 1000, "planned: retry after a delay")
    if step == "no-retry":
        raise NoRetry("planned: no retry")
    return {"name": payload["name"], "runs": runs}


# The progress interop jobs: {"name": str, "steps": int, "gap_ms": int}.
# The handler reports {"step": n, "of": steps} for n = 1 to steps, sleeping
# gap_ms after each (so the last report is read before the job finishes),
# then answers {"name", "steps"}.
def progress_handler(payload, job):
    steps = payload["steps"]
    for n in range(1, steps + 1):
        job.progress({"step": n, "of": steps})
        time.sleep(payload["gap_ms"] / 1000)
    return {"name": payload["name"], "steps": steps}


HANDLERS = {"interop": interop_handler, "nap": nap_handler, "nap-sync": nap_sync_handler,
            "clock": clock_handler, "plan": plan_handler, "progress": progress_handler}

# What `client-timeouts` submits, with a worker whose default timeout is
# 500 ms (tests/interop.rs): (name, sleep ms, own timeout ms, max attempts,
# expected outcome). "own" times out by its own 300 ms timeout and, in
# recoverable and reliable modes, runs twice (retried like `handler`);
# "default" has no timeout of its own and times out by the worker's
# default; "longer" has a timeout longer than the worker's default and
# completes.
TIMEOUT_JOBS = (("own", 10_000, 300, 2, "timeout"), ("default", 10_000, 0, 1, "timeout"),
                ("longer", 800, 5_000, 1, "slept longer"))


def client_timeouts(url, queue_name, mode):
    """Submits TIMEOUT_JOBS and checks their outcomes; 0 when all agree."""
    queue = Client(url).queue(queue_name, mode)
    ids = {name: queue.submit({"name": name, "sleep_ms": sleep_ms}, timeout_ms=own, max_attempts=attempts)
           for name, sleep_ms, own, attempts, _ in TIMEOUT_JOBS}
    failures = 0
    for name, _, _, _, want in TIMEOUT_JOBS:
        try:
            got = queue.result(ids[name], timeout=30)
        except JobFailed as e:
            got = e.kind
        if got != want:
            print(f"job {name}: got {got!r}, want {want!r}", file=sys.stderr)
            failures += 1
    if mode != "simple":
        # The job that timed out by its own timeout was retried once.
        attempts = text(queue.client.r.hget(queue.keys.job(ids["own"]), "attempt"))
        if attempts != "2":
            print(f"job own: attempt {attempts!r}, want '2'", file=sys.stderr)
            failures += 1
    print(f"checked {len(TIMEOUT_JOBS)} timeout outcomes, {failures} wrong")
    return 1 if failures else 0


# What `client-delayed` submits to a Rust worker that answers like
# clock_handler ({"name", "ran_ms", "attempt"}) and fails the first attempt
# of a job whose payload has "fail_first": (name, delay ms, run at ms from
# now (None: no run-at time), max attempts, backoff). "past" has a run-at
# time a minute ago and runs at once; "retry" (recoverable and reliable
# modes) fails once and runs again after its fixed backoff of 400 ms.
DELAYED_JOBS = (("now", 0, None, 1, None), ("d300", 300, None, 1, None), ("d800", 800, None, 1, None),
                ("at500", 0, 500, 1, None), ("past", 0, -60_000, 1, None),
                ("retry", 0, None, 2, ("fixed", 400)))


def client_delayed(url, queue_name, mode):
    """Submits DELAYED_JOBS and checks that none ran before it was due, nor
    long after; 0 when all agree. Times are compared with 1 ms to spare:
    this process and Redis read the same clock, but round it apart."""
    queue = Client(url).queue(queue_name, mode)
    r = queue.client.r
    jobs = {}
    for name, delay, run_at, attempts, backoff in DELAYED_JOBS:
        if backoff and mode == "simple":
            continue  # no retries in simple mode
        policy = backoff_policy(*backoff) if backoff else ""
        sent = now_ms()
        run_at_ms = sent + run_at if run_at is not None else 0
        job_id = queue.submit({"name": name, "fail_first": bool(backoff)}, max_attempts=attempts,
                              delay_ms=delay, run_at_ms=run_at_ms, backoff=policy)
        # When it is due: between these two (its run-at time, exactly;
        # one in the past is due at once).
        submitted = now_ms()
        earliest, latest = (run_at_ms, max(run_at_ms, submitted)) if run_at_ms else (sent + delay, submitted + delay)
        jobs[name] = (job_id, earliest, latest, policy)
    failures = 0

    def wrong(name, problem):
        nonlocal failures
        print(f"job {name}: {problem}", file=sys.stderr)
        failures += 1

    for name, (job_id, earliest, latest, _) in jobs.items():
        if mode != "simple" and earliest > now_ms() + 100:
            # Still delayed: its hash says when it is due (server time),
            # and the delayed set holds its ID with that score.
            due_ms = int(text(r.hget(queue.keys.job(job_id), "due_ms")) or 0)
            if not earliest - 1 <= due_ms <= latest + 1:
                wrong(name, f"due_ms {due_ms}, want {earliest} to {latest}")
            if r.zscore(queue.keys.delayed, job_id) != due_ms:
                wrong(name, "not in the delayed set with its due time")
    for name, (job_id, earliest, latest, policy) in jobs.items():
        try:
            got = queue.result(job_id, timeout=30)
        except (JobFailed, TimeoutError) as e:
            wrong(name, f"no result: {e}")
            continue
        ran = got["ran_ms"]
        if name == "retry":
            # The second attempt, due 400 ms after the first failed: after
            # the submit, and no later than it ran.
            due_ms, stored = (text(v) for v in r.hmget(queue.keys.job(job_id), "due_ms", "backoff"))
            due_ms = int(due_ms or 0)
            if got["attempt"] != 2 or stored != policy or not earliest + 400 - 1 <= due_ms <= ran + 1:
                wrong(name, f"attempt {got['attempt']}, due_ms {due_ms}, ran {ran}, backoff {stored!r}")
        elif not earliest - 1 <= ran <= latest + 5000:
            wrong(name, f"ran at {ran}, due from {earliest} to {latest}")
    print(f"checked {len(jobs)} delayed jobs, {failures} wrong")
    return 1 if failures else 0


def wait_state(queue, job_id, want, seconds=10.0):
    """Waits until job `job_id`'s state is `want`; False when it is not
    within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text(queue.client.r.hget(queue.keys.job(job_id), "state")) == want:
            return True
        time.sleep(0.01)
    return False


def client_cancel(url, queue_name, mode):
    """Against a Rust worker that runs one job at a time, whose handler
    sleeps like nap_handler ({"name", "sleep_ms"}, answering "slept
    <name>") and stops when its job is cancelled: cancels a running job,
    a queued one, a delayed one and a missing one in one call, checks what
    their clients read, that a second cancel changes nothing, and that the
    worker then runs the next job. 0 when all agree."""
    queue = Client(url).queue(queue_name, mode)
    r = queue.client.r
    failures = 0

    def wrong(problem):
        nonlocal failures
        print(problem, file=sys.stderr)
        failures += 1

    long = queue.submit({"name": "long", "sleep_ms": 30_000})
    queued = queue.submit({"name": "queued", "sleep_ms": 10})
    later = queue.submit({"name": "later", "sleep_ms": 10}, delay_ms=60_000)
    if not wait_state(queue, long, "active"):
        wrong("job long never started")
    missing = str(uuid.uuid4())
    got = queue.cancel([long, queued, later, missing])
    want = [("cancelled", "active"), ("cancelled", "queued"), ("cancelled", "queued"), ("missing",)]
    if got != want:
        wrong(f"cancel: got {got!r}, want {want!r}")
    for name, job_id in (("long", long), ("queued", queued), ("later", later)):
        try:
            wrong(f"job {name}: completed with {queue.result(job_id, timeout=10)!r}")
        except JobFailed as e:
            if (e.kind, e.message) != ("cancelled", "cancelled"):
                wrong(f"job {name}: failed ({e.kind}) {e.message!r}, want cancelled")
        state, kind = (text(v) for v in r.hmget(queue.keys.job(job_id), "state", "error_kind"))
        if (state, kind) != ("failed", "cancelled"):
            wrong(f"job {name}: state {state!r}, error_kind {kind!r}")
    if r.zscore(queue.keys.delayed, later) is not None:
        wrong("job later: still in the delayed set")
    again = queue.cancel(long)
    if again != [("finished", "cancelled")]:
        wrong(f"second cancel: got {again!r}")
    after = queue.submit({"name": "after", "sleep_ms": 10})
    try:
        got = queue.result(after, timeout=30)
        if got != "slept after":
            wrong(f"job after: got {got!r}")
    except (JobFailed, TimeoutError) as e:
        wrong(f"job after: {e}")
    print(f"checked the cancels, {failures} wrong")
    return 1 if failures else 0


def client_progress(url, queue_name, mode):
    """Against a Rust worker whose handler reports progress like
    progress_handler: in both encodings, follows a job's progress (the
    values read are in order, none skipped after the first, and end with
    the last step), then reads the latest value and the result. 0 when
    all agree."""
    queue = Client(url).queue(queue_name, mode)
    failures = 0
    for enc in ("msgpack", "json"):
        steps = 4
        job_id = queue.submit({"name": f"p-{enc}", "steps": steps, "gap_ms": 150}, enc=enc)
        seen = []
        for value in queue.follow_progress(job_id, timeout=30):
            if not seen or seen[-1] != value:  # a value may come twice
                seen.append(value)
        numbers = [v.get("step") for v in seen if isinstance(v, dict)]
        if (len(numbers) != len(seen) or not numbers or numbers[-1] != steps
                or numbers != list(range(numbers[0], steps + 1))
                or any(v.get("of") != steps for v in seen)):
            print(f"{enc}: followed {seen!r}", file=sys.stderr)
            failures += 1
        latest = queue.progress(job_id)
        result = queue.result(job_id, timeout=30, enc=enc)
        if latest != {"step": steps, "of": steps} or result != f"p-{enc}":
            print(f"{enc}: latest {latest!r}, result {result!r}", file=sys.stderr)
            failures += 1
        print(f"{enc}: followed steps {numbers}")
    return 1 if failures else 0


def control_command(args, parser):
    """The queue-control subcommands: each changes one control and prints
    what it was before (`controls` prints them all as JSON)."""
    if args.mode == "simple":
        parser.error("simple mode has no queue controls")
    queue = Client(args.url).queue(args.queue, args.mode)
    if args.command == "pause":
        print("was paused" if queue.pause() else "was running")
    elif args.command == "resume":
        print("was paused" if queue.resume() else "was running")
    elif args.command == "controls":
        controls = queue.controls()
        rate = controls["rate"]
        controls["rate"] = f"{rate[0]}:{rate[1]}" if rate else None
        print(json.dumps(controls))
    else:
        if args.clear == (args.max is not None) or (args.command == "rate-limit" and
                                                    (args.max is None) != (args.window_ms is None)):
            parser.error(f"{args.command}: give --clear, or the limit (--max"
                         + (" and --window-ms" if args.command == "rate-limit" else "") + ")")
        if args.command == "rate-limit":
            previous = queue.set_rate_limit(args.max, args.window_ms)
        else:
            previous = queue.set_concurrency_limit(args.max)
        print(f"previous limit: {previous or 'none'}")
    return 0


def job_command(args):
    """The submit, cancel, progress and events subcommands (their output
    is read by tests/interop.rs)."""
    queue = Client(args.url).queue(args.queue, args.mode)
    if args.command == "submit":
        print(queue.submit(json.loads(args.payload), enc=args.enc, job_id=args.id, unique=args.unique,
                           delay_ms=args.delay_ms))
    elif args.command == "cancel":
        print(json.dumps(queue.cancel(args.id)))
    elif args.command == "progress":
        if args.follow is None:
            print(json.dumps(queue.progress(args.id)))
        else:
            # Stops once N values were printed (or the job finished).
            for n, value in enumerate(queue.follow_progress(args.id, timeout=60), 1):
                print(json.dumps(value), flush=True)
                if n >= args.follow:
                    break
    elif args.read:
        for entry in queue.events():
            print(json.dumps(entry))
    else:
        previous = queue.set_events(None if args.clear else args.max)
        print(f"previous: {previous or 'none'}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run the interop handler on N jobs")
    c = sub.add_parser("client-check", help="submit the sample N times and check the results")
    t = sub.add_parser("client-timeouts", help="submit jobs with handler timeouts and check their outcomes")
    d = sub.add_parser("client-delayed", help="submit delayed jobs and check when they ran")
    # Queue controls (protocol.md 8.9): each prints the previous value.
    pa = sub.add_parser("pause", help="pause a queue: no worker starts its jobs until resumed")
    rs = sub.add_parser("resume", help="resume a paused queue")
    rl = sub.add_parser("rate-limit", help="set or clear a queue's rate limit")
    cl = sub.add_parser("concurrency-limit", help="set or clear a queue's concurrency limit")
    co = sub.add_parser("controls", help="print a queue's controls as JSON")
    # Cancellation, progress, unique jobs and events (protocol.md 8.10 to 8.13).
    cc = sub.add_parser("client-cancel", help="cancel jobs a Rust worker runs or has queued, and check")
    cp = sub.add_parser("client-progress", help="follow the progress a Rust worker's handler reports, and check")
    sm = sub.add_parser("submit", help="submit one job and print its ID (the holder's, when refused as unique)")
    ca = sub.add_parser("cancel", help="cancel jobs and print each decision as JSON")
    pr = sub.add_parser("progress", help="print a job's latest progress as JSON, or follow it")
    ev = sub.add_parser("events", help="turn a queue's events on or off, or print its event stream")
    for p in (w, c, t, d, pa, rs, rl, cl, co, cc, cp, sm, ca, pr, ev):
        p.add_argument("--url", required=True)
        p.add_argument("--queue", required=True)
        p.add_argument("--mode", required=True, choices=MODES)
    for p in (w, c):
        p.add_argument("--count", type=int, default=1)
    c.add_argument("--enc", required=True, choices=("msgpack", "json"))
    w.add_argument("--handler", choices=sorted(HANDLERS), default="interop")
    w.add_argument("--timeout-ms", type=int, default=None, help="the worker's default handler timeout")
    rl.add_argument("--max", type=int, help="most starts per window")
    rl.add_argument("--window-ms", type=int, help="the window, in ms")
    cl.add_argument("--max", type=int, help="most jobs running at once")
    for p in (rl, cl):
        p.add_argument("--clear", action="store_true", help="remove the limit")
    sm.add_argument("--payload", default="null", help="the payload, as JSON")
    sm.add_argument("--enc", default="msgpack", choices=("msgpack", "json"))
    sm.add_argument("--id", help="the job's ID (default: a new UUID)")
    sm.add_argument("--unique", default="", help="<active|throttle>:<ttl ms>:<key>")
    sm.add_argument("--delay-ms", type=int, default=0)
    ca.add_argument("--id", action="append", required=True, help="a job to cancel (repeat for more)")
    pr.add_argument("--id", required=True)
    pr.add_argument("--follow", type=int, metavar="N",
                    help="print the latest value and each new one, until N were printed or the job finished")
    ev_what = ev.add_mutually_exclusive_group(required=True)
    ev_what.add_argument("--max", type=int, help="record events, in a stream kept near N entries")
    ev_what.add_argument("--clear", action="store_true", help="record no events (jobs submitted from now on)")
    ev_what.add_argument("--read", action="store_true", help="print every entry as a JSON line")
    conf = sub.add_parser("conformance", help="replay a conformance scenario file")
    conf.add_argument("--url", required=True)
    conf.add_argument("file")
    vec = sub.add_parser("vectors", help="check golden encodings, or backoff delays (backoff.json)")
    vec.add_argument("file")
    args = parser.parse_args(argv)

    if args.command == "worker":
        worker = Worker(args.url, args.queue, args.mode, HANDLERS[args.handler], block_s=0.2,
                        timeout_ms=args.timeout_ms)
        print("ready", flush=True)
        try:
            done = worker.run(count=args.count, idle_exit_s=30)
        except KeyboardInterrupt:
            # SIGINT: the worker left (its jobs given back) before it ran
            # its count.
            print("interrupted")
            return 130
        print(f"ran {done} jobs")
        return 0 if done == args.count else 1
    if args.command == "client-check":
        queue = Client(args.url).queue(args.queue, args.mode)
        ids = [queue.submit(sample(args.enc), enc=args.enc) for _ in range(args.count)]
        for job_id in ids:
            got = queue.result(job_id, timeout=30, enc=args.enc)
            want = {"ok": True, "echo": sample(args.enc), "seen_by": "rust"}
            if got != want:
                print(f"job {job_id}: got {got!r}", file=sys.stderr)
                return 1
        print(f"checked {len(ids)} results")
        return 0
    if args.command == "client-timeouts":
        return client_timeouts(args.url, args.queue, args.mode)
    if args.command == "client-delayed":
        return client_delayed(args.url, args.queue, args.mode)
    if args.command in ("pause", "resume", "rate-limit", "concurrency-limit", "controls"):
        return control_command(args, parser)
    if args.command == "client-cancel":
        return client_cancel(args.url, args.queue, args.mode)
    if args.command == "client-progress":
        return client_progress(args.url, args.queue, args.mode)
    if args.command in ("submit", "cancel", "progress", "events"):
        return job_command(args)
    if args.command == "conformance":
        import conformance

        failed = conformance.replay(args.url, args.file)
        # The doorbells the scripts publish, against the golden vectors
        # next to the scenario file.
        vectors = pathlib.Path(args.file).with_name("vectors.json")
        return failed | conformance.check_doorbells(args.url, vectors)
    if args.command == "vectors":
        import conformance

        if pathlib.Path(args.file).name == "backoff.json":
            return conformance.check_backoff(args.file)
        return conformance.check_vectors(args.file)
    return 2


if __name__ == "__main__":
    sys.exit(main())
