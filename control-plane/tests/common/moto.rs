//! (Included by the tests that need AWS: `#[path] mod moto;`, beside `common`.)
//!
//! A `moto_server` (AWS's EC2 and ELBv2 APIs, in memory) on a free loopback port; it stops when
//! dropped. Faults in front of it come from titus-chaos's AWS fault proxy.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Moto {
    pub url: String,
    pub port: u16,
    process: Child,
    pub log: std::path::PathBuf,
}

impl Moto {
    /// Starts `moto_server` (PyPI `moto[server]`; `.ci/run` installs it) and waits until it answers.
    pub fn start(dir: &std::path::Path) -> Moto {
        Moto::start_on(dir, "127.0.0.1")
    }

    /// On `host` (loopback, or the bridge address of a network the test made).
    pub fn start_on(dir: &std::path::Path, host: &str) -> Moto {
        let port = std::net::TcpListener::bind((host, 0)).and_then(|l| l.local_addr()).expect("free port").port();
        let log = dir.join(format!("moto-{port}.log"));
        let out = std::fs::File::create(&log).expect("moto log file");
        let process = Command::new("moto_server")
            .args(["-H", host, "-p", &port.to_string()])
            .stdout(Stdio::from(out.try_clone().expect("log fd")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("moto_server is not installed: pip install 'moto[server]' (see .ci/run)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((host, port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start on port {port}; see {}", log.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        set_aws_env();
        Moto { url: format!("http://{host}:{port}"), port, process, log }
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

/// The variables the AWS SDK's credential chain reads, in the replicas (children inherit them) and in
/// this test's own SDK clients. Each nextest test is its own process.
pub fn set_aws_env() {
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        std::env::set_var(k, v);
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
