//! Hostile and malformed input on a real 3-replica cluster (processes, RocksDB, gRPC): nothing a
//! caller or an agent sends can take the cluster down.
//! t10 an agent registering NaN or infinite resources is refused, and every replica restarts;
//! t20 an instance group offering NaN CPUs is refused; t30 invalid UTF-8 is INVALID_ARGUMENT;
//! t40 job durations beyond their bounds are refused, naming the field; t50 an agent cannot claim
//! another agent's instance or report a containerIp outside the networks it declared; t60 a job
//! is bounded as a whole, not only field by field.

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::time::Duration;

use common::{group, wait_until, Cluster};
use prost::Message;
use raw::call_raw;
use titus_client::proto as pb;
use titus_client::Error;
use tokio_stream::StreamExt as _;
use tonic::Code;

const ELECTION: Duration = Duration::from_secs(30);

async fn channel(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

/// Attaches to `addr` as agent `id` offering `cpu`, and answers how the stream was refused or
/// `Ok` once the leader said Registered.
async fn attach(addr: &str, id: &str, cpu: f64) -> Result<(), tonic::Status> {
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel(addr).await);
    let register = pb::AgentMessage {
        message: Some(pb::agent_message::Message::Register(pb::AgentRegister {
            agent_id: id.into(),
            resources: Some(pb::AgentResources { cpu, memory_mb: 4096, disk_mb: 10_000, network_mbps: 1000, gpu: 0 }),
            ..Default::default()
        })),
    };
    // The stream stays open (pending) after the register, as an agent's does.
    let outbound = tokio_stream::iter(vec![register]).chain(tokio_stream::pending());
    let mut inbound = client.attach(outbound).await?.into_inner();
    match inbound.message().await? {
        Some(pb::ControlMessage { message: Some(pb::control_message::Message::Registered(_)) }) => Ok(()),
        other => Err(tonic::Status::unknown(format!("unexpected first message: {other:?}"))),
    }
}

/// The leader's api address, once one is agreed.
async fn leader_addr(c: &Cluster) -> String {
    let id = c.wait_for_leader(ELECTION).await;
    c.replica(id).api_addr.clone()
}

/// A write through the SDK commits (the cluster is not poisoned).
async fn commits(c: &Cluster, name: &str) {
    let client = c.client();
    wait_until(ELECTION, &format!("capacity group {name} committed"), || async {
        match client.create_capacity_group(group(name)).await {
            Ok(_) | Err(Error::AlreadyExists(_)) => Some(()),
            Err(_) => None,
        }
    })
    .await;
}

/// One NaN in one registration once made every replica fail to read its own log, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_non_finite_agent_resources_are_refused_and_the_cluster_restarts() {
    let mut c = Cluster::start(3, &[]);
    let addr = leader_addr(&c).await;
    for (k, cpu) in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0].into_iter().enumerate() {
        let status = attach(&addr, &format!("bad-{k}"), cpu).await.expect_err("a non-finite registration is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "cpu {cpu}: {status:?}");
        assert!(status.message().contains("resources.cpu"), "names the field: {}", status.message());
    }
    // A good agent still registers, and writes still commit.
    attach(&addr, "good", 4.0).await.expect("a valid registration");
    commits(&c, "after-nan").await;

    // Every replica restarts from its own log and the cluster carries on.
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.start_replica(id);
    }
    c.wait_for_leader(ELECTION).await;
    commits(&c, "after-restart").await;
    let agents = c.client().find_agents().await.expect("find agents");
    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, vec!["good"], "only the valid agent was registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_an_instance_group_offering_nan_cpus_is_refused() {
    let c = Cluster::start(3, &[]);
    let addr = leader_addr(&c).await;
    let mut client = pb::agent_management_service_client::AgentManagementServiceClient::new(channel(&addr).await);
    let launch = |cpu: f64| pb::InstanceGroup {
        id: "g1".into(),
        tier: pb::Tier::Flex as i32,
        lifecycle: pb::InstanceGroupLifecycle::IgActive as i32,
        launch: Some(pb::LaunchSettings {
            image_id: "ami-1".into(),
            instance_type: "m5.large".into(),
            instance_resources: Some(pb::AgentResources { cpu, memory_mb: 8192, ..Default::default() }),
            ..Default::default()
        }),
        max: 3,
        ..Default::default()
    };
    for cpu in [f64::NAN, f64::INFINITY] {
        let status = client.create_instance_group(launch(cpu)).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("launch.instance_resources.cpu"), "{}", status.message());
    }
    client.create_instance_group(launch(2.0)).await.expect("a valid group");
    commits(&c, "after-group").await;
}

/// A string field holding invalid UTF-8 is a bad request, not a server fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_invalid_utf8_is_invalid_argument() {
    let c = Cluster::start(3, &[]);
    let addr = leader_addr(&c).await;
    // JobId { id = 1: string }, with bytes that are not UTF-8.
    let body = vec![0x0a, 0x03, 0xff, 0xfe, 0x41];
    for path in ["/titus.JobManagementService/FindJob", "/titus.JobManagementService/KillJob"] {
        let status = call_raw(channel(&addr).await, path, body.clone()).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
    }
    // The same call well formed is answered as usual.
    let ok = pb::JobId { id: "no-such-job".into() }.encode_to_vec();
    let status = call_raw(channel(&addr).await, "/titus.JobManagementService/FindJob", ok).await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

/// `runtimeLimitSec` of 2^62 and a retry delay of i64::MAX once made every leader's lifecycle
/// panic as soon as a task started or failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_durations_beyond_their_bounds_are_refused() {
    let c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let client = c.client();
    let d = common::sleeping_service("svc", 0.5, 256, 1);
    let container = d.container.clone();
    let batch = |runtime_limit_sec: u64, retry_policy: Option<pb::RetryPolicy>| pb::JobDescriptor {
        job_type: Some(pb::job_descriptor::JobType::Batch(pb::BatchJobSpec {
            size: 1,
            runtime_limit_sec,
            retry_policy,
            ..Default::default()
        })),
        container: container.clone(),
        ..d.clone()
    };
    for limit in [1u64 << 62, u64::MAX] {
        match client.create_job(batch(limit, None)).await {
            Err(Error::InvalidArgument { violations: v, .. }) => {
                assert!(v.iter().any(|f| f.field == "batch.runtime_limit_sec"), "{v:?}")
            }
            other => panic!("runtime limit {limit}: {other:?}"),
        }
    }
    let delayed = pb::RetryPolicy {
        policy: Some(pb::retry_policy::Policy::Delayed(pb::retry_policy::Delayed {
            initial_delay_ms: i64::MAX as u64,
            delay_ms: 1000,
            retries: 3,
        })),
    };
    match client.create_job(batch(0, Some(delayed))).await {
        Err(Error::InvalidArgument { violations: v, .. }) => {
            assert!(v.iter().any(|f| f.field == "batch.retry_policy.delayed.initial_delay_ms"), "{v:?}")
        }
        other => panic!("retry delay: {other:?}"),
    }
    // Within bounds: accepted.
    let id = client.create_job(batch(3600, None)).await.expect("a job within bounds");
    assert!(!id.is_empty());
    commits(&c, "after-jobs").await;
}

/// An agent's stream, held open: what it sends goes through `tx`.
async fn open_stream(
    addr: &str,
    register: pb::AgentRegister,
) -> Result<(tokio::sync::mpsc::Sender<pb::AgentMessage>, tonic::Streaming<pb::ControlMessage>), tonic::Status> {
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel(addr).await);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::AgentMessage { message: Some(pb::agent_message::Message::Register(register)) }).await.unwrap();
    let mut inbound = client.attach(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(pb::ControlMessage { message: Some(pb::control_message::Message::Registered(_)) }) => Ok((tx, inbound)),
        other => Err(tonic::Status::unknown(format!("unexpected first message: {other:?}"))),
    }
}

fn registration(id: &str, instance: &str, networks: &[&str]) -> pb::AgentRegister {
    pb::AgentRegister {
        agent_id: id.into(),
        resources: Some(pb::AgentResources { cpu: 4.0, memory_mb: 4096, disk_mb: 10_000, network_mbps: 1000, gpu: 0 }),
        attributes: [("instanceId".to_string(), instance.to_string())].into(),
        container_networks: networks.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    }
}

/// An agent is not trusted beyond its own tasks: it cannot claim another agent's instance (which
/// capacity picks idle instances by), an agent named for an instance cannot claim another, and a
/// containerIp outside the networks it declared (which would go into a load balancer) is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_an_agent_cannot_claim_another_s_instance_or_an_address_outside_its_networks() {
    let c = Cluster::start(3, &[]);
    let addr = leader_addr(&c).await;
    let (tx, mut inbound) = open_stream(&addr, registration("a1", "i-0aaaaaaaaaaaaaaaa", &["10.9.0.0/24"]))
        .await
        .expect("the first agent on its instance");
    let status = open_stream(&addr, registration("a2", "i-0aaaaaaaaaaaaaaaa", &[])).await.expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("bound to agent \"a1\""), "{}", status.message());
    let status =
        open_stream(&addr, registration("i-0bbbbbbbbbbbbbbbb", "i-0ccccccccccccccc0", &[])).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("attributes.instanceId"), "{}", status.message());
    let status =
        open_stream(&addr, registration("a3", "i-0dddddddddddddddd", &["0.0.0.0/"])).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("container_networks[0]"), "{}", status.message());

    let client = c.client();
    client.create_job(common::sleeping_service("addr", 0.5, 256, 1)).await.expect("job");
    let task_id = tokio::time::timeout(ELECTION, async {
        loop {
            match inbound.message().await {
                Ok(Some(pb::ControlMessage { message: Some(pb::control_message::Message::Assign(a)) })) => {
                    return a.task_id
                }
                Ok(Some(_)) => continue,
                other => panic!("stream ended: {other:?}"),
            }
        }
    })
    .await
    .expect("a task assigned to a1");
    let report = |state: pb::TaskState, ip: &str| pb::AgentMessage {
        message: Some(pb::agent_message::Message::Status(pb::AgentTask {
            task_id: task_id.clone(),
            state: state as i32,
            task_context: [("containerIp".to_string(), ip.to_string()), ("agent".to_string(), "a9".to_string())].into(),
            ..Default::default()
        })),
    };
    tx.send(report(pb::TaskState::TaskStartInitiated, "192.168.7.7")).await.unwrap();
    let t = wait_until(ELECTION, "StartInitiated committed", || async {
        client
            .find_task(&task_id)
            .await
            .ok()
            .filter(|t| t.status.as_ref().is_some_and(|s| s.state == pb::TaskState::TaskStartInitiated as i32))
    })
    .await;
    assert_eq!(t.task_context.get("containerIp"), None, "outside 10.9.0.0/24: dropped");
    assert_eq!(t.task_context.get("agent").map(String::as_str), Some("a1"), "an agent cannot move its task");
    tx.send(report(pb::TaskState::TaskStarted, "10.9.0.5")).await.unwrap();
    let t = wait_until(ELECTION, "Started committed", || async {
        client
            .find_task(&task_id)
            .await
            .ok()
            .filter(|t| t.status.as_ref().is_some_and(|s| s.state == pb::TaskState::TaskStarted as i32))
    })
    .await;
    assert_eq!(t.task_context.get("containerIp").map(String::as_str), Some("10.9.0.5"));
}

/// Every field within its own bound, 70 env values of 4 KiB made a ~290 KB job: five of them once
/// made 4 MiB entries that stalled replication. The whole job is bounded (256 KiB by default), the
/// error naming its largest field, and attributes added later count against the same bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_a_job_is_bounded_as_a_whole() {
    let c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let client = c.client();
    let big = "x".repeat(4096);
    let mut d = common::sleeping_service("big", 0.5, 256, 0);
    let container = d.container.as_mut().unwrap();
    container.env = (0..70).map(|i| (format!("V{i}"), big.clone())).collect();
    match client.create_job(d.clone()).await {
        Err(Error::InvalidArgument { violations: v, .. }) => {
            assert!(
                v.iter().any(|f| f.field == "container.env" && f.description.contains("262144-byte limit")),
                "{v:?}"
            )
        }
        other => panic!("an oversized job: {other:?}"),
    }
    // More entries than any job needs are refused on their own.
    d.container.as_mut().unwrap().env = (0..501).map(|i| (format!("V{i}"), "v".to_string())).collect();
    match client.create_job(d.clone()).await {
        Err(Error::InvalidArgument { violations: v, .. }) => {
            assert!(v.iter().any(|f| f.field == "container.env"), "{v:?}")
        }
        other => panic!("501 env entries: {other:?}"),
    }
    // Half as much is accepted; attributes that would take it over the bound are refused.
    d.container.as_mut().unwrap().env = (0..35).map(|i| (format!("V{i}"), big.clone())).collect();
    let id = client.create_job(d).await.expect("a job within the bound");
    let attributes: Vec<(String, String)> = (0..40).map(|i| (format!("a{i}"), big.clone())).collect();
    let refs: Vec<(&str, &str)> = attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    match client.update_job_attributes(&id, &refs).await {
        Err(Error::InvalidArgument { violations: v, .. }) => {
            assert!(v.iter().any(|f| f.description.contains("over the 262144-byte limit")), "{v:?}")
        }
        other => panic!("attributes over the bound: {other:?}"),
    }
    client.update_job_attributes(&id, &refs[..2]).await.expect("a few attributes fit");
    commits(&c, "after-big-jobs").await;
}
