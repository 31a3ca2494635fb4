//! Cancellations of running jobs (protocol.md 8.11). `job_cancel` finishes
//! a running job in Redis and publishes `{id, status: "cancelled"}` on the
//! control channel of the job's worker (`<prefix>:{<queue>}:worker:<id>`,
//! one per queue). This worker listens there on a pub/sub connection of its
//! own and tells the job's handler at once ([`crate::Job::cancelled`]).
//!
//! A message can be missed (the connection dropped): after each
//! reconnection the worker reads the state of every job it runs, and so
//! does the recoverable heartbeat for a job whose lease it lost. A message
//! that arrives before the worker has registered the attempt it is about is
//! kept for a minute and applied when the attempt starts.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use super::Shared;
use crate::keys::QueueKeys;
use crate::replies::Replies;
use crate::wire::{Reply, unpack};

/// The status of a control message that cancels a running job.
const CANCELLED: &str = "cancelled";

/// Starts listening on this worker's control channels. The receiver
/// resolves once every channel is subscribed (protocol.md 8.11: before the
/// worker starts jobs).
pub(crate) fn background(
    shared: &Arc<Shared>,
) -> (AbortOnDropHandle<()>, tokio::sync::oneshot::Receiver<()>) {
    let (ready, subscribed) = tokio::sync::oneshot::channel();
    let task = AbortOnDropHandle::new(tokio::spawn(listen(shared.clone(), ready)));
    (task, subscribed)
}

async fn listen(shared: Arc<Shared>, ready: tokio::sync::oneshot::Sender<()>) {
    let replies = Replies::start(shared.client.clone(), &shared.config);
    let (sink, mut messages) = mpsc::unbounded_channel();
    let mut backoff = Duration::from_millis(50);
    for keys in &shared.queues {
        let channel = keys.worker_channel(&shared.id);
        while let Err(e) = replies.listen(&channel, sink.clone()).await {
            tracing::warn!(worker = %shared.id, %channel, error = %e, "cannot subscribe to the control channel; retrying");
            tokio::select! {
                _ = shared.finished.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
    let _ = ready.send(());
    let mut reconnects = replies.reconnects();
    loop {
        tokio::select! {
            _ = shared.finished.cancelled() => return,
            message = messages.recv() => match message {
                Some((channel, payload)) => on_message(&shared, &channel, &payload),
                None => return,
            },
            changed = reconnects.changed() => {
                if changed.is_err() {
                    return;
                }
                // Messages published meanwhile may be lost: look.
                for keys in &shared.queues {
                    let ids: Vec<String> =
                        shared.active.of(keys.queue()).into_iter().map(|(id, _)| id).collect();
                    check(&shared, keys, &ids).await;
                }
            }
        }
    }
}

fn on_message(shared: &Shared, channel: &str, payload: &[u8]) {
    let Some(keys) = shared
        .queues
        .iter()
        .find(|q| q.worker_channel(&shared.id) == channel)
    else {
        return;
    };
    match unpack::<Reply>(payload, "control message") {
        Ok(message) if message.status == CANCELLED => {
            tracing::info!(job = %message.id, queue = keys.queue(), "cancel received");
            shared.active.cancel(keys.queue(), &message.id);
        }
        Ok(message) => {
            tracing::debug!(status = %message.status, "ignoring a control message of another kind")
        }
        Err(e) => tracing::warn!(error = %e, "ignoring an undecodable control message"),
    }
}

/// True when Redis shows job `id` cancelled (state `failed`, kind
/// `cancelled`); also true when it cannot be read (the cancel message came
/// from `job_cancel`, which is the only writer of such messages).
pub(crate) async fn is_cancelled(shared: &Shared, keys: &QueueKeys, id: &str) -> bool {
    let read: redis::RedisResult<(Option<String>, Option<String>)> = redis::cmd("HMGET")
        .arg(keys.job(id))
        .arg("state")
        .arg("error_kind")
        .query_async(&mut shared.con.clone())
        .await;
    match read {
        Ok((state, kind)) => {
            state.as_deref() == Some("failed") && kind.as_deref() == Some(CANCELLED)
        }
        Err(_) => true,
    }
}

/// Reads the state of jobs `ids` of `keys`'s queue and tells the attempts
/// of those that were cancelled.
pub(crate) async fn check(shared: &Shared, keys: &QueueKeys, ids: &[String]) {
    for id in ids {
        let key = keys.job(id);
        let read: redis::RedisResult<(Option<String>, Option<String>)> = redis::cmd("HMGET")
            .arg(&key)
            .arg("state")
            .arg("error_kind")
            .query_async(&mut shared.con.clone())
            .await;
        match read {
            Ok((Some(state), Some(kind))) if state == "failed" && kind == CANCELLED => {
                tracing::info!(job = %id, queue = keys.queue(), "job found cancelled");
                shared.active.cancel(keys.queue(), id);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(job = %id, error = %e, "cannot read the job's state"),
        }
    }
}
