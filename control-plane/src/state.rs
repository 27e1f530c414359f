//! The replicated state as the rules see it: one read trait over every entity ([`StateRead`]: jobs,
//! tasks, their archives, agents, instance and capacity groups, load balancers and targets,
//! tokens) and a set of pending writes ([`Overlay`]) whose reads see its own writes. The RocksDB
//! state machine and the in-memory test store both implement [`StateRead`]; the same rules run over
//! either.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::agent::{Agent, InstanceGroup};
use crate::model::job::Job;
use crate::model::load_balancer::{LbTarget, LoadBalancer};
use crate::model::task::Task;
use crate::model::CapacityGroup;

/// What an idempotency token maps to, and until when it is remembered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub result: String,
    pub expires_ms: i64,
}

/// What an agent's live tasks hold (each what it was placed with), and how many they are.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Allocation {
    pub resources: crate::model::ResourceDimension,
    pub live_tasks: u32,
}

/// The agent a task was placed on, if any.
pub fn agent_of(task: &Task) -> Option<&str> {
    task.context.get(crate::model::task::context::AGENT).map(String::as_str)
}

/// The agent a live task is placed on and what it holds there ([`Task::held`]); `None` when it
/// holds nothing.
pub fn holding(read: &dyn StateRead, task: &Task) -> Result<Option<(String, crate::model::ResourceDimension)>> {
    let Some(agent) = agent_of(task).filter(|_| task.state().is_live()) else { return Ok(None) };
    let resources = match task.resources {
        Some(_) => task.held(None),
        None => task.held(read.job(&task.job_id)?.as_ref()),
    };
    Ok(Some((agent.to_string(), resources)))
}

/// Every read of the replicated state a rule, a duty or the API makes.
pub trait StateRead {
    fn job(&self, id: &str) -> Result<Option<Job>>;
    fn task(&self, id: &str) -> Result<Option<Task>>;
    fn task_ids_of_job(&self, job_id: &str) -> Result<Vec<String>>;
    /// Every active (not archived) job.
    fn jobs(&self) -> Result<Vec<Job>>;
    fn capacity_group(&self, name: &str) -> Result<Option<CapacityGroup>>;
    fn token(&self, key: &str) -> Result<Option<TokenRecord>>;
    fn archived_job(&self, id: &str) -> Result<Option<Job>>;
    fn archived_task(&self, id: &str) -> Result<Option<Task>>;
    fn archived_task_ids_of_job(&self, job_id: &str) -> Result<Vec<String>>;
    /// Every active task.
    fn all_tasks(&self) -> Result<Vec<Task>>;
    fn agent(&self, id: &str) -> Result<Option<Agent>>;
    fn agents(&self) -> Result<Vec<Agent>>;
    fn instance_group(&self, id: &str) -> Result<Option<InstanceGroup>>;
    /// Every job ↔ target group association (few: at most 30 per service job).
    fn load_balancers(&self) -> Result<Vec<LoadBalancer>>;
    /// Every load balancer target this system registered or is (de)registering.
    fn lb_targets(&self) -> Result<Vec<LbTarget>>;

    /// Ids of the live tasks placed on `agent_id`.
    fn task_ids_on_agent(&self, agent_id: &str) -> Result<Vec<String>> {
        Ok(self
            .all_tasks()?
            .into_iter()
            .filter(|t| t.state().is_live() && agent_of(t) == Some(agent_id))
            .map(|t| t.id)
            .collect())
    }

    /// What the live tasks placed on `agent_id` hold.
    fn allocation_of(&self, agent_id: &str) -> Result<Allocation> {
        let mut out = Allocation::default();
        for id in self.task_ids_on_agent(agent_id)? {
            if let Some((_, r)) = self.task(&id)?.map(|t| holding(self.as_read(), &t)).transpose()?.flatten() {
                out.resources.add(&r);
                out.live_tasks += 1;
            }
        }
        Ok(out)
    }

    /// Per agent, what its live tasks hold.
    fn allocations(&self) -> Result<BTreeMap<String, Allocation>> {
        let mut jobs: BTreeMap<String, Option<Job>> = BTreeMap::new();
        let mut out: BTreeMap<String, Allocation> = BTreeMap::new();
        for t in self.all_tasks()? {
            let Some(agent) = agent_of(&t).filter(|_| t.state().is_live()) else { continue };
            if t.resources.is_none() && !jobs.contains_key(&t.job_id) {
                jobs.insert(t.job_id.clone(), self.job(&t.job_id)?);
            }
            let a = out.entry(agent.to_string()).or_default();
            a.live_tasks += 1;
            a.resources.add(&t.held(jobs.get(&t.job_id).and_then(Option::as_ref)));
        }
        Ok(out)
    }

    /// Itself as a trait object (for the provided methods).
    fn as_read(&self) -> &dyn StateRead;

    fn tasks_of_job(&self, job_id: &str) -> Result<Vec<Task>> {
        let mut out = Vec::new();
        for id in self.task_ids_of_job(job_id)? {
            if let Some(t) = self.task(&id)? {
                out.push(t);
            }
        }
        Ok(out)
    }
}

/// A pending write: the new value, or the value being removed (the store needs it for indexes).
#[derive(Debug, Clone, PartialEq)]
pub enum Write<T> {
    Put(T),
    Delete(T),
}

impl<T> Write<T> {
    /// The value after the write (`None`: removed).
    pub fn current(&self) -> Option<&T> {
        match self {
            Write::Put(v) => Some(v),
            Write::Delete(_) => None,
        }
    }
}

/// Writes of one command, applied by the store in one batch.
#[derive(Debug, Default)]
pub struct Changes {
    pub jobs: BTreeMap<String, Write<Job>>,
    pub tasks: BTreeMap<String, Write<Task>>,
    pub archived_jobs: BTreeMap<String, Write<Job>>,
    pub archived_tasks: BTreeMap<String, Write<Task>>,
    pub tokens: BTreeMap<String, Option<TokenRecord>>,
    pub agents: BTreeMap<String, Agent>,
    pub instance_groups: BTreeMap<String, InstanceGroup>,
    pub load_balancers: BTreeMap<String, Write<LoadBalancer>>,
    pub lb_targets: BTreeMap<String, Write<LbTarget>>,
    pub capacity_groups: BTreeMap<String, Write<CapacityGroup>>,
    /// How the indexes held each task a rule read from the state before changing it (`None`: it
    /// did not exist). The store rewrites only the index entries that change: a task is written
    /// four times on its way to Started, its by-job entry once and its by-agent entry once. A task
    /// written without being read first has its entries written whatever they held.
    pub tasks_indexed_before: BTreeMap<String, Option<Indexed>>,
}

/// Where a stored task is indexed: under its job, and under its agent while live and placed; and
/// its state, which the store's counts are kept by.
#[derive(Debug, Clone, PartialEq)]
pub struct Indexed {
    pub job_id: String,
    pub live_on: Option<String>,
    pub state: crate::model::task::TaskState,
}

impl Indexed {
    pub fn of(task: &Task) -> Indexed {
        Indexed {
            job_id: task.job_id.clone(),
            live_on: agent_of(task).filter(|_| task.state().is_live()).map(str::to_string),
            state: task.state(),
        }
    }
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
            && self.tasks.is_empty()
            && self.archived_jobs.is_empty()
            && self.archived_tasks.is_empty()
            && self.tokens.is_empty()
            && self.agents.is_empty()
            && self.instance_groups.is_empty()
            && self.load_balancers.is_empty()
            && self.lb_targets.is_empty()
            && self.capacity_groups.is_empty()
    }
}

/// Reads through pending writes to the base view.
pub struct Overlay<'a> {
    base: &'a dyn StateRead,
    pub changes: Changes,
    /// Tasks read from `base`, as the indexes hold them (see `Changes::tasks_indexed_before`).
    indexed_before: RefCell<BTreeMap<String, Option<Indexed>>>,
}

impl<'a> Overlay<'a> {
    pub fn new(base: &'a dyn StateRead) -> Self {
        Overlay { base, changes: Changes::default(), indexed_before: RefCell::new(BTreeMap::new()) }
    }

    pub fn put_job(&mut self, job: Job) {
        self.changes.jobs.insert(job.id.clone(), Write::Put(job));
    }

    pub fn put_task(&mut self, task: Task) {
        self.changes.tasks.insert(task.id.clone(), Write::Put(task));
    }

    /// Moves a task from the active set to the archive.
    pub fn archive_task(&mut self, task: Task) {
        self.changes.tasks.insert(task.id.clone(), Write::Delete(task.clone()));
        self.changes.archived_tasks.insert(task.id.clone(), Write::Put(task));
    }

    /// Moves a job from the active set to the archive.
    pub fn archive_job(&mut self, job: Job) {
        self.changes.jobs.insert(job.id.clone(), Write::Delete(job.clone()));
        self.changes.archived_jobs.insert(job.id.clone(), Write::Put(job));
    }

    pub fn forget_archived_job(&mut self, job: Job) -> Result<()> {
        for id in self.archived_task_ids_of_job(&job.id)? {
            if let Some(t) = self.archived_task(&id)? {
                self.changes.archived_tasks.insert(id, Write::Delete(t));
            }
        }
        self.changes.archived_jobs.insert(job.id.clone(), Write::Delete(job));
        Ok(())
    }

    pub fn put_agent(&mut self, agent: Agent) {
        self.changes.agents.insert(agent.id.clone(), agent);
    }

    pub fn put_instance_group(&mut self, group: InstanceGroup) {
        self.changes.instance_groups.insert(group.id.clone(), group);
    }

    pub fn put_load_balancer(&mut self, lb: LoadBalancer) {
        self.changes.load_balancers.insert(lb.key(), Write::Put(lb));
    }

    pub fn delete_load_balancer(&mut self, lb: LoadBalancer) {
        self.changes.load_balancers.insert(lb.key(), Write::Delete(lb));
    }

    pub fn put_lb_target(&mut self, target: LbTarget) {
        self.changes.lb_targets.insert(target.key(), Write::Put(target));
    }

    pub fn delete_lb_target(&mut self, target: LbTarget) {
        self.changes.lb_targets.insert(target.key(), Write::Delete(target));
    }

    pub fn put_capacity_group(&mut self, group: CapacityGroup) {
        self.changes.capacity_groups.insert(group.name.clone(), Write::Put(group));
    }

    pub fn delete_capacity_group(&mut self, group: CapacityGroup) {
        self.changes.capacity_groups.insert(group.name.clone(), Write::Delete(group));
    }

    pub fn put_token(&mut self, key: String, record: TokenRecord) {
        self.changes.tokens.insert(key, Some(record));
    }

    pub fn into_changes(self) -> Changes {
        let mut changes = self.changes;
        changes.tasks_indexed_before = self.indexed_before.into_inner();
        changes
    }
}

fn merge_ids<T>(
    base: Vec<String>,
    writes: &BTreeMap<String, Write<T>>,
    job_of: impl Fn(&T) -> &str,
    job_id: &str,
) -> Vec<String> {
    let mut ids: BTreeSet<String> = base.into_iter().collect();
    for (id, w) in writes {
        match w {
            Write::Put(v) if job_of(v) == job_id => {
                ids.insert(id.clone());
            }
            Write::Delete(_) => {
                ids.remove(id);
            }
            _ => {}
        }
    }
    ids.into_iter().collect()
}

impl StateRead for Overlay<'_> {
    fn job(&self, id: &str) -> Result<Option<Job>> {
        match self.changes.jobs.get(id) {
            Some(w) => Ok(w.current().cloned()),
            None => self.base.job(id),
        }
    }

    fn task(&self, id: &str) -> Result<Option<Task>> {
        match self.changes.tasks.get(id) {
            Some(w) => Ok(w.current().cloned()),
            None => {
                let task = self.base.task(id)?;
                self.indexed_before
                    .borrow_mut()
                    .entry(id.to_string())
                    .or_insert_with(|| task.as_ref().map(Indexed::of));
                Ok(task)
            }
        }
    }

    fn task_ids_of_job(&self, job_id: &str) -> Result<Vec<String>> {
        Ok(merge_ids(self.base.task_ids_of_job(job_id)?, &self.changes.tasks, |t: &Task| &t.job_id, job_id))
    }

    fn jobs(&self) -> Result<Vec<Job>> {
        let mut jobs: BTreeMap<String, Job> = self.base.jobs()?.into_iter().map(|j| (j.id.clone(), j)).collect();
        for (id, w) in &self.changes.jobs {
            match w {
                Write::Put(j) => {
                    jobs.insert(id.clone(), j.clone());
                }
                Write::Delete(_) => {
                    jobs.remove(id);
                }
            }
        }
        Ok(jobs.into_values().collect())
    }

    fn capacity_group(&self, name: &str) -> Result<Option<CapacityGroup>> {
        match self.changes.capacity_groups.get(name) {
            Some(w) => Ok(w.current().cloned()),
            None => self.base.capacity_group(name),
        }
    }

    fn token(&self, key: &str) -> Result<Option<TokenRecord>> {
        match self.changes.tokens.get(key) {
            Some(t) => Ok(t.clone()),
            None => self.base.token(key),
        }
    }

    fn archived_job(&self, id: &str) -> Result<Option<Job>> {
        match self.changes.archived_jobs.get(id) {
            Some(w) => Ok(w.current().cloned()),
            None => self.base.archived_job(id),
        }
    }

    fn archived_task(&self, id: &str) -> Result<Option<Task>> {
        match self.changes.archived_tasks.get(id) {
            Some(w) => Ok(w.current().cloned()),
            None => self.base.archived_task(id),
        }
    }

    fn archived_task_ids_of_job(&self, job_id: &str) -> Result<Vec<String>> {
        Ok(merge_ids(
            self.base.archived_task_ids_of_job(job_id)?,
            &self.changes.archived_tasks,
            |t: &Task| &t.job_id,
            job_id,
        ))
    }

    fn all_tasks(&self) -> Result<Vec<Task>> {
        let mut tasks: BTreeMap<String, Task> = self.base.all_tasks()?.into_iter().map(|t| (t.id.clone(), t)).collect();
        for (id, w) in &self.changes.tasks {
            match w {
                Write::Put(t) => {
                    tasks.insert(id.clone(), t.clone());
                }
                Write::Delete(_) => {
                    tasks.remove(id);
                }
            }
        }
        Ok(tasks.into_values().collect())
    }

    fn agent(&self, id: &str) -> Result<Option<Agent>> {
        match self.changes.agents.get(id) {
            Some(a) => Ok(Some(a.clone())),
            None => self.base.agent(id),
        }
    }

    fn agents(&self) -> Result<Vec<Agent>> {
        let mut agents: BTreeMap<String, Agent> = self.base.agents()?.into_iter().map(|a| (a.id.clone(), a)).collect();
        agents.extend(self.changes.agents.clone());
        Ok(agents.into_values().collect())
    }

    fn instance_group(&self, id: &str) -> Result<Option<InstanceGroup>> {
        match self.changes.instance_groups.get(id) {
            Some(g) => Ok(Some(g.clone())),
            None => self.base.instance_group(id),
        }
    }

    fn load_balancers(&self) -> Result<Vec<LoadBalancer>> {
        Ok(merged(self.base.load_balancers()?, LoadBalancer::key, &self.changes.load_balancers))
    }

    fn lb_targets(&self) -> Result<Vec<LbTarget>> {
        Ok(merged(self.base.lb_targets()?, LbTarget::key, &self.changes.lb_targets))
    }

    fn task_ids_on_agent(&self, agent_id: &str) -> Result<Vec<String>> {
        let mut ids: BTreeSet<String> = self.base.task_ids_on_agent(agent_id)?.into_iter().collect();
        for (id, w) in &self.changes.tasks {
            match w.current() {
                Some(t) if t.state().is_live() && agent_of(t) == Some(agent_id) => ids.insert(id.clone()),
                _ => ids.remove(id),
            };
        }
        Ok(ids.into_iter().collect())
    }

    /// The base's allocation, corrected by this overlay's writes of tasks on that agent (a task's
    /// agent never changes once set, so the write itself tells whether the task concerns it).
    fn allocation_of(&self, agent_id: &str) -> Result<Allocation> {
        let mut out = self.base.allocation_of(agent_id)?;
        for (id, w) in &self.changes.tasks {
            let (Write::Put(t) | Write::Delete(t)) = w;
            if agent_of(t) != Some(agent_id) {
                continue;
            }
            if let Some((agent, r)) = self.base.task(id)?.map(|t| holding(self.base, &t)).transpose()?.flatten() {
                if agent == agent_id {
                    out.resources.sub(&r);
                    out.live_tasks = out.live_tasks.saturating_sub(1);
                }
            }
            if let Some((agent, r)) = w.current().map(|t| holding(self, t)).transpose()?.flatten() {
                if agent == agent_id {
                    out.resources.add(&r);
                    out.live_tasks += 1;
                }
            }
        }
        Ok(out)
    }

    fn as_read(&self) -> &dyn StateRead {
        self
    }
}

/// `base` with pending writes applied, in key order.
fn merged<T: Clone>(base: Vec<T>, key: impl Fn(&T) -> String, writes: &BTreeMap<String, Write<T>>) -> Vec<T> {
    let mut all: BTreeMap<String, T> = base.into_iter().map(|v| (key(&v), v)).collect();
    for (k, w) in writes {
        match w {
            Write::Put(v) => {
                all.insert(k.clone(), v.clone());
            }
            Write::Delete(_) => {
                all.remove(k);
            }
        }
    }
    all.into_values().collect()
}

/// An in-memory store: the same apply code as RocksDB, for fast unit and property tests (and for
/// nothing else: it is compiled for tests only).
#[cfg(test)]
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    pub jobs: BTreeMap<String, Job>,
    pub tasks: BTreeMap<String, Task>,
    pub archived_jobs: BTreeMap<String, Job>,
    pub archived_tasks: BTreeMap<String, Task>,
    pub capacity_groups: BTreeMap<String, CapacityGroup>,
    pub tokens: BTreeMap<String, TokenRecord>,
    pub agents: BTreeMap<String, Agent>,
    pub instance_groups: BTreeMap<String, InstanceGroup>,
    pub load_balancers: BTreeMap<String, LoadBalancer>,
    pub lb_targets: BTreeMap<String, LbTarget>,
}

#[cfg(test)]
impl MemoryStore {
    pub fn commit(&mut self, changes: Changes) {
        fn apply<T>(map: &mut BTreeMap<String, T>, writes: BTreeMap<String, Write<T>>) {
            for (id, w) in writes {
                match w {
                    Write::Put(v) => {
                        map.insert(id, v);
                    }
                    Write::Delete(_) => {
                        map.remove(&id);
                    }
                }
            }
        }
        apply(&mut self.jobs, changes.jobs);
        apply(&mut self.tasks, changes.tasks);
        apply(&mut self.archived_jobs, changes.archived_jobs);
        apply(&mut self.archived_tasks, changes.archived_tasks);
        apply(&mut self.load_balancers, changes.load_balancers);
        apply(&mut self.lb_targets, changes.lb_targets);
        apply(&mut self.capacity_groups, changes.capacity_groups);
        self.agents.extend(changes.agents);
        self.instance_groups.extend(changes.instance_groups);
        for (k, v) in changes.tokens {
            match v {
                Some(r) => {
                    self.tokens.insert(k, r);
                }
                None => {
                    self.tokens.remove(&k);
                }
            }
        }
    }
}

#[cfg(test)]
impl StateRead for MemoryStore {
    fn job(&self, id: &str) -> Result<Option<Job>> {
        Ok(self.jobs.get(id).cloned())
    }
    fn task(&self, id: &str) -> Result<Option<Task>> {
        Ok(self.tasks.get(id).cloned())
    }
    fn task_ids_of_job(&self, job_id: &str) -> Result<Vec<String>> {
        Ok(self.tasks.values().filter(|t| t.job_id == job_id).map(|t| t.id.clone()).collect())
    }
    fn jobs(&self) -> Result<Vec<Job>> {
        Ok(self.jobs.values().cloned().collect())
    }
    fn capacity_group(&self, name: &str) -> Result<Option<CapacityGroup>> {
        Ok(self.capacity_groups.get(name).cloned())
    }
    fn token(&self, key: &str) -> Result<Option<TokenRecord>> {
        Ok(self.tokens.get(key).cloned())
    }
    fn archived_job(&self, id: &str) -> Result<Option<Job>> {
        Ok(self.archived_jobs.get(id).cloned())
    }
    fn archived_task(&self, id: &str) -> Result<Option<Task>> {
        Ok(self.archived_tasks.get(id).cloned())
    }
    fn archived_task_ids_of_job(&self, job_id: &str) -> Result<Vec<String>> {
        Ok(self.archived_tasks.values().filter(|t| t.job_id == job_id).map(|t| t.id.clone()).collect())
    }
    fn all_tasks(&self) -> Result<Vec<Task>> {
        Ok(self.tasks.values().cloned().collect())
    }
    fn agent(&self, id: &str) -> Result<Option<Agent>> {
        Ok(self.agents.get(id).cloned())
    }
    fn agents(&self) -> Result<Vec<Agent>> {
        Ok(self.agents.values().cloned().collect())
    }
    fn instance_group(&self, id: &str) -> Result<Option<InstanceGroup>> {
        Ok(self.instance_groups.get(id).cloned())
    }
    fn load_balancers(&self) -> Result<Vec<LoadBalancer>> {
        Ok(self.load_balancers.values().cloned().collect())
    }
    fn lb_targets(&self) -> Result<Vec<LbTarget>> {
        Ok(self.lb_targets.values().cloned().collect())
    }
    fn as_read(&self) -> &dyn StateRead {
        self
    }
}
