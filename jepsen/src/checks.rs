//! The checkers: each reads a history (whatever produced it) and reports its anomalies.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::edn;
use crate::history::{Op, Type, NEMESIS};
use crate::linear::{self, Outcome, RegKind, RegOp};

/// A checker's answer, as Jepsen's `:valid?`: `true`, `false`, or `:unknown` when the history could
/// not be checked (operations it does not understand, a search that reached its limits). Ordered so
/// that the merge of several is their maximum: an anomaly anywhere makes the whole invalid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    #[default]
    Valid,
    Unknown,
    Invalid,
}

impl Verdict {
    /// The verdict of several checks together.
    pub fn merge(results: &[CheckResult]) -> Verdict {
        results.iter().map(|c| c.valid).max().unwrap_or(Verdict::Valid)
    }

    pub fn word(self) -> &'static str {
        match self {
            Verdict::Valid => "valid",
            Verdict::Unknown => "unknown",
            Verdict::Invalid => "invalid",
        }
    }
}

/// Written as Jepsen's `:valid?` is: `true`, `false` or `"unknown"`.
impl Serialize for Verdict {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Verdict::Valid => s.serialize_bool(true),
            Verdict::Invalid => s.serialize_bool(false),
            Verdict::Unknown => s.serialize_str("unknown"),
        }
    }
}

impl<'de> Deserialize<'de> for Verdict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Verdict, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(true) => Ok(Verdict::Valid),
            Value::Bool(false) => Ok(Verdict::Invalid),
            Value::String(s) if s == "unknown" => Ok(Verdict::Unknown),
            other => Err(serde::de::Error::custom(format!("valid: {other} is not true, false or \"unknown\""))),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckResult {
    pub checker: String,
    pub valid: Verdict,
    /// Operations or events looked at.
    pub count: usize,
    /// What is wrong with the system under test.
    pub anomalies: Vec<String>,
    /// Why (part of) the history could not be checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchecked: Vec<String>,
    /// Figures worth printing (ok/fail/info counts, keys checked).
    pub stats: BTreeMap<String, u64>,
}

impl CheckResult {
    fn new(checker: &str) -> CheckResult {
        CheckResult { checker: checker.into(), ..Default::default() }
    }

    fn anomaly(&mut self, text: String) {
        self.valid = Verdict::Invalid;
        if self.anomalies.len() < 100 {
            self.anomalies.push(text);
        }
    }

    fn cannot_check(&mut self, text: String) {
        self.valid = self.valid.max(Verdict::Unknown);
        if self.unchecked.len() < 100 {
            self.unchecked.push(text);
        }
    }
}

/// How histories are checked.
#[derive(Clone, Debug)]
pub struct Options {
    /// Every register's value before its first operation. Jepsen's registers start as `nil`; our
    /// register workload records each key's creation as a write of 0, so nil suits both.
    pub initial: Value,
    /// How far each key's linearizability search may go.
    pub limits: linear::Limits,
}

impl Default for Options {
    fn default() -> Options {
        Options { initial: Value::Null, limits: linear::Limits::default() }
    }
}

/// Pairs each invocation with its completion (the next op of the same process). An invocation with
/// no completion is treated as `info`. Lenient (for plotting): checkers use [`client_pairs`].
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

/// Like [`pairs`], over the client operations with one of the `f`s, and also the ways the history
/// breaks Jepsen's rules there (a completion with no invocation, a process invoking twice at once, a
/// completion of another `f`): a checker cannot trust what it would build on those.
pub fn client_pairs<'a>(ops: &'a [Op], f: &[&str]) -> (Vec<(&'a Op, Option<&'a Op>)>, Vec<String>) {
    let mut open: HashMap<i64, usize> = HashMap::new();
    let mut out: Vec<(&Op, Option<&Op>)> = Vec::new();
    let mut problems = Vec::new();
    for op in ops.iter().filter(|o| o.process != NEMESIS && f.contains(&o.f.as_str())) {
        if op.kind == Type::Invoke {
            if let Some(i) = open.insert(op.process, out.len()) {
                problems.push(format!(
                    "op {}: process {} invoked again while its op {} was still open",
                    op.index, op.process, out[i].0.index
                ));
            }
            out.push((op, None));
            continue;
        }
        match open.remove(&op.process) {
            Some(i) if out[i].0.f == op.f => out[i].1 = Some(op),
            Some(i) => problems.push(format!(
                "op {}: a :{} completion of process {}'s :{} (op {})",
                op.index, op.f, op.process, out[i].0.f, out[i].0.index
            )),
            None => problems.push(format!("op {}: a completion with no invocation (process {})", op.index, op.process)),
        }
    }
    (out, problems)
}

/// The register operations.
pub const REGISTER_FS: &[&str] = &["read", "write", "cas"];

/// Whether the register operations are keyed as `jepsen.independent` keys them — every invocation's
/// value a `[key value]` pair (a read `[key nil]`, a cas `[key [old new]]`) — rather than one register
/// (a read `nil`, a write `v`, a cas `[old new]`).
fn keyed(invocations: &[(&Op, Option<&Op>)]) -> bool {
    let pair = |v: &Value| v.as_array().is_some_and(|a| a.len() == 2);
    !invocations.is_empty()
        && invocations.iter().all(|(inv, _)| pair(&inv.value) && (inv.f != "cas" || pair(&inv.value[1])))
}

/// An invocation's key (`nil` when not keyed).
fn key_of(inv: &Op, keyed: bool) -> Value {
    match (&inv.value, keyed) {
        (Value::Array(a), true) => a[0].clone(),
        _ => Value::Null,
    }
}

/// One register operation as the search needs it, or `None` when it certainly did not happen
/// (`fail`) or observed nothing known (a read of unknown outcome).
fn register_op(inv: &Op, done: Option<&Op>, keyed: bool) -> Result<Option<RegOp<Value>>, String> {
    let outcome = done.map_or(Type::Info, |d| d.kind);
    if outcome == Type::Fail || (inv.f == "read" && outcome != Type::Ok) {
        return Ok(None);
    }
    let key = key_of(inv, keyed);
    let arg = match &inv.value {
        Value::Array(a) if keyed => &a[1],
        v => v,
    };
    let kind = match inv.f.as_str() {
        "read" => {
            let got = done.map_or(&Value::Null, |d| &d.value);
            match got {
                _ if !keyed => RegKind::Read(got.clone()),
                Value::Array(a) if a.len() == 2 && edn::canonical(&a[0]) == edn::canonical(&key) => {
                    RegKind::Read(a[1].clone())
                }
                other => {
                    return Err(format!(
                        "op {}: an ok read of key {} returned {}, not [key value]",
                        inv.index,
                        edn::write(&key),
                        edn::write(other)
                    ))
                }
            }
        }
        "write" => RegKind::Write(arg.clone()),
        "cas" => match arg {
            Value::Array(a) if a.len() == 2 => RegKind::Cas(a[0].clone(), a[1].clone()),
            other => return Err(format!("op {}: a cas of {}, not [old new]", inv.index, edn::write(other))),
        },
        other => return Err(format!("op {}: :{other} is not a register operation", inv.index)),
    };
    let ret = match (outcome, done) {
        (Type::Ok, Some(d)) => d.time,
        _ => u64::MAX,
    };
    Ok(Some(RegOp { call: inv.time, ret, kind, id: inv.index }))
}

/// One key's operations, with values of any type.
#[derive(Default)]
pub struct KeyOps {
    pub key: Value,
    pub ops: Vec<RegOp<Value>>,
    /// Why this key cannot be checked, if it cannot.
    pub broken: Option<String>,
}

/// The register operations by key (by its canonical text), in history order; and whether the
/// history is keyed. Counts go into `res.stats`, what cannot be read into `res.unchecked`.
pub fn register_keys(ops: &[Op], res: &mut CheckResult) -> (BTreeMap<String, KeyOps>, bool) {
    let (pairs, problems) = client_pairs(ops, REGISTER_FS);
    for p in problems {
        res.cannot_check(p);
    }
    let keyed = keyed(&pairs);
    let mut by_key: BTreeMap<String, KeyOps> = BTreeMap::new();
    for (inv, done) in &pairs {
        let outcome = done.map_or(Type::Info, |d| d.kind);
        *res.stats.entry(format!("{}-{}", inv.f, outcome_name(outcome))).or_default() += 1;
        let key = key_of(inv, keyed);
        let entry = by_key.entry(edn::canonical(&key)).or_insert_with(|| KeyOps { key, ..Default::default() });
        match register_op(inv, *done, keyed) {
            Ok(Some(op)) => entry.ops.push(op),
            Ok(None) => {}
            Err(e) => {
                res.cannot_check(e.clone());
                entry.broken.get_or_insert(e);
            }
        }
    }
    (by_key, keyed)
}

fn outcome_name(t: Type) -> &'static str {
    match t {
        Type::Invoke => "invoke",
        Type::Ok => "ok",
        Type::Fail => "fail",
        Type::Info => "info",
    }
}

/// Replaces values by dense ids (the initial value's is returned), so that the search works on
/// `u32`s whatever the values are; equal values (by canonical text) get one id.
pub fn intern(ops: &[RegOp<Value>], initial: &Value) -> (Vec<RegOp>, u32) {
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut id = |v: &Value| {
        let next = ids.len() as u32;
        *ids.entry(edn::canonical(v)).or_insert(next)
    };
    let init = id(initial);
    let interned = ops
        .iter()
        .map(|o| RegOp {
            call: o.call,
            ret: o.ret,
            id: o.id,
            kind: match &o.kind {
                RegKind::Read(v) => RegKind::Read(id(v)),
                RegKind::Write(v) => RegKind::Write(id(v)),
                RegKind::Cas(a, b) => RegKind::Cas(id(a), id(b)),
            },
        })
        .collect();
    (interned, init)
}

/// Register workload — ours (`write [key v]`, `read [key v]`; keys are job ids) or Jepsen's (`:read`,
/// `:write`, `:cas [old new]`, one register or keyed by `jepsen.independent`): each key a register
/// starting at `opts.initial`, checked for linearizability key by key. A `fail` certainly did not
/// happen; an `info` write or cas may take effect at any time after its invocation, or never.
pub fn register(ops: &[Op], opts: &Options) -> CheckResult {
    let mut res = CheckResult::new(&format!(
        "linearizable register per key (read, write, cas; initially {}; ours: UpdateJobCapacity desired / FindJob)",
        edn::write(&opts.initial)
    ));
    let (by_key, keyed) = register_keys(ops, &mut res);
    let mut peak = 0;
    let mut pruned = 0;
    for k in by_key.values() {
        let label = match (&k.key, keyed) {
            (_, false) => "the register".to_string(),
            (Value::String(s), true) => format!("key {s}"),
            (other, true) => format!("key {}", edn::write(other)),
        };
        if let Some(why) = &k.broken {
            res.cannot_check(format!("{label}: not checked ({why})"));
            continue;
        }
        res.count += k.ops.len();
        let (interned, init) = intern(&k.ops, &opts.initial);
        let (outcome, stats) = linear::check_with(&interned, init, &opts.limits);
        peak = peak.max(stats.configs);
        pruned += stats.pruned;
        match outcome {
            Outcome::Linearizable => {}
            Outcome::NotLinearizable { stuck_at } => res.anomaly(format!(
                "{label}: not linearizable ({} ops); no order gets past the op at index {stuck_at}{}",
                k.ops.len(),
                completion_of(ops, stuck_at).map_or(String::new(), |d| format!(" ({})", describe(d)))
            )),
            Outcome::GaveUp { reason } => res.cannot_check(format!("{label}: {reason} ({} ops)", k.ops.len())),
        }
    }
    res.stats.insert("keys".into(), by_key.len() as u64);
    res.stats.insert("unknown-ops-pruned".into(), pruned as u64);
    res.stats.insert("peak-configurations".into(), peak as u64);
    res
}

/// The completion of the invocation at history index `index` (or the invocation, if it has none).
fn completion_of(ops: &[Op], index: u64) -> Option<&Op> {
    let at = ops.iter().position(|o| o.index == index)?;
    let inv = &ops[at];
    let done = ops[at + 1..].iter().find(|o| o.process == inv.process && o.f == inv.f);
    Some(done.filter(|d| d.kind != Type::Invoke).unwrap_or(inv))
}

/// `ok read ["k" 1] (op 9, process 2)`: an op in a few words.
fn describe(o: &Op) -> String {
    format!("{} {} {} at index {}, process {}", outcome_name(o.kind), o.f, edn::write(&o.value), o.index, o.process)
}

/// Set workload: `add token` → ok `[token job-id]`; a final `read-all` → ok `[[token job-id] ...]`.
/// Every acknowledged add is in the final read; no token maps to two jobs.
pub fn set(ops: &[Op]) -> CheckResult {
    let mut res = CheckResult::new("job submissions: none lost, none duplicated (CreateJob with an idempotency token)");
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let mut attempted: BTreeSet<String> = BTreeSet::new();
    let mut unknown = 0u64;
    for (inv, done) in pairs(ops, &["add"]) {
        // Ours add token strings; Jepsen's set tests add numbers and end with a `:read`, which this
        // checker does not read.
        let Some(token) = inv.value.as_str().map(str::to_string) else {
            res.cannot_check(format!(
                "op {}: an add of {}, not a token string (this checker reads our set workload only)",
                inv.index,
                edn::write(&inv.value)
            ));
            continue;
        };
        attempted.insert(token.clone());
        match done.map(|d| (d.kind, &d.value)) {
            Some((Type::Ok, v)) => {
                acked.insert(token, v.get(1).and_then(Value::as_str).unwrap_or_default().to_string());
            }
            Some((Type::Fail, _)) => {}
            _ => unknown += 1,
        }
    }
    if res.valid == Verdict::Unknown {
        return res;
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

/// How long after an acknowledged kill a task's container may still run (the stop itself takes
/// under a second; the rest is room for a fault between the control plane and the agent).
pub const KILL_SETTLE_NS: u64 = 60_000_000_000;

/// Kill-during-launch workload: `launch` → ok job id, `kill` of that job, `containers` samples during
/// the run, the final `killed-tasks` read (`[task job state]`) and `containers-final` samples after
/// it. Checked: every task of a launched (and so killed) job is Finished after healing; none of them
/// runs in any final sample; none runs in a sample taken more than [`KILL_SETTLE_NS`] after its job's
/// kill was acknowledged.
pub fn kills(ops: &[Op]) -> CheckResult {
    let mut res = CheckResult::new("kill during launch: no container runs for a killed task");
    let launched: BTreeSet<&str> =
        ops.iter().filter(|o| o.f == "launch" && o.kind == Type::Ok).filter_map(|o| o.value.as_str()).collect();
    let mut killed_at: HashMap<&str, u64> = HashMap::new();
    for o in ops.iter().filter(|o| o.f == "kill" && o.kind == Type::Ok) {
        if let Some(job) = o.value.as_str() {
            killed_at.entry(job).or_insert(o.time);
        }
    }
    let Some(last) = ops.iter().filter(|o| o.f == "killed-tasks" && o.kind == Type::Ok).last() else {
        res.cannot_check("no final read of the killed jobs' tasks (killed-tasks)".into());
        return res;
    };
    let mut job_of: HashMap<&str, &str> = HashMap::new();
    for row in last.value.as_array().into_iter().flatten() {
        let field = |i: usize| row.get(i).and_then(Value::as_str).unwrap_or("");
        let (task, job, state) = (field(0), field(1), field(2));
        job_of.insert(task, job);
        if launched.contains(job) && state != "Finished" {
            res.anomaly(format!("task {task} of killed job {job} is {state} after healing"));
        }
    }
    let finals: Vec<&Op> = ops.iter().filter(|o| o.f == "containers-final").collect();
    if !finals.iter().any(|o| o.kind == Type::Ok) {
        res.cannot_check("no final sample of the containers (containers-final) succeeded".into());
    }
    for o in ops.iter().filter(|o| (o.f == "containers" || o.f == "containers-final") && o.kind == Type::Ok) {
        res.count += 1;
        for row in o.value.as_array().into_iter().flatten() {
            let field = |i: usize| row.get(i).and_then(Value::as_str).unwrap_or("");
            let (task, container, agent) = (field(0), field(1), field(2));
            let Some(job) = job_of.get(task).copied().filter(|j| launched.contains(j)) else { continue };
            if o.f == "containers-final" {
                res.anomaly(format!(
                    "at {} ms, after healing: task {task} of killed job {job} runs in container {container} on {agent}",
                    o.time / 1_000_000
                ));
            } else if let Some(k) = killed_at.get(job).filter(|k| o.time > **k + KILL_SETTLE_NS) {
                res.anomaly(format!(
                    "at {} ms: task {task} of job {job} runs in container {container} on {agent} {} s after its kill was acknowledged",
                    o.time / 1_000_000,
                    (o.time - k) / 1_000_000_000
                ));
            }
        }
    }
    // How many of them got as far as a running container: the launches the kills interrupted.
    let mut ran: BTreeSet<&str> = BTreeSet::new();
    for o in ops.iter().filter(|o| o.f == "containers" && o.kind == Type::Ok) {
        for row in o.value.as_array().into_iter().flatten() {
            if let Some(task) = row.get(0).and_then(Value::as_str).filter(|t| job_of.contains_key(t)) {
                ran.insert(task);
            }
        }
    }
    res.stats.insert("tasks-seen-running".into(), ran.len() as u64);
    res.stats.insert("launched".into(), launched.len() as u64);
    res.stats.insert("kills-acknowledged".into(), killed_at.len() as u64);
    res.stats.insert("tasks".into(), job_of.len() as u64);
    res.stats.insert("final-samples".into(), finals.len() as u64);
    res
}

/// AWS workload: `leader` observations (`[replica leader term]`, each replica asked every 100 ms)
/// and every call the fault proxy saw (`aws-call`: `[replica action mutation?]`), under the
/// nemesis's partitions (`start` info values `[name what impaired]`, impaired being the replicas cut
/// off from a majority). Checked: from the moment a replica outside the cut-off side is seen
/// leading until the partition is healed, no cut-off replica makes an AWS mutation — a leader
/// partitioned from its followers stops acting once it could have been replaced. (Sound: while it
/// is cut off a replica cannot be elected, so nothing it does after another leads is legitimate.)
pub fn fenced(ops: &[Op]) -> CheckResult {
    let mut res = CheckResult::new("fenced leader duties: no AWS mutation from a replica cut off while another leads");
    let field = |v: &Value, i: usize| v.get(i).and_then(Value::as_u64);
    // Partition intervals: (from, to, name, cut-off replicas).
    let mut intervals: Vec<(u64, u64, String, BTreeSet<u64>)> = Vec::new();
    let mut open: Option<(u64, String, BTreeSet<u64>)> = None;
    for op in ops.iter().filter(|o| o.process == NEMESIS) {
        match (op.f.as_str(), op.kind) {
            ("start", Type::Info) => {
                let name = op.value.get(0).and_then(Value::as_str).unwrap_or("").to_string();
                let cut: BTreeSet<u64> =
                    op.value.get(2).and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_u64).collect();
                open = name.starts_with("partition").then_some((op.time, name, cut));
            }
            // The heal begins once the stop is invoked.
            ("stop", Type::Invoke) => {
                if let Some((from, name, cut)) = open.take() {
                    intervals.push((from, op.time, name, cut));
                }
            }
            _ => {}
        }
    }
    let leaders: Vec<(u64, u64, u64)> = ops
        .iter()
        .filter(|o| o.f == "leader" && o.kind == Type::Ok)
        .filter_map(|o| Some((o.time, field(&o.value, 1)?, field(&o.value, 2)?)))
        .collect();
    let calls: Vec<(&Op, u64, &str, bool)> = ops
        .iter()
        .filter(|o| o.f == "aws-call" && o.kind == Type::Ok)
        .filter_map(|o| {
            let action = o.value.get(1).and_then(Value::as_str).unwrap_or("");
            Some((o, field(&o.value, 0)?, action, o.value.get(2).and_then(Value::as_bool).unwrap_or(true)))
        })
        .collect();
    res.count = calls.len();
    let mut watched = 0u64;
    for (from, to, name, cut) in intervals.iter().filter(|i| !i.3.is_empty()) {
        // The first leader seen on the majority side while the partition holds.
        let Some(&(seen, leader, term)) =
            leaders.iter().find(|(t, l, _)| t >= from && t <= to && *l != 0 && !cut.contains(l))
        else {
            continue;
        };
        watched += 1;
        for (op, replica, action, mutation) in &calls {
            if *mutation && cut.contains(replica) && op.time > seen && op.time <= *to {
                res.anomaly(format!(
                    "at {} ms: replica {replica}, cut off by {name}, called {action} {} ms after replica {leader} was seen leading (term {term})",
                    op.time / 1_000_000,
                    (op.time - seen) / 1_000_000
                ));
            }
        }
    }
    let mutations = calls.iter().filter(|c| c.3).count();
    res.stats.insert("aws-calls".into(), calls.len() as u64);
    res.stats.insert("aws-mutations".into(), mutations as u64);
    res.stats.insert("partitions-with-a-new-leader".into(), watched);
    res.stats.insert("leader-observations".into(), leaders.len() as u64);
    if mutations == 0 {
        res.cannot_check("no AWS mutation was seen at all: nothing shows the duties were fenced".into());
    }
    res
}

/// A checker and the operations it reads.
struct Checker {
    /// Operations whose presence calls for it.
    triggers: &'static [&'static str],
    /// Operations it reads.
    reads: &'static [&'static str],
    run: fn(&[Op], &Options) -> CheckResult,
}

const CHECKERS: &[Checker] = &[
    // A history with reads but no write or cas is no register history (Jepsen's set tests end with
    // a `:read`): its reads are reported as not understood rather than checked as a register.
    Checker { triggers: &["write", "cas"], reads: REGISTER_FS, run: register },
    Checker { triggers: &["add", "read-all"], reads: &["add", "read-all"], run: |ops, _| set(ops) },
    Checker { triggers: &["observe"], reads: &["observe"], run: |ops, _| observe(ops) },
    Checker { triggers: &["submit", "tasks"], reads: &["submit", "containers", "tasks"], run: |ops, _| tasks(ops) },
    Checker {
        triggers: &["launch", "kill", "killed-tasks", "containers-final"],
        reads: &["launch", "kill", "killed-tasks", "containers", "containers-final"],
        run: |ops, _| kills(ops),
    },
    Checker { triggers: &["aws-call"], reads: &["aws-call", "leader"], run: |ops, _| fenced(ops) },
];

/// Runs the checkers whose operations the history holds. Client operations that none of them reads
/// make one more result, `unknown`: an operation no checker understands is never skipped silently
/// (nemesis operations are not checked).
pub fn check_all(ops: &[Op], opts: &Options) -> Vec<CheckResult> {
    let fs: BTreeSet<&str> = ops.iter().filter(|o| o.process != NEMESIS).map(|o| o.f.as_str()).collect();
    let mut out = Vec::new();
    let mut read: BTreeSet<&str> = BTreeSet::new();
    for c in CHECKERS.iter().filter(|c| c.triggers.iter().any(|f| fs.contains(f))) {
        out.push((c.run)(ops, opts));
        read.extend(c.reads);
    }
    let mut unread: BTreeMap<&str, usize> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.process != NEMESIS && !read.contains(o.f.as_str())) {
        *unread.entry(o.f.as_str()).or_default() += 1;
    }
    if !unread.is_empty() {
        let mut res = CheckResult::new("operations no checker understands");
        for (f, n) in &unread {
            let hint = if REGISTER_FS.contains(f) { " (a register history needs a :write or :cas)" } else { "" };
            res.cannot_check(format!(":{f}: {n} ops not checked{hint}"));
            res.stats.insert(f.to_string(), *n as u64);
        }
        res.count = unread.values().sum();
        out.push(res);
    }
    out
}
