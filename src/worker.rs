//! [`Worker`]: claims jobs, runs a handler on them, and sends outcomes back.
//!
//! A worker opens two connections: one multiplexed connection for script
//! calls, and one blocking connection for its fetch loop (BLMPOP over all of
//! its queues, in priority order).

use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_bytes::ByteBuf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::connection;
use crate::encoding::Encoding;
use crate::error::{Error, from_script, is_transient};
use crate::failure::FailureKind;
use crate::job::Job;
use crate::keys::QueueKeys;
use crate::mode::Mode;
use crate::queue_meta;
use crate::scripts::{self, Call, Name};
use crate::wire::{
    COMPLETED, DeadRecord, Envelope, FAILED, Reply, WireError, now_ms, pack, unpack,
};

/// How long a worker keeps retrying to deliver an outcome while Redis is
/// unreachable before it gives up (and logs the loss).
const DELIVERY_PATIENCE: Duration = Duration::from_secs(30);

/// Builds a [`Worker`].
#[derive(Debug, Clone)]
pub struct WorkerBuilder {
    config: Config,
    mode: Mode,
    queues: Vec<String>,
    concurrency: usize,
    grace_period: Duration,
    dead_letter_max: usize,
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

    /// How many jobs run at once (default 10).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// How long, after shutdown was requested, running jobs may take to
    /// finish before they are abandoned (default 30 s). An abandoned job's
    /// client gets a `shutdown` failure.
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace_period = grace;
        self
    }

    /// Most entries kept in each queue's dead-letter list (default 10,000).
    pub fn dead_letter_max(mut self, max: usize) -> Self {
        self.dead_letter_max = max;
        self
    }

    /// Connects, loads the scripts and registers every queue.
    ///
    /// # Errors
    /// [`Error::Config`] without queues or with a concurrency of 0;
    /// [`Error::ModeMismatch`] or [`Error::ProtocolMismatch`] when a queue
    /// was registered differently (nothing is written); [`Error::Redis`] when
    /// Redis cannot be reached.
    pub async fn build(self) -> Result<Worker, Error> {
        if self.queues.is_empty() {
            return Err(Error::Config("a worker needs at least one queue".into()));
        }
        if self.concurrency == 0 || self.dead_letter_max == 0 {
            return Err(Error::Config(
                "concurrency and dead_letter_max must be positive".into(),
            ));
        }
        let queues = self
            .queues
            .iter()
            .map(|q| QueueKeys::new(&self.config.prefix, q))
            .collect::<Result<Vec<_>, _>>()?;
        let client = connection::client(&self.config)?;
        let mut con = connection::manager(&client, &self.config).await?;
        for keys in &queues {
            queue_meta::register(&mut con, keys, self.mode).await?;
        }
        Ok(Worker {
            id: uuid::Uuid::new_v4().simple().to_string(),
            config: self.config,
            mode: self.mode,
            queues,
            concurrency: self.concurrency,
            grace_period: self.grace_period,
            dead_letter_max: self.dead_letter_max,
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
    /// Jobs that failed (handler error, panic, undecodable payload, result
    /// too large, abandoned at shutdown).
    pub failed: u64,
    /// Entries moved to a dead-letter list because they were not valid jobs.
    pub dead_lettered: u64,
    /// Jobs given back to their queue unstarted at shutdown.
    pub returned: u64,
}

#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
    returned: AtomicU64,
}

/// Runs a handler on jobs from one or more queues.
pub struct Worker {
    id: String,
    config: Config,
    mode: Mode,
    queues: Vec<QueueKeys>,
    concurrency: usize,
    grace_period: Duration,
    dead_letter_max: usize,
    client: redis::Client,
    con: ConnectionManager,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("mode", &self.mode)
            .field("queues", &self.queues)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// What every job task needs.
struct Shared<F> {
    handler: F,
    con: ConnectionManager,
    max_result_bytes: usize,
    dead_letter_max: usize,
    /// Cancelled when the grace period has run out.
    hard_stop: CancellationToken,
    counters: Counters,
}

impl Worker {
    /// Starts building a worker.
    pub fn builder(config: Config) -> WorkerBuilder {
        WorkerBuilder {
            config,
            mode: Mode::Simple,
            queues: Vec::new(),
            concurrency: 10,
            grace_period: Duration::from_secs(30),
            dead_letter_max: 10_000,
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
    /// [`crate::JobHandle::result`] returns it as [`Error::JobFailed`]. A
    /// payload that does not decode as `P` fails the job the same way,
    /// without calling the handler. The worker carries on in every case.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis refuses the worker's blocking pop for a
    /// reason that retrying cannot fix (for example an ACL that forbids it).
    /// Dropped connections are retried, never returned.
    pub async fn run<P, R, E, F, Fut>(self, handler: F) -> Result<WorkerStats, Error>
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        E: Display + Send + 'static,
        F: Fn(Job<P>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            handler,
            con: self.con.clone(),
            max_result_bytes: self.config.max_payload_bytes,
            dead_letter_max: self.dead_letter_max,
            hard_stop: CancellationToken::new(),
            counters: Counters::default(),
        });
        let mut tasks = JoinSet::new();
        let fetched = self.fetch_loop(&shared, &mut tasks).await;

        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.grace_period, drain)
            .await
            .is_err()
        {
            tracing::warn!(worker = %self.id, "grace period over: abandoning running jobs");
            shared.hard_stop.cancel();
            while tasks.join_next().await.is_some() {}
        }
        fetched?;
        let c = &shared.counters;
        Ok(WorkerStats {
            completed: c.completed.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            returned: c.returned.load(Ordering::Relaxed),
        })
    }

    /// Pops jobs while there is capacity, until shutdown.
    async fn fetch_loop<P, R, E, F, Fut>(
        &self,
        shared: &Arc<Shared<F>>,
        tasks: &mut JoinSet<()>,
    ) -> Result<(), Error>
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        E: Display + Send + 'static,
        F: Fn(Job<P>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
    {
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let pending: Vec<String> = self.queues.iter().map(QueueKeys::pending).collect();
        let mut blocking: Option<(MultiplexedConnection, i64)> = None;
        let mut backoff = Backoff::default();
        loop {
            while tasks.try_join_next().is_some() {}
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            let first = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
                permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
            };
            let mut permits = vec![first];
            while let Ok(p) = slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            if blocking.is_none() {
                match self.open_blocking().await {
                    Ok(b) => blocking = Some(b),
                    Err(e) => {
                        tracing::warn!(worker = %self.id, error = %e, "cannot open the fetch connection; retrying");
                        self.pause(backoff.next()).await;
                        continue;
                    }
                }
            }
            let (con, client_id) = blocking.as_mut().expect("connection opened above");
            let popped = self.pop(con, *client_id, &pending, permits.len()).await;
            match popped {
                Ok(None) => backoff.reset(),
                Ok(Some((key, entries))) => {
                    backoff.reset();
                    let keys = self
                        .queues
                        .iter()
                        .find(|q| q.pending() == key)
                        .cloned()
                        .expect("BLMPOP returns one of the keys it was given");
                    if self.shutdown.is_cancelled() {
                        self.give_back(&keys, entries, &shared.counters).await;
                        return Ok(());
                    }
                    let keys = Arc::new(keys);
                    for entry in entries {
                        let permit = permits.pop().expect("never pops more than the free slots");
                        tasks.spawn(run_job(shared.clone(), keys.clone(), entry, permit));
                    }
                }
                Err(e) if is_transient(&e) => {
                    tracing::warn!(worker = %self.id, error = %e, "fetch connection failed; reconnecting");
                    blocking = None;
                    self.pause(backoff.next()).await;
                }
                Err(e) => return Err(Error::Redis(e)),
            }
        }
    }

    async fn open_blocking(&self) -> Result<(MultiplexedConnection, i64), Error> {
        let mut con = connection::blocking(&self.client, &self.config).await?;
        let id: i64 = redis::cmd("CLIENT").arg("ID").query_async(&mut con).await?;
        Ok((con, id))
    }

    /// One BLMPOP of up to `count` entries from the first non-empty queue.
    /// When shutdown is requested meanwhile, the pop is woken with CLIENT
    /// UNBLOCK and still awaited: dropping it could lose entries the server
    /// already popped.
    async fn pop(
        &self,
        con: &mut MultiplexedConnection,
        client_id: i64,
        pending: &[String],
        count: usize,
    ) -> redis::RedisResult<Option<(String, Vec<Vec<u8>>)>> {
        let mut cmd = redis::cmd("BLMPOP");
        cmd.arg(self.config.block_timeout.as_secs_f64())
            .arg(pending.len())
            .arg(pending)
            .arg("RIGHT")
            .arg("COUNT")
            .arg(count);
        let pop = cmd.query_async(con);
        tokio::pin!(pop);
        tokio::select! {
            result = &mut pop => return result,
            _ = self.shutdown.cancelled() => {}
        }
        // The pop may not be blocking yet when the first UNBLOCK arrives
        // (UNBLOCK then answers 0): repeat until the pop returns.
        loop {
            let unblock: redis::RedisResult<i64> = redis::cmd("CLIENT")
                .arg("UNBLOCK")
                .arg(client_id)
                .query_async(&mut self.con.clone())
                .await;
            if let Err(e) = unblock {
                tracing::debug!(error = %e, "CLIENT UNBLOCK failed; waiting for the block to time out");
                return pop.await;
            }
            tokio::select! {
                result = &mut pop => return result,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// Gives entries popped after shutdown was requested back to the queue.
    async fn give_back(&self, keys: &QueueKeys, entries: Vec<Vec<u8>>, counters: &Counters) {
        let n = entries.len() as u64;
        let mut call = scripts::get(Name::SimpleRequeue).call().key(keys.pending());
        for e in &entries {
            call = call.arg(e);
        }
        if persist(&self.con, &call, keys.queue()).await {
            counters.returned.fetch_add(n, Ordering::Relaxed);
        }
    }

    async fn pause(&self, delay: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }
}

/// Exponential backoff from 50 ms to 2 s.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = Duration::from_millis(50 * 2u64.pow(self.0.min(5))).min(Duration::from_secs(2));
        self.0 += 1;
        d
    }
    fn reset(&mut self) {
        self.0 = 0;
    }
}

/// Runs a script call, retrying transient failures for up to
/// [`DELIVERY_PATIENCE`]. Returns false (after logging) when it gave up.
async fn persist(con: &ConnectionManager, call: &Call, queue: &str) -> bool {
    let started = Instant::now();
    let mut backoff = Backoff::default();
    loop {
        match call.invoke::<redis::Value, _>(&mut con.clone()).await {
            Ok(_) => return true,
            Err(e) => {
                let err = from_script(e, call.script().name_static(), queue);
                if !err.is_transient() || started.elapsed() > DELIVERY_PATIENCE {
                    tracing::error!(script = call.script().name(), queue, error = %err, "giving up on a script call");
                    return false;
                }
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }
}

/// What became of one job.
enum Outcome {
    Completed(Encoding, Vec<u8>),
    Failed(FailureKind, String),
}

async fn run_job<P, R, E, F, Fut>(
    shared: Arc<Shared<F>>,
    keys: Arc<QueueKeys>,
    entry: Vec<u8>,
    _permit: OwnedSemaphorePermit,
) where
    P: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    E: Display + Send + 'static,
    F: Fn(Job<P>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
{
    let envelope = match unpack::<Envelope>(&entry, "job envelope") {
        Ok(env)
            if env
                .reply
                .as_deref()
                .is_none_or(|c| keys.owns_reply_channel(c)) =>
        {
            env
        }
        Ok(env) => {
            let reason = format!(
                "reply channel {:?} is not a reply channel of this queue",
                env.reply
            );
            return dead_letter(&shared, &keys, entry, reason).await;
        }
        Err(e) => return dead_letter(&shared, &keys, entry, e.to_string()).await,
    };
    let outcome = match Encoding::parse(&envelope.enc) {
        None => Outcome::Failed(
            FailureKind::Decode,
            format!("unknown encoding {:?}", envelope.enc),
        ),
        Some(enc) => match enc.decode::<P>(&envelope.payload, "payload") {
            Err(e) => Outcome::Failed(FailureKind::Decode, e.to_string()),
            Ok(payload) => {
                let job = Job {
                    id: envelope.id.clone(),
                    queue: keys.queue().to_owned(),
                    payload,
                    encoding: enc,
                };
                run_handler(&shared, job).await
            }
        },
    };
    let counter = match &outcome {
        Outcome::Completed(..) => &shared.counters.completed,
        Outcome::Failed(kind, message) => {
            tracing::info!(job = %envelope.id, queue = keys.queue(), %kind, message, "job failed");
            &shared.counters.failed
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if let Some(channel) = &envelope.reply {
        let reply = match outcome {
            Outcome::Completed(enc, bytes) => Reply {
                id: envelope.id.clone(),
                status: COMPLETED.into(),
                enc: Some(enc.as_str().into()),
                result: Some(ByteBuf::from(bytes)),
                error: None,
            },
            Outcome::Failed(kind, message) => Reply {
                id: envelope.id.clone(),
                status: FAILED.into(),
                enc: None,
                result: None,
                error: Some(WireError {
                    kind: kind.as_str().into(),
                    message,
                }),
            },
        };
        let Ok(message) = pack(&reply, "reply message") else {
            return;
        };
        let call = scripts::get(Name::SimpleReply)
            .call()
            .key(keys.meta())
            .arg(channel)
            .arg(message);
        persist(&shared.con, &call, keys.queue()).await;
    }
}

/// Runs the handler, turning errors, panics and an expired grace period into
/// failures, and encodes the result.
async fn run_handler<P, R, E, F, Fut>(shared: &Shared<F>, job: Job<P>) -> Outcome
where
    R: Serialize,
    E: Display,
    F: Fn(Job<P>) -> Fut,
    Fut: Future<Output = Result<R, E>>,
{
    let enc = job.encoding;
    let run = AssertUnwindSafe((shared.handler)(job)).catch_unwind();
    let result = tokio::select! {
        r = run => r,
        _ = shared.hard_stop.cancelled() => {
            return Outcome::Failed(FailureKind::Shutdown, "worker shut down before the job finished".into());
        }
    };
    match result {
        Ok(Ok(value)) => match enc.encode(&value, "result") {
            Ok(bytes) if bytes.len() > shared.max_result_bytes => Outcome::Failed(
                FailureKind::TooLarge,
                format!(
                    "result of {} bytes exceeds the maximum of {} bytes",
                    bytes.len(),
                    shared.max_result_bytes
                ),
            ),
            Ok(bytes) => Outcome::Completed(enc, bytes),
            Err(e) => Outcome::Failed(FailureKind::Encode, e.to_string()),
        },
        Ok(Err(e)) => Outcome::Failed(FailureKind::Handler, e.to_string()),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "handler panicked".into());
            Outcome::Failed(FailureKind::Panic, message)
        }
    }
}

/// Keeps an entry that is not a valid job in the queue's dead-letter list.
async fn dead_letter<F>(shared: &Shared<F>, keys: &QueueKeys, entry: Vec<u8>, reason: String) {
    tracing::warn!(queue = keys.queue(), %reason, "moving an invalid entry to the dead-letter list");
    let record = DeadRecord {
        reason,
        entry: ByteBuf::from(entry),
        at_ms: now_ms(),
    };
    let Ok(record) = pack(&record, "dead-letter record") else {
        return;
    };
    let call = scripts::get(Name::SimpleDead)
        .call()
        .key(keys.dead())
        .arg(record)
        .arg(shared.dead_letter_max.to_string());
    if persist(&shared.con, &call, keys.queue()).await {
        shared
            .counters
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed);
    }
}
