//! ALB IP target registration end to end: real replicas, real agents running containers in the
//! real Docker daemon, the real AWS SDK against a `moto_server` on loopback (and a fault proxy in
//! front of it). t400 scale down drains before stopping containers, across a leader kill; t410
//! reconcile repairs drift and leaves foreign targets alone; t415 deregistering is idempotent; t425 a rolling update gated on target
//! health, across a leader kill, and its rollback; t420 throttling and 5xx; t430 bad
//! associations are refused with the field named; t440-t450 EC2 capacity; t460 a silent agent
//! keeps its instance; t470 a deposed leader makes no AWS call.

#[path = "../../control-plane/tests/common/mod.rs"]
mod common;
#[path = "../../control-plane/tests/common/moto.rs"]
mod moto;

use std::collections::BTreeSet;
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2::types::{TargetDescription, TargetTypeEnum};
use common::{containers_of, ensure_test_image, wait_until, Cluster};
use moto::Moto;
use titus_chaos::proxy::{FaultConfig, Proxy};
use titus_client::proto as pb;
use titus_client::Client;

const SETTLE: Duration = Duration::from_secs(60);
const DRAIN_MS: u64 = 3000;

fn service_job(app: &str, desired: u32) -> pb::JobDescriptor {
    common::sleeping_service(app, 0.1, 32, desired)
}

fn aws_args(endpoint: &str, reconcile_ms: u64) -> Vec<String> {
    vec![
        "--aws-region".into(),
        "us-east-1".into(),
        "--aws-endpoint-url".into(),
        endpoint.into(),
        "--lb-drain-delay-ms".into(),
        DRAIN_MS.to_string(),
        "--lb-reconcile-interval-ms".into(),
        reconcile_ms.to_string(),
    ]
}

fn start(args: &[String]) -> Cluster {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Cluster::start(3, &args)
}

/// The container IPs of the job's Started tasks.
async fn started_ips(client: &Client, job_id: &str) -> BTreeSet<String> {
    let tasks = client
        .find_tasks(&[("jobIds", job_id), ("taskStates", "Started")], 1000, "")
        .await
        .map(|r| r.items)
        .unwrap_or_default();
    tasks.iter().filter_map(|t| t.task_context.get("containerIp").cloned()).collect()
}

async fn wait_started(client: &Client, job_id: &str, n: usize) -> BTreeSet<String> {
    wait_until(SETTLE, &format!("{n} Started tasks with IPs"), || async {
        let ips = started_ips(client, job_id).await;
        (ips.len() == n).then_some(ips)
    })
    .await
}

async fn wait_targets(elb: &aws_sdk_elasticloadbalancingv2::Client, arn: &str, want: &BTreeSet<String>) {
    wait_until(SETTLE, &format!("target group holds exactly {want:?}"), || async {
        (moto::targets(elb, arn).await == *want).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t400_scale_down_deregisters_and_drains_before_containers_stop_across_a_leader_kill() {
    ensure_test_image();
    let dir = tempfile::TempDir::new().unwrap();
    let moto = Moto::start(dir.path());
    let (elb, ec2) = moto.sdk().await;
    let arn = moto::target_group(&elb, &ec2, "web", TargetTypeEnum::Ip).await;
    let mut cluster = start(&aws_args(&moto.url, 60_000));
    let agent = cluster.start_agent("lb-agent", 4.0, 4096);
    let client = cluster.client();
    cluster.wait_for_leader(Duration::from_secs(30)).await;

    let job_id = client.create_job(service_job("web", 3)).await.unwrap();
    client.add_load_balancer(&job_id, &arn).await.unwrap();
    let ips = wait_started(&client, &job_id, 3).await;
    wait_targets(&elb, &arn, &ips).await;
    let lbs = client.job_load_balancers(&job_id).await.unwrap();
    assert_eq!(lbs.len(), 1);
    assert_eq!(lbs[0].id, arn);

    // Scale to 1: two tasks are killed. Their targets leave the group while their containers
    // still run (drain), and only then do the containers stop.
    client.update_job_capacity(&job_id, None, Some(1), None).await.unwrap();
    let remaining = wait_until(SETTLE, "two targets deregistered", || async {
        let t = moto::targets(&elb, &arn).await;
        (t.len() == 1).then_some(t)
    })
    .await;
    let running_then = containers_of(&agent).iter().filter(|c| c.2).count();
    assert_eq!(running_then, 3, "deregistered targets' containers must still run during the drain");
    // Kill the leader during the drain: the new leader finishes it.
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    cluster.kill(leader);
    wait_until(SETTLE, "the killed tasks finish", || async {
        let live = client
            .find_tasks(
                &[
                    ("jobIds", job_id.as_str()),
                    ("taskStates", "Accepted,Launched,StartInitiated,Started,KillInitiated"),
                ],
                100,
                "",
            )
            .await
            .map(|r| r.items.len())
            .unwrap_or(usize::MAX);
        (live == 1).then_some(())
    })
    .await;
    let finished =
        client.find_tasks(&[("jobIds", job_id.as_str()), ("taskStates", "Finished")], 100, "").await.unwrap();
    let mut drained = 0;
    for t in &finished.items {
        let killed = t.status_history.iter().find(|s| s.state == pb::TaskState::TaskKillInitiated as i32);
        let done = t.status.as_ref().unwrap();
        if let Some(k) = killed {
            drained += 1;
            eprintln!(
                "task {}: KillInitiated -> Finished in {} ms (drain delay {DRAIN_MS} ms)",
                t.id,
                done.timestamp_ms - k.timestamp_ms
            );
            assert!(
                done.timestamp_ms - k.timestamp_ms >= DRAIN_MS as i64,
                "task {} stopped {} ms after its kill, before the drain delay",
                t.id,
                done.timestamp_ms - k.timestamp_ms
            );
        }
    }
    assert_eq!(drained, 2, "the two scaled-down tasks were killed through KillInitiated");
    let ips = wait_started(&client, &job_id, 1).await;
    assert_eq!(ips, remaining);
    wait_targets(&elb, &arn, &ips).await;

    // Scale up again under the new leader: exactly the Started tasks are registered.
    client.update_job_capacity(&job_id, None, Some(2), None).await.unwrap();
    let ips = wait_started(&client, &job_id, 2).await;
    wait_targets(&elb, &arn, &ips).await;

    // Killing the job deregisters everything, and its association goes with it.
    client.kill_job(&job_id).await.unwrap();
    wait_targets(&elb, &arn, &BTreeSet::new()).await;
    wait_until(SETTLE, "association removed with the job", || async {
        client.all_load_balancers().await.ok().filter(|all| all.is_empty()).map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t410_reconcile_repairs_drift_and_leaves_foreign_targets_alone() {
    ensure_test_image();
    let dir = tempfile::TempDir::new().unwrap();
    let moto = Moto::start(dir.path());
    let (elb, ec2) = moto.sdk().await;
    let arn = moto::target_group(&elb, &ec2, "api", TargetTypeEnum::Ip).await;
    let mut cluster = start(&aws_args(&moto.url, 1000));
    cluster.start_agent("lb-agent", 4.0, 4096);
    let client = cluster.client();
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    let job_id = client.create_job(service_job("api", 2)).await.unwrap();
    client.add_load_balancer(&job_id, &arn).await.unwrap();
    let ips = wait_started(&client, &job_id, 2).await;
    wait_targets(&elb, &arn, &ips).await;

    // Someone else registers a target; then one of ours is removed behind our back.
    let foreign = "172.17.250.7".to_string();
    elb.register_targets()
        .target_group_arn(&arn)
        .targets(TargetDescription::builder().id(&foreign).build())
        .send()
        .await
        .unwrap();
    let ours = ips.iter().next().unwrap().clone();
    elb.deregister_targets()
        .target_group_arn(&arn)
        .targets(TargetDescription::builder().id(&ours).build())
        .send()
        .await
        .unwrap();
    let mut want = ips.clone();
    want.insert(foreign.clone());
    wait_targets(&elb, &arn, &want).await;
    assert!(moto::targets(&elb, &arn).await.contains(&foreign), "a target this system did not register stays");
    // Each reconcile records what the group says of every target's health.
    wait_until(SETTLE, "both targets recorded healthy", || async {
        let lbs = client.job_load_balancers(&job_id).await.ok()?;
        let healthy = lbs[0].targets.iter().filter(|t| t.health == "healthy").count();
        (healthy == 2).then_some(())
    })
    .await;
}

/// A leader killed after its DeregisterTargets went through and before it recorded so leaves a
/// target its successor deregisters again; ELB refuses a call naming a target no longer in the
/// group (`InvalidTarget`, the whole call), which once kept that target Deregistering for good and
/// its task's container running to the drain limit. Deregistering is idempotent now, per target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t415_deregistering_a_target_already_gone_is_not_an_error() {
    let dir = tempfile::TempDir::new().unwrap();
    let moto = Moto::start(dir.path());
    let (elb, ec2) = moto.sdk().await;
    let arn = moto::target_group(&elb, &ec2, "again", TargetTypeEnum::Ip).await;
    let aws = titus_aws::Aws::connect(&titus_aws::AwsSettings {
        region: "us-east-1".into(),
        endpoint_url: Some(moto.url.clone()),
        max_attempts: 3,
        calls_per_second: 100.0,
        attempt_timeout: Duration::from_secs(5),
    })
    .await;
    let (a, b) = ("172.17.3.1".to_string(), "172.17.3.2".to_string());
    aws.register_targets(&arn, &[a.clone(), b.clone()]).await.unwrap();
    aws.deregister_targets(&arn, &[a.clone()]).await.unwrap();
    // `a` again, with `b` still there: `b` goes, and `a` is no error.
    aws.deregister_targets(&arn, &[a.clone(), b.clone()]).await.expect("deregistering a target already gone");
    assert!(moto::targets(&elb, &arn).await.is_empty());
    aws.deregister_targets(&arn, &[a, b]).await.expect("nothing left to deregister");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t420_registration_converges_through_throttling_and_5xx() {
    ensure_test_image();
    let dir = tempfile::TempDir::new().unwrap();
    let moto = Moto::start(dir.path());
    let (elb, ec2) = moto.sdk().await;
    let arn = moto::target_group(&elb, &ec2, "flaky", TargetTypeEnum::Ip).await;
    // Every second request to AWS fails, alternately with Throttling and a 503.
    let every_second = FaultConfig { every: 2, ..Default::default() };
    let proxy = Proxy::start("127.0.0.1:0", &format!("127.0.0.1:{}", moto.port), every_second).await.unwrap();
    let mut cluster = start(&aws_args(&proxy.url(), 2000));
    cluster.start_agent("lb-agent", 4.0, 4096);
    let client = cluster.client();
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    let job_id = client.create_job(service_job("flaky", 3)).await.unwrap();
    // AddLoadBalancer's own check goes through the faults too; the SDK retries it.
    client.add_load_balancer(&job_id, &arn).await.unwrap();
    let ips = wait_started(&client, &job_id, 3).await;
    wait_targets(&elb, &arn, &ips).await;
    client.update_job_capacity(&job_id, None, Some(1), None).await.unwrap();
    let ips = wait_started(&client, &job_id, 1).await;
    wait_targets(&elb, &arn, &ips).await;
    let stats = proxy.stats();
    let faults = stats.throttled + stats.errors;
    eprintln!("fault proxy: {faults} requests answered Throttling/503, {} forwarded to moto", stats.forwarded);
    // Two or more: both kinds (they alternate: Throttling, then 503) were injected.
    assert!(stats.throttled >= 1 && stats.errors >= 1, "the proxy injected only {faults} faults");
    assert!(stats.forwarded >= faults, "as many calls went through");
    let lbs = client.job_load_balancers(&job_id).await.unwrap();
    assert_eq!(lbs[0].state, pb::LoadBalancerState::LbActive as i32, "transient errors never orphan");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t430_bad_associations_are_refused_naming_the_field_and_a_deleted_group_is_orphaned() {
    let dir = tempfile::TempDir::new().unwrap();
    let moto = Moto::start(dir.path());
    let (elb, ec2) = moto.sdk().await;
    let instance_tg = moto::target_group(&elb, &ec2, "instances", TargetTypeEnum::Instance).await;
    let ip_tg = moto::target_group(&elb, &ec2, "ips", TargetTypeEnum::Ip).await;
    let cluster = start(&aws_args(&moto.url, 1000));
    let client = cluster.client();
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    let job_id = client.create_job(service_job("bad", 0)).await.unwrap();

    let e = client.add_load_balancer(&job_id, "not-an-arn").await.unwrap_err().to_string();
    assert!(e.contains("load_balancer_id.id"), "{e}");
    let e = client.add_load_balancer(&job_id, &instance_tg).await.unwrap_err().to_string();
    assert!(e.contains("load_balancer_id.id") && e.contains("instance"), "{e}");
    let missing = ip_tg.replace("/ips/", "/nothere/");
    let e = client.add_load_balancer(&job_id, &missing).await.unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");
    let e = client.add_load_balancer("no-such-job", &ip_tg).await.unwrap_err().to_string();
    assert!(e.contains("job_id"), "{e}");

    // Added twice is one association; removing is idempotent.
    client.add_load_balancer(&job_id, &ip_tg).await.unwrap();
    client.add_load_balancer(&job_id, &ip_tg).await.unwrap();
    assert_eq!(client.job_load_balancers(&job_id).await.unwrap().len(), 1);

    // The target group is deleted behind our back: the association is marked orphaned, visibly.
    elb.delete_target_group().target_group_arn(&ip_tg).send().await.unwrap();
    wait_until(SETTLE, "association orphaned", || async {
        let lbs = client.job_load_balancers(&job_id).await.ok()?;
        (lbs.first()?.state == pb::LoadBalancerState::LbOrphaned as i32).then_some(())
    })
    .await;
    // The CLI shows it, and its errors name the field with the documented exit code.
    let servers = cluster.replicas.iter().map(|r| r.api_addr.clone()).collect::<Vec<_>>().join(",");
    let titus = |args: &[&str]| {
        let out = std::process::Command::new(common::bin("titus"))
            .args(args)
            .env("TITUS_SERVERS", &servers)
            .output()
            .expect("run titus");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = titus(&["-o", "json", "lb", "list", &job_id]);
    assert_eq!(code, Some(0), "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["targetGroup"], ip_tg.as_str());
    assert_eq!(listed[0]["state"], "orphaned");
    let (code, _, err) = titus(&["lb", "add", &job_id, "not-an-arn"]);
    assert_eq!(code, Some(2), "invalid input: {err}");
    assert!(err.contains("load_balancer_id.id"), "{err}");
    let (code, out, err) = titus(&["lb", "remove", &job_id, &ip_tg]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("no longer associated"), "{out}");

    client.remove_load_balancer(&job_id, &ip_tg).await.unwrap();
    assert!(client.job_load_balancers(&job_id).await.unwrap().is_empty());
    let (_, out, _) = titus(&["lb", "list"]);
    assert!(!out.contains(&ip_tg), "{out}");
}

/// Instances of `group` in moto that are pending or running: id, tags, subnet.
async fn live_instances(ec2: &aws_sdk_ec2::Client, group: &str) -> Vec<(String, Vec<(String, String)>, String)> {
    let out = ec2
        .describe_instances()
        .filters(aws_sdk_ec2::types::Filter::builder().name("tag:titus:instance-group").values(group).build())
        .send()
        .await
        .expect("DescribeInstances");
    let mut v = Vec::new();
    for r in out.reservations() {
        for i in r.instances() {
            let state = i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default();
            if matches!(state.as_str(), "pending" | "running") {
                let tags = i
                    .tags()
                    .iter()
                    .map(|t| (t.key().unwrap_or_default().to_string(), t.value().unwrap_or_default().to_string()))
                    .collect();
                v.push((
                    i.instance_id().unwrap_or_default().to_string(),
                    tags,
                    i.subnet_id().unwrap_or_default().to_string(),
                ));
            }
        }
    }
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t440_unplaceable_tasks_launch_instances_and_idle_agents_are_terminated_within_min_max() {
    ensure_test_image();
    let dir = tempfile::TempDir::new().unwrap();
    let moto = Moto::start(dir.path());
    let (_, ec2) = moto.sdk().await;
    let args = with_flags(
        aws_args(&moto.url, 60_000),
        &[
            ("--capacity-interval-ms", "500"),
            ("--capacity-unplaced-after-ms", "500"),
            ("--capacity-idle-cooldown-ms", "3000"),
        ],
    );
    let mut cluster = start(&args);
    let client = cluster.client();
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    let group = "ec2-flex";
    let subnets = moto::subnets(&ec2, &["us-east-1a", "us-east-1b"]).await;
    client
        .put_instance_group(pb::InstanceGroup {
            id: group.into(),
            tier: pb::Tier::Flex as i32,
            lifecycle: pb::InstanceGroupLifecycle::IgActive as i32,
            launch: Some(pb::LaunchSettings {
                image_id: "ami-12c6146b".into(),
                instance_type: "m5.large".into(),
                tags: [("team".to_string(), "web".to_string())].into_iter().collect(),
                subnet_ids: subnets.clone(),
                instance_resources: Some(pb::AgentResources { cpu: 2.0, memory_mb: 4096, ..Default::default() }),
                ..Default::default()
            }),
            min: 1,
            desired: 1,
            max: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    // Bad launch settings are refused with the field named.
    let e = client
        .put_instance_group(pb::InstanceGroup {
            id: "bad".into(),
            launch: Some(pb::LaunchSettings { image_id: "ami-1".into(), ..Default::default() }),
            min: 2,
            max: 1,
            ..Default::default()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("launch.instance_type") && e.contains("min"), "{e}");

    // desired = 1: one instance, tagged with its group, its cluster and the group's own tags.
    let first = wait_until(SETTLE, "the group's first instance", || async {
        let v = live_instances(&ec2, group).await;
        (v.len() == 1).then_some(v)
    })
    .await;
    let tags = &first[0].1;
    assert!(tags.contains(&("team".into(), "web".into())), "{tags:?}");
    assert!(tags.iter().any(|(k, v)| k == "titus:cluster" && !v.is_empty()), "{tags:?}");

    // Three tasks of 1.5 cpu with no agent at all: 4.5 cpu over 2-cpu instances = 3 (the max).
    let mut job = service_job("grow", 3);
    job.container.as_mut().unwrap().resources =
        Some(pb::ContainerResources { cpu: 1.5, memory_mb: 64, ..Default::default() });
    let job_id = client.create_job(job).await.unwrap();
    let mut most = 0;
    let three = wait_until(SETTLE, "three instances", || async {
        let v = live_instances(&ec2, group).await;
        (v.len() == 3).then_some(v)
    })
    .await;
    most = most.max(three.len());
    // Spread over the two subnets (zones): 2 and 1, whichever way round.
    let mut per_subnet = std::collections::BTreeMap::new();
    for (_, _, subnet) in &three {
        *per_subnet.entry(subnet.clone()).or_insert(0) += 1;
    }
    let mut counts: Vec<i32> = per_subnet.values().copied().collect();
    counts.sort();
    assert_eq!(counts, vec![1, 2], "{per_subnet:?} over {subnets:?}");
    // Each instance's agent comes up and registers with its instance id: the tasks run.
    for (k, (instance_id, _, _)) in three.iter().enumerate() {
        cluster.start_agent_with(
            &format!("ec2-{k}"),
            2.0,
            4096,
            &["--instance-group", group, "--attribute", &format!("instanceId={instance_id}")],
        );
    }
    wait_started(&client, &job_id, 3).await;
    most = most.max(live_instances(&ec2, group).await.len());

    // The job goes; its agents idle past the cooldown are terminated, down to min = 1.
    client.kill_job(&job_id).await.unwrap();
    let left = wait_until(SETTLE, "scaled down to min", || async {
        let v = live_instances(&ec2, group).await;
        (v.len() == 1).then_some(v)
    })
    .await;
    most = most.max(left.len());
    assert!(most <= 3, "the group went above max: {most}");
    let groups = client.list_instance_groups().await.unwrap();
    let g = groups.iter().find(|g| g.id == group).unwrap();
    assert_eq!(g.desired, 1);
    // The terminated instances' agents were cordoned first: no new task could land on them.
    let agents = client.find_agents().await.unwrap();
    let cordoned: Vec<&str> = agents.iter().filter(|a| a.terminating).map(|a| a.id.as_str()).collect();
    assert_eq!(cordoned.len(), 2, "{agents:?}");
    let kept = &left[0].0;
    assert!(
        agents.iter().any(|a| !a.terminating && a.attributes.get("instanceId") == Some(kept)),
        "the instance left is the one whose agent is not cordoned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t450_a_refused_call_is_shown_and_retried_not_orphaned_and_clears_once_allowed() {
    ensure_test_image();
    let dir = tempfile::TempDir::new().unwrap();
    let moto = Moto::start(dir.path());
    let (elb, ec2) = moto.sdk().await;
    let arn = moto::target_group(&elb, &ec2, "denied", TargetTypeEnum::Ip).await;
    let deny = FaultConfig { deny_actions: vec!["RegisterTargets".into()], ..Default::default() };
    let proxy = Proxy::start("127.0.0.1:0", &format!("127.0.0.1:{}", moto.port), deny).await.unwrap();
    let mut cluster = start(&aws_args(&proxy.url(), 60_000));
    cluster.start_agent("lb-agent", 4.0, 4096);
    let client = cluster.client();
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    let job_id = client.create_job(service_job("denied", 1)).await.unwrap();
    client.add_load_balancer(&job_id, &arn).await.unwrap();
    wait_started(&client, &job_id, 1).await;

    // AccessDenied: the association stays Active and says why; nothing is registered.
    let message = wait_until(SETTLE, "the refusal shown on the association", || async {
        let lb = client.job_load_balancers(&job_id).await.ok()?.into_iter().next()?;
        (lb.state_message.contains("AccessDenied")).then_some(lb)
    })
    .await;
    assert_eq!(message.state, pb::LoadBalancerState::LbActive as i32, "a refusal does not orphan");
    assert!(moto::targets(&elb, &arn).await.is_empty());

    // The permission is granted: the back-off retry registers the target and clears the message.
    proxy.set(FaultConfig::default()).unwrap();
    let ips = started_ips(&client, &job_id).await;
    wait_targets(&elb, &arn, &ips).await;
    wait_until(SETTLE, "the message cleared", || async {
        let lb = client.job_load_balancers(&job_id).await.ok()?.into_iter().next()?;
        lb.state_message.is_empty().then_some(())
    })
    .await;
}

/// An Active Flex instance group of `size` (min = desired = max) m5.large instances in EC2.
fn ec2_group(id: &str, size: u32) -> pb::InstanceGroup {
    pb::InstanceGroup {
        id: id.into(),
        tier: pb::Tier::Flex as i32,
        lifecycle: pb::InstanceGroupLifecycle::IgActive as i32,
        launch: Some(pb::LaunchSettings {
            image_id: "ami-12c6146b".into(),
            instance_type: "m5.large".into(),
            instance_resources: Some(pb::AgentResources { cpu: 2.0, memory_mb: 4096, ..Default::default() }),
            ..Default::default()
        }),
        min: size,
        desired: size,
        max: size,
        ..Default::default()
    }
}

/// Capacity's flags, in pairs, after the AWS ones.
fn with_flags(mut args: Vec<String>, flags: &[(&str, &str)]) -> Vec<String> {
    for (k, v) in flags {
        args.push(k.to_string());
        args.push(v.to_string());
    }
    args
}

/// An agent silent past its heartbeat TTL (a stalled host, a partition) was once taken for an
/// instance that never registered: its instance was terminated 0.75 s after the agent was declared
/// lost, under its still-running container. Its instance is kept for the grace period now, its
/// container keeps running, and when the agent comes back it attaches to the same instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t460_a_silent_agent_keeps_its_instance_and_its_container() {
    ensure_test_image();
    let dir = tempfile::TempDir::new().unwrap();
    let moto = Moto::start(dir.path());
    let (_, ec2) = moto.sdk().await;
    let args = with_flags(
        aws_args(&moto.url, 60_000),
        &[
            ("--capacity-interval-ms", "300"),
            ("--capacity-registration-timeout-ms", "1000"),
            ("--capacity-lost-grace-ms", "600000"),
            ("--agent-heartbeat-ttl-ms", "3000"),
        ],
    );
    let mut cluster = start(&args);
    let client = cluster.client();
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    let group = "ec2-keep";
    client.put_instance_group(ec2_group(group, 1)).await.unwrap();
    let instance = wait_until(SETTLE, "the group's instance", || async {
        let v = live_instances(&ec2, group).await;
        (v.len() == 1).then(|| v[0].0.clone())
    })
    .await;
    let agent = cluster.start_agent_with(
        "keep-0",
        2.0,
        4096,
        &["--instance-group", group, "--attribute", &format!("instanceId={instance}")],
    );
    let job_id = client.create_job(service_job("keep", 1)).await.unwrap();
    wait_started(&client, &job_id, 1).await;
    assert_eq!(containers_of(&agent).iter().filter(|c| c.2).count(), 1, "its container runs");

    cluster.pause_agent(&agent);
    wait_until(SETTLE, "the silent agent declared lost", || async {
        let agents = client.find_agents().await.ok()?;
        agents.iter().any(|a| a.id == agent && a.state == pb::AgentState::AgentLost as i32).then_some(())
    })
    .await;
    // Ten capacity rounds after it was lost (each lists the group's instances): the instance is
    // still there, and so is the container.
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let admin = cluster.replica(leader).admin_addr.clone();
    let listed = |samples: &[common::Sample]| {
        common::value(samples, "titus_aws_calls_total", &[("duty", "capacity"), ("api", "DescribeInstances")])
    };
    let at_loss = listed(&common::scrape(&admin).await);
    wait_until(SETTLE, "ten capacity rounds", || async {
        (listed(&common::scrape(&admin).await) >= at_loss + 10.0).then_some(())
    })
    .await;
    assert_eq!(
        live_instances(&ec2, group).await.iter().map(|i| i.0.clone()).collect::<Vec<_>>(),
        vec![instance.clone()]
    );
    assert_eq!(containers_of(&agent).iter().filter(|c| c.2).count(), 1, "its container still runs");

    // Back: it attaches again, from the same instance, which was never terminated.
    cluster.resume_agent(&agent);
    wait_until(SETTLE, "the agent back online", || async {
        let agents = client.find_agents().await.ok()?;
        agents
            .iter()
            .any(|a| a.id == agent && a.state == pb::AgentState::AgentOnline as i32 && a.connected)
            .then_some(())
    })
    .await;
    assert_eq!(live_instances(&ec2, group).await.len(), 1);
}

/// A leader paused while a new one was elected, then resumed, once logged "no longer leader" and
/// 44 ms later still terminated an instance from its stale view, and launched another. Every AWS
/// call of a duty is fenced by its term now: the old leader makes none after it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t470_a_deposed_leader_makes_no_aws_call() {
    let dir = tempfile::TempDir::new().unwrap();
    let moto = Moto::start(dir.path());
    // Every EC2 call takes 300 ms: a pause most likely lands in the middle of a capacity round,
    // with the round's next calls still to come when the old leader resumes.
    let slow = FaultConfig { latency_rate: 1.0, latency_ms: 300, ..Default::default() };
    let proxy = Proxy::start("127.0.0.1:0", &format!("127.0.0.1:{}", moto.port), slow).await.unwrap();
    // No agent ever registers: each round terminates the instances past the registration timeout
    // and launches others, so the capacity duty calls EC2 all the time.
    let args = with_flags(
        aws_args(&proxy.url(), 60_000),
        &[("--capacity-interval-ms", "200"), ("--capacity-registration-timeout-ms", "600")],
    );
    let mut cluster = start(&args);
    let client = cluster.client();
    let old = cluster.wait_for_leader(Duration::from_secs(30)).await;
    client.put_instance_group(ec2_group("churn", 2)).await.unwrap();
    let calls = |samples: &[common::Sample], api: &str| {
        common::value(samples, "titus_aws_calls_total", &[("duty", "capacity"), ("api", api)])
    };
    let old_admin = cluster.replica(old).admin_addr.clone();
    wait_until(SETTLE, "the capacity duty churning instances", || async {
        (calls(&common::scrape(&old_admin).await, "TerminateInstances") >= 2.0).then_some(())
    })
    .await;

    // Paused past the election timeout: the two others elect a new leader.
    cluster.pause(old);
    let others: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    let new = wait_until(Duration::from_secs(30), "a new leader among the others", || async {
        let a = cluster.status_of(others[0]).await?;
        let b = cluster.status_of(others[1]).await?;
        (a.leader_id == b.leader_id && others.contains(&a.leader_id)).then_some(a.leader_id)
    })
    .await;
    let resumed_at = cluster.log_of(old).len();
    cluster.resume(old);
    // The new leader goes on calling EC2 while the old one learns it is deposed.
    let new_admin = cluster.replica(new).admin_addr.clone();
    let before = calls(&common::scrape(&new_admin).await, "RunInstances");
    wait_until(SETTLE, "the new leader's own EC2 calls, and the old one following it", || async {
        let s = cluster.status_of(old).await?;
        let running = calls(&common::scrape(&new_admin).await, "RunInstances");
        (s.leader_id == new && running >= before + 3.0).then_some(())
    })
    .await;
    let log = cluster.log_of(old);
    let after = log.get(resumed_at..).unwrap_or_default();
    for call in ["capacity: calling RunInstances", "capacity: terminating instance", "load balancer targets updated"] {
        assert!(!after.contains(call), "the deposed leader called AWS after it resumed ({call}):\n{after}");
    }
}

/// Titus's V3 API behind a target group: the Python client's whole scenario (see
/// `titus_v3.rs`), its service put behind an ALB target group on moto through V3's
/// AddLoadBalancer as Spinnaker does; the group gets the service's targets, and none once the
/// client removed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t436_titus_s_v3_api_puts_a_service_behind_a_target_group() {
    ensure_test_image();
    let dir = tempfile::TempDir::new().unwrap();
    let moto = Moto::start(dir.path());
    let (elb, ec2) = moto.sdk().await;
    let arn = moto::target_group(&elb, &ec2, "v3web", TargetTypeEnum::Ip).await;
    let mut cluster = start(&aws_args(&moto.url, 1_000));
    cluster.start_agent("v3-lb", 2.0, 2048);
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    let (servers, app, group) = (cluster.servers(), format!("v3lb{}", std::process::id()), arn.clone());
    let client = tokio::task::spawn_blocking(move || {
        common::run_titus_v3_client(&servers, &app, &["--target-group".to_string(), group], None)
    });
    // While the client runs: the service's targets reach the group.
    let registered = wait_until(SETTLE, "the V3 service's targets in the group", || async {
        let t = moto::targets(&elb, &arn).await;
        (t.len() >= 2).then_some(t)
    })
    .await;
    assert!(registered.len() >= 2, "{registered:?}");
    let out = client.await.expect("the V3 client's steps");
    assert!(out.contains("targets: the service is behind the target group"), "{out}");
    wait_until(SETTLE, "no target left once removed", || async {
        moto::targets(&elb, &arn).await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t480_a_user_puts_a_job_only_behind_target_groups_tagged_for_its_application() {
    use aws_sdk_elasticloadbalancingv2::types::Tag;
    let dir = tempfile::TempDir::new().unwrap();
    let moto = Moto::start(dir.path());
    let (elb, ec2) = moto.sdk().await;
    let untagged = moto::target_group(&elb, &ec2, "untagged", TargetTypeEnum::Ip).await;
    let ours = moto::target_group(&elb, &ec2, "ours", TargetTypeEnum::Ip).await;
    let theirs = moto::target_group(&elb, &ec2, "theirs", TargetTypeEnum::Ip).await;
    for (arn, apps) in [(&ours, "api, bobs-app"), (&theirs, "web")] {
        let tag = Tag::builder().key("titus:applications").value(apps).build();
        elb.add_tags().resource_arns(arn.as_str()).tags(tag).send().await.expect("AddTags");
    }
    let security = "[[principals]]\nname = \"admin\"\nrole = \"admin\"\n\
                    [[principals]]\nname = \"bob\"\nrole = \"user\"\napplications = [\"bobs-app\"]\n";
    let args = aws_args(&moto.url, 500);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = Cluster::start_with(1, &args, |d| Some(common::Secure::write(d, &[], &["admin", "bob"], security)));
    let apis: Vec<String> = c.replicas.iter().map(|r| r.api_addr.clone()).collect();
    let secure = c.secure.as_ref().unwrap();
    let (admin, bob) = (secure.client(apis.clone(), "admin"), secure.client(apis, "bob"));
    common::wait_until(Duration::from_secs(30), "a leader", || async {
        admin.cluster_status().await.ok().filter(|s| s.leader_id != 0)
    })
    .await;
    let job = bob.create_job(service_job("bobs-app", 0)).await.expect("bob's job");

    let refused = |e: titus_client::Error| match e {
        titus_client::Error::Server { status, .. } => status,
        other => panic!("expected a refusal, got {other}"),
    };
    let s = refused(bob.add_load_balancer(&job, &untagged).await.unwrap_err());
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("rule target-group-owner") && s.message().contains("no titus:applications tag"),
        "{s:?}"
    );
    let s = refused(bob.add_load_balancer(&job, &theirs).await.unwrap_err());
    assert!(s.message().contains("not application \"bobs-app\""), "{s:?}");
    bob.add_load_balancer(&job, &ours).await.expect("a target group tagged for bob's application");
    admin.add_load_balancer(&job, &untagged).await.expect("an admin may use any target group");
    let lbs = admin.job_load_balancers(&job).await.unwrap();
    let mut ids: Vec<String> = lbs.into_iter().map(|l| l.id).collect();
    ids.sort();
    let mut want = vec![ours.clone(), untagged.clone()];
    want.sort();
    assert_eq!(ids, want);
}

/// Runs `script` in task `task_id`'s container (busybox sh): its stdout, or why it failed.
async fn in_container(task_id: &str, script: &str) -> Result<String, String> {
    let out = tokio::process::Command::new("docker")
        .args(["exec", &format!("titus-{task_id}"), "sh", "-c", script])
        .output()
        .await
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{}{}", stdout, String::from_utf8_lossy(&out.stderr)))
    }
}

/// One HTTP request from the container with busybox: (status, body). A GET goes through `wget`
/// (which says the status of a refusal on stderr), a PUT — which busybox wget cannot make — as raw
/// HTTP/1.0 through `nc`, its input held open until the answer is in.
async fn http_in_container(
    task_id: &str,
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    if method == "GET" {
        let headers: String = headers.iter().map(|(k, v)| format!(" --header '{k}: {v}'")).collect();
        return match in_container(task_id, &format!("wget -q -O -{headers} http://{address}{path}")).await {
            Ok(body) => (200, body),
            Err(e) => {
                let status = e.split("HTTP/1.").nth(1).and_then(|rest| rest.split_whitespace().nth(1));
                (status.and_then(|s| s.parse().ok()).unwrap_or(0), e)
            }
        };
    }
    let mut request = format!("{method} {path} HTTP/1.0\\r\\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\\r\\n"));
    }
    request.push_str("\\r\\n");
    let raw =
        in_container(task_id, &format!("(printf '{request}'; sleep 3) | nc {address} 80")).await.unwrap_or_else(|e| e);
    let status = raw.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Credentials as JSON (either endpoint's shape): access key id, secret, session token.
fn keys(json: &str) -> (String, String, String) {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"));
    let field = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("no {k} in {json}")).to_string();
    (field("AccessKeyId"), field("SecretAccessKey"), field("Token"))
}

/// Who those credentials are, as moto's STS GetCallerIdentity says.
async fn caller_arn(moto: &Moto, (key, secret, token): &(String, String, String)) -> String {
    let creds = aws_sdk_sts::config::Credentials::new(key, secret, Some(token.clone()), None, "task");
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(&moto.url)
        .credentials_provider(creds)
        .load()
        .await;
    let who = aws_sdk_sts::Client::new(&config).get_caller_identity().send().await.expect("GetCallerIdentity");
    who.arn().unwrap_or_default().to_string()
}

/// An IMDSv2 session token of the container's, through the link-local address.
async fn imds_token(task_id: &str) -> String {
    let (status, token) = http_in_container(
        task_id,
        "169.254.169.254",
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "120")],
    )
    .await;
    assert_eq!(status, 200, "PUT /latest/api/token: {token}");
    token
}

fn role_job(app: &str, role: &str, security_group: &str) -> pb::JobDescriptor {
    let mut job = service_job(app, 1);
    let container = job.container.as_mut().unwrap();
    container.security_profile = Some(pb::SecurityProfile {
        iam_role: role.into(),
        security_groups: vec![security_group.into()],
        ..Default::default()
    });
    job.job_group_info = Some(pb::JobGroupInfo { stack: "test".into(), detail: "".into(), sequence: "v002".into() });
    job
}

async fn started_task(client: &Client, job_id: &str) -> pb::Task {
    wait_until(SETTLE, &format!("job {job_id}'s task Started"), || async {
        let tasks = client.find_tasks(&[("jobIds", job_id), ("taskStates", "Started")], 10, "").await.ok()?;
        tasks.items.into_iter().next()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t490_each_task_gets_its_own_roles_credentials_and_metadata_and_nobody_elses() {
    const ACCOUNT_ROLE: &str = "arn:aws:iam::123456789012:role/";
    ensure_test_image();
    let dir = tempfile::TempDir::new().unwrap();
    let moto = Moto::start(dir.path());
    let (_, ec2) = moto.sdk().await;
    let vpc = ec2.describe_vpcs().send().await.unwrap().vpcs()[0].vpc_id().unwrap().to_string();
    let sg = ec2.create_security_group().group_name("web").description("t490").vpc_id(&vpc).send().await.unwrap();
    let sg = sg.group_id().unwrap().to_string();
    let mut cluster = start(&aws_args(&moto.url, 60_000));
    let allowed = format!("{ACCOUNT_ROLE}titus-*");
    let agent = cluster.start_agent_with(
        "iam-agent",
        4.0,
        4096,
        &[
            "--aws-region",
            "us-east-1",
            "--aws-endpoint-url",
            &moto.url,
            "--allow-role",
            &allowed,
            "--role-session-secs",
            "900",
            // Assumed again ~10 s after each AssumeRole: the refresh is seen within the test.
            "--role-refresh-before-secs",
            "890",
            "--attribute",
            "zone=us-east-1c",
        ],
    );
    let client = cluster.client();
    cluster.wait_for_leader(Duration::from_secs(30)).await;

    // Security groups EC2 does not know are refused at submission, naming the field.
    let err = client.create_job(role_job("ghost", &format!("{ACCOUNT_ROLE}titus-web"), "sg-0123456789abcdef0")).await;
    let err = err.expect_err("an unknown security group is refused").to_string();
    assert!(err.contains("container.security_profile.security_groups[0]") && err.contains("does not exist"), "{err}");

    let web = client.create_job(role_job("web", &format!("{ACCOUNT_ROLE}titus-web"), &sg)).await.unwrap();
    let other = client.create_job(role_job("other", &format!("{ACCOUNT_ROLE}titus-other"), &sg)).await.unwrap();
    let forbidden = client.create_job(role_job("nope", &format!("{ACCOUNT_ROLE}admin"), &sg)).await.unwrap();
    let a = started_task(&client, &web).await;
    let b = started_task(&client, &other).await;
    let a_ip = a.task_context.get("containerIp").cloned().expect("a's address");

    // A role this agent may not pass fails the task at start, saying why; no container runs it.
    let refused = wait_until(SETTLE, "the forbidden role's task Finished", || async {
        let tasks =
            client.find_tasks(&[("jobIds", forbidden.as_str()), ("taskStates", "Finished")], 10, "").await.ok()?;
        tasks.items.into_iter().next()
    })
    .await;
    let status = refused.status.clone().unwrap();
    assert_eq!(status.reason_code, "failed", "{status:?}");
    assert!(status.reason_message.contains("aws.allowed-roles"), "{status:?}");

    // The container credentials endpoint, as the SDKs read it from the environment.
    let fetch = "wget -q -O - --header \"Authorization: $AWS_CONTAINER_AUTHORIZATION_TOKEN\" \"$AWS_CONTAINER_CREDENTIALS_FULL_URI\"";
    let a_keys = keys(&in_container(&a.id, fetch).await.expect("a's credentials"));
    let a_arn = caller_arn(&moto, &a_keys).await;
    assert_eq!(a_arn, format!("arn:aws:sts::123456789012:assumed-role/titus-web/{}", a.id));
    let b_keys = keys(&in_container(&b.id, fetch).await.expect("b's credentials"));
    assert!(caller_arn(&moto, &b_keys).await.contains("assumed-role/titus-other/"));

    // The same role through instance metadata, with an IMDSv2 session token.
    let token = imds_token(&a.id).await;
    let imds = |path: &'static str, task: String, token: String| async move {
        http_in_container(&task, "169.254.169.254", "GET", path, &[("X-aws-ec2-metadata-token", &token)]).await
    };
    let (status, names) = imds("/latest/meta-data/iam/security-credentials/", a.id.clone(), token.clone()).await;
    assert_eq!((status, names.trim()), (200, "titus-web"));
    let (status, body) =
        imds("/latest/meta-data/iam/security-credentials/titus-web", a.id.clone(), token.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(caller_arn(&moto, &keys(&body)).await, a_arn);
    for (path, want) in [
        ("/latest/meta-data/instance-id", a.id.clone()),
        ("/latest/meta-data/local-ipv4", a_ip.clone()),
        ("/latest/meta-data/placement/availability-zone", "us-east-1c".to_string()),
        ("/latest/meta-data/placement/region", "us-east-1".to_string()),
    ] {
        assert_eq!(imds(path, a.id.clone(), token.clone()).await, (200, want), "{path}");
    }
    let (status, _) = imds("/latest/meta-data/ami-launch-index", a.id.clone(), token.clone()).await;
    assert_eq!(status, 404, "paths it does not serve are 404");
    let (status, _) = http_in_container(&a.id, "169.254.169.254", "GET", "/latest/meta-data/instance-id", &[]).await;
    assert_eq!(status, 401, "IMDSv1 (no token) is refused unless the job allows it");

    // Titus's environment.
    let env = in_container(&a.id, "env").await.unwrap();
    for want in [
        format!("TITUS_TASK_ID={}", a.id),
        format!("TITUS_JOB_ID={web}"),
        "NETFLIX_APP=web".to_string(),
        "NETFLIX_STACK=test".to_string(),
        "NETFLIX_CLUSTER=web-test".to_string(),
        "NETFLIX_AUTO_SCALE_GROUP=web-test-v002".to_string(),
        format!("EC2_LOCAL_IPV4={a_ip}"),
        "EC2_AVAILABILITY_ZONE=us-east-1c".to_string(),
        "EC2_REGION=us-east-1".to_string(),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} missing from:\n{env}");
    }

    // b cannot have a's credentials: not with a's token, not with its own, not by a's role's
    // name, not with a's IMDS session token.
    let a_token = in_container(&a.id, "printf %s \"$AWS_CONTAINER_AUTHORIZATION_TOKEN\"").await.unwrap();
    let (status, _) =
        http_in_container(&b.id, "169.254.170.2", "GET", "/v1/credentials", &[("Authorization", &a_token)]).await;
    assert_eq!(status, 403, "b with a's token");
    let (status, _) = http_in_container(&b.id, "169.254.170.2", "GET", "/v1/credentials", &[]).await;
    assert_eq!(status, 401, "b without a token");
    let (status, _) = imds("/latest/meta-data/iam/security-credentials/titus-web", b.id.clone(), token.clone()).await;
    assert_eq!(status, 401, "b with a's IMDS session token");
    let b_token = imds_token(&b.id).await;
    let (status, _) = imds("/latest/meta-data/iam/security-credentials/titus-web", b.id.clone(), b_token).await;
    assert_eq!(status, 404, "b asking for a's role by name");

    // Refreshed before they expire: new keys, same role.
    let refreshed = wait_until(Duration::from_secs(60), "a's credentials refreshed", || async {
        let k = keys(&in_container(&a.id, fetch).await.ok()?);
        (k.0 != a_keys.0).then_some(k)
    })
    .await;
    assert_eq!(caller_arn(&moto, &refreshed).await, a_arn);

    // A leader kill changes none of it: the same container serves the same role.
    let started_at = containers_of(&agent).into_iter().find(|c| c.1 == a.id).expect("a's container").3;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    cluster.kill(leader);
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    let after = keys(&in_container(&a.id, fetch).await.expect("a's credentials after the leader kill"));
    assert_eq!(caller_arn(&moto, &after).await, a_arn);
    let still = containers_of(&agent).into_iter().find(|c| c.1 == a.id).expect("a's container").3;
    assert_eq!(still, started_at, "a's container was not restarted");

    // Nor does an agent restart (SIGKILL): the new process routes the addresses to its new port and
    // knows the running container again by its labels, environment and address.
    cluster.kill_agent(&agent);
    cluster.restart_agent(&agent);
    let again = wait_until(SETTLE, "a's credentials served by the restarted agent", || async {
        Some(keys(&in_container(&a.id, fetch).await.ok()?))
    })
    .await;
    assert_eq!(caller_arn(&moto, &again).await, a_arn);
    let (status, body) =
        http_in_container(&b.id, "169.254.170.2", "GET", "/v1/credentials", &[("Authorization", &a_token)]).await;
    assert_eq!(status, 403, "b with a's token, after the restart: {body}");
    let still = containers_of(&agent).into_iter().find(|c| c.1 == a.id).expect("a's container").3;
    assert_eq!(still, started_at, "a's container was not restarted by the agent's restart");
}

/// Live tasks of the job by spec version: (version, task) for every task not Finished.
async fn live_by_version(client: &Client, job_id: &str) -> Vec<(u32, pb::Task)> {
    let live = "Accepted,Launched,StartInitiated,Started,KillInitiated";
    let tasks = client.find_tasks(&[("jobIds", job_id), ("taskStates", live)], 1000, "").await.unwrap().items;
    tasks.into_iter().map(|t| (t.task_context.get("jobVersion").and_then(|v| v.parse().ok()).unwrap_or(0), t)).collect()
}

/// The job's container with `env` set (a new spec, the same image).
async fn container_with(
    client: &Client,
    job_id: &str,
    env: &[(&str, &str)],
    command: Option<Vec<String>>,
) -> pb::Container {
    let job = client.find_job(job_id).await.unwrap();
    let mut c = job.job_descriptor.unwrap().container.unwrap();
    c.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    if let Some(command) = command {
        c.command = command;
    }
    c
}

async fn deployment(client: &Client, job_id: &str) -> pb::Deployment {
    client.get_deployments(job_id).await.unwrap().deployments.into_iter().next().expect("a deployment")
}

/// A rolling update of a 6-task service behind an ALB target group (moto, through the fault
/// proxy): new tasks count only once their targets report healthy, so while the proxy says a new
/// target is unhealthy nothing old is killed; the registered targets (sampled from moto every
/// 100 ms) never drop below desired - max_unavailable; a leader killed mid-deployment neither
/// stalls it nor adds or loses a task; and a new spec whose containers fail rolls back by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t425_a_rolling_update_waits_for_alb_health_survives_a_leader_kill_and_rolls_back_a_failing_spec() {
    ensure_test_image();
    let dir = tempfile::TempDir::new().unwrap();
    let moto = Moto::start(dir.path());
    let (elb, ec2) = moto.sdk().await;
    let arn = moto::target_group(&elb, &ec2, "rolling", TargetTypeEnum::Ip).await;
    let proxy = Proxy::start("127.0.0.1:0", &format!("127.0.0.1:{}", moto.port), FaultConfig::default()).await.unwrap();
    let mut cluster = start(&aws_args(&proxy.url(), 60_000));
    cluster.start_agent("lb-agent", 4.0, 4096);
    let client = cluster.client();
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    const DESIRED: usize = 6;
    // Small enough that a surge task fits on the agent beside the old tasks and the ones draining
    // (the default 128 Mbps each would fill its network after 7).
    let mut descriptor = service_job("rolling", DESIRED as u32);
    descriptor.container.as_mut().unwrap().resources.as_mut().unwrap().network_mbps = 32;
    let job_id = client.create_job(descriptor).await.unwrap();
    client.add_load_balancer(&job_id, &arn).await.unwrap();
    let old_ips = wait_started(&client, &job_id, DESIRED).await;
    wait_targets(&elb, &arn, &old_ips).await;

    // From now on, the proxy says every target but the old ones is unhealthy.
    let mut spared: Vec<String> = old_ips.iter().map(|ip| format!("!{ip}")).collect();
    spared.push("*".into());
    proxy.set(FaultConfig { unhealthy_targets: spared, ..Default::default() }).unwrap();
    // Registered targets, sampled from moto itself every 100 ms until told to stop.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = {
        let (elb, arn) = (elb.clone(), arn.clone());
        tokio::spawn(async move {
            let mut fewest = usize::MAX;
            let mut samples = 0;
            loop {
                fewest = fewest.min(moto::targets(&elb, &arn).await.len());
                samples += 1;
                tokio::select! {
                    _ = &mut stop_rx => return (fewest, samples),
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        })
    };

    let started = std::time::Instant::now();
    // No task below desired: an old task goes only once a new one serves.
    let strategy = pb::RolloutStrategy { max_unavailable: 0, max_surge: 1, ..Default::default() };
    let v2 = container_with(&client, &job_id, &[("VERSION", "2")], None).await;
    // A dry run first: the first step's one surge task fits on the agent; six steps in all.
    let request = pb::JobPlanRequest {
        job_id: job_id.clone(),
        container: Some(v2.clone()),
        strategy: Some(strategy),
        ..Default::default()
    };
    let plan = client.plan_job(request).await.unwrap();
    assert_eq!((plan.tasks, plan.steps, plan.changes.clone()), (1, 6, vec!["env".to_string()]), "{plan:?}");
    assert_eq!(plan.placements.values().sum::<u32>(), 1, "{plan:?}");
    assert!(plan.pending_reasons.is_empty(), "{plan:?}");
    let id = client.update_job_spec(&job_id, v2.clone(), Some(strategy)).await.unwrap();
    assert_eq!(id, 1);
    assert_eq!(
        client.update_job_spec(&job_id, v2, Some(strategy)).await.unwrap(),
        0,
        "the same spec again starts nothing"
    );

    // The surge task starts and is registered, but its target reads unhealthy: the deployment
    // waits, every old task keeps running, through several looks at the target group.
    let surge_ip = wait_until(SETTLE, "the surge task registered", || async {
        let targets = moto::targets(&elb, &arn).await;
        targets.difference(&old_ips).next().cloned()
    })
    .await;
    let looks = |proxy: &Proxy| proxy.calls().iter().filter(|c| c.action == "DescribeTargetHealth").count();
    let before = looks(&proxy);
    wait_until(SETTLE, "three more health looks", || async { (looks(&proxy) >= before + 3).then_some(()) }).await;
    let d = deployment(&client, &job_id).await;
    assert_eq!(
        (d.state.as_str(), d.new_live, d.new_available, d.old_live),
        ("Progressing", 1, 0, DESIRED as u32),
        "{d:?}"
    );
    assert_eq!(
        started_ips(&client, &job_id).await.len(),
        DESIRED + 1,
        "no old task was killed while the new one is unhealthy"
    );
    let waited = started.elapsed();
    eprintln!("the deployment waited {:.1}s on the unhealthy target {surge_ip}", waited.as_secs_f64());

    // Healthy again: it goes on. Kill the leader once a few old tasks are gone.
    proxy.set(FaultConfig::default()).unwrap();
    wait_until(SETTLE, "half the old tasks replaced", || async {
        let d = deployment(&client, &job_id).await;
        (d.old_live <= 3).then_some(())
    })
    .await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    cluster.kill(leader);
    let done = wait_until(Duration::from_secs(120), "the deployment succeeds", || async {
        let d = client.get_deployments(&job_id).await.ok()?.deployments.into_iter().next()?;
        (d.state == "Succeeded").then_some(d)
    })
    .await;
    let took = started.elapsed();
    let _ = stop_tx.send(());
    let (fewest, samples) = sampler.await.unwrap();
    eprintln!(
        "rolling update of {DESIRED} tasks: {:.1}s in {} steps; fewest registered targets {fewest} over {samples} samples",
        took.as_secs_f64(),
        done.steps.len()
    );
    let mut previous = done.started_ms;
    for (n, s) in done.steps.iter().enumerate() {
        eprintln!(
            "  step {}: +{} ms (created {}, killed {}, new available {})",
            n + 1,
            s.at_ms - previous,
            s.created,
            s.killed,
            s.new_available
        );
        previous = s.at_ms;
    }
    assert!(fewest >= DESIRED, "the target group went down to {fewest} targets (floor {DESIRED})");
    let live = live_by_version(&client, &job_id).await;
    let serving: Vec<&(u32, pb::Task)> = live
        .iter()
        .filter(|(_, t)| t.status.as_ref().unwrap().state != pb::TaskState::TaskKillInitiated as i32)
        .collect();
    assert_eq!(serving.len(), DESIRED, "{live:?}");
    assert!(serving.iter().all(|(v, _)| *v == 1), "every task runs version 1");
    // No task added or lost across the leader kill: exactly DESIRED tasks of version 1 ever.
    let all = client.find_tasks(&[("jobIds", job_id.as_str())], 1000, "").await.unwrap().items;
    let v1 = all.iter().filter(|t| t.task_context.get("jobVersion").map(String::as_str) == Some("1")).count();
    assert_eq!(v1, DESIRED, "tasks of version 1 created");
    for t in all.iter().filter(|t| t.task_context.get("jobVersion").map(String::as_str) == Some("1")) {
        let at = |state: pb::TaskState| {
            t.status_history.iter().chain(t.status.iter()).find(|s| s.state == state as i32).map(|s| s.timestamp_ms)
        };
        let created = at(pb::TaskState::TaskAccepted).unwrap_or(0);
        let since = |state| at(state).map_or("-".to_string(), |ms| format!("{} ms", ms - created));
        eprintln!(
            "  task {} (index {}): Launched +{}, Started +{}",
            t.id,
            t.index,
            since(pb::TaskState::TaskLaunched),
            since(pb::TaskState::TaskStarted)
        );
    }
    let ips = wait_started(&client, &job_id, DESIRED).await;
    wait_targets(&elb, &arn, &ips).await;

    // A spec whose containers exit at once rolls back by itself, after two failures.
    let broken =
        container_with(&client, &job_id, &[("VERSION", "3")], Some(vec!["sh".into(), "-c".into(), "exit 3".into()]))
            .await;
    let strategy =
        pb::RolloutStrategy { max_unavailable: 1, max_surge: 1, rollback_after_failures: 2, ..Default::default() };
    assert_eq!(client.update_job_spec(&job_id, broken, Some(strategy)).await.unwrap(), 2);
    let list =
        wait_until(Duration::from_secs(120), "the failing deployment rolls back and the rollback ends", || async {
            let list = client.get_deployments(&job_id).await.ok()?;
            let newest = list.deployments.first()?;
            (newest.rollback_of == 2 && newest.state == "Succeeded").then_some(list)
        })
        .await;
    let failed = &list.deployments[1];
    assert_eq!(failed.state, "RolledBack");
    assert!(failed.message.contains("failed, at the threshold of 2"), "{}", failed.message);
    assert_eq!(list.spec_version, 1, "the job is back on version 1");
    let job = client.find_job(&job_id).await.unwrap();
    assert_eq!(job.job_descriptor.unwrap().container.unwrap().env.get("VERSION").map(String::as_str), Some("2"));
    let live = live_by_version(&client, &job_id).await;
    let serving = live.iter().filter(|(_, t)| t.status.as_ref().unwrap().state == pb::TaskState::TaskStarted as i32);
    assert_eq!(serving.filter(|(v, _)| *v == 1).count(), DESIRED, "{live:?}");
}
