//! Instance groups (the EC2 fleet's shape and the capacity duty's written-ahead intents), applied to
//! an [`Overlay`]. An upsert keeps the intents: only the capacity duty sets them.

use crate::command::{CommandResponse, Rejection, RejectionKind};
use crate::error::Result;
use crate::model::agent::{InstanceGroup, LaunchIntent, Lifecycle};
use crate::state::{Overlay, StateRead};

fn not_found(id: &str) -> CommandResponse {
    CommandResponse::Rejected(Rejection::new(
        RejectionKind::NotFound,
        "id",
        format!("instance group {id:?} does not exist"),
    ))
}

/// Changes one existing group.
fn with_group(o: &mut Overlay, id: &str, change: impl FnOnce(&mut InstanceGroup)) -> Result<CommandResponse> {
    Ok(match o.instance_group(id)? {
        None => not_found(id),
        Some(mut g) => {
            change(&mut g);
            o.put_instance_group(g);
            CommandResponse::Done
        }
    })
}

pub fn upsert(o: &mut Overlay, mut group: InstanceGroup) -> Result<CommandResponse> {
    if let Some(existing) = o.instance_group(&group.id)? {
        group.pending_launch = existing.pending_launch;
        group.pending_terminations = existing.pending_terminations;
    }
    o.put_instance_group(group.clone());
    Ok(CommandResponse::InstanceGroup(group))
}

pub fn set_desired(o: &mut Overlay, id: &str, desired: u32) -> Result<CommandResponse> {
    match o.instance_group(id)? {
        Some(g) if desired < g.min || desired > g.max => Ok(CommandResponse::Rejected(Rejection::new(
            RejectionKind::InvalidArgument,
            "desired",
            format!("{desired} is outside [min, max] = [{}, {}]", g.min, g.max),
        ))),
        _ => with_group(o, id, |g| g.desired = desired),
    }
}

pub fn set_lifecycle(o: &mut Overlay, id: &str, lifecycle: Lifecycle, timestamp_ms: i64) -> Result<CommandResponse> {
    with_group(o, id, |g| {
        if g.lifecycle != lifecycle {
            g.lifecycle = lifecycle;
            g.lifecycle_since_ms = Some(timestamp_ms);
        }
    })
}

/// The capacity duty's launch, written ahead of the RunInstances call (`None`: done or given up).
pub fn set_launch_intent(o: &mut Overlay, id: &str, intent: Option<LaunchIntent>) -> Result<CommandResponse> {
    with_group(o, id, |g| g.pending_launch = intent)
}

/// The capacity duty's terminations, written ahead of the TerminateInstances call.
pub fn set_termination_intent(o: &mut Overlay, id: &str, instances: Vec<String>) -> Result<CommandResponse> {
    with_group(o, id, |g| g.pending_terminations = instances)
}
