//! `titus`: the command-line client. Parses arguments and calls the SDK; nothing else.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use titus_client::{CapacityGroupSpec, Client, Error, ReadConsistency, Tier};

#[derive(Parser)]
#[command(name = "titus", version, about = "Command-line client of the Titus control plane")]
struct Cli {
    /// Api addresses of any replicas (comma-separated); any one is enough.
    #[arg(
        long,
        short = 's',
        env = "TITUS_SERVERS",
        default_value = "127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003",
        global = true
    )]
    server: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Capacity groups: an application's tier and reserved instances.
    #[command(subcommand, name = "capacity-group")]
    CapacityGroup(CapacityGroupCmd),
    /// Cluster members, leader and membership changes.
    #[command(subcommand)]
    Cluster(ClusterCmd),
}

#[derive(clap::Args)]
struct GroupArgs {
    name: String,
    #[arg(long, value_enum, default_value = "flex")]
    tier: TierArg,
    #[arg(long)]
    cpu: f64,
    #[arg(long)]
    memory_mb: u32,
    #[arg(long)]
    disk_mb: u32,
    #[arg(long)]
    network_mbps: u32,
    #[arg(long, default_value_t = 0)]
    gpu: u32,
    #[arg(long)]
    instances: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum TierArg {
    Critical,
    Flex,
}

#[derive(Subcommand)]
enum CapacityGroupCmd {
    Create(GroupArgs),
    Update(GroupArgs),
    Get {
        name: String,
        /// Read from whichever replica answers, without the leader's read index.
        #[arg(long)]
        stale: bool,
    },
    List {
        #[arg(long)]
        stale: bool,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, roles, leader, term and log positions.
    Status,
    /// Adds a replica: learner first, voter once caught up.
    Add {
        node_id: u64,
        #[arg(long)]
        peer_addr: String,
        #[arg(long)]
        api_addr: String,
    },
    /// Removes a replica.
    Remove { node_id: u64 },
}

fn spec(a: GroupArgs) -> CapacityGroupSpec {
    let tier = match a.tier {
        TierArg::Critical => Tier::Critical,
        TierArg::Flex => Tier::Flex,
    };
    CapacityGroupSpec::new(&a.name, tier, a.cpu, a.memory_mb, a.disk_mb, a.network_mbps, a.instances).gpu(a.gpu)
}

fn consistency(stale: bool) -> ReadConsistency {
    if stale {
        ReadConsistency::Stale
    } else {
        ReadConsistency::Linearizable
    }
}

fn tier_name(t: i32) -> &'static str {
    match Tier::try_from(t) {
        Ok(Tier::Critical) => "critical",
        _ => "flex",
    }
}

fn print_groups(out: Output, groups: &[titus_client::CapacityGroup]) {
    if out == Output::Json {
        let v: Vec<_> = groups.iter().map(group_json).collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!(
        "{:<32} {:<9} {:>6} {:>10} {:>10} {:>8} {:>4} {:>9}",
        "NAME", "TIER", "CPU", "MEMORY_MB", "DISK_MB", "NET_MBPS", "GPU", "INSTANCES"
    );
    for g in groups {
        let r = g.resources_per_instance.clone().unwrap_or_default();
        println!(
            "{:<32} {:<9} {:>6} {:>10} {:>10} {:>8} {:>4} {:>9}",
            g.name,
            tier_name(g.tier),
            r.cpu,
            r.memory_mb,
            r.disk_mb,
            r.network_mbps,
            r.gpu,
            g.instance_count
        );
    }
}

fn group_json(g: &titus_client::CapacityGroup) -> serde_json::Value {
    let r = g.resources_per_instance.clone().unwrap_or_default();
    serde_json::json!({
        "name": g.name, "tier": tier_name(g.tier),
        "resourcesPerInstance": {"cpu": r.cpu, "memoryMB": r.memory_mb, "diskMB": r.disk_mb, "networkMbps": r.network_mbps, "gpu": r.gpu},
        "instanceCount": g.instance_count, "createTimeMs": g.create_time_ms, "updateTimeMs": g.update_time_ms,
    })
}

fn role_name(r: i32) -> &'static str {
    match titus_client::MemberRole::try_from(r) {
        Ok(titus_client::MemberRole::Leader) => "leader",
        Ok(titus_client::MemberRole::Follower) => "follower",
        Ok(titus_client::MemberRole::Learner) => "learner",
        Ok(titus_client::MemberRole::Candidate) => "candidate",
        _ => "unknown",
    }
}

fn print_status(out: Output, s: &titus_client::ClusterStatus) {
    if out == Output::Json {
        let members: Vec<_> = s
            .members
            .iter()
            .map(|m| serde_json::json!({"nodeId": m.node_id, "role": role_name(m.role), "peerAddr": m.peer_addr, "apiAddr": m.api_addr}))
            .collect();
        let v = serde_json::json!({
            "clusterId": s.cluster_id, "answeredBy": s.node_id, "leaderId": s.leader_id, "leaderApiAddr": s.leader_api_addr,
            "term": s.term, "lastLogIndex": s.last_log_index, "lastAppliedIndex": s.last_applied_index, "snapshotIndex": s.snapshot_index,
            "members": members,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!("cluster {}  leader {} ({})  term {}", s.cluster_id, s.leader_id, s.leader_api_addr, s.term);
    println!(
        "answered by replica {}: last log {}, applied {}, snapshot {}",
        s.node_id, s.last_log_index, s.last_applied_index, s.snapshot_index
    );
    println!("{:<8} {:<10} {:<22} {:<22}", "ID", "ROLE", "PEER", "API");
    for m in &s.members {
        println!("{:<8} {:<10} {:<22} {:<22}", m.node_id, role_name(m.role), m.peer_addr, m.api_addr);
    }
}

/// Exit codes scripts can rely on.
fn exit_code(e: &Error) -> u8 {
    match e {
        Error::InvalidArgument { .. } | Error::BadSeed(_) | Error::NoSeeds => 2,
        Error::NotFound(_) => 3,
        Error::AlreadyExists(_) => 4,
        Error::FailedPrecondition(_) => 5,
        Error::Unavailable { .. } => 69,
        Error::Server { .. } => 1,
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    let client = Client::connect([cli.server.as_str()])?;
    let out = cli.output;
    match cli.command {
        Command::CapacityGroup(cmd) => match cmd {
            CapacityGroupCmd::Create(a) => print_groups(out, &[client.create_capacity_group(spec(a)).await?]),
            CapacityGroupCmd::Update(a) => print_groups(out, &[client.update_capacity_group(spec(a)).await?]),
            CapacityGroupCmd::Get { name, stale } => {
                print_groups(out, &[client.get_capacity_group(&name, consistency(stale)).await?])
            }
            CapacityGroupCmd::List { stale } => {
                print_groups(out, &client.list_capacity_groups(consistency(stale)).await?)
            }
            CapacityGroupCmd::Delete { name } => {
                client.delete_capacity_group(&name).await?;
                println!("deleted capacity group {name}");
            }
        },
        Command::Cluster(cmd) => match cmd {
            ClusterCmd::Status => print_status(out, &client.cluster_status().await?),
            ClusterCmd::Add { node_id, peer_addr, api_addr } => {
                print_status(out, &client.add_member(node_id, &peer_addr, &api_addr).await?)
            }
            ClusterCmd::Remove { node_id } => print_status(out, &client.remove_member(node_id).await?),
        },
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("titus: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}
