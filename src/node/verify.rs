//! `volume verify` (`docs/pair.md` §5): the two copies of a pair volume compared online, as
//! DRBD's online verify does. The owner walks the volume in 4 MiB steps; each step is held
//! against writes (the mirror's range lock: no write to it is in flight on either node), the
//! owner reads its copy and the peer sends the crc32c of each 4 KiB block of its own (a CONTROL
//! request on one connection), and the blocks whose checksums differ are reported, with how
//! many of them the peer dirty bitmap already holds (a degraded volume's differences that a
//! resync will copy).

use super::info::VerifyInfo;
use super::{Job, Node, NodeError};
use crate::peer::control::ControlRequest;
use crate::target::{BlockTarget, TargetOp, blocking};

/// Blocks compared per step (4 MiB).
const STEP_BLOCKS: u64 = 1024;
/// Most differing blocks listed in the report (all are counted).
const MAX_LISTED: usize = 1000;

impl Node {
    /// The crc32c of each 4 KiB block of `blocks` from `first` of this node's copy of `name`
    /// (for the owner's verify).
    pub(super) fn block_checksums(
        &self,
        name: &str,
        first: u64,
        blocks: u64,
    ) -> Result<Vec<u32>, NodeError> {
        if blocks == 0 || blocks > STEP_BLOCKS {
            return Err(NodeError::Invalid(format!(
                "checksums of 1 to {STEP_BLOCKS} blocks, not {blocks}"
            )));
        }
        let t = self
            .served_volume(name)
            .ok_or_else(|| NodeError::NotFound(format!("volume {name:?} is not served here")))?;
        let size = t.geometry().size_bytes;
        let offset = first
            .checked_mul(4096)
            .filter(|o| o.saturating_add(blocks * 4096) <= size)
            .ok_or_else(|| NodeError::Invalid(format!("blocks {first}+{blocks} past the end")))?;
        let mut buf = vec![0u8; (blocks * 4096) as usize];
        let op = TargetOp::Read {
            offset,
            len: (blocks * 4096) as u32,
        };
        blocking::run(t.as_ref(), &op, &mut buf)
            .map_err(|e| NodeError::Io(format!("reading volume {name:?}: {e}")))?;
        Ok(buf.chunks(4096).map(crc32c::crc32c).collect())
    }

    /// Compares pair volume `name`'s two copies (on its owner).
    pub fn verify_pair_volume(
        &self,
        name: &str,
        job: &Job,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<VerifyInfo, NodeError> {
        let m = self.owned_mirror(name)?;
        let mut session = {
            let p = self.pair.lock();
            let link = p
                .as_ref()
                .and_then(|p| p.link())
                .ok_or_else(|| NodeError::Invalid("this node is not in a pair".into()))?;
            link.control_session().map_err(NodeError::Io)?
        };
        let vol = m.volume().clone();
        let size = vol.geometry().size_bytes;
        let blocks = size.div_ceil(4096);
        let mut differ: Vec<u64> = Vec::new();
        let mut count = 0u64;
        let mut in_bitmap = 0u64;
        let mut pacer = self.pacer();
        let mut first = 0;
        while first < blocks {
            job.check()
                .map_err(|e| NodeError::Cancelled(e.to_string()))?;
            let n = STEP_BLOCKS.min(blocks - first);
            let (offset, len) = (first * 4096, n * 4096);
            let held = m.lock_range(offset, offset + len);
            let mine = self.block_checksums(name, first, n)?;
            let req = ControlRequest::Checksums {
                name: name.into(),
                first,
                blocks: n,
            }
            .encode();
            let answer = session.call(&req).map_err(NodeError::Io)?;
            drop(held);
            let theirs = crate::peer::control::decode_checksums(&answer, mine.len())
                .map_err(NodeError::Io)?;
            for (i, (a, b)) in mine.iter().zip(&theirs).enumerate() {
                if a != b {
                    let block = first + i as u64;
                    count += 1;
                    if vol.next_peer_dirty(block, 1) == Some((block, 1)) {
                        in_bitmap += 1;
                    }
                    if differ.len() < MAX_LISTED {
                        differ.push(block);
                    }
                }
            }
            first += n;
            pacer.pace(len);
            progress(first * 4096, Some(size));
        }
        let message = if count == 0 {
            format!(
                "the two copies are identical ({} compared)",
                indicatif::HumanBytes(size)
            )
        } else {
            format!(
                "{count} block(s) of 4 KiB differ between the copies, {in_bitmap} of them in the \
                 peer dirty bitmap (a resync copies those){}",
                if count > in_bitmap {
                    "; the others are not known to differ: resolve before trusting the peer"
                } else {
                    ""
                }
            )
        };
        Ok(VerifyInfo {
            name: name.to_owned(),
            ok: count == 0,
            sha256: String::new(),
            bad_chunks: differ,
            message,
        })
    }
}
