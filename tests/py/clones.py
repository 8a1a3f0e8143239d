"""Writes to / verifies many thin clones of one golden image through libnbd.

usage: clones.py write|verify URI_PREFIX COUNT GOLDEN_RAW

Clone i gets, at a per-clone offset, 3 blocks of its own pattern plus an unaligned 1000-byte
write straddling a block boundary; everything else must read as the golden image.
"""
import sys

import nbd

mode, prefix, count, golden_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
golden = open(golden_path, "rb").read()
size = len(golden)


def spots(i):
    """(offset, bytes) written to clone i."""
    base = (i * 7 * 4096) % (size - 64 * 1024)
    own = bytes([(i * 13 + 1) % 251 + 1]) * (3 * 4096)
    tail = base + 5 * 4096 - 500
    text = (b"clone-%05d|" % i) * 100
    return [(base, own), (tail, text[:1000])]


def expected(i):
    img = bytearray(golden)
    for off, data in spots(i):
        img[off:off + len(data)] = data
    return img


for i in range(count):
    h = nbd.NBD()
    h.connect_uri(f"{prefix}{i:03d}")
    assert h.get_size() == size, (i, h.get_size())
    if mode == "write":
        for off, data in spots(i):
            h.pwrite(data, off)
        h.flush()
    exp = expected(i)
    # The written regions and their neighbourhood, plus samples across the whole disk.
    for off, data in spots(i):
        lo = max(0, off - 8192)
        hi = min(size, off + len(data) + 8192)
        got = h.pread(hi - lo, lo)
        assert got == exp[lo:hi], f"clone {i}: bytes {lo}..{hi} differ"
    for off in range(0, size, size // 16):
        n = min(65536, size - off)
        assert h.pread(n, off) == exp[off:off + n], f"clone {i}: sample at {off} differs"
    h.shutdown()
print(f"{mode} ok: {count} clones")
