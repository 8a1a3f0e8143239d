"""Overlapping writes in flight together on a thin clone.

usage: overlap.py URI GOLDEN_RAW

Each round sends, without waiting, a large write A that covers a region of the clone's still
inherited blocks, then inside that region small writes and small WRITE_ZEROES that each cover
part of one block (they need a copy-up), and sometimes a second connection's small writes. Once
all are answered and flushed, every touched block must hold A's bytes outside the small ranges
(image bytes there would mean a copy-up overwrote A), and A's or the small request's bytes in
them. Prints "PASS" or raises.
"""
import random
import sys

import nbd

uri, golden_path = sys.argv[1], sys.argv[2]
golden = open(golden_path, "rb").read()
BLOCK = 4096
REGION = 4 << 20
rnd = random.Random(11)


def connect():
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


h, other = connect(), connect()
size = h.get_size()
rounds = min(8, size // REGION)
checked = 0
for r in range(rounds):
    base = r * REGION
    big = bytes([0x41 + r]) * REGION
    blocks = sorted(rnd.sample(range(REGION // BLOCK), 48))
    smalls = []  # (offset, bytes written, by which handle)
    for i, k in enumerate(blocks):
        off = base + k * BLOCK + rnd.randrange(1, BLOCK - 600)
        if i % 3 == 2:
            smalls.append((off, bytes(500), "zero", h))
        else:
            smalls.append((off, bytes([0x61 + i % 26]) * 500, "write", other if i % 4 == 1 else h))
    cmds = [(h, h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(big)), base))]
    for off, data, kind, hd in smalls:
        if kind == "zero":
            cmds.append((hd, hd.aio_zero(len(data), off)))
        else:
            cmds.append((hd, hd.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)))
    while h.aio_in_flight() > 0 or other.aio_in_flight() > 0:
        for hd in (h, other):
            if hd.aio_in_flight() > 0:
                hd.poll(1)
    for hd, c in cmds:
        assert hd.aio_command_completed(c), "a command did not complete"
    h.flush()
    other.flush()
    got = h.pread(REGION, base)
    for off, data, kind, _ in smalls:
        k = (off - base) // BLOCK
        blk = got[k * BLOCK:(k + 1) * BLOCK]
        lo, hi = off - base - k * BLOCK, off - base - k * BLOCK + len(data)
        outside = blk[:lo] + blk[hi:]
        want = big[:lo] + big[hi:BLOCK]
        if outside != want:
            image = golden[base + k * BLOCK:base + (k + 1) * BLOCK]
            why = "image bytes" if outside == image[:lo] + image[hi:] else "other bytes"
            raise SystemExit("round %d block %d: %s outside the small %s at %d+%d: %r" % (r, k, why, kind, lo, len(data), sorted(set(outside))[:8]))
        inside = blk[lo:hi]
        assert inside in (data, big[:len(data)]), "round %d block %d: torn inside" % (r, k)
        checked += 1
h.shutdown()
other.shutdown()
print("PASS: %d blocks checked" % checked)
