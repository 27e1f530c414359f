//! The openraft type configuration: what a log entry carries, how nodes are addressed.
//!
//! Depends only on the command and model types, and on tokio's file for a snapshot's data; nothing
//! here knows RocksDB, tonic or the API.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

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
        SnapshotData = SnapshotFile,
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

/// A snapshot's data: a file on disk, never the state in memory. openraft reads it in chunks to
/// send it to a follower, and writes the chunks a leader sends into one; the store reads and
/// writes it on a blocking thread. The path says which file it is (the store renames a received
/// one into place, and tells its own from another's).
#[derive(Debug)]
pub struct SnapshotFile {
    file: tokio::fs::File,
    path: PathBuf,
}

impl SnapshotFile {
    /// Opens the snapshot at `path` for reading.
    pub async fn open(path: &Path) -> io::Result<SnapshotFile> {
        Ok(SnapshotFile { file: tokio::fs::File::open(path).await?, path: path.to_path_buf() })
    }

    /// Creates (or truncates) `path` to receive a snapshot into.
    pub async fn create(path: &Path) -> io::Result<SnapshotFile> {
        let file = tokio::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).await?;
        Ok(SnapshotFile { file, path: path.to_path_buf() })
    }

    /// A file already open for reading.
    pub fn from_std(file: std::fs::File, path: &Path) -> SnapshotFile {
        SnapshotFile { file: tokio::fs::File::from_std(file), path: path.to_path_buf() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for every write to reach the file and makes it durable.
    pub async fn sync(&mut self) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await?;
        self.file.sync_all().await
    }
}

impl tokio::io::AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SnapshotFile {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl tokio::io::AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }
    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}
