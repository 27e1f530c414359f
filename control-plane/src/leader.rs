//! Leader-only work: started when this replica becomes leader, stopped when it stops being leader.
//!
//! One entry point ([`LeaderDuties::on_become_leader`]) and one exit ([`LeaderDuties::on_lose_leadership`]).
//! Every duty reads replicated state and proposes commands, so a new leader continues where the
//! old one stopped, and a duty that runs twice does no harm.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;

use crate::agents::{self, AgentHub};
use crate::codec;
use crate::command::{Command, CommandResponse};
use crate::config::{AwsConfig, JobsConfig};
use crate::events::Change;
use crate::jobs::lifecycle;
use crate::model::task::TaskState;
use crate::replica::{Replica, Term};
use crate::rounds::pause;

/// AWS, when configured: the client and its settings.
#[derive(Clone)]
pub struct Cloud {
    pub aws: titus_aws::Aws,
    pub config: AwsConfig,
}

pub struct LeaderDuties {
    replica: Arc<Replica>,
    jobs: JobsConfig,
    agents: Arc<AgentHub>,
    cloud: Option<Cloud>,
    /// The duties of the term this replica leads in, while they run.
    running: Option<Running>,
    tasks: JoinSet<()>,
}

/// The running duties of one term.
struct Running {
    term: Term,
    /// Dropping it, or sending `true`, stops every duty of the term.
    stop: watch::Sender<bool>,
    /// Says when the duties' leadership could not be confirmed by a majority for an election
    /// timeout, or this leader steps down (see [`hold_lease`]).
    quorum_lost: tokio::sync::oneshot::Receiver<()>,
}

impl LeaderDuties {
    /// Watches Raft's role until `shutdown` fires, starting and stopping the duties as it changes.
    ///
    /// Duties start only once a majority has confirmed this replica's leadership in the current
    /// term (a restarted replica's persisted vote can make it think it leads for a moment), and
    /// stop when it stops leading — or when it cannot confirm its leadership for an election
    /// timeout: openraft 0.9 keeps a cut-off leader a leader, and its duties must not act.
    pub async fn run(
        replica: Arc<Replica>,
        jobs: JobsConfig,
        agents: Arc<AgentHub>,
        cloud: Option<Cloud>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut duties =
            LeaderDuties { replica: replica.clone(), jobs, agents, cloud, running: None, tasks: JoinSet::new() };
        let mut metrics = replica.raft.metrics();
        loop {
            let (leading, term) = {
                let m = metrics.borrow_and_update();
                (m.state == ServerState::Leader, Term(m.current_term))
            };
            match (leading, duties.running.as_ref().map(|r| r.term)) {
                (true, None) => {
                    if !duties.confirm_then_start(term, &mut shutdown).await {
                        break;
                    }
                }
                (true, Some(running)) if running != term => {
                    // Leading again, in a newer term: this term's duties start afresh, at once.
                    duties.on_lose_leadership("the term changed").await;
                    continue;
                }
                (false, Some(_)) => duties.on_lose_leadership("no longer leader").await,
                _ => {}
            }
            let quorum_lost = async {
                match duties.running.as_mut() {
                    Some(r) => {
                        let _ = (&mut r.quorum_lost).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { break },
                _ = shutdown.changed() => break,
                _ = quorum_lost => {
                    duties.on_lose_leadership("leadership no longer confirmed by a majority").await;
                    // Not leading in effect: wait a little before asking a majority again.
                    if !pause(Duration::from_millis(replica.raft.config().heartbeat_interval), &mut shutdown).await {
                        break;
                    }
                }
            }
        }
        duties.on_lose_leadership("shutting down").await;
    }

    /// Waits until a majority confirms this replica leads in `term`, then starts the duties. Gives
    /// up (without starting them) once it no longer leads in `term`; false when shutting down.
    async fn confirm_then_start(&mut self, term: Term, shutdown: &mut watch::Receiver<bool>) -> bool {
        let started = Instant::now();
        loop {
            if !self.replica.leads_in(term) {
                return true;
            }
            match self.replica.confirm_leader_and_catch_up(term).await {
                Ok(()) => {
                    tracing::info!(
                        node_id = self.replica.id,
                        term = term.0,
                        confirmed_after_ms = started.elapsed().as_millis() as u64,
                        "leadership confirmed by a majority"
                    );
                    self.on_become_leader(term);
                    return true;
                }
                Err(e) => {
                    tracing::debug!(node_id = self.replica.id, term = term.0, error = %e, "leadership not confirmed yet");
                    let retry = Duration::from_millis(self.replica.raft.config().heartbeat_interval);
                    if !pause(retry, shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    fn on_become_leader(&mut self, term: Term) {
        tracing::info!(node_id = self.replica.id, term = term.0, "became leader: starting leader duties");
        let (tx, rx) = watch::channel(false);
        let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
        self.running = Some(Running { term, stop: tx, quorum_lost: lost_rx });
        self.tasks.spawn(hold_lease(self.replica.clone(), term, lost_tx, rx.clone()));
        self.tasks.spawn(ensure_cluster_id(self.replica.clone(), term, rx.clone()));
        self.tasks.spawn(upgrade_codec(self.replica.clone(), term, rx.clone()));
        self.tasks.spawn(task_lifecycle(self.replica.clone(), term, self.jobs.clone(), rx.clone()));
        self.agents.on_become_leader(term);
        self.tasks.spawn(agents::dispatch(self.agents.clone(), rx.clone()));
        self.tasks.spawn(agents::report_batches(self.agents.clone(), term, rx.clone()));
        self.tasks.spawn(crate::scheduling::run(
            self.agents.clone(),
            term,
            self.agents.scheduling.clone(),
            self.agents.scheduler.clone(),
            rx.clone(),
        ));
        if let Some(cloud) = &self.cloud {
            self.tasks.spawn(crate::loadbalancer::duty::run(
                self.replica.clone(),
                term,
                cloud.aws.clone(),
                cloud.config.clone(),
                rx.clone(),
            ));
            self.tasks.spawn(crate::capacity::duty::run(
                self.replica.clone(),
                term,
                cloud.aws.clone(),
                cloud.config.clone(),
                rx.clone(),
            ));
        }
        self.tasks.spawn(agents::liveness(self.agents.clone(), term, rx));
    }

    async fn on_lose_leadership(&mut self, why: &str) {
        if let Some(Running { term, stop, .. }) = self.running.take() {
            tracing::info!(node_id = self.replica.id, term = term.0, why, "stopping leader duties");
            let _ = stop.send(true);
            self.agents.on_lose_leadership();
            while self.tasks.join_next().await.is_some() {}
        }
    }
}

/// Leader duty: asks a majority, every heartbeat interval, whether this replica still leads in
/// `term`, and says so on `lost` once it could not for an election timeout, or at once when this
/// leader steps down — then every duty stops and the agents' streams are dropped, so agents go to
/// whichever replica a majority follows.
async fn hold_lease(
    replica: Arc<Replica>,
    term: Term,
    lost: tokio::sync::oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) {
    let config = replica.raft.config();
    let every = Duration::from_millis(config.heartbeat_interval);
    let lease = Duration::from_millis(config.election_timeout_max);
    let mut confirmed = Instant::now();
    loop {
        if !pause(every, &mut stop).await {
            return;
        }
        let outcome = tokio::select! {
            r = replica.holds_majority(term) => r,
            _ = stop.changed() => return,
        };
        match outcome {
            Ok(()) => confirmed = Instant::now(),
            Err(e @ crate::Error::SteppingDown { .. }) => {
                tracing::info!(node_id = replica.id, term = term.0, error = %e, "stepping down: stopping leader duties");
                let _ = lost.send(());
                return;
            }
            Err(e) if confirmed.elapsed() >= lease => {
                tracing::warn!(
                    node_id = replica.id,
                    term = term.0,
                    unconfirmed_ms = confirmed.elapsed().as_millis() as u64,
                    error = %e,
                    "no majority confirmed this leader for an election timeout: stopping leader duties"
                );
                let _ = lost.send(());
                return;
            }
            Err(e) => {
                tracing::debug!(node_id = replica.id, term = term.0, error = %e, "leadership not confirmed this round")
            }
        }
    }
}

/// The first leader of a cluster names it; the id is replicated and checked on every peer message.
async fn ensure_cluster_id(replica: Arc<Replica>, term: Term, mut stop: watch::Receiver<bool>) {
    while replica.state.cluster_id().is_none() {
        let cluster_id = uuid::Uuid::new_v4().to_string();
        let propose = replica.propose_as_leader(term, Command::SetClusterId { cluster_id });
        tokio::select! {
            result = propose => match result {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not record the cluster id; retrying");
                    if !pause(Duration::from_millis(200), &mut stop).await {
                        return;
                    }
                }
            },
            _ = stop.changed() => return,
        }
    }
}

/// Moves the cluster to the newest codec version once every member reads it (see `codec`): during
/// a rolling upgrade the members still on the previous release keep it at version 1, and the
/// first leader that finds every member on this release commits the switch.
async fn upgrade_codec(replica: Arc<Replica>, term: Term, mut stop: watch::Receiver<bool>) {
    const EVERY: Duration = Duration::from_secs(5);
    while replica.state.codec_version() < codec::CURRENT_VERSION {
        let members: Vec<(u64, String)> = {
            let m = replica.raft.metrics();
            let m = m.borrow();
            m.membership_config.membership().nodes().map(|(id, n)| (*id, n.peer_addr.clone())).collect()
        };
        let mut behind = Vec::new();
        for (id, addr) in members.iter().filter(|(id, _)| *id != replica.id) {
            // 0: a release before the field, which reads version 1 only.
            match replica.peers.identify(addr, Duration::from_secs(2)).await {
                Ok(r) if r.reads_codec_up_to >= u32::from(codec::CURRENT_VERSION) => {}
                Ok(r) => behind.push(format!("replica {id} reads up to version {}", r.reads_codec_up_to.max(1))),
                Err(e) => behind.push(format!("replica {id}: {e}")),
            }
        }
        if behind.is_empty() {
            let version = codec::CURRENT_VERSION;
            match replica.propose_as_leader(term, Command::SetCodecVersion { version }).await {
                Ok(_) => tracing::info!(
                    version,
                    "every member reads the newest codec version: the cluster writes it from now on"
                ),
                Err(e) => tracing::warn!(error = %e, "could not record the codec version; retrying"),
            }
        } else {
            tracing::debug!(?behind, "the cluster keeps writing codec version {}", replica.state.codec_version());
        }
        if replica.state.codec_version() >= codec::CURRENT_VERSION || !pause(EVERY, &mut stop).await {
            return;
        }
    }
}

/// Keeps every job's tasks as its descriptor wants them: the planner decides from replicated state
/// (see `jobs::lifecycle`), this loop proposes. Also purges the archive past retention and expired
/// idempotency tokens.
async fn task_lifecycle(replica: Arc<Replica>, term: Term, config: JobsConfig, mut stop: watch::Receiver<bool>) {
    let cfg = config.lifecycle();
    let period = Duration::from_millis(config.lifecycle_interval_ms);
    let retention_ms = i64::try_from(config.archive_retention_hours).unwrap_or(i64::MAX).saturating_mul(3600 * 1000);
    // Retention runs about once a minute, however often rounds run (they follow every change).
    let mut next_purge = std::time::Instant::now();
    // Where the next purge goes on looking for expired tokens (None: from the start).
    let mut token_cursor: Option<String> = None;
    // How soon a purge that left work goes on: 5,000 tokens a second at most.
    const PURGE_AGAIN: Duration = Duration::from_millis(200);
    let (_, mut changes) = replica.state.changes.subscribe(None);
    // A job is planned right after a change that concerns it, then again at most once a second
    // for RECENT (short retry back-offs come due); a full sweep of every job (stuck states, runtime
    // limits, long back-offs) runs every 2 s, or less often when a sweep is slow (10x its own
    // time), so a million tasks do not keep the leader re-reading them.
    const RECENT: Duration = Duration::from_secs(10);
    const REPLAN: Duration = Duration::from_secs(1);
    // job id → (last change, next planning)
    let mut recent: HashMap<String, (Instant, Instant)> = HashMap::new();
    let mut next_sweep = Instant::now();
    loop {
        let now = crate::clock::now_ms();
        let mut new_id = || uuid::Uuid::new_v4().to_string();
        let planned = if Instant::now() >= next_sweep {
            let t0 = Instant::now();
            let planned = lifecycle::plan(&replica.state, now, &cfg, &mut new_id);
            next_sweep = Instant::now() + Duration::from_secs(2).max(t0.elapsed() * 10);
            planned
        } else {
            let t = Instant::now();
            recent.retain(|_, (changed, _)| t.duration_since(*changed) < RECENT);
            let due: Vec<String> = recent
                .iter_mut()
                .filter(|(_, (_, next))| *next <= t)
                .map(|(id, (_, next))| {
                    *next = t + REPLAN;
                    id.clone()
                })
                .collect();
            lifecycle::plan_jobs(&replica.state, due.iter(), now, &cfg, &mut new_id)
        };
        let mut commands = match planned {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "lifecycle: cannot read state");
                Vec::new()
            }
        };
        if std::time::Instant::now() >= next_purge {
            const PURGE_BATCH: usize = 1000;
            let jobs = replica
                .state
                .archived_jobs_finished_before(now.saturating_sub(retention_ms), PURGE_BATCH)
                .unwrap_or_default();
            // Tokens are looked at a bounded slice at a time, going on where the last purge stopped:
            // no round pays for a scan of the whole table.
            const TOKENS_SCANNED: usize = 20_000;
            let (tokens, next) = replica
                .state
                .expired_tokens(now, token_cursor.as_deref(), PURGE_BATCH, TOKENS_SCANNED)
                .unwrap_or_default();
            // More to look at, or a full batch: the purge goes on shortly, so it keeps up with any
            // write rate (at most 1,000 a minute once let the token table grow for good).
            let more = next.is_some() || jobs.len() >= PURGE_BATCH || tokens.len() >= PURGE_BATCH;
            token_cursor = next;
            next_purge = std::time::Instant::now() + if more { PURGE_AGAIN } else { Duration::from_secs(60) };
            if !jobs.is_empty() || !tokens.is_empty() {
                commands.push(Command::PurgeArchive { job_ids: jobs, tokens });
            }
        }
        for command in commands {
            if *stop.borrow() {
                return;
            }
            let kind = command.kind();
            tokio::select! {
                result = replica.propose_as_leader(term, command) => match result {
                    Ok(CommandResponse::Rejected(r)) => tracing::debug!(kind, field = %r.field, message = %r.message, "lifecycle: command no longer applies"),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(kind, error = %e, "lifecycle: proposal failed; retrying next round");
                        break;
                    }
                },
                _ = stop.changed() => return,
            }
        }
        // The next round: after a change (coalesced over 20 ms) or `period`.
        if !pause(Duration::from_millis(20), &mut stop).await {
            return;
        }
        let first = tokio::select! {
            _ = tokio::time::sleep(period.saturating_sub(Duration::from_millis(20))) => None,
            batch = changes.recv() => Some(batch),
            _ = stop.changed() => return,
        };
        let mut batches = Vec::new();
        match first {
            Some(Ok(b)) => batches.push(b),
            Some(Err(broadcast::error::RecvError::Closed)) => return,
            // Missed changes: sweep everything.
            Some(Err(broadcast::error::RecvError::Lagged(_))) => next_sweep = Instant::now(),
            None => {}
        }
        loop {
            match changes.try_recv() {
                Ok(b) => batches.push(b),
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(broadcast::error::TryRecvError::Lagged(_)) => next_sweep = Instant::now(),
                Err(broadcast::error::TryRecvError::Closed) => return,
            }
        }
        for batch in batches {
            if batch.reset {
                next_sweep = Instant::now();
            }
            for change in &batch.changes {
                // What the lifecycle acts on: job changes and tasks being killed or finished
                // (replacements). New tasks are the lifecycle's own doing, and a task going
                // Launched → Started needs nothing of it.
                let job = match change {
                    Change::Job(j) => &j.id,
                    Change::Task(t) if matches!(t.state(), TaskState::KillInitiated | TaskState::Finished) => &t.job_id,
                    _ => continue,
                };
                let t = Instant::now();
                recent.insert(job.clone(), (t, t));
            }
        }
    }
}
