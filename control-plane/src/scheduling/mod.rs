//! The leader's scheduler: keeps an in-memory picture of what placement needs (pending tasks, what
//! every agent holds, capacity-group usage), updated from the stream of applied changes instead of
//! re-reading every task each round; hands it to the pure placement core (`titus_scheduler`); and
//! proposes the plan through Raft in batches, where every placement is checked again when applied
//! (`jobs::apply::assign_tasks`), so a stale picture can never over-commit an agent.
//!
//! Why each unplaced task waits is kept from the last round, for the SchedulerService API.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};

use titus_scheduler as core;

use crate::clock::now_ms;
use crate::command::{Assignment, Command, CommandResponse};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};
use crate::events::{Change, ChangeBatch};
use crate::jobs::hosts::{self, resources, Load};
use crate::model::agent::{Agent, AgentState, InstanceGroup, Lifecycle};
use crate::model::job::{Job, JobState};
use crate::model::task::{Task, TaskState};
use crate::model::{CapacityGroup, Tier};
use crate::state::{agent_of, StateRead};

pub mod results;
pub use results::{PlanAnswer, PlanAsk, Results, Waiting};

fn tier(t: Tier) -> core::Tier {
    match t {
        Tier::Critical => core::Tier::Critical,
        Tier::Flex => core::Tier::Flex,
    }
}

/// What placement needs of a job.
#[derive(Debug, Clone)]
struct JobEntry {
    /// What a task of its current spec needs.
    need: core::Resources,
    /// While a deployment replaces them, what a task of the previous spec needs, and its version
    /// (as `Job::resources_of` says).
    from: Option<(u32, core::Resources)>,
    group: String,
    /// Constraints as parsed; an error (not possible for a validated job) leaves its tasks pending
    /// with that error as the reason.
    constraints: std::result::Result<(core::Constraints, core::Constraints), String>,
    accepted: bool,
}

impl JobEntry {
    fn of(job: &Job) -> JobEntry {
        JobEntry {
            need: resources(&job.descriptor.container.resources.as_dimension()),
            from: job.rollout.active().map(|d| (d.from_version, resources(&job.resources_of(d.from_version)))),
            group: job.descriptor.capacity_group.clone(),
            constraints: hosts::constraints(job),
            accepted: job.status.state == JobState::Accepted,
        }
    }

    /// What a task of spec `version` needs.
    fn need_of(&self, version: u32) -> core::Resources {
        match self.from {
            Some((from, need)) if from == version => need,
            _ => self.need,
        }
    }

    /// What a placed task holds: see `Task::held`.
    fn held_by(&self, t: &Task) -> core::Resources {
        t.resources.as_ref().map_or_else(|| self.need_of(t.job_version()), resources)
    }

    fn exclusive(&self) -> bool {
        self.constraints.as_ref().is_ok_and(|(h, _)| h.exclusive_host)
    }
}

#[derive(Debug, Clone)]
struct TaskEntry {
    job_id: String,
    /// Live and placed: the agent it holds resources on, what it holds, in which capacity group,
    /// and whether it wants the agent alone.
    agent: Option<(String, core::Resources, String, bool)>,
    /// Accepted and not placed: its key in `pending`.
    pending: Option<(i64, String)>,
    /// Its job's spec version.
    version: u32,
}

/// The scheduler's picture of replicated state, kept current from applied changes.
#[derive(Debug, Default)]
pub struct Cache {
    jobs: HashMap<String, JobEntry>,
    tasks: HashMap<String, TaskEntry>,
    /// Accepted, unplaced tasks by (accepted time, id): oldest first.
    pending: BTreeSet<(i64, String)>,
    loads: HashMap<String, Load>,
    group_used: HashMap<String, core::Resources>,
    agents: HashMap<String, Agent>,
    instance_groups: HashMap<String, InstanceGroup>,
}

impl Cache {
    /// Reads the whole picture.
    pub fn load(read: &dyn StateRead, instance_groups: Vec<InstanceGroup>) -> Result<Cache> {
        let mut c = Cache::default();
        for j in read.jobs()? {
            c.jobs.insert(j.id.clone(), JobEntry::of(&j));
        }
        for t in read.all_tasks()? {
            c.put_task(&t, read)?;
        }
        for a in read.agents()? {
            c.agents.insert(a.id.clone(), a);
        }
        c.instance_groups = instance_groups.into_iter().map(|g| (g.id.clone(), g)).collect();
        Ok(c)
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Pending task ids, and per agent and per capacity group what is held, in a comparable form
    /// (for tests: a cache fed by changes must equal one loaded from scratch).
    #[allow(clippy::type_complexity)]
    pub fn summary(
        &self,
    ) -> (Vec<String>, BTreeMap<String, (String, BTreeMap<String, u32>)>, BTreeMap<String, String>) {
        let show = |r: &core::Resources| format!("{:.3} cpu {} MB", r.cpu, r.memory_mb);
        let pending = self.pending.iter().map(|(_, id)| id.clone()).collect();
        let loads = self
            .loads
            .iter()
            .map(|(a, l)| (a.clone(), (show(&l.used), l.jobs.iter().map(|(j, n)| (j.clone(), *n)).collect())))
            .collect();
        let groups = self
            .group_used
            .iter()
            .filter(|(_, r)| r.cpu > 1e-9 || r.memory_mb > 0)
            .map(|(g, r)| (g.clone(), show(r)))
            .collect();
        (pending, loads, groups)
    }

    /// Applies one applied change.
    pub fn apply(&mut self, change: &Change, read: &dyn StateRead) -> Result<()> {
        match change {
            Change::Job(j) if j.status.state == JobState::Finished => {
                self.jobs.remove(&j.id);
            }
            Change::Job(j) => {
                self.jobs.insert(j.id.clone(), JobEntry::of(j));
            }
            Change::Task(t) => self.put_task(t, read)?,
            Change::Agent(a) => {
                self.agents.insert(a.id.clone(), a.clone());
            }
            Change::InstanceGroup(g) => {
                self.instance_groups.insert(g.id.clone(), g.clone());
            }
            Change::LoadBalancer(_) | Change::LbTarget(_) => {}
        }
        Ok(())
    }

    fn job(&mut self, job_id: &str, read: &dyn StateRead) -> Result<Option<&JobEntry>> {
        if !self.jobs.contains_key(job_id) {
            match read.job(job_id)? {
                Some(j) => {
                    self.jobs.insert(j.id.clone(), JobEntry::of(&j));
                }
                None => return Ok(None),
            }
        }
        Ok(self.jobs.get(job_id))
    }

    fn put_task(&mut self, t: &Task, read: &dyn StateRead) -> Result<()> {
        // Take the old version's share out, then put the new one's in.
        if let Some(old) = self.tasks.remove(&t.id) {
            if let Some(key) = &old.pending {
                self.pending.remove(key);
            }
            if let Some((agent, need, group, exclusive)) = &old.agent {
                self.unload(agent, &old.job_id, need, group, *exclusive);
            }
        }
        if !t.state().is_live() {
            return Ok(());
        }
        let Some(job) = self.job(&t.job_id, read)?.cloned() else { return Ok(()) };
        let mut entry = TaskEntry { job_id: t.job_id.clone(), agent: None, pending: None, version: t.job_version() };
        match agent_of(t) {
            Some(agent) => {
                let held = job.held_by(t);
                self.loads.entry(agent.to_string()).or_default().add(&t.job_id, &held, job.exclusive());
                self.group_used.entry(job.group.clone()).or_default().add(&held);
                entry.agent = Some((agent.to_string(), held, job.group.clone(), job.exclusive()));
            }
            None if t.state() == TaskState::Accepted => {
                let key = (t.status.timestamp_ms, t.id.clone());
                self.pending.insert(key.clone());
                entry.pending = Some(key);
            }
            None => {}
        }
        self.tasks.insert(t.id.clone(), entry);
        Ok(())
    }

    /// Books a planned placement before it commits, so the next round does not plan the task
    /// again or count the agent's room twice. The committed change replaces it; a placement
    /// refused when applied is undone by [`Cache::refresh`].
    fn book(&mut self, task_id: &str, agent: &str) {
        let Some(entry) = self.tasks.get_mut(task_id) else { return };
        let Some(job) = self.jobs.get(&entry.job_id) else { return };
        if entry.agent.is_some() {
            return;
        }
        if let Some(key) = entry.pending.take() {
            self.pending.remove(&key);
        }
        let need = job.need_of(entry.version);
        self.loads.entry(agent.to_string()).or_default().add(&entry.job_id, &need, job.exclusive());
        self.group_used.entry(job.group.clone()).or_default().add(&need);
        entry.agent = Some((agent.to_string(), need, job.group.clone(), job.exclusive()));
    }

    /// Puts a task back as replicated state has it (after a booked placement was refused).
    fn refresh(&mut self, task_id: &str, read: &dyn StateRead) -> Result<()> {
        match read.task(task_id)? {
            Some(t) => self.put_task(&t, read),
            None => {
                if let Some(old) = self.tasks.remove(task_id) {
                    if let Some(key) = &old.pending {
                        self.pending.remove(key);
                    }
                    if let Some((agent, need, group, exclusive)) = &old.agent {
                        self.unload(agent, &old.job_id, need, group, *exclusive);
                    }
                }
                Ok(())
            }
        }
    }

    fn unload(&mut self, agent: &str, job_id: &str, need: &core::Resources, group: &str, exclusive: bool) {
        if let Some(g) = self.group_used.get_mut(group) {
            g.sub(need);
        }
        let Some(load) = self.loads.get_mut(agent) else { return };
        load.used.sub(need);
        load.exclusive = load.exclusive.saturating_sub(u32::from(exclusive));
        if let Some(n) = load.jobs.get_mut(job_id) {
            *n -= 1;
            if *n == 0 {
                load.jobs.remove(job_id);
            }
        }
        if load.jobs.is_empty() {
            self.loads.remove(agent);
        }
    }

    /// The placement core's input: every agent (with why it takes nothing, if so), up to `max`
    /// pending tasks (Critical ones first, then the oldest), and the capacity groups. Tasks whose
    /// constraints cannot be read come back separately, with the error.
    pub fn view(&self, connected: &HashSet<String>, groups: &[CapacityGroup], max: usize) -> View {
        let tier_of: HashMap<&str, Tier> = groups.iter().map(|g| (g.name.as_str(), g.tier)).collect();
        let mut agents: Vec<core::Agent> = Vec::with_capacity(self.agents.len());
        let mut ids: Vec<&String> = self.agents.keys().collect();
        ids.sort();
        for id in ids {
            let a = &self.agents[id];
            let group = self.instance_groups.get(&a.instance_group);
            let ineligible = if a.state == AgentState::Lost || !connected.contains(&a.id) {
                Some(core::Ineligible::NotConnected)
            } else if !a.healthy {
                Some(core::Ineligible::Unhealthy)
            } else if a.terminating {
                Some(core::Ineligible::Terminating)
            } else if a.draining {
                Some(core::Ineligible::Draining)
            } else {
                match group.map(|g| g.lifecycle) {
                    Some(l) if l != Lifecycle::Active => Some(core::Ineligible::Lifecycle(format!("{l:?}"))),
                    _ => None,
                }
            };
            let load = self.loads.get(&a.id).cloned().unwrap_or_default();
            agents.push(hosts::host(a, group, load, ineligible));
        }
        let mut critical = Vec::new();
        let mut flex = Vec::new();
        let mut broken = Vec::new();
        for (_, id) in &self.pending {
            let Some((job_id, version)) = self.tasks.get(id).map(|t| (&t.job_id, t.version)) else { continue };
            let Some(job) = self.jobs.get(job_id).filter(|j| j.accepted) else { continue };
            let t = tier_of.get(job.group.as_str()).copied().unwrap_or(Tier::Flex);
            let (hard, soft) = match &job.constraints {
                Ok(c) => c.clone(),
                Err(e) => {
                    broken.push((id.clone(), e.clone()));
                    continue;
                }
            };
            let task = core::Task {
                id: id.clone(),
                job_id: job_id.clone(),
                need: job.need_of(version),
                capacity_group: job.group.clone(),
                tier: tier(t),
                hard,
                soft,
            };
            match t {
                Tier::Critical => critical.push(task),
                Tier::Flex if flex.len() < max => flex.push(task),
                Tier::Flex => {}
            }
        }
        let mut tasks = critical;
        tasks.truncate(max);
        let room = max - tasks.len();
        tasks.extend(flex.into_iter().take(room));
        let groups = groups
            .iter()
            .map(|g| {
                let per = resources(&g.resources_per_instance);
                let n = g.instance_count as u64;
                core::Group {
                    name: g.name.clone(),
                    tier: tier(g.tier),
                    reserved: core::Resources {
                        cpu: per.cpu * n as f64,
                        memory_mb: per.memory_mb * n,
                        disk_mb: per.disk_mb * n,
                        network_mbps: per.network_mbps * n,
                        gpu: per.gpu * n,
                    },
                    used: self.group_used.get(&g.name).copied().unwrap_or_default(),
                }
            })
            .collect();
        let not_considered = self.pending.len().saturating_sub(tasks.len() + broken.len());
        View { agents, tasks, groups, broken, not_considered }
    }
}

/// One round's input.
pub struct View {
    pub agents: Vec<core::Agent>,
    pub tasks: Vec<core::Task>,
    pub groups: Vec<core::Group>,
    /// Pending tasks whose job's constraints cannot be read, with the error.
    pub broken: Vec<(String, String)>,
    /// Pending tasks left for a later round (beyond `max_tasks_per_round`).
    pub not_considered: usize,
}

/// Leader duty: scheduling rounds until leadership ends.
pub async fn run(
    hub: Arc<crate::agents::AgentHub>,
    term: crate::replica::Term,
    results: Arc<Results>,
    config: SchedulerConfig,
    mut stop: watch::Receiver<bool>,
) {
    let replica = hub.replica().clone();
    let state = &replica.state;
    let period = Duration::from_millis(hub.config.placement_interval_ms);
    let min_gap = Duration::from_millis(20);
    let core_config = config.core();
    let (_, mut changes) = state.changes.subscribe(None);
    // Proposals run while the next round is planned; each reports (proposed, applied) here.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<String>, Vec<String>)>();
    let mut in_flight = 0usize;
    let mut finished: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    let mut cache: Option<Cache> = None;
    // Dry runs (`PlanJob`) are answered from this duty's view while it runs.
    let (plan_tx, mut plan_rx) = tokio::sync::mpsc::channel::<PlanAsk>(16);
    results.set_planner(Some(plan_tx));
    struct Unset(Arc<Results>);
    impl Drop for Unset {
        fn drop(&mut self) {
            self.0.set_planner(None);
        }
    }
    let _unset = Unset(results.clone());
    loop {
        if cache.is_none() {
            let t0 = Instant::now();
            // Every job and task is read: seconds at a few hundred thousand tasks (17 s at 370k in
            // a release build). On a blocking thread, or this new leader's heartbeats and lease
            // confirmations wait behind it, it loses its majority's confirmation meanwhile, and
            // the next leader does the same.
            let reader = state.clone();
            let load =
                tokio::task::spawn_blocking(move || reader.instance_groups().and_then(|g| Cache::load(&reader, g)));
            let loaded = tokio::select! {
                loaded = load => loaded.unwrap_or_else(|e| Err(Error::storage("loading the scheduler's state", e))),
                _ = stop.changed() => return,
            };
            match loaded {
                Ok(c) => {
                    tracing::info!(
                        pending = c.pending(),
                        elapsed_ms = t0.elapsed().as_millis() as u64,
                        "scheduler: loaded state"
                    );
                    cache = Some(c);
                }
                Err(e) => tracing::warn!(error = %e, "scheduler: cannot read state; retrying"),
            }
        }
        while let Ok(d) = done_rx.try_recv() {
            finished.push(d);
        }
        if let Some(c) = cache.as_mut() {
            // A proposal's changes are published before it returns: apply them, then undo the
            // bookings of placements that were refused.
            if !drain(c, &mut changes, state) {
                cache = None;
                continue;
            }
            let mut refreshed = true;
            for (proposed, applied) in finished.drain(..) {
                in_flight -= 1;
                let applied: HashSet<String> = applied.into_iter().collect();
                for id in proposed.iter().filter(|id| !applied.contains(*id)) {
                    refreshed &= c.refresh(id, state).is_ok();
                }
            }
            if !refreshed {
                cache = None;
                continue;
            }
            if c.pending() > 0 && in_flight < MAX_ENTRIES_IN_FLIGHT {
                match plan_round(&hub, c, &results, &config, &core_config).await {
                    Ok(placements) => {
                        for p in &placements {
                            c.book(&p.task_id, &p.agent_id);
                        }
                        for chunk in placements.chunks(config.placements_per_entry) {
                            in_flight += 1;
                            let (replica, done) = (replica.clone(), done_tx.clone());
                            let assignments: Vec<Assignment> = chunk
                                .iter()
                                .map(|p| Assignment { task_id: p.task_id.clone(), agent_id: p.agent_id.clone() })
                                .collect();
                            tokio::spawn(propose(replica, term, assignments, done));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "scheduler: round failed"),
                }
            } else if c.pending() == 0 {
                results.record(now_ms(), HashMap::new(), 0);
            }
        } else {
            // No cache: the bookings went with it.
            in_flight -= finished.len();
            finished.clear();
        }
        // Next round: after a change or a finished proposal (coalesced over `min_gap`), or
        // `period`, whichever is first.
        tokio::select! {
            _ = tokio::time::sleep(min_gap) => {}
            _ = stop.changed() => return,
        }
        let wait = tokio::time::sleep(period.saturating_sub(min_gap));
        tokio::select! {
            _ = wait => {}
            d = done_rx.recv() => finished.extend(d),
            ask = plan_rx.recv() => {
                if let (Some(ask), Some(c)) = (ask, cache.as_ref()) {
                    dry_run(&hub, c, ask, &config, &core_config);
                }
            }
            batch = changes.recv() => match (batch, cache.as_mut()) {
                (Ok(b), Some(c)) => {
                    if !apply_batch(c, &b, state) {
                        cache = None;
                    }
                }
                (Err(broadcast::error::RecvError::Closed), _) => return,
                _ => cache = None,
            },
            _ = stop.changed() => return,
        }
    }
}

/// Most placement entries proposed and not yet answered; the next round waits beyond that.
const MAX_ENTRIES_IN_FLIGHT: usize = 8;

/// Proposes one entry of placements and reports which were applied.
async fn propose(
    replica: Arc<crate::replica::Replica>,
    term: crate::replica::Term,
    assignments: Vec<Assignment>,
    done: tokio::sync::mpsc::UnboundedSender<(Vec<String>, Vec<String>)>,
) {
    let proposed: Vec<String> = assignments.iter().map(|a| a.task_id.clone()).collect();
    let applied =
        match replica.propose_as_leader(term, Command::AssignTasks { assignments, timestamp_ms: now_ms() }).await {
            Ok(CommandResponse::Assigned(done)) => done,
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "scheduler: proposal failed");
                Vec::new()
            }
        };
    crate::telemetry::metrics().scheduler_placements_total.add(&[], applied.len() as f64);
    let _ = done.send((proposed, applied));
}

/// Applies what the change stream holds; false when the cache must be reloaded (it lagged, or the
/// state was replaced by a snapshot).
fn drain(c: &mut Cache, changes: &mut broadcast::Receiver<Arc<ChangeBatch>>, read: &dyn StateRead) -> bool {
    loop {
        match changes.try_recv() {
            Ok(b) => {
                if !apply_batch(c, &b, read) {
                    return false;
                }
            }
            Err(broadcast::error::TryRecvError::Empty) => return true,
            Err(_) => return false,
        }
    }
}

fn apply_batch(c: &mut Cache, b: &ChangeBatch, read: &dyn StateRead) -> bool {
    if b.reset {
        return false;
    }
    b.changes.iter().all(|change| c.apply(change, read).is_ok())
}

/// `count` tasks of `job` (which need not exist) as the placement core takes them, for a dry run:
/// ids `plan-0`, `plan-1`, ...; the error when its constraints cannot be read.
pub fn planned_tasks(job: &Job, group_tier: Tier, count: u32) -> std::result::Result<Vec<core::Task>, String> {
    let entry = JobEntry::of(job);
    let (hard, soft) = entry.constraints?;
    Ok((0..count)
        .map(|i| core::Task {
            id: format!("plan-{i}"),
            job_id: job.id.clone(),
            need: entry.need,
            capacity_group: entry.group.clone(),
            tier: tier(group_tier),
            hard: hard.clone(),
            soft: soft.clone(),
        })
        .collect())
}

/// Answers a dry run: the asked tasks after the pending ones, on the current view, placed by the
/// core on a blocking thread; nothing is booked or proposed.
fn dry_run(
    hub: &crate::agents::AgentHub,
    cache: &Cache,
    ask: PlanAsk,
    config: &SchedulerConfig,
    core_config: &core::Config,
) {
    let groups = match hub.replica().state.capacity_groups() {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, "scheduler: dry run: cannot read capacity groups");
            return;
        }
    };
    let view = cache.view(&hub.connected(), &groups, config.max_tasks_per_round);
    let pending_before = view.tasks.len() + view.not_considered + view.broken.len();
    let asked: HashSet<String> = ask.tasks.iter().map(|t| t.id.clone()).collect();
    let (agents, mut tasks, core_groups) = (view.agents, view.tasks, view.groups);
    tasks.extend(ask.tasks);
    let core_config = core_config.clone();
    tokio::task::spawn_blocking(move || {
        let plan = core::schedule(&agents, &tasks, &core_groups, &core_config);
        let round_ms = now_ms();
        let answer = PlanAnswer {
            placements: plan
                .placements
                .into_iter()
                .filter(|p| asked.contains(&p.task_id))
                .map(|p| (p.task_id, p.agent_id))
                .collect(),
            unplaced: plan
                .unplaced
                .into_iter()
                .filter(|u| asked.contains(&u.task_id))
                .map(|u| {
                    let why = Waiting { reason: u.reason.kind.label(), message: u.reason.message, round_ms };
                    (u.task_id, why)
                })
                .collect(),
            pending_before,
        };
        let _ = ask.reply.send(answer);
    });
}

/// Plans one round: records why the unplaced tasks wait, returns the placements.
async fn plan_round(
    hub: &crate::agents::AgentHub,
    cache: &Cache,
    results: &Results,
    config: &SchedulerConfig,
    core_config: &core::Config,
) -> Result<Vec<core::Placement>> {
    let replica = hub.replica();
    let m = crate::telemetry::metrics();
    let groups = replica.state.capacity_groups()?;
    let t0 = Instant::now();
    let view = cache.view(&hub.connected(), &groups, config.max_tasks_per_round);
    let (considered, not_considered) = (view.tasks.len(), view.not_considered);
    let core_config = core_config.clone();
    let (agents, tasks, core_groups) = (view.agents, view.tasks, view.groups);
    let plan = tokio::task::spawn_blocking(move || core::schedule(&agents, &tasks, &core_groups, &core_config))
        .await
        .map_err(|e| crate::error::Error::storage("scheduling round panicked", e))?;
    let round_ms = now_ms();

    let mut waiting: HashMap<String, Waiting> = HashMap::new();
    let mut by_reason: HashMap<String, f64> = HashMap::new();
    for u in &plan.unplaced {
        let label = u.reason.kind.label();
        *by_reason.entry(label.clone()).or_default() += 1.0;
        waiting.insert(u.task_id.clone(), Waiting { reason: label, message: u.reason.message.clone(), round_ms });
    }
    for (id, e) in view.broken {
        *by_reason.entry("unreadable constraints".into()).or_default() += 1.0;
        waiting.insert(id, Waiting { reason: "unreadable constraints".into(), message: e, round_ms });
    }
    m.scheduler_unplaced_tasks.replace(by_reason.into_iter().map(|(k, v)| (vec![k], v)));
    results.record(round_ms, waiting, not_considered);
    if !plan.placements.is_empty() {
        m.scheduler_plan_size.observe(&[], plan.placements.len() as f64);
    }
    tracing::debug!(
        considered,
        placed = plan.placements.len(),
        unplaced = plan.unplaced.len(),
        evaluated = plan.agents_evaluated,
        plan_ms = t0.elapsed().as_millis() as u64,
        "scheduling round"
    );
    Ok(plan.placements)
}
