//! What the pure protocol layer costs per request, without sockets or disks: parsing and
//! validating request headers, encoding read replies (including the scan that turns zero runs
//! into `OFFSET_HOLE` chunks), a whole handshake, and taking and returning an I/O buffer.
//!
//! `cargo bench --bench protocol` runs it. The server end to end, beside qemu-nbd and nbdkit, is
//! `scripts/bench.sh`; these figures say how much of its CPU per I/O is this layer's.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use streamer::engine::BufPool;
use streamer::nbd::handshake::transmission_flags;
use streamer::nbd::wire::{
    CMD_FLAG_PAYLOAD_LEN, CMD_READ, CMD_WRITE, EXTENDED_REQUEST_MAGIC, IHAVEOPT, INFO_BLOCK_SIZE,
    OPT_EXTENDED_HEADERS, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REQUEST_MAGIC,
};
use streamer::nbd::{
    ExportInfo, ExportLookup, Handshake, Parse, ReplyBuilder, ReplyMode, Segment, Session, Step,
    request,
};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

fn info() -> ExportInfo {
    ExportInfo {
        name: "disk".into(),
        size_bytes: 64 << 30,
        description: String::new(),
        read_only: false,
        can_trim: true,
        can_zero: true,
        can_fast_zero: true,
        can_cache: true,
        can_multi_conn: true,
        block_min: 1,
        block_preferred: 4096,
        block_max: 32 << 20,
    }
}

struct OneExport;
impl ExportLookup for OneExport {
    type Export = ();
    fn lookup(&self, name: &str) -> Option<((), ExportInfo)> {
        (name == "disk").then(|| ((), info()))
    }
    fn for_each(&self, f: &mut dyn FnMut(&str, &str)) {
        f("disk", "")
    }
}

fn session(mode: ReplyMode) -> Session {
    Session {
        mode,
        transmission_flags: transmission_flags(&info(), mode),
        size_bytes: info().size_bytes,
        max_payload_bytes: 32 << 20,
        base_allocation: true,
        block_min: 1,
        sizes_agreed: false,
    }
}

fn compact(kind: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&7u64.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

fn extended(kind: u16, flags: u16, offset: u64, len: u64) -> Vec<u8> {
    let mut v = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&7u64.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Parses and validates every request in `stream` (as the engine does from its receive buffer).
fn decode_all(stream: &[u8], s: &Session) -> usize {
    let mut rest = stream;
    let mut n = 0;
    while let Parse::Header(h, used) = request::parse_header(rest, s.mode) {
        rest = &rest[used..];
        n += usize::from(request::decode(&h, s).is_ok_and(|r| r.outcome.is_ok()));
    }
    n
}

fn requests(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    // 64 headers back to back, as a client at depth 64 fills the receive buffer.
    let reads: Vec<u8> = (0..64u64)
        .flat_map(|i| compact(CMD_READ, i * 4096, 4096))
        .collect();
    let writes: Vec<u8> = (0..64u64)
        .flat_map(|i| extended(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, i << 20, 1 << 20))
        .collect();
    g.throughput(Throughput::Elements(64));
    let structured = session(ReplyMode::Structured);
    g.bench_function("64 compact 4k READs", |b| {
        b.iter(|| assert_eq!(decode_all(black_box(&reads), &structured), 64))
    });
    let ext = session(ReplyMode::Extended);
    g.bench_function("64 extended 1M WRITEs", |b| {
        b.iter(|| assert_eq!(decode_all(black_box(&writes), &ext), 64))
    });
    g.finish();
}

fn read_replies(c: &mut Criterion) {
    let mut g = c.benchmark_group("read reply");
    let mut header = Vec::with_capacity(4096);
    let mut segments: Vec<Segment> = Vec::with_capacity(256);
    // Data: every byte scanned for zero runs, none found. Zeroes: the whole read becomes holes.
    // Half: 4 KiB of data, 4 KiB of zeroes, alternating (the worst case for chunk count).
    let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 | 1).collect();
    let zeroes = vec![0u8; MIB];
    let half: Vec<u8> = (0..MIB)
        .map(|i| if (i / 4096) % 2 == 0 { 1 } else { 0 })
        .collect();
    for (what, buf, len, mode) in [
        ("4k data, structured", &data, 4 * KIB, ReplyMode::Structured),
        ("1M data, structured", &data, MIB, ReplyMode::Structured),
        ("1M zeroes, structured", &zeroes, MIB, ReplyMode::Structured),
        ("1M half holes, extended", &half, MIB, ReplyMode::Extended),
        ("1M data, simple", &data, MIB, ReplyMode::Simple),
    ] {
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(what, |b| {
            b.iter(|| {
                header.clear();
                segments.clear();
                let mut r = ReplyBuilder {
                    mode,
                    cookie: 7,
                    offset: 0,
                    header: &mut header,
                    segments: &mut segments,
                };
                r.read(black_box(&buf[..len]), false);
                segments.len()
            })
        });
    }
    g.finish();
}

fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn handshakes(c: &mut Criterion) {
    // What qemu sends: extended headers (falling back to structured replies), base:allocation,
    // then GO asking for block sizes.
    let mut input = 3u32.to_be_bytes().to_vec();
    input.extend(option(OPT_EXTENDED_HEADERS, &[]));
    input.extend(option(OPT_STRUCTURED_REPLY, &[]));
    let mut meta = 4u32.to_be_bytes().to_vec();
    meta.extend_from_slice(b"disk");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    input.extend(option(OPT_SET_META_CONTEXT, &meta));
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    input.extend(option(OPT_GO, &go));
    let mut out = Vec::with_capacity(4096);
    c.bench_function("handshake: extended headers, meta context, GO", |b| {
        b.iter(|| {
            out.clear();
            Handshake::greeting(&mut out);
            let mut h = Handshake::new();
            let (used, step) = h.advance(black_box(&input), &OneExport, &mut out);
            assert_eq!(used, input.len());
            assert!(matches!(step, Step::Transmission(_)));
        })
    });
}

fn buffers(c: &mut Criterion) {
    let mut g = c.benchmark_group("buffer pool");
    for len in [4 * KIB, MIB] {
        let mut pool = BufPool::new(256 << 20);
        let first = pool.get(len);
        pool.put(first);
        g.bench_function(format!("get+put {} KiB, warm", len / KIB), |b| {
            b.iter(|| {
                let buf = pool.get(black_box(len));
                pool.put(buf);
            })
        });
    }
    g.bench_function("get 1 MiB, cold (no cache)", |b| {
        b.iter_batched(
            || BufPool::new(0),
            |mut pool| pool.get(MIB),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, requests, read_replies, handshakes, buffers);
criterion_main!(benches);
