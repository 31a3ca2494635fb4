//! Reliable mode against a real redis-server: atomic hand-off into
//! per-worker in-flight lists, dead-worker recovery, fenced completion.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use job_async_redis::{Client, Encoding, Error, Job, JobState, Mode, Worker};
use redis::Commands;
use support::{RedisServer, config, eventually, queue_name, reliable, reverse, spawn_built};

const WAIT: Duration = Duration::from_secs(15);

fn workers_key(q: &str) -> String {
    format!("jq:{{{q}}}:workers")
}

/// A worker that shut down stays in the worker set, marked dead (deadline
/// in the past), until the retention: recovery passes meanwhile find any ID
/// a BLMOVE abandoned at shutdown moved into its list after it left.
fn assert_left(con: &mut redis::Connection, q: &str) {
    let workers: Vec<(String, f64)> = con.zrange_withscores(workers_key(q), 0, -1).unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64;
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert!(
        workers[0].1 < now_ms,
        "a worker that left is marked dead: {workers:?}"
    );
}

#[tokio::test]
async fn jobs_complete_and_nothing_stays_in_flight() {
    let server = RedisServer::start();
    let q = queue_name("rel");
    let worker = spawn_built(reliable(config(&server), &q).concurrency(8), reverse).await;
    let client = Client::connect(config(&server)).await.unwrap();
    for enc in [Encoding::MessagePack, Encoding::Json] {
        let queue = client
            .queue(&q, Mode::Reliable)
            .await
            .unwrap()
            .with_encoding(enc);
        let texts: Vec<String> = (0..300).map(|i| format!("{enc:?} {i}")).collect();
        for (t, h) in texts.iter().zip(queue.submit_many(&texts).await.unwrap()) {
            assert_eq!(
                h.result_timeout::<String>(WAIT).await.unwrap(),
                t.chars().rev().collect::<String>()
            );
        }
    }
    let mut con = server.connection();
    let workers: Vec<String> = con.zrange(workers_key(&q), 0, -1).unwrap();
    assert_eq!(workers.len(), 1, "the worker is registered while it runs");
    assert_eq!(worker.stop().await.completed, 600);
    assert_left(&mut con, &q);
    let keys: Vec<String> = con.keys(format!("jq:{{{q}}}:inflight:*")).unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn a_reliable_worker_serves_exactly_one_queue() {
    let server = RedisServer::start();
    let err = Worker::builder(config(&server))
        .mode(Mode::Reliable)
        .queue("a")
        .queue("b")
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
}

#[tokio::test]
async fn the_heartbeat_keeps_a_long_job_alive() {
    let server = RedisServer::start();
    let q = queue_name("long");
    let worker = spawn_built(
        reliable(config(&server), &q).lease(Duration::from_millis(300)),
        |job: Job<u64>| async move {
            tokio::time::sleep(Duration::from_millis(job.payload)).await;
            Ok::<_, String>(job.attempt)
        },
    )
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    let h = queue.submit(&1200u64).await.unwrap();
    let id = h.id().to_owned();
    assert_eq!(
        h.result_timeout::<u32>(WAIT).await.unwrap(),
        1,
        "ran once, four leases long"
    );
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!((status.attempt, status.stalls), (1, 0));
    worker.stop().await;
}

#[tokio::test]
async fn a_worker_killed_between_blmove_and_start_has_its_job_recovered() {
    let server = RedisServer::start();
    let q = queue_name("between");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    let handle = queue.submit("orphan").await.unwrap();
    let id = handle.id().to_owned();
    // A worker "w-dead" registered, moved the ID into its in-flight list
    // (as BLMOVE does), and died before reliable_start.
    let mut con = server.connection();
    let _: () = con.zadd(workers_key(&q), "w-dead", 1).unwrap(); // heartbeat long expired
    let moved: Option<String> = redis::cmd("LMOVE")
        .arg(format!("jq:{{{q}}}:pending"))
        .arg(format!("jq:{{{q}}}:inflight:w-dead"))
        .arg("RIGHT")
        .arg("LEFT")
        .query(&mut con)
        .unwrap();
    assert_eq!(moved.as_deref(), Some(id.as_str()));
    let worker = spawn_built(reliable(config(&server), &q), reverse).await;
    assert_eq!(
        handle.result_timeout::<String>(WAIT).await.unwrap(),
        "nahpro"
    );
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!(
        (status.attempt, status.stalls),
        (1, 0),
        "never started: no stall counted"
    );
    let left: usize = con.llen(format!("jq:{{{q}}}:inflight:w-dead")).unwrap();
    assert_eq!(left, 0);
    worker.stop().await;
}

/// The CLIENT ID of the connection blocked in BLMOVE, if one is.
fn blocked_in_blmove(server: &RedisServer) -> Option<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut server.connection())
        .unwrap();
    list.lines()
        .find(|l| l.contains("cmd=blmove"))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
}

/// While the worker is blocked in BLMOVE: creates job `id` and moves it into
/// the worker's in-flight list in one transaction, as if its BLMOVE had
/// moved it, then kills the blocked connection, so that the reply is lost.
fn lose_a_move_reply(server: &RedisServer, q: &str, worker_id: &str, id: &str, payload: &str) {
    let mut con = server.connection();
    let submit = job_async_redis::scripts::all()
        .iter()
        .find(|s| s.name() == "job_submit")
        .unwrap();
    let base = format!("jq:{{{q}}}");
    let (): () = redis::pipe()
        .atomic()
        .cmd("EVALSHA")
        .arg(submit.sha1())
        .arg(7)
        .arg(format!("{base}:meta"))
        .arg(format!("{base}:pending"))
        .arg(format!("{base}:tickets"))
        .arg(format!("{base}:delayed"))
        .arg(format!("{base}:clock"))
        .arg(format!("{base}:events"))
        .arg(format!("{base}:job:{id}"))
        .arg("reliable")
        .arg("1")
        .arg(id)
        .arg("msgpack")
        .arg(rmp_serde::to_vec(payload).unwrap())
        .arg("")
        .arg("0")
        .arg("1")
        .arg("0")
        .arg("0")
        .arg("0")
        .arg("")
        .arg("")
        .ignore()
        .cmd("LMOVE")
        .arg(format!("{base}:pending"))
        .arg(format!("{base}:inflight:{worker_id}"))
        .arg("RIGHT")
        .arg("LEFT")
        .ignore()
        .query(&mut con)
        .unwrap();
    let blocked = blocked_in_blmove(server).expect("still blocked: the ID never reached pending");
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&blocked)
        .query(&mut con)
        .unwrap();
}

#[tokio::test]
async fn a_move_whose_reply_was_lost_is_found_and_run() {
    let server = RedisServer::start();
    let q = queue_name("lost-reply");
    let worker = Worker::builder(config(&server))
        .mode(Mode::Reliable)
        .queue(&q)
        .build()
        .await
        .unwrap();
    let worker_id = worker.id().to_owned();
    let shutdown = worker.shutdown_handle();
    let task = tokio::spawn(worker.run(reverse));
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    eventually("the worker blocks in BLMOVE", || {
        blocked_in_blmove(&server).is_some()
    })
    .await;
    lose_a_move_reply(&server, &q, &worker_id, "orphan-1", "lost");
    let result: String = queue
        .job("orphan-1")
        .await
        .unwrap()
        .result_timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(result, "tsol");
    shutdown.shutdown();
    assert_eq!(task.await.unwrap().unwrap().completed, 1);
}

#[tokio::test]
async fn a_lost_move_reply_is_found_even_while_a_backlog_keeps_the_worker_from_blocking() {
    let server = RedisServer::start();
    let q = queue_name("lost-reply-backlog");
    let worker = Worker::builder(config(&server))
        .mode(Mode::Reliable)
        .queue(&q)
        .concurrency(1)
        .build()
        .await
        .unwrap();
    let worker_id = worker.id().to_owned();
    let shutdown = worker.shutdown_handle();
    let task = tokio::spawn(worker.run(|job: Job<String>| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        reverse(job).await
    }));
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    // Past its first block (500 ms), whose fresh connection made it look at
    // its in-flight list anyway: now it blocks on a connection it has had.
    tokio::time::sleep(Duration::from_millis(700)).await;
    eventually("the worker blocks in BLMOVE", || {
        blocked_in_blmove(&server).is_some()
    })
    .await;
    // Two seconds of work, submitted and set aside in one transaction (the
    // blocked BLMOVE never sees it), to be put back right after the
    // blocked connection dies.
    let submit = job_async_redis::scripts::all()
        .iter()
        .find(|s| s.name() == "job_submit")
        .unwrap();
    let base = format!("jq:{{{q}}}");
    let mut call = redis::cmd("EVALSHA");
    call.arg(submit.sha1())
        .arg(6 + 40)
        .arg(format!("{base}:meta"))
        .arg(format!("{base}:pending"))
        .arg(format!("{base}:tickets"))
        .arg(format!("{base}:delayed"))
        .arg(format!("{base}:clock"))
        .arg(format!("{base}:events"));
    for i in 0..40 {
        call.arg(format!("{base}:job:backlog-{i}"));
    }
    call.arg("reliable").arg("1");
    for i in 0..40 {
        call.arg(format!("backlog-{i}"))
            .arg("msgpack")
            .arg(rmp_serde::to_vec("work").unwrap())
            .arg("")
            .arg("0")
            .arg("1")
            .arg("0")
            .arg("0")
            .arg("0")
            .arg("")
            .arg("");
    }
    let mut con = server.connection();
    let (): () = redis::pipe()
        .atomic()
        .add_command(call)
        .ignore()
        .cmd("RENAME")
        .arg(format!("{base}:pending"))
        .arg(format!("{base}:aside"))
        .ignore()
        .query(&mut con)
        .unwrap();
    lose_a_move_reply(&server, &q, &worker_id, "orphan-2", "lost");
    // The worker pauses 50 ms after its connection dropped; by then the
    // backlog is back, and the worker does not block (nor reopen that
    // connection) until it is done.
    let (): () = redis::cmd("RENAME")
        .arg(format!("{base}:aside"))
        .arg(format!("{base}:pending"))
        .query(&mut con)
        .unwrap();
    let result: String = queue
        .job("orphan-2")
        .await
        .unwrap()
        .result_timeout(Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(result, "tsol");
    let pending: usize = con.llen(format!("{base}:pending")).unwrap();
    assert!(pending > 0, "the orphan ran only after the backlog");
    eventually("the backlog is done", || {
        let pending: usize = con.llen(format!("{base}:pending")).unwrap();
        let inflight: Vec<String> = con.keys(format!("{base}:inflight:*")).unwrap();
        pending == 0 && inflight.is_empty()
    })
    .await;
    shutdown.shutdown();
    assert_eq!(task.await.unwrap().unwrap().completed, 41);
}

#[tokio::test]
async fn a_zombie_completion_is_refused_and_the_new_attempt_stands() {
    let server = RedisServer::start();
    let q = queue_name("zombie");
    support::zombie_is_refused(&server, &q, Mode::Reliable, |c| {
        reliable(c, &q).lease(Duration::from_millis(300))
    })
    .await;
}

#[tokio::test]
async fn a_poison_pill_reaches_the_dead_letter_set_after_the_configured_redeliveries() {
    let server = RedisServer::start();
    let q = queue_name("poison");
    // Three workers die while running it; the limit is two redeliveries.
    support::poison_pill_is_dead_lettered(
        &server,
        &q,
        Mode::Reliable,
        |c| reliable(c, &q).max_stalls(2),
        2,
    )
    .await;
}

#[tokio::test]
async fn graceful_shutdown_returns_unfinished_jobs_to_the_queue_at_once() {
    let server = RedisServer::start();
    let q = queue_name("deploy");
    let started = Arc::new(AtomicUsize::new(0));
    let count = started.clone();
    // Long lease: anything back on the queue quickly was returned, not recovered.
    let builder = reliable(config(&server), &q)
        .lease(Duration::from_secs(60))
        .concurrency(2)
        .grace_period(Duration::from_millis(100));
    let first = spawn_built(builder, move |job: Job<u32>| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            if job.attempt == 1 {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok::<_, String>(job.payload)
        }
    })
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    let handles = queue.submit_many(&[1u32, 2, 3, 4]).await.unwrap();
    eventually("two jobs started", || started.load(Ordering::SeqCst) == 2).await;
    let stats = first.stop().await;
    assert_eq!(stats.returned, 2, "{stats:?}");
    let mut con = server.connection();
    let pending: usize = con.llen(format!("jq:{{{q}}}:pending")).unwrap();
    assert_eq!(pending, 4, "all four jobs are back on the queue");
    assert_left(&mut con, &q);
    for h in &handles {
        let s = queue.status(h.id()).await.unwrap().unwrap();
        assert_eq!((s.state, s.attempt, s.stalls), (JobState::Queued, 0, 0));
    }
    let second = spawn_built(reliable(config(&server), &q), |job: Job<u32>| async move {
        Ok::<_, String>(job.payload * 10)
    })
    .await;
    for (n, h) in [1u32, 2, 3, 4].iter().zip(handles) {
        assert_eq!(
            h.result_timeout::<u32>(Duration::from_secs(5))
                .await
                .unwrap(),
            n * 10
        );
    }
    second.stop().await;
}

#[tokio::test]
async fn a_job_whose_outcome_cannot_be_recorded_is_taken_up_again_while_the_worker_runs() {
    let server = RedisServer::start();
    let q = queue_name("unrecorded");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    let url = server.url();
    // The handler replaces its own job's hash with a string: job_finish
    // then fails (WRONGTYPE) and the outcome is not recorded.
    let worker = spawn_built(reliable(config(&server), &q), move |job: Job<String>| {
        let url = url.clone();
        async move {
            let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
            let _: () = con
                .set(format!("jq:{{{}}}:job:{}", job.queue, job.id), "not a hash")
                .unwrap();
            Ok::<_, std::convert::Infallible>(job.payload)
        }
    })
    .await;
    // Submitted once the worker waits on BLMOVE: its start-up look at its
    // in-flight list is over.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handle = queue.submit("x").await.unwrap();
    let id = handle.id().to_owned();
    let mut con = server.connection();
    let dead_jobs = format!("jq:{{{q}}}:dead_jobs");
    // Without waiting for the worker to leave: the job is found in the
    // in-flight list and started again, which dead-letters the broken key.
    eventually("the job was dead-lettered", || {
        let dead: Vec<String> = con.zrange(&dead_jobs, 0, -1).unwrap();
        dead == vec![id.clone()]
    })
    .await;
    let lists: Vec<String> = con.keys(format!("jq:{{{q}}}:inflight:*")).unwrap();
    assert!(lists.is_empty(), "{lists:?}");
    let stats = worker.stop().await;
    assert_eq!(stats.completed, 0);
    drop(handle);
}
