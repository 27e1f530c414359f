//! JobManagementService (Titus's job API) and the first slice of the agent protocol (task status
//! reports). Mutations validate, then propose one command; reads are linearizable (read index).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use titus_proto as pb;
use titus_proto::agent_task_service_server::AgentTaskService;
use titus_proto::job_management_service_server::JobManagementService;

use super::{authorize_job_change, authorize_task_change, client_deadline};
use crate::auth::Caller;
use crate::command::{Command, CommandResponse, DeploymentChange, Rejection, RejectionKind};
use crate::error::{Error, Result};
use crate::events::{Change, ChangeBatch, Start};
use crate::jobs::query::{first_page, merge_by_id, page_size as page_size_checked, paginate, Filter};
use crate::model::convert::{
    attributes_from_proto, deployment_to_proto, id_field, job_descriptor_from_proto, job_descriptor_to_proto,
    job_to_proto, strategy_from_proto, task_state_from_proto, task_to_proto,
};
use crate::model::job::{Job, JobState, JobStatus};
use crate::model::task::{reason, Task, TaskState, TaskStatus};
use crate::replica::Replica;
use crate::state::StateRead;
use crate::store::{cf as store_cf, StateView};

/// How long a CreateJob idempotency token is remembered.
pub const JOB_TOKEN_TTL_MS: i64 = 24 * 3600 * 1000;
/// How long a call's request id keeps a retry from being applied twice: far beyond any SDK deadline.
pub const REQUEST_DEDUP_TTL_MS: i64 = 10 * 60 * 1000;

/// FNV-1a: a fingerprint of a request's bytes, the same on every replica and release.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}
/// Notifications buffered per observer before it counts as too slow.
const OBSERVER_BUFFER: usize = 1024;

pub struct JobApi {
    pub replica: Arc<Replica>,
    /// `jobs.max-job-bytes`: the largest job descriptor accepted, encoded.
    pub max_job_bytes: usize,
    /// Where a job's security groups are checked; None: AWS is not configured on this replica,
    /// and only their form is.
    pub aws: Option<titus_aws::Aws>,
    /// `aws.vpc-id`: the VPC those groups must be in; None: any.
    pub vpc_id: Option<String>,
}

pub use crate::clock::now_ms;

fn done(response: CommandResponse) -> std::result::Result<Response<pb::Empty>, Status> {
    match response {
        CommandResponse::Rejected(r) => Err(Error::Rejected(r).into()),
        _ => Ok(Response::new(pb::Empty {})),
    }
}

pub(super) fn not_found(field: &str, what: &str, id: &str) -> Status {
    Error::Rejected(Rejection::new(RejectionKind::NotFound, field, format!("{what} {id:?} does not exist"))).into()
}

impl JobApi {
    /// Proposes `change` of the job's deployment named in `request` (0: its active one).
    async fn advance_deployment(
        &self,
        request: Request<pb::DeploymentRequest>,
        change: impl FnOnce(&crate::model::deployment::Deployment) -> DeploymentChange,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        id_field("job_id", &r.job_id)?;
        authorize_job_change(&self.replica, &request, &r.job_id).await?;
        self.barrier(&request).await?;
        let Some(job) = self.replica.state.job(&r.job_id)? else { return Err(not_found("job_id", "job", &r.job_id)) };
        let Some(active) = job.rollout.active().filter(|d| r.deployment_id == 0 || d.id == r.deployment_id) else {
            let what = if r.deployment_id == 0 {
                "no deployment".to_string()
            } else {
                format!("deployment {} is not", r.deployment_id)
            };
            return Err(Error::Rejected(Rejection::new(
                RejectionKind::FailedPrecondition,
                "deployment_id",
                format!("job {} has {what} active", r.job_id),
            ))
            .into());
        };
        let command = Command::AdvanceDeployment {
            job_id: r.job_id,
            deployment_id: active.id,
            change: change(active),
            timestamp_ms: now_ms(),
        };
        done(self.propose(&request, command).await?)
    }

    /// Refuses security groups EC2 does not know (in `aws.vpc-id` when set), naming each. Without
    /// AWS configured, their form alone was checked with the descriptor.
    async fn check_security_groups(&self, groups: &[String]) -> std::result::Result<(), Status> {
        let Some(aws) = self.aws.as_ref().filter(|_| !groups.is_empty()) else { return Ok(()) };
        let missing = match aws.missing_security_groups(groups, self.vpc_id.as_deref()).await {
            Ok(missing) => missing,
            Err(e @ titus_aws::AwsError::Transient(_)) => {
                return Err(Status::unavailable(format!("checking the security groups with EC2: {e}")))
            }
            Err(e) => return Err(Status::failed_precondition(format!("checking the security groups with EC2: {e}"))),
        };
        let violations: Vec<crate::model::FieldViolation> = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| missing.contains(g))
            .map(|(i, g)| {
                let place = self.vpc_id.as_deref().map(|v| format!(" in VPC {v}")).unwrap_or_default();
                crate::model::FieldViolation::new(
                    format!("container.security_profile.security_groups[{i}]"),
                    format!("security group {g} does not exist{place}"),
                )
            })
            .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(crate::model::Invalid(violations).into())
        }
    }

    /// Proposes a user's command. When the caller names its call (`x-request-id`, sent alike on
    /// every attempt by the SDK), the command is applied at most once for that call.
    async fn propose<T: prost::Message>(&self, request: &Request<T>, command: Command) -> Result<CommandResponse> {
        let command = match request.metadata().get(crate::telemetry::REQUEST_ID).and_then(|v| v.to_str().ok()) {
            Some(id) if !id.is_empty() && id.len() <= 128 => Command::Once {
                key: format!(
                    "{}/{}/{:016x}",
                    crate::auth::scoped(&crate::auth::caller(request), id),
                    std::any::type_name::<T>().rsplit("::").next().unwrap_or(""),
                    fnv1a(&request.get_ref().encode_to_vec())
                ),
                expires_ms: now_ms() + REQUEST_DEDUP_TTL_MS,
                command: Box::new(command),
            },
            _ => command,
        };
        self.replica.propose(command, client_deadline(request)).await
    }

    pub(super) async fn barrier<T>(&self, request: &Request<T>) -> Result<()> {
        self.replica.read_barrier(client_deadline(request)).await
    }

    /// Runs a query on a view of the state taken now, on a blocking thread: a query that must read
    /// many records holds up no heartbeat or call on the runtime's threads.
    async fn query<T: Send + 'static>(
        &self,
        read: impl FnOnce(&StateView<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let replica = self.replica.clone();
        tokio::task::spawn_blocking(move || read(&replica.state.snapshot()))
            .await
            .map_err(|e| Error::storage("a query's blocking task", e))?
    }
}

/// A page of query results: the items, whether more follow, the next page's cursor, and how many
/// match in all.
type Page<T> = (Vec<T>, bool, String, u32);

fn total(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Every job that may match `filter` in `view`: the ones it names, or the active ones, plus
/// archived ones when it asks for them. One snapshot, so a job that finishes meanwhile is listed
/// once, active or archived (it was once listed twice, KillInitiated and Finished, when the two
/// reads straddled its finish).
fn candidate_jobs(view: &StateView<'_>, filter: &Filter) -> Result<Vec<(Job, bool)>> {
    if let Some(ids) = &filter.job_ids {
        let mut jobs = Vec::new();
        for id in ids {
            match view.job(id)? {
                Some(j) => jobs.push((j, false)),
                None => jobs.extend(view.archived_job(id)?.map(|j| (j, true))),
            }
        }
        return Ok(jobs);
    }
    let mut jobs: Vec<(Job, bool)> = view.jobs()?.into_iter().map(|j| (j, false)).collect();
    if filter.wants_finished() {
        jobs.extend(view.archived_jobs()?.into_iter().map(|j| (j, true)));
    }
    Ok(jobs)
}

/// Records of an active and an archived family after `cursor`, merged in id order, each marked
/// archived or not (the archived ones only when `archived` is asked for).
fn active_then_archived<'v, T: serde::de::DeserializeOwned + 'v>(
    view: &'v StateView<'_>,
    families: (&'static str, &'static str),
    archived: bool,
    cursor: &str,
    id: impl Fn(&T) -> &str + Copy + 'v,
) -> Result<impl Iterator<Item = Result<(T, bool)>> + 'v> {
    let active = view.records_after::<T>(families.0, cursor)?.map(|r| r.map(|t| (t, false)));
    let finished: Box<dyn Iterator<Item = Result<(T, bool)>> + 'v> = if archived {
        Box::new(view.records_after::<T>(families.1, cursor)?.map(|r| r.map(|t| (t, true))))
    } else {
        Box::new(std::iter::empty())
    };
    Ok(merge_by_id(active, finished, move |(t, _): &(T, bool)| id(t)))
}

/// The counts taken with `view` (a query's view always has them).
fn view_counts<'v>(view: &'v StateView<'_>) -> Result<&'v crate::store::StateCounts> {
    view.counts().ok_or_else(|| Error::storage_msg("a query's view has no counts"))
}

/// A page of the jobs `filter` matches after `cursor`. The jobs it names are read by id; with no
/// criterion the page is read in id order from the cursor and the total is from the counts kept on
/// apply; with criteria, every candidate job is read once to count the matches.
fn jobs_page(view: &StateView<'_>, filter: &Filter, page_size: u32, cursor: &str) -> Result<Page<Job>> {
    let size = page_size_checked(page_size)?;
    if filter.job_ids.is_some() {
        let jobs = candidate_jobs(view, filter)?.into_iter().map(|(j, _)| j).filter(|j| filter.matches_job(j));
        return paginate(jobs.collect(), |j| j.id.as_str(), page_size, cursor);
    }
    let families = (store_cf::JOBS, store_cf::ARCHIVED_JOBS);
    let archived = filter.wants_finished();
    if !filter.has_job_criteria() {
        let jobs = active_then_archived(view, families, archived, cursor, |j: &Job| j.id.as_str())?;
        let (page, more, next) = first_page(jobs.map(|r| r.map(|(j, _)| j)), size, |j| j.id.as_str())?;
        let counts = view_counts(view)?;
        let n = counts.jobs + if archived { counts.archived_jobs } else { 0 };
        return Ok((page, more, next, total(n as usize)));
    }
    // One pass from the first: every match counted, the ones after the cursor paged.
    let (mut matched, mut page, mut more) = (0usize, Vec::new(), false);
    for item in active_then_archived(view, families, archived, "", |j: &Job| j.id.as_str())? {
        let (job, _) = item?;
        if !filter.matches_job(&job) {
            continue;
        }
        matched += 1;
        if cursor.is_empty() || job.id.as_str() > cursor {
            if page.len() < size {
                page.push(job);
            } else {
                more = true;
            }
        }
    }
    let next = if more { page.last().map(|j| j.id.clone()).unwrap_or_default() } else { String::new() };
    Ok((page, more, next, total(matched)))
}

fn task_id((task, _): &(Task, bool)) -> &str {
    &task.id
}

/// A page of the tasks `filter` matches after `cursor`, marked archived or not. Decodes only what
/// the filter needs: the tasks it names, by id; or the tasks of the jobs that match, their ids from
/// the by-job indexes, each task read only to be shown or to check a task state; or, with no job
/// criterion, the tasks in id order from the cursor until the page is full, the total from the
/// counts kept on apply.
fn tasks_page(view: &StateView<'_>, filter: &Filter, page_size: u32, cursor: &str) -> Result<Page<(Task, bool)>> {
    let size = page_size_checked(page_size)?;
    if let Some(ids) = &filter.task_ids {
        let mut jobs: HashMap<String, bool> = HashMap::new();
        let mut found = Vec::new();
        for task_id in ids {
            let task = match view.task(task_id)? {
                Some(t) => Some((t, false)),
                None => view.archived_task(task_id)?.map(|t| (t, true)),
            };
            let Some((task, archived)) = task.filter(|(t, _)| filter.matches_task(t)) else { continue };
            let job_matches = match jobs.get(&task.job_id) {
                Some(m) => *m,
                None => {
                    let job = view.job(&task.job_id)?.or(view.archived_job(&task.job_id)?);
                    let m = job.is_some_and(|j| filter.matches_job(&j));
                    jobs.insert(task.job_id.clone(), m);
                    m
                }
            };
            if job_matches {
                found.push((task, archived));
            }
        }
        return paginate(found, task_id, page_size, cursor);
    }
    if filter.has_job_criteria() {
        let mut ids: Vec<(String, bool)> = Vec::new();
        for (job, archived_job) in candidate_jobs(view, filter)? {
            if !filter.matches_job(&job) {
                continue;
            }
            if !archived_job {
                ids.extend(view.task_ids_of_job(&job.id)?.into_iter().map(|i| (i, false)));
            }
            if filter.wants_finished() {
                ids.extend(view.archived_task_ids_of_job(&job.id)?.into_iter().map(|i| (i, true)));
            }
        }
        ids.sort();
        let read = |(task_id, archived): (String, bool)| -> Result<Option<(Task, bool)>> {
            let task = if archived { view.archived_task(&task_id)? } else { view.task(&task_id)? };
            Ok(task.map(|t| (t, archived)))
        };
        if filter.task_states.is_none() {
            // Every task of a matching job matches: counted by id, read only for the page.
            let n = ids.len();
            let start = if cursor.is_empty() { 0 } else { ids.partition_point(|(i, _)| i.as_str() <= cursor) };
            let tasks = ids.into_iter().skip(start).map(read).filter_map(Result::transpose);
            let (page, more, next) = first_page(tasks, size, task_id)?;
            return Ok((page, more, next, total(n)));
        }
        let mut tasks = Vec::new();
        for t in ids {
            tasks.extend(read(t)?.filter(|(t, _)| filter.matches_task(t)));
        }
        return paginate(tasks, task_id, page_size, cursor);
    }
    let archived = filter.wants_finished();
    let families = (store_cf::TASKS, store_cf::ARCHIVED_TASKS);
    let tasks = active_then_archived(view, families, archived, cursor, |t: &Task| t.id.as_str())?
        .filter(|r| r.as_ref().map_or(true, |(t, _)| filter.matches_task(t)));
    let (page, more, next) = first_page(tasks, size, task_id)?;
    let counts = view_counts(view)?;
    let mut n: u64 = TaskState::ALL
        .iter()
        .filter(|s| filter.task_states.as_ref().is_none_or(|states| states.contains(s)))
        .map(|s| counts.tasks_in(*s))
        .sum();
    if archived {
        // Every archived task is Finished, which the filter asks for.
        n += counts.archived_tasks;
    }
    Ok((page, more, next, total(n as usize)))
}

#[tonic::async_trait]
impl JobManagementService for JobApi {
    async fn create_job(
        &self,
        request: Request<pb::CreateJobRequest>,
    ) -> std::result::Result<Response<pb::JobId>, Status> {
        let descriptor = job_descriptor_from_proto(request.get_ref().job_descriptor.clone())?;
        descriptor.check_size(self.max_job_bytes).map_err(Error::InvalidArgument)?;
        crate::auth::note_target(&request, format!("application {}", descriptor.application_name));
        crate::auth::may_change_job(&crate::auth::caller(&request), "", &descriptor)?;
        self.check_security_groups(&descriptor.container.security_profile.security_groups).await?;
        let token = Some(request.get_ref().idempotency_token.clone()).filter(|t| !t.is_empty());
        if token.as_ref().is_some_and(|t| t.len() > 256) {
            return Err(Error::invalid("idempotency_token", "must be at most 256 characters").into());
        }
        let token = token.map(|t| crate::auth::scoped(&crate::auth::caller(&request), &t));
        // Ids and times are decided here, before proposing, so every replica applies the same job.
        let now = now_ms();
        let job = Job {
            id: uuid::Uuid::new_v4().to_string(),
            descriptor,
            status: JobStatus {
                state: JobState::Accepted,
                reason_code: reason::NORMAL.into(),
                reason_message: "job created".into(),
                timestamp_ms: now,
            },
            status_history: Vec::new(),
            rollout: Default::default(),
            evictions_ms: Vec::new(),
        };
        let command = Command::CreateJob { job, idempotency_token: token, token_expires_ms: now + JOB_TOKEN_TTL_MS };
        match self.propose(&request, command).await? {
            CommandResponse::JobId(id) => {
                crate::auth::note_target(&request, format!("job {id}"));
                Ok(Response::new(pb::JobId { id }))
            }
            CommandResponse::Rejected(r) => Err(Error::Rejected(r).into()),
            other => Err(Status::internal(format!("unexpected apply result {other:?}"))),
        }
    }

    async fn find_job(&self, request: Request<pb::JobId>) -> std::result::Result<Response<pb::Job>, Status> {
        let id = &request.get_ref().id;
        id_field("id", id)?;
        self.barrier(&request).await?;
        let state = self.replica.state.snapshot();
        match state.job(id)?.or(state.archived_job(id)?) {
            Some(job) => Ok(Response::new(job_for(&crate::auth::caller(&request), &job))),
            None => Err(not_found("id", "job", id)),
        }
    }

    async fn find_jobs(
        &self,
        request: Request<pb::JobQuery>,
    ) -> std::result::Result<Response<pb::JobQueryResult>, Status> {
        let criteria: BTreeMap<String, String> = request.get_ref().filtering_criteria.clone().into_iter().collect();
        let filter = Filter::parse(&criteria, false)?;
        let page = request.get_ref().page.clone().unwrap_or_default();
        page_size_checked(page.page_size)?;
        let viewer = crate::auth::caller(&request);
        self.barrier(&request).await?;
        let (items, has_more, cursor, total) =
            self.query(move |view| jobs_page(view, &filter, page.page_size, &page.cursor)).await?;
        Ok(Response::new(pb::JobQueryResult {
            items: items.iter().map(|j| job_for(&viewer, j)).collect(),
            pagination: Some(pb::Pagination { has_more, cursor, total_items: total }),
        }))
    }

    async fn find_task(&self, request: Request<pb::TaskId>) -> std::result::Result<Response<pb::Task>, Status> {
        let id = &request.get_ref().id;
        id_field("id", id)?;
        self.barrier(&request).await?;
        let state = self.replica.state.snapshot();
        if let Some(t) = state.task(id)? {
            return Ok(Response::new(task_to_proto(&t, false)));
        }
        match state.archived_task(id)? {
            Some(t) => Ok(Response::new(task_to_proto(&t, true))),
            None => Err(not_found("id", "task", id)),
        }
    }

    async fn find_tasks(
        &self,
        request: Request<pb::TaskQuery>,
    ) -> std::result::Result<Response<pb::TaskQueryResult>, Status> {
        let criteria: BTreeMap<String, String> = request.get_ref().filtering_criteria.clone().into_iter().collect();
        let filter = Filter::parse(&criteria, true)?;
        let page = request.get_ref().page.clone().unwrap_or_default();
        page_size_checked(page.page_size)?;
        self.barrier(&request).await?;
        let (items, has_more, cursor, total) =
            self.query(move |view| tasks_page(view, &filter, page.page_size, &page.cursor)).await?;
        Ok(Response::new(pb::TaskQueryResult {
            items: items.iter().map(|(t, archived)| task_to_proto(t, *archived)).collect(),
            pagination: Some(pb::Pagination { has_more, cursor, total_items: total }),
        }))
    }

    async fn kill_job(&self, request: Request<pb::JobId>) -> std::result::Result<Response<pb::Empty>, Status> {
        let job_id = request.get_ref().id.clone();
        id_field("id", &job_id)?;
        authorize_job_change(&self.replica, &request, &job_id).await?;
        done(self.propose(&request, Command::KillJob { job_id, timestamp_ms: now_ms() }).await?)
    }

    async fn kill_task(
        &self,
        request: Request<pb::TaskKillRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        id_field("task_id", &r.task_id)?;
        authorize_task_change(&self.replica, &request, &r.task_id).await?;
        let command = Command::KillTask {
            task_id: r.task_id,
            shrink: r.shrink,
            prevent_min_size_update: r.prevent_min_size_update,
            timestamp_ms: now_ms(),
        };
        done(self.propose(&request, command).await?)
    }

    async fn evict_task(
        &self,
        request: Request<pb::TaskEvictRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        id_field("task_id", &r.task_id)?;
        if r.reason.len() > 256 {
            return Err(Error::invalid("reason", "must be at most 256 bytes").into());
        }
        authorize_task_change(&self.replica, &request, &r.task_id).await?;
        let command = Command::EvictTask { task_id: r.task_id, reason: r.reason, timestamp_ms: now_ms() };
        done(self.propose(&request, command).await?)
    }

    async fn update_job_capacity(
        &self,
        request: Request<pb::JobCapacityUpdate>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        id_field("job_id", &r.job_id)?;
        authorize_job_change(&self.replica, &request, &r.job_id).await?;
        let c = r.capacity.ok_or_else(|| Error::invalid("capacity", "is required"))?;
        if c.min.is_none() && c.desired.is_none() && c.max.is_none() {
            return Err(Error::invalid("capacity", "set at least one of min, desired and max").into());
        }
        done(
            self.propose(
                &request,
                Command::UpdateJobCapacity { job_id: r.job_id, min: c.min, desired: c.desired, max: c.max },
            )
            .await?,
        )
    }

    async fn update_job_status(
        &self,
        request: Request<pb::JobStatusUpdate>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        id_field("id", &r.id)?;
        authorize_job_change(&self.replica, &request, &r.id).await?;
        done(self.propose(&request, Command::UpdateJobStatus { job_id: r.id, enabled: r.enable_status }).await?)
    }

    async fn update_job_processes(
        &self,
        request: Request<pb::JobProcessesUpdate>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        id_field("job_id", &r.job_id)?;
        authorize_job_change(&self.replica, &request, &r.job_id).await?;
        let p = r.service_job_processes.ok_or_else(|| Error::invalid("service_job_processes", "is required"))?;
        let processes = crate::model::job::ServiceJobProcesses {
            disable_increase_desired: p.disable_increase_desired,
            disable_decrease_desired: p.disable_decrease_desired,
        };
        done(self.propose(&request, Command::UpdateJobProcesses { job_id: r.job_id, processes }).await?)
    }

    async fn update_job_spec(
        &self,
        request: Request<pb::JobSpecUpdate>,
    ) -> std::result::Result<Response<pb::DeploymentRef>, Status> {
        let r = request.get_ref().clone();
        id_field("job_id", &r.job_id)?;
        authorize_job_change(&self.replica, &request, &r.job_id).await?;
        let strategy = strategy_from_proto(r.strategy)?;
        let mut container = r.container.ok_or_else(|| Error::invalid("container", "is required"))?;
        // The new container is checked as part of the job it makes, so every field is named as in
        // a job descriptor (`container.image.name`) and the job's bounds hold.
        self.barrier(&request).await?;
        let Some(job) = self.replica.state.job(&r.job_id)? else { return Err(not_found("job_id", "job", &r.job_id)) };
        let mut descriptor = job_descriptor_to_proto(&job.descriptor);
        if container.resources.is_none() {
            container.resources = descriptor.container.as_ref().and_then(|c| c.resources.clone());
        }
        descriptor.container = Some(container);
        let descriptor = job_descriptor_from_proto(Some(descriptor))?;
        descriptor.check_size(self.max_job_bytes).map_err(Error::InvalidArgument)?;
        crate::auth::may_change_job(&crate::auth::caller(&request), &r.job_id, &descriptor)?;
        self.check_security_groups(&descriptor.container.security_profile.security_groups).await?;
        let command = Command::UpdateJobSpec {
            job_id: r.job_id.clone(),
            container: descriptor.container,
            strategy,
            timestamp_ms: now_ms(),
        };
        match self.propose(&request, command).await? {
            CommandResponse::Rejected(r) => Err(Error::Rejected(r).into()),
            CommandResponse::Deployment(id) => {
                Ok(Response::new(pb::DeploymentRef { job_id: r.job_id, deployment_id: id }))
            }
            other => Err(Error::Raft(format!("UpdateJobSpec answered {other:?}")).into()),
        }
    }

    async fn promote_deployment(
        &self,
        request: Request<pb::DeploymentRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        self.advance_deployment(request, |_| DeploymentChange::Promote).await
    }

    async fn rollback_deployment(
        &self,
        request: Request<pb::DeploymentRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let caller = crate::auth::caller(&request).name;
        self.advance_deployment(request, |d| DeploymentChange::RollBack {
            reason: format!("rolled back by {caller}: back to version {} ({})", d.from_version, d.from_image),
        })
        .await
    }

    async fn get_deployments(
        &self,
        request: Request<pb::JobId>,
    ) -> std::result::Result<Response<pb::DeploymentList>, Status> {
        let id = request.get_ref().id.clone();
        id_field("id", &id)?;
        self.barrier(&request).await?;
        let list = self
            .query(move |view| {
                let Some(job) = view.job(&id)?.or(view.archived_job(&id)?) else { return Ok(None) };
                let mut deployments: Vec<pb::Deployment> =
                    job.rollout.deployments.iter().rev().map(deployment_to_proto).collect();
                if let (Some(d), Some(shown)) = (job.rollout.active(), deployments.first_mut()) {
                    let tasks = view.tasks_of_job(&job.id)?;
                    let serving = crate::jobs::lifecycle::serving_targets(view, &job)?;
                    let counts = crate::jobs::deployment::progress(d, &tasks, &|t: &Task| {
                        crate::jobs::lifecycle::serves(&job, t, serving.as_ref())
                    });
                    shown.desired = job.descriptor.wanted_tasks();
                    (shown.new_live, shown.new_available, shown.old_live) = counts;
                    let now = crate::clock::now_ms();
                    shown.waiting = crate::jobs::lifecycle::deployment_waiting(view, &job, now)?.unwrap_or_default();
                }
                Ok(Some(pb::DeploymentList { job_id: job.id.clone(), spec_version: job.rollout.version, deployments }))
            })
            .await?;
        list.map(Response::new).ok_or_else(|| not_found("id", "job", &request.get_ref().id))
    }

    async fn update_job_disruption_budget(
        &self,
        request: Request<pb::JobDisruptionBudgetUpdate>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        id_field("job_id", &r.job_id)?;
        authorize_job_change(&self.replica, &request, &r.job_id).await?;
        let budget = crate::model::convert::budget_from_proto(r.disruption_budget);
        let mut bad = Vec::new();
        budget.validate(&mut |field, description| bad.push(crate::model::FieldViolation::new(field, description)));
        if !bad.is_empty() {
            return Err(Error::InvalidArgument(bad).into());
        }
        done(self.propose(&request, Command::UpdateJobDisruptionBudget { job_id: r.job_id, budget }).await?)
    }

    async fn update_job_attributes(
        &self,
        request: Request<pb::JobAttributesUpdate>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        id_field("job_id", &r.job_id)?;
        authorize_job_change(&self.replica, &request, &r.job_id).await?;
        if r.attributes.is_empty() {
            return Err(Error::invalid("attributes", "must not be empty").into());
        }
        let attributes = attributes_from_proto(r.attributes)?;
        // The job grows by what is added: checked against the job as it is now (the rule that
        // applies it cannot read this replica's settings, which need not match the others'). Up to
        // date first: a lagging replica would not know a job created a moment ago.
        self.barrier(&request).await?;
        if let Some(mut job) = self.replica.state.job(&r.job_id)? {
            job.descriptor.attributes.extend(attributes.clone());
            if job.descriptor.attributes.len() > crate::model::job::MAX_ATTRIBUTES {
                return Err(Error::invalid(
                    "attributes",
                    format!(
                        "the job would have {} attributes, over {}",
                        job.descriptor.attributes.len(),
                        crate::model::job::MAX_ATTRIBUTES
                    ),
                )
                .into());
            }
            job.descriptor.check_size(self.max_job_bytes).map_err(Error::InvalidArgument)?;
        }
        done(self.propose(&request, Command::UpdateJobAttributes { job_id: r.job_id, attributes }).await?)
    }

    async fn delete_job_attributes(
        &self,
        request: Request<pb::JobAttributesDeleteRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        id_field("job_id", &r.job_id)?;
        authorize_job_change(&self.replica, &request, &r.job_id).await?;
        if r.keys.is_empty() {
            return Err(Error::invalid("keys", "must not be empty").into());
        }
        if let Some(k) = r.keys.iter().find(|k| k.to_ascii_lowercase().starts_with("titus.")) {
            return Err(Error::invalid(format!("keys.{k}"), "keys starting \"titus.\" are reserved").into());
        }
        done(self.propose(&request, Command::DeleteJobAttributes { job_id: r.job_id, keys: r.keys }).await?)
    }

    async fn move_task(
        &self,
        request: Request<pb::TaskMoveRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        id_field("task_id", &r.task_id)?;
        id_field("source_job_id", &r.source_job_id)?;
        id_field("target_job_id", &r.target_job_id)?;
        // The caller changes both jobs.
        authorize_job_change(&self.replica, &request, &r.source_job_id).await?;
        authorize_job_change(&self.replica, &request, &r.target_job_id).await?;
        crate::auth::note_target(&request, format!("task {} to job {}", r.task_id, r.target_job_id));
        let command =
            Command::MoveTask { task_id: r.task_id, source_job_id: r.source_job_id, target_job_id: r.target_job_id };
        done(self.propose(&request, command).await?)
    }

    async fn update_task_attributes(
        &self,
        request: Request<pb::TaskAttributesUpdate>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        id_field("task_id", &r.task_id)?;
        authorize_task_change(&self.replica, &request, &r.task_id).await?;
        if r.attributes.is_empty() {
            return Err(Error::invalid("attributes", "must not be empty").into());
        }
        let attributes = attributes_from_proto(r.attributes)?;
        done(self.propose(&request, Command::UpdateTaskAttributes { task_id: r.task_id, attributes }).await?)
    }

    async fn delete_task_attributes(
        &self,
        request: Request<pb::TaskAttributesDeleteRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        id_field("task_id", &r.task_id)?;
        authorize_task_change(&self.replica, &request, &r.task_id).await?;
        if r.keys.is_empty() {
            return Err(Error::invalid("keys", "must not be empty").into());
        }
        done(self.propose(&request, Command::DeleteTaskAttributes { task_id: r.task_id, keys: r.keys }).await?)
    }

    type ObserveJobsStream = ReceiverStream<std::result::Result<pb::JobChangeNotification, Status>>;
    type ObserveJobStream = ReceiverStream<std::result::Result<pb::JobChangeNotification, Status>>;

    async fn observe_jobs(
        &self,
        request: Request<pb::ObserveJobsQuery>,
    ) -> std::result::Result<Response<Self::ObserveJobsStream>, Status> {
        let criteria: BTreeMap<String, String> = request.get_ref().filtering_criteria.clone().into_iter().collect();
        let filter = Filter::parse(&criteria, false)?;
        let resume = request.get_ref().resume_from_revision;
        Ok(Response::new(self.observe(&request, filter, resume).await?))
    }

    async fn observe_job(
        &self,
        request: Request<pb::ObserveJobQuery>,
    ) -> std::result::Result<Response<Self::ObserveJobStream>, Status> {
        let id = request.get_ref().id.clone();
        id_field("id", &id)?;
        let state = &self.replica.state;
        if state.job(&id)?.is_none() && state.archived_job(&id)?.is_none() {
            self.barrier(&request).await?;
            if state.job(&id)?.is_none() && state.archived_job(&id)?.is_none() {
                return Err(not_found("id", "job", &id));
            }
        }
        let filter = Filter { job_ids: Some([id].into_iter().collect()), ..Filter::default() };
        let resume = request.get_ref().resume_from_revision;
        Ok(Response::new(self.observe(&request, filter, resume).await?))
    }
}

/// A job as `viewer` may see it: the environment's values are the owner's secrets (database
/// passwords end up there), so a caller who may not read them sees each name with its value
/// replaced by [`REDACTED`]. Every path that hands a job to a client goes through here.
fn job_for(viewer: &Caller, job: &Job) -> pb::Job {
    let mut shown = job_to_proto(job);
    if !crate::auth::may_read_secrets(viewer, &job.descriptor) {
        if let Some(c) = shown.job_descriptor.as_mut().and_then(|d| d.container.as_mut()) {
            for value in c.env.values_mut() {
                *value = REDACTED.to_string();
            }
        }
    }
    shown
}

/// What a redacted environment value reads as.
pub const REDACTED: &str = "<redacted>";

fn job_note(viewer: &Caller, job: &Job, revision: u64) -> pb::JobChangeNotification {
    pb::JobChangeNotification {
        notification: Some(pb::job_change_notification::Notification::JobUpdate(
            pb::job_change_notification::JobUpdate { job: Some(job_for(viewer, job)) },
        )),
        revision,
    }
}

fn task_note(task: &Task, archived: bool, revision: u64) -> pb::JobChangeNotification {
    pb::JobChangeNotification {
        notification: Some(pb::job_change_notification::Notification::TaskUpdate(
            pb::job_change_notification::TaskUpdate { task: Some(task_to_proto(task, archived)) },
        )),
        revision,
    }
}

fn snapshot_end(resumed: bool, revision: u64) -> pb::JobChangeNotification {
    pb::JobChangeNotification {
        notification: Some(pb::job_change_notification::Notification::SnapshotEnd(
            pb::job_change_notification::SnapshotEnd { resumed },
        )),
        revision,
    }
}

/// Which jobs an observer follows: decided by each job's latest record.
struct Interest {
    filter: Filter,
    viewer: Caller,
    matching: HashMap<String, bool>,
}

impl Interest {
    fn job(&mut self, job: &Job) -> bool {
        let m = self.filter.matches_job(job);
        self.matching.insert(job.id.clone(), m);
        m
    }

    fn task(&mut self, task: &Task, state: &crate::store::StateReader) -> bool {
        if let Some(m) = self.matching.get(&task.job_id) {
            return *m;
        }
        let job = state.job(&task.job_id).ok().flatten().or_else(|| state.archived_job(&task.job_id).ok().flatten());
        job.map(|j| self.job(&j)).unwrap_or(false)
    }

    fn notes(&mut self, batch: &ChangeBatch, state: &crate::store::StateReader) -> Vec<pb::JobChangeNotification> {
        let mut out = Vec::new();
        for change in &batch.changes {
            match change {
                Change::Job(j) => {
                    if self.job(j) {
                        out.push(job_note(&self.viewer, j, batch.revision));
                    }
                }
                Change::Task(t) => {
                    if self.task(t, state) {
                        // A finished job's tasks are archived with it.
                        let archived = !t.state().is_live() && state.task(&t.id).ok().flatten().is_none();
                        out.push(task_note(t, archived, batch.revision));
                    }
                }
                Change::Agent(_) | Change::InstanceGroup(_) | Change::LoadBalancer(_) | Change::LbTarget(_) => {}
            }
        }
        out
    }
}

impl JobApi {
    async fn observe<T>(
        &self,
        request: &Request<T>,
        filter: Filter,
        resume: u64,
    ) -> Result<ReceiverStream<std::result::Result<pb::JobChangeNotification, Status>>> {
        let state = self.replica.state.clone();
        let (start, mut rx) = state.changes.subscribe((resume > 0).then_some(resume));
        let mut interest = Interest { filter, viewer: crate::auth::caller(request), matching: HashMap::new() };
        let mut first = Vec::new();
        let mut last = resume;
        match start {
            Start::Resume(batches) => {
                // The marker comes first: the caller knows at once that nothing is re-sent.
                first.push(snapshot_end(true, resume));
                for b in batches {
                    first.extend(interest.notes(&b, &state));
                    last = b.revision;
                }
            }
            Start::Snapshot => {
                // A snapshot at least as new as every write acknowledged before this call.
                self.barrier(request).await?;
                let snap = state.jobs_snapshot()?;
                for job in &snap.jobs {
                    if interest.job(job) {
                        first.push(job_note(&interest.viewer, job, snap.revision));
                    }
                }
                for task in &snap.tasks {
                    if interest.matching.get(&task.job_id).copied().unwrap_or(false) {
                        first.push(task_note(task, false, snap.revision));
                    }
                }
                last = snap.revision;
                first.push(snapshot_end(false, last));
            }
        }
        let (tx, out) = mpsc::channel(OBSERVER_BUFFER);
        tokio::spawn(async move {
            for note in first {
                if tx.send(Ok(note)).await.is_err() {
                    return;
                }
            }
            loop {
                let batch = match rx.recv().await {
                    Ok(b) => b,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "observer fell {n} changes behind and was cut off; observe again with resume_from_revision={last}"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if batch.reset {
                    let _ = tx
                        .send(Err(Status::unavailable(
                            "this replica's state was replaced by a snapshot; observe again",
                        )))
                        .await;
                    return;
                }
                if batch.revision <= last {
                    continue;
                }
                last = batch.revision;
                for note in interest.notes(&batch, &state) {
                    if tx.send(Ok(note)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(ReceiverStream::new(out))
    }
}

/// The agent's task status reports (the agent issue moves these onto its stream).
pub struct AgentTaskApi {
    pub replica: Arc<Replica>,
}

#[tonic::async_trait]
impl AgentTaskService for AgentTaskApi {
    async fn report_task_status(
        &self,
        request: Request<pb::TaskStatusReport>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.get_ref().clone();
        id_field("task_id", &r.task_id)?;
        // An agent reports only the tasks placed on it, and says of them only what it may say on
        // its stream: reasons an agent may give, the context keys it may set (no containerIp: this
        // call carries none of the agent's declared networks), bounded text.
        if let Some(agent_id) = crate::auth::caller(&request).agent_id() {
            // Up to date first: a lagging replica must not refuse a task placed a moment ago.
            self.replica.read_barrier(client_deadline(&request)).await?;
            let placed_on =
                self.replica.state.task(&r.task_id)?.and_then(|t| crate::state::agent_of(&t).map(str::to_string));
            if placed_on.as_deref() != Some(agent_id) {
                tracing::warn!(agent_id, task_id = %r.task_id, rule = "agent-own-tasks", "permission denied");
                return Err(Status::permission_denied(format!(
                    "rule agent-own-tasks: task {:?} is not placed on agent {agent_id:?}",
                    r.task_id
                )));
            }
            let report = crate::model::convert::agent_report(
                agent_id,
                pb::AgentTask {
                    task_id: r.task_id,
                    state: r.state,
                    container_id: String::new(),
                    reason_code: r.reason_code,
                    reason_message: r.reason_message,
                    task_context: r.task_context,
                },
                now_ms(),
                &[],
            )?;
            let command = Command::UpdateTaskStatus {
                task_id: report.task_id,
                status: report.status,
                context: report.context,
                expected_state: None,
            };
            return done(self.replica.propose(command, client_deadline(&request)).await?);
        }
        // Without security every caller is anonymous, trusted as an operator is (tests place tasks
        // this way without an agent).
        let state = task_state_from_proto("state", r.state)?;
        let mut reason_code = r.reason_code;
        if state == TaskState::Finished {
            if reason_code.is_empty() {
                reason_code = reason::NORMAL.into();
            } else if !reason::ALL.contains(&reason_code.as_str()) {
                return Err(
                    Error::invalid("reason_code", format!("{reason_code:?} is not a Titus finished reason")).into()
                );
            }
        }
        let status = TaskStatus { state, reason_code, reason_message: r.reason_message, timestamp_ms: now_ms() };
        let command = Command::UpdateTaskStatus {
            task_id: r.task_id,
            status,
            context: r.task_context.into_iter().collect(),
            expected_state: None,
        };
        done(self.replica.propose(command, client_deadline(&request)).await?)
    }
}

#[cfg(test)]
#[path = "find_test.rs"]
mod find_test;
