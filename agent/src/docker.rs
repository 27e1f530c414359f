//! The container runtime over the local Docker daemon (bollard).
//!
//! One container per task, named `titus-<task id>` and labelled with the task, job and agent ids:
//! Docker refuses a second container of the same name, so a task id can never run twice, and after
//! a restart the agent finds its containers by label and adopts them. An exited container is kept
//! as a tombstone until the control plane says to forget the task. Images are never pulled.

use std::collections::HashMap;

use bollard::container::{
    Config, CreateContainerOptions, InspectContainerOptions, ListContainersOptions, RemoveContainerOptions,
    StopContainerOptions,
};
use bollard::errors::Error as DockerError;
use bollard::models::HostConfig;
use bollard::system::EventsOptions;
use bollard::Docker;
use futures::Stream;
use titus_proto as pb;

use crate::{AgentConfig, Error, Result};

pub const LABEL_TASK: &str = "titus.task.id";
pub const LABEL_JOB: &str = "titus.job.id";
pub const LABEL_AGENT: &str = "titus.agent.id";

/// What the daemon said happened to a task's container.
pub enum Death {
    /// The kernel OOM-killed a process in it (Docker's "oom" event; "die" follows).
    OutOfMemory(String),
    Exited(String),
}

pub fn container_name(task_id: &str) -> String {
    format!("titus-{task_id}")
}

#[derive(Clone)]
pub struct DockerRuntime {
    /// Connected lazily and again after failures, so the agent runs (reporting itself unhealthy)
    /// while the daemon is away.
    docker: std::sync::Arc<tokio::sync::Mutex<Option<Docker>>>,
    socket: Option<String>,
    agent_id: String,
    network: Option<String>,
}

/// A container's state as a task state.
pub struct Observed {
    pub task_id: String,
    pub container_id: String,
    pub state: pb::TaskState,
    pub reason_code: String,
    pub reason_message: String,
    pub context: HashMap<String, String>,
}

impl Observed {
    pub fn to_proto(&self) -> pb::AgentTask {
        pb::AgentTask {
            task_id: self.task_id.clone(),
            state: self.state as i32,
            container_id: self.container_id.clone(),
            reason_code: self.reason_code.clone(),
            reason_message: self.reason_message.clone(),
            task_context: self.context.clone(),
        }
    }
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code: 404, .. })
}

impl DockerRuntime {
    /// A runtime for the local daemon; connects on first use (see [`DockerRuntime::client`]).
    pub async fn connect(config: &AgentConfig) -> Result<DockerRuntime> {
        let runtime = DockerRuntime {
            docker: Default::default(),
            socket: config.docker_socket.clone(),
            agent_id: config.agent_id.clone(),
            network: config.network.clone(),
        };
        if let Err(e) = runtime.client().await {
            tracing::warn!(error = %e, "docker daemon unreachable; reporting unhealthy until it answers");
        }
        Ok(runtime)
    }

    /// The connected client, connecting (and negotiating the API version — Debian's daemon speaks
    /// an older API than bollard's default) when there is none yet.
    async fn client(&self) -> Result<Docker> {
        let mut slot = self.docker.lock().await;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let docker = match &self.socket {
            Some(path) => Docker::connect_with_socket(path, 120, bollard::API_DEFAULT_VERSION),
            None => Docker::connect_with_local_defaults(),
        }
        .map_err(|e| Error::Docker(format!("cannot connect: {e}")))?;
        let docker = docker.negotiate_version().await.map_err(|e| Error::Docker(format!("unreachable: {e}")))?;
        *slot = Some(docker.clone());
        Ok(docker)
    }

    /// Drops the client after a connection failure, so the next call reconnects.
    async fn forget_client(&self) {
        *self.docker.lock().await = None;
    }

    /// Whether the daemon answers; the reason when it does not.
    pub async fn health(&self) -> std::result::Result<(), String> {
        let docker = self.client().await.map_err(|e| format!("docker daemon unreachable: {e}"))?;
        match docker.ping().await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.forget_client().await;
                Err(format!("docker daemon unreachable: {e}"))
            }
        }
    }

    /// The subnets of the Docker network its containers join (the daemon's default bridge unless
    /// configured): where their addresses come from, declared at registration so that the control
    /// plane keeps no other containerIp. `host` and `none` networks have none.
    pub async fn container_networks(&self) -> Result<Vec<String>> {
        let name = self.network.clone().unwrap_or_else(|| "bridge".to_string());
        if name == "host" || name == "none" {
            return Ok(Vec::new());
        }
        let network = self
            .client()
            .await?
            .inspect_network(&name, None::<bollard::network::InspectNetworkOptions<String>>)
            .await
            .map_err(|e| Error::Docker(format!("inspecting network {name:?}: {e}")))?;
        Ok(network
            .ipam
            .and_then(|ipam| ipam.config)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| c.subnet.filter(|s| !s.is_empty()))
            .collect())
    }

    /// Every container of this agent, as task states.
    pub async fn tasks(&self) -> Result<Vec<Observed>> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_AGENT}={}", self.agent_id)])]);
        let list = self
            .client()
            .await?
            .list_containers(Some(ListContainersOptions::<String> { all: true, filters, ..Default::default() }))
            .await
            .map_err(|e| Error::Docker(e.to_string()))?;
        let mut out = Vec::new();
        for c in list {
            let Some(task_id) = c.labels.as_ref().and_then(|l| l.get(LABEL_TASK)).cloned() else { continue };
            if let Some(o) = self.observe(&task_id, false).await? {
                out.push(o);
            }
        }
        Ok(out)
    }

    /// The task's container as a task state; `killed` says the agent stopped it on request.
    pub async fn observe(&self, task_id: &str, killed: bool) -> Result<Option<Observed>> {
        self.observe_with(task_id, killed, false).await
    }

    /// Like `observe`; `oom_seen` says the daemon reported an OOM kill for it (Docker's
    /// `OOMKilled` flag alone can miss one).
    pub async fn observe_with(&self, task_id: &str, killed: bool, oom_seen: bool) -> Result<Option<Observed>> {
        let docker = self.client().await?;
        let c = match docker.inspect_container(&container_name(task_id), None::<InspectContainerOptions>).await {
            Ok(c) => c,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(Error::Docker(e.to_string())),
        };
        let st = c.state.unwrap_or_default();
        let mut context = HashMap::new();
        let ip = c.network_settings.as_ref().and_then(|n| {
            n.ip_address.clone().filter(|ip| !ip.is_empty()).or_else(|| {
                n.networks.as_ref()?.values().find_map(|e| e.ip_address.clone().filter(|ip| !ip.is_empty()))
            })
        });
        if let Some(ip) = ip {
            context.insert("containerIp".to_string(), ip);
        }
        let status = st.status.map(|s| s.to_string()).unwrap_or_default();
        let (state, reason_code, reason_message) = match status.as_str() {
            "running" | "paused" | "restarting" => (pb::TaskState::TaskStarted, String::new(), String::new()),
            "created" => (pb::TaskState::TaskStartInitiated, String::new(), String::new()),
            _ => {
                let code = st.exit_code.unwrap_or(-1);
                context.insert("exitCode".to_string(), code.to_string());
                if killed {
                    (pb::TaskState::TaskFinished, "killed".to_string(), format!("killed on request (exit code {code})"))
                } else if st.oom_killed.unwrap_or(false) || oom_seen {
                    (
                        pb::TaskState::TaskFinished,
                        "failed".to_string(),
                        "OOM killed: the container exceeded its memory limit".to_string(),
                    )
                } else if code == 0 {
                    (pb::TaskState::TaskFinished, "normal".to_string(), "exited with code 0".to_string())
                } else {
                    let err = st.error.filter(|e| !e.is_empty()).map(|e| format!(": {e}")).unwrap_or_default();
                    (pb::TaskState::TaskFinished, "failed".to_string(), format!("exited with code {code}{err}"))
                }
            }
        };
        Ok(Some(Observed {
            task_id: task_id.to_string(),
            container_id: c.id.unwrap_or_default(),
            state,
            reason_code,
            reason_message,
            context,
        }))
    }

    /// Creates and starts the task's container. Adopts an existing one instead of creating a
    /// second. Returns the states it went through.
    /// Creates and starts the task's container, unless `killed()` says a kill arrived meanwhile:
    /// checked before the container is created and again before it is started, so a task killed
    /// before its container starts never starts (a created one is removed).
    pub async fn launch(
        &self,
        assign: &pb::TaskAssignment,
        killed: &(dyn Fn() -> bool + Send + Sync),
    ) -> Vec<Observed> {
        let task_id = &assign.task_id;
        let fail = |code: &str, message: String| Observed {
            task_id: task_id.clone(),
            container_id: String::new(),
            state: pb::TaskState::TaskFinished,
            reason_code: code.into(),
            reason_message: message,
            context: HashMap::new(),
        };
        let t0 = std::time::Instant::now();
        let step = |what: &str| tracing::debug!(task_id = %task_id, step = what, elapsed_ms = t0.elapsed().as_millis() as u64, "launch");
        match self.observe(task_id, false).await {
            Ok(Some(existing)) => return vec![existing], // never run a task id twice
            Ok(None) => {}
            Err(e) => return vec![fail("localSystemError", e.to_string())],
        }
        if killed() {
            return vec![killed_before_start(task_id)];
        }
        let container = assign.container.clone().unwrap_or_default();
        let image = container.image.unwrap_or_default();
        let image_ref = if !image.digest.is_empty() {
            format!("{}@{}", image.name, image.digest)
        } else {
            format!("{}:{}", image.name, image.tag)
        };
        let docker = match self.client().await {
            Ok(d) => d,
            Err(e) => return vec![fail("localSystemError", e.to_string())],
        };
        match docker.inspect_image(&image_ref).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {
                return vec![fail(
                    "failed",
                    format!("image {image_ref} is not present on this agent (images are never pulled)"),
                )]
            }
            Err(e) => return vec![fail("localSystemError", format!("inspecting image {image_ref}: {e}"))],
        }
        step("image checked");
        let r = container.resources.unwrap_or_default();
        let labels = HashMap::from([
            (LABEL_TASK.to_string(), task_id.clone()),
            (LABEL_JOB.to_string(), assign.job_id.clone()),
            (LABEL_AGENT.to_string(), self.agent_id.clone()),
        ]);
        let host_config = HostConfig {
            nano_cpus: Some((r.cpu * 1e9) as i64),
            memory: Some(r.memory_mb as i64 * 1024 * 1024),
            shm_size: (r.shm_size_mb > 0).then_some(r.shm_size_mb as i64 * 1024 * 1024),
            network_mode: self.network.clone(),
            ..Default::default()
        };
        let config = Config {
            image: Some(image_ref.clone()),
            entrypoint: (!container.entry_point.is_empty()).then_some(container.entry_point.clone()),
            cmd: (!container.command.is_empty()).then_some(container.command.clone()),
            env: Some(container.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        };
        let name = container_name(task_id);
        let created = match docker
            .create_container(Some(CreateContainerOptions { name: name.clone(), platform: None }), config)
            .await
        {
            Ok(c) => c,
            // Another launch of the same task won the race: adopt it.
            Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => {
                return self.observe(task_id, false).await.ok().flatten().into_iter().collect();
            }
            Err(e) => return vec![fail("failed", format!("creating the container: {e}"))],
        };
        step("created");
        let mut states = vec![Observed {
            task_id: task_id.clone(),
            container_id: created.id.clone(),
            state: pb::TaskState::TaskStartInitiated,
            reason_code: String::new(),
            reason_message: "container created".into(),
            context: HashMap::new(),
        }];
        if killed() {
            if let Err(e) = self.remove(task_id).await {
                tracing::warn!(task_id = %task_id, error = %e, "cannot remove the container of a task killed before it started");
            }
            states.push(killed_before_start(task_id));
            return states;
        }
        if let Err(e) = docker.start_container::<String>(&name, None).await {
            states.push(fail("failed", format!("starting the container: {e}")));
            return states;
        }
        step("started");
        match self.observe(task_id, false).await {
            // Already exited: its "die" event (which knows about OOM kills) reports how.
            Ok(Some(o)) if o.state == pb::TaskState::TaskFinished => {}
            Ok(Some(o)) => states.push(o),
            Ok(None) => states.push(fail("localSystemError", "the container vanished right after starting".into())),
            Err(e) => states.push(fail("localSystemError", e.to_string())),
        }
        states
    }

    /// SIGTERM, then SIGKILL after `grace_secs`.
    pub async fn stop(&self, task_id: &str, grace_secs: i64) -> Result<bool> {
        match self
            .client()
            .await?
            .stop_container(&container_name(task_id), Some(StopContainerOptions { t: grace_secs }))
            .await
        {
            Ok(()) => Ok(true),
            Err(DockerError::DockerResponseServerError { status_code: 304, .. }) => Ok(true), // already stopped
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(Error::Docker(e.to_string())),
        }
    }

    pub async fn remove(&self, task_id: &str) -> Result<()> {
        let opts = RemoveContainerOptions { force: true, ..Default::default() };
        match self.client().await?.remove_container(&container_name(task_id), Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(Error::Docker(e.to_string())),
        }
    }

    /// Container deaths and OOM kills of this agent's containers, by task id.
    pub async fn deaths(&self) -> Result<impl Stream<Item = std::result::Result<Death, String>> + Send + 'static> {
        use futures::StreamExt;
        let docker = self.client().await?;
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("event".to_string(), vec!["die".to_string(), "oom".to_string()]),
            ("label".to_string(), vec![format!("{LABEL_AGENT}={}", self.agent_id)]),
        ]);
        Ok(docker.events(Some(EventsOptions::<String> { filters, ..Default::default() })).filter_map(|e| async move {
            match e {
                Ok(ev) => {
                    let oom = ev.action.as_deref() == Some("oom");
                    let task = ev.actor.and_then(|a| a.attributes).and_then(|attrs| attrs.get(LABEL_TASK).cloned())?;
                    Some(Ok(if oom { Death::OutOfMemory(task) } else { Death::Exited(task) }))
                }
                Err(e) => Some(Err(e.to_string())),
            }
        }))
    }
}

/// What a task killed before its container started reports: Finished, killed.
pub fn killed_before_start(task_id: &str) -> Observed {
    Observed {
        task_id: task_id.to_string(),
        container_id: String::new(),
        state: pb::TaskState::TaskFinished,
        reason_code: "killed".into(),
        reason_message: "killed before its container started".into(),
        context: HashMap::new(),
    }
}
