//! Domain records as they are replicated and stored — capacity groups, jobs, tasks — with
//! validation that names the offending field.
//!
//! Pure data and rules: no IO, no RocksDB, no proto. The API layer converts from and to the wire.

pub mod agent;
mod capacity_group;
pub mod job;
pub mod load_balancer;
pub mod task;

pub use capacity_group::{CapacityGroup, ResourceDimension, Tier};

use serde::{Deserialize, Serialize};

/// One invalid field of a request: `field` is the path from the request's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl std::fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        FieldViolation { field: field.into(), description: description.into() }
    }
}

pub const MAX_NAME_LEN: usize = 128;

/// Names of capacity groups (and later jobs' application names) are identifiers that show up in
/// metrics, CLI output and RocksDB keys: keep them to a safe alphabet.
pub fn validate_name(field: &str, name: &str) -> Result<(), FieldViolation> {
    if name.is_empty() {
        return Err(FieldViolation::new(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(FieldViolation::new(field, format!("must be at most {MAX_NAME_LEN} characters")));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(FieldViolation::new(field, "may contain only letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}
