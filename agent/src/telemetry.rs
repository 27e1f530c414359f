//! The agent's metrics and admin port: `/metrics`, `/healthz` (live) and `/readyz` (attached to
//! the leader).

use std::sync::{Arc, OnceLock};

use titus_obs::admin::{Handler, Response};
use titus_obs::{Counter, Gauge, Histogram, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub connected: Gauge,
    pub sessions_total: Counter,
    pub docker_healthy: Gauge,
    pub assignments_total: Counter,
    pub kills_total: Counter,
    pub task_reports_total: Counter,
    pub launch_seconds: Histogram,
}

pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let r = Registry::default();
        Metrics {
            connected: r.gauge("titus_agent_connected", "1 while the stream to the leader is attached.", &[]),
            sessions_total: r.counter(
                "titus_agent_sessions_total",
                "Streams to the control plane that ended, by how (reconnects).",
                &["end"],
            ),
            docker_healthy: r.gauge("titus_agent_docker_healthy", "1 while the Docker daemon answers.", &[]),
            assignments_total: r.counter("titus_agent_assignments_total", "Tasks assigned to this agent.", &[]),
            kills_total: r.counter("titus_agent_kills_total", "Kills received.", &[]),
            task_reports_total: r.counter(
                "titus_agent_task_reports_total",
                "Task states reported to the control plane, by state.",
                &["state"],
            ),
            launch_seconds: r.histogram(
                "titus_agent_launch_seconds",
                "Assignment received to container started (or failed).",
                &[],
                titus_obs::LATENCY_BUCKETS,
            ),
            registry: r,
        }
    })
}

pub fn handler() -> Handler {
    Arc::new(|path: String| {
        Box::pin(async move {
            let m = metrics();
            match path.split('?').next().unwrap_or("") {
                "/metrics" => {
                    let mut text = m.registry.render();
                    text.push_str(&titus_obs::process::process_metrics("titus-agent", env!("CARGO_PKG_VERSION")));
                    Response::metrics(text)
                }
                "/healthz" => Response::text(200, "ok\n"),
                "/readyz" => {
                    let attached = m.connected.value(&[]) > 0.0;
                    if attached {
                        Response::text(200, "ready\n")
                    } else {
                        Response::text(503, "not ready: not attached to the leader\n")
                    }
                }
                _ => Response::text(404, "not found: try /metrics, /healthz, /readyz\n"),
            }
        })
    })
}
