//! Everything works as an ACL user that may only touch the library's key
//! prefix and channels and run the commands the library needs.

mod support;

use std::time::Duration;

use job_async_redis::{Client, Config, Error, FailureKind, Job, Mode, acl_rules};
use redis::Commands;
use support::{RedisServer, queue_name, spawn_worker};

#[tokio::test]
async fn a_least_privilege_acl_user_can_run_everything() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let rules: Vec<String> = acl_rules("app").split(' ').map(String::from).collect();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("jobs")
        .arg("reset")
        .arg("on")
        .arg(">s3cret")
        .arg(&rules)
        .query(&mut admin)
        .unwrap();
    let url = format!("redis://jobs:s3cret@127.0.0.1:{}", server.port());
    let config = Config::new(&url)
        .prefix("app")
        .block_timeout(Duration::from_secs(60));

    // The user really is restricted.
    let mut restricted = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let denied: redis::RedisResult<()> = restricted.set("other:key", 1);
    assert_eq!(denied.unwrap_err().code(), Some("NOPERM"));
    let denied: redis::RedisResult<()> = redis::cmd("FLUSHALL").query(&mut restricted);
    assert_eq!(denied.unwrap_err().code(), Some("NOPERM"));

    let q = queue_name("acl");
    let worker = spawn_worker(config.clone(), &[&q], 2, |job: Job<String>| async move {
        if job.payload == "fail" {
            return Err("refused".to_string());
        }
        Ok(job.payload.to_uppercase())
    })
    .await;
    let client = Client::connect(config.clone()).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    let wait = Duration::from_secs(10);
    let up: String = queue
        .submit("hello")
        .await
        .unwrap()
        .result_timeout(wait)
        .await
        .unwrap();
    assert_eq!(up, "HELLO");
    let handles = queue
        .submit_many(&["a".to_string(), "b".to_string()])
        .await
        .unwrap();
    for h in handles {
        h.result_timeout::<String>(wait).await.unwrap();
    }
    let err = queue
        .submit("fail")
        .await
        .unwrap()
        .result_timeout::<String>(wait)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        Error::JobFailed {
            kind: FailureKind::Handler,
            ..
        }
    ));
    // Dead-lettering runs under the same user.
    let _: () = admin.lpush(format!("app:{{{q}}}:pending"), "junk").unwrap();
    let dead_key = format!("app:{{{q}}}:dead");
    for _ in 0..200 {
        if admin.llen::<_, usize>(&dead_key).unwrap() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Shutdown wakes the blocked pop with CLIENT UNBLOCK: with a block
    // timeout of 60 s, the worker still stops at once.
    let stopping = std::time::Instant::now();
    let stats = worker.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(30),
        "CLIENT UNBLOCK woke the pop"
    );
    assert_eq!(
        (stats.completed, stats.failed, stats.dead_lettered),
        (3, 1, 1)
    );

    // Recoverable mode: submit, claim, start, finish, retry, heartbeat,
    // sweep, watch and status, all as the same user.
    let rq = queue_name("acl-rec");
    let worker = support::spawn_built(
        support::recoverable(config.clone(), &rq).lease(Duration::from_millis(1000)),
        |job: Job<u32>| async move {
            if job.attempt == 1 {
                return Err("again".to_string());
            }
            tokio::time::sleep(Duration::from_millis(1400)).await; // outlives a lease: heartbeat
            Ok(job.payload + 1)
        },
    )
    .await;
    let rqueue = client.queue(&rq, Mode::Recoverable).await.unwrap();
    let h = rqueue
        .submit_with(
            &41u32,
            job_async_redis::JobOptions::default().max_attempts(2),
        )
        .await
        .unwrap();
    let id = h.id().to_owned();
    assert_eq!(h.result_timeout::<u32>(wait).await.unwrap(), 42);
    let status = rqueue.status(&id).await.unwrap().unwrap();
    assert_eq!(
        (status.attempt, status.stalls),
        (2, 0),
        "the heartbeat kept the lease"
    );
    assert_eq!(
        rqueue
            .job(&id)
            .await
            .unwrap()
            .result_timeout::<u32>(wait)
            .await
            .unwrap(),
        42
    );
    let stats = worker.stop().await;
    assert_eq!((stats.completed, stats.retried), (1, 1));

    // Reliable mode: take, move, start, finish, heartbeat, recovery, leave.
    let lq = queue_name("acl-rel");
    let worker = support::spawn_built(
        support::reliable(config.clone(), &lq),
        |job: Job<u32>| async move { Ok::<_, String>(job.payload * 3) },
    )
    .await;
    let lqueue = client.queue(&lq, Mode::Reliable).await.unwrap();
    for h in lqueue.submit_many(&[1u32, 2, 3]).await.unwrap() {
        assert!(h.result_timeout::<u32>(wait).await.unwrap() % 3 == 0);
    }
    assert_eq!(worker.stop().await.completed, 3);

    // Outside its prefix, the same user is refused with a clear error.
    let other = Config::new(&url).prefix("other");
    let client = Client::connect(other).await.unwrap();
    let err = client.queue(&q, Mode::Simple).await.unwrap_err();
    assert!(
        matches!(&err, Error::Redis(e) if e.code() == Some("NOPERM")),
        "{err}"
    );
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_error() {
    let server = RedisServer::start();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("jobs")
        .arg("on")
        .arg(">right")
        .arg("+@all")
        .arg("~*")
        .query(&mut server.connection())
        .unwrap();
    let url = format!("redis://jobs:wrong@127.0.0.1:{}", server.port());
    let err = Client::connect(Config::new(url)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Redis(e) if e.code() == Some("WRONGPASS")),
        "{err:?}"
    );
}
