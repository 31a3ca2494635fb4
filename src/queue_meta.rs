//! Registering a queue's mode and protocol version (the `queue_register`
//! script), shared by clients and workers.

use redis::aio::ConnectionManager;

use crate::error::{Error, from_script};
use crate::keys::QueueKeys;
use crate::mode::{Mode, PROTOCOL_VERSION};
use crate::scripts::{self, Name};

/// Records `mode` and the protocol version for the queue, or checks that they
/// match what is recorded. Returns true when this call created the record.
pub(crate) async fn register(
    con: &mut ConnectionManager,
    keys: &QueueKeys,
    mode: Mode,
) -> Result<bool, Error> {
    let call = scripts::get(Name::QueueRegister)
        .call()
        .key(keys.meta())
        .arg(mode.as_str())
        .arg(PROTOCOL_VERSION.to_string());
    let created: i64 = call
        .invoke(con)
        .await
        .map_err(|e| from_script(e, call.script().name_static(), keys.queue()))?;
    Ok(created == 1)
}
