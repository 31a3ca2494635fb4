//! The admin API against a real redis-server: discovery, overviews, job
//! lists by state with paging, and one job in full.

mod support;

use std::sync::Arc;
use std::time::Duration;

use job_async_redis::admin::ListState;
use job_async_redis::{Client, Encoding, Error, Job, JobOptions, Mode, Worker};
use redis::Commands;
use support::{RedisServer, config, queue_name, spawn_built};
use tokio::sync::Semaphore;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn queues_are_discovered_by_their_metadata_and_nothing_else() {
    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let names = [queue_name("a"), queue_name("b"), queue_name("c")];
    for (name, mode) in names
        .iter()
        .zip([Mode::Simple, Mode::Recoverable, Mode::Reliable])
    {
        client.queue(name, mode).await.unwrap();
    }
    // Keys that are not a queue's metadata are not queues: another key of a
    // queue, another prefix, and a key of another type at a metadata name.
    let mut con = server.connection();
    let _: () = con.set("jq:{fake}:meta", "x").unwrap();
    let _: () = con.set("other:{q}:meta", "x").unwrap();
    let _: () = con.hset("jq:{nomode}:meta", "created_ms", "1").unwrap();
    let found = client.admin().queues().await.unwrap();
    let mut expected: Vec<(String, String)> = names
        .iter()
        .cloned()
        .zip(["simple", "recoverable", "reliable"].map(String::from))
        .collect();
    expected.sort();
    assert_eq!(
        found
            .iter()
            .map(|q| (q.name.clone(), q.mode.clone()))
            .collect::<Vec<_>>(),
        expected
    );
    assert!(
        found
            .iter()
            .all(|q| q.protocol == "1" && q.created_ms.is_some())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recoverable_queue_is_counted_listed_and_shown() {
    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let name = queue_name("rec");
    let queue = client.queue(&name, Mode::Recoverable).await.unwrap();
    let admin = client.admin();

    // Two jobs run (and stay running: their handler waits), three wait,
    // two are delayed.
    let gate = Arc::new(Semaphore::new(0));
    let held = gate.clone();
    let worker = spawn_built(
        Worker::builder(config(&server))
            .mode(Mode::Recoverable)
            .queue(&name)
            .concurrency(2),
        move |job: Job<u32>| {
            let held = held.clone();
            async move {
                held.acquire().await.unwrap().forget();
                Ok::<u32, String>(job.payload * 10)
            }
        },
    )
    .await;
    let running = queue.submit_many(&[1u32, 2]).await.unwrap();
    assert!(
        support::hostile::wait_until(WAIT, || {
            let active: u64 = server
                .connection()
                .zcard(format!("jq:{{{name}}}:leases"))
                .unwrap();
            active == 2
        })
        .await,
        "two jobs run"
    );
    let waiting: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..3u32 {
            let opts = JobOptions::default().id(format!("w{i}"));
            ids.push(
                queue
                    .submit_with(&(100 + i), opts)
                    .await
                    .unwrap()
                    .id()
                    .to_owned(),
            );
        }
        ids
    };
    for (id, secs) in [("d-late", 7200), ("d-soon", 3600)] {
        let opts = JobOptions::default()
            .id(id)
            .delay(Duration::from_secs(secs));
        queue.submit_with(&0u32, opts).await.unwrap();
    }

    let overview = admin.overview(&name).await.unwrap();
    assert_eq!(overview.mode, "recoverable");
    assert_eq!(
        (
            overview.counts.waiting,
            overview.counts.delayed,
            overview.counts.active,
            overview.counts.dead
        ),
        (3, 2, Some(2), 0)
    );
    assert!(overview.oldest_waiting_age_ms.is_some());
    assert!(!overview.paused && overview.workers.is_empty());

    // Waiting: the next to run first, a page at a time.
    let page = admin.jobs(&name, ListState::Waiting, 0, 2).await.unwrap();
    assert_eq!(page.total, 3);
    assert_eq!(ids(&page.entries), ["w0", "w1"]);
    let page = admin.jobs(&name, ListState::Waiting, 2, 2).await.unwrap();
    assert_eq!(ids(&page.entries), ["w2"]);
    assert!(
        admin
            .jobs(&name, ListState::Waiting, 3, 2)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    assert_eq!(waiting, ["w0", "w1", "w2"]);
    // Delayed: the earliest due first, with its due time.
    let page = admin.jobs(&name, ListState::Delayed, 0, 10).await.unwrap();
    assert_eq!(ids(&page.entries), ["d-soon", "d-late"]);
    assert!(page.entries[0].at_ms < page.entries[1].at_ms);
    // Active: the two running jobs, with their lease deadlines.
    let page = admin.jobs(&name, ListState::Active, 0, 10).await.unwrap();
    let mut active = ids(&page.entries);
    active.sort();
    let mut expected: Vec<String> = running.iter().map(|h| h.id().to_owned()).collect();
    expected.sort();
    assert_eq!(active, expected);
    assert!(
        page.entries
            .iter()
            .all(|e| e.at_ms.unwrap() > overview.now_ms)
    );

    // One job in full: its fields, its payload decoded.
    let job = admin.job(&name, "w1").await.unwrap().unwrap();
    assert_eq!(job.state, "queued");
    assert_eq!(job.payload.json, Some(serde_json::json!(101)));
    assert_eq!(job.fields["enc"], "msgpack");
    assert!(job.result.is_none());
    assert!(admin.job(&name, "no-such-job").await.unwrap().is_none());

    // Once finished: the result, decoded.
    gate.add_permits(10);
    let first = running[0].id().to_owned();
    running
        .into_iter()
        .next()
        .unwrap()
        .result_timeout::<u32>(WAIT)
        .await
        .unwrap();
    let done = admin.job(&name, &first).await.unwrap().unwrap();
    assert_eq!(done.state, "completed");
    assert_eq!(done.result.unwrap().json, Some(serde_json::json!(10)));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reliable_queue_shows_its_workers_and_their_jobs() {
    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let name = queue_name("rel");
    let queue = client
        .queue(&name, Mode::Reliable)
        .await
        .unwrap()
        .with_encoding(Encoding::Json);
    let gate = Arc::new(Semaphore::new(0));
    let held = gate.clone();
    let worker = spawn_built(
        Worker::builder(config(&server))
            .mode(Mode::Reliable)
            .queue(&name)
            .concurrency(3),
        move |job: Job<String>| {
            let held = held.clone();
            async move {
                held.acquire().await.unwrap().forget();
                Ok::<String, String>(job.payload)
            }
        },
    )
    .await;
    let handles = queue
        .submit_many(&["a", "b", "c", "d", "e"].map(String::from))
        .await
        .unwrap();
    let admin = client.admin();
    // The worker starts three (however slowly, on a loaded machine).
    let deadline = std::time::Instant::now() + WAIT;
    let mut overview = admin.overview(&name).await.unwrap();
    while overview.counts.active != Some(3) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        overview = admin.overview(&name).await.unwrap();
    }
    assert_eq!(
        (overview.counts.waiting, overview.counts.active),
        (2, Some(3))
    );
    assert_eq!(overview.workers.len(), 1);
    let w = &overview.workers[0];
    assert_eq!(w.in_flight, 3);
    assert!(w.heartbeat_left_ms > 0, "{w:?}");
    let page = admin.jobs(&name, ListState::Active, 1, 10).await.unwrap();
    assert_eq!((page.total, page.entries.len()), (3, 2));
    assert!(
        page.entries
            .iter()
            .all(|e| e.worker.as_deref() == Some(w.id.as_str()))
    );
    // A JSON payload is shown as JSON.
    let job = admin.job(&name, handles[4].id()).await.unwrap().unwrap();
    assert_eq!(job.payload.json, Some(serde_json::json!("e")));

    // Dead jobs, newest first: two entries of the dead-letter set.
    let mut con = server.connection();
    let _: () = con
        .zadd_multiple(
            format!("jq:{{{name}}}:dead_jobs"),
            &[(1_000, "old-dead"), (2_000, "new-dead")],
        )
        .unwrap();
    let page = admin.jobs(&name, ListState::Dead, 0, 10).await.unwrap();
    assert_eq!(ids(&page.entries), ["new-dead", "old-dead"]);
    assert_eq!(page.entries[0].at_ms, Some(2_000));
    gate.add_permits(10);
    for h in handles {
        h.result_timeout::<String>(WAIT).await.unwrap();
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_queues_simple_mode_and_undecodable_payloads_are_told_apart() {
    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let admin = client.admin();
    let missing = queue_name("missing");
    assert!(matches!(
        admin.overview(&missing).await,
        Err(Error::QueueNotRegistered { .. })
    ));
    assert!(matches!(
        admin.overview("bad{name").await,
        Err(Error::InvalidName(_))
    ));
    let simple = queue_name("simple");
    let queue = client.queue(&simple, Mode::Simple).await.unwrap();
    queue.submit(&1u32).await.unwrap();
    let overview = admin.overview(&simple).await.unwrap();
    assert_eq!((overview.counts.waiting, overview.counts.active), (1, None));
    assert!(matches!(
        admin.jobs(&simple, ListState::Waiting, 0, 10).await,
        Err(Error::Config(_))
    ));
    assert!(matches!(
        admin.job(&simple, "x").await,
        Err(Error::Config(_))
    ));

    // A payload that does not decode is shown as bytes, with the reason.
    let rec = queue_name("rec");
    client.queue(&rec, Mode::Recoverable).await.unwrap();
    let mut con = server.connection();
    let _: () = con
        .hset_multiple(
            format!("jq:{{{rec}}}:job:raw"),
            &[
                ("state", &b"queued"[..]),
                ("enc", b"msgpack"),
                ("payload", b"\xc1\xff"),
            ],
        )
        .unwrap();
    let job = admin.job(&rec, "raw").await.unwrap().unwrap();
    assert_eq!(job.payload.json, None);
    let (why, hex) = job.payload.undecoded.unwrap();
    assert_eq!(hex, "c1ff");
    assert!(!why.is_empty());

    // A key of another type is named as the queue's keys.
    let _: () = con.set(format!("jq:{{{rec}}}:pending"), "x").unwrap();
    match admin.overview(&rec).await {
        Err(Error::WrongType { key, .. }) => assert_eq!(key, format!("jq:{{{rec}}}:*")),
        other => panic!("{other:?}"),
    }
}

fn ids(entries: &[job_async_redis::admin::JobEntry]) -> Vec<String> {
    entries.iter().map(|e| e.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_and_failed_jobs_are_requeued_with_all_their_attempts_and_run_again() {
    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let name = queue_name("requeue");
    let queue = client.queue(&name, Mode::Reliable).await.unwrap();
    let admin = client.admin();

    // Failed for real: the handler fails while the switch is off.
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let switch = healthy.clone();
    let worker = spawn_built(
        Worker::builder(config(&server))
            .mode(Mode::Reliable)
            .queue(&name),
        move |job: Job<u32>| {
            let ok = switch.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                if ok {
                    Ok(job.payload + 1)
                } else {
                    Err(format!("job {} failed", job.payload))
                }
            }
        },
    )
    .await;
    let failed = queue.submit_many(&[1u32, 2]).await.unwrap();
    let failed_ids: Vec<String> = failed.iter().map(|h| h.id().to_owned()).collect();
    for h in failed {
        assert!(h.result_timeout::<u32>(WAIT).await.is_err());
    }
    // Dead letters: 2,500 jobs written as the start scripts leave them, a
    // stale entry (its job completed) and an entry that is not a job.
    let mut con = server.connection();
    let mut pipe = redis::pipe();
    for i in 0..2500u32 {
        let id = format!("dead-{i:04}");
        pipe.hset_multiple(
            format!("jq:{{{name}}}:job:{id}"),
            &[
                ("state", "dead".as_bytes().to_vec()),
                ("enc", b"msgpack".to_vec()),
                ("payload", rmp_serde::to_vec(&i).unwrap()),
                ("attempt", b"1".to_vec()),
                ("stalls", b"4".to_vec()),
                ("error_kind", b"stalled".to_vec()),
            ],
        )
        .ignore()
        .pexpire(format!("jq:{{{name}}}:job:{id}"), 86_400_000)
        .ignore()
        .zadd(format!("jq:{{{name}}}:dead_jobs"), &id, i)
        .ignore();
    }
    let _: () = pipe.query(&mut con).unwrap();
    let _: () = con
        .hset(format!("jq:{{{name}}}:job:stale"), "state", "completed")
        .unwrap();
    let _: () = con
        .zadd(format!("jq:{{{name}}}:dead_jobs"), "stale", 9_000)
        .unwrap();
    let _: () = con.set(format!("jq:{{{name}}}:job:odd"), "x").unwrap();
    let _: () = con
        .zadd(format!("jq:{{{name}}}:dead_jobs"), "odd", 9_001)
        .unwrap();

    // By ID: the failed jobs, a missing one, and a completed one whose
    // entry in the dead-letter set was stale (it leaves the set).
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut ids = failed_ids.clone();
    ids.extend(["nobody".to_owned(), "stale".to_owned()]);
    let outcomes = admin.requeue(&name, &ids).await.unwrap();
    use job_async_redis::admin::Requeued;
    assert_eq!(
        outcomes,
        [
            Requeued::Requeued,
            Requeued::Requeued,
            Requeued::Missing,
            Requeued::Unchanged("completed".into())
        ]
    );

    // Every dead job, in batches of 1,000, stopping nowhere.
    let mut seen = Vec::new();
    let progress = admin
        .requeue_dead(&name, 1000, None, |p| {
            seen.push(p.requeued);
            true
        })
        .await
        .unwrap();
    assert_eq!(seen, [1000, 2000, 2500]);
    assert_eq!(
        (progress.requeued, progress.skipped, progress.remaining),
        (2500, 1, 1)
    );
    let left: Vec<String> = con
        .zrange(format!("jq:{{{name}}}:dead_jobs"), 0, -1)
        .unwrap();
    assert_eq!(left, ["odd"], "only the entry that is not a job stays");
    // They all run, and complete.
    let handle = queue.job("dead-2499").await.unwrap();
    assert_eq!(handle.result_timeout::<u32>(WAIT).await.unwrap(), 2500);
    for id in &failed_ids {
        let h = queue.job(id).await.unwrap();
        h.result_timeout::<u32>(WAIT).await.unwrap();
    }
    assert!(
        support::hostile::wait_until(WAIT, || {
            let mut con = server.connection();
            let pending: u64 = con.llen(format!("jq:{{{name}}}:pending")).unwrap();
            pending == 0
        })
        .await
    );
    let ttl: i64 = con.pttl(format!("jq:{{{name}}}:job:dead-0000")).unwrap();
    assert!(ttl > 0, "finished again, the job expires again");
    worker.stop().await;

    // Stopped after the first batch, the rest stays dead.
    let more = queue_name("stop");
    client.queue(&more, Mode::Recoverable).await.unwrap();
    let mut pipe = redis::pipe();
    for i in 0..30u32 {
        pipe.hset_multiple(
            format!("jq:{{{more}}}:job:d{i}"),
            &[
                ("state", "dead"),
                ("attempt", "3"),
                ("stalls", "4"),
                ("finished_ms", "5"),
            ],
        )
        .ignore()
        .pexpire(format!("jq:{{{more}}}:job:d{i}"), 86_400_000)
        .ignore()
        .zadd(format!("jq:{{{more}}}:dead_jobs"), format!("d{i}"), i)
        .ignore();
    }
    let _: () = pipe.query(&mut con).unwrap();
    let progress = admin
        .requeue_dead(&more, 10, None, |_| false)
        .await
        .unwrap();
    assert_eq!((progress.requeued, progress.remaining), (10, 20));
    let tickets: u64 = con.llen(format!("jq:{{{more}}}:tickets")).unwrap();
    assert_eq!(tickets, 10, "recoverable mode: one ticket per requeued job");
    // A requeued job starts over: queued, no attempt or stall, no expiry.
    let job = admin.job(&more, "d0").await.unwrap().unwrap();
    assert_eq!(job.state, "queued");
    assert!(
        ["attempt", "stalls", "finished_ms"]
            .iter()
            .all(|f| !job.fields.contains_key(*f))
    );
    let ttl: i64 = con.pttl(format!("jq:{{{more}}}:job:d0")).unwrap();
    assert_eq!(ttl, -1);
    let progress = admin
        .requeue_dead(&more, 1000, Some(5), |_| true)
        .await
        .unwrap();
    assert_eq!((progress.requeued, progress.remaining), (5, 15));
}
