//! Recurring schedules (`Queue::set_schedule`): one job per fire however
//! many workers and processes fire them, also while one of those processes
//! is SIGKILLed; cron patterns in a time zone; missed fires skipped or
//! caught up once; listing, changing and removing schedules.

mod support;

use std::collections::BTreeSet;
use std::process::{Child, Command};
use std::time::Duration;

use job_async_redis::{Client, Error, Job, JobOptions, Missed, Mode, Schedule, Worker};
use redis::Commands;
use support::{RedisServer, config, queue_name, spawn_built};

/// The fire times (ms) of the jobs schedule `name` submitted, from their
/// IDs (`<name>@<fire ms>`).
fn fire_times(server: &RedisServer, q: &str, name: &str) -> Vec<u64> {
    let mut con = server.connection();
    let keys: Vec<String> = con.keys(format!("jq:{{{q}}}:job:{name}@*")).unwrap();
    let mut times: Vec<u64> = keys
        .iter()
        .map(|k| k.rsplit('@').next().unwrap().parse().unwrap())
        .collect();
    times.sort_unstable();
    times
}

fn worker(server: &RedisServer, mode: Mode, q: &str) -> job_async_redis::WorkerBuilder {
    Worker::builder(config(server))
        .mode(mode)
        .queue(q)
        .concurrency(4)
        .lease(Duration::from_secs(1))
}

async fn double(job: Job<u64>) -> Result<u64, String> {
    Ok(job.payload * 2)
}

/// Consecutive fires of an interval schedule are one interval apart: no
/// fire was skipped and none made twice.
fn assert_every_tick_once(times: &[u64], interval: u64) {
    assert!(times.len() >= 2, "fires: {times:?}");
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], interval, "fires {times:?}");
    }
}

#[tokio::test]
async fn three_workers_make_one_job_per_fire() {
    let server = RedisServer::start();
    let q = queue_name("every");
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(spawn_built(worker(&server, Mode::Recoverable, &q), double).await);
    }
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let every = Schedule::every(Duration::from_millis(200));
    assert!(queue.set_schedule("tick", &every, &21u64).await.unwrap());
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    assert!(queue.remove_schedule("tick").await.unwrap());
    let times = fire_times(&server, &q, "tick");
    assert!((9..=12).contains(&times.len()), "{times:?}");
    assert_every_tick_once(&times, 200);
    // Every fire's job ran, once.
    let last = format!("tick@{}", times.last().unwrap());
    let handle = queue.job(&last).await.unwrap();
    assert_eq!(
        handle
            .result_timeout::<u64>(Duration::from_secs(10))
            .await
            .unwrap(),
        42
    );
    let mut scheduled = 0;
    let mut completed = 0;
    for w in workers {
        let stats = w.stop().await;
        scheduled += stats.scheduled;
        completed += stats.completed;
    }
    assert_eq!(scheduled as usize, times.len());
    assert_eq!(completed as usize, times.len());
    assert!(!queue.remove_schedule("tick").await.unwrap());
    assert!(queue.schedules().await.unwrap().is_empty());
}

fn spawn_process(server: &RedisServer, q: &str) -> (Child, String) {
    let settings = [("LEASE_MS", "1000"), ("SWEEP_MS", "200")];
    support::spawn_worker_process(&server.url(), q, &settings)
}

/// Three worker processes fire a schedule; the timekeeper among them is
/// SIGKILLed. Its successor takes over a lease later and catches the fires
/// of that second up: every tick still makes exactly one job, and every job
/// completes.
#[tokio::test]
async fn every_tick_makes_one_job_while_a_process_is_sigkilled() {
    let server = RedisServer::start();
    let q = queue_name("kill");
    let mut procs: Vec<(Child, String)> = (0..3).map(|_| spawn_process(&server, &q)).collect();
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    queue
        .set_schedule("beat", &Schedule::every(Duration::from_millis(250)), &1u64)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let mut con = server.connection();
    let keeper: String = con.get(format!("jq:{{{q}}}:timekeeper")).unwrap();
    let victim = procs
        .iter()
        .position(|(_, id)| *id == keeper)
        .expect("a process keeps time");
    let (mut child, _) = procs.remove(victim);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    queue.remove_schedule("beat").await.unwrap();
    let times = fire_times(&server, &q, "beat");
    assert!(times.len() >= 14, "{times:?}");
    assert_every_tick_once(&times, 250);
    for t in &times {
        let handle = queue.job(&format!("beat@{t}")).await.unwrap();
        assert_eq!(
            handle
                .result_timeout::<u64>(Duration::from_secs(15))
                .await
                .unwrap(),
            2
        );
    }
    for (mut child, _) in procs {
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        child.wait().unwrap();
    }
}

/// A cron pattern with seconds in a time zone 5:45 ahead of UTC: it fires
/// on its matching instants (every even second), each once.
#[tokio::test]
async fn a_cron_schedule_in_a_time_zone_fires_at_its_instants() {
    let server = RedisServer::start();
    let q = queue_name("cron");
    let running = spawn_built(worker(&server, Mode::Reliable, &q), double).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    let cron = Schedule::cron("*/2 * * * * *")
        .unwrap()
        .time_zone("Asia/Kathmandu")
        .unwrap();
    queue.set_schedule("even", &cron, &5u64).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let info = queue.schedules().await.unwrap();
    queue.remove_schedule("even").await.unwrap();
    let times = fire_times(&server, &q, "even");
    assert!((2..=3).contains(&times.len()), "{times:?}");
    for t in &times {
        assert_eq!(t % 2_000, 0, "{t} is not an even second");
    }
    assert_every_tick_once(&times, 2_000);
    assert_eq!(info.len(), 1);
    let info = &info[0];
    assert_eq!(
        (info.spec.as_str(), info.time_zone.as_str()),
        ("cron:*/2 * * * * *", "Asia/Kathmandu")
    );
    assert_eq!(info.fires as usize, times.len());
    assert_eq!(
        info.last_job.as_deref(),
        Some(format!("even@{}", times.last().unwrap()).as_str())
    );
    assert_eq!(info.next_ms, Some(times.last().unwrap() + 2_000));
    running.stop().await;
}

/// Fires missed while no worker ran: `Skip` drops them, `Once` makes one
/// job for all of them; then both fire on time again.
#[tokio::test]
async fn missed_fires_are_skipped_or_made_once() {
    let server = RedisServer::start();
    let q = queue_name("missed");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let every = Schedule::every(Duration::from_millis(100)).grace(Duration::from_millis(300));
    queue
        .set_schedule("skip", &every.clone().missed(Missed::Skip), &1u64)
        .await
        .unwrap();
    queue
        .set_schedule("once", &every.missed(Missed::Once), &1u64)
        .await
        .unwrap();
    // Nobody runs for 1.5 s: 14 fires of each are missed.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let running = spawn_built(worker(&server, Mode::Recoverable, &q), double).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let info = queue.schedules().await.unwrap();
    for name in ["skip", "once"] {
        queue.remove_schedule(name).await.unwrap();
    }
    let skip = fire_times(&server, &q, "skip");
    let once = fire_times(&server, &q, "once");
    // Skip: nothing for the missed fires, then every fire after the start.
    assert!(
        skip.iter().all(|&t| t + 150 >= started),
        "skip {skip:?} from {started}"
    );
    assert!(skip.len() >= 4, "{skip:?}");
    assert_every_tick_once(&skip, 100);
    // Once: one job for the missed fires (the first, more than 300 ms
    // before the start), then every fire after the start.
    assert!(once[0] + 300 < started, "once {once:?} from {started}");
    assert!(
        once[1..].iter().all(|&t| t + 150 >= started),
        "once {once:?}"
    );
    assert_every_tick_once(&once[1..], 100);
    let skipped = info.iter().find(|i| i.name == "skip").unwrap();
    assert_eq!(skipped.skipped, 1);
    running.stop().await;
}

/// Changing a schedule replaces its definition and keeps its history;
/// invalid schedules are refused before anything is written.
#[tokio::test]
async fn schedules_are_changed_listed_and_refused_when_invalid() {
    let server = RedisServer::start();
    let q = queue_name("change");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    let hourly = Schedule::cron("0 * * * *").unwrap();
    assert!(queue.set_schedule("report", &hourly, &1u64).await.unwrap());
    let first = queue.schedules().await.unwrap();
    assert_eq!(first[0].next_ms.unwrap() % 3_600_000, 0);
    let daily = Schedule::cron("0 6 * * *")
        .unwrap()
        .time_zone("America/New_York")
        .unwrap()
        .options(JobOptions::default().max_attempts(3));
    assert!(!queue.set_schedule("report", &daily, &2u64).await.unwrap());
    let second = queue.schedules().await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].spec, "cron:0 6 * * *");
    assert_eq!(second[0].time_zone, "America/New_York");
    let mut con = server.connection();
    let attempts: String = con
        .hget(format!("jq:{{{q}}}:schedule:report"), "max_attempts")
        .unwrap();
    assert_eq!(attempts, "3");
    // Refused: simple mode, bad names, job options a fire cannot have.
    let simple = client.queue(&queue_name("s"), Mode::Simple).await.unwrap();
    let every = Schedule::every(Duration::from_secs(1));
    assert!(matches!(
        simple.set_schedule("x", &every, &1u64).await,
        Err(Error::Config(_))
    ));
    assert!(matches!(
        queue.set_schedule("", &every, &1u64).await,
        Err(Error::InvalidName(_))
    ));
    assert!(matches!(
        queue.set_schedule("a\nb", &every, &1u64).await,
        Err(Error::InvalidName(_))
    ));
    let with_id = every.clone().options(JobOptions::default().id("fixed"));
    assert!(matches!(
        queue.set_schedule("x", &with_id, &1u64).await,
        Err(Error::Config(_))
    ));
    assert!(matches!(
        Schedule::cron("every tuesday"),
        Err(Error::Config(_))
    ));
    let names: BTreeSet<String> = queue
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, BTreeSet::from(["report".to_string()]));
}

/// Setting the same schedule again (a fleet that upserts its schedules at
/// every start) keeps its next fire: it neither delays nor drops fires. A
/// next fire stored with a leading zero by another program is fired once
/// and stored back canonical.
#[tokio::test]
async fn setting_a_schedule_again_keeps_its_phase_and_odd_numbers_do_not_spin() {
    let server = RedisServer::start();
    let q = queue_name("upsert");
    let running = spawn_built(worker(&server, Mode::Recoverable, &q), double).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let every = Schedule::every(Duration::from_millis(600));
    queue.set_schedule("up", &every, &1u64).await.unwrap();
    let first = queue.schedules().await.unwrap()[0].next_ms;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        queue.set_schedule("up", &every, &1u64).await.unwrap();
    }
    let times = fire_times(&server, &q, "up");
    assert!(
        times.len() >= 2,
        "re-setting starved the schedule: {times:?}"
    );
    assert_eq!(Some(times[0]), first);
    assert_every_tick_once(&times, 600);
    // Another program wrote the next fire as "0<ms>".
    queue.remove_schedule("up").await.unwrap();
    let hourly = Schedule::every(Duration::from_secs(3600));
    queue.set_schedule("odd", &hourly, &1u64).await.unwrap();
    let mut con = server.connection();
    let due = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 200;
    let key = format!("jq:{{{q}}}:schedule:odd");
    let _: () = con.hset(&key, "next_ms", format!("0{due}")).unwrap();
    let _: () = con
        .zadd(format!("jq:{{{q}}}:schedules"), "odd", due)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let next: String = con.hget(&key, "next_ms").unwrap();
    assert_eq!(next, (due + 3_600_000).to_string());
    let fires: String = con.hget(&key, "fires").unwrap();
    assert_eq!(fires, "1");
    let stats = running.stop().await;
    assert!(stats.scheduled >= 3);
}
