//! One meshd per interface and per control socket: an exclusive `flock` on lock files next to
//! the control socket. The lock is released by the kernel when the process dies (even on
//! SIGKILL), so a stale lock file never blocks a restart.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};

/// A held instance lock; dropping it releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    _locks: Vec<Flock<File>>,
    paths: Vec<PathBuf>,
}

impl InstanceLock {
    /// Lock `DIR/IFACE.lock` (one daemon per interface) and `SOCKET.lock` (one daemon per control
    /// socket), where DIR is the control socket's directory. Fails without waiting.
    pub fn acquire(control_socket: &Path, interface: &str) -> Result<Self> {
        let dir = control_socket.parent().unwrap_or_else(|| Path::new("/"));
        let iface_lock = dir.join(format!("{interface}.lock"));
        let mut sock_lock = control_socket.as_os_str().to_owned();
        sock_lock.push(".lock");
        let sock_lock = PathBuf::from(sock_lock);
        let mut locks = Vec::new();
        let mut paths = Vec::new();
        for (path, what) in [
            (iface_lock, format!("interface {interface}")),
            (
                sock_lock,
                format!("control socket {}", control_socket.display()),
            ),
        ] {
            if paths.contains(&path) {
                continue;
            }
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(format!("cannot open lock file {}", path.display()), e))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => locks.push(lock),
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(Error::AlreadyRunning { what, path });
                }
                Err((_, errno)) => {
                    return Err(Error::io(
                        format!("cannot lock {}", path.display()),
                        std::io::Error::from(errno),
                    ));
                }
            }
            paths.push(path);
        }
        Ok(InstanceLock {
            _locks: locks,
            paths,
        })
    }

    /// The lock files held.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_released_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("meshd.sock");
        let first = InstanceLock::acquire(&sock, "wgtest0").expect("first lock");
        let err = InstanceLock::acquire(&sock, "wgtest0").expect_err("second must fail");
        assert!(matches!(err, Error::AlreadyRunning { .. }), "{err}");
        // Same interface, other socket: still refused.
        let err = InstanceLock::acquire(&dir.path().join("other.sock"), "wgtest0")
            .expect_err("same interface must fail");
        assert!(err.to_string().contains("interface wgtest0"), "{err}");
        drop(first);
        InstanceLock::acquire(&sock, "wgtest0").expect("lock after release");
    }
}
