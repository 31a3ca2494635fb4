//! Payload and result encodings.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

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

/// Decodes MessagePack, naming the field that did not decode in the error.
pub(crate) fn msgpack_named<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<T, Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    // As serde_json: deeper data is refused rather than risk the stack of
    // the task that decodes it (rmp-serde's own limit, 1,024, overflows a
    // tokio worker's stack in debug builds).
    de.set_max_depth(MAX_DEPTH);
    serde_path_to_error::deserialize(&mut de).map_err(|e| decode_error(what, e))
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
