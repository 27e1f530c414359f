//! The in-memory store (what the rules' property tests run on) and the RocksDB store (what
//! replicas run on) are the same state machine: random command sequences — users' job and
//! capacity-group calls, the lifecycle's plans, agents registering, being assigned tasks, reporting
//! and being lost, load balancers and instance groups — applied to both answer alike, and after
//! every command every read agrees.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tempfile::TempDir;

use crate::apply::{apply, Applied};
use crate::command::{Assignment, Command, CommandResponse};
use crate::jobs::lifecycle::{plan, LifecycleConfig};
use crate::model::agent::{Agent, AgentState, InstanceGroup, Lifecycle};
use crate::model::job::fixtures::{batch_descriptor, service_descriptor};
use crate::model::job::{Job, JobState, JobStatus};
use crate::model::load_balancer::{LbTarget, TargetState};
use crate::model::task::{TaskState, TaskStatus};
use crate::model::{CapacityGroup, ResourceDimension, Tier};
use crate::state::{MemoryStore, Overlay, StateRead};

use super::{StateMachine, StateReader};

const JOBS: u8 = 4;
const AGENTS: u8 = 3;

#[derive(Debug, Clone)]
enum Step {
    CreateJob { job: u8, service: bool, size: u32, token: Option<u8> },
    Resize { job: u8, desired: u32, once: Option<u8> },
    Kill { job: u8 },
    Attribute { job: u8, key: u8, delete: bool },
    Settle,
    Register { agent: u8, cpu: u8 },
    Assign { agent: u8 },
    Report { task: usize, state: u8 },
    Lost { agent: u8 },
    Group { name: u8, op: u8, instances: u32, token: Option<u8> },
    InstanceGroup { id: u8, op: u8, n: u32 },
    LoadBalancer { job: u8, tg: u8, add: bool },
    Target { task: usize, tg: u8, state: u8 },
    Finish { job: u8 },
    Purge { job: u8 },
}

fn step() -> impl Strategy<Value = Step> {
    let token = prop::option::of(0u8..3);
    prop_oneof![
        (0..JOBS, any::<bool>(), 0u32..4, token.clone()).prop_map(|(job, service, size, token)| Step::CreateJob {
            job,
            service,
            size,
            token
        }),
        (0..JOBS, 0u32..5, prop::option::of(0u8..3)).prop_map(|(job, desired, once)| Step::Resize {
            job,
            desired,
            once
        }),
        (0..JOBS).prop_map(|job| Step::Kill { job }),
        (0..JOBS, 0u8..3, any::<bool>()).prop_map(|(job, key, delete)| Step::Attribute { job, key, delete }),
        Just(Step::Settle),
        Just(Step::Settle),
        (0..AGENTS, 1u8..4).prop_map(|(agent, cpu)| Step::Register { agent, cpu }),
        (0..AGENTS).prop_map(|agent| Step::Assign { agent }),
        (any::<usize>(), 0u8..5).prop_map(|(task, state)| Step::Report { task, state }),
        (0..AGENTS).prop_map(|agent| Step::Lost { agent }),
        (0u8..2, 0u8..3, 0u32..6, token).prop_map(|(name, op, instances, token)| Step::Group {
            name,
            op,
            instances,
            token
        }),
        (0u8..2, 0u8..3, 0u32..6).prop_map(|(id, op, n)| Step::InstanceGroup { id, op, n }),
        (0..JOBS, 0u8..2, any::<bool>()).prop_map(|(job, tg, add)| Step::LoadBalancer { job, tg, add }),
        (any::<usize>(), 0u8..2, 0u8..4).prop_map(|(task, tg, state)| Step::Target { task, tg, state }),
        (0..JOBS).prop_map(|job| Step::Finish { job }),
        (0..JOBS).prop_map(|job| Step::Purge { job }),
    ]
}

/// Both stores, fed the same commands.
struct Twin {
    memory: MemoryStore,
    rocks: StateMachine,
    reader: StateReader,
    _dir: TempDir,
    index: u64,
    now: i64,
    next_task: u64,
    tokens: Vec<String>,
}

impl Twin {
    fn new() -> Twin {
        let dir = TempDir::new().unwrap();
        let (_log, rocks, reader) = super::open(dir.path(), 1).unwrap();
        Twin {
            memory: MemoryStore::default(),
            rocks,
            reader,
            _dir: dir,
            index: 0,
            now: 1_000_000,
            next_task: 0,
            tokens: vec![],
        }
    }

    /// Applies `command` to both; their answers must agree.
    fn run(&mut self, command: Command) -> CommandResponse {
        self.now += 10;
        let mut o = Overlay::new(&self.memory);
        let applied = apply(&mut o, command.clone()).unwrap();
        let changes = o.into_changes();
        self.memory.commit(changes);
        let Applied::Rule(expected) = applied else { panic!("no store command is generated: {command:?}") };
        self.index += 1;
        let got = super::store_test::apply_at(&mut self.rocks, self.index, command.clone());
        assert_eq!(got, expected, "answers differ for {command:?}");
        expected
    }

    fn status(&self, state: TaskState) -> TaskStatus {
        TaskStatus { state, reason_code: String::new(), reason_message: String::new(), timestamp_ms: self.now }
    }

    fn live_task(&self, pick: usize) -> Option<crate::model::task::Task> {
        let tasks = self.memory.all_tasks().unwrap();
        (!tasks.is_empty()).then(|| tasks[pick % tasks.len()].clone())
    }

    fn step(&mut self, s: &Step) {
        match s.clone() {
            Step::CreateJob { job, service, size, token } => {
                let descriptor = if service { service_descriptor(0, size, 5) } else { batch_descriptor(size.max(1)) };
                let job = Job {
                    id: format!("job-{job}"),
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
                let idempotency_token = token.map(|t| format!("token-{t}"));
                if let Some(t) = &idempotency_token {
                    self.tokens.push(crate::jobs::apply::job_token_key(t));
                }
                self.run(Command::CreateJob { job, idempotency_token, token_expires_ms: self.now + 1000 });
            }
            Step::Resize { job, desired, once } => {
                let resize = Command::UpdateJobCapacity {
                    job_id: format!("job-{job}"),
                    min: None,
                    desired: Some(desired),
                    max: None,
                };
                match once {
                    Some(k) => {
                        self.tokens.push(format!("request/req-{k}"));
                        let expires_ms = self.now + 1000;
                        self.run(Command::Once { key: format!("req-{k}"), expires_ms, command: Box::new(resize) });
                    }
                    None => {
                        self.run(resize);
                    }
                }
            }
            Step::Kill { job } => {
                self.run(Command::KillJob { job_id: format!("job-{job}"), timestamp_ms: self.now });
            }
            Step::Attribute { job, key, delete } => {
                let job_id = format!("job-{job}");
                let key = format!("k{key}");
                self.run(if delete {
                    Command::DeleteJobAttributes { job_id, keys: vec![key] }
                } else {
                    Command::UpdateJobAttributes { job_id, attributes: BTreeMap::from([(key, "v".into())]) }
                });
            }
            Step::Settle => {
                for _ in 0..3 {
                    let next = &mut self.next_task;
                    let mut ids = || {
                        *next += 1;
                        format!("task-{next}")
                    };
                    let commands = plan(&self.memory, self.now, &LifecycleConfig::default(), &mut ids).unwrap();
                    if commands.is_empty() {
                        break;
                    }
                    for c in commands {
                        self.run(c);
                    }
                }
            }
            Step::Register { agent, cpu } => {
                let agent = Agent {
                    id: format!("agent-{agent}"),
                    instance_group: "default".into(),
                    resources: ResourceDimension {
                        cpu: f64::from(cpu),
                        memory_mb: 4096,
                        disk_mb: 100_000,
                        network_mbps: 1000,
                        gpu: 0,
                    },
                    attributes: Default::default(),
                    state: AgentState::Online,
                    healthy: true,
                    unhealthy_reason: String::new(),
                    registered_ms: self.now,
                    terminating: false,
                    lost_ms: None,
                    draining: false,
                    draining_since_ms: None,
                };
                self.run(Command::RegisterAgent { agent });
            }
            Step::Assign { agent } => {
                let assignments: Vec<Assignment> = self
                    .memory
                    .all_tasks()
                    .unwrap()
                    .into_iter()
                    .filter(|t| t.state() == TaskState::Accepted)
                    .map(|t| Assignment { task_id: t.id, agent_id: format!("agent-{agent}") })
                    .collect();
                if !assignments.is_empty() {
                    self.run(Command::AssignTasks { assignments, timestamp_ms: self.now });
                }
            }
            Step::Report { task, state } => {
                let Some(t) = self.live_task(task) else { return };
                let state = [
                    TaskState::Launched,
                    TaskState::StartInitiated,
                    TaskState::Started,
                    TaskState::Finished,
                    TaskState::KillInitiated,
                ][state as usize];
                let status = self.status(state);
                self.run(Command::UpdateTaskStatus {
                    task_id: t.id,
                    status,
                    context: Default::default(),
                    expected_state: None,
                });
            }
            Step::Lost { agent } => {
                self.run(Command::AgentLost { agent_id: format!("agent-{agent}"), timestamp_ms: self.now });
            }
            Step::Group { name, op, instances, token } => {
                let group = CapacityGroup {
                    name: format!("group-{name}"),
                    tier: Tier::Flex,
                    resources_per_instance: ResourceDimension {
                        cpu: 1.0,
                        memory_mb: 512,
                        disk_mb: 1024,
                        network_mbps: 128,
                        gpu: 0,
                    },
                    instance_count: instances,
                    create_time_ms: self.now,
                    update_time_ms: self.now,
                    allowed_capabilities: Vec::new(),
                };
                let idempotency_token = token.map(|t| format!("group-token-{t}"));
                if let Some(t) = &idempotency_token {
                    self.tokens.push(format!("capacity-group/{t}"));
                }
                self.run(match op {
                    0 => Command::CreateCapacityGroup { group, idempotency_token },
                    1 => Command::UpdateCapacityGroup { group },
                    _ => Command::DeleteCapacityGroup { name: group.name },
                });
            }
            Step::InstanceGroup { id, op, n } => {
                let id = format!("ig-{id}");
                self.run(match op {
                    0 => Command::UpsertInstanceGroup {
                        group: InstanceGroup {
                            id,
                            tier: Tier::Flex,
                            lifecycle: Lifecycle::Active,
                            attributes: Default::default(),
                            launch: None,
                            min: 0,
                            desired: n.min(3),
                            max: 3,
                            pending_launch: None,
                            pending_terminations: vec![],
                            lifecycle_since_ms: None,
                        },
                    },
                    1 => Command::SetInstanceGroupDesired { id, desired: n },
                    _ => Command::SetTerminationIntent { id, instances: (0..n).map(|i| format!("i-{i}")).collect() },
                });
            }
            Step::LoadBalancer { job, tg, add } => {
                let (job_id, target_group) = (format!("job-{job}"), format!("arn:tg-{tg}"));
                self.run(if add {
                    Command::AddLoadBalancer { job_id, target_group, timestamp_ms: self.now }
                } else {
                    Command::RemoveLoadBalancer { job_id, target_group }
                });
            }
            Step::Target { task, tg, state } => {
                let Some(t) = self.live_task(task) else { return };
                let target = LbTarget {
                    target_group: format!("arn:tg-{tg}"),
                    task_id: t.id,
                    job_id: t.job_id,
                    ip: "10.0.0.1".into(),
                    state: [
                        TargetState::Registering,
                        TargetState::Registered,
                        TargetState::Deregistering,
                        TargetState::Deregistered,
                    ][state as usize],
                    updated_ms: self.now,
                    health: String::new(),
                };
                if state == 3 {
                    self.run(Command::ForgetLbTargets { targets: vec![target] });
                } else {
                    self.run(Command::PutLbTargets { targets: vec![target] });
                }
            }
            Step::Finish { job } => {
                self.run(Command::FinishJob {
                    job_id: format!("job-{job}"),
                    reason_code: "normal".into(),
                    reason_message: String::new(),
                    timestamp_ms: self.now,
                });
            }
            Step::Purge { job } => {
                let tokens = self.tokens.clone();
                self.run(Command::PurgeArchive { job_ids: vec![format!("job-{job}")], tokens });
                self.tokens.clear();
            }
        }
    }

    /// Every read of the state, on both stores.
    fn agree(&self) {
        let (m, r): (&dyn StateRead, &dyn StateRead) = (&self.memory, &self.reader);
        assert_eq!(m.jobs().unwrap(), r.jobs().unwrap(), "jobs");
        assert_eq!(m.all_tasks().unwrap(), r.all_tasks().unwrap(), "tasks");
        assert_eq!(m.agents().unwrap(), r.agents().unwrap(), "agents");
        assert_eq!(m.load_balancers().unwrap(), r.load_balancers().unwrap(), "load balancers");
        assert_eq!(m.lb_targets().unwrap(), r.lb_targets().unwrap(), "targets");
        assert_eq!(m.allocations().unwrap(), r.allocations().unwrap(), "allocations by agent");
        let m = &self.memory;
        let records = (m.jobs.len(), m.archived_jobs.len(), m.archived_tasks.len());
        let counted = super::StateCounts::of(m.tasks.values(), m.agents.values(), records);
        assert_eq!(self.reader.counts(), counted, "counts kept on apply");
        assert_eq!(super::StateCounts::scan(&self.reader.db).unwrap(), counted, "counts by scan");
        for j in 0..JOBS {
            let id = format!("job-{j}");
            assert_eq!(m.job(&id).unwrap(), r.job(&id).unwrap(), "{id}");
            assert_eq!(m.archived_job(&id).unwrap(), r.archived_job(&id).unwrap(), "archived {id}");
            assert_eq!(m.task_ids_of_job(&id).unwrap(), r.task_ids_of_job(&id).unwrap(), "tasks of {id}");
            let archived = m.archived_task_ids_of_job(&id).unwrap();
            assert_eq!(archived, r.archived_task_ids_of_job(&id).unwrap(), "archived tasks of {id}");
            for t in &archived {
                assert_eq!(m.archived_task(t).unwrap(), r.archived_task(t).unwrap(), "archived {t}");
            }
        }
        for a in 0..AGENTS {
            let id = format!("agent-{a}");
            assert_eq!(m.task_ids_on_agent(&id).unwrap(), r.task_ids_on_agent(&id).unwrap(), "tasks on {id}");
            assert_eq!(m.allocation_of(&id).unwrap(), r.allocation_of(&id).unwrap(), "allocation of {id}");
        }
        for g in 0..2 {
            let (group, ig) = (format!("group-{g}"), format!("ig-{g}"));
            assert_eq!(m.capacity_group(&group).unwrap(), r.capacity_group(&group).unwrap(), "{group}");
            assert_eq!(m.instance_group(&ig).unwrap(), r.instance_group(&ig).unwrap(), "{ig}");
        }
        for key in (0..3).flat_map(|k| {
            [
                crate::jobs::apply::job_token_key(&format!("token-{k}")),
                format!("request/req-{k}"),
                format!("capacity-group/group-token-{k}"),
            ]
        }) {
            assert_eq!(m.token(&key).unwrap(), r.token(&key).unwrap(), "token {key}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_memory_store_and_rocksdb_agree_on_every_read(steps in prop::collection::vec(step(), 1..60)) {
        let mut twin = Twin::new();
        for s in &steps {
            twin.step(s);
            twin.agree();
        }
    }
}
