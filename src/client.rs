//! [`Client`] and [`Queue`]: submitting jobs and following them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::connection::Conn;
use serde::Serialize;
use serde_bytes::ByteBuf;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::connection;
use crate::encoding::Encoding;
use crate::error::Error;
use crate::handle::{JobHandle, Stored};
use crate::keys::QueueKeys;
use crate::mode::Mode;
use crate::replies::Replies;
use crate::schedule::{Schedule, ScheduleInfo};
use crate::scripts::{self, Call};
use crate::status::JobStatus;
use crate::transitions::{self, Due, NewJob};
use crate::unique::Unique;
use crate::wire::{Envelope, now_ms, pack};

/// Most jobs in one submit script call of [`Queue::submit_many`]; larger
/// batches are split and the calls sent in one pipeline.
const BATCH_CHUNK: usize = 10_000;

/// Submits jobs and receives their outcomes.
///
/// A client opens two connections: one multiplexed connection for script
/// calls (shared by all clones and queues, reconnecting by itself), and one
/// pub/sub connection for outcomes. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    config: Config,
    /// Opens the connections of [`Queue::follow_events`].
    backend: connection::Backend,
    con: Conn,
    replies: Replies,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.inner.id)
            .finish()
    }
}

impl Client {
    /// Connects to Redis and loads the scripts.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis cannot be reached or refuses the
    /// credentials; [`Error::Config`] or [`Error::InvalidName`] for bad
    /// settings.
    pub async fn connect(config: Config) -> Result<Self, Error> {
        let backend = connection::backend(&config)?;
        let con = connection::shared(&backend, &config).await?;
        let replies = Replies::start(backend.clone(), &config);
        Ok(Self {
            inner: Arc::new(Inner {
                id: uuid::Uuid::new_v4().simple().to_string(),
                config,
                backend,
                con,
                replies,
            }),
        })
    }

    /// The client's multiplexed connection.
    pub(crate) fn con(&self) -> &Conn {
        &self.inner.con
    }

    /// The client's settings.
    pub(crate) fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The client's subscriptions (reply channels, followed progress).
    pub(crate) fn replies(&self) -> &Replies {
        &self.inner.replies
    }

    /// This client's ID, unique per [`Client::connect`]; it names the
    /// client's reply channels.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Opens the queue `name` in `mode`, registering it if it is new.
    ///
    /// # Errors
    /// [`Error::ModeMismatch`] or [`Error::ProtocolMismatch`] when the queue
    /// was registered differently (nothing is written);
    /// [`Error::InvalidName`] for a name that would break the key layout.
    pub async fn queue(&self, name: &str, mode: Mode) -> Result<Queue, Error> {
        let keys = QueueKeys::new(&self.inner.config.prefix, name)?;
        transitions::queue_register(&self.inner.con, &keys, mode).await?;
        Ok(Queue {
            channel: keys.reply_channel(&self.inner.id),
            keys,
            mode,
            encoding: self.inner.config.encoding,
            client: self.clone(),
        })
    }
}

/// Per-job settings for [`Queue::submit_with`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct JobOptions {
    /// The job's ID. Default: a new UUID v4. In recoverable mode an ID that
    /// already exists in the queue is refused with [`Error::DuplicateJob`],
    /// which makes submits idempotent.
    pub id: Option<String>,
    /// Recoverable mode: this job's lease, overriding the worker's default.
    pub lease: Option<Duration>,
    /// Recoverable mode: how many times the job may run when its handler
    /// fails or panics (default 1: no retry). Stalls (a worker died) are
    /// counted apart, against the worker's `max_stalls`.
    pub max_attempts: u32,
    /// How long the job's handler may run, overriding the worker's default
    /// ([`crate::WorkerBuilder::timeout`]). When it runs out, the handler's
    /// future is dropped and the attempt fails with kind `timeout`, which
    /// is retried like a handler error while attempts are left. Every mode.
    pub timeout: Option<Duration>,
    /// Run the job no earlier than this long after the submit (server
    /// time). Every mode. See [`JobOptions::delay`].
    pub delay: Option<Duration>,
    /// Run the job no earlier than this time (compared with the server's
    /// clock). Every mode. See [`JobOptions::run_at`].
    pub run_at: Option<SystemTime>,
    /// Recoverable and reliable modes: how long a failed attempt waits
    /// before the next one (default: none, the job is queued again at once).
    pub backoff: Option<Backoff>,
    /// Recoverable and reliable modes: the job's unique key. See
    /// [`JobOptions::unique`].
    pub unique: Option<Unique>,
}

impl JobOptions {
    /// Sets [`JobOptions::timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// Sets [`JobOptions::id`].
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
    /// Sets [`JobOptions::lease`].
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }
    /// Sets [`JobOptions::max_attempts`].
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }
    /// Delays the job: it waits in the queue's delayed set, and a worker
    /// starts it once `delay` has passed (server time), within a few ms
    /// when a worker is free. Its status reads [`crate::JobState::Delayed`]
    /// meanwhile, and its handle awaits it as any other job. Replaces a
    /// [`JobOptions::run_at`]; at most 10^12 ms.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self.run_at = None;
        self
    }
    /// Runs the job no earlier than `at`, compared with the Redis server's
    /// clock (a time in the past runs it at once). Replaces a
    /// [`JobOptions::delay`].
    pub fn run_at(mut self, at: SystemTime) -> Self {
        self.run_at = Some(at);
        self.delay = None;
        self
    }
    /// Sets [`JobOptions::backoff`]: with [`JobOptions::max_attempts`] above
    /// 1, a failed attempt waits this long (server time) before the next.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }
    /// Makes the job unique (recoverable and reliable modes; protocol.md
    /// 8.10): when another job of the queue holds the same key, this job is
    /// not enqueued (nothing is written) and the submit returns a handle on
    /// the job that holds it instead. That handle's [`JobHandle::id`] is
    /// the holder's ID, not this job's ([`JobOptions::id`] or a new UUID):
    /// compare the two to tell whether the submit was deduplicated.
    /// Awaiting it awaits the holder's outcome, like [`Queue::job`] (with
    /// [`Unique::throttle`] the holder may have finished long ago, or
    /// expired: then [`Error::JobNotFound`]). Such a handle reads the
    /// holder's state when awaited, then every
    /// [`Config::result_poll_interval`] (the holder's doorbell stays with
    /// the handle of the client that submitted it), so it may learn the
    /// outcome up to one interval late.
    ///
    /// A submit is refused with [`Error::Config`] in simple mode, or for a
    /// key or a duration out of range (see [`Unique`]).
    pub fn unique(mut self, unique: Unique) -> Self {
        self.unique = Some(unique);
        self
    }

    /// When the job is due, as the scripts take it.
    fn due(&self) -> Result<Due, Error> {
        if let Some(at) = self.run_at {
            let ms = at
                .duration_since(UNIX_EPOCH)
                .map_err(|_| Error::Config("run_at must not be before 1970".into()))?
                .as_millis();
            if ms > u128::from(transitions::MAX_RUN_AT) {
                return Err(Error::Config(format!(
                    "run_at must be at most {} ms after the Unix epoch",
                    transitions::MAX_RUN_AT
                )));
            }
            return Ok(if ms == 0 {
                Due::Now
            } else {
                Due::At(ms as u64)
            });
        }
        match self.delay {
            Some(d) if d.as_millis() > transitions::MAX_MS => Err(Error::Config(format!(
                "delay must be at most {} ms",
                transitions::MAX_MS
            ))),
            Some(d) if d.as_millis() > 0 => Ok(Due::After(d)),
            _ => Ok(Due::Now),
        }
    }
}

/// A queue opened by a [`Client`], in one mode.
#[derive(Debug, Clone)]
pub struct Queue {
    client: Client,
    keys: QueueKeys,
    mode: Mode,
    channel: String,
    encoding: Encoding,
}

impl Queue {
    /// The queue's name.
    pub fn name(&self) -> &str {
        self.keys.queue()
    }

    /// The client's multiplexed connection.
    pub(crate) fn con(&self) -> &Conn {
        &self.client.inner.con
    }

    /// The queue's keys.
    pub(crate) fn keys(&self) -> &QueueKeys {
        &self.keys
    }

    /// Where the client's Redis is, to open connections of its own.
    pub(crate) fn backend(&self) -> &connection::Backend {
        &self.client.inner.backend
    }

    /// The client's settings.
    pub(crate) fn config(&self) -> &Config {
        &self.client.inner.config
    }

    /// The queue's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Uses `encoding` for the payloads submitted through this value
    /// (default: the client's [`Config::encoding`]).
    pub fn with_encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Submits one job and returns a handle to await its outcome.
    ///
    /// # Errors
    /// [`Error::TooLarge`] or [`Error::Encode`] before anything is written;
    /// [`Error::ModeMismatch`] or [`Error::ProtocolMismatch`] when the queue
    /// was re-registered differently since it was opened; [`Error::Redis`]
    /// when the call failed (after a dropped connection the job may or may
    /// not have been queued: in recoverable mode, submit with a
    /// [`JobOptions::id`] to retry safely).
    pub async fn submit<P: Serialize + ?Sized>(&self, payload: &P) -> Result<JobHandle, Error> {
        self.submit_with(payload, JobOptions::default()).await
    }

    /// Submits one job with [`JobOptions`]. With [`JobOptions::unique`],
    /// the handle may be one on the job that already holds the key (its
    /// [`JobHandle::id`] then differs from the ID asked for).
    ///
    /// # Errors
    /// As [`Queue::submit`], and [`Error::DuplicateJob`] when the ID exists;
    /// [`Error::Config`] for options out of range (or a unique key in
    /// simple mode).
    pub async fn submit_with<P: Serialize + ?Sized>(
        &self,
        payload: &P,
        options: JobOptions,
    ) -> Result<JobHandle, Error> {
        let mut handles = self
            .submit_iter(std::iter::once((payload, options)))
            .await?;
        Ok(handles.pop().expect("one job submitted"))
    }

    /// Submits many jobs: one script call per 10,000 jobs, all calls sent in
    /// one pipeline. Every job is checked and encoded before anything is
    /// written.
    ///
    /// # Errors
    /// As [`Queue::submit`]. When Redis refuses part of a batch, jobs in the
    /// chunks that succeeded stay queued and the error is returned.
    pub async fn submit_many<'a, P, I>(&self, payloads: I) -> Result<Vec<JobHandle>, Error>
    where
        P: Serialize + 'a,
        I: IntoIterator<Item = &'a P>,
    {
        self.submit_iter(payloads.into_iter().map(|p| (p, JobOptions::default())))
            .await
    }

    /// Submits many jobs, each with its own [`JobOptions`] (delays, run-at
    /// times, backoffs, unique keys...), as [`Queue::submit_many`] does.
    /// Returns one handle per job, in order. A job whose unique key is held
    /// (by an older job, or by an earlier job of the same batch) is not
    /// enqueued, and its handle is one on the holder (see
    /// [`JobOptions::unique`]).
    ///
    /// # Errors
    /// As [`Queue::submit_many`].
    pub async fn submit_many_with<'a, P, I>(&self, jobs: I) -> Result<Vec<JobHandle>, Error>
    where
        P: Serialize + 'a,
        I: IntoIterator<Item = (&'a P, JobOptions)>,
    {
        self.submit_iter(jobs.into_iter()).await
    }

    /// Creates or changes the recurring schedule `name` of this queue: from
    /// now on, the queue's workers submit one job with `payload` per fire
    /// (recoverable and reliable modes). Changing a schedule replaces its
    /// definition and next fire and keeps its history. Returns true when it
    /// was created.
    ///
    /// # Errors
    /// [`Error::Config`] in simple mode (fires are made exactly once by
    /// refusing a second job with the same ID, which needs job records) or
    /// for options a schedule cannot have; [`Error::InvalidName`] for a name
    /// that is empty, longer than 200 bytes or has control characters.
    pub async fn set_schedule<P: Serialize + ?Sized>(
        &self,
        name: &str,
        schedule: &Schedule,
        payload: &P,
    ) -> Result<bool, Error> {
        if self.mode == Mode::Simple {
            return Err(Error::Config(
                "schedules need recoverable or reliable mode".into(),
            ));
        }
        crate::schedule::check_name(name)?;
        let bytes = self.encoding.encode(payload, "payload")?;
        let max = self.client.inner.config.max_payload_bytes;
        if bytes.len() > max {
            return Err(Error::TooLarge {
                what: "payload",
                size: bytes.len(),
                max,
            });
        }
        let con = &self.client.inner.con;
        // The first fire counts from the server's clock, as every fire does.
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut con.clone())
            .await
            .map_err(Error::Redis)?;
        let server_ms = secs * 1000 + micros / 1000;
        let record = schedule.record(self.encoding.as_str(), &bytes, server_ms)?;
        match transitions::schedule_set(con, &self.keys, self.mode, name, &record).await {
            Err(Error::QueueNotRegistered { .. }) => {
                transitions::queue_register(con, &self.keys, self.mode).await?;
                transitions::schedule_set(con, &self.keys, self.mode, name, &record).await
            }
            other => other,
        }
    }

    /// Removes the schedule `name`; true when it existed. Jobs it submitted
    /// are not touched.
    ///
    /// # Errors
    /// [`Error::WrongType`] when the queue's schedules set holds another
    /// type; [`Error::Redis`] when Redis cannot be reached.
    pub async fn remove_schedule(&self, name: &str) -> Result<bool, Error> {
        crate::schedule::check_name(name)?;
        transitions::schedule_remove(&self.client.inner.con, &self.keys, name).await
    }

    /// The queue's schedules, soonest first: definition, next fire, history.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis cannot be reached or the keys hold other
    /// types.
    pub async fn schedules(&self) -> Result<Vec<ScheduleInfo>, Error> {
        let mut con = self.client.inner.con.clone();
        let names: Vec<Vec<u8>> = redis::cmd("ZRANGE")
            .arg(self.keys.schedules())
            .arg(0)
            .arg(-1)
            .query_async(&mut con)
            .await
            .map_err(|e| crate::error::on_key(e, &self.keys.schedules(), "zset"))?;
        let mut out = Vec::new();
        for name in names {
            let name = String::from_utf8_lossy(&name).into_owned();
            let key = self.keys.schedule(&name);
            let values: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                .arg(&key)
                .arg(&ScheduleInfo::FIELDS[..])
                .query_async(&mut con)
                .await
                .map_err(|e| crate::error::on_key(e, &key, "hash"))?;
            let values = values
                .into_iter()
                .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                .collect();
            out.extend(ScheduleInfo::from_fields(name, values));
        }
        Ok(out)
    }

    /// A handle on the job `id`, to await its outcome: for example after this
    /// program restarted, or from another client. Recoverable mode only; in
    /// simple mode outcomes are not stored.
    ///
    /// # Errors
    /// [`Error::Config`] in simple mode; [`Error::Redis`] when the reply
    /// channel cannot be subscribed.
    pub async fn job(&self, id: &str) -> Result<JobHandle, Error> {
        if self.mode == Mode::Simple {
            return Err(Error::Config(
                "simple mode does not store outcomes: only the submitting handle can await a job"
                    .into(),
            ));
        }
        let inner = &self.client.inner;
        inner.replies.subscribe(&self.channel).await?;
        Ok(JobHandle::new(
            id.to_owned(),
            inner.replies.register(id),
            Some(Arc::new(self.stored())),
            false,
        ))
    }

    /// The job's state, attempts, timestamps and error, without waiting.
    /// `None` when there is no such job (never submitted, or expired).
    /// Recoverable mode only.
    ///
    /// # Errors
    /// [`Error::Config`] in simple mode; [`Error::Redis`] on a failed read.
    pub async fn status(&self, id: &str) -> Result<Option<JobStatus>, Error> {
        if self.mode == Mode::Simple {
            return Err(Error::Config("simple mode does not store job state".into()));
        }
        JobStatus::read(&self.client.inner.con, &self.keys, id).await
    }

    fn stored(&self) -> Stored {
        let inner = &self.client.inner;
        Stored {
            con: inner.con.clone(),
            keys: self.keys.clone(),
            client_id: inner.id.clone(),
            poll: inner.config.result_poll_interval,
            reconnects: inner.replies.reconnects(),
            verify: inner.config.verify_outcomes,
            mode: self.mode,
            client: self.client.clone(),
        }
    }

    async fn submit_iter<'a, P, I>(&self, jobs: I) -> Result<Vec<JobHandle>, Error>
    where
        P: Serialize + ?Sized + 'a,
        I: Iterator<Item = (&'a P, JobOptions)>,
    {
        // Field names from OpenTelemetry's messaging conventions (a
        // producer's "send" span).
        let span = tracing::info_span!(
            "submit",
            otel.name = %format_args!("send {}", self.name()),
            otel.kind = "producer",
            messaging.system = "job_async_redis",
            messaging.operation.type = "send",
            messaging.destination.name = %self.name(),
            messaging.batch.message_count = tracing::field::Empty,
            messaging.message.id = tracing::field::Empty,
            job_async_redis.mode = self.mode.as_str(),
        );
        self.submit_prepared(jobs).instrument(span).await
    }

    async fn submit_prepared<'a, P, I>(&self, jobs: I) -> Result<Vec<JobHandle>, Error>
    where
        P: Serialize + ?Sized + 'a,
        I: Iterator<Item = (&'a P, JobOptions)>,
    {
        let max = self.client.inner.config.max_payload_bytes;
        let mut prepared = Vec::new();
        for (payload, options) in jobs {
            let bytes = self.encoding.encode(payload, "payload")?;
            if bytes.len() > max {
                return Err(Error::TooLarge {
                    what: "payload",
                    size: bytes.len(),
                    max,
                });
            }
            let out_of_range =
                |d: Option<Duration>| d.is_some_and(|d| !transitions::ms_in_range(d, 1));
            if u64::from(options.max_attempts) > transitions::MAX_COUNT
                || out_of_range(options.lease)
                || out_of_range(options.timeout)
            {
                return Err(Error::Config(format!(
                    "max_attempts must be at most {} and lease and timeout 1 ms to {} ms",
                    transitions::MAX_COUNT,
                    transitions::MAX_MS
                )));
            }
            options.due()?;
            if let Some(backoff) = &options.backoff {
                backoff.validate()?;
            }
            if let Some(unique) = &options.unique {
                if self.mode == Mode::Simple {
                    return Err(Error::Config(
                        "unique keys need recoverable or reliable mode: simple mode keeps no job records"
                            .into(),
                    ));
                }
                unique.validate()?;
            }
            let id = match options.id.clone() {
                Some(id) if id.is_empty() || id.len() > 256 => {
                    return Err(Error::InvalidName(format!(
                        "job id {id:?} must be 1 to 256 bytes"
                    )));
                }
                Some(id) => id,
                None => uuid::Uuid::new_v4().to_string(),
            };
            prepared.push((id, bytes, options));
        }
        if prepared.is_empty() {
            return Ok(Vec::new());
        }
        let span = tracing::Span::current();
        span.record("messaging.batch.message_count", prepared.len());
        if let [(id, _, _)] = &prepared[..] {
            span.record("messaging.message.id", id.as_str());
        }
        let calls = match self.mode {
            Mode::Simple => self.simple_calls(&prepared)?,
            _ => self.job_calls(&prepared),
        };
        // Subscribe first, so that no outcome can be published unseen.
        let inner = &self.client.inner;
        inner.replies.subscribe(&self.channel).await?;
        let stored = (self.mode != Mode::Simple).then(|| Arc::new(self.stored()));
        let unique = prepared.iter().any(|(_, _, o)| o.unique.is_some());
        let mut handles: Vec<JobHandle> = prepared
            .into_iter()
            .map(|(id, _, _)| {
                let waiter = inner.replies.register(&id);
                JobHandle::new(id, waiter, stored.clone(), true)
            })
            .collect();
        let replies = self.run_submit(&calls).await?;
        if unique {
            // Deduplicated handles only read the holder's state: they never
            // take its doorbell (job_watch with no client ID).
            let reader = Arc::new(Stored {
                client_id: String::new(),
                ..self.stored()
            });
            // Each call is a chunk of BATCH_CHUNK jobs, in order (job_calls).
            for (call, reply) in replies.iter().enumerate() {
                for (index, holder) in transitions::submit_refusals(reply)? {
                    let at = call * BATCH_CHUNK + index;
                    if at >= handles.len() {
                        return Err(Error::Decode {
                            what: "job_submit reply",
                            message: format!("refused job {index} of call {call} does not exist"),
                        });
                    }
                    // A handle on a job it did not submit, as Queue::job
                    // makes, but that neither registers a waiter under the
                    // holder's ID nor takes its doorbell: a client keeps one
                    // waiter per job ID, and the job rings one client, so
                    // either would leave another handle on the holder (its
                    // submitter's, in this process or another) without the
                    // doorbell it waits for. This one reads the job's hash:
                    // at once, then at each poll interval or reconnection.
                    let waiter = inner.replies.register(&format!(
                        "\u{0}deduplicated\u{0}{}",
                        uuid::Uuid::new_v4().simple()
                    ));
                    handles[at] = JobHandle::new(holder, waiter, Some(reader.clone()), false);
                }
            }
        }
        Ok(handles)
    }

    /// One `simple_submit` call per chunk of consecutive jobs that are due
    /// alike.
    fn simple_calls(&self, prepared: &[(String, Vec<u8>, JobOptions)]) -> Result<Vec<Call>, Error> {
        let submitted_ms = now_ms();
        let envelopes = prepared
            .iter()
            .map(|(id, bytes, options)| {
                let timeout = options.timeout;
                pack(
                    &Envelope {
                        id: id.clone(),
                        reply: Some(self.channel.clone()),
                        enc: self.encoding.as_str().to_owned(),
                        payload: ByteBuf::from(bytes.clone()),
                        submitted_ms,
                        timeout_ms: timeout.map(|t| t.as_millis() as u64),
                    },
                    "job envelope",
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut calls = Vec::new();
        let mut start = 0;
        while start < envelopes.len() {
            let due = prepared[start].2.due()?;
            let mut end = start + 1;
            while end < envelopes.len()
                && end - start < BATCH_CHUNK
                && prepared[end].2.due()? == due
            {
                end += 1;
            }
            calls.push(transitions::simple_submit(
                &self.keys,
                due,
                &envelopes[start..end],
            ));
            start = end;
        }
        Ok(calls)
    }

    fn job_calls(&self, prepared: &[(String, Vec<u8>, JobOptions)]) -> Vec<Call> {
        prepared
            .chunks(BATCH_CHUNK)
            .map(|chunk| {
                let jobs: Vec<NewJob> = chunk
                    .iter()
                    .map(|(id, bytes, options)| NewJob {
                        id,
                        enc: self.encoding.as_str(),
                        payload: bytes,
                        client: &self.client.inner.id,
                        lease: options.lease,
                        max_attempts: options.max_attempts.max(1),
                        timeout: options.timeout,
                        due: options.due().unwrap_or_default(),
                        backoff: options
                            .backoff
                            .as_ref()
                            .map(Backoff::to_wire)
                            .unwrap_or_default(),
                        unique: options.unique.as_ref().map(|u| (u.to_wire(), u.key())),
                    })
                    .collect();
                transitions::job_submit(&self.keys, self.mode, &jobs)
            })
            .collect()
    }

    /// Sends the submit calls and returns their replies, one per call.
    /// Calls refused because the queue's metadata is missing (deleted, or
    /// Redis restarted without persistence) are sent once more after
    /// registering the queue again.
    async fn run_submit(&self, calls: &[Call]) -> Result<Vec<redis::Value>, Error> {
        let mut results = self.run_calls(calls).await?;
        let unregistered: Vec<usize> = (0..calls.len())
            .filter(|&i| matches!(results[i], Err(Error::QueueNotRegistered { .. })))
            .collect();
        if !unregistered.is_empty() {
            transitions::queue_register(&self.client.inner.con, &self.keys, self.mode).await?;
            let retry: Vec<Call> = unregistered.iter().map(|&i| calls[i].clone()).collect();
            for (i, r) in unregistered.into_iter().zip(self.run_calls(&retry).await?) {
                results[i] = r;
            }
        }
        let replies = results.into_iter().collect::<Result<Vec<_>, Error>>()?;
        if let Some((replicas, timeout)) = self.client.inner.config.wait_for_replicas {
            let mut wait = redis::cmd("WAIT");
            wait.arg(replicas).arg(timeout.as_millis() as u64);
            let acked = connection::on_queue_primary(
                &mut self.client.inner.con.clone(),
                &self.keys.meta(),
                wait,
            )
            .await?;
            let acked: i64 = redis::from_redis_value(acked).map_err(|e| Error::Redis(e.into()))?;
            if acked < i64::from(replicas) {
                return Err(Error::NotReplicated {
                    acked,
                    wanted: i64::from(replicas),
                });
            }
        }
        Ok(replies)
    }

    /// Runs submit calls, one pipeline for all; one result per call.
    async fn run_calls(&self, calls: &[Call]) -> Result<Vec<Result<redis::Value, Error>>, Error> {
        let con = &self.client.inner.con;
        if let [call] = calls {
            return Ok(vec![
                transitions::run::<redis::Value>(con, call, &self.keys, None).await,
            ]);
        }
        let results = scripts::invoke_pipeline(&mut con.clone(), calls).await?;
        Ok(results
            .into_iter()
            .zip(calls)
            .map(|(r, call)| {
                r.map_err(|e| {
                    crate::error::from_script(e, call.script().name(), self.keys.queue(), None)
                })
            })
            .collect())
    }
}
