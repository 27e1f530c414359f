//! Capacity groups (a tier's share of the fleet that jobs are admitted against): create, update,
//! delete, applied to an [`Overlay`] like every other rule.

use crate::command::{CommandResponse, Rejection, RejectionKind};
use crate::error::Result;
use crate::model::CapacityGroup;
use crate::state::{Overlay, StateRead, TokenRecord};

/// How long a capacity group's idempotency token is remembered.
pub const TOKEN_TTL_MS: i64 = 24 * 3600 * 1000;

fn reject(kind: RejectionKind, field: &str, message: String) -> CommandResponse {
    CommandResponse::Rejected(Rejection::new(kind, field, message))
}

/// A new group; a retry with the same token answers the group the first call created.
pub fn create(o: &mut Overlay, group: CapacityGroup, idempotency_token: Option<String>) -> Result<CommandResponse> {
    let token_key = idempotency_token.map(|t| format!("capacity-group/{t}"));
    if let Some(record) = token_key.as_ref().map(|k| o.token(k)).transpose()?.flatten() {
        let name = record.result;
        return Ok(match o.capacity_group(&name)? {
            Some(existing) => CommandResponse::CapacityGroup(existing),
            None => reject(
                RejectionKind::FailedPrecondition,
                "idempotency_token",
                format!("token was used to create capacity group {name:?}, which has since been deleted"),
            ),
        });
    }
    if o.capacity_group(&group.name)?.is_some() {
        return Ok(reject(
            RejectionKind::AlreadyExists,
            "group.name",
            format!("capacity group {:?} already exists", group.name),
        ));
    }
    if let Some(key) = token_key {
        let expires_ms = group.create_time_ms.saturating_add(TOKEN_TTL_MS);
        o.put_token(key, TokenRecord { result: group.name.clone(), expires_ms });
    }
    o.put_capacity_group(group.clone());
    Ok(CommandResponse::CapacityGroup(group))
}

/// Replaces tier, resources and instance count; keeps the create time.
pub fn update(o: &mut Overlay, mut group: CapacityGroup) -> Result<CommandResponse> {
    Ok(match o.capacity_group(&group.name)? {
        None => {
            reject(RejectionKind::NotFound, "group.name", format!("capacity group {:?} does not exist", group.name))
        }
        Some(existing) => {
            group.create_time_ms = existing.create_time_ms;
            o.put_capacity_group(group.clone());
            CommandResponse::CapacityGroup(group)
        }
    })
}

pub fn delete(o: &mut Overlay, name: &str) -> Result<CommandResponse> {
    Ok(match o.capacity_group(name)? {
        None => reject(RejectionKind::NotFound, "name", format!("capacity group {name:?} does not exist")),
        Some(group) => {
            o.delete_capacity_group(group);
            CommandResponse::Done
        }
    })
}
