//! How much log a replica keeps behind its newest snapshot, sized in time as well as in entries.
//!
//! A count of entries alone is the wrong unit: 1,000 entries are ten minutes of an idle cluster and
//! a twentieth of a second of a busy one, so a follower restarted for a few seconds under load found
//! the log it needed purged and had to take a whole snapshot (hundreds of megabytes at a million
//! tasks). openraft sizes the kept log in entries only, so it is told to keep everything
//! (`max_in_snapshot_log_to_keep` = `u64::MAX`) and this task purges instead: up to the newest
//! snapshot, less `raft.keep-entries-after-snapshot` entries, and never an entry appended in the
//! last `raft.keep-log-seconds` (as this replica saw them appended: it samples its last log index
//! once a second). Purging is each replica's own business (every replica keeps its own log).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::replica::Replica;

/// How often the last log index is sampled, and a purge considered.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The kept log's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub keep_entries: u64,
    pub keep_for: Duration,
}

/// Last log indexes as sampled, oldest first, back to just past `keep_for`.
#[derive(Debug, Default)]
pub struct Samples(VecDeque<(Instant, u64)>);

impl Samples {
    /// Records that the log ended at `last_index` at `at`, and forgets what `keep` no longer needs
    /// (every sample but the newest one at least `keep_for` old).
    pub fn record(&mut self, at: Instant, last_index: u64, keep: &Retention) {
        self.0.push_back((at, last_index));
        while self.0.get(1).is_some_and(|(t, _)| at.saturating_duration_since(*t) >= keep.keep_for) {
            self.0.pop_front();
        }
    }

    /// The index to purge up to (inclusive), if any: at most the snapshot's index less
    /// `keep_entries`, at most the last index of a sample at least `keep_for` old (so nothing
    /// younger goes), and beyond what is purged already.
    pub fn purge_upto(
        &self,
        now: Instant,
        snapshot: Option<u64>,
        purged: Option<u64>,
        keep: &Retention,
    ) -> Option<u64> {
        let by_entries = snapshot?.checked_sub(keep.keep_entries)?;
        let old_enough = if keep.keep_for.is_zero() {
            u64::MAX
        } else {
            self.0
                .iter()
                .rev()
                .find(|(t, _)| now.saturating_duration_since(*t) >= keep.keep_for)
                .map(|(_, index)| *index)?
        };
        let upto = by_entries.min(old_enough);
        (purged.is_none_or(|p| upto > p)).then_some(upto)
    }
}

/// Samples once a second, and purges when a sample or a new snapshot allows more, until
/// `shutdown`.
pub async fn run(replica: Arc<Replica>, keep: Retention, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut samples = Samples::default();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut metrics = replica.raft.metrics();
    let (mut snapshot, mut asked) = (None, None);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let last = metrics.borrow().last_log_index.unwrap_or(0);
                samples.record(Instant::now(), last, &keep);
            }
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
                // Only a new snapshot can allow more between samples.
                let now = metrics.borrow_and_update().snapshot.map(|l| l.index);
                if now == snapshot {
                    continue;
                }
                snapshot = now;
            }
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let (snapshot, purged) = {
            let m = metrics.borrow();
            (m.snapshot.map(|l| l.index), m.purged.map(|l| l.index))
        };
        // Not asked again for what openraft has yet to report purged.
        let Some(upto) = samples.purge_upto(Instant::now(), snapshot, purged.max(asked), &keep) else { continue };
        match replica.raft.trigger().purge_log(upto).await {
            Ok(()) => asked = Some(upto),
            Err(e) => tracing::warn!(error = %e, upto, "could not ask for the log to be purged"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_younger_than_the_window_nor_within_the_kept_entries_is_purged() {
        let keep = Retention { keep_entries: 100, keep_for: Duration::from_secs(30) };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut samples = Samples::default();
        // A busy log: 10,000 entries a second.
        for s in 0..=40 {
            samples.record(at(s), s * 10_000, &keep);
        }
        // The log ended at 100,000 thirty seconds ago: nothing after it goes, whatever the snapshot.
        assert_eq!(samples.purge_upto(at(40), Some(390_000), None, &keep), Some(100_000));
        // A snapshot older than that: up to it, less the entries kept.
        assert_eq!(samples.purge_upto(at(40), Some(50_000), None, &keep), Some(49_900));
        // Already purged that far: nothing to ask.
        assert_eq!(samples.purge_upto(at(40), Some(390_000), Some(100_000), &keep), None);
        assert_eq!(samples.purge_upto(at(40), None, None, &keep), None, "no snapshot, no purge");
        assert_eq!(samples.purge_upto(at(40), Some(50), None, &keep), None, "fewer entries than kept");
        // The window is what is held: the samples of the last 30 s and one older.
        assert_eq!(samples.0.len(), 31);
        assert_eq!(samples.0.front().map(|(t, _)| *t), Some(at(10)));
    }

    #[test]
    fn a_replica_just_started_purges_nothing_until_the_window_has_passed() {
        let keep = Retention { keep_entries: 0, keep_for: Duration::from_secs(30) };
        let t0 = Instant::now();
        let mut samples = Samples::default();
        samples.record(t0, 5_000, &keep);
        assert_eq!(samples.purge_upto(t0 + Duration::from_secs(29), Some(5_000), None, &keep), None);
        assert_eq!(samples.purge_upto(t0 + Duration::from_secs(30), Some(5_000), None, &keep), Some(5_000));
        // Keeping no time at all: up to the snapshot at once, sampled or not.
        let none = Retention { keep_entries: 0, keep_for: Duration::ZERO };
        assert_eq!(Samples::default().purge_upto(t0, Some(6_000), Some(10), &none), Some(6_000));
    }
}
