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
    /// The value encodes to bytes that decode to something else (a NaN or infinite number, which
    /// JSON writes as `null`). Appending it would poison every replica's log for good.
    #[error("the value would not read back as written (a NaN or infinite number?)")]
    NotRoundTrip,
}

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(128);
    out.push(CURRENT_VERSION);
    serde_json::to_writer(&mut out, value)?;
    Ok(out)
}

/// Encodes `value` and proves the bytes decode back to an equal value: what goes into the Raft log
/// must be readable by every replica forever, so a value that does not round-trip is refused here,
/// before it is proposed, rather than found when a replica fails to read its own log.
pub fn encode_verified<T: Serialize + DeserializeOwned + PartialEq>(value: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = encode(value)?;
    match decode::<T>(&bytes) {
        Ok(back) if back == *value => Ok(bytes),
        Ok(_) | Err(CodecError::Malformed(_)) => Err(CodecError::NotRoundTrip),
        Err(e) => Err(e),
    }
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

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Float {
        x: f64,
    }

    #[test]
    fn values_that_do_not_read_back_are_refused() {
        for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            // Plain JSON writes them as `null` without complaint...
            let bytes = encode(&Float { x }).unwrap();
            assert!(decode::<Float>(&bytes).is_err());
            // ...which the verified encoding refuses up front.
            assert!(matches!(encode_verified(&Float { x }), Err(CodecError::NotRoundTrip)), "{x}");
        }
        for x in [0.0, -0.0, 0.1, 1.0 / 3.0, f64::MIN_POSITIVE, f64::MAX, 5e-324] {
            let bytes = encode_verified(&Float { x }).unwrap();
            assert_eq!(decode::<Float>(&bytes).unwrap().x.to_bits(), x.to_bits(), "{x} reads back bit for bit");
        }
    }

    #[test]
    fn unknown_version_is_a_clear_error() {
        let err = decode::<V1>(&[9, b'{', b'}']).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
        assert!(matches!(decode::<V1>(&[]), Err(CodecError::Empty)));
    }
}
