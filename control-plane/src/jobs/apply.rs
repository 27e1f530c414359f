//! The rules of jobs, tasks and agents, applied to an [`Overlay`] (each command's arm in
//! [`crate::apply`] calls one of these): deterministic, reads only replicated state, and rejects
//! (changing nothing) what the state does not allow.

use crate::command::DeploymentChange;
use crate::command::{CommandResponse, Rejection, RejectionKind};
use crate::error::Result;
use crate::jobs::hosts;
use crate::model::deployment::{DeploymentState, RolloutStrategy};
use crate::model::job::{
    validate_capacity, Container, DisruptionBudget, Job, JobDescriptor, JobState, JobStatus, JobType,
    DEFAULT_CAPACITY_GROUP, MAX_TASKS_PER_JOB,
};
use crate::state::{Overlay, StateRead, TokenRecord};
use std::collections::BTreeMap;
use titus_scheduler::Constraints;

use crate::model::agent::{AgentState, Lifecycle};
use crate::model::task::{context, reason, Task, TaskState, TaskStatus};
use crate::model::ResourceDimension;

fn reject(kind: RejectionKind, field: &str, message: impl Into<String>) -> Result<CommandResponse> {
    Ok(CommandResponse::Rejected(Rejection::new(kind, field, message)))
}

fn not_found(field: &str, what: &str, id: &str) -> Result<CommandResponse> {
    reject(RejectionKind::NotFound, field, format!("{what} {id:?} does not exist"))
}

/// Key of a job's idempotency token in the token table.
pub fn job_token_key(token: &str) -> String {
    format!("job/{token}")
}

pub fn update_job_status(o: &mut Overlay, job_id: &str, enabled: bool) -> Result<CommandResponse> {
    with_service_job(o, job_id, "enable_status", |job| {
        if let JobType::Service { enabled: e, .. } = &mut job.descriptor.job_type {
            *e = enabled;
        }
        Ok(())
    })
}

pub fn update_job_processes(
    o: &mut Overlay,
    job_id: &str,
    processes: crate::model::job::ServiceJobProcesses,
) -> Result<CommandResponse> {
    with_service_job(o, job_id, "service_job_processes", |job| {
        if let JobType::Service { processes: p, .. } = &mut job.descriptor.job_type {
            *p = processes;
        }
        Ok(())
    })
}

/// Replaces a job's disruption budget. Checked again here, as every value that reaches the log is
/// where it is applied: a budget the API let through by mistake must not stall every drain.
pub fn update_job_disruption_budget(
    o: &mut Overlay,
    job_id: &str,
    budget: DisruptionBudget,
) -> Result<CommandResponse> {
    let mut job = match live_job(o, job_id)? {
        Err(r) => return Ok(r),
        Ok(j) => j,
    };
    let mut first: Option<(String, String)> = None;
    budget.validate(&mut |field, description| {
        first.get_or_insert((field.to_string(), description));
    });
    if let Some((field, description)) = first {
        return reject(RejectionKind::InvalidArgument, &field, description);
    }
    job.descriptor.disruption_budget = budget;
    o.put_job(job);
    Ok(CommandResponse::Done)
}

pub fn update_job_attributes(
    o: &mut Overlay,
    job_id: &str,
    attributes: BTreeMap<String, String>,
) -> Result<CommandResponse> {
    Ok(match live_job(o, job_id)? {
        Err(r) => r,
        Ok(mut job) => {
            job.descriptor.attributes.extend(attributes);
            o.put_job(job);
            CommandResponse::Done
        }
    })
}

pub fn delete_job_attributes(o: &mut Overlay, job_id: &str, keys: Vec<String>) -> Result<CommandResponse> {
    Ok(match live_job(o, job_id)? {
        Err(r) => r,
        Ok(mut job) => {
            for k in keys {
                job.descriptor.attributes.remove(&k);
            }
            o.put_job(job);
            CommandResponse::Done
        }
    })
}

/// Why two service jobs are not compatible for a MoveTask (None: they are): the same owner,
/// application, capacity group and container — the task runs as the target job's own would.
/// What may differ is what does not touch a running task (Titus's rule): job group, attributes,
/// capacity, enabled, processes, retry policy, disruption budget.
fn incompatible(source: &Job, target: &Job, version: u32) -> Option<String> {
    let (s, t) = (&source.descriptor, &target.descriptor);
    if s.is_batch() || t.is_batch() {
        return Some("only tasks of service jobs move, to a service job".into());
    }
    if s.owner_email != t.owner_email {
        return Some("the jobs have different owners".into());
    }
    if s.application_name != t.application_name {
        return Some("the jobs are of different applications".into());
    }
    if s.capacity_group != t.capacity_group {
        return Some("the jobs are in different capacity groups".into());
    }
    if source.container_of(version) != &t.container {
        return Some("the task's container differs from the target job's (image, resources, command, env, ...)".into());
    }
    if source.rollout.active().is_some() || target.rollout.active().is_some() {
        return Some("a job being deployed takes or gives no task until its deployment ends".into());
    }
    None
}

/// Moves a live task to a compatible service job (see `Command::MoveTask`). A task behind either
/// job's load balancers does not move: its targets would have to change groups with it.
pub fn move_task(o: &mut Overlay, task_id: &str, source_id: &str, target_id: &str) -> Result<CommandResponse> {
    let Some(mut task) = o.task(task_id)? else { return not_found("task_id", "task", task_id) };
    if task.job_id != source_id {
        return reject(
            RejectionKind::FailedPrecondition,
            "source_job_id",
            format!("task {task_id:?} is of job {:?}, not {source_id:?}", task.job_id),
        );
    }
    if source_id == target_id {
        return reject(RejectionKind::InvalidArgument, "target_job_id", "the target job is the source job");
    }
    if !task.state().is_live() || task.state() == TaskState::KillInitiated {
        return reject(RejectionKind::FailedPrecondition, "task_id", format!("task {task_id:?} is {:?}", task.state()));
    }
    let mut source = match live_job(o, source_id)? {
        Err(r) => return Ok(r),
        Ok(j) => j,
    };
    let Some(mut target) = o.job(target_id)?.filter(|j| j.status.state == JobState::Accepted) else {
        let why = match o.job(target_id)?.or(o.archived_job(target_id)?) {
            Some(j) => format!("job {target_id:?} is {:?}", j.status.state),
            None => format!("job {target_id:?} does not exist"),
        };
        return reject(RejectionKind::FailedPrecondition, "target_job_id", why);
    };
    if let Some(why) = incompatible(&source, &target, task.job_version()) {
        return reject(RejectionKind::FailedPrecondition, "target_job_id", why);
    }
    if o.load_balancers()?.iter().any(|l| l.job_id == source_id || l.job_id == target_id) {
        return reject(
            RejectionKind::FailedPrecondition,
            "target_job_id",
            "a task of a job behind load balancers cannot move (its targets would change groups)",
        );
    }
    let (
        JobType::Service { capacity: from, processes: from_processes, .. },
        JobType::Service { capacity: to, processes: to_processes, .. },
    ) = (&mut source.descriptor.job_type, &mut target.descriptor.job_type)
    else {
        return reject(RejectionKind::FailedPrecondition, "target_job_id", "only service jobs' tasks move");
    };
    if from_processes.disable_decrease_desired || to_processes.disable_increase_desired {
        return reject(
            RejectionKind::FailedPrecondition,
            "target_job_id",
            "the jobs' processes disable decreasing the source's desired or increasing the target's",
        );
    }
    if from.desired == 0 || from.desired <= from.min {
        return reject(
            RejectionKind::FailedPrecondition,
            "source_job_id",
            format!("job {source_id:?} would go below its min of {}", from.min),
        );
    }
    if to.desired >= to.max {
        return reject(
            RejectionKind::FailedPrecondition,
            "target_job_id",
            format!("job {target_id:?} would go above its max of {}", to.max),
        );
    }
    from.desired -= 1;
    to.desired += 1;
    // The task takes the lowest index free among the target's live tasks, and its version.
    let used: std::collections::BTreeSet<u32> =
        o.tasks_of_job(target_id)?.iter().filter(|t| t.state().is_live()).map(|t| t.index).collect();
    task.index = (0..).find(|i| !used.contains(i)).unwrap_or(0);
    task.job_id = target_id.to_string();
    task.context.insert(context::MOVED_FROM_JOB.into(), source_id.to_string());
    match target.rollout.version {
        0 => task.context.remove(context::JOB_VERSION),
        v => task.context.insert(context::JOB_VERSION.into(), v.to_string()),
    };
    o.put_job(source);
    o.put_job(target);
    o.put_task(task);
    Ok(CommandResponse::Done)
}

/// Sets a live task's attributes: each checked as a job's are, and at most `MAX_ATTRIBUTES` in all
/// once merged (checked here, where the task is read).
pub fn update_task_attributes(
    o: &mut Overlay,
    task_id: &str,
    attributes: BTreeMap<String, String>,
) -> Result<CommandResponse> {
    let Some(mut task) = o.task(task_id)? else { return not_found("task_id", "task", task_id) };
    task.attributes.extend(attributes);
    let mut first: Option<(String, String)> = None;
    crate::model::job::validate_attributes(&task.attributes, &mut |field: &str, why: String| {
        first.get_or_insert((field.to_string(), why));
    });
    if let Some((field, why)) = first {
        return reject(RejectionKind::InvalidArgument, &field, why);
    }
    o.put_task(task);
    Ok(CommandResponse::Done)
}

pub fn delete_task_attributes(o: &mut Overlay, task_id: &str, keys: Vec<String>) -> Result<CommandResponse> {
    let Some(mut task) = o.task(task_id)? else { return not_found("task_id", "task", task_id) };
    for k in keys {
        task.attributes.remove(&k);
    }
    o.put_task(task);
    Ok(CommandResponse::Done)
}

/// One task's new status, refused when the task is no longer in the state the plan saw.
pub fn update_task_status(
    o: &mut Overlay,
    task_id: &str,
    status: TaskStatus,
    context: BTreeMap<String, String>,
    expected_state: Option<TaskState>,
) -> Result<CommandResponse> {
    let Some(task) = o.task(task_id)? else { return not_found("task_id", "task", task_id) };
    match expected_state {
        Some(seen) if seen != task.state() => reject(
            RejectionKind::FailedPrecondition,
            "expected_state",
            format!("task {task_id} is {:?} now, not {seen:?} as planned", task.state()),
        ),
        _ => update_status(o, task, status, context),
    }
}

/// An agent's batch of reports: each applies only to a task placed on that agent.
pub fn update_task_statuses(o: &mut Overlay, reports: Vec<crate::command::StatusReport>) -> Result<CommandResponse> {
    for r in reports {
        let Some(task) = o.task(&r.task_id)? else { continue };
        if agent_of(&task) != Some(r.agent_id.as_str()) {
            continue;
        }
        if r.status.state == task.state() {
            // Within a state, only its health may change.
            let mut task = task;
            if note_health(&mut task, &r.context, r.status.timestamp_ms) {
                o.put_task(task);
            }
        } else {
            update_status(o, task, r.status, r.context)?;
        }
    }
    Ok(CommandResponse::Done)
}

/// A job whose tasks are all terminal moves to the archive with them.
pub fn finish_job(
    o: &mut Overlay,
    job_id: &str,
    reason_code: String,
    reason_message: String,
    timestamp_ms: i64,
) -> Result<CommandResponse> {
    let Some(mut job) = o.job(job_id)? else { return not_found("job_id", "job", job_id) };
    let tasks = o.tasks_of_job(job_id)?;
    if let Some(live) = tasks.iter().find(|t| t.state().is_live()) {
        return reject(
            RejectionKind::FailedPrecondition,
            "job_id",
            format!("task {:?} of job {job_id:?} is still {}", live.id, live.state().name()),
        );
    }
    job.set_status(JobStatus { state: JobState::Finished, reason_code, reason_message, timestamp_ms });
    for t in tasks {
        o.archive_task(t);
    }
    o.archive_job(job);
    Ok(CommandResponse::Done)
}

pub fn purge_archive(o: &mut Overlay, job_ids: Vec<String>, tokens: Vec<String>) -> Result<CommandResponse> {
    for id in job_ids {
        if let Some(job) = o.archived_job(&id)? {
            o.forget_archived_job(job)?;
        }
    }
    for key in tokens {
        o.changes.tokens.insert(key, None);
    }
    Ok(CommandResponse::Done)
}

pub fn mark_agent_terminating(o: &mut Overlay, agent_id: &str, terminating: bool) -> Result<CommandResponse> {
    Ok(match o.agent(agent_id)? {
        None => not_found("agent_id", "agent", agent_id)?,
        Some(mut a) => {
            a.terminating = terminating;
            o.put_agent(a);
            CommandResponse::Done
        }
    })
}

pub fn set_agent_draining(
    o: &mut Overlay,
    agent_id: &str,
    draining: bool,
    timestamp_ms: i64,
) -> Result<CommandResponse> {
    let Some(mut agent) = o.agent(agent_id)? else { return not_found("agent_id", "agent", agent_id) };
    if agent.draining != draining {
        agent.draining = draining;
        agent.draining_since_ms = Some(timestamp_ms).filter(|_| draining);
        o.put_agent(agent);
    }
    Ok(CommandResponse::Done)
}

pub fn set_agent_health(o: &mut Overlay, agent_id: &str, healthy: bool, reason: String) -> Result<CommandResponse> {
    Ok(match o.agent(agent_id)? {
        None => not_found("agent_id", "agent", agent_id)?,
        Some(mut a) => {
            a.healthy = healthy;
            a.unhealthy_reason = reason;
            o.put_agent(a);
            CommandResponse::Done
        }
    })
}

/// Key of the claim that binds an EC2 instance to the one agent that registered on it first.
pub fn instance_claim_key(instance_id: &str) -> String {
    format!("instance/{instance_id}")
}

/// An agent registers (again). The instance it says it runs on is bound to it from its first
/// registration: capacity picks idle instances by this binding, so an agent claiming another's
/// instance could have a busy host terminated or keep an idle one. The binding lives in the token
/// table (one key per instance, never expiring: EC2 never reuses an instance id), so a check costs
/// one read, not a scan of the fleet. An agent moves to another instance only after it was
/// declared lost (its tasks were replaced); its old instance stays bound to it.
pub fn register_agent(o: &mut Overlay, mut agent: crate::model::agent::Agent) -> Result<CommandResponse> {
    let existing = o.agent(&agent.id)?;
    let field = format!("attributes.{}", crate::model::agent::INSTANCE_ID_ATTRIBUTE);
    if let Some(instance) = agent.instance_id().map(str::to_string) {
        let key = instance_claim_key(&instance);
        match o.token(&key)? {
            Some(claim) if claim.result != agent.id => {
                return reject(
                    RejectionKind::FailedPrecondition,
                    &field,
                    format!("instance {instance:?} is bound to agent {:?}, which registered on it first", claim.result),
                );
            }
            Some(_) => {}
            None => {
                let moved = existing
                    .as_ref()
                    .filter(|e| e.state != AgentState::Lost)
                    .and_then(|e| e.instance_id())
                    .filter(|old| *old != instance);
                if let Some(old) = moved {
                    return reject(
                        RejectionKind::FailedPrecondition,
                        &field,
                        format!(
                            "agent {:?} runs on instance {old:?}; it may move to {instance:?} only once it is declared lost",
                            agent.id
                        ),
                    );
                }
                o.put_token(key, TokenRecord { result: agent.id.clone(), expires_ms: i64::MAX });
            }
        }
    }
    if let Some(existing) = existing {
        agent.registered_ms = existing.registered_ms;
        agent.terminating = existing.terminating;
        agent.draining = existing.draining;
        agent.draining_since_ms = existing.draining_since_ms;
    }
    o.put_agent(agent);
    Ok(CommandResponse::Done)
}

pub use crate::state::{agent_of, Allocation};

/// Per agent, the resources its live tasks hold (what each was placed with) and their count:
/// the one definition placement planning, placement applying and the agent API share.
pub fn allocation_by_agent(read: &dyn StateRead) -> Result<BTreeMap<String, Allocation>> {
    read.allocations()
}

pub fn agent_lost(o: &mut Overlay, agent_id: &str, timestamp_ms: i64) -> Result<CommandResponse> {
    let Some(mut agent) = o.agent(agent_id)? else { return not_found("agent_id", "agent", agent_id) };
    agent.state = AgentState::Lost;
    agent.lost_ms = Some(timestamp_ms);
    o.put_agent(agent);
    for id in o.task_ids_on_agent(agent_id)? {
        let Some(mut t) = o.task(&id)? else { continue };
        if agent_of(&t) == Some(agent_id) && t.state().is_live() {
            let status = TaskStatus {
                state: TaskState::Finished,
                reason_code: reason::LOST.into(),
                reason_message: format!("agent {agent_id} lost"),
                timestamp_ms,
            };
            if t.transition(status) {
                o.put_task(t);
            }
        }
    }
    Ok(CommandResponse::Done)
}

/// Moves a task to its next state, or rejects an illegal transition (changing nothing).
fn update_status(
    o: &mut Overlay,
    mut task: Task,
    mut status: TaskStatus,
    context: BTreeMap<String, String>,
) -> Result<CommandResponse> {
    let from = task.state();
    // A kill's reason (scaledDown, runtimeLimitExceeded, ...) is why the task finished.
    if from == TaskState::KillInitiated
        && status.state == TaskState::Finished
        && matches!(status.reason_code.as_str(), "" | reason::KILLED | reason::NORMAL)
    {
        status.reason_code = task.status.reason_code.clone();
    }
    let to = status.state;
    if !task.transition(status) {
        return reject(
            RejectionKind::FailedPrecondition,
            "state",
            format!("task {:?} cannot move from {} to {}", task.id, from.name(), to.name()),
        );
    }
    let at = task.status.timestamp_ms;
    note_health(&mut task, &context, at);
    task.context.extend(context);
    let evicted = task.status.reason_code == reason::EVICTED && from != TaskState::KillInitiated;
    if evicted {
        record_eviction(o, &task.job_id, at)?;
    }
    if to == TaskState::Finished && deployment_failure(&task.status.reason_code) {
        count_deployment_failure(o, &task)?;
    }
    o.put_task(task);
    Ok(CommandResponse::Done)
}

/// Notes a voluntary disruption of a task of `job_id` at `at_ms`, for its budget's rate limit (kept
/// only when the budget has one, and only as many as it allows).
fn record_eviction(o: &mut Overlay, job_id: &str, at_ms: i64) -> Result<()> {
    let Some(mut job) = o.job(job_id)? else { return Ok(()) };
    let limit = job.descriptor.disruption_budget.evictions_kept(job.descriptor.wanted_tasks());
    if limit == 0 {
        return Ok(());
    }
    job.evictions_ms.push(at_ms);
    let extra = job.evictions_ms.len().saturating_sub(limit);
    job.evictions_ms.drain(..extra);
    o.put_job(job);
    Ok(())
}

/// Takes the health `context` reports, noting when it changed; whether it did.
fn note_health(task: &mut Task, context: &BTreeMap<String, String>, at_ms: i64) -> bool {
    let Some(health) = context.get(context::HEALTH) else { return false };
    if task.health() == Some(health.as_str()) {
        return false;
    }
    task.context.insert(context::HEALTH.to_string(), health.clone());
    task.context.insert(context::HEALTH_SINCE.to_string(), at_ms.to_string());
    true
}

/// Whether a new-version task that finished so counts against its deployment: its container
/// failed, crashed, exited (a service's task should not) or never started. Kills, evictions and
/// system errors are not the new spec's fault.
fn deployment_failure(reason_code: &str) -> bool {
    matches!(
        reason_code,
        reason::FAILED
            | reason::CRASHED
            | reason::NORMAL
            | reason::STUCK_IN_STATE
            | reason::INVALID_REQUEST
            | reason::UNHEALTHY
    )
}

fn count_deployment_failure(o: &mut Overlay, task: &Task) -> Result<()> {
    let Some(mut job) = o.job(&task.job_id)? else { return Ok(()) };
    let version = task.job_version();
    match job.rollout.active_mut() {
        Some(d) if d.to_version == version => d.failures = d.failures.saturating_add(1),
        _ => return Ok(()),
    }
    o.put_job(job);
    Ok(())
}

/// Applies the placements that still fit: the agent must be Online, healthy, in an Active instance
/// group, with room for the task next to its live tasks as of this entry.
pub fn assign_tasks(
    o: &mut Overlay,
    assignments: Vec<crate::command::Assignment>,
    timestamp_ms: i64,
) -> Result<CommandResponse> {
    // Each agent is read once, with what its live tasks hold before this entry gives it anything;
    // each job once.
    let mut jobs: BTreeMap<String, Option<Placing>> = BTreeMap::new();
    let mut hosts: BTreeMap<String, Option<Host>> = BTreeMap::new();
    let mut applied = Vec::new();
    for a in assignments {
        let Some(mut task) = o.task(&a.task_id)? else { continue };
        if task.state() != TaskState::Accepted || agent_of(&task).is_some() {
            continue;
        }
        if !hosts.contains_key(&a.agent_id) {
            let host = host_now(o, &mut jobs, &a.agent_id)?;
            hosts.insert(a.agent_id.clone(), host);
        }
        let Some(host) = hosts.get_mut(&a.agent_id).and_then(Option::as_mut) else { continue };
        let Some(job) = placing(o, &mut jobs, &task.job_id)?.filter(|j| j.accepted) else { continue };
        // Hard constraints hold on apply as resources do: the plan saw the agent as it was, and
        // other placements may have landed on it since.
        let Ok((hard, _)) = &job.constraints else { continue };
        // What the task's spec version needs: a rolling update that changes resources places its
        // new tasks at the new ones while the old keep what they were placed with.
        let need = job.job.resources_of(task.job_version());
        if hard.admits(&host.view, &task.job_id).is_err() || !host.agent.resources.fits(&host.used, &need) {
            continue;
        }
        let status = TaskStatus {
            state: TaskState::Launched,
            reason_code: String::new(),
            reason_message: format!("assigned to agent {}", host.agent.id),
            timestamp_ms,
        };
        if task.transition(status) {
            host.used.add(&need);
            task.resources = Some(need);
            host.view.jobs.entry(task.job_id.clone()).and_modify(|n| *n += 1).or_insert(1);
            host.view.exclusive |= hard.exclusive_host;
            task.context.insert(context::AGENT.into(), host.agent.id.clone());
            for key in [context::HOST, context::ZONE, context::INSTANCE_ID] {
                if let Some(v) = host.agent.attributes.get(key) {
                    task.context.insert(key.into(), v.clone());
                }
            }
            applied.push(task.id.clone());
            o.put_task(task);
        }
    }
    Ok(CommandResponse::Assigned(applied))
}

/// What placing a task of one job needs, read once per entry.
struct Placing {
    job: Job,
    constraints: std::result::Result<(Constraints, Constraints), String>,
    accepted: bool,
}

fn placing<'a>(
    o: &Overlay,
    jobs: &'a mut BTreeMap<String, Option<Placing>>,
    job_id: &str,
) -> Result<Option<&'a Placing>> {
    if !jobs.contains_key(job_id) {
        let job = o.job(job_id)?.map(|j| Placing {
            constraints: hosts::constraints(&j),
            accepted: j.status.state == JobState::Accepted,
            job: j,
        });
        jobs.insert(job_id.to_string(), job);
    }
    Ok(jobs[job_id].as_ref())
}

/// An agent that may take tasks, as it is now: what its live tasks hold and, for the hard
/// constraints, which jobs they belong to and whether one wants the agent alone.
struct Host {
    agent: crate::model::agent::Agent,
    used: ResourceDimension,
    view: titus_scheduler::Agent,
}

fn host_now(o: &Overlay, jobs: &mut BTreeMap<String, Option<Placing>>, agent_id: &str) -> Result<Option<Host>> {
    let Some(agent) = o.agent(agent_id)?.filter(|agent| agent.accepts_tasks()) else { return Ok(None) };
    let group = o.instance_group(&agent.instance_group)?;
    if group.as_ref().is_some_and(|g| g.lifecycle != Lifecycle::Active) {
        return Ok(None);
    }
    let mut used = ResourceDimension::default();
    let mut load = hosts::Load::default();
    for id in o.task_ids_on_agent(agent_id)? {
        let Some(t) = o.task(&id)? else { continue };
        if agent_of(&t) != Some(agent_id) || !t.state().is_live() {
            continue;
        }
        let job = placing(o, jobs, &t.job_id)?;
        let held = t.held(job.map(|j| &j.job));
        used.add(&held);
        let exclusive = job.is_some_and(|j| j.constraints.as_ref().is_ok_and(|(h, _)| h.exclusive_host));
        load.add(&t.job_id, &hosts::resources(&held), exclusive);
    }
    let view = hosts::host(&agent, group.as_ref(), load, None);
    Ok(Some(Host { agent, used, view }))
}

/// The job, if it exists and is not being killed.
fn live_job(o: &Overlay, job_id: &str) -> Result<std::result::Result<Job, CommandResponse>> {
    match o.job(job_id)? {
        None => Ok(Err(not_found("job_id", "job", job_id)?)),
        Some(job) if job.status.state != JobState::Accepted => Ok(Err(reject(
            RejectionKind::FailedPrecondition,
            "job_id",
            format!("job {job_id:?} is {:?}", job.status.state),
        )?)),
        Some(job) => Ok(Ok(job)),
    }
}

fn with_service_job(
    o: &mut Overlay,
    job_id: &str,
    field: &str,
    change: impl FnOnce(&mut Job) -> Result<()>,
) -> Result<CommandResponse> {
    let mut job = match live_job(o, job_id)? {
        Err(r) => return Ok(r),
        Ok(j) => j,
    };
    if job.descriptor.is_batch() {
        return reject(
            RejectionKind::FailedPrecondition,
            field,
            format!("job {job_id:?} is a batch job; only service jobs have this setting"),
        );
    }
    change(&mut job)?;
    o.put_job(job);
    Ok(CommandResponse::Done)
}

/// Starts a rolling update (see `Command::UpdateJobSpec`).
pub fn update_job_spec(
    o: &mut Overlay,
    job_id: &str,
    container: Container,
    strategy: RolloutStrategy,
    timestamp_ms: i64,
) -> Result<CommandResponse> {
    let mut job = match live_job(o, job_id)? {
        Err(r) => return Ok(r),
        Ok(j) => j,
    };
    if job.descriptor.is_batch() {
        return reject(
            RejectionKind::FailedPrecondition,
            "job_id",
            format!(
                "job {job_id:?} is a batch job; only a service job's spec can be updated (kill it and submit anew)"
            ),
        );
    }
    if container == job.descriptor.container {
        return Ok(CommandResponse::Deployment(0));
    }
    let mut changed = job.clone();
    changed.descriptor.container = container.clone();
    if let Some(refused) = check_capabilities(o, &changed.descriptor)? {
        return Ok(refused);
    }
    // New resources must fit the capacity group's reservation at the job's size, as a new job's
    // must; old tasks keep what they hold until they are replaced.
    if container.resources != job.descriptor.container.resources {
        if let Some(refused) = check_quota(o, &changed, changed.descriptor.quota_instances())? {
            return Ok(refused);
        }
    }
    let rollout = &mut job.rollout;
    let id = rollout.next_id();
    let version = rollout.next_version();
    if let Some(active) = rollout.active_mut() {
        active.end(DeploymentState::Superseded, format!("superseded by deployment {id}"), timestamp_ms);
    }
    let previous = std::mem::replace(&mut job.descriptor.container, container);
    rollout.start(id, version, previous, &job.descriptor.container, strategy, timestamp_ms);
    o.put_job(job);
    Ok(CommandResponse::Deployment(id))
}

/// Moves a job's active deployment on (see `Command::AdvanceDeployment`).
pub fn advance_deployment(
    o: &mut Overlay,
    job_id: &str,
    deployment_id: u32,
    change: DeploymentChange,
    timestamp_ms: i64,
) -> Result<CommandResponse> {
    let mut job = match live_job(o, job_id)? {
        Err(r) => return Ok(r),
        Ok(j) => j,
    };
    let Some(d) = job.rollout.active_mut().filter(|d| d.id == deployment_id) else {
        let now = job.rollout.active().map_or("none".to_string(), |d| d.id.to_string());
        return reject(
            RejectionKind::FailedPrecondition,
            "deployment_id",
            format!("deployment {deployment_id} of job {job_id:?} is not active (active: {now})"),
        );
    };
    match change {
        DeploymentChange::Step(step) => d.push_step(step),
        DeploymentChange::CanariesReady => {
            if d.canary_ready_ms.is_none() {
                d.canary_ready_ms = Some(timestamp_ms);
                if !d.promoted {
                    d.state = DeploymentState::Paused;
                }
            }
        }
        DeploymentChange::Promote => {
            d.promoted = true;
            d.state = DeploymentState::Progressing;
        }
        DeploymentChange::Succeed => d.end(DeploymentState::Succeeded, String::new(), timestamp_ms),
        DeploymentChange::RollBack { reason } => {
            if d.rollback_of.is_some() {
                return reject(
                    RejectionKind::FailedPrecondition,
                    "deployment_id",
                    format!("deployment {deployment_id} is itself a rollback; update the job's spec instead"),
                );
            }
            let failed = d.clone();
            d.end(DeploymentState::RolledBack, reason.clone(), timestamp_ms);
            let previous = failed.previous.unwrap_or_else(|| job.descriptor.container.clone());
            let undone = std::mem::replace(&mut job.descriptor.container, previous);
            let id = job.rollout.next_id();
            // A rollback replaces every new task at once where it can, and is never rolled back.
            let strategy = RolloutStrategy { canary: 0, rollback_after_failures: 0, ..failed.strategy };
            job.rollout.start(id, failed.from_version, undone, &job.descriptor.container, strategy, timestamp_ms);
            if let Some(undo) = job.rollout.active_mut() {
                undo.rollback_of = Some(failed.id);
                undo.promoted = true;
                undo.message = reason;
            }
        }
    }
    o.put_job(job);
    Ok(CommandResponse::Done)
}

/// Checks that the jobs of `job`'s capacity group, with `job` counted at `instances`, fit the
/// group's reservation. Undefined groups other than DEFAULT are refused; DEFAULT without a
/// definition is unlimited.
/// Capabilities beyond the agents' reduced default set are the capacity group's to grant: a job
/// asking for one its group does not allow is refused, naming the capability and the group.
fn check_capabilities(o: &Overlay, d: &JobDescriptor) -> Result<Option<CommandResponse>> {
    if d.container.capabilities.is_empty() {
        return Ok(None);
    }
    let allowed = o.capacity_group(&d.capacity_group)?.map(|g| g.allowed_capabilities).unwrap_or_default();
    for (i, cap) in d.container.capabilities.iter().enumerate() {
        if !allowed.contains(cap) {
            return Ok(Some(reject(
                RejectionKind::FailedPrecondition,
                &format!("container.capabilities[{i}]"),
                format!(
                    "capability {cap} is not allowed by capacity group {:?} (its allowed_capabilities: [{}])",
                    d.capacity_group,
                    allowed.join(", ")
                ),
            )?));
        }
    }
    Ok(None)
}

fn check_quota(o: &Overlay, job: &Job, instances: u32) -> Result<Option<CommandResponse>> {
    let name = &job.descriptor.capacity_group;
    let Some(group) = o.capacity_group(name)? else {
        if name == DEFAULT_CAPACITY_GROUP {
            return Ok(None);
        }
        return Ok(Some(reject(
            RejectionKind::FailedPrecondition,
            "capacity_group",
            format!("capacity group {name:?} does not exist"),
        )?));
    };
    let mut used = [0f64; 5];
    let mut add = |j: &Job, n: u32| {
        let r = &j.descriptor.container.resources;
        for (slot, v) in
            used.iter_mut().zip([r.cpu, r.memory_mb as f64, r.disk_mb as f64, r.network_mbps as f64, r.gpu as f64])
        {
            *slot += v * n as f64;
        }
    };
    for other in o.jobs()? {
        if other.id != job.id && other.descriptor.capacity_group == *name && other.status.state == JobState::Accepted {
            add(&other, other.descriptor.quota_instances());
        }
    }
    add(job, instances);
    let per = &group.resources_per_instance;
    let n = group.instance_count as f64;
    let limits = [
        per.cpu * n,
        per.memory_mb as f64 * n,
        per.disk_mb as f64 * n,
        per.network_mbps as f64 * n,
        per.gpu as f64 * n,
    ];
    for ((dim, need), limit) in ["cpu", "memory_mb", "disk_mb", "network_mbps", "gpu"].iter().zip(used).zip(limits) {
        if need > limit + 1e-9 {
            return Ok(Some(reject(
                RejectionKind::FailedPrecondition,
                "capacity_group",
                format!(
                    "quota of capacity group {name:?} exhausted: its jobs would need {need} {dim}, it reserves {limit}"
                ),
            )?));
        }
    }
    Ok(None)
}

pub fn create_job(o: &mut Overlay, job: Job, token: Option<String>, token_expires_ms: i64) -> Result<CommandResponse> {
    if let Some(t) = &token {
        if let Some(record) = o.token(&job_token_key(t))? {
            if record.expires_ms > job.status.timestamp_ms {
                return Ok(CommandResponse::JobId(record.result));
            }
        }
    }
    if o.job(&job.id)?.is_some() || o.archived_job(&job.id)?.is_some() {
        return reject(RejectionKind::AlreadyExists, "job_id", format!("job {:?} already exists", job.id));
    }
    if let Some(r) = check_capabilities(o, &job.descriptor)? {
        return Ok(r);
    }
    if let Some(r) = check_quota(o, &job, job.descriptor.quota_instances())? {
        return Ok(r);
    }
    let id = job.id.clone();
    if let Some(t) = token {
        o.put_token(job_token_key(&t), TokenRecord { result: id.clone(), expires_ms: token_expires_ms });
    }
    o.put_job(job);
    Ok(CommandResponse::JobId(id))
}

pub fn update_capacity(
    o: &mut Overlay,
    job_id: &str,
    min: Option<u32>,
    desired: Option<u32>,
    max: Option<u32>,
) -> Result<CommandResponse> {
    let mut job = match live_job(o, job_id)? {
        Err(r) => return Ok(r),
        Ok(j) => j,
    };
    let JobType::Service { capacity, processes, .. } = &mut job.descriptor.job_type else {
        return reject(
            RejectionKind::FailedPrecondition,
            "capacity",
            format!("job {job_id:?} is a batch job; only service jobs have a capacity"),
        );
    };
    let old = *capacity;
    let new = crate::model::job::Capacity {
        min: min.unwrap_or(old.min),
        desired: desired.unwrap_or(old.desired),
        max: max.unwrap_or(old.max),
    };
    let mut violation = None;
    validate_capacity("capacity", &new, &mut |f: &str, why: String| {
        violation.get_or_insert((f.to_string(), why));
    });
    if let Some((field, why)) = violation {
        return reject(RejectionKind::InvalidArgument, &field, why);
    }
    if new.desired > old.desired && processes.disable_increase_desired {
        return reject(
            RejectionKind::FailedPrecondition,
            "capacity.desired",
            "the job's processes disable increasing desired",
        );
    }
    if new.desired < old.desired && processes.disable_decrease_desired {
        return reject(
            RejectionKind::FailedPrecondition,
            "capacity.desired",
            "the job's processes disable decreasing desired",
        );
    }
    *capacity = new;
    if new.desired > old.desired {
        if let Some(r) = check_quota(o, &job, new.desired)? {
            return Ok(r);
        }
    }
    o.put_job(job);
    Ok(CommandResponse::Done)
}

/// The status a kill moves a task to: a task that never launched has no container to stop.
fn kill_status(task: &Task, reason_code: &str, message: &str, timestamp_ms: i64) -> TaskStatus {
    let state = if task.state() == TaskState::Accepted { TaskState::Finished } else { TaskState::KillInitiated };
    TaskStatus { state, reason_code: reason_code.into(), reason_message: message.into(), timestamp_ms }
}

pub fn kill_job(o: &mut Overlay, job_id: &str, timestamp_ms: i64) -> Result<CommandResponse> {
    let Some(mut job) = o.job(job_id)? else {
        if o.archived_job(job_id)?.is_some() {
            return Ok(CommandResponse::Done); // already finished: killing it again changes nothing
        }
        return not_found("id", "job", job_id);
    };
    if job.status.state == JobState::Accepted {
        job.set_status(JobStatus {
            state: JobState::KillInitiated,
            reason_code: reason::KILLED.into(),
            reason_message: "killed by user".into(),
            timestamp_ms,
        });
        if let Some(d) = job.rollout.active_mut() {
            d.end(DeploymentState::Cancelled, "the job was killed".into(), timestamp_ms);
        }
        for mut t in o.tasks_of_job(job_id)? {
            if t.state().is_live() && t.state() != TaskState::KillInitiated {
                let status = kill_status(&t, reason::KILLED, "job killed", timestamp_ms);
                if t.transition(status) {
                    o.put_task(t);
                }
            }
        }
        o.put_job(job);
    }
    Ok(CommandResponse::Done)
}

pub fn kill_task(
    o: &mut Overlay,
    task_id: &str,
    shrink: bool,
    prevent_min_size_update: bool,
    timestamp_ms: i64,
) -> Result<CommandResponse> {
    let Some(mut task) = o.task(task_id)? else {
        // Killing a finished (archived) task again changes nothing: a retried kill is harmless.
        if o.archived_task(task_id)?.is_some() {
            return Ok(CommandResponse::Done);
        }
        return not_found("task_id", "task", task_id);
    };
    if !task.state().is_live() || task.state() == TaskState::KillInitiated {
        return Ok(CommandResponse::Done);
    }
    if shrink {
        let Some(mut job) = o.job(&task.job_id)? else { return not_found("task_id", "job of task", &task.job_id) };
        let JobType::Service { capacity, processes, .. } = &mut job.descriptor.job_type else {
            return reject(
                RejectionKind::InvalidArgument,
                "shrink",
                "only tasks of service jobs can be killed with shrink",
            );
        };
        if processes.disable_decrease_desired {
            return reject(
                RejectionKind::FailedPrecondition,
                "shrink",
                "the job's processes disable decreasing desired",
            );
        }
        if capacity.desired == 0 {
            return reject(RejectionKind::FailedPrecondition, "shrink", "desired is already 0");
        }
        if capacity.desired - 1 < capacity.min {
            if prevent_min_size_update {
                return reject(
                    RejectionKind::FailedPrecondition,
                    "prevent_min_size_update",
                    format!("shrinking would take desired below min {}", capacity.min),
                );
            }
            capacity.min = capacity.desired - 1;
        }
        capacity.desired -= 1;
        o.put_job(job);
    }
    let status = kill_status(
        &task,
        reason::KILLED,
        if shrink { "killed by user, job shrunk" } else { "killed by user" },
        timestamp_ms,
    );
    task.transition(status);
    o.put_task(task);
    Ok(CommandResponse::Done)
}

/// Evicts a task when its job's disruption budget allows it now (see `Command::EvictTask`): judged
/// here, on this entry's state, so evictions racing each other cannot together exceed it.
pub fn evict_task(o: &mut Overlay, task_id: &str, why: String, timestamp_ms: i64) -> Result<CommandResponse> {
    let Some(task) = o.task(task_id)? else { return not_found("task_id", "task", task_id) };
    if !task.state().is_live() || task.state() == TaskState::KillInitiated {
        return reject(
            RejectionKind::FailedPrecondition,
            "task_id",
            format!("task {task_id} is {}: nothing to evict", task.state().name()),
        );
    }
    let job = match live_job(o, &task.job_id)? {
        Err(r) => return Ok(r),
        Ok(j) => j,
    };
    let tasks = o.tasks_of_job(&job.id)?;
    let allowance = crate::jobs::lifecycle::eviction_allowance(&job, &tasks, timestamp_ms);
    if crate::jobs::lifecycle::eviction_quota(&job, &allowance, &task) == 0 {
        let held = allowance.held_by.unwrap_or_else(|| "the job's disruption budget".into());
        return reject(
            RejectionKind::FailedPrecondition,
            "task_id",
            format!("task {task_id} cannot be evicted now: {held}"),
        );
    }
    let message = if why.is_empty() { "evicted".to_string() } else { format!("evicted: {why}") };
    update_status(o, task.clone(), kill_status(&task, reason::EVICTED, &message, timestamp_ms), BTreeMap::new())
}

pub fn create_tasks(o: &mut Overlay, tasks: Vec<Task>, archive: Vec<String>) -> Result<CommandResponse> {
    for id in archive {
        match o.task(&id)? {
            Some(t) if !t.state().is_live() => o.archive_task(t),
            Some(t) => {
                return reject(
                    RejectionKind::FailedPrecondition,
                    "archive",
                    format!("task {id:?} is {}, not Finished", t.state().name()),
                )
            }
            None => {}
        }
    }
    // Per job, read once per command: the job, and the indexes its tasks already hold (a batch
    // job's index is taken by any task, a service job's only by a live one).
    let mut jobs: BTreeMap<String, (Job, std::collections::HashSet<u32>)> = BTreeMap::new();
    for task in tasks {
        let (job, taken) = match jobs.entry(task.job_id.clone()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let Some(job) = o.job(&task.job_id)? else { return not_found("job_id", "job", &task.job_id) };
                let batch = job.descriptor.is_batch();
                let taken = o
                    .tasks_of_job(&task.job_id)?
                    .into_iter()
                    .filter(|t| t.state().is_live() || batch)
                    .map(|t| t.index)
                    .collect();
                e.insert((job, taken))
            }
        };
        if job.status.state != JobState::Accepted {
            return reject(
                RejectionKind::FailedPrecondition,
                "job_id",
                format!("job {:?} is {:?}: no new tasks", job.id, job.status.state),
            );
        }
        if task.index >= MAX_TASKS_PER_JOB {
            return reject(
                RejectionKind::InvalidArgument,
                "index",
                format!("task index {} is out of range", task.index),
            );
        }
        if !taken.insert(task.index) {
            return reject(
                RejectionKind::AlreadyExists,
                "index",
                format!("job {:?} already has a task at index {}", job.id, task.index),
            );
        }
        if o.task(&task.id)?.is_some() || o.archived_task(&task.id)?.is_some() {
            return reject(RejectionKind::AlreadyExists, "task_id", format!("task {:?} already exists", task.id));
        }
        o.put_task(task);
    }
    Ok(CommandResponse::Done)
}
