//! Cancellation (protocol.md 8.11), in recoverable and reliable modes: a
//! cancelled queued or delayed job never runs; a running job's handler is
//! told within milliseconds, or dropped after the cancel grace; the client
//! gets `Error::Cancelled`; a cancel racing a completion leaves exactly one
//! outcome; a finished job is left alone.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use job_async_redis::{
    CancelOutcome, Client, Error, Job, JobOptions, JobState, Mode, Queue, WorkerBuilder,
};
use redis::Commands;
use support::{RedisServer, config, queue_name, spawn_built};

const WAIT: Duration = Duration::from_secs(20);

fn builder(server: &RedisServer, mode: Mode, q: &str) -> WorkerBuilder {
    match mode {
        Mode::Reliable => support::reliable(config(server), q),
        _ => support::recoverable(config(server), q),
    }
    .concurrency(4)
}

async fn open(server: &RedisServer, mode: Mode, label: &str) -> Queue {
    let client = Client::connect(config(server)).await.unwrap();
    client.queue(&queue_name(label), mode).await.unwrap()
}

async fn queued_and_delayed_jobs_never_run(mode: Mode) {
    let server = RedisServer::start();
    let queue = open(&server, mode, "never").await;
    let now = queue.submit(&1u32).await.unwrap();
    let later = queue
        .submit_with(
            &2u32,
            JobOptions::default().delay(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    let kept = queue.submit(&3u32).await.unwrap();
    assert_eq!(
        queue.cancel(now.id()).await.unwrap(),
        CancelOutcome::Cancelled {
            was: JobState::Queued
        }
    );
    assert_eq!(
        later.cancel().await.unwrap(),
        CancelOutcome::Cancelled {
            was: JobState::Queued
        }
    );
    let delayed: usize = server
        .connection()
        .zcard(format!("jq:{{{}}}:delayed", queue.name()))
        .unwrap();
    assert_eq!(delayed, 0, "the delayed job left the delayed set");
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = ran.clone();
    let worker = spawn_built(
        builder(&server, mode, queue.name()),
        move |job: Job<u32>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, String>(job.payload) }
        },
    )
    .await;
    let kept_id = kept.id().to_owned();
    assert_eq!(kept.result_timeout::<u32>(WAIT).await.unwrap(), 3);
    tokio::time::sleep(Duration::from_millis(600)).await; // the delay passes
    for handle in [now, later] {
        let id = handle.id().to_owned();
        match handle.result_timeout::<u32>(WAIT).await {
            Err(Error::Cancelled { job_id, .. }) => assert_eq!(job_id, id),
            other => panic!("{other:?}"),
        }
        let status = queue.status(&id).await.unwrap().unwrap();
        assert_eq!(status.state, JobState::Cancelled);
        assert_eq!(status.attempt, 0, "never started");
    }
    assert_eq!(ran.load(Ordering::SeqCst), 1, "only the kept job ran");
    // Cancelling again says it has finished, and changes nothing.
    let again = queue
        .cancel_many(&[kept_id.as_str(), "no-such-job"])
        .await
        .unwrap();
    assert_eq!(
        again[0],
        CancelOutcome::AlreadyFinished(JobState::Completed)
    );
    assert_eq!(again[1], CancelOutcome::NotFound);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn recoverable_cancelled_queued_and_delayed_jobs_never_run() {
    queued_and_delayed_jobs_never_run(Mode::Recoverable).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reliable_cancelled_queued_and_delayed_jobs_never_run() {
    queued_and_delayed_jobs_never_run(Mode::Reliable).await;
}

async fn a_running_job_is_told_at_once(mode: Mode) {
    let server = RedisServer::start();
    let queue = open(&server, mode, "running").await;
    let (told_tx, mut told) = tokio::sync::mpsc::unbounded_channel();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let worker = spawn_built(
        builder(&server, mode, queue.name()).cancel_grace(Duration::from_secs(5)),
        move |job: Job<u32>| {
            let (told_tx, started_tx) = (told_tx.clone(), started_tx.clone());
            async move {
                started_tx.send(()).unwrap();
                job.cancelled().await;
                told_tx.send(Instant::now()).unwrap();
                Err::<u32, _>("stopped".to_string())
            }
        },
    )
    .await;
    let handle = queue
        .submit_with(&1u32, JobOptions::default().max_attempts(3))
        .await
        .unwrap();
    let id = handle.id().to_owned();
    tokio::time::timeout(WAIT, started.recv()).await.unwrap();
    let cancelled_at = Instant::now();
    assert_eq!(
        queue.cancel(&id).await.unwrap(),
        CancelOutcome::Cancelled {
            was: JobState::Active
        }
    );
    let seen = tokio::time::timeout(WAIT, told.recv())
        .await
        .unwrap()
        .unwrap();
    let delay = seen.saturating_duration_since(cancelled_at);
    assert!(
        delay < Duration::from_millis(100),
        "the handler was told after {delay:?}"
    );
    match handle.result_timeout::<u32>(WAIT).await {
        Err(Error::Cancelled { job_id, .. }) => assert_eq!(job_id, id),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!(status.state, JobState::Cancelled);
    assert_eq!(status.attempt, 1, "never retried");
    let mut con = server.connection();
    let claims: usize = match mode {
        Mode::Reliable => {
            let keys: Vec<String> = con
                .keys(format!("jq:{{{}}}:inflight:*", queue.name()))
                .unwrap();
            keys.iter().map(|k| con.llen::<_, usize>(k).unwrap()).sum()
        }
        _ => con
            .zcard(format!("jq:{{{}}}:leases", queue.name()))
            .unwrap(),
    };
    assert_eq!(claims, 0, "the cancelled job's claim is gone");
    let stats = worker.stop().await;
    assert_eq!((stats.cancelled, stats.failed, stats.retried), (1, 0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn recoverable_a_running_job_is_told_within_100_ms() {
    a_running_job_is_told_at_once(Mode::Recoverable).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reliable_a_running_job_is_told_within_100_ms() {
    a_running_job_is_told_at_once(Mode::Reliable).await;
}

/// Drops record when the handler's future was dropped.
struct Dropped(tokio::sync::mpsc::UnboundedSender<Instant>);

impl Drop for Dropped {
    fn drop(&mut self) {
        let _ = self.0.send(Instant::now());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_that_ignores_the_cancel_is_dropped_after_the_grace() {
    let server = RedisServer::start();
    let queue = open(&server, Mode::Reliable, "stubborn").await;
    let (dropped_tx, mut dropped) = tokio::sync::mpsc::unbounded_channel();
    let worker = spawn_built(
        builder(&server, Mode::Reliable, queue.name()).cancel_grace(Duration::from_millis(50)),
        move |_job: Job<u32>| {
            let guard = Dropped(dropped_tx.clone());
            async move {
                let _guard = guard;
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<u32, String>(0)
            }
        },
    )
    .await;
    let handle = queue.submit(&1u32).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while queue.status(handle.id()).await.unwrap().unwrap().state != JobState::Active {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cancelled_at = Instant::now();
    handle.cancel().await.unwrap();
    let at = tokio::time::timeout(WAIT, dropped.recv())
        .await
        .unwrap()
        .unwrap();
    let after = at.saturating_duration_since(cancelled_at);
    assert!(
        after >= Duration::from_millis(50) && after < Duration::from_millis(500),
        "dropped {after:?} after the cancel (grace 50 ms)"
    );
    assert!(matches!(
        handle.result_timeout::<u32>(WAIT).await,
        Err(Error::Cancelled { .. })
    ));
    assert_eq!(worker.stop().await.cancelled, 1);
}

async fn a_cancel_racing_completion_leaves_one_outcome(mode: Mode) {
    let server = RedisServer::start();
    let queue = open(&server, mode, "race").await;
    let worker = spawn_built(
        builder(&server, mode, queue.name()).concurrency(16),
        |job: Job<u64>| async move {
            // The last job cannot finish before its cancel (so one job at
            // least is cancelled, however fast the worker runs).
            let ms = if job.payload == 299 {
                60_000
            } else {
                job.payload % 7
            };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<u64, String>(job.payload)
        },
    )
    .await;
    let payloads: Vec<u64> = (0..300).collect();
    let handles = queue.submit_many(&payloads).await.unwrap();
    let ids: Vec<String> = handles.iter().map(|h| h.id().to_owned()).collect();
    // One job at least completes before the cancels begin (however slowly
    // the worker starts on a loaded machine).
    queue
        .job(&ids[0])
        .await
        .unwrap()
        .result_timeout::<u64>(WAIT)
        .await
        .unwrap();
    // Cancel each job at a different moment while they run.
    let mut outcomes = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        if i % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        outcomes.push(queue.cancel(id).await.unwrap());
    }
    let mut cancelled = 0;
    for ((handle, id), outcome) in handles.into_iter().zip(&ids).zip(outcomes) {
        let result = handle.result_timeout::<u64>(WAIT).await;
        let state = queue.status(id).await.unwrap().unwrap().state;
        match outcome {
            CancelOutcome::Cancelled { .. } => {
                cancelled += 1;
                assert!(
                    matches!(result, Err(Error::Cancelled { .. })),
                    "{id}: {result:?}"
                );
                assert_eq!(state, JobState::Cancelled, "{id}");
            }
            CancelOutcome::AlreadyFinished(JobState::Completed) => {
                assert!(result.is_ok(), "{id}: {result:?}");
                assert_eq!(state, JobState::Completed, "{id}");
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    assert!(
        cancelled > 0 && cancelled < ids.len(),
        "both outcomes occur ({cancelled} cancelled)"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn recoverable_a_cancel_racing_completion_leaves_exactly_one_outcome() {
    a_cancel_racing_completion_leaves_one_outcome(Mode::Recoverable).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reliable_a_cancel_racing_completion_leaves_exactly_one_outcome() {
    a_cancel_racing_completion_leaves_one_outcome(Mode::Reliable).await;
}

#[tokio::test]
async fn simple_mode_refuses_to_cancel() {
    let server = RedisServer::start();
    let queue = open(&server, Mode::Simple, "simple").await;
    let handle = queue.submit(&1u32).await.unwrap();
    assert!(matches!(
        queue.cancel(handle.id()).await,
        Err(Error::Config(_))
    ));
    assert!(matches!(handle.cancel().await, Err(Error::Config(_))));
}
