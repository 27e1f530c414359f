//! Titus's own public V3 API (`com.netflix.titus`), served on the api port beside ours so that
//! Spinnaker's Titus provider and Titus's clients work unchanged. A translation module per service
//! turns each call into the request our API takes and answers with what it answers: one set of
//! rules, one state. The field-by-field mapping is in `proto/TITUS-V3.md`.

mod convert;
mod jobs;
mod others;

pub use jobs::V3JobApi;
pub use others::{V3AutoScalingApi, V3EvictionApi, V3HealthApi, V3LoadBalancerApi};

/// Our request for a V3 call: `message`, with the V3 call's metadata (deadline, request id) and
/// extensions (the caller's identity, the audit record's target), so our handler authorizes and
/// audits it as its own.
fn inner<T, U>(request: &tonic::Request<T>, message: U) -> tonic::Request<U> {
    tonic::Request::from_parts(request.metadata().clone(), request.extensions().clone(), message)
}
