#!/usr/bin/env bash
# Records the reads a real boot makes (the boot storm benchmark's workload): the guest of
# scripts/guest-image.sh boots under qemu (TCG) from a clone served by streamer, through an
# nbdkit proxy with its log filter, and every READ the guest made is written to OUT as
# "OFFSET LENGTH" lines, in order. The guest boots without a seed, reports and powers off.
# Usage: scripts/record-boot-trace.sh GUEST_DIR OUT [STREAMER]   (about 90 s)
set -euo pipefail
guest=${1:?usage: record-boot-trace.sh GUEST_DIR OUT [STREAMER]}
out=${2:?usage: record-boot-trace.sh GUEST_DIR OUT [STREAMER]}
streamer=${3:-target/release/streamer}
work=$(mktemp -d /var/tmp/streamer-trace.XXXXXX)
node=
proxy=
cleanup() {
    [ -z "$proxy" ] || kill "$proxy" 2>/dev/null || true
    [ -z "$node" ] || kill "$node" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
"$streamer" serve --create --data-dir "$work/pool" --socket "$work/nbd.sock" >"$work/node.log" 2>&1 &
node=$!
for _ in $(seq 100); do [ -S "$work/pool/streamer.sock" ] && break; sleep 0.1; done
cli() { "$streamer" "$@" --mgmt-socket "$work/pool/streamer.sock" >/dev/null; }
cli image import golden "$guest/plain.img" --format raw
cli volume create boot --image golden
nbdkit -f -U "$work/proxy.sock" --filter=log nbd socket="$work/nbd.sock" export=boot \
    logfile="$work/nbd.log" >"$work/nbdkit.log" 2>&1 &
proxy=$!
for _ in $(seq 100); do [ -S "$work/proxy.sock" ] && break; sleep 0.1; done
timeout -k 5 400 qemu-system-x86_64 -m 512 -smp 1 -display none -no-reboot -nic none \
    -serial "file:$work/console.log" -kernel "$guest/vmlinuz" -initrd "$guest/initrd.img" \
    -append "console=ttyS0 root=/dev/vda rw quiet modprobe.blacklist=floppy" \
    -drive "file=nbd+unix:///?socket=$work/proxy.sock,format=raw,if=virtio"
grep -q STREAMER-REPORT "$work/console.log" || { tail -20 "$work/console.log" >&2; exit 1; }
# nbdkit's log filter: "... Read id=N offset=0x... count=0x... ..."
sed -n 's/.* Read id=[0-9]* offset=\(0x[0-9a-f]*\) count=\(0x[0-9a-f]*\).*/\1 \2/p' "$work/nbd.log" |
    while read -r off len; do echo "$((off)) $((len))"; done >"$out"
echo "$(wc -l <"$out") reads, $(awk '{s += $2} END {printf "%.1f MiB", s / 1048576}' "$out") recorded in $out"
