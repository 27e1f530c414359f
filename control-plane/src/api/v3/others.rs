//! `com.netflix.titus.LoadBalancerService`, `Health` and `EvictionService` over ours.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use titus_proto as pb;
use titus_proto::job_management_service_server::JobManagementService as OurJobs;
use titus_proto::load_balancer_service_server::LoadBalancerService as OurLoadBalancers;
use titus_proto::v3;

use super::convert::{page_from_v3, pagination_to_v3};
use super::inner;
use crate::api::{JobApi, LoadBalancerApi};
use crate::error::Error;
use crate::model::job::JobState;
use crate::model::task::TaskState;
use crate::state::StateRead;

type Result<T> = std::result::Result<Response<T>, Status>;

pub struct V3LoadBalancerApi {
    pub load_balancers: Arc<LoadBalancerApi>,
}

fn job_load_balancers(r: pb::GetJobLoadBalancersResult) -> v3::GetJobLoadBalancersResult {
    v3::GetJobLoadBalancersResult {
        job_id: r.job_id,
        load_balancers: r.load_balancers.into_iter().map(|l| v3::LoadBalancerId { id: l.id }).collect(),
    }
}

#[tonic::async_trait]
impl v3::load_balancer_service_server::LoadBalancerService for V3LoadBalancerApi {
    async fn get_job_load_balancers(&self, request: Request<v3::JobId>) -> Result<v3::GetJobLoadBalancersResult> {
        let ours = pb::JobId { id: request.get_ref().id.clone() };
        let r = OurLoadBalancers::get_job_load_balancers(&*self.load_balancers, inner(&request, ours)).await?;
        Ok(Response::new(job_load_balancers(r.into_inner())))
    }

    async fn get_all_load_balancers(
        &self,
        request: Request<v3::GetAllLoadBalancersRequest>,
    ) -> Result<v3::GetAllLoadBalancersResult> {
        let (page, number) = page_from_v3(request.get_ref().page.clone())?;
        if number > 0 {
            return Err(Error::invalid("page.pageNumber", "page by cursor here").into());
        }
        let size = page.page_size;
        let ours = pb::GetAllLoadBalancersRequest { page: Some(page) };
        let r =
            OurLoadBalancers::get_all_load_balancers(&*self.load_balancers, inner(&request, ours)).await?.into_inner();
        let seen = r.job_load_balancers.len() as u32;
        Ok(Response::new(v3::GetAllLoadBalancersResult {
            job_load_balancers: r.job_load_balancers.into_iter().map(job_load_balancers).collect(),
            pagination: Some(pagination_to_v3(r.pagination.unwrap_or_default(), 0, size, seen)),
        }))
    }

    async fn add_load_balancer(&self, request: Request<v3::AddLoadBalancerRequest>) -> Result<()> {
        let r = request.get_ref().clone();
        let id = r.load_balancer_id.ok_or_else(|| Error::invalid("loadBalancerId", "is required"))?;
        let ours = pb::AddLoadBalancerRequest {
            job_id: r.job_id,
            load_balancer_id: Some(pb::LoadBalancerId { id: id.id, ..Default::default() }),
        };
        OurLoadBalancers::add_load_balancer(&*self.load_balancers, inner(&request, ours)).await?;
        Ok(Response::new(()))
    }

    async fn remove_load_balancer(&self, request: Request<v3::RemoveLoadBalancerRequest>) -> Result<()> {
        let r = request.get_ref().clone();
        let id = r.load_balancer_id.ok_or_else(|| Error::invalid("loadBalancerId", "is required"))?;
        let ours = pb::RemoveLoadBalancerRequest {
            job_id: r.job_id,
            load_balancer_id: Some(pb::LoadBalancerId { id: id.id, ..Default::default() }),
        };
        OurLoadBalancers::remove_load_balancer(&*self.load_balancers, inner(&request, ours)).await?;
        Ok(Response::new(()))
    }
}

/// Titus's health check: SERVING while this replica knows a leader (it can answer and forward
/// writes), with its own details.
pub struct V3HealthApi {
    pub replica: Arc<crate::replica::Replica>,
    pub started: std::time::Instant,
}

#[tonic::async_trait]
impl v3::health_server::Health for V3HealthApi {
    async fn check(&self, _request: Request<v3::HealthCheckRequest>) -> Result<v3::HealthCheckResponse> {
        use v3::health_check_response::{server_status, Details, ServerStatus, ServingStatus};
        let (leader, _) = self.replica.leader();
        let status = if leader.is_some() { ServingStatus::Serving } else { ServingStatus::NotServing };
        let uptime = self.started.elapsed();
        let details = Details {
            status: status as i32,
            cell: String::new(),
            leader: leader == Some(self.replica.id),
            active: leader.is_some(),
            uptime: Some(prost_types::Duration {
                seconds: uptime.as_secs() as i64,
                nanos: uptime.subsec_nanos() as i32,
            }),
            ..Default::default()
        };
        Ok(Response::new(v3::HealthCheckResponse {
            status: status as i32,
            details: vec![ServerStatus { status: Some(server_status::Status::Details(details)) }],
        }))
    }
}

/// Titus's EvictionService: TerminateTask is our EvictTask (judged by the job's disruption
/// budget when applied), and GetEvictionQuota by the same rule; the event stream is not served.
pub struct V3EvictionApi {
    pub jobs: Arc<JobApi>,
}

#[tonic::async_trait]
impl v3::eviction_service_server::EvictionService for V3EvictionApi {
    /// A job's quota: how many of its tasks that serve an eviction may take now; a task's: 1 when
    /// it may be evicted now, else 0 — both by the rule TerminateTask is judged by. There is no
    /// system, tier or capacity group disruption budget here: those levels answer unlimited.
    async fn get_eviction_quota(&self, request: Request<v3::Reference>) -> Result<v3::EvictionQuota> {
        use crate::api::jobs::not_found;
        use crate::jobs::lifecycle::{eviction_allowance, eviction_quota};
        use v3::reference::Reference as Level;
        let target = request.get_ref().clone();
        let Some(level) = target.reference.clone() else {
            return Err(Error::invalid("reference", "name one of system, tier, capacityGroup, jobId, taskId").into());
        };
        // Up to date first: a job created a moment ago through the leader is known here.
        self.jobs.barrier(&request).await?;
        let state = &self.jobs.replica.state;
        let now = crate::clock::now_ms();
        let not_accepted = |job: &crate::model::job::Job| {
            format!("job {:?} is {:?}: nothing of it is evicted", job.id, job.status.state)
        };
        let (quota, message) = match level {
            Level::System(_) | Level::Tier(_) | Level::CapacityGroup(_) => (
                u32::MAX,
                "no system, tier or capacity group disruption budget here: each job's own budget decides (ask with a jobId or taskId)".to_string(),
            ),
            Level::JobId(id) => {
                crate::model::convert::id_field("jobId", &id)?;
                let job = state.job(&id)?.ok_or_else(|| not_found("jobId", "job", &id))?;
                if job.status.state != JobState::Accepted {
                    (0, not_accepted(&job))
                } else {
                    let a = eviction_allowance(&job, &state.tasks_of_job(&id)?, now);
                    (a.available, a.held_by.unwrap_or_default())
                }
            }
            Level::TaskId(id) => {
                crate::model::convert::id_field("taskId", &id)?;
                let task = state.task(&id)?.ok_or_else(|| not_found("taskId", "task", &id))?;
                let job = state.job(&task.job_id)?.ok_or_else(|| not_found("taskId", "the job of task", &id))?;
                if !task.state().is_live() || task.state() == TaskState::KillInitiated {
                    (0, format!("task {id:?} is {}: nothing to evict", task.state().name()))
                } else if job.status.state != JobState::Accepted {
                    (0, not_accepted(&job))
                } else {
                    let a = eviction_allowance(&job, &state.tasks_of_job(&job.id)?, now);
                    let quota = eviction_quota(&job, &a, &task).min(1);
                    let held = if quota == 0 { a.held_by.unwrap_or_else(|| "the job's disruption budget".into()) } else { String::new() };
                    (quota, held)
                }
            }
        };
        Ok(Response::new(v3::EvictionQuota { target: Some(target), quota, message }))
    }

    async fn terminate_task(&self, request: Request<v3::TaskTerminateRequest>) -> Result<v3::TaskTerminateResponse> {
        let r = request.get_ref().clone();
        let ours = pb::TaskEvictRequest { task_id: r.task_id, reason: r.reason };
        match OurJobs::evict_task(&*self.jobs, inner(&request, ours)).await {
            Ok(_) => Ok(Response::new(v3::TaskTerminateResponse {
                allowed: true,
                reason_code: String::new(),
                reason_message: String::new(),
            })),
            // Held back by the budget: Titus answers that in the response, not as an error.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Ok(Response::new(v3::TaskTerminateResponse {
                allowed: false,
                reason_code: "disruptionBudget".into(),
                reason_message: s.message().to_string(),
            })),
            Err(s) => Err(s),
        }
    }

    type ObserveEventsStream =
        tokio_stream::wrappers::ReceiverStream<std::result::Result<v3::EvictionServiceEvent, Status>>;

    async fn observe_events(&self, _request: Request<v3::ObserverEventRequest>) -> Result<Self::ObserveEventsStream> {
        Err(Status::unimplemented("ObserveEvents is not supported (see proto/TITUS-V3.md)"))
    }
}

/// Titus's AutoScalingService: no scaling policies exist here, so the reads answer none (what
/// Spinnaker's caching of a cluster asks on start-up) and a policy cannot be set — refused,
/// not accepted and ignored.
pub struct V3AutoScalingApi {
    pub jobs: Arc<JobApi>,
}

fn no_policies() -> Status {
    Status::failed_precondition(
        "scalingPolicy: target tracking and step scaling policies are not supported here; resize with UpdateJobCapacity",
    )
}

#[tonic::async_trait]
impl v3::auto_scaling_service_server::AutoScalingService for V3AutoScalingApi {
    async fn get_all_scaling_policies(&self, _request: Request<()>) -> Result<v3::GetPolicyResult> {
        Ok(Response::new(v3::GetPolicyResult { items: Vec::new() }))
    }

    async fn get_scaling_policy(&self, request: Request<v3::ScalingPolicyId>) -> Result<v3::GetPolicyResult> {
        Err(Status::not_found(format!("id: scaling policy {:?} does not exist", request.get_ref().id)))
    }

    /// None for a job that exists; NOT_FOUND naming the job otherwise.
    async fn get_job_scaling_policies(&self, request: Request<v3::JobId>) -> Result<v3::GetPolicyResult> {
        let ours = pb::JobId { id: request.get_ref().id.clone() };
        OurJobs::find_job(&*self.jobs, inner(&request, ours)).await?;
        Ok(Response::new(v3::GetPolicyResult { items: Vec::new() }))
    }

    async fn set_auto_scaling_policy(&self, _request: Request<v3::PutPolicyRequest>) -> Result<v3::ScalingPolicyId> {
        Err(no_policies())
    }

    async fn delete_auto_scaling_policy(&self, request: Request<v3::DeletePolicyRequest>) -> Result<()> {
        let id = request.get_ref().id.as_ref().map(|i| i.id.clone()).unwrap_or_default();
        Err(Status::not_found(format!("id: scaling policy {id:?} does not exist")))
    }

    async fn update_auto_scaling_policy(&self, _request: Request<v3::UpdatePolicyRequest>) -> Result<()> {
        Err(no_policies())
    }
}
