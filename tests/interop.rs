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
use std::sync::OnceLock;
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
