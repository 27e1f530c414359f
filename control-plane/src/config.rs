//! The replica's configuration: one typed struct, read from a TOML file and/or flags, validated
//! before anything starts. `deploy/control-plane.toml` is the commented template.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::raft_types::NodeId;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// This replica's id in the Raft group; unique in the cluster, never reused for another data dir.
    pub node_id: NodeId,
    /// Where RocksDB keeps the log, vote, state and snapshots.
    pub data_dir: PathBuf,
    /// Raft RPCs between replicas.
    pub peer_listen: SocketAddr,
    /// Clients and agents.
    pub api_listen: SocketAddr,
    /// The cluster's first members. The lowest id among them initializes the cluster once, when
    /// it and every reachable member are empty. Empty for a replica that will be added later.
    #[serde(default)]
    pub initial_members: Vec<MemberConfig>,
    #[serde(default)]
    pub raft: RaftTuning,
    /// Upper bound on how long any request waits for commit, an election or a read index.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// `plain` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    #[serde(default)]
    pub jobs: JobsConfig,
    #[serde(default)]
    pub agents: AgentsConfig,
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// The admin HTTP port: /metrics, /healthz, /readyz and the read-only web view (/ui).
    /// Absent: not served.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// API calls slower than this are logged (warn), with their method and request id.
    #[serde(default = "default_slow_request_ms")]
    pub slow_request_ms: u64,
    /// ALB target registration and EC2 capacity. Absent: both are off and everything else works.
    #[serde(default)]
    pub aws: Option<AwsConfig>,
    /// TLS, caller identities, roles, limits and the audit log. Required: a replica serves
    /// plaintext only with `security.insecure = true`.
    #[serde(default)]
    pub security: SecurityConfig,
    /// Where the security settings came from, for reloading them while running (set by the
    /// binary; not a setting).
    #[serde(skip)]
    pub security_source: Option<SecuritySource>,
}

/// The file the security settings are read from: a `--security-config` file of them alone, or the
/// main configuration file's `[security]` table.
#[derive(Debug, Clone)]
pub struct SecuritySource {
    pub path: PathBuf,
    pub whole_config: bool,
}

impl SecuritySource {
    /// The security settings the file holds now, checked as a reload takes them.
    pub fn load(&self) -> Result<SecurityConfig> {
        let security = if self.whole_config {
            Config::from_file(&self.path)?.security
        } else {
            SecurityConfig::from_file(&self.path)?
        };
        security.validate_reloadable()?;
        Ok(security)
    }
}

/// Who may connect and what they may do.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Plaintext on every port and every caller an anonymous admin: local development only.
    pub insecure: bool,
    /// The cluster CA (PEM): every certificate must chain to it.
    pub ca: Option<PathBuf>,
    /// This replica's certificate (PEM, naming `replica/<node-id>`) and its key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// How often the three files are checked for replacement (they are reloaded without a restart).
    pub reload_interval_ms: Option<u64>,
    /// The CA's private key (PEM): lets this replica sign agents' certificates on enrollment
    /// (`AgentService.EnrollAgent`, by a token of the `enroll` role). Absent: no enrollment.
    pub ca_key: Option<PathBuf>,
    /// How long an enrolled agent's certificate is valid, days. Default
    /// [`crate::node::DEFAULT_ENROLL_VALIDITY_DAYS`]: short, since the agent renews it itself.
    pub enroll_validity_days: Option<u32>,
    /// Client certificates named here get these grants; any other client certificate is a `user`
    /// owning the jobs whose owner is its name.
    pub principals: Vec<PrincipalConfig>,
    /// Bearer tokens (`authorization: Bearer <token>`), by SHA-256 digest.
    pub tokens: Vec<TokenConfig>,
    /// Serial numbers of client and agent certificates no longer accepted (hex, as `openssl x509
    /// -noout -serial` prints them; case and colons do not matter). Reloaded with the file.
    pub revoked_serials: Vec<String>,
    pub limits: LimitsConfig,
    pub audit: AuditConfig,
}

/// A role and what a `user` holds: jobs are its when their owner or application is listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PrincipalConfig {
    /// The client certificate's name (`client/<name>`).
    pub name: String,
    /// `admin`, `operator`, `user` or `enroll` (may only enroll agents: for an instance's bootstrap).
    pub role: String,
    #[serde(default)]
    pub owners: Vec<String>,
    #[serde(default)]
    pub applications: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TokenConfig {
    /// Who the token stands for, in logs and the audit log (`token/<name>`).
    pub name: String,
    /// Lower-case hex SHA-256 of the token (`titus certs token` prints both).
    pub sha256: String,
    pub role: String,
    #[serde(default)]
    pub owners: Vec<String>,
    #[serde(default)]
    pub applications: Vec<String>,
}

/// Bounds that keep one caller from exhausting a replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Calls a second each client may make on average (agents and replicas are not limited).
    pub requests_per_second: f64,
    /// Calls a client may make at once before the rate applies.
    pub burst: u32,
    /// Largest request message on the api port (the peer port allows snapshot chunks).
    pub max_request_bytes: usize,
    /// Request bytes a second each client may send on average, and at once (charged as bodies
    /// arrive; a client past it is refused until it has paid).
    pub bytes_per_second: u64,
    pub burst_bytes: u64,
    /// Open connections per port.
    pub max_connections: usize,
    /// Of those, how many only authenticated connections may hold.
    pub reserved_for_authenticated: usize,
    /// Unauthenticated connections (handshaking, or no authenticated call yet) per source address.
    pub max_unauthenticated_per_address: usize,
    /// From its accept, how long a connection has to make an authenticated call (or present a
    /// client certificate) before it is closed.
    pub unauthenticated_timeout_ms: u64,
    /// Calls in flight on one connection.
    pub max_concurrent_streams: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            requests_per_second: 200.0,
            burst: 400,
            max_request_bytes: 4 << 20,
            bytes_per_second: 1 << 20,
            burst_bytes: 8 << 20,
            max_connections: 16_384,
            reserved_for_authenticated: 1024,
            max_unauthenticated_per_address: 256,
            unauthenticated_timeout_ms: 5000,
            max_concurrent_streams: 256,
        }
    }
}

/// The replicated audit log of mutating calls.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Records kept; the oldest are dropped beyond this.
    pub max_records: u64,
    /// How often a replica commits the records of the calls it answered.
    pub flush_interval_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { max_records: 100_000, flush_interval_ms: 100 }
    }
}

impl SecurityConfig {
    /// The [security] settings alone, from their own file.
    pub fn from_file(path: &Path) -> Result<SecurityConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(self.reload_interval_ms.unwrap_or(5_000))
    }

    fn validate(&self) -> Result<()> {
        let files = [("security.ca", &self.ca), ("security.cert", &self.cert), ("security.key", &self.key)];
        if self.insecure {
            if let Some((name, _)) = files.iter().find(|(_, f)| f.is_some()) {
                return Err(Error::Config(format!("{name}: set together with security.insecure; choose one")));
            }
        } else if let Some((name, _)) = files.iter().find(|(_, f)| f.is_none()) {
            return Err(Error::Config(format!(
                "{name}: required (TLS is on unless security.insecure = true, for local development only; \
                 `titus certs init` makes a CA and certificates)"
            )));
        }
        if self.enroll_validity_days == Some(0) {
            return Err(Error::Config("security.enroll-validity-days: must be > 0".into()));
        }
        if self.reload_interval_ms == Some(0) {
            return Err(Error::Config("security.reload-interval-ms: must be > 0".into()));
        }
        self.validate_reloadable()
    }

    /// Checks what a running replica takes from a reloaded file: principals, tokens, revoked
    /// serials and limits (the rest needs a restart).
    pub fn validate_reloadable(&self) -> Result<()> {
        for (i, s) in self.revoked_serials.iter().enumerate() {
            if titus_security::identity::normalize_serial(s).is_none() {
                return Err(Error::Config(format!(
                    "security.revoked-serials[{i}]: {s:?} is not a hex serial number (as `openssl x509 -noout -serial` prints it)"
                )));
            }
        }
        // A principal's or token's name and role.
        let check_grant = |at: &str, name: &str, role: &str| -> Result<()> {
            titus_security::identity::validate_name(name).map_err(|e| Error::Config(format!("{at}.name: {e}")))?;
            Role::parse(role).map(|_| ()).ok_or_else(|| {
                Error::Config(format!("{at}.role: {role:?} is not one of admin, operator, user, enroll"))
            })
        };
        let mut names = BTreeSet::new();
        for (i, p) in self.principals.iter().enumerate() {
            let at = format!("security.principals[{i}]");
            check_grant(&at, &p.name, &p.role)?;
            if !names.insert(p.name.clone()) {
                return Err(Error::Config(format!("{at}.name: {:?} appears twice", p.name)));
            }
        }
        let mut digests = BTreeSet::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let at = format!("security.tokens[{i}]");
            check_grant(&at, &t.name, &t.role)?;
            if !titus_security::token::is_sha256_hex(&t.sha256) {
                return Err(Error::Config(format!(
                    "{at}.sha256: must be 64 lower-case hex digits (the token's SHA-256, not the token)"
                )));
            }
            if !digests.insert(t.sha256.clone()) {
                return Err(Error::Config(format!("{at}.sha256: the same token is listed twice")));
            }
        }
        let l = &self.limits;
        if !(l.requests_per_second > 0.0) || l.burst == 0 {
            return Err(Error::Config("security.limits.requests-per-second and burst: must be > 0".into()));
        }
        if l.bytes_per_second < 4096 || l.burst_bytes < l.max_request_bytes as u64 {
            return Err(Error::Config(
                "security.limits.bytes-per-second and burst-bytes: must be at least 4096, and burst-bytes at least max-request-bytes".into(),
            ));
        }
        if l.max_request_bytes < 64 << 10 {
            return Err(Error::Config("security.limits.max-request-bytes: must be at least 65536".into()));
        }
        if l.max_connections == 0 || l.max_concurrent_streams == 0 {
            return Err(Error::Config(
                "security.limits.max-connections and max-concurrent-streams: must be > 0".into(),
            ));
        }
        if l.reserved_for_authenticated >= l.max_connections {
            return Err(Error::Config(
                "security.limits.reserved-for-authenticated: must be below max-connections".into(),
            ));
        }
        if l.max_unauthenticated_per_address == 0 {
            return Err(Error::Config("security.limits.max-unauthenticated-per-address: must be > 0".into()));
        }
        if !(100..=600_000).contains(&l.unauthenticated_timeout_ms) {
            return Err(Error::Config(
                "security.limits.unauthenticated-timeout-ms: must be between 100 and 600000".into(),
            ));
        }
        if self.audit.max_records == 0 || self.audit.flush_interval_ms == 0 {
            return Err(Error::Config("security.audit.max-records and flush-interval-ms: must be > 0".into()));
        }
        Ok(())
    }
}

/// How this replica reaches AWS (credentials come from the standard chain: environment, profile,
/// instance role) and the load balancer duty's timing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AwsConfig {
    pub region: String,
    /// An AWS-compatible endpoint (a moto server, a proxy) instead of AWS's own; empty for AWS.
    pub endpoint_url: String,
    /// Attempts per AWS call (the SDK's standard retry: back-off with jitter on throttling and 5xx).
    pub max_attempts: u32,
    /// Upper bound on AWS calls per second from the leader, all APIs together.
    pub calls_per_second: f64,
    pub attempt_timeout_ms: u64,
    /// After a target is deregistered, how long its task's container keeps running (the target
    /// group's deregistration delay, so in-flight requests finish).
    pub drain_delay_ms: u64,
    /// A kill waits at most this long for deregistration and drain; then the container stops anyway.
    pub max_drain_wait_ms: u64,
    /// How often the registered targets are compared with DescribeTargetHealth and repaired.
    pub reconcile_interval_ms: u64,
    /// EC2 capacity of instance groups that have launch settings.
    pub capacity: CapacityTuning,
    /// The VPC a job's security groups must be in (checked at submission); empty: any VPC.
    pub vpc_id: String,
}

/// The capacity manager's timing and Titus's per-tier idle agent bounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct CapacityTuning {
    /// How often instance groups are compared with EC2 and scaled.
    pub interval_ms: u64,
    /// A task still unplaced this long after it was accepted counts towards a scale-up.
    pub unplaced_after_ms: u64,
    /// An agent idle this long may be terminated.
    pub idle_cooldown_ms: u64,
    /// An instance that no agent has registered from within this long is terminated.
    pub registration_timeout_ms: u64,
    /// A Lost agent's instance is kept this long after it was lost (its containers may still run:
    /// a partition or a stalled host), then terminated if its tasks were replaced.
    pub lost_grace_ms: u64,
    /// When more than this percentage of a group's agents (and more than one) are Lost at once,
    /// none of their instances is terminated: that looks like a partition, not like dead hosts.
    pub lost_hold_percent: u32,
    /// Most instances terminated in one round, and in one round per instance group.
    pub max_terminations_per_round: u32,
    pub max_terminations_per_group: u32,
    pub critical_min_idle: u32,
    pub critical_max_idle: u32,
    pub flex_min_idle: u32,
    pub flex_max_idle: u32,
}

impl Default for CapacityTuning {
    fn default() -> Self {
        CapacityTuning {
            interval_ms: 10_000,
            unplaced_after_ms: 10_000,
            idle_cooldown_ms: 10 * 60_000,
            registration_timeout_ms: 10 * 60_000,
            lost_grace_ms: 10 * 60_000,
            lost_hold_percent: 30,
            max_terminations_per_round: 10,
            max_terminations_per_group: 5,
            critical_min_idle: 1,
            critical_max_idle: 5,
            flex_min_idle: 0,
            flex_max_idle: 5,
        }
    }
}

impl CapacityTuning {
    pub fn planner(&self) -> crate::capacity::plan::CapacityConfig {
        use crate::capacity::plan::{CapacityConfig, TierLimits};
        CapacityConfig {
            critical: TierLimits { min_idle: self.critical_min_idle, max_idle: self.critical_max_idle },
            flex: TierLimits { min_idle: self.flex_min_idle, max_idle: self.flex_max_idle },
            idle_cooldown_ms: i64::try_from(self.idle_cooldown_ms).unwrap_or(i64::MAX),
            registration_timeout_ms: i64::try_from(self.registration_timeout_ms).unwrap_or(i64::MAX),
            lost_grace_ms: i64::try_from(self.lost_grace_ms).unwrap_or(i64::MAX),
            lost_hold_percent: self.lost_hold_percent,
            max_terminations_per_round: self.max_terminations_per_round,
            max_terminations_per_group: self.max_terminations_per_group,
        }
    }
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: "us-east-1".into(),
            endpoint_url: String::new(),
            max_attempts: 3,
            calls_per_second: 20.0,
            attempt_timeout_ms: 5_000,
            drain_delay_ms: 30_000,
            max_drain_wait_ms: 120_000,
            reconcile_interval_ms: 60_000,
            capacity: CapacityTuning::default(),
            vpc_id: String::new(),
        }
    }
}

impl AwsConfig {
    pub fn settings(&self) -> titus_aws::AwsSettings {
        titus_aws::AwsSettings {
            region: self.region.clone(),
            endpoint_url: Some(self.endpoint_url.clone()).filter(|u| !u.is_empty()),
            max_attempts: self.max_attempts,
            calls_per_second: self.calls_per_second,
            attempt_timeout: Duration::from_millis(self.attempt_timeout_ms),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.region.is_empty() {
            return Err(Error::Config("aws.region: must not be empty".into()));
        }
        titus_aws::check_endpoint_url(&self.endpoint_url)
            .map_err(|e| Error::Config(format!("aws.endpoint-url: {e}")))?;
        if self.max_attempts == 0 {
            return Err(Error::Config("aws.max-attempts: must be > 0".into()));
        }
        if self.reconcile_interval_ms == 0 || self.attempt_timeout_ms == 0 {
            return Err(Error::Config("aws.reconcile-interval-ms and aws.attempt-timeout-ms: must be > 0".into()));
        }
        let c = &self.capacity;
        if c.interval_ms == 0 {
            return Err(Error::Config("aws.capacity.interval-ms: must be > 0".into()));
        }
        if c.critical_min_idle > c.critical_max_idle || c.flex_min_idle > c.flex_max_idle {
            return Err(Error::Config("aws.capacity: each tier's min-idle must be <= its max-idle".into()));
        }
        if self.max_drain_wait_ms < self.drain_delay_ms {
            return Err(Error::Config("aws.max-drain-wait-ms: must be at least aws.drain-delay-ms".into()));
        }
        Ok(())
    }
}

/// The agent protocol's timing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// How often agents send a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// An agent silent this long is Lost and its tasks are replaced elsewhere. A new leader first
    /// gives every agent this long to reconnect, so it never declares the fleet lost at once.
    pub heartbeat_ttl_ms: u64,
    /// SIGTERM → SIGKILL grace when a task is killed.
    pub kill_grace_period_ms: u64,
    /// How often the leader places Accepted tasks on agents.
    pub placement_interval_ms: u64,
    /// The networks (CIDRs) agents may declare their containers take addresses from; empty: any.
    /// A containerIp outside the networks its agent declared is dropped either way.
    pub container_networks: Vec<String>,
}

impl AgentsConfig {
    /// `container-networks`, parsed (checked by `Config::validate`).
    pub fn allowed_container_networks(&self) -> Vec<crate::model::agent::Cidr> {
        self.container_networks.iter().filter_map(|c| crate::model::agent::Cidr::parse(c).ok()).collect()
    }
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig {
            heartbeat_interval_ms: 1000,
            heartbeat_ttl_ms: 15_000,
            kill_grace_period_ms: 10_000,
            placement_interval_ms: 200,
            container_networks: Vec::new(),
        }
    }
}

/// The placement core's settings (Fenzo's defaults) and how its plans are proposed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// `bin-packing` (weighted mean utilisation, weights below) or `dominant-resource`.
    pub fitness: String,
    /// Bin-packing weights of cpu, memory, disk, network and gpu.
    pub weights: [f64; 5],
    /// An agent scoring this (0..1) ends the search for a task's agent.
    pub good_enough: f64,
    /// The search also ends after this many agents that could take the task.
    pub max_candidates: usize,
    /// Share of the score soft constraints carry (0..1).
    pub soft_constraint_weight: f64,
    /// Pending tasks considered per round (oldest first, Critical before Flex).
    pub max_tasks_per_round: usize,
    /// Placements per Raft log entry.
    pub placements_per_entry: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            fitness: "bin-packing".into(),
            weights: [1.0, 1.0, 0.0, 0.0, 0.0],
            good_enough: 0.9,
            max_candidates: 32,
            soft_constraint_weight: 0.5,
            max_tasks_per_round: 50_000,
            placements_per_entry: 500,
        }
    }
}

impl SchedulerConfig {
    fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::Config(format!("scheduler.{field}: {why}")));
        if self.fitness != "bin-packing" && self.fitness != "dominant-resource" {
            return bad("fitness", "must be bin-packing or dominant-resource");
        }
        if self.weights.iter().any(|w| !w.is_finite() || *w < 0.0) || self.weights.iter().sum::<f64>() <= 0.0 {
            return bad("weights", "must be finite, >= 0, and not all 0");
        }
        if !(0.0..=1.0).contains(&self.good_enough) {
            return bad("good-enough", "must be within 0..1");
        }
        if !(0.0..=1.0).contains(&self.soft_constraint_weight) {
            return bad("soft-constraint-weight", "must be within 0..1");
        }
        if self.max_candidates == 0 || self.max_tasks_per_round == 0 || self.placements_per_entry == 0 {
            return bad("max-candidates/max-tasks-per-round/placements-per-entry", "must be > 0");
        }
        Ok(())
    }

    /// The placement core's configuration.
    pub fn core(&self) -> titus_scheduler::Config {
        titus_scheduler::Config {
            fitness: if self.fitness == "dominant-resource" {
                titus_scheduler::Fitness::DominantResource
            } else {
                titus_scheduler::Fitness::Weighted(self.weights)
            },
            good_enough: self.good_enough,
            max_candidates: self.max_candidates,
            soft_weight: self.soft_constraint_weight,
            seed: 0,
        }
    }
}

/// The task lifecycle's timing (Titus's defaults) and the archive's retention.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct JobsConfig {
    /// How often the leader reconciles every job's tasks.
    pub lifecycle_interval_ms: u64,
    pub launched_timeout_ms: u64,
    pub start_initiated_timeout_batch_ms: u64,
    pub start_initiated_timeout_service_ms: u64,
    pub kill_initiated_timeout_ms: u64,
    /// Finished jobs (and their tasks) stay findable this long.
    pub archive_retention_hours: u64,
    /// The largest job descriptor accepted, encoded (every field is bounded too).
    pub max_job_bytes: usize,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            lifecycle_interval_ms: 500,
            launched_timeout_ms: 60_000,
            start_initiated_timeout_batch_ms: 12 * 60_000,
            start_initiated_timeout_service_ms: 5 * 60_000,
            kill_initiated_timeout_ms: 10 * 60_000,
            archive_retention_hours: 7 * 24,
            max_job_bytes: crate::model::job::DEFAULT_MAX_JOB_BYTES,
        }
    }
}

impl JobsConfig {
    pub fn lifecycle(&self) -> crate::jobs::lifecycle::LifecycleConfig {
        crate::jobs::lifecycle::LifecycleConfig {
            launched_timeout_ms: self.launched_timeout_ms as i64,
            start_initiated_timeout_batch_ms: self.start_initiated_timeout_batch_ms as i64,
            start_initiated_timeout_service_ms: self.start_initiated_timeout_service_ms as i64,
            kill_initiated_timeout_ms: self.kill_initiated_timeout_ms as i64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MemberConfig {
    pub id: NodeId,
    /// Address other replicas use to reach this member's peer port.
    pub peer_addr: String,
    /// Address clients and agents use to reach this member's api port.
    pub api_addr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RaftTuning {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries (the log behind it is purged by `log_retention`).
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind the newest snapshot, so a briefly lagging follower catches up
    /// from the log rather than a snapshot.
    pub keep_entries_after_snapshot: u64,
    /// ...and every entry appended in this many seconds, however many (see `log_retention`): a
    /// follower that was away for less catches up from the log, at any write rate.
    pub keep_log_seconds: u64,
    /// Most entries in one AppendEntries. openraft gives every AppendEntries one heartbeat interval
    /// to be answered, so a payload must stay small enough to be received and synced in that time
    /// even when entries are batches (placements, agent reports).
    pub max_payload_entries: u64,
    /// ...and about this many encoded bytes (always at least one entry): a follower catching up
    /// gets payloads it can take within that heartbeat interval, however large the entries.
    pub max_payload_bytes: u64,
    /// How long a leader waits for a follower to take one chunk of a snapshot, and for the last
    /// to be installed (the follower answers the last chunk once the state is replaced). openraft's
    /// 200 ms would have a leader give up on — and resend from the start — any snapshot whose
    /// install takes longer, which a large state always does.
    pub install_snapshot_timeout_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_after_entries: 10_000,
            keep_entries_after_snapshot: 1_000,
            keep_log_seconds: 30,
            max_payload_entries: 64,
            max_payload_bytes: 1 << 20,
            install_snapshot_timeout_ms: 60_000,
        }
    }
}

fn default_request_timeout_ms() -> u64 {
    5_000
}

fn default_slow_request_ms() -> u64 {
    1_000
}

fn default_log_format() -> String {
    "plain".into()
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Checks everything that can be checked without touching the disk or the network.
    pub fn validate(&self) -> Result<()> {
        if self.node_id == 0 {
            return Err(Error::Config("node-id: must be > 0 (0 means \"no leader\" in the API)".into()));
        }
        if self.peer_listen == self.api_listen {
            return Err(Error::Config(format!(
                "peer-listen and api-listen are both {}: they must differ",
                self.peer_listen
            )));
        }
        let mut ids = BTreeSet::new();
        for (i, m) in self.initial_members.iter().enumerate() {
            if m.id == 0 {
                return Err(Error::Config(format!("initial-members[{i}].id: must be > 0")));
            }
            if !ids.insert(m.id) {
                return Err(Error::Config(format!("initial-members[{i}].id: {} appears twice", m.id)));
            }
            for (field, addr) in [("peer-addr", &m.peer_addr), ("api-addr", &m.api_addr)] {
                if addr.parse::<SocketAddr>().is_err() && !addr.contains(':') {
                    return Err(Error::Config(format!("initial-members[{i}].{field}: {addr:?} is not host:port")));
                }
            }
        }
        if !self.initial_members.is_empty() && !ids.contains(&self.node_id) {
            return Err(Error::Config(format!(
                "initial-members: does not list this replica's node-id {}",
                self.node_id
            )));
        }
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_interval_ms {
            return Err(Error::Config(
                "raft.election-timeout-min-ms: must be greater than raft.heartbeat-interval-ms (> 0)".into(),
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(Error::Config(
                "raft.election-timeout-max-ms: must be greater than raft.election-timeout-min-ms".into(),
            ));
        }
        if !(4096..=3 << 20).contains(&self.jobs.max_job_bytes) {
            return Err(Error::Config(format!(
                "jobs.max-job-bytes: {} is outside 4096 to 3145728 (a job must fit a 4 MiB call with room to spare)",
                self.jobs.max_job_bytes
            )));
        }
        if r.max_payload_entries == 0 {
            return Err(Error::Config("raft.max-payload-entries: must be > 0".into()));
        }
        let most = crate::network::MAX_PEER_MESSAGE_BYTES as u64 / 2;
        if !(4096..=most).contains(&r.max_payload_bytes) {
            return Err(Error::Config(format!(
                "raft.max-payload-bytes: {} is outside 4096 to {most} (half the largest peer message)",
                r.max_payload_bytes
            )));
        }
        if r.install_snapshot_timeout_ms < r.heartbeat_interval_ms {
            return Err(Error::Config(format!(
                "raft.install-snapshot-timeout-ms: {} is below the heartbeat interval ({} ms)",
                r.install_snapshot_timeout_ms, r.heartbeat_interval_ms
            )));
        }
        if r.keep_log_seconds > 24 * 3600 {
            return Err(Error::Config(format!(
                "raft.keep-log-seconds: {} is more than a day (86400): the log would outgrow the disk",
                r.keep_log_seconds
            )));
        }
        if r.snapshot_after_entries == 0 {
            return Err(Error::Config("raft.snapshot-after-entries: must be > 0".into()));
        }
        if self.request_timeout_ms < r.election_timeout_max_ms {
            return Err(Error::Config(
                "request-timeout-ms: must be at least raft.election-timeout-max-ms, or no request survives an election"
                    .into(),
            ));
        }
        let a = &self.agents;
        if a.heartbeat_interval_ms == 0 || a.heartbeat_ttl_ms < 2 * a.heartbeat_interval_ms {
            return Err(Error::Config(
                "agents.heartbeat-ttl-ms: must be at least twice agents.heartbeat-interval-ms (> 0)".into(),
            ));
        }
        if a.placement_interval_ms == 0 {
            return Err(Error::Config("agents.placement-interval-ms: must be > 0".into()));
        }
        for (i, c) in a.container_networks.iter().enumerate() {
            crate::model::agent::Cidr::parse(c)
                .map_err(|m| Error::Config(format!("agents.container-networks[{i}]: {m}")))?;
        }
        self.scheduler.validate()?;
        if self.jobs.lifecycle_interval_ms == 0 {
            return Err(Error::Config("jobs.lifecycle-interval-ms: must be > 0".into()));
        }
        if let Some(aws) = &self.aws {
            aws.validate()?;
        }
        if let Some(admin) = self.admin_listen {
            if admin == self.api_listen || admin == self.peer_listen {
                return Err(Error::Config(format!(
                    "admin-listen {admin}: must differ from peer-listen and api-listen"
                )));
            }
        }
        self.security.validate()?;
        if !matches!(self.log_format.as_str(), "plain" | "json") {
            return Err(Error::Config(format!("log-format: {:?} is not one of plain, json", self.log_format)));
        }
        Ok(())
    }

    pub fn openraft_config(&self) -> Result<openraft::Config> {
        let r = &self.raft;
        let config = openraft::Config {
            cluster_name: "titus".into(),
            heartbeat_interval: r.heartbeat_interval_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_after_entries),
            // The log is purged by `log_retention`, which sizes it in time as well as entries.
            max_in_snapshot_log_to_keep: u64::MAX,
            snapshot_max_chunk_size: 4 * 1024 * 1024,
            install_snapshot_timeout: r.install_snapshot_timeout_ms,
            max_payload_entries: r.max_payload_entries,
            ..Default::default()
        };
        config.validate().map_err(|e| Error::Config(format!("raft: {e}")))
    }
}

/// Parses `ID=PEER_ADDR/API_ADDR`, the flag form of one initial member.
pub fn parse_member(s: &str) -> std::result::Result<MemberConfig, String> {
    let (id, addrs) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected ID=PEER_ADDR/API_ADDR"))?;
    let (peer, api) = addrs.split_once('/').ok_or_else(|| format!("{s:?}: expected ID=PEER_ADDR/API_ADDR"))?;
    let id = id.trim().parse().map_err(|e| format!("{s:?}: id: {e}"))?;
    Ok(MemberConfig { id, peer_addr: peer.trim().to_string(), api_addr: api.trim().to_string() })
}

/// A caller's role, as the security settings name it (`admin`, `operator`, `user`, `enroll`); what
/// each may do is decided in `auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything, including cluster membership, backups and agent management.
    Admin,
    /// Every job and capacity group; not the cluster or the agents.
    Operator,
    /// Reads everything; changes only the jobs it holds.
    User,
    /// Only enrolls agents (a bootstrap credential for new instances); nothing else.
    Enroll,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "user" => Some(Role::User),
            "enroll" => Some(Role::Enroll),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            node_id: 1,
            data_dir: "/tmp/x".into(),
            peer_listen: "127.0.0.1:7001".parse().unwrap(),
            api_listen: "127.0.0.1:8001".parse().unwrap(),
            initial_members: vec![parse_member("1=127.0.0.1:7001/127.0.0.1:8001").unwrap()],
            raft: RaftTuning::default(),
            request_timeout_ms: 5000,
            log_format: "plain".into(),
            jobs: JobsConfig::default(),
            agents: AgentsConfig::default(),
            scheduler: SchedulerConfig::default(),
            aws: None,
            admin_listen: None,
            slow_request_ms: 1_000,
            security: SecurityConfig { insecure: true, ..Default::default() },
            security_source: None,
        }
    }

    #[test]
    fn template_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/control-plane.toml");
        let c = Config::from_file(&path).unwrap();
        c.validate().unwrap();
        c.openraft_config().unwrap();
    }

    /// The template's commented [aws] block, uncommented, parses and validates.
    #[test]
    fn template_aws_block_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/control-plane.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let start = text.find("# [aws]").expect("the template documents [aws]");
        let block: String = text[start..]
            .lines()
            .filter(|l| !l.starts_with("# #") && *l != "#")
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let mut c = config();
        c.aws =
            Some(toml::from_str(&block.replacen("[aws]\n", "", 1).replace("[aws.capacity]", "[capacity]")).unwrap());
        c.validate().unwrap();
        let aws = c.aws.as_ref().unwrap();
        assert_eq!(aws.capacity.idle_cooldown_ms, 600_000);
        c.aws.as_mut().unwrap().endpoint_url = "localhost:5000".into();
        assert!(c.validate().unwrap_err().to_string().contains("aws.endpoint-url"));
    }

    #[test]
    fn bad_configs_name_the_setting() {
        let mut c = config();
        c.node_id = 2;
        assert!(c.validate().unwrap_err().to_string().contains("initial-members"));
        let mut c = config();
        c.api_listen = c.peer_listen;
        assert!(c.validate().unwrap_err().to_string().contains("api-listen"));
        let mut c = config();
        c.raft.election_timeout_max_ms = 10;
        assert!(c.validate().unwrap_err().to_string().contains("election-timeout"));
        for bytes in [0, 4 << 20] {
            let mut c = config();
            c.jobs.max_job_bytes = bytes;
            assert!(c.validate().unwrap_err().to_string().contains("jobs.max-job-bytes"));
        }
        assert!(toml::from_str::<Config>("node-id = 1\nbogus = 2").unwrap_err().to_string().contains("bogus"));
        assert!(parse_member("1=a:1").is_err());
    }

    #[test]
    fn security_is_required_and_checked_by_name() {
        let mut c = config();
        c.security.insecure = false;
        assert!(c.validate().unwrap_err().to_string().contains("security.ca: required"));
        c.security.ca = Some("/ca.pem".into());
        c.security.cert = Some("/c.pem".into());
        c.security.key = Some("/c.key".into());
        c.validate().unwrap();
        c.security.insecure = true;
        assert!(c.validate().unwrap_err().to_string().contains("set together with security.insecure"));
        let mut c = config();
        c.security.tokens.push(TokenConfig {
            name: "ci".into(),
            sha256: "not-a-digest".into(),
            role: "user".into(),
            owners: vec![],
            applications: vec![],
        });
        assert!(c.validate().unwrap_err().to_string().contains("security.tokens[0].sha256"));
        let mut c = config();
        c.security.principals.push(PrincipalConfig {
            name: "alice".into(),
            role: "root".into(),
            owners: vec![],
            applications: vec![],
        });
        assert!(c.validate().unwrap_err().to_string().contains("security.principals[0].role"));
        let text = "[[principals]]\nname = \"a\"\nrole = \"admin\"\n[limits]\nburst = 3\n";
        let s: SecurityConfig = toml::from_str(text).unwrap();
        assert_eq!((s.principals.len(), s.limits.burst, s.limits.max_connections), (1, 3, 16_384));
    }
}
