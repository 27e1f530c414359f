//! Rolling updates against the real apply code and lifecycle on the in-memory store: the service
//! never drops below its floor, every deployment ends, failures roll back, canaries wait.

use proptest::prelude::*;

use crate::apply::apply;
use crate::command::{Command, CommandResponse, DeploymentChange};
use crate::jobs::lifecycle::{plan, LifecycleConfig};
use crate::model::deployment::{DeploymentState, RolloutStrategy};
use crate::model::job::fixtures::{batch_descriptor, service_descriptor};
use crate::model::job::{Container, DisruptionBudget, Job, JobState, JobStatus};
use crate::model::task::{reason, Task, TaskState, TaskStatus};
use crate::state::{MemoryStore, Overlay, StateRead};

const JOB: &str = "job-1";

struct Sim {
    store: MemoryStore,
    now: i64,
    next_id: u64,
}

impl Sim {
    fn new() -> Sim {
        Sim { store: MemoryStore::default(), now: 1_000_000, next_id: 0 }
    }

    fn run(&mut self, command: Command) -> CommandResponse {
        let mut o = Overlay::new(&self.store);
        let r = apply(&mut o, command).unwrap().rule().expect("a job command");
        let changes = o.into_changes();
        self.store.commit(changes);
        r
    }

    /// A service job of `desired` tasks, all Started.
    fn service(desired: u32) -> Sim {
        Sim::service_with(desired, DisruptionBudget::default())
    }

    fn service_with(desired: u32, budget: DisruptionBudget) -> Sim {
        let mut sim = Sim::new();
        let mut descriptor = service_descriptor(0, desired, 100);
        descriptor.disruption_budget = budget;
        let job = Job {
            id: JOB.into(),
            descriptor,
            status: JobStatus {
                state: JobState::Accepted,
                reason_code: String::new(),
                reason_message: String::new(),
                timestamp_ms: sim.now,
            },
            status_history: vec![],
            rollout: Default::default(),
            evictions_ms: Vec::new(),
        };
        sim.run(Command::CreateJob { job, idempotency_token: None, token_expires_ms: 0 });
        sim.round();
        for t in sim.serving() {
            sim.report(&t.id, TaskState::Started, "");
        }
        sim
    }

    /// One lifecycle round: plans and applies.
    fn round(&mut self) -> Vec<Command> {
        let next = &mut self.next_id;
        let mut ids = || {
            *next += 1;
            format!("task-{next}")
        };
        let commands = plan(&self.store, self.now, &LifecycleConfig::default(), &mut ids).unwrap();
        for c in &commands {
            self.run(c.clone());
        }
        commands
    }

    fn job(&self) -> Job {
        self.store.job(JOB).unwrap().expect("the job")
    }

    /// Live tasks not being killed.
    fn serving(&self) -> Vec<Task> {
        let tasks = self.store.tasks_of_job(JOB).unwrap();
        tasks.into_iter().filter(|t| t.state().is_live() && t.state() != TaskState::KillInitiated).collect()
    }

    fn available(&self) -> usize {
        self.serving().iter().filter(|t| t.state() == TaskState::Started).count()
    }

    fn report(&mut self, task_id: &str, state: TaskState, reason_code: &str) {
        self.run(Command::UpdateTaskStatus {
            task_id: task_id.into(),
            status: TaskStatus {
                state,
                reason_code: reason_code.into(),
                reason_message: String::new(),
                timestamp_ms: self.now,
            },
            context: Default::default(),
            expected_state: None,
        });
    }

    fn update(&mut self, image_tag: &str, strategy: RolloutStrategy) -> CommandResponse {
        let mut container = self.job().descriptor.container;
        container.image.tag = Some(image_tag.into());
        self.run(Command::UpdateJobSpec { job_id: JOB.into(), container, strategy, timestamp_ms: self.now })
    }

    /// The agents' side: `start` of the Accepted tasks start, every kill is confirmed.
    fn world(&mut self, start: usize, fail: bool) {
        let tasks = self.store.tasks_of_job(JOB).unwrap();
        for t in tasks.iter().filter(|t| t.state() == TaskState::KillInitiated) {
            self.report(&t.id, TaskState::Finished, reason::KILLED);
        }
        for t in tasks.iter().filter(|t| t.state() == TaskState::Accepted).take(start) {
            if fail && t.job_version() == self.job().rollout.version {
                self.report(&t.id, TaskState::Finished, reason::FAILED);
            } else {
                self.report(&t.id, TaskState::Started, "");
            }
        }
        self.now += 1_000;
    }
}

fn strategy() -> impl Strategy<Value = RolloutStrategy> {
    (0u32..4, 0u32..4)
        .prop_filter("one of them must let progress", |(u, s)| u + s > 0)
        .prop_map(|(max_unavailable, max_surge)| RolloutStrategy { max_unavailable, max_surge, ..Default::default() })
}

/// None, or an availability limit (with a surge, or no task could ever be replaced under it).
fn budget_for(strategy: &RolloutStrategy, pct: f64) -> DisruptionBudget {
    let pct = if strategy.max_surge == 0 { 0.0 } else { pct };
    DisruptionBudget { availability_percentage_limit: pct, ..Default::default() }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever the strategy and however slowly new tasks start, a rolling update never leaves
    /// fewer than desired - max_unavailable tasks available, never runs more than desired +
    /// max_surge, and ends with exactly desired tasks, all of the new version, all available.
    #[test]
    fn a_rolling_update_keeps_its_floor_and_ends_on_the_new_version(
        desired in 1u32..8,
        strategy in strategy(),
        pct in prop_oneof![Just(0.0), Just(50.0), Just(80.0)],
        starts in proptest::collection::vec(1usize..3, 1..200),
    ) {
        let budget = budget_for(&strategy, pct);
        let mut sim = Sim::service_with(desired, budget.clone());
        prop_assert_eq!(sim.available(), desired as usize);
        // The strategy's floor, or the budget's when higher.
        let kept = (f64::from(desired) * budget.availability_percentage_limit / 100.0).ceil() as usize;
        let floor = (desired.saturating_sub(strategy.max_unavailable) as usize).max(kept);
        let ceiling = (desired + strategy.max_surge) as usize;
        prop_assert_eq!(sim.update("v2", strategy), CommandResponse::Deployment(1));
        let mut rounds = 0;
        for start in starts.iter().cycle() {
            sim.round();
            prop_assert!(sim.available() >= floor, "available {} below the floor {floor}", sim.available());
            prop_assert!(sim.serving().len() <= ceiling, "{} live over the ceiling {ceiling}", sim.serving().len());
            if sim.job().rollout.active().is_none() {
                break;
            }
            sim.world(*start, false);
            rounds += 1;
            prop_assert!(rounds < 500, "the deployment did not end");
        }
        let job = sim.job();
        let d = job.rollout.deployments.last().unwrap();
        prop_assert_eq!(d.state, DeploymentState::Succeeded);
        prop_assert!(d.previous.is_none(), "an ended deployment drops the old container");
        let serving = sim.serving();
        prop_assert_eq!(serving.len(), desired as usize);
        prop_assert!(serving.iter().all(|t| t.job_version() == 1 && t.state() == TaskState::Started));
    }
}

#[test]
fn new_tasks_that_keep_failing_roll_the_job_back() {
    let mut sim = Sim::service(4);
    let before = sim.job().descriptor.container;
    sim.update("broken", RolloutStrategy { rollback_after_failures: 3, ..Default::default() });
    for _ in 0..100 {
        sim.round();
        if sim.job().rollout.deployments.len() == 2 {
            break;
        }
        sim.world(2, true);
        sim.now += 600_000; // past any crash-loop back-off
        assert!(sim.available() >= 3, "the floor holds while new tasks fail");
    }
    let job = sim.job();
    let failed = &job.rollout.deployments[0];
    assert_eq!(failed.state, DeploymentState::RolledBack);
    assert!(failed.message.contains("3 tasks of version 1"), "{}", failed.message);
    assert_eq!(job.descriptor.container, before, "the job is back on its old container");
    assert_eq!(job.rollout.version, 0);
    // The rollback replaces the failed version's tasks with the old spec, then ends.
    for _ in 0..50 {
        sim.round();
        if sim.job().rollout.active().is_none() {
            break;
        }
        sim.world(4, false);
    }
    let job = sim.job();
    let undo = job.rollout.deployments.last().unwrap();
    assert_eq!((undo.rollback_of, undo.state), (Some(1), DeploymentState::Succeeded));
    assert!(sim.serving().iter().all(|t| t.job_version() == 0), "every task runs version 0");
    assert_eq!(sim.serving().len(), 4);
    // The next update takes a version above every one used.
    assert_eq!(sim.update("v3", RolloutStrategy::default()), CommandResponse::Deployment(3));
    assert_eq!(sim.job().rollout.version, 2);
}

#[test]
fn canaries_run_beside_the_old_tasks_until_promoted() {
    let mut sim = Sim::service(3);
    sim.update("v2", RolloutStrategy { canary: 1, ..Default::default() });
    for _ in 0..5 {
        sim.round();
        sim.world(3, false);
    }
    let job = sim.job();
    let d = job.rollout.active().expect("still active");
    assert_eq!(d.state, DeploymentState::Paused);
    assert!(d.canary_ready_ms.is_some());
    let versions: Vec<u32> = sim.serving().iter().map(Task::job_version).collect();
    assert_eq!(versions.iter().filter(|v| **v == 1).count(), 1, "one canary: {versions:?}");
    assert_eq!(versions.iter().filter(|v| **v == 0).count(), 3, "every old task kept: {versions:?}");
    // The old tasks still get the old container, the canary the new.
    let old = sim.serving().into_iter().find(|t| t.job_version() == 0).unwrap();
    assert_eq!(job.container_of(old.job_version()).image.tag.as_deref(), Some("latest"));
    assert_eq!(job.container_of(1).image.tag.as_deref(), Some("v2"));
    let id = d.id;
    sim.run(Command::AdvanceDeployment {
        job_id: JOB.into(),
        deployment_id: id,
        change: DeploymentChange::Promote,
        timestamp_ms: sim.now,
    });
    for _ in 0..30 {
        sim.round();
        if sim.job().rollout.active().is_none() {
            break;
        }
        sim.world(3, false);
    }
    assert_eq!(sim.job().rollout.deployments[0].state, DeploymentState::Succeeded);
    assert!(sim.serving().iter().all(|t| t.job_version() == 1));
}

#[test]
fn a_canary_pause_promotes_by_itself() {
    let mut sim = Sim::service(2);
    sim.update("v2", RolloutStrategy { canary: 1, canary_pause_sec: 30, ..Default::default() });
    for _ in 0..4 {
        sim.round();
        sim.world(2, false);
    }
    assert_eq!(sim.job().rollout.active().unwrap().state, DeploymentState::Paused);
    sim.now += 31_000;
    sim.round();
    assert!(sim.job().rollout.active().unwrap().promoted);
}

#[test]
fn updates_are_refused_where_they_cannot_apply_and_a_stale_advance_does_nothing() {
    let mut sim = Sim::service(2);
    let same = sim.job().descriptor.container;
    let r = sim.run(Command::UpdateJobSpec {
        job_id: JOB.into(),
        container: same,
        strategy: RolloutStrategy::default(),
        timestamp_ms: 0,
    });
    assert_eq!(r, CommandResponse::Deployment(0), "an unchanged container starts nothing");
    assert!(sim.job().rollout.is_empty());
    // A newer update supersedes the active one; an advance of the old one is refused.
    assert_eq!(sim.update("v2", RolloutStrategy::default()), CommandResponse::Deployment(1));
    assert_eq!(sim.update("v3", RolloutStrategy::default()), CommandResponse::Deployment(2));
    let job = sim.job();
    assert_eq!(job.rollout.deployments[0].state, DeploymentState::Superseded);
    assert_eq!((job.rollout.version, job.rollout.deployments[1].from_version), (2, 1));
    let r = sim.run(Command::AdvanceDeployment {
        job_id: JOB.into(),
        deployment_id: 1,
        change: DeploymentChange::Succeed,
        timestamp_ms: 0,
    });
    assert!(matches!(&r, CommandResponse::Rejected(r) if r.field == "deployment_id"), "{r:?}");
    // A batch job has no rolling update.
    let mut batch = Sim::new();
    let job = Job {
        id: "b".into(),
        descriptor: batch_descriptor(1),
        rollout: Default::default(),
        evictions_ms: Vec::new(),
        ..sim.job()
    };
    batch.run(Command::CreateJob { job, idempotency_token: None, token_expires_ms: 0 });
    let r = batch.run(Command::UpdateJobSpec {
        job_id: "b".into(),
        container: Container::default(),
        strategy: RolloutStrategy::default(),
        timestamp_ms: 0,
    });
    assert!(matches!(&r, CommandResponse::Rejected(r) if r.message.contains("batch job")), "{r:?}");
    // Killing the job ends its deployment.
    sim.run(Command::KillJob { job_id: JOB.into(), timestamp_ms: 0 });
    let job = sim.job();
    assert_eq!((job.rollout.active(), job.rollout.deployments[1].state), (None, DeploymentState::Cancelled));
}

/// The tasks of the job placed on `agent` (as a drain sees them), the others as they are.
fn on_agent(sim: &Sim, ids: &std::collections::BTreeSet<String>, agent: &str) -> Vec<Task> {
    let mut tasks = sim.store.tasks_of_job(JOB).unwrap();
    for t in tasks.iter_mut().filter(|t| ids.contains(&t.id)) {
        t.context.insert(crate::model::task::context::AGENT.into(), agent.into());
    }
    tasks
}

/// Drains the agent holding every first task of the job until none is left on it, checking after
/// each drain decision that `check` holds; the times of the evictions.
fn drain_all(sim: &mut Sim, check: &dyn Fn(&Sim)) -> Vec<i64> {
    use crate::jobs::lifecycle::drain_job;
    let first: std::collections::BTreeSet<String> = sim.serving().into_iter().map(|t| t.id).collect();
    let draining = crate::jobs::lifecycle::Draining::from([("old".to_string(), 0)]);
    let mut evictions = Vec::new();
    for _ in 0..1_000 {
        let job = sim.job();
        for c in drain_job(&job, &on_agent(sim, &first, "old"), &draining, sim.now) {
            evictions.push(sim.now);
            sim.run(c);
        }
        check(sim);
        if sim.serving().iter().all(|t| !first.contains(&t.id)) {
            return evictions;
        }
        sim.round();
        sim.world(1, false);
    }
    panic!("the drain did not end");
}

#[test]
fn a_drain_under_an_availability_budget_never_takes_the_job_below_it() {
    // 95% of 20: 19 stay available, so one task moves at a time.
    let budget = DisruptionBudget { availability_percentage_limit: 95.0, ..Default::default() };
    let mut sim = Sim::service_with(20, budget);
    let evictions = drain_all(&mut sim, &|sim| assert!(sim.available() >= 19, "{} of 20 available", sim.available()));
    assert_eq!(evictions.len(), 20, "every task moved");
    sim.round();
    sim.world(20, false);
    assert_eq!(sim.available(), 20);
    // A self-managed job (no budget) moves a tenth at a time, at its own pace: two of 20.
    let mut sim = Sim::service(20);
    let fewest = std::cell::Cell::new(20);
    assert_eq!(drain_all(&mut sim, &|sim| fewest.set(fewest.get().min(sim.available()))).len(), 20);
    assert_eq!(fewest.get(), 18, "without a budget the drain takes two at once");
}

#[test]
fn a_drain_keeps_to_the_budget_s_rate() {
    let budget = DisruptionBudget { rate_limit: 1, rate_interval_ms: 60_000, ..Default::default() };
    let mut sim = Sim::service_with(3, budget);
    let evictions = drain_all(&mut sim, &|_| {});
    assert_eq!(evictions.len(), 3);
    for pair in evictions.windows(2) {
        assert!(pair[1] - pair[0] >= 60_000, "evictions {pair:?} closer than the rate allows");
    }
    assert!(sim.job().evictions_ms.len() <= 1, "only as many kept as the rate needs");
}

#[test]
fn an_eviction_is_refused_when_the_budget_holds_it_back() {
    let budget = DisruptionBudget { availability_percentage_limit: 75.0, ..Default::default() };
    let mut sim = Sim::service_with(4, budget);
    let evict = |sim: &mut Sim, id: &str| {
        let at = sim.now;
        sim.run(Command::EvictTask { task_id: id.into(), reason: "monkey".into(), timestamp_ms: at })
    };
    let tasks = sim.serving();
    assert_eq!(evict(&mut sim, &tasks[0].id), CommandResponse::Done, "3 of 4 stay: allowed");
    let r = evict(&mut sim, &tasks[1].id);
    assert!(
        matches!(&r, CommandResponse::Rejected(r) if r.message.contains("keeps 3 of 4 tasks available")),
        "a second would leave 2: {r:?}"
    );
    let evicted = sim.store.task(&tasks[0].id).unwrap().unwrap();
    assert_eq!((evicted.state(), evicted.status.reason_code.as_str()), (TaskState::KillInitiated, reason::EVICTED));
    assert_eq!(evicted.status.reason_message, "evicted: monkey");
    // Once its replacement serves, the next one may go.
    sim.world(0, false);
    sim.round();
    sim.world(4, false);
    assert_eq!(evict(&mut sim, &tasks[1].id), CommandResponse::Done);
}

#[test]
fn a_disabled_job_s_deployment_waits_with_its_tasks_kept() {
    let mut sim = Sim::service(3);
    sim.run(Command::UpdateJobStatus { job_id: JOB.into(), enabled: false });
    sim.update("v2", RolloutStrategy::default());
    for _ in 0..5 {
        sim.round();
        sim.world(3, false);
    }
    assert_eq!(sim.serving().iter().filter(|t| t.job_version() == 0).count(), 3, "no task touched while disabled");
    sim.run(Command::UpdateJobStatus { job_id: JOB.into(), enabled: true });
    for _ in 0..30 {
        sim.round();
        if sim.job().rollout.active().is_none() {
            break;
        }
        sim.world(3, false);
    }
    assert_eq!(sim.job().rollout.deployments[0].state, DeploymentState::Succeeded);
}

/// What `deploy status` says a deployment waits for is what the next round decides: the job
/// disabled, new tasks not yet available (the floor), the disruption budget (and what in it), the
/// canaries' promote; nothing while it moves.
#[test]
fn a_deployment_says_what_it_waits_for() {
    use crate::jobs::lifecycle::deployment_waiting;
    let waiting = |sim: &Sim| deployment_waiting(&sim.store, &sim.job(), sim.now).unwrap();

    // Without a surge and max unavailable 1, an availability budget of 100% holds every kill.
    let budget = DisruptionBudget { availability_percentage_limit: 100.0, ..Default::default() };
    let mut sim = Sim::service_with(3, budget);
    assert_eq!(waiting(&sim), None, "no deployment");
    sim.run(Command::UpdateJobStatus { job_id: JOB.into(), enabled: false });
    sim.update("v2", RolloutStrategy { max_unavailable: 1, max_surge: 0, ..Default::default() });
    assert!(waiting(&sim).unwrap().contains("disabled"), "{:?}", waiting(&sim));
    sim.run(Command::UpdateJobStatus { job_id: JOB.into(), enabled: true });
    let held = waiting(&sim).unwrap();
    assert!(held.starts_with("the job's disruption budget: "), "{held}");
    assert!(sim.round().is_empty(), "the round it describes does nothing");

    // With a surge, the new task starts; until it is available the floor holds the old ones.
    let mut sim = Sim::service(3);
    sim.update("v2", RolloutStrategy { max_unavailable: 0, max_surge: 1, ..Default::default() });
    assert_eq!(waiting(&sim), None, "the first round creates a new task");
    sim.round();
    let floor = waiting(&sim).unwrap();
    assert!(
        floor.contains("waiting for new tasks to become available") && floor.contains("3 stay available"),
        "{floor}"
    );
    sim.world(1, false);
    assert_eq!(waiting(&sim), None, "a new task available: an old one goes");

    // Canaries: once available, the deployment waits for a promote.
    let mut sim = Sim::service(3);
    sim.update("v2", RolloutStrategy { max_unavailable: 1, canary: 1, ..Default::default() });
    sim.round();
    assert!(waiting(&sim).unwrap().contains("canaries to become available (0 of 1)"), "{:?}", waiting(&sim));
    sim.world(1, false);
    sim.round();
    assert!(waiting(&sim).unwrap().contains("titus job deploy promote"), "{:?}", waiting(&sim));
}
