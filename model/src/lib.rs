//! The replicated state's types and rules, apart from how they are stored or served.
//!
//! Pure data and rules: no IO, no RocksDB, no network — which is what lets the fuzz targets
//! (`fuzz/`) build this crate in seconds.
//!
//! - domain records as they are replicated and stored — capacity groups ([`CapacityGroup`]), jobs
//!   ([`job`]), tasks ([`task`]), agents ([`agent`]), load balancers ([`load_balancer`]) — with
//!   validation that names the offending field;
//! - [`command`]: the [`command::Command`] enum, the only way replicated state changes;
//! - [`codec`]: the versioned encoding of everything written to disk or sent between replicas;
//! - [`raft_types`]: openraft's type configuration (what a log entry carries);
//! - [`convert`]: the wire types (titus-proto) to the model and back, validating on the way in.

pub mod agent;
pub mod budget;
mod capacity_group;
pub mod codec;
pub mod command;
pub mod convert;
pub mod deployment;
pub mod job;
pub mod load_balancer;
pub mod raft_types;
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

/// Linux capabilities by name (without `CAP_`): what a job may ask for and a capacity group allow
/// beyond the agent's reduced default set.
pub const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
];

/// Checks a list of capabilities (`field`): known names, each once, at most as many as there are.
pub fn validate_capabilities(field: &str, caps: &[String]) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    if caps.len() > CAPABILITIES.len() {
        out.push(FieldViolation::new(field, format!("must have at most {} entries", CAPABILITIES.len())));
        return out;
    }
    for (i, c) in caps.iter().enumerate() {
        if !CAPABILITIES.contains(&c.as_str()) {
            out.push(FieldViolation::new(
                format!("{field}[{i}]"),
                format!("{:?} is not a Linux capability name (e.g. NET_RAW, SYS_PTRACE; without CAP_)", truncated(c)),
            ));
        } else if caps[..i].contains(c) {
            out.push(FieldViolation::new(format!("{field}[{i}]"), format!("{c} appears twice")));
        }
    }
    out
}

/// `s` cut to at most `max` bytes, at a character boundary: for free text from a port (a reason
/// message) that is kept, but bounded.
pub fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// At most the first 64 characters of `s`, for quoting user input in an error without echoing
/// megabytes of it.
pub fn truncated(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

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

/// A request that names one or more invalid fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; "))]
pub struct Invalid(pub Vec<FieldViolation>);

/// INVALID_ARGUMENT naming every field, as the API answers it.
impl From<Invalid> for tonic::Status {
    fn from(e: Invalid) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

impl Invalid {
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Invalid(vec![FieldViolation::new(field, description)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_known_names_each_once() {
        let caps = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(validate_capabilities("c", &caps(&["NET_RAW", "SYS_PTRACE"])).is_empty());
        let v = validate_capabilities("c", &caps(&["NET_RAW", "CAP_NET_RAW", "NET_RAW", "net_raw"]));
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["c[1]", "c[2]", "c[3]"], "{v:?}");
        assert!(v[0].description.contains("without CAP_") && v[1].description.contains("twice"), "{v:?}");
        let too_many = vec!["NET_RAW".to_string(); CAPABILITIES.len() + 1];
        assert!(validate_capabilities("c", &too_many)[0].description.contains("at most"));
    }
}
