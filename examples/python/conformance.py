"""Replays the language-neutral conformance suite (tests/conformance/) with
redis-py, checks the golden encodings with this implementation's record
reader and writer, the doorbells the scripts publish against them, and the
backoff delays (backoff.json) against backoff_ms. Used by jobqueue.py."""

import json
import time
import uuid

import msgpack
import redis

from jobqueue import (LUA_DIR, RECORDS, InvalidRecord, Keys, Scripts, backoff_ms, envelope_client, pack_record,
                      read_message, read_record, text)


def to_bytes(value, queue):
    """An argument or an expected reply, as bytes (or a list, int, None).
    {"concat": [...]} stands for the bytes of its parts one after the other."""
    if isinstance(value, dict) and "concat" in value:
        return b"".join(to_bytes(part, queue) for part in value["concat"])
    if isinstance(value, dict) and "hex" in value:
        return bytes.fromhex(value["hex"])
    if isinstance(value, str):
        return value.replace("<Q>", queue).encode()
    if isinstance(value, list):
        return [to_bytes(v, queue) for v in value]
    return value


def matches(expected, actual, queue):
    """"*" matches anything, also inside an array."""
    if expected == "*":
        return True
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(
            matches(e, a, queue) for e, a in zip(expected, actual))
    return to_bytes(expected, queue) == actual


def keyspace(r, queue):
    """Every key of the scenario's queue: (name, type, DUMP of the value,
    whether it has a TTL), sorted. Two equal snapshots mean that nothing was
    written in between."""
    return [(key, r.type(key), r.dump(key), r.pttl(key) >= 0)
            for key in sorted(r.keys(f"*{{{queue}}}*"))]


def replay(url, path):
    suite = json.load(open(path, encoding="utf-8"))
    r = redis.Redis.from_url(url)
    scripts = {p.stem: r.register_script(p.read_bytes()) for p in LUA_DIR.glob("*.lua")}
    # Plain commands' replies as Redis sends them in RESP2, as the suite
    # writes them: no RESP3 doubles (ZSCORE), no redis-py parsing.
    raw = redis.Redis.from_url(url, protocol=2)
    raw.response_callbacks.clear()
    failures = 0
    for scenario in suite["scenarios"]:
        queue = "conf-" + uuid.uuid4().hex
        for number, step in enumerate(scenario["steps"], 1):
            if "sleep_ms" in step:
                time.sleep(step["sleep_ms"] / 1000)
                continue
            before = keyspace(r, queue) if step.get("writes_nothing") else None
            try:
                if "script" in step:
                    keys = [to_bytes(k, queue) for k in step["keys"]]
                    args = [to_bytes(a, queue) for a in step["args"]]
                    actual = scripts[step["script"]](keys=keys, args=args)
                else:
                    actual = raw.execute_command(*[to_bytes(a, queue) for a in step["redis"]])
                error = None
            except redis.ResponseError as e:
                actual, error = None, str(e).split(" ", 1)[0]
            if "error" in step:
                ok = error == step["error"]
            else:
                ok = error is None and matches(step["reply"], actual, queue)
            if before is not None:
                after = keyspace(r, queue)
                if after != before:
                    failures += 1
                    print(f"FAIL {scenario['name']} step {number} {step}: wrote something: "
                          f"before {before!r} after {after!r}")
            if not ok:
                failures += 1
                print(f"FAIL {scenario['name']} step {number} {step}: got {actual!r} error {error!r}")
    print(f"conformance: {len(suite['scenarios'])} scenarios, {failures} failures")
    return 1 if failures else 0


def check_vectors(path):
    """Checks the golden encodings with this implementation's own record
    writer and reader (the ones its client and worker use)."""
    vectors = json.load(open(path, encoding="utf-8"))["vectors"]
    keys = Keys("jq", "emails")  # the queue of the vectors' reply channels
    failures = 0
    for v in vectors:
        packed = bytes.fromhex(v["msgpack"])
        problems = []
        record = v["record"]
        if v.get("exact"):
            value = decode_json(v["value"])
            if record in RECORDS:
                elements = value if isinstance(value, list) else [value]
                written = b"".join(pack_record(RECORDS[record], e) for e in elements)
                if isinstance(value, list):
                    written = msgpack.Packer().pack_array_header(len(value)) + written
            else:
                written = msgpack.packb(value, use_bin_type=True)
            if written != packed:
                problems.append(f"wrote {written.hex()}")
        if record in RECORDS:
            want = decode_json(v["read"] if "read" in v else v["value"])
            try:
                if record in ("reply", "doorbell"):
                    got = read_message(packed)
                    if not isinstance(want, list) and want is not None:
                        want = [want]
                else:
                    got = read_record(RECORDS[record], packed)
            except InvalidRecord as e:
                got = None
                reason = str(e)
            if got != want:
                problems.append(f"read {got!r}" + (f" ({reason})" if got is None else ""))
            if "told" in v and (envelope_client(packed, keys) is not None) != v["told"]:
                problems.append(f"told should be {v['told']}")
        elif "value" in v and msgpack.unpackb(packed, raw=False, strict_map_key=False) != decode_json(v["value"]):
            problems.append("decodes to another value")
        if problems:
            failures += 1
            print(f"FAIL vector {v['name']}: {'; '.join(problems)}")
    print(f"vectors: {len(vectors)} checked, {failures} failures")
    return 1 if failures else 0


def check_doorbells(url, path):
    """Runs the scripts that publish each doorbell vector with a
    "produced_by" and compares what they publish: the exact bytes for exact
    vectors, what a reader reads for the others."""
    vectors = [v for v in json.load(open(path, encoding="utf-8"))["vectors"] if "produced_by" in v]
    r = redis.Redis.from_url(url)
    scripts = Scripts(r)
    failures = 0
    for v in vectors:
        queue = "bell-" + uuid.uuid4().hex
        k = Keys("jq", queue)
        scripts("queue_register", [k.meta], ["recoverable", "1"])
        records = decode_json(v["read"] if "read" in v else v["value"])
        records = records if isinstance(records, list) else [records]
        pubsub = r.pubsub()
        pubsub.subscribe(k.reply("c7"))
        while (m := pubsub.get_message(timeout=1)) is not None and m["type"] != "subscribe":
            pass
        ids = [rec["id"] for rec in records]
        for job_id in ids:
            # job_submit 10: the event stream after the clock; eleven
            # arguments per job, the last its unique spec.
            scripts("job_submit", [k.meta, k.pending, k.tickets, k.delayed, k.clock, k.events, k.job(job_id)],
                    ["recoverable", "1", job_id, records[0].get("enc", "json"), b'"hi"', "c7", "0", "1", "0",
                     "0", "0", "", ""])
        # job_claim 4's reply starts with the gate's hold, wait and
        # limited: the first ID is claimed[3], its token claimed[4].
        claim_keys = [k.pending, k.tickets, k.leases, k.fence, k.meta, k.rate, k.gate]
        if v["produced_by"] == "job_start":
            if records[0]["status"] == "dead":
                # Started, its lease ran out, swept; started again with max
                # stalls 0: dead.
                claimed = scripts("job_claim", claim_keys, ["1", "1", "0", "0"])
                scripts("job_start", [k.leases, k.dead_jobs, k.events, k.job(ids[0])],
                        ["1", "3", "w1", "60000", "100", "publish", "0", ids[0], claimed[4]])
                time.sleep(0.01)
                scripts("job_requeue_stale", [k.leases, k.pending, k.tickets, k.sweep, k.gate], ["1", "10"])
                max_stalls = "0"
            else:
                # A hash that is not a valid job: failed, without an error record.
                r.hset(k.job(ids[0]), "state", "bogus")
                max_stalls = "3"
            claimed = scripts("job_claim", claim_keys, ["1", "30000", "0", "0"])
            scripts("job_start", [k.leases, k.dead_jobs, k.events, k.job(ids[0])],
                    ["30000", max_stalls, "w1", "60000", "100", "publish", "0", ids[0], claimed[4]])
        else:
            claimed = scripts("job_claim", claim_keys, [str(len(ids)), "30000", "0", "0"])
            tokens = [text(t) for t in claimed[4::2]]
            start_args = ["30000", "3", "w1", "60000", "100", "publish", "0"]
            for job_id, token in zip(ids, tokens):
                start_args += [job_id, token]
            scripts("job_start", [k.leases, k.dead_jobs, k.events] + [k.job(i) for i in ids], start_args)
            outcomes = []
            for rec, token in zip(records, tokens):
                if rec["status"] == "completed":
                    outcomes.append([rec["id"], token, "completed", rec["result"], "", "0"])
                else:
                    outcomes.append([rec["id"], token, "failed", rec["error"]["kind"], rec["error"]["message"], "0"])
            if v["produced_by"] == "job_finish":
                scripts("job_finish", [k.job(ids[0]), k.leases, k.pending, k.tickets, k.delayed, k.clock,
                                       k.running, k.gate, k.events],
                        outcomes[0] + ["60000", "recoverable", "publish", "-1"])
            elif v["produced_by"] == "job_cancel":
                # The running jobs cancelled, in one call (the message is
                # the first record's).
                scripts("job_cancel", [k.delayed, k.leases, k.running, k.gate, k.events] + [k.job(i) for i in ids],
                        ["recoverable", "60000", "publish", records[0]["error"]["message"]] + ids)
            else:
                scripts("job_finish_batch", [k.leases, k.pending, k.tickets, k.delayed, k.clock, k.running, k.gate,
                                             k.events] + [k.job(i) for i in ids],
                        ["60000", "recoverable", "publish"] + [a for o in outcomes for a in o + ["-1"]])
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            m = pubsub.get_message(timeout=0.5)
            if m and m["type"] == "message":
                message = m["data"]
        pubsub.close()
        if message is None:
            ok = False
        elif v.get("exact"):
            ok = message == bytes.fromhex(v["msgpack"])
        else:
            ok = read_message(message) == records
        if not ok:
            failures += 1
            print(f"FAIL doorbell {v['name']}: published {message.hex() if message else None}")
    print(f"doorbells: {len(vectors)} checked against the scripts, {failures} failures")
    return 1 if failures else 0


def check_backoff(path):
    """Checks backoff_ms against the golden backoff delays (backoff.json:
    each case a policy, a job ID, a failed attempt and the delay in ms)."""
    cases = json.load(open(path, encoding="utf-8"))["cases"]
    failures = 0
    for case in cases:
        got = backoff_ms(case["policy"], case["id"], case["attempt"])
        if got != case["delay_ms"]:
            failures += 1
            print(f"FAIL backoff {case['policy']} {case['id']!r} attempt {case['attempt']}: "
                  f"{got} ms, want {case['delay_ms']} ms")
    print(f"backoff: {len(cases)} delays checked, {failures} failures")
    return 1 if failures else 0


def decode_json(value):
    """A vector's value: {"hex": ...} stands for bytes."""
    if isinstance(value, dict):
        if set(value) == {"hex"}:
            return bytes.fromhex(value["hex"])
        return {k: decode_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_json(v) for v in value]
    return value
