//! A Raft log entry as a replica reads it from RocksDB or receives it from the leader: decoding
//! must never panic, whatever the bytes, and an entry that decodes encodes back to bytes that
//! decode to the same entry.

#![no_main]

use libfuzzer_sys::fuzz_target;
use titus_model::codec;
use titus_model::command::Command;
use titus_model::raft_types::Entry;

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
    }
});
