//! [`JobStatus`]: a job's state as stored in its hash.

use crate::connection::Conn;

use crate::error::Error;
use crate::failure::FailureKind;
use crate::keys::QueueKeys;

/// The state of a job in recoverable mode.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobState {
    /// `queued`: waiting for a worker (also after a retry).
    Queued,
    /// `queued` with a due time still to come ([`JobStatus::due_ms`]): the
    /// job waits in the queue's delayed set (a delay, a run-at time, or a
    /// retry's backoff). On the wire the state is `queued`; it is reported
    /// as delayed while its ID is in the delayed set.
    Delayed,
    /// `active`: a worker started it and holds its lease.
    Active,
    /// `completed`: the handler succeeded; the result is stored.
    Completed,
    /// `failed`: the handler failed with no attempts left, or the job could
    /// not run (undecodable payload).
    Failed,
    /// `dead`: it stalled (its worker died or hung) more often than allowed.
    Dead,
    /// Cancelled ([`crate::Queue::cancel`]). On the wire the state is
    /// `failed` with error kind `cancelled`.
    Cancelled,
    /// Any other value, written by a newer version or another program.
    Other(String),
}

impl JobState {
    fn parse(s: &str) -> Self {
        match s {
            "queued" => JobState::Queued,
            "active" => JobState::Active,
            "completed" => JobState::Completed,
            "failed" => JobState::Failed,
            "dead" => JobState::Dead,
            other => JobState::Other(other.to_owned()),
        }
    }

    /// True for `completed`, `failed` (and cancelled) and `dead`.
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Dead | JobState::Cancelled
        )
    }
}

/// A job's state, counters, timestamps (milliseconds since the Unix epoch,
/// server time) and last error.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobStatus {
    /// Current state.
    pub state: JobState,
    /// How many times a worker started it.
    pub attempt: u32,
    /// How many attempts it may have when its handler fails.
    pub max_attempts: u32,
    /// How many times its worker died or hung while running it.
    pub stalls: u32,
    /// When it was submitted.
    pub submitted_ms: Option<u64>,
    /// When its latest attempt started.
    pub started_ms: Option<u64>,
    /// When it finished.
    pub finished_ms: Option<u64>,
    /// ID of the worker of its latest attempt.
    pub worker: Option<String>,
    /// Its latest error: kind and message.
    pub error: Option<(FailureKind, String)>,
    /// When it is (or was) due, if it was delayed: a delay, a run-at time,
    /// or the backoff of its latest retry.
    pub due_ms: Option<u64>,
    /// Its retry backoff policy, if it has one.
    pub backoff: Option<crate::Backoff>,
}

const FIELDS: [&str; 12] = [
    "state",
    "attempt",
    "max_attempts",
    "stalls",
    "submitted_ms",
    "started_ms",
    "finished_ms",
    "worker",
    "error_kind",
    "error",
    "due_ms",
    "backoff",
];

impl JobStatus {
    pub(crate) async fn read(
        con: &Conn,
        keys: &QueueKeys,
        id: &str,
    ) -> Result<Option<Self>, Error> {
        let key = keys.job(id);
        let values: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(&key)
            .arg(&FIELDS[..])
            .query_async(&mut con.clone())
            .await
            .map_err(|e| crate::error::on_key(e, &key, "hash"))?;
        // Values written by other programs may be anything: text is read
        // lossily, a number that is not a decimal integer counts as absent.
        let values: Vec<Option<String>> = values
            .into_iter()
            .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .collect();
        let get = |i: usize| values.get(i).cloned().flatten().filter(|v| !v.is_empty());
        let number = |i: usize| crate::wire::lenient_u64(values.get(i).and_then(|v| v.as_deref()));
        let small = |i: usize, default: u32| {
            number(i)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(default)
        };
        let Some(state) = get(0) else {
            return Ok(None);
        };
        let due_ms = number(10);
        let mut state = JobState::parse(&state);
        if state == JobState::Failed && get(8).as_deref() == Some("cancelled") {
            state = JobState::Cancelled;
        }
        if state == JobState::Queued && due_ms.is_some() {
            // A job that was ever delayed: it is delayed while its ID waits
            // in the delayed set (the set, not a clock, says so).
            let delayed = keys.delayed();
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(&delayed)
                .arg(id)
                .query_async(&mut con.clone())
                .await
                .map_err(|e| crate::error::on_key(e, &delayed, "zset"))?;
            if score.is_some() {
                state = JobState::Delayed;
            }
        }
        Ok(Some(Self {
            state,
            attempt: small(1, 0),
            max_attempts: small(2, 1).max(1),
            stalls: small(3, 0),
            submitted_ms: number(4),
            started_ms: number(5),
            finished_ms: number(6),
            worker: get(7),
            error: match (get(8), get(9)) {
                (Some(kind), message) => {
                    Some((FailureKind::parse(&kind), message.unwrap_or_default()))
                }
                (None, Some(message)) => Some((FailureKind::parse(""), message)),
                (None, None) => None,
            },
            due_ms,
            backoff: get(11).and_then(|b| crate::Backoff::from_wire(&b)),
        }))
    }
}
