//! The replica's metrics (Prometheus names, units in names, `_total` counters), the gRPC layer that
//! counts and times every call and gives it a request id, and the scrape-time collector.
//!
//! Counters and histograms are updated where things happen (log append, snapshot, placement, AWS
//! calls, every gRPC call); gauges that describe state (tasks by state, agents, Raft indexes,
//! RocksDB) are computed from the replica's own view when `/metrics` is scraped, so every replica —
//! follower or leader — reports the same replicated facts.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tracing::Instrument;

use titus_obs::{Counter, Gauge, Histogram, Registry, LATENCY_BUCKETS};

pub struct Metrics {
    pub registry: Registry,
    pub raft_term: Gauge,
    pub raft_is_leader: Gauge,
    pub raft_last_log_index: Gauge,
    pub raft_applied_index: Gauge,
    pub raft_committed_index: Gauge,
    pub raft_snapshot_index: Gauge,
    pub change_log_batches: Gauge,
    pub change_log_bytes: Gauge,
    pub raft_follower_lag_entries: Gauge,
    pub raft_leader_changes_total: Counter,
    pub raft_append_seconds: Histogram,
    pub snapshot_build_seconds: Histogram,
    pub snapshot_bytes: Gauge,
    pub grpc_requests_total: Counter,
    pub grpc_request_seconds: Histogram,
    pub tasks: Gauge,
    pub task_failures_total: Counter,
    pub task_restarts_total: Counter,
    pub task_launch_seconds: Histogram,
    pub scheduler_pending_tasks: Gauge,
    pub scheduler_placements_total: Counter,
    pub scheduler_plan_size: Histogram,
    pub scheduler_unplaced_tasks: Gauge,
    pub agents: Gauge,
    pub agents_connected: Gauge,
    pub agent_heartbeat_age_seconds: Gauge,
    pub aws_calls_total: Counter,
    pub lb_drift_repaired_total: Counter,
    pub capacity_instances_launched_total: Counter,
    pub capacity_instances_terminated_total: Counter,
    pub rocksdb_sst_bytes: Gauge,
    pub rocksdb_estimated_keys: Gauge,
    pub rocksdb_compaction_pending: Gauge,
    pub rocksdb_write_stopped: Gauge,
    pub lifecycle_job_errors_total: Counter,
    pub store_keys_written_total: Counter,
    pub store_bytes_written_total: Counter,
    pub raft_log_bytes_appended_total: Counter,
    pub proposals_refused_total: Counter,
    pub duties_fenced_total: Counter,
    pub connections: Gauge,
    pub connections_closed_total: Counter,
    /// The api and peer listeners' admission counters, read into the two above at scrape time.
    pub api_listener: std::sync::Arc<titus_security::ListenerStats>,
    pub peer_listener: std::sync::Arc<titus_security::ListenerStats>,
}

/// The process-wide metrics (one replica per process).
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let r = Registry::default();
        Metrics {
            raft_term: r.gauge("titus_raft_term", "Current Raft term.", &[]),
            raft_is_leader: r.gauge("titus_raft_is_leader", "1 on the leader, 0 elsewhere.", &[]),
            raft_last_log_index: r.gauge("titus_raft_last_log_index", "Index of the last log entry.", &[]),
            raft_applied_index: r.gauge("titus_raft_applied_index", "Index of the last applied entry.", &[]),
            raft_committed_index: r.gauge(
                "titus_raft_committed_index",
                "Commit index as last saved by this replica.",
                &[],
            ),
            raft_snapshot_index: r.gauge("titus_raft_snapshot_index", "Index the newest snapshot covers.", &[]),
            change_log_batches: r.gauge(
                "titus_change_log_batches",
                "Applied entries' changes kept for observers to resume from.",
                &[],
            ),
            change_log_bytes: r.gauge(
                "titus_change_log_bytes",
                "What the kept changes weigh, as the bytes their entries wrote to the store.",
                &[],
            ),
            raft_follower_lag_entries: r.gauge(
                "titus_raft_follower_lag_entries",
                "On the leader: entries each follower is behind the leader's log.",
                &["follower"],
            ),
            raft_leader_changes_total: r.counter(
                "titus_raft_leader_changes_total",
                "Leader changes this replica has seen.",
                &[],
            ),
            raft_append_seconds: r.histogram(
                "titus_raft_append_seconds",
                "Synced log append latency.",
                &[],
                LATENCY_BUCKETS,
            ),
            snapshot_build_seconds: r.histogram(
                "titus_raft_snapshot_build_seconds",
                "Time to build a snapshot.",
                &[],
                LATENCY_BUCKETS,
            ),
            snapshot_bytes: r.gauge("titus_raft_snapshot_bytes", "Size of the newest snapshot built here.", &[]),
            grpc_requests_total: r.counter(
                "titus_grpc_requests_total",
                "API calls by method and gRPC status code.",
                &["method", "code"],
            ),
            grpc_request_seconds: r.histogram(
                "titus_grpc_request_seconds",
                "API call latency to the response headers (streams: to the stream's start).",
                &["method"],
                LATENCY_BUCKETS,
            ),
            store_keys_written_total: r.counter(
                "titus_store_keys_written_total",
                "RocksDB keys put or deleted by applying entries (records and their indexes).",
                &[],
            ),
            store_bytes_written_total: r.counter(
                "titus_store_bytes_written_total",
                "Bytes of the write batches applying entries made (keys and values).",
                &[],
            ),
            raft_log_bytes_appended_total: r.counter(
                "titus_raft_log_bytes_appended_total",
                "Bytes of log entries appended to this replica's log, as encoded.",
                &[],
            ),
            lifecycle_job_errors_total: r.counter(
                "titus_lifecycle_job_errors_total",
                "Jobs the lifecycle skipped for a round because reading or planning them failed.",
                &[],
            ),
            proposals_refused_total: r.counter(
                "titus_proposals_refused_total",
                "Commands refused before proposing: they would not read back from the log, by kind.",
                &["kind"],
            ),
            duties_fenced_total: r.counter(
                "titus_duties_fenced_total",
                "Leader-duty writes or external calls refused because this replica no longer led in their term.",
                &["what"],
            ),
            connections: r.gauge(
                "titus_connections",
                "Connections held, by port, and of those not yet authenticated.",
                &["port", "state"],
            ),
            connections_closed_total: r.counter(
                "titus_connections_refused_total",
                "Connections refused or closed by admission, by port and reason: refused (every slot \
                 authenticated), evicted (an unauthenticated one closed for a newer one), timed_out (no \
                 authenticated call in time).",
                &["port", "reason"],
            ),
            api_listener: Default::default(),
            peer_listener: Default::default(),
            tasks: r.gauge("titus_tasks", "Active tasks by state.", &["state"]),
            task_failures_total: r.counter(
                "titus_task_failures_total",
                "Tasks that finished for a reason other than success, a kill or a scale-down, by reason (failed, crashed, lost, ...), as applied here.",
                &["reason"],
            ),
            task_restarts_total: r.counter(
                "titus_task_restarts_total",
                "Tasks created to replace a finished one (a batch retry or a service's replacement), as applied here.",
                &[],
            ),
            task_launch_seconds: r.histogram(
                "titus_task_launch_seconds",
                "Accepted to Started, per task.",
                &[],
                &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
            ),
            scheduler_pending_tasks: r.gauge(
                "titus_scheduler_pending_tasks",
                "Accepted tasks not yet placed on an agent.",
                &[],
            ),
            scheduler_placements_total: r.counter(
                "titus_scheduler_placements_total",
                "Placements committed by this replica as leader.",
                &[],
            ),
            scheduler_plan_size: r.histogram(
                "titus_scheduler_plan_size",
                "Placements per proposed plan.",
                &[],
                &[1.0, 10.0, 100.0, 1000.0, 10000.0],
            ),
            scheduler_unplaced_tasks: r.gauge(
                "titus_scheduler_unplaced_tasks",
                "Tasks the last placement round could not place, by reason.",
                &["reason"],
            ),
            agents: r.gauge("titus_agents", "Registered agents by state.", &["state"]),
            agents_connected: r.gauge("titus_agents_connected", "On the leader: agents whose stream is attached.", &[]),
            agent_heartbeat_age_seconds: r.gauge(
                "titus_agent_heartbeat_age_seconds",
                "On the leader: time since each attached agent was last heard.",
                &["agent"],
            ),
            aws_calls_total: r.counter(
                "titus_aws_calls_total",
                "AWS calls by duty, API and outcome (ok, throttled_or_5xx, not_found, rejected).",
                &["duty", "api", "outcome"],
            ),
            lb_drift_repaired_total: r.counter(
                "titus_lb_drift_repaired_total",
                "Targets the reconcile registered again (missing) or deregistered again (stale).",
                &["kind"],
            ),
            capacity_instances_launched_total: r.counter(
                "titus_capacity_instances_launched_total",
                "EC2 instances launched, by instance group.",
                &["group"],
            ),
            capacity_instances_terminated_total: r.counter(
                "titus_capacity_instances_terminated_total",
                "EC2 instances terminated, by instance group and reason.",
                &["group", "reason"],
            ),
            rocksdb_sst_bytes: r.gauge("titus_rocksdb_sst_bytes", "Size of SST files by column family.", &["cf"]),
            rocksdb_estimated_keys: r.gauge(
                "titus_rocksdb_estimated_keys",
                "RocksDB's estimate of the keys in each column family.",
                &["cf"],
            ),
            rocksdb_compaction_pending: r.gauge(
                "titus_rocksdb_compaction_pending",
                "1 when a compaction is pending, by column family.",
                &["cf"],
            ),
            rocksdb_write_stopped: r.gauge("titus_rocksdb_write_stopped", "1 while RocksDB stops writes.", &[]),
            registry: r,
        }
    })
}

/// The outcome label of an AWS call.
pub fn aws_outcome<T>(result: &Result<T, titus_aws::AwsError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(titus_aws::AwsError::Transient(_)) => "throttled_or_5xx",
        Err(titus_aws::AwsError::NotFound(_)) => "not_found",
        Err(titus_aws::AwsError::Rejected(_)) => "rejected",
    }
}

/// Metadata key of a call's request id (the SDK sends one; the server makes one when absent and
/// always echoes it).
pub const REQUEST_ID: &str = "x-request-id";

/// A tower layer for the api port: a span per call carrying the method and request id, the id
/// echoed in the response, the call counted by method and code and timed, and calls slower than
/// `slow` logged.
#[derive(Clone)]
pub struct GrpcTelemetry {
    pub slow: Duration,
}

impl<S> tower_layer::Layer<S> for GrpcTelemetry {
    type Service = GrpcTelemetryService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcTelemetryService { inner, slow: self.slow }
    }
}

#[derive(Clone)]
pub struct GrpcTelemetryService<S> {
    inner: S,
    slow: Duration,
}

/// Long-lived streams: their latency is meaningless and they are never "slow".
fn is_stream(method: &str) -> bool {
    method.ends_with("/Attach") || method.contains("/Observe")
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for GrpcTelemetryService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_string();
        let id = request
            .headers()
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let span = tracing::info_span!("rpc", method = %method, request_id = %id);
        let started = Instant::now();
        let slow = self.slow;
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(
            async move {
                let mut response = future.await?;
                let elapsed = started.elapsed();
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(0);
                let code_name = format!("{:?}", tonic::Code::from_i32(code));
                if let Ok(v) = http::HeaderValue::from_str(&id) {
                    response.headers_mut().insert(REQUEST_ID, v);
                }
                let m = metrics();
                m.grpc_requests_total.inc(&[&method, &code_name]);
                if !is_stream(&method) {
                    m.grpc_request_seconds.observe(&[&method], elapsed.as_secs_f64());
                    if elapsed >= slow {
                        tracing::warn!(elapsed_ms = elapsed.as_millis() as u64, code = %code_name, "slow request");
                    }
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}
