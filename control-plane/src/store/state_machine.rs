//! The replicated state machine: applies committed [`Command`]s to RocksDB column families, builds
//! and installs snapshots.
//!
//! Every entry is applied as one `WriteBatch` that also records the new last-applied log id, so the
//! state and the log position it reflects can never disagree after a crash. These writes are not
//! synced on their own: an entry whose effect is lost in a crash is still in the (synced) log and is
//! applied again. A snapshot is written synced before the log behind it may be purged; since all
//! column families share one WAL, that sync also makes every earlier apply durable.

use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use rocksdb::{IteratorMode, WriteBatch, DB};

use super::snapshots::Snapshots;
use super::{cf_handle, StateReader, StoreResult};
use crate::apply::{Applied, StoreCommand};
use crate::codec;
use crate::command::{AuditRecord, Command, CommandResponse, Rejection, RejectionKind};
use crate::events::{Change, ChangeBatch};
use crate::state::agent_of;
use crate::state::{Changes, Overlay, StateRead, TokenRecord, Write};
use crate::store::counts::{Counted, CountsDelta, StateCounts, TaskKind};
use crate::store::{agent_index_key, archive_order_key, index_key, rebuild_agent_index};

/// How long an audit batch's id is remembered: its proposer gives up retrying after a minute.
const AUDIT_BATCH_TTL_MS: i64 = 10 * 60 * 1000;

/// Encoding of any record, behind one object-safe trait so `write_changes` needs one helper.
mod erased {
    pub trait Encode {
        fn encode(&self) -> Result<Vec<u8>, crate::codec::CodecError>;
    }
    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Result<Vec<u8>, crate::codec::CodecError> {
            crate::codec::encode(self)
        }
    }
}
use crate::raft_types::{Entry, LogId, Snapshot, SnapshotFile, SnapshotMeta, StoredMembership, TypeConfig};
use crate::store::cf;

#[derive(Clone)]
pub struct StateMachine {
    db: Arc<DB>,
    /// Where snapshots are built, received and kept.
    snapshots: Arc<Snapshots>,
    /// Shares the cluster-id cache with readers, so applying `SetClusterId` is seen at once.
    reader: StateReader,
}

impl StateMachine {
    pub(super) fn new(db: Arc<DB>, snapshots: Arc<Snapshots>, reader: StateReader) -> Self {
        StateMachine { db, snapshots, reader }
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> StoreResult<Option<T>> {
        let cf = cf_handle(&self.db, cf::SM_META)?;
        let bytes = self.db.get_cf(cf, key).map_err(|e| StorageIOError::read_state_machine(&e))?;
        bytes.map(|b| codec::decode(&b).map_err(|e| StorageIOError::read_state_machine(&e).into())).transpose()
    }

    /// Applies one command into `batch`. Reads see every earlier entry (each was written already).
    /// The rules are in [`crate::apply`]; this writes what they decided, and applies the commands
    /// that are about the store itself.
    fn apply_command(
        &self,
        batch: &mut WriteBatch,
        command: Command,
        changes: &mut Vec<Change>,
        counts: &mut CountsDelta,
    ) -> StoreResult<CommandResponse> {
        let mut overlay = Overlay::new(&self.reader);
        match crate::apply::apply(&mut overlay, command).map_err(|e| write_error(&e))? {
            Applied::Rule(response) => {
                self.write_changes(batch, overlay.into_changes(), changes, counts)?;
                Ok(response)
            }
            Applied::Store(command) => self.apply_store_command(batch, command),
        }
    }

    fn apply_store_command(&self, batch: &mut WriteBatch, command: StoreCommand) -> StoreResult<CommandResponse> {
        Ok(match command {
            StoreCommand::SetClusterId { cluster_id } => {
                if self.reader.cluster_id().is_none() {
                    let meta = cf_handle(&self.db, cf::SM_META)?;
                    batch.put_cf(
                        meta,
                        cf::sm_meta::CLUSTER_ID,
                        codec::encode(&cluster_id).map_err(|e| write_error(&e))?,
                    );
                }
                CommandResponse::Done
            }
            StoreCommand::SetCodecVersion { version } => {
                if !(codec::JSON..=codec::CURRENT_VERSION).contains(&version) {
                    return Ok(CommandResponse::Rejected(Rejection::new(
                        RejectionKind::InvalidArgument,
                        "version",
                        format!(
                            "codec version {version} is not one this release writes (1 to {})",
                            codec::CURRENT_VERSION
                        ),
                    )));
                }
                // Never lowered: a replica of the older release may already be gone for good.
                if version > self.reader.codec_version() {
                    let meta = cf_handle(&self.db, cf::SM_META)?;
                    batch.put_cf(
                        meta,
                        cf::sm_meta::CODEC_VERSION,
                        codec::encode(&version).map_err(|e| write_error(&e))?,
                    );
                }
                CommandResponse::Done
            }
            StoreCommand::RestoreBegin { restore_id, force } => self.restore_begin(batch, restore_id, force)?,
            StoreCommand::AppendAudit { records, keep, batch_id } => {
                // A batch proposed again after an unknown outcome is appended once: its id is kept
                // as a token for longer than its proposer retries it (a minute).
                if !batch_id.is_empty() {
                    let key = format!("audit-batch/{batch_id}");
                    if self.reader.token(&key).map_err(|e| write_error(&e))?.is_some() {
                        return Ok(CommandResponse::Done);
                    }
                    let newest = records.iter().map(|r| r.time_ms).max().unwrap_or(0);
                    let record =
                        TokenRecord { result: String::new(), expires_ms: newest.saturating_add(AUDIT_BATCH_TTL_MS) };
                    let tokens = cf_handle(&self.db, cf::IDEMPOTENCY_TOKENS)?;
                    batch.put_cf(tokens, key.as_bytes(), codec::encode(&record).map_err(|e| write_error(&e))?);
                }
                self.append_audit(batch, records, keep)?
            }
            StoreCommand::RestoreRecords { restore_id, family, records } => {
                if let Some(refused) = self.restore_refusal(&restore_id)? {
                    return Ok(refused);
                }
                if !cf::in_backups(&family) {
                    return Ok(CommandResponse::Rejected(Rejection::new(
                        RejectionKind::InvalidArgument,
                        "family",
                        format!("{family:?} is not a replicated column family a backup carries"),
                    )));
                }
                let staging = cf_handle(&self.db, cf::RESTORE_STAGING)?;
                for (k, v) in &records {
                    let mut staged = Vec::with_capacity(family.len() + 1 + k.len());
                    staged.extend_from_slice(family.as_bytes());
                    staged.push(0);
                    staged.extend_from_slice(k);
                    batch.put_cf(staging, staged, v);
                }
                CommandResponse::Done
            }
            StoreCommand::RestoreEnd { restore_id } => {
                // A retried end (its first attempt's outcome unknown to the caller) answers Done.
                if self.get_meta::<String>(cf::sm_meta::RESTORE_DONE)?.as_deref() == Some(restore_id.as_str()) {
                    return Ok(CommandResponse::Done);
                }
                if let Some(refused) = self.restore_refusal(&restore_id)? {
                    return Ok(refused);
                }
                self.restore_end(batch, &restore_id)?
            }
        })
    }

    /// Starts a restore: an empty staging area and the restore's id. Refused when the state holds
    /// jobs, tasks or capacity groups (a live cluster) unless `force`. The live state is not touched
    /// until `RestoreEnd`, so a restore cut short changes nothing.
    fn restore_begin(&self, batch: &mut WriteBatch, restore_id: String, force: bool) -> StoreResult<CommandResponse> {
        // A begin proposed again (its first outcome unknown) must not clear records staged since.
        if self.get_meta::<String>(cf::sm_meta::RESTORE)?.as_deref() == Some(restore_id.as_str()) {
            return Ok(CommandResponse::Done);
        }
        if self.get_meta::<String>(cf::sm_meta::RESTORE_DONE)?.as_deref() == Some(restore_id.as_str()) {
            return Ok(CommandResponse::Rejected(Rejection::new(
                RejectionKind::FailedPrecondition,
                "restore_id",
                format!("restore {restore_id} has already ended"),
            )));
        }
        if !force {
            for name in [cf::JOBS, cf::TASKS, cf::ARCHIVED_JOBS, cf::CAPACITY_GROUPS, cf::LOAD_BALANCERS] {
                let cf = cf_handle(&self.db, name)?;
                if let Some(item) = self.db.iterator_cf(cf, IteratorMode::Start).next() {
                    item.map_err(|e| write_error(&e))?;
                    return Ok(CommandResponse::Rejected(Rejection::new(
                        RejectionKind::FailedPrecondition,
                        "force",
                        format!("the cluster is not empty (it holds {name}); restore replaces the whole state, so it needs force"),
                    )));
                }
            }
        }
        self.clear_family(batch, cf::RESTORE_STAGING)?;
        let meta = cf_handle(&self.db, cf::SM_META)?;
        batch.put_cf(meta, cf::sm_meta::RESTORE, codec::encode(&restore_id).map_err(|e| write_error(&e))?);
        Ok(CommandResponse::Done)
    }

    /// Ends a restore in one batch: the live state is replaced by the staged records, but the agents
    /// registered with this cluster stay (connected ones register only when they attach); the
    /// backup's agents are written over them by id, and those that never attach are declared lost
    /// after the heartbeat TTL, their tasks replaced.
    fn restore_end(&self, batch: &mut WriteBatch, restore_id: &str) -> StoreResult<CommandResponse> {
        for name in cf::STATE.iter().copied().filter(|n| ![cf::AGENTS, cf::RESTORE_STAGING, cf::AUDIT].contains(n)) {
            self.clear_family(batch, name)?;
        }
        let staging = cf_handle(&self.db, cf::RESTORE_STAGING)?;
        for item in self.db.iterator_cf(staging, IteratorMode::Start) {
            let (staged, value) = item.map_err(|e| write_error(&e))?;
            let split = staged
                .iter()
                .position(|b| *b == 0)
                .ok_or_else(|| write_error(&AnyErr("staged key without a family".into())))?;
            let family = std::str::from_utf8(&staged[..split]).map_err(|e| write_error(&e))?;
            batch.put_cf(cf_handle(&self.db, family)?, &staged[split + 1..], value);
            batch.delete_cf(staging, staged);
        }
        let meta = cf_handle(&self.db, cf::SM_META)?;
        batch.delete_cf(meta, cf::sm_meta::RESTORE);
        batch.put_cf(meta, cf::sm_meta::RESTORE_DONE, codec::encode(restore_id).map_err(|e| write_error(&e))?);
        Ok(CommandResponse::Done)
    }

    /// Numbers the records after the last one kept and drops the oldest beyond `keep`.
    fn append_audit(
        &self,
        batch: &mut WriteBatch,
        records: Vec<AuditRecord>,
        keep: u64,
    ) -> StoreResult<CommandResponse> {
        let audit = cf_handle(&self.db, cf::AUDIT)?;
        let sequence_at = |mode| -> StoreResult<Option<u64>> {
            match self.db.iterator_cf(audit, mode).next() {
                None => Ok(None),
                Some(item) => {
                    let (k, _) = item.map_err(|e| write_error(&e))?;
                    let k: [u8; 8] =
                        k.as_ref().try_into().map_err(|_| write_error(&AnyErr("audit key is not 8 bytes".into())))?;
                    Ok(Some(u64::from_be_bytes(k)))
                }
            }
        };
        let first = sequence_at(IteratorMode::Start)?.unwrap_or(1);
        let mut next = sequence_at(IteratorMode::End)?.map_or(1, |last| last + 1);
        for r in &records {
            batch.put_cf(audit, next.to_be_bytes(), codec::encode(r).map_err(|e| write_error(&e))?);
            next += 1;
        }
        let keep_from = next.saturating_sub(keep.max(1));
        if keep_from > first {
            batch.delete_range_cf(audit, first.to_be_bytes(), keep_from.to_be_bytes());
        }
        Ok(CommandResponse::Done)
    }

    /// Deletes every record of `family` in `batch`.
    fn clear_family(&self, batch: &mut WriteBatch, family: &str) -> StoreResult<()> {
        let cf = cf_handle(&self.db, family)?;
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| write_error(&e))?;
            batch.delete_cf(cf, k);
        }
        Ok(())
    }

    /// Why a restore step cannot apply: no restore, or another one, is in progress.
    fn restore_refusal(&self, restore_id: &str) -> StoreResult<Option<CommandResponse>> {
        let current: Option<String> = self.get_meta(cf::sm_meta::RESTORE)?;
        Ok(match current {
            Some(id) if id == restore_id => None,
            other => Some(CommandResponse::Rejected(Rejection::new(
                RejectionKind::FailedPrecondition,
                "restore_id",
                match other {
                    Some(id) => format!("restore {restore_id} was superseded by restore {id}"),
                    None => format!("restore {restore_id} is not in progress"),
                },
            ))),
        })
    }

    /// Whether `family` holds `key` before this entry (nothing decoded).
    fn holds(&self, family: &rocksdb::ColumnFamily, key: &[u8]) -> StoreResult<bool> {
        Ok(self.db.get_pinned_cf(family, key).map_err(|e| write_error(&e))?.is_some())
    }

    /// Writes a job command's changes (and their indexes) into `batch`, lists them for observers,
    /// and says in `counts` how they move the state's counts.
    fn write_changes(
        &self,
        batch: &mut WriteBatch,
        mut c: Changes,
        out: &mut Vec<Change>,
        counts: &mut CountsDelta,
    ) -> StoreResult<()> {
        let indexed_before = std::mem::take(&mut c.tasks_indexed_before);
        let enc = |v: &dyn erased::Encode| v.encode().map_err(|e| write_error(&e));
        let (jobs, tasks, by_job) =
            (cf_handle(&self.db, cf::JOBS)?, cf_handle(&self.db, cf::TASKS)?, cf_handle(&self.db, cf::TASKS_BY_JOB)?);
        let (a_jobs, a_tasks, a_by_job, order) = (
            cf_handle(&self.db, cf::ARCHIVED_JOBS)?,
            cf_handle(&self.db, cf::ARCHIVED_TASKS)?,
            cf_handle(&self.db, cf::ARCHIVED_TASKS_BY_JOB)?,
            cf_handle(&self.db, cf::ARCHIVE_ORDER)?,
        );
        let tokens = cf_handle(&self.db, cf::IDEMPOTENCY_TOKENS)?;
        let by_agent = cf_handle(&self.db, cf::TASKS_BY_AGENT)?;
        for (id, w) in c.jobs {
            counts.record(Counted::Jobs, self.holds(jobs, id.as_bytes())?, matches!(w, Write::Put(_)));
            match w {
                Write::Put(j) => {
                    batch.put_cf(jobs, id.as_bytes(), enc(&j)?);
                    out.push(Change::Job(j));
                }
                Write::Delete(_) => batch.delete_cf(jobs, id.as_bytes()),
            }
        }
        for (id, w) in c.tasks {
            // Some(None): read and absent; Some(Some(i)): read, indexed as `i`; None: not read.
            let before = indexed_before.get(&id);
            let kind_before = match before {
                Some(b) => b.as_ref().map(TaskKind::of_indexed),
                None => self.reader.task(&id).map_err(|e| write_error(&e))?.as_ref().map(TaskKind::of),
            };
            counts.task(kind_before, w.current().map(TaskKind::of));
            if let Write::Put(t) = &w {
                count_task_event(kind_before.map(|k| k.state), t);
            }
            match w {
                Write::Put(t) => {
                    batch.put_cf(tasks, id.as_bytes(), enc(&t)?);
                    let was = before.and_then(Option::as_ref);
                    if was.is_none_or(|w| w.job_id != t.job_id) {
                        if let Some(moved) = was.filter(|w| w.job_id != t.job_id) {
                            batch.delete_cf(by_job, index_key(&moved.job_id, &id));
                        }
                        batch.put_cf(by_job, index_key(&t.job_id, &id), b"");
                    }
                    // A task's agent never changes once set: live → indexed there, else not.
                    if let Some(agent) = agent_of(&t) {
                        if t.state().is_live() {
                            // The entry holds what the task was placed with, which never changes:
                            // written once, when the task becomes live there.
                            let held = was.is_some_and(|w| w.live_on.as_deref() == Some(agent));
                            if !held {
                                let r = match t.resources {
                                    Some(_) => t.held(None),
                                    // Placed by a release that did not record it.
                                    None => t.held(self.reader.job(&t.job_id).map_err(|e| write_error(&e))?.as_ref()),
                                };
                                batch.put_cf(by_agent, agent_index_key(agent, &id), enc(&r)?);
                            }
                        } else {
                            let absent =
                                before.is_some_and(|b| b.as_ref().is_none_or(|w| w.live_on.as_deref() != Some(agent)));
                            if !absent {
                                batch.delete_cf(by_agent, agent_index_key(agent, &id));
                            }
                        }
                    }
                    out.push(Change::Task(t));
                }
                Write::Delete(t) => {
                    batch.delete_cf(tasks, id.as_bytes());
                    batch.delete_cf(by_job, index_key(&t.job_id, &id));
                    if let Some(agent) = agent_of(&t) {
                        batch.delete_cf(by_agent, agent_index_key(agent, &id));
                    }
                }
            }
        }
        for (id, w) in c.archived_jobs {
            counts.record(Counted::ArchivedJobs, self.holds(a_jobs, id.as_bytes())?, matches!(w, Write::Put(_)));
            match w {
                Write::Put(j) => {
                    batch.put_cf(a_jobs, id.as_bytes(), enc(&j)?);
                    batch.put_cf(order, archive_order_key(j.status.timestamp_ms, &id), b"");
                    out.push(Change::Job(j));
                }
                Write::Delete(j) => {
                    batch.delete_cf(a_jobs, id.as_bytes());
                    batch.delete_cf(order, archive_order_key(j.status.timestamp_ms, &id));
                }
            }
        }
        for (id, w) in c.archived_tasks {
            counts.record(Counted::ArchivedTasks, self.holds(a_tasks, id.as_bytes())?, matches!(w, Write::Put(_)));
            match w {
                Write::Put(t) => {
                    batch.put_cf(a_tasks, id.as_bytes(), enc(&t)?);
                    batch.put_cf(a_by_job, index_key(&t.job_id, &id), b"");
                    out.push(Change::Task(t));
                }
                Write::Delete(t) => {
                    batch.delete_cf(a_tasks, id.as_bytes());
                    batch.delete_cf(a_by_job, index_key(&t.job_id, &id));
                }
            }
        }
        let (agents, groups) = (cf_handle(&self.db, cf::AGENTS)?, cf_handle(&self.db, cf::INSTANCE_GROUPS)?);
        for (id, a) in c.agents {
            counts.agent(self.reader.agent(&id).map_err(|e| write_error(&e))?.as_ref(), Some(&a));
            batch.put_cf(agents, id.as_bytes(), enc(&a)?);
            out.push(Change::Agent(a));
        }
        for (id, g) in c.instance_groups {
            batch.put_cf(groups, id.as_bytes(), enc(&g)?);
            out.push(Change::InstanceGroup(g));
        }
        let (lbs, targets) = (cf_handle(&self.db, cf::LOAD_BALANCERS)?, cf_handle(&self.db, cf::LB_TARGETS)?);
        for (key, w) in c.load_balancers {
            match w {
                Write::Put(lb) => {
                    batch.put_cf(lbs, key.as_bytes(), enc(&lb)?);
                    out.push(Change::LoadBalancer(lb));
                }
                Write::Delete(lb) => {
                    batch.delete_cf(lbs, key.as_bytes());
                    out.push(Change::LoadBalancer(lb));
                }
            }
        }
        for (key, w) in c.lb_targets {
            match w {
                Write::Put(t) => {
                    batch.put_cf(targets, key.as_bytes(), enc(&t)?);
                    out.push(Change::LbTarget(t));
                }
                Write::Delete(t) => {
                    batch.delete_cf(targets, key.as_bytes());
                    out.push(Change::LbTarget(t));
                }
            }
        }
        let groups = cf_handle(&self.db, cf::CAPACITY_GROUPS)?;
        for (name, w) in c.capacity_groups {
            match w {
                Write::Put(g) => batch.put_cf(groups, name.as_bytes(), enc(&g)?),
                Write::Delete(_) => batch.delete_cf(groups, name.as_bytes()),
            }
        }
        for (key, record) in c.tokens {
            match record {
                Some(r) => batch.put_cf(tokens, key.as_bytes(), enc(&r)?),
                None => batch.delete_cf(tokens, key.as_bytes()),
            }
        }
        Ok(())
    }
}

/// A write error that keeps its source chain (openraft's `AnyError` records every source).
fn write_error<E: std::error::Error + 'static>(e: &E) -> StorageIOError<u64> {
    StorageIOError::write_state_machine(e)
}

/// Wraps an error message so it can be carried by openraft's `AnyError`.
#[derive(Debug)]
struct AnyErr(String);
impl std::fmt::Display for AnyErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for AnyErr {}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// Builds on a blocking thread from a RocksDB snapshot (consistent while applies go on) into a
    /// file: the leader's runtime threads keep sending heartbeats and answering calls meanwhile.
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot> {
        let started = std::time::Instant::now();
        let (db, snapshots) = (self.db.clone(), self.snapshots.clone());
        let built =
            off_runtime(move || snapshots.build(&db)).await.map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let m = crate::telemetry::metrics();
        m.snapshot_build_seconds.observe(&[], started.elapsed().as_secs_f64());
        m.snapshot_bytes.set(&[], built.bytes as f64);
        tracing::info!(snapshot_id = %built.meta.snapshot_id, bytes = built.bytes, "built snapshot");
        Ok(Snapshot { meta: built.meta, snapshot: Box::new(SnapshotFile::from_std(built.file, &built.path)) })
    }
}

/// Runs `f` on tokio's blocking pool (inline outside a runtime), so a snapshot's disk work never
/// holds an async worker thread.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> crate::error::Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn_blocking(f).await.map_err(|e| crate::error::Error::storage("a snapshot's blocking task", e))?
        }
        Err(_) => f(),
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> StoreResult<(Option<LogId>, StoredMembership)> {
        let last_applied = self.get_meta(cf::sm_meta::LAST_APPLIED)?;
        let membership = self.get_meta(cf::sm_meta::MEMBERSHIP)?.unwrap_or_default();
        Ok((last_applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<CommandResponse>>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
    {
        let mut responses = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            let mut batch = WriteBatch::default();
            let mut new_cluster_id = None;
            let mut new_codec_version = None;
            let mut changes = Vec::new();
            let mut counts = CountsDelta::default();
            let mut reset = false;
            let response = match entry.payload {
                EntryPayload::Blank => CommandResponse::Done,
                EntryPayload::Normal(command) => {
                    match &command {
                        Command::SetClusterId { cluster_id } => new_cluster_id = Some(cluster_id.clone()),
                        Command::SetCodecVersion { version } => new_codec_version = Some(*version),
                        _ => {}
                    }
                    let restore_end = matches!(command, Command::RestoreEnd { .. });
                    let response = self.apply_command(&mut batch, command, &mut changes, &mut counts)?;
                    reset = restore_end && matches!(response, CommandResponse::Done);
                    response
                }
                EntryPayload::Membership(membership) => {
                    let stored = StoredMembership::new(Some(log_id), membership);
                    batch.put_cf(
                        cf_handle(&self.db, cf::SM_META)?,
                        cf::sm_meta::MEMBERSHIP,
                        codec::encode(&stored).map_err(|e| StorageIOError::apply(log_id, &e))?,
                    );
                    CommandResponse::Done
                }
            };
            batch.put_cf(
                cf_handle(&self.db, cf::SM_META)?,
                cf::sm_meta::LAST_APPLIED,
                codec::encode(&Some(log_id)).map_err(|e| StorageIOError::apply(log_id, &e))?,
            );
            let bytes = batch.size_in_bytes();
            let m = crate::telemetry::metrics();
            m.store_keys_written_total.add(&[], batch.len() as f64);
            m.store_bytes_written_total.add(&[], bytes as f64);
            self.reader
                .counts
                .write(|| self.db.write(batch), &counts)
                .map_err(|e| StorageIOError::apply(log_id, &e))?;
            if let Some(id) = new_cluster_id {
                self.reader.remember_cluster_id(id);
            }
            // Only once it is written: the entries after this one are written in the new version.
            if let (Some(v), CommandResponse::Done) = (new_codec_version, &response) {
                self.reader.adopt_codec_version(v).map_err(|e| StorageIOError::apply(log_id, &e))?;
            }
            if reset {
                // A restore replaced the state whole: counted again, and observers and caches
                // start over, as after a snapshot install.
                let db = self.db.clone();
                let counted =
                    off_runtime(move || StateCounts::scan(&db)).await.map_err(|e| StorageIOError::apply(log_id, &e))?;
                self.reader.counts.reset(counted);
                self.reader.changes.publish(ChangeBatch {
                    revision: log_id.index,
                    changes: Vec::new(),
                    bytes: 0,
                    reset: true,
                });
            } else if !changes.is_empty() {
                self.reader.changes.publish(ChangeBatch { revision: log_id.index, changes, bytes, reset: false });
            }
            responses.push(response);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<SnapshotFile>> {
        let path = self.snapshots.incoming_path().map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let file = SnapshotFile::create(&path).await.map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(file))
    }

    /// Installs a received snapshot from its file, on a blocking thread, through SST ingestion
    /// (see `store::snapshots`): nothing of it is held in memory.
    async fn install_snapshot(&mut self, meta: &SnapshotMeta, mut snapshot: Box<SnapshotFile>) -> StoreResult<()> {
        // Every chunk written, and on disk, before it is read back.
        snapshot.sync().await.map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let received = snapshot.path().to_path_buf();
        drop(snapshot);
        let (db, snapshots, owned_meta) = (self.db.clone(), self.snapshots.clone(), meta.clone());
        let bytes = off_runtime(move || {
            let bytes = snapshots.install(&db, &owned_meta, &received)?;
            // A snapshot from a release before the by-agent index: derive it.
            rebuild_agent_index(&db)?;
            Ok((bytes, StateCounts::scan(&db)?))
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let (bytes, counted) = bytes;
        self.reader.counts.reset(counted);
        self.reader.reload_cluster_meta().map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        // Observers cannot follow a wholesale replacement: they start over with a snapshot.
        let revision = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        self.reader.changes.publish(ChangeBatch { revision, changes: Vec::new(), bytes: 0, reset: true });
        tracing::info!(snapshot_id = %meta.snapshot_id, bytes, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot>> {
        // A snapshot made current meanwhile removes the file just named: ask again.
        for _ in 0..3 {
            let current = self.snapshots.current(&self.db).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
            let Some((meta, path)) = current else { return Ok(None) };
            match SnapshotFile::open(&path).await {
                Ok(file) => return Ok(Some(Snapshot { meta, snapshot: Box::new(file) })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StorageIOError::read_snapshot(None, &e).into()),
            }
        }
        let replaced = AnyErr("the current snapshot's file keeps being replaced".into());
        Err(StorageIOError::read_snapshot(None, &replaced).into())
    }
}

/// Counts what a task's write says happened, as this replica applies it: a finish for a reason
/// other than success or a request (`titus_task_failures_total`, by reason), and a new task that
/// replaces a finished one (`titus_task_restarts_total`).
fn count_task_event(before: Option<crate::model::task::TaskState>, task: &crate::model::task::Task) {
    use crate::model::task::{reason, TaskState};
    let m = crate::telemetry::metrics();
    match before {
        None if task.resubmit_of.is_some() => m.task_restarts_total.inc(&[]),
        Some(was) if was != TaskState::Finished && task.state() == TaskState::Finished => {
            let why = task.status.reason_code.as_str();
            if ![reason::NORMAL, reason::KILLED, reason::SCALED_DOWN].contains(&why) {
                // Reasons are Titus's short codes; anything else is counted as one series.
                let label =
                    if why.len() <= 32 && why.chars().all(|c| c.is_ascii_alphanumeric()) { why } else { "other" };
                m.task_failures_total.inc(&[label]);
            }
        }
        _ => {}
    }
}
