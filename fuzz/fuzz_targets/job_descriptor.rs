//! A CreateJob request as it arrives off the wire: protobuf decoding, conversion to the model and
//! validation must never panic, whatever the bytes; a descriptor that passes validation must
//! survive the trip back to the wire and in again unchanged (what FindJob answers is what was
//! accepted).

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use titus_model::convert::{job_descriptor_from_proto, job_descriptor_to_proto};

fuzz_target!(|data: &[u8]| {
    let Ok(request) = titus_proto::CreateJobRequest::decode(data) else { return };
    let Ok(descriptor) = job_descriptor_from_proto(request.job_descriptor) else { return };
    let again = job_descriptor_from_proto(Some(job_descriptor_to_proto(&descriptor)))
        .expect("a descriptor that validated validates again after the round trip");
    assert_eq!(again, descriptor, "the round trip changed the descriptor");
});
