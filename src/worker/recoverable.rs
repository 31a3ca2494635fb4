//! Recoverable mode: claim job IDs under leases and fencing tokens, run
//! them, record outcomes in the job hashes; renew leases (heartbeat) and
//! requeue jobs whose leases ran out (sweep).
//!
//! The fetch loop first claims without blocking, queue by queue in priority
//! order (`job_claim`). When every queue is empty it blocks on the queues'
//! ticket lists (BLMPOP), never on the job IDs: a worker that dies right
//! after a pop loses a ticket (other workers find the job on their next
//! pass, at most one block timeout later), never a job.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use super::execute::{self, Input, Outcome};
use super::fetch::{Fetcher, pause};
use super::{Backoff, Counters, Shared, persist, queue_of, take_slots};
use crate::error::Error;
use crate::keys::QueueKeys;
use crate::mode::Mode;
use crate::transitions::{self, BatchItem, OwnedFinish, Start, StartSettings};

/// Most jobs one sweep call requeues.
const SWEEP_LIMIT: usize = 1000;

/// The running jobs of this worker, for the heartbeat: queue name -> job ID
/// -> fencing token.
#[derive(Default)]
pub(crate) struct Active(Mutex<HashMap<String, HashMap<String, String>>>);

impl Active {
    pub(crate) fn insert(&self, queue: &str, id: &str, token: &str) {
        let mut map = self.0.lock().expect("active jobs lock");
        map.entry(queue.to_owned())
            .or_default()
            .insert(id.to_owned(), token.to_owned());
    }
    /// Forgets the attempt of `id` under `token`; a newer attempt of the
    /// same job (same ID, another token) stays.
    pub(crate) fn remove(&self, queue: &str, id: &str, token: &str) {
        let mut map = self.0.lock().expect("active jobs lock");
        if let Some(jobs) = map.get_mut(queue)
            && jobs.get(id).is_some_and(|t| t == token)
        {
            jobs.remove(id);
        }
    }
    pub(crate) fn of(&self, queue: &str) -> Vec<(String, String)> {
        let map = self.0.lock().expect("active jobs lock");
        map.get(queue)
            .map(|jobs| jobs.iter().map(|(i, t)| (i.clone(), t.clone())).collect())
            .unwrap_or_default()
    }
}

/// Starts the heartbeat and the sweeper. They run until the worker has
/// finished, or until the returned handles are dropped (the worker's future
/// was dropped: as if its process died).
pub(crate) fn background(shared: &Arc<Shared>) -> Vec<AbortOnDropHandle<()>> {
    vec![
        AbortOnDropHandle::new(tokio::spawn(heartbeat(shared.clone()))),
        AbortOnDropHandle::new(tokio::spawn(sweeper(shared.clone()))),
    ]
}

/// Claims and runs jobs while there are free slots, until shutdown.
pub(crate) async fn fetch_loop(shared: &Arc<Shared>, tasks: &mut JoinSet<()>) -> Result<(), Error> {
    let slots = Arc::new(Semaphore::new(shared.settings.concurrency));
    let tickets: Vec<String> = shared.queues.iter().map(|q| q.tickets()).collect();
    let mut fetcher = Fetcher::default();
    let mut backoff = Backoff::default();
    // After a claim round that drained every queue, the next round waits for
    // a ticket at once instead of asking the empty queues again.
    let mut drained = false;
    loop {
        while tasks.try_join_next().is_some() {}
        let Some(mut permits) = take_slots(shared, &slots).await else {
            return Ok(());
        };
        let claimed_now = if drained {
            Ok(Vec::new())
        } else {
            claim_in_order(shared, permits.len()).await
        };
        let mut claimed = match claimed_now {
            Ok(c) => c,
            Err(e) if e.is_transient() => {
                tracing::warn!(worker = %shared.id, error = %e, "claim failed; retrying");
                pause(&shared.shutdown, backoff.next()).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        backoff.reset();
        drained = claimed.len() < permits.len();
        if claimed.is_empty() {
            // Every queue is empty: wait for a ticket. After a timeout, ask
            // the queues again (a ticket can be lost with a worker that died
            // right after popping it).
            let Some((key, popped)) = fetcher.pop(shared, &tickets, 1).await? else {
                drained = false;
                continue;
            };
            let keys = queue_of(shared, &key, |q| q.tickets());
            if shared.shutdown.is_cancelled() {
                let _: redis::RedisResult<()> = redis::cmd("LPUSH")
                    .arg(&key)
                    .arg(&popped)
                    .query_async(&mut shared.con.clone())
                    .await;
                return Ok(());
            }
            let lease = shared.settings.lease;
            match transitions::job_claim(&shared.con, &keys, permits.len(), lease, 1).await {
                Ok(jobs) => {
                    claimed = jobs
                        .into_iter()
                        .map(|(id, token)| (keys.clone(), id, token))
                        .collect()
                }
                Err(e) if e.is_transient() => continue,
                Err(e) => return Err(e),
            }
        }
        start_claimed(shared, tasks, claimed, &mut permits).await;
    }
}

/// Starts claimed jobs with one `job_start` call per queue, and runs each job
/// that may run in a task of its own. If a call fails, those claims' leases
/// run out and the sweep requeues the jobs: nothing is lost.
async fn start_claimed(
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    mut claimed: Vec<(Arc<QueueKeys>, String, String)>,
    permits: &mut Vec<OwnedSemaphorePermit>,
) {
    let settings = start_settings(shared);
    while !claimed.is_empty() {
        let queue = claimed[0].0.queue().to_owned();
        let split = claimed
            .iter()
            .position(|(k, _, _)| k.queue() != queue)
            .unwrap_or(claimed.len());
        let rest = claimed.split_off(split);
        let keys = claimed[0].0.clone();
        let claims: Vec<(String, String)> = claimed
            .into_iter()
            .map(|(_, id, token)| (id, token))
            .collect();
        claimed = rest;
        match transitions::job_start(&shared.con, &keys, &claims, &settings).await {
            Ok(decisions) => {
                for ((id, token), start) in claims.into_iter().zip(decisions) {
                    let permit = permits
                        .pop()
                        .expect("never claims more than the free slots");
                    spawn_started(
                        shared,
                        tasks,
                        (Mode::Recoverable, &keys),
                        (id, token),
                        start,
                        permit,
                    );
                }
            }
            Err(e) => {
                tracing::warn!(queue = %queue, jobs = claims.len(), error = %e, "could not start claimed jobs; their leases will run out")
            }
        }
    }
}

/// Claims up to `count` jobs, queue by queue in priority order.
async fn claim_in_order(
    shared: &Shared,
    count: usize,
) -> Result<Vec<(Arc<QueueKeys>, String, String)>, Error> {
    let mut claimed = Vec::new();
    for keys in &shared.queues {
        let want = count - claimed.len();
        if want == 0 {
            break;
        }
        let jobs =
            transitions::job_claim(&shared.con, keys, want, shared.settings.lease, 0).await?;
        claimed.extend(
            jobs.into_iter()
                .map(|(id, token)| (keys.clone(), id, token)),
        );
    }
    Ok(claimed)
}

/// Runs a started job in a task of its own, holding `permit` while its
/// handler runs, and keeps it in the active registry (heartbeat, orphan
/// detection) until its outcome is recorded. Shared by recoverable and
/// reliable modes.
pub(crate) fn spawn_started(
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    (mode, keys): (Mode, &Arc<QueueKeys>),
    (id, token): (String, String),
    start: Start,
    permit: OwnedSemaphorePermit,
) {
    shared.active.insert(keys.queue(), &id, &token);
    let (shared, keys) = (shared.clone(), keys.clone());
    tasks.spawn(async move {
        run_started(&shared, mode, &keys, (&id, &token), start, permit).await;
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

/// Acts on a start decision: runs the job and records its outcome, or counts
/// a dead-lettered job. The job's slot is free again as soon as its handler
/// has returned: the next job can start while the outcome is being recorded
/// (the ID stays in its claim, lease or in-flight list, until then).
async fn run_started(
    shared: &Shared,
    mode: Mode,
    keys: &Arc<QueueKeys>,
    (id, token): (&str, &str),
    start: Start,
    permit: OwnedSemaphorePermit,
) {
    match start {
        Start::Run {
            enc,
            payload,
            attempt,
        } => {
            let input = Input {
                id: id.to_owned(),
                queue: keys.queue().to_owned(),
                enc,
                payload,
                attempt,
            };
            let outcome = execute::run(&shared.handler, input, &shared.hard_stop).await;
            drop(permit);
            // Boxed: keeps the spawned task small (it is moved on spawn).
            Box::pin(finish(shared, mode, keys, (id, token), outcome)).await;
        }
        Start::Dead => {
            tracing::warn!(job = %id, queue = keys.queue(), "job stalled too often: dead-lettered");
            Counters::add(&shared.counters.dead_lettered, 1);
        }
        Start::Skip(why) => tracing::debug!(job = %id, why, "claimed job not run"),
        Start::Missed => {}
    }
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
        Outcome::Completed(result) => OwnedFinish::Completed(result),
        o @ Outcome::Failed(..) => {
            let retry = o.retryable();
            let Outcome::Failed(failure, message) = o else {
                unreachable!()
            };
            tracing::info!(job = %id, queue = keys.queue(), %failure, message, "job failed");
            OwnedFinish::Failed {
                kind: failure.as_str().to_owned(),
                message,
                retry,
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
        Err(Error::NotActive { state, .. }) => {
            // A retried call whose first try had already landed.
            tracing::debug!(job = %id, state, "outcome already recorded");
        }
        Err(e) => {
            tracing::error!(job = %id, error = %e, "could not record the outcome; the job will run again");
            // Recoverable mode: its lease runs out and the sweep requeues it.
            // Reliable mode: it is still in this worker's in-flight list;
            // the fetch loop finds it there and starts it again.
            shared.unrecorded.store(true, Ordering::Release);
        }
    }
}

/// Counts an outcome-recording call in flight (see `Shared::recording`)
/// until dropped.
struct Recording<'a>(&'a Shared);

impl<'a> Recording<'a> {
    /// Counts a call by the finisher.
    fn start(shared: &'a Shared) -> Self {
        shared.recording.fetch_add(1, Ordering::AcqRel);
        Self(shared)
    }

    /// Counts a call when none is in flight; `None` when one is (the
    /// outcome should then join the finisher's next batch).
    fn start_if_idle(shared: &'a Shared) -> Option<Self> {
        shared
            .recording
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Self(shared))
    }
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        self.0.recording.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An outcome waiting for the finisher.
pub(crate) struct FinishRequest {
    keys: Arc<QueueKeys>,
    mode: Mode,
    item: BatchItem,
    done: oneshot::Sender<Result<String, Error>>,
}

/// Sends one call for `items` (all of one queue): `job_finish` for a lone
/// outcome, `job_finish_batch` for several; retries transient failures.
async fn record(
    shared: &Shared,
    keys: &QueueKeys,
    (mode, claim): (Mode, &str),
    items: &[BatchItem],
) -> Result<Vec<Result<String, Error>>, Error> {
    let (ttl, sharded) = (shared.settings.result_ttl, shared.con.is_cluster());
    if let [item] = items {
        let finish = item.finish.borrowed();
        let call = transitions::job_finish(
            keys,
            mode,
            claim,
            (&item.id, &item.token),
            &finish,
            ttl,
            sharded,
        );
        return match persist::<String>(&shared.con, &call, keys, Some(&item.id)).await {
            Err(
                e @ (Error::JobNotFound { .. } | Error::LeaseLost { .. } | Error::NotActive { .. }),
            ) => Ok(vec![Err(e)]),
            other => Ok(vec![Ok(other?)]),
        };
    }
    let call = transitions::job_finish_batch(keys, (mode, claim), items, ttl, sharded);
    let replies: Vec<String> = persist(&shared.con, &call, keys, None).await?;
    transitions::finish_batch_results(keys, items, replies)
}

/// Most outcomes in one `job_finish_batch` call.
const FINISH_BATCH: usize = 100;

/// Records outcomes: takes every request waiting, and sends one
/// `job_finish_batch` call per queue (a queue's keys share one slot). While a
/// call is in flight, new outcomes gather for the next one, so the batches
/// grow with the load and a lone outcome goes out at once.
pub(crate) async fn finisher(
    shared: Arc<Shared>,
    mut requests: mpsc::UnboundedReceiver<FinishRequest>,
) {
    loop {
        let first = tokio::select! {
            r = requests.recv() => match r {
                Some(r) => r,
                None => return,
            },
            _ = shared.finished.cancelled() => return,
        };
        let mut waiting = vec![first];
        while waiting.len() < FINISH_BATCH {
            match requests.try_recv() {
                Ok(r) => waiting.push(r),
                Err(_) => break,
            }
        }
        while !waiting.is_empty() {
            let queue = waiting[0].keys.queue().to_owned();
            let (batch, rest): (Vec<_>, Vec<_>) =
                waiting.into_iter().partition(|r| r.keys.queue() == queue);
            waiting = rest;
            let (keys, mode) = (batch[0].keys.clone(), batch[0].mode);
            let claim = transitions::claim_key(&keys, mode, &shared.id);
            let (items, dones): (Vec<BatchItem>, Vec<_>) =
                batch.into_iter().map(|r| (r.item, r.done)).unzip();
            let recording = Recording::start(&shared);
            let recorded = record(&shared, &keys, (mode, &claim), &items).await;
            drop(recording);
            match recorded {
                Ok(results) => {
                    for (done, result) in dones.into_iter().zip(results) {
                        let _ = done.send(result);
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for done in dones {
                        let _ = done.send(Err(Error::Script {
                            script: "job_finish_batch",
                            code: "JQ_UNRECORDED".into(),
                            message: message.clone(),
                        }));
                    }
                }
            }
        }
    }
}

/// Renews the leases of this worker's running jobs every third of the lease,
/// one call per queue, until the worker has finished.
async fn heartbeat(shared: Arc<Shared>) {
    let every = shared.settings.lease / 3;
    loop {
        tokio::select! {
            _ = shared.finished.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        for keys in &shared.queues {
            let jobs = shared.active.of(keys.queue());
            if jobs.is_empty() {
                continue;
            }
            match transitions::job_extend(&shared.con, keys, shared.settings.lease, &jobs).await {
                Ok(lost) if lost.is_empty() => {}
                Ok(lost) => tracing::warn!(
                    queue = keys.queue(),
                    ?lost,
                    "leases lost: these jobs were requeued"
                ),
                Err(e) => tracing::warn!(queue = keys.queue(), error = %e, "heartbeat failed"),
            }
        }
    }
}

/// Requeues jobs whose leases ran out: once at start-up, then every sweep
/// interval; the sweep guard lets one worker per interval do it.
async fn sweeper(shared: Arc<Shared>) {
    let every = shared.settings.sweep_every();
    loop {
        for keys in &shared.queues {
            match transitions::job_requeue_stale(&shared.con, keys, every, SWEEP_LIMIT).await {
                Ok(Some(n)) if n > 0 => tracing::warn!(
                    queue = keys.queue(),
                    requeued = n,
                    "requeued jobs whose lease ran out"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(queue = keys.queue(), error = %e, "sweep failed"),
            }
        }
        tokio::select! {
            _ = shared.finished.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Active;

    #[test]
    fn an_ended_attempt_does_not_forget_a_newer_attempt_of_the_same_job() {
        let active = Active::default();
        active.insert("q", "j1", "1");
        // The same worker starts the job again (a retry it took back)
        // before the first attempt's task has ended.
        active.insert("q", "j1", "2");
        active.remove("q", "j1", "1");
        assert_eq!(active.of("q"), vec![("j1".to_owned(), "2".to_owned())]);
        active.remove("q", "j1", "2");
        assert!(active.of("q").is_empty());
    }
}
