#!/usr/bin/env bash
# Benchmark streamer against qemu-nbd and nbdkit (file plugin) with fio's nbd
# engine.  All servers serve the same raw file with the same cache mode; the
# cells are interleaved (for round, for row, for server) so that drift in the
# machine's state affects every server alike.  Prints a markdown table of
# medians over the rounds and the ratios streamer/qemu-nbd, streamer/nbdkit.
#
# Each cell starts its server, waits until it accepts NBD connections,
# samples the server's CPU time (/proc/PID/stat utime+stime, all threads,
# including io_uring workers), runs fio, samples again and stops the server
# (SIGTERM, then SIGKILL after 5 s).  Restarting per cell keeps the cells
# independent and avoids two qemu-nbd processes holding image locks on the
# same file.  There is no fio ramp time, so fio's I/O count and the CPU
# sample cover the same period (connection setup included, negligible).
#
# For trustworthy numbers the machine should be otherwise idle; one could
# check that first by sampling the idle jiffies in /proc/stat over a second
# (not implemented).  On a 2-core machine fio and the server share the CPUs.
#
# usage: scripts/bench.sh [--cache direct|buffered] [--rounds N] [--runtime S]
#          [--size SIZE] [--streamer PATH] [--out FILE] [--image FILE]
#          [--servers LIST] [--rows LIST] [--transports LIST] [--dir DIR]
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"

CACHE=buffered
ROUNDS=3
RUNTIME=5
SIZE=1G
STREAMER=target/release/streamer
OUT=
IMAGE=            # existing file to use instead of creating one
SERVERS="streamer,qemu-nbd,nbdkit"
ROWS="rr1,rr32,rw32,sr8,sw8,rr2c"
TRANSPORTS="tcp,unix"
WORKDIR=
EXPORT=bench
DEVICE=1          # direct mode: also measure the device itself (--no-device: skip)
TITLES="rr1=4k randread QD1|rr32=4k randread QD32|rw32=4k randwrite QD32|sr8=1MiB seq read QD8|sw8=1MiB seq write QD8|rr2c=4k randread 2 conns x QD16"


usage() {
    cat <<EOF
usage: $0 [--mode nbd|clone|storm|mgmt|pair] [options]
  --mode MODE              nbd (default): raw-file exports, options below;
                           clone, storm, mgmt: see scripts/bench-clone.sh --help;
                           pair: mirrored vs single node, see scripts/bench-pair.sh --help
  --cache direct|buffered  server cache mode (default $CACHE)
  --rounds N               rounds, cells alternate servers (default $ROUNDS)
  --runtime SECS           fio runtime per cell (default $RUNTIME)
  --size SIZE              raw file size, e.g. 1G, 256M (default $SIZE)
  --streamer PATH          streamer binary (default $STREAMER)
  --out FILE               also write the report to FILE
  --image FILE             use this existing raw file (not deleted; it is written to!)
  --servers LIST           subset of $SERVERS (comma separated)
  --rows LIST              subset of $ROWS
  --transports LIST        subset of $TRANSPORTS
  --dir DIR                work directory (default: mktemp -d under /var/tmp)
  --no-device              direct mode: skip the device ceiling cells (fio io_uring
                           O_DIRECT on the image itself, interleaved with the servers)
rows: rr1 4k randread QD1, rr32 4k randread QD32, rw32 4k randwrite QD32,
      sr8 1MiB seq read QD8, sw8 1MiB seq write QD8,
      rr2c 4k randread, 2 connections x QD16
EOF
}

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --cache) CACHE=$2; shift ;;
            --rounds) ROUNDS=$2; shift ;;
            --runtime) RUNTIME=$2; shift ;;
            --size) SIZE=$2; shift ;;
            --streamer) STREAMER=$2; shift ;;
            --out) OUT=$2; shift ;;
            --image) IMAGE=$2; shift ;;
            --servers) SERVERS=$2; shift ;;
            --rows) ROWS=$2; shift ;;
            --transports) TRANSPORTS=$2; shift ;;
            --dir) WORKDIR=$2; shift ;;
            --no-device) DEVICE=0 ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown option $1" ;;
        esac
        shift
    done
    case "$CACHE" in direct|buffered) ;; *) die "--cache must be direct or buffered" ;; esac
    [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "bad --rounds"
    [[ "$RUNTIME" =~ ^[1-9][0-9]*$ ]] || die "bad --runtime"
    SERVERS=${SERVERS//,/ }; ROWS=${ROWS//,/ }; TRANSPORTS=${TRANSPORTS//,/ }
    local x
    for x in $ROWS; do row_title "$x" >/dev/null; done
    for x in $TRANSPORTS; do
        case $x in tcp|unix) ;; *) die "unknown transport $x" ;; esac
    done
}

# ---------------------------------------------------------------- setup

check_tools() {
    local t
    for t in fio nbdinfo timeout numfmt; do
        command -v "$t" >/dev/null || die "$t not found"
    done
    [ -x "$PY" ] || die "$PY not found"
    for t in $SERVERS; do
        case $t in
            streamer) [ -x "$STREAMER" ] || die "streamer binary $STREAMER not found (use --streamer or --servers)" ;;
            qemu-nbd) command -v qemu-nbd >/dev/null || die "qemu-nbd not found" ;;
            nbdkit) command -v nbdkit >/dev/null || die "nbdkit not found" ;;
            *) die "unknown server $t" ;;
        esac
    done
    fio --enghelp=nbd >/dev/null 2>&1 || die "fio has no nbd engine"
}

setup_workdir() {
    make_workdir
    PORT_streamer=$(free_port); PORT_qemu_nbd=$(free_port); PORT_nbdkit=$(free_port)
}

create_image() {
    if [ -n "$IMAGE" ]; then
        [ -f "$IMAGE" ] || die "--image $IMAGE does not exist"
        IMG=$IMAGE
        return
    fi
    IMG=$WORKDIR/disk.raw
    local bytes
    bytes=$(numfmt --from=iec "$SIZE") || die "bad --size $SIZE"
    log "creating $IMG ($bytes bytes of random data, so reads are not holes)"
    timeout 600 head -c "$bytes" /dev/urandom > "$IMG"
    sync "$IMG"
}

# Buffered mode: keep the whole file resident (vmtouch -l daemon) so reads
# measure the servers, not the disk.  Direct mode: evict it.
prepare_cache() {
    CACHE_NOTE="page cache: not managed (vmtouch not installed)"
    command -v vmtouch >/dev/null || return 0
    if [ "$CACHE" = buffered ]; then
        if timeout 120 vmtouch -q -m 1000G -l -d -w -P "$WORKDIR/vmtouch.pid" "$IMG" >/dev/null 2>&1 \
            && [ -s "$WORKDIR/vmtouch.pid" ]; then
            VMTOUCH_PID=$(cat "$WORKDIR/vmtouch.pid")
            CACHE_NOTE="page cache: file locked in memory (vmtouch -l, pid $VMTOUCH_PID)"
        else
            timeout 120 vmtouch -q -m 1000G -t "$IMG" || true
            CACHE_NOTE="page cache: vmtouch -l failed (RLIMIT_MEMLOCK?); file touched (vmtouch -t) only"
        fi
    else
        timeout 120 vmtouch -q -m 1000G -e "$IMG" || true
        CACHE_NOTE="page cache: file evicted before the run (vmtouch -e)"
    fi
}

# nbdkit's file plugin: cache=none if this version knows it.  Note that it
# is not O_DIRECT: nbdkit evicts pages after each request instead.
nbdkit_cache_arg() {
    if [ "$CACHE" = direct ]; then
        if nbdkit file --help 2>&1 | grep -q '^cache='; then
            echo "cache=none"
        fi
    fi
}

# ---------------------------------------------------------------- servers

sock_path() { echo "$WORKDIR/$1.sock"; }

# server_cmd SERVER TRANSPORT: print the command line, one word per line.
server_cmd() {
    local srv=$1 tr=$2
    case $srv in
        streamer)
            printf '%s\n' "$STREAMER" serve
            if [ "$tr" = tcp ]; then printf '%s\n' --listen "127.0.0.1:$PORT_streamer"
            else printf '%s\n' --socket "$(sock_path streamer)"; fi
            printf '%s\n' --export "$EXPORT=$IMG" --cache "$CACHE" ;;
        qemu-nbd)
            printf '%s\n' qemu-nbd -f raw -x "$EXPORT"
            if [ "$tr" = tcp ]; then printf '%s\n' -b 127.0.0.1 -p "$PORT_qemu_nbd"
            else printf '%s\n' -k "$(sock_path qemu-nbd)"; fi
            printf '%s\n' -t -e 8 --aio=io_uring
            if [ "$CACHE" = direct ]; then echo --cache=none; else echo --cache=writeback; fi
            echo "$IMG" ;;
        nbdkit)
            printf '%s\n' nbdkit --exit-with-parent -f
            if [ "$tr" = tcp ]; then printf '%s\n' -i 127.0.0.1 -p "$PORT_nbdkit"
            else printf '%s\n' -U "$(sock_path nbdkit)"; fi
            printf '%s\n' file "$IMG"
            [ -z "$NBDKIT_CACHE" ] || echo "$NBDKIT_CACHE" ;;
    esac
}

server_uri() {
    local srv=$1 tr=$2 var=PORT_${1//-/_}
    if [ "$tr" = tcp ]; then echo "nbd://127.0.0.1:${!var}/$EXPORT"
    else echo "nbd+unix:///$EXPORT?socket=$(sock_path "$srv")"; fi
}

SERVER_PID=
start_server() {
    local srv=$1 tr=$2 ready=
    local -a cmd
    mapfile -t cmd < <(server_cmd "$srv" "$tr")
    rm -f "$(sock_path "$srv")"
    SERVER_LOG=$WORKDIR/$srv-$tr.log
    "${cmd[@]}" > "$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    # Ready when it answers an NBD handshake (streamer also prints "ready").
    [ "$srv" != streamer ] || ready=ready
    wait_nbd "$SERVER_PID" "$SERVER_LOG" "$(server_uri "$srv" "$tr")" $ready
}

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    local rc
    stop_pid "$SERVER_PID"; rc=$STOP_RC
    SERVER_PID=
    # streamer must exit 0 on SIGTERM (qemu-nbd/nbdkit exit non-zero or 0).
    if [ "${1:-}" = streamer ] && [ "$rc" != 0 ]; then
        log "warning: streamer exited with status $rc after SIGTERM"
    fi
}

cleanup() {
    stop_server
    if [ -n "${VMTOUCH_PID:-}" ]; then kill "$VMTOUCH_PID" 2>/dev/null || true; fi
    if [ "${CLEAN_WORKDIR:-0}" = 1 ]; then rm -rf "$WORKDIR"; fi
}

# ---------------------------------------------------------------- fio

row_fio_args() {
    case $1 in
        rr1) echo --rw=randread --bs=4k --iodepth=1 --numjobs=1 ;;
        rr32) echo --rw=randread --bs=4k --iodepth=32 --numjobs=1 ;;
        rw32) echo --rw=randwrite --bs=4k --iodepth=32 --numjobs=1 ;;
        sr8) echo --rw=read --bs=1M --iodepth=8 --numjobs=1 ;;
        sw8) echo --rw=write --bs=1M --iodepth=8 --numjobs=1 ;;
        rr2c) echo --rw=randread --bs=4k --iodepth=16 --numjobs=2 ;;  # one NBD connection per job
    esac
}

# Direct mode: the same row run by fio on the image itself (io_uring, O_DIRECT, no server and
# no network), interleaved with the server cells. It is the device's ceiling for that access
# pattern at that moment: no server can serve more than the disk delivers.
device_cell() {
    local round=$1 row=$2 json m iops mbps latm lat50 ios
    json=$WORKDIR/fio-$round-$row-device.json
    # shellcheck disable=SC2046
    if ! timeout $((RUNTIME + 60)) fio --name="$row" --ioengine=io_uring --direct=1 \
            --filename="$IMG" $(row_fio_args "$row") --group_reporting --time_based \
            --runtime="$RUNTIME" --lat_percentiles=1 --output-format=json --output="$json" \
            > "$json.stdout" 2>&1; then
        log "warning: device fio failed for round $round $row: $(tail -3 "$json.stdout" | tr '\n' ' ')"
        return 0
    fi
    if ! m=$(parse_fio "$json" 2>&1); then
        log "warning: round $round $row device: $m"
        return 0
    fi
    read -r iops mbps latm lat50 ios _ <<< "$m"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$row" local device \
        "$iops" "$mbps" "$latm" "$lat50" nan "$ios" >> "$RESULTS"
    log "round $round $(row_title "$row") device (local fio io_uring O_DIRECT): iops=$iops MB/s=$mbps lat=${latm}us"
}

# The device table: each server's median as a share of the device's median for the row.
print_device_table() {
    $PY - "$RESULTS" "$SERVERS" "$ROWS" "$TRANSPORTS" "$TITLES" "sr8 sw8" <<'PYEOF'
import sys, statistics
from collections import defaultdict
path, servers, rows, transports, titles, mb_rows = sys.argv[1:7]
servers, rows, transports = servers.split(), rows.split(), transports.split()
titles = dict(t.split("=", 1) for t in titles.split("|"))
vals = defaultdict(list)
for line in open(path):
    rnd, row, tr, srv, iops, mbps, *_ = line.rstrip("\n").split("\t")
    vals[(row, tr, srv)].append(float(mbps if row in mb_rows.split() else iops))
med = lambda k: statistics.median(vals[k]) if vals.get(k) else None
cols = [(s, t) for s in servers for t in transports]
hdr = ["test", "metric", "device"] + ["%s %s" % c for c in cols]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for row in rows:
    dev = med((row, "local", "device"))
    cells = []
    for s, t in cols:
        v = med((row, t, s))
        cells.append("%.0f%%" % (100 * v / dev) if v is not None and dev else "n/a")
    metric = "MB/s" if row in mb_rows.split() else "iops"
    print("| " + " | ".join([titles[row], metric, "%.0f" % dev if dev else "n/a"] + cells) + " |")
print()
print("device: fio io_uring O_DIRECT on the image itself, same pattern, no server; the other"
      " columns are each server's median as a share of it.")
PYEOF
}

run_cell() {
    local round=$1 row=$2 tr=$3 srv=$4
    # Write back what earlier cells left dirty, so the kernel's flusher does not write it (with
    # the CPU and the disk) during this cell: a buffered 4k write cell dirties the whole image,
    # and its writeback, 30 s later, used to land in some other server's cell.
    timeout 300 sync "$IMG" || log "warning: sync of $IMG failed before round $round $row $tr $srv"
    start_server "$srv" "$tr"
    fio_cell "$round" "$row" "$tr" "$srv" "$(server_uri "$srv" "$tr")" "$SERVER_PID" stop_server
}

# ---------------------------------------------------------------- report

print_header() {
    local srv tr
    echo "# streamer benchmark"
    echo
    echo "- date: $(date -Is)"
    echo "- host: $(uname -sr), $(nproc) CPUs, CLK_TCK=$CLK_TCK"
    echo "- fio: $(fio --version), ioengine=nbd, runtime ${RUNTIME}s per cell, $ROUNDS rounds (medians), no ramp"
    echo "- image: $IMG ($(stat -c %s "$IMG") bytes, random data)"
    echo "- cache mode: $CACHE; $CACHE_NOTE; dirty pages written back (sync) before every cell"
    [ -z "${NBDKIT_NOTE:-}" ] || echo "- note: $NBDKIT_NOTE"
    [ "$CACHE" != direct ] || [ -z "$NBDKIT_CACHE" ] || \
        echo "- note: nbdkit cache=none is not O_DIRECT (it drops pages after each request)"
    echo "- versions: $(qemu-nbd --version 2>/dev/null | head -1); $(nbdkit --version 2>/dev/null)"
    echo "- server command lines (a fresh server per cell):"
    for srv in $SERVERS; do
        for tr in $TRANSPORTS; do
            echo "  - \`$(server_cmd "$srv" "$tr" | tr '\n' ' ' | sed 's/ $//')\`"
        done
    done
    echo
}

# ---------------------------------------------------------------- main

main() {
    # The pool modes live in their own script; this one is the raw-file mode.
    if [ "${1:-}" = --mode ]; then
        case "${2:-}" in
            nbd) shift 2 ;;
            clone|storm|mgmt) exec "$(dirname "$0")/bench-clone.sh" "$@" ;;
            pair) shift 2; exec "$(dirname "$0")/bench-pair.sh" "$@" ;;
            *) die "--mode must be nbd, clone, storm, mgmt or pair" ;;
        esac
    fi
    parse_args "$@"
    check_tools
    CLK_TCK=$(getconf CLK_TCK)
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    setup_workdir
    create_image
    NBDKIT_NOTE=
    NBDKIT_CACHE=$(nbdkit_cache_arg)
    if [ "$CACHE" = direct ] && [ -z "$NBDKIT_CACHE" ]; then
        NBDKIT_NOTE="nbdkit file plugin has no cache= parameter: using its default (page cache)"
    fi
    prepare_cache

    local header round row tr srv
    header=$(print_header)
    echo "$header" >&2
    for ((round = 1; round <= ROUNDS; round++)); do
        for row in $ROWS; do
            [ "$CACHE" != direct ] || [ "$DEVICE" = 0 ] || device_cell "$round" "$row"
            for tr in $TRANSPORTS; do
                for srv in $SERVERS; do
                    run_cell "$round" "$row" "$tr" "$srv"
                done
            done
        done
    done

    local report
    report=$(printf '%s\n\n%s\n' "$header" "$(print_table "$RESULTS" "$SERVERS" "$ROWS" "$TRANSPORTS" "$TITLES" "sr8 sw8" "rr1")")
    if [ "$CACHE" = direct ] && [ "$DEVICE" != 0 ]; then
        report=$(printf '%s\n\nDevice ceiling (direct mode):\n\n%s\n' "$report" "$(print_device_table)")
    fi
    echo "$report"
    if [ -n "$OUT" ]; then echo "$report" > "$OUT"; fi
}

main "$@"
