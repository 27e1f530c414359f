//! Titus's task: its states, the transitions between them, and its finished reasons.
//!
//! Accepted → Launched → StartInitiated → Started → KillInitiated → Finished. A state may be
//! skipped forward (an agent may report Started straight after Launched), and any live state may
//! go to KillInitiated or Finished; nothing leaves Finished and nothing goes backwards.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ResourceDimension;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TaskState {
    Accepted,
    Launched,
    StartInitiated,
    Started,
    KillInitiated,
    Finished,
}

impl TaskState {
    pub const ALL: [TaskState; 6] = [
        TaskState::Accepted,
        TaskState::Launched,
        TaskState::StartInitiated,
        TaskState::Started,
        TaskState::KillInitiated,
        TaskState::Finished,
    ];

    /// Whether a task may move from `self` to `to`.
    pub fn can_move_to(self, to: TaskState) -> bool {
        use TaskState::*;
        match (self, to) {
            (Finished, _) => false,
            (KillInitiated, Finished) => true,
            (KillInitiated, _) => false,
            (_, KillInitiated) | (_, Finished) => true,
            (from, to) => to > from,
        }
    }

    pub fn is_live(self) -> bool {
        self != TaskState::Finished
    }

    pub fn name(self) -> &'static str {
        match self {
            TaskState::Accepted => "Accepted",
            TaskState::Launched => "Launched",
            TaskState::StartInitiated => "StartInitiated",
            TaskState::Started => "Started",
            TaskState::KillInitiated => "KillInitiated",
            TaskState::Finished => "Finished",
        }
    }

    /// Parses a state name as users write it (`Started`, `started`, `TASK_STARTED`).
    pub fn parse(s: &str) -> Option<TaskState> {
        let norm: String =
            s.trim().trim_start_matches("TASK_").chars().filter(|c| *c != '_').collect::<String>().to_ascii_lowercase();
        TaskState::ALL.into_iter().find(|st| st.name().to_ascii_lowercase() == norm)
    }
}

/// Titus's reasons for a task being Finished (and for a kill).
pub mod reason {
    pub const NORMAL: &str = "normal";
    pub const FAILED: &str = "failed";
    pub const KILLED: &str = "killed";
    pub const EVICTED: &str = "evicted";
    pub const SCALED_DOWN: &str = "scaledDown";
    pub const STUCK_IN_STATE: &str = "stuckInState";
    pub const STUCK_IN_KILLING_STATE: &str = "stuckInKillingState";
    pub const RUNTIME_LIMIT_EXCEEDED: &str = "runtimeLimitExceeded";
    pub const LOST: &str = "lost";
    pub const INVALID_REQUEST: &str = "invalidRequest";
    pub const CRASHED: &str = "crashed";
    pub const TRANSIENT_SYSTEM_ERROR: &str = "transientSystemError";
    pub const LOCAL_SYSTEM_ERROR: &str = "localSystemError";
    pub const UNKNOWN_SYSTEM_ERROR: &str = "unknownSystemError";
    /// Its container's health check failed past the job's `replace_after_sec`: replaced.
    pub const UNHEALTHY: &str = "unhealthy";

    pub const ALL: [&str; 15] = [
        NORMAL,
        FAILED,
        KILLED,
        EVICTED,
        SCALED_DOWN,
        STUCK_IN_STATE,
        STUCK_IN_KILLING_STATE,
        RUNTIME_LIMIT_EXCEEDED,
        LOST,
        INVALID_REQUEST,
        CRASHED,
        TRANSIENT_SYSTEM_ERROR,
        LOCAL_SYSTEM_ERROR,
        UNKNOWN_SYSTEM_ERROR,
        UNHEALTHY,
    ];

    /// The reasons an agent may give for a task it ran: what happened to its container. The others
    /// are the control plane's findings (lost, evicted, scaled down, timeouts), and some do not
    /// count against retries, so an agent must not be able to claim them.
    pub const AGENT_MAY_REPORT: [&str; 7] =
        [NORMAL, FAILED, KILLED, CRASHED, INVALID_REQUEST, TRANSIENT_SYSTEM_ERROR, LOCAL_SYSTEM_ERROR];

    /// A failure of the platform, not of the task (Titus's `skipSystemFailures` leaves them out).
    pub fn is_system_error(reason: &str) -> bool {
        matches!(reason, TRANSIENT_SYSTEM_ERROR | LOCAL_SYSTEM_ERROR | UNKNOWN_SYSTEM_ERROR)
    }

    /// System errors and evictions are not the task's fault: they do not count against retries.
    pub fn counts_against_retries(reason: &str) -> bool {
        !matches!(reason, EVICTED | LOST | TRANSIENT_SYSTEM_ERROR | LOCAL_SYSTEM_ERROR | UNKNOWN_SYSTEM_ERROR)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub state: TaskState,
    pub reason_code: String,
    pub reason_message: String,
    pub timestamp_ms: i64,
}

/// Context keys Titus shows for a task.
pub mod context {
    pub const AGENT: &str = "agent";
    pub const HOST: &str = "host";
    pub const ZONE: &str = "zone";
    pub const INSTANCE_ID: &str = "instanceId";
    pub const CONTAINER_IP: &str = "containerIp";
    pub const TASK_INDEX: &str = "taskIndex";
    pub const RESUBMIT_OF: &str = "resubmitOf";
    pub const ORIGINAL_ID: &str = "originalId";
    /// The container's exit code, from its agent.
    pub const EXIT_CODE: &str = "exitCode";
    /// How many quick crashes in a row came before this task in its lineage (a service task's
    /// crash-loop back-off); absent: none.
    pub const CRASH_LOOP_COUNT: &str = "crashLoopCount";
    /// The version of its job's container spec the task runs (see `deployment`); absent: 0.
    pub const JOB_VERSION: &str = "jobVersion";
    /// The keys an agent may set in a task's context (the others are the control plane's: an
    /// agent that rewrote `agent` or `instanceId` could hold resources forever or mislead capacity).
    pub const AGENT_MAY_SET: [&str; 3] = [CONTAINER_IP, EXIT_CODE, HEALTH];
    /// What its container's health check last said: `starting`, `healthy` or `unhealthy` (see
    /// [`HEALTH_STATES`]); absent: the job has no health check, or no answer yet.
    pub const HEALTH: &str = "health";
    /// When `health` last changed (ms since the epoch, the leader's clock); set by the control plane.
    pub const HEALTH_SINCE: &str = "healthSince";
    pub const HEALTH_STATES: [&str; 3] = ["starting", "healthy", "unhealthy"];
    /// The job a task was moved from (MoveTask); set by the control plane.
    pub const MOVED_FROM_JOB: &str = "movedFromJob";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub job_id: String,
    /// Position in the job: batch tasks keep their index across retries; service tasks get the
    /// lowest free one.
    pub index: u32,
    pub status: TaskStatus,
    /// Earlier statuses, oldest first.
    pub status_history: Vec<TaskStatus>,
    pub context: BTreeMap<String, String>,
    /// The first task of this index's chain of retries.
    pub original_id: String,
    pub resubmit_of: Option<String>,
    /// Replacements of this index so far.
    pub resubmit_number: u32,
    /// Of those, replacements after system errors or evictions (not counted against retries).
    pub system_resubmit_number: u32,
    /// What it holds on its agent, recorded when it is placed: the resources of its job's spec at
    /// the task's version then, which a rolling update may change for the tasks after it. `None`:
    /// not placed, or placed by a release that did not record it (such a task holds what
    /// [`crate::job::Job::resources_of`] says for its version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceDimension>,
    /// The user's own labels on the task (Titus's task attributes), as a job's attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

impl Task {
    pub fn state(&self) -> TaskState {
        self.status.state
    }

    /// When the task entered `state`, if it ever did.
    pub fn entered(&self, state: TaskState) -> Option<i64> {
        if self.status.state == state {
            return Some(self.status.timestamp_ms);
        }
        self.status_history.iter().rev().find(|s| s.state == state).map(|s| s.timestamp_ms)
    }

    /// Moves to `status` when the transition is legal; returns whether it moved.
    pub fn transition(&mut self, status: TaskStatus) -> bool {
        if !self.status.state.can_move_to(status.state) {
            return false;
        }
        let previous = std::mem::replace(&mut self.status, status);
        self.status_history.push(previous);
        true
    }

    /// Retries used against the job's retry limit.
    pub fn counted_retries(&self) -> u32 {
        self.resubmit_number.saturating_sub(self.system_resubmit_number)
    }

    /// What its health check last said (`healthy`, ...), if anything.
    pub fn health(&self) -> Option<&str> {
        self.context.get(context::HEALTH).map(String::as_str)
    }

    /// What it holds on its agent once placed (`job`: its job, if still in the state): what it was
    /// placed with; for a task placed before tasks recorded it, what its version needs; nothing
    /// when neither is known. The one rule every count of an agent's use follows.
    pub fn held(&self, job: Option<&crate::job::Job>) -> ResourceDimension {
        match (&self.resources, job) {
            (Some(r), _) => r.clone(),
            (None, Some(j)) => j.resources_of(self.job_version()),
            (None, None) => ResourceDimension::default(),
        }
    }

    /// The version of its job's spec the task runs.
    pub fn job_version(&self) -> u32 {
        self.context.get(context::JOB_VERSION).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn task() -> Task {
        Task {
            id: "t".into(),
            job_id: "j".into(),
            index: 0,
            status: TaskStatus {
                state: TaskState::Accepted,
                reason_code: String::new(),
                reason_message: String::new(),
                timestamp_ms: 0,
            },
            status_history: vec![],
            context: BTreeMap::new(),
            original_id: "t".into(),
            resubmit_of: None,
            resubmit_number: 0,
            system_resubmit_number: 0,
            resources: None,
            attributes: Default::default(),
        }
    }

    #[test]
    fn titus_lifecycle_is_legal_and_finished_is_final() {
        use TaskState::*;
        let mut t = task();
        for (i, s) in [Launched, StartInitiated, Started, KillInitiated, Finished].into_iter().enumerate() {
            assert!(t.transition(TaskStatus {
                state: s,
                reason_code: String::new(),
                reason_message: String::new(),
                timestamp_ms: i as i64 + 1
            }));
        }
        assert_eq!(t.status_history.len(), 5);
        assert_eq!(t.entered(Started), Some(3));
        for s in TaskState::ALL {
            assert!(!Finished.can_move_to(s));
        }
        assert!(!Started.can_move_to(Launched));
        assert!(!KillInitiated.can_move_to(Started));
        assert!(Accepted.can_move_to(Finished));
        assert_eq!(TaskState::parse("TASK_START_INITIATED"), Some(StartInitiated));
        assert_eq!(TaskState::parse("started"), Some(Started));
        assert_eq!(TaskState::parse("bogus"), None);
    }

    proptest! {
        /// Whatever sequence of reports arrives, the task only ever moves forward, never leaves
        /// Finished, and its history records exactly the accepted moves.
        #[test]
        fn no_illegal_transition_is_ever_accepted(moves in proptest::collection::vec(0usize..6, 0..40)) {
            let mut t = task();
            let mut accepted = 0;
            for (i, m) in moves.into_iter().enumerate() {
                let to = TaskState::ALL[m];
                let from = t.state();
                let moved = t.transition(TaskStatus { state: to, reason_code: String::new(), reason_message: String::new(), timestamp_ms: i as i64 });
                prop_assert_eq!(moved, from.can_move_to(to));
                if moved {
                    accepted += 1;
                    prop_assert!(from != TaskState::Finished);
                    prop_assert!(to >= from || to == TaskState::KillInitiated || to == TaskState::Finished);
                    prop_assert!(!(from == TaskState::KillInitiated && to != TaskState::Finished));
                } else {
                    prop_assert_eq!(t.state(), from);
                }
            }
            prop_assert_eq!(t.status_history.len(), accepted);
        }
    }
}
