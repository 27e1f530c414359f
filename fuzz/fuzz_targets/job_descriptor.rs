//! A CreateJob request as it arrives off the wire: protobuf decoding, conversion to the model and
//! validation must never panic, whatever the bytes; a descriptor that passes validation must
//! survive the trip back to the wire and in again unchanged (what FindJob answers is what was
//! accepted), and the job it makes must be loggable (encoded, it decodes to the same command).

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use titus_model::codec;
use titus_model::command::Command;
use titus_model::convert::{job_descriptor_from_proto, job_descriptor_to_proto};
use titus_model::job::{Job, JobState, JobStatus};

fuzz_target!(|data: &[u8]| {
    let Ok(request) = titus_proto::CreateJobRequest::decode(data) else { return };
    let Ok(descriptor) = job_descriptor_from_proto(request.job_descriptor) else { return };
    let again = job_descriptor_from_proto(Some(job_descriptor_to_proto(&descriptor)))
        .expect("a descriptor that validated validates again after the round trip");
    assert_eq!(again, descriptor, "the round trip changed the descriptor");
    let status = JobStatus { state: JobState::Accepted, reason_code: String::new(), reason_message: String::new(), timestamp_ms: 1 };
    let job = Job { id: "j-1".into(), descriptor, status, status_history: Vec::new(), rollout: Default::default(), evictions_ms: Vec::new() };
    let command = Command::CreateJob { job, idempotency_token: request_token(&request.idempotency_token), token_expires_ms: 1 };
    codec::encode_verified(&command).expect("a job that validated is loggable");
});

fn request_token(token: &str) -> Option<String> {
    (!token.is_empty()).then(|| token.to_string())
}
