//! The stream of applied changes to jobs and tasks, for ObserveJobs/ObserveJob.
//!
//! Every replica produces the same changes in the same order, because it applies the same log; a
//! change's revision is the log index that produced it. A bounded ring of recent batches lets a
//! broken stream resume, on any replica that still holds them, with no gap and no duplicate.
//! Subscribers that fall behind the broadcast buffer are cut off rather than buffered without bound.
//!
//! Memory does not grow with the size of the batches: the ring is bounded in bytes as well as in
//! batches (a batch of 500 placements weighs what 500 task records do), and the broadcast buffer,
//! which keeps its last batches alive whether anyone still reads them, holds far fewer.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::model::agent::{Agent, InstanceGroup};
use crate::model::job::Job;
use crate::model::load_balancer::{LbTarget, LoadBalancer};
use crate::model::task::Task;

#[derive(Debug, Clone)]
pub enum Change {
    Job(Job),
    Task(Task),
    Agent(Agent),
    InstanceGroup(InstanceGroup),
    /// An association added, changed or removed (the record as it was last).
    LoadBalancer(LoadBalancer),
    /// A target written or forgotten (the record as it was last): its task's kill may now proceed.
    LbTarget(LbTarget),
}

#[derive(Debug)]
pub struct ChangeBatch {
    pub revision: u64,
    pub changes: Vec<Change>,
    /// About what the changes weigh: the bytes their entry wrote to the store.
    pub bytes: usize,
    /// The state was replaced whole (snapshot installed): observers must start over.
    pub reset: bool,
}

struct Ring {
    batches: VecDeque<Arc<ChangeBatch>>,
    /// The sum of `batches`' `bytes`.
    bytes: usize,
    /// Changes after this revision are all in `batches` (or still to come).
    covered_after: u64,
}

/// Batches a subscriber may fall behind before it is cut off (and resumes from the ring).
const BROADCAST_BATCHES: usize = 1024;

pub struct ChangeLog {
    ring: Mutex<Ring>,
    /// The ring holds at most this many batches, and this many bytes of them (always the newest
    /// batch, however large).
    max_batches: usize,
    max_bytes: usize,
    tx: broadcast::Sender<Arc<ChangeBatch>>,
}

/// How a subscription starts.
pub enum Start {
    /// These batches (revision > the requested one) come first, then the receiver.
    Resume(Vec<Arc<ChangeBatch>>),
    /// The ring no longer holds the requested revision: read a snapshot instead.
    Snapshot,
}

impl ChangeLog {
    pub fn new(max_batches: usize, max_bytes: usize, applied: u64) -> Self {
        let (tx, _) = broadcast::channel(max_batches.clamp(16, BROADCAST_BATCHES));
        let ring = Ring { batches: VecDeque::new(), bytes: 0, covered_after: applied };
        ChangeLog { ring: Mutex::new(ring), max_batches, max_bytes, tx }
    }

    /// Records and broadcasts one applied entry's changes.
    pub fn publish(&self, batch: ChangeBatch) {
        let batch = Arc::new(batch);
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if batch.reset {
            ring.batches.clear();
            ring.bytes = 0;
            ring.covered_after = batch.revision;
        } else {
            ring.bytes += batch.bytes;
            ring.batches.push_back(batch.clone());
            while ring.batches.len() > self.max_batches || (ring.bytes > self.max_bytes && ring.batches.len() > 1) {
                let Some(old) = ring.batches.pop_front() else { break };
                ring.bytes -= old.bytes;
                ring.covered_after = old.revision;
            }
        }
        // Sent under the lock, so a subscriber sees every batch exactly once: either in the ring
        // copy it took, or through its receiver.
        let _ = self.tx.send(batch);
    }

    /// The retained batches and what they weigh (for `/metrics`).
    pub fn retained(&self) -> (usize, usize) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        (ring.batches.len(), ring.bytes)
    }

    /// The newest `n` retained batches, newest first (for the web view's recent events).
    pub fn recent(&self, n: usize) -> Vec<Arc<ChangeBatch>> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.batches.iter().rev().take(n).cloned().collect()
    }

    /// Subscribes; with `after = Some(r)`, also returns the retained batches after revision r.
    pub fn subscribe(&self, after: Option<u64>) -> (Start, broadcast::Receiver<Arc<ChangeBatch>>) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.tx.subscribe();
        let start = match after {
            Some(r) if r >= ring.covered_after => {
                Start::Resume(ring.batches.iter().filter(|b| b.revision > r).cloned().collect())
            }
            _ => Start::Snapshot,
        };
        (start, rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(revision: u64) -> ChangeBatch {
        ChangeBatch { revision, changes: vec![], bytes: 0, reset: false }
    }

    fn resumes_after(log: &ChangeLog, r: u64) -> Option<Vec<u64>> {
        match log.subscribe(Some(r)).0 {
            Start::Resume(b) => Some(b.iter().map(|b| b.revision).collect()),
            Start::Snapshot => None,
        }
    }

    #[test]
    fn the_ring_is_bounded_in_bytes_and_keeps_the_newest_batch_however_large() {
        let log = ChangeLog::new(100, 1000, 0);
        for r in 1..=10 {
            log.publish(ChangeBatch { bytes: 300, ..batch(r) });
        }
        // 3 x 300 fit in 1000 bytes: revisions 8, 9, 10 are kept, covered after 7.
        assert_eq!(log.retained(), (3, 900));
        assert_eq!(resumes_after(&log, 7), Some(vec![8, 9, 10]));
        assert_eq!(resumes_after(&log, 6), None, "evicted: a snapshot instead");
        log.publish(ChangeBatch { bytes: 5000, ..batch(11) });
        assert_eq!(log.retained(), (1, 5000), "one batch beyond the bound is still kept alone");
        assert_eq!(resumes_after(&log, 10), Some(vec![11]));
        assert_eq!(resumes_after(&log, 9), None);
    }

    #[test]
    fn resume_replays_only_what_is_retained() {
        let log = ChangeLog::new(3, usize::MAX, 10);
        for r in 11..=15 {
            log.publish(batch(r));
        }
        // Retained: 13, 14, 15; covered after 12.
        match log.subscribe(Some(12)).0 {
            Start::Resume(b) => assert_eq!(b.iter().map(|b| b.revision).collect::<Vec<_>>(), vec![13, 14, 15]),
            Start::Snapshot => panic!("12 is covered"),
        }
        assert!(matches!(log.subscribe(Some(11)).0, Start::Snapshot));
        assert!(matches!(log.subscribe(None).0, Start::Snapshot));
        let (_, mut rx) = log.subscribe(Some(15));
        log.publish(batch(16));
        assert_eq!(rx.try_recv().unwrap().revision, 16);
        log.publish(ChangeBatch { revision: 20, changes: vec![], bytes: 0, reset: true });
        assert!(matches!(log.subscribe(Some(16)).0, Start::Snapshot));
    }
}
