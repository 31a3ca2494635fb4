//! One Rust function per Lua script, in the order of `lua/`'s contracts:
//! each builds the script's KEYS and ARGV from a [`QueueKeys`] and parses its
//! reply. Nothing else in the crate calls a script directly.

use std::time::Duration;

use crate::connection::Conn;
use redis::Value;

use crate::error::{Error, from_script};
use crate::keys::QueueKeys;
use crate::mode::{Mode, PROTOCOL_VERSION};
use crate::scripts::{self, Call, Name};

/// How a doorbell or reply is published: sharded pub/sub on a cluster.
fn notify(sharded: bool) -> &'static str {
    if sharded { "spublish" } else { "publish" }
}

/// The longest duration a script accepts, in ms (protocol.md, "Numbers").
pub(crate) const MAX_MS: u128 = 1_000_000_000_000;
/// The largest count, max stalls or max attempts a script accepts.
pub(crate) const MAX_COUNT: u64 = 1_000_000;
/// The largest dead-letter maximum a script accepts.
pub(crate) const MAX_DEAD: u64 = 1_000_000_000;

/// True when `d` is a duration scripts accept: from `min_ms` to [`MAX_MS`]
/// whole ms.
pub(crate) fn ms_in_range(d: Duration, min_ms: u128) -> bool {
    (min_ms..=MAX_MS).contains(&d.as_millis())
}

/// A duration as scripts take it: whole ms, from 1 to [`MAX_MS`] (settings
/// are checked against that range when they are made; derived durations
/// are clamped).
fn ms(d: Duration) -> String {
    d.as_millis().clamp(1, MAX_MS).to_string()
}

/// Runs `call`, mapping refusals to typed errors.
pub(crate) async fn run<T: redis::FromRedisValue>(
    con: &Conn,
    call: &Call,
    keys: &QueueKeys,
    job_id: Option<&str>,
) -> Result<T, Error> {
    call.invoke(&mut con.clone()).await.map_err(|e| match e {
        Error::Redis(e) => from_script(e, call.script().name(), keys.queue(), job_id),
        other => other,
    })
}

/// `queue_register`: records or checks the queue's mode and protocol version.
/// Returns true when this call created the record.
pub(crate) async fn queue_register(
    con: &Conn,
    keys: &QueueKeys,
    mode: Mode,
) -> Result<bool, Error> {
    let call = scripts::get(Name::QueueRegister)
        .call()
        .key(keys.meta())
        .arg(mode.as_str())
        .arg(PROTOCOL_VERSION.to_string());
    Ok(run::<i64>(con, &call, keys, None).await? == 1)
}

/// When a job is due: at once, after a delay, or at a time (ms since the
/// Unix epoch, compared with the server's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Due {
    #[default]
    Now,
    After(Duration),
    At(u64),
}

impl Due {
    /// The scripts' two arguments: delay ms and run at ms.
    fn args(self) -> (String, String) {
        match self {
            Due::Now => ("0".into(), "0".into()),
            Due::After(d) => (d.as_millis().min(MAX_MS).to_string(), "0".into()),
            Due::At(ms) => ("0".into(), ms.clamp(1, MAX_RUN_AT).to_string()),
        }
    }
}

/// The latest run at time scripts accept, in ms since the Unix epoch.
pub(crate) const MAX_RUN_AT: u64 = 999_999_999_999_999;

/// `simple_submit`: pushes job envelopes, or delays them all until `due`.
pub(crate) fn simple_submit(keys: &QueueKeys, due: Due, envelopes: &[Vec<u8>]) -> Call {
    let (delay, run_at) = due.args();
    let mut call = scripts::get(Name::SimpleSubmit)
        .call()
        .key(keys.meta())
        .key(keys.pending())
        .key(keys.delayed())
        .key(keys.clock())
        .arg(Mode::Simple.as_str())
        .arg(PROTOCOL_VERSION.to_string())
        .arg(delay)
        .arg(run_at);
    for e in envelopes {
        call = call.arg(e);
    }
    call
}

/// `simple_reply`: publishes an outcome message (sharded on a cluster).
pub(crate) fn simple_reply(keys: &QueueKeys, channel: &str, message: &[u8], sharded: bool) -> Call {
    scripts::get(Name::SimpleReply)
        .call()
        .key(keys.meta())
        .arg(channel)
        .arg(message)
        .arg(notify(sharded))
}

/// `simple_requeue`: gives popped, unstarted envelopes back.
pub(crate) fn simple_requeue(keys: &QueueKeys, envelopes: &[Vec<u8>]) -> Call {
    let mut call = scripts::get(Name::SimpleRequeue).call().key(keys.pending());
    for e in envelopes {
        call = call.arg(e);
    }
    call
}

/// `simple_dead`: keeps an entry that is not a job.
pub(crate) fn simple_dead(keys: &QueueKeys, record: &[u8], max: usize) -> Call {
    scripts::get(Name::SimpleDead)
        .call()
        .key(keys.dead())
        .arg(record)
        .arg(max.to_string())
}

/// A job to store with `job_submit`.
pub(crate) struct NewJob<'a> {
    pub id: &'a str,
    pub enc: &'static str,
    pub payload: &'a [u8],
    /// The client to notify ("" for none).
    pub client: &'a str,
    pub lease: Option<Duration>,
    pub max_attempts: u32,
    /// How long the handler may run (`None`: the worker's default).
    pub timeout: Option<Duration>,
    pub due: Due,
    /// The retry backoff policy, in its wire form (`""`: none).
    pub backoff: String,
    /// The unique key, in its wire form `<mode>:<ttl ms>:<key>` (`None`:
    /// none), and the key itself.
    pub unique: Option<(String, &'a str)>,
}

/// `job_submit`: stores jobs and queues their IDs.
pub(crate) fn job_submit(keys: &QueueKeys, mode: Mode, jobs: &[NewJob<'_>]) -> Call {
    let mut call = scripts::get(Name::JobSubmit)
        .call()
        .key(keys.meta())
        .key(keys.pending())
        .key(keys.tickets())
        .key(keys.delayed())
        .key(keys.clock())
        .key(keys.events())
        .arg(mode.as_str())
        .arg(PROTOCOL_VERSION.to_string());
    for job in jobs {
        call = call.key(keys.job(job.id));
    }
    for (_, key) in jobs.iter().filter_map(|j| j.unique.as_ref()) {
        call = call.key(keys.unique(key));
    }
    for job in jobs {
        call = call
            .arg(job.id)
            .arg(job.enc)
            .arg(job.payload)
            .arg(job.client)
            .arg(job.lease.map_or_else(|| "0".to_owned(), ms))
            .arg(job.max_attempts.max(1).to_string())
            .arg(job.timeout.map_or_else(|| "0".to_owned(), ms));
        let (delay, run_at) = job.due.args();
        call = call.arg(delay).arg(run_at).arg(&job.backoff);
        call = call.arg(job.unique.as_ref().map_or("", |(wire, _)| wire.as_str()));
    }
    call
}

/// The jobs of a `job_submit` call that were not enqueued because another
/// job holds their unique key: (index in the call, the holder's ID). The
/// reply is the pending list's length (an integer) when none was refused,
/// else an array of that length and (index, holder) pairs.
pub(crate) fn submit_refusals(reply: &Value) -> Result<Vec<(usize, String)>, Error> {
    let bad = || Error::Decode {
        what: "job_submit reply",
        message: format!("{reply:?}"),
    };
    let items = match reply {
        Value::Int(_) => return Ok(Vec::new()),
        Value::Array(items) => items,
        _ => return Err(bad()),
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    items
        .get(1..)
        .unwrap_or_default()
        .chunks(2)
        .map(|pair| match pair {
            [index, holder] => {
                let index: usize = text(index).and_then(|i| i.parse().ok()).ok_or_else(bad)?;
                let holder = text(holder).ok_or_else(bad)?;
                index.checked_sub(1).map(|i| (i, holder)).ok_or_else(bad)
            }
            _ => Err(bad()),
        })
        .collect()
}

/// What `job_promote` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Promoted {
    /// Jobs moved to pending.
    pub moved: usize,
    /// How long until the earliest job still delayed is due (`None`: none).
    pub next_in: Option<Duration>,
    /// True when the caller is the queue's timekeeper.
    pub keeper: bool,
    /// How long until the earliest schedule is due (`None`: none; zero:
    /// due now).
    pub schedule_in: Option<Duration>,
    /// The server's time, in ms since the Unix epoch.
    pub now_ms: u64,
}

/// `job_promote`: moves up to `limit` due delayed jobs to pending, and takes
/// or renews the timekeeper lease for `keeper` (`None`: gives it up).
pub(crate) async fn job_promote(
    con: &Conn,
    keys: &QueueKeys,
    mode: Mode,
    worker_id: &str,
    limit: usize,
    keeper: Option<Duration>,
) -> Result<Promoted, Error> {
    let call = scripts::get(Name::JobPromote)
        .call()
        .key(keys.meta())
        .key(keys.delayed())
        .key(keys.pending())
        .key(keys.tickets())
        .key(keys.timekeeper())
        .key(keys.clock())
        .key(keys.schedules())
        .arg(mode.as_str())
        .arg(PROTOCOL_VERSION.to_string())
        .arg(worker_id)
        .arg(limit.to_string())
        .arg(keeper.map_or_else(|| "0".to_owned(), ms));
    let (moved, next_in, keeper, schedule_in, now_ms): (i64, i64, i64, i64, i64) =
        run(con, &call, keys, None).await?;
    Ok(Promoted {
        moved: usize::try_from(moved).unwrap_or(0),
        next_in: u64::try_from(next_in).ok().map(Duration::from_millis),
        keeper: keeper == 1,
        schedule_in: u64::try_from(schedule_in).ok().map(Duration::from_millis),
        now_ms: u64::try_from(now_ms).unwrap_or(0),
    })
}

/// `schedule_set`: records a schedule (its definition, in wire form, and its
/// first fire).
pub(crate) async fn schedule_set(
    con: &Conn,
    keys: &QueueKeys,
    mode: Mode,
    name: &str,
    record: &crate::schedule::Record<'_>,
) -> Result<bool, Error> {
    let call = scripts::get(Name::ScheduleSet)
        .call()
        .key(keys.meta())
        .key(keys.schedules())
        .key(keys.schedule(name))
        .key(keys.clock())
        .arg(mode.as_str())
        .arg(PROTOCOL_VERSION.to_string())
        .arg(name)
        .arg(record.spec.as_str())
        .arg(record.tz)
        .arg(record.missed)
        .arg(ms(record.grace))
        .arg(record.next_ms.to_string())
        .arg(record.enc)
        .arg(record.payload)
        .arg(record.lease.map_or_else(|| "0".to_owned(), ms))
        .arg(record.max_attempts.max(1).to_string())
        .arg(record.timeout.map_or_else(|| "0".to_owned(), ms))
        .arg(record.backoff.as_str());
    Ok(run::<String>(con, &call, keys, None).await? == "created")
}

/// What `schedule_fire` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FireOutcome {
    /// The job was queued (its ID).
    Submitted(String),
    /// Moved on without a job: missed and skipped, or its job existed.
    MovedOn,
    /// Another worker fired it, or it was changed, meanwhile; or it is gone
    /// (its entry was dropped).
    Moved,
    /// Not due by the server's clock: nothing changed.
    Early,
}

/// `schedule_fire`: fires schedule `name` due at `due_ms` (the record's
/// `next_ms` exactly as read), moving it to `next_ms` (the fire after it),
/// or to `resume_ms` (the first fire after now) when the fire was missed.
pub(crate) async fn schedule_fire(
    con: &Conn,
    keys: &QueueKeys,
    mode: Mode,
    name: &str,
    (due_ms, next_ms, resume_ms): (&str, u64, u64),
) -> Result<FireOutcome, Error> {
    let id = format!("{name}@{due_ms}");
    let call = scripts::get(Name::ScheduleFire)
        .call()
        .key(keys.meta())
        .key(keys.schedules())
        .key(keys.schedule(name))
        .key(keys.pending())
        .key(keys.tickets())
        .key(keys.job(&id))
        .key(keys.events())
        .arg(mode.as_str())
        .arg(PROTOCOL_VERSION.to_string())
        .arg(name)
        .arg(due_ms)
        .arg(next_ms.to_string())
        .arg(resume_ms.to_string());
    let (outcome, job): (String, String) = run(con, &call, keys, None).await?;
    Ok(match outcome.as_str() {
        "fired" => FireOutcome::Submitted(job),
        "skipped" | "duplicate" => FireOutcome::MovedOn,
        "early" => FireOutcome::Early,
        _ => FireOutcome::Moved,
    })
}

/// `schedule_remove`: true when the schedule existed.
pub(crate) async fn schedule_remove(
    con: &Conn,
    keys: &QueueKeys,
    name: &str,
) -> Result<bool, Error> {
    let call = scripts::get(Name::ScheduleRemove)
        .call()
        .key(keys.schedules())
        .key(keys.schedule(name))
        .arg(name);
    Ok(run::<i64>(con, &call, keys, None).await? == 1)
}

/// A claimed job: its ID as stored (bytes: another program may have queued
/// an ID that is not UTF-8; the start script refuses to run such an ID) and
/// its fencing token.
pub(crate) type Claim = (Vec<u8>, String);

/// Why a queue's gate (protocol.md 8.9) held jobs back, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hold {
    /// `paused`, `concurrency` or `rate`.
    pub reason: String,
    /// For the rate: when one more start may pass. `None`: until the gate
    /// list is pushed.
    pub wait: Option<Duration>,
}

impl Hold {
    fn parse(reason: &[u8], wait: &[u8]) -> Option<Hold> {
        if reason.is_empty() {
            return None;
        }
        let wait = std::str::from_utf8(wait)
            .ok()
            .and_then(|w| w.parse::<u64>().ok())
            .map(Duration::from_millis);
        Some(Hold {
            reason: String::from_utf8_lossy(reason).into_owned(),
            wait,
        })
    }
}

/// What `job_claim` took.
pub(crate) struct Claimed {
    /// (id, fencing token) pairs.
    pub jobs: Vec<Claim>,
    /// Set when the gate held back jobs that wait.
    pub hold: Option<Hold>,
    /// The queue has a concurrency limit (passed on to `job_start`).
    pub limited: bool,
}

/// `job_claim`: takes up to `count` IDs with provisional leases, as far as
/// the queue's gate lets it. `held`: this worker's last call on the queue
/// was held back.
pub(crate) async fn job_claim(
    con: &Conn,
    keys: &QueueKeys,
    count: usize,
    lease: Duration,
    (tickets_taken, held): (usize, bool),
) -> Result<Claimed, Error> {
    let call = scripts::get(Name::JobClaim)
        .call()
        .key(keys.pending())
        .key(keys.tickets())
        .key(keys.leases())
        .key(keys.fence())
        .key(keys.meta())
        .key(keys.rate())
        .key(keys.gate())
        .arg(count.to_string())
        .arg(ms(lease))
        .arg(tickets_taken.to_string())
        .arg(flag(held));
    let flat: Vec<Vec<u8>> = run(con, &call, keys, None).await?;
    if flat.len() < 3 || flat.len().is_multiple_of(2) {
        return Err(Error::Decode {
            what: "job_claim reply",
            message: format!("{} elements", flat.len()),
        });
    }
    Ok(Claimed {
        hold: Hold::parse(&flat[0], &flat[1]),
        limited: flat[2] == b"1",
        jobs: flat[3..]
            .chunks_exact(2)
            .map(|p| (p[0].clone(), String::from_utf8_lossy(&p[1]).into_owned()))
            .collect(),
    })
}

/// A boolean script argument.
fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

/// Settings `job_start` needs from the worker.
pub(crate) struct StartSettings<'a> {
    pub lease: Duration,
    pub max_stalls: u32,
    pub worker_id: &'a str,
    pub result_ttl: Duration,
    pub dead_max: usize,
    /// Publish doorbells with sharded pub/sub (on a cluster).
    pub sharded: bool,
}

/// What `job_start` decided.
pub(crate) enum Start {
    /// Run it.
    Run {
        enc: String,
        payload: Vec<u8>,
        attempt: u32,
        /// Recoverable mode: the lease `job_start` set (the job's own, or
        /// the worker's default), which the heartbeat must renew in time.
        lease: Option<Duration>,
        /// The job's own handler timeout (`None`: the worker's default).
        timeout: Option<Duration>,
    },
    /// It stalled too often and is now dead.
    Dead,
    /// Finished, missing, or owned by a newer claim: do not run.
    Skip(String),
    /// Reliable mode, taken from the pending list: another worker took it
    /// first. Not ours: do not run.
    Missed,
    /// Reliable mode: the queue's gate held it back (it waits on the
    /// pending list).
    Held(Hold),
}

/// `job_start`: marks claimed jobs of one queue active under their claims'
/// tokens, all in one call. `claims` are (id, token) pairs from `job_claim`;
/// the decisions come back in the same order.
pub(crate) async fn job_start(
    con: &Conn,
    keys: &QueueKeys,
    (claims, limited): (&[Claim], bool),
    settings: &StartSettings<'_>,
) -> Result<Vec<Start>, Error> {
    let mut call = scripts::get(Name::JobStart)
        .call()
        .key(keys.leases())
        .key(keys.dead_jobs())
        .key(keys.events())
        .arg(ms(settings.lease))
        .arg(settings.max_stalls.to_string())
        .arg(settings.worker_id)
        .arg(ms(settings.result_ttl))
        .arg(settings.dead_max.to_string())
        .arg(notify(settings.sharded))
        .arg(flag(limited));
    for (id, token) in claims {
        call = call.key(keys.job_bytes(id)).arg(id).arg(token);
    }
    let lone = match claims {
        [(id, _)] => std::str::from_utf8(id).ok(),
        _ => None,
    };
    let replies: Vec<Vec<Vec<u8>>> = run(con, &call, keys, lone).await?;
    one_per_job(&replies, claims.len(), "job_start reply")?;
    Ok(replies.iter().map(|r| parse_start(r, true)).collect())
}

/// Parses the reply of `job_start` or `reliable_start`.
/// Checks that a batch script answered once per job.
fn one_per_job<T>(replies: &[T], jobs: usize, what: &'static str) -> Result<(), Error> {
    if replies.len() == jobs {
        return Ok(());
    }
    Err(Error::Decode {
        what,
        message: format!("{} decisions for {jobs} jobs", replies.len()),
    })
}

fn parse_start(reply: &[Vec<u8>], sixth_is_lease: bool) -> Start {
    let text = |i: usize| {
        String::from_utf8_lossy(reply.get(i).map_or(&[][..], |v| v.as_slice())).into_owned()
    };
    let number = |i: usize| text(i).parse::<u64>().unwrap_or(0);
    match text(0).as_str() {
        "run" => Start::Run {
            enc: text(1),
            payload: reply.get(2).cloned().unwrap_or_default(),
            attempt: number(3) as u32,
            // Careful: the sixth element is the lease in job_start's
            // decisions and the token in reliable_start's.
            lease: (sixth_is_lease && number(5) > 0).then(|| Duration::from_millis(number(5))),
            timeout: (number(6) > 0).then(|| Duration::from_millis(number(6))),
        },
        "dead" => Start::Dead,
        "lost" => Start::Skip("a newer claim owns it".into()),
        "missed" => Start::Missed,
        "held" => Start::Held(
            Hold::parse(
                reply.get(1).map_or(&b"held"[..], |v| v.as_slice()),
                reply.get(2).map_or(&[][..], |v| v.as_slice()),
            )
            .unwrap_or(Hold {
                reason: "held".into(),
                wait: None,
            }),
        ),
        _ => Start::Skip(format!("it is {}", text(1))),
    }
}

/// How a job ended, for `job_finish`.
pub(crate) enum Finish<'a> {
    Completed(&'a [u8]),
    Failed {
        kind: &'a str,
        message: &'a str,
        retry: bool,
        /// The delay the handler asked for (`None`: the job's backoff).
        retry_delay: Option<Duration>,
    },
}

/// Where a running job's claim is recorded: the queue's lease set
/// (recoverable mode) or the worker's in-flight list (reliable mode).
pub(crate) fn claim_key(keys: &QueueKeys, mode: Mode, worker_id: &str) -> String {
    match mode {
        Mode::Reliable => keys.inflight(worker_id),
        _ => keys.leases(),
    }
}

/// `job_finish`: records an outcome under the job's fencing token.
pub(crate) fn job_finish(
    keys: &QueueKeys,
    mode: Mode,
    claim: &str,
    (id, token): (&str, &str),
    finish: &Finish<'_>,
    result_ttl: Duration,
    sharded: bool,
) -> Call {
    let call = scripts::get(Name::JobFinish)
        .call()
        .key(keys.job(id))
        .key(claim)
        .key(keys.pending())
        .key(keys.tickets())
        .key(keys.delayed())
        .key(keys.clock())
        .key(keys.running())
        .key(keys.gate())
        .key(keys.events())
        .arg(id)
        .arg(token);
    outcome_args(call, finish)
        .arg(ms(result_ttl))
        .arg(mode.as_str())
        .arg(notify(sharded))
        .arg(retry_delay_arg(finish))
}

/// One job of a `job_finish_batch` call.
pub(crate) struct BatchItem {
    pub id: String,
    pub token: String,
    pub finish: OwnedFinish,
}

/// How a job ended, owned (for `job_finish_batch`).
pub(crate) enum OwnedFinish {
    Completed(Vec<u8>),
    Failed {
        kind: String,
        message: String,
        retry: bool,
        /// The delay the handler asked for (`None`: the job's backoff).
        retry_delay: Option<Duration>,
    },
}

impl OwnedFinish {
    /// True when `state` is a state `job_finish` leaves a job in for this
    /// outcome (a retryable failure may be queued again).
    pub(crate) fn leaves_state(&self, state: &str) -> bool {
        match self {
            OwnedFinish::Completed(_) => state == "completed",
            OwnedFinish::Failed { retry, .. } => state == "failed" || (*retry && state == "queued"),
        }
    }

    pub(crate) fn borrowed(&self) -> Finish<'_> {
        match self {
            OwnedFinish::Completed(result) => Finish::Completed(result),
            OwnedFinish::Failed {
                kind,
                message,
                retry,
                retry_delay,
            } => Finish::Failed {
                kind,
                message,
                retry: *retry,
                retry_delay: *retry_delay,
            },
        }
    }
}

/// The four outcome arguments of `job_finish` (status, result or kind,
/// message, retry), also used per job by `job_finish_batch`.
fn outcome_args(call: Call, finish: &Finish<'_>) -> Call {
    match finish {
        Finish::Completed(result) => call.arg("completed").arg(result).arg("").arg("0"),
        Finish::Failed {
            kind,
            message,
            retry,
            ..
        } => call
            .arg("failed")
            .arg(kind)
            .arg(message)
            .arg(if *retry { "1" } else { "0" }),
    }
}

/// The retry delay argument of `job_finish` (ARGV[10]) and of each job of
/// `job_finish_batch`: `-1` lets the job's backoff decide.
fn retry_delay_arg(finish: &Finish<'_>) -> String {
    match finish {
        Finish::Failed {
            retry_delay: Some(delay),
            ..
        } => delay.as_millis().min(MAX_MS).to_string(),
        _ => "-1".to_owned(),
    }
}

/// `job_finish_batch`: records the outcomes of several jobs of one queue in
/// one call. Parse its reply with [`finish_batch_results`].
pub(crate) fn job_finish_batch(
    keys: &QueueKeys,
    (mode, claim): (Mode, &str),
    items: &[BatchItem],
    result_ttl: Duration,
    sharded: bool,
) -> Call {
    let mut call = scripts::get(Name::JobFinishBatch)
        .call()
        .key(claim)
        .key(keys.pending())
        .key(keys.tickets())
        .key(keys.delayed())
        .key(keys.clock())
        .key(keys.running())
        .key(keys.gate())
        .key(keys.events())
        .arg(ms(result_ttl))
        .arg(mode.as_str())
        .arg(notify(sharded));
    for item in items {
        let finish = item.finish.borrowed();
        call = call.key(keys.job(&item.id)).arg(&item.id).arg(&item.token);
        call = outcome_args(call, &finish).arg(retry_delay_arg(&finish));
    }
    call
}

/// Per job of a `job_finish_batch` reply: its new state, or the typed
/// refusal `job_finish` would have returned.
pub(crate) fn finish_batch_results(
    keys: &QueueKeys,
    items: &[BatchItem],
    replies: Vec<String>,
) -> Result<Vec<Result<String, Error>>, Error> {
    one_per_job(&replies, items.len(), "job_finish_batch reply")?;
    Ok(items
        .iter()
        .zip(replies)
        .map(|(item, reply)| match reply.split_once(' ') {
            Some((code, detail)) if code.starts_with("JQ_") => Err(crate::error::from_code(
                code,
                detail,
                "job_finish_batch",
                keys.queue(),
                Some(&item.id),
            )),
            _ => Ok(reply),
        })
        .collect())
}

/// `job_release`: gives a running job back to its queue unfinished.
pub(crate) fn job_release(
    keys: &QueueKeys,
    mode: Mode,
    claim: &str,
    id: &str,
    token: &str,
) -> Call {
    scripts::get(Name::JobRelease)
        .call()
        .key(keys.job(id))
        .key(claim)
        .key(keys.pending())
        .key(keys.tickets())
        .key(keys.running())
        .key(keys.gate())
        .arg(id)
        .arg(token)
        .arg(mode.as_str())
}

/// `job_extend`: renews the leases of running jobs. Returns the IDs that
/// were lost.
pub(crate) async fn job_extend(
    con: &Conn,
    keys: &QueueKeys,
    lease: Duration,
    jobs: &[(String, String)],
) -> Result<Vec<String>, Error> {
    let mut call = scripts::get(Name::JobExtend)
        .call()
        .key(keys.leases())
        .arg(ms(lease));
    for (id, token) in jobs {
        call = call.key(keys.job(id)).arg(id).arg(token);
    }
    run(con, &call, keys, None).await
}

/// `job_requeue_stale`: requeues jobs whose leases ran out. Returns how many,
/// or `None` when another worker holds the sweep guard.
pub(crate) async fn job_requeue_stale(
    con: &Conn,
    keys: &QueueKeys,
    guard: Duration,
    limit: usize,
) -> Result<Option<u64>, Error> {
    let call = scripts::get(Name::JobRequeueStale)
        .call()
        .key(keys.leases())
        .key(keys.pending())
        .key(keys.tickets())
        .key(keys.sweep())
        .key(keys.gate())
        .arg(ms(guard))
        .arg(limit.to_string());
    let n: i64 = run(con, &call, keys, None).await?;
    Ok(u64::try_from(n).ok())
}

/// What `job_watch` saw.
pub(crate) enum Watch {
    /// No such job.
    Missing,
    /// Not finished; the state.
    Waiting,
    /// Completed: encoding and result bytes.
    Completed { enc: String, result: Vec<u8> },
    /// Failed or dead: state, error kind and message.
    Failed { kind: String, message: String },
}

/// `job_watch`: reads a job's outcome, or points its doorbell at `channel`.
pub(crate) async fn job_watch(
    con: &Conn,
    keys: &QueueKeys,
    id: &str,
    channel: &str,
) -> Result<Watch, Error> {
    let call = scripts::get(Name::JobWatch)
        .call()
        .key(keys.job(id))
        .arg(channel);
    let reply: Vec<Value> = run(con, &call, keys, Some(id)).await?;
    let text = |i: usize| match reply.get(i) {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    };
    Ok(match text(0).as_str() {
        "missing" => Watch::Missing,
        "completed" => Watch::Completed {
            enc: text(1),
            result: match reply.get(2) {
                Some(Value::BulkString(b)) => b.clone(),
                _ => Vec::new(),
            },
        },
        "failed" | "dead" => Watch::Failed {
            kind: text(1),
            message: text(2),
        },
        _ => Watch::Waiting,
    })
}

/// Where the IDs given to `reliable_start` are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// Already in the worker's in-flight list (moved there by BLMOVE).
    InFlight,
    /// At the tail of the pending list, oldest first: the script moves them.
    Pending,
}

/// `reliable_start`: issues tokens and marks jobs active, all in one call,
/// taking them from the pending list first when `source` says so. Returns,
/// in the order of `ids`, each decision and (for a job to run) its fencing
/// token.
pub(crate) async fn reliable_start(
    con: &Conn,
    keys: &QueueKeys,
    (source, ids, held): (Source, &[Vec<u8>], bool),
    settings: &StartSettings<'_>,
) -> Result<Vec<(Start, String)>, Error> {
    let mut call = scripts::get(Name::ReliableStart)
        .call()
        .key(keys.inflight(settings.worker_id))
        .key(keys.dead_jobs())
        .key(keys.fence())
        .key(keys.pending())
        .key(keys.meta())
        .key(keys.running())
        .key(keys.rate())
        .key(keys.gate())
        .key(keys.events())
        .arg(settings.max_stalls.to_string())
        .arg(settings.worker_id)
        .arg(ms(settings.result_ttl))
        .arg(settings.dead_max.to_string())
        .arg(notify(settings.sharded))
        .arg(match source {
            Source::InFlight => "inflight",
            Source::Pending => "pending",
        })
        .arg(flag(held));
    for id in ids {
        call = call.key(keys.job_bytes(id)).arg(id);
    }
    let lone = match ids {
        [id] => std::str::from_utf8(id).ok(),
        _ => None,
    };
    let replies: Vec<Vec<Vec<u8>>> = run(con, &call, keys, lone).await?;
    one_per_job(&replies, ids.len(), "reliable_start reply")?;
    Ok(replies
        .iter()
        .map(|reply| {
            let token = reply
                .get(5)
                .map(|t| String::from_utf8_lossy(t).into_owned())
                .unwrap_or_default();
            (parse_start(reply, false), token)
        })
        .collect())
}

/// `reliable_heartbeat`: keeps the worker (and so its jobs) alive for `ttl`.
/// Returns false when the worker was not registered as alive.
pub(crate) async fn reliable_heartbeat(
    con: &Conn,
    keys: &QueueKeys,
    worker_id: &str,
    ttl: Duration,
) -> Result<bool, Error> {
    let call = scripts::get(Name::ReliableHeartbeat)
        .call()
        .key(keys.workers())
        .arg(worker_id)
        .arg(ms(ttl));
    Ok(run::<i64>(con, &call, keys, None).await? == 1)
}

/// `reliable_find_dead`: workers whose heartbeat expired, or `None` when
/// another worker holds the recovery guard. Worker IDs are bytes: the set
/// may hold members another program wrote.
pub(crate) async fn reliable_find_dead(
    con: &Conn,
    keys: &QueueKeys,
    guard: Duration,
    limit: usize,
) -> Result<Option<Vec<Vec<u8>>>, Error> {
    let call = scripts::get(Name::ReliableFindDead)
        .call()
        .key(keys.workers())
        .key(keys.sweep())
        .arg(ms(guard))
        .arg(limit.to_string());
    match run::<Value>(con, &call, keys, None).await? {
        Value::Int(_) => Ok(None),
        other => Ok(Some(
            redis::from_redis_value(other).map_err(|e| Error::Redis(e.into()))?,
        )),
    }
}

/// `reliable_requeue_worker`: moves a worker's in-flight IDs back to the
/// queue. `only_if_dead`: refuse (`None`) when its heartbeat is alive.
pub(crate) async fn reliable_requeue_worker(
    con: &Conn,
    keys: &QueueKeys,
    worker_id: &[u8],
    only_if_dead: bool,
    retention: Duration,
) -> Result<Option<u64>, Error> {
    let call = scripts::get(Name::ReliableRequeueWorker)
        .call()
        .key(keys.workers())
        .key(keys.inflight_bytes(worker_id))
        .key(keys.pending())
        .key(keys.running())
        .key(keys.gate())
        .arg(worker_id)
        .arg(if only_if_dead { "1" } else { "0" })
        .arg(ms(retention));
    let n: i64 = run(con, &call, keys, None).await?;
    Ok(u64::try_from(n).ok())
}

/// `queue_control`: sets (`Some`) or clears (`None`) a queue's controls
/// (`paused`, `rate`, `concurrency`; protocol.md 8.9). Returns their
/// previous values, in order (`None`: not set).
pub(crate) async fn queue_control(
    con: &Conn,
    keys: &QueueKeys,
    mode: Mode,
    changes: &[(&str, Option<String>)],
) -> Result<Vec<Option<String>>, Error> {
    let mut call = scripts::get(Name::QueueControl)
        .call()
        .key(keys.meta())
        .key(keys.gate())
        .arg(mode.as_str())
        .arg(PROTOCOL_VERSION.to_string());
    for (field, value) in changes {
        call = call.arg(*field).arg(value.as_deref().unwrap_or(""));
    }
    let previous: Vec<String> = run(con, &call, keys, None).await?;
    Ok(previous
        .into_iter()
        .map(|v| (!v.is_empty()).then_some(v))
        .collect())
}

/// What `job_cancel` did to one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cancel {
    /// Cancelled now; it was `queued` (or delayed) or `active`.
    Cancelled(String),
    /// It had finished already, in this state.
    Finished(String),
    /// No such job.
    Missing,
    /// The job key holds another Redis type.
    NotAHash,
}

/// `job_cancel`: cancels jobs of one queue; one decision per ID.
pub(crate) async fn job_cancel(
    con: &Conn,
    keys: &QueueKeys,
    mode: Mode,
    ids: &[&str],
    (message, result_ttl): (&str, Duration),
) -> Result<Vec<Cancel>, Error> {
    let mut call = scripts::get(Name::JobCancel)
        .call()
        .key(keys.delayed())
        .key(keys.leases())
        .key(keys.running())
        .key(keys.gate())
        .key(keys.events())
        .arg(mode.as_str())
        .arg(ms(result_ttl))
        .arg(notify(con.is_cluster()))
        .arg(message);
    for id in ids {
        call = call.key(keys.job(id)).arg(*id);
    }
    let lone = match ids {
        [id] => Some(*id),
        _ => None,
    };
    let replies: Vec<Vec<String>> = run(con, &call, keys, lone).await?;
    one_per_job(&replies, ids.len(), "job_cancel reply")?;
    Ok(replies
        .into_iter()
        .map(|r| {
            let second = r.get(1).cloned().unwrap_or_default();
            match r.first().map(String::as_str) {
                Some("cancelled") => Cancel::Cancelled(second),
                Some("missing") => Cancel::Missing,
                Some("not a hash") => Cancel::NotAHash,
                _ => Cancel::Finished(second),
            }
        })
        .collect())
}

/// `job_progress`: records a running job's progress under its token.
pub(crate) fn job_progress(
    keys: &QueueKeys,
    (id, token): (&str, &str),
    progress: &[u8],
    sharded: bool,
) -> Call {
    scripts::get(Name::JobProgress)
        .call()
        .key(keys.job(id))
        .key(keys.events())
        .arg(id)
        .arg(token)
        .arg(progress)
        .arg(notify(sharded))
}

/// `job_requeue`: puts dead and failed jobs back on the queue (at most
/// [`REQUEUE_BATCH`] per call); one decision per ID, in order.
pub(crate) async fn job_requeue(
    con: &Conn,
    keys: &QueueKeys,
    mode: Mode,
    ids: &[String],
) -> Result<Vec<String>, Error> {
    let mut call = scripts::get(Name::JobRequeue)
        .call()
        .key(keys.meta())
        .key(keys.dead_jobs())
        .key(keys.pending())
        .key(keys.tickets())
        .arg(mode.as_str())
        .arg(PROTOCOL_VERSION.to_string());
    for id in ids {
        call = call.key(keys.job(id)).arg(id.as_str());
    }
    let replies: Vec<String> = run(con, &call, keys, None).await?;
    one_per_job(&replies, ids.len(), "job_requeue reply")?;
    Ok(replies)
}

/// Most jobs per `job_requeue` call.
pub(crate) const REQUEUE_BATCH: usize = 1000;
