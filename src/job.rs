//! What a worker's handler receives.

use crate::encoding::Encoding;

/// A job handed to a worker's handler.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Job<P> {
    /// Job ID, unique per queue.
    pub id: String,
    /// Name of the queue the job came from.
    pub queue: String,
    /// The decoded payload.
    pub payload: P,
    /// Encoding the client used; the result is encoded the same way.
    pub encoding: Encoding,
    /// Which attempt this is, from 1 (recoverable mode; always 1 in simple
    /// mode). Attempts after the first follow a failure with attempts left,
    /// or a stall (the previous attempt's worker died or hung).
    pub attempt: u32,
}

/// An error a handler returns to decide its job's retry. Any other error
/// type (anything that implements `Display`) is retried by the job's
/// policy: while it has attempts left ([`crate::JobOptions::max_attempts`]),
/// after its backoff ([`crate::JobOptions::backoff`]). A `JobError` (or a
/// `Box<dyn Error + Send + Sync>` holding one) can instead ask for a given
/// delay, or for no retry at all.
///
/// ```
/// use std::time::Duration;
/// use job_async_redis::{JobError, RetryRule};
///
/// // The API said "try again in 42 s": do so, whatever the backoff says.
/// let limited = JobError::retry_after("rate limited", Duration::from_secs(42));
/// assert_eq!(limited.retry(), RetryRule::After(Duration::from_secs(42)));
/// // Retrying cannot fix this one: fail the job now.
/// let invalid = JobError::no_retry("no such recipient");
/// assert_eq!(invalid.retry(), RetryRule::Never);
/// assert_eq!(invalid.to_string(), "no such recipient");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    message: String,
    retry: RetryRule,
}

/// What a [`JobError`] asks for the failed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryRule {
    /// Retry while attempts are left, after the job's backoff.
    Policy,
    /// Retry while attempts are left, after this delay (instead of the
    /// backoff).
    After(std::time::Duration),
    /// Do not retry: the job fails now, whatever attempts are left.
    Never,
}

impl JobError {
    /// A failure retried by the job's policy.
    pub fn new(message: impl Into<String>) -> Self {
        JobError {
            message: message.into(),
            retry: RetryRule::Policy,
        }
    }

    /// A failure retried after `delay` (while attempts are left). A delay of
    /// zero queues the job again at once. Delays above 10^12 ms are cut to
    /// that.
    pub fn retry_after(message: impl Into<String>, delay: std::time::Duration) -> Self {
        JobError {
            message: message.into(),
            retry: RetryRule::After(delay),
        }
    }

    /// A failure that is never retried.
    pub fn no_retry(message: impl Into<String>) -> Self {
        JobError {
            message: message.into(),
            retry: RetryRule::Never,
        }
    }

    /// What this error asks for.
    pub fn retry(&self) -> RetryRule {
        self.retry
    }

    /// The failure message, as recorded on the job.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobError {}
