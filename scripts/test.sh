#!/usr/bin/env bash
# Installs what the tests need (when missing) and runs every test: unit tests, and integration tests
# that start the real binary and drive it with nbdinfo, libnbd, qemu-io/qemu-img/qemu-nbd, nbdcopy,
# fio, and the kernel (ext4 on a loop device over nbdfuse). Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v nbdinfo >/dev/null || need_pkgs+=(libnbd-bin)
command -v nbdcopy >/dev/null || need_pkgs+=(libnbd-bin)
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need_pkgs+=(python3-libnbd)
command -v fio >/dev/null || need_pkgs+=(fio)
# qemu from bookworm-backports (10.x): extended headers (tests/clients.rs), and the guests
# booted under TCG (tests/guest.rs). Bookworm's own qemu-system-x86 (7.2) would replace a
# newer qemu-utils with its own, which speaks no extended headers.
need_bpo=()
command -v qemu-io >/dev/null || need_bpo+=(qemu-utils)
command -v qemu-system-x86_64 >/dev/null || need_bpo+=(qemu-system-x86 qemu-utils)
# The guests are built from Debian packages (scripts/guest-image.sh).
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
command -v nbdkit >/dev/null || need_pkgs+=(nbdkit)
# ext4 on a loop device over nbdfuse (tests/kernel_fs.rs); nbdfuse comes with libnbd-bin.
command -v nbdfuse >/dev/null || need_pkgs+=(libnbd-bin)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
command -v losetup >/dev/null || need_pkgs+=(mount)
# The least-privilege tests (tests/security.rs): the unit's sandbox score, and users switched
# with setpriv.
command -v systemd-analyze >/dev/null || need_pkgs+=(systemd)
command -v setpriv >/dev/null || need_pkgs+=(util-linux)
# A FUSE file system without fallocate for the pool (tests/pool.rs; skipped without /dev/fuse).
command -v bindfs >/dev/null || need_pkgs+=(bindfs)
# The pair (tests/pair.rs): protoc to build the etcd client, and an etcd of the tests' own.
command -v protoc >/dev/null || need_pkgs+=(protobuf-compiler)
command -v etcd >/dev/null || need_pkgs+=(etcd-server)
# Personalities' NoCloud seeds checked by real tools (tests/personality.rs).
command -v fsck.fat >/dev/null || need_pkgs+=(dosfstools)
command -v mtype >/dev/null || need_pkgs+=(mtools)
# Golden images with a CIDATA partition (tests/personality.rs).
command -v sfdisk >/dev/null || need_pkgs+=(fdisk)
# Link cuts in a network namespace of the test's own (tests/pair.rs).
command -v nft >/dev/null || need_pkgs+=(nftables)
command -v ip >/dev/null || need_pkgs+=(iproute2)
# cloud-init itself checks the seeds' documents (tests/personality.rs); without its
# recommendations, which would bring a network stack and services the tests do not need.
if ! command -v cloud-init >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends cloud-init
fi
if ((${#need_bpo[@]})); then
    echo "installing from bookworm-backports: ${need_bpo[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\n' \
            >/etc/apt/sources.list.d/bookworm-backports.sources
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -t bookworm-backports "${need_bpo[@]}"
fi
if ((${#need_pkgs[@]})); then
    echo "installing: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_pkgs[@]}"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace "$@" 2>&1 | tee "$log"
# One closing line for the whole run (cargo's own last line is the doc-test summary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
