//! The client: seed list, failover, retries and the API calls.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use titus_proto as pb;
use titus_proto::capacity_group_service_client::CapacityGroupServiceClient;
use titus_proto::cluster_service_client::ClusterServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};

/// Metadata key in which a replica names the leader's api address.
const LEADER_HINT_METADATA: &str = "titus-leader";

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
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            deadline: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(6),
            connect_timeout: Duration::from_millis(500),
            initial_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(1000),
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
        })
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
    channels: Vec<Channel>,
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
        endpoints.current = rand::thread_rng().gen_range(0..endpoints.addrs.len());
        Ok(Client { endpoints: Arc::new(Mutex::new(endpoints)), options })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    fn pick(&self) -> (String, Channel) {
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
    /// overall deadline passes.
    async fn call<T, F, Fut>(&self, operation: &str, attempt: F) -> Result<T>
    where
        F: Fn(Channel, Duration) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let start = Instant::now();
        let deadline = start + self.options.deadline;
        let mut backoff = self.options.initial_backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (addr, channel) = self.pick();
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout = self.options.attempt_timeout.min(remaining);
            let status = match tokio::time::timeout(timeout, attempt(channel, timeout)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::deadline_exceeded(format!("no answer within {} ms", timeout.as_millis())),
            };
            if !retryable(status.code()) {
                return Err(Error::from_status(&addr, status));
            }
            let hint = status.metadata().get(LEADER_HINT_METADATA).and_then(|v| v.to_str().ok()).map(str::to_string);
            tracing::debug!(%addr, code = ?status.code(), message = status.message(), ?hint, "attempt failed; failing over");
            self.fail_over(&addr, hint);
            let jitter = rand::thread_rng().gen_range(0.5..1.5);
            let pause = backoff.mul_f64(jitter);
            if Instant::now() + pause >= deadline {
                return Err(Error::Unavailable {
                    operation: operation.to_string(),
                    attempts,
                    elapsed_ms: start.elapsed().as_millis() as u64,
                    last_replica: addr,
                    last_error: format!("{:?}: {}", status.code(), status.message()),
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

    /// The status as the replica at `addr` sees it, without failover.
    pub async fn cluster_status_of(&self, addr: &str) -> Result<pb::ClusterStatus> {
        let channel = make_channel(addr, &self.options)?;
        let t = self.options.attempt_timeout;
        match tokio::time::timeout(
            t,
            ClusterServiceClient::new(channel).get_cluster_status(with_timeout(pb::GetClusterStatusRequest {}, t)),
        )
        .await
        {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(Error::from_status(addr, status)),
            Err(_) => Err(Error::from_status(addr, tonic::Status::deadline_exceeded("no answer"))),
        }
    }

    pub async fn add_member(&self, node_id: u64, peer_addr: &str, api_addr: &str) -> Result<pb::ClusterStatus> {
        self.call("AddMember", |ch, t| {
            let req =
                pb::AddMemberRequest { node_id, peer_addr: peer_addr.to_string(), api_addr: api_addr.to_string() };
            async move { ClusterServiceClient::new(ch).add_member(with_timeout(req, t)).await.map(|r| r.into_inner()) }
        })
        .await
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

fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(timeout);
    r
}

fn make_channel(addr: &str, options: &ClientOptions) -> Result<Channel> {
    if !addr.contains(':') {
        return Err(Error::BadSeed(addr.to_string()));
    }
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|_| Error::BadSeed(addr.to_string()))?;
    Ok(endpoint.connect_timeout(options.connect_timeout).tcp_nodelay(true).connect_lazy())
}
