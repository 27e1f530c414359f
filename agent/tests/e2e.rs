//! The agent end to end: real replicas, real agents, the real Docker daemon and the local test
//! image. t200 batch failures and kills, t210 a service across two agents, t220 a leader kill
//! under running containers, t230 an agent restart, t240 an agent gone past its TTL, t247 an agent
//! drain within the jobs' disruption budgets, t265
//! health checks (command and HTTP) and the replacement of an unhealthy task, t266 evictions within
//! a disruption budget, t267 a rolling update changing resources, t280 a crash-looping service backing off.

#[path = "../../control-plane/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{containers_of, ensure_test_image, wait_until, Cluster};
use titus_client::proto as pb;
use titus_client::Client;

const ELECTION: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(40);

fn container(command: &[&str], cpu: f64, memory_mb: u32) -> pb::Container {
    pb::Container {
        resources: Some(pb::ContainerResources { cpu, memory_mb, ..Default::default() }),
        image: Some(pb::Image { name: "titus/busybox".into(), tag: "latest".into(), digest: String::new() }),
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn job(app: &str, container: pb::Container, job_type: pb::job_descriptor::JobType) -> pb::JobDescriptor {
    pb::JobDescriptor {
        owner: Some(pb::Owner { team_email: "team@example.com".into() }),
        application_name: app.into(),
        container: Some(container),
        job_type: Some(job_type),
        ..Default::default()
    }
}

fn service(desired: u32, max: u32) -> pb::job_descriptor::JobType {
    pb::job_descriptor::JobType::Service(pb::ServiceJobSpec {
        capacity: Some(pb::Capacity { min: 0, desired, max }),
        enabled: true,
        ..Default::default()
    })
}

async fn tasks_in(client: &Client, job_id: &str, states: &str) -> Vec<pb::Task> {
    client
        .find_tasks(&[("jobIds", job_id), ("taskStates", states)], 1000, "")
        .await
        .map(|r| r.items)
        .unwrap_or_default()
}

async fn wait_tasks(client: &Client, job_id: &str, states: &str, n: usize, within: Duration) -> Vec<pb::Task> {
    wait_until(within, &format!("{n} tasks of {job_id} in {states}"), || async {
        let t = tasks_in(client, job_id, states).await;
        (t.len() == n).then_some(t)
    })
    .await
}

fn running(agent: &str) -> usize {
    containers_of(agent).iter().filter(|c| c.2).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t200_failed_batch_tasks_are_retried_and_a_kill_finishes_within_grace() {
    ensure_test_image();
    let mut c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let agent = c.start_agent("a200", 4.0, 4096);
    let client = c.client();

    let failing = job(
        "exit3",
        container(&["sh", "-c", "exit 3"], 0.5, 64),
        pb::job_descriptor::JobType::Batch(pb::BatchJobSpec {
            size: 1,
            retry_policy: Some(pb::RetryPolicy {
                policy: Some(pb::retry_policy::Policy::Immediate(pb::retry_policy::Immediate { retries: 1 })),
            }),
            ..Default::default()
        }),
    );
    let id = client.create_job(failing).await.unwrap();
    let done = wait_until(SETTLE, "the failing job to finish", || async {
        client.find_job(&id).await.ok().filter(|j| j.status.as_ref().unwrap().state == pb::JobState::JobFinished as i32)
    })
    .await;
    assert_eq!(done.status.unwrap().reason_code, "failed");
    let attempts = tasks_in(&client, &id, "Finished").await;
    assert_eq!(attempts.len(), 2, "one run and one retry");
    for t in &attempts {
        let s = t.status.clone().unwrap();
        assert_eq!(s.reason_code, "failed");
        assert!(s.reason_message.contains("exit") && s.reason_message.contains('3'), "{}", s.reason_message);
        assert_eq!(t.task_context.get("exitCode").map(String::as_str), Some("3"));
        assert_eq!(t.task_context.get("agent"), Some(&agent));
    }

    let sleeper = job(
        "sleeper",
        container(&["sleep", "300"], 0.5, 64),
        pb::job_descriptor::JobType::Batch(pb::BatchJobSpec { size: 1, ..Default::default() }),
    );
    let id = client.create_job(sleeper).await.unwrap();
    let started = wait_tasks(&client, &id, "Started", 1, SETTLE).await;
    assert!(started[0].task_context.contains_key("containerIp"), "{:?}", started[0].task_context);
    let t0 = Instant::now();
    client.kill_task(&started[0].id, false, false).await.unwrap();
    let killed = wait_tasks(&client, &id, "Finished", 1, SETTLE).await;
    assert_eq!(killed[0].status.as_ref().unwrap().reason_code, "killed");
    assert!(t0.elapsed() < Duration::from_secs(10 + 5), "kill took {:?}, beyond its 10 s grace", t0.elapsed());
    // The finished task's container is removed once the control plane has recorded it.
    wait_until(SETTLE, "tombstone containers removed", || async { containers_of(&agent).is_empty().then_some(()) })
        .await;

    // An image that is not on the agent is never pulled: the task fails saying so.
    let mut missing = container(&["true"], 0.5, 64);
    missing.image = Some(pb::Image { name: "titus/absent".into(), tag: "latest".into(), digest: String::new() });
    let id = client
        .create_job(job(
            "absent",
            missing,
            pb::job_descriptor::JobType::Batch(pb::BatchJobSpec { size: 1, ..Default::default() }),
        ))
        .await
        .unwrap();
    let failed = wait_tasks(&client, &id, "Finished", 1, SETTLE).await;
    let s = failed[0].status.clone().unwrap();
    assert_eq!(s.reason_code, "failed");
    assert!(s.reason_message.contains("titus/absent:latest is not present"), "{}", s.reason_message);

    // A task that outgrows its memory limit is OOM killed, and says so.
    let hog = container(&["sh", "-c", "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done"], 0.5, 16);
    let id = client
        .create_job(job(
            "hog",
            hog,
            pb::job_descriptor::JobType::Batch(pb::BatchJobSpec { size: 1, ..Default::default() }),
        ))
        .await
        .unwrap();
    let oom = wait_tasks(&client, &id, "Finished", 1, SETTLE).await;
    let s = oom[0].status.clone().unwrap();
    assert_eq!(s.reason_code, "failed");
    assert!(s.reason_message.contains("OOM killed"), "{}", s.reason_message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t210_a_service_spreads_over_two_agents_and_scales_down() {
    ensure_test_image();
    let mut c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let a = c.start_agent("a210a", 2.0, 2048);
    let b = c.start_agent("a210b", 2.0, 2048);
    let client = c.client();
    let id = client.create_job(job("web", container(&["sleep", "600"], 1.0, 128), service(3, 4))).await.unwrap();
    let started = wait_tasks(&client, &id, "Started", 3, SETTLE).await;
    let agents: BTreeSet<String> = started.iter().map(|t| t.task_context["agent"].clone()).collect();
    assert_eq!(agents, BTreeSet::from([a.clone(), b.clone()]), "2 cpus per agent: 3 one-cpu tasks need both");
    assert_eq!(running(&a) + running(&b), 3);

    client.update_job_capacity(&id, None, Some(1), None).await.unwrap();
    wait_tasks(&client, &id, "Started", 1, SETTLE).await;
    wait_until(SETTLE, "two containers stopped", || async { (running(&a) + running(&b) == 1).then_some(()) }).await;

    // ObserveAgents: both agents, healthy and online, then the snapshot marker.
    use pb::agent_change_notification::Notification;
    let url = format!("http://{}", c.replica(1).api_addr);
    let mut observer = pb::agent_management_service_client::AgentManagementServiceClient::connect(url).await.unwrap();
    let mut stream = observer.observe_agents(pb::Empty {}).await.unwrap().into_inner();
    let mut seen = BTreeSet::new();
    loop {
        match stream.message().await.unwrap().expect("a notification").notification.unwrap() {
            Notification::AgentUpdate(x) => {
                assert!(x.healthy && x.state == pb::AgentState::AgentOnline as i32, "{x:?}");
                assert_eq!(x.attributes.get("zone").map(String::as_str), Some("us-east-1a"));
                seen.insert(x.id);
            }
            Notification::InstanceGroupUpdate(_) => {}
            Notification::SnapshotEnd(_) => break,
        }
    }
    assert!(seen.contains(&a) && seen.contains(&b), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t220_a_leader_kill_restarts_no_container() {
    ensure_test_image();
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_for_leader(ELECTION).await;
    let a = c.start_agent("a220a", 4.0, 4096);
    let b = c.start_agent("a220b", 4.0, 4096);
    let client = c.client();
    let id = client.create_job(job("ten", container(&["sleep", "600"], 0.5, 32), service(10, 10))).await.unwrap();
    let before = wait_tasks(&client, &id, "Started", 10, SETTLE).await;
    let containers_before: BTreeMap<String, String> =
        containers_of(&a).into_iter().chain(containers_of(&b)).map(|(cid, _, _, started)| (cid, started)).collect();
    assert_eq!(containers_before.len(), 10);

    c.kill(leader);
    let t0 = Instant::now();
    let new_leader = c.wait_for_leader(ELECTION).await;
    let on_leader = c.client_of(new_leader);
    wait_until(SETTLE, "both agents re-attached to the new leader", || async {
        let agents = on_leader.find_agents().await.ok()?;
        agents.iter().filter(|x| x.id == a || x.id == b).all(|x| x.connected).then_some(())
    })
    .await;
    eprintln!("agents re-attached {:?} after the leader kill", t0.elapsed());

    // Same containers, same start times, all still running; no task moved.
    let containers_after: BTreeMap<String, String> =
        containers_of(&a).into_iter().chain(containers_of(&b)).map(|(cid, _, _, started)| (cid, started)).collect();
    assert_eq!(containers_after, containers_before, "a container was restarted or replaced");
    assert_eq!(running(&a) + running(&b), 10);
    let after = tasks_in(&client, &id, "Started").await;
    assert_eq!(after.len(), 10);
    let history =
        |ts: &[pb::Task]| ts.iter().map(|t| (t.id.clone(), t.status_history.len())).collect::<BTreeMap<_, _>>();
    assert_eq!(history(&after), history(&before), "a task changed state spuriously");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t230_a_restarted_agent_adopts_its_containers() {
    ensure_test_image();
    let mut c = Cluster::start(3, &["--agent-heartbeat-ttl-ms", "4000"]);
    c.wait_for_leader(ELECTION).await;
    let a = c.start_agent("a230", 4.0, 4096);
    let client = c.client();
    let id = client.create_job(job("adopt", container(&["sleep", "600"], 0.5, 32), service(4, 4))).await.unwrap();
    wait_tasks(&client, &id, "Started", 4, SETTLE).await;
    let before: BTreeSet<String> = containers_of(&a).into_iter().map(|c| c.0).collect();
    // Time itself is the condition here: once the leader has led for longer than the TTL, only the
    // agent's own silence may count against it, not how long ago the leader took over.
    tokio::time::sleep(Duration::from_millis(4500)).await;

    c.kill_agent(&a);
    c.restart_agent(&a);
    let on_leader = c.client_of(c.wait_for_leader(ELECTION).await);
    wait_until(SETTLE, "the agent re-attached", || async {
        on_leader.find_agents().await.ok()?.iter().find(|x| x.id == a && x.connected).map(|_| ())
    })
    .await;
    // Give it a reconcile round to do anything wrong, then check nothing was duplicated.
    wait_tasks(&client, &id, "Started", 4, SETTLE).await;
    let after: BTreeSet<String> = containers_of(&a).into_iter().map(|c| c.0).collect();
    assert_eq!(after, before, "containers were duplicated or replaced");
    assert_eq!(running(&a), 4);
    assert!(tasks_in(&client, &id, "Finished").await.is_empty(), "a brief restart must not declare tasks lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t240_an_agent_gone_past_its_ttl_loses_its_tasks_and_its_stale_containers() {
    ensure_test_image();
    let mut c = Cluster::start(3, &["--agent-heartbeat-ttl-ms", "4000"]);
    c.wait_for_leader(ELECTION).await;
    let a = c.start_agent("a240a", 4.0, 4096);
    let client = c.client();
    let id = client.create_job(job("moves", container(&["sleep", "600"], 1.0, 64), service(2, 2))).await.unwrap();
    let first = wait_tasks(&client, &id, "Started", 2, SETTLE).await;
    assert!(first.iter().all(|t| t.task_context["agent"] == a));
    let b = c.start_agent("a240b", 4.0, 4096);

    c.kill_agent(&a);
    let replaced = wait_until(SETTLE, "the tasks replaced on the other agent", || async {
        let t = tasks_in(&client, &id, "Started").await;
        (t.len() == 2 && t.iter().all(|t| t.task_context["agent"] == b)).then_some(t)
    })
    .await;
    let lost = tasks_in(&client, &id, "Finished").await;
    assert!(lost
        .iter()
        .filter(|t| first.iter().any(|f| f.id == t.id))
        .all(|t| t.status.as_ref().unwrap().reason_code == "lost"));
    assert_eq!(replaced.len(), 2);
    assert_eq!(running(&a), 2, "the lost agent's containers are still running on the host");

    // It comes back: its stale containers are removed, nothing new runs there.
    c.restart_agent(&a);
    wait_until(SETTLE, "stale containers removed", || async { containers_of(&a).is_empty().then_some(()) }).await;
    assert_eq!(tasks_in(&client, &id, "Started").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t250_an_agent_without_docker_is_unhealthy_and_gets_no_tasks() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_for_leader(ELECTION).await;
    let a = c.start_agent_with("a250", 4.0, 4096, &["--docker-socket", "/nonexistent/docker.sock"]);
    let on_leader = c.client_of(leader);
    let agent = wait_until(SETTLE, "the agent registered", || async {
        on_leader.find_agents().await.ok()?.into_iter().find(|x| x.id == a && x.connected)
    })
    .await;
    assert!(!agent.healthy, "{agent:?}");
    assert!(agent.unhealthy_reason.contains("docker"), "{agent:?}");

    let client = c.client();
    let id = client.create_job(job("nowhere", container(&["sleep", "60"], 0.5, 64), service(1, 1))).await.unwrap();
    wait_tasks(&client, &id, "Accepted", 1, SETTLE).await;
    // Absence needs time to show: five placement rounds (200 ms apart) pass without placing it.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(tasks_in(&client, &id, "Accepted").await.len(), 1, "an unhealthy agent must get no tasks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t260_agent_and_leader_metrics_follow_a_launch() {
    ensure_test_image();
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_for_leader(ELECTION).await;
    let admin = format!("127.0.0.1:{}", common::free_port());
    let a = c.start_agent_with("a260", 2.0, 2048, &["--admin-listen", &admin, "--log-format", "json"]);
    wait_until(SETTLE, "the agent attached and ready", || async {
        (common::http_get(&admin, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(common::http_get(&admin, "/healthz").await.0, 200);
    let client = c.client();
    let id = client.create_job(job("metered", container(&["sleep", "600"], 0.5, 64), service(2, 2))).await.unwrap();
    wait_tasks(&client, &id, "Started", 2, SETTLE).await;

    let s = common::scrape(&admin).await;
    assert_eq!(common::value(&s, "titus_agent_connected", &[]), 1.0);
    assert_eq!(common::value(&s, "titus_agent_assignments_total", &[]), 2.0);
    assert!(common::value(&s, "titus_agent_task_reports_total", &[("state", "Started")]) >= 2.0);
    assert_eq!(common::value(&s, "titus_agent_launch_seconds_count", &[]), 2.0);
    assert_eq!(common::value(&s, "titus_agent_docker_healthy", &[]), 1.0);
    assert!(common::value(&s, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(common::value(&s, "process_open_fds", &[]) > 0.0);
    assert_eq!(common::value(&s, "titus_build_info", &[("binary", "titus-agent")]), 1.0);

    // A batch task that fails, retried once: one failure by reason and one restart, on every replica.
    let failing = pb::job_descriptor::JobType::Batch(pb::BatchJobSpec {
        size: 1,
        retry_policy: Some(pb::RetryPolicy {
            policy: Some(pb::retry_policy::Policy::Immediate(pb::retry_policy::Immediate { retries: 1 })),
        }),
        ..Default::default()
    });
    let failed = client.create_job(job("failing", container(&["sh", "-c", "exit 3"], 0.1, 32), failing)).await.unwrap();
    wait_tasks(&client, &failed, "Finished", 2, SETTLE).await;

    // The leader saw the same launches: placements, launch latency, one attached agent.
    let s = common::scrape(&c.replica(leader).admin_addr).await;
    assert!(common::value(&s, "titus_scheduler_placements_total", &[]) >= 2.0);
    assert!(common::value(&s, "titus_task_launch_seconds_count", &[]) >= 2.0);
    assert_eq!(common::value(&s, "titus_agents_connected", &[]), 1.0);
    assert_eq!(common::value(&s, "titus_agents", &[("state", "online")]), 1.0);
    assert_eq!(common::value(&s, "titus_build_info", &[("binary", "titus-control-plane")]), 1.0);
    assert!(common::value(&s, "process_cpu_seconds_total", &[]) > 0.0);
    assert!(common::value(&s, "titus_task_failures_total", &[("reason", "failed")]) >= 2.0, "two tries failed");
    assert!(common::value(&s, "titus_task_restarts_total", &[]) >= 1.0, "the retry is a restart");
    assert_eq!(common::value(&s, "titus_tasks", &[("state", "Started")]), 2.0);
    // JSON logs carry the task's span fields.
    let log = c.agent_log(&a);
    let line = log.lines().find(|l| l.contains("\"launched\"")).expect("a launch log line");
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    assert!(v["span"]["task_id"].as_str().is_some_and(|t| !t.is_empty()), "{line}");
    assert_eq!(v["span"]["job_id"], id.as_str(), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t245_draining_an_agent_moves_its_service_tasks() {
    ensure_test_image();
    let mut c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let client = c.client();
    for group in ["ig245old", "ig245new"] {
        client.create_instance_group(group, pb::Tier::Flex, pb::InstanceGroupLifecycle::IgActive).await.unwrap();
    }
    let old = c.start_agent_with("a245old", 4.0, 4096, &["--instance-group", "ig245old"]);
    // Exits on SIGTERM at once (a bare `sleep` as pid 1 waits out the kill grace period).
    let command = ["sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait"];
    let id = client.create_job(job("drained", container(&command, 0.5, 32), service(4, 4))).await.unwrap();
    wait_tasks(&client, &id, "Started", 4, SETTLE).await;
    assert_eq!(running(&old), 4);
    let new = c.start_agent_with("a245new", 4.0, 4096, &["--instance-group", "ig245new"]);

    // Drain: the old agent's group is PhasedOut; its tasks move to the new one, a few at a time.
    client.update_instance_group_lifecycle("ig245old", pb::InstanceGroupLifecycle::IgPhasedOut).await.unwrap();
    let t0 = Instant::now();
    wait_until(Duration::from_secs(90), "every task moved to the new agent", || async {
        let live = client
            .find_tasks(
                &[("jobIds", id.as_str()), ("taskStates", "Accepted,Launched,StartInitiated,Started,KillInitiated")],
                100,
                "",
            )
            .await
            .ok()?
            .items;
        let moved = live.len() == 4
            && live.iter().all(|t| {
                t.task_context.get("agent") == Some(&new)
                    && t.status.as_ref().map(|s| s.state) == Some(pb::TaskState::TaskStarted as i32)
            });
        (moved && running(&old) == 0).then_some(())
    })
    .await;
    eprintln!("4 tasks moved off the drained agent in {:?}", t0.elapsed());
    let evicted =
        client.find_tasks(&[("jobIds", id.as_str()), ("taskStates", "Finished")], 100, "").await.unwrap().items;
    assert_eq!(evicted.len(), 4, "{evicted:?}");
    for t in &evicted {
        let status = t.status.as_ref().unwrap();
        assert_eq!(status.reason_code, "evicted", "{t:?}");
        let kill = t.status_history.iter().find(|s| s.state == pb::TaskState::TaskKillInitiated as i32);
        assert!(kill.is_some_and(|k| k.reason_message.contains("is drained: task moved")), "{t:?}");
        assert_eq!(t.task_context.get("agent"), Some(&old));
    }
    assert_eq!(running(&new), 4);
}

/// Runs `cmd` in a task's container with `docker exec` (so with the container's own capabilities,
/// limits and network): whether it exited 0, and what it printed.
fn exec_in(task_id: &str, cmd: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("docker")
        .args(["exec", &format!("titus-{task_id}")])
        .args(cmd)
        .output()
        .expect("docker exec");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn ip_of(t: &pb::Task) -> String {
    t.task_context.get("containerIp").cloned().unwrap_or_else(|| panic!("task {} has no containerIp", t.id))
}

fn network_exists(name: &str) -> bool {
    std::process::Command::new("docker").args(["network", "inspect", name]).output().is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t270_containers_are_confined_by_default_and_jobs_cannot_reach_each_other() {
    ensure_test_image();
    let mut c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let a = c.start_agent_with("a270", 4.0, 4096, &["--pids-limit", "64"]);
    let client = c.client();
    let listen = ["sh", "-c", "while true; do nc -l -p 8080 </dev/null; done"];
    let web = client.create_job(job("web", container(&listen, 0.2, 32), service(2, 2))).await.unwrap();
    let other = client.create_job(job("other", container(&listen, 0.2, 32), service(1, 1))).await.unwrap();
    let web_tasks = wait_tasks(&client, &web, "Started", 2, SETTLE).await;
    let other_task = wait_tasks(&client, &other, "Started", 1, SETTLE).await.remove(0);
    let (w0, w1) = (&web_tasks[0], &web_tasks[1]);

    // A job's tasks reach each other; another job's are out of reach, both ways.
    let connect = |from: &pb::Task, to: &pb::Task| exec_in(&from.id, &["nc", "-w", "2", &ip_of(to), "8080"]);
    let (ok, out) = connect(w0, w1);
    assert!(ok, "a job's tasks must reach each other: {out}");
    assert!(!connect(w0, &other_task).0, "a task reached another job's container");
    assert!(!connect(&other_task, w1).0, "a task reached another job's container");

    // No raw sockets (arping needs one), no new privileges, a process limit, bounded logs.
    let (ok, out) = exec_in(&w0.id, &["arping", "-c", "1", "-w", "1", &ip_of(w1)]);
    assert!(!ok && out.contains("Operation not permitted"), "a raw socket was allowed: {out}");
    let inspect = std::process::Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{.HostConfig.SecurityOpt}} {{.HostConfig.CapDrop}} {{.HostConfig.PidsLimit}} {{.HostConfig.LogConfig.Config}}",
            &format!("titus-{}", w0.id),
        ])
        .output()
        .expect("docker inspect");
    let inspect = String::from_utf8_lossy(&inspect.stdout).to_string();
    for want in ["no-new-privileges:true", "NET_RAW", " 64 ", "max-size:10m"] {
        assert!(inspect.contains(want), "{want:?} missing from the container's settings: {inspect}");
    }

    // A fork bomb stops at the limit and fails by itself; the agent goes on launching.
    let bomb = client
        .create_job(job(
            "bomb",
            container(&["sh", "-c", "while true; do sleep 600 & done"], 0.2, 64),
            pb::job_descriptor::JobType::Batch(pb::BatchJobSpec { size: 1, ..Default::default() }),
        ))
        .await
        .unwrap();
    let bombed = wait_tasks(&client, &bomb, "Finished", 1, SETTLE).await.remove(0);
    let status = bombed.status.unwrap();
    assert_eq!(status.reason_code, "failed", "{status:?}");
    assert!(status.reason_message.contains("code 2"), "the shell could not fork past the limit: {status:?}");
    client.update_job_capacity(&web, None, Some(3), Some(3)).await.unwrap();
    wait_tasks(&client, &web, "Started", 3, SETTLE).await;

    // More capabilities only where the job's capacity group allows them.
    let mut raw = job("raw", container(&listen, 0.2, 32), service(2, 2));
    raw.container.as_mut().unwrap().capabilities = vec!["NET_RAW".into()];
    let refused = client.create_job(raw.clone()).await.unwrap_err().to_string();
    assert!(refused.contains("capability NET_RAW is not allowed by capacity group"), "{refused}");
    let group = titus_client::CapacityGroupSpec::new("netops", pb::Tier::Flex, 4.0, 4096, 10240, 1000, 4)
        .allow_capabilities(&["NET_RAW"]);
    client.create_capacity_group(group).await.unwrap();
    raw.capacity_group = "netops".into();
    let raw_id = client.create_job(raw).await.unwrap();
    let raw_tasks = wait_tasks(&client, &raw_id, "Started", 2, SETTLE).await;
    let (r0, r1) = (&raw_tasks[0], &raw_tasks[1]);
    let (ok, out) = exec_in(&r0.id, &["arping", "-c", "1", "-w", "2", &ip_of(r1)]);
    assert!(ok, "a job granted NET_RAW opens a raw socket: {out}");
    // With ICMP at hand (busybox's ping needs a raw socket): same job answers, another job does not.
    let (ok, out) = exec_in(&r0.id, &["ping", "-c", "1", "-W", "2", &ip_of(r1)]);
    assert!(ok, "a job's tasks ping each other: {out}");
    let (ok, out) = exec_in(&r0.id, &["ping", "-c", "1", "-W", "2", &ip_of(w0)]);
    assert!(!ok, "a task pinged another job's container: {out}");

    // A job's network goes with its last container on the agent.
    let network = format!("titus-{a}-{other}");
    assert!(network_exists(&network), "job {other} has no network {network}");
    client.kill_job(&other).await.unwrap();
    wait_until(SETTLE, "the killed job's network removed", || async { (!network_exists(&network)).then_some(()) })
        .await;
    assert!(network_exists(&format!("titus-{a}-{web}")), "a live job's network was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t280_a_crash_looping_service_backs_off() {
    ensure_test_image();
    let mut c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let _agent = c.start_agent("a280", 4.0, 4096);
    let client = c.client();
    let t0 = Instant::now();
    let job_id = client.create_job(job("crashes", container(&["false"], 0.1, 32), service(1, 1))).await.unwrap();
    // Its container exits 1 at once, every time. The first crash is replaced at once; the task
    // after the second waits out 10 s of back-off and carries the count.
    let third = wait_until(Duration::from_secs(60), "the replacement after two crashes in a row", || async {
        let tasks = tasks_in(&client, &job_id, "Accepted,Launched,StartInitiated,Started,Finished").await;
        tasks.into_iter().find(|t| t.task_context.get("crashLoopCount").map(String::as_str) == Some("2"))
    })
    .await;
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_secs(10), "two crashes in a row were replaced after {waited:?}, before 10 s");
    assert_eq!(third.resubmit_number, 2, "no other replacement was made meanwhile: {third:?}");
    eprintln!("third task created {waited:?} after the job");
    // The CLI's job list says so on the job's one row.
    let servers = c.servers();
    let out = std::process::Command::new(common::bin("titus"))
        .args(["job", "list", "--filter", "appName=crashes"])
        .env("TITUS_SERVERS", &servers)
        .env("TITUS_CLI_CONFIG", "/nonexistent/titus-config.toml")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.lines().count(), 2, "a header and one row: {table}");
    assert!(table.contains("crash-looping: 2 quick crashes in a row"), "{table}");
}

fn health_of(t: &pb::Task) -> &str {
    t.task_context.get("health").map_or("", String::as_str)
}

/// Health checks on the real daemon: a command check (Docker's HEALTHCHECK) and an HTTP check
/// (the agent's GET of busybox httpd in the container) each show as the task's `health`, follow
/// the container (a file removed turns it unhealthy), and a service task unhealthy past
/// `replace_after_sec` is replaced with reason `unhealthy` by a task that is healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t265_health_checks_show_and_an_unhealthy_service_task_is_replaced() {
    ensure_test_image();
    let mut c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let _agent = c.start_agent("a265", 4.0, 4096);
    let client = c.client();

    // Command check: healthy while /tmp/ready exists.
    let mut cmd = container(&["sh", "-c", "touch /tmp/ready; exec sleep 600"], 0.2, 64);
    cmd.health_check = Some(pb::HealthCheck {
        command: vec!["test".into(), "-f".into(), "/tmp/ready".into()],
        interval_sec: 1,
        timeout_sec: 1,
        retries: 1,
        replace_after_sec: 2,
        ..Default::default()
    });
    // HTTP check: healthy while httpd serves /ok.
    let mut http =
        container(&["sh", "-c", "mkdir -p /www && echo ok > /www/ok && exec httpd -f -p 8080 -h /www"], 0.2, 64);
    http.health_check = Some(pb::HealthCheck {
        http_path: "/ok".into(),
        http_port: 8080,
        interval_sec: 1,
        timeout_sec: 1,
        retries: 2,
        replace_after_sec: 2,
        ..Default::default()
    });
    for (app, container, file) in [("cmdcheck", cmd, "/tmp/ready"), ("httpcheck", http, "/www/ok")] {
        let job_id = client.create_job(job(app, container, service(1, 2))).await.unwrap();
        let first = wait_until(SETTLE, &format!("{app}: the task reports healthy"), || async {
            let t = tasks_in(&client, &job_id, "Started").await;
            t.into_iter().find(|t| health_of(t) == "healthy")
        })
        .await;
        assert!(first.task_context.contains_key("healthSince"), "{:?}", first.task_context);
        // The check starts failing: unhealthy, then replaced after 2 s.
        let (ok, out) = exec_in(&first.id, &["rm", file]);
        assert!(ok, "{out}");
        let replaced = wait_until(SETTLE, &format!("{app}: the unhealthy task is replaced"), || async {
            let t = client.find_task(&first.id).await.ok()?;
            (t.status.as_ref()?.state == pb::TaskState::TaskFinished as i32).then_some(t)
        })
        .await;
        let status = replaced.status.unwrap();
        assert_eq!(status.reason_code, "unhealthy", "{status:?}");
        let was_unhealthy = replaced.status_history.iter().any(|s| s.state == pb::TaskState::TaskKillInitiated as i32);
        assert!(was_unhealthy, "killed through KillInitiated");
        wait_until(SETTLE, &format!("{app}: its replacement is healthy"), || async {
            let t = tasks_in(&client, &job_id, "Started").await;
            t.into_iter().find(|t| t.id != first.id && health_of(t) == "healthy")
        })
        .await;
        client.kill_job(&job_id).await.unwrap();
    }
}

/// A rolling update that changes resources: the new tasks run with the new memory limit (in the
/// Docker daemon) and hold the new resources on their agent, the old ones hold theirs until they
/// go, and the agent's allocation is the sum of what each task holds at every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t267_a_rolling_update_changes_resources_each_task_holding_its_own() {
    ensure_test_image();
    let mut c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let agent = c.start_agent("a267", 1.0, 1024);
    let client = c.client();
    let job_id = client.create_job(job("resized", container(&["sleep", "600"], 0.2, 64), service(2, 3))).await.unwrap();
    let old: BTreeSet<String> =
        wait_tasks(&client, &job_id, "Started", 2, SETTLE).await.into_iter().map(|t| t.id).collect();
    let strategy = pb::RolloutStrategy { max_unavailable: 0, max_surge: 1, ..Default::default() };
    let bigger = container(&["sleep", "600"], 0.3, 96);
    assert_eq!(client.update_job_spec(&job_id, bigger, Some(strategy)).await.unwrap(), 1);
    // Every step: what the agent holds is what its live tasks hold, each at its own version's.
    let mixed = std::cell::Cell::new(false);
    wait_until(SETTLE, "the deployment succeeds", || async {
        let live = tasks_in(&client, &job_id, "Launched,StartInitiated,Started,KillInitiated").await;
        let held: u32 = live.iter().map(|t| t.resources.as_ref().map_or(0, |r| r.memory_mb)).sum();
        let allocated = client.get_agent(&agent).await.ok()?.allocated?.memory_mb;
        let live_again = tasks_in(&client, &job_id, "Launched,StartInitiated,Started,KillInitiated").await;
        let same: BTreeSet<&str> = live.iter().map(|t| t.id.as_str()).collect();
        if live_again.iter().map(|t| t.id.as_str()).collect::<BTreeSet<_>>() == same && live.len() == live_again.len() {
            assert_eq!(allocated, held, "the agent holds what its tasks hold: {live:?}");
        }
        let both = live.iter().any(|t| old.contains(&t.id)) && live.iter().any(|t| !old.contains(&t.id));
        mixed.set(mixed.get() || both);
        let d = client.get_deployments(&job_id).await.ok()?.deployments.into_iter().next()?;
        (d.state == "Succeeded").then_some(d)
    })
    .await;
    assert!(mixed.get(), "old and new tasks ran side by side");
    let new = wait_tasks(&client, &job_id, "Started", 2, SETTLE).await;
    for t in &new {
        assert!(!old.contains(&t.id), "{} is an old task", t.id);
        let r = t.resources.as_ref().expect("a placed task records what it holds");
        assert_eq!((r.cpu, r.memory_mb), (0.3, 96), "{t:?}");
        let container = containers_of(&agent).into_iter().find(|c| c.1 == t.id && c.2).expect("its running container");
        let out = std::process::Command::new("docker")
            .args(["inspect", "--format", "{{.HostConfig.Memory}}", &container.0])
            .output()
            .expect("docker inspect");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (96u64 * 1024 * 1024).to_string(), "{}", t.id);
    }
    let allocated = wait_until(SETTLE, "the agent holds the new tasks only", || async {
        let a = client.get_agent(&agent).await.ok()?.allocated?;
        (a.memory_mb == 192).then_some(a)
    })
    .await;
    assert!((allocated.cpu - 0.6).abs() < 1e-9, "{allocated:?}");
    client.kill_job(&job_id).await.unwrap();
}

/// Evictions through the API honor the job's disruption budget, judged on the containers running:
/// of 4 tasks under a 75% budget one may go; a second is refused naming the budget until the first
/// one's replacement runs; the evicted task finishes `evicted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t266_an_eviction_honors_the_job_s_disruption_budget() {
    ensure_test_image();
    let mut c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let _agent = c.start_agent("a266", 4.0, 4096);
    let client = c.client();
    let mut descriptor = job("budgeted", container(&["sleep", "600"], 0.1, 32), service(4, 8));
    descriptor.disruption_budget =
        Some(pb::DisruptionBudget { availability_percentage_limit: 75.0, ..Default::default() });
    let job_id = client.create_job(descriptor).await.unwrap();
    let started = wait_tasks(&client, &job_id, "Started", 4, SETTLE).await;
    client.evict_task(&started[0].id, "test").await.unwrap();
    match client.evict_task(&started[1].id, "test").await {
        Err(titus_client::Error::FailedPrecondition(why)) => {
            assert!(why.contains("keeps 3 of 4 tasks available"), "{why}")
        }
        other => panic!("a second eviction must be held back: {other:?}"),
    }
    let evicted = client.find_task(&started[0].id).await.unwrap();
    assert_eq!(evicted.status.as_ref().unwrap().reason_code, "evicted");
    // Its replacement running, the next may go.
    wait_until(SETTLE, "the second eviction once the replacement runs", || async {
        client.evict_task(&started[1].id, "test").await.ok()
    })
    .await;
    client.kill_job(&job_id).await.unwrap();
}

/// `DrainAgent` (`titus agent drain`): the drained agent gets no new task, a job under an 80% budget
/// moves one task at a time to the other agent (never fewer than 4 of its 5 Started, sampled every
/// 100 ms), and a job under a 100% budget stays, its tasks said to wait for that budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t247_an_agent_drain_moves_tasks_within_their_budgets_and_says_what_waits() {
    ensure_test_image();
    let mut c = Cluster::start(3, &[]);
    c.wait_for_leader(ELECTION).await;
    let old = c.start_agent("a247old", 4.0, 4096);
    let client = c.client();
    let budgeted = |app: &str, desired: u32, pct: f64| {
        let mut d = job(app, container(&["sleep", "600"], 0.1, 32), service(desired, 8));
        d.disruption_budget = Some(pb::DisruptionBudget { availability_percentage_limit: pct, ..Default::default() });
        d
    };
    let moving = client.create_job(budgeted("moving", 5, 80.0)).await.unwrap();
    let pinned = client.create_job(budgeted("pinned", 2, 100.0)).await.unwrap();
    wait_tasks(&client, &moving, "Started", 5, SETTLE).await;
    wait_tasks(&client, &pinned, "Started", 2, SETTLE).await;
    let new = c.start_agent("a247new", 4.0, 4096);
    wait_until(SETTLE, "the new agent registered", || async { client.get_agent(&new).await.ok() }).await;

    let status = client.drain_agent(&old, true).await.unwrap();
    assert!(status.draining && status.tasks.len() == 7, "{status:?}");
    assert!(client.get_agent(&old).await.unwrap().draining);
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = {
        let (client, moving) = (client.clone(), moving.clone());
        tokio::spawn(async move {
            let mut fewest = usize::MAX;
            loop {
                fewest = fewest.min(tasks_in(&client, &moving, "Started").await.len());
                tokio::select! {
                    _ = &mut stop_rx => return fewest,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        })
    };
    let left = wait_until(Duration::from_secs(90), "the 80% job moved off the drained agent", || async {
        let s = client.drain_status(&old).await.ok()?;
        let started = tasks_in(&client, &moving, "Started").await;
        let all_new = started.len() == 5 && started.iter().all(|t| t.task_context.get("agent") == Some(&new));
        all_new.then_some(s)
    })
    .await;
    let _ = stop_tx.send(());
    let fewest = sampler.await.unwrap();
    assert!(fewest >= 4, "the 80% job went down to {fewest} Started tasks");
    // The 100% job stays, each task saying why.
    let held: Vec<&pb::DrainingTask> = left.tasks.iter().filter(|t| t.job_id == pinned).collect();
    assert_eq!(held.len(), 2, "{left:?}");
    assert!(held.iter().all(|t| t.waiting.contains("keeps 2 of 2 tasks available")), "{held:?}");
    let finished = tasks_in(&client, &moving, "Finished").await;
    assert!(finished.iter().all(|t| t.status.as_ref().unwrap().reason_code == "evicted"), "{finished:?}");
    // Back in service, the agent takes tasks again.
    let status = client.drain_agent(&old, false).await.unwrap();
    assert!(!status.draining && status.tasks.iter().all(|t| t.waiting.is_empty()), "{status:?}");
}
