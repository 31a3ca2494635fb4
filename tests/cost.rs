//! What one job costs Redis in each mode, counted with INFO commandstats,
//! and what a queued job costs in memory. Run with `--nocapture` to see the
//! figures.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use job_async_redis::{Client, Mode, Worker, WorkerBuilder};
use support::{RedisServer, config, queue_name, recoverable, reliable, reverse, spawn_built};

const JOBS: u64 = 200;

/// Calls per command since the last CONFIG RESETSTAT.
fn commandstats(con: &mut redis::Connection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(con).unwrap();
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Runs `JOBS` jobs submitted and awaited one at a time through a worker of
/// `builder` (after one warm-up job). Returns the commands Redis served
/// meanwhile, per job: (script calls, blocking calls of `blocking`, commands
/// run inside scripts), and prints them.
async fn one_by_one(
    server: &RedisServer,
    q: &str,
    mode: Mode,
    builder: WorkerBuilder,
    blocking: &str,
) -> (f64, f64, f64) {
    let worker = spawn_built(builder, reverse).await;
    let client = Client::connect(config(server)).await.unwrap();
    let queue = client.queue(q, mode).await.unwrap();
    queue
        .submit("warm up")
        .await
        .unwrap()
        .result::<String>()
        .await
        .unwrap();
    let mut admin = server.connection();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut admin)
        .unwrap();
    for i in 0..JOBS {
        let h = queue.submit(&format!("job {i}")).await.unwrap();
        h.result_timeout::<String>(Duration::from_secs(10))
            .await
            .unwrap();
    }
    // Read before the shutdown, whose wake-list LPUSH, PEXPIRE and DEL are
    // not per-job costs.
    let stats = commandstats(&mut admin);
    worker.stop().await;
    let get = |name: &str| stats.get(name).copied().unwrap_or(0) as f64 / JOBS as f64;
    // INFO and CONFIG are this test's.
    let outside = ["evalsha", blocking, "info", "config|resetstat"];
    let inside: u64 = stats
        .iter()
        .filter(|(k, _)| !outside.contains(&k.as_str()))
        .map(|(_, v)| v)
        .sum();
    let per_job = (get("evalsha"), get(blocking), inside as f64 / JOBS as f64);
    println!(
        "{mode} mode, {JOBS} jobs one by one, per job: {:.2} script calls, {:.2} {blocking}, {:.2} commands inside scripts; {stats:?}",
        per_job.0, per_job.1, per_job.2
    );
    per_job
}

#[tokio::test]
async fn a_simple_mode_job_costs_two_script_calls_and_one_pop() {
    let server = RedisServer::start();
    let q = queue_name("cost");
    // A long lease: the queue's timekeeper renews it every third of a lease
    // (a script call that is no job's), not within this test.
    let builder = Worker::builder(config(&server))
        .queue(&q)
        .concurrency(1)
        .lease(Duration::from_secs(600));
    let (scripts, pops, inside) = one_by_one(&server, &q, Mode::Simple, builder, "blmpop").await;
    // Submit and reply; inside them HMGET + LPUSH (submit) and PUBLISH.
    assert_eq!(scripts, 2.0);
    assert_eq!(inside, 3.0);
    // One pop per job, plus a few that timed out empty (less one when the
    // pop that served the first job was sent before the count began).
    assert!((0.99..1.05).contains(&pops), "{pops} pops per job");
}

#[tokio::test]
async fn a_recoverable_mode_job_costs_four_script_calls_and_one_pop() {
    let server = RedisServer::start();
    let q = queue_name("cost-rec");
    let builder = recoverable(config(&server), &q).concurrency(1);
    let (scripts, pops, _) = one_by_one(&server, &q, Mode::Recoverable, builder, "blmpop").await;
    // submit, claim (after a ticket), start, finish (whose doorbell carries
    // the outcome: no read); plus the sweeps, a few per second for all jobs.
    assert!(
        (4.0..=4.5).contains(&scripts),
        "{scripts} script calls per job"
    );
    assert!((0.95..1.05).contains(&pops), "{pops} pops per job");
}

#[tokio::test]
async fn a_reliable_mode_job_costs_three_script_calls_and_one_move() {
    let server = RedisServer::start();
    let q = queue_name("cost-rel");
    let builder = reliable(config(&server), &q).concurrency(1);
    let (scripts, moves, _) = one_by_one(&server, &q, Mode::Reliable, builder, "blmove").await;
    // submit, start, finish (the worker looks at the empty queue with a
    // plain LRANGE before it blocks); plus the heartbeats and recovery
    // sweeps.
    assert!(
        (3.0..=3.6).contains(&scripts),
        "{scripts} script calls per job"
    );
    assert!((0.95..1.05).contains(&moves), "{moves} moves per job");
}

#[tokio::test]
async fn a_queued_job_costs_under_600_bytes_of_redis_memory() {
    let server = RedisServer::start();
    let q = queue_name("memory");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    // The growth of the dataset (keys and values, without client buffers)
    // for 10,000 jobs with a 20-byte payload.
    let mut admin = server.connection();
    let dataset = |con: &mut redis::Connection| -> i64 {
        let info: String = redis::cmd("INFO").arg("memory").query(con).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory_dataset:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = dataset(&mut admin);
    let payloads: Vec<String> = (0..10_000)
        .map(|i| format!("payload number {i:05}"))
        .collect();
    let _handles = queue.submit_many(&payloads).await.unwrap();
    let per_job = (dataset(&mut admin) - before) / 10_000;
    println!(
        "redis memory per queued job (20-byte payload, recoverable/reliable): {per_job} bytes"
    );
    assert!(per_job < 600, "{per_job} bytes per queued job");
}
