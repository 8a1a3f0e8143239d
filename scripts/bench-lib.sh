# Helpers shared by scripts/bench.sh (raw-file mode) and scripts/bench-clone.sh (clone, storm and
# mgmt modes). Sourced, not run.

PY=/usr/bin/python3

die() { echo "bench: $*" >&2; exit 1; }
log() { echo "# $*" >&2; }

# make_workdir: WORKDIR (a fresh one under /var/tmp unless --dir gave one; CLEAN_WORKDIR=1 then,
# for the cleanup to remove) and an empty RESULTS file in it.
make_workdir() {
    if [ -z "$WORKDIR" ]; then
        WORKDIR=$(mktemp -d /var/tmp/streamer-bench.XXXXXX)
        CLEAN_WORKDIR=1
    fi
    mkdir -p "$WORKDIR"
    RESULTS=$WORKDIR/results.tsv
    : > "$RESULTS"
}

free_port() {
    $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Server CPU time in clock ticks (utime+stime of all threads, io_uring workers included). The
# command name may contain spaces, so split after the last ')': fields after it start at field 3,
# so utime/stime (fields 14 and 15) are words 12 and 13.
cpu_ticks() {
    local stat
    stat=$(< "/proc/$1/stat")
    stat=${stat##*) }
    awk '{ print $12 + $13 }' <<< "$stat"
}

# Sum of cpu_ticks over several PIDs.
cpu_ticks_sum() {
    local p t=0
    for p in "$@"; do t=$((t + $(cpu_ticks "$p"))); done
    echo "$t"
}

# Jiffies of all CPUs since boot, and of them the ones stolen by the hypervisor (/proc/stat).
cpu_steal() {
    awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $9; exit }' /proc/stat
}

# Percentage of the machine's CPU time stolen between two cpu_steal samples.
steal_pct() {
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ");
        printf "%.1f", (y[1] > x[1] ? 100 * (y[2] - x[2]) / (y[1] - x[1]) : 0) }'
}

# Ticks spent over N I/Os, as microseconds per I/O.
us_per_io() {
    awk -v d="$1" -v hz="$(getconf CLK_TCK)" -v n="$2" 'BEGIN { printf "%.2f", (n > 0 ? d * 1e6 / hz / n : 0) }'
}

# stop_pid PID: SIGTERM, then SIGKILL after 5 s; reaps it and leaves its exit status in STOP_RC.
# Not to be called in $(...): a subshell cannot reap its parent's children.
stop_pid() {
    local pid=$1 i rc=0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "warning: pid $pid did not exit on SIGTERM, killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    STOP_RC=$rc
}

# wait_nbd PID LOG URI [READY_LINE]: until URI answers an NBD handshake (and, for streamer, LOG
# has the line "ready"); fails if PID exits or 10 s pass.
wait_nbd() {
    local pid=$1 logf=$2 uri=$3 ready=${4:-} i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || { cat "$logf" >&2; die "server $pid exited during startup"; }
        if [ -z "$ready" ] || grep -qx "$ready" "$logf"; then
            timeout 2 nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
        fi
        sleep 0.1
    done
    cat "$logf" >&2
    die "server $pid not ready after 10 s ($uri)"
}

# row_title ROW: the row's title from TITLES ("row=title|row=title").
row_title() {
    local t
    t=$(tr '|' '\n' <<< "$TITLES" | sed -n "s/^$1=//p")
    [ -n "$t" ] || die "unknown row $1"
    echo "$t"
}

# Extract metrics from fio JSON: iops MB/s lat_mean_us lat_median_us ios bytes
parse_fio() {
    $PY - "$1" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
jobs = d["jobs"]
for j in jobs:
    if j.get("error"):
        sys.exit("fio job error %s" % j["error"])
r = {k: sum(j["read"][k] for j in jobs) for k in ("iops", "bw_bytes", "total_ios", "io_bytes")}
w = {k: sum(j["write"][k] for j in jobs) for k in ("iops", "bw_bytes", "total_ios", "io_bytes")}
ios = r["total_ios"] + w["total_ios"]
if ios == 0:
    sys.exit("fio did no I/O")
j = jobs[0]                 # latency: first job (one aggregated job with --group_reporting)
lat = (j["read"] if j["read"]["total_ios"] >= j["write"]["total_ios"] else j["write"])["lat_ns"]
p50 = lat.get("percentile", {}).get("50.000000", float("nan"))
print("%.1f %.1f %.2f %.2f %d %d" % (r["iops"] + w["iops"],
      (r["bw_bytes"] + w["bw_bytes"]) / 1e6, lat["mean"] / 1e3, p50 / 1e3, ios,
      r["io_bytes"] + w["io_bytes"]))
PYEOF
}

# fio_cell ROUND ROW TRANSPORT SERVER URI PID STOP [FIO_ARGS...]: runs fio on URI for $RUNTIME
# seconds with the row's arguments (row_fio_args, from the calling script) and FIO_ARGS, samples
# the CPU time of PID around it, calls `STOP SERVER`, and appends the cell to $RESULTS (see
# print_table). A failed cell is logged and left out.
fio_cell() {
    local round=$1 row=$2 tr=$3 srv=$4 uri=$5 pid=$6 stop=$7 json t0 t1 s0 s1 m iops mbps latm lat50 ios cpu steal
    shift 7
    json=$WORKDIR/fio-$round-$row-$tr-$srv.json
    s0=$(cpu_steal)
    # PID may be a comma-separated list (a pair: both nodes' CPU counts).
    t0=$(cpu_ticks_sum ${pid//,/ })
    # shellcheck disable=SC2046
    if ! timeout $((RUNTIME + 60)) fio --name="$row" --ioengine=nbd --uri="$uri" \
            $(row_fio_args "$row") "$@" --group_reporting --time_based --runtime="$RUNTIME" \
            --lat_percentiles=1 --output-format=json --output="$json" \
            > "$json.stdout" 2>&1; then
        "$stop" "$srv"
        log "warning: fio failed for round $round $row $tr $srv: $(tail -3 "$json.stdout" | tr '\n' ' ')"
        return 0
    fi
    t1=$(cpu_ticks_sum ${pid//,/ } 2>/dev/null) || t1=
    s1=$(cpu_steal)
    "$stop" "$srv"
    if [ -z "$t1" ]; then
        log "warning: round $round $row $tr $srv: server died during the run"
        return 0
    fi
    if ! m=$(parse_fio "$json" 2>&1); then
        log "warning: round $round $row $tr $srv: $m"
        return 0
    fi
    read -r iops mbps latm lat50 ios _ <<< "$m"
    cpu=$(us_per_io $((t1 - t0)) "$ios")
    steal=$(steal_pct "$s0" "$s1")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$row" "$tr" "$srv" \
        "$iops" "$mbps" "$latm" "$lat50" "$cpu" "$ios" "$steal" >> "$RESULTS"
    log "round $round $(row_title "$row") $tr $srv: iops=$iops MB/s=$mbps lat=${latm}us p50=${lat50}us cpu/io=${cpu}us steal=${steal}%"
}

# print_table RESULTS "SERVERS" "ROWS" "TRANSPORTS" TITLES MB_ROWS LAT_ROWS
# RESULTS lines: round row transport server iops MB/s lat_mean lat_p50 cpu_us_per_io ios.
# TITLES is "row=title|row=title"; MB_ROWS and LAT_ROWS are space-separated rows reported in MB/s
# and with latency. Prints a markdown table of medians and streamer's ratios to the others.
print_table() {
    $PY - "$@" <<'PYEOF'
import sys, statistics
from collections import defaultdict
path, servers, rows, transports, titles, mb_rows, lat_rows = sys.argv[1:8]
servers, rows, transports = servers.split(), rows.split(), transports.split()
titles = dict(t.split("=", 1) for t in titles.split("|"))
mb_rows, lat_rows = set(mb_rows.split()), set(lat_rows.split())
cols = {"iops": 0, "MB/s": 1, "lat mean us": 2, "lat median us": 3, "CPU us/IO": 4}
vals = defaultdict(list)
by_round = {}
steals = []
for line in open(path):
    rnd, row, tr, srv, *m = line.rstrip("\n").split("\t")
    for name, i in cols.items():
        vals[(row, tr, srv, name)].append(float(m[i]))
        by_round[(rnd, row, tr, srv, name)] = float(m[i])
    if len(m) > 6 and m[6] not in ("", "nan"):
        steals.append((float(m[6]), "round %s %s %s %s" % (rnd, row, tr, srv)))
rounds = sorted({k[0] for k in by_round}, key=int)

# The cells of one round ran minutes apart at most, the rounds themselves up to an hour apart:
# a ratio within a round compares the servers under the same conditions, a ratio of medians
# may pair one server's fast round with another's slow one. So the ratio is the median of the
# per-round ratios, with their range.
def ratio(row, tr, name, a, b):
    rs = []
    for r in rounds:
        x, y = by_round.get((r, row, tr, a, name)), by_round.get((r, row, tr, b, name))
        if x is not None and y and x == x and y == y:
            rs.append(x / y)
    if not rs:
        return "n/a"
    if len(rs) == 1:
        return "%.2f" % rs[0]
    return "%.2f (%.2f-%.2f)" % (statistics.median(rs), min(rs), max(rs))

def med(k):
    v = [x for x in vals.get(k, []) if x == x]
    return statistics.median(v) if v else None

def fmt(x):
    if x is None:
        return "n/a"
    return "%.0f" % x if x >= 1000 else "%.3g" % x

import os
ref = os.environ.get("BENCH_REF", "streamer")
refs = [s for s in servers if s != ref] if ref in servers else []
hdr = ["test", "transport", "metric"] + servers + ["%s/%s" % (ref, r) for r in refs]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for row in rows:
    metrics = ["MB/s" if row in mb_rows else "iops"]
    if row in lat_rows:
        metrics += ["lat mean us", "lat median us"]
    metrics.append("CPU us/IO")
    for tr in transports:
        for name in metrics:
            m = {s: med((row, tr, s, name)) for s in servers}
            cells = [fmt(m[s]) for s in servers]
            for r in refs:
                cells.append(ratio(row, tr, name, ref, r))
            print("| " + " | ".join([titles[row], tr, name] + cells) + " |")
print()
print("iops/MB/s: higher is better; latency and CPU us/IO (server utime+stime"
      " per I/O): lower is better. Server columns are medians over the rounds; ratios are"
      " %s / other within each round, their median (and range over the rounds)." % ref)
# On a virtual machine the host may take CPU time away in the middle of a cell ("steal" in
# /proc/stat); such a cell measures the host, not the server. Say how much there was.
if steals:
    worst = max(steals)
    print()
    print("CPU stolen by the hypervisor during the cells: median %.1f%%, highest %.1f%% (%s);"
          " %d of %d cells above 5%%." % (statistics.median(s for s, _ in steals), worst[0],
                                          worst[1], sum(s > 5 for s, _ in steals), len(steals)))
PYEOF
}
