//! One replica of the Titus control plane.
//!
//! # Layout
//!
//! - [`config`]: the typed configuration and its validation.
//! - [`model`]: replicated records (capacity groups) and their field-level validation.
//! - [`command`]: the [`command::Command`] enum, the only way replicated state changes.
//! - [`codec`]: the versioned encoding of everything written to disk or sent between replicas.
//! - [`raft_types`]: openraft's type configuration.
//! - [`store`]: the Raft log, vote and state machine in RocksDB column families. Knows nothing of
//!   the API or the leader duties.
//! - [`network`] / [`peer`]: the peer port — Raft RPCs, write forwarding and read index over tonic.
//! - [`replica`]: the write path (propose or forward) and the linearizable read path.
//! - [`leader`]: leader-only duties, started and stopped with leadership.
//! - [`capacity`]: EC2 capacity of instance groups (a pure planner, the leader duty).
//! - [`loadbalancer`]: ALB IP target registration (commands, a pure planner, the leader duty).
//! - [`api`]: the public gRPC services on the api port.
//! - [`telemetry`] / [`admin`]: metrics, the gRPC request-id and timing layer, and the admin port
//!   (/metrics, /healthz, /readyz, the read-only web view).
//! - [`node`]: wires all of it together and runs it until shutdown.
//! - [`error`]: the crate's error enum and its one conversion to `tonic::Status`.

pub mod admin;
pub mod agents;
pub mod api;
pub mod capacity;
pub mod codec;
pub mod command;
pub mod config;
pub mod error;
pub mod events;
pub mod jobs;
pub mod leader;
pub mod loadbalancer;
pub mod model;
pub mod network;
pub mod node;
pub mod peer;
pub mod raft_types;
pub mod replica;
pub mod scheduling;
pub mod store;
pub mod telemetry;

pub use error::{Error, Result};
