//! Secrets kept in files (`admin.token_file`, `consul.token_file`, `failover.secret_file`),
//! read the same way wherever they are read: the content trimmed (a trailing newline is not
//! part of the secret), and an unreadable, empty or too short file reported with its path.
//! When each is read is the reader's: the admin token at every Snapshot build, the Consul
//! token at every query (so both can be rotated in place), the failover secret with the
//! configuration.

use std::path::Path;

/// The secret in `path`, trimmed. An error, with the path, when the file cannot be read, is
/// empty, or holds fewer than `min_len` bytes.
pub fn read(path: &Path, min_len: usize) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if secret.len() < min_len {
        return Err(format!(
            "{} holds fewer than {min_len} characters: too short to be a secret",
            path.display()
        ));
    }
    Ok(secret.to_string())
}

#[cfg(test)]
mod tests {
    use super::read;

    #[test]
    fn secrets_are_trimmed_and_bad_files_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "  0123456789abcdef\n").unwrap();
        assert_eq!(read(&p, 16).unwrap(), "0123456789abcdef");
        let e = read(&p, 17).unwrap_err();
        assert!(
            e.ends_with("holds fewer than 17 characters: too short to be a secret"),
            "{e}"
        );
        std::fs::write(&p, "\n\n").unwrap();
        assert!(read(&p, 0).unwrap_err().ends_with("/s is empty"));
        let missing = dir.path().join("missing");
        let e = read(&missing, 1).unwrap_err();
        assert!(
            e.starts_with("cannot read ") && e.contains("/missing: "),
            "{e}"
        );
    }
}
