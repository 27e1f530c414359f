//! Starts one replica: binds its ports, opens the store, starts Raft, serves the peer and api ports,
//! bootstraps the cluster when it is the designated initializer, runs the leader duties, and stops
//! all of it when `shutdown` completes.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;

use titus_security::tls::incoming;
use titus_security::{Gate, Identity, Kind, ListenerLimits, Tls, TlsFiles};

use titus_proto::agent_task_service_server::AgentTaskServiceServer;
use titus_proto::capacity_group_service_server::CapacityGroupServiceServer;
use titus_proto::cluster_service_server::ClusterServiceServer;
use titus_proto::job_management_service_server::JobManagementServiceServer;
use titus_proto::peer::raft_peer_server::RaftPeerServer;

use crate::agents::{AgentApi, AgentHub};
use crate::api::{
    AgentManagementApi, AgentTaskApi, CapacityGroupApi, ClusterApi, JobApi, LoadBalancerApi, SchedulerApi, TaskIoApi,
};
use crate::auth::{Auditor, Authorize, Policy, Port};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::leader::{Cloud, LeaderDuties};
use crate::network::{Network, PeerChannels, MAX_PEER_MESSAGE_BYTES};
use crate::peer::PeerService;
use crate::raft_runtime::RaftRuntime;
use crate::raft_types::{Node, Raft};
use crate::replica::Replica;
use crate::store;
use crate::telemetry::GrpcTelemetry;

/// How long an enrolled agent's certificate is valid unless `security.enroll-validity-days` says
/// otherwise: agents renew in the last third, so a month costs nothing and bounds a stolen one.
pub const DEFAULT_ENROLL_VALIDITY_DAYS: u32 = 30;
use titus_proto::agent_management_service_server::AgentManagementServiceServer;
use titus_proto::agent_service_server::AgentServiceServer;
use titus_proto::load_balancer_service_server::LoadBalancerServiceServer;
use titus_proto::scheduler_service_server::SchedulerServiceServer;
use titus_proto::task_io_service_server::TaskIoServiceServer;
use titus_proto::v3;

use crate::api::v3::{V3AutoScalingApi, V3EvictionApi, V3HealthApi, V3JobApi, V3LoadBalancerApi};

async fn bind(setting: &str, addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::AddrInUse {
            "address already in use".to_string()
        } else {
            e.to_string()
        };
        Error::Config(format!("{setting} {addr}: {why}"))
    })
}

/// This replica's certificates (reloaded when replaced), or None in insecure mode — said loudly.
fn load_tls(config: &Config) -> Result<Option<Arc<Tls>>> {
    let sec = &config.security;
    if sec.insecure {
        // Said loudly once the replica is up (see `warn_insecure`): a failed start stays one line.
        return Ok(None);
    }
    let (Some(ca), Some(cert), Some(key)) = (&sec.ca, &sec.cert, &sec.key) else {
        return Err(Error::Config("security.ca, security.cert and security.key are required".into()));
    };
    let tls = Tls::server(TlsFiles::new(ca, cert, key), Kind::Replica)
        .map_err(|e| Error::Config(format!("security: {e}")))?;
    let expected = Identity::new(Kind::Replica, config.node_id.to_string()).map_err(Error::Config)?;
    if tls.identity().as_ref() != Some(&expected) {
        return Err(Error::Config(format!(
            "security.cert {}: names {}, but this is {expected} (node-id {})",
            cert.display(),
            tls.identity().map_or("nobody".into(), |i| i.to_string()),
            config.node_id
        )));
    }
    tls.spawn_reloader(sec.reload_interval());
    tracing::info!(identity = %expected, ca = %ca.display(), "TLS on: mutual TLS on the api and peer ports");
    Ok(Some(tls))
}

/// Agent enrollment, when this replica holds the CA key.
fn enroller(config: &Config) -> Option<crate::agents::Enroller> {
    let sec = &config.security;
    Some(crate::agents::Enroller {
        ca: sec.ca.clone()?,
        ca_key: sec.ca_key.clone()?,
        validity_days: sec.enroll_validity_days.unwrap_or(DEFAULT_ENROLL_VALIDITY_DAYS),
    })
}

/// Warns when the open-files limit (raised to the hard limit at start) cannot hold a full api port:
/// every agent's stream and every client, and RocksDB's files besides.
fn warn_open_files(config: &Config) {
    let max = config.security.limits.max_connections as u64;
    let wanted = max.saturating_add(1024);
    match titus_obs::process::raise_open_files_limit(wanted) {
        Ok(n) if n < wanted => tracing::warn!(
            open_files_limit = n,
            wanted,
            "the open-files limit is below what security.limits.max-connections = {max} needs: raise LimitNOFILE (ulimit -n) or lower max-connections"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// The banner of insecure mode, on stderr and in the log.
fn warn_insecure(config: &Config) {
    let banner = "INSECURE MODE: plaintext on every port, no authentication, every caller is an admin. \
                  For a local development cluster only; never expose these ports.";
    eprintln!("\n*** titus-control-plane: {banner} ***\n");
    tracing::warn!(api = %config.api_listen, peer = %config.peer_listen, "{banner}");
}

/// The same HTTP/2 bounds on both ports: streams per connection, dead connections found by
/// keepalive, and reset floods cut short.
fn server_builder(config: &Config) -> Server {
    let l = &config.security.limits;
    Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(l.max_concurrent_streams))
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .http2_max_pending_accept_reset_streams(Some(64))
}

/// How long a stopping leader waits for another replica to be elected.
const SHUTDOWN_STEP_DOWN: Duration = Duration::from_secs(3);

/// Runs the replica until `shutdown` completes, then stops gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    config.validate()?;
    // Raft, the peer port and the peer connections run on a runtime of their own (see raft_runtime).
    let raft_rt = RaftRuntime::new(config.node_id)?;
    let peer_addr = config.peer_listen;
    let peer_listener = raft_rt
        .spawn(async move { bind("peer-listen", peer_addr).await })
        .await
        .map_err(|e| Error::Config(format!("peer-listen {peer_addr}: binding failed: {e}")))??;
    let api_listener = bind("api-listen", config.api_listen).await?;
    let admin_listener = match config.admin_listen {
        Some(addr) => Some(bind("admin-listen", addr).await?),
        None => None,
    };
    let tls = load_tls(&config)?;
    let l = &config.security.limits;
    let listener_limits = ListenerLimits {
        max_connections: l.max_connections,
        reserved_for_authenticated: l.reserved_for_authenticated,
        max_unauthenticated_per_address: l.max_unauthenticated_per_address,
        unauthenticated_timeout: Duration::from_millis(l.unauthenticated_timeout_ms),
        require_client_cert: false,
    };
    // Only replicas use the peer port: no certificate, no connection (a token cannot open it).
    let peer_limits = ListenerLimits { require_client_cert: true, ..listener_limits };
    let policy = Arc::new(Policy::new(&config.security));
    let (log_store, state_machine, state) = store::open(&config.data_dir, config.node_id)?;
    let log_store = log_store.limit_payload(config.raft.max_payload_bytes as usize);

    let peers = PeerChannels::new(state.clone(), Duration::from_millis(500), tls.clone(), raft_rt.executor());
    let (node_id, raft_config, network) =
        (config.node_id, Arc::new(config.openraft_config()?), Network { peers: peers.clone() });
    // Started from a task of the consensus runtime, so openraft's own tasks are spawned there.
    let raft = raft_rt
        .spawn(async move { Raft::new(node_id, raft_config, network, log_store, state_machine).await })
        .await
        .map_err(|e| Error::Raft(format!("starting raft: the task ended: {e}")))?
        .map_err(|e| Error::Raft(format!("starting raft: {e}")))?;
    let replica = Arc::new(Replica {
        id: config.node_id,
        raft: raft.clone(),
        state: state.clone(),
        peers: peers.clone(),
        request_timeout: config.request_timeout(),
        stepping_down: Arc::new(AtomicBool::new(false)),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let peer_service = RaftPeerServer::new(PeerService {
        node_id: config.node_id,
        raft: raft.clone(),
        state: state.clone(),
        stepping_down: replica.stepping_down.clone(),
    })
    .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
    let (auditor, auditor_task) = Auditor::start(replica.clone(), config.security.audit.clone(), stop_rx.clone());
    if let Some(source) = config.security_source.clone() {
        let every = config.security.reload_interval();
        tokio::spawn(crate::auth::reload_security(source, policy.clone(), every, stop_rx.clone()));
    }
    let peer_server = {
        // The peer port's calls are not audited, its refusals are.
        let layer = Authorize { policy: policy.clone(), port: Port::Peer, auditor: Some(auditor.clone()) };
        let (mut server, tls, stop) = (server_builder(&config).layer(layer), tls.clone(), stopped(stop_rx.clone()));
        // `incoming` spawns its accept loop where it is called: on the consensus runtime.
        raft_rt.spawn(async move {
            server
                .add_service(peer_service)
                .serve_with_incoming_shutdown(
                    incoming(
                        peer_listener,
                        tls,
                        Gate::new(peer_limits, crate::telemetry::metrics().peer_listener.clone()),
                    ),
                    stop,
                )
                .await
        })
    };

    let cloud = match &config.aws {
        Some(aws) => {
            tracing::info!(region = %aws.region, endpoint = %aws.endpoint_url, "AWS on: load balancer registration");
            Some(Cloud { aws: titus_aws::Aws::connect(&aws.settings()).await, config: aws.clone() })
        }
        None => {
            tracing::info!("AWS off: no [aws] configuration; load balancers are unavailable");
            None
        }
    };
    let hub = AgentHub::new(
        replica.clone(),
        config.agents.clone(),
        config.scheduler.clone(),
        config.aws.as_ref().map(|a| a.max_drain_wait_ms as i64),
    );
    let (mut health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CapacityGroupServiceServer<CapacityGroupApi>>().await;
    health.set_serving::<ClusterServiceServer<ClusterApi>>().await;
    health.set_serving::<JobManagementServiceServer<JobApi>>().await;
    health.set_serving::<AgentTaskServiceServer<AgentTaskApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(titus_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Config(format!("grpc reflection: {e}")))?;
    // Every service refuses a request larger than this before decoding it.
    let max = config.security.limits.max_request_bytes;
    // Ours, shared with Titus's V3 API, which translates into them.
    let jobs = Arc::new(JobApi {
        replica: replica.clone(),
        max_job_bytes: config.jobs.max_job_bytes,
        aws: cloud.as_ref().map(|c| c.aws.clone()),
        vpc_id: cloud.as_ref().map(|c| c.config.vpc_id.clone()).filter(|v| !v.is_empty()),
    });
    let load_balancers =
        Arc::new(LoadBalancerApi { replica: replica.clone(), aws: cloud.as_ref().map(|c| c.aws.clone()) });
    let api_server = tokio::spawn(
        server_builder(&config)
            .layer(GrpcTelemetry { slow: Duration::from_millis(config.slow_request_ms) })
            .layer(Authorize { policy: policy.clone(), port: Port::Api, auditor: Some(auditor) })
            .add_service(health_service)
            .add_service(reflection)
            .add_service(
                CapacityGroupServiceServer::new(CapacityGroupApi { replica: replica.clone() })
                    .max_decoding_message_size(max),
            )
            .add_service(
                ClusterServiceServer::new(ClusterApi { replica: replica.clone() }).max_decoding_message_size(max),
            )
            .add_service(JobManagementServiceServer::from_arc(jobs.clone()).max_decoding_message_size(max))
            .add_service(
                AgentTaskServiceServer::new(AgentTaskApi { replica: replica.clone() }).max_decoding_message_size(max),
            )
            .add_service(
                AgentServiceServer::new(AgentApi { hub: hub.clone(), enroller: enroller(&config) })
                    .max_decoding_message_size(max),
            )
            .add_service(LoadBalancerServiceServer::from_arc(load_balancers.clone()).max_decoding_message_size(max))
            .add_service(
                v3::job_management_service_server::JobManagementServiceServer::new(V3JobApi { jobs: jobs.clone() })
                    .max_decoding_message_size(max),
            )
            .add_service(
                v3::load_balancer_service_server::LoadBalancerServiceServer::new(V3LoadBalancerApi {
                    load_balancers: load_balancers.clone(),
                })
                .max_decoding_message_size(max),
            )
            .add_service(
                v3::eviction_service_server::EvictionServiceServer::new(V3EvictionApi { jobs: jobs.clone() })
                    .max_decoding_message_size(max),
            )
            .add_service(
                v3::auto_scaling_service_server::AutoScalingServiceServer::new(V3AutoScalingApi { jobs: jobs.clone() })
                    .max_decoding_message_size(max),
            )
            .add_service(
                v3::health_server::HealthServer::new(V3HealthApi {
                    replica: replica.clone(),
                    started: std::time::Instant::now(),
                })
                .max_decoding_message_size(max),
            )
            .add_service(SchedulerServiceServer::new(SchedulerApi { hub: hub.clone() }).max_decoding_message_size(max))
            .add_service(TaskIoServiceServer::new(TaskIoApi { hub: hub.clone() }).max_decoding_message_size(max))
            .add_service(
                AgentManagementServiceServer::new(AgentManagementApi { replica: replica.clone(), hub: hub.clone() })
                    .max_decoding_message_size(max),
            )
            .serve_with_incoming_shutdown(
                incoming(
                    api_listener,
                    tls.clone(),
                    Gate::new(listener_limits, crate::telemetry::metrics().api_listener.clone()),
                ),
                stopped(stop_rx.clone()),
            ),
    );

    if let Some(listener) = admin_listener {
        tracing::info!(admin = %config.admin_listen.map(|a| a.to_string()).unwrap_or_default(), "admin port: /metrics /healthz /readyz /ui");
        tokio::spawn(titus_obs::admin::serve(
            listener,
            crate::admin::handler(replica.clone(), hub.clone()),
            stop_rx.clone(),
        ));
    }
    tokio::spawn(crate::collector::watch(replica.clone(), stop_rx.clone()));
    let retention = crate::log_retention::Retention {
        keep_entries: config.raft.keep_entries_after_snapshot,
        keep_for: std::time::Duration::from_secs(config.raft.keep_log_seconds),
    };
    tokio::spawn(crate::log_retention::run(replica.clone(), retention, stop_rx.clone()));
    let duties =
        tokio::spawn(LeaderDuties::run(replica.clone(), config.jobs.clone(), hub.clone(), cloud, stop_rx.clone()));
    let bootstrap = tokio::spawn(bootstrap(config.clone(), raft.clone(), peers.clone()));
    tracing::info!(node_id = config.node_id, peer = %config.peer_listen, api = %config.api_listen, "replica started");
    if config.security.insecure {
        warn_insecure(&config);
    }
    warn_open_files(&config);

    shutdown.await;
    tracing::info!(node_id = config.node_id, "shutting down");
    // A leader hands over first, so clients wait about one election timeout instead of noticing the
    // silence, timing out and electing; bounded, so a stop never hangs on a cluster without quorum.
    if replica.require_leader().is_ok() {
        if let Err(e) = replica.step_down(SHUTDOWN_STEP_DOWN).await {
            tracing::info!(error = %e, "stopping without handing leadership over");
        }
    }
    bootstrap.abort();
    let _ = stop_tx.send(true);
    let _ = duties.await;
    // The records of the last calls answered go in before Raft stops (bounded: no quorum, no wait).
    if tokio::time::timeout(Duration::from_secs(2), auditor_task).await.is_err() {
        tracing::warn!("the last audit records were not committed within 2 s of stopping");
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft did not shut down cleanly");
    }
    for (name, server) in [("peer", peer_server), ("api", api_server)] {
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "{name} server stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "{name} server task failed"),
        }
    }
    // Raft is shut down and the peer server has stopped: what is left on the consensus runtime is
    // idle connections and timers (and at most a snapshot being written, waited for).
    raft_rt.shutdown(Duration::from_secs(30)).await;
    tracing::info!(node_id = config.node_id, "stopped");
    Ok(())
}

/// Initializes the cluster exactly once. Only the lowest id among the initial members does it, only
/// when its own store is empty, and only when no reachable member already belongs to a cluster —
/// so a restarted or wiped replica never forks the cluster; it waits to be caught up instead.
async fn bootstrap(config: Config, raft: Raft, peers: PeerChannels) {
    let Some(lowest) = config.initial_members.iter().map(|m| m.id).min() else {
        return;
    };
    if lowest != config.node_id {
        return;
    }
    match raft.is_initialized().await {
        Ok(true) => return,
        Ok(false) => {}
        Err(e) => return tracing::error!(error = %e, "cannot tell whether the cluster is initialized"),
    }
    for m in config.initial_members.iter().filter(|m| m.id != config.node_id) {
        match peers.identify(&m.peer_addr, Duration::from_millis(1000)).await {
            Ok(r) if r.initialized || !r.cluster_id.is_empty() => {
                tracing::warn!(member = m.id, cluster_id = %r.cluster_id, "a member already belongs to a cluster: not initializing; waiting for the leader to catch this replica up");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::info!(member = m.id, error = %e, "member not reachable yet; it will join when it starts")
            }
        }
    }
    let members: BTreeMap<u64, Node> = config
        .initial_members
        .iter()
        .map(|m| (m.id, Node { peer_addr: m.peer_addr.clone(), api_addr: m.api_addr.clone() }))
        .collect();
    match raft.initialize(members).await {
        Ok(()) => {
            tracing::info!(members = ?config.initial_members.iter().map(|m| m.id).collect::<Vec<_>>(), "initialized the cluster")
        }
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
            tracing::info!("cluster already initialized")
        }
        Err(e) => tracing::error!(error = %e, "could not initialize the cluster"),
    }
}
