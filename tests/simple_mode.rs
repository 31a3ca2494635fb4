//! Simple mode end to end against a real redis-server.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use job_async_redis::{Client, Encoding, Error, FailureKind, Job, Mode, Worker};
use redis::Commands;
use serde::{Deserialize, Serialize};
use support::{RedisServer, config, queue_name, reverse, spawn_worker};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_submitted_job_returns_its_typed_result() {
    let server = RedisServer::start();
    let q = queue_name("reverse");
    let worker = spawn_worker(config(&server), &[&q], 4, reverse).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    let out: String = queue
        .submit("reverse me please")
        .await
        .unwrap()
        .result_timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(out, "esaelp em esrever");
    let stats = worker.stop().await;
    assert_eq!(stats.completed, 1);
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Clone)]
struct Order {
    id: u64,
    items: Vec<String>,
    note: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Total {
    order: u64,
    count: usize,
}

#[tokio::test]
async fn structs_round_trip_in_both_encodings_and_many_jobs_complete() {
    let server = RedisServer::start();
    let q = queue_name("orders");
    let worker = spawn_worker(config(&server), &[&q], 8, |job: Job<Order>| async move {
        Ok::<_, String>(Total {
            order: job.payload.id,
            count: job.payload.items.len(),
        })
    })
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    for enc in [Encoding::MessagePack, Encoding::Json] {
        let queue = client
            .queue(&q, Mode::Simple)
            .await
            .unwrap()
            .with_encoding(enc);
        let orders: Vec<Order> = (0..300)
            .map(|i| Order {
                id: i,
                items: vec!["ü".repeat(i as usize % 5); i as usize % 7],
                note: (i % 2 == 0).then(|| "gift".into()),
            })
            .collect();
        let handles = queue.submit_many(&orders).await.unwrap();
        assert_eq!(handles.len(), 300);
        for (order, handle) in orders.iter().zip(handles) {
            let total: Total = handle.result_timeout(WAIT).await.unwrap();
            assert_eq!(
                total,
                Total {
                    order: order.id,
                    count: order.items.len()
                }
            );
        }
    }
    assert_eq!(worker.stop().await.completed, 600);
}

#[tokio::test]
async fn a_handler_error_and_a_panic_reach_the_client_and_the_worker_carries_on() {
    let server = RedisServer::start();
    let q = queue_name("faulty");
    let worker = spawn_worker(config(&server), &[&q], 2, |job: Job<String>| async move {
        match job.payload.as_str() {
            "fail" => Err("no thanks".to_string()),
            "panic" => panic!("handler exploded"),
            other => Ok(other.to_uppercase()),
        }
    })
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();

    let err = queue
        .submit("fail")
        .await
        .unwrap()
        .result_timeout::<String>(WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::JobFailed { kind: FailureKind::Handler, message, .. } if message == "no thanks"),
        "{err}"
    );
    let err = queue
        .submit("panic")
        .await
        .unwrap()
        .result_timeout::<String>(WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::JobFailed { kind: FailureKind::Panic, message, .. } if message.contains("handler exploded")),
        "{err}"
    );
    let ok: String = queue
        .submit("fine")
        .await
        .unwrap()
        .result_timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(ok, "FINE");
    let stats = worker.stop().await;
    assert_eq!((stats.completed, stats.failed), (1, 2));
}

#[tokio::test]
async fn an_undecodable_payload_fails_that_job_only() {
    let server = RedisServer::start();
    let q = queue_name("typed");
    // The worker expects numbers.
    let worker = spawn_worker(config(&server), &[&q], 2, |job: Job<u32>| async move {
        Ok::<_, String>(job.payload * 2)
    })
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    let bad = queue.submit("not a number").await.unwrap();
    let good = queue.submit(&21u32).await.unwrap();
    let err = bad.result_timeout::<u32>(WAIT).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::JobFailed {
                kind: FailureKind::Decode,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(good.result_timeout::<u32>(WAIT).await.unwrap(), 42);

    // A result that the client cannot decode as the type it asked for.
    let err = queue
        .submit(&1u32)
        .await
        .unwrap()
        .result_timeout::<String>(WAIT)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Decode { what: "result", .. }), "{err}");
    worker.stop().await;
}

#[tokio::test]
async fn entries_that_are_not_jobs_go_to_the_dead_letter_list() {
    let server = RedisServer::start();
    let q = queue_name("garbage");
    let worker = spawn_worker(config(&server), &[&q], 2, reverse).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    let mut con = server.connection();
    let pending = format!("jq:{{{q}}}:pending");
    // Written by hand, as a buggy producer in another language might.
    let _: () = con
        .lpush(&pending, b"\xc1 definitely not msgpack".as_slice())
        .unwrap();
    let _: () = con.lpush(&pending, b"\x81\xa2id\xa1x".as_slice()).unwrap(); // a map without enc/payload
    let after: String = queue
        .submit("still works")
        .await
        .unwrap()
        .result_timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(after, "skrow llits");
    let stats = worker.stop().await;
    assert_eq!(stats.dead_lettered, 2);
    let dead: Vec<Vec<u8>> = con.lrange(format!("jq:{{{q}}}:dead"), 0, -1).unwrap();
    assert_eq!(dead.len(), 2);
    for record in dead {
        let value: rmpv::Value = rmp_serde::from_slice(&record).unwrap();
        let map = value.as_map().unwrap();
        let reason = map
            .iter()
            .find(|(k, _)| k.as_str() == Some("reason"))
            .unwrap()
            .1
            .as_str()
            .unwrap();
        assert!(reason.contains("decode"), "{reason}");
    }
}

#[tokio::test]
async fn a_client_timeout_is_a_typed_error_and_the_result_is_not_needed() {
    let server = RedisServer::start();
    let q = queue_name("nobody-home");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    let handle = queue.submit("x").await.unwrap();
    let id = handle.id().to_owned();
    let err = handle
        .result_timeout::<String>(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { job_id, .. } if *job_id == id),
        "{err}"
    );
    // The job is still queued for a worker that comes later.
    let len: usize = server
        .connection()
        .llen(format!("jq:{{{q}}}:pending"))
        .unwrap();
    assert_eq!(len, 1);
}

#[tokio::test]
async fn queues_are_served_in_priority_order() {
    let server = RedisServer::start();
    let (high, low) = (queue_name("high"), queue_name("low"));
    let client = Client::connect(config(&server)).await.unwrap();
    let hq = client.queue(&high, Mode::Simple).await.unwrap();
    let lq = client.queue(&low, Mode::Simple).await.unwrap();
    // Fill both queues before any worker runs.
    let mut handles = lq
        .submit_many(&(0..20).map(|i| format!("low{i}")).collect::<Vec<_>>())
        .await
        .unwrap();
    handles.extend(
        hq.submit_many(&(0..20).map(|i| format!("high{i}")).collect::<Vec<_>>())
            .await
            .unwrap(),
    );
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = order.clone();
    // Concurrency 1 so that the order of claims is the order of runs.
    let worker = spawn_worker(
        config(&server),
        &[&high, &low],
        1,
        move |job: Job<String>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(job.payload.clone());
                Ok::<_, String>(job.payload)
            }
        },
    )
    .await;
    for h in handles {
        h.result_timeout::<String>(WAIT).await.unwrap();
    }
    worker.stop().await;
    let order = order.lock().unwrap().clone();
    let expected: Vec<String> = (0..20)
        .map(|i| format!("high{i}"))
        .chain((0..20).map(|i| format!("low{i}")))
        .collect();
    assert_eq!(order, expected);
}

#[tokio::test]
async fn graceful_shutdown_finishes_running_jobs_and_leaves_the_rest_queued() {
    let server = RedisServer::start();
    let q = queue_name("slow");
    let started = Arc::new(AtomicUsize::new(0));
    let count = started.clone();
    let worker = spawn_worker(config(&server), &[&q], 2, move |job: Job<u64>| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(job.payload)).await;
            Ok::<_, String>(job.payload)
        }
    })
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    let handles = queue.submit_many(&[300u64; 6]).await.unwrap();
    // Wait until the two slots are busy, then stop.
    while started.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = worker.stop().await;
    assert_eq!(stats.completed, 2, "the running jobs finish");
    let mut handles = handles.into_iter();
    for h in handles.by_ref().take(2) {
        assert_eq!(h.result_timeout::<u64>(WAIT).await.unwrap(), 300);
    }
    let len: usize = server
        .connection()
        .llen(format!("jq:{{{q}}}:pending"))
        .unwrap();
    assert_eq!(len, 4, "unstarted jobs stay queued");
    // A new worker picks them up, and their clients get the results.
    let worker = spawn_worker(config(&server), &[&q], 4, |job: Job<u64>| async move {
        Ok::<_, String>(job.payload)
    })
    .await;
    for h in handles {
        assert_eq!(h.result_timeout::<u64>(WAIT).await.unwrap(), 300);
    }
    worker.stop().await;
}

#[tokio::test]
async fn a_job_still_running_when_the_grace_period_ends_fails_with_shutdown() {
    let server = RedisServer::start();
    let q = queue_name("stuck");
    let worker = Worker::builder(config(&server))
        .queue(&q)
        .grace_period(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let shutdown = worker.shutdown_handle();
    let started = Arc::new(tokio::sync::Notify::new());
    let notify = started.clone();
    let task = tokio::spawn(worker.run(move |_job: Job<String>| {
        let notify = notify.clone();
        async move {
            notify.notify_one();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, String>(String::new())
        }
    }));
    let client = Client::connect(config(&server)).await.unwrap();
    let handle = client
        .queue(&q, Mode::Simple)
        .await
        .unwrap()
        .submit("forever")
        .await
        .unwrap();
    started.notified().await;
    shutdown.shutdown();
    let stats = task.await.unwrap().unwrap();
    assert_eq!(stats.failed, 1);
    let err = handle.result_timeout::<String>(WAIT).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::JobFailed {
                kind: FailureKind::Shutdown,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn an_oversized_payload_is_refused_before_anything_is_written() {
    let server = RedisServer::start();
    let q = queue_name("big");
    let client = Client::connect(config(&server).max_payload_bytes(1000))
        .await
        .unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    let err = queue.submit(&"x".repeat(2000)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: "payload",
                max: 1000,
                ..
            }
        ),
        "{err}"
    );
    // A batch with one oversized job writes nothing at all.
    let batch = vec!["small".to_string(), "y".repeat(5000)];
    assert!(matches!(
        queue.submit_many(&batch).await,
        Err(Error::TooLarge { .. })
    ));
    let len: usize = server
        .connection()
        .llen(format!("jq:{{{q}}}:pending"))
        .unwrap();
    assert_eq!(len, 0);
}

#[tokio::test]
async fn an_oversized_result_fails_the_job() {
    let server = RedisServer::start();
    let q = queue_name("big-result");
    let worker = spawn_worker(
        config(&server).max_payload_bytes(100),
        &[&q],
        1,
        |job: Job<usize>| async move { Ok::<_, String>("z".repeat(job.payload)) },
    )
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    let err = queue
        .submit(&500usize)
        .await
        .unwrap()
        .result_timeout::<String>(WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::JobFailed {
                kind: FailureKind::TooLarge,
                ..
            }
        ),
        "{err}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_queue_in_another_mode_or_protocol_is_refused_and_nothing_is_written() {
    let server = RedisServer::start();
    let q = queue_name("registered-elsewhere");
    let meta = format!("jq:{{{q}}}:meta");
    let mut con = server.connection();
    // Another program registered the queue in recoverable mode.
    let _: () = con
        .hset_multiple(&meta, &[("mode", "recoverable"), ("protocol", "1")])
        .unwrap();
    let client = Client::connect(config(&server)).await.unwrap();
    let err = client.queue(&q, Mode::Simple).await.unwrap_err();
    match &err {
        Error::ModeMismatch {
            queue,
            existing,
            requested,
        } => {
            assert_eq!(
                (queue.as_str(), existing.as_str(), requested.as_str()),
                (q.as_str(), "recoverable", "simple")
            );
        }
        other => panic!("expected ModeMismatch, got {other}"),
    }
    let err = Worker::builder(config(&server))
        .queue(&q)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ModeMismatch { .. }), "{err}");

    // Same mode, newer protocol.
    let _: () = con
        .hset_multiple(&meta, &[("mode", "simple"), ("protocol", "2")])
        .unwrap();
    let err = client.queue(&q, Mode::Simple).await.unwrap_err();
    assert!(
        matches!(&err, Error::ProtocolMismatch { existing, requested, .. } if existing == "2" && requested == "1"),
        "{err}"
    );
    // An already opened queue whose metadata changed under it: submit refuses.
    let _: () = con
        .hset_multiple(&meta, &[("mode", "simple"), ("protocol", "1")])
        .unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    let _: () = con.hset(&meta, "mode", "reliable").unwrap();
    assert!(matches!(
        queue.submit("x").await,
        Err(Error::ModeMismatch { .. })
    ));
    let keys: Vec<String> = con.keys(format!("jq:{{{q}}}:*")).unwrap();
    assert_eq!(keys, vec![meta], "nothing but the metadata exists");
}

#[tokio::test]
async fn a_deleted_queue_is_registered_again_on_submit() {
    let server = RedisServer::start();
    let q = queue_name("deleted");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    let mut con = server.connection();
    let _: () = con.del(format!("jq:{{{q}}}:meta")).unwrap();
    queue.submit("x").await.unwrap();
    let mode: String = con.hget(format!("jq:{{{q}}}:meta"), "mode").unwrap();
    assert_eq!(mode, "simple");
}

#[tokio::test]
async fn bad_names_and_settings_are_typed_errors() {
    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    assert!(matches!(
        client.queue("a{b}", Mode::Simple).await,
        Err(Error::InvalidName(_))
    ));
    assert!(matches!(
        Worker::builder(config(&server)).build().await,
        Err(Error::Config(_))
    ));
    assert!(matches!(
        Worker::builder(config(&server))
            .queue("q")
            .concurrency(0)
            .build()
            .await,
        Err(Error::Config(_))
    ));
    assert!(matches!(
        Client::connect(config(&server).prefix("x{")).await,
        Err(Error::InvalidName(_))
    ));
}

#[tokio::test]
async fn dropping_the_client_ends_waits_with_client_closed() {
    let server = RedisServer::start();
    let q = queue_name("closed");
    let client = Client::connect(config(&server)).await.unwrap();
    let handle = client
        .queue(&q, Mode::Simple)
        .await
        .unwrap()
        .submit("x")
        .await
        .unwrap();
    drop(client);
    let err = handle.result_timeout::<String>(WAIT).await.unwrap_err();
    assert!(matches!(err, Error::ClientClosed { .. }), "{err}");
}

#[tokio::test]
async fn the_reply_subscription_comes_back_after_its_connection_is_killed() {
    let server = RedisServer::start();
    let q = queue_name("resubscribe");
    let worker = spawn_worker(config(&server), &[&q], 4, reverse).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    let first: String = queue
        .submit("ab")
        .await
        .unwrap()
        .result_timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(first, "ba");
    let mut con = server.connection();
    let subscribers = |con: &mut redis::Connection| -> i64 {
        let counts: Vec<redis::Value> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(format!("jq:{{{q}}}:reply:{}", client.id()))
            .query(con)
            .unwrap();
        redis::from_redis_value(counts[1].clone()).unwrap()
    };
    assert_eq!(subscribers(&mut con), 1);
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut con)
        .unwrap();
    assert_eq!(killed, 1);
    // Simple mode loses outcomes published while the subscription is down:
    // wait until it is back, then every outcome arrives again.
    support::eventually("the client subscribed again", || subscribers(&mut con) == 1).await;
    for text in ["cd", "ef"] {
        let out: String = queue
            .submit(text)
            .await
            .unwrap()
            .result_timeout(WAIT)
            .await
            .unwrap();
        assert_eq!(out, text.chars().rev().collect::<String>());
    }
    assert_eq!(worker.stop().await.completed, 3);
}

/// More invalid entries than job slots, on a queue whose dead-letter list
/// is broken: each goes back to the pending list (nothing is dropped), no
/// slot is held while the queue rests, and the worker's other queue keeps
/// being served.
#[tokio::test]
async fn invalid_entries_a_broken_dead_list_refuses_do_not_starve_other_queues() {
    let server = RedisServer::start();
    let (broken, healthy) = (queue_name("broken-dead"), queue_name("healthy"));
    let mut con = server.connection();
    let _: () = con
        .set(format!("jq:{{{broken}}}:dead"), "not a list")
        .unwrap();
    let worker = spawn_worker(config(&server), &[&broken, &healthy], 2, reverse).await;
    for i in 0..4 {
        let _: () = con
            .lpush(format!("jq:{{{broken}}}:pending"), format!("junk {i}"))
            .unwrap();
    }
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&healthy, Mode::Simple).await.unwrap();
    for _ in 0..3 {
        let out: String = queue
            .submit("served")
            .await
            .unwrap()
            .result_timeout(WAIT)
            .await
            .unwrap();
        assert_eq!(out, "devres");
    }
    let started = std::time::Instant::now();
    let stats = worker.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no slot was held"
    );
    assert!(stats.queue_errors > 0, "{stats:?}");
    // Every junk entry is still there: back on pending (none was dropped).
    let pending: Vec<String> = con
        .lrange(format!("jq:{{{broken}}}:pending"), 0, -1)
        .unwrap();
    let mut junk: Vec<&String> = pending.iter().filter(|e| e.starts_with("junk")).collect();
    junk.sort();
    assert_eq!(
        junk,
        ["junk 0", "junk 1", "junk 2", "junk 3"],
        "{pending:?}"
    );
}
