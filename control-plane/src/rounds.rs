//! When a leader duty runs its next round: after a committed change (bursts coalesced) or a
//! period, whichever comes first — and not at all once leadership ends. Shared by every duty, so
//! it lives below them.

use std::time::Duration;

use tokio::sync::watch;

/// Waits for the next round of a reconciling duty: a committed change (after at least `min_gap`,
/// so bursts coalesce) or `period`, whichever comes first. False when leadership ends.
pub(crate) async fn next_round(
    period: Duration,
    min_gap: Duration,
    changes: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<crate::events::ChangeBatch>>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    if !pause(min_gap, stop).await {
        return false;
    }
    let deadline = tokio::time::sleep(period.saturating_sub(min_gap));
    tokio::select! {
        _ = deadline => true,
        _ = changes.recv() => {
            // Drain what else arrived: one round covers them all.
            while changes.try_recv().is_ok() {}
            true
        }
        _ = stop.changed() => false,
    }
}

/// Waits `period`, or returns false when leadership ends first.
pub(crate) async fn pause(period: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => true,
        _ = stop.changed() => false,
    }
}
