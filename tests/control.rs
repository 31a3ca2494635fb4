//! Queue controls (protocol.md 8.9): pause and resume, rate limits and
//! concurrency limits, enforced in Redis across worker processes. Every
//! check reads what happened from Redis (the job hashes' server-time
//! `started_ms` and `finished_ms`), never from the workers' own counts.

mod support;

use std::time::{Duration, Instant};

use job_async_redis::{Client, Error, Job, Mode, Queue, RateLimit, Worker};
use redis::Commands;
use support::{RedisServer, config, queue_name, spawn_built, spawn_worker_process};

const WAIT: Duration = Duration::from_secs(30);

/// Kills the worker processes when a test ends, whichever way it ends.
struct Processes(Vec<std::process::Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `n` reliable-mode worker processes on `queue`.
fn processes(server: &RedisServer, queue: &str, n: usize, env: &[(&str, &str)]) -> Processes {
    Processes(
        (0..n)
            .map(|_| spawn_worker_process(&server.url(), queue, env).0)
            .collect(),
    )
}

/// Per job: (state, started_ms, finished_ms) read from its hash, all jobs
/// in one transaction (a consistent snapshot: read one by one, a job that
/// finishes and another that starts between two reads would both look
/// active).
fn job_times(
    con: &mut redis::Connection,
    queue: &Queue,
    ids: &[String],
) -> Vec<(String, Option<u64>, Option<u64>)> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for id in ids {
        pipe.cmd("HMGET")
            .arg(format!("jq:{{{}}}:job:{id}", queue.name()))
            .arg(&["state", "started_ms", "finished_ms"]);
    }
    let rows: Vec<(Option<String>, Option<u64>, Option<u64>)> = pipe.query(con).unwrap();
    rows.into_iter()
        .map(|(state, started, finished)| (state.unwrap_or_default(), started, finished))
        .collect()
}

/// Waits until every job completed; returns their times.
async fn all_completed(
    con: &mut redis::Connection,
    queue: &Queue,
    ids: &[String],
) -> Vec<(String, Option<u64>, Option<u64>)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let times = job_times(con, queue, ids);
        if times.iter().all(|(s, _, _)| s == "completed") {
            return times;
        }
        assert!(
            Instant::now() < deadline,
            "jobs not completed: {:?}",
            times
                .iter()
                .filter(|(s, _, _)| s != "completed")
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A field of `INFO stats`.
fn info_stat(con: &mut redis::Connection, field: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Error replies the server has sent so far.
fn error_replies(con: &mut redis::Connection) -> u64 {
    info_stat(con, "total_error_replies")
}

/// EVALSHA calls the server has run so far.
fn script_calls(con: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn server_ms(con: &mut redis::Connection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query(con).unwrap();
    s * 1000 + us / 1000
}

/// The most jobs that ran at once: at each start, how many jobs had
/// started and not yet finished (server time, ms; a job that finishes in
/// the ms another starts was finished first: one script ran after the
/// other).
fn most_at_once(times: &[(String, Option<u64>, Option<u64>)]) -> usize {
    let spans: Vec<(u64, u64)> = times
        .iter()
        .map(|(_, s, f)| (s.expect("started_ms"), f.expect("finished_ms")))
        .collect();
    spans
        .iter()
        .map(|(start, _)| {
            spans
                .iter()
                .filter(|(s, f)| s <= start && start < f)
                .count()
        })
        .max()
        .unwrap_or(0)
}

async fn submit(queue: &Queue, n: u64) -> Vec<String> {
    let handles = queue
        .submit_many(&(0..n).collect::<Vec<_>>())
        .await
        .unwrap();
    handles.iter().map(|h| h.id().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_queue_starts_nothing_across_processes_and_resume_starts_work_at_once() {
    let server = RedisServer::start();
    let q = queue_name("paused");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    assert!(!queue.pause().await.unwrap(), "was not paused before");
    assert!(queue.controls().await.unwrap().paused);
    // Workers that recheck only every 5 s: a prompt start after the resume
    // can only come from the gate's wake-up.
    let _workers = processes(&server, &q, 3, &[("BLOCK_MS", "5000"), ("WORK_MS", "20")]);
    // And one that asks again every 500 ms (its block timeout), so that
    // held workers are seen asking while the queue is paused.
    let asking = spawn_built(
        Worker::builder(config(&server))
            .mode(Mode::Reliable)
            .queue(&q),
        |job: Job<u64>| async move { Ok::<_, String>(job.payload) },
    )
    .await;
    let ids = submit(&queue, 30).await;
    let mut con = server.connection();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (errors, calls) = (error_replies(&mut con), script_calls(&mut con));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Held workers wait on the gate list: no refused calls, no polling (a
    // heartbeat or two per process, nothing per job).
    assert_eq!(error_replies(&mut con), errors, "calls failed while paused");
    let polled = script_calls(&mut con) - calls;
    assert!(polled < 30, "{polled} script calls while paused");
    let times = job_times(&mut con, &queue, &ids);
    assert!(
        times
            .iter()
            .all(|(s, started, _)| s == "queued" && started.is_none()),
        "a paused queue started jobs: {times:?}"
    );
    let pending: usize = con.llen(format!("jq:{{{q}}}:pending")).unwrap();
    assert_eq!(pending, 30, "every job still waits on the pending list");

    assert!(queue.resume().await.unwrap(), "was paused");
    let resumed = server_ms(&mut con);
    let times = all_completed(&mut con, &queue, &ids).await;
    let first = times.iter().filter_map(|(_, s, _)| *s).min().unwrap();
    assert!(
        first.saturating_sub(resumed) < 1000,
        "the first job started {} ms after the resume (the workers' recheck is 5 s)",
        first.saturating_sub(resumed)
    );
    // The processes took part: the wake-up went from worker to worker.
    let workers: std::collections::HashSet<String> = ids
        .iter()
        .map(|id| con.hget(format!("jq:{{{q}}}:job:{id}"), "worker").unwrap())
        .collect();
    assert!(workers.len() >= 3, "jobs ran on {workers:?}");
    asking.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limit_holds_across_three_worker_processes() {
    let server = RedisServer::start();
    let q = queue_name("rate");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    let limit = RateLimit::new(10, Duration::from_secs(1));
    queue.set_rate_limit(Some(limit)).await.unwrap();
    assert_eq!(queue.controls().await.unwrap().rate, Some(limit));
    let _workers = processes(&server, &q, 3, &[]);
    let ids = submit(&queue, 60).await;
    let times = all_completed(&mut server.connection(), &queue, &ids).await;
    let mut starts: Vec<u64> = times.iter().filter_map(|(_, s, _)| *s).collect();
    starts.sort_unstable();
    // At most 10 starts in any window of 1 s (a sliding log: no burst at a
    // window's edge), so at most 50 in any 5 s.
    for (i, s) in starts.iter().enumerate() {
        let in_window = starts[i..].iter().take_while(|t| **t < s + 1000).count();
        assert!(in_window <= 10, "{in_window} starts in the second from {s}");
        let in_five = starts[i..].iter().take_while(|t| **t < s + 5000).count();
        assert!(in_five <= 50, "{in_five} starts in the 5 s from {s}");
    }
    // And the limit is used, not starved: 60 jobs take about 5 s, not much more.
    let span = starts.last().unwrap() - starts.first().unwrap();
    assert!(
        (5000..9000).contains(&span),
        "60 starts at 10/s took {span} ms"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_concurrency_limit_holds_across_three_processes_of_concurrency_eight() {
    let server = RedisServer::start();
    let q = queue_name("concurrency");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    queue.set_concurrency_limit(Some(4)).await.unwrap();
    assert_eq!(queue.controls().await.unwrap().concurrency, Some(4));
    let _workers = processes(&server, &q, 3, &[("CONCURRENCY", "8"), ("WORK_MS", "100")]);
    let ids = submit(&queue, 60).await;
    let mut con = server.connection();
    // Sampled from Redis while the jobs run, too.
    let deadline = Instant::now() + WAIT;
    let mut most_sampled = 0;
    loop {
        let times = job_times(&mut con, &queue, &ids);
        let active = times.iter().filter(|(s, _, _)| s == "active").count();
        assert!(active <= 4, "{active} jobs active at once");
        most_sampled = most_sampled.max(active);
        if times.iter().all(|(s, _, _)| s == "completed") {
            break;
        }
        assert!(Instant::now() < deadline, "jobs did not complete");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let times = job_times(&mut con, &queue, &ids);
    assert_eq!(
        most_at_once(&times),
        4,
        "the limit is reached and never passed"
    );
    assert!(
        most_sampled >= 3,
        "sampling saw at most {most_sampled} running"
    );
    let running: usize = con.zcard(format!("jq:{{{q}}}:running")).unwrap();
    assert_eq!(running, 0, "every slot was given back");
}

/// Recoverable mode, in one process: the same limits, changed while the
/// queue runs, and a held queue does not delay the worker's other queue.
#[tokio::test(flavor = "multi_thread")]
async fn recoverable_limits_change_while_the_queue_runs_and_a_held_queue_does_not_delay_others() {
    let server = RedisServer::start();
    let (limited, free) = (queue_name("limited"), queue_name("free"));
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&limited, Mode::Recoverable).await.unwrap();
    let other = client.queue(&free, Mode::Recoverable).await.unwrap();
    queue.set_concurrency_limit(Some(2)).await.unwrap();
    let builder = |c| {
        Worker::builder(c)
            .mode(Mode::Recoverable)
            .queue(&limited)
            .queue(&free)
            .concurrency(8)
            .lease(Duration::from_secs(5))
    };
    let handler = |job: Job<u64>| async move {
        tokio::time::sleep(Duration::from_millis(job.payload)).await;
        Ok::<_, String>(job.payload)
    };
    let workers = [
        spawn_built(builder(config(&server)), handler).await,
        spawn_built(builder(config(&server)), handler).await,
    ];
    let ids: Vec<String> = queue
        .submit_many(&vec![200u64; 12])
        .await
        .unwrap()
        .iter()
        .map(|h| h.id().to_owned())
        .collect();
    // While the limited queue holds both workers back, the other queue's
    // jobs run at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let quick = other.submit(&1u64).await.unwrap();
    quick.result::<u64>().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "the other queue waited {:?}",
        started.elapsed()
    );
    // Raise the limit while the queue runs: more jobs run at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut con = server.connection();
    let raised = server_ms(&mut con);
    queue.set_concurrency_limit(Some(6)).await.unwrap();
    let times = all_completed(&mut con, &queue, &ids).await;
    let before: Vec<_> = times
        .iter()
        .filter(|(_, s, _)| s.unwrap() < raised)
        .cloned()
        .collect();
    assert!(before.len() >= 2, "jobs ran before the limit was raised");
    assert!(most_at_once(&before) <= 2, "the first limit held");
    assert!(most_at_once(&times) > 2, "the raised limit let more run");
    assert!(most_at_once(&times) <= 6);
    // Limits cleared: no controls left.
    queue.set_concurrency_limit(None).await.unwrap();
    assert_eq!(queue.controls().await.unwrap(), Default::default());
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test]
async fn controls_are_refused_in_simple_mode_and_out_of_range() {
    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let simple = client.queue(&queue_name("s"), Mode::Simple).await.unwrap();
    assert!(matches!(simple.pause().await, Err(Error::Config(_))));
    let queue = client
        .queue(&queue_name("r"), Mode::Recoverable)
        .await
        .unwrap();
    assert!(matches!(
        queue.set_concurrency_limit(Some(0)).await,
        Err(Error::Config(_))
    ));
    assert!(matches!(
        queue
            .set_rate_limit(Some(RateLimit::new(0, Duration::from_secs(1))))
            .await,
        Err(Error::Config(_))
    ));
    assert!(matches!(
        queue
            .set_rate_limit(Some(RateLimit::new(1, Duration::ZERO)))
            .await,
        Err(Error::Config(_))
    ));
    // Another program's garbage in the metadata counts as no limit.
    let mut con = server.connection();
    let _: () = con
        .hset_multiple(
            format!("jq:{{{}}}:meta", queue.name()),
            &[
                ("rate", "ten:1000"),
                ("concurrency", "inf"),
                ("paused", "yes"),
            ],
        )
        .unwrap();
    assert_eq!(queue.controls().await.unwrap(), Default::default());
}
