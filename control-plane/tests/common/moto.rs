//! (Included by the tests that need AWS: `#[path] mod moto;`, beside `common`.)
//!
//! A `moto_server` (AWS's EC2 and ELBv2 APIs, in memory) on a free loopback port, and a fault proxy
//! that puts throttling and 5xx answers in front of it. Both stop when dropped.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Moto {
    pub url: String,
    pub port: u16,
    process: Child,
    pub log: std::path::PathBuf,
}

impl Moto {
    /// Starts `moto_server` (PyPI `moto[server]`; `.ci/run` installs it) and waits until it answers.
    pub fn start(dir: &std::path::Path) -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let log = dir.join(format!("moto-{port}.log"));
        let out = std::fs::File::create(&log).expect("moto log file");
        let process = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::from(out.try_clone().expect("log fd")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("moto_server is not installed: pip install 'moto[server]' (see .ci/run)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start on port {port}; see {}", log.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        // The variables the AWS SDK's credential chain reads, in the replicas (children inherit them)
        // and in this test's own SDK clients. Each nextest test is its own process.
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ] {
            std::env::set_var(k, v);
        }
        Moto { url: format!("http://127.0.0.1:{port}"), port, process, log }
    }

    /// SDK clients for the test's own calls (creating target groups, tampering with targets).
    pub async fn sdk(&self) -> (aws_sdk_elasticloadbalancingv2::Client, aws_sdk_ec2::Client) {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(&self.url)
            .load()
            .await;
        (aws_sdk_elasticloadbalancingv2::Client::new(&config), aws_sdk_ec2::Client::new(&config))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A VPC and a target group of `target_type` in it; returns the group's ARN.
pub async fn target_group(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    ec2: &aws_sdk_ec2::Client,
    name: &str,
    target_type: aws_sdk_elasticloadbalancingv2::types::TargetTypeEnum,
) -> String {
    let vpc = ec2.create_vpc().cidr_block("172.17.0.0/16").send().await.expect("CreateVpc");
    let vpc_id = vpc.vpc().and_then(|v| v.vpc_id()).expect("vpc id").to_string();
    let tg = elb
        .create_target_group()
        .name(name)
        .protocol(aws_sdk_elasticloadbalancingv2::types::ProtocolEnum::Http)
        .port(8080)
        .vpc_id(vpc_id)
        .target_type(target_type)
        .send()
        .await
        .expect("CreateTargetGroup");
    tg.target_groups()[0].target_group_arn().expect("arn").to_string()
}

/// A VPC with one subnet in each of `zones`; returns the subnet ids.
pub async fn subnets(ec2: &aws_sdk_ec2::Client, zones: &[&str]) -> Vec<String> {
    let vpc = ec2.create_vpc().cidr_block("10.20.0.0/16").send().await.expect("CreateVpc");
    let vpc_id = vpc.vpc().and_then(|v| v.vpc_id()).expect("vpc id").to_string();
    let mut out = Vec::new();
    for (i, zone) in zones.iter().enumerate() {
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(format!("10.20.{i}.0/24"))
            .availability_zone(*zone)
            .send()
            .await
            .expect("CreateSubnet");
        out.push(subnet.subnet().and_then(|s| s.subnet_id()).expect("subnet id").to_string());
    }
    out
}

/// The target ids (IPs) the group holds.
pub async fn targets(elb: &aws_sdk_elasticloadbalancingv2::Client, arn: &str) -> std::collections::BTreeSet<String> {
    match elb.describe_target_health().target_group_arn(arn).send().await {
        Ok(out) => out
            .target_health_descriptions()
            .iter()
            .filter_map(|d| d.target().and_then(|t| t.id()).map(str::to_string))
            .collect(),
        Err(e) => panic!("DescribeTargetHealth: {e:?}"),
    }
}

/// An HTTP/1.1 proxy in front of moto that answers some requests itself with AWS's throttling
/// error (400 Throttling) or a 503, without forwarding them. Every `every`-th request is faulted,
/// alternating between the two kinds, while `active` is on.
pub struct FaultProxy {
    pub url: String,
    pub faults: Arc<AtomicU64>,
    pub forwarded: Arc<AtomicU64>,
    /// While on, every RegisterTargets call is refused with 403 AccessDenied (a permission an
    /// operator has yet to grant).
    pub deny_register: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream_port: u16, every: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fault proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let faults = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(AtomicU64::new(0));
        let deny_register = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (f, fw, deny) = (faults.clone(), forwarded.clone(), deny_register.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else { return };
                let (f, fw, seen, deny) = (f.clone(), fw.clone(), seen.clone(), deny.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, upstream_port, every, &seen, &f, &fw, &deny).await;
                });
            }
        });
        FaultProxy { url, faults, forwarded, deny_register, task }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (headers and a Content-Length body).
async fn read_request(conn: &mut TcpStream) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
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
        .unwrap_or(0);
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

/// Without a `Connection` header line, with `Connection: close` added.
fn closing(head: &str) -> String {
    let lines: Vec<&str> = head
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.join("\r\n") + "\r\nConnection: close\r\n\r\n"
}

/// Serves one request per connection (each answer says `Connection: close`), so a fault never
/// leaves a half-read connection behind.
async fn serve(
    mut conn: TcpStream,
    upstream_port: u16,
    every: u64,
    seen: &AtomicU64,
    faults: &AtomicU64,
    forwarded: &AtomicU64,
    deny_register: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    let Some((head, body)) = read_request(&mut conn).await? else { return Ok(()) };
    if deny_register.load(Ordering::SeqCst) && String::from_utf8_lossy(&body).contains("Action=RegisterTargets") {
        let xml = "<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>User is not authorized to perform: elasticloadbalancing:RegisterTargets</Message></Error><RequestId>fault-proxy</RequestId></ErrorResponse>";
        let response = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
            xml.len()
        );
        conn.write_all(response.as_bytes()).await?;
        return conn.shutdown().await;
    }
    let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
    if every > 0 && n.is_multiple_of(every) {
        let k = faults.fetch_add(1, Ordering::SeqCst);
        let (status, content_type, text) = if k.is_multiple_of(2) {
            (
                "400 Bad Request",
                "text/xml",
                "<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>fault-proxy</RequestId></ErrorResponse>",
            )
        } else {
            ("503 Service Unavailable", "text/plain", "Service Unavailable")
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        );
        conn.write_all(response.as_bytes()).await?;
        return conn.shutdown().await;
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream_port)).await?;
    up.write_all(closing(&head).as_bytes()).await?;
    up.write_all(&body).await?;
    let mut response = Vec::new();
    up.read_to_end(&mut response).await?;
    forwarded.fetch_add(1, Ordering::SeqCst);
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").map_or(response.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    conn.write_all(closing(&head).as_bytes()).await?;
    conn.write_all(&response[split..]).await?;
    conn.shutdown().await
}
