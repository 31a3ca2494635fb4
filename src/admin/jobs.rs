//! Jobs by state, a page at a time, and one job in full.

use std::collections::BTreeMap;

use redis::Value;
use serde::Serialize;

use super::overview::{decode, wrong_type};
use crate::connection::Conn;
use crate::encoding::Encoding;
use crate::error::Error;
use crate::keys::QueueKeys;
use crate::mode::Mode;

/// Which jobs [`super::Admin::jobs`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ListState {
    /// Ready to run: the pending list, the next to run first.
    Waiting,
    /// Waiting for their due time: the delayed set, earliest first.
    Delayed,
    /// Taken by a worker and not finished.
    Active,
    /// Dead-lettered: the dead-letter set, newest first.
    Dead,
}

impl ListState {
    /// Every state, in the order a job meets them.
    pub const ALL: [ListState; 4] = [
        ListState::Waiting,
        ListState::Delayed,
        ListState::Active,
        ListState::Dead,
    ];

    /// The state's name: `waiting`, `delayed`, `active`, `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            ListState::Waiting => "waiting",
            ListState::Delayed => "delayed",
            ListState::Active => "active",
            ListState::Dead => "dead",
        }
    }

    /// Parses a name of [`ListState::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        ListState::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// One page of jobs ([`super::Admin::jobs`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct JobList {
    /// The state listed.
    pub state: ListState,
    /// How many jobs are in that state.
    pub total: u64,
    /// The position of the first entry.
    pub offset: usize,
    /// The page.
    pub entries: Vec<JobEntry>,
}

/// A job in a [`JobList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct JobEntry {
    /// The job's ID (bytes that are not UTF-8 are shown as U+FFFD).
    pub id: String,
    /// The time that orders the list (ms since the Unix epoch, server
    /// time): a delayed job's due time, a recoverable active job's lease
    /// deadline, a dead job's time of death; `None` for waiting jobs and
    /// reliable active ones.
    pub at_ms: Option<u64>,
    /// Reliable mode: the worker whose in-flight list holds an active job.
    pub worker: Option<String>,
}

/// A job with every field of its hash ([`super::Admin::job`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct JobDetail {
    /// The job's ID.
    pub id: String,
    /// Its state as stored: `queued`, `active`, `completed`, `failed` or
    /// `dead` (a cancelled job is `failed` with `error_kind` `cancelled`).
    pub state: String,
    /// Every field of the hash but `payload`, `result` and `progress`, as
    /// text (bytes that are not UTF-8 are shown as U+FFFD).
    pub fields: BTreeMap<String, String>,
    /// The payload.
    pub payload: Body,
    /// The result, once completed.
    pub result: Option<Body>,
    /// The latest progress its handler reported.
    pub progress: Option<Body>,
}

/// A payload, result or progress value: JSON when it decodes in the job's
/// encoding, else its bytes in hexadecimal.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Body {
    /// Its size in bytes.
    pub bytes: usize,
    /// The value, when it decodes.
    pub json: Option<serde_json::Value>,
    /// When it does not: why, and its first 1024 bytes in hexadecimal.
    pub undecoded: Option<(String, String)>,
}

impl Body {
    fn new(enc: Option<Encoding>, raw: &[u8]) -> Self {
        let decoded = match enc {
            Some(enc) => enc
                .decode::<serde_json::Value>(raw, "value")
                .map_err(|e| e.to_string()),
            None => Err("unknown encoding".to_owned()),
        };
        match decoded {
            Ok(json) => Body {
                bytes: raw.len(),
                json: Some(json),
                undecoded: None,
            },
            Err(why) => Body {
                bytes: raw.len(),
                json: None,
                undecoded: Some((
                    why,
                    raw.iter().take(1024).map(|b| format!("{b:02x}")).collect(),
                )),
            },
        }
    }
}

/// One page of the jobs of `keys` in `state`.
pub(crate) async fn list(
    con: &Conn,
    keys: &QueueKeys,
    mode: Mode,
    state: ListState,
    offset: usize,
    limit: usize,
) -> Result<JobList, Error> {
    let mut c = con.clone();
    let page = |total: u64, entries: Vec<JobEntry>| JobList {
        state,
        total,
        offset,
        entries,
    };
    if limit == 0 {
        let total = count(con, keys, mode, state).await?;
        return Ok(page(total, Vec::new()));
    }
    let last = offset.saturating_add(limit) - 1;
    match (state, mode) {
        (ListState::Waiting, _) => {
            // LPUSHed at the head, taken from the tail: the next to run is
            // the last element.
            let total: u64 = query(redis::cmd("LLEN").arg(keys.pending()), &mut c, keys).await?;
            let total_i = total as i64;
            let end = total_i - offset as i64 - 1;
            if end < 0 {
                return Ok(page(total, Vec::new()));
            }
            let start = (total_i - last as i64 - 1).max(0);
            let ids: Vec<Vec<u8>> = query(
                redis::cmd("LRANGE").arg(keys.pending()).arg(start).arg(end),
                &mut c,
                keys,
            )
            .await?;
            let entries = ids.iter().rev().map(|id| entry(id, None, None)).collect();
            Ok(page(total, entries))
        }
        (ListState::Delayed, _) | (ListState::Dead, _) | (ListState::Active, Mode::Recoverable) => {
            let (key, reverse) = match state {
                ListState::Delayed => (keys.delayed(), false),
                ListState::Dead => (keys.dead_jobs(), true),
                _ => (keys.leases(), false),
            };
            let total: u64 = query(redis::cmd("ZCARD").arg(&key), &mut c, keys).await?;
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(&key).arg(offset).arg(last);
            if reverse {
                cmd.arg("REV");
            }
            cmd.arg("WITHSCORES");
            let members: Vec<(Vec<u8>, f64)> = query(&cmd, &mut c, keys).await?;
            let entries = members
                .iter()
                .map(|(id, score)| entry(id, Some(*score as u64), None))
                .collect();
            Ok(page(total, entries))
        }
        (ListState::Active, _) => {
            // Reliable: the workers' in-flight lists, one after the other.
            let workers: Vec<String> = query(
                redis::cmd("ZRANGE").arg(keys.workers()).arg(0).arg(-1),
                &mut c,
                keys,
            )
            .await?;
            let mut pipe = redis::pipe();
            for w in &workers {
                pipe.cmd("LLEN").arg(keys.inflight(w));
            }
            let lens: Vec<u64> = if workers.is_empty() {
                Vec::new()
            } else {
                pipe.query_async(&mut c)
                    .await
                    .map_err(|e| wrong_type(e, keys))?
            };
            let total = lens.iter().sum();
            let mut entries = Vec::new();
            let mut skip = offset as u64;
            for (w, len) in workers.iter().zip(lens) {
                if entries.len() >= limit {
                    break;
                }
                if skip >= len {
                    skip -= len;
                    continue;
                }
                let want = (limit - entries.len()) as u64;
                let ids: Vec<Vec<u8>> = query(
                    redis::cmd("LRANGE")
                        .arg(keys.inflight(w))
                        .arg(skip)
                        .arg(skip + want - 1),
                    &mut c,
                    keys,
                )
                .await?;
                skip = 0;
                entries.extend(ids.iter().map(|id| entry(id, None, Some(w.clone()))));
            }
            Ok(page(total, entries))
        }
    }
}

/// How many jobs of `keys` are in `state`.
async fn count(con: &Conn, keys: &QueueKeys, mode: Mode, state: ListState) -> Result<u64, Error> {
    super::overview::read(con, keys, mode)
        .await
        .map(|o| match state {
            ListState::Waiting => o.counts.waiting,
            ListState::Delayed => o.counts.delayed,
            ListState::Active => o.counts.active.unwrap_or(0),
            ListState::Dead => o.counts.dead,
        })
}

/// Job `id` of `keys` in full, or `None`.
pub(crate) async fn detail(
    con: &Conn,
    keys: &QueueKeys,
    id: &str,
) -> Result<Option<JobDetail>, Error> {
    let key = keys.job(id);
    let raw: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut con.clone())
        .await
        .map_err(|e| crate::error::on_key(e, &key, "hash"))?;
    if raw.is_empty() {
        return Ok(None);
    }
    let mut fields = BTreeMap::new();
    let (mut payload, mut result, mut progress) = (None, None, None);
    for (name, value) in raw {
        match name.as_slice() {
            b"payload" => payload = Some(value),
            b"result" => result = Some(value),
            b"progress" => progress = Some(value),
            _ => {
                fields.insert(
                    String::from_utf8_lossy(&name).into_owned(),
                    String::from_utf8_lossy(&value).into_owned(),
                );
            }
        }
    }
    let enc = fields.get("enc").and_then(|e| Encoding::parse(e));
    Ok(Some(JobDetail {
        id: id.to_owned(),
        state: fields.get("state").cloned().unwrap_or_default(),
        payload: Body::new(enc, payload.as_deref().unwrap_or_default()),
        result: result.map(|r| Body::new(enc, &r)),
        progress: progress.map(|p| Body::new(enc, &p)),
        fields,
    }))
}

fn entry(id: &[u8], at_ms: Option<u64>, worker: Option<String>) -> JobEntry {
    JobEntry {
        id: String::from_utf8_lossy(id).into_owned(),
        at_ms,
        worker,
    }
}

async fn query<T: redis::FromRedisValue>(
    cmd: &redis::Cmd,
    con: &mut Conn,
    keys: &QueueKeys,
) -> Result<T, Error> {
    let value: Value = cmd
        .query_async(con)
        .await
        .map_err(|e| wrong_type(e, keys))?;
    redis::from_redis_value(value).map_err(|e| decode(e.to_string()))
}
