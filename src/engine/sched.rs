//! CPU scheduling of work that must not compete with the data path.
//!
//! Bulk management work (import, capture, verify, check) streams whole images through the CPU.
//! On a busy node it should use only the cycles the rings leave idle. `nice 19` is not enough:
//! measured on 2 cores under fio 4k random writes, a nice-19 import still took a whole core and
//! cut the writes' IOPS to a third, because a woken data-path thread waited for the importer's
//! time slice. A `SCHED_IDLE` thread is preempted as soon as any normal thread wants its core;
//! under the same load the writes kept about 90% of their IOPS.

/// Puts the calling thread, and whatever it forks later (a `qemu-img convert`), in `SCHED_IDLE`;
/// falls back to nice 19 if the kernel refuses. Only for threads that do nothing else afterwards:
/// there is no way back short of privileges.
pub fn background_thread() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; `param` is a valid sched_param that lives on this
    // stack frame for the whole call and is only read by the kernel. No memory is handed over.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc == 0 {
        return;
    }
    let why = std::io::Error::last_os_error();
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), 19) {
        tracing::debug!("could not lower a background thread's priority: {why}; {e}");
    }
}
