//! A service job's rolling update: the job's container spec changes, and its tasks are replaced in
//! steps so that the service never has fewer than `desired - max_unavailable` available tasks (a
//! task is available when it is Started and, for a job behind load balancers, its targets report
//! healthy). Optionally canaries first, and a rollback by itself when new tasks keep failing.
//!
//! Everything here is replicated state: a job's spec version, which version each task runs (its
//! `jobVersion` context key), and the deployment record, so a new leader goes on from where its
//! predecessor was without adding or losing a task. The decisions are the lifecycle's
//! (`control-plane/src/jobs/deployment.rs`).

use serde::{Deserialize, Serialize};

use crate::job::{Container, MAX_TASKS_PER_JOB};
use crate::FieldViolation;

/// Deployments a job keeps (the active one and the last finished ones).
pub const MAX_DEPLOYMENTS_KEPT: usize = 10;
/// Steps a deployment keeps (the oldest go first).
pub const MAX_STEPS_KEPT: usize = 100;
/// The longest canary pause a strategy may set: 7 days.
pub const MAX_CANARY_PAUSE_SEC: u64 = 7 * 86_400;
/// The most failures a strategy may tolerate before it rolls back.
pub const MAX_ROLLBACK_AFTER_FAILURES: u32 = 1_000;

/// How a deployment replaces tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStrategy {
    /// Tasks below desired the service may have available during the update.
    pub max_unavailable: u32,
    /// Tasks above desired the update may run at once.
    pub max_surge: u32,
    /// New tasks started first, beside the old ones, before any old task goes; 0: no canary.
    pub canary: u32,
    /// After the canaries are available: how long to wait before going on by itself; 0: until
    /// promoted (`titus job deploy promote`).
    pub canary_pause_sec: u64,
    /// New tasks that may fail (crash, exit, get stuck or turn unhealthy) before the deployment
    /// rolls back to the previous spec by itself; 0: never.
    pub rollback_after_failures: u32,
}

impl Default for RolloutStrategy {
    fn default() -> Self {
        RolloutStrategy { max_unavailable: 1, max_surge: 1, canary: 0, canary_pause_sec: 0, rollback_after_failures: 3 }
    }
}

impl RolloutStrategy {
    /// Every violation, fields named from `strategy`.
    pub fn validate(&self) -> Result<(), Vec<FieldViolation>> {
        let mut v = Vec::new();
        if self.max_unavailable == 0 && self.max_surge == 0 {
            v.push(FieldViolation::new(
                "strategy.max_unavailable",
                "max_unavailable and max_surge cannot both be 0: no task could ever be replaced",
            ));
        }
        for (field, n) in [
            ("strategy.max_unavailable", self.max_unavailable),
            ("strategy.max_surge", self.max_surge),
            ("strategy.canary", self.canary),
        ] {
            if n > MAX_TASKS_PER_JOB {
                v.push(FieldViolation::new(field, format!("must be at most {MAX_TASKS_PER_JOB}")));
            }
        }
        if self.canary_pause_sec > MAX_CANARY_PAUSE_SEC {
            v.push(FieldViolation::new(
                "strategy.canary_pause_sec",
                format!("must be at most {MAX_CANARY_PAUSE_SEC} (7 days)"),
            ));
        }
        if self.rollback_after_failures > MAX_ROLLBACK_AFTER_FAILURES {
            v.push(FieldViolation::new(
                "strategy.rollback_after_failures",
                format!("must be at most {MAX_ROLLBACK_AFTER_FAILURES}"),
            ));
        }
        if v.is_empty() {
            Ok(())
        } else {
            Err(v)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeploymentState {
    /// Replacing tasks.
    Progressing,
    /// The canaries are available; waiting to be promoted (or for the canary pause to pass).
    Paused,
    /// Every task runs the new version.
    Succeeded,
    /// New tasks failed past the threshold, or a user rolled it back: the job went back to the
    /// previous spec (a deployment marked `rollback_of` this one brings the old tasks back).
    RolledBack,
    /// A newer update replaced it before it finished.
    Superseded,
    /// Its job was killed before it finished.
    Cancelled,
}

impl DeploymentState {
    pub fn is_active(self) -> bool {
        matches!(self, DeploymentState::Progressing | DeploymentState::Paused)
    }

    pub fn name(self) -> &'static str {
        match self {
            DeploymentState::Progressing => "Progressing",
            DeploymentState::Paused => "Paused",
            DeploymentState::Succeeded => "Succeeded",
            DeploymentState::RolledBack => "RolledBack",
            DeploymentState::Superseded => "Superseded",
            DeploymentState::Cancelled => "Cancelled",
        }
    }
}

/// One round in which a deployment replaced tasks, as it stood after the round's decisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentStep {
    pub at_ms: i64,
    /// New tasks created and old tasks killed in this step.
    pub created: u32,
    pub killed: u32,
    /// New-version tasks available, and old-version tasks live, when the step was decided.
    pub new_available: u32,
    pub old_live: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// The job's deployment number, from 1.
    pub id: u32,
    pub from_version: u32,
    pub to_version: u32,
    /// Image names (`name:tag` or `name@digest`) of both versions, for history.
    pub from_image: String,
    pub to_image: String,
    /// The container of `from_version` while the deployment is active: what the old tasks run,
    /// and what a rollback restores. Dropped when the deployment ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Container>,
    pub strategy: RolloutStrategy,
    pub state: DeploymentState,
    /// The deployment this one undoes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u32>,
    /// New-version tasks that failed so far.
    pub failures: u32,
    pub started_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<i64>,
    /// When the canaries were all available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_ready_ms: Option<i64>,
    pub promoted: bool,
    /// Why it ended as it did (a rollback's reason, who superseded it).
    pub message: String,
    pub steps: Vec<DeploymentStep>,
}

impl Deployment {
    /// Ends an active deployment: its previous container is no longer needed.
    pub fn end(&mut self, state: DeploymentState, message: String, at_ms: i64) {
        self.state = state;
        self.message = message;
        self.ended_ms = Some(at_ms);
        self.previous = None;
    }

    pub fn push_step(&mut self, step: DeploymentStep) {
        if self.steps.len() >= MAX_STEPS_KEPT {
            self.steps.remove(0);
        }
        self.steps.push(step);
    }
}

/// A job's spec version and its deployments (the newest last). Empty for a job never updated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The version of the job's current container spec (0: as created).
    pub version: u32,
    pub deployments: Vec<Deployment>,
}

impl Rollout {
    pub fn is_empty(&self) -> bool {
        self.version == 0 && self.deployments.is_empty()
    }

    pub fn active(&self) -> Option<&Deployment> {
        self.deployments.last().filter(|d| d.state.is_active())
    }

    pub fn active_mut(&mut self) -> Option<&mut Deployment> {
        self.deployments.last_mut().filter(|d| d.state.is_active())
    }

    /// The number the next update's version gets: above every version this job has had.
    pub fn next_version(&self) -> u32 {
        let highest = self.deployments.iter().map(|d| d.to_version.max(d.from_version)).max().unwrap_or(0);
        highest.max(self.version).saturating_add(1)
    }

    pub fn next_id(&self) -> u32 {
        self.deployments.last().map_or(1, |d| d.id.saturating_add(1))
    }

    /// Starts deployment `id` from the current version to `to_version`, `previous` the container
    /// the old tasks run; the job's spec takes `to_version`.
    pub fn start(
        &mut self,
        id: u32,
        to_version: u32,
        previous: Container,
        next: &Container,
        strategy: RolloutStrategy,
        at_ms: i64,
    ) {
        self.push(Deployment {
            id,
            from_version: self.version,
            to_version,
            from_image: image_ref(&previous),
            to_image: image_ref(next),
            previous: Some(previous),
            strategy,
            state: DeploymentState::Progressing,
            rollback_of: None,
            failures: 0,
            started_ms: at_ms,
            ended_ms: None,
            canary_ready_ms: None,
            promoted: false,
            message: String::new(),
            steps: Vec::new(),
        });
        self.version = to_version;
    }

    /// Adds a deployment, forgetting the oldest finished ones past [`MAX_DEPLOYMENTS_KEPT`].
    pub fn push(&mut self, d: Deployment) {
        self.deployments.push(d);
        while self.deployments.len() > MAX_DEPLOYMENTS_KEPT {
            self.deployments.remove(0);
        }
    }
}

/// `name:tag`, `name@digest` or `name`.
pub fn image_ref(c: &Container) -> String {
    match (&c.image.tag, &c.image.digest) {
        (_, Some(d)) if !d.is_empty() => format!("{}@{d}", c.image.name),
        (Some(t), _) if !t.is_empty() => format!("{}:{t}", c.image.name),
        _ => c.image.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_are_bounded_and_can_make_progress() {
        assert!(RolloutStrategy::default().validate().is_ok());
        let stuck = RolloutStrategy { max_unavailable: 0, max_surge: 0, ..Default::default() };
        assert_eq!(stuck.validate().unwrap_err()[0].field, "strategy.max_unavailable");
        let big = RolloutStrategy { canary: u32::MAX, canary_pause_sec: u64::MAX, ..Default::default() };
        let fields: Vec<String> = big.validate().unwrap_err().into_iter().map(|v| v.field).collect();
        assert_eq!(fields, ["strategy.canary", "strategy.canary_pause_sec"]);
    }

    #[test]
    fn versions_only_grow_and_history_is_bounded() {
        let mut r = Rollout::default();
        assert_eq!((r.next_version(), r.next_id()), (1, 1));
        let d = |id, from, to| Deployment {
            id,
            from_version: from,
            to_version: to,
            from_image: String::new(),
            to_image: String::new(),
            previous: None,
            strategy: RolloutStrategy::default(),
            state: DeploymentState::RolledBack,
            rollback_of: None,
            failures: 0,
            started_ms: 0,
            ended_ms: None,
            canary_ready_ms: None,
            promoted: false,
            message: String::new(),
            steps: Vec::new(),
        };
        r.push(d(1, 0, 1));
        // A rollback goes back to version 0; the next update is still version 2.
        r.push(d(2, 1, 0));
        r.version = 0;
        assert_eq!((r.next_version(), r.next_id()), (2, 3));
        for i in 3..30 {
            r.push(d(i, 0, 0));
        }
        assert_eq!(r.deployments.len(), MAX_DEPLOYMENTS_KEPT);
        assert_eq!(r.next_id(), 30);
    }
}
