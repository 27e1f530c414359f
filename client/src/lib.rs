//! Rust SDK for the Titus control plane.
//!
//! Any replica is a valid seed. The client rotates through the seeds (and follows the leader hints
//! replicas send back) on UNAVAILABLE and on timeouts, with jittered back-off, until an overall
//! deadline; a leader change is invisible to the caller. Mutating calls that could apply twice carry
//! an idempotency token that stays the same across retries.
//!
//! ```no_run
//! # async fn demo() -> titus_client::Result<()> {
//! use titus_client::{Client, CapacityGroupSpec, Tier};
//! let client = Client::connect(["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"])?;
//! let group = client
//!     .create_capacity_group(CapacityGroupSpec::new("netflix-api", Tier::Critical, 2.0, 4096, 10240, 256, 10))
//!     .await?;
//! println!("{} created at {}", group.name, group.create_time_ms);
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`error`]: the one error enum, keeping the server's field violations.
//! - `client`: seeds, retries, deadlines and the calls.
//! - [`spec`]: job spec files (YAML/JSON, Titus's field names) to job descriptors.

mod builder;
mod client;
pub mod error;
pub mod spec;

pub use builder::JobBuilder;
pub use client::{Backup, CapacityGroupSpec, Client, ClientOptions, JobObserver};
pub use error::{Error, FieldViolation, Result};
pub use titus_proto as proto;
pub use titus_proto::{
    CapacityGroup, ClusterStatus, Job, JobDescriptor, MemberRole, ReadConsistency, Task, TaskState, Tier,
};
