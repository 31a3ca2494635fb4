//! Payload and result encodings.

use serde::{Serialize, de::DeserializeOwned};

use crate::error::Error;

/// How a job's payload and result are serialised. The choice travels with
/// each job (`enc` on the wire), so a worker decodes whatever a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Encoding {
    /// `msgpack`: MessagePack, structs as maps with field names (the default).
    #[default]
    MessagePack,
    /// `json`: UTF-8 JSON text.
    Json,
}

impl Encoding {
    /// The wire name: `msgpack` or `json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::MessagePack => "msgpack",
            Encoding::Json => "json",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "msgpack" => Some(Encoding::MessagePack),
            "json" => Some(Encoding::Json),
            _ => None,
        }
    }

    /// Serialises `value`; `what` names it in the error.
    pub fn encode<T: Serialize + ?Sized>(
        self,
        value: &T,
        what: &'static str,
    ) -> Result<Vec<u8>, Error> {
        let out = match self {
            Encoding::MessagePack => rmp_serde::to_vec_named(value).map_err(|e| e.to_string()),
            Encoding::Json => serde_json::to_vec(value).map_err(|e| e.to_string()),
        };
        out.map_err(|message| Error::Encode { what, message })
    }

    /// Deserialises `bytes`; `what` names them in the error, and the error
    /// message names the field that did not decode (`at items[2].name: ...`).
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8], what: &'static str) -> Result<T, Error> {
        match self {
            Encoding::MessagePack => msgpack_named(bytes, what),
            Encoding::Json => {
                let mut de = serde_json::Deserializer::from_slice(bytes);
                let value =
                    serde_path_to_error::deserialize(&mut de).map_err(|e| decode_error(what, e))?;
                de.end().map_err(|e| Error::Decode {
                    what,
                    message: e.to_string(),
                })?;
                Ok(value)
            }
        }
    }
}

/// How deeply MessagePack data may nest (arrays and maps), as serde_json's
/// limit for JSON.
pub(crate) const MAX_DEPTH: usize = 128;

/// Decodes the MessagePack value at the start of `bytes` (whatever follows
/// it is not looked at), naming the field that did not decode in the error.
pub(crate) fn msgpack_prefix<T: DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    // As serde_json: deeper data is refused rather than risk the stack of
    // the task that decodes it (rmp-serde's own limit, 1,024, overflows a
    // tokio worker's stack in debug builds).
    de.set_max_depth(MAX_DEPTH);
    serde_path_to_error::deserialize(&mut de).map_err(|e| decode_error(what, e))
}

/// Decodes exactly one MessagePack value (bytes after it are an error),
/// naming the field that did not decode in the error.
pub(crate) fn msgpack_named<T: DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, Error> {
    let value = msgpack_prefix(bytes, what)?;
    match value_len(bytes) {
        Some(len) if len == bytes.len() => Ok(value),
        Some(len) => Err(Error::Decode {
            what,
            message: format!("{} bytes after the value", bytes.len() - len),
        }),
        None => Err(Error::Decode {
            what,
            message: "not one MessagePack value".into(),
        }),
    }
}

/// The length in bytes of the first MessagePack value of `bytes`, found
/// without recursion (so that no nesting can exhaust the stack); `None`
/// when the value is cut short or uses the reserved byte `0xc1`.
fn value_len(bytes: &[u8]) -> Option<usize> {
    let be = |at: usize, n: usize| -> Option<u64> {
        let raw = bytes.get(at..at.checked_add(n)?)?;
        Some(raw.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    };
    let mut pos = 0usize;
    // Values still to be read: one, then the elements of every container.
    let mut pending: u64 = 1;
    while pending > 0 {
        pending -= 1;
        let marker = *bytes.get(pos)?;
        pos += 1;
        // (bytes to skip after the marker, values inside)
        let (skip, inner): (u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
            0xc4 | 0xd9 => (1 + be(pos, 1)?, 0),
            0xc5 | 0xda => (2 + be(pos, 2)?, 0),
            0xc6 | 0xdb => (4 + be(pos, 4)?, 0),
            0xc7 => (2 + be(pos, 1)?, 0),
            0xc8 => (3 + be(pos, 2)?, 0),
            0xc9 => (5 + be(pos, 4)?, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xca | 0xce | 0xd2 => (4, 0),
            0xcb | 0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (2, be(pos, 2)?),
            0xdd => (4, be(pos, 4)?),
            0xde => (2, 2 * be(pos, 2)?),
            0xdf => (4, 2 * be(pos, 4)?),
            0xc1 => return None,
        };
        pos = pos.checked_add(usize::try_from(skip).ok()?)?;
        if pos > bytes.len() {
            return None;
        }
        pending = pending.checked_add(inner)?;
    }
    Some(pos)
}

fn decode_error<E: std::fmt::Display>(
    what: &'static str,
    e: serde_path_to_error::Error<E>,
) -> Error {
    let path = e.path().to_string();
    let message = if path == "." {
        e.inner().to_string()
    } else {
        format!("at {path}: {}", e.inner())
    };
    Error::Decode { what, message }
}

impl Encoding {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        name: String,
        tags: Vec<String>,
        counts: BTreeMap<String, i64>,
    }

    #[test]
    fn both_encodings_round_trip_and_msgpack_uses_field_names() {
        let s = Sample {
            name: "ünï".into(),
            tags: vec!["a".into()],
            counts: [("x".to_string(), i64::MAX)].into(),
        };
        for enc in [Encoding::MessagePack, Encoding::Json] {
            let bytes = enc.encode(&s, "payload").unwrap();
            assert_eq!(enc.decode::<Sample>(&bytes, "payload").unwrap(), s);
            assert_eq!(Encoding::parse(enc.as_str()), Some(enc));
        }
        let packed = Encoding::MessagePack.encode(&s, "payload").unwrap();
        // A fixmap of 3 entries whose first key is the string "name".
        assert_eq!(&packed[..6], b"\x83\xa4name");
    }

    #[test]
    fn garbage_is_a_typed_decode_error() {
        let err = Encoding::MessagePack
            .decode::<Sample>(b"\xc1\xff", "payload")
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Decode {
                what: "payload",
                ..
            }
        ));
        assert_eq!(Encoding::parse("yaml"), None);
        // Exactly one value: bytes after it, or a value cut short, are errors.
        assert!(
            Encoding::MessagePack
                .decode::<u8>(b"\x07", "payload")
                .is_ok()
        );
        assert!(
            Encoding::MessagePack
                .decode::<u8>(b"\x07\x00", "payload")
                .is_err()
        );
        assert_eq!(value_len(b"\x92\x01\x81\xa1a\xc4\x02xy"), Some(9));
        assert_eq!(value_len(b"\x92\x01"), None);
        assert_eq!(value_len(&[0x91; 100_000]), None);
        // The message names the field that did not decode.
        let wrong = serde_json::json!({"name": "x", "tags": ["a", 7], "counts": {}});
        for enc in [Encoding::MessagePack, Encoding::Json] {
            let bytes = enc.encode(&wrong, "payload").unwrap();
            match enc.decode::<Sample>(&bytes, "payload").unwrap_err() {
                Error::Decode { message, .. } => {
                    assert!(message.starts_with("at tags[1]: "), "{message}")
                }
                other => panic!("{other}"),
            }
        }
    }
}
