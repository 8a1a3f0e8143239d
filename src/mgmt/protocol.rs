//! The management protocol: typed messages on a Unix socket, one JSON document per line.
//! `docs/management.md` is its description for people; this file is the authority.
//!
//! A client connects, sends one [`Envelope`] line (for `image_import`, with the source file's
//! descriptor attached as `SCM_RIGHTS`), and reads [`Reply`] lines: any number of `progress`
//! lines, then exactly one `ok` or `error` line, after which the server closes the connection.

use serde::{Deserialize, Serialize};

/// What the node reports travels as the node says it: these are the node's own types, and
/// their serde form is the wire's.
pub use crate::node::DeployReport;
pub use crate::node::info::{
    CheckInfo, ClientInfo, HeldAddress, ImageInfo, IpPoolInfo, JobInfo, LinkInfo, PairInfo,
    PairNodeInfo, PoolSpace, StatusInfo, VerifyInfo, VolumeCheck, VolumeInfo,
};

/// The protocol version this build speaks. A server refuses other versions with an error that
/// names both.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line the server reads; longer ones are refused and the connection closed.
/// A deployment plan of thousands of servers is the longest request.
pub const MAX_REQUEST_BYTES: usize = 8 << 20;

/// Longest reply line a client accepts (a `volume list` of thousands of volumes fits).
pub const MAX_REPLY_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub version: u32,
    pub request: Request,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// The raw image bytes come from the descriptor passed with the message, which must be
    /// open for reading (the node reads that descriptor and nothing else). Other formats are
    /// converted on the client, as the calling user: the node never follows a reference inside
    /// an image file with its own permissions.
    ImageImport {
        name: String,
        /// `None` or `raw`; any other format is refused (the CLI converts before it sends).
        format: Option<String>,
        /// The number of bytes the source must hold: a stream that ends sooner or later is
        /// refused and nothing is published (a cut-short pipe ends like a short file).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        /// The SHA-256 (hex) the image must have; a mismatch publishes nothing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    ImageList,
    ImageShow {
        name: String,
    },
    ImageVerify {
        name: String,
    },
    ImageDelete {
        name: String,
    },
    ImageCapture {
        name: String,
        from: String,
    },
    VolumeCreate {
        name: String,
        image: Option<String>,
        size: Option<u64>,
        /// Published with the volume, in the same step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        personality: Option<Box<crate::personality::Personality>>,
    },
    VolumeList,
    VolumeShow {
        name: String,
    },
    VolumeResize {
        name: String,
        size: u64,
    },
    VolumeDelete {
        name: String,
        force: bool,
    },
    /// A fresh clone of `image` under the volume's name, with its personality.
    VolumeRedeploy {
        name: String,
        image: String,
        force: bool,
        keep_previous: bool,
    },
    Check {
        repair: bool,
        /// One volume; `None`: every volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Ends a long command (`status` lists them with their ids).
    Cancel {
        id: u64,
    },
    /// The pair this node belongs to: its nodes, the peer link, etcd.
    PairStatus,
    /// Sets (or with `null` removes) a volume's personality; answered with the volume.
    VolumePersonality {
        name: String,
        personality: Option<Box<crate::personality::Personality>>,
    },
    IpPoolCreate {
        pool: Box<crate::personality::ippool::IpPool>,
    },
    IpPoolList,
    IpPoolDelete {
        name: String,
    },
    /// Creates or brings up to date many volumes with their personalities: a plan's text
    /// (`personality::plan`), checked whole before anything is made.
    Deploy {
        plan: String,
        /// Make the good servers even when some are bad (default: none unless all are good).
        #[serde(default)]
        skip_bad: bool,
        /// Check and report what would be done; make nothing.
        #[serde(default)]
        dry_run: bool,
    },
    /// Makes this node the owner of a pair volume whose owner is gone (`docs/pair.md` §7).
    VolumePromote {
        name: String,
        force: bool,
    },
    /// Hands a pair volume's ownership to the other node (on its owner).
    VolumeMove {
        name: String,
        to: String,
    },
    /// Compares a pair volume's two copies block by block (on its owner).
    VolumeVerify {
        name: String,
    },
    /// Ends a split brain by keeping one node's data (`docs/pair.md` §6).
    VolumeResolve {
        name: String,
        keep: String,
    },
}

impl Request {
    /// What a long command is called in `status` (`None` for the quick ones).
    pub fn job_name(&self) -> Option<String> {
        match self {
            Request::ImageImport { name, .. } => Some(format!("image import {name}")),
            Request::ImageVerify { name } => Some(format!("image verify {name}")),
            Request::Deploy { .. } => Some("deploy".into()),
            Request::VolumeVerify { name } => Some(format!("volume verify {name}")),
            Request::ImageCapture { name, from } => {
                Some(format!("image capture {name} --from {from}"))
            }
            Request::Check { name, .. } => Some(match name {
                Some(n) => format!("check {n}"),
                None => "check".into(),
            }),
            _ => None,
        }
    }

    /// Commands that stream whole images or volumes (run in the background, at low priority).
    pub fn is_bulk(&self) -> bool {
        match self {
            Request::ImageImport { .. }
            | Request::ImageVerify { .. }
            | Request::VolumeVerify { .. }
            | Request::ImageCapture { .. }
            | Request::Check { .. } => true,
            Request::Status
            | Request::ImageList
            | Request::ImageShow { .. }
            | Request::ImageDelete { .. }
            | Request::VolumeCreate { .. }
            | Request::VolumeList
            | Request::VolumeShow { .. }
            | Request::VolumeResize { .. }
            | Request::VolumeDelete { .. }
            | Request::VolumeRedeploy { .. }
            | Request::Cancel { .. }
            | Request::PairStatus
            | Request::VolumePersonality { .. }
            | Request::IpPoolCreate { .. }
            | Request::IpPoolList
            | Request::IpPoolDelete { .. }
            | Request::VolumePromote { .. }
            | Request::VolumeMove { .. }
            | Request::VolumeResolve { .. }
            | Request::Deploy { .. } => false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Work under way: `done` bytes of `total` (when known).
    Progress {
        done: u64,
        total: Option<u64>,
    },
    Ok {
        /// Boxed: a status is much larger than a progress line.
        result: Box<Response>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// What kind of failure, for scripts; `message` says it for people.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed, or a name or size is not acceptable.
    Invalid,
    NotFound,
    Exists,
    /// Something depends on the object (clients, volumes) or another command is working on it.
    InUse,
    /// The peer may not manage this node.
    Denied,
    /// A disk or volume error.
    Io,
    /// The command was cancelled (`streamer cancel`, or its client went away).
    Cancelled,
}

/// A SHA-256 given as 64 hex digits (either case), as `image_import`'s `sha256` carries it.
pub fn parse_sha256(hex: &str) -> Result<[u8; 32], String> {
    let bad = || format!("{hex:?} is not a SHA-256 (64 hex digits)");
    // Digits only: `from_str_radix` alone would take a leading '+'.
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

impl From<&crate::node::NodeError> for ErrorKind {
    /// The one place a node error becomes a protocol error kind. No `_` arm: a new variant
    /// must choose.
    fn from(e: &crate::node::NodeError) -> ErrorKind {
        use crate::node::NodeError;
        use crate::pool::PoolError;
        match e {
            NodeError::Pool(p) => match p {
                PoolError::Invalid(_) => ErrorKind::Invalid,
                PoolError::NotFound { .. } => ErrorKind::NotFound,
                PoolError::Exists { .. } => ErrorKind::Exists,
                PoolError::InUse(_) => ErrorKind::InUse,
                PoolError::Cancelled(_) => ErrorKind::Cancelled,
                PoolError::Io { .. } | PoolError::Volume { .. } => ErrorKind::Io,
            },
            NodeError::InUse(_) => ErrorKind::InUse,
            NodeError::NotFound(_) => ErrorKind::NotFound,
            NodeError::Denied(_) => ErrorKind::Denied,
            NodeError::Invalid(_) => ErrorKind::Invalid,
            NodeError::Io(_) => ErrorKind::Io,
            NodeError::Cancelled(_) => ErrorKind::Cancelled,
        }
    }
}

impl ErrorKind {
    /// The name on the wire (and in the CLI's `--json` errors).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Exists => "exists",
            ErrorKind::InUse => "in_use",
            ErrorKind::Denied => "denied",
            ErrorKind::Io => "io",
            ErrorKind::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Response {
    Status(StatusInfo),
    Image(ImageInfo),
    Images(Vec<ImageInfo>),
    Volume(VolumeInfo),
    Volumes(Vec<VolumeInfo>),
    Verify(VerifyInfo),
    Check(CheckInfo),
    Deleted { name: String },
    Cancelled(JobInfo),
    Pair(PairInfo),
    IpPool(Box<IpPoolInfo>),
    IpPools(Vec<IpPoolInfo>),
    Deploy(DeployReport),
}

/// Parses a request line: the version first, so a client of another version is told so.
/// Input from outside: any bytes give a request or a message naming the problem.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "protocol version {v} is not supported; this server speaks {PROTOCOL_VERSION}"
            ));
        }
        None => return Err("malformed request: no \"version\" number".into()),
    }
    serde_json::from_value::<Envelope>(value)
        .map(|e| e.request)
        .map_err(|e| format!("malformed request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_fields_are_refused() {
        let e = Envelope {
            version: PROTOCOL_VERSION,
            request: Request::VolumeCreate {
                name: "web-1".into(),
                image: Some("debian".into()),
                size: Some(10 << 30),
                personality: None,
            },
        };
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(
            line,
            r#"{"version":1,"request":{"op":"volume_create","name":"web-1","image":"debian","size":10737418240}}"#
        );
        assert_eq!(serde_json::from_str::<Envelope>(&line).unwrap(), e);
        let extra = r#"{"version":1,"request":{"op":"image_show","name":"a","x":1}}"#;
        assert!(serde_json::from_str::<Envelope>(extra).is_err());
        let unknown = r#"{"version":1,"request":{"op":"format_disk"}}"#;
        assert!(serde_json::from_str::<Envelope>(unknown).is_err());
    }
}

#[cfg(test)]
mod kind_tests {
    use super::ErrorKind;

    #[test]
    fn sha256_is_64_hex_digits_and_nothing_else() {
        use super::parse_sha256;
        let h = "00ff".repeat(16);
        assert_eq!(parse_sha256(&h).unwrap()[..2], [0x00, 0xff]);
        assert_eq!(parse_sha256(&h.to_uppercase()).unwrap()[1], 0xff);
        for bad in [
            "",
            "abc",
            &"+a".repeat(32),
            &"g0".repeat(32),
            &"00".repeat(33),
        ] {
            assert!(parse_sha256(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kind_names_are_the_wire_names() {
        use ErrorKind::*;
        for k in [Invalid, NotFound, Exists, InUse, Denied, Io, Cancelled] {
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
    }
}
