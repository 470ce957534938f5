//! The lab's record on disk, so another process (`meshlab exec`, `meshlab down`,
//! `meshlab cleanup`) can find a lab and remove exactly what it made.
//!
//! Layout: `$MESHLAB_STATE` (default `/tmp/meshlab`)`/<id>/lab.json`, one directory per host
//! next to it, and `current` -> `<id>` for the lab `meshlab up` left running.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::procs::ProcId;
use crate::topology::Role;

/// Prefix of every network namespace name the lab registers (`ip netns list`).
pub const NETNS_PREFIX: &str = "mlab-";
const STATE_FILE: &str = "lab.json";
const CURRENT: &str = "current";

/// Where labs are recorded: `$MESHLAB_STATE` or `/tmp/meshlab`.
pub fn state_root() -> PathBuf {
    std::env::var_os("MESHLAB_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/meshlab"))
}

/// The registered network namespace name of a host of lab `id`.
pub fn netns_name(id: &str, host: &str) -> String {
    format!("{NETNS_PREFIX}{id}-{host}")
}

/// One host as recorded.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HostState {
    pub role: Role,
    /// The long-lived process holding the host's namespaces.
    pub holder: ProcId,
    /// Registered netns name (`ip netns`), `mlab-<id>-<host>`.
    pub netns: String,
    /// Namespace identity, as `/proc/PID/ns/net` reads (`net:[N]`).
    pub net_ns: String,
    /// Mount namespace identity (`mnt:[N]`).
    pub mnt_ns: String,
    pub addr: Option<Ipv4Addr>,
}

/// A process the lab started inside a host.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SpawnRecord {
    pub host: String,
    pub proc: ProcId,
    pub cmd: Vec<String>,
}

/// The whole record of one lab.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LabState {
    pub id: String,
    pub dir: PathBuf,
    /// Where meshd, meshctl and meshd-wg were found; prepended to PATH inside hosts.
    pub bin_dir: PathBuf,
    /// The process that built the lab.
    pub owner: ProcId,
    /// Left running on purpose (`meshlab up`): `cleanup` leaves it alone unless `--all`.
    pub persistent: bool,
    pub hosts: BTreeMap<String, HostState>,
    pub spawned: Vec<SpawnRecord>,
}

impl LabState {
    pub fn state_file(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Write atomically (temp file + rename).
    pub fn save(&self) -> Result<()> {
        let path = Self::state_file(&self.dir);
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<LabState> {
        let path = Self::state_file(dir);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// True when the process that built this lab is gone and nobody asked to keep it.
    pub fn is_orphaned(&self) -> bool {
        !self.persistent && !self.owner.is_alive()
    }
}

/// Every lab directory under `root` (with its state, or why it could not be read).
pub fn list_labs(root: &Path) -> Vec<(String, Result<LabState>)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(root) else {
        return out;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if name == CURRENT || !path.is_dir() || path.is_symlink() {
            continue;
        }
        out.push((name, LabState::load(&path)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Point `current` at lab `id` (used by `meshlab up`).
pub fn set_current(root: &Path, id: &str) -> Result<()> {
    let link = root.join(CURRENT);
    let tmp = root.join(format!(".{CURRENT}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(id, &tmp)?;
    std::fs::rename(&tmp, &link)?;
    Ok(())
}

/// The lab `current` points to.
pub fn current(root: &Path) -> Result<String> {
    let link = root.join(CURRENT);
    let target = std::fs::read_link(&link).with_context(|| {
        format!(
            "no running lab recorded at {}: run `meshlab up` first, or pass --lab ID",
            link.display()
        )
    })?;
    match target.to_str() {
        Some(id) => Ok(id.to_owned()),
        None => bail!("{} points to a non-UTF-8 name", link.display()),
    }
}

/// Drop `current` if it points to `id`.
pub fn clear_current(root: &Path, id: &str) {
    let link = root.join(CURRENT);
    if let Ok(t) = std::fs::read_link(&link) {
        if t.to_str() == Some(id) {
            let _ = std::fs::remove_file(&link);
        }
    }
}

/// Registered network namespaces whose name starts with our prefix.
pub fn our_netns_names() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .collect();
    out.sort();
    out
}

/// The lab id embedded in one of our netns names (`mlab-<id>-<host>`).
pub fn id_of_netns(name: &str) -> Option<&str> {
    name.strip_prefix(NETNS_PREFIX)?.split('-').next()
}
