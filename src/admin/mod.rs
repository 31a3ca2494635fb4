//! Inspecting queues, for operators and their tools: which queues exist,
//! how each is doing, which jobs wait, run or died, and one job in full;
//! and putting dead jobs back ([`Admin::requeue`], [`Admin::requeue_dead`]).
//!
//! Nothing here registers a queue. Only the requeue methods change jobs,
//! each batch with one atomic script (`job_requeue`, protocol.md 8.14). The
//! command-line tool (`jarctl`) and the dashboard are built on it. Reads
//! use plain commands on the queue's slot (every key of a queue shares it,
//! so they work on a Redis Cluster too) and are not atomic with each
//! other: a count and a list read a moment apart may disagree by the jobs
//! that moved in between.
//!
//! ```no_run
//! # async fn demo() -> Result<(), job_async_redis::Error> {
//! use job_async_redis::{Client, Config};
//! use job_async_redis::admin::ListState;
//!
//! let client = Client::connect(Config::new("redis://127.0.0.1:6379/")).await?;
//! let admin = client.admin();
//! for queue in admin.queues().await? {
//!     let overview = admin.overview(&queue.name).await?;
//!     println!("{}: {} waiting, {:?} active", queue.name, overview.counts.waiting, overview.counts.active);
//!     for entry in admin.jobs(&queue.name, ListState::Dead, 0, 10).await?.entries {
//!         println!("  dead: {}", entry.id);
//!     }
//! }
//! # Ok(()) }
//! ```

mod discover;
mod jobs;
mod overview;
mod requeue;

pub use discover::QueueInfo;
pub use jobs::{JobDetail, JobEntry, JobList, ListState};
pub use overview::{QueueOverview, StateCounts, WorkerInfo};
pub use requeue::{RequeueProgress, Requeued};

use crate::client::Client;
use crate::error::Error;
use crate::keys::QueueKeys;
use crate::mode::Mode;

/// Inspection of the queues under the client's key prefix, and requeueing
/// of their dead jobs ([`Client::admin`]).
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
}

impl Client {
    /// Inspection of queues, and requeueing of dead jobs: [`Admin`].
    pub fn admin(&self) -> Admin {
        Admin {
            client: self.clone(),
        }
    }
}

impl Admin {
    /// The queues under the client's prefix, by name: every key
    /// `<prefix>:{<queue>}:meta`, found with SCAN (on a cluster, on every
    /// primary), never KEYS.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis cannot be reached.
    pub async fn queues(&self) -> Result<Vec<QueueInfo>, Error> {
        discover::queues(self.client.con(), &self.client.config().prefix).await
    }

    /// How queue `queue` is doing: its mode, its jobs per state, its oldest
    /// waiting job's age, its workers (reliable mode), controls and
    /// schedules.
    ///
    /// # Errors
    /// [`Error::QueueNotRegistered`] when the queue has no metadata;
    /// [`Error::InvalidName`] for a name no queue can have;
    /// [`Error::WrongType`] when one of its keys holds another type.
    pub async fn overview(&self, queue: &str) -> Result<QueueOverview, Error> {
        let (keys, mode) = self.open(queue).await?;
        overview::read(self.client.con(), &keys, mode).await
    }

    /// One page of the jobs of queue `queue` in `state`, from `offset` (0:
    /// the first), at most `limit` of them: waiting jobs oldest first (the
    /// next to run first), delayed ones by due time, active ones by lease
    /// deadline (recoverable) or by worker (reliable), dead ones newest
    /// first. Recoverable and reliable modes: a simple-mode queue keeps its
    /// jobs as whole envelopes, not IDs.
    ///
    /// # Errors
    /// [`Error::Config`] for a simple-mode queue; as
    /// [`Admin::overview`] otherwise.
    pub async fn jobs(
        &self,
        queue: &str,
        state: ListState,
        offset: usize,
        limit: usize,
    ) -> Result<JobList, Error> {
        let (keys, mode) = self.open(queue).await?;
        if mode == Mode::Simple {
            return Err(Error::Config(
                "a simple-mode queue lists no jobs: its lists hold whole envelopes, not IDs".into(),
            ));
        }
        jobs::list(self.client.con(), &keys, mode, state, offset, limit).await
    }

    /// Every field of job `id` of queue `queue`, its payload and result
    /// decoded to JSON where they decode; `None` when there is no such job
    /// (never submitted, or its finished record expired).
    ///
    /// # Errors
    /// [`Error::Config`] for a simple-mode queue (it keeps no job records);
    /// as [`Admin::overview`] otherwise.
    pub async fn job(&self, queue: &str, id: &str) -> Result<Option<JobDetail>, Error> {
        let (keys, mode) = self.open(queue).await?;
        if mode == Mode::Simple {
            return Err(Error::Config(
                "a simple-mode queue keeps no job records".into(),
            ));
        }
        jobs::detail(self.client.con(), &keys, id).await
    }

    /// The queue's keys and mode, from its metadata (never registering it).
    async fn open(&self, queue: &str) -> Result<(QueueKeys, Mode), Error> {
        let keys = QueueKeys::new(&self.client.config().prefix, queue)?;
        let meta = keys.meta();
        let mode: Option<String> = redis::cmd("HGET")
            .arg(&meta)
            .arg("mode")
            .query_async(&mut self.client.con().clone())
            .await
            .map_err(|e| crate::error::on_key(e, &meta, "hash"))?;
        let mode =
            mode.as_deref()
                .and_then(Mode::parse)
                .ok_or_else(|| Error::QueueNotRegistered {
                    queue: queue.to_owned(),
                })?;
        Ok((keys, mode))
    }
}
