//! The NoCloud seed: a small FAT file system labelled `CIDATA` holding `meta-data`, `user-data`
//! and `network-config`, which cloud-init finds on any attached disk at first boot. Built with
//! the `fatfs` crate (FAT is not hand-written here), in memory, from the documents alone: the
//! same personality always gives the same bytes (no timestamps: the crate's time provider
//! without `chrono` writes a fixed date).

use std::io::{self, Cursor, Write};

use super::NoCloud;

/// Size of a seed: FAT12, room for documents far larger than any personality's.
pub const SEED_BYTES: usize = 1 << 20;

/// The seed image of `docs`.
pub fn image(docs: &NoCloud) -> io::Result<Vec<u8>> {
    let mut disk = Cursor::new(vec![0u8; SEED_BYTES]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat12)
            .volume_label(*b"CIDATA     "),
    )?;
    write_documents(&mut disk, docs)?;
    Ok(disk.into_inner())
}

/// Writes (or replaces) the three documents in the root of the FAT file system on `disk`,
/// leaving anything else there as it is.
pub fn write_documents<T: io::Read + io::Write + io::Seek>(
    disk: T,
    docs: &NoCloud,
) -> io::Result<()> {
    let fs = fatfs::FileSystem::new(disk, fatfs::FsOptions::new())?;
    for (name, text) in [
        ("meta-data", &docs.meta_data),
        ("user-data", &docs.user_data),
        ("network-config", &docs.network_config),
    ] {
        let mut f = fs.root_dir().create_file(name)?;
        f.truncate()?;
        f.write_all(text.as_bytes())?;
        f.flush()?;
    }
    fs.unmount()
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn docs(host: &str) -> NoCloud {
        NoCloud {
            meta_data: format!("{{\"local-hostname\": \"{host}\"}}\n"),
            user_data: "#cloud-config\n{}\n".into(),
            network_config: "{\"version\": 2}\n".into(),
        }
    }

    /// The same documents give the same bytes (a seed is made again at every start), and the
    /// file system reads back with its label and the three files.
    #[test]
    fn a_seed_is_deterministic_and_reads_back() {
        let a = image(&docs("web-01")).unwrap();
        assert_eq!(a, image(&docs("web-01")).unwrap());
        assert_ne!(a, image(&docs("web-02")).unwrap());
        let fs = fatfs::FileSystem::new(Cursor::new(a), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        let mut text = String::new();
        fs.root_dir()
            .open_file("meta-data")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "{\"local-hostname\": \"web-01\"}\n");
        let names: Vec<String> = fs
            .root_dir()
            .iter()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["meta-data", "user-data", "network-config"]);
    }
}
