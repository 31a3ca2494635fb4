//! Every ACL profile of `AclProfile` (protocol.md section 14), on a single
//! server and on a cluster: each runs what it is for end to end (simple,
//! recoverable and reliable modes) with no command refused along the way
//! (ACL LOG records no refusal), and is refused what it must not do.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use job_async_redis::{
    AclProfile, AclRole, Client, Config, Error, FailureKind, Job, JobOptions, JobState, Mode,
    RateLimit, Worker, load_scripts,
};
use redis::{ConnectionLike, RedisResult};
use support::{RedisCluster, RedisServer, queue_name, spawn_built, spawn_worker};

const WAIT: Duration = Duration::from_secs(30);
const PASSWORD: &str = "s3cret";

/// A single server or a cluster, with the admin (default) user's access.
enum Deployment {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Deployment {
    fn nodes(&self) -> Vec<&RedisServer> {
        match self {
            Deployment::Single(server) => vec![server],
            Deployment::Cluster(cluster) => cluster.nodes.iter().collect(),
        }
    }

    /// The URL with `user`'s credentials (`None`: the admin).
    fn url(&self, user: Option<&str>) -> String {
        let url = match self {
            Deployment::Single(server) => server.url(),
            Deployment::Cluster(cluster) => cluster.url(),
        };
        match user {
            Some(user) => url.replacen("://", &format!("://{user}:{PASSWORD}@"), 1),
            None => url,
        }
    }

    fn config(&self, user: Option<&str>, prefix: &str) -> Config {
        Config::new(self.url(user))
            .prefix(prefix)
            .block_timeout(Duration::from_secs(60))
    }

    /// A plain (synchronous) connection as `user` (`None`: the admin); on
    /// a cluster, one that routes each command to its slot's node.
    fn connection(&self, user: Option<&str>) -> Box<dyn ConnectionLike> {
        let with_user = |url: String| match user {
            Some(user) => url.replacen("://", &format!("://{user}:{PASSWORD}@"), 1),
            None => url,
        };
        match self {
            Deployment::Single(server) => Box::new(
                redis::Client::open(with_user(server.url()))
                    .unwrap()
                    .get_connection()
                    .unwrap(),
            ),
            Deployment::Cluster(cluster) => {
                let urls: Vec<String> = cluster.nodes.iter().map(|n| with_user(n.url())).collect();
                Box::new(
                    redis::cluster::ClusterClient::new(urls)
                        .unwrap()
                        .get_connection()
                        .unwrap(),
                )
            }
        }
    }

    /// Creates or replaces `user` with `profile`'s rules, on every node (ACL
    /// users are per node; a cluster does not propagate them).
    fn set_user(&self, user: &str, profile: &AclProfile) {
        let rules = profile.rules().unwrap();
        for node in self.nodes() {
            let _: () = redis::cmd("ACL")
                .arg("SETUSER")
                .arg(user)
                .arg("reset")
                .arg("on")
                .arg(format!(">{PASSWORD}"))
                .arg(&rules)
                .query(&mut node.connection())
                .unwrap_or_else(|e| panic!("ACL SETUSER {user} {rules:?}: {e}"));
        }
    }

    fn reset_acl_log(&self) {
        for node in self.nodes() {
            let _: () = redis::cmd("ACL")
                .arg("LOG")
                .arg("RESET")
                .query(&mut node.connection())
                .unwrap();
        }
    }

    /// What ACL LOG recorded on any node since the last reset, as
    /// "user reason object", minus `allowed` objects.
    fn denials(&self, allowed: &[&str]) -> Vec<String> {
        let mut found = Vec::new();
        for node in self.nodes() {
            let entries: Vec<HashMap<String, redis::Value>> = redis::cmd("ACL")
                .arg("LOG")
                .query(&mut node.connection())
                .unwrap();
            for entry in entries {
                let text = |field: &str| -> String {
                    entry
                        .get(field)
                        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                        .unwrap_or_default()
                };
                let object = text("object");
                // The redis crate labels each connection with CLIENT SETINFO
                // (Redis >= 7.2, Valkey) and ignores a refusal; the rules
                // leave it out because Redis 7.0 does not know the command.
                if object == "client|setinfo" || allowed.contains(&object.as_str()) {
                    continue;
                }
                found.push(format!(
                    "{} {} {} (port {})",
                    text("username"),
                    text("reason"),
                    object,
                    node.port()
                ));
            }
        }
        found
    }

    /// Asserts that every primary has every script of the library cached.
    fn assert_scripts_loaded(&self) {
        let shas: Vec<&str> = job_async_redis::scripts::all()
            .iter()
            .map(|s| s.sha1())
            .collect();
        for node in self.nodes() {
            let mut con = node.connection();
            let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut con).unwrap();
            if !matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                continue;
            }
            let cached: Vec<bool> = redis::cmd("SCRIPT")
                .arg("EXISTS")
                .arg(&shas)
                .query(&mut con)
                .unwrap();
            assert!(
                cached.iter().all(|c| *c),
                "port {}: scripts missing after load_scripts: {cached:?}",
                node.port()
            );
        }
    }

    /// Pushes `entry` on `key` as the admin.
    fn lpush(&self, key: &str, entry: &str) {
        let _: () = redis::cmd("LPUSH")
            .arg(key)
            .arg(entry)
            .query(&mut *self.connection(None))
            .unwrap();
    }

    fn llen(&self, key: &str) -> usize {
        redis::cmd("LLEN")
            .arg(key)
            .query(&mut *self.connection(None))
            .unwrap()
    }
}

/// Asserts that the connection's user is refused `cmd` with NOPERM.
#[track_caller]
fn refused(con: &mut dyn ConnectionLike, cmd: &redis::Cmd) {
    let result: RedisResult<redis::Value> = cmd.query(con);
    match result {
        Err(e) => assert_eq!(e.code(), Some("NOPERM"), "{cmd:?}: {e}"),
        Ok(v) => panic!(
            "{:?} was allowed: {v:?}",
            String::from_utf8_lossy(&cmd.get_packed_command())
        ),
    }
}

/// Asserts that the connection's user may run `cmd`.
#[track_caller]
fn allowed(con: &mut dyn ConnectionLike, cmd: &redis::Cmd) {
    let result: RedisResult<redis::Value> = cmd.query(con);
    if let Err(e) = result {
        panic!(
            "{:?} was refused: {e}",
            String::from_utf8_lossy(&cmd.get_packed_command())
        );
    }
}

/// What every profile is refused: keys and channels outside its prefix (and
/// outside its queues, when `foreign_queue` names a queue it is not confined
/// to), and the commands the library never sends.
fn refused_outside(con: &mut dyn ConnectionLike, prefix: &str, foreign_queue: Option<&str>) {
    refused(con, redis::cmd("SET").arg("other:key").arg(1));
    refused(con, redis::cmd("HMGET").arg("other:{q}:meta").arg("mode"));
    refused(
        con,
        redis::cmd("HMGET")
            .arg(format!("{prefix}:plain"))
            .arg("mode"),
    );
    refused(
        con,
        redis::cmd("HMGET")
            .arg(format!("{prefix}x:{{q}}:meta"))
            .arg("mode"),
    );
    if let Some(q) = foreign_queue {
        refused(
            con,
            redis::cmd("HMGET")
                .arg(format!("{prefix}:{{{q}}}:meta"))
                .arg("mode"),
        );
        refused(
            con,
            redis::cmd("HMGET")
                .arg(format!("{prefix}:{{{q}}}:job:x"))
                .arg("state"),
        );
    }
    refused(con, &redis::cmd("FLUSHALL"));
    refused(con, redis::cmd("KEYS").arg("*"));
    refused(con, redis::cmd("EVAL").arg("return 1").arg(0));
    refused(con, redis::cmd("SCRIPT").arg("FLUSH"));
    refused(con, redis::cmd("CLIENT").arg("UNBLOCK").arg(1));
    refused(con, redis::cmd("CLIENT").arg("LIST"));
    refused(con, redis::cmd("CONFIG").arg("GET").arg("*"));
    refused(con, redis::cmd("ACL").arg("WHOAMI"));
}

/// One queue name per mode.
struct Queues {
    simple: String,
    recoverable: String,
    reliable: String,
}

impl Queues {
    fn new(label: &str) -> Self {
        Self {
            simple: queue_name(&format!("{label}-simple")),
            recoverable: queue_name(&format!("{label}-rec")),
            reliable: queue_name(&format!("{label}-rel")),
        }
    }

    /// A profile confined to these three queues.
    fn confine(&self, profile: AclProfile) -> AclProfile {
        profile
            .queue(&self.simple)
            .queue(&self.recoverable)
            .queue(&self.reliable)
    }
}

/// Asserts that a worker stops at once although its blocking pop waits up to
/// 60 s: no CLIENT UNBLOCK is needed (the profiles do not allow it).
async fn stops_promptly(worker: support::Running, mode: &str) -> job_async_redis::WorkerStats {
    let stopping = Instant::now();
    let stats = worker.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{mode} worker took {:?} to stop with a 60 s block timeout",
        stopping.elapsed()
    );
    stats
}

/// Every mode end to end: clients configured as `client`, workers as
/// `worker`, on `queues`. Asserts the outcomes and the workers' stats.
async fn every_mode(d: &Deployment, client: Config, worker: Config, queues: &Queues) {
    let prefix = client.prefix.clone();
    let app = Client::connect(client).await.unwrap();

    // Simple mode: results, a handler failure, a batch, dead-lettering.
    let q = &queues.simple;
    let running = spawn_worker(worker.clone(), &[q], 2, |job: Job<String>| async move {
        if job.payload == "fail" {
            return Err("refused".to_string());
        }
        Ok(job.payload.to_uppercase())
    })
    .await;
    let queue = app.queue(q, Mode::Simple).await.unwrap();
    let up: String = queue
        .submit("hello")
        .await
        .unwrap()
        .result_timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(up, "HELLO");
    let handles = queue
        .submit_many(&["a".to_string(), "b".to_string()])
        .await
        .unwrap();
    for (h, want) in handles.into_iter().zip(["A", "B"]) {
        assert_eq!(h.result_timeout::<String>(WAIT).await.unwrap(), want);
    }
    let err = queue
        .submit("fail")
        .await
        .unwrap()
        .result_timeout::<String>(WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::JobFailed {
                kind: FailureKind::Handler,
                ..
            }
        ),
        "{err}"
    );
    d.lpush(&format!("{prefix}:{{{q}}}:pending"), "junk");
    let dead = format!("{prefix}:{{{q}}}:dead");
    for _ in 0..500 {
        if d.llen(&dead) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(d.llen(&dead), 1, "the junk entry was dead-lettered");
    let stats = stops_promptly(running, "simple").await;
    assert_eq!(
        (stats.completed, stats.failed, stats.dead_lettered),
        (3, 1, 1)
    );

    // Recoverable mode: submit, claim, start, retry, heartbeat past a
    // lease, finish, status, watch.
    let q = &queues.recoverable;
    let running = spawn_built(
        support::recoverable(worker.clone(), q).lease(Duration::from_millis(1000)),
        |job: Job<u32>| async move {
            if job.attempt == 1 {
                return Err("again".to_string());
            }
            tokio::time::sleep(Duration::from_millis(1400)).await; // outlives a lease
            Ok(job.payload + 1)
        },
    )
    .await;
    let queue = app.queue(q, Mode::Recoverable).await.unwrap();
    let h = queue
        .submit_with(&41u32, JobOptions::default().max_attempts(2))
        .await
        .unwrap();
    let id = h.id().to_owned();
    match h.result_timeout::<u32>(WAIT).await {
        Ok(n) => assert_eq!(n, 42),
        Err(e) => panic!("{e}; refused meanwhile: {:?}", d.denials(&[])),
    }
    let status = queue.status(&id).await.unwrap().unwrap();
    assert_eq!(
        (status.attempt, status.stalls),
        (2, 0),
        "the heartbeat kept the lease"
    );
    let again: u32 = queue
        .job(&id)
        .await
        .unwrap()
        .result_timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(again, 42);
    let stats = stops_promptly(running, "recoverable").await;
    assert_eq!((stats.completed, stats.retried), (1, 1));

    // Reliable mode: look-ahead, move, start, finish, heartbeat, leave.
    let q = &queues.reliable;
    let running = spawn_built(
        support::reliable(worker.clone(), q),
        |job: Job<u32>| async move {
            // Progress: the job's hash, its progress channel (publish).
            job.progress(&job.payload)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(job.payload * 3)
        },
    )
    .await;
    let queue = app.queue(q, Mode::Reliable).await.unwrap();
    for (h, n) in queue
        .submit_many(&[1u32, 2, 3])
        .await
        .unwrap()
        .into_iter()
        .zip(1..)
    {
        assert_eq!(h.result_timeout::<u32>(WAIT).await.unwrap(), n * 3);
    }
    // Queue controls: the client pauses and limits the queue (meta, gate);
    // the worker obeys (running, rate, gate) and is woken by the resume.
    assert!(!queue.pause().await.unwrap());
    let h = queue.submit(&5u32).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let state = queue.status(h.id()).await.unwrap().unwrap().state;
    assert_eq!(state, JobState::Queued, "a paused queue started a job");
    queue.set_concurrency_limit(Some(1)).await.unwrap();
    queue
        .set_rate_limit(Some(RateLimit::new(100, Duration::from_secs(1))))
        .await
        .unwrap();
    assert!(queue.resume().await.unwrap());
    match h.result_timeout::<u32>(WAIT).await {
        Ok(n) => assert_eq!(n, 15),
        Err(e) => panic!("{e}; refused meanwhile: {:?}", d.denials(&[])),
    }
    // Once idle, the worker blocks in BLMOVE for up to 60 s.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stops_promptly(running, "reliable").await.completed, 4);
}

/// The full profile: one user for clients and workers.
async fn full_profile(d: &Deployment) {
    let profile = AclProfile::new("app");
    d.set_user("jobs", &profile);
    d.reset_acl_log();
    let queues = Queues::new("full");
    let config = d.config(Some("jobs"), "app");
    every_mode(d, config.clone(), config.clone(), &queues).await;
    assert_eq!(d.denials(&[]), Vec::<String>::new(), "nothing was refused");

    let mut con = d.connection(Some("jobs"));
    refused_outside(&mut *con, "app", None);
    // Its own keys are reachable, another prefix's are not, and the
    // library says so clearly.
    allowed(
        &mut *con,
        redis::cmd("HMGET")
            .arg(format!("app:{{{}}}:meta", queues.simple))
            .arg("mode"),
    );
    let other = Client::connect(d.config(Some("jobs"), "other"))
        .await
        .unwrap();
    let err = other.queue(&queues.simple, Mode::Simple).await.unwrap_err();
    assert!(
        matches!(&err, Error::Redis(e) if e.code() == Some("NOPERM")),
        "{err}"
    );
}

/// The role split: clients cannot publish (so cannot forge an outcome on
/// any reply channel), workers cannot subscribe or WAIT.
async fn client_and_worker_roles(d: &Deployment) {
    d.set_user("submitter", &AclProfile::new("app").role(AclRole::Client));
    d.set_user("runner", &AclProfile::new("app").role(AclRole::Worker));
    d.reset_acl_log();
    let queues = Queues::new("roles");
    let replicas = match d {
        Deployment::Single(_) => 0,
        Deployment::Cluster(_) => 1,
    };
    let client = d
        .config(Some("submitter"), "app")
        .wait_for_replicas(replicas, Duration::from_secs(2))
        .verify_outcomes(true);
    let worker = d.config(Some("runner"), "app");
    every_mode(d, client, worker, &queues).await;
    assert_eq!(d.denials(&[]), Vec::<String>::new(), "nothing was refused");

    let q = &queues.recoverable;
    let mut con = d.connection(Some("submitter"));
    refused_outside(&mut *con, "app", None);
    let channel = format!("app:{{{q}}}:reply:someone");
    refused(&mut *con, redis::cmd("PUBLISH").arg(&channel).arg("forged"));
    refused(
        &mut *con,
        redis::cmd("SPUBLISH").arg(&channel).arg("forged"),
    );
    // Allowed commands on the keys only workers touch, and worker commands.
    refused(
        &mut *con,
        redis::cmd("HSET")
            .arg(format!("app:{{{q}}}:leases"))
            .arg("f")
            .arg("v"),
    );
    refused(
        &mut *con,
        redis::cmd("LPUSH")
            .arg(format!("app:{{{q}}}:dead"))
            .arg("x"),
    );
    refused(
        &mut *con,
        redis::cmd("LPUSH")
            .arg(format!("app:{{{q}}}:inflight:w1"))
            .arg("x"),
    );
    refused(
        &mut *con,
        redis::cmd("DEL").arg(format!("app:{{{q}}}:job:x")),
    );
    refused(
        &mut *con,
        redis::cmd("BLMPOP")
            .arg(0.01)
            .arg(1)
            .arg(format!("app:{{{q}}}:pending"))
            .arg("RIGHT"),
    );
    refused(
        &mut *con,
        redis::cmd("INCR").arg(format!("app:{{{q}}}:fence")),
    );
    // Nor can it record an outcome through a worker's script: job_finish
    // names the lease set, which the client role may not touch.
    let finish = job_async_redis::scripts::all()
        .iter()
        .find(|s| s.name() == "job_finish")
        .unwrap();
    refused(
        &mut *con,
        redis::cmd("EVALSHA")
            .arg(finish.sha1())
            .arg(6)
            .arg(format!("app:{{{q}}}:job:x"))
            .arg(format!("app:{{{q}}}:leases"))
            .arg(format!("app:{{{q}}}:pending"))
            .arg(format!("app:{{{q}}}:tickets"))
            .arg(format!("app:{{{q}}}:delayed"))
            .arg(format!("app:{{{q}}}:clock"))
            .arg(&[
                "x",
                "1",
                "completed",
                "forged",
                "",
                "0",
                "1000",
                "recoverable",
                "publish",
                "-1",
            ]),
    );
    allowed(
        &mut *con,
        redis::cmd("HMGET")
            .arg(format!("app:{{{q}}}:job:x"))
            .arg("state"),
    );

    let mut con = d.connection(Some("runner"));
    refused_outside(&mut *con, "app", None);
    refused(&mut *con, redis::cmd("WAIT").arg(0).arg(0));
    allowed(
        &mut *con,
        redis::cmd("PUBLISH").arg(&channel).arg("allowed"),
    );
    refused(
        &mut *con,
        redis::cmd("PUBLISH").arg("app:elsewhere").arg("x"),
    );
}

/// Per-queue confinement: one tenant's users reach only its queues.
async fn per_queue_profiles(d: &Deployment) {
    let queues = Queues::new("tenant");
    let foreign = queue_name("foreign");
    d.set_user(
        "t-client",
        &queues.confine(AclProfile::new("app").role(AclRole::Client)),
    );
    d.set_user(
        "t-worker",
        &queues.confine(AclProfile::new("app").role(AclRole::Worker)),
    );
    d.set_user("t-full", &queues.confine(AclProfile::new("app")));
    d.reset_acl_log();
    every_mode(
        d,
        d.config(Some("t-client"), "app"),
        d.config(Some("t-worker"), "app"),
        &queues,
    )
    .await;
    assert_eq!(d.denials(&[]), Vec::<String>::new(), "nothing was refused");

    for user in ["t-client", "t-worker", "t-full"] {
        let mut con = d.connection(Some(user));
        refused_outside(&mut *con, "app", Some(&foreign));
        // A queue whose name the allowed one starts with is another queue.
        refused(
            &mut *con,
            redis::cmd("HMGET")
                .arg(format!("app:{{{}x}}:meta", queues.simple))
                .arg("mode"),
        );
        allowed(
            &mut *con,
            redis::cmd("HMGET")
                .arg(format!("app:{{{}}}:meta", queues.simple))
                .arg("mode"),
        );
    }
    let mut con = d.connection(Some("t-worker"));
    allowed(
        &mut *con,
        redis::cmd("PUBLISH")
            .arg(format!("app:{{{}}}:reply:c", queues.simple))
            .arg("x"),
    );
    refused(
        &mut *con,
        redis::cmd("PUBLISH")
            .arg(format!("app:{{{foreign}}}:reply:c"))
            .arg("x"),
    );

    // The library, confined, is refused another queue with a clear error.
    let app = Client::connect(d.config(Some("t-client"), "app"))
        .await
        .unwrap();
    let err = app.queue(&foreign, Mode::Simple).await.unwrap_err();
    assert!(
        matches!(&err, Error::Redis(e) if e.code() == Some("NOPERM")),
        "{err}"
    );
    let built = Worker::builder(d.config(Some("t-worker"), "app"))
        .queue(&foreign)
        .build()
        .await;
    let Err(err) = built else {
        panic!("a worker on a foreign queue was built")
    };
    assert!(
        matches!(&err, Error::Redis(e) if e.code() == Some("NOPERM")),
        "{err}"
    );
}

/// No script loading: the users run the library's scripts (EVALSHA) once an
/// operator has loaded them, and cannot run any Lua of their own.
async fn no_script_loading(d: &Deployment) {
    let queues = Queues::new("noload");
    d.set_user(
        "c-noload",
        &AclProfile::new("app")
            .role(AclRole::Client)
            .script_loading(false),
    );
    d.set_user(
        "w-noload",
        &AclProfile::new("app")
            .role(AclRole::Worker)
            .script_loading(false),
    );
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut *d.connection(None))
        .unwrap();
    let client = d.config(Some("c-noload"), "app");
    let worker = d.config(Some("w-noload"), "app");

    for user in ["c-noload", "w-noload"] {
        let mut con = d.connection(Some(user));
        let script = job_async_redis::scripts::all()[0].source();
        refused(&mut *con, redis::cmd("SCRIPT").arg("LOAD").arg(script));
        refused(
            &mut *con,
            redis::cmd("SCRIPT").arg("LOAD").arg("while true do end"),
        );
        refused(&mut *con, redis::cmd("EVAL").arg("return 1").arg(0));
        refused(&mut *con, redis::cmd("FUNCTION").arg("LIST"));
    }

    // Scripts not loaded: a typed error that says how to load them.
    let app = Client::connect(client.clone()).await.unwrap();
    let err = app.queue(&queues.simple, Mode::Simple).await.unwrap_err();
    match &err {
        Error::ScriptsNotLoaded { missing } => {
            assert_eq!(missing, &["queue_register".to_string()]);
            assert!(err.to_string().contains("load_scripts"), "{err}");
        }
        other => panic!("expected ScriptsNotLoaded, got {other:?}"),
    }
    let built = Worker::builder(worker.clone())
        .queue(&queues.simple)
        .build()
        .await;
    let Err(err) = built else {
        panic!("a worker was built without scripts")
    };
    assert!(matches!(err, Error::ScriptsNotLoaded { .. }), "{err:?}");
    // The application's own credentials cannot load them either.
    let err = load_scripts(&client).await.unwrap_err();
    assert!(matches!(err, Error::ScriptsNotLoaded { .. }), "{err:?}");

    // The operator loads them, on every primary; then everything runs.
    load_scripts(&d.config(None, "app")).await.unwrap();
    d.assert_scripts_loaded();
    d.reset_acl_log();
    every_mode(d, client.clone(), worker.clone(), &queues).await;
    // Clients and workers try SCRIPT LOAD when they connect, and carry on
    // when it is refused.
    assert_eq!(
        d.denials(&["script|load"]),
        Vec::<String>::new(),
        "nothing else was refused"
    );

    // After SCRIPT FLUSH (as after a restart or failover) the same error,
    // until the operator loads them again.
    let running = spawn_worker(worker.clone(), &[&queues.simple], 1, support::reverse).await;
    let queue = app.queue(&queues.simple, Mode::Simple).await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut *d.connection(None))
        .unwrap();
    let err = queue.submit("abc").await.unwrap_err();
    assert!(matches!(err, Error::ScriptsNotLoaded { .. }), "{err:?}");
    load_scripts(&d.config(None, "app")).await.unwrap();
    d.assert_scripts_loaded();
    let out: String = queue
        .submit("abc")
        .await
        .unwrap()
        .result_timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(out, "cba");
    assert_eq!(running.stop().await.completed, 1);
}

/// Glob characters in a prefix (or queue name) are escaped: a user of
/// prefix `a*` does not reach `ab:...`.
async fn glob_prefixes(d: &Deployment) {
    let q = queue_name("glob");
    // (prefix, a key of another application the unescaped rule would reach)
    let cases = [
        ("a*", format!("ab:{{{q}}}:meta")),
        ("a?", format!("ax:{{{q}}}:meta")),
        ("[ab]", format!("a:{{{q}}}:meta")),
        (r"a\", format!("a:{{{q}}}:meta")),
    ];
    for (prefix, foreign) in &cases {
        d.set_user("globber", &AclProfile::new(*prefix));
        let mut con = d.connection(Some("globber"));
        refused(
            &mut *con,
            redis::cmd("HSET").arg(foreign).arg("mode").arg("simple"),
        );
        allowed(
            &mut *con,
            redis::cmd("HSET")
                .arg(format!("{prefix}:{{{q}}}:probe"))
                .arg("x")
                .arg("1"),
        );
        // The library works under that prefix.
        let config = d.config(Some("globber"), prefix);
        let running = spawn_worker(config.clone(), &[&q], 1, support::reverse).await;
        let app = Client::connect(config).await.unwrap();
        let queue = app.queue(&q, Mode::Simple).await.unwrap();
        let out: String = queue
            .submit("xyz")
            .await
            .unwrap()
            .result_timeout(WAIT)
            .await
            .unwrap();
        assert_eq!(out, "zyx", "prefix {prefix}");
        running.stop().await;
    }
    // Queue names are escaped too.
    let glob_queue = format!("{q}*");
    d.set_user("globber", &AclProfile::new("app").queue(&glob_queue));
    let mut con = d.connection(Some("globber"));
    allowed(
        &mut *con,
        redis::cmd("HMGET")
            .arg(format!("app:{{{glob_queue}}}:meta"))
            .arg("mode"),
    );
    refused(
        &mut *con,
        redis::cmd("HMGET")
            .arg(format!("app:{{{q}x}}:meta"))
            .arg("mode"),
    );
    refused(
        &mut *con,
        redis::cmd("HMGET")
            .arg(format!("app:{{{q}}}:meta"))
            .arg("mode"),
    );
}

#[tokio::test]
async fn the_full_profile_runs_every_mode_and_nothing_else() {
    full_profile(&Deployment::Single(RedisServer::start())).await;
}

#[tokio::test]
async fn client_and_worker_roles_run_every_mode_and_clients_cannot_publish() {
    client_and_worker_roles(&Deployment::Single(RedisServer::start())).await;
}

#[tokio::test]
async fn per_queue_profiles_confine_users_to_their_queues() {
    per_queue_profiles(&Deployment::Single(RedisServer::start())).await;
}

#[tokio::test]
async fn without_script_loading_users_run_only_the_loaded_scripts() {
    no_script_loading(&Deployment::Single(RedisServer::start())).await;
}

#[tokio::test]
async fn glob_characters_in_prefixes_and_queues_do_not_reach_other_keys() {
    glob_prefixes(&Deployment::Single(RedisServer::start())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_profile_on_a_cluster() {
    let d = Deployment::Cluster(RedisCluster::start());
    full_profile(&d).await;
    client_and_worker_roles(&d).await;
    per_queue_profiles(&d).await;
    no_script_loading(&d).await;
    glob_prefixes(&d).await;
}

#[test]
fn a_prefix_with_a_space_is_refused_clearly() {
    // Redis itself refuses a pattern with a space...
    let server = RedisServer::start();
    let refused: RedisResult<()> = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("spaced")
        .arg("~my app:*")
        .query(&mut server.connection());
    assert!(
        refused.is_err(),
        "Redis accepted a key pattern with a space"
    );
    // ...so the profile says why before anything is sent.
    let err = AclProfile::new("my app").rules().unwrap_err();
    assert!(matches!(err, Error::InvalidName(_)), "{err:?}");
    assert!(err.to_string().contains("\"my app\""), "{err}");
    assert!(err.to_string().contains("whitespace"), "{err}");
    let err = AclProfile::new("app")
        .queue("my queue")
        .rules()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidName(_)), "{err:?}");
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_error() {
    let server = RedisServer::start();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("jobs")
        .arg("on")
        .arg(">right")
        .arg("+@all")
        .arg("~*")
        .query(&mut server.connection())
        .unwrap();
    let url = format!("redis://jobs:wrong@127.0.0.1:{}", server.port());
    let err = Client::connect(Config::new(url)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Redis(e) if e.code() == Some("WRONGPASS")),
        "{err:?}"
    );
}
