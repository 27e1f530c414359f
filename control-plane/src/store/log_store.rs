//! The Raft log and vote, in RocksDB.
//!
//! Durability contract with openraft: a vote, appended entries and a truncation are synced to disk
//! (a synced RocksDB write, which fsyncs the WAL) *before* openraft is told they are persisted.
//! Everything else here may be lost in a crash without harm: a lost purge is redone, a lost
//! committed index is recomputed by the leader.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use rocksdb::{Direction, IteratorMode, WriteBatch, DB};

use super::{blocking, cf_handle, log_key, sync_write_options, StoreResult};
use crate::codec;
use crate::raft_types::{Entry, LogId, NodeId, TypeConfig, Vote};
use crate::store::cf;

/// Default of [`LogStore::limit_payload`]: `raft.max-payload-bytes`'s default.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1 << 20;

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// What one read for replication returns at most, in stored bytes (at least one entry).
    max_payload_bytes: usize,
}

impl LogStore {
    pub(super) fn new(db: Arc<DB>) -> Self {
        LogStore { db, max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES }
    }

    /// Bounds the entries read for one AppendEntries to about `bytes` (see `limited_get_log_entries`).
    pub fn limit_payload(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes.max(1);
        self
    }

    fn get_raft_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> StoreResult<Option<T>> {
        let cf = cf_handle(&self.db, cf::RAFT_META)?;
        let bytes = self.db.get_cf(cf, key).map_err(|e| StorageIOError::read(&e))?;
        bytes.map(|b| codec::decode(&b).map_err(|e| StorageIOError::read(&e).into())).transpose()
    }

    fn last_log_id(&self) -> StoreResult<Option<LogId>> {
        let cf = cf_handle(&self.db, cf::RAFT_LOG)?;
        match self.db.iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (_, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
                let entry: Entry = codec::decode(&value).map_err(|e| StorageIOError::read_logs(&e))?;
                Ok(Some(entry.log_id))
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let cf = cf_handle(&self.db, cf::RAFT_LOG)?;
        let key = log_key(start);
        let mut entries = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::From(&key, Direction::Forward)) {
            let (_, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let entry: Entry = codec::decode(&value).map_err(|e| StorageIOError::read_logs(&e))?;
            if !range.contains(&entry.log_id.index) {
                break;
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    /// The entries of one AppendEntries: `[start, end)` up to about `max_payload_bytes` of stored
    /// bytes, and always the first one. openraft gives an AppendEntries one heartbeat interval to be
    /// answered and resends the same entries when it is not: a follower catching up on large
    /// entries (batches of placements) timed out on every try and never caught up. The bound is
    /// taken from the stored values' lengths, before decoding, so it costs nothing; openraft sends
    /// the rest in the next AppendEntries.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> StoreResult<Vec<Entry>> {
        let cf = cf_handle(&self.db, cf::RAFT_LOG)?;
        let key = log_key(start);
        let (mut entries, mut bytes) = (Vec::new(), 0usize);
        for item in self.db.iterator_cf(cf, IteratorMode::From(&key, Direction::Forward)) {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            // The key is the index (big-endian): the first entry past `end` is not decoded.
            let past_end = <[u8; 8]>::try_from(key.as_ref()).is_ok_and(|k| u64::from_be_bytes(k) >= end);
            if past_end || (!entries.is_empty() && bytes.saturating_add(value.len()) > self.max_payload_bytes) {
                break;
            }
            let entry: Entry = codec::decode(&value).map_err(|e| StorageIOError::read_logs(&e))?;
            if entry.log_id.index >= end {
                break;
            }
            bytes += value.len();
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId> = self.get_raft_meta(cf::raft_meta::LAST_PURGED)?;
        let last_log_id = self.last_log_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> StoreResult<()> {
        let bytes = codec::encode(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        let cf = cf_handle(&self.db, cf::RAFT_META)?;
        // Vote must be persisted to disk before returning: a replica that forgets its vote after a
        // crash could vote twice in one term.
        blocking(|| self.db.put_cf_opt(cf, cf::raft_meta::VOTE, bytes, &sync_write_options()))
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote>> {
        self.get_raft_meta(cf::raft_meta::VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> StoreResult<()> {
        let bytes = codec::encode(&committed).map_err(|e| StorageIOError::write(&e))?;
        let cf = cf_handle(&self.db, cf::RAFT_META)?;
        // Not synced: the committed index is an optimisation for restart (apply without waiting for
        // the leader); losing it is harmless.
        self.db.put_cf(cf, cf::raft_meta::COMMITTED, bytes).map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId>> {
        Ok(self.get_raft_meta::<Option<LogId>>(cf::raft_meta::COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
    {
        let cf = cf_handle(&self.db, cf::RAFT_LOG)?;
        let mut batch = WriteBatch::default();
        let mut appended = 0;
        for entry in entries {
            let bytes = codec::encode(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            appended += bytes.len();
            batch.put_cf(cf, log_key(entry.log_id.index), bytes);
        }
        crate::telemetry::metrics().raft_log_bytes_appended_total.add(&[], appended as f64);
        // Entries must be on disk before openraft is told they are: a synced write fsyncs the WAL.
        // Only then is the callback called; on error it is dropped and openraft sees the failure.
        let started = std::time::Instant::now();
        let result = blocking(|| self.db.write_opt(batch, &sync_write_options()));
        crate::telemetry::metrics().raft_append_seconds.observe(&[], started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> StoreResult<()> {
        tracing::debug!(%log_id, "truncate log from here on");
        let cf = cf_handle(&self.db, cf::RAFT_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, log_key(log_id.index), log_key(u64::MAX));
        // A truncation must be durable too: entries that reappear after a crash would conflict with
        // the leader's log.
        blocking(|| self.db.write_opt(batch, &sync_write_options())).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> StoreResult<()> {
        tracing::debug!(%log_id, "purge log up to here");
        let meta = cf_handle(&self.db, cf::RAFT_META)?;
        let logs = cf_handle(&self.db, cf::RAFT_LOG)?;
        let mut batch = WriteBatch::default();
        // The last purged id and the deletion go in one batch: a reader never sees a gap that the
        // log state does not explain.
        batch.put_cf(
            meta,
            cf::raft_meta::LAST_PURGED,
            codec::encode(&log_id).map_err(|e| StorageIOError::write_logs(&e))?,
        );
        batch.delete_range_cf(logs, log_key(0), log_key(log_id.index.saturating_add(1)));
        self.db.write(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

/// The node id this data dir belongs to, if one was recorded.
pub(super) fn stored_node_id(db: &DB) -> StoreResult<Option<NodeId>> {
    let cf = cf_handle(db, cf::RAFT_META)?;
    let bytes = db.get_cf(cf, cf::raft_meta::NODE_ID).map_err(|e| StorageIOError::read(&e))?;
    bytes.map(|b| codec::decode(&b).map_err(|e| StorageIOError::read(&e).into())).transpose()
}

pub(super) fn record_node_id(db: &DB, id: NodeId) -> StoreResult<()> {
    let cf = cf_handle(db, cf::RAFT_META)?;
    let bytes = codec::encode(&id).map_err(|e| StorageIOError::write(&e))?;
    db.put_cf_opt(cf, cf::raft_meta::NODE_ID, bytes, &sync_write_options()).map_err(|e| StorageIOError::write(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::command::Command;

    /// Entries 1..=n, each about `value_bytes` when stored.
    fn store_with(n: u64, value_bytes: usize) -> (tempfile::TempDir, LogStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _, _) = crate::store::open(dir.path(), 1).expect("open");
        let cf = cf_handle(&store.db, cf::RAFT_LOG).expect("cf");
        for index in 1..=n {
            let entry = Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
                payload: EntryPayload::Normal(Command::SetClusterId { cluster_id: "x".repeat(value_bytes) }),
            };
            store.db.put_cf(cf, log_key(index), codec::encode(&entry).expect("encode")).expect("put");
        }
        (dir, store)
    }

    fn indexes(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    }

    #[tokio::test]
    async fn a_replication_read_stops_at_its_byte_bound_but_never_returns_nothing() {
        let (_dir, store) = store_with(64, 10_000);
        // Within the bound: the whole range, and never past its end.
        let mut all = store.clone().limit_payload(1 << 20);
        assert_eq!(indexes(&all.limited_get_log_entries(1, 65).await.expect("read")), (1..=64).collect::<Vec<_>>());
        assert_eq!(indexes(&all.limited_get_log_entries(5, 9).await.expect("read")), vec![5, 6, 7, 8]);
        // 100 kB: the first entries that fit (each about 10 kB stored), from where it was asked.
        let mut bounded = store.clone().limit_payload(100_000);
        let got = bounded.limited_get_log_entries(11, 65).await.expect("read");
        assert_eq!(got.first().map(|e| e.log_id.index), Some(11));
        assert!((8..=10).contains(&got.len()), "{} entries", got.len());
        // One entry larger than the bound still comes, alone: a follower must get it some time.
        let mut tiny = store.limit_payload(100);
        assert_eq!(indexes(&tiny.limited_get_log_entries(3, 65).await.expect("read")), vec![3]);
    }
}
