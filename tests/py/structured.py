#!/usr/bin/python3
"""Structured replies, block status, trim/zero, DF, FUA and bounds errors.

usage: /usr/bin/python3 tests/py/structured.py URI [--spec-only]

The export must be writable and at least 16 MiB; its contents are
overwritten.  Checks marked [impl] test choices the NBD spec leaves to the
server (TRIM really punching a hole that reads back as zeroes and is
reported as hole|zero, exact extent boundaries, DF/FUA being advertised)
which streamer is expected to make, as nbdkit's file plugin does.
--spec-only turns them into notes so the script can be pointed at any
compliant server.
"""

import errno

import nbd

from nbdtest import (KiB, MiB, STATE_HOLE, STATE_ZERO, block_status_once,
                     check, check_data, check_zero, connect, expect_error,
                     extents, fmt_extents, log, pattern, run, usage)

SPEC_ONLY = False


def impl(cond, msg):
    """A check of a server choice the spec allows but streamer must make."""
    if cond:
        return True
    if SPEC_ONLY:
        log("  note (not required by the spec): " + msg)
        return False
    raise AssertionError("[impl] " + msg)


def check_zero_bits_truthful(h, start, length):
    """Spec: NBD_STATE_ZERO means the range reads as zeroes."""
    for off, ln, fl in extents(h, length, start):
        if fl & STATE_ZERO:
            check_zero(h.pread(ln, off),
                       "extent [%d+%d] reported STATE_ZERO (flags=%d)" % (off, ln, fl))


def test_negotiation(h):
    log("negotiation")
    check(h.get_structured_replies_negotiated(), "structured replies not negotiated")
    check(h.can_meta_context("base:allocation"), "base:allocation not negotiated")
    check(not h.is_read_only(), "export is read-only; structured.py needs a writable export")
    check(h.can_trim(), "server does not advertise TRIM")
    check(h.can_zero(), "server does not advertise WRITE_ZEROES")
    impl(h.can_df(), "server does not advertise DF")
    impl(h.can_fua(), "server does not advertise FUA")
    impl(h.can_flush(), "server does not advertise FLUSH")
    size = h.get_size()
    check(size >= 16 * MiB, "export too small: %d bytes (need >= 16 MiB)" % size)
    return size


def test_writes(h, size):
    log("write/read patterns, 1 byte .. 1 MiB, aligned and unaligned")
    # Non-overlapping (offset, length); the first three are contiguous.
    cases = [(4096, 4096), (8192, 8192), (16384, 512),
             (0, 1), (1, 511), (32768 - 1, 2),
             (65536 + 7, 4096), (131072 - 3, 5), (200000, 65536 + 13),
             (1 * MiB, 1 * MiB), (2 * MiB + 123, 1 * MiB),
             (3 * MiB + 4000, 200), (size - 4097, 4096), (size - 1, 1)]
    spans = sorted(cases)
    for (a, al), (b, _) in zip(spans, spans[1:]):
        check(a + al <= b, "test bug: overlapping cases")
    for i, (off, ln) in enumerate(cases):
        h.pwrite(pattern(1000 + i, ln), off)
    for i, (off, ln) in enumerate(cases):
        check_data(h.pread(ln, off), pattern(1000 + i, ln),
                   "read back %d bytes @ %d" % (ln, off))
    # One read spanning three adjacent writes.
    want = pattern(1000, 4096) + pattern(1001, 8192) + pattern(1002, 512)
    check_data(h.pread(len(want), 4096), want, "read spanning adjacent writes")
    # Partial reads inside a write, unaligned both ends.
    check_data(h.pread(1000, 2 * MiB + 123 + 777), pattern(1010, 1 * MiB)[777:1777],
               "unaligned partial read")


def test_trim_and_status(h, r0):
    """r0: 1 MiB aligned start of a 4 MiB data region."""
    log("trim 1 MiB in the middle of 4 MiB of data; block status")
    data = [pattern(2000 + i, MiB) for i in range(4)]
    for i in range(4):
        h.pwrite(data[i], r0 + i * MiB)
    if h.can_flush():
        h.flush()

    ext = extents(h, 4 * MiB, r0)
    for off, ln, fl in ext:
        check(not fl & STATE_ZERO,
              "STATE_ZERO reported over non-zero data: [%d+%d] flags=%d"
              % (off, ln, fl))
    impl(all(fl == 0 for _, _, fl in ext),
         "written data should be reported as flags 0: %s" % fmt_extents(ext))

    h.trim(MiB, r0 + MiB)
    check_data(h.pread(MiB, r0), data[0], "data before trimmed range")
    check_data(h.pread(2 * MiB, r0 + 2 * MiB), data[2] + data[3],
               "data after trimmed range")
    impl(h.pread(MiB, r0 + MiB).count(0) == MiB, "trimmed range does not read as zeroes")

    ext = extents(h, MiB, r0 + MiB)
    impl(all(fl == STATE_HOLE | STATE_ZERO for _, _, fl in ext),
         "trimmed 1 MiB should be reported hole|zero (3): %s" % fmt_extents(ext))
    ext = extents(h, MiB, r0)
    impl(all(fl == 0 for _, _, fl in ext),
         "data before the trimmed range should be flags 0: %s" % fmt_extents(ext))
    check_zero_bits_truthful(h, r0, 4 * MiB)

    log("block status REQ_ONE")
    e = block_status_once(h, 3 * MiB, r0, nbd.CMD_FLAG_REQ_ONE)
    impl(e == [(MiB, 0)], "REQ_ONE over data+hole: expected [(1MiB, 0)], got %r" % e)
    e = block_status_once(h, 4096, r0 + MiB + 8192, nbd.CMD_FLAG_REQ_ONE)
    impl(e == [(4096, 3)], "REQ_ONE 4 KiB inside hole: expected [(4096, 3)], got %r" % e)
    e = block_status_once(h, 12345, r0 + 3 * MiB + 1, nbd.CMD_FLAG_REQ_ONE)
    check(not e[0][1] & STATE_ZERO, "REQ_ONE over data reported STATE_ZERO: %r" % e)
    return data


def read_df(h, count, offset):
    """pread_structured with DF; returns (data, chunk list)."""
    chunks = []

    def cb(subbuf, off, status, err):
        chunks.append((off, len(subbuf), status))
        return 0

    buf = h.pread_structured(count, offset, cb, nbd.CMD_FLAG_DF)
    return bytes(buf), chunks


def test_df(h, r0, data):
    if not h.can_df():
        log("DF: skipped (not advertised)")
        return
    log("DF reads")
    for count, off in [(65536, r0 + 4096), (1, r0 + 5), (65536, r0 + MiB - 32 * KiB)]:
        got, chunks = read_df(h, count, off)
        check(len(chunks) == 1,
              "DF read %d @ %d: expected exactly 1 content chunk, got %r"
              % (count, off, chunks))
        check(chunks[0][:2] == (off, count),
              "DF read %d @ %d: chunk does not cover the request: %r" % (count, off, chunks))
    # The last one straddles data and the trimmed range: one OFFSET_DATA chunk.
    check(chunks[0][2] == nbd.READ_DATA,
          "DF read over data+hole must be a single data chunk, got %r" % chunks)
    check_data(got[:32 * KiB], data[0][-32 * KiB:], "DF read straddling data/hole")
    got, _ = read_df(h, 65536, r0 + 4096)
    check_data(got, data[0][4096:4096 + 65536], "DF read content")
    # Larger DF reads may legitimately fail with EOVERFLOW.
    try:
        got, chunks = read_df(h, MiB, r0 + 2 * MiB)
        check(len(chunks) == 1, "DF read 1 MiB: %d content chunks" % len(chunks))
        check_data(got, data[2], "DF read 1 MiB")
    except nbd.Error as e:
        check(e.errnum == errno.EOVERFLOW,
              "DF read 1 MiB failed with %s, only EOVERFLOW allowed" % e)
        impl(False, "DF read of 1 MiB failed with EOVERFLOW")


def read_chunks(h, count, offset):
    """pread_structured without DF; returns (data, chunk list)."""
    chunks = []

    def cb(subbuf, off, status, err):
        chunks.append((off, len(subbuf), status))
        return 0

    buf = h.pread_structured(count, offset, cb)
    return bytes(buf), chunks


def test_read_chunks(h, at):
    """Spec: a server SHOULD try to minimize the number of chunks in a reply."""
    log("read chunks over scattered and long runs of written zeroes")
    page = 4 * KiB
    data = bytearray(pattern(3000, MiB))
    for p in range(0, MiB, 2 * page):
        data[p:p + page] = bytes(page)
    h.pwrite(bytes(data), at)
    got, chunks = read_chunks(h, MiB, at)
    check_data(got, bytes(data), "read over alternating data and zero pages")
    impl(len(chunks) == 1,
         "1 MiB of alternating 4 KiB data and zero pages should be one chunk, got %d"
         % len(chunks))
    data[256 * KiB:768 * KiB] = bytes(512 * KiB)
    h.pwrite(bytes(data), at)
    got, chunks = read_chunks(h, MiB, at)
    check_data(got, bytes(data), "read over a long run of zeroes")
    holes = [(o, n) for o, n, st in chunks if st == nbd.READ_HOLE]
    # Even pages are zero, so the run takes in the page after it: [256 KiB, 772 KiB).
    impl(holes == [(at + 256 * KiB, 516 * KiB)],
         "512 KiB of zeroes should be sent as one hole, got chunks %r" % chunks)


def test_zero(h, r0, data):
    log("WRITE_ZEROES with NO_HOLE on the trimmed range")
    h.zero(MiB, r0 + MiB, nbd.CMD_FLAG_NO_HOLE)
    # Block status *before* reading: on ext4, fallocate(ZERO_RANGE) leaves
    # unwritten extents that SEEK_HOLE reports as a hole until the page
    # cache holds the range, so a read first would mask the problem for
    # buffered servers.  NO_HOLE means "fully provisioned", so the HOLE bit
    # should be clear (0 or 2).  qemu-nbd 10 and nbdkit 1.32 both report 3
    # here (they use ZERO_RANGE + SEEK_HOLE), hence [impl], not spec.
    # streamer today reports what SEEK_HOLE says, like both reference servers;
    # reporting unwritten extents as allocated needs FIEMAP (noted as future
    # work).  What must hold now: the range is reported as reading zeroes.
    ext = extents(h, MiB, r0 + MiB)
    check(all(fl & STATE_ZERO for _, _, fl in ext),
          "after zero with NO_HOLE the range must report ZERO: %s" % fmt_extents(ext))
    check_zero(h.pread(MiB, r0 + MiB), "zero NO_HOLE")
    check_data(h.pread(MiB, r0), data[0], "data before zeroed range")

    log("WRITE_ZEROES without NO_HOLE")
    h.zero(MiB, r0 + 2 * MiB)
    check_zero(h.pread(MiB, r0 + 2 * MiB), "zero without NO_HOLE")
    check_data(h.pread(MiB, r0 + 3 * MiB), data[3], "data after zeroed range")

    log("unaligned WRITE_ZEROES inside data")
    model = bytearray(data[3])
    h.zero(5000, r0 + 3 * MiB + 100)
    model[100:5100] = bytes(5000)
    h.zero(4097, r0 + 3 * MiB + 300000, nbd.CMD_FLAG_NO_HOLE)
    model[300000:304097] = bytes(4097)
    h.zero(1, r0 + 3 * MiB + MiB - 1)
    model[-1] = 0
    check_data(h.pread(MiB, r0 + 3 * MiB), bytes(model), "unaligned zero")
    check_zero_bits_truthful(h, r0, 4 * MiB)

    if h.can_fast_zero():
        log("WRITE_ZEROES with FAST_ZERO")
        h.pwrite(data[1], r0 + MiB)
        try:
            h.zero(MiB, r0 + MiB, nbd.CMD_FLAG_FAST_ZERO)
            check_zero(h.pread(MiB, r0 + MiB), "fast zero")
        except nbd.Error as e:
            check(e.errnum == errno.ENOTSUP,
                  "FAST_ZERO may only fail with ENOTSUP, got %s" % e)
            impl(h.pread(MiB, r0 + MiB) == data[1],
                 "failed FAST_ZERO should not alter the data")
    else:
        log("FAST_ZERO: skipped (not advertised)")


def test_fua_flush(h, size):
    if not h.can_fua():
        log("FUA: skipped (not advertised)")
    else:
        log("FUA writes")
        # [4 MiB, 6 MiB) is unused by the other tests (r0 >= 6 MiB).
        for i, (off, ln) in enumerate([(4 * MiB, 4096), (4 * MiB + 10000, 70000),
                                       (4 * MiB + 100001, 512 * KiB)]):
            h.pwrite(pattern(3000 + i, ln), off, nbd.CMD_FLAG_FUA)
            check_data(h.pread(ln, off), pattern(3000 + i, ln), "FUA write @ %d" % off)
        h.zero(4096, 4 * MiB, nbd.CMD_FLAG_FUA)
        check_zero(h.pread(4096, 4 * MiB), "zero with FUA")
        h.trim(512 * KiB, 5 * MiB, nbd.CMD_FLAG_FUA)
    if h.can_flush():
        h.flush()


def test_bounds(size, uri):
    log("out-of-range requests")
    h = connect(uri, strict=0)  # let bad requests reach the server
    cases = [
        ("read past end", lambda: h.pread(4096, size), errno.EINVAL),
        ("read straddling end", lambda: h.pread(8192, size - 4096), errno.EINVAL),
        ("read 1 byte past end", lambda: h.pread(2, size - 1), errno.EINVAL),
        ("write past end", lambda: h.pwrite(b"x" * 4096, size), errno.ENOSPC),
        ("write straddling end", lambda: h.pwrite(b"y" * 8192, size - 4096), errno.ENOSPC),
        ("zero past end", lambda: h.zero(4096, size), errno.ENOSPC),
        ("trim past end", lambda: h.trim(4096, size), errno.EINVAL),
        ("block status past end",
         lambda: h.block_status(4096, size, lambda *a: 0), errno.EINVAL),
    ]
    for what, fn, want in cases:
        expect_error(fn, want, what)
        # The connection must survive an error reply.
        check(len(h.pread(512, 0)) == 512, "connection unusable after " + what)
    # The spec leaves a zero-length status query unspecified (only: do not disconnect); no
    # descriptor can describe zero bytes, so streamer refuses it, as qemu-nbd does.
    try:
        h.block_status(0, 4096, lambda *a: 0)
        impl(False, "a zero-length block status was answered with extents")
    except nbd.Error as e:
        impl(e.errnum == errno.EINVAL, "zero-length block status: errno %s" % e.errno)
    check(len(h.pread(512, 0)) == 512, "connection unusable after a zero-length status query")
    impl(h.pread(1, size - 1) == pattern(1013, 1),
         "last byte changed by a rejected straddling write")
    h.shutdown()


def test_block_sizes(size, uri):
    log("block sizes: a client that asked is held to the minimum")
    h = connect(uri, strict=0, block_sizes=True)  # asks, then breaks its word
    minimum = h.get_block_size(nbd.SIZE_MINIMUM)
    preferred = h.get_block_size(nbd.SIZE_PREFERRED)
    maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
    check(minimum & (minimum - 1) == 0 and 1 <= minimum <= 64 * KiB,
          "minimum block size %d is not a power of 2 up to 64 KiB" % minimum)
    check(preferred & (preferred - 1) == 0 and preferred >= max(minimum, 512),
          "preferred block size %d is not a power of 2 >= max(minimum, 512)" % preferred)
    check(maximum >= preferred, "maximum payload %d below preferred %d" % (maximum, preferred))
    base = size // 4 // MiB * MiB
    data = pattern(2029, max(4 * minimum, 16 * KiB))
    h.pwrite(data, base)
    if minimum > 1:
        bad = [
            ("read at an unaligned offset", lambda: h.pread(minimum, base + 1)),
            ("read of an unaligned length", lambda: h.pread(minimum + 1, base)),
            ("write at an unaligned offset", lambda: h.pwrite(b"\xee" * minimum, base + 1)),
            ("write of an unaligned length", lambda: h.pwrite(b"\xee" * 3, base)),
            ("trim of an unaligned length", lambda: h.trim(minimum + 1, base)),
            ("zero at an unaligned offset", lambda: h.zero(minimum, base + minimum // 2)),
            ("block status at an unaligned offset",
             lambda: h.block_status(minimum, base + 1, lambda *a: 0)),
        ]
        for what, fn in bad:
            try:
                fn()
                impl(False, what + " was served; the spec says SHOULD fail with EINVAL")
            except nbd.Error as e:
                check(e.errnum == errno.EINVAL,
                      "%s: errno %s (%s), want EINVAL" % (what, e.errno, e.string))
            check_data(h.pread(len(data), base), data, "data after refused " + what)
    else:
        log("  minimum block size is 1 here: nothing is unaligned")
    h.shutdown()

    log("block sizes: NBD_OPT_INFO tells what NBD_OPT_GO with the same requests tells")
    for ask in (False, True):
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.set_request_block_size(ask)
        h.connect_uri(uri)
        h.opt_info()
        told = [h.get_block_size(k) for k in
                (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]
        h.opt_go()
        got = [h.get_block_size(k) for k in
               (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]
        check(told == got, "asking=%s: INFO said block sizes %r, GO said %r (the spec: "
              "MUST be the same)" % (ask, told, got))
        impl(told[0] == (minimum if ask else 1),
             "asking=%s: minimum %d, want %d" % (ask, told[0], minimum if ask else 1))
        h.shutdown()

    log("block sizes: a client that did not ask may send any alignment")
    h = connect(uri)
    impl(h.get_block_size(nbd.SIZE_MINIMUM) == 1,
         "a client that did not ask for block sizes is told a minimum of %d"
         % h.get_block_size(nbd.SIZE_MINIMUM))
    check_data(h.pread(minimum + 1, base + 1), data[1:minimum + 2], "unaligned read")
    h.pwrite(b"\xdd" * 3, base + 5)
    want = data[:5] + b"\xdd" * 3 + data[8:]
    check_data(h.pread(len(data), base), want, "after an unaligned write")
    h.shutdown()


def main(argv):
    global SPEC_ONLY
    usage(argv, "[--spec-only]")
    uri = argv[0]
    SPEC_ONLY = "--spec-only" in argv[1:]
    h = connect(uri)
    size = test_negotiation(h)
    test_writes(h, size)
    r0 = (size // 2) // MiB * MiB - 2 * MiB
    data = test_trim_and_status(h, r0)
    test_df(h, r0, data)
    test_read_chunks(h, r0 + 4 * MiB)
    test_zero(h, r0, data)
    test_fua_flush(h, size)
    h.shutdown()
    test_bounds(size, uri)
    test_block_sizes(size, uri)


if __name__ == "__main__":
    run(main)
