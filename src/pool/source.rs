//! The bytes an image import reads: a regular file is read with `O_DIRECT`, anything else
//! (a pipe, a socket, a file system that refuses `O_DIRECT`) as it comes.
//!
//! Why direct: an import reads GiBs once and never again. Through the page cache, every byte is
//! copied from the cache to the import's buffer in a system call that a kernel without
//! preemption cannot interrupt. Measured under fio 4k random I/O on 2 cores, that copy was the
//! largest single cost an import put on the data path (18% of all CPU samples). It also pushed the
//! volumes' working set out of the cache. With `O_DIRECT` the disk writes into the buffer and the
//! cache is left alone.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

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
    Plain(File),
}

/// A regular file read ahead by a thread of its own, with `O_DIRECT`.
struct Direct {
    full: Receiver<io::Result<Chunk>>,
    empty: Option<SyncSender<Chunk>>,
    current: Option<Chunk>,
    taken: usize,
    eof: bool,
    reader: Option<JoinHandle<()>>,
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
    /// Reads `file` from its start. A regular file is reopened with `O_DIRECT` (a new open file
    /// description of the same inode, so the caller's descriptor, which may be shared with the
    /// client that passed it, keeps its flags) and read ahead by a thread, which inherits the
    /// caller's scheduling class. If any of that fails, `file` is read as it is.
    pub fn new(file: File) -> ImportSource {
        let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
        if regular {
            let path = format!("/proc/self/fd/{}", file.as_raw_fd());
            if let Ok(direct) = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
            {
                let (full_tx, full) = sync_channel(DIRECT_BUFFERS);
                let (empty, empty_rx) = sync_channel(DIRECT_BUFFERS);
                for _ in 0..DIRECT_BUFFERS {
                    // Cannot fail: the receiver is alive and there is room for every buffer.
                    let _ = empty.send(Chunk::new());
                }
                let reader = std::thread::Builder::new()
                    .name("streamer-import".into())
                    .spawn(move || read_ahead(direct, empty_rx, full_tx));
                if let Ok(reader) = reader {
                    return ImportSource {
                        inner: Inner::Direct(Direct {
                            full,
                            empty: Some(empty),
                            current: None,
                            taken: 0,
                            eof: false,
                            reader: Some(reader),
                        }),
                    };
                }
            }
        }
        ImportSource {
            inner: Inner::Plain(file),
        }
    }

    pub fn is_direct(&self) -> bool {
        matches!(self.inner, Inner::Direct(_))
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
            Inner::Plain(f) => return f.read(out),
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
            let c = match d.full.recv() {
                Ok(r) => r?,
                Err(_) => return Err(io::Error::other("the import's reader thread stopped")),
            };
            d.eof = c.len < DIRECT_READ_BYTES;
            d.taken = 0;
            d.current = Some(c);
        }
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        // Closing the empty-buffer channel ends a reader waiting for a buffer. A reader never
        // blocks handing one over (the full channel has room for every buffer there is), so
        // the join waits at most for one read in progress.
        self.empty = None;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_import_given_up_early_stops_its_reader() {
        let p = std::env::temp_dir().join(format!("streamer-source-drop-{}", std::process::id()));
        std::fs::write(&p, vec![7u8; 3 * DIRECT_READ_BYTES]).unwrap();
        let mut src = ImportSource::new(File::open(&p).unwrap());
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
            let mut src = ImportSource::new(File::open(&p).unwrap());
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
