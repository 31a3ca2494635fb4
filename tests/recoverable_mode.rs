//! Recoverable mode against a real redis-server: job state in Redis,
//! results that wait for their client, stalled jobs requeued.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use job_async_redis::{
    Client, Encoding, Error, FailureKind, Job, JobOptions, JobState, Mode, Worker,
};
use redis::Commands;
use support::{
    RedisServer, StallingWorker, config, eventually, queue_name, recoverable, reverse, spawn_built,
};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn jobs_complete_in_both_encodings_and_status_follows_them() {
    let server = RedisServer::start();
    let q = queue_name("rec");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let handle = queue.submit("queued first").await.unwrap();
    let id = handle.id().to_owned();
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!((status.state, status.attempt), (JobState::Queued, 0));

    let worker = spawn_built(recoverable(config(&server), &q).concurrency(4), reverse).await;
    assert_eq!(
        handle.result_timeout::<String>(WAIT).await.unwrap(),
        "tsrif deueuq"
    );
    for enc in [Encoding::MessagePack, Encoding::Json] {
        let queue = queue.clone().with_encoding(enc);
        let texts: Vec<String> = (0..200).map(|i| format!("{enc:?} {i} ✓")).collect();
        for (t, h) in texts.iter().zip(queue.submit_many(&texts).await.unwrap()) {
            assert_eq!(
                h.result_timeout::<String>(WAIT).await.unwrap(),
                t.chars().rev().collect::<String>()
            );
        }
    }
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!(
        (status.state, status.attempt, status.stalls),
        (JobState::Completed, 1, 0)
    );
    assert!(status.submitted_ms <= status.started_ms && status.started_ms <= status.finished_ms);
    assert!(status.worker.is_some());
    assert_eq!(worker.stop().await.completed, 401);
}

#[tokio::test]
async fn a_client_restarted_between_submit_and_completion_still_gets_the_result() {
    let server = RedisServer::start();
    let q = queue_name("restart-client");
    let first = Client::connect(config(&server)).await.unwrap();
    let ids: Vec<String> = first
        .queue(&q, Mode::Recoverable)
        .await
        .unwrap()
        .submit_many(&["one".to_string(), "two".to_string()])
        .await
        .unwrap()
        .iter()
        .map(|h| h.id().to_owned())
        .collect();
    drop(first); // the submitting process goes away

    // A new client asks for the first job before any worker ran it...
    let second = Client::connect(config(&server)).await.unwrap();
    let queue = second.queue(&q, Mode::Recoverable).await.unwrap();
    let waiting = tokio::spawn(
        queue
            .job(&ids[0])
            .await
            .unwrap()
            .result_timeout::<String>(WAIT),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let worker = spawn_built(recoverable(config(&server), &q), reverse).await;
    assert_eq!(waiting.await.unwrap().unwrap(), "eno");
    // ...and for the second one after it finished: the result waited in Redis.
    eventually("the second job finished", || {
        let state: Option<String> = server
            .connection()
            .hget(format!("jq:{{{q}}}:job:{}", ids[1]), "state")
            .unwrap();
        state.as_deref() == Some("completed")
    })
    .await;
    let third = Client::connect(config(&server)).await.unwrap();
    let late = third
        .queue(&q, Mode::Recoverable)
        .await
        .unwrap()
        .job(&ids[1])
        .await
        .unwrap();
    assert_eq!(late.result_timeout::<String>(WAIT).await.unwrap(), "owt");
    worker.stop().await;
}

type Reply = std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>;

/// A handler that hangs forever on a job's first attempt.
fn hang_first(
    started: Arc<AtomicUsize>,
) -> impl Fn(Job<String>) -> Reply + Clone + Send + Sync + 'static {
    move |job: Job<String>| {
        started.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if job.attempt == 1 {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok(format!("{} on attempt {}", job.payload, job.attempt))
        })
    }
}

#[tokio::test]
async fn a_worker_killed_mid_job_has_its_job_completed_by_another_after_the_lease() {
    let server = RedisServer::start();
    let q = queue_name("killed");
    let started = Arc::new(AtomicUsize::new(0));
    let doomed = spawn_built(
        recoverable(config(&server), &q),
        hang_first(started.clone()),
    )
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let handle = queue.submit("work").await.unwrap();
    let id = handle.id().to_owned();
    eventually("the first attempt started", || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    doomed.task.abort(); // no cleanup, no heartbeat: as if the process died
    let rescuer = spawn_built(
        recoverable(config(&server), &q),
        hang_first(started.clone()),
    )
    .await;
    assert_eq!(
        handle.result_timeout::<String>(WAIT).await.unwrap(),
        "work on attempt 2"
    );
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!(
        (status.state, status.attempt, status.stalls),
        (JobState::Completed, 2, 1)
    );
    assert_eq!(rescuer.stop().await.completed, 1);
}

#[tokio::test]
async fn a_zombie_completion_is_refused_and_the_new_attempt_stands() {
    let server = RedisServer::start();
    let q = queue_name("zombie");
    support::zombie_is_refused(&server, &q, Mode::Recoverable, |c| {
        recoverable(c, &q).lease(Duration::from_millis(300))
    })
    .await;
}

#[tokio::test]
async fn a_job_that_stalls_past_the_limit_is_dead_lettered_and_its_client_told() {
    let server = RedisServer::start();
    let q = queue_name("poison");
    // Two workers die while running it; the limit is one stall.
    support::poison_pill_is_dead_lettered(
        &server,
        &q,
        Mode::Recoverable,
        |c| recoverable(c, &q).max_stalls(1),
        1,
    )
    .await;
}

#[tokio::test]
async fn finished_job_hashes_expire_after_the_result_ttl() {
    let server = RedisServer::start();
    let q = queue_name("ttl");
    let worker = spawn_built(
        recoverable(config(&server), &q).result_ttl(Duration::from_millis(300)),
        reverse,
    )
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let handle = queue.submit("short-lived").await.unwrap();
    let id = handle.id().to_owned();
    handle.result_timeout::<String>(WAIT).await.unwrap();
    let key = format!("jq:{{{q}}}:job:{id}");
    let ttl: i64 = server.connection().pttl(&key).unwrap();
    assert!(ttl > 0 && ttl <= 300, "pttl {ttl}");
    eventually("the job hash expired", || {
        !server.connection().exists::<_, bool>(&key).unwrap()
    })
    .await;
    assert_eq!(queue.status(&id).await.unwrap(), None);
    let err = queue
        .job(&id)
        .await
        .unwrap()
        .result_timeout::<String>(WAIT)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::JobNotFound { .. }), "{err}");
    worker.stop().await;
}

#[tokio::test]
async fn a_batch_of_10000_jobs_is_one_script_call() {
    let server = RedisServer::start();
    let q = queue_name("batch");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let numbers: Vec<u32> = (0..10_000).collect();
    let mut admin = server.connection();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut admin)
        .unwrap();
    let handles = queue.submit_many(&numbers).await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut admin)
        .unwrap();
    let evalsha = info
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .unwrap();
    assert!(evalsha.starts_with("cmdstat_evalsha:calls=1,"), "{evalsha}");
    let len: usize = admin.llen(format!("jq:{{{q}}}:pending")).unwrap();
    assert_eq!(len, 10_000);
    let worker = spawn_built(
        recoverable(config(&server), &q).concurrency(50),
        |job: Job<u32>| async move { Ok::<_, String>(job.payload * 2) },
    )
    .await;
    for (n, h) in numbers.iter().zip(handles) {
        assert_eq!(h.result_timeout::<u32>(WAIT).await.unwrap(), n * 2);
    }
    assert_eq!(worker.stop().await.completed, 10_000);
}

#[tokio::test]
async fn failures_are_retried_up_to_max_attempts() {
    let server = RedisServer::start();
    let q = queue_name("retry");
    let worker = spawn_built(
        recoverable(config(&server), &q),
        |job: Job<u32>| async move {
            if job.attempt < job.payload {
                return Err(format!("attempt {} failed", job.attempt));
            }
            Ok(job.attempt)
        },
    )
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    // Succeeds on its third attempt, which it is allowed.
    let ok = queue
        .submit_with(&3u32, JobOptions::default().max_attempts(3))
        .await
        .unwrap();
    assert_eq!(ok.result_timeout::<u32>(WAIT).await.unwrap(), 3);
    // Would succeed on its third attempt, but may only have two.
    let failing = queue
        .submit_with(&3u32, JobOptions::default().max_attempts(2))
        .await
        .unwrap();
    let id = failing.id().to_owned();
    let err = failing.result_timeout::<u32>(WAIT).await.unwrap_err();
    assert!(
        matches!(&err, Error::JobFailed { kind: FailureKind::Handler, message, .. } if message == "attempt 2 failed"),
        "{err}"
    );
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!((status.state, status.attempt), (JobState::Failed, 2));
    assert_eq!(
        status.error,
        Some((FailureKind::Handler, "attempt 2 failed".into()))
    );
    let stats = worker.stop().await;
    assert_eq!((stats.completed, stats.failed, stats.retried), (1, 1, 3));
}

#[tokio::test]
async fn an_undecodable_payload_fails_without_retry() {
    let server = RedisServer::start();
    let q = queue_name("undecodable");
    let worker = spawn_built(
        recoverable(config(&server), &q),
        |job: Job<u64>| async move { Ok::<_, String>(job.payload) },
    )
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let bad = queue
        .submit_with("text", JobOptions::default().max_attempts(5))
        .await
        .unwrap();
    let err = bad.result_timeout::<u64>(WAIT).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::JobFailed {
                kind: FailureKind::Decode,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        queue
            .submit(&7u64)
            .await
            .unwrap()
            .result_timeout::<u64>(WAIT)
            .await
            .unwrap(),
        7
    );
    let stats = worker.stop().await;
    assert_eq!((stats.failed, stats.retried), (1, 0));
}

#[tokio::test]
async fn queues_are_served_in_priority_order() {
    let server = RedisServer::start();
    let (high, low) = (queue_name("high"), queue_name("low"));
    let client = Client::connect(config(&server)).await.unwrap();
    let hq = client.queue(&high, Mode::Recoverable).await.unwrap();
    let lq = client.queue(&low, Mode::Recoverable).await.unwrap();
    let mut handles = lq
        .submit_many(&(0..10).map(|i| format!("low{i}")).collect::<Vec<_>>())
        .await
        .unwrap();
    handles.extend(
        hq.submit_many(&(0..10).map(|i| format!("high{i}")).collect::<Vec<_>>())
            .await
            .unwrap(),
    );
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = order.clone();
    let builder = Worker::builder(config(&server))
        .mode(Mode::Recoverable)
        .queue(&high)
        .queue(&low)
        .concurrency(1);
    let worker = spawn_built(builder, move |job: Job<String>| {
        seen.lock().unwrap().push(job.payload.clone());
        async move { Ok::<_, String>(()) }
    })
    .await;
    for h in handles {
        h.result_timeout::<()>(WAIT).await.unwrap();
    }
    worker.stop().await;
    let expected: Vec<String> = (0..10)
        .map(|i| format!("high{i}"))
        .chain((0..10).map(|i| format!("low{i}")))
        .collect();
    assert_eq!(*order.lock().unwrap(), expected);
}

#[tokio::test]
async fn shutdown_returns_jobs_still_running_after_the_grace_period() {
    let server = RedisServer::start();
    let q = queue_name("release");
    let started = Arc::new(AtomicUsize::new(0));
    let builder = recoverable(config(&server), &q).grace_period(Duration::from_millis(100));
    let first = spawn_built(builder, hang_first(started.clone())).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let handle = queue.submit("deploy").await.unwrap();
    let id = handle.id().to_owned();
    eventually("the job started", || started.load(Ordering::SeqCst) == 1).await;
    let stats = first.stop().await;
    assert_eq!(stats.returned, 1);
    // Back on the queue at once, its attempt not counted, no stall.
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!(
        (status.state, status.attempt, status.stalls),
        (JobState::Queued, 0, 0)
    );
    let second = spawn_built(
        recoverable(config(&server), &q),
        hang_first(started.clone()),
    )
    .await;
    // hang_first hangs on attempt 1: the released attempt did not count, so
    // the job hangs again; what matters is that it was taken at once.
    eventually("the job restarted", || started.load(Ordering::SeqCst) == 2).await;
    second.task.abort();
    drop(handle);
}

#[tokio::test]
async fn duplicate_ids_and_wrong_modes_are_refused_without_writing() {
    let server = RedisServer::start();
    let q = queue_name("dupe");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    queue
        .submit_with("a", JobOptions::default().id("order-42"))
        .await
        .unwrap();
    let err = queue
        .submit_with("b", JobOptions::default().id("order-42"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateJob { job_id, .. } if job_id == "order-42"),
        "{err}"
    );
    let len: usize = server
        .connection()
        .llen(format!("jq:{{{q}}}:pending"))
        .unwrap();
    assert_eq!(len, 1);
    let err = client.queue(&q, Mode::Simple).await.unwrap_err();
    assert!(matches!(err, Error::ModeMismatch { .. }), "{err}");
    let err = Worker::builder(config(&server))
        .queue(&q)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ModeMismatch { .. }), "{err}");
    assert!(matches!(queue.status("nope").await, Ok(None)));
}

#[tokio::test]
async fn a_late_completion_is_accepted_when_nobody_else_took_the_job() {
    let server = RedisServer::start();
    let q = queue_name("late");
    // A worker that stalls past its lease; it will not sweep by itself
    // after start-up.
    let builder = recoverable(config(&server), &q)
        .lease(Duration::from_millis(200))
        .sweep_interval(Duration::from_secs(3600));
    let worker = StallingWorker::spawn(builder, Duration::from_millis(800));
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let handle = queue.submit("x").await.unwrap();
    let id = handle.id().to_owned();
    let mut con = server.connection();
    let leases = format!("jq:{{{q}}}:leases");
    eventually("the job was claimed", || {
        con.zcard::<_, usize>(&leases).unwrap() == 1
    })
    .await;
    // While the worker is stalled, its lease runs out and a sweep (another
    // program) puts the job back; nobody takes it before the worker wakes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sweep = job_async_redis::scripts::all()
        .iter()
        .find(|s| s.name() == "job_requeue_stale")
        .unwrap();
    let requeued: i64 = redis::Script::new(sweep.source())
        .key(&leases)
        .key(format!("jq:{{{q}}}:pending"))
        .key(format!("jq:{{{q}}}:tickets"))
        .key(format!("jq:{{{q}}}:sweep-by-test"))
        .key(format!("jq:{{{q}}}:gate"))
        .arg(1000)
        .arg(100)
        .invoke(&mut con)
        .unwrap();
    assert_eq!(requeued, 1);
    assert_eq!(
        handle.result_timeout::<String>(WAIT).await.unwrap(),
        "attempt 1"
    );
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!(
        (status.state, status.attempt, status.stalls),
        (JobState::Completed, 1, 0)
    );
    // The requeued ID is skipped when claimed again: the job does not rerun.
    eventually("the stale ID was consumed", || {
        con.llen::<_, usize>(format!("jq:{{{q}}}:pending")).unwrap() == 0
    })
    .await;
    let stats = worker.stop();
    assert_eq!((stats.completed, stats.lease_lost), (1, 0), "{stats:?}");
}

#[tokio::test]
async fn outcomes_of_every_size_arrive_with_the_doorbell() {
    let server = RedisServer::start();
    let q = queue_name("doorbell");
    let worker = spawn_built(
        recoverable(config(&server), &q),
        |job: Job<usize>| async move {
            if job.payload == 0 {
                return Err("é".repeat(40_000)); // a long failure message (str32)
            }
            Ok(serde_bytes::ByteBuf::from(
                (0..job.payload)
                    .map(|i| (i % 256) as u8)
                    .collect::<Vec<u8>>(),
            ))
        },
    )
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    // Lengths that take each MessagePack bin header: 8, 16 and 32 bits.
    for len in [1usize, 200, 1000, 70_000] {
        let bytes: serde_bytes::ByteBuf = queue
            .submit(&len)
            .await
            .unwrap()
            .result_timeout(WAIT)
            .await
            .unwrap();
        assert_eq!(bytes.len(), len);
        assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 256) as u8));
    }
    let err = queue
        .submit(&0usize)
        .await
        .unwrap()
        .result_timeout::<serde_bytes::ByteBuf>(WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::JobFailed { kind: FailureKind::Handler, message, .. } if *message == "é".repeat(40_000))
    );
    worker.stop().await;
}

#[tokio::test]
async fn outcomes_finished_together_reach_their_client_in_one_message() {
    use futures_util::StreamExt;
    let server = RedisServer::start();
    let q = queue_name("grouped");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let mut watch = redis::Client::open(server.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    watch
        .subscribe(format!("jq:{{{q}}}:reply:{}", client.id()))
        .await
        .unwrap();
    let texts: Vec<String> = (0..20).map(|i| format!("job {i}")).collect();
    let handles = queue.submit_many(&texts).await.unwrap();
    // Twenty handlers that return at the same moment: their outcomes wait
    // for the finisher together.
    let gate = Arc::new(tokio::sync::Barrier::new(20));
    let worker = spawn_built(recoverable(config(&server), &q).concurrency(20), {
        move |job: Job<String>| {
            let gate = gate.clone();
            async move {
                gate.wait().await;
                reverse(job).await
            }
        }
    })
    .await;
    for (text, handle) in texts.iter().zip(handles) {
        let out: String = handle.result_timeout(WAIT).await.unwrap();
        assert_eq!(out, text.chars().rev().collect::<String>());
    }
    let mut messages = watch.on_message();
    let mut seen = Vec::new();
    let mut arrays = 0;
    while seen.len() < 20 {
        let message = tokio::time::timeout(WAIT, messages.next())
            .await
            .unwrap()
            .unwrap();
        let value: rmpv::Value = rmp_serde::from_slice(message.get_payload_bytes()).unwrap();
        let records = match value {
            rmpv::Value::Array(records) => {
                arrays += 1;
                records
            }
            record => vec![record],
        };
        for record in records {
            let id = record["id"].as_str().unwrap().to_owned();
            assert_eq!(record["status"].as_str(), Some("completed"));
            seen.push(id);
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 20, "each outcome once");
    assert!(arrays >= 1, "no grouped doorbell among the messages");
    assert_eq!(worker.stop().await.completed, 20);
}

#[tokio::test]
async fn a_job_whose_own_lease_is_shorter_than_the_workers_is_renewed_in_time() {
    let server = RedisServer::start();
    let q = queue_name("short-lease");
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    // The worker's default lease is 30 s (renewed every 10 s); the job's own
    // lease is 300 ms and its handler takes a second: only renewals every
    // third of the job's own lease keep it from being swept and run again.
    let worker = spawn_built(
        Worker::builder(config(&server))
            .mode(Mode::Recoverable)
            .queue(&q)
            .lease(Duration::from_secs(30))
            .sweep_interval(Duration::from_millis(50)),
        move |job: Job<String>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                Ok::<_, String>(job.payload)
            }
        },
    )
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let handle = queue
        .submit_with(
            "kept",
            JobOptions::default().lease(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    let id = handle.id().to_owned();
    assert_eq!(handle.result_timeout::<String>(WAIT).await.unwrap(), "kept");
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!((status.attempt, status.stalls), (1, 0), "{status:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the job ran once");
    assert_eq!(worker.stop().await.completed, 1);
}

/// Several handles of one client on one job (its submit's and two from
/// `Queue::job`) all get its outcome: none takes it from the others.
#[tokio::test(flavor = "multi_thread")]
async fn several_handles_on_one_job_all_get_its_outcome() {
    let server = RedisServer::start();
    let q = queue_name("handles");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let submitted = queue.submit("abc").await.unwrap();
    let first = queue.job(submitted.id()).await.unwrap();
    let second = queue.job(submitted.id()).await.unwrap();
    drop(queue.job(submitted.id()).await.unwrap()); // a dropped one takes nothing
    let worker = spawn_built(support::recoverable(config(&server), &q), reverse).await;
    for handle in [submitted, first, second] {
        let got: String = handle
            .result_timeout(Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(got, "cba");
    }
    worker.stop().await;
}
