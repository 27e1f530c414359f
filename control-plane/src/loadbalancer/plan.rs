//! The load balancer planner: a pure function of associations, target records and tasks.
//!
//! A task's target in a target group is wanted while the task is Started with a container IP and
//! its job is associated (Active) with the group. From what is wanted and what is recorded:
//!
//! | record          | wanted                 | not wanted                                |
//! |-----------------|------------------------|-------------------------------------------|
//! | none            | register               | —                                         |
//! | Registering     | register (retry)       | deregister (it may have been registered)  |
//! | Registered      | —                      | deregister                                |
//! | Deregistering   | deregister (retry)     | deregister (retry)                        |
//! | Deregistered    | forget once drained    | forget once drained                       |
//!
//! An ALB keys an IP target by address, and Docker reuses addresses: a new task's IP is registered
//! only once no other record of the same address in that group is still on its way out, so a late
//! deregistration of the old task never removes the new one. A target group that is orphaned
//! (deleted) cannot be called: its records are forgotten.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::load_balancer::{AssociationState, LbTarget, LoadBalancer, TargetState};
use crate::model::task::{context, Task, TaskState};

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Targets to register: written `Registering` first, then RegisterTargets per group.
    pub register: Vec<LbTarget>,
    /// Targets to deregister: written `Deregistering` first, then DeregisterTargets per group.
    pub deregister: Vec<LbTarget>,
    /// Records to drop: drained, or of an orphaned group.
    pub forget: Vec<LbTarget>,
    /// Associations of jobs that no longer exist.
    pub remove: Vec<LoadBalancer>,
    /// When the next drain ends: the planner must run again then.
    pub wake_at_ms: Option<i64>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.register.is_empty() && self.deregister.is_empty() && self.forget.is_empty() && self.remove.is_empty()
    }
}

/// The address a Started task is reachable at, if it has one.
pub fn task_ip(task: &Task) -> Option<&str> {
    (task.state() == TaskState::Started)
        .then(|| task.context.get(context::CONTAINER_IP).map(String::as_str))
        .flatten()
        .filter(|ip| !ip.is_empty())
}

/// `tasks`: every active task of an associated job and every task a record names (a task that is
/// not there has been archived). `live_jobs`: ids of active (not archived) jobs.
pub fn plan(
    associations: &[LoadBalancer],
    records: &[LbTarget],
    tasks: &HashMap<String, Task>,
    live_jobs: &BTreeSet<String>,
    now_ms: i64,
    drain_ms: i64,
) -> Plan {
    let mut plan = Plan::default();
    let active: BTreeSet<(&str, &str)> = associations
        .iter()
        .filter(|a| a.state == AssociationState::Active)
        .map(|a| (a.job_id.as_str(), a.target_group.as_str()))
        .collect();
    let orphaned: BTreeSet<&str> = associations
        .iter()
        .filter(|a| a.state == AssociationState::Orphaned)
        .map(|a| a.target_group.as_str())
        .collect();
    plan.remove = associations.iter().filter(|a| !live_jobs.contains(&a.job_id)).cloned().collect();

    // Wanted: (group, task) → ip.
    let mut wanted: BTreeMap<(String, String), (String, String)> = BTreeMap::new();
    for t in tasks.values() {
        let Some(ip) = task_ip(t) else { continue };
        for (job, group) in &active {
            if *job == t.job_id {
                wanted.insert((group.to_string(), t.id.clone()), (ip.to_string(), t.job_id.clone()));
            }
        }
    }

    // Addresses per group that some record still holds on the way out (not yet Deregistered).
    let mut leaving: BTreeSet<(String, String)> = BTreeSet::new();
    let recorded: BTreeMap<(String, String), &LbTarget> =
        records.iter().map(|r| ((r.target_group.clone(), r.task_id.clone()), r)).collect();
    for r in records {
        let want = wanted.get(&(r.target_group.clone(), r.task_id.clone())).is_some_and(|(ip, _)| *ip == r.ip);
        if orphaned.contains(r.target_group.as_str()) && !active.iter().any(|(_, g)| *g == r.target_group) {
            plan.forget.push(r.clone());
            continue;
        }
        match (r.state, want) {
            (TargetState::Registering, true) => plan.register.push(r.clone()),
            (TargetState::Registered, true) => {}
            (TargetState::Registering | TargetState::Registered, false) | (TargetState::Deregistering, _) => {
                leaving.insert((r.target_group.clone(), r.ip.clone()));
                let mut d = r.clone();
                if d.state != TargetState::Deregistering {
                    d.state = TargetState::Deregistering;
                    d.updated_ms = now_ms;
                }
                plan.deregister.push(d);
            }
            (TargetState::Deregistered, _) => {
                let drained_at = r.updated_ms + drain_ms;
                if now_ms >= drained_at {
                    plan.forget.push(r.clone());
                } else {
                    plan.wake_at_ms = Some(plan.wake_at_ms.map_or(drained_at, |w| w.min(drained_at)));
                }
            }
        }
    }
    for ((group, task_id), (ip, job_id)) in wanted {
        if recorded.contains_key(&(group.clone(), task_id.clone())) || leaving.contains(&(group.clone(), ip.clone())) {
            continue;
        }
        plan.register.push(LbTarget {
            target_group: group,
            task_id,
            job_id,
            ip,
            state: TargetState::Registering,
            updated_ms: now_ms,
            health: String::new(),
        });
    }
    plan
}

/// Groups targets by target group, for one AWS call per group.
pub fn by_group(targets: &[LbTarget]) -> BTreeMap<String, Vec<LbTarget>> {
    let mut out: BTreeMap<String, Vec<LbTarget>> = BTreeMap::new();
    for t in targets {
        out.entry(t.target_group.clone()).or_default().push(t.clone());
    }
    out
}

/// After DescribeTargetHealth of `group` returned `present`: the addresses of records that should
/// be there and are not (to register again), and of addresses this system registered, no longer
/// wants, and finds still there (to deregister again). Targets nobody here registered are left
/// alone.
pub fn repair(group: &str, records: &[LbTarget], present: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    let of_group = records.iter().filter(|r| r.target_group == group);
    let wanted: BTreeSet<&str> =
        of_group.clone().filter(|r| r.state == TargetState::Registered).map(|r| r.ip.as_str()).collect();
    let in_flight: BTreeSet<&str> =
        of_group.clone().filter(|r| r.state == TargetState::Registering).map(|r| r.ip.as_str()).collect();
    let missing = wanted.iter().filter(|ip| !present.contains(**ip)).map(|ip| ip.to_string()).collect();
    let stale = of_group
        .filter(|r| r.state == TargetState::Deregistered)
        .map(|r| r.ip.as_str())
        .filter(|ip| present.contains(*ip) && !wanted.contains(ip) && !in_flight.contains(ip))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(str::to_string)
        .collect();
    (missing, stale)
}

#[cfg(test)]
#[path = "plan_test.rs"]
mod plan_test;
