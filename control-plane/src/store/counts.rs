//! Counts of the applied state that `/metrics`, the queries' totals and the leader duties read
//! without scanning it: active tasks by state, tasks waiting for an agent, agents by state, and how
//! many active jobs, archived jobs and archived tasks there are.
//!
//! Invariant: `counts` equals what one scan of the state at the last applied index would count —
//! save while the state is being replaced whole (installing a snapshot, ending a restore), when it
//! is counted again by scan once the new state is in place; a view taken in between may pair the
//! new records with the old counts. Otherwise it is moved by each entry's [`CountsDelta`], under the
//! same lock as the entry's RocksDB write and in apply order, so a view taken with
//! [`Counts::consistent`] sees the counts of the records it reads. The delta is taken from the
//! writes themselves and from how each task stood before the entry (as the rule read it, or read
//! from the store), so it costs no scan. A record that does not decode is left out of a scan (and
//! logged), as every reader of it fails anyway: one bad record must not keep a replica from opening.

use std::sync::{Arc, Mutex};

use rocksdb::DB;

use crate::codec;
use crate::error::{Error, Result};
use crate::model::agent::{Agent, AgentState};
use crate::model::task::{Task, TaskState};
use crate::state::Indexed;
use crate::store::{cf, cf_handle};

/// What a task counts as: its state, and whether it is waiting for an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskKind {
    pub state: TaskState,
    /// Accepted and not placed yet.
    pub pending: bool,
}

impl TaskKind {
    pub fn of(task: &Task) -> TaskKind {
        let state = task.state();
        TaskKind { state, pending: state == TaskState::Accepted && crate::state::agent_of(task).is_none() }
    }

    pub fn of_indexed(indexed: &Indexed) -> TaskKind {
        // Accepted is live, so `live_on` is its agent.
        TaskKind { state: indexed.state, pending: indexed.state == TaskState::Accepted && indexed.live_on.is_none() }
    }
}

/// The counts themselves.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StateCounts {
    /// Active (not archived) tasks, by state, in [`TaskState::ALL`]'s order.
    pub tasks: [u64; TaskState::ALL.len()],
    /// Active tasks Accepted and not yet placed.
    pub pending_tasks: u64,
    pub agents_online: u64,
    pub agents_lost: u64,
    pub jobs: u64,
    pub archived_jobs: u64,
    pub archived_tasks: u64,
}

fn slot(state: TaskState) -> usize {
    TaskState::ALL.iter().position(|s| *s == state).unwrap_or(0)
}

impl StateCounts {
    /// Active tasks in `state`.
    pub fn tasks_in(&self, state: TaskState) -> u64 {
        self.tasks[slot(state)]
    }

    fn apply(&mut self, d: &CountsDelta) {
        for (n, change) in self.tasks.iter_mut().zip(d.tasks) {
            *n = n.saturating_add_signed(change);
        }
        self.pending_tasks = self.pending_tasks.saturating_add_signed(d.pending_tasks);
        self.agents_online = self.agents_online.saturating_add_signed(d.agents_online);
        self.agents_lost = self.agents_lost.saturating_add_signed(d.agents_lost);
        self.jobs = self.jobs.saturating_add_signed(d.jobs);
        self.archived_jobs = self.archived_jobs.saturating_add_signed(d.archived_jobs);
        self.archived_tasks = self.archived_tasks.saturating_add_signed(d.archived_tasks);
    }

    /// Counts the state in `db` by reading every active task and agent, and the keys of the job and
    /// archive families.
    pub fn scan(db: &DB) -> Result<StateCounts> {
        fn decoded<'a, T: serde::de::DeserializeOwned>(
            db: &'a DB,
            family: &'static str,
        ) -> Result<impl Iterator<Item = Result<T>> + 'a> {
            let cf = cf_handle(db, family).map_err(Error::from_storage)?;
            Ok(db.iterator_cf(cf, rocksdb::IteratorMode::Start).filter_map(move |item| {
                let (k, v) = match item {
                    Ok(kv) => kv,
                    Err(e) => return Some(Err(Error::from_storage(e))),
                };
                match codec::decode(&v) {
                    Ok(record) => Some(Ok(record)),
                    Err(e) => {
                        let key = String::from_utf8_lossy(&k);
                        tracing::error!(family, key = %key, error = %e, "a record does not decode: not counted");
                        None
                    }
                }
            }))
        }
        let mut d = CountsDelta::default();
        for task in decoded::<Task>(db, cf::TASKS)? {
            d.task(None, Some(TaskKind::of(&task?)));
        }
        for agent in decoded::<Agent>(db, cf::AGENTS)? {
            d.agent(None, Some(&agent?));
        }
        let keys = |family: &str| -> Result<i64> {
            let cf = cf_handle(db, family).map_err(Error::from_storage)?;
            let mut keys = db.raw_iterator_cf(cf);
            keys.seek_to_first();
            let mut n = 0;
            while keys.valid() {
                n += 1;
                keys.next();
            }
            keys.status().map_err(Error::from_storage)?;
            Ok(n)
        };
        (d.jobs, d.archived_jobs, d.archived_tasks) =
            (keys(cf::JOBS)?, keys(cf::ARCHIVED_JOBS)?, keys(cf::ARCHIVED_TASKS)?);
        let mut out = StateCounts::default();
        out.apply(&d);
        Ok(out)
    }

    /// Counts these active tasks and agents, and takes the record counts as given: what a scan of a
    /// store holding them would count (for tests against the in-memory store).
    pub fn of<'a>(
        tasks: impl IntoIterator<Item = &'a Task>,
        agents: impl IntoIterator<Item = &'a Agent>,
        (jobs, archived_jobs, archived_tasks): (usize, usize, usize),
    ) -> Self {
        let mut d = CountsDelta::default();
        tasks.into_iter().for_each(|t| d.task(None, Some(TaskKind::of(t))));
        agents.into_iter().for_each(|a| d.agent(None, Some(a)));
        (d.jobs, d.archived_jobs, d.archived_tasks) = (jobs as i64, archived_jobs as i64, archived_tasks as i64);
        let mut out = StateCounts::default();
        out.apply(&d);
        out
    }
}

/// How one entry moves the counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CountsDelta {
    tasks: [i64; TaskState::ALL.len()],
    pending_tasks: i64,
    agents_online: i64,
    agents_lost: i64,
    jobs: i64,
    archived_jobs: i64,
    archived_tasks: i64,
}

/// Families whose records are counted by key (see [`CountsDelta::record`]).
#[derive(Debug, Clone, Copy)]
pub enum Counted {
    Jobs,
    ArchivedJobs,
    ArchivedTasks,
}

impl CountsDelta {
    /// A record of a family counted by key that existed (`before`) and exists after the entry.
    pub fn record(&mut self, family: Counted, before: bool, after: bool) {
        let n = match family {
            Counted::Jobs => &mut self.jobs,
            Counted::ArchivedJobs => &mut self.archived_jobs,
            Counted::ArchivedTasks => &mut self.archived_tasks,
        };
        *n += i64::from(after) - i64::from(before);
    }

    /// An active task that was `before` and is `after` (`None`: absent, or archived).
    pub fn task(&mut self, before: Option<TaskKind>, after: Option<TaskKind>) {
        for (kind, sign) in [(before, -1), (after, 1)] {
            if let Some(k) = kind {
                self.tasks[slot(k.state)] += sign;
                if k.pending {
                    self.pending_tasks += sign;
                }
            }
        }
    }

    /// An agent that was `before` and is `after`.
    pub fn agent(&mut self, before: Option<&Agent>, after: Option<&Agent>) {
        for (agent, sign) in [(before, -1), (after, 1)] {
            match agent.map(|a| a.state) {
                Some(AgentState::Online) => self.agents_online += sign,
                Some(AgentState::Lost) => self.agents_lost += sign,
                None => {}
            }
        }
    }
}

/// The counts of one replica's applied state, shared by the state machine (which moves them) and
/// its readers.
#[derive(Debug, Clone, Default)]
pub struct Counts(Arc<Mutex<StateCounts>>);

impl Counts {
    pub fn get(&self) -> StateCounts {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StateCounts> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes an entry's batch with `write` and moves the counts by its `delta`, under one lock:
    /// a view taken through [`Counts::consistent`] sees the counts of the records it reads.
    pub(super) fn write<E>(
        &self,
        write: impl FnOnce() -> std::result::Result<(), E>,
        delta: &CountsDelta,
    ) -> std::result::Result<(), E> {
        let mut counts = self.lock();
        write()?;
        counts.apply(delta);
        Ok(())
    }

    /// `take` (a RocksDB snapshot of the state) and the counts of that same state. (Where the
    /// state is replaced whole, a view taken during the replacement may see counts of either.)
    pub(super) fn consistent<T>(&self, take: impl FnOnce() -> T) -> (T, StateCounts) {
        let counts = self.lock();
        let taken = take();
        (taken, counts.clone())
    }

    /// After the state was replaced whole.
    pub(super) fn reset(&self, counts: StateCounts) {
        *self.lock() = counts;
    }
}
