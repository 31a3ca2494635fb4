//! Time in a queue: a delayed job, a flaky job retried with exponential
//! backoff, a handler that asks for its own retry delay, and a recurring
//! schedule. Prints what happens, with the time since the start.
//!
//! ```sh
//! cargo run --example later    # a throwaway redis-server unless REDIS_URL is set
//! ```

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use job_async_redis::{Backoff, Client, Config, Job, JobError, JobOptions, Mode, Schedule, Worker};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (_server, url) = redis_server::from_env_or_start();
    let config = Config::new(url);
    let queue_name = format!("later-{}", std::process::id());
    let start = Instant::now();
    let since = move || format!("{:>5} ms", start.elapsed().as_millis());

    let worker = Worker::builder(config.clone())
        .mode(Mode::Reliable)
        .queue(&queue_name)
        .concurrency(4)
        .build()
        .await?;
    let shutdown = worker.shutdown_handle();
    let flaky_calls = Arc::new(AtomicU32::new(0));
    let running = tokio::spawn(worker.run(move |job: Job<String>| {
        let flaky_calls = flaky_calls.clone();
        async move {
            println!(
                "{}  runs {:?} (attempt {})",
                since(),
                job.payload,
                job.attempt
            );
            match job.payload.as_str() {
                "flaky" if flaky_calls.fetch_add(1, Ordering::SeqCst) < 2 => {
                    Err(JobError::new("the service is down"))
                }
                "rate limited" if job.attempt == 1 => Err(JobError::retry_after(
                    "429: try again in 700 ms",
                    Duration::from_millis(700),
                )),
                _ => Ok(job.payload.len()),
            }
        }
    }));

    let client = Client::connect(config).await?;
    let queue = client.queue(&queue_name, Mode::Reliable).await?;
    let later = queue
        .submit_with(
            "in 1.5 s",
            JobOptions::default().delay(Duration::from_millis(1500)),
        )
        .await?;
    let backoff = Backoff::exponential(Duration::from_millis(200)).max(Duration::from_secs(5));
    let flaky = queue
        .submit_with(
            "flaky",
            JobOptions::default().max_attempts(5).backoff(backoff),
        )
        .await?;
    let limited = queue
        .submit_with("rate limited", JobOptions::default().max_attempts(2))
        .await?;
    queue
        .set_schedule(
            "every-500ms",
            &Schedule::every(Duration::from_millis(500)),
            "tick",
        )
        .await?;

    for (what, handle) in [
        ("delayed", later),
        ("flaky", flaky),
        ("rate limited", limited),
    ] {
        let len: usize = handle.result_timeout(Duration::from_secs(10)).await?;
        println!("{}  {what}: done ({len})", since());
    }
    for schedule in queue.schedules().await? {
        println!(
            "schedule {}: {} fires, last job {:?}",
            schedule.name,
            schedule.fires,
            schedule.last_job.unwrap_or_default()
        );
    }
    queue.remove_schedule("every-500ms").await?;
    shutdown.shutdown();
    running.await??;
    Ok(())
}
