//! A throwaway `redis-server` on a free loopback port, in a temporary
//! directory, stopped when dropped. Shared by the tests and the examples.
//!
//! `JQ_TEST_SERVER` names another server binary to run instead, e.g.
//! `JQ_TEST_SERVER=$(.ci/valkey.sh) cargo test` runs the tests against the
//! Valkey that .ci/valkey.sh installs under target/.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running redis-server.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

const INSTALL_HINT: &str = "redis-server (>= 7.0) was not found on PATH: install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) or set REDIS_URL";

/// The server binary the tests run: `JQ_TEST_SERVER` when set (a path or a
/// name on PATH, e.g. a `valkey-server`), else `redis-server`.
pub fn server_binary() -> String {
    std::env::var("JQ_TEST_SERVER")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "redis-server".to_owned())
}

impl RedisServer {
    /// Starts a server with default settings.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `--maxmemory 10mb`).
    pub fn start_with(args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        for _ in 0..10 {
            let mut server = Self {
                child: None,
                port: free_port(),
                dir: tempfile::tempdir().expect("temporary directory"),
                args: args.clone(),
            };
            if server.spawn() {
                return server;
            }
            // Another process took the port between probe and bind: retry.
        }
        panic!(
            "could not start {} on a free port after 10 attempts",
            server_binary()
        );
    }

    /// Starts a server on `port` (which must be free).
    pub fn start_on(port: u16, args: &[&str]) -> Self {
        let mut server = Self {
            child: None,
            port,
            dir: tempfile::tempdir().expect("temporary directory"),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        assert!(
            server.spawn(),
            "{} did not start on port {port}",
            server_binary()
        );
        server
    }

    fn spawn(&mut self) -> bool {
        let binary = server_binary();
        let mut cmd = Command::new(&binary);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if binary != "redis-server" {
                    panic!(
                        "JQ_TEST_SERVER={binary}: no such server binary (unset it to use redis-server)"
                    )
                }
                panic!("{INSTALL_HINT}")
            }
            Err(e) => panic!("cannot start {binary}: {e}"),
        };
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_exited))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut con) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut con).is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "{} on port {} did not answer within 10 s",
            server_binary(),
            self.port
        );
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A synchronous connection for assertions.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .expect("connect to the test redis-server")
    }

    /// Stops the server with `SHUTDOWN SAVE` (the dataset is written to disk)
    /// and starts it again on the same port and directory, so it comes back
    /// with the same data and an empty script cache.
    pub fn restart(&mut self) {
        let mut con = self.connection();
        let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN").arg("SAVE").query(&mut con);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        assert!(
            self.spawn(),
            "{} did not come back on port {}",
            server_binary(),
            self.port
        );
    }

    /// Stops the server at once, without saving.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// For examples: the server at `REDIS_URL` when it is set, otherwise a
/// throwaway one on a free loopback port. Returns that URL, and the
/// throwaway server, which runs until it is dropped.
#[allow(dead_code)] // not every program that includes this file uses it
pub fn from_env_or_start() -> (Option<RedisServer>, String) {
    match std::env::var("REDIS_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let server = RedisServer::start();
            let url = server.url();
            (Some(server), url)
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
