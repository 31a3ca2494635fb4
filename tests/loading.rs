//! A server that is loading its dataset answers LOADING to everything for a
//! while. Clients and workers wait for it within their command timeout (or
//! say so briefly and with a typed error), and a client that was awaiting a
//! result when the server went down gets that result once the server is
//! back: only its own timeout ends the wait.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use job_async_redis::{Client, Config, Error, Job, Mode};
use support::{RedisServer, queue_name, recoverable};

/// Keys written before the restart: with the load delay below, loading them
/// takes a few seconds.
const KEYS: usize = 50_000;

/// A server process started on `port` over the data in `dir`, loading it
/// slowly (`key-load-delay`, microseconds per key) and answering LOADING
/// meanwhile. Not waited for: the test wants to meet it while it loads.
struct Loading(Child);

impl Loading {
    fn start(port: u16, dir: &std::path::Path) -> Self {
        let child = Command::new(support::redis_server::server_binary())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .args(["--appendonly", "no", "--save", ""])
            .args(["--key-load-delay", "40"])
            .args(["--loading-process-events-interval-bytes", "1024"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the server again");
        Self(child)
    }
}

impl Drop for Loading {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the server on `port` answers LOADING.
fn wait_until_loading(port: u16) {
    let url = format!("redis://127.0.0.1:{port}");
    for _ in 0..500 {
        if let Ok(mut con) = redis::Client::open(url.as_str()).unwrap().get_connection() {
            match redis::cmd("PING").query::<String>(&mut con) {
                Err(e) if e.code() == Some("LOADING") => return,
                Ok(_) => panic!("the server answered before loading: the load was too quick"),
                Err(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the server never answered LOADING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_workers_wait_for_a_loading_server_and_results_survive_it() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap().to_owned();
    let server = RedisServer::start_with(&["--dir", &dir_arg]);
    let port = server.port();
    let url = server.url();
    let config = Config::new(&url).block_timeout(Duration::from_millis(500));
    {
        let mut con = server.connection();
        for chunk in 0..KEYS / 1000 {
            let mut pipe = redis::pipe();
            for i in 0..1000 {
                pipe.cmd("SET")
                    .arg(format!("filler:{}", chunk * 1000 + i))
                    .arg("x")
                    .ignore();
            }
            let _: () = pipe.query(&mut con).unwrap();
        }
    }
    // A client awaits a job that no worker has run yet.
    let q = queue_name("loading");
    let client = Client::connect(config.clone()).await.unwrap();
    let queue = client.queue(&q, Mode::Recoverable).await.unwrap();
    let handle = queue.submit("survives").await.unwrap();
    let waiting = tokio::spawn(handle.result_timeout::<String>(Duration::from_secs(60)));

    // Down, and back slowly.
    let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN")
        .arg("SAVE")
        .query(&mut server.connection());
    drop(server); // its process has exited; the data stays in `dir`
    let _loading = Loading::start(port, dir.path());
    wait_until_loading(port);

    // Started while the server loads, a worker's build and a client's
    // connect wait for it (their command timeout is long enough).
    let patient = config.clone().command_timeout(Duration::from_secs(20));
    let building = tokio::spawn(recoverable(patient.clone(), &q).build());
    let connecting = tokio::spawn(Client::connect(patient.clone()));

    // Too short a command timeout: a short, typed error, soon.
    let started = Instant::now();
    let err = Client::connect(config.clone().command_timeout(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable { reason, .. } if reason.starts_with("LOADING")),
        "{err:?}"
    );
    assert!(err.to_string().len() < 200, "a short message: {err}");
    assert!(started.elapsed() < Duration::from_secs(3));

    assert!(
        !building.is_finished() && !connecting.is_finished(),
        "still loading: the build and the connect are waiting"
    );
    let built = building
        .await
        .unwrap()
        .expect("the worker built once loaded");
    let client2 = connecting
        .await
        .unwrap()
        .expect("the client connected once loaded");
    assert!(!waiting.is_finished(), "the first client is still waiting");
    let shutdown = built.shutdown_handle();
    let task = tokio::spawn(built.run(|job: Job<String>| async move {
        Ok::<_, String>(format!("{} the restart", job.payload))
    }));
    let worker = support::Running { shutdown, task };
    assert_eq!(
        waiting.await.unwrap().unwrap(),
        "survives the restart",
        "the await was answered with the result, not an error"
    );
    let queue2 = client2.queue(&q, Mode::Recoverable).await.unwrap();
    let again: String = queue2
        .submit("and after")
        .await
        .unwrap()
        .result_timeout(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(again, "and after the restart");
    assert_eq!(worker.stop().await.completed, 2);
}
