//! The task lifecycle's decisions, as a pure function of replicated state and the time: which tasks
//! to create (with retry back-off), which to kill (scale-down, stuck states, runtime limits), which
//! jobs are finished, what the archive may forget. No IO, no clock, no tokio — the leader duty in
//! `crate::lifecycle` reads the state, calls [`plan`], and proposes what it returns.
//!
//! Every command it returns is re-checked when applied, so a plan made from a stale view, or made
//! twice, does no harm.

use std::collections::{BTreeMap, BTreeSet};

use crate::command::Command;
use crate::error::Result;
use crate::model::agent::Lifecycle;
use crate::model::job::{Job, JobState, JobType, RetryPolicy};
use crate::model::task::{context, reason, Task, TaskState, TaskStatus};
use crate::state::{agent_of, StateRead};

#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    pub launched_timeout_ms: i64,
    pub start_initiated_timeout_batch_ms: i64,
    pub start_initiated_timeout_service_ms: i64,
    pub kill_initiated_timeout_ms: i64,
}

impl Default for LifecycleConfig {
    /// Titus's timeouts: Launched 60 s; StartInitiated 12 min (batch) / 5 min (service); KillInitiated 10 min.
    fn default() -> Self {
        LifecycleConfig {
            launched_timeout_ms: 60_000,
            start_initiated_timeout_batch_ms: 12 * 60_000,
            start_initiated_timeout_service_ms: 5 * 60_000,
            kill_initiated_timeout_ms: 10 * 60_000,
        }
    }
}

pub(crate) fn status(state: TaskState, reason_code: &str, message: &str, now: i64) -> TaskStatus {
    TaskStatus { state, reason_code: reason_code.into(), reason_message: message.into(), timestamp_ms: now }
}

/// Whether `delay_ms` has passed since `since_ms`. Saturating: a delay or time from a descriptor
/// written before its bounds were checked must not overflow (an overflow panicked every leader's
/// lifecycle in turn).
pub(crate) fn elapsed(since_ms: i64, delay_ms: u64, now: i64) -> bool {
    now >= since_ms.saturating_add(i64::try_from(delay_ms).unwrap_or(i64::MAX))
}

pub(crate) fn update(task: &Task, status: TaskStatus) -> Command {
    Command::UpdateTaskStatus {
        task_id: task.id.clone(),
        status,
        context: BTreeMap::new(),
        expected_state: Some(task.state()),
    }
}

/// A service task that crashed (its container failed) after running less than this is part of a
/// crash loop; one that ran this long resets the count (kubelet's 10 minutes).
pub const CLEAN_RUN_MS: i64 = 10 * 60_000;
/// The crash-loop back-off of a service under the default (Immediate) retry policy: none after a
/// first quick crash (one container lost is replaced at once), 10 s after the second in a row,
/// doubling to at most 5 minutes (kubelet's CrashLoopBackOff).
pub const CRASH_LOOP_FIRST_DELAY_MS: u64 = 10_000;
pub const CRASH_LOOP_MAX_DELAY_MS: u64 = 300_000;

/// How many quick crashes in a row end with `task` (0 when it did not crash, or ran cleanly
/// before it did): its lineage's count so far, carried in its context, plus itself.
pub fn crash_loop_count(task: &Task) -> u32 {
    let crashed = matches!(task.status.reason_code.as_str(), reason::FAILED | reason::CRASHED);
    if task.state() != TaskState::Finished || !crashed {
        return 0;
    }
    let ran_ms = task.entered(TaskState::Started).map(|s| task.status.timestamp_ms.saturating_sub(s)).unwrap_or(0);
    if ran_ms >= CLEAN_RUN_MS {
        return 0;
    }
    let before: u32 = task.context.get(context::CRASH_LOOP_COUNT).and_then(|c| c.parse().ok()).unwrap_or(0);
    before.saturating_add(1)
}

/// The crash-loop back-off after `count` quick crashes in a row.
pub fn crash_loop_delay_ms(count: u32) -> u64 {
    if count <= 1 {
        return 0;
    }
    let shift = (count - 2).min(16);
    CRASH_LOOP_FIRST_DELAY_MS.saturating_mul(1 << shift).min(CRASH_LOOP_MAX_DELAY_MS)
}

/// How long a service's replacement of `failed` waits after it finished: what the job's retry
/// policy says and, under the default Immediate policy, at least the crash-loop back-off (an
/// explicit Delayed or ExponentialBackOff policy is taken as given).
fn service_replacement_delay_ms(policy: &RetryPolicy, failed: &Task) -> u64 {
    let by_policy = policy.delay_ms(failed.counted_retries().saturating_add(1));
    match policy {
        RetryPolicy::Immediate { .. } => by_policy.max(crash_loop_delay_ms(crash_loop_count(failed))),
        _ => by_policy,
    }
}

/// A new task at `index`, replacing `previous` when there is one.
pub(crate) fn new_task(
    job: &Job,
    index: u32,
    previous: Option<&Task>,
    now: i64,
    new_id: &mut dyn FnMut() -> String,
) -> Task {
    let id = new_id();
    let (original_id, resubmit_of, resubmit_number, system_resubmit_number) = match previous {
        None => (id.clone(), None, 0, 0),
        Some(p) => {
            let system = u32::from(!reason::counts_against_retries(&p.status.reason_code));
            (
                p.original_id.clone(),
                Some(p.id.clone()),
                p.resubmit_number.saturating_add(1),
                p.system_resubmit_number.saturating_add(system),
            )
        }
    };
    let mut ctx = BTreeMap::new();
    ctx.insert(context::TASK_INDEX.to_string(), index.to_string());
    ctx.insert(context::ORIGINAL_ID.to_string(), original_id.clone());
    if let Some(r) = &resubmit_of {
        ctx.insert(context::RESUBMIT_OF.to_string(), r.clone());
    }
    let crashes = previous.filter(|_| !job.descriptor.is_batch()).map(crash_loop_count).unwrap_or(0);
    if crashes > 0 {
        ctx.insert(context::CRASH_LOOP_COUNT.to_string(), crashes.to_string());
    }
    if job.rollout.version > 0 {
        ctx.insert(context::JOB_VERSION.to_string(), job.rollout.version.to_string());
    }
    Task {
        id,
        job_id: job.id.clone(),
        index,
        status: status(TaskState::Accepted, "", "", now),
        status_history: Vec::new(),
        context: ctx,
        original_id,
        resubmit_of,
        resubmit_number,
        system_resubmit_number,
        resources: None,
        attributes: Default::default(),
    }
}

/// Stuck-state timeouts and runtime limits of live tasks.
fn timeouts(job: &Job, tasks: &[Task], now: i64, cfg: &LifecycleConfig, out: &mut Vec<Command>) {
    for t in tasks {
        let since = now.saturating_sub(t.status.timestamp_ms);
        match t.state() {
            TaskState::Launched if since > cfg.launched_timeout_ms => {
                out.push(update(t, status(TaskState::KillInitiated, reason::STUCK_IN_STATE, "stuck in Launched", now)));
            }
            TaskState::StartInitiated => {
                let limit = if job.descriptor.is_batch() {
                    cfg.start_initiated_timeout_batch_ms
                } else {
                    cfg.start_initiated_timeout_service_ms
                };
                if since > limit {
                    out.push(update(
                        t,
                        status(TaskState::KillInitiated, reason::STUCK_IN_STATE, "stuck in StartInitiated", now),
                    ));
                }
            }
            TaskState::KillInitiated if since > cfg.kill_initiated_timeout_ms => {
                out.push(update(
                    t,
                    status(TaskState::Finished, reason::STUCK_IN_KILLING_STATE, "no kill confirmation", now),
                ));
            }
            TaskState::Started if unhealthy_too_long(job, t, now) => {
                let check = job.container_of(t.job_version()).health_check.as_ref();
                let after = check.map_or(0, |c| c.replace_after_sec);
                out.push(update(
                    t,
                    status(
                        TaskState::KillInitiated,
                        reason::UNHEALTHY,
                        &format!("its health check failed for over {after} s: replaced"),
                        now,
                    ),
                ));
            }
            TaskState::Started => {
                if let JobType::Batch { runtime_limit_sec, .. } = job.descriptor.job_type {
                    let started = t.entered(TaskState::Started).unwrap_or(t.status.timestamp_ms);
                    let limit_ms = i64::try_from(runtime_limit_sec).unwrap_or(i64::MAX).saturating_mul(1000);
                    if runtime_limit_sec > 0 && now.saturating_sub(started) > limit_ms {
                        out.push(update(
                            t,
                            status(
                                TaskState::KillInitiated,
                                reason::RUNTIME_LIMIT_EXCEEDED,
                                "runtime limit exceeded",
                                now,
                            ),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Whether `t`, a service's task, has been unhealthy past its health check's `replace_after_sec`.
fn unhealthy_too_long(job: &Job, t: &Task, now: i64) -> bool {
    let Some(check) = job.container_of(t.job_version()).health_check.as_ref() else { return false };
    if job.descriptor.is_batch() || check.replace_after_sec == 0 || t.health() != Some("unhealthy") {
        return false;
    }
    let since: i64 = t.context.get(context::HEALTH_SINCE).and_then(|s| s.parse().ok()).unwrap_or(now);
    elapsed(since, u64::from(check.replace_after_sec) * 1000, now)
}

/// Whether a live task serves: Started, healthy when its container has a health check, and (for
/// a job being deployed behind target groups) in `serving` when that is given.
pub(crate) fn serves(job: &Job, t: &Task, serving: Option<&BTreeSet<String>>) -> bool {
    let healthy = job.container_of(t.job_version()).health_check.is_none() || t.health() == Some("healthy");
    t.state() == TaskState::Started && healthy && serving.is_none_or(|ok| ok.contains(&t.id))
}

/// Most tasks created by one log entry: a 10,000-task job is many modest entries, each replicated
/// within a heartbeat, not one of megabytes.
pub const CREATE_TASKS_PER_ENTRY: usize = 100;

/// `CreateTasks` commands for `create` (each new task with the finished one it replaces, archived
/// in the same entry so the retry count carries over) and `archive` (finished tasks no longer
/// wanted), in entries of at most [`CREATE_TASKS_PER_ENTRY`] tasks.
pub(crate) fn create_tasks(out: &mut Vec<Command>, create: Vec<(Task, Option<String>)>, archive: Vec<String>) {
    if create.is_empty() {
        if !archive.is_empty() {
            out.push(Command::CreateTasks { tasks: Vec::new(), archive });
        }
        return;
    }
    let mut extra = archive;
    for chunk in create.chunks(CREATE_TASKS_PER_ENTRY) {
        let mut archive = std::mem::take(&mut extra);
        archive.extend(chunk.iter().filter_map(|(_, replaced)| replaced.clone()));
        out.push(Command::CreateTasks { tasks: chunk.iter().map(|(t, _)| t.clone()).collect(), archive });
    }
}

/// What to do about one job, a task counting as available when Started.
pub fn plan_job(
    job: &Job,
    tasks: &[Task],
    now: i64,
    cfg: &LifecycleConfig,
    new_id: &mut dyn FnMut() -> String,
) -> Vec<Command> {
    plan_job_with(job, tasks, now, cfg, new_id, &|t: &Task| t.state() == TaskState::Started)
}

/// What to do about one job; `available` says whether a live task serves (a deployment waits for
/// new tasks to).
pub fn plan_job_with(
    job: &Job,
    tasks: &[Task],
    now: i64,
    cfg: &LifecycleConfig,
    new_id: &mut dyn FnMut() -> String,
    available: &dyn Fn(&Task) -> bool,
) -> Vec<Command> {
    let mut out = Vec::new();
    timeouts(job, tasks, now, cfg, &mut out);
    match job.status.state {
        JobState::Finished => {}
        JobState::KillInitiated => {
            for t in tasks.iter().filter(|t| t.state().is_live() && t.state() != TaskState::KillInitiated) {
                let to = if t.state() == TaskState::Accepted { TaskState::Finished } else { TaskState::KillInitiated };
                out.push(update(t, status(to, reason::KILLED, "job killed", now)));
            }
            if tasks.iter().all(|t| !t.state().is_live()) {
                out.push(Command::FinishJob {
                    job_id: job.id.clone(),
                    reason_code: reason::KILLED.into(),
                    reason_message: "job killed".into(),
                    timestamp_ms: now,
                });
            }
        }
        JobState::Accepted => match &job.descriptor.job_type {
            JobType::Batch { size, retry_policy, retry_on_runtime_limit, .. } => {
                let mut create = Vec::new();
                let mut all_done = true;
                let mut all_normal = true;
                for index in 0..*size {
                    let Some(t) = tasks.iter().filter(|t| t.index == index).max_by_key(|t| t.resubmit_number) else {
                        create.push((new_task(job, index, None, now, new_id), None));
                        all_done = false;
                        continue;
                    };
                    if t.state().is_live() {
                        all_done = false;
                        continue;
                    }
                    let r = t.status.reason_code.as_str();
                    if r == reason::NORMAL {
                        continue;
                    }
                    let counts = reason::counts_against_retries(r);
                    let exhausted = (r == reason::RUNTIME_LIMIT_EXCEEDED && !retry_on_runtime_limit)
                        || (counts && t.counted_retries() >= retry_policy.retries());
                    if exhausted {
                        all_normal = false;
                        continue;
                    }
                    all_done = false;
                    let delay = if counts { retry_policy.delay_ms(t.counted_retries().saturating_add(1)) } else { 0 };
                    if elapsed(t.status.timestamp_ms, delay, now) {
                        create.push((new_task(job, index, Some(t), now, new_id), Some(t.id.clone())));
                    }
                }
                if !create.is_empty() {
                    create_tasks(&mut out, create, Vec::new());
                } else if all_done {
                    let (code, message) = if all_normal {
                        (reason::NORMAL, "all tasks completed")
                    } else {
                        (reason::FAILED, "tasks failed beyond their retries")
                    };
                    out.push(Command::FinishJob {
                        job_id: job.id.clone(),
                        reason_code: code.into(),
                        reason_message: message.into(),
                        timestamp_ms: now,
                    });
                }
            }
            JobType::Service { capacity, enabled, retry_policy, .. } => {
                let active: Vec<&Task> =
                    tasks.iter().filter(|t| t.state().is_live() && t.state() != TaskState::KillInitiated).collect();
                let mut finished: Vec<&Task> = tasks.iter().filter(|t| !t.state().is_live()).collect();
                finished.sort_by_key(|t| (t.status.timestamp_ms, t.index));
                let wanted = capacity.desired as usize;
                let mut create = Vec::new();
                let mut archive = Vec::new();
                let ready = replacement_ready(retry_policy, &finished, now);
                if let Some(d) = job.rollout.active() {
                    // A disabled job keeps its tasks as they are (as without a deployment): its
                    // deployment waits until it is enabled again.
                    if *enabled {
                        let wanted = capacity.desired;
                        let round = super::deployment::plan(job, d, tasks, wanted, ready, available, now, new_id);
                        out.extend(round.commands);
                    }
                    return out;
                }
                if *enabled && active.len() < wanted {
                    if ready {
                        // Indexes of every live task, those being killed included, are taken.
                        let mut used: BTreeSet<u32> =
                            tasks.iter().filter(|t| t.state().is_live()).map(|t| t.index).collect();
                        let mut need = wanted - active.len();
                        for t in &finished {
                            if need == 0 {
                                break;
                            }
                            if used.contains(&t.index) {
                                continue;
                            }
                            create.push((new_task(job, t.index, Some(t), now, new_id), Some(t.id.clone())));
                            used.insert(t.index);
                            need -= 1;
                        }
                        let mut index = 0;
                        while need > 0 {
                            if !used.contains(&index) {
                                create.push((new_task(job, index, None, now, new_id), None));
                                used.insert(index);
                                need -= 1;
                            }
                            index += 1;
                        }
                    }
                } else if active.len() >= wanted {
                    // Finished tasks that will not be replaced leave the active set.
                    archive.extend(finished.iter().map(|t| t.id.clone()));
                }
                if *enabled && active.len() > wanted {
                    // Scale down: never-launched tasks first, then the highest indexes.
                    let mut victims = active.clone();
                    victims.sort_by_key(|t| (t.state() != TaskState::Accepted, std::cmp::Reverse(t.index)));
                    for t in victims.into_iter().take(active.len() - wanted) {
                        let to = if t.state() == TaskState::Accepted {
                            TaskState::Finished
                        } else {
                            TaskState::KillInitiated
                        };
                        out.push(update(t, status(to, reason::SCALED_DOWN, "job scaled down", now)));
                    }
                }
                create_tasks(&mut out, create, archive);
            }
        },
    }
    out
}

/// Whether a service job may replace a task now: not while the back-off after its newest failure
/// (by its retry policy) runs. `finished`: its finished tasks, oldest first.
fn replacement_ready(retry_policy: &RetryPolicy, finished: &[&Task], now: i64) -> bool {
    let newest_failure = finished
        .iter()
        .rev()
        .find(|t| reason::counts_against_retries(&t.status.reason_code) && t.status.reason_code != reason::NORMAL);
    newest_failure.is_none_or(|t| elapsed(t.status.timestamp_ms, service_replacement_delay_ms(retry_policy, t), now))
}

/// What the job's active deployment waits for now, as the lifecycle's next round would decide
/// it (None: no active deployment, or it moves this round).
pub fn deployment_waiting(store: &dyn StateRead, job: &Job, now: i64) -> Result<Option<String>> {
    let (Some(d), JobType::Service { capacity, enabled, retry_policy, .. }) =
        (job.rollout.active(), &job.descriptor.job_type)
    else {
        return Ok(None);
    };
    if job.status.state != JobState::Accepted {
        return Ok(None);
    }
    if !enabled {
        return Ok(Some("the job is disabled: its deployment waits until it is enabled".into()));
    }
    let tasks = store.tasks_of_job(&job.id)?;
    let targets = serving_targets(store, job)?;
    let available = |t: &Task| serves(job, t, targets.as_ref());
    let mut finished: Vec<&Task> = tasks.iter().filter(|t| !t.state().is_live()).collect();
    finished.sort_by_key(|t| (t.status.timestamp_ms, t.index));
    let ready = replacement_ready(retry_policy, &finished, now);
    let mut no_ids = String::new;
    Ok(super::deployment::plan(job, d, &tasks, capacity.desired, ready, &available, now, &mut no_ids).waiting)
}

/// Agents being drained, each with when its drain began (ms; 0: before that was recorded).
pub type Draining = BTreeMap<String, i64>;

/// Agents being drained, by an operator or with their instance group (PhasedOut or Removable):
/// their service tasks move.
pub fn draining_agents(store: &dyn StateRead) -> Result<Draining> {
    let mut groups = BTreeMap::new();
    let mut out = Draining::new();
    for agent in store.agents()? {
        if !groups.contains_key(&agent.instance_group) {
            let group = store.instance_group(&agent.instance_group)?.map(|g| (g.lifecycle, g.lifecycle_since_ms));
            groups.insert(agent.instance_group.clone(), group);
        }
        let by_group = match groups[&agent.instance_group] {
            Some((Lifecycle::PhasedOut | Lifecycle::Removable, since)) => Some(since.unwrap_or(0)),
            _ => None,
        };
        let by_agent = agent.draining.then(|| agent.draining_since_ms.unwrap_or(0));
        if let Some(since) = by_group.into_iter().chain(by_agent).min() {
            out.insert(agent.id, since);
        }
    }
    Ok(out)
}

/// Until when a self-managed job's owner may move its task off an agent drained since `since`
/// (Titus's `relocationTimeMs`): a drain leaves the task alone until then. None: it may move now.
pub fn relocation_until(job: &Job, since: i64, now: i64) -> Option<i64> {
    let budget = &job.descriptor.disruption_budget;
    if !budget.is_self_managed() || budget.self_managed_relocation_time_ms == 0 {
        return None;
    }
    let until = since.saturating_add(i64::try_from(budget.self_managed_relocation_time_ms).unwrap_or(i64::MAX));
    (until > now).then_some(until)
}

/// Moves a service job's tasks off draining agents, a few at a time (Titus's task migration): a
/// Started task there is killed as evicted (not counted against retries) as far as the job's
/// disruption budget allows (see `model::budget`); a self-managed budget moves a tenth of desired
/// (at least one) at a time, counting those on their way (placed but not yet Started, or being
/// killed), once its relocation time (if any) has passed since the drain began. The job's
/// lifecycle then creates each replacement, which the scheduler places on an Active agent. Batch
/// tasks are left to finish.
pub fn drain_job(job: &Job, tasks: &[Task], draining: &Draining, now: i64) -> Vec<Command> {
    let JobType::Service { capacity, enabled: true, .. } = &job.descriptor.job_type else { return Vec::new() };
    if job.status.state != JobState::Accepted || draining.is_empty() {
        return Vec::new();
    }
    let on_draining = |t: &&Task| {
        agent_of(t).and_then(|a| draining.get(a)).is_some_and(|since| relocation_until(job, *since, now).is_none())
    };
    let mut moving: Vec<&Task> = tasks.iter().filter(|t| t.state() == TaskState::Started).filter(on_draining).collect();
    if moving.is_empty() {
        return Vec::new();
    }
    let serving = |t: &Task| serves(job, t, None);
    let allowance = drain_allowance(job, capacity.desired, tasks, now);
    let (mut any, mut of_available) = (allowance.any as usize, allowance.available as usize);
    // Those not serving first: moving them costs the service nothing.
    moving.sort_by_key(|t| serving(t));
    let mut chosen = Vec::new();
    for t in moving {
        let serves = serving(t);
        if any == 0 || (serves && of_available == 0) {
            if let Some(why) = &allowance.held_by {
                tracing::debug!(job_id = %job.id, task_id = %t.id, why, "drain: held back by the disruption budget");
            }
            break;
        }
        any -= 1;
        of_available -= usize::from(serves);
        chosen.push(t);
    }
    chosen
        .into_iter()
        .map(|t| {
            let agent = agent_of(t).unwrap_or_default();
            update(
                t,
                status(
                    TaskState::KillInitiated,
                    reason::EVICTED,
                    &format!("agent {agent} is drained: task moved"),
                    now,
                ),
            )
        })
        .collect()
}

/// How many of a service job's tasks a drain may move now: its disruption budget's allowance, or
/// for a self-managed job the drain's own pace — a tenth of desired (at least one) on its way at
/// once, counting those placed but not yet Started and those being killed.
pub fn drain_allowance(job: &Job, desired: u32, tasks: &[Task], now: i64) -> crate::model::budget::Allowance {
    let budget = &job.descriptor.disruption_budget;
    let available = tasks.iter().filter(|t| serves(job, t, None)).count() as u32;
    let mut allowance = budget.allowance(desired, available, &job.evictions_ms, now);
    if budget.is_self_managed() {
        let in_flight = tasks.iter().filter(|t| t.state().is_live() && t.state() != TaskState::Started).count();
        let pace = (desired as usize).div_ceil(10).max(1).saturating_sub(in_flight) as u32;
        if pace < allowance.any {
            allowance.any = pace;
            allowance.available = allowance.available.min(pace);
            if pace == 0 && allowance.held_by.is_none() {
                allowance.held_by = Some(format!("{in_flight} of the job's tasks are on their way already (a self-managed job moves a tenth at a time)"));
            }
        }
    }
    allowance
}

/// What a job's disruption budget lets an eviction (EvictTask; Titus's TerminateTask) take now:
/// `available` of its tasks that serve, `any` of the others. The rule EvictTask is judged by when
/// applied, and what GetEvictionQuota reports.
pub fn eviction_allowance(job: &Job, tasks: &[Task], now: i64) -> crate::model::budget::Allowance {
    let available = tasks.iter().filter(|t| serves(job, t, None)).count() as u32;
    job.descriptor.disruption_budget.allowance(job.descriptor.wanted_tasks(), available, &job.evictions_ms, now)
}

/// How many evictions like `task`'s the allowance leaves: a task that serves counts against the
/// availability limits too.
pub fn eviction_quota(job: &Job, allowance: &crate::model::budget::Allowance, task: &Task) -> u32 {
    if serves(job, task, None) {
        allowance.available
    } else {
        allowance.any
    }
}

/// What to do about every active job.
pub fn plan(
    store: &dyn StateRead,
    now: i64,
    cfg: &LifecycleConfig,
    new_id: &mut dyn FnMut() -> String,
) -> Result<Vec<Command>> {
    let mut out = Vec::new();
    let draining = draining_agents(store)?;
    for job in store.jobs()? {
        out.extend(plan_one(store, &job, now, cfg, new_id, Some(&draining)));
    }
    Ok(out)
}

/// One job's commands. A job whose tasks cannot be read, or whose planning fails, is logged and
/// counted and yields nothing this round; the other jobs are planned as usual (one bad record once
/// stopped the lifecycle for every job).
fn plan_one(
    store: &dyn StateRead,
    job: &Job,
    now: i64,
    cfg: &LifecycleConfig,
    new_id: &mut dyn FnMut() -> String,
    draining: Option<&Draining>,
) -> Vec<Command> {
    let tasks = match store.tasks_of_job(&job.id) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(job_id = %job.id, error = %e, "lifecycle: cannot read the job's tasks; skipping it this round");
            crate::telemetry::metrics().lifecycle_job_errors_total.inc(&[]);
            return Vec::new();
        }
    };
    // The planner is pure and its arithmetic saturates; this catches what a future bug might still
    // do, so that it costs one job its round instead of every leader its lifecycle.
    let available = match serving_targets(store, job) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(job_id = %job.id, error = %e, "lifecycle: cannot read the job's load balancer targets; skipping it this round");
            crate::telemetry::metrics().lifecycle_job_errors_total.inc(&[]);
            return Vec::new();
        }
    };
    let available = |t: &Task| serves(job, t, available.as_ref());
    let planned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut commands = plan_job_with(job, &tasks, now, cfg, new_id, &available);
        if let Some(draining) = draining {
            commands.extend(drain_job(job, &tasks, draining, now));
        }
        commands
    }));
    planned.unwrap_or_else(|_| {
        tracing::error!(job_id = %job.id, "lifecycle: planning this job failed; skipping it this round");
        crate::telemetry::metrics().lifecycle_job_errors_total.inc(&[]);
        Vec::new()
    })
}

/// For a job with an active deployment behind load balancers: the tasks whose targets in every
/// active target group are registered and report healthy (None: availability is not gated on
/// load balancers).
pub(crate) fn serving_targets(store: &dyn StateRead, job: &Job) -> Result<Option<BTreeSet<String>>> {
    use crate::model::load_balancer::{AssociationState, TargetState};
    if job.rollout.active().is_none() {
        return Ok(None);
    }
    let groups: BTreeSet<String> = store
        .load_balancers()?
        .into_iter()
        .filter(|a| a.job_id == job.id && a.state == AssociationState::Active)
        .map(|a| a.target_group)
        .collect();
    if groups.is_empty() {
        return Ok(None);
    }
    let mut healthy: BTreeMap<String, usize> = BTreeMap::new();
    for t in store.lb_targets()? {
        if t.job_id == job.id
            && groups.contains(&t.target_group)
            && t.state == TargetState::Registered
            && t.health == "healthy"
        {
            *healthy.entry(t.task_id).or_default() += 1;
        }
    }
    Ok(Some(healthy.into_iter().filter(|(_, n)| *n == groups.len()).map(|(id, _)| id).collect()))
}

/// What to do about the jobs named (those that no longer exist are skipped).
pub fn plan_jobs<'a>(
    store: &dyn StateRead,
    job_ids: impl IntoIterator<Item = &'a String>,
    now: i64,
    cfg: &LifecycleConfig,
    new_id: &mut dyn FnMut() -> String,
) -> Result<Vec<Command>> {
    let mut out = Vec::new();
    for id in job_ids {
        if let Some(job) = store.job(id)? {
            out.extend(plan_one(store, &job, now, cfg, new_id, None));
        }
    }
    Ok(out)
}
