//! The peer port's server: receives Raft messages from the leader, and forwarded writes and
//! read-index requests from followers.
//!
//! A message from a replica of another cluster is refused, so a misconfigured or re-initialised
//! replica can never merge two clusters' logs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use serde::{de::DeserializeOwned, Serialize};
use titus_proto::peer::raft_peer_server::RaftPeer;
use titus_proto::peer::{IdentifyRequest, IdentifyResponse, PeerMessage};
use tonic::{Request, Response, Status};

use crate::codec;
use crate::command::{Command, CommandResponse};
use crate::network::ForwardError;
use crate::raft_types::{LogId, NodeId, Raft};
use crate::store::StateReader;

pub struct PeerService {
    pub node_id: NodeId,
    pub raft: Raft,
    pub state: StateReader,
    /// See [`crate::replica::Replica::step_down`].
    pub stepping_down: Arc<AtomicBool>,
}

impl PeerService {
    fn accept<T: DeserializeOwned>(&self, request: Request<PeerMessage>) -> Result<T, Status> {
        let msg = request.into_inner();
        if let Some(ours) = self.state.cluster_id() {
            if !msg.cluster_id.is_empty() && msg.cluster_id != ours {
                tracing::warn!(theirs = %msg.cluster_id, %ours, "refused a peer message from another cluster");
                return Err(Status::failed_precondition(format!(
                    "replica {} belongs to cluster {ours}, the sender to cluster {}",
                    self.node_id, msg.cluster_id
                )));
            }
        }
        codec::decode(&msg.payload).map_err(|e| Status::invalid_argument(format!("payload: {e}")))
    }

    fn reply<T: Serialize>(&self, body: &T) -> Result<Response<PeerMessage>, Status> {
        let payload = codec::encode(body).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(PeerMessage { cluster_id: self.state.cluster_id().unwrap_or_default(), payload }))
    }
}

/// "Not now": a leader handing over refuses before proposing, and one without a quorum's answer
/// cannot confirm a read index; the forwarding replica waits for a leader and asks again.
const NOT_NOW: ForwardError = ForwardError::NotLeader { leader_id: None, leader: None };

fn client_write_error(e: RaftError<NodeId, ClientWriteError<NodeId, crate::raft_types::Node>>) -> ForwardError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ForwardError::NotLeader { leader_id: f.leader_id, leader: f.leader_node }
        }
        other => ForwardError::Other(other.to_string()),
    }
}

fn check_leader_error(e: RaftError<NodeId, CheckIsLeaderError<NodeId, crate::raft_types::Node>>) -> ForwardError {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => {
            ForwardError::NotLeader { leader_id: f.leader_id, leader: f.leader_node }
        }
        // A leader that has not heard from a quorum yet (just elected, or cut off) cannot confirm
        // a read index now: the follower waits and asks again, as it does locally. Answering it as
        // an error made a read fail INTERNAL right after a compose stack came back up.
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)) => {
            tracing::debug!(error = %e, "read index: no quorum yet");
            NOT_NOW
        }
        other => ForwardError::Other(other.to_string()),
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let rpc = self.accept(request)?;
        self.reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let rpc = self.accept(request)?;
        self.reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let rpc = self.accept(request)?;
        self.reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn propose(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let mut command: Command = self.accept(request)?;
        // The leader's clock decides the times a command carries (see `Command::restamp`).
        command.restamp(crate::clock::now_ms());
        // The forwarding replica checked it too; nothing from a port reaches the log unchecked.
        let result: Result<CommandResponse, ForwardError> = if self.stepping_down.load(Ordering::Acquire) {
            Err(NOT_NOW)
        } else if let Err(e) = crate::replica::check_loggable(&command) {
            Err(ForwardError::Other(e.to_string()))
        } else {
            self.raft.client_write(command).await.map(|r| r.data).map_err(client_write_error)
        };
        self.reply(&result)
    }

    async fn read_index(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let () = self.accept(request)?;
        let result: Result<Option<LogId>, ForwardError> = if self.stepping_down.load(Ordering::Acquire) {
            Err(NOT_NOW)
        } else {
            self.raft.ensure_linearizable().await.map_err(check_leader_error)
        };
        self.reply(&result)
    }

    async fn campaign(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let () = self.accept(request)?;
        tracing::info!(node_id = self.node_id, "asked to stand for election by a leader stepping down");
        let result: Result<(), String> = self.raft.trigger().elect().await.map_err(|e| e.to_string());
        self.reply(&result)
    }

    async fn identify(&self, _request: Request<IdentifyRequest>) -> Result<Response<IdentifyResponse>, Status> {
        let initialized = self.raft.is_initialized().await.map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(IdentifyResponse {
            node_id: self.node_id,
            cluster_id: self.state.cluster_id().unwrap_or_default(),
            initialized,
            reads_codec_up_to: u32::from(codec::CURRENT_VERSION),
        }))
    }
}
