//! Recoverable mode: claim job IDs under leases and fencing tokens, run
//! them, record outcomes in the job hashes; renew leases (heartbeat) and
//! requeue jobs whose leases ran out (sweep).
//!
//! The fetch loop first claims without blocking, queue by queue in priority
//! order (`job_claim`). When every queue is empty it blocks on the queues'
//! ticket lists (BLMPOP), never on the job IDs: a worker that dies right
//! after a pop loses a ticket (other workers find the job on their next
//! pass, at most one block timeout later), never a job.
//!
//! A queue whose gate (pause, limits) holds the worker back is skipped, and
//! its gate list takes the place of its tickets in the blocking pop (see
//! `gate`).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use super::attempt::{spawn_started, start_settings};
use super::fetch::{Fetcher, pause};
use super::health::is_fatal;
use super::{Backoff, Shared, queue_of, queues_to_serve, rest_queues_of, take_slots};
use crate::error::Error;
use crate::keys::QueueKeys;
use crate::mode::Mode;
use crate::transitions::{self, Claim};

/// Most jobs one sweep call requeues.
const SWEEP_LIMIT: usize = 1000;

/// Starts the heartbeat and the sweeper. They run until the worker has
/// finished, or until the returned handles are dropped (the worker's future
/// was dropped: as if its process died).
pub(crate) fn background(shared: &Arc<Shared>) -> Vec<AbortOnDropHandle<()>> {
    vec![
        AbortOnDropHandle::new(tokio::spawn(heartbeat(shared.clone()))),
        AbortOnDropHandle::new(tokio::spawn(sweeper(shared.clone()))),
    ]
}

/// A claimed job of one queue: the queue, the ID as stored, the token, and
/// whether the queue has a concurrency limit.
type Claimed = (Arc<QueueKeys>, Vec<u8>, String, bool);

/// The list the blocking pop waits on for `queue`: its gate list while its
/// gate holds the worker back, else its tickets.
fn wait_key(shared: &Shared, queue: &QueueKeys) -> String {
    if shared.holds.is_held(queue.queue()) {
        queue.gate()
    } else {
        queue.tickets()
    }
}

/// Remembers whether `job_claim` on `keys` was held back by the gate.
fn note_gate(shared: &Shared, keys: &QueueKeys, got: &transitions::Claimed) {
    match &got.hold {
        Some(hold) => shared
            .holds
            .hold(keys.queue(), hold, shared.config.block_timeout),
        None => shared.holds.release(keys.queue()),
    }
}

/// Claims and runs jobs while there are free slots, until shutdown. A queue
/// whose calls fail for a reason retrying at once cannot fix is rested while
/// the others are served.
pub(crate) async fn fetch_loop(shared: &Arc<Shared>, tasks: &mut JoinSet<()>) -> Result<(), Error> {
    let slots = Arc::new(Semaphore::new(shared.settings.concurrency));
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
        let serving = queues_to_serve(shared).await;
        if serving.is_empty() {
            continue;
        }
        let mut claimed = if drained {
            Vec::new()
        } else {
            match claim_in_order(shared, &serving, permits.len()).await {
                Ok(c) => c,
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!(worker = %shared.id, error = %e, "claim failed; retrying");
                    pause(&shared.shutdown, backoff.next()).await;
                    continue;
                }
            }
        };
        backoff.reset();
        drained = claimed.len() < permits.len();
        if claimed.is_empty() {
            // Every queue is empty: wait for a ticket. After a timeout, ask
            // the queues again (a ticket can be lost with a worker that died
            // right after popping it).
            let popped = fetcher
                .pop(shared, &serving, |q| wait_key(shared, q), 1)
                .await;
            let (key, popped) = match popped {
                Ok(Some(popped)) => popped,
                Ok(None) => {
                    drained = false;
                    continue;
                }
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => {
                    rest_queues_of(
                        shared,
                        &serving,
                        |q| wait_key(shared, q),
                        "wait for tickets",
                        &e,
                    );
                    drained = false;
                    continue;
                }
            };
            let keys = queue_of(shared, &key, |q| wait_key(shared, q));
            if key == keys.gate() {
                // More jobs may start on a held queue: ask it again now.
                shared.holds.wake(keys.queue());
                drained = false;
                continue;
            }
            if shared.shutdown.is_cancelled() {
                let _: redis::RedisResult<()> = redis::cmd("LPUSH")
                    .arg(&key)
                    .arg(&popped)
                    .query_async(&mut shared.con.clone())
                    .await;
                return Ok(());
            }
            let lease = shared.settings.lease;
            match transitions::job_claim(&shared.con, &keys, permits.len(), lease, (1, false)).await
            {
                Ok(got) => {
                    shared.health.recovered(keys.queue());
                    note_gate(shared, &keys, &got);
                    let limited = got.limited;
                    claimed = got
                        .jobs
                        .into_iter()
                        .map(|(id, token)| (keys.clone(), id, token, limited))
                        .collect()
                }
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => {
                    // The popped ticket goes back (the claim did not take
                    // its job), and the queues are asked again next round.
                    let _: redis::RedisResult<()> = redis::cmd("LPUSH")
                        .arg(&key)
                        .arg(&popped)
                        .query_async(&mut shared.con.clone())
                        .await;
                    drained = false;
                    if !e.is_transient() {
                        shared
                            .health
                            .failed(&shared.counters, keys.queue(), "claim", &e);
                    }
                    continue;
                }
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
    mut claimed: Vec<Claimed>,
    permits: &mut Vec<OwnedSemaphorePermit>,
) {
    let settings = start_settings(shared);
    while !claimed.is_empty() {
        let queue = claimed[0].0.queue().to_owned();
        let split = claimed
            .iter()
            .position(|(k, _, _, _)| k.queue() != queue)
            .unwrap_or(claimed.len());
        let rest = claimed.split_off(split);
        let (keys, limited) = (claimed[0].0.clone(), claimed[0].3);
        let claims: Vec<Claim> = claimed
            .into_iter()
            .map(|(_, id, token, _)| (id, token))
            .collect();
        claimed = rest;
        match transitions::job_start(&shared.con, &keys, (&claims, limited), &settings).await {
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
            Err(e) if e.is_transient() => {
                tracing::warn!(queue = %queue, jobs = claims.len(), error = %e, "could not start claimed jobs; their leases will run out")
            }
            Err(e) => {
                // Their leases run out and the sweep requeues them.
                shared
                    .health
                    .failed(&shared.counters, &queue, "start claimed jobs", &e);
            }
        }
    }
}

/// Claims up to `count` jobs from the `serving` queues, in priority order. A
/// queue whose claim is refused is rested and skipped; a transient failure
/// ends the round with what was claimed, or as an error when nothing was.
async fn claim_in_order(
    shared: &Shared,
    serving: &[&Arc<QueueKeys>],
    count: usize,
) -> Result<Vec<Claimed>, Error> {
    let mut claimed = Vec::new();
    for keys in serving {
        let want = count - claimed.len();
        if want == 0 {
            break;
        }
        if !shared.holds.may_ask(keys.queue()) {
            // Held back by its gate: its gate list wakes the worker.
            continue;
        }
        let held = shared.holds.is_held(keys.queue());
        let lease = shared.settings.lease;
        match transitions::job_claim(&shared.con, keys, want, lease, (0, held)).await {
            Ok(got) => {
                shared.health.recovered(keys.queue());
                note_gate(shared, keys, &got);
                let limited = got.limited;
                claimed.extend(
                    got.jobs
                        .into_iter()
                        .map(|(id, token)| (Arc::clone(keys), id, token, limited)),
                );
            }
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) if e.is_transient() && claimed.is_empty() => return Err(e),
            Err(e) if e.is_transient() => break,
            Err(e) => shared
                .health
                .failed(&shared.counters, keys.queue(), "claim", &e),
        }
    }
    Ok(claimed)
}

/// Renews the leases of this worker's running jobs every third of the lease,
/// one call per queue, until the worker has finished.
async fn heartbeat(shared: Arc<Shared>) {
    loop {
        // Every third of the shortest lease among the running jobs (a job
        // may have its own, shorter than the worker's default); at once when
        // a job with a shorter one starts.
        let lease = shared
            .active
            .shortest_lease()
            .map_or(shared.settings.lease, |l| l.min(shared.settings.lease));
        tokio::select! {
            _ = shared.finished.cancelled() => return,
            _ = tokio::time::sleep(lease / 3) => {}
            _ = shared.active.shorter_lease.notified() => {}
        }
        for keys in &shared.queues {
            let jobs = shared.active.of(keys.queue());
            if jobs.is_empty() {
                continue;
            }
            match transitions::job_extend(&shared.con, keys, shared.settings.lease, &jobs).await {
                Ok(lost) if lost.is_empty() => {}
                Ok(lost) => {
                    tracing::warn!(
                        queue = keys.queue(),
                        ?lost,
                        "leases lost: these jobs were requeued"
                    );
                    // Renewing them again would only report them lost again
                    // (protocol.md 8.4 step 5); their outcomes are still
                    // recorded when their handlers end.
                    // A lost job may have been cancelled (the cancel drops
                    // its lease): tell its handler if so.
                    super::cancels::check(&shared, keys, &lost).await;
                    for (id, token) in jobs.iter().filter(|(id, _)| lost.contains(id)) {
                        shared.active.remove(keys.queue(), id, token);
                    }
                }
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
            if shared.health.is_resting(keys.queue()) {
                // Failed lately: try again when its rest is over (failing
                // again meanwhile would only lengthen the rest).
                continue;
            }
            match transitions::job_requeue_stale(&shared.con, keys, every, SWEEP_LIMIT).await {
                Ok(Some(n)) if n > 0 => tracing::warn!(
                    queue = keys.queue(),
                    requeued = n,
                    "requeued jobs whose lease ran out"
                ),
                Ok(_) => {}
                Err(e) if e.is_transient() => {
                    tracing::warn!(queue = keys.queue(), error = %e, "sweep failed")
                }
                Err(e) => shared
                    .health
                    .failed(&shared.counters, keys.queue(), "sweep", &e),
            }
        }
        tokio::select! {
            _ = shared.finished.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
