#!/usr/bin/env bash
# The README's management walkthrough, run for real: a fresh node in a temporary directory, a
# golden image made here (64 MiB of fixed bytes, as a qcow2), then the README's commands. Prints
# the transcript ("$ command" lines and their output) with what changes from run to run (pid,
# uptime, seconds, the file system's size) replaced by a fixed word, so that tests/walkthrough.rs
# can require the README to hold exactly this. Usage: scripts/walkthrough.sh [STREAMER]
# (default target/debug/streamer). Needs qemu-img, qemu-io, nbdcopy, qemu-nbd, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
streamer=$(realpath "${1:-target/debug/streamer}")
work=$(mktemp -d)
node_pid=
cleanup() {
    [[ -n $node_pid ]] && kill "$node_pid" 2>/dev/null && wait "$node_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
mkdir bin && ln -s "$streamer" bin/streamer
export PATH=$work/bin:$PATH

# The golden image: 64 MiB, its first 16 MiB fixed bytes and the rest zeroes, as a qcow2.
/usr/bin/python3 - <<'EOF'
import hashlib
with open("golden.raw", "wb") as f:
    block = b""
    for i in range(16 * 256):
        block = hashlib.sha256(block + i.to_bytes(4, "little")).digest() * 128
        f.write(block)
    f.truncate(64 << 20)
EOF
qemu-img convert -q -f raw -O qcow2 golden.raw golden.qcow2
rm golden.raw

"$streamer" serve --data-dir streamer-data --create --listen 127.0.0.1:0 > node.out 2> node.log &
node_pid=$!
for _ in $(seq 100); do grep -q '^ready$' node.out 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^listening tcp //p' node.out)
if ! grep -q '^ready$' node.out || [[ -z $addr ]]; then
    echo "walkthrough.sh: the node did not start:" >&2
    cat node.log >&2
    exit 1
fi
export STREAMER_DATA_DIR=streamer-data

# Each step: the command as the README shows it (the node's address as 127.0.0.1:10809), then
# its output, normalised.
step() {
    local shown="" a
    for a in "$@"; do
        [[ $a == *" "* ]] && a="\"$a\""
        shown+="${shown:+ }${a//$addr/127.0.0.1:10809}"
    done
    echo "\$ $shown"
    "$@" 2>&1 | sed -E \
        -e "s/\(pid [0-9]+\)/(pid PID)/" \
        -e "s/^(uptime: +)[0-9]+s/\1Ns/" \
        -e "s/; file system .*/; file system .../" \
        -e "s/^(generation: +)[0-9a-f]{32}$/\1(random)/" \
        -e "s#$addr#127.0.0.1:10809#g" \
        -e "s/ for [0-9]+s, / for Ns, /" \
        -e "/ ops; [0-9.]+ sec /d" || true
}

step streamer image import debian-12 golden.qcow2
step streamer volume create web-1 --image debian-12
step streamer volume create scratch --size 10G
step streamer volume list
step qemu-io -f raw -c "write -P 0x17 1M 256k" "nbd://$addr/web-1"
step streamer volume show web-1
step streamer image capture debian-12-web --from web-1
step streamer image list
step streamer image delete debian-12
step streamer volume resize scratch 20G
step streamer volume delete scratch
step streamer status
step streamer check
