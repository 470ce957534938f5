//! The host's private key file: loaded with ssh-like permission checks, generated (atomically,
//! mode 0600, parent directory 0700) when missing. The key itself is never logged.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use mesh_proto::PrivateKey;

use crate::error::{Error, Result};

fn key_err(path: &Path, message: impl Into<String>) -> Error {
    Error::KeyFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// What `inspect` found, without changing anything (used by `--check-config`).
#[derive(Debug)]
pub enum KeyFileState {
    /// The file exists, has safe permissions and holds a valid key.
    Valid(PrivateKey),
    /// The file does not exist; `load_or_generate` would create it.
    Missing,
}

/// Check the key file without creating anything.
pub fn inspect(path: &Path) -> Result<KeyFileState> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(KeyFileState::Missing),
        Err(e) => return Err(key_err(path, format!("cannot stat: {e}"))),
    };
    if !meta.is_file() {
        return Err(key_err(path, "is not a regular file"));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(key_err(
            path,
            format!(
                "permissions {mode:04o} are too open: the key must not be readable by group or others; \
                 run `chmod 600 {}`",
                path.display()
            ),
        ));
    }
    let text = fs::read_to_string(path).map_err(|e| key_err(path, format!("cannot read: {e}")))?;
    let key: PrivateKey = text
        .trim()
        .parse()
        .map_err(|e| key_err(path, format!("does not hold a WireGuard private key: {e}")))?;
    Ok(KeyFileState::Valid(key))
}

/// Load the key; if the file is missing, generate a key and write it atomically with mode 0600,
/// creating the parent directory with mode 0700.
pub fn load_or_generate(path: &Path) -> Result<PrivateKey> {
    match inspect(path)? {
        KeyFileState::Valid(key) => Ok(key),
        KeyFileState::Missing => {
            let key = PrivateKey::generate();
            write_new(path, &key)?;
            tracing::info!(path = %path.display(), public_key = %key.public_key(), "generated a new private key");
            Ok(key)
        }
    }
}

fn write_new(path: &Path, key: &PrivateKey) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                key_err(
                    path,
                    format!("cannot create directory {}: {e}", dir.display()),
                )
            })?;
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "private.key".to_owned());
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The umask cannot widen 0600, but be explicit in case the file system ignores mode.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        let mut text = key.to_base64();
        text.push('\n');
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        // Refuse to replace a key that appeared meanwhile: link fails if `path` exists.
        fs::hard_link(&tmp, path)?;
        Ok(())
    })();
    let _ = fs::remove_file(&tmp);
    result.map_err(|e| key_err(path, format!("cannot write a new key: {e}")))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_with_0600_in_0700_dir_and_reloads_same_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("etc/meshd/private.key");
        let key = load_or_generate(&path).expect("generate");
        let mode = fs::metadata(&path).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(path.parent().expect("parent"))
            .expect("stat dir")
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let again = load_or_generate(&path).expect("reload");
        assert_eq!(key.public_key(), again.public_key());
    }

    #[test]
    fn refuses_group_or_other_readable_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("private.key");
        load_or_generate(&path).expect("generate");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = load_or_generate(&path).expect_err("must refuse 0640");
        let msg = err.to_string();
        assert!(
            msg.contains("too open") && msg.contains("chmod 600"),
            "{msg}"
        );
    }

    #[test]
    fn refuses_garbage_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("private.key");
        fs::write(&path, "not a key\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = inspect(&path).expect_err("garbage");
        assert!(err.to_string().contains("private key"), "{err}");
    }
}
