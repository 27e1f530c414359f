//! Applies load balancer commands to an [`Overlay`].

use crate::command::{CommandResponse, Rejection, RejectionKind};
use crate::error::Result;
use crate::model::job::{JobState, JobType};
use crate::model::load_balancer::{
    association_key, AssociationState, LbTarget, LoadBalancer, TargetState, MAX_LOAD_BALANCERS_PER_JOB,
};
use crate::state::{Overlay, StateRead};

fn reject(kind: RejectionKind, field: &str, message: impl Into<String>) -> CommandResponse {
    CommandResponse::Rejected(Rejection::new(kind, field, message))
}

/// Idempotent, so that a retried call succeeds: removing what is not associated is not an error,
/// as long as the job exists.
pub fn remove(o: &mut Overlay, job_id: &str, target_group: &str) -> Result<CommandResponse> {
    Ok(match association(o, job_id, target_group)? {
        Some(lb) => {
            o.delete_load_balancer(lb);
            CommandResponse::Done
        }
        None if o.job(job_id)?.is_none() && o.archived_job(job_id)?.is_none() => {
            reject(RejectionKind::NotFound, "job_id", format!("job {job_id:?} does not exist"))
        }
        None => CommandResponse::Done,
    })
}

pub fn set_state(
    o: &mut Overlay,
    job_id: &str,
    target_group: &str,
    state: AssociationState,
    message: String,
    timestamp_ms: i64,
) -> Result<CommandResponse> {
    Ok(match association(o, job_id, target_group)? {
        None => reject(
            RejectionKind::NotFound,
            "load_balancer_id.id",
            format!("job {job_id:?} has no load balancer {target_group:?}"),
        ),
        Some(mut lb) => {
            lb.state = state;
            lb.message = message;
            lb.updated_ms = timestamp_ms;
            o.put_load_balancer(lb);
            CommandResponse::Done
        }
    })
}

/// Target records move forward only (a new one starts Registering); answers the keys written.
pub fn put_targets(o: &mut Overlay, targets: Vec<LbTarget>) -> Result<CommandResponse> {
    let existing: std::collections::BTreeMap<String, LbTarget> =
        o.lb_targets()?.into_iter().map(|t| (t.key(), t)).collect();
    let mut written = Vec::new();
    for t in targets {
        let allowed = match existing.get(&t.key()) {
            None => t.state == TargetState::Registering,
            Some(old) => old.state <= t.state,
        };
        if allowed {
            written.push(t.key());
            o.put_lb_target(t);
        }
    }
    Ok(CommandResponse::Keys(written))
}

pub fn forget_targets(o: &mut Overlay, targets: Vec<LbTarget>) -> Result<CommandResponse> {
    for t in targets {
        o.delete_lb_target(t);
    }
    Ok(CommandResponse::Done)
}

fn association(o: &Overlay, job_id: &str, target_group: &str) -> Result<Option<LoadBalancer>> {
    let key = association_key(job_id, target_group);
    Ok(o.load_balancers()?.into_iter().find(|lb| lb.key() == key))
}

pub fn add(o: &mut Overlay, job_id: String, target_group: String, timestamp_ms: i64) -> Result<CommandResponse> {
    let Some(job) = o.job(&job_id)? else {
        return Ok(reject(RejectionKind::NotFound, "job_id", format!("job {job_id:?} does not exist or has finished")));
    };
    if !matches!(job.descriptor.job_type, JobType::Service { .. }) {
        return Ok(reject(RejectionKind::InvalidArgument, "job_id", "load balancers are for service jobs only"));
    }
    if job.status.state != JobState::Accepted {
        return Ok(reject(RejectionKind::FailedPrecondition, "job_id", format!("job {job_id:?} is being killed")));
    }
    let of_job: Vec<LoadBalancer> = o.load_balancers()?.into_iter().filter(|lb| lb.job_id == job_id).collect();
    if let Some(mut lb) = of_job.iter().find(|lb| lb.target_group == target_group).cloned() {
        if lb.state != AssociationState::Active {
            lb.state = AssociationState::Active;
            lb.message.clear();
            lb.updated_ms = timestamp_ms;
            o.put_load_balancer(lb);
        }
        return Ok(CommandResponse::Done);
    }
    if of_job.len() >= MAX_LOAD_BALANCERS_PER_JOB {
        return Ok(reject(
            RejectionKind::FailedPrecondition,
            "load_balancer_id.id",
            format!("job {job_id:?} already has {MAX_LOAD_BALANCERS_PER_JOB} load balancers, the most a job may have"),
        ));
    }
    o.put_load_balancer(LoadBalancer {
        job_id,
        target_group,
        state: AssociationState::Active,
        message: String::new(),
        updated_ms: timestamp_ms,
    });
    Ok(CommandResponse::Done)
}
