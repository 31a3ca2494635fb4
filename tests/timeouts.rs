//! Per-job handler timeouts (`JobOptions::timeout`, `WorkerBuilder::timeout`)
//! in every mode: a handler that runs too long is dropped, the attempt fails
//! with kind `timeout`, and it is retried like a handler error while
//! attempts are left.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use job_async_redis::{Client, Error, FailureKind, Job, JobOptions, JobState, Mode, Worker};
use support::{RedisServer, config, queue_name, spawn_built};

const WAIT: Duration = Duration::from_secs(15);

/// What [`sleeper`]'s handler returns.
type Sleep = std::pin::Pin<Box<dyn Future<Output = Result<u64, String>> + Send>>;

/// A handler that sleeps for the payload's number of ms, counts its starts
/// and counts the sleeps that were cut short (dropped futures).
fn sleeper(
    started: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
) -> impl Fn(Job<u64>) -> Sleep + Send + Sync + 'static {
    move |job: Job<u64>| {
        started.fetch_add(1, Ordering::SeqCst);
        let dropped = dropped.clone();
        Box::pin(async move {
            struct Guard(Arc<AtomicUsize>, bool);
            impl Drop for Guard {
                fn drop(&mut self) {
                    if !self.1 {
                        self.0.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            let mut guard = Guard(dropped, false);
            tokio::time::sleep(Duration::from_millis(job.payload)).await;
            guard.1 = true;
            Ok(job.payload)
        })
    }
}

async fn a_slow_handler_times_out(mode: Mode) {
    let server = RedisServer::start();
    let q = queue_name(&format!("timeout-{mode}"));
    let (started, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // The worker's default: 2 s. Per job: 200 ms.
    let builder = Worker::builder(config(&server))
        .mode(mode)
        .queue(&q)
        .concurrency(4)
        .timeout(Duration::from_secs(2));
    let worker = spawn_built(builder, sleeper(started.clone(), dropped.clone())).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, mode).await.unwrap();

    // Quick enough for its own timeout: completes.
    let quick = queue
        .submit_with(
            &50u64,
            JobOptions::default().timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    assert_eq!(quick.result_timeout::<u64>(WAIT).await.unwrap(), 50);

    // Too slow for its own timeout: fails with kind timeout, soon.
    let began = Instant::now();
    let slow = queue
        .submit_with(
            &10_000u64,
            JobOptions::default().timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let err = slow.result_timeout::<u64>(WAIT).await.unwrap_err();
    assert!(
        matches!(&err, Error::JobFailed { kind: FailureKind::Timeout, message, .. } if message.contains("200ms")),
        "{err}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );

    // Without a timeout of its own, the worker's default applies.
    let began = Instant::now();
    let default = queue.submit(&10_000u64).await.unwrap();
    let err = default.result_timeout::<u64>(WAIT).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::JobFailed {
                kind: FailureKind::Timeout,
                ..
            }
        ),
        "{err}"
    );
    let took = began.elapsed();
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(6)).contains(&took),
        "the worker's default of 2 s applied: {took:?}"
    );
    let stats = worker.stop().await;
    assert_eq!((stats.completed, stats.failed), (1, 2), "{stats:?}");
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        2,
        "both slow handlers were dropped"
    );
}

#[tokio::test]
async fn a_slow_handler_times_out_in_simple_mode() {
    a_slow_handler_times_out(Mode::Simple).await;
}

#[tokio::test]
async fn a_slow_handler_times_out_in_recoverable_mode() {
    a_slow_handler_times_out(Mode::Recoverable).await;
}

#[tokio::test]
async fn a_slow_handler_times_out_in_reliable_mode() {
    a_slow_handler_times_out(Mode::Reliable).await;
}

/// A timeout is retried like a handler error: with three attempts, a handler
/// that is slow the first two times completes on the third.
async fn a_timed_out_attempt_is_retried(mode: Mode) {
    let server = RedisServer::start();
    let q = queue_name(&format!("timeout-retry-{mode}"));
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let builder = Worker::builder(config(&server)).mode(mode).queue(&q);
    let worker = spawn_built(builder, move |job: Job<String>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            if job.attempt < 3 {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok::<_, String>(format!("attempt {}", job.attempt))
        }
    })
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, mode).await.unwrap();
    let handle = queue
        .submit_with(
            "x",
            JobOptions::default()
                .timeout(Duration::from_millis(150))
                .max_attempts(3),
        )
        .await
        .unwrap();
    let id = handle.id().to_owned();
    assert_eq!(
        handle.result_timeout::<String>(WAIT).await.unwrap(),
        "attempt 3"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!(
        (status.state, status.attempt, status.stalls),
        (JobState::Completed, 3, 0),
        "timeouts are attempts, not stalls"
    );
    let stats = worker.stop().await;
    assert_eq!((stats.completed, stats.retried), (1, 2), "{stats:?}");
}

#[tokio::test]
async fn a_timed_out_attempt_is_retried_in_recoverable_mode() {
    a_timed_out_attempt_is_retried(Mode::Recoverable).await;
}

#[tokio::test]
async fn a_timed_out_attempt_is_retried_in_reliable_mode() {
    a_timed_out_attempt_is_retried(Mode::Reliable).await;
}

#[tokio::test]
async fn timeouts_out_of_range_are_refused_before_anything_is_written() {
    let server = RedisServer::start();
    let q = queue_name("timeout-range");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let err = queue
        .submit_with("x", JobOptions::default().timeout(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    let err = Worker::builder(config(&server))
        .mode(Mode::Recoverable)
        .queue(&q)
        .timeout(Duration::from_millis(1_000_000_000_001))
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    let pending: i64 = redis::cmd("LLEN")
        .arg(format!("jq:{{{q}}}:pending"))
        .query(&mut server.connection())
        .unwrap();
    assert_eq!(pending, 0);
}
