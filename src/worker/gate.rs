//! The queues whose gate (pause, rate or concurrency limit; protocol.md
//! 8.9) held this worker back, and when to ask them again.
//!
//! A held queue is not claimed from and its tickets (recoverable mode) or
//! pending list (reliable mode) are not blocked on: the worker blocks on the
//! queue's gate list instead, which is pushed when more jobs may start (a
//! resume, a limit changed, a slot given back). It also asks again on its
//! own: when a rate limit's window lets the next start pass, and at the
//! latest after a block timeout (a wake-up can be lost with a connection).
//! Its other queues are served meanwhile.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::transitions::Hold;

/// Per queue: when to ask its gate again.
#[derive(Default)]
pub(crate) struct Holds {
    queues: Mutex<HashMap<String, Instant>>,
}

impl Holds {
    /// Records that `queue` held this worker back. `recheck` is the longest
    /// it waits without a wake-up (the block timeout).
    pub(crate) fn hold(&self, queue: &str, hold: &Hold, recheck: Duration) {
        let wait = hold.wait.map_or(recheck, |w| w.min(recheck));
        tracing::debug!(queue, reason = %hold.reason, ?wait, "held back by the queue's gate");
        self.lock().insert(queue.to_owned(), Instant::now() + wait);
    }

    /// Forgets the hold of `queue` (a call on it was not held back).
    pub(crate) fn release(&self, queue: &str) {
        self.lock().remove(queue);
    }

    /// True while `queue` is held back (its gate was shut at the last call).
    pub(crate) fn is_held(&self, queue: &str) -> bool {
        self.lock().contains_key(queue)
    }

    /// True when `queue` may be asked: not held, or its time to ask again
    /// has come.
    pub(crate) fn may_ask(&self, queue: &str) -> bool {
        self.lock()
            .get(queue)
            .is_none_or(|at| *at <= Instant::now())
    }

    /// `queue`'s gate list was pushed: ask it at once.
    pub(crate) fn wake(&self, queue: &str) {
        if let Some(at) = self.lock().get_mut(queue) {
            *at = Instant::now();
        }
    }

    /// How long until the first of `queues` that is held must be asked
    /// again (`None`: none of them is held). Only the queues a pop serves
    /// count: a held queue that is resting is not asked until its rest ends.
    pub(crate) fn next_ask<'a>(
        &self,
        queues: impl IntoIterator<Item = &'a str>,
    ) -> Option<Duration> {
        let now = Instant::now();
        let held = self.lock();
        queues
            .into_iter()
            .filter_map(|q| held.get(q))
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.queues.lock().expect("holds lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(wait: Option<u64>) -> Hold {
        Hold {
            reason: "rate".into(),
            wait: wait.map(Duration::from_millis),
        }
    }

    #[test]
    fn a_held_queue_is_asked_again_after_its_wait_or_a_wake_up() {
        let holds = Holds::default();
        assert!(holds.may_ask("q") && !holds.is_held("q"));
        holds.hold("q", &hold(Some(60_000)), Duration::from_secs(5));
        assert!(holds.is_held("q") && !holds.may_ask("q"));
        // The recheck bounds the wait; only the queues asked about count.
        assert!(holds.next_ask(["q"]).unwrap() <= Duration::from_secs(5));
        assert!(holds.next_ask(["other"]).is_none());
        holds.wake("q");
        assert!(holds.may_ask("q") && holds.is_held("q"));
        holds.release("q");
        assert!(!holds.is_held("q") && holds.next_ask(["q"]).is_none());
        holds.hold("q", &hold(None), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(2));
        assert!(holds.may_ask("q"));
    }
}
