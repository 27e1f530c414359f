//! The journal of active faults: each one is written here (with how to undo it) before it is
//! applied, and removed once undone. `titus-chaos heal` undoes whatever a crashed run left behind.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::faults::Undo;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActiveFault {
    pub id: u64,
    pub description: String,
    pub undo: Undo,
    /// Replicas this fault takes out of the quorum (killed, paused, cut off from the majority).
    pub impairs: Vec<u64>,
    /// When it is due to be undone (Unix ms).
    pub until_unix_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Journal {
    #[serde(skip)]
    path: PathBuf,
    /// Held while this process may change the journal: two runs at once would each count only their
    /// own faults against the blast radius, and overwrite each other's undo records.
    #[serde(skip)]
    lock: Option<std::fs::File>,
    next_id: u64,
    pub active: Vec<ActiveFault>,
}

impl Journal {
    /// The journal at `path`; an absent file is an empty journal.
    pub fn open(path: &Path) -> Result<Journal> {
        let mut j: Journal = match std::fs::read_to_string(path) {
            Ok(text) => {
                serde_json::from_str(&text).with_context(|| format!("journal {} is unreadable", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Journal::default(),
            Err(e) => return Err(e).with_context(|| format!("reading journal {}", path.display())),
        };
        j.path = path.to_path_buf();
        Ok(j)
    }

    /// The journal at `path`, for this process alone: refused while another run holds it. The lock
    /// goes with the process, so a crashed run never leaves it behind.
    pub fn open_exclusive(path: &Path) -> Result<Journal> {
        let lock_path = path.with_extension("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another titus-chaos run is using the journal {} (lock {}); wait for it to end, or stop it — Ctrl-C undoes its faults",
                path.display(),
                lock_path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("locking {}", lock_path.display())),
        }
        let mut journal = Journal::open(path)?;
        journal.lock = Some(file);
        Ok(journal)
    }

    /// Records a fault about to be applied; returns its id.
    pub fn add(&mut self, description: String, undo: Undo, impairs: Vec<u64>, until_unix_ms: u64) -> Result<u64> {
        self.next_id += 1;
        let id = self.next_id;
        self.active.push(ActiveFault { id, description, undo, impairs, until_unix_ms });
        self.save()?;
        Ok(id)
    }

    pub fn remove(&mut self, id: u64) -> Result<()> {
        self.active.retain(|f| f.id != id);
        self.save()
    }

    pub fn impaired(&self) -> std::collections::BTreeSet<u64> {
        self.active.iter().flat_map(|f| f.impairs.iter().copied()).collect()
    }

    /// Written to a temporary file and renamed over the old one: a crash leaves one or the other.
    fn save(&self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path).with_context(|| format!("writing {}", self.path.display()))
    }
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
