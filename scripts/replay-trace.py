#!/usr/bin/python3
"""Replays a boot's reads against NBD exports (the boot storm benchmark, scripts/bench-clone.sh
--mode storm --trace FILE): each URI given gets the trace's reads, in the trace's order, one at
a time (a booting guest mostly waits for each read), all URIs at once, one thread each (libnbd
releases the GIL while it waits). Prints the bytes read and the wall time.
Usage: replay-trace.py TRACE URI...   (TRACE: lines of "OFFSET LENGTH")"""
import sys
import threading
import time

import nbd


def main():
    trace = [tuple(int(x) for x in line.split()) for line in open(sys.argv[1]) if line.strip()]
    uris = sys.argv[2:]
    handles = []
    for uri in uris:
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    errors = []

    def run(h):
        try:
            for off, length in trace:
                h.pread(length, off)
        except Exception as e:  # reported once all threads are done
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(h,)) for h in handles]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.monotonic() - t0
    for h in handles:
        h.shutdown()
    if errors:
        sys.exit("replay failed: " + "; ".join(errors[:3]))
    total = sum(length for _, length in trace) * len(uris)
    print("%d %.3f" % (total, secs))


main()
