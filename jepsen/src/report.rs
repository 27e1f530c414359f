//! The report folder: `results.json`, `history.edn`, `history.json`, `latency.svg` (each operation's
//! latency over time, nemesis intervals shaded), `throughput.svg` (completions per second by
//! operation) and an `index.html` tying them together.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::checks::{pairs, CheckResult, Verdict};
use crate::history::{to_edn, Op, Type, NEMESIS};

#[derive(Serialize)]
pub struct Results<'a> {
    pub valid: Verdict,
    pub run: &'a serde_json::Value,
    pub checks: &'a [CheckResult],
    pub nemesis: Vec<(f64, f64, String)>,
}

const W: f64 = 900.0;
const H: f64 = 360.0;
const LEFT: f64 = 60.0;
const BOTTOM: f64 = 40.0;
const COLORS: [&str; 6] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf"];

/// (start s, end s, name) of every nemesis interval.
pub fn nemesis_intervals(ops: &[Op]) -> Vec<(f64, f64, String)> {
    let mut out = Vec::new();
    let mut open: Option<(f64, String)> = None;
    for op in ops.iter().filter(|o| o.process == NEMESIS) {
        let t = op.time as f64 / 1e9;
        match (op.f.as_str(), op.kind) {
            ("start", Type::Invoke) => open = Some((t, op.value.as_str().unwrap_or("").to_string())),
            ("stop", Type::Info) => {
                if let Some((s, name)) = open.take() {
                    out.push((s, t, name));
                }
            }
            _ => {}
        }
    }
    if let Some((s, name)) = open {
        out.push((s, ops.last().map_or(s, |o| o.time as f64 / 1e9), name));
    }
    out
}

fn frame(
    svg: &mut String,
    title: &str,
    t_max: f64,
    y_label: &str,
    y_ticks: &[(f64, String)],
    shade: &[(f64, f64, String)],
) {
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        svg,
        r#"<rect width="{W}" height="{H}" fill="white"/><text x="{}" y="14" font-size="13">{}</text>"#,
        LEFT,
        esc(title)
    );
    let x = |t: f64| LEFT + (W - LEFT - 20.0) * t / t_max.max(1e-9);
    for (s, e, name) in shade {
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="20" width="{:.1}" height="{:.1}" fill="#d62728" fill-opacity="0.12"><title>{}</title></rect>"##,
            x(*s),
            (x(*e) - x(*s)).max(1.0),
            H - BOTTOM - 20.0,
            esc(name)
        );
    }
    let _ = write!(
        svg,
        r#"<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{LEFT}" y1="20" x2="{LEFT}" y2="{}" stroke="black"/>"#,
        H - BOTTOM,
        W - 20.0,
        H - BOTTOM,
        H - BOTTOM
    );
    for i in 0..=10 {
        let t = t_max * i as f64 / 10.0;
        let _ = write!(svg, r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0}s</text>"#, x(t), H - BOTTOM + 14.0, t);
    }
    for (y, label) in y_ticks {
        let _ = write!(
            svg,
            r##"<text x="{}" y="{:.1}" text-anchor="end">{}</text><line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/>"##,
            LEFT - 4.0,
            y + 4.0,
            esc(label),
            W - 20.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">{}</text>"#,
        H / 2.0,
        H / 2.0,
        esc(y_label)
    );
}

/// Latency of every completed operation over time (log scale), by operation and outcome.
pub fn latency_svg(ops: &[Op], shade: &[(f64, f64, String)]) -> String {
    let fs: Vec<String> = {
        let mut v: Vec<String> =
            ops.iter().filter(|o| o.kind == Type::Invoke && o.process != NEMESIS).map(|o| o.f.clone()).collect();
        v.sort();
        v.dedup();
        v
    };
    let t_max = t_max(ops);
    let (lo, hi) = (0.1f64, 100_000.0f64); // ms
    let y = |ms: f64| (H - BOTTOM) - (H - BOTTOM - 20.0) * ((ms.clamp(lo, hi) / lo).log10() / (hi / lo).log10());
    let ticks: Vec<(f64, String)> =
        [1.0, 10.0, 100.0, 1000.0, 10_000.0].iter().map(|ms| (y(*ms), format!("{ms} ms"))).collect();
    let mut svg = String::new();
    frame(
        &mut svg,
        "latency by operation (red: nemesis active; ● ok, × fail, ◆ info)",
        t_max,
        "latency (log)",
        &ticks,
        shade,
    );
    let x = |t: f64| LEFT + (W - LEFT - 20.0) * t / t_max.max(1e-9);
    let fs_ref: Vec<&str> = fs.iter().map(String::as_str).collect();
    for (inv, done) in pairs(ops, &fs_ref) {
        let Some(done) = done else { continue };
        let color = COLORS[fs.iter().position(|f| *f == inv.f).unwrap_or(0) % COLORS.len()];
        let (px, py) = (x(done.time as f64 / 1e9), y(done.time.saturating_sub(inv.time) as f64 / 1e6));
        let _ = match done.kind {
            Type::Ok => write!(svg, r#"<circle cx="{px:.1}" cy="{py:.1}" r="1.6" fill="{color}"/>"#),
            Type::Fail => {
                write!(svg, r#"<text x="{px:.1}" y="{:.1}" fill="{color}" text-anchor="middle">×</text>"#, py + 3.0)
            }
            _ => write!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="4" height="4" fill="{color}" transform="rotate(45 {px:.1} {py:.1})"/>"#,
                px - 2.0,
                py - 2.0
            ),
        };
    }
    for (i, f) in fs.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            W - 150.0,
            24.0 + 14.0 * i as f64,
            COLORS[i % COLORS.len()],
            W - 136.0,
            33.0 + 14.0 * i as f64,
            esc(f)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Completions per second by operation.
pub fn throughput_svg(ops: &[Op], shade: &[(f64, f64, String)]) -> String {
    let t_max = t_max(ops);
    let seconds = t_max.ceil() as usize + 1;
    let mut per: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for op in
        ops.iter().filter(|o| o.kind != Type::Invoke && o.process != NEMESIS && o.f != "observe" && o.f != "containers")
    {
        let bucket = ((op.time / 1_000_000_000) as usize).min(seconds - 1);
        per.entry(op.f.clone()).or_insert_with(|| vec![0; seconds])[bucket] += 1;
    }
    let peak = per.values().flat_map(|v| v.iter().copied()).max().unwrap_or(1).max(1) as f64;
    let y = |v: f64| (H - BOTTOM) - (H - BOTTOM - 20.0) * v / peak;
    let ticks: Vec<(f64, String)> =
        (0..=4).map(|i| (y(peak * i as f64 / 4.0), format!("{:.0}", peak * i as f64 / 4.0))).collect();
    let mut svg = String::new();
    frame(&mut svg, "completed operations per second (red: nemesis active)", t_max, "ops/s", &ticks, shade);
    let x = |t: f64| LEFT + (W - LEFT - 20.0) * t / t_max.max(1e-9);
    for (i, (f, counts)) in per.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> =
            counts.iter().enumerate().map(|(s, c)| format!("{:.1},{:.1}", x(s as f64 + 0.5), y(*c as f64))).collect();
        let _ =
            write!(svg, r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#, points.join(" "));
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            W - 150.0,
            24.0 + 14.0 * i as f64,
            W - 136.0,
            33.0 + 14.0 * i as f64,
            esc(f)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The latest time in the history, in seconds (histories from other tools need not be sorted).
fn t_max(ops: &[Op]) -> f64 {
    ops.iter().map(|o| o.time).max().map_or(1.0, |t| t as f64 / 1e9)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Writes the whole folder; returns the checks' merged verdict.
pub fn write(dir: &Path, ops: &[Op], checks: &[CheckResult], run: &serde_json::Value) -> Result<Verdict> {
    std::fs::create_dir_all(dir)?;
    let valid = Verdict::merge(checks);
    let shade = nemesis_intervals(ops);
    std::fs::write(dir.join("history.edn"), to_edn(ops))?;
    std::fs::write(dir.join("history.json"), serde_json::to_vec(ops)?)?;
    std::fs::write(dir.join("latency.svg"), latency_svg(ops, &shade))?;
    std::fs::write(dir.join("throughput.svg"), throughput_svg(ops, &shade))?;
    let results = Results { valid, run, checks, nemesis: shade.clone() };
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(&results)?)?;
    let mut html = String::new();
    let _ = write!(html, "<!doctype html><meta charset=utf-8><title>titus-jepsen</title><style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:left}}.ok{{color:#2ca02c}}.bad{{color:#d62728}}</style>");
    let _ = write!(
        html,
        "<h1>titus-jepsen: <span class={}>{}</span></h1>",
        if valid == Verdict::Valid { "ok" } else { "bad" },
        if valid == Verdict::Valid { "valid".to_string() } else { valid.word().to_uppercase() }
    );
    // The run's parameters in one table; its nemesis log goes last.
    let mut params = run.clone();
    let events = params.as_object_mut().and_then(|m| m.remove("nemesis_events"));
    html.push_str("<table>");
    for (k, v) in params.as_object().into_iter().flatten() {
        let _ = write!(html, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v.to_string()));
    }
    html.push_str("</table>");
    html.push_str("<h2>Checks</h2><table><tr><th>checker</th><th>result</th><th>count</th><th>figures</th><th>anomalies</th></tr>");
    for c in checks {
        let _ = write!(
            html,
            "<tr><td>{}</td><td class={}>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.checker),
            if c.valid == Verdict::Valid { "ok" } else { "bad" },
            c.valid.word(),
            c.count,
            esc(&c.stats.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")),
            esc(&c.anomalies.iter().chain(&c.unchecked).cloned().collect::<Vec<_>>().join("\n"))
        );
    }
    html.push_str("</table><h2>Latency</h2><img src=latency.svg><h2>Throughput</h2><img src=throughput.svg><h2>Nemesis</h2><table><tr><th>from</th><th>to</th><th>fault</th></tr>");
    for (s, e, name) in &shade {
        let _ = write!(html, "<tr><td>{s:.1}s</td><td>{e:.1}s</td><td>{}</td></tr>", esc(name));
    }
    html.push_str("</table>");
    if let Some(serde_json::Value::Array(events)) = events {
        html.push_str("<details><summary>Nemesis log</summary><table>");
        for e in events {
            let _ = write!(
                html,
                "<tr><td>{:.1}s</td><td>{}</td></tr>",
                e["at_ms"].as_f64().unwrap_or(0.0) / 1000.0,
                esc(e["what"].as_str().unwrap_or(""))
            );
        }
        html.push_str("</table></details>");
    }
    html.push_str("<p>History: <a href=history.edn>history.edn</a> (Jepsen's layout), <a href=history.json>history.json</a>; <a href=results.json>results.json</a>.</p>\n");
    std::fs::write(dir.join("index.html"), html)?;
    Ok(valid)
}
