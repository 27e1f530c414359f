//! ALB IP target registration for service jobs (Titus's LoadBalancerService).
//!
//! - [`apply`]: the replicated commands (associations, target records), deterministic.
//! - [`plan`]: a pure planner — from associations, target records and tasks, what to register,
//!   deregister and forget. No IO, clock or tokio.
//! - [`duty`]: the leader duty that runs the plan against AWS, writing each target ahead of the
//!   call, and the periodic reconcile with DescribeTargetHealth.
//!
//! A task being killed keeps its container until its targets are deregistered and the drain delay
//! has passed: the agent dispatcher asks [`holds_kill`] before sending the kill.

pub mod apply;
pub mod duty;
pub mod plan;

use crate::model::load_balancer::LbTarget;
use crate::model::task::{Task, TaskState};

/// Whether a KillInitiated task must keep its container for now: some target of it is not yet
/// deregistered and drained, and the wait has not exceeded `max_wait_ms` since the kill.
pub fn holds_kill(task: &Task, targets_of_task: &[LbTarget], now_ms: i64, max_wait_ms: i64) -> bool {
    task.state() == TaskState::KillInitiated
        && !targets_of_task.is_empty()
        && now_ms - task.status.timestamp_ms < max_wait_ms
}
