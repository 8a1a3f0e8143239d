#!/usr/bin/python3
"""Multi-connection consistency (NBD_FLAG_CAN_MULTI_CONN).

usage: /usr/bin/python3 tests/py/multiconn.py URI

Spec: with CAN_MULTI_CONN, the effects of FLUSH and FUA must be visible on
all connections when the server replies to that command; a client issues
the flush only after the writes it covers have completed (on any
connection).  The export must be writable, >= 16 MiB; it is overwritten.
"""

import nbd

from nbdtest import (KiB, MiB, check, check_data, check_zero, connect, log,
                     pattern, run, usage, wait_all)


def main(argv):
    usage(argv)
    uri = argv[0]
    h1, h2 = connect(uri, meta=False), connect(uri, meta=False)
    for i, h in enumerate((h1, h2), 1):
        check(h.can_multi_conn(), "handle %d: server does not advertise CAN_MULTI_CONN" % i)
        check(h.can_flush(), "handle %d: server does not advertise FLUSH" % i)
        check(not h.is_read_only(), "export is read-only")
    size = h1.get_size()
    check(size == h2.get_size(), "handles disagree on size")
    check(size >= 16 * MiB, "export too small: %d" % size)
    base = 8 * MiB

    log("write + flush on A, read on B")
    for i, (off, ln) in enumerate([(base, 4096), (base + 5000, 3), (base + 65536, MiB)]):
        d = pattern(100 + i, ln)
        h1.pwrite(d, off)
        h1.flush()
        check_data(h2.pread(ln, off), d, "B reads A's write+flush @ %d" % off)

    log("write on A, flush on B, read on B and A")
    for i, (off, ln) in enumerate([(base, 4096), (base + 5000, 3), (base + 65536, MiB)]):
        d = pattern(200 + i, ln)
        h1.pwrite(d, off)
        h2.flush()
        check_data(h2.pread(ln, off), d, "B reads A's write after flush on B @ %d" % off)
        check_data(h1.pread(ln, off), d, "A reads its own write @ %d" % off)

    log("write on B, flush on A, read on A")
    d = pattern(300, 128 * KiB)
    h2.pwrite(d, base + 3 * MiB + 1)
    h1.flush()
    check_data(h1.pread(len(d), base + 3 * MiB + 1), d, "A reads B's write after flush on A")

    if h1.can_fua():
        log("FUA write on A, read on B (no flush)")
        d = pattern(400, 64 * KiB)
        h1.pwrite(d, base + 4 * MiB, nbd.CMD_FLAG_FUA)
        check_data(h2.pread(len(d), base + 4 * MiB), d, "B reads A's FUA write")
    else:
        log("FUA: skipped (not advertised)")

    if h1.can_zero():
        log("zero on A, flush on B, read on B")
        h1.zero(32 * KiB, base + 4 * MiB + 4096)
        h2.flush()
        check_zero(h2.pread(32 * KiB, base + 4 * MiB + 4096), "B reads A's zeroes")

    log("64 concurrent writes on A (aio), flush on B, read on B")
    blocks = [(base + 5 * MiB + i * 12288 + (i % 7), 4096 + i) for i in range(64)]
    bufs = [nbd.Buffer.from_bytearray(pattern(500 + i, ln)) for i, (_, ln) in enumerate(blocks)]
    cookies = [h1.aio_pwrite(b, off) for b, (off, _) in zip(bufs, blocks)]
    wait_all(h1, cookies, "aio writes on A")
    h2.flush()
    for i, (off, ln) in enumerate(blocks):
        check_data(h2.pread(ln, off), pattern(500 + i, ln), "B reads aio write %d" % i)

    log("interleaved: alternate writer per block, one flush, cross reads")
    for rnd in range(3):
        offs = [base + 6 * MiB + j * 4096 for j in range(32)]
        for j, off in enumerate(offs):
            (h1 if j % 2 else h2).pwrite(pattern(1000 * rnd + j, 4096), off)
        (h1 if rnd % 2 else h2).flush()
        for j, off in enumerate(offs):
            reader = h2 if j % 2 else h1
            check_data(reader.pread(4096, off), pattern(1000 * rnd + j, 4096),
                       "round %d block %d read on the other handle" % (rnd, j))

    h1.shutdown()
    h2.shutdown()


if __name__ == "__main__":
    run(main)
