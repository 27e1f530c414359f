//! A service job's rolling update, decided each lifecycle round from replicated state alone (see
//! `model::deployment`): which new-version tasks to create, which old ones to kill, when the
//! canaries are ready, when it is done or must roll back. Pure, like the rest of the lifecycle.
//!
//! The rule that matters (the same as Kubernetes' rolling update): a round kills old tasks only
//! down to `desired - max_unavailable` available tasks in all, unavailable old tasks first, and
//! within the job's disruption budget, and creates new ones only up to `desired + max_surge` live
//! tasks. A task is *available* when the
//! caller says so (Started and, behind load balancers, its targets healthy): so a deployment whose
//! new tasks never become available never takes the service below its floor. Every command is
//! re-checked when applied (a kill names the state it saw, a step names the deployment), so a plan
//! made by a leader that was just deposed, or made twice, does no harm.

use std::collections::BTreeSet;

use crate::command::{Command, DeploymentChange};
use crate::jobs::lifecycle::{create_tasks, elapsed, new_task, status, update};
use crate::model::deployment::{Deployment, DeploymentState, DeploymentStep};
use crate::model::job::Job;
use crate::model::task::{reason, Task, TaskState};

/// Of deployment `d` now: new-version tasks live and available, old-version tasks live (tasks
/// being killed are in neither).
pub fn progress(d: &Deployment, tasks: &[Task], available: &dyn Fn(&Task) -> bool) -> (u32, u32, u32) {
    let serving = tasks.iter().filter(|t| t.state().is_live() && t.state() != TaskState::KillInitiated);
    let (new, old): (Vec<&Task>, Vec<&Task>) = serving.partition(|t| t.job_version() == d.to_version);
    let available = new.iter().filter(|t| available(t)).count();
    (new.len() as u32, available as u32, old.len() as u32)
}

fn advance(job: &Job, d: &Deployment, change: DeploymentChange, now: i64) -> Command {
    Command::AdvanceDeployment { job_id: job.id.clone(), deployment_id: d.id, change, timestamp_ms: now }
}

/// One round of a deployment: what to do, and when that is nothing, what it waits for.
#[derive(Debug, Default)]
pub struct Round {
    pub commands: Vec<Command>,
    /// Why nothing moves this round (for `titus job deploy status`); None when something does.
    pub waiting: Option<String>,
}

/// The round of deployment `d` of `job` (desired `wanted`). `ready_to_create` is false while the
/// job's replacement back-off runs (a crash loop does not spin); `available` says whether a live
/// task serves.
pub fn plan(
    job: &Job,
    d: &Deployment,
    tasks: &[Task],
    wanted: u32,
    ready_to_create: bool,
    available: &dyn Fn(&Task) -> bool,
    now: i64,
    new_id: &mut dyn FnMut() -> String,
) -> Round {
    let mut out = Vec::new();
    let s = &d.strategy;
    if s.rollback_after_failures > 0 && d.failures >= s.rollback_after_failures && d.rollback_of.is_none() {
        let reason = format!(
            "{} tasks of version {} ({}) failed, at the threshold of {}: rolled back to version {} ({})",
            d.failures, d.to_version, d.to_image, s.rollback_after_failures, d.from_version, d.from_image
        );
        out.push(advance(job, d, DeploymentChange::RollBack { reason }, now));
        return Round { commands: out, waiting: None };
    }
    if d.state == DeploymentState::Paused && !d.promoted {
        let pause_over = s.canary_pause_sec > 0
            && d.canary_ready_ms.is_some_and(|at| elapsed(at, s.canary_pause_sec.saturating_mul(1000), now));
        if pause_over {
            out.push(advance(job, d, DeploymentChange::Promote, now));
            return Round { commands: out, waiting: None };
        }
        let until = match (s.canary_pause_sec, d.canary_ready_ms) {
            (0, _) | (_, None) => String::new(),
            (sec, Some(at)) => {
                let left = at.saturating_add(sec.saturating_mul(1000) as i64).saturating_sub(now);
                format!(" (or {} s more)", left.max(0).saturating_add(999) / 1000)
            }
        };
        let waiting = format!("the canaries are available: waiting for `titus job deploy promote`{until}");
        return Round { commands: out, waiting: Some(waiting) };
    }
    let serving = |t: &&Task| t.state().is_live() && t.state() != TaskState::KillInitiated;
    let (new, old): (Vec<&Task>, Vec<&Task>) =
        tasks.iter().filter(serving).partition(|t| t.job_version() == d.to_version);
    let new_available = new.iter().filter(|t| available(t)).count();
    let wanted = wanted as usize;

    if old.is_empty() && new.len() == wanted && new_available >= wanted {
        out.push(advance(job, d, DeploymentChange::Succeed, now));
        return Round { commands: out, waiting: None };
    }

    // How many new tasks this round may have live, and may create.
    let canary_phase = s.canary > 0 && !d.promoted;
    let (target_new, max_total) = if canary_phase {
        let canaries = (s.canary as usize).min(wanted.max(1));
        (canaries, old.len() + canaries)
    } else {
        (wanted, wanted + s.max_surge as usize)
    };
    let room = max_total.saturating_sub(new.len() + old.len());
    let create = if ready_to_create { target_new.saturating_sub(new.len()).min(room) } else { 0 };

    // Old tasks to kill: unavailable ones first, then available ones while the service keeps its
    // floor. `killable` is Kubernetes' maxScaledDown: all live - floor - new ones not yet serving.
    let mut kill: Vec<&Task> = Vec::new();
    // What stops the kills short of what the strategy allows.
    let mut kills_held: Option<String> = None;
    if !canary_phase {
        let floor = wanted.saturating_sub(s.max_unavailable as usize);
        let killable = (new.len() + old.len()).saturating_sub(floor).saturating_sub(new.len() - new_available);
        let mut victims = old.clone();
        // Unavailable first (never-placed before placed), then the highest indexes.
        victims.sort_by_key(|t| (available(t), t.state() != TaskState::Accepted, std::cmp::Reverse(t.index)));
        // The job's disruption budget bounds the kills too: all of them (rate, time windows), and
        // those of available tasks (availability limits, judged on every task available now).
        let serving_now = new_available + old.iter().filter(|t| available(t)).count();
        let budget = &job.descriptor.disruption_budget;
        let allowance = budget.allowance(wanted as u32, serving_now as u32, &job.evictions_ms, now);
        let (mut any, mut of_available) = (allowance.any as usize, allowance.available as usize);
        if killable == 0 && !old.is_empty() {
            kills_held = Some(format!(
                "waiting for new tasks to become available: old ones go only while {floor} stay available \
                 ({serving_now} now; {new_available} of {} new ones available)",
                new.len()
            ));
        }
        for t in victims.into_iter().take(killable) {
            let serves = available(t);
            if any == 0 || (serves && of_available == 0) {
                let why = allowance.held_by.clone().unwrap_or_else(|| "it allows no more now".into());
                kills_held = Some(format!("the job's disruption budget: {why}"));
                break;
            }
            any -= 1;
            of_available -= usize::from(serves);
            kill.push(t);
        }
    } else if new_available >= target_new && d.canary_ready_ms.is_none() {
        out.push(advance(job, d, DeploymentChange::CanariesReady, now));
    }
    let stop = |t: &Task| if t.state() == TaskState::Accepted { TaskState::Finished } else { TaskState::KillInitiated };
    for t in &kill {
        // A voluntary disruption: evicted (not counted against the job's retries).
        let message = format!("replaced by deployment {} (version {})", d.id, d.to_version);
        out.push(update(t, status(stop(t), reason::EVICTED, &message, now)));
    }
    // Desired lowered during the update: new tasks beyond it go, unavailable first (a scale-down,
    // not a disruption).
    if !canary_phase && new.len() > wanted {
        let mut extra = new.clone();
        extra.sort_by_key(|t| (available(t), std::cmp::Reverse(t.index)));
        for t in extra.into_iter().take(new.len() - wanted) {
            out.push(update(t, status(stop(t), reason::SCALED_DOWN, "job scaled down", now)));
            kill.push(t);
        }
    }

    // New tasks take the indexes of finished ones first (keeping their lineage), then the lowest
    // free ones; finished tasks not reused leave once the job has its tasks.
    let mut finished: Vec<&Task> = tasks.iter().filter(|t| !t.state().is_live()).collect();
    finished.sort_by_key(|t| (t.status.timestamp_ms, t.index));
    let mut used: BTreeSet<u32> = tasks.iter().filter(|t| t.state().is_live()).map(|t| t.index).collect();
    let mut created = Vec::new();
    for t in &finished {
        if created.len() == create {
            break;
        }
        if used.insert(t.index) {
            created.push((new_task(job, t.index, Some(t), now, new_id), Some(t.id.clone())));
        }
    }
    let mut index = 0;
    while created.len() < create {
        if used.insert(index) {
            created.push((new_task(job, index, None, now, new_id), None));
        }
        index += 1;
    }
    let archive = if create == 0 && new.len() + old.len() >= wanted {
        finished.iter().map(|t| t.id.clone()).collect()
    } else {
        Vec::new()
    };
    if !created.is_empty() || !kill.is_empty() {
        let step = DeploymentStep {
            at_ms: now,
            created: created.len() as u32,
            killed: kill.len() as u32,
            new_available: new_available as u32,
            old_live: old.len() as u32,
        };
        out.push(advance(job, d, DeploymentChange::Step(step), now));
    }
    let waiting = if !created.is_empty() || !kill.is_empty() {
        None
    } else if new.len() < target_new && !ready_to_create {
        Some("new tasks back off after a failure (the job's retry policy)".to_string())
    } else if let Some(held) = kills_held {
        Some(held)
    } else if new.len() < target_new && room == 0 {
        Some(format!(
            "no room to start more: {} tasks live of at most {max_total} (max surge {})",
            new.len() + old.len(),
            s.max_surge
        ))
    } else {
        let target = if canary_phase { "canaries" } else { "new tasks" };
        Some(format!("waiting for {target} to become available ({new_available} of {target_new})"))
    };
    create_tasks(&mut out, created, archive);
    Round { commands: out, waiting }
}
