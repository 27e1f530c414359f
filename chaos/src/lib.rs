//! titus-chaos: fault injection against a running Titus deployment (replicas, agents, Docker, the
//! AWS endpoint), a workload chaos monkey, and experiments that check a steady state around a fault
//! schedule.
//!
//! Every fault is written to a journal before it is applied and removed after it is undone, so a
//! crashed run can be healed (`titus-chaos heal`).

pub mod deployment;
pub mod duration;
pub mod experiment;
pub mod faults;
pub mod journal;
pub mod lab;
pub mod monkey;
pub mod net;
pub mod plan;
pub mod proxy;

pub use deployment::Deployment;
pub use duration::Dur;
