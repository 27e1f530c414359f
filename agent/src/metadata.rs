//! The metadata proxy: what a container reaches at 169.254.169.254 (EC2 instance metadata, IMDSv2
//! with session tokens; v1 only for jobs that opt in) and at 169.254.170.2 (the container
//! credentials endpoint every AWS SDK reads through `AWS_CONTAINER_CREDENTIALS_FULL_URI`).
//!
//! Both are routed to this one listener on the host ([`crate::routes`]). A request is answered for
//! the task whose container holds its source address, and for no other: a container can never read
//! another task's credentials, whatever token it sends. An address no task holds gets 403, and so
//! does a connection that did not arrive at its job network's gateway (one from another host,
//! whatever source address it claims).
//!
//! Requests are small and bounded: hyper's HTTP/1.1, one request per connection, a header block of
//! at most 16 KiB sent within 10 s, and at most 32 connections open per source address.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::identity::{constant_time_eq, Identities, TaskIdentity, CREDENTIALS_PATH};

/// Connections one source address may hold open at once; more are closed at accept.
const MAX_CONNECTIONS_PER_SOURCE: usize = 32;
/// The longest IMDSv2 session token TTL (EC2's).
const MAX_SESSION_TTL_SECS: u64 = 21_600;
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// Binds the proxy's listener (`port` 0: any free one) on every address, and serves it for as long
/// as the agent runs. Returns the port.
pub async fn serve(identities: Arc<Identities>, port: u16) -> std::io::Result<u16> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).await?;
    let port = listener.local_addr()?.port();
    let open: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metadata proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(slot) = ConnectionSlot::take(&open, peer.ip()) else {
                tracing::warn!(%peer, "metadata proxy: too many connections from one address; closed");
                continue;
            };
            let identities = identities.clone();
            let local = stream.local_addr().map(|a| a.ip()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let identities = identities.clone();
                    async move {
                        let header =
                            |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
                        let (source, method, path) = (peer.ip(), req.method(), req.uri().path());
                        Ok::<_, Infallible>(answer(&identities, source, local, method, path, &header))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .keep_alive(false)
                    .header_read_timeout(Duration::from_secs(10))
                    .max_buf_size(16 * 1024)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, %peer, "metadata proxy connection failed");
                }
            });
        }
    });
    Ok(port)
}

/// One of a source address's connections, given back when dropped.
struct ConnectionSlot {
    open: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    source: IpAddr,
}

impl ConnectionSlot {
    fn take(open: &Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>, source: IpAddr) -> Option<ConnectionSlot> {
        let mut counts = open.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(source).or_default();
        if *n >= MAX_CONNECTIONS_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot { open: open.clone(), source })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, "text/plain", body.into())
}

fn json(value: serde_json::Value) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, "application/json", value.to_string())
}

/// The answer to one request from `source`; `header` reads the request's headers.
fn answer(
    identities: &Identities,
    source: IpAddr,
    local: IpAddr,
    method: &Method,
    path: &str,
    header: &dyn Fn(&str) -> Option<String>,
) -> Response<Full<Bytes>> {
    let (Some(source), Some(local)) = (v4(source), v4(local)) else {
        return text(StatusCode::FORBIDDEN, "not a task's address\n");
    };
    // A job network is a /24 whose gateway (this host's end) is where its containers' requests
    // arrive, routed or not.
    if source.octets()[..3] != local.octets()[..3] {
        tracing::warn!(%source, %local, path, "metadata request that did not come in from a job network");
        return text(StatusCode::FORBIDDEN, "not from a job network\n");
    }
    let Some(task) = identities.get(source) else {
        tracing::debug!(%source, path, "metadata request from an address no task holds");
        return text(StatusCode::FORBIDDEN, "not a task's address\n");
    };
    if path == CREDENTIALS_PATH || path.starts_with(&format!("{CREDENTIALS_PATH}/")) {
        if method != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        return container_credentials(&task, header("authorization"));
    }
    if path == "/latest/api/token" {
        if method != Method::PUT {
            return text(StatusCode::METHOD_NOT_ALLOWED, "PUT only\n");
        }
        // EC2 refuses a token to a request that went through a proxy (SSRF through one).
        if header("x-forwarded-for").is_some() {
            return text(StatusCode::FORBIDDEN, "forwarded requests get no token\n");
        }
        let ttl = header(TTL_HEADER).and_then(|v| v.trim().parse::<u64>().ok());
        return match ttl {
            Some(ttl @ 1..=MAX_SESSION_TTL_SECS) => {
                let mut r = text(StatusCode::OK, task.open_session(Duration::from_secs(ttl)));
                if let Ok(v) = ttl.to_string().parse() {
                    r.headers_mut().insert(TTL_HEADER, v);
                }
                r
            }
            _ => text(StatusCode::BAD_REQUEST, format!("{TTL_HEADER} must be 1-{MAX_SESSION_TTL_SECS}\n")),
        };
    }
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match header(TOKEN_HEADER) {
        Some(token) if task.session_valid(&token) => {}
        Some(_) => return text(StatusCode::UNAUTHORIZED, "invalid or expired session token\n"),
        None if task.allow_imds_v1 => {}
        None => {
            return text(
                StatusCode::UNAUTHORIZED,
                "an IMDSv2 session token is required (PUT /latest/api/token); this job does not allow IMDSv1\n",
            )
        }
    }
    instance_metadata(identities, &task, path)
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

/// ECS's container credentials answer, for the task whose token comes with the request.
fn container_credentials(task: &TaskIdentity, authorization: Option<String>) -> Response<Full<Bytes>> {
    match authorization {
        None => return text(StatusCode::UNAUTHORIZED, "Authorization is required\n"),
        Some(a) if !constant_time_eq(a.as_bytes(), task.auth_token.as_bytes()) => {
            tracing::warn!(task_id = %task.task_id, "container credentials asked with a wrong token");
            return text(StatusCode::FORBIDDEN, "wrong token\n");
        }
        Some(_) => {}
    }
    let Some(role) = &task.role else { return text(StatusCode::NOT_FOUND, "this task has no IAM role\n") };
    let Some((c, _)) = task.credentials() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "the role's credentials are being refreshed\n");
    };
    json(serde_json::json!({
        "RoleArn": role,
        "AccessKeyId": c.access_key_id,
        "SecretAccessKey": c.secret_access_key,
        "Token": c.session_token,
        "Expiration": iso8601(c.expiration_ms),
    }))
}

/// The instance metadata paths SDKs and Eureka clients read; anything else is 404.
fn instance_metadata(identities: &Identities, task: &TaskIdentity, path: &str) -> Response<Full<Bytes>> {
    let ok = |body: String| text(StatusCode::OK, body);
    let ip = task.ip.to_string();
    match path.trim_end_matches('/') {
        "/latest" => ok("dynamic\nmeta-data\n".into()),
        "/latest/meta-data" => {
            let mut items = vec!["hostname", "instance-id", "local-hostname", "local-ipv4", "placement/"];
            if task.role.is_some() {
                items.push("iam/");
            }
            ok(items.join("\n"))
        }
        "/latest/meta-data/instance-id" => ok(task.task_id.clone()),
        "/latest/meta-data/local-ipv4" => ok(ip),
        "/latest/meta-data/hostname" | "/latest/meta-data/local-hostname" => ok(hostname(task.ip)),
        "/latest/meta-data/placement" => ok("availability-zone\nregion".into()),
        "/latest/meta-data/placement/availability-zone" if !identities.zone.is_empty() => ok(identities.zone.clone()),
        "/latest/meta-data/placement/region" if !identities.region.is_empty() => ok(identities.region.clone()),
        "/latest/dynamic/instance-identity/document" => json(serde_json::json!({
            "instanceId": task.task_id,
            "privateIp": ip,
            "availabilityZone": identities.zone,
            "region": identities.region,
        })),
        "/latest/meta-data/iam" if task.role.is_some() => ok("info\nsecurity-credentials/".into()),
        "/latest/meta-data/iam/info" => match (&task.role, task.credentials()) {
            (Some(role), Some((_, updated))) => json(serde_json::json!({
                "Code": "Success",
                "LastUpdated": iso8601(updated),
                "InstanceProfileArn": role,
                "InstanceProfileId": task.task_id,
            })),
            _ => text(StatusCode::NOT_FOUND, "no IAM role\n"),
        },
        "/latest/meta-data/iam/security-credentials" => match task.role_name() {
            Some(name) => ok(name.to_string()),
            None => text(StatusCode::NOT_FOUND, "no IAM role\n"),
        },
        p => match (p.strip_prefix("/latest/meta-data/iam/security-credentials/"), task.role_name()) {
            (Some(asked), Some(name)) if asked == name => match task.credentials() {
                Some((c, updated)) => json(serde_json::json!({
                    "Code": "Success",
                    "LastUpdated": iso8601(updated),
                    "Type": "AWS-HMAC",
                    "AccessKeyId": c.access_key_id,
                    "SecretAccessKey": c.secret_access_key,
                    "Token": c.session_token,
                    "Expiration": iso8601(c.expiration_ms),
                })),
                None => text(StatusCode::SERVICE_UNAVAILABLE, "the role's credentials are being refreshed\n"),
            },
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        },
    }
}

/// EC2's private DNS name for an address: ip-172-29-0-2.ec2.internal.
fn hostname(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("ip-{a}-{b}-{c}-{d}.ec2.internal")
}

/// `2026-12-07T15:20:00Z` from milliseconds since the epoch.
pub fn iso8601(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = titus_obs::admin::civil_date(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AwsIdentityConfig;

    const GATEWAY: IpAddr = IpAddr::V4(Ipv4Addr::new(172, 29, 0, 1));

    async fn identities() -> Arc<Identities> {
        let attributes = [("zone".to_string(), "us-east-1b".to_string())].into();
        let ids = Identities::new(&AwsIdentityConfig::default(), &attributes).await;
        for (task, last) in [("t-a", 2), ("t-b", 3)] {
            ids.admit(task, "j", Ipv4Addr::new(172, 29, 0, last), None, task == "t-b", format!("token-{task}"))
                .await
                .unwrap();
        }
        ids
    }

    #[tokio::test]
    async fn each_address_gets_its_own_task_and_imdsv2_is_required_unless_allowed() {
        let ids = identities().await;
        let status = |last, method, path: &str, headers: &[(&str, &str)]| {
            let header = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
            answer(&ids, IpAddr::V4(Ipv4Addr::new(172, 29, 0, last)), GATEWAY, &method, path, &header).status().as_u16()
        };
        assert_eq!(status(9, Method::GET, "/latest/meta-data/instance-id", &[]), 403, "no task at .9");
        let header = |_: &str| None;
        let from_outside = answer(
            &ids,
            IpAddr::V4(Ipv4Addr::new(172, 29, 0, 3)),
            "10.0.0.5".parse().unwrap(),
            &Method::GET,
            "/latest/meta-data/instance-id",
            &header,
        );
        assert_eq!(from_outside.status(), 403, "t-b's address, arriving at another interface");
        assert_eq!(status(2, Method::GET, "/latest/meta-data/instance-id", &[]), 401, "v1 refused");
        assert_eq!(status(3, Method::GET, "/latest/meta-data/instance-id", &[]), 200, "v1 allowed for t-b");
        assert_eq!(status(2, Method::PUT, "/latest/api/token", &[]), 400, "a TTL is required");
        assert_eq!(status(2, Method::PUT, "/latest/api/token", &[(TTL_HEADER, "21601")]), 400);
        let forwarded = [(TTL_HEADER, "60"), ("x-forwarded-for", "1.2.3.4")];
        assert_eq!(status(2, Method::PUT, "/latest/api/token", &forwarded), 403);
        let header = |name: &str| (name == TTL_HEADER).then(|| "60".to_string());
        let r =
            answer(&ids, IpAddr::V4(Ipv4Addr::new(172, 29, 0, 2)), GATEWAY, &Method::PUT, "/latest/api/token", &header);
        assert_eq!(r.status(), 200);
        let token = body(r).await;
        let with = [(TOKEN_HEADER, token.as_str())];
        assert_eq!(status(2, Method::GET, "/latest/meta-data/instance-id", &with), 200);
        assert_eq!(status(3, Method::GET, "/latest/meta-data/instance-id", &with), 401, "t-a's token is not t-b's");
        assert_eq!(status(2, Method::GET, "/latest/meta-data/nothing-here", &with), 404);
        assert_eq!(status(2, Method::GET, "/latest/meta-data/iam/security-credentials/", &with), 404, "no role");
        assert_eq!(status(2, Method::POST, "/latest/meta-data/instance-id", &with), 405);
        let get = |last, path: &'static str| {
            let ids = ids.clone();
            let token = token.clone();
            async move {
                let header = move |name: &str| (name == TOKEN_HEADER).then(|| token.clone());
                body(answer(&ids, IpAddr::V4(Ipv4Addr::new(172, 29, 0, last)), GATEWAY, &Method::GET, path, &header))
                    .await
            }
        };
        assert_eq!(get(2, "/latest/meta-data/instance-id").await, "t-a");
        assert_eq!(get(2, "/latest/meta-data/local-ipv4").await, "172.29.0.2");
        assert_eq!(get(2, "/latest/meta-data/placement/availability-zone").await, "us-east-1b");
        assert_eq!(get(2, "/latest/meta-data/placement/region").await, "us-east-1");
        // The container credentials endpoint: the token of the task at that address, or nothing.
        assert_eq!(status(2, Method::GET, CREDENTIALS_PATH, &[]), 401);
        assert_eq!(status(2, Method::GET, CREDENTIALS_PATH, &[("authorization", "token-t-b")]), 403);
        assert_eq!(status(2, Method::GET, CREDENTIALS_PATH, &[("authorization", "token-t-a")]), 404, "no role");
        ids.forget("t-a");
        assert_eq!(status(2, Method::GET, CREDENTIALS_PATH, &[("authorization", "token-t-a")]), 403, "forgotten");
    }

    async fn body(r: Response<Full<Bytes>>) -> String {
        use http_body_util::BodyExt;
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[test]
    fn connections_per_source_are_bounded_and_given_back() {
        let open = Arc::default();
        let a: IpAddr = "172.29.0.2".parse().unwrap();
        let held: Vec<_> = (0..MAX_CONNECTIONS_PER_SOURCE).map(|_| ConnectionSlot::take(&open, a).unwrap()).collect();
        assert!(ConnectionSlot::take(&open, a).is_none(), "one over the bound is refused");
        assert!(ConnectionSlot::take(&open, "172.29.0.3".parse().unwrap()).is_some(), "others are not affected");
        drop(held);
        assert!(ConnectionSlot::take(&open, a).is_some());
        assert_eq!(open.lock().unwrap().len(), 0, "counts of closed connections are dropped");
    }

    #[test]
    fn times_are_iso8601_utc() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_796_655_600_000), "2026-12-07T15:00:00Z");
        assert_eq!(hostname(Ipv4Addr::new(172, 29, 0, 2)), "ip-172-29-0-2.ec2.internal");
    }
}
