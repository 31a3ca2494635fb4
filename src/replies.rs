//! Receives job outcomes on a client's reply channels and hands each one to
//! the [`crate::JobHandle`] waiting for it; and, for channels with a
//! listener ([`Replies::listen`]: a job's progress, a worker's control
//! channel), hands every message on them to that listener as it is.
//!
//! One task per client owns one dedicated pub/sub connection. When the
//! connection drops, the task reconnects and subscribes to every channel
//! again; a [`Replies::subscribe`] made meanwhile waits until the channel is
//! subscribed, so a client never submits a job whose outcome it could not
//! receive at that moment. Outcomes published while the connection was down
//! are lost in simple mode (see protocol.md).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use redis::Value;

use crate::config::Config;
use crate::connection::{self, Backend};
use crate::error::Error;
use crate::wire::{Reply, unpack};

/// Per job ID, every waiter for it (several handles may await one job):
/// (waiter number, where its next message goes).
type WaiterMap = Arc<Mutex<HashMap<String, Vec<(u64, oneshot::Sender<Reply>)>>>>;

/// Numbers the waiters, so that one can remove itself and no other.
static NEXT_WAITER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn next_waiter() -> u64 {
    NEXT_WAITER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The channels subscribed on the live connection, kept by the reply task:
/// a submit to a channel found here needs no round trip to the task.
type Live = Arc<Mutex<HashSet<String>>>;

/// Channels whose messages go, as they are, to listeners instead of the
/// outcome waiters (several per channel: two followers of one job's
/// progress each get every message).
#[derive(Default)]
struct Listeners(HashMap<String, Vec<Sink>>);

impl Listeners {
    fn add(&mut self, channel: &str, sink: Sink) {
        self.0.entry(channel.to_owned()).or_default().push(sink);
    }

    /// Hands a message to the channel's listeners: `None` when the channel
    /// has none (an outcome channel), `Some(false)` when none listens any
    /// more (then unsubscribe).
    fn deliver(&mut self, channel: &str, payload: &[u8]) -> Option<bool> {
        let sinks = self.0.get_mut(channel)?;
        sinks.retain(|to| to.send((channel.to_owned(), payload.to_vec())).is_ok());
        if sinks.is_empty() {
            self.0.remove(channel);
            return Some(false);
        }
        Some(true)
    }

    /// Forgets the listeners of `channel` that are gone; true when none is
    /// left (then unsubscribe).
    fn prune(&mut self, channel: &str) -> bool {
        let Some(sinks) = self.0.get_mut(channel) else {
            return false;
        };
        sinks.retain(|to| !to.is_closed());
        if sinks.is_empty() {
            self.0.remove(channel);
            return true;
        }
        false
    }
}

/// Where a listener gets (channel, message) pairs.
pub(crate) type Sink = mpsc::UnboundedSender<(String, Vec<u8>)>;

enum Command {
    Subscribe {
        channel: String,
        done: oneshot::Sender<Result<(), redis::RedisError>>,
    },
    /// Subscribes to `channel` and sends its messages to `sink` until the
    /// sink's receiver is dropped (then unsubscribes).
    Listen {
        channel: String,
        sink: Sink,
        done: oneshot::Sender<Result<(), redis::RedisError>>,
    },
    /// A listener of `channel` is gone: unsubscribe when it was the last.
    Prune { channel: String },
}

/// Handle to a client's reply task. The task ends when the handle is dropped.
pub(crate) struct Replies {
    commands: mpsc::UnboundedSender<Command>,
    waiters: WaiterMap,
    live: Live,
    timeout: Duration,
    reconnects: watch::Receiver<u64>,
}

/// Receives one job's outcome. Dropping it forgets the job.
pub(crate) struct Waiter {
    job_id: String,
    number: u64,
    rx: oneshot::Receiver<Reply>,
    waiters: WaiterMap,
}

impl Waiter {
    /// Waits for the outcome; `None` when the client was closed. After a
    /// message, call [`Waiter::rearm`] before waiting again.
    pub(crate) async fn recv(&mut self) -> Option<Reply> {
        (&mut self.rx).await.ok()
    }

    /// Listens for the next message about the same job (after a doorbell
    /// that did not end the wait: one without the outcome, or one that is
    /// not trusted).
    pub(crate) fn rearm(&mut self) {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut map) = self.waiters.lock() {
            let list = map.entry(self.job_id.clone()).or_default();
            list.retain(|(n, _)| *n != self.number);
            list.push((self.number, tx));
        }
        self.rx = rx;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Ok(mut map) = self.waiters.lock()
            && let Some(list) = map.get_mut(&self.job_id)
        {
            list.retain(|(n, _)| *n != self.number);
            if list.is_empty() {
                map.remove(&self.job_id);
            }
        }
    }
}

impl Replies {
    /// Starts the reply task for `backend`. [`Replies::subscribe`] waits up
    /// to the connect plus command timeouts for a connection.
    pub(crate) fn start(backend: Backend, config: &Config) -> Self {
        let timeout = config.connect_timeout + config.command_timeout;
        let (commands, rx) = mpsc::unbounded_channel();
        let waiters = WaiterMap::default();
        let live = Live::default();
        let (generation, reconnects) = watch::channel(0);
        let shared = Shared {
            waiters: waiters.clone(),
            live: live.clone(),
            generation,
        };
        match backend {
            Backend::Single(client) => {
                tokio::spawn(run(client, rx, shared));
            }
            Backend::Cluster(_) => {
                tokio::spawn(run_cluster(config.clone(), rx, shared));
            }
        }
        Self {
            commands,
            waiters,
            live,
            timeout,
            reconnects,
        }
    }

    /// Changes each time the subscriptions were restored after the
    /// connection dropped: messages published meanwhile may be lost, so
    /// waiters that can re-read their job's state should do so.
    pub(crate) fn reconnects(&self) -> watch::Receiver<u64> {
        self.reconnects.clone()
    }

    /// Subscribes to `channel` (once; later calls return when the channel is
    /// subscribed on the live connection).
    pub(crate) async fn subscribe(&self, channel: &str) -> Result<(), Error> {
        if self
            .live
            .lock()
            .expect("live channels lock")
            .contains(channel)
        {
            return Ok(());
        }
        let (done, rx) = oneshot::channel();
        let command = Command::Subscribe {
            channel: channel.to_owned(),
            done,
        };
        self.send(command, rx, channel).await
    }

    /// Subscribes to `channel` and sends its messages, as published, with
    /// the channel's name, to `sink` until the sink's receiver is dropped.
    /// Returns once the channel is subscribed, so that nothing published
    /// afterwards is missed (while the connection holds: see
    /// [`Replies::reconnects`]). A channel may have several listeners; call
    /// [`Replies::unlisten`] when one is dropped.
    pub(crate) async fn listen(&self, channel: &str, sink: Sink) -> Result<(), Error> {
        let (done, rx) = oneshot::channel();
        let command = Command::Listen {
            channel: channel.to_owned(),
            sink,
            done,
        };
        self.send(command, rx, channel).await
    }

    /// Tells the task that a listener of `channel` was dropped, so that the
    /// channel is unsubscribed when it was the last one.
    pub(crate) fn unlisten(&self, channel: &str) {
        let _ = self.commands.send(Command::Prune {
            channel: channel.to_owned(),
        });
    }

    async fn send(
        &self,
        command: Command,
        rx: oneshot::Receiver<Result<(), redis::RedisError>>,
        channel: &str,
    ) -> Result<(), Error> {
        let closed = || {
            Error::Redis(redis::RedisError::from((
                redis::ErrorKind::Io,
                "reply subscription task stopped",
            )))
        };
        self.commands.send(command).map_err(|_| closed())?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(result)) => Ok(result?),
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(Error::Redis(redis::RedisError::from((
                redis::ErrorKind::Io,
                "timed out subscribing to the reply channel",
                channel.to_owned(),
            )))),
        }
    }

    /// Registers interest in `job_id`'s outcome.
    pub(crate) fn register(&self, job_id: &str) -> Waiter {
        let (tx, rx) = oneshot::channel();
        let number = next_waiter();
        self.waiters
            .lock()
            .expect("reply waiters lock")
            .entry(job_id.to_owned())
            .or_default()
            .push((number, tx));
        Waiter {
            job_id: job_id.to_owned(),
            number,
            rx,
            waiters: self.waiters.clone(),
        }
    }
}

/// What the reply task shares with the client.
struct Shared {
    waiters: WaiterMap,
    live: Live,
    /// Bumped each time subscriptions were restored (see `reconnects`).
    generation: watch::Sender<u64>,
}

impl Shared {
    fn set_live(&self, channels: &[String]) {
        let mut live = self.live.lock().expect("live channels lock");
        live.clear();
        live.extend(channels.iter().cloned());
    }
}

async fn run(
    client: redis::Client,
    mut commands: mpsc::UnboundedReceiver<Command>,
    shared: Shared,
) {
    let Shared {
        waiters,
        generation,
        ..
    } = &shared;
    let mut channels: Vec<String> = Vec::new();
    let mut listeners = Listeners::default();
    let mut backoff = Duration::from_millis(20);
    'connect: loop {
        shared.set_live(&[]);
        let pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "reply subscription: cannot connect; retrying");
                if commands.is_closed() {
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        if !channels.is_empty() {
            if let Err(e) = sink.subscribe(&channels).await {
                tracing::warn!(error = %e, "reply subscription: resubscribe failed; reconnecting");
                continue;
            }
            tracing::info!(channels = channels.len(), "reply subscription restored");
            generation.send_modify(|g| *g += 1);
        }
        shared.set_live(&channels);
        backoff = Duration::from_millis(20);
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => {
                        let channel = msg.get_channel_name().to_owned();
                        let payload = msg.get_payload_bytes();
                        match listeners.deliver(&channel, payload) {
                            None => dispatch(waiters, payload),
                            Some(true) => {}
                            Some(false) => {
                                // The listeners are gone: stop listening.
                                channels.retain(|c| *c != channel);
                                shared.set_live(&channels);
                                if let Err(e) = sink.unsubscribe(&channel).await {
                                    tracing::debug!(error = %e, "unsubscribe failed; reconnecting");
                                    continue 'connect;
                                }
                            }
                        }
                    }
                    None => {
                        tracing::warn!("reply subscription lost; reconnecting");
                        continue 'connect;
                    }
                },
                command = commands.recv() => match command {
                    None => break 'connect,
                    Some(Command::Prune { channel }) => {
                        if listeners.prune(&channel) {
                            channels.retain(|c| *c != channel);
                            shared.set_live(&channels);
                            if let Err(e) = sink.unsubscribe(&channel).await {
                                tracing::debug!(error = %e, "unsubscribe failed; reconnecting");
                                continue 'connect;
                            }
                        }
                    }
                    Some(command) => {
                        let (channel, done) = match command {
                            Command::Subscribe { channel, done } => (channel, done),
                            Command::Listen { channel, sink: to, done } => {
                                listeners.add(&channel, to);
                                (channel, done)
                            }
                            Command::Prune { .. } => unreachable!("handled above"),
                        };
                        if channels.contains(&channel) {
                            let _ = done.send(Ok(()));
                            continue;
                        }
                        match sink.subscribe(&channel).await {
                            Ok(()) => {
                                channels.push(channel);
                                shared.set_live(&channels);
                                let _ = done.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = done.send(Err(e));
                                continue 'connect;
                            }
                        }
                    }
                },
            }
        }
    }
    // The client is gone: wake every waiter with "closed".
    shared.set_live(&[]);
    if let Ok(mut map) = waiters.lock() {
        map.clear();
    }
}

/// On a cluster: sharded pub/sub (SSUBSCRIBE), on the node that owns each
/// channel's slot, through the cluster connection's RESP3 push messages. The
/// cluster connection resubscribes after topology changes; a waiter in
/// recoverable or reliable mode also re-reads its job's state regularly.
async fn run_cluster(
    config: Config,
    mut commands: mpsc::UnboundedReceiver<Command>,
    shared: Shared,
) {
    let Shared {
        waiters,
        generation,
        ..
    } = &shared;
    let (push_tx, mut pushes) = mpsc::unbounded_channel::<redis::PushInfo>();
    let mut backoff = Duration::from_millis(20);
    let mut con = loop {
        let opened = match connection::cluster_client(
            &config,
            config.command_timeout,
            Some(push_tx.clone()),
        ) {
            Ok(client) => client.get_async_connection().await.map_err(Error::Redis),
            Err(e) => Err(e),
        };
        match opened {
            Ok(con) => break con,
            Err(e) => {
                tracing::warn!(error = %e, "reply subscription: cannot connect to the cluster; retrying");
                if commands.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    };
    let mut channels: Vec<String> = Vec::new();
    let mut listeners = Listeners::default();
    loop {
        tokio::select! {
            push = pushes.recv() => match push {
                Some(push) => match push.kind {
                    redis::PushKind::SMessage | redis::PushKind::Message => {
                        let channel = match push.data.first() {
                            Some(Value::BulkString(c)) => String::from_utf8_lossy(c).into_owned(),
                            _ => String::new(),
                        };
                        if let Some(Value::BulkString(payload)) = push.data.get(1) {
                            match listeners.deliver(&channel, payload) {
                                None => dispatch(waiters, payload),
                                Some(true) => {}
                                Some(false) => {
                                    channels.retain(|c| *c != channel);
                                    shared.set_live(&channels);
                                    if let Err(e) = con.sunsubscribe(&channel).await {
                                        tracing::debug!(%channel, error = %e, "could not unsubscribe");
                                    }
                                }
                            }
                        }
                    }
                    redis::PushKind::Disconnection => {
                        generation.send_modify(|g| *g += 1);
                    }
                    redis::PushKind::SUnsubscribe => {
                        // The slot moved (failover, resharding): subscribe
                        // again, at the new owner, and have waiters re-read.
                        if let Some(Value::BulkString(channel)) = push.data.first() {
                            let channel = String::from_utf8_lossy(channel).into_owned();
                            if channels.contains(&channel) {
                                tracing::info!(%channel, "sharded subscription moved; subscribing again");
                                if let Err(e) = con.ssubscribe(&channel).await {
                                    tracing::warn!(%channel, error = %e, "could not subscribe again");
                                }
                            }
                        }
                        generation.send_modify(|g| *g += 1);
                    }
                    _ => {}
                },
                None => break,
            },
            command = commands.recv() => match command {
                None => break,
                Some(Command::Prune { channel }) => {
                    if listeners.prune(&channel) {
                        channels.retain(|c| *c != channel);
                        shared.set_live(&channels);
                        if let Err(e) = con.sunsubscribe(&channel).await {
                            tracing::debug!(%channel, error = %e, "could not unsubscribe");
                        }
                    }
                }
                Some(command) => {
                    let (channel, done) = match command {
                        Command::Subscribe { channel, done } => (channel, done),
                        Command::Listen { channel, sink, done } => {
                            listeners.add(&channel, sink);
                            (channel, done)
                        }
                        Command::Prune { .. } => unreachable!("handled above"),
                    };
                    if channels.contains(&channel) {
                        let _ = done.send(Ok(()));
                        continue;
                    }
                    let result = con.ssubscribe(&channel).await;
                    if result.is_ok() {
                        channels.push(channel);
                        shared.set_live(&channels);
                    }
                    let _ = done.send(result);
                }
            },
        }
    }
    shared.set_live(&[]);
    if let Ok(mut map) = waiters.lock() {
        map.clear();
    }
}

/// Hands each outcome in a reply message to its waiter. A message is one
/// outcome record, or an array of them (`job_finish_batch` sends one
/// message per client for all of that client's jobs in the batch).
fn dispatch(waiters: &WaiterMap, payload: &[u8]) {
    let is_array = matches!(payload.first(), Some(0x90..=0x9f | 0xdc | 0xdd));
    let replies = if is_array {
        unpack::<Vec<Reply>>(payload, "reply message")
    } else {
        unpack::<Reply>(payload, "reply message").map(|one| vec![one])
    };
    let replies = match replies {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an undecodable reply message");
            return;
        }
    };
    let Ok(mut map) = waiters.lock() else {
        return;
    };
    for reply in replies {
        // Every handle awaiting the job gets the message.
        if let Some(list) = map.remove(&reply.id) {
            for (_, tx) in list {
                let _ = tx.send(reply.clone());
            }
        }
    }
}
