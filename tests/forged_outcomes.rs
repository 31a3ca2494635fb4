//! What a second program that shares the Redis can forge, and what the
//! library does about it (protocol.md, "Trust model"): a doorbell published
//! on a client's reply channel, and a `job_finish` sent with a token read
//! from the job's hash.

mod support;

use std::time::Duration;

use job_async_redis::{Client, Job, JobState, Mode};
use redis::Commands;
use support::{RedisServer, config, eventually, job_state, queue_name, recoverable, spawn_built};

const WAIT: Duration = Duration::from_secs(15);

/// A doorbell that carries a forged outcome for job `id`, as `job_finish`
/// would publish it, with the MessagePack result `"forged"`.
fn forged_doorbell(id: &str) -> Vec<u8> {
    let result = rmp_serde::to_vec("forged").unwrap();
    let bell = rmpv::Value::Map(vec![
        ("id".into(), id.into()),
        ("status".into(), "completed".into()),
        ("enc".into(), "msgpack".into()),
        ("result".into(), rmpv::Value::Binary(result)),
    ]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &bell).unwrap();
    out
}

#[tokio::test]
async fn verified_outcomes_ignore_a_forged_doorbell() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    for verify in [false, true] {
        let q = queue_name("forged-bell");
        let client = Client::connect(config(&server).verify_outcomes(verify))
            .await
            .unwrap();
        let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
        let handle = queue.submit("real").await.unwrap();
        let id = handle.id().to_owned();
        // No worker yet: the job is queued when the forged doorbell rings.
        let channel = format!("jq:{{{q}}}:reply:{}", client.id());
        let waiting = tokio::spawn(handle.result_timeout::<String>(WAIT));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let receivers: i64 = admin.publish(&channel, forged_doorbell(&id)).unwrap();
        assert_eq!(receivers, 1, "the client listens on its channel");
        if !verify {
            // The default trusts the doorbell: this is what the trust model
            // warns about, and why verify_outcomes exists.
            assert_eq!(waiting.await.unwrap().unwrap(), "forged");
            continue;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !waiting.is_finished(),
            "a forged doorbell does not end the wait"
        );
        let worker = spawn_built(
            recoverable(config(&server), &q),
            |job: Job<String>| async move { Ok::<_, String>(format!("{} result", job.payload)) },
        )
        .await;
        assert_eq!(waiting.await.unwrap().unwrap(), "real result");
        assert_eq!(worker.stop().await.completed, 1);
    }
}

#[tokio::test]
async fn a_forged_finish_under_the_workers_token_is_counted_by_the_worker() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let q = queue_name("forged-finish");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = std::sync::Arc::new(tokio::sync::Mutex::new(Some(released)));
    let worker = spawn_built(
        recoverable(config(&server), &q),
        move |_job: Job<String>| {
            let released = released.clone();
            async move {
                if let Some(rx) = released.lock().await.take() {
                    let _ = rx.await;
                }
                Ok::<_, String>("from the worker".to_string())
            }
        },
    )
    .await;
    let handle = queue.submit("x").await.unwrap();
    let id = handle.id().to_owned();
    eventually("the worker started the job", || {
        job_state(&server, &q, &id).as_deref() == Some("active")
    })
    .await;
    // Another program reads the token and finishes the job first.
    let key = format!("jq:{{{q}}}:job:{id}");
    let token: String = admin.hget(&key, "token").unwrap();
    let script = job_async_redis::scripts::all()
        .iter()
        .find(|s| s.name() == "job_finish")
        .unwrap();
    let state: String = redis::Script::new(script.source())
        .key(&key)
        .key(format!("jq:{{{q}}}:leases"))
        .key(format!("jq:{{{q}}}:pending"))
        .key(format!("jq:{{{q}}}:tickets"))
        .key(format!("jq:{{{q}}}:delayed"))
        .key(format!("jq:{{{q}}}:clock"))
        .key(format!("jq:{{{q}}}:running"))
        .key(format!("jq:{{{q}}}:gate"))
        .key(format!("jq:{{{q}}}:events"))
        .arg(&id)
        .arg(&token)
        .arg("completed")
        .arg(rmp_serde::to_vec("forged").unwrap())
        .arg("")
        .arg("0")
        .arg("60000")
        .arg("recoverable")
        .arg("publish")
        .arg("-1")
        .invoke(&mut admin)
        .unwrap();
    assert_eq!(state, "completed");
    release.send(()).unwrap();
    // The forged outcome stands (the hash is the source of truth, and the
    // forger held the queue's credentials); the worker's own outcome is
    // refused, counted and logged, never silently dropped.
    assert_eq!(
        handle.result_timeout::<String>(WAIT).await.unwrap(),
        "forged"
    );
    let stats = worker.stop().await;
    assert_eq!(
        (stats.completed, stats.outcome_refused),
        (0, 1),
        "{stats:?}"
    );
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!(status.state, JobState::Completed);
}
