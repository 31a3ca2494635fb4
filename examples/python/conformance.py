"""Replays the language-neutral conformance suite (tests/conformance/) with
redis-py, and checks the golden encodings with msgpack. Used by jobqueue.py."""

import json
import time
import uuid

import msgpack
import redis

from jobqueue import LUA_DIR


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
    if expected == "*":
        return True
    expected = to_bytes(expected, queue)
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(
            matches(e, a, queue) for e, a in zip(expected, actual))
    return expected == actual


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
                    actual = r.execute_command(*[to_bytes(a, queue) for a in step["redis"]])
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
    vectors = json.load(open(path, encoding="utf-8"))["vectors"]
    failures = 0
    for v in vectors:
        value = decode_json(v["value"])
        packed = bytes.fromhex(v["msgpack"])
        ok = msgpack.unpackb(packed, raw=False) == value
        if v.get("exact", True):
            ok = ok and msgpack.packb(value, use_bin_type=True) == packed
        if not ok:
            failures += 1
            print(f"FAIL vector {v['name']}")
    print(f"vectors: {len(vectors)} checked, {failures} failures")
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
