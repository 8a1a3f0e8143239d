//! Long commands under way (image import, capture, verify, check): listed by `status` with their
//! progress, cancelled by `streamer cancel ID` or by their client going away.
//!
//! A job is checked, never interrupted: the work asks `Job::check` between pieces (the pool's
//! loops, and every read and write of a `pool::Stoppable` storage), and a cancelled job ends
//! with an error there, its staged data removed by the usual clean-up. So a cut-short import is
//! never published: the last check comes right before the rename that publishes it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use super::info::JobInfo;

/// Whether the client that asked for a job is still there to hear its answer.
pub type Liveness = Box<dyn Fn() -> bool + Send + Sync>;

pub struct Job {
    pub id: u64,
    command: String,
    uid: u32,
    started: Instant,
    done: AtomicU64,
    /// Bytes the job will handle in all, 0 when not known (a pipe).
    total: AtomicU64,
    cancelled: AtomicBool,
    why: Mutex<Option<String>>,
    alive: Option<Liveness>,
}

impl Job {
    /// A job that only `cancel` ends early (tests, internal work).
    pub fn detached(command: &str) -> Job {
        Job::new(0, command, 0, None)
    }

    fn new(id: u64, command: &str, uid: u32, alive: Option<Liveness>) -> Job {
        Job {
            id,
            command: command.to_owned(),
            uid,
            started: Instant::now(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            why: Mutex::new(None),
            alive,
        }
    }

    pub fn progress(&self, done: u64, total: Option<u64>) {
        self.done.store(done, Ordering::Relaxed);
        self.total.store(total.unwrap_or(0), Ordering::Relaxed);
    }

    /// Ends the job at its next check.
    pub fn cancel(&self, why: &str) {
        let mut w = self.why.lock();
        if w.is_none() {
            *w = Some(why.to_owned());
        }
        self.cancelled.store(true, Ordering::Release);
    }

    /// `Err(why)` once the job is cancelled, or its client is gone.
    pub fn check(&self) -> Result<(), String> {
        if !self.cancelled.load(Ordering::Acquire)
            && self.alive.as_ref().is_some_and(|alive| !alive())
        {
            self.cancel("its client went away (disconnected or interrupted)");
        }
        if self.cancelled.load(Ordering::Acquire) {
            let why = self.why.lock().clone().unwrap_or_default();
            return Err(format!("{} cancelled: {why}", self.command));
        }
        Ok(())
    }

    /// Why the job was cancelled, if it was.
    pub fn cancelled(&self) -> Option<String> {
        self.check().err()
    }

    fn info(&self) -> JobInfo {
        let total = self.total.load(Ordering::Relaxed);
        JobInfo {
            id: self.id,
            command: self.command.clone(),
            uid: self.uid,
            seconds: self.started.elapsed().as_secs(),
            done_bytes: self.done.load(Ordering::Relaxed),
            total_bytes: (total > 0).then_some(total),
        }
    }
}

/// Why a cancel was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    NoSuchJob,
    /// Another user's job (an admin-group member may not end root's import).
    NotYours {
        owner: u32,
    },
}

/// The jobs of a node.
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    running: Mutex<BTreeMap<u64, Arc<Job>>>,
    /// Why every job is cancelled, once the node is stopping (a command read just before the
    /// stop starts its job after `cancel_all`: it is cancelled from birth).
    stopping: Mutex<Option<String>>,
}

/// Removes its job from the list when the command ends, however it ends.
pub struct JobGuard<'a> {
    jobs: &'a Jobs,
    pub job: Arc<Job>,
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        self.jobs.running.lock().remove(&self.job.id);
    }
}

impl Jobs {
    pub fn start(&self, command: &str, uid: u32, alive: Option<Liveness>) -> JobGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job::new(id, command, uid, alive));
        let mut running = self.running.lock();
        if let Some(why) = self.stopping.lock().as_deref() {
            job.cancel(why);
        }
        running.insert(id, job.clone());
        drop(running);
        JobGuard { jobs: self, job }
    }

    pub fn list(&self) -> Vec<JobInfo> {
        self.running.lock().values().map(|j| j.info()).collect()
    }

    /// Cancels every job (the node is stopping) and waits up to `wait` for them to end, so
    /// their clients hear why and nothing half-made is left staged.
    pub fn cancel_all(&self, why: &str, wait: std::time::Duration) {
        {
            let running = self.running.lock();
            *self.stopping.lock() = Some(why.to_owned());
            for j in running.values() {
                j.cancel(why);
            }
        }
        let deadline = Instant::now() + wait;
        while !self.running.lock().is_empty() && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Cancels job `id` for `by_uid`: the user who started it, root, or the node's own user.
    pub fn cancel(&self, id: u64, by_uid: u32) -> Result<JobInfo, Refused> {
        let job = self
            .running
            .lock()
            .get(&id)
            .cloned()
            .ok_or(Refused::NoSuchJob)?;
        let node_user = rustix::process::geteuid().as_raw();
        if by_uid != 0 && by_uid != job.uid && by_uid != node_user {
            return Err(Refused::NotYours { owner: job.uid });
        }
        job.cancel(&format!("cancelled by uid {by_uid}"));
        Ok(job.info())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_ends_when_cancelled_or_when_its_client_goes() {
        let jobs = Jobs::default();
        let g = jobs.start("image import x", 1000, None);
        g.job.progress(10, Some(100));
        assert!(g.job.check().is_ok());
        assert_eq!(jobs.list()[0].done_bytes, 10);
        assert_eq!(jobs.cancel(99, 0).unwrap_err(), Refused::NoSuchJob);
        assert_eq!(
            jobs.cancel(g.job.id, 4242).unwrap_err(),
            Refused::NotYours { owner: 1000 }
        );
        jobs.cancel(g.job.id, 0).unwrap();
        assert!(g.job.check().unwrap_err().contains("cancelled by uid 0"));
        drop(g);
        assert!(jobs.list().is_empty());

        let gone = Arc::new(AtomicBool::new(false));
        let g = jobs.start(
            "image import y",
            0,
            Some(Box::new({
                let gone = gone.clone();
                move || !gone.load(Ordering::Relaxed)
            })),
        );
        assert!(g.job.check().is_ok());
        gone.store(true, Ordering::Relaxed);
        assert!(g.job.check().unwrap_err().contains("client went away"));
    }
}
