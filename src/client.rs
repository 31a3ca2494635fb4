//! [`Client`] and [`Queue`]: submitting jobs.

use std::sync::Arc;

use redis::aio::ConnectionManager;
use serde::Serialize;
use serde_bytes::ByteBuf;

use crate::config::Config;
use crate::connection;
use crate::encoding::Encoding;
use crate::error::{Error, from_script};
use crate::handle::JobHandle;
use crate::keys::QueueKeys;
use crate::mode::{Mode, PROTOCOL_VERSION};
use crate::queue_meta;
use crate::replies::Replies;
use crate::scripts::{self, Call, Name};
use crate::wire::{Envelope, now_ms, pack};

/// Most jobs in one `submit` script call of [`Queue::submit_many`].
const BATCH_CHUNK: usize = 1000;

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
    con: ConnectionManager,
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
        let client = connection::client(&config)?;
        let con = connection::manager(&client, &config).await?;
        let replies = Replies::start(client, config.connect_timeout + config.command_timeout);
        Ok(Self {
            inner: Arc::new(Inner {
                id: uuid::Uuid::new_v4().simple().to_string(),
                config,
                con,
                replies,
            }),
        })
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
        queue_meta::register(&mut self.inner.con.clone(), &keys, mode).await?;
        Ok(Queue {
            channel: keys.reply_channel(&self.inner.id),
            keys,
            mode,
            encoding: self.inner.config.encoding,
            client: self.clone(),
        })
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
    /// not have been queued).
    pub async fn submit<P: Serialize + ?Sized>(&self, payload: &P) -> Result<JobHandle, Error> {
        let mut handles = self.submit_iter(std::iter::once(payload)).await?;
        Ok(handles.pop().expect("one job submitted"))
    }

    /// Submits many jobs: one script call per 1,000 jobs, all calls sent in
    /// one pipeline. Either every job is checked and encoded before anything
    /// is written, or an error is returned and nothing is written.
    ///
    /// # Errors
    /// As [`Queue::submit`]. When Redis refuses part of a batch, jobs in the
    /// chunks that succeeded stay queued and the error is returned.
    pub async fn submit_many<'a, P, I>(&self, payloads: I) -> Result<Vec<JobHandle>, Error>
    where
        P: Serialize + 'a,
        I: IntoIterator<Item = &'a P>,
    {
        self.submit_iter(payloads.into_iter()).await
    }

    async fn submit_iter<'a, P, I>(&self, payloads: I) -> Result<Vec<JobHandle>, Error>
    where
        P: Serialize + ?Sized + 'a,
        I: Iterator<Item = &'a P>,
    {
        let max = self.client.inner.config.max_payload_bytes;
        let submitted_ms = now_ms();
        let mut ids = Vec::new();
        let mut envelopes = Vec::new();
        for payload in payloads {
            let bytes = self.encoding.encode(payload, "payload")?;
            if bytes.len() > max {
                return Err(Error::TooLarge {
                    what: "payload",
                    size: bytes.len(),
                    max,
                });
            }
            let id = uuid::Uuid::new_v4().to_string();
            envelopes.push(pack(
                &Envelope {
                    id: id.clone(),
                    reply: Some(self.channel.clone()),
                    enc: self.encoding.as_str().to_owned(),
                    payload: ByteBuf::from(bytes),
                    submitted_ms,
                },
                "job envelope",
            )?);
            ids.push(id);
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Subscribe first, so that no outcome can be published unseen.
        let inner = &self.client.inner;
        inner.replies.subscribe(&self.channel).await?;
        let handles: Vec<JobHandle> = ids
            .into_iter()
            .map(|id| {
                let waiter = inner.replies.register(&id);
                JobHandle::new(id, waiter)
            })
            .collect();
        let calls: Vec<Call> = envelopes
            .chunks(BATCH_CHUNK)
            .map(|chunk| self.submit_call(chunk))
            .collect();
        let mut results = self.run_calls(&calls).await?;
        let unregistered: Vec<usize> = (0..calls.len())
            .filter(|&i| matches!(results[i], Err(Error::QueueNotRegistered { .. })))
            .collect();
        if !unregistered.is_empty() {
            // The metadata was lost (deleted, or Redis restarted without
            // persistence): register again and retry just those calls once.
            queue_meta::register(&mut inner.con.clone(), &self.keys, self.mode).await?;
            let retry: Vec<Call> = unregistered.iter().map(|&i| calls[i].clone()).collect();
            for (i, r) in unregistered.into_iter().zip(self.run_calls(&retry).await?) {
                results[i] = r;
            }
        }
        results.into_iter().collect::<Result<Vec<()>, Error>>()?;
        Ok(handles)
    }

    fn submit_call(&self, envelopes: &[Vec<u8>]) -> Call {
        let mut call = scripts::get(Name::Submit)
            .call()
            .key(self.keys.meta())
            .key(self.keys.pending())
            .arg(self.mode.as_str())
            .arg(PROTOCOL_VERSION.to_string());
        for e in envelopes {
            call = call.arg(e);
        }
        call
    }

    /// Runs submit calls; one result per call.
    async fn run_calls(&self, calls: &[Call]) -> Result<Vec<Result<(), Error>>, Error> {
        let mut con = self.client.inner.con.clone();
        let map = |e| from_script(e, "submit", self.keys.queue());
        if let [call] = calls {
            return Ok(vec![
                call.invoke::<i64, _>(&mut con).await.map(drop).map_err(map),
            ]);
        }
        let results = scripts::invoke_pipeline(&mut con, calls).await?;
        Ok(results
            .into_iter()
            .map(|r| r.map(drop).map_err(map))
            .collect())
    }
}
