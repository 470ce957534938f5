//! Which files may hold a secret meshd or meshctl reads (a join token): the policy, without
//! I/O. The caller opens the file without following a link (`O_NOFOLLOW`) and passes what
//! `fstat` says.

/// The most a token file may hold (a token is one short line).
pub const MAX_TOKEN_FILE_BYTES: u64 = 16 * 1024;

/// `Err(why)` when a file with this owner and mode must not be trusted with a secret: group-
/// or world-accessible (anyone who could read it had the token), or not owned by root (its
/// owner could swap it). The message says what to do.
pub fn check_secret_file(path: &str, mode: u32, uid: u32, size: u64) -> Result<(), String> {
    if uid != 0 {
        return Err(format!(
            "refusing the token file {path}: it is owned by uid {uid}, not root (its owner \
             could have read or replaced it); `chown root:root {path}` if you trust it"
        ));
    }
    if mode & 0o077 != 0 {
        return Err(format!(
            "refusing the token file {path}: its mode {:04o} lets other users read it (the \
             token may have leaked: revoke it with `meshctl invites revoke NAME` and invite \
             again); a token file must be mode 0600 (`chmod 600 {path}`)",
            mode & 0o7777
        ));
    }
    if size > MAX_TOKEN_FILE_BYTES {
        return Err(format!(
            "refusing the token file {path}: {size} bytes is not a token (at most \
             {MAX_TOKEN_FILE_BYTES})"
        ));
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
            assert!(e.contains("chmod 600 /t"), "{e}");
            assert!(e.contains(&format!("{mode:04o}")), "{e}");
        }
        let e = check_secret_file("/t", 0o600, 65534, 80).expect_err("owner");
        assert!(e.contains("uid 65534"), "{e}");
        let e = check_secret_file("/t", 0o600, 0, 1 << 20).expect_err("size");
        assert!(e.contains("not a token"), "{e}");
    }
}
