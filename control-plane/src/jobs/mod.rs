//! Jobs and tasks: applying their commands, and the lifecycle's decisions.
//!
//! Storage-agnostic: it reads through [`crate::state::StateRead`] and writes into a
//! [`crate::state::Overlay`]; the RocksDB state machine and the in-memory test store run the same
//! code. Knows nothing of Raft, tonic or the API.

pub mod apply;
pub mod capacity_groups;
pub mod deployment;
pub mod hosts;
pub mod lifecycle;
pub mod query;

#[cfg(test)]
mod lifecycle_test;

#[cfg(test)]
mod deployment_test;
