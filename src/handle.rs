//! [`JobHandle`]: a submitted job whose outcome can be awaited.

use std::sync::Arc;
use std::time::Duration;

use crate::connection::Conn;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::encoding::Encoding;
use crate::error::Error;
use crate::failure::FailureKind;
use crate::keys::QueueKeys;
use crate::replies::Waiter;
use crate::transitions::{self, Watch};
use crate::wire::{COMPLETED, Reply};

/// A submitted job. Await its outcome with [`JobHandle::result`] or
/// [`JobHandle::result_timeout`]; dropping the handle stops listening for it
/// (the job still runs).
pub struct JobHandle {
    id: String,
    waiter: Waiter,
    stored: Option<Arc<Stored>>,
    /// Submitted by this client: the job's doorbell is already ours, so the
    /// first read can wait for it.
    fresh: bool,
}

/// What a handle needs to read a stored outcome (recoverable mode).
#[derive(Clone)]
pub(crate) struct Stored {
    pub con: Conn,
    pub keys: QueueKeys,
    pub client_id: String,
    pub poll: Duration,
    pub reconnects: watch::Receiver<u64>,
    /// Read outcomes from the hash only ([`crate::Config::verify_outcomes`]).
    pub verify: bool,
    /// The queue's mode (recoverable or reliable).
    pub mode: crate::Mode,
    /// The client (its subscriptions, for following progress).
    pub client: crate::Client,
}

impl std::fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobHandle").field("id", &self.id).finish()
    }
}

impl JobHandle {
    pub(crate) fn new(
        id: String,
        waiter: Waiter,
        stored: Option<Arc<Stored>>,
        fresh: bool,
    ) -> Self {
        Self {
            id,
            waiter,
            stored,
            fresh,
        }
    }

    /// The job's ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The job's stored context (recoverable and reliable modes).
    pub(crate) fn stored(&self) -> Option<&Arc<Stored>> {
        self.stored.as_ref()
    }

    /// Waits for the job's outcome and decodes its result as `R`.
    ///
    /// In recoverable mode the outcome is read from the job's hash (the
    /// source of truth): at once if the job already finished, else when the
    /// worker rings the client's doorbell, when the client's subscription
    /// was restored after a disconnection, or every
    /// [`crate::Config::result_poll_interval`].
    ///
    /// # Errors
    /// [`Error::JobFailed`] when the handler failed or panicked, the worker
    /// could not decode the payload, or the job stalled too often (kind
    /// `stalled`); [`Error::Decode`] when the result is not an `R`;
    /// [`Error::JobNotFound`] when the job does not exist (or expired);
    /// [`Error::ClientClosed`] when the client was dropped first.
    pub async fn result<R: DeserializeOwned>(mut self) -> Result<R, Error> {
        let Some(stored) = self.stored.take() else {
            return match self.waiter.recv().await {
                Some(reply) => decode_reply(reply),
                None => Err(Error::ClientClosed { job_id: self.id }),
            };
        };
        let mut reconnects = stored.reconnects.clone();
        let mut read = !self.fresh;
        // How long to wait before reading again after a failed read.
        let mut retry = Duration::from_millis(50);
        loop {
            if !read {
                // A job this client just submitted cannot have finished
                // unannounced: wait for its doorbell (or a reconnection, or
                // the poll interval) before the first read.
                read = true;
            } else {
                let watched =
                    transitions::job_watch(&stored.con, &stored.keys, &self.id, &stored.client_id)
                        .await;
                let watched = match watched {
                    Ok(w) => w,
                    // Scripts missing in the no-loading ACL profile (after a
                    // restart, until an operator loads them) are retried as
                    // well: the job is safe in Redis meanwhile.
                    Err(e) if e.is_transient() || matches!(e, Error::ScriptsNotLoaded { .. }) => {
                        // A failover, a restart, a server still loading, a
                        // dropped connection: the job is safe in Redis. Read
                        // again until it can be read; only the caller's own
                        // timeout ends the wait.
                        tracing::debug!(job = %self.id, error = %e, "cannot read the job's state yet; retrying");
                        tokio::select! {
                            bell = self.waiter.recv() => match bell {
                                None => return Err(Error::ClientClosed { job_id: self.id }),
                                Some(reply) if !stored.verify && carries_outcome(&reply) => {
                                    return decode_reply(reply);
                                }
                                Some(_) => self.waiter.rearm(),
                            },
                            _ = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(Duration::from_secs(1));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                retry = Duration::from_millis(50);
                match watched {
                    Watch::Completed { enc, result } => return decode_result(&enc, &result),
                    Watch::Failed { kind, message } => {
                        return Err(failure(self.id, FailureKind::parse(&kind), message));
                    }
                    Watch::Missing => {
                        return Err(Error::JobNotFound {
                            queue: stored.keys.queue().to_owned(),
                            job_id: self.id,
                        });
                    }
                    Watch::Waiting => {}
                }
            }
            tokio::select! {
                bell = self.waiter.recv() => {
                    match bell {
                        None => return Err(Error::ClientClosed { job_id: self.id }),
                        // The doorbell carries the outcome: no need to read
                        // it (unless outcomes are verified in the hash).
                        Some(reply) if !stored.verify && carries_outcome(&reply) => {
                            return decode_reply(reply);
                        }
                        Some(_) => self.waiter.rearm(),
                    }
                }
                _ = reconnects.changed() => {}
                _ = tokio::time::sleep(stored.poll) => {}
            }
        }
    }

    /// Like [`JobHandle::result`], but gives up after `timeout` with
    /// [`Error::Timeout`]. The job itself is not cancelled.
    pub async fn result_timeout<R: DeserializeOwned>(self, timeout: Duration) -> Result<R, Error> {
        let id = self.id.clone();
        match tokio::time::timeout(timeout, self.result()).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                job_id: id,
                after: timeout,
            }),
        }
    }
}

fn decode_result<R: DeserializeOwned>(enc_name: &str, bytes: &[u8]) -> Result<R, Error> {
    let enc = Encoding::parse(enc_name).ok_or_else(|| Error::Decode {
        what: "result",
        message: format!("unknown encoding {enc_name:?}"),
    })?;
    enc.decode(bytes, "result")
}

/// True when a doorbell carries the job's outcome (`job_finish` writes it;
/// other doorbells only say that the job finished).
fn carries_outcome(reply: &Reply) -> bool {
    (reply.status == COMPLETED && reply.result.is_some()) || reply.error.is_some()
}

/// Turns an outcome message (a simple-mode reply, or a doorbell that
/// carries the outcome) into the caller's result.
pub(crate) fn decode_reply<R: DeserializeOwned>(reply: Reply) -> Result<R, Error> {
    if reply.status == COMPLETED {
        let bytes: &[u8] = reply.result.as_ref().map_or(&[], |b| b.as_slice());
        return decode_result(reply.enc.as_deref().unwrap_or("msgpack"), bytes);
    }
    let (kind, message) = match reply.error {
        Some(e) => (FailureKind::parse(&e.kind), e.message),
        None => (
            FailureKind::Other(reply.status.clone()),
            format!("status {:?}", reply.status),
        ),
    };
    Err(failure(reply.id, kind, message))
}

/// The error for a job that did not complete: [`Error::Cancelled`] for a
/// cancelled one, else [`Error::JobFailed`].
fn failure(job_id: String, kind: FailureKind, message: String) -> Error {
    match kind {
        FailureKind::Cancelled => Error::Cancelled { job_id, message },
        kind => Error::JobFailed {
            job_id,
            kind,
            message,
        },
    }
}
