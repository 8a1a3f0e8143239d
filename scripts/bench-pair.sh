#!/usr/bin/env bash
# The pair's cost (run as `scripts/bench.sh --mode pair ...` or directly): the same workload on a
# volume mirrored by a pair and on a volume of a single node, interleaved in one run.
#
#   single  one `streamer serve` node (no etcd), volume `vol`: a clone of the golden image.
#   pair    two nodes `a` and `b` of pair `bench` (one etcd on loopback), volume `vol` created
#           on `a` (its owner) and mirrored to `b`; fio writes to `a`. CPU is both nodes'.
#   forwarded  the same pair volume through node `b`, which does not own it: reads from b's
#           replica, changes forwarded to `a` (docs/pair.md §8). CPU is both nodes'.
#
# All three nodes, etcd and fio share this machine's CPUs: the pair's second copy costs CPU
# the single node does not pay, on the same cores fio uses. So beside IOPS and latency the table
# reports the servers' CPU time per I/O (utime+stime of every thread, io_uring workers
# included; for the pair, both nodes summed).
#
# Both volumes are written whole once before the cells (1 MiB sequential writes, then a flush):
# the cells measure the steady state of written blocks, not first writes (copy-up and block
# allocation are the volume's cost, the same for both). The nodes keep running for the whole
# run; cells are interleaved (for round, for row, for server) so drift affects both alike.
#
# usage: scripts/bench-pair.sh [--rounds N] [--runtime S] [--size SIZE] [--rows LIST]
#          [--servers LIST] [--streamer PATH] [--out FILE] [--dir DIR]
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"

ROUNDS=3
RUNTIME=5
SIZE=1G
STREAMER=target/release/streamer
OUT=
ROWS="rw1,rw32,sw8,rr32"
RESYNC=512M       # bytes written alone for the resync row (0: no resync row)
DROP_CACHES=1     # empty the page cache before each 4 KiB write cell (root only)
SERVERS="pair single forwarded"
WORKDIR=
TITLES="rw1=4k randwrite QD1|rw32=4k randwrite QD32|sw8=1MiB seq write QD8|rr32=4k randread QD32|rwf1=4k randwrite QD1 + fsync each"

usage() {
    cat <<EOF
usage: $0 [options]
  --rounds N        rounds (default $ROUNDS)
  --runtime SECS    fio runtime per cell (default $RUNTIME)
  --size SIZE       golden image and volume size (default $SIZE)
  --rows LIST       subset of rw1,rw32,sw8,rr32,rwf1 (default $ROWS)
  --resync SIZE     bytes written while node b is down, then resynced (default $RESYNC; 0: skip)
  --servers LIST    subset of pair,single,forwarded (default $SERVERS; pair always runs)
  --keep-caches     do not empty the page cache before each 4 KiB write cell (it is emptied
                    by default, as root: sync, then drop_caches)
  --streamer PATH   streamer binary (default $STREAMER)
  --out FILE        also write the report to FILE
  --dir DIR         work directory (default: mktemp -d under /var/tmp)
EOF
}

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --rounds) ROUNDS=$2; shift ;;
            --runtime) RUNTIME=$2; shift ;;
            --size) SIZE=$2; shift ;;
            --rows) ROWS=$2; shift ;;
            --resync) RESYNC=$2; shift ;;
            --servers) SERVERS=$2; shift ;;
            --keep-caches) DROP_CACHES=0 ;;
            --streamer) STREAMER=$2; shift ;;
            --out) OUT=$2; shift ;;
            --dir) WORKDIR=$2; shift ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; exit 2 ;;
        esac
        shift
    done
    ROWS=${ROWS//,/ }
    if [ "$DROP_CACHES" = 1 ] && [ ! -w /proc/sys/vm/drop_caches ]; then
        log "not root: the page cache is not emptied before each cell"
        DROP_CACHES=0
    fi
    SERVERS=${SERVERS//,/ }
    case " $SERVERS " in *" pair "*) ;; *) SERVERS="pair $SERVERS" ;; esac
    [ -x "$STREAMER" ] || die "streamer binary $STREAMER not found (cargo build --release)"
    for x in fio nbdinfo etcd numfmt; do command -v "$x" >/dev/null || die "$x not found"; done
}

row_fio_args() {
    case $1 in
        rw1) echo --rw=randwrite --bs=4k --iodepth=1 ;;
        rw32) echo --rw=randwrite --bs=4k --iodepth=32 ;;
        sw8) echo --rw=write --bs=1M --iodepth=8 ;;
        rr32) echo --rw=randread --bs=4k --iodepth=32 ;;
        rwf1) echo --rw=randwrite --bs=4k --iodepth=1 --fsync=1 ;;
        *) die "unknown row $1" ;;
    esac
}

# ---------------------------------------------------------------- etcd and the nodes

ETCD_PID=
declare -A PID PORT
etcd_start() {
    local client peer
    client=$(free_port); peer=$(free_port)
    ETCD_URL=http://127.0.0.1:$client
    etcd --data-dir "$WORKDIR/etcd" --listen-client-urls "$ETCD_URL" \
        --advertise-client-urls "$ETCD_URL" --listen-peer-urls "http://127.0.0.1:$peer" \
        --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "default=http://127.0.0.1:$peer" > "$WORKDIR/etcd.log" 2>&1 &
    ETCD_PID=$!
    local i
    for ((i = 0; i < 100; i++)); do
        $PY -c 'import sys, urllib.request; sys.exit(0 if b"true" in urllib.request.urlopen(sys.argv[1] + "/health", timeout=2).read() else 1)' "$ETCD_URL" 2>/dev/null && return 0
        sleep 0.1
    done
    die "etcd did not start (see $WORKDIR/etcd.log)"
}

# node_start NAME [PAIR ARGS...]: a node with its own pool, serving NBD on a free port.
node_start() {
    local name=$1 logf=$WORKDIR/$1.log
    shift
    PORT[$name]=$(free_port)
    "$STREAMER" serve --create --data-dir "$WORKDIR/$name" --listen "127.0.0.1:${PORT[$name]}" "$@" \
        > "$logf" 2>&1 &
    PID[$name]=$!
    local i
    for ((i = 0; i < 200; i++)); do
        grep -qx ready "$logf" && return 0
        kill -0 "${PID[$name]}" 2>/dev/null || { cat "$logf" >&2; die "node $name exited"; }
        sleep 0.1
    done
    die "node $name not ready (see $logf)"
}

cli() { local n=$1; shift; timeout 600 "$STREAMER" "$@" --mgmt-socket "$WORKDIR/$n/streamer.sock"; }

uri() {
    case $1 in
        pair) echo "nbd://127.0.0.1:${PORT[a]}/vol" ;;
        single) echo "nbd://127.0.0.1:${PORT[s]}/vol" ;;
        forwarded) echo "nbd://127.0.0.1:${PORT[b]}/vol" ;;
    esac
}

pids() {
    case $1 in
        pair | forwarded) echo "${PID[a]},${PID[b]}" ;;
        single) echo "${PID[s]}" ;;
    esac
}

setup() {
    local bytes golden=$WORKDIR/golden.raw
    bytes=$(numfmt --from=iec "$SIZE") || die "bad --size $SIZE"
    log "golden image: $SIZE of random data"
    head -c "$bytes" /dev/urandom > "$golden"
    etcd_start
    # No resync pacing: the resync row measures what the link and the nodes can do.
    local pair=(--etcd "$ETCD_URL" --pair bench --peer-listen 127.0.0.1:0 --resync-rate 0)
    node_start a "${pair[@]}" --node a
    node_start b "${pair[@]}" --node b
    node_start s
    local i
    for ((i = 0; i < 100; i++)); do
        cli a pair status --json | grep -q '"up": *true' && break
        sleep 0.2
    done
    # Imported on a (it lands on b too, the pair shares its images) and on the single node.
    for n in a s; do cli "$n" image import golden "$golden" > /dev/null; done
    for ((i = 0; i < 300; i++)); do
        cli b image list | grep -q '^golden ' && break
        sleep 0.2
    done
    rm -f "$golden"
    cli a volume create vol --image golden > /dev/null
    cli s volume create vol --image golden > /dev/null
    for srv in $SERVERS; do
        [ "$srv" = forwarded ] && continue # the pair's volume, written as pair
        log "writing $srv's volume once"
        fio --name=fill --ioengine=nbd --uri="$(uri "$srv")" --rw=write --bs=1M --iodepth=8 \
            --end_fsync=1 > "$WORKDIR/fill-$srv.log" 2>&1 || die "filling $srv's volume failed"
    done
}

no_stop() { :; }

# The resync row: node b is killed, RESYNC bytes are written to the pair volume alone (1 MiB
# sequential writes), b is started again and the time until a reports the volume in sync is
# the resync's. Beside it, the loopback's own speed: the same bytes through one TCP connection
# between two Python processes (the link the resync uses, without either node's work).
resync_row() {
    local bytes t0 t1 i state secs
    bytes=$(numfmt --from=iec "$RESYNC") || die "bad --resync $RESYNC"
    [ "$bytes" -gt 0 ] || return 0
    log "resync: killing node b, writing $RESYNC alone"
    kill -KILL "${PID[b]}"; wait "${PID[b]}" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        cli a pair status --json | $PY -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if any(n["name"]=="b" and not n["up"] for n in d["nodes"]) else 1)' && break
        sleep 0.2
    done
    fio --name=alone --ioengine=nbd --uri="$(uri pair)" --rw=write --bs=1M --iodepth=8 \
        --size="$bytes" --end_fsync=1 > "$WORKDIR/alone.log" 2>&1 || die "writing alone failed"
    local pair=(--etcd "$ETCD_URL" --pair bench --peer-listen 127.0.0.1:0 --resync-rate 0)
    "$STREAMER" serve --data-dir "$WORKDIR/b" --listen "127.0.0.1:${PORT[b]}" "${pair[@]}" \
        --node b > "$WORKDIR/b2.log" 2>&1 &
    PID[b]=$!
    t0=$(date +%s.%N)
    for ((i = 0; i < 6000; i++)); do
        state=$(cli a pair status --json 2>/dev/null | $PY -c 'import json,sys; d=json.load(sys.stdin); print(d["volumes"][0]["state"])' 2>/dev/null || true)
        [ "$state" = in_sync ] && break
        sleep 0.05
    done
    t1=$(date +%s.%N)
    [ "$state" = in_sync ] || die "the resync did not finish (see $WORKDIR)"
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    local link
    link=$($PY - "$bytes" <<'PYEOF'
import socket, sys, threading, time
n = int(sys.argv[1]); buf = bytes(1 << 20)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
def sink():
    c, _ = srv.accept(); got = 0
    while got < n:
        got += len(c.recv(1 << 20))
t = threading.Thread(target=sink); t.start()
s = socket.create_connection(srv.getsockname()); t0 = time.time(); sent = 0
while sent < n:
    s.sendall(buf[: min(len(buf), n - sent)]); sent += min(len(buf), n - sent)
t.join(); print("%.0f" % (n / (time.time() - t0) / 1e6))
PYEOF
)
    # The resync itself, from node a's log: its last "resync started" to its "resync done".
    local own
    own=$($PY - "$WORKDIR/a.log" <<'PYEOF'
import datetime, sys
start = done = None
for line in open(sys.argv[1], errors="replace"):
    t = line.split(" ", 1)[0].rstrip("Z")
    if "resync started" in line:
        start = t
    elif "resync done" in line:
        done = t
p = lambda s: datetime.datetime.fromisoformat(s[:26])
print("%.2f" % (p(done) - p(start)).total_seconds() if start and done else "?")
PYEOF
)
    echo
    echo "| resync of $RESYNC written while b was down | seconds (b started to in sync) | MB/s | the resync itself, s (a's log) | its MB/s | loopback TCP MB/s (one connection, no node) |"
    echo "|---|---|---|---|---|---|"
    awk -v s="$secs" -v n="$bytes" -v l="$link" -v r="$RESYNC" -v o="$own" \
        'BEGIN { printf "| %s | %s | %.0f | %s | %s | %s |\n", r, s, n / s / 1e6, o,
                 (o + 0 > 0 ? sprintf("%.0f", n / o / 1e6) : "?"), l }'
}

print_header() {
    echo "# streamer pair benchmark: mirrored vs single node"
    echo
    echo "- date: $(date -Is)"
    echo "- host: $(uname -sr), $(nproc) CPUs shared by both nodes of the pair, the single node, etcd and fio"
    echo "- fio: $(fio --version), ioengine=nbd over TCP loopback, $ROUNDS rounds (medians), runtime ${RUNTIME}s per cell"
    echo "- volumes: a clone of a $SIZE golden image of random data, written whole once before the cells"
    echo "- pair: \`streamer serve --etcd URL --node a|b --pair bench --peer-listen ...\`, volume created on a (its owner), mirrored to b over the peer link; CPU us/IO is both nodes' together"
    echo "- single: \`streamer serve --data-dir POOL --listen ...\` (no etcd)"
    echo "- forwarded: the pair's volume through node b (not its owner): reads from b's replica, changes forwarded to a; CPU us/IO is both nodes' together"
    if [ "$DROP_CACHES" = 1 ]; then
        echo "- page cache: emptied (sync, drop_caches) before every 4 KiB write cell"
    else
        echo "- page cache: kept between cells (--keep-caches)"
    fi
}

cleanup() {
    local n
    for n in a b s; do
        [ -z "${PID[$n]:-}" ] || stop_pid "${PID[$n]}"
    done
    [ -z "$ETCD_PID" ] || stop_pid "$ETCD_PID"
    [ "${CLEAN_WORKDIR:-0}" = 0 ] || rm -rf "$WORKDIR"
}

main() {
    parse_args "$@"
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    make_workdir
    setup
    local header round row srv
    header=$(print_header)
    echo "$header" >&2
    for ((round = 1; round <= ROUNDS; round++)); do
        for row in $ROWS; do
            for srv in $SERVERS; do
                sync
                # Every 4 KiB write cell starts from the same page cache: none of the volumes'
                # pages. What the cells before left there (the fill's 1 MiB writes, a read's
                # readahead) is in large folios, into which each 4 KiB buffered write costs
                # ~25 us in ext4 (README, "How the image came into the page cache"), on some
                # nodes and not others. The other cells keep what is cached: a 1 MiB write
                # covers whole folios, and emptied, a read cell would measure the disk.
                case $row in
                    rw*) if [ "$DROP_CACHES" = 1 ]; then echo 3 > /proc/sys/vm/drop_caches; fi ;;
                esac
                fio_cell "$round" "$row" tcp "$srv" "$(uri "$srv")" "$(pids "$srv")" no_stop
            done
        done
    done
    local report
    local resync
    # Not in $(...): the node it restarts must be visible to the EXIT trap.
    resync_row > "$WORKDIR/resync.md"
    resync=$(cat "$WORKDIR/resync.md")
    report=$(printf '%s\n\n%s\n%s\n' "$header" "$(BENCH_REF=pair print_table "$RESULTS" "$SERVERS" "$ROWS" tcp "$TITLES" "sw8" "rw1 rwf1")" "$resync")
    echo "$report"
    if [ -n "$OUT" ]; then echo "$report" > "$OUT"; fi
}

main "$@"
