//! Leader-only work: started when this replica becomes leader, stopped when it stops being leader.
//!
//! One entry point ([`LeaderDuties::on_become_leader`]) and one exit ([`LeaderDuties::on_lose_leadership`]).
//! Every duty reads replicated state and proposes commands, so a new leader continues where the
//! old one stopped, and a duty that runs twice does no harm.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::command::Command;
use crate::replica::Replica;

pub struct LeaderDuties {
    replica: Arc<Replica>,
    /// Dropping it (or sending `true`) stops every duty of the current term.
    stop: Option<watch::Sender<bool>>,
    tasks: JoinSet<()>,
}

impl LeaderDuties {
    /// Watches Raft's role until `shutdown` fires, starting and stopping the duties as it changes.
    pub async fn run(replica: Arc<Replica>, mut shutdown: watch::Receiver<bool>) {
        let mut duties = LeaderDuties { replica: replica.clone(), stop: None, tasks: JoinSet::new() };
        let mut metrics = replica.raft.metrics();
        loop {
            let leading = metrics.borrow_and_update().state == ServerState::Leader;
            match (leading, duties.stop.is_some()) {
                (true, false) => duties.on_become_leader(),
                (false, true) => duties.on_lose_leadership().await,
                _ => {}
            }
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { break },
                _ = shutdown.changed() => break,
            }
        }
        duties.on_lose_leadership().await;
    }

    fn on_become_leader(&mut self) {
        tracing::info!(node_id = self.replica.id, "became leader: starting leader duties");
        let (tx, rx) = watch::channel(false);
        self.stop = Some(tx);
        self.tasks.spawn(ensure_cluster_id(self.replica.clone(), rx));
    }

    async fn on_lose_leadership(&mut self) {
        if let Some(stop) = self.stop.take() {
            tracing::info!(node_id = self.replica.id, "no longer leader: stopping leader duties");
            let _ = stop.send(true);
            while self.tasks.join_next().await.is_some() {}
        }
    }
}

/// The first leader of a cluster names it; the id is replicated and checked on every peer message.
async fn ensure_cluster_id(replica: Arc<Replica>, mut stop: watch::Receiver<bool>) {
    while replica.state.cluster_id().is_none() {
        let cluster_id = uuid::Uuid::new_v4().to_string();
        let propose = replica.propose(Command::SetClusterId { cluster_id }, None);
        tokio::select! {
            result = propose => match result {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not record the cluster id; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = stop.changed() => return,
                    }
                }
            },
            _ = stop.changed() => return,
        }
    }
}
