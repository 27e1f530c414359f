//! Plan files: a schedule of faults, run in order, each undone at the end of its duration.
//!
//! ```yaml
//! name: leader faults
//! seed: 7                  # optional: the same seed picks the same random targets
//! allow_majority: false    # blast radius: never more than a minority of replicas out at once
//! steps:
//!   - at: 0s
//!     kind: kill
//!     target: leader
//!     restart_after: 5s
//!   - at: 10s
//!     kind: partition
//!     topology: isolate-leader
//!     duration: 15s
//! ```

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::duration::Dur;
use crate::experiment::SteadyState;
use crate::faults::{Chaos, Event, FaultSpec};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub allow_majority: bool,
    #[serde(default)]
    pub allow_docker_restart: bool,
    pub steps: Vec<Step>,
    /// For `titus-chaos experiment`: what must hold before and after the faults.
    #[serde(default)]
    pub steady_state: Option<SteadyState>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    /// Offset from the start of the run.
    pub at: Dur,
    #[serde(flatten)]
    pub fault: FaultSpec,
}

impl Plan {
    pub fn load(path: &std::path::Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading plan {}", path.display()))?;
        let plan: Plan = serde_yaml::from_str(&text).with_context(|| format!("plan {}", path.display()))?;
        if plan.steps.is_empty() {
            bail!("plan {}: steps: at least one step is needed", path.display());
        }
        Ok(plan)
    }

    /// When the last fault ends (its start plus its duration).
    pub fn length(&self) -> Duration {
        self.steps.iter().map(|s| s.at.0 + fault_duration(&s.fault)).max().unwrap_or_default()
    }
}

pub fn fault_duration(f: &FaultSpec) -> Duration {
    match f {
        FaultSpec::Kill { restart_after, .. } | FaultSpec::AgentKill { restart_after, .. } => restart_after.0,
        FaultSpec::Pause { duration, .. }
        | FaultSpec::Partition { duration, .. }
        | FaultSpec::Skew { duration, .. }
        | FaultSpec::AgentIsolate { duration, .. }
        | FaultSpec::Aws { duration, .. } => duration.0,
        FaultSpec::ContainerKill { .. } | FaultSpec::DockerRestart {} => Duration::ZERO,
    }
}

/// What a run did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub plan: String,
    pub interrupted: bool,
    pub failed_steps: usize,
    pub failed_undos: usize,
    pub events: Vec<Event>,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.failed_steps == 0 && self.failed_undos == 0
    }

    pub fn print(&self) {
        println!(
            "chaos run {:?}: {}",
            self.plan,
            if self.interrupted { "interrupted, faults undone" } else { "complete" }
        );
        for e in &self.events {
            println!("  +{:>7.1}s  {} {}", e.at_ms as f64 / 1000.0, if e.ok { " " } else { "✗" }, e.what);
        }
        println!("{} step(s) failed, {} undo(s) failed", self.failed_steps, self.failed_undos);
    }
}

/// Runs the steps on schedule; every fault is undone at the end of its duration, or at once when
/// `stop` completes (Ctrl-C). Returns when every step has run and every fault is undone.
pub async fn run(chaos: &mut Chaos, plan: &Plan, stop: impl Future<Output = ()>) -> Summary {
    chaos.allow_majority = plan.allow_majority;
    chaos.allow_docker_restart |= plan.allow_docker_restart;
    let start = Instant::now();
    let mut steps: Vec<&Step> = plan.steps.iter().collect();
    steps.sort_by_key(|s| s.at);
    let mut next_step = 0;
    let mut pending: Vec<(Instant, u64)> = Vec::new();
    let (mut failed_steps, mut failed_undos, mut interrupted) = (0, 0, false);
    tokio::pin!(stop);
    loop {
        let step_due = steps.get(next_step).map(|s| start + s.at.0);
        let undo_due = pending.iter().map(|(t, _)| *t).min();
        let Some(due) = [step_due, undo_due].into_iter().flatten().min() else { break };
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = &mut stop => {
                interrupted = true;
                chaos.log(true, "interrupted: undoing every active fault".into());
                break;
            }
        }
        let now = Instant::now();
        // Undos first: a fault that ends when the next begins is gone before it starts.
        pending.sort_by_key(|(t, _)| *t);
        while let Some(&(t, id)) = pending.first() {
            if t > now {
                break;
            }
            pending.remove(0);
            if !chaos.undo(id).await {
                failed_undos += 1;
            }
        }
        while let Some(step) = steps.get(next_step) {
            if start + step.at.0 > now {
                break;
            }
            next_step += 1;
            match chaos.apply(&step.fault).await {
                Ok(Some((id, duration))) => pending.push((Instant::now() + duration, id)),
                Ok(None) => {}
                Err(e) => {
                    failed_steps += 1;
                    let text = format!("step at {}: {e:#}", step.at);
                    if !chaos.events.last().is_some_and(|ev| !ev.ok && ev.what.ends_with(&format!("{e:#}"))) {
                        chaos.log(false, text);
                    }
                }
            }
        }
    }
    for (_, id) in pending {
        if !chaos.undo(id).await {
            failed_undos += 1;
        }
    }
    Summary {
        plan: plan.name.clone(),
        interrupted,
        failed_steps,
        failed_undos,
        events: std::mem::take(&mut chaos.events),
    }
}
