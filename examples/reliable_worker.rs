//! A reliable-mode worker process, as you would deploy one: it runs until
//! SIGTERM or Ctrl-C, then shuts down gracefully (running jobs finish within
//! the grace period, the rest go back to the queue at once).
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 QUEUE=work cargo run --example reliable_worker
//! ```
//!
//! Environment: `REDIS_URL` (required), `QUEUE` (default `work`),
//! `CONCURRENCY` (default 8), `LEASE_MS` (heartbeat TTL, default 30000),
//! `SWEEP_MS` (recovery interval, default half the lease), `MAX_STALLS`
//! (default 3), `WORK_MS` (how long each job sleeps, default 0), `BLOCK_MS`
//! (the longest blocking wait, default 500).
//!
//! Each job's payload is a number; the result is twice that number. The
//! tests run this binary as separate OS processes and kill them with SIGKILL.

use std::time::Duration;

use job_async_redis::{Config, Job, Mode, Worker};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let url = std::env::var("REDIS_URL").map_err(|_| "set REDIS_URL")?;
    let queue = std::env::var("QUEUE").unwrap_or_else(|_| "work".into());
    let lease = Duration::from_millis(env_u64("LEASE_MS", 30_000));
    let work = Duration::from_millis(env_u64("WORK_MS", 0));
    let block = Duration::from_millis(env_u64("BLOCK_MS", 500));
    let mut builder = Worker::builder(Config::new(url).block_timeout(block))
        .mode(Mode::Reliable)
        .queue(queue)
        .concurrency(env_u64("CONCURRENCY", 8) as usize)
        .lease(lease)
        .max_stalls(env_u64("MAX_STALLS", 3) as u32);
    if let Ok(ms) = std::env::var("SWEEP_MS") {
        builder = builder.sweep_interval(Duration::from_millis(ms.parse()?));
    }
    let worker = builder.build().await?;
    let shutdown = worker.shutdown_handle();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        shutdown.shutdown();
    });
    println!("ready {}", worker.id());
    let stats = worker
        .run(move |job: Job<u64>| async move {
            if !work.is_zero() {
                tokio::time::sleep(work).await;
            }
            Ok::<_, String>(job.payload * 2)
        })
        .await?;
    eprintln!("{stats:?}");
    Ok(())
}
