//! The seed inside the volume (issue 22): a golden image that carries a partition labelled
//! `CIDATA` gets each clone's NoCloud documents written into that partition at clone time, so a
//! server with one disk and no second attachment boots as itself. The partition is found by its
//! GPT name, or by the label of the FAT file system in it (GPT or MBR); the documents are
//! written with the `fatfs` crate into the file system already there (or a new one, for a GPT
//! partition named `CIDATA` that holds none). Only the blocks that change are written: a few
//! copy-on-write blocks per clone. Root file systems are never touched.
//!
//! The partition table is read here, bounded, rather than with a partition crate: `gptman`
//! allocates as many entries as a header claims and multiplies its offsets unchecked, and a
//! golden image is outside input (`fuzz/cidata`).

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

use super::NoCloud;

/// Sector size of the partition tables read (512-byte sectors: what VM and cloud images use).
const SECTOR: u64 = 512;
/// Most GPT entries read (the standard array holds 128).
const MAX_GPT_ENTRIES: u32 = 1024;
/// Unit of the overlay, and of the writes into the volume.
const BLOCK: u64 = 4096;
/// Most reads, writes and seeks the file system code may make on a partition: writing three
/// small files takes hundreds; a loop in a crafted file system's cluster chains ends here.
const MAX_OPS: u64 = 1_000_000;
/// Largest FAT file system written into (every sector count times the sector size then fits
/// the 32 bits the FAT code computes in).
const MAX_FAT_BYTES: u64 = (4 << 30) - 1;

/// Reads a disk (a golden image or a volume) at byte offsets.
pub trait Disk {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; the caller keeps within `size`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl Disk for io::Cursor<Vec<u8>> {
    fn size(&self) -> u64 {
        self.get_ref().len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.seek(SeekFrom::Start(offset))?;
        self.read_exact(buf)
    }
}

/// A partition holding a seed: its bytes on the disk, and how it was known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub start: u64,
    pub len: u64,
    /// `GPT partition 3 named "CIDATA"`, `MBR partition 1, FAT labelled "CIDATA"`.
    pub how: String,
    /// Whether it holds a FAT file system (its boot sector says so). One that does is written
    /// into and never formatted: the image's own files in it stay.
    pub has_fat: bool,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The disk's `CIDATA` partition, if it has exactly one. `Err` names what is wrong with a
/// partition table that claims one (two of them, a damaged GPT).
pub fn find(disk: &mut dyn Disk) -> Result<Option<Partition>, String> {
    let len = disk.size();
    if len < 2 * SECTOR {
        return Ok(None);
    }
    let mut mbr = [0u8; SECTOR as usize];
    disk.read_at(0, &mut mbr).map_err(|e| e.to_string())?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Ok(None);
    }
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..462 + 16 * i]).collect();
    let found = if entries.iter().any(|e| e[4] == 0xee) {
        gpt(disk, len)?
    } else {
        let mut found = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let (kind, first, count) = (e[4], u64::from(u32_at(e, 8)), u64::from(u32_at(e, 12)));
            // Empty, and extended partitions (whose logical ones are not read).
            if kind == 0 || matches!(kind, 0x05 | 0x0f | 0x85) || count == 0 {
                continue;
            }
            let (start, size) = (first * SECTOR, count * SECTOR);
            if start.checked_add(size).is_none_or(|end| end > len) {
                continue; // past the end of the disk: not a partition of this image
            }
            if fat_label(disk, start, size)?.is_some_and(|l| l.eq_ignore_ascii_case("cidata")) {
                found.push(Partition {
                    start,
                    len: size,
                    how: format!("MBR partition {}, FAT labelled CIDATA", i + 1),
                    has_fat: true,
                });
            }
        }
        found
    };
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.into_iter().next()),
        _ => Err(format!(
            "{} partitions are labelled CIDATA ({}): which one is the seed's is unclear",
            found.len(),
            found
                .iter()
                .map(|p| p.how.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}

/// The GPT's partitions named `CIDATA`, or holding a FAT file system labelled so.
fn gpt(disk: &mut dyn Disk, len: u64) -> Result<Vec<Partition>, String> {
    let mut h = [0u8; SECTOR as usize];
    disk.read_at(SECTOR, &mut h).map_err(|e| e.to_string())?;
    if &h[..8] != b"EFI PART" {
        return Err("a protective MBR but no GPT header at sector 1".into());
    }
    let size = u32_at(&h, 12) as usize;
    if !(92..=SECTOR as usize).contains(&size) {
        return Err(format!("the GPT header claims {size} bytes"));
    }
    let mut copy = h;
    copy[16..20].fill(0);
    if crc32fast::hash(&copy[..size]) != u32_at(&h, 16) {
        return Err("the GPT header's checksum does not match".into());
    }
    let (array, count, entry, crc) = (
        u64_at(&h, 72),
        u32_at(&h, 80),
        u32_at(&h, 84) as usize,
        u32_at(&h, 88),
    );
    if count > MAX_GPT_ENTRIES || !(128..=1024).contains(&entry) || !entry.is_multiple_of(128) {
        return Err(format!(
            "the GPT claims {count} entries of {entry} bytes (at most {MAX_GPT_ENTRIES} of 128 \
             to 1024 are read)"
        ));
    }
    let bytes = count as usize * entry;
    let at = array
        .checked_mul(SECTOR)
        .filter(|a| a.checked_add(bytes as u64).is_some_and(|end| end <= len));
    let Some(at) = at else {
        return Err("the GPT's entry array lies past the end of the disk".into());
    };
    let mut table = vec![0u8; bytes];
    disk.read_at(at, &mut table).map_err(|e| e.to_string())?;
    if crc32fast::hash(&table) != crc {
        return Err("the GPT's entry array checksum does not match".into());
    }
    let mut found = Vec::new();
    for (i, e) in table.chunks_exact(entry).enumerate() {
        if e[..16].iter().all(|&b| b == 0) {
            continue; // unused
        }
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        let span = last
            .checked_sub(first)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_mul(SECTOR));
        let start = first.checked_mul(SECTOR);
        let (Some(start), Some(size)) = (start, span) else {
            continue;
        };
        if start.checked_add(size).is_none_or(|end| end > len) {
            continue;
        }
        let name: String = char::decode_utf16((0..36).map(|k| u16_at(e, 56 + 2 * k)))
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .take_while(|&c| c != '\0')
            .collect();
        let label = fat_label(disk, start, size)?;
        if name.eq_ignore_ascii_case("cidata")
            && let Some(l) = label.as_ref().filter(|l| !l.eq_ignore_ascii_case("cidata"))
        {
            // cloud-init finds its seed by the file system's label, not the partition's name.
            return Err(format!(
                "GPT partition {} is named CIDATA but its FAT is labelled {}: cloud-init would \
                 not find a seed there (label it CIDATA)",
                i + 1,
                cut(l)
            ));
        }
        let how = if name.eq_ignore_ascii_case("cidata") {
            format!("GPT partition {} named {name:?}", i + 1)
        } else if label
            .as_ref()
            .is_some_and(|l| l.eq_ignore_ascii_case("cidata"))
        {
            format!("GPT partition {}, FAT labelled CIDATA", i + 1)
        } else {
            continue;
        };
        found.push(Partition {
            start,
            len: size,
            how,
            has_fat: label.is_some(),
        });
    }
    Ok(found)
}

/// `s` quoted for a message, cut to 16 characters.
fn cut(s: &str) -> String {
    format!("{:?}", s.chars().take(16).collect::<String>())
}

/// The label in the boot sector of a FAT file system at `start`, if there is one.
fn fat_label(disk: &mut dyn Disk, start: u64, size: u64) -> Result<Option<String>, String> {
    if size < SECTOR {
        return Ok(None);
    }
    let mut b = [0u8; SECTOR as usize];
    disk.read_at(start, &mut b).map_err(|e| e.to_string())?;
    if b[510..512] != [0x55, 0xaa] || !matches!(u16_at(&b, 11), 512 | 1024 | 2048 | 4096) {
        return Ok(None);
    }
    // The extended boot signature says a label is there: at 43 on FAT12/16, 71 on FAT32.
    let at = if b[38] == 0x29 && &b[54..57] == b"FAT" {
        43
    } else if b[66] == 0x29 && &b[82..85] == b"FAT" {
        71
    } else {
        return Ok(None);
    };
    Ok(Some(
        String::from_utf8_lossy(&b[at..at + 11])
            .trim_end()
            .to_string(),
    ))
}

/// Checks a FAT boot sector's geometry before the file system code trusts it: every region
/// inside the partition, each count within what the FAT code computes without overflow.
fn fat_sane(b: &[u8], part_len: u64) -> Result<(), String> {
    let bps = u64::from(u16_at(b, 11));
    let spc = u64::from(b[13]);
    let reserved = u64::from(u16_at(b, 14));
    let fats = u64::from(b[16]);
    let root_entries = u64::from(u16_at(b, 17));
    let total = match u16_at(b, 19) {
        0 => u64::from(u32_at(b, 32)),
        n => u64::from(n),
    };
    let per_fat = match u16_at(b, 22) {
        0 => u64::from(u32_at(b, 36)),
        n => u64::from(n),
    };
    let bad = |what: &str| Err(format!("its FAT boot sector is damaged ({what})"));
    if !matches!(bps, 512 | 1024 | 2048 | 4096) {
        return bad("sector size");
    }
    if !spc.is_power_of_two() || spc * bps > 64 << 10 {
        return bad("cluster size");
    }
    if reserved == 0 || !(1..=2).contains(&fats) || per_fat == 0 {
        return bad("reserved sectors or FATs");
    }
    let bytes = total * bps;
    if bytes > part_len || bytes > MAX_FAT_BYTES {
        return bad("larger than its partition, or than 4 GiB");
    }
    let root = (root_entries * 32).div_ceil(bps);
    if reserved + fats * per_fat + root >= total {
        return bad("no room for data");
    }
    Ok(())
}

/// A window of `len` bytes at `start` of a disk, read from it and written into memory only:
/// the file system code works on it, then the caller writes the changed blocks to the volume.
pub struct Overlay<'a> {
    disk: &'a mut dyn Disk,
    start: u64,
    len: u64,
    pos: u64,
    /// Blocks written, by their offset on the disk, with their bytes before.
    blocks: BTreeMap<u64, (Vec<u8>, Vec<u8>)>,
    /// Reads, writes and seeks so far (bounded by `MAX_OPS`).
    ops: u64,
}

impl<'a> Overlay<'a> {
    pub fn new(disk: &'a mut dyn Disk, p: &Partition) -> Overlay<'a> {
        Overlay {
            disk,
            start: p.start,
            len: p.len,
            pos: 0,
            blocks: BTreeMap::new(),
            ops: 0,
        }
    }

    /// The blocks whose bytes changed (disk offset, new bytes), in order.
    pub fn changed(self) -> Blocks {
        self.blocks
            .into_iter()
            .filter(|(_, (old, new))| old != new)
            .map(|(at, (_, new))| (at, new))
            .collect()
    }

    /// The block at disk offset `at` (block-aligned), as the overlay has it.
    fn block(&mut self, at: u64) -> io::Result<&mut (Vec<u8>, Vec<u8>)> {
        if !self.blocks.contains_key(&at) {
            let mut b = vec![0u8; BLOCK as usize];
            let end = (at + BLOCK).min(self.disk.size());
            self.disk.read_at(at, &mut b[..(end - at) as usize])?;
            self.blocks.insert(at, (b.clone(), b));
        }
        Ok(self.blocks.get_mut(&at).expect("just inserted"))
    }

    fn count(&mut self) -> io::Result<()> {
        self.ops += 1;
        if self.ops > MAX_OPS {
            return Err(io::Error::other(
                "the FAT file system takes too much work to write (a loop in its cluster chains?)",
            ));
        }
        Ok(())
    }

    /// Copies between `buf` and the window at the current position, block by block.
    fn each(
        &mut self,
        n: usize,
        mut f: impl FnMut(&mut Vec<u8>, usize, usize, usize),
    ) -> io::Result<usize> {
        let n = n.min((self.len - self.pos.min(self.len)) as usize);
        let mut done = 0;
        while done < n {
            let abs = self.start + self.pos + done as u64;
            let at = abs - abs % BLOCK;
            let off = (abs - at) as usize;
            let k = (BLOCK as usize - off).min(n - done);
            let (_, new) = self.block(at)?;
            f(new, off, done, k);
            done += k;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Read for Overlay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.count()?;
        let n = buf.len();
        self.each(n, |b, off, done, k| {
            buf[done..done + k].copy_from_slice(&b[off..off + k])
        })
    }
}

impl Write for Overlay<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.count()?;
        if self.pos >= self.len && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "past the partition's end",
            ));
        }
        self.each(buf.len(), |b, off, done, k| {
            b[off..off + k].copy_from_slice(&buf[done..done + k])
        })
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Overlay<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.count()?;
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

/// Writes the documents into the FAT file system of `part` (replacing the three files, keeping
/// anything else in it), or, if it holds none (`!has_fat`), into a new one labelled `CIDATA`.
pub fn write_seed(part: &mut Overlay<'_>, has_fat: bool, docs: &NoCloud) -> io::Result<()> {
    if has_fat {
        let mut b = [0u8; SECTOR as usize];
        part.seek(SeekFrom::Start(0))?;
        part.read_exact(&mut b)?;
        fat_sane(&b, part.len).map_err(io::Error::other)?;
    } else {
        part.seek(SeekFrom::Start(0))?;
        fatfs::format_volume(
            &mut *part,
            fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "),
        )?;
    }
    part.seek(SeekFrom::Start(0))?;
    super::seed::write_documents(&mut *part, docs)
}

/// Blocks to write, each at its disk offset.
pub type Blocks = Vec<(u64, Vec<u8>)>;

/// Finds the disk's `CIDATA` partition and works out the seed's blocks for it: `Ok(None)` when
/// there is no such partition; else the partition and the blocks to write.
pub fn seed_blocks(
    disk: &mut dyn Disk,
    docs: &NoCloud,
) -> Result<Option<(Partition, Blocks)>, String> {
    let Some(p) = find(disk)? else {
        return Ok(None);
    };
    let mut o = Overlay::new(disk, &p);
    write_seed(&mut o, p.has_fat, docs)
        .map_err(|e| format!("writing the seed into {}: {e}", p.how))?;
    Ok(Some((p, o.changed())))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn docs(host: &str) -> NoCloud {
        NoCloud {
            meta_data: format!("{{\"local-hostname\": \"{host}\"}}\n"),
            user_data: "#cloud-config\n{}\n".into(),
            network_config: "{\"version\": 2}\n".into(),
        }
    }

    /// A 16 MiB disk: an MBR with partition 1 (1 MiB at 1 MiB) holding a FAT labelled `label`.
    pub(crate) fn mbr_disk(label: &[u8; 11]) -> Vec<u8> {
        let mut d = vec![0u8; 16 << 20];
        let e = &mut d[446..462];
        e[4] = 0x0c;
        e[8..12].copy_from_slice(&2048u32.to_le_bytes());
        e[12..16].copy_from_slice(&2048u32.to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xaa;
        let mut part = Cursor::new(vec![0u8; 1 << 20]);
        fatfs::format_volume(
            &mut part,
            fatfs::FormatVolumeOptions::new().volume_label(*label),
        )
        .unwrap();
        d[1 << 20..2 << 20].copy_from_slice(part.get_ref());
        d
    }

    /// A 16 MiB disk with a GPT: partition 1 "root" (no file system), partition 2 named
    /// `name` (empty: no file system).
    pub(crate) fn gpt_disk(name: &str) -> Vec<u8> {
        let mut d = vec![0u8; 16 << 20];
        let e = &mut d[446..462];
        e[4] = 0xee;
        e[8..12].copy_from_slice(&1u32.to_le_bytes());
        e[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xaa;
        let mut table = vec![0u8; 128 * 128];
        for (i, (n, first, last)) in [("root", 2048u64, 8191u64), (name, 8192, 10239)]
            .iter()
            .enumerate()
        {
            let e = &mut table[i * 128..(i + 1) * 128];
            e[0] = 1 + i as u8; // a type GUID that is not zero
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            for (k, u) in n.encode_utf16().enumerate() {
                e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
            }
        }
        let mut h = vec![0u8; 92];
        h[..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32fast::hash(&table).to_le_bytes());
        let crc = crc32fast::hash(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        d[512..604].copy_from_slice(&h);
        d[1024..1024 + table.len()].copy_from_slice(&table);
        d
    }

    fn read_back(disk: &mut Cursor<Vec<u8>>, p: &Partition, file: &str) -> String {
        let mut o = Overlay::new(disk, p);
        let fs = fatfs::FileSystem::new(&mut o, fatfs::FsOptions::new()).unwrap();
        let mut s = String::new();
        fs.root_dir()
            .open_file(file)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    }

    fn apply(disk: &mut Cursor<Vec<u8>>, blocks: &[(u64, Vec<u8>)]) {
        for (at, b) in blocks {
            disk.get_mut()[*at as usize..*at as usize + b.len()].copy_from_slice(b);
        }
    }

    #[test]
    fn an_mbr_fat_labelled_cidata_gets_the_seed_in_a_few_blocks() {
        let mut disk = Cursor::new(mbr_disk(b"CIDATA     "));
        let (p, blocks) = seed_blocks(&mut disk, &docs("web-01")).unwrap().unwrap();
        assert_eq!((p.start, p.len), (1 << 20, 1 << 20));
        assert_eq!(p.how, "MBR partition 1, FAT labelled CIDATA");
        assert!(
            !blocks.is_empty() && blocks.len() <= 8,
            "{} blocks",
            blocks.len()
        );
        assert!(
            blocks
                .iter()
                .all(|(at, _)| *at >= p.start && *at < p.start + p.len)
        );
        apply(&mut disk, &blocks);
        assert_eq!(
            read_back(&mut disk, &p, "meta-data"),
            docs("web-01").meta_data
        );
        // Again with another personality: the files are replaced, not added to.
        let (_, blocks) = seed_blocks(&mut disk, &docs("web-02")).unwrap().unwrap();
        apply(&mut disk, &blocks);
        assert_eq!(
            read_back(&mut disk, &p, "meta-data"),
            docs("web-02").meta_data
        );
    }

    #[test]
    fn a_gpt_partition_named_cidata_gets_a_new_file_system() {
        let mut disk = Cursor::new(gpt_disk("CIDATA"));
        let (p, blocks) = seed_blocks(&mut disk, &docs("db")).unwrap().unwrap();
        assert_eq!((p.start, p.len), (8192 * 512, 2048 * 512));
        assert_eq!(p.how, "GPT partition 2 named \"CIDATA\"");
        apply(&mut disk, &blocks);
        assert_eq!(
            read_back(&mut disk, &p, "network-config"),
            docs("db").network_config
        );
        let mut o = Overlay::new(&mut disk, &p);
        let fs = fatfs::FileSystem::new(&mut o, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
    }

    #[test]
    fn no_partition_or_another_label_means_no_seed() {
        for d in [
            vec![0u8; 1 << 20],
            mbr_disk(b"ROOT       "),
            gpt_disk("root2"),
        ] {
            assert_eq!(find(&mut Cursor::new(d)).unwrap(), None);
        }
    }

    #[test]
    fn damaged_or_ambiguous_tables_are_refused_by_name() {
        let mut d = gpt_disk("CIDATA");
        d[1024 + 128 + 56] = b'X'; // the entry array's checksum no longer matches
        assert!(find(&mut Cursor::new(d)).unwrap_err().contains("checksum"));
        let mut d = gpt_disk("CIDATA");
        d[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(find(&mut Cursor::new(d)).unwrap_err().contains("checksum"));
        let mut d = mbr_disk(b"CIDATA     ");
        let first = d[446..462].to_vec();
        d[462..478].copy_from_slice(&first);
        let e = find(&mut Cursor::new(d)).unwrap_err();
        assert!(e.contains("2 partitions are labelled CIDATA"), "{e}");
        // A FAT labelled CIDATA that the file system code cannot read is refused, never
        // formatted over (the image's own files in it would go).
        let mut d = mbr_disk(b"CIDATA     ");
        d[(1 << 20) + 13] = 0; // no sectors per cluster
        let e = seed_blocks(&mut Cursor::new(d), &docs("x")).unwrap_err();
        assert!(e.contains("writing the seed into MBR partition 1"), "{e}");
        // A GPT partition named CIDATA whose FAT carries another label: cloud-init would not
        // look there.
        let mut d = gpt_disk("CIDATA");
        let mut part = Cursor::new(vec![0u8; 2048 * 512]);
        fatfs::format_volume(
            &mut part,
            fatfs::FormatVolumeOptions::new().volume_label(*b"OTHER      "),
        )
        .unwrap();
        d[8192 * 512..10240 * 512].copy_from_slice(part.get_ref());
        let e = find(&mut Cursor::new(d)).unwrap_err();
        assert!(e.contains("labelled \"OTHER\""), "{e}");
        // A partition past the end of the disk is not one of this disk's.
        let mut d = mbr_disk(b"CIDATA     ");
        d[446 + 12..446 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(find(&mut Cursor::new(d)).unwrap(), None);
    }
}
