//! Versioned encoding of everything that is written to disk or sent between replicas.
//!
//! Every encoded value starts with one version byte:
//!
//! - **1**: JSON (serde). What the first releases wrote; always read.
//! - **2**: MessagePack with field names (rmp-serde, structs as maps): the same field-by-name
//!   evolution as JSON — the next release adds fields with `#[serde(default)]` and still reads
//!   what this one wrote — at ~0.8x JSON's size, 2–2.6x quicker to encode and 1.2–1.4x to decode
//!   (`cargo run --release -p titus-model --example codec_bench`), and a NaN survives as itself
//!   instead of becoming `null`.
//!
//! Which version a replica *writes* is the cluster's decision, not the binary's: a replica of this
//! release reads both, but writes version 1 until every member reads version 2 and the leader has
//! committed the switch (`Command::SetCodecVersion`), so that during a rolling upgrade a replica
//! of the previous release never receives — in an AppendEntries, a snapshot or a forwarded write —
//! a value it cannot read. [`set_write_version`] is that switch, process-wide; a replica sets it
//! from its state when it opens its store and when it applies the command. A replica that meets a
//! version it does not know fails with a clear error instead of misreading the bytes.

use std::sync::atomic::{AtomicU8, Ordering};

use serde::{de::DeserializeOwned, Serialize};

/// The newest version this release reads and writes.
pub const CURRENT_VERSION: u8 = 2;

/// JSON: what a cluster writes until every member reads [`CURRENT_VERSION`].
pub const JSON: u8 = 1;

/// MessagePack with field names.
pub const MSGPACK: u8 = 2;

/// How deeply a binary value may nest (serde_json's limit for JSON).
const MAX_DEPTH: usize = 128;

static WRITE_VERSION: AtomicU8 = AtomicU8::new(JSON);

/// The version [`encode`] writes in this process.
pub fn write_version() -> u8 {
    WRITE_VERSION.load(Ordering::Acquire)
}

/// Makes [`encode`] write `version` from now on (see the module's doc: the cluster decides).
/// A version this release does not know is refused.
pub fn set_write_version(version: u8) -> Result<(), CodecError> {
    if !(JSON..=CURRENT_VERSION).contains(&version) {
        return Err(CodecError::UnknownVersion { found: version });
    }
    WRITE_VERSION.store(version, Ordering::Release);
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty value: expected a version byte")]
    Empty,
    #[error("encoding version {found} is newer than this release understands (up to {CURRENT_VERSION}); upgrade this replica")]
    UnknownVersion { found: u8 },
    #[error("malformed value: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("malformed value: {0}")]
    MalformedBinary(#[from] rmp_serde::decode::Error),
    #[error("cannot encode: {0}")]
    Unencodable(#[from] rmp_serde::encode::Error),
    /// The value encodes to bytes that decode to something else (a NaN, which JSON writes as
    /// `null` and which is not equal to itself). Appending it would poison every replica's log.
    #[error("the value would not read back as written (a NaN or infinite number?)")]
    NotRoundTrip,
}

/// Encodes `value` in this process's [`write_version`].
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    encode_as(write_version(), value)
}

/// Encodes `value` in `version` (1 or 2).
pub fn encode_as<T: Serialize + ?Sized>(version: u8, value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(128);
    out.push(version);
    match version {
        JSON => serde_json::to_writer(&mut out, value)?,
        MSGPACK => value.serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())?,
        found => return Err(CodecError::UnknownVersion { found }),
    }
    Ok(out)
}

/// Encodes `value` and proves the bytes decode back to an equal value: what goes into the Raft log
/// must be readable by every replica forever, so a value that does not round-trip is refused here,
/// before it is proposed, rather than found when a replica fails to read its own log.
pub fn encode_verified<T: Serialize + DeserializeOwned + PartialEq>(value: &T) -> Result<Vec<u8>, CodecError> {
    verified_as(write_version(), value)
}

fn verified_as<T: Serialize + DeserializeOwned + PartialEq>(version: u8, value: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = encode_as(version, value)?;
    match decode::<T>(&bytes) {
        Ok(back) if back == *value => Ok(bytes),
        Ok(_) | Err(CodecError::Malformed(_) | CodecError::MalformedBinary(_)) => Err(CodecError::NotRoundTrip),
        Err(e) => Err(e),
    }
}

/// Decodes a value of any version this release reads.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        None => Err(CodecError::Empty),
        Some((&JSON, rest)) => Ok(serde_json::from_slice(rest)?),
        Some((&MSGPACK, rest)) => {
            // As deep as serde_json lets JSON nest: a hostile value cannot exhaust the stack.
            let mut de = rmp_serde::Deserializer::from_read_ref(rest);
            de.set_max_depth(MAX_DEPTH);
            Ok(<T as serde::Deserialize>::deserialize(&mut de)?)
        }
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

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
    enum Shape {
        Unit,
        Tuple(u8, String),
        Named { x: i64, tags: std::collections::BTreeMap<String, String> },
    }

    #[test]
    fn next_release_reads_what_this_one_wrote_in_either_version() {
        for version in [JSON, MSGPACK] {
            let bytes = encode_as(version, &V1 { a: 7 }).unwrap();
            assert_eq!(bytes[0], version);
            let v2: V2 = decode(&bytes).unwrap();
            assert_eq!(v2, V2 { a: 7, b: None }, "version {version}");
            // And this release reads the next one's extra fields by ignoring them.
            let bytes = encode_as(version, &V2 { a: 8, b: Some("new".into()) }).unwrap();
            assert_eq!(decode::<V1>(&bytes).unwrap(), V1 { a: 8 }, "version {version}");
        }
    }

    #[test]
    fn both_versions_carry_every_shape_and_binary_is_smaller() {
        let tags = (0..5).map(|i| (format!("key{i}"), format!("value {i}"))).collect();
        let values = vec![Shape::Unit, Shape::Tuple(3, "t".into()), Shape::Named { x: i64::MIN, tags }];
        let json = encode_as(JSON, &values).unwrap();
        let binary = encode_as(MSGPACK, &values).unwrap();
        assert_eq!(decode::<Vec<Shape>>(&json).unwrap(), values);
        assert_eq!(decode::<Vec<Shape>>(&binary).unwrap(), values);
        assert!(binary.len() < json.len(), "{} vs {} bytes", binary.len(), json.len());
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Float {
        x: f64,
    }

    #[test]
    fn values_that_do_not_read_back_are_refused() {
        for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            // Plain JSON writes them as `null` without complaint...
            let bytes = encode_as(JSON, &Float { x }).unwrap();
            assert!(decode::<Float>(&bytes).is_err());
            // ...which the verified encoding refuses up front.
            assert!(matches!(verified_as(JSON, &Float { x }), Err(CodecError::NotRoundTrip)), "{x}");
        }
        // MessagePack carries every f64 as its bits: a NaN reads back as a NaN, which is not
        // equal to itself and so is still refused; an infinity reads back as itself.
        assert!(matches!(verified_as(MSGPACK, &Float { x: f64::NAN }), Err(CodecError::NotRoundTrip)));
        for version in [JSON, MSGPACK] {
            for x in [0.0, -0.0, 0.1, 1.0 / 3.0, f64::MIN_POSITIVE, f64::MAX, 5e-324] {
                let bytes = verified_as(version, &Float { x }).unwrap();
                assert_eq!(decode::<Float>(&bytes).unwrap().x.to_bits(), x.to_bits(), "{x} reads back bit for bit");
            }
        }
    }

    #[test]
    fn unknown_version_is_a_clear_error() {
        let err = decode::<V1>(&[9, b'{', b'}']).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
        assert!(matches!(decode::<V1>(&[]), Err(CodecError::Empty)));
        assert!(matches!(encode_as(3, &V1 { a: 1 }), Err(CodecError::UnknownVersion { found: 3 })));
        assert!(matches!(set_write_version(0), Err(CodecError::UnknownVersion { found: 0 })));
        assert!(matches!(set_write_version(CURRENT_VERSION + 1), Err(CodecError::UnknownVersion { .. })));
    }

    #[test]
    fn malformed_binary_is_an_error_not_a_panic() {
        let good = encode_as(MSGPACK, &V2 { a: 1, b: Some("x".repeat(40)) }).unwrap();
        for cut in 1..good.len() {
            assert!(decode::<V2>(&good[..cut]).is_err(), "cut at {cut}");
        }
        // Nesting beyond MAX_DEPTH is refused, not followed down the stack, whatever the type
        // reads (rmp-serde alone would follow 1,024 levels; a million is refused either way).
        for depth in [MAX_DEPTH + 1, 1000, 1_000_000] {
            let mut deep = vec![MSGPACK];
            deep.extend(std::iter::repeat_n(0x91, depth));
            deep.push(0xc0);
            assert!(decode::<serde::de::IgnoredAny>(&deep).is_err(), "{depth} deep");
        }
        let mut shallow = vec![MSGPACK];
        shallow.extend(std::iter::repeat_n(0x91, MAX_DEPTH - 1));
        shallow.push(0xc0);
        assert!(decode::<serde::de::IgnoredAny>(&shallow).is_ok());
        // A length prefix claiming 4 GiB allocates nothing of the sort.
        assert!(decode::<Vec<u8>>(&[MSGPACK, 0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
