//! The agent: observe → `mesh_proto::plan` → apply, level-triggered. The core (`Agent`) is
//! driven by plain calls (`handle_reload`, `reconcile`, `peers`, `status`) so tests can run it
//! against the in-memory fakes; `run` is the tokio shell around it.

pub mod desired;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use mesh_proto::netmap::{Netmap, NetmapPeer};
use mesh_proto::routes::{
    conflicts, desired_routes, plan_routes, refusal_message, SkippedRoute, SystemRoute,
};
#[cfg(test)]
use mesh_proto::Op;
use mesh_proto::{plan, DeviceSpec, ObservedPeer, PeerSpec, PrivateKey, PublicKey};

use crate::agent::desired::desired_device;
use crate::backend::{LinkBackend, LinkSpec, WgBackend};
use crate::disk::state::Membership;
use crate::error::{Error, Result};
use crate::runtime::settings::Settings;

/// The latest endpoint the device reports for each peer, by the peer's mesh address. Updated on
/// every pass; the coordinator API reads it to learn the address it observes for a host.
pub type ObservedEndpoints = Arc<RwLock<HashMap<IpAddr, SocketAddr>>>;

/// Where a desired peer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerSource {
    /// A `[[peer]]` of the configuration file.
    Config,
    /// The netmap from the coordinator.
    Netmap,
    /// The coordinator, from the membership (before the first netmap arrived).
    Coordinator,
}

/// How the daemon stands with its coordinator, for `meshctl status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshState {
    /// This host runs the coordinator.
    pub is_coordinator: bool,
    /// `Some(true)` after a successful API call, `Some(false)` after a failed one.
    pub reachable: Option<bool>,
    pub last_error: Option<String>,
    /// Where the coordinator API is.
    pub api: Option<SocketAddr>,
    /// Last successful contact, seconds since the UNIX epoch.
    pub last_contact_unix: Option<u64>,
}

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
    pub source: PeerSource,
    /// What the netmap says about this peer (netmap peers only).
    pub netmap: Option<NetmapPeer>,
}

/// The agent's own state, for `meshctl status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// `None` before a join (no name in the configuration, no membership).
    pub host_name: Option<String>,
    pub interface: String,
    /// `None` before a join.
    pub address: Option<IpNet>,
    pub public_key: PublicKey,
    pub listen_port: u16,
    /// Which engine drives the interface (for people).
    pub backend: String,
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
    pub netmap_version: Option<u64>,
    pub mesh: MeshState,
    /// Peers' prefixes this host did not take (`mesh_proto::routes::accept_netmap`).
    pub skipped_routes: Vec<SkippedRoute>,
    /// Our advertised prefixes no netmap carries (pending an admin's approval, or revoked).
    pub ungranted_routes: Vec<IpNet>,
    /// Netmaps refused lately (Unix time, why), newest last.
    pub refused: Vec<(u64, String)>,
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
    /// Our effective mesh address: the configuration's, else the membership's.
    address: Option<IpNet>,
    membership: Option<Membership>,
    netmap: Option<Netmap>,
    /// Merge conflicts last logged (so they are logged once, not on every netmap).
    conflicts: Vec<String>,
    mesh: MeshState,
    observed_endpoints: ObservedEndpoints,
    /// Our address from a previous config, to remove once the new one is in place.
    retired_address: Option<IpNet>,
    ifindex: Option<u32>,
    passes: u64,
    last_pass: Option<Duration>,
    last_report: PassReport,
    reload_error: Option<String>,
    backend: String,
    /// The desired state last found free of route conflicts, the one passes apply. A new
    /// desired state (configuration, netmap) whose routes clash is refused as a whole: this
    /// one stays in force.
    accepted: Option<Accepted>,
    /// Why the current desired state is refused (route conflicts), for the status.
    route_refusal: Option<String>,
    /// The routes of the system not on our interface, as last listed: the underlay a peer's
    /// prefix must stay clear of.
    underlay_routes: Vec<SystemRoute>,
    /// Peers' prefixes the netmap carries that this host does not take, and why.
    skipped_routes: Vec<SkippedRoute>,
    /// How this host signs coordinator API calls (our key toward the coordinator's current
    /// key), shared with the follower and reporter tasks; kept current by `recompute`.
    signer: crate::member::client::SignerCell,
    /// Netmaps refused lately (Unix time, why), newest last, for the status.
    refused: std::collections::VecDeque<(u64, String)>,
    /// The endpoints that carried recent handshakes, per peer, as kept in the state
    /// directory (`mesh_proto::learned`).
    learned: mesh_proto::learned::LearnedEndpoints,
    /// After a start: the learned endpoints, tried before the netmap's candidates until
    /// `hints_until`.
    hints: std::collections::BTreeMap<PublicKey, std::net::SocketAddr>,
    hints_until: Option<Duration>,
}

/// A desired state that passed the route check.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Accepted {
    desired: DeviceSpec,
    address: IpNet,
    routes: Vec<IpNet>,
    settings: Settings,
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
        let address = settings.address;
        Agent {
            wg,
            link,
            settings,
            key,
            desired,
            address,
            membership: None,
            netmap: None,
            conflicts: Vec::new(),
            mesh: MeshState::default(),
            observed_endpoints: ObservedEndpoints::default(),
            retired_address: None,
            ifindex: None,
            passes: 0,
            last_pass: None,
            last_report: PassReport::default(),
            reload_error: None,
            backend: "in-memory".to_string(),
            accepted: None,
            route_refusal: None,
            underlay_routes: Vec::new(),
            skipped_routes: Vec::new(),
            signer: crate::member::client::SignerCell::default(),
            refused: std::collections::VecDeque::new(),
            learned: Default::default(),
            hints: Default::default(),
            hints_until: None,
        }
    }

    /// The endpoints learned before a restart (from the state directory): kept, and tried
    /// first for each peer for `mesh_proto::learned::HINT_GRACE` from `now`.
    pub fn set_learned(&mut self, learned: mesh_proto::learned::LearnedEndpoints, now: Duration) {
        let mesh = self.membership.as_ref().map(|m| m.mesh_cidr);
        self.hints = learned.hints(now, mesh);
        self.hints_until = (!self.hints.is_empty()).then(|| now + mesh_proto::learned::HINT_GRACE);
        if !self.hints.is_empty() {
            tracing::info!(
                peers = self.hints.len(),
                "trying the endpoints learned before the restart first"
            );
        }
        self.learned = learned;
        self.recompute();
    }

    /// Keep the endpoints that carry handshakes now (written to the state directory when
    /// they change), and drop the start's hints once their time is up.
    fn learn_endpoints(&mut self, peers: &BTreeMap<PublicKey, ObservedPeer>, now: Duration) {
        if self.hints_until.is_some_and(|t| now >= t) {
            self.hints.clear();
            self.hints_until = None;
            self.recompute();
        }
        let Some(m) = &self.membership else {
            return;
        };
        let in_netmap: std::collections::BTreeSet<PublicKey> = self
            .netmap
            .as_ref()
            .map(|nm| nm.peers.iter().map(|p| p.public_key).collect())
            .unwrap_or_default();
        let next = self
            .learned
            .learn(peers.values(), &in_netmap, now, Some(m.mesh_cidr));
        if next != self.learned {
            let state = crate::disk::state::StateDir::new(&self.settings.state_dir);
            if let Err(e) = state.save_learned(&next) {
                tracing::warn!(error = %e, "cannot keep the learned endpoints");
            }
            self.learned = next;
        }
    }

    /// The shared signer for coordinator API calls (see [`crate::member::client::SignerCell`]).
    pub fn signer_cell(&self) -> crate::member::client::SignerCell {
        self.signer.clone()
    }

    /// The coordinator's current key as this member knows it: its peer in our netmap, else
    /// the membership's (from the token or a key notice). `None` when not a member.
    pub fn coordinator_key(&self) -> Option<PublicKey> {
        let m = self.membership.as_ref()?;
        let from_netmap = self.netmap.as_ref().and_then(|nm| {
            nm.peers
                .iter()
                .find(|p| p.address == m.coordinator_address)
                .map(|p| p.public_key)
        });
        Some(from_netmap.unwrap_or(m.coordinator_public_key))
    }

    /// A signer for a coordinator API call now.
    pub fn signer(
        &self,
    ) -> Result<crate::member::client::Signer, crate::member::client::CallError> {
        self.signer.get()
    }

    /// Describe the engine for `meshctl status` (e.g. `userspace: /usr/bin/meshd-wg`).
    pub fn set_backend_label(&mut self, label: impl Into<String>) {
        self.backend = label.into();
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

    /// Our effective mesh address (configuration, else membership).
    pub fn address(&self) -> Option<IpNet> {
        self.address
    }

    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    pub fn membership(&self) -> Option<&Membership> {
        self.membership.as_ref()
    }

    pub fn netmap(&self) -> Option<&Netmap> {
        self.netmap.as_ref()
    }

    /// Our host name: the configuration's, else the membership's.
    pub fn host_name(&self) -> Option<String> {
        self.settings
            .host_name
            .clone()
            .or_else(|| self.membership.as_ref().map(|m| m.host_name.clone()))
    }

    pub fn mesh_state(&self) -> &MeshState {
        &self.mesh
    }

    pub fn mesh_state_mut(&mut self) -> &mut MeshState {
        &mut self.mesh
    }

    /// The shared map of observed endpoints (for the coordinator API).
    pub fn observed_endpoints(&self) -> ObservedEndpoints {
        self.observed_endpoints.clone()
    }

    /// Install the membership (after a join, or loaded at start).
    pub fn set_membership(&mut self, membership: Option<Membership>) {
        self.mesh.api = membership.as_ref().map(Membership::api_addr);
        self.membership = membership;
        self.recompute();
    }

    /// Install a new netmap; the next pass applies it. Returns false when it is the one held.
    /// An older version than the one held is taken too (the coordinator is the authority, e.g.
    /// after its registry was restored from a backup), with a warning.
    pub fn set_netmap(&mut self, netmap: Netmap) -> bool {
        // Everything in it ends up in the device, routes, /etc/hosts, DNS and templates:
        // a netmap with a name or address we would not write is refused whole.
        if let Err(e) = netmap.validate() {
            tracing::error!(version = netmap.version, error = %e, "refused a netmap; keeping the one held");
            if self.refused.len() == 8 {
                self.refused.pop_front();
            }
            self.refused
                .push_back((now_since_epoch().as_secs(), e.to_string()));
            return false;
        }
        let ungranted_before = self.netmap.as_ref().map(|n| &n.ungranted_routes);
        if ungranted_before != Some(&netmap.ungranted_routes) && !netmap.ungranted_routes.is_empty()
        {
            let list: Vec<String> = netmap
                .ungranted_routes
                .iter()
                .map(ToString::to_string)
                .collect();
            tracing::warn!(prefixes = %list.join(", "), "advertised prefixes are in no netmap: pending an admin's approval on the coordinator (meshctl routes), or revoked");
        }
        if let Some(held) = &self.netmap {
            if *held == netmap {
                return false;
            }
            if netmap.version < held.version {
                tracing::warn!(
                    held = held.version,
                    got = netmap.version,
                    "the coordinator sent an older netmap version; taking it"
                );
            }
        }
        tracing::info!(
            version = netmap.version,
            peers = netmap.peers.len(),
            "netmap"
        );
        self.netmap = Some(netmap);
        self.recompute();
        true
    }

    /// Replace the private key (join), recomputing the desired device.
    pub fn set_key(&mut self, key: PrivateKey) {
        self.key = key;
        self.recompute();
    }

    /// Bootstrap for a join: the throwaway key, our mesh address and the coordinator as the
    /// only extra peer. Undone by `set_key` + `set_membership` (or `restore`).
    pub fn set_bootstrap(&mut self, key: PrivateKey, address: IpNet, coordinator: PeerSpec) {
        let mut desired = self.settings.desired(&key);
        desired.peers.insert(coordinator.public_key, coordinator);
        self.key = key;
        self.desired = desired;
        self.set_address(Some(address));
    }

    /// Everything a failed join must put back.
    pub fn snapshot(&self) -> AgentSnapshot {
        AgentSnapshot {
            key: self.key.clone(),
            membership: self.membership.clone(),
            netmap: self.netmap.clone(),
            address: self.address,
        }
    }

    pub fn restore(&mut self, snap: AgentSnapshot) {
        self.key = snap.key;
        self.membership = snap.membership;
        self.mesh.api = self.membership.as_ref().map(Membership::api_addr);
        self.netmap = snap.netmap;
        self.recompute();
    }

    fn set_address(&mut self, address: Option<IpNet>) {
        if self.address != address {
            if let Some(old) = self.address {
                self.retired_address = Some(old);
            }
            self.address = address;
        }
    }

    /// Desired device and address from configuration + membership + netmap.
    fn recompute(&mut self) {
        let signer = self
            .coordinator_key()
            .and_then(|c| crate::member::client::Signer::new(&self.key, &c).ok());
        self.signer.set(signer);
        let address = self
            .settings
            .address
            .or_else(|| self.membership.as_ref().map(Membership::interface_address));
        self.set_address(address);
        // Routes are granted, not taken: the peers' prefixes this host does not opt in to, or
        // that would take the mesh, loopback, its underlay, ..., are skipped; the rest of the
        // netmap applies.
        let (netmap, skipped) = match &self.netmap {
            Some(nm) => {
                let (nm, skipped) = desired::accepted_netmap(
                    &self.settings,
                    self.membership.as_ref(),
                    nm,
                    &self.underlay_routes,
                );
                (Some(nm), skipped)
            }
            None => (None, Vec::new()),
        };
        if skipped != self.skipped_routes {
            for r in skipped.iter().filter(|r| !self.skipped_routes.contains(r)) {
                tracing::warn!(peer = %r.peer, prefix = %r.prefix, reason = %r.reason, "peer route refused; the rest of the netmap applies");
            }
            self.skipped_routes = skipped;
        }
        let (desired, conflicts) = desired_device(
            &self.settings,
            &self.key,
            self.membership.as_ref(),
            netmap.as_ref(),
            &self.hints,
        );
        if conflicts != self.conflicts {
            for c in &conflicts {
                tracing::warn!(conflict = %c, "static peer and netmap disagree; the configuration wins");
            }
            self.conflicts = conflicts;
        }
        self.desired = desired;
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
        let key = crate::disk::keyfile::load_or_generate(&new.private_key_file)?;
        self.key = key;
        self.settings = new;
        self.recompute();
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
        let Some(address) = self.address else {
            // Not joined and no address configured: leave the interface alone (it is created
            // by the join).
            return report;
        };
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

        self.record_endpoints(&observed.peers);
        self.learn_endpoints(&observed.peers, now);

        let existing = match self.link.system_routes().await {
            Ok(r) => r,
            Err(e) => {
                report.error = Some(format!("cannot list the system's routes: {e}"));
                return report;
            }
        };
        let iface = self.settings.interface.clone();
        let mut underlay: Vec<SystemRoute> = existing
            .iter()
            .filter(|r| r.dev.as_deref() != Some(iface.as_str()))
            .cloned()
            .collect();
        underlay.sort();
        underlay.dedup();
        if underlay != self.underlay_routes {
            self.underlay_routes = underlay;
            // Only a netmap's routes depend on the underlay (and a join's bootstrap state,
            // which has none, must not be recomputed away).
            if self.netmap.is_some() {
                self.recompute();
            }
        }
        self.check_candidate(address, &existing);
        let Some(acc) = self.accepted.clone() else {
            // Nothing acceptable yet (the first desired state clashes): apply nothing.
            report.error = self.route_refusal.clone();
            return report;
        };

        let spec = LinkSpec {
            interface: acc.settings.interface.clone(),
            mtu: acc.settings.mtu,
            address: acc.address,
        };
        let mut link_ok = false;
        match self.link.configure(&spec, self.retired_address).await {
            Ok(link) => {
                if self.ifindex.is_some_and(|i| i != link.ifindex) {
                    tracing::warn!(old = ?self.ifindex, new = link.ifindex, "interface index changed (engine restarted)");
                }
                self.ifindex = Some(link.ifindex);
                self.retired_address = None;
                link_ok = true;
                for change in &link.changes {
                    tracing::info!(interface = %spec.interface, change = %change, "interface");
                }
            }
            Err(e) => {
                // Peers are still worth configuring; report the interface problem.
                report.error = Some(e.to_string());
            }
        }

        let ops = plan(&acc.desired, &observed, now);
        if !ops.is_empty() {
            self.apply_peer_ops(&ops, &mut report).await;
        }
        if link_ok {
            self.converge_routes(&acc, &existing, &mut report).await;
        }
        match self.link.advertise(&acc.settings).await {
            Ok(changes) => {
                for change in &changes {
                    tracing::info!(change = %change, "advertise");
                }
            }
            Err(e) => {
                report.error.get_or_insert_with(|| {
                    format!(
                        "advertised subnets ({}): {e}",
                        acc.settings.config_path.display()
                    )
                });
            }
        }
        if report.error.is_none() {
            report.error = self.route_refusal.clone();
        }
        report
    }

    /// Take the current desired state if its new routes clash with nothing; otherwise refuse
    /// it as a whole and keep the accepted one.
    fn check_candidate(&mut self, address: IpNet, existing: &[SystemRoute]) {
        let peers: Vec<PeerSpec> = self.desired.peers.values().cloned().collect();
        let candidate = Accepted {
            desired: self.desired.clone(),
            address,
            routes: desired_routes(address, &peers),
            settings: self.settings.clone(),
        };
        if self.accepted.as_ref() == Some(&candidate) {
            return;
        }
        // Routes already held stay ours; only the ones this state adds are checked.
        let new: Vec<IpNet> = candidate
            .routes
            .iter()
            .filter(|r| self.accepted.as_ref().is_none_or(|a| !a.routes.contains(r)))
            .copied()
            .collect();
        let found = conflicts(
            &new,
            existing,
            &candidate.settings.interface,
            &candidate.settings.routes.protected,
        );
        if found.is_empty() {
            if let Some(old) = &self.accepted {
                if old.address != candidate.address {
                    self.retired_address = Some(old.address);
                }
            }
            self.accepted = Some(candidate);
            if self.route_refusal.take().is_some() {
                tracing::info!("route conflicts resolved; the desired state is applied");
            }
            return;
        }
        let msg = format!(
            "{}; the new configuration/netmap is not applied (no peer, no route of it), the \
             previous state stays",
            refusal_message(&found)
        );
        if self.route_refusal.as_ref() != Some(&msg) {
            tracing::error!(error = %msg, "desired state refused");
        }
        self.route_refusal = Some(msg);
    }

    /// Converge the routes on our interface to the accepted state: add missing ones (never
    /// one that clashes now), remove our stale ones, never touch a foreign route.
    async fn converge_routes(
        &mut self,
        acc: &Accepted,
        existing: &[SystemRoute],
        report: &mut PassReport,
    ) {
        let iface = &acc.settings.interface;
        let clashing: Vec<IpNet> =
            conflicts(&acc.routes, existing, iface, &acc.settings.routes.protected)
                .into_iter()
                .map(|c| c.wanted)
                .collect();
        let ops = plan_routes(&acc.routes, existing, iface, &clashing);
        for c in &clashing {
            tracing::warn!(route = %c, "a route we hold now overlaps another owner's; not re-adding it if it goes");
        }
        if ops.is_empty() {
            return;
        }
        report.ops.extend(ops.iter().map(ToString::to_string));
        match self.link.apply_routes(iface, &ops).await {
            Ok(failed) if failed.is_empty() => {}
            Ok(failed) => {
                report.error.get_or_insert_with(|| {
                    format!(
                        "{} of {} route ops failed: {}",
                        failed.len(),
                        ops.len(),
                        failed.join("; ")
                    )
                });
                report.failed.extend(failed);
            }
            Err(e) => {
                report
                    .error
                    .get_or_insert_with(|| format!("routes on {iface}: {e}"));
            }
        }
    }

    async fn apply_peer_ops(&mut self, ops: &[mesh_proto::Op], report: &mut PassReport) {
        report.ops.extend(ops.iter().map(|o| o.to_string()));
        for op in ops {
            tracing::info!(op = %op, "apply");
        }
        if let Err(e) = self.wg.apply(ops).await {
            tracing::warn!(error = %e, ops = ops.len(), "batch failed; applying ops one by one");
            let mut failed = Vec::new();
            for op in ops {
                if let Err(e) = self.wg.apply(std::slice::from_ref(op)).await {
                    tracing::error!(op = %op, error = %e, "op failed");
                    failed.push(format!("{op}: {e}"));
                }
            }
            if !failed.is_empty() && report.error.is_none() {
                report.error = Some(format!(
                    "{} of {} ops failed: {}",
                    failed.len(),
                    ops.len(),
                    failed.join("; ")
                ));
            }
            report.failed.extend(failed);
        }
    }

    fn record_endpoints(&self, peers: &BTreeMap<PublicKey, ObservedPeer>) {
        let map: HashMap<IpAddr, SocketAddr> = peers
            .values()
            .filter_map(|p| Some((mesh_address(&p.allowed_ips)?.addr(), p.endpoint?)))
            .collect();
        if let Ok(mut shared) = self.observed_endpoints.write() {
            *shared = map;
        }
    }

    /// The desired peers (configuration and netmap) joined with live device data.
    pub async fn peers(&mut self) -> Result<Vec<PeerView>> {
        if self.address.is_none() && self.desired.peers.is_empty() {
            return Ok(Vec::new());
        }
        let observed = self.wg.observe().await?;
        self.record_endpoints(&observed.peers);
        Ok(self.join_peers(&observed.peers))
    }

    fn join_peers(&self, observed: &BTreeMap<PublicKey, ObservedPeer>) -> Vec<PeerView> {
        let mut out: Vec<PeerView> = self
            .desired
            .peers
            .values()
            .map(|spec| {
                let obs = observed.get(&spec.public_key).cloned();
                let from_config = self
                    .settings
                    .peers
                    .iter()
                    .find(|p| p.spec.public_key == spec.public_key);
                let from_netmap = self
                    .netmap
                    .as_ref()
                    .and_then(|n| n.peers.iter().find(|p| p.public_key == spec.public_key));
                let (name, source) = match (from_config, from_netmap) {
                    (Some(c), _) => (c.name.clone(), PeerSource::Config),
                    (None, Some(n)) => (n.name.clone(), PeerSource::Netmap),
                    (None, None) => ("coordinator".to_string(), PeerSource::Coordinator),
                };
                PeerView {
                    name,
                    public_key: spec.public_key,
                    mesh_address: mesh_address(&spec.allowed_ips),
                    allowed_ips: spec.allowed_ips.clone(),
                    observed: obs,
                    configured_keepalive: spec.persistent_keepalive,
                    source,
                    netmap: from_netmap.filter(|_| from_config.is_none()).cloned(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The agent's status.
    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            host_name: self.host_name(),
            interface: self.settings.interface.clone(),
            address: self.address,
            public_key: self.key.public_key(),
            backend: self.backend.clone(),
            listen_port: self.settings.listen_port,
            config_path: self.settings.config_path.clone(),
            ifindex: self.ifindex,
            configured_peers: self.desired.peers.len(),
            passes: self.passes,
            last_pass: self.last_pass,
            last_pass_ops: self.last_report.ops.len(),
            last_pass_failed_ops: self.last_report.failed.len(),
            last_error: self
                .reload_error
                .clone()
                .or_else(|| self.last_report.error.clone()),
            netmap_version: self.netmap.as_ref().map(|n| n.version),
            mesh: self.mesh.clone(),
            skipped_routes: self.skipped_routes.clone(),
            ungranted_routes: self
                .netmap
                .as_ref()
                .map(|n| n.ungranted_routes.clone())
                .unwrap_or_default(),
            refused: self.refused.iter().cloned().collect(),
        }
    }
}

/// What `Agent::restore` puts back.
#[derive(Debug, Clone)]
pub struct AgentSnapshot {
    key: PrivateKey,
    membership: Option<Membership>,
    netmap: Option<Netmap>,
    #[allow(dead_code)]
    address: Option<IpNet>,
}

/// Current wall-clock time as the reconciler wants it.
pub fn now() -> Duration {
    now_since_epoch()
}

#[cfg(test)]
pub(crate) mod tests;
