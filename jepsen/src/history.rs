//! Histories with Jepsen's semantics: every operation is an `invoke` followed by its completion —
//! `ok` (it happened), `fail` (it certainly did not), or `info` (unknown: a timeout, a lost
//! connection; it may or may not have happened, now or later). A process whose operation ended
//! `info` is never reused: the client continues as a new process, as in Jepsen.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Type {
    Invoke,
    Ok,
    Fail,
    Info,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Invoke => "invoke",
            Type::Ok => "ok",
            Type::Fail => "fail",
            Type::Info => "info",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub index: u64,
    /// Nanoseconds since the test started.
    pub time: u64,
    /// The client process; `nemesis` operations use process -1.
    pub process: i64,
    #[serde(rename = "type")]
    pub kind: Type,
    pub f: String,
    #[serde(default)]
    pub value: Value,
    /// Why an operation failed or is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub const NEMESIS: i64 = -1;

/// The outcome of a client call, classified.
pub fn classify(e: &titus_client::Error) -> Type {
    use titus_client::Error as E;
    match e {
        E::InvalidArgument { .. }
        | E::NotFound(_)
        | E::AlreadyExists(_)
        | E::FailedPrecondition(_)
        | E::BadSeed(_)
        | E::NoSeeds => Type::Fail,
        // Unavailable after retries, a deadline, any other status: it may have been applied.
        E::Unavailable { .. } | E::Server { .. } => Type::Info,
    }
}

/// A history being recorded by many tasks at once.
#[derive(Clone)]
pub struct Recorder {
    inner: std::sync::Arc<std::sync::Mutex<Vec<Op>>>,
    start: std::time::Instant,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder { inner: Default::default(), start: std::time::Instant::now() }
    }

    pub fn elapsed_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn record(&self, process: i64, kind: Type, f: &str, value: Value, error: Option<String>) {
        let time = self.elapsed_ns();
        let mut ops = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let index = ops.len() as u64;
        ops.push(Op { index, time, process, kind, f: f.to_string(), value, error });
    }

    pub fn ops(&self) -> Vec<Op> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The time of `at` on this history's clock (0 for an instant before it started).
    pub fn time_of(&self, at: std::time::Instant) -> u64 {
        at.saturating_duration_since(self.start).as_nanos() as u64
    }

    /// Adds completed ops observed elsewhere at known times (AWS calls seen by the fault proxy),
    /// each `(time, process, f, value)` in its place by time; the history is renumbered.
    pub fn insert_timed(&self, ops: Vec<(u64, i64, &str, Value)>) {
        let mut all = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        all.extend(ops.into_iter().map(|(time, process, f, value)| Op {
            index: 0,
            time,
            process,
            kind: Type::Ok,
            f: f.to_string(),
            value,
            error: None,
        }));
        // Stable: ops of one time keep the order they were recorded in.
        all.sort_by_key(|o| o.time);
        for (i, o) in all.iter_mut().enumerate() {
            o.index = i as u64;
        }
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

/// One line per op, as Jepsen writes `history.edn`: `{:index 0, :time 12, :type :invoke, ...}`.
pub fn to_edn(ops: &[Op]) -> String {
    let mut out = String::new();
    for op in ops {
        out.push_str(&format!(
            "{{:index {}, :time {}, :type :{}, :process {}, :f :{}, :value {}",
            op.index,
            op.time,
            op.kind.name(),
            if op.process == NEMESIS { ":nemesis".to_string() } else { op.process.to_string() },
            op.f,
            crate::edn::write(&op.value)
        ));
        if let Some(e) = &op.error {
            out.push_str(&format!(", :error {}", crate::edn::write(&Value::String(e.clone()))));
        }
        out.push_str("}\n");
    }
    out
}

/// Reads a history written as EDN (Jepsen's layout: one op per line, or one vector of ops; plain
/// maps or `#jepsen.history.Op{...}` records) or JSON (an array of ops).
pub fn read(path: &Path) -> Result<Vec<Op>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("history {}", path.display()))
}

/// Parses a history. When any op has no `:time`, every op's time is its position in the history
/// instead: Jepsen orders histories in real time, and a missing time read as 0 would make every
/// operation concurrent with every other (and almost anything linearizable).
pub fn parse(text: &str) -> Result<Vec<Op>> {
    let trimmed = text.trim_start();
    let values = match serde_json::from_str::<Value>(trimmed) {
        Ok(Value::Array(items)) if trimmed.starts_with('[') => items,
        _ => {
            let values = crate::edn::parse_all(text)?;
            match <[Value; 1]>::try_from(values) {
                Ok([Value::Array(items)]) => items,
                Ok([one]) => vec![one],
                Err(values) => values,
            }
        }
    };
    let mut ops = Vec::with_capacity(values.len());
    let mut all_timed = true;
    for (i, v) in values.into_iter().enumerate() {
        let (op, timed) = op_from(i, v).with_context(|| format!("op {i} (counting from 0)"))?;
        all_timed &= timed;
        ops.push(op);
    }
    if !all_timed {
        for (i, op) in ops.iter_mut().enumerate() {
            op.time = i as u64;
        }
    }
    Ok(ops)
}

/// One op from its map (EDN keywords and JSON keys read alike); also whether it had a `:time`.
fn op_from(i: usize, v: Value) -> Result<(Op, bool)> {
    let Value::Object(mut m) = v else { bail!("not a map: {}", crate::edn::write(&v)) };
    let process = match m.remove("process") {
        Some(Value::Number(n)) => n.as_i64().with_context(|| format!(":process {n} is not an integer"))?,
        Some(Value::String(s)) if s == "nemesis" => NEMESIS,
        other => bail!(":process {} is not a number or :nemesis", show(other)),
    };
    let kind = match m.remove("type") {
        Some(Value::String(s)) => match s.as_str() {
            "invoke" => Type::Invoke,
            "ok" => Type::Ok,
            "fail" => Type::Fail,
            "info" => Type::Info,
            other => bail!(":type :{other} is not one of :invoke :ok :fail :info"),
        },
        other => bail!(":type {} is not one of :invoke :ok :fail :info", show(other)),
    };
    let f = match m.remove("f") {
        Some(Value::String(s)) => s,
        other => bail!(":f {} is not a keyword", show(other)),
    };
    let index = match m.remove("index") {
        None | Some(Value::Null) => i as u64,
        Some(v) => v.as_u64().with_context(|| format!(":index {} is not a natural number", crate::edn::write(&v)))?,
    };
    let time = match m.remove("time") {
        None | Some(Value::Null) => None,
        Some(v) => {
            Some(v.as_u64().with_context(|| format!(":time {} is not a natural number", crate::edn::write(&v)))?)
        }
    };
    let error = m.remove("error").map(|e| match e {
        Value::String(s) => s,
        other => crate::edn::write(&other),
    });
    let value = m.remove("value").unwrap_or(Value::Null);
    Ok((Op { index, time: time.unwrap_or(0), process, kind, f, value, error }, time.is_some()))
}

fn show(v: Option<Value>) -> String {
    v.map_or_else(|| "missing".to_string(), |v| crate::edn::write(&v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn edn_and_json_round_trip() {
        let ops = vec![
            Op {
                index: 0,
                time: 5,
                process: 0,
                kind: Type::Invoke,
                f: "write".into(),
                value: json!(["job-1", 3]),
                error: None,
            },
            Op {
                index: 1,
                time: 9,
                process: 0,
                kind: Type::Info,
                f: "write".into(),
                value: json!(["job-1", 3]),
                error: Some("deadline \"x\"".into()),
            },
            Op {
                index: 2,
                time: 10,
                process: NEMESIS,
                kind: Type::Info,
                f: "start".into(),
                value: json!("partition halves"),
                error: None,
            },
            Op {
                index: 3,
                time: 11,
                process: 1,
                kind: Type::Ok,
                f: "read".into(),
                value: json!([["t-1", "job-9"], null, {"a": 1.5}]),
                error: None,
            },
        ];
        let edn = to_edn(&ops);
        assert!(
            edn.starts_with("{:index 0, :time 5, :type :invoke, :process 0, :f :write, :value [\"job-1\" 3]}"),
            "{edn}"
        );
        assert_eq!(parse(&edn).unwrap(), ops);
        assert_eq!(parse(&serde_json::to_string(&ops).unwrap()).unwrap(), ops);
        let e = format!("{:#}", parse("{:index 0 :type :bogus :f :read :process 0}").unwrap_err());
        assert!(e.contains(":bogus") && e.contains("op 0"), "{e}");
    }

    #[test]
    fn jepsen_records_and_vectors() {
        let text = "[#jepsen.history.Op{:index 7, :time 10, :type :invoke, :process 3, :f :read, :value nil}\n\
                     #jepsen.history.Op{:index 8, :time 12, :type :ok, :process 3, :f :read, :value 4, :error [:x 1]}\n\
                     {:type :info, :process :nemesis, :f :start, :value :jepsen.nemesis/partition, :time 13}]";
        let ops = parse(text).unwrap();
        assert_eq!(ops.len(), 3);
        assert_eq!((ops[0].index, ops[0].time, ops[0].process, ops[0].kind), (7, 10, 3, Type::Invoke));
        assert_eq!((ops[1].value.clone(), ops[1].error.clone()), (json!(4), Some("[\"x\" 1]".to_string())));
        assert_eq!(
            (ops[2].index, ops[2].process, ops[2].value.clone()),
            (2, NEMESIS, json!("jepsen.nemesis/partition"))
        );
    }

    #[test]
    fn a_missing_time_orders_by_position() {
        let ops =
            parse("{:type :invoke, :f :read, :process 0, :time 50}\n{:type :ok, :f :read, :process 0}\n").unwrap();
        assert_eq!(ops.iter().map(|o| o.time).collect::<Vec<_>>(), vec![0, 1]);
        let ops = parse("{:type :invoke, :f :read, :process 0, :time 50}\n{:type :ok, :f :read, :process 0, :time 70}")
            .unwrap();
        assert_eq!(ops.iter().map(|o| o.time).collect::<Vec<_>>(), vec![50, 70]);
        for bad in [
            "{:type :ok, :f :read, :process 0, :time -1}",
            "{:type :ok, :f :read, :process :x}",
            "{:type :ok, :process 1}",
            "[1]",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
