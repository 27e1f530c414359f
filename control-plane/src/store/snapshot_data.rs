//! The binary layout of a snapshot's data (and of a backup): the replicated column families,
//! record by record.
//!
//! ```text
//! "TSNP" version:u8(=1) families:u32 { name_len:u16 name records:u64 { klen:u32 key vlen:u32 value } }
//! ```
//! Keys and values are the store's own (already versioned) encodings, copied verbatim. A
//! snapshot is written and read as a stream ([`Writer`], [`read_stream`]): a replica never holds
//! one in memory, whatever the size of the state. The previous release wrote the same layout as
//! one value, so its snapshots read as they are and a follower of either release reads what a
//! leader of the other sends.

use std::io::{self, Read, Seek, SeekFrom, Write};

pub type Families = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;

const MAGIC: &[u8; 4] = b"TSNP";
const VERSION: u8 = 1;

/// No key or value the store writes comes near this (a whole job is bounded to 256 KiB by
/// default, a log entry to a few MiB); a length beyond it is a damaged file, refused before
/// anything is allocated for it.
const MAX_RECORD_PART: u32 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotDataError {
    #[error("not a Titus snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {0} is not understood by this release")]
    UnknownVersion(u8),
    #[error("snapshot is truncated at byte {0}")]
    Truncated(u64),
    #[error("snapshot has {0} bytes after its last record")]
    TrailingBytes(u64),
    #[error("a record at byte {at} claims {len} bytes, more than any record this store writes")]
    RecordTooLarge { at: u64, len: u32 },
    #[error("column family name is not UTF-8")]
    BadName,
    #[error("reading the snapshot: {0}")]
    Io(#[source] io::Error),
}

/// Writes the layout as a stream, a family at a time, without knowing in advance how many records
/// a family has: its count is written when the family ends (which is why it needs `Seek`).
pub struct Writer<W: Write + Seek> {
    out: W,
    families_left: u32,
    /// Where the open family's record count goes, and the records written into it so far.
    open_family: Option<(u64, u64)>,
    written: u64,
}

impl<W: Write + Seek> Writer<W> {
    /// Starts a snapshot of exactly `families` families.
    pub fn new(mut out: W, families: u32) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        out.write_all(&[VERSION])?;
        out.write_all(&families.to_be_bytes())?;
        Ok(Writer { out, families_left: families, open_family: None, written: 9 })
    }

    pub fn begin_family(&mut self, name: &str) -> io::Result<()> {
        self.end_family()?;
        if self.families_left == 0 {
            return Err(io::Error::other("more families than the snapshot was started with"));
        }
        self.families_left -= 1;
        let name_len = u16::try_from(name.len()).map_err(|_| io::Error::other("family name over 64 KiB"))?;
        self.out.write_all(&name_len.to_be_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.written += 2 + name.len() as u64;
        self.open_family = Some((self.written, 0));
        self.out.write_all(&0u64.to_be_bytes())?;
        self.written += 8;
        Ok(())
    }

    pub fn record(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let Some((_, count)) = self.open_family.as_mut() else {
            return Err(io::Error::other("a record outside any family"));
        };
        *count += 1;
        for part in [key, value] {
            let len = u32::try_from(part.len())
                .ok()
                .filter(|l| *l <= MAX_RECORD_PART)
                .ok_or_else(|| io::Error::other(format!("a record part of {} bytes", part.len())))?;
            self.out.write_all(&len.to_be_bytes())?;
            self.out.write_all(part)?;
        }
        self.written += 8 + key.len() as u64 + value.len() as u64;
        Ok(())
    }

    fn end_family(&mut self) -> io::Result<()> {
        if let Some((at, count)) = self.open_family.take() {
            self.out.seek(SeekFrom::Start(at))?;
            self.out.write_all(&count.to_be_bytes())?;
            self.out.seek(SeekFrom::Start(self.written))?;
        }
        Ok(())
    }

    /// Ends the last family; answers the writer and the bytes written.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.end_family()?;
        if self.families_left != 0 {
            return Err(io::Error::other(format!("{} families promised and not written", self.families_left)));
        }
        self.out.flush()?;
        Ok((self.out, self.written))
    }
}

/// What [`read_stream`] hands its visitor, in file order.
pub enum Item<'a> {
    /// A family begins; its records follow.
    Family {
        name: &'a str,
    },
    Record {
        key: Vec<u8>,
        value: Vec<u8>,
    },
}

/// Reads a snapshot from `input` as a stream, handing each family and record to `visit` in order;
/// memory stays that of one record. Fails on anything damaged — including bytes after the last
/// record — so reading a whole file through first proves it sound.
pub fn read_stream<R: Read, E: From<SnapshotDataError>>(
    input: R,
    mut visit: impl FnMut(Item<'_>) -> Result<(), E>,
) -> Result<u64, E> {
    let mut r = Counting { inner: input, pos: 0 };
    let mut magic = [0u8; 4];
    r.exact(&mut magic).map_err(|_| SnapshotDataError::BadMagic)?;
    if &magic != MAGIC {
        return Err(SnapshotDataError::BadMagic.into());
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(SnapshotDataError::UnknownVersion(version).into());
    }
    for _ in 0..r.u32()? {
        let name_len = r.u16()?;
        let name = r.bytes(u32::from(name_len))?;
        let name = std::str::from_utf8(&name).map_err(|_| SnapshotDataError::BadName)?;
        let records = r.u64()?;
        visit(Item::Family { name })?;
        for _ in 0..records {
            let key_len = r.u32()?;
            let key = r.bytes(key_len)?;
            let value_len = r.u32()?;
            let value = r.bytes(value_len)?;
            visit(Item::Record { key, value })?;
        }
    }
    let mut rest = [0u8; 1];
    match r.inner.read(&mut rest) {
        Ok(0) => Ok(r.pos),
        Ok(_) => Err(SnapshotDataError::TrailingBytes(r.pos).into()),
        Err(e) => Err(SnapshotDataError::Io(e).into()),
    }
}

/// A reader that knows its position, for errors that say where.
struct Counting<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Counting<R> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), SnapshotDataError> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => SnapshotDataError::Truncated(self.pos),
            _ => SnapshotDataError::Io(e),
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }
    fn u8(&mut self) -> Result<u8, SnapshotDataError> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }
    fn u16(&mut self) -> Result<u16, SnapshotDataError> {
        let mut b = [0u8; 2];
        self.exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, SnapshotDataError> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, SnapshotDataError> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
    /// `len` bytes, allocated as they arrive: a damaged length costs no more than the file holds.
    fn bytes(&mut self, len: u32) -> Result<Vec<u8>, SnapshotDataError> {
        if len > MAX_RECORD_PART {
            return Err(SnapshotDataError::RecordTooLarge { at: self.pos, len });
        }
        let mut out = Vec::new();
        let n = (&mut self.inner).take(u64::from(len)).read_to_end(&mut out).map_err(SnapshotDataError::Io)?;
        if n != len as usize {
            return Err(SnapshotDataError::Truncated(self.pos + n as u64));
        }
        self.pos += n as u64;
        Ok(out)
    }
}

/// The layout of `families`, in memory.
#[cfg(test)]
pub fn encode_snapshot_data(families: &Families) -> io::Result<Vec<u8>> {
    let mut w = Writer::new(io::Cursor::new(Vec::new()), families.len() as u32)?;
    for (name, records) in families {
        w.begin_family(name)?;
        for (k, v) in records {
            w.record(k, v)?;
        }
    }
    Ok(w.finish()?.0.into_inner())
}

pub fn decode_snapshot_data(buf: &[u8]) -> Result<Families, SnapshotDataError> {
    let mut families: Families = Vec::new();
    read_stream(buf, |item| {
        match item {
            Item::Family { name } => families.push((name.to_string(), Vec::new())),
            Item::Record { key, value } => {
                if let Some((_, records)) = families.last_mut() {
                    records.push((key, value));
                }
            }
        }
        Ok::<(), SnapshotDataError>(())
    })?;
    Ok(families)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Families {
        vec![
            ("a".into(), vec![(b"k1".to_vec(), b"v1".to_vec()), (vec![], vec![0; 300])]),
            ("empty".into(), vec![]),
            ("b".into(), vec![(b"k".to_vec(), vec![])]),
        ]
    }

    #[test]
    fn round_trips_and_rejects_truncation() {
        let families = sample();
        let bytes = encode_snapshot_data(&families).unwrap();
        assert_eq!(decode_snapshot_data(&bytes).unwrap(), families);
        for cut in [0, 3, 5, 12, bytes.len() - 1] {
            assert!(decode_snapshot_data(&bytes[..cut]).is_err(), "cut at {cut} decoded");
        }
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert!(matches!(decode_snapshot_data(&v2), Err(SnapshotDataError::UnknownVersion(2))));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode_snapshot_data(&longer), Err(SnapshotDataError::TrailingBytes(_))));
    }

    /// The streamed writer writes exactly what the previous release wrote as one value, so the
    /// releases read each other's snapshots.
    #[test]
    fn the_stream_is_the_previous_release_layout() {
        let families = sample();
        let mut expected = Vec::new();
        expected.extend_from_slice(b"TSNP\x01");
        expected.extend_from_slice(&(families.len() as u32).to_be_bytes());
        for (name, records) in &families {
            expected.extend_from_slice(&(name.len() as u16).to_be_bytes());
            expected.extend_from_slice(name.as_bytes());
            expected.extend_from_slice(&(records.len() as u64).to_be_bytes());
            for (k, v) in records {
                expected.extend_from_slice(&(k.len() as u32).to_be_bytes());
                expected.extend_from_slice(k);
                expected.extend_from_slice(&(v.len() as u32).to_be_bytes());
                expected.extend_from_slice(v);
            }
        }
        assert_eq!(encode_snapshot_data(&families).unwrap(), expected);
    }

    #[test]
    fn a_damaged_length_is_refused_without_allocating_it() {
        let mut bytes = encode_snapshot_data(&sample()).unwrap();
        // The first key's length (after magic, version, count, name "a" and its record count).
        let at = 4 + 1 + 4 + 2 + 1 + 8;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode_snapshot_data(&bytes), Err(SnapshotDataError::RecordTooLarge { .. })));
        bytes[at..at + 4].copy_from_slice(&(MAX_RECORD_PART - 1).to_be_bytes());
        assert!(matches!(decode_snapshot_data(&bytes), Err(SnapshotDataError::Truncated(_))));
    }

    #[test]
    fn a_writer_refuses_more_or_fewer_families_than_promised() {
        let mut w = Writer::new(io::Cursor::new(Vec::new()), 1).unwrap();
        w.begin_family("a").unwrap();
        assert!(w.begin_family("b").is_err());
        let w = Writer::new(io::Cursor::new(Vec::new()), 2).unwrap();
        assert!(w.finish().is_err());
    }
}
