//! `titus-jepsen`: run a test against a real cluster, or check a history. See jepsen/README.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;
use titus_chaos::duration::Dur;
use titus_chaos::faults::Chaos;
use titus_chaos::lab::{Lab, LabSpec};
use titus_jepsen::checks::Verdict;
use titus_jepsen::history::Recorder;
use titus_jepsen::{checks, history, nemesis, report, workloads};
use tokio::time::Instant;

#[derive(Parser)]
#[command(name = "titus-jepsen", version, about = "Jepsen-style tests of Titus: nemeses, workloads, checked histories")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a cluster in network namespaces, run workloads under nemeses, heal, check, report.
    Test {
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// How long the workloads run under faults.
        #[arg(long, default_value = "60s")]
        time: Dur,
        /// all, none, or a comma-separated list (see jepsen/README.md).
        #[arg(long, default_value = "all")]
        nemesis: String,
        /// Length of each fault, and of the calm between faults.
        #[arg(long, default_value = "5s")]
        fault: Dur,
        #[arg(long, default_value = "2s")]
        calm: Dur,
        /// register, set, observe, tasks, kill (tasks and kill start agents and run containers in Docker;
        /// kill kills batch jobs while their tasks launch; aws puts moto behind the fault proxy and
        /// watches the AWS calls of partitioned leaders).
        #[arg(long, default_value = "register,set,observe", value_delimiter = ',')]
        workload: Vec<String>,
        #[arg(long, default_value_t = 4)]
        concurrency: i64,
        #[arg(long, default_value_t = 3)]
        keys: usize,
        #[arg(long, default_value_t = 1)]
        runs: u32,
        #[arg(long)]
        seed: Option<u64>,
        /// Report folder (one sub-folder per run).
        #[arg(long, default_value = "jepsen-report")]
        out: PathBuf,
        /// Where titus-control-plane and titus-agent are (default: beside this binary).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Check a history (EDN as Jepsen writes it, or JSON) and write a report. Exit code 0: valid;
    /// 1: an anomaly; 2: could not be checked (see jepsen/README.md).
    Check {
        history: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Every register's value before its first operation, as EDN (Jepsen's registers start as
        /// nil; histories of our register workload recorded before it wrote each key's creation as a
        /// write of 0 need `--initial 0`).
        #[arg(long, default_value = "nil")]
        initial: String,
        /// Configurations the linearizability search may remember per key (16 bytes each, plus the
        /// hash table's slack) before it gives up with "unknown".
        #[arg(long, default_value_t = 4_000_000)]
        max_configs: usize,
        /// Give up (unknown) on whatever search is still running after this long.
        #[arg(long)]
        time_limit: Option<Dur>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    titus_obs::process::init_logging("plain", "titus_jepsen=info,titus_chaos=info,warn");
    match real_main(Cli::parse()).await {
        Ok(Verdict::Valid) => ExitCode::SUCCESS,
        Ok(Verdict::Invalid) => ExitCode::from(1),
        Ok(Verdict::Unknown) => ExitCode::from(2),
        Err(e) => {
            eprintln!("titus-jepsen: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print(results: &[checks::CheckResult]) {
    for c in results {
        let figures: Vec<String> = c.stats.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let word = match c.valid {
            Verdict::Valid => "valid  ",
            Verdict::Invalid => "INVALID",
            Verdict::Unknown => "UNKNOWN",
        };
        println!("{word} {} — {} ops; {}", c.checker, c.count, figures.join(", "));
        for a in &c.anomalies {
            println!("    {a}");
        }
        for u in &c.unchecked {
            println!("    not checked: {u}");
        }
    }
}

/// `--initial`: one EDN value.
fn parse_initial(text: &str) -> Result<serde_json::Value> {
    let values = titus_jepsen::edn::parse_all(text).with_context(|| format!("--initial {text:?}"))?;
    match <[serde_json::Value; 1]>::try_from(values) {
        Ok([v]) => Ok(v),
        Err(_) => anyhow::bail!("--initial {text:?}: expected one EDN value"),
    }
}

async fn real_main(cli: Cli) -> Result<Verdict> {
    match cli.command {
        Command::Check { history, out, initial, max_configs, time_limit } => {
            let limits = titus_jepsen::linear::Limits {
                max_configs,
                deadline: time_limit.map(|t| std::time::Instant::now() + t.0),
            };
            let opts = checks::Options { initial: parse_initial(&initial)?, limits };
            let ops = history::read(&history)?;
            let results = checks::check_all(&ops, &opts);
            if results.is_empty() {
                anyhow::bail!("{}: no client operation to check (only nemesis operations, or none)", history.display());
            }
            print(&results);
            if let Some(dir) = out {
                let run = json!({"checked": history.display().to_string(), "initial": initial});
                report::write(&dir, &ops, &results, &run)?;
                println!("report: {}", dir.join("index.html").display());
            }
            Ok(Verdict::merge(&results))
        }
        Command::Test {
            replicas,
            time,
            nemesis,
            fault,
            calm,
            workload,
            concurrency,
            keys,
            runs,
            seed,
            out,
            bin_dir,
        } => {
            let names = nemesis::parse_list(&nemesis, replicas as usize)?;
            for w in &workload {
                if !["register", "set", "observe", "tasks", "kill", "aws"].contains(&w.as_str()) {
                    anyhow::bail!("workload {w:?}: expected register, set, observe, tasks, kill or aws");
                }
            }
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => std::env::current_exe()?.parent().context("binary directory")?.to_path_buf(),
            };
            let mut all = Verdict::Valid;
            for run in 1..=runs {
                let seed = seed.map_or_else(rand::random, |s| s + run as u64 - 1);
                let dir = if runs == 1 { out.clone() } else { out.join(format!("run-{run}")) };
                let opts = RunOpts {
                    replicas,
                    time: time.0,
                    names: names.clone(),
                    fault: fault.0,
                    calm: calm.0,
                    workload: workload.clone(),
                    concurrency,
                    keys,
                    seed,
                    bin_dir: bin_dir.clone(),
                };
                let verdict = one_run(&opts, &dir).await?;
                println!(
                    "run {run}: {} (seed {seed}); report {}",
                    if verdict == Verdict::Valid { "valid".to_string() } else { verdict.word().to_uppercase() },
                    dir.join("index.html").display()
                );
                all = all.max(verdict);
            }
            Ok(all)
        }
    }
}

struct RunOpts {
    replicas: u32,
    time: Duration,
    names: Vec<&'static str>,
    fault: Duration,
    calm: Duration,
    workload: Vec<String>,
    concurrency: i64,
    keys: usize,
    seed: u64,
    bin_dir: PathBuf,
}

async fn one_run(o: &RunOpts, dir: &std::path::Path) -> Result<Verdict> {
    std::fs::create_dir_all(dir)?;
    let lab_dir = dir.join("cluster");
    let wants = |w: &str| o.workload.iter().any(|x| x == w);
    let agents = if wants("tasks") || wants("kill") { 2 } else { 0 };
    let proxy_port = titus_jepsen::aws::free_port()?;
    let replica_args = if wants("aws") {
        titus_jepsen::aws::set_env();
        titus_jepsen::aws::replica_args(proxy_port)
    } else {
        vec![]
    };
    let lab = Lab::up(
        &LabSpec { replicas: o.replicas, agents, bin_dir: o.bin_dir.clone(), replica_args, agent_args: vec![] },
        &lab_dir,
    )?;
    // Dropped (moto and the proxy stopped) when the run ends.
    let aws = if wants("aws") {
        Some(titus_jepsen::aws::start(&lab_dir, &format!("{}:{proxy_port}", lab.host_ip())).await?)
    } else {
        None
    };
    lab.wait_for_leader(Duration::from_secs(60)).await?;
    let mut chaos = Chaos::new(titus_chaos::Deployment::load(&lab.deployment_file())?, Some(o.seed))?;
    let client = lab.deployment.client()?;
    let rec = Recorder::new();
    let until = Instant::now() + o.time;
    // The register's keys' creation goes into the history as their first write (of 0), so the
    // register checker starts from nil, as for any Jepsen history.
    let keys = if wants("register") || wants("observe") {
        workloads::register_setup(&client, o.keys, wants("register").then_some(&rec)).await?
    } else {
        vec![]
    };

    let mut tasks = Vec::new();
    // Short deadlines, so that faults leave operations with unknown outcomes (:info) in the history.
    let options = titus_client::ClientOptions {
        deadline: Duration::from_secs(3),
        attempt_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let addrs = lab.deployment.api_addrs();
    let new_client = || titus_client::Client::with_options(&addrs, options.clone()).map_err(|e| anyhow::anyhow!("{e}"));
    if wants("observe") {
        for i in 0..2 {
            tasks.push(tokio::spawn(workloads::observer(new_client()?, rec.clone(), i, until)));
        }
    }
    if wants("register") {
        for w in 0..o.concurrency {
            tasks.push(tokio::spawn(workloads::register_worker(
                new_client()?,
                rec.clone(),
                keys.clone(),
                w,
                o.concurrency,
                until,
                o.seed ^ (w as u64 + 1),
            )));
        }
    }
    if wants("set") {
        for w in 0..2 {
            let process = 100 + w;
            tasks.push(tokio::spawn(workloads::set_worker(
                new_client()?,
                rec.clone(),
                process,
                2,
                until,
                o.seed ^ (process as u64),
            )));
        }
    }
    let agent_ids: Vec<String> = lab.deployment.agents.iter().map(|a| a.id.clone()).collect();
    if wants("tasks") {
        tasks.push(tokio::spawn(workloads::task_submitter(new_client()?, rec.clone(), 0, 1, until)));
    }
    if wants("kill") {
        for w in 0..2 {
            let seed = o.seed ^ (50_000 + w as u64);
            tasks.push(tokio::spawn(workloads::kill_during_launch(new_client()?, rec.clone(), w, 2, until, seed)));
        }
    }
    if aws.is_some() {
        titus_jepsen::aws::create_group(&client, Duration::from_secs(30)).await?;
        let replicas = lab.deployment.replicas.iter().map(|r| (r.id, r.api.clone())).collect();
        let watcher = titus_jepsen::aws::watch_leaders(lab.deployment.client()?, rec.clone(), replicas, until);
        tasks.push(tokio::spawn(watcher));
    }
    if wants("tasks") || wants("kill") {
        let sampler = workloads::container_sampler(rec.clone(), agent_ids.clone(), until + Duration::from_secs(20));
        tasks.push(tokio::spawn(sampler));
    }
    nemesis::run(&mut chaos, &rec, &o.names, o.fault, o.calm, until, o.seed).await;
    for t in tasks.drain(..) {
        let _ = t.await;
    }
    // Heal everything, then the final reads.
    chaos.heal().await;
    lab.wait_for_leader(Duration::from_secs(60)).await?;
    let final_client = lab.deployment.client()?;
    if wants("set") {
        workloads::set_read_all(&final_client, &rec, 1000).await;
    }
    if wants("tasks") {
        workloads::tasks_final(&final_client, &rec, Duration::from_secs(60)).await;
    }
    if wants("kill") {
        let (within, watch) = (Duration::from_secs(60), Duration::from_secs(5));
        workloads::kills_final(&final_client, &rec, &agent_ids, within, watch).await;
    }
    if let Some(aws) = &aws {
        let ids = lab.deployment.replicas.iter().filter_map(|r| Some((r.ip.parse().ok()?, r.id))).collect();
        titus_jepsen::aws::record_calls(&rec, &aws.proxy, &ids);
    }
    let ops = rec.ops();
    let results = checks::check_all(&ops, &checks::Options::default());
    print(&results);
    let count = |k: history::Type| ops.iter().filter(|op| op.kind == k && op.process != history::NEMESIS).count();
    let run = json!({
        "replicas": o.replicas,
        "seconds": o.time.as_secs_f64(),
        "seed": o.seed,
        "workloads": o.workload,
        "nemeses": o.names,
        "fault": Dur(o.fault).to_string(),
        "operations": {"invoke": count(history::Type::Invoke), "ok": count(history::Type::Ok), "fail": count(history::Type::Fail), "info": count(history::Type::Info)},
        "nemesis_events": chaos.events.iter().map(|e| json!({"at_ms": e.at_ms, "ok": e.ok, "what": e.what})).collect::<Vec<_>>(),
    });
    let verdict = report::write(dir, &ops, &results, &run)?;
    drop(lab);
    Ok(verdict)
}
