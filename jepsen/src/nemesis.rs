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
        let known = ALL
            .iter()
            .find(|n| **n == name)
            .ok_or_else(|| anyhow::anyhow!("nemesis {name:?}: expected all, none or some of {}", ALL.join(", ")))?;
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
        "partition+kill" => {
            vec![partition(Topology::Bridge), FaultSpec::Kill { target: Target::Follower, restart_after: d }]
        }
        _ => vec![],
    }
}

/// Runs nemeses until `until`: each for `fault` long, then `calm` without faults. Every selected
/// nemesis runs once (in a shuffled order) before any runs twice.
pub async fn run(
    chaos: &mut Chaos,
    rec: &Recorder,
    names: &[&'static str],
    fault: Duration,
    calm: Duration,
    until: Instant,
    seed: u64,
) {
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
            // The replicas the faults take out of the quorum (cut off from a majority, killed,
            // paused): while a partition holds, none of them can lead.
            let mut impaired = std::collections::BTreeSet::new();
            for spec in specs(name, Dur(fault + jitter)) {
                match chaos.apply(&spec).await {
                    Ok(Some((id, _))) => {
                        active.push(id);
                        what.push(chaos.events.last().map(|e| e.what.clone()).unwrap_or_default());
                        if let Some(f) = chaos.journal.active.iter().find(|f| f.id == id) {
                            impaired.extend(f.impairs.iter().copied());
                        }
                    }
                    Ok(None) => {}
                    Err(e) => what.push(format!("refused: {e:#}")),
                }
            }
            rec.record(NEMESIS, Type::Info, "start", json!([name, what.join("; "), impaired]), None);
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

/// Removes a follower from the membership while another follower is paused (a membership change
/// during a fault that leaves a majority — under a partition that moves leadership around, a change
/// cannot commit and only times out), resumes it, then adds the removed one back (its process kept
/// running with its data; it rejoins as a learner and is promoted again).
async fn membership(chaos: &mut Chaos, rec: &Recorder, hold: Duration) {
    let leader = chaos.leader().await;
    let candidates: Vec<u64> =
        chaos.deployment.replicas.iter().map(|r| r.id).filter(|id| Some(*id) != leader).collect();
    let Some(&id) = candidates.first() else { return };
    // With 3 replicas the new configuration (2 voters) needs the paused one: pause only from 4 up.
    let paused = candidates.get(1).copied().filter(|_| chaos.deployment.replicas.len() >= 4);
    let replica = match chaos.deployment.replica(id) {
        Ok(r) => r.clone(),
        Err(_) => return,
    };
    let pause = match paused {
        Some(p) => chaos.apply(&FaultSpec::Pause { target: Target::Replica(p), duration: Dur(hold) }).await,
        None => Ok(None),
    };
    let removed = chaos.client.remove_member(id).await;
    let what = format!(
        "remove replica {id} while replica {} is paused: {}",
        paused.map_or("none".into(), |p| p.to_string()),
        removed.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into())
    );
    chaos.log(removed.is_ok(), what.clone());
    rec.record(NEMESIS, Type::Info, "start", json!(["membership", what]), None);
    tokio::time::sleep(hold).await;
    rec.record(NEMESIS, Type::Invoke, "stop", json!("membership"), None);
    if let Ok(Some((fault, _))) = pause {
        chaos.undo(fault).await;
    }
    // A removal whose answer was lost may still have happened: add back whatever is not a voter now.
    let voter = |s: &titus_client::proto::ClusterStatus| {
        s.members.iter().any(|m| m.node_id == id && m.role != titus_client::proto::MemberRole::Learner as i32)
    };
    let is_voter = chaos.client.cluster_status().await.map(|s| voter(&s)).unwrap_or(removed.is_err());
    if removed.is_ok() || !is_voter {
        let peer = format!("{}:7000", replica.ip);
        let added = chaos.client.add_member(id, &peer, &replica.api).await;
        chaos.log(
            added.is_ok(),
            format!(
                "membership: replica {id} added back: {}",
                added.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into())
            ),
        );
    }
}
