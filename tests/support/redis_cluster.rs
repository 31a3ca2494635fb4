//! A throwaway Redis Cluster: 3 primaries and 3 replicas of `redis-server`
//! (or of the binary `JQ_TEST_SERVER` names, see redis_server.rs) on free
//! loopback ports, created with `redis-cli --cluster create` (Redis 7's
//! redis-cli creates Valkey clusters too), and stopped when dropped.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::redis_server::RedisServer;

/// A running local cluster.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

/// A port whose cluster bus port (port + 10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    /// Starts 6 nodes and joins them into a cluster with one replica per
    /// primary; returns when every slot is served.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                RedisServer::start_on(
                    cluster_port(),
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        "3000",
                        "--cluster-config-file",
                        "nodes.conf",
                    ],
                )
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli (from the redis-tools or redis-server package) is needed to create a cluster");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = Self { nodes };
        cluster.wait_ok();
        cluster
    }

    /// Waits until every node reports the cluster ok and sees all 6 nodes,
    /// and every replica is in sync with its primary.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        'wait: while Instant::now() < deadline {
            for node in &self.nodes {
                let mut con = node.connection();
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut con).unwrap();
                let replication: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut con)
                    .unwrap();
                let synced = if replication.contains("role:master") {
                    replication.contains("connected_slaves:1")
                } else {
                    replication.contains("master_link_status:up")
                };
                if !info.contains("cluster_state:ok")
                    || !info.contains("cluster_known_nodes:6")
                    || !synced
                {
                    std::thread::sleep(Duration::from_millis(100));
                    continue 'wait;
                }
            }
            return;
        }
        panic!("the cluster did not become ok within 30 s");
    }

    /// `redis+cluster://` URL with every node.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The node serving `key`'s slot as primary, and one of its replicas.
    /// Right after a failover the demoted node may not be listed as a
    /// replica yet: this asks again for up to 10 s.
    pub fn primary_and_replica_of(&self, key: &str) -> (&RedisServer, &RedisServer) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.listed_primary_and_replica_of(key) {
                Some(pair) => return pair,
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                None => panic!("the primary of {key:?} has no replica"),
            }
        }
    }

    /// The primary serving `key` and one of its replicas, as CLUSTER NODES
    /// lists them now (`None` while no replica is listed).
    fn listed_primary_and_replica_of(&self, key: &str) -> Option<(&RedisServer, &RedisServer)> {
        let mut con = self.nodes[0].connection();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut con)
            .unwrap();
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut con).unwrap();
        let mut primary_id = None;
        for line in nodes.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f[2].contains("master") {
                for range in &f[8..] {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>())
                        && (a..=b).contains(&slot)
                    {
                        primary_id = Some(f[0].to_owned());
                    }
                }
            }
        }
        let primary_id = primary_id.expect("a primary serves the slot");
        let port_of = |id: &str| -> u16 {
            let line = nodes.lines().find(|l| l.starts_with(id)).unwrap();
            let addr = line.split(' ').nth(1).unwrap();
            addr.split('@')
                .next()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let replica_id = nodes
            .lines()
            .find(|l| l.split(' ').nth(3) == Some(primary_id.as_str()))
            .map(|l| l.split(' ').next().unwrap().to_owned())?;
        let find = |port: u16| self.nodes.iter().find(|n| n.port() == port).unwrap();
        Some((find(port_of(&primary_id)), find(port_of(&replica_id))))
    }

    /// How many primaries serve at least one of `keys`.
    pub fn primaries_serving(&self, keys: &[String]) -> usize {
        let mut ports: Vec<u16> = keys
            .iter()
            .map(|k| self.primary_and_replica_of(k).0.port())
            .collect();
        ports.sort();
        ports.dedup();
        ports.len()
    }
}
