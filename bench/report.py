"""Prints bench/compare.sh's table: medians over runs, ratios to the peers."""
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import time

out, runs, jobs, concurrency, round_trips = pathlib.Path(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:]
systems = {"job-async-redis simple": "jar-simple", "job-async-redis reliable": "jar-reliable",
           "BullMQ": "bullmq", "Bee-Queue": "bee"}
phases = ["enqueue (single)", "enqueue (batch)", "process backlog", "round trip"]


def load(prefix):
    """phase -> metric -> median over runs."""
    per_run = [json.loads((out / f"{prefix}-{r}.json").read_text()) for r in range(1, runs + 1)]
    result = {}
    for name in phases:
        rows = [next(p for p in run["phases"] if p["name"] == name) for run in per_run]
        merged = {k: statistics.median(r[k] for r in rows) for k in ("jobs_per_second", "commands_per_job", "redis_cpu_us_per_job")}
        if "memory_bytes_per_queued_job" in rows[0]:
            merged["memory"] = statistics.median(r["memory_bytes_per_queued_job"] for r in rows)
        if "latency_ms" in rows[0]:
            for p in ("p50", "p90", "p99"):
                merged[p] = statistics.median(r["latency_ms"][p] for r in rows)
        result[name] = merged
    return result


data = {label: load(prefix) for label, prefix in systems.items()}
redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, "
      f"Redis {redis_version.removeprefix('v=')}; {jobs} jobs, concurrency {concurrency}, {round_trips} round trips; medians of {runs}")
print()
print(f"| phase | system | jobs/s | vs BullMQ | vs Bee-Queue | cmds/job | Redis µs/job | mem B/job | p50 / p90 / p99 ms |")
print("|---|---|---|---|---|---|---|---|---|")
for name in phases:
    for label in systems:
        m = data[label][name]
        ratio = lambda peer: m["jobs_per_second"] / data[peer][name]["jobs_per_second"]
        latency = f"{m['p50']:.2f} / {m['p90']:.2f} / {m['p99']:.2f}" if "p50" in m else ""
        memory = f"{m['memory']:.0f}" if "memory" in m else ""
        print(f"| {name} | {label} | {m['jobs_per_second']:,.0f} | {ratio('BullMQ'):.2f}x | {ratio('Bee-Queue'):.2f}x | "
              f"{m['commands_per_job']:.1f} | {m['redis_cpu_us_per_job']:.1f} | {memory} | {latency} |")
