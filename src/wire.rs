//! Records that cross the wire in simple mode, as protocol.md defines them.
//! They are always MessagePack maps with string keys (`rmp_serde` named
//! encoding); the job's own payload and result inside them are opaque bytes
//! in the job's encoding.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::error::Error;

/// A job as pushed on a simple-mode pending list.
///
/// Reading follows protocol.md section 6: a required field of the wrong
/// type makes the envelope invalid; an optional one (`reply`,
/// `submitted_ms`) counts as absent; `payload` may be bin or str.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Envelope {
    /// Job ID, unique per queue (a UUID v4 in this implementation).
    pub id: String,
    /// Channel to publish the outcome on; absent when nobody waits.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient"
    )]
    pub reply: Option<String>,
    /// Encoding of `payload` (and of the result): `msgpack` or `json`.
    pub enc: String,
    /// The job's payload.
    pub payload: ByteBuf,
    /// Submission time, milliseconds since the Unix epoch (client clock).
    #[serde(default, deserialize_with = "lenient_ms")]
    pub submitted_ms: u64,
}

/// An optional field: a value of another type counts as absent
/// (protocol.md section 6, "a mistyped optional field").
fn lenient<'de, D, T>(de: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        Valid(T),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Option::<Either<T>>::deserialize(de)? {
        Some(Either::Valid(v)) => Some(v),
        _ => None,
    })
}

/// [`lenient`] for an optional time in ms, absent meaning 0.
fn lenient_ms<'de, D: serde::Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    Ok(lenient(de)?.unwrap_or(0))
}

/// Outcome status on the wire.
pub(crate) const COMPLETED: &str = "completed";
/// Outcome status on the wire.
pub(crate) const FAILED: &str = "failed";

/// A job's outcome as published on a reply channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Reply {
    /// Job ID.
    pub id: String,
    /// `completed` or `failed`.
    pub status: String,
    /// Encoding of `result`, when there is one.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient"
    )]
    pub enc: Option<String>,
    /// The handler's result, when `status` is `completed`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient"
    )]
    pub result: Option<ByteBuf>,
    /// Why the job failed, when `status` is `failed`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient"
    )]
    pub error: Option<WireError>,
}

/// A failure as recorded on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WireError {
    /// See [`crate::FailureKind`].
    pub kind: String,
    /// Human-readable message.
    pub message: String,
}

/// A dead-letter record for a list entry that no worker could run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeadRecord {
    /// Why the entry could not be run.
    pub reason: String,
    /// The entry exactly as it was popped.
    pub entry: ByteBuf,
    /// When the worker gave up on it, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// Encodes a protocol record (always MessagePack with named fields).
pub(crate) fn pack<T: Serialize>(record: &T, what: &'static str) -> Result<Vec<u8>, Error> {
    rmp_serde::to_vec_named(record).map_err(|e| Error::Encode {
        what,
        message: e.to_string(),
    })
}

/// Decodes a protocol record.
pub(crate) fn unpack<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<T, Error> {
    crate::encoding::msgpack_named(bytes, what)
}

/// Milliseconds since the Unix epoch on this machine's clock.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_golden_bytes() {
        let env = Envelope {
            id: "j1".into(),
            reply: Some("c".into()),
            enc: "json".into(),
            payload: ByteBuf::from(b"\"hi\"".to_vec()),
            submitted_ms: 7,
        };
        let bytes = pack(&env, "envelope").unwrap();
        let expected: &[u8] = b"\x85\xa2id\xa2j1\xa5reply\xa1c\xa3enc\xa4json\xa7payload\xc4\x04\"hi\"\xacsubmitted_ms\x07";
        assert_eq!(bytes, expected);
        assert_eq!(unpack::<Envelope>(&bytes, "envelope").unwrap(), env);
    }

    fn vector(name: &str) -> Vec<u8> {
        let file: serde_json::Value =
            serde_json::from_str(include_str!("../tests/conformance/vectors.json")).unwrap();
        let v = file["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no vector {name:?}"));
        hex::decode(v["msgpack"].as_str().unwrap()).unwrap()
    }

    /// Encodes `record` to exactly the golden bytes and decodes them back.
    fn golden<T: Serialize + for<'a> Deserialize<'a> + PartialEq + std::fmt::Debug>(
        name: &str,
        record: T,
    ) {
        let bytes = vector(name);
        assert_eq!(pack(&record, "record").unwrap(), bytes, "{name}");
        assert_eq!(unpack::<T>(&bytes, "record").unwrap(), record, "{name}");
    }

    #[test]
    fn records_match_the_golden_vectors() {
        golden(
            "simple-mode job envelope",
            Envelope {
                id: "j1".into(),
                reply: Some("jq:{emails}:reply:c7".into()),
                enc: "json".into(),
                payload: ByteBuf::from(b"\"hi\"".to_vec()),
                submitted_ms: 1_764_345_600_000,
            },
        );
        golden(
            "simple-mode envelope without reply",
            Envelope {
                id: "j2".into(),
                reply: None,
                enc: "msgpack".into(),
                payload: ByteBuf::from(b"\x92\x01\xa3two".to_vec()),
                submitted_ms: 0,
            },
        );
        golden(
            "simple-mode reply, completed",
            Reply {
                id: "j1".into(),
                status: COMPLETED.into(),
                enc: Some("json".into()),
                result: Some(ByteBuf::from(b"\"ih\"".to_vec())),
                error: None,
            },
        );
        golden(
            "simple-mode reply, failed",
            Reply {
                id: "j1".into(),
                status: FAILED.into(),
                enc: None,
                result: None,
                error: Some(WireError {
                    kind: "handler".into(),
                    message: "no thanks".into(),
                }),
            },
        );
        golden(
            "simple-mode dead-letter record",
            DeadRecord {
                reason: "cannot decode job envelope: not a map".into(),
                entry: ByteBuf::from(b"\xc1junk".to_vec()),
                at_ms: 1_764_345_600_000,
            },
        );
        // Doorbells are written by Lua: decode only.
        let bell: Reply = unpack(&vector("recoverable/reliable doorbell"), "doorbell").unwrap();
        assert_eq!((bell.id.as_str(), bell.status.as_str()), ("j1", COMPLETED));
    }

    fn packed(fields: Vec<(&str, rmpv::Value)>) -> Vec<u8> {
        let map = rmpv::Value::Map(fields.into_iter().map(|(k, v)| (k.into(), v)).collect());
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &map).unwrap();
        out
    }

    #[test]
    fn a_mistyped_optional_field_counts_as_absent_and_a_str_payload_is_read() {
        // submitted_ms as float64 (what some MessagePack libraries write),
        // reply as an integer, payload as str, keys in another order.
        let bytes = packed(vec![
            ("payload", "\"hi\"".into()),
            ("submitted_ms", rmpv::Value::F64(1.764e12)),
            ("enc", "json".into()),
            ("reply", 7.into()),
            ("id", "j1".into()),
            ("unknown", rmpv::Value::Nil),
        ]);
        let env: Envelope = unpack(&bytes, "envelope").unwrap();
        assert_eq!(
            (env.id.as_str(), env.reply, env.submitted_ms),
            ("j1", None, 0)
        );
        assert_eq!(env.payload.as_slice(), b"\"hi\"");
        // Any integer width is read.
        for ms in [rmpv::Value::from(7u8), rmpv::Value::from(1_764_345_600_000u64)] {
            let bytes = packed(vec![
                ("id", "j1".into()),
                ("enc", "json".into()),
                ("payload", rmpv::Value::Binary(b"1".to_vec())),
                ("submitted_ms", ms.clone()),
            ]);
            let env: Envelope = unpack(&bytes, "envelope").unwrap();
            assert_eq!(env.submitted_ms, ms.as_u64().unwrap());
        }
        // A required field of the wrong type still makes it invalid, and
        // the message names the field.
        let bytes = packed(vec![
            ("id", 5.into()),
            ("enc", "json".into()),
            ("payload", rmpv::Value::Binary(b"1".to_vec())),
        ]);
        match unpack::<Envelope>(&bytes, "envelope").unwrap_err() {
            Error::Decode { message, .. } => assert!(message.contains("id"), "{message}"),
            other => panic!("{other}"),
        }
        // Reply messages: mistyped optional fields are absent.
        let bytes = packed(vec![
            ("id", "j1".into()),
            ("status", "failed".into()),
            ("enc", 3.into()),
            ("error", "not a map".into()),
        ]);
        let reply: Reply = unpack(&bytes, "reply").unwrap();
        assert!(reply.enc.is_none() && reply.error.is_none());
    }

    #[test]
    fn optional_fields_may_be_missing() {
        // A minimal reply written by another implementation: id and status.
        let bytes = b"\x82\xa2id\xa2j1\xa6status\xa6failed";
        let reply: Reply = unpack(bytes, "reply").unwrap();
        assert_eq!(reply.status, FAILED);
        assert!(reply.error.is_none() && reply.result.is_none());
    }
}
