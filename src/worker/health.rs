//! Per-queue health. Nothing that one queue's data does may make a worker
//! exit or stop serving its other queues: a queue whose keys hold what the
//! protocol forbids (a key of another Redis type, a counter holding text),
//! or whose calls are refused for a reason that retrying at once cannot fix,
//! is rested with a growing backoff (logged and counted each time) while the
//! worker goes on with the others. Only errors about the worker's own
//! credentials (an ACL that forbids a command, a wrong password) end it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Counters;
use crate::error::Error;
use crate::keys::QueueKeys;

/// The first rest after a failure; it doubles with each failure in a row.
const FIRST_REST: Duration = Duration::from_millis(100);
/// The longest rest.
const MAX_REST: Duration = Duration::from_secs(30);

/// The queues a worker is resting, and until when.
#[derive(Default)]
pub(crate) struct Health(Mutex<HashMap<String, Rest>>);

struct Rest {
    until: Instant,
    failures: u32,
}

impl Health {
    /// True while `queue` is rested after a failure.
    pub(crate) fn is_resting(&self, queue: &str) -> bool {
        let map = self.0.lock().expect("health lock");
        map.get(queue).is_some_and(|r| r.until > Instant::now())
    }

    /// The queues of `queues` that are not resting, in order.
    pub(crate) fn serving<'a, T: AsRef<QueueKeys>>(&self, queues: &'a [T]) -> Vec<&'a T> {
        queues
            .iter()
            .filter(|q| !self.is_resting(q.as_ref().queue()))
            .collect()
    }

    /// How long until the first rested queue may be tried again (`None`
    /// when no queue is resting).
    pub(crate) fn next_retry(&self) -> Option<Duration> {
        let map = self.0.lock().expect("health lock");
        let now = Instant::now();
        map.values()
            .filter(|r| r.until > now)
            .map(|r| r.until - now)
            .min()
    }

    /// Records that `what` failed on `queue` with `error`: logs it, counts
    /// it, and rests the queue (100 ms, doubling up to 30 s while failures
    /// follow each other).
    pub(crate) fn failed(&self, counters: &Counters, queue: &str, what: &str, error: &Error) {
        Counters::add(&counters.queue_errors, 1);
        let mut map = self.0.lock().expect("health lock");
        let rest = map.entry(queue.to_owned()).or_insert(Rest {
            until: Instant::now(),
            failures: 0,
        });
        let pause = FIRST_REST
            .saturating_mul(2u32.saturating_pow(rest.failures.min(16)))
            .min(MAX_REST);
        rest.failures += 1;
        rest.until = Instant::now() + pause;
        tracing::error!(
            queue,
            what,
            %error,
            retry_in = ?pause,
            failures = rest.failures,
            "queue failed: resting it and serving the other queues"
        );
    }

    /// Records that a call on `queue` succeeded: its backoff starts over.
    pub(crate) fn recovered(&self, queue: &str) {
        let mut map = self.0.lock().expect("health lock");
        if map.remove(queue).is_some() {
            tracing::info!(queue, "queue works again");
        }
    }
}

/// True for errors that no amount of waiting fixes and that are not about
/// any queue's data: the worker's credentials may not do what it needs
/// (an ACL without a command or key, a wrong password). The worker stops
/// with them; every other error rests the queue concerned.
pub(crate) fn is_fatal(e: &Error) -> bool {
    matches!(e, Error::Redis(r) if matches!(r.code(), Some("NOPERM" | "NOAUTH" | "WRONGPASS")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_queue_rests_longer_each_time_and_recovers() {
        let health = Health::default();
        let counters = Counters::default();
        let err = Error::Config("x".into());
        assert!(!health.is_resting("a"));
        health.failed(&counters, "a", "claim", &err);
        assert!(health.is_resting("a") && !health.is_resting("b"));
        let first = health.next_retry().unwrap();
        health.failed(&counters, "a", "claim", &err);
        assert!(health.next_retry().unwrap() > first);
        assert_eq!(counters.snapshot().queue_errors, 2);
        health.recovered("a");
        assert!(!health.is_resting("a"));
        assert_eq!(health.next_retry(), None);
    }
}
