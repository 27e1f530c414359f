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

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = codec::decode::<Entry>(data) {
        let bytes = codec::encode(&entry).expect("a decoded entry encodes");
        let again: Entry = codec::decode(&bytes).expect("an encoded entry decodes");
        assert_eq!(codec::encode(&again).expect("encodes"), bytes, "the round trip changed the entry");
    }
    // Forwarded proposals carry a bare command.
    if let Ok(command) = codec::decode::<Command>(data) {
        let bytes = codec::encode(&command).expect("a decoded command encodes");
        let again: Command = codec::decode(&bytes).expect("an encoded command decodes");
        assert_eq!(again, command, "the round trip changed the command");
        codec::encode_verified(&command).expect("a command that decoded is loggable");
    }
    if let Ok(request) = codec::decode::<AppendEntries>(data) {
        let bytes = codec::encode(&request).expect("a decoded request encodes");
        let again: AppendEntries = codec::decode(&bytes).expect("an encoded request decodes");
        assert_eq!(codec::encode(&again).expect("encodes"), bytes, "the round trip changed the request");
    }
    if let Ok(request) = codec::decode::<Vote>(data) {
        let bytes = codec::encode(&request).expect("a decoded vote encodes");
        let again: Vote = codec::decode(&bytes).expect("an encoded vote decodes");
        assert_eq!(codec::encode(&again).expect("encodes"), bytes, "the round trip changed the vote");
    }
});
