//! `titus-control-plane`: parses flags and the config file, then runs one replica until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use titus_control_plane::config::{parse_member, Config, MemberConfig, RaftTuning};

#[derive(Parser, Debug)]
#[command(name = "titus-control-plane", version, about = "One replica of the Titus control plane")]
struct Args {
    /// TOML config file (template: deploy/control-plane.toml). Flags override its settings.
    #[arg(long, env = "TITUS_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    node_id: Option<u64>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    #[arg(long)]
    api_listen: Option<SocketAddr>,
    /// An initial member as ID=PEER_ADDR/API_ADDR; repeat for each member.
    #[arg(long = "member", value_parser = parse_member)]
    members: Vec<MemberConfig>,
    #[arg(long)]
    request_timeout_ms: Option<u64>,
    #[arg(long)]
    snapshot_after_entries: Option<u64>,
    /// Entries kept in the log behind the newest snapshot (raft.keep-entries-after-snapshot).
    #[arg(long)]
    keep_entries_after_snapshot: Option<u64>,
    /// Seconds of log kept behind the newest snapshot, whatever the entries (raft.keep-log-seconds).
    #[arg(long)]
    keep_log_seconds: Option<u64>,
    /// A follower that hears no leader for a random time between these two stands for election
    /// (raft.election-timeout-min-ms and -max-ms); a leader unconfirmed for the max stops its duties.
    #[arg(long)]
    election_timeout_min_ms: Option<u64>,
    #[arg(long)]
    election_timeout_max_ms: Option<u64>,
    #[arg(long)]
    log_format: Option<String>,
    /// Finished jobs and their tasks stay findable this long (jobs.archive-retention-hours).
    #[arg(long)]
    archive_retention_hours: Option<u64>,
    /// Agents silent this long are declared lost.
    #[arg(long)]
    agent_heartbeat_ttl_ms: Option<u64>,
    /// The admin HTTP port (/metrics, /healthz, /readyz, /ui).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Turns AWS on in this region (load balancers, capacity), unless the config file already did.
    #[arg(long)]
    aws_region: Option<String>,
    /// An AWS-compatible endpoint, e.g. a moto server (turns AWS on).
    #[arg(long)]
    aws_endpoint_url: Option<String>,
    /// How long a killed task's container keeps running after its targets are deregistered.
    #[arg(long)]
    lb_drain_delay_ms: Option<u64>,
    /// How often registered targets are compared with DescribeTargetHealth.
    #[arg(long)]
    lb_reconcile_interval_ms: Option<u64>,
    /// How often instance groups are scaled against EC2.
    #[arg(long)]
    capacity_interval_ms: Option<u64>,
    /// An agent idle this long may be terminated.
    #[arg(long)]
    capacity_idle_cooldown_ms: Option<u64>,
    /// A task unplaced this long counts towards a scale-up.
    #[arg(long)]
    capacity_unplaced_after_ms: Option<u64>,
    /// An instance not registered as an agent within this long is terminated.
    #[arg(long)]
    capacity_registration_timeout_ms: Option<u64>,
    /// A Lost agent's instance is kept this long after it was lost.
    #[arg(long)]
    capacity_lost_grace_ms: Option<u64>,
    /// A TOML file of the [security] settings alone (certificates, principals, tokens, limits,
    /// audit), kept apart from the rest with tighter permissions; replaces the config file's.
    #[arg(long, env = "TITUS_SECURITY_CONFIG")]
    security_config: Option<PathBuf>,
    /// Plaintext, every caller an anonymous admin: for a local development cluster only.
    #[arg(long)]
    insecure: bool,
    /// The cluster CA (PEM).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// This replica's certificate (PEM) and key.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
}

fn config_from(args: Args) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
        None => Config {
            node_id: args.node_id.ok_or("--node-id is required without --config")?,
            data_dir: args.data_dir.clone().ok_or("--data-dir is required without --config")?,
            peer_listen: args.peer_listen.ok_or("--peer-listen is required without --config")?,
            api_listen: args.api_listen.ok_or("--api-listen is required without --config")?,
            initial_members: Vec::new(),
            raft: RaftTuning::default(),
            request_timeout_ms: 5_000,
            log_format: "plain".into(),
            jobs: Default::default(),
            agents: Default::default(),
            scheduler: Default::default(),
            aws: None,
            admin_listen: None,
            slow_request_ms: 1_000,
            security: Default::default(),
            security_source: None,
        },
    };
    config.security_source =
        args.config.clone().map(|path| titus_control_plane::config::SecuritySource { path, whole_config: true });
    if let Some(v) = args.node_id {
        config.node_id = v;
    }
    if let Some(path) = &args.security_config {
        config.security = titus_control_plane::config::SecurityConfig::from_file(path).map_err(|e| e.to_string())?;
        config.security_source =
            Some(titus_control_plane::config::SecuritySource { path: path.clone(), whole_config: false });
    }
    if args.insecure {
        config.security.insecure = true;
    }
    for (flag, setting) in [
        (args.tls_ca, &mut config.security.ca),
        (args.tls_cert, &mut config.security.cert),
        (args.tls_key, &mut config.security.key),
    ] {
        if flag.is_some() {
            *setting = flag;
        }
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = args.peer_listen {
        config.peer_listen = v;
    }
    if let Some(v) = args.api_listen {
        config.api_listen = v;
    }
    if !args.members.is_empty() {
        config.initial_members = args.members;
    }
    if let Some(v) = args.request_timeout_ms {
        config.request_timeout_ms = v;
    }
    if let Some(v) = args.snapshot_after_entries {
        config.raft.snapshot_after_entries = v;
    }
    if let Some(v) = args.keep_entries_after_snapshot {
        config.raft.keep_entries_after_snapshot = v;
    }
    if let Some(v) = args.keep_log_seconds {
        config.raft.keep_log_seconds = v;
    }
    if let Some(v) = args.election_timeout_min_ms {
        config.raft.election_timeout_min_ms = v;
    }
    if let Some(v) = args.election_timeout_max_ms {
        config.raft.election_timeout_max_ms = v;
    }
    if let Some(v) = args.archive_retention_hours {
        config.jobs.archive_retention_hours = v;
    }
    if let Some(v) = args.agent_heartbeat_ttl_ms {
        config.agents.heartbeat_ttl_ms = v;
    }
    if let Some(v) = args.log_format {
        config.log_format = v;
    }
    if let Some(v) = args.admin_listen {
        config.admin_listen = Some(v);
    }
    if args.aws_region.is_some() || args.aws_endpoint_url.is_some() {
        let aws = config.aws.get_or_insert_with(Default::default);
        if let Some(v) = args.aws_region {
            aws.region = v;
        }
        if let Some(v) = args.aws_endpoint_url {
            aws.endpoint_url = v;
        }
    }
    if let Some(aws) = config.aws.as_mut() {
        if let Some(v) = args.lb_drain_delay_ms {
            aws.drain_delay_ms = v;
            aws.max_drain_wait_ms = aws.max_drain_wait_ms.max(v);
        }
        if let Some(v) = args.lb_reconcile_interval_ms {
            aws.reconcile_interval_ms = v;
        }
        let c = &mut aws.capacity;
        for (flag, setting) in [
            (args.capacity_interval_ms, &mut c.interval_ms),
            (args.capacity_idle_cooldown_ms, &mut c.idle_cooldown_ms),
            (args.capacity_unplaced_after_ms, &mut c.unplaced_after_ms),
            (args.capacity_registration_timeout_ms, &mut c.registration_timeout_ms),
            (args.capacity_lost_grace_ms, &mut c.lost_grace_ms),
        ] {
            if let Some(v) = flag {
                *setting = v;
            }
        }
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = match config_from(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("titus-control-plane: {e}");
            return ExitCode::from(2);
        }
    };
    titus_obs::process::init_logging(&config.log_format, "info,openraft=warn");
    // Before the store opens its files: RocksDB keeps every table file open. Up to Linux's default
    // per-process ceiling (nr_open); whether that is enough, or why it could not be raised, is said
    // once the replica is up (`node::run`), so a failed start stays one line.
    let _ = titus_obs::process::raise_open_files_limit(1 << 20);
    match titus_control_plane::node::run(config, titus_obs::process::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("titus-control-plane: {e}");
            ExitCode::FAILURE
        }
    }
}
