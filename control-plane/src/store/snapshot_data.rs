//! The binary layout of a snapshot's data: the replicated column families, record by record.
//!
//! ```text
//! "TSNP" version:u8(=1) families:u32 { name_len:u16 name records:u64 { klen:u32 key vlen:u32 value } }
//! ```
//! Keys and values are the store's own (already versioned) encodings, copied verbatim.

pub type Families = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;

const MAGIC: &[u8; 4] = b"TSNP";
const VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotDataError {
    #[error("not a Titus snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {0} is not understood by this release")]
    UnknownVersion(u8),
    #[error("snapshot is truncated at byte {0}")]
    Truncated(usize),
    #[error("column family name is not UTF-8")]
    BadName,
}

pub fn encode_snapshot_data(families: &Families) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(families.len() as u32).to_be_bytes());
    for (name, records) in families {
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(records.len() as u64).to_be_bytes());
        for (k, v) in records {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k);
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
    out
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotDataError> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(SnapshotDataError::Truncated(self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, SnapshotDataError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().map_err(|_| SnapshotDataError::Truncated(self.pos))?))
    }
    fn u32(&mut self) -> Result<u32, SnapshotDataError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().map_err(|_| SnapshotDataError::Truncated(self.pos))?))
    }
    fn u64(&mut self) -> Result<u64, SnapshotDataError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().map_err(|_| SnapshotDataError::Truncated(self.pos))?))
    }
}

pub fn decode_snapshot_data(buf: &[u8]) -> Result<Families, SnapshotDataError> {
    let mut r = Reader { buf, pos: 0 };
    if r.take(4).map_err(|_| SnapshotDataError::BadMagic)? != MAGIC {
        return Err(SnapshotDataError::BadMagic);
    }
    let version = r.take(1)?[0];
    if version != VERSION {
        return Err(SnapshotDataError::UnknownVersion(version));
    }
    let n = r.u32()?;
    let mut families = Vec::new();
    for _ in 0..n {
        let name_len = r.u16()? as usize;
        let name = std::str::from_utf8(r.take(name_len)?).map_err(|_| SnapshotDataError::BadName)?.to_string();
        let count = r.u64()?;
        let mut records = Vec::new();
        for _ in 0..count {
            let klen = r.u32()? as usize;
            let k = r.take(klen)?.to_vec();
            let vlen = r.u32()? as usize;
            let v = r.take(vlen)?.to_vec();
            records.push((k, v));
        }
        families.push((name, records));
    }
    if r.pos != buf.len() {
        return Err(SnapshotDataError::Truncated(r.pos));
    }
    Ok(families)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_truncation() {
        let families: Families = vec![
            ("a".into(), vec![(b"k1".to_vec(), b"v1".to_vec()), (vec![], vec![0; 300])]),
            ("empty".into(), vec![]),
        ];
        let bytes = encode_snapshot_data(&families);
        assert_eq!(decode_snapshot_data(&bytes).unwrap(), families);
        for cut in [0, 3, 5, bytes.len() - 1] {
            assert!(decode_snapshot_data(&bytes[..cut]).is_err(), "cut at {cut} decoded");
        }
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert!(matches!(decode_snapshot_data(&v2), Err(SnapshotDataError::UnknownVersion(2))));
    }
}
