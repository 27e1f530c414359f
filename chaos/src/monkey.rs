//! The chaos monkey: terminates random running tasks of jobs that opted in (job attribute
//! `chaos.monkey.enabled=true`), only inside a schedule, at a configured rate, and at most N per job
//! per day. Every action (or, in dry-run mode, every would-be action) is logged as a JSON line.
//!
//! A terminated task is evicted (`EvictTask`) without shrinking its job, so a service job replaces
//! it: the monkey proves the job survives losing an instance, as Netflix's Chaos Monkey did for
//! ASGs. An eviction honors the job's disruption budget: one the budget holds back is logged as
//! `held` with the reason, and not counted against the day's limit.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::journal::now_unix_ms;

pub const OPT_IN_ATTRIBUTE: &str = "chaos.monkey.enabled";

/// Days of the week and a time-of-day window, in UTC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Monday first.
    pub days: [bool; 7],
    pub from_min: u32,
    pub to_min: u32,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl std::str::FromStr for Schedule {
    type Err = String;
    /// `always`, or `<days> <HH:MM>-<HH:MM>` with days `daily`, `Mon-Fri` or `Mon,Wed,Fri` (UTC).
    fn from_str(text: &str) -> Result<Schedule, String> {
        let t = text.trim();
        if t == "always" {
            return Ok(Schedule { days: [true; 7], from_min: 0, to_min: 24 * 60 });
        }
        let (days_text, hours) = t
            .split_once(' ')
            .ok_or_else(|| format!("schedule {t:?}: expected `always` or e.g. `Mon-Fri 09:00-17:00` (UTC)"))?;
        let day = |s: &str| {
            DAYS.iter()
                .position(|d| d.eq_ignore_ascii_case(s))
                .ok_or_else(|| format!("schedule {t:?}: unknown day {s:?}"))
        };
        let mut days = [false; 7];
        if days_text.eq_ignore_ascii_case("daily") {
            days = [true; 7];
        } else {
            for part in days_text.split(',') {
                match part.split_once('-') {
                    Some((a, b)) => {
                        let (a, b) = (day(a)?, day(b)?);
                        let mut i = a;
                        loop {
                            days[i] = true;
                            if i == b {
                                break;
                            }
                            i = (i + 1) % 7;
                        }
                    }
                    None => days[day(part)?] = true,
                }
            }
        }
        let minutes = |s: &str| -> Result<u32, String> {
            let (h, m) = s.split_once(':').ok_or_else(|| format!("schedule {t:?}: time {s:?} is not HH:MM"))?;
            let (h, m): (u32, u32) = (
                h.parse().map_err(|_| format!("schedule {t:?}: bad hour {h:?}"))?,
                m.parse().map_err(|_| format!("schedule {t:?}: bad minute {m:?}"))?,
            );
            if h > 24 || m > 59 || (h == 24 && m > 0) {
                return Err(format!("schedule {t:?}: time {s:?} is out of range"));
            }
            Ok(h * 60 + m)
        };
        let (from, to) = hours
            .trim()
            .split_once('-')
            .ok_or_else(|| format!("schedule {t:?}: expected a window like 09:00-17:00"))?;
        let (from_min, to_min) = (minutes(from)?, minutes(to)?);
        if from_min >= to_min {
            return Err(format!("schedule {t:?}: the window ends before it starts"));
        }
        Ok(Schedule { days, from_min, to_min })
    }
}

impl Schedule {
    /// Whether `unix_ms` (UTC) falls inside the schedule.
    pub fn contains(&self, unix_ms: u64) -> bool {
        let secs = unix_ms / 1000;
        let day = secs / 86_400;
        // 1970-01-01 was a Thursday (index 3, Monday first).
        let weekday = ((day + 3) % 7) as usize;
        let minute = ((secs % 86_400) / 60) as u32;
        self.days[weekday] && minute >= self.from_min && minute < self.to_min
    }
}

#[derive(Clone, Debug)]
pub struct MonkeyConfig {
    pub schedule: Schedule,
    /// Expected terminations per opted-in job per hour while inside the schedule.
    pub kills_per_hour: f64,
    pub max_per_job_per_day: u32,
    pub tick: Duration,
    /// Stops by itself after this long.
    pub run_for: Duration,
    pub dry_run: bool,
    pub seed: Option<u64>,
    /// Per-job counts of the day, kept across runs.
    pub state_file: PathBuf,
    /// Every action as a JSON line (also printed).
    pub log_file: Option<PathBuf>,
}

impl MonkeyConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.kills_per_hour.is_finite() && self.kills_per_hour >= 0.0) {
            bail!("kills-per-hour: {} must be a non-negative number", self.kills_per_hour);
        }
        if self.tick.is_zero() {
            bail!("tick: must be more than 0");
        }
        Ok(())
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// Days since the epoch (UTC) the counts are for.
    day: u64,
    counts: BTreeMap<String, u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Action {
    pub unix_ms: u64,
    pub job: String,
    pub task: String,
    /// `kill`, `would-kill` (dry run) or `kill-failed`.
    pub action: String,
    pub detail: String,
}

/// Runs the monkey for `run_for`, or until `stop` completes. Returns what it did.
pub async fn run(
    client: &titus_client::Client,
    config: &MonkeyConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Vec<Action>> {
    config.validate()?;
    let mut rng = match config.seed {
        Some(s) => rand::rngs::StdRng::seed_from_u64(s),
        None => rand::rngs::StdRng::from_entropy(),
    };
    let mut state: State = match std::fs::read_to_string(&config.state_file) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("monkey state {} is unreadable", config.state_file.display()))?,
        Err(_) => State::default(),
    };
    let mut log = match &config.log_file {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => None,
    };
    let p = (config.kills_per_hour * config.tick.as_secs_f64() / 3600.0).min(1.0);
    let mut actions = Vec::new();
    let deadline = tokio::time::Instant::now() + config.run_for;
    tokio::pin!(stop);
    loop {
        let now = now_unix_ms();
        if state.day != now / 86_400_000 {
            state = State { day: now / 86_400_000, counts: BTreeMap::new() };
        }
        if config.schedule.contains(now) {
            match opted_in(client).await {
                Ok(jobs) => {
                    for job in jobs {
                        let done = state.counts.get(&job).copied().unwrap_or(0);
                        if done >= config.max_per_job_per_day || !rng.gen_bool(p) {
                            continue;
                        }
                        let tasks = match started_tasks(client, &job).await {
                            Ok(t) => t,
                            Err(e) => {
                                tracing::warn!(job, error = %e, "listing tasks");
                                continue;
                            }
                        };
                        let Some(task) = tasks.choose(&mut rng).cloned() else { continue };
                        let detail = format!(
                            "{} of the job's {} running task(s); {} of {} today",
                            1,
                            tasks.len(),
                            done + 1,
                            config.max_per_job_per_day
                        );
                        let action = if config.dry_run {
                            "would-kill".to_string()
                        } else {
                            // An eviction: the job's disruption budget may hold it back.
                            match client.evict_task(&task, "chaos monkey").await {
                                Ok(()) => "kill".into(),
                                Err(titus_client::Error::FailedPrecondition(why)) => {
                                    let action = Action {
                                        unix_ms: now_unix_ms(),
                                        job: job.clone(),
                                        task,
                                        action: "held".into(),
                                        detail: why,
                                    };
                                    record(&mut log, &mut actions, action);
                                    continue;
                                }
                                Err(e) => {
                                    record(
                                        &mut log,
                                        &mut actions,
                                        Action {
                                            unix_ms: now_unix_ms(),
                                            job: job.clone(),
                                            task,
                                            action: "kill-failed".into(),
                                            detail: e.to_string(),
                                        },
                                    );
                                    continue;
                                }
                            }
                        };
                        if !config.dry_run {
                            state.counts.insert(job.clone(), done + 1);
                            save_state(&config.state_file, &state)?;
                        }
                        record(&mut log, &mut actions, Action { unix_ms: now_unix_ms(), job, task, action, detail });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "listing opted-in jobs"),
            }
        }
        if tokio::time::Instant::now() + config.tick > deadline {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(config.tick) => {}
            _ = &mut stop => break,
        }
    }
    Ok(actions)
}

fn record(log: &mut Option<std::fs::File>, actions: &mut Vec<Action>, action: Action) {
    let line = serde_json::to_string(&action).unwrap_or_default();
    println!("{line}");
    if let Some(f) = log {
        if let Err(e) = writeln!(f, "{line}") {
            tracing::error!(error = %e, "writing the monkey's log");
        }
    }
    actions.push(action);
}

fn save_state(path: &std::path::Path, state: &State) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(state)?)?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Active jobs carrying the opt-in attribute.
async fn opted_in(client: &titus_client::Client) -> Result<Vec<String>> {
    let filter = format!("{OPT_IN_ATTRIBUTE}:true");
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = client
            .find_jobs(&[("attributes", &filter), ("jobState", "Accepted")], 500, &cursor)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        out.extend(page.items.into_iter().map(|j| j.id));
        match page.pagination {
            Some(p) if p.has_more => cursor = p.cursor,
            _ => return Ok(out),
        }
    }
}

async fn started_tasks(client: &titus_client::Client, job: &str) -> Result<Vec<String>> {
    let page =
        client.find_tasks(&[("jobIds", job), ("taskStates", "Started")], 1000, "").await.map_err(|e| anyhow!("{e}"))?;
    Ok(page.items.into_iter().map(|t| t.id).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let s: Schedule = "Mon-Fri 09:00-17:00".parse().unwrap();
        // 2026-11-27 was a Friday; 2026-11-28 a Saturday.
        let fri_10 = 1_795_773_600_000; // 2026-11-27T10:00:00Z
        assert!(s.contains(fri_10));
        assert!(!s.contains(fri_10 + 8 * 3_600_000)); // 18:00
        assert!(!s.contains(fri_10 + 24 * 3_600_000)); // Saturday 10:00
        assert!("always".parse::<Schedule>().unwrap().contains(fri_10 + 24 * 3_600_000));
        let wrap: Schedule = "Sat-Mon 00:00-24:00".parse().unwrap();
        assert_eq!(wrap.days, [true, false, false, false, false, true, true]);
        assert!("Mon-Fri 17:00-09:00".parse::<Schedule>().unwrap_err().contains("ends before"));
        assert!("Funday 09:00-10:00".parse::<Schedule>().unwrap_err().contains("Funday"));
        assert!("Mon 9-10".parse::<Schedule>().is_err());
    }
}
