//! Test harness: real `titus-control-plane` processes on loopback, each with its own RocksDB data
//! dir, talked to through the real SDK over gRPC. Waits are on conditions, never fixed sleeps.

#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use titus_client::{CapacityGroupSpec, Client, ClientOptions, ClusterStatus, MemberRole, Tier};

pub struct Replica {
    pub id: u64,
    pub peer_addr: String,
    pub api_addr: String,
    /// The admin HTTP port: /metrics, /healthz, /readyz, /ui.
    pub admin_addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    process: Option<Child>,
}

/// A `titus-agent` process.
pub struct AgentProc {
    pub id: String,
    args: Vec<String>,
    log: PathBuf,
    process: Option<Child>,
}

pub struct Cluster {
    pub replicas: Vec<Replica>,
    pub agents: Vec<AgentProc>,
    /// `--member` flags shared by the initial replicas.
    members: Vec<String>,
    extra_args: Vec<String>,
    /// TLS: the directory `titus certs init` wrote (ca, replica-<id>, agent-<id>, client-<name>)
    /// and the replicas' `--security-config` file. None: insecure mode.
    pub secure: Option<Secure>,
    dir: TempDir,
}

#[derive(Clone)]
pub struct Secure {
    pub certs: PathBuf,
    pub security_config: PathBuf,
}

impl Secure {
    /// A CA in `dir/tls` with certificates for replicas 1..=3, `agents` and `clients`, and the
    /// security file `dir/security.toml` holding `security`.
    pub fn write(dir: &std::path::Path, agents: &[&str], clients: &[&str], security: &str) -> Secure {
        use titus_security::{certs, Identity, Kind};
        let certs_dir = dir.join("tls");
        let ca = certs::new_ca("test CA", 1).unwrap();
        certs::write_pair(&certs_dir, "ca", &ca).unwrap();
        let ids = (1..=3)
            .map(|i| Identity::new(Kind::Replica, i.to_string()).unwrap())
            .chain(agents.iter().map(|a| Identity::new(Kind::Agent, *a).unwrap()))
            .chain(clients.iter().map(|c| Identity::new(Kind::Client, *c).unwrap()));
        for id in ids {
            let pem = certs::issue(&ca, &id, "test", &["127.0.0.1".into()], 1).unwrap();
            certs::write_pair(&certs_dir, &certs::stem(&id), &pem).unwrap();
        }
        let security_config = dir.join("security.toml");
        std::fs::write(&security_config, security).unwrap();
        Secure { certs: certs_dir, security_config }
    }

    /// An SDK client with the client certificate `client-<name>`.
    pub fn client(&self, apis: Vec<String>, name: &str) -> Client {
        let options = ClientOptions::default()
            .with_tls(
                self.certs.join("ca.pem"),
                Some((self.certs.join(format!("client-{name}.pem")), self.certs.join(format!("client-{name}.key")))),
            )
            .unwrap();
        Client::with_options(apis, options).unwrap()
    }
}

/// `--tls-ca`, `--tls-cert` and `--tls-key` for the certificate `<stem>.pem` in `certs`.
pub fn tls_args(certs: &std::path::Path, stem: &str) -> Vec<String> {
    let f = |name: String| certs.join(name).display().to_string();
    vec![
        "--tls-ca".into(),
        f("ca.pem".into()),
        "--tls-cert".into(),
        f(format!("{stem}.pem")),
        "--tls-key".into(),
        f(format!("{stem}.key")),
    ]
}

/// A workspace binary: cargo's own path when this test's crate builds it, else the one next to
/// the test executable (`cargo build --workspace` builds them all).
pub fn bin(name: &str) -> PathBuf {
    if name == "titus-control-plane" {
        if let Some(p) = option_env!("CARGO_BIN_EXE_titus-control-plane") {
            return PathBuf::from(p);
        }
    }
    if name == "titus-agent" {
        if let Some(p) = option_env!("CARGO_BIN_EXE_titus-agent") {
            return PathBuf::from(p);
        }
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free loopback ports, none handed out before in this process: every listener is
/// held until all are chosen, so no two are the same port, and a port given to a replica that has
/// not bound it yet is not given again (two clusters started in one test once shared an admin
/// port, and one replica failed to start with "address already in use").
///
/// They come from below the kernel's ephemeral range (32768-60999 here), never from it: a port
/// the kernel handed out as free could be taken as the source port of any outgoing connection
/// before the replica binds it (a replica failed to start with "admin-listen …: address already
/// in use" under the full suite). Each test process scans from its own place in the range, so two
/// processes running side by side rarely even look at the same ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    const LOW: u32 = 20_000;
    const HIGH: u32 = 32_000;
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let span = HIGH - LOW;
    let start = {
        let seed = std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let _ = NEXT.compare_exchange(
            0,
            seed % span + 1,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
        NEXT.load(std::sync::atomic::Ordering::SeqCst)
    };
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let mut held = Vec::new();
    let mut ports = Vec::new();
    let mut offset = start;
    for _ in 0..span {
        if ports.len() == n {
            break;
        }
        let port = (LOW + offset % span) as u16;
        offset = offset.wrapping_add(1);
        if handed.contains(&port) {
            continue;
        }
        // Held until all are chosen; then free for the replica to bind.
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            handed.insert(port);
            ports.push(port);
            held.push(l);
        }
    }
    NEXT.store(offset, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(ports.len(), n, "no {n} free loopback ports left in {LOW}-{HIGH}");
    ports
}

impl Cluster {
    /// Starts `n` replicas that bootstrap one cluster. `extra_args` go to every replica.
    pub fn start(n: u64, extra_args: &[&str]) -> Cluster {
        Cluster::start_with(n, extra_args, |_| None)
    }

    /// Starts `n` replicas with mutual TLS: `setup` gets the cluster's directory and returns where
    /// it wrote the certificates and the security configuration.
    pub fn start_with(n: u64, extra_args: &[&str], setup: impl FnOnce(&std::path::Path) -> Option<Secure>) -> Cluster {
        let mut dir = TempDir::new().expect("temp dir");
        // TITUS_TEST_KEEP=1 keeps data dirs and logs for a look after the test.
        dir.disable_cleanup(std::env::var_os("TITUS_TEST_KEEP").is_some());
        let ports = free_ports(3 * n as usize);
        let replicas: Vec<Replica> =
            (1..=n).map(|id| Cluster::new_replica(&dir, id, &ports[3 * (id as usize - 1)..])).collect();
        let members = replicas.iter().map(|r| format!("{}={}/{}", r.id, r.peer_addr, r.api_addr)).collect();
        let mut c = Cluster {
            replicas,
            agents: Vec::new(),
            members,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            secure: setup(dir.path()),
            dir,
        };
        // Start in reverse order: the initializer (lowest id) comes last, as "any order" requires.
        for id in (1..=n).rev() {
            c.start_replica(id);
        }
        c
    }

    /// Replica 1 alone, on the addresses its cluster recorded, over a data dir unpacked from
    /// `tarball` (a `data/` directory): a cluster an earlier release wrote, say.
    pub fn start_from_data(tarball: &std::path::Path, peer_addr: &str, api_addr: &str, extra_args: &[&str]) -> Cluster {
        let mut dir = TempDir::new().expect("temp dir");
        dir.disable_cleanup(std::env::var_os("TITUS_TEST_KEEP").is_some());
        let status = Command::new("tar").arg("-xzf").arg(tarball).arg("-C").arg(dir.path()).status().expect("tar");
        assert!(status.success(), "unpacking {}", tarball.display());
        let mut r = Cluster::new_replica(&dir, 1, &free_ports(3));
        std::fs::rename(dir.path().join("data"), &r.data_dir).expect("the unpacked data dir");
        (r.peer_addr, r.api_addr) = (peer_addr.to_string(), api_addr.to_string());
        let members = vec![format!("1={peer_addr}/{api_addr}")];
        let extra_args = extra_args.iter().map(|s| s.to_string()).collect();
        let mut c = Cluster { replicas: vec![r], agents: Vec::new(), members, extra_args, secure: None, dir };
        c.start_replica(1);
        c
    }

    /// A replica on `ports[0..3]` (peer, api, admin).
    fn new_replica(dir: &TempDir, id: u64, ports: &[u16]) -> Replica {
        let (peer, api, admin) = (ports[0], ports[1], ports[2]);
        Replica {
            id,
            peer_addr: format!("127.0.0.1:{peer}"),
            api_addr: format!("127.0.0.1:{api}"),
            admin_addr: format!("127.0.0.1:{admin}"),
            data_dir: dir.path().join(format!("data-{id}")),
            log: dir.path().join(format!("replica-{id}.log")),
            process: None,
        }
    }

    /// `--insecure`, or the replica's certificate and the security configuration.
    fn security_args(&self, id: u64) -> Vec<String> {
        match &self.secure {
            None => vec!["--insecure".into()],
            Some(s) => {
                let mut args = tls_args(&s.certs, &format!("replica-{id}"));
                args.extend(["--security-config".into(), s.security_config.display().to_string()]);
                args
            }
        }
    }

    /// The flags an agent `id` needs to reach this cluster.
    fn agent_security_args(&self, id: &str) -> Vec<String> {
        match &self.secure {
            None => vec!["--insecure".into()],
            Some(s) => tls_args(&s.certs, &format!("agent-{id}")),
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Every replica's api address, comma-separated (as `--servers` and `TITUS_SERVERS` take them).
    pub fn servers(&self) -> String {
        self.replicas.iter().map(|r| r.api_addr.clone()).collect::<Vec<_>>().join(",")
    }

    pub fn replica(&self, id: u64) -> &Replica {
        self.replicas.iter().find(|r| r.id == id).expect("no such replica")
    }

    fn replica_mut(&mut self, id: u64) -> &mut Replica {
        self.replicas.iter_mut().find(|r| r.id == id).expect("no such replica")
    }

    /// Starts (or restarts) replica `id` as a process.
    pub fn start_replica(&mut self, id: u64) {
        let members = self.members.clone();
        let extra = self.extra_args.clone();
        let r = self.replica_mut(id);
        assert!(r.process.is_none(), "replica {id} is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&r.log).expect("log file");
        let security = self.security_args(id);
        let r = self.replica_mut(id);
        let mut cmd = Command::new(bin("titus-control-plane"));
        cmd.arg("--node-id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&r.data_dir)
            .arg("--peer-listen")
            .arg(&r.peer_addr)
            .arg("--api-listen")
            .arg(&r.api_addr)
            .arg("--admin-listen")
            .arg(&r.admin_addr)
            .args(security)
            .args(members.iter().flat_map(|m| ["--member".to_string(), m.clone()]))
            .args(&extra)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log);
        r.process = Some(cmd.spawn().expect("spawn titus-control-plane"));
    }

    /// Adds a new replica process that is not an initial member (it joins via AddMember).
    pub fn spawn_joiner(&mut self, id: u64) -> (String, String) {
        let r = Cluster::new_replica(&self.dir, id, &free_ports(3));
        let addrs = (r.peer_addr.clone(), r.api_addr.clone());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&r.log).expect("log file");
        let mut cmd = Command::new(bin("titus-control-plane"));
        cmd.args(["--node-id", &id.to_string(), "--peer-listen", &r.peer_addr, "--api-listen", &r.api_addr])
            .arg("--data-dir")
            .arg(&r.data_dir)
            .args(self.security_args(id))
            .args(&self.extra_args)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log);
        let mut r = r;
        r.process = Some(cmd.spawn().expect("spawn joiner"));
        self.replicas.push(r);
        addrs
    }

    /// The process id of running replica `id`.
    pub fn pid(&self, id: u64) -> u32 {
        self.replica(id).process.as_ref().expect("replica running").id()
    }

    /// Stops replica `id` in its tracks (SIGSTOP): a stalled process, as its peers see it.
    pub fn pause(&mut self, id: u64) {
        signal(self.replica_mut(id).process.as_ref().expect("replica running").id(), "STOP");
    }

    /// Lets a paused replica go on (SIGCONT).
    pub fn resume(&mut self, id: u64) {
        signal(self.replica_mut(id).process.as_ref().expect("replica running").id(), "CONT");
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut p) = self.replica_mut(id).process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit; returns the exit status.
    pub fn terminate(&mut self, id: u64) -> std::process::ExitStatus {
        let mut p = self.replica_mut(id).process.take().expect("replica is running");
        let pid = p.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = p.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "replica {id} did not exit within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wipe(&mut self, id: u64) {
        let r = self.replica(id);
        assert!(r.process.is_none(), "stop replica {id} before wiping it");
        std::fs::remove_dir_all(&r.data_dir).expect("wipe data dir");
    }

    pub fn running(&self) -> Vec<u64> {
        self.replicas.iter().filter(|r| r.process.is_some()).map(|r| r.id).collect()
    }

    /// A client seeded with every replica's api address.
    pub fn client(&self) -> Client {
        self.client_with(ClientOptions::default())
    }

    /// A client that only knows replica `id`.
    pub fn client_of(&self, id: u64) -> Client {
        Client::with_options([self.replica(id).api_addr.as_str()], self.credentials(ClientOptions::default()))
            .expect("client")
    }

    /// `options` with the admin client certificate when the cluster is secure.
    pub fn credentials(&self, options: ClientOptions) -> ClientOptions {
        match &self.secure {
            None => options,
            Some(s) => options
                .with_tls(
                    s.certs.join("ca.pem"),
                    Some((s.certs.join("client-admin.pem"), s.certs.join("client-admin.key"))),
                )
                .expect("the admin client certificate"),
        }
    }

    pub fn client_with(&self, options: ClientOptions) -> Client {
        Client::with_options(self.replicas.iter().map(|r| r.api_addr.as_str()), self.credentials(options))
            .expect("client")
    }

    pub async fn status_of(&self, id: u64) -> Option<ClusterStatus> {
        self.client_of(id).cluster_status_of(&self.replica(id).api_addr).await.ok()
    }

    /// Waits until every running replica agrees on one leader among the running ones and knows
    /// the cluster id; returns the leader's id.
    pub async fn wait_for_leader(&self, within: Duration) -> u64 {
        let running = self.running();
        wait_until(within, &format!("a leader agreed by replicas {running:?}"), || async {
            let mut leader = None;
            for id in &running {
                let s = self.status_of(*id).await?;
                if s.leader_id == 0 || !running.contains(&s.leader_id) || s.cluster_id.is_empty() {
                    return None;
                }
                if *leader.get_or_insert(s.leader_id) != s.leader_id {
                    return None;
                }
            }
            leader
        })
        .await
    }

    /// Waits until replica `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64, within: Duration) -> ClusterStatus {
        wait_until(within, &format!("replica {id} applied index {index}"), || async {
            self.status_of(id).await.filter(|s| s.last_applied_index >= index)
        })
        .await
    }

    pub fn dump_logs(&self) {
        for r in &self.replicas {
            if let Ok(text) = std::fs::read_to_string(&r.log) {
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("----- replica {} log (last 40 lines) -----", r.id);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Cluster {
    /// Starts an agent with `cpu` and `memory_mb` to offer, seeded with every replica. Its id is
    /// unique to this test process, so concurrent tests never share containers.
    pub fn start_agent(&mut self, name: &str, cpu: f64, memory_mb: u32) -> String {
        self.start_agent_with(name, cpu, memory_mb, &[])
    }

    /// An agent with only `extra` for security flags (none of the cluster's own).
    pub fn start_agent_plain(&mut self, name: &str, extra: &[&str]) -> String {
        self.start_agent_inner(name, 1.0, 512, extra, false)
    }

    /// Like `start_agent`, with extra flags.
    pub fn start_agent_with(&mut self, name: &str, cpu: f64, memory_mb: u32, extra: &[&str]) -> String {
        self.start_agent_inner(name, cpu, memory_mb, extra, true)
    }

    fn start_agent_inner(&mut self, name: &str, cpu: f64, memory_mb: u32, extra: &[&str], security: bool) -> String {
        let id = format!("{name}-{}", std::process::id());
        let servers = self.servers();
        let args: Vec<String> = vec![
            "--agent-id".to_string(),
            id.clone(),
            "--servers".into(),
            servers,
            "--cpu".into(),
            cpu.to_string(),
            "--memory-mb".into(),
            memory_mb.to_string(),
            "--attribute".into(),
            "zone=us-east-1a".into(),
            "--finished-logs-dir".into(),
            self.dir.path().join("finished-logs").display().to_string(),
        ]
        .into_iter()
        .chain(if security { self.agent_security_args(&id) } else { Vec::new() })
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
        let log = self.dir.path().join(format!("agent-{id}.log"));
        let mut a = AgentProc { id: id.clone(), args, log, process: None };
        spawn_agent(&mut a);
        self.agents.push(a);
        id
    }

    fn agent_mut(&mut self, id: &str) -> &mut AgentProc {
        self.agents.iter_mut().find(|a| a.id == id).expect("no such agent")
    }

    pub fn kill_agent(&mut self, id: &str) {
        if let Some(mut p) = self.agent_mut(id).process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Stops agent `id` in its tracks (SIGSTOP): a stalled host, as the control plane sees it.
    pub fn pause_agent(&mut self, id: &str) {
        signal(self.agent_mut(id).process.as_ref().expect("agent running").id(), "STOP");
    }

    /// Lets a paused agent go on (SIGCONT).
    pub fn resume_agent(&mut self, id: &str) {
        signal(self.agent_mut(id).process.as_ref().expect("agent running").id(), "CONT");
    }

    pub fn restart_agent(&mut self, id: &str) {
        spawn_agent(self.agent_mut(id));
    }

    pub fn agent_log(&self, id: &str) -> String {
        self.agents.iter().find(|a| a.id == id).and_then(|a| std::fs::read_to_string(&a.log).ok()).unwrap_or_default()
    }
}

fn spawn_agent(a: &mut AgentProc) {
    assert!(a.process.is_none(), "agent {} is already running", a.id);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&a.log).expect("agent log");
    let child = Command::new(bin("titus-agent"))
        .args(&a.args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn titus-agent");
    a.process = Some(child);
}

/// The test's containers: (container id, task id, running, started at), from the Docker daemon.
pub fn containers_of(agent_id: &str) -> Vec<(String, String, bool, String)> {
    let out = Command::new("docker")
        .args(["ps", "-a", "--filter", &format!("label=titus.agent.id={agent_id}"), "--format", "{{.ID}}"])
        .output()
        .expect("docker ps");
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    ids.into_iter()
        .filter_map(|id| {
            let out = Command::new("docker")
                .args([
                    "inspect",
                    "--format",
                    "{{index .Config.Labels \"titus.task.id\"}} {{.State.Running}} {{.State.StartedAt}}",
                    &id,
                ])
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let mut parts = text.split(' ');
            Some((id, parts.next()?.to_string(), parts.next()? == "true", parts.next()?.to_string()))
        })
        .collect()
}

/// Removes what agent `agent_id` left in the Docker daemon: its containers, then its job networks
/// (which go only once their containers have). For a test's teardown.
pub fn remove_agent_leftovers(agent_id: &str) {
    let label = format!("label=titus.agent.id={agent_id}");
    let steps: [(&[&str], &[&str]); 2] =
        [(&["ps", "-aq"], &["rm", "-f"]), (&["network", "ls", "-q"], &["network", "rm"])];
    for (list, remove) in steps {
        let Ok(out) = Command::new("docker").args(list).args(["--filter", &label]).output() else { continue };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
        if !ids.is_empty() {
            let _ = Command::new("docker").args(remove).args(&ids).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }
    // Its metadata routes (iptables nat rules commented `titus-metadata:<agent id>`), left when
    // the agent was killed before its networks went.
    let Ok(out) = Command::new("iptables").args(["-w", "-t", "nat", "-S", "PREROUTING"]).output() else { return };
    let comment = format!("titus-metadata:{agent_id}");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().map(|w| w.trim_matches('"')).collect();
        if words.first() == Some(&"-A") && words.contains(&comment.as_str()) {
            let _ = Command::new("iptables").args(["-w", "-t", "nat", "-D"]).args(&words[1..]).status();
        }
    }
}

/// Builds the local test image (idempotent).
pub fn ensure_test_image() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/build-test-image.sh");
    let status = Command::new("bash").arg(script).status().expect("run build-test-image.sh");
    assert!(status.success(), "building the test image failed");
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
            for a in &self.agents {
                if let Ok(text) = std::fs::read_to_string(&a.log) {
                    eprintln!("----- agent {} log (last 30 lines) -----", a.id);
                    for l in text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
        for a in &mut self.agents {
            if let Some(mut p) = a.process.take() {
                let _ = p.kill();
                let _ = p.wait();
            }
            remove_agent_leftovers(&a.id);
        }
        for r in &mut self.replicas {
            if let Some(mut p) = r.process.take() {
                let _ = p.kill();
                let _ = p.wait();
            }
        }
    }
}

/// A writer started by a test: what it had acknowledged, and every error the SDK gave up with.
pub type Load = tokio::task::JoinHandle<(Vec<String>, Vec<String>)>;

/// Stops the writers and waits for each one's last call to return (so that state read afterwards
/// must hold every acknowledgement); asserts none failed beyond the SDK's retries and returns every
/// id acknowledged.
pub async fn stop_load(stop: &std::sync::atomic::AtomicBool, writers: Vec<Load>) -> Vec<String> {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        let (ids, failed) = w.await.expect("writer task");
        assert!(failed.is_empty(), "requests failed beyond the SDK's retries: {failed:?}");
        acked.extend(ids);
    }
    acked
}

/// Polls `probe` until it yields a value; panics with `what` after `within`.
pub async fn wait_until<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn group(name: &str) -> CapacityGroupSpec {
    CapacityGroupSpec::new(name, Tier::Flex, 1.0, 1024, 2048, 128, 3)
}

pub fn role_of(s: &ClusterStatus, id: u64) -> Option<MemberRole> {
    s.members.iter().find(|m| m.node_id == id).and_then(|m| MemberRole::try_from(m.role).ok())
}

/// Runs `titus-control-plane` with `args` until it exits (at most `within`); returns its exit
/// status and what it wrote to stderr.
pub fn run_to_exit(args: &[String], within: Duration) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(bin("titus-control-plane"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("titus-control-plane {args:?} did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read;
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
    (status, stderr)
}

impl Cluster {
    /// Copies replica `from` of `other`'s data dir over replica `to` of this cluster (both stopped).
    pub fn transplant_data_from(&mut self, other: &Cluster, from: u64, to: u64) {
        let src = other.replica(from).data_dir.clone();
        let dst = self.replica(to).data_dir.clone();
        let _ = std::fs::remove_dir_all(&dst);
        copy_dir(&src, &dst);
    }

    pub fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(&self.replica(id).log).unwrap_or_default()
    }
}

fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for entry in std::fs::read_dir(src).expect("read dir") {
        let entry = entry.expect("entry");
        let to = dst.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).expect("copy");
        }
    }
}

/// GETs `path` from an admin port: (status code, body); status 0 when nothing listens (yet).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return (0, format!("connect {addr}: {e}")),
    };
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await.expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// One sample: metric name, labels, value.
pub type Sample = (String, std::collections::BTreeMap<String, String>, f64);

/// A strict parser of the text exposition format (0.0.4): HELP/TYPE lines, samples with quoted
/// and escaped label values, numeric values; every sample belongs to a family whose TYPE came
/// first; histogram buckets are cumulative and end with `+Inf` equal to `_count`.
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut types: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    let mut samples = Vec::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
    };
    for (no, line) in text.lines().enumerate() {
        let at = |m: &str| format!("line {}: {m}: {line:?}", no + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), _) if valid_name(name) => {}
                (Some("TYPE"), Some(name), Some(kind))
                    if valid_name(name) && ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) =>
                {
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(at("a second TYPE for one family"));
                    }
                }
                _ => return Err(at("a comment that is neither HELP nor TYPE")),
            }
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| at("value is not a number"))?,
        };
        let (name, labels) = match name_labels.split_once('{') {
            None => (name_labels.to_string(), std::collections::BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').ok_or_else(|| at("labels not closed"))?;
                let mut labels = std::collections::BTreeMap::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    if !valid_name(&key) || chars.next() != Some('"') {
                        return Err(at("bad label"));
                    }
                    let mut val = String::new();
                    loop {
                        match chars.next() {
                            Some('\\') => match chars.next() {
                                Some('n') => val.push('\n'),
                                Some(c @ ('\\' | '"')) => val.push(c),
                                _ => return Err(at("bad escape")),
                            },
                            Some('"') => break,
                            Some(c) => val.push(c),
                            None => return Err(at("label value not closed")),
                        }
                    }
                    labels.insert(key, val);
                    match chars.next() {
                        Some(',') | None => {}
                        _ => return Err(at("labels not separated by commas")),
                    }
                }
                (name.to_string(), labels)
            }
        };
        if !valid_name(&name) {
            return Err(at("bad metric name"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")))
            .unwrap_or(&name);
        if !types.contains_key(family) {
            return Err(at("a sample before its family's TYPE"));
        }
        samples.push((name, labels, value));
    }
    // Histograms: cumulative buckets ending at +Inf == _count.
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let mut series: std::collections::BTreeMap<Vec<(String, String)>, Vec<f64>> = std::collections::BTreeMap::new();
        for (name, labels, v) in &samples {
            if *name == format!("{family}_bucket") {
                let key = labels.iter().filter(|(k, _)| *k != "le").map(|(k, v)| (k.clone(), v.clone())).collect();
                series.entry(key).or_default().push(*v);
            }
        }
        for (key, buckets) in series {
            if buckets.windows(2).any(|w| w[1] < w[0]) {
                return Err(format!("{family}{key:?}: buckets are not cumulative"));
            }
            let count = samples
                .iter()
                .find(|(n, l, _)| {
                    *n == format!("{family}_count")
                        && l.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>() == key
                })
                .map(|s| s.2);
            if count != buckets.last().copied() {
                return Err(format!("{family}{key:?}: +Inf bucket differs from _count"));
            }
        }
    }
    Ok(samples)
}

pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.2)
        .sum()
}

pub async fn scrape(addr: &str) -> Vec<Sample> {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    parse_exposition(&body).unwrap_or_else(|e| panic!("invalid exposition from {addr}: {e}\n{body}"))
}

/// A service job of `desired` tasks (max 10) that sleep for ten minutes in the local test image.
pub fn sleeping_service(app: &str, cpu: f64, memory_mb: u32, desired: u32) -> titus_client::proto::JobDescriptor {
    use titus_client::proto as pb;
    pb::JobDescriptor {
        owner: Some(pb::Owner { team_email: "team@example.com".into() }),
        application_name: app.into(),
        container: Some(pb::Container {
            resources: Some(pb::ContainerResources { cpu, memory_mb, ..Default::default() }),
            image: Some(pb::Image { name: "titus/busybox".into(), tag: "latest".into(), digest: String::new() }),
            command: vec!["sleep".into(), "600".into()],
            ..Default::default()
        }),
        job_type: Some(pb::job_descriptor::JobType::Service(pb::ServiceJobSpec {
            capacity: Some(pb::Capacity { min: 0, desired, max: 10 }),
            enabled: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// A process's peak resident memory in bytes (`VmHWM`), as the kernel counts it.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc status");
    kb * 1024
}

/// Sends `SIG<name>` to process `pid`.
pub fn signal(pid: u32, name: &str) {
    let ok = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "kill -{name} {pid} failed");
}

/// Runs `agent/tests/titus_v3_client.py` (Titus's V3 API from Python stubs generated by
/// grpcio-tools) against the cluster's api addresses, with `extra` arguments; prints its output and
/// answers it, or panics with its last line when a step failed. With `leader_kill`, the client's
/// `LEADER-KILL` line is sent there and the client goes on once that answers. Blocking: call it off
/// the runtime.
pub fn run_titus_v3_client(
    servers: &str,
    app: &str,
    extra: &[String],
    leader_kill: Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>,
) -> String {
    use std::io::{BufRead, Write};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut child = Command::new("python3")
        .arg(root.join("agent/tests/titus_v3_client.py"))
        .args(["--api", servers, "--app", app, "--timeout", "240"])
        .arg("--protos")
        .arg(root.join("proto/proto"))
        .args(extra)
        .args(leader_kill.as_ref().map(|_| "--leader-kill"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3 (grpcio-tools: deploy/lib/common.sh ensure_grpc_tools)");
    let mut stdin = child.stdin.take().expect("the client's stdin");
    let stderr = child.stderr.take().expect("the client's stderr");
    let errors = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let mut stdout = String::new();
    for line in std::io::BufReader::new(child.stdout.take().expect("the client's stdout")).lines() {
        let line = line.unwrap_or_default();
        println!("{line}");
        if line == "LEADER-KILL" {
            let (ask, done) = leader_kill.as_ref().expect("a client asked for a leader kill it was not given");
            ask.send(()).expect("the leader killer");
            done.recv().expect("the leader killed");
            stdin.write_all(b"go\n").and_then(|_| stdin.flush()).expect("the client's stdin");
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = child.wait().expect("the client");
    println!("{}", errors.join().unwrap_or_default());
    assert!(status.success(), "the V3 client failed: {}", stdout.lines().last().unwrap_or_default());
    assert!(stdout.contains("all steps held"), "{stdout}");
    stdout
}
