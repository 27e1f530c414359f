//! The lifecycle against the real apply code on the in-memory store, under random kills, scale
//! changes and agent reports.

use proptest::prelude::*;

use crate::apply::apply;
use crate::command::{Command, CommandResponse};
use crate::jobs::lifecycle::{plan, LifecycleConfig};
use crate::model::job::fixtures::{batch_descriptor, service_descriptor};
use crate::model::job::{Job, JobDescriptor, JobState, JobStatus, RetryPolicy};
use crate::model::task::{reason, TaskState, TaskStatus};
use crate::state::{MemoryStore, Overlay, StateRead};

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

    fn create(&mut self, descriptor: JobDescriptor) -> String {
        let job = Job {
            id: "job-1".into(),
            descriptor,
            status: JobStatus {
                state: JobState::Accepted,
                reason_code: String::new(),
                reason_message: String::new(),
                timestamp_ms: self.now,
            },
            status_history: vec![],
            rollout: Default::default(),
            evictions_ms: Vec::new(),
        };
        match self.run(Command::CreateJob { job, idempotency_token: None, token_expires_ms: 0 }) {
            CommandResponse::JobId(id) => id,
            other => panic!("create failed: {other:?}"),
        }
    }

    /// Runs the lifecycle until it has nothing more to do (bounded).
    fn settle(&mut self) {
        for _ in 0..20 {
            let next = &mut self.next_id;
            let mut ids = || {
                *next += 1;
                format!("task-{next}")
            };
            let commands = plan(&self.store, self.now, &LifecycleConfig::default(), &mut ids).unwrap();
            if commands.is_empty() {
                return;
            }
            for c in commands {
                let r = self.run(c.clone());
                if self.next_id > 0 && std::env::var("LIFECYCLE_DEBUG").is_ok() {
                    eprintln!("{c:?} -> {r:?}");
                }
            }
        }
        panic!("lifecycle did not settle");
    }

    fn live(&self, job: &str) -> Vec<crate::model::task::Task> {
        self.store
            .tasks_of_job(job)
            .unwrap()
            .into_iter()
            .filter(|t| t.state().is_live() && t.state() != TaskState::KillInitiated)
            .collect()
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
}

#[derive(Debug, Clone)]
enum Event {
    Kill(usize, bool),
    Resize(u32),
    Advance(usize),
    Fail(usize, usize),
    ConfirmKills,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (any::<usize>(), any::<bool>()).prop_map(|(i, s)| Event::Kill(i, s)),
        (0u32..12).prop_map(Event::Resize),
        any::<usize>().prop_map(Event::Advance),
        (any::<usize>(), 0usize..reason::ALL.len()).prop_map(|(i, r)| Event::Fail(i, r)),
        Just(Event::ConfirmKills),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// After each settle, an enabled service job has exactly `desired` live tasks, at most one per
    /// index, whatever kills, resizes and failures came before.
    #[test]
    fn service_job_keeps_exactly_desired_live_tasks(events in proptest::collection::vec(event(), 1..30)) {
        let mut sim = Sim::new();
        let job = sim.create(service_descriptor(0, 3, 12));
        sim.settle();
        for e in events {
            let live = sim.live(&job);
            match e {
                Event::Kill(i, shrink) if !live.is_empty() => {
                    let t = &live[i % live.len()];
                    sim.run(Command::KillTask { task_id: t.id.clone(), shrink, prevent_min_size_update: false, timestamp_ms: sim.now });
                }
                Event::Resize(d) => { sim.run(Command::UpdateJobCapacity { job_id: job.clone(), min: Some(0), desired: Some(d), max: None }); }
                Event::Advance(i) if !live.is_empty() => {
                    let t = &live[i % live.len()];
                    let next = if t.state() == TaskState::Accepted { TaskState::Launched } else { TaskState::Started };
                    sim.report(&t.id, next, "");
                }
                Event::Fail(i, r) if !live.is_empty() => {
                    let t = &live[i % live.len()];
                    sim.report(&t.id, TaskState::Finished, reason::ALL[r]);
                }
                Event::ConfirmKills => {
                    for t in sim.store.tasks_of_job(&job).unwrap().into_iter().filter(|t| t.state() == TaskState::KillInitiated) {
                        sim.report(&t.id, TaskState::Finished, reason::KILLED);
                    }
                }
                _ => {}
            }
            sim.settle();
            // Crashed tasks are replaced once the crash-loop back-off has passed.
            sim.now += crate::jobs::lifecycle::CRASH_LOOP_MAX_DELAY_MS as i64;
            sim.settle();
            let desired = sim.store.job(&job).unwrap().unwrap().descriptor.wanted_tasks() as usize;
            let live = sim.live(&job);
            prop_assert_eq!(live.len(), desired);
            let mut indexes: Vec<u32> = live.iter().map(|t| t.index).collect();
            indexes.sort();
            indexes.dedup();
            prop_assert_eq!(indexes.len(), live.len(), "two live tasks share an index");
        }
    }

    /// A batch job never has two live tasks for one index, retries failures within its policy (system
    /// errors free), and finishes once every index completed or ran out of retries.
    #[test]
    fn batch_job_retries_within_policy_and_finishes(outcomes in proptest::collection::vec(0usize..reason::ALL.len(), 1..40)) {
        let mut sim = Sim::new();
        let mut d = batch_descriptor(3);
        d.job_type = crate::model::job::JobType::Batch { size: 3, runtime_limit_sec: 0, retry_policy: RetryPolicy::Immediate { retries: 2 }, retry_on_runtime_limit: false };
        let job = sim.create(d);
        sim.settle();
        for r in outcomes {
            let live = sim.live(&job);
            let Some(t) = live.first() else { break };
            sim.report(&t.id, TaskState::Started, "");
            sim.report(&t.id, TaskState::Finished, reason::ALL[r]);
            sim.now += 1000;
            sim.settle();
            let mut per_index = [0; 3];
            for t in sim.live(&job) {
                per_index[t.index as usize] += 1;
            }
            prop_assert!(per_index.iter().all(|n| *n <= 1), "{:?}", per_index);
        }
        // Finish whatever is left normally: the job must then finish.
        for _ in 0..10 {
            for t in sim.live(&job) {
                sim.report(&t.id, TaskState::Finished, reason::NORMAL);
            }
            sim.settle();
        }
        prop_assert!(sim.store.job(&job).unwrap().is_none(), "job not archived");
        let archived = sim.store.archived_job(&job).unwrap().expect("archived job");
        prop_assert_eq!(archived.status.state, JobState::Finished);
        for t in sim.store.archived_tasks.values() {
            prop_assert!(t.counted_retries() <= 2, "retries beyond the policy: {:?}", t);
        }
    }
}

#[test]
fn killing_a_job_kills_its_tasks_then_finishes_it() {
    let mut sim = Sim::new();
    let job = sim.create(service_descriptor(1, 2, 4));
    sim.settle();
    let live = sim.live(&job);
    sim.report(&live[0].id, TaskState::Started, "");
    sim.run(Command::KillJob { job_id: job.clone(), timestamp_ms: sim.now });
    sim.settle();
    // The started task waits for its agent's confirmation; the never-launched one is gone.
    assert_eq!(sim.store.job(&job).unwrap().unwrap().status.state, JobState::KillInitiated);
    let killing: Vec<_> =
        sim.store.tasks_of_job(&job).unwrap().into_iter().filter(|t| t.state() == TaskState::KillInitiated).collect();
    assert_eq!(killing.len(), 1);
    sim.report(&killing[0].id, TaskState::Finished, reason::KILLED);
    sim.settle();
    assert_eq!(sim.store.archived_job(&job).unwrap().unwrap().status.state, JobState::Finished);
    assert_eq!(sim.store.archived_tasks.len(), 2);
}

#[test]
fn stuck_and_runtime_limits_are_enforced() {
    let mut sim = Sim::new();
    let mut d = batch_descriptor(1);
    d.job_type = crate::model::job::JobType::Batch {
        size: 1,
        runtime_limit_sec: 10,
        retry_policy: RetryPolicy::Immediate { retries: 0 },
        retry_on_runtime_limit: false,
    };
    let job = sim.create(d);
    sim.settle();
    let t = sim.live(&job)[0].clone();
    sim.report(&t.id, TaskState::Started, "");
    sim.now += 11_000;
    sim.settle();
    let task = sim.store.task(&t.id).unwrap().unwrap();
    assert_eq!(
        (task.state(), task.status.reason_code.as_str()),
        (TaskState::KillInitiated, reason::RUNTIME_LIMIT_EXCEEDED)
    );
    sim.now += 10 * 60_000 + 1;
    sim.settle();
    // No kill confirmation within 10 minutes: stuckInKillingState; no retry on runtime limit.
    let archived = sim.store.archived_task(&t.id).unwrap().expect("archived");
    assert_eq!(archived.status.reason_code, reason::STUCK_IN_KILLING_STATE);
    assert_eq!(sim.store.archived_job(&job).unwrap().unwrap().status.reason_code, reason::FAILED);
}

/// A retried call (same request key) is applied once: its late second application must not undo
/// the writes that came between — the anomaly the Jepsen register workload found.
#[test]
fn a_retried_call_is_applied_once() {
    let mut sim = Sim::new();
    let job = sim.create(service_descriptor(0, 0, 10));
    let desired = |sim: &Sim| match &sim.store.job(&job).unwrap().unwrap().descriptor.job_type {
        crate::model::job::JobType::Service { capacity, .. } => capacity.desired,
        _ => unreachable!("a service job"),
    };
    let update = |key: &str, desired: u32| Command::Once {
        key: key.into(),
        expires_ms: 10_000_000,
        command: Box::new(Command::UpdateJobCapacity {
            job_id: job.clone(),
            min: None,
            desired: Some(desired),
            max: None,
        }),
    };
    assert_eq!(sim.run(update("call-a", 3)), CommandResponse::Done);
    assert_eq!(sim.run(update("call-b", 5)), CommandResponse::Done);
    // The first call's retry arrives last: answered, not applied.
    assert_eq!(sim.run(update("call-a", 3)), CommandResponse::Done);
    assert_eq!(desired(&sim), 5);
    // A rejected call is recorded too: the client was told "rejected", so a delayed duplicate
    // must not succeed once the state would allow it.
    assert!(matches!(sim.run(update("call-c", 11)), CommandResponse::Rejected(_)));
    assert_eq!(desired(&sim), 5);
    let raise_max = Command::UpdateJobCapacity { job_id: job.clone(), min: None, desired: None, max: Some(20) };
    assert_eq!(sim.run(raise_max), CommandResponse::Done);
    assert!(matches!(sim.run(update("call-c", 11)), CommandResponse::Rejected(_)), "answered as the first time");
    assert_eq!(desired(&sim), 5, "not applied");
    assert_eq!(sim.run(update("call-d", 11)), CommandResponse::Done, "a new call is judged anew");
    assert_eq!(desired(&sim), 11);
}

#[test]
fn a_drained_agents_service_tasks_move_one_budget_at_a_time() {
    use crate::jobs::lifecycle::drain_job;
    use crate::model::task::context;
    use crate::state::agent_of;

    let mut sim = Sim::new();
    let job = sim.create(service_descriptor(1, 4, 8));
    sim.settle();
    let place = |sim: &mut Sim, task_id: &str, agent: &str| {
        for state in [TaskState::Launched, TaskState::Started] {
            sim.run(Command::UpdateTaskStatus {
                task_id: task_id.into(),
                status: TaskStatus {
                    state,
                    reason_code: String::new(),
                    reason_message: String::new(),
                    timestamp_ms: sim.now,
                },
                context: [(context::AGENT.to_string(), agent.to_string())].into(),
                expected_state: None,
            });
        }
    };
    for t in sim.live(&job) {
        place(&mut sim, &t.id, "old");
    }
    let draining = [("old".to_string(), 0)].into();
    let mut moved = 0;
    for _ in 0..10 {
        let j = sim.store.job(&job).unwrap().unwrap();
        let kills = drain_job(&j, &sim.store.tasks_of_job(&job).unwrap(), &draining, sim.now);
        if kills.is_empty() {
            break;
        }
        assert_eq!(kills.len(), 1, "desired 4: a budget of one task on its way at a time");
        for k in kills {
            let Command::UpdateTaskStatus { task_id, status, .. } = &k else { panic!("{k:?}") };
            assert_eq!((status.state, status.reason_code.as_str()), (TaskState::KillInitiated, reason::EVICTED));
            sim.run(k.clone());
            // While the replacement is not Started, nothing more moves.
            sim.settle();
            let j = sim.store.job(&job).unwrap().unwrap();
            assert!(drain_job(&j, &sim.store.tasks_of_job(&job).unwrap(), &draining, sim.now).is_empty());
            let replacement =
                sim.live(&job).into_iter().find(|t| t.state() == TaskState::Accepted).expect("replacement");
            place(&mut sim, &replacement.id, "new");
            sim.report(task_id, TaskState::Finished, reason::EVICTED);
            sim.settle();
            moved += 1;
        }
    }
    assert_eq!(moved, 4);
    let live = sim.live(&job);
    assert_eq!(live.len(), 4);
    assert!(live.iter().all(|t| t.state() == TaskState::Started && agent_of(t) == Some("new")), "{live:?}");
    // Nothing drains when no agent is drained.
    let j = sim.store.job(&job).unwrap().unwrap();
    assert!(drain_job(&j, &sim.store.tasks_of_job(&job).unwrap(), &Default::default(), sim.now).is_empty());
}

/// A self-managed job's owner has its relocation time to move its tasks off a drained agent: the
/// drain, begun when the operator asked (recorded in the agent), leaves them alone until then.
#[test]
fn a_self_managed_job_has_its_relocation_time_before_a_drain_moves_it() {
    use crate::jobs::lifecycle::{drain_job, draining_agents, relocation_until};
    use crate::model::agent::{Agent, AgentState};
    use crate::model::task::context;

    let mut sim = Sim::new();
    let mut descriptor = service_descriptor(1, 2, 4);
    descriptor.disruption_budget.self_managed_relocation_time_ms = 60_000;
    let job = sim.create(descriptor);
    sim.settle();
    sim.run(Command::RegisterAgent {
        agent: Agent {
            id: "old".into(),
            instance_group: "default".into(),
            resources: Default::default(),
            attributes: Default::default(),
            state: AgentState::Online,
            healthy: true,
            unhealthy_reason: String::new(),
            registered_ms: 1,
            terminating: false,
            lost_ms: None,
            draining: false,
            draining_since_ms: None,
        },
    });
    for t in sim.live(&job) {
        for state in [TaskState::Launched, TaskState::Started] {
            sim.run(Command::UpdateTaskStatus {
                task_id: t.id.clone(),
                status: TaskStatus {
                    state,
                    reason_code: String::new(),
                    reason_message: String::new(),
                    timestamp_ms: sim.now,
                },
                context: [(context::AGENT.to_string(), "old".to_string())].into(),
                expected_state: None,
            });
        }
    }
    let began = sim.now;
    sim.run(Command::SetAgentDraining { agent_id: "old".into(), draining: true, timestamp_ms: began });
    let draining = draining_agents(&sim.store).unwrap();
    assert_eq!(draining, [("old".to_string(), began)].into(), "the drain's start is recorded");
    let j = sim.store.job(&job).unwrap().unwrap();
    let drain = |now: i64| drain_job(&j, &sim.store.tasks_of_job(&job).unwrap(), &draining, now);
    assert_eq!(relocation_until(&j, began, began + 59_999), Some(began + 60_000));
    assert!(drain(began + 59_999).is_empty(), "moved within the owner's relocation time");
    assert_eq!(drain(began + 60_000).len(), 1, "then the drain's own pace: a tenth (one) at a time");

    // Undone and begun again: the relocation time runs from the new start.
    sim.run(Command::SetAgentDraining { agent_id: "old".into(), draining: false, timestamp_ms: began + 1 });
    assert!(draining_agents(&sim.store).unwrap().is_empty());
    sim.run(Command::SetAgentDraining { agent_id: "old".into(), draining: true, timestamp_ms: began + 2 });
    assert_eq!(draining_agents(&sim.store).unwrap()["old"], began + 2);
    // A job with an availability limit has no relocation time: the budget alone decides.
    let mut limited = j.clone();
    limited.descriptor.disruption_budget.availability_percentage_limit = 50.0;
    assert_eq!(relocation_until(&limited, began, began), None);
}

/// A job written before its durations were bounded at the edge (runtime limit 2^62 s or 2^64-1 s,
/// retry delays of i64::MAX ms) once made every leader's lifecycle panic on overflow as soon as a
/// task started or failed; 2^64-1 killed tasks at once. The planner saturates instead.
#[test]
fn out_of_bounds_durations_already_in_the_state_neither_panic_nor_kill() {
    for runtime_limit_sec in [1u64 << 62, u64::MAX] {
        let mut sim = Sim::new();
        let mut d = batch_descriptor(1);
        d.job_type = crate::model::job::JobType::Batch {
            size: 1,
            runtime_limit_sec,
            retry_policy: RetryPolicy::Delayed { initial_delay_ms: i64::MAX as u64, delay_ms: u64::MAX, retries: 3 },
            retry_on_runtime_limit: false,
        };
        let job = sim.create(d);
        sim.settle();
        let t = sim.live(&job)[0].clone();
        sim.report(&t.id, TaskState::Started, "");
        sim.now += 86_400_000;
        sim.settle();
        let task = sim.store.task(&t.id).unwrap().unwrap();
        assert_eq!(task.state(), TaskState::Started, "limit {runtime_limit_sec}: not killed for its runtime");
        // It fails: the retry waits (an effectively endless delay), and nothing overflows.
        sim.report(&t.id, TaskState::Finished, reason::FAILED);
        sim.now += 86_400_000;
        sim.settle();
        assert!(sim.live(&job).is_empty(), "the retry waits out its delay");
    }
}

/// A plan made from a stale view once killed a task that had just Started: its "stuck in
/// Launched" kill only checked that Started -> KillInitiated is a legal transition.
#[test]
fn a_stale_timeout_plan_does_not_kill_a_task_that_moved_on() {
    let mut sim = Sim::new();
    let job = sim.create(batch_descriptor(1));
    sim.settle();
    let t = sim.live(&job)[0].clone();
    sim.report(&t.id, TaskState::Launched, "");
    // The lifecycle plans from a view where the task is stuck in Launched...
    sim.now += 61_000;
    let mut ids = || "unused".to_string();
    let stale = plan(&sim.store, sim.now, &LifecycleConfig::default(), &mut ids).unwrap();
    assert!(
        stale.iter().any(|c| matches!(c, Command::UpdateTaskStatus { task_id, .. } if *task_id == t.id)),
        "{stale:?}"
    );
    // ...the task starts before the plan is applied...
    sim.report(&t.id, TaskState::Started, "");
    for c in stale {
        let r = sim.run(c);
        assert!(matches!(r, CommandResponse::Rejected(_)), "the stale kill is rejected: {r:?}");
    }
    // ...and it keeps running.
    assert_eq!(sim.store.task(&t.id).unwrap().unwrap().state(), TaskState::Started);
}

/// Terminations are written ahead like launches; an operator's update of the group keeps them.
#[test]
fn a_termination_written_ahead_survives_an_update_of_its_group() {
    use crate::model::agent::{InstanceGroup, Lifecycle};
    let mut sim = Sim::new();
    let group = InstanceGroup {
        id: "g".into(),
        tier: crate::model::Tier::Flex,
        lifecycle: Lifecycle::Active,
        attributes: Default::default(),
        launch: None,
        min: 0,
        desired: 2,
        max: 4,
        pending_launch: None,
        pending_terminations: Vec::new(),
        lifecycle_since_ms: None,
    };
    let pending = |sim: &Sim| sim.store.instance_group("g").unwrap().unwrap().pending_terminations;
    sim.run(Command::UpsertInstanceGroup { group: group.clone() });
    let intent = Command::SetTerminationIntent { id: "g".into(), instances: vec!["i-1".into(), "i-2".into()] };
    assert_eq!(sim.run(intent), CommandResponse::Done);
    sim.run(Command::UpsertInstanceGroup { group: InstanceGroup { desired: 3, ..group } });
    assert_eq!(pending(&sim), vec!["i-1".to_string(), "i-2".to_string()]);
    assert_eq!(sim.run(Command::SetTerminationIntent { id: "g".into(), instances: Vec::new() }), CommandResponse::Done);
    assert!(pending(&sim).is_empty());
    assert!(matches!(
        sim.run(Command::SetTerminationIntent { id: "nope".into(), instances: Vec::new() }),
        CommandResponse::Rejected(_)
    ));
}

/// Placements planned from one picture and applied one entry after another: hard constraints
/// hold on apply as resources do — a second task of a uniqueHost job, or any task beside an
/// exclusiveHost one, is refused when it commits, whatever the plan said.
#[test]
fn host_constraints_are_checked_again_when_a_placement_commits() {
    use crate::command::Assignment;
    use crate::model::agent::{Agent, AgentState};
    use crate::model::ResourceDimension;

    let mut sim = Sim::new();
    sim.run(Command::RegisterAgent {
        agent: Agent {
            id: "a1".into(),
            instance_group: "default".into(),
            resources: ResourceDimension { cpu: 16.0, memory_mb: 64_000, disk_mb: 100_000, network_mbps: 1000, gpu: 0 },
            attributes: Default::default(),
            state: AgentState::Online,
            healthy: true,
            unhealthy_reason: String::new(),
            registered_ms: 1,
            terminating: false,
            lost_ms: None,
            draining: false,
            draining_since_ms: None,
        },
    });
    let create = |sim: &mut Sim, id: &str, constraint: Option<&str>| {
        let mut d = service_descriptor(2, 2, 2);
        if let Some(c) = constraint {
            d.container.hard_constraints.insert(c.into(), "true".into());
        }
        let job = Job {
            id: id.into(),
            descriptor: d,
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
        let CommandResponse::JobId(id) =
            sim.run(Command::CreateJob { job, idempotency_token: None, token_expires_ms: 0 })
        else {
            panic!("create failed")
        };
        sim.settle();
        sim.live(&id).into_iter().map(|t| t.id).collect::<Vec<_>>()
    };
    let assign_all = |sim: &mut Sim, task_ids: &[&String]| {
        let assignments =
            task_ids.iter().map(|t| Assignment { task_id: t.to_string(), agent_id: "a1".into() }).collect();
        match sim.run(Command::AssignTasks { assignments, timestamp_ms: sim.now }) {
            CommandResponse::Assigned(ids) => ids.len(),
            other => panic!("{other:?}"),
        }
    };
    let assign = |sim: &mut Sim, task_id: &String| assign_all(sim, &[task_id]);
    // Within one entry...
    let pair = create(&mut sim, "pair", Some("uniqueHost"));
    assert_eq!(assign_all(&mut sim, &[&pair[0], &pair[1]]), 1, "two tasks of a uniqueHost job in one entry");
    sim.report(&pair[0], TaskState::Finished, reason::NORMAL);
    // ...and across entries planned from the same picture.
    let unique = create(&mut sim, "unique", Some("uniqueHost"));
    assert_eq!(assign(&mut sim, &unique[0]), 1);
    assert_eq!(assign(&mut sim, &unique[1]), 0, "a second task of a uniqueHost job on the same agent");
    let exclusive = create(&mut sim, "exclusive", Some("exclusiveHost"));
    assert_eq!(assign(&mut sim, &exclusive[0]), 0, "an exclusiveHost task beside another job's task");
    let plain = create(&mut sim, "plain", None);
    assert_eq!(assign(&mut sim, &plain[0]), 1, "a job with no constraint shares the agent");
    // Once the agent is empty, the exclusive task goes, and nothing joins it afterwards.
    for t in [&unique[0], &plain[0]] {
        sim.report(t, TaskState::Finished, reason::NORMAL);
    }
    assert_eq!(assign(&mut sim, &exclusive[0]), 1);
    assert_eq!(assign(&mut sim, &plain[1]), 0, "nothing joins an exclusiveHost task");
    assert_eq!(assign(&mut sim, &exclusive[1]), 0);
}

/// An instance is bound to the agent that registered on it first: another agent claiming it is
/// refused, and an agent moves to another instance only once declared lost.
#[test]
fn an_instance_is_bound_to_the_agent_that_registered_on_it_first() {
    use crate::model::agent::{Agent, AgentState, INSTANCE_ID_ATTRIBUTE};
    use crate::model::ResourceDimension;

    let mut sim = Sim::new();
    let register = |sim: &mut Sim, id: &str, instance: &str| {
        let agent = Agent {
            id: id.into(),
            instance_group: "default".into(),
            resources: ResourceDimension { cpu: 4.0, memory_mb: 8_000, disk_mb: 10_000, network_mbps: 100, gpu: 0 },
            attributes: [(INSTANCE_ID_ATTRIBUTE.to_string(), instance.to_string())].into(),
            state: AgentState::Online,
            healthy: true,
            unhealthy_reason: String::new(),
            registered_ms: 1,
            terminating: false,
            lost_ms: None,
            draining: false,
            draining_since_ms: None,
        };
        match sim.run(Command::RegisterAgent { agent }) {
            CommandResponse::Done => Ok(()),
            CommandResponse::Rejected(r) => {
                assert_eq!(r.field, "attributes.instanceId");
                Err(r.message)
            }
            other => panic!("{other:?}"),
        }
    };
    let instance_of = |sim: &Sim, id: &str| {
        sim.store.agent(id).unwrap().and_then(|a| a.instance_id().map(str::to_string)).unwrap_or_default()
    };
    register(&mut sim, "a1", "i-1").unwrap();
    register(&mut sim, "a1", "i-1").expect("the same agent again, after a reconnect");
    let err = register(&mut sim, "a2", "i-1").unwrap_err();
    assert!(err.contains("bound to agent \"a1\""), "{err}");
    assert_eq!(instance_of(&sim, "a1"), "i-1");
    assert!(sim.store.agent("a2").unwrap().is_none(), "a refused registration writes nothing");
    let err = register(&mut sim, "a1", "i-2").unwrap_err();
    assert!(err.contains("only once it is declared lost"), "{err}");
    sim.run(Command::AgentLost { agent_id: "a1".into(), timestamp_ms: sim.now });
    register(&mut sim, "a1", "i-2").expect("a lost agent comes back on a new instance");
    assert_eq!(instance_of(&sim, "a1"), "i-2");
    // Its old instance stays bound to it; the new one is now bound too.
    assert!(register(&mut sim, "a3", "i-1").is_err());
    assert!(register(&mut sim, "a3", "i-2").is_err());
    register(&mut sim, "a3", "i-3").unwrap();
}

#[test]
fn a_crash_looping_service_backs_off_and_a_clean_run_resets_it() {
    use crate::jobs::lifecycle::{CLEAN_RUN_MS, CRASH_LOOP_FIRST_DELAY_MS, CRASH_LOOP_MAX_DELAY_MS};
    let mut sim = Sim::new();
    let job = sim.create(service_descriptor(1, 1, 1));
    sim.settle();
    // Runs `ran_ms` then fails; returns how long its replacement waited (by the second).
    let crash = |sim: &mut Sim, ran_ms: i64| -> i64 {
        let t = sim.live(&job).pop().expect("a live task");
        sim.report(&t.id, TaskState::Launched, "");
        sim.report(&t.id, TaskState::Started, "");
        sim.now += ran_ms;
        sim.report(&t.id, TaskState::Finished, reason::FAILED);
        let failed_at = sim.now;
        for _ in 0..=CRASH_LOOP_MAX_DELAY_MS / 1000 {
            sim.settle();
            if !sim.live(&job).is_empty() {
                return sim.now - failed_at;
            }
            sim.now += 1000;
        }
        panic!("never replaced");
    };
    let first = CRASH_LOOP_FIRST_DELAY_MS as i64;
    assert_eq!(crash(&mut sim, 1000), 0, "one quick crash is replaced at once");
    assert_eq!(crash(&mut sim, 1000), first, "the second in a row waits 10 s");
    assert_eq!(crash(&mut sim, 1000), 2 * first, "the third 20 s");
    assert_eq!(crash(&mut sim, 1000), 4 * first);
    for _ in 0..5 {
        crash(&mut sim, 1000);
    }
    assert_eq!(crash(&mut sim, 1000), CRASH_LOOP_MAX_DELAY_MS as i64, "at most 5 minutes");
    let t = sim.live(&job).pop().unwrap();
    assert_eq!(t.context.get("crashLoopCount").map(String::as_str), Some("10"), "the count is shown on the task");
    assert_eq!(crash(&mut sim, CLEAN_RUN_MS), 0, "a crash after a clean run is replaced at once");
    assert!(!sim.live(&job).pop().unwrap().context.contains_key("crashLoopCount"));
    assert_eq!(crash(&mut sim, 1000), 0, "and the back-off starts again");
    assert_eq!(crash(&mut sim, 1000), first);

    // A kill is not a crash, and an explicit policy is taken as given.
    let t = sim.live(&job).pop().unwrap();
    sim.run(Command::KillTask {
        task_id: t.id.clone(),
        shrink: false,
        prevent_min_size_update: false,
        timestamp_ms: sim.now,
    });
    sim.report(&t.id, TaskState::Finished, reason::KILLED);
    sim.settle();
    assert_eq!(sim.live(&job).len(), 1, "a killed task is replaced at once");
    let mut sim = Sim::new();
    let mut d = service_descriptor(1, 1, 1);
    if let crate::model::job::JobType::Service { retry_policy, .. } = &mut d.job_type {
        *retry_policy = RetryPolicy::Delayed { initial_delay_ms: 0, delay_ms: 0, retries: 0 };
    }
    let job = sim.create(d);
    sim.settle();
    let t = sim.live(&job).pop().unwrap();
    sim.report(&t.id, TaskState::Finished, reason::FAILED);
    sim.settle();
    assert_eq!(sim.live(&job).len(), 1, "Delayed 0: replaced at once");
}

/// MoveTask: a live task goes to a service job running the same container, the source's desired
/// down by one and the target's up, so the lifecycle neither replaces it nor kills one; what would
/// change how the task runs, or break a job's bounds, is refused naming the field.
#[test]
fn a_task_moves_between_compatible_service_jobs_and_nothing_is_replaced() {
    let mut sim = Sim::new();
    let source = sim.create(service_descriptor(1, 2, 4));
    let mut target_descriptor = service_descriptor(0, 1, 2);
    target_descriptor.job_group_info.sequence = "v001".into();
    target_descriptor.attributes.insert("differs".into(), "fine".into());
    let target = Job {
        id: "job-2".into(),
        descriptor: target_descriptor,
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
    let mut other = target.clone();
    other.id = "job-3".into();
    other.descriptor.container.command = vec!["something".into(), "else".into()];
    for job in [target, other] {
        sim.run(Command::CreateJob { job, idempotency_token: None, token_expires_ms: 0 });
    }
    sim.settle();
    let mover = sim.live(&source).into_iter().max_by_key(|t| t.index).unwrap();
    let moving = |target: &str| Command::MoveTask {
        task_id: mover.id.clone(),
        source_job_id: source.clone(),
        target_job_id: target.into(),
    };
    let refused = |r: CommandResponse, field: &str| matches!(&r, CommandResponse::Rejected(x) if x.field == field);
    assert!(refused(sim.run(moving("job-3")), "target_job_id"), "another container is not compatible");
    assert!(refused(sim.run(moving(&source)), "target_job_id"), "to itself");

    assert_eq!(sim.run(moving("job-2")), CommandResponse::Done);
    let moved = sim.store.task(&mover.id).unwrap().unwrap();
    assert_eq!((moved.job_id.as_str(), moved.state()), ("job-2", mover.state()));
    assert_eq!(moved.context.get(crate::model::task::context::MOVED_FROM_JOB), Some(&source));
    assert_eq!(moved.index, 1, "the target's lowest free index");
    let desired = |sim: &Sim, id: &str| sim.store.job(id).unwrap().unwrap().descriptor.wanted_tasks();
    assert_eq!((desired(&sim, &source), desired(&sim, "job-2")), (1, 2));
    sim.settle();
    assert_eq!(sim.live(&source).len(), 1, "the source does not replace it");
    let on_target: Vec<String> = sim.live("job-2").into_iter().map(|t| t.id).collect();
    assert_eq!(on_target.len(), 2, "the target does not kill or add one: {on_target:?}");
    assert!(on_target.contains(&mover.id));

    // The source at its min (1), the target at its max (2): neither way moves.
    let back = sim.live(&source).remove(0);
    let r =
        sim.run(Command::MoveTask { task_id: back.id, source_job_id: source.clone(), target_job_id: "job-2".into() });
    assert!(refused(r, "source_job_id"), "below the source's min");
    let r = sim.run(Command::MoveTask {
        task_id: mover.id.clone(),
        source_job_id: "job-2".into(),
        target_job_id: source.clone(),
    });
    assert_eq!(r, CommandResponse::Done, "back again, within both bounds");
}
