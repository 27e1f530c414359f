//! The control plane's one error type and its one conversion to the wire (`tonic::Status`).

use crate::command::{Rejection, RejectionKind};
use crate::model::FieldViolation;
use crate::raft_types::NodeId;

pub type Result<T> = std::result::Result<T, Error>;

/// Metadata key carrying the leader's api address on NOT_LEADER-style answers, so a client or agent
/// can go straight there.
pub const LEADER_HINT_METADATA: &str = "titus-leader";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", join_violations(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("{}: {}", .0.field, .0.message)]
    Rejected(Rejection),
    #[error("replica {node_id} is not the leader{}", leader_suffix(.leader_id, .leader_api_addr))]
    NotLeader { node_id: NodeId, leader_id: Option<NodeId>, leader_api_addr: Option<String> },
    #[error("replica {node_id} knows no leader: the cluster is electing one or has lost its majority")]
    NoLeader { node_id: NodeId },
    #[error(
        "not committed within {timeout_ms} ms ({what}); the outcome is unknown — is a majority of replicas reachable?"
    )]
    Timeout { what: String, timeout_ms: u64 },
    #[error("peer {peer}: {message}")]
    Peer { peer: String, message: String },
    #[error("replica {node_id} is shutting down")]
    ShuttingDown { node_id: NodeId },
    /// Refused before proposing: appended, it would not read back (see `replica::check_loggable`).
    #[error("command {kind} cannot be written to the log: {source}; nothing was proposed")]
    Unloggable { kind: &'static str, source: crate::codec::CodecError },
    /// Refused before proposing: larger than one log entry may be (see `replica::MAX_ENTRY_BYTES`).
    #[error(
        "command {kind} is {bytes} bytes encoded, over the {max}-byte bound on one log entry; nothing was proposed"
    )]
    EntryTooLarge { kind: &'static str, bytes: usize, max: usize },
    /// A leader duty's write or side effect after this replica stopped leading in the duty's term.
    #[error("replica {node_id} no longer leads in term {term}: the duties of that term stop")]
    Deposed { node_id: NodeId, term: u64 },
    /// This leader is handing leadership over: it writes nothing and asks no majority meanwhile.
    #[error("replica {node_id} is stepping down")]
    SteppingDown { node_id: NodeId },
    /// This leader could not confirm with a majority that it still leads.
    #[error("replica {node_id} could not confirm with a majority that it leads in term {term}: {why}")]
    Unconfirmed { node_id: NodeId, term: u64, why: String },
    #[error("raft: {0}")]
    Raft(String),
    /// Reading or writing the replica's store failed: what it was doing, and the error beneath,
    /// kept as the source (its text is also in the message, which is all a client sees).
    #[error("storage: {}", with_source(.what, .source))]
    Storage { what: String, source: Option<Box<dyn std::error::Error + Send + Sync>> },
    #[error("config: {0}")]
    Config(String),
}

fn with_source(what: &str, source: &Option<Box<dyn std::error::Error + Send + Sync>>) -> String {
    match (what.is_empty(), source) {
        (_, None) => what.to_string(),
        (true, Some(e)) => e.to_string(),
        (false, Some(e)) => format!("{what}: {e}"),
    }
}

fn join_violations(v: &[FieldViolation]) -> String {
    v.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; ")
}

fn leader_suffix(id: &Option<NodeId>, addr: &Option<String>) -> String {
    match (id, addr) {
        (Some(id), Some(addr)) => format!("; the leader is replica {id} at {addr}"),
        (Some(id), None) => format!("; the leader is replica {id}"),
        _ => String::new(),
    }
}

impl Error {
    /// A storage failure while doing `what`, keeping `source`.
    pub fn storage(what: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Storage { what: what.into(), source: Some(Box::new(source)) }
    }

    /// A storage failure with nothing beneath it (a record that makes no sense, say).
    pub fn storage_msg(what: impl Into<String>) -> Self {
        Error::Storage { what: what.into(), source: None }
    }

    /// [`Error::storage`] with no more to say than the source: for `map_err(Error::from_storage)`.
    pub fn from_storage(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::storage("", source)
    }

    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

impl From<crate::model::Invalid> for Error {
    fn from(e: crate::model::Invalid) -> Self {
        Error::InvalidArgument(e.0)
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let message = e.to_string();
        let code = match &e {
            Error::InvalidArgument(_) | Error::Unloggable { .. } | Error::EntryTooLarge { .. } => Code::InvalidArgument,
            Error::Rejected(r) => match r.kind {
                RejectionKind::InvalidArgument => Code::InvalidArgument,
                RejectionKind::NotFound => Code::NotFound,
                RejectionKind::AlreadyExists => Code::AlreadyExists,
                RejectionKind::FailedPrecondition => Code::FailedPrecondition,
            },
            Error::NotLeader { .. }
            | Error::NoLeader { .. }
            | Error::Timeout { .. }
            | Error::Peer { .. }
            | Error::ShuttingDown { .. }
            | Error::Deposed { .. }
            | Error::SteppingDown { .. }
            | Error::Unconfirmed { .. } => Code::Unavailable,
            Error::Raft(_) | Error::Storage { .. } | Error::Config(_) => Code::Internal,
        };
        let mut status = tonic::Status::new(code, message);
        if let Error::NotLeader { leader_api_addr: Some(addr), .. } = &e {
            if let Ok(v) = addr.parse() {
                status.metadata_mut().insert(LEADER_HINT_METADATA, v);
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storage_error_keeps_its_source_and_says_it() {
        let io = std::io::Error::new(std::io::ErrorKind::Other, "disk on fire");
        let e = Error::storage("reading jobs", io);
        assert_eq!(e.to_string(), "storage: reading jobs: disk on fire");
        let source = std::error::Error::source(&e).expect("the source is kept");
        assert_eq!(source.to_string(), "disk on fire");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Internal);
        assert_eq!(Error::storage_msg("audit key is not 8 bytes").to_string(), "storage: audit key is not 8 bytes");
    }

    #[test]
    fn invalid_argument_names_every_field() {
        let e = Error::InvalidArgument(vec![
            FieldViolation::new("group.name", "must not be empty"),
            FieldViolation::new("group.instance_count", "must be > 0"),
        ]);
        let s = tonic::Status::from(e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "group.name: must not be empty; group.instance_count: must be > 0");
    }

    #[test]
    fn not_leader_carries_the_hint() {
        let s = tonic::Status::from(Error::NotLeader {
            node_id: 2,
            leader_id: Some(1),
            leader_api_addr: Some("127.0.0.1:7101".into()),
        });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.metadata().get(LEADER_HINT_METADATA).unwrap(), "127.0.0.1:7101");
        assert!(s.message().contains("leader is replica 1 at 127.0.0.1:7101"), "{}", s.message());
    }
}
