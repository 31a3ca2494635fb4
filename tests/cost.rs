//! What one job costs Redis in simple mode, counted with INFO commandstats.
//! Run with `--nocapture` to see the breakdown.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use job_async_redis::{Client, Mode};
use support::{RedisServer, config, queue_name, recoverable, reverse, spawn_built, spawn_worker};

/// Calls per command since the last CONFIG RESETSTAT.
fn commandstats(con: &mut redis::Connection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(con).unwrap();
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

#[tokio::test]
async fn a_simple_mode_job_costs_two_script_calls_and_at_most_one_pop() {
    const JOBS: u64 = 200;
    let server = RedisServer::start();
    let q = queue_name("cost");
    let worker = spawn_worker(config(&server), &[&q], 1, reverse).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Simple).await.unwrap();
    queue
        .submit("warm up")
        .await
        .unwrap()
        .result::<String>()
        .await
        .unwrap();

    let mut admin = server.connection();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut admin)
        .unwrap();
    for i in 0..JOBS {
        let h = queue.submit(&format!("job {i}")).await.unwrap();
        h.result_timeout::<String>(Duration::from_secs(10))
            .await
            .unwrap();
    }
    worker.stop().await;
    let stats = commandstats(&mut admin);
    let get = |name: &str| stats.get(name).copied().unwrap_or(0);
    println!("commands for {JOBS} jobs submitted and awaited one by one: {stats:?}");
    // Submit and reply are one script call each.
    assert_eq!(get("evalsha"), 2 * JOBS);
    // Inside them: HMGET + LPUSH (submit), PUBLISH (reply).
    assert_eq!(get("hmget"), JOBS);
    assert_eq!(get("lpush"), JOBS);
    assert_eq!(get("publish"), JOBS);
    // One pop per job, plus a few that timed out empty or were woken at shutdown.
    let pops = get("blmpop");
    assert!((JOBS..JOBS + 10).contains(&pops), "blmpop {pops}");
    // Nothing else on the hot path (INFO and CONFIG are this test's, CLIENT
    // UNBLOCK the worker's shutdown).
    let others: u64 = stats
        .iter()
        .filter(|(k, _)| {
            ![
                "evalsha",
                "hmget",
                "lpush",
                "publish",
                "blmpop",
                "info",
                "config|resetstat",
                "client|unblock",
            ]
            .contains(&k.as_str())
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(others, 0, "{stats:?}");
}

fn used_memory(con: &mut redis::Connection) -> i64 {
    let info: String = redis::cmd("INFO").arg("memory").query(con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory_dataset:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_recoverable_mode_job_costs_five_script_calls_and_one_pop() {
    const JOBS: u64 = 200;
    let server = RedisServer::start();
    let q = queue_name("cost-rec");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();

    // Memory per queued job: 10,000 jobs with a 20-byte payload, counted as
    // the growth of the dataset (keys and values, without client buffers).
    let mut admin = server.connection();
    let before = used_memory(&mut admin);
    let payloads: Vec<String> = (0..10_000)
        .map(|i| format!("payload number {i:05}"))
        .collect();
    let handles = queue.submit_many(&payloads).await.unwrap();
    let per_job = (used_memory(&mut admin) - before) / 10_000;
    println!("redis memory per queued job (20-byte payload): {per_job} bytes");
    assert!(per_job < 600, "{per_job} bytes per queued job");
    drop(handles);
    let _: () = redis::cmd("FLUSHALL").query(&mut admin).unwrap();

    let worker = spawn_built(recoverable(config(&server), &q).concurrency(1), reverse).await;
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    queue
        .submit("warm up")
        .await
        .unwrap()
        .result::<String>()
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut admin)
        .unwrap();
    for i in 0..JOBS {
        let h = queue.submit(&format!("job {i}")).await.unwrap();
        h.result_timeout::<String>(Duration::from_secs(10))
            .await
            .unwrap();
    }
    worker.stop().await;
    let stats = commandstats(&mut admin);
    let get = |name: &str| stats.get(name).copied().unwrap_or(0);
    let inner: u64 = stats
        .iter()
        .filter(|(k, _)| {
            ![
                "evalsha",
                "blmpop",
                "info",
                "config|resetstat",
                "client|unblock",
            ]
            .contains(&k.as_str())
        })
        .map(|(_, v)| v)
        .sum();
    println!(
        "recoverable mode, {JOBS} jobs one by one: {:.2} script calls, {:.2} blocking pops, {:.2} commands inside scripts per job; {stats:?}",
        get("evalsha") as f64 / JOBS as f64,
        get("blmpop") as f64 / JOBS as f64,
        inner as f64 / JOBS as f64,
    );
    // submit, claim (after a ticket), start, finish, watch: five script
    // calls (plus the sweeps, a few per second for all jobs together).
    let per_job = get("evalsha") as f64 / JOBS as f64;
    assert!(
        (5.0..=5.5).contains(&per_job),
        "{per_job} script calls per job"
    );
    let pops = get("blmpop");
    assert!((JOBS..JOBS + 10).contains(&pops), "blmpop {pops}");
}
