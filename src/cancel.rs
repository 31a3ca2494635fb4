//! Cancelling jobs (protocol.md 8.11): a queued or delayed job never runs;
//! a running job's worker is told at once and stops its handler; either
//! way the job ends cancelled (on the wire: `failed`, kind `cancelled`),
//! is never retried, and whoever awaits it gets [`Error::Cancelled`].

use std::time::Duration;

use crate::Queue;
use crate::connection::Conn;
use crate::error::Error;
use crate::handle::JobHandle;
use crate::keys::QueueKeys;
use crate::mode::Mode;
use crate::status::JobState;
use crate::transitions::{self, Cancel};

/// How long a cancelled job's hash is kept (as a worker's default result
/// TTL keeps a finished one).
const CANCELLED_TTL: Duration = Duration::from_secs(24 * 3600);

/// The message recorded on a job cancelled through this library.
const MESSAGE: &str = "cancelled by a client";

/// Most jobs in one `job_cancel` call of [`Queue::cancel_many`] (a refusal
/// of one call leaves the earlier calls' cancels in place).
const CHUNK: usize = 1000;

/// What a cancel did to one job.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// Cancelled now. `was` is [`JobState::Queued`] (it was waiting,
    /// delayed or not: it never runs) or [`JobState::Active`] (its worker
    /// was told to stop it).
    Cancelled {
        /// The job's state before the cancel.
        was: JobState,
    },
    /// It had already finished ([`JobState::Completed`], `Failed`,
    /// `Cancelled` or `Dead`): nothing changed.
    AlreadyFinished(JobState),
    /// No such job (never submitted, or its record expired).
    NotFound,
    /// The job's key holds another Redis type (written by another program):
    /// nothing was changed.
    NotAJob,
}

impl Queue {
    /// Cancels job `id` (recoverable and reliable modes). A queued or
    /// delayed job is finished at once and never runs. A running job is
    /// finished at once too, and its worker is told on its control channel:
    /// the handler sees [`crate::Job::cancelled`], and its future is
    /// dropped after the worker's cancel grace
    /// ([`crate::WorkerBuilder::cancel_grace`]) if it has not returned. A
    /// cancel racing the job's own completion leaves exactly one outcome:
    /// whichever reached Redis first.
    ///
    /// # Errors
    /// [`Error::Config`] in simple mode (a job there is only a list entry,
    /// and a running one has no record to finish); [`Error::WrongType`]
    /// when a queue key holds another Redis type (nothing was changed; a
    /// job key of another type is [`CancelOutcome::NotAJob`]);
    /// [`Error::Redis`].
    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome, Error> {
        let mut outcomes = self.cancel_many(&[id]).await?;
        Ok(outcomes.pop().expect("one outcome per job"))
    }

    /// Cancels many jobs, a thousand per script call; one outcome per ID,
    /// in order. See [`Queue::cancel`].
    ///
    /// # Errors
    /// As [`Queue::cancel`].
    pub async fn cancel_many(&self, ids: &[&str]) -> Result<Vec<CancelOutcome>, Error> {
        if self.mode() == Mode::Simple {
            return Err(simple_mode());
        }
        cancel_in(self.con(), self.keys(), self.mode(), ids).await
    }
}

fn simple_mode() -> Error {
    Error::Config("simple mode jobs cannot be cancelled: a queued job is only a list entry".into())
}

/// Cancels `ids` of the queue of `keys`, a chunk per script call.
async fn cancel_in(
    con: &Conn,
    keys: &QueueKeys,
    mode: Mode,
    ids: &[&str],
) -> Result<Vec<CancelOutcome>, Error> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(CHUNK) {
        for id in chunk {
            crate::keys::validate_job_id(id)?;
        }
        let decided =
            transitions::job_cancel(con, keys, mode, chunk, (MESSAGE, CANCELLED_TTL)).await?;
        for cancel in decided {
            out.push(match cancel {
                Cancel::Cancelled(was) => CancelOutcome::Cancelled {
                    was: if was == "active" {
                        JobState::Active
                    } else {
                        JobState::Queued
                    },
                },
                Cancel::Finished(state) => CancelOutcome::AlreadyFinished(finished(&state)),
                Cancel::Missing => CancelOutcome::NotFound,
                Cancel::NotAHash => CancelOutcome::NotAJob,
            });
        }
    }
    Ok(out)
}

/// A finished state as `job_cancel` reports it (`cancelled` for a failed
/// job of kind cancelled).
fn finished(state: &str) -> JobState {
    match state {
        "completed" => JobState::Completed,
        "dead" => JobState::Dead,
        "failed" => JobState::Failed,
        "cancelled" => JobState::Cancelled,
        other => JobState::Other(other.to_owned()),
    }
}

impl JobHandle {
    /// Cancels this job: see [`Queue::cancel`]. Awaiting the handle then
    /// gives [`Error::Cancelled`] (unless the job finished first).
    ///
    /// # Errors
    /// [`Error::Config`] for a simple-mode job; as [`Queue::cancel`].
    pub async fn cancel(&self) -> Result<CancelOutcome, Error> {
        let Some(stored) = self.stored() else {
            return Err(simple_mode());
        };
        let mut outcomes = cancel_in(&stored.con, &stored.keys, stored.mode, &[self.id()]).await?;
        Ok(outcomes.pop().expect("one outcome per job"))
    }
}
