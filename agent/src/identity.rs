//! What a task is to AWS and to the code in its container, as on Titus: the credentials of its
//! job's IAM role, EC2-style instance metadata, and Titus's environment variables.
//!
//! The agent assumes a task's role (STS AssumeRole, session named after the task, tagged with its
//! job and task ids) before its container is created, and again `refresh-before-secs` before the
//! credentials expire. A role this agent may not pass (`aws.allowed-roles`) or that STS refuses
//! fails the task at start with the reason; it never starts a container without the credentials it
//! asked for.
//!
//! The [`crate::metadata`] proxy serves them to the container only: it tells containers apart by
//! their source address, which the agent assigns itself on the job's network (so it is known, and
//! registered here, before the container's first instruction runs), and the container credentials
//! endpoint also wants the per-task token the container was given in its environment.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use titus_aws::{AwsError, AwsSettings, RoleCredentials, Sts};
use titus_proto as pb;

use crate::config::AwsIdentityConfig;

/// Where containers reach the proxy, inside their network (routed to it on the host).
pub const IMDS_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const CREDENTIALS_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 2);
/// The container credentials endpoint's path (the AWS SDKs' `AWS_CONTAINER_CREDENTIALS_FULL_URI`).
pub const CREDENTIALS_PATH: &str = "/v1/credentials";
/// IMDSv2 session tokens one task may hold at once; the oldest goes first.
const MAX_SESSION_TOKENS: usize = 64;
/// Retry of a failed refresh, while the credentials held still work.
const REFRESH_RETRY: Duration = Duration::from_secs(5);

/// Labels that let a restarted agent know a container again (its address and token come from
/// the container itself).
pub const LABEL_ROLE: &str = "titus.iam.role";
pub const LABEL_IMDS_V1: &str = "titus.imds.v1";
pub const LABEL_APP: &str = "titus.app";
pub const ENV_TOKEN: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN";

/// One task's identity, as the proxy serves it.
pub struct TaskIdentity {
    pub task_id: String,
    pub job_id: String,
    pub ip: Ipv4Addr,
    /// The IAM role ARN; None: the task has no credentials to get.
    pub role: Option<String>,
    pub allow_imds_v1: bool,
    /// What the container credentials endpoint wants in `Authorization`.
    pub auth_token: String,
    credentials: RwLock<Option<(RoleCredentials, i64)>>,
    /// IMDSv2 session tokens and when each expires.
    sessions: Mutex<Vec<(String, Instant)>>,
    refresher: Mutex<Option<tokio::task::AbortHandle>>,
}

impl TaskIdentity {
    /// The role's credentials and when they were obtained (ms since the epoch), unless expired.
    pub fn credentials(&self) -> Option<(RoleCredentials, i64)> {
        let held = self.credentials.read().unwrap_or_else(|e| e.into_inner()).clone()?;
        (held.0.expiration_ms > now_ms()).then_some(held)
    }

    /// The role's name (the ARN's last path segment).
    pub fn role_name(&self) -> Option<&str> {
        self.role.as_deref().and_then(|r| r.rsplit('/').next())
    }

    /// A new IMDSv2 session token valid for `ttl`.
    pub fn open_session(&self, ttl: Duration) -> String {
        let token = random_token();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        sessions.retain(|(_, until)| *until > now);
        if sessions.len() >= MAX_SESSION_TOKENS {
            sessions.remove(0);
        }
        sessions.push((token.clone(), now + ttl));
        token
    }

    /// Whether `token` is one of this task's live IMDSv2 session tokens.
    pub fn session_valid(&self, token: &str) -> bool {
        let now = Instant::now();
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.iter().any(|(t, until)| *until > now && constant_time_eq(t.as_bytes(), token.as_bytes()))
    }
}

impl Drop for TaskIdentity {
    fn drop(&mut self) {
        if let Some(h) = self.refresher.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
    }
}

/// Why a task cannot be given its identity: it fails at start with this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// STS did not answer: not the job's fault (`transientSystemError`, not counted against its
    /// retries). Otherwise the role may not be had (`failed`).
    pub transient: bool,
    pub why: String,
}

impl Refused {
    fn because(why: String) -> Refused {
        Refused { transient: false, why }
    }

    /// The task's reason code.
    pub fn reason_code(&self) -> &'static str {
        if self.transient {
            "transientSystemError"
        } else {
            "failed"
        }
    }
}

/// Every task identity this agent serves, by container address.
pub struct Identities {
    config: AwsIdentityConfig,
    sts: Option<Sts>,
    pub zone: String,
    pub region: String,
    by_ip: RwLock<HashMap<Ipv4Addr, Arc<TaskIdentity>>>,
}

impl Identities {
    pub async fn new(config: &AwsIdentityConfig, attributes: &BTreeMap<String, String>) -> Arc<Identities> {
        let zone = attributes.get("zone").cloned().unwrap_or_default();
        let region = region(config, attributes);
        let sts = if region.is_empty() {
            None
        } else {
            let settings = AwsSettings {
                region: region.clone(),
                endpoint_url: Some(config.endpoint_url.clone()).filter(|u| !u.is_empty()),
                max_attempts: 3,
                calls_per_second: 20.0,
                attempt_timeout: Duration::from_secs(5),
            };
            Some(Sts::connect(&settings).await)
        };
        Arc::new(Identities { config: config.clone(), sts, zone, region, by_ip: RwLock::default() })
    }

    /// The identity of the container at `ip`, if it is one of this agent's tasks.
    pub fn get(&self, ip: Ipv4Addr) -> Option<Arc<TaskIdentity>> {
        self.by_ip.read().unwrap_or_else(|e| e.into_inner()).get(&ip).cloned()
    }

    /// Makes task `task_id` known at `ip`: assumes its role first (and keeps refreshing it) when it
    /// has one. Refused: the role may not be passed, or STS would not give its credentials.
    pub async fn admit(
        self: &Arc<Self>,
        task_id: &str,
        job_id: &str,
        ip: Ipv4Addr,
        role: Option<&str>,
        allow_imds_v1: bool,
        auth_token: String,
    ) -> Result<Arc<TaskIdentity>, Refused> {
        let role = role.filter(|r| !r.is_empty()).map(str::to_string);
        let credentials = match &role {
            None => None,
            Some(arn) => Some((self.assume(task_id, job_id, arn).await?, now_ms())),
        };
        let identity = Arc::new(TaskIdentity {
            task_id: task_id.to_string(),
            job_id: job_id.to_string(),
            ip,
            role,
            allow_imds_v1,
            auth_token,
            credentials: RwLock::new(credentials),
            sessions: Mutex::default(),
            refresher: Mutex::default(),
        });
        if identity.role.is_some() {
            let handle = tokio::spawn(refresh(self.clone(), Arc::downgrade(&identity))).abort_handle();
            *identity.refresher.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        }
        let replaced = self.by_ip.write().unwrap_or_else(|e| e.into_inner()).insert(ip, identity.clone());
        if let Some(old) = replaced.filter(|old| old.task_id != task_id) {
            tracing::warn!(task_id, previous = %old.task_id, %ip, "address taken over from a task that was not forgotten");
        }
        tracing::info!(task_id, %ip, role = identity.role.as_deref().unwrap_or(""), "task identity registered");
        Ok(identity)
    }

    /// Stops serving task `task_id` (its container is gone).
    pub fn forget(&self, task_id: &str) {
        self.by_ip.write().unwrap_or_else(|e| e.into_inner()).retain(|_, id| id.task_id != task_id);
    }

    /// AssumeRole of `arn` for a task, when this agent may pass it.
    async fn assume(&self, task_id: &str, job_id: &str, arn: &str) -> Result<RoleCredentials, Refused> {
        if !self.config.allows(arn) {
            return Err(Refused::because(format!(
                "IAM role {arn} may not be passed by this agent (not in its aws.allowed-roles)"
            )));
        }
        let Some(sts) = &self.sts else {
            return Err(Refused::because(format!(
                "IAM role {arn}: this agent has no AWS region (aws.region, or a zone attribute) to call STS in"
            )));
        };
        let tags = [("TitusJobId".to_string(), job_id.to_string()), ("TitusTaskId".to_string(), task_id.to_string())];
        let session_secs = i32::try_from(self.config.session_secs).unwrap_or(3600);
        sts.assume_role(arn, &session_name(task_id), &tags, session_secs).await.map_err(|e| match e {
            AwsError::Transient(e) => {
                Refused { transient: true, why: format!("IAM role {arn}: STS did not answer: {e}") }
            }
            AwsError::NotFound(e) | AwsError::Rejected(e) => {
                Refused::because(format!("IAM role {arn}: STS refused: {e}"))
            }
        })
    }
}

/// Keeps `identity`'s credentials fresh until it is dropped: assumed again `refresh-before-secs`
/// before they expire, retried every few seconds while the old ones still work.
async fn refresh(identities: Arc<Identities>, identity: Weak<TaskIdentity>) {
    let before = i64::from(identities.config.refresh_before_secs) * 1000;
    loop {
        let Some(id) = identity.upgrade() else { return };
        let expires = id.credentials.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(|c| c.0.expiration_ms);
        // At least the retry interval between two calls, whatever STS said: credentials shorter
        // than refresh-before-secs (a role whose maximum session is shorter) must not make a loop
        // of AssumeRole calls.
        let wait_ms = expires.map(|e| e - before - now_ms()).unwrap_or(0).max(REFRESH_RETRY.as_millis() as i64);
        drop(id);
        tokio::time::sleep(Duration::from_millis(wait_ms as u64)).await;
        let Some(id) = identity.upgrade() else { return };
        let Some(arn) = id.role.clone() else { return };
        match identities.assume(&id.task_id, &id.job_id, &arn).await {
            Ok(c) => {
                tracing::info!(task_id = %id.task_id, role = %arn, expires_ms = c.expiration_ms, "role credentials refreshed");
                *id.credentials.write().unwrap_or_else(|e| e.into_inner()) = Some((c, now_ms()));
            }
            Err(refused) => {
                tracing::warn!(task_id = %id.task_id, role = %arn, error = %refused.why, "refreshing role credentials failed; retrying");
                drop(id);
                tokio::time::sleep(REFRESH_RETRY).await;
            }
        }
    }
}

/// STS session names: 2-64 of `[\w+=,.@-]`; a task id fits, anything else is replaced.
fn session_name(task_id: &str) -> String {
    let name: String = task_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) { c } else { '_' })
        .take(64)
        .collect();
    if name.len() < 2 {
        format!("titus-{name}")
    } else {
        name
    }
}

/// The host's region: `aws.region`, or its zone attribute's.
pub fn region(config: &AwsIdentityConfig, attributes: &BTreeMap<String, String>) -> String {
    if !config.region.is_empty() {
        return config.region.clone();
    }
    region_of_zone(attributes.get("zone").map(String::as_str).unwrap_or(""))
}

/// us-east-1a → us-east-1; empty when `zone` does not end in a letter after a digit.
pub fn region_of_zone(zone: &str) -> String {
    let mut chars = zone.chars().rev();
    match (chars.next(), chars.next()) {
        (Some(l), Some(d)) if l.is_ascii_lowercase() && d.is_ascii_digit() => zone[..zone.len() - 1].to_string(),
        _ => String::new(),
    }
}

/// 32 random bytes, hex.
pub fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Titus's cluster name: app, app-stack, app-stack-detail (or app--detail without a stack).
pub fn cluster_name(app: &str, stack: &str, detail: &str) -> String {
    match (stack.is_empty(), detail.is_empty()) {
        (_, false) => format!("{app}-{stack}-{detail}"),
        (false, true) => format!("{app}-{stack}"),
        (true, true) => app.to_string(),
    }
}

/// Where the task's identity comes from, for its environment.
pub struct EnvContext<'a> {
    pub assign: &'a pb::TaskAssignment,
    pub ip: Option<Ipv4Addr>,
    pub zone: &'a str,
    pub region: &'a str,
    /// Set when the metadata proxy serves this container: its token.
    pub auth_token: Option<&'a str>,
    pub host_instance_id: &'a str,
}

/// The container's environment: Titus's job and resource variables first, the user's over them,
/// then what says who the task is (ids, address, credentials endpoint) over anything the user set,
/// so a job cannot pretend to be another task or point its SDKs elsewhere.
pub fn container_env(cx: &EnvContext<'_>) -> BTreeMap<String, String> {
    let a = cx.assign;
    let container = a.container.clone().unwrap_or_default();
    let group = a.job_group_info.clone().unwrap_or_default();
    let r = container.resources.unwrap_or_default();
    let image = container.image.unwrap_or_default();
    let app = &a.application_name;
    let cluster = cluster_name(app, &group.stack, &group.detail);
    let sequence = if group.sequence.is_empty() { "v000".to_string() } else { group.sequence.clone() };
    let mut env = BTreeMap::from([
        ("NETFLIX_APP".to_string(), app.clone()),
        ("NETFLIX_STACK".to_string(), group.stack.clone()),
        ("NETFLIX_DETAIL".to_string(), group.detail.clone()),
        ("NETFLIX_CLUSTER".to_string(), cluster.clone()),
        ("NETFLIX_AUTO_SCALE_GROUP".to_string(), format!("{cluster}-{sequence}")),
        ("TITUS_NUM_CPU".to_string(), format_cpu(r.cpu)),
        ("TITUS_NUM_MEM".to_string(), r.memory_mb.to_string()),
        ("TITUS_NUM_DISK".to_string(), r.disk_mb.to_string()),
        ("TITUS_NUM_NETWORK_BANDWIDTH".to_string(), r.network_mbps.to_string()),
        ("TITUS_NUM_GPU".to_string(), r.gpu.to_string()),
    ]);
    env.extend(container.env.clone());
    let profile = container.security_profile.unwrap_or_default();
    let mut system = vec![
        ("TITUS_TASK_ID", a.task_id.clone()),
        ("TITUS_TASK_INSTANCE_ID", a.task_id.clone()),
        ("TITUS_JOB_ID", a.job_id.clone()),
        ("EC2_INSTANCE_ID", a.task_id.clone()),
        ("TITUS_HOST_EC2_INSTANCE_ID", cx.host_instance_id.to_string()),
        ("TITUS_IMAGE_NAME", image.name.clone()),
    ];
    if !image.tag.is_empty() {
        system.push(("TITUS_IMAGE_TAG", image.tag.clone()));
    }
    if !image.digest.is_empty() {
        system.push(("TITUS_IMAGE_DIGEST", image.digest.clone()));
    }
    if let Some(ip) = cx.ip {
        system.push(("EC2_LOCAL_IPV4", ip.to_string()));
    }
    if !cx.zone.is_empty() {
        system.push(("EC2_AVAILABILITY_ZONE", cx.zone.to_string()));
    }
    if !cx.region.is_empty() {
        for name in ["EC2_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"] {
            system.push((name, cx.region.to_string()));
        }
    }
    if !profile.iam_role.is_empty() {
        system.push(("TITUS_IAM_ROLE", profile.iam_role.clone()));
    }
    if let Some(token) = cx.auth_token {
        system.push(("AWS_CONTAINER_CREDENTIALS_FULL_URI", format!("http://{CREDENTIALS_ADDRESS}{CREDENTIALS_PATH}")));
        system.push((ENV_TOKEN, token.to_string()));
    }
    env.extend(system.into_iter().map(|(k, v)| (k.to_string(), v)));
    env
}

/// 1.0 → "1", 0.5 → "0.5".
fn format_cpu(cpu: f64) -> String {
    if cpu.fract() == 0.0 && cpu.abs() < 1e15 {
        format!("{}", cpu as i64)
    } else {
        format!("{cpu}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment() -> pb::TaskAssignment {
        pb::TaskAssignment {
            task_id: "t-1".into(),
            job_id: "j-1".into(),
            application_name: "web".into(),
            job_group_info: Some(pb::JobGroupInfo { stack: "prod".into(), detail: "".into(), sequence: "v007".into() }),
            container: Some(pb::Container {
                resources: Some(pb::ContainerResources { cpu: 2.0, memory_mb: 512, ..Default::default() }),
                image: Some(pb::Image { name: "titus/busybox".into(), tag: "latest".into(), digest: String::new() }),
                env: [("TITUS_TASK_ID".to_string(), "spoofed".to_string()), ("NETFLIX_STACK".into(), "mine".into())]
                    .into(),
                security_profile: Some(pb::SecurityProfile {
                    iam_role: "arn:aws:iam::123456789012:role/web".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_environment_says_who_the_task_is_and_the_user_cannot_override_that() {
        let a = assignment();
        let env = container_env(&EnvContext {
            assign: &a,
            ip: Some(Ipv4Addr::new(172, 29, 0, 2)),
            zone: "us-east-1a",
            region: "us-east-1",
            auth_token: Some("tok"),
            host_instance_id: "i-123",
        });
        assert_eq!(env["TITUS_TASK_ID"], "t-1", "identity wins over the user's env");
        assert_eq!(env["NETFLIX_STACK"], "mine", "the user may set the Netflix variables");
        assert_eq!(env["NETFLIX_CLUSTER"], "web-prod");
        assert_eq!(env["NETFLIX_AUTO_SCALE_GROUP"], "web-prod-v007");
        assert_eq!(env["EC2_LOCAL_IPV4"], "172.29.0.2");
        assert_eq!(env["EC2_REGION"], "us-east-1");
        assert_eq!(env["TITUS_NUM_CPU"], "2");
        assert_eq!(env["TITUS_IAM_ROLE"], "arn:aws:iam::123456789012:role/web");
        assert_eq!(env["AWS_CONTAINER_CREDENTIALS_FULL_URI"], "http://169.254.170.2/v1/credentials");
        assert_eq!(env[ENV_TOKEN], "tok");
        assert_eq!(cluster_name("app", "", "d"), "app--d");
        assert_eq!(cluster_name("app", "", ""), "app");
    }

    #[tokio::test]
    async fn a_role_that_cannot_be_had_is_refused_with_the_reason() {
        // Nothing listens on port 1: STS does not answer.
        let config = AwsIdentityConfig {
            region: "us-east-1".into(),
            endpoint_url: "http://127.0.0.1:1".into(),
            allowed_roles: vec!["arn:aws:iam::123456789012:role/titus-*".into()],
            ..Default::default()
        };
        let ids = Identities::new(&config, &BTreeMap::new()).await;
        let ip = Ipv4Addr::new(172, 29, 0, 2);
        let admit = |role: &'static str| {
            let ids = ids.clone();
            async move { ids.admit("t", "j", ip, Some(role), false, "tok".into()).await.err() }
        };
        let refused = admit("arn:aws:iam::123456789012:role/admin").await.expect("refused");
        assert!(refused.why.contains("not in its aws.allowed-roles"), "{refused:?}");
        assert_eq!(refused.reason_code(), "failed", "the job's own doing");
        let refused = admit("arn:aws:iam::123456789012:role/titus-web").await.expect("refused");
        assert!(refused.why.contains("STS did not answer"), "{refused:?}");
        assert_eq!(refused.reason_code(), "transientSystemError", "not the job's fault");
        assert!(ids.get(ip).is_none(), "a refused task is not served");
        // Without a region there is no STS to ask.
        let ids = Identities::new(&AwsIdentityConfig { region: String::new(), ..config }, &BTreeMap::new()).await;
        let why = ids.admit("t", "j", ip, Some("arn:aws:iam::123456789012:role/titus-web"), false, "tok".into());
        assert!(why.await.err().expect("refused").why.contains("no AWS region"));
    }

    #[test]
    fn regions_sessions_and_tokens() {
        assert_eq!(region_of_zone("us-east-1a"), "us-east-1");
        assert_eq!(region_of_zone("zone-a"), "");
        assert_eq!(region_of_zone(""), "");
        assert_eq!(session_name("abc/def"), "abc_def");
        assert_eq!(session_name("x"), "titus-x");
        assert_eq!(session_name(&"a".repeat(100)).len(), 64);
        let id = TaskIdentity {
            task_id: "t".into(),
            job_id: "j".into(),
            ip: Ipv4Addr::LOCALHOST,
            role: None,
            allow_imds_v1: false,
            auth_token: "a".into(),
            credentials: RwLock::new(None),
            sessions: Mutex::default(),
            refresher: Mutex::default(),
        };
        let t = id.open_session(Duration::from_secs(60));
        assert!(id.session_valid(&t));
        assert!(!id.session_valid("other"));
        let short = id.open_session(Duration::from_millis(0));
        assert!(!id.session_valid(&short), "an expired session token is refused");
        for _ in 0..MAX_SESSION_TOKENS {
            id.open_session(Duration::from_secs(60));
        }
        assert!(!id.session_valid(&t), "the oldest token goes once the bound is reached");
    }
}
