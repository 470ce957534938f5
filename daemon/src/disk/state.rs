//! The daemon's state directory (`[daemon] state_dir`, default /var/lib/meshd): the membership
//! (`membership.json`) and the cached netmap (`netmap.json`). Every file is written atomically
//! (temporary file, fsync, rename) with mode 0600, in a directory created with mode 0700.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use mesh_proto::netmap::Netmap;
use mesh_proto::PublicKey;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const MEMBERSHIP_FILE: &str = "membership.json";
pub const NETMAP_FILE: &str = "netmap.json";
/// The endpoints WireGuard learned per peer (`mesh_proto::learned`), tried first after a
/// restart.
pub const LEARNED_FILE: &str = "endpoints.json";

/// What this host knows about the mesh it joined (written once the join succeeded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub host_name: String,
    /// Our mesh address.
    pub address: IpAddr,
    pub mesh_cidr: IpNet,
    pub coordinator_public_key: PublicKey,
    pub coordinator_endpoints: Vec<SocketAddr>,
    /// Where the coordinator API listens (inside the tunnel).
    pub coordinator_address: IpAddr,
    pub api_port: u16,
    pub admin: bool,
    pub joined_unix: u64,
}

impl Membership {
    /// Our mesh address with the mesh prefix length, as the interface carries it.
    pub fn interface_address(&self) -> IpNet {
        IpNet::new(self.address, self.mesh_cidr.prefix_len())
            .unwrap_or_else(|_| IpNet::from(self.address))
    }

    /// The coordinator API's socket address.
    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::new(self.coordinator_address, self.api_port)
    }
}

/// The state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    pub dir: PathBuf,
}

fn state_err(path: &Path, message: impl Into<String>) -> Error {
    Error::State {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    pub fn membership_path(&self) -> PathBuf {
        self.dir.join(MEMBERSHIP_FILE)
    }

    pub fn netmap_path(&self) -> PathBuf {
        self.dir.join(NETMAP_FILE)
    }

    pub fn load_membership(&self) -> Result<Option<Membership>> {
        read_json(&self.membership_path())
    }

    pub fn save_membership(&self, m: &Membership) -> Result<()> {
        write_json(&self.membership_path(), m)
    }

    pub fn load_netmap(&self) -> Result<Option<Netmap>> {
        read_json(&self.netmap_path())
    }

    pub fn save_netmap(&self, n: &Netmap) -> Result<()> {
        write_json(&self.netmap_path(), n)
    }

    pub fn learned_path(&self) -> PathBuf {
        self.dir.join(LEARNED_FILE)
    }

    pub fn load_learned(&self) -> Result<Option<mesh_proto::learned::LearnedEndpoints>> {
        read_json(&self.learned_path())
    }

    pub fn save_learned(&self, l: &mesh_proto::learned::LearnedEndpoints) -> Result<()> {
        write_json(&self.learned_path(), l)
    }

    /// Create the state directory 0700, or narrow an existing one to 0700 (an older package
    /// made it 0755): it holds the membership, the registry and its WAL. A symbolic link is
    /// refused.
    pub fn ensure_private(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        crate::disk::create_dir_all(&self.dir, 0o700)
            .map_err(|e| state_err(&self.dir, format!("cannot create: {e}")))?;
        let dir = fs::File::open(&self.dir)
            .map_err(|e| state_err(&self.dir, format!("cannot open: {e}")))?;
        let meta = fs::symlink_metadata(&self.dir)
            .map_err(|e| state_err(&self.dir, format!("cannot stat: {e}")))?;
        if meta.file_type().is_symlink() {
            // A link root (or meshd's user) made, e.g. to another disk, is followed; its target
            // gets the mode.
            if !(meta.uid() == 0 || meta.uid() == nix::unistd::geteuid().as_raw()) {
                return Err(state_err(
                    &self.dir,
                    format!(
                        "is a symbolic link owned by uid {}; refusing it",
                        meta.uid()
                    ),
                ));
            }
        }
        let mode = dir
            .metadata()
            .map_err(|e| state_err(&self.dir, format!("cannot stat: {e}")))?
            .mode()
            & 0o7777;
        if mode & 0o077 != 0 {
            nix::sys::stat::fchmod(&dir, nix::sys::stat::Mode::from_bits_truncate(0o700))
                .map_err(|e| state_err(&self.dir, format!("cannot make it 0700: {e}")))?;
            tracing::info!(path = %self.dir.display(), old_mode = format!("{mode:o}"), "state directory narrowed to 0700");
        }
        Ok(())
    }

    /// Forget the membership, the cached netmap and the learned endpoints (a failed or
    /// undone join).
    pub fn clear(&self) -> Result<()> {
        for p in [
            self.membership_path(),
            self.netmap_path(),
            self.learned_path(),
        ] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(state_err(&p, format!("cannot remove: {e}"))),
            }
        }
        Ok(())
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_err(path, format!("cannot read: {e}"))),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| state_err(path, format!("cannot parse: {e}")))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text =
        serde_json::to_vec_pretty(value).map_err(|e| state_err(path, format!("encode: {e}")))?;
    text.push(b'\n');
    write_atomic(path, &text)
}

/// Write `data` to `path` atomically with mode 0600 (parent created with mode 0700), through
/// the one writer ([`crate::disk::write_file`]): a symlink at `path` is refused.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    crate::disk::write_file(path, data, crate::disk::WriteOptions::PRIVATE)
        .map_err(|e| state_err(path, format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn membership_round_trip_is_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = StateDir::new(dir.path().join("state"));
        assert_eq!(st.load_membership().expect("load"), None);
        let m = Membership {
            host_name: "dock-mirror".into(),
            address: "10.99.99.3".parse().expect("ip"),
            mesh_cidr: "10.99.99.0/24".parse().expect("net"),
            coordinator_public_key: mesh_proto::PrivateKey::from_bytes([1; 32]).public_key(),
            coordinator_endpoints: vec!["192.0.2.1:51871".parse().expect("sa")],
            coordinator_address: "10.99.99.1".parse().expect("ip"),
            api_port: 51872,
            admin: false,
            joined_unix: 1,
        };
        st.save_membership(&m).expect("save");
        assert_eq!(st.load_membership().expect("load"), Some(m.clone()));
        let meta = fs::metadata(st.membership_path()).expect("meta");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&st.dir).expect("dir").mode() & 0o777, 0o700);
        assert_eq!(m.interface_address().to_string(), "10.99.99.3/24");
        st.clear().expect("clear");
        // An existing 0755 directory is narrowed.
        fs::set_permissions(&st.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        st.ensure_private().expect("ensure");
        assert_eq!(fs::metadata(&st.dir).expect("dir").mode() & 0o777, 0o700);
        assert_eq!(st.load_membership().expect("load"), None);
    }
}
