//! Running a target's plan without a ring: each I/O as a blocking system call on the calling
//! thread. The replica side of the peer link applies the owner's writes this way (one thread
//! per link, `peer/replica.rs`), through the same target code the engine drives, so a
//! replicated write is planned, copied up, mapped and committed exactly as a local one.
//!
//! I/Os of one phase run one after another (a valid order of "concurrently"); a `Wait` runs
//! after the phase's other I/Os, since what it waits for may be one of them. A linked I/O
//! after a failed one fails with `ECANCELED`, as the ring would fail it.

use std::os::fd::{BorrowedFd, RawFd};

use super::{BlockTarget, FileIo, MAX_PLAN_IOS, Plan, Progress, TargetError, TargetOp};

/// Carries out `op` on `target`; `buf` is the request buffer (a write's payload, a read's
/// destination), aligned for `O_DIRECT` when the target's files use it.
pub fn run(target: &dyn BlockTarget, op: &TargetOp, buf: &mut [u8]) -> Result<(), TargetError> {
    // A replica applies; it never sends on to a peer of its own.
    run_with_peer(target, op, buf, &mut |_, _| -libc::ENOTSUP)
}

/// As [`run`], each [`FileIo::Peer`] carried out by `peer` (the operation and the request
/// buffer; its result as the ring would give it): how the owner runs a forwarded operation
/// through its mirror on a thread of the forwarding link.
pub fn run_with_peer(
    target: &dyn BlockTarget,
    op: &TargetOp,
    buf: &mut [u8],
    peer: &mut dyn FnMut(&super::PeerIo, &[u8]) -> i32,
) -> Result<(), TargetError> {
    let mut plan = Plan::default();
    plan.begin();
    target.plan(op, &mut plan)?;
    loop {
        let n = plan.len();
        let mut results = [0i32; MAX_PLAN_IOS];
        let mut cancelled = false;
        let order = (0..n)
            .filter(|&i| !matches!(plan.get(i), Some(FileIo::Wait { .. })))
            .chain((0..n).filter(|&i| matches!(plan.get(i), Some(FileIo::Wait { .. }))));
        for i in order {
            let io = *plan.get(i).expect("within the plan");
            results[i] = match io {
                _ if cancelled => -libc::ECANCELED,
                FileIo::Peer(p) => peer(&p, buf),
                io => perform(&io, buf),
            };
            cancelled = plan.linked(i) && results[i] < 0;
        }
        match target.complete(op, &mut plan, &results[..n])? {
            Progress::Done => return Ok(()),
            Progress::Again => {}
        }
    }
}

fn errno(e: nix::Error) -> i32 {
    -(e as i32)
}

/// One I/O, whole: bytes transferred (or the poll mask of a `Wait`), or `-errno`.
pub(super) fn perform(io: &FileIo, buf: &mut [u8]) -> i32 {
    // SAFETY: the target owns its descriptors and keeps them open for as long as an operation
    // of its runs (the caller holds the target); the borrow ends with this call.
    let fd_of = |fd: RawFd| unsafe { BorrowedFd::borrow_raw(fd) };
    match *io {
        FileIo::Read {
            fd,
            offset,
            buf_start,
            len,
        } => {
            let out = &mut buf[buf_start as usize..][..len as usize];
            let mut done = 0;
            while done < out.len() {
                match nix::sys::uio::pread(
                    fd_of(fd),
                    &mut out[done..],
                    (offset + done as u64) as i64,
                ) {
                    Ok(0) => {
                        // End of file inside the range: the rest reads as zeroes.
                        out[done..].fill(0);
                        break;
                    }
                    Ok(k) => done += k,
                    Err(nix::Error::EINTR) => {}
                    Err(e) => return errno(e),
                }
            }
            len as i32
        }
        FileIo::Write {
            fd,
            offset,
            buf_start,
            len,
            dsync,
        } => {
            let data = &buf[buf_start as usize..][..len as usize];
            if let Err(e) = write_all(fd_of(fd), data, offset) {
                return e;
            }
            if dsync && let Err(e) = nix::unistd::fdatasync(fd_of(fd)) {
                return errno(e);
            }
            len as i32
        }
        FileIo::WriteZeroes { fd, offset, len } => {
            let zeroes = vec![0u8; len as usize];
            match write_all(fd_of(fd), &zeroes, offset) {
                Ok(()) => len as i32,
                Err(e) => e,
            }
        }
        FileIo::Fallocate {
            fd,
            offset,
            len,
            mode,
        } => {
            let flags = nix::fcntl::FallocateFlags::from_bits_retain(mode);
            match nix::fcntl::fallocate(fd_of(fd), flags, offset as i64, len as i64) {
                Ok(()) => 0,
                Err(e) => errno(e),
            }
        }
        FileIo::Fdatasync { fd } => match nix::unistd::fdatasync(fd_of(fd)) {
            Ok(()) => 0,
            Err(e) => errno(e),
        },
        // Advice only: the ring's fadvise is a hint too.
        FileIo::Fadvise { .. } => 0,
        FileIo::Wait { fd } => {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            let mut fds = [PollFd::new(fd_of(fd), PollFlags::POLLIN)];
            loop {
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {
                        return fds[0].revents().map_or(0, |r| i32::from(r.bits()));
                    }
                    Err(nix::Error::EINTR) => {}
                    Err(e) => return errno(e),
                }
            }
        }
        FileIo::Zero { buf_start, len } => {
            buf[buf_start as usize..][..len as usize].fill(0);
            len as i32
        }
        // A replica applies; it never sends on to a peer of its own.
        FileIo::Peer(_) => -libc::ENOTSUP,
    }
}

fn write_all(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> Result<(), i32> {
    let mut done = 0;
    while done < data.len() {
        match nix::sys::uio::pwrite(fd, &data[done..], (offset + done as u64) as i64) {
            Ok(0) => return Err(-libc::EIO),
            Ok(k) => done += k,
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(())
}
