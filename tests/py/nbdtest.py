"""Shared helpers for the NBD conformance scripts in tests/py/.

Run the scripts with /usr/bin/python3 (the only interpreter that has the
libnbd `nbd` module).  Every check raises AssertionError (never a bare
`assert`, so `python3 -O` cannot strip them); `run()` turns that into a
"FAIL: ..." line and exit status 1.
"""

import errno
import random
import sys
import time
import traceback

import nbd

KiB = 1024
MiB = 1024 * KiB

STATE_HOLE = nbd.STATE_HOLE  # 1
STATE_ZERO = nbd.STATE_ZERO  # 2
BASE_ALLOCATION = nbd.CONTEXT_BASE_ALLOCATION  # "base:allocation"


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def log(msg):
    print(msg, flush=True)


# libnbd refuses, client-side, requests that are not multiples of the server's
# advertised minimum block size.  streamer must also serve clients that ignore
# that minimum (the Linux kernel client does), so by default the checks that
# would stop such requests are switched off: the server's answer is what counts.
UNALIGNED_OK = nbd.STRICT_MASK & ~nbd.STRICT_ALIGN if hasattr(nbd, "STRICT_ALIGN") else None


def connect(uri, meta=True, strict=UNALIGNED_OK, block_sizes=False):
    """Open a handle to `uri` (nbd://host:port/NAME or nbd+unix:///NAME?socket=P).

    strict: None keeps libnbd's default client-side checks; otherwise the
    value passed to set_strict_mode (use 0 so that bad requests reach the
    server and the *server's* answer is tested).

    block_sizes: whether NBD_OPT_GO asks for NBD_INFO_BLOCK_SIZE.  A client
    that asks MUST then keep to the minimum block size, and the server refuses
    unaligned requests from it with EINVAL; by default handles do not ask, like
    clients that know nothing of block sizes, and may send any alignment."""
    h = nbd.NBD()
    h.set_handle_name("t")
    if meta:
        h.add_meta_context(BASE_ALLOCATION)
    h.set_request_block_size(block_sizes)
    h.connect_uri(uri)
    if strict is not None:
        h.set_strict_mode(strict)
    return h


def pattern(seed, n):
    """Deterministic, non-zero-heavy bytes identified by seed."""
    data = bytearray(random.Random(seed).randbytes(n))
    # Avoid all-zero buffers and make the first byte depend on the seed,
    # so that a block swapped with another is always detected.
    if n:
        data[0] = (seed % 255) + 1
    return bytes(data)


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else -1


def check_data(got, want, what):
    got = bytes(got)
    if got != want:
        i = first_diff(got, want)
        raise AssertionError(
            "%s: data mismatch (len got=%d want=%d), first difference at +%d:"
            " got %r want %r" % (what, len(got), len(want), i,
                                 got[i:i + 8], want[i:i + 8]))


def check_zero(got, what):
    got = bytes(got)
    if got.count(0) != len(got):
        i = next(i for i, b in enumerate(got) if b)
        raise AssertionError("%s: expected %d zero bytes, non-zero byte 0x%02x at +%d"
                             % (what, len(got), got[i], i))


def expect_error(fn, want_errno, what):
    """Call fn(); it must raise nbd.Error with errnum == want_errno."""
    try:
        fn()
    except nbd.Error as e:
        check(e.errnum == want_errno,
              "%s: expected %s, got errnum=%s (%s): %s"
              % (what, errno.errorcode[want_errno], e.errnum, e.errno, e.string))
        return e
    raise AssertionError("%s: succeeded, expected failure with %s"
                         % (what, errno.errorcode[want_errno]))


def block_status_once(h, count, offset, flags=0):
    """One NBD_CMD_BLOCK_STATUS; returns [(length, flags), ...] for
    base:allocation and checks the structural rules of the spec."""
    got = []
    calls = []

    def cb(metacontext, off, entries, err):
        # Never raise inside a libnbd callback: record, check afterwards.
        calls.append((metacontext, off))
        if metacontext == BASE_ALLOCATION:
            got.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(count, offset, cb, flags)
    check(all(off == offset for _, off in calls),
          "block_status(%d @ %d): callback offset differs from request: %r"
          % (count, offset, calls))
    calls = [m for m, _ in calls]
    check(calls.count(BASE_ALLOCATION) == 1,
          "block_status(%d @ %d): expected exactly one base:allocation chunk, got %r"
          % (count, offset, calls))
    check(len(got) >= 1, "block_status(%d @ %d): no extents" % (count, offset))
    for i, (ln, fl) in enumerate(got):
        check(ln > 0, "block_status(%d @ %d): extent %d has length 0"
              % (count, offset, i))
    # Sum of all but the last extent must be < requested length.
    check(sum(ln for ln, _ in got[:-1]) < count,
          "block_status(%d @ %d): extents before the last already cover the "
          "request: %r" % (count, offset, got))
    if flags & nbd.CMD_FLAG_REQ_ONE:
        check(len(got) == 1,
              "block_status REQ_ONE(%d @ %d): expected exactly 1 extent, got %d: %r"
              % (count, offset, len(got), got[:8]))
        check(got[0][0] <= count,
              "block_status REQ_ONE(%d @ %d): extent length %d exceeds request"
              % (count, offset, got[0][0]))
    return got


def extents(h, count, offset):
    """Extents covering exactly [offset, offset+count), issuing as many
    block_status commands as needed (the server may return less than
    asked).  Returns [(start, length, flags)] clipped to the range."""
    out = []
    pos, end = offset, offset + count
    while pos < end:
        for ln, fl in block_status_once(h, end - pos, pos):
            ln = min(ln, end - pos)
            out.append((pos, ln, fl))
            pos += ln
            if pos >= end:
                break
    return out


def fmt_extents(ext):
    return ", ".join("[%d+%d flags=%d]" % e for e in ext[:10]) + \
        (" ..." if len(ext) > 10 else "")


def wait_all(h, cookies, what, timeout=60.0):
    """Poll until every cookie has completed; aio_command_completed raises
    nbd.Error if the command failed on the server."""
    pending = set(cookies)
    deadline = time.monotonic() + timeout
    while pending:
        check(time.monotonic() < deadline,
              "%s: %d of %d commands still pending after %.0fs"
              % (what, len(pending), len(cookies), timeout))
        for c in list(pending):
            try:
                done = h.aio_command_completed(c)
            except nbd.Error as e:
                raise AssertionError("%s: command %d failed: %s" % (what, c, e))
            if done:
                pending.discard(c)
        if pending:
            h.poll(1000)


def run(main):
    """Run main(argv); map failures to exit status 1 with a clear message."""
    name = sys.argv[0].rsplit("/", 1)[-1]
    try:
        main(sys.argv[1:])
    except AssertionError as e:
        tb = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.endswith("nbdtest.py")]
        where = " (%s:%d)" % (tb[-1].filename.rsplit("/", 1)[-1], tb[-1].lineno) \
            if tb else ""
        print("FAIL %s%s: %s" % (name, where, e), file=sys.stderr, flush=True)
        sys.exit(1)
    except nbd.Error as e:
        traceback.print_exc()
        print("FAIL %s: unexpected nbd.Error: %s (errnum=%s)"
              % (name, e, e.errnum), file=sys.stderr, flush=True)
        sys.exit(1)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        print("FAIL %s: unexpected exception" % name, file=sys.stderr, flush=True)
        sys.exit(2)
    print("PASS %s" % name, flush=True)


def usage(argv, extra=""):
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: /usr/bin/python3 %s URI %s" % (sys.argv[0], extra),
              file=sys.stderr)
        sys.exit(2)
