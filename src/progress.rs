//! Reading and following a job's progress (protocol.md 8.13): a handler
//! reports it with [`crate::Job::progress`]; `job_progress` keeps the
//! latest value on the job and publishes each one on the job's progress
//! channel.

use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;

use crate::encoding::Encoding;
use crate::error::Error;
use crate::handle::{JobHandle, Stored};

/// A message on a job's progress channel.
#[derive(Deserialize)]
struct Published {
    id: String,
    #[serde(default)]
    enc: Option<String>,
    progress: ByteBuf,
    /// The value's number among the job's progress values (absent: 0).
    #[serde(default)]
    seq: Option<String>,
}

/// A progress value's number, read leniently (absent or not a number: 0).
fn seq_of(value: Option<&str>) -> u64 {
    crate::wire::lenient_u64(value).unwrap_or(0)
}

fn decode<T: DeserializeOwned>(enc: &str, bytes: &[u8]) -> Result<T, Error> {
    let enc = Encoding::parse(enc).ok_or_else(|| Error::Decode {
        what: "progress",
        message: format!("unknown encoding {enc:?}"),
    })?;
    enc.decode(bytes, "progress")
}

fn stored(handle: &JobHandle) -> Result<&Stored, Error> {
    handle
        .stored()
        .map(|s| s.as_ref())
        .ok_or_else(|| Error::Config("simple mode jobs have no record to keep progress in".into()))
}

/// What a job's hash says of its progress.
struct Latest<T> {
    value: Option<T>,
    /// The value's number (0: none yet).
    seq: u64,
    state: Option<String>,
}

/// The latest progress and the job's state, read from its hash.
async fn latest<T: DeserializeOwned>(stored: &Stored, id: &str) -> Result<Latest<T>, Error> {
    let key = stored.keys.job(id);
    type Fields = (
        Option<String>,
        Option<String>,
        Option<Vec<u8>>,
        Option<String>,
    );
    let (state, enc, progress, seq): Fields = redis::cmd("HMGET")
        .arg(&key)
        .arg(&["state", "enc", "progress", "progress_seq"])
        .query_async(&mut stored.con.clone())
        .await
        .map_err(|e| crate::error::on_key(e, &key, "hash"))?;
    let value = match progress {
        Some(bytes) => Some(decode(enc.as_deref().unwrap_or("msgpack"), &bytes)?),
        None => None,
    };
    Ok(Latest {
        value,
        seq: seq_of(seq.as_deref()),
        state,
    })
}

/// True while a job in `state` may still report progress.
fn running(state: Option<&str>) -> bool {
    matches!(state, Some("queued" | "active"))
}

impl JobHandle {
    /// The job's latest progress ([`crate::Job::progress`]), or `None` when
    /// it has reported none (or the job is gone). Recoverable and reliable
    /// modes.
    ///
    /// # Errors
    /// [`Error::Config`] in simple mode; [`Error::Decode`] when the value
    /// does not decode as `T`; [`Error::Redis`].
    pub async fn progress<T: DeserializeOwned>(&self) -> Result<Option<T>, Error> {
        Ok(latest(stored(self)?, self.id()).await?.value)
    }

    /// Follows the job's progress: first the latest value (so a follower
    /// that joins late sees where the job is), then each newer one as the
    /// handler reports it, in order, each once (values carry their number,
    /// protocol.md 8.13). The stream ends when the job has finished (it
    /// checks the job's state at each poll interval,
    /// [`crate::Config::result_poll_interval`]). Values published while the
    /// client's pub/sub connection was down are missed; the latest is read
    /// again after a reconnection.
    ///
    /// # Errors
    /// [`Error::Config`] in simple mode; [`Error::Redis`] when the channel
    /// cannot be subscribed. Items: [`Error::Decode`] for a value that does
    /// not decode as `T`.
    pub async fn follow_progress<T: DeserializeOwned + Send + 'static>(
        &self,
    ) -> Result<impl Stream<Item = Result<T, Error>> + Send + 'static, Error> {
        let stored = stored(self)?.clone();
        let id = self.id().to_owned();
        let (sink, messages) = mpsc::unbounded_channel();
        // Subscribe first, then read: nothing published in between is lost.
        stored
            .client
            .replies()
            .listen(&stored.keys.progress_channel(&id), sink)
            .await?;
        let mut reconnects = stored.reconnects.clone();
        reconnects.borrow_and_update();
        let now = latest::<T>(&stored, &id).await?;
        let state = Follow {
            stored,
            id,
            messages,
            reconnects,
            reread: false,
            seen: now.seq,
            done: !running(now.state.as_deref()),
        };
        let first: Option<Result<T, Error>> = now.value.map(Ok);
        let rest = futures_util::stream::unfold(state, |mut f| async move {
            let item = f.next::<T>().await?;
            Some((item, f))
        });
        Ok(futures_util::stream::iter(first).chain(rest))
    }
}

/// The state of a progress follower.
struct Follow {
    stored: Stored,
    id: String,
    messages: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    /// Changes when the client's subscriptions were restored.
    reconnects: tokio::sync::watch::Receiver<u64>,
    /// Read the hash again (after a reconnection: messages may be lost).
    reread: bool,
    /// The number of the last value yielded (or read): older ones are
    /// skipped.
    seen: u64,
    /// The job has finished: yield what was already received, then end.
    done: bool,
}

impl Follow {
    /// The next progress value; `None` once the job has finished.
    async fn next<T: DeserializeOwned>(&mut self) -> Option<Result<T, Error>> {
        loop {
            if self.done {
                // Finished: what arrived before the end still counts.
                let (_, payload) = self.messages.try_recv().ok()?;
                if let Some(item) = self.take(&payload) {
                    return Some(item);
                }
                continue;
            }
            if std::mem::take(&mut self.reread) {
                match latest::<T>(&self.stored, &self.id).await {
                    Ok(now) => {
                        self.done = !running(now.state.as_deref());
                        if now.seq > self.seen {
                            self.seen = now.seq;
                            if let Some(value) = now.value {
                                return Some(Ok(value));
                            }
                        }
                        continue;
                    }
                    Err(e) => return Some(Err(e)),
                }
            }
            tokio::select! {
                message = self.messages.recv() => {
                    let (_, payload) = message?;
                    if let Some(item) = self.take(&payload) {
                        return Some(item);
                    }
                }
                changed = self.reconnects.changed() => match changed {
                    Ok(()) => self.reread = true,
                    // The client is closed: nothing more will arrive.
                    Err(_) => self.done = true,
                },
                _ = tokio::time::sleep(self.stored.poll) => {
                    // Still running? (A finished job publishes no more.)
                    let key = self.stored.keys.job(&self.id);
                    let state: redis::RedisResult<Option<String>> = redis::cmd("HGET")
                        .arg(&key)
                        .arg("state")
                        .query_async(&mut self.stored.con.clone())
                        .await;
                    if let Ok(state) = state {
                        self.done = !running(state.as_deref());
                    }
                }
            }
        }
    }

    /// The value a message carries, unless it is about another job or not
    /// newer than what was yielded.
    fn take<T: DeserializeOwned>(&mut self, payload: &[u8]) -> Option<Result<T, Error>> {
        match crate::wire::unpack::<Published>(payload, "progress message") {
            Ok(p) if p.id == self.id => {
                let seq = seq_of(p.seq.as_deref());
                if seq != 0 && seq <= self.seen {
                    return None;
                }
                self.seen = self.seen.max(seq);
                Some(decode(p.enc.as_deref().unwrap_or("msgpack"), &p.progress))
            }
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        // The channel is unsubscribed when no one else follows the job.
        let channel = self.stored.keys.progress_channel(&self.id);
        self.stored.client.replies().unlisten(&channel);
    }
}
