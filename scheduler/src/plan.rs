//! The placement algorithm.
//!
//! Order: Critical tasks before Flex; within a tier, every capacity group's tasks within its
//! reservation first, then (Flex only) the rest by dominant-resource fairness — the group with the
//! smallest dominant share of the eligible agents goes next. Critical tasks beyond their group's
//! reservation wait: the reservation is their quota.
//!
//! Agent choice (Fenzo's): hard constraints filter, the fitness of the agent after the placement
//! scores (bin-packing: fuller is better), soft constraints add to the score. Candidates are visited
//! through an index ordered by the free amount of the round's *key dimension* — the one the pending
//! tasks and live ones weigh on most, relative to what the agents have — tightest first, so agents
//! full in that dimension are never visited; agents that cannot hold even the round's smallest task
//! leave the index. The search stops at the first "good enough" score or after `max_candidates`
//! feasible agents, so a placement does not scan every agent.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::fmt;

use crate::resources::{describe, DIMENSIONS};
use crate::view::{Agent, Group, Ineligible, Task, Tier};
use crate::Resources;

/// How an agent's fitness for a task is scored, from its utilisation after the placement.
#[derive(Debug, Clone, PartialEq)]
pub enum Fitness {
    /// Weighted mean of utilisation per dimension (cpu, memory, disk, network, gpu).
    Weighted([f64; 5]),
    /// The largest utilisation of any dimension.
    DominantResource,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub fitness: Fitness,
    /// Stop searching at an agent scoring at least this (Fenzo's 0.9).
    pub good_enough: f64,
    /// Stop searching after this many feasible agents.
    pub max_candidates: usize,
    /// Share of the score that soft constraints carry, for tasks that have any.
    pub soft_weight: f64,
    /// Orders agents that are otherwise equal: the same seed gives the same plan.
    pub seed: u64,
}

impl Default for Config {
    /// Fenzo's defaults: cpu and memory bin-packing, good enough at 0.9.
    fn default() -> Self {
        Config {
            fitness: Fitness::Weighted([1.0, 1.0, 0.0, 0.0, 0.0]),
            good_enough: 0.9,
            max_candidates: 32,
            soft_weight: 0.5,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub task_id: String,
    pub agent_id: String,
}

/// The kind of reason a task waits, for counting (metrics) without parsing messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReasonKind {
    NoEligibleAgent,
    /// Not enough of a resource (an index into [`DIMENSIONS`]).
    Insufficient(usize),
    /// A hard constraint no agent with room can meet.
    Constraint(&'static str),
    /// A Critical task beyond its capacity group's reservation.
    Quota,
}

impl ReasonKind {
    /// A short label: "no eligible agent", "insufficient memory", "uniqueHost", "capacity group quota".
    pub fn label(&self) -> String {
        match self {
            ReasonKind::NoEligibleAgent => "no eligible agent".into(),
            ReasonKind::Insufficient(d) => format!("insufficient {}", DIMENSIONS[*d]),
            ReasonKind::Constraint(name) => (*name).into(),
            ReasonKind::Quota => "capacity group quota".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reason {
    pub kind: ReasonKind,
    pub message: String,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Unplaced {
    pub task_id: String,
    pub reason: Reason,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub placements: Vec<Placement>,
    pub unplaced: Vec<Unplaced>,
    /// Agents looked at while searching (the cost the early stop saves).
    pub agents_evaluated: u64,
}

/// Places `tasks` (in the order given, within each group) on `agents`. `groups` lists capacity
/// groups; a task whose group is not listed is Flex with nothing reserved.
pub fn schedule(agents: &[Agent], tasks: &[Task], groups: &[Group], cfg: &Config) -> Plan {
    let mut s = State::new(agents, tasks, cfg);
    let mut plan = Plan::default();

    // Queues per capacity group, per tier; groups in name order so ties are deterministic.
    let listed: HashMap<&str, &Group> = groups.iter().map(|g| (g.name.as_str(), g)).collect();
    let mut queues: Vec<Queue> = Vec::new();
    let mut queue_of: HashMap<(&str, Tier), usize> = HashMap::new();
    let mut names: Vec<(&str, Tier)> = tasks.iter().map(|t| (t.capacity_group.as_str(), t.tier)).collect();
    names.sort();
    names.dedup();
    for (name, tier) in names {
        let (reserved, used) = match listed.get(name) {
            Some(g) => (g.reserved, g.used),
            None => (Resources::default(), Resources::default()),
        };
        queue_of.insert((name, tier), queues.len());
        queues.push(Queue { name, tier, reserved, used, tasks: Vec::new(), next: 0 });
    }
    for (i, t) in tasks.iter().enumerate() {
        queues[queue_of[&(t.capacity_group.as_str(), t.tier)]].tasks.push(i);
    }

    for tier in [Tier::Critical, Tier::Flex] {
        for within_reservation in [true, false] {
            // Smallest dominant share first; queue index breaks ties.
            let mut heap: BinaryHeap<Reverse<(Share, usize)>> = BinaryHeap::new();
            for (qi, q) in queues.iter().enumerate().filter(|(_, q)| q.tier == tier && q.next < q.tasks.len()) {
                heap.push(Reverse((Share(q.share(within_reservation, &s.cluster)), qi)));
            }
            while let Some(Reverse((_, qi))) = heap.pop() {
                let q = &mut queues[qi];
                let task = &tasks[q.tasks[q.next]];
                if within_reservation && !q.reserved.minus(&q.used).holds(&task.need) {
                    // Beyond the reservation: Flex competes for the rest next; Critical waits.
                    continue;
                }
                if !within_reservation && tier == Tier::Critical {
                    for &ti in &q.tasks[q.next..] {
                        let message = format!(
                            "capacity group {:?} quota exhausted: its Critical reservation ({}) is in use",
                            q.name,
                            summary(&q.reserved)
                        );
                        plan.unplaced.push(Unplaced {
                            task_id: tasks[ti].id.clone(),
                            reason: Reason { kind: ReasonKind::Quota, message },
                        });
                    }
                    q.next = q.tasks.len();
                    continue;
                }
                q.next += 1;
                match s.place(task) {
                    Ok(agent) => {
                        q.used.add(&task.need);
                        plan.placements.push(Placement { task_id: task.id.clone(), agent_id: agent.to_string() });
                    }
                    Err(reason) => plan.unplaced.push(Unplaced { task_id: task.id.clone(), reason }),
                }
                if q.next < q.tasks.len() {
                    heap.push(Reverse((Share(q.share(within_reservation, &s.cluster)), qi)));
                }
            }
        }
    }
    plan.agents_evaluated = s.evaluated;
    plan
}

/// A capacity group's pending tasks in one tier.
struct Queue<'a> {
    name: &'a str,
    tier: Tier,
    reserved: Resources,
    used: Resources,
    tasks: Vec<usize>,
    next: usize,
}

impl Queue<'_> {
    fn share(&self, within_reservation: bool, cluster: &Resources) -> f64 {
        if within_reservation {
            self.used.dominant_share(&self.reserved)
        } else {
            self.used.dominant_share(cluster)
        }
    }
}

/// An f64 with a total order (shares are finite and non-negative).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Share(f64);
impl Eq for Share {}
impl PartialOrd for Share {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Share {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// The working copy of the agents during one round.
struct State<'a> {
    agents: &'a [Agent],
    cfg: &'a Config,
    free: Vec<Resources>,
    used: Vec<Resources>,
    tasks_on: Vec<u32>,
    jobs_on: Vec<HashMap<&'a str, u32>>,
    exclusive: Vec<bool>,
    /// Eligible agents that can take more, by (free amount of `key`, seeded tie-break, index).
    index: BTreeSet<(u64, u64, usize)>,
    /// The dimension the index orders by.
    key: usize,
    /// Per dimension, the least any of the round's tasks needs: an agent with less free than this
    /// in some dimension can take nothing more this round.
    smallest: Resources,
    tiebreak: Vec<u64>,
    by_id: HashMap<&'a str, usize>,
    /// Zones with at least one eligible agent, and each agent's zone among them.
    zones: Vec<&'a str>,
    zone_of: Vec<Option<usize>>,
    /// Per job with a zoneBalance constraint: its live tasks per zone.
    zone_counts: HashMap<&'a str, Vec<u32>>,
    /// Jobs that failed this round, and why: resources only shrink during a round, so the job's
    /// later tasks would fail the same way.
    failed: HashMap<&'a str, Reason>,
    cluster: Resources,
    evaluated: u64,
}

impl<'a> State<'a> {
    fn new(agents: &'a [Agent], tasks: &[Task], cfg: &'a Config) -> Self {
        let mut zones: Vec<&str> =
            agents.iter().filter(|a| a.ineligible.is_none() && !a.zone.is_empty()).map(|a| a.zone.as_str()).collect();
        zones.sort();
        zones.dedup();
        let mut cluster = Resources::default();
        let mut demand = Resources::default();
        for a in agents.iter().filter(|a| a.ineligible.is_none()) {
            cluster.add(&a.total);
            demand.add(&a.used);
        }
        let mut smallest: Option<Resources> = None;
        for t in tasks {
            demand.add(&t.need);
            let s = smallest.get_or_insert(t.need);
            s.cpu = s.cpu.min(t.need.cpu);
            s.memory_mb = s.memory_mb.min(t.need.memory_mb);
            s.disk_mb = s.disk_mb.min(t.need.disk_mb);
            s.network_mbps = s.network_mbps.min(t.need.network_mbps);
            s.gpu = s.gpu.min(t.need.gpu);
        }
        let (demand, supply) = (demand.as_array(), cluster.as_array());
        let key = (0..5)
            .filter(|&d| supply[d] > 0.0)
            .max_by(|&a, &b| (demand[a] / supply[a]).total_cmp(&(demand[b] / supply[b])))
            .unwrap_or(1);
        let smallest = smallest.unwrap_or_default();
        let tiebreak: Vec<u64> = agents.iter().map(|a| mix(cfg.seed ^ fnv(&a.id))).collect();
        let mut index = BTreeSet::new();
        for (i, a) in agents.iter().enumerate() {
            let free = a.total.minus(&a.used);
            if a.ineligible.is_none() && !a.exclusive && free.holds(&smallest) {
                index.insert((key_of(key, &free), tiebreak[i], i));
            }
        }
        State {
            agents,
            cfg,
            free: agents.iter().map(|a| a.total.minus(&a.used)).collect(),
            used: agents.iter().map(|a| a.used).collect(),
            tasks_on: agents.iter().map(|a| a.jobs.values().sum()).collect(),
            jobs_on: agents.iter().map(|a| a.jobs.iter().map(|(j, n)| (j.as_str(), *n)).collect()).collect(),
            exclusive: agents.iter().map(|a| a.exclusive).collect(),
            index,
            key,
            smallest,
            tiebreak,
            by_id: agents.iter().enumerate().map(|(i, a)| (a.id.as_str(), i)).collect(),
            zone_of: agents.iter().map(|a| zones.binary_search(&a.zone.as_str()).ok()).collect(),
            zones,
            zone_counts: HashMap::new(),
            failed: HashMap::new(),
            cluster,
            evaluated: 0,
        }
    }

    /// Live tasks of `job` per zone (computed once per round, then kept up to date).
    fn zone_counts(&mut self, job: &'a str) -> &Vec<u32> {
        if !self.zone_counts.contains_key(job) {
            let mut counts = vec![0; self.zones.len()];
            for (i, z) in self.zone_of.iter().enumerate() {
                if let (Some(z), Some(n)) = (z, self.jobs_on[i].get(job)) {
                    counts[*z] += n;
                }
            }
            self.zone_counts.insert(job, counts);
        }
        &self.zone_counts[job]
    }

    /// Zones holding the fewest of the job's tasks.
    fn least_loaded_zones(&mut self, job: &'a str) -> Vec<bool> {
        let counts = self.zone_counts(job);
        let min = counts.iter().copied().min().unwrap_or(0);
        counts.iter().map(|&c| c == min).collect()
    }

    /// The first hard constraint agent `i` fails for `t`, if any.
    fn hard_violation(&self, i: usize, t: &Task, zones_ok: Option<&[bool]>) -> Option<&'static str> {
        let a = &self.agents[i];
        let c = &t.hard;
        if self.exclusive[i] {
            return Some("exclusiveHost");
        }
        if c.exclusive_host && self.tasks_on[i] > 0 {
            return Some("exclusiveHost");
        }
        if c.unique_host && self.jobs_on[i].get(t.job_id.as_str()).is_some_and(|&n| n > 0) {
            return Some("uniqueHost");
        }
        if let Some(ok) = zones_ok {
            if !self.zone_of[i].is_some_and(|z| ok[z]) {
                return Some("zoneBalance");
            }
        }
        c.matches(a).err()
    }

    /// The share of `t`'s soft constraints agent `i` meets (1 when it has none).
    fn soft_score(&self, i: usize, t: &Task, zones_ok: Option<&[bool]>) -> f64 {
        let c = &t.soft;
        let terms = c.terms();
        if terms == 0 {
            return 1.0;
        }
        let a = &self.agents[i];
        let mut met = 0;
        met += usize::from(c.exclusive_host && self.tasks_on[i] == 0);
        met += usize::from(c.unique_host && self.jobs_on[i].get(t.job_id.as_str()).is_none_or(|&n| n == 0));
        met += usize::from(c.zone_balance && zones_ok.is_some_and(|ok| self.zone_of[i].is_some_and(|z| ok[z])));
        met += usize::from(c.zone.as_ref().is_some_and(|z| z.eq_ignore_ascii_case(&a.zone)));
        met += usize::from(c.machine_type.as_ref().is_some_and(|m| m.eq_ignore_ascii_case(&a.machine_type)));
        met += usize::from(c.machine_id.as_ref().is_some_and(|m| *m == a.id));
        met += c.attributes.iter().filter(|(k, v)| a.has_attribute(k, v)).count();
        met as f64 / terms as f64
    }

    /// Bin-packing fitness of agent `i` once it holds `need` too: 1 is full.
    fn fitness(&self, i: usize, need: &Resources) -> f64 {
        let after = self.used[i].plus(need).as_array();
        let total = self.agents[i].total.as_array();
        match &self.cfg.fitness {
            Fitness::Weighted(w) => {
                let (mut sum, mut weights) = (0.0, 0.0);
                for d in 0..5 {
                    if total[d] > 0.0 && w[d] > 0.0 {
                        sum += w[d] * (after[d] / total[d]).min(1.0);
                        weights += w[d];
                    }
                }
                if weights > 0.0 {
                    sum / weights
                } else {
                    0.0
                }
            }
            Fitness::DominantResource => {
                (0..5).filter(|&d| total[d] > 0.0).map(|d| (after[d] / total[d]).min(1.0)).fold(0.0, f64::max)
            }
        }
    }

    /// Chooses an agent for `t` and books it there.
    fn place(&mut self, t: &'a Task) -> Result<&'a str, Reason> {
        if let Some(r) = self.failed.get(t.job_id.as_str()) {
            return Err(r.clone());
        }
        let balance = t.hard.zone_balance || t.soft.zone_balance;
        let zones_ok = balance.then(|| self.least_loaded_zones(&t.job_id));
        let hard_zones = if t.hard.zone_balance { zones_ok.as_deref() } else { None };
        let soft = !t.soft.is_empty();
        let mut best: Option<(f64, usize)> = None;
        let mut feasible = 0;
        let candidates: Vec<usize> = match &t.hard.machine_id {
            Some(id) => self.by_id.get(id.as_str()).copied().filter(|&i| self.in_index(i)).into_iter().collect(),
            None => Vec::new(),
        };
        let mut visit = |s: &Self, i: usize, evaluated: &mut u64| -> bool {
            *evaluated += 1;
            if !s.free[i].holds(&t.need) || s.hard_violation(i, t, hard_zones).is_some() {
                return false;
            }
            let fit = s.fitness(i, &t.need);
            let score = if soft {
                (1.0 - s.cfg.soft_weight) * fit + s.cfg.soft_weight * s.soft_score(i, t, zones_ok.as_deref())
            } else {
                fit
            };
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, i));
            }
            feasible += 1;
            score >= s.cfg.good_enough || feasible >= s.cfg.max_candidates
        };
        let mut evaluated = 0;
        if t.hard.machine_id.is_some() {
            for i in candidates {
                visit(self, i, &mut evaluated);
            }
        } else {
            let from = key_of(self.key, &t.need).saturating_sub(1);
            for &(_, _, i) in self.index.range((from, 0, 0)..) {
                if visit(self, i, &mut evaluated) {
                    break;
                }
            }
        }
        self.evaluated += evaluated;
        match best {
            Some((_, i)) => {
                self.book(i, t);
                Ok(self.agents[i].id.as_str())
            }
            None => {
                let reason = self.diagnose(t, hard_zones);
                self.failed.insert(&t.job_id, reason.clone());
                Err(reason)
            }
        }
    }

    fn in_index(&self, i: usize) -> bool {
        self.index.contains(&(key_of(self.key, &self.free[i]), self.tiebreak[i], i))
    }

    fn book(&mut self, i: usize, t: &'a Task) {
        self.index.remove(&(key_of(self.key, &self.free[i]), self.tiebreak[i], i));
        self.free[i].sub(&t.need);
        self.used[i].add(&t.need);
        self.tasks_on[i] += 1;
        *self.jobs_on[i].entry(&t.job_id).or_default() += 1;
        if let (Some(z), Some(counts)) = (self.zone_of[i], self.zone_counts.get_mut(t.job_id.as_str())) {
            counts[z] += 1;
        }
        if t.hard.exclusive_host {
            self.exclusive[i] = true;
        } else if self.free[i].holds(&self.smallest) {
            self.index.insert((key_of(self.key, &self.free[i]), self.tiebreak[i], i));
        }
    }

    /// Why no agent took `t`: looks at every agent once (only for a job's first failure in a round).
    fn diagnose(&self, t: &Task, zones_ok: Option<&[bool]>) -> Reason {
        let eligible: Vec<usize> = (0..self.agents.len()).filter(|&i| self.agents[i].ineligible.is_none()).collect();
        if eligible.is_empty() {
            let mut why: Vec<(Ineligible, usize)> = Vec::new();
            for a in self.agents {
                if let Some(r) = &a.ineligible {
                    match why.iter_mut().find(|(w, _)| w == r) {
                        Some((_, n)) => *n += 1,
                        None => why.push((r.clone(), 1)),
                    }
                }
            }
            why.sort();
            let detail: Vec<String> = why.iter().map(|(w, n)| format!("{n} {w}")).collect();
            let message = if self.agents.is_empty() {
                "no agent is registered".to_string()
            } else {
                format!("none of {} agents takes tasks ({})", self.agents.len(), detail.join(", "))
            };
            return Reason { kind: ReasonKind::NoEligibleAgent, message };
        }
        let mut by_constraint: Vec<(&'static str, usize)> = Vec::new();
        let mut short = [0usize; 5];
        let mut most_free = [0f64; 5];
        let mut pass_constraints = 0;
        for &i in &eligible {
            if let Some(c) = self.hard_violation(i, t, zones_ok) {
                match by_constraint.iter_mut().find(|(n, _)| *n == c) {
                    Some((_, n)) => *n += 1,
                    None => by_constraint.push((c, 1)),
                }
                continue;
            }
            pass_constraints += 1;
            let free = self.free[i].as_array();
            for d in 0..5 {
                most_free[d] = most_free[d].max(free[d]);
            }
            if let Some(d) = self.free[i].short_of(&t.need) {
                short[d] += 1;
            }
        }
        if pass_constraints == 0 {
            by_constraint.sort_by_key(|(name, n)| (Reverse(*n), *name));
            let (name, n) = by_constraint[0];
            let what = match name {
                "uniqueHost" => format!("already run a task of job {}", t.job_id),
                "exclusiveHost" if t.hard.exclusive_host => "already run other tasks".to_string(),
                "exclusiveHost" => "run a task that wants its host alone".to_string(),
                "zoneBalance" => format!(
                    "are outside the zones holding the fewest of job {}'s tasks (every agent there is full or excluded)",
                    t.job_id
                ),
                "availabilityZone" => format!("are not in zone {}", t.hard.zone.as_deref().unwrap_or_default()),
                "machineType" => {
                    format!("are not of machine type {}", t.hard.machine_type.as_deref().unwrap_or_default())
                }
                "machineId" => format!("are not {}", t.hard.machine_id.as_deref().unwrap_or_default()),
                _ => "do not have the host attributes asked for".to_string(),
            };
            return Reason {
                kind: ReasonKind::Constraint(name),
                message: format!("{name} unsatisfiable: {n} of {} eligible agents {what}", eligible.len()),
            };
        }
        let d = (0..5).max_by_key(|&d| (short[d], Reverse(d))).unwrap_or(1);
        let need = t.need.as_array()[d];
        Reason {
            kind: ReasonKind::Insufficient(d),
            message: format!(
                "no agent with enough {}: the task needs {}, the most free on any of {pass_constraints} eligible agents is {}",
                DIMENSIONS[d],
                describe(d, need),
                describe(d, most_free[d])
            ),
        }
    }
}

/// An amount of dimension `d` as an index key (cpus in thousandths).
fn key_of(d: usize, r: &Resources) -> u64 {
    match d {
        0 => (r.cpu * 1000.0).floor().max(0.0) as u64,
        1 => r.memory_mb,
        2 => r.disk_mb,
        3 => r.network_mbps,
        _ => r.gpu,
    }
}

/// "4 cpus, 8192 MB of memory, …" (the dimensions it has).
fn summary(r: &Resources) -> String {
    let parts: Vec<String> =
        r.as_array().iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(d, v)| describe(d, *v)).collect();
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// splitmix64's finaliser: spreads a seed over 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
