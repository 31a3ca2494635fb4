//! [`JobHandle`]: a submitted job whose outcome can be awaited.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::encoding::Encoding;
use crate::error::Error;
use crate::failure::FailureKind;
use crate::replies::Waiter;
use crate::wire::{COMPLETED, Reply};

/// A submitted job. Await its outcome with [`JobHandle::result`] or
/// [`JobHandle::result_timeout`]; dropping the handle stops listening for it
/// (the job still runs).
pub struct JobHandle {
    id: String,
    waiter: Waiter,
}

impl std::fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobHandle").field("id", &self.id).finish()
    }
}

impl JobHandle {
    pub(crate) fn new(id: String, waiter: Waiter) -> Self {
        Self { id, waiter }
    }

    /// The job's ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits for the job's outcome and decodes its result as `R`.
    ///
    /// # Errors
    /// [`Error::JobFailed`] when the handler failed or panicked or the worker
    /// could not decode the payload; [`Error::Decode`] when the result is not
    /// an `R`; [`Error::ClientClosed`] when the client was dropped first.
    pub async fn result<R: DeserializeOwned>(mut self) -> Result<R, Error> {
        match self.waiter.recv().await {
            Some(reply) => decode_reply(reply),
            None => Err(Error::ClientClosed { job_id: self.id }),
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

/// Turns an outcome message into the caller's result.
pub(crate) fn decode_reply<R: DeserializeOwned>(reply: Reply) -> Result<R, Error> {
    if reply.status == COMPLETED {
        let enc_name = reply.enc.as_deref().unwrap_or("msgpack");
        let enc = Encoding::parse(enc_name).ok_or_else(|| Error::Decode {
            what: "result",
            message: format!("unknown encoding {enc_name:?}"),
        })?;
        let bytes: &[u8] = reply.result.as_ref().map_or(&[], |b| b.as_slice());
        return enc.decode(bytes, "result");
    }
    let (kind, message) = match reply.error {
        Some(e) => (FailureKind::parse(&e.kind), e.message),
        None => (
            FailureKind::Other(reply.status.clone()),
            format!("status {:?}", reply.status),
        ),
    };
    Err(Error::JobFailed {
        job_id: reply.id,
        kind,
        message,
    })
}
