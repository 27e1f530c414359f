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
use crate::command::{Command, CommandResponse};
use crate::config::{AwsConfig, JobsConfig};
use crate::events::Change;
use crate::jobs::lifecycle;
use crate::model::task::TaskState;
use crate::replica::Replica;

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
    /// Dropping it (or sending `true`) stops every duty of the current term.
    stop: Option<watch::Sender<bool>>,
    tasks: JoinSet<()>,
}

impl LeaderDuties {
    /// Watches Raft's role until `shutdown` fires, starting and stopping the duties as it changes.
    pub async fn run(
        replica: Arc<Replica>,
        jobs: JobsConfig,
        agents: Arc<AgentHub>,
        cloud: Option<Cloud>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut duties =
            LeaderDuties { replica: replica.clone(), jobs, agents, cloud, stop: None, tasks: JoinSet::new() };
        let mut metrics = replica.raft.metrics();
        loop {
            let leading = metrics.borrow_and_update().state == ServerState::Leader;
            match (leading, duties.stop.is_some()) {
                (true, false) => duties.on_become_leader(),
                (false, true) => duties.on_lose_leadership().await,
                _ => {}
            }
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { break },
                _ = shutdown.changed() => break,
            }
        }
        duties.on_lose_leadership().await;
    }

    fn on_become_leader(&mut self) {
        tracing::info!(node_id = self.replica.id, "became leader: starting leader duties");
        let (tx, rx) = watch::channel(false);
        self.stop = Some(tx);
        self.tasks.spawn(ensure_cluster_id(self.replica.clone(), rx.clone()));
        self.tasks.spawn(task_lifecycle(self.replica.clone(), self.jobs.clone(), rx.clone()));
        self.agents.on_become_leader();
        self.tasks.spawn(agents::dispatch(self.agents.clone(), rx.clone()));
        self.tasks.spawn(agents::report_batches(self.agents.clone(), rx.clone()));
        self.tasks.spawn(crate::scheduling::run(
            self.agents.clone(),
            self.agents.scheduling.clone(),
            self.agents.scheduler.clone(),
            rx.clone(),
        ));
        if let Some(cloud) = &self.cloud {
            self.tasks.spawn(crate::loadbalancer::duty::run(
                self.replica.clone(),
                cloud.aws.clone(),
                cloud.config.clone(),
                rx.clone(),
            ));
            self.tasks.spawn(crate::capacity::duty::run(
                self.replica.clone(),
                cloud.aws.clone(),
                cloud.config.clone(),
                rx.clone(),
            ));
        }
        self.tasks.spawn(agents::liveness(self.agents.clone(), rx));
    }

    async fn on_lose_leadership(&mut self) {
        if let Some(stop) = self.stop.take() {
            tracing::info!(node_id = self.replica.id, "no longer leader: stopping leader duties");
            let _ = stop.send(true);
            self.agents.on_lose_leadership();
            while self.tasks.join_next().await.is_some() {}
        }
    }
}

/// The first leader of a cluster names it; the id is replicated and checked on every peer message.
async fn ensure_cluster_id(replica: Arc<Replica>, mut stop: watch::Receiver<bool>) {
    while replica.state.cluster_id().is_none() {
        let cluster_id = uuid::Uuid::new_v4().to_string();
        let propose = replica.propose(Command::SetClusterId { cluster_id }, None);
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

/// Waits for the next round of a reconciling duty: a committed change (after at least `min_gap`,
/// so bursts coalesce) or `period`, whichever comes first. False when leadership ends.
pub(crate) async fn next_round(
    period: Duration,
    min_gap: Duration,
    changes: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<crate::events::ChangeBatch>>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    if !pause(min_gap, stop).await {
        return false;
    }
    let deadline = tokio::time::sleep(period.saturating_sub(min_gap));
    tokio::select! {
        _ = deadline => true,
        _ = changes.recv() => {
            // Drain what else arrived: one round covers them all.
            while changes.try_recv().is_ok() {}
            true
        }
        _ = stop.changed() => false,
    }
}

/// Waits `period`, or returns false when leadership ends first.
async fn pause(period: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => true,
        _ = stop.changed() => false,
    }
}

/// Keeps every job's tasks as its descriptor wants them: the planner decides from replicated state
/// (see `jobs::lifecycle`), this loop proposes. Also purges the archive past retention and expired
/// idempotency tokens.
async fn task_lifecycle(replica: Arc<Replica>, config: JobsConfig, mut stop: watch::Receiver<bool>) {
    let cfg = config.lifecycle();
    let period = Duration::from_millis(config.lifecycle_interval_ms);
    let retention_ms = config.archive_retention_hours as i64 * 3600 * 1000;
    // Retention runs about once a minute, however often rounds run (they follow every change).
    let mut next_purge = std::time::Instant::now();
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
        let now = crate::api::now_ms();
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
            next_purge = std::time::Instant::now() + Duration::from_secs(60);
            let jobs = replica.state.archived_jobs_finished_before(now - retention_ms, 1000).unwrap_or_default();
            let tokens = replica.state.expired_tokens(now, 1000).unwrap_or_default();
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
                result = replica.propose(command, None) => match result {
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
