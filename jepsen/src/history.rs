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

/// Reads a history written as EDN (one map per op, Jepsen's layout) or JSON (an array of ops).
pub fn read(path: &Path) -> Result<Vec<Op>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("history {}", path.display()))
}

pub fn parse(text: &str) -> Result<Vec<Op>> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') && serde_json::from_str::<Value>(trimmed).is_ok() {
        let ops: Vec<Op> = serde_json::from_str(trimmed).context("JSON history: expected an array of ops")?;
        return Ok(ops);
    }
    let values = crate::edn::parse_all(text)?;
    let values = match values.as_slice() {
        [Value::Array(items)] => items.clone(),
        _ => values,
    };
    let mut ops = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        let Value::Object(mut m) = v else { bail!("op {i}: not a map") };
        let process = match m.remove("process") {
            Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
            Some(Value::String(s)) if s == "nemesis" => NEMESIS,
            other => bail!("op {i}: :process {other:?} is not a number or :nemesis"),
        };
        let kind = match m.remove("type") {
            Some(Value::String(s)) => match s.as_str() {
                "invoke" => Type::Invoke,
                "ok" => Type::Ok,
                "fail" => Type::Fail,
                "info" => Type::Info,
                other => bail!("op {i}: :type :{other} is not one of :invoke :ok :fail :info"),
            },
            other => bail!("op {i}: :type {other:?} is missing"),
        };
        let f = match m.remove("f") {
            Some(Value::String(s)) => s,
            other => bail!("op {i}: :f {other:?} is missing"),
        };
        let num = |v: Option<Value>| v.and_then(|v| v.as_u64());
        let index = num(m.remove("index")).unwrap_or(i as u64);
        let time = num(m.remove("time")).unwrap_or(0);
        let error = m.remove("error").map(|e| match e {
            Value::String(s) => s,
            other => other.to_string(),
        });
        ops.push(Op { index, time, process, kind, f, value: m.remove("value").unwrap_or(Value::Null), error });
    }
    Ok(ops)
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
        assert!(parse("{:index 0 :type :bogus :f :read :process 0}").unwrap_err().to_string().contains(":bogus"));
    }
}
