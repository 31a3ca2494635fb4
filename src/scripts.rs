//! The script registry: every state transition is a Lua file in `lua/`,
//! embedded at build time, hashed with SHA1 over the exact bytes sent, and run
//! with EVALSHA. A NOSCRIPT reply (after a restart, a failover or SCRIPT
//! FLUSH) loads the script and retries, on single calls and in pipelines.

use std::sync::OnceLock;

use include_dir::{Dir, include_dir};
use redis::{RedisError, RedisResult, ServerErrorKind, Value, aio::ConnectionLike};

use crate::connection::Conn;
use crate::error::Error;

static LUA_DIR: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/lua");

/// One embedded Lua script.
#[derive(Debug)]
pub struct LuaScript {
    name: &'static str,
    version: u32,
    sha1: String,
    source: &'static str,
}

impl LuaScript {
    /// Script name: its file name without `.lua`.
    pub fn name(&self) -> &'static str {
        self.name
    }
    /// Version from the script's `-- version:` header line.
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Lower-case hex SHA1 of the exact source bytes; the EVALSHA digest.
    pub fn sha1(&self) -> &str {
        &self.sha1
    }
    /// The source text, byte for byte as sent to Redis.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// Starts a call of this script.
    pub(crate) fn call(&'static self) -> Call {
        Call {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    fn parse(file_name: &'static str, source: &'static str) -> Result<Self, String> {
        let name = file_name
            .strip_suffix(".lua")
            .ok_or_else(|| format!("{file_name}: not a .lua file"))?;
        let header = |field: &str| {
            source
                .lines()
                .take_while(|l| l.starts_with("--") || l.starts_with("#!"))
                .find_map(|l| l.strip_prefix(&format!("-- {field}:")))
                .map(str::trim)
        };
        if header("name") != Some(name) {
            return Err(format!("{file_name}: header '-- name: {name}' missing"));
        }
        let version = header("version")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{file_name}: header '-- version: N' missing"))?;
        Ok(Self {
            name,
            version,
            sha1: sha1_smol::Sha1::from(source.as_bytes())
                .digest()
                .to_string(),
            source,
        })
    }
}

/// Names of the scripts, one per state transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Name {
    QueueRegister,
    SimpleSubmit,
    SimpleReply,
    SimpleRequeue,
    SimpleDead,
    JobSubmit,
    JobClaim,
    JobStart,
    JobFinish,
    JobExtend,
    JobRequeueStale,
    JobWatch,
    JobRelease,
    ReliableStart,
    ReliableHeartbeat,
    ReliableFindDead,
    ReliableRequeueWorker,
    JobFinishBatch,
    JobPromote,
    ScheduleSet,
    ScheduleFire,
    ScheduleRemove,
    QueueControl,
    JobCancel,
    JobProgress,
    JobRequeue,
}

impl Name {
    #[cfg(test)]
    const ALL: [Name; 26] = [
        Name::QueueRegister,
        Name::SimpleSubmit,
        Name::SimpleReply,
        Name::SimpleRequeue,
        Name::SimpleDead,
        Name::JobSubmit,
        Name::JobClaim,
        Name::JobStart,
        Name::JobFinish,
        Name::JobExtend,
        Name::JobRequeueStale,
        Name::JobWatch,
        Name::JobRelease,
        Name::ReliableStart,
        Name::ReliableHeartbeat,
        Name::ReliableFindDead,
        Name::ReliableRequeueWorker,
        Name::JobFinishBatch,
        Name::JobPromote,
        Name::ScheduleSet,
        Name::ScheduleFire,
        Name::ScheduleRemove,
        Name::QueueControl,
        Name::JobCancel,
        Name::JobProgress,
        Name::JobRequeue,
    ];

    fn file_stem(self) -> &'static str {
        match self {
            Name::QueueRegister => "queue_register",
            Name::SimpleSubmit => "simple_submit",
            Name::JobSubmit => "job_submit",
            Name::JobClaim => "job_claim",
            Name::JobStart => "job_start",
            Name::JobFinish => "job_finish",
            Name::JobExtend => "job_extend",
            Name::JobRequeueStale => "job_requeue_stale",
            Name::JobWatch => "job_watch",
            Name::JobRelease => "job_release",
            Name::ReliableStart => "reliable_start",
            Name::ReliableHeartbeat => "reliable_heartbeat",
            Name::ReliableFindDead => "reliable_find_dead",
            Name::ReliableRequeueWorker => "reliable_requeue_worker",
            Name::JobFinishBatch => "job_finish_batch",
            Name::JobPromote => "job_promote",
            Name::ScheduleSet => "schedule_set",
            Name::ScheduleFire => "schedule_fire",
            Name::ScheduleRemove => "schedule_remove",
            Name::QueueControl => "queue_control",
            Name::JobCancel => "job_cancel",
            Name::JobProgress => "job_progress",
            Name::JobRequeue => "job_requeue",
            Name::SimpleReply => "simple_reply",
            Name::SimpleRequeue => "simple_requeue",
            Name::SimpleDead => "simple_dead",
        }
    }
}

/// All embedded scripts, sorted by name.
pub fn all() -> &'static [LuaScript] {
    static REGISTRY: OnceLock<Vec<LuaScript>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut scripts: Vec<LuaScript> = LUA_DIR
            .files()
            .filter(|f| f.path().extension().is_some_and(|e| e == "lua"))
            .map(|f| {
                let file_name = f.path().file_name().and_then(|n| n.to_str()).unwrap_or("");
                let source = f
                    .contents_utf8()
                    .unwrap_or_else(|| panic!("lua/{file_name} is not UTF-8"));
                LuaScript::parse(file_name, source).unwrap_or_else(|e| panic!("lua/{e}"))
            })
            .collect();
        scripts.sort_by_key(|s| s.name);
        scripts
    })
}

/// The script for a transition.
pub(crate) fn get(name: Name) -> &'static LuaScript {
    let stem = name.file_stem();
    all()
        .iter()
        .find(|s| s.name == stem)
        .unwrap_or_else(|| panic!("lua/{stem}.lua is not embedded"))
}

/// Loads every script into the server's script cache (SCRIPT LOAD). Calls
/// recover from NOSCRIPT by themselves; loading up front saves that round
/// trip. Returns false, without error, when this connection may not load
/// scripts (NOPERM: an operator loads them, see [`load_scripts`]).
pub(crate) async fn load_all(con: &mut Conn) -> Result<bool, Error> {
    let loaded: RedisResult<Vec<String>> = if con.is_cluster() {
        // One command each: the cluster connection sends SCRIPT LOAD to
        // every node (a pipeline would reach only one).
        let mut shas = Vec::new();
        for s in all() {
            match redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(s.source)
                .query_async(con)
                .await
            {
                Ok(sha) => shas.push(sha),
                Err(e) => return load_failed(e),
            }
        }
        Ok(shas)
    } else {
        let mut pipe = redis::pipe();
        for s in all() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(s.source);
        }
        pipe.query_async(con).await
    };
    let shas = match loaded {
        Ok(shas) => shas,
        Err(e) => return load_failed(e),
    };
    for (s, sha) in all().iter().zip(&shas) {
        if *sha != s.sha1 {
            return Err(Error::Redis(RedisError::from((
                redis::ErrorKind::Client,
                "SCRIPT LOAD returned an unexpected SHA1",
                format!("{}: expected {}, got {sha}", s.name, s.sha1),
            ))));
        }
    }
    Ok(true)
}

/// A failed SCRIPT LOAD: NOPERM means "not ours to load" (false).
fn load_failed(e: RedisError) -> Result<bool, Error> {
    if is_noperm(&e) {
        Ok(false)
    } else {
        Err(Error::Redis(e))
    }
}

/// Loads every script of the library into the script cache of the server
/// (or of every primary of a cluster) that `config` names, with the
/// credentials of its URL. For deployments whose application users may not
/// load scripts (see [`crate::AclProfile::script_loading`]): an operator runs this after every
/// restart, failover or `SCRIPT FLUSH`, since Redis does not keep or
/// replicate its script cache.
///
/// # Errors
/// [`Error::ScriptsNotLoaded`] when these credentials may not load scripts
/// either; [`Error::Redis`] when Redis cannot be reached.
pub async fn load_scripts(config: &crate::Config) -> Result<(), Error> {
    let backend = crate::connection::backend(config)?;
    let mut con = crate::connection::plain(&backend, config).await?;
    if load_all(&mut con).await? {
        Ok(())
    } else {
        Err(Error::ScriptsNotLoaded {
            missing: all().iter().map(|s| s.name.to_owned()).collect(),
        })
    }
}

/// How many times a call is sent when Redis answers NOSCRIPT.
pub(crate) const NOSCRIPT_ATTEMPTS: u32 = 5;

/// One prepared script call: EVALSHA with keys and arguments.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    script: &'static LuaScript,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

fn is_noscript(err: &RedisError) -> bool {
    err.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript)
}

impl Call {
    /// Adds a key (KEYS[n]).
    pub(crate) fn key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.keys.push(key.as_ref().to_vec());
        self
    }

    /// Adds an argument (ARGV[n]).
    pub(crate) fn arg(mut self, arg: impl AsRef<[u8]>) -> Self {
        self.args.push(arg.as_ref().to_vec());
        self
    }

    /// The script being called.
    pub(crate) fn script(&self) -> &'static LuaScript {
        self.script
    }

    fn evalsha(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.script.sha1)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }

    /// Runs the call. On NOSCRIPT it loads the script and runs the call
    /// again, up to [`NOSCRIPT_ATTEMPTS`] times (the cache can be flushed
    /// again between the load and the retry). When the connection may not
    /// load scripts (NOPERM), the answer is [`Error::ScriptsNotLoaded`].
    /// Other failures are [`Error::Redis`], for the caller to map.
    pub(crate) async fn invoke<T, C>(&self, con: &mut C) -> Result<T, Error>
    where
        T: redis::FromRedisValue,
        C: ConnectionLike,
    {
        let cmd = self.evalsha();
        let mut attempt = 1;
        loop {
            match cmd.query_async(con).await {
                Err(e) if is_noscript(&e) && attempt < NOSCRIPT_ATTEMPTS => {
                    attempt += 1;
                    let loaded: RedisResult<()> = redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(self.script.source)
                        .exec_async(con)
                        .await;
                    match loaded {
                        Err(e) if is_noperm(&e) => {
                            return Err(Error::ScriptsNotLoaded {
                                missing: vec![self.script.name.to_owned()],
                            });
                        }
                        Err(e) => return Err(Error::Redis(e)),
                        Ok(()) => {}
                    }
                }
                other => return other.map_err(Error::Redis),
            }
        }
    }
}

fn is_noperm(err: &RedisError) -> bool {
    err.code() == Some("NOPERM")
}

/// Runs many calls in one pipeline (one round trip). The reply has one result
/// per call, in order. Calls refused with NOSCRIPT (all of them after a
/// restart; some of them when SCRIPT FLUSH ran while the pipeline was being
/// served) did not run: the scripts are loaded and just those calls are sent
/// again, up to [`NOSCRIPT_ATTEMPTS`] times in all.
pub(crate) async fn invoke_pipeline(
    con: &mut Conn,
    calls: &[Call],
) -> Result<Vec<RedisResult<Value>>, Error> {
    let mut results = send_pipeline(con, calls.iter()).await?;
    for _ in 1..NOSCRIPT_ATTEMPTS {
        let retry: Vec<usize> = (0..calls.len())
            .filter(|&i| matches!(&results[i], Err(e) if is_noscript(e)))
            .collect();
        if retry.is_empty() {
            break;
        }
        if !load_all(con).await? {
            let mut missing: Vec<String> = retry
                .iter()
                .map(|&i| calls[i].script.name.to_owned())
                .collect();
            missing.dedup();
            return Err(Error::ScriptsNotLoaded { missing });
        }
        let again = send_pipeline(con, retry.iter().map(|&i| &calls[i])).await?;
        for (i, r) in retry.into_iter().zip(again) {
            results[i] = r;
        }
    }
    Ok(results)
}

async fn send_pipeline<'a, C: ConnectionLike>(
    con: &mut C,
    calls: impl Iterator<Item = &'a Call>,
) -> RedisResult<Vec<RedisResult<Value>>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for c in calls {
        pipe.add_command(c.evalsha());
    }
    pipe.query_async(con).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (script, version, sha1) of every released script. Changing a script's
    /// text without bumping its version fails this test; after a bump, add
    /// the new line here and to protocol.md.
    #[rustfmt::skip]
    const LOCK: &[(&str, u32, &str)] = &[
        ("job_cancel", 1, "a4cc06bf6f1ec22cf84444392ca76a0de43d61aa"),
        ("job_claim", 7, "57f8a741e3ae282058b91b8e836e5a25c96a9b2b"),
        ("job_extend", 2, "4b2a83c69f65eb415e7242c38c00848dfa0fd1a7"),
        ("job_finish", 15, "72423f7476d6eea87df31cb422d0c7fe7d0b4da0"),
        ("job_finish_batch", 13, "af49726265cf9dfd490b2ee39a5f36db0634dc84"),
        ("job_progress", 1, "8a97f699088603ac16a339e830a0430eba7907b5"),
        ("job_promote", 2, "a3f2d1bf3af9ddff62c27f8d21afa0b7da496650"),
        ("job_release", 5, "68be103489e4c145f97d53285ffd66800bcdff95"),
        ("job_requeue", 1, "02945dabc3cbb8666eb57376a4523ce85df6d4a6"),
        ("job_requeue_stale", 3, "e5eba56ff26d48d4790331b765b30762c17ff6ff"),
        ("job_start", 14, "1cef6c1d6d6e87385a951b7d00e1566a615d69de"),
        ("job_submit", 13, "ac441b87dfbdc1af0f944a8d7a7c850c7488e764"),
        ("job_watch", 4, "de9c6d01ecd545c7672f1c9b205a50244a0b9b1d"),
        ("queue_control", 3, "485ec47d457d02d4f9b103d64c09d44ce7c344ef"),
        ("queue_register", 2, "fd73ede4309ea76b73388f4137b6e3c1f13478f9"),
        ("reliable_find_dead", 2, "322dc3ad60b2574712bf513d46ba0ca446061eff"),
        ("reliable_heartbeat", 2, "d43811e5b44947674f0de766e7c5a8d47bd0e20e"),
        ("reliable_requeue_worker", 3, "98266361e503b45a644cf942a79e6c93234db9ab"),
        ("reliable_start", 16, "69d6a5cd35667c03a8a50ae133aa1b1332fce70f"),
        ("schedule_fire", 4, "383831a292eba4f99285fa4bead407cdde09509f"),
        ("schedule_remove", 1, "7ae546d7c5a2c75881bc546cb69635498525f2c0"),
        ("schedule_set", 2, "294e5a83850456775b16b563d82dd22dc7b9d03b"),
        ("simple_dead", 2, "ca9bc35c0414a36b4dd218779cc9cda24d2c638b"),
        ("simple_reply", 3, "4906ec10e835b1dfae306c3e2b3afa84566e03df"),
        ("simple_requeue", 2, "808db420f9cfed6ce38126e98dc0f2af0b28f966"),
        ("simple_submit", 4, "7c3e84904481f4d75403c9fdca3a386a4562a089"),
    ];

    #[test]
    fn scripts_match_the_lock_list() {
        let mut problems = Vec::new();
        for s in all() {
            match LOCK
                .iter()
                .find(|(n, v, _)| *n == s.name() && *v == s.version())
            {
                None => problems.push(format!(
                    "{} version {} (sha1 {}) is not in the lock list: add it",
                    s.name(),
                    s.version(),
                    s.sha1()
                )),
                Some((_, _, sha)) if *sha != s.sha1() => problems.push(format!(
                    "{} changed (sha1 {} != locked {sha}) without a version bump",
                    s.name(),
                    s.sha1()
                )),
                Some(_) => {}
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn every_transition_has_a_script_with_a_shebang() {
        for name in Name::ALL {
            let s = get(name);
            assert!(s.source().starts_with("#!lua\n"), "{}", s.name());
            assert_eq!(s.sha1().len(), 40);
        }
        assert_eq!(all().len(), Name::ALL.len(), "a script in lua/ is not used");
    }

    #[test]
    fn headers_are_required() {
        assert!(LuaScript::parse("x.lua", "#!lua\n-- name: x\n").is_err());
        assert!(LuaScript::parse("x.lua", "#!lua\n-- name: y\n-- version: 1\n").is_err());
        let s = LuaScript::parse("x.lua", "#!lua\n-- name: x\n-- version: 3\nreturn 1\n").unwrap();
        assert_eq!(s.version(), 3);
        assert_eq!(
            s.sha1(),
            sha1_smol::Sha1::from(s.source()).digest().to_string()
        );
    }
}
