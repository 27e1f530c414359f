//! The leader duty that scales instance groups with EC2.
//!
//! Each round lists every managed group's instances (by the `titus:instance-group` and
//! `titus:cluster` tags), ties them to agents by the agents' `instanceId` attribute, finds the tasks
//! that stayed unplaced, and runs the planner. New desired sizes are proposed through Raft; a launch
//! is written ahead (a client token in the group's record) so that a new leader repeats the same
//! RunInstances call — which EC2 answers with the first call's instances — instead of launching
//! twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use titus_aws::{Aws, LaunchSpec};

use super::plan::{self, AgentLoad, Instance};
use crate::clock::now_ms;
use crate::command::{Command, CommandResponse};
use crate::config::AwsConfig;
use crate::jobs::apply::{agent_of, allocation_by_agent};
use crate::model::agent::{
    spread, AgentState, InstanceGroup, LaunchIntent, CLUSTER_TAG, INSTANCE_GROUP_TAG, INSTANCE_ID_ATTRIBUTE,
};
use crate::model::task::TaskState;
use crate::model::{ResourceDimension, Tier};
use crate::replica::{Replica, Term};
use crate::state::StateRead;

struct Duty {
    replica: Arc<Replica>,
    /// The term this duty leads in: its writes and AWS calls are fenced by it.
    term: Term,
    aws: Aws,
    config: AwsConfig,
    /// Since when each agent has been idle, as this leader saw it.
    idle_since: HashMap<String, i64>,
    /// When this leader first saw each Lost agent whose record does not say when it was lost.
    lost_seen: HashMap<String, i64>,
}

pub async fn run(replica: Arc<Replica>, term: Term, aws: Aws, config: AwsConfig, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_millis(config.capacity.interval_ms);
    let mut duty = Duty { replica, term, aws, config, idle_since: HashMap::new(), lost_seen: HashMap::new() };
    loop {
        // A round ends at once when leadership ends: it makes AWS calls from what it read.
        let round = tokio::select! {
            r = duty.round() => r,
            _ = stop.changed() => return,
        };
        match round {
            Ok(()) => {}
            Err(e @ crate::Error::Deposed { .. }) => {
                tracing::info!(error = %e, "capacity: no longer leading; stopping");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "capacity: round failed; retrying next interval"),
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
    }
}

impl Duty {
    async fn propose(&self, command: Command) -> crate::Result<()> {
        let kind = command.kind();
        if let CommandResponse::Rejected(r) = self.replica.propose_as_leader(self.term, command).await? {
            tracing::debug!(kind, message = %r.message, "capacity: command no longer applies");
        }
        Ok(())
    }

    async fn round(&mut self) -> crate::Result<()> {
        let state = &self.replica.state;
        let groups: Vec<InstanceGroup> = state.instance_groups()?.into_iter().filter(|g| g.launch.is_some()).collect();
        if groups.is_empty() {
            return Ok(());
        }
        let cluster = state.cluster_id().unwrap_or_default();
        let now = now_ms();

        // A launch or termination written ahead by this or an earlier leader is finished first.
        let mut busy = None;
        for g in &groups {
            if let Some(intent) = &g.pending_launch {
                self.launch(g, intent, &cluster).await?;
            }
            if !g.pending_terminations.is_empty() {
                let why = "finishing a termination written ahead".to_string();
                let instances: Vec<(String, String)> =
                    g.pending_terminations.iter().map(|id| (id.clone(), why.clone())).collect();
                let busy = match &busy {
                    Some(b) => b,
                    None => busy.insert(self.busy_instances()?),
                };
                self.finish_terminations(&g.id, &instances, busy).await?;
            }
        }

        let mut instances: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        let mut subnets_in_use: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
        for g in &groups {
            let listed = self.aws.instances_tagged(INSTANCE_GROUP_TAG, &g.id).await;
            crate::telemetry::metrics().aws_calls_total.inc(&[
                "capacity",
                "DescribeInstances",
                crate::telemetry::aws_outcome(&listed),
            ]);
            let listed = match listed {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(group = %g.id, error = %e, "capacity: cannot list instances; skipping this round");
                    return Ok(());
                }
            };
            let of_cluster: Vec<titus_aws::Instance> = listed
                .into_iter()
                .filter(|i| matches!(i.state.as_str(), "pending" | "running"))
                .filter(|i| i.tags.iter().any(|(k, v)| k == CLUSTER_TAG && *v == cluster))
                .collect();
            let per_subnet = subnets_in_use.entry(g.id.clone()).or_default();
            for i in &of_cluster {
                *per_subnet.entry(i.subnet_id.clone()).or_insert(0) += 1;
            }
            instances.insert(
                g.id.clone(),
                of_cluster.into_iter().map(|i| Instance { id: i.id, launched_ms: i.launch_time_ms }).collect(),
            );
        }

        let allocation = allocation_by_agent(state)?;
        // Every agent, Online or Lost, stays tied to its instance: a silent agent's instance may
        // still run its containers, and is not "an instance that never registered".
        let all_agents = state.agents()?;
        let online_ids: std::collections::HashSet<&str> =
            all_agents.iter().filter(|a| a.state == AgentState::Online).map(|a| a.id.as_str()).collect();
        self.idle_since.retain(|id, _| online_ids.contains(id.as_str()));
        let mut agents = Vec::new();
        for a in &all_agents {
            let Some(instance_id) = a.attributes.get(INSTANCE_ID_ATTRIBUTE) else { continue };
            let live_tasks = allocation.get(&a.id).map_or(0, |x| x.live_tasks);
            let online = a.state == AgentState::Online;
            let idle_since = if online && live_tasks == 0 {
                Some(*self.idle_since.entry(a.id.clone()).or_insert(now))
            } else {
                self.idle_since.remove(&a.id);
                None
            };
            // When it was lost, as replicated (records from before that was kept: now, as this
            // leader first sees it, which only makes the grace period longer).
            let lost_since = if online {
                self.lost_seen.remove(&a.id);
                None
            } else {
                Some(a.lost_ms.unwrap_or_else(|| *self.lost_seen.entry(a.id.clone()).or_insert(now)))
            };
            agents.push(AgentLoad {
                agent_id: a.id.clone(),
                instance_id: instance_id.clone(),
                live_tasks,
                idle_since_ms: idle_since,
                lost_since_ms: lost_since,
                cordoned: a.terminating,
            });
        }

        let unplaced = self.unplaced(now)?;
        let plan = plan::plan(&groups, &instances, &agents, &unplaced, &self.config.capacity.planner(), now);
        for agent_id in &plan.uncordon {
            tracing::info!(%agent_id, "capacity: lifting a cordon no termination follows");
            self.propose(Command::MarkAgentTerminating { agent_id: agent_id.clone(), terminating: false }).await?;
        }
        for (id, desired) in &plan.desired {
            tracing::info!(group = %id, desired, "capacity: new desired size");
            self.propose(Command::SetInstanceGroupDesired { id: id.clone(), desired: *desired }).await?;
        }
        if !plan.terminate.is_empty() {
            // Cordon first: an agent on an instance about to go gets no new task; one that got a
            // task since this round read the state keeps its instance (a later round takes it).
            let by_instance: HashMap<&str, &AgentLoad> = agents.iter().map(|a| (a.instance_id.as_str(), a)).collect();
            for (_, id, _) in &plan.terminate {
                if let Some(a) = by_instance.get(id.as_str()) {
                    let cordon = Command::MarkAgentTerminating { agent_id: a.agent_id.clone(), terminating: true };
                    self.propose(cordon).await?;
                }
            }
            let mut per_group: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
            for (group, id, why) in &plan.terminate {
                per_group.entry(group.clone()).or_default().push((id.clone(), why.clone()));
            }
            // Read after the cordons: an agent that got a task meanwhile keeps its instance.
            let busy = self.busy_instances()?;
            let mut kept = Vec::new();
            for (group, instances) in per_group {
                // Written ahead: a new leader finishes the call (see `finish_terminations`).
                let ids = instances.iter().map(|(id, _)| id.clone()).collect();
                self.propose(Command::SetTerminationIntent { id: group.clone(), instances: ids }).await?;
                kept.extend(self.finish_terminations(&group, &instances, &busy).await?);
            }
            // A cordon is undone when its instance stays: the agent takes tasks again.
            for id in &kept {
                if let Some(a) = by_instance.get(id.as_str()) {
                    let uncordon = Command::MarkAgentTerminating { agent_id: a.agent_id.clone(), terminating: false };
                    self.propose(uncordon).await?;
                }
            }
        }
        for (id, count) in plan.launch {
            let Some(g) = groups.iter().find(|g| g.id == id) else { continue };
            if g.pending_launch.is_some() {
                continue; // repeated above; its instances show up next round
            }
            let subnets = g.launch.as_ref().map(|l| l.subnet_ids.clone()).unwrap_or_default();
            let split = spread(count, &subnets, subnets_in_use.get(&id).unwrap_or(&BTreeMap::new()));
            let intent = LaunchIntent { client_token: uuid::Uuid::new_v4().to_string(), count, created_ms: now, split };
            self.propose(Command::SetLaunchIntent { id: id.clone(), intent: Some(intent.clone()) }).await?;
            self.launch(g, &intent, &cluster).await?;
        }
        Ok(())
    }

    /// The instances whose agent, Online or Lost, holds live tasks in the replicated state now.
    fn busy_instances(&self) -> crate::Result<std::collections::HashSet<String>> {
        let state = &self.replica.state;
        let allocation = allocation_by_agent(state)?;
        Ok(state
            .agents()?
            .into_iter()
            .filter(|a| allocation.get(&a.id).is_some_and(|x| x.live_tasks > 0))
            .filter_map(|a| a.attributes.get(INSTANCE_ID_ATTRIBUTE).cloned())
            .collect())
    }

    /// Terminates the instances of `group` written ahead (instance id, why) — except the `busy`
    /// ones (see [`Duty::busy_instances`]) — and clears the intent once EC2 answered. Answers the
    /// instances kept.
    async fn finish_terminations(
        &self,
        group: &str,
        instances: &[(String, String)],
        busy: &std::collections::HashSet<String>,
    ) -> crate::Result<Vec<String>> {
        let (kept, go): (Vec<&(String, String)>, Vec<&(String, String)>) =
            instances.iter().partition(|(id, _)| busy.contains(id));
        for (id, _) in &kept {
            tracing::info!(group, instance = %id, "capacity: agent got a task meanwhile; keeping its instance");
        }
        let clear = Command::SetTerminationIntent { id: group.to_string(), instances: Vec::new() };
        if go.is_empty() {
            self.propose(clear).await?;
            return Ok(kept.into_iter().map(|(id, _)| id.clone()).collect());
        }
        // Fenced: only while a majority still follows this leader in its term (nothing below
        // waits before the call).
        self.replica.confirm_leader(self.term).await?;
        for (id, why) in &go {
            tracing::info!(group, instance = %id, why = %why, "capacity: terminating instance");
        }
        let ids: Vec<String> = go.iter().map(|(id, _)| id.clone()).collect();
        let result = self.aws.terminate_instances(&ids).await;
        let m = crate::telemetry::metrics();
        m.aws_calls_total.inc(&["capacity", "TerminateInstances", crate::telemetry::aws_outcome(&result)]);
        let mut kept: Vec<String> = kept.into_iter().map(|(id, _)| id.clone()).collect();
        match result {
            Ok(()) => {
                for (_, why) in &go {
                    m.capacity_instances_terminated_total.inc(&[group, why]);
                }
                self.propose(clear).await?;
            }
            // The intent stays: the next round (or the next leader) makes the call again.
            Err(e) => {
                tracing::warn!(group, error = %e, "capacity: TerminateInstances failed; retrying next round");
                kept.extend(ids);
            }
        }
        Ok(kept)
    }

    /// Calls RunInstances for a written-ahead launch and clears it when EC2 answered.
    /// Calls RunInstances for a written-ahead launch and clears it when EC2 answered: one call per
    /// subnet of the intent's split (client token `TOKEN-i`), so a repeat makes the same calls.
    async fn launch(&self, g: &InstanceGroup, intent: &LaunchIntent, cluster: &str) -> crate::Result<()> {
        let Some(l) = &g.launch else { return Ok(()) };
        let mut tags: Vec<(String, String)> = l.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        tags.push((INSTANCE_GROUP_TAG.into(), g.id.clone()));
        tags.push((CLUSTER_TAG.into(), cluster.to_string()));
        tags.push(("Name".into(), format!("titus-agent-{}", g.id)));
        // One call per subnet of the split written with the intent; no subnet: one call.
        let calls: Vec<(Vec<String>, u32)> = if intent.split.is_empty() {
            vec![(Vec::new(), intent.count)]
        } else {
            intent.split.iter().map(|(subnet, n)| (vec![subnet.clone()], *n)).collect()
        };
        let m = crate::telemetry::metrics();
        let mut launched = Vec::new();
        for (i, (subnet, share)) in calls.iter().enumerate() {
            let share = *share;
            let spec = LaunchSpec {
                image_id: l.image_id.clone(),
                instance_type: l.instance_type.clone(),
                subnet_ids: subnet.clone(),
                security_group_ids: l.security_group_ids.clone(),
                tags: tags.clone(),
            };
            let token =
                if calls.len() == 1 { intent.client_token.clone() } else { format!("{}-{i}", intent.client_token) };
            // Fenced: only while a majority still follows this leader in its term.
            self.replica.confirm_leader(self.term).await?;
            tracing::info!(group = %g.id, count = share, token = %token, "capacity: calling RunInstances");
            let result = self.aws.run_instances(&spec, share, &token).await;
            m.aws_calls_total.inc(&["capacity", "RunInstances", crate::telemetry::aws_outcome(&result)]);
            match result {
                Ok(ids) => launched.extend(ids),
                Err(e) if e.is_transient() => {
                    tracing::warn!(group = %g.id, error = %e, "capacity: RunInstances failed; repeating it next round");
                    return Ok(());
                }
                Err(e) => {
                    tracing::error!(group = %g.id, error = %e, "capacity: RunInstances refused; dropping this launch");
                    return self.propose(Command::SetLaunchIntent { id: g.id.clone(), intent: None }).await;
                }
            }
        }
        m.capacity_instances_launched_total.add(&[&g.id], launched.len() as f64);
        tracing::info!(group = %g.id, instances = ?launched, "capacity: launched instances");
        self.propose(Command::SetLaunchIntent { id: g.id.clone(), intent: None }).await
    }

    /// Per tier, the resources of each task accepted longer ago than `unplaced_after_ms` and still
    /// without an agent.
    fn unplaced(&self, now: i64) -> crate::Result<BTreeMap<Tier, Vec<ResourceDimension>>> {
        let state = &self.replica.state;
        let after = self.config.capacity.unplaced_after_ms as i64;
        let mut jobs: HashMap<String, Option<(Tier, ResourceDimension)>> = HashMap::new();
        let mut out: BTreeMap<Tier, Vec<ResourceDimension>> = BTreeMap::new();
        // Every round, on a full fleet, nothing waits for an agent: the count says so without a scan.
        if state.counts().pending_tasks == 0 {
            return Ok(out);
        }
        for t in state.all_tasks()? {
            if t.state() != TaskState::Accepted || agent_of(&t).is_some() || now - t.status.timestamp_ms < after {
                continue;
            }
            if !jobs.contains_key(&t.job_id) {
                let v = match state.job(&t.job_id)? {
                    Some(j) => {
                        let tier = state.capacity_group(&j.descriptor.capacity_group)?.map_or(Tier::Flex, |g| g.tier);
                        Some((tier, j.descriptor.container.resources.as_dimension()))
                    }
                    None => None,
                };
                jobs.insert(t.job_id.clone(), v);
            }
            if let Some((tier, r)) = &jobs[&t.job_id] {
                out.entry(*tier).or_default().push(r.clone());
            }
        }
        Ok(out)
    }
}
