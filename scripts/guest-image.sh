#!/usr/bin/env bash
# Builds the small Debian guests the VM tests boot (tests/guest.rs, issue 22), from Debian
# packages only:
#   OUT/plain.img   an ext4 root file system, the whole disk (root=/dev/vda)
#   OUT/gpt.img     a GPT disk: partition 1 the same root (root=/dev/vda1), partition 2 an
#                   empty FAT labelled CIDATA where streamer writes each clone's seed
#   OUT/vmlinuz, OUT/initrd.img   the guest's kernel and initramfs (booted with -kernel/-initrd)
# The guest runs cloud-init (NoCloud only), then a unit that prints one line to the serial
# console (STREAMER-REPORT host=... addrs=... cloud-init=...) and powers off: a boot test ends
# by itself. nbd-client and socat are there for the kernel-client test.
# Usage: scripts/guest-image.sh OUT   (root; about 2 minutes; does nothing if OUT is complete)
set -euo pipefail
out=${1:?usage: scripts/guest-image.sh OUT}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$out"
# The images are made again when this script changes.
version=$(sha256sum "$0" | cut -c1-16)
if [ "$(cat "$out/complete" 2>/dev/null)" = "$version" ]; then exit 0; fi
rm -f "$out/complete"
work=$(mktemp -d "$out/build.XXXXXX")
cleanup() {
    for m in proc sys dev/pts dev; do umount -l "$work/root/$m" 2>/dev/null || true; done
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
root=$work/root

# cloud-init in debootstrap's --include fails in its configure stage: a minimal system first,
# then the packages with apt inside it.
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log"; exit 1; }
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    linux-image-amd64 systemd-sysv udev cloud-init ifupdown iproute2 nbd-client socat \
    e2fsprogs util-linux >"$work/apt.log" 2>&1 || { tail -20 "$work/apt.log"; exit 1; }
rm -f "$root/usr/sbin/policy-rc.d"
chroot "$root" apt-get clean

# cloud-init: the NoCloud seed only (no waiting for metadata services), and what a system
# without locales or an SSH server needs for `cloud-init status` to end in `done`.
cat >"$root/etc/cloud/cloud.cfg.d/90-streamer-test.cfg" <<'EOF'
datasource_list: [NoCloud, None]
locale: C.UTF-8
ssh_genkeytypes: []
EOF
# The golden image has no identity of its own: cloud-init gives it one at first boot.
echo golden >"$root/etc/hostname"
: >"$root/etc/machine-id"
cat >"$root/etc/systemd/system/streamer-report.service" <<'EOF'
[Unit]
Description=Report the boot to the streamer test, then power off

# Not oneshot, and not ordered after cloud-final (which runs after multi-user.target): it
# starts with the system and waits for cloud-init itself.
[Service]
Type=simple
ExecStart=/usr/local/sbin/streamer-report

[Install]
WantedBy=multi-user.target
EOF
cat >"$root/usr/local/sbin/streamer-report" <<'EOF'
#!/bin/sh
# One line on the serial console for the test, then power off. With streamer.nbd=EXPORT on
# the kernel's command line, the kernel NBD client test instead.
if grep -q 'streamer.nbd=' /proc/cmdline; then exec /usr/local/sbin/streamer-nbd-test; fi
cloud-init status --wait >/dev/null 2>&1
addrs=$(ip -o -4 addr show scope global | awk '{printf "%s=%s ", $2, $4}')
status=$(cloud-init status 2>/dev/null | awk '{print $2}')
echo "STREAMER-REPORT host=$(hostname) addrs=$addrs cloud-init=$status" >/dev/ttyS0
systemctl poweroff
EOF
chmod +x "$root/usr/local/sbin/streamer-report"
cat >"$root/usr/local/sbin/streamer-nbd-test" <<'EOF'
#!/bin/sh
# The Linux kernel's NBD client against the streamer node, whose Unix socket is this guest's
# virtio-serial port `streamer` (tests/guest.rs): attach EXPORT, read it, write with O_DIRECT
# and read back, make an ext4 file system, mount it, write, unmount, fsck, detach. Each step
# that passes prints a STREAMER-NBD line on the serial console; then power off.
export=$(sed -n 's/.*streamer\.nbd=\([^ ]*\).*/\1/p' /proc/cmdline)
say() { echo "STREAMER-NBD $*" >/dev/ttyS0; }
end() { say "end $*"; systemctl poweroff; exit 0; }
modprobe nbd || end "no nbd module"
socat UNIX-LISTEN:/run/nbd.sock OPEN:/dev/virtio-ports/streamer &
for i in 1 2 3 4 5 6 7 8 9 10; do [ -S /run/nbd.sock ] && break; sleep 0.5; done
nbd-client -unix /run/nbd.sock /dev/nbd0 -name "$export" || end "nbd-client failed"
say "attached size=$(blockdev --getsize64 /dev/nbd0)"
dd if=/dev/nbd0 of=/dev/null bs=1M count=16 status=none && say read-ok
head -c 4194304 /dev/urandom >/tmp/pattern
dd if=/tmp/pattern of=/dev/nbd0 bs=1M seek=8 oflag=direct status=none &&
    dd if=/dev/nbd0 of=/tmp/back bs=1M skip=8 count=4 iflag=direct status=none &&
    cmp /tmp/pattern /tmp/back && say direct-ok
mkfs.ext4 -q -F /dev/nbd0 && mount /dev/nbd0 /mnt && cp /tmp/pattern /mnt/pattern && sync &&
    umount /mnt && say mkfs-mount-ok
fsck.ext4 -n -f /dev/nbd0 >/dev/null 2>&1 && say fsck-ok
mount /dev/nbd0 /mnt && cmp /tmp/pattern /mnt/pattern && umount /mnt && say reread-ok
nbd-client -d /dev/nbd0 >/dev/null 2>&1 && say detached
end done
EOF
chmod +x "$root/usr/local/sbin/streamer-nbd-test"
ln -sf /etc/systemd/system/streamer-report.service \
    "$root/etc/systemd/system/multi-user.target.wants/streamer-report.service"
cp "$root/boot/vmlinuz-"* "$work/vmlinuz"
cp "$root/boot/initrd.img-"* "$work/initrd.img"
for m in dev/pts dev sys proc; do umount "$root/$m"; done

# The root file system, made from the directory without mounting anything.
mb=$(( $(du -sm "$root" | cut -f1) * 13 / 10 + 64 ))
mkfs.ext4 -q -L root -d "$root" "$work/root.ext4" "${mb}M"
cp --sparse=always "$work/root.ext4" "$work/plain.img"

# The GPT variant: the same root in partition 1, an 8 MiB FAT labelled CIDATA in partition 2.
root_sectors=$(( mb * 2048 ))
cidata_start=$(( 2048 + root_sectors ))
truncate -s $(( (cidata_start + 16384 + 34) * 512 )) "$work/gpt.img"
printf 'label: gpt\nstart=2048, size=%d, type=linux, name=root\nstart=%d, size=16384, type=linux, name=CIDATA\n' \
    "$root_sectors" "$cidata_start" | sfdisk -q "$work/gpt.img"
dd if="$work/root.ext4" of="$work/gpt.img" bs=1M seek=1 conv=notrunc,sparse status=none
mkfs.vfat -n CIDATA -C "$work/cidata.fat" 8192 >/dev/null
dd if="$work/cidata.fat" of="$work/gpt.img" bs=512 seek="$cidata_start" conv=notrunc status=none

mv "$work/plain.img" "$work/gpt.img" "$work/vmlinuz" "$work/initrd.img" "$out/"
echo "$version" >"$out/complete"
echo "guest images in $out: $(du -sh --apparent-size "$out/plain.img" | cut -f1) root"
