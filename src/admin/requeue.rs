//! Putting dead and failed jobs back on their queue (`job_requeue`).

use serde::Serialize;

use super::Admin;
use crate::error::Error;
use crate::mode::Mode;
use crate::transitions::{self, REQUEUE_BATCH};

/// What became of a job [`Admin::requeue`] was asked to put back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Requeued {
    /// It was dead or failed: it is queued again, with all its attempts.
    Requeued,
    /// No such job (expired, or never submitted).
    Missing,
    /// Its key holds another Redis type: untouched.
    NotAJob,
    /// It is in another state (`queued`, `active`, `completed`, or one this
    /// library does not know): untouched.
    Unchanged(String),
}

/// How far [`Admin::requeue_dead`] got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RequeueProgress {
    /// Jobs put back on the queue so far.
    pub requeued: u64,
    /// Entries of the dead-letter set that were not requeued: their job
    /// expired, was not dead any more, or is not a job.
    pub skipped: u64,
    /// Entries in the dead-letter set after the last batch.
    pub remaining: u64,
}

impl Admin {
    /// Puts the jobs `ids` of queue `queue` back on the queue when they are
    /// dead or failed (protocol.md 8.14), in calls of at most 1000 jobs;
    /// one outcome per ID, in order.
    ///
    /// # Errors
    /// [`Error::Config`] for a simple-mode queue; as
    /// [`Admin::overview`] otherwise.
    pub async fn requeue(&self, queue: &str, ids: &[String]) -> Result<Vec<Requeued>, Error> {
        let (keys, mode) = self.open(queue).await?;
        refuse_simple(mode)?;
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(REQUEUE_BATCH) {
            let replies = transitions::job_requeue(self.client.con(), &keys, mode, chunk).await?;
            out.extend(replies.into_iter().map(|r| match r.as_str() {
                "requeued" => Requeued::Requeued,
                "missing" => Requeued::Missing,
                "not a hash" => Requeued::NotAJob,
                _ => Requeued::Unchanged(r),
            }));
        }
        Ok(out)
    }

    /// Puts every dead job of queue `queue` back on the queue (at most
    /// `limit` of them when given), oldest death first, in batches of
    /// `batch` jobs (1 to 1000). Each batch is one atomic call; after each,
    /// `on_batch` gets the progress so far and returns whether to go on, so
    /// that a long run can be shown and interrupted between batches.
    ///
    /// # Errors
    /// As [`Admin::requeue`]; the progress of the batches done is lost
    /// with the error, but each of them took effect.
    pub async fn requeue_dead(
        &self,
        queue: &str,
        batch: usize,
        limit: Option<u64>,
        mut on_batch: impl FnMut(RequeueProgress) -> bool,
    ) -> Result<RequeueProgress, Error> {
        let (keys, mode) = self.open(queue).await?;
        refuse_simple(mode)?;
        let batch = batch.clamp(1, REQUEUE_BATCH);
        let mut progress = RequeueProgress::default();
        // Entries that stay in the set (not a job): read past them.
        let mut stuck = 0usize;
        loop {
            let left = limit.map_or(u64::MAX, |l| l.saturating_sub(progress.requeued));
            if left == 0 {
                break;
            }
            let take = batch.min(usize::try_from(left).unwrap_or(batch));
            let mut pipe = redis::pipe();
            pipe.cmd("ZRANGE")
                .arg(keys.dead_jobs())
                .arg(stuck)
                .arg(stuck + take - 1);
            pipe.cmd("ZCARD").arg(keys.dead_jobs());
            let (ids, total): (Vec<String>, u64) = pipe
                .query_async(&mut self.client.con().clone())
                .await
                .map_err(|e| super::overview::wrong_type(e, &keys))?;
            progress.remaining = total;
            if ids.is_empty() {
                break;
            }
            let replies = transitions::job_requeue(self.client.con(), &keys, mode, &ids).await?;
            let mut left_the_set = 0;
            for r in &replies {
                match r.as_str() {
                    "requeued" => {
                        progress.requeued += 1;
                        left_the_set += 1;
                    }
                    // Not a job: its entry stays, and is read past.
                    "not a hash" | "" => {
                        progress.skipped += 1;
                        stuck += 1;
                    }
                    _ => {
                        progress.skipped += 1;
                        left_the_set += 1;
                    }
                }
            }
            progress.remaining = total.saturating_sub(left_the_set);
            if !on_batch(progress) {
                break;
            }
        }
        Ok(progress)
    }
}

fn refuse_simple(mode: Mode) -> Result<(), Error> {
    if mode == Mode::Simple {
        return Err(Error::Config(
            "a simple-mode queue keeps no job records to requeue".into(),
        ));
    }
    Ok(())
}
