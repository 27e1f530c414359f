//! The last scheduling round's outcome, kept on the leader for the SchedulerService API and the
//! web view: data only, so the agent hub that holds it and the API that reads it need nothing else
//! of scheduling.

use std::collections::HashMap;
use std::sync::Mutex;

/// Why a pending task waits, as of the last round.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
    pub round_ms: i64,
}

/// The last round's outcome, kept on the leader for the SchedulerService API and the web view.
#[derive(Default)]
pub struct Results {
    last: Mutex<LastRound>,
    /// Where the running scheduling duty takes dry runs; None when it is not running.
    planner: Mutex<Option<tokio::sync::mpsc::Sender<PlanAsk>>>,
}

/// A dry run: `tasks` placed after the pending ones on the duty's current view, nothing committed.
pub struct PlanAsk {
    pub tasks: Vec<titus_scheduler::Task>,
    pub reply: tokio::sync::oneshot::Sender<PlanAnswer>,
}

/// What a dry run came to, for the tasks asked about.
#[derive(Debug, Default)]
pub struct PlanAnswer {
    /// (task id, agent id).
    pub placements: Vec<(String, String)>,
    /// (task id, why) of those not placed.
    pub unplaced: Vec<(String, Waiting)>,
    /// Pending tasks placed before them.
    pub pending_before: usize,
}

#[derive(Default)]
struct LastRound {
    round_ms: i64,
    waiting: HashMap<String, Waiting>,
    not_considered: usize,
}

impl Results {
    /// Why `task_id` was not placed in the last round, if it was considered and not placed.
    pub fn why(&self, task_id: &str) -> Option<Waiting> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).waiting.get(task_id).cloned()
    }

    /// (time of the last round, pending tasks it left for later rounds).
    pub fn round(&self) -> (i64, usize) {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        (last.round_ms, last.not_considered)
    }

    pub(super) fn record(&self, round_ms: i64, waiting: HashMap<String, Waiting>, not_considered: usize) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = LastRound { round_ms, waiting, not_considered };
    }

    /// Forgets everything (when leadership ends: another replica's rounds decide now).
    pub fn clear(&self) {
        self.record(0, HashMap::new(), 0);
    }

    pub(super) fn set_planner(&self, planner: Option<tokio::sync::mpsc::Sender<PlanAsk>>) {
        *self.planner.lock().unwrap_or_else(|p| p.into_inner()) = planner;
    }

    /// Asks the running scheduling duty for a dry run of `tasks`; None when no duty runs here (not
    /// the leader) or it did not answer within `within`.
    pub async fn dry_run(&self, tasks: Vec<titus_scheduler::Task>, within: std::time::Duration) -> Option<PlanAnswer> {
        let planner = self.planner.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        planner.try_send(PlanAsk { tasks, reply }).ok()?;
        tokio::time::timeout(within, answer).await.ok()?.ok()
    }
}
