//! The capacity planner: a pure function from instance groups, their EC2 instances, agents and
//! unplaced tasks to new desired sizes, launches and terminations. No IO, clock or tokio.
//!
//! - **Scale up**: tasks that stayed unplaced are summed per tier; the first Active group of that
//!   tier with room grows by the instance count their dominant resource needs (the most of
//!   cpu/memory/disk/network/gpu, each divided by what one instance offers), less instances already
//!   on their way (launched, not yet registered). A tier also keeps `min_idle` idle agents.
//! - **Scale down**: agents idle past the cooldown are terminated, PhasedOut groups first, while the
//!   tier keeps `min_idle`; above `max_idle` they go without waiting for the cooldown. A group never
//!   goes below `min`; Removable groups go to zero.
//! - **Actuation**: a group with fewer instances than `desired` launches the difference; one with
//!   more terminates the surplus, those without an agent first, then idle ones — never an agent with
//!   live tasks.
//! - **Registration timeout**: an instance that no agent has ever registered from within the
//!   timeout is terminated (and, while still wanted, replaced).
//! - **Lost agents**: the instance of an agent that went silent keeps running — its containers may
//!   too (a partition, a stalled host) — until its tasks were replaced (their records say so once
//!   it is Lost) and a grace period has passed; and not even then while many of its group's agents
//!   are lost at once, which looks like a partition, not like dead hosts.
//! - **Bounds**: at most so many terminations per round and per group, whatever the reasons.
//!
//! Never terminated: an instance whose agent has live tasks in the replicated state.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::agent::{InstanceGroup, Lifecycle};
use crate::model::{ResourceDimension, Tier};

/// One EC2 instance of a group (pending or running).
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: String,
    pub launched_ms: i64,
}

/// An agent as capacity sees it: which instance it runs on and whether it is idle.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentLoad {
    pub agent_id: String,
    pub instance_id: String,
    pub live_tasks: u32,
    /// Since when it has had no live task (as observed by this leader).
    pub idle_since_ms: Option<i64>,
    /// Since when the agent has been Lost (None: it is Online).
    pub lost_since_ms: Option<i64>,
    /// Cordoned for a termination (`Agent::terminating`): it gets no new task.
    pub cordoned: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TierLimits {
    pub min_idle: u32,
    pub max_idle: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CapacityConfig {
    pub critical: TierLimits,
    pub flex: TierLimits,
    pub idle_cooldown_ms: i64,
    pub registration_timeout_ms: i64,
    /// How long a Lost agent's instance is kept after it was lost.
    pub lost_grace_ms: i64,
    /// Above this percentage of a group's agents lost at once (and more than one), none of their
    /// instances is terminated.
    pub lost_hold_percent: u32,
    pub max_terminations_per_round: u32,
    pub max_terminations_per_group: u32,
}

impl CapacityConfig {
    fn limits(&self, tier: Tier) -> &TierLimits {
        match tier {
            Tier::Critical => &self.critical,
            Tier::Flex => &self.flex,
        }
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// New desired sizes, by group.
    pub desired: BTreeMap<String, u32>,
    /// Instances to launch, by group.
    pub launch: BTreeMap<String, u32>,
    /// Instances to terminate: (group, instance id, why).
    pub terminate: Vec<(String, String, String)>,
    /// Agents cordoned for a termination that is no longer under way — on an instance still
    /// running, neither planned now nor written ahead in its group (a leader gone between the
    /// cordon and the intent, say): they take tasks again.
    pub uncordon: Vec<String>,
}

/// How many instances offering `each` hold `need`: the dominant resource decides. An instance
/// that declares no disk or network (0) is not limited by them; one with 0 GPUs has none.
pub fn instances_for(need: &ResourceDimension, each: &ResourceDimension) -> u32 {
    let ratio = |need: f64, each: f64| {
        if need <= 0.0 {
            0.0
        } else if each <= 0.0 {
            f64::INFINITY
        } else {
            need / each
        }
    };
    let optional = |need: f64, each: f64| if each <= 0.0 { 0.0 } else { ratio(need, each) };
    let dominant = [
        ratio(need.cpu, each.cpu),
        ratio(need.memory_mb as f64, each.memory_mb as f64),
        optional(need.disk_mb as f64, each.disk_mb as f64),
        optional(need.network_mbps as f64, each.network_mbps as f64),
        ratio(need.gpu as f64, each.gpu as f64),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    if dominant.is_infinite() {
        return u32::MAX; // this instance type can never hold it
    }
    (dominant - 1e-9).ceil().max(0.0) as u32
}

/// Whether one instance of `each` can hold a task needing `need` at all.
fn fits_one(need: &ResourceDimension, each: &ResourceDimension) -> bool {
    instances_for(need, each) <= 1
}

/// How many more instances this round may terminate, in all and per group.
struct TerminationBudget<'a> {
    left: u32,
    per_group: u32,
    taken: BTreeMap<&'a str, u32>,
}

impl<'a> TerminationBudget<'a> {
    fn take(&mut self, group: &'a str) -> bool {
        let taken = self.taken.entry(group).or_insert(0);
        if self.left == 0 || *taken >= self.per_group {
            return false;
        }
        self.left -= 1;
        *taken += 1;
        true
    }
}

/// `instances`: per group with launch settings, its instances that are not terminated.
/// `agents`: every agent (Online or Lost) that names an instance id. `unplaced`: per tier, the resources of
/// each task that could not be placed.
pub fn plan(
    groups: &[InstanceGroup],
    instances: &BTreeMap<String, Vec<Instance>>,
    agents: &[AgentLoad],
    unplaced: &BTreeMap<Tier, Vec<ResourceDimension>>,
    config: &CapacityConfig,
    now_ms: i64,
) -> Plan {
    let mut plan = Plan::default();
    let managed: Vec<&InstanceGroup> = groups.iter().filter(|g| g.launch.is_some()).collect();
    let by_instance: BTreeMap<&str, &AgentLoad> = agents.iter().map(|a| (a.instance_id.as_str(), a)).collect();
    let empty = Vec::new();
    let instances_of = |g: &InstanceGroup| instances.get(&g.id).unwrap_or(&empty);
    let mut desired: BTreeMap<String, u32> = managed.iter().map(|g| (g.id.clone(), g.desired)).collect();
    let mut terminating: BTreeSet<String> = BTreeSet::new();
    let mut budget = TerminationBudget {
        left: config.max_terminations_per_round,
        per_group: config.max_terminations_per_group,
        taken: BTreeMap::new(),
    };

    // Registration timeout: only for instances no agent ever registered from.
    for g in &managed {
        for i in instances_of(g) {
            if !by_instance.contains_key(i.id.as_str())
                && now_ms.saturating_sub(i.launched_ms) > config.registration_timeout_ms
                && budget.take(&g.id)
            {
                terminating.insert(i.id.clone());
                plan.terminate.push((g.id.clone(), i.id.clone(), "did not register as an agent in time".into()));
            }
        }
    }

    // Lost agents: after the grace period, with their tasks replaced, unless many are lost at once.
    for g in &managed {
        let of_group: Vec<&AgentLoad> =
            instances_of(g).iter().filter_map(|i| by_instance.get(i.id.as_str()).copied()).collect();
        let lost: Vec<&AgentLoad> = of_group.iter().copied().filter(|a| a.lost_since_ms.is_some()).collect();
        let hold =
            lost.len() > 1 && lost.len() as u64 * 100 > u64::from(config.lost_hold_percent) * of_group.len() as u64;
        if hold {
            continue;
        }
        for a in lost {
            let since = a.lost_since_ms.unwrap_or(now_ms);
            if a.live_tasks == 0
                && now_ms.saturating_sub(since) >= config.lost_grace_ms
                && !terminating.contains(&a.instance_id)
                && budget.take(&g.id)
            {
                terminating.insert(a.instance_id.clone());
                plan.terminate.push((
                    g.id.clone(),
                    a.instance_id.clone(),
                    "agent lost; its tasks were replaced".into(),
                ));
            }
        }
    }

    for tier in [Tier::Critical, Tier::Flex] {
        let limits = config.limits(tier);
        let of_tier: Vec<&InstanceGroup> = managed.iter().copied().filter(|g| g.tier == tier).collect();
        // Instances on their way: launched recently, not registered yet.
        let pending: u32 = of_tier
            .iter()
            .flat_map(|g| instances_of(g))
            .filter(|i| !by_instance.contains_key(i.id.as_str()) && !terminating.contains(&i.id))
            .count() as u32;
        let idle: Vec<(&InstanceGroup, &AgentLoad)> = of_tier
            .iter()
            .flat_map(|g| instances_of(g).iter().map(move |i| (*g, i)))
            .filter_map(|(g, i)| by_instance.get(i.id.as_str()).map(|a| (g, *a)))
            .filter(|(_, a)| a.live_tasks == 0 && a.lost_since_ms.is_none())
            .collect();

        // Scale up: by the unplaced tasks, then to keep min_idle.
        let mut need_instances = 0u32;
        let mut need = ResourceDimension::default();
        for r in unplaced.get(&tier).map(Vec::as_slice).unwrap_or_default() {
            if of_tier.iter().any(|g| g.launch.as_ref().is_some_and(|l| fits_one(r, &l.instance_resources))) {
                need.add(r);
            }
        }
        if let Some(first) = of_tier.iter().find(|g| g.lifecycle == Lifecycle::Active) {
            if let Some(l) = &first.launch {
                need_instances = instances_for(&need, &l.instance_resources);
            }
        }
        let idle_shortfall = limits.min_idle.saturating_sub(idle.len() as u32);
        let mut add = need_instances.max(idle_shortfall).saturating_sub(pending);
        for g in of_tier.iter().filter(|g| g.lifecycle == Lifecycle::Active) {
            if add == 0 {
                break;
            }
            let Some(d) = desired.get_mut(&g.id) else { continue };
            let room = g.max.saturating_sub(*d);
            let grow = room.min(add);
            *d += grow;
            add -= grow;
        }

        // Scale down: idle agents, PhasedOut and Removable groups first; keep min_idle.
        if need_instances == 0 {
            let mut candidates: Vec<&(&InstanceGroup, &AgentLoad)> = idle.iter().collect();
            let rank = |g: &InstanceGroup| match g.lifecycle {
                Lifecycle::Removable => 0,
                Lifecycle::PhasedOut => 1,
                _ => 2,
            };
            candidates.sort_by(|a, b| (rank(a.0), &a.1.agent_id).cmp(&(rank(b.0), &b.1.agent_id)));
            let mut idle_left = idle.len() as u32;
            for (g, a) in candidates {
                let cooled = a.idle_since_ms.is_some_and(|s| now_ms - s >= config.idle_cooldown_ms);
                let over_max = idle_left > limits.max_idle;
                let keeps_min_idle = idle_left > limits.min_idle || g.lifecycle != Lifecycle::Active;
                let Some(d) = desired.get_mut(&g.id) else { continue };
                let floor = if g.lifecycle == Lifecycle::Removable { 0 } else { g.min };
                if (cooled || over_max)
                    && keeps_min_idle
                    && *d > floor
                    && !terminating.contains(&a.instance_id)
                    && budget.take(&g.id)
                {
                    *d -= 1;
                    idle_left -= 1;
                    terminating.insert(a.instance_id.clone());
                    plan.terminate.push((g.id.clone(), a.instance_id.clone(), "idle".into()));
                }
            }
        }
    }

    // Actuation: make each group's instance count equal its (new) desired.
    for g in &managed {
        let d = desired[&g.id].clamp(if g.lifecycle == Lifecycle::Removable { 0 } else { g.min }, g.max);
        desired.insert(g.id.clone(), d);
        let alive: Vec<&Instance> = instances_of(g).iter().filter(|i| !terminating.contains(&i.id)).collect();
        let count = alive.len() as u32;
        if count < d {
            plan.launch.insert(g.id.clone(), d - count);
        } else if count > d {
            // Without an agent, or with an idle Online one; never a Lost agent's (see above).
            let mut surplus: Vec<&Instance> = alive
                .into_iter()
                .filter(|i| {
                    by_instance.get(i.id.as_str()).is_none_or(|a| a.live_tasks == 0 && a.lost_since_ms.is_none())
                })
                .collect();
            // Those without an agent first (newest first: likeliest still booting), then idle ones.
            surplus.sort_by_key(|i| (by_instance.contains_key(i.id.as_str()), std::cmp::Reverse(i.launched_ms)));
            for i in surplus.into_iter().take((count - d) as usize) {
                if !budget.take(&g.id) {
                    break;
                }
                plan.terminate.push((g.id.clone(), i.id.clone(), "above desired".into()));
            }
        }
        if d != g.desired {
            plan.desired.insert(g.id.clone(), d);
        }
    }
    // Only on an instance EC2 still runs: the agent of one already terminated stays cordoned (its
    // host is gone, or going, whatever its stream still says).
    let live: BTreeSet<&str> = instances.values().flatten().map(|i| i.id.as_str()).collect();
    let going: BTreeSet<&str> = plan
        .terminate
        .iter()
        .map(|(_, id, _)| id.as_str())
        .chain(groups.iter().flat_map(|g| g.pending_terminations.iter().map(String::as_str)))
        .collect();
    plan.uncordon = agents
        .iter()
        .filter(|a| a.cordoned && live.contains(a.instance_id.as_str()) && !going.contains(a.instance_id.as_str()))
        .map(|a| a.agent_id.clone())
        .collect();
    plan
}

#[cfg(test)]
#[path = "plan_test.rs"]
mod plan_test;
