//! The agent: observe → `mesh_proto::plan` → apply, level-triggered. The core (`Agent`) is
//! driven by plain calls (`handle_reload`, `reconcile`, `peers`, `status`) so tests can run it
//! against the in-memory fakes; `run` is the tokio shell around it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use mesh_proto::{plan, DeviceSpec, ObservedPeer, PrivateKey, PublicKey};

use crate::backend::{LinkBackend, LinkSpec, WgBackend};
use crate::error::{Error, Result};
use crate::settings::Settings;

/// One configured peer joined with what the device reports about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub name: String,
    pub public_key: PublicKey,
    /// First allowed /32 or /128, the peer's mesh address.
    pub mesh_address: Option<IpNet>,
    pub allowed_ips: Vec<IpNet>,
    /// `None` when the peer is not (yet) on the device.
    pub observed: Option<ObservedPeer>,
    pub configured_keepalive: Option<u16>,
}

/// The agent's own state, for `meshctl status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    pub host_name: String,
    pub interface: String,
    pub address: Option<IpNet>,
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub config_path: PathBuf,
    pub ifindex: Option<u32>,
    pub configured_peers: usize,
    pub passes: u64,
    pub last_pass: Option<Duration>,
    pub last_pass_ops: usize,
    pub last_pass_failed_ops: usize,
    /// The most relevant current error: a failed reload (until one succeeds), else the latest
    /// failed pass.
    pub last_error: Option<String>,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    pub ops: Vec<String>,
    pub failed: Vec<String>,
    pub error: Option<String>,
}

/// The agent core, generic over its outside systems.
#[derive(Debug)]
pub struct Agent<W, L> {
    pub wg: W,
    pub link: L,
    settings: Settings,
    key: PrivateKey,
    desired: DeviceSpec,
    /// Our address from a previous config, to remove once the new one is in place.
    retired_address: Option<IpNet>,
    ifindex: Option<u32>,
    passes: u64,
    last_pass: Option<Duration>,
    last_report: PassReport,
    reload_error: Option<String>,
}

fn now_since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The peer's mesh address: its first single-host allowed IP.
pub fn mesh_address(allowed_ips: &[IpNet]) -> Option<IpNet> {
    allowed_ips
        .iter()
        .find(|n| n.prefix_len() == n.max_prefix_len())
        .copied()
}

impl<W: WgBackend, L: LinkBackend> Agent<W, L> {
    /// Build an agent from a loaded, valid configuration and its private key.
    pub fn new(wg: W, link: L, settings: Settings, key: PrivateKey) -> Self {
        let desired = settings.desired(&key);
        Agent {
            wg,
            link,
            settings,
            key,
            desired,
            retired_address: None,
            ifindex: None,
            passes: 0,
            last_pass: None,
            last_report: PassReport::default(),
            reload_error: None,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn desired(&self) -> &DeviceSpec {
        &self.desired
    }

    pub fn config_path(&self) -> &Path {
        &self.settings.config_path
    }

    /// Re-read the configuration (SIGHUP, `meshctl reload`). An invalid configuration is
    /// refused: the old one stays in force and the error is reported in the status.
    pub fn handle_reload(&mut self) -> Result<()> {
        let path = self.settings.config_path.clone();
        match self.load_new(&path) {
            Ok(()) => {
                self.reload_error = None;
                tracing::info!(config = %path.display(), "configuration reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused; keeping the previous configuration");
                self.reload_error =
                    Some(format!("reload refused, previous configuration kept: {e}"));
                Err(e)
            }
        }
    }

    fn load_new(&mut self, path: &Path) -> Result<()> {
        let new = Settings::load(path)?;
        let config_err = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        if new.interface != self.settings.interface {
            return Err(config_err(format!(
                "host.interface changed from {} to {}; this needs a restart of meshd",
                self.settings.interface, new.interface
            )));
        }
        if new.control_socket != self.settings.control_socket {
            return Err(config_err(format!(
                "daemon.control_socket changed from {} to {}; this needs a restart of meshd",
                self.settings.control_socket.display(),
                new.control_socket.display()
            )));
        }
        let key = crate::keyfile::load_or_generate(&new.private_key_file)?;
        if new.address != self.settings.address {
            self.retired_address = Some(self.settings.address);
        }
        self.desired = new.desired(&key);
        self.key = key;
        self.settings = new;
        Ok(())
    }

    /// One reconcile pass. Never fails: errors are logged and reported in the status.
    pub async fn reconcile(&mut self, now: Duration) -> PassReport {
        let report = self.pass(now).await;
        self.passes += 1;
        self.last_pass = Some(now);
        if let Some(e) = &report.error {
            tracing::warn!(error = %e, "reconcile pass failed");
        }
        self.last_report = report.clone();
        report
    }

    async fn pass(&mut self, now: Duration) -> PassReport {
        let mut report = PassReport::default();
        let observed = match self.wg.observe().await {
            Ok(o) => o,
            Err(first) => {
                tracing::debug!(error = %first, "device not observable; ensuring it is up");
                let again = match self.wg.ensure_device().await {
                    Ok(()) => self.wg.observe().await,
                    Err(e) => Err(e),
                };
                match again {
                    Ok(o) => o,
                    Err(e) => {
                        report.error = Some(e.to_string());
                        return report;
                    }
                }
            }
        };

        let spec = LinkSpec {
            interface: self.settings.interface.clone(),
            mtu: self.settings.mtu,
            address: self.settings.address,
        };
        match self.link.configure(&spec, self.retired_address).await {
            Ok(link) => {
                if self.ifindex.is_some_and(|i| i != link.ifindex) {
                    tracing::warn!(old = ?self.ifindex, new = link.ifindex, "interface index changed (engine restarted)");
                }
                self.ifindex = Some(link.ifindex);
                self.retired_address = None;
                for change in &link.changes {
                    tracing::info!(interface = %spec.interface, change = %change, "interface");
                }
            }
            Err(e) => {
                // Peers are still worth configuring; report the interface problem.
                report.error = Some(e.to_string());
            }
        }

        let ops = plan(&self.desired, &observed, now);
        if ops.is_empty() {
            return report;
        }
        report.ops = ops.iter().map(|o| o.to_string()).collect();
        for op in &ops {
            tracing::info!(op = %op, "apply");
        }
        if let Err(e) = self.wg.apply(&ops).await {
            tracing::warn!(error = %e, ops = ops.len(), "batch failed; applying ops one by one");
            for op in &ops {
                if let Err(e) = self.wg.apply(std::slice::from_ref(op)).await {
                    tracing::error!(op = %op, error = %e, "op failed");
                    report.failed.push(format!("{op}: {e}"));
                }
            }
            if !report.failed.is_empty() && report.error.is_none() {
                report.error = Some(format!(
                    "{} of {} ops failed: {}",
                    report.failed.len(),
                    ops.len(),
                    report.failed.join("; ")
                ));
            }
        }
        report
    }

    /// The configured peers joined with live device data.
    pub async fn peers(&mut self) -> Result<Vec<PeerView>> {
        let observed = self.wg.observe().await?;
        Ok(self.join_peers(&observed.peers))
    }

    fn join_peers(&self, observed: &BTreeMap<PublicKey, ObservedPeer>) -> Vec<PeerView> {
        self.settings
            .peers
            .iter()
            .map(|p| PeerView {
                name: p.name.clone(),
                public_key: p.spec.public_key,
                mesh_address: mesh_address(&p.spec.allowed_ips),
                allowed_ips: p.spec.allowed_ips.clone(),
                observed: observed.get(&p.spec.public_key).cloned(),
                configured_keepalive: p.spec.persistent_keepalive,
            })
            .collect()
    }

    /// The agent's status.
    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            host_name: self.settings.host_name.clone(),
            interface: self.settings.interface.clone(),
            address: Some(self.settings.address),
            public_key: Some(self.key.public_key()),
            listen_port: self.settings.listen_port,
            config_path: self.settings.config_path.clone(),
            ifindex: self.ifindex,
            configured_peers: self.settings.peers.len(),
            passes: self.passes,
            last_pass: self.last_pass,
            last_pass_ops: self.last_report.ops.len(),
            last_pass_failed_ops: self.last_report.failed.len(),
            last_error: self
                .reload_error
                .clone()
                .or_else(|| self.last_report.error.clone()),
        }
    }
}

/// Current wall-clock time as the reconciler wants it.
pub fn now() -> Duration {
    now_since_epoch()
}
