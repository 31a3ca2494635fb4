//! Reliable mode under fire: worker processes killed with SIGKILL at random
//! moments while they run a few thousand jobs, replacements started; every
//! job must complete exactly once, and every client's await be answered.

mod support;

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use job_async_redis::{Client, Mode};
use redis::Commands;
use support::{RedisServer, config, queue_name};

const JOBS: u64 = 3000;

/// The fields of a doorbell this test counts (it may carry more).
#[derive(serde::Deserialize)]
struct Doorbell {
    id: String,
    status: String,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Bells {
    Many(Vec<Doorbell>),
    One(Doorbell),
}

/// The `reliable_worker` example binary, built by `cargo test` (or here).
struct Proc {
    child: Child,
    worker_id: String,
}

fn spawn_worker(url: &str, queue: &str) -> Proc {
    let settings = [
        ("CONCURRENCY", "4"),
        ("LEASE_MS", "1000"),
        ("SWEEP_MS", "200"),
        ("WORK_MS", "20"),
        ("MAX_STALLS", "100"),
    ];
    let (child, worker_id) = support::spawn_worker_process(url, queue, &settings);
    Proc { child, worker_id }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_completes_exactly_once_while_workers_are_killed() {
    let server = RedisServer::start();
    let q = queue_name("chaos");
    let url = server.url();

    // Count the doorbells: each accepted completion rings exactly one.
    let doorbells: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let mut pubsub = redis::Client::open(url.as_str())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub
        .psubscribe(format!("jq:{{{q}}}:reply:*"))
        .await
        .unwrap();
    let seen = doorbells.clone();
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            // One doorbell, or an array of them for one client's jobs.
            let bells = match rmp_serde::from_slice(msg.get_payload_bytes()).unwrap() {
                Bells::Many(bells) => bells,
                Bells::One(bell) => vec![bell],
            };
            let mut seen = seen.lock().unwrap();
            for bell in bells {
                seen.entry(bell.id).or_default().push(bell.status);
            }
        }
    });

    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    let numbers: Vec<u64> = (0..JOBS).collect();
    let handles = queue.submit_many(&numbers).await.unwrap();

    let mut workers: Vec<Proc> = (0..3).map(|_| spawn_worker(&url, &q)).collect();
    let mut con = server.connection();
    let mut rng = fastrand::Rng::with_seed(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let mut kills = 0;
    let mut requeue_times = Vec::new();
    while kills < 8 {
        tokio::time::sleep(Duration::from_millis(rng.u64(100..300))).await;
        let remaining: usize = con.llen(format!("jq:{{{q}}}:pending")).unwrap();
        if remaining == 0 {
            break;
        }
        let victim = workers.swap_remove(rng.usize(..workers.len()));
        let inflight = format!("jq:{{{q}}}:inflight:{}", victim.worker_id);
        let mut child = victim.child;
        child.kill().unwrap(); // SIGKILL: no cleanup at all
        child.wait().unwrap();
        let killed_at = Instant::now();
        kills += 1;
        let held: usize = con.llen(&inflight).unwrap();
        workers.push(spawn_worker(&url, &q));
        if held > 0 && requeue_times.len() < 3 {
            // Time from the death to its jobs being back on the queue.
            while con.llen::<_, usize>(&inflight).unwrap() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            requeue_times.push(killed_at.elapsed());
        }
    }

    for (n, h) in numbers.iter().zip(handles) {
        let doubled: u64 = h.result_timeout(Duration::from_secs(60)).await.unwrap();
        assert_eq!(doubled, n * 2);
    }
    // Stop the survivors gracefully (SIGTERM).
    for w in &mut workers {
        Command::new("kill")
            .arg("-TERM")
            .arg(w.child.id().to_string())
            .status()
            .unwrap();
    }
    for w in &mut workers {
        assert!(w.child.wait().unwrap().success());
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // last doorbells
    let bells = doorbells.lock().unwrap();
    let mut ids = 0;
    for (id, statuses) in bells.iter() {
        assert_eq!(statuses, &vec!["completed".to_string()], "job {id}");
        let state: String = con.hget(format!("jq:{{{q}}}:job:{id}"), "state").unwrap();
        assert_eq!(state, "completed");
        ids += 1;
    }
    assert_eq!(ids, JOBS as usize, "every job rang its doorbell once");
    let pending: usize = con.llen(format!("jq:{{{q}}}:pending")).unwrap();
    assert_eq!(pending, 0);
    let inflight: Vec<String> = con.keys(format!("jq:{{{q}}}:inflight:*")).unwrap();
    assert!(inflight.is_empty(), "{inflight:?}");
    let dead: usize = con.zcard(format!("jq:{{{q}}}:dead_jobs")).unwrap();
    assert_eq!(dead, 0);
    let stalled = bells
        .keys()
        .filter(|id| {
            // An absent field is its default, 0.
            con.hget::<_, _, Option<u32>>(format!("jq:{{{q}}}:job:{id}"), "stalls")
                .unwrap()
                .unwrap_or(0)
                > 0
        })
        .count();
    println!(
        "{JOBS} jobs, {kills} workers killed with SIGKILL, {stalled} jobs redelivered; death to requeue: {:?}",
        requeue_times
    );
    assert!(
        kills >= 5,
        "the run was too short to kill workers while they worked"
    );
}
