//! The scheduler at scale on a real cluster: 3 replicas, 200 simulated agents in one `titus-agent
//! --simulate` process (the real agent protocol, no Docker), 10,000 placeable tasks with
//! constraints submitted through the SDK, plus tasks that cannot be placed and must say why.

#[path = "../../control-plane/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::{wait_until, Cluster};
use titus_client::proto as pb;
use titus_client::{Client, JobBuilder};

const AGENTS: usize = 200;
const AGENT_CPU: f64 = 16.0;
const AGENT_MEMORY_MB: u32 = 65_536;
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// Every task of a job, all pages.
/// Every task of the job, page by page; a read that fails (a replica busy past its deadline on a
/// loaded machine) is asked again, from the first page, for up to a minute — an error is never
/// read as "no tasks".
async fn all_tasks(client: &Client, job_id: &str) -> Vec<pb::Task> {
    let deadline = Instant::now() + Duration::from_secs(60);
    'again: loop {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = match client.find_tasks(&[("jobIds", job_id)], 1000, &cursor).await {
                Ok(page) => page,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("find_tasks {job_id}: {e}; asking again");
                    continue 'again;
                }
                Err(e) => panic!("find_tasks {job_id}: {e}"),
            };
            out.extend(page.items);
            match page.pagination.filter(|p| p.has_more) {
                Some(p) => cursor = p.cursor,
                None => return out,
            }
        }
    }
}

/// A batch job of `n` tasks (disk and network small enough that cpu and memory decide where they
/// fit); simulated agents never run the image.
fn batch(name: &str, n: u32) -> JobBuilder {
    JobBuilder::batch(name, "titus/busybox:latest", n).owner("scale@example.com").disk_mb(10).network_mbps(1)
}

fn state_of(t: &pb::Task) -> i32 {
    t.status.as_ref().map(|s| s.state).unwrap_or_default()
}

fn ctx<'a>(t: &'a pb::Task, key: &str) -> &'a str {
    t.task_context.get(key).map(String::as_str).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t250_ten_thousand_tasks_with_constraints_land_on_simulated_agents() {
    let mut cluster = Cluster::start(3, &[]);
    let client = cluster.client();
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    let base = cluster.start_agent_with(
        "sim",
        AGENT_CPU,
        AGENT_MEMORY_MB,
        &["--simulate", &AGENTS.to_string(), "--simulate-zones", &ZONES.join(",")],
    );
    wait_until(Duration::from_secs(60), "every simulated agent registered", || async {
        let n = client.find_agents().await.map(|a| a.iter().filter(|a| a.id.starts_with(&base)).count()).unwrap_or(0);
        (n == AGENTS).then_some(())
    })
    .await;

    // (name, tasks, hard constraints): 9,800 placeable tasks in 10 jobs, plus a uniqueHost job of 250 on
    // 200 agents (200 placeable, 50 not) and one task bigger than any agent.
    let mut jobs: Vec<(String, u32, Vec<(&str, &str)>)> = Vec::new();
    for i in 0..6 {
        jobs.push((format!("balanced{i}"), 1_000, vec![("zoneBalance", "true")]));
    }
    for i in 0..3 {
        jobs.push((format!("plain{i}"), 1_000, vec![]));
    }
    jobs.push(("inzoneb".into(), 800, vec![("availabilityZone", "zone-b")]));
    let t0 = Instant::now();
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    // The uniqueHost job first, so that bin-packing has not filled any agent yet.
    let unique = batch("unique", 250).cpu(0.1).memory_mb(256).hard_constraint("uniqueHost", "true").build();
    let unique_id = client.create_job(unique).await.expect("create the uniqueHost job");
    wait_until(Duration::from_secs(120), "200 uniqueHost tasks placed", || async {
        let n = all_tasks(&client, &unique_id).await.iter().filter(|t| !ctx(t, "agent").is_empty()).count();
        eprintln!("{:>5.1} s: {n} uniqueHost tasks placed", t0.elapsed().as_secs_f64());
        (n == AGENTS).then_some(())
    })
    .await;
    ids.insert("unique".into(), unique_id);
    for (name, n, hard) in &jobs {
        let mut b = batch(name, *n).cpu(0.1).memory_mb(256).retries(0);
        for (k, v) in hard {
            b = b.hard_constraint(k, v);
        }
        ids.insert(name.clone(), client.create_job(b.build()).await.expect("create job"));
    }
    let big = client
        .create_job(batch("toobig", 1).cpu(1.0).memory_mb(100_000).build())
        .await
        .expect("create the job too big for any agent");
    let placeable: u32 = jobs.iter().map(|(_, n, _)| *n).sum::<u32>() + AGENTS as u32;
    assert_eq!(placeable, 10_000);

    let started = pb::TaskState::TaskStarted as i32;
    // Polled every 2 s: reading 10,000 tasks is load of its own.
    let deadline = Instant::now() + Duration::from_secs(420);
    let tasks: HashMap<String, Vec<pb::Task>> = loop {
        let mut all = HashMap::new();
        let (mut n, mut total, mut placed) = (0, 0, 0);
        for (name, id) in &ids {
            let t = all_tasks(&client, id).await;
            n += t.iter().filter(|t| state_of(t) == started).count();
            placed += t.iter().filter(|t| !ctx(t, "agent").is_empty()).count();
            total += t.len();
            all.insert(name.clone(), t);
        }
        eprintln!("{:>5.1} s: {total} tasks, {placed} placed, {n} Started", t0.elapsed().as_secs_f64());
        if n == placeable as usize {
            break all;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {placeable} tasks Started ({n} are)");
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let elapsed = t0.elapsed();
    println!("10,000 tasks submitted → Started on {AGENTS} simulated agents in {:.1} s", elapsed.as_secs_f64());

    // No agent holds more than it has.
    let mut per_agent: HashMap<&str, (f64, u64)> = HashMap::new();
    for t in tasks.values().flatten().filter(|t| state_of(t) == started) {
        let a = per_agent.entry(ctx(t, "agent")).or_default();
        a.0 += 0.1;
        a.1 += 256;
    }
    assert!(per_agent.keys().all(|a| a.starts_with(&base)), "placed on an unknown agent");
    for (agent, (cpu, mem)) in &per_agent {
        assert!(
            *cpu <= AGENT_CPU + 1e-6 && *mem <= AGENT_MEMORY_MB as u64,
            "agent {agent} over-committed: {cpu} cpus, {mem} MB"
        );
    }

    // zoneBalance: every balanced job within one task across the three zones.
    for i in 0..6 {
        let mut zones: BTreeMap<&str, usize> = ZONES.iter().map(|z| (*z, 0)).collect();
        for t in &tasks[&format!("balanced{i}")] {
            *zones.get_mut(ctx(t, "zone")).expect("a known zone") += 1;
        }
        let (max, min) = (zones.values().max().unwrap(), zones.values().min().unwrap());
        assert!(max - min <= 1, "balanced{i} is not balanced: {zones:?}");
    }

    // availabilityZone: all in zone-b.
    assert!(tasks["inzoneb"].iter().all(|t| ctx(t, "zone") == "zone-b"), "a zone-b task landed elsewhere");

    // uniqueHost: 200 on distinct agents, 50 waiting and saying why.
    let unique = &tasks["unique"];
    let hosts: BTreeSet<&str> = unique.iter().filter(|t| state_of(t) == started).map(|t| ctx(t, "agent")).collect();
    assert_eq!(hosts.len(), AGENTS, "uniqueHost: {} tasks Started on {} agents", AGENTS, hosts.len());
    let waiting: Vec<&pb::Task> = unique.iter().filter(|t| state_of(t) == pb::TaskState::TaskAccepted as i32).collect();
    assert_eq!(waiting.len(), 50);
    let why = client.scheduling_result(&waiting[0].id).await.expect("scheduling result");
    assert_eq!(why.state(), pb::scheduling_result::State::Waiting);
    assert_eq!(why.reason, "uniqueHost", "{why:?}");
    assert!(why.message.contains(&format!("{AGENTS} of {AGENTS} eligible agents")), "{}", why.message);

    // Too big for any agent: waiting on memory, with the numbers.
    let big_task = all_tasks(&client, &big).await.pop().expect("the big job's task");
    let why = client.scheduling_result(&big_task.id).await.expect("scheduling result");
    assert_eq!(why.reason, "insufficient memory", "{why:?}");
    let most_free = format!("of {AGENTS} eligible agents is");
    assert!(why.message.contains("100000 MB") && why.message.contains(&most_free), "{}", why.message);

    // A placed task says where, through any replica (the SDK follows the leader).
    let placed = &tasks["plain0"][0];
    for id in cluster.running() {
        let r = cluster.client_of(id).scheduling_result(&placed.id).await.expect("scheduling result");
        assert_eq!(r.state(), pb::scheduling_result::State::Placed);
        assert_eq!(r.agent_id, ctx(placed, "agent"));
    }
}
