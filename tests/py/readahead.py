#!/usr/bin/python3
"""Read-ahead never serves stale data (the server reads ahead of sequential
readers in direct mode).

usage: /usr/bin/python3 tests/py/readahead.py URI

A reads 1 MiB pieces in sequence, then pauses so that what the server read
ahead of it has arrived.  Meanwhile B (another connection) or A itself
changes ranges inside that window: write + flush, trim, write zeroes, a
write still in flight when A's read is sent.  Every later read by A must
see the change.  Reads then change size and jump around (the window is
dropped), many sequential reads stay in flight at once, four readers read
at once, and A disconnects with read-ahead still in flight.  The export must be writable and
>= 96 MiB; it is overwritten.
"""

import time

import nbd

from nbdtest import (KiB, MiB, check, check_data, check_zero, connect, log,
                     pattern, run, usage, wait_all)


def seq_read(h, first, count, model, what, piece=MiB):
    """Reads pieces first .. first+count-1 in order, checking each."""
    for i in range(first, first + count):
        off = i * piece
        check_data(h.pread(piece, off), bytes(model[off:off + piece]),
                   "%s: read %d @ %d" % (what, i, off))


def main(argv):
    usage(argv)
    uri = argv[0]
    a, b = connect(uri, meta=False), connect(uri, meta=False)
    size = a.get_size()
    check(size >= 96 * MiB, "export too small: %d" % size)
    span = 96 * MiB
    log("filling %d MiB" % (span // MiB))
    model = bytearray(pattern(1, span))
    for off in range(0, span, 8 * MiB):
        a.pwrite(bytes(model[off:off + 8 * MiB]), off)
    a.flush()

    # 1. Another connection writes and flushes inside A's read-ahead window.
    log("B writes + flushes inside A's read-ahead window")
    seq_read(a, 0, 4, model, "warm-up")
    time.sleep(0.3)  # the server's read-ahead (4 MiB .. ) completes and waits
    d = pattern(2, 2 * MiB + 5)
    b.pwrite(d, 6 * MiB + 3)
    b.flush()
    model[6 * MiB + 3:8 * MiB + 8] = d
    seq_read(a, 4, 8, model, "after B's write")

    # 2. Trim and write zeroes by B, both inside the window.
    log("B trims and zeroes inside A's read-ahead window")
    time.sleep(0.3)
    b.trim(MiB, 13 * MiB)
    model[13 * MiB:14 * MiB] = bytes(MiB)
    b.zero(512 * KiB, 15 * MiB + 256 * KiB)
    model[15 * MiB + 256 * KiB:15 * MiB + 768 * KiB] = bytes(512 * KiB)
    b.flush()
    seq_read(a, 12, 6, model, "after B's trim and zero")
    check_zero(a.pread(MiB, 13 * MiB), "trimmed range read by A")

    # 3. A writes inside its own window, the write still in flight when the
    #    read of that range is sent (A's reply order is the server's).
    log("A writes inside its own window, then reads it")
    time.sleep(0.3)
    d = pattern(3, MiB)
    wbuf = nbd.Buffer.from_bytearray(d)
    rbuf = nbd.Buffer(MiB)
    c1 = a.aio_pwrite(wbuf, 20 * MiB)
    wait_all(a, [c1], "A's write")
    model[20 * MiB:21 * MiB] = d
    c2 = a.aio_pread(rbuf, 18 * MiB)
    wait_all(a, [c2], "A's read")
    check_data(rbuf.to_bytearray(), bytes(model[18 * MiB:19 * MiB]), "read @ 18 MiB")
    seq_read(a, 19, 4, model, "after A's own write")

    # 4. Sizes change and the reader jumps: the window is dropped and rebuilt.
    log("reads change size and jump")
    for piece, start in [(256 * KiB, 30 * MiB), (128 * KiB, 31 * MiB + 128 * KiB),
                         (MiB, 40 * MiB), (MiB, 10 * MiB), (3 * MiB, 50 * MiB)]:
        for i in range(6):
            off = start + i * piece
            check_data(a.pread(piece, off), bytes(model[off:off + piece]),
                       "size %d: read @ %d" % (piece, off))

    # 5. Many sequential reads in flight at once, with B writing ahead of
    #    them and flushing before they are sent.
    log("32 sequential 1 MiB reads in flight, B writes ahead of them first")
    seq_read(a, 56, 2, model, "start of stream")
    time.sleep(0.3)
    d = pattern(4, 3 * MiB)
    b.pwrite(d, 60 * MiB)
    b.flush()
    model[60 * MiB:63 * MiB] = d
    bufs = [nbd.Buffer(MiB) for _ in range(32)]
    cookies = [a.aio_pread(buf, (58 + i) * MiB) for i, buf in enumerate(bufs)]
    wait_all(a, cookies, "32 reads")
    for i, buf in enumerate(bufs):
        off = (58 + i) * MiB
        check_data(buf.to_bytearray(), bytes(model[off:off + MiB]), "in-flight read @ %d" % off)

    # 6. Several sequential readers at once share the worker's read-ahead
    #    budget (--read-ahead-memory); B writes inside one reader's window.
    log("4 sequential readers at once, B writes ahead of one of them")
    readers = [connect(uri, meta=False) for _ in range(4)]
    for step in range(12):
        if step == 6:
            time.sleep(0.2)
            d = pattern(5, MiB)
            b.pwrite(d, 2 * 20 * MiB + 7 * MiB)
            model[2 * 20 * MiB + 7 * MiB:2 * 20 * MiB + 8 * MiB] = d
        for k, r in enumerate(readers):
            off = k * 20 * MiB + step * MiB
            check_data(r.pread(MiB, off), bytes(model[off:off + MiB]),
                       "reader %d: read @ %d" % (k, off))
    for r in readers:
        r.shutdown()

    # 7. Disconnect with read-ahead in flight; B (and a new client) go on.
    log("A disconnects with read-ahead in flight")
    seq_read(a, 0, 3, model, "last stream")
    a.shutdown()
    check_data(b.pread(MiB, 2 * MiB), bytes(model[2 * MiB:3 * MiB]), "B after A left")
    c = connect(uri, meta=False)
    seq_read(c, 0, 4, model, "new client")
    c.shutdown()
    b.shutdown()


if __name__ == "__main__":
    run(main)
