//! The openraft type configuration: what a log entry carries, how nodes are addressed.
//!
//! Depends only on the command and model types; nothing here knows RocksDB, tonic or the API.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResponse};

pub type NodeId = u64;

/// How to reach a replica. Both addresses are replicated in the membership config, so every replica
/// can tell a client where the leader's api port is, and every leader can reach its followers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Raft RPCs between replicas.
    pub peer_addr: String,
    /// Clients and agents.
    pub api_addr: String,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer={} api={}", self.peer_addr, self.api_addr)
    }
}

openraft::declare_raft_types!(
    /// Types of the Titus control plane's Raft group.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type Snapshot = openraft::storage::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
