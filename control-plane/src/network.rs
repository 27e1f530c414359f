//! Outgoing replica-to-replica RPCs over tonic on the peer port: openraft's Raft messages, and the
//! forwarding of client writes and read-index requests to the leader.
//!
//! Every call has a deadline, so a partitioned or paused peer can stall neither the leader nor a
//! client past its deadline. Knows openraft and the peer proto; knows nothing of the public API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use titus_proto::peer::raft_peer_client::RaftPeerClient;
use titus_proto::peer::{IdentifyRequest, IdentifyResponse, PeerMessage};
use tonic::transport::{Channel, Endpoint};

use crate::codec;
use crate::command::{Command, CommandResponse};
use crate::raft_runtime::Executor;
use crate::raft_types::{LogId, Node, NodeId, TypeConfig};
use crate::store::StateReader;

/// Largest peer message; snapshot chunks and entry batches stay well below it.
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Why a leader did not serve a forwarded request. Travels inside a peer reply.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    #[error("replica is not the leader")]
    NotLeader { leader_id: Option<NodeId>, leader: Option<Node> },
    #[error("{0}")]
    Other(String),
}

/// Lazily connected channels to peers, one per address, shared by Raft replication and forwarding.
#[derive(Clone)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    connector: titus_security::Connector,
    state: StateReader,
    /// Where the channels' connections are driven: the consensus runtime.
    executor: Executor,
}

impl PeerChannels {
    /// `tls`: this replica's certificate, presented to peers (None in insecure mode); `executor`:
    /// the runtime that drives the connections (the consensus runtime).
    pub fn new(
        state: StateReader,
        connect_timeout: Duration,
        tls: Option<Arc<titus_security::Tls>>,
        executor: Executor,
    ) -> Self {
        PeerChannels {
            channels: Arc::default(),
            connector: titus_security::Connector::new(tls, connect_timeout),
            state,
            executor,
        }
    }

    fn client(&self, addr: &str) -> Result<RaftPeerClient<Channel>, String> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match map.get(addr) {
            Some(c) => c.clone(),
            None => {
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
                    .connect_timeout(self.connector.timeout)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .executor(self.executor.clone());
                let c = endpoint.connect_with_connector_lazy(self.connector.clone());
                map.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(RaftPeerClient::new(channel)
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES))
    }

    fn message<T: Serialize>(&self, body: &T) -> Result<PeerMessage, String> {
        let payload = codec::encode(body).map_err(|e| e.to_string())?;
        Ok(PeerMessage { cluster_id: self.state.cluster_id().unwrap_or_default(), payload })
    }

    /// One peer call with a hard deadline. The error says whether the peer was unreachable
    /// (connection refused, deadline) or answered with an error.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        method: PeerMethod,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, PeerCallError> {
        let mut client = self.client(addr).map_err(PeerCallError::Other)?;
        let mut request = tonic::Request::new(self.message(req).map_err(PeerCallError::Other)?);
        request.set_timeout(ttl);
        let fut = async {
            match method {
                PeerMethod::AppendEntries => client.append_entries(request).await,
                PeerMethod::Vote => client.vote(request).await,
                PeerMethod::InstallSnapshot => client.install_snapshot(request).await,
                PeerMethod::Propose => client.propose(request).await,
                PeerMethod::ReadIndex => client.read_index(request).await,
                PeerMethod::Campaign => client.campaign(request).await,
            }
        };
        let reply = match tokio::time::timeout(ttl, fut).await {
            Err(_) => return Err(PeerCallError::Timeout(format!("{addr}: no answer within {} ms", ttl.as_millis()))),
            Ok(Err(status)) => {
                return Err(match status.code() {
                    tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                        PeerCallError::Timeout(format!("{addr}: {}", status.message()))
                    }
                    tonic::Code::Unavailable => PeerCallError::Unreachable(format!("{addr}: {}", status.message())),
                    _ => PeerCallError::Other(format!("{addr}: {}: {}", status.code(), status.message())),
                })
            }
            Ok(Ok(reply)) => reply.into_inner(),
        };
        codec::decode(&reply.payload).map_err(|e| PeerCallError::Other(format!("{addr}: bad reply: {e}")))
    }

    /// Asks a peer who it is and whether it already belongs to a cluster (used before bootstrap).
    pub async fn identify(&self, addr: &str, ttl: Duration) -> Result<IdentifyResponse, String> {
        let mut client = self.client(addr)?;
        let mut request = tonic::Request::new(IdentifyRequest {});
        request.set_timeout(ttl);
        match tokio::time::timeout(ttl, client.identify(request)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(format!("{addr}: {}", s.message())),
            Err(_) => Err(format!("{addr}: no answer within {} ms", ttl.as_millis())),
        }
    }

    /// Sends a client's write to the leader at `leader.peer_addr`.
    pub async fn forward_propose(
        &self,
        leader: &Node,
        command: &Command,
        ttl: Duration,
    ) -> Result<Result<CommandResponse, ForwardError>, PeerCallError> {
        self.call(&leader.peer_addr, PeerMethod::Propose, command, ttl).await
    }

    /// Asks the leader for a read index: the log id up to which a linearizable read must wait.
    pub async fn forward_read_index(
        &self,
        leader: &Node,
        ttl: Duration,
    ) -> Result<Result<Option<LogId>, ForwardError>, PeerCallError> {
        self.call(&leader.peer_addr, PeerMethod::ReadIndex, &(), ttl).await
    }

    /// Asks the replica at `node.peer_addr` to stand for election now (see `Replica::step_down`).
    pub async fn campaign(&self, node: &Node, ttl: Duration) -> Result<Result<(), String>, PeerCallError> {
        self.call(&node.peer_addr, PeerMethod::Campaign, &(), ttl).await
    }
}

#[derive(Clone, Copy)]
enum PeerMethod {
    AppendEntries,
    Vote,
    InstallSnapshot,
    Propose,
    ReadIndex,
    Campaign,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerCallError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// No answer within the deadline: the peer may be slow rather than gone.
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{0}")]
    Other(String),
}

#[derive(Debug)]
struct Msg(String);
impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Msg {}

/// openraft's factory of connections to peers.
pub struct Network {
    pub peers: PeerChannels,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        PeerConnection { target, addr: node.peer_addr.clone(), peers: self.peers.clone() }
    }
}

pub struct PeerConnection {
    target: NodeId,
    addr: String,
    peers: PeerChannels,
}

impl PeerConnection {
    async fn raft_call<Req, Resp, E>(
        &self,
        method: PeerMethod,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let reply: Result<Resp, RaftError<NodeId, E>> =
            self.peers.call(&self.addr, method, req, option.hard_ttl()).await.map_err(|e| match e {
                // openraft backs off (500 ms) from an unreachable peer instead of hammering it; a
                // slow answer is not that — a follower busy syncing a large append would
                // otherwise be left alone for half a second, stalling commits.
                PeerCallError::Unreachable(m) => RPCError::Unreachable(Unreachable::new(&Msg(m))),
                PeerCallError::Timeout(m) | PeerCallError::Other(m) => RPCError::Network(NetworkError::new(&Msg(m))),
            })?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.raft_call(PeerMethod::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>> {
        self.raft_call(PeerMethod::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.raft_call(PeerMethod::Vote, &rpc, &option).await
    }
}
