//! What a worker's handler receives.

use std::sync::Arc;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::connection::Conn;
use crate::encoding::Encoding;
use crate::error::Error;
use crate::keys::QueueKeys;

/// A job handed to a worker's handler.
///
/// In recoverable and reliable modes the handler can also see whether the
/// job was cancelled ([`Job::cancelled`], [`Job::is_cancelled`]) and report
/// its progress ([`Job::progress`]).
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
    /// Recoverable and reliable modes: this attempt's cancellation and
    /// progress.
    pub(crate) control: Option<Arc<Control>>,
}

/// What a running attempt shares with its handler: the cancellation the
/// worker triggers when the job is cancelled, and where progress goes.
pub(crate) struct Control {
    pub cancel: CancellationToken,
    pub con: Conn,
    pub keys: Arc<QueueKeys>,
    /// The attempt's fencing token.
    pub token: String,
    /// Publish with sharded pub/sub (on a cluster).
    pub sharded: bool,
    /// Most bytes an encoded progress value may have.
    pub max_bytes: usize,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("cancelled", &self.cancel.is_cancelled())
            .field("token", &self.token)
            .finish()
    }
}

impl<P> Job<P> {
    /// True once the job was cancelled ([`crate::Queue::cancel`]) while this
    /// attempt runs. Always false in simple mode.
    pub fn is_cancelled(&self) -> bool {
        self.control
            .as_ref()
            .is_some_and(|c| c.cancel.is_cancelled())
    }

    /// Resolves when the job is cancelled while this attempt runs (never in
    /// simple mode). The worker tells the handler this way, at once; a
    /// handler that does not return within the worker's cancel grace
    /// ([`crate::WorkerBuilder::cancel_grace`]) is dropped. Whatever it
    /// returns after a cancel is discarded: the job is already cancelled.
    ///
    /// ```no_run
    /// # use job_async_redis::Job;
    /// # async fn step(_: u32) {}
    /// async fn handler(job: Job<u32>) -> Result<u32, String> {
    ///     for i in 0..job.payload {
    ///         tokio::select! {
    ///             _ = job.cancelled() => return Err("cancelled".into()),
    ///             _ = step(i) => {}
    ///         }
    ///     }
    ///     Ok(job.payload)
    /// }
    /// ```
    pub async fn cancelled(&self) {
        match &self.control {
            Some(c) => c.cancel.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// Records the job's progress (any serde value, in the job's encoding;
    /// at most the worker's maximum payload size) on the job and publishes
    /// it to the clients that follow it ([`crate::JobHandle::follow_progress`]).
    /// Recoverable and reliable modes.
    ///
    /// # Errors
    /// [`Error::Config`] in simple mode; [`Error::TooLarge`];
    /// [`Error::LeaseLost`] when another attempt took the job over, or
    /// [`Error::NotActive`] when it has finished or was cancelled (the
    /// progress is refused: fencing token); [`Error::Redis`].
    pub async fn progress<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        let Some(c) = &self.control else {
            return Err(Error::Config(
                "simple mode jobs have no record to keep progress in".into(),
            ));
        };
        let bytes = self.encoding.encode(value, "progress")?;
        if bytes.len() > c.max_bytes {
            return Err(Error::TooLarge {
                what: "progress",
                size: bytes.len(),
                max: c.max_bytes,
            });
        }
        let call =
            crate::transitions::job_progress(&c.keys, (&self.id, &c.token), &bytes, c.sharded);
        crate::transitions::run::<i64>(&c.con, &call, &c.keys, Some(&self.id))
            .await
            .map(drop)
    }
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
