//! Snapshots on disk: built from a RocksDB snapshot into a file, sent to a follower by openraft in
//! bounded chunks read from that file, and installed from a file through SST files that RocksDB
//! ingests without passing them through its memtables. At no point is the state (or a snapshot of
//! it) held in memory, and all of it runs on blocking threads, never on the async runtime's, so
//! heartbeats and client calls go on meanwhile.
//!
//! Files live in `<data-dir>/snapshots/`: `<snapshot id>.snap` is the current snapshot, `*.tmp` one
//! being built, `incoming-*.part` one being received, `ingest-*.sst` one being installed. The
//! `snapshot` column family names the current file and holds its metadata.
//!
//! Invariants:
//! - The `snapshot` family only ever names a file that is complete and synced (written, fsynced and
//!   renamed into place, the directory fsynced, before the synced batch that names it).
//! - An install is redone until it completes: the synced batch that makes the received file current
//!   also writes `installing`; the synced batch that ends the install (last applied, membership)
//!   deletes it. A replica opened with `installing` set installs that file again before anything
//!   reads its state ([`Snapshots::recover`]). The steps in between (a range delete per family, the
//!   ingestions) need no sync of their own: the last batch's sync covers the deletes (one WAL for
//!   every family), and an ingestion is durable when it returns.
//! - A snapshot is never built from a state half replaced: building takes its RocksDB snapshot under
//!   the lock an install holds from its first delete to its last batch.
//!
//! Knows RocksDB and the files; knows nothing of what the records mean.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use rocksdb::{IteratorMode, WriteBatch, DB};

use super::snapshot_data::{self, Item, SnapshotDataError};
use super::{cf, cf_handle, sync_write_options};
use crate::codec;
use crate::error::{Error, Result};
use crate::raft_types::{LogId, SnapshotMeta, StoredMembership};

/// Buffer of the file a snapshot is written to or read from.
const FILE_BUFFER: usize = 1 << 20;

/// The snapshot files of one replica.
pub struct Snapshots {
    dir: PathBuf,
    /// Held while the current snapshot changes (a build finishing while a received one is installed
    /// must not leave the family naming one and the directory holding the other).
    current: Mutex<()>,
    /// Written while an install replaces the state; read while a build takes its RocksDB snapshot.
    replacing: RwLock<()>,
}

/// A snapshot written to a file and made current.
pub struct Built {
    pub meta: SnapshotMeta,
    pub path: PathBuf,
    /// Opened before it could be replaced: a newer snapshot removes this one's file, not what a
    /// reader holds open.
    pub file: File,
    pub bytes: u64,
}

impl Snapshots {
    /// Opens `<data_dir>/snapshots`, creating it.
    pub fn open(data_dir: &Path) -> Result<Snapshots> {
        let dir = data_dir.join("snapshots");
        fs::create_dir_all(&dir).map_err(|e| Error::storage(format!("creating {}", dir.display()), e))?;
        Ok(Snapshots { dir, current: Mutex::new(()), replacing: RwLock::new(()) })
    }

    /// Where a snapshot being received goes; any earlier partial one is removed (openraft receives
    /// one snapshot at a time, so one left over was abandoned).
    pub fn incoming_path(&self) -> Result<PathBuf> {
        self.remove_matching(|name| name.starts_with("incoming-"))?;
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Ok(self.dir.join(format!("incoming-{nanos}.part")))
    }

    /// The current snapshot: its metadata and file, if there is one.
    pub fn current(&self, db: &DB) -> Result<Option<(SnapshotMeta, PathBuf)>> {
        let family = cf_handle(db, cf::SNAPSHOT).map_err(Error::from_storage)?;
        let get = |key| db.get_cf(family, key).map_err(|e| Error::storage("reading the snapshot's record", e));
        let (Some(meta), Some(file)) = (get(cf::snapshot::META)?, get(cf::snapshot::FILE)?) else {
            return Ok(None);
        };
        let meta: SnapshotMeta = codec::decode(&meta).map_err(|e| Error::storage("the snapshot's metadata", e))?;
        let file = std::str::from_utf8(&file).map_err(|e| Error::storage("the snapshot's file name", e))?;
        Ok(Some((meta, self.dir.join(file))))
    }

    /// Writes the state as of one RocksDB snapshot into a file and makes it current.
    pub fn build(&self, db: &DB) -> Result<Built> {
        let view = {
            let _not_mid_install = self.replacing.read().unwrap_or_else(|p| p.into_inner());
            db.snapshot()
        };
        let meta_family = cf_handle(db, cf::SM_META).map_err(Error::from_storage)?;
        let read = |key: &[u8]| view.get_cf(meta_family, key).map_err(|e| Error::storage("reading sm_meta", e));
        let last_applied: Option<LogId> = match read(cf::sm_meta::LAST_APPLIED)? {
            Some(b) => codec::decode(&b).map_err(|e| Error::storage("last applied", e))?,
            None => None,
        };
        let last_membership: StoredMembership = match read(cf::sm_meta::MEMBERSHIP)? {
            Some(b) => codec::decode(&b).map_err(|e| Error::storage("membership", e))?,
            None => StoredMembership::default(),
        };
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{nanos}", id.leader_id.term, id.index),
            None => format!("0-0-{nanos}"),
        };
        let meta = SnapshotMeta { last_log_id: last_applied, last_membership, snapshot_id };

        let name = file_name(&meta);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let file = File::create(&tmp).map_err(|e| Error::storage(format!("creating {}", tmp.display()), e))?;
        let families = cf::STATE.iter().copied().chain([cf::SM_META]);
        let written = write_families(db, &view, families, BufWriter::with_capacity(FILE_BUFFER, file));
        drop(view);
        let (file, bytes) = match written.and_then(|(out, bytes)| {
            let file = out.into_inner().map_err(|e| Error::storage("writing a snapshot", e.into_error()))?;
            Ok((file, bytes))
        }) {
            Ok(done) => done,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        // The file must be durable before the record naming it: openraft purges the log behind it.
        file.sync_all().map_err(|e| Error::storage(format!("syncing {}", tmp.display()), e))?;
        drop(file);
        let path = self.dir.join(&name);
        fs::rename(&tmp, &path).map_err(|e| Error::storage(format!("renaming {}", tmp.display()), e))?;
        self.sync_dir()?;
        let file = File::open(&path).map_err(|e| Error::storage(format!("opening {}", path.display()), e))?;
        if !self.make_current(db, &meta, &name, false)? {
            // A newer one (received while this was being built) is current: this one is not kept.
            let _ = fs::remove_file(&path);
        }
        Ok(Built { meta, path, file, bytes })
    }

    /// Installs the snapshot in `received` (a file this replica received, or any snapshot file):
    /// checks it whole, keeps it as the current snapshot, and replaces the state with its records.
    pub fn install(&self, db: &DB, meta: &SnapshotMeta, received: &Path) -> Result<u64> {
        let name = file_name(meta);
        let path = self.dir.join(&name);
        let ours = received.parent() == Some(self.dir.as_path())
            && received.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("incoming-"));
        let staged = if ours {
            received.to_path_buf()
        } else {
            // Not a file received here (openraft's storage suite hands one replica's snapshot to
            // another): a copy, so the other keeps its own.
            let tmp = self.dir.join(format!("{name}.tmp"));
            fs::copy(received, &tmp).map_err(|e| Error::storage(format!("copying {}", received.display()), e))?;
            tmp
        };
        // Read through, into SST files, before anything is replaced: a damaged file changes nothing.
        let ssts = match stage(&staged, &self.dir) {
            Ok(ssts) => ssts,
            Err(e) => {
                let _ = fs::remove_file(&staged);
                return Err(e);
            }
        };
        let bytes = ssts.bytes;
        File::open(&staged)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::storage(format!("syncing {}", staged.display()), e))?;
        fs::rename(&staged, &path).map_err(|e| Error::storage(format!("renaming {}", staged.display()), e))?;
        self.sync_dir()?;
        self.make_current(db, meta, &name, true)?;
        let _replacing = self.replacing.write().unwrap_or_else(|p| p.into_inner());
        load(db, meta, ssts)?;
        Ok(bytes)
    }

    /// Records `meta` and `name` as the current snapshot in one synced batch, and removes the file
    /// it replaces. A built snapshot older than the current one is not made current (answers false);
    /// an installed one always is, with the `installing` mark.
    fn make_current(&self, db: &DB, meta: &SnapshotMeta, name: &str, installing: bool) -> Result<bool> {
        let _held = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let previous = self.current(db)?;
        if let Some((current, _)) = &previous {
            if !installing && current.last_log_id > meta.last_log_id {
                return Ok(false);
            }
        }
        let family = cf_handle(db, cf::SNAPSHOT).map_err(Error::from_storage)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(family, cf::snapshot::META, codec::encode(meta).map_err(|e| Error::storage("snapshot meta", e))?);
        batch.put_cf(family, cf::snapshot::FILE, name.as_bytes());
        // The previous release kept the data itself in the family.
        batch.delete_cf(family, cf::snapshot::DATA);
        if installing {
            batch.put_cf(family, cf::snapshot::INSTALLING, name.as_bytes());
        }
        // The snapshot must be durable before openraft purges the log it replaces.
        db.write_opt(batch, &sync_write_options()).map_err(|e| Error::storage("recording the current snapshot", e))?;
        if let Some((_, old)) = previous {
            if old.file_name() != Some(std::ffi::OsStr::new(name)) {
                // A follower being sent the old one keeps reading it through its open handle.
                let _ = fs::remove_file(old);
            }
        }
        Ok(true)
    }

    /// Removes files of this directory whose name matches.
    fn remove_matching(&self, matches: impl Fn(&str) -> bool) -> Result<()> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| Error::storage(format!("listing {}", self.dir.display()), e))?;
        for entry in entries.flatten() {
            if entry.file_name().to_str().is_some_and(&matches) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::storage(format!("syncing {}", self.dir.display()), e))
    }

    /// At start: moves a snapshot the previous release kept inside RocksDB into a file, finishes an
    /// install a crash cut short, and removes files no record names (a crash mid-build or
    /// mid-receive). Runs before anything reads the state.
    pub fn recover(&self, db: &DB) -> Result<()> {
        let family = cf_handle(db, cf::SNAPSHOT).map_err(Error::from_storage)?;
        let get = |key| db.get_cf(family, key).map_err(|e| Error::storage("reading the snapshot's record", e));
        if let (Some(meta), Some(data), None) =
            (get(cf::snapshot::META)?, get(cf::snapshot::DATA)?, get(cf::snapshot::FILE)?)
        {
            let meta: SnapshotMeta = codec::decode(&meta).map_err(|e| Error::storage("the snapshot's metadata", e))?;
            let name = file_name(&meta);
            let tmp = self.dir.join(format!("{name}.tmp"));
            fs::write(&tmp, &data)
                .and_then(|_| File::open(&tmp)?.sync_all())
                .map_err(|e| Error::storage(format!("writing {}", tmp.display()), e))?;
            fs::rename(&tmp, self.dir.join(&name))
                .map_err(|e| Error::storage(format!("renaming {}", tmp.display()), e))?;
            self.sync_dir()?;
            self.make_current(db, &meta, &name, false)?;
            tracing::info!(snapshot_id = %meta.snapshot_id, bytes = data.len(), "moved the stored snapshot into a file");
        }
        let current = self.current(db)?;
        if get(cf::snapshot::INSTALLING)?.is_some() {
            let Some((meta, path)) = &current else {
                return Err(Error::storage_msg("an install was under way, but no snapshot is recorded"));
            };
            tracing::warn!(snapshot_id = %meta.snapshot_id, "finishing the install of a snapshot a restart cut short");
            load(db, meta, stage(path, &self.dir)?)?;
        }
        let keep = current.as_ref().and_then(|(_, p)| p.file_name()).and_then(|n| n.to_str()).map(str::to_string);
        self.remove_matching(|name| Some(name) != keep.as_deref())
    }
}

/// `<snapshot id>.snap`; the id is made of numbers and dashes here, but a received one is the
/// leader's word: anything but those is replaced, so it names a file in this directory.
fn file_name(meta: &SnapshotMeta) -> String {
    let id: String = meta
        .snapshot_id
        .chars()
        .take(128)
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .collect();
    format!("{id}.snap")
}

/// Writes every record of `names` as of `view` to `out`, in the snapshot layout; answers `out`
/// and the bytes written.
pub fn write_families<'a, W: Write + Seek>(
    db: &DB,
    view: &rocksdb::SnapshotWithThreadMode<'_, DB>,
    names: impl IntoIterator<Item = &'a str> + Clone,
    out: W,
) -> Result<(W, u64)> {
    let io = |e: std::io::Error| Error::storage("writing a snapshot", e);
    let count = names.clone().into_iter().count() as u32;
    let mut w = snapshot_data::Writer::new(out, count).map_err(io)?;
    for name in names {
        let family = cf_handle(db, name).map_err(Error::from_storage)?;
        w.begin_family(name).map_err(io)?;
        for item in view.iterator_cf(family, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| Error::storage(format!("reading {name}"), e))?;
            w.record(&k, &v).map_err(io)?;
        }
    }
    w.finish().map_err(io)
}

/// A snapshot file turned into one SST file per non-empty family, ready to be ingested.
pub struct Staged {
    files: Vec<(String, PathBuf)>,
    /// The snapshot file's size.
    bytes: u64,
}

/// Reads the snapshot file at `path` through and writes each family's records into an SST file of
/// its own in `work` (RocksDB's bulk-load format: ingested, they bypass the memtables, so installing
/// costs no memory however large the state). Checks everything on the way — the layout, that every
/// family is one this release replicates, that keys come in order — so a damaged file is refused
/// before anything is replaced.
fn stage(path: &Path, work: &Path) -> Result<Staged> {
    let options = rocksdb::Options::default();
    let file = File::open(path).map_err(|e| Error::storage(format!("opening {}", path.display()), e))?;
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    // The family being read: its name, and its SST writer once it has a record.
    let mut open: Option<(String, Option<rocksdb::SstFileWriter<'_>>)> = None;
    let finish = |open: Option<(String, Option<rocksdb::SstFileWriter<'_>>)>, files: &mut Vec<(String, PathBuf)>| {
        if let Some((name, Some(mut writer))) = open {
            writer.finish().map_err(|e| Error::storage(format!("writing the {name} SST"), e))?;
            files.push((name, work.join(format!("ingest-{}.sst", files.len()))));
        }
        Ok::<(), Error>(())
    };
    let read = snapshot_data::read_stream(BufReader::with_capacity(FILE_BUFFER, file), |item| {
        match item {
            Item::Family { name } => {
                if !is_carried(name) {
                    return Err(Error::storage_msg(format!(
                        "snapshot carries column family {name:?}, which this release does not replicate"
                    )));
                }
                finish(open.take(), &mut files)?;
                open = Some((name.to_string(), None));
            }
            Item::Record { key, value } => {
                let Some((name, writer)) = open.as_mut() else {
                    return Err(Error::storage_msg("a snapshot record outside any family"));
                };
                if writer.is_none() {
                    let w = rocksdb::SstFileWriter::create(&options);
                    let sst = work.join(format!("ingest-{}.sst", files.len()));
                    w.open(&sst).map_err(|e| Error::storage(format!("creating {}", sst.display()), e))?;
                    *writer = Some(w);
                }
                if let Some(w) = writer.as_mut() {
                    // Refuses a key out of order: a snapshot's families are written in key order.
                    w.put(&key, &value).map_err(|e| Error::storage(format!("a {name} record of the snapshot"), e))?;
                }
            }
        }
        Ok(())
    });
    let staged = read.and_then(|bytes| {
        finish(open.take(), &mut files)?;
        Ok(Staged { files: files.clone(), bytes })
    });
    if staged.is_err() {
        for (_, f) in &files {
            let _ = fs::remove_file(f);
        }
    }
    staged.map_err(|e| Error::storage(format!("snapshot {}", path.display()), e))
}

fn is_carried(family: &str) -> bool {
    cf::STATE.contains(&family) || family == cf::SM_META
}

/// Replaces every replicated family with the staged records: a range delete clears each, the SST
/// files are ingested (moved into the store, newer than the deletes), and a synced batch records
/// `meta` as applied and clears the `installing` mark. Run again from the start with the same
/// snapshot, it ends in the same state.
fn load(db: &DB, meta: &SnapshotMeta, staged: Staged) -> Result<()> {
    let mut clear = WriteBatch::default();
    for name in cf::STATE.iter().copied().chain([cf::SM_META]) {
        clear_family(db, &mut clear, name)?;
    }
    db.write(clear).map_err(|e| Error::storage("clearing the state for a snapshot", e))?;
    let mut options = rocksdb::IngestExternalFileOptions::default();
    options.set_move_files(true);
    for (name, sst) in &staged.files {
        let family = cf_handle(db, name).map_err(Error::from_storage)?;
        db.ingest_external_file_cf_opts(family, &options, vec![sst])
            .map_err(|e| Error::storage(format!("ingesting the snapshot's {name}"), e))?;
        let _ = fs::remove_file(sst);
    }
    let mut batch = WriteBatch::default();
    let sm_meta = cf_handle(db, cf::SM_META).map_err(Error::from_storage)?;
    let last_applied = codec::encode(&meta.last_log_id).map_err(|e| Error::storage("last applied", e))?;
    let membership = codec::encode(&meta.last_membership).map_err(|e| Error::storage("membership", e))?;
    batch.put_cf(sm_meta, cf::sm_meta::LAST_APPLIED, last_applied);
    batch.put_cf(sm_meta, cf::sm_meta::MEMBERSHIP, membership);
    let snapshot = cf_handle(db, cf::SNAPSHOT).map_err(Error::from_storage)?;
    batch.delete_cf(snapshot, cf::snapshot::INSTALLING);
    // Durable with everything before it: the install is done only once this is on disk.
    db.write_opt(batch, &sync_write_options()).map_err(|e| Error::storage("ending a snapshot install", e))
}

/// Deletes every record of `family` in `batch`: one range from its first key to its last, and the
/// last; no per-record work however many it holds.
fn clear_family(db: &DB, batch: &mut WriteBatch, name: &str) -> Result<()> {
    let family = cf_handle(db, name).map_err(Error::from_storage)?;
    let edge = |mode| -> Result<Option<Box<[u8]>>> {
        match db.iterator_cf(family, mode).next() {
            None => Ok(None),
            Some(item) => Ok(Some(item.map_err(|e| Error::storage(format!("reading {name}"), e))?.0)),
        }
    };
    if let (Some(first), Some(last)) = (edge(IteratorMode::Start)?, edge(IteratorMode::End)?) {
        batch.delete_range_cf(family, &first, &last);
        batch.delete_cf(family, &last);
    }
    Ok(())
}

impl From<SnapshotDataError> for Error {
    fn from(e: SnapshotDataError) -> Self {
        Error::storage("snapshot data", e)
    }
}
