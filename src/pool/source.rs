//! The bytes an image import reads: a regular file is read with `O_DIRECT`, anything else
//! (a pipe, a socket, a file system that refuses `O_DIRECT`) as it comes.
//!
//! Why direct: an import reads GiBs once and never again. Through the page cache, every byte is
//! copied from the cache to the import's buffer in a system call that a kernel without
//! preemption cannot interrupt. Measured under fio 4k random I/O on 2 cores, that copy was the
//! largest single cost an import put on the data path (18% of all CPU samples). It also pushed the
//! volumes' working set out of the cache. With `O_DIRECT` the disk writes into the buffer and the
//! cache is left alone.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// `O_DIRECT` alignment that every Linux block device and file system accepts.
const DIRECT_ALIGN: usize = 4096;

/// Size of one direct read. Large, unlike the buffered pieces (`STREAM_IO_BYTES`): the disk
/// writes straight into the buffer, so there is no copy to hold the CPU.
const DIRECT_READ_BYTES: usize = 4 << 20;

/// Buffers in flight between the reader thread and the import: one being read from the disk
/// while the other is hashed and written, so that without the page cache's readahead the disk
/// still never waits for the CPU.
const DIRECT_BUFFERS: usize = 2;

pub struct ImportSource {
    inner: Inner,
}

enum Inner {
    Direct(Direct),
    /// A pipe, a socket, or a file that refused `O_DIRECT`, with the longest wait for bytes.
    Plain(File, Duration),
}

/// A regular file read ahead by a thread of its own, with `O_DIRECT`.
struct Direct {
    full: Receiver<io::Result<Chunk>>,
    empty: Option<SyncSender<Chunk>>,
    current: Option<Chunk>,
    taken: usize,
    eof: bool,
    reader: Option<JoinHandle<()>>,
    /// Longest wait for the reader thread's next buffer.
    idle: Duration,
    /// The reader thread did not deliver within `idle` (a hung mount): it is left to finish its
    /// read on its own rather than joined.
    stuck: bool,
}

/// An aligned buffer and how much of it holds file bytes.
struct Chunk {
    buf: Vec<u8>,
    at: usize,
    len: usize,
}

impl Chunk {
    fn new() -> Chunk {
        // Over-allocate and start at an aligned offset: aligned memory without unsafe.
        let buf = vec![0u8; DIRECT_READ_BYTES + DIRECT_ALIGN];
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        Chunk { buf, at, len: 0 }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..self.at + self.len]
    }
}

impl ImportSource {
    /// Reads `file`, the descriptor a client passed, from its start; nothing else is opened.
    ///
    /// The descriptor must be open for reading: one opened with `O_PATH` (which needs no read
    /// permission at all) or write-only is refused, since reading it anyway (or reopening its
    /// inode, as `/proc/self/fd/N` would) reads with the node's permissions what the client
    /// could not. A regular file gets `O_DIRECT` on this open file description (the client
    /// opened it for this import and only waits for the answer) and is read ahead by a thread,
    /// which inherits the caller's scheduling class; where that fails it is read as it is. A
    /// pipe or socket that sends nothing for `idle` ends the import with `TimedOut`.
    pub fn new(file: File, idle: Duration) -> io::Result<ImportSource> {
        let flags = fcntl_getfl(&file)?;
        if flags & libc::O_PATH != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the import's file descriptor was opened with O_PATH, which grants no right to \
                 read it; pass a descriptor opened for reading",
            ));
        }
        if flags & libc::O_ACCMODE == libc::O_WRONLY {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the import's file descriptor is open for writing only; pass a descriptor \
                 opened for reading",
            ));
        }
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the import's file descriptor is a directory",
            ));
        }
        if meta.is_file()
            && fcntl_setfl(&file, flags | libc::O_DIRECT).is_ok()
            && let Some(direct) = Direct::start(file.try_clone()?, idle)
        {
            return Ok(ImportSource {
                inner: Inner::Direct(direct),
            });
        }
        // Back to the flags it came with (O_DIRECT may have been set before the thread failed).
        let _ = fcntl_setfl(&file, flags);
        Ok(ImportSource {
            inner: Inner::Plain(file, idle),
        })
    }

    pub fn is_direct(&self) -> bool {
        matches!(self.inner, Inner::Direct(_))
    }
}

fn fcntl_getfl(f: &File) -> io::Result<i32> {
    Ok(nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_GETFL)?)
}

fn fcntl_setfl(f: &File, flags: i32) -> io::Result<()> {
    let flags = nix::fcntl::OFlag::from_bits_retain(flags);
    nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

impl Direct {
    /// Starts the reader thread over `file` (already `O_DIRECT`).
    fn start(file: File, idle: Duration) -> Option<Direct> {
        let (full_tx, full) = sync_channel(DIRECT_BUFFERS);
        let (empty, empty_rx) = sync_channel(DIRECT_BUFFERS);
        for _ in 0..DIRECT_BUFFERS {
            // Cannot fail: the receiver is alive and there is room for every buffer.
            let _ = empty.send(Chunk::new());
        }
        let reader = std::thread::Builder::new()
            .name("streamer-import".into())
            .spawn(move || read_ahead(file, empty_rx, full_tx))
            .ok()?;
        Some(Direct {
            full,
            empty: Some(empty),
            current: None,
            taken: 0,
            eof: false,
            reader: Some(reader),
            idle,
            stuck: false,
        })
    }
}

/// The reader thread: fills empty buffers in file order until a short read (the end) or an
/// error, and stops early when the import goes away.
fn read_ahead(file: File, empty: Receiver<Chunk>, full: SyncSender<io::Result<Chunk>>) {
    let mut pos = 0u64;
    while let Ok(mut chunk) = empty.recv() {
        let at = chunk.at;
        let res = loop {
            match file.read_at(&mut chunk.buf[at..at + DIRECT_READ_BYTES], pos) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r,
            }
        };
        match res {
            Ok(n) => {
                chunk.len = n;
                pos += n as u64;
                // A short read of a regular file is its end: reading on from an unaligned
                // offset would fail with EINVAL.
                let end = n < DIRECT_READ_BYTES;
                if full.send(Ok(chunk)).is_err() || end {
                    return;
                }
            }
            Err(e) => {
                let _ = full.send(Err(e));
                return;
            }
        }
    }
}

impl Read for ImportSource {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let d = match &mut self.inner {
            Inner::Plain(f, idle) => return read_within(f, out, *idle),
            Inner::Direct(d) => d,
        };
        loop {
            if let Some(c) = &d.current
                && d.taken < c.len
            {
                let n = (c.len - d.taken).min(out.len());
                out[..n].copy_from_slice(&c.bytes()[d.taken..d.taken + n]);
                d.taken += n;
                return Ok(n);
            }
            if d.eof {
                return Ok(0);
            }
            // The current buffer is used up: hand it back and take the next one.
            if let (Some(c), Some(empty)) = (d.current.take(), &d.empty) {
                let _ = empty.send(c);
            }
            let c = match d.full.recv_timeout(d.idle) {
                Ok(r) => r?,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    d.stuck = true;
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the source file gave nothing for {}s", d.idle.as_secs()),
                    ));
                }
                Err(_) => return Err(io::Error::other("the import's reader thread stopped")),
            };
            d.eof = c.len < DIRECT_READ_BYTES;
            d.taken = 0;
            d.current = Some(c);
        }
    }
}

/// Reads `f` once it has bytes (or its end), waiting at most `idle`: a client that opened a
/// pipe and then sends nothing must not hold a management slot and a staging file forever.
fn read_within(f: &mut File, out: &mut [u8], idle: Duration) -> io::Result<usize> {
    let deadline = Instant::now() + idle;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as u32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) if left.is_zero() => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the source sent nothing for {}s", idle.as_secs()),
                ));
            }
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => return f.read(out),
            Err(e) => return Err(e.into()),
        }
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        // Closing the empty-buffer channel ends a reader waiting for a buffer. A reader never
        // blocks handing one over (the full channel has room for every buffer there is), so
        // the join waits at most for one read in progress.
        self.empty = None;
        if let Some(r) = self.reader.take()
            && !self.stuck
        {
            let _ = r.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(5);

    #[test]
    fn an_import_given_up_early_stops_its_reader() {
        let p = std::env::temp_dir().join(format!("streamer-source-drop-{}", std::process::id()));
        std::fs::write(&p, vec![7u8; 3 * DIRECT_READ_BYTES]).unwrap();
        let mut src = ImportSource::new(File::open(&p).unwrap(), IDLE).unwrap();
        let mut piece = [0u8; 10];
        assert_eq!(src.read(&mut piece).unwrap(), 10);
        drop(src); // joins the reader: the test would hang if it did not stop
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn reads_a_file_whole_in_any_pieces() {
        let dir = std::env::temp_dir().join(format!("streamer-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for size in [
            0usize,
            1,
            4095,
            4096,
            DIRECT_READ_BYTES,
            3 * DIRECT_READ_BYTES + 777,
        ] {
            let p = dir.join(format!("f{size}"));
            let bytes: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
            std::fs::write(&p, &bytes).unwrap();
            let mut src = ImportSource::new(File::open(&p).unwrap(), IDLE).unwrap();
            let mut back = Vec::new();
            let mut piece = vec![0u8; 50_000];
            loop {
                let n = src.read(&mut piece).unwrap();
                if n == 0 {
                    break;
                }
                back.extend_from_slice(&piece[..n]);
            }
            assert_eq!(back, bytes, "size {size}, direct {}", src.is_direct());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod refusals {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    /// An O_PATH descriptor needs no read permission: reading through it (or reopening it)
    /// with the node's rights read /etc/shadow for an admin-group user.
    #[test]
    fn o_path_and_write_only_descriptors_are_refused() {
        let p = std::env::temp_dir().join(format!("streamer-source-path-{}", std::process::id()));
        std::fs::write(&p, b"secret").unwrap();
        let path_only = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&p)
            .unwrap();
        let e = ImportSource::new(path_only, Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(e.to_string().contains("O_PATH"), "{e}");
        let write_only = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let e = ImportSource::new(write_only, Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(e.to_string().contains("writing only"), "{e}");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_pipe_that_sends_nothing_times_out() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut src = ImportSource::new(File::from(r), Duration::from_millis(200)).unwrap();
        let t = Instant::now();
        let e = src.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(200));
        drop(w);
    }
}
