//! One queue at a glance: [`QueueOverview`].

use redis::Value;
use serde::Serialize;

use crate::connection::Conn;
use crate::control::QueueControls;
use crate::error::Error;
use crate::keys::QueueKeys;
use crate::mode::Mode;

/// How a queue is doing ([`super::Admin::overview`]). Times are ms since
/// the Unix epoch, server time; ages are ms before [`QueueOverview::now_ms`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct QueueOverview {
    /// The queue's name.
    pub name: String,
    /// Its mode: `simple`, `recoverable` or `reliable`.
    pub mode: String,
    /// Its protocol version as recorded.
    pub protocol: String,
    /// When it was registered.
    pub created_ms: Option<u64>,
    /// The server's time when it was read.
    pub now_ms: u64,
    /// Its jobs per state.
    pub counts: StateCounts,
    /// How long the next job to run has waited since it was submitted
    /// (recoverable and reliable modes; `None` when none waits).
    pub oldest_waiting_age_ms: Option<u64>,
    /// Reliable mode: the workers that registered a heartbeat, by ID.
    pub workers: Vec<WorkerInfo>,
    /// Workers start no job from it ([`crate::Queue::pause`]).
    pub paused: bool,
    /// Its rate limit: most starts per window.
    pub rate_max: Option<u32>,
    /// Its rate limit's window, in ms.
    pub rate_window_ms: Option<u64>,
    /// Most of its jobs running at once.
    pub concurrency_limit: Option<u32>,
    /// The cap of its lifecycle event stream, while it records events.
    pub events: Option<u64>,
    /// How many recurring schedules it has.
    pub schedules: u64,
}

/// A queue's jobs per state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StateCounts {
    /// Ready to run, waiting for a worker.
    pub waiting: u64,
    /// Waiting for their due time (a delay, a run-at time or a retry's
    /// backoff).
    pub delayed: u64,
    /// Taken by a worker and not finished: claimed (recoverable: the lease
    /// set) or in a worker's in-flight list (reliable). `None` in simple
    /// mode, which does not track them.
    pub active: Option<u64>,
    /// Dead-lettered.
    pub dead: u64,
}

/// A reliable-mode worker, from the queue's heartbeat set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// The worker's ID.
    pub id: String,
    /// Time left before its heartbeat expires, in ms; negative once it has
    /// (the worker died, or hangs, and its jobs await recovery).
    pub heartbeat_left_ms: i64,
    /// The job IDs in its in-flight list.
    pub in_flight: u64,
}

/// Reads the overview of the queue of `keys`, in `mode`.
///
/// The counts are read in one transaction (MULTI/EXEC, on the queue's
/// primary), so that a job moving from one state to another is counted
/// once; only the list of reliable workers is read just before.
pub(crate) async fn read(con: &Conn, keys: &QueueKeys, mode: Mode) -> Result<QueueOverview, Error> {
    let workers: Vec<(String, f64)> = if mode == Mode::Reliable {
        redis::cmd("ZRANGE")
            .arg(keys.workers())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut con.clone())
            .await
            .map_err(|e| wrong_type(e, keys))?
    } else {
        Vec::new()
    };
    let mut fields = vec!["mode", "protocol", "created_ms"];
    fields.extend(QueueControls::FIELDS);
    let mut pipe = redis::pipe();
    pipe.atomic();
    pipe.cmd("HMGET").arg(keys.meta()).arg(&fields);
    pipe.cmd("TIME");
    pipe.cmd("LLEN").arg(keys.pending());
    pipe.cmd("ZCARD").arg(keys.delayed());
    match mode {
        Mode::Simple => pipe.cmd("LLEN").arg(keys.dead()),
        _ => pipe.cmd("ZCARD").arg(keys.dead_jobs()),
    };
    pipe.cmd("ZCARD").arg(keys.leases());
    pipe.cmd("LINDEX").arg(keys.pending()).arg(-1);
    pipe.cmd("ZCARD").arg(keys.schedules());
    for (id, _) in &workers {
        pipe.cmd("LLEN").arg(keys.inflight(id));
    }
    let mut values: Vec<Value> = pipe
        .query_async(&mut con.clone())
        .await
        .map_err(|e| wrong_type(e, keys))?;
    let lens = values.split_off(values.len().min(8));
    let [
        meta,
        time,
        waiting,
        delayed,
        dead,
        leases,
        oldest,
        schedules,
    ] = <[Value; 8]>::try_from(values).map_err(|v| decode(format!("{} replies", v.len())))?;

    let meta: Vec<Option<String>> =
        redis::from_redis_value(meta).map_err(|e| decode(e.to_string()))?;
    let text = |i: usize| meta.get(i).cloned().flatten();
    let controls = QueueControls::from_fields(meta.get(3..).unwrap_or_default());
    let (secs, micros): (u64, u64) =
        redis::from_redis_value(time).map_err(|e| decode(e.to_string()))?;
    let now_ms = secs * 1000 + micros / 1000;
    let count = |v: Value| redis::from_redis_value::<u64>(v).map_err(|e| decode(e.to_string()));
    let (waiting, delayed, dead, leases, schedules) = (
        count(waiting)?,
        count(delayed)?,
        count(dead)?,
        count(leases)?,
        count(schedules)?,
    );
    let mut infos = Vec::with_capacity(workers.len());
    for ((id, deadline), len) in workers.into_iter().zip(lens) {
        infos.push(WorkerInfo {
            id,
            heartbeat_left_ms: deadline as i64 - now_ms as i64,
            in_flight: count(len)?,
        });
    }
    let active = match mode {
        Mode::Simple => None,
        Mode::Recoverable => Some(leases),
        Mode::Reliable => Some(infos.iter().map(|w| w.in_flight).sum()),
    };

    let oldest_waiting_age_ms = match (mode, oldest) {
        (Mode::Simple, _) | (_, Value::Nil) => None,
        (_, id) => {
            let id: Vec<u8> = redis::from_redis_value(id).map_err(|e| decode(e.to_string()))?;
            let submitted: Option<String> = redis::cmd("HGET")
                .arg(keys.job_bytes(&id))
                .arg("submitted_ms")
                .query_async(&mut con.clone())
                .await
                .ok()
                .flatten();
            crate::wire::lenient_u64(submitted.as_deref()).map(|at| now_ms.saturating_sub(at))
        }
    };

    Ok(QueueOverview {
        name: keys.queue().to_owned(),
        mode: text(0).unwrap_or_default(),
        protocol: text(1).unwrap_or_default(),
        created_ms: crate::wire::lenient_u64(text(2).as_deref()),
        now_ms,
        counts: StateCounts {
            waiting,
            delayed,
            active,
            dead,
        },
        oldest_waiting_age_ms,
        workers: infos,
        paused: controls.paused,
        rate_max: controls.rate.map(|r| r.max),
        rate_window_ms: controls.rate.map(|r| r.per.as_millis() as u64),
        concurrency_limit: controls.concurrency,
        events: controls.events,
        schedules,
    })
}

/// A reply that did not have the shape the protocol gives it.
pub(super) fn decode(message: String) -> Error {
    Error::Decode {
        what: "queue overview",
        message,
    }
}

/// Maps a failed read of the queue's keys with the crate's one mapping
/// ([`crate::error::on_key`]): a WRONGTYPE reply to a pipeline names no
/// key, so the error names the queue's keys as a pattern.
pub(super) fn wrong_type(e: redis::RedisError, keys: &QueueKeys) -> Error {
    crate::error::on_key(e, &keys.pattern(), "its protocol type")
}
