//! The stream of applied changes to jobs and tasks, for ObserveJobs/ObserveJob.
//!
//! Every replica produces the same changes in the same order, because it applies the same log; a
//! change's revision is the log index that produced it. A bounded ring of recent batches lets a
//! broken stream resume, on any replica that still holds them, with no gap and no duplicate.
//! Subscribers that fall behind the broadcast buffer are cut off rather than buffered without bound.

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
    /// The state was replaced whole (snapshot installed): observers must start over.
    pub reset: bool,
}

struct Ring {
    batches: VecDeque<Arc<ChangeBatch>>,
    /// Changes after this revision are all in `batches` (or still to come).
    covered_after: u64,
}

pub struct ChangeLog {
    ring: Mutex<Ring>,
    capacity: usize,
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
    pub fn new(capacity: usize, applied: u64) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        ChangeLog { ring: Mutex::new(Ring { batches: VecDeque::new(), covered_after: applied }), capacity, tx }
    }

    /// Records and broadcasts one applied entry's changes.
    pub fn publish(&self, batch: ChangeBatch) {
        let batch = Arc::new(batch);
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if batch.reset {
            ring.batches.clear();
            ring.covered_after = batch.revision;
        } else {
            ring.batches.push_back(batch.clone());
            while ring.batches.len() > self.capacity {
                if let Some(old) = ring.batches.pop_front() {
                    ring.covered_after = old.revision;
                }
            }
        }
        // Sent under the lock, so a subscriber sees every batch exactly once: either in the ring
        // copy it took, or through its receiver.
        let _ = self.tx.send(batch);
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
        ChangeBatch { revision, changes: vec![], reset: false }
    }

    #[test]
    fn resume_replays_only_what_is_retained() {
        let log = ChangeLog::new(3, 10);
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
        log.publish(ChangeBatch { revision: 20, changes: vec![], reset: true });
        assert!(matches!(log.subscribe(Some(16)).0, Start::Snapshot));
    }
}
