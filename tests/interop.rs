//! Interoperability with the independent Python implementation in
//! examples/python/jobqueue.py, written from protocol.md and lua/ alone: a
//! Rust client with a Python worker and a Python client with a Rust worker,
//! in every mode and both encodings, with payloads and results full of
//! nested maps, lists, binary data, unicode and large integers. Each side
//! checks what it received. The Python side also replays the conformance
//! suite and the golden encodings.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
        let mut check = jobqueue();
        check
            .args([
                "client-check",
                "--url",
                &server.url(),
                "--queue",
                &q,
                "--mode",
                mode.as_str(),
            ])
            .args(["--enc", enc, "--count", &PER_ENCODING.to_string()]);
        let status = tokio::task::spawn_blocking(move || check.status())
            .await
            .unwrap()
            .unwrap();
        assert!(
            status.success(),
            "the Python client's check failed ({mode}, {enc})"
        );
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
        let mut check = jobqueue();
        check.args([
            "client-timeouts",
            "--url",
            &server.url(),
            "--queue",
            &q,
            "--mode",
            mode.as_str(),
        ]);
        let status = tokio::task::spawn_blocking(move || check.status())
            .await
            .unwrap()
            .unwrap();
        assert!(
            status.success(),
            "the Python client's timeout check failed ({mode})"
        );
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
