//! What titus-chaos is pointed at: the replicas and agents of one deployment, how to reach each
//! one's process (a pid file and a restart command on this host, or a Docker container) and its
//! network namespace (where partitions are made), and the AWS fault proxy's control address.
//!
//! `titus-chaos lab up` writes one for a cluster it starts in network namespaces; the compose stack
//! and hand-run clusters write their own (see chaos/README.md).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub replicas: Vec<Replica>,
    #[serde(default)]
    pub agents: Vec<Agent>,
    /// Control address (`host:port`) of a running `titus-chaos aws-proxy` that the replicas use as
    /// their AWS endpoint. Without it, AWS faults are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_proxy: Option<String>,
    /// A shell command that restarts the Docker daemon on the agents' host (e.g.
    /// `systemctl restart docker`). Without it, the docker-restart fault is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_restart: Option<String>,
    /// libfaketime's library, for clock skew; the Debian path by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faketime_lib: Option<PathBuf>,
    /// Where active faults are journaled; by default `chaos-state.json` beside the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replica {
    pub id: u64,
    /// Its client API address (`host:port`).
    pub api: String,
    /// The address its peers reach it at; partitions drop packets by it.
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    pub process: Process,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub id: String,
    pub ip: String,
    pub process: Process,
}

/// How to reach one process: exactly one of `pid_file` (a process on this host) or `container`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// Shell command that starts it again (it must exec the program, keeping the pid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    /// Where a restarted process's output goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
    /// The network namespace (`ip netns` name) it runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// A Docker container name or id, instead of a pid file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// The signals titus-chaos sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Kill,
    Term,
    Stop,
    Cont,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Kill => "KILL",
            Signal::Term => "TERM",
            Signal::Stop => "STOP",
            Signal::Cont => "CONT",
        }
    }
}

impl Deployment {
    pub fn load(path: &Path) -> Result<Deployment> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading deployment file {}", path.display()))?;
        let mut d: Deployment =
            serde_yaml::from_str(&text).with_context(|| format!("deployment file {}", path.display()))?;
        d.validate().with_context(|| format!("deployment file {}", path.display()))?;
        if d.state_file.is_none() {
            d.state_file = Some(path.with_file_name("chaos-state.json"));
        }
        Ok(d)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_yaml::to_string(self)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    pub fn validate(&self) -> Result<()> {
        if self.replicas.is_empty() {
            bail!("replicas: at least one replica is needed");
        }
        let mut ids = std::collections::BTreeSet::new();
        for (i, r) in self.replicas.iter().enumerate() {
            if !ids.insert(r.id) {
                bail!("replicas[{i}].id: {} appears twice", r.id);
            }
            r.process.validate().with_context(|| format!("replicas[{i}].process"))?;
        }
        for (i, a) in self.agents.iter().enumerate() {
            a.process.validate().with_context(|| format!("agents[{i}].process"))?;
        }
        Ok(())
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_file.clone().unwrap_or_else(|| PathBuf::from("chaos-state.json"))
    }

    pub fn replica(&self, id: u64) -> Result<&Replica> {
        self.replicas.iter().find(|r| r.id == id).ok_or_else(|| {
            let known: Vec<String> = self.replicas.iter().map(|r| r.id.to_string()).collect();
            anyhow!("no replica {id} in the deployment (replicas: {})", known.join(", "))
        })
    }

    pub fn agent(&self, id: &str) -> Result<&Agent> {
        self.agents.iter().find(|a| a.id == id).ok_or_else(|| {
            let known: Vec<&str> = self.agents.iter().map(|a| a.id.as_str()).collect();
            anyhow!("no agent {id:?} in the deployment (agents: {})", known.join(", "))
        })
    }

    pub fn api_addrs(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.api.clone()).collect()
    }

    pub fn client(&self) -> Result<titus_client::Client> {
        let options = titus_client::ClientOptions {
            deadline: Duration::from_secs(15),
            attempt_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        titus_client::Client::with_options(self.api_addrs(), options).map_err(|e| anyhow!("{e}"))
    }

    pub fn faketime_lib(&self) -> PathBuf {
        self.faketime_lib
            .clone()
            .unwrap_or_else(|| PathBuf::from("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"))
    }
}

impl Process {
    fn validate(&self) -> Result<()> {
        match (&self.pid_file, &self.container) {
            (Some(_), Some(_)) => bail!("give pid_file or container, not both"),
            (None, None) => bail!("pid_file or container is required"),
            (None, Some(_)) if self.restart.is_some() || self.netns.is_some() => {
                bail!("restart and netns belong to a pid_file process; a container is restarted and entered by Docker")
            }
            _ => Ok(()),
        }
    }

    /// Its pid on this host, when it runs.
    pub fn pid(&self) -> Option<u32> {
        if let Some(file) = &self.pid_file {
            let pid: u32 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
            return pid_alive(pid).then_some(pid);
        }
        let name = self.container.as_ref()?;
        let out = Command::new("docker").args(["inspect", "-f", "{{.State.Pid}}", name]).output().ok()?;
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        (pid > 0).then_some(pid)
    }

    pub fn describe(&self) -> String {
        match (&self.container, self.pid()) {
            (Some(c), _) => format!("container {c}"),
            (None, Some(pid)) => format!("pid {pid}"),
            (None, None) => "not running".into(),
        }
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        if let Some(name) = &self.container {
            let args: Vec<&str> = match signal {
                Signal::Stop => vec!["pause", name],
                Signal::Cont => vec!["unpause", name],
                other => vec!["kill", "-s", other.name(), name],
            };
            return run("docker", &args).map(|_| ());
        }
        let pid = self.pid().ok_or_else(|| anyhow!("not running"))?;
        run("kill", &[&format!("-{}", signal.name()), &pid.to_string()]).map(|_| ())
    }

    /// Whether the process is stopped (SIGSTOP or a paused container).
    pub fn stopped(&self) -> bool {
        if let Some(name) = &self.container {
            return run("docker", &["inspect", "-f", "{{.State.Paused}}", name])
                .map(|o| o.trim() == "true")
                .unwrap_or(false);
        }
        self.pid().and_then(|pid| proc_state(pid)).is_some_and(|s| s == 'T' || s == 't')
    }

    /// Kills it with SIGKILL and waits until it is gone.
    pub fn kill(&self) -> Result<()> {
        let pid = self.pid();
        self.signal(Signal::Kill)?;
        if let (Some(pid), None) = (pid, &self.container) {
            wait_until(Duration::from_secs(10), || !pid_alive(pid))
                .with_context(|| format!("pid {pid} still alive after SIGKILL"))?;
        }
        Ok(())
    }

    /// Starts it again (when it is not running), with extra environment variables.
    pub fn start(&self, env: &[(&str, String)]) -> Result<u32> {
        if let Some(name) = &self.container {
            if !env.is_empty() {
                bail!("container {name}: its environment is Docker's to set; this fault needs a pid_file process");
            }
            run("docker", &["start", name])?;
            return self.pid().ok_or_else(|| anyhow!("container {name} did not start"));
        }
        if let Some(pid) = self.pid() {
            return Ok(pid);
        }
        let restart = self.restart.as_ref().ok_or_else(|| anyhow!("no restart command in the deployment file"))?;
        let pid_file = self.pid_file.as_ref().ok_or_else(|| anyhow!("no pid_file"))?;
        // A killed process's threads may still hold its listening sockets for a moment after its
        // pid is gone (seen as "address already in use"): a start that fails at once is retried.
        let mut last = None;
        for attempt in 0..5u32 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
            }
            match self.spawn_once(restart, env)? {
                Ok(pid) => {
                    std::fs::write(pid_file, pid.to_string())
                        .with_context(|| format!("writing {}", pid_file.display()))?;
                    return Ok(pid);
                }
                Err(status) => last = Some(status),
            }
        }
        bail!(
            "{restart:?} exited at once ({}), 5 times; see {}",
            last.unwrap_or_default(),
            self.log.as_ref().map_or("its output".into(), |l| l.display().to_string())
        )
    }

    /// Spawns the restart command; its pid, or how it ended when it exits within 300 ms.
    fn spawn_once(&self, restart: &str, env: &[(&str, String)]) -> Result<std::result::Result<u32, String>> {
        let log = match &self.log {
            Some(path) => std::fs::OpenOptions::new().create(true).append(true).open(path)?,
            None => std::fs::OpenOptions::new().write(true).open("/dev/null")?,
        };
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!("exec {restart}"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        // Its own process group: a Ctrl-C meant for titus-chaos must not reach the deployment.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {restart:?}"))?;
        let pid = child.id();
        let settle = Instant::now() + Duration::from_millis(300);
        while Instant::now() < settle {
            if let Some(status) = child.try_wait()? {
                return Ok(Err(status.to_string()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The child is left running; it is reaped by init once this tool exits.
        std::mem::forget(child);
        Ok(Ok(pid))
    }

    /// A command run inside its network namespace.
    pub fn netns_command(&self, program: &str) -> Result<Command> {
        if let Some(ns) = &self.netns {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns, program]);
            return Ok(cmd);
        }
        if self.container.is_some() {
            let pid = self
                .pid()
                .ok_or_else(|| anyhow!("{} is not running; its network namespace is gone", self.describe()))?;
            let mut cmd = Command::new("nsenter");
            cmd.args(["-t", &pid.to_string(), "-n", program]);
            return Ok(cmd);
        }
        bail!(
            "it shares this host's network namespace: partitions need each process in its own (run the cluster with \
             `titus-chaos lab up`, in the compose stack, or name its `netns`)"
        )
    }
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    proc_state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ..." — comm may hold spaces and parentheses; the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Runs a command to completion; an error names it and carries its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a prepared command to completion.
pub fn run_cmd(mut cmd: Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
