//! Benchmark: enqueue rate (single and batch), processing rate of a backlog
//! with a no-op handler, and round-trip latency, for one mode; with Redis
//! commands, Redis CPU time and Redis memory per job for each phase.
//!
//! ```text
//! cargo run --release --example bench -- --mode reliable --jobs 50000 --concurrency 50
//! cargo run --release --example bench -- --mode recoverable --cluster --queues 12
//! ```
//!
//! Without `REDIS_URL` it starts a throwaway redis-server (or, with
//! `--cluster`, a local cluster of 3 primaries and 3 replicas). Times on a
//! shared machine are noisy: compare ratios measured in the same run.

#[path = "../tests/support/redis_cluster.rs"]
mod redis_cluster;
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use job_async_redis::{Client, Config, Job, Mode, Worker};

#[derive(Parser, Debug, Clone)]
#[command(about = "Benchmark job-async-redis against a throwaway Redis")]
struct Args {
    /// simple, recoverable or reliable.
    #[arg(long, default_value = "reliable")]
    mode: String,
    /// Jobs in the enqueue and processing phases.
    #[arg(long, default_value_t = 50_000)]
    jobs: usize,
    /// Jobs run at once by the worker (per queue in reliable mode).
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Jobs per submit_many call in the batch enqueue phase.
    #[arg(long, default_value_t = 1000)]
    chunk: usize,
    /// Sequential round trips in the latency phase.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Queues the jobs are spread over.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// How long finished jobs' hashes are kept (recoverable and reliable
    /// modes), in milliseconds. Default: the library's (24 hours).
    #[arg(long)]
    result_ttl_ms: Option<u64>,
    /// Use a local Redis Cluster (3 primaries, 3 replicas).
    #[arg(long)]
    cluster: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Instead of the phases: push this many jobs through one queue while a
    /// worker runs (submitted in chunks, at most 20 chunks waiting), sampling
    /// Redis memory, to show that it stays bounded when results expire (use
    /// with --result-ttl-ms).
    #[arg(long)]
    soak: Option<usize>,
    /// Tokio runtime for the client and the worker: "multi-thread" (as
    /// with #[tokio::main]) or "current-thread" (one thread, like the
    /// Node.js peers).
    #[arg(long, default_value = "multi-thread")]
    runtime: String,
}

/// Redis counters summed over the primaries.
#[derive(Default, Clone, Copy)]
struct Counters {
    commands: u64,
    cpu_us: f64,
    dataset: i64,
    used: i64,
}

struct Target {
    primaries: Vec<String>,
    _server: Option<redis_server::RedisServer>,
    _cluster: Option<redis_cluster::RedisCluster>,
    url: String,
}

fn target(args: &Args) -> Target {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Target {
            primaries: vec![url.clone()],
            _server: None,
            _cluster: None,
            url,
        };
    }
    if args.cluster {
        let cluster = redis_cluster::RedisCluster::start();
        let primaries = cluster
            .nodes
            .iter()
            .filter(|n| {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut n.connection())
                    .unwrap();
                info.contains("role:master")
            })
            .map(|n| n.url())
            .collect();
        let url = cluster.url();
        return Target {
            primaries,
            _server: None,
            _cluster: Some(cluster),
            url,
        };
    }
    let server = redis_server::RedisServer::start();
    let url = server.url();
    Target {
        primaries: vec![url.clone()],
        _server: Some(server),
        _cluster: None,
        url,
    }
}

/// A no-op handler that counts the jobs it ran in `done`.
fn counting(
    done: &Arc<AtomicUsize>,
) -> impl Fn(Job<usize>) -> std::future::Ready<Result<(), String>> + Clone + Send + Sync + 'static {
    let done = done.clone();
    move |_job: Job<usize>| {
        done.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(()))
    }
}

fn counters(primaries: &[String]) -> Counters {
    let mut total = Counters::default();
    for url in primaries {
        let mut con = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let info: String = redis::cmd("INFO").arg("all").query(&mut con).unwrap();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        total.cpu_us += ["used_cpu_user:", "used_cpu_sys:"]
            .iter()
            .map(|f| field(f).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) * 1e6)
            .sum::<f64>();
        total.dataset += field("used_memory_dataset:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        total.used += field("used_memory:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        total.commands += info
            .lines()
            .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum::<u64>();
    }
    total
}

#[derive(serde::Serialize, Default)]
struct Phase {
    name: String,
    jobs: usize,
    seconds: f64,
    jobs_per_second: f64,
    commands_per_job: f64,
    redis_cpu_us_per_job: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_bytes_per_queued_job: Option<f64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    latency_ms: BTreeMap<String, f64>,
    /// Highest Redis used_memory seen during the phase, in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_memory_mib: Option<f64>,
}

fn phase(name: &str, jobs: usize, started: Instant, before: Counters, after: Counters) -> Phase {
    let seconds = started.elapsed().as_secs_f64();
    Phase {
        name: name.into(),
        jobs,
        seconds,
        jobs_per_second: jobs as f64 / seconds,
        commands_per_job: (after.commands - before.commands) as f64 / jobs as f64,
        redis_cpu_us_per_job: (after.cpu_us - before.cpu_us) / jobs as f64,
        ..Phase::default()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let runtime = match args.runtime.as_str() {
        "multi-thread" => tokio::runtime::Builder::new_multi_thread(),
        "current-thread" => tokio::runtime::Builder::new_current_thread(),
        other => return Err(format!("unknown runtime {other}").into()),
    }
    .enable_all()
    .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mode = match args.mode.as_str() {
        "simple" => Mode::Simple,
        "recoverable" => Mode::Recoverable,
        "reliable" => Mode::Reliable,
        other => return Err(format!("unknown mode {other}").into()),
    };
    let target = target(&args);
    let config = Config::new(&target.url).block_timeout(Duration::from_millis(500));
    let client = Client::connect(config.clone()).await?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let names: Vec<String> = (0..args.queues)
        .map(|i| format!("bench-{run}-{i}"))
        .collect();
    let mut queues = Vec::new();
    for name in &names {
        queues.push(client.queue(name, mode).await?);
    }
    if let Some(jobs) = args.soak {
        return soak(&args, &target, mode, &config, &queues[0], jobs).await;
    }
    let mut phases = Vec::new();
    let progress = |what: &str| {
        if !args.json {
            eprintln!("{what}...");
        }
    };

    // 1. Enqueue, one job per call (50 calls in flight).
    progress("enqueue, single");
    let single = args.jobs / 5;
    let before = counters(&target.primaries);
    let started = Instant::now();
    let handles: Vec<_> = futures_util::stream::iter(0..single)
        .map(|i| {
            let queue = queues[i % queues.len()].clone();
            async move { queue.submit(&i).await }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    phases.push(phase(
        "enqueue (single)",
        single,
        started,
        before,
        counters(&target.primaries),
    ));
    let mut total_jobs = handles.len();
    drop(handles);

    // 2. Enqueue in chunks, and memory per queued job.
    progress("enqueue, batch");
    let before = counters(&target.primaries);
    let started = Instant::now();
    let numbers: Vec<usize> = (0..args.chunk).collect();
    let mut batches = 0;
    while batches * args.chunk < args.jobs {
        let queue = &queues[batches % queues.len()];
        drop(queue.submit_many(&numbers).await?);
        batches += 1;
    }
    let batch_jobs = batches * args.chunk;
    total_jobs += batch_jobs;
    let after = counters(&target.primaries);
    let mut enqueue = phase("enqueue (batch)", batch_jobs, started, before, after);
    if mode != Mode::Simple {
        enqueue.memory_bytes_per_queued_job =
            Some((after.dataset - before.dataset) as f64 / batch_jobs as f64);
    }
    phases.push(enqueue);

    // 3. Process the backlog with a no-op handler.
    progress("processing the backlog");
    let done = Arc::new(AtomicUsize::new(0));
    let handler = counting(&done);
    let before = counters(&target.primaries);
    let started = Instant::now();
    let mut workers = Vec::new();
    let groups: Vec<Vec<String>> = if mode == Mode::Reliable {
        names.iter().map(|n| vec![n.clone()]).collect()
    } else {
        vec![names.clone()]
    };
    for group in groups {
        let mut builder = Worker::builder(config.clone())
            .mode(mode)
            .concurrency(args.concurrency);
        if let Some(ttl) = args.result_ttl_ms {
            builder = builder.result_ttl(Duration::from_millis(ttl));
        }
        for q in group {
            builder = builder.queue(q);
        }
        let worker = builder.build().await?;
        let shutdown = worker.shutdown_handle();
        workers.push((shutdown, tokio::spawn(worker.run(handler.clone()))));
    }
    let mut last = 0;
    let mut peak = 0;
    while done.load(Ordering::Relaxed) < total_jobs {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = done.load(Ordering::Relaxed);
        if now / 10_000 > last / 10_000 {
            peak = peak.max(counters(&target.primaries).used);
            if !args.json {
                eprintln!("  {now} of {total_jobs}");
            }
        }
        last = now;
    }
    let after = counters(&target.primaries);
    let mut processing = phase("process backlog", total_jobs, started, before, after);
    processing.peak_memory_mib = Some(peak.max(after.used) as f64 / 1_048_576.0);
    phases.push(processing);

    // 4. Round trips: submit one job, await its result, repeat.
    progress("round trips");
    let before = counters(&target.primaries);
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(args.round_trips);
    for i in 0..args.round_trips {
        let t = Instant::now();
        queues[i % queues.len()]
            .submit(&i)
            .await?
            .result::<()>()
            .await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut rt = phase(
        "round trip",
        args.round_trips,
        started,
        before,
        counters(&target.primaries),
    );
    latencies.sort_by(f64::total_cmp);
    for p in [50, 90, 99] {
        rt.latency_ms.insert(
            format!("p{p}"),
            latencies[(latencies.len() * p / 100).min(latencies.len() - 1)],
        );
    }
    phases.push(rt);
    for (shutdown, task) in workers {
        shutdown.shutdown();
        task.await??;
    }

    if args.json {
        let out = serde_json::json!({
            "mode": args.mode, "cluster": args.cluster, "queues": args.queues,
            "concurrency": args.concurrency, "runtime": args.runtime, "phases": phases,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "job-async-redis {} mode, {} queue(s){}, concurrency {}, {} runtime",
        args.mode,
        args.queues,
        if args.cluster {
            ", cluster of 3 primaries"
        } else {
            ""
        },
        args.concurrency,
        args.runtime
    );
    println!(
        "{:<18} {:>8} {:>10} {:>12} {:>14} {:>12} {:>22}",
        "phase", "jobs", "jobs/s", "cmds/job", "redis µs/job", "mem B/job", "p50/p90/p99 ms"
    );
    for p in &phases {
        let lat = if p.latency_ms.is_empty() {
            String::new()
        } else {
            format!(
                "{:.2}/{:.2}/{:.2}",
                p.latency_ms["p50"], p.latency_ms["p90"], p.latency_ms["p99"]
            )
        };
        let mem = p
            .memory_bytes_per_queued_job
            .map(|m| format!("{m:.0}"))
            .unwrap_or_default();
        println!(
            "{:<18} {:>8} {:>10.0} {:>12.2} {:>14.1} {:>12} {:>22}",
            p.name, p.jobs, p.jobs_per_second, p.commands_per_job, p.redis_cpu_us_per_job, mem, lat
        );
    }
    if let Some(peak) = phases.iter().find_map(|p| p.peak_memory_mib) {
        println!("peak Redis used_memory while processing: {peak:.1} MiB");
    }
    Ok(())
}

/// Memory over a long run: submits `jobs` in chunks while a worker runs,
/// keeping at most 20 chunks waiting, and samples Redis used_memory and the
/// number of keys; then waits for the results to expire.
async fn soak(
    args: &Args,
    target: &Target,
    mode: Mode,
    config: &Config,
    queue: &job_async_redis::Queue,
    jobs: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let keys = |url: &str| -> i64 {
        let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
        redis::cmd("DBSIZE").query(&mut con).unwrap()
    };
    let ttl = Duration::from_millis(args.result_ttl_ms.unwrap_or(86_400_000));
    let done = Arc::new(AtomicUsize::new(0));
    let handler = counting(&done);
    let worker = Worker::builder(config.clone())
        .mode(mode)
        .concurrency(args.concurrency)
        .result_ttl(ttl)
        .queue(queue.name())
        .build()
        .await?;
    let shutdown = worker.shutdown_handle();
    let running = tokio::spawn(worker.run(handler));
    let baseline = counters(&target.primaries).used;
    let numbers: Vec<usize> = (0..args.chunk).collect();
    let started = Instant::now();
    let mut samples: Vec<serde_json::Value> = Vec::new();
    let mut submitted = 0;
    let mut next_sample = Duration::ZERO;
    let mut peak = 0;
    while done.load(Ordering::Relaxed) < jobs {
        if submitted < jobs && submitted - done.load(Ordering::Relaxed) < 20 * args.chunk {
            drop(
                queue
                    .submit_many(&numbers[..args.chunk.min(jobs - submitted)])
                    .await?,
            );
            submitted += args.chunk.min(jobs - submitted);
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if started.elapsed() >= next_sample {
            next_sample += Duration::from_secs(1);
            let used = counters(&target.primaries).used;
            peak = peak.max(used);
            let sample = serde_json::json!({
                "seconds": started.elapsed().as_secs(),
                "processed": done.load(Ordering::Relaxed),
                "used_memory_mib": used as f64 / 1_048_576.0,
                "keys": keys(&target.primaries[0]),
            });
            if !args.json {
                eprintln!("{sample}");
            }
            samples.push(sample);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let at_end = counters(&target.primaries).used;
    shutdown.shutdown();
    running.await??;
    // Let the last results expire (Redis expires keys actively, in cycles).
    tokio::time::sleep(ttl + Duration::from_secs(3)).await;
    let after = counters(&target.primaries).used;
    let out = serde_json::json!({
        "mode": args.mode, "soak_jobs": jobs, "seconds": seconds,
        "jobs_per_second": jobs as f64 / seconds, "result_ttl_ms": ttl.as_millis() as u64,
        "used_memory_mib": {
            "before": baseline as f64 / 1_048_576.0,
            "peak": peak.max(at_end) as f64 / 1_048_576.0,
            "at_end": at_end as f64 / 1_048_576.0,
            "after_ttl": after as f64 / 1_048_576.0,
        },
        "keys_after_ttl": keys(&target.primaries[0]),
        "samples": samples,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "soak: {jobs} jobs in {seconds:.0} s ({:.0} jobs/s), result TTL {} ms",
            jobs as f64 / seconds,
            ttl.as_millis()
        );
        println!(
            "Redis used_memory: {:.1} MiB before, {:.1} MiB peak, {:.1} MiB at the end, {:.1} MiB once the results expired ({} keys left)",
            out["used_memory_mib"]["before"].as_f64().unwrap_or(0.0),
            out["used_memory_mib"]["peak"].as_f64().unwrap_or(0.0),
            out["used_memory_mib"]["at_end"].as_f64().unwrap_or(0.0),
            out["used_memory_mib"]["after_ttl"].as_f64().unwrap_or(0.0),
            out["keys_after_ttl"],
        );
    }
    Ok(())
}
