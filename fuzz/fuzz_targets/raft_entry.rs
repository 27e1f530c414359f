//! The peer port's payloads: a Raft log entry as a replica reads it from RocksDB or receives it
//! from the leader, an AppendEntries or Vote request, a forwarded command. Decoding must never
//! panic, whatever the bytes; what decodes encodes back to bytes that decode to the same value, and
//! a command that decodes is loggable (the round trip the leader checks before proposing).

#![no_main]

use libfuzzer_sys::fuzz_target;
use titus_model::codec;
use titus_model::command::Command;
use titus_model::raft_types::{Entry, TypeConfig};

type AppendEntries = openraft::raft::AppendEntriesRequest<TypeConfig>;
type Vote = openraft::raft::VoteRequest<u64>;

/// Encodes `value` in `version`, decodes it, encodes it again: the same bytes.
fn round_trips<T>(version: u8, value: &T, what: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let bytes = codec::encode_as(version, value).unwrap_or_else(|e| panic!("a decoded {what} encodes: {e}"));
    let again: T = codec::decode(&bytes).unwrap_or_else(|e| panic!("an encoded {what} decodes: {e}"));
    let twice = codec::encode_as(version, &again).expect("encodes");
    assert_eq!(twice, bytes, "the round trip in version {version} changed the {what}");
}

fuzz_target!(|data: &[u8]| {
    // Whatever version the bytes are in, what decodes round-trips in both: a replica reads either.
    for version in [codec::JSON, codec::MSGPACK] {
        if let Ok(entry) = codec::decode::<Entry>(data) {
            round_trips(version, &entry, "entry");
        }
        if let Ok(request) = codec::decode::<AppendEntries>(data) {
            round_trips(version, &request, "request");
        }
        if let Ok(request) = codec::decode::<Vote>(data) {
            round_trips(version, &request, "vote");
        }
    }
    // Forwarded proposals carry a bare command. One that decodes is loggable — or, when the
    // binary encoding carried a NaN (JSON cannot), refused as not reading back: never appended.
    if let Ok(command) = codec::decode::<Command>(data) {
        let reads_back = |version| {
            let bytes = codec::encode_as(version, &command).expect("a decoded command encodes");
            codec::decode::<Command>(&bytes).is_ok_and(|again| again == command)
        };
        match codec::encode_verified(&command) {
            Ok(_) => assert!(reads_back(codec::write_version())),
            Err(codec::CodecError::NotRoundTrip) => {
                assert!(!reads_back(codec::write_version()), "refused only what would not read back")
            }
            Err(e) => panic!("a decoded command is loggable or refused as not reading back: {e}"),
        }
    }
});
