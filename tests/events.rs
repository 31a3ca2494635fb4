//! Lifecycle events (`Queue::set_events`, `Queue::events`,
//! `Queue::follow_events`; protocol.md 8.12): off by default; with events
//! on, each job records every step in the queue's event stream, in order,
//! written by the same script as the step; a follower resumes after the
//! last entry it saw, across its own restart and a dropped connection; the
//! stream stays near its cap.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use job_async_redis::{Backoff, Client, Error, Event, FailureKind, Job, JobOptions, Mode, Queue};
use redis::Commands;
use support::{RedisServer, config, queue_name, spawn_built};

const WAIT: Duration = Duration::from_secs(20);

fn stream_key(q: &str) -> String {
    format!("jq:{{{q}}}:events")
}

fn worker(server: &RedisServer, mode: Mode, q: &str) -> job_async_redis::WorkerBuilder {
    match mode {
        Mode::Reliable => support::reliable(config(server), q),
        _ => support::recoverable(config(server), q),
    }
}

/// Fails the first attempt of payloads starting with "flaky", and every
/// attempt of payloads starting with "fail".
async fn picky(job: Job<String>) -> Result<String, String> {
    if job.payload.starts_with("fail") || (job.payload.starts_with("flaky") && job.attempt == 1) {
        return Err(format!("attempt {} failed", job.attempt));
    }
    Ok(job.payload)
}

/// Every event of the queue, paging through the stream 3 at a time.
async fn all_events(queue: &Queue) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    loop {
        let after = out.last().map(|e| e.stream_id.clone());
        let page = queue.events(after.as_deref(), 3).await.unwrap();
        if page.is_empty() {
            return out;
        }
        assert!(page.len() <= 3);
        out.extend(page);
    }
}

fn of_job<'a>(events: &'a [Event], id: &str) -> Vec<&'a Event> {
    events.iter().filter(|e| e.job_id == id).collect()
}

fn kinds(events: &[&Event]) -> Vec<String> {
    events.iter().map(|e| e.kind.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_off_by_default() {
    let server = RedisServer::start();
    let q = queue_name("events-off");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    assert_eq!(queue.controls().await.unwrap().events, None);
    let running = spawn_built(worker(&server, Mode::Recoverable, &q), picky).await;
    let ok = queue.submit("fine").await.unwrap();
    let bad = queue
        .submit_with("fail", JobOptions::default().max_attempts(2))
        .await
        .unwrap();
    ok.result_timeout::<String>(WAIT).await.unwrap();
    assert!(bad.result_timeout::<String>(WAIT).await.is_err());
    running.stop().await;
    let exists: bool = server.connection().exists(stream_key(&q)).unwrap();
    assert!(!exists, "no event stream without set_events");
    assert!(queue.events(None, 100).await.unwrap().is_empty());
}

async fn a_job_records_its_steps_in_order(mode: Mode) {
    let server = RedisServer::start();
    let q = queue_name(&format!("events-steps-{mode}"));
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, mode).await.unwrap();
    queue.set_events(Some(10_000)).await.unwrap();
    assert_eq!(queue.controls().await.unwrap().events, Some(10_000));
    let running = spawn_built(worker(&server, mode, &q), picky).await;

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ok = queue.submit("fine").await.unwrap();
    let ok_id = ok.id().to_owned();
    assert_eq!(ok.result_timeout::<String>(WAIT).await.unwrap(), "fine");

    let flaky = queue
        .submit_with("flaky", JobOptions::default().max_attempts(3))
        .await
        .unwrap();
    let flaky_id = flaky.id().to_owned();
    flaky.result_timeout::<String>(WAIT).await.unwrap();

    let failing = queue
        .submit_with(
            "fail",
            JobOptions::default()
                .max_attempts(2)
                .backoff(Backoff::fixed(Duration::from_millis(50))),
        )
        .await
        .unwrap();
    let failing_id = failing.id().to_owned();
    assert!(matches!(
        failing.result_timeout::<String>(WAIT).await,
        Err(Error::JobFailed { .. })
    ));

    let delayed = queue
        .submit_with(
            "later",
            JobOptions::default().delay(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let delayed_id = delayed.id().to_owned();
    delayed.result_timeout::<String>(WAIT).await.unwrap();
    running.stop().await;

    let events = all_events(&queue).await;
    // Stream IDs only grow, and each carries its time.
    for pair in events.windows(2) {
        assert!(pair[0].at_ms <= pair[1].at_ms);
        assert_ne!(pair[0].stream_id, pair[1].stream_id);
    }
    assert!(events.iter().all(|e| e.at_ms + 1000 >= before));

    let ok = of_job(&events, &ok_id);
    assert_eq!(
        kinds(&ok),
        [Event::SUBMITTED, Event::STARTED, Event::COMPLETED]
    );
    assert_eq!(ok[0].attempt, None);
    assert_eq!((ok[1].attempt, ok[2].attempt), (Some(1), Some(1)));
    assert!(ok[1].worker.is_some());
    assert_eq!(ok[1].worker, ok[2].worker);
    assert_eq!(ok[2].failure, None);

    let flaky = of_job(&events, &flaky_id);
    assert_eq!(
        kinds(&flaky),
        [
            Event::SUBMITTED,
            Event::STARTED,
            Event::RETRIED,
            Event::STARTED,
            Event::COMPLETED
        ]
    );
    assert_eq!(flaky[2].attempt, Some(1));
    assert_eq!(flaky[2].failure, Some(FailureKind::Handler));
    assert_eq!(flaky[2].due_ms, None, "retried at once: no due time");
    assert_eq!(flaky[3].attempt, Some(2));

    let failing = of_job(&events, &failing_id);
    assert_eq!(
        kinds(&failing),
        [
            Event::SUBMITTED,
            Event::STARTED,
            Event::RETRIED,
            Event::STARTED,
            Event::FAILED
        ]
    );
    let retried = failing[2];
    assert_eq!(retried.failure, Some(FailureKind::Handler));
    let due = retried.due_ms.expect("a backoff: the retry's due time");
    assert!(
        due >= retried.at_ms + 40 && due <= retried.at_ms + 60,
        "{retried:?}"
    );
    assert_eq!(failing[4].attempt, Some(2));
    assert_eq!(failing[4].failure, Some(FailureKind::Handler));

    let delayed = of_job(&events, &delayed_id);
    assert_eq!(
        kinds(&delayed),
        [Event::DELAYED, Event::STARTED, Event::COMPLETED]
    );
    let due = delayed[0].due_ms.unwrap();
    assert!(due >= delayed[0].at_ms + 190 && due <= delayed[0].at_ms + 210);
    assert!(delayed[1].at_ms >= due);

    // Nothing else was recorded.
    assert_eq!(events.len(), 3 + 5 + 5 + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_records_its_steps_in_order_recoverable() {
    a_job_records_its_steps_in_order(Mode::Recoverable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_records_its_steps_in_order_reliable() {
    a_job_records_its_steps_in_order(Mode::Reliable).await;
}

/// Jobs record events when they were submitted while events were on,
/// whatever the setting when they run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_setting_is_taken_at_submit() {
    let server = RedisServer::start();
    let q = queue_name("events-setting");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let silent = queue.submit("silent").await.unwrap();
    queue.set_events(Some(1000)).await.unwrap();
    let recorded = queue.submit("recorded").await.unwrap();
    queue.set_events(None).await.unwrap();
    assert_eq!(queue.controls().await.unwrap().events, None);
    let running = spawn_built(worker(&server, Mode::Recoverable, &q), picky).await;
    let (silent_id, recorded_id) = (silent.id().to_owned(), recorded.id().to_owned());
    silent.result_timeout::<String>(WAIT).await.unwrap();
    recorded.result_timeout::<String>(WAIT).await.unwrap();
    running.stop().await;
    let events = all_events(&queue).await;
    assert!(of_job(&events, &silent_id).is_empty());
    assert_eq!(
        kinds(&of_job(&events, &recorded_id)),
        [Event::SUBMITTED, Event::STARTED, Event::COMPLETED]
    );
}

#[tokio::test]
async fn bad_settings_are_refused() {
    let server = RedisServer::start();
    let q = queue_name("events-bad");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    for bad in [0, 1_000_000_001] {
        assert!(matches!(
            queue.set_events(Some(bad)).await,
            Err(Error::Config(_))
        ));
    }
    queue.set_events(Some(1_000_000_000)).await.unwrap();
    assert_eq!(queue.controls().await.unwrap().events, Some(1_000_000_000));
    let simple = client
        .queue(&queue_name("events-simple"), Mode::Simple)
        .await
        .unwrap();
    assert!(matches!(
        simple.set_events(Some(10)).await,
        Err(Error::Config(_))
    ));
    for bad in ["", "x", "1-", "-", "$", "1-2-3"] {
        assert!(
            matches!(queue.events(Some(bad), 10).await, Err(Error::Config(_))),
            "{bad}"
        );
    }
    let mut follower = queue.follow_events(Some("nope".into()));
    assert!(matches!(follower.next().await, Some(Err(Error::Config(_)))));
    assert!(follower.next().await.is_none(), "an error ends the stream");
    // A stream key of another type.
    let _: () = server.connection().set(stream_key(&q), "x").unwrap();
    assert!(matches!(
        queue.events(None, 10).await,
        Err(Error::WrongType { .. })
    ));
    let mut follower = queue.follow_events(None);
    assert!(matches!(
        follower.next().await,
        Some(Err(Error::WrongType { .. }))
    ));
    assert!(follower.next().await.is_none());
}

/// The next `n` events of a follower, each within `WAIT`.
async fn take<S>(follower: &mut S, n: usize) -> Vec<Event>
where
    S: futures_util::Stream<Item = Result<Event, Error>> + Unpin,
{
    let mut out = Vec::new();
    for _ in 0..n {
        let event = tokio::time::timeout(WAIT, follower.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .expect("no error");
        out.push(event);
    }
    out
}

/// True when the follower yields nothing within `within`.
async fn quiet<S>(follower: &mut S, within: Duration) -> bool
where
    S: futures_util::Stream<Item = Result<Event, Error>> + Unpin,
{
    tokio::time::timeout(within, follower.next()).await.is_err()
}

/// IDs of jobs submitted with `payloads`, in order.
async fn submit_all(queue: &Queue, payloads: &[&str]) -> Vec<String> {
    let mut ids = Vec::new();
    for p in payloads {
        ids.push(queue.submit(p).await.unwrap().id().to_owned());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_survives_a_consumer_restart() {
    let server = RedisServer::start();
    let q = queue_name("events-follow");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    queue.set_events(Some(10_000)).await.unwrap();

    let first = submit_all(&queue, &["a", "b", "c", "d", "e"]).await;
    let mut follower = queue.follow_events(None);
    let seen = take(&mut follower, 3).await;
    let ids: Vec<&str> = seen.iter().map(|e| e.job_id.as_str()).collect();
    assert_eq!(ids, first[..3]);
    assert!(seen.iter().all(|e| e.kind == Event::SUBMITTED));
    let last = seen.last().unwrap().stream_id.clone();
    drop(follower); // the consumer stops

    let second = submit_all(&queue, &["f", "g", "h"]).await;
    let mut follower = queue.follow_events(Some(last));
    let rest = take(&mut follower, 5).await;
    let ids: Vec<&str> = rest.iter().map(|e| e.job_id.as_str()).collect();
    let expected: Vec<&str> = first[3..]
        .iter()
        .chain(&second)
        .map(String::as_str)
        .collect();
    assert_eq!(ids, expected);
    assert!(quiet(&mut follower, Duration::from_millis(300)).await);

    // Live: events recorded while it waits come at once, in order.
    let waiting = tokio::spawn(async move {
        let events = take(&mut follower, 2).await;
        (events, follower)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let third = submit_all(&queue, &["i", "j"]).await;
    let (events, mut follower) = waiting.await.unwrap();
    let ids: Vec<&str> = events.iter().map(|e| e.job_id.as_str()).collect();
    assert_eq!(ids, third);

    // The follower's connection is killed while it blocks: it reconnects
    // and resumes after the last event it returned.
    let waiting = tokio::spawn(async move {
        let events = take(&mut follower, 1).await;
        (events, follower)
    });
    let mut con = server.connection();
    let mut killed = 0;
    for _ in 0..100 {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
        for line in list.lines() {
            if line.contains("cmd=xread") && line.contains("flags=b") {
                let id = line.split(' ').next().unwrap().trim_start_matches("id=");
                let _: () = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(id)
                    .query(&mut con)
                    .unwrap();
                killed += 1;
            }
        }
        if killed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(killed, 1, "the follower blocks in XREAD");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fourth = submit_all(&queue, &["k"]).await;
    let (events, mut follower) = waiting.await.unwrap();
    assert_eq!(events[0].job_id, fourth[0]);
    assert!(quiet(&mut follower, Duration::from_millis(300)).await);
}

/// `Some("$")`: only the events recorded after the follower first polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_can_start_at_the_end() {
    let server = RedisServer::start();
    let q = queue_name("events-end");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    queue.set_events(Some(10_000)).await.unwrap();
    submit_all(&queue, &["old", "older"]).await;
    let mut follower = queue.follow_events(Some("$".into()));
    assert!(quiet(&mut follower, Duration::from_millis(300)).await);
    let new = submit_all(&queue, &["new"]).await;
    let events = take(&mut follower, 1).await;
    assert_eq!(events[0].job_id, new[0]);
    // On an empty stream too.
    let empty = client
        .queue(&queue_name("events-empty"), Mode::Recoverable)
        .await
        .unwrap();
    empty.set_events(Some(10)).await.unwrap();
    let mut follower = empty.follow_events(Some("$".into()));
    assert!(quiet(&mut follower, Duration::from_millis(200)).await);
    let new = submit_all(&empty, &["first"]).await;
    assert_eq!(take(&mut follower, 1).await[0].job_id, new[0]);
}

/// `MAXLEN ~`: the stream is trimmed in whole nodes (100 entries each by
/// default), so it stays between the cap and a node above it.
#[tokio::test]
async fn the_cap_keeps_the_stream_near_its_length() {
    let server = RedisServer::start();
    let q = queue_name("events-cap");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    queue.set_events(Some(100)).await.unwrap();
    let payloads: Vec<String> = (0..3000).map(|i| i.to_string()).collect();
    let handles = queue.submit_many(&payloads).await.unwrap();
    let len: usize = server.connection().xlen(stream_key(&q)).unwrap();
    assert!((100..=200).contains(&len), "{len} entries");
    let events = all_events(&queue).await;
    assert_eq!(events.len(), len);
    // The newest are kept, in order.
    let newest: Vec<&str> = handles[handles.len() - len..]
        .iter()
        .map(|h| h.id())
        .collect();
    let ids: Vec<&str> = events.iter().map(|e| e.job_id.as_str()).collect();
    assert_eq!(ids, newest);
}

/// Entries another program wrote are returned with what parses.
#[tokio::test]
async fn foreign_entries_are_read_leniently() {
    let server = RedisServer::start();
    let q = queue_name("events-foreign");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let mut con = server.connection();
    let _: String = con
        .xadd(
            stream_key(&q),
            "5-1",
            &[("event", "teleported"), ("id", "j"), ("attempt", "x")],
        )
        .unwrap();
    let _: String = con
        .xadd(stream_key(&q), "6-0", &[("something", "else")])
        .unwrap();
    let events = queue.events(None, 10).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(
        (events[0].kind.as_str(), events[0].job_id.as_str()),
        ("teleported", "j")
    );
    assert_eq!((events[0].attempt, events[0].at_ms), (None, 5));
    assert_eq!(
        (events[1].kind.as_str(), events[1].job_id.as_str()),
        ("", "")
    );
    assert_eq!(queue.events(Some("5-1"), 10).await.unwrap().len(), 1);
    assert_eq!(queue.events(Some("6"), 10).await.unwrap().len(), 0);
    assert!(queue.events(None, 0).await.unwrap().is_empty());
}
