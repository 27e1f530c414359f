//! Versioned encoding of everything that is written to disk or sent between replicas.
//!
//! Every encoded value starts with one version byte. Version 1 is JSON (serde), whose field-by-name
//! encoding lets the next release add fields (with `#[serde(default)]`) and still read what this one
//! wrote — the property rolling upgrades need. A replica that meets a version it does not know fails
//! with a clear error instead of misreading the bytes.

use serde::{de::DeserializeOwned, Serialize};

/// The version this release writes.
pub const CURRENT_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty value: expected a version byte")]
    Empty,
    #[error("encoding version {found} is newer than this release understands (up to {CURRENT_VERSION}); upgrade this replica")]
    UnknownVersion { found: u8 },
    #[error("malformed value: {0}")]
    Malformed(#[from] serde_json::Error),
}

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(128);
    out.push(CURRENT_VERSION);
    serde_json::to_writer(&mut out, value)?;
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        None => Err(CodecError::Empty),
        Some((&1, rest)) => Ok(serde_json::from_slice(rest)?),
        Some((&found, _)) => Err(CodecError::UnknownVersion { found }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct V1 {
        a: u32,
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct V2 {
        a: u32,
        #[serde(default)]
        b: Option<String>,
    }

    #[test]
    fn next_release_reads_what_this_one_wrote() {
        let bytes = encode(&V1 { a: 7 }).unwrap();
        assert_eq!(bytes[0], CURRENT_VERSION);
        let v2: V2 = decode(&bytes).unwrap();
        assert_eq!(v2, V2 { a: 7, b: None });
    }

    #[test]
    fn unknown_version_is_a_clear_error() {
        let err = decode::<V1>(&[9, b'{', b'}']).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
        assert!(matches!(decode::<V1>(&[]), Err(CodecError::Empty)));
    }
}
