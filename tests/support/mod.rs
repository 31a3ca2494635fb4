//! Shared test helpers.
#![allow(dead_code)]

pub mod redis_server;

use std::future::Future;
use std::time::Duration;

use job_async_redis::{Config, Job, Mode, ShutdownHandle, Worker, WorkerBuilder, WorkerStats};
pub use redis_server::RedisServer;
use tokio::task::JoinHandle;

/// A queue name unique to this test run.
pub fn queue_name(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4().simple())
}

/// Settings for tests: short blocks so shutdowns are quick.
pub fn config(server: &RedisServer) -> Config {
    Config::new(server.url()).block_timeout(Duration::from_millis(500))
}

/// A worker running in the background.
pub struct Running {
    pub shutdown: ShutdownHandle,
    pub task: JoinHandle<Result<WorkerStats, job_async_redis::Error>>,
}

impl Running {
    /// Requests shutdown and returns the worker's stats.
    pub async fn stop(self) -> WorkerStats {
        self.shutdown.shutdown();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("worker stops within 20 s")
            .expect("worker task")
            .expect("worker run")
    }
}

/// Starts a simple-mode worker on `queues` with `handler`.
pub async fn spawn_worker<P, R, E, F, Fut>(
    config: Config,
    queues: &[&str],
    concurrency: usize,
    handler: F,
) -> Running
where
    P: serde::de::DeserializeOwned + Send + 'static,
    R: serde::Serialize + Send + 'static,
    E: std::fmt::Display + Send + 'static,
    F: Fn(Job<P>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
{
    let mut builder = Worker::builder(config)
        .mode(Mode::Simple)
        .concurrency(concurrency);
    for q in queues {
        builder = builder.queue(*q);
    }
    spawn_built(builder, handler).await
}

/// Builds and starts a worker in the background.
pub async fn spawn_built<P, R, E, F, Fut>(builder: WorkerBuilder, handler: F) -> Running
where
    P: serde::de::DeserializeOwned + Send + 'static,
    R: serde::Serialize + Send + 'static,
    E: std::fmt::Display + Send + 'static,
    F: Fn(Job<P>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
{
    let worker = builder.build().await.expect("worker builds");
    let shutdown = worker.shutdown_handle();
    let task = tokio::spawn(worker.run(handler));
    Running { shutdown, task }
}

/// Reverses a string: the handler of most tests.
pub async fn reverse(job: Job<String>) -> Result<String, std::convert::Infallible> {
    Ok(job.payload.chars().rev().collect())
}

/// A recoverable-mode worker builder with short, test-friendly timings.
pub fn recoverable(config: Config, queue: &str) -> WorkerBuilder {
    Worker::builder(config)
        .mode(Mode::Recoverable)
        .queue(queue)
        .lease(Duration::from_millis(600))
        .sweep_interval(Duration::from_millis(50))
}

/// Waits until `check` is true, up to 10 s.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}
