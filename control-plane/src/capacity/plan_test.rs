use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::model::agent::LaunchSettings;

fn res(cpu: f64, memory_mb: u32) -> ResourceDimension {
    ResourceDimension { cpu, memory_mb, disk_mb: 0, network_mbps: 0, gpu: 0 }
}

fn group(id: &str, tier: Tier, lifecycle: Lifecycle, min: u32, desired: u32, max: u32) -> InstanceGroup {
    InstanceGroup {
        id: id.into(),
        tier,
        lifecycle,
        attributes: BTreeMap::new(),
        launch: Some(LaunchSettings {
            image_id: "ami-1".into(),
            instance_type: "m5.large".into(),
            instance_resources: res(2.0, 4096),
            ..Default::default()
        }),
        min,
        desired,
        max,
        pending_launch: None,
        pending_terminations: Vec::new(),
        lifecycle_since_ms: None,
    }
}

fn config() -> CapacityConfig {
    CapacityConfig {
        critical: TierLimits { min_idle: 0, max_idle: 10 },
        flex: TierLimits { min_idle: 0, max_idle: 10 },
        idle_cooldown_ms: 60_000,
        registration_timeout_ms: 300_000,
        lost_grace_ms: 600_000,
        lost_hold_percent: 30,
        max_terminations_per_round: 100,
        max_terminations_per_group: 100,
    }
}

fn inst(id: &str, launched_ms: i64) -> Instance {
    Instance { id: id.into(), launched_ms }
}

fn agent(instance: &str, live_tasks: u32, idle_since_ms: Option<i64>) -> AgentLoad {
    AgentLoad {
        agent_id: format!("agent-{instance}"),
        instance_id: instance.into(),
        live_tasks,
        idle_since_ms,
        lost_since_ms: None,
        cordoned: false,
    }
}

fn lost(instance: &str, since_ms: i64) -> AgentLoad {
    AgentLoad { lost_since_ms: Some(since_ms), ..agent(instance, 0, None) }
}

const NOW: i64 = 10_000_000;

#[test]
fn unplaced_tasks_size_the_scale_up_by_their_dominant_resource() {
    assert_eq!(instances_for(&res(3.0, 1000), &res(2.0, 4096)), 2, "cpu dominates");
    assert_eq!(instances_for(&res(1.0, 9000), &res(2.0, 4096)), 3, "memory dominates");
    assert_eq!(instances_for(&res(0.0, 0), &res(2.0, 4096)), 0);
    let with_disk = ResourceDimension { disk_mb: 10_000, network_mbps: 128, ..res(1.0, 100) };
    assert_eq!(instances_for(&with_disk, &res(2.0, 4096)), 1, "undeclared disk and network do not limit");
    let gpu = ResourceDimension { gpu: 1, ..res(1.0, 100) };
    assert_eq!(instances_for(&gpu, &res(2.0, 4096)), u32::MAX, "no GPUs: never fits");
    let groups = [group("g", Tier::Flex, Lifecycle::Active, 0, 0, 10)];
    let unplaced = BTreeMap::from([(Tier::Flex, vec![res(0.5, 3000); 4])]);
    let p = plan(&groups, &BTreeMap::new(), &[], &unplaced, &config(), NOW);
    assert_eq!(p.desired["g"], 3, "12000 MB over 4096 MB instances");
    assert_eq!(p.launch["g"], 3);
}

#[test]
fn scale_up_stops_at_max_and_counts_instances_on_their_way() {
    let groups = [group("g", Tier::Flex, Lifecycle::Active, 0, 2, 4)];
    let unplaced = BTreeMap::from([(Tier::Flex, vec![res(2.0, 100); 10])]);
    let instances = BTreeMap::from([("g".to_string(), vec![inst("i-1", NOW), inst("i-2", NOW)])]);
    let p = plan(&groups, &instances, &[], &unplaced, &config(), NOW);
    assert_eq!(p.desired["g"], 4, "never above max");
    assert_eq!(p.launch["g"], 2);
    // Critical-tier tasks do not grow a flex group; a task no instance can hold grows nothing.
    let unplaced = BTreeMap::from([(Tier::Critical, vec![res(1.0, 100)]), (Tier::Flex, vec![res(64.0, 100)])]);
    let p = plan(&groups, &instances, &[], &unplaced, &config(), NOW);
    assert!(p.launch.is_empty() && p.desired.is_empty(), "{p:?}");
}

#[test]
fn idle_agents_go_after_the_cooldown_phased_out_first_never_below_min() {
    let groups = [
        group("active", Tier::Flex, Lifecycle::Active, 1, 2, 5),
        group("old", Tier::Flex, Lifecycle::PhasedOut, 0, 1, 5),
    ];
    let instances = BTreeMap::from([
        ("active".to_string(), vec![inst("i-a1", 0), inst("i-a2", 0)]),
        ("old".to_string(), vec![inst("i-o1", 0)]),
    ]);
    let warm = NOW - 1_000;
    let cold = NOW - 120_000;
    let agents = [agent("i-a1", 0, Some(cold)), agent("i-a2", 0, Some(cold)), agent("i-o1", 0, Some(cold))];
    let p = plan(&groups, &instances, &agents, &BTreeMap::new(), &config(), NOW);
    let gone: Vec<&str> = p.terminate.iter().map(|t| t.1.as_str()).collect();
    assert_eq!(gone, vec!["i-o1", "i-a1"], "phased-out first, then down to min");
    assert_eq!(p.desired["active"], 1);
    assert_eq!(p.desired["old"], 0);
    // Not yet cooled down: nothing goes.
    let agents = [agent("i-a1", 0, Some(warm)), agent("i-a2", 0, Some(warm)), agent("i-o1", 0, Some(warm))];
    let p = plan(&groups, &instances, &agents, &BTreeMap::new(), &config(), NOW);
    assert!(p.terminate.is_empty(), "{p:?}");
}

#[test]
fn tiers_keep_min_idle_and_shed_above_max_idle_at_once() {
    let mut c = config();
    c.flex = TierLimits { min_idle: 1, max_idle: 1 };
    let groups = [group("g", Tier::Flex, Lifecycle::Active, 0, 3, 5)];
    let instances = BTreeMap::from([("g".to_string(), vec![inst("i-1", 0), inst("i-2", 0), inst("i-3", 0)])]);
    let warm = Some(NOW - 1_000);
    let agents = [agent("i-1", 0, warm), agent("i-2", 0, warm), agent("i-3", 2, None)];
    let p = plan(&groups, &instances, &agents, &BTreeMap::new(), &c, NOW);
    assert_eq!(p.terminate.len(), 1, "two idle, max 1: one goes without waiting: {p:?}");
    assert_ne!(p.terminate[0].1, "i-3", "never an agent with live tasks");
    // No idle agent at all: one more instance for headroom.
    let agents = [agent("i-1", 1, None), agent("i-2", 1, None), agent("i-3", 1, None)];
    let p = plan(&groups, &instances, &agents, &BTreeMap::new(), &c, NOW);
    assert_eq!(p.launch["g"], 1);
}

#[test]
fn instances_that_never_register_are_terminated_and_replaced() {
    let groups = [group("g", Tier::Flex, Lifecycle::Active, 0, 2, 5)];
    let instances = BTreeMap::from([("g".to_string(), vec![inst("i-old", NOW - 400_000), inst("i-new", NOW - 1_000)])]);
    let agents = [];
    let p = plan(&groups, &instances, &agents, &BTreeMap::new(), &config(), NOW);
    assert_eq!(p.terminate, vec![("g".into(), "i-old".into(), "did not register as an agent in time".into())]);
    assert_eq!(p.launch["g"], 1, "still wanted: replaced");
}

/// An agent silent past its TTL (paused, partitioned) was once taken for an instance that never
/// registered, and its instance terminated under its still-running containers.
#[test]
fn a_lost_agent_keeps_its_instance_for_the_grace_period() {
    let groups = [group("g", Tier::Flex, Lifecycle::Active, 0, 4, 5)];
    let ids = ["i-1", "i-2", "i-3", "i-4"];
    let instances = BTreeMap::from([("g".to_string(), ids.iter().map(|i| inst(i, NOW - 900_000)).collect())]);
    let busy: Vec<AgentLoad> = ids[1..].iter().map(|i| agent(i, 1, None)).collect();
    let with = |a: AgentLoad| [vec![a], busy.clone()].concat();
    // Lost 15 s ago: its instance stays (no "did not register" for it).
    let p = plan(&groups, &instances, &with(lost("i-1", NOW - 15_000)), &BTreeMap::new(), &config(), NOW);
    assert!(p.terminate.is_empty(), "{p:?}");
    assert!(p.launch.is_empty(), "a lost agent's instance is not on its way either: {p:?}");
    // Past the grace period, its tasks replaced: it goes, and is replaced while wanted.
    let p = plan(&groups, &instances, &with(lost("i-1", NOW - 600_000)), &BTreeMap::new(), &config(), NOW);
    assert_eq!(p.terminate, vec![("g".into(), "i-1".into(), "agent lost; its tasks were replaced".into())]);
    assert_eq!(p.launch["g"], 1);
    // Still holding live tasks in the replicated state: never.
    let held = AgentLoad { live_tasks: 2, ..lost("i-1", NOW - 600_000) };
    let p = plan(&groups, &instances, &with(held), &BTreeMap::new(), &config(), NOW);
    assert!(p.terminate.is_empty(), "{p:?}");
    // Above desired, a lost agent's instance is not taken as surplus either.
    let small = [group("g", Tier::Flex, Lifecycle::Active, 0, 3, 5)];
    let p = plan(&small, &instances, &with(lost("i-1", NOW - 15_000)), &BTreeMap::new(), &config(), NOW);
    assert!(p.terminate.is_empty(), "{p:?}");
}

/// A partition between the control plane and a zone makes many agents Lost at once: none of their
/// instances goes, however long it lasts.
#[test]
fn many_agents_lost_at_once_keep_their_instances() {
    let groups = [group("g", Tier::Flex, Lifecycle::Active, 0, 6, 6)];
    let ids = ["i-1", "i-2", "i-3", "i-4", "i-5", "i-6"];
    let instances = BTreeMap::from([("g".to_string(), ids.iter().map(|i| inst(i, 0)).collect())]);
    let mut agents: Vec<AgentLoad> = ids[..3].iter().map(|i| lost(i, NOW - 3_600_000)).collect();
    agents.extend(ids[3..].iter().map(|i| agent(i, 1, None)));
    let p = plan(&groups, &instances, &agents, &BTreeMap::new(), &config(), NOW);
    assert!(p.terminate.is_empty(), "half the group lost: held: {p:?}");
    // One of six lost is a dead host: it goes after the grace period.
    let mut agents: Vec<AgentLoad> = vec![lost("i-1", NOW - 3_600_000)];
    agents.extend(ids[1..].iter().map(|i| agent(i, 1, None)));
    let p = plan(&groups, &instances, &agents, &BTreeMap::new(), &config(), NOW);
    assert_eq!(p.terminate.len(), 1, "{p:?}");
}

#[test]
fn terminations_are_bounded_per_round_and_per_group() {
    let groups =
        [group("a", Tier::Flex, Lifecycle::Active, 0, 0, 20), group("b", Tier::Flex, Lifecycle::Active, 0, 0, 20)];
    let never = |g: &str| (0..8).map(|k| inst(&format!("i-{g}{k}"), NOW - 900_000)).collect::<Vec<_>>();
    let instances = BTreeMap::from([("a".to_string(), never("a")), ("b".to_string(), never("b"))]);
    let mut c = config();
    c.max_terminations_per_group = 3;
    c.max_terminations_per_round = 5;
    let p = plan(&groups, &instances, &[], &BTreeMap::new(), &c, NOW);
    let of = |g: &str| p.terminate.iter().filter(|t| t.0 == g).count();
    assert_eq!((of("a"), of("b")), (3, 2), "{p:?}");
}

proptest! {
    /// Whatever the fleet, desired stays within [min, max] and no agent with live tasks is terminated.
    #[test]
    fn bounds_hold_and_busy_agents_stay(
        min in 0u32..4, span in 0u32..6, desired_off in 0u32..10,
        fleet in proptest::collection::vec((0u32..3, 0u8..3, 0i64..400_000), 0..12),
        unplaced in proptest::collection::vec((0.1f64..4.0, 1u32..8000), 0..8),
        phased in any::<bool>(),
    ) {
        let max = min + span;
        let lifecycle = if phased { Lifecycle::PhasedOut } else { Lifecycle::Active };
        let groups = [group("g", Tier::Flex, lifecycle, min, (min + desired_off).min(max), max)];
        let mut instances = Vec::new();
        let mut agents = Vec::new();
        // Each instance: no agent, an Online agent, or a Lost one (lost `age` ago).
        for (k, (tasks, kind, age)) in fleet.iter().enumerate() {
            let id = format!("i-{k}");
            instances.push(inst(&id, NOW - age));
            match kind {
                1 => agents.push(agent(&id, *tasks, (*tasks == 0).then_some(NOW - age))),
                2 => agents.push(AgentLoad { live_tasks: *tasks, ..lost(&id, NOW - age) }),
                _ => {}
            }
        }
        let instances = BTreeMap::from([("g".to_string(), instances)]);
        let unplaced = BTreeMap::from([(Tier::Flex, unplaced.iter().map(|(c, m)| res(*c, *m)).collect())]);
        let p = plan(&groups, &instances, &agents, &unplaced, &config(), NOW);
        let d = p.desired.get("g").copied().unwrap_or(groups[0].desired);
        prop_assert!(d >= min && d <= max, "desired {} outside [{}, {}]", d, min, max);
        for (_, id, _) in &p.terminate {
            prop_assert!(agents.iter().all(|a| a.instance_id != *id || a.live_tasks == 0), "terminated busy {}", id);
            let lost_in_grace = agents.iter().any(|a| {
                a.instance_id == *id && a.lost_since_ms.is_some_and(|s| NOW - s < config().lost_grace_ms)
            });
            prop_assert!(!lost_in_grace, "terminated {} of an agent lost within the grace period", id);
        }
    }
}

#[test]
fn a_cordon_without_a_termination_under_way_is_lifted() {
    let mut g = group("g", Tier::Flex, Lifecycle::Active, 3, 3, 3);
    g.pending_terminations = vec!["i-2".into()];
    let instances = BTreeMap::from([("g".to_string(), vec![inst("i-1", 0), inst("i-2", 0), inst("i-3", 0)])]);
    // i-1: cordoned by a leader that never got to write the intent; i-2: its termination written
    // ahead; i-3: not cordoned; i-0: terminated already (EC2 no longer lists it), its agent still
    // attached.
    let agents = vec![
        AgentLoad { cordoned: true, ..agent("i-1", 1, None) },
        AgentLoad { cordoned: true, ..agent("i-2", 0, Some(NOW)) },
        agent("i-3", 1, None),
        AgentLoad { cordoned: true, ..agent("i-0", 0, Some(NOW)) },
    ];
    let p = plan(&[g], &instances, &agents, &BTreeMap::new(), &config(), NOW);
    assert!(p.terminate.is_empty(), "{:?}", p.terminate);
    assert_eq!(p.uncordon, vec!["agent-i-1".to_string()], "only the cordon nothing will follow, on a live instance");
}
