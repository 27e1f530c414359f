//! Durable storage of one replica: the Raft log, vote and state machine in one RocksDB instance,
//! one column family per kind of record (see [`cf`]).
//!
//! Knows openraft's storage traits and RocksDB; knows nothing of the API, the leader duties or the
//! scheduler.

pub mod cf;
mod log_store;
mod snapshot_data;
mod state_machine;

#[cfg(test)]
mod store_test;

use std::path::Path;
use std::sync::{Arc, RwLock};

use openraft::StorageIOError;
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteOptions, DB};

pub use log_store::LogStore;
pub use state_machine::StateMachine;

use crate::codec;
use crate::error::{Error, Result};
use crate::model::CapacityGroup;
use crate::raft_types::{NodeId, StorageError};

pub type StoreResult<T> = std::result::Result<T, StorageError>;

/// Opens (or creates) the store in `dir` for replica `node_id`. Fails with a clear error when the
/// directory belongs to another replica, or is locked by a running one.
pub fn open(dir: &Path, node_id: NodeId) -> Result<(LogStore, StateMachine, StateReader)> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Config(format!("data-dir {}: {e}", dir.display())))?;
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let families = cf::ALL
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
    let db = DB::open_cf_descriptors(&opts, dir, families).map_err(|e| {
        if e.to_string().contains("lock") {
            Error::Config(format!(
                "data-dir {} is in use by another process: {e}",
                dir.display()
            ))
        } else {
            Error::Storage(format!("opening RocksDB in {}: {e}", dir.display()))
        }
    })?;
    match log_store::stored_node_id(&db).map_err(|e| Error::Storage(e.to_string()))? {
        Some(stored) if stored != node_id => {
            return Err(Error::Config(format!(
                "data-dir {} belongs to replica {stored}, not to node-id {node_id}; point this replica at its own data dir",
                dir.display()
            )))
        }
        Some(_) => {}
        None => log_store::record_node_id(&db, node_id).map_err(|e| Error::Storage(e.to_string()))?,
    }
    let db = Arc::new(db);
    let reader = StateReader {
        db: db.clone(),
        cluster_id: Arc::new(RwLock::new(None)),
    };
    reader.reload_cluster_id()?;
    Ok((
        LogStore::new(db.clone()),
        StateMachine::new(db, reader.clone()),
        reader,
    ))
}

/// Read-only access to the applied state, for the API. What it returns is what this replica has
/// applied; linearizability is the caller's business (read index first).
#[derive(Clone)]
pub struct StateReader {
    db: Arc<DB>,
    /// Checked on every peer message; cached so that check costs no disk read.
    cluster_id: Arc<RwLock<Option<String>>>,
}

impl StateReader {
    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn remember_cluster_id(&self, id: String) {
        let mut guard = self.cluster_id.write().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(id);
        }
    }

    fn reload_cluster_id(&self) -> Result<()> {
        let cf = cf_handle(&self.db, cf::SM_META).map_err(|e| Error::Storage(e.to_string()))?;
        let stored: Option<String> = match self
            .db
            .get_cf(cf, cf::sm_meta::CLUSTER_ID)
            .map_err(|e| Error::Storage(e.to_string()))?
        {
            Some(b) => {
                Some(codec::decode(&b).map_err(|e| Error::Storage(format!("cluster id: {e}")))?)
            }
            None => None,
        };
        *self.cluster_id.write().unwrap_or_else(|p| p.into_inner()) = stored;
        Ok(())
    }

    pub fn capacity_group(&self, name: &str) -> Result<Option<CapacityGroup>> {
        let cf =
            cf_handle(&self.db, cf::CAPACITY_GROUPS).map_err(|e| Error::Storage(e.to_string()))?;
        match self
            .db
            .get_pinned_cf(cf, name.as_bytes())
            .map_err(|e| Error::Storage(e.to_string()))?
        {
            Some(bytes) => {
                Ok(Some(codec::decode(&bytes).map_err(|e| {
                    Error::Storage(format!("capacity group {name:?}: {e}"))
                })?))
            }
            None => Ok(None),
        }
    }

    pub fn capacity_groups(&self) -> Result<Vec<CapacityGroup>> {
        let cf =
            cf_handle(&self.db, cf::CAPACITY_GROUPS).map_err(|e| Error::Storage(e.to_string()))?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (_, v) = item.map_err(|e| Error::Storage(e.to_string()))?;
            out.push(
                codec::decode(&v).map_err(|e| Error::Storage(format!("capacity group: {e}")))?,
            );
        }
        Ok(out)
    }
}

fn cf_handle<'a>(db: &'a DB, name: &str) -> StoreResult<&'a ColumnFamily> {
    db.cf_handle(name).ok_or_else(|| {
        StorageIOError::read(&std::io::Error::other(format!(
            "column family {name} is missing"
        )))
        .into()
    })
}

/// Log keys are big-endian indexes so that RocksDB's byte order is log order.
fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn sync_write_options() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

/// Runs a blocking disk operation (an fsync) without stalling the other tasks of this tokio worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
