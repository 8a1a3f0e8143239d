//! The CONTROL requests of the peer link (`docs/peer-protocol.md`, "A control call", "An
//! image link"): JSON documents, decoded here (and fuzzed with the frames) before the node acts
//! on them, and encoded here by the node that sends them.

use serde::{Deserialize, Serialize};

use super::wire::MAX_CONTROL_BYTES;

/// A CONTROL request on a control call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Make this node's replica of pair volume `name` as its etcd record says.
    CreateReplica { name: String },
    /// Delete this node's replica of pair volume `name` if it is volume `id`.
    DeleteReplica { name: String, id: u32 },
    /// This node's replica of `name` is in sync again (its stale record is gone): serve reads.
    ReplicaInSync { name: String },
    /// The owner recorded this node's replica of `name` stale: stop serving reads of it.
    ReplicaStale { name: String },
    /// `volume resolve`: etcd records this node's copy of `name` discarded: drop its changes
    /// (bitmap and generation) and serve it as the stale replica the owner resyncs whole.
    DiscardSplitBrain { name: String },
    /// crc32c of each 4 KiB block `first .. first + blocks` of this node's copy of `name`.
    Checksums {
        name: String,
        first: u64,
        blocks: u64,
    },
    /// The peer deleted image `name`: delete this node's copy (refused while volumes use it).
    DeleteImage { name: String },
    /// `volume move`: commit this node's replica of `name`.
    FlushReplica { name: String },
    /// `volume move` or `volume resolve`: this node owns `name` now: serve it as its owner.
    BecameOwner { name: String },
    /// `volume resize` on the owner: grow this node's replica of `name` (volume `id`) to
    /// `size` bytes, before the owner grows its own copy.
    GrowReplica { name: String, id: u32, size: u64 },
    /// The owner's personality record of pair volume `name` (volume `id`), compact JSON, or
    /// none: kept beside this node's replica, its seed served here too, so the volume keeps its
    /// personality when this node takes it over.
    SetPersonality {
        name: String,
        id: u32,
        record: Option<String>,
    },
    /// End every data link from the sender and answer once none applies frames any more.
    FenceDataLinks,
    /// The sender's replica of `name` (volume `id`) restarted after a crash: writes it had
    /// taken but not flushed may be gone. The owner resyncs its activity log's extents.
    ReplicaCrashed { name: String, id: u32 },
    /// The generation identifiers of this node's copy of `name` (`peer/generations.rs`); the
    /// answer is `Generations::encode`.
    Generations { name: String },
    /// The owner's resync made this node's replica of `name` (volume `id`) equal to its copy:
    /// adopt its current generation (hex) before the owner ends its bitmap.
    AdoptGeneration {
        name: String,
        id: u32,
        generation: String,
    },
}

/// The request that opens an image link: the image's name, size and digest (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRequest {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

impl ControlRequest {
    /// Encodes a request that may not fit a CONTROL payload (one carrying a record).
    pub fn try_encode(&self) -> Result<Vec<u8>, String> {
        let b = serde_json::to_vec(self).expect("a request serialises");
        if b.len() > MAX_CONTROL_BYTES {
            return Err(format!(
                "{} bytes, more than a control request's {MAX_CONTROL_BYTES}",
                b.len()
            ));
        }
        Ok(b)
    }

    /// Encodes a request that always fits (one carrying no record).
    pub fn encode(&self) -> Vec<u8> {
        self.try_encode()
            .expect("a control request without a record within the limit")
    }

    /// Decodes a request from the peer: the request, or what is wrong with it.
    pub fn decode(b: &[u8]) -> Result<ControlRequest, String> {
        serde_json::from_slice(b).map_err(|e| format!("a bad control request: {e}"))
    }
}

impl ImageRequest {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a request serialises")
    }

    pub fn decode(b: &[u8]) -> Result<ImageRequest, String> {
        serde_json::from_slice(b).map_err(|e| format!("a bad image request: {e}"))
    }
}

/// The answer to `Checksums`: one crc32c per block.
pub fn decode_checksums(b: &[u8], blocks: usize) -> Result<Vec<u32>, String> {
    let v: Vec<u32> =
        serde_json::from_slice(b).map_err(|e| format!("the peer's checksums: {e}"))?;
    if v.len() != blocks {
        return Err(format!(
            "the peer sent {} checksums for {blocks} blocks",
            v.len()
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_strangers_are_refused() {
        for r in [
            ControlRequest::CreateReplica { name: "v".into() },
            ControlRequest::Checksums {
                name: "v".into(),
                first: 3,
                blocks: 9,
            },
            ControlRequest::FenceDataLinks,
            ControlRequest::Generations { name: "v".into() },
            ControlRequest::ReplicaCrashed {
                name: "v".into(),
                id: 2,
            },
            ControlRequest::AdoptGeneration {
                name: "v".into(),
                id: 2,
                generation: "01".repeat(16),
            },
            ControlRequest::SetPersonality {
                name: "v".into(),
                id: 4,
                record: Some(r#"{"hostname":"h"}"#.into()),
            },
            ControlRequest::GrowReplica {
                name: "v".into(),
                id: 4,
                size: 1 << 30,
            },
        ] {
            assert_eq!(ControlRequest::decode(&r.encode()), Ok(r));
        }
        // A record too large for a control request is an error, not a panic.
        let big = ControlRequest::SetPersonality {
            name: "v".into(),
            id: 4,
            record: Some("x".repeat(MAX_CONTROL_BYTES)),
        };
        assert!(big.try_encode().unwrap_err().contains("more than"));
        assert!(ControlRequest::decode(br#"{"op":"format_disk"}"#).is_err());
        assert!(ControlRequest::decode(br#"{"op":"create_replica","name":"v","x":1}"#).is_err());
        assert!(decode_checksums(b"[1,2]", 3).is_err());
        assert_eq!(decode_checksums(b"[1,2]", 2), Ok(vec![1, 2]));
    }
}
