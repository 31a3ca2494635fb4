//! Opening connections, to one server or to a Redis Cluster.
//!
//! - Non-blocking calls (scripts) share one auto-reconnecting multiplexed
//!   connection ([`Conn`]); concurrent calls are pipelined on it. On a
//!   cluster it is the redis crate's cluster connection, which routes each
//!   call by its first key (every key of a queue is in one slot), loads
//!   scripts on every primary, and follows MOVED after a failover.
//! - Each blocking wait (BLMPOP, BLMOVE) has a connection of its own, whose
//!   response timeout is the block time plus the command timeout: the redis
//!   crate's default of 500 ms would cut every longer block short.
//! - Pub/sub has a dedicated connection (see `replies`).
//!
//! A cluster is given as `redis+cluster://host1:port1,host2:port2` (or
//! `rediss+cluster://` with the `tls` feature): any reachable nodes, from
//! which the others are discovered. User and password go before the first
//! host and apply to all nodes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, RedisFuture,
    Value,
};

use crate::config::Config;
use crate::error::Error;

/// Where Redis is: one server, or a cluster.
#[derive(Clone)]
// Made once per client or worker: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Backend {
    Single(Client),
    Cluster(ClusterClient),
}

/// A connection for non-blocking calls (or, opened with [`blocking`], for
/// one blocking wait), to one server or to a cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Blocking(MultiplexedConnection),
    Cluster(Healing),
}

/// A cluster connection that is opened again when a call times out.
///
/// After a failover the redis crate's cluster connection can keep sending a
/// slot's calls to a node that no longer answers them: each call then times
/// out, and since its per-node timeout is also its overall timeout, the
/// connection never gets to refresh its view of the cluster. A fresh
/// connection asks the cluster for its topology. Clones share the
/// connection, and one renewal serves them all.
#[derive(Clone)]
pub(crate) struct Healing(Arc<HealingInner>);

struct HealingInner {
    client: ClusterClient,
    current: Mutex<(u64, ClusterConnection)>,
    /// A renewal is under way (at most one at a time).
    renewing: std::sync::atomic::AtomicBool,
    /// When the last renewal started: at most one a second.
    last_try: Mutex<Option<std::time::Instant>>,
}

impl Healing {
    async fn open(client: ClusterClient) -> redis::RedisResult<Self> {
        let con = client.get_async_connection().await?;
        Ok(Self(Arc::new(HealingInner {
            client,
            current: Mutex::new((0, con)),
            renewing: std::sync::atomic::AtomicBool::new(false),
            last_try: Mutex::new(None),
        })))
    }

    fn current(&self) -> (u64, ClusterConnection) {
        self.0
            .current
            .lock()
            .expect("cluster connection lock")
            .clone()
    }

    /// Runs `call` on the current connection; when it times out, renews the
    /// connection (see [`Healing::renew`]) and returns the timeout.
    async fn call<T, F, Fut>(&self, call: F) -> redis::RedisResult<T>
    where
        F: FnOnce(ClusterConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let (generation, con) = self.current();
        let result = call(con).await;
        if result.as_ref().is_err_and(|e| e.is_timeout()) {
            self.renew(generation);
        }
        result
    }

    /// Opens a new connection in the background, unless one is being opened
    /// already, one was tried in the last second, or another caller has
    /// already replaced connection `generation`. The caller's own call
    /// returns its error at once: it does not wait for the renewal.
    fn renew(&self, generation: u64) {
        use std::sync::atomic::Ordering;
        if self.current().0 != generation {
            return;
        }
        {
            let mut last = self.0.last_try.lock().expect("renewal lock");
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            if self
                .0
                .renewing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        let inner = self.0.clone();
        tokio::spawn(async move {
            match inner.client.get_async_connection().await {
                Ok(con) => {
                    let mut current = inner.current.lock().expect("cluster connection lock");
                    if current.0 == generation {
                        tracing::warn!("a cluster call timed out: opened a new cluster connection");
                        *current = (generation + 1, con);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not open a new cluster connection"),
            }
            inner.renewing.store(false, Ordering::Release);
        });
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Blocking(c) => c.req_packed_command(cmd),
            Conn::Cluster(h) => {
                Box::pin(h.call(move |mut con| async move { con.req_packed_command(cmd).await }))
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Blocking(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(h) => Box::pin(h.call(move |mut con| async move {
                con.req_packed_commands(pipeline, offset, count).await
            })),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Blocking(c) => c.get_db(),
            Conn::Cluster(h) => h.current().1.get_db(),
        }
    }
}

impl Conn {
    /// True on a cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

/// Sends `cmd` to the primary that serves `key`'s slot (on a single server,
/// to the server). For commands about the connection's own writes, such as
/// WAIT: the redis crate would send a keyless command to every primary of a
/// cluster and aggregate the replies, which asks the wrong nodes and, after
/// a failover, left the connection answering nothing but timeouts.
pub(crate) async fn on_queue_primary(
    con: &mut Conn,
    key: &str,
    cmd: Cmd,
) -> redis::RedisResult<Value> {
    match con {
        Conn::Cluster(h) => {
            use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
            let route = Route::with_key(key, SlotAddr::Master);
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
            h.call(move |mut con| async move { con.route_command(cmd, routing).await })
                .await
        }
        other => cmd.query_async(other).await,
    }
}

/// Every key matching `pattern`, found with SCAN (`count` keys examined per
/// call): on a single server, of the server; on a cluster, of every primary
/// (from CLUSTER NODES), each scanned to the end. Keys may repeat when the
/// cluster resharded meanwhile.
pub(crate) async fn scan_every_primary(
    con: &Conn,
    pattern: &str,
    count: usize,
) -> redis::RedisResult<Vec<Vec<u8>>> {
    let scan = |cursor: u64| {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        cmd
    };
    let mut keys = Vec::new();
    match con {
        Conn::Cluster(h) => {
            use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
            let nodes: String = {
                let cmd = redis::cmd("CLUSTER").arg("NODES").clone();
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
                let value = h
                    .call(move |mut con| async move { con.route_command(cmd, routing).await })
                    .await?;
                redis::from_redis_value(value)?
            };
            for (host, port) in primaries(&nodes) {
                let mut cursor = 0u64;
                loop {
                    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port,
                    });
                    let cmd = scan(cursor);
                    let value = h
                        .call(move |mut con| async move { con.route_command(cmd, routing).await })
                        .await?;
                    let (next, batch): (u64, Vec<Vec<u8>>) = redis::from_redis_value(value)?;
                    keys.extend(batch);
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        other => {
            let mut con = other.clone();
            let mut cursor = 0u64;
            loop {
                let (next, batch): (u64, Vec<Vec<u8>>) = scan(cursor).query_async(&mut con).await?;
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }
    Ok(keys)
}

/// The primaries that serve slots, from CLUSTER NODES: `(host, port)`.
fn primaries(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (addr, flags) = (fields.get(1)?, fields.get(2)?);
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master")
                || flags
                    .iter()
                    .any(|f| f.starts_with("fail") || *f == "noaddr")
            {
                return None;
            }
            // ip:port@cport[,hostname]
            let hostport = addr.split(['@', ',']).next()?;
            let (host, port) = hostport.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

/// The node URLs of a `redis+cluster://` URL, or `None` for a single server.
pub(crate) fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.strip_suffix("+cluster")?;
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    let hosts = hosts.trim_end_matches('/');
    Some(
        hosts
            .split(',')
            .map(|h| format!("{scheme}://{auth}{h}"))
            .collect(),
    )
}

/// Opens the client for `config.url`. It speaks RESP3 (Redis >= 6), so that
/// the shared connection notices a disconnection at once and reconnects
/// before the next call, rather than failing that call.
pub(crate) fn backend(config: &Config) -> Result<Backend, Error> {
    config.validate()?;
    if cluster_nodes(&config.url).is_some() {
        return Ok(Backend::Cluster(cluster_client(
            config,
            config.command_timeout,
            None,
        )?));
    }
    let info = config.url.as_str().into_connection_info()?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let info = info.set_redis_settings(settings);
    #[cfg(feature = "tls")]
    if let Some(ca) = &config.tls_ca_pem {
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.clone()),
        };
        return Ok(Backend::Single(Client::build_with_tls(info, certs)?));
    }
    Ok(Backend::Single(Client::open(info)?))
}

/// Opens the shared connection for non-blocking calls, waits for a server
/// that is still loading its dataset, and loads the scripts (on every
/// primary of a cluster).
pub(crate) async fn shared(backend: &Backend, config: &Config) -> Result<Conn, Error> {
    let mut con = plain(backend, config).await?;
    crate::scripts::load_all(&mut con).await?;
    Ok(con)
}

/// Opens the shared connection for non-blocking calls and waits (up to the
/// command timeout) until the server answers: a server that is loading its
/// dataset answers `LOADING` to everything else meanwhile.
pub(crate) async fn plain(backend: &Backend, config: &Config) -> Result<Conn, Error> {
    let started = std::time::Instant::now();
    let mut con = loop {
        let opened = match backend {
            Backend::Single(client) => {
                let manager_config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(config.command_timeout))
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_min_delay(Duration::from_millis(20))
                    .set_max_delay(Duration::from_secs(1))
                    .set_number_of_retries(6);
                client
                    .get_connection_manager_with_config(manager_config)
                    .await
                    .map(Conn::Single)
            }
            Backend::Cluster(client) => Healing::open(client.clone()).await.map(Conn::Cluster),
        };
        match opened {
            Ok(con) => break con,
            Err(e) if is_loading(&e) => wait_loading(started, config, &e).await?,
            Err(e) => return Err(Error::Redis(e)),
        }
    };
    loop {
        match redis::cmd("PING").query_async::<Value>(&mut con).await {
            Ok(_) => return Ok(con),
            Err(e) if is_loading(&e) => wait_loading(started, config, &e).await?,
            Err(e) => return Err(Error::Redis(e)),
        }
    }
}

/// True when the server (or a node) is still loading its dataset.
fn is_loading(e: &redis::RedisError) -> bool {
    e.code() == Some("LOADING") || e.to_string().contains("LOADING")
}

/// Sleeps a little before asking a loading server again, or gives up with
/// [`Error::Unavailable`] once the command timeout has passed.
async fn wait_loading(
    started: std::time::Instant,
    config: &Config,
    e: &redis::RedisError,
) -> Result<(), Error> {
    let waited = started.elapsed();
    if waited >= config.command_timeout {
        tracing::warn!(error = %e, "redis is still loading its dataset");
        return Err(Error::Unavailable {
            reason: "LOADING: the server is loading its dataset".into(),
            waited,
        });
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}

/// Opens a connection for blocking calls that block up to `config.block_timeout`.
pub(crate) async fn blocking(backend: &Backend, config: &Config) -> Result<Conn, Error> {
    let timeout = config.block_timeout + config.command_timeout;
    match backend {
        Backend::Single(client) => {
            let con_config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(Some(timeout));
            Ok(Conn::Blocking(
                client
                    .get_multiplexed_async_connection_with_config(&con_config)
                    .await?,
            ))
        }
        Backend::Cluster(_) => Ok(Conn::Cluster(
            Healing::open(cluster_client(config, timeout, None)?).await?,
        )),
    }
}

/// A cluster client for `config.url` whose calls time out after
/// `response_timeout`; with `push`, it delivers pub/sub messages there.
pub(crate) fn cluster_client(
    config: &Config,
    response_timeout: Duration,
    push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
) -> Result<ClusterClient, Error> {
    let nodes = cluster_nodes(&config.url)
        .ok_or_else(|| Error::Config("not a redis+cluster:// URL".into()))?;
    let mut builder = ClusterClient::builder(nodes)
        .use_protocol(ProtocolVersion::RESP3)
        .connection_timeout(config.connect_timeout)
        .response_timeout(response_timeout);
    if let Some(push) = push {
        builder = builder.push_sender(push);
    }
    #[cfg(feature = "tls")]
    if let Some(ca) = &config.tls_ca_pem {
        builder = builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.clone()),
        });
    }
    Ok(builder.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primaries_are_read_from_cluster_nodes() {
        let nodes = "07c3 127.0.0.1:30004@31004,host4 slave e7d1 0 1 4 connected\n\
                     67ed 127.0.0.1:30002@31002 master - 0 1 2 connected 5461-10922\n\
                     292f 127.0.0.1:30003@31003 master,fail - 0 1 3 connected\n\
                     e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460\n";
        assert_eq!(
            primaries(nodes),
            [
                ("127.0.0.1".to_owned(), 30002),
                ("127.0.0.1".to_owned(), 30001)
            ]
        );
    }

    #[test]
    fn cluster_urls_list_their_nodes() {
        assert_eq!(cluster_nodes("redis://127.0.0.1:6379"), None);
        assert_eq!(
            cluster_nodes("redis+cluster://u:p@10.0.0.1:7000,10.0.0.2:7001/").unwrap(),
            vec!["redis://u:p@10.0.0.1:7000", "redis://u:p@10.0.0.2:7001"]
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://h:1").unwrap(),
            vec!["rediss://h:1"]
        );
    }
}
