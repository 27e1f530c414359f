//! SchedulerService: why a task is or is not placed, from the leader's last scheduling round.

use std::sync::Arc;

use titus_proto as pb;
use titus_proto::scheduler_service_server::SchedulerService;
use tonic::{Request, Response, Status};

use crate::agents::AgentHub;
use crate::error::Error;
use crate::model::task::TaskState;
use crate::state::{agent_of, StateRead};

pub struct SchedulerApi {
    pub hub: Arc<AgentHub>,
}

/// Tasks a dry run places at most.
const MAX_PLANNED_TASKS: u32 = 10_000;

/// The container fields that differ, by name.
fn container_changes(before: &crate::model::job::Container, after: &crate::model::job::Container) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |name: &str, changed: bool| {
        if changed {
            out.push(name.to_string());
        }
    };
    differ("image", before.image != after.image);
    differ("entryPoint", before.entry_point != after.entry_point);
    differ("command", before.command != after.command);
    differ("env", before.env != after.env);
    differ("softConstraints", before.soft_constraints != after.soft_constraints);
    differ("hardConstraints", before.hard_constraints != after.hard_constraints);
    differ("capabilities", before.capabilities != after.capabilities);
    differ("securityProfile", before.security_profile != after.security_profile);
    differ("healthCheck", before.health_check != after.health_check);
    differ("resources", before.resources != after.resources);
    out
}

#[tonic::async_trait]
impl SchedulerService for SchedulerApi {
    async fn plan_job(&self, request: Request<pb::JobPlanRequest>) -> Result<Response<pb::JobPlan>, Status> {
        use crate::model::convert::{job_descriptor_from_proto, job_descriptor_to_proto, strategy_from_proto};
        use crate::model::job::{Job, JobState, JobStatus};
        let replica = self.hub.replica();
        replica.require_leader()?;
        let r = request.into_inner();
        let state = &replica.state;
        let (job, count, steps, changes) = match (r.job_descriptor, r.job_id.is_empty()) {
            (Some(d), true) => {
                let descriptor = job_descriptor_from_proto(Some(d))?;
                let count = descriptor.wanted_tasks();
                let status = JobStatus {
                    state: JobState::Accepted,
                    reason_code: String::new(),
                    reason_message: String::new(),
                    timestamp_ms: 0,
                };
                let job = Job {
                    id: "(new job)".into(),
                    descriptor,
                    status,
                    status_history: Vec::new(),
                    rollout: Default::default(),
                    evictions_ms: Vec::new(),
                };
                (job, count, 0, Vec::new())
            }
            (None, false) => {
                crate::model::convert::id_field("job_id", &r.job_id)?;
                let strategy = strategy_from_proto(r.strategy)?;
                let mut job = state
                    .job(&r.job_id)?
                    .ok_or_else(|| Status::not_found(format!("job_id: job {:?} does not exist", r.job_id)))?;
                if job.descriptor.is_batch() {
                    return Err(Error::invalid("job_id", "a batch job's spec cannot be updated").into());
                }
                let mut container = r.container.ok_or_else(|| Error::invalid("container", "is required"))?;
                let mut descriptor = job_descriptor_to_proto(&job.descriptor);
                if container.resources.is_none() {
                    container.resources = descriptor.container.as_ref().and_then(|c| c.resources);
                }
                descriptor.container = Some(container);
                let descriptor = job_descriptor_from_proto(Some(descriptor))?;
                let changes = container_changes(&job.descriptor.container, &descriptor.container);
                job.descriptor = descriptor;
                let desired = job.descriptor.wanted_tasks();
                let canaries = strategy.canary.min(desired);
                let per_step = strategy.max_unavailable.saturating_add(strategy.max_surge).max(1);
                let count = if canaries > 0 { canaries } else { strategy.max_surge.max(1).min(desired) };
                let steps = u32::from(canaries > 0) + desired.div_ceil(per_step);
                (job, count, if changes.is_empty() { 0 } else { steps }, changes)
            }
            _ => {
                return Err(Error::invalid(
                    "job_descriptor",
                    "give either job_descriptor (a new job) or job_id and container (an update)",
                )
                .into())
            }
        };
        if count > MAX_PLANNED_TASKS {
            return Err(
                Error::invalid("job_descriptor", format!("a plan places at most {MAX_PLANNED_TASKS} tasks")).into()
            );
        }
        let tier = state.capacity_group(&job.descriptor.capacity_group)?.map_or(crate::model::Tier::Flex, |g| g.tier);
        let tasks = crate::scheduling::planned_tasks(&job, tier, count)
            .map_err(|e| Error::invalid("container.hard_constraints", e))?;
        let answer = self.hub.scheduling.dry_run(tasks, std::time::Duration::from_secs(10)).await.ok_or_else(|| {
            Status::unavailable("the scheduler is not running here yet (a new leader loads its state first); try again")
        })?;
        let mut plan = pb::JobPlan {
            tasks: count,
            pending_before: answer.pending_before as u32,
            steps,
            changes,
            ..Default::default()
        };
        for (_, agent) in answer.placements {
            *plan.placements.entry(agent).or_default() += 1;
        }
        for (_, why) in answer.unplaced {
            *plan.pending_reasons.entry(why.reason.clone()).or_default() += 1;
            plan.pending_messages.entry(why.reason).or_insert(why.message);
        }
        Ok(Response::new(plan))
    }

    async fn get_scheduling_result(
        &self,
        request: Request<pb::TaskId>,
    ) -> Result<Response<pb::SchedulingResult>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(Error::invalid("id", "must not be empty").into());
        }
        let replica = self.hub.replica();
        // The reasons live on the leader only: elsewhere the caller is sent there.
        replica.require_leader()?;
        let state = &replica.state;
        let (round_ms, left_for_later) = self.hub.scheduling.round();
        let mut out = pb::SchedulingResult { task_id: id.clone(), round_timestamp: round_ms, ..Default::default() };
        let task = match state.task(&id)? {
            Some(t) => t,
            None if state.archived_task(&id)?.is_some() => {
                out.state = pb::scheduling_result::State::NotPending as i32;
                out.message = "the task is finished".into();
                return Ok(Response::new(out));
            }
            None => return Err(Status::not_found(format!("id: task {id:?} does not exist"))),
        };
        let job_accepted =
            state.job(&task.job_id)?.is_some_and(|j| j.status.state == crate::model::job::JobState::Accepted);
        if let Some(agent) = agent_of(&task) {
            out.state = pb::scheduling_result::State::Placed as i32;
            out.agent_id = agent.to_string();
            out.message = format!("placed on agent {agent}; the task is {}", task.state().name());
        } else if task.state() != TaskState::Accepted || !job_accepted {
            out.state = pb::scheduling_result::State::NotPending as i32;
            out.message = format!("the task is {} and will not be placed", task.state().name());
        } else {
            out.state = pb::scheduling_result::State::Waiting as i32;
            match self.hub.scheduling.why(&id) {
                Some(w) => {
                    out.reason = w.reason;
                    out.message = w.message;
                    out.round_timestamp = w.round_ms;
                }
                None => {
                    out.reason = "not yet considered".into();
                    out.message = if left_for_later > 0 {
                        format!(
                            "waiting for a later scheduling round: the last one left {left_for_later} pending tasks \
                             for later (Critical and older ones go first)"
                        )
                    } else {
                        "waiting for the next scheduling round".into()
                    };
                }
            }
        }
        Ok(Response::new(out))
    }
}
