//! The crate's error type, and the only place where Redis replies and the
//! scripts' error codes are mapped to it.

use std::time::Duration;

use redis::RedisError;

use crate::failure::FailureKind;

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A Redis command failed: connection refused or dropped, timeout,
    /// authentication, or an unexpected reply.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),

    /// The queue was registered in another mode by an earlier client or
    /// worker. Nothing was written.
    #[error("queue {queue:?} is registered in {existing} mode, but {requested} mode was requested")]
    ModeMismatch {
        /// Queue name.
        queue: String,
        /// Mode recorded in the queue's metadata.
        existing: String,
        /// Mode this client or worker asked for.
        requested: String,
    },

    /// The queue was registered with another protocol version. Nothing was
    /// written.
    #[error(
        "queue {queue:?} uses protocol version {existing}, but this library speaks version {requested}"
    )]
    ProtocolMismatch {
        /// Queue name.
        queue: String,
        /// Protocol version recorded in the queue's metadata.
        existing: String,
        /// Protocol version of this library.
        requested: String,
    },

    /// A payload or result is larger than the configured maximum. Nothing was
    /// written.
    #[error("{what} of {size} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// "payload" or "result".
        what: &'static str,
        /// Encoded size in bytes.
        size: usize,
        /// Configured maximum in bytes.
        max: usize,
    },

    /// A queue name or key prefix that would break the key layout.
    #[error("invalid name: {0}")]
    InvalidName(String),

    /// Invalid configuration (for example a worker without queues).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A value could not be serialised.
    #[error("cannot encode {what}: {message}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The serialiser's message.
        message: String,
    },

    /// Bytes read from Redis could not be decoded.
    #[error("cannot decode {what}: {message}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The deserialiser's message.
        message: String,
    },

    /// The job ran and failed: its handler returned an error or panicked, or
    /// its payload could not be decoded by the worker.
    #[error("job {job_id} failed ({kind}): {message}")]
    JobFailed {
        /// Job ID.
        job_id: String,
        /// Why it failed.
        kind: FailureKind,
        /// Human-readable message from the worker.
        message: String,
    },

    /// The job was cancelled ([`crate::Queue::cancel`]): it did not run, or
    /// its run was stopped. It is never retried.
    #[error("job {job_id} was cancelled: {message}")]
    Cancelled {
        /// Job ID.
        job_id: String,
        /// The message given with the cancellation.
        message: String,
    },

    /// No outcome arrived within the time the caller was willing to wait.
    /// The job itself may still run.
    #[error("no outcome for job {job_id} within {after:?}")]
    Timeout {
        /// Job ID.
        job_id: String,
        /// How long the caller waited.
        after: Duration,
    },

    /// The client was closed before the job's outcome arrived.
    #[error("the client was closed before job {job_id} had an outcome")]
    ClientClosed {
        /// Job ID.
        job_id: String,
    },

    /// A script refused with a code this version of the library does not
    /// know, or with `JQ_BAD_ARGS` (a bug in the caller).
    #[error("script {script} refused: {code} {message}")]
    Script {
        /// Script name.
        script: &'static str,
        /// Error code, e.g. `JQ_BAD_ARGS`.
        code: String,
        /// The rest of the error message.
        message: String,
    },

    /// A job with this ID already exists in the queue. Nothing was written.
    #[error("job {job_id} already exists in queue {queue:?}")]
    DuplicateJob {
        /// Queue name.
        queue: String,
        /// Job ID.
        job_id: String,
    },

    /// No such job: it never existed, or its hash expired after the result
    /// TTL.
    #[error("job {job_id} not found in queue {queue:?} (never submitted, or expired)")]
    JobNotFound {
        /// Queue name.
        queue: String,
        /// Job ID.
        job_id: String,
    },

    /// A worker's claim on a job was taken over by a newer attempt (its
    /// lease ran out and another worker started the job): its outcome was
    /// refused, and the newer attempt's stands.
    #[error("lease on job {job_id} lost: a newer attempt (token {current_token}) owns it")]
    LeaseLost {
        /// Job ID.
        job_id: String,
        /// The fencing token of the attempt that owns the job now.
        current_token: String,
    },

    /// The job is no longer active: it already has an outcome or was put
    /// back on its queue.
    #[error("job {job_id} is no longer active (state {state})")]
    NotActive {
        /// Job ID.
        job_id: String,
        /// The job's state.
        state: String,
    },

    /// [`crate::Config::wait_for_replicas`]: the job was queued, but fewer
    /// replicas than asked acknowledged it within the timeout.
    #[error("queued, but only {acked} of {wanted} replicas acknowledged the submit in time")]
    NotReplicated {
        /// Replicas that acknowledged.
        acked: i64,
        /// Replicas asked for.
        wanted: i64,
    },

    /// A key of a queue holds another Redis type than the protocol says (or
    /// a counter holds text): data written by another program or a bug.
    /// Nothing was written. Workers log and count it, retry that queue with
    /// backoff and keep serving their other queues.
    #[error("key {key:?} holds a {found}, but the protocol needs a {expected} there")]
    WrongType {
        /// The key (empty when Redis did not say which).
        key: String,
        /// What the protocol needs: `hash`, `list`, `zset`, `string` or
        /// `integer` (a counter).
        expected: String,
        /// What the key holds.
        found: String,
    },

    /// The library's scripts are not in the server's script cache and this
    /// connection may not load them (its ACL user lacks `SCRIPT LOAD`, as in
    /// the profile that keeps application credentials from running arbitrary
    /// Lua). An operator loads them with [`crate::load_scripts`] (after every
    /// restart, failover or `SCRIPT FLUSH`).
    #[error(
        "the library's scripts are not loaded and this user may not load them: {missing:?}; an operator must run job_async_redis::load_scripts (or SCRIPT LOAD each file of lua/) with credentials that may"
    )]
    ScriptsNotLoaded {
        /// Names of the scripts found missing.
        missing: Vec<String>,
    },

    /// Redis did not become usable in time: it was still loading its
    /// dataset, or could not be reached, for the whole wait.
    #[error("redis not available after {waited:?}: {reason}")]
    Unavailable {
        /// The last reason, short (for example `LOADING`).
        reason: String,
        /// How long the library waited.
        waited: Duration,
    },

    /// The queue has no metadata (it was deleted, or Redis lost its data).
    /// Clients and workers register the queue again and retry once.
    #[error("queue {queue:?} is not registered")]
    QueueNotRegistered {
        /// Queue name.
        queue: String,
    },
}

impl Error {
    /// True when retrying the same call later may succeed: the connection
    /// dropped or timed out, the server is loading, failing over, busy or out
    /// of memory, or its script cache was emptied again and again.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Redis(e) => is_transient(e),
            _ => false,
        }
    }
}

/// See [`Error::is_transient`].
pub(crate) fn is_transient(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_cluster_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.code(),
            Some(
                "LOADING"
                    | "TRYAGAIN"
                    | "MASTERDOWN"
                    | "BUSY"
                    | "CLUSTERDOWN"
                    | "UNBLOCKED"
                    | "NOSCRIPT"
                    | "OOM"
            )
        )
}

/// Maps a failed script call to an [`Error`]. `script` names the script,
/// `queue` the queue it ran on and `job_id` the job it was about, if any.
pub(crate) fn from_script(
    err: RedisError,
    script: &'static str,
    queue: &str,
    job_id: Option<&str>,
) -> Error {
    let Some(code) = err.code().filter(|c| c.starts_with("JQ_")) else {
        return Error::Redis(err);
    };
    from_code(code, err.detail().unwrap_or(""), script, queue, job_id)
}

/// Maps a script's refusal, given as its code (`JQ_...`) and the rest of its
/// message, to an [`Error`]. Also used for the per-job refusals that
/// `job_finish_batch` returns as text.
pub(crate) fn from_code(
    code: &str,
    detail: &str,
    script: &'static str,
    queue: &str,
    job_id: Option<&str>,
) -> Error {
    // Words are taken from the left for codes whose arguments we wrote
    // ourselves; values read from Redis (a queue's mode, a key name) may
    // contain spaces and are taken as a whole.
    let mut words = detail.split_whitespace();
    let mut two = || -> (String, String) {
        (
            words.next().unwrap_or("?").to_owned(),
            words.next().unwrap_or("?").to_owned(),
        )
    };
    match code {
        "JQ_MODE_MISMATCH" => {
            let (existing, requested) = last_word(detail);
            Error::ModeMismatch {
                queue: queue.to_owned(),
                existing: existing.to_owned(),
                requested: requested.to_owned(),
            }
        }
        "JQ_PROTOCOL_MISMATCH" => {
            let (existing, requested) = last_word(detail);
            Error::ProtocolMismatch {
                queue: queue.to_owned(),
                existing: existing.to_owned(),
                requested: requested.to_owned(),
            }
        }
        "JQ_WRONGTYPE" => {
            let (rest, found) = last_word(detail);
            let (key, expected) = last_word(rest);
            Error::WrongType {
                key: key.to_owned(),
                expected: expected.to_owned(),
                found: found.to_owned(),
            }
        }
        "JQ_QUEUE_UNKNOWN" => Error::QueueNotRegistered {
            queue: queue.to_owned(),
        },
        "JQ_DUPLICATE" => Error::DuplicateJob {
            queue: queue.to_owned(),
            job_id: two().0,
        },
        "JQ_NO_JOB" => Error::JobNotFound {
            queue: queue.to_owned(),
            job_id: two().0,
        },
        "JQ_LEASE_LOST" => Error::LeaseLost {
            job_id: job_id.unwrap_or("?").to_owned(),
            current_token: two().0,
        },
        "JQ_ALREADY_FINISHED" => Error::NotActive {
            job_id: job_id.unwrap_or("?").to_owned(),
            state: two().0,
        },
        _ => Error::Script {
            script,
            code: code.to_owned(),
            message: detail.to_owned(),
        },
    }
}

/// Maps the failure of a plain command (or a pipeline) on `key`: a
/// `WRONGTYPE` reply, or a pipeline one of whose commands got one, becomes
/// [`Error::WrongType`] naming the key.
pub(crate) fn on_key(err: RedisError, key: &str, expected: &str) -> Error {
    let wrong_type = err.code() == Some("WRONGTYPE")
        || err
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == "WRONGTYPE"));
    if wrong_type {
        return Error::WrongType {
            key: key.to_owned(),
            expected: expected.to_owned(),
            found: "another type".to_owned(),
        };
    }
    Error::Redis(err)
}

/// Splits `text` at its last space: (everything before, the last word).
fn last_word(text: &str) -> (&str, &str) {
    let text = text.trim_end();
    match text.rsplit_once(' ') {
        Some((rest, last)) => (rest.trim_end(), last),
        None => ("", text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::{ErrorKind, Value};

    fn server_error(text: &str) -> RedisError {
        // Parse a real RESP error reply, as the connection would.
        let raw = format!("-{text}\r\n");
        let value: Value = redis::parse_redis_value(raw.as_bytes()).unwrap();
        match value {
            Value::ServerError(e) => e.into(),
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn mode_mismatch_names_both_modes() {
        let e = from_script(
            server_error("JQ_MODE_MISMATCH recoverable simple"),
            "simple_submit",
            "q1",
            None,
        );
        match e {
            Error::ModeMismatch {
                queue,
                existing,
                requested,
            } => {
                assert_eq!(
                    (queue.as_str(), existing.as_str(), requested.as_str()),
                    ("q1", "recoverable", "simple")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_codes_and_plain_errors_are_kept() {
        assert!(matches!(
            from_script(server_error("JQ_SOMETHING_NEW x y"), "simple_submit", "q", None),
            Error::Script { code, .. } if code == "JQ_SOMETHING_NEW"
        ));
        let plain = from_script(server_error("ERR boom"), "simple_submit", "q", None);
        assert!(matches!(
            from_script(server_error("JQ_LEASE_LOST 7"), "job_finish", "q", Some("j")),
            Error::LeaseLost { job_id, current_token } if job_id == "j" && current_token == "7"
        ));
        assert!(matches!(plain, Error::Redis(ref e) if e.kind() != ErrorKind::Io));
        assert!(!plain.is_transient());
    }
}
