#!/usr/bin/env bash
# Pool benchmarks (run as `scripts/bench.sh --mode clone|storm|mgmt ...` or directly).
#
# Every mode serves thin clones of one golden image of random data:
#   streamer   a node (`serve --data-dir`) with the golden image imported into its pool; each cell
#              creates a fresh clone with `streamer volume create` and deletes it afterwards.
#   qemu-nbd   a fresh qcow2 overlay per cell (`qemu-img create -f qcow2 -b GOLDEN -F raw`,
#              default 64 KiB clusters) served with `-t -e 8 --aio=io_uring --cache=writeback`.
#   nbdkit     `--filter=cow file GOLDEN` (its overlay is a fresh temporary file per process).
# GOLDEN is the very file in streamer's pool, so all three read the same bytes. Volumes are served
# through the page cache (streamer has no O_DIRECT for volumes yet), so qemu-nbd runs with
# --cache=writeback; the golden image is read once before each cell so every server starts warm.
#
# Modes:
#   clone  fio (--ioengine=nbd) on a fresh clone; rows interleaved (for round, row, server) and
#          reported as medians with ratios. "fresh" rows run on a clone nobody has written (reads
#          fall through to the golden image; writes are first writes, which allocate); "written"
#          rows run after the whole clone was written once (untimed, then flushed).
#   storm  boot storm: N clones (default 50) of a 512 MiB golden image are read whole, all at
#          once, one NBD connection each, after the page cache was dropped. Reports the time, the
#          bytes served, the bytes read from the block device under the pool (/sys/class/block/
#          DEV/stat) and the servers' CPU time. qemu-nbd and nbdkit need one process per clone.
#          With --trace FILE (and --golden FILE, the image the trace was recorded on; both made
#          by scripts/record-boot-trace.sh from a real guest's boot), each clone replays the
#          boot's reads in order instead, and every server runs it with 1 clone alone and with N
#          at once: the boot storm's cost is N clones' time against one's.
#   mgmt   what management work costs the data path: fio on one clone for --runtime seconds
#          (default 20), alone and while the node imports a --import-size image (default 2G, not
#          in the page cache) or captures a written 1 GiB clone as a new image. IOPS are taken
#          from fio's per-250 ms log inside the window the command ran.
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"

MODE=clone
ROUNDS=3
RUNTIME=
SIZE=
STREAMER=target/release/streamer
OUT=
SERVERS="streamer,qemu-nbd,nbdkit"
ROWS=
CLONES=50
TRACE=            # storm: replay this boot trace ("OFFSET LENGTH" lines) instead of reading whole
GOLDEN_SRC=       # storm: the golden image (default: --size of random data)
IMPORT_SIZE=2G
BULK_RATE=        # mgmt: the node's --bulk-rate (default: the node's default)
TRANSPORT=tcp
WORKDIR=

CLONE_ROWS="frr32,frr1,fsr8,fw32,fsw8,wrr32,ww32"
MGMT_ROWS="rr32,rw32"
TITLES="frr32=4k randread QD32, fresh clone|frr1=4k randread QD1, fresh clone|fsr8=1MiB seq read QD8, fresh clone|fw32=4k randwrite QD32, fresh clone (first writes)|fsw8=1MiB seq write QD8, fresh clone (first writes)|wrr32=4k randread QD32, written blocks|ww32=4k randwrite QD32, written blocks|rr32=4k randread QD32|rw32=4k randwrite QD32"

usage() {
    cat <<EOF
usage: $0 --mode clone|storm|mgmt [options]
  --rounds N               rounds (default $ROUNDS)
  --runtime SECS           fio runtime per cell (clone: 5, mgmt: 20)
  --size SIZE              golden image size (clone, mgmt: 1G; storm: 512M)
  --clones N               storm: clones read at once (default $CLONES)
  --trace FILE             storm: replay this boot trace per clone, 1 clone alone and N at once
  --golden FILE            storm: the golden image (the one the trace was recorded on)
  --import-size SIZE       mgmt: size of the image imported under load (default $IMPORT_SIZE)
  --bulk-rate RATE         mgmt: the node's --bulk-rate (0: unpaced; default: the node's)
  --servers LIST           clone, storm: subset of $SERVERS
  --rows LIST              clone: subset of $CLONE_ROWS; mgmt: subset of $MGMT_ROWS
  --transport tcp|unix     clone, mgmt (default $TRANSPORT; storm always uses Unix sockets)
  --streamer PATH          streamer binary (default $STREAMER)
  --out FILE               also write the report to FILE
  --dir DIR                work directory (default: mktemp -d under /var/tmp)
EOF
}

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --mode) MODE=$2; shift ;;
            --rounds) ROUNDS=$2; shift ;;
            --runtime) RUNTIME=$2; shift ;;
            --size) SIZE=$2; shift ;;
            --clones) CLONES=$2; shift ;;
            --trace) TRACE=$2; shift ;;
            --golden) GOLDEN_SRC=$2; shift ;;
            --import-size) IMPORT_SIZE=$2; shift ;;
            --bulk-rate) BULK_RATE=$2; shift ;;
            --servers) SERVERS=$2; shift ;;
            --rows) ROWS=$2; shift ;;
            --transport) TRANSPORT=$2; shift ;;
            --streamer) STREAMER=$2; shift ;;
            --out) OUT=$2; shift ;;
            --dir) WORKDIR=$2; shift ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown option $1" ;;
        esac
        shift
    done
    case $MODE in
        clone) : "${RUNTIME:=5}" "${SIZE:=1G}" "${ROWS:=$CLONE_ROWS}" ;;
        storm) : "${SIZE:=512M}" ;;
        mgmt) : "${RUNTIME:=20}" "${SIZE:=1G}" "${ROWS:=$MGMT_ROWS}"; SERVERS=streamer ;;
        *) die "--mode must be clone, storm or mgmt" ;;
    esac
    [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "bad --rounds"
    [[ "${RUNTIME:-1}" =~ ^[1-9][0-9]*$ ]] || die "bad --runtime"
    [[ "$CLONES" =~ ^[1-9][0-9]*$ ]] || die "bad --clones"
    case $TRANSPORT in tcp|unix) ;; *) die "--transport must be tcp or unix" ;; esac
    SERVERS=${SERVERS//,/ }; ROWS=${ROWS//,/ }
    local x
    for x in $ROWS; do row_title "$x" >/dev/null; done
    for x in $SERVERS; do
        case $x in
            streamer) ;;
            qemu-nbd|nbdkit) command -v "$x" >/dev/null || die "$x not found" ;;
            *) die "unknown server $x" ;;
        esac
    done
    [ -x "$STREAMER" ] || die "streamer binary $STREAMER not found (cargo build --release)"
    for x in fio nbdinfo qemu-img numfmt; do command -v "$x" >/dev/null || die "$x not found"; done
    fio --enghelp=nbd >/dev/null 2>&1 || die "fio has no nbd engine"
}

row_fio_args() {
    case $1 in
        frr32|wrr32|rr32) echo --rw=randread --bs=4k --iodepth=32 ;;
        frr1) echo --rw=randread --bs=4k --iodepth=1 ;;
        fsr8) echo --rw=read --bs=1M --iodepth=8 ;;
        fw32|ww32|rw32) echo --rw=randwrite --bs=4k --iodepth=32 ;;
        fsw8) echo --rw=write --bs=1M --iodepth=8 ;;
    esac
}

# ---------------------------------------------------------------- the streamer node

NODE_PID=
POOL=
node_start() {
    local logf=$WORKDIR/node.log
    local -a extra=()
    [ -z "$BULK_RATE" ] || extra=(--bulk-rate "$BULK_RATE")
    rm -f "$POOL/streamer.sock"
    if [ "$TRANSPORT" = tcp ] && [ "$MODE" != storm ]; then
        "$STREAMER" serve --create --data-dir "$POOL" --listen "127.0.0.1:$PORT" "${extra[@]}" > "$logf" 2>&1 &
    else
        "$STREAMER" serve --create --data-dir "$POOL" --socket "$WORKDIR/streamer.nbd" "${extra[@]}" > "$logf" 2>&1 &
    fi
    NODE_PID=$!
    wait_nbd "$NODE_PID" "$logf" "$(node_uri "image/golden")" ready
}

node_stop() {
    [ -n "$NODE_PID" ] || return 0
    local rc
    stop_pid "$NODE_PID"; rc=$STOP_RC
    NODE_PID=
    [ "$rc" = 0 ] || log "warning: streamer exited with status $rc after SIGTERM"
}

node_uri() {
    if [ "$TRANSPORT" = tcp ] && [ "$MODE" != storm ]; then echo "nbd://127.0.0.1:$PORT/$1"
    else echo "nbd+unix:///$1?socket=$WORKDIR/streamer.nbd"; fi
}

cli() { timeout 600 "$STREAMER" "$@" --socket "$POOL/streamer.sock"; }

# A pool holding the golden image: random data, imported through the CLI like an operator would.
make_pool() {
    local bytes src=$WORKDIR/golden-src.raw
    POOL=$WORKDIR/pool
    mkdir -p "$POOL"
    if [ -n "$GOLDEN_SRC" ]; then
        src=$GOLDEN_SRC
        SIZE=$(stat -c %s "$src")
        log "golden image: $src ($SIZE bytes)"
    else
        bytes=$(numfmt --from=iec "$SIZE") || die "bad --size $SIZE"
        log "creating the golden image ($bytes bytes of random data)"
        timeout 600 head -c "$bytes" /dev/urandom > "$src"
    fi
    # The node serves `image/golden`, which node_start waits for: start on an empty pool first.
    "$STREAMER" serve --create --data-dir "$POOL" --socket "$WORKDIR/streamer.nbd" > "$WORKDIR/node.log" 2>&1 &
    NODE_PID=$!
    local i
    for ((i = 0; i < 100; i++)); do
        [ -S "$POOL/streamer.sock" ] && grep -qx ready "$WORKDIR/node.log" && break
        kill -0 "$NODE_PID" 2>/dev/null || { cat "$WORKDIR/node.log" >&2; die "streamer exited"; }
        sleep 0.1
    done
    cli image import golden "$src" --format raw >/dev/null
    node_stop
    [ -n "$GOLDEN_SRC" ] || rm -f "$src"
    GOLDEN=$POOL/images/golden/image.raw
    [ -f "$GOLDEN" ] || die "no $GOLDEN after the import (pool layout changed?)"
}

# ---------------------------------------------------------------- one clone per cell (clone mode)

SERVER_PID=
# cell_start SERVER: a fresh clone served by SERVER; sets SERVER_PID and URI.
cell_start() {
    local srv=$1 logf=$WORKDIR/$1.log
    case $srv in
        streamer)
            node_start
            cli volume create bench --image golden >/dev/null
            SERVER_PID=$NODE_PID
            URI=$(node_uri bench) ;;
        qemu-nbd)
            rm -f "$WORKDIR/overlay.qcow2"
            qemu-img create -q -f qcow2 -b "$GOLDEN" -F raw "$WORKDIR/overlay.qcow2"
            if [ "$TRANSPORT" = tcp ]; then
                qemu-nbd -f qcow2 -x bench -b 127.0.0.1 -p "$PORT" -t -e 8 --aio=io_uring \
                    --cache=writeback "$WORKDIR/overlay.qcow2" > "$logf" 2>&1 &
                URI=nbd://127.0.0.1:$PORT/bench
            else
                rm -f "$WORKDIR/qemu.nbd"
                qemu-nbd -f qcow2 -x bench -k "$WORKDIR/qemu.nbd" -t -e 8 --aio=io_uring \
                    --cache=writeback "$WORKDIR/overlay.qcow2" > "$logf" 2>&1 &
                URI="nbd+unix:///bench?socket=$WORKDIR/qemu.nbd"
            fi
            SERVER_PID=$!
            wait_nbd "$SERVER_PID" "$logf" "$URI" ;;
        nbdkit)
            if [ "$TRANSPORT" = tcp ]; then
                TMPDIR=$WORKDIR nbdkit --exit-with-parent -f -i 127.0.0.1 -p "$PORT" \
                    --filter=cow file "$GOLDEN" > "$logf" 2>&1 &
                URI=nbd://127.0.0.1:$PORT/bench
            else
                rm -f "$WORKDIR/nbdkit.nbd"
                TMPDIR=$WORKDIR nbdkit --exit-with-parent -f -U "$WORKDIR/nbdkit.nbd" \
                    --filter=cow file "$GOLDEN" > "$logf" 2>&1 &
                URI="nbd+unix:///bench?socket=$WORKDIR/nbdkit.nbd"
            fi
            SERVER_PID=$!
            wait_nbd "$SERVER_PID" "$logf" "$URI" ;;
    esac
}

cell_stop() {
    local srv=$1
    [ -n "$SERVER_PID" ] || return 0
    if [ "$srv" = streamer ]; then
        cli volume delete bench --force >/dev/null || log "warning: deleting the clone failed"
        node_stop
    else
        stop_pid "$SERVER_PID"
        rm -f "$WORKDIR/overlay.qcow2"
    fi
    SERVER_PID=
}

warm_golden() { cat "$GOLDEN" > /dev/null; }

run_clone_cell() {
    local round=$1 row=$2 srv=$3
    warm_golden
    cell_start "$srv"
    if [ "${row:0:1}" = w ]; then
        # Written blocks: write the whole clone once and flush, untimed.
        timeout 600 fio --name=prefill --ioengine=nbd --uri="$URI" --rw=write --bs=1M \
            --iodepth=8 --size="$SIZE" --end_fsync=1 --output=/dev/null \
            || { cell_stop "$srv"; log "warning: prefill failed for $srv"; return 0; }
    fi
    fio_cell "$round" "$row" "$TRANSPORT" "$srv" "$URI" "$SERVER_PID" cell_stop --size="$SIZE"
}

clone_mode() {
    local round row srv
    for ((round = 1; round <= ROUNDS; round++)); do
        for row in $ROWS; do
            for srv in $SERVERS; do run_clone_cell "$round" "$row" "$srv"; done
        done
    done
    print_table "$RESULTS" "$SERVERS" "$ROWS" "$TRANSPORT" "$TITLES" "fsr8 fsw8" "frr1"
}

# ---------------------------------------------------------------- boot storm

# The block device under the pool, for its read counter.
pool_device() {
    local src name
    src=$(findmnt -no SOURCE --target "$WORKDIR" 2>/dev/null | head -1)
    name=$(basename "${src%%[*}")
    [ -r "/sys/class/block/$name/stat" ] && echo "$name"
}

# Bytes read from DEV so far (field 3 of its stat: 512-byte sectors read).
disk_read_bytes() {
    [ -n "$1" ] || { echo 0; return; }
    awk '{ printf "%.0f\n", $3 * 512 }' "/sys/class/block/$1/stat"
}

drop_caches() {
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then
        echo 3 > /proc/sys/vm/drop_caches
        DROP_NOTE="page cache dropped (echo 3 > /proc/sys/vm/drop_caches) before each cell"
    else
        DROP_NOTE="page cache NOT dropped (not root): disk bytes are meaningless"
    fi
}

STORM_PIDS=()
# storm_cell ROUND SERVER: starts the servers, drops the cache, reads every clone whole at once.
storm_cell() {
    local round=$1 srv=$2 clones=${3:-$CLONES} i uris=() CLONES=${3:-$CLONES}
    local jobfile=$WORKDIR/storm.fio d0 d1 t0 t1 c0 c1 json m bytes t_replay= c_replay=
    STORM_PIDS=()
    local secs
    case $srv in
        streamer)
            node_start
            for ((i = 1; i <= CLONES; i++)); do
                cli volume create "s$i" --image golden >/dev/null
                uris+=("$(node_uri "s$i")")
            done
            STORM_PIDS=("$NODE_PID") ;;
        qemu-nbd)
            for ((i = 1; i <= CLONES; i++)); do
                qemu-img create -q -f qcow2 -b "$GOLDEN" -F raw "$WORKDIR/s$i.qcow2"
                rm -f "$WORKDIR/s$i.nbd"
                qemu-nbd -f qcow2 -x "s$i" -k "$WORKDIR/s$i.nbd" -t -e 8 --aio=io_uring \
                    --cache=writeback "$WORKDIR/s$i.qcow2" > "$WORKDIR/qemu-s$i.log" 2>&1 &
                STORM_PIDS+=($!)
                uris+=("nbd+unix:///s$i?socket=$WORKDIR/s$i.nbd")
            done
            for ((i = 0; i < CLONES; i++)); do wait_nbd "${STORM_PIDS[i]}" "$WORKDIR/qemu-s$((i + 1)).log" "${uris[i]}"; done ;;
        nbdkit)
            for ((i = 1; i <= CLONES; i++)); do
                rm -f "$WORKDIR/s$i.nbd"
                TMPDIR=$WORKDIR nbdkit --exit-with-parent -f -U "$WORKDIR/s$i.nbd" \
                    --filter=cow file "$GOLDEN" > "$WORKDIR/nbdkit-s$i.log" 2>&1 &
                STORM_PIDS+=($!)
                uris+=("nbd+unix:///s$i?socket=$WORKDIR/s$i.nbd")
            done
            for ((i = 0; i < CLONES; i++)); do wait_nbd "${STORM_PIDS[i]}" "$WORKDIR/nbdkit-s$((i + 1)).log" "${uris[i]}"; done ;;
    esac
    {
        echo "[global]"
        echo "ioengine=nbd"
        echo "rw=read"
        echo "bs=256k"
        echo "iodepth=2"
        echo "size=$SIZE"
        for ((i = 0; i < CLONES; i++)); do
            echo "[c$i]"
            echo "uri=${uris[i]}"
        done
    } > "$jobfile"
    drop_caches
    log "after drop: $(fincore -n -o RES "$GOLDEN" 2>/dev/null) of the golden image in the page cache"
    d0=$(disk_read_bytes "$DEV")
    c0=$(cpu_ticks_sum "${STORM_PIDS[@]}")
    t0=$(date +%s%N)
    json=$WORKDIR/storm-$round-$srv.json
    if [ -n "$TRACE" ]; then
        local replay
        replay=$(timeout 900 $PY "$(dirname "$0")/replay-trace.py" "$TRACE" "${uris[@]}" 2>&1) \
            || log "warning: storm replay failed for $srv: $replay"
    else
        timeout 900 fio --output-format=json --output="$json" "$jobfile" > "$json.stdout" 2>&1 \
            || log "warning: storm fio failed for $srv: $(tail -3 "$json.stdout" | tr '\n' ' ')"
    fi
    t1=$(date +%s%N)
    c1=$(cpu_ticks_sum "${STORM_PIDS[@]}")
    d1=$(disk_read_bytes "$DEV")
    if [ "$srv" = streamer ]; then
        for ((i = 1; i <= CLONES; i++)); do cli volume delete "s$i" --force >/dev/null; done
        node_stop
        STORM_PIDS=()
    else
        for i in "${STORM_PIDS[@]}"; do stop_pid "$i"; done
        STORM_PIDS=()
        rm -f "$WORKDIR"/s*.qcow2
    fi
    if [ -n "$TRACE" ]; then
        if [[ "$replay" =~ ^[0-9]+\ [0-9.]+\ [0-9.]+$ ]]; then
            m="0 0 0 0 0 ${replay%% *}"
            # The clients' wall time (from all connected) and CPU replace the script's.
            read -r _ t_replay c_replay <<< "$replay"
        else m=; fi
    fi
    if [ -z "$TRACE" ] && ! m=$(parse_fio "$json" 2>&1); then m=; fi
    if [ -n "$m" ]; then
        read -r _ _ _ _ _ bytes <<< "$m"
        secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
        [ -z "$TRACE" ] || secs=$t_replay
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$srv" "$clones" "$secs" "$bytes" "$((d1 - d0))" \
            "$(awk -v d=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", d / hz }')" "${c_replay:-0}" >> "$RESULTS"
        log "storm round $round $srv: ${secs}s, served $bytes, disk read $((d1 - d0)) ($DEV: $d0 -> $d1), cpu $(((c1 - c0)))ticks"
    else
        log "warning: storm round $round $srv: no result"
    fi
}

storm_mode() {
    DEV=$(pool_device || true)
    [ -n "$DEV" ] || log "warning: no block device found under $WORKDIR: disk bytes not measured"
    local round srv
    for ((round = 1; round <= ROUNDS; round++)); do
        for srv in $SERVERS; do
            # With a trace: one clone alone first, for the storm's cost against one boot.
            [ -z "$TRACE" ] || storm_cell "$round" "$srv" 1
            storm_cell "$round" "$srv" "$CLONES"
        done
    done
    $PY - "$RESULTS" "$SERVERS" "$(numfmt --from=iec "$SIZE")" "$CLONES" "$TRACE" <<'PYEOF'
import os, sys, statistics
from collections import defaultdict
path, servers, size, clones, trace = sys.argv[1], sys.argv[2].split(), int(sys.argv[3]), sys.argv[4], sys.argv[5]
v = defaultdict(list)
one = defaultdict(list)
for line in open(path):
    rnd, srv, n, secs, served, disk, cpu, ccpu = line.split()
    row = (float(secs), int(served), int(disk), float(cpu), float(ccpu))
    (v if n == clones else one)[srv].append(row)
if trace:
    print("| server | 1 clone s | %s clones s | %s clones / 1 | read from disk, 1 clone MiB | read from disk, %s clones MiB | served GiB | server CPU s | clients' CPU s | CPU busy, of 2 cores |" % (clones, clones, clones))
    print("|---|---|---|---|---|---|---|---|---|---|")
    ncpu = os.cpu_count()
    for s in servers:
        if not v[s] or not one[s]:
            print("| %s | n/a | | | | | | | | |" % s)
            continue
        m = lambda d, i: statistics.median(x[i] for x in d[s])
        print("| %s | %.2f | %.2f | %.1fx | %.1f | %.1f | %.1f | %.1f | %.1f | %.0f%% |" % (s, m(one, 0), m(v, 0),
              m(v, 0) / m(one, 0), m(one, 2) / 2**20, m(v, 2) / 2**20, m(v, 1) / 2**30, m(v, 3), m(v, 4),
              100 * (m(v, 3) + m(v, 4)) / (m(v, 0) * ncpu)))
    sys.exit(0)
med = lambda srv, i: statistics.median(x[i] for x in v[srv]) if v[srv] else None
print("| server | time s | served GiB | read from disk GiB | disk reads / golden size | server CPU s | GB/s served |")
print("|---|---|---|---|---|---|---|")
for s in servers:
    if not v[s]:
        print("| %s | n/a | | | | | |" % s)
        continue
    t, served, disk, cpu = (med(s, i) for i in range(4))
    print("| %s | %.2f | %.1f | %.2f | %.2f | %.1f | %.2f |" % (s, t, served / 2**30, disk / 2**30,
          disk / size, cpu, served / t / 1e9))
if "streamer" in servers and v["streamer"]:
    for s in servers:
        if s != "streamer" and v[s]:
            print("\nstreamer time / %s time: %.2f (lower is better)" % (s, med("streamer", 0) / med(s, 0)))
PYEOF
}

# ---------------------------------------------------------------- management under load

# iops_in_window LOG FROM_MS TO_MS: mean of fio's per-250 ms IOPS samples whose interval mostly
# lies in [FROM, TO] (milliseconds since fio started).
iops_in_window() {
    $PY - "$@" <<'PYEOF'
import sys
path, lo, hi = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
xs = []
for line in open(path):
    t, val = (float(f) for f in line.split(",")[:2])
    if t - 125 >= lo and t - 125 <= hi:
        xs.append(val)
print("%.0f %d" % (sum(xs) / len(xs), len(xs)) if xs else "nan 0")
PYEOF
}

# mgmt_cell ROUND ROW ACTIVITY: fio on the `load` clone; ACTIVITY (none, import, capture) starts
# 3 s in. Appends: round row activity iops_alone_or_during samples seconds MB/s.
mgmt_cell() {
    local round=$1 row=$2 act=$3 pre=$WORKDIR/iops-$1-$2-$3 fio_pid a0 a1 t0 rc=0 r bytes mbps
    rm -f "$pre"_iops.*.log
    t0=$(date +%s%N)
    # shellcheck disable=SC2046
    timeout $((RUNTIME + 60)) fio --name="$row" --ioengine=nbd --uri="$(node_uri load)" \
        $(row_fio_args "$row") --size="$SIZE" --time_based --runtime="$RUNTIME" \
        --write_iops_log="$pre" --log_avg_msec=250 --output=/dev/null &
    fio_pid=$!
    sleep 3
    a0=$(date +%s%N)
    case $act in
        none) sleep $((RUNTIME > 8 ? RUNTIME - 6 : 2)) ;;
        import) cli image import imported "$WORKDIR/import.raw" >/dev/null || rc=$? ;;
        capture) cli image capture captured --from src >/dev/null || rc=$? ;;
    esac
    a1=$(date +%s%N)
    wait "$fio_pid" || log "warning: fio failed in mgmt cell $round $row $act"
    [ "$rc" = 0 ] || log "warning: $act failed (exit $rc)"
    case $act in
        import) bytes=$(stat -c %s "$WORKDIR/import.raw"); cli image delete imported >/dev/null ;;
        capture) bytes=$(numfmt --from=iec "$SIZE"); cli image delete captured >/dev/null ;;
        *) bytes=0 ;;
    esac
    if [ $(((a1 - t0) / 1000000)) -gt $((RUNTIME * 1000)) ]; then
        log "warning: $act outlasted fio (--runtime $RUNTIME): only the overlap is measured"
    fi
    r=$(iops_in_window "$(ls "$pre"_iops.*.log | head -1)" $(((a0 - t0) / 1000000)) $(((a1 - t0) / 1000000)))
    mbps=$(awk -v b="$bytes" -v d=$((a1 - a0)) 'BEGIN { printf "%.0f", b / (d / 1e9) / 1e6 }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$row" "$act" "$r" \
        "$(awk -v d=$((a1 - a0)) 'BEGIN { printf "%.1f", d / 1e9 }')" "$mbps" | tr ' ' '\t' >> "$RESULTS"
    log "mgmt round $round $row $act: iops(samples)=$r over $(((a1 - a0) / 1000000)) ms, $mbps MB/s"
    # Evict the import source again so every import reads it from the disk.
    [ "$act" != import ] || dd if="$WORKDIR/import.raw" iflag=nocache count=0 status=none
}

mgmt_mode() {
    log "creating the import source ($IMPORT_SIZE of random data)"
    timeout 900 head -c "$(numfmt --from=iec "$IMPORT_SIZE")" /dev/urandom > "$WORKDIR/import.raw"
    sync "$WORKDIR/import.raw"
    dd if="$WORKDIR/import.raw" iflag=nocache count=0 status=none
    node_start
    cli volume create load --image golden >/dev/null
    cli volume create src --image golden >/dev/null
    timeout 600 fio --name=prefill --ioengine=nbd --uri="$(node_uri src)" --rw=write --bs=1M \
        --iodepth=8 --size="$SIZE" --end_fsync=1 --output=/dev/null
    warm_golden
    local round row act
    for ((round = 1; round <= ROUNDS; round++)); do
        for row in $ROWS; do
            for act in none import capture; do mgmt_cell "$round" "$row" "$act"; done
        done
    done
    node_stop
    $PY - "$RESULTS" "$ROWS" "$TITLES" <<'PYEOF'
import sys, statistics
from collections import defaultdict
path, rows, titles = sys.argv[1], sys.argv[2].split(), dict(t.split("=", 1) for t in sys.argv[3].split("|"))
v = defaultdict(list)
for line in open(path):
    rnd, row, act, iops, n, secs, mbps = line.split()
    if iops != "nan":
        v[(row, act)].append((float(iops), float(secs), float(mbps)))
med = lambda k, i: statistics.median(x[i] for x in v[k]) if v[k] else float("nan")
print("| fio on a clone | alone: iops | during import: iops (ratio) | import s, MB/s | during capture: iops (ratio) | capture s, MB/s |")
print("|---|---|---|---|---|---|")
for row in rows:
    base = med((row, "none"), 0)
    cells = ["%.0f" % base]
    for act in ("import", "capture"):
        i = med((row, act), 0)
        cells.append("%.0f (%.2f)" % (i, i / base))
        cells.append("%.1f s, %.0f MB/s" % (med((row, act), 1), med((row, act), 2)))
    print("| %s | %s |" % (titles[row], " | ".join(cells)))
PYEOF
}

# ---------------------------------------------------------------- main

print_header() {
    echo "# streamer $MODE benchmark"
    echo
    echo "- date: $(date -Is)"
    echo "- host: $(uname -sr), $(nproc) CPUs"
    echo "- fio: $(fio --version), ioengine=nbd, $ROUNDS rounds (medians)${RUNTIME:+, runtime ${RUNTIME}s per cell}"
    echo "- golden image: ${GOLDEN_SRC:-$SIZE of random data}, imported with \`streamer image import\`; transport: $([ "$MODE" = storm ] && echo unix || echo "$TRANSPORT")"
    echo "- versions: $(qemu-nbd --version 2>/dev/null | head -1); $(nbdkit --version 2>/dev/null)"
    echo "- streamer: \`$STREAMER serve --data-dir POOL ...\`, clones made with \`streamer volume create NAME --image golden\`"
    case " $SERVERS " in *" qemu-nbd "*)
        echo "- qemu-nbd: \`qemu-img create -f qcow2 -b GOLDEN -F raw overlay.qcow2\` then \`qemu-nbd -f qcow2 -t -e 8 --aio=io_uring --cache=writeback overlay.qcow2\`" ;;
    esac
    case " $SERVERS " in *" nbdkit "*)
        echo "- nbdkit: \`nbdkit -f --filter=cow file GOLDEN\`" ;;
    esac
    case $MODE in
        storm)
            if [ -n "$TRACE" ]; then
                echo "- storm: a real boot's reads ($TRACE: $(wc -l < "$TRACE") reads, $(awk '{s += $2} END {printf "%.1f MiB", s / 1048576}' "$TRACE")) replayed in order, one at a time, by 1 clone alone, then by $CLONES clones at once (one connection each, scripts/replay-trace.py), cold page cache"
            else
                echo "- storm: $CLONES clones read whole at once (fio rw=read bs=256k iodepth=2, one connection each), cold page cache"
            fi ;;
        mgmt) echo "- mgmt: import of a $IMPORT_SIZE raw file (cold cache) and capture of a written $SIZE clone, each starting 3 s into the fio run; node --bulk-rate ${BULK_RATE:-default}" ;;
    esac
}

cleanup() {
    local p
    node_stop
    [ -z "$SERVER_PID" ] || stop_pid "$SERVER_PID"
    for p in "${STORM_PIDS[@]}"; do
        [ "$p" = "$NODE_PID" ] || stop_pid "$p"
    done
    [ "${CLEAN_WORKDIR:-0}" = 0 ] || rm -rf "$WORKDIR"
}

main() {
    parse_args "$@"
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    make_workdir
    PORT=$(free_port)
    make_pool
    local header
    header=$(print_header)
    echo "$header" >&2
    # Not in $(...): the servers a mode starts must be visible to the EXIT trap.
    DROP_NOTE="page cache not dropped"
    case $MODE in
        clone) clone_mode > "$WORKDIR/table.md" ;;
        storm) storm_mode > "$WORKDIR/table.md"; header+=$'\n'"- $DROP_NOTE" ;;
        mgmt) mgmt_mode > "$WORKDIR/table.md" ;;
    esac
    local report
    report=$(printf '%s\n\n%s\n' "$header" "$(cat "$WORKDIR/table.md")")
    echo "$report"
    if [ -n "$OUT" ]; then echo "$report" > "$OUT"; fi
}

main "$@"
