//! AgentManagementService: instance groups and the registered agents (Titus's agent management).

use std::sync::Arc;

use titus_proto as pb;
use titus_proto::agent_management_service_server::AgentManagementService;
use tonic::{Request, Response, Status};

use super::client_deadline;
use crate::agents::AgentHub;
use crate::command::{Command, CommandResponse, Rejection, RejectionKind};
use crate::error::Error;
use crate::jobs::apply::{allocation_by_agent, Allocation};
use crate::model::agent::{validate_machine_attributes, Agent, AgentState, InstanceGroup, LaunchSettings, Lifecycle};
use crate::model::convert::{resources_to_proto, tier_from_proto, tier_to_proto};
use crate::model::validate_name;
use crate::model::FieldViolation;
use crate::replica::Replica;
use crate::state::StateRead;

pub struct AgentManagementApi {
    pub replica: Arc<Replica>,
    pub hub: Arc<AgentHub>,
}

fn lifecycle_from_proto(field: &str, l: i32) -> Result<Lifecycle, Error> {
    Ok(
        match pb::InstanceGroupLifecycle::try_from(l)
            .map_err(|_| Error::invalid(field, format!("{l} is not a lifecycle")))?
        {
            pb::InstanceGroupLifecycle::IgInactive => Lifecycle::Inactive,
            pb::InstanceGroupLifecycle::IgActive => Lifecycle::Active,
            pb::InstanceGroupLifecycle::IgPhasedOut => Lifecycle::PhasedOut,
            pb::InstanceGroupLifecycle::IgRemovable => Lifecycle::Removable,
        },
    )
}

fn lifecycle_to_proto(l: Lifecycle) -> pb::InstanceGroupLifecycle {
    match l {
        Lifecycle::Inactive => pb::InstanceGroupLifecycle::IgInactive,
        Lifecycle::Active => pb::InstanceGroupLifecycle::IgActive,
        Lifecycle::PhasedOut => pb::InstanceGroupLifecycle::IgPhasedOut,
        Lifecycle::Removable => pb::InstanceGroupLifecycle::IgRemovable,
    }
}

fn group_to_proto(g: InstanceGroup) -> pb::InstanceGroup {
    pb::InstanceGroup {
        id: g.id,
        tier: tier_to_proto(g.tier) as i32,
        lifecycle: lifecycle_to_proto(g.lifecycle) as i32,
        attributes: g.attributes.into_iter().collect(),
        launch: g.launch.map(|l| pb::LaunchSettings {
            image_id: l.image_id,
            instance_type: l.instance_type,
            subnet_ids: l.subnet_ids,
            security_group_ids: l.security_group_ids,
            tags: l.tags.into_iter().collect(),
            instance_resources: Some(resources_to_proto(&l.instance_resources)),
        }),
        min: g.min,
        desired: g.desired,
        max: g.max,
    }
}

/// Most subnets or security groups in an instance group's launch settings.
const MAX_LAUNCH_IDS: usize = 64;

/// An instance group from the wire, with every field checked.
fn group_from_proto(g: pb::InstanceGroup) -> Result<InstanceGroup, Status> {
    validate_name("id", &g.id).map_err(|v| Error::InvalidArgument(vec![v]))?;
    let mut violations = Vec::new();
    if g.min > g.max {
        violations.push(FieldViolation::new("min", format!("must be <= max ({})", g.max)));
    }
    if g.desired < g.min || g.desired > g.max {
        violations.push(FieldViolation::new("desired", format!("must be within [min, max] = [{}, {}]", g.min, g.max)));
    }
    validate_machine_attributes("attributes", &g.attributes, &mut violations);
    let launch = match g.launch {
        None => None,
        Some(l) => {
            if l.image_id.is_empty() {
                violations.push(FieldViolation::new("launch.image_id", "must not be empty"));
            }
            if l.instance_type.is_empty() {
                violations.push(FieldViolation::new("launch.instance_type", "must not be empty"));
            }
            let r = l.instance_resources.unwrap_or_default();
            let offered = crate::model::convert::resources_from_proto(&r);
            let bad_resources = offered.validate_offered("launch.instance_resources");
            if !bad_resources.is_empty() {
                violations.extend(bad_resources);
            } else if r.cpu <= 0.0 || r.memory_mb == 0 {
                violations.push(FieldViolation::new(
                    "launch.instance_resources",
                    "cpu and memory_mb must be > 0: a scale-up is sized by them",
                ));
            }
            validate_machine_attributes("launch.tags", &l.tags, &mut violations);
            for (field, list) in
                [("launch.subnet_ids", &l.subnet_ids), ("launch.security_group_ids", &l.security_group_ids)]
            {
                if list.len() > MAX_LAUNCH_IDS {
                    violations.push(FieldViolation::new(field, format!("must have at most {MAX_LAUNCH_IDS} entries")));
                }
                if let Some(i) = list.iter().position(|id| id.is_empty() || id.len() > 256) {
                    violations.push(FieldViolation::new(format!("{field}[{i}]"), "must be 1-256 bytes"));
                }
            }
            for k in l.tags.keys() {
                if k.starts_with("titus:") {
                    violations.push(FieldViolation::new(
                        format!("launch.tags.{k}"),
                        "tags starting with \"titus:\" are reserved",
                    ));
                }
            }
            Some(LaunchSettings {
                image_id: l.image_id,
                instance_type: l.instance_type,
                subnet_ids: l.subnet_ids,
                security_group_ids: l.security_group_ids,
                tags: l.tags.into_iter().collect(),
                instance_resources: offered,
            })
        }
    };
    let tier = tier_from_proto("tier", g.tier)?;
    let lifecycle = lifecycle_from_proto("lifecycle", g.lifecycle)?;
    if !violations.is_empty() {
        return Err(Error::InvalidArgument(violations).into());
    }
    Ok(InstanceGroup {
        id: g.id,
        tier,
        lifecycle,
        attributes: g.attributes.into_iter().collect(),
        launch,
        min: g.min,
        desired: g.desired,
        max: g.max,
        pending_launch: None,
        pending_terminations: Vec::new(),
        lifecycle_since_ms: None,
    })
}

impl AgentManagementApi {
    /// What is left on agent `agent_id` and why each task waits.
    fn drain_status(&self, agent_id: &str) -> Result<pb::DrainStatus, Status> {
        let state = &self.replica.state;
        if state.agent(agent_id)?.is_none() {
            return Err(Error::Rejected(Rejection::new(
                RejectionKind::NotFound,
                "agent_id",
                format!("agent {agent_id:?} does not exist"),
            ))
            .into());
        }
        let since = crate::jobs::lifecycle::draining_agents(state)?.get(agent_id).copied();
        let draining = since.is_some();
        let now = crate::clock::now_ms();
        let mut out = pb::DrainStatus { agent_id: agent_id.to_string(), draining, tasks: Vec::new() };
        let mut jobs: std::collections::BTreeMap<
            String,
            Option<(crate::model::job::Job, Vec<crate::model::task::Task>)>,
        > = Default::default();
        for id in state.task_ids_on_agent(agent_id)? {
            let Some(task) = state.task(&id)? else { continue };
            let job = match jobs.entry(task.job_id.clone()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let job = state.job(&task.job_id)?;
                    let tasks = if job.is_some() { state.tasks_of_job(&task.job_id)? } else { Vec::new() };
                    e.insert(job.map(|j| (j, tasks)))
                }
            };
            let relocating = match (job.as_ref(), since) {
                (Some((j, _)), Some(s)) => crate::jobs::lifecycle::relocation_until(j, s, now),
                _ => None,
            };
            let waiting = match job {
                _ if !draining => String::new(),
                _ if task.state() == crate::model::task::TaskState::KillInitiated => {
                    "on its way out: being killed".into()
                }
                None => String::new(),
                Some((j, _)) if j.descriptor.is_batch() => "a batch task: left to finish where it runs".into(),
                Some((j, _)) if relocating.is_some() => {
                    let until = relocating.unwrap_or(now);
                    format!(
                        "self-managed: its owner has {} s more to move it (relocation time {} s), then the drain moves it",
                        (until - now).saturating_add(999) / 1000,
                        j.descriptor.disruption_budget.self_managed_relocation_time_ms / 1000
                    )
                }
                Some((j, tasks)) => {
                    let allowance = crate::jobs::lifecycle::drain_allowance(j, j.descriptor.wanted_tasks(), tasks, now);
                    let serves = crate::jobs::lifecycle::serves(j, &task, None);
                    let room = if serves { allowance.available } else { allowance.any };
                    if room == 0 {
                        allowance.held_by.unwrap_or_else(|| "its job's disruption budget".into())
                    } else {
                        String::new()
                    }
                }
            };
            out.tasks.push(pb::DrainingTask {
                task_id: task.id.clone(),
                job_id: task.job_id.clone(),
                state: crate::model::convert::task_state_to_proto(task.state()) as i32,
                waiting,
            });
        }
        Ok(out)
    }

    /// `allocation` is the agent's entry of [`allocation_by_agent`], computed once per call.
    fn agent_to_proto(&self, a: Agent, allocation: Option<&Allocation>) -> pb::AgentInstance {
        let allocation = allocation.cloned().unwrap_or_default();
        let (allocated, live) = (allocation.resources, allocation.live_tasks);
        let connected = self.hub.connected().contains(&a.id);
        pb::AgentInstance {
            connected,
            id: a.id,
            instance_group: a.instance_group,
            resources: Some(resources_to_proto(&a.resources)),
            attributes: a.attributes.into_iter().collect(),
            state: match a.state {
                AgentState::Online => pb::AgentState::AgentOnline,
                AgentState::Lost => pb::AgentState::AgentLost,
            } as i32,
            healthy: a.healthy,
            unhealthy_reason: a.unhealthy_reason,
            terminating: a.terminating,
            draining: a.draining,
            registered_ms: a.registered_ms,
            allocated: Some(resources_to_proto(&allocated)),
            live_tasks: live,
        }
    }
}

#[tonic::async_trait]
impl AgentManagementService for AgentManagementApi {
    type ObserveAgentsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::AgentChangeNotification, Status>>;

    async fn observe_agents(&self, request: Request<pb::Empty>) -> Result<Response<Self::ObserveAgentsStream>, Status> {
        use pb::agent_change_notification::Notification;
        let (_, mut rx) = self.replica.state.changes.subscribe(None);
        self.replica.read_barrier(client_deadline(&request)).await?;
        let mut first = Vec::new();
        for g in self.replica.state.instance_groups()? {
            first.push(pb::AgentChangeNotification {
                notification: Some(Notification::InstanceGroupUpdate(group_to_proto(g))),
                revision: 0,
            });
        }
        let allocation = allocation_by_agent(&self.replica.state)?;
        for a in self.replica.state.agents()? {
            let held = allocation.get(&a.id);
            first.push(pb::AgentChangeNotification {
                notification: Some(Notification::AgentUpdate(self.agent_to_proto(a, held))),
                revision: 0,
            });
        }
        first.push(pb::AgentChangeNotification {
            notification: Some(Notification::SnapshotEnd(pb::Empty {})),
            revision: 0,
        });
        let (tx, out) = tokio::sync::mpsc::channel(256);
        let api = AgentManagementApi { replica: self.replica.clone(), hub: self.hub.clone() };
        tokio::spawn(async move {
            for n in first {
                if tx.send(Ok(n)).await.is_err() {
                    return;
                }
            }
            loop {
                let batch = match rx.recv().await {
                    Ok(b) => b,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "observer fell {n} changes behind; observe again"
                            ))))
                            .await;
                        return;
                    }
                    Err(_) => return,
                };
                for change in &batch.changes {
                    let notification = match change {
                        crate::events::Change::Agent(a) => {
                            let allocation =
                                allocation_by_agent(&api.replica.state).ok().and_then(|m| m.get(&a.id).cloned());
                            Notification::AgentUpdate(api.agent_to_proto(a.clone(), allocation.as_ref()))
                        }
                        crate::events::Change::InstanceGroup(g) => {
                            Notification::InstanceGroupUpdate(group_to_proto(g.clone()))
                        }
                        _ => continue,
                    };
                    if tx
                        .send(Ok(pb::AgentChangeNotification {
                            notification: Some(notification),
                            revision: batch.revision,
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(out)))
    }

    async fn create_instance_group(
        &self,
        request: Request<pb::InstanceGroup>,
    ) -> Result<Response<pb::InstanceGroup>, Status> {
        let group = group_from_proto(request.get_ref().clone())?;
        match self.replica.propose(Command::UpsertInstanceGroup { group }, client_deadline(&request)).await? {
            CommandResponse::InstanceGroup(g) => Ok(Response::new(group_to_proto(g))),
            CommandResponse::Rejected(r) => Err(Error::Rejected(r).into()),
            other => Err(Status::internal(format!("unexpected apply result {other:?}"))),
        }
    }

    async fn update_instance_group_lifecycle(
        &self,
        request: Request<pb::InstanceGroupLifecycleUpdate>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        validate_name("id", &r.id).map_err(|v| Error::InvalidArgument(vec![v]))?;
        let lifecycle = lifecycle_from_proto("lifecycle", r.lifecycle)?;
        match self
            .replica
            .propose(
                Command::SetInstanceGroupLifecycle { id: r.id, lifecycle, timestamp_ms: crate::clock::now_ms() },
                client_deadline(&request),
            )
            .await?
        {
            CommandResponse::Rejected(r) => Err(Error::Rejected(r).into()),
            _ => Ok(Response::new(pb::Empty {})),
        }
    }

    async fn list_instance_groups(
        &self,
        request: Request<pb::Empty>,
    ) -> Result<Response<pb::InstanceGroupList>, Status> {
        self.replica.read_barrier(client_deadline(&request)).await?;
        let groups = self.replica.state.instance_groups()?.into_iter().map(group_to_proto).collect();
        Ok(Response::new(pb::InstanceGroupList { groups }))
    }

    async fn find_agents(&self, request: Request<pb::Empty>) -> Result<Response<pb::AgentList>, Status> {
        self.replica.require_leader()?;
        self.replica.read_barrier(client_deadline(&request)).await?;
        let allocation = allocation_by_agent(&self.replica.state)?;
        let agents = self.replica.state.agents()?.into_iter().map(|a| {
            let held = allocation.get(&a.id);
            self.agent_to_proto(a, held)
        });
        let agents = agents.collect();
        Ok(Response::new(pb::AgentList { agents }))
    }

    async fn drain_agent(&self, request: Request<pb::AgentDrainRequest>) -> Result<Response<pb::DrainStatus>, Status> {
        let r = request.get_ref().clone();
        validate_name("agent_id", &r.agent_id).map_err(|v| Error::InvalidArgument(vec![v]))?;
        crate::auth::note_target(&request, format!("agent {}", r.agent_id));
        self.replica.require_leader()?;
        let command = Command::SetAgentDraining {
            agent_id: r.agent_id.clone(),
            draining: r.drain,
            timestamp_ms: crate::clock::now_ms(),
        };
        if let CommandResponse::Rejected(rejection) = self.replica.propose(command, client_deadline(&request)).await? {
            return Err(Error::Rejected(rejection).into());
        }
        Ok(Response::new(self.drain_status(&r.agent_id)?))
    }

    async fn get_drain_status(&self, request: Request<pb::AgentId>) -> Result<Response<pb::DrainStatus>, Status> {
        self.replica.require_leader()?;
        self.replica.read_barrier(client_deadline(&request)).await?;
        Ok(Response::new(self.drain_status(&request.get_ref().id)?))
    }

    async fn get_agent(&self, request: Request<pb::AgentId>) -> Result<Response<pb::AgentInstance>, Status> {
        self.replica.require_leader()?;
        self.replica.read_barrier(client_deadline(&request)).await?;
        let id = &request.get_ref().id;
        match self.replica.state.agent(id)? {
            Some(a) => Ok(Response::new(self.agent_to_proto(a, allocation_by_agent(&self.replica.state)?.get(id)))),
            None => Err(Error::Rejected(Rejection::new(
                RejectionKind::NotFound,
                "id",
                format!("agent {id:?} does not exist"),
            ))
            .into()),
        }
    }
}
