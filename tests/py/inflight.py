#!/usr/bin/python3
"""Many requests in flight on one connection.

usage: /usr/bin/python3 tests/py/inflight.py URI [--count N]   (default 256)

1. N aio_pwrite of distinct 4 KiB blocks with distinct patterns, all issued
   before polling; then N concurrent aio_pread, each verified.
2. Mixed: N/2 reads of blocks from step 1 interleaved with N/2 writes of
   new blocks (sizes 512 B .. 128 KiB, some unaligned), all in flight.
3. Unaligned writes to disjoint byte ranges *inside the same 4 KiB
   blocks*, all in flight at once: every one must land (catches racy
   read-modify-write in servers using O_DIRECT).
4. Runs of large writes (1 MiB, 2 MiB + 5, 256 KiB + 3, some FUA) back to
   back with small writes, flushes and reads between them, all in flight:
   the server receives large payloads straight into their buffers, or
   splices them from the socket into the file (buffered, over TCP, in
   steps when larger than its pipe), and must find every request header
   after them.
The export must be writable and >= 64 MiB; it is overwritten.
"""

import nbd

from nbdtest import (KiB, MiB, check, check_data, connect, log, pattern, run,
                     usage, wait_all)


def submit_reads(h, reqs):
    """reqs: [(offset, length)] -> (buffers, cookies)"""
    bufs = [nbd.Buffer(ln) for _, ln in reqs]
    cookies = [h.aio_pread(b, off) for b, (off, _) in zip(bufs, reqs)]
    return bufs, cookies


def read_back(h, writes, seed, what):
    """Reads back writes [(offset, length)] whose data was pattern(seed + i)."""
    rbufs, cookies = submit_reads(h, writes)
    wait_all(h, cookies, "read back " + what)
    for i, b in enumerate(rbufs):
        check_data(b.to_bytearray(), pattern(seed + i, writes[i][1]),
                   "%s: write %d (%d bytes @ %d)" % (what, i, writes[i][1], writes[i][0]))


def main(argv):
    usage(argv, "[--count N]")
    uri = argv[0]
    n = int(argv[argv.index("--count") + 1]) if "--count" in argv else 256
    h = connect(uri, meta=False)
    check(not h.is_read_only(), "export is read-only")
    size = h.get_size()
    check(size >= 64 * MiB, "export too small: %d (need >= 64 MiB)" % size)

    # Step 1: N distinct 4 KiB blocks, spread out and in shuffled order.
    base1 = 16 * MiB
    blocks = [base1 + ((i * 37) % n) * 8192 for i in range(n)]
    log("%d aio_pwrite of 4 KiB in flight" % n)
    wbufs = [nbd.Buffer.from_bytearray(pattern(10000 + i, 4096)) for i in range(n)]
    cookies = [h.aio_pwrite(b, off) for b, off in zip(wbufs, blocks)]
    wait_all(h, cookies, "%d writes" % n)

    log("%d aio_pread of 4 KiB in flight" % n)
    rbufs, cookies = submit_reads(h, [(off, 4096) for off in blocks])
    wait_all(h, cookies, "%d reads" % n)
    for i, (b, off) in enumerate(zip(rbufs, blocks)):
        check_data(b.to_bytearray(), pattern(10000 + i, 4096),
                   "concurrent read of block %d @ %d" % (i, off))

    # Step 2: mixed reads (of step-1 blocks) and writes (elsewhere).
    log("mixed: %d reads + %d writes in flight" % (n // 2, n // 2))
    base2 = 32 * MiB
    sizes = [512, 4096, 4096 + 1, 65536, 131072, 3, 8192 - 5]
    writes, off = [], base2
    for i in range(n // 2):
        ln = sizes[i % len(sizes)]
        off += 17 if i % 3 == 0 else 0  # some unaligned offsets
        writes.append((off, ln))
        off += ln + 4096
    check(off < size, "export too small for mixed test")
    wb = [nbd.Buffer.from_bytearray(pattern(20000 + i, ln)) for i, (_, ln) in enumerate(writes)]
    rb = [nbd.Buffer(4096) for _ in range(n // 2)]
    cookies = []
    for i in range(n // 2):
        cookies.append(h.aio_pwrite(wb[i], writes[i][0]))
        cookies.append(h.aio_pread(rb[i], blocks[i]))
    wait_all(h, cookies, "mixed")
    for i in range(n // 2):
        check_data(rb[i].to_bytearray(), pattern(10000 + i, 4096),
                   "mixed: read of block %d" % i)
    read_back(h, writes, 20000, "mixed writes")

    # Step 3: disjoint sub-block writes into the same blocks, concurrently.
    log("%d disjoint unaligned writes sharing 4 KiB blocks in flight" % n)
    base3 = 48 * MiB
    nblk = 8
    h.pwrite(pattern(30000, nblk * 4096), base3)
    model = bytearray(pattern(30000, nblk * 4096))
    piece = nblk * 4096 // n  # n pieces tile the nblk blocks
    check(piece >= 1, "--count too large for the sub-block test")
    reqs = []
    for i in range(n):
        j = (i * 7) % n  # shuffle submission order
        off, ln = j * piece + 1, piece - 2  # leave 1-byte gaps: unaligned
        if ln <= 0:
            continue
        reqs.append((off, pattern(40000 + j, ln)))
        model[off:off + ln] = pattern(40000 + j, ln)
    bufs = [nbd.Buffer.from_bytearray(d) for _, d in reqs]
    cookies = [h.aio_pwrite(b, base3 + off) for b, (off, _) in zip(bufs, reqs)]
    wait_all(h, cookies, "sub-block writes")
    check_data(h.pread(len(model), base3), bytes(model),
               "disjoint sub-block writes in flight together (lost update?)")
    # Step 4: large payloads in runs, with small requests between them.
    log("runs of large writes with small requests between, in flight")
    base4 = 49 * MiB  # after step 3 (48 MiB + 32 KiB); ends near 62 MiB
    plan, off = [], base4
    for i in range(18):
        ln = [MiB, 2 * MiB + 5, 256 * KiB + 3, 4096, MiB, 7][i % 6]
        plan.append((off, ln))
        off += ln + 512
    check(off < size, "export too small for the large-write test")
    bufs = [nbd.Buffer.from_bytearray(pattern(50000 + i, ln)) for i, (_, ln) in enumerate(plan)]
    cookies, small = [], []
    for i, (b, (o, _)) in enumerate(zip(bufs, plan)):
        fua = nbd.CMD_FLAG_FUA if i % 3 == 1 and h.can_fua() else 0
        cookies.append(h.aio_pwrite(b, o, flags=fua))
        if i % 5 == 4 and h.can_flush():
            cookies.append(h.aio_flush())
        if i % 4 == 3:
            small.append((i, nbd.Buffer(4096)))
            cookies.append(h.aio_pread(small[-1][1], blocks[i]))
    wait_all(h, cookies, "large-write runs")
    for i, b in small:
        check_data(b.to_bytearray(), pattern(10000 + i, 4096),
                   "large-write runs: read of block %d between them" % i)
    read_back(h, plan, 50000, "large-write runs")
    if h.can_flush():
        h.flush()
    h.shutdown()


if __name__ == "__main__":
    run(main)
