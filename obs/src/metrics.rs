//! A small Prometheus registry: counters, gauges and histograms, each a family keyed by label
//! values, rendered in the text exposition format (version 0.0.4).
//!
//! Families are registered once (statics in the crates that use them) and updated lock-free per
//! label set after the first use; scrape-time values (e.g. Raft's term) are set by a collector
//! just before rendering.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

/// Label values in the family's label order.
type Key = Vec<String>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug)]
enum Values {
    Counter(BTreeMap<Key, f64>),
    Gauge(BTreeMap<Key, f64>),
    Histogram { buckets: Vec<f64>, series: BTreeMap<Key, (Vec<u64>, f64, u64)> },
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    labels: Vec<String>,
    values: Mutex<Values>,
}

/// A set of metric families, rendered together.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    families: Arc<Mutex<Vec<Arc<Family>>>>,
}

impl Registry {
    fn add(&self, name: &str, help: &str, labels: &[&str], values: Values) -> Arc<Family> {
        let family = Arc::new(Family {
            name: name.to_string(),
            help: help.to_string(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            values: Mutex::new(values),
        });
        lock(&self.families).push(family.clone());
        family
    }

    /// A counter family; `name` should end in `_total`.
    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> Counter {
        Counter(self.add(name, help, labels, Values::Counter(BTreeMap::new())))
    }

    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> Gauge {
        Gauge(self.add(name, help, labels, Values::Gauge(BTreeMap::new())))
    }

    /// A histogram family with these upper bounds (ascending; `+Inf` is added).
    pub fn histogram(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> Histogram {
        Histogram(self.add(
            name,
            help,
            labels,
            Values::Histogram { buckets: buckets.to_vec(), series: BTreeMap::new() },
        ))
    }

    /// The text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in lock(&self.families).iter() {
            let kind = match &*lock(&f.values) {
                Values::Counter(_) => "counter",
                Values::Gauge(_) => "gauge",
                Values::Histogram { .. } => "histogram",
            };
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(&f.help));
            let _ = writeln!(out, "# TYPE {} {kind}", f.name);
            match &*lock(&f.values) {
                Values::Counter(m) | Values::Gauge(m) => {
                    for (key, v) in m {
                        let _ = writeln!(out, "{}{} {}", f.name, labels(&f.labels, key, None), number(*v));
                    }
                }
                Values::Histogram { buckets, series } => {
                    for (key, (counts, sum, count)) in series {
                        let mut cumulative = 0;
                        for (le, c) in buckets.iter().zip(counts) {
                            cumulative += c;
                            let le = number(*le);
                            let _ =
                                writeln!(out, "{}_bucket{} {cumulative}", f.name, labels(&f.labels, key, Some(&le)));
                        }
                        let _ = writeln!(out, "{}_bucket{} {count}", f.name, labels(&f.labels, key, Some("+Inf")));
                        let _ = writeln!(out, "{}_sum{} {}", f.name, labels(&f.labels, key, None), number(*sum));
                        let _ = writeln!(out, "{}_count{} {count}", f.name, labels(&f.labels, key, None));
                    }
                }
            }
        }
        out
    }
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_value(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(names: &[String], values: &[String], le: Option<&str>) -> String {
    let mut parts: Vec<String> =
        names.iter().zip(values).map(|(n, v)| format!("{n}=\"{}\"", escape_value(v))).collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn key(labels: &[&str]) -> Key {
    labels.iter().map(|s| s.to_string()).collect()
}

#[derive(Debug, Clone)]
pub struct Counter(Arc<Family>);

impl Counter {
    pub fn inc(&self, labels: &[&str]) {
        self.add(labels, 1.0);
    }

    pub fn add(&self, labels: &[&str], v: f64) {
        if let Values::Counter(m) = &mut *lock(&self.0.values) {
            *m.entry(key(labels)).or_default() += v.max(0.0);
        }
    }

    /// The current value (for tests and collectors).
    pub fn get(&self, labels: &[&str]) -> f64 {
        match &*lock(&self.0.values) {
            Values::Counter(m) => m.get(&key(labels)).copied().unwrap_or(0.0),
            _ => 0.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Gauge(Arc<Family>);

impl Gauge {
    pub fn set(&self, labels: &[&str], v: f64) {
        if let Values::Gauge(m) = &mut *lock(&self.0.values) {
            m.insert(key(labels), v);
        }
    }

    pub fn value(&self, labels: &[&str]) -> f64 {
        match &*lock(&self.0.values) {
            Values::Gauge(m) => m.get(&key(labels)).copied().unwrap_or(0.0),
            _ => 0.0,
        }
    }

    /// Replaces every series at once (for values computed at scrape time, so that a label set
    /// that no longer exists disappears).
    pub fn replace(&self, series: impl IntoIterator<Item = (Vec<String>, f64)>) {
        if let Values::Gauge(m) = &mut *lock(&self.0.values) {
            *m = series.into_iter().collect();
        }
    }
}

#[derive(Debug, Clone)]
pub struct Histogram(Arc<Family>);

impl Histogram {
    pub fn observe(&self, labels: &[&str], v: f64) {
        if let Values::Histogram { buckets, series } = &mut *lock(&self.0.values) {
            let n = buckets.len();
            let (counts, sum, count) = series.entry(key(labels)).or_insert_with(|| (vec![0; n], 0.0, 0));
            if let Some(i) = buckets.iter().position(|le| v <= *le) {
                counts[i] += 1;
            }
            *sum += v;
            *count += 1;
        }
    }
}

/// Latency buckets in seconds, 1 ms to 30 s.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let r = Registry::default();
        let c = r.counter("x_requests_total", "Requests.", &["method", "code"]);
        let g = r.gauge("x_term", "Raft term.", &[]);
        let h = r.histogram("x_latency_seconds", "Latency.", &["method"], &[0.1, 1.0]);
        c.inc(&["Get", "OK"]);
        c.add(&["Get", "OK"], 2.0);
        g.set(&[], 7.0);
        h.observe(&["Get"], 0.05);
        h.observe(&["Get"], 0.5);
        h.observe(&["Get"], 5.0);
        let text = r.render();
        assert!(
            text.contains("# TYPE x_requests_total counter\nx_requests_total{method=\"Get\",code=\"OK\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("x_term 7\n"), "{text}");
        assert!(text.contains("x_latency_seconds_bucket{method=\"Get\",le=\"0.1\"} 1\n"), "{text}");
        assert!(text.contains("x_latency_seconds_bucket{method=\"Get\",le=\"1\"} 2\n"), "{text}");
        assert!(text.contains("x_latency_seconds_bucket{method=\"Get\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("x_latency_seconds_count{method=\"Get\"} 3\n"), "{text}");
        assert_eq!(c.get(&["Get", "OK"]), 3.0);
    }

    #[test]
    fn label_values_are_escaped() {
        let r = Registry::default();
        let g = r.gauge("x", "h", &["v"]);
        g.set(&["a\"b\\c\nd"], 1.0);
        assert!(r.render().contains(r#"x{v="a\"b\\c\nd"} 1"#));
    }
}
