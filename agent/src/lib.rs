//! titus-agent: one per host. Runs the tasks the control plane's leader assigns to it as Docker
//! containers (through bollard), reports their states, and follows the leader across failovers
//! without restarting a single container.
//!
//! # Layout
//!
//! - [`config`]: the typed configuration, resources detected from the host with overrides.
//! - [`docker`]: the container runtime over the Docker daemon: one container per task id, named and
//!   labelled by it, adopted after a restart instead of started twice.
//! - [`health`]: container health checks — Docker's own for a command, the agent's HTTP probes.
//! - [`networks`]: the per-job networks that keep one job's containers from another's.
//! - [`identity`], [`metadata`], [`routes`]: what a task is to AWS — its IAM role's credentials,
//!   EC2-style instance metadata and Titus's environment — served by a proxy on the host that
//!   tells containers apart by address, and the iptables routes that lead containers to it.
//! - [`runtime`]: Docker, or a simulation of it for scale tests (`--simulate N`).
//! - [`session`]: the stream to the leader — register, heartbeats, status reports; assignments,
//!   kills and forgets; failover with jittered back-off and leader hints.
//! - [`telemetry`]: metrics and the admin port (/metrics, /healthz, /readyz).
//!
//! Talks to the control plane only through `titus-proto` (the public API).

pub mod config;
pub mod docker;
pub mod health;
pub mod identity;
pub mod metadata;
pub mod networks;
pub mod routes;
pub mod runtime;
pub mod session;
pub mod taskio;
pub mod telemetry;

pub use config::AgentConfig;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    #[error("docker daemon: {0}")]
    Docker(String),
}

pub type Result<T> = std::result::Result<T, Error>;
