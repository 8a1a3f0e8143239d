//! Generation identifiers of a pair volume's two copies (`docs/pair.md` §6, volume-format
//! SPEC.md §10), as DRBD keeps them: what each copy holds, told apart without reading it.
//!
//! A copy's **current** generation names its contents. Both copies of a volume start with the
//! same one (the etcd record's, chosen at creation), and keep it while every write reaches both.
//! When the owner first acknowledges a write alone it starts its peer dirty bitmap and, in the
//! same commit, takes a new current generation; the old one becomes its **bitmap** generation:
//! the one the peer was left at. When a resync has made the peer equal, the peer adopts the
//! owner's current generation, then the owner ends its bitmap and keeps the bitmap generation in
//! its **history** (the last two). A copy whose changes a `volume resolve` discarded has no
//! generation (zero): its contents are nobody's until a whole resync.
//!
//! On reconnect both nodes compare the two sets ([`compare`]) and reach the same verdict, each
//! from its side: in sync, which side is behind (and whether its bitmap covers what differs, or
//! every block must be compared), a split brain (both wrote since a common generation), or
//! unrelated data (no generation in common), which nothing overwrites.
//!
//! On the peer link the generations travel as JSON (the answer to CONTROL `generations`),
//! decoded here with every field checked (`fuzz/fuzz_targets/peer_frame.rs` feeds it too).

use serde::{Deserialize, Serialize};

/// One generation identifier: 16 random bytes, never all zero; zero means none.
pub type Generation = [u8; 16];

/// Zero: no generation.
pub const NONE: Generation = [0; 16];

/// A copy's generation identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generations {
    pub current: Generation,
    /// While a peer dirty bitmap is kept: the generation the peer was left at.
    pub bitmap: Option<Generation>,
    /// Earlier generations, newest first (`NONE` where none).
    pub history: [Generation; volume_format::layout::GENERATION_HISTORY],
}

/// What the comparison of two copies' generations says, from the side of `this`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The same contents (up to bits a bitmap still holds, which its owner resyncs).
    InSync,
    /// `this` holds writes the other lacks: resync from `this`. `whole`: the bitmap does not
    /// name them all (the other is further behind, or its changes were discarded), so every
    /// block is compared.
    OtherBehind { whole: bool },
    /// The other holds writes `this` lacks.
    ThisBehind { whole: bool },
    /// Both wrote since they parted at `since`: never merged.
    SplitBrain { since: Generation },
    /// No generation in common: the copies are not of one volume's history. Refused.
    Unrelated,
}

impl Generations {
    /// The generations of an open volume.
    pub fn of<S: volume_format::Storage>(vol: &volume_format::Volume<S>) -> Generations {
        let (current, bitmap, history) = vol.generations();
        Generations {
            current,
            bitmap,
            history,
        }
    }

    /// The generations a volume's superblock records (read without opening the volume).
    pub fn of_superblock(sb: &volume_format::Superblock) -> Generations {
        let kept = sb.incompat & volume_format::layout::INCOMPAT_PEER_DIRTY_BITMAP != 0;
        Generations {
            current: sb.generation,
            bitmap: kept.then_some(sb.peer_generation),
            history: sb.history,
        }
    }

    /// Every generation it names (not zero), newest first.
    fn known(&self) -> impl Iterator<Item = Generation> + '_ {
        std::iter::once(self.current)
            .chain(self.bitmap)
            .chain(self.history.iter().copied())
            .filter(|g| *g != NONE)
    }

    /// The wire form (JSON, generations in hex).
    pub fn encode(&self) -> Vec<u8> {
        let w = Wire {
            current: hex(&self.current),
            bitmap: self.bitmap.as_ref().map(hex),
            history: self.history.iter().map(hex).collect(),
        };
        serde_json::to_vec(&w).expect("generations serialise")
    }

    /// Decodes the peer's answer: the generations, or what is wrong with them.
    pub fn decode(b: &[u8]) -> Result<Generations, String> {
        let w: Wire =
            serde_json::from_slice(b).map_err(|e| format!("the peer's generations: {e}"))?;
        let mut history = [NONE; volume_format::layout::GENERATION_HISTORY];
        if w.history.len() != history.len() {
            return Err(format!(
                "the peer's generations: {} in the history, not {}",
                w.history.len(),
                history.len()
            ));
        }
        for (slot, h) in history.iter_mut().zip(&w.history) {
            *slot = unhex(h)?;
        }
        let bitmap = w.bitmap.as_deref().map(unhex).transpose()?;
        Ok(Generations {
            current: unhex(&w.current)?,
            bitmap,
            history,
        })
    }
}

impl std::fmt::Display for Generations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "current {}", short(&self.current))?;
        if let Some(b) = &self.bitmap {
            write!(f, ", bitmap {}", short(b))?;
        }
        Ok(())
    }
}

/// The first 8 hex digits of a generation ("none" for zero), for messages.
pub fn short(g: &Generation) -> String {
    if *g == NONE {
        "none".into()
    } else {
        hex(g)[..8].to_owned()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    current: String,
    bitmap: Option<String>,
    history: Vec<String>,
}

fn hex(g: &Generation) -> String {
    volume_format::image::hex(g)
}

/// A generation in hex (32 digits): a CONTROL request's, an etcd record's, the peer's answer's.
pub fn parse(s: &str) -> Result<Generation, String> {
    let bad = || format!("{:?} is not a generation (32 hex digits)", cut(s));
    if s.len() != 32 || !s.is_ascii() {
        return Err(bad());
    }
    let mut g = NONE;
    for (i, byte) in g.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(g)
}

/// `parse`, for the peer's answer.
fn unhex(s: &str) -> Result<Generation, String> {
    parse(s).map_err(|e| format!("the peer's generations: {e}"))
}

/// At most 40 characters of a value, for an error message.
fn cut(s: &str) -> String {
    s.chars().take(40).collect()
}

/// The verdict on two copies' generations, from `this` side. Both nodes reach the mirror
/// image of each other's verdict from the same two sets (a unit test holds it to that).
pub fn compare(this: &Generations, other: &Generations) -> Verdict {
    // A copy without a generation had its changes discarded: the other's contents win whole.
    match (this.current == NONE, other.current == NONE) {
        (true, true) => return Verdict::Unrelated,
        (false, true) => return Verdict::OtherBehind { whole: true },
        (true, false) => return Verdict::ThisBehind { whole: true },
        (false, false) => {}
    }
    if this.current == other.current {
        return Verdict::InSync;
    }
    // One side parted from the other's current contents and wrote alone: its bitmap names
    // what the other lacks.
    if this.bitmap == Some(other.current) {
        return Verdict::OtherBehind { whole: false };
    }
    if other.bitmap == Some(this.current) {
        return Verdict::ThisBehind { whole: false };
    }
    // Both parted from the same generation and both wrote since.
    if let (Some(a), Some(b)) = (this.bitmap, other.bitmap)
        && a == b
    {
        return Verdict::SplitBrain { since: a };
    }
    // Further apart: one side's current contents are in the other's past (behind by more than
    // a bitmap covers), or they share only a past.
    if other.bitmap.is_none() && this.history.contains(&other.current) {
        return Verdict::OtherBehind { whole: true };
    }
    if this.bitmap.is_none() && other.history.contains(&this.current) {
        return Verdict::ThisBehind { whole: true };
    }
    match this.known().find(|g| other.known().any(|o| o == *g)) {
        Some(since) => Verdict::SplitBrain { since },
        None => Verdict::Unrelated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(n: u8) -> Generation {
        [n; 16]
    }

    fn gens(current: u8, bitmap: Option<u8>, history: [u8; 2]) -> Generations {
        Generations {
            current: g(current),
            bitmap: bitmap.map(g),
            history: [g(history[0]), g(history[1])],
        }
    }

    /// The other side's verdict is the mirror image.
    fn mirrored(v: Verdict) -> Verdict {
        match v {
            Verdict::OtherBehind { whole } => Verdict::ThisBehind { whole },
            Verdict::ThisBehind { whole } => Verdict::OtherBehind { whole },
            v => v,
        }
    }

    #[test]
    fn each_case_of_the_table_and_both_sides_agree() {
        use Verdict::*;
        let cases = [
            // Mirrored, never apart.
            (gens(1, None, [0, 0]), gens(1, None, [0, 0]), InSync),
            // The owner wrote alone from 1 (its bitmap): the peer is behind, the bitmap covers.
            (
                gens(2, Some(1), [0, 0]),
                gens(1, None, [0, 0]),
                OtherBehind { whole: false },
            ),
            // Resync ended on the peer (it adopted 2) before the owner ended its bitmap.
            (gens(2, Some(1), [0, 0]), gens(2, None, [1, 0]), InSync),
            // A second outage after a finished resync (the peer adopted 2, the owner went on
            // alone from 2).
            (
                gens(3, Some(2), [1, 0]),
                gens(2, None, [1, 0]),
                OtherBehind { whole: false },
            ),
            // A peer two outages back (it never adopted 2): the bitmap does not cover it.
            (
                gens(3, None, [2, 1]),
                gens(1, None, [0, 0]),
                OtherBehind { whole: true },
            ),
            // A forced promotion: both parted from 1 and both wrote.
            (
                gens(2, Some(1), [0, 0]),
                gens(5, Some(1), [0, 0]),
                SplitBrain { since: g(1) },
            ),
            // Both wrote, and one already ended its bitmap: they share only history.
            (
                gens(2, None, [1, 0]),
                gens(5, Some(1), [0, 0]),
                SplitBrain { since: g(1) },
            ),
            // Discarded by a resolve: whole from the other.
            (
                gens(2, Some(1), [0, 0]),
                gens(0, None, [5, 0]),
                OtherBehind { whole: true },
            ),
            // Nothing in common.
            (gens(2, Some(1), [0, 0]), gens(7, None, [8, 9]), Unrelated),
            (gens(0, None, [0, 0]), gens(0, None, [0, 0]), Unrelated),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare(&a, &b), want, "{a:?} vs {b:?}");
            assert_eq!(compare(&b, &a), mirrored(want), "{b:?} vs {a:?}");
        }
    }

    #[test]
    fn the_wire_form_round_trips_and_bad_answers_are_named() {
        let a = gens(2, Some(1), [9, 0]);
        assert_eq!(Generations::decode(&a.encode()), Ok(a));
        let b = gens(3, None, [0, 0]);
        assert_eq!(Generations::decode(&b.encode()), Ok(b));
        let zero = "0".repeat(32);
        for bad in [
            format!(r#"{{"current":"{zero}","bitmap":null,"history":["{zero}"]}}"#),
            format!(r#"{{"current":"xyz","bitmap":null,"history":["{zero}","{zero}"]}}"#),
            format!(
                r#"{{"current":"{}","bitmap":null,"history":["{zero}","{zero}"]}}"#,
                "é".repeat(16)
            ),
            format!(r#"{{"current":"{zero}","bitmap":null,"history":["{zero}","{zero}"],"x":1}}"#),
            "[]".to_string(),
        ] {
            assert!(Generations::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
