//! The public gRPC services on the api port. Each handler validates its input (naming the field),
//! then proposes a [`crate::command::Command`] or reads applied state through [`crate::replica::Replica`].

mod agents;
mod capacity_groups;
mod cluster;
mod convert;
mod jobs;
mod load_balancers;
mod scheduler;

use std::time::Duration;

pub use agents::AgentManagementApi;
pub use capacity_groups::CapacityGroupApi;
pub use cluster::ClusterApi;
pub use convert::{job_descriptor_to_proto, task_state_from_proto};
pub use jobs::{now_ms, AgentTaskApi, JobApi};
pub use load_balancers::LoadBalancerApi;
pub use scheduler::SchedulerApi;

/// The deadline the caller put on its request (`grpc-timeout`), if any.
pub(crate) fn client_deadline<T>(request: &tonic::Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_is_understood() {
        let mut r = tonic::Request::new(());
        assert_eq!(client_deadline(&r), None);
        r.metadata_mut().insert("grpc-timeout", "1500m".parse().unwrap());
        assert_eq!(client_deadline(&r), Some(Duration::from_millis(1500)));
        r.metadata_mut().insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(client_deadline(&r), Some(Duration::from_secs(2)));
        r.metadata_mut().insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(client_deadline(&r), None);
    }
}
