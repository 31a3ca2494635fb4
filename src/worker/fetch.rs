//! The worker's blocking pop (BLMPOP) on its own connection.

use std::time::Duration;

use crate::connection::Conn;
use tokio_util::sync::CancellationToken;

use super::{Backoff, Shared};
use crate::connection;
use crate::error::{Error, is_transient};

/// Entries popped from one list: the list's key and the entries.
pub(crate) type Popped = (String, Vec<Vec<u8>>);

/// Owns the worker's blocking connection, reconnecting when it drops.
#[derive(Default)]
pub(crate) struct Fetcher {
    /// The blocking connection, and its CLIENT ID on a single server (used
    /// to wake it at shutdown; on a cluster the block runs out instead).
    blocking: Option<(Conn, Option<i64>)>,
    backoff: Backoff,
    reconnected: bool,
    /// On a cluster, the keys of one blocking call must share a slot: with
    /// several queues, each call blocks briefly on one queue, in turn.
    rotation: usize,
}

/// How long each turn blocks on one queue when a cluster worker serves
/// several queues.
const CLUSTER_TURN: Duration = Duration::from_millis(100);

impl Fetcher {
    /// One BLMPOP of up to `count` entries from the first non-empty list of
    /// `keys` (in that order), blocking up to the configured block timeout.
    /// See [`Fetcher::block`] for what `Ok(None)` means.
    pub(crate) async fn pop(
        &mut self,
        shared: &Shared,
        keys: &[String],
        count: usize,
    ) -> Result<Option<Popped>, Error> {
        let (keys, timeout) = if shared.con.is_cluster() && keys.len() > 1 {
            self.rotation = (self.rotation + 1) % keys.len();
            let turn = shared.config.block_timeout.min(CLUSTER_TURN);
            (&keys[self.rotation..=self.rotation], turn)
        } else {
            (keys, shared.config.block_timeout)
        };
        let mut cmd = redis::cmd("BLMPOP");
        cmd.arg(timeout.as_secs_f64())
            .arg(keys.len())
            .arg(keys)
            .arg("RIGHT")
            .arg("COUNT")
            .arg(count);
        Ok(self.block::<Option<Popped>>(shared, &cmd).await?.flatten())
    }

    /// One BLMOVE of the oldest entry of `from` to the head of `to`, blocking
    /// up to the configured block timeout.
    pub(crate) async fn moved(
        &mut self,
        shared: &Shared,
        from: &str,
        to: &str,
    ) -> Result<Option<String>, Error> {
        let mut cmd = redis::cmd("BLMOVE");
        cmd.arg(from)
            .arg(to)
            .arg("RIGHT")
            .arg("LEFT")
            .arg(shared.config.block_timeout.as_secs_f64());
        Ok(self.block::<Option<String>>(shared, &cmd).await?.flatten())
    }

    /// True once after the fetch connection dropped (and when it was first
    /// opened): a blocking command's reply may have been lost with it.
    pub(crate) fn take_reconnected(&mut self) -> bool {
        std::mem::take(&mut self.reconnected)
    }

    /// Sends a blocking command on the fetch connection. Returns `Ok(None)`
    /// after a dropped connection (it reconnects on the next call, after a
    /// backoff); otherwise the command's reply.
    ///
    /// When shutdown is requested meanwhile, the command is woken with
    /// CLIENT UNBLOCK and still awaited: dropping it could lose entries the
    /// server already moved. Callers must handle entries returned after
    /// shutdown.
    async fn block<T: redis::FromRedisValue>(
        &mut self,
        shared: &Shared,
        cmd: &redis::Cmd,
    ) -> Result<Option<T>, Error> {
        if self.blocking.is_none() {
            match open(shared).await {
                Ok(b) => {
                    self.blocking = Some(b);
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
            let (con, client_id) = self.blocking.as_mut().expect("opened above");
            let client_id = *client_id;
            let call = cmd.query_async::<T>(con);
            tokio::pin!(call);
            tokio::select! {
                result = &mut call => result,
                _ = shared.shutdown.cancelled(), if client_id.is_none() => call.await,
                _ = shared.shutdown.cancelled(), if client_id.is_some() => {
                    // The command may not be blocking yet when the first
                    // UNBLOCK arrives (UNBLOCK then answers 0): repeat.
                    loop {
                        let unblock: redis::RedisResult<i64> = redis::cmd("CLIENT")
                            .arg("UNBLOCK")
                            .arg(client_id.expect("checked above"))
                            .query_async(&mut shared.con.clone())
                            .await;
                        if let Err(e) = unblock {
                            tracing::debug!(error = %e, "CLIENT UNBLOCK failed; waiting for the block to time out");
                            break call.await;
                        }
                        tokio::select! {
                            result = &mut call => break result,
                            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        }
                    }
                }
            }
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

async fn open(shared: &Shared) -> Result<(Conn, Option<i64>), Error> {
    let mut con = connection::blocking(&shared.client, &shared.config).await?;
    if con.is_cluster() {
        return Ok((con, None));
    }
    let id: i64 = redis::cmd("CLIENT").arg("ID").query_async(&mut con).await?;
    Ok((con, Some(id)))
}

/// Sleeps for `delay`, or less when shutdown is requested.
pub(crate) async fn pause(shutdown: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown.cancelled() => {}
    }
}
