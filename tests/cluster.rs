//! Redis Cluster: every mode on a real local cluster (3 primaries, 3
//! replicas) with the same test bodies as on a single server, many queues
//! spread over all primaries, sharded notifications, and a failover while
//! reliable-mode workers run.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use job_async_redis::{Client, Config, Encoding, Error, Job, Mode, Worker};
use support::{RedisCluster, RedisServer, eventually, queue_name, reverse, spawn_built};

const WAIT: Duration = Duration::from_secs(30);

fn tuned(config: Config) -> Config {
    config.block_timeout(Duration::from_millis(500))
}

/// One test body, two backends: every mode, both encodings, a batch each.
async fn every_mode_round_trips(config: Config) {
    let client = Client::connect(config.clone()).await.unwrap();
    for mode in [Mode::Simple, Mode::Recoverable, Mode::Reliable] {
        let q = queue_name(mode.as_str());
        let builder = Worker::builder(config.clone())
            .mode(mode)
            .queue(&q)
            .concurrency(4);
        let worker = spawn_built(builder, reverse).await;
        for enc in [Encoding::MessagePack, Encoding::Json] {
            let queue = client.queue(&q, mode).await.unwrap().with_encoding(enc);
            let texts: Vec<String> = (0..50).map(|i| format!("{mode} {enc:?} {i}")).collect();
            for (t, h) in texts.iter().zip(queue.submit_many(&texts).await.unwrap()) {
                let out: String = h.result_timeout(WAIT).await.unwrap();
                assert_eq!(out, t.chars().rev().collect::<String>(), "{mode} {enc:?}");
            }
        }
        assert_eq!(worker.stop().await.completed, 100, "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_on_a_single_server() {
    let server = RedisServer::start();
    every_mode_round_trips(tuned(Config::new(server.url()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_on_a_cluster() {
    let cluster = RedisCluster::start();
    every_mode_round_trips(tuned(Config::new(cluster.url()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_queues_spread_over_all_primaries() {
    let cluster = RedisCluster::start();
    let config = tuned(Config::new(cluster.url()));
    // Four queues on each of the three primaries (names drawn until they
    // cover every primary).
    let mut per_primary: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    while per_primary.len() < 3 || per_primary.values().any(|qs| qs.len() < 4) {
        let q = queue_name("spread");
        let port = cluster
            .primary_and_replica_of(&format!("jq:{{{q}}}:meta"))
            .0
            .port();
        let bucket = per_primary.entry(port).or_default();
        if bucket.len() < 4 {
            bucket.push(q);
        }
    }
    let queues: Vec<String> = per_primary.into_values().flatten().collect();
    let metas: Vec<String> = queues.iter().map(|q| format!("jq:{{{q}}}:meta")).collect();
    assert_eq!(
        cluster.primaries_serving(&metas),
        3,
        "the queues land on every primary"
    );
    // One recoverable worker serving all of them (it blocks on each in turn).
    let mut rec = Worker::builder(config.clone())
        .mode(Mode::Recoverable)
        .concurrency(8);
    for q in &queues {
        rec = rec.queue(q.as_str());
    }
    let rec_worker = spawn_built(rec, reverse).await;
    let client = Client::connect(config.clone()).await.unwrap();
    let mut handles = Vec::new();
    for q in &queues {
        let queue = client.queue(q, Mode::Recoverable).await.unwrap();
        for i in 0..20 {
            handles.push((
                format!("{q}/{i}"),
                queue.submit(&format!("{q}/{i}")).await.unwrap(),
            ));
        }
    }
    for (text, h) in handles {
        assert_eq!(
            h.result_timeout::<String>(WAIT).await.unwrap(),
            text.chars().rev().collect::<String>()
        );
    }
    assert_eq!(rec_worker.stop().await.completed, 240);
    // The admin API finds every queue, whichever primary holds it, and
    // reads one on its primary.
    let admin = client.admin();
    let found: Vec<String> = admin
        .queues()
        .await
        .unwrap()
        .into_iter()
        .filter(|q| q.mode == "recoverable")
        .map(|q| q.name)
        .collect();
    let mut expected = queues.clone();
    expected.sort();
    assert_eq!(found, expected);
    for q in &queues {
        let overview = admin.overview(q).await.unwrap();
        assert_eq!(
            (overview.counts.waiting, overview.counts.active),
            (0, Some(0)),
            "{q}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_reliable_workers_loses_nothing() {
    const JOBS: usize = 1500;
    let cluster = RedisCluster::start();
    let config = tuned(Config::new(cluster.url()));
    let q = queue_name("failover");
    let ran = Arc::new(AtomicUsize::new(0));
    let handler = {
        let ran = ran.clone();
        move |job: Job<u64>| {
            ran.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok::<_, String>(job.payload * 2)
            }
        }
    };
    let builder = || {
        Worker::builder(config.clone())
            .mode(Mode::Reliable)
            .queue(&q)
            .concurrency(8)
    };
    let workers = [
        spawn_built(builder(), handler.clone()).await,
        spawn_built(builder(), handler).await,
    ];
    let client = Client::connect(config.clone()).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    let numbers: Vec<u64> = (0..JOBS as u64).collect();
    let handles = queue.submit_many(&numbers).await.unwrap();

    // Fail the queue's primary over to its replica while the workers run.
    eventually("the workers are busy", || ran.load(Ordering::SeqCst) > 200).await;
    let (primary, replica) = cluster.primary_and_replica_of(&format!("jq:{{{q}}}:pending"));
    let primary_port = primary.port();
    let _: () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query(&mut replica.connection())
        .unwrap();
    eventually("the replica was promoted", || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut replica.connection())
            .unwrap();
        info.contains("role:master")
    })
    .await;
    let done_at_failover = ran.load(Ordering::SeqCst);
    assert!(
        done_at_failover < JOBS,
        "the failover happened while jobs were still running"
    );

    for (n, h) in numbers.iter().zip(handles) {
        assert_eq!(h.result_timeout::<u64>(WAIT).await.unwrap(), n * 2);
    }
    let mut completed = 0;
    for w in workers {
        let stats = w.stop().await;
        completed += stats.completed;
    }
    // Every job's completion was accepted exactly once.
    assert_eq!(completed, JOBS as u64);
    let (new_primary, _) = cluster.primary_and_replica_of(&format!("jq:{{{q}}}:pending"));
    assert_ne!(
        new_primary.port(),
        primary_port,
        "the queue moved to the promoted replica"
    );
    println!(
        "failover after {done_at_failover} of {JOBS} jobs; {} handler runs in all",
        ran.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_can_wait_for_replicas() {
    let cluster = RedisCluster::start();
    let q = queue_name("durable");
    let base = tuned(Config::new(cluster.url()));
    let client = Client::connect(base.clone().wait_for_replicas(1, Duration::from_secs(2)))
        .await
        .unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    queue.submit("replicated").await.unwrap();
    // No primary has three replicas: the job is queued, and the caller told.
    let client = Client::connect(base.wait_for_replicas(3, Duration::from_millis(200)))
        .await
        .unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let err = queue.submit("not enough replicas").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotReplicated {
                acked: 1,
                wanted: 3
            }
        ),
        "{err}"
    );
}

/// Clients awaiting results when their queue's primary fails over (cleanly,
/// or killed) get every result, none an error: the awaits retry and
/// re-subscribe; only their own timeout could end them.
async fn waiting_results_ride_through_a_failover(kill_the_primary: bool) {
    const JOBS: u64 = 400;
    let mut cluster = RedisCluster::start();
    let config = tuned(Config::new(cluster.url()));
    let ran = Arc::new(AtomicUsize::new(0));
    let handler = {
        let ran = ran.clone();
        move |job: Job<u64>| {
            ran.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok::<_, String>(job.payload * 2)
            }
        }
    };
    let mut workers = Vec::new();
    let mut awaits = tokio::task::JoinSet::new();
    let mut queues = Vec::new();
    // Submits wait for a replica, so that killing the primary cannot lose
    // an acknowledged job (Redis replicates asynchronously).
    let client = Client::connect(config.clone().wait_for_replicas(1, Duration::from_secs(2)))
        .await
        .unwrap();
    for mode in [Mode::Recoverable, Mode::Reliable] {
        let q = queue_name(mode.as_str());
        let builder = Worker::builder(config.clone())
            .mode(mode)
            .queue(&q)
            .concurrency(2)
            .lease(Duration::from_secs(2));
        workers.push(spawn_built(builder, handler.clone()).await);
        let queue = client.queue(&q, mode).await.unwrap();
        let numbers: Vec<u64> = (0..JOBS).collect();
        for (n, h) in numbers
            .iter()
            .zip(queue.submit_many(&numbers).await.unwrap())
        {
            let n = *n;
            awaits
                .spawn(async move { (n, h.result_timeout::<u64>(Duration::from_secs(90)).await) });
        }
        queues.push(q);
    }
    eventually("the workers are busy", || ran.load(Ordering::SeqCst) > 50).await;
    // Both queues on the same shard would be neater; one of them is enough
    // to fail over: take the first queue's primary.
    let (primary, replica) =
        cluster.primary_and_replica_of(&format!("jq:{{{}}}:pending", queues[0]));
    let (primary_port, replica_port) = (primary.port(), replica.port());
    // Jobs of that queue are still waiting, so their clients' awaits are
    // pending on the shard that fails over.
    let waiting: i64 = redis::cmd("LLEN")
        .arg(format!("jq:{{{}}}:pending", queues[0]))
        .query(&mut primary.connection())
        .unwrap();
    assert!(waiting > 0, "awaits are pending on the failed-over shard");
    if kill_the_primary {
        let node = cluster
            .nodes
            .iter_mut()
            .find(|n| n.port() == primary_port)
            .unwrap();
        node.stop();
    } else {
        let _: () = redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query(&mut replica.connection())
            .unwrap();
    }
    let promoted = cluster
        .nodes
        .iter()
        .find(|n| n.port() == replica_port)
        .unwrap();
    eventually("the replica was promoted", || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut promoted.connection())
            .unwrap();
        info.contains("role:master")
    })
    .await;
    let at_failover = ran.load(Ordering::SeqCst);
    assert!(
        at_failover < 2 * JOBS as usize,
        "the failover happened while jobs were still running"
    );
    let mut answered = 0;
    let mut failed = Vec::new();
    while let Some(joined) = awaits.join_next().await {
        let (n, result) = joined.unwrap();
        match result {
            Ok(doubled) => assert_eq!(doubled, n * 2),
            Err(e) => failed.push(e),
        }
        answered += 1;
    }
    if !failed.is_empty() {
        let checker = Client::connect(config.clone()).await.unwrap();
        for e in failed.iter().take(3) {
            if let Error::Timeout { job_id, .. } = e {
                for (q, mode) in queues.iter().zip([Mode::Recoverable, Mode::Reliable]) {
                    let queue = checker.queue(q, mode).await.unwrap();
                    eprintln!("{q} {job_id}: {:?}", queue.status(job_id).await);
                }
            }
        }
        panic!(
            "{} awaits failed after the failover; first: {}",
            failed.len(),
            failed[0]
        );
    }
    assert_eq!(answered, 2 * JOBS);
    for w in workers {
        w.stop().await;
    }
    println!(
        "failover ({}) after {at_failover} handler runs; {} in all",
        if kill_the_primary {
            "primary killed"
        } else {
            "clean"
        },
        ran.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_results_ride_through_a_clean_failover() {
    waiting_results_ride_through_a_failover(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_results_ride_through_a_killed_primary() {
    waiting_results_ride_through_a_failover(true).await;
}

/// Delayed jobs and retries with backoff on a cluster: three queues on
/// three primaries served by one recoverable worker (a clock wait per
/// queue), and a reliable queue whose primary fails over (CLUSTER FAILOVER)
/// while its delayed jobs wait. Every job runs once, never before it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_jobs_and_backoff_on_a_cluster_and_across_a_failover() {
    use job_async_redis::{Backoff, JobOptions};
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::{SystemTime, UNIX_EPOCH};
    let now_ms = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let cluster = RedisCluster::start();
    let config = tuned(Config::new(cluster.url()));
    // One queue per primary.
    let mut by_primary: std::collections::BTreeMap<u16, String> = Default::default();
    while by_primary.len() < 3 {
        let q = queue_name("delayed");
        let port = cluster
            .primary_and_replica_of(&format!("jq:{{{q}}}:meta"))
            .0
            .port();
        by_primary.entry(port).or_insert(q);
    }
    let queues: Vec<String> = by_primary.into_values().collect();
    let starts: Arc<Mutex<HashMap<String, Vec<u64>>>> = Default::default();
    let handler = {
        let starts = starts.clone();
        move |job: Job<String>| {
            let attempt = {
                let mut map = starts.lock().unwrap();
                let list = map.entry(job.id.clone()).or_default();
                list.push(now_ms());
                list.len()
            };
            async move {
                if job.payload == "flaky" && attempt < 3 {
                    return Err("not yet".to_string());
                }
                Ok(job.payload)
            }
        }
    };
    let mut rec = Worker::builder(config.clone())
        .mode(Mode::Recoverable)
        .concurrency(4)
        .lease(Duration::from_secs(2));
    for q in &queues {
        rec = rec.queue(q.as_str());
    }
    let rec_worker = spawn_built(rec, handler.clone()).await;
    let client = Client::connect(config.clone()).await.unwrap();
    // A recurring schedule on the last queue, fired while the jobs below run.
    let scheduled = client.queue(&queues[2], Mode::Recoverable).await.unwrap();
    let every = job_async_redis::Schedule::every(Duration::from_millis(250));
    scheduled
        .set_schedule("tick", &every, "tick")
        .await
        .unwrap();
    let mut due = Vec::new();
    for (i, q) in queues.iter().enumerate() {
        let queue = client.queue(q, Mode::Recoverable).await.unwrap();
        for j in 0..5u64 {
            let delay = 300 + 150 * (i as u64) + 60 * j;
            let at = now_ms() + delay;
            let options = JobOptions::default().delay(Duration::from_millis(delay));
            due.push((queue.submit_with("plain", options).await.unwrap(), at));
        }
        let backoff = JobOptions::default()
            .max_attempts(3)
            .backoff(Backoff::fixed(Duration::from_millis(300)));
        due.push((queue.submit_with("flaky", backoff).await.unwrap(), 0));
    }
    for (h, at) in due {
        let id = h.id().to_owned();
        h.result_timeout::<String>(WAIT).await.unwrap();
        let starts = starts.lock().unwrap()[&id].clone();
        assert!(starts[0] >= at, "{id} started before its due time");
        if at > 0 {
            assert!(
                starts[0] < at + 1_000,
                "{id} started {} ms late",
                starts[0] - at
            );
        }
        for gap in starts.windows(2).map(|w| w[1] - w[0]) {
            assert!(
                gap >= 300,
                "{id}: retries {starts:?} closer than the backoff"
            );
        }
    }
    scheduled.remove_schedule("tick").await.unwrap();
    // One job per fire, 250 ms apart, none missing: read on the queue's node.
    let node = cluster
        .primary_and_replica_of(&format!("jq:{{{}}}:meta", queues[2]))
        .0;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("jq:{{{}}}:job:tick@*", queues[2]))
        .query(&mut node.connection())
        .unwrap();
    let mut fires: Vec<u64> = keys
        .iter()
        .map(|k| k.rsplit('@').next().unwrap().parse().unwrap())
        .collect();
    fires.sort_unstable();
    assert!(fires.len() >= 2, "{fires:?}");
    assert!(fires.windows(2).all(|w| w[1] - w[0] == 250), "{fires:?}");
    for t in &fires {
        let h = scheduled.job(&format!("tick@{t}")).await.unwrap();
        assert_eq!(h.result_timeout::<String>(WAIT).await.unwrap(), "tick");
    }
    assert_eq!(rec_worker.stop().await.completed, 18 + fires.len() as u64);

    // Reliable mode, across a failover of the queue's primary.
    let q = queue_name("delayed-failover");
    let rel = Worker::builder(config.clone())
        .mode(Mode::Reliable)
        .queue(&q)
        .concurrency(4)
        .lease(Duration::from_secs(2));
    let rel_worker = spawn_built(rel, handler).await;
    let waiting_client =
        Client::connect(config.clone().wait_for_replicas(1, Duration::from_secs(2)))
            .await
            .unwrap();
    let queue = waiting_client.queue(&q, Mode::Reliable).await.unwrap();
    let mut handles = Vec::new();
    for j in 0..10u64 {
        let delay = 2_000 + 100 * j;
        let at = now_ms() + delay;
        let options = JobOptions::default().delay(Duration::from_millis(delay));
        handles.push((queue.submit_with("later", options).await.unwrap(), at));
    }
    let (_, replica) = cluster.primary_and_replica_of(&format!("jq:{{{q}}}:delayed"));
    let _: () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query(&mut replica.connection())
        .unwrap();
    for (h, at) in handles {
        let id = h.id().to_owned();
        h.result_timeout::<String>(WAIT).await.unwrap();
        let first = starts.lock().unwrap()[&id][0];
        assert!(first >= at, "{id} started before its due time");
    }
    assert_eq!(rel_worker.stop().await.completed, 10);
}
