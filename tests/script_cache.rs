//! Every path survives an empty script cache: SCRIPT FLUSH between calls, and
//! a redis-server restart in the middle of a run.

mod support;

use std::time::Duration;

use job_async_redis::{Client, Mode};
use redis::Commands;
use support::{RedisServer, config, queue_name, reverse, spawn_worker};

const WAIT: Duration = Duration::from_secs(15);

fn flush_scripts(server: &RedisServer) {
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut server.connection())
        .unwrap();
}

#[tokio::test]
async fn script_flush_between_calls_loses_nothing() {
    let server = RedisServer::start();
    let q = queue_name("flush");
    let worker = spawn_worker(config(&server), &[&q], 4, reverse).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    let mut expected = 0;
    for round in 0..5 {
        flush_scripts(&server);
        // A single submit (EVALSHA) and a batch (a pipeline of EVALSHA calls).
        let one = queue.submit(&format!("round{round}")).await.unwrap();
        flush_scripts(&server);
        let batch: Vec<String> = (0..2500).map(|i| format!("{round}-{i}")).collect();
        let many = queue.submit_many(&batch).await.unwrap();
        assert_eq!(
            one.result_timeout::<String>(WAIT).await.unwrap(),
            format!("{round}dnuor")
        );
        for (text, h) in batch.iter().zip(many) {
            assert_eq!(
                h.result_timeout::<String>(WAIT).await.unwrap(),
                text.chars().rev().collect::<String>()
            );
        }
        expected += 2501;
    }
    assert_eq!(worker.stop().await.completed, expected);
}

// Multi-threaded, so that the library's background tasks notice the
// disconnection while the test thread blocks in `restart`, as they would in
// an application during a real restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_loses_nothing() {
    let mut server = RedisServer::start();
    let (busy, later) = (queue_name("busy"), queue_name("later"));
    let worker = spawn_worker(config(&server), &[&busy], 4, reverse).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let busy_q = client.queue(&busy, Mode::Simple).await.unwrap();
    let later_q = client.queue(&later, Mode::Simple).await.unwrap();

    let texts: Vec<String> = (0..50).map(|i| format!("before{i}")).collect();
    for h in busy_q.submit_many(&texts).await.unwrap() {
        h.result_timeout::<String>(WAIT).await.unwrap();
    }
    // Jobs queued on a queue with no worker yet, awaited across the restart.
    let waiting = later_q.submit_many(&texts).await.unwrap();

    server.restart();
    let scripts: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(job_async_redis::scripts::all()[0].sha1())
        .query(&mut server.connection())
        .unwrap();
    assert_eq!(
        scripts,
        vec![false],
        "the restarted server has an empty script cache"
    );
    let queued: usize = server
        .connection()
        .llen(format!("jq:{{{later}}}:pending"))
        .unwrap();
    assert_eq!(queued, 50, "the queued jobs were persisted");

    // The running worker and the client carry on.
    let after: Vec<String> = (0..50).map(|i| format!("after{i}")).collect();
    let handles = busy_q.submit_many(&after).await.unwrap();
    for (text, h) in after.iter().zip(handles) {
        assert_eq!(
            h.result_timeout::<String>(WAIT).await.unwrap(),
            text.chars().rev().collect::<String>()
        );
    }
    // A worker started now serves the jobs queued before the restart, and
    // their outcomes reach the waiting client.
    let late_worker = spawn_worker(config(&server), &[&later], 4, reverse).await;
    for (text, h) in texts.iter().zip(waiting) {
        assert_eq!(
            h.result_timeout::<String>(WAIT).await.unwrap(),
            text.chars().rev().collect::<String>()
        );
    }
    assert_eq!(worker.stop().await.completed, 100);
    assert_eq!(late_worker.stop().await.completed, 50);
}
