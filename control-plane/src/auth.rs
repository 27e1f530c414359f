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
}

impl Caller {
    fn anonymous() -> Caller {
        Caller {
            name: "anonymous".into(),
            kind: CallerKind::Anonymous,
            role: Some(Role::Admin),
            owners: Vec::new(),
            applications: Vec::new(),
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

/// The configured identities and limits.
pub struct Policy {
    insecure: bool,
    principals: HashMap<String, Grant>,
    /// By token digest: the token's name and grant.
    tokens: HashMap<String, (String, Grant)>,
    limiter: RateLimiter,
    requests_per_second: f64,
    refusals: AtomicU64,
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
            limiter: RateLimiter::new(config.limits.requests_per_second, config.limits.burst as f64, 100_000),
            requests_per_second: config.limits.requests_per_second,
            refusals: AtomicU64::new(0),
        }
    }

    /// Who is calling: a bearer token when one is presented, else the client certificate.
    pub fn authenticate(&self, peer: Option<&PeerInfo>, headers: &http::HeaderMap) -> Result<Caller, Status> {
        if self.insecure {
            return Ok(Caller::anonymous());
        }
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| Status::unauthenticated("the authorization header is not `Bearer <token>`"))?;
            let digest = titus_security::token::sha256_hex(token.trim());
            let (name, g) = self
                .tokens
                .get(&digest)
                .ok_or_else(|| Status::unauthenticated("the bearer token is not recognised"))?;
            return Ok(Caller {
                name: format!("token/{name}"),
                kind: CallerKind::Client,
                role: Some(g.role),
                owners: g.owners.clone(),
                applications: g.applications.clone(),
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
            },
            Kind::Agent => Caller {
                name: id.to_string(),
                kind: CallerKind::Agent,
                role: None,
                owners: Vec::new(),
                applications: Vec::new(),
            },
            Kind::Client => {
                let g = self.principals.get(&id.name).cloned().unwrap_or_else(|| Grant {
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
            | "UpdateJobCapacity"
            | "UpdateJobStatus"
            | "UpdateJobProcesses"
            | "UpdateJobAttributes"
            | "DeleteJobAttributes",
        ) => client_write,
        ("titus.LoadBalancerService", "AddLoadBalancer" | "RemoveLoadBalancer") => client_write,
        ("grpc.health.v1.Health", _) => {
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
    if caller.kind == CallerKind::Client
        && (caller.owners.iter().any(|o| *o == d.owner_email)
            || caller.applications.iter().any(|a| *a == d.application_name))
    {
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

/// The caller a call was authenticated as (set by [`Authorize`]). Absent — a path that did not go
/// through the layer — it is a user holding nothing: no such path gains rights by accident.
pub fn caller<T>(request: &tonic::Request<T>) -> Caller {
    request.extensions().get::<Caller>().cloned().unwrap_or_else(|| Caller {
        name: "unauthenticated".into(),
        kind: CallerKind::Client,
        role: Some(Role::User),
        owners: Vec::new(),
        applications: Vec::new(),
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

// ----- the layer -----

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

impl<S, B> tower_service::Service<http::Request<B>> for AuthorizeService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<BoxBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<BoxBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
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
            Ok(c) => c,
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
            if rule.audited {
                if let Some(a) = &layer.auditor {
                    a.record(&caller.name, &path, "", tonic::Code::PermissionDenied, &message, &request_id);
                }
            }
            return refuse(Status::permission_denied(message));
        }
        if caller.kind == CallerKind::Client {
            if let Err(wait) = policy.limiter.check(&caller.name) {
                let message = format!(
                    "rate limit: {} made more than {} calls a second (security.limits.requests-per-second); retry in {} ms",
                    caller.name,
                    policy.requests_per_second,
                    wait.as_millis().max(1)
                );
                let mut status = Status::resource_exhausted(message);
                // The SDK waits this long and tries again.
                if let Ok(v) = (wait.as_millis().max(1) as u64).to_string().parse() {
                    status.metadata_mut().insert("titus-retry-after-ms", v);
                }
                return refuse(status);
            }
        }
        let note = AuditNote::default();
        request.extensions_mut().insert(caller.clone());
        request.extensions_mut().insert(note.clone());
        let future = self.inner.call(request);
        let auditor = if rule.audited { layer.auditor.clone() } else { None };
        Box::pin(async move {
            let response = future.await?;
            if let Some(auditor) = auditor {
                let (code, message) = match Status::from_header_map(response.headers()) {
                    Some(s) => (s.code(), s.message().to_string()),
                    None => (tonic::Code::Ok, String::new()),
                };
                let target = note.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
                auditor.record(&caller.name, &path, &target, code, &message, &request_id);
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
