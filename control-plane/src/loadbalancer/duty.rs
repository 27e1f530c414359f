//! The leader duty that keeps target groups equal to the Started tasks of their jobs.
//!
//! Each round reads replicated state, plans (see [`super::plan`]) and acts, writing every target
//! ahead of its AWS call and after it: a new leader finds a call its predecessor may have made
//! (`Registering`, `Deregistering`) and makes it again — both calls are idempotent at AWS — so no
//! target is duplicated or orphaned by a leader change. Calls are batched per target group, spaced
//! by the client's rate limit and retried by the SDK; a group whose calls keep failing backs off
//! on its own, and a group that no longer exists is marked orphaned, visibly.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use titus_aws::{Aws, AwsError};

use super::plan::{self, by_group, Plan};
use crate::clock::now_ms;
use crate::command::{Command, CommandResponse};
use crate::config::AwsConfig;
use crate::model::load_balancer::{AssociationState, LbTarget, TargetState};
use crate::model::task::{Task, TaskState};
use crate::replica::{Replica, Term};
use crate::state::StateRead;

/// Per target group: when its next call may go, after failures.
#[derive(Default)]
struct Backoff {
    groups: HashMap<String, (Instant, Duration)>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    fn ready(&self, group: &str) -> bool {
        self.groups.get(group).is_none_or(|(at, _)| Instant::now() >= *at)
    }

    fn failed(&mut self, group: &str) {
        let next = self.groups.get(group).map_or(Self::FIRST, |(_, d)| (*d * 2).min(Self::MAX));
        self.groups.insert(group.to_string(), (Instant::now() + next, next));
    }

    fn succeeded(&mut self, group: &str) {
        self.groups.remove(group);
    }

    /// When the earliest backed-off group may be tried again.
    fn next_ready(&self) -> Option<Instant> {
        self.groups.values().map(|(at, _)| *at).min()
    }
}

struct Duty {
    replica: Arc<Replica>,
    /// The term this duty leads in: its writes and AWS calls are fenced by it.
    term: Term,
    aws: Aws,
    config: AwsConfig,
    backoff: Backoff,
    /// Killed tasks whose drain wait ran out: their kill was released once (see `release_overdue`).
    released: HashSet<String>,
}

/// How often the target groups of jobs being deployed are asked for their targets' health.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

pub async fn run(replica: Arc<Replica>, term: Term, aws: Aws, config: AwsConfig, mut stop: watch::Receiver<bool>) {
    let (_, mut changes) = replica.state.changes.subscribe(None);
    let reconcile_every = Duration::from_millis(config.reconcile_interval_ms);
    // The first reconcile runs soon after becoming leader: the predecessor may have left drift.
    let mut next_reconcile = Instant::now() + Duration::from_secs(1).min(reconcile_every);
    let mut next_health = Instant::now();
    let mut duty = Duty { replica, term, aws, config, backoff: Backoff::default(), released: HashSet::new() };
    loop {
        let mut wake = Instant::now() + reconcile_every;
        match duty.round().await {
            Ok(wake_at_ms) => {
                if let Some(at) = wake_at_ms {
                    let in_ms = (at - now_ms()).max(0) as u64;
                    wake = wake.min(Instant::now() + Duration::from_millis(in_ms));
                }
            }
            Err(e @ crate::Error::Deposed { .. }) => {
                tracing::info!(error = %e, "load balancers: no longer leading; stopping");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "load balancers: round failed; retrying"),
        }
        if Instant::now() >= next_health {
            next_health = Instant::now() + HEALTH_EVERY;
            if let Err(e) = duty.observe_health().await {
                tracing::warn!(error = %e, "load balancers: reading target health failed; retrying");
            }
        }
        wake = wake.min(next_health);
        if Instant::now() >= next_reconcile {
            next_reconcile = Instant::now() + reconcile_every;
            if let Err(e) = duty.reconcile().await {
                tracing::warn!(error = %e, "load balancers: reconcile failed; retrying next interval");
            }
        }
        wake = wake.min(next_reconcile);
        if let Some(at) = duty.backoff.next_ready() {
            wake = wake.min(at.max(Instant::now() + Duration::from_millis(20)));
        }
        let period = wake.saturating_duration_since(Instant::now()).max(Duration::from_millis(20));
        if !crate::rounds::next_round(period, Duration::from_millis(20), &mut changes, &mut stop).await {
            return;
        }
    }
}

/// The Registered records of `group` whose health differs from what the group said (`health`,
/// by target id), with the new health.
fn health_changes(records: &[LbTarget], group: &str, health: &HashMap<String, String>) -> Vec<LbTarget> {
    records
        .iter()
        .filter(|r| r.target_group == group && r.state == TargetState::Registered)
        .filter_map(|r| {
            let now = health.get(&r.ip).map_or("", String::as_str);
            (r.health != now).then(|| LbTarget { health: now.to_string(), ..r.clone() })
        })
        .collect()
}

impl Duty {
    fn state(&self) -> &crate::store::StateReader {
        &self.replica.state
    }

    /// Reads what the planner needs: associations, records, the tasks either names, live job ids.
    fn view(&self) -> crate::Result<(Plan, Vec<LbTarget>, HashMap<String, Task>)> {
        let state = self.state();
        let associations = state.load_balancers()?;
        let records = state.lb_targets()?;
        let mut live_jobs = BTreeSet::new();
        let mut tasks = HashMap::new();
        let job_ids: BTreeSet<&str> = associations.iter().map(|a| a.job_id.as_str()).collect();
        for job_id in job_ids {
            if state.job(job_id)?.is_some() {
                live_jobs.insert(job_id.to_string());
                for t in state.tasks_of_job(job_id)? {
                    tasks.insert(t.id.clone(), t);
                }
            }
        }
        for r in &records {
            if !tasks.contains_key(&r.task_id) {
                if let Some(t) = state.task(&r.task_id)? {
                    tasks.insert(t.id.clone(), t);
                }
            }
        }
        let now = now_ms();
        let plan = plan::plan(&associations, &records, &tasks, &live_jobs, now, self.config.drain_delay_ms as i64);
        Ok((plan, records, tasks))
    }

    async fn propose(&self, command: Command) -> crate::Result<CommandResponse> {
        let kind = command.kind();
        let r = self.replica.propose_as_leader(self.term, command).await?;
        if let CommandResponse::Rejected(r) = &r {
            tracing::debug!(kind, message = %r.message, "load balancers: command no longer applies");
        }
        Ok(r)
    }

    /// One pass of the plan; returns when the next drain ends.
    async fn round(&mut self) -> crate::Result<Option<i64>> {
        let (plan, records, tasks) = self.view()?;
        self.release_overdue(&records, &tasks).await?;
        if plan.is_empty() {
            return Ok(plan.wake_at_ms);
        }
        for lb in plan.remove {
            tracing::info!(job_id = %lb.job_id, target_group = %lb.target_group, "load balancers: job is gone; removing its association");
            self.propose(Command::RemoveLoadBalancer { job_id: lb.job_id, target_group: lb.target_group }).await?;
        }
        if !plan.forget.is_empty() {
            self.propose(Command::ForgetLbTargets { targets: plan.forget }).await?;
        }
        // Deregistrations first: a reused address is registered again only after it left.
        self.call(plan.deregister, TargetState::Deregistered).await?;
        self.call(plan.register, TargetState::Registered).await?;
        Ok(plan.wake_at_ms)
    }

    /// Writes `targets` ahead, calls AWS per target group, and writes the outcome `done` for each
    /// group that succeeded.
    async fn call(&mut self, targets: Vec<LbTarget>, done: TargetState) -> crate::Result<()> {
        let targets: Vec<LbTarget> = targets.into_iter().filter(|t| self.backoff.ready(&t.target_group)).collect();
        if targets.is_empty() {
            return Ok(());
        }
        let written: HashSet<String> = match self.propose(Command::PutLbTargets { targets: targets.clone() }).await? {
            CommandResponse::Keys(keys) => keys.into_iter().collect(),
            _ => HashSet::new(),
        };
        let mut outcome = Vec::new();
        for (group, of_group) in by_group(&targets) {
            let of_group: Vec<LbTarget> = of_group.into_iter().filter(|t| written.contains(&t.key())).collect();
            if of_group.is_empty() {
                continue;
            }
            let ips: Vec<String> = of_group.iter().map(|t| t.ip.clone()).collect::<BTreeSet<_>>().into_iter().collect();
            // Fenced: only while a majority still follows this leader in its term.
            self.replica.confirm_leader(self.term).await?;
            let (api, result) = if done == TargetState::Registered {
                ("RegisterTargets", self.aws.register_targets(&group, &ips).await)
            } else {
                ("DeregisterTargets", self.aws.deregister_targets(&group, &ips).await)
            };
            crate::telemetry::metrics().aws_calls_total.inc(&["lb", api, crate::telemetry::aws_outcome(&result)]);
            match result {
                Ok(()) => {
                    self.backoff.succeeded(&group);
                    // A call that works again clears an error shown on the association.
                    let shown = self
                        .state()
                        .load_balancers()?
                        .iter()
                        .any(|lb| lb.target_group == group && !lb.message.is_empty());
                    if shown {
                        self.note(&group, AssociationState::Active, String::new()).await?;
                    }
                    let at = now_ms();
                    tracing::info!(target_group = %group, targets = ?ips, state = ?done, "load balancer targets updated");
                    outcome.extend(of_group.into_iter().map(|t| LbTarget { state: done, updated_ms: at, ..t }));
                }
                Err(e) => self.failed(&group, e).await?,
            }
        }
        if !outcome.is_empty() {
            self.propose(Command::PutLbTargets { targets: outcome }).await?;
        }
        Ok(())
    }

    /// A transient error backs the group off; a permanent one orphans every association with it.
    async fn failed(&mut self, group: &str, e: AwsError) -> crate::Result<()> {
        self.backoff.failed(group);
        let (state, message) = match &e {
            AwsError::Transient(_) => {
                tracing::warn!(target_group = %group, error = %e, "load balancers: AWS call failed; backing off");
                return Ok(());
            }
            // The group is gone: nothing can be registered in it any more.
            AwsError::NotFound(_) => {
                tracing::error!(target_group = %group, error = %e, "load balancers: target group not found; marking the association orphaned");
                (AssociationState::Orphaned, e.to_string())
            }
            // Refused (credentials, permissions, an invalid target): possibly fixed by an operator,
            // so the association stays and keeps being retried with back-off; the error is shown.
            AwsError::Rejected(_) => {
                tracing::error!(target_group = %group, error = %e, "load balancers: AWS refused the call; retrying with back-off");
                (AssociationState::Active, format!("last error: {e}"))
            }
        };
        self.note(group, state, message).await
    }

    /// Sets every association with `group` to `state` and `message`, where they differ.
    async fn note(&self, group: &str, state: AssociationState, message: String) -> crate::Result<()> {
        for lb in self.state().load_balancers()? {
            if lb.target_group == group
                && lb.state == AssociationState::Active
                && (lb.state != state || lb.message != message)
            {
                self.propose(Command::SetLoadBalancerState {
                    job_id: lb.job_id,
                    target_group: lb.target_group,
                    state,
                    message: message.clone(),
                    timestamp_ms: now_ms(),
                })
                .await?;
            }
        }
        Ok(())
    }

    /// A killed task waits for its targets to drain, but not past `max_drain_wait_ms`: once over,
    /// rewriting its records (unchanged) wakes the agent dispatcher, which then sends the kill. The
    /// records stay, so the deregistration is still retried.
    async fn release_overdue(&mut self, records: &[LbTarget], tasks: &HashMap<String, Task>) -> crate::Result<()> {
        let now = now_ms();
        let max_wait = self.config.max_drain_wait_ms as i64;
        // Forget released tasks whose records are gone: the set stays as small as the records.
        let recorded: HashSet<&str> = records.iter().map(|r| r.task_id.as_str()).collect();
        self.released.retain(|id| recorded.contains(id.as_str()));
        let mut overdue = Vec::new();
        for r in records {
            let Some(t) = tasks.get(&r.task_id) else { continue };
            if t.state() == TaskState::KillInitiated
                && now - t.status.timestamp_ms >= max_wait
                && !self.released.contains(&t.id)
            {
                overdue.push(r.clone());
            }
        }
        if overdue.is_empty() {
            return Ok(());
        }
        for r in &overdue {
            tracing::warn!(task_id = %r.task_id, target_group = %r.target_group, "load balancers: drain wait exceeded; killing the task anyway, deregistration still retried");
            self.released.insert(r.task_id.clone());
        }
        self.propose(Command::PutLbTargets { targets: overdue }).await?;
        Ok(())
    }

    /// What `group` says of each of its targets (DescribeTargetHealth), by target id; None when
    /// the call failed (the group is backed off, and the failure noted).
    async fn target_health(&mut self, group: &str) -> crate::Result<Option<HashMap<String, String>>> {
        let listed = self.aws.target_health(group).await;
        let m = crate::telemetry::metrics();
        m.aws_calls_total.inc(&["lb", "DescribeTargetHealth", crate::telemetry::aws_outcome(&listed)]);
        match listed {
            Ok(h) => Ok(Some(h.into_iter().collect())),
            Err(e) => {
                self.failed(group, e).await?;
                Ok(None)
            }
        }
    }

    /// Records what the target groups of jobs being deployed say of their targets' health: a
    /// deployment counts a new task available only once every one of its targets is `healthy`
    /// (see `jobs::deployment`). Only those groups are asked, and a record is written only when its
    /// health changed.
    async fn observe_health(&mut self) -> crate::Result<()> {
        let state = self.state();
        let mut groups = BTreeSet::new();
        for a in state.load_balancers()? {
            if a.state == AssociationState::Active
                && state.job(&a.job_id)?.is_some_and(|j| j.rollout.active().is_some())
            {
                groups.insert(a.target_group);
            }
        }
        if groups.is_empty() {
            return Ok(());
        }
        let records = state.lb_targets()?;
        let mut changed = Vec::new();
        for group in groups {
            if !self.backoff.ready(&group) {
                continue;
            }
            let Some(health) = self.target_health(&group).await? else { continue };
            changed.extend(health_changes(&records, &group, &health));
        }
        if !changed.is_empty() {
            self.propose(Command::PutLbTargets { targets: changed }).await?;
        }
        Ok(())
    }

    /// Compares each group's targets (DescribeTargetHealth) with the records: registers what is
    /// missing, deregisters what this system registered and no longer wants, leaves the rest alone.
    async fn reconcile(&mut self) -> crate::Result<()> {
        let records = self.state().lb_targets()?;
        let mut health_changed = Vec::new();
        let groups: BTreeSet<String> = self
            .state()
            .load_balancers()?
            .into_iter()
            .filter(|a| a.state == AssociationState::Active)
            .map(|a| a.target_group)
            .collect();
        for group in groups {
            if !self.backoff.ready(&group) {
                continue;
            }
            let Some(health) = self.target_health(&group).await? else { continue };
            let m = crate::telemetry::metrics();
            // Every target's health is known before any deployment asks (see `observe_health`).
            health_changed.extend(health_changes(&records, &group, &health));
            // A target already draining is on its way out.
            let present: BTreeSet<String> =
                health.into_iter().filter(|(_, state)| state != "draining").map(|(id, _)| id).collect();
            let (missing, stale) = plan::repair(&group, &records, &present);
            if !missing.is_empty() {
                self.replica.confirm_leader(self.term).await?;
                tracing::warn!(target_group = %group, targets = ?missing, "reconcile: registered targets are missing; registering them again");
                m.lb_drift_repaired_total.add(&["missing"], missing.len() as f64);
                if let Err(e) = self.aws.register_targets(&group, &missing).await {
                    self.failed(&group, e).await?;
                    continue;
                }
            }
            if !stale.is_empty() {
                self.replica.confirm_leader(self.term).await?;
                tracing::warn!(target_group = %group, targets = ?stale, "reconcile: targets this system deregistered are back; deregistering them");
                m.lb_drift_repaired_total.add(&["stale"], stale.len() as f64);
                if let Err(e) = self.aws.deregister_targets(&group, &stale).await {
                    self.failed(&group, e).await?;
                }
            }
        }
        if !health_changed.is_empty() {
            self.propose(Command::PutLbTargets { targets: health_changed }).await?;
        }
        Ok(())
    }
}
