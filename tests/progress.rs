//! Job progress (protocol.md 8.13): a handler reports progress; a client
//! reads the latest value and follows new ones, even when it starts
//! following late; progress after the job finished is refused.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use job_async_redis::{Client, Error, Job, Mode};
use support::{RedisServer, config, queue_name, spawn_built};

const WAIT: Duration = Duration::from_secs(20);

async fn progress_reaches_a_late_follower(mode: Mode) {
    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&queue_name("progress"), mode).await.unwrap();
    let (late_tx, late) = tokio::sync::oneshot::channel::<()>();
    let late_tx = std::sync::Mutex::new(Some(late_tx));
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let (after_tx, mut after) = tokio::sync::mpsc::unbounded_channel();
    let builder = match mode {
        Mode::Reliable => support::reliable(config(&server), queue.name()),
        _ => support::recoverable(config(&server), queue.name()),
    };
    let worker = spawn_built(builder, move |job: Job<u32>| {
        let late_tx = late_tx.lock().unwrap().take();
        let mut go = go.clone();
        let after_tx = after_tx.clone();
        async move {
            for step in 1..=3u32 {
                job.progress(&format!("step {step}")).await.unwrap();
            }
            // Three steps done: let the client start following, late.
            late_tx.unwrap().send(()).unwrap();
            go.wait_for(|g| *g).await.unwrap();
            for step in 4..=5u32 {
                job.progress(&format!("step {step}")).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Progress once the job has finished is refused.
            let later = job.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                after_tx.send(later.progress("too late").await).unwrap();
            });
            Ok::<u32, String>(job.payload)
        }
    })
    .await;
    let handle = queue.submit(&7u32).await.unwrap();
    tokio::time::timeout(WAIT, late).await.unwrap().unwrap();
    assert_eq!(
        handle.progress::<String>().await.unwrap().as_deref(),
        Some("step 3")
    );
    let mut follow = Box::pin(handle.follow_progress::<String>().await.unwrap());
    let first = tokio::time::timeout(WAIT, follow.next()).await.unwrap();
    assert_eq!(
        first.unwrap().unwrap(),
        "step 3",
        "a late follower sees the latest first"
    );
    go_tx.send(true).unwrap();
    for want in ["step 4", "step 5"] {
        let got = tokio::time::timeout(WAIT, follow.next()).await.unwrap();
        assert_eq!(got.unwrap().unwrap(), want);
    }
    assert_eq!(handle.result_timeout::<u32>(WAIT).await.unwrap(), 7);
    let refused = tokio::time::timeout(WAIT, after.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(refused, Err(Error::NotActive { .. })),
        "{refused:?}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn recoverable_progress_reaches_a_client_that_follows_late() {
    progress_reaches_a_late_follower(Mode::Recoverable).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reliable_progress_reaches_a_client_that_follows_late() {
    progress_reaches_a_late_follower(Mode::Reliable).await;
}

#[tokio::test]
async fn simple_mode_has_no_progress() {
    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client
        .queue(&queue_name("simple"), Mode::Simple)
        .await
        .unwrap();
    let handle = queue.submit(&1u32).await.unwrap();
    assert!(matches!(
        handle.progress::<u32>().await,
        Err(Error::Config(_))
    ));
}
