//! The placement core's rules, as examples and as properties over random clusters.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use titus_scheduler::*;

fn res(cpu: f64, memory_mb: u64) -> Resources {
    Resources { cpu, memory_mb, disk_mb: 1_000, network_mbps: 100, gpu: 0 }
}

/// `n` instances of `per`: a capacity group's reservation.
fn instances(n: u64, per: Resources) -> Resources {
    Resources {
        cpu: per.cpu * n as f64,
        memory_mb: per.memory_mb * n,
        disk_mb: per.disk_mb * n,
        network_mbps: per.network_mbps * n,
        gpu: per.gpu * n,
    }
}

fn agent(id: &str, zone: &str, cpu: f64, memory_mb: u64) -> Agent {
    Agent {
        id: id.into(),
        zone: zone.into(),
        machine_type: "m5.large".into(),
        total: Resources { cpu, memory_mb, disk_mb: 100_000, network_mbps: 10_000, gpu: 0 },
        ..Agent::default()
    }
}

fn task(id: &str, job: &str, need: Resources) -> Task {
    Task {
        id: id.into(),
        job_id: job.into(),
        need,
        capacity_group: "DEFAULT".into(),
        tier: Tier::Flex,
        hard: Constraints::default(),
        soft: Constraints::default(),
    }
}

fn tasks(job: &str, n: usize, need: Resources) -> Vec<Task> {
    (0..n).map(|i| task(&format!("{job}-{i}"), job, need)).collect()
}

fn placed_on(plan: &Plan) -> HashMap<&str, &str> {
    plan.placements.iter().map(|p| (p.task_id.as_str(), p.agent_id.as_str())).collect()
}

fn reason_of<'a>(plan: &'a Plan, task_id: &str) -> &'a Reason {
    &plan.unplaced.iter().find(|u| u.task_id == task_id).expect("task is unplaced").reason
}

#[test]
fn bin_packing_fills_one_agent_before_the_next() {
    let agents: Vec<Agent> = (0..4).map(|i| agent(&format!("a{i}"), "z1", 4.0, 4096)).collect();
    let plan = schedule(&agents, &tasks("j", 6, res(1.0, 1024)), &[], &Config::default());
    assert!(plan.unplaced.is_empty());
    let mut per_agent: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &plan.placements {
        *per_agent.entry(&p.agent_id).or_default() += 1;
    }
    let mut counts: Vec<usize> = per_agent.values().copied().collect();
    counts.sort();
    assert_eq!(counts, vec![2, 4], "two agents used, one of them full: {per_agent:?}");
}

#[test]
fn why_pending_names_the_resource_the_constraint_and_the_quota() {
    let agents = vec![agent("a1", "z1", 8.0, 2048), agent("a2", "z2", 8.0, 2048)];
    let mut big = task("big", "jbig", res(1.0, 4096));
    big.tier = Tier::Flex;
    let mut unique = tasks("ju", 3, res(1.0, 128));
    for t in &mut unique {
        t.hard.unique_host = true;
    }
    let mut critical = tasks("jc", 3, res(1.0, 128));
    for t in &mut critical {
        t.capacity_group = "payments".into();
        t.tier = Tier::Critical;
    }
    let groups = vec![Group {
        name: "payments".into(),
        tier: Tier::Critical,
        reserved: instances(2, res(1.0, 128)),
        used: Resources::default(),
    }];
    let mut all = vec![big];
    all.extend(unique);
    all.extend(critical);
    let plan = schedule(&agents, &all, &groups, &Config::default());

    let big = reason_of(&plan, "big");
    assert_eq!(big.kind, ReasonKind::Insufficient(1));
    assert!(big.message.contains("4096 MB of memory") && big.message.contains("2048"), "{big}");

    let third = reason_of(&plan, "ju-2");
    assert_eq!(third.kind, ReasonKind::Constraint("uniqueHost"));
    assert!(third.message.contains("2 of 2 eligible agents"), "{third}");
    assert_eq!(placed_on(&plan).iter().filter(|(t, _)| t.starts_with("ju-")).count(), 2);

    let quota = reason_of(&plan, "jc-2");
    assert_eq!(quota.kind, ReasonKind::Quota);
    assert!(quota.message.contains("payments"), "{quota}");
    assert_eq!(placed_on(&plan).iter().filter(|(t, _)| t.starts_with("jc-")).count(), 2);
}

#[test]
fn agents_that_are_not_active_or_healthy_get_nothing() {
    let mut agents = vec![agent("a1", "z1", 8.0, 8192), agent("a2", "z1", 8.0, 8192), agent("a3", "z1", 8.0, 8192)];
    agents[0].ineligible = Some(Ineligible::Lifecycle("PhasedOut".into()));
    agents[1].ineligible = Some(Ineligible::Unhealthy);
    agents[2].ineligible = Some(Ineligible::Lifecycle("Removable".into()));
    let plan = schedule(&agents, &tasks("j", 2, res(1.0, 128)), &[], &Config::default());
    assert!(plan.placements.is_empty());
    let r = reason_of(&plan, "j-0");
    assert_eq!(r.kind, ReasonKind::NoEligibleAgent);
    assert!(r.message.contains("2 in a") || r.message.contains("PhasedOut"), "{r}");

    agents[1].ineligible = None;
    let plan = schedule(&agents, &tasks("j", 2, res(1.0, 128)), &[], &Config::default());
    assert!(plan.placements.iter().all(|p| p.agent_id == "a2"), "{:?}", plan.placements);
    assert_eq!(plan.placements.len(), 2);
}

#[test]
fn exclusive_host_takes_an_empty_agent_and_keeps_it() {
    let mut agents = vec![agent("a1", "z1", 8.0, 8192), agent("a2", "z1", 8.0, 8192)];
    agents[0].jobs.insert("other".into(), 1);
    agents[0].used = res(1.0, 128);
    let mut ex = task("ex", "jex", res(1.0, 128));
    ex.hard.exclusive_host = true;
    let mut all = vec![ex];
    all.extend(tasks("j", 3, res(1.0, 128)));
    let plan = schedule(&agents, &all, &[], &Config::default());
    let on = placed_on(&plan);
    assert_eq!(on["ex"], "a2");
    for i in 0..3 {
        assert_eq!(on[format!("j-{i}").as_str()], "a1", "nothing joins the exclusive task");
    }
}

#[test]
fn critical_is_placed_before_flex_and_reservations_before_fair_shares() {
    // Room for 8 tasks; Flex tasks come first in the input, Critical ones must still win.
    let agents = vec![agent("a1", "z1", 4.0, 4096), agent("a2", "z1", 4.0, 4096)];
    let mut flex = tasks("flex", 6, res(1.0, 1024));
    let mut critical = tasks("crit", 5, res(1.0, 1024));
    for t in &mut critical {
        t.capacity_group = "payments".into();
        t.tier = Tier::Critical;
    }
    for t in &mut flex {
        t.capacity_group = "batch".into();
    }
    let groups = vec![
        Group {
            name: "payments".into(),
            tier: Tier::Critical,
            reserved: instances(5, res(1.0, 1024)),
            used: Resources::default(),
        },
        Group {
            name: "batch".into(),
            tier: Tier::Flex,
            reserved: instances(1, res(1.0, 1024)),
            used: Resources::default(),
        },
    ];
    let mut all = flex;
    all.extend(critical);
    let plan = schedule(&agents, &all, &groups, &Config::default());
    let on = placed_on(&plan);
    assert_eq!(on.keys().filter(|t| t.starts_with("crit-")).count(), 5);
    assert_eq!(on.keys().filter(|t| t.starts_with("flex-")).count(), 3);
}

#[test]
fn flex_groups_beyond_their_reservation_share_by_dominant_resource() {
    // 20 slots of (1 cpu, 1 GB); group "a" asks for 30, "b" for 30, "c" for 2 (less than a fair share).
    let agents: Vec<Agent> = (0..5).map(|i| agent(&format!("a{i}"), "z1", 4.0, 4096)).collect();
    let mut all = Vec::new();
    for (g, n) in [("a", 30), ("b", 30), ("c", 2)] {
        let mut ts = tasks(g, n, res(1.0, 1024));
        for t in &mut ts {
            t.capacity_group = g.into();
        }
        all.extend(ts);
    }
    let plan = schedule(&agents, &all, &[], &Config::default());
    let count = |g: &str| plan.placements.iter().filter(|p| p.task_id.starts_with(&format!("{g}-"))).count();
    assert_eq!((count("a"), count("b"), count("c")), (9, 9, 2));
    assert_eq!(reason_of(&plan, "a-29").kind, ReasonKind::Insufficient(0));
}

#[test]
fn a_soft_constraint_is_preferred_but_not_required() {
    let agents = vec![agent("a1", "z1", 8.0, 8192), agent("a2", "z2", 8.0, 8192)];
    let mut t = task("t", "j", res(1.0, 128));
    t.soft.zone = Some("z2".into());
    let plan = schedule(&agents, &[t.clone()], &[], &Config::default());
    assert_eq!(placed_on(&plan)["t"], "a2");
    t.soft.zone = Some("z9".into());
    let plan = schedule(&agents, &[t], &[], &Config::default());
    assert_eq!(plan.placements.len(), 1, "no agent in z9, placed anyway");
}

#[test]
fn constraints_parse_titus_names_case_insensitively_and_name_what_is_wrong() {
    let c =
        Constraints::parse([("UniqueHost", "TRUE"), ("availabilityZone", "us-east-1a"), ("host.rack", "r1")]).unwrap();
    assert!(c.unique_host);
    assert_eq!(c.zone.as_deref(), Some("us-east-1a"));
    assert_eq!(c.attributes, vec![("rack".to_string(), "r1".to_string())]);
    let e = Constraints::parse([("zoneBalance", "maybe")]).unwrap_err();
    assert!(e.contains("zoneBalance") && e.contains("maybe"), "{e}");
    let e = Constraints::parse([("nearTheMoon", "true")]).unwrap_err();
    assert!(e.contains("nearTheMoon"), "{e}");
}

#[test]
fn the_search_stops_early_instead_of_scanning_every_agent() {
    let agents: Vec<Agent> = (0..2_000).map(|i| agent(&format!("a{i:05}"), "z1", 16.0, 65_536)).collect();
    let ts = tasks("j", 5_000, res(1.0, 4096));
    let cfg = Config::default();
    let plan = schedule(&agents, &ts, &[], &cfg);
    assert_eq!(plan.placements.len(), 5_000);
    assert!(
        plan.agents_evaluated <= (ts.len() * cfg.max_candidates) as u64,
        "evaluated {} agents for {} tasks",
        plan.agents_evaluated,
        ts.len()
    );
}

// ---- properties over random clusters ----

#[derive(Debug, Clone)]
struct Case {
    agents: Vec<Agent>,
    tasks: Vec<Task>,
    groups: Vec<Group>,
    seed: u64,
}

const ZONES: [&str; 3] = ["z1", "z2", "z3"];

fn arb_constraints() -> impl Strategy<Value = Constraints> {
    (
        any::<bool>(),
        prop::bool::weighted(0.1),
        any::<bool>(),
        prop::option::weighted(0.2, 0..3usize),
        prop::option::weighted(0.1, 0..2usize),
    )
        .prop_map(|(unique_host, exclusive_host, zone_balance, zone, rack)| Constraints {
            unique_host,
            exclusive_host,
            zone_balance,
            zone: zone.map(|z| ZONES[z].to_string()),
            attributes: rack.map(|r| ("rack".to_string(), format!("r{r}"))).into_iter().collect(),
            ..Constraints::default()
        })
}

fn arb_case() -> impl Strategy<Value = Case> {
    let agents =
        prop::collection::vec((0..3usize, 1..16u32, 1..32u64, 0..3u32, any::<bool>(), 0..2usize, 0..4u32), 1..24);
    let jobs =
        prop::collection::vec((1..8usize, 1..4u32, 1..8u64, arb_constraints(), arb_constraints(), 0..3usize), 1..10);
    (agents, jobs, any::<u64>()).prop_map(|(agents, jobs, seed)| {
        let agents: Vec<Agent> = agents
            .into_iter()
            .enumerate()
            .map(|(i, (zone, cpu, mem, used_tasks, eligible, rack, lifecycle))| {
                let mut a = agent(&format!("a{i}"), ZONES[zone], cpu as f64, mem * 512);
                a.attributes.insert("rack".into(), format!("r{rack}"));
                let used = used_tasks.min(cpu);
                a.used = Resources { cpu: used as f64, memory_mb: 0, disk_mb: 0, network_mbps: 0, gpu: 0 };
                if used > 0 {
                    a.jobs.insert(format!("job{}", i % 3), used);
                }
                if !eligible && lifecycle == 0 {
                    a.ineligible = Some(Ineligible::Lifecycle("PhasedOut".into()));
                }
                a
            })
            .collect();
        let mut tasks = Vec::new();
        for (j, (n, cpu, mem, hard, soft, group)) in jobs.into_iter().enumerate() {
            for i in 0..n {
                let mut t = task(&format!("job{j}-{i}"), &format!("job{j}"), res(cpu as f64, mem * 256));
                t.hard = hard.clone();
                t.soft = soft.clone();
                t.capacity_group = ["g0", "g1", "g2"][group].into();
                t.tier = if group == 0 { Tier::Critical } else { Tier::Flex };
                tasks.push(t);
            }
        }
        let groups = vec![
            Group {
                name: "g0".into(),
                tier: Tier::Critical,
                reserved: instances(8, res(1.0, 1024)),
                used: Resources::default(),
            },
            Group {
                name: "g1".into(),
                tier: Tier::Flex,
                reserved: instances(4, res(1.0, 1024)),
                used: Resources::default(),
            },
        ];
        Case { agents, tasks, groups, seed }
    })
}

fn config(seed: u64) -> Config {
    Config { seed, ..Config::default() }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn never_over_commits_and_never_breaks_a_hard_constraint(case in arb_case()) {
        let plan = schedule(&case.agents, &case.tasks, &case.groups, &config(case.seed));
        let tasks: HashMap<&str, &Task> = case.tasks.iter().map(|t| (t.id.as_str(), t)).collect();
        let mut used: HashMap<&str, Resources> = case.agents.iter().map(|a| (a.id.as_str(), a.used)).collect();
        let mut jobs: HashMap<(&str, &str), u32> = HashMap::new();
        let mut count: HashMap<&str, u32> = case.agents.iter().map(|a| (a.id.as_str(), a.jobs.values().sum())).collect();
        for a in &case.agents {
            for (j, n) in &a.jobs {
                jobs.insert((a.id.as_str(), j.as_str()), *n);
            }
        }
        let mut exclusive_on: HashMap<&str, &str> = HashMap::new();
        prop_assert_eq!(plan.placements.len() + plan.unplaced.len(), case.tasks.len());
        for p in &plan.placements {
            let t = tasks[p.task_id.as_str()];
            let a = case.agents.iter().find(|a| a.id == p.agent_id).unwrap();
            prop_assert!(a.ineligible.is_none(), "placed on an ineligible agent");
            let u = used.get_mut(a.id.as_str()).unwrap();
            prop_assert!(count[a.id.as_str()] == 0 || !t.hard.exclusive_host, "exclusiveHost on a busy agent");
            prop_assert!(!exclusive_on.contains_key(a.id.as_str()), "joined an exclusive task");
            if t.hard.exclusive_host {
                exclusive_on.insert(&a.id, &t.id);
            }
            u.add(&t.need);
            prop_assert!(a.total.short_of(u).is_none(), "over-committed {}: {:?} > {:?}", a.id, u, a.total);
            let n = jobs.entry((a.id.as_str(), t.job_id.as_str())).or_default();
            prop_assert!(!(t.hard.unique_host && *n > 0), "uniqueHost broken on {}", a.id);
            *n += 1;
            *count.get_mut(a.id.as_str()).unwrap() += 1;
            if let Some(z) = &t.hard.zone { prop_assert_eq!(z, &a.zone); }
            for (k, v) in &t.hard.attributes { prop_assert_eq!(a.attributes.get(k), Some(v)); }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_plan(case in arb_case()) {
        let a = schedule(&case.agents, &case.tasks, &case.groups, &config(case.seed));
        let b = schedule(&case.agents, &case.tasks, &case.groups, &config(case.seed));
        prop_assert_eq!(a, b);
    }

    #[test]
    fn zone_balance_keeps_zones_within_one_task_when_there_is_room(
        per_zone in 1..6usize, n in 1..40usize, seed in any::<u64>(), soft in any::<bool>(), existing in prop::collection::vec(0..3u32, 3)
    ) {
        let mut agents = Vec::new();
        for (z, zone) in ZONES.iter().enumerate() {
            for i in 0..per_zone {
                let mut a = agent(&format!("{zone}-{i}"), zone, 64.0, 65_536);
                if i == 0 && existing[z] > 0 {
                    a.jobs.insert("j".into(), existing[z]);
                    a.used = res(existing[z] as f64, 128 * existing[z] as u64);
                }
                agents.push(a);
            }
        }
        let mut ts = tasks("j", n, res(1.0, 128));
        for t in &mut ts {
            if soft { t.soft.zone_balance = true } else { t.hard.zone_balance = true }
        }
        let plan = schedule(&agents, &ts, &[], &config(seed));
        prop_assert!(plan.unplaced.is_empty());
        let mut per_zone_count: HashMap<&str, u32> = ZONES.iter().enumerate().map(|(z, zone)| (*zone, existing[z])).collect();
        for p in &plan.placements {
            *per_zone_count.get_mut(&p.agent_id[..2]).unwrap() += 1;
        }
        // Water-filling the same tasks into the least-loaded zone gives the best spread possible.
        let mut ideal = existing.clone();
        for _ in 0..n {
            *ideal.iter_mut().min().unwrap() += 1;
        }
        let spread = |c: Vec<u32>| c.iter().max().unwrap() - c.iter().min().unwrap();
        let got: Vec<u32> = ZONES.iter().map(|z| per_zone_count[z]).collect();
        prop_assert_eq!(spread(got), spread(ideal), "{:?}", per_zone_count);
    }

    #[test]
    fn critical_tasks_within_their_reservation_go_before_any_flex_task(
        slots in 1..12usize, critical in 0..10usize, flex in 0..10usize, seed in any::<u64>()
    ) {
        let agents: Vec<Agent> = (0..slots).map(|i| agent(&format!("a{i}"), "z1", 1.0, 1024)).collect();
        let mut ts = tasks("flex", flex, res(1.0, 1024));
        let mut cs = tasks("crit", critical, res(1.0, 1024));
        for t in &mut cs {
            t.tier = Tier::Critical;
            t.capacity_group = "c".into();
        }
        ts.extend(cs);
        let groups = vec![Group { name: "c".into(), tier: Tier::Critical, reserved: instances(100, res(1.0, 1024)), used: Resources::default() }];
        let plan = schedule(&agents, &ts, &groups, &config(seed));
        let placed_critical = plan.placements.iter().filter(|p| p.task_id.starts_with("crit")).count();
        let placed_flex = plan.placements.iter().filter(|p| p.task_id.starts_with("flex")).count();
        prop_assert_eq!(placed_critical, critical.min(slots));
        prop_assert_eq!(placed_flex, flex.min(slots - placed_critical));
    }
}
