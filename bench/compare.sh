#!/usr/bin/env bash
# Runs job-async-redis (simple and reliable modes), BullMQ and Bee-Queue
# through the same three phases against the same redis-server, RUNS times
# each (default 3), and prints one table of medians with ratios.
#
#   bench/compare.sh                 # a throwaway redis-server on a free port
#   REDIS_URL=redis://host:6379 bench/compare.sh
#   JOBS=50000 CHUNK=1000 CONCURRENCY=50 ROUND_TRIPS=2000 RUNS=3 bench/compare.sh
#
# Needs Rust, Node.js with npm (the peers are installed into target/peers),
# Python 3 and redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-50000}; CHUNK=${CHUNK:-1000}; CONCURRENCY=${CONCURRENCY:-50}
ROUND_TRIPS=${ROUND_TRIPS:-2000}; RUNS=${RUNS:-3}
OUT=$(mktemp -d)

if [ -z "${REDIS_URL:-}" ]; then
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$OUT" >/dev/null &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null; rm -rf "$OUT"' EXIT
  until redis-cli -p "$PORT" ping >/dev/null 2>&1; do sleep 0.05; done
  export REDIS_URL="redis://127.0.0.1:$PORT"
fi
flush() { redis-cli -u "$REDIS_URL" flushall >/dev/null; }

echo "installing BullMQ and Bee-Queue into target/peers..." >&2
mkdir -p target/peers
cp bench/package.json bench/peers.mjs target/peers/
(cd target/peers && npm install --silent --no-audit --no-fund >/dev/null)
cargo build --release --quiet --example bench

for run in $(seq 1 "$RUNS"); do
  for mode in simple reliable; do
    echo "run $run: job-async-redis $mode" >&2
    flush
    target/release/examples/bench --json --mode "$mode" --jobs "$JOBS" --chunk "$CHUNK" \
      --concurrency "$CONCURRENCY" --round-trips "$ROUND_TRIPS" > "$OUT/jar-$mode-$run.json"
  done
  for peer in bullmq bee; do
    echo "run $run: $peer" >&2
    flush
    node target/peers/peers.mjs --which "$peer" --url "$REDIS_URL" --jobs "$JOBS" --chunk "$CHUNK" \
      --concurrency "$CONCURRENCY" --round-trips "$ROUND_TRIPS" > "$OUT/$peer-$run.json"
  done
done
python3 bench/report.py "$OUT" "$RUNS" "$JOBS" "$CONCURRENCY" "$ROUND_TRIPS"
