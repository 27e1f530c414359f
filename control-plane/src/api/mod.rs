//! The public gRPC services on the api port. Each handler validates its input (naming the field),
//! then proposes a [`crate::command::Command`] or reads applied state through [`crate::replica::Replica`].

mod agents;
mod capacity_groups;
mod cluster;
mod jobs;
mod load_balancers;
mod scheduler;
mod task_io;
pub mod v3;

pub use agents::AgentManagementApi;
pub use capacity_groups::CapacityGroupApi;
pub use cluster::ClusterApi;
pub use jobs::{now_ms, AgentTaskApi, JobApi};
pub use load_balancers::LoadBalancerApi;
pub use scheduler::SchedulerApi;
pub use task_io::TaskIoApi;
pub use titus_model::convert::{job_descriptor_to_proto, task_state_from_proto};

pub(crate) use crate::clock::client_deadline;

/// Refuses a user's change to a job it does not hold (admins, operators and insecure callers
/// pass), and names the job in the call's audit record. The owner of a job never changes, so a
/// check before proposing holds when the command applies.
pub(crate) async fn authorize_job_change<T>(
    replica: &crate::replica::Replica,
    request: &tonic::Request<T>,
    job_id: &str,
) -> Result<(), tonic::Status> {
    use crate::state::StateRead;
    crate::auth::note_target(request, format!("job {job_id}"));
    let caller = crate::auth::caller(request);
    if caller.role != Some(crate::auth::Role::User) {
        return Ok(());
    }
    replica.read_barrier(client_deadline(request)).await?;
    let state = &replica.state;
    match state.job(job_id)?.or(state.archived_job(job_id)?) {
        Some(job) => crate::auth::may_change_job(&caller, job_id, &job.descriptor),
        // The command answers NOT_FOUND itself.
        None => Ok(()),
    }
}

/// As [`authorize_job_change`], for the job of task `task_id`.
pub(crate) async fn authorize_task_change<T>(
    replica: &crate::replica::Replica,
    request: &tonic::Request<T>,
    task_id: &str,
) -> Result<(), tonic::Status> {
    use crate::state::StateRead;
    crate::auth::note_target(request, format!("task {task_id}"));
    if crate::auth::caller(request).role != Some(crate::auth::Role::User) {
        return Ok(());
    }
    replica.read_barrier(client_deadline(request)).await?;
    let state = &replica.state;
    match state.task(task_id)?.or(state.archived_task(task_id)?) {
        Some(task) => {
            authorize_job_change(replica, request, &task.job_id).await?;
            crate::auth::note_target(request, format!("task {task_id}"));
            Ok(())
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
