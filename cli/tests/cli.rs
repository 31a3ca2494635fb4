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

/// `n` dead jobs `dead-<i>` in recoverable queue `queue`, as the start
/// scripts leave them.
fn dead_jobs(server: &RedisServer, queue: &str, n: u32) {
    let mut con = server.connection();
    for first in (0..n).step_by(10_000) {
        let mut pipe = redis::pipe();
        for i in first..(first + 10_000).min(n) {
            let key = format!("jq:{{{queue}}}:job:dead-{i}");
            pipe.cmd("HSET")
                .arg(&key)
                .arg("state")
                .arg("dead")
                .arg("enc")
                .arg("json")
                .arg("payload")
                .arg(i.to_string())
                .ignore();
            pipe.cmd("ZADD")
                .arg(format!("jq:{{{queue}}}:dead_jobs"))
                .arg(i)
                .arg(format!("dead-{i}"))
                .ignore();
        }
        pipe.exec(&mut con).unwrap();
    }
}

fn count(server: &RedisServer, cmd: &str, key: &str) -> u64 {
    redis::cmd(cmd)
        .arg(key)
        .query(&mut server.connection())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn requeue_asks_first_then_moves_100000_dead_jobs_in_batches() {
    let server = RedisServer::start();
    fill(&server).await;
    dead_jobs(&server, "emails", 100_000);
    let dead_before = count(&server, "ZCARD", "jq:{emails}:dead_jobs");
    assert_eq!(dead_before, 100_001);

    // Without --yes, and no answer on stdin: nothing happens.
    let out = Command::new(env!("CARGO_BIN_EXE_jarctl"))
        .args(["requeue", "emails", "--dead"])
        .env("REDIS_URL", server.url())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("aborted"));
    assert_eq!(
        count(&server, "ZCARD", "jq:{emails}:dead_jobs"),
        dead_before
    );

    // With --yes: 101 batches of 1,000, each reported on a plain line (stderr
    // is not a terminal here).
    let out = jarctl(&server, &["requeue", "emails", "--dead", "--yes"]);
    let lines = String::from_utf8_lossy(&out.stderr).into_owned();
    let summary = stdout(&out);
    let progress: Vec<&str> = lines
        .lines()
        .filter(|l| l.starts_with("requeued "))
        .collect();
    assert_eq!(progress.len(), 101, "{lines}");
    assert!(
        progress[0].starts_with("requeued 1000 of 100001"),
        "{}",
        progress[0]
    );
    assert!(
        progress[100].starts_with("requeued 100000 of 100001"),
        "{}",
        progress[100]
    );
    assert!(
        summary.contains("requeued 100000 dead jobs of emails (1 skipped, 0 left)"),
        "{summary}"
    );
    assert_eq!(count(&server, "ZCARD", "jq:{emails}:dead_jobs"), 0);
    // The three jobs that waited, then the 100,000 requeued, with a ticket each.
    assert_eq!(count(&server, "LLEN", "jq:{emails}:pending"), 100_003);
    assert_eq!(count(&server, "LLEN", "jq:{emails}:tickets"), 100_003);

    // By ID, as a table and as JSON.
    dead_jobs(&server, "emails", 2);
    let out = stdout(&jarctl(
        &server,
        &["requeue", "emails", "dead-0", "e1", "nobody"],
    ));
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[1], ["dead-0", "requeued"], "{out}");
    assert_eq!(rows[2], ["e1", "unchanged", "(queued)"], "{out}");
    assert_eq!(rows[3], ["nobody", "missing"], "{out}");
    let rows = json(&jarctl(&server, &["requeue", "emails", "dead-1", "--json"]));
    assert_eq!(rows[0][0], "dead-1");
    assert_eq!(rows[0][1], "requeued");
    // --limit with --dead only; IDs or --dead, not both.
    assert_eq!(
        jarctl(&server, &["requeue", "emails", "--limit", "3", "x"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        jarctl(&server, &["requeue", "emails", "--dead", "x"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        jarctl(&server, &["requeue", "emails"]).status.code(),
        Some(2)
    );
}
