//! The write and read paths every API call goes through, on whichever replica the caller reached.
//!
//! A write is proposed locally when this replica leads and forwarded to the leader otherwise, so a
//! client never needs to know who leads. A linearizable read first obtains a read index — from the
//! local Raft when leading, from the leader otherwise — and waits until this replica has applied up
//! to it. Every path is bounded by the request deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::ServerState;

use crate::codec;
use crate::command::{Command, CommandResponse, Rejection, RejectionKind};
use crate::error::{Error, Result};
use crate::network::{ForwardError, PeerCallError, PeerChannels};
use crate::raft_types::{Node, NodeId, Raft};
use crate::store::StateReader;

pub struct Replica {
    pub id: NodeId,
    pub raft: Raft,
    pub state: StateReader,
    pub peers: PeerChannels,
    /// Upper bound of any request's wait for commit, leader election or read index.
    pub request_timeout: Duration,
    /// Set while this leader hands leadership over (see [`Replica::step_down`]); shared with the
    /// peer service, which refuses forwarded writes and reads meanwhile.
    pub stepping_down: Arc<AtomicBool>,
}

/// The term in which this replica's leader duties were started. Their writes and their side effects
/// outside the cluster are fenced by it: a duty of an older term can neither commit a command nor
/// call AWS (openraft 0.9 leaders do not step down by themselves when cut off, and a deposed
/// leader's write forwarded to the new leader would commit a decision made from a stale view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term(pub u64);

/// The largest one log entry may be, encoded: half a peer message, so that an AppendEntries
/// carrying it (and a snapshot chunk beside it) always fits. An entry that could not be sent would
/// stop replication for good. What callers send is bounded well below (requests, jobs); this bounds
/// every command, the leader duties' batches included.
pub const MAX_ENTRY_BYTES: usize = crate::network::MAX_PEER_MESSAGE_BYTES / 2;

/// Refuses a command that would not read back from the log exactly as written (a NaN or infinite
/// number, which JSON writes as `null`): appended, it would make every replica fail to read its own
/// log, the retried command would take down the next leader too, and no replica could restart. And
/// one over [`MAX_ENTRY_BYTES`], which no follower could receive.
/// Every value is validated at its port as well; this is the last line, before anything is appended.
pub fn check_loggable(command: &Command) -> Result<()> {
    check_loggable_within(command, MAX_ENTRY_BYTES)
}

fn check_loggable_within(command: &Command, max: usize) -> Result<()> {
    let refused = |e: Error| {
        crate::telemetry::metrics().proposals_refused_total.inc(&[command.kind()]);
        tracing::warn!(kind = command.kind(), error = %e, "refused a command before proposing it");
        e
    };
    let bytes = codec::encode_verified(command)
        .map_err(|source| refused(Error::Unloggable { kind: command.kind(), source }))?
        .len();
    if bytes > max {
        return Err(refused(Error::EntryTooLarge { kind: command.kind(), bytes, max }));
    }
    Ok(())
}

/// The next thing to try when this replica could not serve a request itself.
enum Route {
    Leader(Node),
    WaitForLeader,
}

/// Turns heartbeats and elections back on and ends a step-down when dropped.
struct StepDownGuard<'a> {
    replica: &'a Replica,
}

impl Drop for StepDownGuard<'_> {
    fn drop(&mut self) {
        let runtime = self.replica.raft.runtime_config();
        runtime.heartbeat(true);
        runtime.elect(true);
        self.replica.stepping_down.store(false, Ordering::Release);
    }
}

impl Replica {
    fn deadline(&self, client_deadline: Option<Duration>) -> Instant {
        Instant::now() + client_deadline.map_or(self.request_timeout, |d| d.min(self.request_timeout))
    }

    fn route(&self, leader_id: Option<NodeId>, leader: Option<Node>) -> Route {
        match (leader_id, leader) {
            (Some(id), Some(node)) if id != self.id => Route::Leader(node),
            _ => Route::WaitForLeader,
        }
    }

    /// Waits (at most until `deadline`) for the cluster to know a leader again.
    async fn wait_for_leader(&self, deadline: Instant) -> Result<()> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut rx = self.raft.metrics();
        let wait = async {
            // A short pause first: the leader we just saw may be being replaced.
            tokio::time::sleep(Duration::from_millis(20)).await;
            loop {
                if rx.borrow_and_update().current_leader.is_some() {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(remaining, wait).await.map_err(|_| Error::NoLeader { node_id: self.id })
    }

    /// Commits `command` through Raft and returns what applying it produced.
    pub async fn propose(&self, command: Command, client_deadline: Option<Duration>) -> Result<CommandResponse> {
        check_loggable(&command)?;
        let deadline = self.deadline(client_deadline);
        let timeout_ms = deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
        let what = command.kind();
        tokio::time::timeout_at(deadline.into(), self.propose_until(command, deadline))
            .await
            .map_err(|_| Error::Timeout { what: what.to_string(), timeout_ms })?
    }

    async fn propose_until(&self, command: Command, deadline: Instant) -> Result<CommandResponse> {
        loop {
            // A leader stepping down writes nothing: every entry would renew its followers' lease
            // and hold the election off. The call waits for the next leader instead.
            if self.is_stepping_down() {
                self.wait_for_leader(deadline).await?;
                continue;
            }
            // Proposed here only if this replica leads: its clock decides (see `Command::restamp`).
            let mut stamped = command.clone();
            stamped.restamp(crate::clock::now_ms());
            let route = match self.raft.client_write(stamped).await {
                Ok(r) => return Ok(r.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    self.route(f.leader_id, f.leader_node)
                }
                Err(RaftError::Fatal(_)) => return Err(Error::ShuttingDown { node_id: self.id }),
                Err(e) => return Err(Error::Raft(e.to_string())),
            };
            match route {
                Route::WaitForLeader => self.wait_for_leader(deadline).await?,
                Route::Leader(leader) => {
                    let ttl = deadline.saturating_duration_since(Instant::now());
                    match self.peers.forward_propose(&leader, &command, ttl).await {
                        Ok(Ok(response)) => return Ok(response),
                        // The leader refused before proposing: safe to try again.
                        Ok(Err(ForwardError::NotLeader { .. })) => self.wait_for_leader(deadline).await?,
                        Ok(Err(ForwardError::Other(m))) => return Err(Error::Raft(m)),
                        // Unknown outcome: the write may have been committed. Say so and let the
                        // client retry with its idempotency token.
                        Err(PeerCallError::Unreachable(m) | PeerCallError::Timeout(m) | PeerCallError::Other(m)) => {
                            return Err(Error::Peer { peer: leader.peer_addr, message: m })
                        }
                    }
                }
            }
        }
    }

    /// Whether this replica leads in `term`, by its own view (not confirmed by a quorum: see
    /// [`Replica::confirm_leader`]).
    pub fn leads_in(&self, term: Term) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_term == term.0
    }

    /// The error a duty of `term` gets once this replica no longer leads in it.
    fn deposed(&self, term: Term, what: &'static str) -> Error {
        crate::telemetry::metrics().duties_fenced_total.inc(&[what]);
        Error::Deposed { node_id: self.id, term: term.0 }
    }

    /// Commits `command` for a leader duty of `term`: proposed only while this replica leads in
    /// that term, and never forwarded — a deposed leader's duty must not have its decisions
    /// committed by the new leader. Nothing is proposed while this leader steps down (an entry
    /// would renew its followers' lease). Bounded by the request timeout.
    pub async fn propose_as_leader(&self, term: Term, command: Command) -> Result<CommandResponse> {
        check_loggable(&command)?;
        if !self.leads_in(term) {
            return Err(self.deposed(term, "write"));
        }
        if self.is_stepping_down() {
            return Err(Error::SteppingDown { node_id: self.id });
        }
        let timeout_ms = self.request_timeout.as_millis() as u64;
        let what = command.kind();
        match tokio::time::timeout(self.request_timeout, self.raft.client_write(command)).await {
            Ok(Ok(r)) => Ok(r.data),
            // Refused before it was appended: this replica is no longer the leader.
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(self.deposed(term, "write")),
            Ok(Err(RaftError::Fatal(_))) => Err(Error::ShuttingDown { node_id: self.id }),
            Ok(Err(e)) => Err(Error::Raft(e.to_string())),
            // Unknown outcome: it may still commit (in `term`, by this replica's log) or be dropped.
            Err(_) => Err(Error::Timeout { what: what.to_string(), timeout_ms }),
        }
    }

    /// Asks a majority whether this replica still leads in `term`: heartbeats acknowledged by a
    /// quorum in this term (openraft's read-index round, without waiting for apply). Answers the
    /// read index — at least this term's first entry — and how long the round took.
    async fn ask_majority(&self, term: Term) -> Result<(Option<u64>, Duration)> {
        if !self.leads_in(term) {
            return Err(self.deposed(term, "confirm"));
        }
        // A read-index round is a heartbeat round, which would renew the followers' lease.
        if self.is_stepping_down() {
            return Err(Error::SteppingDown { node_id: self.id });
        }
        // A round that a majority answers takes a heartbeat's time; one that hangs is as good as
        // an answer of no.
        let wait = Duration::from_millis(self.raft.config().election_timeout_max);
        let started = Instant::now();
        match tokio::time::timeout(wait, self.raft.get_read_log_id()).await {
            Ok(Ok((read_index, _))) if self.leads_in(term) => Ok((read_index.map(|l| l.index), started.elapsed())),
            Ok(Ok(_)) | Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => {
                Err(self.deposed(term, "confirm"))
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                Err(Error::Unconfirmed { node_id: self.id, term: term.0, why: e.to_string() })
            }
            Ok(Err(RaftError::Fatal(_))) => Err(Error::ShuttingDown { node_id: self.id }),
            Err(_) => Err(Error::Unconfirmed {
                node_id: self.id,
                term: term.0,
                why: format!("no majority answered within {} ms", wait.as_millis()),
            }),
        }
    }

    /// Whether a majority still follows this replica in `term`, asked now (see
    /// [`Replica::confirm_leader`] for the check before a side effect).
    pub async fn holds_majority(&self, term: Term) -> Result<()> {
        self.ask_majority(term).await.map(|_| ())
    }

    /// Confirms with a majority, just now, that this replica still leads in `term`: called right
    /// before each side effect outside the cluster, such as an AWS call. Followers vote for no one
    /// else for an election timeout after acknowledging this leader, so a confirmation is only as
    /// good as it is quick: one that took longer (this process stalled, say, while a new leader
    /// was elected) proves nothing about now, and is refused. Answers the read index.
    pub async fn confirm_leader(&self, term: Term) -> Result<Option<u64>> {
        let (read_index, took) = self.ask_majority(term).await?;
        let trusted_for = Duration::from_millis(self.raft.config().election_timeout_min);
        if took >= trusted_for {
            return Err(Error::Unconfirmed {
                node_id: self.id,
                term: term.0,
                why: format!("the confirmation took {} ms, too long to be trusted", took.as_millis()),
            });
        }
        Ok(read_index)
    }

    /// Asks a majority whether this replica leads in `term`, then waits until it has applied up to
    /// the read index — this term's first entry included — so that what duties read is complete.
    pub async fn confirm_leader_and_catch_up(&self, term: Term) -> Result<()> {
        let (read_index, _) = self.ask_majority(term).await?;
        let wait = self.request_timeout;
        self.raft.wait(Some(wait)).applied_index_at_least(read_index, "leader catch-up").await.map_err(|_| {
            Error::Timeout {
                what: "applying up to this term's first entry".into(),
                timeout_ms: wait.as_millis() as u64,
            }
        })?;
        Ok(())
    }

    /// Returns once every write committed before this call is applied on this replica.
    pub async fn read_barrier(&self, client_deadline: Option<Duration>) -> Result<()> {
        let deadline = self.deadline(client_deadline);
        let timeout_ms = deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
        tokio::time::timeout_at(deadline.into(), self.read_barrier_until(deadline))
            .await
            .map_err(|_| Error::Timeout { what: "read index".into(), timeout_ms })?
    }

    async fn read_barrier_until(&self, deadline: Instant) -> Result<()> {
        loop {
            // A read index is confirmed by a heartbeat round, which would renew the lease too.
            if self.is_stepping_down() {
                self.wait_for_leader(deadline).await?;
                continue;
            }
            let route = match self.raft.ensure_linearizable().await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    self.route(f.leader_id, f.leader_node)
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                    tracing::debug!(error = %e, "read index: no quorum yet");
                    Route::WaitForLeader
                }
                Err(RaftError::Fatal(_)) => return Err(Error::ShuttingDown { node_id: self.id }),
            };
            match route {
                Route::WaitForLeader => self.wait_for_leader(deadline).await?,
                Route::Leader(leader) => {
                    let ttl = deadline.saturating_duration_since(Instant::now());
                    match self.peers.forward_read_index(&leader, ttl).await {
                        Ok(Ok(read_index)) => {
                            let Some(index) = read_index.map(|l| l.index) else {
                                return Ok(());
                            };
                            let remaining = deadline.saturating_duration_since(Instant::now());
                            self.raft
                                .wait(Some(remaining))
                                .applied_index_at_least(Some(index), "read index")
                                .await
                                .map_err(|_| Error::Timeout {
                                    what: "applying up to the read index".into(),
                                    timeout_ms: remaining.as_millis() as u64,
                                })?;
                            return Ok(());
                        }
                        Ok(Err(ForwardError::NotLeader { .. })) => self.wait_for_leader(deadline).await?,
                        Ok(Err(ForwardError::Other(m))) => return Err(Error::Raft(m)),
                        Err(e) => return Err(Error::Peer { peer: leader.peer_addr, message: e.to_string() }),
                    }
                }
            }
        }
    }

    pub fn is_stepping_down(&self) -> bool {
        self.stepping_down.load(Ordering::Acquire)
    }

    /// Hands leadership to another voter: this leader stops heartbeats, writes and read-index
    /// rounds, and does not stand for election, so the followers' leases run out and one of them
    /// is elected (openraft 0.9 has no leadership transfer; a follower will not vote while its
    /// leader's lease holds). Returns the new leader's id, or an error after `timeout` — then this
    /// replica carries on leading. Requests meanwhile wait (bounded by their deadlines) and go to
    /// the new leader.
    pub async fn step_down(&self, timeout: Duration) -> Result<NodeId> {
        self.require_leader()?;
        let voters = self.raft.metrics().borrow().membership_config.membership().voter_ids().count();
        let refuse = |field: &str, message: String| {
            Error::Rejected(Rejection::new(RejectionKind::FailedPrecondition, field, message))
        };
        if voters < 2 {
            return Err(refuse("members", format!("replica {} is the only voter: no one can take over", self.id)));
        }
        if self.stepping_down.swap(true, Ordering::AcqRel) {
            return Err(refuse("leader", format!("replica {} is already stepping down", self.id)));
        }
        // Undone however this ends — also when the caller stops waiting and this future is dropped.
        let _restore = StepDownGuard { replica: self };
        let runtime = self.raft.runtime_config();
        runtime.heartbeat(false);
        runtime.elect(false);
        tracing::info!(
            node_id = self.id,
            timeout_ms = timeout.as_millis() as u64,
            "stepping down: waiting for another replica to be elected"
        );
        let started = Instant::now();
        let mut rx = self.raft.metrics();
        let me = self.id;
        let outcome = tokio::time::timeout(timeout, async {
            // Once the followers' leases have run out (the lease is the longest election timeout),
            // the most caught-up follower is asked to stand at once rather than on its timer.
            let lease = Duration::from_millis(self.raft.config().election_timeout_max);
            let nudge = async {
                tokio::time::sleep(lease + Duration::from_millis(20)).await;
                self.nudge_successor().await;
                std::future::pending::<()>().await
            };
            tokio::pin!(nudge);
            loop {
                tokio::select! {
                    _ = &mut nudge => {}
                    changed = rx.changed() => if changed.is_err() { return None },
                }
                if let Some(leader) = rx.borrow_and_update().current_leader.filter(|l| *l != me) {
                    return Some(leader);
                }
            }
        })
        .await;
        drop(_restore);
        match outcome {
            Ok(Some(leader)) => {
                tracing::info!(
                    node_id = self.id,
                    new_leader = leader,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "stepped down"
                );
                Ok(leader)
            }
            Ok(None) => Err(Error::ShuttingDown { node_id: self.id }),
            Err(_) => {
                tracing::warn!(node_id = self.id, "step-down: no other replica was elected in time; still leading");
                Err(Error::Timeout { what: "electing another leader".into(), timeout_ms: timeout.as_millis() as u64 })
            }
        }
    }

    /// Asks the voter with the most of the log replicated to stand for election (best effort: the
    /// followers' own election timers are the fallback).
    async fn nudge_successor(&self) {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let best = m
            .replication
            .iter()
            .flatten()
            .filter(|(id, _)| **id != self.id && voters.contains(id))
            .max_by_key(|(_, matched)| **matched)
            .map(|(id, _)| *id);
        let Some(node) = best.and_then(|id| membership.get_node(&id)) else { return };
        match self.peers.campaign(node, Duration::from_millis(500)).await {
            Ok(Ok(())) => tracing::info!(successor = ?best, "step-down: asked the most caught-up follower to stand"),
            Ok(Err(e)) => tracing::info!(successor = ?best, error = %e, "step-down: the follower could not stand"),
            Err(e) => tracing::info!(successor = ?best, error = %e, "step-down: the follower did not answer"),
        }
    }

    /// The leader's id and api address as this replica knows them.
    pub fn leader(&self) -> (Option<NodeId>, Option<String>) {
        let m = self.raft.metrics().borrow().clone();
        let addr =
            m.current_leader.and_then(|id| m.membership_config.membership().get_node(&id).map(|n| n.api_addr.clone()));
        (m.current_leader, addr)
    }

    /// Ok on the leader; otherwise the error that sends the caller there (membership changes and
    /// agent reads are the leader's alone).
    pub fn require_leader(&self) -> Result<()> {
        if self.raft.metrics().borrow().state == openraft::ServerState::Leader {
            Ok(())
        } else {
            Err(self.not_leader())
        }
    }

    /// An error that sends the caller to the leader (membership changes run on the leader only).
    pub fn not_leader(&self) -> Error {
        let (leader_id, leader_api_addr) = self.leader();
        match leader_id {
            Some(_) => Error::NotLeader { node_id: self.id, leader_id, leader_api_addr },
            None => Error::NoLeader { node_id: self.id },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_over_the_entry_bound_is_refused_before_it_is_proposed() {
        let command = Command::PurgeArchive { job_ids: vec!["j".repeat(1000)], tokens: Vec::new() };
        check_loggable_within(&command, 4096).expect("within the bound");
        match check_loggable_within(&command, 512) {
            Err(Error::EntryTooLarge { kind, bytes, max }) => {
                assert_eq!((kind, max), (command.kind(), 512));
                assert!(bytes > 1000, "{bytes}");
            }
            other => panic!("expected EntryTooLarge, got {other:?}"),
        }
        assert!(MAX_ENTRY_BYTES >= 4 * crate::config::LimitsConfig::default().max_request_bytes);
    }
}
