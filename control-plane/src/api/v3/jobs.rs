//! `com.netflix.titus.JobManagementService` over our own: each call is translated (see
//! [`super::convert`]) into the request our `titus.JobManagementService` takes, with the caller's
//! metadata and identity, and answered by it — the same validation, authorization, audit and
//! commands, no second state.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use titus_proto as pb;
use titus_proto::job_management_service_server::JobManagementService as Ours;
use titus_proto::v3;
use titus_proto::v3::job_management_service_server::JobManagementService;

use super::convert::{
    budget_from_v3, descriptor_from_v3, job_to_v3, page_from_v3, pagination_to_v3, project_job, project_task,
    task_to_v3,
};
use super::inner;
use crate::api::JobApi;
use crate::error::Error;
use crate::state::StateRead;

/// Notifications buffered per V3 observer (ours buffers as many before it).
const BUFFER: usize = 1024;

pub struct V3JobApi {
    pub jobs: std::sync::Arc<JobApi>,
}

type Result<T> = std::result::Result<Response<T>, Status>;

fn empty(_: Response<pb::Empty>) -> Response<()> {
    Response::new(())
}

/// One page of one of our queries, asked: its items and its pagination.
type PageOf<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::result::Result<(Vec<T>, pb::Pagination), Status>> + Send>>;

/// Titus's page of one of our queries: by cursor, or by page number (the pages before it walked
/// by their cursors). `run` asks one page of ours.
async fn titus_page<T>(
    page: Option<v3::Page>,
    run: impl Fn(pb::Page) -> PageOf<T>,
) -> std::result::Result<(Vec<T>, v3::Pagination), Status> {
    let (mut page, number) = page_from_v3(page)?;
    let size = page.page_size;
    let mut skipped = 0u32;
    for _ in 0..number {
        let (items, pagination) = run(page.clone()).await?;
        skipped = skipped.saturating_add(items.len() as u32);
        if !pagination.has_more {
            // The results end before the page asked for: an empty page.
            let none = pb::Pagination { has_more: false, cursor: String::new(), total_items: pagination.total_items };
            return Ok((Vec::new(), pagination_to_v3(none, number, size, skipped)));
        }
        page.cursor = pagination.cursor;
    }
    let (items, pagination) = run(page).await?;
    let seen = skipped.saturating_add(items.len() as u32);
    Ok((items, pagination_to_v3(pagination, number, size, seen)))
}

#[tonic::async_trait]
impl JobManagementService for V3JobApi {
    async fn create_job(&self, request: Request<v3::JobDescriptor>) -> Result<v3::JobId> {
        let descriptor = descriptor_from_v3(request.get_ref().clone())?;
        let ours = pb::CreateJobRequest { job_descriptor: Some(descriptor), idempotency_token: String::new() };
        let id = Ours::create_job(&*self.jobs, inner(&request, ours)).await?.into_inner();
        Ok(Response::new(v3::JobId { id: id.id }))
    }

    async fn update_job_capacity(&self, request: Request<v3::JobCapacityUpdate>) -> Result<()> {
        let r = request.get_ref().clone();
        let c = r.capacity.ok_or_else(|| Error::invalid("Capacity", "is required"))?;
        let ours = pb::JobCapacityUpdate {
            job_id: r.job_id,
            capacity: Some(pb::OptionalCapacity { min: Some(c.min), desired: Some(c.desired), max: Some(c.max) }),
        };
        Ours::update_job_capacity(&*self.jobs, inner(&request, ours)).await.map(empty)
    }

    async fn update_job_capacity_with_optional_attributes(
        &self,
        request: Request<v3::JobCapacityUpdateWithOptionalAttributes>,
    ) -> Result<()> {
        let r = request.get_ref().clone();
        let c = r
            .job_capacity_with_optional_attributes
            .ok_or_else(|| Error::invalid("jobCapacityWithOptionalAttributes", "is required"))?;
        let ours = pb::JobCapacityUpdate {
            job_id: r.job_id,
            capacity: Some(pb::OptionalCapacity { min: c.min, desired: c.desired, max: c.max }),
        };
        Ours::update_job_capacity(&*self.jobs, inner(&request, ours)).await.map(empty)
    }

    async fn update_job_status(&self, request: Request<v3::JobStatusUpdate>) -> Result<()> {
        let r = request.get_ref().clone();
        let ours = pb::JobStatusUpdate { id: r.id, enable_status: r.enable_status };
        Ours::update_job_status(&*self.jobs, inner(&request, ours)).await.map(empty)
    }

    async fn update_job_processes(&self, request: Request<v3::JobProcessesUpdate>) -> Result<()> {
        let r = request.get_ref().clone();
        let ours = pb::JobProcessesUpdate {
            job_id: r.job_id,
            service_job_processes: r.service_job_processes.map(|p| pb::ServiceJobProcesses {
                disable_increase_desired: p.disable_increase_desired,
                disable_decrease_desired: p.disable_decrease_desired,
            }),
        };
        Ours::update_job_processes(&*self.jobs, inner(&request, ours)).await.map(empty)
    }

    async fn update_job_disruption_budget(&self, request: Request<v3::JobDisruptionBudgetUpdate>) -> Result<()> {
        let r = request.get_ref().clone();
        crate::model::convert::id_field("jobId", &r.job_id)?;
        // Which budgets fit depends on the job's type: read once this replica is up to date (a
        // job created a moment ago through the leader is known here).
        self.jobs.barrier(&request).await?;
        let batch = self.jobs.replica.state.job(&r.job_id)?.is_some_and(|j| j.descriptor.is_batch());
        let budget = r.disruption_budget.map(|b| budget_from_v3(b, batch)).transpose()?;
        let ours = pb::JobDisruptionBudgetUpdate { job_id: r.job_id, disruption_budget: budget };
        Ours::update_job_disruption_budget(&*self.jobs, inner(&request, ours)).await.map(empty)
    }

    async fn find_jobs(&self, request: Request<v3::JobQuery>) -> Result<v3::JobQueryResult> {
        let q = request.get_ref().clone();
        let run = |page: pb::Page| -> PageOf<pb::Job> {
            let ours = pb::JobQuery { filtering_criteria: q.filtering_criteria.clone(), page: Some(page) };
            let (jobs, ours) = (self.jobs.clone(), inner(&request, ours));
            Box::pin(async move {
                let out = Ours::find_jobs(&*jobs, ours).await?.into_inner();
                Ok((out.items, out.pagination.unwrap_or_default()))
            })
        };
        let (items, pagination) = titus_page(q.page.clone(), run).await?;
        Ok(Response::new(v3::JobQueryResult {
            items: items.into_iter().map(|j| project_job(job_to_v3(j), &q.fields)).collect(),
            pagination: Some(pagination),
        }))
    }

    async fn find_job(&self, request: Request<v3::JobId>) -> Result<v3::Job> {
        let ours = pb::JobId { id: request.get_ref().id.clone() };
        let job = Ours::find_job(&*self.jobs, inner(&request, ours)).await?.into_inner();
        Ok(Response::new(job_to_v3(job)))
    }

    type ObserveJobStream = ReceiverStream<std::result::Result<v3::JobChangeNotification, Status>>;

    async fn observe_job(&self, request: Request<v3::JobId>) -> Result<Self::ObserveJobStream> {
        let ours = pb::ObserveJobQuery { id: request.get_ref().id.clone(), resume_from_revision: 0 };
        let stream = Ours::observe_job(&*self.jobs, inner(&request, ours)).await?.into_inner();
        let (tx, rx) = mpsc::channel(BUFFER);
        tokio::spawn(relay(stream, tx, Vec::new(), Vec::new()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ObserveJobsStream = ReceiverStream<std::result::Result<v3::JobChangeNotification, Status>>;

    async fn observe_jobs(&self, request: Request<v3::ObserveJobsQuery>) -> Result<Self::ObserveJobsStream> {
        let q = request.get_ref().clone();
        let ours = pb::ObserveJobsQuery { filtering_criteria: q.filtering_criteria, resume_from_revision: 0 };
        let stream = Ours::observe_jobs(&*self.jobs, inner(&request, ours)).await?.into_inner();
        let (tx, rx) = mpsc::channel(BUFFER);
        tokio::spawn(relay(stream, tx, q.job_fields, q.task_fields));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ObserveJobsWithKeepAliveStream = ReceiverStream<std::result::Result<v3::JobChangeNotification, Status>>;

    /// The first message is the query; each keep-alive request after it is answered in the
    /// stream, in order with the changes (Titus's way of telling a client its stream is current).
    async fn observe_jobs_with_keep_alive(
        &self,
        request: Request<Streaming<v3::ObserveJobsWithKeepAliveRequest>>,
    ) -> Result<Self::ObserveJobsWithKeepAliveStream> {
        use v3::observe_jobs_with_keep_alive_request::Kind;
        let (metadata, extensions, mut input) = request.into_parts();
        let first =
            input.message().await?.ok_or_else(|| Error::invalid("query", "the first message must be a query"))?;
        let Some(Kind::Query(q)) = first.kind else {
            return Err(Error::invalid("query", "the first message must be a query").into());
        };
        let ours = pb::ObserveJobsQuery { filtering_criteria: q.filtering_criteria, resume_from_revision: 0 };
        let ours = Request::from_parts(metadata, extensions, ours);
        let stream = Ours::observe_jobs(&*self.jobs, ours).await?.into_inner();
        let (tx, rx) = mpsc::channel(BUFFER);
        let keep_alive = tx.clone();
        tokio::spawn(relay(stream, tx, q.job_fields, q.task_fields));
        tokio::spawn(async move {
            while let Ok(Some(m)) = input.message().await {
                let Some(Kind::KeepAliveRequest(k)) = m.kind else { continue };
                let answer = v3::JobChangeNotification {
                    notification: Some(v3::job_change_notification::Notification::KeepAliveResponse(
                        v3::KeepAliveResponse { request: Some(k), timestamp: now() },
                    )),
                    timestamp: now(),
                };
                if keep_alive.send(Ok(answer)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn kill_job(&self, request: Request<v3::JobId>) -> Result<()> {
        let ours = pb::JobId { id: request.get_ref().id.clone() };
        Ours::kill_job(&*self.jobs, inner(&request, ours)).await.map(empty)
    }

    async fn update_job_attributes(&self, request: Request<v3::JobAttributesUpdate>) -> Result<()> {
        let r = request.get_ref().clone();
        let ours = pb::JobAttributesUpdate { job_id: r.job_id, attributes: r.attributes };
        Ours::update_job_attributes(&*self.jobs, inner(&request, ours)).await.map(empty)
    }

    async fn delete_job_attributes(&self, request: Request<v3::JobAttributesDeleteRequest>) -> Result<()> {
        let r = request.get_ref().clone();
        let ours = pb::JobAttributesDeleteRequest { job_id: r.job_id, keys: r.keys };
        Ours::delete_job_attributes(&*self.jobs, inner(&request, ours)).await.map(empty)
    }

    async fn find_task(&self, request: Request<v3::TaskId>) -> Result<v3::Task> {
        let ours = pb::TaskId { id: request.get_ref().id.clone() };
        let task = Ours::find_task(&*self.jobs, inner(&request, ours)).await?.into_inner();
        Ok(Response::new(task_to_v3(task)))
    }

    async fn find_tasks(&self, request: Request<v3::TaskQuery>) -> Result<v3::TaskQueryResult> {
        let q = request.get_ref().clone();
        let run = |page: pb::Page| -> PageOf<pb::Task> {
            let ours = pb::TaskQuery { filtering_criteria: q.filtering_criteria.clone(), page: Some(page) };
            let (jobs, ours) = (self.jobs.clone(), inner(&request, ours));
            Box::pin(async move {
                let out = Ours::find_tasks(&*jobs, ours).await?.into_inner();
                Ok((out.items, out.pagination.unwrap_or_default()))
            })
        };
        let (items, pagination) = titus_page(q.page.clone(), run).await?;
        Ok(Response::new(v3::TaskQueryResult {
            items: items.into_iter().map(|t| project_task(task_to_v3(t), &q.fields)).collect(),
            pagination: Some(pagination),
        }))
    }

    async fn kill_task(&self, request: Request<v3::TaskKillRequest>) -> Result<()> {
        let r = request.get_ref().clone();
        let ours = pb::TaskKillRequest {
            task_id: r.task_id,
            shrink: r.shrink,
            prevent_min_size_update: r.prevent_min_size_update,
        };
        Ours::kill_task(&*self.jobs, inner(&request, ours)).await.map(empty)
    }

    async fn update_task_attributes(&self, request: Request<v3::TaskAttributesUpdate>) -> Result<()> {
        let r = request.get_ref().clone();
        let ours = pb::TaskAttributesUpdate { task_id: r.task_id, attributes: r.attributes };
        Ours::update_task_attributes(&*self.jobs, inner(&request, ours)).await.map(empty)
    }

    async fn delete_task_attributes(&self, request: Request<v3::TaskAttributesDeleteRequest>) -> Result<()> {
        let r = request.get_ref().clone();
        let ours = pb::TaskAttributesDeleteRequest { task_id: r.task_id, keys: r.keys };
        Ours::delete_task_attributes(&*self.jobs, inner(&request, ours)).await.map(empty)
    }

    async fn move_task(&self, request: Request<v3::TaskMoveRequest>) -> Result<()> {
        let r = request.get_ref().clone();
        let ours =
            pb::TaskMoveRequest { source_job_id: r.source_job_id, target_job_id: r.target_job_id, task_id: r.task_id };
        Ours::move_task(&*self.jobs, inner(&request, ours)).await.map(empty)
    }
}

fn now() -> u64 {
    u64::try_from(crate::clock::now_ms()).unwrap_or(0)
}

/// Passes our notifications on as Titus's (projected), until either side ends.
async fn relay(
    mut ours: ReceiverStream<std::result::Result<pb::JobChangeNotification, Status>>,
    tx: mpsc::Sender<std::result::Result<v3::JobChangeNotification, Status>>,
    job_fields: Vec<String>,
    task_fields: Vec<String>,
) {
    use pb::job_change_notification::Notification as N;
    use v3::job_change_notification as v3n;
    while let Some(item) = ours.next().await {
        let item = item.map(|n| {
            let notification = n.notification.map(|n| match n {
                N::JobUpdate(u) => {
                    let job = u.job.map(|j| project_job(job_to_v3(j), &job_fields));
                    let archived = job
                        .as_ref()
                        .and_then(|j| j.status.as_ref())
                        .is_some_and(|s| s.state == v3::job_status::JobState::Finished as i32);
                    v3n::Notification::JobUpdate(v3n::JobUpdate { job, archived })
                }
                N::TaskUpdate(u) => {
                    let archived = u.task.as_ref().is_some_and(|t| t.archived);
                    let task = u.task.map(|t| project_task(task_to_v3(t), &task_fields));
                    v3n::Notification::TaskUpdate(v3n::TaskUpdate { task, moved_from_another_job: false, archived })
                }
                N::SnapshotEnd(_) => v3n::Notification::SnapshotEnd(v3n::SnapshotEnd {}),
            });
            v3::JobChangeNotification { notification, timestamp: now() }
        });
        if tx.send(item).await.is_err() {
            return;
        }
    }
}
