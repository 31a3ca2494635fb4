//! The whole library in one page: a worker that reverses strings, a client
//! that submits one job and prints the result.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Uses `REDIS_URL` when it is set; otherwise starts a throwaway
//! redis-server on a free loopback port and stops it at the end.

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::convert::Infallible;
use std::time::Duration;

use job_async_redis::{Client, Config, Job, Mode, Worker};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keep the throwaway server (if any) alive until the end of main.
    let (_server, url) = redis_server::from_env_or_start();
    let config = Config::new(url);

    // A worker: four jobs at a time from the queue "strings".
    let worker = Worker::builder(config.clone())
        .mode(Mode::Simple)
        .queue("strings")
        .concurrency(4)
        .build()
        .await?;
    let shutdown = worker.shutdown_handle();
    let running = tokio::spawn(worker.run(|job: Job<String>| async move {
        Ok::<_, Infallible>(job.payload.chars().rev().collect::<String>())
    }));

    // A client: submit a job, await its typed result.
    let client = Client::connect(config).await?;
    let queue = client.queue("strings", Mode::Simple).await?;
    let job = queue.submit("reverse me please").await?;
    let reversed: String = job.result_timeout(Duration::from_secs(10)).await?;
    println!("{reversed}");

    // Stop the worker gracefully: it finishes running jobs first.
    shutdown.shutdown();
    running.await??;
    Ok(())
}
