//! ClusterService: members and their roles, the leader, and membership changes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use titus_proto as pb;
use titus_proto::cluster_service_server::ClusterService;
use tonic::{Request, Response, Status};

use super::client_deadline;
use crate::error::Error;
use crate::raft_types::{Node, NodeId};
use crate::replica::Replica;

pub struct ClusterApi {
    pub replica: Arc<Replica>,
}

/// A learner may take a while to catch up before it can vote; membership calls get this long unless
/// the caller says otherwise.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(60);

impl ClusterApi {
    fn status(&self) -> pb::ClusterStatus {
        let m = self.replica.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| {
                let role = if Some(*id) == m.current_leader {
                    pb::MemberRole::Leader
                } else if *id == m.id && m.state == ServerState::Candidate {
                    pb::MemberRole::Candidate
                } else if voters.contains(id) {
                    pb::MemberRole::Follower
                } else {
                    pb::MemberRole::Learner
                };
                pb::Member {
                    node_id: *id,
                    peer_addr: node.peer_addr.clone(),
                    api_addr: node.api_addr.clone(),
                    role: role as i32,
                }
            })
            .collect();
        let role = match m.state {
            ServerState::Leader => pb::MemberRole::Leader,
            ServerState::Follower => pb::MemberRole::Follower,
            ServerState::Learner => pb::MemberRole::Learner,
            ServerState::Candidate => pb::MemberRole::Candidate,
            ServerState::Shutdown => pb::MemberRole::RoleUnknown,
        };
        let leader_api_addr =
            m.current_leader.and_then(|id| membership.get_node(&id)).map(|n| n.api_addr.clone()).unwrap_or_default();
        pb::ClusterStatus {
            cluster_id: self.replica.state.cluster_id().unwrap_or_default(),
            node_id: m.id,
            role: role as i32,
            leader_id: m.current_leader.unwrap_or(0),
            leader_api_addr,
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            members,
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
        }
    }

    /// A membership call bounded by `timeout`. Leadership lost on the way (a new election during the
    /// change) answers as any follower would — UNAVAILABLE with the leader hint — and a change that
    /// meets another still in progress answers UNAVAILABLE, so the SDK retries instead of giving up on
    /// an INTERNAL error. Both found by titus-jepsen's membership nemesis.
    async fn bounded<T>(
        &self,
        what: &str,
        timeout: Duration,
        fut: impl std::future::Future<Output = Result<T, RaftError<NodeId, ClientWriteError<NodeId, Node>>>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(self.replica.not_leader().into()),
            // A new leader's own membership entry is not committed yet: a moment later it will be.
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(e),
            )))) => Err(Status::unavailable(format!("{what}: {e}; retry"))),
            Ok(Err(e)) => Err(Error::Raft(format!("{what}: {e}")).into()),
            Err(_) => Err(Error::Timeout { what: what.into(), timeout_ms: timeout.as_millis() as u64 }.into()),
        }
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn get_cluster_status(
        &self,
        _request: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn add_member(&self, request: Request<pb::AddMemberRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let timeout = client_deadline(&request).unwrap_or(MEMBERSHIP_TIMEOUT);
        let req = request.into_inner();
        if req.node_id == 0 {
            return Err(Error::invalid("node_id", "must be > 0").into());
        }
        for (field, addr) in [("peer_addr", &req.peer_addr), ("api_addr", &req.api_addr)] {
            if !addr.contains(':') {
                return Err(Error::invalid(field, format!("{addr:?} is not host:port")).into());
            }
        }
        self.replica.require_leader()?;
        let node = Node { peer_addr: req.peer_addr, api_addr: req.api_addr };
        tracing::info!(node_id = req.node_id, %node, "adding member: learner first, voter once caught up");
        // Blocks until the learner has caught up with the leader's log (or snapshot).
        self.bounded("add learner", timeout, self.replica.raft.add_learner(req.node_id, node, true)).await?;
        self.bounded(
            "promote to voter",
            timeout,
            self.replica.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([req.node_id])), false),
        )
        .await?;
        Ok(Response::new(self.status()))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let timeout = client_deadline(&request).unwrap_or(MEMBERSHIP_TIMEOUT);
        let id = request.into_inner().node_id;
        self.replica.require_leader()?;
        let membership = self.replica.raft.metrics().borrow().membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        if membership.get_node(&id).is_none() {
            return Err(Error::invalid("node_id", format!("replica {id} is not a member")).into());
        }
        if voters.len() == 1 && voters.contains(&id) {
            return Err(Error::invalid(
                "node_id",
                format!("replica {id} is the last voter; a cluster cannot remove it"),
            )
            .into());
        }
        tracing::info!(node_id = id, "removing member");
        let change = if voters.contains(&id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.bounded("remove member", timeout, self.replica.raft.change_membership(change, false)).await?;
        Ok(Response::new(self.status()))
    }
}
