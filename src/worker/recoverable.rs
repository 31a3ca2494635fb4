//! Recoverable mode: claim job IDs under leases and fencing tokens, run
//! them, record outcomes in the job hashes; renew leases (heartbeat) and
//! requeue jobs whose leases ran out (sweep).
//!
//! The fetch loop first claims without blocking, queue by queue in priority
//! order (`job_claim`). When every queue is empty it blocks on the queues'
//! ticket lists (BLMPOP), never on the job IDs: a worker that dies right
//! after a pop loses a ticket (other workers find the job on their next
//! pass, at most one block timeout later), never a job.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use super::attempt::{spawn_started, start_settings};
use super::fetch::{Fetcher, pause};
use super::{Backoff, Shared, queue_of, take_slots};
use crate::error::Error;
use crate::keys::QueueKeys;
use crate::mode::Mode;
use crate::transitions;

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
