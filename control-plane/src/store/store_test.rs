//! openraft's storage conformance suite against the RocksDB store, plus durability checks of our own.

use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

use super::{LogStore, StateMachine};
use crate::raft_types::{StorageError, TypeConfig};

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm, _) = super::open(dir.path(), 1).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(RocksBuilder)?;
    Ok(())
}

#[test]
fn data_dir_of_another_replica_is_refused() {
    let dir = TempDir::new().unwrap();
    drop(super::open(dir.path(), 1).unwrap());
    let err = super::open(dir.path(), 2).err().expect("must refuse");
    assert!(err.to_string().contains("belongs to replica 1"), "{err}");
    assert!(super::open(dir.path(), 1).is_ok());
}
