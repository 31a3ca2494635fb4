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
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Envelope {
    /// Job ID, unique per queue (a UUID v4 in this implementation).
    pub id: String,
    /// Channel to publish the outcome on; absent when nobody waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// Encoding of `payload` (and of the result): `msgpack` or `json`.
    pub enc: String,
    /// The job's payload.
    pub payload: ByteBuf,
    /// Submission time, milliseconds since the Unix epoch (client clock).
    pub submitted_ms: u64,
    /// How long the handler may run, in ms; absent: the worker's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

// Reading records (protocol.md section 6.4): keys in any order; keys that
// are not str, and unknown keys, are skipped; a key given twice, or a
// required field missing or of the wrong type, makes the record invalid; an
// optional field of the wrong type counts as absent. Derived deserializers
// would read an integer key as a field's index, hence these by hand.

/// A record's map key: a str, or anything else (skipped with its value).
/// A bin key is not a str, even when its bytes spell a field's name.
enum Key {
    Str(String),
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map key")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key::Str(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Key, E> {
                Ok(Key::Str(v))
            }
            fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Key, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Key::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Key, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Key::Other)
            }
        }
        de.deserialize_any(V)
    }
}

/// A str field's value: MessagePack str only (a bin is of the wrong type).
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a str")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(v))
            }
        }
        de.deserialize_str(V)
    }
}

/// An optional field's value: another type counts as absent.
struct Lenient<T>(Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either<T> {
            Valid(T),
            Other(serde::de::IgnoredAny),
        }
        Ok(Lenient(match Either::<T>::deserialize(de)? {
            Either::Valid(v) => Some(v),
            Either::Other(_) => None,
        }))
    }
}

/// Reads a record's map: `field` is called with each str key and reads its
/// value (returning false for a key it does not know, whose value is then
/// skipped). A key of the record's table given twice is an error; unknown
/// keys may repeat. Linear in the number of keys.
fn read_record<'de, A: serde::de::MapAccess<'de>>(
    mut map: A,
    mut field: impl FnMut(&str, &mut A) -> Result<bool, A::Error>,
) -> Result<(), A::Error> {
    // The record's own keys seen so far (a handful at most).
    let mut seen: Vec<String> = Vec::new();
    while let Some(key) = map.next_key::<Key>()? {
        match key {
            Key::Str(name) => {
                if seen.contains(&name) {
                    return Err(serde::de::Error::custom(format_args!(
                        "key {name:?} given twice"
                    )));
                }
                if field(&name, &mut map)? {
                    seen.push(name);
                } else {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Key::Other => {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
    }
    Ok(())
}

/// Implements `Deserialize` for a record from a map, with `$body` turning
/// the map into the record.
macro_rules! record {
    ($ty:ty, $what:literal, |$map:ident| $body:block) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        $map: A,
                    ) -> Result<$ty, A::Error> {
                        $body
                    }
                }
                de.deserialize_map(V)
            }
        }
    };
}

fn required<T, E: serde::de::Error>(value: Option<T>, name: &'static str) -> Result<T, E> {
    value.ok_or_else(|| E::missing_field(name))
}

record!(Envelope, "a job envelope (a map)", |map| {
    let (mut id, mut reply, mut enc, mut payload, mut submitted_ms) =
        (None, None, None, None, None);
    let mut timeout_ms = None;
    read_record(map, |name, map| {
        match name {
            "id" => id = Some(map.next_value::<Text>()?.0),
            "reply" => reply = map.next_value::<Lenient<Text>>()?.0.map(|t| t.0),
            "enc" => enc = Some(map.next_value::<Text>()?.0),
            "payload" => payload = Some(map.next_value::<ByteBuf>()?),
            "submitted_ms" => submitted_ms = map.next_value::<Lenient<u64>>()?.0,
            "timeout_ms" => timeout_ms = map.next_value::<Lenient<u64>>()?.0,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(Envelope {
        id: required(id, "id")?,
        reply,
        enc: required(enc, "enc")?,
        payload: required(payload, "payload")?,
        submitted_ms: submitted_ms.unwrap_or(0),
        // 1 ms to 10^12 ms; anything else counts as absent.
        timeout_ms: timeout_ms.filter(|ms| (1..=1_000_000_000_000).contains(ms)),
    })
});

record!(Reply, "a reply message (a map)", |map| {
    let (mut id, mut status, mut enc, mut result, mut error) = (None, None, None, None, None);
    read_record(map, |name, map| {
        match name {
            "id" => id = Some(map.next_value::<Text>()?.0),
            "status" => status = Some(map.next_value::<Text>()?.0),
            "enc" => enc = map.next_value::<Lenient<Text>>()?.0.map(|t| t.0),
            "result" => result = map.next_value::<Lenient<ByteBuf>>()?.0,
            "error" => error = map.next_value::<Lenient<WireError>>()?.0,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(Reply {
        id: required(id, "id")?,
        status: required(status, "status")?,
        enc,
        result,
        error,
    })
});

record!(WireError, "an error record (a map)", |map| {
    let (mut kind, mut message) = (None, None);
    read_record(map, |name, map| {
        match name {
            "kind" => kind = Some(map.next_value::<Text>()?.0),
            "message" => message = Some(map.next_value::<Text>()?.0),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(WireError {
        kind: required(kind, "kind")?,
        message: required(message, "message")?,
    })
});

record!(DeadRecord, "a dead-letter record (a map)", |map| {
    let (mut reason, mut entry, mut at_ms) = (None, None, None);
    read_record(map, |name, map| {
        match name {
            "reason" => reason = Some(map.next_value::<Text>()?.0),
            "entry" => entry = Some(map.next_value::<ByteBuf>()?),
            "at_ms" => at_ms = Some(map.next_value::<u64>()?),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(DeadRecord {
        reason: required(reason, "reason")?,
        entry: required(entry, "entry")?,
        at_ms: required(at_ms, "at_ms")?,
    })
});

/// Outcome status on the wire.
pub(crate) const COMPLETED: &str = "completed";
/// Outcome status on the wire.
pub(crate) const FAILED: &str = "failed";

/// A job's outcome as published on a reply channel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Reply {
    /// Job ID.
    pub id: String,
    /// `completed` or `failed`.
    pub status: String,
    /// Encoding of `result`, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enc: Option<String>,
    /// The handler's result, when `status` is `completed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<ByteBuf>,
    /// Why the job failed, when `status` is `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

/// A failure as recorded on the wire.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct WireError {
    /// See [`crate::FailureKind`].
    pub kind: String,
    /// Human-readable message.
    pub message: String,
}

/// A dead-letter record for a list entry that no worker could run.
#[derive(Debug, Clone, PartialEq, Serialize)]
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

/// Decodes a protocol record: exactly one MessagePack value (bytes after
/// it make the record invalid).
pub(crate) fn unpack<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, Error> {
    crate::encoding::msgpack_named(bytes, what)
}

/// A number field of a job or schedule hash, read leniently: a decimal
/// integer of at most 15 digits, as the scripts write it; anything else
/// (empty, signed, fractional, `inf`, text another program wrote) counts as
/// absent.
pub(crate) fn lenient_u64(value: Option<&str>) -> Option<u64> {
    value
        .filter(|v| !v.is_empty() && v.len() <= 15 && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse().ok())
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
    fn lenient_numbers_take_only_plain_decimals() {
        assert_eq!(lenient_u64(Some("0")), Some(0));
        assert_eq!(
            lenient_u64(Some("999999999999999")),
            Some(999_999_999_999_999)
        );
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1.5",
            "1e3",
            "inf",
            "nan",
            "0x10",
            "1000000000000000",
        ] {
            assert_eq!(lenient_u64(Some(bad)), None, "{bad:?}");
        }
        assert_eq!(lenient_u64(None), None);
    }

    #[test]
    fn envelope_golden_bytes() {
        let env = Envelope {
            id: "j1".into(),
            reply: Some("c".into()),
            enc: "json".into(),
            payload: ByteBuf::from(b"\"hi\"".to_vec()),
            submitted_ms: 7,
            timeout_ms: None,
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
                timeout_ms: None,
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
                timeout_ms: None,
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
        for ms in [
            rmpv::Value::from(7u8),
            rmpv::Value::from(1_764_345_600_000u64),
        ] {
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
    fn keys_must_be_str_table_keys_must_not_repeat_and_many_keys_read_in_linear_time() {
        // A bin key that spells "id" is not the id; an id given as bin is of
        // the wrong type.
        let bin_key = packed(vec![("enc", "json".into())]);
        let mut with_bin_key = bin_key[..1].to_vec();
        with_bin_key[0] += 3; // three entries in the fixmap
        with_bin_key.extend_from_slice(&bin_key[1..]);
        with_bin_key.extend_from_slice(b"\xc4\x02id\xa2j1\xa7payload\xc4\x011");
        assert!(
            unpack::<Envelope>(&with_bin_key, "envelope").is_err(),
            "no str id"
        );
        let bin_id = packed(vec![
            ("id", rmpv::Value::Binary(b"j1".to_vec())),
            ("enc", "json".into()),
            ("payload", rmpv::Value::Binary(b"1".to_vec())),
        ]);
        assert!(unpack::<Envelope>(&bin_id, "envelope").is_err(), "a bin id");
        // Unknown keys may repeat; a table key may not.
        let mut fields: Vec<(&str, rmpv::Value)> = vec![
            ("id", "j1".into()),
            ("enc", "json".into()),
            ("payload", rmpv::Value::Binary(b"1".to_vec())),
        ];
        fields.extend((0..50_000).map(|_| ("x", rmpv::Value::Nil)));
        let started = std::time::Instant::now();
        assert!(unpack::<Envelope>(&packed(fields), "envelope").is_ok());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let twice = packed(vec![
            ("id", "j1".into()),
            ("enc", "json".into()),
            ("enc", "json".into()),
            ("payload", rmpv::Value::Binary(b"1".to_vec())),
        ]);
        assert!(unpack::<Envelope>(&twice, "envelope").is_err());
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
