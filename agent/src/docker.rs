//! The container runtime over the local Docker daemon (bollard).
//!
//! One container per task, named `titus-<task id>` and labelled with the task, job and agent ids:
//! Docker refuses a second container of the same name, so a task id can never run twice, and after
//! a restart the agent finds its containers by label and adopts them. An exited container is kept
//! as a tombstone until the control plane says to forget the task. Images are never pulled.
//!
//! Every container is confined by default: no-new-privileges, without the NET_RAW (raw sockets),
//! MKNOD and AUDIT_WRITE capabilities, a process limit, bounded log files, its disk limited where
//! the storage driver can, and — unless the agent names one network for all — on its job's own
//! network ([`crate::networks`]), at an address the agent picks so that the metadata proxy knows
//! the container by it before it runs ([`crate::identity`]).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bollard::container::{
    Config, CreateContainerOptions, InspectContainerOptions, ListContainersOptions, NetworkingConfig,
    RemoveContainerOptions, StopContainerOptions,
};
use bollard::errors::Error as DockerError;
use bollard::models::{EndpointIpamConfig, EndpointSettings, HostConfig, HostConfigLogConfig, Ipam, IpamConfig};
use bollard::network::{CreateNetworkOptions, ListNetworksOptions};
use bollard::system::EventsOptions;
use bollard::Docker;
use futures::Stream;
use titus_proto as pb;

use crate::identity::{container_env, random_token, EnvContext, Identities, LABEL_APP, LABEL_IMDS_V1, LABEL_ROLE};
use crate::networks::{job_network_name, valid_job_id, SubnetPool, JOB_SUBNET_PREFIX};
use crate::routes::Routes;
use crate::{AgentConfig, Error, Result};

pub const LABEL_TASK: &str = "titus.task.id";
pub const LABEL_JOB: &str = "titus.job.id";
pub const LABEL_AGENT: &str = "titus.agent.id";

/// Capabilities Docker grants by default that a task does not get: raw sockets (spoofing, sniffing
/// the host's bridge), device nodes, and writing the kernel's audit log.
pub const DROPPED_CAPABILITIES: [&str; 3] = ["NET_RAW", "MKNOD", "AUDIT_WRITE"];

/// What the daemon said happened to a task's container.
pub enum Death {
    /// The kernel OOM-killed a process in it (Docker's "oom" event; "die" follows).
    OutOfMemory(String),
    Exited(String),
    /// Its health check's verdict changed (Docker's `health_status` event).
    Health(String),
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
    /// The pool of per-job networks; None when every container joins `network`.
    job_networks: Option<SubnetPool>,
    pids_limit: i64,
    log_max_mb: u32,
    log_max_files: u32,
    /// Held (shared) by a launch from making sure its job's network exists until its container
    /// exists, and (exclusively) by removing a job's network once it has no container: a network
    /// is never removed under a container being created in it.
    network_use: Arc<tokio::sync::RwLock<()>>,
    /// One network created at a time, so two launches of one job make one network.
    network_create: Arc<tokio::sync::Mutex<()>>,
    /// Cleared when the storage driver refuses a disk size (only overlay2 on xfs with pquota,
    /// btrfs and zfs take one): the limit is then not asked for again, and said once in the log.
    disk_quota: Arc<AtomicBool>,
    /// The tasks the metadata proxy serves; None when it is off (`aws.metadata = false`).
    identities: Option<Arc<Identities>>,
    /// Routes from job networks to the proxy; None when the operator routes (or no proxy).
    routes: Option<Routes>,
    /// Addresses picked for tasks on job networks, by task id: a container holds its address in
    /// the network only once started, so the ones being created are kept apart here.
    addresses: Arc<Mutex<HashMap<String, Ipv4Addr>>>,
    /// The host's instance id (attribute `instanceId`), for TITUS_HOST_EC2_INSTANCE_ID.
    host_instance_id: String,
    /// The host's zone (attribute `zone`) and region, for the containers' environment.
    zone: String,
    region: String,
    /// The HTTP health checks the agent makes (command checks are the daemon's).
    pub probes: crate::health::Probes,
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
            task_context: self.context.clone().into_iter().collect(),
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
            job_networks: match &config.network {
                Some(_) => None,
                None => Some(
                    SubnetPool::parse(&config.job_networks).map_err(|e| Error::Config(format!("job-networks: {e}")))?,
                ),
            },
            pids_limit: config.pids_limit,
            log_max_mb: config.log_max_mb,
            log_max_files: config.log_max_files,
            network_use: Default::default(),
            network_create: Default::default(),
            disk_quota: Arc::new(AtomicBool::new(true)),
            identities: None,
            routes: None,
            addresses: Default::default(),
            host_instance_id: config.attributes.get("instanceId").cloned().unwrap_or_default(),
            zone: config.attributes.get("zone").cloned().unwrap_or_default(),
            region: crate::identity::region(&config.aws, &config.attributes),
            probes: Default::default(),
        };
        let mut runtime = runtime;
        if config.aws.metadata {
            let identities = Identities::new(&config.aws, &config.attributes).await;
            let port = crate::metadata::serve(identities.clone(), config.aws.metadata_port)
                .await
                .map_err(|e| Error::Config(format!("aws.metadata-port {}: {e}", config.aws.metadata_port)))?;
            tracing::info!(port, region = %identities.region, "metadata proxy listening");
            runtime.identities = Some(identities);
            if config.aws.metadata_route && runtime.job_networks.is_some() {
                runtime.routes = Some(Routes::new(&config.agent_id, port));
            }
        }
        if let Err(e) = runtime.client().await {
            tracing::warn!(error = %e, "docker daemon unreachable; reporting unhealthy until it answers");
        }
        Ok(runtime)
    }

    /// The connected client, connecting (and negotiating the API version — Debian's daemon speaks
    /// an older API than bollard's default) when there is none yet.
    pub(crate) async fn client(&self) -> Result<Docker> {
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
        if let Some(pool) = &self.job_networks {
            let mut networks = vec![pool.to_string()];
            // Containers this agent started on the default bridge before it had job networks
            // (adopted across an upgrade) keep their addresses: that bridge is declared too, while
            // any of them is left.
            let filters = HashMap::from([
                ("label".to_string(), vec![format!("{LABEL_AGENT}={}", self.agent_id)]),
                ("network".to_string(), vec!["bridge".to_string()]),
            ]);
            let on_bridge = self
                .client()
                .await?
                .list_containers(Some(ListContainersOptions::<String> { all: true, filters, ..Default::default() }))
                .await
                .map_err(|e| Error::Docker(format!("listing containers: {e}")))?;
            if !on_bridge.is_empty() {
                networks.extend(self.subnets_of("bridge").await?);
            }
            return Ok(networks);
        }
        let name = self.network.clone().unwrap_or_else(|| "bridge".to_string());
        if name == "host" || name == "none" {
            return Ok(Vec::new());
        }
        self.subnets_of(&name).await
    }

    /// The subnets of Docker network `name`.
    async fn subnets_of(&self, name: &str) -> Result<Vec<String>> {
        let network = self
            .client()
            .await?
            .inspect_network(name, None::<bollard::network::InspectNetworkOptions<String>>)
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
        if status == "running" {
            let labels = c.config.as_ref().and_then(|c| c.labels.as_ref());
            let http = labels
                .and_then(|l| l.get(crate::health::LABEL_HTTP_CHECK))
                .and_then(|l| crate::health::HttpCheck::parse_label(l));
            let health = match (http, context.get("containerIp").cloned()) {
                (Some(check), Some(ip)) => {
                    let (runtime, id) = (self.clone(), task_id.to_string());
                    let running: crate::health::Running = Arc::new(move || {
                        let (runtime, id) = (runtime.clone(), id.clone());
                        Box::pin(async move { runtime.is_running(&id).await })
                    });
                    self.probes.ensure(task_id, ip, check, running);
                    self.probes.verdict(task_id).map(str::to_string)
                }
                _ => st.health.as_ref().and_then(|h| h.status).map(|s| s.to_string()),
            };
            if let Some(h) = health.filter(|h| ["starting", "healthy", "unhealthy"].contains(&h.as_str())) {
                context.insert("health".to_string(), h);
            }
        }
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

    /// Whether the task's container runs.
    pub async fn is_running(&self, task_id: &str) -> bool {
        let Ok(docker) = self.client().await else { return true };
        match docker.inspect_container(&container_name(task_id), None::<InspectContainerOptions>).await {
            Ok(c) => c.state.and_then(|s| s.running).unwrap_or(false),
            Err(e) => !is_not_found(&e),
        }
    }

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
        let mut labels = HashMap::from([
            (LABEL_TASK.to_string(), task_id.clone()),
            (LABEL_JOB.to_string(), assign.job_id.clone()),
            (LABEL_AGENT.to_string(), self.agent_id.clone()),
        ]);
        // Capabilities the job was granted (the control plane checked its capacity group allows
        // them); a name that is not one is refused here too rather than handed to the daemon.
        let added: Vec<String> = container.capabilities.clone();
        if let Some(bad) =
            added.iter().find(|c| c.is_empty() || !c.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_'))
        {
            return vec![fail("failed", format!("capability {bad:?} is not a capability name"))];
        }
        let dropped: Vec<&str> =
            DROPPED_CAPABILITIES.iter().copied().filter(|c| !added.iter().any(|a| a == c)).collect();
        // Held until the container exists: its job's network is not removed meanwhile.
        let network_use = self.network_use.clone().read_owned().await;
        let network = match &self.job_networks {
            None => self.network.clone(),
            Some(pool) => match self.job_network(&docker, pool, &assign.job_id).await {
                Ok(name) => Some(name),
                Err(e) => return vec![fail("localSystemError", e.to_string())],
            },
        };
        // Its address on its job's network, picked here so that the metadata proxy knows the
        // container by it before its first instruction runs; then its identity (and its role's
        // credentials: a role that cannot be had fails the task here).
        let profile = container.security_profile.clone().unwrap_or_default();
        let (address, auth_token) = match self.prepare_identity(&docker, assign, network.as_deref(), &profile).await {
            Ok(prepared) => prepared,
            Err((code, why)) => return vec![fail(code, why)],
        };
        let env = container_env(&EnvContext {
            assign,
            ip: address,
            zone: &self.zone,
            region: &self.region,
            auth_token: auth_token.as_deref(),
            host_instance_id: &self.host_instance_id,
        });
        labels.insert(LABEL_APP.to_string(), assign.application_name.clone());
        if let Some(check) = crate::health::HttpCheck::from_spec(container.health_check.as_ref()) {
            labels.insert(crate::health::LABEL_HTTP_CHECK.to_string(), check.label());
        }
        if !profile.iam_role.is_empty() {
            labels.insert(LABEL_ROLE.to_string(), profile.iam_role.clone());
        }
        if profile.allow_imds_v1 {
            labels.insert(LABEL_IMDS_V1.to_string(), "true".to_string());
        }
        let networking_config = address.zip(network.clone()).map(|(ip, name)| NetworkingConfig {
            endpoints_config: HashMap::from([(
                name,
                EndpointSettings {
                    ipam_config: Some(EndpointIpamConfig { ipv4_address: Some(ip.to_string()), ..Default::default() }),
                    ..Default::default()
                },
            )]),
        });
        let mut host_config = HostConfig {
            nano_cpus: Some((r.cpu * 1e9) as i64),
            memory: Some(r.memory_mb as i64 * 1024 * 1024),
            shm_size: (r.shm_size_mb > 0).then_some(r.shm_size_mb as i64 * 1024 * 1024),
            network_mode: network,
            security_opt: Some(vec!["no-new-privileges:true".to_string()]),
            cap_drop: Some(dropped.iter().map(|c| c.to_string()).collect()),
            cap_add: (!added.is_empty()).then(|| added.clone()),
            pids_limit: Some(self.pids_limit),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_string(), format!("{}m", self.log_max_mb)),
                    ("max-file".to_string(), self.log_max_files.to_string()),
                ])),
            }),
            ..Default::default()
        };
        if r.disk_mb > 0 && self.disk_quota.load(Ordering::Relaxed) {
            host_config.storage_opt = Some(HashMap::from([("size".to_string(), format!("{}M", r.disk_mb))]));
        }
        let mut config = Config {
            image: Some(image_ref.clone()),
            entrypoint: (!container.entry_point.is_empty()).then_some(container.entry_point.clone()),
            cmd: (!container.command.is_empty()).then_some(container.command.clone()),
            env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            host_config: Some(host_config),
            networking_config,
            healthcheck: crate::health::docker_check(container.health_check.as_ref()),
            ..Default::default()
        };
        let name = container_name(task_id);
        let options = || Some(CreateContainerOptions { name: name.clone(), platform: None });
        let mut created = docker.create_container(options(), config.clone()).await;
        if let Err(DockerError::DockerResponseServerError { message, .. }) = &created {
            if message.contains("storage-opt") || message.contains("storage opt") {
                // This driver cannot limit a container's disk: say so once, and stop asking.
                if self.disk_quota.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %message, "the storage driver cannot limit a container's disk; disk-mb is not enforced on this agent");
                }
                if let Some(h) = config.host_config.as_mut() {
                    h.storage_opt = None;
                }
                created = docker.create_container(options(), config).await;
            }
        }
        drop(network_use);
        let created = match created {
            Ok(c) => c,
            // Another launch of the same task won the race: adopt it.
            Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => {
                return self.observe(task_id, false).await.ok().flatten().into_iter().collect();
            }
            Err(e) => {
                self.release(task_id);
                return vec![fail("failed", format!("creating the container: {e}"))];
            }
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

    /// The task's address on its job's network and, when the metadata proxy runs, its token, with
    /// its identity registered (its role's credentials assumed). Err: the failure's reason code and
    /// message, nothing left reserved.
    async fn prepare_identity(
        &self,
        docker: &Docker,
        assign: &pb::TaskAssignment,
        network: Option<&str>,
        profile: &pb::SecurityProfile,
    ) -> std::result::Result<(Option<Ipv4Addr>, Option<String>), (&'static str, String)> {
        let task_id = &assign.task_id;
        let has_role = !profile.iam_role.is_empty();
        let (Some(name), Some(_)) = (network, &self.job_networks) else {
            if has_role {
                return Err(("failed", format!(
                    "IAM role {}: this agent serves role credentials only on job networks (it joins every container to network {:?})",
                    profile.iam_role,
                    self.network.as_deref().unwrap_or("")
                )));
            }
            return Ok((None, None));
        };
        let (ip, subnet) =
            self.pick_address(docker, name, task_id).await.map_err(|e| ("localSystemError", e.to_string()))?;
        let Some(identities) = &self.identities else {
            if has_role {
                self.release(task_id);
                return Err((
                    "failed",
                    format!("IAM role {}: this agent's metadata proxy is off (aws.metadata = false)", profile.iam_role),
                ));
            }
            return Ok((Some(ip), None));
        };
        if let Some(routes) = &self.routes {
            if let Err(e) = routes.add(&subnet).await {
                if has_role {
                    self.release(task_id);
                    return Err(("localSystemError", format!("routing the metadata addresses to the proxy: {e}")));
                }
                tracing::warn!(task_id = %task_id, error = %e, "cannot route the metadata addresses; this task gets no instance metadata");
            }
        }
        let token = random_token();
        let role = Some(profile.iam_role.as_str()).filter(|r| !r.is_empty());
        match identities.admit(task_id, &assign.job_id, ip, role, profile.allow_imds_v1, token.clone()).await {
            Ok(_) => Ok((Some(ip), Some(token))),
            Err(refused) => {
                self.release(task_id);
                Err((refused.reason_code(), refused.why))
            }
        }
    }

    /// A free address for `task_id` on job network `name` (kept for it until [`Self::release`]),
    /// and the network's subnet.
    async fn pick_address(&self, docker: &Docker, name: &str, task_id: &str) -> Result<(Ipv4Addr, String)> {
        let network = docker
            .inspect_network(name, None::<bollard::network::InspectNetworkOptions<String>>)
            .await
            .map_err(|e| Error::Docker(format!("inspecting network {name:?}: {e}")))?;
        let ipam = network.ipam.and_then(|i| i.config).and_then(|c| c.into_iter().next()).unwrap_or_default();
        let subnet = ipam.subnet.unwrap_or_default();
        let base =
            subnet.strip_suffix(&format!("/{JOB_SUBNET_PREFIX}")).and_then(|b| b.parse::<Ipv4Addr>().ok()).ok_or_else(
                || Error::Docker(format!("network {name:?} has subnet {subnet:?}, not a /{JOB_SUBNET_PREFIX}")),
            )?;
        let gateway = ipam.gateway.and_then(|g| g.parse::<Ipv4Addr>().ok());
        let mut used: std::collections::HashSet<Ipv4Addr> = network
            .containers
            .unwrap_or_default()
            .values()
            .filter_map(|c| c.ipv4_address.as_deref()?.split('/').next()?.parse().ok())
            .collect();
        let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        used.extend(addresses.values().copied());
        let base = u32::from(base);
        let free =
            (2..255u32).map(|host| Ipv4Addr::from(base + host)).find(|ip| Some(*ip) != gateway && !used.contains(ip));
        let ip = free.ok_or_else(|| Error::Docker(format!("no free address left on network {name:?}")))?;
        addresses.insert(task_id.to_string(), ip);
        Ok((ip, subnet))
    }

    /// Gives up `task_id`'s address and identity (its container is gone, or never was).
    fn release(&self, task_id: &str) {
        self.addresses.lock().unwrap_or_else(|e| e.into_inner()).remove(task_id);
        if let Some(identities) = &self.identities {
            identities.forget(task_id);
        }
    }

    /// After a restart: routes the metadata addresses again from the job networks left, removing
    /// the previous run's routes. Run at start, after [`Self::prune_job_networks`] and before any
    /// launch (whose route the removal would take).
    pub async fn restore_routes(&self) -> Result<()> {
        let docker = self.client().await?;
        if let Some(routes) = &self.routes {
            routes.remove_all().await.map_err(Error::Docker)?;
            let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_AGENT}={}", self.agent_id)])]);
            let networks = docker
                .list_networks(Some(ListNetworksOptions { filters }))
                .await
                .map_err(|e| Error::Docker(format!("listing networks: {e}")))?;
            for name in networks.into_iter().filter_map(|n| n.name) {
                for subnet in self.subnets_of(&name).await? {
                    routes.add(&subnet).await.map_err(Error::Docker)?;
                }
            }
        }
        Ok(())
    }

    /// After a restart: serves the running containers' identities again, as their labels,
    /// environment and addresses say. Each assumes its role again, so this runs beside the agent's
    /// start rather than before it.
    pub async fn restore_identities(&self) -> Result<()> {
        let docker = self.client().await?;
        let Some(identities) = &self.identities else { return Ok(()) };
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_AGENT}={}", self.agent_id)])]);
        let list = docker
            .list_containers(Some(ListContainersOptions::<String> { all: false, filters, ..Default::default() }))
            .await
            .map_err(|e| Error::Docker(format!("listing containers: {e}")))?;
        for c in list {
            let Some(id) = c.id else { continue };
            let Ok(c) = docker.inspect_container(&id, None::<InspectContainerOptions>).await else { continue };
            let config = c.config.unwrap_or_default();
            let labels = config.labels.unwrap_or_default();
            let (Some(task_id), Some(job_id)) = (labels.get(LABEL_TASK), labels.get(LABEL_JOB)) else { continue };
            let token = config
                .env
                .unwrap_or_default()
                .iter()
                .find_map(|e| e.strip_prefix(&format!("{}=", crate::identity::ENV_TOKEN)).map(str::to_string));
            let ip = c
                .network_settings
                .and_then(|n| n.networks)
                .and_then(|n| n.get(&job_network_name(&self.agent_id, job_id)).and_then(|e| e.ip_address.clone()))
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
            let (Some(token), Some(ip)) = (token, ip) else { continue };
            self.addresses.lock().unwrap_or_else(|e| e.into_inner()).insert(task_id.clone(), ip);
            let role = labels.get(LABEL_ROLE).map(String::as_str);
            let v1 = labels.get(LABEL_IMDS_V1).is_some_and(|v| v == "true");
            if let Err(refused) = identities.admit(task_id, job_id, ip, role, v1, token).await {
                tracing::warn!(task_id = %task_id, error = %refused.why, "an adopted container's role cannot be had; it gets no credentials");
            }
        }
        Ok(())
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

    /// Removes the task's container, and its job's network when no container of the job is left.
    pub async fn remove(&self, task_id: &str) -> Result<()> {
        let docker = self.client().await?;
        let name = container_name(task_id);
        let job_id = match docker.inspect_container(&name, None::<InspectContainerOptions>).await {
            Ok(c) => c.config.and_then(|c| c.labels).and_then(|mut l| l.remove(LABEL_JOB)),
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(Error::Docker(e.to_string())),
        };
        let opts = RemoveContainerOptions { force: true, ..Default::default() };
        match docker.remove_container(&name, Some(opts)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(Error::Docker(e.to_string())),
        }
        self.release(task_id);
        if let (Some(_), Some(job_id)) = (&self.job_networks, job_id) {
            self.remove_job_network_if_unused(&docker, &job_id).await?;
        }
        Ok(())
    }

    /// The network of `job_id`'s containers, created (from the pool's first free subnet) when it
    /// does not exist yet.
    async fn job_network(&self, docker: &Docker, pool: &SubnetPool, job_id: &str) -> Result<String> {
        if !valid_job_id(job_id) {
            return Err(Error::Docker(format!("job id {job_id:?} cannot name a network")));
        }
        let name = job_network_name(&self.agent_id, job_id);
        let _one_at_a_time = self.network_create.lock().await;
        match docker.inspect_network(&name, None::<bollard::network::InspectNetworkOptions<String>>).await {
            Ok(_) => return Ok(name),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(Error::Docker(format!("inspecting network {name:?}: {e}"))),
        }
        // Subnets this daemon's networks hold already (this agent's, other agents' on the host,
        // anyone's): skipped without asking.
        let taken: std::collections::HashSet<String> = docker
            .list_networks(None::<ListNetworksOptions<String>>)
            .await
            .map_err(|e| Error::Docker(format!("listing networks: {e}")))?
            .into_iter()
            .flat_map(|n| n.ipam.and_then(|i| i.config).unwrap_or_default())
            .filter_map(|c| c.subnet)
            .collect();
        for subnet in pool.subnets().filter(|s| !taken.contains(s)) {
            let options = CreateNetworkOptions {
                name: name.clone(),
                driver: "bridge".to_string(),
                check_duplicate: true,
                ipam: Ipam {
                    config: Some(vec![IpamConfig { subnet: Some(subnet.clone()), ..Default::default() }]),
                    ..Default::default()
                },
                labels: HashMap::from([
                    (LABEL_AGENT.to_string(), self.agent_id.clone()),
                    (LABEL_JOB.to_string(), job_id.to_string()),
                ]),
                ..Default::default()
            };
            match docker.create_network(options).await {
                Ok(_) => {
                    tracing::info!(job_id, network = %name, %subnet, "job network created");
                    return Ok(name);
                }
                // Taken meanwhile (another agent on this daemon) or overlapping a network whose
                // subnet is written differently: the next one.
                Err(DockerError::DockerResponseServerError { message, .. }) if message.contains("overlap") => continue,
                Err(e) => return Err(Error::Docker(format!("creating network {name:?} ({subnet}): {e}"))),
            }
        }
        Err(Error::Docker(format!("no free /24 left in job-networks {pool} for job {job_id}'s network")))
    }

    /// Removes `job_id`'s network once none of this agent's containers (running or not) is of
    /// that job.
    async fn remove_job_network_if_unused(&self, docker: &Docker, job_id: &str) -> Result<()> {
        let _no_launch = self.network_use.write().await;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_AGENT}={}", self.agent_id), format!("{LABEL_JOB}={job_id}")],
        )]);
        let left = docker
            .list_containers(Some(ListContainersOptions::<String> { all: true, filters, ..Default::default() }))
            .await
            .map_err(|e| Error::Docker(e.to_string()))?;
        if !left.is_empty() {
            return Ok(());
        }
        let name = job_network_name(&self.agent_id, job_id);
        let subnets = match &self.routes {
            Some(_) => self.subnets_of(&name).await.unwrap_or_default(),
            None => Vec::new(),
        };
        match docker.remove_network(&name).await {
            Ok(()) => {
                tracing::info!(job_id, network = %name, "job network removed");
                if let Some(routes) = &self.routes {
                    for subnet in subnets {
                        if let Err(e) = routes.remove(&subnet).await {
                            tracing::warn!(job_id, %subnet, error = %e, "cannot remove the metadata routes of a removed network");
                        }
                    }
                }
                Ok(())
            }
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(Error::Docker(format!("removing network {name:?}: {e}"))),
        }
    }

    /// Removes this agent's job networks that no container uses any more (left by a crash
    /// between removing a job's last container and its network). Run at start.
    pub async fn prune_job_networks(&self) -> Result<()> {
        if self.job_networks.is_none() {
            return Ok(());
        }
        let docker = self.client().await?;
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_AGENT}={}", self.agent_id)])]);
        let networks = docker
            .list_networks(Some(ListNetworksOptions { filters }))
            .await
            .map_err(|e| Error::Docker(format!("listing networks: {e}")))?;
        for job_id in networks.into_iter().filter_map(|n| n.labels.and_then(|mut l| l.remove(LABEL_JOB))) {
            self.remove_job_network_if_unused(&docker, &job_id).await?;
        }
        Ok(())
    }

    /// Container deaths and OOM kills of this agent's containers, by task id.
    pub async fn deaths(&self) -> Result<impl Stream<Item = std::result::Result<Death, String>> + Send + 'static> {
        use futures::StreamExt;
        let docker = self.client().await?;
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("event".to_string(), vec!["die".to_string(), "oom".to_string(), "health_status".to_string()]),
            ("label".to_string(), vec![format!("{LABEL_AGENT}={}", self.agent_id)]),
        ]);
        Ok(docker.events(Some(EventsOptions::<String> { filters, ..Default::default() })).filter_map(|e| async move {
            match e {
                Ok(ev) => {
                    let action = ev.action.clone().unwrap_or_default();
                    let task = ev.actor.and_then(|a| a.attributes).and_then(|attrs| attrs.get(LABEL_TASK).cloned())?;
                    Some(Ok(match action.as_str() {
                        "oom" => Death::OutOfMemory(task),
                        a if a.starts_with("health_status") => Death::Health(task),
                        _ => Death::Exited(task),
                    }))
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
