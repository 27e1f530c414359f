//! The checkers: each reads a history (whatever produced it) and reports its anomalies.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::history::{Op, Type};
use crate::linear::{self, Outcome, RegKind, RegOp};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckResult {
    pub checker: String,
    pub valid: bool,
    /// Operations or events looked at.
    pub count: usize,
    pub anomalies: Vec<String>,
    /// Figures worth printing (ok/fail/info counts, keys checked).
    pub stats: BTreeMap<String, u64>,
}

impl CheckResult {
    fn new(checker: &str) -> CheckResult {
        CheckResult { checker: checker.into(), valid: true, ..Default::default() }
    }

    fn anomaly(&mut self, text: String) {
        self.valid = false;
        if self.anomalies.len() < 100 {
            self.anomalies.push(text);
        }
    }
}

/// Pairs each invocation with its completion (the next op of the same process). An invocation with
/// no completion is treated as `info`.
pub fn pairs<'a>(ops: &'a [Op], f: &[&str]) -> Vec<(&'a Op, Option<&'a Op>)> {
    let mut open: HashMap<i64, usize> = HashMap::new();
    let mut out: Vec<(&Op, Option<&Op>)> = Vec::new();
    for op in ops.iter().filter(|o| f.contains(&o.f.as_str())) {
        match op.kind {
            Type::Invoke => {
                open.insert(op.process, out.len());
                out.push((op, None));
            }
            _ => {
                if let Some(i) = open.remove(&op.process) {
                    out[i].1 = Some(op);
                }
            }
        }
    }
    out
}

/// Register workload: `write [key v]` and `read [key v]`, each key a register starting at 0,
/// checked for linearizability key by key.
pub fn register(ops: &[Op]) -> CheckResult {
    let mut res = CheckResult::new("linearizable register per job (UpdateJobCapacity desired / FindJob)");
    let mut by_key: BTreeMap<String, Vec<RegOp>> = BTreeMap::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (inv, done) in pairs(ops, &["read", "write"]) {
        let outcome = done.map_or(Type::Info, |d| d.kind);
        *counts.entry(format!("{}-{:?}", inv.f, outcome).to_lowercase()).or_default() += 1;
        let Some(key) = inv.value.get(0).and_then(Value::as_str) else {
            res.anomaly(format!("op {}: value {} is not [key value]", inv.index, inv.value));
            continue;
        };
        let kind = match (inv.f.as_str(), outcome) {
            (_, Type::Fail) => continue,
            ("read", Type::Info) => continue,
            ("read", _) => match done.and_then(|d| d.value.get(1)).and_then(Value::as_i64) {
                Some(v) => RegKind::Read(v),
                None => {
                    res.anomaly(format!("op {}: an ok read without a value", inv.index));
                    continue;
                }
            },
            (_, _) => match inv.value.get(1).and_then(Value::as_i64) {
                Some(v) => RegKind::Write(v),
                None => continue,
            },
        };
        let ret = match (outcome, done) {
            (Type::Ok, Some(d)) => d.time,
            _ => u64::MAX,
        };
        by_key.entry(key.to_string()).or_default().push(RegOp { call: inv.time, ret, kind, id: inv.index });
    }
    for (key, ops) in &by_key {
        res.count += ops.len();
        if let Outcome::NotLinearizable { stuck_at } = linear::check(ops, 0) {
            res.anomaly(format!(
                "key {key}: not linearizable ({} ops); no order gets past the op at index {stuck_at}",
                ops.len()
            ));
        }
    }
    res.stats = counts;
    res.stats.insert("keys".into(), by_key.len() as u64);
    res
}

/// Set workload: `add token` → ok `[token job-id]`; a final `read-all` → ok `[[token job-id] ...]`.
/// Every acknowledged add is in the final read; no token maps to two jobs.
pub fn set(ops: &[Op]) -> CheckResult {
    let mut res = CheckResult::new("job submissions: none lost, none duplicated (CreateJob with an idempotency token)");
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let mut attempted: BTreeSet<String> = BTreeSet::new();
    let mut unknown = 0u64;
    for (inv, done) in pairs(ops, &["add"]) {
        let token = inv.value.as_str().unwrap_or_default().to_string();
        attempted.insert(token.clone());
        match done.map(|d| (d.kind, &d.value)) {
            Some((Type::Ok, v)) => {
                acked.insert(token, v.get(1).and_then(Value::as_str).unwrap_or_default().to_string());
            }
            Some((Type::Fail, _)) => {}
            _ => unknown += 1,
        }
    }
    let reads: Vec<&Op> = ops.iter().filter(|o| o.f == "read-all" && o.kind == Type::Ok).collect();
    let Some(last) = reads.last() else {
        res.anomaly("no final read of the set".into());
        return res;
    };
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for pair in last.value.as_array().into_iter().flatten() {
        let (Some(t), Some(j)) = (pair.get(0).and_then(Value::as_str), pair.get(1).and_then(Value::as_str)) else {
            continue;
        };
        found.entry(t.to_string()).or_default().insert(j.to_string());
    }
    for (token, job) in &acked {
        match found.get(token) {
            None => res.anomaly(format!("lost: {token} was acknowledged as job {job} but is not in the final read")),
            Some(jobs) if !jobs.contains(job) => {
                res.anomaly(format!("{token} was acknowledged as job {job} but reads as {jobs:?}"))
            }
            _ => {}
        }
    }
    for (token, jobs) in &found {
        if jobs.len() > 1 {
            res.anomaly(format!("duplicate: token {token} maps to {} jobs {jobs:?}", jobs.len()));
        }
        if !attempted.contains(token) {
            res.anomaly(format!("unexpected: {token} was never submitted"));
        }
    }
    res.count = attempted.len();
    res.stats.insert("acknowledged".into(), acked.len() as u64);
    res.stats.insert("unknown".into(), unknown);
    res.stats.insert("unknown-but-present".into(), found.keys().filter(|t| !acked.contains_key(*t)).count() as u64);
    res.stats.insert("final-read".into(), found.len() as u64);
    res
}

/// One ObserveJobs client's events: `observe {observer, revision, kind, id, state}`, where kind
/// `snapshot-end` (with `resumed`) starts the live part.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Change {
    revision: u64,
    kind: String,
    id: String,
    state: String,
}

/// Observe workload: after its snapshot, each observer sees changes in revision order, with no
/// duplicates, and any two observers see the same changes in the same order over the revisions both
/// watched (no gaps).
pub fn observe(ops: &[Op]) -> CheckResult {
    let mut res = CheckResult::new("ObserveJobs: one commit order, no gaps or duplicates after the snapshot");
    // observer → segments (a fresh snapshot starts a new one): (start revision, changes)
    let mut segments: BTreeMap<u64, Vec<(u64, Vec<Change>)>> = BTreeMap::new();
    let mut live: BTreeMap<u64, bool> = BTreeMap::new();
    for op in ops.iter().filter(|o| o.f == "observe" && o.kind == Type::Ok) {
        let v = &op.value;
        let observer = v["observer"].as_u64().unwrap_or(0);
        let revision = v["revision"].as_u64().unwrap_or(0);
        let kind = v["kind"].as_str().unwrap_or("").to_string();
        res.count += 1;
        if kind == "snapshot-end" {
            let resumed = v["resumed"].as_bool().unwrap_or(false);
            let segs = segments.entry(observer).or_default();
            if !resumed || segs.is_empty() {
                // A stream that started over sent a fresh snapshot first: its items (all at the
                // snapshot's revision) were taken for live changes until this marker said otherwise.
                if let Some((_, seg)) = segs.last_mut() {
                    while seg.last().is_some_and(|c| c.revision == revision) {
                        seg.pop();
                    }
                }
                segs.push((revision, Vec::new()));
            }
            live.insert(observer, true);
            continue;
        }
        if !live.get(&observer).copied().unwrap_or(false) {
            continue; // snapshot items
        }
        let change = Change {
            revision,
            kind,
            id: v["id"].as_str().unwrap_or("").into(),
            state: v["state"].as_str().unwrap_or("").into(),
        };
        let Some((_, seg)) = segments.get_mut(&observer).and_then(|s| s.last_mut()) else { continue };
        if let Some(last) = seg.last() {
            if change.revision < last.revision {
                res.anomaly(format!(
                    "observer {observer}: revision {} after {} (out of order)",
                    change.revision, last.revision
                ));
            }
            if seg.contains(&change) {
                res.anomaly(format!(
                    "observer {observer}: {} {} at revision {} twice",
                    change.kind, change.id, change.revision
                ));
            }
        }
        seg.push(change);
    }
    let all: Vec<(u64, &(u64, Vec<Change>))> =
        segments.iter().flat_map(|(o, segs)| segs.iter().map(move |s| (*o, s))).collect();
    for (i, (oa, (start_a, a))) in all.iter().enumerate() {
        for (ob, (start_b, b)) in all.iter().skip(i + 1) {
            if oa == ob {
                continue;
            }
            let from = (*start_a).max(*start_b);
            let until = a.last().map_or(0, |c| c.revision).min(b.last().map_or(0, |c| c.revision));
            let window = |s: &[Change]| {
                s.iter().filter(|c| c.revision > from && c.revision <= until).cloned().collect::<Vec<_>>()
            };
            let (wa, wb) = (window(a), window(b));
            if wa != wb {
                let first = wa.iter().zip(&wb).position(|(x, y)| x != y).unwrap_or(wa.len().min(wb.len()));
                res.anomaly(format!(
                    "observers {oa} and {ob} differ over revisions ({from}, {until}]: {} vs {} changes, first difference at #{first}: {:?} vs {:?}",
                    wa.len(),
                    wb.len(),
                    wa.get(first),
                    wb.get(first)
                ));
            }
        }
    }
    res.stats.insert("observers".into(), segments.len() as u64);
    res.stats.insert("segments".into(), all.len() as u64);
    res
}

/// Tasks workload: `containers` samples (ok, value `[[task container agent] ...]`) never show one task
/// in two running containers; the final `tasks` read (`[[task job state] ...]`) shows every task of
/// every acknowledged `submit` Started or Finished, and every acknowledged job with tasks.
pub fn tasks(ops: &[Op]) -> CheckResult {
    let mut res = CheckResult::new("tasks: never in two containers at once; all running or terminal after healing");
    for op in ops.iter().filter(|o| o.f == "containers" && o.kind == Type::Ok) {
        res.count += 1;
        let mut seen: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for row in op.value.as_array().into_iter().flatten() {
            if let (Some(t), Some(c)) = (row.get(0).and_then(Value::as_str), row.get(1).and_then(Value::as_str)) {
                seen.entry(t).or_default().push(c);
            }
        }
        for (task, containers) in seen {
            if containers.len() > 1 {
                res.anomaly(format!(
                    "at {} ms: task {task} runs in {} containers {containers:?}",
                    op.time / 1_000_000,
                    containers.len()
                ));
            }
        }
    }
    let acked: BTreeSet<String> = pairs(ops, &["submit"])
        .into_iter()
        .filter_map(|(_, d)| d.filter(|d| d.kind == Type::Ok).and_then(|d| d.value.as_str().map(str::to_string)))
        .collect();
    let Some(last) = ops.iter().filter(|o| o.f == "tasks" && o.kind == Type::Ok).last() else {
        res.anomaly("no final read of the tasks".into());
        return res;
    };
    let mut jobs_with_tasks = BTreeSet::new();
    for row in last.value.as_array().into_iter().flatten() {
        let (task, job, state) =
            (row[0].as_str().unwrap_or(""), row[1].as_str().unwrap_or(""), row[2].as_str().unwrap_or(""));
        jobs_with_tasks.insert(job.to_string());
        if acked.contains(job) && state != "Started" && state != "Finished" {
            res.anomaly(format!("task {task} of acknowledged job {job} is {state} after healing"));
        }
    }
    for job in acked.difference(&jobs_with_tasks) {
        res.anomaly(format!("acknowledged job {job} has no task after healing"));
    }
    res.stats.insert("acknowledged-jobs".into(), acked.len() as u64);
    res.stats.insert("samples".into(), res.count as u64);
    res
}

/// Runs the checkers whose operations the history holds.
pub fn check_all(ops: &[Op]) -> Vec<CheckResult> {
    let has = |f: &str| ops.iter().any(|o| o.f == f);
    let mut out = Vec::new();
    if has("write") || has("read") {
        out.push(register(ops));
    }
    if has("add") {
        out.push(set(ops));
    }
    if has("observe") {
        out.push(observe(ops));
    }
    if has("submit") || has("containers") {
        out.push(tasks(ops));
    }
    out
}
