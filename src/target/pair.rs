//! A pair volume as its connections hold it (`docs/pair.md` §7-§8). This node's role for the
//! volume, the owner's [`Mirror`](super::Mirror) or the other node's
//! [`Forward`](super::Forward), changes when the volume moves (`volume move`, `volume
//! resolve`), and the clients connected here stay connected through it.
//!
//! Each operation is planned on the role of the moment and completed by that same role
//! ([`Plan::role`]), so an operation in flight when the role changes ends where it began. An
//! operation the old role refuses because the volume moved ([`TargetError::NotOwner`]: the
//! fenced mirror, or an owner that no longer owns it answering a forwarded change) has issued
//! nothing there; it is planned again, whole, on the new role. Refused by the role that is
//! still current, it fails (`EIO`).

use std::sync::Arc;

use parking_lot::RwLock;

use super::{BlockTarget, Geometry, Plan, Progress, Role, TargetError, TargetOp, VolumeTarget};

pub struct PairTarget {
    inner: Arc<VolumeTarget>,
    /// The role now, and how many times it changed (which role planned an operation is told
    /// by this count, not by comparing pointers to trait objects).
    role: RwLock<(u64, Arc<dyn BlockTarget>)>,
}

impl PairTarget {
    /// `role` wraps `inner`, the volume open on this node.
    pub fn new(inner: Arc<VolumeTarget>, role: Arc<dyn BlockTarget>) -> PairTarget {
        PairTarget {
            inner,
            role: RwLock::new((0, role)),
        }
    }

    /// From now on, operations that start (and those the old role refuses as moved) go to
    /// `role`.
    pub fn set_role(&self, role: Arc<dyn BlockTarget>) {
        let mut r = self.role.write();
        *r = (r.0 + 1, role);
    }

    fn now(&self) -> (u64, Arc<dyn BlockTarget>) {
        let r = self.role.read();
        (r.0, r.1.clone())
    }

    /// Plans `op` on the current role, or fails with `refused` if that is the one that
    /// refused it (generation `refused_by`).
    fn replan(
        &self,
        op: &TargetOp,
        plan: &mut Plan,
        refused_by: Option<u64>,
        refused: TargetError,
    ) -> Result<(), TargetError> {
        let (generation, role) = self.now();
        if Some(generation) == refused_by {
            return Err(refused);
        }
        plan.begin();
        plan.role = Some(Role {
            generation,
            target: role.clone(),
        });
        match role.plan(op, plan) {
            Err(TargetError::NotOwner(why)) if refused_by.is_none() => {
                self.replan(op, plan, Some(generation), TargetError::NotOwner(why))
            }
            r => r,
        }
    }
}

impl BlockTarget for PairTarget {
    fn geometry(&self) -> Geometry {
        self.now().1.geometry()
    }

    fn plan(&self, op: &TargetOp, plan: &mut Plan) -> Result<(), TargetError> {
        self.replan(op, plan, None, TargetError::NotOwner(String::new()))
    }

    fn complete(
        &self,
        op: &TargetOp,
        plan: &mut Plan,
        results: &[i32],
    ) -> Result<Progress, TargetError> {
        // Taken out for the call (the roles never look at it) and put back: no reference
        // count touched per completion.
        let role = plan.role.take().expect("planned by a role");
        let r = role.target.complete(op, plan, results);
        let generation = role.generation;
        plan.role = Some(role);
        match r {
            Err(TargetError::NotOwner(why)) => {
                self.replan(op, plan, Some(generation), TargetError::NotOwner(why))?;
                Ok(Progress::Again)
            }
            r => r,
        }
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
        out: &mut Vec<(u64, u32)>,
    ) -> Result<(), TargetError> {
        self.now().1.block_status(offset, len, max_extents, out)
    }

    fn sync(&self) -> Result<(), TargetError> {
        self.inner.sync()
    }

    fn attach(&self) {
        self.inner.attach()
    }

    fn detach(&self) {
        self.inner.detach()
    }

    fn revoked(&self) -> bool {
        self.inner.revoked()
    }

    // No read-ahead: on the other node the volume changes by writes the engine does not see.
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use super::*;
    use crate::pool::Pool;
    use crate::target::{Committers, FileIo};

    /// A role that plans one zero fill per operation and counts what it completed; once
    /// `moved`, it refuses new operations and those it planned before as moved.
    struct FakeRole {
        moved: AtomicBool,
        done: AtomicU32,
    }

    impl FakeRole {
        fn new() -> Arc<FakeRole> {
            Arc::new(FakeRole {
                moved: AtomicBool::new(false),
                done: AtomicU32::new(0),
            })
        }
        fn refuse(&self) -> Result<(), TargetError> {
            if self.moved.load(Ordering::Acquire) {
                return Err(TargetError::NotOwner("moved".into()));
            }
            Ok(())
        }
    }

    impl BlockTarget for FakeRole {
        fn geometry(&self) -> Geometry {
            unreachable!()
        }
        fn plan(&self, _: &TargetOp, plan: &mut Plan) -> Result<(), TargetError> {
            self.refuse()?;
            plan.push(FileIo::Zero {
                buf_start: 0,
                len: 1,
            });
            Ok(())
        }
        fn complete(&self, _: &TargetOp, _: &mut Plan, _: &[i32]) -> Result<Progress, TargetError> {
            self.refuse()?;
            self.done.fetch_add(1, Ordering::AcqRel);
            Ok(Progress::Done)
        }
        fn block_status(
            &self,
            _: u64,
            _: u64,
            _: usize,
            _: &mut Vec<(u64, u32)>,
        ) -> Result<(), TargetError> {
            Ok(())
        }
        fn sync(&self) -> Result<(), TargetError> {
            Ok(())
        }
    }

    /// An operation ends on the role that planned it, or, refused by it as moved, is planned
    /// again on the new one; refused by the current role, it fails.
    #[test]
    fn operations_follow_the_role_and_a_moved_one_is_planned_again() {
        let d = std::env::temp_dir().join(format!("streamer-pairt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let pool = Pool::open_or_create(&d, true).unwrap();
        pool.create_volume("v", None, Some(1 << 20)).unwrap();
        let committers = Committers::start(1).unwrap();
        let vol =
            Arc::new(VolumeTarget::new("v", pool.open_volume("v").unwrap(), &committers).unwrap());
        let (a, b) = (FakeRole::new(), FakeRole::new());
        let t = PairTarget::new(vol, a.clone());
        let op = TargetOp::Flush;
        let (mut p1, mut p2) = (Plan::default(), Plan::default());
        p1.begin();
        t.plan(&op, &mut p1).unwrap();
        p2.begin();
        t.plan(&op, &mut p2).unwrap();
        // The role changes with both in flight: the first still ends on a.
        t.set_role(b.clone());
        assert_eq!(t.complete(&op, &mut p1, &[1]).unwrap(), Progress::Done);
        assert_eq!(a.done.load(Ordering::Acquire), 1);
        // a refuses the second as moved: planned again on b, which ends it.
        a.moved.store(true, Ordering::Release);
        assert_eq!(t.complete(&op, &mut p2, &[1]).unwrap(), Progress::Again);
        assert_eq!(t.complete(&op, &mut p2, &[1]).unwrap(), Progress::Done);
        assert_eq!(b.done.load(Ordering::Acquire), 1);
        // Refused by the current role: it fails.
        b.moved.store(true, Ordering::Release);
        let mut p3 = Plan::default();
        p3.begin();
        assert!(matches!(
            t.plan(&op, &mut p3),
            Err(TargetError::NotOwner(_))
        ));
        drop(t);
        let _ = std::fs::remove_dir_all(&d);
    }
}
