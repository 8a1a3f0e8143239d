//! Names of exports, golden images and volumes: checked the same way everywhere (command line,
//! management socket, pool directory).

/// Longest name accepted (the NBD limit is 4096; names are also file names in the pool).
pub const MAX_NAME_BYTES: usize = 128;

/// A name for a new image, volume or export: 1 to 128 of letters, digits, `.`, `_` and `-`, not
/// starting with `.` (reserved for the pool's own directories) or `-` (read as an option). Such
/// a name survives an `nbd://HOST/NAME` URI, a file name and a shell word without quoting.
pub fn validate_name(name: &str) -> Result<(), String> {
    validate_existing_name(name)?;
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "name {name:?} contains {c:?}: names are letters, digits, '.', '_' and '-' (they \
             must survive an nbd:// URI and a shell unquoted)"
        ));
    }
    if name.starts_with('-') {
        return Err(format!(
            "name {name:?} starts with '-' (it would be read as an option)"
        ));
    }
    Ok(())
}

/// A name found in a pool made by an older version, which allowed any character but `/` and
/// control characters: such objects are still served and can be deleted, but no new one gets
/// such a name. Non-empty, at most 128 bytes, no `/`, no leading `.`, no control characters.
pub fn validate_existing_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name is empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "name {:?}... is longer than {MAX_NAME_BYTES} bytes",
            name.chars().take(16).collect::<String>()
        ));
    }
    if name.contains('/') || name.starts_with('.') {
        return Err(format!(
            "name {name:?} may not contain '/' or start with '.' (no '.' or '..')"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("name {name:?} contains control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names_and_refuses_the_rest() {
        for ok in [
            "ubuntu-24.04",
            "node0042",
            "a",
            &"x".repeat(128),
            "web_1.prod",
        ] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "tab\there",
            "nl\n",
            &"x".repeat(129),
            "ü-image",
            "with space",
            "q?x=1",
            "a#b",
            "50%",
            "-rf",
            "semi;colon",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        // An older pool's names are still read (and so can be deleted).
        for old in ["ü-image", "with space", "a#b"] {
            assert_eq!(validate_existing_name(old), Ok(()), "{old}");
        }
    }
}
