// The peers of bench/compare.sh: the same three phases as
// `cargo run --example bench`, with BullMQ or Bee-Queue, against the same
// redis-server. Prints one JSON object.
//
//   node peers.mjs --which bullmq|bee --url redis://127.0.0.1:6379 \
//     [--jobs 50000] [--chunk 1000] [--concurrency 50] [--round-trips 2000]

import IORedis from 'ioredis';
import { Queue, Worker, QueueEvents } from 'bullmq';
import BeeQueue from 'bee-queue';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const which = args.which;
const url = args.url;
const jobs = Number(args.jobs ?? 50000);
const chunk = Number(args.chunk ?? 1000);
const concurrency = Number(args.concurrency ?? 50);
const roundTrips = Number(args['round-trips'] ?? 2000);
const admin = new IORedis(url);

async function counters() {
  const info = await admin.info('all');
  const field = (name) => Number((info.match(new RegExp(`^${name}:([0-9.]+)`, 'm')) || [])[1] || 0);
  let commands = 0;
  for (const m of info.matchAll(/^cmdstat_(\w[\w|]*):calls=(\d+)/gm)) {
    if (m[1] !== 'info') commands += Number(m[2]);
  }
  return { commands, cpuUs: (field('used_cpu_user') + field('used_cpu_sys')) * 1e6, dataset: field('used_memory_dataset') };
}

function phase(name, n, started, before, after, extra = {}) {
  const seconds = (performance.now() - started) / 1000;
  return {
    name, jobs: n, seconds, jobs_per_second: n / seconds,
    commands_per_job: (after.commands - before.commands) / n,
    redis_cpu_us_per_job: (after.cpuUs - before.cpuUs) / n,
    ...extra,
  };
}

async function inFlight(total, limit, start) {
  let next = 0;
  const lanes = Array.from({ length: limit }, async () => {
    while (next < total) await start(next++);
  });
  await Promise.all(lanes);
}

function percentiles(latencies) {
  latencies.sort((a, b) => a - b);
  const at = (p) => latencies[Math.min(latencies.length - 1, Math.floor((latencies.length * p) / 100))];
  return { p50: at(50), p90: at(90), p99: at(99) };
}

const phases = [];
const single = Math.floor(jobs / 5);
const name = `peer-${which}-${Date.now()}`;

// The phases, the same for every peer: `peer` says how to add one job, add
// a chunk of jobs, process `total` jobs (resolving when all are done), get
// ready for round trips (untimed, optional), and do one round trip.
async function runPhases(peer) {
  async function measure(label, n, work, extra = () => ({})) {
    const before = await counters();
    const t = performance.now();
    const out = await work();
    const after = await counters();
    phases.push(phase(label, n, t, before, after, extra(before, after, out)));
  }
  await measure('enqueue (single)', single, () => inFlight(single, 50, peer.addOne));
  const batched = Math.ceil(jobs / chunk) * chunk;
  await measure('enqueue (batch)', batched, async () => {
    for (let n = 0; n < batched; n += chunk) await peer.addChunk();
  }, (before, after) => ({ memory_bytes_per_queued_job: (after.dataset - before.dataset) / batched }));
  await measure('process backlog', single + batched, () => peer.process(single + batched));
  await peer.prepareRoundTrips?.();
  await measure('round trip', roundTrips, async () => {
    const latencies = [];
    for (let i = 0; i < roundTrips; i++) {
      const s = performance.now();
      await peer.roundTrip(i);
      latencies.push(performance.now() - s);
    }
    return latencies;
  }, (_before, _after, latencies) => ({ latency_ms: percentiles(latencies) }));
}

if (which === 'bullmq') {
  const redis = () => new IORedis(url, { maxRetriesPerRequest: null });
  const queue = new Queue(name, { connection: redis() });
  const opts = { removeOnComplete: { count: 1000 } };
  let worker;
  let events;
  await runPhases({
    addOne: (i) => queue.add('job', { i }, opts),
    addChunk: () => queue.addBulk(Array.from({ length: chunk }, (_, i) => ({ name: 'job', data: { i }, opts }))),
    process: (total) => new Promise((resolve) => {
      let done = 0;
      worker = new Worker(name, async () => {}, { concurrency, connection: redis() });
      worker.on('completed', () => { if (++done === total) resolve(); });
    }),
    prepareRoundTrips: async () => {
      events = new QueueEvents(name, { connection: redis() });
      await events.waitUntilReady();
    },
    roundTrip: async (i) => {
      const job = await queue.add('job', { i }, opts);
      await job.waitUntilFinished(events);
    },
  });
  await worker.close();
  await events.close();
  await queue.close();
} else if (which === 'bee') {
  const queue = new BeeQueue(name, { redis: { url }, removeOnSuccess: true, getEvents: true, activateDelayedJobs: false });
  await queue.ready();
  await runPhases({
    addOne: (i) => queue.createJob({ i }).save(),
    addChunk: () => queue.saveAll(Array.from({ length: chunk }, (_, i) => queue.createJob({ i }))),
    process: (total) => new Promise((resolve) => {
      let done = 0;
      queue.on('succeeded', () => { if (++done === total) resolve(); });
      queue.process(concurrency, async () => {});
    }),
    roundTrip: async (i) => {
      const job = queue.createJob({ i });
      const result = new Promise((resolve) => job.on('succeeded', resolve));
      await job.save();
      await result;
    },
  });
  await queue.close();
} else {
  console.error('--which bullmq|bee');
  process.exit(2);
}
console.log(JSON.stringify({ peer: which, phases }));
await admin.quit();
process.exit(0);
