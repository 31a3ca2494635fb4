"""A second implementation of the job-async-redis protocol, in Python.

Written from protocol.md and the scripts in lua/ alone (it loads those exact
files), with redis-py and msgpack. It is small and synchronous: a client
for all three modes, and a worker that runs one job at a time. It does not
renew leases while a handler runs (recoverable mode) or heartbeat during a
handler (reliable mode): its jobs must finish within the lease.

As a program (used by the Rust interop and conformance tests):

    python3 jobqueue.py worker --url URL --queue Q --mode MODE --count N
    python3 jobqueue.py client-check --url URL --queue Q --mode MODE --enc ENC --count N
    python3 jobqueue.py conformance --url URL FILE.json
    python3 jobqueue.py vectors FILE.json
"""

import argparse
import json
import pathlib
import sys
import time
import uuid

import msgpack
import redis

PROTOCOL_VERSION = "1"
LUA_DIR = pathlib.Path(__file__).resolve().parents[2] / "lua"
MODES = ("simple", "recoverable", "reliable")
FINISHED = ("completed", "failed", "dead")


class ProtocolError(Exception):
    """A script refused with a JQ_ error code (protocol.md section 10)."""

    def __init__(self, code, detail):
        super().__init__(f"{code} {detail}".strip())
        self.code = code
        self.detail = detail


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
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    raise ValueError(f"unknown encoding {enc!r}")


def decode(enc, data):
    if enc == "msgpack":
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    if enc == "json":
        return json.loads(data)
    raise ValueError(f"unknown encoding {enc!r}")


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
        if name in ("meta", "pending", "dead", "tickets", "leases", "fence", "dead_jobs", "sweep", "workers"):
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
            records = msgpack.unpackb(message["data"], raw=False)
            for record in records if isinstance(records, list) else [records]:
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

    def submit(self, payload, enc="msgpack", job_id=None, max_attempts=1, lease_ms=0):
        """Submits one job; returns its ID."""
        self.client.subscribe(self.channel)
        job_id = job_id or str(uuid.uuid4())
        body = encode(enc, payload)
        if self.mode == "simple":
            envelope = msgpack.packb(
                {"id": job_id, "reply": self.channel, "enc": enc, "payload": body, "submitted_ms": now_ms()},
                use_bin_type=True,
            )
            call = ("simple_submit", [self.keys.meta, self.keys.pending], [self.mode, PROTOCOL_VERSION, envelope])
        else:
            call = (
                "job_submit",
                [self.keys.meta, self.keys.pending, self.keys.tickets, self.keys.job(job_id)],
                [self.mode, PROTOCOL_VERSION, job_id, enc, body, self.client.id, str(lease_ms), str(max_attempts)],
            )
        try:
            self.client.scripts(*call)
        except ProtocolError as e:
            if e.code != "JQ_QUEUE_UNKNOWN":
                raise
            register(self.client.scripts, self.keys, self.mode)
            self.client.scripts(*call)
        return job_id

    def result(self, job_id, timeout=10.0):
        """Awaits a job's outcome: its decoded result, or JobFailed."""
        deadline = time.monotonic() + timeout
        if self.mode == "simple":
            reply = self.client.wait_message(job_id, timeout)
            if reply is None:
                raise TimeoutError(f"no outcome for job {job_id}")
            if reply["status"] == "completed":
                return decode(reply.get("enc", "msgpack"), reply.get("result", b""))
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
            # The doorbell, or a re-read every second (doorbells can be missed).
            self.client.wait_message(job_id, min(left, 1.0))


class Worker:
    """Runs `handler(payload, job)` on one queue, one job at a time
    (sections 7.2, 8.4 and 9.1). `job` is a dict with id, attempt, enc."""

    def __init__(self, url, queue, mode, handler, prefix="jq", lease_ms=30000, max_stalls=3,
                 result_ttl_ms=86_400_000, block_s=1.0, dead_max=10_000):
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
        self.last_sweep = 0.0
        register(self.scripts, self.keys, mode)

    def run(self, count=None, idle_exit_s=None):
        """Processes jobs until `count` jobs ran, or nothing came for
        `idle_exit_s` seconds. Returns how many ran."""
        done, idle_since = 0, time.monotonic()
        if self.mode == "reliable":
            self.heartbeat()
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
                self.scripts("reliable_requeue_worker", [self.keys.workers, self.keys.inflight(self.id), self.keys.pending],
                             [self.id, "0", "60000"])
        return done

    def execute(self, job_id, enc, body, attempt):
        """Decodes, runs the handler, encodes: ("completed", bytes) or
        ("failed", kind, message, retryable)."""
        job_id = text(job_id)  # the start scripts run UTF-8 IDs only
        try:
            payload = decode(enc, body)
        except Exception as e:  # noqa: BLE001 - any undecodable input fails the job
            return ("failed", "decode", f"cannot decode payload ({enc!r}): {e}", False)
        try:
            value = self.handler(payload, {"id": job_id, "attempt": attempt, "enc": enc})
        except Exception as e:  # noqa: BLE001 - a handler error fails the job
            return ("failed", "handler", str(e), True)
        try:
            return ("completed", encode(enc, value))
        except Exception as e:  # noqa: BLE001
            return ("failed", "encode", str(e), False)

    # simple mode -----------------------------------------------------------

    def simple_once(self):
        popped = self.r.execute_command("BLMPOP", self.block_s, 1, self.keys.pending, "RIGHT", "COUNT", 1)
        if not popped:
            return 0
        entry = popped[1][0]
        try:
            envelope = msgpack.unpackb(entry, raw=False)
            if not isinstance(envelope, dict):
                raise ValueError("not a map")
            job_id, enc, body = envelope["id"], envelope["enc"], envelope["payload"]
            if not isinstance(job_id, str) or not isinstance(enc, str) or not isinstance(body, bytes):
                raise ValueError("id, enc or payload of the wrong type")
            reply = envelope.get("reply")
            if reply is not None and not (isinstance(reply, str) and reply.startswith(self.keys.reply(""))
                                          and len(reply) > len(self.keys.reply(""))):
                raise ValueError("reply is not a reply channel of this queue")
        except Exception as e:  # noqa: BLE001 - not a job: keep it, with the reason
            record = msgpack.packb({"reason": f"invalid envelope: {e}", "entry": entry, "at_ms": now_ms()}, use_bin_type=True)
            self.scripts("simple_dead", [self.keys.dead], [record, str(self.dead_max)])
            return 1
        outcome = self.execute(job_id, enc, body, 1)
        if reply is not None:
            if outcome[0] == "completed":
                message = {"id": job_id, "status": "completed", "enc": enc, "result": outcome[1]}
            else:
                message = {"id": job_id, "status": "failed", "error": {"kind": outcome[1], "message": outcome[2]}}
            self.scripts("simple_reply", [self.keys.meta], [reply, msgpack.packb(message, use_bin_type=True)])
        return 1

    # recoverable mode ------------------------------------------------------

    def sweep(self):
        if time.monotonic() - self.last_sweep < self.lease_ms / 2000:
            return
        self.last_sweep = time.monotonic()
        k = self.keys
        if self.mode == "recoverable":
            self.scripts("job_requeue_stale", [k.leases, k.pending, k.tickets, k.sweep], [str(self.lease_ms // 2), "1000"])
        else:
            dead = self.scripts("reliable_find_dead", [k.workers, k.sweep], [str(self.lease_ms // 2), "100"])
            if isinstance(dead, list):
                # Worker IDs are bytes: the set may hold members another
                # program wrote.
                for worker in dead:
                    if worker != self.id.encode():
                        self.scripts("reliable_requeue_worker", [k.workers, k.inflight(worker), k.pending],
                                     [worker, "1", str(self.lease_ms * 10)])

    def recoverable_once(self):
        k = self.keys
        self.sweep()
        claim_keys = [k.pending, k.tickets, k.leases, k.fence]
        claimed = self.scripts("job_claim", claim_keys, ["1", str(self.lease_ms), "0"])
        if not claimed:
            if not self.r.execute_command("BLMPOP", self.block_s, 1, k.tickets, "RIGHT", "COUNT", 1):
                return 0
            claimed = self.scripts("job_claim", claim_keys, ["1", str(self.lease_ms), "1"])
            if not claimed:
                return 0
        # The ID as bytes: job_start never runs one that is not UTF-8.
        job_id, token = claimed[0], text(claimed[1])
        start = self.scripts("job_start", [k.leases, k.dead_jobs, k.job(job_id)],
                             [str(self.lease_ms), str(self.max_stalls), self.id, str(self.ttl), str(self.dead_max),
                              "publish", job_id, token])[0]
        if text(start[0]) != "run":
            return 1
        self.finish(job_id, token, self.execute(job_id, text(start[1]), start[2], int(start[3])), k.leases)
        return 1

    def finish(self, job_id, token, outcome, claim):
        k = self.keys
        if outcome[0] == "completed":
            args = [job_id, token, "completed", outcome[1], "", "0"]
        else:
            args = [job_id, token, "failed", outcome[1], outcome[2], "1" if outcome[3] else "0"]
        try:
            self.scripts("job_finish", [k.job(job_id), claim, k.pending, k.tickets], args + [str(self.ttl), self.mode])
        except ProtocolError as e:
            if e.code not in ("JQ_LEASE_LOST", "JQ_ALREADY_FINISHED"):
                raise
            print(f"outcome of {job_id} refused: {e}", file=sys.stderr)

    # reliable mode ---------------------------------------------------------

    def heartbeat(self):
        self.scripts("reliable_heartbeat", [self.keys.workers], [self.id, str(self.lease_ms)])

    def reliable_once(self):
        k = self.keys
        self.heartbeat()
        self.sweep()
        inflight = k.inflight(self.id)
        # One slot: look at the oldest ID waiting and take it with the
        # start; when nothing waits, block on BLMOVE.
        # IDs stay bytes: reliable_start never runs one that is not UTF-8.
        seen = self.r.lrange(k.pending, -1, -1)
        if seen:
            source, job_id = "pending", seen[0]
        else:
            moved = self.r.execute_command("BLMOVE", k.pending, inflight, "RIGHT", "LEFT", self.block_s)
            if moved is None:
                return 0
            source, job_id = "inflight", moved
        start = self.scripts("reliable_start", [inflight, k.dead_jobs, k.fence, k.pending, k.job(job_id)],
                             [str(self.max_stalls), self.id, str(self.ttl), str(self.dead_max), "publish",
                              source, job_id])[0]
        if text(start[0]) == "missed":
            return 0  # another worker took it first: look again
        if text(start[0]) != "run":
            return 1
        token = text(start[5])
        self.finish(job_id, token, self.execute(job_id, text(start[1]), start[2], int(start[3])), inflight)
        return 1


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run the interop handler on N jobs")
    c = sub.add_parser("client-check", help="submit the sample N times and check the results")
    for p in (w, c):
        p.add_argument("--url", required=True)
        p.add_argument("--queue", required=True)
        p.add_argument("--mode", required=True, choices=MODES)
        p.add_argument("--count", type=int, default=1)
    c.add_argument("--enc", required=True, choices=("msgpack", "json"))
    conf = sub.add_parser("conformance", help="replay a conformance scenario file")
    conf.add_argument("--url", required=True)
    conf.add_argument("file")
    vec = sub.add_parser("vectors", help="check golden encodings")
    vec.add_argument("file")
    args = parser.parse_args(argv)

    if args.command == "worker":
        worker = Worker(args.url, args.queue, args.mode, interop_handler, block_s=0.2)
        print("ready", flush=True)
        done = worker.run(count=args.count, idle_exit_s=30)
        print(f"ran {done} jobs")
        return 0 if done == args.count else 1
    if args.command == "client-check":
        queue = Client(args.url).queue(args.queue, args.mode)
        ids = [queue.submit(sample(args.enc), enc=args.enc) for _ in range(args.count)]
        for job_id in ids:
            got = queue.result(job_id, timeout=30)
            want = {"ok": True, "echo": sample(args.enc), "seen_by": "rust"}
            if got != want:
                print(f"job {job_id}: got {got!r}", file=sys.stderr)
                return 1
        print(f"checked {len(ids)} results")
        return 0
    if args.command == "conformance":
        import conformance

        return conformance.replay(args.url, args.file)
    if args.command == "vectors":
        import conformance

        return conformance.check_vectors(args.file)
    return 2


if __name__ == "__main__":
    sys.exit(main())
