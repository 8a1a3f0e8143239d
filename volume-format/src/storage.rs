//! The files a volume lives in, behind a trait, so tests can crash them and fail them.
//!
//! `MemFile` keeps what was written apart from what is durable. A simulated power cut keeps the
//! durable contents plus any subset of the writes since the last sync, each write whole, dropped, or
//! torn at 512-byte sector granularity: exactly what a disk with a volatile cache may do (SPEC.md
//! §7). It can also fail its Nth operation, for fault tests.

use std::collections::HashMap;
use std::io;

/// One file: a volume's data or metadata, or a golden image.
pub trait Storage {
    /// Fills `buf` from `offset`; bytes past the end read as zeroes.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Deallocates a range: it reads as zeroes afterwards.
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes everything written before it durable (`fdatasync`).
    fn sync(&mut self) -> io::Result<()>;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// Sector size at which a simulated power cut may tear a write.
pub const SECTOR_BYTES: u64 = 512;
const PAGE: u64 = 4096;

/// Sparse bytes in 4 KiB pages; absent pages read as zeroes.
#[derive(Clone, Default)]
struct Sparse {
    pages: HashMap<u64, Box<[u8; PAGE as usize]>>,
    len: u64,
}

impl Sparse {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let pos = offset + i as u64;
            *b = if pos >= self.len {
                0
            } else {
                self.pages
                    .get(&(pos / PAGE))
                    .map_or(0, |p| p[(pos % PAGE) as usize])
            };
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let pos = offset + i as u64;
            self.pages
                .entry(pos / PAGE)
                .or_insert_with(|| Box::new([0; PAGE as usize]))[(pos % PAGE) as usize] = b;
        }
        self.len = self.len.max(offset + data.len() as u64);
    }
    fn zero(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let page_end = ((page + 1) * PAGE).min(end);
            if pos.is_multiple_of(PAGE) && page_end - pos == PAGE {
                self.pages.remove(&page);
            } else if let Some(p) = self.pages.get_mut(&page) {
                p[(pos % PAGE) as usize..(page_end - (page * PAGE)) as usize].fill(0);
            }
            pos = page_end;
        }
    }
    fn set_len(&mut self, len: u64) {
        if len < self.len {
            self.zero(len, self.len - len);
        }
        self.len = len;
    }
}

#[derive(Clone)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    Punch { offset: u64, len: u64 },
    SetLen(u64),
}

/// How a simulated power cut treats each write that was not yet synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Persist,
    Drop,
    /// Persist only some of its sectors.
    Tear,
}

/// An in-memory file with a volatile cache. See the module comment.
#[derive(Clone, Default)]
pub struct MemFile {
    current: Sparse,
    durable: Sparse,
    pending: Vec<Pending>,
    ops: u64,
    fail_at: Option<(u64, i32)>,
}

impl MemFile {
    pub fn new() -> MemFile {
        MemFile::default()
    }

    /// Makes operation number `n` (counting from 1, every call) and every later one fail with
    /// `errno`, like a disk that went away.
    pub fn fail_from(&mut self, n: u64, errno: i32) {
        self.fail_at = Some((n, errno));
    }

    pub fn ops(&self) -> u64 {
        self.ops
    }

    fn tick(&mut self) -> io::Result<()> {
        self.ops += 1;
        match self.fail_at {
            Some((n, errno)) if self.ops >= n => Err(io::Error::from_raw_os_error(errno)),
            _ => Ok(()),
        }
    }

    /// Simulates a power cut: the file becomes what survived it. `fate(i, sector_count)` decides
    /// for the i-th unsynced change, and `keep_sector(i, s)` for each sector of a torn write.
    pub fn power_cut(
        &mut self,
        mut fate: impl FnMut(usize) -> Fate,
        mut keep_sector: impl FnMut(usize, u64) -> bool,
    ) {
        let mut survived = self.durable.clone();
        for (i, change) in std::mem::take(&mut self.pending).into_iter().enumerate() {
            let f = fate(i);
            if f == Fate::Drop {
                continue;
            }
            match change {
                Pending::Write { offset, data } => {
                    let first = offset / SECTOR_BYTES;
                    let last = (offset + data.len() as u64).div_ceil(SECTOR_BYTES);
                    for s in first..last {
                        if f == Fate::Tear && !keep_sector(i, s - first) {
                            continue;
                        }
                        let lo = (s * SECTOR_BYTES).max(offset);
                        let hi = ((s + 1) * SECTOR_BYTES).min(offset + data.len() as u64);
                        survived.write(lo, &data[(lo - offset) as usize..(hi - offset) as usize]);
                    }
                }
                Pending::Punch { offset, len } => survived.zero(offset, len),
                Pending::SetLen(len) => survived.set_len(len),
            }
        }
        self.current = survived.clone();
        self.durable = survived;
        self.fail_at = None;
    }

    /// Number of changes since the last successful sync.
    pub fn unsynced(&self) -> usize {
        self.pending.len()
    }
}

impl Storage for MemFile {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.tick()?;
        self.current.read(offset, buf);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.tick()?;
        self.current.write(offset, data);
        self.pending.push(Pending::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.tick()?;
        self.current.zero(offset, len);
        self.pending.push(Pending::Punch { offset, len });
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        // A failed sync leaves the pending changes in limbo: a later power cut decides them.
        self.tick()?;
        for change in std::mem::take(&mut self.pending) {
            match change {
                Pending::Write { offset, data } => self.durable.write(offset, &data),
                Pending::Punch { offset, len } => self.durable.zero(offset, len),
                Pending::SetLen(len) => self.durable.set_len(len),
            }
        }
        Ok(())
    }
    fn len(&self) -> u64 {
        self.current.len
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.tick()?;
        self.current.set_len(len);
        self.pending.push(Pending::SetLen(len));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(f: &mut MemFile, offset: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0xEE; n];
        f.read_at(offset, &mut v).unwrap();
        v
    }

    #[test]
    fn reads_see_writes_holes_and_zeroes_past_the_end() {
        let mut f = MemFile::new();
        f.write_at(5000, b"hello").unwrap();
        assert_eq!(f.len(), 5005);
        assert_eq!(read(&mut f, 4998, 9), b"\0\0hello\0\0");
        f.punch_hole(4096, 4096).unwrap();
        assert_eq!(read(&mut f, 5000, 5), [0; 5]);
    }

    #[test]
    fn power_cut_keeps_synced_and_decides_the_rest() {
        let mut f = MemFile::new();
        f.write_at(0, &[1; 1024]).unwrap();
        f.sync().unwrap();
        f.write_at(0, &[2; 1024]).unwrap(); // unsynced
        let mut g = f.clone();
        f.power_cut(|_| Fate::Drop, |_, _| true);
        assert_eq!(
            read(&mut f, 0, 1024),
            vec![1; 1024],
            "dropped: the old contents"
        );
        g.power_cut(|_| Fate::Tear, |_, s| s == 1);
        let got = read(&mut g, 0, 1024);
        assert_eq!(&got[..512], &[1; 512][..], "sector 0 not persisted");
        assert_eq!(&got[512..], &[2; 512][..], "sector 1 persisted");
    }

    #[test]
    fn faults_fail_every_later_operation_and_a_failed_sync_guarantees_nothing() {
        let mut f = MemFile::new();
        f.write_at(0, &[7; 512]).unwrap();
        f.fail_from(2, libc_eio());
        let e = f.sync().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc_eio()));
        assert!(f.write_at(0, &[8; 512]).is_err());
        assert_eq!(f.unsynced(), 1, "the write is neither durable nor lost yet");
        f.power_cut(|_| Fate::Drop, |_, _| true);
        assert_eq!(read(&mut f, 0, 512), vec![0; 512]);
    }

    fn libc_eio() -> i32 {
        5
    }
}
