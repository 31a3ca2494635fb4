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

As a program (used by the Rust interop and conformance tests):

    python3 jobqueue.py worker --url URL --queue Q --mode MODE --count N
        [--handler interop|nap|nap-sync|clock|plan] [--timeout-ms MS]
    python3 jobqueue.py client-check --url URL --queue Q --mode MODE --enc ENC --count N
    python3 jobqueue.py client-timeouts --url URL --queue Q --mode MODE
    python3 jobqueue.py client-delayed --url URL --queue Q --mode MODE
    python3 jobqueue.py pause|resume|controls --url URL --queue Q --mode MODE
    python3 jobqueue.py rate-limit --url URL --queue Q --mode MODE (--max N --window-ms MS | --clear)
    python3 jobqueue.py concurrency-limit --url URL --queue Q --mode MODE (--max N | --clear)
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
                    "delayed", "timekeeper", "clock", "schedules", "rate", "running", "gate"):
            return f"{self.base}:{name}"
        raise AttributeError(name)

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
        self.pubsub.subscribe(channel)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.1)
            if message and message["type"] == "subscribe" and text(message["channel"]) == channel:
                self.subscribed.add(channel)
                return
            self.keep(message)
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
               delay_ms=0, run_at_ms=0, backoff=""):
        """Submits one job; returns its ID. `timeout_ms`: how long its
        handler may run (0: the worker's default), in every mode.
        `delay_ms` (0 to 10^12) or `run_at_ms` (ms since the Unix epoch, on
        the Redis server's clock; 0: none): the job waits in the queue's
        delayed set until then, in every mode; at most one of them. A due
        time that is not in the future queues it at once. `backoff` (from
        backoff_policy; "": none): how long a failed attempt waits before
        the next, recoverable and reliable modes."""
        if timeout_ms != 0 and not 1 <= timeout_ms <= MAX_MS:
            raise ValueError(f"timeout_ms must be 0 or 1 to {MAX_MS}")
        if not 0 <= delay_ms <= MAX_MS or not 0 <= run_at_ms <= MAX_RUN_AT_MS:
            raise ValueError(f"delay_ms must be 0 to {MAX_MS}, run_at_ms 0 to {MAX_RUN_AT_MS}")
        if delay_ms and run_at_ms:
            raise ValueError("a job has a delay or a run-at time, not both")
        if backoff and (self.mode == "simple" or parse_backoff(backoff) is None):
            raise ValueError(f"invalid backoff {backoff!r} (see backoff_policy; not in simple mode)")
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
            # Ten arguments per job (job_submit 8, section 10.6).
            k = self.keys
            call = (
                "job_submit",
                [k.meta, k.pending, k.tickets, k.delayed, k.clock, k.job(job_id)],
                [self.mode, PROTOCOL_VERSION, job_id, enc, body, self.client.id, str(lease_ms), str(max_attempts),
                 str(timeout_ms), str(delay_ms), str(run_at_ms), backoff],
            )
        try:
            self.client.scripts(*call)
        except ProtocolError as e:
            if e.code != "JQ_QUEUE_UNKNOWN":
                raise
            register(self.client.scripts, self.keys, self.mode)
            self.client.scripts(*call)
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

    # queue controls (protocol.md 8.9) --------------------------------------

    def control(self, changes):
        """queue_control 1: sets each control of `changes`, a list of
        (control, value) pairs ("paused" "1", "rate" "<max>:<window ms>",
        "concurrency" "<max>"; the value "" clears it), in one atomic call.
        Returns their previous values, in order ("" when one was not set).
        A change that may let more jobs start (anything but a pause) pushes
        the queue's gate list, which wakes the workers it held back.
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
        """The queue's controls, read as the start scripts read them (a
        value that does not parse counts as absent): {"paused": bool,
        "rate": (max, window ms) or None, "concurrency": int or None}."""
        paused, rate, concurrency = (text(v) for v in self.client.r.hmget(
            self.keys.meta, "paused", "rate", "concurrency"))
        parsed_rate = None
        m = re.fullmatch(r"([0-9]{1,15}):([0-9]{1,15})", rate or "")
        if m and 1 <= int(m.group(1)) <= MAX_LIMIT and 1 <= int(m.group(2)) <= MAX_MS:
            parsed_rate = (int(m.group(1)), int(m.group(2)))
        limit = int(concurrency) if re.fullmatch(r"[0-9]{1,15}", concurrency or "") else None
        return {"paused": paused == "1", "rate": parsed_rate,
                "concurrency": limit if limit is not None and 1 <= limit <= MAX_LIMIT else None}


class Abandoned(Exception):
    """The worker is being stopped (KeyboardInterrupt, SystemExit) while a
    handler runs: not a failure of the job (section 6.2)."""


class HandlerTimeout(BaseException):
    """Raised inside a plain-function handler when its timeout runs out. A
    BaseException, so that a handler's `except Exception` does not swallow
    it; a handler that swallows it anyway is still reported `timeout`."""


def run_handler(handler, payload, job, timeout_ms):
    """Runs `handler(payload, job)` for at most `timeout_ms` (None: no
    limit). Returns (False, value), or (True, None) when the timeout ran out
    and the handler was abandoned: an `async def` handler's task is
    cancelled; a plain function is interrupted with SIGALRM when it runs on
    the main thread (Unix), and otherwise cannot be stopped: it is then
    reported timed out when it returns late. Exceptions of the handler
    propagate."""
    if inspect.iscoroutinefunction(handler):
        async def supervise():
            task = asyncio.ensure_future(handler(payload, job))
            done, _ = await asyncio.wait({task}, timeout=None if timeout_ms is None else timeout_ms / 1000)
            if not done:
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001 - the abandoned handler's end is not its outcome
                    pass
                return True, None
            return False, task.result()

        return asyncio.run(supervise())
    if timeout_ms is None:
        return False, handler(payload, job)
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        started = time.monotonic()
        value = handler(payload, job)
        return (True, None) if (time.monotonic() - started) * 1000 > timeout_ms else (False, value)
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
        return True, None
    except Exception:
        # The handler caught the alarm and raised something else: what the
        # abandonment made it do is not its outcome (section 6.2, item 6).
        if fired:
            return True, None
        raise
    finally:
        signal.signal(signal.SIGALRM, previous)
    # The alarm fired but the handler caught it and returned: it overran.
    return (True, None) if fired else (False, value)


class Worker:
    """Runs `handler(payload, job)` on one queue, one job at a time
    (sections 7.2, 8.4 and 9.1). `job` is a dict with id, attempt, enc. The
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
        register(self.scripts, self.keys, mode)

    def run(self, count=None, idle_exit_s=None):
        """Processes jobs until `count` jobs ran, or nothing came for
        `idle_exit_s` seconds. Returns how many ran."""
        done, idle_since = 0, time.monotonic()
        if self.mode == "reliable":
            self.heartbeat()
        self.promote()
        try:
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
        return done

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

    def execute(self, job_id, enc, body, attempt, timeout_ms=0):
        """Decodes, runs the handler, encodes: ("completed", bytes) or
        ("failed", kind, message, retryable, retry delay ms), with the
        failure kinds of section 6.2; the retry delay is -1 (the job's
        backoff decides) unless the handler raised RetryAfter. `timeout_ms`:
        the job's own handler timeout (0: the worker's default). Raises
        Abandoned when the worker is being stopped."""
        job_id = text(job_id)  # the start scripts run UTF-8 IDs only
        limit = timeout_ms or self.timeout_ms
        try:
            payload = decode(enc, body)
        except Exception as e:  # noqa: BLE001 - any undecodable input fails the job
            return ("failed", "decode", f"cannot decode payload ({enc!r}): {e}", False, -1)
        try:
            timed_out, value = run_handler(self.handler, payload, {"id": job_id, "attempt": attempt, "enc": enc}, limit)
            if timed_out:
                # Abandoned; retried like a failure of the handler (8.4 step 6).
                return ("failed", "timeout", f"the handler ran longer than its timeout of {limit} ms", True, -1)
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
        # job_start 11: "limited" (from job_claim) before the id/token pairs.
        start = self.scripts("job_start", [k.leases, k.dead_jobs, k.job(job_id)],
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
        the worker is stopped meanwhile."""
        try:
            outcome = self.execute(job_id, text(start[1]), start[2], int(start[3]), start_timeout(start))
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
        self.finish(job_id, token, outcome, claim)

    def finish(self, job_id, token, outcome, claim):
        k = self.keys
        # job_finish 10: the retry delay comes last ("-1": the job's backoff).
        if outcome[0] == "completed":
            args = [job_id, token, "completed", outcome[1], "", "0", str(self.ttl), self.mode, "publish", "-1"]
        else:
            args = [job_id, token, "failed", outcome[1], outcome[2], "1" if outcome[3] else "0", str(self.ttl),
                    self.mode, "publish", str(outcome[4])]
        try:
            # job_finish 12: a job with a slot gives it back (it leaves the
            # running set in reliable mode; the gate list is pushed).
            self.scripts("job_finish", [k.job(job_id), claim, k.pending, k.tickets, k.delayed, k.clock, k.running,
                                        k.gate], args)
        except ProtocolError as e:
            if e.code not in ("JQ_LEASE_LOST", "JQ_ALREADY_FINISHED"):
                raise
            print(f"outcome of {job_id} refused: {e}", file=sys.stderr)

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
        # reliable_start 11: the gate's keys before the job's, and "held"
        # 1 when the last call was held back.
        start = self.scripts("reliable_start",
                             [inflight, k.dead_jobs, k.fence, k.pending, k.meta, k.running, k.rate, k.gate,
                              k.job(job_id)],
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
    """The seventh element of a `run` decision (job_start 11, reliable_start
    11): the job's own handler timeout in ms, 0 for none (the worker's
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


HANDLERS = {"interop": interop_handler, "nap": nap_handler, "nap-sync": nap_sync_handler,
            "clock": clock_handler, "plan": plan_handler}

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
    for p in (w, c, t, d, pa, rs, rl, cl, co):
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
