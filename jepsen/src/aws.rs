//! The AWS workload: the replicas' AWS endpoint is moto (`moto_server`, on loopback) behind the
//! titus-chaos fault proxy (on the lab's bridge, where the replicas' namespaces reach it), which
//! records every call with the address, and so the replica, it came from. An EC2 instance group
//! whose instances never register as agents keeps the leader's capacity duty calling EC2 all the
//! time (RunInstances, then TerminateInstances once the registration timeout passes), and every
//! replica is asked every 100 ms whom it follows; the `fenced` checker then looks at what a leader
//! cut off by a partition did after another was elected.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use titus_chaos::proxy::{FaultConfig, Proxy};
use titus_client::proto as pb;
use titus_client::Client;
use tokio::time::Instant;

use crate::history::{Recorder, Type};

/// The instance group the workload creates.
pub const GROUP: &str = "jepsen-churn";

/// The process of replica `id`'s leader observations.
pub fn observer_process(id: u64) -> i64 {
    60_000 + id as i64
}

/// The process of the AWS calls replica `id` made (as the proxy saw them).
pub fn caller_process(id: u64) -> i64 {
    61_000 + id as i64
}

/// moto and the proxy in front of it; both stop when dropped.
pub struct Aws {
    moto: Child,
    pub proxy: Proxy,
}

impl Drop for Aws {
    fn drop(&mut self) {
        let _ = self.moto.kill();
        let _ = self.moto.wait();
    }
}

/// A port free on loopback now, for a server about to start.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// The replicas' flags for an AWS endpoint at `{host_ip}:proxy_port` (the lab puts its bridge
/// address in): capacity rounds every 200 ms, an instance given 600 ms to register.
pub fn replica_args(proxy_port: u16) -> Vec<String> {
    [
        "--aws-region",
        "us-east-1",
        "--aws-endpoint-url",
        &format!("http://{{host_ip}}:{proxy_port}"),
        "--capacity-interval-ms",
        "200",
        "--capacity-registration-timeout-ms",
        "600",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The variables the AWS SDK's credential chain reads; the replicas (started and restarted by
/// this process) inherit them.
pub fn set_env() {
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        std::env::set_var(k, v);
    }
}

/// Starts moto on loopback (its log in `dir`) and the proxy on `proxy_listen`.
pub async fn start(dir: &Path, proxy_listen: &str) -> Result<Aws> {
    let port = free_port()?;
    let log = dir.join("moto.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let moto = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .spawn()
        .context("starting moto_server (pip install 'moto[server]'; see .ci/run)")?;
    let mut moto = moto;
    let proxy = match Proxy::start(proxy_listen, &format!("127.0.0.1:{port}"), FaultConfig::default()).await {
        Ok(p) => p,
        Err(e) => {
            let _ = moto.kill();
            let _ = moto.wait();
            return Err(e);
        }
    };
    // From here on, dropping `aws` stops moto whatever fails next.
    let aws = Aws { moto, proxy };
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("moto_server did not answer on port {port} within 30 s; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(aws)
}

/// Creates the instance group (retried until `within`: the cluster may still be settling).
pub async fn create_group(client: &Client, within: Duration) -> Result<()> {
    let group = pb::InstanceGroup {
        id: GROUP.into(),
        tier: pb::Tier::Flex as i32,
        lifecycle: pb::InstanceGroupLifecycle::IgActive as i32,
        launch: Some(pb::LaunchSettings {
            image_id: "ami-12c6146b".into(),
            instance_type: "m5.large".into(),
            instance_resources: Some(pb::AgentResources { cpu: 2.0, memory_mb: 4096, ..Default::default() }),
            ..Default::default()
        }),
        min: 2,
        desired: 2,
        max: 2,
        ..Default::default()
    };
    let deadline = Instant::now() + within;
    loop {
        match client.put_instance_group(group.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("creating instance group {GROUP}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Asks every replica whom it follows every 100 ms until `until`: `leader` ops with
/// `[replica leader term]` (leader 0: none known).
pub async fn watch_leaders(client: Client, rec: Recorder, replicas: Vec<(u64, String)>, until: Instant) {
    while Instant::now() < until {
        for (id, api) in &replicas {
            let asked = tokio::time::timeout(Duration::from_millis(300), client.cluster_status_of(api)).await;
            if let Ok(Ok(s)) = asked {
                rec.record(observer_process(*id), Type::Ok, "leader", json!([id, s.leader_id, s.term]), None);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Puts every call the proxy saw into the history at the time it arrived: `aws-call` ops with
/// `[replica action mutation?]` (replica 0: an address that is no replica's).
pub fn record_calls(rec: &Recorder, proxy: &Proxy, replicas: &HashMap<std::net::IpAddr, u64>) {
    let ops = proxy
        .calls()
        .into_iter()
        .map(|c| {
            let id = replicas.get(&c.from).copied().unwrap_or(0);
            (rec.time_of(c.at), caller_process(id), "aws-call", json!([id, c.action, c.is_mutation()]))
        })
        .collect();
    rec.insert_timed(ops);
}
