//! Snapshots as files: built on one store, streamed in chunks into another and installed there;
//! an install cut short finished at start; the previous release's in-RocksDB snapshot moved into a
//! file.

use std::collections::BTreeMap;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::store_test::{agent, apply_at, batch_job, capacity_group};
use super::{cf, StateMachine, StateReader};
use crate::command::Command;
use crate::model::CapacityGroup;

fn group(name: &str, padding: usize) -> CapacityGroup {
    capacity_group(&format!("{name}{}", "x".repeat(padding)))
}

/// Every record of every replicated family (and sm_meta), as RocksDB holds them; but the
/// membership, which an install writes from the snapshot's metadata (these stores never applied one).
fn state_of(reader: &StateReader) -> BTreeMap<(String, Vec<u8>), Vec<u8>> {
    let mut out = BTreeMap::new();
    for name in cf::STATE.iter().copied().chain([cf::SM_META]) {
        let family = reader.db.cf_handle(name).unwrap();
        for item in reader.db.iterator_cf(family, rocksdb::IteratorMode::Start) {
            let (k, v) = item.unwrap();
            if name == cf::SM_META && &*k == cf::sm_meta::MEMBERSHIP {
                continue;
            }
            out.insert((name.to_string(), k.to_vec()), v.to_vec());
        }
    }
    out
}

fn store_with(groups: std::ops::Range<usize>, padding: usize) -> (TempDir, StateMachine, StateReader) {
    let dir = TempDir::new().unwrap();
    let (_log, mut sm, reader) = super::open(dir.path(), 1).unwrap();
    for (index, i) in groups.enumerate() {
        let command =
            Command::CreateCapacityGroup { group: group(&format!("g{i:05}-"), padding), idempotency_token: None };
        apply_at(&mut sm, index as u64 + 1, command);
    }
    (dir, sm, reader)
}

/// Sends `snapshot` to `to` as openraft does: chunk by chunk at their offsets, then installs it.
async fn stream_into(to: &mut StateMachine, snapshot: crate::raft_types::Snapshot, chunk: usize) {
    let mut from = snapshot.snapshot;
    let end = from.seek(std::io::SeekFrom::End(0)).await.unwrap();
    let mut received = to.begin_receiving_snapshot().await.unwrap();
    let mut offset = 0u64;
    while offset < end {
        from.seek(std::io::SeekFrom::Start(offset)).await.unwrap();
        let mut buf = vec![0u8; chunk.min((end - offset) as usize)];
        from.read_exact(&mut buf).await.unwrap();
        received.seek(std::io::SeekFrom::Start(offset)).await.unwrap();
        received.write_all(&buf).await.unwrap();
        offset += buf.len() as u64;
    }
    to.install_snapshot(&snapshot.meta, received).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_streams_in_chunks_into_another_store_and_replaces_its_state() {
    // 3,000 records of ~1 KiB: many install batches are not needed for correctness, but several
    // chunks are.
    let (_a_dir, mut a, a_reader) = store_with(0..3_000, 1_000);
    let (b_dir, mut b, b_reader) = store_with(5_000..5_100, 10);
    let built = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let meta = built.meta.clone();
    stream_into(&mut b, built, 256 << 10).await;

    assert_eq!(state_of(&b_reader), state_of(&a_reader), "the installed state is the snapshot's, whole");
    assert_eq!(b.applied_state().await.unwrap().0, meta.last_log_id);
    let current = b.get_current_snapshot().await.unwrap().expect("the received snapshot is kept");
    assert_eq!(current.meta, meta);
    // One file, the current one: the part file was renamed, nothing is left behind.
    let files: Vec<_> =
        std::fs::read_dir(b_dir.path().join("snapshots")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files.len(), 1, "{files:?}");

    // A newer build replaces the file; a reader holding the old one still reads it whole.
    let mut held = a.get_current_snapshot().await.unwrap().unwrap();
    apply_at(&mut a, 3_001, Command::CreateCapacityGroup { group: group("later", 0), idempotency_token: None });
    let newer = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert!(newer.meta.last_log_id > meta.last_log_id);
    let mut old = Vec::new();
    held.snapshot.read_to_end(&mut old).await.unwrap();
    assert!(old.len() > 3_000 * 1_000, "the old snapshot read {} bytes", old.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_changes_nothing() {
    let (_a_dir, mut a, _) = store_with(0..50, 0);
    let (_b_dir, mut b, b_reader) = store_with(100..110, 0);
    let before = state_of(&b_reader);
    let built = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let mut data = Vec::new();
    let mut file = built.snapshot;
    file.read_to_end(&mut data).await.unwrap();
    let mut received = b.begin_receiving_snapshot().await.unwrap();
    received.write_all(&data[..data.len() - 10]).await.unwrap();
    let err = b.install_snapshot(&built.meta, received).await.expect_err("a truncated snapshot installed");
    assert!(err.to_string().contains("truncated"), "{err}");
    assert_eq!(state_of(&b_reader), before);
}

/// A crash between the first install batch and the last leaves the `installing` mark; the store
/// installs the snapshot again when it opens, before anything reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_cut_short_is_finished_when_the_store_opens() {
    let (_a_dir, mut a, a_reader) = store_with(0..200, 100);
    let (b_dir, mut b, b_reader) = store_with(300..310, 0);
    let built = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    stream_into(&mut b, built, 4 << 10).await;
    // What a cut-short install leaves: the mark, and a state that is neither the old nor the new.
    let snapshot = b_reader.db.cf_handle(cf::SNAPSHOT).unwrap();
    b_reader.db.put_cf(snapshot, cf::snapshot::INSTALLING, b"x").unwrap();
    let groups = b_reader.db.cf_handle(cf::CAPACITY_GROUPS).unwrap();
    b_reader.db.put_cf(groups, b"half-written", b"junk").unwrap();
    drop((b, b_reader));
    let (_log, _b, b_reader) = super::open(b_dir.path(), 1).unwrap();
    assert_eq!(state_of(&b_reader), state_of(&a_reader));
    let snapshot = b_reader.db.cf_handle(cf::SNAPSHOT).unwrap();
    assert!(b_reader.db.get_cf(snapshot, cf::snapshot::INSTALLING).unwrap().is_none());
}

/// The previous release kept the snapshot in RocksDB (`snapshot/data`); this one moves it into a
/// file when it opens and serves it as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_release_snapshot_is_moved_into_a_file() {
    let (dir, mut sm, reader) = store_with(0..20, 0);
    let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let mut data = Vec::new();
    let mut file = built.snapshot;
    file.read_to_end(&mut data).await.unwrap();
    // As the previous release stored it.
    let snapshot = reader.db.cf_handle(cf::SNAPSHOT).unwrap();
    reader.db.put_cf(snapshot, cf::snapshot::DATA, &data).unwrap();
    reader.db.delete_cf(snapshot, cf::snapshot::FILE).unwrap();
    drop((sm, reader));
    for f in std::fs::read_dir(dir.path().join("snapshots")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }

    let (_log, mut sm, reader) = super::open(dir.path(), 1).unwrap();
    let current = sm.get_current_snapshot().await.unwrap().expect("the stored snapshot");
    assert_eq!(current.meta, built.meta);
    let mut moved = Vec::new();
    let mut file = current.snapshot;
    file.read_to_end(&mut moved).await.unwrap();
    assert_eq!(moved, data);
    let snapshot = reader.db.cf_handle(cf::SNAPSHOT).unwrap();
    assert!(reader.db.get_cf(snapshot, cf::snapshot::DATA).unwrap().is_none(), "the value stays in RocksDB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installed_snapshot_brings_its_counts() {
    use crate::command::Assignment;
    let (_a_dir, mut a, a_reader) = store_with(0..0, 0);
    let (job, tasks) = batch_job("job-a", "a", 6);
    apply_at(&mut a, 1, Command::CreateJob { job, idempotency_token: None, token_expires_ms: 0 });
    apply_at(&mut a, 2, Command::CreateTasks { tasks, archive: vec![] });
    apply_at(&mut a, 3, Command::RegisterAgent { agent: agent("agent-1") });
    let assignments = vec![Assignment { task_id: "a00".into(), agent_id: "agent-1".into() }];
    apply_at(&mut a, 4, Command::AssignTasks { assignments, timestamp_ms: 2 });
    // The receiving store counted something else before.
    let (_b_dir, mut b, b_reader) = store_with(0..0, 0);
    let (job, tasks) = batch_job("job-b", "b", 2);
    apply_at(&mut b, 1, Command::CreateJob { job, idempotency_token: None, token_expires_ms: 0 });
    apply_at(&mut b, 2, Command::CreateTasks { tasks, archive: vec![] });
    apply_at(&mut b, 3, Command::RegisterAgent { agent: agent("gone") });
    apply_at(&mut b, 4, Command::AgentLost { agent_id: "gone".into(), timestamp_ms: 3 });
    assert_eq!(b_reader.counts().agents_lost, 1);

    let built = a.build_snapshot().await.unwrap();
    stream_into(&mut b, built, 4096).await;
    let counts = b_reader.counts();
    assert_eq!(counts, a_reader.counts());
    assert_eq!((counts.pending_tasks, counts.agents_online), (5, 1), "{counts:?}");
    assert_eq!(counts.tasks_in(crate::model::task::TaskState::Launched), 1, "{counts:?}");
}
