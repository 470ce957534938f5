//! The daemon's view of its configuration: the file parsed by `mesh_proto::config`, with
//! defaults resolved, turned into the desired device. Reading files happens here; parsing and
//! validation are mesh-proto's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use mesh_proto::{DeviceSpec, PeerSpec, PrivateKey};

use crate::error::{Error, Result};

/// A configured peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSettings {
    pub name: String,
    pub spec: PeerSpec,
}

/// Everything meshd needs from its configuration file, defaults resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub config_path: PathBuf,
    /// `None` on a host that gets its name from a join.
    pub host_name: Option<String>,
    pub interface: String,
    /// Our mesh address with its prefix, host bits kept (10.99.99.1/24); `None` on a host
    /// that gets its address from a join.
    pub address: Option<IpNet>,
    pub listen_port: u16,
    pub mtu: u16,
    pub private_key_file: PathBuf,
    pub control_socket: PathBuf,
    /// `daemon.backend`: auto, kernel or userspace.
    pub backend: mesh_proto::config::BackendKind,
    /// `None`: `meshd-wg` next to meshd, else from PATH.
    pub engine_command: Option<PathBuf>,
    pub reconcile_interval: Duration,
    pub peers: Vec<PeerSettings>,
    /// Membership and cached netmap live here.
    pub state_dir: PathBuf,
    /// Join with the token in this file at start when not a member yet.
    pub join_token_file: Option<PathBuf>,
    /// `[coordinator]`: this host runs the coordinator.
    pub coordinator: Option<mesh_proto::config::CoordinatorConfig>,
    /// `[routes]`: subnets we advertise, CIDRs never to route, our nftables table.
    pub routes: mesh_proto::config::RoutesConfig,
    /// `daemon.rotate_every_days`: the key rotation period (`None`: never).
    pub rotate_every: Option<Duration>,
    /// `[dns]`, `[metrics]`, `[integrations]`: what the daemon hands to other software, from
    /// the same parse of the same file, so the agent and the hand-offs never disagree.
    pub handoff: HandoffSettings,
}

impl Settings {
    /// Read and validate the configuration file. Errors name the file (and, through
    /// mesh-proto, the key).
    pub fn load(path: &Path) -> Result<Settings> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parse configuration text that came from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Settings> {
        let config = mesh_proto::config::parse(text, &path.display().to_string())?;
        Ok(Self::from_config(config, path))
    }

    /// The settings of a configuration already parsed (`meshd --check-config` parses it
    /// itself, to keep where each key is).
    pub fn from_config(config: mesh_proto::config::Config, path: &Path) -> Settings {
        let mut specs = config.peer_specs();
        let handoff = HandoffSettings {
            static_view: mesh_proto::handoff::MeshView::from_config(&config),
            dns: config.dns,
            metrics: config.metrics,
            integrations: config.integrations,
        };
        let host = config.host;
        let daemon = config.daemon;
        Settings {
            config_path: path.to_path_buf(),
            host_name: host.name,
            interface: host.interface,
            address: host.address,
            listen_port: host.listen_port,
            mtu: host.mtu,
            private_key_file: host.private_key_file,
            control_socket: daemon.control_socket,
            backend: daemon.backend,
            engine_command: daemon.engine_command,
            reconcile_interval: Duration::from_secs(daemon.reconcile_interval_secs.max(1)),
            peers: config
                .peers
                .into_iter()
                .filter_map(|p| {
                    Some(PeerSettings {
                        spec: specs.remove(&p.public_key)?,
                        name: p.name,
                    })
                })
                .collect(),
            state_dir: daemon.state_dir,
            join_token_file: daemon.join_token_file,
            rotate_every: (daemon.rotate_every_days > 0)
                .then(|| Duration::from_secs(u64::from(daemon.rotate_every_days) * 86_400)),
            coordinator: config.coordinator,
            routes: config.routes,
            handoff,
        }
    }

    /// The device we want, with this private key.
    pub fn desired(&self, key: &PrivateKey) -> DeviceSpec {
        DeviceSpec {
            private_key: key.clone(),
            listen_port: self.listen_port,
            fwmark: None,
            peers: self
                .peers
                .iter()
                .map(|p| (p.spec.public_key, p.spec.clone()))
                .collect(),
        }
    }
}

/// What the daemon hands to other software: `[dns]`, `[metrics]`, `[integrations]`, and the
/// mesh as a static configuration describes it. Part of [`Settings`] (`Settings::handoff`):
/// parsed with it, once per start or reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffSettings {
    pub dns: mesh_proto::config::ServiceConfig,
    pub metrics: mesh_proto::config::ServiceConfig,
    pub integrations: mesh_proto::config::integrations::IntegrationsConfig,
    /// `host.name`, `host.address` and the `[[peer]]` entries as a view (`None` on a host
    /// that joins); integrations use it while no netmap is held.
    pub static_view: Option<mesh_proto::handoff::MeshView>,
}

impl Default for HandoffSettings {
    fn default() -> Self {
        HandoffSettings {
            dns: mesh_proto::config::ServiceConfig::dns_default(),
            metrics: mesh_proto::config::ServiceConfig::metrics_default(),
            integrations: Default::default(),
            static_view: None,
        }
    }
}
