//! `titus-agent`: parses flags and the config file, then runs the agent until SIGTERM.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use titus_agent::AgentConfig;

#[derive(Parser, Debug)]
#[command(name = "titus-agent", version, about = "Runs a host's Titus tasks in Docker")]
struct Args {
    /// TOML config file (template: deploy/agent.toml). Flags override it.
    #[arg(long, env = "TITUS_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    agent_id: Option<String>,
    /// Control-plane api addresses, comma-separated.
    #[arg(long, env = "TITUS_SERVERS", value_delimiter = ',')]
    servers: Vec<String>,
    #[arg(long)]
    docker_socket: Option<String>,
    #[arg(long)]
    instance_group: Option<String>,
    #[arg(long)]
    cpu: Option<f64>,
    #[arg(long)]
    memory_mb: Option<u32>,
    #[arg(long)]
    disk_mb: Option<u32>,
    #[arg(long)]
    network_mbps: Option<u32>,
    /// An attribute as KEY=VALUE (zone, machineType, instanceId, host); repeatable.
    #[arg(long = "attribute")]
    attributes: Vec<String>,
    /// Docker network for every container; default: a network per job from --job-networks.
    #[arg(long)]
    network: Option<String>,
    /// The IPv4 pool per-job networks are cut from, in /24s (default 172.29.0.0/16).
    #[arg(long)]
    job_networks: Option<String>,
    /// The most processes one container may hold (default 1024).
    #[arg(long)]
    pids_limit: Option<i64>,
    /// The admin HTTP port (/metrics, /healthz, /readyz).
    #[arg(long)]
    admin_listen: Option<std::net::SocketAddr>,
    /// `plain` or `json`.
    #[arg(long)]
    log_format: Option<String>,
    /// Run this many simulated agents (no Docker: assignments are reported Started at once) named
    /// `<agent-id>-<n>`, for scale tests and the scheduler benchmark.
    #[arg(long, default_value_t = 0)]
    simulate: usize,
    /// Zones the simulated agents are spread over, comma-separated.
    #[arg(long, value_delimiter = ',')]
    simulate_zones: Vec<String>,
    /// Plaintext to the control plane (a cluster in insecure mode): local development only.
    #[arg(long)]
    insecure: bool,
    /// The cluster CA (PEM).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// This agent's certificate (PEM, naming agent/<agent-id>) and key.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// An enroll token: obtains tls-cert/tls-key from the control plane when they do not exist.
    #[arg(long, env = "TITUS_ENROLL_TOKEN", hide_env_values = true)]
    enroll_token: Option<String>,
    /// The AWS region STS is called in and tasks are told (aws.region).
    #[arg(long)]
    aws_region: Option<String>,
    /// An AWS-compatible endpoint (a moto server) instead of AWS's own (aws.endpoint-url).
    #[arg(long)]
    aws_endpoint_url: Option<String>,
    /// A role ARN, or an ARN prefix ending in '*', this agent may pass to tasks; repeatable
    /// (aws.allowed-roles).
    #[arg(long = "allow-role")]
    allow_roles: Vec<String>,
    /// How long each AssumeRole's credentials last, 900-43200 (aws.session-secs).
    #[arg(long)]
    role_session_secs: Option<u32>,
    /// Credentials are assumed again this long before they expire (aws.refresh-before-secs).
    #[arg(long)]
    role_refresh_before_secs: Option<u32>,
    /// The metadata proxy's port on the host; 0: any (aws.metadata-port).
    #[arg(long)]
    metadata_port: Option<u16>,
    /// Leave routing 169.254.169.254 and 169.254.170.2 to the proxy to the host's operator
    /// (aws.metadata-route = false).
    #[arg(long)]
    no_metadata_route: bool,
    /// Where finished tasks' output is kept after their containers go (finished-logs.dir).
    #[arg(long)]
    finished_logs_dir: Option<PathBuf>,
}

fn config_from(args: Args) -> Result<AgentConfig, String> {
    let mut c = match &args.config {
        Some(p) => AgentConfig::from_file(p).map_err(|e| e.to_string())?,
        None => AgentConfig {
            agent_id: args.agent_id.clone().ok_or("--agent-id is required without --config")?,
            servers: Vec::new(),
            docker_socket: None,
            instance_group: String::new(),
            cpu: 0.0,
            memory_mb: 0,
            disk_mb: 100_000,
            network_mbps: 1_000,
            gpu: 0,
            attributes: BTreeMap::new(),
            network: None,
            job_networks: titus_agent::config::default_job_networks(),
            pids_limit: titus_agent::config::default_pids_limit(),
            log_max_mb: titus_agent::config::default_log_max_mb(),
            log_max_files: titus_agent::config::default_log_max_files(),
            admin_listen: None,
            log_format: "plain".into(),
            insecure: false,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            enroll_token: None,
            forget_grace_secs: 10,
            aws: Default::default(),
            finished_logs: Default::default(),
        },
    };
    if let Some(v) = args.finished_logs_dir {
        c.finished_logs.dir = v;
    }
    if let Some(t) = args.enroll_token {
        c.enroll_token = Some(t);
    }
    if let Some(v) = args.aws_region {
        c.aws.region = v;
    }
    if let Some(v) = args.aws_endpoint_url {
        c.aws.endpoint_url = v;
    }
    if !args.allow_roles.is_empty() {
        c.aws.allowed_roles = args.allow_roles;
    }
    if let Some(v) = args.role_session_secs {
        c.aws.session_secs = v;
    }
    if let Some(v) = args.role_refresh_before_secs {
        c.aws.refresh_before_secs = v;
    }
    if let Some(v) = args.metadata_port {
        c.aws.metadata_port = v;
    }
    if args.no_metadata_route {
        c.aws.metadata_route = false;
    }
    if args.insecure {
        c.insecure = true;
    }
    for (flag, setting) in
        [(args.tls_ca, &mut c.tls_ca), (args.tls_cert, &mut c.tls_cert), (args.tls_key, &mut c.tls_key)]
    {
        if flag.is_some() {
            *setting = flag;
        }
    }
    if let Some(v) = args.log_format {
        c.log_format = v;
    }
    if let Some(v) = args.admin_listen {
        c.admin_listen = Some(v);
    }
    if let Some(v) = args.agent_id {
        c.agent_id = v;
    }
    if !args.servers.is_empty() {
        c.servers = args.servers;
    }
    if let Some(v) = args.docker_socket {
        c.docker_socket = Some(v);
    }
    if let Some(v) = args.instance_group {
        c.instance_group = v;
    }
    if let Some(v) = args.cpu {
        c.cpu = v;
    }
    if let Some(v) = args.memory_mb {
        c.memory_mb = v;
    }
    if let Some(v) = args.disk_mb {
        c.disk_mb = v;
    }
    if let Some(v) = args.network_mbps {
        c.network_mbps = v;
    }
    if let Some(v) = args.network {
        c.network = Some(v);
    }
    if let Some(v) = args.job_networks {
        c.job_networks = v;
    }
    if let Some(v) = args.pids_limit {
        c.pids_limit = v;
    }
    for a in args.attributes {
        let (k, v) = a.split_once('=').ok_or_else(|| format!("--attribute {a:?}: expected KEY=VALUE"))?;
        c.attributes.insert(k.to_string(), v.to_string());
    }
    c.finish().map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let (simulate, zones) = (args.simulate, args.simulate_zones.clone());
    let config = match config_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("titus-agent: {e}");
            return ExitCode::from(2);
        }
    };
    titus_obs::process::init_logging(&config.log_format, "info");
    let outcome = if simulate > 0 {
        titus_agent::session::simulate(config, simulate, zones, titus_obs::process::shutdown_signal()).await
    } else {
        titus_agent::session::run(config, titus_obs::process::shutdown_signal()).await
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("titus-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
