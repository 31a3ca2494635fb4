//! Hostile data (issue 11, item 7): another program, a bug or an attacker
//! writes corrupt data into a queue's keys with plain Redis commands, or
//! calls the scripts with mutated KEYS and ARGV.
//!
//! Part A, containment, in every mode: a worker whose queue holds keys of the
//! wrong Redis type, IDs that are not UTF-8, garbage numbers in job hashes,
//! payload bombs or garbage in its recovery keys keeps running, serves its
//! other queues, loses no job, tells the client of a broken job with a typed
//! error, counts the queue errors, serves the queue again once the key is
//! repaired, and recovery still finishes a dead worker's job.
//!
//! Part B, all-or-nothing scripts: every script of `lua/` is called from a
//! valid baseline (protocol.md section 10) with mutated calls: KEYS and ARGV
//! counts off by one, every numeric argument replaced by a value that is not
//! a strict integer in range, every key replaced by a key of another type;
//! plus seeded random mutations (`HOSTILE_SEED=<n>` replays one run). A
//! refusal must carry a `JQ_` code and leave the keyspace byte for byte
//! unchanged (DUMP and PEXPIRETIME of every key).

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use job_async_redis::keys::QueueKeys;
use job_async_redis::{
    Client, Error, FailureKind, Job, JobHandle, JobOptions, Mode, Worker, WorkerBuilder,
    WorkerStats,
};
use redis::Connection;
use support::hostile::*;
use support::{RedisServer, config, queue_name};
use tokio::task::JoinHandle;

type Run = JoinHandle<Result<WorkerStats, Error>>;

/// `HOSTILE_LOG=1` shows the library's logs (debug level) in failing tests.
fn trace() {
    if std::env::var_os("HOSTILE_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_test_writer()
            .try_init();
    }
}

/// How long a job of these tests may take to reach its outcome.
const WAIT: Duration = Duration::from_secs(12);

fn qkeys(queue: &str) -> QueueKeys {
    QueueKeys::new("jq", queue).unwrap()
}

/// A worker builder for `mode` with the tests' short timings: a 600 ms lease
/// (heartbeat TTL) and a 200 ms sweep interval.
fn builder(server: &RedisServer, mode: Mode, queues: &[&str]) -> WorkerBuilder {
    let mut b = Worker::builder(config(server))
        .mode(mode)
        .lease(Duration::from_millis(600))
        .sweep_interval(Duration::from_millis(200))
        .concurrency(8);
    for q in queues {
        b = b.queue(*q);
    }
    b
}

/// Requests shutdown and returns the stats, or why there are none.
async fn stop(shutdown: job_async_redis::ShutdownHandle, task: Run) -> Result<WorkerStats, String> {
    shutdown.shutdown();
    match tokio::time::timeout(Duration::from_secs(20), task).await {
        Err(_) => Err("the worker did not stop within 20 s".into()),
        Ok(Err(e)) => Err(format!("the worker task panicked: {e}")),
        Ok(Ok(Err(e))) => Err(format!("the worker exited with an error: {e}")),
        Ok(Ok(Ok(stats))) => Ok(stats),
    }
}

/// Pushes a job written by hand: its hash (or nothing when `fields` is
/// empty), its ID on pending, and a ticket in recoverable mode.
fn push_raw_job(
    con: &mut Connection,
    keys: &QueueKeys,
    mode: Mode,
    id: &[u8],
    fields: &[(&str, Vec<u8>)],
) {
    let key = keys.job_bytes(id);
    if !fields.is_empty() {
        let mut c = redis::cmd("HSET");
        c.arg(&key);
        for (f, v) in fields {
            c.arg(*f).arg(v.as_slice());
        }
        let _: () = c.query(con).unwrap();
    }
    let _: () = redis::cmd("LPUSH")
        .arg(keys.pending())
        .arg(id)
        .query(con)
        .unwrap();
    if mode == Mode::Recoverable {
        let _: () = redis::cmd("LPUSH")
            .arg(keys.tickets())
            .arg("1")
            .query(con)
            .unwrap();
    }
}

fn mp_str(s: &str) -> Vec<u8> {
    rmp_serde::to_vec(s).unwrap()
}

// ---------------------------------------------------------------------------
// Part A: containment of a broken queue key
// ---------------------------------------------------------------------------

/// The key of a queue a case breaks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Meta,
    Pending,
    /// Simple mode's dead-letter list.
    DeadList,
    Tickets,
    Leases,
    Fence,
    DeadJobs,
    Sweep,
    Workers,
    /// The worker's own in-flight list (reliable mode).
    Inflight,
    /// The worker's wake list of the queue (simple and recoverable modes).
    Wake,
    /// The delayed set, the clock list, the schedules set, the timekeeper
    /// lease (every mode; schedules: recoverable and reliable).
    Delayed,
    Clock,
    Schedules,
    Timekeeper,
}

/// What the key is replaced with.
#[derive(Clone, Copy)]
enum Bad {
    Type(&'static str),
    Text(&'static [u8]),
}

impl std::fmt::Debug for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bad::Type(t) => write!(f, "a {t}"),
            Bad::Text(v) => write!(f, "the string {}", show(v)),
        }
    }
}

impl Target {
    fn key(self, keys: &QueueKeys, worker: &str) -> String {
        match self {
            Target::Meta => keys.meta(),
            Target::Pending => keys.pending(),
            Target::DeadList => keys.dead(),
            Target::Tickets => keys.tickets(),
            Target::Leases => keys.leases(),
            Target::Fence => keys.fence(),
            Target::DeadJobs => keys.dead_jobs(),
            Target::Sweep => keys.sweep(),
            Target::Workers => keys.workers(),
            Target::Inflight => keys.inflight(worker),
            Target::Wake => keys.wake(worker),
            Target::Delayed => keys.delayed(),
            Target::Clock => keys.clock(),
            Target::Schedules => keys.schedules(),
            Target::Timekeeper => keys.timekeeper(),
        }
    }

    /// A submit writes this key, so it must be refused (nothing written).
    fn refuses_submit(self, mode: Mode) -> bool {
        match self {
            Target::Meta | Target::Pending => true,
            Target::Tickets => mode == Mode::Recoverable,
            _ => false,
        }
    }

    /// The worker needs this key to take the queue's jobs: it must count
    /// queue errors. (The meta hash is not read by workers; a guard of
    /// another type is overwritten.)
    fn breaks_queue(self) -> bool {
        !matches!(self, Target::Meta | Target::Sweep | Target::Timekeeper)
    }
}

/// An invalid simple-mode entry (not MessagePack).
const NOT_AN_ENVELOPE: &[u8] = b"\xc1 not an envelope \xff";

/// One queue key of `mode` broken with `bad` while a worker serves the queue
/// (and, in simple and recoverable modes, a healthy queue after it):
/// 1. three jobs wait in the queue; the key is broken; the worker starts;
/// 2. two submits: refused with `Error::WrongType` naming the key (nothing
///    written) when a submit writes that key, else accepted;
/// 3. the healthy queue completes three jobs meanwhile;
/// 4. the worker is still running; the key is repaired (DEL, and the jobs
///    put back where breaking the key moved them away);
/// 5. every accepted job completes with its result (none lost), a job
///    submitted after completes, the worker stops cleanly and counted
///    `queue_errors` for a key it needs.
async fn contain(server: &RedisServer, mode: Mode, target: Target, bad: Bad) -> Result<(), String> {
    let label = format!("{mode:?} mode, {target:?} replaced by {bad:?}");
    let err = |what: &str, e: &dyn std::fmt::Display| format!("{label}: {what}: {e}");
    let bad_q = queue_name("bad");
    let good_q = (mode != Mode::Reliable).then(|| queue_name("good"));
    let keys = qkeys(&bad_q);
    let client = Client::connect(config(server))
        .await
        .map_err(|e| err("connect", &e))?;
    let queue = client
        .queue(&bad_q, mode)
        .await
        .map_err(|e| err("open", &e))?;
    let mut con = server.connection();
    let mut waiting: Vec<(JobHandle, String)> = Vec::new();
    for i in 0..3 {
        let payload = format!("before-{i}");
        let h = queue
            .submit(&payload)
            .await
            .map_err(|e| err("submit before", &e))?;
        waiting.push((h, payload.chars().rev().collect()));
    }
    let mut queues = vec![bad_q.as_str()];
    if let Some(g) = &good_q {
        queues.push(g);
    }
    let runs = Runs::default();
    let worker = builder(server, mode, &queues)
        .build()
        .await
        .map_err(|e| err("build", &e))?;
    let broken = target.key(&keys, worker.id());
    let stash = format!("{}:stash", keys.pending());
    let nah = "not-a-hash";
    match target {
        Target::Pending => {
            let _: () = redis::cmd("RENAME")
                .arg(keys.pending())
                .arg(&stash)
                .query(&mut con)
                .unwrap();
        }
        Target::DeadJobs => {
            // A job whose key is not a hash: dead-lettering it writes dead_jobs.
            write_text(&mut con, keys.job(nah).as_bytes(), b"not a hash");
            push_raw_job(&mut con, &keys, mode, nah.as_bytes(), &[]);
        }
        Target::DeadList => {
            let _: () = redis::cmd("LPUSH")
                .arg(keys.pending())
                .arg(NOT_AN_ENVELOPE)
                .query(&mut con)
                .unwrap();
        }
        _ => {}
    }
    match bad {
        Bad::Type(t) => write_type(&mut con, broken.as_bytes(), t),
        Bad::Text(v) => write_text(&mut con, broken.as_bytes(), v),
    }
    let started = Instant::now();
    let shutdown = worker.shutdown_handle();
    let task: Run = tokio::spawn(worker.run(runs.handler()));

    for i in 0..2 {
        let payload = format!("during-{i}");
        let id = format!("during-{i}");
        let submitted = match mode {
            Mode::Simple => queue.submit(&payload).await,
            _ => {
                queue
                    .submit_with(&payload, JobOptions::default().id(&id))
                    .await
            }
        };
        match submitted {
            Ok(h) if !target.refuses_submit(mode) => {
                waiting.push((h, payload.chars().rev().collect()))
            }
            Ok(_) => {
                return Err(format!(
                    "{label}: a submit was accepted while {broken} is broken"
                ));
            }
            Err(Error::WrongType { key, .. }) if target.refuses_submit(mode) && key == broken => {
                if mode != Mode::Simple
                    && redis::cmd("EXISTS")
                        .arg(keys.job(&id))
                        .query::<i64>(&mut con)
                        .unwrap()
                        != 0
                {
                    return Err(format!("{label}: a refused submit wrote the job's hash"));
                }
            }
            Err(e) if target.refuses_submit(mode) => {
                return Err(format!(
                    "{label}: a submit while {broken} is broken must be refused with Error::WrongType naming that key; got {e:?}"
                ));
            }
            Err(e) => {
                return Err(err(
                    "submit while broken (the key is not used by submits)",
                    &e,
                ));
            }
        }
    }
    if let Some(g) = &good_q {
        let good = client
            .queue(g, mode)
            .await
            .map_err(|e| err("open good", &e))?;
        for i in 0..3 {
            let payload = format!("good-{i}");
            let result = good
                .submit(&payload)
                .await
                .map_err(|e| err("submit good", &e))?
                .result_timeout::<String>(Duration::from_secs(8))
                .await;
            if result.as_deref().ok() != Some(&payload.chars().rev().collect::<String>()) {
                return Err(format!(
                    "{label}: the healthy queue was not served while another queue is broken: {result:?}"
                ));
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(600).saturating_sub(started.elapsed())).await;
    if task.is_finished() {
        let ended = task.await;
        return Err(format!("{label}: the worker ended: {ended:?}"));
    }

    if target == Target::Sweep {
        // A guard without TTL is replaced by one with a TTL (or expired) by
        // the next pass.
        let expires = wait_until(Duration::from_secs(3), || {
            redis::cmd("PTTL")
                .arg(&broken)
                .query::<i64>(&mut con)
                .unwrap()
                != -1
        })
        .await;
        if !expires {
            return Err(format!(
                "{label}: the guard still has no TTL after 3 s: recovery is stalled"
            ));
        }
    }

    // Repair.
    let _: () = redis::cmd("DEL").arg(&broken).query(&mut con).unwrap();
    if target == Target::Pending {
        let _: () = redis::cmd("RENAME")
            .arg(&stash)
            .arg(keys.pending())
            .query(&mut con)
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut problems = Vec::new();
    let total = waiting.len() + 1;
    for (handle, expected) in waiting {
        let id = handle.id().to_owned();
        let left = deadline.saturating_duration_since(Instant::now());
        match handle
            .result_timeout::<String>(left.max(Duration::from_millis(10)))
            .await
        {
            Ok(r) if r == expected => {}
            other => problems.push(format!("job {id}: {other:?}")),
        }
    }
    let after = queue
        .submit("after")
        .await
        .map_err(|e| err("submit after repair", &e))?
        .result_timeout::<String>(WAIT)
        .await;
    if after.as_deref().ok() != Some("retfa") {
        problems.push(format!("a job submitted after the repair: {after:?}"));
    }
    match target {
        Target::DeadJobs => {
            let dead_jobs = keys.dead_jobs();
            let found = wait_until(Duration::from_secs(5), || {
                redis::cmd("ZSCORE")
                    .arg(&dead_jobs)
                    .arg(nah)
                    .query::<Option<f64>>(&mut con)
                    .unwrap()
                    .is_some()
            })
            .await;
            if !found {
                problems.push(format!(
                    "the job whose key is not a hash is not in dead_jobs after the repair (members: {:?})",
                    redis::cmd("ZRANGE").arg(&dead_jobs).arg(0).arg(-1).query::<Vec<String>>(&mut con)
                ));
            }
        }
        Target::DeadList => {
            let dead = keys.dead();
            let kept = wait_until(Duration::from_secs(5), || {
                let records: Vec<Vec<u8>> = redis::cmd("LRANGE")
                    .arg(&dead)
                    .arg(0)
                    .arg(-1)
                    .query(&mut con)
                    .unwrap_or_default();
                records.iter().any(|r| {
                    rmpv::decode::read_value(&mut r.as_slice())
                        .ok()
                        .and_then(|v| {
                            field(&v, "entry").and_then(|e| e.as_slice().map(<[u8]>::to_vec))
                        })
                        .is_some_and(|e| e == NOT_AN_ENVELOPE)
                })
            })
            .await;
            if !kept {
                problems.push(
                    "the invalid entry is not in the dead-letter list after the repair (dropped?)"
                        .into(),
                );
            }
        }
        _ => {}
    }
    match stop(shutdown, task).await {
        Ok(stats) => {
            if target.breaks_queue() && stats.queue_errors == 0 {
                problems.push(format!(
                    "queue_errors is 0 although {broken} was broken: {stats:?}"
                ));
            }
            let good_jobs = if good_q.is_some() { 3 } else { 0 };
            if stats.completed < (total + good_jobs) as u64 {
                problems.push(format!(
                    "{} jobs completed, expected {}: {stats:?}",
                    stats.completed,
                    total + good_jobs
                ));
            }
        }
        Err(e) => problems.push(e),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{label}:\n    {}", problems.join("\n    ")))
    }
}

/// Runs the cases concurrently on one server and reports every failure.
async fn contain_all(cases: &[(Mode, Target, Bad)]) {
    trace();
    let server = RedisServer::start();
    let results = join_all(cases.iter().map(|&(m, t, b)| contain(&server, m, t, b))).await;
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}

const ALL_MODES: [Mode; 3] = [Mode::Simple, Mode::Recoverable, Mode::Reliable];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_list_of_another_type_is_contained() {
    let mut cases = Vec::new();
    for mode in ALL_MODES {
        for t in ["string", "hash", "zset"] {
            cases.push((mode, Target::Pending, Bad::Type(t)));
        }
    }
    contain_all(&cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_of_another_type_is_contained() {
    let mut cases = Vec::new();
    for mode in ALL_MODES {
        for t in ["string", "list"] {
            cases.push((mode, Target::Meta, Bad::Type(t)));
        }
    }
    contain_all(&cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_dead_letter_list_of_another_type_is_contained() {
    contain_all(&[
        (Mode::Simple, Target::DeadList, Bad::Type("string")),
        (Mode::Simple, Target::DeadList, Bad::Type("hash")),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_and_leases_of_another_type_are_contained() {
    let mut cases = Vec::new();
    for t in ["string", "hash", "zset"] {
        cases.push((Mode::Recoverable, Target::Tickets, Bad::Type(t)));
    }
    for t in ["string", "hash", "list"] {
        cases.push((Mode::Recoverable, Target::Leases, Bad::Type(t)));
    }
    contain_all(&cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_that_is_not_an_integer_is_contained() {
    let mut cases = Vec::new();
    for mode in [Mode::Recoverable, Mode::Reliable] {
        for bad in [
            Bad::Text(b"abc"),
            Bad::Text(b"9223372036854775807"),
            Bad::Text(b"-3"),
            Bad::Text(b"1e3"),
            Bad::Text(b"\xff\xfe"),
            Bad::Type("hash"),
        ] {
            cases.push((mode, Target::Fence, bad));
        }
    }
    contain_all(&cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_jobs_of_another_type_is_contained() {
    let mut cases = Vec::new();
    for mode in [Mode::Recoverable, Mode::Reliable] {
        for t in ["string", "list", "hash"] {
            cases.push((mode, Target::DeadJobs, Bad::Type(t)));
        }
    }
    contain_all(&cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_guard_of_another_type_or_without_ttl_is_contained() {
    let mut cases = Vec::new();
    for mode in [Mode::Recoverable, Mode::Reliable] {
        for bad in [Bad::Text(b"1"), Bad::Type("hash"), Bad::Type("list")] {
            cases.push((mode, Target::Sweep, bad));
        }
    }
    contain_all(&cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_workers_set_and_inflight_list_of_another_type_are_contained() {
    let mut cases = Vec::new();
    for t in ["string", "hash", "list"] {
        cases.push((Mode::Reliable, Target::Workers, Bad::Type(t)));
    }
    for t in ["string", "hash", "zset"] {
        cases.push((Mode::Reliable, Target::Inflight, Bad::Type(t)));
    }
    contain_all(&cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_list_of_another_type_is_contained() {
    let mut cases = Vec::new();
    for mode in [Mode::Simple, Mode::Recoverable] {
        for t in ["string", "hash"] {
            cases.push((mode, Target::Wake, Bad::Type(t)));
        }
    }
    contain_all(&cases).await;
}

/// The keys of delayed jobs and schedules: a broken one stops the queue's
/// promotions (counted, retried with backoff) and nothing else; a broken
/// timekeeper lease is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_set_clock_schedules_and_timekeeper_of_another_type_are_contained() {
    let mut cases = Vec::new();
    for mode in [Mode::Simple, Mode::Recoverable, Mode::Reliable] {
        cases.push((mode, Target::Delayed, Bad::Type("list")));
        cases.push((mode, Target::Clock, Bad::Type("hash")));
        cases.push((mode, Target::Timekeeper, Bad::Type("hash")));
        cases.push((mode, Target::Timekeeper, Bad::Text(b"no TTL")));
    }
    for mode in [Mode::Recoverable, Mode::Reliable] {
        cases.push((mode, Target::Delayed, Bad::Type("string")));
        cases.push((mode, Target::Schedules, Bad::Type("list")));
    }
    contain_all(&cases).await;
}

/// A queue whose meta hash is broken: opening it (client) and building a
/// worker for it are refused with `Error::WrongType` naming the key, not a
/// raw Redis error; once it is deleted, both work again.
#[tokio::test]
async fn opening_a_queue_whose_meta_is_broken_is_a_typed_error() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let client = Client::connect(config(&server)).await.unwrap();
    for mode in ALL_MODES {
        let q = queue_name("meta");
        let meta = qkeys(&q).meta();
        write_type(&mut con, meta.as_bytes(), "string");
        let opened = client.queue(&q, mode).await;
        assert!(
            matches!(&opened, Err(Error::WrongType { key, expected, found }) if *key == meta && expected == "hash" && found == "string"),
            "{mode:?}: client.queue: {opened:?}"
        );
        let built = builder(&server, mode, &[&q]).build().await;
        assert!(
            matches!(&built, Err(Error::WrongType { key, .. }) if *key == meta),
            "{mode:?}: Worker::build: {built:?}"
        );
        let _: () = redis::cmd("DEL").arg(&meta).query(&mut con).unwrap();
        client.queue(&q, mode).await.unwrap();
        builder(&server, mode, &[&q]).build().await.unwrap();
    }
    // Garbled metadata: the refusal names what was found, not "nil" or "?".
    let q = queue_name("meta");
    let meta = qkeys(&q).meta();
    let _: () = redis::cmd("HSET")
        .arg(&meta)
        .arg("mode")
        .arg("recoverable")
        .arg("created_ms")
        .arg("1")
        .query(&mut con)
        .unwrap();
    let opened = client.queue(&q, Mode::Recoverable).await;
    assert!(
        matches!(&opened, Err(Error::ProtocolMismatch { existing, requested, .. }) if existing == "(missing)" && requested == "1"),
        "meta without protocol: {opened:?}"
    );
    // A mode with spaces and bytes that are not UTF-8.
    let q = queue_name("meta");
    let _: () = redis::cmd("HSET")
        .arg(qkeys(&q).meta())
        .arg("mode")
        .arg(&b"odd \xff mode"[..])
        .arg("protocol")
        .arg("1")
        .query(&mut con)
        .unwrap();
    let opened = client.queue(&q, Mode::Reliable).await;
    assert!(
        matches!(&opened, Err(Error::ModeMismatch { existing, requested, .. }) if existing.starts_with("odd ") && existing.ends_with(" mode") && requested == "reliable"),
        "meta with a garbled mode: {opened:?}"
    );
}

// ---------------------------------------------------------------------------
// Part A: hostile job hashes and IDs (recoverable and reliable modes)
// ---------------------------------------------------------------------------

/// What a hand-written job must end with.
#[derive(Debug, Clone)]
enum Want {
    /// Completed with this result.
    Done(&'static str),
    /// `Error::JobFailed` of this kind.
    Failed(FailureKind),
    /// `Error::JobFailed` of any kind.
    AnyFailed,
    /// `Error::Decode` (the stored result cannot be read).
    Undecodable,
}

struct RawJob {
    id: String,
    want: Want,
    /// How many times the handler may run it.
    runs: std::ops::RangeInclusive<usize>,
    /// The handler must see attempt 1.
    first_attempt: bool,
}

/// Job hashes written by hand with garbage and extreme numbers, non-UTF-8
/// values, missing fields, payload bombs and huge values; finished jobs with
/// garbage outcomes. Each job must end as the protocol says (a numeric field
/// that is not a strict integer in range counts as absent), run exactly as
/// often as allowed, and its client must get the outcome or a typed error.
async fn hostile_job_hashes(mode: Mode) {
    let server = RedisServer::start();
    let q = queue_name("jobs");
    let keys = qkeys(&q);
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, mode).await.unwrap();
    let mut con = server.connection();
    let runs = Runs::default();
    let worker = builder(&server, mode, &[&q])
        .concurrency(16)
        .build()
        .await
        .unwrap();
    let shutdown = worker.shutdown_handle();
    let task: Run = tokio::spawn(worker.run(runs.handler()));

    let mut jobs: Vec<RawJob> = Vec::new();
    let base = |payload: Vec<u8>| -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("state", b"queued".to_vec()),
            ("enc", b"msgpack".to_vec()),
            ("payload", payload),
        ]
    };
    let mut add = |con: &mut Connection,
                   id: String,
                   fields: Vec<(&'static str, Vec<u8>)>,
                   want: Want,
                   runs: std::ops::RangeInclusive<usize>,
                   first_attempt: bool| {
        push_raw_job(con, &keys, mode, id.as_bytes(), &fields);
        jobs.push(RawJob {
            id,
            want,
            runs,
            first_attempt,
        });
    };
    let garbage_numbers: [&[u8]; 12] = [
        b"nan",
        b"inf",
        b"-inf",
        b"1e309",
        b"-1",
        b"99999999999999999999",
        b"1e3",
        b"0x10",
        b" 1",
        b"1.5",
        b"",
        b"\xff\xfe",
    ];
    // Each field with each garbage value, and what must become of the job:
    // - lease_ms counts as absent (the worker's default, renewed by its
    //   heartbeat): a job that runs longer than the default lease runs once;
    // - timeout_ms counts as absent (the worker's default: none here): a
    //   job that runs 1.5 s completes;
    // - max_attempts counts as 1: a failing job runs once;
    // - attempt, stalls and token count as 0.
    let fields: [(&str, &str, Want); 6] = [
        ("lease_ms", "slow", Want::Done("wols")),
        ("timeout_ms", "slow", Want::Done("wols")),
        ("max_attempts", "fail", Want::Failed(FailureKind::Handler)),
        ("attempt", "ok", Want::Done("ko")),
        ("stalls", "ok", Want::Done("ko")),
        ("token", "ok", Want::Done("ko")),
    ];
    for (i, v) in garbage_numbers.iter().enumerate() {
        for (field, payload, want) in &fields {
            let mut f = base(mp_str(payload));
            f.push((field, v.to_vec()));
            let label = field.strip_suffix("_ms").unwrap_or(field).replace('_', "-");
            add(
                &mut con,
                format!("{label}-{i}"),
                f,
                want.clone(),
                1..=1,
                true,
            );
        }
    }
    // A handler timeout written by hand is honoured: the handler that
    // hangs is abandoned after 300 ms (kind timeout), and retried like a
    // handler error while attempts are left.
    let mut f = base(mp_str("hang"));
    f.push(("timeout_ms", b"300".to_vec()));
    add(
        &mut con,
        "timeout-hang".into(),
        f,
        Want::Failed(FailureKind::Timeout),
        1..=1,
        true,
    );
    let mut f = base(mp_str("hang"));
    f.push(("timeout_ms", b"300".to_vec()));
    f.push(("max_attempts", b"2".to_vec()));
    add(
        &mut con,
        "timeout-retried".into(),
        f,
        Want::Failed(FailureKind::Timeout),
        2..=2,
        true,
    );
    let mut f = base(mp_str("ok"));
    f.push(("client", b"\xff\xfe".to_vec()));
    add(
        &mut con,
        "client-bytes".into(),
        f,
        Want::Done("ko"),
        1..=1,
        true,
    );
    let mut f = base(mp_str("ok"));
    f[1].1 = b"\xff\xfe".to_vec();
    add(
        &mut con,
        "enc-bytes".into(),
        f,
        Want::Failed(FailureKind::Decode),
        0..=0,
        false,
    );
    let mut f = base(mp_str("ok"));
    f[0].1 = b"\xff".to_vec();
    add(
        &mut con,
        "state-bytes".into(),
        f,
        Want::Failed(FailureKind::Decode),
        0..=0,
        false,
    );
    let mut f = base(Vec::new());
    f.pop();
    add(
        &mut con,
        "no-payload".into(),
        f,
        Want::Failed(FailureKind::Decode),
        0..=0,
        false,
    );
    let mut f = base(Vec::new());
    f.remove(1);
    add(
        &mut con,
        "no-enc".into(),
        f,
        Want::Failed(FailureKind::Decode),
        0..=0,
        false,
    );
    // Payload bombs: lengths that claim 4 GiB, deep nesting, a huge value.
    let bombs: Vec<(&str, Vec<u8>)> = vec![
        ("str32", b"\xdb\xff\xff\xff\xffabc".to_vec()),
        ("bin32", b"\xc6\xff\xff\xff\xffabc".to_vec()),
        ("array32", b"\xdd\xff\xff\xff\xff\xc0".to_vec()),
        ("map32", b"\xdf\xff\xff\xff\xff\xc0\xc0".to_vec()),
        ("deep", deep_msgpack(100_000)),
        ("garbage", b"\xc1\xc1\xc1".to_vec()),
    ];
    for (name, payload) in bombs {
        add(
            &mut con,
            format!("bomb-{name}"),
            base(payload),
            Want::Failed(FailureKind::Decode),
            0..=0,
            false,
        );
    }
    let mut f = base(deep_json(100_000));
    f[1].1 = b"json".to_vec();
    add(
        &mut con,
        "bomb-deep-json".into(),
        f,
        Want::Failed(FailureKind::Decode),
        0..=0,
        false,
    );
    let huge = "h".repeat(3 << 20);
    add(
        &mut con,
        "huge".into(),
        base(mp_str(&huge)),
        Want::Failed(FailureKind::TooLarge),
        1..=1,
        true,
    );
    // A job key of another type: dead-lettered, its client told.
    write_text(&mut con, keys.job("not-a-hash").as_bytes(), b"\xff");
    add(
        &mut con,
        "not-a-hash".into(),
        Vec::new(),
        Want::Failed(FailureKind::Decode),
        0..=0,
        false,
    );
    // The same ID twice on pending.
    let f = base(mp_str("twice"));
    push_raw_job(&mut con, &keys, mode, b"twice", &[]);
    add(
        &mut con,
        "twice".into(),
        f,
        Want::Done("eciwt"),
        1..=2,
        false,
    );
    // Finished jobs with garbage outcomes (nothing queued).
    type Fields = Vec<(&'static str, &'static [u8])>;
    let finished: Vec<(&str, Fields, Want)> = vec![
        (
            "failed-garbage",
            vec![
                ("state", b"failed"),
                ("error_kind", b"\xff\xfe"),
                ("error", b"\xc3\x28"),
            ],
            Want::AnyFailed,
        ),
        (
            "dead-bare",
            vec![("state", b"dead")],
            Want::Failed(FailureKind::Other("unknown".into())),
        ),
        (
            "completed-garbage",
            vec![
                ("state", b"completed"),
                ("enc", b"\xff"),
                ("result", b"\xc1"),
            ],
            Want::Undecodable,
        ),
    ];
    for (id, fields, want) in finished {
        let mut c = redis::cmd("HSET");
        c.arg(keys.job(id));
        for (f, v) in fields {
            c.arg(f).arg(v);
        }
        let _: () = c.query(&mut con).unwrap();
        jobs.push(RawJob {
            id: id.into(),
            want,
            runs: 0..=0,
            first_attempt: false,
        });
    }
    let normal = queue.submit("normal").await.unwrap();

    let results = join_all(jobs.iter().map(|j| {
        let queue = queue.clone();
        async move {
            match queue.job(&j.id).await {
                Ok(h) => h.result_timeout::<String>(WAIT).await,
                Err(e) => Err(e),
            }
        }
    }))
    .await;
    let mut problems = Vec::new();
    for (job, result) in jobs.iter().zip(results) {
        let ok = match (&job.want, &result) {
            (Want::Done(r), Ok(got)) => got == r,
            (Want::Failed(k), Err(Error::JobFailed { kind, .. })) => kind == k,
            (Want::AnyFailed, Err(Error::JobFailed { .. })) => true,
            (Want::Undecodable, Err(Error::Decode { .. })) => true,
            _ => false,
        };
        if !ok {
            problems.push(format!("{}: wanted {:?}, got {result:?}", job.id, job.want));
        }
        let n = runs.count(&job.id);
        if !job.runs.contains(&n) {
            problems.push(format!(
                "{}: ran {n} times (attempts {:?}), allowed {:?}",
                job.id,
                runs.attempts(&job.id),
                job.runs
            ));
        }
        if job.first_attempt && runs.attempts(&job.id).first().is_some_and(|&a| a != 1) {
            problems.push(format!(
                "{}: the handler saw attempts {:?}, expected 1 (a counter that is not an integer counts as 0)",
                job.id,
                runs.attempts(&job.id)
            ));
        }
    }
    match normal.result_timeout::<String>(WAIT).await {
        Ok(r) if r == "lamron" => {}
        other => problems.push(format!("a normal job: {other:?}")),
    }
    let dead: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.dead_jobs())
        .arg(0)
        .arg(-1)
        .query(&mut con)
        .unwrap();
    if !dead.contains(&"not-a-hash".to_string()) {
        problems.push(format!("not-a-hash is not in dead_jobs: {dead:?}"));
    }
    if task.is_finished() {
        problems.push("the worker ended".into());
    }
    if let Err(e) = stop(shutdown, task).await {
        problems.push(e);
    }
    assert!(
        problems.is_empty(),
        "{mode:?} mode: {} problems:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoverable_hostile_job_hashes() {
    hostile_job_hashes(Mode::Recoverable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_hostile_job_hashes() {
    hostile_job_hashes(Mode::Reliable).await;
}

/// Job IDs on pending that are not valid UTF-8, empty, or longer than 256
/// bytes: never run, never dropped, never stuck in a claim: each goes to
/// dead_jobs; one that has a hash is failed (kind decode). The worker lives
/// and runs the next job.
async fn invalid_ids(mode: Mode) {
    let server = RedisServer::start();
    let q = queue_name("ids");
    let keys = qkeys(&q);
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, mode).await.unwrap();
    let mut con = server.connection();
    let runs = Runs::default();
    let worker = builder(&server, mode, &[&q]).build().await.unwrap();
    let inflight = keys.inflight(worker.id());
    let shutdown = worker.shutdown_handle();
    let task: Run = tokio::spawn(worker.run(runs.handler()));
    let long = vec![b'x'; 300];
    let bare: Vec<&[u8]> = vec![b"\xff\xfe", b"", &long, b"\xc3\x28", b"ok\xe2\x82"];
    for id in &bare {
        push_raw_job(&mut con, &keys, mode, id, &[]);
    }
    let with_hash: &[u8] = b"\xff\x01h";
    push_raw_job(
        &mut con,
        &keys,
        mode,
        with_hash,
        &[
            ("state", b"queued".to_vec()),
            ("enc", b"msgpack".to_vec()),
            ("payload", mp_str("ok")),
            ("client", client.id().as_bytes().to_vec()),
        ],
    );
    let normal = queue.submit("normal").await.unwrap();
    let mut problems = Vec::new();
    match normal.result_timeout::<String>(WAIT).await {
        Ok(r) if r == "lamron" => {}
        other => problems.push(format!("a normal job after them: {other:?}")),
    }
    let mut all = bare.clone();
    all.push(with_hash);
    let dead_jobs = keys.dead_jobs();
    let is_dead = |con: &mut Connection, id: &[u8]| {
        redis::cmd("ZSCORE")
            .arg(&dead_jobs)
            .arg(id)
            .query::<Option<f64>>(con)
            .unwrap()
            .is_some()
    };
    wait_until(Duration::from_secs(5), || {
        all.iter().all(|id| is_dead(&mut con, id))
    })
    .await;
    for id in &all {
        if !is_dead(&mut con, id) {
            problems.push(format!("ID {} is not in dead_jobs", show(id)));
        }
    }
    let mut claims: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(keys.pending())
        .arg(0)
        .arg(-1)
        .query(&mut con)
        .unwrap();
    let held: Vec<Vec<u8>> = match mode {
        Mode::Reliable => redis::cmd("LRANGE")
            .arg(&inflight)
            .arg(0)
            .arg(-1)
            .query(&mut con),
        _ => redis::cmd("ZRANGE")
            .arg(keys.leases())
            .arg(0)
            .arg(-1)
            .query(&mut con),
    }
    .unwrap();
    claims.extend(held);
    for id in &all {
        if claims.iter().any(|c| c == id) {
            problems.push(format!("ID {} is still pending or claimed", show(id)));
        }
    }
    let hash: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
        .arg(keys.job_bytes(with_hash))
        .query(&mut con)
        .unwrap();
    let state = hash.get("state").map(|s| show(s));
    let kind = hash.get("error_kind").map(|s| show(s));
    if state.as_deref() != Some("\"failed\"") || kind.as_deref() != Some("\"decode\"") {
        problems.push(format!(
            "the hash of a non-UTF-8 ID is not failed with kind decode: state {state:?}, kind {kind:?}"
        ));
    }
    if runs.total() != 1 {
        problems.push(format!(
            "the handler ran {} times, expected once",
            runs.total()
        ));
    }
    if task.is_finished() {
        problems.push("the worker ended".into());
    }
    if let Err(e) = stop(shutdown, task).await {
        problems.push(e);
    }
    assert!(
        problems.is_empty(),
        "{mode:?} mode:\n  {}",
        problems.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoverable_invalid_ids_are_dead_lettered() {
    invalid_ids(Mode::Recoverable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_invalid_ids_are_dead_lettered() {
    invalid_ids(Mode::Reliable).await;
}

// ---------------------------------------------------------------------------
// Part A: hostile simple-mode entries
// ---------------------------------------------------------------------------

/// Entries pushed by hand on a simple-mode pending list: not MessagePack,
/// empty, huge, non-UTF-8 IDs and channels, duplicate and missing fields,
/// numbers of the wrong type, payload bombs. Each entry is either told to
/// its reply channel (when its ID and channel can be read) or kept in the
/// dead-letter list, exactly as popped; none is dropped. A client's own job
/// whose entry is rewritten gets a typed decode failure. The worker lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_hostile_entries_are_told_or_kept() {
    let server = RedisServer::start();
    let q = queue_name("entries");
    let keys = qkeys(&q);
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    let mut con = server.connection();
    let channel = keys.reply_channel("hostile");
    let listener = Listener::start(&server.url(), &channel).await;

    // The client's own job, rewritten while it waits: its payload is garbage.
    let own = queue.submit("mine").await.unwrap();
    let entries: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(keys.pending())
        .arg(0)
        .arg(-1)
        .query(&mut con)
        .unwrap();
    let mut env = rmpv::decode::read_value(&mut entries[0].as_slice()).unwrap();
    if let rmpv::Value::Map(fields) = &mut env {
        for (k, v) in fields.iter_mut() {
            if k.as_str() == Some("payload") {
                *v = rmpv::Value::Binary(b"\xc1".to_vec());
            }
        }
    }
    let mut rewritten = Vec::new();
    rmpv::encode::write_value(&mut rewritten, &env).unwrap();
    let _: () = redis::cmd("LSET")
        .arg(keys.pending())
        .arg(0)
        .arg(rewritten)
        .query(&mut con)
        .unwrap();

    use rmpv::Value as V;
    let text = |s: &str| V::from(s);
    let bin = |b: &[u8]| V::Binary(b.to_vec());
    let ch = text(&channel);
    // (label, entry, what must happen: Some((status, kind)) told, None kept)
    /// What must happen to an entry: told (status, kind), or kept (None).
    type Told = Option<(&'static str, &'static str)>;
    let mut cases: Vec<(&str, Vec<u8>, Told)> = vec![
        ("not msgpack", NOT_AN_ENVELOPE.to_vec(), None),
        ("empty", Vec::new(), None),
        ("5 MiB of garbage", vec![0xc1; 5 << 20], None),
        ("nested arrays", deep_msgpack(100_000), None),
        (
            "completes",
            msgpack_map(vec![
                ("id", text("e-ok")),
                ("reply", ch.clone()),
                ("enc", text("msgpack")),
                ("payload", bin(&mp_str("fine"))),
            ]),
            Some(("completed", "")),
        ),
        (
            "missing payload",
            msgpack_map(vec![
                ("id", text("e-no-payload")),
                ("reply", ch.clone()),
                ("enc", text("msgpack")),
            ]),
            Some(("failed", "decode")),
        ),
        (
            "deep payload",
            msgpack_map(vec![
                ("id", text("e-deep")),
                ("reply", ch.clone()),
                ("enc", text("msgpack")),
                ("payload", bin(&deep_msgpack(100_000))),
            ]),
            Some(("failed", "decode")),
        ),
        (
            "str32 bomb payload",
            msgpack_map(vec![
                ("id", text("e-bomb")),
                ("reply", ch.clone()),
                ("enc", text("msgpack")),
                ("payload", bin(b"\xdb\xff\xff\xff\xffab")),
            ]),
            Some(("failed", "decode")),
        ),
        (
            "huge payload",
            msgpack_map(vec![
                ("id", text("e-huge")),
                ("reply", ch.clone()),
                ("enc", text("msgpack")),
                ("payload", bin(&mp_str(&"h".repeat(3 << 20)))),
            ]),
            Some(("failed", "too_large")),
        ),
        (
            "negative submitted_ms",
            msgpack_map(vec![
                ("id", text("e-neg")),
                ("reply", ch.clone()),
                ("enc", text("msgpack")),
                ("payload", bin(&mp_str("x"))),
                ("submitted_ms", V::from(-1)),
            ]),
            // An optional field of the wrong type counts as absent
            // (protocol.md 6.4): the job runs.
            Some(("completed", "")),
        ),
        (
            "reply of another queue",
            msgpack_map(vec![
                ("id", text("e-other")),
                ("reply", text("jq:{other}:reply:x")),
                ("enc", text("msgpack")),
                ("payload", bin(&mp_str("x"))),
            ]),
            None,
        ),
    ];
    let raw = |fields: Vec<(&str, Vec<u8>)>| {
        // A map whose values are given as raw MessagePack (strings that are
        // not UTF-8, duplicate keys).
        let mut out = vec![0x80 | fields.len() as u8];
        for (k, v) in fields {
            out.extend(msgpack_raw_str(k.as_bytes()));
            out.extend(v);
        }
        out
    };
    let enc_mp = msgpack_raw_str(b"msgpack");
    let payload_mp = {
        let mut v = Vec::new();
        rmpv::encode::write_value(&mut v, &bin(&mp_str("x"))).unwrap();
        v
    };
    let ch_raw = msgpack_raw_str(channel.as_bytes());
    cases.push((
        "id not UTF-8",
        raw(vec![
            ("id", msgpack_raw_str(b"\xff\xfe")),
            ("reply", ch_raw.clone()),
            ("enc", enc_mp.clone()),
            ("payload", payload_mp.clone()),
        ]),
        None,
    ));

    cases.push((
        "enc not UTF-8",
        raw(vec![
            ("id", msgpack_raw_str(b"e-enc")),
            ("reply", ch_raw.clone()),
            ("enc", msgpack_raw_str(b"\xff")),
            ("payload", payload_mp.clone()),
        ]),
        Some(("failed", "decode")),
    ));
    cases.push((
        "duplicate id",
        raw(vec![
            ("id", msgpack_raw_str(b"e-dup-a")),
            ("id", msgpack_raw_str(b"e-dup-b")),
            ("reply", ch_raw.clone()),
            ("enc", enc_mp.clone()),
            ("payload", payload_mp.clone()),
        ]),
        None,
    ));
    for (_, entry, _) in &cases {
        let _: () = redis::cmd("LPUSH")
            .arg(keys.pending())
            .arg(entry.as_slice())
            .query(&mut con)
            .unwrap();
    }
    let runs = Runs::default();
    let worker = builder(&server, Mode::Simple, &[&q]).build().await.unwrap();
    let shutdown = worker.shutdown_handle();
    let task: Run = tokio::spawn(worker.run(runs.handler()));

    let mut problems = Vec::new();
    match own.result_timeout::<String>(WAIT).await {
        Err(Error::JobFailed {
            kind: FailureKind::Decode,
            ..
        }) => {}
        other => problems.push(format!("the client's rewritten job: {other:?}")),
    }
    let after = queue
        .submit("after")
        .await
        .unwrap()
        .result_timeout::<String>(WAIT)
        .await;
    if after.as_deref().ok() != Some("retfa") {
        problems.push(format!("a job after them: {after:?}"));
    }
    let id_of = |entry: &[u8]| -> Option<String> {
        let v = rmpv::decode::read_value(&mut &entry[..]).ok()?;
        field(&v, "id")?.as_str().map(str::to_owned)
    };
    let dead_entries = |con: &mut Connection| -> Vec<Vec<u8>> {
        let records: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(keys.dead())
            .arg(0)
            .arg(-1)
            .query(con)
            .unwrap();
        records
            .iter()
            .filter_map(|r| {
                let v = rmpv::decode::read_value(&mut r.as_slice()).ok()?;
                field(&v, "entry")?.as_slice().map(<[u8]>::to_vec)
            })
            .collect()
    };
    wait_until(Duration::from_secs(5), || {
        cases.iter().all(|(_, entry, told)| match told {
            Some(_) => id_of(entry).is_some_and(|id| listener.outcome(&id).is_some()),
            None => dead_entries(&mut con).contains(entry),
        })
    })
    .await;
    let dead = dead_entries(&mut con);
    for (label, entry, told) in &cases {
        match told {
            Some((status, kind)) => {
                let id = id_of(entry).unwrap();
                let got = listener.outcome(&id);
                if got.as_ref().map(|(s, k)| (s.as_str(), k.as_str())) != Some((*status, *kind)) {
                    problems.push(format!(
                        "{label}: told {got:?}, expected ({status}, {kind})"
                    ));
                }
            }
            None => {
                if !dead.contains(entry) {
                    problems.push(format!("{label}: not kept in the dead-letter list"));
                }
            }
        }
    }
    if task.is_finished() {
        problems.push("the worker ended".into());
    }
    // A reply that is not UTF-8 is an optional field of the wrong type:
    // absent (protocol.md 6.4), so the job runs and nobody is told.
    let silent = raw(vec![
        ("id", msgpack_raw_str(b"e-reply")),
        ("reply", msgpack_raw_str(b"jq:\xff")),
        ("enc", enc_mp.clone()),
        ("payload", payload_mp.clone()),
    ]);
    let _: () = redis::cmd("LPUSH")
        .arg(keys.pending())
        .arg(&silent)
        .query(&mut con)
        .unwrap();
    let after_silent = queue
        .submit("last")
        .await
        .unwrap()
        .result_timeout::<String>(WAIT)
        .await;
    if after_silent.as_deref().ok() != Some("tsal") {
        problems.push(format!("a job after the silent one: {after_silent:?}"));
    }
    if dead_entries(&mut con).contains(&silent) {
        problems.push("reply not UTF-8: dead-lettered, but it should run".into());
    }
    // Completed: "fine", "negative submitted_ms", "after", the silent one
    // and "last".
    match stop(shutdown, task).await {
        Ok(stats) if stats.completed >= 5 => {}
        other => problems.push(format!("stats: {other:?}")),
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// Part A: recovery continues
// ---------------------------------------------------------------------------

/// Submits a job, lets a first worker start it with a handler that never
/// returns, kills that worker (aborts its task, as if its process died) and
/// checks that a second worker finishes the job.
async fn dead_worker_job_is_finished(
    server: &RedisServer,
    q: &str,
    mode: Mode,
) -> Result<(), String> {
    let client = Client::connect(config(server)).await.unwrap();
    let queue = client.queue(q, mode).await.unwrap();
    let runs = Runs::default();
    let first = builder(server, mode, &[q]).build().await.unwrap();
    let first_task: Run = tokio::spawn(first.run(runs.handler()));
    let handle = queue.submit("hang").await.unwrap();
    let id = handle.id().to_owned();
    if !wait_until(Duration::from_secs(5), || runs.count(&id) == 1).await {
        return Err("the first worker did not start the job".into());
    }
    first_task.abort();
    let second = builder(server, mode, &[q]).build().await.unwrap();
    let shutdown = second.shutdown_handle();
    let task: Run =
        tokio::spawn(second.run(|_job: Job<String>| async { Ok::<_, String>("enod".to_owned()) }));
    let result = handle
        .result_timeout::<String>(Duration::from_secs(10))
        .await;
    let stopped = stop(shutdown, task).await;
    match (result, stopped) {
        (Ok(r), Ok(_)) if r == "enod" => Ok(()),
        (result, stopped) => Err(format!(
            "the dead worker's job was not finished by the other worker: {result:?} (worker: {stopped:?})"
        )),
    }
}

/// Recoverable mode: a sweep guard without TTL (a string, then a hash) and
/// garbage members in the lease set (not UTF-8, empty, stale, never stale)
/// do not stop the sweep: a dead worker's job is finished by another worker,
/// and the stale garbage IDs end in dead_jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoverable_recovery_survives_garbage_guard_and_leases() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let mut problems = Vec::new();
    for guard in ["string", "hash"] {
        let q = queue_name("sweep");
        let keys = qkeys(&q);
        write_type(&mut con, keys.sweep().as_bytes(), guard);
        let leases = keys.leases();
        for (score, member) in [
            ("0", &b"\xff\xfe"[..]),
            ("-inf", b""),
            ("1", &[b'g'; 1000][..]),
            ("+inf", b"forever"),
        ] {
            let _: () = redis::cmd("ZADD")
                .arg(&leases)
                .arg(score)
                .arg(member)
                .query(&mut con)
                .unwrap();
        }
        if let Err(e) = dead_worker_job_is_finished(&server, &q, Mode::Recoverable).await {
            problems.push(format!("guard of type {guard} without TTL: {e}"));
        }
        for id in [&b"\xff\xfe"[..], b""] {
            let dead: Option<f64> = redis::cmd("ZSCORE")
                .arg(keys.dead_jobs())
                .arg(id)
                .query(&mut con)
                .unwrap();
            if dead.is_none() {
                problems.push(format!(
                    "guard {guard}: stale garbage lease member {} did not end in dead_jobs",
                    show(id)
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Reliable mode: a recovery guard without TTL and garbage members of the
/// workers set (not UTF-8, empty, 100 KB, one whose in-flight list holds
/// another type, one that never expires) do not stop recovery: a dead
/// worker's job is finished by another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_recovery_survives_garbage_guard_and_workers() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let mut problems = Vec::new();
    for guard in ["string", "hash"] {
        let q = queue_name("recovery");
        let keys = qkeys(&q);
        write_type(&mut con, keys.sweep().as_bytes(), guard);
        let big = vec![b'w'; 100_000];
        for (score, member) in [
            ("0", &b"\xff\xfe"[..]),
            ("-inf", b""),
            ("1", &big[..]),
            ("2", b"broken-list"),
            ("+inf", b"immortal"),
        ] {
            let _: () = redis::cmd("ZADD")
                .arg(keys.workers())
                .arg(score)
                .arg(member)
                .query(&mut con)
                .unwrap();
        }
        write_type(&mut con, &keys.inflight_bytes(b"broken-list"), "string");
        if let Err(e) = dead_worker_job_is_finished(&server, &q, Mode::Reliable).await {
            problems.push(format!("guard of type {guard} without TTL: {e}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Reliable mode: 150 long-dead garbage workers whose in-flight lists hold
/// another type (each recovery pass lists at most 100 dead workers) must not
/// hide a worker that dies later: its job is finished by another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_recovery_is_not_starved_by_broken_dead_workers() {
    trace();
    let server = RedisServer::start();
    let mut con = server.connection();
    let q = queue_name("starved");
    let keys = qkeys(&q);
    for i in 0..150 {
        let member = format!("garbage-{i:03}");
        let _: () = redis::cmd("ZADD")
            .arg(keys.workers())
            .arg(i)
            .arg(&member)
            .query(&mut con)
            .unwrap();
        write_type(&mut con, keys.inflight(&member).as_bytes(), "string");
    }
    dead_worker_job_is_finished(&server, &q, Mode::Reliable)
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------
// Part A: deeply nested payloads
// ---------------------------------------------------------------------------

/// Deeply nested payloads decoded into a recursive type (`serde_json::Value`)
/// must fail the job with kind `decode` (or run it), never overflow the
/// stack of the worker's thread: a stack overflow aborts the whole process,
/// every queue and job of it (and, here, this test binary: a regression
/// shows as "has overflowed its stack").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_payloads_fail_as_decode_errors_and_do_not_crash_the_worker() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let client = Client::connect(config(&server)).await.unwrap();
    let mut payloads: Vec<(String, &str, Vec<u8>)> = Vec::new();
    for depth in [100, 300, 600, 1000, 1023, 1100, 100_000] {
        payloads.push((format!("arrays-{depth}"), "msgpack", deep_msgpack(depth)));
        payloads.push((format!("maps-{depth}"), "msgpack", deep_msgpack_maps(depth)));
    }
    payloads.push(("json-100000".into(), "json", deep_json(100_000)));
    let handler = |job: Job<serde_json::Value>| async move {
        Ok::<_, String>(job.payload.is_null().to_string())
    };
    for mode in ALL_MODES {
        let q = queue_name("deep");
        let keys = qkeys(&q);
        let queue = client.queue(&q, mode).await.unwrap();
        let worker = builder(&server, mode, &[&q]).build().await.unwrap();
        let shutdown = worker.shutdown_handle();
        let task: Run = tokio::spawn(worker.run(handler));
        let channel = keys.reply_channel("hostile");
        let listener = Listener::start(&server.url(), &channel).await;
        // One at a time, so that a crash names the payload that caused it.
        for (id, enc, payload) in &payloads {
            eprintln!("child: {mode:?} mode, payload {id} ({enc})");
            let outcome = match mode {
                Mode::Simple => {
                    let entry = msgpack_map(vec![
                        ("id", rmpv::Value::from(id.as_str())),
                        ("reply", rmpv::Value::from(channel.as_str())),
                        ("enc", rmpv::Value::from(*enc)),
                        ("payload", rmpv::Value::Binary(payload.clone())),
                    ]);
                    let _: () = redis::cmd("LPUSH")
                        .arg(keys.pending())
                        .arg(entry)
                        .query(&mut con)
                        .unwrap();
                    wait_until(WAIT, || listener.outcome(id).is_some()).await;
                    listener.outcome(id).map(|(s, k)| format!("{s} {k}"))
                }
                _ => {
                    push_raw_job(
                        &mut con,
                        &keys,
                        mode,
                        id.as_bytes(),
                        &[
                            ("state", b"queued".to_vec()),
                            ("enc", enc.as_bytes().to_vec()),
                            ("payload", payload.clone()),
                        ],
                    );
                    Some(
                        match queue
                            .job(id)
                            .await
                            .unwrap()
                            .result_timeout::<String>(WAIT)
                            .await
                        {
                            Ok(_) => "completed ".to_owned(),
                            Err(Error::JobFailed { kind, .. }) => format!("failed {kind}"),
                            Err(e) => format!("error {e}"),
                        },
                    )
                }
            };
            assert!(
                matches!(outcome.as_deref(), Some("completed " | "failed decode")),
                "{mode:?} {id}: {outcome:?}"
            );
        }
        if mode == Mode::Simple {
            // Whole entries nested deeply (their unknown keys are skipped,
            // recursively): kept in the dead-letter list.
            for depth in [1000, 100_000] {
                eprintln!("child: simple mode, an entry of {depth} nested maps");
                let _: () = redis::cmd("LPUSH")
                    .arg(keys.pending())
                    .arg(deep_msgpack_maps(depth))
                    .query(&mut con)
                    .unwrap();
            }
            let dead = keys.dead();
            let kept = wait_until(WAIT, || {
                redis::cmd("LLEN")
                    .arg(&dead)
                    .query::<usize>(&mut con)
                    .unwrap()
                    == 2
            })
            .await;
            assert!(
                kept,
                "the deeply nested entries are not in the dead-letter list"
            );
        }
        let normal: String = queue
            .submit(&serde_json::json!({"a": 1}))
            .await
            .unwrap()
            .result_timeout(WAIT)
            .await
            .unwrap();
        assert_eq!(normal, "false", "{mode:?}");
        assert!(!task.is_finished(), "{mode:?}: the worker ended");
        stop(shutdown, task).await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// Part B: script mutations
// ---------------------------------------------------------------------------

/// A numeric argument and its documented range (spec-hardening.md).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Num {
    /// Durations in ms: 1 to 10^12.
    Ms,
    /// A job's lease or handler timeout in `job_submit`: 0 (the worker's
    /// default) to 10^12.
    MsOrZero,
    /// Counts and limits: 1 to 10^6.
    Count,
    /// Dead max: 1 to 10^9.
    DeadMax,
    /// Max stalls: 0 to 10^6.
    MaxStalls,
    /// Max attempts: 1 to 10^6.
    MaxAttempts,
    /// Tokens given back by a worker: 1 to 2^53 - 1.
    Token,
    /// Tickets taken: 0 or 1.
    Tickets,
    /// Flags: exactly 0 or 1.
    Flag,
    /// A protocol version: a strict integer; compared with the queue's.
    Protocol,
    /// A run-at time in ms since the epoch: 0 (none) to 10^15 - 1.
    RunAt,
    /// A retry delay: -1 (the job's backoff) to 10^12.
    RetryDelay,
    /// `job_promote`'s limit: 1 to 10^5.
    PromoteLimit,
    /// `queue_control`'s value of `paused`: "1", or "" (clear).
    Paused,
    /// `queue_control`'s value of `rate`: "<max>:<window ms>" (max 1 to
    /// 10^6, window 1 to 10^12), or "" (clear).
    Rate,
    /// `queue_control`'s value of `concurrency`: 1 to 10^6, or "" (clear).
    Concurrency,
    /// `queue_control`'s value of `events` (the event stream's cap): 1 to
    /// 10^9, or "" (clear).
    Events,
}

impl Num {
    /// `Some(true)`: valid; `Some(false)`: must be refused with
    /// `JQ_BAD_ARGS`; `None`: no rule (any `JQ_` refusal or success).
    fn valid(self, v: &str) -> Option<bool> {
        let range = match self {
            Num::Ms => (1, 1_000_000_000_000),
            Num::MsOrZero => (0, 1_000_000_000_000),
            Num::Count => (1, 1_000_000),
            Num::DeadMax => (1, 1_000_000_000),
            Num::MaxStalls => (0, 1_000_000),
            Num::MaxAttempts => (1, 1_000_000),
            Num::Token => (1, (1i64 << 53) - 1),
            Num::Tickets | Num::Flag => (0, 1),
            Num::Protocol => return strict_int(v).is_none().then_some(false),
            Num::RunAt => (0, 999_999_999_999_999),
            Num::RetryDelay => (-1, 1_000_000_000_000),
            Num::PromoteLimit => (1, 100_000),
            Num::Paused => return Some(v.is_empty() || v == "1"),
            Num::Rate => {
                let ok = v.is_empty()
                    || v.split_once(':').is_some_and(|(max, window)| {
                        let digits =
                            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
                        digits(max)
                            && digits(window)
                            && strict_int(max).is_some_and(|n| (1..=1_000_000).contains(&n))
                            && strict_int(window)
                                .is_some_and(|n| (1..=1_000_000_000_000).contains(&n))
                    });
                return Some(ok);
            }
            Num::Concurrency if v.is_empty() => return Some(true),
            Num::Concurrency => (1, 1_000_000),
            Num::Events if v.is_empty() => return Some(true),
            Num::Events => (1, 1_000_000_000),
        };
        Some(strict_int(v).is_some_and(|n| range.0 <= n && n <= range.1))
    }
}

/// How many KEYS and ARGV a script takes.
#[derive(Clone, Copy, Debug)]
enum Arity {
    /// Exactly `keys` KEYS and `min..=max` ARGV.
    Fixed { keys: usize, min: usize, max: usize },
    /// `keys + n` KEYS and `argv + per * n` ARGV, n >= 1.
    PerJob {
        keys: usize,
        argv: usize,
        per: usize,
    },
    /// Exactly `keys` KEYS and `argv + 2 * n` ARGV, n >= 1 (pairs of a
    /// name and a value, `queue_control`).
    Pairs { keys: usize, argv: usize },
    /// `keys + n + locks` KEYS and `argv + per * n` ARGV, n >= 1: a job key
    /// per job, then the lock keys of the `locks` jobs with a unique key
    /// (`job_submit`).
    Unique {
        keys: usize,
        argv: usize,
        per: usize,
        locks: usize,
    },
}

impl Arity {
    fn accepts(self, nkeys: usize, nargs: usize) -> bool {
        match self {
            Arity::Fixed { keys, min, max } => nkeys == keys && (min..=max).contains(&nargs),
            Arity::PerJob { keys, argv, per } => {
                nkeys > keys && nargs == argv + per * (nkeys - keys)
            }
            Arity::Pairs { keys, argv } => {
                nkeys == keys && nargs > argv && (nargs - argv).is_multiple_of(2)
            }
            Arity::Unique {
                keys,
                argv,
                per,
                locks,
            } => {
                nargs > argv
                    && (nargs - argv).is_multiple_of(per)
                    && nkeys == keys + (nargs - argv) / per + locks
            }
        }
    }
}

/// A valid call of a script (protocol.md section 10) and the data it runs on.
struct Baseline {
    label: &'static str,
    call: RawCall,
    setup: Vec<Vec<String>>,
    /// Redis type each key holds or gets (`hash`, `list`, `zset`, `string`,
    /// `stream`).
    types: Vec<&'static str>,
    /// Numeric arguments: 0-based ARGV index and range.
    numbers: Vec<(usize, Num)>,
    arity: Arity,
}

const FUTURE: &str = "9999999999999";

fn k(name: &str) -> String {
    format!("jq:{{mut}}:{name}")
}

fn c(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn bl(
    label: &'static str,
    script: &'static str,
    keys: &[(&str, &'static str)],
    args: &[&[u8]],
    setup: Vec<Vec<String>>,
    numbers: Vec<(usize, Num)>,
    arity: Arity,
) -> Baseline {
    Baseline {
        label,
        call: RawCall {
            script,
            keys: keys.iter().map(|(n, _)| k(n).into_bytes()).collect(),
            args: args.iter().map(|a| a.to_vec()).collect(),
        },
        setup,
        types: keys.iter().map(|(_, t)| *t).collect(),
        numbers,
        arity,
    }
}

fn fixed(keys: usize, min: usize, max: usize) -> Arity {
    Arity::Fixed { keys, min, max }
}

/// Baseline calls of every script, from protocol.md section 10.
fn baselines() -> Vec<Baseline> {
    let envelope: &[u8] =
        b"\x85\xa2id\xa2j1\xa5reply\xb2jq:{mut}:reply:c7\xa3enc\xa4json\xa7payload\xc4\x04\"hi\"\xacsubmitted_ms\x07";
    let record: &[u8] = b"\x83\xa6reason\xa1x\xa5entry\xc4\x01\xc1\xa5at_ms\x07";
    let meta = |mode: &str| {
        c(&[
            "HSET",
            &k("meta"),
            "mode",
            mode,
            "protocol",
            "1",
            "created_ms",
            "1",
        ])
    };
    // The queue's metadata with controls (protocol.md 8.9): pairs of a
    // field and its value.
    let controls = |mode: &str, fields: &[&str]| {
        let mut command = meta(mode);
        command.extend(fields.iter().map(|f| f.to_string()));
        command
    };
    let queued = |id: &str| {
        c(&[
            "HSET",
            &k(&format!("job:{id}")),
            "state",
            "queued",
            "enc",
            "json",
            "payload",
            "1",
            "client",
            "c7",
        ])
    };
    let active = |id: &str, token: &str| {
        c(&[
            "HSET",
            &k(&format!("job:{id}")),
            "state",
            "active",
            "enc",
            "json",
            "payload",
            "1",
            "client",
            "c7",
            "token",
            token,
            "attempt",
            "1",
            "max_attempts",
            "3",
            "lease_ms",
            "5000",
        ])
    };
    // A job started under a concurrency limit.
    let slotted = |id: &str| c(&["HSET", &k(&format!("job:{id}")), "slot", "1"]);
    let many = usize::MAX;
    let claim_keys: &[(&str, &'static str)] = &[
        ("pending", "list"),
        ("tickets", "list"),
        ("leases", "zset"),
        ("fence", "string"),
        ("meta", "hash"),
        ("rate", "zset"),
        ("gate", "list"),
    ];
    let claim_numbers = vec![
        (0, Num::Count),
        (1, Num::Ms),
        (2, Num::Tickets),
        (3, Num::Flag),
    ];
    let start_keys: &[(&str, &'static str)] = &[
        ("inflight:w1", "list"),
        ("dead_jobs", "zset"),
        ("fence", "string"),
        ("pending", "list"),
        ("meta", "hash"),
        ("running", "zset"),
        ("rate", "zset"),
        ("gate", "list"),
        ("events", "stream"),
    ];
    let start_numbers = vec![
        (0, Num::MaxStalls),
        (2, Num::Ms),
        (3, Num::DeadMax),
        (6, Num::Flag),
    ];
    let batch_numbers = vec![
        (0, Num::Ms),
        (4, Num::Token),
        (8, Num::Flag),
        (9, Num::RetryDelay),
        (11, Num::Token),
        (15, Num::Flag),
        (16, Num::RetryDelay),
    ];
    let batch_arity = Arity::PerJob {
        keys: 8,
        argv: 3,
        per: 7,
    };
    let start_arity = Arity::PerJob {
        keys: 9,
        argv: 7,
        per: 1,
    };
    vec![
        bl(
            "create",
            "queue_register",
            &[("meta", "hash")],
            &[b"recoverable", b"1"],
            vec![],
            vec![(1, Num::Protocol)],
            fixed(1, 2, 2),
        ),
        bl(
            "match",
            "queue_register",
            &[("meta", "hash")],
            &[b"recoverable", b"1"],
            vec![meta("recoverable")],
            vec![(1, Num::Protocol)],
            fixed(1, 2, 2),
        ),
        bl(
            "one envelope",
            "simple_submit",
            &[
                ("meta", "hash"),
                ("pending", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
            ],
            &[b"simple", b"1", b"0", b"0", envelope],
            vec![meta("simple"), c(&["LPUSH", &k("pending"), "e0"])],
            vec![(1, Num::Protocol), (2, Num::MsOrZero), (3, Num::RunAt)],
            fixed(4, 5, many),
        ),
        bl(
            "one delayed envelope",
            "simple_submit",
            &[
                ("meta", "hash"),
                ("pending", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
            ],
            &[b"simple", b"1", b"60000", b"0", envelope],
            vec![
                meta("simple"),
                c(&["ZADD", &k("delayed"), FUTURE, "e0"]),
                c(&["LPUSH", &k("clock"), "1"]),
            ],
            vec![(1, Num::Protocol), (2, Num::MsOrZero), (3, Num::RunAt)],
            fixed(4, 5, many),
        ),
        bl(
            "publish",
            "simple_reply",
            &[("meta", "hash")],
            &[b"jq:{mut}:reply:c7", b"\x81\xa2id\xa2j1", b"publish"],
            vec![meta("simple")],
            vec![],
            fixed(1, 2, 3),
        ),
        bl(
            "two envelopes",
            "simple_requeue",
            &[("pending", "list")],
            &[envelope, envelope],
            vec![c(&["LPUSH", &k("pending"), "e0"])],
            vec![],
            fixed(1, 1, many),
        ),
        bl(
            "record",
            "simple_dead",
            &[("dead", "list")],
            &[record, b"10000"],
            vec![c(&["LPUSH", &k("dead"), "r0"])],
            vec![(1, Num::DeadMax)],
            fixed(1, 2, 2),
        ),
        bl(
            "defaults",
            "job_submit",
            &[
                ("meta", "hash"),
                ("pending", "list"),
                ("tickets", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
                ("events", "stream"),
                ("job:j1", "hash"),
            ],
            &[
                b"recoverable",
                b"1",
                b"j1",
                b"json",
                b"\"hi\"",
                b"c7",
                b"0",
                b"1",
                b"0",
                b"0",
                b"0",
                b"",
                b"",
            ],
            vec![
                meta("recoverable"),
                c(&["LPUSH", &k("pending"), "j0"]),
                c(&["LPUSH", &k("tickets"), "1"]),
                queued("j0"),
            ],
            vec![
                (1, Num::Protocol),
                (6, Num::MsOrZero),
                (7, Num::MaxAttempts),
                (8, Num::MsOrZero),
                (9, Num::MsOrZero),
                (10, Num::RunAt),
            ],
            Arity::PerJob {
                keys: 6,
                argv: 2,
                per: 11,
            },
        ),
        bl(
            "two jobs, lease, attempts, timeout, delay and backoff",
            "job_submit",
            &[
                ("meta", "hash"),
                ("pending", "list"),
                ("tickets", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
                ("events", "stream"),
                ("job:j1", "hash"),
                ("job:j2", "hash"),
            ],
            &[
                b"reliable",
                b"1",
                b"j1",
                b"json",
                b"1",
                b"c7",
                b"30000",
                b"3",
                b"1500",
                b"60000",
                b"0",
                b"exponential:1000:60000:500",
                b"",
                b"j2",
                b"msgpack",
                b"\xa1x",
                b"",
                b"0",
                b"1",
                b"0",
                b"0",
                b"0",
                b"",
                b"",
            ],
            vec![meta("reliable"), c(&["LPUSH", &k("pending"), "j0"])],
            vec![
                (1, Num::Protocol),
                (6, Num::MsOrZero),
                (7, Num::MaxAttempts),
                (8, Num::MsOrZero),
                (9, Num::MsOrZero),
                (17, Num::MsOrZero),
                (18, Num::MaxAttempts),
                (19, Num::MsOrZero),
                (20, Num::MsOrZero),
                (21, Num::RunAt),
            ],
            Arity::PerJob {
                keys: 6,
                argv: 2,
                per: 11,
            },
        ),
        bl(
            "claim one",
            "job_claim",
            claim_keys,
            &[b"1", b"30000", b"0", b"0"],
            vec![
                c(&["LPUSH", &k("pending"), "j2", "j1"]),
                queued("j1"),
                queued("j2"),
                c(&["LPUSH", &k("tickets"), "1", "1"]),
                c(&["SET", &k("fence"), "5"]),
                c(&["ZADD", &k("leases"), FUTURE, "j0"]),
                meta("recoverable"),
            ],
            claim_numbers.clone(),
            fixed(7, 4, 4),
        ),
        bl(
            "claim all after a ticket",
            "job_claim",
            claim_keys,
            &[b"5", b"30000", b"1", b"0"],
            vec![
                c(&["LPUSH", &k("pending"), "j2", "j1"]),
                queued("j1"),
                queued("j2"),
                c(&["LPUSH", &k("tickets"), "1"]),
                c(&["SET", &k("fence"), "5"]),
            ],
            claim_numbers.clone(),
            fixed(7, 4, 4),
        ),
        bl(
            "paused, held, a ticket taken: pushed back, the gate list deleted",
            "job_claim",
            claim_keys,
            &[b"2", b"30000", b"1", b"1"],
            vec![
                c(&["LPUSH", &k("pending"), "j2", "j1"]),
                queued("j1"),
                queued("j2"),
                c(&["LPUSH", &k("tickets"), "1"]),
                c(&["SET", &k("fence"), "5"]),
                controls(
                    "recoverable",
                    &["paused", "1", "rate", "5:60000", "concurrency", "3"],
                ),
                c(&["ZADD", &k("rate"), "1", "3"]),
                c(&["LPUSH", &k("gate"), "1"]),
            ],
            claim_numbers.clone(),
            fixed(7, 4, 4),
        ),
        bl(
            "concurrency limit reached (lease set full), a ticket taken",
            "job_claim",
            claim_keys,
            &[b"1", b"30000", b"1", b"0"],
            vec![
                c(&["LPUSH", &k("pending"), "j2", "j1"]),
                queued("j1"),
                queued("j2"),
                c(&["LPUSH", &k("tickets"), "1"]),
                c(&["ZADD", &k("leases"), FUTURE, "j0"]),
                controls("recoverable", &["concurrency", "1"]),
                c(&["LPUSH", &k("gate"), "1"]),
            ],
            claim_numbers.clone(),
            fixed(7, 4, 4),
        ),
        bl(
            "concurrency limit leaves one of two",
            "job_claim",
            claim_keys,
            &[b"2", b"30000", b"1", b"0"],
            vec![
                c(&["LPUSH", &k("pending"), "j2", "j1"]),
                queued("j1"),
                queued("j2"),
                c(&["LPUSH", &k("tickets"), "1"]),
                c(&["SET", &k("fence"), "5"]),
                c(&["ZADD", &k("leases"), FUTURE, "j0"]),
                controls("recoverable", &["concurrency", "2"]),
            ],
            claim_numbers.clone(),
            fixed(7, 4, 4),
        ),
        bl(
            "rate limit exhausted: an old start leaves the rate set, wait ms",
            "job_claim",
            claim_keys,
            &[b"1", b"30000", b"0", b"0"],
            vec![
                c(&["LPUSH", &k("pending"), "j1"]),
                queued("j1"),
                c(&["LPUSH", &k("tickets"), "1"]),
                controls("recoverable", &["rate", "2:60000"]),
                c(&["ZADD", &k("rate"), "1", "1", FUTURE, "3", FUTURE, "4"]),
                c(&["LPUSH", &k("gate"), "1"]),
            ],
            claim_numbers.clone(),
            fixed(7, 4, 4),
        ),
        bl(
            "rate and concurrency limits leave room, held: the next held worker woken",
            "job_claim",
            claim_keys,
            &[b"5", b"30000", b"0", b"1"],
            vec![
                c(&["LPUSH", &k("pending"), "j2", "j1"]),
                queued("j1"),
                queued("j2"),
                c(&["LPUSH", &k("tickets"), "1", "1"]),
                c(&["SET", &k("fence"), "5"]),
                c(&["ZADD", &k("leases"), FUTURE, "j0"]),
                controls("recoverable", &["rate", "10:60000", "concurrency", "4"]),
                c(&["ZADD", &k("rate"), "1", "1", FUTURE, "3"]),
            ],
            claim_numbers.clone(),
            fixed(7, 4, 4),
        ),
        bl(
            "run one, dead-letter one",
            "job_start",
            &[
                ("leases", "zset"),
                ("dead_jobs", "zset"),
                ("events", "stream"),
                ("job:j1", "hash"),
                ("job:j2", "hash"),
            ],
            &[
                b"30000",
                b"3",
                b"w1",
                b"86400000",
                b"10000",
                b"publish",
                b"0",
                b"j1",
                b"3",
                b"j2",
                b"4",
            ],
            vec![
                queued("j1"),
                c(&["HSET", &k("job:j1"), "timeout_ms", "1500"]),
                active("j2", "2"),
                c(&["HSET", &k("job:j2"), "stalls", "3"]),
                c(&["ZADD", &k("leases"), FUTURE, "j1", FUTURE, "j2"]),
                c(&["ZADD", &k("dead_jobs"), "1", "old"]),
            ],
            vec![
                (0, Num::Ms),
                (1, Num::MaxStalls),
                (3, Num::Ms),
                (4, Num::DeadMax),
                (6, Num::Flag),
                (8, Num::Token),
                (10, Num::Token),
            ],
            Arity::PerJob {
                keys: 3,
                argv: 7,
                per: 2,
            },
        ),
        bl(
            "limited: the job runs with a slot",
            "job_start",
            &[
                ("leases", "zset"),
                ("dead_jobs", "zset"),
                ("events", "stream"),
                ("job:j1", "hash"),
            ],
            &[
                b"30000",
                b"3",
                b"w1",
                b"86400000",
                b"10000",
                b"publish",
                b"1",
                b"j1",
                b"3",
            ],
            vec![queued("j1"), c(&["ZADD", &k("leases"), FUTURE, "j1"])],
            vec![
                (0, Num::Ms),
                (1, Num::MaxStalls),
                (3, Num::Ms),
                (4, Num::DeadMax),
                (6, Num::Flag),
                (8, Num::Token),
            ],
            Arity::PerJob {
                keys: 3,
                argv: 7,
                per: 2,
            },
        ),
        bl(
            "complete",
            "job_finish",
            &[
                ("job:j1", "hash"),
                ("leases", "zset"),
                ("pending", "list"),
                ("tickets", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
                ("running", "zset"),
                ("gate", "list"),
                ("events", "stream"),
            ],
            &[
                b"j1",
                b"7",
                b"completed",
                b"\"r\"",
                b"",
                b"0",
                b"86400000",
                b"recoverable",
                b"publish",
                b"-1",
            ],
            vec![
                active("j1", "7"),
                c(&["ZADD", &k("leases"), FUTURE, "j1"]),
                c(&["LPUSH", &k("pending"), "j0"]),
            ],
            vec![
                (1, Num::Token),
                (5, Num::Flag),
                (6, Num::Ms),
                (9, Num::RetryDelay),
            ],
            fixed(9, 10, 10),
        ),
        bl(
            "fail and retry (reliable)",
            "job_finish",
            &[
                ("job:j1", "hash"),
                ("inflight:w1", "list"),
                ("pending", "list"),
                ("tickets", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
                ("running", "zset"),
                ("gate", "list"),
                ("events", "stream"),
            ],
            &[
                b"j1",
                b"7",
                b"failed",
                b"handler",
                b"boom",
                b"1",
                b"86400000",
                b"reliable",
                b"publish",
                b"-1",
            ],
            vec![
                active("j1", "7"),
                c(&["LPUSH", &k("inflight:w1"), "j1"]),
                c(&["LPUSH", &k("pending"), "j0"]),
            ],
            vec![
                (1, Num::Token),
                (5, Num::Flag),
                (6, Num::Ms),
                (9, Num::RetryDelay),
            ],
            fixed(9, 10, 10),
        ),
        bl(
            "complete a job with a slot: the gate list pushed",
            "job_finish",
            &[
                ("job:j1", "hash"),
                ("leases", "zset"),
                ("pending", "list"),
                ("tickets", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
                ("running", "zset"),
                ("gate", "list"),
                ("events", "stream"),
            ],
            &[
                b"j1",
                b"7",
                b"completed",
                b"\"r\"",
                b"",
                b"0",
                b"86400000",
                b"recoverable",
                b"publish",
                b"-1",
            ],
            vec![
                active("j1", "7"),
                slotted("j1"),
                c(&["ZADD", &k("leases"), FUTURE, "j1"]),
            ],
            vec![
                (1, Num::Token),
                (5, Num::Flag),
                (6, Num::Ms),
                (9, Num::RetryDelay),
            ],
            fixed(9, 10, 10),
        ),
        bl(
            "fail and retry a job with a slot (reliable): it leaves the running set",
            "job_finish",
            &[
                ("job:j1", "hash"),
                ("inflight:w1", "list"),
                ("pending", "list"),
                ("tickets", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
                ("running", "zset"),
                ("gate", "list"),
                ("events", "stream"),
            ],
            &[
                b"j1",
                b"7",
                b"failed",
                b"handler",
                b"boom",
                b"1",
                b"86400000",
                b"reliable",
                b"publish",
                b"2500",
            ],
            vec![
                active("j1", "7"),
                slotted("j1"),
                c(&["LPUSH", &k("inflight:w1"), "j1"]),
                c(&["ZADD", &k("running"), "1", "j1", "1", "j0"]),
            ],
            vec![
                (1, Num::Token),
                (5, Num::Flag),
                (6, Num::Ms),
                (9, Num::RetryDelay),
            ],
            fixed(9, 10, 10),
        ),
        bl(
            "renew",
            "job_extend",
            &[("leases", "zset"), ("job:j1", "hash")],
            &[b"30000", b"j1", b"7"],
            vec![active("j1", "7"), c(&["ZADD", &k("leases"), "1", "j1"])],
            vec![(0, Num::Ms), (2, Num::Token)],
            Arity::PerJob {
                keys: 1,
                argv: 1,
                per: 2,
            },
        ),
        bl(
            "sweep",
            "job_requeue_stale",
            &[
                ("leases", "zset"),
                ("pending", "list"),
                ("tickets", "list"),
                ("sweep", "string"),
                ("gate", "list"),
            ],
            &[b"15000", b"1000"],
            vec![
                c(&["ZADD", &k("leases"), "1", "j1", FUTURE, "j2"]),
                c(&["LPUSH", &k("pending"), "j0"]),
            ],
            vec![(0, Num::Ms), (1, Num::Count)],
            fixed(5, 2, 2),
        ),
        bl(
            "watch",
            "job_watch",
            &[("job:j1", "hash")],
            &[b"c7"],
            vec![queued("j1")],
            vec![],
            fixed(1, 1, 1),
        ),
        bl(
            "release",
            "job_release",
            &[
                ("job:j1", "hash"),
                ("leases", "zset"),
                ("pending", "list"),
                ("tickets", "list"),
                ("running", "zset"),
                ("gate", "list"),
            ],
            &[b"j1", b"7", b"recoverable"],
            vec![
                active("j1", "7"),
                c(&["ZADD", &k("leases"), FUTURE, "j1"]),
                c(&["LPUSH", &k("pending"), "j0"]),
            ],
            vec![(1, Num::Token)],
            fixed(6, 3, 3),
        ),
        bl(
            "release a job with a slot (reliable): it leaves the running set",
            "job_release",
            &[
                ("job:j1", "hash"),
                ("inflight:w1", "list"),
                ("pending", "list"),
                ("tickets", "list"),
                ("running", "zset"),
                ("gate", "list"),
            ],
            &[b"j1", b"7", b"reliable"],
            vec![
                active("j1", "7"),
                slotted("j1"),
                c(&["LPUSH", &k("inflight:w1"), "j1"]),
                c(&["LPUSH", &k("pending"), "j0"]),
                c(&["ZADD", &k("running"), "1", "j1", "1", "j0"]),
            ],
            vec![(1, Num::Token)],
            fixed(6, 3, 3),
        ),
        bl(
            "release a job with a slot (recoverable): the gate list pushed",
            "job_release",
            &[
                ("job:j1", "hash"),
                ("leases", "zset"),
                ("pending", "list"),
                ("tickets", "list"),
                ("running", "zset"),
                ("gate", "list"),
            ],
            &[b"j1", b"7", b"recoverable"],
            vec![
                active("j1", "7"),
                slotted("j1"),
                c(&["ZADD", &k("leases"), FUTURE, "j1"]),
            ],
            vec![(1, Num::Token)],
            fixed(6, 3, 3),
        ),
        bl(
            "from pending",
            "reliable_start",
            &[start_keys, &[("job:j1", "hash")][..]].concat(),
            &[
                b"3",
                b"w1",
                b"86400000",
                b"10000",
                b"publish",
                b"pending",
                b"0",
                b"j1",
            ],
            vec![
                c(&["LPUSH", &k("pending"), "j1"]),
                queued("j1"),
                c(&["HSET", &k("job:j1"), "timeout_ms", "1500"]),
                c(&["SET", &k("fence"), "2"]),
                meta("reliable"),
            ],
            start_numbers.clone(),
            start_arity,
        ),
        bl(
            "from inflight, dead-letter",
            "reliable_start",
            &[start_keys, &[("job:j2", "hash")][..]].concat(),
            &[
                b"3",
                b"w1",
                b"86400000",
                b"10000",
                b"publish",
                b"inflight",
                b"0",
                b"j2",
            ],
            vec![
                c(&["LPUSH", &k("inflight:w1"), "j2"]),
                active("j2", "1"),
                c(&["HSET", &k("job:j2"), "stalls", "3"]),
                c(&["LPUSH", &k("pending"), "j0"]),
            ],
            start_numbers.clone(),
            start_arity,
        ),
        bl(
            "from inflight, paused, held: the IDs back on pending, the gate list deleted",
            "reliable_start",
            &[start_keys, &[("job:j1", "hash"), ("job:j2", "hash")][..]].concat(),
            &[
                b"3",
                b"w1",
                b"86400000",
                b"10000",
                b"publish",
                b"inflight",
                b"1",
                b"j1",
                b"j2",
            ],
            vec![
                c(&["LPUSH", &k("inflight:w1"), "j1", "j2"]),
                queued("j1"),
                queued("j2"),
                c(&["LPUSH", &k("pending"), "j0"]),
                c(&["SET", &k("fence"), "2"]),
                controls("reliable", &["paused", "1", "concurrency", "5"]),
                c(&["LPUSH", &k("gate"), "1"]),
            ],
            start_numbers.clone(),
            start_arity,
        ),
        bl(
            "from pending, paused, held: IDs untouched, the gate list deleted",
            "reliable_start",
            &[start_keys, &[("job:j1", "hash"), ("job:j2", "hash")][..]].concat(),
            &[
                b"3",
                b"w1",
                b"86400000",
                b"10000",
                b"publish",
                b"pending",
                b"1",
                b"j1",
                b"j2",
            ],
            vec![
                c(&["LPUSH", &k("pending"), "j1", "j2"]),
                queued("j1"),
                queued("j2"),
                c(&["SET", &k("fence"), "2"]),
                controls("reliable", &["paused", "1", "concurrency", "5"]),
                c(&["LPUSH", &k("gate"), "1"]),
            ],
            start_numbers.clone(),
            start_arity,
        ),
        bl(
            "from pending, a concurrency limit leaves one of two: the other stays",
            "reliable_start",
            &[start_keys, &[("job:j1", "hash"), ("job:j2", "hash")][..]].concat(),
            &[
                b"3",
                b"w1",
                b"86400000",
                b"10000",
                b"publish",
                b"pending",
                b"0",
                b"j1",
                b"j2",
            ],
            vec![
                c(&["LPUSH", &k("pending"), "j1", "j2"]),
                queued("j1"),
                queued("j2"),
                controls("reliable", &["concurrency", "2"]),
                c(&["ZADD", &k("running"), "1", "j0"]),
            ],
            start_numbers.clone(),
            start_arity,
        ),
        bl(
            "from inflight, a concurrency limit leaves one of two: the other back on pending",
            "reliable_start",
            &[start_keys, &[("job:j1", "hash"), ("job:j2", "hash")][..]].concat(),
            &[
                b"3",
                b"w1",
                b"86400000",
                b"10000",
                b"publish",
                b"inflight",
                b"0",
                b"j1",
                b"j2",
            ],
            vec![
                c(&["LPUSH", &k("inflight:w1"), "j1", "j2"]),
                queued("j1"),
                queued("j2"),
                c(&["LPUSH", &k("pending"), "j0"]),
                controls("reliable", &["concurrency", "2"]),
                c(&["ZADD", &k("running"), "1", "j0"]),
                c(&["LPUSH", &k("gate"), "1"]),
            ],
            start_numbers.clone(),
            start_arity,
        ),
        bl(
            "from pending, rate and concurrency limits leave room, held: the next held worker woken",
            "reliable_start",
            &[start_keys, &[("job:j1", "hash")][..]].concat(),
            &[
                b"3",
                b"w1",
                b"86400000",
                b"10000",
                b"publish",
                b"pending",
                b"1",
                b"j1",
            ],
            vec![
                c(&["LPUSH", &k("pending"), "j1"]),
                queued("j1"),
                controls("reliable", &["rate", "10:60000", "concurrency", "5"]),
                c(&["ZADD", &k("rate"), "1", "1", FUTURE, "3"]),
                c(&["ZADD", &k("running"), "1", "j0"]),
            ],
            start_numbers.clone(),
            start_arity,
        ),
        bl(
            "from inflight, rate limit exhausted: back on pending, wait ms",
            "reliable_start",
            &[start_keys, &[("job:j1", "hash")][..]].concat(),
            &[
                b"3",
                b"w1",
                b"86400000",
                b"10000",
                b"publish",
                b"inflight",
                b"0",
                b"j1",
            ],
            vec![
                c(&["LPUSH", &k("inflight:w1"), "j1"]),
                queued("j1"),
                controls("reliable", &["rate", "1:60000"]),
                c(&["ZADD", &k("rate"), "1", "1", FUTURE, "3"]),
                c(&["LPUSH", &k("gate"), "1"]),
            ],
            start_numbers.clone(),
            start_arity,
        ),
        bl(
            "beat",
            "reliable_heartbeat",
            &[("workers", "zset")],
            &[b"w1", b"30000"],
            vec![c(&["ZADD", &k("workers"), FUTURE, "w1"])],
            vec![(1, Num::Ms)],
            fixed(1, 2, 2),
        ),
        bl(
            "find",
            "reliable_find_dead",
            &[("workers", "zset"), ("sweep", "string")],
            &[b"15000", b"100"],
            vec![c(&["ZADD", &k("workers"), "1", "w2", FUTURE, "w1"])],
            vec![(0, Num::Ms), (1, Num::Count)],
            fixed(2, 2, 2),
        ),
        bl(
            "requeue a dead worker",
            "reliable_requeue_worker",
            &[
                ("workers", "zset"),
                ("inflight:w2", "list"),
                ("pending", "list"),
                ("running", "zset"),
                ("gate", "list"),
            ],
            &[b"w2", b"1", b"300000"],
            vec![
                c(&["ZADD", &k("workers"), "1", "w2"]),
                c(&["LPUSH", &k("inflight:w2"), "j2"]),
                c(&["LPUSH", &k("pending"), "j0"]),
            ],
            vec![(1, Num::Flag), (2, Num::Ms)],
            fixed(5, 3, 3),
        ),
        bl(
            "requeue a dead worker whose job held a slot: it leaves the running set",
            "reliable_requeue_worker",
            &[
                ("workers", "zset"),
                ("inflight:w2", "list"),
                ("pending", "list"),
                ("running", "zset"),
                ("gate", "list"),
            ],
            &[b"w2", b"1", b"300000"],
            vec![
                c(&["ZADD", &k("workers"), "1", "w2"]),
                c(&["LPUSH", &k("inflight:w2"), "j2", "j3"]),
                c(&["LPUSH", &k("pending"), "j0"]),
                c(&["ZADD", &k("running"), "1", "j2", "1", "j0"]),
            ],
            vec![(1, Num::Flag), (2, Num::Ms)],
            fixed(5, 3, 3),
        ),
        bl(
            "complete one, retry one",
            "job_finish_batch",
            &[
                ("leases", "zset"),
                ("pending", "list"),
                ("tickets", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
                ("running", "zset"),
                ("gate", "list"),
                ("events", "stream"),
                ("job:j1", "hash"),
                ("job:j2", "hash"),
            ],
            &[
                b"86400000",
                b"recoverable",
                b"publish",
                b"j1",
                b"7",
                b"completed",
                b"\"r\"",
                b"",
                b"0",
                b"-1",
                b"j2",
                b"8",
                b"failed",
                b"handler",
                b"boom",
                b"1",
                b"2500",
            ],
            vec![
                active("j1", "7"),
                active("j2", "8"),
                c(&["ZADD", &k("leases"), FUTURE, "j1", FUTURE, "j2"]),
            ],
            batch_numbers.clone(),
            batch_arity,
        ),
        bl(
            "complete one, retry one, both with a slot (reliable): they leave the running set",
            "job_finish_batch",
            &[
                ("inflight:w1", "list"),
                ("pending", "list"),
                ("tickets", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
                ("running", "zset"),
                ("gate", "list"),
                ("events", "stream"),
                ("job:j1", "hash"),
                ("job:j2", "hash"),
            ],
            &[
                b"86400000",
                b"reliable",
                b"publish",
                b"j1",
                b"7",
                b"completed",
                b"\"r\"",
                b"",
                b"0",
                b"-1",
                b"j2",
                b"8",
                b"failed",
                b"handler",
                b"boom",
                b"1",
                b"-1",
            ],
            vec![
                active("j1", "7"),
                active("j2", "8"),
                slotted("j1"),
                slotted("j2"),
                c(&["LPUSH", &k("inflight:w1"), "j1", "j2"]),
                c(&["ZADD", &k("running"), "1", "j1", "1", "j2", "1", "j0"]),
            ],
            batch_numbers.clone(),
            batch_arity,
        ),
        bl(
            "promote",
            "job_promote",
            &[
                ("meta", "hash"),
                ("delayed", "zset"),
                ("pending", "list"),
                ("tickets", "list"),
                ("timekeeper", "string"),
                ("clock", "list"),
                ("schedules", "zset"),
            ],
            &[b"recoverable", b"1", b"w1", b"1000", b"30000"],
            vec![
                meta("recoverable"),
                c(&["ZADD", &k("delayed"), "1", "j1", FUTURE, "j2"]),
                c(&["LPUSH", &k("pending"), "j0"]),
                c(&["SET", &k("timekeeper"), "w1", "PX", "60000"]),
            ],
            vec![
                (1, Num::Protocol),
                (3, Num::PromoteLimit),
                (4, Num::MsOrZero),
            ],
            fixed(7, 5, 5),
        ),
        bl(
            "set a cron schedule",
            "schedule_set",
            &[
                ("meta", "hash"),
                ("schedules", "zset"),
                ("schedule:s1", "hash"),
                ("clock", "list"),
            ],
            &[
                b"reliable",
                b"1",
                b"s1",
                b"cron:*/5 * * * *",
                b"Europe/Paris",
                b"skip",
                b"60000",
                b"9999999999999",
                b"json",
                b"1",
                b"0",
                b"3",
                b"0",
                b"fixed:1000:1000:0",
            ],
            vec![meta("reliable")],
            vec![
                (1, Num::Protocol),
                (6, Num::Ms),
                (10, Num::MsOrZero),
                (11, Num::MaxAttempts),
                (12, Num::MsOrZero),
            ],
            fixed(4, 14, 14),
        ),
        bl(
            "fire a due schedule",
            "schedule_fire",
            &[
                ("meta", "hash"),
                ("schedules", "zset"),
                ("schedule:s1", "hash"),
                ("pending", "list"),
                ("tickets", "list"),
                ("job:s1@1000", "hash"),
                ("events", "stream"),
            ],
            &[b"recoverable", b"1", b"s1", b"1000", b"2000", b"9000"],
            vec![
                meta("recoverable"),
                c(&["ZADD", &k("schedules"), "1000", "s1"]),
                c(&[
                    "HSET",
                    &k("schedule:s1"),
                    "spec",
                    "every:1000",
                    "next_ms",
                    "1000",
                    "enc",
                    "json",
                    "payload",
                    "1",
                ]),
            ],
            vec![(1, Num::Protocol)],
            fixed(7, 6, 6),
        ),
        bl(
            "remove a schedule",
            "schedule_remove",
            &[("schedules", "zset"), ("schedule:s1", "hash")],
            &[b"s1"],
            vec![
                c(&["ZADD", &k("schedules"), "1000", "s1"]),
                c(&["HSET", &k("schedule:s1"), "spec", "every:1000"]),
            ],
            vec![],
            fixed(2, 1, 1),
        ),
        bl(
            "pause",
            "queue_control",
            &[("meta", "hash"), ("gate", "list")],
            &[b"recoverable", b"1", b"paused", b"1"],
            vec![meta("recoverable")],
            vec![(1, Num::Protocol), (3, Num::Paused)],
            Arity::Pairs { keys: 2, argv: 2 },
        ),
        bl(
            "set a rate and a concurrency limit on a paused queue: the gate list pushed",
            "queue_control",
            &[("meta", "hash"), ("gate", "list")],
            &[b"reliable", b"1", b"rate", b"5:1000", b"concurrency", b"3"],
            vec![controls("reliable", &["paused", "1", "concurrency", "2"])],
            vec![(1, Num::Protocol), (3, Num::Rate), (5, Num::Concurrency)],
            Arity::Pairs { keys: 2, argv: 2 },
        ),
        bl(
            "clear every control",
            "queue_control",
            &[("meta", "hash"), ("gate", "list")],
            &[
                b"recoverable",
                b"1",
                b"concurrency",
                b"",
                b"paused",
                b"",
                b"rate",
                b"",
            ],
            vec![controls(
                "recoverable",
                &["paused", "1", "rate", "5:1000", "concurrency", "2"],
            )],
            vec![
                (1, Num::Protocol),
                (3, Num::Concurrency),
                (5, Num::Paused),
                (7, Num::Rate),
            ],
            Arity::Pairs { keys: 2, argv: 2 },
        ),
        bl(
            "resume while the gate list holds a wake-up",
            "queue_control",
            &[("meta", "hash"), ("gate", "list")],
            &[b"reliable", b"1", b"paused", b""],
            vec![
                controls("reliable", &["paused", "1"]),
                c(&["LPUSH", &k("gate"), "1"]),
            ],
            vec![(1, Num::Protocol), (3, Num::Paused)],
            Arity::Pairs { keys: 2, argv: 2 },
        ),
        bl(
            "record events",
            "queue_control",
            &[("meta", "hash"), ("gate", "list")],
            &[b"recoverable", b"1", b"events", b"1000"],
            vec![meta("recoverable")],
            vec![(1, Num::Protocol), (3, Num::Events)],
            Arity::Pairs { keys: 2, argv: 2 },
        ),
        bl(
            "stop recording events, pause",
            "queue_control",
            &[("meta", "hash"), ("gate", "list")],
            &[b"reliable", b"1", b"events", b"", b"paused", b"1"],
            vec![controls("reliable", &["events", "50", "concurrency", "2"])],
            vec![(1, Num::Protocol), (3, Num::Events), (5, Num::Paused)],
            Arity::Pairs { keys: 2, argv: 2 },
        ),
        bl(
            "unique keys: one job refused (its key held by a queued job), one takes a throttle lock, one a stale lock",
            "job_submit",
            &[
                ("meta", "hash"),
                ("pending", "list"),
                ("tickets", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
                ("events", "stream"),
                ("job:j1", "hash"),
                ("job:j2", "hash"),
                ("job:j3", "hash"),
                ("unique:k1", "string"),
                ("unique:k2", "string"),
                ("unique:k3", "string"),
            ],
            &[
                b"recoverable",
                b"1",
                b"j1",
                b"json",
                b"1",
                b"c7",
                b"0",
                b"1",
                b"0",
                b"0",
                b"0",
                b"",
                b"active:0:k1",
                b"j2",
                b"json",
                b"2",
                b"",
                b"0",
                b"1",
                b"0",
                b"60000",
                b"0",
                b"",
                b"throttle:60000:k2",
                b"j3",
                b"json",
                b"3",
                b"",
                b"0",
                b"2",
                b"0",
                b"0",
                b"0",
                b"",
                b"active:600000:k3",
            ],
            vec![
                meta("recoverable"),
                queued("j0"),
                c(&["HSET", &k("job:j0"), "unique", "k1"]),
                c(&["SET", &k("unique:k1"), "j0"]),
                c(&["SET", &k("unique:k3"), "gone"]),
                c(&["LPUSH", &k("pending"), "j0"]),
                c(&["LPUSH", &k("tickets"), "1"]),
            ],
            vec![
                (1, Num::Protocol),
                (6, Num::MsOrZero),
                (7, Num::MaxAttempts),
                (8, Num::MsOrZero),
                (9, Num::MsOrZero),
                (10, Num::RunAt),
                (17, Num::MsOrZero),
                (18, Num::MaxAttempts),
                (19, Num::MsOrZero),
                (20, Num::MsOrZero),
                (21, Num::RunAt),
                (28, Num::MsOrZero),
                (29, Num::MaxAttempts),
            ],
            Arity::Unique {
                keys: 6,
                argv: 2,
                per: 11,
                locks: 3,
            },
        ),
        bl(
            "events on: a job submitted and one delayed, each appended to the stream",
            "job_submit",
            &[
                ("meta", "hash"),
                ("pending", "list"),
                ("tickets", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
                ("events", "stream"),
                ("job:j1", "hash"),
                ("job:j2", "hash"),
                ("unique:k2", "string"),
            ],
            &[
                b"reliable",
                b"1",
                b"j1",
                b"json",
                b"1",
                b"c7",
                b"0",
                b"1",
                b"0",
                b"0",
                b"0",
                b"",
                b"",
                b"j2",
                b"json",
                b"2",
                b"",
                b"0",
                b"1",
                b"0",
                b"60000",
                b"0",
                b"",
                b"active:0:k2",
            ],
            vec![
                controls("reliable", &["events", "100"]),
                c(&["XADD", &k("events"), "*", "event", "submitted", "id", "j0"]),
                c(&["ZADD", &k("delayed"), FUTURE, "j9"]),
            ],
            vec![
                (1, Num::Protocol),
                (6, Num::MsOrZero),
                (7, Num::MaxAttempts),
                (8, Num::MsOrZero),
                (9, Num::MsOrZero),
                (10, Num::RunAt),
                (17, Num::MsOrZero),
                (18, Num::MaxAttempts),
                (19, Num::MsOrZero),
                (20, Num::MsOrZero),
                (21, Num::RunAt),
            ],
            Arity::Unique {
                keys: 6,
                argv: 2,
                per: 11,
                locks: 1,
            },
        ),
        bl(
            "events on: run one (started), one dies (dead, its unique lock released)",
            "job_start",
            &[
                ("leases", "zset"),
                ("dead_jobs", "zset"),
                ("events", "stream"),
                ("job:j1", "hash"),
                ("job:j2", "hash"),
            ],
            &[
                b"30000",
                b"3",
                b"w1",
                b"86400000",
                b"10000",
                b"publish",
                b"0",
                b"j1",
                b"3",
                b"j2",
                b"4",
            ],
            vec![
                queued("j1"),
                c(&["HSET", &k("job:j1"), "events", "100"]),
                active("j2", "2"),
                c(&[
                    "HSET",
                    &k("job:j2"),
                    "stalls",
                    "3",
                    "events",
                    "100",
                    "unique",
                    "k2",
                ]),
                c(&["SET", &k("unique:k2"), "j2"]),
                c(&["ZADD", &k("leases"), FUTURE, "j1", FUTURE, "j2"]),
                c(&["XADD", &k("events"), "*", "event", "submitted", "id", "j1"]),
            ],
            vec![
                (0, Num::Ms),
                (1, Num::MaxStalls),
                (3, Num::Ms),
                (4, Num::DeadMax),
                (6, Num::Flag),
                (8, Num::Token),
                (10, Num::Token),
            ],
            Arity::PerJob {
                keys: 3,
                argv: 7,
                per: 2,
            },
        ),
        bl(
            "events on: complete a unique job (completed, the lock released)",
            "job_finish",
            &[
                ("job:j1", "hash"),
                ("leases", "zset"),
                ("pending", "list"),
                ("tickets", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
                ("running", "zset"),
                ("gate", "list"),
                ("events", "stream"),
            ],
            &[
                b"j1",
                b"7",
                b"completed",
                b"\"r\"",
                b"",
                b"0",
                b"86400000",
                b"recoverable",
                b"publish",
                b"-1",
            ],
            vec![
                active("j1", "7"),
                c(&[
                    "HSET",
                    &k("job:j1"),
                    "events",
                    "100",
                    "unique",
                    "k1",
                    "worker",
                    "w1",
                ]),
                c(&["SET", &k("unique:k1"), "j1"]),
                c(&["ZADD", &k("leases"), FUTURE, "j1"]),
                c(&["XADD", &k("events"), "*", "event", "started", "id", "j1"]),
            ],
            vec![
                (1, Num::Token),
                (5, Num::Flag),
                (6, Num::Ms),
                (9, Num::RetryDelay),
            ],
            fixed(9, 10, 10),
        ),
        bl(
            "events on: a delayed retry of a unique job (retried, the lock kept)",
            "job_finish",
            &[
                ("job:j1", "hash"),
                ("inflight:w1", "list"),
                ("pending", "list"),
                ("tickets", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
                ("running", "zset"),
                ("gate", "list"),
                ("events", "stream"),
            ],
            &[
                b"j1",
                b"7",
                b"failed",
                b"handler",
                b"boom",
                b"1",
                b"86400000",
                b"reliable",
                b"publish",
                b"2500",
            ],
            vec![
                active("j1", "7"),
                c(&[
                    "HSET",
                    &k("job:j1"),
                    "events",
                    "100",
                    "unique",
                    "k1",
                    "worker",
                    "w1",
                ]),
                c(&["SET", &k("unique:k1"), "j1"]),
                c(&["LPUSH", &k("inflight:w1"), "j1"]),
            ],
            vec![
                (1, Num::Token),
                (5, Num::Flag),
                (6, Num::Ms),
                (9, Num::RetryDelay),
            ],
            fixed(9, 10, 10),
        ),
        bl(
            "events on: complete one (lock released), fail one for good",
            "job_finish_batch",
            &[
                ("leases", "zset"),
                ("pending", "list"),
                ("tickets", "list"),
                ("delayed", "zset"),
                ("clock", "list"),
                ("running", "zset"),
                ("gate", "list"),
                ("events", "stream"),
                ("job:j1", "hash"),
                ("job:j2", "hash"),
            ],
            &[
                b"86400000",
                b"recoverable",
                b"publish",
                b"j1",
                b"7",
                b"completed",
                b"\"r\"",
                b"",
                b"0",
                b"-1",
                b"j2",
                b"8",
                b"failed",
                b"handler",
                b"boom",
                b"0",
                b"-1",
            ],
            vec![
                active("j1", "7"),
                active("j2", "8"),
                c(&["HSET", &k("job:j1"), "events", "100", "unique", "k1"]),
                c(&["HSET", &k("job:j2"), "events", "100"]),
                c(&["SET", &k("unique:k1"), "j1"]),
                c(&["ZADD", &k("leases"), FUTURE, "j1", FUTURE, "j2"]),
            ],
            batch_numbers.clone(),
            batch_arity,
        ),
        bl(
            "events on, from pending (started)",
            "reliable_start",
            &[start_keys, &[("job:j1", "hash")][..]].concat(),
            &[
                b"3",
                b"w1",
                b"86400000",
                b"10000",
                b"publish",
                b"pending",
                b"0",
                b"j1",
            ],
            vec![
                c(&["LPUSH", &k("pending"), "j1"]),
                queued("j1"),
                c(&["HSET", &k("job:j1"), "events", "100"]),
                c(&["SET", &k("fence"), "2"]),
                meta("reliable"),
                c(&["XADD", &k("events"), "*", "event", "submitted", "id", "j1"]),
            ],
            start_numbers.clone(),
            start_arity,
        ),
        bl(
            "events on, from inflight: a unique job dies (dead, its lock released)",
            "reliable_start",
            &[start_keys, &[("job:j2", "hash")][..]].concat(),
            &[
                b"3",
                b"w1",
                b"86400000",
                b"10000",
                b"publish",
                b"inflight",
                b"0",
                b"j2",
            ],
            vec![
                c(&["LPUSH", &k("inflight:w1"), "j2"]),
                active("j2", "1"),
                c(&[
                    "HSET",
                    &k("job:j2"),
                    "stalls",
                    "3",
                    "events",
                    "100",
                    "unique",
                    "k2",
                ]),
                c(&["SET", &k("unique:k2"), "j2"]),
            ],
            start_numbers.clone(),
            start_arity,
        ),
        bl(
            "events on: fire a due schedule (the job records events)",
            "schedule_fire",
            &[
                ("meta", "hash"),
                ("schedules", "zset"),
                ("schedule:s1", "hash"),
                ("pending", "list"),
                ("tickets", "list"),
                ("job:s1@1000", "hash"),
                ("events", "stream"),
            ],
            &[b"recoverable", b"1", b"s1", b"1000", b"2000", b"9000"],
            vec![
                controls("recoverable", &["events", "100"]),
                c(&["ZADD", &k("schedules"), "1000", "s1"]),
                c(&[
                    "HSET",
                    &k("schedule:s1"),
                    "spec",
                    "every:1000",
                    "next_ms",
                    "1000",
                    "enc",
                    "json",
                    "payload",
                    "1",
                ]),
                c(&["XADD", &k("events"), "*", "event", "submitted", "id", "j0"]),
            ],
            vec![(1, Num::Protocol)],
            fixed(7, 6, 6),
        ),
        bl(
            "cancel a delayed unique job, a running job with a slot (events on), a finished and a missing job",
            "job_cancel",
            &[
                ("delayed", "zset"),
                ("leases", "zset"),
                ("running", "zset"),
                ("gate", "list"),
                ("events", "stream"),
                ("job:j1", "hash"),
                ("job:j2", "hash"),
                ("job:j3", "hash"),
                ("job:j4", "hash"),
            ],
            &[
                b"recoverable",
                b"86400000",
                b"publish",
                b"",
                b"j1",
                b"j2",
                b"j3",
                b"j4",
            ],
            vec![
                queued("j1"),
                c(&[
                    "HSET",
                    &k("job:j1"),
                    "due_ms",
                    FUTURE,
                    "unique",
                    "k1",
                    "events",
                    "100",
                ]),
                c(&["SET", &k("unique:k1"), "j1"]),
                c(&["ZADD", &k("delayed"), FUTURE, "j1", FUTURE, "j9"]),
                active("j2", "7"),
                slotted("j2"),
                c(&["HSET", &k("job:j2"), "worker", "w1", "events", "100"]),
                c(&["ZADD", &k("leases"), FUTURE, "j2", FUTURE, "j8"]),
                c(&["HSET", &k("job:j3"), "state", "completed"]),
                c(&["XADD", &k("events"), "*", "event", "submitted", "id", "j1"]),
            ],
            vec![(1, Num::Ms)],
            Arity::PerJob {
                keys: 5,
                argv: 4,
                per: 1,
            },
        ),
        bl(
            "cancel a running job with a slot (reliable): it leaves the running set",
            "job_cancel",
            &[
                ("delayed", "zset"),
                ("leases", "zset"),
                ("running", "zset"),
                ("gate", "list"),
                ("events", "stream"),
                ("job:j1", "hash"),
            ],
            &[b"reliable", b"60000", b"spublish", b"stopped", b"j1"],
            vec![
                active("j1", "7"),
                slotted("j1"),
                c(&["HSET", &k("job:j1"), "worker", "w1"]),
                c(&["LPUSH", &k("inflight:w1"), "j1"]),
                c(&["ZADD", &k("running"), "1", "j1", "1", "j0"]),
                c(&["LPUSH", &k("gate"), "1"]),
            ],
            vec![(1, Num::Ms)],
            Arity::PerJob {
                keys: 5,
                argv: 4,
                per: 1,
            },
        ),
        bl(
            "progress",
            "job_progress",
            &[("job:j1", "hash"), ("events", "stream")],
            &[b"j1", b"7", b"50%", b"publish"],
            vec![active("j1", "7")],
            vec![(1, Num::Token)],
            fixed(2, 4, 4),
        ),
        bl(
            "progress, events on",
            "job_progress",
            &[("job:j1", "hash"), ("events", "stream")],
            &[b"j1", b"7", b"\xff\x00", b"spublish"],
            vec![
                active("j1", "7"),
                c(&[
                    "HSET",
                    &k("job:j1"),
                    "events",
                    "100",
                    "worker",
                    "w1",
                    "progress",
                    "1",
                ]),
                c(&["XADD", &k("events"), "*", "event", "started", "id", "j1"]),
            ],
            vec![(1, Num::Token)],
            fixed(2, 4, 4),
        ),
        bl(
            "requeue a dead, a failed, a queued and a missing job",
            "job_requeue",
            &[
                ("meta", "hash"),
                ("dead_jobs", "zset"),
                ("pending", "list"),
                ("tickets", "list"),
                ("job:j1", "hash"),
                ("job:j2", "hash"),
                ("job:j3", "hash"),
                ("job:j4", "hash"),
            ],
            &[b"recoverable", b"1", b"j1", b"j2", b"j3", b"j4"],
            vec![
                meta("recoverable"),
                c(&["HSET", &k("job:j1"), "state", "dead", "stalls", "4"]),
                c(&["PEXPIRE", &k("job:j1"), "86400000"]),
                c(&["HSET", &k("job:j2"), "state", "failed", "attempt", "3"]),
                queued("j3"),
                c(&["ZADD", &k("dead_jobs"), "1", "j1", "2", "j4"]),
            ],
            vec![(1, Num::Protocol)],
            Arity::PerJob {
                keys: 4,
                argv: 2,
                per: 1,
            },
        ),
    ]
}

/// One mutated call: the call, what to write before it, and whether (and
/// how) it must be refused.
struct Mutation {
    what: String,
    call: RawCall,
    /// Keys written with another type after the baseline's setup.
    retype: Vec<(Vec<u8>, &'static str)>,
    /// `Some(code)`: must be refused with this code; `Some("JQ_")`: with any.
    must_refuse: Option<&'static str>,
}

fn setup(con: &mut Connection, base: &Baseline, m: &Mutation) {
    let _: () = redis::cmd("FLUSHALL").query(con).unwrap();
    if !base.setup.is_empty() {
        let mut pipe = redis::pipe();
        for command in &base.setup {
            pipe.cmd(&command[0]);
            for a in &command[1..] {
                pipe.arg(a);
            }
            pipe.ignore();
        }
        let _: () = pipe.query(con).unwrap();
    }
    for (key, t) in &m.retype {
        write_type(con, key, t);
    }
}

/// Runs a mutation; returns what went wrong, if anything.
fn check(
    con: &mut Connection,
    shas: &HashMap<&'static str, String>,
    base: &Baseline,
    m: &Mutation,
) -> Option<String> {
    setup(con, base, m);
    let before = snapshot(con);
    let reply = eval(con, shas, &m.call);
    let context = || {
        format!(
            "[{} / {}]\n      call: {}",
            base.label,
            m.what,
            m.call.shown()
        )
    };
    let refusal = match reply {
        Ok(v) => {
            return m.must_refuse.map(|code| {
                let shown = format!("{v:?}");
                format!(
                    "{} accepted; must be refused with {code}: reply {}",
                    context(),
                    shown.chars().take(200).collect::<String>()
                )
            });
        }
        Err(text) if text.starts_with("(no reply") => {
            return Some(format!(
                "{}\n      no reply within 3 s: the script spins (Redis answers BUSY to every client until it ends): {text}",
                context()
            ));
        }
        Err(text) => text,
    };
    let after = snapshot(con);
    let mut problems = Vec::new();
    let code = refusal.split(' ').next().unwrap_or("");
    if !code.starts_with("JQ_") {
        problems.push(format!(
            "refused without a JQ_ code: {}",
            refusal.chars().take(300).collect::<String>()
        ));
    } else if let Some(want) = m.must_refuse
        && want != "JQ_"
        && code != want
    {
        problems.push(format!(
            "refused with {code}, must be {want}: {}",
            refusal.chars().take(200).collect::<String>()
        ));
    }
    if code == "JQ_WRONGTYPE" {
        // JQ_WRONGTYPE <key> <expected> <found>, parsed from the right.
        let rest = refusal["JQ_WRONGTYPE ".len().min(refusal.len())..].trim_end();
        let parts: Option<(&str, &str, &str)> = rest.rsplit_once(' ').and_then(|(r, found)| {
            r.rsplit_once(' ')
                .map(|(key, expected)| (key, expected, found))
        });
        match parts {
            Some((key, expected, found)) => {
                let actual: String = redis::cmd("TYPE").arg(key).query(con).unwrap_or_default();
                if !m.call.keys.iter().any(|k| k == key.as_bytes()) {
                    problems.push(format!(
                        "JQ_WRONGTYPE names {key:?}, not a key of the call: {refusal}"
                    ));
                } else if actual != found {
                    problems.push(format!(
                        "JQ_WRONGTYPE says {key} holds a {found}, TYPE says {actual}: {refusal}"
                    ));
                }
                if !["hash", "list", "zset", "string", "integer", "stream"].contains(&expected) {
                    problems.push(format!("JQ_WRONGTYPE expected {expected:?} is not hash, list, zset, string, integer or stream"));
                }
            }
            None => problems.push(format!(
                "JQ_WRONGTYPE without key, expected and found: {refusal}"
            )),
        }
    }
    let changed = diff(&before, &after);
    if !changed.is_empty() {
        problems.push(format!(
            "refused ({}) after writing: {}",
            refusal.chars().take(120).collect::<String>(),
            changed.join(", ")
        ));
    }
    (!problems.is_empty()).then(|| format!("{}\n      {}", context(), problems.join("\n      ")))
}

/// The fixed mutations of a baseline.
fn mutations(base: &Baseline) -> Vec<Mutation> {
    let call = &base.call;
    let (nk, na) = (call.keys.len(), call.args.len());
    let mut out = Vec::new();
    let arity =
        |keys: usize, args: usize| (!base.arity.accepts(keys, args)).then_some("JQ_BAD_ARGS");
    let mut c = call.clone();
    c.keys.pop();
    out.push(Mutation {
        what: "KEYS - 1".into(),
        call: c,
        retype: vec![],
        must_refuse: arity(nk - 1, na),
    });
    let mut c = call.clone();
    c.keys.push(k("extra").into_bytes());
    out.push(Mutation {
        what: "KEYS + 1".into(),
        call: c,
        retype: vec![],
        must_refuse: arity(nk + 1, na),
    });
    let mut c = call.clone();
    c.args.pop();
    out.push(Mutation {
        what: "ARGV - 1".into(),
        call: c,
        retype: vec![],
        must_refuse: arity(nk, na - 1),
    });
    let mut c = call.clone();
    c.args.push(b"x".to_vec());
    out.push(Mutation {
        what: "ARGV + 1".into(),
        call: c,
        retype: vec![],
        must_refuse: arity(nk, na + 1),
    });
    for &(i, num) in &base.numbers {
        for v in BAD_NUMBERS {
            let mut c = call.clone();
            c.args[i] = v.as_bytes().to_vec();
            let must_refuse = match num.valid(v) {
                Some(false) if num == Num::Protocol => Some("JQ_"),
                Some(false) => Some("JQ_BAD_ARGS"),
                _ => None,
            };
            out.push(Mutation {
                what: format!("ARGV[{}] ({num:?}) = {v:?}", i + 1),
                call: c,
                retype: vec![],
                must_refuse,
            });
        }
    }
    for (i, &own) in base.types.iter().enumerate() {
        // The same key twice (two keys of the same type).
        for j in (0..base.types.len()).filter(|&j| j != i && base.types[j] == own) {
            let mut c = call.clone();
            c.keys[j] = c.keys[i].clone();
            out.push(Mutation {
                what: format!("KEYS[{}] = KEYS[{}]", j + 1, i + 1),
                call: c,
                retype: vec![],
                must_refuse: None,
            });
        }
        for t in TYPES.iter().copied().filter(|&t| t != own) {
            let hostile = k(&format!("hostile key:{i}:{t}")).into_bytes();
            let mut c = call.clone();
            c.keys[i] = hostile.clone();
            out.push(Mutation {
                what: format!("KEYS[{}] -> a {t} key", i + 1),
                call: c,
                retype: vec![(hostile, t)],
                must_refuse: None,
            });
            out.push(Mutation {
                what: format!("KEYS[{}] ({own}) holds a {t}", i + 1),
                call: call.clone(),
                retype: vec![(call.keys[i].clone(), t)],
                must_refuse: None,
            });
        }
    }
    out
}

/// A server for script calls; started again when a call hangs it.
struct Lab {
    server: RedisServer,
    con: Connection,
    shas: HashMap<&'static str, String>,
}

impl Lab {
    fn start() -> Self {
        let server = RedisServer::start();
        let mut con = server.connection();
        con.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let shas = load_scripts(&mut con);
        Self { server, con, shas }
    }

    /// Runs a mutation; starts a new server when the call hung this one.
    fn check(&mut self, base: &Baseline, m: &Mutation) -> Option<String> {
        let failure = check(&mut self.con, &self.shas, base, m);
        if failure
            .as_deref()
            .is_some_and(|f| f.contains("no reply within"))
        {
            *self = Lab::start();
        }
        failure
    }
}

/// Every fixed mutation of every baseline of `script`.
fn mutations_of(script: &str) {
    let mut lab = Lab::start();
    let bases: Vec<Baseline> = baselines()
        .into_iter()
        .filter(|b| b.call.script == script)
        .collect();
    assert!(!bases.is_empty(), "no baseline for {script}");
    let mut failures = Vec::new();
    let mut count = 0;
    for base in &bases {
        let plain = Mutation {
            what: "baseline".into(),
            call: base.call.clone(),
            retype: vec![],
            must_refuse: None,
        };
        setup(&mut lab.con, base, &plain);
        if let Err(e) = eval(&mut lab.con, &lab.shas, &base.call) {
            panic!(
                "the baseline {script} [{}] is refused: {e}\n  {}",
                base.label,
                base.call.shown()
            );
        }
        for m in mutations(base) {
            count += 1;
            if let Some(f) = lab.check(base, &m) {
                failures.push(f);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{script}: {} of {count} mutated calls broke the all-or-nothing rule:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

macro_rules! mutation_tests {
    ($($test:ident => $script:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                mutations_of($script);
            }
        )*
        /// Every script of `lua/` has a mutation test.
        #[test]
        fn every_script_is_mutated() {
            let tested = [$($script),*];
            for s in job_async_redis::scripts::all() {
                assert!(tested.contains(&s.name()), "no mutation test for {}", s.name());
            }
        }
    };
}

mutation_tests! {
    mutate_queue_register => "queue_register",
    mutate_simple_submit => "simple_submit",
    mutate_simple_reply => "simple_reply",
    mutate_simple_requeue => "simple_requeue",
    mutate_simple_dead => "simple_dead",
    mutate_job_submit => "job_submit",
    mutate_job_claim => "job_claim",
    mutate_job_start => "job_start",
    mutate_job_finish => "job_finish",
    mutate_job_extend => "job_extend",
    mutate_job_requeue_stale => "job_requeue_stale",
    mutate_job_watch => "job_watch",
    mutate_job_release => "job_release",
    mutate_reliable_start => "reliable_start",
    mutate_reliable_heartbeat => "reliable_heartbeat",
    mutate_reliable_find_dead => "reliable_find_dead",
    mutate_reliable_requeue_worker => "reliable_requeue_worker",
    mutate_job_finish_batch => "job_finish_batch",
    mutate_job_promote => "job_promote",
    mutate_schedule_set => "schedule_set",
    mutate_schedule_fire => "schedule_fire",
    mutate_schedule_remove => "schedule_remove",
    mutate_queue_control => "queue_control",
    mutate_job_cancel => "job_cancel",
    mutate_job_requeue => "job_requeue",
    mutate_job_progress => "job_progress",
}

/// Values a random mutation puts in an argument.
fn random_value(rng: &mut fastrand::Rng) -> Vec<u8> {
    const POOL: [&[u8]; 26] = [
        b"-0",
        b"+1",
        b"00000000000000001",
        b"1 ",
        b"9007199254740993",
        b"1000000000000",
        b"1000000000001",
        b"1000000",
        b"1000001",
        b"publish",
        b"spublish",
        b"recoverable",
        b"reliable",
        b"simple",
        b"completed",
        b"failed",
        b"pending",
        b"inflight",
        b"\x00",
        b"\xff\xfe",
        b"j1",
        b"w1",
        b"c7",
        b"1",
        b"2",
        b"-9223372036854775809",
    ];
    match rng.usize(0..4) {
        0 => BAD_NUMBERS[rng.usize(0..BAD_NUMBERS.len())]
            .as_bytes()
            .to_vec(),
        1 => POOL[rng.usize(0..POOL.len())].to_vec(),
        2 => (0..rng.usize(0..12)).map(|_| rng.u8(..)).collect(),
        _ => vec![b'9'; 100_000],
    }
}

/// Seeded random mutations of every baseline: 1 to 3 random edits of KEYS,
/// ARGV and key types per call. `HOSTILE_SEED=<n>` replays a run.
#[test]
fn random_mutations_are_all_or_nothing() {
    let seed: u64 = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2025_1203);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut lab = Lab::start();
    let mut failures = Vec::new();
    let mut count = 0;
    for base in baselines() {
        for n in 0..40 {
            let mut m = Mutation {
                what: String::new(),
                call: base.call.clone(),
                retype: vec![],
                must_refuse: None,
            };
            let mut edits = Vec::new();
            for e in 0..rng.usize(1..=3) {
                let (nk, na) = (m.call.keys.len(), m.call.args.len());
                match rng.usize(0..8) {
                    0 | 1 if na > 0 => {
                        let i = rng.usize(0..na);
                        m.call.args[i] = random_value(&mut rng);
                        edits.push(format!("ARGV[{}] replaced", i + 1));
                    }
                    2 if nk > 0 => {
                        let i = rng.usize(0..nk);
                        let t = TYPES[rng.usize(0..TYPES.len())];
                        let key = k(&format!("hostile:{n}:{e}:{t}")).into_bytes();
                        m.retype.push((key.clone(), t));
                        m.call.keys[i] = key;
                        edits.push(format!("KEYS[{}] -> a {t} key", i + 1));
                    }
                    3 if nk > 0 => {
                        let i = rng.usize(0..nk);
                        let t = TYPES[rng.usize(0..TYPES.len())];
                        m.retype.push((m.call.keys[i].clone(), t));
                        edits.push(format!("KEYS[{}] holds a {t}", i + 1));
                    }
                    4 if na > 0 => {
                        let i = rng.usize(0..na);
                        m.call.args.remove(i);
                        edits.push(format!("ARGV[{}] removed", i + 1));
                    }
                    5 if nk > 0 => {
                        let i = rng.usize(0..nk);
                        m.call.keys.remove(i);
                        edits.push(format!("KEYS[{}] removed", i + 1));
                    }
                    6 => {
                        let i = rng.usize(0..=na);
                        m.call.args.insert(i, random_value(&mut rng));
                        edits.push(format!("ARGV inserted at {}", i + 1));
                    }
                    _ if na > 1 => {
                        let (i, j) = (rng.usize(0..na), rng.usize(0..na));
                        m.call.args.swap(i, j);
                        edits.push(format!("ARGV[{}] <-> ARGV[{}]", i + 1, j + 1));
                    }
                    _ => {}
                }
            }
            m.what = format!("random #{n}: {}", edits.join(", "));
            count += 1;
            if let Some(f) = lab.check(&base, &m) {
                failures.push(format!("{} {f}", base.call.script));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "seed {seed} (HOSTILE_SEED={seed} replays it): {} of {count} random mutated calls broke the all-or-nothing rule:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// `reliable_requeue_worker` called with the in-flight list and the pending
/// list being the same key: LMOVE of a list onto itself never empties it; the
/// script must not spin for ever (Redis would answer BUSY to every client,
/// and a script that wrote cannot be killed).
#[test]
fn requeue_worker_onto_its_own_list_does_not_hang_redis() {
    let Lab {
        server,
        mut con,
        shas,
    } = Lab::start();
    let _: () = redis::cmd("ZADD")
        .arg(k("workers"))
        .arg(1)
        .arg("w2")
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("LPUSH")
        .arg(k("pending"))
        .arg("j1")
        .query(&mut con)
        .unwrap();
    let call = RawCall {
        script: "reliable_requeue_worker",
        keys: vec![
            k("workers").into_bytes(),
            k("pending").into_bytes(),
            k("pending").into_bytes(),
            k("running").into_bytes(),
            k("gate").into_bytes(),
        ],
        args: vec![b"w2".to_vec(), b"1".to_vec(), b"300000".to_vec()],
    };
    let reply = eval(&mut con, &shas, &call);
    let hung = matches!(&reply, Err(e) if e.starts_with("(no reply"));
    if hung {
        // The server is stuck in the script: stop it.
        drop(con);
        drop(server);
    }
    assert!(
        !hung,
        "the script ran for more than 3 s (Redis answers BUSY to everyone): {}",
        call.shown()
    );
    if let Err(e) = &reply {
        assert!(e.starts_with("JQ_"), "{e}");
    }
}

// ---------------------------------------------------------------------------
// Refusals that quote bytes read from Redis
// ---------------------------------------------------------------------------

/// Refusals whose message quotes stored data (a queue's mode, a job's state
/// or token, a key built from an ID that is not UTF-8) must still be
/// readable `JQ_` errors: an error reply that is not UTF-8 is a parse error
/// for the client library, which then drops the connection, failing every
/// other command in flight on it.
#[test]
fn refusals_that_quote_stored_bytes_are_readable() {
    let lab = Lab::start();
    let shas = lab.shas.clone();
    let k_bytes = |name: &[u8]| {
        let mut key = b"jq:{mut}:".to_vec();
        key.extend_from_slice(name);
        key
    };
    type Setup = Vec<Vec<Vec<u8>>>;
    let b = |parts: &[&[u8]]| parts.iter().map(|p| p.to_vec()).collect::<Vec<_>>();
    let cases: Vec<(&str, Setup, RawCall)> = vec![
        (
            "a dead worker whose ID is not UTF-8 and whose in-flight list is a string",
            vec![
                b(&[b"ZADD", &k_bytes(b"workers"), b"0", b"\xff\xfe"]),
                b(&[b"SET", &k_bytes(b"inflight:\xff\xfe"), b"x"]),
            ],
            RawCall {
                script: "reliable_requeue_worker",
                keys: vec![
                    k_bytes(b"workers"),
                    k_bytes(b"inflight:\xff\xfe"),
                    k_bytes(b"pending"),
                    k_bytes(b"running"),
                    k_bytes(b"gate"),
                ],
                args: vec![b"\xff\xfe".to_vec(), b"1".to_vec(), b"300000".to_vec()],
            },
        ),
        (
            "a queue mode that is not UTF-8",
            vec![b(&[
                b"HSET",
                &k_bytes(b"meta"),
                b"mode",
                b"\xffmode",
                b"protocol",
                b"1",
            ])],
            RawCall {
                script: "queue_register",
                keys: vec![k_bytes(b"meta")],
                args: vec![b"recoverable".to_vec(), b"1".to_vec()],
            },
        ),
        (
            "a queue mode that is not UTF-8, read by queue_control",
            vec![b(&[
                b"HSET",
                &k_bytes(b"meta"),
                b"mode",
                b"\xffmode",
                b"protocol",
                b"1",
            ])],
            RawCall {
                script: "queue_control",
                keys: vec![k_bytes(b"meta"), k_bytes(b"gate")],
                args: vec![
                    b"recoverable".to_vec(),
                    b"1".to_vec(),
                    b"paused".to_vec(),
                    b"1".to_vec(),
                ],
            },
        ),
        (
            "a control name and value that are not UTF-8, refused by queue_control",
            vec![b(&[
                b"HSET",
                &k_bytes(b"meta"),
                b"mode",
                b"recoverable",
                b"protocol",
                b"1",
            ])],
            RawCall {
                script: "queue_control",
                keys: vec![k_bytes(b"meta"), k_bytes(b"gate")],
                args: vec![
                    b"recoverable".to_vec(),
                    b"1".to_vec(),
                    b"\xffpaused".to_vec(),
                    b"\xfe".to_vec(),
                ],
            },
        ),
        (
            "a protocol version that is not UTF-8",
            vec![b(&[
                b"HSET",
                &k_bytes(b"meta"),
                b"mode",
                b"simple",
                b"protocol",
                b"\xff",
            ])],
            RawCall {
                script: "simple_submit",
                keys: vec![
                    k_bytes(b"meta"),
                    k_bytes(b"pending"),
                    k_bytes(b"delayed"),
                    k_bytes(b"clock"),
                ],
                args: vec![
                    b"simple".to_vec(),
                    b"1".to_vec(),
                    b"0".to_vec(),
                    b"0".to_vec(),
                    b"\x80".to_vec(),
                ],
            },
        ),
        (
            "a job state that is not UTF-8",
            vec![b(&[
                b"HSET",
                &k_bytes(b"job:j1"),
                b"state",
                b"\xff",
                b"token",
                b"7",
            ])],
            RawCall {
                script: "job_finish",
                keys: vec![
                    k_bytes(b"job:j1"),
                    k_bytes(b"leases"),
                    k_bytes(b"pending"),
                    k_bytes(b"tickets"),
                    k_bytes(b"delayed"),
                    k_bytes(b"clock"),
                    k_bytes(b"running"),
                    k_bytes(b"gate"),
                    k_bytes(b"events"),
                ],
                args: [
                    &b"j1"[..],
                    b"7",
                    b"completed",
                    b"r",
                    b"",
                    b"0",
                    b"86400000",
                    b"recoverable",
                    b"publish",
                    b"-1",
                ]
                .iter()
                .map(|a| a.to_vec())
                .collect(),
            },
        ),
        (
            "a job state that is not UTF-8, read by job_progress",
            vec![b(&[
                b"HSET",
                &k_bytes(b"job:j1"),
                b"state",
                b"\xff",
                b"token",
                b"7",
            ])],
            RawCall {
                script: "job_progress",
                keys: vec![k_bytes(b"job:j1"), k_bytes(b"events")],
                args: vec![
                    b"j1".to_vec(),
                    b"7".to_vec(),
                    b"x".to_vec(),
                    b"publish".to_vec(),
                ],
            },
        ),
        (
            "a job key that is not UTF-8, refused by job_cancel",
            vec![],
            RawCall {
                script: "job_cancel",
                keys: vec![
                    k_bytes(b"delayed"),
                    k_bytes(b"leases"),
                    k_bytes(b"running"),
                    k_bytes(b"gate"),
                    k_bytes(b"events"),
                    k_bytes(b"job:\xff\xfe"),
                ],
                args: vec![
                    b"recoverable".to_vec(),
                    b"60000".to_vec(),
                    b"publish".to_vec(),
                    b"".to_vec(),
                    b"j1".to_vec(),
                ],
            },
        ),
        (
            "a queue name that is not UTF-8 and a unique lock of another type, refused by job_submit",
            vec![
                b(&[
                    b"HSET",
                    b"jq:{\xff}:meta",
                    b"mode",
                    b"recoverable",
                    b"protocol",
                    b"1",
                ]),
                b(&[b"HSET", b"jq:{\xff}:unique:k1", b"f", b"v"]),
            ],
            RawCall {
                script: "job_submit",
                keys: [
                    &b"jq:{\xff}:meta"[..],
                    b"jq:{\xff}:pending",
                    b"jq:{\xff}:tickets",
                    b"jq:{\xff}:delayed",
                    b"jq:{\xff}:clock",
                    b"jq:{\xff}:events",
                    b"jq:{\xff}:job:j1",
                    b"jq:{\xff}:unique:k1",
                ]
                .iter()
                .map(|k| k.to_vec())
                .collect(),
                args: [
                    &b"recoverable"[..],
                    b"1",
                    b"j1",
                    b"json",
                    b"1",
                    b"",
                    b"0",
                    b"1",
                    b"0",
                    b"0",
                    b"0",
                    b"",
                    b"active:0:k1",
                ]
                .iter()
                .map(|a| a.to_vec())
                .collect(),
            },
        ),
        (
            "a job token that is not UTF-8",
            vec![b(&[
                b"HSET",
                &k_bytes(b"job:j1"),
                b"state",
                b"active",
                b"token",
                b"\xff",
            ])],
            RawCall {
                script: "job_release",
                keys: vec![
                    k_bytes(b"job:j1"),
                    k_bytes(b"leases"),
                    k_bytes(b"pending"),
                    k_bytes(b"tickets"),
                    k_bytes(b"running"),
                    k_bytes(b"gate"),
                ],
                args: vec![b"j1".to_vec(), b"7".to_vec(), b"recoverable".to_vec()],
            },
        ),
    ];
    let mut problems = Vec::new();
    for (label, setup, call) in cases {
        let mut con = lab.server.connection();
        let _: () = redis::cmd("FLUSHALL").query(&mut con).unwrap();
        for command in setup {
            let mut c = redis::cmd(std::str::from_utf8(&command[0]).unwrap());
            for a in &command[1..] {
                c.arg(a.as_slice());
            }
            let _: redis::Value = c.query(&mut con).unwrap();
        }
        match eval(&mut con, &shas, &call) {
            Err(text) if text.starts_with("JQ_") => {}
            other => problems.push(format!("{label}: {other:?}\n    call: {}", call.shown())),
        }
        if redis::cmd("PING").query::<String>(&mut con).is_err() {
            problems.push(format!(
                "{label}: the connection is broken after the refusal"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Reliable mode: a garbage member of the workers set whose ID is not UTF-8
/// and whose in-flight list holds another type is refused by every recovery
/// pass; the refusal must not reset the worker's connection each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_garbage_worker_does_not_reset_connections() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let q = queue_name("churn");
    let keys = qkeys(&q);
    let connections = |con: &mut Connection| -> i64 {
        let info: String = redis::cmd("INFO").arg("stats").query(con).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    let worker = builder(&server, Mode::Reliable, &[&q])
        .build()
        .await
        .unwrap();
    let shutdown = worker.shutdown_handle();
    let task: Run = tokio::spawn(worker.run(Runs::default().handler()));
    let _: () = redis::cmd("ZADD")
        .arg(keys.workers())
        .arg(0)
        .arg(&b"\xff\xfe"[..])
        .query(&mut con)
        .unwrap();
    write_type(&mut con, &keys.inflight_bytes(b"\xff\xfe"), "string");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = connections(&mut con);
    let mut results = Vec::new();
    for i in 0..5 {
        let result = queue
            .submit(&format!("job-{i}"))
            .await
            .unwrap()
            .result_timeout::<String>(WAIT)
            .await;
        results.push(result);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let opened = connections(&mut con) - before;
    let stats = stop(shutdown, task).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(
        opened <= 2,
        "{opened} connections were opened in 2 s (the worker reconnects after each recovery pass): {stats:?}"
    );
}

/// Where job `id` is: pending, claimed (lease or in-flight list), dead.
fn whereabouts(con: &mut Connection, keys: &QueueKeys, id: &str) -> String {
    let mut at = Vec::new();
    let pending: Option<i64> = redis::cmd("LPOS")
        .arg(keys.pending())
        .arg(id)
        .query(con)
        .unwrap_or(None);
    if pending.is_some() {
        at.push("in pending".to_owned());
    }
    let lease: Option<f64> = redis::cmd("ZSCORE")
        .arg(keys.leases())
        .arg(id)
        .query(con)
        .unwrap_or(None);
    if lease.is_some() {
        at.push("in leases".to_owned());
    }
    let lists: Vec<String> = redis::cmd("KEYS")
        .arg(keys.inflight("*"))
        .query(con)
        .unwrap_or_default();
    for list in lists {
        let pos: Option<i64> = redis::cmd("LPOS")
            .arg(&list)
            .arg(id)
            .query(con)
            .unwrap_or(None);
        if pos.is_some() {
            at.push(format!("in {list}"));
        }
    }
    let dead: Option<f64> = redis::cmd("ZSCORE")
        .arg(keys.dead_jobs())
        .arg(id)
        .query(con)
        .unwrap_or(None);
    if dead.is_some() {
        at.push("in dead_jobs".to_owned());
    }
    let state: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(keys.job(id))
        .arg("state")
        .query(con)
        .unwrap_or(None);
    at.push(format!(
        "state {}",
        state.map_or("(none)".into(), |s| show(&s))
    ));
    at.join(", ")
}

/// A running job's state is overwritten with bytes that are not UTF-8: its
/// outcome is refused (counted as `outcome_refused`), the worker and the
/// other jobs carry on, and the job's client gets a decode failure once the
/// job is recovered.
async fn garbled_state_of_a_running_job(mode: Mode) {
    let server = RedisServer::start();
    let mut con = server.connection();
    let q = queue_name("garbled");
    let keys = qkeys(&q);
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, mode).await.unwrap();
    let runs = Runs::default();
    let worker = builder(&server, mode, &[&q]).build().await.unwrap();
    let shutdown = worker.shutdown_handle();
    let task: Run = tokio::spawn(worker.run(runs.handler()));
    let slow = queue.submit("slow").await.unwrap();
    let id = slow.id().to_owned();
    assert!(
        wait_until(Duration::from_secs(5), || runs.count(&id) == 1).await,
        "not started"
    );
    let _: () = redis::cmd("HSET")
        .arg(keys.job(&id))
        .arg("state")
        .arg(&b"\xff\xfe"[..])
        .query(&mut con)
        .unwrap();
    let mut problems = Vec::new();
    for i in 0..3 {
        let r = queue
            .submit(&format!("n{i}"))
            .await
            .unwrap()
            .result_timeout::<String>(WAIT)
            .await;
        if r.as_deref().ok() != Some(format!("{i}n").as_str()) {
            problems.push(format!("another job: {r:?}"));
        }
    }
    match slow.result_timeout::<String>(WAIT).await {
        Err(Error::JobFailed {
            kind: FailureKind::Decode,
            ..
        }) => {}
        other => problems.push(format!(
            "the garbled job's client: {other:?}; the job is {}",
            whereabouts(&mut con, &keys, &id)
        )),
    }
    if runs.count(&id) != 1 {
        problems.push(format!("the garbled job ran {} times", runs.count(&id)));
    }
    match stop(shutdown, task).await {
        Ok(stats) if stats.outcome_refused == 1 && stats.completed == 3 => {}
        other => problems.push(format!(
            "stats (want outcome_refused 1, completed 3): {other:?}"
        )),
    }
    assert!(
        problems.is_empty(),
        "{mode:?} mode:\n  {}",
        problems.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoverable_garbled_state_of_a_running_job() {
    garbled_state_of_a_running_job(Mode::Recoverable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_garbled_state_of_a_running_job() {
    garbled_state_of_a_running_job(Mode::Reliable).await;
}
