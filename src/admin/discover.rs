//! Finding the queues under a prefix: SCAN for their metadata keys, on
//! every primary of a cluster.

use redis::Value;
use serde::Serialize;

use crate::connection::{self, Conn};
use crate::error::Error;
use crate::keys::QueueKeys;

/// A queue found by [`super::Admin::queues`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct QueueInfo {
    /// The queue's name.
    pub name: String,
    /// Its mode as recorded (`simple`, `recoverable`, `reliable`; another
    /// value when another program wrote it).
    pub mode: String,
    /// Its protocol version as recorded.
    pub protocol: String,
    /// When it was registered (ms since the Unix epoch, server time).
    pub created_ms: Option<u64>,
}

/// SCAN's batch size: keys examined per call.
const SCAN_COUNT: usize = 1000;

/// The queues under `prefix`, sorted by name.
pub(crate) async fn queues(con: &Conn, prefix: &str) -> Result<Vec<QueueInfo>, Error> {
    let pattern = format!("{}:{{*}}:meta", glob_escape(prefix));
    let mut names: Vec<String> = connection::scan_every_primary(con, &pattern, SCAN_COUNT)
        .await?
        .into_iter()
        .filter_map(|key| queue_of(prefix, &key))
        .collect();
    names.sort();
    names.dedup();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let Ok(keys) = QueueKeys::new(prefix, &name) else {
            continue;
        };
        let values: Value = redis::cmd("HMGET")
            .arg(keys.meta())
            .arg(&["mode", "protocol", "created_ms"])
            .query_async(&mut con.clone())
            .await
            .or_else(|e| {
                // A key of another type under the pattern: not a queue.
                if e.code() == Some("WRONGTYPE") {
                    Ok(Value::Nil)
                } else {
                    Err(e)
                }
            })?;
        let Value::Array(values) = values else {
            continue;
        };
        let text = |i: usize| match values.get(i) {
            Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        };
        let (Some(mode), protocol) = (text(0), text(1)) else {
            continue;
        };
        out.push(QueueInfo {
            name,
            mode,
            protocol: protocol.unwrap_or_default(),
            created_ms: crate::wire::lenient_u64(text(2).as_deref()),
        });
    }
    Ok(out)
}

/// The queue name in metadata key `key` (`<prefix>:{<queue>}:meta`).
fn queue_of(prefix: &str, key: &[u8]) -> Option<String> {
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix(prefix)?.strip_prefix(":{")?;
    let name = rest.strip_suffix("}:meta")?;
    (!name.is_empty() && !name.contains(['{', '}'])).then(|| name.to_owned())
}

/// `s` with the characters that SCAN's MATCH treats as a pattern escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_keys_name_their_queue() {
        assert_eq!(queue_of("jq", b"jq:{emails}:meta"), Some("emails".into()));
        assert_eq!(queue_of("jq", b"jq:{a:b}:meta"), Some("a:b".into()));
        assert_eq!(queue_of("jq", b"jq:{emails}:pending"), None);
        assert_eq!(queue_of("jq", b"other:{emails}:meta"), None);
        assert_eq!(queue_of("jq", b"jq:{}:meta"), None);
        assert_eq!(queue_of("jq", b"jq:{x}y}:meta"), None);
    }

    #[test]
    fn a_prefix_with_glob_characters_is_matched_literally() {
        assert_eq!(glob_escape("jq"), "jq");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
