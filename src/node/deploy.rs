//! `streamer deploy PLAN` on the node (issue 22): many volumes with their personalities, all
//! checked before any is made.
//!
//! 1. **Plan.** Under the personalities' lock (held to the end, so no other change can take an
//!    address meanwhile), every server is checked against the pool and against the servers
//!    before it: its name, its image, the volume already there (same image: its personality is
//!    brought up to date; another image: refused, that is `volume redeploy`), its addresses
//!    (none twice, in the plan or among the volumes) and its pool addresses handed out. A server
//!    whose volume already has this personality is left alone, instance id and all: running a
//!    plan again changes nothing.
//! 2. **Apply**, only if every server passed (or, with `skip_bad`, the ones that did): each
//!    volume is created with its personality in one step (`Pool::create_volume_with`), or its
//!    personality replaced in one step. A crash between two leaves some servers made and the
//!    rest not; running the plan again makes the rest (the made ones keep their addresses: a
//!    volume's own pool addresses come back to it).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::personality::{Prepared, resolve, seal};
use super::{Force, Job, Node, NodeError};
use crate::personality::Personality;
use crate::personality::plan::{Server, entry_order};

/// What deploying did (or, refused or dry, would do) for one server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeployOutcome {
    /// Where the server is in the plan (`servers[2] #5`).
    pub entry: String,
    pub name: String,
    pub action: DeployAction,
    /// Its static addresses (pool addresses handed out), when its personality was resolved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeployAction {
    Create,
    /// Its volume is there with another personality: the personality is replaced.
    Update,
    /// Its volume is there with this very personality.
    Unchanged,
    /// The server is bad (the error says why); nothing was done for it.
    Refused,
    /// It was good, but making it failed (the error says why); nothing of it was published.
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeployReport {
    /// Whether anything was applied: false for a dry run, and when bad servers stopped it.
    pub applied: bool,
    pub servers: Vec<DeployOutcome>,
}

/// A server checked and ready to apply.
struct Step {
    image: Option<String>,
    size: Option<u64>,
    action: DeployAction,
    /// The new personality's record and seed (create and update).
    prepared: Option<Prepared>,
}

impl Node {
    /// Deploys a plan (its text): checks every server, then, unless `dry_run` or some are bad
    /// without `skip_bad`, applies the good ones one by one. `progress` counts servers.
    pub fn deploy(
        &self,
        plan: &str,
        skip_bad: bool,
        dry_run: bool,
        job: &Job,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<DeployReport, NodeError> {
        let plan = crate::personality::plan::parse(plan)
            .map_err(|e| NodeError::Invalid(format!("plan: {e}")))?;
        let servers = plan.servers;
        let _one_at_a_time = self.personalities.lock();
        let mut held = self.held_addresses()?;
        let pools = self.load_ip_pools()?;
        let mut steps: Vec<Result<Step, String>> = Vec::with_capacity(servers.len());
        let mut out: Vec<DeployOutcome> = Vec::with_capacity(servers.len());
        for s in &servers {
            let step = self.plan_server(s, &held, &pools);
            let mut outcome = DeployOutcome {
                entry: s.entry.clone(),
                name: s.name.clone(),
                action: DeployAction::Refused,
                addresses: vec![],
                error: None,
            };
            match &step {
                Ok((step, p)) => {
                    outcome.action = step.action;
                    outcome.addresses = p.addresses();
                    // Later servers see these addresses taken (this volume's old ones go).
                    held.retain(|(v, _)| v != &s.name);
                    held.extend(p.addresses().into_iter().map(|a| (s.name.clone(), a)));
                }
                Err(e) => outcome.error = Some(e.clone()),
            }
            out.push(outcome);
            steps.push(step.map(|(s, _)| s));
        }
        // The entries that were bad before they were servers, in the plan's order with the rest.
        let bad = steps.iter().any(Result::is_err) || !plan.bad.is_empty();
        let unmade = |b: crate::personality::plan::Bad| DeployOutcome {
            entry: b.entry,
            name: b.name.unwrap_or_default(),
            action: DeployAction::Refused,
            addresses: vec![],
            error: Some(b.error),
        };
        let sorted = |mut out: Vec<DeployOutcome>| {
            out.sort_by_key(|o| entry_order(&o.entry));
            out
        };
        if dry_run || (bad && !skip_bad) {
            out.extend(plan.bad.into_iter().map(unmade));
            return Ok(DeployReport {
                applied: false,
                servers: sorted(out),
            });
        }
        let total = steps.iter().filter(|s| s.is_ok()).count() as u64;
        let mut done = 0;
        progress(0, Some(total));
        let mut stopped: Option<String> = None;
        for ((s, step), outcome) in servers.iter().zip(steps).zip(out.iter_mut()) {
            let Ok(step) = step else { continue };
            if let Some(why) = &stopped {
                outcome.action = DeployAction::Failed;
                outcome.error = Some(format!("not made: {why}"));
                continue;
            }
            let made = job
                .check()
                .map_err(NodeError::Cancelled)
                .and_then(|()| self.apply(&s.name, step));
            if let Err(e) = made {
                outcome.action = DeployAction::Failed;
                outcome.error = Some(e.to_string());
                if !skip_bad {
                    stopped = Some(format!("deploying stopped at {}: {e}", s.name));
                }
            }
            done += 1;
            progress(done, Some(total));
        }
        out.extend(plan.bad.into_iter().map(unmade));
        Ok(DeployReport {
            applied: true,
            servers: sorted(out),
        })
    }

    /// Checks one server against the pool and the addresses `held` so far; what applying it
    /// will do, with its resolved personality.
    fn plan_server(
        &self,
        s: &Server,
        held: &[(String, IpAddr)],
        pools: &[crate::personality::ippool::IpPool],
    ) -> Result<(Step, Personality), String> {
        let name = &s.name;
        crate::names::validate_name(name).map_err(|e| format!("volume name: {e}"))?;
        if let Some(why) = self.pool.damaged_why("volume", name) {
            return Err(format!(
                "volume {name:?} is damaged ({why}); delete it or repair it first"
            ));
        }
        let resolved =
            resolve(name, (*s.personality).clone(), held, pools).map_err(|e| e.to_string())?;
        let existing = self.pool.volume(name).ok();
        let Some(e) = existing else {
            match &s.image {
                Some(i) => {
                    let img = self.pool.image(i).map_err(|e| e.to_string())?;
                    if let Some(why) = img.failed_verify {
                        return Err(format!("image {i:?} failed its last verification ({why})"));
                    }
                    let min = img.info.size.div_ceil(4096) * 4096;
                    if let Some(size) = s.size
                        && (size < min || !size.is_multiple_of(4096))
                    {
                        return Err(format!(
                            "size {size} is not a multiple of 4 KiB of at least the image's \
                             {min} bytes"
                        ));
                    }
                }
                None if s.size.is_none() => {
                    return Err("no image and no size: a blank volume needs a size".into());
                }
                None => {}
            }
            if self.exports.contains(name) {
                return Err(format!("an export named {name:?} already exists"));
            }
            let prepared = seal(resolved.clone()).map_err(|e| e.to_string())?;
            return Ok((
                Step {
                    image: s.image.clone(),
                    size: s.size,
                    action: DeployAction::Create,
                    prepared: Some(prepared),
                },
                resolved,
            ));
        };
        if e.image != s.image {
            let was = e.image.as_deref().map_or("a blank volume".into(), |i| {
                format!("a clone of image {i:?}")
            });
            return Err(match &s.image {
                Some(i) => format!(
                    "volume {name:?} exists as {was}, the plan says image {i:?}: `streamer \
                     volume redeploy {name} --image {i}` moves a server to another image"
                ),
                None => format!("volume {name:?} exists as {was}, the plan names no image"),
            });
        }
        if let Some(size) = s.size
            && size != e.size
        {
            return Err(format!(
                "volume {name:?} is {} bytes, the plan says {size}{}",
                e.size,
                if size > e.size {
                    ": `streamer volume resize` grows it"
                } else {
                    ""
                }
            ));
        }
        let mut current = self.personality_of(name);
        if let Some(c) = &mut current {
            c.instance_id.clear();
        }
        if current.as_ref() == Some(&resolved) {
            return Ok((
                Step {
                    image: s.image.clone(),
                    size: s.size,
                    action: DeployAction::Unchanged,
                    prepared: None,
                },
                resolved,
            ));
        }
        self.personality_changes_here(name)
            .map_err(|e| e.to_string())?;
        // Refused now, not halfway through the plan, if its seed inside cannot be rewritten.
        let inside = self.cidata_of_volume(name).map_err(|e| e.to_string())?;
        if let Some(why) = self.seed_rewrite_refusal(name, inside.as_deref()) {
            return Err(why);
        }
        let prepared = seal(resolved.clone()).map_err(|e| e.to_string())?;
        Ok((
            Step {
                image: s.image.clone(),
                size: s.size,
                action: DeployAction::Update,
                prepared: Some(prepared),
            },
            resolved,
        ))
    }

    /// Makes one planned server so (the caller holds the personalities' lock).
    fn apply(&self, name: &str, step: Step) -> Result<(), NodeError> {
        match step.action {
            DeployAction::Unchanged => Ok(()),
            DeployAction::Create => {
                let _busy = self.busy("volume", name)?;
                let _cloning = step.image.as_deref().map(|i| self.cloning(i)).transpose()?;
                self.can_create(name, step.image.as_deref())?;
                self.publish_volume(name, step.image.as_deref(), step.size, step.prepared)
            }
            DeployAction::Update => {
                let _busy = self.busy("volume", name)?;
                let p = step.prepared.expect("an update has a personality");
                self.store_personality(name, p)?;
                self.share_personality(name);
                Ok(())
            }
            DeployAction::Refused | DeployAction::Failed => {
                unreachable!("only good servers are applied")
            }
        }
    }
}

/// The name a redeploy with `--keep-previous` gives the old volume.
pub fn previous_name(name: &str) -> String {
    format!("{name}.previous")
}

impl Node {
    /// `volume redeploy NAME --image NEW`: the server keeps its name and personality and gets
    /// a fresh clone of another golden image (an OS update across stateless servers). Refused
    /// while clients are connected unless `force` (they are disconnected: the server is being
    /// rebooted into its new OS). The personality gets a new instance id, so first-boot tools
    /// run on the new system. With `keep_previous`, the old volume stays as `NAME.previous`
    /// (without the personality, which the server's name took along).
    pub fn redeploy_volume(
        &self,
        name: &str,
        image: &str,
        force: bool,
        keep_previous: bool,
    ) -> Result<super::info::VolumeInfo, NodeError> {
        let old = self.pool.volume(name)?;
        let _busy = self.busy("volume", name)?;
        if let Some(r) = self.pair_record(name)? {
            return Err(NodeError::Invalid(format!(
                "volume {name:?} belongs to pair {}: redeploying a pair volume is not built yet",
                r.pair
            )));
        }
        let keep = keep_previous.then(|| previous_name(name));
        if let Some(k) = &keep {
            crate::names::validate_name(k)
                .map_err(|e| NodeError::Invalid(format!("--keep-previous: {e}")))?;
        }
        let _busy_keep = keep
            .as_deref()
            .map(|k| self.busy("volume", k))
            .transpose()?;
        if let Some(k) = &keep
            && (self.pool.volume(k).is_ok() || self.exports.contains(k))
        {
            return Err(NodeError::InUse(format!(
                "volume {k:?} exists (kept by an earlier redeploy): delete it first"
            )));
        }
        let _cloning = self.cloning(image)?;
        let img = self.pool.image(image)?;
        if let Some(why) = img.failed_verify {
            return Err(NodeError::InUse(format!(
                "image {image:?} failed its last verification ({why}): no clones of it until \
                 `streamer image verify {image}` passes (or re-import it)"
            )));
        }
        // The server keeps its disk size unless the new image is larger.
        let size = old.size.max(img.info.size.div_ceil(4096) * 4096);
        let _one_at_a_time = self.personalities.lock();
        let prepared = match self.personality_of(name) {
            Some(mut p) => {
                p.instance_id.clear();
                let held = self.held_addresses()?;
                let pools = self.load_ip_pools()?;
                Some(seal(resolve(name, p, &held, &pools)?)?)
            }
            None if self.pool.personality_record(name)?.is_some() => {
                return Err(NodeError::Io(format!(
                    "volume {name:?}'s personality record cannot be read: not redeployed \
                     (the new volume would lose it)"
                )));
            }
            None => None,
        };
        self.offline_volume(name, if force { Force::Yes } else { Force::Offered })?;
        let files: Vec<(&str, &[u8])> = prepared
            .as_ref()
            .map(|p| (crate::pool::PERSONALITY_FILE, p.record.as_slice()))
            .into_iter()
            .collect();
        let mut seed = |v: &mut volume_format::Volume<volume_format::FileStorage>| match &prepared {
            Some(p) => super::personality::write_seed_into(v, &p.docs),
            None => Ok(()),
        };
        let swapped = self.pool.redeploy_volume(
            name,
            image,
            Some(size),
            &files,
            Some(&mut seed),
            keep.as_deref(),
        );
        // Served again either way: the new volume, or the old one if nothing changed.
        let served = self.serve_volume(name);
        swapped?;
        served?;
        match prepared {
            Some(p) => self.serve_docs(name, &p.docs)?,
            None => self.withdraw_seed(name),
        }
        if let Some(k) = &keep {
            self.serve_volume(k)?;
        }
        self.volume_info(name)
    }
}
