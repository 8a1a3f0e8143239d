//! Why metadata was refused. Every error names the structure (superblock, map page N slot S,
//! image header, ...) and what is wrong with it, so an operator can tell a torn write from a
//! mismatched image from a newer format.

use crate::layout::FORMAT_VERSION;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{0}: bad magic")]
    BadMagic(String),
    #[error("{what}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        what: String,
        stored: u32,
        computed: u32,
    },
    #[error(
        "{what}: format version {version} is not supported (this build reads {FORMAT_VERSION})"
    )]
    UnsupportedVersion { what: String, version: u32 },
    #[error("volume: unknown incompatible features {0:#x}")]
    UnknownIncompatibleFeatures(u64),
    #[error("{what}: {why}")]
    Invariant { what: String, why: String },
    #[error("no valid superblock: A: {a}; B: {b}")]
    NoValidSuperblock {
        a: Box<FormatError>,
        b: Box<FormatError>,
    },
}

impl FormatError {
    pub(crate) fn invariant(what: impl Into<String>, why: impl Into<String>) -> FormatError {
        FormatError::Invariant {
            what: what.into(),
            why: why.into(),
        }
    }
}
