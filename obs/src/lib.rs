//! Observability shared by the control plane and the agent: a small Prometheus registry
//! ([`metrics`]) and the admin HTTP port that serves it with health checks and HTML pages
//! ([`admin`]). No dependencies beyond tokio and tracing, so adding it changes nobody's build.

pub mod admin;
pub mod metrics;

pub use metrics::{Counter, Gauge, Histogram, Registry, LATENCY_BUCKETS};
