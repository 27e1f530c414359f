//! The leader's side of the agent protocol: the agents' streams, what is sent down them
//! (assignments, kills, forgets) and liveness. Placement is `crate::scheduling`.
//!
//! Everything that must survive a leader change is in replicated state (agents, task placements
//! and states); what lives here is only the open streams and heartbeat times. A new leader rebuilds
//! it from the agents' re-registrations: each agent re-sends what it runs, and the leader reconciles
//! — so a leader change restarts no container.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use titus_proto as pb;
use titus_proto::agent_service_server::AgentService;

use crate::clock::now_ms;
use crate::command::{Command, CommandResponse, StatusReport};
use crate::config::AgentsConfig;
use crate::error::Error;
use crate::events::Change;
use crate::jobs::apply::agent_of;
use crate::model::agent::AgentState;
use crate::model::agent::Cidr;
use crate::model::task::{reason, Task, TaskState, TaskStatus};
use crate::replica::{Replica, Term};
use crate::state::StateRead;

type Outbox = mpsc::Sender<Result<pb::ControlMessage, Status>>;

/// Registrations the leader commits at once; the others wait their turn (in arrival order) for at
/// most [`REGISTRATION_QUEUE_WAIT`]. A fleet that reconnects at once (10,000 agents after a leader
/// change) would otherwise put 10,000 proposals in the Raft queue together: each waits behind all
/// the others, times out before it commits, and its agent registers again — more entries for the
/// same agents, until nothing commits within a timeout (seen on 2 cores in a debug build). Bounded,
/// every registration admitted commits within the request timeout, and the queue drains at the
/// rate the log commits.
const REGISTRATIONS_IN_FLIGHT: usize = 128;
const REGISTRATION_QUEUE_WAIT: Duration = Duration::from_secs(20);

struct Conn {
    tx: Outbox,
    /// Tells a replaced stream's reader that it no longer owns the slot.
    conn_id: u64,
}

pub struct AgentHub {
    replica: Arc<Replica>,
    pub config: AgentsConfig,
    conns: Mutex<HashMap<String, Conn>>,
    /// Last message from each agent, kept when its stream closes: the TTL counts from here.
    last_seen: Mutex<HashMap<String, Instant>>,
    next_conn: AtomicU64,
    /// While this replica's leader duties run: since when, and in which term. Every agent gets the
    /// TTL from then to reconnect; streams are accepted only meanwhile; the hub's own proposals are
    /// fenced by the term.
    leader_since: Mutex<Option<(Instant, Term)>>,
    /// With load balancers on: the longest a kill waits for its targets to drain.
    lb_max_drain_wait_ms: Option<i64>,
    pub scheduler: crate::config::SchedulerConfig,
    /// The last scheduling round's reasons (on the leader).
    pub scheduling: Arc<crate::scheduling::results::Results>,
    /// Registrations being committed at once (see [`REGISTRATIONS_IN_FLIGHT`]).
    registering: tokio::sync::Semaphore,
    /// Task states reported by agents, in arrival order, for [`report_batches`].
    reports: mpsc::UnboundedSender<StatusReport>,
    reports_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<StatusReport>>,
    /// Output and command sessions asked of agents and not yet opened by them, by session id.
    pending_sessions: Mutex<HashMap<String, PendingSession>>,
    /// Sessions asked for or open at once (see [`MAX_SESSIONS`]).
    sessions: Arc<tokio::sync::Semaphore>,
}

/// Most output and command sessions the leader relays at once.
const MAX_SESSIONS: usize = 512;

/// How long an agent has to open a session the leader asked of it.
const SESSION_OPEN_WAIT: Duration = Duration::from_secs(10);

struct PendingSession {
    agent_id: String,
    opened: tokio::sync::oneshot::Sender<(Streaming<pb::SessionUp>, mpsc::Sender<Result<pb::ExecInput, Status>>)>,
}

/// An agent's open session: what it sends up, and a way to send input down. Dropping it ends the
/// session at the agent; `_turn` is the session's place among [`MAX_SESSIONS`].
pub struct SessionLink {
    pub up: Streaming<pb::SessionUp>,
    pub down: mpsc::Sender<Result<pb::ExecInput, Status>>,
    _turn: tokio::sync::OwnedSemaphorePermit,
}

fn msg(m: pb::control_message::Message) -> pb::ControlMessage {
    pb::ControlMessage { message: Some(m) }
}

impl AgentHub {
    pub fn new(
        replica: Arc<Replica>,
        config: AgentsConfig,
        scheduler: crate::config::SchedulerConfig,
        lb_max_drain_wait_ms: Option<i64>,
    ) -> Arc<Self> {
        let (reports, reports_rx) = mpsc::unbounded_channel();
        Arc::new(AgentHub {
            reports,
            reports_rx: tokio::sync::Mutex::new(reports_rx),
            replica,
            config,
            conns: Mutex::default(),
            last_seen: Mutex::default(),
            next_conn: AtomicU64::new(1),
            registering: tokio::sync::Semaphore::new(REGISTRATIONS_IN_FLIGHT),
            leader_since: Mutex::default(),
            lb_max_drain_wait_ms,
            scheduler,
            scheduling: Arc::default(),
            pending_sessions: Mutex::default(),
            sessions: Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS)),
        })
    }

    /// Asks agent `agent_id` to serve `kind` for task `task_id` and waits for it to open the
    /// session (at most [`SESSION_OPEN_WAIT`]). The agent must be attached to this leader.
    pub async fn open_session(
        &self,
        agent_id: &str,
        task_id: &str,
        kind: pb::open_session::Kind,
    ) -> Result<SessionLink, Status> {
        let Ok(turn) = self.sessions.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "the leader relays {MAX_SESSIONS} output and command sessions already; try again later"
            )));
        };
        let session_id = uuid::Uuid::new_v4().simple().to_string();
        let (opened, wait) = tokio::sync::oneshot::channel();
        let sessions = || self.pending_sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions().insert(session_id.clone(), PendingSession { agent_id: agent_id.to_string(), opened });
        let open = pb::OpenSession { session_id: session_id.clone(), task_id: task_id.to_string(), kind: Some(kind) };
        let sent = match self.conns().get(agent_id) {
            Some(c) => c.tx.try_send(Ok(msg(pb::control_message::Message::OpenSession(open)))).is_ok(),
            None => false,
        };
        if !sent {
            sessions().remove(&session_id);
            return Err(Status::unavailable(format!(
                "agent {agent_id}, which runs task {task_id}, is not attached to the leader (or its stream is full)"
            )));
        }
        let link = tokio::time::timeout(SESSION_OPEN_WAIT, wait).await;
        sessions().remove(&session_id);
        match link {
            Ok(Ok((up, down))) => Ok(SessionLink { up, down, _turn: turn }),
            _ => Err(Status::unavailable(format!(
                "agent {agent_id} did not open the session within {} s (an agent older than the leader serves none)",
                SESSION_OPEN_WAIT.as_secs()
            ))),
        }
    }

    /// Joins an agent's session stream to the call waiting for it; refused when no call waits
    /// for that session or `caller_agent` (the certificate's agent, if any) is not the one asked.
    fn join_session(
        &self,
        session_id: &str,
        caller_agent: Option<&str>,
        up: Streaming<pb::SessionUp>,
        down: mpsc::Sender<Result<pb::ExecInput, Status>>,
    ) -> Result<(), Status> {
        let mut sessions = self.pending_sessions.lock().unwrap_or_else(|p| p.into_inner());
        let pending = sessions.remove(session_id).ok_or_else(|| Status::not_found("no call waits for this session"))?;
        if caller_agent.is_some_and(|a| a != pending.agent_id) {
            sessions.insert(session_id.to_string(), pending);
            return Err(Status::permission_denied("rule agent-identity: the session was asked of another agent"));
        }
        pending.opened.send((up, down)).map_err(|_| Status::cancelled("the call that asked for the session is gone"))
    }

    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<String, Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For each attached agent, how long since it was last heard (on the leader; empty elsewhere).
    pub fn heartbeat_ages(&self) -> Vec<(String, Duration)> {
        let connected = self.connected();
        let seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        connected.into_iter().filter_map(|id| seen.get(&id).map(|t| (id, t.elapsed()))).collect()
    }

    pub fn connected(&self) -> HashSet<String> {
        self.conns().keys().cloned().collect()
    }

    /// Called when this replica's leader duties start, leadership confirmed by a majority.
    pub fn on_become_leader(&self, term: Term) {
        *self.leader_since.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), term));
    }

    /// The term of the running leader duties, if they run.
    fn term(&self) -> Option<Term> {
        self.leader_since.lock().unwrap_or_else(|p| p.into_inner()).map(|(_, term)| term)
    }

    /// Called when it stops: every agent must go to the new leader.
    pub fn on_lose_leadership(&self) {
        *self.leader_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.scheduling.clear();
        self.last_seen.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let mut conns = self.conns();
        for (_, c) in conns.drain() {
            let _ = c.tx.try_send(Err(self.replica.not_leader().into()));
        }
    }

    /// Takes `conn` as agent `agent_id`'s stream if the duties of `term` still run. Checked under
    /// the connections' lock: leadership that ended while the registration was being committed has
    /// already drained the connections (`on_lose_leadership` clears the term first), and a stream
    /// added after that drain would be held by a deposed leader, its agent never told to move on.
    fn admit(&self, agent_id: &str, term: Term, conn: Conn) -> bool {
        let mut conns = self.conns();
        if self.term() != Some(term) {
            return false;
        }
        conns.insert(agent_id.to_string(), conn);
        true
    }

    /// Closes agent `agent_id`'s stream, if it has one, telling it why.
    fn disconnect(&self, agent_id: &str, why: &str) {
        if let Some(c) = self.conns().remove(agent_id) {
            let _ = c.tx.try_send(Err(Status::unavailable(why.to_string())));
            tracing::info!(agent_id, why, "agent stream closed by the leader");
        }
    }

    fn send(&self, agent_id: &str, m: pb::control_message::Message) {
        if let Some(c) = self.conns().get(agent_id) {
            if c.tx.try_send(Ok(msg(m))).is_err() {
                tracing::warn!(agent_id, "agent stream is full or closed; it will be resynced when it reconnects");
            }
        }
    }

    fn assignment(&self, task: &Task) -> Option<pb::control_message::Message> {
        let job = self.replica.state.job(&task.job_id).ok()??;
        // The container of the task's own spec version: an old task placed while a deployment
        // replaces it still runs the old one.
        let mut descriptor = job.descriptor.clone();
        descriptor.container = job.container_of(task.job_version()).clone();
        let descriptor = titus_model::convert::job_descriptor_to_proto(&descriptor);
        Some(pb::control_message::Message::Assign(pb::TaskAssignment {
            task_id: task.id.clone(),
            job_id: task.job_id.clone(),
            container: descriptor.container,
            application_name: descriptor.application_name,
            job_group_info: descriptor.job_group_info,
        }))
    }

    /// What an agent must be told about a task placed on it, given the task's replicated state.
    fn instruction(&self, task: &Task) -> Option<pb::control_message::Message> {
        match task.state() {
            TaskState::Launched => self.assignment(task),
            TaskState::KillInitiated if self.draining(task) => None,
            TaskState::KillInitiated => Some(pb::control_message::Message::Kill(pb::KillTaskCommand {
                task_id: task.id.clone(),
                grace_period_ms: self.config.kill_grace_period_ms,
            })),
            TaskState::Finished => Some(pb::control_message::Message::Forget(pb::ForgetTask {
                task_id: task.id.clone(),
                grace_period_ms: self.config.kill_grace_period_ms,
            })),
            _ => None,
        }
    }

    /// Whether a killed task's container must keep running while its load balancer targets are
    /// deregistered and drained (the kill is sent when their records change; see `loadbalancer`).
    fn draining(&self, task: &Task) -> bool {
        let Some(max_wait) = self.lb_max_drain_wait_ms else { return false };
        match self.replica.state.lb_targets_of_task(&task.id) {
            Ok(targets) => crate::loadbalancer::holds_kill(task, &targets, now_ms(), max_wait),
            Err(e) => {
                tracing::warn!(task_id = %task.id, error = %e, "cannot read load balancer targets; not holding the kill");
                false
            }
        }
    }

    /// Proposes for the running leader duties' term; nothing once they stopped.
    async fn propose(&self, command: Command) {
        let kind = command.kind();
        let Some(term) = self.term() else {
            tracing::debug!(kind, "agent protocol: leader duties are not running; not proposing");
            return;
        };
        match self.replica.propose_as_leader(term, command).await {
            Ok(CommandResponse::Rejected(r)) => {
                tracing::debug!(kind, message = %r.message, "agent protocol: command no longer applies")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(kind, error = %e, "agent protocol: proposal failed"),
        }
    }

    /// Reconciles what a (re)registering agent reports with replicated state.
    async fn reconcile(&self, agent_id: &str, networks: &[Cidr], reported: Vec<pb::AgentTask>, complete: bool) {
        let state = &self.replica.state;
        let mut seen = HashSet::new();
        for rt in reported {
            seen.insert(rt.task_id.clone());
            let task = state.task(&rt.task_id).ok().flatten();
            match task {
                Some(t) if agent_of(&t) == Some(agent_id) && t.state().is_live() => {
                    let reported_state =
                        titus_model::convert::task_state_from_proto("state", rt.state).unwrap_or(TaskState::Launched);
                    let health = rt.task_context.get(crate::model::task::context::HEALTH);
                    let health_changed = reported_state == t.state() && health.is_some_and(|h| t.health() != Some(h));
                    if (t.state().can_move_to(reported_state) && reported_state != t.state()) || health_changed {
                        self.report(agent_id, networks, rt);
                    } else if t.state() == TaskState::KillInitiated {
                        if let Some(m) = self.instruction(&t) {
                            self.send(agent_id, m);
                        }
                    }
                }
                // Finished, unknown, archived, or placed elsewhere: the container must go.
                _ => self.send(
                    agent_id,
                    pb::control_message::Message::Forget(pb::ForgetTask {
                        task_id: rt.task_id,
                        grace_period_ms: self.config.kill_grace_period_ms,
                    }),
                ),
            }
        }
        let placed = state.task_ids_on_agent(agent_id).unwrap_or_default();
        for t in placed.iter().filter_map(|id| state.task(id).ok().flatten()) {
            if agent_of(&t) != Some(agent_id) || seen.contains(&t.id) || !t.state().is_live() {
                continue;
            }
            if t.state() == TaskState::Launched {
                if let Some(m) = self.assignment(&t) {
                    self.send(agent_id, m);
                }
            } else if complete {
                // It had a container, which the agent no longer has.
                let status = TaskStatus {
                    state: TaskState::Finished,
                    reason_code: reason::LOST.into(),
                    reason_message: "container not found on its agent".into(),
                    timestamp_ms: now_ms(),
                };
                let lost = Command::UpdateTaskStatus {
                    task_id: t.id.clone(),
                    status,
                    context: BTreeMap::new(),
                    expected_state: Some(t.state()),
                };
                self.propose(lost).await;
            }
        }
    }

    /// A task status the agent reported: queued for the next batch (see [`report_batches`]), which
    /// applies it only if the task is still placed on this agent. What an agent may say is
    /// filtered first (see [`crate::model::convert::agent_report`]), `networks` being those it
    /// declared when it registered.
    fn report(&self, agent_id: &str, networks: &[Cidr], rt: pb::AgentTask) {
        let task_id = crate::model::truncated(&rt.task_id).to_string();
        match crate::model::convert::agent_report(agent_id, rt, now_ms(), networks) {
            Ok(report) => {
                let _ = self.reports.send(report);
            }
            Err(e) => tracing::warn!(agent_id, task_id = %task_id, error = %e, "agent report refused; ignored"),
        }
    }

    fn touch(&self, agent_id: &str, conn_id: u64) -> bool {
        let current = self.conns().get(agent_id).is_some_and(|c| c.conn_id == conn_id);
        if current {
            self.last_seen.lock().unwrap_or_else(|p| p.into_inner()).insert(agent_id.to_string(), Instant::now());
        }
        current
    }

    async fn read_agent(
        self: Arc<Self>,
        agent_id: String,
        networks: &[Cidr],
        conn_id: u64,
        mut inbound: Streaming<pb::AgentMessage>,
        mut healthy: bool,
    ) {
        loop {
            let message = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => break,
            };
            if !self.touch(&agent_id, conn_id) {
                break; // replaced by a newer stream, or no longer leader
            }
            match message.message {
                Some(pb::agent_message::Message::Heartbeat(h)) => {
                    if h.healthy != healthy {
                        healthy = h.healthy;
                        tracing::info!(agent_id, healthy, reason = %h.unhealthy_reason, "agent health changed");
                        self.propose(Command::SetAgentHealth {
                            agent_id: agent_id.clone(),
                            healthy,
                            reason: crate::model::bounded(
                                h.unhealthy_reason,
                                crate::model::convert::MAX_AGENT_REASON_LEN,
                            ),
                        })
                        .await;
                    }
                }
                Some(pb::agent_message::Message::Status(rt)) => self.report(&agent_id, networks, rt),
                Some(pb::agent_message::Message::Register(_)) | None => {}
            }
        }
        let mut conns = self.conns();
        if conns.get(&agent_id).is_some_and(|c| c.conn_id == conn_id) {
            conns.remove(&agent_id);
            tracing::info!(agent_id, "agent stream closed");
        }
    }

    /// Sends every connected agent what replicated state says it should be doing (after the
    /// dispatcher lagged).
    fn resync(&self) {
        let connected = self.connected();
        for t in self.replica.state.all_tasks().unwrap_or_default() {
            if let Some(agent) = agent_of(&t) {
                if connected.contains(agent) {
                    if let Some(m) = self.instruction(&t) {
                        self.send(agent, m);
                    }
                }
            }
        }
    }
}

pub struct AgentApi {
    pub hub: Arc<AgentHub>,
    /// Signs enrolling agents' certificates (None: this replica has no CA key).
    pub enroller: Option<Enroller>,
}

/// The CA files an enrollment signs with (read at each enrollment, so a replaced CA is used).
#[derive(Debug, Clone)]
pub struct Enroller {
    pub ca: std::path::PathBuf,
    pub ca_key: std::path::PathBuf,
    pub validity_days: u32,
}

/// Largest certificate request accepted.
const MAX_CSR_BYTES: usize = 16 << 10;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type AttachStream = ReceiverStream<Result<pb::ControlMessage, Status>>;
    type SessionStream = ReceiverStream<Result<pb::ExecInput, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::SessionUp>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let caller = crate::auth::caller(&request);
        let mut up = request.into_inner();
        let first = tokio::time::timeout(SESSION_OPEN_WAIT, up.message()).await.map_err(|_| {
            Status::deadline_exceeded(format!("no open message within {} s", SESSION_OPEN_WAIT.as_secs()))
        })??;
        let Some(pb::SessionUp { message: Some(pb::session_up::Message::Open(session_id)) }) = first else {
            return Err(Error::invalid("message", "the first message of a session must be open").into());
        };
        let (down, rx) = mpsc::channel(64);
        self.hub.join_session(&session_id, caller.agent_id(), up, down)?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn enroll_agent(
        &self,
        request: Request<pb::EnrollAgentRequest>,
    ) -> Result<Response<pb::EnrollAgentResponse>, Status> {
        use titus_security::{certs, Identity, Kind};
        let r = request.get_ref();
        crate::model::validate_name("agent_id", &r.agent_id).map_err(|v| Error::InvalidArgument(vec![v]))?;
        crate::auth::note_target(&request, format!("agent {}", r.agent_id));
        if r.csr_pem.len() > MAX_CSR_BYTES {
            return Err(Error::invalid("csr_pem", format!("must be at most {MAX_CSR_BYTES} bytes")).into());
        }
        let Some(e) = &self.enroller else {
            return Err(Status::failed_precondition("enrollment is off on this replica: it has no security.ca-key"));
        };
        // The leader knows which agents are attached, and reads the registered ones up to date.
        self.hub.replica.require_leader()?;
        let caller = crate::auth::caller(&request);
        // An agent renews its own certificate (attached or not), and only its own.
        let renewal = match caller.agent_id() {
            Some(id) if id == r.agent_id => true,
            Some(id) => {
                tracing::warn!(caller = %caller.name, agent_id = %r.agent_id, rule = "agent-identity", "permission denied");
                return Err(Status::permission_denied(format!(
                    "rule agent-identity: agent {id:?} may renew only its own certificate, not {:?}'s",
                    r.agent_id
                )));
            }
            None => false,
        };
        if !renewal && self.hub.conns().contains_key(&r.agent_id) {
            return Err(Status::failed_precondition(format!(
                "agent {:?} is attached: an enrollment cannot take over a live agent's identity",
                r.agent_id
            )));
        }
        // An enroll token is for new agents only: one that ever registered (it may be away, or the
        // leader may have just changed) is enrolled again by an admin, never by the shared token.
        if !renewal && caller.role != Some(crate::auth::Role::Admin) {
            use crate::state::StateRead;
            self.hub.replica.read_barrier(crate::clock::client_deadline(&request)).await?;
            if self.hub.replica.state.agent(&r.agent_id)?.is_some() {
                return Err(Status::failed_precondition(format!(
                    "agent {:?} is already registered: an enroll token enrolls new agents only (an admin may re-enroll it)",
                    r.agent_id
                )));
            }
        }
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|err| Status::internal(format!("reading {}: {err}", p.display())))
        };
        let ca = certs::Pem { cert: read(&e.ca)?, key: read(&e.ca_key)? };
        let identity = Identity::new(Kind::Agent, r.agent_id.clone()).map_err(|m| Error::invalid("agent_id", m))?;
        let certificate_pem = certs::sign_csr(&ca, &identity, "titus", &r.csr_pem, e.validity_days)
            .map_err(|err| Error::invalid("csr_pem", err.to_string()))?;
        tracing::info!(agent_id = %r.agent_id, days = e.validity_days, renewal, "agent enrolled: certificate issued");
        Ok(Response::new(pb::EnrollAgentResponse {
            certificate_pem,
            not_after_ms: now_ms() + i64::from(e.validity_days) * 86_400_000,
        }))
    }

    async fn attach(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let hub = &self.hub;
        let replica = &hub.replica;
        replica.require_leader()?;
        // A leader whose duties do not run (not yet confirmed by a majority, or cut off from it)
        // takes no stream: the agent goes on to the replica a majority follows.
        let Some(term) = hub.term() else {
            return Err(Status::unavailable(format!(
                "replica {} has not confirmed its leadership with a majority; try another replica",
                replica.id
            )));
        };
        let caller = crate::auth::caller(&request);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no register message within 10 s"))??;
        let Some(pb::AgentMessage { message: Some(pb::agent_message::Message::Register(reg)) }) = first else {
            return Err(Error::invalid("message", "the first message on the agent stream must be a register").into());
        };
        crate::model::validate_name("agent_id", &reg.agent_id).map_err(|v| Error::InvalidArgument(vec![v]))?;
        // An agent's certificate names the one agent it may be.
        if let Some(id) = caller.agent_id() {
            if id != reg.agent_id {
                tracing::warn!(caller = %caller.name, agent_id = %reg.agent_id, rule = "agent-identity", "permission denied");
                return Err(Status::permission_denied(format!(
                    "rule agent-identity: {} may not register as agent {:?}",
                    caller.name, reg.agent_id
                )));
            }
        }
        let agent = crate::model::convert::agent_from_register(&reg, now_ms())?;
        let networks: Arc<[Cidr]> = crate::model::convert::container_networks(
            &reg.container_networks,
            &hub.config.allowed_container_networks(),
        )?
        .into();
        // Heard now: the liveness duty counts an Online agent's silence from here, not from when
        // this replica became leader (a registration committed more than a TTL after that would
        // otherwise be declared lost the moment it commits, before the stream is taken).
        hub.last_seen.lock().unwrap_or_else(|p| p.into_inner()).insert(reg.agent_id.clone(), Instant::now());
        let Ok(Ok(_turn)) = tokio::time::timeout(REGISTRATION_QUEUE_WAIT, hub.registering.acquire()).await else {
            return Err(Status::unavailable(format!(
                "{REGISTRATIONS_IN_FLIGHT} registrations are being committed and more are queued: none came free within {} s; register again later",
                REGISTRATION_QUEUE_WAIT.as_secs()
            )));
        };
        if let CommandResponse::Rejected(r) = replica.propose_as_leader(term, Command::RegisterAgent { agent }).await? {
            tracing::warn!(agent_id = %reg.agent_id, field = %r.field, message = %r.message, "agent registration refused");
            return Err(Error::Rejected(r).into());
        }

        let (tx, rx) = mpsc::channel(4096);
        let conn_id = hub.next_conn.fetch_add(1, Ordering::Relaxed);
        let _ = tx.try_send(Ok(msg(pb::control_message::Message::Registered(pb::Registered {
            leader_id: replica.id,
            heartbeat_interval_ms: hub.config.heartbeat_interval_ms,
        }))));
        if !hub.admit(&reg.agent_id, term, Conn { tx, conn_id }) {
            return Err(replica.not_leader().into());
        }
        hub.last_seen.lock().unwrap_or_else(|p| p.into_inner()).insert(reg.agent_id.clone(), Instant::now());
        tracing::info!(agent_id = %reg.agent_id, tasks = reg.tasks.len(), "agent registered");
        let hub = hub.clone();
        let span = tracing::info_span!("agent_stream", agent_id = %reg.agent_id);
        tokio::spawn(
            async move {
                hub.reconcile(&reg.agent_id, &networks, reg.tasks, !reg.inventory_incomplete).await;
                hub.read_agent(reg.agent_id, &networks, conn_id, inbound, !reg.inventory_incomplete).await;
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Leader duty: tells agents about every committed change to tasks placed on them.
pub async fn dispatch(hub: Arc<AgentHub>, mut stop: watch::Receiver<bool>) {
    let (_, mut rx) = hub.replica.state.changes.subscribe(None);
    hub.resync();
    loop {
        let batch = tokio::select! {
            b = rx.recv() => b,
            _ = stop.changed() => return,
        };
        match batch {
            Ok(batch) => {
                for change in &batch.changes {
                    match change {
                        Change::Task(t) => {
                            if let (Some(agent), Some(m)) = (agent_of(t), hub.instruction(t)) {
                                hub.send(agent, m);
                            }
                        }
                        // A drained (or overdue) target may release a held kill.
                        Change::LbTarget(target) => {
                            if let Ok(Some(t)) = hub.replica.state.task(&target.task_id) {
                                if t.state() == TaskState::KillInitiated {
                                    if let (Some(agent), Some(m)) = (agent_of(&t), hub.instruction(&t)) {
                                        hub.send(agent, m);
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => hub.resync(),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Most reports in one log entry (~200 bytes each): entries stay small enough to replicate within
/// a heartbeat interval (see `raft.max-payload-entries`).
const REPORTS_PER_ENTRY: usize = 500;

/// Leader duty: proposes the agents' reports in batches, in arrival order (a task's StartInitiated
/// before its Started), one entry at a time: one entry carries what arrived while the previous one
/// committed, so a thousand agents reporting at once cost a few entries, not a thousand.
pub async fn report_batches(hub: Arc<AgentHub>, term: Term, mut stop: watch::Receiver<bool>) {
    let mut rx = hub.reports_rx.lock().await;
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = stop.changed() => return,
        };
        let Some(first) = first else { return };
        let mut reports = vec![first];
        while reports.len() < REPORTS_PER_ENTRY {
            match rx.try_recv() {
                Ok(r) => reports.push(r),
                Err(_) => break,
            }
        }
        let propose =
            |reports: Vec<StatusReport>| hub.replica.propose_as_leader(term, Command::UpdateTaskStatuses { reports });
        if commit_reports(propose, reports, &mut stop).await == BatchEnd::Stop {
            return;
        }
    }
}

/// How a batch of reports ended: logged (or refused for good), so the next one goes on — or this
/// duty is over (its leader deposed, or told to stop).
#[derive(Debug, PartialEq)]
enum BatchEnd {
    Next,
    Stop,
}

/// Proposes one batch until it commits, while this replica leads in the duty's term: a batch
/// dropped here would only be resent when its agents reconnect, and nothing makes an attached
/// agent reconnect. A repeat does no harm — each report applies only as a legal transition from
/// the task's current state. After a leader change the agents re-register with everything they
/// hold, and the new leader reconciles from that.
async fn commit_reports<F, Fut>(
    mut propose: F,
    reports: Vec<StatusReport>,
    stop: &mut watch::Receiver<bool>,
) -> BatchEnd
where
    F: FnMut(Vec<StatusReport>) -> Fut,
    Fut: std::future::Future<Output = crate::error::Result<CommandResponse>>,
{
    let n = reports.len();
    let mut backoff = Duration::from_millis(50);
    loop {
        match propose(reports.clone()).await {
            Ok(_) => {
                tracing::trace!(reports = n, "agent reports applied");
                return BatchEnd::Next;
            }
            Err(e @ Error::Deposed { .. }) => {
                tracing::info!(reports = n, error = %e, "agent reports: not leading any more; the agents resend on reconnect");
                return BatchEnd::Stop;
            }
            // Reports are checked as they arrive; a batch that still cannot be logged would
            // block every later one.
            Err(e @ (Error::Unloggable { .. } | Error::EntryTooLarge { .. } | Error::InvalidArgument(_))) => {
                tracing::error!(reports = n, error = %e, "agent reports: refused; dropping this batch");
                return BatchEnd::Next;
            }
            Err(e) => {
                tracing::warn!(reports = n, error = %e, retry_in_ms = backoff.as_millis() as u64, "agent reports: proposal failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return BatchEnd::Stop,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Leader duty: declares agents Lost after the heartbeat TTL (counted from when this replica
/// became leader, for agents it has not heard from yet).
pub async fn liveness(hub: Arc<AgentHub>, term: Term, mut stop: watch::Receiver<bool>) {
    let ttl = Duration::from_millis(hub.config.heartbeat_ttl_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
        let Some((since, _)) = *hub.leader_since.lock().unwrap_or_else(|p| p.into_inner()) else { continue };
        let Ok(agents) = hub.replica.state.agents() else { continue };
        for a in agents.into_iter().filter(|a| a.state == AgentState::Online) {
            // Leadership may end mid-round (a round over 10,000 agents is long): a replica that no
            // longer leads neither declares nor logs anything (its proposals would be refused).
            if *stop.borrow() || hub.replica.require_leader().is_err() {
                break;
            }
            let heard = hub.last_seen.lock().unwrap_or_else(|p| p.into_inner()).get(&a.id).copied();
            let last = heard.unwrap_or(since).max(since);
            if last.elapsed() > ttl {
                tracing::warn!(agent_id = %a.id, silent_ms = last.elapsed().as_millis() as u64, "agent lost: its tasks will be replaced");
                let lost = Command::AgentLost { agent_id: a.id.clone(), timestamp_ms: now_ms() };
                match hub.replica.propose_as_leader(term, lost).await {
                    // A stream still open (a stalled agent's, say) is closed: the agent, if it
                    // comes back, reconnects and registers again with what it runs — nothing else
                    // would bring a Lost agent back while its old stream stayed up.
                    Ok(_) => hub.disconnect(&a.id, "declared lost: register again"),
                    Err(e) => {
                        tracing::warn!(agent_id = %a.id, error = %e, "liveness: proposal failed; retrying next round")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod report_tests {
    use std::cell::Cell;

    use super::*;

    fn report() -> StatusReport {
        StatusReport {
            task_id: "t1".into(),
            agent_id: "a1".into(),
            status: TaskStatus {
                state: TaskState::Finished,
                reason_code: reason::FAILED.into(),
                reason_message: "exit 1".into(),
                timestamp_ms: 1,
            },
            context: BTreeMap::new(),
        }
    }

    fn timeout() -> Error {
        Error::Timeout { what: "update_task_statuses".into(), timeout_ms: 5_000 }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_retried_until_it_commits() {
        let (_tx, mut stop) = watch::channel(false);
        let calls = Cell::new(0);
        let propose = |reports: Vec<StatusReport>| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                assert_eq!(reports.len(), 1, "the same batch every time");
                if n <= 10 {
                    Err(timeout())
                } else {
                    Ok(CommandResponse::Done)
                }
            }
        };
        assert_eq!(commit_reports(propose, vec![report()], &mut stop).await, BatchEnd::Next);
        assert_eq!(calls.get(), 11, "ten failures, then the commit: none dropped after a few");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deposed_leader_stops_and_a_refused_batch_gives_way_to_the_next() {
        let (tx, mut stop) = watch::channel(false);
        let deposed = |_| async { Err(Error::Deposed { node_id: 1, term: 3 }) };
        assert_eq!(commit_reports(deposed, vec![report()], &mut stop).await, BatchEnd::Stop);
        let refused = |_| async { Err(Error::invalid("reports[0].state", "unknown")) };
        assert_eq!(commit_reports(refused, vec![report()], &mut stop).await, BatchEnd::Next);
        // Told to stop while backing off: over at once, whatever the proposals would say.
        let calls = Cell::new(0);
        let failing = |_| {
            calls.set(calls.get() + 1);
            if calls.get() == 2 {
                let _ = tx.send(true);
            }
            async { Err(timeout()) }
        };
        assert_eq!(commit_reports(failing, vec![report()], &mut stop).await, BatchEnd::Stop);
        assert_eq!(calls.get(), 2);
    }
}
