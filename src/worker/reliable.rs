//! Reliable mode: move job IDs atomically into this worker's own in-flight
//! list (BLMOVE, or `reliable_start` from the pending list for several at
//! once), run them under a fencing token, keep all of them alive with one
//! heartbeat, and recover the in-flight lists of dead workers.
//!
//! Invariant: every job ID is in the queue's pending list, in exactly one
//! worker's in-flight list, or its job has finished. A worker registers its
//! heartbeat before it takes anything, and renews it before taking more when
//! it has been paused, so an in-flight list is never invisible to recovery.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use super::attempt::{spawn_started, start_settings};
use super::fetch::{Fetcher, pause};
use super::{Backoff, Counters, Shared, take_slots};
use crate::error::Error;
use crate::keys::QueueKeys;
use crate::mode::Mode;
use crate::transitions::{self, Source, Start};

/// Most dead workers one recovery pass handles.
const RECOVERY_LIMIT: usize = 100;

/// How long a dead worker stays in the worker set (so that IDs a paused
/// "dead" worker takes later are still found): ten heartbeat TTLs, at least
/// a minute.
fn retention(shared: &Shared) -> Duration {
    (shared.settings.lease * 10).max(Duration::from_secs(60))
}

/// Starts the heartbeat and the recovery sweeper (see `recoverable::background`).
pub(crate) fn background(shared: &Arc<Shared>) -> Vec<AbortOnDropHandle<()>> {
    vec![
        AbortOnDropHandle::new(tokio::spawn(heartbeat(shared.clone()))),
        AbortOnDropHandle::new(tokio::spawn(recovery(shared.clone()))),
    ]
}

/// Renews this worker's heartbeat; records when it succeeded.
async fn beat(shared: &Shared, keys: &QueueKeys) -> Result<(), Error> {
    let alive =
        transitions::reliable_heartbeat(&shared.con, keys, &shared.id, shared.settings.lease)
            .await?;
    let mut last = shared.last_beat.lock().expect("heartbeat lock");
    if !alive && last.is_some() {
        tracing::warn!(worker = %shared.id, "this worker was declared dead (paused past its heartbeat): its jobs were requeued");
    }
    *last = Some(Instant::now());
    Ok(())
}

/// True when the last successful heartbeat is recent enough to take jobs.
fn beat_is_fresh(shared: &Shared) -> bool {
    let last = *shared.last_beat.lock().expect("heartbeat lock");
    last.is_some_and(|t| t.elapsed() < shared.settings.lease / 2)
}

/// Takes and runs jobs while there are free slots, until shutdown.
///
/// With a backlog, each round looks at the oldest IDs of the pending list
/// (LRANGE, one per free slot) and takes and starts them in one
/// `reliable_start` call. When the list looked empty, it blocks on BLMOVE
/// instead, which moves one ID into the in-flight list atomically.
pub(crate) async fn fetch_loop(shared: &Arc<Shared>, tasks: &mut JoinSet<()>) -> Result<(), Error> {
    let keys = shared.queues[0].clone();
    let pending = keys.pending();
    let inflight = keys.inflight(&shared.id);
    let slots = Arc::new(Semaphore::new(shared.settings.concurrency));
    let mut fetcher = Fetcher::default();
    let mut backoff = Backoff::default();
    // IDs in our in-flight list that no task runs (a BLMOVE reply lost with
    // a dropped connection, or a start whose reply was lost): started first.
    let mut unstarted: VecDeque<String> = VecDeque::new();
    let mut reconcile = false;
    // The pending list looked empty: block on it instead of looking again.
    let mut drained = false;
    loop {
        while tasks.try_join_next().is_some() {}
        let Some(mut permits) = take_slots(shared, &slots).await else {
            return Ok(());
        };
        if !beat_is_fresh(shared)
            && let Err(e) = beat(shared, &keys).await
        {
            if !e.is_transient() {
                return Err(e);
            }
            tracing::warn!(worker = %shared.id, error = %e, "heartbeat failed; not taking jobs");
            pause(&shared.shutdown, backoff.next()).await;
            continue;
        }
        let dropped = fetcher.take_reconnected();
        let unrecorded = shared.unrecorded.swap(false, Ordering::AcqRel);
        if std::mem::take(&mut reconcile) || dropped || unrecorded {
            match find_orphans(shared, &inflight).await {
                Ok(orphans) => unstarted = orphans.into(),
                Err(e) if e.is_transient() => {
                    reconcile = true;
                    pause(&shared.shutdown, backoff.next()).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let (source, mut ids) = if unstarted.is_empty() {
            (Source::Pending, Vec::new())
        } else {
            let n = permits.len().min(unstarted.len());
            (Source::InFlight, unstarted.drain(..n).collect())
        };
        if ids.is_empty() && !drained {
            match peek(shared, &pending, permits.len()).await {
                Ok(seen) => {
                    drained = seen.len() < permits.len();
                    ids = seen;
                }
                Err(e) if e.is_transient() => {
                    pause(&shared.shutdown, backoff.next()).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let source = if ids.is_empty() {
            // Nothing waiting: block until an ID arrives, moving it into our
            // in-flight list atomically. An ID moved after shutdown began
            // stays there and is requeued by `leave`.
            drained = false;
            match fetcher.moved(shared, &pending, &inflight).await? {
                Some(id) if !shared.shutdown.is_cancelled() => ids.push(id),
                _ => continue,
            }
            Source::InFlight
        } else {
            source
        };
        let settings = start_settings(shared);
        let decisions = match transitions::reliable_start(
            &shared.con,
            &keys,
            (source, &ids),
            &settings,
        )
        .await
        {
            Ok(decisions) => decisions,
            Err(e) if e.is_transient() => {
                // The call may have run: whatever it moved is in our
                // in-flight list, found by the reconciliation.
                tracing::warn!(worker = %shared.id, error = %e, "could not start jobs; retrying");
                reconcile = true;
                pause(&shared.shutdown, backoff.next()).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        backoff.reset();
        for (id, (start, token)) in ids.into_iter().zip(decisions) {
            if matches!(start, Start::Missed) {
                // Another worker took it: look again.
                drained = false;
                continue;
            }
            let permit = permits
                .pop()
                .expect("never starts more than the free slots");
            spawn_started(
                shared,
                tasks,
                (Mode::Reliable, &keys),
                (id, token),
                start,
                permit,
            );
        }
    }
}

/// The oldest `count` IDs of the pending list, oldest first.
async fn peek(shared: &Shared, pending: &str, count: usize) -> Result<Vec<String>, Error> {
    let mut ids: Vec<String> = redis::cmd("LRANGE")
        .arg(pending)
        .arg(-(count as i64))
        .arg(-1)
        .query_async(&mut shared.con.clone())
        .await?;
    ids.reverse();
    Ok(ids)
}

/// IDs in this worker's in-flight list that no task is running, oldest first.
async fn find_orphans(shared: &Shared, inflight: &str) -> Result<Vec<String>, Error> {
    // The running set first: a job whose task ends meanwhile has left the
    // list by then (its outcome recorded), so it cannot pass for an orphan.
    let running = shared.active.of(shared.queues[0].queue());
    let listed: Vec<String> = redis::cmd("LRANGE")
        .arg(inflight)
        .arg(0)
        .arg(-1)
        .query_async(&mut shared.con.clone())
        .await?;
    let orphans: Vec<String> = listed
        .into_iter()
        .rev() // oldest first
        .filter(|id| !running.iter().any(|(r, _)| r == id))
        .collect();
    if !orphans.is_empty() {
        tracing::warn!(worker = %shared.id, count = orphans.len(), "starting jobs whose move or start reply was lost");
    }
    Ok(orphans)
}

/// After the last job ended: puts whatever is left in this worker's
/// in-flight list (IDs moved after shutdown began, or never started) back on
/// the queue at once, and forgets the worker.
pub(crate) async fn leave(shared: &Shared) {
    let keys = &shared.queues[0];
    match transitions::reliable_requeue_worker(
        &shared.con,
        keys,
        &shared.id,
        false,
        retention(shared),
    )
    .await
    {
        Ok(Some(n)) => Counters::add(&shared.counters.returned, n),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(worker = %shared.id, error = %e, "could not requeue in-flight jobs; recovery will")
        }
    }
}

/// Renews the heartbeat every third of its TTL until the worker has finished.
async fn heartbeat(shared: Arc<Shared>) {
    let keys = shared.queues[0].clone();
    loop {
        if let Err(e) = beat(&shared, &keys).await {
            tracing::warn!(worker = %shared.id, error = %e, "heartbeat failed");
        }
        tokio::select! {
            _ = shared.finished.cancelled() => return,
            _ = tokio::time::sleep(shared.settings.lease / 3) => {}
        }
    }
}

/// Recovers dead workers' in-flight lists: at start-up, then every sweep
/// interval; the guard lets one worker per interval do it.
async fn recovery(shared: Arc<Shared>) {
    let keys = shared.queues[0].clone();
    let every = shared.settings.sweep_every();
    loop {
        match transitions::reliable_find_dead(&shared.con, &keys, every, RECOVERY_LIMIT).await {
            Ok(Some(dead)) => {
                for worker in dead.iter().filter(|w| **w != shared.id) {
                    match transitions::reliable_requeue_worker(
                        &shared.con,
                        &keys,
                        worker,
                        true,
                        retention(&shared),
                    )
                    .await
                    {
                        Ok(Some(n)) if n > 0 => {
                            tracing::warn!(queue = keys.queue(), dead_worker = %worker, requeued = n, "recovered a dead worker's jobs")
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(queue = keys.queue(), error = %e, "recovery failed")
                        }
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(queue = keys.queue(), error = %e, "recovery failed"),
        }
        tokio::select! {
            _ = shared.finished.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
