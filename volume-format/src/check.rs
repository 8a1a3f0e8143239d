//! The checker (SPEC.md §8): verifies every checksum and invariant of a closed volume, reports
//! what a crash left behind, and with `repair` reclaims it.
//!
//! Corruption (a committed structure that fails its checksum or an invariant) is reported and
//! never "repaired" by guessing. What a crash legitimately leaves is repairable:
//! - leaked data: blocks in the data file whose map bit is INHERITED (written, never committed);
//! - orphan or torn map slots and superblock copies from an interrupted commit;
//! - data past the end of the volume.

use crate::layout::*;
use crate::map::BlockState;
use crate::state::VolumeState;
use crate::storage::Storage;
use crate::volume::{VolumeError, load_state};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruption: the volume cannot be served.
    pub errors: Vec<String>,
    /// Harmless leftovers of an interrupted commit.
    pub notes: Vec<String>,
    /// Leaked data ranges `(offset, len)` in the data file.
    pub leaks: Vec<(u64, u64)>,
    pub leaked_bytes: u64,
    /// Whether `repair` changed anything.
    pub repaired: bool,
}

impl CheckReport {
    pub fn clean(&self) -> bool {
        self.errors.is_empty() && self.leaks.is_empty()
    }
}

/// Checks a closed volume's metadata and data file; with `repair`, punches out leaked blocks.
/// The backing image is not read (its digest is checked by `image::verify`).
pub fn check<S: Storage>(meta: &mut S, data: &mut S, repair: bool) -> CheckReport {
    let mut r = CheckReport::default();
    let st = match load_state(meta, usize::MAX) {
        Ok(st) => st,
        Err(e) => {
            r.errors.push(e.to_string());
            return r;
        }
    };
    r.notes.extend(st.notes().iter().cloned());
    let ro = st.superblock().read_only_features();
    if repair && ro != 0 {
        r.errors.push(format!(
            "repair refused: the volume uses read-only-compatible features {ro:#x} this build does not know"
        ));
        return r;
    }
    if let Err(e) = find_leaks(&st, data, &mut r) {
        r.errors.push(format!("data file: {e}"));
        return r;
    }
    if repair && !r.leaks.is_empty() && !data.frees_space() {
        r.notes.push(
            "leaked space not reclaimed: this file system cannot punch holes (writing zeroes \
             would allocate it)"
                .into(),
        );
        return r;
    }
    if repair && !r.leaks.is_empty() {
        let mut punch = || -> Result<(), VolumeError> {
            for &(off, len) in &r.leaks {
                data.punch_hole(off, len)?;
            }
            if data.len() < st.size() {
                data.set_len(st.size())?;
            }
            data.sync()?;
            Ok(())
        };
        match punch() {
            Ok(()) => r.repaired = true,
            Err(e) => r.errors.push(format!("repair failed: {e}")),
        }
    }
    r
}

fn find_leaks<S: Storage>(
    st: &VolumeState,
    data: &mut S,
    r: &mut CheckReport,
) -> Result<(), VolumeError> {
    let size = st.size();
    let add = |r: &mut CheckReport, off: u64, len: u64| {
        r.leaked_bytes += len;
        match r.leaks.last_mut() {
            Some(l) if l.0 + l.1 == off => l.1 += len,
            _ => r.leaks.push((off, len)),
        }
    };
    let mut pos = 0;
    let end = data.len();
    while pos < end {
        let Some(d) = data.seek_data(pos)? else { break };
        if d >= end {
            break;
        }
        let h = data.seek_hole(d)?.clamp(d + 1, end);
        // Whole blocks touched by this data extent.
        let mut b = d / BLOCK_BYTES;
        let last = (h - 1) / BLOCK_BYTES;
        while b <= last {
            let off = b * BLOCK_BYTES;
            if off >= size {
                add(r, off, end - off); // everything past the volume's end
                return finish(st, data, r);
            }
            let blocks = st.map().blocks();
            let (start, count, state) = st
                .map()
                .runs(b, (last + 1).min(blocks) - b)
                .next()
                .expect("a non-empty range has a run");
            if state == BlockState::Inherited {
                add(r, start * BLOCK_BYTES, count * BLOCK_BYTES);
            }
            b = start + count;
        }
        pos = h;
    }
    finish(st, data, r)
}

fn finish<S: Storage>(st: &VolumeState, data: &S, r: &mut CheckReport) -> Result<(), VolumeError> {
    let size = st.size();
    if data.len() > size {
        r.notes.push(format!(
            "data file is {} bytes, longer than the volume ({size})",
            data.len()
        ));
    } else if data.len() < size {
        r.notes.push(format!(
            "data file is {} bytes, shorter than the volume ({size}); repair extends it",
            data.len()
        ));
    }
    Ok(())
}
