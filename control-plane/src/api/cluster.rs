//! ClusterService: members and their roles, the leader, and membership changes.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use titus_proto as pb;
use titus_proto::cluster_service_server::ClusterService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::client_deadline;
use crate::command::{Command, CommandResponse};
use crate::error::Error;
use crate::raft_types::{Node, NodeId};
use crate::replica::Replica;
use crate::store::cf;

pub struct ClusterApi {
    pub replica: Arc<Replica>,
}

/// A learner may take a while to catch up before it can vote; membership calls get this long unless
/// the caller says otherwise.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a step-down waits for another replica to be elected unless the caller says otherwise.
const STEP_DOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Backup files are sent in chunks of this size.
const BACKUP_CHUNK_BYTES: usize = 1 << 20;
/// The largest backup a restore accepts (it is held in memory while it is committed, and swapped
/// in by one write batch on every replica).
const MAX_RESTORE_BYTES: usize = 1 << 30;
/// How long a restore waits for the client's next chunk.
const RESTORE_CHUNK_WAIT: Duration = Duration::from_secs(30);
/// Audit records one query looks at, at most (a filter that matches little pages on).
const AUDIT_SCAN: usize = 10_000;
/// Raw record bytes per restore entry (twice that as hex in the entry): entries stay small enough
/// to be replicated and applied within a heartbeat interval even on a busy follower.
const RESTORE_ENTRY_BYTES: usize = 32 << 10;
/// How many times a restore step whose outcome is unknown is proposed again (backing off up to 2 s:
/// together over a minute, enough to ride out a cluster that is electing on a loaded machine).
const RESTORE_STEP_ATTEMPTS: u32 = 40;

/// What a restore commits, per family of interest (`entries` is counted as they are proposed).
fn restore_result(families: &crate::store::Families) -> pb::RestoreResult {
    let count = |name: &str| families.iter().find(|(n, _)| n == name).map_or(0, |(_, r)| r.len() as u64);
    pb::RestoreResult {
        records: families.iter().map(|(_, r)| r.len() as u64).sum(),
        jobs: count(cf::JOBS),
        tasks: count(cf::TASKS),
        capacity_groups: count(cf::CAPACITY_GROUPS),
        entries: 0,
    }
}

impl ClusterApi {
    /// Proposes one step of a restore; a rejection ends the restore with its reason. A step whose
    /// outcome is unknown (a slow commit, an election) is proposed again: each is safe to repeat —
    /// a begin before any records, records as plain puts into the staging area, an end answering
    /// Done once applied. Found by the compose test on a loaded machine.
    async fn restore_step(&self, command: Command) -> Result<(), Status> {
        let mut attempt = 0;
        loop {
            match self.replica.propose(command.clone(), None).await {
                Ok(CommandResponse::Rejected(r)) => return Err(Error::Rejected(r).into()),
                Ok(_) => return Ok(()),
                Err(
                    e @ (Error::Timeout { .. } | Error::NoLeader { .. } | Error::NotLeader { .. } | Error::Peer { .. }),
                ) if attempt < RESTORE_STEP_ATTEMPTS => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, step = command.kind(), "restore: step not confirmed; proposing it again");
                    tokio::time::sleep(Duration::from_millis((200 * attempt as u64).min(2_000))).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

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
            codec_version: u32::from(self.replica.state.codec_version()),
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
    type BackupStream = Pin<Box<dyn Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

    async fn list_audit_records(&self, request: Request<pb::AuditQuery>) -> Result<Response<pb::AuditRecords>, Status> {
        let q = request.get_ref().clone();
        let limit = match q.limit {
            0 => 100,
            n if n > 1000 => return Err(Error::invalid("limit", "must be at most 1000").into()),
            n => n as usize,
        };
        self.replica.read_barrier(client_deadline(&request)).await?;
        let state = self.replica.state.clone();
        // Filters are plain comparisons on the records' strings, never patterns.
        let (records, last_sequence) = tokio::task::spawn_blocking(move || {
            state.audit_records(q.after_sequence, limit, AUDIT_SCAN, |r| {
                (q.caller.is_empty() || r.caller == q.caller || r.caller.split('+').any(|c| c == q.caller))
                    && (q.method.is_empty() || r.method.ends_with(&q.method))
            })
        })
        .await
        .map_err(|e| Status::internal(format!("audit: {e}")))??;
        Ok(Response::new(pb::AuditRecords {
            records: records
                .into_iter()
                .map(|(sequence, r)| pb::AuditRecord {
                    sequence,
                    time_ms: r.time_ms,
                    caller: r.caller,
                    method: r.method,
                    target: r.target,
                    code: r.code,
                    message: r.message,
                    replica: r.replica,
                    request_id: r.request_id,
                })
                .collect(),
            last_sequence,
        }))
    }

    async fn step_down(&self, request: Request<pb::StepDownRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        // A little inside the caller's deadline, so the answer (even a timeout) reaches it.
        let timeout =
            client_deadline(&request).map_or(STEP_DOWN_TIMEOUT, |d| d.saturating_sub(Duration::from_millis(200)));
        self.replica.step_down(timeout).await?;
        Ok(Response::new(self.status()))
    }

    async fn backup(&self, request: Request<pb::BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        self.replica.require_leader()?;
        // Everything committed before the call is in the backup.
        self.replica.read_barrier(client_deadline(&request)).await?;
        let state = self.replica.state.clone();
        let backup = tokio::task::spawn_blocking(move || state.backup())
            .await
            .map_err(|e| Status::internal(format!("backup: {e}")))??;
        let total_bytes = backup.data.len() as u64;
        let cluster_id = self.replica.state.cluster_id().unwrap_or_default();
        tracing::info!(applied_index = backup.applied_index, bytes = total_bytes, "backup taken");
        let mut chunks: Vec<pb::BackupChunk> = backup
            .data
            .chunks(BACKUP_CHUNK_BYTES)
            .map(|c| pb::BackupChunk { data: c.to_vec(), ..Default::default() })
            .collect();
        if chunks.is_empty() {
            chunks.push(pb::BackupChunk::default());
        }
        chunks[0].cluster_id = cluster_id;
        chunks[0].applied_index = backup.applied_index;
        chunks[0].total_bytes = total_bytes;
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks.into_iter().map(Ok)))))
    }

    async fn restore(
        &self,
        request: Request<Streaming<pb::RestoreChunk>>,
    ) -> Result<Response<pb::RestoreResult>, Status> {
        self.replica.require_leader()?;
        let mut stream = request.into_inner();
        let mut data = Vec::new();
        let mut force = None;
        // A client that stops sending does not hold the buffer: each chunk must come within a bound.
        while let Some(chunk) = tokio::time::timeout(RESTORE_CHUNK_WAIT, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("no restore chunk within {RESTORE_CHUNK_WAIT:?}")))??
        {
            force.get_or_insert(chunk.force);
            if data.len() + chunk.data.len() > MAX_RESTORE_BYTES {
                return Err(
                    Error::invalid("data", format!("the backup is larger than {MAX_RESTORE_BYTES} bytes")).into()
                );
            }
            data.extend_from_slice(&chunk.data);
        }
        let families = crate::store::decode_backup(&data)?;
        drop(data);
        let restore_id = uuid::Uuid::new_v4().to_string();
        tracing::warn!(%restore_id, records = families.iter().map(|(_, r)| r.len()).sum::<usize>(), "restore: replacing the cluster's state with a backup");
        self.restore_step(Command::RestoreBegin { restore_id: restore_id.clone(), force: force.unwrap_or(false) })
            .await?;
        let mut result = restore_result(&families);
        let mut entries = 1;
        for (family, records) in families {
            let count = records.len();
            let mut batch = Vec::new();
            let mut bytes = 0;
            // Moved, not copied, into the entries: the backup is held once.
            for (i, (k, v)) in records.into_iter().enumerate() {
                bytes += k.len() + v.len();
                batch.push((k, v));
                if bytes >= RESTORE_ENTRY_BYTES || i + 1 == count {
                    let records = std::mem::take(&mut batch);
                    bytes = 0;
                    self.restore_step(Command::RestoreRecords {
                        restore_id: restore_id.clone(),
                        family: family.clone(),
                        records,
                    })
                    .await?;
                    entries += 1;
                }
            }
        }
        self.restore_step(Command::RestoreEnd { restore_id: restore_id.clone() }).await?;
        entries += 1;
        result.entries = entries;
        tracing::warn!(%restore_id, jobs = result.jobs, tasks = result.tasks, entries, "restore: done");
        Ok(Response::new(result))
    }

    async fn get_cluster_status(
        &self,
        _request: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn add_member(&self, request: Request<pb::AddMemberRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let timeout = client_deadline(&request).unwrap_or(MEMBERSHIP_TIMEOUT);
        crate::auth::note_target(&request, format!("replica {}", request.get_ref().node_id));
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
        // A replica of a release that cannot read what this cluster writes would fail on its
        // first AppendEntries: refused here, saying why. (One that does not answer yet is added
        // as before: adding a learner waits for it.)
        let writes = self.replica.state.codec_version();
        if let Ok(r) = self.replica.peers.identify(&req.peer_addr, Duration::from_secs(2)).await {
            if r.reads_codec_up_to.max(1) < u32::from(writes) {
                return Err(Status::failed_precondition(format!(
                    "replica {} at {} reads records up to codec version {}, and this cluster writes version {writes}: upgrade it to this release first",
                    req.node_id,
                    req.peer_addr,
                    r.reads_codec_up_to.max(1)
                )));
            }
        }
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
        let id = request.get_ref().node_id;
        crate::auth::note_target(&request, format!("replica {id}"));
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
