//! Delayed jobs, retries with backoff and handler-chosen retries
//! (`JobOptions::delay`, `run_at`, `backoff`; `JobError`), in every mode
//! where they apply: a delayed job never starts before it is due and starts
//! soon after; the queue's timekeeper wakes for a job due earlier than the
//! one it sleeps for, is replaced when its process is SIGKILLed, and delayed
//! jobs survive a Redis restart; many jobs due at once are moved in bounded
//! batches.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use job_async_redis::{
    Backoff, Client, Error, FailureKind, Job, JobError, JobOptions, JobState, Mode, Worker,
};
use redis::Commands;
use support::{RedisServer, config, queue_name, spawn_built};

const WAIT: Duration = Duration::from_secs(20);

/// How late a due job may start on an idle worker in these tests: the
/// design aims at a few ms; shared CI machines get slack.
const SOON: u64 = 250;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Start times (ms since the epoch, this machine's clock) of each job's
/// attempts, by job ID.
type Starts = Arc<Mutex<HashMap<String, Vec<u64>>>>;

fn record(starts: &Starts, id: &str) -> usize {
    let mut map = starts.lock().unwrap();
    let list = map.entry(id.to_owned()).or_default();
    list.push(now_ms());
    list.len()
}

/// A handler that records each start in `starts` and returns its payload.
fn echo<T: Send + 'static>(
    starts: &Starts,
) -> impl Fn(Job<T>) -> std::future::Ready<Result<T, String>> + Send + Sync + 'static {
    let starts = starts.clone();
    move |job: Job<T>| {
        record(&starts, &job.id);
        std::future::ready(Ok(job.payload))
    }
}

fn worker(server: &RedisServer, mode: Mode, q: &str) -> job_async_redis::WorkerBuilder {
    Worker::builder(config(server))
        .mode(mode)
        .queue(q)
        .concurrency(8)
        .lease(Duration::from_secs(2))
}

fn hash_field(server: &RedisServer, q: &str, id: &str, field: &str) -> Option<u64> {
    let v: Option<String> = server
        .connection()
        .hget(format!("jq:{{{q}}}:job:{id}"), field)
        .unwrap();
    v.map(|s| s.parse().unwrap())
}

async fn delayed_jobs_start_when_due(mode: Mode) {
    let server = RedisServer::start();
    let q = queue_name(&format!("delay-{mode}"));
    let starts = Starts::default();
    let running = spawn_built(worker(&server, mode, &q), echo::<u64>(&starts)).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, mode).await.unwrap();
    // Twelve jobs due 150 ms to 1.25 s from now, out of order, plus one
    // without a delay that must not wait for them.
    let mut due = HashMap::new();
    let mut handles = Vec::new();
    for i in 0..12u64 {
        let delay = 150 + (i * 7 % 12) * 100;
        let submitted = now_ms();
        let handle = queue
            .submit_with(
                &delay,
                JobOptions::default().delay(Duration::from_millis(delay)),
            )
            .await
            .unwrap();
        due.insert(handle.id().to_owned(), submitted + delay);
        handles.push(handle);
    }
    let now = queue.submit(&0u64).await.unwrap();
    assert_eq!(now.result_timeout::<u64>(WAIT).await.unwrap(), 0);
    if mode != Mode::Simple {
        let first = handles[0].id().to_owned();
        let status = queue.status(&first).await.unwrap().unwrap();
        assert_eq!(status.state, JobState::Delayed, "{status:?}");
        assert!(status.due_ms.is_some());
    }
    for handle in handles {
        let id = handle.id().to_owned();
        handle.result_timeout::<u64>(WAIT).await.unwrap();
        let started = starts.lock().unwrap()[&id][0];
        // The due time was computed here before the submit reached Redis:
        // the job may not start before it; it starts soon after.
        assert!(
            started >= due[&id],
            "{id} started {} ms early",
            due[&id] - started
        );
        assert!(
            started < due[&id] + SOON,
            "{id} started {} ms late",
            started - due[&id]
        );
        if mode != Mode::Simple {
            let (due_ms, started_ms) = (
                hash_field(&server, &q, &id, "due_ms").unwrap(),
                hash_field(&server, &q, &id, "started_ms").unwrap(),
            );
            assert!(started_ms >= due_ms, "server time: started before due");
        }
    }
    let empty: usize = server
        .connection()
        .zcard(format!("jq:{{{q}}}:delayed"))
        .unwrap();
    assert_eq!(empty, 0);
    running.stop().await;
}

#[tokio::test]
async fn recoverable_delayed_jobs_start_when_due() {
    delayed_jobs_start_when_due(Mode::Recoverable).await;
}

#[tokio::test]
async fn reliable_delayed_jobs_start_when_due() {
    delayed_jobs_start_when_due(Mode::Reliable).await;
}

#[tokio::test]
async fn simple_delayed_jobs_start_when_due() {
    delayed_jobs_start_when_due(Mode::Simple).await;
}

#[tokio::test]
async fn run_at_runs_at_that_time_and_a_past_time_runs_at_once() {
    let server = RedisServer::start();
    let q = queue_name("run-at");
    let starts = Starts::default();
    let running = spawn_built(worker(&server, Mode::Recoverable, &q), echo::<u8>(&starts)).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let at = SystemTime::now() + Duration::from_millis(700);
    let later = queue
        .submit_with(&1u8, JobOptions::default().run_at(at))
        .await
        .unwrap();
    let past = queue
        .submit_with(
            &2u8,
            JobOptions::default().run_at(UNIX_EPOCH + Duration::from_secs(1)),
        )
        .await
        .unwrap();
    let later_id = later.id().to_owned();
    assert_eq!(past.result_timeout::<u8>(WAIT).await.unwrap(), 2);
    assert!(!starts.lock().unwrap().contains_key(&later_id));
    assert_eq!(later.result_timeout::<u8>(WAIT).await.unwrap(), 1);
    let at_ms = at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let started = starts.lock().unwrap()[&later_id][0];
    assert!(
        (at_ms..at_ms + SOON).contains(&started),
        "{started} vs {at_ms}"
    );
    // Options a script would refuse are refused before anything is sent.
    let too_far = JobOptions::default().delay(Duration::from_secs(2_000_000_000));
    assert!(matches!(
        queue.submit_with(&3u8, too_far).await,
        Err(Error::Config(_))
    ));
    let bad = JobOptions::default().backoff(Backoff::exponential(Duration::ZERO));
    assert!(matches!(
        queue.submit_with(&3u8, bad).await,
        Err(Error::Config(_))
    ));
    running.stop().await;
}

/// The timekeeper sleeps until the earliest job it knows of (here an hour
/// away, with renewals every 10 s): a job due sooner rings the clock list
/// and starts on time.
#[tokio::test]
async fn a_job_due_sooner_than_the_earliest_wakes_the_timekeeper() {
    let server = RedisServer::start();
    let q = queue_name("ring");
    let starts = Starts::default();
    let builder = worker(&server, Mode::Reliable, &q).lease(Duration::from_secs(30));
    let running = spawn_built(builder, echo::<u8>(&starts)).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    queue
        .submit_with(&0u8, JobOptions::default().delay(Duration::from_secs(3600)))
        .await
        .unwrap();
    // Let the worker become the timekeeper and go to sleep for the hour.
    let mut con = server.connection();
    support::eventually("a timekeeper", || {
        con.exists::<_, bool>(format!("jq:{{{q}}}:timekeeper"))
            .unwrap()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for delay in [400u64, 200] {
        let due = now_ms() + delay;
        let handle = queue
            .submit_with(
                &1u8,
                JobOptions::default().delay(Duration::from_millis(delay)),
            )
            .await
            .unwrap();
        let id = handle.id().to_owned();
        handle.result_timeout::<u8>(WAIT).await.unwrap();
        let started = starts.lock().unwrap()[&id][0];
        assert!(
            (due..due + SOON).contains(&started),
            "{delay} ms: {started} vs {due}"
        );
    }
    running.stop().await;
}

async fn backoff_spaces_the_retries(mode: Mode) {
    let server = RedisServer::start();
    let q = queue_name(&format!("backoff-{mode}"));
    let starts = Starts::default();
    let s = starts.clone();
    let running = spawn_built(worker(&server, mode, &q), move |job: Job<String>| {
        let attempt = record(&s, &job.id);
        async move {
            match job.payload.as_str() {
                // Fails twice by the policy, then succeeds.
                "policy" if attempt < 3 => Err(JobError::new("flaky")),
                // The API says when: 500 ms, whatever the policy says.
                "asked" if attempt == 1 => Err(JobError::retry_after(
                    "rate limited",
                    Duration::from_millis(500),
                )),
                // Retrying cannot help: no second attempt, attempts left or not.
                "never" => Err(JobError::no_retry("no such recipient")),
                _ => Ok(attempt as u32),
            }
        }
    })
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, mode).await.unwrap();
    let exponential = Backoff::exponential(Duration::from_millis(200)).max(Duration::from_secs(5));
    let options = JobOptions::default().max_attempts(5).backoff(exponential);
    let policy = queue.submit_with("policy", options.clone()).await.unwrap();
    let asked = queue.submit_with("asked", options.clone()).await.unwrap();
    let never = queue.submit_with("never", options).await.unwrap();
    let (policy_id, asked_id, never_id) = (
        policy.id().to_owned(),
        asked.id().to_owned(),
        never.id().to_owned(),
    );
    assert_eq!(policy.result_timeout::<u32>(WAIT).await.unwrap(), 3);
    assert_eq!(asked.result_timeout::<u32>(WAIT).await.unwrap(), 2);
    match never.result_timeout::<u32>(WAIT).await {
        Err(Error::JobFailed { kind, message, .. }) => {
            assert_eq!(
                (kind, message.as_str()),
                (FailureKind::Handler, "no such recipient")
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    let starts = starts.lock().unwrap().clone();
    let gaps = |id: &str| -> Vec<u64> { starts[id].windows(2).map(|w| w[1] - w[0]).collect() };
    // 200 ms after the first failure, 400 ms after the second.
    let policy_gaps = gaps(&policy_id);
    assert_eq!(policy_gaps.len(), 2);
    for (gap, want) in policy_gaps.iter().zip([200, 400]) {
        assert!(
            (want..want + SOON).contains(gap),
            "policy gaps {policy_gaps:?}"
        );
    }
    let asked_gaps = gaps(&asked_id);
    assert!(
        (500..500 + SOON).contains(&asked_gaps[0]),
        "asked gaps {asked_gaps:?}"
    );
    assert_eq!(starts[&never_id].len(), 1);
    let status = queue.status(&never_id).await.unwrap().unwrap();
    assert_eq!((status.state, status.attempt), (JobState::Failed, 1));
    running.stop().await;
}

#[tokio::test]
async fn recoverable_backoff_spaces_the_retries() {
    backoff_spaces_the_retries(Mode::Recoverable).await;
}

#[tokio::test]
async fn reliable_backoff_spaces_the_retries() {
    backoff_spaces_the_retries(Mode::Reliable).await;
}

/// A retry waiting for its backoff reads as delayed, due when the policy
/// says (the scripts compute the delay; `Backoff::delay` is the same
/// formula).
#[tokio::test]
async fn a_retry_waits_delayed_for_the_delay_the_policy_computes() {
    let server = RedisServer::start();
    let q = queue_name("backoff-status");
    let running = spawn_built(
        worker(&server, Mode::Recoverable, &q),
        |_job: Job<u8>| async move { Err::<u8, _>("always") },
    )
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let policy = Backoff::exponential(Duration::from_secs(60)).jitter(0.5);
    let handle = queue
        .submit_with(&1u8, JobOptions::default().max_attempts(2).backoff(policy))
        .await
        .unwrap();
    let id = handle.id().to_owned();
    let mut status = None;
    for _ in 0..500 {
        let s = queue.status(&id).await.unwrap().unwrap();
        if s.state == JobState::Delayed {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = status.expect("the failed attempt waits delayed");
    assert_eq!(status.attempt, 1);
    assert_eq!(status.backoff, Some(policy));
    assert_eq!(
        status.error.as_ref().map(|e| e.0.clone()),
        Some(FailureKind::Handler)
    );
    let finished = hash_field(&server, &q, &id, "finished_ms");
    assert_eq!(finished, None);
    // due = the failure's server time + the policy's delay for attempt 1.
    let delay = policy.delay(&id, 1).as_millis() as u64;
    assert!((30_000..=60_000).contains(&delay));
    let due = status.due_ms.unwrap();
    let started = status.started_ms.unwrap();
    assert!(
        due >= started + delay && due < started + delay + 5_000,
        "{due} {started} {delay}"
    );
    running.stop().await;
}

/// 50,000 jobs due at the same instant: moved by the timekeeper in batches
/// of 1,000, none of which keeps Redis busy for long.
#[tokio::test]
async fn fifty_thousand_jobs_due_at_once_are_promoted_in_bounded_batches() {
    const JOBS: usize = 50_000;
    let server = RedisServer::start();
    let q = queue_name("herd");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    // Due a while after the submit (50,000 jobs take a second or more to
    // submit on a busy machine, and each must still be delayed).
    let at = SystemTime::now() + Duration::from_secs(6);
    let payloads = vec![0u8; JOBS];
    let jobs = payloads
        .iter()
        .map(|p| (p, JobOptions::default().run_at(at)));
    queue.submit_many_with(jobs).await.unwrap();
    let mut con = server.connection();
    let delayed: usize = con.zcard(format!("jq:{{{q}}}:delayed")).unwrap();
    assert_eq!(delayed, JOBS);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(0)
        .arg("slowlog-max-len")
        .arg(1_000_000)
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("SLOWLOG").arg("RESET").query(&mut con).unwrap();
    // A worker that takes nothing (shut down at once would give the role
    // up): the timekeeper alone, with a handler that is never slow.
    let running = spawn_built(
        worker(&server, Mode::Reliable, &q).concurrency(1),
        |_job: Job<u8>| async move { Ok::<_, String>(0u8) },
    )
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let left: usize = con.zcard(format!("jq:{{{q}}}:delayed")).unwrap();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} jobs still delayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let promoted_at = now_ms();
    let at_ms = at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(promoted_at >= at_ms);
    let pending: usize = con.llen(format!("jq:{{{q}}}:pending")).unwrap();
    assert!(pending + 1_000 >= JOBS, "only {pending} pending");
    let promote_sha = job_async_redis::scripts::all()
        .iter()
        .find(|s| s.name() == "job_promote")
        .unwrap()
        .sha1()
        .to_owned();
    // Every command is logged: the job_promote calls, with their durations.
    let log: Vec<(i64, i64, i64, Vec<redis::Value>)> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query(&mut con)
        .map(|entries: Vec<Vec<redis::Value>>| {
            entries
                .into_iter()
                .filter_map(|e| {
                    let mut it = e.into_iter();
                    let (id, at, us, args) = (it.next()?, it.next()?, it.next()?, it.next()?);
                    Some((
                        redis::from_redis_value(id).ok()?,
                        redis::from_redis_value(at).ok()?,
                        redis::from_redis_value(us).ok()?,
                        redis::from_redis_value(args).ok()?,
                    ))
                })
                .collect()
        })
        .unwrap();
    let promotes: Vec<i64> = log
        .iter()
        .filter(|(_, _, _, args)| format!("{args:?}").contains(&promote_sha))
        .map(|(_, _, us, _)| *us)
        .collect();
    // 50 batches of 1,000 (more calls when some came before the jobs were
    // due), each short: a batch takes about a millisecond; 100 ms leaves
    // room for a loaded machine, and is far below what one call moving
    // all 50,000 would take.
    assert!(
        promotes.len() >= JOBS / 1_000,
        "{} job_promote calls",
        promotes.len()
    );
    let longest = promotes.iter().max().copied().unwrap_or(0);
    assert!(longest < 100_000, "a job_promote call took {longest} µs");
    running.stop().await;
}

/// The timekeeper's process is SIGKILLed: another worker takes the role over
/// when its lease runs out, and every delayed job still runs, once, and not
/// before it is due.
#[tokio::test]
async fn a_sigkilled_timekeeper_is_replaced_and_no_delayed_job_is_lost() {
    let server = RedisServer::start();
    let q = queue_name("keeper-kill");
    let settings = [("LEASE_MS", "1000"), ("SWEEP_MS", "200"), ("WORK_MS", "1")];
    let (mut child, killed_id) = support::spawn_worker_process(&server.url(), &q, &settings);
    let mut con = server.connection();
    support::eventually("the process is the timekeeper", || {
        con.get::<_, Option<String>>(format!("jq:{{{q}}}:timekeeper"))
            .unwrap()
            .as_deref()
            == Some(killed_id.as_str())
    })
    .await;
    // A second worker, in this process, which is not the timekeeper.
    let starts = Starts::default();
    let builder = worker(&server, Mode::Reliable, &q).lease(Duration::from_secs(1));
    let running = spawn_built(builder, echo::<u64>(&starts)).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Reliable).await.unwrap();
    let mut handles = Vec::new();
    let mut due = HashMap::new();
    for i in 0..20u64 {
        let delay = 800 + i * 50;
        let at = now_ms() + delay;
        let h = queue
            .submit_with(
                &i,
                JobOptions::default().delay(Duration::from_millis(delay)),
            )
            .await
            .unwrap();
        due.insert(h.id().to_owned(), at);
        handles.push(h);
    }
    child.kill().unwrap(); // SIGKILL: the role is not given up
    child.wait().unwrap();
    for h in handles {
        let id = h.id().to_owned();
        // A job the killed process took before it died comes back through
        // recovery; the others are promoted by the new timekeeper.
        h.result_timeout::<u64>(WAIT).await.unwrap();
        let first = starts.lock().unwrap().get(&id).map(|s| s[0]);
        if let Some(started) = first {
            assert!(started >= due[&id], "{id} started early");
        }
    }
    let keeper: Option<String> = con.get(format!("jq:{{{q}}}:timekeeper")).unwrap();
    assert!(keeper.is_some_and(|k| k != killed_id));
    running.stop().await;
}

/// Delayed jobs and the timekeeper's lease are data in Redis: a restart of
/// an AOF-persisted server keeps them, and they run when due.
#[tokio::test]
async fn delayed_jobs_survive_a_redis_restart() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes"]);
    let q = queue_name("restart");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..10u64 {
        let h = queue
            .submit_with(
                &i,
                JobOptions::default().delay(Duration::from_millis(1500 + i * 10)),
            )
            .await
            .unwrap();
        ids.push(h.id().to_owned());
    }
    server.restart();
    let starts = Starts::default();
    let running = spawn_built(worker(&server, Mode::Recoverable, &q), echo::<u64>(&starts)).await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    for id in &ids {
        let handle = queue.job(id).await.unwrap();
        handle.result_timeout::<u64>(WAIT).await.unwrap();
        let (due, started) = (
            hash_field(&server, &q, id, "due_ms").unwrap(),
            hash_field(&server, &q, id, "started_ms").unwrap(),
        );
        assert!(started >= due);
    }
    assert_eq!(starts.lock().unwrap().len(), ids.len());
    running.stop().await;
}

/// A timekeeper that shuts down gives the role up and rings the clock: the
/// other worker takes it at once, not a lease (here 30 s) later, and runs
/// the job the first one was sleeping for on time.
#[tokio::test]
async fn a_timekeeper_that_shuts_down_hands_the_role_over_at_once() {
    let server = RedisServer::start();
    let q = queue_name("handover");
    let builder =
        |server: &RedisServer| worker(server, Mode::Recoverable, &q).lease(Duration::from_secs(30));
    let first = builder(&server).build().await.unwrap();
    let first_id = first.id().to_owned();
    let first_stop = first.shutdown_handle();
    let first_task =
        tokio::spawn(first.run(|job: Job<u8>| async move { Ok::<_, String>(job.payload) }));
    let mut con = server.connection();
    let keeper_key = format!("jq:{{{q}}}:timekeeper");
    support::eventually("the first worker keeps time", || {
        con.get::<_, Option<String>>(&keeper_key)
            .unwrap()
            .as_deref()
            == Some(first_id.as_str())
    })
    .await;
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let due = now_ms() + 1_500;
    let handle = queue
        .submit_with(
            &7u8,
            JobOptions::default().delay(Duration::from_millis(1_500)),
        )
        .await
        .unwrap();
    let id = handle.id().to_owned();
    // Only the first worker was there to hear the ring; now a second one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let starts = Starts::default();
    let second = spawn_built(builder(&server), echo::<u8>(&starts)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    first_stop.shutdown();
    first_task.await.unwrap().unwrap();
    assert_eq!(handle.result_timeout::<u8>(WAIT).await.unwrap(), 7);
    let started = starts.lock().unwrap()[&id][0];
    assert!((due..due + SOON).contains(&started), "{started} vs {due}");
    let keeper: Option<String> = con.get(&keeper_key).unwrap();
    assert!(keeper.is_some_and(|k| k != first_id));
    second.stop().await;
}

/// The worker that hears a ring need not be the timekeeper: it follows the
/// due times it learns while its calls find work, so a job due right after
/// the one it was rung for is not left for the keeper's next renewal (here
/// 3 s away).
#[tokio::test]
async fn a_job_due_after_a_rung_one_is_not_left_for_the_keepers_renewal() {
    let server = RedisServer::start();
    let q = queue_name("follow");
    let starts = Starts::default();
    let mut workers = Vec::new();
    for _ in 0..3 {
        let builder = worker(&server, Mode::Recoverable, &q).lease(Duration::from_secs(9));
        workers.push(spawn_built(builder, echo::<u8>(&starts)).await);
    }
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..4u8 {
        let mut due = Vec::new();
        for delay in [300u64, 700] {
            let at = now_ms() + delay;
            let options = JobOptions::default().delay(Duration::from_millis(delay));
            due.push((queue.submit_with(&round, options).await.unwrap(), at));
        }
        for (handle, at) in due {
            let id = handle.id().to_owned();
            handle.result_timeout::<u8>(WAIT).await.unwrap();
            let started = starts.lock().unwrap()[&id][0];
            assert!(
                (at..at + SOON).contains(&started),
                "round {round}: {} ms late",
                started - at
            );
        }
    }
    for w in workers {
        w.stop().await;
    }
}
