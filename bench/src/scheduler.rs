//! Scheduler benchmarks: the placement core alone (a synthetic cluster, in this process), and the
//! whole path — 3 replicas, simulated agents speaking the real agent protocol, tasks submitted
//! through the SDK — timed from submit to the agent's acknowledgement (its first report of the task).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use titus_client::proto as pb;
use titus_client::{Client, JobBuilder};
use titus_scheduler as core;

use crate::{percentile, Proc, Titus};

const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// Peak resident set of a process (VmHWM), in MiB.
/// The leader's store and log write counters: keys, write-batch bytes, log bytes (NaN unread).
async fn write_counters(admin: &str) -> [f64; 3] {
    let mut out = [f64::NAN; 3];
    let series =
        ["titus_store_keys_written_total", "titus_store_bytes_written_total", "titus_raft_log_bytes_appended_total"];
    for (slot, name) in out.iter_mut().zip(series) {
        *slot = super::scrape(admin, name).await.unwrap_or(f64::NAN);
    }
    out
}

pub fn peak_rss_mib(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// CPU seconds a process has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// Job `j`'s constraints in both benchmarks: one job in ten balances zones (hard), one spreads
/// over hosts (soft uniqueHost), one in twenty wants zone-b; the rest have none.
fn constraints(j: usize) -> (Vec<(&'static str, &'static str)>, Vec<(&'static str, &'static str)>) {
    match j % 20 {
        0 | 10 => (vec![("zoneBalance", "true")], vec![]),
        1 | 11 => (vec![], vec![("uniqueHost", "true")]),
        5 => (vec![("availabilityZone", "zone-b")], vec![]),
        _ => (vec![], vec![]),
    }
}

/// The placement core alone: `agents` agents (16 cpus, 64 GiB, three zones), `tasks` tasks in
/// jobs of 100 (sizes 0.5–2 cpus, 1–4 GiB; constraints as above), one Critical group with a
/// reservation, three Flex groups.
pub fn core_bench(agents: usize, tasks: usize) {
    let agents: Vec<core::Agent> = (0..agents)
        .map(|i| core::Agent {
            id: format!("agent-{i:06}"),
            zone: ZONES[i % 3].into(),
            machine_type: if i % 2 == 0 { "m5.4xlarge" } else { "r5.4xlarge" }.into(),
            total: core::Resources { cpu: 16.0, memory_mb: 65_536, disk_mb: 500_000, network_mbps: 10_000, gpu: 0 },
            ..core::Agent::default()
        })
        .collect();
    let parse = |pairs: Vec<(&str, &str)>| core::Constraints::parse(pairs).expect("constraints");
    let mut list = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let j = i / 100;
        let (hard, soft) = constraints(j);
        let size = (j % 4) as f64;
        list.push(core::Task {
            id: format!("task-{i:08}"),
            job_id: format!("job-{j:06}"),
            need: core::Resources {
                cpu: 0.5 + size * 0.5,
                memory_mb: 1024 * (1 + j as u64 % 4),
                disk_mb: 1024,
                network_mbps: 10,
                gpu: 0,
            },
            capacity_group: if j % 10 == 3 { "critical".into() } else { format!("flex{}", j % 3) },
            tier: if j % 10 == 3 { core::Tier::Critical } else { core::Tier::Flex },
            hard: parse(hard),
            soft: parse(soft),
        });
    }
    let critical = core::Group {
        name: "critical".into(),
        tier: core::Tier::Critical,
        reserved: core::Resources {
            cpu: tasks as f64 * 0.2,
            memory_mb: tasks as u64 * 512,
            disk_mb: tasks as u64 * 200,
            network_mbps: tasks as u64 * 2,
            gpu: 0,
        },
        used: core::Resources::default(),
    };
    let t0 = Instant::now();
    let plan = core::schedule(&agents, &list, &[critical], &core::Config::default());
    let secs = t0.elapsed().as_secs_f64();
    println!();
    println!("Placement core alone: {} agents x {} tasks (one round, this process)", agents.len(), list.len());
    println!(
        "    placed {}, unplaced {}, {:.2} s, {:.0} placements/s, {:.1} agents looked at per task, peak RSS {:.0} MiB",
        plan.placements.len(),
        plan.unplaced.len(),
        secs,
        plan.placements.len() as f64 / secs,
        plan.agents_evaluated as f64 / list.len().max(1) as f64,
        peak_rss_mib("self")
    );
}

/// The whole path: 3 replicas (fsync on), `agents` simulated agents in one `titus-agent
/// --simulate` process, `tasks` tasks in batch jobs of up to 1,000 submitted through the SDK by 8
/// concurrent submitters; stops after `limit` whatever it reached.
/// What the end-to-end placement run does.
pub struct PlacementRun {
    pub agents: usize,
    pub tasks: usize,
    /// Upper bound on the run.
    pub limit: Duration,
    /// Once this many tasks are acknowledged, a follower is killed, wiped and started again.
    pub wipe_follower_at: Option<usize>,
}

/// Which simulated agents never registered, and what the first of them last logged: the lines of
/// the simulating process's log that name it.
fn unregistered_report(registered: &std::collections::HashSet<String>, agents: usize, log: &Path) -> String {
    let missing: Vec<String> =
        (0..agents).map(|n| format!("sim-{n:05}")).filter(|id| !registered.contains(id)).collect();
    let mut report =
        format!("placement: {} agents never registered, e.g. {:?}", missing.len(), &missing[..missing.len().min(10)]);
    if let (Some(first), Ok(text)) = (missing.first(), std::fs::read_to_string(log)) {
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(first.as_str())).collect();
        report.push_str(&format!("\nplacement: the last lines {} logged ({} in all):", first, lines.len()));
        for l in &lines[lines.len().saturating_sub(20)..] {
            report.push_str("\n  ");
            report.push_str(l);
        }
    }
    report
}

/// A follower wiped during the run: which, when, and how it caught up.
struct Wiped {
    id: u64,
    at: Instant,
    /// The leader's applied index when the follower came back: caught up once it reaches it.
    target: u64,
    caught_up: Option<(Duration, u64)>,
}

pub async fn placement_bench(titus_bin: &Path, dir: &Path, run: PlacementRun, replica_args: &[String]) -> Result<()> {
    let PlacementRun { agents, tasks, limit, wipe_follower_at } = run;
    let mut wiped: Option<Wiped> = None;
    std::fs::create_dir_all(dir)?;
    let agent_bin = titus_bin.with_file_name("titus-agent");
    if !agent_bin.exists() {
        bail!("{} not found: build it first (cargo build -p titus-agent)", agent_bin.display());
    }
    let mut titus = Titus::start(titus_bin, dir, replica_args).await?;
    let client = Client::connect(titus.apis.iter())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.cluster_status().await.map(|s| s.leader_id == 0).unwrap_or(true) {
        if Instant::now() > deadline {
            bail!("no leader within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut sim = Proc {
        args: vec![
            "--agent-id".into(),
            "sim".into(),
            "--servers".into(),
            titus.apis.join(","),
            "--cpu".into(),
            "16".into(),
            "--memory-mb".into(),
            "65536".into(),
            "--simulate".into(),
            agents.to_string(),
            "--simulate-zones".into(),
            ZONES.join(","),
            "--insecure".into(),
        ],
        bin: agent_bin.display().to_string(),
        log: dir.join("sim-agents.log"),
        child: None,
    };
    sim.start()?;
    let t_reg = Instant::now();
    // Counted from a follower's metrics (counts kept on apply): polling the leader's FindAgents,
    // 10,000 agents each time, would be a load of its own on the leader being measured.
    let mut last_progress = (0, Instant::now());
    loop {
        let leader = client.cluster_status().await.map(|s| s.leader_id).unwrap_or(0);
        let follower = (1..=titus.admins.len() as u64).find(|id| *id != leader).unwrap_or(1);
        let admin = &titus.admins[follower as usize - 1];
        let n = super::scrape(admin, "titus_agents{state=\"online\"}").await.unwrap_or(0.0) as usize;
        if n >= agents {
            break;
        }
        if n > last_progress.0 && last_progress.1.elapsed() > Duration::from_secs(10) {
            eprintln!("placement: {n} of {agents} agents registered after {:.0} s", t_reg.elapsed().as_secs_f64());
            last_progress = (n, Instant::now());
        }
        if t_reg.elapsed() > Duration::from_secs(300) {
            let registered =
                client.find_agents().await.map(|a| a.into_iter().map(|a| a.id).collect()).unwrap_or_default();
            eprintln!("{}", unregistered_report(&registered, agents, &sim.log));
            bail!("only {n} of {agents} simulated agents registered within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("placement: {agents} simulated agents registered in {:.1} s", t_reg.elapsed().as_secs_f64());

    // Acknowledgements: the first time each task is reported by its agent (StartInitiated).
    let mut observer = client.observe_jobs(&[]);
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String, Instant)>();
    let watcher = tokio::spawn(async move {
        loop {
            match observer.next().await {
                Ok(n) => {
                    if let Some(pb::job_change_notification::Notification::TaskUpdate(u)) = n.notification {
                        let Some(t) = u.task else { continue };
                        let state = t.status.as_ref().map(|s| s.state).unwrap_or_default();
                        if state >= pb::TaskState::TaskStartInitiated as i32
                            && state <= pb::TaskState::TaskStarted as i32
                        {
                            let _ = ack_tx.send((t.job_id, t.id, Instant::now()));
                        }
                    }
                }
                Err(e) => {
                    eprintln!("placement: observer: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });

    let (leader_id, term0) = {
        let s = client.cluster_status().await?;
        (s.leader_id, s.term)
    };
    let (leader_pid, leader_admin) = {
        let s = client.cluster_status().await?;
        let admin = titus.admins.get((s.leader_id as usize).wrapping_sub(1)).context("leader admin")?.clone();
        (titus.pid_of(s.leader_id).context("leader pid")?, admin)
    };
    let writes0 = write_counters(&leader_admin).await;
    let cpu0 = cpu_seconds(leader_pid);
    let t0 = Instant::now();
    let jobs = tasks.div_ceil(1000);
    let (sub_tx, mut sub_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let submitters: Vec<_> = (0..8)
        .map(|w| {
            let (client, sub_tx) = (client.clone(), sub_tx.clone());
            tokio::spawn(async move {
                for j in (w..jobs).step_by(8) {
                    let size = (tasks - j * 1000).min(1000) as u32;
                    let (hard, soft) = constraints(j);
                    let mut b = JobBuilder::batch(&format!("bench{j}"), "titus/busybox:latest", size)
                        .owner("bench@example.com")
                        .cpu(0.1)
                        .memory_mb(256)
                        .disk_mb(10)
                        .network_mbps(1);
                    for (k, v) in hard {
                        b = b.hard_constraint(k, v);
                    }
                    for (k, v) in soft {
                        b = b.soft_constraint(k, v);
                    }
                    let submitted = Instant::now();
                    match client.create_job(b.build()).await {
                        Ok(id) => {
                            let _ = sub_tx.send((id, submitted));
                        }
                        Err(e) => eprintln!("placement: submit job {j}: {e}"),
                    }
                }
            })
        })
        .collect();
    drop(sub_tx);

    let mut submitted: HashMap<String, Instant> = HashMap::new();
    let mut acked: HashMap<String, Instant> = HashMap::new();
    let mut early: Vec<(String, String, Instant)> = Vec::new();
    let mut latencies = Vec::with_capacity(tasks);
    let end = t0 + limit;
    let mut last_report = Instant::now();
    while acked.len() < tasks && Instant::now() < end {
        tokio::select! {
            Some((id, at)) = sub_rx.recv() => { submitted.insert(id, at); }
            Some((job, task, at)) = ack_rx.recv() => {
                if acked.contains_key(&task) { continue; }
                match submitted.get(&job) {
                    Some(s) => { latencies.push(at.duration_since(*s).as_secs_f64() * 1000.0); acked.insert(task, at); }
                    None => early.push((job, task, at)),
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        // Acks that arrived before their submit was recorded.
        early.retain(|(job, task, at)| match submitted.get(job) {
            Some(s) if !acked.contains_key(task) => {
                latencies.push(at.duration_since(*s).as_secs_f64() * 1000.0);
                acked.insert(task.clone(), *at);
                false
            }
            Some(_) => false,
            None => true,
        });
        if wiped.is_none() && wipe_follower_at.is_some_and(|n| acked.len() >= n) {
            let id = (1..=3u64).find(|id| *id != leader_id).context("a follower")?;
            let index = (id - 1) as usize;
            titus.procs[index].kill();
            std::fs::remove_dir_all(dir.join(format!("titus-{id}"))).context("wiping the follower's data dir")?;
            titus.procs[index].start()?;
            let target = client.cluster_status().await.map(|s| s.last_applied_index).unwrap_or(0);
            eprintln!(
                "placement: follower {id} wiped and restarted at {} acknowledged (leader applied {target})",
                acked.len()
            );
            wiped = Some(Wiped { id, at: Instant::now(), target, caught_up: None });
        }
        if let Some(w) = wiped.as_mut().filter(|w| w.caught_up.is_none()) {
            // Asked of that replica alone: the SDK would answer from another one while it is down.
            let addr = &titus.apis[(w.id - 1) as usize];
            let applied = client.cluster_status_of(addr).await.map(|s| (s.node_id, s.last_applied_index));
            let applied = applied.map(|(node, index)| if node == w.id { index } else { 0 });
            if applied.is_ok_and(|a| a >= w.target) {
                let pid = titus.pid_of(w.id).context("the wiped follower's pid")?;
                w.caught_up = Some((w.at.elapsed(), pid as u64));
                eprintln!("placement: follower {} caught up in {:.1} s", w.id, w.at.elapsed().as_secs_f64());
            }
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!("placement: {} of {tasks} acknowledged after {:.0} s", acked.len(), t0.elapsed().as_secs_f64());
        }
    }
    let elapsed = acked.values().max().map(|t| t.duration_since(t0)).unwrap_or_else(|| t0.elapsed());
    let cpu = cpu_seconds(leader_pid) - cpu0;
    let writes1 = write_counters(&leader_admin).await;
    watcher.abort();
    for s in submitters {
        s.abort();
    }
    let secs = elapsed.as_secs_f64();
    println!();
    println!(
        "Placement end to end: 3 replicas (fsync on), {agents} simulated agents, {tasks} tasks in {jobs} batch jobs via the SDK"
    );
    println!(
        "    acknowledged {} of {tasks} in {secs:.1} s: {:.0} placements/s; submit -> agent ack p50 {:.0} ms, p99 {:.0} ms",
        acked.len(),
        acked.len() as f64 / secs,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    let per_task = |i: usize| (writes1[i] - writes0[i]) / acked.len().max(1) as f64;
    println!(
        "    per placed task, on the leader (its whole work meanwhile): {:.1} RocksDB keys written, {:.0} bytes of write batches, {:.0} log bytes appended",
        per_task(0),
        per_task(1),
        per_task(2)
    );
    println!(
        "    leader: {:.0} CPU-seconds ({:.0}% of one core), peak RSS {:.0} MiB; replicas' peak RSS {}",
        cpu,
        100.0 * cpu / secs,
        peak_rss_mib(&leader_pid.to_string()),
        titus.pids().iter().map(|p| format!("{:.0} MiB", peak_rss_mib(&p.to_string()))).collect::<Vec<_>>().join(", ")
    );
    println!(
        "    data dir per replica (RocksDB: log, state, snapshot): {}",
        (1..=3)
            .map(|id| format!("{:.0} MiB", dir_size_mib(&dir.join(format!("titus-{id}")))))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // The newest term any replica knows (a replica that was down may still know an older one).
    let mut term1 = 0;
    for api in &titus.apis {
        term1 = term1.max(client.cluster_status_of(api).await.map(|s| s.term).unwrap_or(0));
    }
    println!(
        "    leadership: term {term0} at the start, {term1} at the end ({})",
        if term1 == term0 { "no election during the run" } else { "ELECTIONS during the run" }
    );
    if let Some(w) = &wiped {
        match w.caught_up {
            Some((took, pid)) => println!(
                "    follower {} wiped at {} acknowledged: caught up (applied index {}) in {:.1} s, its peak RSS since {:.0} MiB",
                w.id,
                wipe_follower_at.unwrap_or(0),
                w.target,
                took.as_secs_f64(),
                peak_rss_mib(&pid.to_string())
            ),
            None => println!("    follower {} wiped: NOT caught up by the end of the run", w.id),
        }
    }
    if acked.len() < tasks {
        eprintln!("{}", unacknowledged_report(&client, &acked).await);
        bail!("only {} of {tasks} tasks acknowledged within the {limit:?} limit", acked.len());
    }
    Ok(())
}

/// Where the tasks never acknowledged are: how many per state and reason, with an example each.
async fn unacknowledged_report(client: &Client, acked: &HashMap<String, Instant>) -> String {
    let mut by_state: std::collections::BTreeMap<String, (usize, String)> = Default::default();
    let mut cursor = String::new();
    loop {
        let page = match client.find_tasks(&[], 1000, &cursor).await {
            Ok(p) => p,
            Err(e) => return format!("placement: cannot list the tasks not acknowledged: {e}"),
        };
        for t in page.items.iter().filter(|t| !acked.contains_key(&t.id)) {
            let status = t.status.clone().unwrap_or_default();
            let state = pb::TaskState::try_from(status.state).map(|s| s.as_str_name()).unwrap_or("?");
            let agent = t.task_context.get("agent").cloned().unwrap_or_default();
            let e = by_state.entry(format!("{state} {}", status.reason_code)).or_insert((0, String::new()));
            e.0 += 1;
            if e.1.is_empty() {
                e.1 = format!("{} on {agent:?}", t.id);
            }
        }
        match page.pagination.filter(|p| p.has_more && !p.cursor.is_empty()) {
            Some(p) => cursor = p.cursor,
            None => break,
        }
    }
    let mut report = String::from("placement: tasks not acknowledged, by state and reason:");
    for (state, (n, example)) in by_state {
        report.push_str(&format!("\n  {n} {state} (e.g. {example})"));
    }
    report
}

/// The size of the files under `path`, in MiB.
fn dir_size_mib(path: &Path) -> f64 {
    fn walk(p: &Path) -> u64 {
        match std::fs::read_dir(p) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum(),
            Err(_) => 0,
        }
    }
    walk(path) as f64 / (1024.0 * 1024.0)
}
