//! The host's private key file: loaded with ssh-like permission checks, generated (atomically,
//! mode 0600, parent directory 0700) when missing. The key itself is never logged.
//!
//! Key rotation (see `mesh_proto::rotation`) adds a second file next to it, `<key>.next`
//! ([`next_path`]): [`write_next`] writes it atomically (temp file, fsync, rename, directory
//! fsync), [`promote`] renames it over the current file (the old key disappears from disk with
//! the rename), [`discard_next`] deletes an abandoned one, and [`recover`] decides at start
//! which key is live.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use mesh_proto::rotation::{self, KeyFiles, Recovery};
use mesh_proto::{PrivateKey, PublicKey};

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

/// Write a new key file (0600, directory 0700) with the one writer; refuses to replace a key
/// that appeared meanwhile (the temp file is linked, not renamed, into place).
fn write_new(path: &Path, key: &PrivateKey) -> Result<()> {
    let mut text = key.to_base64();
    text.push('\n');
    let opts = crate::disk::WriteOptions {
        replace: false,
        ..crate::disk::WriteOptions::PRIVATE
    };
    crate::disk::write_file(path, text.as_bytes(), opts)
        .map_err(|e| key_err(path, format!("cannot write a new key: {e}")))
}

fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    crate::disk::sync_dir(dir)
}

/// The pending next key's file for the key file `path` (`private.key` → `private.key.next`).
pub fn next_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "private.key".into());
    name.push(".next");
    path.with_file_name(name)
}

fn next_tmp_prefix(path: &Path) -> String {
    let next = next_path(path);
    let name = next
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.tmp.")
}

/// Write `key` as the pending next key of the key file `path`: a temp file (0600) is written
/// and fsynced, renamed to [`next_path`] and the directory fsynced. A crash leaves either no
/// next file (a temp file that [`recover`] removes) or a whole one. Replaces an existing next
/// file (only [`recover`] decides whether one is kept).
pub fn write_next(path: &Path, key: &PrivateKey) -> Result<()> {
    let next = next_path(path);
    let mut text = key.to_base64();
    text.push('\n');
    // The temp file is `.{next name}.tmp.{random}`: the names `next_tmp_prefix` finds.
    crate::disk::state::write_atomic(&next, text.as_bytes())
        .map_err(|e| key_err(&next, format!("cannot write the next key: {e}")))
}

/// Make the pending next key the current one: rename [`next_path`] over `path` and fsync the
/// directory. The old key is gone from disk once the rename is durable.
pub fn promote(path: &Path) -> Result<()> {
    let next = next_path(path);
    fs::rename(&next, path)
        .and_then(|()| sync_dir(dir_of(path)))
        .map_err(|e| {
            key_err(
                path,
                format!("cannot promote {} over it: {e}", next.display()),
            )
        })
}

/// Delete an abandoned next key (no error when there is none).
pub fn discard_next(path: &Path) -> Result<()> {
    let next = next_path(path);
    match fs::remove_file(&next) {
        Ok(()) => sync_dir(dir_of(path))
            .map_err(|e| key_err(&next, format!("cannot sync the directory: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(key_err(&next, format!("cannot delete: {e}"))),
    }
}

/// Remove temp files a crash in [`write_next`] left behind.
fn remove_stale_temps(path: &Path) {
    let prefix = next_tmp_prefix(path);
    let Ok(entries) = fs::read_dir(dir_of(path)) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            if let Err(err) = fs::remove_file(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a stale temp key file");
            }
        }
    }
}

/// When the key was written (the key file's mtime; a rotation's promote carries the next
/// key's write time over): the key age for the metric and the rotation schedule.
pub fn created_unix(path: &Path) -> Option<u64> {
    let modified = fs::metadata(path).ok()?.modified().ok()?;
    modified
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// The keys after [`recover`].
#[derive(Debug)]
pub struct Recovered {
    /// The key the device runs.
    pub live: PrivateKey,
    /// A next key still pending (the rotation resumes, or waits for the coordinator's word).
    pub pending: Option<PrivateKey>,
    /// What was decided.
    pub decision: Recovery,
}

/// At start: read the key file `path` and its next file, ask `mesh_proto::rotation::recover`
/// which key is live given the key the coordinator holds for us (`None` when unknown), and
/// carry the decision out on disk (generate, promote, or delete a stale next file). Temp
/// files from an interrupted write are removed. Never returns without a live key.
pub fn recover(path: &Path, coordinator: Option<PublicKey>) -> Result<Recovered> {
    remove_stale_temps(path);
    let current = match inspect(path)? {
        KeyFileState::Valid(k) => Some(k),
        KeyFileState::Missing => None,
    };
    let next = match inspect(&next_path(path))? {
        KeyFileState::Valid(k) => Some(k),
        KeyFileState::Missing => None,
    };
    let files = KeyFiles {
        current: current.as_ref().map(PrivateKey::public_key),
        next: next.as_ref().map(PrivateKey::public_key),
    };
    let decision = rotation::recover(files, coordinator);
    let (live, pending) = match (decision, current, next) {
        (Recovery::Generate, _, _) => (load_or_generate(path)?, None),
        (Recovery::PromoteNext, _, Some(n)) => {
            promote(path)?;
            tracing::info!(path = %path.display(), public_key = %n.public_key(), "promoted the pending next key");
            (n, None)
        }
        (Recovery::CurrentDiscardNext, Some(c), _) => {
            discard_next(path)?;
            (c, None)
        }
        (Recovery::Current, Some(c), _) => (c, None),
        (Recovery::CurrentResume(_) | Recovery::CurrentUndecided(_), Some(c), n) => (c, n),
        (d, _, _) => {
            return Err(key_err(
                path,
                format!("internal: recovery decision {d:?} does not fit the files"),
            ))
        }
    };
    Ok(Recovered {
        live,
        pending,
        decision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

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

    fn k(i: u8) -> PrivateKey {
        PrivateKey::from_bytes([i; 32])
    }

    fn on_disk(path: &Path) -> Option<PublicKey> {
        match inspect(path).expect("inspect") {
            KeyFileState::Valid(k) => Some(k.public_key()),
            KeyFileState::Missing => None,
        }
    }

    #[test]
    fn next_file_sits_next_to_the_key() {
        assert_eq!(
            next_path(Path::new("/etc/meshd/private.key")),
            Path::new("/etc/meshd/private.key.next")
        );
    }

    #[test]
    fn write_next_then_promote_replaces_the_key_and_leaves_one_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("private.key");
        let old = load_or_generate(&path).expect("generate");
        write_next(&path, &k(7)).expect("write next");
        let mode = fs::metadata(next_path(&path)).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(on_disk(&path), Some(old.public_key()));
        assert_eq!(on_disk(&next_path(&path)), Some(k(7).public_key()));
        promote(&path).expect("promote");
        assert_eq!(on_disk(&path), Some(k(7).public_key()));
        assert!(!next_path(&path).exists());
        let names: Vec<String> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["private.key".to_string()],
            "no old key, no temp"
        );
        let text = fs::read_to_string(&path).expect("read");
        assert!(!text.contains(&old.to_base64()));
    }

    /// The steps of a rotation on disk, a "crash" after each (stop there, run recovery), with
    /// the key the coordinator then holds: recovery always runs exactly that key, and finishing
    /// the rotation from there ends with the next key alone on disk.
    #[test]
    fn a_crash_after_each_step_recovers_to_the_coordinators_key() {
        let (old, new) = (k(1), k(2));
        // (step reached, coordinator's key)
        let cases: [(usize, PublicKey); 6] = [
            (0, old.public_key()),  // nothing written yet
            (1, old.public_key()),  // temp file written, not renamed
            (2, old.public_key()),  // next file in place; prepared or not
            (2, new.public_key()),  // next file in place; committed (and maybe switched)
            (3, new.public_key()),  // promoted
            (2, k(9).public_key()), // coordinator unknown / says something else
        ];
        for (step, coord) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("private.key");
            write_new(&path, &old).expect("current");
            if step >= 1 {
                let tmp = dir
                    .path()
                    .join(format!("{}{}", next_tmp_prefix(&path), 4242));
                fs::write(&tmp, format!("{}\n", new.to_base64())).expect("tmp");
            }
            if step >= 2 {
                write_next(&path, &new).expect("next");
            }
            if step >= 3 {
                promote(&path).expect("promote");
            }
            let r = recover(&path, Some(coord)).expect("recover");
            let names: Vec<String> = fs::read_dir(dir.path())
                .expect("ls")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            assert!(
                names.iter().all(|n| !n.contains(".tmp.")),
                "step {step}: temp files removed: {names:?}"
            );
            let expect_live = if coord == new.public_key() {
                new.public_key()
            } else {
                old.public_key()
            };
            assert_eq!(r.live.public_key(), expect_live, "step {step}");
            assert_eq!(on_disk(&path), Some(expect_live), "step {step}");
            match r.decision {
                Recovery::CurrentResume(n) | Recovery::CurrentUndecided(n) => {
                    assert_eq!(n, new.public_key());
                    assert_eq!(
                        r.pending.as_ref().map(PrivateKey::public_key),
                        Some(n),
                        "step {step}: the pending key is kept"
                    );
                    // Finish the rotation: promote.
                    promote(&path).expect("promote");
                    assert_eq!(on_disk(&path), Some(new.public_key()));
                }
                _ => {
                    assert!(r.pending.is_none(), "step {step}");
                    assert!(!next_path(&path).exists(), "step {step}");
                }
            }
            // Recovery again is a no-op.
            let again = recover(&path, Some(coord)).expect("again");
            assert!(matches!(again.decision, Recovery::Current));
        }
    }

    #[test]
    fn recovery_generates_only_without_any_key_and_keeps_a_lone_next_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("private.key");
        write_next(&path, &k(3)).expect("next");
        let r = recover(&path, None).expect("recover");
        assert_eq!(r.decision, Recovery::PromoteNext);
        assert_eq!(r.live.public_key(), k(3).public_key());
        assert_eq!(on_disk(&path), Some(k(3).public_key()));
        fs::remove_file(&path).expect("rm");
        let r = recover(&path, None).expect("generate");
        assert_eq!(r.decision, Recovery::Generate);
        assert_eq!(on_disk(&path), Some(r.live.public_key()));
    }

    #[test]
    fn a_stale_next_file_holding_the_current_key_is_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("private.key");
        write_new(&path, &k(1)).expect("current");
        write_next(&path, &k(1)).expect("next");
        let r = recover(&path, None).expect("recover");
        assert_eq!(r.decision, Recovery::CurrentDiscardNext);
        assert!(!next_path(&path).exists());
        discard_next(&path).expect("discarding nothing is fine");
    }

    #[test]
    fn recovery_refuses_an_open_next_key_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("private.key");
        write_new(&path, &k(1)).expect("current");
        write_next(&path, &k(2)).expect("next");
        fs::set_permissions(next_path(&path), fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = recover(&path, None).expect_err("0644");
        assert!(err.to_string().contains("too open"), "{err}");
    }
}
