//! Opening connections.
//!
//! - Non-blocking calls (scripts) share one auto-reconnecting multiplexed
//!   [`ConnectionManager`]; concurrent calls are pipelined on it.
//! - Each blocking wait (BLMPOP) has a connection of its own, whose response
//!   timeout is the block time plus the command timeout: the redis crate's
//!   default of 500 ms would cut every longer block short.
//! - Pub/sub has a dedicated connection (see `replies`).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, ProtocolVersion};

use crate::config::Config;
use crate::error::Error;

/// Opens the Redis client for `config.url`. It speaks RESP3 (Redis >= 6),
/// so that the shared connection notices a disconnection at once and
/// reconnects before the next call, rather than failing that call.
pub(crate) fn client(config: &Config) -> Result<Client, Error> {
    config.validate()?;
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
        return Ok(Client::build_with_tls(info, certs)?);
    }
    Ok(Client::open(info)?)
}

/// Opens the shared connection for non-blocking calls and loads the scripts.
pub(crate) async fn manager(client: &Client, config: &Config) -> Result<ConnectionManager, Error> {
    let manager_config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(config.command_timeout))
        .set_connection_timeout(Some(config.connect_timeout))
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_secs(1))
        .set_number_of_retries(6);
    let mut con = client
        .get_connection_manager_with_config(manager_config)
        .await?;
    crate::scripts::load_all(&mut con).await?;
    Ok(con)
}

/// Opens a connection for blocking calls that block up to `config.block_timeout`.
pub(crate) async fn blocking(
    client: &Client,
    config: &Config,
) -> Result<MultiplexedConnection, Error> {
    let con_config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.block_timeout + config.command_timeout));
    Ok(client
        .get_multiplexed_async_connection_with_config(&con_config)
        .await?)
}
