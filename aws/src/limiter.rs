//! A client-side rate limit shared by every AWS call of a replica: calls are spaced at least
//! `1 / calls_per_second` apart, so a burst (a large service job scaling up) turns into a steady
//! stream AWS does not throttle, instead of a storm of retries.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Clone)]
pub struct RateLimiter {
    gap: Duration,
    next: Arc<Mutex<Instant>>,
}

impl RateLimiter {
    /// `calls_per_second` <= 0 means no limit.
    pub fn new(calls_per_second: f64) -> Self {
        let gap = if calls_per_second > 0.0 { Duration::from_secs_f64(1.0 / calls_per_second) } else { Duration::ZERO };
        RateLimiter { gap, next: Arc::new(Mutex::new(Instant::now())) }
    }

    /// Waits for this call's slot.
    pub async fn acquire(&self) {
        if self.gap.is_zero() {
            return;
        }
        let slot = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.gap;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn calls_are_spaced_by_the_rate() {
        let limiter = RateLimiter::new(10.0);
        let start = Instant::now();
        for _ in 0..5 {
            limiter.acquire().await;
        }
        // The first call goes at once, the next four 100 ms apart (virtual time).
        assert_eq!(start.elapsed(), Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_means_unlimited() {
        let limiter = RateLimiter::new(0.0);
        let start = Instant::now();
        for _ in 0..100 {
            limiter.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
