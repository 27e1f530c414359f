//! The faults: what each one does, to whom, and how it is undone.
//!
//! A fault is applied in three steps: resolve its targets against the live cluster (who is the
//! leader now) and check the blast radius; journal it with its undo; then do it. Its undo runs at
//! the end of its duration, on Ctrl-C, or from `titus-chaos heal`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::deployment::{run, Deployment, Process, Signal};
use crate::duration::Dur;
use crate::journal::{now_unix_ms, Journal};
use crate::net::{self, Topology};
use crate::proxy::{self, FaultConfig};

/// Which replicas a fault hits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Leader,
    /// One follower, at random.
    Follower,
    /// A random minority: (n-1)/2 replicas.
    Minority,
    /// A random majority: n/2+1 replicas (needs allow-majority).
    Majority,
    Replica(u64),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        match s {
            "leader" => Ok(Target::Leader),
            "follower" => Ok(Target::Follower),
            "minority" => Ok(Target::Minority),
            "majority" => Ok(Target::Majority),
            other => other.trim_start_matches("replica-").parse().map(Target::Replica).map_err(|_| {
                format!("target {other:?}: expected leader, follower, minority, majority or a replica id")
            }),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Leader => f.write_str("leader"),
            Target::Follower => f.write_str("follower"),
            Target::Minority => f.write_str("minority"),
            Target::Majority => f.write_str("majority"),
            Target::Replica(id) => write!(f, "{id}"),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Target, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Id(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Id(id) => Ok(Target::Replica(id)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// An agent by id, or `random`.
pub type AgentTarget = String;

fn default_restart() -> Dur {
    Dur::secs(5)
}

fn one() -> u32 {
    1
}

/// A fault as written in a plan file (`kind: ...`) or given on the command line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FaultSpec {
    /// SIGKILL, then a restart after `restart_after`.
    Kill {
        target: Target,
        #[serde(default = "default_restart")]
        restart_after: Dur,
    },
    /// SIGSTOP for `duration`, then SIGCONT.
    Pause { target: Target, duration: Dur },
    /// Packet filtering between replicas for `duration`.
    Partition { topology: Topology, duration: Dur },
    /// Restarts a replica under libfaketime with its wall clock moved by `offset` (e.g. `+1h`,
    /// `-30s`) for `duration`, then restarts it with the real clock.
    Skew { target: Target, offset: String, duration: Dur },
    AgentKill {
        agent: AgentTarget,
        #[serde(default = "default_restart")]
        restart_after: Dur,
    },
    /// Cuts an agent off from every replica for `duration`.
    AgentIsolate { agent: AgentTarget, duration: Dur },
    /// Kills `count` of an agent's task containers behind its back (nothing to undo: the platform
    /// must notice and replace them).
    ContainerKill {
        agent: AgentTarget,
        #[serde(default = "one")]
        count: u32,
    },
    /// Restarts the Docker daemon with the deployment's `docker_restart` command.
    DockerRestart {},
    /// AWS faults through the deployment's fault proxy for `duration`.
    Aws {
        #[serde(default)]
        throttle_rate: f64,
        #[serde(default)]
        error_rate: f64,
        #[serde(default)]
        latency_rate: f64,
        #[serde(default)]
        latency_ms: u64,
        duration: Dur,
    },
}

/// A process of the deployment, as the journal names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Who {
    Replica(u64),
    Agent(String),
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Replica(id) => write!(f, "replica {id}"),
            Who::Agent(id) => write!(f, "agent {id}"),
        }
    }
}

impl Who {
    pub fn process<'a>(&self, d: &'a Deployment) -> Result<&'a Process> {
        match self {
            Who::Replica(id) => Ok(&d.replica(*id)?.process),
            Who::Agent(id) => Ok(&d.agent(id)?.process),
        }
    }
}

/// How a fault is undone; stored in the journal.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "undo", rename_all = "kebab-case")]
pub enum Undo {
    /// Start each one that is not running.
    Restart { who: Vec<Who> },
    /// SIGCONT (or unpause) each one.
    Resume { who: Vec<Who> },
    /// Flush the partition rules in each one's namespace.
    Heal { who: Vec<Who> },
    /// Restart it with the real clock.
    Unskew { who: Who },
    /// Turn the AWS fault proxy's faults off.
    AwsOff { addr: String },
}

/// What is done, resolved against the cluster as it is now.
enum Action {
    Kill(Vec<Who>),
    Pause(Vec<Who>),
    Partition(Vec<(Who, Vec<String>)>),
    Skew { who: Who, offset_secs: i64 },
    ContainerKill { agent: String, count: u32 },
    DockerRestart(String),
    Aws { addr: String, config: FaultConfig },
}

/// What a run did, in order, for the summary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the run started.
    pub at_ms: u64,
    pub unix_ms: u64,
    pub what: String,
    pub ok: bool,
}

/// The state a fault runner works with.
pub struct Chaos {
    pub deployment: Deployment,
    pub client: titus_client::Client,
    pub journal: Journal,
    /// Allow faults that take a majority of the replicas out.
    pub allow_majority: bool,
    pub allow_docker_restart: bool,
    pub rng: rand::rngs::StdRng,
    pub events: Vec<Event>,
    started: std::time::Instant,
}

impl Chaos {
    /// A fault runner; the journal is this process's until it ends.
    pub fn new(deployment: Deployment, seed: Option<u64>) -> Result<Chaos> {
        let journal = Journal::open_exclusive(&deployment.state_file())?;
        Chaos::with_journal(deployment, seed, journal)
    }

    /// For looking only (`status`): the journal as it is, not locked.
    pub fn observer(deployment: Deployment) -> Result<Chaos> {
        let journal = Journal::open(&deployment.state_file())?;
        Chaos::with_journal(deployment, None, journal)
    }

    fn with_journal(deployment: Deployment, seed: Option<u64>, journal: Journal) -> Result<Chaos> {
        let client = deployment.client()?;
        let rng = match seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_entropy(),
        };
        Ok(Chaos {
            deployment,
            client,
            journal,
            allow_majority: false,
            allow_docker_restart: false,
            rng,
            events: Vec::new(),
            started: std::time::Instant::now(),
        })
    }

    pub fn log(&mut self, ok: bool, what: String) {
        let at_ms = self.started.elapsed().as_millis() as u64;
        if ok {
            tracing::info!(at_ms, "{what}");
        } else {
            tracing::error!(at_ms, "{what}");
        }
        self.events.push(Event { at_ms, unix_ms: now_unix_ms(), what, ok });
    }

    fn ids(&self) -> Vec<u64> {
        self.deployment.replicas.iter().map(|r| r.id).collect()
    }

    /// The leader as the replicas report it now (a majority's word is not needed: any replica's
    /// view is enough to choose a target).
    pub async fn leader(&self) -> Option<u64> {
        for r in &self.deployment.replicas {
            if let Ok(s) = self.client.cluster_status_of(&r.api).await {
                if s.leader_id != 0 {
                    return Some(s.leader_id);
                }
            }
        }
        None
    }

    async fn resolve(&mut self, target: &Target) -> Result<Vec<u64>> {
        let ids = self.ids();
        let n = ids.len();
        let mut shuffled = ids.clone();
        shuffled.shuffle(&mut self.rng);
        Ok(match target {
            Target::Replica(id) => {
                self.deployment.replica(*id)?;
                vec![*id]
            }
            Target::Leader => {
                vec![self.leader().await.ok_or_else(|| anyhow!("target leader: the cluster has no leader now"))?]
            }
            Target::Follower => {
                let leader = self.leader().await;
                let f = shuffled.into_iter().find(|id| Some(*id) != leader);
                vec![f.ok_or_else(|| anyhow!("target follower: the deployment has no follower"))?]
            }
            Target::Minority if n < 3 => bail!("target minority: with {n} replica(s) a minority is nobody"),
            Target::Minority => shuffled[..(n - 1) / 2].to_vec(),
            Target::Majority => shuffled[..n / 2 + 1].to_vec(),
        })
    }

    fn agent(&mut self, which: &str) -> Result<String> {
        if which == "random" {
            let ids: Vec<String> = self.deployment.agents.iter().map(|a| a.id.clone()).collect();
            return ids
                .choose(&mut self.rng)
                .cloned()
                .ok_or_else(|| anyhow!("agent random: the deployment lists no agents"));
        }
        Ok(self.deployment.agent(which)?.id.clone())
    }

    fn check_restartable(&self, who: &[Who]) -> Result<()> {
        for w in who {
            let p = w.process(&self.deployment)?;
            if p.restart.is_none() && p.container.is_none() {
                bail!("kill {w}: it has no restart command in the deployment file, so the kill could not be undone");
            }
        }
        Ok(())
    }

    /// Refuses a fault that would take more than a minority of the replicas out at once.
    fn check_blast_radius(&self, impairs: &[u64]) -> Result<()> {
        let n = self.deployment.replicas.len();
        let mut all: BTreeSet<u64> = self.journal.impaired();
        all.extend(impairs.iter().copied());
        let limit = (n - 1) / 2;
        if all.len() > limit && !self.allow_majority {
            bail!(
                "blast radius: replicas {all:?} of {n} would be out at once; at most {limit} without --allow-majority \
                 (allow_majority: true in a plan)"
            );
        }
        Ok(())
    }

    /// Applies one fault; returns its journal id and when it is to be undone (None: nothing to undo).
    pub async fn apply(&mut self, spec: &FaultSpec) -> Result<Option<(u64, Duration)>> {
        let (description, action, undo, impairs, duration) = self.prepare(spec).await?;
        self.check_blast_radius(&impairs)?;
        let id = match &undo {
            Some(undo) => Some(self.journal.add(
                description.clone(),
                undo.clone(),
                impairs.clone(),
                now_unix_ms() + duration.as_millis() as u64,
            )?),
            None => None,
        };
        match self.execute(action).await {
            Ok(detail) => {
                self.log(true, format!("{description}{detail}"));
                Ok(id.map(|id| (id, duration)))
            }
            Err(e) => {
                self.log(false, format!("{description}: failed: {e:#}"));
                if let Some(id) = id {
                    self.undo(id).await;
                }
                Err(e)
            }
        }
    }

    async fn prepare(&mut self, spec: &FaultSpec) -> Result<(String, Action, Option<Undo>, Vec<u64>, Duration)> {
        Ok(match spec {
            FaultSpec::Kill { target, restart_after } => {
                let ids = self.resolve(target).await?;
                let who: Vec<Who> = ids.iter().map(|id| Who::Replica(*id)).collect();
                self.check_restartable(&who)?;
                let text = format!("kill {target} → replicas {ids:?} (SIGKILL), restart after {restart_after}");
                (text, Action::Kill(who.clone()), Some(Undo::Restart { who }), ids, restart_after.0)
            }
            FaultSpec::Pause { target, duration } => {
                let ids = self.resolve(target).await?;
                let who: Vec<Who> = ids.iter().map(|id| Who::Replica(*id)).collect();
                let text = format!("pause {target} → replicas {ids:?} (SIGSTOP) for {duration}");
                (text, Action::Pause(who.clone()), Some(Undo::Resume { who }), ids, duration.0)
            }
            FaultSpec::Partition { topology, duration } => {
                let ids = self.ids();
                let leader = if *topology == Topology::IsolateLeader { self.leader().await } else { None };
                let grudge = net::grudge(*topology, &ids, leader, &mut self.rng).map_err(|e| anyhow!(e))?;
                let majority = ids.len() / 2 + 1;
                let impairs: Vec<u64> =
                    grudge.iter().filter(|(_, drops)| ids.len() - drops.len() < majority).map(|(a, _)| *a).collect();
                let mut rules = Vec::new();
                for (a, drops) in &grudge {
                    let ips: Vec<String> = drops
                        .iter()
                        .map(|b| self.deployment.replica(*b).map(|r| r.ip.clone()))
                        .collect::<Result<_>>()?;
                    // Fail before anything is done when a namespace cannot be entered.
                    self.deployment
                        .replica(*a)?
                        .process
                        .netns_command("iptables")
                        .with_context(|| format!("replica {a}"))?;
                    rules.push((Who::Replica(*a), ips));
                }
                let shape: Vec<String> = grudge
                    .iter()
                    .map(|(a, d)| format!("{a}✗{}", d.iter().map(u64::to_string).collect::<Vec<_>>().join(",")))
                    .collect();
                let text = format!("partition {topology} [{}] for {duration}", shape.join(" "));
                let who = ids.iter().map(|id| Who::Replica(*id)).collect();
                (text, Action::Partition(rules), Some(Undo::Heal { who }), impairs, duration.0)
            }
            FaultSpec::Skew { target, offset, duration } => {
                let offset_secs = parse_offset(offset)?;
                let ids = self.resolve(target).await?;
                if ids.len() != 1 {
                    bail!("skew: one replica at a time (target {target} is {} replicas)", ids.len());
                }
                let lib = self.deployment.faketime_lib();
                if !lib.exists() {
                    bail!(
                        "skew: libfaketime is not at {} (apt-get install faketime, or set faketime_lib)",
                        lib.display()
                    );
                }
                let who = Who::Replica(ids[0]);
                let text = format!("skew {target} → replica {} clock {offset} for {duration}", ids[0]);
                (text, Action::Skew { who: who.clone(), offset_secs }, Some(Undo::Unskew { who }), ids, duration.0)
            }
            FaultSpec::AgentKill { agent, restart_after } => {
                let id = self.agent(agent)?;
                let who = vec![Who::Agent(id.clone())];
                self.check_restartable(&who)?;
                let text = format!("kill agent {id} (SIGKILL), restart after {restart_after}");
                (text, Action::Kill(who.clone()), Some(Undo::Restart { who }), vec![], restart_after.0)
            }
            FaultSpec::AgentIsolate { agent, duration } => {
                let id = self.agent(agent)?;
                let ips: Vec<String> = self.deployment.replicas.iter().map(|r| r.ip.clone()).collect();
                self.deployment.agent(&id)?.process.netns_command("iptables").with_context(|| format!("agent {id}"))?;
                let who = Who::Agent(id.clone());
                let text = format!("isolate agent {id} from the control plane for {duration}");
                (
                    text,
                    Action::Partition(vec![(who.clone(), ips)]),
                    Some(Undo::Heal { who: vec![who] }),
                    vec![],
                    duration.0,
                )
            }
            FaultSpec::ContainerKill { agent, count } => {
                let id = self.agent(agent)?;
                let text = format!("kill {count} task container(s) of agent {id} behind its back");
                (text, Action::ContainerKill { agent: id, count: *count }, None, vec![], Duration::ZERO)
            }
            FaultSpec::DockerRestart {} => {
                let cmd = self
                    .deployment
                    .docker_restart
                    .clone()
                    .ok_or_else(|| anyhow!("docker-restart: the deployment file has no docker_restart command"))?;
                if !self.allow_docker_restart {
                    bail!("docker-restart: refused without --allow-docker-restart (it restarts every container runtime client on the host)");
                }
                (format!("restart the Docker daemon ({cmd})"), Action::DockerRestart(cmd), None, vec![], Duration::ZERO)
            }
            FaultSpec::Aws { throttle_rate, error_rate, latency_rate, latency_ms, duration } => {
                let addr = self.deployment.aws_proxy.clone().ok_or_else(|| {
                    anyhow!("aws: the deployment file names no aws_proxy (start one with `titus-chaos aws-proxy`)")
                })?;
                let config = FaultConfig {
                    throttle_rate: *throttle_rate,
                    error_rate: *error_rate,
                    latency_rate: *latency_rate,
                    latency_ms: *latency_ms,
                    ..Default::default()
                };
                config.validate()?;
                let text = format!(
                    "aws faults via {addr}: throttle {throttle_rate}, 5xx {error_rate}, +{latency_ms}ms on {latency_rate} for {duration}"
                );
                (text, Action::Aws { addr: addr.clone(), config }, Some(Undo::AwsOff { addr }), vec![], duration.0)
            }
        })
    }

    /// Does it; returns detail for the log.
    async fn execute(&mut self, action: Action) -> Result<String> {
        let d = &self.deployment;
        match action {
            Action::Kill(who) => {
                let mut detail = Vec::new();
                for w in &who {
                    let p = w.process(d)?;
                    detail.push(format!("{w} was {}", p.describe()));
                    p.kill().with_context(|| format!("{w}"))?;
                }
                Ok(format!(" ({})", detail.join(", ")))
            }
            Action::Pause(who) => {
                for w in &who {
                    w.process(d)?.signal(Signal::Stop).with_context(|| format!("{w}"))?;
                }
                Ok(String::new())
            }
            Action::Partition(rules) => {
                for (w, ips) in &rules {
                    net::drop_from(w.process(d)?, ips).with_context(|| format!("{w}"))?;
                }
                Ok(String::new())
            }
            Action::Skew { who, offset_secs } => {
                let p = who.process(d)?;
                p.kill()?;
                let lib = d.faketime_lib().display().to_string();
                let pid = p.start(&[
                    ("LD_PRELOAD", lib),
                    ("FAKETIME", format!("{offset_secs:+}")),
                    ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
                ])?;
                Ok(format!(" (restarted as pid {pid} under libfaketime)"))
            }
            Action::ContainerKill { agent, count } => {
                let out = run(
                    "docker",
                    &["ps", "-q", "--filter", &format!("label=titus.agent.id={agent}"), "--filter", "status=running"],
                )?;
                let mut ids: Vec<&str> = out.split_whitespace().collect();
                if ids.is_empty() {
                    bail!("agent {agent} runs no task containers");
                }
                ids.shuffle(&mut self.rng);
                let mut killed = Vec::new();
                for id in ids.into_iter().take(count as usize) {
                    let task = run("docker", &["inspect", "-f", "{{index .Config.Labels \"titus.task.id\"}}", id])?;
                    run("docker", &["kill", id])?;
                    killed.push(format!("task {}", task.trim()));
                }
                Ok(format!(": {}", killed.join(", ")))
            }
            Action::DockerRestart(cmd) => run("sh", &["-c", &cmd]).map(|_| String::new()),
            Action::Aws { addr, config } => {
                proxy::remote_set(&addr, &config).await.with_context(|| addr.clone())?;
                Ok(String::new())
            }
        }
    }

    /// Undoes a journaled fault and removes it from the journal. Failures are retried, then logged
    /// and left in the journal for `heal`.
    pub async fn undo(&mut self, id: u64) -> bool {
        let Some(fault) = self.journal.active.iter().find(|f| f.id == id).cloned() else { return true };
        let mut last = None;
        for attempt in 0..5 {
            match undo(&self.deployment, &fault.undo).await {
                Ok(detail) => {
                    self.log(true, format!("undone: {}{detail}", fault.description));
                    if let Err(e) = self.journal.remove(id) {
                        self.log(false, format!("journal: {e:#}"));
                    }
                    return true;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        let e = last.map(|e| format!("{e:#}")).unwrap_or_default();
        self.log(false, format!("undo failed, left for `titus-chaos heal`: {}: {e}", fault.description));
        false
    }

    /// Undoes every journaled fault, then sweeps: flushes partition rules in every namespace,
    /// resumes stopped processes, turns AWS faults off.
    pub async fn heal(&mut self) -> bool {
        let mut ok = true;
        let ids: Vec<u64> = self.journal.active.iter().map(|f| f.id).collect();
        for id in ids {
            ok &= self.undo(id).await;
        }
        let mut whos: Vec<Who> = self.deployment.replicas.iter().map(|r| Who::Replica(r.id)).collect();
        whos.extend(self.deployment.agents.iter().map(|a| Who::Agent(a.id.clone())));
        for w in whos {
            let Ok(p) = w.process(&self.deployment).cloned() else { continue };
            if p.netns.is_some() || (p.container.is_some() && p.pid().is_some()) {
                if !net::dropped(&p).map(|s| s.is_empty()).unwrap_or(true) {
                    match net::heal(&p) {
                        Ok(()) => self.log(true, format!("heal: flushed partition rules of {w}")),
                        Err(e) => {
                            ok = false;
                            self.log(false, format!("heal: {w}: {e:#}"));
                        }
                    }
                }
            }
            if p.stopped() {
                match p.signal(Signal::Cont) {
                    Ok(()) => self.log(true, format!("heal: resumed {w}")),
                    Err(e) => {
                        ok = false;
                        self.log(false, format!("heal: resuming {w}: {e:#}"));
                    }
                }
            }
        }
        if let Some(addr) = self.deployment.aws_proxy.clone() {
            match proxy::remote_status(&addr).await {
                Ok(status) if !status.config.is_off() => {
                    match proxy::remote_set(&addr, &FaultConfig::default()).await {
                        Ok(_) => self.log(true, format!("heal: AWS faults off at {addr}")),
                        Err(e) => {
                            ok = false;
                            self.log(false, format!("heal: AWS proxy {addr}: {e:#}"));
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => self.log(false, format!("heal: AWS proxy {addr} unreachable: {e:#}")),
            }
        }
        ok
    }
}

async fn undo(d: &Deployment, undo: &Undo) -> Result<String> {
    match undo {
        Undo::Restart { who } => {
            let mut detail = Vec::new();
            for w in who {
                let pid = w.process(d)?.start(&[]).with_context(|| format!("restarting {w}"))?;
                detail.push(format!("{w} is pid {pid}"));
            }
            Ok(format!(" ({})", detail.join(", ")))
        }
        Undo::Resume { who } => {
            for w in who {
                let p = w.process(d)?;
                if p.pid().is_some() {
                    p.signal(Signal::Cont).with_context(|| format!("resuming {w}"))?;
                }
            }
            Ok(String::new())
        }
        Undo::Heal { who } => {
            for w in who {
                net::heal(w.process(d)?).with_context(|| format!("healing {w}"))?;
            }
            Ok(String::new())
        }
        Undo::Unskew { who } => {
            let p = who.process(d)?;
            if p.pid().is_some() {
                p.kill()?;
            }
            let pid = p.start(&[])?;
            Ok(format!(" ({who} is pid {pid} with the real clock)"))
        }
        Undo::AwsOff { addr } => {
            proxy::remote_set(addr, &FaultConfig::default()).await?;
            Ok(String::new())
        }
    }
}

/// `+1h`, `-30s`, `90s` → signed seconds.
pub fn parse_offset(text: &str) -> Result<i64> {
    let t = text.trim();
    let (sign, rest) = match t.strip_prefix('-') {
        Some(r) => (-1, r),
        None => (1, t.strip_prefix('+').unwrap_or(t)),
    };
    let d = crate::duration::parse(rest).map_err(|e| anyhow!("offset: {e}"))?;
    if d.as_secs() == 0 || d.subsec_millis() != 0 {
        bail!("offset {t:?}: a whole, non-zero number of seconds (e.g. +1h, -30s)");
    }
    Ok(sign * d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_offsets() {
        assert_eq!("leader".parse::<Target>(), Ok(Target::Leader));
        assert_eq!("3".parse::<Target>(), Ok(Target::Replica(3)));
        assert!("boss".parse::<Target>().unwrap_err().contains("boss"));
        assert_eq!(parse_offset("+1h").unwrap(), 3600);
        assert_eq!(parse_offset("-30s").unwrap(), -30);
        assert!(parse_offset("+0s").is_err());
    }

    #[test]
    fn plan_steps_read_as_written() {
        let yaml = "- kind: kill\n  target: leader\n- kind: pause\n  target: 2\n  duration: 3s\n- kind: partition\n  topology: ring\n  duration: 1m\n";
        let specs: Vec<FaultSpec> = serde_yaml::from_str(yaml).unwrap();
        assert!(
            matches!(&specs[0], FaultSpec::Kill { target: Target::Leader, restart_after } if *restart_after == Dur::secs(5))
        );
        assert!(matches!(&specs[1], FaultSpec::Pause { target: Target::Replica(2), .. }));
        assert!(
            matches!(&specs[2], FaultSpec::Partition { topology: Topology::Ring, duration } if *duration == Dur::secs(60))
        );
        let err = serde_yaml::from_str::<Vec<FaultSpec>>("- kind: pause\n  target: 2\n  durtion: 3s\n").unwrap_err();
        assert!(err.to_string().contains("durtion"), "{err}");
    }
}
