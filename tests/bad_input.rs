//! Bad input from another language: job hashes and list entries written by
//! hand with a missing field, a wrong type, an unknown encoding or corrupt
//! MessagePack. Each such job fails with a clear error, recorded in Redis
//! and delivered to its client; workers carry on; no other job is affected.

mod support;

use std::time::Duration;

use job_async_redis::{Client, Error, FailureKind, JobState, Mode, Worker};
use redis::Commands;
use support::{RedisServer, config, queue_name, reverse, spawn_built, spawn_worker};

const WAIT: Duration = Duration::from_secs(15);

fn msgpack(value: &str) -> Vec<u8> {
    rmp_serde::to_vec(value).unwrap()
}

/// Writes job `id` by hand as `fields`, and queues its ID as a producer in
/// another language would.
fn write_job(
    con: &mut redis::Connection,
    q: &str,
    mode: Mode,
    id: &str,
    fields: &[(&str, Vec<u8>)],
) {
    let key = format!("jq:{{{q}}}:job:{id}");
    if fields.is_empty() {
        let _: () = con.set(&key, "not a hash").unwrap();
    } else {
        let _: () = con.hset_multiple(&key, fields).unwrap();
    }
    let _: () = con.lpush(format!("jq:{{{q}}}:pending"), id).unwrap();
    if mode == Mode::Recoverable {
        let _: () = con.lpush(format!("jq:{{{q}}}:tickets"), "1").unwrap();
    }
}

async fn assert_decode_failure(queue: &job_async_redis::Queue, id: &str, expected: &str) {
    let err = queue
        .job(id)
        .await
        .unwrap()
        .result_timeout::<String>(WAIT)
        .await
        .unwrap_err();
    match &err {
        Error::JobFailed {
            kind: FailureKind::Decode,
            message,
            ..
        } => assert!(
            message.contains(expected),
            "{id}: {message:?} lacks {expected:?}"
        ),
        other => panic!("{id}: expected a decode failure, got {other}"),
    }
}

async fn stored_mode_bad_jobs(mode: Mode) {
    let server = RedisServer::start();
    let q = queue_name("bad");
    let builder = Worker::builder(config(&server))
        .mode(mode)
        .queue(&q)
        .concurrency(2);
    let worker = spawn_built(builder, reverse).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, mode).await.unwrap();
    let mut con = server.connection();
    let good = |enc: &str, payload: Vec<u8>| {
        vec![
            ("state", b"queued".to_vec()),
            ("enc", enc.as_bytes().to_vec()),
            ("payload", payload),
            ("client", Vec::new()),
        ]
    };
    let mut no_enc = good("msgpack", msgpack("x"));
    no_enc.remove(1);
    write_job(&mut con, &q, mode, "no-enc", &no_enc);
    write_job(&mut con, &q, mode, "yaml", &good("yaml", b"x: 1".to_vec()));
    write_job(
        &mut con,
        &q,
        mode,
        "corrupt",
        &good("msgpack", b"\xc1\xc1\xc1".to_vec()),
    );
    write_job(
        &mut con,
        &q,
        mode,
        "wrong-type",
        &good("msgpack", rmp_serde::to_vec(&42u32).unwrap()),
    );
    let mut no_state = good("msgpack", msgpack("x"));
    no_state.remove(0);
    write_job(&mut con, &q, mode, "no-state", &no_state);
    write_job(&mut con, &q, mode, "not-a-hash", &[]);
    // Numeric fields that are not numbers are read as absent: this job runs.
    let mut odd_numbers = good("json", b"\"fine\"".to_vec());
    for field in ["attempt", "max_attempts", "lease_ms", "stalls", "token"] {
        odd_numbers.push((field, b"many".to_vec()));
    }
    write_job(&mut con, &q, mode, "odd-numbers", &odd_numbers);
    let normal = queue.submit("still fine").await.unwrap();

    assert_decode_failure(&queue, "no-enc", "unknown encoding \"\"").await;
    assert_decode_failure(&queue, "yaml", "unknown encoding \"yaml\"").await;
    assert_decode_failure(&queue, "corrupt", "cannot decode payload").await;
    assert_decode_failure(&queue, "wrong-type", "cannot decode payload").await;
    assert_decode_failure(&queue, "no-state", "not a valid job: state missing").await;
    assert_decode_failure(&queue, "not-a-hash", "not a hash").await;
    let fine: String = queue
        .job("odd-numbers")
        .await
        .unwrap()
        .result_timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(fine, "enif");
    assert_eq!(
        normal.result_timeout::<String>(WAIT).await.unwrap(),
        "enif llits"
    );

    // Recorded in Redis: state, kind and message in the job's hash.
    let status = queue.status("yaml").await.unwrap().unwrap();
    assert_eq!(status.state, JobState::Failed);
    assert_eq!(
        status.error.as_ref().map(|e| &e.0),
        Some(&FailureKind::Decode)
    );
    let dead: Vec<String> = con.zrange(format!("jq:{{{q}}}:dead_jobs"), 0, -1).unwrap();
    assert_eq!(
        dead,
        vec!["not-a-hash".to_string()],
        "a key of another type is dead-lettered"
    );
    let stats = worker.stop().await;
    assert_eq!(stats.completed, 2, "{stats:?}");
    assert_eq!(
        stats.retried, 0,
        "decode failures are not retried: {stats:?}"
    );
}

#[tokio::test]
async fn recoverable_mode_bad_jobs_fail_clearly_and_workers_carry_on() {
    stored_mode_bad_jobs(Mode::Recoverable).await;
}

#[tokio::test]
async fn reliable_mode_bad_jobs_fail_clearly_and_workers_carry_on() {
    stored_mode_bad_jobs(Mode::Reliable).await;
}

// Multi-threaded: this test reads pub/sub with a blocking connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_mode_bad_envelopes_fail_clearly_and_workers_carry_on() {
    let server = RedisServer::start();
    let q = queue_name("bad-simple");
    let worker = spawn_worker(config(&server), &[&q], 2, reverse).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    // A normal job, so that this client is subscribed and we know its channel.
    assert_eq!(
        queue
            .submit("ok")
            .await
            .unwrap()
            .result_timeout::<String>(WAIT)
            .await
            .unwrap(),
        "ko"
    );
    let channel = format!("jq:{{{q}}}:reply:{}", client.id());
    let mut con = server.connection();
    let pending = format!("jq:{{{q}}}:pending");
    let envelope = |fields: Vec<(&str, rmpv::Value)>| {
        let map = rmpv::Value::Map(
            fields
                .into_iter()
                .map(|(k, v)| (rmpv::Value::from(k), v))
                .collect(),
        );
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &map).unwrap();
        out
    };
    let bin = |b: &[u8]| rmpv::Value::Binary(b.to_vec());
    let text = |s: &str| rmpv::Value::from(s);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "missing-enc",
            envelope(vec![
                ("id", text("missing-enc")),
                ("reply", text(&channel)),
                ("payload", bin(b"x")),
            ]),
            "invalid job envelope",
        ),
        (
            "unknown-enc",
            envelope(vec![
                ("id", text("unknown-enc")),
                ("reply", text(&channel)),
                ("enc", text("yaml")),
                ("payload", bin(b"x: 1")),
            ]),
            "unknown encoding \"yaml\"",
        ),
        (
            "corrupt",
            envelope(vec![
                ("id", text("corrupt")),
                ("reply", text(&channel)),
                ("enc", text("msgpack")),
                ("payload", bin(b"\xc1\xc1")),
            ]),
            "cannot decode payload",
        ),
        (
            "wrong-type",
            envelope(vec![
                ("id", text("wrong-type")),
                ("reply", text(&channel)),
                ("enc", text("msgpack")),
                ("payload", rmpv::Value::from(7)),
            ]),
            "invalid job envelope",
        ),
    ];
    // These jobs were not submitted through the client, so no handle waits
    // for them: listen on the client's channel directly.
    let mut pubsub = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut sub = pubsub.as_pubsub();
    sub.subscribe(&channel).unwrap();
    sub.set_read_timeout(Some(WAIT)).unwrap();
    for (_, entry, _) in &cases {
        let _: () = con.lpush(&pending, entry.as_slice()).unwrap();
    }
    let mut seen = std::collections::HashMap::new();
    while seen.len() < cases.len() {
        let msg = sub.get_message().unwrap();
        let value: rmpv::Value = rmp_serde::from_slice(msg.get_payload_bytes()).unwrap();
        let get = |v: &rmpv::Value, k: &str| {
            v.as_map()
                .unwrap()
                .iter()
                .find(|(key, _)| key.as_str() == Some(k))
                .map(|(_, v)| v.clone())
        };
        let id = get(&value, "id").unwrap().as_str().unwrap().to_owned();
        assert_eq!(
            get(&value, "status").unwrap().as_str(),
            Some("failed"),
            "{id}"
        );
        let error = get(&value, "error").unwrap();
        assert_eq!(
            get(&error, "kind").unwrap().as_str(),
            Some("decode"),
            "{id}"
        );
        seen.insert(
            id,
            get(&error, "message").unwrap().as_str().unwrap().to_owned(),
        );
    }
    for (id, _, expected) in &cases {
        assert!(
            seen[*id].contains(expected),
            "{id}: {:?} lacks {expected:?}",
            seen[*id]
        );
    }
    // Entries that are not valid envelopes are also kept, with the reason.
    // (after telling the client, so wait for them).
    let dead = format!("jq:{{{q}}}:dead");
    support::eventually(
        "missing-enc and wrong-type are kept in the dead-letter list",
        || con.llen::<_, usize>(&dead).unwrap() == 2,
    )
    .await;
    assert_eq!(
        queue
            .submit("after")
            .await
            .unwrap()
            .result_timeout::<String>(WAIT)
            .await
            .unwrap(),
        "retfa"
    );
    let stats = worker.stop().await;
    assert_eq!(
        (stats.completed, stats.failed, stats.dead_lettered),
        (2, 4, 2)
    );
}
