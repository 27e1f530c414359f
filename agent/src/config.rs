//! The agent's configuration: one typed struct from a TOML file and/or flags. Resources default to
//! what the host has; overrides let several agents share one host in tests.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentConfig {
    /// Unique in the cluster; labels every container this agent runs.
    pub agent_id: String,
    /// Api addresses of any control-plane replicas; the agent finds the leader.
    pub servers: Vec<String>,
    /// Docker socket path; default: the local daemon's (DOCKER_HOST or /var/run/docker.sock).
    #[serde(default)]
    pub docker_socket: Option<String>,
    #[serde(default)]
    pub instance_group: String,
    /// Offered resources; 0 means "what the host has".
    #[serde(default)]
    pub cpu: f64,
    #[serde(default)]
    pub memory_mb: u32,
    #[serde(default = "default_disk_mb")]
    pub disk_mb: u32,
    #[serde(default = "default_network_mbps")]
    pub network_mbps: u32,
    #[serde(default)]
    pub gpu: u32,
    /// zone, machineType, instanceId, host, ... (host defaults to the hostname).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Docker network every container joins; absent (the default): each job's containers get a
    /// bridge network of their own from `job-networks` (see [`crate::networks`]).
    #[serde(default)]
    pub network: Option<String>,
    /// The IPv4 pool per-job networks are cut from, in /24s (ignored when `network` is set).
    #[serde(default = "default_job_networks")]
    pub job_networks: String,
    /// The most processes (threads included) one container may hold: a fork bomb stays inside it.
    #[serde(default = "default_pids_limit")]
    pub pids_limit: i64,
    /// A container's output kept by Docker: at most this many files of `log-max-mb` each.
    #[serde(default = "default_log_max_mb")]
    pub log_max_mb: u32,
    #[serde(default = "default_log_max_files")]
    pub log_max_files: u32,
    /// The admin HTTP port (/metrics, /healthz, /readyz); absent: not served.
    #[serde(default)]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// `plain` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// Plaintext to the control plane, which only a cluster in insecure mode accepts: local
    /// development only.
    #[serde(default)]
    pub insecure: bool,
    /// Mutual TLS: the cluster CA, and this agent's certificate (naming `agent/<agent-id>`) and
    /// key; replaced files are used from the next connection on.
    #[serde(default)]
    pub tls_ca: Option<std::path::PathBuf>,
    #[serde(default)]
    pub tls_cert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub tls_key: Option<std::path::PathBuf>,
    /// A token of the `enroll` role: when tls-cert and tls-key do not exist yet, the agent makes a
    /// key, has the control plane sign a certificate for its agent-id, and writes both there. For
    /// instances launched by the capacity manager; better given as TITUS_ENROLL_TOKEN.
    #[serde(default)]
    pub enroll_token: Option<String>,
    /// When the control plane forgets a task whose container still runs, it is stopped with
    /// SIGTERM and this long to exit before SIGKILL, then removed.
    #[serde(default = "default_forget_grace_secs")]
    pub forget_grace_secs: i64,
    /// What a task is in AWS: its IAM role's credentials and EC2-style instance metadata
    /// (`[aws]`; see [`crate::identity`]).
    #[serde(default)]
    pub aws: AwsIdentityConfig,
    /// A task's output kept after the control plane forgets it and its container goes
    /// (`[finished-logs]`; see [`crate::taskio`]).
    #[serde(default)]
    pub finished_logs: FinishedLogsConfig,
}

/// The `[finished-logs]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct FinishedLogsConfig {
    /// Where; each agent keeps its own folder in it, named by its agent id.
    pub dir: std::path::PathBuf,
    /// The last this much of each task's output is kept (0: none is kept).
    pub max_mb_per_task: u32,
    /// The oldest go first past this much in all.
    pub max_total_mb: u32,
    /// Each is kept this long.
    pub max_age_hours: u32,
}

impl Default for FinishedLogsConfig {
    fn default() -> Self {
        FinishedLogsConfig {
            dir: "/var/lib/titus-agent/logs".into(),
            max_mb_per_task: 10,
            max_total_mb: 1024,
            max_age_hours: 24,
        }
    }
}

impl FinishedLogsConfig {
    fn check(&self) -> Result<()> {
        if self.dir.as_os_str().is_empty() {
            return Err(Error::Config("finished-logs.dir: must not be empty".into()));
        }
        if self.max_mb_per_task > 1024 || self.max_total_mb > 1_048_576 || !(1..=8760).contains(&self.max_age_hours) {
            return Err(Error::Config(
                "finished-logs: max-mb-per-task at most 1024, max-total-mb at most 1048576, max-age-hours 1 to 8760"
                    .into(),
            ));
        }
        Ok(())
    }

    /// This agent's settings, in its own folder.
    pub fn for_agent(&self, agent_id: &str) -> crate::taskio::FinishedLogs {
        crate::taskio::FinishedLogs {
            dir: self.dir.join(agent_id),
            max_bytes_per_task: u64::from(self.max_mb_per_task) << 20,
            max_total_bytes: u64::from(self.max_total_mb) << 20,
            max_age: std::time::Duration::from_secs(u64::from(self.max_age_hours) * 3600),
            last_prune: Default::default(),
        }
    }
}

/// The `[aws]` section: STS for tasks' IAM roles, and the metadata proxy that serves them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AwsIdentityConfig {
    /// The region STS is called in and tasks are told (EC2_REGION); empty: derived from the
    /// `zone` attribute (us-east-1a → us-east-1), and no IAM role can be served without one.
    pub region: String,
    /// An AWS-compatible endpoint (a moto server) instead of AWS's own.
    pub endpoint_url: String,
    /// The roles this agent may pass to a task: exact ARNs, or prefixes ending in `*`. Empty: none
    /// — a task asking for a role then fails at start, naming this setting.
    pub allowed_roles: Vec<String>,
    /// How long each AssumeRole's credentials last (STS: 900 to 43,200).
    pub session_secs: u32,
    /// Credentials are assumed again this long before they expire.
    pub refresh_before_secs: u32,
    /// Serve the metadata proxy (container credentials endpoint and instance metadata).
    pub metadata: bool,
    /// Its port on the host; 0: any free port (containers reach it through the routes below).
    pub metadata_port: u16,
    /// Route 169.254.169.254:80 and 169.254.170.2:80 from each job network to the proxy with an
    /// iptables REDIRECT rule (needs root). Off: the host's operator routes them.
    pub metadata_route: bool,
}

impl Default for AwsIdentityConfig {
    fn default() -> Self {
        AwsIdentityConfig {
            region: String::new(),
            endpoint_url: String::new(),
            allowed_roles: Vec::new(),
            session_secs: 3600,
            refresh_before_secs: 300,
            metadata: true,
            metadata_port: 0,
            metadata_route: true,
        }
    }
}

impl AwsIdentityConfig {
    fn check(&self) -> Result<()> {
        if !(900..=43_200).contains(&self.session_secs) {
            return Err(Error::Config("aws.session-secs: must be between 900 and 43200 (STS's bounds)".into()));
        }
        if self.refresh_before_secs == 0 || self.refresh_before_secs >= self.session_secs {
            return Err(Error::Config("aws.refresh-before-secs: must be > 0 and below aws.session-secs".into()));
        }
        titus_aws::check_endpoint_url(&self.endpoint_url)
            .map_err(|e| Error::Config(format!("aws.endpoint-url: {e}")))?;
        for (i, role) in self.allowed_roles.iter().enumerate() {
            let exact = !role.ends_with('*');
            if role.is_empty() || role.len() > 2048 || (exact && !looks_like_role_arn(role)) {
                return Err(Error::Config(format!(
                    "aws.allowed-roles[{i}]: {role:?} must be a role ARN or an ARN prefix ending in '*'"
                )));
            }
        }
        Ok(())
    }

    /// Whether the agent may pass role `arn` to a task.
    pub fn allows(&self, arn: &str) -> bool {
        self.allowed_roles.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => arn.starts_with(prefix),
            None => arn == pattern,
        })
    }
}

/// An exact allowed role must look like a role ARN (the control plane checks a job's role fully).
fn looks_like_role_arn(arn: &str) -> bool {
    arn.starts_with("arn:") && arn.contains(":iam::") && arn.contains(":role/")
}

/// Inside Docker's default pools' range (172.17.0.0/12) but far from the first networks it hands
/// out; a subnet Docker reports as overlapping another network is skipped.
pub fn default_job_networks() -> String {
    "172.29.0.0/16".into()
}

pub fn default_pids_limit() -> i64 {
    1024
}

pub fn default_log_max_mb() -> u32 {
    10
}

pub fn default_log_max_files() -> u32 {
    3
}

fn default_forget_grace_secs() -> i64 {
    10
}

fn default_log_format() -> String {
    "plain".into()
}

fn default_disk_mb() -> u32 {
    100_000
}

fn default_network_mbps() -> u32 {
    1_000
}

impl AgentConfig {
    pub fn from_file(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Fills host-detected resources and attributes, then checks every setting.
    pub fn finish(mut self) -> Result<AgentConfig> {
        if self.agent_id.is_empty() || !self.agent_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(Error::Config(format!(
                "agent-id: {:?} must be letters, digits, '-', '_' or '.'",
                self.agent_id
            )));
        }
        if self.servers.is_empty() {
            return Err(Error::Config("servers: at least one control-plane api address is required".into()));
        }
        if let Some(s) = self.servers.iter().find(|s| !s.contains(':')) {
            return Err(Error::Config(format!("servers: {s:?} is not host:port")));
        }
        let tls = [("tls-ca", &self.tls_ca), ("tls-cert", &self.tls_cert), ("tls-key", &self.tls_key)];
        if self.insecure {
            if let Some((name, _)) = tls.iter().find(|(_, f)| f.is_some()) {
                return Err(Error::Config(format!("{name}: set together with insecure; choose one")));
            }
        } else if let Some((name, _)) = tls.iter().find(|(_, f)| f.is_none()) {
            return Err(Error::Config(format!(
                "{name}: required (TLS is on unless insecure = true, for a local development cluster only)"
            )));
        }
        if !matches!(self.log_format.as_str(), "plain" | "json") {
            return Err(Error::Config(format!("log-format: {:?} is not one of plain, json", self.log_format)));
        }
        if self.cpu == 0.0 {
            self.cpu = std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0);
        }
        if !(0..=3600).contains(&self.forget_grace_secs) {
            return Err(Error::Config("forget-grace-secs: must be between 0 and 3600".into()));
        }
        if self.network.is_none() {
            crate::networks::SubnetPool::parse(&self.job_networks)
                .map_err(|e| Error::Config(format!("job-networks: {e}")))?;
        }
        if !(32..=4_194_304).contains(&self.pids_limit) {
            return Err(Error::Config("pids-limit: must be between 32 and 4194304".into()));
        }
        if !(1..=10_240).contains(&self.log_max_mb) {
            return Err(Error::Config("log-max-mb: must be between 1 and 10240".into()));
        }
        self.aws.check()?;
        self.finished_logs.check()?;
        if !(1..=100).contains(&self.log_max_files) {
            return Err(Error::Config("log-max-files: must be between 1 and 100".into()));
        }
        if !self.cpu.is_finite() || self.cpu < 0.0 {
            return Err(Error::Config("cpu: must be > 0".into()));
        }
        if self.memory_mb == 0 {
            self.memory_mb = host_memory_mb().unwrap_or(1024);
        }
        if !self.attributes.contains_key("host") {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into());
            self.attributes.insert("host".into(), host);
        }
        Ok(self)
    }
}

fn host_memory_mb() -> Option<u32> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some((kb / 1024) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfig {
        toml::from_str("agent-id = \"a1\"\nservers = [\"127.0.0.1:8001\"]\ninsecure = true").unwrap()
    }

    #[test]
    fn template_parses_and_finishes() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let c = AgentConfig::from_file(&path).unwrap().finish().unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(c.log_format, "plain");
    }

    #[test]
    fn host_resources_fill_the_gaps_and_bad_settings_are_named() {
        let c = config().finish().unwrap();
        assert!(c.cpu >= 1.0 && c.memory_mb > 0);
        assert!(c.attributes.contains_key("host"));
        let mut bad = config();
        bad.agent_id = "a b".into();
        assert!(bad.finish().unwrap_err().to_string().contains("agent-id"));
        let mut bad = config();
        bad.servers = vec!["nowhere".into()];
        assert!(bad.finish().unwrap_err().to_string().contains("servers"));
        assert!(toml::from_str::<AgentConfig>("agent-id = \"a\"\nservers = []\nbogus = 1").is_err());
        let mut bad = config();
        bad.job_networks = "172.29.0.0/25".into();
        assert!(bad.finish().unwrap_err().to_string().contains("job-networks: prefix"));
        let mut bad = config();
        bad.pids_limit = 0;
        assert!(bad.finish().unwrap_err().to_string().contains("pids-limit"));
        let mut bad = config();
        bad.log_max_files = 0;
        assert!(bad.finish().unwrap_err().to_string().contains("log-max-files"));
        let mut bad = config();
        bad.aws.session_secs = 60;
        assert!(bad.finish().unwrap_err().to_string().contains("aws.session-secs"));
        let mut bad = config();
        bad.aws.allowed_roles = vec!["role/app".into()];
        assert!(bad.finish().unwrap_err().to_string().contains("aws.allowed-roles[0]"));
        let mut c = config();
        c.aws.allowed_roles =
            vec!["arn:aws:iam::123456789012:role/exact".into(), "arn:aws:iam::123456789012:role/titus-*".into()];
        let c = c.finish().unwrap();
        assert!(c.aws.allows("arn:aws:iam::123456789012:role/exact"));
        assert!(c.aws.allows("arn:aws:iam::123456789012:role/titus-web"));
        assert!(!c.aws.allows("arn:aws:iam::123456789012:role/exact2"));
        assert!(!c.aws.allows("arn:aws:iam::999999999999:role/titus-web"));
        assert!(!config().finish().unwrap().aws.allows("arn:aws:iam::123456789012:role/exact"));
        let mut bad = config();
        bad.insecure = false;
        assert!(bad.finish().unwrap_err().to_string().contains("tls-ca: required"));
        let mut bad = config();
        bad.tls_ca = Some("/ca.pem".into());
        assert!(bad.finish().unwrap_err().to_string().contains("tls-ca: set together with insecure"));
    }
}
