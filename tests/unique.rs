//! Unique jobs (`JobOptions::unique`, protocol.md 8.10): at most one job per
//! key is enqueued while the key is held, however many clients race; a
//! refused submit returns a handle on the holder. `Unique::until_finished`
//! holds the key until its job ends in any way (completed, failed for good;
//! not between retries), `Unique::throttle` for its window whatever becomes
//! of the job. Every check reads what happened from Redis (the pending
//! list, the job hashes, the lock key).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use job_async_redis::{Backoff, Client, Error, Job, JobOptions, Mode, Queue, Unique};
use redis::Commands;
use support::{RedisServer, config, eventually, queue_name, spawn_built};

const WAIT: Duration = Duration::from_secs(20);

fn pending_len(server: &RedisServer, q: &str) -> usize {
    server
        .connection()
        .llen(format!("jq:{{{q}}}:pending"))
        .unwrap()
}

/// The job hashes of queue `q`, found with SCAN.
fn job_hashes(server: &RedisServer, q: &str) -> Vec<String> {
    let mut con = server.connection();
    let mut keys: Vec<String> = con
        .scan_match::<_, String>(format!("jq:{{{q}}}:job:*"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    keys.sort();
    keys
}

fn lock(server: &RedisServer, q: &str, key: &str) -> Option<String> {
    server
        .connection()
        .get(format!("jq:{{{q}}}:unique:{key}"))
        .unwrap()
}

fn lock_pttl(server: &RedisServer, q: &str, key: &str) -> i64 {
    server
        .connection()
        .pttl(format!("jq:{{{q}}}:unique:{key}"))
        .unwrap()
}

fn unique(u: Unique) -> JobOptions {
    JobOptions::default().unique(u)
}

async fn open(server: &RedisServer, q: &str, mode: Mode) -> (Client, Queue) {
    let client = Client::connect(config(server)).await.unwrap();
    let queue = client.queue(q, mode).await.unwrap();
    (client, queue)
}

/// The done criterion: two clients race 1,000 submits each with the
/// same key; exactly one job is enqueued, and every handle is on it.
async fn racing_clients_enqueue_one_job(mode: Mode) {
    let server = RedisServer::start();
    let q = queue_name(&format!("unique-race-{mode}"));
    let start = Arc::new(tokio::sync::Barrier::new(2));
    let mut tasks = Vec::new();
    for c in 0..2 {
        let (config, q, start) = (config(&server), q.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(config).await.unwrap();
            let queue = client.queue(&q, mode).await.unwrap();
            start.wait().await;
            let mut ids = Vec::new();
            for i in 0..1000 {
                let handle = queue
                    .submit_with(
                        &format!("client {c} submit {i}"),
                        unique(Unique::until_finished("the-one")),
                    )
                    .await
                    .unwrap();
                ids.push(handle.id().to_owned());
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await.unwrap());
    }
    assert_eq!(ids.len(), 2000);
    let holder = ids[0].clone();
    assert!(
        ids.iter().all(|id| *id == holder),
        "handles on several jobs"
    );
    assert_eq!(pending_len(&server, &q), 1);
    assert_eq!(
        job_hashes(&server, &q),
        vec![format!("jq:{{{q}}}:job:{holder}")]
    );
    assert_eq!(
        lock(&server, &q, "the-one").as_deref(),
        Some(holder.as_str())
    );
    // No expiry without expire_after.
    assert_eq!(lock_pttl(&server, &q, "the-one"), -1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_clients_enqueue_one_job_recoverable() {
    racing_clients_enqueue_one_job(Mode::Recoverable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_clients_enqueue_one_job_reliable() {
    racing_clients_enqueue_one_job(Mode::Reliable).await;
}

/// A handler that fails payloads starting with "fail", and payloads
/// starting with "flaky" on their first two attempts.
async fn picky(job: Job<String>) -> Result<String, String> {
    if job.payload.starts_with("fail") || (job.payload.starts_with("flaky") && job.attempt < 3) {
        return Err(format!("attempt {} failed", job.attempt));
    }
    Ok(format!("{} done on attempt {}", job.payload, job.attempt))
}

async fn until_finished_holds_until_the_job_ends(mode: Mode) {
    let server = RedisServer::start();
    let q = queue_name(&format!("unique-active-{mode}"));
    let (_client, queue) = open(&server, &q, mode).await;
    let key = || unique(Unique::until_finished("report:42"));

    // Queued: a second submit returns the first job's handle.
    let first = queue.submit_with("one", key()).await.unwrap();
    let again = queue.submit_with("two", key().id("mine")).await.unwrap();
    assert_eq!(again.id(), first.id(), "deduplicated: the holder's ID");
    assert_eq!(pending_len(&server, &q), 1);
    assert!(support::job_state(&server, &q, "mine").is_none());

    let builder = match mode {
        Mode::Reliable => support::reliable(config(&server), &q),
        _ => support::recoverable(config(&server), &q),
    };
    let running = spawn_built(builder, picky).await;
    let first_id = first.id().to_owned();
    assert_eq!(
        first.result_timeout::<String>(WAIT).await.unwrap(),
        "one done on attempt 1"
    );
    // The finishing script released the key with the completion.
    assert_eq!(lock(&server, &q, "report:42"), None);
    let second = queue.submit_with("three", key()).await.unwrap();
    assert_ne!(second.id(), first_id);
    assert_eq!(
        second.result_timeout::<String>(WAIT).await.unwrap(),
        "three done on attempt 1"
    );
    assert_eq!(lock(&server, &q, "report:42"), None);

    // A job that fails for good releases the key too.
    let failing = queue
        .submit_with("fail", key().max_attempts(1))
        .await
        .unwrap();
    let failing_id = failing.id().to_owned();
    match failing.result_timeout::<String>(WAIT).await {
        Err(Error::JobFailed { .. }) => {}
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(lock(&server, &q, "report:42"), None);
    let after_failure = queue.submit_with("four", key()).await.unwrap();
    assert_ne!(after_failure.id(), failing_id);
    after_failure.result_timeout::<String>(WAIT).await.unwrap();

    // A job that is retried keeps the key between attempts, until it ends.
    let flaky = queue
        .submit_with(
            "flaky",
            key()
                .max_attempts(3)
                .backoff(Backoff::fixed(Duration::from_millis(400))),
        )
        .await
        .unwrap();
    let flaky_id = flaky.id().to_owned();
    let hash = format!("jq:{{{q}}}:job:{flaky_id}");
    let mut con = server.connection();
    eventually("the first attempt failed", || {
        let (state, error): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(&hash)
            .arg(&["state", "error"])
            .query(&mut con)
            .unwrap();
        state.as_deref() == Some("queued") && error.is_some()
    })
    .await;
    assert_eq!(
        lock(&server, &q, "report:42").as_deref(),
        Some(flaky_id.as_str())
    );
    let during_retry = queue.submit_with("five", key()).await.unwrap();
    assert_eq!(during_retry.id(), flaky_id);
    assert_eq!(
        flaky.result_timeout::<String>(WAIT).await.unwrap(),
        "flaky done on attempt 3"
    );
    assert_eq!(lock(&server, &q, "report:42"), None);
    let fresh = queue.submit_with("six", key()).await.unwrap();
    assert_ne!(fresh.id(), flaky_id);
    fresh.result_timeout::<String>(WAIT).await.unwrap();
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_finished_holds_until_the_job_ends_recoverable() {
    until_finished_holds_until_the_job_ends(Mode::Recoverable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_finished_holds_until_the_job_ends_reliable() {
    until_finished_holds_until_the_job_ends(Mode::Reliable).await;
}

/// A deduplicated handle awaits the holder's outcome, from another client
/// (another process, say), without taking the holder's doorbell from the
/// client that submitted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deduplicated_handle_awaits_the_holder() {
    let server = RedisServer::start();
    let q = queue_name("unique-await");
    // The submitter polls every 5 s (the default): it must hear the doorbell.
    let (_a, queue_a) = open(&server, &q, Mode::Recoverable).await;
    let b = Client::connect(config(&server).result_poll_interval(Duration::from_millis(100)))
        .await
        .unwrap();
    let queue_b = b.queue(&q, Mode::Recoverable).await.unwrap();
    let key = || unique(Unique::until_finished("k"));
    let first = queue_a.submit_with("abc", key()).await.unwrap();
    let second = queue_b.submit_with("xyz", key()).await.unwrap();
    assert_eq!(second.id(), first.id());
    let (first, second) = (
        tokio::spawn(async move {
            let result = first.result_timeout::<String>(WAIT).await;
            (result, Instant::now())
        }),
        tokio::spawn(second.result_timeout::<String>(WAIT)),
    );
    // Both handles have read the job (and the second one would have taken
    // the doorbell, were it to) before it runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let running = spawn_built(support::recoverable(config(&server), &q), support::reverse).await;
    let started = Instant::now();
    assert_eq!(second.await.unwrap().unwrap(), "cba");
    let (result, told) = first.await.unwrap();
    assert_eq!(result.unwrap(), "cba");
    assert!(
        told.duration_since(started) < Duration::from_secs(4),
        "the submitter waited for its poll: its doorbell went elsewhere"
    );
    running.stop().await;
}

/// Two handles of one client on the same job (the submit's own, and a
/// deduplicated one): both get the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handles_of_one_client_on_one_job() {
    let server = RedisServer::start();
    let q = queue_name("unique-two-handles");
    let client = Client::connect(config(&server).result_poll_interval(Duration::from_millis(100)))
        .await
        .unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let key = || unique(Unique::until_finished("k"));
    let first = queue.submit_with("abc", key()).await.unwrap();
    let second = queue.submit_with("xyz", key()).await.unwrap();
    let third = queue.submit_with("xyz", key()).await.unwrap();
    assert_eq!(second.id(), first.id());
    assert_eq!(third.id(), first.id());
    drop(third);
    let running = spawn_built(support::recoverable(config(&server), &q), support::reverse).await;
    assert_eq!(first.result_timeout::<String>(WAIT).await.unwrap(), "cba");
    assert_eq!(second.result_timeout::<String>(WAIT).await.unwrap(), "cba");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_holds_for_its_window() {
    let server = RedisServer::start();
    let q = queue_name("unique-throttle");
    let (_client, queue) = open(&server, &q, Mode::Recoverable).await;
    let running = spawn_built(support::recoverable(config(&server), &q), support::reverse).await;
    let window = Duration::from_millis(1500);
    let key = || unique(Unique::throttle("welcome:ada", window));
    let taken = Instant::now();
    let first = queue.submit_with("abc", key()).await.unwrap();
    let first_id = first.id().to_owned();
    let ttl = lock_pttl(&server, &q, "welcome:ada");
    assert!(ttl > 0 && ttl <= 1500, "{ttl}");
    assert_eq!(first.result_timeout::<String>(WAIT).await.unwrap(), "cba");
    // Completed, but the window is still open: refused, and the handle
    // gives the first job's result.
    assert_eq!(
        lock(&server, &q, "welcome:ada").as_deref(),
        Some(first_id.as_str())
    );
    let refused = queue.submit_with("xyz", key()).await.unwrap();
    assert_eq!(refused.id(), first_id);
    assert_eq!(refused.result_timeout::<String>(WAIT).await.unwrap(), "cba");
    assert_eq!(job_hashes(&server, &q).len(), 1);
    assert!(taken.elapsed() < window, "the test machine is too slow");
    // After the window: a new job.
    tokio::time::sleep((window + Duration::from_millis(100)).saturating_sub(taken.elapsed())).await;
    let later = queue.submit_with("xyz", key()).await.unwrap();
    assert_ne!(later.id(), first_id);
    assert_eq!(later.result_timeout::<String>(WAIT).await.unwrap(), "zyx");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_after_bounds_an_active_lock() {
    let server = RedisServer::start();
    let q = queue_name("unique-expire");
    let (_client, queue) = open(&server, &q, Mode::Recoverable).await;
    let key = || unique(Unique::until_finished("e").expire_after(Duration::from_millis(300)));
    let first = queue.submit_with("A", key()).await.unwrap();
    let ttl = lock_pttl(&server, &q, "e");
    assert!(ttl > 0 && ttl <= 300, "{ttl}");
    assert_eq!(
        queue.submit_with("B", key()).await.unwrap().id(),
        first.id()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The lock expired while its job still waits: a new job takes the key.
    let second = queue.submit_with("C", key()).await.unwrap();
    assert_ne!(second.id(), first.id());
    assert_eq!(pending_len(&server, &q), 2);
    assert_eq!(lock(&server, &q, "e").as_deref(), Some(second.id()));

    // The first job's end does not release the second one's lock.
    let release = Arc::new(AtomicBool::new(false));
    let gate = release.clone();
    let running = spawn_built(
        support::recoverable(config(&server), &q).concurrency(1),
        move |job: Job<String>| {
            let gate = gate.clone();
            async move {
                while job.payload == "C" && !gate.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok::<_, String>(job.payload)
            }
        },
    )
    .await;
    assert_eq!(first.result_timeout::<String>(WAIT).await.unwrap(), "A");
    assert_eq!(lock(&server, &q, "e").as_deref(), Some(second.id()));
    release.store(true, Ordering::SeqCst);
    assert_eq!(second.result_timeout::<String>(WAIT).await.unwrap(), "C");
    assert_eq!(lock(&server, &q, "e"), None);
    running.stop().await;
}

/// Jobs of one batch that share a key: the first is enqueued, the others'
/// handles are on it; also across the batch's script calls (10,000 jobs
/// per call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_shared_key_enqueues_one() {
    let server = RedisServer::start();
    let q = queue_name("unique-batch");
    let client = Client::connect(config(&server).result_poll_interval(Duration::from_millis(200)))
        .await
        .unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let payloads: Vec<String> = ["abc", "def", "ghi", "jkl"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let options = [
        unique(Unique::until_finished("b")),
        JobOptions::default(),
        unique(Unique::until_finished("b")),
        unique(Unique::until_finished("other")),
    ];
    let handles = queue
        .submit_many_with(payloads.iter().zip(options))
        .await
        .unwrap();
    assert_eq!(handles.len(), 4);
    assert_eq!(handles[2].id(), handles[0].id());
    let distinct: std::collections::HashSet<&str> = handles.iter().map(|h| h.id()).collect();
    assert_eq!(distinct.len(), 3);
    assert_eq!(pending_len(&server, &q), 3);
    assert_eq!(job_hashes(&server, &q).len(), 3);
    let running = spawn_built(support::recoverable(config(&server), &q), support::reverse).await;
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.result_timeout::<String>(WAIT).await.unwrap());
    }
    assert_eq!(results, ["cba", "fed", "cba", "lkj"]);
    running.stop().await;

    // 10,002 jobs: jobs 3 and 10,001 share a key, in different calls.
    let n = 10_002;
    let payloads: Vec<u32> = (0..n).collect();
    let handles = queue
        .submit_many_with(payloads.iter().map(|&i| {
            let options = if i == 3 || i == n - 1 {
                unique(Unique::until_finished("far"))
            } else {
                JobOptions::default()
            };
            (&payloads[i as usize], options)
        }))
        .await
        .unwrap();
    assert_eq!(handles.len(), n as usize);
    assert_eq!(handles[n as usize - 1].id(), handles[3].id());
    let distinct: std::collections::HashSet<&str> = handles.iter().map(|h| h.id()).collect();
    assert_eq!(distinct.len(), n as usize - 1);
    assert_eq!(pending_len(&server, &q), n as usize - 1);
}

#[tokio::test]
async fn bad_unique_settings_are_refused() {
    let server = RedisServer::start();
    let q = queue_name("unique-bad");
    let (_client, queue) = open(&server, &q, Mode::Recoverable).await;
    let bad = [
        Unique::until_finished(""),
        Unique::until_finished("x".repeat(257)),
        Unique::until_finished("é".repeat(129)), // 258 bytes
        Unique::until_finished("x").expire_after(Duration::ZERO),
        Unique::until_finished("x").expire_after(Duration::from_micros(500)),
        Unique::until_finished("x").expire_after(Duration::from_millis(1_000_000_000_001)),
        Unique::throttle("x", Duration::ZERO),
        Unique::throttle("x", Duration::from_millis(1_000_000_000_001)),
    ];
    for u in bad {
        match queue.submit_with("p", unique(u.clone())).await {
            Err(Error::Config(_)) => {}
            other => panic!("{u:?}: expected Error::Config, got {other:?}"),
        }
        // In a batch, nothing of the batch is written.
        let jobs = [("a", JobOptions::default()), ("b", unique(u.clone()))];
        let result = queue
            .submit_many_with(jobs.iter().map(|(p, o)| (p, o.clone())))
            .await;
        assert!(matches!(result, Err(Error::Config(_))), "{u:?}");
    }
    assert!(job_hashes(&server, &q).is_empty());
    // The longest key and the widest ranges are fine.
    for u in [
        Unique::until_finished("é".repeat(128)),
        Unique::until_finished("y").expire_after(Duration::from_millis(1_000_000_000_000)),
        Unique::throttle("z", Duration::from_millis(1)),
    ] {
        queue.submit_with("p", unique(u)).await.unwrap();
    }
    assert_eq!(pending_len(&server, &q), 3);

    // Simple mode keeps no job records: refused.
    let simple = queue_name("unique-simple");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&simple, Mode::Simple).await.unwrap();
    match queue
        .submit_with("p", unique(Unique::until_finished("k")))
        .await
    {
        Err(Error::Config(_)) => {}
        other => panic!("expected Error::Config, got {other:?}"),
    }
    assert_eq!(pending_len(&server, &simple), 0);
}

/// An active lock whose holder is gone (its hash deleted by hand) is
/// stale: the next submit takes the key over.
#[tokio::test]
async fn a_stale_lock_is_taken_over() {
    let server = RedisServer::start();
    let q = queue_name("unique-stale");
    let (_client, queue) = open(&server, &q, Mode::Recoverable).await;
    let key = || unique(Unique::until_finished("s"));
    let first = queue.submit_with("p", key()).await.unwrap();
    let _: () = server
        .connection()
        .del(format!("jq:{{{q}}}:job:{}", first.id()))
        .unwrap();
    assert_eq!(lock(&server, &q, "s").as_deref(), Some(first.id()));
    let second = queue.submit_with("p", key()).await.unwrap();
    assert_ne!(second.id(), first.id());
    assert_eq!(lock(&server, &q, "s").as_deref(), Some(second.id()));
    assert_eq!(
        job_hashes(&server, &q),
        vec![format!("jq:{{{q}}}:job:{}", second.id())]
    );
    // A throttle lock is held whatever became of its holder.
    let t = || unique(Unique::throttle("t", Duration::from_secs(60)));
    let third = queue.submit_with("p", t()).await.unwrap();
    let _: () = server
        .connection()
        .del(format!("jq:{{{q}}}:job:{}", third.id()))
        .unwrap();
    assert_eq!(queue.submit_with("p", t()).await.unwrap().id(), third.id());
}

/// A unique key and an explicit ID that exists: the ID is refused first
/// (`DuplicateJob`), and nothing is written.
#[tokio::test]
async fn an_existing_id_is_refused_before_the_key_is_checked() {
    let server = RedisServer::start();
    let q = queue_name("unique-dup");
    let (_client, queue) = open(&server, &q, Mode::Recoverable).await;
    let key = || unique(Unique::until_finished("d"));
    queue.submit_with("p", key().id("job-1")).await.unwrap();
    match queue.submit_with("p", key().id("job-1")).await {
        Err(Error::DuplicateJob { .. }) => {}
        other => panic!("expected DuplicateJob, got {other:?}"),
    }
    assert_eq!(pending_len(&server, &q), 1);
    assert_eq!(lock(&server, &q, "d").as_deref(), Some("job-1"));
}
