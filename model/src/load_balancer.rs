//! Titus's load balancer associations (a service job ↔ an ALB target group of type `ip`) and the
//! IP targets this system registered in them.
//!
//! Targets are written ahead: a target is recorded `Registering` before RegisterTargets is called
//! and `Deregistering` before DeregisterTargets is, so a new leader finds every call its predecessor
//! may have made and finishes it — no target is duplicated or orphaned by a leader change.

use serde::{Deserialize, Serialize};

/// At most this many target groups per job (Titus's limit).
pub const MAX_LOAD_BALANCERS_PER_JOB: usize = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AssociationState {
    /// The job's Started tasks are registered in the target group.
    Active,
    /// A permanent error (the target group was deleted, access refused): nothing is registered any
    /// more until the association is removed and added again.
    Orphaned,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancer {
    pub job_id: String,
    /// The target group's ARN (Titus's load balancer id).
    pub target_group: String,
    pub state: AssociationState,
    /// Why it is Orphaned.
    pub message: String,
    pub updated_ms: i64,
}

impl LoadBalancer {
    pub fn key(&self) -> String {
        association_key(&self.job_id, &self.target_group)
    }
}

pub fn association_key(job_id: &str, target_group: &str) -> String {
    format!("{job_id}/{target_group}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TargetState {
    /// RegisterTargets is about to be (or was) called; not yet confirmed.
    Registering,
    Registered,
    /// DeregisterTargets is about to be (or was) called; not yet confirmed.
    Deregistering,
    /// Confirmed gone from the target group at `updated_ms`; kept until the drain delay has passed,
    /// then forgotten. A task being killed keeps its container until then.
    Deregistered,
}

/// One IP target this system registered (or is registering) for one task in one target group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbTarget {
    pub target_group: String,
    pub task_id: String,
    pub job_id: String,
    pub ip: String,
    pub state: TargetState,
    /// When it entered `state`.
    pub updated_ms: i64,
    /// What the target group last said of it (DescribeTargetHealth: `initial`, `healthy`,
    /// `unhealthy`, ...); empty until first asked. Written only when it changes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub health: String,
}

impl LbTarget {
    pub fn key(&self) -> String {
        target_key(&self.task_id, &self.target_group)
    }
}

/// Task id first, so a task's targets are adjacent.
pub fn target_key(task_id: &str, target_group: &str) -> String {
    format!("{task_id}/{target_group}")
}

/// An ALB target group ARN: `arn:<partition>:elasticloadbalancing:<region>:<account>:targetgroup/<name>/<id>`.
pub fn validate_target_group_arn(field: &str, arn: &str) -> Result<(), super::FieldViolation> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let ok = parts.len() == 6
        && parts[0] == "arn"
        && parts[2] == "elasticloadbalancing"
        && parts[5].starts_with("targetgroup/")
        && parts[5].split('/').count() == 3
        && arn.len() <= 512;
    if ok {
        Ok(())
    } else {
        Err(super::FieldViolation::new(
            field,
            format!(
                "{arn:?} is not a target group ARN (arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID)"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_group_arns_are_checked() {
        let good = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/73e2d6bc24d8a067";
        assert!(validate_target_group_arn("load_balancer_id.id", good).is_ok());
        for bad in [
            "",
            "web",
            "arn:aws:ec2:us-east-1:1:instance/i-1",
            "arn:aws:elasticloadbalancing:us-east-1:1:loadbalancer/app/x/y",
        ] {
            let e = validate_target_group_arn("load_balancer_id.id", bad).unwrap_err();
            assert_eq!(e.field, "load_balancer_id.id");
        }
    }
}
