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
        /// register, set, observe, tasks (tasks starts agents and runs containers in Docker).
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
    /// Check a history (EDN as Jepsen writes it, or JSON) and write a report.
    Check {
        history: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    titus_obs::process::init_logging("plain", "titus_jepsen=info,titus_chaos=info,warn");
    match real_main(Cli::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("titus-jepsen: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print(results: &[checks::CheckResult]) {
    for c in results {
        let figures: Vec<String> = c.stats.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "{} {} — {} ops; {}",
            if c.valid { "valid  " } else { "INVALID" },
            c.checker,
            c.count,
            figures.join(", ")
        );
        for a in &c.anomalies {
            println!("    {a}");
        }
    }
}

async fn real_main(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Check { history, out } => {
            let ops = history::read(&history)?;
            let results = checks::check_all(&ops);
            if results.is_empty() {
                anyhow::bail!("{}: no operation any checker knows (f: read/write, add/read-all, observe, submit/containers/tasks)", history.display());
            }
            print(&results);
            if let Some(dir) = out {
                report::write(&dir, &ops, &results, &json!({"checked": history.display().to_string()}))?;
                println!("report: {}", dir.join("index.html").display());
            }
            Ok(results.iter().all(|c| c.valid))
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
                if !["register", "set", "observe", "tasks"].contains(&w.as_str()) {
                    anyhow::bail!("workload {w:?}: expected register, set, observe or tasks");
                }
            }
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => std::env::current_exe()?.parent().context("binary directory")?.to_path_buf(),
            };
            let mut all_valid = true;
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
                let valid = one_run(&opts, &dir).await?;
                println!(
                    "run {run}: {} (seed {seed}); report {}",
                    if valid { "valid" } else { "INVALID" },
                    dir.join("index.html").display()
                );
                all_valid &= valid;
            }
            Ok(all_valid)
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

async fn one_run(o: &RunOpts, dir: &std::path::Path) -> Result<bool> {
    std::fs::create_dir_all(dir)?;
    let lab_dir = dir.join("cluster");
    let wants = |w: &str| o.workload.iter().any(|x| x == w);
    let agents = if wants("tasks") { 2 } else { 0 };
    let lab = Lab::up(
        &LabSpec { replicas: o.replicas, agents, bin_dir: o.bin_dir.clone(), replica_args: vec![], agent_args: vec![] },
        &lab_dir,
    )?;
    lab.wait_for_leader(Duration::from_secs(60)).await?;
    let mut chaos = Chaos::new(titus_chaos::Deployment::load(&lab.deployment_file())?, Some(o.seed))?;
    let client = lab.deployment.client()?;
    let rec = Recorder::new();
    let until = Instant::now() + o.time;
    let keys =
        if wants("register") || wants("observe") { workloads::register_setup(&client, o.keys).await? } else { vec![] };

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
    if wants("tasks") {
        tasks.push(tokio::spawn(workloads::task_submitter(new_client()?, rec.clone(), 0, 1, until)));
        let agents: Vec<String> = lab.deployment.agents.iter().map(|a| a.id.clone()).collect();
        tasks.push(tokio::spawn(workloads::container_sampler(rec.clone(), agents, until + Duration::from_secs(20))));
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
    let ops = rec.ops();
    let results = checks::check_all(&ops);
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
    let valid = report::write(dir, &ops, &results, &run)?;
    drop(lab);
    Ok(valid)
}
