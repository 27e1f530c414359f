//! Durable storage of one replica: the Raft log, vote and state machine in one RocksDB instance,
//! one column family per kind of record (see [`cf`]).
//!
//! Knows openraft's storage traits and RocksDB; knows nothing of the API, the leader duties or the
//! scheduler.

pub mod cf;
mod counts;
mod log_store;
mod snapshot_data;
mod snapshots;
mod state_machine;

#[cfg(test)]
mod equivalence_test;
#[cfg(test)]
mod snapshots_test;
#[cfg(test)]
pub(crate) mod store_test;

use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use openraft::StorageIOError;
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteOptions, DB};

pub use counts::StateCounts;
pub use log_store::LogStore;
pub use snapshot_data::Families;
pub use state_machine::StateMachine;

use crate::codec;
use crate::error::{Error, Result};
use crate::events::ChangeLog;
use std::collections::BTreeMap;

use crate::model::agent::{Agent, InstanceGroup};
use crate::model::job::Job;
use crate::model::load_balancer::{LbTarget, LoadBalancer};
use crate::model::task::Task;
use crate::model::CapacityGroup;
use crate::model::ResourceDimension;
use crate::raft_types::{NodeId, StorageError};
use crate::state::{Allocation, StateRead, TokenRecord};

pub type StoreResult<T> = std::result::Result<T, StorageError>;

/// Opens (or creates) the store in `dir` for replica `node_id`. Fails with a clear error when the
/// directory belongs to another replica, or is locked by a running one.
pub fn open(dir: &Path, node_id: NodeId) -> Result<(LogStore, StateMachine, StateReader)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Config(format!("data-dir {}: {e}", dir.display())))?;
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let families = cf::all().map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    let db = DB::open_cf_descriptors(&opts, dir, families).map_err(|e| {
        if e.to_string().contains("lock") {
            Error::Config(format!("data-dir {} is in use by another process: {e}", dir.display()))
        } else {
            Error::storage(format!("opening RocksDB in {}", dir.display()), e)
        }
    })?;
    match log_store::stored_node_id(&db).map_err(Error::from_storage)? {
        Some(stored) if stored != node_id => {
            return Err(Error::Config(format!(
            "data-dir {} belongs to replica {stored}, not to node-id {node_id}; point this replica at its own data dir",
            dir.display()
        )))
        }
        Some(_) => {}
        None => log_store::record_node_id(&db, node_id).map_err(Error::from_storage)?,
    }
    // Before anything reads the state: an install a crash cut short is finished first.
    let snapshots = Arc::new(snapshots::Snapshots::open(dir)?);
    snapshots.recover(&db)?;
    let rebuilt = rebuild_agent_index(&db)?;
    if rebuilt > 0 {
        tracing::info!(tasks = rebuilt, "rebuilt the by-agent task index");
    }
    let counts = counts::Counts::default();
    counts.reset(StateCounts::scan(&db)?);
    let db = Arc::new(db);
    let applied = applied_index(&db)?;
    let reader = StateReader {
        db: db.clone(),
        counts,
        cluster_id: Arc::new(RwLock::new(None)),
        codec_version: Arc::new(AtomicU8::new(codec::JSON)),
        changes: Arc::new(ChangeLog::new(CHANGE_LOG_CAPACITY, CHANGE_LOG_BYTES, applied)),
    };
    reader.reload_cluster_meta()?;
    Ok((LogStore::new(db.clone()), StateMachine::new(db, snapshots, reader.clone()), reader))
}

/// Read-only access to the applied state, for the API. What it returns is what this replica has
/// applied; linearizability is the caller's business (read index first).
#[derive(Clone)]
pub struct StateReader {
    db: Arc<DB>,
    /// Checked on every peer message; cached so that check costs no disk read.
    cluster_id: Arc<RwLock<Option<String>>>,
    /// The codec version the cluster writes, as of the last applied entry (see
    /// `Command::SetCodecVersion`); the process writes it too (`codec::set_write_version`).
    codec_version: Arc<AtomicU8>,
    /// Applied job and task changes, for observers.
    pub changes: Arc<ChangeLog>,
    /// Counts of the applied state (tasks by state, agents), kept on apply.
    counts: counts::Counts,
}

/// Applied entries whose changes are kept for resuming observers.
const CHANGE_LOG_CAPACITY: usize = 8192;
/// ...and at most this many bytes of records (as encoded in the store; in memory they take a few
/// times that). A million-task placement run once held 4.7 GB on the leader in 8,192 batches of
/// 500 full task records.
const CHANGE_LOG_BYTES: usize = 64 << 20;

fn applied_index(db: &DB) -> Result<u64> {
    let cf = cf_handle(db, cf::SM_META).map_err(Error::from_storage)?;
    applied_index_of(db.get_cf(cf, cf::sm_meta::LAST_APPLIED))
}

/// The index in a stored `sm_meta/last_applied` value (0 before anything is applied).
fn applied_index_of(stored: std::result::Result<Option<Vec<u8>>, rocksdb::Error>) -> Result<u64> {
    let applied: Option<crate::raft_types::LogId> = match stored.map_err(Error::from_storage)? {
        Some(b) => codec::decode(&b).map_err(|e| Error::storage("last applied", e))?,
        None => None,
    };
    Ok(applied.map(|l| l.index).unwrap_or(0))
}

/// `job_id/task_id`: the key of a job's task in the by-job indexes.
pub(crate) fn index_key(job_id: &str, task_id: &str) -> Vec<u8> {
    format!("{job_id}/{task_id}").into_bytes()
}

/// Finish time then job id: the archive's retention order.
pub(crate) fn archive_order_key(finished_ms: i64, job_id: &str) -> Vec<u8> {
    let mut k = (finished_ms.max(0) as u64).to_be_bytes().to_vec();
    k.extend_from_slice(job_id.as_bytes());
    k
}

/// A consistent read of every active job and task, and the revision (applied index) it reflects.
#[derive(Debug, Default)]
pub struct RocksProperties {
    pub sst_bytes: Vec<(String, u64)>,
    /// RocksDB's estimate of the keys in each column family (memtables and files, deletes
    /// subtracted): cheap, and what shows a table growing (the idempotency tokens, say).
    pub estimated_keys: Vec<(String, u64)>,
    pub compaction_pending: Vec<(String, u64)>,
    pub write_stopped: u64,
}

pub struct JobsSnapshot {
    pub revision: u64,
    pub jobs: Vec<Job>,
    pub tasks: Vec<Task>,
}

impl StateReader {
    /// Counts of the applied state, as of the last applied entry: no scan.
    pub fn counts(&self) -> StateCounts {
        self.counts.get()
    }

    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id.read().map(|g| g.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    fn remember_cluster_id(&self, id: String) {
        let mut guard = self.cluster_id.write().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(id);
        }
    }

    /// Reads the cluster id and codec version from the store: when it is opened, and after a
    /// snapshot replaced the state.
    fn reload_cluster_meta(&self) -> Result<()> {
        let cf = cf_handle(&self.db, cf::SM_META).map_err(Error::from_storage)?;
        let stored: Option<String> = match self.db.get_cf(cf, cf::sm_meta::CLUSTER_ID).map_err(Error::from_storage)? {
            Some(b) => Some(codec::decode(&b).map_err(|e| Error::storage("cluster id", e))?),
            None => None,
        };
        *self.cluster_id.write().unwrap_or_else(|p| p.into_inner()) = stored;
        let version: u8 = match self.db.get_cf(cf, cf::sm_meta::CODEC_VERSION).map_err(Error::from_storage)? {
            Some(b) => codec::decode(&b).map_err(|e| Error::storage("codec version", e))?,
            None => codec::JSON,
        };
        codec::set_write_version(version).map_err(|e| Error::storage("codec version", e))?;
        self.codec_version.store(version, Ordering::Release);
        Ok(())
    }

    /// The codec version this cluster writes, as of the last applied entry.
    pub fn codec_version(&self) -> u8 {
        self.codec_version.load(Ordering::Acquire)
    }

    /// From the next entry on, this replica writes `version` (applied `SetCodecVersion`).
    fn adopt_codec_version(&self, version: u8) -> Result<()> {
        let now = self.codec_version.fetch_max(version, Ordering::AcqRel).max(version);
        codec::set_write_version(now).map_err(|e| Error::storage("codec version", e))
    }

    pub fn capacity_group(&self, name: &str) -> Result<Option<CapacityGroup>> {
        self.get(cf::CAPACITY_GROUPS, name.as_bytes())
    }

    pub fn capacity_groups(&self) -> Result<Vec<CapacityGroup>> {
        self.all(cf::CAPACITY_GROUPS)
    }

    /// Audit records after sequence `after` that `keep` accepts, oldest first, at most `limit`;
    /// looks at no more than `scan` records, so a filter matching nothing stays cheap. Also
    /// answers the last sequence looked at (where the next page starts).
    pub fn audit_records(
        &self,
        after: u64,
        limit: usize,
        scan: usize,
        keep: impl Fn(&crate::command::AuditRecord) -> bool,
    ) -> Result<(Vec<(u64, crate::command::AuditRecord)>, u64)> {
        let cf = cf_handle(&self.db, cf::AUDIT).map_err(Error::from_storage)?;
        let from = after.saturating_add(1).to_be_bytes();
        let mut out = Vec::new();
        let mut last = after;
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward)).take(scan)
        {
            let (k, v) = item.map_err(Error::from_storage)?;
            let seq =
                u64::from_be_bytes(k.as_ref().try_into().map_err(|_| Error::storage_msg("audit key is not 8 bytes"))?);
            last = seq;
            let record: crate::command::AuditRecord = codec::decode(&v).map_err(|e| Error::storage("audit", e))?;
            if keep(&record) {
                out.push((seq, record));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok((out, last))
    }
}

impl StateReader {
    /// The state as it is now: every read goes to the live store.
    fn live(&self) -> StateView<'_> {
        StateView { db: &self.db, snapshot: None, counts: None }
    }

    /// The state at one applied index: every read through the view sees the same state, so a
    /// query's reads (active records, then finished ones; a job, then its tasks) cannot straddle an
    /// entry that moves a record between them.
    pub fn snapshot(&self) -> StateView<'_> {
        let (snapshot, counts) = self.counts.consistent(|| self.db.snapshot());
        StateView { db: &self.db, snapshot: Some(snapshot), counts: Some(counts) }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, family: &str, key: &[u8]) -> Result<Option<T>> {
        self.live().get(family, key)
    }

    fn all<T: serde::de::DeserializeOwned>(&self, family: &str) -> Result<Vec<T>> {
        self.live().all(family)
    }

    pub fn archived_jobs(&self) -> Result<Vec<Job>> {
        self.all(cf::ARCHIVED_JOBS)
    }

    pub fn tasks(&self) -> Result<Vec<Task>> {
        self.all(cf::TASKS)
    }

    pub fn archived_tasks(&self) -> Result<Vec<Task>> {
        self.all(cf::ARCHIVED_TASKS)
    }

    /// The ids of the `limit` archived jobs that finished last, newest first (reads `limit` keys).
    pub fn newest_archived_job_ids(&self, limit: usize) -> Result<Vec<String>> {
        let cf = cf_handle(&self.db, cf::ARCHIVE_ORDER).map_err(Error::from_storage)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::End).take(limit) {
            let (k, _) = item.map_err(Error::from_storage)?;
            if k.len() > 8 {
                out.push(String::from_utf8_lossy(&k[8..]).into_owned());
            }
        }
        Ok(out)
    }

    /// Up to `limit` archived jobs that finished before `before_ms`, oldest first.
    pub fn archived_jobs_finished_before(&self, before_ms: i64, limit: usize) -> Result<Vec<String>> {
        let cf = cf_handle(&self.db, cf::ARCHIVE_ORDER).map_err(Error::from_storage)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, _) = item.map_err(Error::from_storage)?;
            if k.len() < 8 || out.len() >= limit {
                break;
            }
            let ts = u64::from_be_bytes(k[..8].try_into().unwrap_or([0; 8])) as i64;
            if ts >= before_ms {
                break;
            }
            out.push(String::from_utf8_lossy(&k[8..]).into_owned());
        }
        Ok(out)
    }

    /// Up to `limit` idempotency tokens that expired before `now_ms`, among at most `budget`
    /// records from the key `from` on (from the start when None). Answers them and the key the
    /// next call starts from — None once the end was reached — so that purging a large table is
    /// spread over many calls, each of bounded cost.
    pub fn expired_tokens(
        &self,
        now_ms: i64,
        from: Option<&str>,
        limit: usize,
        budget: usize,
    ) -> Result<(Vec<String>, Option<String>)> {
        let cf = cf_handle(&self.db, cf::IDEMPOTENCY_TOKENS).map_err(Error::from_storage)?;
        let mode = match from {
            Some(key) => rocksdb::IteratorMode::From(key.as_bytes(), rocksdb::Direction::Forward),
            None => rocksdb::IteratorMode::Start,
        };
        let mut out = Vec::new();
        let mut seen = 0;
        for item in self.db.iterator_cf(cf, mode) {
            let (k, v) = item.map_err(Error::from_storage)?;
            if out.len() >= limit || seen >= budget {
                return Ok((out, Some(String::from_utf8_lossy(&k).into_owned())));
            }
            seen += 1;
            match codec::decode::<TokenRecord>(&v) {
                Ok(r) if r.expires_ms < now_ms => out.push(String::from_utf8_lossy(&k).into_owned()),
                Ok(_) => {}
                // Unreadable records are dropped rather than kept forever.
                Err(_) => out.push(String::from_utf8_lossy(&k).into_owned()),
            }
        }
        Ok((out, None))
    }

    /// Every active job and task as of one applied index, read from one RocksDB snapshot.
    pub fn jobs_snapshot(&self) -> Result<JobsSnapshot> {
        let view = self.db.snapshot();
        let meta = cf_handle(&self.db, cf::SM_META).map_err(Error::from_storage)?;
        let revision = applied_index_of(view.get_cf(meta, cf::sm_meta::LAST_APPLIED))?;
        fn decode_all<T: serde::de::DeserializeOwned>(
            db: &DB,
            view: &rocksdb::Snapshot<'_>,
            family: &str,
        ) -> Result<Vec<T>> {
            let cf = cf_handle(db, family).map_err(Error::from_storage)?;
            view.iterator_cf(cf, rocksdb::IteratorMode::Start)
                .map(|item| {
                    let (_, v) = item.map_err(Error::from_storage)?;
                    codec::decode(&v).map_err(|e| Error::storage(family, e))
                })
                .collect()
        }
        let jobs = decode_all(&self.db, &view, cf::JOBS)?;
        let tasks = decode_all(&self.db, &view, cf::TASKS)?;
        Ok(JobsSnapshot { revision, jobs, tasks })
    }
}

/// Reads of the replicated state: from the live store, or from one RocksDB snapshot of it
/// ([`StateReader::snapshot`]).
pub struct StateView<'a> {
    db: &'a DB,
    snapshot: Option<rocksdb::Snapshot<'a>>,
    /// The counts of the snapshot's state (a snapshot view only).
    counts: Option<StateCounts>,
}

impl<'a> StateView<'a> {
    /// The counts of this view's state (taken with it); `None` for the live state.
    pub fn counts(&self) -> Option<&StateCounts> {
        self.counts.as_ref()
    }

    /// The records of `family` whose key comes after `after` (from the first when it is empty),
    /// in key order, each decoded only when the iterator reaches it: a page reads what it shows.
    pub fn records_after<'s, T: serde::de::DeserializeOwned + 's>(
        &'s self,
        family: &'static str,
        after: &str,
    ) -> Result<impl Iterator<Item = Result<T>> + 's> {
        let cf = cf_handle(self.db, family).map_err(Error::from_storage)?;
        let after = after.as_bytes().to_vec();
        let mode = rocksdb::IteratorMode::From(&after, rocksdb::Direction::Forward);
        let records = self.db.iterator_cf_opt(cf, self.options(), mode);
        Ok(records.filter(move |item| item.as_ref().map_or(true, |(k, _)| after.is_empty() || **k != *after)).map(
            move |item| {
                let (_, v) = item.map_err(Error::from_storage)?;
                codec::decode(&v).map_err(|e| Error::storage(family, e))
            },
        ))
    }

    /// Every finished job still in the archive.
    pub fn archived_jobs(&self) -> Result<Vec<Job>> {
        self.all(cf::ARCHIVED_JOBS)
    }

    fn options(&self) -> rocksdb::ReadOptions {
        let mut options = rocksdb::ReadOptions::default();
        if let Some(snapshot) = &self.snapshot {
            options.set_snapshot(snapshot);
        }
        options
    }

    fn get<T: serde::de::DeserializeOwned>(&self, family: &str, key: &[u8]) -> Result<Option<T>> {
        let cf = cf_handle(self.db, family).map_err(Error::from_storage)?;
        match self.db.get_pinned_cf_opt(cf, key, &self.options()).map_err(Error::from_storage)? {
            Some(b) => Ok(Some(codec::decode(&b).map_err(|e| Error::storage(family, e))?)),
            None => Ok(None),
        }
    }

    fn all<T: serde::de::DeserializeOwned>(&self, family: &str) -> Result<Vec<T>> {
        let cf = cf_handle(self.db, family).map_err(Error::from_storage)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(cf, self.options(), rocksdb::IteratorMode::Start) {
            let (_, v) = item.map_err(Error::from_storage)?;
            out.push(codec::decode(&v).map_err(|e| Error::storage(family, e))?);
        }
        Ok(out)
    }

    /// Task ids under `job_id/` in a by-job index.
    fn ids_with_prefix(&self, family: &str, job_id: &str) -> Result<Vec<String>> {
        let cf = cf_handle(self.db, family).map_err(Error::from_storage)?;
        let prefix = format!("{job_id}/");
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(
            cf,
            self.options(),
            rocksdb::IteratorMode::From(prefix.as_bytes(), rocksdb::Direction::Forward),
        ) {
            let (k, _) = item.map_err(Error::from_storage)?;
            let Some(rest) = k.strip_prefix(prefix.as_bytes()) else { break };
            out.push(String::from_utf8_lossy(rest).into_owned());
        }
        Ok(out)
    }

    /// Visits the by-agent index under `prefix` ("" for all): (agent id, the task's resources).
    fn scan_agent_index(&self, prefix: &str, mut visit: impl FnMut(&str, ResourceDimension)) -> Result<()> {
        let cf = cf_handle(self.db, cf::TASKS_BY_AGENT).map_err(Error::from_storage)?;
        let mode = rocksdb::IteratorMode::From(prefix.as_bytes(), rocksdb::Direction::Forward);
        for item in self.db.iterator_cf_opt(cf, self.options(), mode) {
            let (k, v) = item.map_err(Error::from_storage)?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            let key = String::from_utf8_lossy(&k);
            let agent = key.rsplit_once('/').map(|(a, _)| a).unwrap_or_default();
            let r = codec::decode(&v).map_err(|e| Error::storage(cf::TASKS_BY_AGENT, e))?;
            visit(agent, r);
        }
        Ok(())
    }
}

impl StateRead for StateView<'_> {
    fn job(&self, id: &str) -> Result<Option<Job>> {
        self.get(cf::JOBS, id.as_bytes())
    }
    fn task(&self, id: &str) -> Result<Option<Task>> {
        self.get(cf::TASKS, id.as_bytes())
    }
    fn task_ids_of_job(&self, job_id: &str) -> Result<Vec<String>> {
        self.ids_with_prefix(cf::TASKS_BY_JOB, job_id)
    }
    fn jobs(&self) -> Result<Vec<Job>> {
        self.all(cf::JOBS)
    }
    fn capacity_group(&self, name: &str) -> Result<Option<CapacityGroup>> {
        self.get(cf::CAPACITY_GROUPS, name.as_bytes())
    }
    fn token(&self, key: &str) -> Result<Option<TokenRecord>> {
        self.get(cf::IDEMPOTENCY_TOKENS, key.as_bytes())
    }
    fn archived_job(&self, id: &str) -> Result<Option<Job>> {
        self.get(cf::ARCHIVED_JOBS, id.as_bytes())
    }
    fn archived_task(&self, id: &str) -> Result<Option<Task>> {
        self.get(cf::ARCHIVED_TASKS, id.as_bytes())
    }
    fn archived_task_ids_of_job(&self, job_id: &str) -> Result<Vec<String>> {
        self.ids_with_prefix(cf::ARCHIVED_TASKS_BY_JOB, job_id)
    }
    fn all_tasks(&self) -> Result<Vec<Task>> {
        self.all(cf::TASKS)
    }
    fn agent(&self, id: &str) -> Result<Option<Agent>> {
        self.get(cf::AGENTS, id.as_bytes())
    }
    fn agents(&self) -> Result<Vec<Agent>> {
        self.all(cf::AGENTS)
    }
    fn instance_group(&self, id: &str) -> Result<Option<InstanceGroup>> {
        self.get(cf::INSTANCE_GROUPS, id.as_bytes())
    }
    fn load_balancers(&self) -> Result<Vec<LoadBalancer>> {
        self.all(cf::LOAD_BALANCERS)
    }
    fn lb_targets(&self) -> Result<Vec<LbTarget>> {
        self.all(cf::LB_TARGETS)
    }
    fn task_ids_on_agent(&self, agent_id: &str) -> Result<Vec<String>> {
        self.ids_with_prefix(cf::TASKS_BY_AGENT, agent_id)
    }
    fn allocation_of(&self, agent_id: &str) -> Result<Allocation> {
        let mut out = Allocation::default();
        self.scan_agent_index(&format!("{agent_id}/"), |_, r| {
            out.resources.add(&r);
            out.live_tasks += 1;
        })?;
        Ok(out)
    }
    fn allocations(&self) -> Result<BTreeMap<String, Allocation>> {
        let mut out: BTreeMap<String, Allocation> = BTreeMap::new();
        self.scan_agent_index("", |agent, r| {
            let a = out.entry(agent.to_string()).or_default();
            a.resources.add(&r);
            a.live_tasks += 1;
        })?;
        Ok(out)
    }
    fn as_read(&self) -> &dyn StateRead {
        self
    }
}

/// The live state: the same reads as a [`StateView`] without a snapshot.
impl StateRead for StateReader {
    fn job(&self, id: &str) -> Result<Option<Job>> {
        self.live().job(id)
    }
    fn task(&self, id: &str) -> Result<Option<Task>> {
        self.live().task(id)
    }
    fn task_ids_of_job(&self, job_id: &str) -> Result<Vec<String>> {
        self.live().task_ids_of_job(job_id)
    }
    fn jobs(&self) -> Result<Vec<Job>> {
        self.live().jobs()
    }
    fn capacity_group(&self, name: &str) -> Result<Option<CapacityGroup>> {
        self.live().capacity_group(name)
    }
    fn token(&self, key: &str) -> Result<Option<TokenRecord>> {
        self.live().token(key)
    }
    fn archived_job(&self, id: &str) -> Result<Option<Job>> {
        self.live().archived_job(id)
    }
    fn archived_task(&self, id: &str) -> Result<Option<Task>> {
        self.live().archived_task(id)
    }
    fn archived_task_ids_of_job(&self, job_id: &str) -> Result<Vec<String>> {
        self.live().archived_task_ids_of_job(job_id)
    }
    fn all_tasks(&self) -> Result<Vec<Task>> {
        self.live().all_tasks()
    }
    fn agent(&self, id: &str) -> Result<Option<Agent>> {
        self.live().agent(id)
    }
    fn agents(&self) -> Result<Vec<Agent>> {
        self.live().agents()
    }
    fn instance_group(&self, id: &str) -> Result<Option<InstanceGroup>> {
        self.live().instance_group(id)
    }
    fn load_balancers(&self) -> Result<Vec<LoadBalancer>> {
        self.live().load_balancers()
    }
    fn lb_targets(&self) -> Result<Vec<LbTarget>> {
        self.live().lb_targets()
    }
    fn task_ids_on_agent(&self, agent_id: &str) -> Result<Vec<String>> {
        self.live().task_ids_on_agent(agent_id)
    }
    fn allocation_of(&self, agent_id: &str) -> Result<Allocation> {
        self.live().allocation_of(agent_id)
    }
    fn allocations(&self) -> Result<BTreeMap<String, Allocation>> {
        self.live().allocations()
    }
    fn as_read(&self) -> &dyn StateRead {
        self
    }
}

/// Builds the by-agent index from the tasks when the state predates it (a store or snapshot
/// written before the index existed: no `agent_index` mark in `sm_meta`); every live task placed on
/// an agent gets its entry. The mark is written with the entries (and travels in snapshots), so a
/// store that has the index is never scanned at start-up.
pub(crate) fn rebuild_agent_index(db: &DB) -> Result<usize> {
    let index = cf_handle(db, cf::TASKS_BY_AGENT).map_err(Error::from_storage)?;
    let meta = cf_handle(db, cf::SM_META).map_err(Error::from_storage)?;
    if db.get_pinned_cf(meta, cf::sm_meta::AGENT_INDEX).map_err(Error::from_storage)?.is_some() {
        return Ok(0);
    }
    let (tasks, jobs) =
        (cf_handle(db, cf::TASKS).map_err(Error::from_storage)?, cf_handle(db, cf::JOBS).map_err(Error::from_storage)?);
    let mut batch = rocksdb::WriteBatch::default();
    let mut job_of: BTreeMap<String, Option<Job>> = BTreeMap::new();
    let mut n = 0;
    for item in db.iterator_cf(tasks, rocksdb::IteratorMode::Start) {
        let (_, v) = item.map_err(Error::from_storage)?;
        let t: Task = codec::decode(&v).map_err(Error::from_storage)?;
        let Some(agent) = crate::state::agent_of(&t).filter(|_| t.state().is_live()) else { continue };
        if t.resources.is_none() && !job_of.contains_key(&t.job_id) {
            let job: Option<Job> = db
                .get_cf(jobs, t.job_id.as_bytes())
                .map_err(Error::from_storage)?
                .map(|b| codec::decode(&b))
                .transpose()
                .map_err(Error::from_storage)?;
            job_of.insert(t.job_id.clone(), job);
        }
        let held = t.held(job_of.get(&t.job_id).and_then(Option::as_ref));
        batch.put_cf(index, agent_index_key(agent, &t.id), codec::encode(&held).map_err(Error::from_storage)?);
        n += 1;
    }
    batch.put_cf(meta, cf::sm_meta::AGENT_INDEX, b"1");
    db.write(batch).map_err(Error::from_storage)?;
    Ok(n)
}

/// A backup: the replicated state as of one applied index.
pub struct Backup {
    pub applied_index: u64,
    /// The backup file's bytes (the snapshot data layout, replicated column families only).
    pub data: Vec<u8>,
}

/// The records of a backup file, each family checked to be one this release replicates.
pub fn decode_backup(bytes: &[u8]) -> Result<Families> {
    let families = snapshot_data::decode_snapshot_data(bytes).map_err(|e| Error::invalid("backup", e.to_string()))?;
    if let Some((name, _)) = families.iter().find(|(name, _)| !cf::in_backups(name)) {
        return Err(Error::invalid("backup", format!("carries {name:?}, which is not a replicated column family")));
    }
    Ok(families)
}

/// `agent_id/task_id`: the key of a placed task in the by-agent index.
pub(crate) fn agent_index_key(agent_id: &str, task_id: &str) -> Vec<u8> {
    format!("{agent_id}/{task_id}").into_bytes()
}

impl StateReader {
    /// The replicated state as of the newest applied index, read from one RocksDB snapshot.
    pub fn backup(&self) -> Result<Backup> {
        let view = self.db.snapshot();
        let meta = cf_handle(&self.db, cf::SM_META).map_err(Error::from_storage)?;
        let applied_index = applied_index_of(view.get_cf(meta, cf::sm_meta::LAST_APPLIED))?;
        let names = cf::STATE.iter().copied().filter(|n| cf::in_backups(n));
        let mut out = std::io::Cursor::new(Vec::new());
        snapshots::write_families(&self.db, &view, names, &mut out)?;
        Ok(Backup { applied_index, data: out.into_inner() })
    }

    pub fn instance_groups(&self) -> Result<Vec<InstanceGroup>> {
        self.all(cf::INSTANCE_GROUPS)
    }

    /// The commit index openraft last saved (for metrics; it may trail the leader's by a heartbeat).
    pub fn committed_index(&self) -> u64 {
        self.get::<Option<crate::raft_types::LogId>>(cf::RAFT_META, cf::raft_meta::COMMITTED)
            .ok()
            .flatten()
            .flatten()
            .map(|l| l.index)
            .unwrap_or(0)
    }

    /// RocksDB's own gauges, for metrics: SST bytes and pending compaction per column family, and
    /// whether writes are stopped.
    pub fn rocksdb_properties(&self) -> RocksProperties {
        let mut p = RocksProperties::default();
        for name in cf::all() {
            let Some(handle) = self.db.cf_handle(name) else { continue };
            let int = |prop: &str| self.db.property_int_value_cf(handle, prop).ok().flatten().unwrap_or(0);
            p.sst_bytes.push((name.to_string(), int("rocksdb.total-sst-files-size")));
            p.estimated_keys.push((name.to_string(), int("rocksdb.estimate-num-keys")));
            p.compaction_pending.push((name.to_string(), int("rocksdb.compaction-pending")));
        }
        p.write_stopped = self.db.property_int_value("rocksdb.is-write-stopped").ok().flatten().unwrap_or(0);
        p
    }

    /// The load balancer targets recorded for one task (keys start with its id).
    pub fn lb_targets_of_task(&self, task_id: &str) -> Result<Vec<LbTarget>> {
        let cf = cf_handle(&self.db, cf::LB_TARGETS).map_err(Error::from_storage)?;
        let prefix = format!("{task_id}/");
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::From(prefix.as_bytes(), rocksdb::Direction::Forward))
        {
            let (k, v) = item.map_err(Error::from_storage)?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            out.push(codec::decode(&v).map_err(|e| Error::storage(cf::LB_TARGETS, e))?);
        }
        Ok(out)
    }
}

fn cf_handle<'a>(db: &'a DB, name: &str) -> StoreResult<&'a ColumnFamily> {
    db.cf_handle(name)
        .ok_or_else(|| StorageIOError::read(&std::io::Error::other(format!("column family {name} is missing"))).into())
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
