//! Settings shared by clients and workers.

use std::time::Duration;

use crate::encoding::Encoding;
use crate::error::Error;
use crate::keys::{DEFAULT_PREFIX, validate_prefix};

/// Connection and limit settings shared by [`crate::Client`] and
/// [`crate::Worker`].
///
/// ```
/// use job_async_redis::Config;
/// let config = Config::new("redis://127.0.0.1:6379").prefix("myapp");
/// assert_eq!(config.prefix, "myapp");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Redis URL. `redis://[user:password@]host:port[/db]`; passwords and ACL
    /// users go here. `rediss://` (TLS) needs the crate's `tls` feature.
    pub url: String,
    /// Prefix of every key and channel. Default `jq`.
    pub prefix: String,
    /// Encoding of payloads submitted by a client. Default MessagePack.
    pub encoding: Encoding,
    /// Largest encoded payload a client submits and largest result a worker
    /// returns, in bytes. Default 1 MiB.
    pub max_payload_bytes: usize,
    /// Response timeout of non-blocking calls. Default 5 s.
    pub command_timeout: Duration,
    /// Timeout of each connection attempt. Default 5 s.
    pub connect_timeout: Duration,
    /// How long one blocking pop waits before it is re-issued. The blocking
    /// connection's response timeout is this plus `command_timeout`.
    /// Default 5 s.
    pub block_timeout: Duration,
    /// After each submit, wait until this many replicas have the write
    /// (`WAIT`), for up to the given time; `None` (the default) does not
    /// wait. See protocol.md section 2.1 for what this does and does not
    /// guarantee.
    pub wait_for_replicas: Option<(u32, Duration)>,
    /// Recoverable mode: how often a client awaiting a job re-reads its state
    /// even without a doorbell (which can be missed while a connection is
    /// down, or taken by another watcher). Default 5 s.
    pub result_poll_interval: Duration,
    /// Recoverable and reliable modes: ignore the outcome that a doorbell
    /// carries and read it from the job's hash instead (one more read per
    /// job). Anyone who may publish on the client's reply channel can forge
    /// a doorbell; the hash can only be changed by holders of the queue's
    /// credentials (see protocol.md, "Trust model"). Default false.
    pub verify_outcomes: bool,
    /// PEM certificate(s) of the authority that signed the server's TLS
    /// certificate, for `rediss://` URLs when it is not in the system's
    /// roots. Default none.
    #[cfg(feature = "tls")]
    pub tls_ca_pem: Option<Vec<u8>>,
}

impl Config {
    /// Settings for `url` with every default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            encoding: Encoding::default(),
            max_payload_bytes: 1024 * 1024,
            command_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            block_timeout: Duration::from_secs(5),
            result_poll_interval: Duration::from_secs(5),
            verify_outcomes: false,
            wait_for_replicas: None,
            #[cfg(feature = "tls")]
            tls_ca_pem: None,
        }
    }

    /// Sets [`Config::prefix`].
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets [`Config::encoding`].
    pub fn encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Sets [`Config::max_payload_bytes`].
    pub fn max_payload_bytes(mut self, max: usize) -> Self {
        self.max_payload_bytes = max;
        self
    }

    /// Sets [`Config::command_timeout`].
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Sets [`Config::block_timeout`].
    pub fn block_timeout(mut self, timeout: Duration) -> Self {
        self.block_timeout = timeout;
        self
    }

    /// Sets [`Config::wait_for_replicas`].
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_for_replicas = Some((replicas, timeout));
        self
    }

    /// Sets [`Config::result_poll_interval`].
    pub fn result_poll_interval(mut self, interval: Duration) -> Self {
        self.result_poll_interval = interval;
        self
    }

    /// Sets [`Config::verify_outcomes`].
    pub fn verify_outcomes(mut self, verify: bool) -> Self {
        self.verify_outcomes = verify;
        self
    }

    /// Sets [`Config::tls_ca_pem`].
    #[cfg(feature = "tls")]
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        validate_prefix(&self.prefix)?;
        if self.block_timeout < Duration::from_millis(10) {
            return Err(Error::Config("block_timeout must be at least 10 ms".into()));
        }
        if self
            .wait_for_replicas
            .is_some_and(|(_, t)| t >= self.command_timeout)
        {
            return Err(Error::Config(
                "wait_for_replicas' timeout must be shorter than command_timeout".into(),
            ));
        }
        if self.max_payload_bytes == 0 {
            return Err(Error::Config("max_payload_bytes must be positive".into()));
        }
        Ok(())
    }
}
