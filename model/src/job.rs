//! Titus's job: descriptor (what to run and how many), status, and the validation of everything a
//! user can send, each error naming its field path (`container.resources.cpu: must be > 0`).
//!
//! Error messages quote user input only as data (`{:?}`), never evaluate or template it: Titus had
//! a remote-code-execution CVE (CVE-2020-9297) from exactly that.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{validate_name, FieldViolation, ResourceDimension};

pub const DEFAULT_CAPACITY_GROUP: &str = "DEFAULT";
/// Titus's defaults for resources a descriptor leaves at 0.
pub const DEFAULT_DISK_MB: u32 = 10_000;
pub const DEFAULT_NETWORK_MBPS: u32 = 128;
pub const MAX_TASKS_PER_JOB: u32 = 10_000;
pub const MAX_ATTRIBUTES: usize = 100;
const MAX_VALUE_LEN: usize = 4096;
const MAX_ARGS: usize = 256;
/// Environment variables per container, and constraints of each kind per job.
const MAX_ENV: usize = 500;
const MAX_CONSTRAINTS: usize = 32;
/// Bytes of an environment variable's name, and of a constraint's value.
const MAX_NAME_LEN: usize = 256;
/// The default bound on a whole job descriptor, encoded (each field is bounded too, but together
/// they could still make a Raft entry big enough to stall replication).
pub const DEFAULT_MAX_JOB_BYTES: usize = 256 * 1024;
/// The longest runtime limit a batch job may set: 30 days. The lifecycle does arithmetic on it (in
/// milliseconds), so it is bounded here rather than left to overflow there.
pub const MAX_RUNTIME_LIMIT_SEC: u64 = 30 * 86_400;
/// The longest delay between two retries a retry policy may ask for: 7 days.
pub const MAX_RETRY_DELAY_MS: u64 = 7 * 86_400_000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobGroupInfo {
    pub stack: String,
    pub detail: String,
    pub sequence: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerResources {
    pub cpu: f64,
    pub gpu: u32,
    pub memory_mb: u32,
    pub disk_mb: u32,
    pub network_mbps: u32,
    pub shm_size_mb: u32,
}

impl ContainerResources {
    pub fn as_dimension(&self) -> ResourceDimension {
        ResourceDimension {
            cpu: self.cpu,
            memory_mb: self.memory_mb,
            disk_mb: self.disk_mb,
            network_mbps: self.network_mbps,
            gpu: self.gpu,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Container {
    pub resources: ContainerResources,
    pub image: Image,
    pub entry_point: Vec<String>,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub soft_constraints: BTreeMap<String, String>,
    pub hard_constraints: BTreeMap<String, String>,
    /// Linux capabilities the container gets beyond the agent's reduced default set; each must be
    /// allowed by the job's capacity group. Absent from records that have none (older replicas
    /// read them unchanged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// The job's AWS identity. Absent from records that have none (older replicas read them
    /// unchanged).
    #[serde(default, skip_serializing_if = "SecurityProfile::is_empty")]
    pub security_profile: SecurityProfile,
    /// How the agent tells whether a task serves. Absent from records that have none (older
    /// replicas read them unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// A container's health check, as Docker's HEALTHCHECK: a command run in the container (exit 0:
/// healthy), or an HTTP GET the agent makes to the container's address (2xx or 3xx: healthy).
/// `retries` failures in a row make the task unhealthy; failures in its first `start_period_sec`
/// do not count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub http_path: String,
    #[serde(default)]
    pub http_port: u32,
    pub interval_sec: u32,
    pub timeout_sec: u32,
    pub retries: u32,
    pub start_period_sec: u32,
    /// A service task unhealthy this long is replaced (reason `unhealthy`); 0: never.
    pub replace_after_sec: u32,
}

impl HealthCheck {
    pub const DEFAULT_INTERVAL_SEC: u32 = 10;
    pub const DEFAULT_TIMEOUT_SEC: u32 = 5;
    pub const DEFAULT_RETRIES: u32 = 3;

    /// Fills the defaults of fields left at 0.
    pub fn with_defaults(mut self) -> Self {
        if self.interval_sec == 0 {
            self.interval_sec = Self::DEFAULT_INTERVAL_SEC;
        }
        if self.timeout_sec == 0 {
            self.timeout_sec = Self::DEFAULT_TIMEOUT_SEC.min(self.interval_sec);
        }
        if self.retries == 0 {
            self.retries = Self::DEFAULT_RETRIES;
        }
        self
    }

    /// Every violation, fields named from `container.health_check`.
    pub fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        const FIELD: &str = "container.health_check";
        match (self.command.is_empty(), self.http_path.is_empty()) {
            (true, true) => bad(FIELD, "set either command or http_path and http_port".into()),
            (false, false) => bad(FIELD, "set either command or http_path, not both".into()),
            (false, true) => {
                if self.command.len() > MAX_ARGS {
                    bad(&format!("{FIELD}.command"), format!("must have at most {MAX_ARGS} entries"));
                }
                if self.command.iter().any(|a| a.len() > MAX_VALUE_LEN) {
                    bad(&format!("{FIELD}.command"), format!("each entry must be at most {MAX_VALUE_LEN} bytes"));
                }
            }
            (true, false) => {
                if !self.http_path.starts_with('/')
                    || self.http_path.len() > 1024
                    || self.http_path.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    bad(
                        &format!("{FIELD}.http_path"),
                        "must start with '/', have no spaces, and be at most 1024 bytes".into(),
                    );
                }
                if self.http_port == 0 || self.http_port > 65_535 {
                    bad(&format!("{FIELD}.http_port"), "must be 1-65535".into());
                }
            }
        }
        for (name, value, max) in [
            ("interval_sec", self.interval_sec, 3_600),
            ("timeout_sec", self.timeout_sec, 3_600),
            ("retries", self.retries, 100),
            ("start_period_sec", self.start_period_sec, 3_600),
            ("replace_after_sec", self.replace_after_sec, 86_400),
        ] {
            if value > max {
                bad(&format!("{FIELD}.{name}"), format!("must be at most {max}"));
            }
        }
        if self.timeout_sec > self.interval_sec {
            bad(&format!("{FIELD}.timeout_sec"), "must not exceed interval_sec".into());
        }
    }
}

/// Security groups per job: what one ENI takes in AWS (its default quota is 5, raisable to 16).
pub const MAX_SECURITY_GROUPS: usize = 16;
/// Attributes of a security profile.
const MAX_PROFILE_ATTRIBUTES: usize = 32;

/// What the code in the job's containers is in AWS (Titus's `SecurityProfile`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecurityProfile {
    /// `sg-...` ids, each once; checked against EC2 at submission when AWS is configured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
    /// An IAM role ARN whose credentials the agent serves to the job's containers; empty: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub iam_role: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Instance metadata without an IMDSv2 session token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_imds_v1: bool,
}

impl SecurityProfile {
    pub fn is_empty(&self) -> bool {
        *self == SecurityProfile::default()
    }

    /// Every violation, fields named from `container.security_profile`.
    pub fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        const FIELD: &str = "container.security_profile";
        if self.security_groups.len() > MAX_SECURITY_GROUPS {
            bad(&format!("{FIELD}.security_groups"), format!("must have at most {MAX_SECURITY_GROUPS} entries"));
        }
        // Entries are checked only up to the bound: the duplicate check is quadratic, and a request
        // may carry hundreds of thousands of them.
        for (i, sg) in self.security_groups.iter().enumerate().take(MAX_SECURITY_GROUPS) {
            if !is_security_group_id(sg) {
                bad(
                    &format!("{FIELD}.security_groups[{i}]"),
                    format!("{sg:?} is not a security group id (sg- and 8 or 17 lowercase hex digits)"),
                );
            } else if self.security_groups[..i].contains(sg) {
                bad(&format!("{FIELD}.security_groups[{i}]"), format!("{sg} is named twice"));
            }
        }
        if !self.iam_role.is_empty() {
            if let Err(why) = check_role_arn(&self.iam_role) {
                bad(&format!("{FIELD}.iam_role"), why);
            }
        }
        if self.attributes.len() > MAX_PROFILE_ATTRIBUTES {
            bad(&format!("{FIELD}.attributes"), format!("must have at most {MAX_PROFILE_ATTRIBUTES} entries"));
        }
        for (k, val) in &self.attributes {
            if k.is_empty() || k.len() > MAX_NAME_LEN {
                bad(&format!("{FIELD}.attributes[{k:?}]"), format!("key must be 1-{MAX_NAME_LEN} bytes"));
            } else if val.len() > MAX_VALUE_LEN {
                bad(&format!("{FIELD}.attributes.{k}"), format!("value must be at most {MAX_VALUE_LEN} bytes"));
            }
        }
    }

    /// The role's name: the ARN's last path segment.
    pub fn role_name(&self) -> Option<&str> {
        self.iam_role.rsplit('/').next().filter(|n| !n.is_empty() && !self.iam_role.is_empty())
    }
}

/// `sg-` followed by 8 (older) or 17 lowercase hex digits.
pub fn is_security_group_id(s: &str) -> bool {
    s.strip_prefix("sg-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17) && hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

/// `arn:<partition>:iam::<12-digit account>:role/<path/>name`, as IAM spells a role ARN.
pub fn check_role_arn(arn: &str) -> Result<(), String> {
    const SHAPE: &str = "must be an IAM role ARN: arn:aws:iam::<12-digit account>:role/<name>";
    if arn.len() > 2048 {
        return Err("must be at most 2048 bytes".into());
    }
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [prefix, partition, service, region, account, resource] = parts[..] else {
        return Err(SHAPE.into());
    };
    let partition_ok = partition == "aws" || partition.starts_with("aws-");
    let account_ok = account.len() == 12 && account.chars().all(|c| c.is_ascii_digit());
    let Some(path) = resource.strip_prefix("role/") else { return Err(SHAPE.into()) };
    let name = path.rsplit('/').next().unwrap_or("");
    let chars_ok = path.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-/".contains(c));
    if prefix != "arn" || !partition_ok || service != "iam" || !region.is_empty() || !account_ok || !chars_ok {
        return Err(SHAPE.into());
    }
    if name.is_empty() || name.len() > 64 {
        return Err("the role name (after the last '/') must be 1-64 characters".into());
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RetryPolicy {
    Immediate { retries: u32 },
    Delayed { initial_delay_ms: u64, delay_ms: u64, retries: u32 },
    ExponentialBackOff { initial_delay_ms: u64, max_delay_interval_ms: u64, retries: u32 },
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::Immediate { retries: 0 }
    }
}

impl RetryPolicy {
    pub fn retries(&self) -> u32 {
        match self {
            RetryPolicy::Immediate { retries }
            | RetryPolicy::Delayed { retries, .. }
            | RetryPolicy::ExponentialBackOff { retries, .. } => *retries,
        }
    }

    /// How long to wait before retry number `retry` (1 for the first retry).
    pub fn delay_ms(&self, retry: u32) -> u64 {
        match self {
            RetryPolicy::Immediate { .. } => 0,
            RetryPolicy::Delayed { initial_delay_ms, delay_ms, .. } => {
                if retry <= 1 {
                    *initial_delay_ms
                } else {
                    *delay_ms
                }
            }
            RetryPolicy::ExponentialBackOff { initial_delay_ms, max_delay_interval_ms, .. } => {
                let shift = retry.saturating_sub(1).min(32);
                initial_delay_ms.saturating_mul(1u64 << shift).min(*max_delay_interval_ms)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub min: u32,
    pub desired: u32,
    pub max: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceJobProcesses {
    pub disable_increase_desired: bool,
    pub disable_decrease_desired: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobType {
    Batch { size: u32, runtime_limit_sec: u64, retry_policy: RetryPolicy, retry_on_runtime_limit: bool },
    Service { capacity: Capacity, enabled: bool, retry_policy: RetryPolicy, processes: ServiceJobProcesses },
}

/// Titus's job disruption budget (see `budget`). Fields after the first two are absent from
/// records of jobs that set none (older replicas read them unchanged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DisruptionBudget {
    pub self_managed_relocation_time_ms: u64,
    /// 0: no availability limit.
    pub availability_percentage_limit: f64,
    /// 0: no limit of unavailable tasks.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unhealthy_tasks_limit: u32,
    /// 0: evictions are not rate-limited.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rate_limit: u32,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub rate_interval_ms: u64,
    /// At most this share of desired evicted in any hour (rounded up, at least 1); 0: no such rate.
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub rate_percentage_per_hour: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub time_windows: Vec<crate::budget::TimeWindow>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn is_zero_f64(n: &f64) -> bool {
    *n == 0.0
}

impl Default for DisruptionBudget {
    /// Self-managed: a job that sets no budget takes each disruption at that disruption's own pace.
    fn default() -> Self {
        DisruptionBudget {
            self_managed_relocation_time_ms: 60_000,
            availability_percentage_limit: 0.0,
            unhealthy_tasks_limit: 0,
            rate_limit: 0,
            rate_interval_ms: 0,
            rate_percentage_per_hour: 0.0,
            time_windows: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDescriptor {
    pub owner_email: String,
    pub application_name: String,
    pub capacity_group: String,
    pub job_group_info: JobGroupInfo,
    pub attributes: BTreeMap<String, String>,
    pub container: Container,
    pub job_type: JobType,
    pub disruption_budget: DisruptionBudget,
}

impl JobDescriptor {
    /// The descriptor's encoded size, with its largest field and that field's size: what to name
    /// when a job is over the bound.
    pub fn encoded_size(&self) -> (usize, &'static str, usize) {
        fn len<T: Serialize + ?Sized>(v: &T) -> usize {
            serde_json::to_vec(v).map_or(0, |b| b.len())
        }
        let c = &self.container;
        let parts = [
            ("attributes", len(&self.attributes)),
            ("container.env", len(&c.env)),
            ("container.entry_point", len(&c.entry_point)),
            ("container.command", len(&c.command)),
            ("container.soft_constraints", len(&c.soft_constraints)),
            ("container.hard_constraints", len(&c.hard_constraints)),
        ];
        let (field, bytes) = parts.into_iter().max_by_key(|(_, n)| *n).unwrap_or(("", 0));
        (len(self), field, bytes)
    }

    /// Refuses a descriptor over `max_bytes` encoded, naming its largest field. One encode for a
    /// job within the bound (every CreateJob pays it); the fields are sized only for the error.
    pub fn check_size(&self, max_bytes: usize) -> Result<(), Vec<FieldViolation>> {
        if serde_json::to_vec(self).map_or(0, |b| b.len()) <= max_bytes {
            return Ok(());
        }
        let (total, field, bytes) = self.encoded_size();
        Err(vec![FieldViolation::new(
            field,
            format!(
                "the job is {total} bytes encoded, over the {max_bytes}-byte limit (jobs.max-job-bytes); its largest field is {field} ({bytes} bytes)"
            ),
        )])
    }

    pub fn is_batch(&self) -> bool {
        matches!(self.job_type, JobType::Batch { .. })
    }

    /// How many tasks the job should have live: a batch job's size, an enabled service job's desired.
    pub fn wanted_tasks(&self) -> u32 {
        match &self.job_type {
            JobType::Batch { size, .. } => *size,
            JobType::Service { capacity, enabled: true, .. } => capacity.desired,
            JobType::Service { .. } => 0,
        }
    }

    /// Instances the job may hold at once, for capacity-group quota.
    pub fn quota_instances(&self) -> u32 {
        match &self.job_type {
            JobType::Batch { size, .. } => *size,
            JobType::Service { capacity, .. } => capacity.desired,
        }
    }

    pub fn retry_policy(&self) -> &RetryPolicy {
        match &self.job_type {
            JobType::Batch { retry_policy, .. } | JobType::Service { retry_policy, .. } => retry_policy,
        }
    }

    /// Fills Titus's defaults (capacity group, disk, network) where the user left them empty.
    pub fn apply_defaults(&mut self) {
        if self.capacity_group.is_empty() {
            self.capacity_group = DEFAULT_CAPACITY_GROUP.to_string();
        }
        let r = &mut self.container.resources;
        if r.disk_mb == 0 {
            r.disk_mb = DEFAULT_DISK_MB;
        }
        if r.network_mbps == 0 {
            r.network_mbps = DEFAULT_NETWORK_MBPS;
        }
    }

    /// Every violation, each naming its field path from the descriptor's root.
    pub fn validate(&self) -> Result<(), Vec<FieldViolation>> {
        let mut v = Vec::new();
        let mut bad = |field: &str, why: String| v.push(FieldViolation::new(field, why));

        if self.owner_email.is_empty() {
            bad("owner.team_email", "must not be empty".into());
        } else if !self.owner_email.contains('@')
            || self.owner_email.len() > 256
            || self.owner_email.chars().any(char::is_whitespace)
        {
            bad("owner.team_email", "must be an email address".into());
        }
        if let Err(e) = validate_name("application_name", &self.application_name) {
            bad(&e.field, e.description);
        }
        if let Err(e) = validate_name("capacity_group", &self.capacity_group) {
            bad(&e.field, e.description);
        }
        for (field, value) in [
            ("job_group_info.stack", &self.job_group_info.stack),
            ("job_group_info.detail", &self.job_group_info.detail),
            ("job_group_info.sequence", &self.job_group_info.sequence),
        ] {
            if !value.is_empty() {
                if let Err(e) = validate_name(field, value) {
                    bad(&e.field, e.description);
                }
            }
        }
        validate_attributes(&self.attributes, &mut bad);

        let c = &self.container;
        let r = &c.resources;
        if !r.cpu.is_finite() || r.cpu <= 0.0 {
            bad("container.resources.cpu", "must be > 0".into());
        } else if r.cpu > 1024.0 {
            bad("container.resources.cpu", "must be at most 1024".into());
        }
        if r.memory_mb == 0 {
            bad("container.resources.memory_mb", "must be > 0".into());
        }
        if r.shm_size_mb > r.memory_mb && r.memory_mb > 0 {
            bad("container.resources.shm_size_mb", "must not exceed memory_mb".into());
        }
        if c.image.name.is_empty() {
            bad("container.image.name", "must not be empty".into());
        } else if c.image.name.len() > 255
            || !c.image.name.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-/:".contains(ch))
        {
            bad(
                "container.image.name",
                "must be a lowercase image name (letters, digits, '.', '_', '-', '/', ':')".into(),
            );
        }
        match (&c.image.tag, &c.image.digest) {
            (None, None) | (Some(_), Some(_)) => {
                bad("container.image", "exactly one of tag and digest must be set".into())
            }
            (Some(tag), None) => {
                if tag.is_empty()
                    || tag.len() > 128
                    || !tag.chars().all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
                {
                    bad("container.image.tag", "must be 1-128 letters, digits, '.', '_' or '-'".into());
                }
            }
            (None, Some(digest)) => {
                let ok = digest
                    .strip_prefix("sha256:")
                    .is_some_and(|hex| hex.len() == 64 && hex.chars().all(|ch| ch.is_ascii_hexdigit()));
                if !ok {
                    bad("container.image.digest", "must be sha256: followed by 64 hex digits".into());
                }
            }
        }
        for (field, args) in [("container.entry_point", &c.entry_point), ("container.command", &c.command)] {
            if args.len() > MAX_ARGS {
                bad(field, format!("must have at most {MAX_ARGS} elements"));
            }
            if let Some(i) = args.iter().position(|a| a.len() > MAX_VALUE_LEN) {
                bad(&format!("{field}[{i}]"), format!("must be at most {MAX_VALUE_LEN} bytes"));
            }
        }
        if c.env.len() > MAX_ENV {
            bad("container.env", format!("must have at most {MAX_ENV} entries"));
        }
        for v in crate::validate_capabilities("container.capabilities", &c.capabilities) {
            bad(&v.field, v.description);
        }
        c.security_profile.validate(&mut bad);
        if let Some(h) = &c.health_check {
            h.validate(&mut bad);
        }
        for (k, val) in &c.env {
            let valid = !k.is_empty()
                && k.len() <= MAX_NAME_LEN
                && !k.starts_with(|ch: char| ch.is_ascii_digit())
                && k.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
            if !valid {
                bad(
                    &format!("container.env[{k:?}]"),
                    format!("must be a variable name of at most {MAX_NAME_LEN} bytes: letters, digits and '_', not starting with a digit"),
                );
            } else if val.len() > MAX_VALUE_LEN {
                bad(&format!("container.env.{k}"), format!("must be at most {MAX_VALUE_LEN} bytes"));
            }
        }
        for (field, constraints) in
            [("container.soft_constraints", &c.soft_constraints), ("container.hard_constraints", &c.hard_constraints)]
        {
            if constraints.len() > MAX_CONSTRAINTS {
                bad(field, format!("must have at most {MAX_CONSTRAINTS} entries"));
            }
            for (name, value) in constraints {
                if name.len() > MAX_NAME_LEN || value.len() > MAX_NAME_LEN {
                    bad(
                        &format!("{field}[{name:?}]"),
                        format!("name and value must be at most {MAX_NAME_LEN} bytes each"),
                    );
                } else if let Err(why) = validate_constraint(name, value) {
                    bad(&format!("{field}.{name}"), why);
                }
            }
        }

        match &self.job_type {
            JobType::Batch { size, retry_policy, runtime_limit_sec, .. } => {
                if *size == 0 || *size > MAX_TASKS_PER_JOB {
                    bad("batch.size", format!("must be between 1 and {MAX_TASKS_PER_JOB}"));
                }
                if *runtime_limit_sec > MAX_RUNTIME_LIMIT_SEC {
                    bad(
                        "batch.runtime_limit_sec",
                        format!("must be at most {MAX_RUNTIME_LIMIT_SEC} (30 days), or 0 for no limit"),
                    );
                }
                validate_retry_policy("batch.retry_policy", retry_policy, &mut bad);
            }
            JobType::Service { capacity, retry_policy, .. } => {
                validate_capacity("service.capacity", capacity, &mut bad);
                validate_retry_policy("service.retry_policy", retry_policy, &mut bad);
            }
        }
        self.disruption_budget.validate(&mut bad);
        if v.is_empty() {
            Ok(())
        } else {
            Err(v)
        }
    }
}

pub fn validate_capacity(field: &str, c: &Capacity, bad: &mut impl FnMut(&str, String)) {
    if c.min > c.desired || c.desired > c.max {
        bad(
            field,
            format!("must satisfy min <= desired <= max (got min {}, desired {}, max {})", c.min, c.desired, c.max),
        );
    }
    if c.max > MAX_TASKS_PER_JOB {
        bad(&format!("{field}.max"), format!("must be at most {MAX_TASKS_PER_JOB}"));
    }
}

fn validate_retry_policy(field: &str, p: &RetryPolicy, bad: &mut impl FnMut(&str, String)) {
    if p.retries() > 1000 {
        bad(&format!("{field}.retries"), "must be at most 1000".into());
    }
    let delays: &[(&str, u64)] = match p {
        RetryPolicy::Immediate { .. } => &[],
        RetryPolicy::Delayed { initial_delay_ms, delay_ms, .. } => {
            &[("delayed.initial_delay_ms", *initial_delay_ms), ("delayed.delay_ms", *delay_ms)]
        }
        RetryPolicy::ExponentialBackOff { initial_delay_ms, max_delay_interval_ms, .. } => &[
            ("exponential_back_off.initial_delay_ms", *initial_delay_ms),
            ("exponential_back_off.max_delay_interval_ms", *max_delay_interval_ms),
        ],
    };
    for (name, delay) in delays {
        if *delay > MAX_RETRY_DELAY_MS {
            bad(&format!("{field}.{name}"), format!("must be at most {MAX_RETRY_DELAY_MS} (7 days)"));
        }
    }
    if let RetryPolicy::ExponentialBackOff { initial_delay_ms, max_delay_interval_ms, .. } = p {
        if *initial_delay_ms == 0 {
            bad(&format!("{field}.exponential_back_off.initial_delay_ms"), "must be > 0".into());
        }
        if max_delay_interval_ms < initial_delay_ms {
            bad(&format!("{field}.exponential_back_off.max_delay_interval_ms"), "must be >= initial_delay_ms".into());
        }
    }
}

/// User attributes: bounded, and the `titus.` prefix is reserved for the platform.
pub fn validate_attributes(attributes: &BTreeMap<String, String>, bad: &mut impl FnMut(&str, String)) {
    if attributes.len() > MAX_ATTRIBUTES {
        bad("attributes", format!("must have at most {MAX_ATTRIBUTES} entries"));
    }
    for (k, val) in attributes {
        if k.is_empty() || k.len() > 256 {
            bad(&format!("attributes[{k:?}]"), "key must be 1-256 bytes".into());
        } else if k.to_ascii_lowercase().starts_with("titus.") {
            bad(&format!("attributes.{k}"), "keys starting \"titus.\" are reserved".into());
        } else if val.len() > MAX_VALUE_LEN {
            bad(&format!("attributes.{k}"), format!("value must be at most {MAX_VALUE_LEN} bytes"));
        }
    }
}

/// The constraint names Titus understood (case-insensitive), plus `host.<attribute>` matches.
pub fn validate_constraint(name: &str, value: &str) -> Result<(), String> {
    let lower = name.to_ascii_lowercase();
    match lower.as_str() {
        "uniquehost" | "exclusivehost" | "zonebalance" => {
            if matches!(value.to_ascii_lowercase().as_str(), "true" | "false") {
                Ok(())
            } else {
                Err("value must be true or false".into())
            }
        }
        "availabilityzone" | "machinetype" | "machineid" => {
            if value.is_empty() {
                Err("value must not be empty".into())
            } else {
                Ok(())
            }
        }
        _ if lower.starts_with("host.") && lower.len() > 5 => Ok(()),
        _ => Err("unknown constraint (known: uniqueHost, exclusiveHost, zoneBalance, availabilityZone, machineType, machineId, host.<attribute>)".into()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum JobState {
    Accepted,
    KillInitiated,
    Finished,
}

impl JobState {
    pub fn parse(s: &str) -> Option<JobState> {
        match s.trim().trim_start_matches("JOB_").replace('_', "").to_ascii_lowercase().as_str() {
            "accepted" => Some(JobState::Accepted),
            "killinitiated" => Some(JobState::KillInitiated),
            "finished" => Some(JobState::Finished),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub state: JobState,
    pub reason_code: String,
    pub reason_message: String,
    pub timestamp_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub descriptor: JobDescriptor,
    pub status: JobStatus,
    pub status_history: Vec<JobStatus>,
    /// Its spec version and rolling updates. Absent from records of jobs never updated (older
    /// replicas read them unchanged).
    #[serde(default, skip_serializing_if = "crate::deployment::Rollout::is_empty")]
    pub rollout: crate::deployment::Rollout,
    /// When its tasks were last evicted (voluntary disruptions), newest last, for its budget's
    /// rate limit; at most that limit's number, or none when it sets no rate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evictions_ms: Vec<i64>,
}

impl Job {
    /// The container a task of spec `version` runs: the job's current one, or the previous one
    /// for an old task while a deployment replaces it.
    pub fn container_of(&self, version: u32) -> &Container {
        match self.rollout.active() {
            Some(d) if version == d.from_version && version != self.rollout.version => {
                d.previous.as_ref().unwrap_or(&self.descriptor.container)
            }
            _ => &self.descriptor.container,
        }
    }

    /// What a task of spec `version` needs on an agent (the resources of [`Job::container_of`]).
    pub fn resources_of(&self, version: u32) -> ResourceDimension {
        self.container_of(version).resources.as_dimension()
    }

    pub fn set_status(&mut self, status: JobStatus) {
        let previous = std::mem::replace(&mut self.status, status);
        self.status_history.push(previous);
    }
}

/// Valid descriptors for tests (the control plane's unit tests use them too).
#[doc(hidden)]
pub mod fixtures {
    use super::*;

    pub fn batch_descriptor(size: u32) -> JobDescriptor {
        JobDescriptor {
            owner_email: "team@example.com".into(),
            application_name: "app".into(),
            capacity_group: DEFAULT_CAPACITY_GROUP.into(),
            job_group_info: JobGroupInfo::default(),
            attributes: BTreeMap::new(),
            container: Container {
                resources: ContainerResources {
                    cpu: 1.0,
                    memory_mb: 512,
                    disk_mb: 1024,
                    network_mbps: 128,
                    ..Default::default()
                },
                image: Image { name: "titus/busybox".into(), tag: Some("latest".into()), digest: None },
                ..Default::default()
            },
            job_type: JobType::Batch {
                size,
                runtime_limit_sec: 0,
                retry_policy: RetryPolicy::Immediate { retries: 2 },
                retry_on_runtime_limit: false,
            },
            disruption_budget: DisruptionBudget::default(),
        }
    }

    pub fn service_descriptor(min: u32, desired: u32, max: u32) -> JobDescriptor {
        JobDescriptor {
            job_type: JobType::Service {
                capacity: Capacity { min, desired, max },
                enabled: true,
                retry_policy: RetryPolicy::Immediate { retries: 0 },
                processes: ServiceJobProcesses::default(),
            },
            ..batch_descriptor(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn repeated_fields_and_the_whole_job_are_bounded() {
        let mut d = batch_descriptor(1);
        d.container.env = (0..=MAX_ENV).map(|i| (format!("V{i}"), "x".into())).collect();
        let v = d.validate().unwrap_err();
        assert!(v.iter().any(|v| v.field == "container.env" && v.description.contains("at most 500")), "{v:?}");
        let mut d = batch_descriptor(1);
        d.container.hard_constraints = (0..=MAX_CONSTRAINTS).map(|i| (format!("host.a{i}"), "x".into())).collect();
        let v = d.validate().unwrap_err();
        assert!(v.iter().any(|v| v.field == "container.hard_constraints"), "{v:?}");
        // Every field within its own bound, the whole over 256 KiB: refused, naming the largest.
        let mut d = batch_descriptor(1);
        d.container.env = (0..70).map(|i| (format!("V{i}"), "x".repeat(MAX_VALUE_LEN))).collect();
        d.attributes = (0..10).map(|i| (format!("a{i}"), "y".repeat(MAX_VALUE_LEN))).collect();
        assert!(d.validate().is_ok());
        let v = d.check_size(DEFAULT_MAX_JOB_BYTES).unwrap_err();
        assert_eq!(v[0].field, "container.env");
        assert!(v[0].description.contains("over the 262144-byte limit"), "{v:?}");
        let (total, _, env) = d.encoded_size();
        assert!(total > env && env > 70 * MAX_VALUE_LEN, "{total} {env}");
        assert!(batch_descriptor(1).check_size(DEFAULT_MAX_JOB_BYTES).is_ok());
    }

    #[test]
    fn security_profiles_name_the_field_they_refuse() {
        let mut d = batch_descriptor(1);
        d.container.security_profile = SecurityProfile {
            security_groups: vec!["sg-0123abcd".into(), "sg-0123456789abcdef0".into()],
            iam_role: "arn:aws:iam::123456789012:role/path/titus-app".into(),
            ..Default::default()
        };
        assert_eq!(d.validate(), Ok(()));
        assert_eq!(d.container.security_profile.role_name(), Some("titus-app"));
        let cases: &[(&str, &[&str], &str)] = &[
            ("", &["sg-XYZ"], "container.security_profile.security_groups[0]"),
            ("", &["sg-0123abcd", "sg-0123abcd"], "container.security_profile.security_groups[1]"),
            ("role/app", &[], "container.security_profile.iam_role"),
            ("arn:aws:iam::12345:role/app", &[], "container.security_profile.iam_role"),
            ("arn:aws:s3::123456789012:role/app", &[], "container.security_profile.iam_role"),
            ("arn:aws:iam::123456789012:user/app", &[], "container.security_profile.iam_role"),
            ("arn:aws:iam::123456789012:role/", &[], "container.security_profile.iam_role"),
            ("arn:aws:iam::123456789012:role/a b", &[], "container.security_profile.iam_role"),
        ];
        for (role, sgs, field) in cases {
            let mut d = batch_descriptor(1);
            d.container.security_profile.iam_role = role.to_string();
            d.container.security_profile.security_groups = sgs.iter().map(|s| s.to_string()).collect();
            let v = d.validate().unwrap_err();
            assert!(v.iter().any(|v| v.field == *field), "{role} {sgs:?}: {v:?}");
        }
        let mut d = batch_descriptor(1);
        d.container.security_profile.security_groups =
            (0..=MAX_SECURITY_GROUPS).map(|i| format!("sg-{i:08x}")).collect();
        let v = d.validate().unwrap_err();
        assert!(v.iter().any(|v| v.field == "container.security_profile.security_groups"), "{v:?}");
        // A huge list is refused for its length at once, not checked pairwise.
        d.container.security_profile.security_groups = vec!["sg-0123abcd".to_string(); 300_000];
        let v = d.validate().unwrap_err();
        assert!(v.iter().any(|v| v.field == "container.security_profile.security_groups"), "{v:?}");
        assert!(v.len() <= MAX_SECURITY_GROUPS + 1, "{} violations", v.len());
        // A record without a profile reads as one with an empty profile, and writes none.
        let json = serde_json::to_string(&batch_descriptor(1).container).unwrap();
        assert!(!json.contains("security_profile"), "{json}");
    }

    #[test]
    fn valid_descriptors_pass() {
        assert_eq!(batch_descriptor(3).validate(), Ok(()));
        assert_eq!(service_descriptor(1, 2, 3).validate(), Ok(()));
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut d = batch_descriptor(0);
        d.owner_email = "nobody".into();
        d.container.resources.cpu = 0.0;
        d.container.image.digest = Some("sha256:abc".into());
        d.attributes.insert("titus.agent".into(), "x".into());
        d.container.hard_constraints.insert("nearTheMoon".into(), "yes".into());
        d.container.env.insert("1BAD".into(), "x".into());
        let fields: Vec<String> = d.validate().unwrap_err().into_iter().map(|v| v.field).collect();
        assert_eq!(
            fields,
            vec![
                "owner.team_email",
                "attributes.titus.agent",
                "container.resources.cpu",
                "container.image",
                "container.env[\"1BAD\"]",
                "container.hard_constraints.nearTheMoon",
                "batch.size"
            ]
        );
        let bad_capacity = service_descriptor(3, 2, 1).validate().unwrap_err();
        assert_eq!(bad_capacity[0].field, "service.capacity");
    }

    /// Durations the lifecycle does arithmetic on are bounded at the edge: 2^62 s once made every
    /// leader's lifecycle panic on overflow, and 2^64-1 killed tasks at once.
    #[test]
    fn durations_are_bounded() {
        let fields = |d: JobDescriptor| -> Vec<String> {
            d.validate().err().unwrap_or_default().into_iter().map(|v| v.field).collect()
        };
        for limit in [MAX_RUNTIME_LIMIT_SEC + 1, 1 << 62, u64::MAX] {
            let mut d = batch_descriptor(1);
            if let JobType::Batch { runtime_limit_sec, .. } = &mut d.job_type {
                *runtime_limit_sec = limit;
            }
            assert_eq!(fields(d), vec!["batch.runtime_limit_sec"], "{limit}");
        }
        let mut d = batch_descriptor(1);
        if let JobType::Batch { runtime_limit_sec, .. } = &mut d.job_type {
            *runtime_limit_sec = MAX_RUNTIME_LIMIT_SEC;
        }
        assert!(fields(d).is_empty());

        let with_policy = |p: RetryPolicy| {
            let mut d = service_descriptor(0, 1, 1);
            if let JobType::Service { retry_policy, .. } = &mut d.job_type {
                *retry_policy = p;
            }
            fields(d)
        };
        let huge = i64::MAX as u64;
        assert_eq!(
            with_policy(RetryPolicy::Delayed { initial_delay_ms: huge, delay_ms: 5, retries: 1 }),
            vec!["service.retry_policy.delayed.initial_delay_ms"]
        );
        assert_eq!(
            with_policy(RetryPolicy::ExponentialBackOff {
                initial_delay_ms: 10,
                max_delay_interval_ms: u64::MAX,
                retries: 1
            }),
            vec!["service.retry_policy.exponential_back_off.max_delay_interval_ms"]
        );
        assert!(with_policy(RetryPolicy::Delayed {
            initial_delay_ms: MAX_RETRY_DELAY_MS,
            delay_ms: MAX_RETRY_DELAY_MS,
            retries: 1
        })
        .is_empty());
    }

    #[test]
    fn retry_delays_follow_the_policy() {
        assert_eq!(RetryPolicy::Immediate { retries: 3 }.delay_ms(2), 0);
        let d = RetryPolicy::Delayed { initial_delay_ms: 100, delay_ms: 1000, retries: 3 };
        assert_eq!((d.delay_ms(1), d.delay_ms(2), d.delay_ms(3)), (100, 1000, 1000));
        let e = RetryPolicy::ExponentialBackOff { initial_delay_ms: 100, max_delay_interval_ms: 500, retries: 9 };
        assert_eq!(
            (e.delay_ms(1), e.delay_ms(2), e.delay_ms(3), e.delay_ms(4), e.delay_ms(60)),
            (100, 200, 400, 500, 500)
        );
    }

    fn arb_string() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-zA-Z0-9._@: /-]{0,12}", any::<String>()]
    }

    proptest! {
        /// Random descriptors never panic validation; whatever it accepts really is within bounds.
        #[test]
        fn random_descriptors_never_panic(
            cpu in prop_oneof![any::<f64>(), -2.0..64.0f64],
            mem in any::<u32>(), size in any::<u32>(), min in any::<u32>(), desired in any::<u32>(), max in any::<u32>(),
            name in arb_string(), email in arb_string(), image in arb_string(), tag in proptest::option::of(arb_string()),
            digest in proptest::option::of(arb_string()), attr_key in arb_string(), constraint in arb_string(), pct in any::<f64>(),
            batch in any::<bool>(), retries in any::<u32>(), initial in any::<u64>(), max_delay in any::<u64>(),
        ) {
            let mut d = batch_descriptor(1);
            d.application_name = name;
            d.owner_email = email;
            d.container.resources.cpu = cpu;
            d.container.resources.memory_mb = mem;
            d.container.image = Image { name: image, tag, digest };
            d.attributes.insert(attr_key, "v".into());
            d.container.soft_constraints.insert(constraint, "true".into());
            d.disruption_budget.availability_percentage_limit = pct;
            let retry_policy = RetryPolicy::ExponentialBackOff { initial_delay_ms: initial, max_delay_interval_ms: max_delay, retries };
            d.job_type = if batch {
                JobType::Batch { size, runtime_limit_sec: 0, retry_policy, retry_on_runtime_limit: false }
            } else {
                JobType::Service { capacity: Capacity { min, desired, max }, enabled: true, retry_policy, processes: ServiceJobProcesses::default() }
            };
            if d.validate().is_ok() {
                prop_assert!(d.container.resources.cpu > 0.0 && d.container.resources.memory_mb > 0);
                prop_assert!(d.wanted_tasks() <= MAX_TASKS_PER_JOB);
                let _ = d.retry_policy().delay_ms(retries);
            }
        }
    }
}
