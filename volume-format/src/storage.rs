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
    /// Deallocates a range: it reads as zeroes afterwards. (A file system that cannot
    /// deallocate gets zeroes written: the range reads the same, its space is kept.)
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Whether `punch_hole` gives space back. Where it cannot (it writes zeroes instead), a
    /// repair of leaked space would allocate what it means to free, so none is attempted.
    fn frees_space(&mut self) -> bool {
        true
    }
    /// Makes a range read as zeroes and keeps it allocated (NBD's WRITE_ZEROES with NO_HOLE):
    /// `FALLOC_FL_ZERO_RANGE` where the file system has it, zeroes written otherwise.
    fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<()> {
        write_zeroes(self, offset, len)
    }
    /// Makes everything written before it durable (`fdatasync`).
    fn sync(&mut self) -> io::Result<()>;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// `SEEK_DATA`: the first offset at or after `offset` that may hold data, or `None` when only
    /// holes remain before the end.
    fn seek_data(&mut self, offset: u64) -> io::Result<Option<u64>>;
    /// `SEEK_HOLE`: the first offset at or after `offset` in a hole (the end of file counts).
    fn seek_hole(&mut self, offset: u64) -> io::Result<u64>;
    /// Bytes of disk space the file holds.
    fn allocated_bytes(&self) -> io::Result<u64>;
    /// Write-behind for streaming writers (image import and capture): starts writing
    /// `offset..offset + len` back to the disk without waiting, and lets the page cache drop
    /// what of it is already clean. Called on each window as it fills and once more on the
    /// window before, so that a stream of many GiB neither piles up dirty pages (one long stall
    /// at `sync`) nor evicts the pages the data path serves. A hint about pacing, never about
    /// durability: only `sync` makes anything durable. Default: nothing.
    fn write_behind(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

/// Writes zeroes over `[offset, offset+len)` in pieces of 1 MiB: the fallback of `punch_hole`
/// and `zero_range` on a file system without `fallocate` (a FUSE pass-through, say).
pub fn write_zeroes<S: Storage + ?Sized>(s: &mut S, offset: u64, len: u64) -> io::Result<()> {
    const PIECE: u64 = 1 << 20;
    let zeroes = vec![0u8; PIECE.min(len) as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = PIECE.min(offset + len - pos);
        s.write_at(pos, &zeroes[..n as usize])?;
        pos += n;
    }
    Ok(())
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
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.pages.get(&(pos / PAGE)) {
                Some(p) if pos < self.len => out.copy_from_slice(&p[in_page..in_page + n]),
                _ => out.fill(0),
            }
            // Bytes of this piece past the end read as zeroes.
            if pos + n as u64 > self.len {
                let keep = self.len.saturating_sub(pos) as usize;
                out[keep.min(n)..].fill(0);
            }
            done += n;
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(data.len() - done);
            let page = self
                .pages
                .entry(pos / PAGE)
                .or_insert_with(|| Box::new([0; PAGE as usize]));
            page[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.len = self.len.max(offset + data.len() as u64);
    }
    /// First offset at or after `offset` inside an allocated page.
    fn seek_data(&self, offset: u64) -> Option<u64> {
        let first = offset / PAGE;
        let last = self.len.div_ceil(PAGE);
        // Pages are few in tests; scanning the keys beats walking a huge sparse range.
        let next = self
            .pages
            .keys()
            .copied()
            .filter(|&p| p >= first && p < last)
            .min()?;
        Some((next * PAGE).max(offset))
    }
    fn seek_hole(&self, offset: u64) -> u64 {
        let mut p = offset / PAGE;
        while p * PAGE < self.len && self.pages.contains_key(&p) {
            p += 1;
        }
        (p * PAGE).max(offset).min(self.len)
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
#[derive(Clone)]
pub struct MemFile {
    current: Sparse,
    durable: Sparse,
    pending: Vec<Pending>,
    ops: u64,
    fail_at: Option<(u64, i32)>,
    /// A power cut tears writes at this granularity (absolute file offsets).
    tear_unit: u64,
    bytes_written: u64,
    bytes_read: u64,
}

impl Default for MemFile {
    fn default() -> MemFile {
        MemFile::new()
    }
}

impl MemFile {
    /// A file whose unsynced writes a power cut may tear at any 512-byte sector (metadata).
    pub fn new() -> MemFile {
        MemFile::with_tear_unit(SECTOR_BYTES)
    }

    /// A file whose power cuts tear writes only at `unit`-aligned boundaries: 4096 models the
    /// disk assumption that an aligned 4 KiB page write is atomic (SPEC.md §7).
    pub fn with_tear_unit(unit: u64) -> MemFile {
        assert!(unit >= SECTOR_BYTES && unit.is_power_of_two());
        MemFile {
            current: Sparse::default(),
            durable: Sparse::default(),
            pending: Vec::new(),
            ops: 0,
            fail_at: None,
            tear_unit: unit,
            bytes_written: 0,
            bytes_read: 0,
        }
    }

    /// Bytes asked of `read_at` so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Bytes handed to `write_at` so far (write amplification measurements).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
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

    /// Simulates a power cut: the file becomes what survived it. `fate(i)` decides for the i-th
    /// unsynced change, and `keep_unit(i, u)` for each tear unit `u` (counted from the start of
    /// the write) of a torn write.
    pub fn power_cut(
        &mut self,
        mut fate: impl FnMut(usize) -> Fate,
        mut keep_unit: impl FnMut(usize, u64) -> bool,
    ) {
        let mut survived = self.durable.clone();
        for (i, change) in std::mem::take(&mut self.pending).into_iter().enumerate() {
            let f = fate(i);
            if f == Fate::Drop {
                continue;
            }
            match change {
                Pending::Write { offset, data } => {
                    let unit = self.tear_unit;
                    let first = offset / unit;
                    let last = (offset + data.len() as u64).div_ceil(unit);
                    for s in first..last {
                        if f == Fate::Tear && !keep_unit(i, s - first) {
                            continue;
                        }
                        let lo = (s * unit).max(offset);
                        let hi = ((s + 1) * unit).min(offset + data.len() as u64);
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

    /// Simulates a power cut under page-cache semantics: each 4 KiB page changed since the last
    /// sync ends up as one of the versions it held (`pick(page, versions)` returns an index in
    /// `0..=versions`, 0 being the durable one). Sub-page writes to one page are never
    /// reordered against each other, because the page cache writes the page back whole; pages
    /// are independent of each other. This is what SPEC.md §7 assumes of data files.
    pub fn power_cut_pages(&mut self, mut pick: impl FnMut(u64, usize) -> usize) {
        let mut replay = self.durable.clone();
        // Page -> its versions after each change that touched it.
        let mut versions: HashMap<u64, Vec<Option<Box<[u8; PAGE as usize]>>>> = HashMap::new();
        for change in std::mem::take(&mut self.pending) {
            let (lo, hi) = match &change {
                Pending::Write { offset, data } => (*offset, *offset + data.len() as u64),
                Pending::Punch { offset, len } => (*offset, *offset + *len),
                Pending::SetLen(len) => (replay.len.min(*len), replay.len.max(*len)),
            };
            match change {
                Pending::Write { offset, data } => replay.write(offset, &data),
                Pending::Punch { offset, len } => replay.zero(offset, len),
                Pending::SetLen(len) => replay.set_len(len),
            }
            for p in lo / PAGE..hi.div_ceil(PAGE) {
                versions
                    .entry(p)
                    .or_default()
                    .push(replay.pages.get(&p).cloned());
            }
        }
        let mut survived = self.durable.clone();
        survived.len = replay.len;
        for (p, vs) in versions {
            let i = pick(p, vs.len()).min(vs.len());
            if i == 0 {
                continue; // the durable version
            }
            match &vs[i - 1] {
                Some(page) => {
                    survived.pages.insert(p, page.clone());
                }
                None => {
                    survived.pages.remove(&p);
                }
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
        self.bytes_read += buf.len() as u64;
        self.current.read(offset, buf);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.tick()?;
        self.bytes_written += data.len() as u64;
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
    fn seek_data(&mut self, offset: u64) -> io::Result<Option<u64>> {
        self.tick()?;
        Ok(self.current.seek_data(offset))
    }
    fn seek_hole(&mut self, offset: u64) -> io::Result<u64> {
        self.tick()?;
        Ok(self.current.seek_hole(offset))
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.current.pages.len() as u64 * PAGE)
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
