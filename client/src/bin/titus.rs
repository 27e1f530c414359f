//! `titus`: the command-line client. Parses arguments and calls the SDK; nothing else.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use titus_client::{CapacityGroupSpec, Client, Error, ReadConsistency, Tier};

#[path = "titus/apply.rs"]
mod apply;
#[path = "titus/contexts.rs"]
mod contexts;
#[path = "titus/io.rs"]
mod io;

#[derive(Parser)]
#[command(name = "titus", version, about = "Command-line client of the Titus control plane")]
struct Cli {
    /// Api addresses of any replicas (comma-separated); any one is enough. Default: the
    /// context's, else 127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003.
    #[arg(long, short = 's', env = "TITUS_SERVERS", global = true)]
    server: Option<String>,
    /// The context of the configuration file to use instead of its current one (see `titus config`).
    #[arg(long, env = "TITUS_CONTEXT", global = true)]
    context: Option<String>,
    /// How long a call may take, retries included (default 30s; `job submit --wait` 5m,
    /// `cluster step-down` 10s, `cluster backup` and `restore` 10m): 500ms, 10s, 5m, 1h.
    #[arg(long, global = true, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table", global = true)]
    output: Output,
    /// The cluster CA (PEM): turns TLS on. Without it the CLI speaks plaintext, which only a
    /// cluster in insecure mode accepts.
    #[arg(long, env = "TITUS_CA", global = true)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) and key, from `titus certs init` or `issue`.
    #[arg(long, env = "TITUS_CERT", global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "TITUS_KEY", global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// A bearer token (prefer the environment variable: arguments show in `ps`).
    #[arg(long, env = "TITUS_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
    Yaml,
}

/// A file the CLI could not read or write, named.
fn file_error(path: &Path, e: std::io::Error) -> Error {
    Error::InvalidArgument { message: format!("{}: {e}", path.display()), violations: vec![] }
}

/// `500ms`, `10s`, `5m`, `2h`: a duration flag.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a duration such as 500ms, 10s or 5m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        _ => Err(format!("{s:?}: unit must be ms, s, m or h")),
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
fn format_ms(ms: i64) -> String {
    let (days, rest) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, min, s, milli) = (rest / 3_600_000, rest / 60_000 % 60, rest / 1000 % 60, rest % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// Prints a structured value as JSON or YAML.
fn emit(out: Output, value: &serde_json::Value) {
    match out {
        Output::Yaml => print!("{}", serde_yaml::to_string(value).unwrap_or_default()),
        _ => println!("{}", serde_json::to_string_pretty(value).unwrap_or_default()),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Capacity groups: an application's tier and reserved instances.
    #[command(subcommand, name = "capacity-group")]
    CapacityGroup(CapacityGroupCmd),
    /// Cluster members, leader and membership changes.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Jobs: submit, list, get, resize, kill.
    #[command(subcommand)]
    Job(JobCmd),
    /// Tasks of jobs.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Agents registered with the control plane.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Instance groups: tier and lifecycle of groups of agents.
    #[command(subcommand, name = "instance-group")]
    InstanceGroup(InstanceGroupCmd),
    /// Load balancers: a service job's tasks registered by IP in ALB target groups.
    #[command(subcommand)]
    Lb(LbCmd),
    /// Prints a shell completion script: titus completions bash > /etc/bash_completion.d/titus
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// The audit log: every mutating call, who made it and its result (admins and operators).
    Audit {
        /// Records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only this caller's records, e.g. client/alice.
        #[arg(long)]
        caller: Option<String>,
        /// Only records of methods ending with this, e.g. KillJob.
        #[arg(long)]
        method: Option<String>,
    },
    /// A private CA and certificates for a cluster (files only; no server is called).
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Contexts in the configuration file (~/.config/titus/config.toml, or $TITUS_CLI_CONFIG):
    /// servers and credentials under a name, one of them current.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Lists the contexts; `*` marks the current one.
    GetContexts,
    /// Prints the current context's name.
    CurrentContext,
    /// Makes NAME the current context.
    UseContext {
        /// The context's name.
        name: String,
    },
    /// Creates or updates context NAME with the values given (others are kept).
    SetContext {
        /// The context's name.
        name: String,
        /// Api addresses of any replicas, comma-separated.
        #[arg(long)]
        servers: Option<String>,
        /// The cluster CA (PEM).
        #[arg(long = "ca-file")]
        ca: Option<PathBuf>,
        /// Client certificate (PEM).
        #[arg(long = "cert-file")]
        cert: Option<PathBuf>,
        /// Its key (PEM).
        #[arg(long = "key-file")]
        key: Option<PathBuf>,
        /// A file holding a bearer token (the token is not copied into the configuration).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Also make it the current context.
        #[arg(long)]
        current: bool,
    },
    /// Removes context NAME.
    DeleteContext {
        /// The context's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Makes a CA and the certificates of a cluster in DIR: ca.pem/ca.key, replica-<id>.pem/.key,
    /// agent-<name>, client-<name>. An existing CA in DIR is reused.
    Init {
        /// Where the CA and certificates are written.
        dir: PathBuf,
        /// Replica node ids, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        replicas: Vec<u64>,
        /// Agent ids, comma-separated.
        #[arg(long, value_delimiter = ',')]
        agents: Vec<String>,
        /// Client names, comma-separated (roles are given in the replicas' configuration).
        #[arg(long, value_delimiter = ',', default_value = "admin")]
        clients: Vec<String>,
        #[command(flatten)]
        issue: IssueOpts,
    },
    /// Issues (or replaces) one certificate with the CA in DIR: KIND is replica, agent or client.
    Issue {
        /// The folder holding the CA (ca.pem, ca.key); the certificate is written there.
        dir: PathBuf,
        /// replica, agent or client.
        kind: String,
        /// The replica's node id, the agent's id or the client's name.
        name: String,
        #[command(flatten)]
        issue: IssueOpts,
    },
    /// Prints a new random bearer token and the SHA-256 digest the replicas' configuration holds.
    Token,
}

/// What every issued certificate takes.
#[derive(clap::Args)]
struct IssueOpts {
    /// Host names and addresses a replica is reached at, comma-separated (replicas only).
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    hosts: Vec<String>,
    /// The trust domain the identities are named in (spiffe://<domain>/...).
    #[arg(long, default_value = "titus")]
    trust_domain: String,
    /// Validity, days.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

fn certs_command(cmd: CertsCmd) -> Result<(), Error> {
    use titus_security::{certs, Identity, Kind};
    let invalid = |message: String| Error::InvalidArgument { message, violations: vec![] };
    let cert_error = |e: certs::CertError| invalid(e.to_string());
    let ca_of = |dir: &Path, days: u32| -> Result<certs::Pem, Error> {
        match certs::read_pair(dir, "ca") {
            Ok(pem) => Ok(pem),
            Err(_) if !dir.join("ca.pem").exists() => {
                let pem = certs::new_ca("Titus cluster CA", days.max(365 * 5)).map_err(cert_error)?;
                certs::write_pair(dir, "ca", &pem).map_err(cert_error)?;
                println!("{}", dir.join("ca.pem").display());
                Ok(pem)
            }
            Err(e) => Err(cert_error(e)),
        }
    };
    let issue = |dir: &Path, ca: &certs::Pem, id: Identity, hosts: &[String], domain: &str, days: u32| {
        let hosts: &[String] = if id.kind == Kind::Replica { hosts } else { &[] };
        let pem = certs::issue(ca, &id, domain, hosts, days).map_err(cert_error)?;
        let (cert, _) = certs::write_pair(dir, &certs::stem(&id), &pem).map_err(cert_error)?;
        println!("{}", cert.display());
        Ok::<(), Error>(())
    };
    match cmd {
        CertsCmd::Init { dir, replicas, agents, clients, issue: IssueOpts { hosts, trust_domain, days } } => {
            let ca = ca_of(&dir, days)?;
            let ids = replicas
                .iter()
                .map(|r| Identity::new(Kind::Replica, r.to_string()))
                .chain(agents.iter().map(|a| Identity::new(Kind::Agent, a.clone())))
                .chain(clients.iter().map(|c| Identity::new(Kind::Client, c.clone())));
            for id in ids {
                issue(&dir, &ca, id.map_err(invalid)?, &hosts, &trust_domain, days)?;
            }
        }
        CertsCmd::Issue { dir, kind, name, issue: IssueOpts { hosts, trust_domain, days } } => {
            let kind =
                Kind::parse(&kind).ok_or_else(|| invalid(format!("kind: {kind:?} is not replica, agent or client")))?;
            let ca = certs::read_pair(&dir, "ca").map_err(cert_error)?;
            issue(&dir, &ca, Identity::new(kind, name).map_err(invalid)?, &hosts, &trust_domain, days)?;
        }
        CertsCmd::Token => {
            let token = titus_security::token::generate();
            println!("token:  {token}");
            println!("sha256: {}", titus_security::token::sha256_hex(&token));
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum JobCmd {
    /// Submits a job from a spec file (-f, YAML or JSON; see deploy/examples) or from flags with
    /// the command after `--`; prints its id.
    Submit {
        /// Job spec file (YAML or JSON, Titus's field names; `-`: stdin). The job is described by
        /// the file alone: flags describing it are refused with it.
        #[arg(long, short = 'f', conflicts_with_all = [
            "app", "owner", "image", "cpu", "memory_mb", "batch_size", "desired", "max",
            "capacity_group", "retries", "iam_role", "security_groups", "command",
        ])]
        file: Option<std::path::PathBuf>,
        /// Show the tasks' states as they move, until they are Started (service) or Finished
        /// (batch), within --timeout (default 5m).
        #[arg(long)]
        wait: bool,
        /// The application name.
        #[arg(long, required_unless_present = "file")]
        app: Option<String>,
        /// The owner's email (default owner@example.com).
        #[arg(long)]
        owner: Option<String>,
        /// Image as NAME[:TAG] (default tag latest).
        #[arg(long, required_unless_present = "file")]
        image: Option<String>,
        /// CPUs per task (default 1).
        #[arg(long)]
        cpu: Option<f64>,
        /// Memory per task in MB (default 256).
        #[arg(long)]
        memory_mb: Option<u32>,
        /// A batch job of this many tasks.
        #[arg(long, conflicts_with = "desired")]
        batch_size: Option<u32>,
        /// A service job with this many tasks (min 0, max = desired unless --max).
        #[arg(long)]
        desired: Option<u32>,
        /// A service job's most tasks.
        #[arg(long)]
        max: Option<u32>,
        /// The capacity group (default DEFAULT).
        #[arg(long)]
        capacity_group: Option<String>,
        /// Retries of a failed batch task (default 0).
        #[arg(long)]
        retries: Option<u32>,
        /// IAM role ARN whose credentials the containers get (container credentials endpoint and
        /// instance metadata).
        #[arg(long)]
        iam_role: Option<String>,
        /// Security group id (sg-...) of the job's tasks; repeatable.
        #[arg(long = "security-group")]
        security_groups: Vec<String>,
        /// The command and its arguments, after `--`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Makes the job a spec file describes be as it says (`-`: stdin): the job named by the
    /// file's `id` (as `job get -o yaml` writes it), else the active job of its application and
    /// jobGroupInfo, else a new job. Capacity, enabled, attributes and the disruption budget change in place; a change
    /// to a service's container (resources included) starts a rolling update; a change to
    /// anything else is refused, naming the fields.
    Apply {
        /// The spec file (YAML or JSON; `-`: stdin).
        #[arg(long, short = 'f')]
        file: std::path::PathBuf,
        #[command(flatten)]
        rollout: RolloutFlags,
    },
    /// A dry run of `job apply -f FILE`, committing nothing: where a new job's tasks would land now
    /// and how many would wait and why; for a changed container, where the rolling update's first
    /// step would land and how many steps it takes.
    Plan {
        /// The spec file (YAML or JSON; `-`: stdin).
        #[arg(long, short = 'f')]
        file: std::path::PathBuf,
        #[command(flatten)]
        rollout: RolloutFlags,
    },
    /// A service job's rolling updates (started by `job apply` with a changed container).
    Deploy {
        #[command(subcommand)]
        command: DeployCmd,
    },
    /// Enables a service job (its desired tasks are kept running).
    Enable {
        /// The job's id (or a unique prefix of it).
        id: String,
    },
    /// Disables a service job (no new tasks are started for it).
    Disable {
        /// The job's id (or a unique prefix of it).
        id: String,
    },
    /// Streams the job's changes as they commit, saying what changed (state, size, enabled), until
    /// the job finishes (Ctrl-C to stop earlier). `-o json`: one JSON object per line.
    Watch {
        /// The job's id (or a unique prefix of it).
        id: String,
    },
    /// Jobs (active ones, or as --filter says), with running tasks, size and age.
    List {
        /// Titus filtering criteria as KEY=VALUE (jobState, appName, owner, capacityGroup, jobType, attributes).
        #[arg(long = "filter")]
        filters: Vec<String>,
    },
    /// One job; -o yaml|json: its whole spec, as `submit -f` and `apply -f` read it.
    Get {
        /// The job's id (or a unique prefix of it).
        id: String,
    },
    /// Kills the job: its tasks are stopped and it finishes.
    Kill {
        /// The job's id (or a unique prefix of it).
        id: String,
    },
    /// The output of every task of the job, each line prefixed with the task's index and id.
    Logs {
        /// The job's id (or a unique prefix of it).
        id: String,
        #[command(flatten)]
        logs: LogsFlags,
    },
    /// Sets a service job's desired (and optionally min/max).
    Resize {
        /// The job's id (or a unique prefix of it).
        id: String,
        /// Tasks to keep running.
        #[arg(long)]
        desired: Option<u32>,
        /// Fewest tasks (desired never goes below).
        #[arg(long)]
        min: Option<u32>,
        /// Most tasks (desired never goes above).
        #[arg(long)]
        max: Option<u32>,
    },
}

#[derive(Subcommand)]
enum TaskCmd {
    /// Tasks of a job (finished ones included).
    List {
        /// The job's id (or a unique prefix of it).
        job_id: String,
    },
    /// One task: its state, agent, address and reason.
    Get {
        /// The task's id (or a unique prefix of it).
        id: String,
    },
    /// Kills one task (a service job replaces it unless --shrink).
    Kill {
        /// The task's id (or a unique prefix of it).
        id: String,
        /// Service jobs: also lower desired by one.
        #[arg(long)]
        shrink: bool,
    },
    /// Evicts one task (it is replaced) only if its job's disruption budget allows it now;
    /// otherwise exits 5 saying what holds it back.
    Evict {
        /// The task's id (or a unique prefix of it).
        id: String,
        /// Why, for the task's status.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Why the task is or is not placed (the scheduler's last round).
    Why {
        /// The task's id (or a unique prefix of it).
        id: String,
    },
    /// The task's container output (stdout to stdout, stderr to stderr), running or finished
    /// (a finished task's output is kept by its agent for a while after its container goes).
    Logs {
        /// The task's id (or a unique prefix of it).
        id: String,
        #[command(flatten)]
        logs: LogsFlags,
    },
    /// Runs a command in the task's running container and exits with its exit code
    /// (`titus task exec TASK -- ls /`; `-it -- sh` for a shell).
    Exec {
        /// The task's id (or a unique prefix of it).
        id: String,
        /// Send this terminal's stdin to the command.
        #[arg(long, short = 'i')]
        interactive: bool,
        /// Give the command a terminal (with -i, this one is in raw mode while it runs).
        #[arg(long, short = 't')]
        tty: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DeployCmd {
    /// The job's deployments: the active one's progress (new tasks available of desired, old
    /// tasks left, each step and how long it took), then the last finished ones.
    Status {
        /// The job's id (or a unique prefix of it).
        id: String,
    },
    /// Goes on past the canaries of the job's active deployment.
    Promote {
        /// The job's id (or a unique prefix of it).
        id: String,
    },
    /// Rolls the job's active deployment back to the spec before it.
    Rollback {
        /// The job's id (or a unique prefix of it).
        id: String,
    },
}

/// How a rolling update started by `job apply` replaces tasks.
#[derive(clap::Args)]
struct RolloutFlags {
    /// Tasks below desired the service may have available during the update.
    #[arg(long, default_value_t = 1)]
    max_unavailable: u32,
    /// Tasks above desired the update may run at once.
    #[arg(long, default_value_t = 1)]
    max_surge: u32,
    /// New tasks started first beside the old ones; the update then waits for `deploy promote`
    /// (or --canary-pause).
    #[arg(long, default_value_t = 0)]
    canary: u32,
    /// With --canary: go on by itself this long after the canaries are available (30s, 10m).
    #[arg(long, value_parser = parse_duration)]
    canary_pause: Option<Duration>,
    /// Roll back by itself after this many new tasks fail (0: never).
    #[arg(long, default_value_t = 3)]
    rollback_after: u32,
}

impl RolloutFlags {
    fn strategy(&self) -> titus_client::proto::RolloutStrategy {
        titus_client::proto::RolloutStrategy {
            max_unavailable: self.max_unavailable,
            max_surge: self.max_surge,
            canary: self.canary,
            canary_pause_sec: self.canary_pause.map_or(0, |d| d.as_secs().max(1)),
            rollback_after_failures: self.rollback_after,
        }
    }
}

#[derive(clap::Args)]
struct LogsFlags {
    /// Go on with what the container prints until it stops (Ctrl-C to stop).
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only the last N lines.
    #[arg(long)]
    tail: Option<u32>,
    /// Only what was printed in the last DURATION (30s, 5m, 2h).
    #[arg(long, value_parser = parse_duration)]
    since: Option<Duration>,
    /// Each line starts with when it was printed (RFC 3339, UTC).
    #[arg(long)]
    timestamps: bool,
    /// Only stdout.
    #[arg(long, conflicts_with = "stderr")]
    stdout: bool,
    /// Only stderr.
    #[arg(long)]
    stderr: bool,
}

impl LogsFlags {
    fn args(&self) -> io::LogsArgs {
        io::LogsArgs {
            follow: self.follow,
            tail: self.tail,
            since: self.since,
            timestamps: self.timestamps,
            stdout: self.stdout,
            stderr: self.stderr,
        }
    }
}

#[derive(Subcommand)]
enum LbCmd {
    /// Associates a service job with a target group (type ip) by its ARN.
    Add {
        /// The service job's id.
        job_id: String,
        /// The target group's ARN.
        target_group_arn: String,
    },
    /// Dissociates them: the job's targets are deregistered (its tasks keep running).
    Remove {
        /// The service job's id.
        job_id: String,
        /// The target group's ARN.
        target_group_arn: String,
    },
    /// Target groups of one job, or of every job, with their registered targets.
    List {
        /// The job's id; none: every job's.
        job_id: Option<String>,
    },
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Registered agents: state, health, tasks and resources used of total.
    List,
    /// One agent.
    Get {
        /// The agent's id.
        id: String,
    },
    /// Drains an agent: no new tasks, its service tasks move elsewhere as their jobs' disruption
    /// budgets allow (batch tasks finish where they run). Shows what is left and why each task
    /// waits; run it again to see progress.
    Drain {
        /// The agent's id.
        id: String,
        /// Puts the agent back in service instead.
        #[arg(long)]
        undo: bool,
        /// Waits until no task is left on it (bounded by --timeout).
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
enum InstanceGroupCmd {
    /// Creates or replaces a group. With --image-id the control plane launches and terminates its
    /// EC2 instances itself, between --min and --max.
    Create {
        /// The group's id (agents name it as their instance group).
        id: String,
        /// Critical or flex: which tier's tasks its agents take.
        #[arg(long, value_enum, default_value = "flex")]
        tier: TierArg,
        /// Where it starts in its lifecycle.
        #[arg(long, value_enum, default_value = "active")]
        lifecycle: LifecycleArg,
        /// EC2 AMI of the group's instances (turns on EC2 capacity for the group).
        #[arg(long, requires_all = ["instance_type", "instance_cpu", "instance_memory_mb"])]
        image_id: Option<String>,
        /// EC2 instance type of the group's instances (m5.large).
        #[arg(long)]
        instance_type: Option<String>,
        /// What one instance offers to tasks (sizes scale-ups).
        #[arg(long)]
        instance_cpu: Option<f64>,
        /// Memory one instance offers to tasks, MB.
        #[arg(long)]
        instance_memory_mb: Option<u32>,
        /// A subnet instances are launched in; repeatable.
        #[arg(long = "subnet")]
        subnets: Vec<String>,
        /// A security group of the instances; repeatable.
        #[arg(long = "security-group")]
        security_groups: Vec<String>,
        /// An EC2 tag of the instances as KEY=VALUE; repeatable.
        #[arg(long = "tag", value_parser = parse_key_value)]
        tags: Vec<(String, String)>,
        /// Fewest instances.
        #[arg(long, default_value_t = 0)]
        min: u32,
        /// Instances wanted now (the capacity manager moves it within [min, max]).
        #[arg(long, default_value_t = 0)]
        desired: u32,
        /// Most instances.
        #[arg(long, default_value_t = 0)]
        max: u32,
    },
    /// Instance groups: tier, lifecycle and instance counts.
    List,
    /// Moves a group through its lifecycle (phased-out: no new tasks on its agents).
    Lifecycle {
        /// The group's id.
        id: String,
        /// inactive, active, phased-out or removable.
        #[arg(value_enum)]
        lifecycle: LifecycleArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LifecycleArg {
    Inactive,
    Active,
    PhasedOut,
    Removable,
}

impl LifecycleArg {
    fn proto(self) -> titus_client::proto::InstanceGroupLifecycle {
        use titus_client::proto::InstanceGroupLifecycle as L;
        match self {
            LifecycleArg::Inactive => L::IgInactive,
            LifecycleArg::Active => L::IgActive,
            LifecycleArg::PhasedOut => L::IgPhasedOut,
            LifecycleArg::Removable => L::IgRemovable,
        }
    }
}

#[derive(clap::Args)]
struct GroupArgs {
    /// The capacity group's name (jobs name it in capacityGroup).
    name: String,
    /// Critical: reserved capacity, placed first; flex: what is left.
    #[arg(long, value_enum, default_value = "flex")]
    tier: TierArg,
    /// CPUs of one reserved instance.
    #[arg(long)]
    cpu: f64,
    /// Memory of one reserved instance, MB.
    #[arg(long)]
    memory_mb: u32,
    /// Disk of one reserved instance, MB.
    #[arg(long)]
    disk_mb: u32,
    /// Network bandwidth of one reserved instance, Mbps.
    #[arg(long)]
    network_mbps: u32,
    /// GPUs of one reserved instance.
    #[arg(long, default_value_t = 0)]
    gpu: u32,
    /// How many instances of that size the group reserves (its quota).
    #[arg(long)]
    instances: u32,
    /// Linux capabilities (without CAP_, e.g. NET_RAW) the group's jobs may ask for; repeatable.
    #[arg(long = "allow-capability")]
    allow_capabilities: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum TierArg {
    Critical,
    Flex,
}

#[derive(Subcommand)]
enum CapacityGroupCmd {
    /// Creates a capacity group.
    Create(GroupArgs),
    /// Replaces a capacity group's tier and reservation.
    Update(GroupArgs),
    /// One capacity group.
    Get {
        /// The capacity group's name.
        name: String,
        /// Read from whichever replica answers, without the leader's read index.
        #[arg(long)]
        stale: bool,
    },
    /// Every capacity group.
    List {
        /// Read from whichever replica answers, without the leader's read index.
        #[arg(long)]
        stale: bool,
    },
    /// Deletes a capacity group no active job uses.
    Delete {
        /// The capacity group's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, roles, leader, term and log positions.
    Status,
    /// The members and their roles only.
    Members,
    /// Adds a replica: learner first, voter once caught up.
    Add {
        /// The new replica's node id (unique, never reused).
        node_id: u64,
        /// Its peer port's address (host:port), where replicas reach it.
        #[arg(long)]
        peer_addr: String,
        /// Its api port's address (host:port), where clients and agents reach it.
        #[arg(long)]
        api_addr: String,
    },
    /// Removes a replica.
    Remove {
        /// The replica's node id.
        node_id: u64,
    },
    /// Moves leadership away from the current leader (before restarting it in a rolling upgrade);
    /// waits --timeout (default 10s) for another replica to be elected.
    StepDown,
    /// Writes the cluster's state (jobs, tasks, capacity groups, agents, load balancers) to FILE.
    Backup {
        /// Where the backup is written.
        file: PathBuf,
    },
    /// Loads a backup FILE into an empty cluster, replacing its state.
    Restore {
        /// A file `cluster backup` wrote.
        file: PathBuf,
        /// Replace the state even when the cluster holds jobs, tasks, capacity groups or load balancers.
        #[arg(long)]
        force: bool,
    },
}

fn spec(a: GroupArgs) -> CapacityGroupSpec {
    let tier = match a.tier {
        TierArg::Critical => Tier::Critical,
        TierArg::Flex => Tier::Flex,
    };
    let caps: Vec<&str> = a.allow_capabilities.iter().map(String::as_str).collect();
    CapacityGroupSpec::new(&a.name, tier, a.cpu, a.memory_mb, a.disk_mb, a.network_mbps, a.instances)
        .gpu(a.gpu)
        .allow_capabilities(&caps)
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
    if out != Output::Table {
        let v: Vec<_> = groups.iter().map(group_json).collect();
        emit(out, &serde_json::json!(v));
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
    if out != Output::Table {
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
        emit(out, &serde_json::json!(v));
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

/// Where and as whom the CLI calls: flags and environment variables first, then the context.
struct Target {
    servers: String,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    token: Option<String>,
}

const DEFAULT_SERVERS: &str = "127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003";

fn resolve(cli: &Cli) -> Result<Target, Error> {
    let config = match contexts::path() {
        Some(p) => contexts::CliConfig::load(&p)?,
        None => contexts::CliConfig::default(),
    };
    let context = config.context(cli.context.as_deref())?.map(|(_, c)| c.clone()).unwrap_or_default();
    // A certificate and its key come together: a flag pair replaces the context's pair.
    let (cert, key) = match (&cli.cert, &cli.key) {
        (Some(c), Some(k)) => (Some(c.clone()), Some(k.clone())),
        _ => (context.cert.clone(), context.key.clone()),
    };
    let token = match (&cli.token, &context.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(file)) => Some(contexts::read_token(file)?),
        (None, None) => None,
    };
    let servers = cli.server.clone().filter(|s| !s.trim().is_empty());
    let servers = servers.or_else(|| Some(context.servers.clone()).filter(|s| !s.is_empty()));
    Ok(Target {
        servers: servers.unwrap_or_else(|| DEFAULT_SERVERS.to_string()),
        ca: cli.ca.clone().or(context.ca.clone()),
        cert,
        key,
        token,
    })
}

fn config_command(out: Output, cmd: ConfigCmd) -> Result<(), Error> {
    let path = contexts::path().ok_or_else(|| Error::InvalidArgument {
        message: "no configuration file: neither TITUS_CLI_CONFIG, XDG_CONFIG_HOME nor HOME is set".into(),
        violations: vec![],
    })?;
    let mut config = contexts::CliConfig::load(&path)?;
    match cmd {
        ConfigCmd::GetContexts => {
            if out != Output::Table {
                let v = serde_json::json!({"currentContext": config.current_context, "contexts": config.contexts, "file": path.display().to_string()});
                emit(out, &v);
                return Ok(());
            }
            println!("{:<8} {:<20} {:<48} AUTH", "CURRENT", "NAME", "SERVERS");
            for (name, c) in &config.contexts {
                let auth = match (&c.ca, &c.cert, &c.token_file) {
                    (None, _, _) => "plaintext",
                    (Some(_), Some(_), _) => "certificate",
                    (Some(_), None, Some(_)) => "token",
                    (Some(_), None, None) => "tls, no credential",
                };
                let current = if *name == config.current_context { "*" } else { "" };
                println!("{current:<8} {name:<20} {:<48} {auth}", c.servers);
            }
        }
        ConfigCmd::CurrentContext => match config.current_context.as_str() {
            "" => return Err(Error::NotFound(format!("no current context in {}", path.display()))),
            name => done(out, name.to_string(), serde_json::json!({"currentContext": name})),
        },
        ConfigCmd::UseContext { name } => {
            config.context(Some(&name))?;
            config.current_context = name.clone();
            config.save(&path)?;
            done(out, format!("switched to context {name:?}"), serde_json::json!({"currentContext": name}));
        }
        ConfigCmd::SetContext { name, servers, ca, cert, key, token_file, current } => {
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_whitespace) {
                return Err(Error::InvalidArgument {
                    message: "name: 1-128 characters, no spaces".into(),
                    violations: vec![],
                });
            }
            if cert.is_some() != key.is_some() {
                return Err(Error::InvalidArgument {
                    message: "--cert-file and --key-file go together".into(),
                    violations: vec![],
                });
            }
            let absolute = |p: Option<PathBuf>| p.map(|p| std::path::absolute(&p).unwrap_or(p));
            let c = config.contexts.entry(name.clone()).or_default();
            if let Some(v) = servers {
                c.servers = v;
            }
            if let Some(v) = absolute(ca) {
                c.ca = Some(v);
            }
            if let (Some(cert), Some(key)) = (absolute(cert), absolute(key)) {
                c.cert = Some(cert);
                c.key = Some(key);
            }
            if let Some(v) = absolute(token_file) {
                c.token_file = Some(v);
            }
            if current || config.current_context.is_empty() {
                config.current_context = name.clone();
            }
            config.save(&path)?;
            done(
                out,
                format!("context {name:?} written to {}", path.display()),
                serde_json::json!({"context": name, "file": path.display().to_string()}),
            );
        }
        ConfigCmd::DeleteContext { name } => {
            if config.contexts.remove(&name).is_none() {
                return Err(Error::NotFound(format!("context {name:?} is not in {}", path.display())));
            }
            if config.current_context == name {
                config.current_context.clear();
            }
            config.save(&path)?;
            done(out, format!("context {name:?} deleted"), serde_json::json!({"context": name, "deleted": true}));
        }
    }
    Ok(())
}

/// Says what a command did: a line for people, or `value` as JSON or YAML.
fn done(out: Output, line: String, value: serde_json::Value) {
    if out == Output::Table {
        println!("{line}");
    } else {
        emit(out, &value);
    }
}

/// Exit codes scripts can rely on.
/// `job submit --wait`: the job finished without succeeding (a batch job's tasks failed beyond
/// their retries, or the job was killed).
const JOB_FAILED: u8 = 6;

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
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "titus", &mut std::io::stdout());
        return Ok(());
    }
    if let Command::Certs(cmd) = cli.command {
        return certs_command(cmd);
    }
    if let Command::Config(cmd) = cli.command {
        return config_command(cli.output, cmd);
    }
    let target = resolve(&cli)?;
    let mut options =
        titus_client::ClientOptions { unreachable_after: Some(Duration::from_secs(5)), ..Default::default() };
    if let Some(t) = cli.timeout {
        options.deadline = t;
        options.attempt_timeout = options.attempt_timeout.min(t);
    }
    if let Some(ca) = &target.ca {
        options = options.with_tls(ca, target.cert.clone().zip(target.key.clone()))?;
    } else if target.cert.is_some() {
        return Err(Error::InvalidArgument {
            message: "--cert needs --ca (the cluster CA)".into(),
            violations: vec![],
        });
    }
    if let Some(token) = &target.token {
        options = options.with_token(token.trim());
    }
    let client = Client::with_options([target.servers.as_str()], options)?;
    let timeout = cli.timeout;
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
                done(
                    out,
                    format!("deleted capacity group {name}"),
                    serde_json::json!({"capacityGroup": name, "deleted": true}),
                );
            }
        },
        Command::Job(cmd) => job_command(&client, out, timeout, cmd).await?,
        Command::Completions { .. } | Command::Certs(_) | Command::Config(_) => {}
        Command::Audit { after, limit, caller, method } => {
            let query = titus_client::proto::AuditQuery {
                after_sequence: after,
                limit,
                caller: caller.unwrap_or_default(),
                method: method.unwrap_or_default(),
            };
            let page = client.audit_records(query).await?;
            if out == Output::Table {
                println!(
                    "{:<6} {:<24} {:<18} {:<44} {:<18} {:<16} MESSAGE",
                    "SEQ", "TIME", "CALLER", "METHOD", "TARGET", "RESULT"
                );
                for r in &page.records {
                    println!(
                        "{:<6} {:<24} {:<18} {:<44} {:<18} {:<16} {}",
                        r.sequence,
                        format_ms(r.time_ms),
                        r.caller,
                        r.method,
                        r.target,
                        r.code,
                        r.message
                    );
                }
                if page.last_sequence > after {
                    println!(
                        "(looked up to sequence {}; next page: --after {})",
                        page.last_sequence, page.last_sequence
                    );
                }
            } else {
                let v: Vec<_> = page
                    .records
                    .iter()
                    .map(|r| serde_json::json!({"sequence": r.sequence, "timeMs": r.time_ms, "caller": r.caller, "method": r.method, "target": r.target, "code": r.code, "message": r.message, "replica": r.replica, "requestId": r.request_id}))
                    .collect();
                emit(out, &serde_json::json!({"records": v, "lastSequence": page.last_sequence}));
            }
        }
        Command::Task(cmd) => match with_full_task_id(&client, cmd).await? {
            TaskCmd::List { job_id } => {
                let tasks = client.find_tasks(&[("jobIds", job_id.as_str())], 1000, "").await?.items;
                if tasks.is_empty() {
                    // No tasks, or no such job: an unknown job is "not found" (exit 3), not an
                    // empty table.
                    client.find_job(&job_id).await?;
                }
                print_tasks(out, &tasks, &pending_reasons(&client, &tasks).await);
            }
            TaskCmd::Get { id } => {
                let tasks = [client.find_task(&id).await?];
                print_tasks(out, &tasks, &pending_reasons(&client, &tasks).await)
            }
            TaskCmd::Why { id } => {
                let r = client.scheduling_result(&id).await?;
                let state = titus_client::proto::scheduling_result::State::try_from(r.state)
                    .map(|s| s.as_str_name())
                    .unwrap_or("STATE_UNSPECIFIED");
                if out == Output::Table {
                    match r.state() {
                        titus_client::proto::scheduling_result::State::Placed => {
                            println!("{}: {}", r.task_id, r.message)
                        }
                        titus_client::proto::scheduling_result::State::Waiting => {
                            println!("{}: waiting ({}): {}", r.task_id, r.reason, r.message)
                        }
                        _ => println!("{}: {}", r.task_id, r.message),
                    }
                } else {
                    emit(
                        out,
                        &serde_json::json!({"taskId": r.task_id, "state": state, "agentId": r.agent_id, "reason": r.reason, "message": r.message, "roundTimestamp": r.round_timestamp}),
                    );
                }
            }
            TaskCmd::Kill { id, shrink } => {
                client.kill_task(&id, shrink, false).await?;
                done(
                    out,
                    format!("kill requested for task {id}"),
                    serde_json::json!({"task": id, "kill": "requested", "shrink": shrink}),
                );
            }
            TaskCmd::Evict { id, reason } => {
                client.evict_task(&id, &reason).await?;
                done(out, format!("task {id} evicted"), serde_json::json!({"task": id, "evicted": true}));
            }
            TaskCmd::Logs { id, logs } => io::task_logs(&client, &id, &logs.args()).await?,
            TaskCmd::Exec { id, interactive, tty, command } => {
                let code = io::exec(&client, &id, command, interactive, tty).await?;
                // Out at once with the command's code: a reader of this terminal's stdin may still
                // be blocked (the runtime would wait for it at its end).
                use std::io::Write;
                let _ = std::io::stdout().flush();
                std::process::exit(if (0..=255).contains(&code) { code } else { 1 });
            }
        },
        Command::Agent(AgentCmd::Drain { id, undo, wait }) => {
            let mut status = client.drain_agent(&id, !undo).await?;
            while wait && !undo && !status.tasks.is_empty() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                status = client.drain_status(&id).await?;
            }
            print_drain(out, &status);
        }
        Command::Agent(AgentCmd::Get { id }) => {
            let a = client.get_agent(&id).await?;
            let r = a.resources.clone().unwrap_or_default();
            let u = a.allocated.clone().unwrap_or_default();
            let v = serde_json::json!({
                "id": a.id, "instanceGroup": a.instance_group, "healthy": a.healthy, "unhealthyReason": a.unhealthy_reason, "terminating": a.terminating, "draining": a.draining,
                "lost": a.state == titus_client::proto::AgentState::AgentLost as i32, "liveTasks": a.live_tasks,
                "resources": {"cpu": r.cpu, "memoryMB": r.memory_mb, "diskMB": r.disk_mb, "networkMbps": r.network_mbps, "gpu": r.gpu},
                "allocated": {"cpu": u.cpu, "memoryMB": u.memory_mb, "diskMB": u.disk_mb, "networkMbps": u.network_mbps, "gpu": u.gpu},
                "attributes": a.attributes,
            });
            emit(if out == Output::Table { Output::Yaml } else { out }, &v);
        }
        Command::InstanceGroup(cmd) => {
            let groups = match cmd {
                InstanceGroupCmd::Create {
                    id,
                    tier,
                    lifecycle,
                    image_id,
                    instance_type,
                    instance_cpu,
                    instance_memory_mb,
                    subnets,
                    security_groups,
                    tags,
                    min,
                    desired,
                    max,
                } => {
                    let tier = match tier {
                        TierArg::Critical => Tier::Critical,
                        TierArg::Flex => Tier::Flex,
                    };
                    let launch = image_id.map(|image_id| titus_client::proto::LaunchSettings {
                        image_id,
                        instance_type: instance_type.unwrap_or_default(),
                        subnet_ids: subnets,
                        security_group_ids: security_groups,
                        tags: tags.into_iter().collect(),
                        instance_resources: Some(titus_client::proto::AgentResources {
                            cpu: instance_cpu.unwrap_or_default(),
                            memory_mb: instance_memory_mb.unwrap_or_default(),
                            ..Default::default()
                        }),
                    });
                    let group = titus_client::proto::InstanceGroup {
                        id,
                        tier: tier as i32,
                        lifecycle: lifecycle.proto() as i32,
                        launch,
                        min,
                        desired,
                        max,
                        ..Default::default()
                    };
                    vec![client.put_instance_group(group).await?]
                }
                InstanceGroupCmd::List => client.list_instance_groups().await?,
                InstanceGroupCmd::Lifecycle { id, lifecycle } => {
                    client.update_instance_group_lifecycle(&id, lifecycle.proto()).await?;
                    let now = lifecycle.proto().as_str_name();
                    done(
                        out,
                        format!("instance group {id} is now {now}"),
                        serde_json::json!({"instanceGroup": id, "lifecycle": now}),
                    );
                    return Ok(());
                }
            };
            let v: Vec<_> = groups
                .iter()
                .map(|g| {
                    let lifecycle = titus_client::proto::InstanceGroupLifecycle::try_from(g.lifecycle)
                        .map(|l| l.as_str_name())
                        .unwrap_or("?");
                    serde_json::json!({"id": g.id, "tier": tier_name(g.tier), "lifecycle": lifecycle, "min": g.min, "desired": g.desired, "max": g.max, "ec2": g.launch.is_some()})
                })
                .collect();
            if out == Output::Table {
                println!("{:<24} {:<9} {:<14} {:>4} {:>8} {:>4}", "ID", "TIER", "LIFECYCLE", "MIN", "DESIRED", "MAX");
                for g in &v {
                    println!(
                        "{:<24} {:<9} {:<14} {:>4} {:>8} {:>4}",
                        g["id"].as_str().unwrap_or(""),
                        g["tier"].as_str().unwrap_or(""),
                        g["lifecycle"].as_str().unwrap_or(""),
                        g["min"],
                        g["desired"],
                        g["max"]
                    );
                }
            } else {
                emit(out, &serde_json::json!(v));
            }
        }
        Command::Lb(cmd) => match cmd {
            LbCmd::Add { job_id, target_group_arn } => {
                client.add_load_balancer(&job_id, &target_group_arn).await?;
                done(
                    out,
                    format!("job {job_id} is associated with {target_group_arn}"),
                    serde_json::json!({"job": job_id, "targetGroup": target_group_arn, "associated": true}),
                );
            }
            LbCmd::Remove { job_id, target_group_arn } => {
                client.remove_load_balancer(&job_id, &target_group_arn).await?;
                done(
                    out,
                    format!("job {job_id} is no longer associated with {target_group_arn}"),
                    serde_json::json!({"job": job_id, "targetGroup": target_group_arn, "associated": false}),
                );
            }
            LbCmd::List { job_id } => {
                let all = match job_id {
                    Some(job_id) => {
                        let load_balancers = client.job_load_balancers(&job_id).await?;
                        vec![titus_client::proto::GetJobLoadBalancersResult { job_id, load_balancers }]
                    }
                    None => client.all_load_balancers().await?,
                };
                print_load_balancers(out, &all);
            }
        },
        Command::Agent(AgentCmd::List) => {
            let agents = client.find_agents().await?;
            if out != Output::Table {
                let v: Vec<_> = agents
                    .iter()
                    .map(|a| {
                        let (r, u) = (a.resources.unwrap_or_default(), a.allocated.unwrap_or_default());
                        serde_json::json!({"id": a.id, "instanceGroup": a.instance_group, "healthy": a.healthy, "terminating": a.terminating, "draining": a.draining, "lost": a.state == titus_client::proto::AgentState::AgentLost as i32, "liveTasks": a.live_tasks, "attributes": a.attributes, "registeredMs": a.registered_ms,
                            "resources": {"cpu": r.cpu, "memoryMB": r.memory_mb, "diskMB": r.disk_mb, "networkMbps": r.network_mbps, "gpu": r.gpu},
                            "allocated": {"cpu": u.cpu, "memoryMB": u.memory_mb, "diskMB": u.disk_mb, "networkMbps": u.network_mbps, "gpu": u.gpu}})
                    })
                    .collect();
                emit(out, &serde_json::json!(v));
            } else {
                println!(
                    "{:<28} {:<12} {:<8} {:<8} {:>6} {:>11} {:>13} {:>5}",
                    "ID", "GROUP", "STATE", "HEALTHY", "TASKS", "CPU", "MEMORY(MB)", "AGE"
                );
                for a in agents {
                    let state = if a.state == titus_client::proto::AgentState::AgentLost as i32 {
                        "lost"
                    } else if a.terminating {
                        "terminating"
                    } else if a.draining {
                        "draining"
                    } else {
                        "online"
                    };
                    let (r, u) = (a.resources.unwrap_or_default(), a.allocated.unwrap_or_default());
                    println!(
                        "{:<28} {:<12} {:<8} {:<8} {:>6} {:>11} {:>13} {:>5}",
                        a.id,
                        a.instance_group,
                        state,
                        a.healthy,
                        a.live_tasks,
                        format!("{}/{}", u.cpu, r.cpu),
                        format!("{}/{}", u.memory_mb, r.memory_mb),
                        age(a.registered_ms)
                    );
                }
            }
        }
        Command::Cluster(cmd) => match cmd {
            ClusterCmd::Status => print_status(out, &client.cluster_status().await?),
            ClusterCmd::Members => {
                let s = client.cluster_status().await?;
                if out == Output::Table {
                    println!("{:<8} {:<10} {:<22} {:<22}", "ID", "ROLE", "PEER", "API");
                    for m in &s.members {
                        println!("{:<8} {:<10} {:<22} {:<22}", m.node_id, role_name(m.role), m.peer_addr, m.api_addr);
                    }
                } else {
                    let v: Vec<_> = s
                        .members
                        .iter()
                        .map(|m| serde_json::json!({"nodeId": m.node_id, "role": role_name(m.role), "peerAddr": m.peer_addr, "apiAddr": m.api_addr}))
                        .collect();
                    emit(out, &serde_json::json!(v));
                }
            }
            ClusterCmd::Add { node_id, peer_addr, api_addr } => {
                print_status(out, &client.add_member(node_id, &peer_addr, &api_addr).await?)
            }
            ClusterCmd::Remove { node_id } => print_status(out, &client.remove_member(node_id).await?),
            ClusterCmd::StepDown => {
                print_status(out, &client.step_down(timeout.unwrap_or(Duration::from_secs(10))).await?)
            }
            ClusterCmd::Backup { file } => {
                let backup = client.backup(timeout.unwrap_or(Duration::from_secs(600))).await?;
                // Written aside and renamed, so a failed write never leaves a truncated backup.
                let partial = file.with_extension("partial");
                std::fs::write(&partial, &backup.data).map_err(|e| file_error(&partial, e))?;
                std::fs::rename(&partial, &file).map_err(|e| file_error(&file, e))?;
                let summary = serde_json::json!({
                    "file": file.display().to_string(),
                    "bytes": backup.data.len(),
                    "clusterId": backup.cluster_id,
                    "appliedIndex": backup.applied_index,
                });
                if out == Output::Table {
                    println!(
                        "backup of cluster {} at index {}: {} bytes written to {}",
                        backup.cluster_id,
                        backup.applied_index,
                        backup.data.len(),
                        file.display()
                    );
                } else {
                    emit(out, &summary);
                }
            }
            ClusterCmd::Restore { file, force } => {
                let timeout = timeout.unwrap_or(Duration::from_secs(600));
                let data = std::fs::read(&file).map_err(|e| file_error(&file, e))?;
                let r = client.restore(data, force, timeout).await?;
                if out == Output::Table {
                    println!(
                        "restored {} records ({} jobs, {} tasks, {} capacity groups) in {} entries",
                        r.records, r.jobs, r.tasks, r.capacity_groups, r.entries
                    );
                } else {
                    emit(
                        out,
                        &serde_json::json!({"records": r.records, "jobs": r.jobs, "tasks": r.tasks, "capacityGroups": r.capacity_groups, "entries": r.entries}),
                    );
                }
            }
        },
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    // A shell tool ends quietly when what reads its output goes away (`titus job list | head -1`),
    // as `ls` does: Rust ignores SIGPIPE, so every print to a closed pipe would panic instead.
    #[cfg(unix)]
    // SAFETY: sets the process-wide disposition of one signal to its default; no handler is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let plaintext = resolve(&cli).map_or(true, |t| t.ca.is_none());
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("titus: {e}");
            if plaintext && matches!(e, Error::Unavailable { .. }) {
                eprintln!(
                    "titus: (this call was plaintext; a cluster with TLS needs --ca and --cert/--key or --token, \
                     or TITUS_CA, TITUS_CERT, TITUS_KEY, TITUS_TOKEN)"
                );
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

fn state_name(task_state: i32) -> &'static str {
    use titus_client::proto::TaskState as S;
    match S::try_from(task_state) {
        Ok(S::TaskAccepted) => "Accepted",
        Ok(S::TaskLaunched) => "Launched",
        Ok(S::TaskStartInitiated) => "StartInitiated",
        Ok(S::TaskStarted) => "Started",
        Ok(S::TaskKillInitiated) => "KillInitiated",
        Ok(S::TaskFinished) => "Finished",
        Err(_) => "?",
    }
}

fn job_state_name(s: i32) -> &'static str {
    use titus_client::proto::JobState as S;
    match S::try_from(s) {
        Ok(S::JobAccepted) => "Accepted",
        Ok(S::JobKillInitiated) => "KillInitiated",
        Ok(S::JobFinished) => "Finished",
        Err(_) => "?",
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

fn print_drain(out: Output, s: &titus_client::proto::DrainStatus) {
    if out != Output::Table {
        let tasks: Vec<_> = s
            .tasks
            .iter()
            .map(|t| serde_json::json!({"taskId": t.task_id, "jobId": t.job_id, "state": state_name(t.state), "waiting": t.waiting}))
            .collect();
        emit(out, &serde_json::json!({"agent": s.agent_id, "draining": s.draining, "tasks": tasks}));
        return;
    }
    let what = if s.draining { "draining" } else { "in service" };
    println!("agent {} is {what}; {} live task(s) on it", s.agent_id, s.tasks.len());
    if s.tasks.is_empty() {
        return;
    }
    println!("{:<38} {:<38} {:<15} {}", "TASK", "JOB", "STATE", "WAITING");
    for t in &s.tasks {
        let waiting = if t.waiting.is_empty() && s.draining { "moves next" } else { t.waiting.as_str() };
        println!("{:<38} {:<38} {:<15} {}", t.task_id, t.job_id, state_name(t.state), waiting);
    }
}

fn print_load_balancers(out: Output, all: &[titus_client::proto::GetJobLoadBalancersResult]) {
    use titus_client::proto::{LoadBalancerState, LoadBalancerTargetState};
    let state = |s: i32| match LoadBalancerState::try_from(s) {
        Ok(LoadBalancerState::LbOrphaned) => "orphaned",
        _ => "active",
    };
    let target_state = |s: i32| match LoadBalancerTargetState::try_from(s) {
        Ok(LoadBalancerTargetState::TargetRegistering) => "registering",
        Ok(LoadBalancerTargetState::TargetRegistered) => "registered",
        Ok(LoadBalancerTargetState::TargetDeregistering) => "deregistering",
        _ => "deregistered",
    };
    if out == Output::Table {
        println!("{:<38} {:<9} {:>7} {:>7}  {}", "JOB", "STATE", "TARGETS", "HEALTHY", "TARGET GROUP");
        for j in all {
            for lb in &j.load_balancers {
                let registered: Vec<_> =
                    lb.targets.iter().filter(|t| t.state == LoadBalancerTargetState::TargetRegistered as i32).collect();
                let healthy = registered.iter().filter(|t| t.health == "healthy").count();
                println!("{:<38} {:<9} {:>7} {:>7}  {}", j.job_id, state(lb.state), registered.len(), healthy, lb.id);
                if !lb.state_message.is_empty() {
                    println!("{:<38} {}", "", lb.state_message);
                }
            }
        }
        return;
    }
    let v: Vec<_> = all
        .iter()
        .flat_map(|j| {
            j.load_balancers.iter().map(move |lb| {
                serde_json::json!({
                    "jobId": j.job_id, "targetGroup": lb.id, "state": state(lb.state), "message": lb.state_message,
                    "targets": lb.targets.iter().map(|t| serde_json::json!({
                        "taskId": t.task_id, "ip": t.ip, "state": target_state(t.state), "updatedMs": t.updated_ms, "health": t.health,
                    })).collect::<Vec<_>>(),
                })
            })
        })
        .collect();
    emit(out, &serde_json::json!(v));
}

/// Prints tasks by index (then id); `pending` holds why Accepted tasks wait, by task id.
fn print_tasks(out: Output, tasks: &[titus_client::Task], pending: &std::collections::HashMap<String, String>) {
    let mut tasks: Vec<&titus_client::Task> = tasks.iter().collect();
    tasks.sort_by(|a, b| (a.index, &a.id).cmp(&(b.index, &b.id)));
    if out != Output::Table {
        let v: Vec<_> = tasks
            .iter()
            .map(|t| {
                let s = t.status.clone().unwrap_or_default();
                let mut v = serde_json::json!({"id": t.id, "jobId": t.job_id, "index": t.index, "state": state_name(s.state), "reasonCode": s.reason_code, "reasonMessage": s.reason_message, "context": t.task_context, "createdMs": task_created_ms(t), "stateSinceMs": s.timestamp_ms});
                if let Some(why) = pending.get(&t.id) {
                    v["pendingReason"] = serde_json::json!(why);
                }
                if let Some(r) = &t.resources {
                    v["resources"] = serde_json::json!({"cpu": r.cpu, "memoryMB": r.memory_mb, "diskMB": r.disk_mb, "networkMbps": r.network_mbps, "gpu": r.gpu});
                }
                v
            })
            .collect();
        emit(out, &serde_json::json!(v));
        return;
    }
    println!("{:<38} {:>5} {:<19} {:>5} {:<22} {:<16} {}", "TASK", "INDEX", "STATE", "AGE", "AGENT", "IP", "REASON");
    for t in tasks {
        let s = t.status.clone().unwrap_or_default();
        let ctx = |k: &str| t.task_context.get(k).cloned().unwrap_or_default();
        let mut reason = if s.reason_message.is_empty() {
            s.reason_code.clone()
        } else {
            format!("{}: {}", s.reason_code, s.reason_message)
        };
        if let Some(why) = pending.get(&t.id) {
            reason = format!("pending: {why}");
        }
        let crashes = ctx("crashLoopCount");
        if !crashes.is_empty() {
            reason = format!("{reason} (crash-looping: {crashes} quick crashes in a row before it)")
                .trim_start()
                .to_string();
        }
        // A live task's health check verdict beside its state (Started/healthy).
        let health = ctx("health");
        let state = if health.is_empty() || s.state == titus_client::proto::TaskState::TaskFinished as i32 {
            state_name(s.state).to_string()
        } else {
            format!("{}/{health}", state_name(s.state))
        };
        println!(
            "{:<38} {:>5} {:<19} {:>5} {:<22} {:<16} {}",
            t.id,
            t.index,
            state,
            age(task_created_ms(t)),
            ctx("agent"),
            ctx("containerIp"),
            reason
        );
    }
}

/// Why each of the first 50 Accepted tasks waits (the leader's last scheduling round).
async fn pending_reasons(client: &Client, tasks: &[titus_client::Task]) -> std::collections::HashMap<String, String> {
    let accepted = tasks
        .iter()
        .filter(|t| t.status.as_ref().is_some_and(|s| s.state == titus_client::proto::TaskState::TaskAccepted as i32))
        .take(50);
    let mut out = std::collections::HashMap::new();
    for t in accepted {
        if let Ok(r) = client.scheduling_result(&t.id).await {
            if r.state == titus_client::proto::scheduling_result::State::Waiting as i32 && !r.message.is_empty() {
                out.insert(t.id.clone(), r.message);
            }
        }
    }
    out
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// How long ago `ms` was, as kubectl says it: 45s, 12m, 3h, 5d (empty when unknown).
fn age(ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    let secs = (now_ms() - ms).max(0) / 1000;
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// `titus job deploy ...`.
async fn deploy(client: &Client, out: Output, command: DeployCmd) -> Result<(), Error> {
    match command {
        DeployCmd::Promote { id } => {
            let id = client.resolve_job_id(&id).await?;
            client.promote_deployment(&id).await?;
            done(out, format!("job {id}: deployment promoted"), serde_json::json!({"job": id, "promoted": true}));
        }
        DeployCmd::Rollback { id } => {
            let id = client.resolve_job_id(&id).await?;
            client.rollback_deployment(&id).await?;
            done(out, format!("job {id}: rolling back"), serde_json::json!({"job": id, "rollback": "requested"}));
        }
        DeployCmd::Status { id } => {
            let id = client.resolve_job_id(&id).await?;
            let list = client.get_deployments(&id).await?;
            if out != Output::Table {
                let deployments: Vec<serde_json::Value> = list.deployments.iter().map(deployment_json).collect();
                emit(
                    out,
                    &serde_json::json!({"job": list.job_id, "specVersion": list.spec_version, "deployments": deployments}),
                );
                return Ok(());
            }
            println!("job {} at spec version {}", list.job_id, list.spec_version);
            if list.deployments.is_empty() {
                println!("no deployments: the job runs the spec it was created with");
            }
            for (i, d) in list.deployments.iter().enumerate() {
                let took = if d.ended_ms > 0 {
                    format!(", took {}s", (d.ended_ms - d.started_ms) / 1000)
                } else {
                    String::new()
                };
                let undo = if d.rollback_of > 0 { format!(" (rollback of {})", d.rollback_of) } else { String::new() };
                println!(
                    "deployment {}{undo}: {} version {} -> {} ({} -> {}), started {} ago{took}",
                    d.id,
                    d.state,
                    d.from_version,
                    d.to_version,
                    d.from_image,
                    d.to_image,
                    age(d.started_ms)
                );
                if !d.message.is_empty() {
                    println!("  {}", d.message);
                }
                if i > 0 {
                    continue;
                }
                if matches!(d.state.as_str(), "Progressing" | "Paused") {
                    let s = d.strategy.clone().unwrap_or_default();
                    println!(
                        "  new tasks available {}/{} (live {}), old tasks left {}, failures {}{}",
                        d.new_available,
                        d.desired,
                        d.new_live,
                        d.old_live,
                        d.failures,
                        if s.rollback_after_failures > 0 {
                            format!("/{}", s.rollback_after_failures)
                        } else {
                            String::new()
                        }
                    );
                    if d.state == "Paused" {
                        println!("  canaries ready: promote with `titus job deploy promote {}`", list.job_id);
                    } else if !d.waiting.is_empty() {
                        println!("  waiting: {}", d.waiting);
                    }
                }
                let mut previous = d.started_ms;
                for (n, step) in d.steps.iter().enumerate() {
                    println!(
                        "  step {:>3}  +{:>5.1}s  created {} killed {}  (new available {}, old live {})",
                        n + 1,
                        (step.at_ms - previous) as f64 / 1000.0,
                        step.created,
                        step.killed,
                        step.new_available,
                        step.old_live
                    );
                    previous = step.at_ms;
                }
            }
        }
    }
    Ok(())
}

fn deployment_json(d: &titus_client::proto::Deployment) -> serde_json::Value {
    let s = d.strategy.clone().unwrap_or_default();
    serde_json::json!({
        "id": d.id, "state": d.state, "fromVersion": d.from_version, "toVersion": d.to_version,
        "fromImage": d.from_image, "toImage": d.to_image, "rollbackOf": d.rollback_of, "failures": d.failures,
        "startedMs": d.started_ms, "endedMs": d.ended_ms, "canaryReadyMs": d.canary_ready_ms, "promoted": d.promoted,
        "message": d.message, "desired": d.desired, "newLive": d.new_live, "newAvailable": d.new_available, "oldLive": d.old_live,
        "waiting": d.waiting,
        "strategy": {"maxUnavailable": s.max_unavailable, "maxSurge": s.max_surge, "canary": s.canary,
                     "canaryPauseSec": s.canary_pause_sec, "rollbackAfterFailures": s.rollback_after_failures},
        "steps": d.steps.iter().map(|s| serde_json::json!({"atMs": s.at_ms, "created": s.created, "killed": s.killed,
                     "newAvailable": s.new_available, "oldLive": s.old_live})).collect::<Vec<_>>(),
    })
}

/// When a job was created: its first status.
fn job_created_ms(j: &titus_client::Job) -> i64 {
    j.status_history.first().or(j.status.as_ref()).map_or(0, |s| s.timestamp_ms)
}

/// When a task was created: its first status.
fn task_created_ms(t: &titus_client::Task) -> i64 {
    t.status_history.first().or(t.status.as_ref()).map_or(0, |s| s.timestamp_ms)
}

/// What a job's live tasks add to its row.
#[derive(Default, Clone, Copy)]
struct LiveTasks {
    started: u32,
    /// The most quick crashes in a row among them (a crash-looping service's), if any.
    crash_loop: Option<u32>,
}

/// The live tasks of each of `jobs` (at most 10,000 read; None when they could not be read).
async fn live_tasks(
    client: &Client,
    jobs: &[titus_client::Job],
) -> Option<std::collections::HashMap<String, LiveTasks>> {
    let mut out: std::collections::HashMap<String, LiveTasks> = std::collections::HashMap::new();
    let live = "Accepted,Launched,StartInitiated,Started";
    for chunk in jobs.chunks(100) {
        let ids = chunk.iter().map(|j| j.id.as_str()).collect::<Vec<_>>().join(",");
        let mut cursor = String::new();
        for _ in 0..10 {
            let page = client.find_tasks(&[("jobIds", &ids), ("taskStates", live)], 1000, &cursor).await.ok()?;
            for t in &page.items {
                let entry = out.entry(t.job_id.clone()).or_default();
                if t.status.as_ref().is_some_and(|s| s.state == titus_client::proto::TaskState::TaskStarted as i32) {
                    entry.started += 1;
                }
                if let Some(n) = t.task_context.get("crashLoopCount").and_then(|n| n.parse::<u32>().ok()) {
                    entry.crash_loop = entry.crash_loop.max(Some(n));
                }
            }
            let p = page.pagination.unwrap_or_default();
            if !p.has_more {
                break;
            }
            cursor = p.cursor;
        }
    }
    Some(out)
}

fn print_jobs(out: Output, jobs: &[titus_client::Job], live: Option<&std::collections::HashMap<String, LiveTasks>>) {
    let of = |id: &str| live.and_then(|l| l.get(id)).copied().unwrap_or_default();
    if out != Output::Table {
        let v: Vec<_> = jobs
            .iter()
            .map(|j| {
                let d = j.job_descriptor.clone().unwrap_or_default();
                let s = j.status.clone().unwrap_or_default();
                let mut v = serde_json::json!({"id": j.id, "applicationName": d.application_name, "owner": d.owner.map(|o| o.team_email), "capacityGroup": d.capacity_group, "state": job_state_name(s.state), "reasonCode": s.reason_code, "createdMs": job_created_ms(j)});
                if live.is_some() {
                    let l = of(&j.id);
                    v["runningTasks"] = serde_json::json!(l.started);
                    if let Some(n) = l.crash_loop {
                        v["crashLoopCount"] = serde_json::json!(n);
                    }
                }
                v
            })
            .collect();
        emit(out, &serde_json::json!(v));
        return;
    }
    println!(
        "{:<38} {:<20} {:<8} {:<14} {:>7} {:<12} {:<8} {:>5}  {}",
        "JOB", "APP", "TYPE", "STATE", "RUNNING", "SIZE", "ENABLED", "AGE", "NOTE"
    );
    for j in jobs {
        let d = j.job_descriptor.clone().unwrap_or_default();
        // Batch: its size; service: min/desired/max.
        let (kind, size, enabled) = match d.job_type {
            Some(titus_client::proto::job_descriptor::JobType::Batch(b)) => ("batch", b.size.to_string(), "-"),
            Some(titus_client::proto::job_descriptor::JobType::Service(s)) => {
                let c = s.capacity.unwrap_or_default();
                ("service", format!("{}/{}/{}", c.min, c.desired, c.max), if s.enabled { "yes" } else { "no" })
            }
            None => ("?", String::new(), "-"),
        };
        let l = of(&j.id);
        let running = if live.is_some() { l.started.to_string() } else { "?".to_string() };
        let deploying = j.deployment.as_ref().filter(|d| matches!(d.state.as_str(), "Progressing" | "Paused"));
        let note = match (l.crash_loop, deploying) {
            (Some(n), _) => {
                format!("crash-looping: {n} quick crashes in a row; replacements back off (titus task list)")
            }
            (None, Some(d)) => format!(
                "deployment {} {} to version {} ({}): titus job deploy status",
                d.id,
                d.state.to_lowercase(),
                d.to_version,
                d.to_image
            ),
            (None, None) => String::new(),
        };
        println!(
            "{:<38} {:<20} {:<8} {:<14} {:>7} {:<12} {:<8} {:>5}  {}",
            j.id,
            d.application_name,
            kind,
            job_state_name(j.status.clone().unwrap_or_default().state),
            running,
            size,
            enabled,
            age(job_created_ms(j)),
            note
        );
    }
}

/// The command with its job id given in full: a unique prefix of one is enough.
async fn with_full_job_id(client: &Client, mut cmd: JobCmd) -> Result<JobCmd, Error> {
    match &mut cmd {
        JobCmd::Enable { id }
        | JobCmd::Disable { id }
        | JobCmd::Watch { id }
        | JobCmd::Get { id }
        | JobCmd::Kill { id }
        | JobCmd::Logs { id, .. }
        | JobCmd::Resize { id, .. } => *id = client.resolve_job_id(id).await?,
        JobCmd::Submit { .. }
        | JobCmd::List { .. }
        | JobCmd::Apply { .. }
        | JobCmd::Plan { .. }
        | JobCmd::Deploy { .. } => {}
    }
    Ok(cmd)
}

/// The command with its task (or job) id given in full: a unique prefix of one is enough.
async fn with_full_task_id(client: &Client, mut cmd: TaskCmd) -> Result<TaskCmd, Error> {
    match &mut cmd {
        TaskCmd::List { job_id } => *job_id = client.resolve_job_id(job_id).await?,
        TaskCmd::Get { id }
        | TaskCmd::Why { id }
        | TaskCmd::Kill { id, .. }
        | TaskCmd::Evict { id, .. }
        | TaskCmd::Logs { id, .. }
        | TaskCmd::Exec { id, .. } => *id = client.resolve_task_id(id).await?,
    }
    Ok(cmd)
}

async fn job_command(client: &Client, out: Output, timeout: Option<Duration>, cmd: JobCmd) -> Result<(), Error> {
    use titus_client::proto as pb;
    match with_full_job_id(client, cmd).await? {
        JobCmd::Submit {
            file,
            wait,
            app,
            owner,
            image,
            cpu,
            memory_mb,
            batch_size,
            desired,
            max,
            capacity_group,
            retries,
            iam_role,
            security_groups,
            command,
        } => {
            let descriptor = match file {
                Some(path) => {
                    let text = apply::read_spec_text(&path)?;
                    let spec = titus_client::spec::parse(&text).map_err(|e| Error::InvalidArgument {
                        message: format!("{}: {e}", path.display()),
                        violations: vec![],
                    })?;
                    if !spec.id.is_empty() {
                        return Err(Error::InvalidArgument {
                            message: format!(
                                "{}: id: a new job's id is chosen by the server (titus job apply -f updates job {})",
                                path.display(),
                                spec.id
                            ),
                            violations: vec![],
                        });
                    }
                    spec.into_descriptor().map_err(|e| Error::InvalidArgument {
                        message: format!("{}: {e}", path.display()),
                        violations: vec![],
                    })?
                }
                None => {
                    let image = image.unwrap_or_default();
                    let (name, tag) = image
                        .rsplit_once(':')
                        .map(|(n, t)| (n.to_string(), t.to_string()))
                        .unwrap_or((image.clone(), "latest".into()));
                    let job_type = match (batch_size, desired) {
                        (_, Some(d)) => pb::job_descriptor::JobType::Service(pb::ServiceJobSpec {
                            capacity: Some(pb::Capacity { min: 0, desired: d, max: max.unwrap_or(d) }),
                            enabled: true,
                            ..Default::default()
                        }),
                        (size, None) => pb::job_descriptor::JobType::Batch(pb::BatchJobSpec {
                            size: size.unwrap_or(1),
                            retry_policy: Some(pb::RetryPolicy {
                                policy: Some(pb::retry_policy::Policy::Immediate(pb::retry_policy::Immediate {
                                    retries: retries.unwrap_or(0),
                                })),
                            }),
                            ..Default::default()
                        }),
                    };
                    pb::JobDescriptor {
                        owner: Some(pb::Owner { team_email: owner.unwrap_or_else(|| "owner@example.com".into()) }),
                        application_name: app.unwrap_or_default(),
                        capacity_group: capacity_group.unwrap_or_else(|| "DEFAULT".into()),
                        container: Some(pb::Container {
                            resources: Some(pb::ContainerResources {
                                cpu: cpu.unwrap_or(1.0),
                                memory_mb: memory_mb.unwrap_or(256),
                                ..Default::default()
                            }),
                            image: Some(pb::Image { name, tag, digest: String::new() }),
                            command,
                            security_profile: (iam_role.is_some() || !security_groups.is_empty()).then(|| {
                                pb::SecurityProfile {
                                    iam_role: iam_role.unwrap_or_default(),
                                    security_groups,
                                    ..Default::default()
                                }
                            }),
                            ..Default::default()
                        }),
                        job_type: Some(job_type),
                        ..Default::default()
                    }
                }
            };
            let id = client.create_job(descriptor).await?;
            done(out, id.clone(), serde_json::json!({"id": id}));
            if wait {
                wait_for_tasks(client, out, &id, timeout.unwrap_or(Duration::from_secs(300))).await?;
            }
        }
        JobCmd::Enable { id } => {
            client.update_job_status(&id, true).await?;
            done(out, format!("job {id} enabled"), serde_json::json!({"job": id, "enabled": true}));
        }
        JobCmd::Disable { id } => {
            client.update_job_status(&id, false).await?;
            done(out, format!("job {id} disabled"), serde_json::json!({"job": id, "enabled": false}));
        }
        JobCmd::Watch { id } => {
            // What the job was at the last update, to say what changed.
            struct Seen {
                state: i32,
                capacity: Option<(u32, u32, u32)>,
                enabled: Option<bool>,
            }
            let mut seen: Option<Seen> = None;
            let mut task_states: std::collections::HashMap<String, i32> = Default::default();
            let mut observer = client.observe_job(&id);
            loop {
                let n = observer.next().await?;
                match n.notification {
                    Some(pb::job_change_notification::Notification::JobUpdate(u)) => {
                        let j = u.job.unwrap_or_default();
                        let status = j.status.clone().unwrap_or_default();
                        let (capacity, enabled) = match j.job_descriptor.as_ref().and_then(|d| d.job_type) {
                            Some(pb::job_descriptor::JobType::Service(s)) => {
                                let c = s.capacity.unwrap_or_default();
                                (Some((c.min, c.desired, c.max)), Some(s.enabled))
                            }
                            _ => (None, None),
                        };
                        let mut changes = Vec::new();
                        match &seen {
                            None => changes.push(job_state_name(status.state).to_string()),
                            Some(before) => {
                                if before.state != status.state {
                                    changes.push(format!(
                                        "{} -> {}",
                                        job_state_name(before.state),
                                        job_state_name(status.state)
                                    ));
                                }
                                if let (Some(a), Some(b)) = (before.capacity, capacity) {
                                    if a != b {
                                        changes.push(format!(
                                            "resized {}/{}/{} -> {}/{}/{} (min/desired/max)",
                                            a.0, a.1, a.2, b.0, b.1, b.2
                                        ));
                                    }
                                }
                                if let (Some(a), Some(b)) = (before.enabled, enabled) {
                                    if a != b {
                                        changes.push(if b { "enabled".into() } else { "disabled".into() });
                                    }
                                }
                            }
                        }
                        if out == Output::Table {
                            if !changes.is_empty() {
                                println!("{} job {} {}", format_ms(now_ms()), j.id, changes.join(", "));
                            }
                        } else {
                            println!(
                                "{}",
                                serde_json::json!({"revision": n.revision, "job": j.id, "state": job_state_name(status.state), "changes": changes, "timeMs": now_ms()})
                            );
                        }
                        seen = Some(Seen { state: status.state, capacity, enabled });
                        if status.state == pb::JobState::JobFinished as i32 {
                            return Ok(());
                        }
                    }
                    Some(pb::job_change_notification::Notification::TaskUpdate(u)) => {
                        let t = u.task.unwrap_or_default();
                        let s = t.status.unwrap_or_default();
                        let before = task_states.insert(t.id.clone(), s.state);
                        if before == Some(s.state) {
                            continue;
                        }
                        let reason = match (s.reason_code.is_empty(), s.reason_message.is_empty()) {
                            (true, _) => String::new(),
                            (false, true) => format!(" ({})", s.reason_code),
                            (false, false) => format!(" ({}: {})", s.reason_code, s.reason_message),
                        };
                        if out == Output::Table {
                            println!(
                                "{} task {} #{} {}{}",
                                format_ms(s.timestamp_ms),
                                t.id,
                                t.index,
                                state_name(s.state),
                                reason
                            );
                        } else {
                            println!(
                                "{}",
                                serde_json::json!({"revision": n.revision, "task": t.id, "index": t.index, "state": state_name(s.state), "reasonCode": s.reason_code, "reasonMessage": s.reason_message, "timeMs": s.timestamp_ms})
                            );
                        }
                    }
                    Some(pb::job_change_notification::Notification::SnapshotEnd(_)) => {
                        if out == Output::Table {
                            println!("--- now following changes (Ctrl-C to stop; ends when the job finishes) ---")
                        }
                    }
                    None => {}
                }
            }
        }
        JobCmd::List { filters } => {
            let mut criteria = Vec::new();
            for f in &filters {
                let (k, v) = f.split_once('=').ok_or_else(|| Error::InvalidArgument {
                    message: format!("--filter {f:?}: expected KEY=VALUE"),
                    violations: vec![],
                })?;
                criteria.push((k, v));
            }
            let jobs = client.find_jobs(&criteria, 1000, "").await?.items;
            print_jobs(out, &jobs, live_tasks(client, &jobs).await.as_ref());
        }
        JobCmd::Get { id } => {
            let jobs = [client.find_job(&id).await?];
            let running = live_tasks(client, &jobs).await;
            if out == Output::Table {
                print_jobs(out, &jobs, running.as_ref());
            } else {
                // The whole spec as `submit -f` and `apply -f` read it, with the job's id and a
                // read-only status.
                let j = &jobs[0];
                let s = j.status.clone().unwrap_or_default();
                let mut spec = titus_client::spec::JobSpec::from_job(j);
                spec.status = Some(serde_json::json!({
                    "state": job_state_name(s.state), "reasonCode": s.reason_code, "reasonMessage": s.reason_message,
                    "createdMs": job_created_ms(j), "runningTasks": running.as_ref().and_then(|r| r.get(&j.id)).map_or(0, |l| l.started),
                    "specVersion": j.spec_version,
                    "deployment": j.deployment.as_ref().map(|d| serde_json::json!({"id": d.id, "state": d.state, "toVersion": d.to_version})),
                }));
                emit(out, &serde_json::to_value(&spec).unwrap_or_default());
            }
        }
        JobCmd::Deploy { command } => deploy(client, out, command).await?,
        JobCmd::Plan { file, rollout } => {
            let (job_id, plan) = apply::plan(client, &file, Some(rollout.strategy())).await?;
            let placed: u32 = plan.placements.values().sum();
            if out != Output::Table {
                emit(
                    out,
                    &serde_json::json!({
                        "job": job_id, "tasks": plan.tasks, "placed": placed, "placements": plan.placements,
                        "pendingReasons": plan.pending_reasons, "pendingMessages": plan.pending_messages,
                        "pendingBefore": plan.pending_before, "steps": plan.steps, "changes": plan.changes,
                    }),
                );
                return Ok(());
            }
            match &job_id {
                None => println!("a new job of {} tasks", plan.tasks),
                Some(id) if plan.changes.is_empty() => {
                    println!("job {id}: the container is unchanged; nothing to deploy")
                }
                Some(id) => println!(
                    "job {id}: a rolling update ({}) in {} steps; its first step starts {} tasks",
                    plan.changes.join(", "),
                    plan.steps,
                    plan.tasks
                ),
            }
            if job_id.is_none() || !plan.changes.is_empty() {
                println!("{placed} would be placed now ({} other pending tasks go first):", plan.pending_before);
                let mut agents: Vec<(&String, &u32)> = plan.placements.iter().collect();
                agents.sort();
                for (agent, n) in agents {
                    println!("  {n:>5}  on {agent}");
                }
                let mut reasons: Vec<(&String, &u32)> = plan.pending_reasons.iter().collect();
                reasons.sort();
                for (reason, n) in reasons {
                    let message = plan.pending_messages.get(reason).map_or("", String::as_str);
                    println!("  {n:>5}  would wait: {reason}: {message}");
                }
            }
        }
        JobCmd::Apply { file, rollout } => {
            let applied = apply::apply(client, &file, Some(rollout.strategy())).await?;
            let line = match (applied.created, applied.changes.is_empty()) {
                (true, _) => format!("job {} created", applied.job_id),
                (false, true) => format!("job {} unchanged", applied.job_id),
                (false, false) => format!("job {}: {}", applied.job_id, applied.changes.join("; ")),
            };
            done(
                out,
                line,
                serde_json::json!({"id": applied.job_id, "created": applied.created, "changes": applied.changes}),
            );
        }
        JobCmd::Kill { id } => {
            client.kill_job(&id).await?;
            done(out, format!("kill requested for job {id}"), serde_json::json!({"job": id, "kill": "requested"}));
        }
        JobCmd::Logs { id, logs } => io::job_logs(client, &id, &logs.args()).await?,
        JobCmd::Resize { id, desired, min, max } => {
            client.update_job_capacity(&id, min, desired, max).await?;
            done(
                out,
                format!("job {id} resized"),
                serde_json::json!({"job": id, "min": min, "desired": desired, "max": max}),
            );
        }
    }
    Ok(())
}

/// Prints each task's state changes until every task is Started (service) or Finished (batch).
/// Progress goes to stdout in a table's place, to stderr beside `-o json|yaml` (which prints the id).
async fn wait_for_tasks(client: &Client, out: Output, job_id: &str, timeout: Duration) -> Result<(), Error> {
    let say = |line: String| {
        if out == Output::Table {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    };
    use titus_client::proto as pb;
    let deadline = std::time::Instant::now() + timeout;
    let mut last: std::collections::BTreeMap<String, i32> = Default::default();
    loop {
        let job = client.find_job(job_id).await?;
        let (batch, wanted) = match job.job_descriptor.as_ref().and_then(|d| d.job_type.clone()) {
            Some(pb::job_descriptor::JobType::Batch(b)) => (true, b.size as usize),
            Some(pb::job_descriptor::JobType::Service(s)) => (false, s.capacity.unwrap_or_default().desired as usize),
            None => (true, 0),
        };
        let tasks = client.find_tasks(&[("jobIds", job_id)], 1000, "").await?.items;
        for t in &tasks {
            let s = t.status.clone().unwrap_or_default();
            if last.get(&t.id) != Some(&s.state) {
                last.insert(t.id.clone(), s.state);
                let reason = if s.reason_code.is_empty() {
                    String::new()
                } else {
                    format!(" ({}: {})", s.reason_code, s.reason_message)
                };
                say(format!(
                    "{} task {} #{}: {}{}",
                    format_ms(s.timestamp_ms),
                    t.id,
                    t.index,
                    state_name(s.state),
                    reason
                ));
            }
        }
        let status = job.status.unwrap_or_default();
        let finished = status.state == pb::JobState::JobFinished as i32;
        let started = tasks
            .iter()
            .filter(|t| t.status.clone().unwrap_or_default().state == pb::TaskState::TaskStarted as i32)
            .count();
        if finished && (!batch || status.reason_code != "normal") {
            // A batch job whose tasks failed beyond their retries, or a job killed before it got
            // there: say why, and exit with JOB_FAILED so that a script can tell.
            eprintln!("titus: job {job_id} finished: {}: {}", status.reason_code, status.reason_message);
            for t in &tasks {
                let s = t.status.clone().unwrap_or_default();
                if s.state == pb::TaskState::TaskFinished as i32 && s.reason_code != "normal" {
                    eprintln!("titus:   task {} #{}: {}: {}", t.id, t.index, s.reason_code, s.reason_message);
                }
            }
            std::process::exit(i32::from(JOB_FAILED));
        }
        if (batch && finished) || (!batch && started >= wanted) {
            say(format!("job {job_id}: {}", if finished { "Finished" } else { "all tasks Started" }));
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            eprintln!("titus: job {job_id} did not get there within {} s", timeout.as_secs());
            std::process::exit(124);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod help_tests {
    use super::*;

    /// Every command and every flag says what it is for in `--help`.
    #[test]
    fn every_command_and_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") || arg.is_hide_set() {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() && sub.get_name() != "help" {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&<Cli as clap::CommandFactory>::command(), "titus", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
