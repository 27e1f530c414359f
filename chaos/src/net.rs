//! Partitions: which replicas stop hearing which (a "grudge", after Jepsen), and the packet filter
//! rules that make it so inside each process's network namespace.
//!
//! All rules live in one chain, `TITUS-CHAOS`, jumped to from INPUT and OUTPUT, so healing is one
//! flush per namespace and never touches anyone else's rules.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::deployment::{run_cmd, Process};

pub const CHAIN: &str = "TITUS-CHAOS";

/// The partition shapes of Jepsen's nemeses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// The leader alone on one side.
    IsolateLeader,
    /// A random minority on one side, the majority on the other.
    Halves,
    /// Each replica hears its neighbours on a ring (a majority with itself), no two the same majority.
    Ring,
    /// Two halves that cannot hear each other, and one replica in the middle that hears both.
    Bridge,
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Topology::IsolateLeader => "isolate-leader",
            Topology::Halves => "halves",
            Topology::Ring => "ring",
            Topology::Bridge => "bridge",
        })
    }
}

impl std::str::FromStr for Topology {
    type Err = String;
    fn from_str(s: &str) -> Result<Topology, String> {
        match s {
            "isolate-leader" => Ok(Topology::IsolateLeader),
            "halves" => Ok(Topology::Halves),
            "ring" => Ok(Topology::Ring),
            "bridge" => Ok(Topology::Bridge),
            other => Err(format!("topology {other:?}: expected isolate-leader, halves, ring or bridge")),
        }
    }
}

/// For each replica, the replicas whose packets it drops. Always symmetric.
pub type Grudge = BTreeMap<u64, BTreeSet<u64>>;

/// Cuts `side` off from everyone else.
pub fn isolate(nodes: &[u64], side: &BTreeSet<u64>) -> Grudge {
    let mut g = Grudge::new();
    for &a in nodes {
        let others: BTreeSet<u64> =
            nodes.iter().copied().filter(|b| *b != a && side.contains(b) != side.contains(&a)).collect();
        g.insert(a, others);
    }
    g
}

/// The grudge of a topology over `nodes` (shuffled by `rng` where the shape is random).
pub fn grudge(
    topology: Topology,
    nodes: &[u64],
    leader: Option<u64>,
    rng: &mut impl rand::Rng,
) -> Result<Grudge, String> {
    let n = nodes.len();
    if n < 2 {
        return Err(format!("a partition needs at least 2 replicas, the deployment has {n}"));
    }
    let mut shuffled = nodes.to_vec();
    shuffled.shuffle(rng);
    match topology {
        Topology::IsolateLeader => {
            let leader = leader.ok_or("isolate-leader: the cluster has no leader now")?;
            Ok(isolate(nodes, &BTreeSet::from([leader])))
        }
        Topology::Halves => Ok(isolate(nodes, &shuffled[..n / 2].iter().copied().collect())),
        Topology::Bridge => {
            if n < 3 {
                return Err(format!("bridge needs at least 3 replicas, the deployment has {n}"));
            }
            // shuffled[0] is the bridge; the rest split into two halves.
            let rest = &shuffled[1..];
            let left: BTreeSet<u64> = rest[..rest.len() / 2].iter().copied().collect();
            let mut g = Grudge::new();
            for &a in nodes {
                let drops = if a == shuffled[0] {
                    BTreeSet::new()
                } else {
                    rest.iter().copied().filter(|b| left.contains(b) != left.contains(&a)).collect()
                };
                g.insert(a, drops);
            }
            Ok(g)
        }
        Topology::Ring => {
            if n < 4 {
                return Err(format!(
                    "ring needs at least 4 replicas (with 3, every pair is a majority), the deployment has {n}"
                ));
            }
            // Each hears the n/2 nearest on the ring (n/2 + itself = a majority).
            let reach = n / 2;
            let mut g = Grudge::new();
            for (i, &a) in shuffled.iter().enumerate() {
                let mut hears = BTreeSet::new();
                for d in 1..=reach / 2 + reach % 2 {
                    hears.insert(shuffled[(i + d) % n]);
                    hears.insert(shuffled[(i + n - d) % n]);
                }
                let drops = nodes.iter().copied().filter(|b| *b != a && !hears.contains(b)).collect();
                g.insert(a, drops);
            }
            Ok(symmetric(g))
        }
    }
}

/// Makes a grudge symmetric: a drops b's packets if either side dropped the other's.
fn symmetric(mut g: Grudge) -> Grudge {
    let pairs: Vec<(u64, u64)> = g.iter().flat_map(|(a, bs)| bs.iter().map(move |b| (*a, *b))).collect();
    for (a, b) in pairs {
        g.entry(b).or_default().insert(a);
    }
    g
}

/// Installs the chain (idempotent) in a process's namespace.
pub fn ensure_chain(p: &Process) -> Result<()> {
    let mut create = p.netns_command("iptables")?;
    create.args(["-w", "-N", CHAIN]);
    let _ = create.output(); // exists already: fine
    for hook in ["INPUT", "OUTPUT"] {
        let mut check = p.netns_command("iptables")?;
        check.args(["-w", "-C", hook, "-j", CHAIN]);
        if !check.output().map(|o| o.status.success()).unwrap_or(false) {
            let mut insert = p.netns_command("iptables")?;
            insert.args(["-w", "-I", hook, "1", "-j", CHAIN]);
            run_cmd(insert).with_context(|| format!("hooking {CHAIN} into {hook}"))?;
        }
    }
    Ok(())
}

/// Drops every packet to and from `ips` in a process's namespace.
pub fn drop_from(p: &Process, ips: &[String]) -> Result<()> {
    ensure_chain(p)?;
    for ip in ips {
        for flag in ["-s", "-d"] {
            let mut add = p.netns_command("iptables")?;
            add.args(["-w", "-A", CHAIN, flag, ip, "-j", "DROP"]);
            run_cmd(add)?;
        }
    }
    Ok(())
}

/// Removes every rule titus-chaos made in a process's namespace. A namespace without the chain is
/// already healed.
pub fn heal(p: &Process) -> Result<()> {
    let mut flush = p.netns_command("iptables")?;
    flush.args(["-w", "-F", CHAIN]);
    match flush.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) if String::from_utf8_lossy(&out.stderr).contains("No chain") => Ok(()),
        Ok(out) => anyhow::bail!("flushing {CHAIN}: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => Err(e.into()),
    }
}

/// The addresses a process's namespace drops now.
pub fn dropped(p: &Process) -> Result<BTreeSet<String>> {
    let mut list = p.netns_command("iptables")?;
    list.args(["-w", "-S", CHAIN]);
    let out = match list.output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => return Ok(BTreeSet::new()),
    };
    Ok(out
        .lines()
        .filter(|l| l.ends_with("-j DROP"))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let i = words.iter().position(|w| *w == "-s" || *w == "-d")?;
            Some(words.get(i + 1)?.trim_end_matches("/32").to_string())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn reach(g: &Grudge, a: u64, nodes: &[u64]) -> usize {
        nodes.iter().filter(|b| **b != a && !g[&a].contains(b)).count() + 1
    }

    #[test]
    fn shapes() {
        for seed in 0..50 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for n in [3u64, 5, 7] {
                let nodes: Vec<u64> = (1..=n).collect();
                let majority = (n / 2 + 1) as usize;

                let g = grudge(Topology::IsolateLeader, &nodes, Some(2), &mut rng).unwrap();
                assert_eq!(g[&2].len(), (n - 1) as usize);
                assert!(nodes.iter().filter(|x| **x != 2).all(|x| g[x] == BTreeSet::from([2])));

                let g = grudge(Topology::Halves, &nodes, None, &mut rng).unwrap();
                let big = nodes.iter().filter(|a| reach(&g, **a, &nodes) >= majority).count();
                assert_eq!(big, majority, "halves: exactly one majority side {g:?}");

                let g = grudge(Topology::Bridge, &nodes, None, &mut rng).unwrap();
                let bridges: Vec<u64> = nodes.iter().copied().filter(|a| g[a].is_empty()).collect();
                assert_eq!(bridges.len(), 1, "{g:?}");
                assert!(nodes.iter().filter(|a| **a != bridges[0]).all(|a| !g[a].is_empty()), "{g:?}");
                assert_eq!(reach(&g, bridges[0], &nodes), n as usize);

                for (a, bs) in &g {
                    for b in bs {
                        assert!(g[b].contains(a), "symmetric: {a} drops {b} but not the reverse");
                    }
                }
            }
            for n in [5u64, 7] {
                let nodes: Vec<u64> = (1..=n).collect();
                let g = grudge(Topology::Ring, &nodes, None, &mut rng).unwrap();
                let majority = (n / 2 + 1) as usize;
                for a in &nodes {
                    assert!(reach(&g, *a, &nodes) >= majority, "ring: {a} hears a majority {g:?}");
                    assert!(reach(&g, *a, &nodes) < n as usize, "ring: {a} does not hear everyone {g:?}");
                }
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert!(grudge(Topology::Ring, &[1, 2, 3], None, &mut rng).unwrap_err().contains("at least 4"));
        assert!(grudge(Topology::IsolateLeader, &[1, 2, 3], None, &mut rng).unwrap_err().contains("no leader"));
    }
}
