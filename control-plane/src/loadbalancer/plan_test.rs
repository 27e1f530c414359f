//! The planner with the real apply code on the in-memory store and a fake target group, under
//! random task starts, kills, address reuse, failed AWS calls and time.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;

use super::*;
use crate::command::{Command, CommandResponse};
use crate::loadbalancer::holds_kill;
use crate::model::task::TaskStatus;
use crate::state::{MemoryStore, Overlay, StateRead};

const TG: &str = "arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/web/1";
const DRAIN: i64 = 1_000;

fn task(id: &str, state: TaskState, ip: &str, at: i64) -> Task {
    let mut context = BTreeMap::new();
    if !ip.is_empty() {
        context.insert(context::CONTAINER_IP.to_string(), ip.to_string());
    }
    Task {
        id: id.into(),
        job_id: "job".into(),
        index: 0,
        status: TaskStatus { state, reason_code: String::new(), reason_message: String::new(), timestamp_ms: at },
        status_history: vec![],
        context,
        original_id: id.into(),
        resubmit_of: None,
        resubmit_number: 0,
        system_resubmit_number: 0,
        resources: None,
        attributes: Default::default(),
    }
}

fn association() -> LoadBalancer {
    LoadBalancer {
        job_id: "job".into(),
        target_group: TG.into(),
        state: AssociationState::Active,
        message: String::new(),
        updated_ms: 0,
    }
}

/// The leader duty's steps, with a set standing in for the target group.
struct Sim {
    store: MemoryStore,
    tasks: HashMap<String, Task>,
    aws: BTreeSet<String>,
    now: i64,
}

impl Sim {
    fn new() -> Sim {
        let mut store = MemoryStore::default();
        store.load_balancers.insert(association().key(), association());
        Sim { store, tasks: HashMap::new(), aws: BTreeSet::new(), now: 10_000 }
    }

    fn run(&mut self, command: Command) -> CommandResponse {
        let mut o = Overlay::new(&self.store);
        let r = crate::apply::apply(&mut o, command).unwrap().rule().expect("a load balancer command");
        let changes = o.into_changes();
        self.store.commit(changes);
        r
    }

    fn plan(&self) -> Plan {
        let live = BTreeSet::from(["job".to_string()]);
        plan(
            &self.store.load_balancers().unwrap(),
            &self.store.lb_targets().unwrap(),
            &self.tasks,
            &live,
            self.now,
            DRAIN,
        )
    }

    /// One round; `fail` makes this round's AWS calls fail (after the records are written ahead).
    fn step(&mut self, fail: bool) {
        let p = self.plan();
        if !p.register.is_empty() {
            let CommandResponse::Keys(written) = self.run(Command::PutLbTargets { targets: p.register.clone() }) else {
                panic!("PutLbTargets answers keys")
            };
            if !fail {
                let done: Vec<LbTarget> = p
                    .register
                    .iter()
                    .filter(|t| written.contains(&t.key()))
                    .map(|t| LbTarget { state: TargetState::Registered, updated_ms: self.now, ..t.clone() })
                    .collect();
                self.aws.extend(done.iter().map(|t| t.ip.clone()));
                self.run(Command::PutLbTargets { targets: done });
            }
        }
        if !p.deregister.is_empty() {
            self.run(Command::PutLbTargets { targets: p.deregister.clone() });
            if !fail {
                for t in &p.deregister {
                    self.aws.remove(&t.ip);
                }
                let done = p
                    .deregister
                    .iter()
                    .map(|t| LbTarget { state: TargetState::Deregistered, updated_ms: self.now, ..t.clone() })
                    .collect();
                self.run(Command::PutLbTargets { targets: done });
            }
        }
        if !p.forget.is_empty() {
            self.run(Command::ForgetLbTargets { targets: p.forget });
        }
    }

    fn started_ips(&self) -> BTreeSet<String> {
        self.tasks.values().filter_map(task_ip).map(str::to_string).collect()
    }

    fn record(&self, task_id: &str) -> Option<LbTarget> {
        self.store.lb_targets.get(&crate::model::load_balancer::target_key(task_id, TG)).cloned()
    }
}

#[test]
fn started_tasks_are_registered_and_killed_ones_drained_before_forgotten() {
    let mut sim = Sim::new();
    sim.tasks.insert("a".into(), task("a", TaskState::Started, "10.0.0.1", sim.now));
    sim.tasks.insert("b".into(), task("b", TaskState::StartInitiated, "", sim.now));
    sim.step(false);
    assert_eq!(sim.aws, BTreeSet::from(["10.0.0.1".to_string()]));
    assert_eq!(sim.record("a").unwrap().state, TargetState::Registered);
    assert!(sim.record("b").is_none(), "not Started: not registered");

    sim.tasks.insert("a".into(), task("a", TaskState::KillInitiated, "10.0.0.1", sim.now));
    assert!(holds_kill(&sim.tasks["a"], &[sim.record("a").unwrap()], sim.now, 60_000));
    sim.step(false);
    assert!(sim.aws.is_empty(), "deregistered first");
    assert_eq!(sim.record("a").unwrap().state, TargetState::Deregistered);
    let p = sim.plan();
    assert!(p.forget.is_empty(), "kept until drained");
    assert_eq!(p.wake_at_ms, Some(sim.now + DRAIN));
    sim.now += DRAIN;
    sim.step(false);
    assert!(sim.record("a").is_none(), "forgotten once drained: the kill may go ahead");
    assert!(!holds_kill(&sim.tasks["a"], &[], sim.now, 60_000));
}

#[test]
fn a_reused_address_waits_for_the_old_target_to_leave() {
    let mut sim = Sim::new();
    sim.tasks.insert("old".into(), task("old", TaskState::Started, "10.0.0.9", sim.now));
    sim.step(false);
    // The old task finishes and its address goes to a new task before anything is deregistered.
    sim.tasks.insert("old".into(), task("old", TaskState::Finished, "10.0.0.9", sim.now));
    sim.tasks.insert("new".into(), task("new", TaskState::Started, "10.0.0.9", sim.now));
    let p = sim.plan();
    assert_eq!(p.deregister.len(), 1);
    assert!(p.register.is_empty(), "the new task waits until the old target is deregistered");
    sim.step(false);
    sim.step(false);
    assert_eq!(sim.record("new").unwrap().state, TargetState::Registered);
    assert_eq!(sim.aws, BTreeSet::from(["10.0.0.9".to_string()]));
}

#[test]
fn orphaned_groups_are_forgotten_and_gone_jobs_dissociated() {
    let mut sim = Sim::new();
    sim.tasks.insert("a".into(), task("a", TaskState::Started, "10.0.0.1", sim.now));
    sim.step(false);
    sim.run(Command::SetLoadBalancerState {
        job_id: "job".into(),
        target_group: TG.into(),
        state: AssociationState::Orphaned,
        message: "deleted".into(),
        timestamp_ms: sim.now,
    });
    let p = sim.plan();
    assert_eq!(p.forget.len(), 1);
    assert!(p.register.is_empty() && p.deregister.is_empty());
    let none = plan(&[association()], &[], &HashMap::new(), &BTreeSet::new(), sim.now, DRAIN);
    assert_eq!(none.remove, vec![association()]);
}

#[test]
fn records_only_move_forward() {
    let mut sim = Sim::new();
    let t = LbTarget {
        target_group: TG.into(),
        task_id: "a".into(),
        job_id: "job".into(),
        ip: "10.0.0.1".into(),
        state: TargetState::Registered,
        updated_ms: 1,
        health: String::new(),
    };
    // A record must start as Registering.
    assert_eq!(sim.run(Command::PutLbTargets { targets: vec![t.clone()] }), CommandResponse::Keys(vec![]));
    let registering = LbTarget { state: TargetState::Registering, ..t.clone() };
    sim.run(Command::PutLbTargets { targets: vec![registering.clone()] });
    sim.run(Command::PutLbTargets { targets: vec![LbTarget { state: TargetState::Deregistering, ..t.clone() }] });
    assert_eq!(sim.run(Command::PutLbTargets { targets: vec![registering] }), CommandResponse::Keys(vec![]));
    assert_eq!(sim.record("a").unwrap().state, TargetState::Deregistering);
}

#[test]
fn repair_re_registers_missing_and_leaves_foreign_targets_alone() {
    let rec = |task: &str, ip: &str, state| LbTarget {
        target_group: TG.into(),
        task_id: task.into(),
        job_id: "job".into(),
        ip: ip.into(),
        state,
        updated_ms: 0,
        health: String::new(),
    };
    let records = vec![rec("a", "10.0.0.1", TargetState::Registered), rec("b", "10.0.0.2", TargetState::Deregistered)];
    let present = BTreeSet::from(["10.0.0.2".to_string(), "10.9.9.9".to_string()]);
    let (missing, stale) = repair(TG, &records, &present);
    assert_eq!(missing, vec!["10.0.0.1".to_string()]);
    assert_eq!(stale, vec!["10.0.0.2".to_string()], "ours and unwanted; 10.9.9.9 is someone else's");
}

#[derive(Debug, Clone)]
enum Op {
    Start(u8),
    Kill(u8),
    Finish(u8),
    Tick(u16),
    Round { fail: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6).prop_map(Op::Start),
        (0u8..12).prop_map(Op::Kill),
        (0u8..12).prop_map(Op::Finish),
        (0u16..1500).prop_map(Op::Tick),
        any::<bool>().prop_map(|fail| Op::Round { fail }),
    ]
}

proptest! {
    /// Whatever happens, once AWS answers again and drains pass, the target group holds exactly
    /// the Started tasks' addresses; and at every step, a Registered record's address is in the
    /// group while its task is Started.
    #[test]
    fn the_group_converges_to_the_started_tasks(ops in proptest::collection::vec(op(), 1..60)) {
        let mut sim = Sim::new();
        let mut next = 0;
        for op in ops {
            match op {
                Op::Start(ip) => {
                    let ip = format!("10.0.0.{ip}");
                    // Docker never gives one address to two live containers.
                    if !sim.tasks.values().any(|t| t.state().is_live() && t.context.get(context::CONTAINER_IP) == Some(&ip)) {
                        next += 1;
                        let id = format!("t{next}");
                        sim.tasks.insert(id.clone(), task(&id, TaskState::Started, &ip, sim.now));
                    }
                }
                Op::Kill(i) | Op::Finish(i) => {
                    let id = format!("t{i}");
                    if let Some(t) = sim.tasks.get(&id).cloned().filter(|t| t.state() == TaskState::Started) {
                        let state = if matches!(op, Op::Kill(_)) { TaskState::KillInitiated } else { TaskState::Finished };
                        let ip = t.context[context::CONTAINER_IP].clone();
                        sim.tasks.insert(id.clone(), task(&id, state, &ip, sim.now));
                    }
                }
                Op::Tick(ms) => sim.now += ms as i64,
                Op::Round { fail } => sim.step(fail),
            }
            for t in sim.tasks.values().filter(|t| t.state() == TaskState::Started) {
                if let Some(r) = sim.record(&t.id).filter(|r| r.state == TargetState::Registered) {
                    prop_assert!(sim.aws.contains(&r.ip), "registered target {} missing from the group", r.ip);
                }
            }
        }
        for _ in 0..4 {
            sim.step(false);
            sim.now += DRAIN;
        }
        prop_assert_eq!(&sim.aws, &sim.started_ips());
        prop_assert!(sim.store.lb_targets.values().all(|r| r.state == TargetState::Registered));
    }
}
