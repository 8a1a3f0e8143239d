//! The Linux kernel as a client, without the nbd module: `nbdfuse` exposes an export as a file,
//! a loop device turns that file into a block device, and ext4 runs on it. Writes go through the
//! page cache, the block layer, FUSE and libnbd (several connections, FLUSH on sync); the file
//! system is checked with `fsck`, and read back after the server restarts in the other cache mode.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// An export attached as a kernel block device: nbdfuse's file under `fuse`, the loop device on
/// it, and the file system mounted at `mnt` once `mount` is called. Dropping it takes each layer
/// down in reverse order, so a failing test leaves no mount or loop device behind.
struct KernelDisk {
    fuse: PathBuf,
    nbdfuse: Child,
    loop_dev: String,
    mnt: Option<PathBuf>,
}

impl KernelDisk {
    /// Attaches `uri`, or says why this machine cannot (no FUSE device, no loop devices).
    fn attach(dir: &Scratch, uri: &str) -> Result<KernelDisk, String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("no /dev/fuse".into());
        }
        let fuse = dir.path("fuse");
        std::fs::create_dir_all(&fuse).unwrap();
        let file = fuse.join("nbd");
        let nbdfuse = Command::new("nbdfuse")
            .arg(&file)
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running nbdfuse: {e}"))?;
        let mut disk = KernelDisk {
            fuse,
            nbdfuse,
            loop_dev: String::new(),
            mnt: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !file.exists() {
            if let Some(status) = disk.nbdfuse.try_wait().unwrap() {
                return Err(format!("nbdfuse exited with {status} before mounting"));
            }
            if Instant::now() > deadline {
                return Err("nbdfuse did not mount within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = run_with_status("losetup", &["-f", "--show", file.to_str().unwrap()]);
        if !out.status.success() {
            return Err(format!(
                "no loop device: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        disk.loop_dev = stdout(&out).trim().to_string();
        Ok(disk)
    }

    fn mount(&mut self, mnt: &Path) {
        std::fs::create_dir_all(mnt).unwrap();
        run(
            "mount",
            &["-t", "ext4", &self.loop_dev, mnt.to_str().unwrap()],
        );
        self.mnt = Some(mnt.to_path_buf());
    }

    fn unmount(&mut self) {
        if let Some(mnt) = self.mnt.take() {
            run("umount", &[mnt.to_str().unwrap()]);
        }
    }

    /// `fsck -fn`: a forced, read-only check; exit status 0 means the file system is clean.
    fn fsck(&self) -> String {
        assert!(self.mnt.is_none(), "fsck of a mounted file system");
        stdout(&run("fsck.ext4", &["-fn", &self.loop_dev]))
    }
}

impl Drop for KernelDisk {
    fn drop(&mut self) {
        if let Some(mnt) = self.mnt.take() {
            let _ = Command::new("umount").arg(&mnt).status();
        }
        if !self.loop_dev.is_empty() {
            let _ = Command::new("losetup")
                .args(["-d", &self.loop_dev])
                .status();
        }
        let _ = Command::new("umount").arg(&self.fuse).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.nbdfuse.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.nbdfuse.kill();
                let _ = self.nbdfuse.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn ext4_on_a_loop_device_over_nbdfuse_survives_a_server_restart() {
    let dir = Scratch::new("kernel-fs");
    let disk = dir.sparse("disk.raw", 256 * MIB);
    let spec = format!("disk={}", disk.display());
    let data = dir.path("data.bin");
    data_file(&data, 24 * MIB as usize + 1234, 0x6b65726e);
    let want = std::fs::read(&data).unwrap();
    let mnt = dir.path("mnt");

    // Round 1, direct mode: make the file system, fill it, unmount (the kernel writes back and
    // flushes through every layer), check it.
    let srv = Server::start(&dir, &["--export", &spec, "--cache", "direct"]);
    let mut kd = match KernelDisk::attach(&dir, &srv.unix_uri("disk")) {
        Ok(kd) => kd,
        Err(why) => {
            eprintln!("SKIPPED: this machine cannot attach a kernel block device: {why}");
            srv.stop();
            return;
        }
    };
    run("mkfs.ext4", &["-q", "-F", &kd.loop_dev]);
    kd.mount(&mnt);
    std::fs::create_dir(mnt.join("etc")).unwrap();
    std::fs::write(mnt.join("etc/hostname"), b"node-0042\n").unwrap();
    std::fs::copy(&data, mnt.join("payload.bin")).unwrap();
    kd.unmount();
    let check = kd.fsck();
    assert!(check.contains("files"), "{check}");
    drop(kd);
    let log = srv.stop();
    assert!(
        log.contains("connection closed"),
        "nbdfuse's connections were not logged:\n{log}"
    );

    // Round 2, a new server in buffered mode on the same file: everything is there.
    let srv = Server::start(&dir, &["--export", &spec, "--cache", "buffered"]);
    let mut kd = KernelDisk::attach(&dir, &srv.unix_uri("disk")).expect("attached in round 1");
    kd.fsck();
    kd.mount(&mnt);
    assert_eq!(
        std::fs::read(mnt.join("etc/hostname")).unwrap(),
        b"node-0042\n"
    );
    let got = std::fs::read(mnt.join("payload.bin")).unwrap();
    assert!(got == want, "payload.bin differs after the restart");
    kd.unmount();
    drop(kd);
    srv.stop();
}

/// A file system on a loop device with sectors of `sector` bytes, mounted at `dir/mnt-sector`.
struct SectorDisk {
    loop_dev: String,
    mnt: PathBuf,
    mounted: bool,
}

impl SectorDisk {
    fn attach(dir: &Scratch, sector: u32) -> Result<SectorDisk, String> {
        let backing = dir.sparse("backing.img", 64 * MIB);
        let out = run_with_status(
            "losetup",
            &[
                "-f",
                "--show",
                "--sector-size",
                &sector.to_string(),
                backing.to_str().unwrap(),
            ],
        );
        if !out.status.success() {
            return Err(format!(
                "no loop device: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let mut disk = SectorDisk {
            loop_dev: stdout(&out).trim().to_string(),
            mnt: dir.path("mnt-sector"),
            mounted: false,
        };
        run("mkfs.ext4", &["-q", "-F", &disk.loop_dev]);
        std::fs::create_dir_all(&disk.mnt).unwrap();
        run("mount", &[&disk.loop_dev, disk.mnt.to_str().unwrap()]);
        disk.mounted = true;
        Ok(disk)
    }
}

impl Drop for SectorDisk {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.mnt).status();
        }
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_dev])
            .status();
    }
}

/// On a disk of 4 KiB sectors, direct I/O needs 4 KiB alignment, also on a sparse image. The
/// alignment once came from trying a direct read at offset 0; a read of a hole is answered with
/// zeroes without any alignment check, so it said 512, and every 512-aligned write then failed
/// with EINVAL and latched the export.
#[test]
fn direct_mode_on_a_disk_of_4k_sectors_keeps_sparse_images_writable() {
    let dir = Scratch::new("sector4k");
    let fs = match SectorDisk::attach(&dir, 4096) {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED: this machine cannot make a 4 KiB-sector loop device: {why}");
            return;
        }
    };
    let image = fs.mnt.join("sparse.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let spec = format!("disk={}", image.display());
    let srv = Server::start(&dir, &["--export", &spec, "--cache", "direct"]);
    let info = stdout(&run("nbdinfo", &[&srv.unix_uri("disk")]));
    assert!(info.contains("block_size_minimum: 4096"), "{info}");

    // A client that did not ask for block sizes (told 1) writes 512-aligned pieces, a client
    // that honours 4096 (qemu) writes whole blocks; both read back what they wrote.
    let code = format!(
        "import nbd\n\
         h = nbd.NBD()\n\
         h.set_request_block_size(False)\n\
         h.connect_uri({uri:?})\n\
         assert h.get_block_size(nbd.SIZE_MINIMUM) == 1\n\
         h.pwrite(b'\\x11' * 512, 512)\n\
         h.pwrite(b'\\x12' * 1024, 5120)\n\
         assert h.pread(512, 512) == b'\\x11' * 512\n\
         assert h.pread(4096, 4096) == bytes(1024) + b'\\x12' * 1024 + bytes(2048)\n\
         h.flush()\n\
         h.shutdown()\n\
         print('PASS')\n",
        uri = srv.unix_uri("disk")
    );
    let out = stdout(&run("/usr/bin/python3", &["-c", &code]));
    assert!(out.contains("PASS"), "{out}");
    let qemu = stdout(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x21 8192 8192",
            "-c",
            "read -P 0x21 8192 8192",
            "-c",
            "read -P 0x11 512 512",
            &srv.unix_uri("disk"),
        ],
    ));
    assert!(
        !qemu.contains("failed") && !qemu.contains("Pattern verification"),
        "{qemu}"
    );
    let log = srv.stop();
    assert!(!log.contains("latched"), "{log}");
    let bytes = std::fs::read(&image).unwrap();
    assert!(bytes[..512].iter().all(|&b| b == 0));
    assert!(bytes[512..1024].iter().all(|&b| b == 0x11));
    assert!(bytes[5120..6144].iter().all(|&b| b == 0x12));
    assert!(bytes[8192..16384].iter().all(|&b| b == 0x21));
    drop(fs);
}
