//! Which files may hold a secret meshd or meshctl reads (a join token): the policy, without
//! I/O. The caller opens the file without following a link (`O_NOFOLLOW`) and passes what
//! `fstat` says.

/// The most a token file may hold (a token is one short line).
pub const MAX_TOKEN_FILE_BYTES: u64 = 16 * 1024;

/// Why a file must not be trusted with a secret. Each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretFileError {
    /// Not owned by root: its owner could have read or swapped it.
    #[error(
        "refusing the token file {path}: it is owned by uid {uid}, not root (its owner could \
         have read or replaced it); `chown root:root {path}` if you trust it"
    )]
    NotRoots { path: String, uid: u32 },
    /// Group- or world-accessible: anyone who could read it had the token.
    #[error(
        "refusing the token file {path}: its mode {mode:04o} lets other users read it (the \
         token may have leaked: revoke it with `meshctl invites revoke NAME` and invite \
         again); a token file must be mode 0600 (`chmod 600 {path}`)"
    )]
    Readable { path: String, mode: u32 },
    /// Far larger than any token.
    #[error(
        "refusing the token file {path}: {size} bytes is not a token (at most \
         {MAX_TOKEN_FILE_BYTES})"
    )]
    TooLarge { path: String, size: u64 },
}

/// An error when a file with this owner and mode must not be trusted with a secret: group-
/// or world-accessible, not owned by root, or too large to be a token.
pub fn check_secret_file(
    path: &str,
    mode: u32,
    uid: u32,
    size: u64,
) -> Result<(), SecretFileError> {
    let path = path.to_string();
    if uid != 0 {
        return Err(SecretFileError::NotRoots { path, uid });
    }
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Readable {
            path,
            mode: mode & 0o7777,
        });
    }
    if size > MAX_TOKEN_FILE_BYTES {
        return Err(SecretFileError::TooLarge { path, size });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_owned_private_small_files_pass() {
        assert!(check_secret_file("/t", 0o100600, 0, 80).is_ok());
        assert!(check_secret_file("/t", 0o100400, 0, 80).is_ok());
        for mode in [0o644, 0o640, 0o604, 0o660, 0o606, 0o610] {
            let e = check_secret_file("/t", mode, 0, 80).expect_err("mode");
            assert!(matches!(e, SecretFileError::Readable { .. }), "{e:?}");
            let e = e.to_string();
            assert!(e.contains("chmod 600 /t"), "{e}");
            assert!(e.contains(&format!("{mode:04o}")), "{e}");
        }
        let e = check_secret_file("/t", 0o600, 65534, 80).expect_err("owner");
        assert_eq!(
            e,
            SecretFileError::NotRoots {
                path: "/t".into(),
                uid: 65534
            }
        );
        assert!(e.to_string().contains("uid 65534"), "{e}");
        let e = check_secret_file("/t", 0o600, 0, 1 << 20).expect_err("size");
        assert!(e.to_string().contains("not a token"), "{e}");
    }
}
