//! Recording outcomes (recoverable and reliable modes): a lone outcome is
//! sent at once with `job_finish`; outcomes that finish while a call is in
//! flight are gathered per queue into one `job_finish_batch` call.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};

use super::{Shared, persist_counting};
use crate::error::Error;
use crate::keys::QueueKeys;
use crate::mode::Mode;
use crate::transitions::{self, BatchItem};

/// Counts an outcome-recording call in flight (see `Shared::recording`)
/// until dropped.
pub(super) struct Recording<'a>(&'a Shared);

impl<'a> Recording<'a> {
    /// Counts a call by the finisher.
    fn start(shared: &'a Shared) -> Self {
        shared.recording.fetch_add(1, Ordering::AcqRel);
        Self(shared)
    }

    /// Counts a call when none is in flight; `None` when one is (the
    /// outcome should then join the finisher's next batch).
    pub(super) fn start_if_idle(shared: &'a Shared) -> Option<Self> {
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
    pub(super) keys: Arc<QueueKeys>,
    pub(super) mode: Mode,
    pub(super) item: BatchItem,
    pub(super) done: oneshot::Sender<Result<String, Error>>,
}

/// Sends one call for `items` (all of one queue): `job_finish` for a lone
/// outcome, `job_finish_batch` for several; retries transient failures.
/// When a call had to be sent again and a job is then found already
/// finished in the very state this outcome gives it, the earlier try landed
/// (its reply was lost): that is this outcome, recorded.
pub(super) async fn record(
    shared: &Shared,
    keys: &QueueKeys,
    (mode, claim): (Mode, &str),
    items: &[BatchItem],
) -> Result<Vec<Result<String, Error>>, Error> {
    let (ttl, sharded) = (shared.settings.result_ttl, shared.con.is_cluster());
    let (results, resent) = if let [item] = items {
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
        let (result, resent) =
            persist_counting::<String>(&shared.con, &call, keys, Some(&item.id)).await;
        let result = match result {
            Err(
                e @ (Error::JobNotFound { .. } | Error::LeaseLost { .. } | Error::NotActive { .. }),
            ) => Err(e),
            other => Ok(other?),
        };
        (vec![result], resent)
    } else {
        let call = transitions::job_finish_batch(keys, (mode, claim), items, ttl, sharded);
        let (replies, resent) =
            persist_counting::<Vec<String>>(&shared.con, &call, keys, None).await;
        (
            transitions::finish_batch_results(keys, items, replies?)?,
            resent,
        )
    };
    if !resent {
        return Ok(results);
    }
    Ok(items
        .iter()
        .zip(results)
        .map(|(item, result)| match result {
            Err(Error::NotActive { state, .. }) if item.finish.leaves_state(&state) => Ok(state),
            other => other,
        })
        .collect())
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
                    // Every outcome of the call shares its error, typed.
                    for done in dones {
                        let _ = done.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}
