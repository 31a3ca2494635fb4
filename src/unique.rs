//! Unique jobs (protocol.md 8.10): at most one job per unique key is
//! enqueued at a time ([`Unique::until_finished`]), or per time window
//! ([`Unique::throttle`]).

use std::time::Duration;

use crate::error::Error;
use crate::transitions;

/// The longest unique key, in bytes (protocol.md 8.10).
const MAX_KEY_BYTES: usize = 256;

/// A job's unique key, set with [`crate::JobOptions::unique`]
/// (recoverable and reliable modes).
///
/// While a job holds the key, a submit of another job with the same key
/// (from any client or process) enqueues nothing: its handle is a handle on
/// the job that holds the key, whose [`crate::JobHandle::id`] is that job's
/// ID. The check and the lock are one atomic script with the submit, so
/// however many clients race, one job is enqueued.
///
/// The lock is the key `<prefix>:{<queue>}:unique:<key>`, whose value is
/// the holder's ID; keys are per queue.
///
/// ```
/// use std::time::Duration;
/// use job_async_redis::{JobOptions, Unique};
///
/// // One rebuild of this report queued or running at a time; a safety
/// // expiry in case the lock outlives its job (say, deleted by hand).
/// let rebuild = JobOptions::default()
///     .unique(Unique::until_finished("report:42").expire_after(Duration::from_secs(3600)));
/// // At most one welcome email per user per day, whatever became of the
/// // first one.
/// let welcome = JobOptions::default()
///     .unique(Unique::throttle("welcome:ada", Duration::from_secs(24 * 3600)));
/// # let _ = (rebuild, welcome);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unique {
    key: String,
    mode: Hold,
}

/// How long a unique lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// While the holder is queued, delayed or running; with a safety
    /// expiry, if any.
    UntilFinished(Option<Duration>),
    /// For this long, whatever becomes of the holder.
    Throttle(Duration),
}

impl Unique {
    /// Mode "active": the key is held while its job is queued, delayed
    /// (including between retries) or running, and released when the job
    /// ends in any way: completed, failed for good, dead-lettered or
    /// cancelled. A lock whose holder has ended or no longer exists (say,
    /// its hash was deleted by hand) is stale: the next submit takes it
    /// over. No expiry unless [`Unique::expire_after`] sets one.
    ///
    /// `key`: 1 to 256 bytes (checked when the job is submitted).
    pub fn until_finished(key: impl Into<String>) -> Self {
        Unique {
            key: key.into(),
            mode: Hold::UntilFinished(None),
        }
    }

    /// Mode "throttle": the key is held for `window` from the submit that
    /// took it, whatever becomes of the job; a job that finished early
    /// still refuses the key's other jobs until the window ends.
    ///
    /// `key`: 1 to 256 bytes; `window`: 1 ms to 10^12 ms (both checked when
    /// the job is submitted).
    pub fn throttle(key: impl Into<String>, window: Duration) -> Self {
        Unique {
            key: key.into(),
            mode: Hold::Throttle(window),
        }
    }

    /// A safety expiry: the lock is released after `ttl` (1 ms to 10^12 ms)
    /// even if its job has not finished, so that a lock can never outlive
    /// its purpose by more than `ttl`. For [`Unique::until_finished`] (a job
    /// still running when it expires keeps running, but another job with
    /// the same key may then be enqueued); on a [`Unique::throttle`] it
    /// replaces the window.
    pub fn expire_after(mut self, ttl: Duration) -> Self {
        self.mode = match self.mode {
            Hold::UntilFinished(_) => Hold::UntilFinished(Some(ttl)),
            Hold::Throttle(_) => Hold::Throttle(ttl),
        };
        self
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// True for [`Unique::throttle`], false for [`Unique::until_finished`].
    pub fn is_throttle(&self) -> bool {
        matches!(self.mode, Hold::Throttle(_))
    }

    /// How long the lock lives at most: the throttle window, or the
    /// safety expiry of [`Unique::until_finished`] (`None`: none).
    pub fn expiry(&self) -> Option<Duration> {
        match self.mode {
            Hold::UntilFinished(ttl) => ttl,
            Hold::Throttle(window) => Some(window),
        }
    }

    /// Checks the key and the durations against the protocol's ranges:
    /// [`Error::Config`] for an empty key or one longer than 256 bytes, or
    /// a window or expiry outside 1 ms to 10^12 ms.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.key.is_empty() || self.key.len() > MAX_KEY_BYTES {
            return Err(Error::Config(format!(
                "a unique key must be 1 to {MAX_KEY_BYTES} bytes, not {}",
                self.key.len()
            )));
        }
        if let Some(d) = self.expiry()
            && !transitions::ms_in_range(d, 1)
        {
            return Err(Error::Config(format!(
                "a unique key's {} must be 1 ms to {} ms, not {d:?}",
                if self.is_throttle() {
                    "throttle window"
                } else {
                    "expiry"
                },
                transitions::MAX_MS
            )));
        }
        Ok(())
    }

    /// The wire form `job_submit` takes: `<mode>:<ttl ms>:<key>`, mode
    /// `active` (ttl 0: no expiry) or `throttle`. Values out of range are
    /// written as they are (a submit refuses them before anything is sent).
    pub fn to_wire(&self) -> String {
        match self.mode {
            Hold::UntilFinished(ttl) => {
                format!("active:{}:{}", ttl.map_or(0, |d| d.as_millis()), self.key)
            }
            Hold::Throttle(window) => format!("throttle:{}:{}", window.as_millis(), self.key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms() {
        assert_eq!(Unique::until_finished("a").to_wire(), "active:0:a");
        assert_eq!(
            Unique::until_finished("a:b")
                .expire_after(Duration::from_secs(2))
                .to_wire(),
            "active:2000:a:b"
        );
        assert_eq!(
            Unique::throttle("k", Duration::from_millis(1500)).to_wire(),
            "throttle:1500:k"
        );
        assert_eq!(
            Unique::throttle("k", Duration::from_millis(1500))
                .expire_after(Duration::from_millis(7))
                .to_wire(),
            "throttle:7:k"
        );
    }

    #[test]
    fn validation() {
        let ok = |u: Unique| u.validate().is_ok();
        assert!(ok(Unique::until_finished("x")));
        assert!(ok(Unique::until_finished("é".repeat(128))));
        assert!(!ok(Unique::until_finished("")));
        assert!(!ok(Unique::until_finished("x".repeat(257))));
        assert!(!ok(Unique::until_finished("é".repeat(129))));
        assert!(!ok(Unique::until_finished("x").expire_after(Duration::ZERO)));
        assert!(!ok(
            Unique::until_finished("x").expire_after(Duration::from_micros(999))
        ));
        assert!(ok(
            Unique::until_finished("x").expire_after(Duration::from_millis(1))
        ));
        assert!(!ok(Unique::throttle("x", Duration::ZERO)));
        assert!(ok(Unique::throttle(
            "x",
            Duration::from_millis(1_000_000_000_000)
        )));
        assert!(!ok(Unique::throttle(
            "x",
            Duration::from_millis(1_000_000_000_001)
        )));
    }
}
