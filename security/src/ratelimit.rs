//! Per-caller token buckets: each caller may spend `rate` a second on average and `burst` at once —
//! calls ([`RateLimiter::check`], one token each), or bytes ([`RateLimiter::charge`] after the fact,
//! which may leave a caller in debt, and [`RateLimiter::check_debt`] before its next call). The map
//! of buckets is bounded: when it is full, buckets that have refilled (idle callers) are forgotten,
//! and if none has, the new caller shares an overflow bucket rather than growing it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_callers: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

const OVERFLOW: &str = "\0overflow";

impl RateLimiter {
    pub fn new(rate_per_second: f64, burst: f64, max_callers: usize) -> RateLimiter {
        RateLimiter { rate: rate_per_second, burst: burst.max(1.0), max_callers, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token from `caller`'s bucket; when it is empty, says how long until one is there.
    pub fn check(&self, caller: &str) -> Result<(), Duration> {
        self.with_bucket(caller, |bucket, rate| {
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                Ok(())
            } else {
                Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
            }
        })
    }

    /// Whether `caller` has paid what it spent: when its bucket is in debt, how long until it is not.
    pub fn check_debt(&self, caller: &str) -> Result<(), Duration> {
        self.with_bucket(caller, |bucket, rate| {
            if bucket.tokens > 0.0 {
                Ok(())
            } else {
                Err(Duration::from_secs_f64((f64::MIN_POSITIVE - bucket.tokens) / rate))
            }
        })
    }

    /// Spends `amount` from `caller`'s bucket, into debt if need be (what was sent was sent).
    pub fn charge(&self, caller: &str, amount: f64) {
        self.with_bucket(caller, |bucket, _| bucket.tokens -= amount);
    }

    /// `f` on `caller`'s bucket, refilled to now; `f` gets the rate (never zero).
    fn with_bucket<R>(&self, caller: &str, f: impl FnOnce(&mut Bucket, f64) -> R) -> R {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(caller) && buckets.len() >= self.max_callers {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let key = if buckets.contains_key(caller) || buckets.len() < self.max_callers { caller } else { OVERFLOW };
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket { tokens: self.burst, at: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.rate).min(self.burst);
        bucket.at = now;
        f(bucket, self.rate.max(f64::MIN_POSITIVE))
    }

    pub fn callers(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_its_burst_then_waits_and_others_are_unaffected() {
        let l = RateLimiter::new(1.0, 3.0, 100);
        for _ in 0..3 {
            l.check("a").unwrap();
        }
        let wait = l.check("a").unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
        l.check("b").unwrap();
    }

    #[test]
    fn bytes_are_charged_after_the_fact_and_debt_is_paid_at_the_rate() {
        let l = RateLimiter::new(1000.0, 4000.0, 100);
        l.check_debt("a").unwrap();
        l.charge("a", 3000.0);
        l.check_debt("a").unwrap();
        // One large body past the burst: the call is through, the next waits for the debt.
        l.charge("a", 3000.0);
        let wait = l.check_debt("a").unwrap_err();
        assert!(wait > Duration::from_millis(1900) && wait <= Duration::from_millis(2000), "{wait:?}");
        l.check_debt("b").unwrap();
    }

    #[test]
    fn the_map_stays_bounded() {
        let l = RateLimiter::new(1000.0, 1.0, 10);
        for i in 0..1000 {
            let _ = l.check(&format!("caller-{i}"));
        }
        assert!(l.callers() <= 11, "{}", l.callers());
    }
}
