//! `--export NAME=PATH[:ro]` as given on the command line.

use std::path::PathBuf;
use std::str::FromStr;

/// One raw-file export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// Checks an export name (the same rules as every name: `crate::names`).
pub fn validate_export_name(name: &str) -> Result<(), String> {
    crate::names::validate_name(name).map_err(|e| format!("export {e}"))
}

impl FromStr for ExportSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, path) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not NAME=PATH[:ro]"))?;
        validate_export_name(name)?;
        let (path, read_only) = match path.rsplit_once(':') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            _ => (path, false),
        };
        if path.is_empty() {
            return Err(format!("export {name:?} has an empty path"));
        }
        Ok(ExportSpec {
            name: name.to_owned(),
            path: PathBuf::from(path),
            read_only,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_path_and_mode() {
        let e: ExportSpec = "disk=/tmp/a.raw:ro".parse().unwrap();
        assert_eq!(
            e,
            ExportSpec {
                name: "disk".into(),
                path: "/tmp/a.raw".into(),
                read_only: true
            }
        );
        let e: ExportSpec = "d=/x:y.raw".parse().unwrap();
        assert_eq!(e.path, PathBuf::from("/x:y.raw"));
        assert!(!e.read_only);
        assert!("noequals".parse::<ExportSpec>().is_err());
        assert!("=/x".parse::<ExportSpec>().is_err());
        assert!("a/b=/x".parse::<ExportSpec>().is_err());
        assert!("a=".parse::<ExportSpec>().is_err());
        assert!(
            format!("{}=/x", "n".repeat(129))
                .parse::<ExportSpec>()
                .is_err()
        );
        assert!("a\u{7}=/x".parse::<ExportSpec>().is_err());
    }
}
