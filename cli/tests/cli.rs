//! `jarctl` run as a process against a real redis-server: each
//! subcommand's table and JSON output, and its exit codes.

#[path = "../../tests/support/redis_server.rs"]
mod redis_server;

use std::process::{Command, Output};

use job_async_redis::{Client, Config, JobOptions, Mode};
use redis_server::RedisServer;
use serde_json::Value;

fn jarctl(server: &RedisServer, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jarctl"))
        .args(args)
        .env("REDIS_URL", server.url())
        .output()
        .expect("jarctl runs")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&stdout(out)).unwrap()
}

/// A recoverable queue "emails" with three waiting jobs (e0, e1, e2), one
/// delayed and one dead-letter entry, and a reliable queue "reports".
async fn fill(server: &RedisServer) {
    let client = Client::connect(Config::new(server.url())).await.unwrap();
    let emails = client.queue("emails", Mode::Recoverable).await.unwrap();
    for i in 0..3 {
        let opts = JobOptions::default().id(format!("e{i}"));
        emails
            .submit_with(&serde_json_value(i), opts)
            .await
            .unwrap();
    }
    let opts = JobOptions::default()
        .id("later")
        .delay(std::time::Duration::from_secs(3600));
    emails.submit_with(&"later", opts).await.unwrap();
    client.queue("reports", Mode::Reliable).await.unwrap();
    let mut con = server.connection();
    redis::cmd("ZADD")
        .arg("jq:{emails}:dead_jobs")
        .arg(1000)
        .arg("gone")
        .exec(&mut con)
        .unwrap();
}

fn serde_json_value(i: u32) -> std::collections::BTreeMap<String, u32> {
    [("n".to_owned(), i)].into()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_subcommand_prints_a_table_and_json() {
    let server = RedisServer::start();
    fill(&server).await;

    let out = stdout(&jarctl(&server, &["queues"]));
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert!(
        lines[0].starts_with("QUEUE") && lines[0].contains("MODE"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("emails") && lines[1].contains("recoverable"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("reports") && lines[2].contains("reliable"),
        "{out}"
    );
    let queues = json(&jarctl(&server, &["queues", "--json"]));
    assert_eq!(queues[0]["name"], "emails");
    assert_eq!(queues[1]["mode"], "reliable");

    let out = stdout(&jarctl(&server, &["inspect", "emails"]));
    for (field, value) in [
        ("waiting", "3"),
        ("delayed", "1"),
        ("active", "0"),
        ("dead", "1"),
        ("paused", "no"),
    ] {
        assert!(
            out.lines().any(|l| {
                let cells: Vec<&str> = l.split_whitespace().collect();
                cells.first() == Some(&field) && cells.last() == Some(&value)
            }),
            "{field} {value} in:\n{out}"
        );
    }
    let overview = json(&jarctl(&server, &["inspect", "emails", "--json"]));
    assert_eq!(overview["counts"]["waiting"], 3);
    assert_eq!(overview["counts"]["dead"], 1);

    let out = stdout(&jarctl(&server, &["jobs", "emails", "--limit", "2"]));
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[1][..2], ["0", "e0"], "{out}");
    assert_eq!(rows[2][..2], ["1", "e1"], "{out}");
    assert!(out.contains("waiting jobs 1 to 2 of 3"), "{out}");
    let page = json(&jarctl(
        &server,
        &["jobs", "emails", "--state", "delayed", "--json"],
    ));
    assert_eq!(page["total"], 1);
    assert_eq!(page["entries"][0]["id"], "later");
    let page = json(&jarctl(
        &server,
        &["jobs", "emails", "--state", "dead", "--json"],
    ));
    assert_eq!(page["entries"][0]["id"], "gone");
    assert_eq!(page["entries"][0]["at_ms"], 1000);

    let out = stdout(&jarctl(&server, &["job", "emails", "e1"]));
    assert!(out.contains("state") && out.contains("queued"), "{out}");
    assert!(out.contains("\"n\": 1"), "the payload as JSON:\n{out}");
    let job = json(&jarctl(&server, &["job", "emails", "e2", "--json"]));
    assert_eq!(job["payload"]["json"]["n"], 2);
    assert_eq!(job["fields"]["enc"], "msgpack");

    let out = stdout(&jarctl(&server, &["completions", "bash"]));
    assert!(out.contains("jarctl"), "a bash completion script");
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_exit_1_and_usage_errors_exit_2() {
    let server = RedisServer::start();
    fill(&server).await;
    let out = jarctl(&server, &["job", "emails", "no-such-job"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let out = jarctl(&server, &["inspect", "no-such-queue"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not registered"));
    let out = jarctl(&server, &["jobs", "emails", "--state", "sleeping"]);
    assert_eq!(out.status.code(), Some(2));
    let out = jarctl(&server, &["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    // No Redis there: a failure, said on stderr.
    let out = Command::new(env!("CARGO_BIN_EXE_jarctl"))
        .args(["--url", "redis://127.0.0.1:1/", "queues"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("jarctl: "));
}
