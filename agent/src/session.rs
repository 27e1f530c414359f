//! The agent's stream to the leader, and what it does with what comes down it.
//!
//! On every (re)connection the agent registers with everything it holds, so a new leader learns the
//! truth from the agents themselves; containers are never touched by a reconnect. Assignments,
//! kills and forgets are idempotent: a repeated assignment adopts the existing container, a kill of
//! a stopped container reports it finished, a forget of a missing container does nothing.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use titus_proto as pb;
use titus_proto::agent_service_client::AgentServiceClient;

use crate::docker::{Death, DockerRuntime, Observed};
use crate::runtime::{Runtime, SimRuntime};
use crate::{AgentConfig, Result};

/// Metadata key in which a replica names the leader's api address.
const LEADER_HINT: &str = "titus-leader";

/// How long an agent waits for the leader to answer its registration: longer than a leader takes
/// to answer, queue included (its register message within 10 s, its turn within 20 s, the commit
/// within its request timeout).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);

/// One operation the leader asked for on one task.
enum Op {
    Assign(pb::TaskAssignment),
    Kill(pb::KillTaskCommand),
    Forget(pb::ForgetTask),
}

struct Agent {
    config: AgentConfig,
    docker: Runtime,
    /// Tasks the agent is stopping on request, so their death is reported as killed.
    killing: Mutex<HashSet<String>>,
    /// Tasks the daemon reported OOM kills for.
    oom_killed: Mutex<HashSet<String>>,
    /// Per task id, the queue of its operations not yet done (assign, kill, forget): they run one
    /// at a time, in the order the leader sent them, so a kill never overtakes the launch it
    /// cancels and a forget never races a stop. A task's queue goes when it is empty.
    ops: Mutex<HashMap<String, mpsc::UnboundedSender<Op>>>,
    /// Status reports for the current stream (or the next one).
    reports: mpsc::UnboundedSender<pb::AgentTask>,
    /// This agent's certificate (None when insecure).
    tls: Option<Arc<titus_security::Tls>>,
    /// Where forgotten tasks' output is kept.
    finished_logs: crate::taskio::FinishedLogs,
    /// Output and command sessions open at once (see [`MAX_SESSIONS`]).
    sessions: Arc<tokio::sync::Semaphore>,
}

/// Most output and command sessions one agent serves at once.
const MAX_SESSIONS: usize = 32;

/// Loads the agent's certificate (its identity must be `agent/<agent-id>`) and reloads it when the
/// files are replaced; in insecure mode says loudly that it is plaintext.
async fn load_tls(config: &AgentConfig) -> Result<Option<Arc<titus_security::Tls>>> {
    use titus_security::{Identity, Kind, Tls, TlsFiles};
    let (Some(ca), Some(cert), Some(key)) = (&config.tls_ca, &config.tls_cert, &config.tls_key) else {
        // Once per process (a simulating process runs many agents).
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            let banner =
                "INSECURE MODE: plaintext to the control plane, no certificate. For a local development cluster only.";
            eprintln!("\n*** titus-agent: {banner} ***\n");
            tracing::warn!("{banner}");
        });
        return Ok(None);
    };
    if let Some(token) = &config.enroll_token {
        if !cert.exists() || !key.exists() {
            enroll(config, ca, cert, key, token).await?;
        }
    }
    let tls = Tls::client(TlsFiles::new(ca, cert, key), Some(Kind::Agent))
        .map_err(|e| crate::Error::Config(format!("tls: {e}")))?;
    let expected = Identity::new(Kind::Agent, config.agent_id.clone()).map_err(crate::Error::Config)?;
    if tls.identity().as_ref() != Some(&expected) {
        return Err(crate::Error::Config(format!(
            "tls-cert {}: names {}, but this agent is {expected}",
            cert.display(),
            tls.identity().map_or("nobody".into(), |i| i.to_string())
        )));
    }
    tls.spawn_reloader(Duration::from_secs(5));
    // A certificate obtained by enrollment is also renewed by the agent.
    if config.enroll_token.is_some() {
        tokio::spawn(renew_while_running(config.clone(), tls.clone()));
    }
    Ok(Some(tls))
}

impl Agent {
    fn report(&self, o: &Observed) {
        let report = o.to_proto();
        // The API's state names (Started, Finished), as the control plane's series say them.
        let state = match pb::TaskState::try_from(report.state) {
            Ok(pb::TaskState::TaskAccepted) => "Accepted",
            Ok(pb::TaskState::TaskLaunched) => "Launched",
            Ok(pb::TaskState::TaskStartInitiated) => "StartInitiated",
            Ok(pb::TaskState::TaskStarted) => "Started",
            Ok(pb::TaskState::TaskKillInitiated) => "KillInitiated",
            Ok(pb::TaskState::TaskFinished) => "Finished",
            Err(_) => "unknown",
        };
        crate::telemetry::metrics().task_reports_total.inc(&[state]);
        let _ = self.reports.send(report);
    }

    /// Whether the task's container exists but was never started.
    async fn created_only(&self, task_id: &str) -> bool {
        matches!(
            self.docker.observe_with(task_id, true, false).await,
            Ok(Some(Observed { state: pb::TaskState::TaskStartInitiated, .. }))
        )
    }

    fn is_killing(&self, task_id: &str) -> bool {
        self.killing.lock().unwrap_or_else(|p| p.into_inner()).contains(task_id)
    }

    /// Its health check's verdict changed: reported with its (running) state.
    async fn on_health(&self, task_id: &str) {
        if let Ok(Some(o)) = self.docker.observe_with(task_id, false, false).await {
            if o.state == pb::TaskState::TaskStarted && o.context.contains_key("health") {
                self.report(&o);
            }
        }
    }

    async fn on_death(&self, task_id: &str) {
        let oom_seen = || self.oom_killed.lock().unwrap_or_else(|p| p.into_inner()).contains(task_id);
        let killing = self.is_killing(task_id);
        let mut observed = self.docker.observe_with(task_id, killing, oom_seen()).await;
        // SIGKILLed, not by us, and no OOM heard of yet: the daemon may report the kernel's OOM
        // kill (its event, or the container's OOMKilled flag) just after the exit. Wait for it a
        // moment, so the task says why it died.
        let sigkilled = |o: &Observed| o.context.get("exitCode").map(String::as_str) == Some("137");
        if matches!(&observed, Ok(Some(o)) if sigkilled(o) && !killing && !o.reason_message.contains("OOM")) {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let again = self.docker.observe_with(task_id, killing, oom_seen()).await;
                let oom = matches!(&again, Ok(Some(o)) if o.reason_message.contains("OOM"));
                observed = again;
                if oom {
                    break;
                }
            }
        }
        match observed {
            Ok(Some(o)) => self.report(&o),
            Ok(None) => {}
            Err(e) => tracing::warn!(task_id, error = %e, "cannot inspect a dead container"),
        }
    }

    async fn handle(self: &Arc<Self>, m: pb::control_message::Message) {
        use pb::control_message::Message;
        match m {
            Message::Registered(r) => tracing::info!(leader = r.leader_id, "registered with the leader"),
            Message::Assign(a) => {
                crate::telemetry::metrics().assignments_total.inc(&[]);
                self.enqueue(a.task_id.clone(), Op::Assign(a));
            }
            Message::Kill(k) => {
                crate::telemetry::metrics().kills_total.inc(&[]);
                // Marked at once: a launch still queued or under way checks it and never starts.
                self.killing.lock().unwrap_or_else(|p| p.into_inner()).insert(k.task_id.clone());
                self.enqueue(k.task_id.clone(), Op::Kill(k));
            }
            Message::Forget(f) => self.enqueue(f.task_id.clone(), Op::Forget(f)),
            // Served by `serve_session` (it needs the stream's connection).
            Message::OpenSession(o) => {
                tracing::debug!(session = %o.session_id, "session request outside a stream; ignored")
            }
        }
    }

    /// Serves one output or command session the leader opened: calls `AgentService.Session` on
    /// the leader's connection, names the session, then sends the output up (and takes input from
    /// what comes down) until it ends; a failure ends it with an error the client is told.
    async fn serve_session(self: Arc<Self>, channel: tonic::transport::Channel, open: pb::OpenSession) {
        use crate::taskio::Refusal;
        use pb::session_up::Message as Up;
        let span = tracing::info_span!("task_session", session = %open.session_id, task_id = %open.task_id);
        let (up, up_rx) = mpsc::channel(16);
        let _ = up.send(pb::SessionUp { message: Some(Up::Open(open.session_id.clone())) }).await;
        let mut client = AgentServiceClient::new(channel);
        let call = client.session(ReceiverStream::new(up_rx));
        let mut input = match tokio::time::timeout(Duration::from_secs(10), call).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                tracing::info!(parent: &span, error = %status.message(), "the leader refused the session");
                return;
            }
            Err(_) => {
                tracing::info!(parent: &span, "the leader did not take the session within 10 s");
                return;
            }
        };
        let serve = async {
            let Ok(_turn) = self.sessions.clone().try_acquire_owned() else {
                return Err(Refusal {
                    code: tonic::Code::ResourceExhausted,
                    message: format!("agent {} serves {MAX_SESSIONS} sessions already", self.config.agent_id),
                });
            };
            let Runtime::Docker(docker) = &self.docker else {
                return Err(Refusal {
                    code: tonic::Code::Unimplemented,
                    message: "a simulated agent runs no containers".into(),
                });
            };
            match open.kind {
                Some(pb::open_session::Kind::Logs(request)) => {
                    crate::taskio::logs(docker, &self.finished_logs, &request, &up).await
                }
                Some(pb::open_session::Kind::Exec(start)) => crate::taskio::exec(docker, start, &mut input, &up).await,
                None => Err(Refusal {
                    code: tonic::Code::Unimplemented,
                    message: "a session of a kind this agent does not know".into(),
                }),
            }
        };
        if let Err(r) = tracing::Instrument::instrument(serve, span.clone()).await {
            tracing::info!(parent: &span, code = ?r.code, message = %r.message, "task session refused");
            let error = pb::SessionError { code: r.code as i32, message: r.message };
            let _ = up.send(pb::SessionUp { message: Some(Up::Error(error)) }).await;
        }
        // Our end is done; the leader ends its own when it has read everything (dropping the call
        // before would cut off what is still on its way).
        drop(up);
        let _ =
            tokio::time::timeout(Duration::from_secs(5), async { while let Ok(Some(_)) = input.message().await {} })
                .await;
    }

    /// Queues `op` behind the task's earlier operations, starting its worker if it has none.
    fn enqueue(self: &Arc<Self>, task_id: String, op: Op) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let op = match ops.get(&task_id) {
            Some(tx) => match tx.send(op) {
                Ok(()) => return,
                Err(mpsc::error::SendError(op)) => op,
            },
            None => op,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(op);
        ops.insert(task_id.clone(), tx);
        let agent = self.clone();
        tokio::spawn(async move { agent.run_ops(task_id, rx).await });
    }

    /// Runs one task's operations in order until its queue is empty.
    async fn run_ops(self: Arc<Self>, task_id: String, mut rx: mpsc::UnboundedReceiver<Op>) {
        loop {
            let op = match rx.try_recv() {
                Ok(op) => op,
                Err(_) => {
                    // Empty: the queue goes, unless an operation was queued meanwhile (both sides
                    // hold the map's lock, so none is lost).
                    let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
                    match rx.try_recv() {
                        Ok(op) => op,
                        Err(_) => {
                            ops.remove(&task_id);
                            return;
                        }
                    }
                }
            };
            self.run_op(op).await;
        }
    }

    async fn run_op(self: &Arc<Self>, op: Op) {
        match op {
            Op::Assign(a) => {
                let span = tracing::info_span!("launch", task_id = %a.task_id, job_id = %a.job_id);
                let agent = self.clone();
                let task_id = a.task_id.clone();
                let killed = move || agent.is_killing(&task_id);
                tracing::Instrument::instrument(
                    async {
                        let t0 = std::time::Instant::now();
                        for o in self.docker.launch(&a, &killed).await {
                            self.report(&o);
                        }
                        crate::telemetry::metrics().launch_seconds.observe(&[], t0.elapsed().as_secs_f64());
                        tracing::info!(elapsed_ms = t0.elapsed().as_millis() as u64, "launched");
                    },
                    span,
                )
                .await
            }
            Op::Kill(k) => {
                let grace = (k.grace_period_ms.div_ceil(1000)) as i64;
                tracing::info!(task_id = %k.task_id, grace_secs = grace, "killing");
                match self.docker.stop(&k.task_id, grace).await {
                    // Created but never started (Docker answers a stop of it "not modified"): it
                    // must not start later; it goes.
                    Ok(true) if self.created_only(&k.task_id).await => {
                        if let Err(e) = self.docker.remove(&k.task_id).await {
                            tracing::warn!(task_id = %k.task_id, error = %e, "cannot remove a killed task's container");
                        }
                        self.report(&crate::docker::killed_before_start(&k.task_id));
                    }
                    Ok(true) => self.on_death(&k.task_id).await,
                    Ok(false) => self.report(&Observed {
                        task_id: k.task_id.clone(),
                        container_id: String::new(),
                        state: pb::TaskState::TaskFinished,
                        reason_code: "killed".into(),
                        reason_message: "killed before its container existed".into(),
                        context: Default::default(),
                    }),
                    Err(e) => {
                        tracing::warn!(task_id = %k.task_id, error = %e, "kill failed; the control plane will retry")
                    }
                }
            }
            Op::Forget(f) => {
                // A container still running is stopped with the kill grace period first, so the
                // task can shut down cleanly, then removed. The control plane sends the grace its
                // kills get; one older than that field sends none, and the agent's own applies.
                let grace = forget_grace_secs(f.grace_period_ms, self.config.forget_grace_secs);
                if let Err(e) = self.docker.stop(&f.task_id, grace).await {
                    tracing::warn!(task_id = %f.task_id, error = %e, "cannot stop a forgotten task's container");
                }
                if let (Runtime::Docker(d), true) = (&self.docker, self.finished_logs.max_bytes_per_task > 0) {
                    if let Err(e) = self.finished_logs.save(d, &f.task_id).await {
                        tracing::warn!(task_id = %f.task_id, error = %e, "cannot keep a forgotten task's output");
                    }
                }
                if let Err(e) = self.docker.remove(&f.task_id).await {
                    tracing::warn!(task_id = %f.task_id, error = %e, "cannot remove container");
                } else {
                    self.killing.lock().unwrap_or_else(|p| p.into_inner()).remove(&f.task_id);
                    self.oom_killed.lock().unwrap_or_else(|p| p.into_inner()).remove(&f.task_id);
                }
            }
        }
    }

    async fn register_message(&self) -> pb::AgentMessage {
        let (tasks, inventory_incomplete) = match self.docker.tasks().await {
            Ok(t) => (t.iter().map(Observed::to_proto).collect(), false),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list containers for registration");
                (Vec::new(), true)
            }
        };
        let container_networks = self.docker.container_networks().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the container network's subnets: no containerIp will be kept");
            Vec::new()
        });
        let c = &self.config;
        pb::AgentMessage {
            message: Some(pb::agent_message::Message::Register(pb::AgentRegister {
                agent_id: c.agent_id.clone(),
                instance_group: c.instance_group.clone(),
                resources: Some(pb::AgentResources {
                    cpu: c.cpu,
                    memory_mb: c.memory_mb,
                    disk_mb: c.disk_mb,
                    network_mbps: c.network_mbps,
                    gpu: c.gpu,
                }),
                attributes: c.attributes.clone().into_iter().collect(),
                tasks,
                inventory_incomplete,
                container_networks,
            })),
        }
    }
}

/// Reports the verdicts of the agent's own (HTTP) health checks as they change.
async fn watch_probes(agent: Arc<Agent>) {
    let Some(mut changes) = agent.docker.health_changes() else { return };
    while let Some(task_id) = changes.recv().await {
        let agent = agent.clone();
        tokio::spawn(async move { agent.on_health(&task_id).await });
    }
}

/// Watches container deaths for the agent's lifetime, re-subscribing after daemon hiccups.
async fn watch_deaths(agent: Arc<Agent>) {
    loop {
        let deaths = match agent.docker.deaths().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch container deaths yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut deaths = Box::pin(deaths);
        while let Some(event) = deaths.next().await {
            match event {
                Ok(Death::OutOfMemory(task_id)) => {
                    agent.oom_killed.lock().unwrap_or_else(|p| p.into_inner()).insert(task_id);
                }
                // Apart from this loop, which goes on reading events (an OOM event that follows
                // the exit is among them).
                Ok(Death::Exited(task_id)) => {
                    let agent = agent.clone();
                    tokio::spawn(async move { agent.on_death(&task_id).await });
                }
                Ok(Death::Health(task_id)) => {
                    let agent = agent.clone();
                    tokio::spawn(async move { agent.on_health(&task_id).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "docker event stream broke");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Deaths during the gap: report every container's current state.
        if let Ok(tasks) = agent.docker.tasks().await {
            for o in tasks.iter().filter(|o| o.state == pb::TaskState::TaskFinished) {
                agent.report(o);
            }
        }
    }
}

/// Runs the agent until `shutdown` completes. Containers keep running after it stops.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let docker = DockerRuntime::connect(&config).await?;
    if let Err(e) = docker.prune_job_networks().await {
        tracing::warn!(error = %e, "cannot remove job networks left unused (tried again when a job's last container goes)");
    }
    if let Err(e) = docker.restore_routes().await {
        tracing::error!(error = %e, "cannot restore the metadata routes of running containers");
    }
    let restoring = docker.clone();
    tokio::spawn(async move {
        if let Err(e) = restoring.restore_identities().await {
            tracing::error!(error = %e, "cannot restore the identities of running containers");
        }
    });
    run_with(config, Runtime::Docker(docker), shutdown).await
}

/// Runs `count` simulated agents in this process until `shutdown` completes: each registers as
/// `<agent-id>-<n>` with the configured resources (zones taken in turn from `zones`, when given),
/// speaks the real agent protocol, and reports every assignment Started at once without Docker.
pub async fn simulate(
    config: AgentConfig,
    count: usize,
    zones: Vec<String>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut agents = Vec::with_capacity(count);
    for n in 0..count {
        let mut c = config.clone();
        c.agent_id = format!("{}-{n:05}", config.agent_id);
        if n > 0 {
            c.admin_listen = None;
        }
        if !zones.is_empty() {
            c.attributes.insert("zone".into(), zones[n % zones.len()].clone());
        }
        c.attributes.insert("host".into(), c.agent_id.clone());
        let mut stop = stop_rx.clone();
        agents.push(tokio::spawn(async move {
            run_with(c, Runtime::Simulated(SimRuntime::default()), async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        }));
    }
    tracing::info!(count, "simulated agents started");
    shutdown.await;
    let _ = stop_tx.send(true);
    for a in agents {
        if let Ok(Err(e)) = a.await {
            tracing::warn!(error = %e, "a simulated agent failed");
        }
    }
    Ok(())
}

/// Obtains this agent's certificate from the control plane with an enroll token: a new key (kept
/// here), a certificate request, the signed certificate back; both written (the key 0600) where
/// the configuration says.
async fn enroll(
    config: &AgentConfig,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    token: &str,
) -> Result<()> {
    use titus_security::{Tls, TlsFiles};
    let config_error = |m: String| crate::Error::Config(m);
    let tls = Tls::client(TlsFiles { ca: ca.to_path_buf(), cert_and_key: None }, None)
        .map_err(|e| config_error(format!("tls-ca: {e}")))?;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| config_error("enroll-token: not printable ASCII".into()))?;
    request_certificate(config, tls, Some(bearer), cert, key, Duration::from_secs(120)).await.map_err(config_error)
}

/// Asks the leader to sign a certificate for a new key (`EnrollAgent`), over `tls` and with
/// `bearer` when given, trying every server and following the leader until `within` has passed;
/// writes the certificate and key (aside, then renamed). Refusals end it at once.
async fn request_certificate(
    config: &AgentConfig,
    tls: Arc<titus_security::Tls>,
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    cert: &std::path::Path,
    key: &std::path::Path,
    within: Duration,
) -> std::result::Result<(), String> {
    use titus_security::{certs, Identity, Kind};
    let identity = Identity::new(Kind::Agent, config.agent_id.clone())?;
    let request = certs::new_csr(&identity).map_err(|e| format!("certificate request: {e}"))?;
    let deadline = tokio::time::Instant::now() + within;
    let servers = &config.servers;
    let (mut last, mut hint, mut i) = (String::new(), None::<String>, 0);
    while tokio::time::Instant::now() < deadline {
        let addr = hint.take().unwrap_or_else(|| {
            i += 1;
            servers[i % servers.len()].clone()
        });
        let attempt = async {
            let channel = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())?
                .connect_with_connector(titus_security::Connector::new(Some(tls.clone()), Duration::from_secs(2)))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut call = tonic::Request::new(pb::EnrollAgentRequest {
                agent_id: config.agent_id.clone(),
                csr_pem: request.cert.clone(),
            });
            call.set_timeout(Duration::from_secs(5));
            if let Some(b) = &bearer {
                call.metadata_mut().insert("authorization", b.clone());
            }
            AgentServiceClient::new(channel).enroll_agent(call).await.map_err(|s| {
                hint = s.metadata().get(LEADER_HINT).and_then(|v| v.to_str().ok()).map(str::to_string);
                format!("{:?}: {}", s.code(), s.message())
            })
        };
        match attempt.await {
            Ok(response) => {
                let pem = certs::Pem { cert: response.into_inner().certificate_pem, key: request.key.clone() };
                certs::write_files(cert, key, &pem).map_err(|e| format!("writing the certificate: {e}"))?;
                tracing::info!(cert = %cert.display(), "certificate obtained from the control plane and written");
                return Ok(());
            }
            Err(e)
                if e.starts_with("PermissionDenied")
                    || e.starts_with("InvalidArgument")
                    || e.starts_with("Unauthenticated")
                    || e.starts_with("FailedPrecondition") =>
            {
                return Err(format!("refused by {addr}: {e}"));
            }
            Err(e) => {
                tracing::warn!(server = %addr, error = %e, "certificate request failed; trying again");
                last = e;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Err(format!("no server signed a certificate within {within:?}; last error: {last}"))
}

/// Whether a certificate valid from `not_before` to `not_after` is due for renewal at `now`: in
/// the last third of its life.
pub fn due_for_renewal(not_before: i64, not_after: i64, now: i64) -> bool {
    not_after <= not_before || now >= not_after - (not_after - not_before) / 3
}

/// How often an enrolled agent checks its certificate's age.
const RENEWAL_CHECK: Duration = Duration::from_secs(3600);

/// Keeps an enrolled agent's certificate fresh: checks it every hour (and at start) and, in the
/// last third of its life, has the leader sign a new one, authenticated by the current one; the
/// reloader then takes the new files. Failures are logged and tried again at the next check.
async fn renew_while_running(config: AgentConfig, tls: Arc<titus_security::Tls>) {
    let (Some(cert), Some(key)) = (config.tls_cert.clone(), config.tls_key.clone()) else { return };
    loop {
        let validity = titus_security::tls::read_cert_der(&cert)
            .map_err(|e| e.to_string())
            .and_then(|der| titus_security::identity::validity_ms(&der));
        match validity {
            Ok((from, until)) if due_for_renewal(from, until, now_ms()) => {
                match request_certificate(&config, tls.clone(), None, &cert, &key, Duration::from_secs(60)).await {
                    Ok(()) => tracing::info!("certificate renewed"),
                    Err(e) => tracing::warn!(error = %e, "certificate renewal failed; trying again in an hour"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, cert = %cert.display(), "cannot read the certificate's validity"),
        }
        tokio::time::sleep(RENEWAL_CHECK).await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Runs one agent over `docker` until `shutdown` completes.
pub async fn run_with(config: AgentConfig, docker: Runtime, shutdown: impl Future<Output = ()>) -> Result<()> {
    let (reports_tx, mut reports_rx) = mpsc::unbounded_channel();
    let tls = load_tls(&config).await?;
    let config_finished_logs = config.finished_logs.for_agent(&config.agent_id);
    let agent = Arc::new(Agent {
        config,
        docker,
        killing: Mutex::default(),
        oom_killed: Mutex::default(),
        ops: Mutex::default(),
        reports: reports_tx,
        tls,
        finished_logs: config_finished_logs,
        sessions: Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS)),
    });
    let watcher = tokio::spawn(watch_deaths(agent.clone()));
    let prober = tokio::spawn(watch_probes(agent.clone()));
    let (admin_stop, admin_stopped) = tokio::sync::watch::channel(false);
    if let Some(addr) = agent.config.admin_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| crate::Error::Config(format!("admin-listen {addr}: {e}")))?;
        tracing::info!(%addr, "admin port: /metrics /healthz /readyz");
        tokio::spawn(titus_obs::admin::serve(listener, crate::telemetry::handler(), admin_stopped));
    }
    tokio::pin!(shutdown);

    let seeds = agent.config.servers.clone();
    let mut next = rand::thread_rng().gen_range(0..seeds.len());
    let mut hint: Option<String> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let addr = hint.take().unwrap_or_else(|| {
            next = (next + 1) % seeds.len();
            seeds[next].clone()
        });
        let span = tracing::info_span!("session", agent_id = %agent.config.agent_id, server = %addr);
        let outcome = tokio::select! {
            o = tracing::Instrument::instrument(session(&agent, &addr, &mut reports_rx), span) => o,
            _ = &mut shutdown => break,
        };
        let m = crate::telemetry::metrics();
        m.connected.set(&[], 0.0);
        m.sessions_total.inc(&[match &outcome {
            Ok(()) => "closed",
            Err(SessionEnd { leader: Some(_), .. }) => "redirected",
            Err(_) => "failed",
        }]);
        match outcome {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(SessionEnd { message, leader }) => {
                tracing::info!(%addr, %message, ?leader, "stream to the control plane ended; reconnecting");
                if leader.is_some() {
                    hint = leader;
                    backoff = Duration::from_millis(50);
                }
            }
        }
        let pause = backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = &mut shutdown => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    watcher.abort();
    prober.abort();
    let _ = admin_stop.send(true);
    tracing::info!("agent stopped; its containers keep running");
    Ok(())
}

struct SessionEnd {
    message: String,
    leader: Option<String>,
}

fn end(status: &tonic::Status) -> SessionEnd {
    let leader = status.metadata().get(LEADER_HINT).and_then(|v| v.to_str().ok()).map(str::to_string);
    SessionEnd { message: format!("{:?}: {}", status.code(), status.message()), leader }
}

/// One stream to one replica; returns when it ends.
async fn session(
    agent: &Arc<Agent>,
    addr: &str,
    reports: &mut mpsc::UnboundedReceiver<pb::AgentTask>,
) -> std::result::Result<(), SessionEnd> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| SessionEnd { message: e.to_string(), leader: None })?
        .connect_timeout(Duration::from_millis(500))
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(3));
    let connector = titus_security::Connector::new(agent.tls.clone(), Duration::from_millis(2000));
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| SessionEnd { message: format!("connect: {e}"), leader: None })?;
    let (out_tx, out_rx) = mpsc::channel(1024);
    let _ = out_tx.send(agent.register_message().await).await;
    // The leader answers a registration once it has committed it (within its request timeout);
    // a replica that does not answer at all is given up on, never waited on for ever.
    let mut client = AgentServiceClient::new(channel.clone());
    let attach = client.attach(ReceiverStream::new(out_rx));
    let mut inbound = tokio::time::timeout(ATTACH_TIMEOUT, attach)
        .await
        .map_err(|_| SessionEnd {
            message: format!("no answer to the registration within {} s", ATTACH_TIMEOUT.as_secs()),
            leader: None,
        })?
        .map_err(|s| end(&s))?
        .into_inner();
    let mut heartbeat = tokio::time::interval(Duration::from_millis(1000));
    loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(m)) => {
                    if let Some(pb::control_message::Message::Registered(r)) = &m.message {
                        crate::telemetry::metrics().connected.set(&[], 1.0);
                        heartbeat = tokio::time::interval(Duration::from_millis(r.heartbeat_interval_ms.max(100)));
                    }
                    match m.message {
                        Some(pb::control_message::Message::OpenSession(o)) => {
                            tokio::spawn(agent.clone().serve_session(channel.clone(), o));
                        }
                        Some(m) => agent.handle(m).await,
                        None => {}
                    }
                }
                Ok(None) => return Err(SessionEnd { message: "the leader closed the stream".into(), leader: None }),
                Err(status) => return Err(end(&status)),
            },
            Some(report) = reports.recv() => {
                let m = pb::AgentMessage { message: Some(pb::agent_message::Message::Status(report)) };
                if out_tx.send(m).await.is_err() {
                    return Err(SessionEnd { message: "stream closed while reporting".into(), leader: None });
                }
            }
            _ = heartbeat.tick() => {
                let (healthy, unhealthy_reason) = match agent.docker.health().await {
                    Ok(()) => (true, String::new()),
                    Err(reason) => (false, reason),
                };
                crate::telemetry::metrics().docker_healthy.set(&[], if healthy { 1.0 } else { 0.0 });
                let m = pb::AgentMessage { message: Some(pb::agent_message::Message::Heartbeat(pb::AgentHeartbeat { healthy, unhealthy_reason })) };
                if out_tx.send(m).await.is_err() {
                    return Err(SessionEnd { message: "stream closed".into(), leader: None });
                }
            }
        }
    }
}

/// The grace a forgotten task's container gets: the control plane's (in ms, rounded up to whole
/// seconds, at most an hour), or `fallback` when it sent none.
fn forget_grace_secs(grace_period_ms: u64, fallback: i64) -> i64 {
    match grace_period_ms {
        0 => fallback,
        ms => i64::try_from(ms.div_ceil(1000)).unwrap_or(i64::MAX).min(3600),
    }
}

#[cfg(test)]
mod renewal_tests {
    use super::due_for_renewal;

    #[test]
    fn a_certificate_is_renewed_in_the_last_third_of_its_life() {
        let (from, until) = (0, 300);
        assert!(!due_for_renewal(from, until, 100));
        assert!(!due_for_renewal(from, until, 199));
        assert!(due_for_renewal(from, until, 200));
        assert!(due_for_renewal(from, until, 400), "expired: renew at once");
        assert!(due_for_renewal(10, 5, 0), "nonsense validity: renew");
    }
}

#[cfg(test)]
mod ordering_tests {
    use super::*;

    fn agent() -> (Arc<Agent>, mpsc::UnboundedReceiver<pb::AgentTask>) {
        let config: AgentConfig =
            toml::from_str("agent-id = \"a1\"\nservers = [\"127.0.0.1:1\"]\ninsecure = true").unwrap();
        let (reports, rx) = mpsc::unbounded_channel();
        let agent = Agent {
            config,
            docker: Runtime::Simulated(SimRuntime::default()),
            killing: Mutex::default(),
            oom_killed: Mutex::default(),
            ops: Mutex::default(),
            reports,
            tls: None,
            finished_logs: crate::config::FinishedLogsConfig::default().for_agent("a1"),
            sessions: Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS)),
        };
        (Arc::new(agent), rx)
    }

    fn assign(task_id: &str) -> pb::control_message::Message {
        pb::control_message::Message::Assign(pb::TaskAssignment {
            task_id: task_id.into(),
            job_id: "j1".into(),
            ..Default::default()
        })
    }

    fn kill(task_id: &str) -> pb::control_message::Message {
        pb::control_message::Message::Kill(pb::KillTaskCommand { task_id: task_id.into(), grace_period_ms: 0 })
    }

    /// Until every task's queue of operations is done (bounded).
    async fn drained(agent: &Agent) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !agent.ops.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            assert!(std::time::Instant::now() < deadline, "operations still queued after 5 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn states(rx: &mut mpsc::UnboundedReceiver<pb::AgentTask>) -> Vec<(pb::TaskState, String)> {
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            out.push((pb::TaskState::try_from(r.state).unwrap(), r.reason_code));
        }
        out
    }

    /// Assign, Kill and Forget once ran as independent tasks: a kill could overtake the launch it
    /// was meant to cancel, and the container then ran with its resources freed.
    #[tokio::test]
    async fn a_task_killed_before_its_container_starts_never_starts() {
        let (agent, mut rx) = agent();
        agent.handle(assign("t1")).await;
        agent.handle(kill("t1")).await;
        drained(&agent).await;
        assert!(agent.docker.observe_with("t1", false, false).await.unwrap().is_none(), "it never started");
        let seen = states(&mut rx);
        assert!(seen.iter().all(|(s, _)| *s == pb::TaskState::TaskFinished), "{seen:?}");
        assert!(seen.iter().any(|(_, reason)| reason == "killed"), "{seen:?}");
    }

    #[tokio::test]
    async fn operations_on_one_task_run_in_the_order_sent() {
        let (agent, mut rx) = agent();
        agent.handle(assign("t2")).await;
        drained(&agent).await;
        let started = states(&mut rx);
        assert_eq!(started.last().map(|s| s.0), Some(pb::TaskState::TaskStarted), "{started:?}");
        agent.handle(kill("t2")).await;
        agent
            .handle(pb::control_message::Message::Forget(pb::ForgetTask { task_id: "t2".into(), grace_period_ms: 0 }))
            .await;
        drained(&agent).await;
        // Stopped, then forgotten — in that order: nothing of it is left, and it was reported killed.
        assert!(agent.docker.observe_with("t2", false, false).await.unwrap().is_none());
        let stopped = states(&mut rx);
        assert!(stopped.iter().any(|(s, r)| *s == pb::TaskState::TaskFinished && r == "killed"), "{stopped:?}");
    }

    #[test]
    fn a_forget_stops_with_the_grace_the_control_plane_sends() {
        assert_eq!(forget_grace_secs(10_000, 3), 10);
        assert_eq!(forget_grace_secs(1, 3), 1);
        assert_eq!(forget_grace_secs(0, 3), 3, "an older control plane sends none: the agent's own");
        assert_eq!(forget_grace_secs(u64::MAX, 3), 3600);
    }
}
