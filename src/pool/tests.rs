use std::fs;
use std::io::Cursor;

use super::*;

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn tempdir(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("streamer-pool-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    TempDir(d)
}

/// A command nobody cancels.
const GO: Stop<'static> = &|| Ok(());

fn golden_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 253) as u8 | 1).collect()
}

#[test]
fn import_clone_capture_delete_and_reopen() {
    let d = tempdir("flow");
    let pool = Pool::open(&d.0).unwrap();
    let bytes = golden_bytes((3 << 20) + 5);
    let img = pool
        .import_image(
            "golden",
            &mut Cursor::new(bytes.clone()),
            &Expect::default(),
            GO,
            |_| {},
        )
        .unwrap();
    assert_eq!(img.info.size, bytes.len() as u64);
    assert!(pool.verify_image("golden", GO, |_| {}).unwrap().ok());

    let v = pool.create_volume("node1", Some("golden"), None).unwrap();
    assert_eq!(v.size, (3 << 20) + 4096, "rounded up to 4 KiB");
    pool.create_volume("blank", None, Some(1 << 20)).unwrap();
    let mut vol = pool.open_volume("node1").unwrap();
    vol.write(100, b"personality").unwrap();
    vol.flush().unwrap();
    drop(vol);

    // Capture flattens: the new image holds the golden bytes plus the write.
    let cap = pool.capture("golden2", "node1", GO, |_| {}).unwrap();
    assert_eq!(cap.info.size, v.size);
    let mut raw = fs::read(d.0.join("images/golden2/image.raw")).unwrap();
    assert_eq!(&raw[100..111], b"personality");
    raw[100..111].copy_from_slice(&bytes[100..111]);
    assert_eq!(&raw[..bytes.len()], &bytes[..]);

    // Refusals name the problem.
    let e = pool.delete_image("golden").unwrap_err().to_string();
    assert!(e.contains("node1"), "{e}");
    let e = pool
        .create_volume("node1", Some("golden"), None)
        .unwrap_err();
    assert!(matches!(e, PoolError::Exists { .. }), "{e}");
    let e = pool.create_volume("x", Some("nope"), None).unwrap_err();
    assert!(matches!(e, PoolError::NotFound { .. }), "{e}");
    let e = pool
        .create_volume("small", Some("golden"), Some(4096))
        .unwrap_err();
    assert!(e.to_string().contains("smaller"), "{e}");
    assert!(pool.create_volume("../evil", None, Some(4096)).is_err());
    assert!(pool.create_volume("blank2", None, None).is_err());

    // Reopen: the same catalog, and the write is still there.
    drop(pool);
    let pool = Pool::open(&d.0).unwrap();
    assert_eq!(pool.images().len(), 2);
    assert_eq!(pool.volumes().len(), 2);
    assert_eq!(
        pool.volume("node1").unwrap().image.as_deref(),
        Some("golden")
    );
    let mut vol = pool.open_volume("node1").unwrap();
    let mut got = [0u8; 11];
    vol.read(100, &mut got).unwrap();
    assert_eq!(&got, b"personality");
    drop(vol);

    pool.resize_volume("node1", 8 << 20).unwrap();
    assert_eq!(pool.open_volume("node1").unwrap().size(), 8 << 20);
    assert!(
        pool.resize_volume("node1", 4 << 20).is_err(),
        "shrinking refused"
    );

    pool.delete_volume("node1").unwrap();
    pool.delete_image("golden").unwrap();
    assert!(
        pool.check(false)
            .unwrap()
            .volumes
            .iter()
            .all(|(_, r)| r.clean())
    );
    drop(pool);
    let pool = Pool::open(&d.0).unwrap();
    assert_eq!(pool.images().len(), 1);
    assert_eq!(pool.volumes().len(), 1);
}

#[test]
fn half_done_work_is_swept_on_open() {
    let d = tempdir("sweep");
    let pool = Pool::open(&d.0).unwrap();
    pool.create_volume("v", None, Some(1 << 20)).unwrap();
    drop(pool);
    // What a kill -9 leaves: a staged object and a trashed one.
    fs::create_dir_all(d.0.join(".staging/abc")).unwrap();
    fs::write(d.0.join(".staging/abc/image.raw"), b"partial").unwrap();
    fs::create_dir_all(d.0.join(".trash/def")).unwrap();
    let pool = Pool::open(&d.0).unwrap();
    assert_eq!(fs::read_dir(d.0.join(".staging")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(d.0.join(".trash")).unwrap().count(), 0);
    assert_eq!(pool.volumes().len(), 1);
}

#[test]
fn concurrent_creators_of_one_name_get_one_winner() {
    let d = tempdir("race");
    let pool = Pool::open(&d.0).unwrap();
    let wins = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| pool.create_volume("same", None, Some(1 << 20)).is_ok()))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&w| w)
            .count()
    });
    assert_eq!(wins, 1);
}

#[test]
fn an_empty_import_is_refused_and_leaves_nothing() {
    let d = tempdir("empty");
    let pool = Pool::open(&d.0).unwrap();
    let e = pool
        .import_image(
            "e",
            &mut Cursor::new(Vec::new()),
            &Expect::default(),
            GO,
            |_| {},
        )
        .unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    assert!(pool.images().is_empty());
    assert_eq!(fs::read_dir(d.0.join(".staging")).unwrap().count(), 0);
    // The name is free again.
    pool.import_image(
        "e",
        &mut Cursor::new(golden_bytes(10)),
        &Expect::default(),
        GO,
        |_| {},
    )
    .unwrap();
}

/// A pipe cut short ends like a short file: without the size the operator expected, a
/// truncated golden image was published and cloned. Neither a short stream nor a wrong digest
/// publishes anything, and the staged bytes are gone.
#[test]
fn an_import_that_does_not_match_what_was_expected_is_not_published() {
    let d = tempdir("expect");
    let pool = Pool::open(&d.0).unwrap();
    let bytes = golden_bytes(100_000);
    let short = Expect {
        size: Some(200_000),
        sha256: None,
    };
    let e = pool
        .import_image("x", &mut Cursor::new(bytes.clone()), &short, GO, |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("ended after 100000 bytes"), "{e}");
    let long = Expect {
        size: Some(50_000),
        sha256: None,
    };
    let e = pool
        .import_image("x", &mut Cursor::new(bytes.clone()), &long, GO, |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("ran to 100000 bytes"), "{e}");
    let wrong = Expect {
        size: Some(100_000),
        sha256: Some([7; 32]),
    };
    let e = pool
        .import_image("x", &mut Cursor::new(bytes.clone()), &wrong, GO, |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("0707070707"), "{e}");
    assert!(pool.images().is_empty());
    assert_eq!(fs::read_dir(d.0.join(".staging")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(d.0.join("images")).unwrap().count(), 0);

    let digest = pool
        .import_image(
            "y",
            &mut Cursor::new(bytes.clone()),
            &Expect::default(),
            GO,
            |_| {},
        )
        .unwrap()
        .info
        .digest;
    let right = Expect {
        size: Some(100_000),
        sha256: Some(digest),
    };
    let img = pool
        .import_image("x", &mut Cursor::new(bytes), &right, GO, |_| {})
        .unwrap();
    assert_eq!(img.info.digest, digest);
}

/// A cancel (or a client gone) ends an import at its next piece, and right before the rename
/// that would publish it: nothing is published and nothing is left staged.
#[test]
fn a_cancelled_import_publishes_nothing() {
    let d = tempdir("cancel");
    let pool = Pool::open(&d.0).unwrap();
    let bytes = golden_bytes(3 * image::STREAM_IO_BYTES);
    let calls = std::cell::Cell::new(0);
    let stop = || {
        calls.set(calls.get() + 1);
        if calls.get() >= 2 {
            Err("image import x cancelled: its client went away".to_owned())
        } else {
            Ok(())
        }
    };
    let e = pool
        .import_image(
            "x",
            &mut Cursor::new(bytes.clone()),
            &Expect::default(),
            &stop,
            |_| {},
        )
        .unwrap_err();
    assert!(matches!(e, PoolError::Cancelled(_)), "{e}");
    // At the last check, after the whole image was written and synced.
    let last = || Err("cancelled at the end".to_owned());
    let small = golden_bytes(100);
    let e = pool
        .import_image(
            "y",
            &mut Cursor::new(small),
            &Expect::default(),
            &last,
            |_| {},
        )
        .unwrap_err();
    assert!(e.to_string().contains("at the end"), "{e}");
    assert!(pool.images().is_empty());
    assert_eq!(fs::read_dir(d.0.join(".staging")).unwrap().count(), 0);
}

/// Two images `g` (bytes 0x11) and `h` (0x22), and volume `v`, a clone of `g` with a
/// personality record and a write of its own.
fn redeploy_pool(d: &TempDir) -> Pool {
    let pool = Pool::open(&d.0).unwrap();
    for (name, b) in [("g", 0x11u8), ("h", 0x22)] {
        pool.import_image(
            name,
            &mut Cursor::new(vec![b; 1 << 20]),
            &Expect::default(),
            GO,
            |_| {},
        )
        .unwrap();
    }
    pool.create_volume_with("v", Some("g"), None, Some(b"{\"hostname\":\"v\"}"))
        .unwrap();
    let mut vol = pool.open_volume("v").unwrap();
    vol.write(0, b"own data").unwrap();
    vol.flush().unwrap();
    pool
}

fn first_bytes(pool: &Pool, name: &str) -> Vec<u8> {
    let mut vol = pool.open_volume(name).unwrap();
    let mut b = vec![0u8; 8];
    vol.read(0, &mut b).unwrap();
    b
}

#[test]
fn a_redeploy_swaps_in_a_fresh_clone_and_keeps_the_old_volume_if_asked() {
    let d = tempdir("redeploy");
    let pool = redeploy_pool(&d);
    let rec: &[u8] = b"{\"hostname\":\"v2\"}";
    let e = pool
        .redeploy_volume("v", "h", None, &[(PERSONALITY, rec)], None, None)
        .unwrap();
    assert_eq!(e.image.as_deref(), Some("h"));
    assert_eq!(first_bytes(&pool, "v"), vec![0x22; 8]);
    assert_eq!(pool.personality("v").unwrap().unwrap(), rec);
    assert_eq!(pool.volumes().len(), 1);

    pool.redeploy_volume(
        "v",
        "g",
        None,
        &[(PERSONALITY, rec)],
        None,
        Some("v.previous"),
    )
    .unwrap();
    assert_eq!(first_bytes(&pool, "v"), vec![0x11; 8]);
    assert_eq!(first_bytes(&pool, "v.previous"), vec![0x22; 8]);
    assert_eq!(pool.personality("v.previous").unwrap(), None);
    assert_eq!(pool.personality("v").unwrap().unwrap(), rec);
    let e = pool
        .redeploy_volume("v", "g", None, &[], None, Some("v.previous"))
        .unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
    drop(pool);
    let pool = Pool::open(&d.0).unwrap();
    assert_eq!(pool.volumes().len(), 2);
    assert!(!d.0.join("volumes/v").join(REDEPLOY_NOTE).exists());
}

/// A redeploy that keeps the old volume, stopped at each point between its renames: opening
/// the pool finishes it (or, before the first rename, it did not happen), and nothing is lost.
#[test]
fn a_redeploy_cut_short_is_finished_or_undone_at_open() {
    for stop in 0..3 {
        let d = tempdir(&format!("redeploy-cut-{stop}"));
        let pool = redeploy_pool(&d);
        let (staged, cleanup, _) = pool
            .stage_volume("v", Some("h"), None, &[(PERSONALITY, b"{}")], None)
            .unwrap();
        let note = br#"{"name":"v","keep_as":"v.previous"}"#;
        fs::write(d.0.join(&staged).join(REDEPLOY_NOTE), note).unwrap();
        cleanup.disarm();
        if stop >= 1 {
            pool.dir
                .rename(
                    Path::new("volumes/v"),
                    Path::new("volumes/v.previous"),
                    true,
                )
                .unwrap();
        }
        if stop >= 2 {
            pool.publish(&staged, "volumes", "v").unwrap();
        }
        drop(pool);
        let pool = Pool::open(&d.0).unwrap();
        if stop == 0 {
            assert_eq!(pool.volumes().len(), 1);
            assert_eq!(first_bytes(&pool, "v"), b"own data");
            assert!(pool.personality("v").unwrap().is_some());
        } else {
            assert_eq!(pool.volumes().len(), 2, "stop {stop}");
            assert_eq!(first_bytes(&pool, "v"), vec![0x22; 8]);
            assert_eq!(first_bytes(&pool, "v.previous"), b"own data");
            assert_eq!(pool.personality("v").unwrap().unwrap(), b"{}");
            assert_eq!(pool.personality("v.previous").unwrap(), None);
            assert!(
                d.0.join("volumes/v.previous")
                    .join(PERSONALITY_PREVIOUS)
                    .exists()
            );
            assert!(!d.0.join("volumes/v").join(REDEPLOY_NOTE).exists());
        }
        assert_eq!(fs::read_dir(d.0.join(".staging")).unwrap().count(), 0);
    }
}
