"""Random writes, WRITE_ZEROES (with and without NO_HOLE, FAST_ZERO refused or not), TRIMs,
flushes and reads on a thin clone, each read checked against a model of the bytes.

usage: zeroes.py URI GOLDEN_RAW OPS

The clone starts as the golden image (zeroes past its end). TRIM and WRITE_ZEROES must read as
zeroes afterwards (a trimmed range never reads as image data here), and every request must
succeed: on a file system without fallocate, zeroing falls back to writing zeroes instead of
failing (and a failure must never latch the volume). Prints "PASS" or raises.
"""
import random
import sys

import nbd

uri, golden_path, ops = sys.argv[1], sys.argv[2], int(sys.argv[3])
golden = open(golden_path, "rb").read()
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
model = bytearray(size)
model[: len(golden)] = golden
rnd = random.Random(5)
for i in range(ops):
    op = rnd.randrange(100)
    length = rnd.choice([1, 512, 4096, 4096 * 3, 65536, 1 << 20])
    if rnd.random() < 0.4:
        length += rnd.randrange(4096)
    length = min(length, size)
    offset = rnd.randrange(size - length + 1)
    if op < 35:
        data = bytes([rnd.randrange(1, 256)]) * length
        h.pwrite(data, offset)
        model[offset : offset + length] = data
    elif op < 50:
        flags = 0 if rnd.random() < 0.5 else nbd.CMD_FLAG_NO_HOLE
        if rnd.random() < 0.2:
            flags |= nbd.CMD_FLAG_FUA
        h.zero(length, offset, flags)
        model[offset : offset + length] = bytes(length)
    elif op < 60:
        h.trim(length, offset)
        model[offset : offset + length] = bytes(length)
    elif op < 65:
        h.flush()
    else:
        got = h.pread(length, offset)
        if got != model[offset : offset + length]:
            raise SystemExit(f"op {i}: read {offset}+{length} differs from the model")
# A whole read-back at the end.
for off in range(0, size, 1 << 20):
    n = min(1 << 20, size - off)
    if h.pread(n, off) != model[off : off + n]:
        raise SystemExit(f"final read at {off} differs from the model")
h.shutdown()
print("PASS")
