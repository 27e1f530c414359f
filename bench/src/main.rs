//! `titus-bench`: starts a 3-replica Titus cluster on loopback (fsync on, as always) and, in the same
//! run, a 3-member etcd cluster, puts the same load on both and prints each figure side by side:
//! durable replicated writes/s with p50/p99 latency at several client counts, and leader failover
//! time (kill -9 of the leader → first write acknowledged by the new leader) over repeated kills.
//!
//! Black box: it runs the `titus-control-plane` binary built next to it and Debian's `etcd`, and
//! talks to both over gRPC only. Every loop is bounded in time and every process it starts is killed
//! when it ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use titus_client::{CapacityGroupSpec, Client, ClientOptions, Tier};
use tonic::transport::{Channel, Endpoint};

mod scheduler;

mod etcdpb {
    tonic::include_proto!("etcdserverpb");
}

#[derive(Parser)]
#[command(about = "Titus vs etcd: durable replicated writes and leader failover, 3 replicas on loopback")]
struct Args {
    /// Concurrent clients per level.
    #[arg(long, value_delimiter = ',', default_value = "1,64,512")]
    clients: Vec<usize>,
    /// Seconds of load per level.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Leader kills for the failover figure.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// titus-control-plane binary; default: next to this one.
    #[arg(long)]
    titus_bin: Option<PathBuf>,
    /// etcd binary; the comparison is skipped when it is missing.
    #[arg(long, default_value = "etcd")]
    etcd_bin: String,
    /// Skip etcd even when it is installed.
    #[arg(long)]
    no_etcd: bool,
    /// Keep the data dirs and logs (printed at the start) instead of deleting them.
    #[arg(long)]
    keep_dir: bool,
    /// Also measure CreateJob acknowledged -> container Started over this many tasks, with a real
    /// agent and the Docker daemon (needs the titus/busybox:latest test image; 0 skips).
    #[arg(long, default_value_t = 0)]
    launch_tasks: usize,
    /// Leader kills for the agents' re-attach time (with --launch-tasks).
    #[arg(long, default_value_t = 5)]
    reattach_kills: usize,
    /// Only the launch and re-attach measurements.
    #[arg(long)]
    only_launch: bool,
    /// Scheduler benchmark, the placement core alone: AGENTS,TASKS (e.g. 10000,100000). Only this
    /// (and --placement) run when given.
    #[arg(long, value_delimiter = ',')]
    scheduler_core: Vec<usize>,
    /// Scheduler benchmark end to end: AGENTS,TASKS simulated agents and tasks submitted through
    /// the API to 3 replicas (e.g. 10000,1000000).
    #[arg(long, value_delimiter = ',')]
    placement: Vec<usize>,
    /// Upper bound on the end-to-end placement run, in seconds.
    #[arg(long, default_value_t = 1800)]
    placement_limit: u64,
    /// Passed to the replicas of the placement run (raft.snapshot-after-entries); their default
    /// when not given.
    #[arg(long)]
    snapshot_after_entries: Option<u64>,
    /// In the placement run, once this many tasks are acknowledged, kill a follower, wipe its data
    /// dir and start it again: it catches up by a snapshot while the run goes on (its catch-up
    /// time and peak RSS are printed).
    #[arg(long)]
    wipe_follower_at: Option<usize>,
    /// Runs titus with mutual TLS (certificates made for the run) instead of plaintext.
    #[arg(long)]
    tls: bool,
    /// The idempotency-token table under sustained writes for this many seconds (e.g. 720: past the
    /// 10-minute life of a request's token), printed every minute; only this runs when given.
    #[arg(long)]
    token_soak: Option<u64>,
    /// Concurrent clients of the token soak.
    #[arg(long, default_value_t = 16)]
    soak_clients: usize,
}

/// Value size of an etcd write: about the size of a Titus CreateCapacityGroup command as logged.
const VALUE_BYTES: usize = 256;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

struct Proc {
    args: Vec<String>,
    bin: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin))?;
        self.child = Some(child);
        Ok(())
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A replicated store under test.
trait System {
    fn name(&self) -> &'static str;
    fn write(&self, client: usize, seq: u64) -> impl std::future::Future<Output = Result<()>> + Send;
    /// Index of the current leader among the replicas, if the running ones agree on one.
    fn leader(&self) -> impl std::future::Future<Output = Option<usize>> + Send;
    /// Whether every running replica has applied the same log position (a healthy cluster).
    fn caught_up(&self) -> impl std::future::Future<Output = bool> + Send;
    fn procs(&mut self) -> &mut Vec<Proc>;
    /// The processes, to read their logs from.
    fn procs_ref(&self) -> &[Proc];
}

/// The last lines of each process's log, for a failure's message.
fn log_tails(procs: &[Proc], lines: usize) -> String {
    let mut out = String::new();
    for p in procs {
        let text = std::fs::read_to_string(&p.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        out.push_str(&format!("\n----- {} (last {lines} lines) -----\n", p.log.display()));
        for l in &all[all.len().saturating_sub(lines)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

// ----- Titus -----

struct Titus {
    procs: Vec<Proc>,
    clients: Vec<Client>,
    apis: Vec<String>,
    /// Each replica's admin address (/metrics).
    admins: Vec<String>,
}

impl Titus {
    async fn start(bin: &Path, dir: &Path, extra: &[String]) -> Result<Titus> {
        Titus::start_with(bin, dir, extra, false).await
    }

    /// With `tls`: a CA and certificates for the run in `dir/tls`, the benchmark's client an admin
    /// without a rate limit.
    async fn start_with(bin: &Path, dir: &Path, extra: &[String], tls: bool) -> Result<Titus> {
        let ids = [1u64, 2, 3];
        let certs = dir.join("tls");
        // Every simulated agent and client connects from 127.0.0.1: the per-address bound on
        // connections not yet authenticated is for a fleet on its own hosts, not this one.
        let limits = "[limits]\nmax-unauthenticated-per-address = 100000\n";
        std::fs::create_dir_all(&certs)?;
        if tls {
            use titus_security::{certs as c, Identity, Kind};
            let ca = c::new_ca("bench CA", 1)?;
            c::write_pair(&certs, "ca", &ca)?;
            let who = ids
                .iter()
                .map(|i| Identity::new(Kind::Replica, i.to_string()))
                .chain([Identity::new(Kind::Client, "bench")]);
            for id in who {
                let id = id.map_err(|e| anyhow::anyhow!(e))?;
                c::write_pair(&certs, &c::stem(&id), &c::issue(&ca, &id, "bench", &["127.0.0.1".into()], 1)?)?;
            }
            std::fs::write(
                certs.join("security.toml"),
                format!(
                    "[[principals]]\nname = \"bench\"\nrole = \"admin\"\n{limits}requests-per-second = 1000000.0\nburst = 1000000\nbytes-per-second = 1000000000000\nburst-bytes = 1000000000000\n"
                ),
            )?;
        } else {
            std::fs::write(certs.join("security.toml"), limits)?;
        }
        let peers: Vec<String> = ids.iter().map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let apis: Vec<String> = ids.iter().map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let admins: Vec<String> = ids.iter().map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let mut procs = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let mut args = vec![
                "--node-id".to_string(),
                id.to_string(),
                "--data-dir".into(),
                dir.join(format!("titus-{id}")).display().to_string(),
                "--peer-listen".into(),
                peers[i].clone(),
                "--api-listen".into(),
                apis[i].clone(),
                "--admin-listen".into(),
                admins[i].clone(),
            ];
            if tls {
                let f = |name: String| certs.join(name).display().to_string();
                args.extend([
                    "--tls-ca".into(),
                    f("ca.pem".into()),
                    "--tls-cert".into(),
                    f(format!("replica-{id}.pem")),
                    "--tls-key".into(),
                    f(format!("replica-{id}.key")),
                    "--security-config".into(),
                    f("security.toml".into()),
                ]);
            } else {
                args.extend([
                    "--insecure".into(),
                    "--security-config".into(),
                    certs.join("security.toml").display().to_string(),
                ]);
            }
            for (j, m) in ids.iter().enumerate() {
                args.push("--member".into());
                args.push(format!("{m}={}/{}", peers[j], apis[j]));
            }
            args.extend(extra.iter().cloned());
            let mut p =
                Proc { args, bin: bin.display().to_string(), log: dir.join(format!("titus-{id}.log")), child: None };
            p.start()?;
            procs.push(p);
        }
        let mut options = ClientOptions {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            attempt_timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        };
        if tls {
            options = options.with_tls(
                certs.join("ca.pem"),
                Some((certs.join("client-bench.pem"), certs.join("client-bench.key"))),
            )?;
        }
        let clients =
            (0..8).map(|_| Client::with_options(apis.iter(), options.clone())).collect::<Result<Vec<_>, _>>()?;
        Ok(Titus { procs, clients, apis, admins })
    }
}

impl Titus {
    /// The process id of replica `node_id` (1-based).
    fn pid_of(&self, node_id: u64) -> Option<u32> {
        self.procs.get(node_id.checked_sub(1)? as usize)?.child.as_ref().map(|c| c.id())
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(|p| p.child.as_ref().map(|c| c.id())).collect()
    }
}

impl System for Titus {
    fn name(&self) -> &'static str {
        "titus"
    }

    async fn write(&self, client: usize, seq: u64) -> Result<()> {
        let spec = CapacityGroupSpec::new(
            &format!("bench-{seq}-{}", uuid::Uuid::new_v4().simple()),
            Tier::Flex,
            1.0,
            1024,
            2048,
            128,
            3,
        );
        self.clients[client % self.clients.len()].create_capacity_group(spec).await?;
        Ok(())
    }

    async fn leader(&self) -> Option<usize> {
        let mut leader = None;
        for (i, p) in self.procs.iter().enumerate() {
            if p.child.is_none() {
                continue;
            }
            let s = self.clients[0].cluster_status_of(&self.apis[i]).await.ok()?;
            if s.leader_id == 0 || s.cluster_id.is_empty() || *leader.get_or_insert(s.leader_id) != s.leader_id {
                return None;
            }
        }
        let idx = leader? as usize - 1;
        self.procs[idx].child.is_some().then_some(idx)
    }

    async fn caught_up(&self) -> bool {
        let mut applied = None;
        for (i, p) in self.procs.iter().enumerate() {
            if p.child.is_none() {
                return false;
            }
            let Ok(s) = self.clients[0].cluster_status_of(&self.apis[i]).await else { return false };
            if *applied.get_or_insert(s.last_applied_index) != s.last_applied_index {
                return false;
            }
        }
        true
    }

    fn procs(&mut self) -> &mut Vec<Proc> {
        &mut self.procs
    }

    fn procs_ref(&self) -> &[Proc] {
        &self.procs
    }
}

// ----- etcd -----

struct Etcd {
    procs: Vec<Proc>,
    endpoints: Vec<Channel>,
    next: AtomicU64,
    value: Vec<u8>,
}

impl Etcd {
    fn start(bin: &str, dir: &Path) -> Result<Etcd> {
        let peer_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let initial = (0..3).map(|i| format!("e{i}=http://127.0.0.1:{}", peer_ports[i])).collect::<Vec<_>>().join(",");
        let mut procs = Vec::new();
        for i in 0..3 {
            let args = vec![
                format!("--name=e{i}"),
                format!("--data-dir={}", dir.join(format!("etcd-{i}")).display()),
                format!("--listen-peer-urls=http://127.0.0.1:{}", peer_ports[i]),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{}", peer_ports[i]),
                format!("--listen-client-urls=http://127.0.0.1:{}", client_ports[i]),
                format!("--advertise-client-urls=http://127.0.0.1:{}", client_ports[i]),
                format!("--initial-cluster={initial}"),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=titus-bench".into(),
                // The same Raft timing as Titus's defaults: 100 ms heartbeat, 500 ms election base.
                "--heartbeat-interval=100".into(),
                "--election-timeout=500".into(),
            ];
            let mut p = Proc { args, bin: bin.to_string(), log: dir.join(format!("etcd-{i}.log")), child: None };
            p.start()?;
            procs.push(p);
        }
        let endpoints = client_ports
            .iter()
            .map(|port| {
                Ok(Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .connect_lazy())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Etcd { procs, endpoints, next: AtomicU64::new(0), value: vec![b'x'; VALUE_BYTES] })
    }
}

impl System for Etcd {
    fn name(&self) -> &'static str {
        "etcd"
    }

    /// Put with failover across members, the way etcd's own client retries: rotate on error.
    async fn write(&self, client: usize, seq: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let key = format!("/bench/{seq}-{}", uuid::Uuid::new_v4().simple()).into_bytes();
        let mut member = client % self.endpoints.len();
        loop {
            if self.procs[member].child.is_some() {
                let mut kv = etcdpb::kv_client::KvClient::new(self.endpoints[member].clone());
                let req = etcdpb::PutRequest { key: key.clone(), value: self.value.clone() };
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), kv.put(req)).await {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("etcd put failed for 30 s");
            }
            member = (self.next.fetch_add(1, Ordering::Relaxed) as usize) % self.endpoints.len();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn leader(&self) -> Option<usize> {
        let mut leader = None;
        let mut ids = vec![0u64; self.endpoints.len()];
        for (i, ch) in self.endpoints.iter().enumerate() {
            if self.procs[i].child.is_none() {
                continue;
            }
            let mut m = etcdpb::maintenance_client::MaintenanceClient::new(ch.clone());
            let s = tokio::time::timeout(Duration::from_secs(1), m.status(etcdpb::StatusRequest {}))
                .await
                .ok()?
                .ok()?
                .into_inner();
            ids[i] = s.header.map(|h| h.member_id).unwrap_or(0);
            if s.leader == 0 || *leader.get_or_insert(s.leader) != s.leader {
                return None;
            }
        }
        let leader = leader?;
        ids.iter().position(|id| *id == leader)
    }

    async fn caught_up(&self) -> bool {
        let mut index = None;
        for (i, ch) in self.endpoints.iter().enumerate() {
            if self.procs[i].child.is_none() {
                return false;
            }
            let mut m = etcdpb::maintenance_client::MaintenanceClient::new(ch.clone());
            let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), m.status(etcdpb::StatusRequest {})).await
            else {
                return false;
            };
            let s = s.into_inner();
            if *index.get_or_insert(s.raft_index) != s.raft_index {
                return false;
            }
        }
        true
    }

    fn procs(&mut self) -> &mut Vec<Proc> {
        &mut self.procs
    }

    fn procs_ref(&self) -> &[Proc] {
        &self.procs
    }
}

// ----- measurements -----

struct Load {
    writes_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

async fn wait_leader<S: System>(s: &S, within: Duration) -> Result<usize> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(l) = s.leader().await {
            return Ok(l);
        }
        if Instant::now() > deadline {
            bail!("{}: no leader within {within:?}; its logs:{}", s.name(), log_tails(s.procs_ref(), 30));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn load<S: System + Send + Sync + 'static>(s: Arc<S>, clients: usize, seconds: u64) -> Result<Load> {
    let seq = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (s, seq) = (s.clone(), seq.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut errors = 0;
            while Instant::now() < end {
                let t = Instant::now();
                match s.write(c, seq.fetch_add(1, Ordering::Relaxed)).await {
                    Ok(()) => h.saturating_record(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (h, errors)
        }));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await?;
        all.add(h)?;
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Load {
        writes_per_sec: all.len() as f64 / elapsed,
        p50_ms: all.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1000.0,
        errors,
    })
}

/// Kills the leader `kills` times; each sample is kill → first acknowledged write.
async fn failover<S: System>(s: &mut S, kills: usize) -> Result<Vec<f64>> {
    let mut samples = Vec::new();
    for k in 0..kills {
        let leader = wait_leader(s, Duration::from_secs(30)).await?;
        s.write(0, u64::MAX - k as u64).await?;
        s.procs()[leader].kill();
        let t = Instant::now();
        s.write(k + 1, u64::MAX - 1000 - k as u64).await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
        s.procs()[leader].start()?;
        // Back to three healthy, caught-up members before the next kill.
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.leader().await.is_none() || !s.caught_up().await {
            if Instant::now() > deadline {
                bail!("{}: cluster did not recover after kill {k}", s.name());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(samples)
}

fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let idx = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[idx]
}

struct Figures {
    loads: Vec<(usize, Load)>,
    failover: Vec<f64>,
}

async fn measure<S: System + Send + Sync + 'static>(s: S, args: &Args) -> Result<Figures> {
    wait_leader(&s, Duration::from_secs(60)).await?;
    // Warm up connections and the leader's caches.
    for i in 0..20 {
        s.write(i, i as u64).await?;
    }
    let s = Arc::new(s);
    let mut loads = Vec::new();
    for &c in &args.clients {
        let l = load(s.clone(), c, args.seconds).await?;
        eprintln!(
            "  {} {c:>4} clients: {:>8.0} writes/s p50 {:.2} ms p99 {:.2} ms ({} errors)",
            s.name(),
            l.writes_per_sec,
            l.p50_ms,
            l.p99_ms,
            l.errors
        );
        loads.push((c, l));
    }
    let mut s = Arc::try_unwrap(s).map_err(|_| anyhow::anyhow!("load tasks still hold the system"))?;
    let failover = failover(&mut s, args.kills).await?;
    eprintln!("  {} failover samples (ms): {:?}", s.name(), failover.iter().map(|v| v.round()).collect::<Vec<_>>());
    Ok(Figures { loads, failover })
}

fn sleeper(app: &str) -> titus_client::proto::JobDescriptor {
    use titus_client::proto as pb;
    pb::JobDescriptor {
        owner: Some(pb::Owner { team_email: "bench@example.com".into() }),
        application_name: app.into(),
        container: Some(pb::Container {
            resources: Some(pb::ContainerResources { cpu: 0.1, memory_mb: 16, ..Default::default() }),
            image: Some(pb::Image { name: "titus/busybox".into(), tag: "latest".into(), digest: String::new() }),
            command: vec!["sleep".into(), "120".into()],
            ..Default::default()
        }),
        job_type: Some(pb::job_descriptor::JobType::Batch(pb::BatchJobSpec { size: 1, ..Default::default() })),
        ..Default::default()
    }
}

/// CreateJob acknowledged -> task Started, one job at a time; then leader kill -> every agent
/// attached to the new leader.
async fn launch_and_reattach(titus_bin: &Path, dir: &Path, tasks: usize, kills: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let image_ok = Command::new("docker")
        .args(["image", "inspect", "titus/busybox:latest"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success();
    if !image_ok {
        bail!("the titus/busybox:latest test image is missing: run deploy/build-test-image.sh");
    }
    let agent_bin = titus_bin.with_file_name("titus-agent");
    if !agent_bin.exists() {
        bail!("{} not found: build it (cargo build -p titus-agent)", agent_bin.display());
    }
    std::fs::create_dir_all(dir)?;
    let mut titus = Titus::start(titus_bin, dir, &[]).await?;
    wait_leader(&titus, Duration::from_secs(60)).await?;
    let agent_id = format!("bench-agent-{}", std::process::id());
    let mut agent = Proc {
        args: vec![
            "--agent-id".into(),
            agent_id.clone(),
            "--servers".into(),
            titus.apis.join(","),
            "--cpu".into(),
            "64".into(),
            "--memory-mb".into(),
            "65536".into(),
            "--disk-mb".into(),
            "10000000".into(),
            "--network-mbps".into(),
            "1000000".into(),
            "--insecure".into(),
        ],
        bin: agent_bin.display().to_string(),
        log: dir.join("agent.log"),
        child: None,
    };
    agent.start()?;
    let _cleanup = ContainerCleanup(agent_id.clone());
    let client = titus.clients[0].clone();
    let mut launch = Vec::new();
    let mut jobs = Vec::new();
    for i in 0..tasks {
        let t0 = Instant::now();
        let id = client.create_job(sleeper(&format!("launch-{i}"))).await?;
        loop {
            let started = client.find_tasks(&[("jobIds", &id), ("taskStates", "Started")], 10, "").await?;
            if !started.items.is_empty() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("job {id} did not start within 60 s (see {})", dir.join("agent.log").display());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        launch.push(t0.elapsed().as_secs_f64() * 1000.0);
        jobs.push(id);
    }
    eprintln!("  launch samples (ms): p50 {:.0}, max {:.0}", percentile(&launch, 0.5), percentile(&launch, 1.0));

    let mut reattach = Vec::new();
    for k in 0..kills {
        let leader = wait_leader(&titus, Duration::from_secs(30)).await?;
        titus.procs[leader].kill();
        let t0 = Instant::now();
        loop {
            if let Some(l) = titus.leader().await {
                let on_leader = Client::connect([titus.apis[l].as_str()])?;
                if let Ok(agents) = on_leader.find_agents().await {
                    if agents.iter().any(|a| a.id == agent_id && a.connected) {
                        break;
                    }
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("agent did not re-attach within 60 s after kill {k}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        reattach.push(t0.elapsed().as_secs_f64() * 1000.0);
        titus.procs[leader].start()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while titus.leader().await.is_none() || !titus.caught_up().await {
            if Instant::now() > deadline {
                bail!("cluster did not recover after kill {k}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("  re-attach samples (ms): {:?}", reattach.iter().map(|v| v.round()).collect::<Vec<_>>());
    for id in &jobs {
        let _ = client.kill_job(id).await;
    }
    agent.kill();
    Ok((launch, reattach))
}

/// Removes the bench agent's containers however the measurement ends.
struct ContainerCleanup(String);

impl Drop for ContainerCleanup {
    fn drop(&mut self) {
        if let Ok(out) =
            Command::new("docker").args(["ps", "-aq", "--filter", &format!("label=titus.agent.id={}", self.0)]).output()
        {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
            if !ids.is_empty() {
                let _ = Command::new("docker").arg("rm").arg("-f").args(&ids).stdout(Stdio::null()).status();
            }
        }
    }
}

fn default_titus_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("no parent dir")?.join("titus-control-plane");
    if !bin.exists() {
        bail!("{} not found: build it first (cargo build -p titus-control-plane) or pass --titus-bin", bin.display());
    }
    Ok(bin)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let titus_bin = match &args.titus_bin {
        Some(b) => b.clone(),
        None => default_titus_bin()?,
    };
    let mut dir = tempfile::TempDir::new()?;
    dir.disable_cleanup(args.keep_dir);
    let profile = if titus_bin.components().any(|c| c.as_os_str() == "release") { "release" } else { "debug" };
    eprintln!("titus-bench: {} ({profile} build), data under {}", titus_bin.display(), dir.path().display());

    for (flag, values) in [("--scheduler-core", &args.scheduler_core), ("--placement", &args.placement)] {
        if !values.is_empty() && values.len() != 2 {
            bail!("{flag}: expected AGENTS,TASKS (two numbers), got {values:?}");
        }
    }
    if let [agents, tasks] = args.scheduler_core[..] {
        scheduler::core_bench(agents, tasks);
    }
    if let [agents, tasks] = args.placement[..] {
        let limit = Duration::from_secs(args.placement_limit);
        let extra: Vec<String> = args
            .snapshot_after_entries
            .map(|n| vec!["--snapshot-after-entries".into(), n.to_string()])
            .unwrap_or_default();
        let run = scheduler::PlacementRun { agents, tasks, limit, wipe_follower_at: args.wipe_follower_at };
        scheduler::placement_bench(&titus_bin, &dir.path().join("placement"), run, &extra).await?;
    }
    if !args.scheduler_core.is_empty() || !args.placement.is_empty() {
        return Ok(());
    }
    if let Some(seconds) = args.token_soak {
        return token_soak(&titus_bin, &dir.path().join("soak"), seconds, args.soak_clients.max(1)).await;
    }

    if args.launch_tasks > 0 {
        eprintln!("launch: 3 replicas, 1 agent, Docker");
        let (launch, reattach) =
            launch_and_reattach(&titus_bin, &dir.path().join("launch"), args.launch_tasks, args.reattach_kills).await?;
        println!();
        println!(
            "CreateJob acknowledged -> container Started, {} tasks one at a time (polled every 5 ms)",
            launch.len()
        );
        println!("    p50 {:.0} ms, p99 {:.0} ms", percentile(&launch, 0.5), percentile(&launch, 0.99));
        println!("Leader kill -> agent attached to the new leader, {} kills", reattach.len());
        println!("    p50 {:.0} ms, p99 {:.0} ms", percentile(&reattach, 0.5), percentile(&reattach, 0.99));
        if args.only_launch {
            return Ok(());
        }
    }

    let transport = if args.tls { "mutual TLS" } else { "plaintext" };
    eprintln!("titus: 3 replicas, {transport}");
    let titus = measure(Titus::start_with(&titus_bin, dir.path(), &[], args.tls).await?, &args).await?;

    let etcd_available = !args.no_etcd
        && Command::new(&args.etcd_bin)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    let etcd = if etcd_available {
        eprintln!("etcd: 3 members");
        Some(measure(Etcd::start(&args.etcd_bin, dir.path())?, &args).await?)
    } else {
        eprintln!("etcd: not installed (apt-get install etcd-server) or --no-etcd: comparison skipped");
        None
    };

    println!();
    println!(
        "Durable replicated writes, 3 replicas on loopback, fsync on, {} s per level ({profile} build of titus, {transport})",
        args.seconds
    );
    println!(
        "{:>8} | {:>10} {:>9} {:>9} | {:>10} {:>9} {:>9} | {:>11}",
        "clients", "titus w/s", "p50 ms", "p99 ms", "etcd w/s", "p50 ms", "p99 ms", "titus/etcd"
    );
    for (i, (c, t)) in titus.loads.iter().enumerate() {
        match etcd.as_ref().map(|e| &e.loads[i].1) {
            Some(e) => println!(
                "{c:>8} | {:>10.0} {:>9.2} {:>9.2} | {:>10.0} {:>9.2} {:>9.2} | {:>10.2}x",
                t.writes_per_sec,
                t.p50_ms,
                t.p99_ms,
                e.writes_per_sec,
                e.p50_ms,
                e.p99_ms,
                t.writes_per_sec / e.writes_per_sec
            ),
            None => println!("{c:>8} | {:>10.0} {:>9.2} {:>9.2} |", t.writes_per_sec, t.p50_ms, t.p99_ms),
        }
    }
    println!();
    println!("Leader failover: kill -9 of the leader -> first acknowledged write, {} kills", args.kills);
    let (tp50, tp99) = (percentile(&titus.failover, 0.5), percentile(&titus.failover, 0.99));
    match &etcd {
        Some(e) => {
            let (ep50, ep99) = (percentile(&e.failover, 0.5), percentile(&e.failover, 0.99));
            println!("{:>8} | {:>10} {:>9} | {:>10} {:>9} | {:>11}", "", "titus ms", "", "etcd ms", "", "titus/etcd");
            println!("{:>8} | {:>10.0} {:>9} | {:>10.0} {:>9} | {:>10.2}x", "p50", tp50, "", ep50, "", tp50 / ep50);
            println!("{:>8} | {:>10.0} {:>9} | {:>10.0} {:>9} | {:>10.2}x", "p99", tp99, "", ep99, "", tp99 / ep99);
        }
        None => println!("p50 {tp50:.0} ms, p99 {tp99:.0} ms"),
    }
    Ok(())
}

/// One metric's value from a replica's `/metrics` (plain HTTP on its admin port).
async fn scrape(admin: &str, series: &str) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(admin)).await??;
    conn.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut body)).await??;
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .with_context(|| format!("{series} not in {admin}'s metrics"))
}

/// The idempotency-token table under sustained writes: `clients` SDK clients update one job's
/// attributes for `seconds` (every call carries a request id, so every write leaves a token kept
/// 10 minutes); every minute the leader's estimate of the table is printed beside the writes so
/// far. With a purge that keeps up, the table levels off near rate × 10 minutes.
async fn token_soak(bin: &Path, dir: &Path, seconds: u64, clients: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let titus = Titus::start(bin, dir, &[]).await?;
    wait_leader(&titus, Duration::from_secs(60)).await?;
    let job = titus_client::JobBuilder::service("soak", "titus/busybox:latest", 0, 0, 1)
        .owner("bench@titus.local")
        .cpu(0.1)
        .memory_mb(16)
        .build();
    let job = titus.clients[0].create_job(job).await?;
    let writes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..clients {
        let (client, job, writes) = (titus.clients[w % titus.clients.len()].clone(), job.clone(), writes.clone());
        workers.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                n += 1;
                let value = format!("{w}-{n}");
                if client.update_job_attributes(&job, &[("soak", value.as_str())]).await.is_ok() {
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    println!(
        "token soak: {clients} clients updating one job's attributes for {seconds} s (a token per write, kept 10 min)"
    );
    let series = "titus_rocksdb_estimated_keys{cf=\"idempotency_tokens\"}";
    let mut peak = 0.0f64;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(60).min(until.saturating_duration_since(Instant::now()))).await;
        let elapsed = started.elapsed().as_secs_f64();
        let n = writes.load(Ordering::Relaxed);
        let tokens = match titus.leader().await {
            Some(l) => scrape(&titus.admins[l], series).await.unwrap_or(f64::NAN),
            None => f64::NAN,
        };
        peak = peak.max(tokens);
        println!("  {elapsed:>5.0} s: {n:>9} writes ({:>5.0}/s), token table ≈ {tokens:.0} keys", n as f64 / elapsed);
    }
    while workers.join_next().await.is_some() {}
    let n = writes.load(Ordering::Relaxed);
    let rate = n as f64 / started.elapsed().as_secs_f64();
    println!(
        "token soak: {n} writes at {rate:.0}/s; token table peak ≈ {peak:.0} keys (rate × 600 s = {:.0})",
        rate * 600.0
    );
    Ok(())
}
