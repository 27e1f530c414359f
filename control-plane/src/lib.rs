//! One replica of the Titus control plane.
//!
//! # Layout
//!
//! - [`config`]: the typed configuration and its validation.
//! - [`model`] (the `titus-model` crate, re-exported with its [`command`], [`codec`] and
//!   [`raft_types`]): replicated records, the commands that change them, their validation.
//! - [`state`]: the replicated state as the rules see it — one read trait over every entity, and an
//!   overlay of pending writes.
//! - [`store`]: the Raft log, vote and state machine in RocksDB column families. Knows nothing of
//!   the API or the leader duties.
//! - [`network`] / [`peer`]: the peer port — Raft RPCs, write forwarding and read index over tonic.
//! - [`raft_runtime`]: the tokio runtime Raft, the peer port and peer connections run on, apart
//!   from the one serving clients and agents (so a heartbeat never queues behind their calls).
//! - [`apply`]: the one exhaustive match that gives every command its rule (rules live in [`jobs`],
//!   [`capacity`] and [`loadbalancer`]); the store applies what it returns.
//! - [`replica`]: the write path (propose or forward) and the linearizable read path.
//! - [`leader`]: leader-only duties, started and stopped with leadership.
//! - [`log_retention`]: how much log each replica keeps behind its snapshot (entries and seconds).
//! - [`capacity`]: EC2 capacity of instance groups (a pure planner, the leader duty).
//! - [`loadbalancer`]: ALB IP target registration (commands, a pure planner, the leader duty).
//! - [`api`]: the public gRPC services on the api port.
//! - [`telemetry`] / [`collector`] / [`admin`]: metrics and the gRPC request-id and timing layer
//!   (low: every layer counts into them), the scrape-time collector, and the admin port
//!   (/metrics, /healthz, /readyz, the read-only web view).
//! - [`node`]: wires all of it together and runs it until shutdown.
//! - [`clock`] / [`rounds`]: the wall clock and a caller's deadline, and when a leader duty runs its
//!   next round — at the bottom: every layer may use them.
//! - [`error`]: the crate's error enum and its one conversion to `tonic::Status`.
//!
//! Modules import one way, with no loop between them: the rules ([`apply`] and the modules it calls)
//! know nothing of RocksDB, Raft or tonic; the state machine calls them and writes what they
//! decided; the replica's write and read paths sit on the store, and the API and the leader duties
//! on the replica. (The scheduler's last results, which the agent hub holds and the API reads, are
//! data in `scheduling::results`, so the hub needs nothing else of scheduling.)

pub mod admin;
pub mod agents;
pub mod api;
pub mod apply;
pub mod auth;
pub mod capacity;
pub mod clock;
pub mod collector;
pub mod config;
pub mod error;
pub mod events;
pub mod jobs;
pub mod leader;
pub mod loadbalancer;
pub mod log_retention;
pub mod network;
pub mod node;
pub mod peer;
pub mod raft_runtime;
pub mod replica;
pub mod rounds;
pub mod scheduling;
pub mod state;
pub mod store;
pub mod telemetry;

pub use error::{Error, Result};

// The model lives in its own crate (no RocksDB, no AWS: the fuzz targets build it alone); these
// keep the paths the rest of the replica uses.
pub use titus_model as model;
pub use titus_model::{codec, command, raft_types};
