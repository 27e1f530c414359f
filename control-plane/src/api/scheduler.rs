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

#[tonic::async_trait]
impl SchedulerService for SchedulerApi {
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
