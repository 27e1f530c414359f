//! Experiments: a steady state is checked before a fault schedule (no faults if it does not hold),
//! measured during it, and must return within a recovery bound after it — Netflix's ChAP, in small.
//!
//! The steady state is judged from probes: each probe submits a small batch job through the SDK
//! (the same path as users' submissions, retries included) and kills it again; its latency is the
//! submission's. Optionally, a load balancer's registered targets must equal the Started tasks of a
//! job.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::duration::Dur;
use crate::faults::Chaos;
use crate::plan::{self, Plan, Summary};

fn d_interval() -> Dur {
    Dur(Duration::from_millis(250))
}
fn d_p99() -> Dur {
    Dur::secs(2)
}
fn d_before() -> Dur {
    Dur::secs(5)
}
fn d_recovery() -> Dur {
    Dur::secs(60)
}
fn d_window() -> usize {
    8
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteadyState {
    /// Pause between probes.
    #[serde(default = "d_interval")]
    pub probe_interval: Dur,
    /// Bound on the p99 latency of a window of probes.
    #[serde(default = "d_p99")]
    pub max_p99: Dur,
    /// Bound on the failed fraction of a window of probes.
    #[serde(default)]
    pub max_error_rate: f64,
    /// How long the steady state is measured before the faults.
    #[serde(default = "d_before")]
    pub before: Dur,
    /// How long after the faults the steady state has to come back.
    #[serde(default = "d_recovery")]
    pub recovery: Dur,
    /// Probes per judged window.
    #[serde(default = "d_window")]
    pub window: usize,
    /// Registered targets of `target_group` equal the Started tasks' IPs of `job`.
    #[serde(default)]
    pub load_balancer: Option<LbCheck>,
}

impl Default for SteadyState {
    fn default() -> Self {
        SteadyState {
            probe_interval: d_interval(),
            max_p99: d_p99(),
            max_error_rate: 0.0,
            before: d_before(),
            recovery: d_recovery(),
            window: d_window(),
            load_balancer: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbCheck {
    pub job: String,
    pub target_group: String,
    #[serde(default = "d_region")]
    pub region: String,
    /// An AWS-compatible endpoint (moto) instead of AWS's own.
    #[serde(default)]
    pub endpoint_url: Option<String>,
}

fn d_region() -> String {
    "us-east-1".into()
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Probe {
    pub at_ms: u64,
    pub ok: bool,
    pub latency_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PhaseStats {
    pub phase: String,
    pub probes: usize,
    pub errors: usize,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

impl PhaseStats {
    pub fn of(phase: &str, probes: &[Probe]) -> PhaseStats {
        let mut ok: Vec<u64> = probes.iter().filter(|p| p.ok).map(|p| p.latency_ms).collect();
        ok.sort_unstable();
        let q =
            |f: f64| if ok.is_empty() { 0 } else { ok[((ok.len() as f64 * f).ceil() as usize).clamp(1, ok.len()) - 1] };
        PhaseStats {
            phase: phase.into(),
            probes: probes.len(),
            errors: probes.iter().filter(|p| !p.ok).count(),
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            max_ms: ok.last().copied().unwrap_or(0),
        }
    }

    /// Why these probes miss the steady state (None: they meet it).
    pub fn miss(&self, s: &SteadyState) -> Option<String> {
        if self.probes == 0 {
            return Some("no probes".into());
        }
        let rate = self.errors as f64 / self.probes as f64;
        if rate > s.max_error_rate {
            return Some(format!("{} of {} probes failed (bound {})", self.errors, self.probes, s.max_error_rate));
        }
        if self.p99_ms > s.max_p99.0.as_millis() as u64 {
            return Some(format!("p99 {} ms over the {} bound", self.p99_ms, s.max_p99));
        }
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    /// The steady state did not hold before the faults; none were injected.
    Aborted,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub verdict: Verdict,
    pub reason: String,
    pub phases: Vec<PhaseStats>,
    /// From the end of the faults to the first window that met the steady state.
    pub recovered_after_ms: Option<u64>,
    pub faults: Option<Summary>,
}

impl Report {
    pub fn print(&self) {
        if let Some(f) = &self.faults {
            f.print();
        }
        println!("{:<8} {:>7} {:>7} {:>8} {:>8} {:>8}", "phase", "probes", "errors", "p50 ms", "p99 ms", "max ms");
        for p in &self.phases {
            println!("{:<8} {:>7} {:>7} {:>8} {:>8} {:>8}", p.phase, p.probes, p.errors, p.p50_ms, p.p99_ms, p.max_ms);
        }
        if let Some(ms) = self.recovered_after_ms {
            println!("steady state back {ms} ms after the faults ended");
        }
        println!("experiment: {:?} — {}", self.verdict, self.reason);
    }
}

/// Probes until `stop` is set, appending to `out`.
async fn prober(
    client: titus_client::Client,
    interval: Duration,
    started: Instant,
    out: Arc<Mutex<Vec<Probe>>>,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut n = 0u64;
    loop {
        n += 1;
        let t = Instant::now();
        let token = format!("chaos-probe-{}-{n}", rand::random::<u64>());
        let desc = titus_client::JobBuilder::batch("chaos-probe", "titus/busybox:latest", 1)
            .owner("chaos@titus.local")
            .cpu(0.01)
            .memory_mb(8)
            .command(["true"])
            .build();
        let ok = match client.create_job_with_token(desc, &token).await {
            Ok(id) => {
                let _ = client.kill_job(&id).await;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "probe failed");
                false
            }
        };
        let probe =
            Probe { at_ms: started.elapsed().as_millis() as u64, ok, latency_ms: t.elapsed().as_millis() as u64 };
        out.lock().unwrap_or_else(|e| e.into_inner()).push(probe);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.notified() => return,
        }
    }
}

/// Probes for `length` (or `count` probes, whichever comes first) and returns them.
async fn probe_for(client: &titus_client::Client, s: &SteadyState, length: Duration, count: usize) -> Vec<Probe> {
    let started = Instant::now();
    let mut out = Vec::new();
    let sink = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn(prober(client.clone(), s.probe_interval.0, started, sink.clone(), stop.clone()));
    while started.elapsed() < length && sink.lock().unwrap_or_else(|e| e.into_inner()).len() < count {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.notify_one();
    let _ = task.await;
    out.append(&mut sink.lock().unwrap_or_else(|e| e.into_inner()));
    out
}

/// Checks the load balancer part of the steady state.
pub async fn check_lb(client: &titus_client::Client, lb: &LbCheck) -> Result<()> {
    let aws = titus_aws::Aws::connect(&titus_aws::AwsSettings {
        region: lb.region.clone(),
        endpoint_url: lb.endpoint_url.clone(),
        max_attempts: 3,
        calls_per_second: 20.0,
        attempt_timeout: Duration::from_secs(5),
    })
    .await;
    let mut registered: Vec<String> = aws.registered_targets(&lb.target_group).await.map_err(|e| anyhow!("{e}"))?;
    registered.sort();
    let tasks = client
        .find_tasks(&[("jobIds", &lb.job), ("taskStates", "Started")], 1000, "")
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let mut started: Vec<String> =
        tasks.items.iter().filter_map(|t| t.task_context.get("containerIp").cloned()).collect();
    started.sort();
    if registered != started {
        anyhow::bail!("target group holds {registered:?}, the Started tasks are at {started:?}");
    }
    Ok(())
}

/// Why a window of probes (and the load balancer, when the steady state names one) misses the
/// steady state; None when it holds.
async fn judge(client: &titus_client::Client, s: &SteadyState, stats: &PhaseStats) -> Option<String> {
    if let Some(why) = stats.miss(s) {
        return Some(why);
    }
    let lb = s.load_balancer.as_ref()?;
    check_lb(client, lb).await.err().map(|e| format!("load balancer: {e:#}"))
}

/// Runs an experiment: steady state before, the plan's faults with probes during, recovery after.
pub async fn run(chaos: &mut Chaos, plan: &Plan, stop: impl std::future::Future<Output = ()>) -> Report {
    let s = plan.steady_state.clone().unwrap_or_default();
    let client = chaos.client.clone();
    let mut phases = Vec::new();

    let before = PhaseStats::of("before", &probe_for(&client, &s, s.before.0, usize::MAX).await);
    let miss = judge(&client, &s, &before).await;
    phases.push(before);
    if let Some(why) = miss {
        return Report {
            verdict: Verdict::Aborted,
            reason: format!("steady state not met before the faults: {why}"),
            phases,
            recovered_after_ms: None,
            faults: None,
        };
    }

    let started = Instant::now();
    let sink = Arc::new(Mutex::new(Vec::new()));
    let stop_probes = Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn(prober(client.clone(), s.probe_interval.0, started, sink.clone(), stop_probes.clone()));
    let summary = plan::run(chaos, plan, stop).await;
    stop_probes.notify_one();
    let _ = task.await;
    phases.push(PhaseStats::of("during", &sink.lock().unwrap_or_else(|e| e.into_inner())));

    // After: windows of probes until one meets the steady state, within the recovery bound.
    let ended = Instant::now();
    let mut after = Vec::new();
    let mut why = String::from("no window was judged");
    let mut recovered = None;
    while ended.elapsed() < s.recovery.0 {
        let left = s.recovery.0.saturating_sub(ended.elapsed());
        let window = probe_for(&client, &s, left, s.window).await;
        let stats = PhaseStats::of("window", &window);
        after.extend(window);
        match judge(&client, &s, &stats).await {
            None => {
                recovered = Some(ended.elapsed().as_millis() as u64);
                break;
            }
            Some(w) => why = w,
        }
    }
    phases.push(PhaseStats::of("after", &after));
    let (verdict, reason) = match (recovered, summary.ok()) {
        (Some(_), true) => (Verdict::Pass, "steady state held before and came back after the faults".to_string()),
        (Some(_), false) => {
            (Verdict::Fail, "steady state came back, but faults failed to apply or undo (see the summary)".into())
        }
        (None, _) => (Verdict::Fail, format!("steady state not back within {}: {why}", s.recovery)),
    };
    Report { verdict, reason, phases, recovered_after_ms: recovered, faults: Some(summary) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_judged() {
        let s = SteadyState { max_p99: Dur(Duration::from_millis(100)), ..Default::default() };
        let p = |ok, latency_ms| Probe { at_ms: 0, ok, latency_ms };
        assert_eq!(PhaseStats::of("x", &[p(true, 10), p(true, 20)]).miss(&s), None);
        assert!(PhaseStats::of("x", &[p(true, 10), p(false, 20)]).miss(&s).unwrap().contains("1 of 2 probes failed"));
        assert!(PhaseStats::of("x", &[p(true, 10), p(true, 200)]).miss(&s).unwrap().contains("p99 200 ms"));
        assert!(PhaseStats::of("x", &[]).miss(&s).is_some());
        let stats = PhaseStats::of("x", &(1..=100).map(|i| p(true, i)).collect::<Vec<_>>());
        assert_eq!((stats.p50_ms, stats.p99_ms, stats.max_ms), (50, 99, 100));
    }
}
