//! Pacing of bulk commands (import, capture, verify), the way md paces a RAID resync: full speed
//! while the data path is idle, at most `--bulk-rate` bytes per second while clients do I/O.
//!
//! Why a rate on top of `SCHED_IDLE` (engine::sched): the scheduler keeps an import's CPU work
//! from preempting the data path, but not the kernel's work on its behalf (disk interrupts, the
//! block layer, writeback), which on 2 cores was still measured to halve the IOPS of fio 4k
//! random writes while a 2 GiB import ran at 400 MB/s. Pacing trades the import's speed for the
//! clients' IOPS only while there are clients to protect.

use std::time::{Duration, Instant};

/// How often the data path's request counters are sampled (and the pace's window restarted).
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Longest single sleep, so progress reports and the sampling keep going.
const MAX_SLEEP: Duration = Duration::from_millis(100);

pub(crate) struct Pacer<F: FnMut() -> u64> {
    /// Bytes per second while the data path is busy; 0: never paced.
    rate: u64,
    /// Requests the data path has served so far (a sum of counters that only grow).
    ops: F,
    last_ops: u64,
    busy: bool,
    window: Instant,
    window_bytes: u64,
    last_done: u64,
}

impl<F: FnMut() -> u64> Pacer<F> {
    pub(crate) fn new(rate: u64, mut ops: F) -> Pacer<F> {
        let last_ops = ops();
        Pacer {
            rate,
            ops,
            last_ops,
            busy: false,
            window: Instant::now(),
            window_bytes: 0,
            last_done: 0,
        }
    }

    /// Called as the command streams, with its bytes done so far; sleeps when it is ahead of the
    /// rate and the data path served any request in the last sample period. Returns the sleep.
    pub(crate) fn pace(&mut self, done: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.window_bytes += done.saturating_sub(self.last_done);
        self.last_done = done;
        if self.window.elapsed() >= SAMPLE_EVERY {
            let ops = (self.ops)();
            self.busy = ops != self.last_ops;
            self.last_ops = ops;
            self.window = Instant::now();
            self.window_bytes = 0;
        }
        if self.busy {
            let due = Duration::from_secs_f64(self.window_bytes as f64 / self.rate as f64);
            let spent = self.window.elapsed();
            if due > spent {
                let nap = (due - spent).min(MAX_SLEEP);
                std::thread::sleep(nap);
                return nap;
            }
        }
        Duration::ZERO
    }

    #[cfg(test)]
    fn busy(&self) -> bool {
        self.busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_data_path_means_no_pacing() {
        let mut p = Pacer::new(1 << 20, || 7);
        for i in 1..=100u64 {
            // 100 MiB at 1 MiB/s: paced, it would sleep at once.
            assert_eq!(p.pace(i << 20), Duration::ZERO);
        }
        assert!(!p.busy());
    }

    #[test]
    fn busy_data_path_holds_the_rate() {
        let mut n = 0u64;
        // Every sample finds new requests: busy.
        let mut p = Pacer::new(10 << 20, move || {
            n += 1;
            n
        });
        std::thread::sleep(SAMPLE_EVERY);
        p.pace(0);
        assert!(p.busy());
        let t = Instant::now();
        let mut done = 0;
        while t.elapsed() < Duration::from_millis(500) {
            done += 256 << 10;
            p.pace(done);
        }
        // 0.5 s at 10 MiB/s is 5 MiB, plus at most one piece per window of slack. (A slow
        // machine only does less, so this bound cannot fail for want of speed.)
        assert!(done <= 7 << 20, "{done} bytes in 0.5 s");
    }
}
