//! Golden images on both nodes of a pair (`docs/pair.md` §1): an image imported or captured on
//! either node is sent to the other (its digest checked there when it is sealed), deleted on
//! both, and each node records in etcd (`images/NAME/NODE`) which images it holds. An image the
//! peer is missing (it was down, or the send failed) is sent when the link is up again: the
//! resync thread looks every few seconds. A pair volume is made from an image both nodes hold.

use super::{Node, NodeError};
use crate::peer::control::ControlRequest;
use crate::pool::Expect;

impl Node {
    /// Image `name` is sealed here: recorded in etcd, and sent to the peer if it lacks it.
    /// The peer being away is not an error: the image goes when it is back.
    pub(super) fn share_image(&self, name: &str) {
        let Some((cluster, _)) = self.this_node() else {
            return;
        };
        let Ok(info) = self.image_info(name) else {
            return;
        };
        // Imported (or captured) here on purpose: a delete of an earlier image of that name no
        // longer applies.
        if let Err(e) = cluster.delete_image_tombstone(name) {
            tracing::warn!(image = name, "clearing the image's old delete record: {e}");
        }
        if let Err(e) = cluster.put_image_record(name, &info.sha256) {
            tracing::warn!(image = name, "recording the image in etcd: {e}");
        }
        if let Err(e) = self.send_image_if_missing(name, &info.sha256, info.size) {
            tracing::warn!(image = name, "the peer does not have the image yet: {e}");
        }
    }

    fn send_image_if_missing(&self, name: &str, sha256: &str, size: u64) -> Result<(), String> {
        let (cluster, _) = self.this_node().ok_or("not in a pair")?;
        let peer = cluster
            .peer()
            .map_err(|e| e.to_string())?
            .ok_or("no other node yet")?;
        match cluster
            .image_record(name, &peer.name)
            .map_err(|e| e.to_string())?
        {
            Some(theirs) if theirs == sha256 => return Ok(()),
            Some(theirs) => {
                return Err(format!(
                    "node {} holds another image of that name (sha256 {theirs})",
                    peer.name
                ));
            }
            None => {}
        }
        let mut src = self.pool.open_image_raw(name).map_err(|e| e.to_string())?;
        let p = self.pair.lock();
        let link = p.as_ref().and_then(|p| p.link()).ok_or("not in a pair")?;
        tracing::info!(image = name, peer = %peer.name, "sending the image to the peer");
        link.send_image(name, size, sha256, &mut src)?;
        tracing::info!(image = name, peer = %peer.name, "the peer holds the image");
        Ok(())
    }

    /// The resync thread's look (every few seconds): images this node holds that the peer
    /// lacks are sent.
    pub(super) fn share_missing_images(&self) {
        let Some((cluster, _)) = self.this_node() else {
            return;
        };
        for i in self.pool.images() {
            let Ok(info) = self.image_info(&i.name) else {
                continue;
            };
            if info.damaged.is_some() {
                continue;
            }
            // Deleted from the pair while this node was away (or while this look ran): the
            // copy here goes too, not back to the peer.
            match cluster.image_tombstone(&i.name) {
                Ok(Some(sha)) if sha == info.sha256 => {
                    if let Err(e) = self.delete_image_here(&i.name) {
                        tracing::warn!(image = %i.name, "deleted from the pair, kept here: {e}");
                    } else {
                        let _ = cluster.delete_image_record(&i.name);
                        tracing::info!(image = %i.name, "deleted here too (deleted from the pair)");
                    }
                    continue;
                }
                Ok(_) => {}
                Err(_) => continue,
            }
            if let Err(e) = self.send_image_if_missing(&i.name, &info.sha256, info.size) {
                tracing::debug!(image = %i.name, "not sent yet: {e}");
            }
        }
    }

    /// The peer sends image `request.name`: import it (raw, size and digest checked), unless
    /// this node already holds it with that digest.
    pub(super) fn receive_image(
        &self,
        request: &[u8],
        src: std::fs::File,
    ) -> Result<(), NodeError> {
        let req =
            crate::peer::control::ImageRequest::decode(request).map_err(NodeError::Invalid)?;
        let digest = hex32(&req.sha256)
            .ok_or_else(|| NodeError::Invalid(format!("{:?} is not a SHA-256", req.sha256)))?;
        if let Ok(info) = self.image_info(&req.name) {
            if info.sha256 == req.sha256 {
                // Held already (an earlier send whose answer was lost): drain and say so.
                let _ = std::io::copy(&mut &src, &mut std::io::sink());
                self.record_image(&req.name, &req.sha256);
                return Ok(());
            }
            return Err(NodeError::InUse(format!(
                "this node holds another image named {:?} (sha256 {})",
                req.name, info.sha256
            )));
        }
        let job = super::Job::detached("image from the peer");
        let expect = Expect {
            size: Some(req.size),
            sha256: Some(digest),
        };
        self.import_image_only(&req.name, src, &expect, &job)?;
        self.record_image(&req.name, &req.sha256);
        tracing::info!(image = %req.name, "image received from the peer");
        Ok(())
    }

    fn record_image(&self, name: &str, sha256: &str) {
        if let Some((cluster, _)) = self.this_node()
            && let Err(e) = cluster.put_image_record(name, sha256)
        {
            tracing::warn!(image = name, "recording the image in etcd: {e}");
        }
    }

    /// Image `name` was deleted here: the record goes, and the peer deletes its copy (it
    /// refuses while volumes there use it; that is said in the log).
    pub(super) fn unshare_image(&self, name: &str, sha256: &str) {
        let Some((cluster, _)) = self.this_node() else {
            return;
        };
        if let Err(e) = cluster.put_image_tombstone(name, sha256) {
            tracing::warn!(image = name, "recording the delete in etcd: {e}");
        }
        if let Err(e) = cluster.delete_image_record(name) {
            tracing::warn!(image = name, "removing the image's record: {e}");
        }
        let req = ControlRequest::DeleteImage { name: name.into() }.encode();
        if let Err(e) = self.peer_control_pub(&req) {
            tracing::warn!(image = name, "the peer keeps its copy: {e}");
        }
    }
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}
