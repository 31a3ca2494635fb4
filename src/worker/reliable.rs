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
use super::health::is_fatal;
use super::{Backoff, Counters, Shared, take_slots};
use crate::error::{Error, on_key};
use crate::keys::QueueKeys;
use crate::mode::Mode;
use crate::transitions::{self, Source, Start};

/// Most dead workers one recovery pass handles.
const RECOVERY_LIMIT: usize = 100;

/// How long a dead worker stays in the worker set (so that IDs a paused
/// "dead" worker takes later are still found): ten heartbeat TTLs, at least
/// a minute, and at least two block timeouts plus a recovery interval and a
/// margin (a BLMOVE the worker sent before it stopped can be served up to a
/// block timeout later, and a recovery pass must still see its list).
fn retention(shared: &Shared) -> Duration {
    let blocked =
        shared.config.block_timeout * 2 + shared.settings.sweep_every() + Duration::from_secs(10);
    (shared.settings.lease * 10)
        .max(Duration::from_secs(60))
        .max(blocked)
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
///
/// IDs are handled as bytes (another program may have queued an ID that is
/// not UTF-8: `reliable_start` dead-letters it). When the queue fails for a
/// reason retrying at once cannot fix (a key of another Redis type), the
/// worker rests it with backoff and tries again; it never exits for it.
pub(crate) async fn fetch_loop(shared: &Arc<Shared>, tasks: &mut JoinSet<()>) -> Result<(), Error> {
    let keys = shared.queues[0].clone();
    let pending = keys.pending();
    let inflight = keys.inflight(&shared.id);
    let slots = Arc::new(Semaphore::new(shared.settings.concurrency));
    let mut fetcher = Fetcher::default();
    let mut backoff = Backoff::default();
    // IDs in our in-flight list that no task runs (a BLMOVE reply lost with
    // a dropped connection, or a start whose reply was lost): started first.
    let mut unstarted: VecDeque<Vec<u8>> = VecDeque::new();
    let mut reconcile = false;
    // The pending list looked empty: block on it instead of looking again.
    let mut drained = false;
    loop {
        while tasks.try_join_next().is_some() {}
        let Some(mut permits) = take_slots(shared, &slots).await else {
            return Ok(());
        };
        if let Some(rest) = shared.health.next_retry() {
            pause(&shared.shutdown, rest).await;
            continue;
        }
        if !beat_is_fresh(shared)
            && let Err(e) = beat(shared, &keys).await
        {
            tracing::warn!(worker = %shared.id, error = %e, "heartbeat failed; not taking jobs");
            setback(shared, &mut backoff, "heartbeat", e).await?;
            continue;
        }
        let dropped = fetcher.take_reconnected();
        let unrecorded = shared.unrecorded.swap(false, Ordering::AcqRel);
        if std::mem::take(&mut reconcile) || dropped || unrecorded {
            match find_orphans(shared, &inflight).await {
                Ok(orphans) => unstarted = orphans.into(),
                Err(e) => {
                    reconcile = true;
                    setback(shared, &mut backoff, "read the in-flight list", e).await?;
                    continue;
                }
            }
        }
        let queue = keys.queue();
        if !shared.holds.may_ask(queue) {
            // Held back by the queue's gate: wait on its gate list until it
            // is pushed or the hold's time to ask again comes.
            match fetcher.pop(shared, &[&keys], |q| q.gate(), 1).await {
                Ok(Some(_)) => shared.holds.wake(queue),
                Ok(None) => {}
                Err(e) => setback(shared, &mut backoff, "wait on the gate list", e).await?,
            }
            continue;
        }
        let held = shared.holds.is_held(queue);
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
                Err(e) => {
                    setback(shared, &mut backoff, "look at the pending list", e).await?;
                    continue;
                }
            }
        }
        let source = if ids.is_empty() {
            // Nothing waiting: block until an ID arrives, moving it into our
            // in-flight list atomically. An ID moved after shutdown began
            // stays there and is requeued by `leave`.
            drained = false;
            match fetcher.moved(shared, &pending, &inflight).await {
                Ok(Some(id)) if !shared.shutdown.is_cancelled() => ids.push(id),
                Ok(_) => continue,
                Err(e) => {
                    setback(shared, &mut backoff, "wait for jobs", e).await?;
                    continue;
                }
            }
            Source::InFlight
        } else {
            source
        };
        let settings = start_settings(shared);
        let decisions = match transitions::reliable_start(
            &shared.con,
            &keys,
            (source, &ids, held),
            &settings,
        )
        .await
        {
            Ok(decisions) => decisions,
            Err(e) => {
                // The call may have run: whatever it moved is in our
                // in-flight list, found by the reconciliation.
                tracing::warn!(worker = %shared.id, error = %e, "could not start jobs; retrying");
                reconcile = true;
                setback(shared, &mut backoff, "start jobs", e).await?;
                continue;
            }
        };
        backoff.reset();
        shared.health.recovered(queue);
        match decisions.iter().find_map(|(start, _)| match start {
            Start::Held(hold) => Some(hold),
            _ => None,
        }) {
            Some(hold) => {
                shared.holds.hold(queue, hold, shared.config.block_timeout);
                // Held IDs wait on the pending list (moved back there when
                // they came from our in-flight list).
                drained = false;
            }
            None => shared.holds.release(queue),
        }
        for (id, (start, token)) in ids.into_iter().zip(decisions) {
            if matches!(start, Start::Missed | Start::Held(_)) {
                // Another worker took it, or the gate held it back: look
                // again (when the gate lets us).
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

/// After `what` failed with `error`: a fatal error ends the fetch loop; a
/// transient one waits a backoff; any other rests the queue (logged and
/// counted), and the loop tries again when the rest is over.
async fn setback(
    shared: &Shared,
    backoff: &mut Backoff,
    what: &str,
    error: Error,
) -> Result<(), Error> {
    if is_fatal(&error) {
        return Err(error);
    }
    if error.is_transient() {
        pause(&shared.shutdown, backoff.next()).await;
    } else {
        let queue = shared.queues[0].queue();
        shared.health.failed(&shared.counters, queue, what, &error);
    }
    Ok(())
}

/// The oldest `count` IDs of the pending list, oldest first.
async fn peek(shared: &Shared, pending: &str, count: usize) -> Result<Vec<Vec<u8>>, Error> {
    let mut ids: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(pending)
        .arg(-(count as i64))
        .arg(-1)
        .query_async(&mut shared.con.clone())
        .await
        .map_err(|e| on_key(e, pending, "list"))?;
    ids.reverse();
    Ok(ids)
}

/// IDs in this worker's in-flight list that no task is running, oldest first.
async fn find_orphans(shared: &Shared, inflight: &str) -> Result<Vec<Vec<u8>>, Error> {
    // The running set first: a job whose task ends meanwhile has left the
    // list by then (its outcome recorded), so it cannot pass for an orphan.
    let running = shared.active.of(shared.queues[0].queue());
    let listed: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(inflight)
        .arg(0)
        .arg(-1)
        .query_async(&mut shared.con.clone())
        .await
        .map_err(|e| on_key(e, inflight, "list"))?;
    let orphans: Vec<Vec<u8>> = listed
        .into_iter()
        .rev() // oldest first
        .filter(|id| !running.iter().any(|(r, _)| r.as_bytes() == id.as_slice()))
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
        shared.id.as_bytes(),
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
        let found = if shared.health.is_resting(keys.queue()) {
            // Failed lately: try again when its rest is over.
            Ok(None)
        } else {
            transitions::reliable_find_dead(&shared.con, &keys, every, RECOVERY_LIMIT).await
        };
        match found {
            Ok(Some(dead)) => {
                for worker in dead.iter().filter(|w| w.as_slice() != shared.id.as_bytes()) {
                    let shown = String::from_utf8_lossy(worker);
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
                            tracing::warn!(queue = keys.queue(), dead_worker = %shown, requeued = n, "recovered a dead worker's jobs")
                        }
                        Ok(_) => {}
                        Err(e) => {
                            // One worker's list is broken: the others are
                            // still recovered.
                            tracing::error!(queue = keys.queue(), dead_worker = %shown, error = %e, "could not recover a dead worker's jobs")
                        }
                    }
                }
            }
            Ok(None) => {}
            Err(e) if e.is_transient() => {
                tracing::warn!(queue = keys.queue(), error = %e, "recovery failed")
            }
            Err(e) => {
                shared
                    .health
                    .failed(&shared.counters, keys.queue(), "recover dead workers", &e)
            }
        }
        tokio::select! {
            _ = shared.finished.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
