//! Helpers of `tests/hostile.rs`: corrupt data written with plain Redis
//! commands, whole-keyspace snapshots, script calls by hand, a raw listener
//! on a reply channel, and a handler that counts what it runs.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use job_async_redis::Job;
use redis::Connection;

/// Redis types a key can be replaced with, every one Redis has: `stream`
/// too (only the lifecycle event stream is one, protocol.md 8.12).
pub const TYPES: [&str; 6] = ["string", "hash", "list", "zset", "set", "stream"];

/// Numbers that are not strict decimal integers, or are out of every range,
/// or sit on the edge of one (protocol: `^-?[0-9]+$`, at most 15 digits;
/// durations, a job's lease and its handler timeout end at 10^12).
pub const BAD_NUMBERS: [&str; 14] = [
    "nan",
    "inf",
    "-inf",
    "1e309",
    "1e3",
    "0x10",
    " 1",
    "1.5",
    "-1",
    "0",
    "1000000000000",
    "1000000000001",
    "99999999999999999999",
    "",
];

/// True for a strict decimal integer of the protocol (at most 15 digits).
pub fn strict_int(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Replaces `key` by a value of Redis type `kind` (no TTL). Every value
/// holds bytes that are not UTF-8.
pub fn write_type(con: &mut Connection, key: &[u8], kind: &str) {
    let _: () = redis::cmd("DEL").arg(key).query(con).unwrap();
    let garbage: &[u8] = b"garbage \xff\xfe";
    let mut cmd = match kind {
        "string" => redis::cmd("SET"),
        "hash" => redis::cmd("HSET"),
        "list" => redis::cmd("RPUSH"),
        "zset" => redis::cmd("ZADD"),
        "set" => redis::cmd("SADD"),
        "stream" => redis::cmd("XADD"),
        other => panic!("unknown type {other}"),
    };
    cmd.arg(key);
    match kind {
        "hash" => cmd.arg("state").arg(garbage),
        "zset" => cmd.arg(1).arg(garbage),
        "stream" => cmd.arg("*").arg("f").arg(garbage),
        _ => cmd.arg(garbage),
    };
    let _: redis::Value = cmd.query(con).unwrap();
}

/// Sets `key` to the string `value` (no TTL).
pub fn write_text(con: &mut Connection, key: &[u8], value: &[u8]) {
    let _: () = redis::cmd("SET").arg(key).arg(value).query(con).unwrap();
}

/// The whole keyspace: each key's DUMP and absolute expiry (PEXPIRETIME, so
/// that a TTL counting down is not a change).
pub type Snapshot = BTreeMap<Vec<u8>, (Option<Vec<u8>>, i64)>;

/// Takes a [`Snapshot`].
pub fn snapshot(con: &mut Connection) -> Snapshot {
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(con).unwrap();
    if keys.is_empty() {
        return Snapshot::new();
    }
    let mut pipe = redis::pipe();
    for k in &keys {
        pipe.cmd("DUMP").arg(k).cmd("PEXPIRETIME").arg(k);
    }
    let values: Vec<redis::Value> = pipe.query(con).unwrap();
    let mut out = Snapshot::new();
    for (k, pair) in keys.into_iter().zip(values.chunks(2)) {
        let dump = match &pair[0] {
            redis::Value::BulkString(b) => Some(b.clone()),
            _ => None,
        };
        let expiry = match &pair[1] {
            redis::Value::Int(i) => *i,
            _ => -3,
        };
        out.insert(k, (dump, expiry));
    }
    out
}

/// The keys that differ between two snapshots, described.
pub fn diff(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => out.push(format!("{} deleted", show(k))),
            Some(w) if w.0 != v.0 => out.push(format!("{} modified", show(k))),
            Some(w) if w.1 != v.1 => out.push(format!("{} expiry {} -> {}", show(k), v.1, w.1)),
            _ => {}
        }
    }
    for k in after.keys() {
        if !before.contains_key(k) {
            out.push(format!("{} created", show(k)));
        }
    }
    out
}

/// Bytes as redis-cli shows them, cut after 60 bytes.
pub fn show(bytes: &[u8]) -> String {
    let mut s = String::from("\"");
    for &b in bytes.iter().take(60) {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    if bytes.len() > 60 {
        s.push_str(&format!("...({} bytes)", bytes.len()));
    }
    s.push('"');
    s
}

/// A script call written by hand.
#[derive(Clone, Debug)]
pub struct RawCall {
    pub script: &'static str,
    pub keys: Vec<Vec<u8>>,
    pub args: Vec<Vec<u8>>,
}

impl RawCall {
    /// The call as redis-cli would show it.
    pub fn shown(&self) -> String {
        let mut s = format!("EVALSHA <{}> {}", self.script, self.keys.len());
        for k in &self.keys {
            s.push(' ');
            s.push_str(&show(k));
        }
        for a in &self.args {
            s.push(' ');
            s.push_str(&show(a));
        }
        s
    }
}

/// Loads every script of the library; returns name -> SHA1.
pub fn load_scripts(con: &mut Connection) -> HashMap<&'static str, String> {
    let mut shas = HashMap::new();
    for s in job_async_redis::scripts::all() {
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(s.source())
            .query(con)
            .unwrap();
        shas.insert(s.name(), sha);
    }
    shas
}

/// What a script call answered: its reply, or its error as `CODE detail`.
pub fn eval(
    con: &mut Connection,
    shas: &HashMap<&'static str, String>,
    call: &RawCall,
) -> Result<redis::Value, String> {
    let sha = shas
        .get(call.script)
        .unwrap_or_else(|| panic!("no script {}", call.script));
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha).arg(call.keys.len());
    for k in &call.keys {
        cmd.arg(k.as_slice());
    }
    for a in &call.args {
        cmd.arg(a.as_slice());
    }
    cmd.query::<redis::Value>(con).map_err(|e| {
        if e.is_timeout() || e.is_io_error() {
            return format!("(no reply: {e})");
        }
        match (e.code(), e.detail()) {
            (Some(code), Some(detail)) => format!("{code} {detail}"),
            (Some(code), None) => code.to_owned(),
            _ => format!("(not a server error: {e})"),
        }
    })
}

/// Listens on a channel with a connection of its own, keeping every
/// MessagePack message that arrives.
pub struct Listener {
    messages: Arc<Mutex<Vec<rmpv::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Subscribes to `channel` (confirmed when this returns).
    pub async fn start(url: &str, channel: &str) -> Self {
        let client = redis::Client::open(url).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.subscribe(channel).await.unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        let task = tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let mut bytes = msg.get_payload_bytes();
                if let Ok(v) = rmpv::decode::read_value(&mut bytes) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Self { messages, task }
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<rmpv::Value> {
        self.messages.lock().unwrap().clone()
    }

    /// The outcome (status, error kind) published for job `id`, if any.
    pub fn outcome(&self, id: &str) -> Option<(String, String)> {
        self.messages().iter().find_map(|m| {
            if field(m, "id")?.as_str()? != id {
                return None;
            }
            let status = field(m, "status")?.as_str()?.to_owned();
            let kind = field(m, "error")
                .and_then(|e| field(e, "kind"))
                .and_then(|k| k.as_str().map(str::to_owned))
                .unwrap_or_default();
            Some((status, kind))
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A field of a MessagePack map.
pub fn field<'a>(map: &'a rmpv::Value, name: &str) -> Option<&'a rmpv::Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v)
}

/// Builds a MessagePack map from `(key, value)` pairs, in order, keeping
/// duplicates.
pub fn msgpack_map(fields: Vec<(&str, rmpv::Value)>) -> Vec<u8> {
    let map = rmpv::Value::Map(
        fields
            .into_iter()
            .map(|(k, v)| (rmpv::Value::from(k), v))
            .collect(),
    );
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &map).unwrap();
    out
}

/// A MessagePack string (fixstr/str8/16/32) holding `bytes`, valid UTF-8
/// or not.
pub fn msgpack_raw_str(bytes: &[u8]) -> Vec<u8> {
    let n = bytes.len();
    let mut out = if n < 32 {
        vec![0xa0 | n as u8]
    } else if n < 256 {
        vec![0xd9, n as u8]
    } else if n < 65536 {
        vec![0xda, (n >> 8) as u8, n as u8]
    } else {
        let mut h = vec![0xdb];
        h.extend_from_slice(&(n as u32).to_be_bytes());
        h
    };
    out.extend_from_slice(bytes);
    out
}

/// `depth` nested one-element MessagePack arrays around nil.
pub fn deep_msgpack(depth: usize) -> Vec<u8> {
    let mut out = vec![0x91u8; depth];
    out.push(0xc0);
    out
}

/// `depth` nested one-entry MessagePack maps (`{"k": {"k": ...}}`).
pub fn deep_msgpack_maps(depth: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(depth * 3 + 1);
    for _ in 0..depth {
        out.extend_from_slice(b"\x81\xa1k");
    }
    out.push(0xc0);
    out
}

/// `depth` nested JSON arrays.
pub fn deep_json(depth: usize) -> Vec<u8> {
    let mut out = vec![b'['; depth];
    out.extend(std::iter::repeat_n(b']', depth));
    out
}

/// What a counting handler ran: job ID -> the `attempt` of each run.
#[derive(Clone, Default)]
pub struct Runs(Arc<Mutex<HashMap<String, Vec<u32>>>>);

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Runs {
    /// How many times job `id` ran.
    pub fn count(&self, id: &str) -> usize {
        self.0.lock().unwrap().get(id).map_or(0, Vec::len)
    }

    /// The attempts job `id` ran with.
    pub fn attempts(&self, id: &str) -> Vec<u32> {
        self.0.lock().unwrap().get(id).cloned().unwrap_or_default()
    }

    /// Total runs.
    pub fn total(&self) -> usize {
        self.0.lock().unwrap().values().map(Vec::len).sum()
    }

    /// A handler of `String` payloads that records each run and then:
    /// `"slow"` sleeps 1.5 s (longer than the tests' 600 ms lease) and
    /// completes; `"fail"` fails; `"hang"` never returns; anything else
    /// completes with the payload reversed.
    pub fn handler(
        &self,
    ) -> impl Fn(Job<String>) -> Boxed<Result<String, String>> + Send + Sync + 'static {
        let runs = self.clone();
        move |job: Job<String>| {
            runs.0
                .lock()
                .unwrap()
                .entry(job.id.clone())
                .or_default()
                .push(job.attempt);
            Box::pin(async move {
                match job.payload.as_str() {
                    "slow" => {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        Ok("wols".to_owned())
                    }
                    "fail" => Err("boom".to_owned()),
                    "hang" => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        Ok(String::new())
                    }
                    other => Ok(other.chars().rev().collect()),
                }
            })
        }
    }
}

/// Polls `check` every 20 ms until it is true or `within` has passed.
pub async fn wait_until(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
