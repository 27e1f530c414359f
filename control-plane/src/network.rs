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
        let message = self.message(req).map_err(PeerCallError::Other)?;
        self.send(addr, method, message, ttl).await
    }

    /// [`call`](Self::call) with the request already encoded.
    async fn send<Resp: DeserializeOwned>(
        &self,
        addr: &str,
        method: PeerMethod,
        message: PeerMessage,
        ttl: Duration,
    ) -> Result<Resp, PeerCallError> {
        let mut client = self.client(addr).map_err(PeerCallError::Other)?;
        let mut request = tonic::Request::new(message);
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
    /// An AppendEntries carries entries up to about this many encoded bytes (at least one entry).
    pub max_payload_bytes: usize,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        PeerConnection {
            target,
            addr: node.peer_addr.clone(),
            peers: self.peers.clone(),
            max_payload_bytes: self.max_payload_bytes,
        }
    }
}

pub struct PeerConnection {
    target: NodeId,
    addr: String,
    peers: PeerChannels,
    max_payload_bytes: usize,
}

/// Encodes `rpc`, first dropping its later entries while it is over `max_bytes` and has more than
/// one (halving: a payload within the bound costs one encoding, a large one at most two in all).
/// Says which entry is the last one kept, when entries were dropped.
fn fit_append(
    mut rpc: AppendEntriesRequest<TypeConfig>,
    max_bytes: usize,
    encode: impl Fn(&AppendEntriesRequest<TypeConfig>) -> Result<PeerMessage, String>,
) -> Result<(PeerMessage, Option<LogId>), String> {
    let mut message = encode(&rpc)?;
    let mut last_kept = None;
    while message.payload.len() > max_bytes && rpc.entries.len() > 1 {
        rpc.entries.truncate(rpc.entries.len() / 2);
        last_kept = rpc.entries.last().map(|e| e.log_id);
        message = encode(&rpc)?;
    }
    Ok((message, last_kept))
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
        let message = self.peers.message(req).map_err(|m| RPCError::Network(NetworkError::new(&Msg(m))))?;
        self.raft_send(method, message, option).await
    }

    async fn raft_send<Resp, E>(
        &self,
        method: PeerMethod,
        message: PeerMessage,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let reply: Result<Resp, RaftError<NodeId, E>> =
            self.peers.send(&self.addr, method, message, option.hard_ttl()).await.map_err(|e| match e {
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
        // openraft gives an AppendEntries one heartbeat interval to be answered and resends the
        // same entries when it is not: a follower catching up on large entries (batches of
        // placements) would time out on every try and never catch up. Bounded in bytes, a payload
        // is answered in time; the entries dropped go in the next one (openraft's partial success).
        let (message, last_kept) = fit_append(rpc, self.max_payload_bytes, |r| self.peers.message(r))
            .map_err(|m| RPCError::Network(NetworkError::new(&Msg(m))))?;
        let reply = self.raft_send(PeerMethod::AppendEntries, message, &option).await?;
        Ok(match (reply, last_kept) {
            (AppendEntriesResponse::Success, Some(last)) => AppendEntriesResponse::PartialSuccess(Some(last)),
            (reply, _) => reply,
        })
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

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, Vote};

    use super::*;

    fn request(entries: usize, value_bytes: usize) -> AppendEntriesRequest<TypeConfig> {
        let log_id = |index| LogId::new(CommittedLeaderId::new(1, 1), index);
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(log_id(10)),
            leader_commit: Some(log_id(10)),
            entries: (11..11 + entries as u64)
                .map(|index| Entry {
                    log_id: log_id(index),
                    payload: EntryPayload::Normal(Command::SetClusterId { cluster_id: "x".repeat(value_bytes) }),
                })
                .collect(),
        }
    }

    fn encode(rpc: &AppendEntriesRequest<TypeConfig>) -> Result<PeerMessage, String> {
        Ok(PeerMessage { cluster_id: String::new(), payload: codec::encode(rpc).map_err(|e| e.to_string())? })
    }

    #[test]
    fn an_append_is_cut_to_its_byte_bound_and_says_where() {
        // Within the bound: sent whole, nothing said.
        let (m, last) = fit_append(request(4, 1_000), 64 << 10, encode).expect("fits");
        assert_eq!(last, None);
        let sent: AppendEntriesRequest<TypeConfig> = codec::decode(&m.payload).expect("decodes");
        assert_eq!(sent.entries.len(), 4);

        // 64 entries of 10 kB against 100 kB: halved until it fits (8 entries), and the last kept
        // is named, so the caller reports a partial success up to it.
        let (m, last) = fit_append(request(64, 10_000), 100_000, encode).expect("fits");
        assert!(m.payload.len() <= 100_000, "{} bytes", m.payload.len());
        let sent: AppendEntriesRequest<TypeConfig> = codec::decode(&m.payload).expect("decodes");
        assert_eq!(sent.entries.len(), 8);
        assert_eq!(last, sent.entries.last().map(|e| e.log_id));
        assert_eq!(last.map(|l| l.index), Some(18));
        assert_eq!((sent.prev_log_id, sent.leader_commit), (request(0, 0).prev_log_id, request(0, 0).leader_commit));

        // One entry over the bound still goes, alone: the follower must get it some time.
        let (m, last) = fit_append(request(3, 50_000), 10_000, encode).expect("fits");
        let sent: AppendEntriesRequest<TypeConfig> = codec::decode(&m.payload).expect("decodes");
        assert_eq!((sent.entries.len(), last.map(|l| l.index)), (1, Some(11)));
    }
}
