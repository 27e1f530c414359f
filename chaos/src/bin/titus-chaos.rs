//! `titus-chaos`: fault injection against a running Titus deployment. See chaos/README.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use titus_chaos::deployment::Deployment;
use titus_chaos::duration::Dur;
use titus_chaos::experiment::{self, Verdict};
use titus_chaos::faults::{Chaos, FaultSpec, Target};
use titus_chaos::lab::{Lab, LabSpec};
use titus_chaos::monkey::{self, MonkeyConfig, Schedule};
use titus_chaos::net::Topology;
use titus_chaos::plan::{self, Plan, Step};
use titus_chaos::proxy::{FaultConfig, Proxy};

#[derive(Parser)]
#[command(
    name = "titus-chaos",
    version,
    about = "Fault injection against a Titus deployment, a chaos monkey, and chaos experiments"
)]
struct Cli {
    /// The deployment file (replicas, agents, how to reach their processes).
    #[arg(short, long, global = true, env = "TITUS_CHAOS_DEPLOYMENT", default_value = "deployment.yaml")]
    deployment: PathBuf,
    /// Seed for random choices (targets, partition sides).
    #[arg(long, global = true)]
    seed: Option<u64>,
    /// Allow faults that take a majority of the replicas out at once.
    #[arg(long, global = true)]
    allow_majority: bool,
    /// Write the run's summary as JSON here.
    #[arg(long, global = true)]
    report: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// SIGKILL replicas (leader, follower, minority, majority or an id), restart them after a delay.
    Kill {
        #[arg(long, default_value = "leader")]
        target: Target,
        #[arg(long, default_value = "5s")]
        restart_after: Dur,
    },
    /// SIGSTOP replicas for a duration, then SIGCONT.
    Pause {
        #[arg(long, default_value = "leader")]
        target: Target,
        #[arg(long)]
        duration: Dur,
    },
    /// Partition the replicas (isolate-leader, halves, ring, bridge) for a duration.
    Partition {
        #[arg(long)]
        topology: Topology,
        #[arg(long)]
        duration: Dur,
    },
    /// Move a replica's wall clock by an offset (+1h, -30s) for a duration (libfaketime).
    Skew {
        #[arg(long)]
        target: Target,
        #[arg(long, allow_hyphen_values = true)]
        offset: String,
        #[arg(long)]
        duration: Dur,
    },
    /// SIGKILL an agent (an id or `random`), restart it after a delay.
    AgentKill {
        #[arg(long, default_value = "random")]
        agent: String,
        #[arg(long, default_value = "5s")]
        restart_after: Dur,
    },
    /// Cut an agent off from every replica for a duration.
    AgentIsolate {
        #[arg(long, default_value = "random")]
        agent: String,
        #[arg(long)]
        duration: Dur,
    },
    /// Kill task containers behind an agent's back.
    ContainerKill {
        #[arg(long, default_value = "random")]
        agent: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Restart the Docker daemon (the deployment's docker_restart command).
    DockerRestart {
        #[arg(long)]
        allow_docker_restart: bool,
    },
    /// AWS faults through the deployment's fault proxy for a duration.
    Aws {
        #[command(flatten)]
        rates: Rates,
        #[arg(long)]
        duration: Dur,
    },
    /// Run a plan file: a schedule of faults.
    Run { plan: PathBuf },
    /// Run a plan file as an experiment: steady state before, during and after its faults.
    Experiment { plan: PathBuf },
    /// Undo whatever a crashed or interrupted run left behind.
    Heal,
    /// Active faults, partition rules and paused processes, and the leader.
    Status,
    /// Terminate random tasks of opted-in jobs (attribute chaos.monkey.enabled=true).
    Monkey(MonkeyArgs),
    /// An HTTP proxy in front of an AWS endpoint, whose faults `titus-chaos aws` switches.
    AwsProxy {
        #[arg(long, default_value = "127.0.0.1:4580")]
        listen: String,
        /// The AWS endpoint (host:port or http://host:port).
        #[arg(long)]
        upstream: String,
        #[command(flatten)]
        rates: Rates,
        /// Stop after this long (default: until Ctrl-C).
        #[arg(long)]
        run_for: Option<Dur>,
    },
    /// A cluster in network namespaces on this machine, to try faults on.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
}

#[derive(Args, Clone)]
struct Rates {
    #[arg(long, default_value_t = 0.0)]
    throttle_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    latency_rate: f64,
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// A target (IP; `*`: all) whose DescribeTargetHealth state reads `unhealthy`; repeatable.
    #[arg(long = "unhealthy-target")]
    unhealthy_targets: Vec<String>,
}

#[derive(Args)]
struct MonkeyArgs {
    /// Any replicas' API addresses (comma-separated); by default, the deployment file's.
    #[arg(long, value_delimiter = ',')]
    servers: Vec<String>,
    /// `always`, or days and a UTC window: `Mon-Fri 09:00-17:00`.
    #[arg(long, default_value = "Mon-Fri 09:00-17:00")]
    schedule: Schedule,
    /// Expected terminations per opted-in job per hour inside the schedule.
    #[arg(long, default_value_t = 1.0)]
    kills_per_hour: f64,
    #[arg(long, default_value_t = 1)]
    max_per_job_per_day: u32,
    #[arg(long, default_value = "1m")]
    tick: Dur,
    /// Stops by itself after this long.
    #[arg(long, default_value = "8h")]
    run_for: Dur,
    /// Log what it would terminate, terminate nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long, default_value = "chaos-monkey-state.json")]
    state_file: PathBuf,
    #[arg(long)]
    log_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Start a lab and leave it running; prints its deployment file.
    Up {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        #[arg(long, default_value_t = 1)]
        agents: u32,
        /// Where titus-control-plane and titus-agent are (default: beside this binary).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Stop a lab and remove its namespaces.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Remove every lab left behind by runs that could not clean up (their processes too).
    Sweep,
}

impl Rates {
    fn config(&self) -> FaultConfig {
        FaultConfig {
            throttle_rate: self.throttle_rate,
            error_rate: self.error_rate,
            latency_rate: self.latency_rate,
            latency_ms: self.latency_ms,
            unhealthy_targets: self.unhealthy_targets.clone(),
            ..Default::default()
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    titus_obs::process::init_logging("plain", "titus_chaos=info,warn");
    let cli = Cli::parse();
    match real_main(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("titus-chaos: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn one_step(fault: FaultSpec) -> Plan {
    Plan { name: "command line".into(), steps: vec![Step { at: Dur::default(), fault }], ..Default::default() }
}

async fn real_main(cli: Cli) -> Result<ExitCode> {
    let (deployment, seed, report, allow_majority) = (cli.deployment, cli.seed, cli.report, cli.allow_majority);
    let single = |fault: FaultSpec, allow_docker_restart: bool| {
        let mut plan = one_step(fault);
        plan.allow_majority = allow_majority;
        plan.allow_docker_restart = allow_docker_restart;
        let (deployment, report) = (deployment.clone(), report.clone());
        async move { run_plan(&deployment, seed, &plan, report.as_deref()).await }
    };
    match cli.command {
        Command::Kill { target, restart_after } => single(FaultSpec::Kill { target, restart_after }, false).await,
        Command::Pause { target, duration } => single(FaultSpec::Pause { target, duration }, false).await,
        Command::Partition { topology, duration } => single(FaultSpec::Partition { topology, duration }, false).await,
        Command::Skew { target, offset, duration } => single(FaultSpec::Skew { target, offset, duration }, false).await,
        Command::AgentKill { agent, restart_after } => {
            single(FaultSpec::AgentKill { agent, restart_after }, false).await
        }
        Command::AgentIsolate { agent, duration } => single(FaultSpec::AgentIsolate { agent, duration }, false).await,
        Command::ContainerKill { agent, count } => single(FaultSpec::ContainerKill { agent, count }, false).await,
        Command::DockerRestart { allow_docker_restart } => {
            single(FaultSpec::DockerRestart {}, allow_docker_restart).await
        }
        Command::Aws { rates, duration } => {
            let fault = FaultSpec::Aws {
                throttle_rate: rates.throttle_rate,
                error_rate: rates.error_rate,
                latency_rate: rates.latency_rate,
                latency_ms: rates.latency_ms,
                duration,
            };
            single(fault, false).await
        }
        Command::Run { plan } => {
            let mut plan = Plan::load(&plan)?;
            plan.allow_majority |= allow_majority;
            run_plan(&deployment, seed, &plan, report.as_deref()).await
        }
        Command::Experiment { plan } => {
            let mut plan = Plan::load(&plan)?;
            plan.allow_majority |= allow_majority;
            let mut chaos = Chaos::new(Deployment::load(&deployment)?, seed.or(plan.seed))?;
            let result = experiment::run(&mut chaos, &plan, titus_obs::process::shutdown_signal()).await;
            result.print();
            write_report(report.as_deref(), &result)?;
            Ok(match result.verdict {
                Verdict::Pass => ExitCode::SUCCESS,
                Verdict::Fail => ExitCode::from(1),
                Verdict::Aborted => ExitCode::from(3),
            })
        }
        Command::Heal => {
            let mut chaos = Chaos::new(Deployment::load(&deployment)?, seed)?;
            let ok = chaos.heal().await;
            for e in &chaos.events {
                println!("{} {}", if e.ok { " " } else { "✗" }, e.what);
            }
            println!("{}", if ok { "healed" } else { "heal incomplete: see the errors above" });
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Status => {
            let d = Deployment::load(&deployment)?;
            let chaos = Chaos::observer(d.clone())?;
            println!("leader: {}", chaos.leader().await.map_or("none".into(), |l| l.to_string()));
            for f in &chaos.journal.active {
                println!("active fault {}: {} (undo: {:?})", f.id, f.description, f.undo);
            }
            for r in &d.replicas {
                let dropped = titus_chaos::net::dropped(&r.process).unwrap_or_default();
                println!(
                    "replica {}: {}{}{}",
                    r.id,
                    r.process.describe(),
                    if r.process.stopped() { ", paused" } else { "" },
                    if dropped.is_empty() { String::new() } else { format!(", drops {dropped:?}") }
                );
            }
            for a in &d.agents {
                println!("agent {}: {}", a.id, a.process.describe());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Monkey(m) => {
            let servers =
                if m.servers.is_empty() { Deployment::load(&deployment)?.api_addrs() } else { m.servers.clone() };
            let client = titus_client::Client::connect(&servers).map_err(|e| anyhow::anyhow!("{e}"))?;
            let config = MonkeyConfig {
                schedule: m.schedule,
                kills_per_hour: m.kills_per_hour,
                max_per_job_per_day: m.max_per_job_per_day,
                tick: m.tick.0,
                run_for: m.run_for.0,
                dry_run: m.dry_run,
                seed: seed,
                state_file: m.state_file,
                log_file: m.log_file,
            };
            let actions = monkey::run(&client, &config, titus_obs::process::shutdown_signal()).await?;
            let kills = actions.iter().filter(|a| a.action == "kill").count();
            let would = actions.iter().filter(|a| a.action == "would-kill").count();
            eprintln!(
                "chaos monkey: {kills} task(s) terminated, {would} in dry run, {} failed",
                actions.len() - kills - would
            );
            write_report(report.as_deref(), &actions)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::AwsProxy { listen, upstream, rates, run_for } => {
            let proxy = Proxy::start(&listen, &upstream, rates.config()).await?;
            println!(
                "AWS fault proxy on {} → {upstream} (control: {}{})",
                proxy.url(),
                proxy.url(),
                titus_chaos::proxy::CONTROL_PATH
            );
            let limit = run_for.map_or(Duration::MAX, |d| d.0);
            tokio::select! {
                _ = titus_obs::process::shutdown_signal() => {}
                _ = tokio::time::sleep(limit) => {}
            }
            let s = proxy.stats();
            println!(
                "requests {} forwarded {} throttled {} 5xx {} delayed {} denied {}",
                s.requests, s.forwarded, s.throttled, s.errors, s.delayed, s.denied
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab { command: LabCommand::Up { dir, replicas, agents, bin_dir } } => {
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => std::env::current_exe()?.parent().context("binary directory")?.to_path_buf(),
            };
            let lab = Lab::up(&LabSpec { replicas, agents, bin_dir, replica_args: vec![], agent_args: vec![] }, &dir)?;
            let leader = lab.wait_for_leader(Duration::from_secs(60)).await?;
            println!("lab {} up: leader {leader}; deployment file {}", lab.name, lab.deployment_file().display());
            println!("clients: --server {}", lab.deployment.api_addrs().join(","));
            lab.keep();
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab { command: LabCommand::Sweep } => {
            let swept = titus_chaos::lab::sweep()?;
            println!(
                "swept {} lab namespace(s)/bridge(s){}",
                swept.len(),
                if swept.is_empty() { String::new() } else { format!(": {}", swept.join(", ")) }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab { command: LabCommand::Down { dir } } => {
            let mut lab = Lab::open(&dir)?;
            lab.down();
            println!("lab {} down", lab.name);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run_plan(
    deployment: &std::path::Path,
    seed: Option<u64>,
    plan: &Plan,
    report: Option<&std::path::Path>,
) -> Result<ExitCode> {
    let mut chaos = Chaos::new(Deployment::load(deployment)?, seed.or(plan.seed))?;
    let summary = plan::run(&mut chaos, plan, titus_obs::process::shutdown_signal()).await;
    summary.print();
    write_report(report, &summary)?;
    Ok(if summary.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn write_report<T: serde::Serialize>(path: Option<&std::path::Path>, value: &T) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_vec_pretty(value)?).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
