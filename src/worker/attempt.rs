//! One attempt of a stored job (recoverable and reliable modes), after a
//! mode's fetch strategy has claimed it: act on the start script's decision,
//! run the handler, and hand the outcome to be recorded. Also the registry of
//! running attempts that heartbeats and orphan detection read.
//!
//! Each mode's file holds only how it takes jobs (and keeps them alive);
//! everything from "the start script said run" to "the outcome is recorded"
//! is here and in `finisher`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::execute::{self, Input, Outcome};
use super::finisher::{FinishRequest, Recording, record};
use super::{Counters, Shared, persist};
use crate::error::Error;
use crate::job::{Control, RetryRule};
use crate::keys::QueueKeys;
use crate::mode::Mode;
use crate::transitions::{self, BatchItem, OwnedFinish, Start, StartSettings};

/// How long a cancel for an attempt not (yet) registered is kept.
const EARLY_CANCEL_KEPT: Duration = Duration::from_secs(60);

/// Most such cancels kept (a flood of messages for unknown jobs must not
/// grow memory without bound).
const EARLY_CANCELS_MAX: usize = 10_000;

/// One running attempt: its fencing token, the job's lease (when shorter
/// than the worker's default), and its cancellation.
struct Attempt {
    token: String,
    lease: Option<Duration>,
    cancel: CancellationToken,
}

/// One queue's running jobs, by job ID.
type Running = HashMap<String, Attempt>;

/// The running jobs of this worker, for the heartbeat and orphan detection:
/// queue name -> its running jobs.
#[derive(Default)]
pub(crate) struct Active {
    jobs: Mutex<HashMap<String, Running>>,
    /// Cancels that arrived for attempts not registered yet (the message
    /// can overtake the start's reply): (queue, id) -> when.
    early: Mutex<HashMap<(String, String), std::time::Instant>>,
    /// Woken when a job starts whose lease is shorter than any before it:
    /// the heartbeat must then renew more often.
    pub(crate) shorter_lease: tokio::sync::Notify,
}

impl Active {
    pub(crate) fn insert(
        &self,
        queue: &str,
        id: &str,
        (token, lease): (&str, Option<Duration>),
        cancel: CancellationToken,
    ) {
        let shortest = self.shortest_lease();
        let mut map = self.jobs.lock().expect("active jobs lock");
        map.entry(queue.to_owned()).or_default().insert(
            id.to_owned(),
            Attempt {
                token: token.to_owned(),
                lease,
                cancel: cancel.clone(),
            },
        );
        drop(map);
        let key = (queue.to_owned(), id.to_owned());
        let mut early = self.early.lock().expect("early cancels lock");
        early.retain(|_, at| at.elapsed() < EARLY_CANCEL_KEPT);
        if early.remove(&key).is_some() {
            cancel.cancel();
        }
        drop(early);
        if lease.is_some_and(|l| shortest.is_none_or(|s| l < s)) {
            self.shorter_lease.notify_one();
        }
    }

    /// The shortest lease among the running jobs that have one.
    pub(crate) fn shortest_lease(&self) -> Option<Duration> {
        let map = self.jobs.lock().expect("active jobs lock");
        map.values()
            .flat_map(|jobs| jobs.values().filter_map(|a| a.lease))
            .min()
    }
    /// Forgets the attempt of `id` under `token`; a newer attempt of the
    /// same job (same ID, another token) stays.
    pub(crate) fn remove(&self, queue: &str, id: &str, token: &str) {
        let mut map = self.jobs.lock().expect("active jobs lock");
        if let Some(jobs) = map.get_mut(queue)
            && jobs.get(id).is_some_and(|a| a.token == token)
        {
            jobs.remove(id);
        }
    }

    /// Tells the running attempt of `id` in `queue` that its job was
    /// cancelled. False when this worker does not run it.
    pub(crate) fn cancel(&self, queue: &str, id: &str) -> bool {
        let map = self.jobs.lock().expect("active jobs lock");
        match map.get(queue).and_then(|jobs| jobs.get(id)) {
            Some(attempt) => {
                attempt.cancel.cancel();
                true
            }
            None => {
                // Perhaps its start's reply is still on its way.
                let mut early = self.early.lock().expect("early cancels lock");
                early.retain(|_, at| at.elapsed() < EARLY_CANCEL_KEPT);
                if early.len() < EARLY_CANCELS_MAX {
                    early.insert((queue.to_owned(), id.to_owned()), std::time::Instant::now());
                }
                false
            }
        }
    }
    pub(crate) fn of(&self, queue: &str) -> Vec<(String, String)> {
        let map = self.jobs.lock().expect("active jobs lock");
        map.get(queue)
            .map(|jobs| {
                jobs.iter()
                    .map(|(i, a)| (i.clone(), a.token.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Acts on a start decision. A job to run runs in a task of its own,
/// holding `permit` while its handler runs, and stays in the active registry
/// (heartbeat, orphan detection) until its outcome is recorded; the other
/// decisions are counted or logged here, and free their slot at once.
/// Shared by recoverable and reliable modes.
pub(crate) fn spawn_started(
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    (mode, keys): (Mode, &Arc<QueueKeys>),
    (id, token): (Vec<u8>, String),
    start: Start,
    permit: OwnedSemaphorePermit,
) {
    let run = match start {
        Start::Run {
            enc,
            payload,
            attempt,
            lease,
            timeout,
        } => (enc, payload, attempt, lease, timeout),
        Start::Dead => {
            let id = String::from_utf8_lossy(&id);
            tracing::warn!(job = %id, queue = keys.queue(), "job stalled too often: dead-lettered");
            Counters::add(&shared.counters.dead_lettered, 1);
            return;
        }
        Start::Skip(why) => {
            let id = String::from_utf8_lossy(&id);
            tracing::debug!(job = %id, why, "claimed job not run");
            return;
        }
        // The fetch loops handle these before: nothing to run.
        Start::Missed | Start::Held(_) => return,
    };
    let Ok(id) = String::from_utf8(id) else {
        // The start scripts never answer "run" for such an ID; were one to,
        // the job stays claimed and is recovered like a stalled one.
        tracing::error!(
            queue = keys.queue(),
            "a start script answered run for a job ID that is not UTF-8; not running it"
        );
        return;
    };
    let (enc, payload, attempt, lease, timeout) = run;
    // Only a lease shorter than the worker's default changes how often the
    // heartbeat must renew.
    let short = lease.filter(|l| *l < shared.settings.lease);
    let control = Arc::new(Control {
        cancel: CancellationToken::new(),
        con: shared.con.clone(),
        keys: keys.clone(),
        token: token.clone(),
        sharded: shared.con.is_cluster(),
        max_bytes: shared.config.max_payload_bytes,
    });
    shared
        .active
        .insert(keys.queue(), &id, (&token, short), control.cancel.clone());
    let input = Input {
        id: id.clone(),
        queue: keys.queue().to_owned(),
        mode,
        enc,
        payload,
        attempt,
        timeout: timeout.or(shared.settings.timeout),
        control: Some(control),
    };
    let (shared, keys) = (shared.clone(), keys.clone());
    tasks.spawn(async move {
        run_started(&shared, mode, &keys, (&id, &token), input, permit).await;
        shared.active.remove(keys.queue(), &id, &token);
    });
}

/// The settings `job_start` and `reliable_start` need.
pub(crate) fn start_settings(shared: &Shared) -> StartSettings<'_> {
    StartSettings {
        lease: shared.settings.lease,
        max_stalls: shared.settings.max_stalls,
        worker_id: &shared.id,
        result_ttl: shared.settings.result_ttl,
        dead_max: shared.settings.dead_letter_max,
        sharded: shared.con.is_cluster(),
    }
}

/// Runs a started job and records its outcome. The job's slot is free again
/// as soon as its handler has returned: the next job can start while the
/// outcome is being recorded (the ID stays in its claim, lease or in-flight
/// list, until then).
async fn run_started(
    shared: &Shared,
    mode: Mode,
    keys: &Arc<QueueKeys>,
    (id, token): (&str, &str),
    input: Input,
    permit: OwnedSemaphorePermit,
) {
    let grace = shared.settings.cancel_grace;
    let outcome = execute::run(&shared.handler, input, &shared.hard_stop, grace).await;
    drop(permit);
    // Boxed: keeps the spawned task small (it is moved on spawn).
    Box::pin(finish(shared, mode, keys, (id, token), outcome)).await;
}

/// Records the outcome; an abandoned job (grace period over) goes back to
/// its queue at once. Shared by recoverable and reliable modes. When no
/// outcome is being recorded, this one is sent at once (`job_finish`);
/// otherwise it goes through the worker's finisher, which records all the
/// outcomes of a queue that are waiting in one `job_finish_batch` call.
pub(crate) async fn finish(
    shared: &Shared,
    mode: Mode,
    keys: &Arc<QueueKeys>,
    (id, token): (&str, &str),
    outcome: Option<Outcome>,
) {
    let c = &shared.counters;
    let Some(outcome) = outcome else {
        let claim = transitions::claim_key(keys, mode, &shared.id);
        let call = transitions::job_release(keys, mode, &claim, id, token);
        match persist::<redis::Value>(&shared.con, &call, keys, Some(id)).await {
            Ok(_) => Counters::add(&c.returned, 1),
            Err(e) => {
                tracing::error!(job = %id, error = %e, "could not give the job back; its lease will run out")
            }
        }
        return;
    };
    let completed = matches!(outcome, Outcome::Completed(_));
    let finish = match outcome {
        Outcome::Cancelled => {
            // No longer running here: gone from the registry before the
            // fetch loop looks for orphans (below).
            shared.active.remove(keys.queue(), id, token);
            if !super::cancels::is_cancelled(shared, keys, id).await {
                // Told to cancel, but the job is not cancelled in Redis (a
                // forged or stale message): its result is gone, so give it
                // back to run again.
                tracing::warn!(job = %id, queue = keys.queue(), "stopped for a cancel that Redis does not show; giving the job back");
                let claim = transitions::claim_key(keys, mode, &shared.id);
                let call = transitions::job_release(keys, mode, &claim, id, token);
                if let Err(e) = persist::<redis::Value>(&shared.con, &call, keys, Some(id)).await {
                    tracing::warn!(job = %id, error = %e, "could not give the job back; its lease will run out");
                }
                return;
            }
            // The cancel finished the job in Redis (and, in recoverable
            // mode, dropped its lease). Reliable mode: its ID is still in
            // our in-flight list; the fetch loop's next look finds it there,
            // and reliable_start drops it (the job has finished).
            tracing::info!(job = %id, queue = keys.queue(), "job cancelled while it ran");
            Counters::add(&c.cancelled, 1);
            if mode == Mode::Reliable {
                shared.unrecorded.store(true, Ordering::Release);
            }
            return;
        }
        Outcome::Completed(result) => OwnedFinish::Completed(result),
        o @ Outcome::Failed(..) => {
            let retry = o.retryable();
            let Outcome::Failed(failure, message, rule) = o else {
                unreachable!()
            };
            tracing::info!(job = %id, queue = keys.queue(), %failure, message, "job failed");
            OwnedFinish::Failed {
                kind: failure.as_str().to_owned(),
                message,
                retry,
                retry_delay: match rule {
                    RetryRule::After(delay) => Some(delay),
                    _ => None,
                },
            }
        }
    };
    let item = BatchItem {
        id: id.to_owned(),
        token: token.to_owned(),
        finish,
    };
    let recorded = if let Some(_idle) = Recording::start_if_idle(shared) {
        // Nothing is being recorded: send this outcome at once, without
        // the hop through the finisher (lower latency for lone jobs).
        let claim = transitions::claim_key(keys, mode, &shared.id);
        match record(shared, keys, (mode, &claim), std::slice::from_ref(&item)).await {
            Ok(mut results) => results.pop().expect("one result per outcome"),
            Err(e) => Err(e),
        }
    } else {
        let (done, result) = oneshot::channel();
        let request = FinishRequest {
            keys: keys.clone(),
            mode,
            item,
            done,
        };
        match shared.finisher.send(request) {
            Ok(()) => result
                .await
                .unwrap_or_else(|_| Err(Error::Config("the finisher stopped".into()))),
            Err(_) => Err(Error::Config("the finisher stopped".into())),
        }
    };
    match recorded {
        Ok(state) if state == "queued" => Counters::add(&c.retried, 1),
        Ok(_) if completed => Counters::add(&c.completed, 1),
        Ok(_) => Counters::add(&c.failed, 1),
        Err(e @ Error::LeaseLost { .. }) => {
            tracing::warn!(job = %id, error = %e, "outcome refused: a newer attempt owns the job");
            Counters::add(&c.lease_lost, 1);
        }
        Err(e @ Error::NotActive { .. }) => {
            // Finished or put back by someone else under this attempt's
            // token (a retried call whose earlier try landed is recognised
            // by `record` and counted above).
            tracing::warn!(job = %id, error = %e, "outcome refused: someone else finished the job under this attempt's token");
            Counters::add(&c.outcome_refused, 1);
            // Reliable mode: the ID is still in this worker's in-flight
            // list; the fetch loop hands it to `reliable_start` again, which
            // decides what its state now calls for.
            shared.unrecorded.store(true, Ordering::Release);
        }
        Err(e) => {
            tracing::error!(job = %id, error = %e, "could not record the outcome; the job will run again");
            if !e.is_transient() {
                // A key of the queue is broken (or a script refused): rest
                // the queue, as a failed claim would.
                shared
                    .health
                    .failed(&shared.counters, keys.queue(), "record an outcome", &e);
            }
            // Recoverable mode: its lease runs out and the sweep requeues it.
            // Reliable mode: it is still in this worker's in-flight list;
            // the fetch loop finds it there and starts it again.
            shared.unrecorded.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Active;
    use std::time::Duration;

    #[test]
    fn an_ended_attempt_does_not_forget_a_newer_attempt_of_the_same_job() {
        let active = Active::default();
        active.insert("q", "j1", ("1", None), Default::default());
        // The same worker starts the job again (a retry it took back)
        // before the first attempt's task has ended.
        let second = tokio_util::sync::CancellationToken::new();
        active.insert(
            "q",
            "j1",
            ("2", Some(Duration::from_secs(1))),
            second.clone(),
        );
        assert_eq!(active.shortest_lease(), Some(Duration::from_secs(1)));
        active.remove("q", "j1", "1");
        assert_eq!(active.of("q"), vec![("j1".to_owned(), "2".to_owned())]);
        assert!(active.cancel("q", "j1") && second.is_cancelled());
        assert!(!active.cancel("q", "other"));
        active.remove("q", "j1", "2");
        assert!(active.of("q").is_empty());
    }
}
