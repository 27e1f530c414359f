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
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use titus_proto::agent_task_service_server::AgentTaskServiceServer;
use titus_proto::capacity_group_service_server::CapacityGroupServiceServer;
use titus_proto::cluster_service_server::ClusterServiceServer;
use titus_proto::job_management_service_server::JobManagementServiceServer;
use titus_proto::peer::raft_peer_server::RaftPeerServer;

use crate::agents::{AgentApi, AgentHub};
use crate::api::{
    AgentManagementApi, AgentTaskApi, CapacityGroupApi, ClusterApi, JobApi, LoadBalancerApi, SchedulerApi,
};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::leader::{Cloud, LeaderDuties};
use crate::network::{Network, PeerChannels, MAX_PEER_MESSAGE_BYTES};
use crate::peer::PeerService;
use crate::raft_types::{Node, Raft};
use crate::replica::Replica;
use crate::store;
use crate::telemetry::GrpcTelemetry;
use titus_proto::agent_management_service_server::AgentManagementServiceServer;
use titus_proto::agent_service_server::AgentServiceServer;
use titus_proto::load_balancer_service_server::LoadBalancerServiceServer;
use titus_proto::scheduler_service_server::SchedulerServiceServer;

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

/// Accepted connections with Nagle's algorithm off. (tonic's `tcp_nodelay` applies only to
/// listeners it binds itself; without this, small HTTP/2 frames wait for delayed ACKs, ~40 ms.)
fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "could not disable Nagle on an accepted connection");
            }
        }
        conn
    })
}

/// How long a stopping leader waits for another replica to be elected.
const SHUTDOWN_STEP_DOWN: Duration = Duration::from_secs(3);

/// Runs the replica until `shutdown` completes, then stops gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    config.validate()?;
    let peer_listener = bind("peer-listen", config.peer_listen).await?;
    let api_listener = bind("api-listen", config.api_listen).await?;
    let admin_listener = match config.admin_listen {
        Some(addr) => Some(bind("admin-listen", addr).await?),
        None => None,
    };
    let (log_store, state_machine, state) = store::open(&config.data_dir, config.node_id)?;

    let peers = PeerChannels::new(state.clone(), Duration::from_millis(500));
    let raft = Raft::new(
        config.node_id,
        Arc::new(config.openraft_config()?),
        Network { peers: peers.clone() },
        log_store,
        state_machine,
    )
    .await
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
    let peer_server = tokio::spawn(
        Server::builder()
            .tcp_nodelay(true)
            .add_service(peer_service)
            .serve_with_incoming_shutdown(incoming(peer_listener), stopped(stop_rx.clone())),
    );

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
    let api_server = tokio::spawn(
        Server::builder()
            .tcp_nodelay(true)
            .layer(GrpcTelemetry { slow: Duration::from_millis(config.slow_request_ms) })
            .add_service(health_service)
            .add_service(reflection)
            .add_service(CapacityGroupServiceServer::new(CapacityGroupApi { replica: replica.clone() }))
            .add_service(ClusterServiceServer::new(ClusterApi { replica: replica.clone() }))
            .add_service(JobManagementServiceServer::new(JobApi { replica: replica.clone() }))
            .add_service(AgentTaskServiceServer::new(AgentTaskApi { replica: replica.clone() }))
            .add_service(AgentServiceServer::new(AgentApi { hub: hub.clone() }))
            .add_service(LoadBalancerServiceServer::new(LoadBalancerApi {
                replica: replica.clone(),
                aws: cloud.as_ref().map(|c| c.aws.clone()),
            }))
            .add_service(SchedulerServiceServer::new(SchedulerApi { hub: hub.clone() }))
            .add_service(AgentManagementServiceServer::new(AgentManagementApi {
                replica: replica.clone(),
                hub: hub.clone(),
            }))
            .serve_with_incoming_shutdown(incoming(api_listener), stopped(stop_rx.clone())),
    );

    if let Some(listener) = admin_listener {
        tracing::info!(admin = %config.admin_listen.map(|a| a.to_string()).unwrap_or_default(), "admin port: /metrics /healthz /readyz /ui");
        tokio::spawn(titus_obs::admin::serve(
            listener,
            crate::admin::handler(replica.clone(), hub.clone()),
            stop_rx.clone(),
        ));
    }
    tokio::spawn(crate::telemetry::watch(replica.clone(), stop_rx.clone()));
    let duties =
        tokio::spawn(LeaderDuties::run(replica.clone(), config.jobs.clone(), hub.clone(), cloud, stop_rx.clone()));
    let bootstrap = tokio::spawn(bootstrap(config.clone(), raft.clone(), peers.clone()));
    tracing::info!(node_id = config.node_id, peer = %config.peer_listen, api = %config.api_listen, "replica started");

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
