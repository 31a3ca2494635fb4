//! The worker's blocking waits (BLMPOP, BLMOVE) on a connection of their
//! own.
//!
//! Shutdown must not lose what a blocking command already took. A BLMPOP
//! also waits on the worker's wake list (`<prefix>:{<queue>}:wake:<worker>`,
//! its first key): shutdown pushes to it, so the pop returns at once and is
//! still read to the end. A reliable worker's BLMOVE cannot wait on a second
//! list; at shutdown it is abandoned and its connection dropped: an ID it
//! moved anyway is in the worker's in-flight list, which the worker puts back
//! when it leaves and which recovery passes keep looking at afterwards (see
//! protocol.md, `reliable_requeue_worker`). No `CLIENT UNBLOCK` is needed.

use std::sync::Arc;
use std::time::Duration;

use crate::connection::Conn;
use tokio_util::sync::CancellationToken;

use super::{Backoff, Shared};
use crate::connection;
use crate::error::{Error, is_transient};
use crate::keys::QueueKeys;

/// Entries popped from one list: the list's key and the entries.
pub(crate) type Popped = (String, Vec<Vec<u8>>);

/// Owns the worker's blocking connection, reconnecting when it drops.
#[derive(Default)]
pub(crate) struct Fetcher {
    blocking: Option<Conn>,
    backoff: Backoff,
    reconnected: bool,
    /// On a cluster, the keys of one blocking call must share a slot: with
    /// several queues, each call blocks briefly on one queue, in turn.
    rotation: usize,
}

/// How long each turn blocks on one queue when a cluster worker serves
/// several queues.
const CLUSTER_TURN: Duration = Duration::from_millis(100);

/// How long a wake list lives if the worker dies before deleting it.
const WAKE_TTL_MS: u64 = 60_000;

impl Fetcher {
    /// One BLMPOP of up to `count` entries from the first non-empty list of
    /// `key_of(queue)` over `queues` (in that order), blocking up to the
    /// configured block timeout, or until a held queue must be asked again
    /// (see `gate`). `Ok(None)`: nothing arrived (timeout,
    /// shutdown, or a dropped connection, see [`Fetcher::take_reconnected`]).
    ///
    /// # Errors
    /// [`Error::WrongType`] naming the list when one of them holds another
    /// Redis type; other errors that retrying will not fix.
    pub(crate) async fn pop(
        &mut self,
        shared: &Shared,
        queues: &[&Arc<QueueKeys>],
        key_of: impl Fn(&QueueKeys) -> String,
        count: usize,
    ) -> Result<Option<Popped>, Error> {
        let (queues, timeout) = if shared.con.is_cluster() && queues.len() > 1 {
            self.rotation = (self.rotation + 1) % queues.len();
            let turn = shared.config.block_timeout.min(CLUSTER_TURN);
            (&queues[self.rotation..=self.rotation], turn)
        } else {
            (queues, shared.config.block_timeout)
        };
        // A held queue must be asked again when its rate window lets the
        // next start pass (BLMPOP takes at least a millisecond).
        let timeout = shared
            .holds
            .next_ask(queues.iter().map(|q| q.queue()))
            .map_or(timeout, |ask| {
                timeout.min(ask.max(Duration::from_millis(1)))
            });
        let Some(first) = queues.first() else {
            return Ok(None);
        };
        let wake = first.wake(&shared.id);
        let lists: Vec<String> = queues.iter().map(|q| key_of(q)).collect();
        let mut cmd = redis::cmd("BLMPOP");
        cmd.arg(timeout.as_secs_f64())
            .arg(lists.len() + 1)
            .arg(&wake)
            .arg(&lists)
            .arg("RIGHT")
            .arg("COUNT")
            .arg(count);
        match self.block::<Option<Popped>>(shared, &cmd, true).await {
            Ok(Some(Some((key, _)))) if key == wake => {
                if !shared.shutdown.is_cancelled() {
                    // Not ours: someone else pushed to this worker's wake
                    // list. Empty it, so it cannot keep the queues waiting.
                    let _: redis::RedisResult<i64> = redis::cmd("DEL")
                        .arg(&wake)
                        .query_async(&mut shared.con.clone())
                        .await;
                }
                Ok(None)
            }
            Ok(popped) => Ok(popped.flatten()),
            Err(Error::Redis(e)) if e.code() == Some("WRONGTYPE") => {
                if is_wrong_type(shared, &wake, "list").await {
                    // The wake list is this worker's own: someone wrote
                    // something else there. Delete it and carry on.
                    tracing::error!(key = %wake, "the wake list held another type: deleted");
                    super::Counters::add(&shared.counters.queue_errors, 1);
                    let _: redis::RedisResult<i64> = redis::cmd("DEL")
                        .arg(&wake)
                        .query_async(&mut shared.con.clone())
                        .await;
                    return Ok(None);
                }
                Err(wrong_type(shared, &lists, "list").await)
            }
            Err(e) => Err(e),
        }
    }

    /// One BLMOVE of the oldest entry of `from` to the head of `to`, blocking
    /// up to the configured block timeout. At shutdown the command is
    /// abandoned (see the module's documentation) and `Ok(None)` returned.
    pub(crate) async fn moved(
        &mut self,
        shared: &Shared,
        from: &str,
        to: &str,
    ) -> Result<Option<Vec<u8>>, Error> {
        let mut cmd = redis::cmd("BLMOVE");
        cmd.arg(from)
            .arg(to)
            .arg("RIGHT")
            .arg("LEFT")
            .arg(shared.config.block_timeout.as_secs_f64());
        match self.block::<Option<Vec<u8>>>(shared, &cmd, false).await {
            Ok(moved) => Ok(moved.flatten()),
            Err(Error::Redis(e)) if e.code() == Some("WRONGTYPE") => {
                Err(wrong_type(shared, &[from.to_owned(), to.to_owned()], "list").await)
            }
            Err(e) => Err(e),
        }
    }

    /// True once after the fetch connection dropped (and when it was first
    /// opened): a blocking command's reply may have been lost with it.
    pub(crate) fn take_reconnected(&mut self) -> bool {
        std::mem::take(&mut self.reconnected)
    }

    /// Sends a blocking command on the fetch connection. Returns `Ok(None)`
    /// after a dropped connection (it reconnects on the next call, after a
    /// backoff) or an abandoned command; otherwise the command's reply.
    ///
    /// When shutdown is requested meanwhile: with `wakeable` (the command
    /// waits on the wake list too) the wake list is pushed to and the reply
    /// still awaited, since the command may already have taken entries;
    /// otherwise the command is abandoned and the connection dropped.
    async fn block<T: redis::FromRedisValue>(
        &mut self,
        shared: &Shared,
        cmd: &redis::Cmd,
        wakeable: bool,
    ) -> Result<Option<T>, Error> {
        if self.blocking.is_none() {
            match connection::blocking(&shared.client, &shared.config).await {
                Ok(con) => {
                    self.blocking = Some(con);
                    self.reconnected = true;
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(worker = %shared.id, error = %e, "cannot open the fetch connection; retrying");
                    pause(&shared.shutdown, self.backoff.next()).await;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        let result = {
            let con = self.blocking.as_mut().expect("opened above");
            let call = cmd.query_async::<T>(con);
            tokio::pin!(call);
            tokio::select! {
                result = &mut call => Some(result),
                _ = shared.shutdown.cancelled(), if wakeable => {
                    wake(shared).await;
                    Some(call.await)
                }
                _ = shared.shutdown.cancelled(), if !wakeable => None,
            }
        };
        let Some(result) = result else {
            // Abandoned: dropping the connection ends the command.
            self.blocking = None;
            return Ok(None);
        };
        match result {
            Ok(reply) => {
                self.backoff.reset();
                Ok(Some(reply))
            }
            Err(e) if is_transient(&e) => {
                tracing::warn!(worker = %shared.id, error = %e, "fetch connection failed; reconnecting");
                self.blocking = None;
                // A reply may have been lost with it: say so now, not only
                // when the connection is next opened (with a backlog, the
                // worker may not block again for a long time).
                self.reconnected = true;
                pause(&shared.shutdown, self.backoff.next()).await;
                Ok(None)
            }
            Err(e) => Err(Error::Redis(e)),
        }
    }
}

/// Pushes to every wake list of this worker, ending its blocking pop (one
/// pipeline per queue: on a cluster each queue's lists are in its own slot).
async fn wake(shared: &Shared) {
    for q in &shared.queues {
        let key = q.wake(&shared.id);
        let mut pipe = redis::pipe();
        pipe.cmd("LPUSH").arg(&key).arg("1").ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(WAKE_TTL_MS).ignore();
        if let Err(e) = pipe.exec_async(&mut shared.con.clone()).await {
            tracing::debug!(error = %e, "could not push to the wake list; the pop ends at its timeout");
        }
    }
}

/// Deletes this worker's wake lists (after its fetch loop has ended).
pub(crate) async fn forget_wake_lists(shared: &Shared) {
    let mut con = shared.con.clone();
    for q in &shared.queues {
        let deleted: redis::RedisResult<i64> = redis::cmd("DEL")
            .arg(q.wake(&shared.id))
            .query_async(&mut con)
            .await;
        if let Err(e) = deleted {
            tracing::debug!(error = %e, "could not delete a wake list; it expires by itself");
        }
    }
}

/// The type `key` holds when it is neither `expected` nor missing.
async fn type_if_wrong(shared: &Shared, key: &str, expected: &str) -> Option<String> {
    let found: redis::RedisResult<String> = redis::cmd("TYPE")
        .arg(key)
        .query_async(&mut shared.con.clone())
        .await;
    found.ok().filter(|f| f != expected && f != "none")
}

async fn is_wrong_type(shared: &Shared, key: &str, expected: &str) -> bool {
    type_if_wrong(shared, key, expected).await.is_some()
}

/// Finds which of `keys` holds another type than `expected`, after a
/// command on them answered WRONGTYPE.
async fn wrong_type(shared: &Shared, keys: &[String], expected: &str) -> Error {
    for key in keys {
        if let Some(found) = type_if_wrong(shared, key, expected).await {
            return Error::WrongType {
                key: key.clone(),
                expected: expected.to_owned(),
                found,
            };
        }
    }
    Error::WrongType {
        key: keys.join(" "),
        expected: expected.to_owned(),
        found: "another type".to_owned(),
    }
}

/// Sleeps for `delay`, or less when shutdown is requested.
pub(crate) async fn pause(shutdown: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown.cancelled() => {}
    }
}
