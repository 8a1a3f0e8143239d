#!/usr/bin/python3
"""Replays a boot's reads against NBD exports (the boot storm benchmark, scripts/bench-clone.sh
--mode storm --trace FILE): each URI given gets the trace's reads, in the trace's order, one at
a time (a booting guest mostly waits for each read), all URIs at once, one process each (so the
clients are not serialised by Python's lock). Prints the bytes read, the wall time from the
moment every client is connected to the last one done, and the clients' CPU seconds.
Usage: replay-trace.py TRACE URI...   (TRACE: lines of "OFFSET LENGTH")"""
import multiprocessing as mp
import os
import sys
import threading
import time

import nbd


def client(uri, trace, ready, results):
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        ready.wait()
        for off, length in trace:
            h.pread(length, off)
        h.shutdown()
        t = os.times()
        results.put(("ok", t.user + t.system))
    except Exception as e:  # reported by the parent
        results.put(("error", "%s: %r" % (uri, e)))
        ready.abort()  # the parent stops waiting for everyone to connect


def main():
    trace = [tuple(int(x) for x in line.split()) for line in open(sys.argv[1]) if line.strip()]
    uris = sys.argv[2:]
    ready = mp.Barrier(len(uris) + 1)
    results = mp.Queue()
    procs = [mp.Process(target=client, args=(u, trace, ready, results)) for u in uris]
    for p in procs:
        p.start()
    try:
        ready.wait(timeout=120)
    except threading.BrokenBarrierError:
        errors = []
        while not results.empty():
            errors.append(results.get()[1])
        for p in procs:
            p.kill()
        sys.exit("replay failed: " + ("; ".join(errors[:3]) or "a client did not connect"))
    t0 = time.monotonic()
    out = [results.get(timeout=900) for _ in procs]
    secs = time.monotonic() - t0
    for p in procs:
        p.join()
    errors = [x for kind, x in out if kind == "error"]
    if errors:
        sys.exit("replay failed: " + "; ".join(errors[:3]))
    total = sum(length for _, length in trace) * len(uris)
    print("%d %.3f %.2f" % (total, secs, sum(x for _, x in out)))


main()
