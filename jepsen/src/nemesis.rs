//! Nemeses: faults from titus-chaos (kill, pause, partition, skew — each journaled and undone) and
//! membership changes, applied on a schedule while the workloads run. Every start and stop is in the
//! history (process `:nemesis`), so plots can shade the fault intervals.

use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use titus_chaos::duration::Dur;
use titus_chaos::faults::{Chaos, FaultSpec, Target};
use titus_chaos::net::Topology;
use tokio::time::Instant;

use crate::history::{Recorder, Type, NEMESIS};

pub const ALL: &[&str] = &[
    "partition-halves",
    "partition-isolate-leader",
    "partition-ring",
    "partition-bridge",
    "kill-one",
    "kill-leader",
    "kill-minority",
    "pause-leader",
    "membership",
    "skew",
    "partition+kill",
];

/// The nemeses that make sense for `replicas` (a ring needs 5).
pub fn available(replicas: usize) -> Vec<&'static str> {
    ALL.iter().copied().filter(|n| *n != "partition-ring" || replicas >= 4).collect()
}

pub fn parse_list(text: &str, replicas: usize) -> anyhow::Result<Vec<&'static str>> {
    if text == "all" {
        return Ok(available(replicas));
    }
    if text == "none" {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim) {
        let known = ALL.iter().find(|n| **n == name).ok_or_else(|| anyhow::anyhow!("nemesis {name:?}: expected all, none or some of {}", ALL.join(", ")))?;
        if !available(replicas).contains(known) {
            anyhow::bail!("nemesis {name}: needs at least 4 replicas");
        }
        out.push(*known);
    }
    Ok(out)
}

fn specs(name: &str, d: Dur) -> Vec<FaultSpec> {
    let partition = |topology| FaultSpec::Partition { topology, duration: d };
    match name {
        "partition-halves" => vec![partition(Topology::Halves)],
        "partition-isolate-leader" => vec![partition(Topology::IsolateLeader)],
        "partition-ring" => vec![partition(Topology::Ring)],
        "partition-bridge" => vec![partition(Topology::Bridge)],
        "kill-one" => vec![FaultSpec::Kill { target: Target::Follower, restart_after: d }],
        "kill-leader" => vec![FaultSpec::Kill { target: Target::Leader, restart_after: d }],
        "kill-minority" => vec![FaultSpec::Kill { target: Target::Minority, restart_after: d }],
        // Longer than the election timeout: the others elect a leader while it is stopped.
        "pause-leader" => vec![FaultSpec::Pause { target: Target::Leader, duration: d }],
        "skew" => vec![FaultSpec::Skew { target: Target::Follower, offset: "+90s".into(), duration: d }],
        // A partition, and inside it a follower killed (the blast radius keeps it to a minority).
        "partition+kill" => vec![partition(Topology::Bridge), FaultSpec::Kill { target: Target::Follower, restart_after: d }],
        _ => vec![],
    }
}

/// Runs nemeses until `until`: each for `fault` long, then `calm` without faults. Every selected
/// nemesis runs once (in a shuffled order) before any runs twice.
pub async fn run(chaos: &mut Chaos, rec: &Recorder, names: &[&'static str], fault: Duration, calm: Duration, until: Instant, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut queue: Vec<&'static str> = Vec::new();
    tokio::time::sleep(calm).await;
    while !names.is_empty() && Instant::now() + fault < until {
        if queue.is_empty() {
            queue = names.to_vec();
            queue.shuffle(&mut rng);
        }
        let name = queue.pop().unwrap_or("kill-one");
        let jitter = Duration::from_millis(rng.gen_range(0..500));
        rec.record(NEMESIS, Type::Invoke, "start", json!(name), None);
        if name == "membership" {
            membership(chaos, rec, fault + jitter).await;
        } else {
            let mut active = Vec::new();
            let mut what = Vec::new();
            for spec in specs(name, Dur(fault + jitter)) {
                match chaos.apply(&spec).await {
                    Ok(Some((id, _))) => {
                        active.push(id);
                        what.push(chaos.events.last().map(|e| e.what.clone()).unwrap_or_default());
                    }
                    Ok(None) => {}
                    Err(e) => what.push(format!("refused: {e:#}")),
                }
            }
            rec.record(NEMESIS, Type::Info, "start", json!([name, what.join("; ")]), None);
            tokio::time::sleep(fault + jitter).await;
            rec.record(NEMESIS, Type::Invoke, "stop", json!(name), None);
            for id in active {
                chaos.undo(id).await;
            }
        }
        rec.record(NEMESIS, Type::Info, "stop", json!(name), None);
        tokio::time::sleep(calm).await;
    }
}

/// Removes a follower from the membership while a bridge partition is in place (a membership change
/// during faults), heals, then adds it back (its process kept running with its data; it rejoins as
/// a learner and is promoted again).
async fn membership(chaos: &mut Chaos, rec: &Recorder, hold: Duration) {
    let leader = chaos.leader().await;
    let candidates: Vec<u64> = chaos.deployment.replicas.iter().map(|r| r.id).filter(|id| Some(*id) != leader).collect();
    let Some(&id) = candidates.first() else { return };
    let replica = match chaos.deployment.replica(id) {
        Ok(r) => r.clone(),
        Err(_) => return,
    };
    let partition = chaos.apply(&FaultSpec::Partition { topology: Topology::Bridge, duration: Dur(hold) }).await;
    let removed = chaos.client.remove_member(id).await;
    let what = format!("remove replica {id} during a bridge partition: {}", removed.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into()));
    chaos.log(removed.is_ok(), what.clone());
    rec.record(NEMESIS, Type::Info, "start", json!(["membership", what]), None);
    tokio::time::sleep(hold).await;
    rec.record(NEMESIS, Type::Invoke, "stop", json!("membership"), None);
    if let Ok(Some((pid, _))) = partition {
        chaos.undo(pid).await;
    }
    if removed.is_ok() {
        let peer = format!("{}:7000", replica.ip);
        let added = chaos.client.add_member(id, &peer, &replica.api).await;
        chaos.log(added.is_ok(), format!("membership: replica {id} added back: {}", added.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into())));
    }
}
