//! Names of exports, golden images and volumes: checked the same way everywhere (command line,
//! management socket, pool directory).

/// Longest name accepted (the NBD limit is 4096; names are also file names in the pool).
pub const MAX_NAME_BYTES: usize = 128;

/// Non-empty, at most 128 bytes, no `/`, not `.` or `..`, no leading `.` (reserved for the
/// pool's own directories), no control characters.
pub fn validate_name(name: &str) -> Result<(), String> {
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
        for ok in ["ubuntu-24.04", "node0042", "a", &"x".repeat(128), "ü-image"] {
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
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
