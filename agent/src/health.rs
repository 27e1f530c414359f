//! Container health checks. A command check is Docker's own HEALTHCHECK (the daemon runs it in the
//! container; the agent reads its verdict and hears its `health_status` events). An HTTP check is
//! made by the agent: a GET of the path on the container's address, every interval; 2xx or 3xx is
//! a pass; `retries` failures in a row (not counting those in the start period) make the task
//! unhealthy, one pass makes it healthy again. Either way a change is reported like a state, with
//! the task's context key `health`.
//!
//! The HTTP check's settings travel in a container label, so an agent that restarts finds them on
//! the containers it adopts and probes those too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use titus_proto as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The label holding an HTTP check: `port interval timeout retries start-period path`.
pub const LABEL_HTTP_CHECK: &str = "titus.health.http";

const NANOS: i64 = 1_000_000_000;

/// Docker's HEALTHCHECK for a command check; None for none, or an HTTP one.
pub fn docker_check(check: Option<&pb::HealthCheck>) -> Option<bollard::models::HealthConfig> {
    let h = check.filter(|h| !h.command.is_empty())?;
    Some(bollard::models::HealthConfig {
        test: Some([vec!["CMD".to_string()], h.command.clone()].concat()),
        interval: Some(i64::from(h.interval_sec.max(1)) * NANOS),
        timeout: Some(i64::from(h.timeout_sec.max(1)) * NANOS),
        retries: Some(i64::from(h.retries.max(1))),
        start_period: Some(i64::from(h.start_period_sec) * NANOS),
        // Probed every second while starting, so a new task turns healthy without waiting a
        // whole interval (Docker 25 and later; earlier ones ignore it).
        start_interval: Some(NANOS),
    })
}

/// An HTTP check, as its label says it.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpCheck {
    pub port: u16,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub start_period: Duration,
}

impl HttpCheck {
    pub fn from_spec(check: Option<&pb::HealthCheck>) -> Option<HttpCheck> {
        let h = check.filter(|h| h.command.is_empty() && !h.http_path.is_empty())?;
        Some(HttpCheck {
            port: u16::try_from(h.http_port).ok().filter(|p| *p > 0)?,
            path: h.http_path.clone(),
            interval: Duration::from_secs(u64::from(h.interval_sec.max(1))),
            timeout: Duration::from_secs(u64::from(h.timeout_sec.max(1))),
            retries: h.retries.max(1),
            start_period: Duration::from_secs(u64::from(h.start_period_sec)),
        })
    }

    pub fn label(&self) -> String {
        format!(
            "{} {} {} {} {} {}",
            self.port,
            self.interval.as_secs(),
            self.timeout.as_secs(),
            self.retries,
            self.start_period.as_secs(),
            self.path
        )
    }

    pub fn parse_label(text: &str) -> Option<HttpCheck> {
        let mut parts = text.splitn(6, ' ');
        let mut num = || parts.next()?.parse::<u64>().ok();
        let (port, interval, timeout, retries, start) = (num()?, num()?, num()?, num()?, num()?);
        let path = parts.next()?.to_string();
        Some(HttpCheck {
            port: u16::try_from(port).ok()?,
            path,
            interval: Duration::from_secs(interval.max(1)),
            timeout: Duration::from_secs(timeout.max(1)),
            retries: u32::try_from(retries).ok()?.max(1),
            start_period: Duration::from_secs(start),
        })
    }
}

/// One GET: whether it answered 2xx or 3xx within the timeout.
pub async fn probe(ip: &str, check: &HttpCheck) -> Result<(), String> {
    let attempt = async {
        let mut conn = TcpStream::connect((ip, check.port)).await.map_err(|e| format!("connect: {e}"))?;
        let request = format!("GET {} HTTP/1.0\r\nHost: {ip}\r\nUser-Agent: titus-agent\r\n\r\n", check.path);
        conn.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut head = [0u8; 64];
        let n = conn.read(&mut head).await.map_err(|e| format!("read: {e}"))?;
        let line = String::from_utf8_lossy(&head[..n]);
        let code: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("no HTTP status line")?;
        if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("HTTP {code}"))
        }
    };
    tokio::time::timeout(check.timeout, attempt).await.map_err(|_| format!("no answer in {:?}", check.timeout))?
}

/// Whether a container still runs.
pub type Running = Arc<dyn Fn() -> futures::future::BoxFuture<'static, bool> + Send + Sync>;

/// The verdicts of the agent's HTTP checks, by task, and the probers making them.
#[derive(Clone, Default)]
pub struct Probes {
    verdicts: Arc<Mutex<HashMap<String, &'static str>>>,
    /// Told the task id whenever a verdict changes.
    changed: Arc<Mutex<Option<tokio::sync::mpsc::UnboundedSender<String>>>>,
}

impl Probes {
    /// Where verdict changes go (the agent's event loop).
    pub fn subscribe(&self) -> tokio::sync::mpsc::UnboundedReceiver<String> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.changed.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    pub fn verdict(&self, task_id: &str) -> Option<&'static str> {
        self.verdicts.lock().unwrap_or_else(|p| p.into_inner()).get(task_id).copied()
    }

    /// Starts probing `task_id` at `ip` unless a prober already does. `running` says whether its
    /// container still runs; the prober ends (and forgets its verdict) once it does not.
    pub fn ensure(&self, task_id: &str, ip: String, check: HttpCheck, running: Running) {
        {
            let mut verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
            if verdicts.contains_key(task_id) {
                return;
            }
            verdicts.insert(task_id.to_string(), "starting");
        }
        let (probes, task_id) = (self.clone(), task_id.to_string());
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut failures = 0u32;
            loop {
                let passed = probe(&ip, &check).await;
                let verdict = match &passed {
                    Ok(()) => {
                        failures = 0;
                        "healthy"
                    }
                    Err(_) if started.elapsed() < check.start_period => probes.verdict(&task_id).unwrap_or("starting"),
                    Err(_) => {
                        failures = failures.saturating_add(1);
                        let now = probes.verdict(&task_id).unwrap_or("starting");
                        if failures >= check.retries {
                            "unhealthy"
                        } else {
                            now
                        }
                    }
                };
                if let Err(why) = &passed {
                    tracing::debug!(task_id, why, failures, "http health check failed");
                }
                probes.set(&task_id, verdict);
                tokio::time::sleep(check.interval).await;
                if !running().await {
                    probes.verdicts.lock().unwrap_or_else(|p| p.into_inner()).remove(&task_id);
                    return;
                }
            }
        });
    }

    fn set(&self, task_id: &str, verdict: &'static str) {
        let before = self.verdicts.lock().unwrap_or_else(|p| p.into_inner()).insert(task_id.to_string(), verdict);
        if before != Some(verdict) {
            tracing::info!(task_id, health = verdict, "task health changed");
            if let Some(tx) = self.changed.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                let _ = tx.send(task_id.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_check_survives_its_label_and_a_command_check_is_docker_s() {
        let spec = pb::HealthCheck {
            http_path: "/health?full=1".into(),
            http_port: 8080,
            interval_sec: 2,
            timeout_sec: 1,
            retries: 3,
            start_period_sec: 5,
            ..Default::default()
        };
        let check = HttpCheck::from_spec(Some(&spec)).unwrap();
        assert_eq!(HttpCheck::parse_label(&check.label()), Some(check));
        assert!(docker_check(Some(&spec)).is_none());
        let cmd =
            pb::HealthCheck { command: vec!["cat".into(), "/ready".into()], interval_sec: 2, ..Default::default() };
        let docker = docker_check(Some(&cmd)).unwrap();
        assert_eq!(docker.test.unwrap(), ["CMD", "cat", "/ready"]);
        assert_eq!(docker.interval, Some(2 * NANOS));
        assert!(HttpCheck::from_spec(Some(&cmd)).is_none());
    }

    #[tokio::test]
    async fn a_probe_passes_on_2xx_and_fails_on_5xx_or_silence() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut conn, _)) = listener.accept().await {
                n += 1;
                let mut buf = [0u8; 512];
                let _ = conn.read(&mut buf).await;
                let answer = if n == 1 { "HTTP/1.0 204 No Content\r\n\r\n" } else { "HTTP/1.1 503 Busy\r\n\r\n" };
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        });
        let check = HttpCheck {
            port,
            path: "/".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            retries: 1,
            start_period: Duration::ZERO,
        };
        assert_eq!(probe("127.0.0.1", &check).await, Ok(()));
        assert_eq!(probe("127.0.0.1", &check).await, Err("HTTP 503".into()));
        let closed = HttpCheck { port: 1, ..check };
        assert!(probe("127.0.0.1", &closed).await.is_err());
    }
}
