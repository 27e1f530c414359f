//! The scrape-time collector: sets the gauges that describe state (Raft indexes, tasks by state,
//! agents, RocksDB) from this replica's own view when `/metrics` is scraped, and counts what the
//! applied changes show (leader changes, launch latency). Above the replica and the agent hub,
//! which it reads; the metrics themselves are defined in [`crate::telemetry`], at the bottom, where
//! every layer may count into them.

use std::sync::Arc;

use crate::model::task::TaskState;
use crate::replica::Replica;
use crate::telemetry::metrics;

/// Sets the scrape-time gauges from this replica's view, then renders everything.
pub fn render(replica: &Replica, hub: &crate::agents::AgentHub) -> String {
    let m = metrics();
    let raft = replica.raft.metrics().borrow().clone();
    m.raft_term.set(&[], raft.current_term as f64);
    m.raft_is_leader.set(&[], if raft.current_leader == Some(replica.id) { 1.0 } else { 0.0 });
    m.raft_last_log_index.set(&[], raft.last_log_index.unwrap_or(0) as f64);
    m.raft_applied_index.set(&[], raft.last_applied.map(|l| l.index).unwrap_or(0) as f64);
    m.raft_snapshot_index.set(&[], raft.snapshot.map(|l| l.index).unwrap_or(0) as f64);
    m.raft_committed_index.set(&[], replica.state.committed_index() as f64);
    let (batches, bytes) = replica.state.changes.retained();
    m.change_log_batches.set(&[], batches as f64);
    m.change_log_bytes.set(&[], bytes as f64);
    let last = raft.last_log_index.unwrap_or(0);
    m.raft_follower_lag_entries.replace(
        raft.replication.iter().flat_map(|r| r.iter()).filter(|(id, _)| **id != replica.id).map(|(id, matched)| {
            (vec![id.to_string()], last.saturating_sub(matched.map(|l| l.index).unwrap_or(0)) as f64)
        }),
    );

    let state = &replica.state;
    // Kept on apply: a scrape reads no task (it once decoded every one, each scrape).
    let counts = state.counts();
    m.tasks.replace(TaskState::ALL.iter().map(|s| (vec![s.name().to_string()], counts.tasks_in(*s) as f64)));
    m.scheduler_pending_tasks.set(&[], counts.pending_tasks as f64);
    m.agents.replace([
        (vec!["online".to_string()], counts.agents_online as f64),
        (vec!["lost".to_string()], counts.agents_lost as f64),
    ]);
    for (port, stats) in [("api", &m.api_listener), ("peer", &m.peer_listener)] {
        use std::sync::atomic::Ordering::Relaxed;
        m.connections.set(&[port, "open"], stats.open.load(Relaxed) as f64);
        m.connections.set(&[port, "unauthenticated"], stats.unauthenticated.load(Relaxed) as f64);
        for (reason, total) in
            [("refused", &stats.refused), ("evicted", &stats.evicted), ("timed_out", &stats.timed_out)]
        {
            let labels = [port, reason];
            let seen = m.connections_closed_total.get(&labels);
            m.connections_closed_total.add(&labels, (total.load(Relaxed) as f64 - seen).max(0.0));
        }
    }
    let heard = hub.heartbeat_ages();
    m.agents_connected.set(&[], heard.len() as f64);
    m.agent_heartbeat_age_seconds.replace(heard.into_iter().map(|(id, age)| (vec![id], age.as_secs_f64())));
    let rocks = state.rocksdb_properties();
    m.rocksdb_sst_bytes.replace(rocks.sst_bytes.into_iter().map(|(cf, v)| (vec![cf], v as f64)));
    m.rocksdb_estimated_keys.replace(rocks.estimated_keys.into_iter().map(|(cf, v)| (vec![cf], v as f64)));
    m.rocksdb_compaction_pending.replace(rocks.compaction_pending.into_iter().map(|(cf, v)| (vec![cf], v as f64)));
    m.rocksdb_write_stopped.set(&[], rocks.write_stopped as f64);
    let mut text = m.registry.render();
    text.push_str(&titus_obs::process::process_metrics("titus-control-plane", env!("CARGO_PKG_VERSION")));
    text
}

/// Counts leader changes and observes Accepted → Started latency from the applied changes.
pub async fn watch(replica: Arc<Replica>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let m = metrics();
    let mut raft = replica.raft.metrics();
    let mut leader = raft.borrow().current_leader;
    let (_, mut changes) = replica.state.changes.subscribe(None);
    loop {
        tokio::select! {
            changed = raft.changed() => {
                if changed.is_err() { return }
                let now = raft.borrow_and_update().current_leader;
                if now.is_some() && now != leader {
                    m.raft_leader_changes_total.inc(&[]);
                }
                leader = now;
            }
            batch = changes.recv() => match batch {
                Ok(batch) => {
                    for change in &batch.changes {
                        if let crate::events::Change::Task(t) = change {
                            if t.state() == TaskState::Started {
                                if let Some(accepted) = t.entered(TaskState::Accepted) {
                                    let secs = (t.status.timestamp_ms - accepted).max(0) as f64 / 1000.0;
                                    m.task_launch_seconds.observe(&[], secs);
                                }
                            }
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
