//! Volumes' personalities (issue 22): set, replaced or removed as a whole, validated, and never
//! two volumes with one address.

use super::{Node, NodeError};
use crate::personality::Personality;

impl Node {
    /// Volume `name`'s personality, if it has a readable one (a record that cannot be read is
    /// reported by `set_personality`, which is what replaces it).
    pub(super) fn personality_of(&self, name: &str) -> Option<Personality> {
        let bytes = self.pool.personality(name).ok()??;
        match serde_json::from_slice(&bytes) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(volume = name, "unreadable personality record: {e}");
                None
            }
        }
    }

    /// Gives volume `name` this personality (or none). Validated again here (the request is
    /// outside input), its addresses checked against every other volume's, and a new instance
    /// id set, so the server's first-boot tools run again; stored atomically with the volume.
    pub fn set_personality(
        &self,
        name: &str,
        personality: Option<Box<Personality>>,
    ) -> Result<super::info::VolumeInfo, NodeError> {
        let _busy = self.busy("volume", name)?;
        let _one_at_a_time = self.personalities.lock();
        self.pool.volume(name)?;
        let record = match personality {
            None => None,
            Some(mut p) => {
                p.validate()
                    .map_err(|e| NodeError::Invalid(format!("personality: {e}")))?;
                let mine = p.addresses();
                for other in self.pool.volumes() {
                    if other.name == name {
                        continue;
                    }
                    let Some(theirs) = self.personality_of(&other.name) else {
                        continue;
                    };
                    if let Some(ip) = theirs.addresses().into_iter().find(|a| mine.contains(a)) {
                        return Err(NodeError::Invalid(format!(
                            "personality: {ip} is already the address of volume {:?}",
                            other.name
                        )));
                    }
                }
                p.instance_id =
                    format!("i-{}", volume_format::image::hex(&crate::pool::random_id()));
                Some(serde_json::to_vec_pretty(&p).expect("a personality serialises"))
            }
        };
        self.pool.set_personality(name, record.as_deref())?;
        self.volume_info(name)
    }
}
