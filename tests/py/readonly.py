#!/usr/bin/python3
"""Read-only export.

usage: /usr/bin/python3 tests/py/readonly.py URI

The export must be read-only (streamer --export NAME=PATH:ro) and at
least 1 MiB.  libnbd's client-side checks are disabled (strict mode 0) so
that WRITE/TRIM/WRITE_ZEROES really reach the server, which must refuse
them (spec: "MUST error", SHOULD use EPERM) and leave the data unchanged.
"""

import errno

import nbd

from nbdtest import (MiB, check, check_data, connect, expect_error, log, run,
                     usage)


def main(argv):
    usage(argv)
    uri = argv[0]
    h = connect(uri)
    check(h.is_read_only(), "export is not advertised read-only")
    size = h.get_size()
    check(size >= MiB, "export too small: %d" % size)
    log("flags: trim=%s zero=%s fua=%s flush=%s multi_conn=%s df=%s"
        % (h.can_trim(), h.can_zero(), h.can_fua(), h.can_flush(),
           h.can_multi_conn(), h.can_df()))

    log("reads")
    head = h.pread(MiB, 0)
    tail = h.pread(4096, size - 4096)
    check(len(head) == MiB and len(tail) == 4096, "short read")
    check_data(h.pread(1000, 12345), head[12345:13345], "unaligned read")
    if h.can_meta_context("base:allocation"):
        got = []
        h.block_status(MiB, 0, lambda m, o, e, err: got.append((m, e)) or 0)
        check(got, "block status returned nothing")

    log("write/trim/zero must fail with EPERM")
    h.set_strict_mode(0)  # send them anyway
    expect_error(lambda: h.pwrite(b"\xaa" * 4096, 0), errno.EPERM, "write")
    expect_error(lambda: h.pwrite(b"\xbb" * 3, 12345), errno.EPERM, "unaligned write")
    expect_error(lambda: h.pwrite(b"\xcc" * 4096, 0, nbd.CMD_FLAG_FUA), errno.EPERM,
                 "FUA write")
    expect_error(lambda: h.trim(MiB, 0), errno.EPERM, "trim")
    expect_error(lambda: h.zero(MiB, 0), errno.EPERM, "zero")
    expect_error(lambda: h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE), errno.EPERM,
                 "zero NO_HOLE")

    log("data unchanged, connection still usable")
    check_data(h.pread(MiB, 0), head, "head after refused writes")
    check_data(h.pread(4096, size - 4096), tail, "tail after refused writes")
    if h.can_flush():
        h.flush()
    h.shutdown()

    # A second connection sees the same (unchanged) data.
    h2 = connect(uri, meta=False)
    check(h2.is_read_only(), "second connection not read-only")
    check_data(h2.pread(MiB, 0), head, "head on a new connection")
    h2.shutdown()


if __name__ == "__main__":
    run(main)
