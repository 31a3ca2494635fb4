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

    /// Deserialises `bytes`; `what` names them in the error.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8], what: &'static str) -> Result<T, Error> {
        let out = match self {
            Encoding::MessagePack => rmp_serde::from_slice(bytes).map_err(|e| e.to_string()),
            Encoding::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        };
        out.map_err(|message| Error::Decode { what, message })
    }
}

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
    }
}
