//! [`Worker`]: claims jobs, runs a handler on them, and records or sends
//! their outcomes.
//!
//! A worker opens two connections: one multiplexed connection for script
//! calls (and its heartbeat and sweeps), and one blocking connection for its
//! fetch loop; in recoverable and reliable modes a third, pub/sub, for its
//! control channels (cancellations). Each mode's file (`simple`, `recoverable`, `reliable`) holds
//! only how that mode takes jobs and keeps them alive; `attempt` runs a
//! stored job from its start decision to its outcome, `finisher` records
//! outcomes, `execute` runs the handler, `fetch` owns the blocking pop,
//! `cancels` tells running handlers that their job was cancelled,
//! `gate` remembers which queues' pause or limits held the worker back.

mod attempt;
mod cancels;
mod clock;
mod execute;
mod fetch;
mod finisher;
mod gate;
mod health;
mod recoverable;
mod reliable;
mod simple;

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::connection::Conn;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::connection;
use crate::error::Error;
use crate::job::Job;
use crate::keys::QueueKeys;
use crate::mode::Mode;
use crate::scripts::Call;
use crate::transitions;

pub(crate) use execute::Erased;

/// How long a worker keeps retrying a script call while Redis is
/// unreachable before it gives up (and logs what was lost).
const PERSIST_PATIENCE: Duration = Duration::from_secs(30);

/// Builds a [`Worker`].
#[derive(Debug, Clone)]
pub struct WorkerBuilder {
    config: Config,
    mode: Mode,
    queues: Vec<String>,
    settings: Settings,
}

/// Worker settings, with their defaults in [`Worker::builder`].
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub concurrency: usize,
    pub grace_period: Duration,
    pub dead_letter_max: usize,
    pub lease: Duration,
    pub max_stalls: u32,
    pub result_ttl: Duration,
    pub sweep_interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub cancel_grace: Duration,
}

impl Settings {
    /// How often to sweep stale leases or recover dead workers.
    pub(crate) fn sweep_every(&self) -> Duration {
        self.sweep_interval
            .unwrap_or(self.lease / 2)
            .max(Duration::from_millis(10))
    }
}

impl WorkerBuilder {
    /// Sets the mode (default [`Mode::Simple`]).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Adds a queue. Queues are served in the order they were added: a job
    /// is taken from a later queue only when every earlier one is empty.
    pub fn queue(mut self, name: impl Into<String>) -> Self {
        self.queues.push(name.into());
        self
    }

    /// How many handlers run at once (default 10). In recoverable and
    /// reliable modes a job's slot is free again when its handler returns,
    /// while its outcome is still being recorded (outcomes are recorded in
    /// batches; until then the job stays claimed in Redis).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.settings.concurrency = concurrency;
        self
    }

    /// How long, after shutdown was requested, running jobs may take to
    /// finish (default 30 s). Then, in simple mode, they fail with kind
    /// `shutdown`; in recoverable mode they go back to their queue at once.
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.settings.grace_period = grace;
        self
    }

    /// Most entries kept in each queue's dead-letter list or set (default
    /// 10,000).
    pub fn dead_letter_max(mut self, max: usize) -> Self {
        self.settings.dead_letter_max = max;
        self
    }

    /// Recoverable mode: how long a claim lasts without renewal (default
    /// 30 s). The worker renews the leases of its running jobs every third
    /// of it; a job whose lease runs out (its worker died or hung) is put
    /// back on its queue. A job may set its own ([`crate::JobOptions::lease`]).
    /// Reliable mode: the heartbeat TTL. Every mode: the lease of the
    /// queue's timekeeper (the worker that promotes delayed jobs and fires
    /// schedules), so it also bounds how long due jobs wait when that worker
    /// dies: about one to two leases.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.settings.lease = lease;
        self
    }

    /// Recoverable mode: how many times a job may stall (its worker died or
    /// hung while running it) before it goes to the dead-letter set instead
    /// of running again (default 3).
    pub fn max_stalls(mut self, max: u32) -> Self {
        self.settings.max_stalls = max;
        self
    }

    /// Recoverable mode: how long a finished job's hash (its result or
    /// error) is kept (default 24 hours).
    pub fn result_ttl(mut self, ttl: Duration) -> Self {
        self.settings.result_ttl = ttl;
        self
    }

    /// Recoverable mode: how often the queues are swept for jobs whose lease
    /// ran out (default: half the lease). One worker per interval does it.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.settings.sweep_interval = Some(interval);
        self
    }

    /// How long a handler may run, for jobs without a timeout of their own
    /// ([`crate::JobOptions::timeout`]); default none. When it runs out, the
    /// handler's future is dropped and the attempt fails with kind
    /// `timeout`, retried like a handler error while attempts are left.
    /// It is independent of the lease, which the worker keeps renewing while
    /// the handler runs; a worker that dies is a stall, not a timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = Some(timeout);
        self
    }

    /// Recoverable and reliable modes: how long the handler of a job that
    /// was cancelled while it ran ([`crate::Queue::cancel`]) may take to
    /// return after it is told ([`crate::Job::cancelled`]) before its
    /// future is dropped (default 1 s). Either way nothing is recorded: the
    /// cancel already finished the job.
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.settings.cancel_grace = grace;
        self
    }

    /// Connects, loads the scripts and registers every queue.
    ///
    /// # Errors
    /// [`Error::Config`] without queues or with a zero setting;
    /// [`Error::ModeMismatch`] or [`Error::ProtocolMismatch`] when a queue
    /// was registered differently (nothing is written); [`Error::Redis`] when
    /// Redis cannot be reached.
    pub async fn build(self) -> Result<Worker, Error> {
        let s = &self.settings;
        if self.queues.is_empty() {
            return Err(Error::Config("a worker needs at least one queue".into()));
        }
        if self.mode == Mode::Reliable && self.queues.len() > 1 {
            return Err(Error::Config(
                "a reliable-mode worker serves one queue (BLMOVE has one source): run one worker per queue".into(),
            ));
        }
        use transitions::{MAX_COUNT, MAX_DEAD, MAX_MS};
        let count_ok = |n: u64, max: u64| (1..=max).contains(&n);
        if !count_ok(s.concurrency as u64, MAX_COUNT)
            || !count_ok(s.dead_letter_max as u64, MAX_DEAD)
        {
            return Err(Error::Config(format!(
                "concurrency must be 1 to {MAX_COUNT} and dead_letter_max 1 to {MAX_DEAD}"
            )));
        }
        if u64::from(s.max_stalls) > MAX_COUNT {
            return Err(Error::Config(format!(
                "max_stalls must be at most {MAX_COUNT}"
            )));
        }
        let ms_ok = transitions::ms_in_range;
        if !ms_ok(s.lease, 30)
            || !ms_ok(s.result_ttl, 1)
            || s.sweep_interval.is_some_and(|d| !ms_ok(d, 1))
            || s.timeout.is_some_and(|d| !ms_ok(d, 1))
        {
            return Err(Error::Config(format!(
                "lease must be 30 ms to {MAX_MS} ms, result_ttl, sweep_interval and timeout 1 ms to {MAX_MS} ms"
            )));
        }
        let queues = self
            .queues
            .iter()
            .map(|q| QueueKeys::new(&self.config.prefix, q).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let client = connection::backend(&self.config)?;
        let con = connection::shared(&client, &self.config).await?;
        for keys in &queues {
            transitions::queue_register(&con, keys, self.mode).await?;
        }
        Ok(Worker {
            id: uuid::Uuid::new_v4().simple().to_string(),
            config: self.config,
            mode: self.mode,
            queues,
            settings: self.settings,
            client,
            con,
            shutdown: CancellationToken::new(),
        })
    }
}

/// Requests a worker's graceful shutdown. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    /// Stops claiming jobs; [`Worker::run`] returns once running jobs have
    /// finished or the grace period has run out.
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}

/// What a worker did, returned by [`Worker::run`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Jobs whose handler succeeded.
    pub completed: u64,
    /// Jobs that failed for good (handler error or panic with no attempts
    /// left, undecodable payload, result too large, abandoned at shutdown
    /// in simple mode).
    pub failed: u64,
    /// Recoverable mode: failures put back for another attempt.
    pub retried: u64,
    /// Entries moved to a dead-letter list because they were not valid jobs
    /// (simple mode), or jobs that stalled too often (recoverable mode).
    pub dead_lettered: u64,
    /// Jobs given back to their queue unfinished at shutdown.
    pub returned: u64,
    /// Recoverable mode: outcomes refused because a newer attempt owned the
    /// job (this worker had stalled past its lease).
    pub lease_lost: u64,
    /// Outcomes refused because the job had already been finished (or put
    /// back) by someone else under this attempt's own token: another program
    /// that holds the queue's credentials, or a bug. Each is logged.
    pub outcome_refused: u64,
    /// Failures of a queue that retrying at once cannot fix (a key of the
    /// wrong Redis type, a corrupt counter, a script refusal): each is
    /// logged, and the queue is rested with backoff while the others are
    /// served.
    pub queue_errors: u64,
    /// Jobs this worker submitted for recurring schedules (one per fire
    /// it made; other workers of the queue make the others).
    pub scheduled: u64,
    /// Running jobs that were cancelled ([`crate::Queue::cancel`]): their
    /// handlers were told and stopped, and nothing was recorded.
    pub cancelled: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    completed: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    returned: AtomicU64,
    lease_lost: AtomicU64,
    outcome_refused: AtomicU64,
    queue_errors: AtomicU64,
    scheduled: AtomicU64,
    cancelled: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> WorkerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerStats {
            completed: get(&self.completed),
            failed: get(&self.failed),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            returned: get(&self.returned),
            lease_lost: get(&self.lease_lost),
            outcome_refused: get(&self.outcome_refused),
            queue_errors: get(&self.queue_errors),
            scheduled: get(&self.scheduled),
            cancelled: get(&self.cancelled),
        }
    }
}

/// Runs a handler on jobs from one or more queues.
pub struct Worker {
    id: String,
    config: Config,
    mode: Mode,
    queues: Vec<Arc<QueueKeys>>,
    settings: Settings,
    client: connection::Backend,
    con: Conn,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("mode", &self.mode)
            .field("queues", &self.queues)
            .field("concurrency", &self.settings.concurrency)
            .finish()
    }
}

/// What every part of a running worker shares.
pub(crate) struct Shared {
    pub id: String,
    pub mode: Mode,
    pub config: Config,
    pub settings: Settings,
    pub queues: Vec<Arc<QueueKeys>>,
    pub client: connection::Backend,
    pub con: Conn,
    pub handler: Erased,
    /// Cancelled when shutdown is requested: stop claiming.
    pub shutdown: CancellationToken,
    /// Cancelled when the grace period has run out: abandon running jobs.
    pub hard_stop: CancellationToken,
    /// Cancelled when every job task has ended: stop heartbeats and sweeps.
    pub finished: CancellationToken,
    pub counters: Counters,
    /// Queues rested after failures.
    pub health: health::Health,
    /// Queues whose gate (pause, limits) held this worker back.
    pub holds: gate::Holds,
    /// Recoverable and reliable modes: the jobs this worker is running.
    pub active: attempt::Active,
    /// Reliable mode: when the heartbeat last succeeded.
    pub last_beat: std::sync::Mutex<Option<Instant>>,
    /// Recoverable and reliable modes: where outcomes go to be recorded.
    pub finisher: tokio::sync::mpsc::UnboundedSender<finisher::FinishRequest>,
    /// Recoverable and reliable modes: outcome-recording calls in flight.
    pub recording: std::sync::atomic::AtomicUsize,
    /// Set when an outcome could not be recorded (reliable mode: the fetch
    /// loop looks for such jobs in its in-flight list).
    pub unrecorded: std::sync::atomic::AtomicBool,
}

impl Worker {
    /// Starts building a worker.
    pub fn builder(config: Config) -> WorkerBuilder {
        WorkerBuilder {
            config,
            mode: Mode::Simple,
            queues: Vec::new(),
            settings: Settings {
                concurrency: 10,
                grace_period: Duration::from_secs(30),
                dead_letter_max: 10_000,
                lease: Duration::from_secs(30),
                max_stalls: 3,
                result_ttl: Duration::from_secs(24 * 3600),
                sweep_interval: None,
                timeout: None,
                cancel_grace: Duration::from_secs(1),
            },
        }
    }

    /// This worker's ID, unique per process start.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A handle that stops this worker gracefully.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Runs `handler` on jobs until shutdown is requested through a
    /// [`ShutdownHandle`], then finishes running jobs within the grace period.
    ///
    /// A handler error or panic fails the job, and the client's
    /// [`crate::JobHandle::result`] returns it as [`Error::JobFailed`]
    /// (in recoverable mode after the job's attempts are used up). A payload
    /// that does not decode as `P` fails the job the same way, without
    /// calling the handler. The worker carries on in every case.
    ///
    /// Nothing in Redis makes a worker stop: an entry or a job that is not
    /// valid fails or is dead-lettered on its own, and a queue whose keys
    /// hold what the protocol forbids is rested with backoff (logged, and
    /// counted in [`WorkerStats::queue_errors`]) while the others are served.
    ///
    /// # Errors
    /// [`Error::Redis`] when the worker's own credentials may not do what it
    /// needs (`NOPERM`, `NOAUTH`, `WRONGPASS`). Dropped connections are
    /// retried, never returned.
    pub async fn run<P, R, E, F, Fut>(self, handler: F) -> Result<WorkerStats, Error>
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        E: Display + Send + 'static,
        F: Fn(Job<P>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
    {
        let (finisher, finish_requests) = tokio::sync::mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            handler: execute::erase(handler, self.config.max_payload_bytes),
            id: self.id,
            mode: self.mode,
            config: self.config,
            settings: self.settings,
            queues: self.queues,
            client: self.client,
            con: self.con,
            shutdown: self.shutdown,
            hard_stop: CancellationToken::new(),
            finished: CancellationToken::new(),
            counters: Counters::default(),
            health: health::Health::default(),
            holds: gate::Holds::default(),
            active: attempt::Active::default(),
            last_beat: std::sync::Mutex::new(None),
            finisher,
            recording: std::sync::atomic::AtomicUsize::new(0),
            unrecorded: std::sync::atomic::AtomicBool::new(false),
        });
        // Dropped at the end of this function, or with its future.
        let mut background = match self.mode {
            Mode::Simple => Vec::new(),
            Mode::Recoverable => recoverable::background(&shared),
            Mode::Reliable => reliable::background(&shared),
        };
        if self.mode != Mode::Simple {
            // Subscribed to the control channels before taking jobs, so
            // that no cancel for a job this worker starts is missed (an
            // unreachable server is waited for only so long: the fetch
            // loop then deals with it, and a reconnection re-reads).
            let (task, subscribed) = cancels::background(&shared);
            background.push(task);
            let patience = shared.config.connect_timeout + shared.config.command_timeout;
            if tokio::time::timeout(patience, subscribed).await.is_err() {
                tracing::warn!(worker = %shared.id, "not subscribed to the control channels yet; starting anyway");
            }
        }
        background.push(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            finisher::finisher(shared.clone(), finish_requests),
        )));
        let clock = clock::background(&shared);
        let mut tasks = JoinSet::new();
        let fetched = match self.mode {
            Mode::Simple => simple::fetch_loop(&shared, &mut tasks).await,
            Mode::Recoverable => recoverable::fetch_loop(&shared, &mut tasks).await,
            Mode::Reliable => reliable::fetch_loop(&shared, &mut tasks).await,
        };
        if self.mode != Mode::Reliable {
            fetch::forget_wake_lists(&shared).await;
        }
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(shared.settings.grace_period, drain)
            .await
            .is_err()
        {
            tracing::warn!(worker = %shared.id, "grace period over: abandoning running jobs");
            shared.hard_stop.cancel();
            while tasks.join_next().await.is_some() {}
        }
        // The clock task ends by itself at shutdown, once it has given up
        // the timekeeper roles it held.
        if tokio::time::timeout(shared.config.command_timeout * 2, clock)
            .await
            .is_err()
        {
            tracing::debug!(worker = %shared.id, "the clock task did not end in time");
        }
        shared.finished.cancel();
        drop(background);
        if self.mode == Mode::Reliable {
            reliable::leave(&shared).await;
        }
        fetched?;
        Ok(shared.counters.snapshot())
    }
}

/// Waits for at least one free slot and takes every free one; `None` at
/// shutdown.
pub(crate) async fn take_slots(
    shared: &Shared,
    slots: &Arc<Semaphore>,
) -> Option<Vec<OwnedSemaphorePermit>> {
    if shared.shutdown.is_cancelled() {
        return None;
    }
    let first = tokio::select! {
        biased;
        _ = shared.shutdown.cancelled() => return None,
        permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
    };
    // Let the tasks that are about to finish do so first: more slots are
    // then taken at once, and fewer, larger batches go to Redis.
    tokio::task::yield_now().await;
    let mut permits = vec![first];
    while let Ok(p) = slots.clone().try_acquire_owned() {
        permits.push(p);
    }
    Some(permits)
}

/// The queue whose `key_of` key is `key`.
pub(crate) fn queue_of(
    shared: &Shared,
    key: &str,
    key_of: impl Fn(&QueueKeys) -> String,
) -> Arc<QueueKeys> {
    shared
        .queues
        .iter()
        .find(|q| key_of(q) == key)
        .cloned()
        .expect("BLMPOP returns one of the keys it was given")
}

/// The queues not resting, in priority order. When every queue is resting,
/// waits until the first may be tried again (or shutdown) and returns none.
pub(crate) async fn queues_to_serve(shared: &Shared) -> Vec<&Arc<QueueKeys>> {
    let serving = shared.health.serving(&shared.queues);
    if serving.is_empty() {
        let rest = shared
            .health
            .next_retry()
            .unwrap_or(Duration::from_millis(100));
        fetch::pause(&shared.shutdown, rest).await;
    }
    serving
}

/// After `what` failed with `error` on the queues whose `key_of` keys the
/// failed command used: rests the queue the error names (a wrong type), or
/// else every one of them.
pub(crate) fn rest_queues_of<T: AsRef<QueueKeys>>(
    shared: &Shared,
    queues: &[&T],
    key_of: impl Fn(&QueueKeys) -> String,
    what: &str,
    error: &Error,
) {
    let named = match error {
        Error::WrongType { key, .. } => queues
            .iter()
            .find(|q| key_of(q.as_ref()) == *key)
            .map(|q| q.as_ref().queue().to_owned()),
        _ => None,
    };
    match named {
        Some(queue) => shared.health.failed(&shared.counters, &queue, what, error),
        None => {
            for q in queues {
                shared
                    .health
                    .failed(&shared.counters, q.as_ref().queue(), what, error);
            }
        }
    }
}

/// Exponential backoff from 50 ms to 2 s.
#[derive(Default)]
pub(crate) struct Backoff(u32);

impl Backoff {
    pub(crate) fn next(&mut self) -> Duration {
        let d = Duration::from_millis(50 * 2u64.pow(self.0.min(6))).min(Duration::from_secs(2));
        self.0 += 1;
        d
    }
    pub(crate) fn reset(&mut self) {
        self.0 = 0;
    }
}

/// Runs a script call, retrying transient failures (dropped connection,
/// failover, NOSCRIPT storms) for up to [`PERSIST_PATIENCE`].
pub(crate) async fn persist<T: redis::FromRedisValue>(
    con: &Conn,
    call: &Call,
    keys: &QueueKeys,
    job_id: Option<&str>,
) -> Result<T, Error> {
    persist_counting(con, call, keys, job_id).await.0
}

/// [`persist`], and whether the call was sent more than once (an earlier
/// try may then have run without its reply arriving).
pub(crate) async fn persist_counting<T: redis::FromRedisValue>(
    con: &Conn,
    call: &Call,
    keys: &QueueKeys,
    job_id: Option<&str>,
) -> (Result<T, Error>, bool) {
    let started = Instant::now();
    let mut backoff = Backoff::default();
    let mut resent = false;
    loop {
        match transitions::run(con, call, keys, job_id).await {
            Err(e) if e.is_transient() && started.elapsed() < PERSIST_PATIENCE => {
                tokio::time::sleep(backoff.next()).await;
                resent = true;
            }
            other => return (other, resent),
        }
    }
}
