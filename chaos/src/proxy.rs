//! The AWS fault proxy: an HTTP/1.1 proxy put between the replicas and their AWS endpoint (moto in
//! tests) that answers some requests itself with AWS's throttling errors or a 5xx, and delays others.
//! Its faults are switched at run time through its own control path, so titus-chaos can turn them on
//! for a fault's duration and off again:
//!
//! - `GET /__chaos/faults` → the fault settings and counters (JSON);
//! - `PUT /__chaos/faults` with a [`FaultConfig`] body → new settings (`{}` turns faults off).
//!
//! AWS's query APIs (EC2, ELBv2) POST to `/`, so the control path never collides with a real call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const CONTROL_PATH: &str = "/__chaos/faults";

/// What the proxy does to the calls it forwards. All rates are fractions of calls, 0 to 1.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Answered 400 with AWS's `Throttling` (ELBv2) or `RequestLimitExceeded` (EC2) error.
    pub throttle_rate: f64,
    /// Answered 503 Service Unavailable.
    pub error_rate: f64,
    /// Delayed by `latency_ms` before being forwarded.
    pub latency_rate: f64,
    pub latency_ms: u64,
    /// Deterministic mode for tests: every `every`-th call is faulted, alternating throttling and 503.
    pub every: u64,
    /// Calls whose `Action` is listed are refused with 403 AccessDenied (a missing IAM permission).
    pub deny_actions: Vec<String>,
    /// Seed of the fault choices (0: from the clock).
    pub seed: u64,
    /// Targets that DescribeTargetHealth answers say are `unhealthy` where AWS said `healthy`
    /// (moto says every target is healthy): their ids (IPs, for an `ip` target group), `*` for
    /// all, and `!id` for one spared from a `*`.
    pub unhealthy_targets: Vec<String>,
}

impl FaultConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, rate) in [
            ("throttle_rate", self.throttle_rate),
            ("error_rate", self.error_rate),
            ("latency_rate", self.latency_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                bail!("{name}: {rate} is not a fraction between 0 and 1");
            }
        }
        if self.throttle_rate + self.error_rate > 1.0 {
            bail!("throttle_rate + error_rate: {} exceeds 1", self.throttle_rate + self.error_rate);
        }
        if self.latency_ms > 120_000 {
            bail!("latency_ms: {} is over the 120000 ms bound", self.latency_ms);
        }
        Ok(())
    }

    pub fn is_off(&self) -> bool {
        *self == FaultConfig { seed: self.seed, ..FaultConfig::default() }
    }
}

/// Counters since the proxy started.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub requests: u64,
    pub throttled: u64,
    pub errors: u64,
    pub denied: u64,
    pub delayed: u64,
    pub forwarded: u64,
}

#[derive(Serialize, Deserialize)]
pub struct Status {
    pub config: FaultConfig,
    pub stats: Stats,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    throttled: AtomicU64,
    errors: AtomicU64,
    denied: AtomicU64,
    delayed: AtomicU64,
    forwarded: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Stats {
        Stats {
            requests: self.requests.load(Ordering::SeqCst),
            throttled: self.throttled.load(Ordering::SeqCst),
            errors: self.errors.load(Ordering::SeqCst),
            denied: self.denied.load(Ordering::SeqCst),
            delayed: self.delayed.load(Ordering::SeqCst),
            forwarded: self.forwarded.load(Ordering::SeqCst),
        }
    }
}

/// One request the proxy received (its control path aside), as it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub at: std::time::Instant,
    /// The caller's address: in a lab, which replica made the call.
    pub from: std::net::IpAddr,
    /// The AWS `Action` (`RunInstances`, `RegisterTargets`, ...); empty when the body names none.
    pub action: String,
}

impl Call {
    /// Whether the call changes something in AWS: anything but the read-only `Describe*`, `Get*`
    /// and `List*` actions (an unnamed action counts as a change: nothing proves it is not).
    pub fn is_mutation(&self) -> bool {
        !["Describe", "Get", "List"].iter().any(|p| self.action.starts_with(p))
    }
}

/// Calls kept for [`Proxy::calls`]; later ones are counted, not kept.
const MAX_CALLS: usize = 200_000;

struct Shared {
    upstream: String,
    config: Mutex<(FaultConfig, rand::rngs::StdRng)>,
    counters: Counters,
    calls: Mutex<Vec<Call>>,
}

/// A running proxy; it stops when dropped.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

enum Decision {
    Throttle,
    Error,
    Deny,
    Forward { delay: Option<Duration> },
}

impl Proxy {
    /// Listens on `listen` and forwards to `upstream` (`host:port`).
    pub async fn start(listen: &str, upstream: &str, config: FaultConfig) -> Result<Proxy> {
        config.validate()?;
        let listener =
            TcpListener::bind(listen).await.with_context(|| format!("binding the AWS fault proxy to {listen}"))?;
        let addr = listener.local_addr()?;
        let rng = rng_for(config.seed);
        let shared = Arc::new(Shared {
            upstream: upstream.trim_start_matches("http://").trim_end_matches('/').to_string(),
            config: Mutex::new((config, rng)),
            counters: Counters::default(),
            calls: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, peer)) = listener.accept().await else { return };
                let s = s.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(conn, peer.ip(), &s).await {
                        tracing::debug!(error = %e, "proxy connection");
                    }
                });
            }
        });
        Ok(Proxy { addr, shared, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, config: FaultConfig) -> Result<()> {
        config.validate()?;
        let mut guard = self.shared.config.lock().unwrap_or_else(|e| e.into_inner());
        guard.1 = rng_for(config.seed);
        guard.0 = config;
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// Every call received so far (up to 200,000), in the order they arrived, whatever was done
    /// with them (forwarded or faulted).
    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn rng_for(seed: u64) -> rand::rngs::StdRng {
    if seed == 0 {
        rand::rngs::StdRng::from_entropy()
    } else {
        rand::rngs::StdRng::seed_from_u64(seed)
    }
}

fn decide(shared: &Shared, body: &[u8]) -> Decision {
    let n = shared.counters.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let mut guard = shared.config.lock().unwrap_or_else(|e| e.into_inner());
    let (config, rng) = &mut *guard;
    let action = action_of(body);
    if action.as_deref().is_some_and(|a| config.deny_actions.iter().any(|d| d == a)) {
        return Decision::Deny;
    }
    if config.every > 0 && n.is_multiple_of(config.every) {
        return if (n / config.every) % 2 == 1 { Decision::Throttle } else { Decision::Error };
    }
    let roll: f64 = rng.gen();
    if roll < config.throttle_rate {
        return Decision::Throttle;
    }
    if roll < config.throttle_rate + config.error_rate {
        return Decision::Error;
    }
    let delay = (config.latency_ms > 0 && rng.gen::<f64>() < config.latency_rate)
        .then(|| Duration::from_millis(config.latency_ms));
    Decision::Forward { delay }
}

/// The `Action` of a form-encoded AWS query request.
fn action_of(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|kv| kv.strip_prefix("Action=")).map(str::to_string)
}

async fn respond(conn: &mut TcpStream, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}

fn aws_error(code: &str, message: &str) -> String {
    format!(
        "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>titus-chaos</RequestId></ErrorResponse>"
    )
}

/// Serves one request per connection (every answer says `Connection: close`), so a fault never
/// leaves a half-read connection behind.
async fn serve(mut conn: TcpStream, from: std::net::IpAddr, shared: &Shared) -> std::io::Result<()> {
    let Some((head, body)) = read_request(&mut conn).await? else { return Ok(()) };
    let request_line = head.lines().next().unwrap_or("");
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if path == CONTROL_PATH {
        return control(conn, shared, method, &body).await;
    }
    {
        let mut calls = shared.calls.lock().unwrap_or_else(|e| e.into_inner());
        if calls.len() < MAX_CALLS {
            let action = action_of(&body).unwrap_or_default();
            calls.push(Call { at: std::time::Instant::now(), from, action });
        }
    }
    let c = &shared.counters;
    match decide(shared, &body) {
        Decision::Deny => {
            c.denied.fetch_add(1, Ordering::SeqCst);
            let action = action_of(&body).unwrap_or_default();
            let xml = aws_error("AccessDenied", &format!("User is not authorized to perform: {action}"));
            respond(&mut conn, "403 Forbidden", "text/xml", &xml).await
        }
        Decision::Throttle => {
            c.throttled.fetch_add(1, Ordering::SeqCst);
            // EC2 names its throttling error RequestLimitExceeded; ELBv2 names it Throttling.
            let code = if String::from_utf8_lossy(&body).contains("Version=2016-11-15") {
                "RequestLimitExceeded"
            } else {
                "Throttling"
            };
            respond(&mut conn, "400 Bad Request", "text/xml", &aws_error(code, "Rate exceeded")).await
        }
        Decision::Error => {
            c.errors.fetch_add(1, Ordering::SeqCst);
            respond(&mut conn, "503 Service Unavailable", "text/plain", "Service Unavailable").await
        }
        Decision::Forward { delay } => {
            if let Some(delay) = delay {
                c.delayed.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
            }
            let mut up = TcpStream::connect(&shared.upstream).await?;
            up.write_all(closing(&head).as_bytes()).await?;
            up.write_all(&body).await?;
            let mut response = Vec::new();
            up.read_to_end(&mut response).await?;
            c.forwarded.fetch_add(1, Ordering::SeqCst);
            let split = response.windows(4).position(|w| w == b"\r\n\r\n").map_or(response.len(), |i| i + 4);
            let mut head = String::from_utf8_lossy(&response[..split]).into_owned();
            let mut payload = response[split..].to_vec();
            let unhealthy = shared.config.lock().unwrap_or_else(|e| e.into_inner()).0.unhealthy_targets.clone();
            if !unhealthy.is_empty() && action_of(&body).as_deref() == Some("DescribeTargetHealth") {
                if let Some(rewritten) = mark_unhealthy(&payload, &unhealthy) {
                    head = with_content_length(&head, rewritten.len());
                    payload = rewritten;
                }
            }
            conn.write_all(closing(&head).as_bytes()).await?;
            conn.write_all(&payload).await?;
            conn.shutdown().await
        }
    }
}

async fn control(mut conn: TcpStream, shared: &Shared, method: &str, body: &[u8]) -> std::io::Result<()> {
    if method == "PUT" {
        let parsed: Result<FaultConfig> =
            serde_json::from_slice(body).map_err(anyhow::Error::from).and_then(|c: FaultConfig| {
                c.validate()?;
                Ok(c)
            });
        match parsed {
            Ok(config) => {
                let mut guard = shared.config.lock().unwrap_or_else(|e| e.into_inner());
                guard.1 = rng_for(config.seed);
                guard.0 = config;
            }
            Err(e) => {
                return respond(&mut conn, "400 Bad Request", "text/plain", &format!("fault config: {e:#}\n")).await
            }
        }
    } else if method != "GET" {
        return respond(&mut conn, "405 Method Not Allowed", "text/plain", "GET or PUT\n").await;
    }
    let config = shared.config.lock().unwrap_or_else(|e| e.into_inner()).0.clone();
    let status = Status { config, stats: shared.counters.snapshot() };
    let json = serde_json::to_string(&status).unwrap_or_default();
    respond(&mut conn, "200 OK", "application/json", &json).await
}

const MAX_BODY: usize = 16 << 20;

/// Reads one request (headers and a Content-Length body).
async fn read_request(conn: &mut TcpStream) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 << 10 {
            return Ok(None);
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok()).flatten()
        })
        .unwrap_or(0)
        .min(MAX_BODY);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(Some((head, body)))
}

/// A DescribeTargetHealth answer with the targets named (`*`: all) `unhealthy` where they were
/// `healthy`; None when the answer is not plain XML this can rewrite.
fn mark_unhealthy(xml: &[u8], targets: &[String]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(xml).ok()?;
    let mut out = String::with_capacity(text.len() + 64);
    let mut parts = text.split("<member>");
    out.push_str(parts.next()?);
    for member in parts {
        out.push_str("<member>");
        let id = member.split("<Id>").nth(1).and_then(|rest| rest.split("</Id>").next()).unwrap_or("");
        let spared = targets.iter().any(|t| t.strip_prefix('!') == Some(id));
        if !spared && targets.iter().any(|t| t == "*" || t == id) {
            out.push_str(&member.replacen("<State>healthy</State>", "<State>unhealthy</State>", 1));
        } else {
            out.push_str(member);
        }
    }
    Some(out.into_bytes())
}

/// `head` with its Content-Length set to `length`.
fn with_content_length(head: &str, length: usize) -> String {
    let lines: Vec<String> = head
        .trim_end_matches("\r\n")
        .split("\r\n")
        .map(|l| {
            if l.to_ascii_lowercase().starts_with("content-length:") {
                format!("Content-Length: {length}")
            } else {
                l.to_string()
            }
        })
        .collect();
    lines.join("\r\n") + "\r\n\r\n"
}

/// Without a `Connection` header line, with `Connection: close` added.
fn closing(head: &str) -> String {
    let lines: Vec<&str> = head
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.join("\r\n") + "\r\nConnection: close\r\n\r\n"
}

/// A client of a running proxy's control path (used by the fault runner and `heal`).
pub async fn remote_set(addr: &str, config: &FaultConfig) -> Result<Status> {
    let body = serde_json::to_string(config)?;
    remote(addr, "PUT", &body).await
}

pub async fn remote_status(addr: &str) -> Result<Status> {
    remote(addr, "GET", "").await
}

async fn remote(addr: &str, method: &str, body: &str) -> Result<Status> {
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let mut conn = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to the AWS fault proxy at {addr}"))??;
    let request = format!(
        "{method} {CONTROL_PATH} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), conn.read_to_end(&mut response))
        .await
        .context("the AWS fault proxy did not answer")??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("AWS fault proxy at {addr}: {}", body.trim());
    }
    serde_json::from_str(body).with_context(|| format!("AWS fault proxy at {addr}: unreadable status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(addr: std::net::SocketAddr, body: &str) -> String {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        response
    }

    #[test]
    fn target_health_answers_are_rewritten_for_the_targets_named() {
        let xml = "<R><TargetHealthDescriptions><member><Target><Id>10.0.0.1</Id></Target><TargetHealth><State>healthy</State></TargetHealth></member><member><Target><Id>10.0.0.2</Id></Target><TargetHealth><State>healthy</State></TargetHealth></member></TargetHealthDescriptions></R>";
        let one = String::from_utf8(mark_unhealthy(xml.as_bytes(), &["10.0.0.2".into()]).unwrap()).unwrap();
        assert_eq!(one.matches("<State>unhealthy</State>").count(), 1);
        assert!(one.contains("<Id>10.0.0.2</Id></Target><TargetHealth><State>unhealthy"), "{one}");
        let all = String::from_utf8(mark_unhealthy(xml.as_bytes(), &["*".into()]).unwrap()).unwrap();
        assert_eq!(all.matches("<State>unhealthy</State>").count(), 2);
        let but =
            String::from_utf8(mark_unhealthy(xml.as_bytes(), &["*".into(), "!10.0.0.1".into()]).unwrap()).unwrap();
        assert!(but.contains("<Id>10.0.0.1</Id></Target><TargetHealth><State>healthy"), "{but}");
        assert_eq!(but.matches("<State>unhealthy</State>").count(), 1);
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\nServer: x\r\n\r\n";
        assert_eq!(with_content_length(head, 12), "HTTP/1.1 200 OK\r\nContent-Length: 12\r\nServer: x\r\n\r\n");
    }

    #[tokio::test]
    async fn every_call_is_recorded_with_its_caller_and_action() {
        // Every call answered 503 by the proxy itself: no upstream is needed, and a faulted call is
        // recorded like a forwarded one.
        let faults = FaultConfig { error_rate: 1.0, ..Default::default() };
        let proxy = Proxy::start("127.0.0.1:0", "127.0.0.1:9", faults).await.unwrap();
        assert!(post(proxy.addr, "Action=RunInstances&Version=2016-11-15").await.starts_with("HTTP/1.1 503"));
        post(proxy.addr, "Action=DescribeInstances&Version=2016-11-15").await;
        post(proxy.addr, "no action here").await;
        let calls = proxy.calls();
        let seen: Vec<(&str, bool)> = calls.iter().map(|c| (c.action.as_str(), c.is_mutation())).collect();
        assert_eq!(seen, vec![("RunInstances", true), ("DescribeInstances", false), ("", true)]);
        assert!(calls.iter().all(|c| c.from == std::net::IpAddr::from([127, 0, 0, 1])));
        assert!(calls[0].at <= calls[1].at && calls[1].at <= calls[2].at);
        assert_eq!(proxy.stats().errors, 3);
    }
}
