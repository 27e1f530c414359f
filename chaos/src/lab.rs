//! A lab: a Titus cluster on this machine with each replica and agent in its own network namespace
//! (its own address on a bridge this lab creates), so that every fault — partitions included — can
//! be made for real. Used by the chaos tests and by `titus-chaos lab up` for trying plans by hand.
//!
//! Layout for lab `tcXXXXX` on subnet 10.A.B.0/24: bridge `tcXXXXXb` with 10.A.B.1 (this host's
//! side: clients and titus-chaos reach the cluster there), replica i at 10.A.B.(10+i) with peer
//! port 7000, API 8000 and admin 9000; agent j at 10.A.B.(100+j) with admin 9100.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::deployment::{self, run, Agent, Deployment, Process, Replica};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabSpec {
    pub replicas: u32,
    pub agents: u32,
    /// Where titus-control-plane and titus-agent are.
    pub bin_dir: PathBuf,
    /// Extra arguments for every replica; `{host_ip}` becomes this host's address on the lab's
    /// bridge (where a server the replicas need, such as moto, can listen).
    #[serde(default)]
    pub replica_args: Vec<String>,
    /// Extra arguments for every agent.
    #[serde(default)]
    pub agent_args: Vec<String>,
}

/// A running lab; `down` (or drop) stops its processes and removes its namespaces and bridge.
#[derive(Debug, Serialize, Deserialize)]
pub struct Lab {
    pub name: String,
    pub dir: PathBuf,
    pub subnet: String,
    pub deployment: Deployment,
    #[serde(skip)]
    keep: bool,
}

impl Lab {
    pub fn deployment_file(&self) -> PathBuf {
        self.dir.join("deployment.yaml")
    }

    pub fn host_ip(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// Creates the network and starts every process; the deployment file is written to `dir`.
    pub fn up(spec: &LabSpec, dir: &Path) -> Result<Lab> {
        if spec.replicas == 0 || spec.replicas > 9 {
            bail!("replicas: {} (a lab has 1 to 9)", spec.replicas);
        }
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let name = format!("tc{:05x}", rand::thread_rng().gen_range(0..0xfffffu32));
        let subnet = free_subnet()?;
        let mut lab = Lab {
            name: name.clone(),
            dir: dir.clone(),
            subnet: subnet.clone(),
            deployment: Deployment::default(),
            keep: false,
        };
        // From here on, a failure tears down what was made.
        let bridge = format!("{name}b");
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        run("ip", &["addr", "add", &format!("{subnet}.1/24"), "dev", &bridge])?;
        run("ip", &["link", "set", &bridge, "up"])?;
        // Docker's FORWARD policy is DROP, and bridged packets pass through it when br_netfilter is
        // loaded: let the lab's bridge forward to itself.
        let _ = run("iptables", &["-w", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT"]);
        let members: Vec<String> = (1..=spec.replicas)
            .map(|i| format!("--member={i}={subnet}.{}:7000/{subnet}.{}:8000", 10 + i, 10 + i))
            .collect();
        let servers: Vec<String> = (1..=spec.replicas).map(|i| format!("{subnet}.{}:8000", 10 + i)).collect();
        for i in 1..=spec.replicas {
            let host = format!("r{i}");
            let ip = format!("{subnet}.{}", 10 + i);
            lab.host(&host, &ip)?;
            let mut args = vec![
                format!("--node-id={i}"),
                format!("--data-dir={}", dir.join(format!("data-{i}")).display()),
                format!("--peer-listen={ip}:7000"),
                format!("--api-listen={ip}:8000"),
                format!("--admin-listen={ip}:9000"),
                // The lab tests faults, not TLS (security has its own tests): plaintext.
                "--insecure".into(),
            ];
            args.extend(members.iter().cloned());
            args.extend(spec.replica_args.iter().map(|a| a.replace("{host_ip}", &format!("{subnet}.1"))));
            let process = lab.process(&host, &spec.bin_dir.join("titus-control-plane"), &args);
            lab.deployment.replicas.push(Replica {
                id: i as u64,
                api: format!("{ip}:8000"),
                ip: ip.clone(),
                admin: Some(format!("{ip}:9000")),
                process,
            });
        }
        for j in 1..=spec.agents {
            let host = format!("a{j}");
            let ip = format!("{subnet}.{}", 100 + j);
            lab.host(&host, &ip)?;
            let id = format!("{name}-agent-{j}");
            let mut args = vec![
                format!("--agent-id={id}"),
                format!("--servers={}", servers.join(",")),
                format!("--admin-listen={ip}:9100"),
                "--cpu=4".into(),
                "--memory-mb=4096".into(),
                "--insecure".into(),
                format!("--attribute=zone=lab-{}", (b'a' + (j - 1) as u8 % 3) as char),
            ];
            args.extend(spec.agent_args.iter().map(|a| a.replace("{host_ip}", &format!("{subnet}.1"))));
            let process = lab.process(&host, &spec.bin_dir.join("titus-agent"), &args);
            lab.deployment.agents.push(Agent { id, ip, process });
        }
        lab.deployment.state_file = Some(dir.join("chaos-state.json"));
        lab.save()?;
        for r in &lab.deployment.replicas {
            r.process.start(&[]).with_context(|| format!("starting replica {}", r.id))?;
        }
        for a in &lab.deployment.agents {
            a.process.start(&[]).with_context(|| format!("starting agent {}", a.id))?;
        }
        Ok(lab)
    }

    fn save(&self) -> Result<()> {
        self.deployment.save(&self.deployment_file())?;
        std::fs::write(self.dir.join("lab.json"), serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }

    /// A lab left running by `lab up`, for `lab down`.
    pub fn open(dir: &Path) -> Result<Lab> {
        let text =
            std::fs::read_to_string(dir.join("lab.json")).with_context(|| format!("no lab in {}", dir.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Leaves the lab running when this handle is dropped.
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// A namespace with a veth into the bridge.
    fn host(&self, host: &str, ip: &str) -> Result<()> {
        let ns = format!("{}-{host}", self.name);
        let (outer, inner) = (format!("{}{host}", self.name), format!("{}{host}p", self.name));
        run("ip", &["netns", "add", &ns])?;
        run("ip", &["link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
        run("ip", &["link", "set", &inner, "netns", &ns])?;
        run("ip", &["link", "set", &outer, "master", &format!("{}b", self.name)])?;
        run("ip", &["link", "set", &outer, "up"])?;
        run("ip", &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", &inner])?;
        run("ip", &["-n", &ns, "link", "set", &inner, "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn process(&self, host: &str, program: &Path, args: &[String]) -> Process {
        let ns = format!("{}-{host}", self.name);
        let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        Process {
            pid_file: Some(self.dir.join(format!("{host}.pid"))),
            restart: Some(format!(
                "ip netns exec {ns} {} {}",
                shell_quote(&program.display().to_string()),
                quoted.join(" ")
            )),
            log: Some(self.dir.join(format!("{host}.log"))),
            netns: Some(ns),
            container: None,
        }
    }

    /// Waits until a replica reports a leader.
    pub async fn wait_for_leader(&self, within: Duration) -> Result<u64> {
        let client = self.deployment.client()?;
        let deadline = Instant::now() + within;
        loop {
            for r in &self.deployment.replicas {
                if let Ok(s) = client.cluster_status_of(&r.api).await {
                    if s.leader_id != 0 {
                        return Ok(s.leader_id);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no leader within {within:?}; logs in {}", self.dir.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every process, removes the agents' containers, the namespaces and the bridge.
    pub fn down(&mut self) {
        let all = self
            .deployment
            .replicas
            .iter()
            .map(|r| &r.process)
            .chain(self.deployment.agents.iter().map(|a| &a.process));
        for p in all {
            if p.stopped() {
                let _ = p.signal(deployment::Signal::Cont);
            }
            if p.pid().is_some() {
                let _ = p.kill();
            }
        }
        // The agents' containers, then their job networks (which go once their containers have).
        for a in &self.deployment.agents {
            let label = format!("label=titus.agent.id={}", a.id);
            let steps: [(&[&str], &[&str]); 2] =
                [(&["ps", "-aq"], &["rm", "-f"]), (&["network", "ls", "-q"], &["network", "rm"])];
            for (list, remove) in steps {
                let mut ls = list.to_vec();
                ls.extend(["--filter", label.as_str()]);
                if let Ok(ids) = run("docker", &ls) {
                    let ids: Vec<&str> = ids.split_whitespace().collect();
                    if !ids.is_empty() {
                        let mut args = remove.to_vec();
                        args.extend(ids);
                        let _ = run("docker", &args);
                    }
                }
            }
        }
        let bridge = format!("{}b", self.name);
        let _ = run("iptables", &["-w", "-D", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT"]);
        for p in
            self.deployment.replicas.iter().map(|r| &r.process).chain(self.deployment.agents.iter().map(|a| &a.process))
        {
            if let Some(ns) = &p.netns {
                let _ = run("ip", &["netns", "del", ns]);
            }
        }
        let _ = run("ip", &["link", "del", &bridge]);
    }

    /// Whether `from`'s namespace can open a TCP connection to `addr` within a second.
    pub fn can_connect(from: &Process, addr: &str) -> bool {
        let Ok(mut cmd) = from.netns_command("timeout") else { return false };
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "0"));
        cmd.args(["1", "bash", "-c", &format!("exec 3<>/dev/tcp/{host}/{port}")]);
        cmd.output().map(|o| o.status.success()).unwrap_or(false)
    }
}

/// Removes every lab left behind by a run that could not clean up (a test killed by its timeout):
/// the processes in its namespaces, the namespaces, bridges and forward rules. Returns their names.
pub fn sweep() -> Result<Vec<String>> {
    let is_lab =
        |name: &str| name.len() == 7 && name.starts_with("tc") && name[2..].chars().all(|c| c.is_ascii_hexdigit());
    let mut swept = Vec::new();
    for line in run("ip", &["netns", "list"])?.lines() {
        let ns = line.split_whitespace().next().unwrap_or("");
        let Some((lab, _host)) = ns.split_once('-') else { continue };
        if !is_lab(lab) {
            continue;
        }
        for pid in run("ip", &["netns", "pids", ns]).unwrap_or_default().split_whitespace() {
            let _ = run("kill", &["-CONT", pid]);
            let _ = run("kill", &["-KILL", pid]);
        }
        let _ = run("ip", &["netns", "del", ns]);
        swept.push(ns.to_string());
    }
    for line in run("ip", &["-o", "link", "show", "type", "bridge"])?.lines() {
        let Some(name) = line.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n)) else { continue };
        if let Some(lab) = name.strip_suffix('b').filter(|l| is_lab(l)) {
            let _ = run("iptables", &["-w", "-D", "FORWARD", "-i", name, "-o", name, "-j", "ACCEPT"]);
            let _ = run("ip", &["link", "del", name]);
            swept.push(format!("{lab} (bridge)"));
        }
    }
    Ok(swept)
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.keep {
            self.down();
        }
    }
}

fn shell_quote(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "-_=./:,@".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A 10.x.y.0/24 not in use on this host.
fn free_subnet() -> Result<String> {
    let used = run("ip", &["-o", "-4", "addr", "show"])?;
    for _ in 0..100 {
        let mut rng = rand::thread_rng();
        let subnet = format!("10.{}.{}", rng.gen_range(200..=250), rng.gen_range(0..=255));
        if !used.contains(&format!(" {subnet}.")) {
            return Ok(subnet);
        }
    }
    bail!("no free 10.200-250.x.0/24 subnet")
}
