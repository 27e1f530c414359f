//! Each fault kind against a real cluster — replicas and agents as processes in their own network
//! namespaces (a `Lab`), the real Docker daemon, moto behind the fault proxy — run through the
//! `titus-chaos` binary: the fault is seen to happen, then seen to be undone.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use titus_chaos::deployment::Process;
use titus_chaos::lab::{Lab, LabSpec};
use titus_chaos::net;
use titus_client::proto::TaskState;
use titus_client::{Client, JobBuilder};

#[path = "../../control-plane/tests/common/mod.rs"]
mod common;

use common::wait_until as wait_for;

/// `titus-chaos` against a deployment file.
fn chaos_with(deployment: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_titus-chaos"));
    cmd.arg("--deployment").arg(deployment);
    cmd
}

fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    exe.parent().and_then(|d| d.parent()).expect("target dir").to_path_buf()
}

struct Env {
    lab: Lab,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn start(replicas: u32, agents: u32) -> Env {
        Env::start_with(replicas, agents, vec![]).await
    }

    async fn start_with(replicas: u32, agents: u32, replica_args: Vec<String>) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        if agents > 0 {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/build-test-image.sh");
            assert!(Command::new("bash").arg(script).status().expect("build-test-image").success());
        }
        let spec = LabSpec { replicas, agents, bin_dir: bin_dir(), replica_args, agent_args: vec![] };
        let lab = Lab::up(&spec, dir.path()).expect("lab up");
        lab.wait_for_leader(Duration::from_secs(60)).await.expect("a leader");
        Env { lab, _dir: dir }
    }

    fn client(&self) -> Client {
        self.lab.deployment.client().expect("client")
    }

    fn chaos(&self) -> Command {
        chaos_with(&self.lab.deployment_file())
    }

    /// Runs `titus-chaos experiment` with another deployment file; its exit status and JSON report.
    fn experiment(&self, deployment: &Path, plan: &Path) -> (std::process::ExitStatus, serde_json::Value) {
        let report = self.lab.dir.join("experiment-report.json");
        let out = chaos_with(deployment)
            .args(["experiment", plan.to_str().unwrap(), "--report", report.to_str().unwrap()])
            .output()
            .expect("run titus-chaos experiment");
        eprintln!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let report = serde_json::from_slice(&std::fs::read(&report).expect("the report")).expect("a JSON report");
        (out.status, report)
    }

    /// Runs titus-chaos to its end.
    fn run(&self, args: &[&str]) -> Output {
        let out = self.chaos().args(args).output().expect("run titus-chaos");
        eprintln!(
            "titus-chaos {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts titus-chaos and leaves it running.
    fn spawn(&self, args: &[&str]) -> Child {
        self.chaos().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn titus-chaos")
    }

    fn replica(&self, id: u64) -> &Process {
        &self.lab.deployment.replicas.iter().find(|r| r.id == id).expect("replica").process
    }

    async fn leader(&self) -> Option<u64> {
        let c = self.client();
        for r in &self.lab.deployment.replicas {
            if let Ok(s) = c.cluster_status_of(&r.api).await {
                if s.leader_id != 0 {
                    return Some(s.leader_id);
                }
            }
        }
        None
    }

    /// The leader as the replicas other than `not` see it.
    async fn leader_seen_by_others(&self, not: u64) -> Option<u64> {
        let c = self.client();
        for r in self.lab.deployment.replicas.iter().filter(|r| r.id != not) {
            if let Ok(s) = c.cluster_status_of(&r.api).await {
                if s.leader_id != 0 && s.leader_id != not {
                    return Some(s.leader_id);
                }
            }
        }
        None
    }

    fn no_rules_anywhere(&self) -> bool {
        self.lab.deployment.replicas.iter().all(|r| net::dropped(&r.process).unwrap().is_empty())
            && self.lab.deployment.agents.iter().all(|a| net::dropped(&a.process).unwrap().is_empty())
    }

    fn journal_empty(&self) -> bool {
        let j = titus_chaos::journal::Journal::open(&self.lab.dir.join("chaos-state.json")).unwrap();
        j.active.is_empty()
    }
}

fn finish(child: Child, within: Duration) -> (bool, String) {
    let deadline = Instant::now() + within;
    let mut child = child;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            eprintln!("titus-chaos ended {status}:\n{text}");
            return (status.success(), text);
        }
        assert!(Instant::now() < deadline, "titus-chaos still running after {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t600_kill_leader_then_restart() {
    let env = Env::start(3, 0).await;
    let leader = env.leader().await.expect("leader");
    let old_pid = env.replica(leader).pid().expect("leader pid");
    let term = env.client().cluster_status().await.expect("status").term;

    let child = env.spawn(&["kill", "--target", "leader", "--restart-after", "3s"]);
    // The fault happened: the old leader's process is gone and the others elected a new one.
    wait_for(Duration::from_secs(10), "the leader's process gone", || async {
        (!titus_chaos::deployment::pid_alive(old_pid)).then_some(())
    })
    .await;
    let new_leader = wait_for(Duration::from_secs(15), "a new leader", || env.leader_seen_by_others(leader)).await;
    assert_ne!(new_leader, leader);
    let (ok, out) = finish(child, Duration::from_secs(30));
    assert!(ok && out.contains("undone: kill leader"), "{out}");

    // Undone: the replica runs again (a new pid) and catches up with the leader.
    let new_pid = env.replica(leader).pid().expect("restarted");
    assert_ne!(new_pid, old_pid);
    let c = env.client();
    let api = env.lab.deployment.replica(leader).unwrap().api.clone();
    wait_for(Duration::from_secs(30), "the restarted replica to catch up", || {
        let (c, api) = (c.clone(), api.clone());
        async move {
            let leader_status = c.cluster_status().await.ok()?;
            let mine = c.cluster_status_of(&api).await.ok()?;
            (leader_status.term > term && mine.last_applied_index >= leader_status.last_applied_index).then_some(())
        }
    })
    .await;
    assert!(env.journal_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t610_pause_leader_then_resume() {
    let env = Env::start(3, 0).await;
    let leader = env.leader().await.expect("leader");
    let child = env.spawn(&["pause", "--target", "leader", "--duration", "8s"]);
    wait_for(Duration::from_secs(10), "the leader stopped", || async { env.replica(leader).stopped().then_some(()) })
        .await;
    let other =
        wait_for(Duration::from_secs(15), "a leader among the others", || env.leader_seen_by_others(leader)).await;
    assert_ne!(other, leader);
    let (ok, out) = finish(child, Duration::from_secs(30));
    assert!(ok, "{out}");
    assert!(!env.replica(leader).stopped(), "resumed");
    let api = env.lab.deployment.replica(leader).unwrap().api.clone();
    let c = env.client();
    wait_for(Duration::from_secs(20), "the resumed replica follows the new leader", || {
        let (c, api) = (c.clone(), api.clone());
        async move { c.cluster_status_of(&api).await.ok().filter(|s| s.leader_id != 0 && s.leader_id != leader).map(|_| ()) }
    })
    .await;
    assert!(env.journal_empty());
}

/// Every pair's reachability, from each replica's namespace to the other's peer port.
fn reachability(env: &Env) -> Vec<(u64, u64, bool)> {
    let d = &env.lab.deployment;
    let mut out = Vec::new();
    for a in &d.replicas {
        for b in d.replicas.iter().filter(|b| b.id != a.id) {
            out.push((a.id, b.id, Lab::can_connect(&a.process, &format!("{}:7000", b.ip))));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t620_partitions_cut_exactly_the_grudge_and_heal() {
    let env = Env::start(5, 0).await;
    let d = env.lab.deployment.clone();
    let ip_of = |id: u64| d.replica(id).unwrap().ip.clone();
    for topology in ["isolate-leader", "halves", "ring", "bridge"] {
        let leader = env.leader().await;
        let child = env.spawn(&["partition", "--topology", topology, "--duration", "12s", "--seed", "3"]);
        // The tool writes one namespace after another: wait until the rules stop changing.
        let read = || -> Vec<(u64, BTreeSet<String>)> {
            d.replicas.iter().map(|r| (r.id, net::dropped(&r.process).unwrap())).collect()
        };
        let mut last = read();
        let rules = wait_for(Duration::from_secs(10), "partition rules in place", || {
            std::thread::sleep(Duration::from_millis(300));
            let now = read();
            let stable = now == last && now.iter().any(|(_, r)| !r.is_empty());
            last = now.clone();
            async move { stable.then_some(now) }
        })
        .await;
        let drops = |a: u64, b: u64| rules.iter().any(|(x, r)| *x == a && r.contains(&ip_of(b)));
        for (a, b, reachable) in reachability(&env) {
            assert_eq!(
                reachable,
                !(drops(a, b) || drops(b, a)),
                "{topology}: {a}→{b} reachable={reachable}, rules {rules:?}"
            );
        }
        let hears = |a: u64| 1 + d.replicas.iter().filter(|b| b.id != a && !drops(a, b.id)).count();
        match topology {
            "isolate-leader" => {
                let leader = leader.expect("leader before");
                assert_eq!(hears(leader), 1, "{rules:?}");
                assert!(d.replicas.iter().filter(|r| r.id != leader).all(|r| hears(r.id) == 4));
                let new = wait_for(Duration::from_secs(15), "the majority elects a leader", || {
                    env.leader_seen_by_others(leader)
                })
                .await;
                assert_ne!(new, leader);
            }
            "halves" => assert_eq!(d.replicas.iter().filter(|r| hears(r.id) >= 3).count(), 3, "{rules:?}"),
            "ring" => assert!(d.replicas.iter().all(|r| hears(r.id) == 3), "{rules:?}"),
            "bridge" => {
                assert_eq!(d.replicas.iter().filter(|r| hears(r.id) == 5).count(), 1, "{rules:?}");
                assert!(d.replicas.iter().all(|r| hears(r.id) >= 3), "{rules:?}");
            }
            _ => unreachable!(),
        }
        let (ok, out) = finish(child, Duration::from_secs(30));
        assert!(ok, "{topology}: {out}");
        assert!(env.no_rules_anywhere(), "{topology}: healed");
        assert!(reachability(&env).iter().all(|(_, _, r)| *r), "{topology}: everyone reaches everyone again");
        wait_for(Duration::from_secs(20), "a leader after healing", || env.leader()).await;
    }
    assert!(env.journal_empty());
}

/// A service of two small containers that sleep for an hour.
fn two_sleepers(app: &str) -> titus_client::proto::JobDescriptor {
    JobBuilder::service(app, "titus/busybox:latest", 0, 2, 4)
        .owner("chaos@titus.local")
        .cpu(0.1)
        .memory_mb(32)
        .command(["sleep", "3600"])
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t630_agent_faults() {
    let env = Env::start(3, 1).await;
    let agent = env.lab.deployment.agents[0].clone();
    let c = env.client();
    let job = c.create_job(two_sleepers("chaos-svc")).await.expect("create job");
    let started = |c: Client, job: String| async move {
        let tasks = c.find_tasks(&[("jobIds", &job), ("taskStates", "Started")], 100, "").await.ok()?;
        let ids: BTreeSet<String> = tasks.items.into_iter().map(|t| t.id).collect();
        (ids.len() == 2).then_some(ids)
    };
    let before = wait_for(Duration::from_secs(60), "2 Started tasks", || started(c.clone(), job.clone())).await;
    let containers = || -> BTreeSet<String> {
        let out = Command::new("docker")
            .args(["ps", "-q", "--no-trunc", "--filter", &format!("label=titus.agent.id={}", agent.id)])
            .output()
            .expect("docker ps");
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect()
    };
    let connected = |want: bool| {
        let (c, id) = (c.clone(), agent.id.clone());
        async move { c.get_agent(&id).await.ok().filter(|a| a.connected == want).map(|_| ()) }
    };

    // Cut off: the agent's namespace reaches no replica; afterwards it does, and it re-attached
    // without restarting a container.
    let running = containers();
    assert_eq!(running.len(), 2);
    let child = env.spawn(&["agent-isolate", "--agent", &agent.id, "--duration", "6s"]);
    wait_for(Duration::from_secs(10), "the agent cut off", || async {
        (!Lab::can_connect(&agent.process, &env.lab.deployment.replicas[0].api)).then_some(())
    })
    .await;
    assert!(env.lab.deployment.replicas.iter().all(|r| !Lab::can_connect(&agent.process, &r.api)));
    let (ok, out) = finish(child, Duration::from_secs(30));
    assert!(ok, "{out}");
    assert!(env.lab.deployment.replicas.iter().all(|r| Lab::can_connect(&agent.process, &r.api)), "healed");
    wait_for(Duration::from_secs(30), "the agent attached again", || connected(true)).await;
    assert_eq!(containers(), running, "no container restarted");

    // Killed and restarted: a new agent process, the same containers.
    let old_pid = agent.process.pid().expect("agent pid");
    let out = env.run(&["agent-kill", "--agent", &agent.id, "--restart-after", "1s"]);
    let (ok, out) = (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned());
    assert!(ok && out.contains(&format!("kill agent {}", agent.id)), "{out}");
    assert_ne!(agent.process.pid().expect("restarted"), old_pid);
    wait_for(Duration::from_secs(30), "the restarted agent attached", || connected(true)).await;
    assert_eq!(containers(), running, "no container restarted");

    // A container killed behind the agent's back: its task ends and the job replaces it.
    let out = env.run(&["container-kill", "--agent", &agent.id, "--count", "1"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let killed = before.iter().find(|t| text.contains(t.as_str())).expect("the killed task is named").clone();
    wait_for(Duration::from_secs(30), "the killed task Finished", || {
        let (c, t) = (c.clone(), killed.clone());
        async move {
            c.find_task(&t)
                .await
                .ok()
                .filter(|t| t.status.as_ref().map(|s| s.state) == Some(TaskState::TaskFinished as i32))
                .map(|_| ())
        }
    })
    .await;
    let after = wait_for(Duration::from_secs(60), "a replacement Started", || started(c.clone(), job.clone())).await;
    assert!(!after.contains(&killed));
    c.kill_job(&job).await.expect("kill job");
    assert!(env.journal_empty());
}

/// A leader cut off from the other replicas, but not from its agent, cannot confirm its
/// leadership: it stops its duties and drops the agent's stream, so the agent attaches to the
/// leader the majority elected — which kills a task on it while the partition still holds —
/// and the other container never restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t645_an_isolated_leader_lets_its_agent_go_to_the_new_one() {
    let env = Env::start(3, 1).await;
    let agent = env.lab.deployment.agents[0].clone();
    let c = env.client();
    let job = c.create_job(two_sleepers("chaos-lease")).await.expect("create job");
    wait_for(Duration::from_secs(60), "2 containers running", || async {
        (common::containers_of(&agent.id).iter().filter(|c| c.2).count() == 2).then_some(())
    })
    .await;
    let running = common::containers_of(&agent.id);
    let old = env.leader().await.expect("leader");

    let child = env.spawn(&["partition", "--topology", "isolate-leader", "--duration", "30s", "--seed", "1"]);
    let new =
        wait_for(Duration::from_secs(20), "the majority elects a leader", || env.leader_seen_by_others(old)).await;
    assert_ne!(new, old);
    let options = titus_client::ClientOptions {
        deadline: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let majority = env.lab.deployment.replicas.iter().filter(|r| r.id != old).map(|r| r.api.clone());
    let nc = Client::with_options(majority, options).expect("client of the majority");
    wait_for(Duration::from_secs(20), "the agent attached to the new leader", || {
        let (nc, id) = (nc.clone(), agent.id.clone());
        async move { nc.get_agent(&id).await.ok().filter(|a| a.connected).map(|_| ()) }
    })
    .await;
    // Still partitioned: the old leader has not heard of the new one, and yet let the agent go.
    assert!(!env.no_rules_anywhere(), "the partition still holds");
    let victim = running[0].1.clone();
    nc.kill_task(&victim, false, false).await.expect("kill a task through the majority");
    wait_for(Duration::from_secs(20), "the killed task's container stopped", || async {
        common::containers_of(&agent.id).iter().all(|c| c.1 != victim || !c.2).then_some(())
    })
    .await;
    assert!(!env.no_rules_anywhere(), "the kill went through while the partition held");
    let other = &running[1];
    let now = common::containers_of(&agent.id);
    assert!(
        now.iter().any(|c| c.0 == other.0 && c.2 && c.3 == other.3),
        "the other container never restarted: {now:?}"
    );
    let (ok, out) = finish(child, Duration::from_secs(60));
    assert!(ok, "{out}");
    let log = std::fs::read_to_string(env.replica(old).log.as_ref().expect("the old leader's log")).unwrap_or_default();
    assert!(log.contains("no majority confirmed this leader"), "the old leader says why it stopped its duties");
    c.kill_job(&job).await.expect("kill job");
    assert!(env.journal_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t650_clock_skew_on_a_replica() {
    let env = Env::start(3, 0).await;
    let admin = env.lab.deployment.replica(2).unwrap().admin.clone().expect("admin");
    let skew_of = |admin: String| async move {
        let out =
            Command::new("curl").args(["-sI", "--max-time", "2", &format!("http://{admin}/healthz")]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let date = text.lines().find_map(|l| l.strip_prefix("Date: "))?.trim().to_string();
        let theirs = Command::new("date").args(["-u", "-d", &date, "+%s"]).output().ok()?;
        let theirs: i64 = String::from_utf8_lossy(&theirs.stdout).trim().parse().ok()?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64;
        Some(theirs - now)
    };
    let child = env.spawn(&["skew", "--target", "2", "--offset", "+1h", "--duration", "10s"]);
    wait_for(Duration::from_secs(20), "replica 2's clock an hour ahead", || async {
        skew_of(admin.clone()).await.filter(|s| (3590..=3610).contains(s))
    })
    .await;
    // The cluster keeps working with one replica's clock off.
    env.client()
        .create_job(
            JobBuilder::batch("skewed", "titus/busybox:latest", 1)
                .owner("chaos@titus.local")
                .cpu(0.1)
                .memory_mb(16)
                .build(),
        )
        .await
        .expect("create job");
    let (ok, out) = finish(child, Duration::from_secs(40));
    assert!(ok, "{out}");
    wait_for(Duration::from_secs(20), "replica 2's real clock back", || async {
        skew_of(admin.clone()).await.filter(|s| s.abs() <= 5)
    })
    .await;
    assert!(env.journal_empty());
}

fn write_plan(env: &Env, name: &str, text: &str) -> PathBuf {
    let path = env.lab.dir.join(name);
    std::fs::write(&path, text).expect("plan");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t660_plan_crash_heal_interrupt_and_blast_radius() {
    let env = Env::start(3, 0).await;
    let pids: Vec<u32> = (1..=3).map(|id| env.replica(id).pid().unwrap()).collect();
    // A majority is refused without --allow-majority; nothing is touched.
    let out = env.run(&["kill", "--target", "majority"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("blast radius"), "{:?}", out);
    assert_eq!((1..=3).map(|id| env.replica(id).pid().unwrap()).collect::<Vec<_>>(), pids);

    let plan = write_plan(
        &env,
        "plan.yaml",
        "name: long faults\nsteps:\n  - at: 0s\n    kind: partition\n    topology: bridge\n    duration: 2m\n  - at: 500ms\n    kind: pause\n    target: 1\n    duration: 2m\n",
    );
    let applied = || async {
        (env.replica(1).stopped()
            && env.lab.deployment.replicas.iter().any(|r| !net::dropped(&r.process).unwrap().is_empty()))
        .then_some(())
    };

    // A run killed with SIGKILL leaves its faults; `heal` undoes them from the journal.
    let mut child = env.spawn(&["run", plan.to_str().unwrap()]);
    wait_for(Duration::from_secs(15), "both faults applied", applied).await;
    // A second run while this one holds the journal is refused (it could not count this run's faults
    // against the blast radius); `status` still reads it.
    let out = env.run(&["kill", "--target", "follower"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("another titus-chaos run"),
        "{out:?}"
    );
    let out = env.run(&["status"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("active fault"), "{out:?}");
    child.kill().expect("kill titus-chaos");
    let _ = child.wait();
    assert!(env.replica(1).stopped() && !env.no_rules_anywhere(), "faults outlive the crashed run");
    assert!(!env.journal_empty());
    let out = env.run(&["heal"]);
    assert!(out.status.success());
    assert!(!env.replica(1).stopped() && env.no_rules_anywhere() && env.journal_empty());

    // Ctrl-C undoes everything before exiting.
    let child = env.spawn(&["run", plan.to_str().unwrap()]);
    wait_for(Duration::from_secs(15), "both faults applied", applied).await;
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let (_, out) = finish(child, Duration::from_secs(20));
    assert!(out.contains("interrupted"), "{out}");
    assert!(!env.replica(1).stopped() && env.no_rules_anywhere() && env.journal_empty());
    wait_for(Duration::from_secs(20), "a leader after healing", || env.leader()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t670_chaos_monkey() {
    let env = Env::start(3, 1).await;
    let c = env.client();
    let svc = |app: &str| {
        JobBuilder::service(app, "titus/busybox:latest", 0, 2, 4)
            .owner("chaos@titus.local")
            .cpu(0.1)
            .memory_mb(32)
            .command(["sleep", "3600"])
    };
    let opted = c.create_job(svc("monkey-food").attribute("chaos.monkey.enabled", "true").build()).await.unwrap();
    let spared = c.create_job(svc("monkey-spared").build()).await.unwrap();
    let started = |job: String| {
        let c = c.clone();
        async move {
            let t = c.find_tasks(&[("jobIds", &job), ("taskStates", "Started")], 100, "").await.ok()?;
            (t.items.len() == 2).then(|| t.items.into_iter().map(|t| t.id).collect::<BTreeSet<_>>())
        }
    };
    let opted_tasks = wait_for(Duration::from_secs(60), "opted-in tasks", || started(opted.clone())).await;
    let spared_tasks = wait_for(Duration::from_secs(60), "other tasks", || started(spared.clone())).await;
    let state = env.lab.dir.join("monkey-state.json");
    let log = env.lab.dir.join("monkey.log");
    let monkey = |extra: &[&str]| {
        let mut args =
            vec!["monkey", "--schedule", "always", "--kills-per-hour", "100000", "--tick", "100ms", "--run-for", "1s"];
        args.extend_from_slice(&["--state-file", state.to_str().unwrap(), "--log-file", log.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let out = env.run(&args);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
            .collect::<Vec<_>>()
    };

    // Dry run: says what it would do, does nothing.
    let actions = monkey(&["--dry-run"]);
    assert!(
        !actions.is_empty() && actions.iter().all(|a| a["action"] == "would-kill" && a["job"] == opted.as_str()),
        "{actions:?}"
    );
    assert_eq!(started(opted.clone()).await, Some(opted_tasks.clone()), "nothing killed in a dry run");

    // For real: one task of the opted-in job (the daily limit), none of the other.
    let actions = monkey(&["--max-per-job-per-day", "1"]);
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert_eq!(actions[0]["action"], "kill");
    assert_eq!(actions[0]["job"], opted.as_str());
    let victim = actions[0]["task"].as_str().unwrap().to_string();
    assert!(opted_tasks.contains(&victim));
    let killed = c.find_task(&victim).await.unwrap();
    assert!(killed.status.unwrap().state >= TaskState::TaskKillInitiated as i32);
    assert_eq!(started(spared.clone()).await, Some(spared_tasks), "the other job is untouched");
    // The daily count survives the monkey's restart.
    assert!(monkey(&["--max-per-job-per-day", "1"]).is_empty());
    // Outside its schedule it does nothing.
    let today = Command::new("date").args(["-u", "+%a"]).output().unwrap();
    let other_day = if String::from_utf8_lossy(&today.stdout).trim() == "Mon" { "Tue" } else { "Mon" };
    let window = format!("{other_day} 00:00-24:00");
    std::fs::remove_file(&state).unwrap();
    let out = env.run(&[
        "monkey",
        "--schedule",
        &window,
        "--kills-per-hour",
        "100000",
        "--tick",
        "100ms",
        "--run-for",
        "1s",
        "--state-file",
        state.to_str().unwrap(),
    ]);
    assert!(out.status.success() && out.stdout.is_empty());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.lines().count() >= 2 && logged.contains(&victim), "every action is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t680_experiments_pass_and_fail() {
    let env = Env::start(3, 0).await;
    let steady = "steady_state:\n  before: 2s\n  probe_interval: 100ms\n  max_p99: 5s\n  window: 5\n";
    let plan = write_plan(&env, "pass.yaml", &format!("name: follower kill\n{steady}  recovery: 30s\nsteps:\n  - at: 500ms\n    kind: kill\n    target: follower\n    restart_after: 2s\n"));
    let (status, report) = env.experiment(&env.lab.deployment_file(), &plan);
    assert!(status.success(), "passes");
    assert_eq!(report["verdict"], "pass");
    assert!(report["phases"][0]["probes"].as_u64().unwrap() >= 5);
    assert!(report["phases"][1]["probes"].as_u64().unwrap() >= 1);

    // A deployment whose replicas cannot be restarted: killing a majority leaves the cluster
    // without a quorum, and the experiment fails. `heal` with the right file brings them back.
    let mut broken = env.lab.deployment.clone();
    for r in &mut broken.replicas {
        r.process.restart = Some("false".into());
    }
    let broken_file = env.lab.dir.join("broken.yaml");
    broken.save(&broken_file).unwrap();
    let plan = write_plan(&env, "fail.yaml", &format!("name: majority kill\nallow_majority: true\n{steady}  recovery: 4s\nsteps:\n  - at: 0s\n    kind: kill\n    target: majority\n    restart_after: 1s\n"));
    let (status, report) = env.experiment(&broken_file, &plan);
    assert_eq!(status.code(), Some(1), "fails");
    assert_eq!(report["verdict"], "fail");
    assert!(report["reason"].as_str().unwrap().contains("not back"), "{report}");
    assert!(!env.journal_empty(), "the failed restarts wait for heal");
    let out = env.run(&["heal"]);
    assert!(out.status.success());
    assert!(env.journal_empty());
    wait_for(Duration::from_secs(30), "a leader after heal", || env.leader()).await;
}

#[path = "../../control-plane/tests/common/moto.rs"]
mod moto;

/// One AWS query request straight to `addr` (no SDK, no retries): the status and the body.
fn aws_call(addr: &str, action: &str) -> (u16, String, Duration) {
    use std::io::{Read, Write};
    let t = Instant::now();
    let body = format!("Action={action}&Version=2015-12-01");
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the proxy");
    let auth = "AWS4-HMAC-SHA256 Credential=testing/20261128/us-east-1/elasticloadbalancing/aws4_request, SignedHeaders=host, Signature=0";
    write!(
        conn,
        "POST / HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, response, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t640_aws_faults_through_the_proxy() {
    let env = Env::start(1, 0).await;
    let moto = moto::Moto::start(&env.lab.dir);
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let _proxy = Reaped(
        Command::new(env!("CARGO_BIN_EXE_titus-chaos"))
            .args([
                "aws-proxy",
                "--listen",
                &addr,
                "--upstream",
                &format!("127.0.0.1:{}", moto.port),
                "--run-for",
                "10m",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("aws-proxy"),
    );
    wait_for(Duration::from_secs(10), "the proxy listening", || async {
        std::net::TcpStream::connect(&addr).ok().map(|_| ())
    })
    .await;
    let mut d = env.lab.deployment.clone();
    d.aws_proxy = Some(addr.clone());
    let file = env.lab.dir.join("with-proxy.yaml");
    d.save(&file).unwrap();
    let chaos = |args: &[&str]| {
        let mut cmd = chaos_with(&file);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    };

    // Faults off: every call reaches moto.
    assert!((0..20).all(|_| aws_call(&addr, "DescribeTargetGroups").0 == 200));

    let child = chaos(&[
        "aws",
        "--throttle-rate",
        "0.3",
        "--error-rate",
        "0.2",
        "--latency-rate",
        "0.5",
        "--latency-ms",
        "150",
        "--duration",
        "5m",
    ])
    .spawn()
    .unwrap();
    wait_for(Duration::from_secs(10), "faults on", || async {
        titus_chaos::proxy::remote_status(&addr).await.ok().filter(|s| s.config.throttle_rate > 0.0).map(|_| ())
    })
    .await;
    let n = 300;
    let (mut throttled, mut unavailable, mut ok, mut slow) = (0, 0, 0, 0);
    for _ in 0..n {
        let (status, text, took) = aws_call(&addr, "DescribeTargetGroups");
        match status {
            400 if text.contains("<Code>Throttling</Code>") => throttled += 1,
            503 => unavailable += 1,
            200 => {
                ok += 1;
                if took >= Duration::from_millis(150) {
                    slow += 1;
                }
            }
            other => panic!("unexpected answer {other}: {text}"),
        }
    }
    eprintln!("{n} calls: {throttled} throttled, {unavailable} 503, {ok} ok ({slow} delayed ≥150 ms)");
    // Binomial bounds, over 4 standard deviations wide: a real rate never misses them by chance.
    assert!((60..=120).contains(&throttled), "throttled {throttled} of {n} at rate 0.3");
    assert!((30..=90).contains(&unavailable), "503 {unavailable} of {n} at rate 0.2");
    assert!(slow >= ok / 4 && slow <= ok * 3 / 4 + 10, "{slow} of {ok} delayed at rate 0.5");

    // The platform's own AWS client rides through the same faults on its retries.
    let aws = titus_aws::Aws::connect(&titus_aws::AwsSettings {
        region: "us-east-1".into(),
        endpoint_url: Some(format!("http://{addr}")),
        max_attempts: 10,
        calls_per_second: 100.0,
        attempt_timeout: Duration::from_secs(5),
    })
    .await;
    let (elb, ec2) = moto.sdk().await;
    let arn = moto::target_group(&elb, &ec2, "chaos", aws_sdk_elasticloadbalancingv2::types::TargetTypeEnum::Ip).await;
    for _ in 0..5 {
        aws.register_targets(&arn, &["10.9.9.9".to_string()]).await.expect("retried through the faults");
    }

    // Ctrl-C ends the fault early and turns it off.
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let (_, out) = finish(child, Duration::from_secs(10));
    assert!(out.contains("interrupted") && out.contains("undone: aws faults"), "{out}");
    let status = titus_chaos::proxy::remote_status(&addr).await.unwrap();
    assert!(status.config.is_off());
    assert!((0..50).all(|_| aws_call(&addr, "DescribeTargetGroups").0 == 200), "undone: every call reaches moto");
}

/// A child process killed when the test ends, passed or not.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An experiment whose steady state includes the load balancer: a service behind a target group
/// (moto, through the AWS fault proxy, both on the lab's bridge address so the namespaced replicas
/// reach them); AWS throttling and 503s, the leader killed and a task's container killed behind the
/// agent's back — after which the target group must again equal the Started tasks' addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t690_experiment_with_the_load_balancer_in_its_steady_state() {
    // Before the lab starts: its replicas inherit the SDK's credentials.
    moto::set_aws_env();
    let proxy_port = common::free_port();
    let args = vec![
        "--aws-region=us-east-1".to_string(),
        format!("--aws-endpoint-url=http://{{host_ip}}:{proxy_port}"),
        "--lb-drain-delay-ms=500".into(),
        "--lb-reconcile-interval-ms=2000".into(),
    ];
    let env = Env::start_with(3, 1, args).await;
    let host = env.lab.host_ip();
    let moto = moto::Moto::start_on(&env.lab.dir, &host);
    let _proxy = titus_chaos::proxy::Proxy::start(
        &format!("{host}:{proxy_port}"),
        &format!("{host}:{}", moto.port),
        Default::default(),
    )
    .await
    .expect("proxy");
    let (elb, ec2) = moto.sdk().await;
    let arn =
        moto::target_group(&elb, &ec2, "chaos-exp", aws_sdk_elasticloadbalancingv2::types::TargetTypeEnum::Ip).await;
    let c = env.client();
    let desc = JobBuilder::service("lb-svc", "titus/busybox:latest", 0, 2, 4)
        .owner("chaos@titus.local")
        .cpu(0.1)
        .memory_mb(32)
        .command(["sleep", "3600"])
        .build();
    let job = c.create_job(desc).await.unwrap();
    c.add_load_balancer(&job, &arn).await.unwrap();
    let lb = titus_chaos::experiment::LbCheck {
        job: job.clone(),
        target_group: arn.clone(),
        region: "us-east-1".into(),
        endpoint_url: Some(moto.url.clone()),
    };
    wait_for(Duration::from_secs(60), "the 2 targets registered", || async {
        titus_chaos::experiment::check_lb(&c, &lb).await.ok()
    })
    .await;

    let mut d = env.lab.deployment.clone();
    d.aws_proxy = Some(format!("{host}:{proxy_port}"));
    let file = env.lab.dir.join("with-aws.yaml");
    d.save(&file).unwrap();
    let plan = write_plan(
        &env,
        "lb.yaml",
        &format!(
            "name: leader and a task lost under AWS throttling\nsteady_state:\n  before: 2s\n  probe_interval: 200ms\n  max_p99: 5s\n  recovery: 60s\n  window: 5\n  load_balancer:\n    job: {job}\n    target_group: {arn}\n    endpoint_url: {}\nsteps:\n  - {{ at: 0s, kind: aws, throttle_rate: 0.4, error_rate: 0.2, duration: 12s }}\n  - {{ at: 1s, kind: kill, target: leader, restart_after: 3s }}\n  - {{ at: 2s, kind: container-kill, agent: random, count: 1 }}\n",
            moto.url
        ),
    );
    let (status, report) = env.experiment(&file, &plan);
    assert!(status.success(), "the experiment passes");
    assert_eq!(report["verdict"], "pass");
    let events: Vec<&str> =
        report["faults"]["events"].as_array().unwrap().iter().map(|e| e["what"].as_str().unwrap()).collect();
    assert!(events.iter().any(|e| e.starts_with("kill 1 task container")), "{events:?}");
    assert!(events.iter().any(|e| e.starts_with("undone: aws faults")), "{events:?}");
    // The killed task's replacement is behind the load balancer now.
    titus_chaos::experiment::check_lb(&c, &lb).await.expect("targets equal the Started tasks");
    let tasks = c.find_tasks(&[("jobIds", &job)], 100, "").await.unwrap();
    assert!(tasks.items.len() >= 3, "a replacement task was created");
}
