//! Interoperability with the independent Python implementation in
//! examples/python/jobqueue.py, written from protocol.md and lua/ alone: a
//! Rust client with a Python worker and a Python client with a Rust worker,
//! in every mode and both encodings, with payloads and results full of
//! nested maps, lists, binary data, unicode and large integers. Each side
//! checks what it received. The Python side also replays the conformance
//! suite, the golden encodings and the golden backoff delays. Delayed jobs,
//! retry backoff and the handler's own retry choice run across both too, and
//! so do the queue controls (pause, concurrency limit): the Python worker
//! honours the gate, and the Python client's controls hold a Rust worker.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use job_async_redis::{Client, Encoding, Job, Mode, Worker};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use support::{RedisServer, config, queue_name, spawn_built};

const PER_ENCODING: usize = 20;
const WAIT: Duration = Duration::from_secs(30);

/// The interop payload; `sample()` in jobqueue.py is the same value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Sample {
    name: String,
    nested: BTreeMap<String, Vec<i64>>,
    list: Vec<String>,
    big: u64,
    neg: i64,
    bytes: ByteBuf,
    flag: bool,
    nothing: Option<String>,
    ratio: f64,
}

impl Sample {
    fn new() -> Self {
        Self {
            name: "zoë ✓ 日本語 🚀".into(),
            nested: [("a".to_string(), vec![1, -2, 3]), ("b".to_string(), vec![])].into(),
            list: vec!["x".into(), "".into(), "y z".into()],
            big: u64::MAX,
            neg: i64::MIN,
            bytes: ByteBuf::from((0..=255u8).collect::<Vec<u8>>()),
            flag: true,
            nothing: None,
            ratio: 0.25,
        }
    }
}

/// The interop result: what the handler saw, and who it was.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Echo {
    ok: bool,
    echo: Sample,
    seen_by: String,
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A Python 3 with redis-py and msgpack: the system's when it has them,
/// else a virtual environment under target/ that this creates once.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let has_deps = |python: &Path| {
            Command::new(python)
                .args(["-c", "import redis, msgpack"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let system = PathBuf::from("python3");
        if has_deps(&system) {
            return system;
        }
        let venv = manifest_dir().join("target").join("pyenv");
        let venv_python = venv.join("bin").join("python3");
        if !has_deps(&venv_python) {
            let created = Command::new("python3").args(["-m", "venv"]).arg(&venv).status();
            assert!(
                created.is_ok_and(|s| s.success()),
                "the interop tests need Python 3 with venv (Debian: apt-get install python3 python3-venv)"
            );
            let requirements = manifest_dir().join("examples/python/requirements.txt");
            let installed = Command::new(&venv_python)
                .args(["-m", "pip", "install", "--quiet", "-r"])
                .arg(requirements)
                .status()
                .unwrap();
            assert!(installed.success(), "pip install -r examples/python/requirements.txt failed");
        }
        venv_python
    })
}

fn jobqueue() -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(manifest_dir().join("examples/python/jobqueue.py"));
    cmd
}

/// Runs `jobqueue.py <command> --url <server> --queue <q> --mode <mode>`
/// (and `extra`), off the async runtime; panics, naming `what`, unless it
/// succeeds.
async fn python_check(
    server: &RedisServer,
    command: &str,
    q: &str,
    mode: Mode,
    extra: &[&str],
    what: &str,
) {
    let mut check = jobqueue();
    check
        .args([
            command,
            "--url",
            &server.url(),
            "--queue",
            q,
            "--mode",
            mode.as_str(),
        ])
        .args(extra);
    let status = tokio::task::spawn_blocking(move || check.status())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "the Python client's {what} check failed ({mode})"
    );
}

async fn rust_client_python_worker(mode: Mode) {
    let server = RedisServer::start();
    let q = queue_name("py-worker");
    let mut worker = jobqueue()
        .args([
            "worker",
            "--url",
            &server.url(),
            "--queue",
            &q,
            "--mode",
            mode.as_str(),
        ])
        .args(["--count", &(2 * PER_ENCODING).to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(worker.stdout.as_mut().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    let client = Client::connect(config(&server)).await.unwrap();
    for enc in [Encoding::MessagePack, Encoding::Json] {
        let queue = client.queue(&q, mode).await.unwrap().with_encoding(enc);
        let samples = vec![Sample::new(); PER_ENCODING];
        for handle in queue.submit_many(&samples).await.unwrap() {
            let echo: Echo = handle.result_timeout(WAIT).await.unwrap();
            assert_eq!(
                echo,
                Echo {
                    ok: true,
                    echo: Sample::new(),
                    seen_by: "python".into()
                },
                "{mode} {enc:?}"
            );
        }
    }
    let status = tokio::task::spawn_blocking(move || worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the Python worker failed");
}

async fn python_client_rust_worker(mode: Mode) {
    let server = RedisServer::start();
    let q = queue_name("py-client");
    let builder = Worker::builder(config(&server))
        .mode(mode)
        .queue(&q)
        .concurrency(4);
    let worker = spawn_built(builder, |job: Job<Sample>| async move {
        if job.payload != Sample::new() {
            return Err(format!(
                "payload differs from the sample: {:?}",
                job.payload
            ));
        }
        Ok(Echo {
            ok: true,
            echo: job.payload,
            seen_by: "rust".into(),
        })
    })
    .await;
    for enc in ["msgpack", "json"] {
        let count = PER_ENCODING.to_string();
        let extra = ["--enc", enc, "--count", &count];
        python_check(&server, "client-check", &q, mode, &extra, enc).await;
    }
    let stats = worker.stop().await;
    assert_eq!(
        (stats.completed, stats.failed),
        (2 * PER_ENCODING as u64, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_mode_rust_client_python_worker() {
    rust_client_python_worker(Mode::Simple).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_mode_python_client_rust_worker() {
    python_client_rust_worker(Mode::Simple).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoverable_mode_rust_client_python_worker() {
    rust_client_python_worker(Mode::Recoverable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoverable_mode_python_client_rust_worker() {
    python_client_rust_worker(Mode::Recoverable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_mode_rust_client_python_worker() {
    rust_client_python_worker(Mode::Reliable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_mode_python_client_rust_worker() {
    python_client_rust_worker(Mode::Reliable).await;
}

#[test]
fn the_python_implementation_replays_the_conformance_suite_and_vectors() {
    let server = RedisServer::start();
    let suite = manifest_dir().join("tests/conformance/scenarios.json");
    let status = jobqueue()
        .args(["conformance", "--url", &server.url()])
        .arg(suite)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the Python implementation fails the conformance suite"
    );
    let vectors = manifest_dir().join("tests/conformance/vectors.json");
    let status = jobqueue().arg("vectors").arg(vectors).status().unwrap();
    assert!(
        status.success(),
        "the Python implementation disagrees with the golden vectors"
    );
    let backoff = manifest_dir().join("tests/conformance/backoff.json");
    let status = jobqueue().arg("vectors").arg(backoff).status().unwrap();
    assert!(
        status.success(),
        "the Python implementation's backoff_ms disagrees with the golden backoff delays"
    );
}

#[test]
fn the_interop_payload_matches_its_golden_vector() {
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(manifest_dir().join("tests/conformance/vectors.json")).unwrap(),
    )
    .unwrap();
    let golden_hex = file["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "interop payload (msgpack)")
        .unwrap()["msgpack"]
        .as_str()
        .unwrap()
        .to_owned();
    let packed = rmp_serde::to_vec_named(&Sample::new()).unwrap();
    let golden = hex::decode(golden_hex).unwrap();
    assert_eq!(packed, golden);
    assert_eq!(
        rmp_serde::from_slice::<Sample>(&golden).unwrap(),
        Sample::new()
    );
}

/// The golden vectors (tests/conformance/vectors.json).
fn vectors() -> Vec<serde_json::Value> {
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(manifest_dir().join("tests/conformance/vectors.json")).unwrap(),
    )
    .unwrap();
    file["vectors"].as_array().unwrap().clone()
}

/// What a conforming reader makes of a record vector: its `read`, or its
/// `value` when it has none (null: the record is invalid).
fn read_of(vector: &serde_json::Value) -> &serde_json::Value {
    vector.get("read").unwrap_or(&vector["value"])
}

/// `{"hex": ...}` as bytes.
fn hex_bytes(value: &serde_json::Value) -> Vec<u8> {
    hex::decode(value["hex"].as_str().unwrap()).unwrap()
}

/// The value of `key` in a MessagePack map.
fn field<'a>(map: &'a rmpv::Value, key: &str) -> Option<&'a rmpv::Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// protocol.md section 6.4 from the worker's side: every envelope vector is
/// pushed as is on a simple-mode queue served by a Rust worker. A valid one
/// runs (and its reply arrives when it has one, so a float `submitted_ms`,
/// a str payload, keys in another order or a mistyped `reply` never
/// dead-letter it); an invalid one is dead-lettered exactly as popped, and
/// its client is told when the vector says it can be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_worker_reads_every_envelope_vector() {
    use futures_util::StreamExt;
    use redis::AsyncCommands;

    let server = RedisServer::start();
    let (ran_tx, mut ran) = tokio::sync::mpsc::unbounded_channel::<String>();
    let builder = Worker::builder(config(&server))
        .mode(Mode::Simple)
        .queue("emails")
        .concurrency(1);
    let worker = spawn_built(builder, move |job: Job<serde_json::Value>| {
        let ran = ran_tx.clone();
        async move {
            let _ = ran.send(job.id.clone());
            Ok::<_, String>(job.payload)
        }
    })
    .await;
    let redis_client = redis::Client::open(server.url()).unwrap();
    let mut pubsub = redis_client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("jq:{emails}:reply:c7").await.unwrap();
    let mut messages = Box::pin(pubsub.into_on_message());
    let mut con = redis_client
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let wait = Duration::from_secs(5);
    let mut failures = Vec::new();
    for v in vectors().iter().filter(|v| v["record"] == "envelope") {
        let name = v["name"].as_str().unwrap();
        let bytes = hex::decode(v["msgpack"].as_str().unwrap()).unwrap();
        let read = read_of(v);
        // Forget what earlier vectors left behind.
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(50), messages.next()).await
        {}
        while ran.try_recv().is_ok() {}
        let dead_before: usize = con.llen("jq:{emails}:dead").await.unwrap();
        let _: usize = con.lpush("jq:{emails}:pending", &bytes).await.unwrap();
        // The next message about the job with `status`, if one comes.
        let mut message_with = async |status: &str| {
            tokio::time::timeout(wait, async {
                while let Some(msg) = messages.next().await {
                    let payload = msg.get_payload_bytes().to_vec();
                    let Ok(reply) = rmpv::decode::read_value(&mut payload.as_slice()) else {
                        continue;
                    };
                    if field(&reply, "status").and_then(|s| s.as_str()) == Some(status) {
                        return Some(reply);
                    }
                }
                None
            })
            .await
            .ok()
            .flatten()
        };
        if read.is_null() {
            if v["told"] == true {
                match message_with("failed").await {
                    Some(reply)
                        if field(&reply, "error")
                            .and_then(|e| field(e, "kind"))
                            .and_then(|k| k.as_str())
                            == Some("decode") => {}
                    other => failures.push(format!(
                        "{name}: its client was not told (kind decode): {other:?}"
                    )),
                }
            }
            let mut record = None;
            for _ in 0..100 {
                let len: usize = con.llen("jq:{emails}:dead").await.unwrap();
                if len > dead_before {
                    let top: Vec<u8> = con.lindex("jq:{emails}:dead", 0).await.unwrap();
                    record = Some(rmpv::decode::read_value(&mut top.as_slice()).unwrap());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            match record {
                Some(r) if field(&r, "entry").and_then(|e| e.as_slice()) == Some(&bytes[..]) => {}
                Some(r) => failures.push(format!("{name}: dead-letter record {r}")),
                None => failures.push(format!("{name}: not dead-lettered")),
            }
            if let Ok(id) = ran.try_recv() {
                failures.push(format!("{name}: invalid, yet job {id} ran"));
            }
            continue;
        }
        let id = read["id"].as_str().unwrap();
        match tokio::time::timeout(wait, ran.recv()).await {
            Ok(Some(got)) if got == id => {}
            other => {
                failures.push(format!("{name}: the job did not run: {other:?}"));
                continue;
            }
        }
        if read.get("reply").is_some() {
            match message_with("completed").await {
                Some(reply) if field(&reply, "id").and_then(|i| i.as_str()) == Some(id) => {}
                other => failures.push(format!("{name}: no completed reply: {other:?}")),
            }
        }
    }
    worker.stop().await;
    assert!(
        failures.is_empty(),
        "the Rust worker disagrees with these envelope vectors:\n{}",
        failures.join("\n")
    );
}

/// protocol.md sections 6.4 and 8.3 from the client's side: every reply and
/// doorbell vector is published on a Rust client's reply channel for jobs
/// with the vector's IDs. A reply (simple mode) or a doorbell that carries
/// the outcome ends the wait with that outcome; a doorbell without the
/// outcome (dead, or failed without an error record) does not: the client
/// reads the hash, where the job still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_reads_every_reply_and_doorbell_vector() {
    use job_async_redis::{Error, JobOptions};
    use redis::AsyncCommands;

    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut failures = Vec::new();
    for v in vectors()
        .iter()
        .filter(|v| v["record"] == "reply" || v["record"] == "doorbell")
    {
        let name = v["name"].as_str().unwrap();
        let read = read_of(v);
        let records: Vec<&serde_json::Value> = match read {
            serde_json::Value::Null => continue,
            serde_json::Value::Array(records) => records.iter().collect(),
            record => vec![record],
        };
        let mode = if v["record"] == "reply" {
            Mode::Simple
        } else {
            Mode::Recoverable
        };
        let queue = client
            .queue(&queue_name("vector"), mode)
            .await
            .unwrap()
            .with_encoding(Encoding::Json);
        let mut handles = Vec::new();
        for record in &records {
            let id = record["id"].as_str().unwrap();
            let options = JobOptions::default().id(id);
            handles.push(queue.submit_with("hi", options).await.unwrap());
        }
        let channel = format!("jq:{{{}}}:reply:{}", queue.name(), client.id());
        let bytes = hex::decode(v["msgpack"].as_str().unwrap()).unwrap();
        let _: i64 = con.publish(&channel, &bytes).await.unwrap();
        for (record, handle) in records.into_iter().zip(handles) {
            let completed = record["status"] == "completed";
            let carries =
                (completed && record.get("result").is_some()) || record.get("error").is_some();
            let patience = if carries || mode == Mode::Simple {
                Duration::from_secs(5)
            } else {
                Duration::from_millis(300)
            };
            let got = handle.result_timeout::<serde_json::Value>(patience).await;
            let ok = match &got {
                Err(Error::Timeout { .. }) => !carries && mode != Mode::Simple,
                Ok(value) => {
                    completed
                        && carries
                        && *value
                            == serde_json::from_slice::<serde_json::Value>(&hex_bytes(
                                &record["result"],
                            ))
                            .unwrap()
                }
                Err(Error::JobFailed { kind, message, .. }) => match record.get("error") {
                    Some(error) => kind.as_str() == error["kind"] && message == &error["message"],
                    None => mode == Mode::Simple && kind.as_str() == record["status"],
                },
                Err(_) => false,
            };
            if !ok {
                failures.push(format!("{name}, job {}: got {got:?}", record["id"]));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "the Rust client disagrees with these reply and doorbell vectors:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Handler timeouts (protocol.md sections 6.1, 6.2, 8.4, 10.6, 10.8, 10.14)
// ---------------------------------------------------------------------------

/// A timeout job: the handler sleeps `sleep_ms`, then answers
/// `"slept <name>"` (`nap_handler` in jobqueue.py).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Nap {
    name: String,
    sleep_ms: u64,
}

/// The worker's default handler timeout in both directions.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// The same jobs as `TIMEOUT_JOBS` in jobqueue.py: (name, sleep ms, own
/// timeout ms (0: none), max attempts, expected outcome). "own" times out
/// by its own 300 ms and, in recoverable and reliable modes, runs twice
/// (retried like `handler`); "default" has no timeout of its own and times
/// out by the worker's default (500 ms); "longer" has its own timeout,
/// longer than the worker's default, and completes.
const TIMEOUT_JOBS: [(&str, u64, u64, u32, &str); 3] = [
    ("own", 10_000, 300, 2, "timeout"),
    ("default", 10_000, 0, 1, "timeout"),
    ("longer", 800, 5_000, 1, "slept longer"),
];

/// How many attempts of job `name` a worker runs in `mode`.
fn timeout_attempts(mode: Mode, name: &str) -> u32 {
    if name == "own" && mode != Mode::Simple {
        2
    } else {
        1
    }
}

/// A Rust client submits jobs with and without timeouts of their own to a
/// Python worker with a default timeout, in every mode, with a plain and an
/// `async def` handler: the Python worker abandons the handlers that run
/// too long (SIGALRM; the task cancelled), the client gets kind `timeout`,
/// a job with attempts left is retried, and a job's own timeout overrides
/// the worker's default, also when it is longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_times_out_jobs_a_rust_client_submitted() {
    use job_async_redis::{Error, FailureKind, JobOptions};
    use redis::AsyncCommands;

    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for mode in [Mode::Simple, Mode::Recoverable, Mode::Reliable] {
        for handler in ["nap-sync", "nap"] {
            let q = queue_name("py-timeout");
            let count: u32 = TIMEOUT_JOBS
                .iter()
                .map(|j| timeout_attempts(mode, j.0))
                .sum();
            let mut worker = jobqueue()
                .args(["worker", "--url", &server.url(), "--queue", &q])
                .args(["--mode", mode.as_str(), "--handler", handler])
                .args(["--timeout-ms", &DEFAULT_TIMEOUT.as_millis().to_string()])
                .args(["--count", &count.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut ready = String::new();
            BufReader::new(worker.stdout.as_mut().unwrap())
                .read_line(&mut ready)
                .unwrap();
            assert_eq!(ready.trim(), "ready");
            let queue = client.queue(&q, mode).await.unwrap();
            let mut handles = Vec::new();
            for (name, sleep_ms, own, attempts, want) in TIMEOUT_JOBS {
                let mut options = JobOptions::default().max_attempts(attempts);
                if own > 0 {
                    options = options.timeout(Duration::from_millis(own));
                }
                let nap = Nap {
                    name: name.into(),
                    sleep_ms,
                };
                let handle = queue.submit_with(&nap, options).await.unwrap();
                handles.push((name, want, handle.id().to_owned(), handle));
            }
            for (name, want, id, handle) in handles {
                let got = handle.result_timeout::<String>(WAIT).await;
                match (&got, want) {
                    (Ok(result), want) if result == want => {}
                    (Err(Error::JobFailed { kind, .. }), "timeout")
                        if *kind == FailureKind::Timeout => {}
                    _ => panic!("{mode} {handler}: job {name}: got {got:?}, want {want}"),
                }
                if mode != Mode::Simple {
                    let attempt: Option<String> = con
                        .hget(format!("jq:{{{q}}}:job:{id}"), "attempt")
                        .await
                        .unwrap();
                    assert_eq!(
                        attempt,
                        Some(timeout_attempts(mode, name).to_string()),
                        "{mode} {handler}: attempts of job {name}"
                    );
                }
            }
            let status = tokio::task::spawn_blocking(move || worker.wait())
                .await
                .unwrap()
                .unwrap();
            assert!(
                status.success(),
                "the Python worker failed ({mode}, {handler})"
            );
        }
    }
}

/// Flags a handler future that was dropped before it finished: the worker
/// abandoned it.
struct Abandon(Arc<Mutex<Vec<String>>>, Option<String>);

impl Abandon {
    /// The handler finished: it was not abandoned.
    fn finished(mut self) {
        self.1 = None;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if let Some(name) = self.1.take() {
            self.0.lock().unwrap().push(name);
        }
    }
}

/// A Python client submits jobs with and without timeouts of their own
/// (`timeout_ms` in the envelope, or job_submit's seventh argument per job)
/// to a Rust worker with a default timeout (`WorkerBuilder::timeout`), in
/// every mode: the handler's future is dropped when its timeout runs out,
/// the Python client reads kind `timeout`, a job with attempts left runs
/// again, and a job's own timeout overrides the worker's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_worker_times_out_jobs_a_python_client_submitted() {
    let server = RedisServer::start();
    for mode in [Mode::Simple, Mode::Recoverable, Mode::Reliable] {
        let q = queue_name("py-timeout-client");
        let runs: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
        let abandoned: Arc<Mutex<Vec<String>>> = Arc::default();
        let builder = Worker::builder(config(&server))
            .mode(mode)
            .queue(&q)
            .concurrency(4)
            .timeout(DEFAULT_TIMEOUT);
        let (seen, dropped) = (runs.clone(), abandoned.clone());
        let worker = spawn_built(builder, move |job: Job<Nap>| {
            seen.lock()
                .unwrap()
                .push((job.payload.name.clone(), job.attempt));
            let flag = Abandon(dropped.clone(), Some(job.payload.name.clone()));
            async move {
                tokio::time::sleep(Duration::from_millis(job.payload.sleep_ms)).await;
                flag.finished();
                Ok::<_, String>(format!("slept {}", job.payload.name))
            }
        })
        .await;
        python_check(&server, "client-timeouts", &q, mode, &[], "timeout").await;
        worker.stop().await;
        let mut ran = runs.lock().unwrap().clone();
        ran.sort();
        let mut want: Vec<(String, u32)> = TIMEOUT_JOBS
            .iter()
            .flat_map(|j| (1..=timeout_attempts(mode, j.0)).map(|a| (j.0.to_owned(), a)))
            .collect();
        want.sort();
        assert_eq!(ran, want, "{mode}: the handler's runs (name, attempt)");
        let mut gone = abandoned.lock().unwrap().clone();
        gone.sort();
        let mut want_gone: Vec<String> = TIMEOUT_JOBS
            .iter()
            .filter(|j| j.4 == "timeout")
            .flat_map(|j| vec![j.0.to_owned(); timeout_attempts(mode, j.0) as usize])
            .collect();
        want_gone.sort();
        assert_eq!(gone, want_gone, "{mode}: the handler futures dropped");
    }
}

// ---------------------------------------------------------------------------
// Delayed jobs and retry backoff (protocol.md 8.7): job_submit 8,
// simple_submit 3, job_finish 10, job_promote
// ---------------------------------------------------------------------------

/// A delayed-job interop job. A handler fails the first attempt of one with
/// `fail_first` (the Rust worker's; jobqueue.py's `client-delayed` sends it).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tick {
    name: String,
    #[serde(default)]
    fail_first: bool,
}

/// What the delayed-job handlers answer: when the attempt ran (ms since the
/// Unix epoch; Redis, Python and Rust share this machine's clock).
/// `clock_handler` in jobqueue.py.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ran {
    name: String,
    ran_ms: u64,
    attempt: u32,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Starts the Python worker with `handler` on queue `q`, until it ran
/// `count` attempts, and waits for its "ready".
fn python_worker(
    server: &RedisServer,
    q: &str,
    mode: Mode,
    handler: &str,
    count: u32,
) -> std::process::Child {
    let mut worker = jobqueue()
        .args(["worker", "--url", &server.url(), "--queue", q])
        .args(["--mode", mode.as_str(), "--handler", handler])
        .args(["--count", &count.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(worker.stdout.as_mut().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    worker
}

/// Watches queue `q`'s timekeeper lease (GET every 5 ms) until `stop` is
/// set; answers the holders seen in order, each change once (`None`: no
/// lease).
fn watch_timekeeper(
    server: &RedisServer,
    q: &str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Option<String>>> {
    let url = server.url();
    let key = format!("jq:{{{q}}}:timekeeper");
    tokio::spawn(async move {
        use redis::AsyncCommands;
        let mut con = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut seen: Vec<Option<String>> = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let holder: Option<String> = con.get(&key).await.unwrap();
            if seen.last() != Some(&holder) {
                seen.push(holder);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    })
}

/// Waits for the Python worker to exit, and checks that it succeeded.
async fn python_worker_succeeds(mut worker: std::process::Child, what: &str) {
    let status = tokio::task::spawn_blocking(move || worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the Python worker failed ({what})");
}

/// How late a job may run after it was due on a queue that only a Python
/// worker serves: it promotes before each blocking wait (200 ms at most in
/// these tests, cut short by the next due time it knows of; a job delayed
/// after the wait began is found at the next one), and Redis ends a
/// blocking command on its own timer, up to about 100 ms late.
const PYTHON_ALONE_LATE_MS: u64 = 1_000;

/// A Rust client submits jobs with a delay (`JobOptions::delay`) and a
/// run-at time (`JobOptions::run_at`, in the future and in the past) to a
/// Python worker, in every mode: the worker promotes each job when it is
/// due (job_promote, its blocking wait cut short by the next due time), and
/// runs none before, nor more than about a second after, although nobody
/// is the timekeeper: the Python worker never takes the role (its
/// job_promote calls give keeper ms 0), so the queue has no timekeeper
/// lease at any time. A job not yet due is `delayed` with its due_ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_runs_delayed_jobs_a_rust_client_submitted() {
    use job_async_redis::{JobOptions, JobState};
    use std::time::UNIX_EPOCH;

    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    // (name, delay ms, run at ms from now): "past" was due a minute ago.
    let jobs: [(&str, u64, Option<i64>); 5] = [
        ("now", 0, None),
        ("d300", 300, None),
        ("d800", 800, None),
        ("at500", 0, Some(500)),
        ("past", 0, Some(-60_000)),
    ];
    for mode in [Mode::Simple, Mode::Recoverable, Mode::Reliable] {
        let q = queue_name("py-delayed");
        let worker = python_worker(&server, &q, mode, "clock", jobs.len() as u32);
        let stop = Arc::new(AtomicBool::new(false));
        let keepers = watch_timekeeper(&server, &q, stop.clone());
        let queue = client.queue(&q, mode).await.unwrap();
        let mut handles = Vec::new();
        for (name, delay, run_at) in jobs {
            let sent = now_ms();
            let mut options = JobOptions::default();
            let mut due = sent + delay;
            if let Some(offset) = run_at {
                due = sent.checked_add_signed(offset).unwrap();
                options = options.run_at(UNIX_EPOCH + Duration::from_millis(due));
            } else if delay > 0 {
                options = options.delay(Duration::from_millis(delay));
            }
            let tick = Tick {
                name: name.into(),
                fail_first: false,
            };
            let handle = queue.submit_with(&tick, options).await.unwrap();
            // Due between `due` and this (a delay counts from the submit).
            let latest = if run_at.is_some() {
                due.max(now_ms())
            } else {
                now_ms() + delay
            };
            handles.push((name, due, latest, handle));
        }
        if mode != Mode::Simple {
            let (_, due, latest, handle) = &handles[2]; // d800
            if *due > now_ms() + 200 {
                let status = queue.status(handle.id()).await.unwrap().unwrap();
                assert_eq!(status.state, JobState::Delayed, "{mode}: d800");
                let due_ms = status.due_ms.unwrap();
                assert!(
                    (due - 1..=latest + 1).contains(&due_ms),
                    "{mode}: d800 due_ms {due_ms}, want {due} to {latest}"
                );
            }
        }
        for (name, due, latest, handle) in handles {
            let ran: Ran = handle.result_timeout(WAIT).await.unwrap();
            assert_eq!(ran.name, name);
            // 1 ms to spare: Python and Redis round the same clock apart.
            assert!(
                ran.ran_ms + 1 >= due,
                "{mode}: job {name} ran at {}, {} ms before it was due",
                ran.ran_ms,
                due - ran.ran_ms
            );
            assert!(
                ran.ran_ms <= latest + PYTHON_ALONE_LATE_MS,
                "{mode}: job {name} ran at {}, {} ms after it was due",
                ran.ran_ms,
                ran.ran_ms.saturating_sub(latest)
            );
        }
        python_worker_succeeds(worker, mode.as_str()).await;
        stop.store(true, Ordering::SeqCst);
        let seen = keepers.await.unwrap();
        assert_eq!(
            seen,
            [None],
            "{mode}: the Python worker took the timekeeper lease"
        );
    }
}

/// A Python client submits jobs with a delay and a run-at time (and, in
/// recoverable and reliable modes, a job with a fixed backoff of 400 ms
/// that fails once) to a Rust worker, in every mode: `client-delayed`
/// checks the due times in the hashes and that no job ran before it was due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_worker_runs_delayed_jobs_a_python_client_submitted() {
    let server = RedisServer::start();
    for mode in [Mode::Simple, Mode::Recoverable, Mode::Reliable] {
        let q = queue_name("py-delayed-client");
        let builder = Worker::builder(config(&server))
            .mode(mode)
            .queue(&q)
            .concurrency(4);
        let worker = spawn_built(builder, |job: Job<Tick>| async move {
            if job.payload.fail_first && job.attempt == 1 {
                return Err(format!("planned failure of attempt {}", job.attempt));
            }
            Ok(Ran {
                name: job.payload.name,
                ran_ms: now_ms(),
                attempt: job.attempt,
            })
        })
        .await;
        python_check(&server, "client-delayed", &q, mode, &[], "delayed-job").await;
        let stats = worker.stop().await;
        let jobs = if mode == Mode::Simple { 5 } else { 6 };
        assert_eq!(stats.completed, jobs, "{mode}");
    }
}

/// A retry interop job: attempt n does `plan[n - 1]` ("fail",
/// "retry-after:<ms>", "no-retry"); past the plan it completes with the
/// start time of each attempt (`plan_handler` in jobqueue.py).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Plan {
    name: String,
    plan: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Runs {
    name: String,
    runs: Vec<u64>,
}

/// A Rust client submits jobs with a backoff (`JobOptions::backoff`) to a
/// Python worker whose handler fails as each job's plan says, in
/// recoverable and reliable modes: job_finish queues each retry in the
/// delayed set for the policy's delay (`Backoff::delay`, jitter included),
/// and the Python worker runs it no earlier; a handler's RetryAfter
/// replaces the backoff; NoRetry fails the job at once; the last attempt's
/// failure is final.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_retries_failed_jobs_after_their_backoff() {
    use job_async_redis::{Backoff, Error, FailureKind, JobOptions};

    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let ms = Duration::from_millis;
    let plans: [(&str, &[&str], Backoff); 5] = [
        ("fixed", &["fail", "fail"], Backoff::fixed(ms(400))),
        (
            "jitter",
            &["fail", "fail"],
            Backoff::exponential(ms(300)).max(ms(2_000)).jitter(0.5),
        ),
        ("asked", &["retry-after:250"], Backoff::fixed(ms(60_000))),
        ("never", &["no-retry"], Backoff::fixed(ms(400))),
        (
            "exhausted",
            &["fail", "fail", "fail"],
            Backoff::fixed(ms(200)),
        ),
    ];
    // Attempts: 3 + 3 + 2 + 1 + 3.
    let attempts = 12;
    for mode in [Mode::Recoverable, Mode::Reliable] {
        let q = queue_name("py-backoff");
        let worker = python_worker(&server, &q, mode, "plan", attempts);
        let queue = client.queue(&q, mode).await.unwrap();
        let mut handles = Vec::new();
        for (name, plan, backoff) in plans {
            let job = Plan {
                name: name.into(),
                plan: plan.iter().map(|s| s.to_string()).collect(),
            };
            let options = JobOptions::default().max_attempts(3).backoff(backoff);
            handles.push((
                name,
                backoff,
                queue.submit_with(&job, options).await.unwrap(),
            ));
        }
        for (name, backoff, handle) in handles {
            let id = handle.id().to_owned();
            let got = handle.result_timeout::<Runs>(WAIT).await;
            let status = queue.status(&id).await.unwrap().unwrap();
            assert_eq!(
                status.backoff,
                Some(backoff),
                "{mode} {name}: the stored policy"
            );
            // The time between the starts of two attempts: at least the
            // delay (1 ms to spare: Python and Redis round the same clock
            // apart), and not much more.
            let gaps =
                |runs: &[u64]| -> Vec<u64> { runs.windows(2).map(|w| w[1] - w[0]).collect() };
            match name {
                "fixed" | "jitter" => {
                    let runs = got.unwrap().runs;
                    assert_eq!(runs.len(), 3, "{mode} {name}: {runs:?}");
                    for (n, gap) in gaps(&runs).into_iter().enumerate() {
                        let want = backoff.delay(&id, n as u32 + 1).as_millis() as u64;
                        assert!(
                            gap + 1 >= want && gap < want + 5_000,
                            "{mode} {name}: attempt {} started {gap} ms after attempt {}, backoff {want} ms",
                            n + 2,
                            n + 1
                        );
                    }
                    let due = status.due_ms.unwrap();
                    assert!(
                        due >= runs[1] + backoff.delay(&id, 2).as_millis() as u64
                            && due <= runs[2] + 1,
                        "{mode} {name}: due_ms {due}, runs {runs:?}"
                    );
                }
                "asked" => {
                    let runs = got.unwrap().runs;
                    assert_eq!(runs.len(), 2, "{mode} {name}: {runs:?}");
                    let gap = runs[1] - runs[0];
                    assert!(
                        (249..10_000).contains(&gap),
                        "{mode} {name}: retried {gap} ms later, asked 250 ms (backoff 60 s)"
                    );
                }
                _ => {
                    let (want_attempts, want_message) = if name == "never" {
                        (1, "planned: no retry")
                    } else {
                        (3, "RuntimeError: planned failure of attempt 3")
                    };
                    match got {
                        Err(Error::JobFailed { kind, message, .. }) => {
                            assert_eq!(kind, FailureKind::Handler, "{mode} {name}");
                            assert_eq!(message, want_message, "{mode} {name}");
                        }
                        other => panic!("{mode} {name}: {other:?}"),
                    }
                    assert_eq!(status.attempt, want_attempts, "{mode} {name}: attempts");
                }
            }
        }
        python_worker_succeeds(worker, mode.as_str()).await;
    }
}

/// Submits a job (`Tick` named `d<delay>`) per delay in ms, and checks that
/// each ran (`Ran`) when due, not before (1 ms to spare: Python and Redis
/// round the same clock apart), and at most `late_ms` after.
async fn submit_delayed(queue: &job_async_redis::Queue, delays: &[u64], late_ms: u64) {
    use job_async_redis::JobOptions;

    let mut handles = Vec::new();
    for &delay in delays {
        let sent = now_ms();
        let tick = Tick {
            name: format!("d{delay}"),
            fail_first: false,
        };
        let options = JobOptions::default().delay(Duration::from_millis(delay));
        let handle = queue.submit_with(&tick, options).await.unwrap();
        handles.push((tick.name, sent + delay, now_ms() + delay, handle));
    }
    for (name, due, latest, handle) in handles {
        let ran: Ran = handle.result_timeout(WAIT).await.unwrap();
        assert_eq!(ran.name, name);
        assert!(
            ran.ran_ms + 1 >= due && ran.ran_ms <= latest + late_ms,
            "{} {}: job {name} due from {due} to {latest} ran at {}",
            queue.mode(),
            queue.name(),
            ran.ran_ms
        );
    }
}

/// A Python worker never takes the timekeeper role (protocol.md 8.7): it
/// runs one job at a time, so as the timekeeper it would hold up every
/// delayed job of the queue while its handler runs; it calls job_promote
/// with keeper ms 0, which never takes the role and gives it up only when
/// the caller holds it. Alone on a queue, it leaves the lease free. Once a
/// Rust worker serves the queue too, the lease is the Rust worker's all
/// along (the Python worker's calls neither take nor drop it), delayed jobs
/// run on time whichever worker takes them, and when the Python worker
/// stops (SIGINT) the Rust worker keeps the role and runs the next delayed
/// job on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_never_takes_the_timekeeper_role() {
    use redis::AsyncCommands;

    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for mode in [Mode::Recoverable, Mode::Reliable] {
        let q = queue_name("py-keeper");
        let keeper_key = format!("jq:{{{q}}}:timekeeper");
        let queue = client.queue(&q, mode).await.unwrap();
        // The Python worker alone: no lease, and delayed jobs run anyway.
        let python = python_worker(&server, &q, mode, "clock", 1_000);
        let stop = Arc::new(AtomicBool::new(false));
        let alone = watch_timekeeper(&server, &q, stop.clone());
        submit_delayed(&queue, &[150, 400], PYTHON_ALONE_LATE_MS).await;
        stop.store(true, Ordering::SeqCst);
        assert_eq!(
            alone.await.unwrap(),
            [None],
            "{mode}: the Python worker took the timekeeper lease"
        );

        // A Rust worker joins: it takes the role at once, and keeps it.
        let builder = Worker::builder(config(&server))
            .mode(mode)
            .queue(&q)
            .concurrency(1);
        let worker = builder.build().await.unwrap();
        let rust_id = worker.id().to_owned();
        let shutdown = worker.shutdown_handle();
        let task = tokio::spawn(worker.run(|job: Job<Tick>| async move {
            Ok::<_, String>(Ran {
                name: job.payload.name,
                ran_ms: now_ms(),
                attempt: job.attempt,
            })
        }));
        let rust = support::Running { shutdown, task };
        let mut holder: Option<String> = None;
        for _ in 0..200 {
            holder = con.get(&keeper_key).await.unwrap();
            if holder.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            holder.as_deref(),
            Some(rust_id.as_str()),
            "{mode}: the Rust worker takes the timekeeper role"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let together = watch_timekeeper(&server, &q, stop.clone());
        // Both serve the queue; the Python worker keeps calling job_promote
        // before each of its waits, while jobs are delayed.
        submit_delayed(
            &queue,
            &[100, 300, 500, 700, 900, 1_100, 1_300, 1_500],
            PYTHON_ALONE_LATE_MS,
        )
        .await;

        // The Python worker stops: the lease stays the Rust worker's.
        let interrupted = Command::new("kill")
            .args(["-INT", &python.id().to_string()])
            .status()
            .unwrap();
        assert!(interrupted.success());
        let mut python = python;
        let exited = tokio::task::spawn_blocking(move || python.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            exited.code(),
            Some(130),
            "{mode}: the Python worker stops on SIGINT"
        );
        // The Rust timekeeper promotes within milliseconds.
        submit_delayed(&queue, &[300], 500).await;
        stop.store(true, Ordering::SeqCst);
        assert_eq!(
            together.await.unwrap(),
            [Some(rust_id.clone())],
            "{mode}: the timekeeper lease changed hands while a Rust worker served the queue"
        );
        rust.stop().await;
    }
}

// ---------------------------------------------------------------------------
// Queue controls (protocol.md 8.9): queue_control, job_claim 4, job_start 11,
// reliable_start 11, and the gate list
// ---------------------------------------------------------------------------

/// The states (`state` of each job hash) of jobs `ids` of queue `q`, read
/// in one transaction: one moment of the queue.
async fn job_states(
    con: &mut redis::aio::MultiplexedConnection,
    q: &str,
    ids: &[String],
) -> Vec<Option<String>> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for id in ids {
        pipe.hget(format!("jq:{{{q}}}:job:{id}"), "state");
    }
    pipe.query_async(con).await.unwrap()
}

/// How many scripts the server ran so far (EVALSHA and EVAL calls, from
/// INFO commandstats): a worker that spins on a shut gate makes thousands
/// a second.
async fn script_calls(con: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split_once("calls=")?
                .1
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// How many `ERR` error replies the server sent so far (INFO errorstats:
/// Redis's own errors, such as a script's command refused; not the
/// scripts' JQ_ refusals).
async fn err_replies(con: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("errorstats")
        .query_async(con)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("errorstat_ERR:count="))
        .and_then(|n| n.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Stops a Python worker that serves forever (`--count` beyond its jobs)
/// with SIGINT, and checks that it left cleanly (exit code 130).
async fn interrupt_python_worker(mut worker: std::process::Child, what: &str) {
    let interrupted = Command::new("kill")
        .args(["-INT", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let exited = tokio::task::spawn_blocking(move || worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        exited.code(),
        Some(130),
        "the Python worker stops on SIGINT ({what})"
    );
}

/// A queue paused from Rust (`Queue::pause`) holds a Python worker back, in
/// recoverable and reliable modes: its job_claim / reliable_start calls are
/// held (and a popped ticket, or an ID moved to its in-flight list, goes
/// back), so for a second no job leaves `queued`; meanwhile it waits on the
/// queue's gate list instead of spinning (a few script calls a second, not
/// thousands). `Queue::resume` pushes the gate list: the worker wakes and
/// runs every job promptly, none before the resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_starts_nothing_while_its_queue_is_paused() {
    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    const JOBS: u32 = 5;
    for mode in [Mode::Recoverable, Mode::Reliable] {
        let q = queue_name("py-paused");
        let queue = client.queue(&q, mode).await.unwrap();
        assert!(!queue.pause().await.unwrap(), "{mode}: was not paused");
        assert!(queue.controls().await.unwrap().paused, "{mode}");
        let worker = python_worker(&server, &q, mode, "clock", JOBS);
        let mut handles = Vec::new();
        for n in 0..JOBS {
            let tick = Tick {
                name: format!("p{n}"),
                fail_first: false,
            };
            handles.push(queue.submit(&tick).await.unwrap());
        }
        let ids: Vec<String> = handles.iter().map(|h| h.id().to_owned()).collect();
        let calls_before = script_calls(&mut con).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let calls = script_calls(&mut con).await - calls_before;
        let states = job_states(&mut con, &q, &ids).await;
        assert!(
            states.iter().all(|s| s.as_deref() == Some("queued")),
            "{mode}: a job left queued while the queue was paused: {states:?}"
        );
        // The Python worker wakes every 200 ms at most (its block_s) and
        // makes a few calls each time (heartbeat, job_promote, the start).
        assert!(
            calls < 200,
            "{mode}: {calls} script calls in a second while held: the worker spins"
        );
        let resumed = now_ms();
        assert!(queue.resume().await.unwrap(), "{mode}: was paused");
        for handle in handles {
            let ran: Ran = handle.result_timeout(WAIT).await.unwrap();
            // 1 ms to spare: Python and Redis round the same clock apart.
            assert!(
                ran.ran_ms + 1 >= resumed,
                "{mode}: job {} ran {} ms before the resume",
                ran.name,
                resumed - ran.ran_ms
            );
            assert!(
                ran.ran_ms <= resumed + 3_000,
                "{mode}: job {} ran {} ms after the resume",
                ran.name,
                ran.ran_ms - resumed
            );
        }
        python_worker_succeeds(worker, mode.as_str()).await;
    }
}

/// A concurrency limit of 2 (`Queue::set_concurrency_limit`) holds across
/// four Python worker processes (each runs one job at a time), in
/// recoverable and reliable modes: the job hashes, sampled in one
/// transaction every 20 ms while 200 ms jobs run, never show more than two
/// `active` at once (and do show two: the limit is used). Every finish
/// gives its slot back (job_finish pushes the gate list, waking a held
/// worker), so all jobs complete, and none is left counted: the running
/// set (reliable) and the lease set are empty at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_holds_across_python_workers() {
    use redis::AsyncCommands;

    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    const JOBS: usize = 12;
    const LIMIT: usize = 2;
    for mode in [Mode::Recoverable, Mode::Reliable] {
        let q = queue_name("py-limited");
        let queue = client.queue(&q, mode).await.unwrap();
        queue
            .set_concurrency_limit(Some(LIMIT as u32))
            .await
            .unwrap();
        assert_eq!(
            queue.controls().await.unwrap().concurrency,
            Some(LIMIT as u32)
        );
        let workers: Vec<_> = (0..4)
            .map(|_| python_worker(&server, &q, mode, "nap-sync", 1_000))
            .collect();
        let mut handles = Vec::new();
        for n in 0..JOBS {
            let nap = Nap {
                name: format!("c{n}"),
                sleep_ms: 200,
            };
            handles.push(queue.submit(&nap).await.unwrap());
        }
        let ids: Vec<String> = handles.iter().map(|h| h.id().to_owned()).collect();
        let mut peak = 0;
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let states = job_states(&mut con, &q, &ids).await;
            let active = states
                .iter()
                .filter(|s| s.as_deref() == Some("active"))
                .count();
            assert!(
                active <= LIMIT,
                "{mode}: {active} jobs active at once under a limit of {LIMIT}: {states:?}"
            );
            peak = peak.max(active);
            if states.iter().all(|s| s.as_deref() == Some("completed")) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{mode}: the jobs did not complete: {states:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(peak, LIMIT, "{mode}: the limit's slots were never all used");
        for (n, handle) in handles.into_iter().enumerate() {
            let got: String = handle.result_timeout(WAIT).await.unwrap();
            assert_eq!(got, format!("slept c{n}"), "{mode}");
        }
        let running: usize = con.zcard(format!("jq:{{{q}}}:running")).await.unwrap();
        let leases: usize = con.zcard(format!("jq:{{{q}}}:leases")).await.unwrap();
        assert_eq!((running, leases), (0, 0), "{mode}: slots left taken");
        for worker in workers {
            interrupt_python_worker(worker, mode.as_str()).await;
        }
    }
}

/// The Python client's queue controls (queue_control) against a Rust
/// worker, in recoverable and reliable modes: `jobqueue.py pause` holds the
/// Rust worker back (its jobs stay `queued`, `Queue::controls` reads the
/// pause, and its start calls are held, not failing: no `ERR` reply), and
/// `jobqueue.py resume` lets it run them, none before. The
/// rate and concurrency limits the Python client sets are the ones the
/// Rust client reads, and `--clear` removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_worker_honours_a_pause_from_the_python_client() {
    use job_async_redis::{JobState, RateLimit};

    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for mode in [Mode::Recoverable, Mode::Reliable] {
        let q = queue_name("py-pauses");
        let builder = Worker::builder(config(&server))
            .mode(mode)
            .queue(&q)
            .concurrency(4);
        let worker = spawn_built(builder, |job: Job<Tick>| async move {
            Ok::<_, String>(Ran {
                name: job.payload.name,
                ran_ms: now_ms(),
                attempt: job.attempt,
            })
        })
        .await;
        let queue = client.queue(&q, mode).await.unwrap();
        python_check(&server, "pause", &q, mode, &[], "pause").await;
        assert!(queue.controls().await.unwrap().paused, "{mode}");
        let mut handles = Vec::new();
        for n in 0..4 {
            let tick = Tick {
                name: format!("r{n}"),
                fail_first: false,
            };
            handles.push(queue.submit(&tick).await.unwrap());
        }
        let errors_before = err_replies(&mut con).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            err_replies(&mut con).await,
            errors_before,
            "{mode}: the worker's calls failed while the queue was paused"
        );
        for handle in &handles {
            let status = queue.status(handle.id()).await.unwrap().unwrap();
            assert_eq!(
                status.state,
                JobState::Queued,
                "{mode}: started while paused"
            );
        }
        let resumed = now_ms();
        python_check(&server, "resume", &q, mode, &[], "resume").await;
        for handle in handles {
            let ran: Ran = handle.result_timeout(WAIT).await.unwrap();
            assert!(
                ran.ran_ms + 1 >= resumed && ran.ran_ms <= resumed + 5_000,
                "{mode}: job {} ran at {}, resumed at {resumed}",
                ran.name,
                ran.ran_ms
            );
        }
        let limits = [
            ("rate-limit", &["--max", "5", "--window-ms", "1000"][..]),
            ("concurrency-limit", &["--max", "3"][..]),
        ];
        for (command, extra) in limits {
            python_check(&server, command, &q, mode, extra, command).await;
        }
        let controls = queue.controls().await.unwrap();
        assert!(!controls.paused, "{mode}");
        assert_eq!(
            controls.rate,
            Some(RateLimit::new(5, Duration::from_millis(1_000))),
            "{mode}"
        );
        assert_eq!(controls.concurrency, Some(3), "{mode}");
        for command in ["rate-limit", "concurrency-limit"] {
            python_check(&server, command, &q, mode, &["--clear"], command).await;
        }
        let controls = queue.controls().await.unwrap();
        assert_eq!(
            (controls.rate, controls.concurrency),
            (None, None),
            "{mode}"
        );
        let stats = worker.stop().await;
        assert_eq!((stats.completed, stats.failed), (4, 0), "{mode}");
    }
}

// ---------------------------------------------------------------------------
// Cancellation, progress, unique jobs and events (protocol.md 8.10 to 8.13):
// job_cancel 1, job_progress 1, job_submit 10's unique keys, queue_control
// 2's "events" and the event stream, across both implementations
// ---------------------------------------------------------------------------

/// Runs `jobqueue.py <command> --url <server> --queue <q> --mode <mode>`
/// (and `extra`), off the async runtime, and answers what it printed;
/// panics, with its stderr, unless it succeeds.
async fn python_output(
    server: &RedisServer,
    command: &str,
    q: &str,
    mode: Mode,
    extra: &[&str],
) -> String {
    let mut cmd = jobqueue();
    cmd.args([command, "--url", &server.url(), "--queue", q])
        .args(["--mode", mode.as_str()])
        .args(extra);
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "jobqueue.py {command} failed ({mode}): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Waits until job `id`'s state is `want` (read every 10 ms, for 10 s at
/// most).
async fn wait_for_state(queue: &job_async_redis::Queue, id: &str, want: job_async_redis::JobState) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = queue.status(id).await.unwrap().map(|s| s.state);
        if state.as_ref() == Some(&want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} is {state:?}, never {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The in-flight lists of queue `q` that hold IDs (reliable mode): a worker
/// leaves none behind once its jobs ended.
async fn inflight_ids(con: &mut redis::aio::MultiplexedConnection, q: &str) -> Vec<String> {
    use redis::AsyncCommands;
    let lists: Vec<String> = con.keys(format!("jq:{{{q}}}:inflight:*")).await.unwrap();
    let mut ids = Vec::new();
    for list in lists {
        let held: Vec<String> = con.lrange(&list, 0, -1).await.unwrap();
        ids.extend(held);
    }
    ids
}

/// A Rust client cancels a job running on a Python worker (`Queue::cancel`),
/// in recoverable and reliable modes, with an `async def` handler (its task
/// is cancelled) and a plain function (interrupted with SIGUSR1): the job
/// would sleep 10 s, but the Python worker, told on its control channel,
/// stops it at once, records nothing, and runs the next job: its result
/// arrives within 2 s of the cancel. The Rust client reads
/// `Error::Cancelled`, the job's status is `Cancelled`, and no claim is
/// left: no lease, and (reliable mode) the ID left the Python worker's
/// in-flight list (it started it again from "inflight": "gone").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_client_cancels_a_job_running_on_a_python_worker() {
    use job_async_redis::{CancelOutcome, Error, FailureKind, JobState};
    use redis::AsyncCommands;

    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for mode in [Mode::Recoverable, Mode::Reliable] {
        for handler in ["nap", "nap-sync"] {
            let what = format!("{mode} {handler}");
            let q = queue_name("py-cancel");
            // Two attempts: the cancelled job and the next one.
            let worker = python_worker(&server, &q, mode, handler, 2);
            let queue = client.queue(&q, mode).await.unwrap();
            let long = queue
                .submit(&Nap {
                    name: "long".into(),
                    sleep_ms: 10_000,
                })
                .await
                .unwrap();
            let long_id = long.id().to_owned();
            wait_for_state(&queue, &long_id, JobState::Active).await;
            let cancelled_at = std::time::Instant::now();
            assert_eq!(
                queue.cancel(&long_id).await.unwrap(),
                CancelOutcome::Cancelled {
                    was: JobState::Active
                },
                "{what}"
            );
            match long.result_timeout::<String>(WAIT).await {
                Err(Error::Cancelled { job_id, .. }) => assert_eq!(job_id, long_id, "{what}"),
                other => panic!("{what}: the cancelled job's result: {other:?}"),
            }
            let next = queue
                .submit(&Nap {
                    name: "next".into(),
                    sleep_ms: 10,
                })
                .await
                .unwrap();
            let got: String = next.result_timeout(WAIT).await.unwrap();
            assert_eq!(got, "slept next", "{what}");
            let took = cancelled_at.elapsed();
            assert!(
                took < Duration::from_secs(2),
                "{what}: the next job completed {took:?} after the cancel: the handler was not stopped"
            );
            let status = queue.status(&long_id).await.unwrap().unwrap();
            assert_eq!(status.state, JobState::Cancelled, "{what}");
            assert_eq!(
                status.error.map(|(kind, _)| kind),
                Some(FailureKind::Cancelled),
                "{what}"
            );
            // A second cancel changes nothing. (job_cancel answers the
            // state, "failed"; the outcome may also name the cancel.)
            let again = queue.cancel(&long_id).await.unwrap();
            assert!(
                matches!(
                    again,
                    CancelOutcome::AlreadyFinished(JobState::Failed | JobState::Cancelled)
                ),
                "{what}: a second cancel: {again:?}"
            );
            let leases: usize = con.zcard(format!("jq:{{{q}}}:leases")).await.unwrap();
            assert_eq!(leases, 0, "{what}: a lease is left");
            assert_eq!(
                inflight_ids(&mut con, &q).await,
                Vec::<String>::new(),
                "{what}: an ID is left in flight"
            );
            python_worker_succeeds(worker, &what).await;
        }
    }
}

/// A Python client cancels jobs of a Rust worker that runs one at a time
/// (`jobqueue.py client-cancel`), in recoverable and reliable modes: in one
/// job_cancel call a running job (its Rust handler sees `job.cancelled()`
/// and returns; the worker records nothing), a queued one (never started),
/// a delayed one (it leaves the delayed set) and a missing one. The Python
/// client reads kind `cancelled` for each, a second cancel finds the job
/// finished, and the Rust worker then runs the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_cancels_jobs_a_rust_worker_runs_or_has_queued() {
    let server = RedisServer::start();
    for mode in [Mode::Recoverable, Mode::Reliable] {
        let q = queue_name("py-cancels");
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(String, &'static str)>();
        let builder = Worker::builder(config(&server))
            .mode(mode)
            .queue(&q)
            .concurrency(1);
        let worker = spawn_built(builder, move |job: Job<Nap>| {
            let seen = seen_tx.clone();
            async move {
                let name = job.payload.name.clone();
                let _ = seen.send((name.clone(), "started"));
                tokio::select! {
                    _ = job.cancelled() => {
                        let _ = seen.send((name, "cancelled"));
                        Err("stopped: the job was cancelled".to_string())
                    }
                    _ = tokio::time::sleep(Duration::from_millis(job.payload.sleep_ms)) => {
                        Ok(format!("slept {name}"))
                    }
                }
            }
        })
        .await;
        python_check(&server, "client-cancel", &q, mode, &[], "cancel").await;
        let stats = worker.stop().await;
        let mut events = Vec::new();
        while let Ok((name, event)) = seen.try_recv() {
            events.push(format!("{name} {event}"));
        }
        assert_eq!(
            events,
            ["long started", "long cancelled", "after started"],
            "{mode}: what the Rust handlers saw"
        );
        assert_eq!(
            (stats.completed, stats.failed, stats.cancelled),
            (1, 0, 1),
            "{mode}"
        );
    }
}

/// A progress interop job: the handler reports `Step { step: n, of: steps }`
/// for n = 1 to `steps`, sleeping `gap_ms` after each (`progress_handler`
/// in jobqueue.py), then answers `StepsDone` (the Python handler) or the
/// name (the Rust handler of `client-progress`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Steps {
    name: String,
    steps: u32,
    gap_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Step {
    step: u32,
    of: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StepsDone {
    name: String,
    steps: u32,
}

/// A Python handler reports progress (`job.progress`, job_progress under
/// its fencing token) and a Rust client reads it, in recoverable and
/// reliable modes and both encodings: `JobHandle::follow_progress`, begun
/// before the job starts, yields every step in order and ends when the job
/// has finished; `JobHandle::progress` reads none before and the last step
/// after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_client_follows_the_progress_a_python_handler_reports() {
    use futures_util::StreamExt;

    let server = RedisServer::start();
    // The followers look at the job's state every 200 ms (they end then).
    let client = Client::connect(config(&server).result_poll_interval(Duration::from_millis(200)))
        .await
        .unwrap();
    const STEPS: u32 = 4;
    for mode in [Mode::Recoverable, Mode::Reliable] {
        let q = queue_name("py-progress");
        let mut jobs = Vec::new();
        for enc in [Encoding::MessagePack, Encoding::Json] {
            let queue = client.queue(&q, mode).await.unwrap().with_encoding(enc);
            let job = Steps {
                name: format!("{enc:?}"),
                steps: STEPS,
                gap_ms: 100,
            };
            let handle = queue.submit(&job).await.unwrap();
            assert_eq!(
                handle.progress::<Step>().await.unwrap(),
                None,
                "{mode} {enc:?}"
            );
            // Followed (polled) from now on, while the job waits.
            let follow = handle.follow_progress::<Step>().await.unwrap();
            let followed = tokio::spawn(tokio::time::timeout(
                WAIT,
                follow.map(Result::unwrap).collect::<Vec<Step>>(),
            ));
            jobs.push((enc, handle, followed));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let worker = python_worker(&server, &q, mode, "progress", 2);
        for (enc, handle, followed) in jobs {
            let followed = followed
                .await
                .unwrap()
                .unwrap_or_else(|_| panic!("{mode} {enc:?}: the progress stream did not end"));
            let want: Vec<Step> = (1..=STEPS).map(|step| Step { step, of: STEPS }).collect();
            assert_eq!(followed, want, "{mode} {enc:?}");
            assert_eq!(
                handle.progress::<Step>().await.unwrap(),
                Some(Step {
                    step: STEPS,
                    of: STEPS
                }),
                "{mode} {enc:?}"
            );
            let done: StepsDone = handle.result_timeout(WAIT).await.unwrap();
            assert_eq!(done.steps, STEPS, "{mode} {enc:?}");
        }
        python_worker_succeeds(worker, mode.as_str()).await;
    }
}

/// A Rust handler reports progress (`Job::progress`) and a Python client
/// follows it on the job's progress channel and reads the latest value
/// (`jobqueue.py client-progress`), in recoverable and reliable modes and
/// both encodings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_follows_the_progress_a_rust_handler_reports() {
    let server = RedisServer::start();
    for mode in [Mode::Recoverable, Mode::Reliable] {
        let q = queue_name("py-progress-client");
        let builder = Worker::builder(config(&server))
            .mode(mode)
            .queue(&q)
            .concurrency(2);
        let worker = spawn_built(builder, |job: Job<Steps>| async move {
            for step in 1..=job.payload.steps {
                let of = job.payload.steps;
                job.progress(&Step { step, of })
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::sleep(Duration::from_millis(job.payload.gap_ms)).await;
            }
            Ok::<_, String>(job.payload.name)
        })
        .await;
        python_check(&server, "client-progress", &q, mode, &[], "progress").await;
        let stats = worker.stop().await;
        assert_eq!((stats.completed, stats.failed), (2, 0), "{mode}");
    }
}

/// A unique key (protocol.md 8.10, mode "active") holds across both
/// clients, in recoverable and reliable modes: a Rust submit with
/// `Unique::until_finished` of a key a Python job holds enqueues nothing
/// and answers a handle on the Python job, and a Python submit of a key a
/// Rust job holds prints the Rust job's ID. Once the jobs ended (a Python
/// worker runs them), their locks are gone and the keys enqueue new jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_key_holds_across_the_python_and_rust_clients() {
    use job_async_redis::{JobOptions, Unique};
    use redis::AsyncCommands;

    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let tick = |name: &str| Tick {
        name: name.into(),
        fail_first: false,
    };
    let unique = |key: &str| JobOptions::default().unique(Unique::until_finished(key));
    for mode in [Mode::Recoverable, Mode::Reliable] {
        let q = queue_name("py-unique");
        let queue = client.queue(&q, mode).await.unwrap();
        let python_submit = async |name: &str, key: &str| {
            let payload = format!(r#"{{"name": "{name}"}}"#);
            let spec = format!("active:0:{key}");
            let extra = ["--payload", payload.as_str(), "--unique", spec.as_str()];
            python_output(&server, "submit", &q, mode, &extra)
                .await
                .trim()
                .to_owned()
        };
        // The Python job first.
        let python_id = python_submit("python", "report-1").await;
        let handle = queue
            .submit_with(&tick("rust"), unique("report-1"))
            .await
            .unwrap();
        assert_eq!(handle.id(), python_id, "{mode}: the Rust submit's handle");
        // The Rust job first.
        let rust = queue
            .submit_with(&tick("rust-2"), unique("report-2"))
            .await
            .unwrap();
        let rust_id = rust.id().to_owned();
        assert_eq!(
            python_submit("python-2", "report-2").await,
            rust_id,
            "{mode}: the Python submit's ID"
        );
        let pending: Vec<String> = con
            .lrange(format!("jq:{{{q}}}:pending"), 0, -1)
            .await
            .unwrap();
        assert_eq!(
            pending,
            [rust_id.clone(), python_id.clone()],
            "{mode}: one job per key"
        );
        for (key, holder) in [("report-1", &python_id), ("report-2", &rust_id)] {
            let lock: Option<String> = con.get(format!("jq:{{{q}}}:unique:{key}")).await.unwrap();
            assert_eq!(lock.as_ref(), Some(holder), "{mode}: the lock of {key}");
        }
        let worker = python_worker(&server, &q, mode, "clock", 2);
        let ran: Ran = handle.result_timeout(WAIT).await.unwrap();
        assert_eq!(ran.name, "python", "{mode}: the job that ran is the holder");
        let ran: Ran = rust.result_timeout(WAIT).await.unwrap();
        assert_eq!(ran.name, "rust-2", "{mode}");
        python_worker_succeeds(worker, mode.as_str()).await;
        for key in ["report-1", "report-2"] {
            let held: bool = con
                .exists(format!("jq:{{{q}}}:unique:{key}"))
                .await
                .unwrap();
            assert!(!held, "{mode}: the lock of {key} outlived its job");
        }
        // Free again, from either side.
        let again = python_submit("python-3", "report-2").await;
        assert_ne!(again, rust_id, "{mode}");
        let again_rust = queue
            .submit_with(&tick("rust-3"), unique("report-1"))
            .await
            .unwrap();
        assert_ne!(again_rust.id(), python_id, "{mode}");
        let pending: Vec<String> = con
            .lrange(format!("jq:{{{q}}}:pending"), 0, -1)
            .await
            .unwrap();
        assert_eq!(pending, [again_rust.id().to_owned(), again], "{mode}");
    }
}

/// With events on (`Queue::set_events` in recoverable mode, `jobqueue.py
/// events --max` in reliable mode), a job a Python worker runs records
/// `submitted`, `started`, its two `progress` reports and `completed` in
/// the queue's event stream, in that order (the run's events with attempt
/// 1 and the Python worker's ID), and a delayed job the Python client
/// cancels records `delayed` then `cancelled`. `Queue::events` and
/// `jobqueue.py events --read` read the same entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_workers_jobs_record_their_events_in_order() {
    use job_async_redis::JobOptions;

    let server = RedisServer::start();
    let client = Client::connect(config(&server)).await.unwrap();
    for mode in [Mode::Recoverable, Mode::Reliable] {
        let q = queue_name("py-events");
        let queue = client.queue(&q, mode).await.unwrap();
        if mode == Mode::Recoverable {
            queue.set_events(Some(1000)).await.unwrap();
        } else {
            let out = python_output(&server, "events", &q, mode, &["--max", "1000"]).await;
            assert_eq!(out.trim(), "previous: none", "{mode}");
        }
        assert_eq!(queue.controls().await.unwrap().events, Some(1000), "{mode}");
        let steps = Steps {
            name: "ev".into(),
            steps: 2,
            gap_ms: 20,
        };
        let handle = queue.submit(&steps).await.unwrap();
        let id = handle.id().to_owned();
        let later = queue
            .submit_with(&steps, JobOptions::default().delay(Duration::from_secs(60)))
            .await
            .unwrap();
        let later_id = later.id().to_owned();
        let worker = python_worker(&server, &q, mode, "progress", 1);
        let done: StepsDone = handle.result_timeout(WAIT).await.unwrap();
        assert_eq!(done.steps, 2, "{mode}");
        python_worker_succeeds(worker, mode.as_str()).await;
        let out = python_output(&server, "cancel", &q, mode, &["--id", &later_id]).await;
        assert_eq!(out.trim(), r#"[["cancelled", "queued"]]"#, "{mode}");

        let events = queue.events(None, 100).await.unwrap();
        let of = |job: &str| -> Vec<&str> {
            events
                .iter()
                .filter(|e| e.job_id == job)
                .map(|e| e.kind.as_str())
                .collect()
        };
        assert_eq!(
            of(&id),
            ["submitted", "started", "progress", "progress", "completed"],
            "{mode}"
        );
        assert_eq!(of(&later_id), ["delayed", "cancelled"], "{mode}");
        let run: Vec<_> = events.iter().filter(|e| e.job_id == id).skip(1).collect();
        let python_worker_id = run[0].worker.clone();
        assert!(
            python_worker_id.is_some(),
            "{mode}: started without a worker"
        );
        for e in &run {
            assert_eq!(e.attempt, Some(1), "{mode}: {e:?}");
            assert_eq!(e.worker, python_worker_id, "{mode}: {e:?}");
        }
        // Stream entry IDs only grow.
        assert!(
            events.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
            "{mode}: {events:?}"
        );
        // The Python client reads the same entries.
        let lines = python_output(&server, "events", &q, mode, &["--read"]).await;
        let python: Vec<(String, String, String)> = lines
            .lines()
            .map(|line| {
                let entry: serde_json::Value = serde_json::from_str(line).unwrap();
                let field = |k: &str| entry[k].as_str().unwrap_or_default().to_owned();
                (field("stream_id"), field("event"), field("id"))
            })
            .collect();
        let rust: Vec<(String, String, String)> = events
            .iter()
            .map(|e| (e.stream_id.clone(), e.kind.clone(), e.job_id.clone()))
            .collect();
        assert_eq!(python, rust, "{mode}");
    }
}
