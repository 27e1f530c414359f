//! The client: seed list, failover, retries and the API calls.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use titus_proto as pb;
use titus_proto::agent_management_service_client::AgentManagementServiceClient;
use titus_proto::agent_task_service_client::AgentTaskServiceClient;
use titus_proto::capacity_group_service_client::CapacityGroupServiceClient;
use titus_proto::cluster_service_client::ClusterServiceClient;
use titus_proto::job_management_service_client::JobManagementServiceClient;
use titus_proto::load_balancer_service_client::LoadBalancerServiceClient;
use titus_proto::scheduler_service_client::SchedulerServiceClient;
use titus_proto::task_io_service_client::TaskIoServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};

/// Metadata key in which a replica names the leader's api address.
const LEADER_HINT_METADATA: &str = "titus-leader";

/// Metadata key of a rate-limited answer: milliseconds until the caller may call again.
pub const RETRY_AFTER_METADATA: &str = "titus-retry-after-ms";

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Overall deadline of one call, retries included.
    pub deadline: Duration,
    /// Deadline of one attempt against one replica.
    pub attempt_timeout: Duration,
    pub connect_timeout: Duration,
    /// First back-off between attempts; doubles up to `max_backoff`, with jitter.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Start at a random seed (spreads clients over replicas); off: try the seeds in order.
    pub shuffle_seeds: bool,
    /// Mutual TLS to the replicas (see [`ClientOptions::with_tls`]); None: plaintext, which only a
    /// cluster in insecure mode (local development) accepts.
    pub tls: Option<Arc<titus_security::Tls>>,
    /// A bearer token sent with every call, instead of or besides a client certificate.
    pub token: Option<Token>,
    /// A call gives up this soon when no replica has answered at all (none reachable, or a TLS
    /// handshake every one refuses), rather than retrying to the deadline; None (the default,
    /// for programs that outlive a cluster's restart): the deadline. The CLI sets 5 s.
    pub unreachable_after: Option<Duration>,
}

/// A bearer token; never printed.
#[derive(Clone)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

impl ClientOptions {
    /// TLS with the cluster CA at `ca`, and a client certificate and key unless `cert_and_key` is
    /// None (then authenticate with a token). Files replaced later are used by new connections.
    pub fn with_tls(
        mut self,
        ca: impl Into<std::path::PathBuf>,
        cert_and_key: Option<(std::path::PathBuf, std::path::PathBuf)>,
    ) -> Result<Self> {
        let files = titus_security::TlsFiles { ca: ca.into(), cert_and_key };
        let tls = titus_security::Tls::client(files, None)
            .map_err(|e| Error::InvalidArgument { message: format!("tls: {e}"), violations: vec![] })?;
        tls.spawn_reloader_if_in_runtime(Duration::from_secs(5));
        self.tls = Some(tls);
        Ok(self)
    }

    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Token(token.into()));
        self
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            deadline: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(6),
            connect_timeout: Duration::from_millis(500),
            initial_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(1000),
            shuffle_seeds: true,
            tls: None,
            token: None,
            unreachable_after: None,
        }
    }
}

/// A capacity group to create or update.
#[derive(Debug, Clone)]
pub struct CapacityGroupSpec(pub pb::CapacityGroup);

impl CapacityGroupSpec {
    pub fn new(
        name: &str,
        tier: pb::Tier,
        cpu: f64,
        memory_mb: u32,
        disk_mb: u32,
        network_mbps: u32,
        instance_count: u32,
    ) -> Self {
        CapacityGroupSpec(pb::CapacityGroup {
            name: name.to_string(),
            tier: tier as i32,
            resources_per_instance: Some(pb::ResourceDimension { cpu, memory_mb, disk_mb, network_mbps, gpu: 0 }),
            instance_count,
            create_time_ms: 0,
            update_time_ms: 0,
            allowed_capabilities: Vec::new(),
        })
    }

    /// Linux capabilities (without CAP_) the group's jobs may ask for.
    pub fn allow_capabilities(mut self, caps: &[&str]) -> Self {
        self.0.allowed_capabilities = caps.iter().map(|c| c.to_string()).collect();
        self
    }

    pub fn gpu(mut self, gpu: u32) -> Self {
        if let Some(r) = self.0.resources_per_instance.as_mut() {
            r.gpu = gpu;
        }
        self
    }
}

struct Endpoints {
    /// Seeds plus leaders learned from hints, in rotation order.
    addrs: Vec<String>,
    channels: Vec<Ch>,
    /// Index of the replica to try next.
    current: usize,
}

/// A handle to a Titus cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    endpoints: Arc<Mutex<Endpoints>>,
    options: ClientOptions,
}

fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::Aborted
    )
}

impl Client {
    /// A client for the cluster that any of `seeds` (host:port of an api port) belongs to.
    /// Connections are made lazily, on the first call.
    pub fn connect<I, S>(seeds: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Client::with_options(seeds, ClientOptions::default())
    }

    pub fn with_options<I, S>(seeds: I, options: ClientOptions) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut endpoints = Endpoints { addrs: Vec::new(), channels: Vec::new(), current: 0 };
        for seed in seeds {
            let seed = seed.as_ref().trim();
            for s in seed.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let channel = make_channel(s, &options)?;
                endpoints.addrs.push(s.to_string());
                endpoints.channels.push(channel);
            }
        }
        if endpoints.addrs.is_empty() {
            return Err(Error::NoSeeds);
        }
        // Spread clients over the seeds.
        if options.shuffle_seeds {
            endpoints.current = rand::thread_rng().gen_range(0..endpoints.addrs.len());
        }
        Ok(Client { endpoints: Arc::new(Mutex::new(endpoints)), options })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    fn pick(&self) -> (String, Ch) {
        let e = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        (e.addrs[e.current].clone(), e.channels[e.current].clone())
    }

    /// Moves on after a failed attempt: to the hinted leader when there is one, else to the next seed.
    fn fail_over(&self, failed: &str, hint: Option<String>) {
        let mut e = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hint) = hint.filter(|h| h != failed) {
            if let Some(i) = e.addrs.iter().position(|a| *a == hint) {
                e.current = i;
                return;
            }
            if let Ok(channel) = make_channel(&hint, &self.options) {
                e.addrs.push(hint);
                e.channels.push(channel);
                e.current = e.addrs.len() - 1;
                return;
            }
        }
        if e.addrs[e.current] == failed {
            e.current = (e.current + 1) % e.addrs.len();
        }
    }

    /// Runs `attempt` against one replica after another until it succeeds, fails for good, or the
    /// overall deadline passes. Every attempt of one call carries the same request id, so the
    /// replicas' logs of a retried call can be found together.
    async fn call<T, F, Fut>(&self, operation: &str, attempt: F) -> Result<T>
    where
        F: Fn(Ch, Duration) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        CALL_ID.scope(uuid::Uuid::new_v4().to_string(), self.attempts(operation, attempt)).await
    }

    async fn attempts<T, F, Fut>(&self, operation: &str, attempt: F) -> Result<T>
    where
        F: Fn(Ch, Duration) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let start = Instant::now();
        let deadline = start + self.options.deadline;
        let mut backoff = self.options.initial_backoff;
        let mut attempts = 0;
        // Whether any replica answered (anything, an error included) rather than failing to
        // connect, handshake or answer in time.
        let mut answered = false;
        loop {
            attempts += 1;
            let (addr, channel) = self.pick();
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout = self.options.attempt_timeout.min(remaining);
            let status = match tokio::time::timeout(timeout, attempt(channel, timeout)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(status)) => {
                    // A status the transport made (connect, TLS) carries its cause; a server's does not.
                    answered |= std::error::Error::source(&status).is_none();
                    status
                }
                Err(_) => tonic::Status::deadline_exceeded(format!("no answer within {} ms", timeout.as_millis())),
            };
            // A replica's rate limit says when to come back: wait that long, at the same replica
            // (each replica limits each caller; another would only spread the load).
            let retry_after = status
                .metadata()
                .get(RETRY_AFTER_METADATA)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_millis);
            if !retryable(status.code()) && retry_after.is_none() {
                return Err(Error::from_status(&addr, status));
            }
            let jitter: f64 = rand::thread_rng().gen_range(0.5..1.5);
            let pause = match retry_after {
                Some(after) => after.max(Duration::from_millis(1)).mul_f64(jitter.max(1.0)),
                None => {
                    let hint =
                        status.metadata().get(LEADER_HINT_METADATA).and_then(|v| v.to_str().ok()).map(str::to_string);
                    tracing::debug!(%addr, code = ?status.code(), message = status.message(), ?hint, "attempt failed; failing over");
                    self.fail_over(&addr, hint);
                    backoff.mul_f64(jitter)
                }
            };
            if Instant::now() + pause >= deadline && retry_after.is_some() {
                // Rate-limited past the deadline: the caller sees the limit, not "unavailable".
                return Err(Error::from_status(&addr, status));
            }
            let unreachable = !answered && self.options.unreachable_after.is_some_and(|d| start.elapsed() + pause >= d);
            if Instant::now() + pause >= deadline || unreachable {
                return Err(Error::Unavailable {
                    operation: operation.to_string(),
                    attempts,
                    elapsed_ms: start.elapsed().as_millis() as u64,
                    last_replica: addr,
                    last_error: describe(&status),
                });
            }
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(self.options.max_backoff);
        }
    }

    // ----- capacity groups -----

    /// Creates a capacity group. Retries are safe: the call carries one idempotency token.
    pub async fn create_capacity_group(&self, spec: CapacityGroupSpec) -> Result<pb::CapacityGroup> {
        let token = uuid::Uuid::new_v4().to_string();
        self.call("CreateCapacityGroup", |ch, t| {
            let req = pb::CreateCapacityGroupRequest { group: Some(spec.0.clone()), idempotency_token: token.clone() };
            async move {
                CapacityGroupServiceClient::new(ch)
                    .create_capacity_group(with_timeout(req, t))
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    pub async fn update_capacity_group(&self, spec: CapacityGroupSpec) -> Result<pb::CapacityGroup> {
        self.call("UpdateCapacityGroup", |ch, t| {
            let req = pb::UpdateCapacityGroupRequest { group: Some(spec.0.clone()) };
            async move {
                CapacityGroupServiceClient::new(ch)
                    .update_capacity_group(with_timeout(req, t))
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    pub async fn get_capacity_group(&self, name: &str, consistency: pb::ReadConsistency) -> Result<pb::CapacityGroup> {
        self.call("GetCapacityGroup", |ch, t| {
            let req = pb::GetCapacityGroupRequest { name: name.to_string(), consistency: consistency as i32 };
            async move {
                CapacityGroupServiceClient::new(ch)
                    .get_capacity_group(with_timeout(req, t))
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    pub async fn list_capacity_groups(&self, consistency: pb::ReadConsistency) -> Result<Vec<pb::CapacityGroup>> {
        self.call("ListCapacityGroups", |ch, t| {
            let req = pb::ListCapacityGroupsRequest { consistency: consistency as i32 };
            async move {
                CapacityGroupServiceClient::new(ch)
                    .list_capacity_groups(with_timeout(req, t))
                    .await
                    .map(|r| r.into_inner().groups)
            }
        })
        .await
    }

    pub async fn delete_capacity_group(&self, name: &str) -> Result<()> {
        self.call("DeleteCapacityGroup", |ch, t| {
            let req = pb::DeleteCapacityGroupRequest {
                name: name.to_string(),
            };
            async move {
                CapacityGroupServiceClient::new(ch)
                    .delete_capacity_group(with_timeout(req, t))
                    .await
                    .map(|_| ())
            }
        })
        .await
    }

    // ----- cluster -----

    /// The status as the replica that answers sees it (not retried against another replica unless
    /// that one is unreachable).
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatus> {
        self.call("GetClusterStatus", |ch, t| async move {
            ClusterServiceClient::new(ch)
                .get_cluster_status(with_timeout(pb::GetClusterStatusRequest {}, t))
                .await
                .map(|r| r.into_inner())
        })
        .await
    }

    /// Audit records (who changed what, when, with what result), oldest first; admins and
    /// operators only.
    pub async fn audit_records(&self, query: pb::AuditQuery) -> Result<pb::AuditRecords> {
        self.call("ListAuditRecords", |ch, t| {
            let req = query.clone();
            async move {
                ClusterServiceClient::new(ch).list_audit_records(with_timeout(req, t)).await.map(|r| r.into_inner())
            }
        })
        .await
    }

    /// The status as the replica at `addr` sees it, without failover.
    pub async fn cluster_status_of(&self, addr: &str) -> Result<pb::ClusterStatus> {
        let channel = make_channel(addr, &self.options)?;
        let t = self.options.attempt_timeout;
        let mut service = ClusterServiceClient::new(channel);
        let status = bounded(addr, t, async {
            Ok(service.get_cluster_status(with_timeout(pb::GetClusterStatusRequest {}, t)).await?.into_inner())
        });
        status.await
    }

    pub async fn add_member(&self, node_id: u64, peer_addr: &str, api_addr: &str) -> Result<pb::ClusterStatus> {
        self.call("AddMember", |ch, t| {
            let req =
                pb::AddMemberRequest { node_id, peer_addr: peer_addr.to_string(), api_addr: api_addr.to_string() };
            async move { ClusterServiceClient::new(ch).add_member(with_timeout(req, t)).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// The leader's api address, as the cluster reports it.
    /// The leader's address may not be reachable from here as the cluster advertises it (ports
    /// published by Docker, NAT), so a seed that answers as the leader is preferred.
    async fn leader_addr(&self) -> Result<String> {
        let status = self.cluster_status().await?;
        if status.leader_id == 0 {
            return Err(Error::from_status("cluster", tonic::Status::unavailable("no leader is known")));
        }
        let addrs = self.endpoints.lock().unwrap_or_else(|p| p.into_inner()).addrs.clone();
        for addr in addrs {
            if matches!(self.cluster_status_of(&addr).await, Ok(s) if s.node_id == status.leader_id) {
                return Ok(addr);
            }
        }
        Ok(status.leader_api_addr)
    }

    /// A task's container output, as `request` asks (all of it, its tail, since a time; with
    /// `follow`, until the container stops): a stream of chunks from the leader, which relays
    /// them from the task's agent. The call is bounded by the client's deadline until the stream
    /// starts, and not after.
    pub async fn task_logs(&self, request: pb::TaskLogsRequest) -> Result<tonic::Streaming<pb::TaskOutput>> {
        let addr = self.leader_addr().await?;
        let mut service = TaskIoServiceClient::new(make_channel(&addr, &self.options)?);
        bounded(&addr, self.options.deadline, async { Ok(service.task_logs(request).await?.into_inner()) }).await
    }

    /// Runs a command in a running task's container (`start`), with `input` (stdin, resizes,
    /// end of stdin) sent as it comes: its output, then its exit code ([`pb::ExecExit`]). Not
    /// retried: a command may not be safe to run twice.
    pub async fn exec_task<S>(&self, start: pb::ExecStart, input: S) -> Result<tonic::Streaming<pb::TaskOutput>>
    where
        S: futures::Stream<Item = pb::ExecInput> + Send + 'static,
    {
        use futures::StreamExt;
        let addr = self.leader_addr().await?;
        let mut service = TaskIoServiceClient::new(make_channel(&addr, &self.options)?);
        let first = pb::ExecInput { input: Some(pb::exec_input::Input::Start(start)) };
        let messages = futures::stream::once(async move { first }).chain(input);
        bounded(&addr, self.options.deadline, async { Ok(service.exec_task(messages).await?.into_inner()) }).await
    }

    /// Asks the leader to hand leadership to another replica; returns the status once one is
    /// elected. Not retried: a retry would reach the new leader and move leadership again.
    pub async fn step_down(&self, timeout: Duration) -> Result<pb::ClusterStatus> {
        let addr = self.leader_addr().await?;
        let mut service = ClusterServiceClient::new(make_channel(&addr, &self.options)?);
        let answer = async { Ok(service.step_down(with_timeout(pb::StepDownRequest {}, timeout)).await?.into_inner()) };
        bounded(&addr, timeout + Duration::from_secs(1), answer).await
    }

    /// The cluster's replicated state as a backup file's bytes, with the cluster id and the index
    /// it was taken at. Read from the leader, bounded by `timeout`.
    pub async fn backup(&self, timeout: Duration) -> Result<Backup> {
        let addr = self.leader_addr().await?;
        let mut service = ClusterServiceClient::new(make_channel(&addr, &self.options)?)
            .max_decoding_message_size(MAX_CHUNK_MESSAGE_BYTES);
        let fetch = async {
            let mut stream = service.backup(with_timeout(pb::BackupRequest {}, timeout)).await?.into_inner();
            let mut backup = Backup::default();
            while let Some(chunk) = stream.message().await? {
                if backup.data.is_empty() && chunk.total_bytes > 0 {
                    backup.cluster_id = chunk.cluster_id;
                    backup.applied_index = chunk.applied_index;
                    backup.data.reserve(chunk.total_bytes as usize);
                }
                backup.data.extend_from_slice(&chunk.data);
            }
            Ok(backup)
        };
        bounded(&addr, timeout, fetch).await
    }

    /// Loads a backup file's bytes into the cluster, replacing its state. Refused when the cluster
    /// holds jobs, tasks, capacity groups or load balancers unless `force`. Not retried.
    pub async fn restore(&self, data: Vec<u8>, force: bool, timeout: Duration) -> Result<pb::RestoreResult> {
        let addr = self.leader_addr().await?;
        let mut service = ClusterServiceClient::new(make_channel(&addr, &self.options)?);
        let mut chunks: Vec<pb::RestoreChunk> =
            data.chunks(1 << 20).map(|c| pb::RestoreChunk { data: c.to_vec(), force }).collect();
        if chunks.is_empty() {
            chunks.push(pb::RestoreChunk { data: Vec::new(), force });
        }
        let mut request = tonic::Request::new(futures::stream::iter(chunks));
        request.set_timeout(timeout);
        bounded(&addr, timeout, async { Ok(service.restore(request).await?.into_inner()) }).await
    }

    pub async fn remove_member(&self, node_id: u64) -> Result<pb::ClusterStatus> {
        self.call("RemoveMember", |ch, t| {
            let req = pb::RemoveMemberRequest { node_id };
            async move {
                ClusterServiceClient::new(ch)
                    .remove_member(with_timeout(req, t))
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }
}

/// A backup of a cluster's state (see [`Client::backup`]).
#[derive(Debug, Clone, Default)]
pub struct Backup {
    pub cluster_id: String,
    /// The Raft index the state was read at.
    pub applied_index: u64,
    /// The backup file's bytes.
    pub data: Vec<u8>,
}

/// Backup chunks are 1 MiB; a message carries one.
const MAX_CHUNK_MESSAGE_BYTES: usize = 4 << 20;

impl Client {
    // ----- jobs and tasks -----

    /// Creates a job; returns its id. Retries are safe: the call carries one idempotency token, so a
    /// retry after a lost answer returns the same job instead of creating a second one.
    pub async fn create_job(&self, descriptor: pb::JobDescriptor) -> Result<String> {
        self.create_job_with_token(descriptor, &uuid::Uuid::new_v4().to_string()).await
    }

    /// Creates a job with the caller's idempotency token (kept by the cluster for 24 h).
    pub async fn create_job_with_token(&self, descriptor: pb::JobDescriptor, token: &str) -> Result<String> {
        self.call("CreateJob", |ch, t| {
            let req =
                pb::CreateJobRequest { job_descriptor: Some(descriptor.clone()), idempotency_token: token.to_string() };
            async move {
                JobManagementServiceClient::new(ch).create_job(with_timeout(req, t)).await.map(|r| r.into_inner().id)
            }
        })
        .await
    }

    pub async fn find_job(&self, id: &str) -> Result<pb::Job> {
        self.call("FindJob", |ch, t| {
            let req = pb::JobId { id: id.to_string() };
            async move { JobManagementServiceClient::new(ch).find_job(with_timeout(req, t)).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// One page of jobs matching Titus's filtering criteria (`jobState`, `appName`, `owner`, ...).
    pub async fn find_jobs(
        &self,
        criteria: &[(&str, &str)],
        page_size: u32,
        cursor: &str,
    ) -> Result<pb::JobQueryResult> {
        let filtering_criteria: std::collections::BTreeMap<String, String> = string_map(criteria);
        self.call("FindJobs", |ch, t| {
            let req = pb::JobQuery { filtering_criteria: filtering_criteria.clone(), page: Some(pb::Page { page_size, cursor: cursor.to_string() }) };
            async move { JobManagementServiceClient::new(ch).find_jobs(with_timeout(req, t)).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// The id of the one job whose id starts with `prefix` (as `docker` resolves short ids); a
    /// full id (36 characters) is returned as it is. Finished jobs count. Not found when none
    /// does; invalid when several do (they are named).
    pub async fn resolve_job_id(&self, prefix: &str) -> Result<String> {
        if prefix.len() >= ID_LEN {
            return Ok(prefix.to_string());
        }
        let page = self.find_jobs(&[], 3, prefix).await?;
        unique_prefix("job", prefix, page.items.iter().map(|j| j.id.as_str()))
    }

    /// As [`Client::resolve_job_id`], for a task.
    pub async fn resolve_task_id(&self, prefix: &str) -> Result<String> {
        if prefix.len() >= ID_LEN {
            return Ok(prefix.to_string());
        }
        let page = self.find_tasks(&[], 3, prefix).await?;
        unique_prefix("task", prefix, page.items.iter().map(|t| t.id.as_str()))
    }

    pub async fn find_task(&self, id: &str) -> Result<pb::Task> {
        self.call("FindTask", |ch, t| {
            let req = pb::TaskId { id: id.to_string() };
            async move { JobManagementServiceClient::new(ch).find_task(with_timeout(req, t)).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Why a task is or is not placed: the leader's last scheduling round (any replica sends the
    /// call there).
    /// A dry run of a new job or of an update, by the leader's placement core (see `PlanJob`).
    pub async fn plan_job(&self, request: pb::JobPlanRequest) -> Result<pb::JobPlan> {
        self.call("PlanJob", |ch, t| {
            let req = request.clone();
            async move { SchedulerServiceClient::new(ch).plan_job(with_timeout(req, t)).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn scheduling_result(&self, task_id: &str) -> Result<pb::SchedulingResult> {
        self.call("GetSchedulingResult", |ch, t| {
            let req = pb::TaskId { id: task_id.to_string() };
            async move {
                SchedulerServiceClient::new(ch)
                    .get_scheduling_result(with_timeout(req, t))
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// One page of tasks matching the criteria (`jobIds`, `taskStates`, and the job filters).
    pub async fn find_tasks(
        &self,
        criteria: &[(&str, &str)],
        page_size: u32,
        cursor: &str,
    ) -> Result<pb::TaskQueryResult> {
        let filtering_criteria: std::collections::BTreeMap<String, String> = string_map(criteria);
        self.call("FindTasks", |ch, t| {
            let req = pb::TaskQuery { filtering_criteria: filtering_criteria.clone(), page: Some(pb::Page { page_size, cursor: cursor.to_string() }) };
            async move { JobManagementServiceClient::new(ch).find_tasks(with_timeout(req, t)).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn kill_job(&self, id: &str) -> Result<()> {
        self.call("KillJob", |ch, t| {
            let req = pb::JobId { id: id.to_string() };
            async move { JobManagementServiceClient::new(ch).kill_job(with_timeout(req, t)).await.map(|_| ()) }
        })
        .await
    }

    pub async fn kill_task(&self, task_id: &str, shrink: bool, prevent_min_size_update: bool) -> Result<()> {
        self.call("KillTask", |ch, t| {
            let req = pb::TaskKillRequest { task_id: task_id.to_string(), shrink, prevent_min_size_update };
            async move { JobManagementServiceClient::new(ch).kill_task(with_timeout(req, t)).await.map(|_| ()) }
        })
        .await
    }

    /// Starts a rolling update of a service job to `container` (see `RolloutStrategy`; None: the
    /// defaults). Answers the deployment's id; 0 when the container was unchanged.
    pub async fn update_job_spec(
        &self,
        job_id: &str,
        container: pb::Container,
        strategy: Option<pb::RolloutStrategy>,
    ) -> Result<u32> {
        self.call("UpdateJobSpec", |ch, t| {
            let req = pb::JobSpecUpdate {
                job_id: job_id.to_string(),
                container: Some(container.clone()),
                strategy: strategy.clone(),
            };
            async move {
                JobManagementServiceClient::new(ch)
                    .update_job_spec(with_timeout(req, t))
                    .await
                    .map(|r| r.into_inner().deployment_id)
            }
        })
        .await
    }

    /// Goes on past the canaries of the job's active deployment.
    pub async fn promote_deployment(&self, job_id: &str) -> Result<()> {
        self.call("PromoteDeployment", |ch, t| {
            let req = pb::DeploymentRequest { job_id: job_id.to_string(), deployment_id: 0 };
            async move { JobManagementServiceClient::new(ch).promote_deployment(with_timeout(req, t)).await.map(|_| ()) }
        })
        .await
    }

    /// Rolls the job's active deployment back to the spec before it.
    pub async fn rollback_deployment(&self, job_id: &str) -> Result<()> {
        self.call("RollbackDeployment", |ch, t| {
            let req = pb::DeploymentRequest { job_id: job_id.to_string(), deployment_id: 0 };
            async move { JobManagementServiceClient::new(ch).rollback_deployment(with_timeout(req, t)).await.map(|_| ()) }
        })
        .await
    }

    /// The job's spec version and deployments, newest first.
    pub async fn get_deployments(&self, job_id: &str) -> Result<pb::DeploymentList> {
        self.call("GetDeployments", |ch, t| {
            let req = pb::JobId { id: job_id.to_string() };
            async move {
                JobManagementServiceClient::new(ch).get_deployments(with_timeout(req, t)).await.map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Evicts a task when its job's disruption budget allows it now (FailedPrecondition, naming
    /// what holds it back, otherwise).
    pub async fn evict_task(&self, task_id: &str, reason: &str) -> Result<()> {
        self.call("EvictTask", |ch, t| {
            let req = pb::TaskEvictRequest { task_id: task_id.to_string(), reason: reason.to_string() };
            async move { JobManagementServiceClient::new(ch).evict_task(with_timeout(req, t)).await.map(|_| ()) }
        })
        .await
    }

    pub async fn update_job_capacity(
        &self,
        job_id: &str,
        min: Option<u32>,
        desired: Option<u32>,
        max: Option<u32>,
    ) -> Result<()> {
        self.call("UpdateJobCapacity", |ch, t| {
            let req = pb::JobCapacityUpdate { job_id: job_id.to_string(), capacity: Some(pb::OptionalCapacity { min, desired, max }) };
            async move { JobManagementServiceClient::new(ch).update_job_capacity(with_timeout(req, t)).await.map(|_| ()) }
        })
        .await
    }

    pub async fn update_job_status(&self, job_id: &str, enabled: bool) -> Result<()> {
        self.call("UpdateJobStatus", |ch, t| {
            let req = pb::JobStatusUpdate { id: job_id.to_string(), enable_status: enabled };
            async move { JobManagementServiceClient::new(ch).update_job_status(with_timeout(req, t)).await.map(|_| ()) }
        })
        .await
    }

    pub async fn update_job_processes(
        &self,
        job_id: &str,
        disable_increase_desired: bool,
        disable_decrease_desired: bool,
    ) -> Result<()> {
        self.call("UpdateJobProcesses", |ch, t| {
            let req = pb::JobProcessesUpdate {
                job_id: job_id.to_string(),
                service_job_processes: Some(pb::ServiceJobProcesses { disable_increase_desired, disable_decrease_desired }),
            };
            async move { JobManagementServiceClient::new(ch).update_job_processes(with_timeout(req, t)).await.map(|_| ()) }
        })
        .await
    }

    /// Replaces the job's disruption budget (None: the default, self-managed).
    pub async fn update_job_disruption_budget(&self, job_id: &str, budget: Option<pb::DisruptionBudget>) -> Result<()> {
        self.call("UpdateJobDisruptionBudget", |ch, t| {
            let req = pb::JobDisruptionBudgetUpdate { job_id: job_id.to_string(), disruption_budget: budget.clone() };
            async move {
                JobManagementServiceClient::new(ch).update_job_disruption_budget(with_timeout(req, t)).await.map(|_| ())
            }
        })
        .await
    }

    pub async fn update_job_attributes(&self, job_id: &str, attributes: &[(&str, &str)]) -> Result<()> {
        let attributes: std::collections::BTreeMap<String, String> = string_map(attributes);
        self.call("UpdateJobAttributes", |ch, t| {
            let req = pb::JobAttributesUpdate { job_id: job_id.to_string(), attributes: attributes.clone() };
            async move { JobManagementServiceClient::new(ch).update_job_attributes(with_timeout(req, t)).await.map(|_| ()) }
        })
        .await
    }

    pub async fn delete_job_attributes(&self, job_id: &str, keys: &[&str]) -> Result<()> {
        self.call("DeleteJobAttributes", |ch, t| {
            let req = pb::JobAttributesDeleteRequest { job_id: job_id.to_string(), keys: keys.iter().map(|k| k.to_string()).collect() };
            async move { JobManagementServiceClient::new(ch).delete_job_attributes(with_timeout(req, t)).await.map(|_| ()) }
        })
        .await
    }

    /// Reports a task's state as its agent sees it (agent protocol).
    pub async fn report_task_status(
        &self,
        task_id: &str,
        state: pb::TaskState,
        reason_code: &str,
        context: &[(&str, &str)],
    ) -> Result<()> {
        let task_context: std::collections::BTreeMap<String, String> = string_map(context);
        self.call("ReportTaskStatus", |ch, t| {
            let req = pb::TaskStatusReport {
                task_id: task_id.to_string(),
                state: state as i32,
                reason_code: reason_code.to_string(),
                reason_message: String::new(),
                task_context: task_context.clone(),
            };
            async move { AgentTaskServiceClient::new(ch).report_task_status(with_timeout(req, t)).await.map(|_| ()) }
        })
        .await
    }

    /// Every registered agent with its state, health, allocation and whether it is attached.
    pub async fn find_agents(&self) -> Result<Vec<pb::AgentInstance>> {
        self.call("FindAgents", |ch, t| async move {
            AgentManagementServiceClient::new(ch)
                .find_agents(with_timeout(pb::Empty {}, t))
                .await
                .map(|r| r.into_inner().agents)
        })
        .await
    }

    /// Drains agent `id` (`drain` false: puts it back in service); what is left on it and why.
    pub async fn drain_agent(&self, id: &str, drain: bool) -> Result<pb::DrainStatus> {
        self.call("DrainAgent", |ch, t| {
            let req = pb::AgentDrainRequest { agent_id: id.to_string(), drain };
            async move {
                AgentManagementServiceClient::new(ch).drain_agent(with_timeout(req, t)).await.map(|r| r.into_inner())
            }
        })
        .await
    }

    /// What is left on agent `id` and why each task waits.
    pub async fn drain_status(&self, id: &str) -> Result<pb::DrainStatus> {
        self.call("GetDrainStatus", |ch, t| {
            let req = pb::AgentId { id: id.to_string() };
            async move {
                AgentManagementServiceClient::new(ch)
                    .get_drain_status(with_timeout(req, t))
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    pub async fn get_agent(&self, id: &str) -> Result<pb::AgentInstance> {
        self.call("GetAgent", |ch, t| {
            let req = pb::AgentId { id: id.to_string() };
            async move {
                AgentManagementServiceClient::new(ch).get_agent(with_timeout(req, t)).await.map(|r| r.into_inner())
            }
        })
        .await
    }

    pub async fn create_instance_group(
        &self,
        id: &str,
        tier: pb::Tier,
        lifecycle: pb::InstanceGroupLifecycle,
    ) -> Result<pb::InstanceGroup> {
        self.call("CreateInstanceGroup", |ch, t| {
            let req = pb::InstanceGroup {
                id: id.to_string(),
                tier: tier as i32,
                lifecycle: lifecycle as i32,
                ..Default::default()
            };
            async move {
                AgentManagementServiceClient::new(ch)
                    .create_instance_group(with_timeout(req, t))
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Creates or replaces an instance group with everything it can carry: EC2 launch settings
    /// and min/desired/max, for the capacity manager to scale.
    pub async fn put_instance_group(&self, group: pb::InstanceGroup) -> Result<pb::InstanceGroup> {
        self.call("CreateInstanceGroup", |ch, t| {
            let req = group.clone();
            async move {
                AgentManagementServiceClient::new(ch)
                    .create_instance_group(with_timeout(req, t))
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    pub async fn list_instance_groups(&self) -> Result<Vec<pb::InstanceGroup>> {
        self.call("ListInstanceGroups", |ch, t| async move {
            AgentManagementServiceClient::new(ch)
                .list_instance_groups(with_timeout(pb::Empty {}, t))
                .await
                .map(|r| r.into_inner().groups)
        })
        .await
    }

    /// Moves an instance group through Titus's lifecycle (PhasedOut: no new tasks).
    pub async fn update_instance_group_lifecycle(&self, id: &str, lifecycle: pb::InstanceGroupLifecycle) -> Result<()> {
        self.call("UpdateInstanceGroupLifecycle", |ch, t| {
            let req = pb::InstanceGroupLifecycleUpdate { id: id.to_string(), lifecycle: lifecycle as i32 };
            async move {
                AgentManagementServiceClient::new(ch)
                    .update_instance_group_lifecycle(with_timeout(req, t))
                    .await
                    .map(|_| ())
            }
        })
        .await
    }

    /// Associates a service job with an ALB target group (its ARN; the group must exist and be of
    /// target type `ip`). The leader then registers each Started task's IP in it, and on a kill
    /// deregisters it and waits the drain delay before the container stops. Idempotent.
    pub async fn add_load_balancer(&self, job_id: &str, target_group_arn: &str) -> Result<()> {
        self.call("AddLoadBalancer", |ch, t| {
            let req = pb::AddLoadBalancerRequest {
                job_id: job_id.to_string(),
                load_balancer_id: Some(pb::LoadBalancerId { id: target_group_arn.to_string(), ..Default::default() }),
            };
            async move { LoadBalancerServiceClient::new(ch).add_load_balancer(with_timeout(req, t)).await.map(|_| ()) }
        })
        .await
    }

    /// Dissociates a target group from a job; its targets are deregistered. Idempotent.
    pub async fn remove_load_balancer(&self, job_id: &str, target_group_arn: &str) -> Result<()> {
        self.call("RemoveLoadBalancer", |ch, t| {
            let req = pb::RemoveLoadBalancerRequest {
                job_id: job_id.to_string(),
                load_balancer_id: Some(pb::LoadBalancerId { id: target_group_arn.to_string(), ..Default::default() }),
            };
            async move {
                LoadBalancerServiceClient::new(ch).remove_load_balancer(with_timeout(req, t)).await.map(|_| ())
            }
        })
        .await
    }

    /// A job's target groups, each with its state and the targets registered for the job's tasks.
    pub async fn job_load_balancers(&self, job_id: &str) -> Result<Vec<pb::LoadBalancerId>> {
        self.call("GetJobLoadBalancers", |ch, t| {
            let req = pb::JobId { id: job_id.to_string() };
            async move {
                LoadBalancerServiceClient::new(ch)
                    .get_job_load_balancers(with_timeout(req, t))
                    .await
                    .map(|r| r.into_inner().load_balancers)
            }
        })
        .await
    }

    /// Every job's target groups (all pages).
    pub async fn all_load_balancers(&self) -> Result<Vec<pb::GetJobLoadBalancersResult>> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = self
                .call("GetAllLoadBalancers", |ch, t| {
                    let req = pb::GetAllLoadBalancersRequest {
                        page: Some(pb::Page { page_size: 1000, cursor: cursor.clone() }),
                    };
                    async move {
                        LoadBalancerServiceClient::new(ch)
                            .get_all_load_balancers(with_timeout(req, t))
                            .await
                            .map(|r| r.into_inner())
                    }
                })
                .await?;
            out.extend(page.job_load_balancers);
            match page.pagination {
                Some(p) if p.has_more && !p.cursor.is_empty() => cursor = p.cursor,
                _ => return Ok(out),
            }
        }
    }

    /// Observes jobs matching `criteria`: a snapshot, a SnapshotEnd marker, then every change in
    /// commit order. The observer reconnects by itself (to any replica) and resumes where it
    /// stopped; when that is no longer possible it receives a fresh snapshot, marked by a
    /// SnapshotEnd with `resumed = false`.
    pub fn observe_jobs(&self, criteria: &[(&str, &str)]) -> JobObserver {
        JobObserver {
            client: self.clone(),
            criteria: string_map(criteria),
            job_id: None,
            progress: Progress::default(),
            stream: None,
        }
    }

    /// Observes one job, like [`Client::observe_jobs`].
    pub fn observe_job(&self, job_id: &str) -> JobObserver {
        JobObserver { job_id: Some(job_id.to_string()), ..self.observe_jobs(&[]) }
    }
}

/// A job change stream that survives replica failures (see [`Client::observe_jobs`]).
pub struct JobObserver {
    client: Client,
    criteria: std::collections::BTreeMap<String, String>,
    job_id: Option<String>,
    progress: Progress,
    stream: Option<tonic::Streaming<pb::JobChangeNotification>>,
}

/// How far an observer has seen, to resume from. The notifications of one change batch (one log
/// entry: up to hundreds of task updates) all carry its revision, so a revision is whole only once
/// a later one arrives. A stream that breaks in the middle of a batch resumes *before* it —
/// resuming after it lost the rest of the batch (a benchmark saw 118 tasks never reported) — and
/// the notifications of the replayed batch that were handed out already are dropped: a batch names
/// each job and task at most once (one write per record per entry), so they are known by id.
/// Likewise a snapshot is whole only at its SnapshotEnd; one cut short starts over.
#[derive(Debug, Default, Clone, PartialEq)]
struct Progress {
    /// Whether the current view's snapshot was received whole; until then a reconnect starts over.
    snapshot_done: bool,
    /// The last revision received whole: a resume starts after it.
    complete: u64,
    /// The revision of the notifications being handed out now, and which records they named.
    current: u64,
    handed: std::collections::HashSet<String>,
    /// Set by a reconnect: the next notification says whether the stream resumed.
    first: bool,
    /// What a resumed stream replays that was handed out already, once it said it resumed.
    skip: Option<(u64, std::collections::HashSet<String>)>,
}

/// What a notification is about, as `Progress` tells them apart within one batch.
fn record_key(n: &pb::JobChangeNotification) -> Option<String> {
    use pb::job_change_notification::Notification;
    match &n.notification {
        Some(Notification::JobUpdate(u)) => u.job.as_ref().map(|j| format!("job {}", j.id)),
        Some(Notification::TaskUpdate(u)) => u.task.as_ref().map(|t| format!("task {}", t.id)),
        _ => None,
    }
}

impl Progress {
    /// Before connecting again: where to resume from (0: a new snapshot).
    fn reconnect(&mut self) -> u64 {
        self.first = true;
        self.skip = None;
        if self.snapshot_done {
            self.complete
        } else {
            0
        }
    }

    /// Takes in a notification at `revision` about `key` (`end`: a SnapshotEnd, and whether it
    /// says resumed); false when it was handed out before and is dropped.
    fn accept(&mut self, revision: u64, key: Option<String>, end: Option<bool>) -> bool {
        if std::mem::take(&mut self.first) {
            if end == Some(true) && self.current > self.complete && !self.handed.is_empty() {
                self.skip = Some((self.current, self.handed.clone()));
            } else if end != Some(true) {
                // A fresh snapshot (on first connecting, or when no replica could resume).
                self.snapshot_done = false;
                self.current = revision;
                self.handed.clear();
            }
        }
        if let Some(resumed) = end {
            self.snapshot_done = true;
            self.complete = self.complete.max(revision);
            if !resumed {
                self.current = revision;
                self.handed.clear();
            }
            return true;
        }
        if let Some((r, seen)) = &self.skip {
            if revision == *r {
                if key.as_ref().is_some_and(|k| seen.contains(k)) {
                    return false;
                }
            } else {
                self.skip = None;
            }
        }
        if revision > self.current {
            if self.snapshot_done {
                self.complete = self.complete.max(self.current);
            }
            self.current = revision;
            self.handed.clear();
        }
        if revision == self.current {
            if let Some(k) = key {
                self.handed.insert(k);
            }
        }
        true
    }
}

impl JobObserver {
    /// The revision to pass when resuming by hand: the last one received whole.
    pub fn last_revision(&self) -> u64 {
        self.progress.complete
    }

    async fn connect(&mut self) -> Result<()> {
        let resume = self.progress.reconnect();
        let (criteria, job_id) = (self.criteria.clone(), self.job_id.clone());
        let stream = self
            .client
            .call("Observe", |ch, _| {
                let (criteria, job_id) = (criteria.clone(), job_id.clone());
                async move {
                    let mut c = JobManagementServiceClient::new(ch);
                    // No grpc-timeout: the stream is meant to outlive any one request deadline.
                    match job_id {
                        Some(id) => c
                            .observe_job(pb::ObserveJobQuery { id, resume_from_revision: resume })
                            .await
                            .map(|r| r.into_inner()),
                        None => c
                            .observe_jobs(pb::ObserveJobsQuery {
                                filtering_criteria: criteria,
                                resume_from_revision: resume,
                            })
                            .await
                            .map(|r| r.into_inner()),
                    }
                }
            })
            .await?;
        self.stream = Some(stream);
        Ok(())
    }

    /// The next notification; reconnects and resumes on replica failure, within the client's deadline.
    pub async fn next(&mut self) -> Result<pb::JobChangeNotification> {
        let start = Instant::now();
        loop {
            if self.stream.is_none() {
                self.connect().await?;
            }
            let Some(stream) = self.stream.as_mut() else { continue };
            let failure = match stream.message().await {
                Ok(Some(n)) => {
                    let end = match &n.notification {
                        Some(pb::job_change_notification::Notification::SnapshotEnd(end)) => {
                            if !end.resumed {
                                tracing::debug!(revision = n.revision, "observer: fresh snapshot");
                            }
                            Some(end.resumed)
                        }
                        _ => None,
                    };
                    if self.progress.accept(n.revision, record_key(&n), end) {
                        return Ok(n);
                    }
                    continue;
                }
                Ok(None) => tonic::Status::unavailable("stream ended"),
                Err(status) => status,
            };
            self.stream = None;
            let resumable = retryable(failure.code()) || failure.code() == tonic::Code::ResourceExhausted;
            if !resumable || start.elapsed() > self.client.options.deadline {
                return Err(Error::from_status("observe", failure));
            }
            tracing::debug!(code = ?failure.code(), message = failure.message(), "observer: stream broke; resuming");
            tokio::time::sleep(self.client.options.initial_backoff).await;
        }
    }
}

#[cfg(test)]
mod progress_tests {
    use super::Progress;

    /// Hands in notifications at `revision` about tasks `ids`; which were handed out.
    fn feed(p: &mut Progress, revision: u64, ids: &[&str]) -> Vec<String> {
        ids.iter().filter(|id| p.accept(revision, Some(format!("task {id}")), None)).map(|id| id.to_string()).collect()
    }

    #[test]
    fn a_batch_cut_short_is_resumed_before_it_and_its_replay_not_handed_out_twice() {
        let mut p = Progress::default();
        assert_eq!(p.reconnect(), 0);
        feed(&mut p, 10, &["a", "b"]);
        assert_eq!(p.reconnect(), 0, "a snapshot cut short starts over");
        assert_eq!(feed(&mut p, 10, &["a", "b"]).len(), 2, "a fresh snapshot is handed out whole");
        assert!(p.accept(10, None, Some(false)));
        // Batch 12: 3 of its 5 updates, then the stream breaks.
        assert_eq!(feed(&mut p, 12, &["a", "b", "c"]).len(), 3);
        assert_eq!(p.reconnect(), 10, "resumed before 12");
        assert!(p.accept(10, None, Some(true)), "the resumed marker is handed out");
        // The replay may leave some out (an observer's filter reads jobs as they are now).
        assert_eq!(feed(&mut p, 12, &["a", "c", "d", "e"]), ["d", "e"], "only what was not handed out");
        assert_eq!(feed(&mut p, 13, &["a"]), ["a"]);
        assert_eq!(p.reconnect(), 12, "12 is whole once 13 began");
        assert!(p.accept(12, None, Some(true)));
        assert_eq!(feed(&mut p, 13, &["a", "b"]), ["b"]);
        assert_eq!(feed(&mut p, 14, &["a"]), ["a"], "a later batch is new whatever it names");
    }

    #[test]
    fn a_fresh_snapshot_after_a_break_is_handed_out_whole() {
        let mut p = Progress::default();
        p.reconnect();
        assert!(p.accept(5, None, Some(false)));
        assert_eq!(feed(&mut p, 7, &["a", "b"]).len(), 2);
        assert_eq!(p.reconnect(), 5);
        // No replica holds the changes since 5 any more: a new snapshot at 9, nothing dropped.
        assert_eq!(feed(&mut p, 9, &["a", "b", "c"]).len(), 3);
        assert!(p.accept(9, None, Some(false)));
        assert_eq!(p.reconnect(), 9);
    }
}

/// `[("k", "v")]` as the wire's string map.
fn string_map(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Metadata key of the id every call carries; the server logs it in the call's span and echoes it.
pub const REQUEST_ID_METADATA: &str = "x-request-id";

tokio::task_local! {
    /// The request id of the call being made (see [`Client::call`]).
    static CALL_ID: String;
}

/// Length of a job or task id (a UUID).
const ID_LEN: usize = 36;

/// The one id among `ids` starting with `prefix`. `ids` are the first ids after `prefix` in id
/// order (a page whose cursor is the prefix: the server's cursor is the last id read, and every
/// id starting with the prefix sorts right after it), so two of them are enough to tell.
fn unique_prefix<'a>(kind: &str, prefix: &str, ids: impl Iterator<Item = &'a str>) -> Result<String> {
    if prefix.is_empty() {
        return Err(Error::InvalidArgument { message: format!("a {kind} id is required"), violations: vec![] });
    }
    let matching: Vec<&str> = ids.filter(|id| id.starts_with(prefix)).collect();
    match matching.as_slice() {
        [] => Err(Error::NotFound(format!("no {kind} id starts with {prefix:?}"))),
        [one] => Ok(one.to_string()),
        several => Err(Error::InvalidArgument {
            message: format!(
                "{prefix:?} starts more than one {kind} id ({}, ...): give more of it",
                several.join(", ")
            ),
            violations: vec![],
        }),
    }
}

/// A status with the chain of causes the transport attached (a refused connection, the TLS
/// handshake's complaint), which `message()` alone leaves out.
fn describe(status: &tonic::Status) -> String {
    let mut out = format!("{:?}: {}", status.code(), status.message());
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        // Causes often repeat the message they wrap: each is said once.
        let said = c.to_string();
        if !out.contains(&said) {
            out.push_str(&format!(": {said}"));
        }
        cause = c.source();
    }
    out
}

/// One call to the replica at `addr` (no failover), bounded by `timeout`; errors name the replica.
async fn bounded<T>(
    addr: &str,
    timeout: Duration,
    call: impl Future<Output = std::result::Result<T, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(status)) => Err(Error::from_status(addr, status)),
        Err(_) => {
            Err(Error::from_status(addr, tonic::Status::deadline_exceeded(format!("no answer within {timeout:?}"))))
        }
    }
}

fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(timeout);
    let id = CALL_ID.try_with(|id| id.clone()).unwrap_or_else(|_| uuid::Uuid::new_v4().to_string());
    if let Ok(id) = id.parse() {
        r.metadata_mut().insert(REQUEST_ID_METADATA, id);
    }
    r
}

/// Adds the bearer token, when there is one, to every call.
#[derive(Clone)]
pub struct Credentials(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A channel to one replica, with the caller's credentials.
pub type Ch = tonic::service::interceptor::InterceptedService<Channel, Credentials>;

fn make_channel(addr: &str, options: &ClientOptions) -> Result<Ch> {
    if !addr.contains(':') {
        return Err(Error::BadSeed(addr.to_string()));
    }
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|_| Error::BadSeed(addr.to_string()))?;
    let connector = titus_security::Connector::new(options.tls.clone(), options.connect_timeout);
    let channel = endpoint.connect_timeout(options.connect_timeout).connect_with_connector_lazy(connector);
    if options.token.is_some() && options.tls.is_none() {
        return Err(Error::InvalidArgument {
            message: "token: a bearer token is sent only over TLS; give the cluster CA (--ca, TITUS_CA)".into(),
            violations: vec![],
        });
    }
    let token = match &options.token {
        Some(Token(t)) => Some(format!("Bearer {t}").parse().map_err(|_| Error::InvalidArgument {
            message: "token: must be printable ASCII".into(),
            violations: vec![],
        })?),
        None => None,
    };
    Ok(tonic::service::interceptor::InterceptedService::new(channel, Credentials(token)))
}
