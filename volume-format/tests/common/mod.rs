//! Shared pieces of the volume-format integration tests: a seeded generator, golden images in
//! memory, and a volume paired with its reference model.
#![allow(dead_code)]

use volume_format::{ImageInfo, ImageRef, MemFile, Storage, Volume, image};

pub const BLOCK: u64 = 4096;

/// xorshift64*: deterministic, seedable, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        let tag = self.next();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (tag >> ((i % 8) * 8)) as u8 ^ (i / 8) as u8;
        }
    }
    pub fn id(&mut self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next().to_le_bytes());
        id[8..].copy_from_slice(&self.next().to_le_bytes());
        id[0] |= 1; // never all zero
        id
    }
}

/// A sealed golden image in memory and its bytes.
#[derive(Clone)]
pub struct Golden {
    pub raw: MemFile,
    pub info: ImageInfo,
    pub bytes: Vec<u8>,
}

impl Golden {
    pub fn new(rng: &mut Rng, size: usize) -> Golden {
        let mut bytes = vec![0u8; size];
        rng.fill(&mut bytes);
        // A hole in the middle, as real images have.
        if size > 3 * BLOCK as usize {
            bytes[BLOCK as usize..2 * BLOCK as usize].fill(0);
        }
        let mut raw = MemFile::new();
        for (i, chunk) in bytes.chunks(BLOCK as usize).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                raw.write_at(i as u64 * BLOCK, chunk).unwrap();
            }
        }
        raw.set_len(size as u64).unwrap();
        raw.sync().unwrap();
        let info = image::seal(&mut raw, rng.id(), |_| {}).unwrap();
        Golden { raw, info, bytes }
    }

    pub fn backing(&self) -> Option<(MemFile, ImageRef)> {
        Some((self.raw.clone(), self.info.image_ref()))
    }
}

/// A fresh data file: writes to it are atomic per 4 KiB block, as SPEC.md §7 assumes of disks.
pub fn data_file() -> MemFile {
    MemFile::with_tear_unit(BLOCK)
}

/// A volume and the bytes it must read as.
pub struct Modelled {
    pub vol: Volume<MemFile>,
    pub model: Vec<u8>,
}

impl Modelled {
    pub fn clone_of(rng: &mut Rng, g: Option<&Golden>, size: u64) -> Modelled {
        let vol = Volume::create(
            MemFile::new(),
            data_file(),
            g.and_then(Golden::backing),
            size,
            rng.id(),
            rng.id(),
        )
        .unwrap();
        let mut model = vec![0u8; size as usize];
        if let Some(g) = g {
            model[..g.bytes.len()].copy_from_slice(&g.bytes);
        }
        Modelled { vol, model }
    }

    pub fn read_all(&mut self) -> Vec<u8> {
        let mut got = vec![0u8; self.model.len()];
        self.vol.read(0, &mut got).unwrap();
        got
    }

    pub fn assert_matches(&mut self, why: &str) {
        let got = self.read_all();
        if let Some(i) = got.iter().zip(&self.model).position(|(a, b)| a != b) {
            panic!(
                "{why}: byte {i} (block {}) reads {:#04x}, model {:#04x}",
                i as u64 / BLOCK,
                got[i],
                self.model[i]
            );
        }
    }
}

/// Rounds up to whole blocks.
pub fn round_up(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}
