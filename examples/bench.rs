//! Benchmark: enqueue rate (single and batch), processing rate of a backlog
//! with a no-op handler, and round-trip latency, for one mode; with Redis
//! commands, Redis CPU time and Redis memory per job for each phase.
//!
//! ```text
//! cargo run --release --example bench -- --mode reliable --jobs 50000 --concurrency 50
//! cargo run --release --example bench -- --mode recoverable --cluster --queues 12
//! cargo run --release --example bench -- --mode reliable --delayed
//! cargo run --release --example bench -- --mode recoverable --controls
//! ```
//!
//! `--delayed` runs the delayed-jobs phases instead (see [`delayed`]): how
//! late delayed jobs start, what promoting them costs Redis, and what idle
//! workers cost Redis. `--controls` runs the batch enqueue and backlog
//! phases with each queue control or job feature on but never binding, and
//! without any, each on a fresh queue (see [`controls`]): what the features
//! cost when used.
//!
//! Without `REDIS_URL` it starts a throwaway redis-server (or, with
//! `--cluster`, a local cluster of 3 primaries and 3 replicas). Times on a
//! shared machine are noisy: compare ratios measured in the same run.

#[path = "../tests/support/redis_cluster.rs"]
mod redis_cluster;
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use job_async_redis::keys::QueueKeys;
use job_async_redis::{
    Client, Config, Job, JobOptions, Mode, Queue, RateLimit, ShutdownHandle, Unique, Worker,
};

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
    /// Instead of the phases: the delayed-jobs phases (lateness, promotion
    /// cost, idle cost), against one server (not --cluster).
    #[arg(long)]
    delayed: bool,
    /// Which delayed-jobs phases to run.
    #[arg(long, value_delimiter = ',', default_value = "lateness,promotion,idle")]
    delayed_phases: Vec<String>,
    /// Delayed jobs in each lateness phase (due 1 to 4 s after their submit).
    #[arg(long, default_value_t = 2000)]
    delayed_jobs: usize,
    /// Busy lateness phase: the load, as a fraction of the measured capacity.
    #[arg(long, default_value_t = 0.6)]
    busy_load: f64,
    /// Promotion phase: sizes of the delayed set (jobs an hour away).
    #[arg(long, value_delimiter = ',', default_value = "1000,1000000")]
    promote_waiting: Vec<usize>,
    /// Promotion phase: jobs that come due (in each pattern).
    #[arg(long, default_value_t = 10_000)]
    promote_due: usize,
    /// Idle phase: workers on the queue.
    #[arg(long, default_value_t = 100)]
    idle_workers: usize,
    /// Idle phase: measured seconds (after a 12.5 s warm-up); a multiple of
    /// 60 s, the period of the longest periodic call (the clock wait).
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Instead of the phases: the batch enqueue and backlog phases once per
    /// variant of --controls-variants, each on a fresh queue (recoverable
    /// and reliable modes, not --cluster).
    #[arg(long)]
    controls: bool,
    /// Which variants --controls runs besides "plain" (always run: the
    /// baseline): events, rate, concurrency, unique.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "events,rate,concurrency,unique"
    )]
    controls_variants: Vec<String>,
    /// Rounds of --controls: each runs every variant once, in an order
    /// rotated by one each round; the figures are medians over the rounds.
    #[arg(long, default_value_t = 3)]
    controls_rounds: usize,
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
    if args.delayed {
        return delayed(&args, &target, mode, &client, &run).await;
    }
    if args.controls {
        return controls(&args, &target, mode, &config, &client, &run).await;
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
    let enqueue = enqueue_batch(&args, &target, mode, &queues, |_| JobOptions::default()).await?;
    total_jobs += enqueue.jobs;
    phases.push(enqueue);

    // 3. Process the backlog with a no-op handler.
    progress("processing the backlog");
    let (processing, workers) =
        process_backlog(&args, &target, mode, &config, &names, total_jobs).await?;
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
    stop(workers).await?;

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

/// The batch enqueue phase: at least `--jobs` jobs in `submit_many_with`
/// calls of `--chunk` jobs, the calls spread over `queues` in turn; job `i`
/// (counted from 0) gets `options(i)`. With the memory per queued job in
/// recoverable and reliable modes.
async fn enqueue_batch(
    args: &Args,
    target: &Target,
    mode: Mode,
    queues: &[Queue],
    options: impl Fn(usize) -> JobOptions,
) -> Result<Phase, job_async_redis::Error> {
    let before = counters(&target.primaries);
    let started = Instant::now();
    let numbers: Vec<usize> = (0..args.chunk).collect();
    let mut batches = 0;
    while batches * args.chunk < args.jobs {
        let queue = &queues[batches % queues.len()];
        let first = batches * args.chunk;
        let jobs = numbers.iter().map(|i| (i, options(first + i)));
        drop(queue.submit_many_with(jobs).await?);
        batches += 1;
    }
    let jobs = batches * args.chunk;
    let after = counters(&target.primaries);
    let mut enqueue = phase("enqueue (batch)", jobs, started, before, after);
    if mode != Mode::Simple {
        enqueue.memory_bytes_per_queued_job =
            Some((after.dataset - before.dataset) as f64 / jobs as f64);
    }
    Ok(enqueue)
}

/// The backlog phase: starts workers with a no-op handler on the queues
/// `names` (one worker per queue in reliable mode, one for all of them
/// otherwise) and waits until they have run `jobs` jobs, sampling Redis
/// memory every 10,000. Returns the phase and the workers, still running.
async fn process_backlog(
    args: &Args,
    target: &Target,
    mode: Mode,
    config: &Config,
    names: &[String],
    jobs: usize,
) -> Result<(Phase, Vec<Running>), job_async_redis::Error> {
    let done = Arc::new(AtomicUsize::new(0));
    let handler = counting(&done);
    let before = counters(&target.primaries);
    let started = Instant::now();
    let mut workers = Vec::new();
    let groups: Vec<&[String]> = if mode == Mode::Reliable {
        names.chunks(1).collect()
    } else {
        vec![names]
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
    while done.load(Ordering::Relaxed) < jobs {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = done.load(Ordering::Relaxed);
        if now / 10_000 > last / 10_000 {
            peak = peak.max(counters(&target.primaries).used);
            if !args.json {
                eprintln!("  {now} of {jobs}");
            }
        }
        last = now;
    }
    let after = counters(&target.primaries);
    let mut processing = phase("process backlog", jobs, started, before, after);
    processing.peak_memory_mib = Some(peak.max(after.used) as f64 / 1_048_576.0);
    Ok((processing, workers))
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

/// The delayed-jobs phases (`--delayed`), each on a fresh queue:
///
/// 1. lateness: how long after its due time a delayed job starts, with an
///    idle worker and with a busy one (see [`lateness_busy`]);
/// 2. promotion: Redis time of `job_promote` per promoted job, with 1,000
///    and with 1,000,000 jobs waiting in the delayed set;
/// 3. idle: Redis commands and CPU time of idle workers, on a queue whose
///    only delayed job is an hour away and on one with none (and of no
///    worker at all, the server's own baseline).
///
/// Workers have the library's default settings (the other phases use a
/// 500 ms block timeout), except for their concurrency.
async fn delayed(
    args: &Args,
    target: &Target,
    mode: Mode,
    client: &Client,
    run: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    if args.cluster {
        return Err("--delayed runs against one server: drop --cluster".into());
    }
    let config = Config::new(&target.url);
    let progress = |what: &str| {
        if !args.json {
            eprintln!("{what}...");
        }
    };
    let wanted = |phase: &str| args.delayed_phases.iter().any(|p| p == phase);
    let mut lateness = Vec::new();
    if wanted("lateness") {
        progress("lateness, idle worker");
        let queue = client
            .queue(&format!("bench-{run}-late-idle"), mode)
            .await?;
        lateness.push(lateness_idle(args, &config, mode, &queue).await?);
        progress("lateness, busy worker");
        let queue = client
            .queue(&format!("bench-{run}-late-busy"), mode)
            .await?;
        lateness.push(lateness_busy(args, &config, mode, &queue).await?);
    }
    let mut promotion = Vec::new();
    if wanted("promotion") {
        for &waiting in &args.promote_waiting {
            progress(&format!("promotion, {waiting} jobs waiting"));
            let name = format!("bench-{run}-promote-{waiting}");
            let queue = client.queue(&name, mode).await?;
            promotion.extend(promotion_cost(args, &config, mode, &queue, waiting).await?);
        }
    }
    let mut idle = Vec::new();
    if wanted("idle") {
        let cases = [
            ("no workers (baseline)", 0, false),
            ("idle, a delayed job in 1 h", args.idle_workers, true),
            ("idle, no delayed job", args.idle_workers, false),
        ];
        for (i, (what, workers, with_delayed)) in cases.into_iter().enumerate() {
            progress(&format!(
                "{what}: {workers} workers, {} s",
                args.idle_seconds
            ));
            let queue = client.queue(&format!("bench-{run}-idle-{i}"), mode).await?;
            idle.push(idle_cost(args, &config, mode, &queue, what, workers, with_delayed).await?);
        }
    }
    if args.json {
        let out = serde_json::json!({
            "mode": args.mode, "concurrency": args.concurrency, "runtime": args.runtime,
            "delayed": { "lateness": lateness, "promotion": promotion, "idle": idle },
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    print_delayed(args, &lateness, &promotion, &idle);
    Ok(())
}

/// How late delayed jobs started, in ms after their due time.
#[derive(serde::Serialize)]
struct Lateness {
    name: String,
    jobs: usize,
    /// Handler start (this machine's clock, µs) − due time: min (a check:
    /// never below 0), p50, p99 and max.
    ms: BTreeMap<String, f64>,
    /// The job hash's started_ms − due_ms (whole ms, both the server's
    /// clock); recoverable and reliable modes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    server_ms: BTreeMap<String, f64>,
    /// The busy phase's load.
    #[serde(skip_serializing_if = "Option::is_none")]
    load: Option<Load>,
}

/// The stream of other jobs in the busy lateness phase.
#[derive(serde::Serialize)]
struct Load {
    /// Jobs per second the worker ran from a backlog of load jobs.
    capacity_jobs_per_second: f64,
    /// Jobs per second submitted while the delayed jobs came due.
    jobs_per_second: f64,
    /// Length of the pending list, sampled every 100 ms.
    pending_p50: usize,
    pending_max: usize,
}

/// Redis time of the `job_promote` calls that moved `jobs` due jobs.
#[derive(serde::Serialize)]
struct Promotion {
    name: String,
    /// Jobs in the delayed set due an hour or more later.
    waiting: usize,
    jobs: usize,
    calls: usize,
    redis_us_per_call: f64,
    /// The median call: less swayed than the mean by a call that the
    /// machine's other work slowed down.
    redis_us_per_call_p50: f64,
    redis_us_per_job: f64,
}

/// Redis load of idle workers.
#[derive(serde::Serialize)]
struct IdleCost {
    name: String,
    workers: usize,
    seconds: f64,
    /// Commands clients sent (round trips), per second.
    commands_per_second: f64,
    /// INFO total_commands_processed per second: also those run inside
    /// scripts (the bench's own left out).
    all_commands_per_second: f64,
    /// Redis CPU time (user + system), ms per second.
    redis_cpu_ms_per_second: f64,
    /// Commands sent per second by name; scripts as "EVALSHA <script>".
    by_command: BTreeMap<String, f64>,
    /// Commands run inside each script, per second.
    inside_scripts: BTreeMap<String, f64>,
}

/// Start times of delayed jobs, recorded by their handler: (job ID, due
/// time, start time), in µs since the Unix epoch on this machine's clock,
/// which the local Redis server shares.
type Starts = Arc<Mutex<Vec<(String, u64, u64)>>>;

/// A running worker: its shutdown handle and its task.
type Running = (
    ShutdownHandle,
    tokio::task::JoinHandle<Result<job_async_redis::WorkerStats, job_async_redis::Error>>,
);

fn epoch_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn connect(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

fn queue_keys(config: &Config, queue: &Queue) -> QueueKeys {
    QueueKeys::new(&config.prefix, queue.name()).unwrap()
}

/// The handler of the lateness phases. A job whose payload is not 0 is a
/// delayed job, its payload its due time (µs since the epoch): it records
/// its start in `starts` and counts in `delayed`. A job with payload 0 is
/// load: it sleeps 1 to 2 ms and counts in `load`.
fn timed(
    starts: &Starts,
    delayed: &Arc<AtomicUsize>,
    load: &Arc<AtomicUsize>,
) -> impl Fn(Job<u64>) -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static {
    use futures_util::FutureExt;
    let (starts, delayed, load) = (starts.clone(), delayed.clone(), load.clone());
    move |job: Job<u64>| {
        if job.payload == 0 {
            let load = load.clone();
            return async move {
                tokio::time::sleep(Duration::from_micros(1000 + fastrand::u64(0..1000))).await;
                load.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            .boxed();
        }
        let now = epoch_us(SystemTime::now());
        starts.lock().unwrap().push((job.id, job.payload, now));
        delayed.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(())).boxed()
    }
}

/// Starts a worker on one queue with the settings of `config` and the
/// library's defaults.
async fn spawn_worker<P, F, Fut>(
    config: &Config,
    mode: Mode,
    queue: &str,
    concurrency: usize,
    handler: F,
) -> Result<Running, job_async_redis::Error>
where
    P: serde::de::DeserializeOwned + Send + 'static,
    F: Fn(Job<P>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let worker = Worker::builder(config.clone())
        .mode(mode)
        .queue(queue)
        .concurrency(concurrency)
        .build()
        .await?;
    let shutdown = worker.shutdown_handle();
    Ok((shutdown, tokio::spawn(worker.run(handler))))
}

/// Stops workers (all at once) and waits for them.
async fn stop(workers: Vec<Running>) -> Result<(), Box<dyn std::error::Error>> {
    for (shutdown, _) in &workers {
        shutdown.shutdown();
    }
    for (_, task) in workers {
        task.await??;
    }
    Ok(())
}

/// Waits until `counter` reaches `n`; an error after `timeout`.
async fn wait_for(
    counter: &AtomicUsize,
    n: usize,
    timeout: Duration,
    what: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = Instant::now() + timeout;
    while counter.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            let got = counter.load(Ordering::Relaxed);
            return Err(format!("{what}: {got} of {n} after {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Submits `n` delayed jobs due at random whole ms between `from` and
/// `from + spread` from now, `chunk` per `submit_many_with` call. They are
/// given as run-at times, so that their due times are known exactly in
/// every mode (a delay counts from the server's clock when the script
/// runs); each payload is its due time.
async fn submit_delayed(
    queue: &Queue,
    n: usize,
    from: Duration,
    spread: Duration,
    chunk: usize,
) -> Result<(), job_async_redis::Error> {
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk);
        let now_ms = epoch_us(SystemTime::now()) / 1000 + from.as_millis() as u64;
        let dues: Vec<u64> = (0..k)
            .map(|_| (now_ms + fastrand::u64(0..=spread.as_millis() as u64)) * 1000)
            .collect();
        let jobs = dues.iter().map(|due| {
            let at = UNIX_EPOCH + Duration::from_micros(*due);
            (due, JobOptions::default().run_at(at))
        });
        drop(queue.submit_many_with(jobs).await?);
        left -= k;
    }
    Ok(())
}

/// Submits load jobs (payload 0) at `rate` per second, every 10 ms, until
/// `stop`; returns how many, and over how many seconds.
async fn stream(
    queue: Queue,
    rate: f64,
    stop: Arc<AtomicBool>,
) -> Result<(usize, f64), job_async_redis::Error> {
    let zeros = vec![0u64; 10_000];
    let started = Instant::now();
    let mut sent = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let owed = (started.elapsed().as_secs_f64() * rate) as usize;
        let n = owed.saturating_sub(sent).min(zeros.len());
        if n > 0 {
            drop(queue.submit_many(&zeros[..n]).await?);
            sent += n;
        }
    }
    Ok((sent, started.elapsed().as_secs_f64()))
}

/// Each delayed job's lateness in ms: handler start − due time (its
/// run-at time); and in recoverable and reliable modes the server's own
/// figure, started_ms − due_ms from the job's hash (whole ms).
fn lateness(
    url: &str,
    keys: &QueueKeys,
    mode: Mode,
    starts: &[(String, u64, u64)],
) -> (Vec<f64>, Vec<f64>) {
    let local = starts
        .iter()
        .map(|(_, due, start)| (*start as f64 - *due as f64) / 1000.0)
        .collect();
    if mode == Mode::Simple {
        return (local, Vec::new());
    }
    let mut con = connect(url);
    let mut server = Vec::new();
    for chunk in starts.chunks(1000) {
        let mut pipe = redis::pipe();
        for (id, _, _) in chunk {
            pipe.cmd("HMGET")
                .arg(keys.job(id))
                .arg("due_ms")
                .arg("started_ms");
        }
        let rows: Vec<(Option<u64>, Option<u64>)> = pipe.query(&mut con).unwrap();
        for ((id, due, _), (due_ms, started)) in chunk.iter().zip(rows) {
            let (Some(due_ms), Some(started)) = (due_ms, started) else {
                panic!("job {id} has no due_ms or started_ms");
            };
            assert_eq!(
                due_ms * 1000,
                *due,
                "job {id}: due_ms is not its run-at time"
            );
            server.push(started as f64 - due_ms as f64);
        }
    }
    (local, server)
}

/// min, p50, p99 and max of `v`.
fn summary(mut v: Vec<f64>) -> BTreeMap<String, f64> {
    if v.is_empty() {
        return BTreeMap::new();
    }
    v.sort_by(f64::total_cmp);
    let at = |p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
    BTreeMap::from([
        ("min".to_owned(), v[0]),
        ("p50".to_owned(), at(50)),
        ("p99".to_owned(), at(99)),
        ("max".to_owned(), v[v.len() - 1]),
    ])
}

/// Lateness with an idle worker: one worker (which becomes the timekeeper)
/// and nothing else to run; the jobs are due 1 to 4 s after their submit.
async fn lateness_idle(
    args: &Args,
    config: &Config,
    mode: Mode,
    queue: &Queue,
) -> Result<Lateness, Box<dyn std::error::Error>> {
    let starts = Starts::default();
    let (delayed, load) = (Arc::default(), Arc::default());
    let handler = timed(&starts, &delayed, &load);
    let worker = spawn_worker(config, mode, queue.name(), args.concurrency, handler).await?;
    // Let it take the timekeeper role and block on the clock list.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (from, spread) = (Duration::from_secs(1), Duration::from_secs(3));
    submit_delayed(queue, args.delayed_jobs, from, spread, args.chunk).await?;
    wait_for(
        &delayed,
        args.delayed_jobs,
        Duration::from_secs(60),
        "delayed jobs",
    )
    .await?;
    stop(vec![worker]).await?;
    let keys = queue_keys(config, queue);
    let (local, server) = lateness(&config.url, &keys, mode, &starts.lock().unwrap());
    Ok(Lateness {
        name: "idle worker".into(),
        jobs: local.len(),
        ms: summary(local),
        server_ms: summary(server),
        load: None,
    })
}

/// Lateness with a busy worker: the same worker also runs a stream of load
/// jobs (1 to 2 ms each) at `--busy-load` of the rate at which it runs a
/// backlog of them. Its slots are then far from full (50 slots of 1.5 ms
/// would run 33,000 jobs/s): what bounds it is CPU, the worker's and
/// Redis's on this machine, so a due job rarely waits for a slot. It does
/// wait in the pending list behind the load jobs queued there: this
/// lateness is the promotion's delay plus that wait, as a user sees it.
async fn lateness_busy(
    args: &Args,
    config: &Config,
    mode: Mode,
    queue: &Queue,
) -> Result<Lateness, Box<dyn std::error::Error>> {
    let starts = Starts::default();
    let (delayed, load) = (Arc::default(), Arc::<AtomicUsize>::default());
    let handler = timed(&starts, &delayed, &load);
    let worker = spawn_worker(config, mode, queue.name(), args.concurrency, handler).await?;
    // Capacity: a backlog of 20,000 load jobs, submitted as it runs.
    let zeros = vec![0u64; args.chunk];
    let started = Instant::now();
    let mut backlog = 0;
    while backlog < 20_000 {
        drop(queue.submit_many(&zeros).await?);
        backlog += zeros.len();
    }
    wait_for(&load, backlog, Duration::from_secs(120), "backlog").await?;
    let capacity = backlog as f64 / started.elapsed().as_secs_f64();
    // The stream, and after 2 s the delayed jobs.
    let halt = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn(stream(
        queue.clone(),
        capacity * args.busy_load,
        halt.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (from, spread) = (Duration::from_secs(1), Duration::from_secs(3));
    submit_delayed(queue, args.delayed_jobs, from, spread, args.chunk).await?;
    let keys = queue_keys(config, queue);
    let mut con = connect(&config.url);
    let mut pending: Vec<usize> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while delayed.load(Ordering::Relaxed) < args.delayed_jobs {
        if Instant::now() > deadline {
            return Err("busy phase: the delayed jobs did not all run within 60 s".into());
        }
        pending.push(redis::cmd("LLEN").arg(keys.pending()).query(&mut con)?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    halt.store(true, Ordering::Relaxed);
    let (streamed, seconds) = producer.await??;
    wait_for(&load, backlog + streamed, Duration::from_secs(120), "load").await?;
    stop(vec![worker]).await?;
    pending.sort_unstable();
    let (local, server) = lateness(&config.url, &keys, mode, &starts.lock().unwrap());
    Ok(Lateness {
        name: format!("busy worker ({:.0}% load)", args.busy_load * 100.0),
        jobs: local.len(),
        ms: summary(local),
        server_ms: summary(server),
        load: Some(Load {
            capacity_jobs_per_second: capacity,
            jobs_per_second: streamed as f64 / seconds,
            pending_p50: pending.get(pending.len() / 2).copied().unwrap_or(0),
            pending_max: pending.last().copied().unwrap_or(0),
        }),
    })
}

/// Fills a delayed set with `n` fake members due an hour or more from now,
/// 10,000 per ZADD. They are never promoted: what a promotion costs
/// depends on the size of the set, not on what its members are.
fn fill_delayed(url: &str, key: &str, n: usize) {
    let mut con = connect(url);
    let due = epoch_us(SystemTime::now()) / 1000 + 3_600_000;
    for first in (0..n).step_by(10_000) {
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(key);
        for i in first..n.min(first + 10_000) {
            zadd.arg(due + i as u64)
                .arg(format!("00000000-0000-4000-8000-{i:012x}"));
        }
        let _: i64 = zadd.query(&mut con).unwrap();
    }
}

/// The SHA1 of an embedded script.
fn script_sha(name: &str) -> String {
    job_async_redis::scripts::all()
        .iter()
        .find(|s| s.name() == name)
        .map(|s| s.sha1().to_ascii_lowercase())
        .unwrap_or_else(|| panic!("no script {name}"))
}

/// Redis time of `job_promote` per promoted job, with `waiting` jobs due an
/// hour away in the queue's delayed set: `--promote-due` jobs come due 1 s
/// after their submit, all at the same time ("burst", `run_at`) or spread
/// over a second ("spread", `delay`), and the timekeeper promotes them. The
/// script's own run time is summed from SLOWLOG (threshold 0), whose
/// entries name the script's SHA1; it leaves out reading the call and
/// writing the reply. The worker runs one job and holds it, so that the
/// promoted jobs stay in the pending list and the log holds little else.
async fn promotion_cost(
    args: &Args,
    config: &Config,
    mode: Mode,
    queue: &Queue,
    waiting: usize,
) -> Result<Vec<Promotion>, Box<dyn std::error::Error>> {
    let keys = queue_keys(config, queue);
    fill_delayed(&config.url, &keys.delayed(), waiting);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let handler = move |_job: Job<u64>| {
        let held = held.clone();
        async move {
            let _ = held.acquire().await; // until the gate is closed
            Ok(())
        }
    };
    let worker = spawn_worker(config, mode, queue.name(), 1, handler).await?;
    // Let it take the timekeeper role and block on the clock list.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sha = script_sha("job_promote");
    let mut probe = Probe::open(&config.url);
    let payloads = vec![0u64; args.promote_due];
    let mut out = Vec::new();
    for pattern in ["burst", "spread"] {
        probe.slowlog_start();
        let at = SystemTime::now() + Duration::from_secs(1);
        for chunk in payloads.chunks(args.chunk) {
            let jobs = chunk.iter().map(|p| {
                let options = JobOptions::default();
                let options = if pattern == "burst" {
                    options.run_at(at)
                } else {
                    options.delay(Duration::from_millis(1000 + fastrand::u64(0..1000)))
                };
                (p, options)
            });
            drop(queue.submit_many_with(jobs).await?);
        }
        // Until only the far ones are left.
        let deadline = Instant::now() + Duration::from_secs(60);
        while probe.query::<usize>(redis::cmd("ZCARD").arg(keys.delayed())) > waiting {
            if Instant::now() > deadline {
                return Err("promotion: the due jobs were not promoted within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        probe.slowlog_stop();
        let taken = probe.slowlog_take();
        let mut calls: Vec<i64> = taken
            .iter()
            .filter(|e| e.script().as_deref() == Some(sha.as_str()))
            .map(|e| e.us)
            .collect();
        calls.sort_unstable();
        let us = calls.iter().sum::<i64>() as f64;
        out.push(Promotion {
            name: format!("{waiting} waiting, {pattern}"),
            waiting,
            jobs: args.promote_due,
            calls: calls.len(),
            redis_us_per_call: us / calls.len().max(1) as f64,
            redis_us_per_call_p50: calls.get(calls.len() / 2).copied().unwrap_or(0) as f64,
            redis_us_per_job: us / args.promote_due as f64,
        });
    }
    gate.close();
    stop(vec![worker]).await?;
    let mut con = connect(&config.url);
    let _: i64 = redis::cmd("UNLINK")
        .arg(keys.delayed())
        .arg(keys.pending())
        .arg(keys.tickets())
        .query(&mut con)?;
    Ok(out)
}

/// Blocking pops: SLOWLOG leaves out those that time out, so they are
/// counted from INFO commandstats instead.
const BLOCKING: [&str; 8] = [
    "blpop",
    "brpop",
    "brpoplpush",
    "blmove",
    "blmpop",
    "bzpopmin",
    "bzpopmax",
    "bzmpop",
];

/// Redis load of `workers` idle workers on one queue, with the library's
/// default settings (lease 30 s, block timeout 5 s, concurrency 10),
/// measured for `--idle-seconds` after a warm-up of 12.5 s. The workers
/// start together, so their periodic calls (every 5, 10, 15 and 60 s from
/// the start) fall evenly into a window of a multiple of 60 s that starts
/// between two of them. With `with_delayed`, the queue holds one job due in
/// an hour.
///
/// Commands sent are counted from SLOWLOG (threshold 0), the blocking pops
/// from INFO commandstats; commands that scripts run are logged as from a
/// client without an address, just before their script's entry.
async fn idle_cost(
    args: &Args,
    config: &Config,
    mode: Mode,
    queue: &Queue,
    what: &str,
    workers: usize,
    with_delayed: bool,
) -> Result<IdleCost, Box<dyn std::error::Error>> {
    if with_delayed {
        let later = JobOptions::default().delay(Duration::from_secs(3600));
        drop(queue.submit_with(&1u64, later).await?);
    }
    let noop = |_job: Job<u64>| std::future::ready(Ok::<(), String>(()));
    let mut running = Vec::new();
    for _ in 0..workers {
        running.push(spawn_worker(config, mode, queue.name(), 10, noop).await?);
    }
    tokio::time::sleep(Duration::from_millis(12_500)).await;
    let mut probe = Probe::open(&config.url);
    let sent = probe.sent;
    let before = probe.info();
    let started = Instant::now();
    probe.slowlog_start();
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    probe.slowlog_stop();
    // INFO counts the commands before it: the first INFO and the others
    // sent in between.
    let own = probe.sent - sent;
    let after = probe.info();
    let seconds = started.elapsed().as_secs_f64();
    let logged = probe.slowlog_take();
    stop(running).await?;

    let (mut sent_by, inside) = tally(&logged);
    for name in BLOCKING {
        let calls = cmdstat_calls(&after, name) - cmdstat_calls(&before, name);
        if calls > 0 {
            sent_by.insert(name.to_uppercase(), calls);
        }
    }
    let field = |info: &str, name: &str| -> f64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let delta = |name: &str| field(&after, name) - field(&before, name);
    let per_second = |m: BTreeMap<String, u64>| -> BTreeMap<String, f64> {
        m.into_iter()
            .map(|(k, v)| (k, v as f64 / seconds))
            .collect()
    };
    Ok(IdleCost {
        name: what.into(),
        workers,
        seconds,
        commands_per_second: sent_by.values().sum::<u64>() as f64 / seconds,
        all_commands_per_second: (delta("total_commands_processed") - own as f64) / seconds,
        redis_cpu_ms_per_second: (delta("used_cpu_user") + delta("used_cpu_sys")) * 1000.0
            / seconds,
        by_command: per_second(sent_by),
        inside_scripts: per_second(inside),
    })
}

/// Calls of one command in INFO commandstats.
fn cmdstat_calls(info: &str, name: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Commands sent, by name (scripts as "EVALSHA <script>"), and the commands
/// run inside each script, from SLOWLOG entries. The bench's own commands
/// and the blocking pops (see [`BLOCKING`]) are left out.
fn tally(logged: &[Logged]) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let names: HashMap<String, &str> = job_async_redis::scripts::all()
        .iter()
        .map(|s| (s.sha1().to_ascii_lowercase(), s.name()))
        .collect();
    let (mut sent, mut inside) = (BTreeMap::new(), BTreeMap::new());
    let mut nested = 0;
    for entry in logged {
        if entry.nested() {
            nested += 1;
            continue;
        }
        let command = entry.command();
        if entry.name == PROBE || BLOCKING.contains(&command.to_lowercase().as_str()) {
            nested = 0;
            continue;
        }
        let key = match entry.script() {
            Some(sha) => format!("EVALSHA {}", names.get(&sha).unwrap_or(&"(unknown)")),
            None => command,
        };
        if key.starts_with("EVAL") {
            *inside.entry(key.clone()).or_default() += nested;
        }
        nested = 0;
        *sent.entry(key).or_default() += 1;
    }
    (sent, inside)
}

/// The client name of the bench's own connection.
const PROBE: &str = "bench-probe";

/// One SLOWLOG entry.
struct Logged {
    id: i64,
    us: i64,
    args: Vec<Vec<u8>>,
    addr: String,
    name: String,
}

impl Logged {
    fn command(&self) -> String {
        self.args
            .first()
            .map(|a| String::from_utf8_lossy(a).to_uppercase())
            .unwrap_or_default()
    }

    /// The SHA1 of an EVALSHA.
    fn script(&self) -> Option<String> {
        let sha = self.args.get(1).filter(|_| self.command() == "EVALSHA")?;
        Some(String::from_utf8_lossy(sha).to_ascii_lowercase())
    }

    /// Run by a script (the scripting client has no address: "?:0").
    fn nested(&self) -> bool {
        self.addr.starts_with('?')
    }
}

/// A connection of the bench's own, named [`PROBE`] so that its commands
/// can be told apart in SLOWLOG; it counts the commands it sends.
struct Probe {
    con: redis::Connection,
    sent: u64,
    /// The server's SLOWLOG settings, put back by `slowlog_stop` and
    /// `slowlog_take`.
    saved: Vec<(String, String)>,
}

impl Probe {
    fn open(url: &str) -> Self {
        let mut con = connect(url);
        let _: () = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(PROBE)
            .query(&mut con)
            .unwrap();
        Self {
            con,
            sent: 0,
            saved: Vec::new(),
        }
    }

    fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> T {
        self.sent += 1;
        cmd.query(&mut self.con).unwrap()
    }

    fn info(&mut self) -> String {
        self.query(redis::cmd("INFO").arg("all"))
    }

    /// Logs every command from now on (up to 10^6 of them).
    fn slowlog_start(&mut self) {
        let saved: HashMap<String, String> =
            self.query(redis::cmd("CONFIG").arg("GET").arg("slowlog-*"));
        self.saved = saved.into_iter().collect();
        let _: () = self.query(
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("slowlog-max-len")
                .arg(1_000_000)
                .arg("slowlog-log-slower-than")
                .arg(0),
        );
        let _: () = self.query(redis::cmd("SLOWLOG").arg("RESET"));
    }

    /// Stops logging (puts the server's threshold back).
    fn slowlog_stop(&mut self) {
        self.restore("slowlog-log-slower-than");
    }

    /// Puts one of the server's SLOWLOG settings back.
    fn restore(&mut self, name: &str) {
        if let Some((_, value)) = self.saved.iter().find(|(n, _)| n == name) {
            let value = value.clone();
            let _: () = self.query(redis::cmd("CONFIG").arg("SET").arg(name).arg(value));
        }
    }

    /// The entries logged, oldest first; empties the log and puts its
    /// length back (which would have cut it).
    fn slowlog_take(&mut self) -> Vec<Logged> {
        type Raw = (i64, i64, i64, Vec<Vec<u8>>, String, String);
        let raw: Vec<Raw> = self.query(redis::cmd("SLOWLOG").arg("GET").arg(-1));
        let _: () = self.query(redis::cmd("SLOWLOG").arg("RESET"));
        self.restore("slowlog-max-len");
        assert!(
            raw.len() < 1_000_000,
            "SLOWLOG overflowed: figures incomplete"
        );
        let mut logged: Vec<Logged> = raw
            .into_iter()
            .map(|(id, _, us, args, addr, name)| Logged {
                id,
                us,
                args,
                addr,
                name,
            })
            .collect();
        logged.sort_by_key(|e| e.id);
        logged
    }
}

/// Prints the delayed-jobs figures as tables.
fn print_delayed(args: &Args, lateness: &[Lateness], promotion: &[Promotion], idle: &[IdleCost]) {
    println!(
        "job-async-redis delayed jobs, {} mode, concurrency {}, {} runtime",
        args.mode, args.concurrency, args.runtime
    );
    let ms = |m: &BTreeMap<String, f64>, digits: usize| {
        if m.is_empty() {
            return String::new();
        }
        format!(
            "{:.digits$}/{:.digits$}/{:.digits$}",
            m["p50"], m["p99"], m["max"]
        )
    };
    if !lateness.is_empty() {
        println!();
        println!(
            "{:<26} {:>6} {:>22} {:>22}",
            "lateness (start − due)", "jobs", "p50/p99/max ms", "server p50/p99/max ms"
        );
        for l in lateness {
            println!(
                "{:<26} {:>6} {:>22} {:>22}",
                l.name,
                l.jobs,
                ms(&l.ms, 2),
                ms(&l.server_ms, 0)
            );
            if let Some(load) = &l.load {
                println!(
                    "  load: {:.0} jobs/s of 1-2 ms (capacity {:.0} jobs/s); pending list p50 {}, max {}",
                    load.jobs_per_second,
                    load.capacity_jobs_per_second,
                    load.pending_p50,
                    load.pending_max
                );
            }
        }
        println!(
            "  start: the handler's call; due: the job's run-at time (one clock: the server is on this"
        );
        println!(
            "  machine); server: the job hash's started_ms − due_ms, whole ms. Busy: includes the wait in"
        );
        println!("  the pending list behind load jobs.");
    }
    if !promotion.is_empty() {
        println!();
        println!(
            "{:<26} {:>9} {:>6} {:>6} {:>10} {:>12} {:>10}",
            "promotion (job_promote)",
            "waiting",
            "due",
            "calls",
            "µs/call",
            "median call",
            "µs/job"
        );
        for p in promotion {
            println!(
                "{:<26} {:>9} {:>6} {:>6} {:>10.1} {:>12.0} {:>10.2}",
                p.name,
                p.waiting,
                p.jobs,
                p.calls,
                p.redis_us_per_call,
                p.redis_us_per_call_p50,
                p.redis_us_per_job
            );
        }
        println!(
            "  the script's run time in Redis (SLOWLOG), every call while the due jobs were promoted;"
        );
        println!("  burst: all due at the same ms (run_at); spread: due over one second (delay).");
    }
    if !idle.is_empty() {
        println!();
        println!(
            "{:<28} {:>7} {:>8} {:>11} {:>10}",
            "idle Redis load", "workers", "cmds/s", "all cmds/s", "CPU ms/s"
        );
        for i in idle {
            println!(
                "{:<28} {:>7} {:>8.1} {:>11.1} {:>10.2}",
                i.name,
                i.workers,
                i.commands_per_second,
                i.all_commands_per_second,
                i.redis_cpu_ms_per_second
            );
            for (command, rate) in &i.by_command {
                let inside = i
                    .inside_scripts
                    .get(command)
                    .map(|n| format!(" (+{n:.1}/s run inside)"))
                    .unwrap_or_default();
                println!("    {command:<32} {rate:>7.2}/s{inside}");
            }
        }
        println!(
            "  cmds/s: sent by clients; all cmds/s: INFO total_commands_processed, also those run inside"
        );
        println!(
            "  scripts; both without the bench's own. Over {} s after a 12.5 s warm-up.",
            args.idle_seconds
        );
    }
}

/// A variant of the `--controls` phases: the feature it uses, set so that
/// it never holds a job back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// No feature used: the baseline.
    Plain,
    /// Lifecycle events on, the stream capped near 10^6 entries.
    Events,
    /// A rate limit of 10^6 starts per second.
    Rate,
    /// A concurrency limit of 10^6 jobs.
    Concurrency,
    /// Each job with a unique key of its own, held until it finishes.
    Unique,
}

impl Variant {
    const ALL: [Variant; 5] = [
        Variant::Plain,
        Variant::Events,
        Variant::Rate,
        Variant::Concurrency,
        Variant::Unique,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Events => "events",
            Variant::Rate => "rate",
            Variant::Concurrency => "concurrency",
            Variant::Unique => "unique",
        }
    }

    /// Turns the variant's queue control on, before any job is submitted.
    async fn apply(self, queue: &Queue) -> Result<(), job_async_redis::Error> {
        match self {
            Variant::Events => queue.set_events(Some(1_000_000)).await,
            Variant::Rate => {
                let limit = RateLimit::new(1_000_000, Duration::from_secs(1));
                queue.set_rate_limit(Some(limit)).await
            }
            Variant::Concurrency => queue.set_concurrency_limit(Some(1_000_000)).await,
            Variant::Plain | Variant::Unique => Ok(()),
        }
    }

    /// The options of job `i` (counted from 0 in the queue).
    fn options(self, i: usize) -> JobOptions {
        let options = JobOptions::default();
        match self {
            Variant::Unique => options.unique(Unique::until_finished(format!("k{i}"))),
            _ => options,
        }
    }
}

/// Calls and µs by command name (INFO commandstats, `info` left out),
/// summed over the primaries. Commands that scripts run are counted under
/// their own names too, and their time is also in their script's EVALSHA.
type CommandStats = BTreeMap<String, (u64, u64)>;

fn command_stats(primaries: &[String]) -> CommandStats {
    let mut total = CommandStats::new();
    for url in primaries {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut connect(url))
            .unwrap();
        for line in info.lines() {
            let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let field = |f: &str| -> u64 {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            if name != "info" {
                let entry = total.entry(name.to_owned()).or_default();
                entry.0 += field("calls");
                entry.1 += field("usec");
            }
        }
    }
    total
}

/// `after` − `before`, without the commands that did not run in between.
fn stats_delta(before: &CommandStats, after: &CommandStats) -> CommandStats {
    after
        .iter()
        .filter_map(|(name, &(calls, us))| {
            let (calls0, us0) = before.get(name).copied().unwrap_or_default();
            (calls > calls0).then(|| (name.clone(), (calls - calls0, us - us0)))
        })
        .collect()
}

/// One variant's two phases in one round, and the commands Redis ran in
/// each.
struct Measured {
    /// 1, 2...; 0 for the warm-up.
    round: usize,
    variant: Variant,
    enqueue: Phase,
    process: Phase,
    enqueue_stats: CommandStats,
    process_stats: CommandStats,
}

impl Measured {
    /// The backlog phase (`process`) or the enqueue phase, and its commands.
    fn phase(&self, process: bool) -> (&Phase, &CommandStats) {
        if process {
            (&self.process, &self.process_stats)
        } else {
            (&self.enqueue, &self.enqueue_stats)
        }
    }
}

/// The queue-controls phases (`--controls`): the batch enqueue and backlog
/// phases of the default run (with `--jobs` jobs, none submitted one by
/// one), once per variant (see [`Variant`]), each on a fresh queue whose
/// keys are deleted afterwards, so that every variant starts from the same
/// keyspace. After an unmeasured warm-up (plain), each of
/// `--controls-rounds` rounds runs every variant once, the order rotated by
/// one each round; [`print_controls`] reports the medians, and each
/// variant's ratio to plain in the same round.
async fn controls(
    args: &Args,
    target: &Target,
    mode: Mode,
    config: &Config,
    client: &Client,
    run: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    if args.cluster || mode == Mode::Simple {
        return Err("--controls runs against one server, in recoverable or reliable mode".into());
    }
    if args.controls_rounds == 0 {
        return Err("--controls-rounds must be at least 1".into());
    }
    let mut variants = vec![Variant::Plain];
    for name in &args.controls_variants {
        let Some(v) = Variant::ALL.into_iter().find(|v| v.name() == name) else {
            return Err(format!("unknown variant {name}").into());
        };
        if !variants.contains(&v) {
            variants.push(v);
        }
    }
    if !args.json {
        eprintln!("warm-up: plain...");
    }
    let name = format!("bench-{run}-warm-up");
    control_variant(args, target, mode, config, client, &name, Variant::Plain).await?;
    let mut measured = Vec::new();
    for round in 0..args.controls_rounds {
        let mut order = variants.clone();
        order.rotate_left(round % variants.len());
        for variant in order {
            if !args.json {
                eprintln!("round {}: {}...", round + 1, variant.name());
            }
            let name = format!("bench-{run}-{}-{round}", variant.name());
            let mut m = control_variant(args, target, mode, config, client, &name, variant).await?;
            m.round = round + 1;
            measured.push(m);
        }
    }
    print_controls(args, &variants, &measured)
}

/// One variant on the fresh queue `name`: turns its control on, runs the
/// batch enqueue and backlog phases, checks that the feature was in use,
/// and deletes the queue's keys.
async fn control_variant(
    args: &Args,
    target: &Target,
    mode: Mode,
    config: &Config,
    client: &Client,
    name: &str,
    variant: Variant,
) -> Result<Measured, Box<dyn std::error::Error>> {
    let queue = client.queue(name, mode).await?;
    variant.apply(&queue).await?;
    let keys = queue_keys(config, &queue);
    let mut con = connect(&config.url);
    let before = command_stats(&target.primaries);
    let enqueue = enqueue_batch(args, target, mode, std::slice::from_ref(&queue), |i| {
        variant.options(i)
    })
    .await?;
    let middle = command_stats(&target.primaries);
    let locked: bool = redis::cmd("EXISTS")
        .arg(keys.unique("k0"))
        .query(&mut con)?;
    let names = [name.to_owned()];
    let (process, workers) =
        process_backlog(args, target, mode, config, &names, enqueue.jobs).await?;
    let after = command_stats(&target.primaries);
    stop(workers).await?;
    let events: usize = redis::cmd("XLEN").arg(keys.events()).query(&mut con)?;
    let controls = queue.controls().await?;
    let in_use = match variant {
        Variant::Plain => !locked && events == 0 && controls == Default::default(),
        Variant::Events => events > 0 && controls.events == Some(1_000_000),
        Variant::Rate => controls.rate.is_some(),
        Variant::Concurrency => controls.concurrency == Some(1_000_000),
        Variant::Unique => locked,
    };
    if !in_use {
        return Err(format!(
            "{}: the feature was not in use ({controls:?})",
            variant.name()
        )
        .into());
    }
    delete_queue(&mut con, &keys)?;
    // Let Redis shrink its tables before the next variant.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(Measured {
        round: 0,
        variant,
        enqueue,
        process,
        enqueue_stats: stats_delta(&before, &middle),
        process_stats: stats_delta(&middle, &after),
    })
}

/// Deletes every key of a queue (SCAN and UNLINK, 1,000 at a time).
fn delete_queue(con: &mut redis::Connection, keys: &QueueKeys) -> redis::RedisResult<()> {
    let meta = keys.meta();
    let pattern = format!("{}*", meta.strip_suffix("meta").unwrap_or(&meta));
    let mut cursor = 0u64;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query(con)?;
        if !found.is_empty() {
            let _: i64 = redis::cmd("UNLINK").arg(&found).query(con)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// The median of `v` (0 when empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One variant's figures for one phase: medians over the rounds, and the
/// ratios to plain (the median of the ratios within each round).
#[derive(serde::Serialize)]
struct ControlRow {
    phase: String,
    variant: String,
    jobs: usize,
    jobs_per_second: f64,
    jobs_per_second_vs_plain: f64,
    commands_per_job: f64,
    commands_per_job_vs_plain: f64,
    redis_cpu_us_per_job: f64,
    redis_cpu_us_per_job_vs_plain: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_bytes_per_queued_job: Option<f64>,
    /// Per job, summed over the rounds: calls and µs by command name.
    commands: BTreeMap<String, (f64, f64)>,
}

/// The rows of one phase (`process`: the backlog phase, else the enqueue
/// phase), one per variant.
fn control_rows(variants: &[Variant], measured: &[Measured], process: bool) -> Vec<ControlRow> {
    // The rounds, in order: the i-th of each variant's runs is round i.
    let runs = |v: Variant| {
        measured
            .iter()
            .filter(move |m| m.variant == v)
            .map(move |m| m.phase(process))
    };
    let plain: Vec<&Phase> = runs(Variant::Plain).map(|(p, _)| p).collect();
    variants
        .iter()
        .map(|&v| {
            let phases: Vec<&Phase> = runs(v).map(|(p, _)| p).collect();
            let of = |f: fn(&Phase) -> f64| median(phases.iter().map(|p| f(p)).collect());
            let vs = |f: fn(&Phase) -> f64| {
                median(
                    phases
                        .iter()
                        .zip(&plain)
                        .map(|(p, b)| f(p) / f(b))
                        .collect(),
                )
            };
            let jobs: usize = phases.iter().map(|p| p.jobs).sum();
            let mut commands = BTreeMap::<String, (f64, f64)>::new();
            for (_, stats) in runs(v) {
                for (name, (calls, us)) in stats {
                    let entry = commands.entry(name.clone()).or_default();
                    entry.0 += *calls as f64 / jobs as f64;
                    entry.1 += *us as f64 / jobs as f64;
                }
            }
            ControlRow {
                phase: phases[0].name.clone(),
                variant: v.name().into(),
                jobs: phases[0].jobs,
                jobs_per_second: of(|p| p.jobs_per_second),
                jobs_per_second_vs_plain: vs(|p| p.jobs_per_second),
                commands_per_job: of(|p| p.commands_per_job),
                commands_per_job_vs_plain: vs(|p| p.commands_per_job),
                redis_cpu_us_per_job: of(|p| p.redis_cpu_us_per_job),
                redis_cpu_us_per_job_vs_plain: vs(|p| p.redis_cpu_us_per_job),
                memory_bytes_per_queued_job: phases[0]
                    .memory_bytes_per_queued_job
                    .map(|_| of(|p| p.memory_bytes_per_queued_job.unwrap_or(0.0))),
                commands,
            }
        })
        .collect()
}

/// Prints the `--controls` figures: one table of medians and ratios, then
/// per phase the commands per job by name and variant.
fn print_controls(
    args: &Args,
    variants: &[Variant],
    measured: &[Measured],
) -> Result<(), Box<dyn std::error::Error>> {
    let phases = [
        control_rows(variants, measured, false),
        control_rows(variants, measured, true),
    ];
    if args.json {
        let runs: Vec<_> = measured
            .iter()
            .map(|m| {
                serde_json::json!({
                    "round": m.round, "variant": m.variant.name(),
                    "phases": [&m.enqueue, &m.process],
                })
            })
            .collect();
        let out = serde_json::json!({
            "mode": args.mode, "concurrency": args.concurrency, "runtime": args.runtime,
            "rounds": args.controls_rounds,
            "controls": phases.iter().flatten().collect::<Vec<_>>(),
            "runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "job-async-redis controls, {} mode, concurrency {}, {} runtime; medians of {} rounds",
        args.mode, args.concurrency, args.runtime, args.controls_rounds
    );
    println!(
        "{:<16} {:<12} {:>7} {:>9} {:>6} {:>9} {:>6} {:>13} {:>6} {:>10}",
        "phase",
        "variant",
        "jobs",
        "jobs/s",
        "ratio",
        "cmds/job",
        "ratio",
        "redis µs/job",
        "ratio",
        "mem B/job"
    );
    for row in phases.iter().flatten() {
        let mem = row
            .memory_bytes_per_queued_job
            .map(|m| format!("{m:.0}"))
            .unwrap_or_default();
        println!(
            "{:<16} {:<12} {:>7} {:>9.0} {:>6.2} {:>9.2} {:>6.2} {:>13.1} {:>6.2} {:>10}",
            row.phase,
            row.variant,
            row.jobs,
            row.jobs_per_second,
            row.jobs_per_second_vs_plain,
            row.commands_per_job,
            row.commands_per_job_vs_plain,
            row.redis_cpu_us_per_job,
            row.redis_cpu_us_per_job_vs_plain,
            mem
        );
    }
    println!("  ratio: the variant's figure / plain's, in the same round (median over rounds).");
    for rows in &phases {
        println!();
        print!("{:<24}", format!("{}: calls (µs)/job", rows[0].phase));
        for row in rows {
            print!(" {:>14}", row.variant);
        }
        println!();
        let names: std::collections::BTreeSet<&String> =
            rows.iter().flat_map(|r| r.commands.keys()).collect();
        for name in names {
            let per_job: Vec<(f64, f64)> = rows
                .iter()
                .map(|r| r.commands.get(name).copied().unwrap_or_default())
                .collect();
            if per_job
                .iter()
                .all(|&(calls, us)| calls < 0.005 && us < 0.05)
            {
                continue;
            }
            print!("{name:<24}");
            for (calls, us) in per_job {
                print!(" {:>14}", format!("{calls:.3} ({us:.1})"));
            }
            println!();
        }
    }
    println!(
        "  INFO commandstats, per job, summed over the rounds; commands that scripts run are also"
    );
    println!("  counted under their own names, and their time is in the script's EVALSHA too.");
    Ok(())
}
