//! Shared test helpers.
#![allow(dead_code)]

pub mod hostile;
pub mod redis_cluster;
pub mod redis_server;

use std::future::Future;
use std::time::Duration;

use job_async_redis::{Config, Job, Mode, ShutdownHandle, Worker, WorkerBuilder, WorkerStats};
#[allow(unused_imports)]
pub use redis_cluster::RedisCluster;
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

/// The path of example `name`'s binary, built (or brought up to date) once
/// per test process.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap(); // target/<profile>
    let path = dir.join("examples").join(name);
    let mut built = BUILT.lock().unwrap();
    if !built.iter().any(|b| b == name) {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--example", name])
            .status()
            .unwrap();
        assert!(status.success(), "cargo build --example {name}");
        built.push(name.to_owned());
    }
    path
}

/// A reliable-mode worker process (`examples/reliable_worker.rs`) on
/// `queue`, with the environment settings `env` (`LEASE_MS`, `WORK_MS`...),
/// started and ready. Returns the process and its worker ID.
pub fn spawn_worker_process(
    url: &str,
    queue: &str,
    env: &[(&str, &str)],
) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(example_binary("reliable_worker"))
        .env("REDIS_URL", url)
        .env("QUEUE", queue)
        .env("RUST_LOG", "off")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let id = line
        .trim()
        .strip_prefix("ready ")
        .expect("the worker says ready")
        .to_owned();
    (child, id)
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

/// A reliable-mode worker builder with short, test-friendly timings.
pub fn reliable(config: Config, queue: &str) -> WorkerBuilder {
    Worker::builder(config)
        .mode(Mode::Reliable)
        .queue(queue)
        .lease(Duration::from_millis(600))
        .sweep_interval(Duration::from_millis(50))
}

/// A worker on a thread of its own with a single-threaded runtime, whose
/// handler blocks that thread (and so the worker's heartbeat) for `stall` on
/// a job's first attempt, as a long GC pause or CPU starvation would. Its
/// handler returns `"attempt N"`.
pub struct StallingWorker {
    pub shutdown: ShutdownHandle,
    stats: std::sync::mpsc::Receiver<WorkerStats>,
    thread: std::thread::JoinHandle<()>,
}

impl StallingWorker {
    pub fn spawn(builder: WorkerBuilder, stall: Duration) -> Self {
        let (stats_tx, stats) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let worker = builder.build().await.unwrap();
                shutdown_tx.send(worker.shutdown_handle()).unwrap();
                let result = worker
                    .run(move |job: Job<String>| async move {
                        if job.attempt == 1 {
                            std::thread::sleep(stall); // blocks the whole runtime
                        }
                        Ok::<_, String>(format!("attempt {}", job.attempt))
                    })
                    .await
                    .unwrap();
                stats_tx.send(result).unwrap();
            });
        });
        let shutdown = shutdown_rx.recv().unwrap();
        Self {
            shutdown,
            stats,
            thread,
        }
    }

    /// Requests shutdown and returns the worker's stats.
    pub fn stop(self) -> WorkerStats {
        self.shutdown.shutdown();
        let stats = self
            .stats
            .recv_timeout(Duration::from_secs(20))
            .expect("the stalling worker stops");
        self.thread.join().unwrap();
        stats
    }
}

/// The state of job `id` in queue `q`, read directly from Redis.
pub fn job_state(server: &RedisServer, q: &str, id: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(format!("jq:{{{q}}}:job:{id}"))
        .arg("state")
        .query(&mut server.connection())
        .unwrap()
}

/// A worker stalls (runtime blocked) past its lease while running attempt 1;
/// a healthy worker takes the job over and completes it. The stalled
/// worker's late completion must be refused (`lease_lost`) and the new
/// attempt's result must stand.
pub async fn zombie_is_refused(
    server: &RedisServer,
    q: &str,
    mode: Mode,
    settings: impl Fn(Config) -> WorkerBuilder,
) {
    let wait = Duration::from_secs(15);
    let zombie = StallingWorker::spawn(settings(config(server)), Duration::from_millis(1500));
    let client = job_async_redis::Client::connect(config(server))
        .await
        .unwrap();
    let queue = client.queue(q, mode).await.unwrap();
    let handle = queue.submit("x").await.unwrap();
    let id = handle.id().to_owned();
    eventually("the zombie started the job", || {
        job_state(server, q, &id).as_deref() == Some("active")
    })
    .await;
    let healthy = spawn_built(settings(config(server)), |job: Job<String>| async move {
        Ok::<_, String>(format!("attempt {}", job.attempt))
    })
    .await;
    assert_eq!(
        handle.result_timeout::<String>(wait).await.unwrap(),
        "attempt 2"
    );
    let zombie_stats = zombie.stop();
    assert_eq!(
        (zombie_stats.completed, zombie_stats.lease_lost),
        (0, 1),
        "{zombie_stats:?}"
    );
    let again: String = queue
        .job(&id)
        .await
        .unwrap()
        .result_timeout(wait)
        .await
        .unwrap();
    assert_eq!(again, "attempt 2", "the new attempt's result stands");
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!(
        (status.state, status.attempt, status.stalls),
        (job_async_redis::JobState::Completed, 2, 1)
    );
    assert_eq!(healthy.stop().await.completed, 1);
}

/// A job kills every worker that runs it (the worker's task is aborted
/// mid-job, as if its process died). After `max_stalls` + 1 deaths, the next
/// worker must dead-letter it without running it, and its client must get a
/// `stalled` failure.
pub async fn poison_pill_is_dead_lettered(
    server: &RedisServer,
    q: &str,
    mode: Mode,
    settings: impl Fn(Config) -> WorkerBuilder,
    max_stalls: usize,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let started = Arc::new(AtomicUsize::new(0));
    let client = job_async_redis::Client::connect(config(server))
        .await
        .unwrap();
    let queue = client.queue(q, mode).await.unwrap();
    let handle = queue.submit("poison").await.unwrap();
    let id = handle.id().to_owned();
    let hang = |c: Arc<AtomicUsize>| {
        move |_job: Job<String>| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok::<_, String>(String::new())
            }
        }
    };
    for attempt in 1..=max_stalls + 1 {
        let w = spawn_built(settings(config(server)), hang(started.clone())).await;
        eventually("the attempt started", || {
            started.load(Ordering::SeqCst) == attempt
        })
        .await;
        w.task.abort(); // the worker dies with the job
    }
    let last = spawn_built(settings(config(server)), hang(started.clone())).await;
    let err = handle
        .result_timeout::<String>(Duration::from_secs(15))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            job_async_redis::Error::JobFailed {
                kind: job_async_redis::FailureKind::Stalled,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        started.load(Ordering::SeqCst),
        max_stalls + 1,
        "no attempt ran after the limit"
    );
    let dead: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("jq:{{{q}}}:dead_jobs"))
        .arg(0)
        .arg(-1)
        .query(&mut server.connection())
        .unwrap();
    assert_eq!(dead, vec![id.clone()]);
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!(status.state, job_async_redis::JobState::Dead);
    assert_eq!(status.stalls as usize, max_stalls + 1);
    assert_eq!(last.stop().await.dead_lettered, 1);
}
