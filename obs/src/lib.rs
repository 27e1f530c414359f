//! Observability shared by the control plane and the agent: a small Prometheus registry
//! ([`metrics`]) and the admin HTTP port that serves it with health checks and HTML pages
//! ([`admin`]). Also the logging set-up and stop signal every binary shares ([`process`]). No dependencies
//! beyond tokio and tracing, so adding it changes nobody's build.

pub mod admin;
pub mod metrics;
pub mod process;

pub use metrics::{Counter, Gauge, Histogram, Registry, LATENCY_BUCKETS};
