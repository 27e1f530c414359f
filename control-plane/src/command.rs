//! The one way replicated state changes: a [`Command`] carried in a Raft log entry.
//!
//! Applying a command is deterministic: timestamps, ids and random choices are decided by the leader
//! before proposing and travel inside the command. A command that is invalid against the state it is
//! applied to (a duplicate name, say) is applied as a no-op and answered with a [`Rejection`].

use serde::{Deserialize, Serialize};

use crate::model::CapacityGroup;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Names the cluster. Proposed once by the first leader; later proposals are no-ops.
    SetClusterId {
        cluster_id: String,
    },
    CreateCapacityGroup {
        group: CapacityGroup,
        /// A retry with the same token returns the group created by the first call.
        idempotency_token: Option<String>,
    },
    /// Replaces tier, resources and instance count; keeps the create time.
    UpdateCapacityGroup {
        group: CapacityGroup,
    },
    DeleteCapacityGroup {
        name: String,
    },
}

impl Command {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::SetClusterId { .. } => "set_cluster_id",
            Command::CreateCapacityGroup { .. } => "create_capacity_group",
            Command::UpdateCapacityGroup { .. } => "update_capacity_group",
            Command::DeleteCapacityGroup { .. } => "delete_capacity_group",
        }
    }
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// Applied; nothing to return (also the answer to blank and membership entries).
    Done,
    CapacityGroup(CapacityGroup),
    /// Not applied: the state did not allow it.
    Rejected(Rejection),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectionKind {
    NotFound,
    AlreadyExists,
    FailedPrecondition,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub kind: RejectionKind,
    /// The request field the rejection is about, e.g. `group.name`.
    pub field: String,
    pub message: String,
}

impl Rejection {
    pub fn new(kind: RejectionKind, field: &str, message: impl Into<String>) -> Self {
        Rejection {
            kind,
            field: field.to_string(),
            message: message.into(),
        }
    }
}
