//! The one reader and writer of sysctls (`/proc/sys`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `/proc/sys/net/ipv4/conf/DEV/KEY` (`DEV` may be `all` or `default`).
pub fn ipv4_conf(dev: &str, key: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{dev}/{key}"))
}

/// The value, whitespace trimmed.
pub fn read(path: &Path) -> Result<String> {
    // A read of /proc/sys does not wait on a disk: no need to leave the async worker.
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))
}

/// The value as a small number (`None`: unreadable or not a number).
pub fn read_number(path: &Path) -> Option<u8> {
    read(path).ok()?.parse().ok()
}

pub fn write(path: &Path, value: &str) -> Result<()> {
    crate::runtime::blocking::run(|| std::fs::write(path, value))
        .map_err(|e| Error::io(format!("cannot write {value} to {}", path.display()), e))
}
