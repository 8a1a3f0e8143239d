//! A ring for tests: it records every submission and the test completes each one itself, in any
//! order and with any split, doing what the kernel would (copying bytes into and out of the
//! submitted memory, running file I/O with plain system calls). The connection state machine runs
//! on it exactly as on the kernel's ring, so its tests need no io_uring.
//!
//! The `Submit` contract makes the memory behind every recorded pointer valid until its
//! completion; the test completes an operation (`recv`, `sent`, `run_file`) and only then hands
//! the result to the connection, which is the moment that contract ends.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use super::{SpliceStep, Submit, UserData};
use crate::target::FileIo;

/// One recorded submission.
#[derive(Debug)]
pub(in crate::engine) enum Op {
    Recv {
        ud: UserData,
        ptr: *mut u8,
        len: u32,
    },
    Send {
        ud: UserData,
        ptr: *const u8,
        len: u32,
    },
    SendMsg {
        ud: UserData,
        msg: *const libc::msghdr,
    },
    File {
        ud: UserData,
        io: FileIo,
        buf: *mut u8,
        link: bool,
    },
}

#[derive(Default)]
pub(in crate::engine) struct FakeRing {
    pub ops: VecDeque<Op>,
}

impl Op {
    pub fn ud(&self) -> UserData {
        match *self {
            Op::Recv { ud, .. } | Op::Send { ud, .. } | Op::SendMsg { ud, .. } => ud,
            Op::File { ud, .. } => ud,
        }
    }

    /// Completes a receive with the first bytes of `data` (as many as it asked for): the result.
    pub fn recv(&self, data: &[u8]) -> i32 {
        let Op::Recv { ptr, len, .. } = *self else {
            panic!("not a receive: {self:?}")
        };
        let n = data.len().min(len as usize);
        // SAFETY: the receive's memory is valid for `len` bytes until its completion (the
        // `Submit::recv` contract), which is being produced now.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, n) };
        n as i32
    }

    /// Completes a send, taking at most `max` of its bytes: the bytes taken.
    pub fn sent(&self, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut take = |p: *const u8, len: usize| {
            let n = len.min(max - out.len());
            // SAFETY: the send's memory is valid and unmodified until its completion (the
            // `Submit::send`/`sendmsg` contract).
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(p, n) });
        };
        match *self {
            Op::Send { ptr, len, .. } => take(ptr, len as usize),
            Op::SendMsg { msg, .. } => {
                // SAFETY: as above, for the message and its iovec array.
                let msg = unsafe { &*msg };
                // SAFETY: as above.
                let iov = unsafe { std::slice::from_raw_parts(msg.msg_iov, msg.msg_iovlen) };
                for v in iov {
                    take(v.iov_base as *const u8, v.iov_len);
                }
            }
            _ => panic!("not a send: {self:?}"),
        }
        out
    }

    /// Runs a target I/O with plain system calls (`result` overrides how many bytes a read or
    /// write moves, to make it short): the completion's result.
    pub fn run_file(&self, short: Option<u32>) -> i32 {
        let Op::File { io, buf, .. } = *self else {
            panic!("not a file I/O: {self:?}")
        };
        let neg = |r: isize| {
            if r < 0 {
                -std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            } else {
                r as i32
            }
        };
        match io {
            FileIo::Read {
                fd,
                offset,
                buf_start,
                len,
            } => {
                let len = short.map_or(len, |s| s.min(len));
                // SAFETY: the read's memory is valid and unaliased until its completion.
                neg(unsafe {
                    libc::pread(
                        fd,
                        buf.add(buf_start as usize).cast(),
                        len as usize,
                        offset as i64,
                    )
                })
            }
            FileIo::Write {
                fd,
                offset,
                buf_start,
                len,
                ..
            } => {
                let len = short.map_or(len, |s| s.min(len));
                // SAFETY: the write's memory is valid until its completion.
                neg(unsafe {
                    libc::pwrite(
                        fd,
                        buf.add(buf_start as usize).cast(),
                        len as usize,
                        offset as i64,
                    )
                })
            }
            FileIo::Fdatasync { fd } => {
                // SAFETY: a plain system call on a descriptor the target keeps open.
                neg(unsafe { libc::fdatasync(fd) } as isize)
            }
            FileIo::Fallocate {
                fd,
                offset,
                len,
                mode,
            } => {
                // SAFETY: as above.
                neg(unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) } as isize)
            }
            other => panic!("the fake ring does not run {other:?}"),
        }
    }
}

impl Submit for FakeRing {
    unsafe fn recv(&mut self, ud: UserData, _fd: RawFd, ptr: *mut u8, len: u32) {
        self.ops.push_back(Op::Recv { ud, ptr, len });
    }

    unsafe fn send(&mut self, ud: UserData, _fd: RawFd, ptr: *const u8, len: u32) {
        self.ops.push_back(Op::Send { ud, ptr, len });
    }

    unsafe fn sendmsg(&mut self, ud: UserData, _fd: RawFd, msg: *const libc::msghdr) {
        self.ops.push_back(Op::SendMsg { ud, msg });
    }

    unsafe fn file_ios<'a>(
        &mut self,
        ios: impl Iterator<Item = (UserData, &'a FileIo, bool)>,
        buf: *mut u8,
    ) {
        for (ud, io, link) in ios {
            self.ops.push_back(Op::File {
                ud,
                io: *io,
                buf,
                link,
            });
        }
    }

    fn splice_payload(&mut self, _ud: [UserData; 3], _step: &SpliceStep) {
        panic!("the fake ring does not splice (its connections are Unix sockets)")
    }

    fn splice_put(&mut self, _ud: UserData, _r: RawFd, _fd: RawFd, _offset: u64, _len: u32) {
        panic!("the fake ring does not splice (its connections are Unix sockets)")
    }
}
