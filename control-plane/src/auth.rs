//! Who is calling and what they may do: authentication from the connection's client certificate
//! or a bearer token, the per-method rules, per-caller rate limits and the audit of mutating calls.
//!
//! Every call on the api and peer ports passes [`Authorize`] before tonic decodes it:
//!
//! 1. the caller is established (an unauthenticated call is refused UNAUTHENTICATED, whatever the
//!    method);
//! 2. the method's [`Rule`] is checked against the caller (PERMISSION_DENIED naming the rule, logged
//!    and, for a mutating method, audited);
//! 3. a client's rate is limited (RESOURCE_EXHAUSTED naming the setting);
//! 4. the [`Caller`] and an [`AuditNote`] ride in the request's extensions: handlers check
//!    ownership with [`may_change_job`] and name what the call was about with [`note_target`];
//! 5. a mutating method's outcome is handed to the [`Auditor`], which commits it to the replicated
//!    audit log.
//!
//! In insecure mode (local development) every caller is `anonymous` with the admin role.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tonic::Status;

use titus_security::ratelimit::RateLimiter;
use titus_security::{Kind, PeerInfo};

use crate::command::{AuditRecord, Command};
use crate::config::{AuditConfig, SecurityConfig};
use crate::model::job::JobDescriptor;
use crate::replica::Replica;

pub use crate::config::Role;

/// What kind of party a caller is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerKind {
    Replica,
    Agent,
    /// A client certificate or a bearer token: has a role.
    Client,
    /// Insecure mode: no credentials, an admin.
    Anonymous,
}

/// An authenticated caller, as handlers see it in the request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `replica/2`, `agent/a1`, `client/alice`, `token/ci` or `anonymous`.
    pub name: String,
    pub kind: CallerKind,
    pub role: Option<Role>,
    /// For a user: the job owners (emails) and applications it holds.
    pub owners: Vec<String>,
    pub applications: Vec<String>,
    /// The client certificate's identity when the caller is a bearer token presented over a
    /// connection that also carries a certificate: both are audited.
    pub certificate: Option<String>,
}

impl Caller {
    /// Who the audit log records: the caller, and the certificate under a token
    /// (`token/ci+client/alice`; `+` is in no name).
    pub fn audit_name(&self) -> String {
        match &self.certificate {
            Some(c) => format!("{}+{c}", self.name),
            None => self.name.clone(),
        }
    }

    fn anonymous() -> Caller {
        Caller {
            name: "anonymous".into(),
            kind: CallerKind::Anonymous,
            role: Some(Role::Admin),
            owners: Vec::new(),
            applications: Vec::new(),
            certificate: None,
        }
    }

    fn has_role(&self, roles: &[Role]) -> bool {
        self.role.is_some_and(|r| roles.contains(&r))
    }

    /// The agent id an agent caller stands for (None for any other caller).
    pub fn agent_id(&self) -> Option<&str> {
        match self.kind {
            CallerKind::Agent => self.name.strip_prefix("agent/"),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Grant {
    role: Role,
    owners: Vec<String>,
    applications: Vec<String>,
}

/// The configured identities and limits. Grants and limits are replaced whole when the security
/// file is reloaded ([`Policy::reload`]); a call reads the ones current when it arrives.
pub struct Policy {
    insecure: bool,
    grants: std::sync::RwLock<Arc<Grants>>,
    limits: std::sync::RwLock<Arc<Limits>>,
    refusals: AtomicU64,
}

/// Who is who: reloadable.
struct Grants {
    principals: HashMap<String, Grant>,
    /// By token digest: the token's name and grant.
    tokens: HashMap<String, (String, Grant)>,
    /// Normalized serials of certificates no longer accepted.
    revoked: std::collections::HashSet<String>,
}

/// Per-client rates: reloadable (the buckets start full again when a rate changes).
struct Limits {
    config: crate::config::LimitsConfig,
    limiter: RateLimiter,
    /// Request bytes per client, charged as bodies arrive.
    bytes: Arc<RateLimiter>,
}

impl Grants {
    fn new(config: &SecurityConfig) -> Grants {
        Grants {
            principals: config
                .principals
                .iter()
                .map(|p| (p.name.clone(), grant(&p.role, &p.owners, &p.applications)))
                .collect(),
            tokens: config
                .tokens
                .iter()
                .map(|t| (t.sha256.clone(), (t.name.clone(), grant(&t.role, &t.owners, &t.applications))))
                .collect(),
            revoked: config
                .revoked_serials
                .iter()
                .filter_map(|s| titus_security::identity::normalize_serial(s))
                .collect(),
        }
    }
}

impl Limits {
    fn new(config: &crate::config::LimitsConfig) -> Limits {
        Limits {
            config: config.clone(),
            limiter: RateLimiter::new(config.requests_per_second, config.burst as f64, 100_000),
            bytes: Arc::new(RateLimiter::new(config.bytes_per_second as f64, config.burst_bytes as f64, 100_000)),
        }
    }

    fn same_rates(&self, other: &crate::config::LimitsConfig) -> bool {
        let c = &self.config;
        (c.requests_per_second, c.burst, c.bytes_per_second, c.burst_bytes)
            == (other.requests_per_second, other.burst, other.bytes_per_second, other.burst_bytes)
    }
}

fn grant(role: &str, owners: &[String], applications: &[String]) -> Grant {
    Grant {
        role: Role::parse(role).unwrap_or(Role::User),
        owners: owners.to_vec(),
        applications: applications.to_vec(),
    }
}

impl Policy {
    /// From a validated configuration.
    pub fn new(config: &SecurityConfig) -> Policy {
        Policy {
            insecure: config.insecure,
            grants: std::sync::RwLock::new(Arc::new(Grants::new(config))),
            limits: std::sync::RwLock::new(Arc::new(Limits::new(&config.limits))),
            refusals: AtomicU64::new(0),
        }
    }

    /// Takes the principals, tokens, revoked serials and rates of a reloaded (and validated)
    /// security file; calls already past authentication finish under the old ones. The rest of
    /// the file (certificate paths, connection bounds, audit) needs a restart.
    pub fn reload(&self, config: &SecurityConfig) {
        *self.grants.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Grants::new(config));
        let mut limits = self.limits.write().unwrap_or_else(|p| p.into_inner());
        if !limits.same_rates(&config.limits) {
            *limits = Arc::new(Limits::new(&config.limits));
        }
    }

    fn current_grants(&self) -> Arc<Grants> {
        self.grants.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn current_limits(&self) -> Arc<Limits> {
        self.limits.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Who is calling: a bearer token when one is presented, else the client certificate.
    pub fn authenticate(&self, peer: Option<&PeerInfo>, headers: &http::HeaderMap) -> Result<Caller, Status> {
        if self.insecure {
            return Ok(Caller::anonymous());
        }
        let grants = self.current_grants();
        if let Some(serial) = peer.and_then(|p| p.serial.as_ref()).filter(|s| grants.revoked.contains(*s)) {
            return Err(Status::unauthenticated(format!(
                "the client certificate (serial {serial}) is revoked (security.revoked-serials)"
            )));
        }
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| Status::unauthenticated("the authorization header is not `Bearer <token>`"))?;
            let digest = titus_security::token::sha256_hex(token.trim());
            let (name, g) = grants
                .tokens
                .get(&digest)
                .ok_or_else(|| Status::unauthenticated("the bearer token is not recognised"))?;
            return Ok(Caller {
                name: format!("token/{name}"),
                kind: CallerKind::Client,
                role: Some(g.role),
                owners: g.owners.clone(),
                applications: g.applications.clone(),
                certificate: peer.and_then(|p| p.identity.as_ref()).map(|id| id.to_string()),
            });
        }
        let Some(peer) = peer else {
            return Err(Status::unauthenticated("no connection information"));
        };
        if let Some(why) = &peer.identity_error {
            return Err(Status::unauthenticated(format!("the client certificate gives no identity: {why}")));
        }
        let Some(id) = &peer.identity else {
            return Err(Status::unauthenticated(
                "no client certificate and no bearer token: this cluster requires one (see `titus certs`)",
            ));
        };
        Ok(match id.kind {
            Kind::Replica => Caller {
                name: id.to_string(),
                kind: CallerKind::Replica,
                role: None,
                owners: Vec::new(),
                applications: Vec::new(),
                certificate: None,
            },
            Kind::Agent => Caller {
                name: id.to_string(),
                kind: CallerKind::Agent,
                role: None,
                owners: Vec::new(),
                applications: Vec::new(),
                certificate: None,
            },
            Kind::Client => {
                let g = grants.principals.get(&id.name).cloned().unwrap_or_else(|| Grant {
                    role: Role::User,
                    owners: vec![id.name.clone()],
                    applications: Vec::new(),
                });
                Caller {
                    name: id.to_string(),
                    kind: CallerKind::Client,
                    role: Some(g.role),
                    owners: g.owners,
                    applications: g.applications,
                    certificate: None,
                }
            }
        })
    }
}

/// Which port a call arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Api,
    Peer,
}

/// Who may call a method.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Named in PERMISSION_DENIED answers and logs.
    pub name: &'static str,
    /// What the rule says, for the answer.
    pub says: &'static str,
    allows: fn(&Caller) -> bool,
    /// Its calls change state (or hand it out, as Backup does): they are audited.
    pub audited: bool,
}

/// A user, operator or admin (not an enroll-only credential).
fn any_client(c: &Caller) -> bool {
    matches!(c.kind, CallerKind::Client | CallerKind::Anonymous) && c.role != Some(Role::Enroll)
}

/// The rule for `path` (`/package.Service/Method`) on `port`.
pub fn rule_for(port: Port, path: &str) -> Rule {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    if port == Port::Peer {
        return Rule {
            name: "replica-only",
            says: "the peer port is for replicas",
            allows: |c| matches!(c.kind, CallerKind::Replica | CallerKind::Anonymous),
            audited: false,
        };
    }
    let client_write = Rule {
        name: "client-write",
        says: "jobs and load balancers are changed by clients (users only for jobs they hold)",
        allows: any_client,
        audited: true,
    };
    match (service, method) {
        ("titus.AgentService", "EnrollAgent") => Rule {
            name: "agent-enroll",
            says: "agents are enrolled with an enroll token or by an admin, and renew their own certificate",
            allows: |c| c.has_role(&[Role::Enroll, Role::Admin]) || c.kind == CallerKind::Agent,
            audited: true,
        },
        ("titus.AgentService", _) | ("titus.AgentTaskService", _) => Rule {
            name: "agent-only",
            says: "agent RPCs need an agent certificate",
            allows: |c| matches!(c.kind, CallerKind::Agent | CallerKind::Anonymous),
            audited: false,
        },
        ("titus.ClusterService", "AddMember" | "RemoveMember" | "StepDown" | "Backup" | "Restore") => Rule {
            name: "cluster-admin",
            says: "cluster membership, step-down, backup and restore are admin-only",
            allows: |c| c.has_role(&[Role::Admin]),
            audited: true,
        },
        ("titus.ClusterService", "ListAuditRecords") => Rule {
            name: "audit-read",
            says: "the audit log is for admins and operators",
            allows: |c| c.has_role(&[Role::Admin, Role::Operator]),
            audited: false,
        },
        ("titus.AgentManagementService", "DrainAgent") => Rule {
            name: "agent-drain",
            says: "agents are drained by admins and operators",
            allows: |c| c.has_role(&[Role::Admin, Role::Operator]),
            audited: true,
        },
        ("titus.AgentManagementService", "CreateInstanceGroup" | "UpdateInstanceGroupLifecycle") => Rule {
            name: "agent-admin",
            says: "agent management is admin-only",
            allows: |c| c.has_role(&[Role::Admin]),
            audited: true,
        },
        ("titus.CapacityGroupService", "CreateCapacityGroup" | "UpdateCapacityGroup" | "DeleteCapacityGroup") => Rule {
            name: "capacity-operator",
            says: "capacity groups are changed by admins and operators",
            allows: |c| c.has_role(&[Role::Admin, Role::Operator]),
            audited: true,
        },
        (
            "titus.JobManagementService",
            "CreateJob"
            | "KillJob"
            | "KillTask"
            | "EvictTask"
            | "UpdateJobCapacity"
            | "UpdateJobStatus"
            | "UpdateJobProcesses"
            | "UpdateJobDisruptionBudget"
            | "UpdateJobAttributes"
            | "DeleteJobAttributes"
            | "UpdateTaskAttributes"
            | "DeleteTaskAttributes"
            | "MoveTask"
            | "UpdateJobSpec"
            | "PromoteDeployment"
            | "RollbackDeployment",
        ) => client_write,
        ("titus.LoadBalancerService", "AddLoadBalancer" | "RemoveLoadBalancer") => client_write,
        // Titus's V3 API: the same calls, the same rules.
        (
            "com.netflix.titus.JobManagementService",
            "CreateJob"
            | "KillJob"
            | "KillTask"
            | "UpdateJobCapacity"
            | "UpdateJobCapacityWithOptionalAttributes"
            | "UpdateJobStatus"
            | "UpdateJobProcesses"
            | "UpdateJobDisruptionBudget"
            | "UpdateJobAttributes"
            | "DeleteJobAttributes"
            | "UpdateTaskAttributes"
            | "DeleteTaskAttributes"
            | "MoveTask",
        ) => client_write,
        ("com.netflix.titus.LoadBalancerService", "AddLoadBalancer" | "RemoveLoadBalancer") => client_write,
        ("com.netflix.titus.EvictionService", "TerminateTask") => client_write,
        (
            "com.netflix.titus.AutoScalingService",
            "SetAutoScalingPolicy" | "DeleteAutoScalingPolicy" | "UpdateAutoScalingPolicy",
        ) => client_write,
        // A command in a task's container changes it as much as a kill does.
        ("titus.TaskIoService", "ExecTask") => client_write,
        ("grpc.health.v1.Health", _) | ("com.netflix.titus.Health", _) => {
            Rule { name: "health", says: "health checks need any identity", allows: |_| true, audited: false }
        }
        _ => Rule { name: "client-read", says: "reads are for clients", allows: any_client, audited: false },
    }
}

/// A user may change a job only when it holds the job's owner or application.
pub fn may_change_job(caller: &Caller, job_id: &str, d: &JobDescriptor) -> Result<(), Status> {
    if caller.has_role(&[Role::Admin, Role::Operator]) {
        return Ok(());
    }
    if holds(caller, d) {
        return Ok(());
    }
    let job = if job_id.is_empty() { "the new job".to_string() } else { format!("job {job_id}") };
    let message = format!(
        "rule job-owner: {} holds neither the owner {:?} nor the application {:?} of {job}",
        caller.name, d.owner_email, d.application_name
    );
    tracing::warn!(caller = %caller.name, rule = "job-owner", %job, "permission denied");
    Err(Status::permission_denied(message))
}

/// A caller-supplied token or request id, scoped to the caller: the same token sent by two callers
/// names two different calls, so one tenant can neither read another's result through it (bob
/// sending alice's token got alice's job id) nor be recorded as the author of another's call. The
/// caller's name is length-prefixed, so no pair of name and token spells another pair's key.
pub fn scoped(caller: &Caller, token: &str) -> String {
    format!("{}:{}:{token}", caller.name.len(), caller.name)
}

/// Whether `caller` may read the secrets of a job described by `d` (its environment's values):
/// an admin, or a user holding the job's owner or application. An operator may change any job but
/// reads its secrets no more than any other user.
pub fn may_read_secrets(caller: &Caller, d: &JobDescriptor) -> bool {
    caller.has_role(&[Role::Admin]) || holds(caller, d)
}

/// Whether `caller` is a user holding the owner or the application of the job described by `d`.
fn holds(caller: &Caller, d: &JobDescriptor) -> bool {
    caller.kind == CallerKind::Client
        && (caller.owners.iter().any(|o| *o == d.owner_email)
            || caller.applications.iter().any(|a| *a == d.application_name))
}

/// The caller a call was authenticated as (set by [`Authorize`]). Absent — a path that did not go
/// through the layer — it is a user holding nothing: no such path gains rights by accident.
pub fn caller<T>(request: &tonic::Request<T>) -> Caller {
    request.extensions().get::<Caller>().cloned().unwrap_or_else(|| Caller {
        name: "unauthenticated".into(),
        kind: CallerKind::Client,
        role: Some(Role::User),
        owners: Vec::new(),
        applications: Vec::new(),
        certificate: None,
    })
}

/// What a call was about, filled in by its handler for the audit log.
#[derive(Debug, Clone, Default)]
pub struct AuditNote(Arc<Mutex<String>>);

/// Names what `request` is about (a job id, a group name) in its audit record.
pub fn note_target<T>(request: &tonic::Request<T>, target: impl Into<String>) {
    if let Some(note) = request.extensions().get::<AuditNote>() {
        *note.0.lock().unwrap_or_else(|p| p.into_inner()) = target.into();
    }
}

/// Reloads the security settings from `source` whenever the file changes (checked every `every`,
/// like the certificates): principals, tokens, revoked serials and rates take effect for the next
/// call. A file that does not parse or validate keeps the settings in force and says why.
pub async fn reload_security(
    source: crate::config::SecuritySource,
    policy: Arc<Policy>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let path = source.path.display().to_string();
    let mut seen = std::fs::read(&source.path).ok();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let now = match std::fs::read(&source.path) {
            Ok(bytes) => bytes,
            Err(e) => {
                if seen.take().is_some() {
                    tracing::warn!(file = %path, error = %e, "security settings unreadable; the previous ones stay");
                }
                continue;
            }
        };
        if seen.as_ref() == Some(&now) {
            continue;
        }
        seen = Some(now);
        match source.load() {
            Ok(security) => {
                policy.reload(&security);
                tracing::info!(
                    file = %path,
                    principals = security.principals.len(),
                    tokens = security.tokens.len(),
                    revoked = security.revoked_serials.len(),
                    "security settings reloaded"
                );
            }
            Err(e) => {
                tracing::warn!(file = %path, error = %e, "security settings not reloaded; the previous ones stay")
            }
        }
    }
}

// ----- the layer -----

/// A request body that charges its caller's byte bucket for every data frame it yields.
struct Metered {
    inner: BoxBody,
    bytes: Arc<RateLimiter>,
    caller: String,
}

impl http_body::Body for Metered {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes.charge(&self.caller, data.len() as f64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The tower layer that authenticates, authorizes, rate-limits and audits every call of a port.
#[derive(Clone)]
pub struct Authorize {
    pub policy: Arc<Policy>,
    pub port: Port,
    pub auditor: Option<Arc<Auditor>>,
}

impl<S> tower_layer::Layer<S> for Authorize {
    type Service = AuthorizeService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthorizeService { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct AuthorizeService<S> {
    inner: S,
    layer: Authorize,
}

type BoxBody = tonic::body::BoxBody;

impl<S> tower_service::Service<http::Request<BoxBody>> for AuthorizeService<S>
where
    S: tower_service::Service<http::Request<BoxBody>, Response = http::Response<BoxBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<BoxBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<BoxBody>) -> Self::Future {
        let path = request.uri().path().to_string();
        let layer = &self.layer;
        let policy = &layer.policy;
        let rule = rule_for(layer.port, &path);
        let request_id = request
            .headers()
            .get(crate::telemetry::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .chars()
            .take(128)
            .collect::<String>();
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let refuse = |status: Status| -> Self::Future { Box::pin(std::future::ready(Ok(status.into_http()))) };
        let caller = match policy.authenticate(peer.as_ref(), request.headers()) {
            Ok(c) => {
                // The connection proved itself: it is no longer timed out or evicted.
                if let Some(p) = &peer {
                    p.authenticated();
                }
                c
            }
            Err(status) => {
                // Not audited: an unauthenticated flood must not become a flood of log entries.
                let n = policy.refusals.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(method = %path, remote = ?peer.as_ref().and_then(|p| p.remote), refused = n, reason = status.message(), "unauthenticated call refused");
                }
                return refuse(status);
            }
        };
        if !(rule.allows)(&caller) {
            let message = format!("rule {}: {} may not call {path}: {}", rule.name, caller.name, rule.says);
            tracing::warn!(caller = %caller.name, method = %path, rule = rule.name, "permission denied");
            // Every refusal is audited, reads and the peer port's included: the caller is
            // authenticated (an unauthenticated flood is not recorded), and the audit queue is
            // bounded (a flood of refusals drops records, counted, rather than wait).
            if let Some(a) = &layer.auditor {
                a.record(&caller.audit_name(), &path, "", tonic::Code::PermissionDenied, &message, &request_id);
            }
            return refuse(Status::permission_denied(message));
        }
        if caller.kind == CallerKind::Client {
            let limits = policy.current_limits();
            let limited = match limits.limiter.check(&caller.name) {
                Err(wait) => Some((
                    wait,
                    format!(
                        "{} made more than {} calls a second (security.limits.requests-per-second)",
                        caller.name, limits.config.requests_per_second
                    ),
                )),
                Ok(()) => limits.bytes.check_debt(&caller.name).err().map(|wait| {
                    (
                        wait,
                        format!(
                            "{} sent more than {} request bytes a second (security.limits.bytes-per-second)",
                            caller.name, limits.config.bytes_per_second
                        ),
                    )
                }),
            };
            if let Some((wait, what)) = limited {
                let millis = wait.as_millis().clamp(1, u128::from(u32::MAX));
                let mut status = Status::resource_exhausted(format!("rate limit: {what}; retry in {millis} ms"));
                // The SDK waits this long and tries again.
                if let Ok(v) = millis.to_string().parse() {
                    status.metadata_mut().insert("titus-retry-after-ms", v);
                }
                return refuse(status);
            }
            // Charged as the body arrives: a caller's large requests cost it in bytes, not only in
            // calls, so one tenant's maximal jobs cannot take the log from the others.
            let (bytes, name) = (limits.bytes.clone(), caller.name.clone());
            request = request.map(|body| BoxBody::new(Metered { inner: body, bytes, caller: name }));
        }
        let note = AuditNote::default();
        request.extensions_mut().insert(caller.clone());
        request.extensions_mut().insert(note.clone());
        let future = self.inner.call(request);
        let (auditor, audited) = (layer.auditor.clone(), rule.audited);
        Box::pin(async move {
            let response = future.await?;
            if let Some(auditor) = auditor {
                let (code, message) = match Status::from_header_map(response.headers()) {
                    Some(s) => (s.code(), s.message().to_string()),
                    None => (tonic::Code::Ok, String::new()),
                };
                // A mutating call's every outcome; any call's refusal by a handler's rule
                // (job-owner, agent-identity).
                if audited || code == tonic::Code::PermissionDenied {
                    let target = note.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    auditor.record(&caller.audit_name(), &path, &target, code, &message, &request_id);
                }
            }
            Ok(response)
        })
    }
}

// ----- the audit log -----

const AUDIT_QUEUE: usize = 10_000;
const AUDIT_BATCH: usize = 500;

/// Commits the records of the calls this replica answered to the replicated audit log, in batches
/// (one Raft entry per flush interval at most). The queue is bounded: past it records are dropped,
/// counted and logged, never held without bound.
pub struct Auditor {
    tx: mpsc::Sender<AuditRecord>,
    replica_id: u64,
    dropped: AtomicU64,
}

impl Auditor {
    /// Starts the flusher; its handle ends once `stop` is set and what was queued is committed
    /// (the replica awaits it, bounded, before shutting Raft down).
    pub fn start(
        replica: Arc<Replica>,
        config: AuditConfig,
        mut stop: watch::Receiver<bool>,
    ) -> (Arc<Auditor>, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<AuditRecord>(AUDIT_QUEUE);
        let auditor = Arc::new(Auditor { tx, replica_id: replica.id, dropped: AtomicU64::new(0) });
        let interval = Duration::from_millis(config.flush_interval_ms);
        let handle = tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    r = rx.recv() => r,
                    _ = stop.wait_for(|s| *s) => None,
                };
                let Some(first) = first else { break };
                // Gather what arrives within the interval into one entry.
                let _ = tokio::time::timeout(interval, stop.wait_for(|s| *s)).await;
                let mut batch = vec![first];
                while batch.len() < AUDIT_BATCH {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                commit(&replica, batch, config.max_records).await;
            }
            // Stopping: what is queued still goes in, bounded by one request timeout.
            let mut rest = Vec::new();
            while let Ok(r) = rx.try_recv() {
                rest.push(r);
            }
            for chunk in rest.chunks(AUDIT_BATCH) {
                commit(&replica, chunk.to_vec(), config.max_records).await;
            }
        });
        (auditor, handle)
    }

    /// Queues one call's record.
    pub fn record(&self, caller: &str, method: &str, target: &str, code: tonic::Code, message: &str, request_id: &str) {
        // Every field bounded: a record is small whatever a caller sent.
        let cut = |s: &str, n: usize| s.chars().take(n).collect::<String>();
        let record = AuditRecord {
            time_ms: crate::clock::now_ms(),
            caller: cut(caller, 160),
            method: cut(method, 160),
            target: cut(target, 200),
            code: format!("{code:?}"),
            message: cut(message, 1024),
            replica: self.replica_id,
            request_id: cut(request_id, 128),
        };
        if self.tx.try_send(record).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::error!(dropped = n, "audit queue full: audit records dropped (is the cluster committing?)");
            }
        }
    }
}

/// Proposes one batch, retrying while the cluster elects a leader; after a minute the records are
/// given up, loudly.
async fn commit(replica: &Replica, records: Vec<AuditRecord>, keep: u64) {
    let n = records.len();
    // One id for every attempt: a repeat after an unknown outcome is appended once.
    let command = Command::AppendAudit { records, keep, batch_id: uuid::Uuid::new_v4().to_string() };
    let mut backoff = Duration::from_millis(50);
    let started = std::time::Instant::now();
    loop {
        match replica.propose(command.clone(), None).await {
            Ok(_) => return,
            Err(e @ crate::error::Error::ShuttingDown { .. }) => {
                return tracing::warn!(error = %e, records = n, "audit records not committed: this replica is stopping")
            }
            Err(e) if started.elapsed() < Duration::from_secs(60) => {
                tracing::debug!(error = %e, records = n, "audit records not committed yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return tracing::error!(error = %e, records = n, "audit records could not be committed for a minute; dropped")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, owners: &[&str], applications: &[&str]) -> Caller {
        Caller {
            name: name.into(),
            kind: CallerKind::Client,
            role: Some(Role::User),
            owners: owners.iter().map(|s| s.to_string()).collect(),
            applications: applications.iter().map(|s| s.to_string()).collect(),
            certificate: None,
        }
    }

    #[test]
    fn a_scoped_token_names_one_caller_and_one_token() {
        let (alice, bob) = (user("client/alice", &[], &[]), user("client/bob", &[], &[]));
        assert_ne!(scoped(&alice, "t"), scoped(&bob, "t"));
        // No split of name and token spells another pair's key.
        let (a, b) = (user("client/a", &[], &[]), user("client/a:1", &[], &[]));
        assert_ne!(scoped(&a, "1:x"), scoped(&b, "x"));
    }

    #[test]
    fn secrets_are_for_owners_and_admins_only() {
        let mut d = crate::model::job::fixtures::batch_descriptor(1);
        (d.owner_email, d.application_name) = ("alice@example.com".into(), "web".into());
        assert!(may_read_secrets(&user("client/alice", &["alice@example.com"], &[]), &d));
        assert!(may_read_secrets(&user("client/webops", &[], &["web"]), &d));
        assert!(!may_read_secrets(&user("client/bob", &["bob@example.com"], &["api"]), &d));
        let mut operator = user("token/ops", &[], &[]);
        operator.role = Some(Role::Operator);
        assert!(!may_read_secrets(&operator, &d), "an operator changes jobs, it does not read their secrets");
        assert!(may_change_job(&operator, "j", &d).is_ok());
        assert!(may_read_secrets(&Caller::anonymous(), &d), "insecure mode: everyone is an admin");
        d.owner_email = "bob@example.com".into();
        assert!(!may_read_secrets(&user("client/alice", &["alice@example.com"], &[]), &d));
    }

    #[test]
    fn a_token_over_a_certificate_is_audited_as_both() {
        let mut c = user("token/ci", &[], &[]);
        assert_eq!(c.audit_name(), "token/ci");
        c.certificate = Some("client/alice".into());
        assert_eq!(c.audit_name(), "token/ci+client/alice");
    }
}
