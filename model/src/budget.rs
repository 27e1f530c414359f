//! Titus's job disruption budget: how much *voluntary* disruption (a drain moving tasks off an
//! agent, a rolling update replacing them) a job takes, and when. Involuntary losses (an agent
//! lost, a container crashed) are never held back, but they count: the budget is judged on the
//! tasks available now, so a job already short of tasks gets no voluntary disruption.
//!
//! - `availability_percentage_limit`: at least this share of desired stays available (rounded up);
//! - `unhealthy_tasks_limit`: at most this many tasks unavailable at once;
//! - `rate_limit` per `rate_interval_ms`: at most so many evictions in any such interval, and
//!   `rate_percentage_per_hour`: at most that share of desired in any hour;
//! - `time_windows`: evictions only inside them (UTC);
//! - neither limit set: self-managed, the disruption's own pace (a drain moves a tenth of the
//!   job at a time, a rolling update by its strategy).

use serde::{Deserialize, Serialize};

/// Evictions a job remembers, for its rate limit.
pub const MAX_RATE_LIMIT: u32 = 1_000;
pub const MAX_TIME_WINDOWS: usize = 16;

/// Days and hours (UTC) when voluntary disruptions may happen: `days` 0 (Sunday) to 6, empty for
/// every day; hours `start_hour` (inclusive) to `end_hour` (exclusive), 0-24.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeWindow {
    #[serde(default)]
    pub days: Vec<u8>,
    pub start_hour: u32,
    pub end_hour: u32,
}

impl TimeWindow {
    pub fn contains(&self, now_ms: i64) -> bool {
        let days = now_ms.div_euclid(86_400_000);
        // 1970-01-01 was a Thursday (4).
        let weekday = (days + 4).rem_euclid(7) as u8;
        let hour = (now_ms.rem_euclid(86_400_000) / 3_600_000) as u32;
        (self.days.is_empty() || self.days.contains(&weekday)) && self.start_hour <= hour && hour < self.end_hour
    }
}

/// How many voluntary disruptions a budget allows now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowance {
    /// Evictions of any task (rate and time windows).
    pub any: u32,
    /// Of those, evictions of tasks that are available (the availability limits too).
    pub available: u32,
    /// Why it is 0 (or lower than asked): what holds disruptions back, for people.
    pub held_by: Option<String>,
}

impl super::job::DisruptionBudget {
    /// Neither availability limit: the job manages its own disruptions.
    pub fn is_self_managed(&self) -> bool {
        self.availability_percentage_limit <= 0.0 && self.unhealthy_tasks_limit == 0
    }

    /// What the budget allows now for a job wanting `desired` tasks with `available` of them
    /// available, `evictions_ms` its past evictions (any order).
    pub fn allowance(&self, desired: u32, available: u32, evictions_ms: &[i64], now_ms: i64) -> Allowance {
        let mut held_by = None;
        let mut any = u32::MAX;
        if !self.time_windows.is_empty() && !self.time_windows.iter().any(|w| w.contains(now_ms)) {
            any = 0;
            held_by = Some("outside the disruption budget's time windows".to_string());
        }
        for (limit, interval_ms) in self.rates(desired) {
            if any == 0 {
                break;
            }
            let since = now_ms.saturating_sub(i64::try_from(interval_ms).unwrap_or(i64::MAX));
            let used = evictions_ms.iter().filter(|t| **t > since).count() as u32;
            any = any.min(limit.saturating_sub(used));
            if any == 0 {
                held_by = Some(format!(
                    "the disruption budget's rate: {used} evictions in the last {} s, at most {limit}",
                    interval_ms / 1000
                ));
            }
        }
        let mut for_available = any;
        if self.availability_percentage_limit > 0.0 {
            let floor = (f64::from(desired) * self.availability_percentage_limit / 100.0).ceil();
            // Finite and within [0, desired]: the percentage is validated to 0-100.
            let floor = if floor.is_finite() { floor.clamp(0.0, f64::from(desired)) as u32 } else { desired };
            let room = available.saturating_sub(floor);
            if room < for_available {
                for_available = room;
                if room == 0 && held_by.is_none() {
                    held_by = Some(format!(
                        "the disruption budget keeps {floor} of {desired} tasks available ({}%); {available} are",
                        self.availability_percentage_limit
                    ));
                }
            }
        }
        if self.unhealthy_tasks_limit > 0 {
            let down = desired.saturating_sub(available);
            let room = self.unhealthy_tasks_limit.saturating_sub(down);
            if room < for_available {
                for_available = room;
                if room == 0 && held_by.is_none() {
                    held_by = Some(format!(
                        "the disruption budget allows {} tasks unavailable; {down} are",
                        self.unhealthy_tasks_limit
                    ));
                }
            }
        }
        Allowance { any, available: for_available, held_by }
    }

    /// Its rates as (evictions, per interval in ms), for a job of `desired` tasks: a percentage per
    /// hour is a count per hour (rounded up, at least 1, at most [`MAX_RATE_LIMIT`]).
    pub fn rates(&self, desired: u32) -> Vec<(u32, u64)> {
        let mut rates = Vec::new();
        if self.rate_limit > 0 {
            rates.push((self.rate_limit, self.rate_interval_ms));
        }
        if self.rate_percentage_per_hour > 0.0 {
            let n = (f64::from(desired) * self.rate_percentage_per_hour / 100.0).ceil();
            let n = if n.is_finite() { n.clamp(1.0, f64::from(MAX_RATE_LIMIT)) as u32 } else { 1 };
            rates.push((n, 3_600_000));
        }
        rates
    }

    /// How many past evictions its rates need remembered.
    pub fn evictions_kept(&self, desired: u32) -> usize {
        self.rates(desired).iter().map(|(n, _)| *n as usize).max().unwrap_or(0)
    }

    /// Every violation, fields named from `disruption_budget`.
    pub fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        let p = self.availability_percentage_limit;
        if !p.is_finite() || !(0.0..=100.0).contains(&p) {
            bad("disruption_budget.availability_percentage_limit", "must be between 0 and 100".into());
        }
        if self.rate_limit > MAX_RATE_LIMIT {
            bad("disruption_budget.rate_limit", format!("must be at most {MAX_RATE_LIMIT}"));
        }
        if self.rate_limit > 0 && !(1_000..=7 * 86_400_000).contains(&self.rate_interval_ms) {
            bad("disruption_budget.rate_interval_ms", "must be between 1000 (1 s) and 604800000 (7 days)".into());
        }
        let r = self.rate_percentage_per_hour;
        if !r.is_finite() || !(0.0..=100.0).contains(&r) {
            bad("disruption_budget.rate_percentage_per_hour", "must be between 0 and 100".into());
        }
        if self.self_managed_relocation_time_ms > 7 * 86_400_000 {
            bad("disruption_budget.self_managed_relocation_time_ms", "must be at most 7 days".into());
        }
        if self.time_windows.len() > MAX_TIME_WINDOWS {
            bad("disruption_budget.time_windows", format!("must have at most {MAX_TIME_WINDOWS} entries"));
        }
        for (i, w) in self.time_windows.iter().enumerate().take(MAX_TIME_WINDOWS) {
            let field = format!("disruption_budget.time_windows[{i}]");
            if w.days.len() > 7 || w.days.iter().any(|d| *d > 6) {
                bad(&format!("{field}.days"), "days are 0 (Sunday) to 6, each at most once".into());
            }
            if w.start_hour >= w.end_hour || w.end_hour > 24 {
                bad(&field, "start_hour must be before end_hour, both 0-24".into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::job::DisruptionBudget;

    use super::*;

    fn budget(pct: f64, unhealthy: u32) -> DisruptionBudget {
        DisruptionBudget { availability_percentage_limit: pct, unhealthy_tasks_limit: unhealthy, ..Default::default() }
    }

    #[test]
    fn availability_limits_count_what_is_already_down() {
        // 80% of 5: 4 must stay; all 5 up, one may go; one down already, none.
        assert_eq!(budget(80.0, 0).allowance(5, 5, &[], 0).available, 1);
        let held = budget(80.0, 0).allowance(5, 4, &[], 0);
        assert_eq!(held.available, 0);
        assert!(held.held_by.unwrap().contains("keeps 4 of 5"), "rounded up");
        assert_eq!(budget(0.0, 2).allowance(10, 9, &[], 0).available, 1);
        assert_eq!(budget(0.0, 2).allowance(10, 8, &[], 0).available, 0);
        let own = DisruptionBudget::default();
        assert!(own.is_self_managed());
        assert_eq!(own.allowance(3, 0, &[], 0).available, u32::MAX, "self-managed: no limit of its own");
    }

    #[test]
    fn rates_and_windows_bound_every_eviction() {
        let b = DisruptionBudget { rate_limit: 2, rate_interval_ms: 60_000, ..budget(50.0, 0) };
        assert_eq!(b.allowance(10, 10, &[1_000], 30_000).any, 1);
        let held = b.allowance(10, 10, &[1_000, 2_000], 30_000);
        assert_eq!((held.any, held.available), (0, 0));
        assert!(held.held_by.unwrap().contains("2 evictions in the last 60 s"));
        assert_eq!(b.allowance(10, 10, &[1_000, 2_000], 62_001).any, 2, "the interval slides");
        // Thursday 1970-01-01 10:00 UTC.
        let thursday_10h = 10 * 3_600_000;
        let weekdays = TimeWindow { days: vec![1, 2, 3, 4, 5], start_hour: 9, end_hour: 17 };
        assert!(weekdays.contains(thursday_10h));
        assert!(!weekdays.contains(thursday_10h + 2 * 86_400_000), "Saturday");
        assert!(!weekdays.contains(thursday_10h + 8 * 3_600_000), "18:00");
        let b = DisruptionBudget { time_windows: vec![weekdays], ..DisruptionBudget::default() };
        assert_eq!(b.allowance(3, 3, &[], thursday_10h + 2 * 86_400_000).any, 0);
        // 10% of 30 an hour: 3.
        let b = DisruptionBudget { rate_percentage_per_hour: 10.0, ..DisruptionBudget::default() };
        assert_eq!(b.rates(30), [(3, 3_600_000)]);
        assert_eq!(b.allowance(30, 30, &[1, 2], 3_000_000).any, 1);
        assert_eq!(b.allowance(30, 30, &[1, 2, 3], 3_000_000).any, 0);
        assert_eq!(b.evictions_kept(30), 3);
    }

    #[test]
    fn bad_budgets_name_their_field() {
        let mut fields = Vec::new();
        let b = DisruptionBudget {
            availability_percentage_limit: f64::NAN,
            rate_limit: 5,
            rate_interval_ms: 0,
            time_windows: vec![TimeWindow { days: vec![9], start_hour: 20, end_hour: 8 }],
            ..Default::default()
        };
        b.validate(&mut |f: &str, _| fields.push(f.to_string()));
        assert_eq!(
            fields,
            [
                "disruption_budget.availability_percentage_limit",
                "disruption_budget.rate_interval_ms",
                "disruption_budget.time_windows[0].days",
                "disruption_budget.time_windows[0]"
            ]
        );
    }
}
