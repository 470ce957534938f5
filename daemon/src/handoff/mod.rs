//! What meshd hands to other software, kept in step with the mesh after every pass: the
//! integration files (K3s, DRBD, Prometheus, `/etc/hosts`, user templates), mesh DNS on our
//! mesh address with split DNS in systemd-resolved, and `/metrics`.
//!
//! The agent loop calls [`Handoff::after_pass`] after each loop turn; it only compares and
//! sends. Everything that blocks (writing files, reload commands, `resolvectl`) runs in worker
//! tasks through `spawn_blocking`, so a slow `systemctl restart k3s` never holds the loop.
//! The integration worker applies the latest [`MeshView`] only: views that arrive while an
//! apply runs are coalesced into one more apply.

pub mod dns;
pub mod integrations;
pub mod metrics;
pub mod preflight;
pub mod resolved;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mesh_proto::config::integrations::IntegrationsConfig;
use mesh_proto::config::ServiceConfig;
use mesh_proto::handoff::{IntegrationStatus, MeshView};
use mesh_proto::ObservedDevice;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::agent::{now, Agent, AgentStatus};
use crate::backend::{LinkBackend, WgBackend};
use crate::disk::keyfile::created_unix as key_created_unix;
use crate::handoff::dns::{shared_records, update_records, MeshDns, SharedRecords};
use crate::handoff::integrations::IntegrationEngine;
use crate::handoff::metrics::{labels_from_names, labels_from_netmap, Metrics};
use crate::handoff::resolved::{ensure_split_dns_system, SplitDns};
use crate::runtime::settings::HandoffSettings;

/// How often the files are re-applied without a mesh change (a fixed template, a file someone
/// edited) and split DNS is re-checked (resolved forgets it when it restarts).
pub const RECHECK: Duration = Duration::from_secs(30);
/// How long `meshctl down` waits for an integration apply in flight.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// The mesh as integrations see it now: the netmap's view (the coordinator named by its
/// address in our membership, or this host on the coordinator); on a host with a static
/// configuration (no coordinator, no membership) that configuration's; else none.
pub fn current_view<W: WgBackend, L: LinkBackend>(
    agent: &Agent<W, L>,
    static_view: Option<&MeshView>,
) -> Option<MeshView> {
    let managed = agent.settings().coordinator.is_some() || agent.membership().is_some();
    let Some(nm) = agent.netmap() else {
        // A managed host waits for its netmap: its static view would name the coordinator a
        // member, and the files would change twice at start.
        return if managed { None } else { static_view.cloned() };
    };
    let coordinator = if agent.settings().coordinator.is_some() || agent.mesh_state().is_coordinator
    {
        Some(nm.name.clone())
    } else {
        agent.membership().and_then(|m| {
            nm.peers
                .iter()
                .find(|p| p.address == m.coordinator_address)
                .map(|p| p.name.clone())
        })
    };
    Some(MeshView::new(nm, coordinator.as_deref()))
}

/// What the integration worker brings the files in line with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Job {
    config: IntegrationsConfig,
    interface: String,
    view: Option<MeshView>,
    /// Bumped by a reload: apply again (a template file may have been fixed).
    generation: u64,
}

/// Whether two views differ in anything but the netmap version. The coordinator bumps the
/// version for changes integrations do not show (endpoints, keys, routes): rewriting the K3s
/// drop-in for those would restart K3s for nothing.
fn same_mesh(a: Option<&MeshView>, b: Option<&MeshView>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            a.mesh_cidr == b.mesh_cidr && a.domain == b.domain && a.me == b.me && a.hosts == b.hosts
        }
        (None, None) => true,
        _ => false,
    }
}

type Statuses = Arc<RwLock<Vec<IntegrationStatus>>>;

async fn integration_worker(mut rx: watch::Receiver<Job>, statuses: Statuses) {
    let mut engine: Option<(IntegrationsConfig, String, IntegrationEngine)> = None;
    loop {
        let job = rx.borrow_and_update().clone();
        let stale = engine
            .as_ref()
            .is_none_or(|(c, i, _)| *c != job.config || *i != job.interface);
        if stale {
            engine = Some((
                job.config.clone(),
                job.interface.clone(),
                IntegrationEngine::with_system_runner(&job.config, job.interface.clone()),
            ));
            set_statuses(&statuses, Vec::new());
        }
        if let (Some(view), Some((config, iface, eng))) = (job.view, engine.take()) {
            if eng.is_empty() {
                engine = Some((config, iface, eng));
            } else {
                let mut eng = eng;
                let applied = tokio::task::spawn_blocking(move || {
                    eng.apply(&view, now().as_secs());
                    eng
                })
                .await;
                match applied {
                    Ok(eng) => {
                        set_statuses(&statuses, eng.statuses());
                        engine = Some((config, iface, eng));
                    }
                    // The engine is lost with the panicked task; the next turn builds it anew.
                    Err(e) => tracing::error!(error = %e, "integration apply panicked"),
                }
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            () = tokio::time::sleep(RECHECK) => {}
        }
    }
}

fn set_statuses(statuses: &Statuses, new: Vec<IntegrationStatus>) {
    match statuses.write() {
        Ok(mut g) => *g = new,
        Err(poisoned) => *poisoned.into_inner() = new,
    }
}

/// Keeps systemd-resolved sending `mesh.internal` to our DNS: at start, on a change, and every
/// [`RECHECK`]. Stops trying (one log line) on a host without resolvectl.
async fn split_dns_worker(mut rx: watch::Receiver<Option<(String, IpAddr)>>) {
    let mut unavailable = false;
    let mut last_error: Option<String> = None;
    loop {
        let want = rx.borrow_and_update().clone();
        if let (Some((iface, addr)), false) = (want, unavailable) {
            let r =
                tokio::task::spawn_blocking(move || ensure_split_dns_system(&iface, addr)).await;
            match r {
                Ok(Ok(SplitDns::Unavailable)) => unavailable = true,
                Ok(Ok(_)) => last_error = None,
                Ok(Err(e)) => {
                    // Said once per distinct failure, not on every pass.
                    let said = e.to_string();
                    if last_error.as_ref() != Some(&said) {
                        tracing::warn!(error = %e, "cannot set split DNS in systemd-resolved; retrying");
                    }
                    last_error = Some(said);
                }
                Err(e) => tracing::error!(error = %e, "split DNS task panicked"),
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            () = tokio::time::sleep(RECHECK) => {}
        }
    }
}

struct MetricsServer {
    at: Listen,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// DNS, metrics and integrations of one daemon.
pub struct Handoff {
    settings: HandoffSettings,
    jobs: Option<watch::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    statuses: Statuses,
    records: SharedRecords,
    dns: Option<(MeshDns, Listen)>,
    split: Option<watch::Sender<Option<(String, IpAddr)>>>,
    split_worker: Option<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    metrics_server: Option<MetricsServer>,
    /// `[metrics] loopback`: the same /metrics on 127.0.0.1.
    metrics_loopback: Option<MetricsServer>,
    /// Where a bind last failed (logged once per place).
    dns_bind_failed: Option<Listen>,
    metrics_bind_failed: Option<Listen>,
    loopback_bind_failed: Option<Listen>,
    passes_seen: u64,
    /// The view handed to DNS and the integrations (its version: the one of the last change
    /// they show).
    view: Option<MeshView>,
    generation: u64,
}

impl Handoff {
    /// Start the workers (needs a tokio runtime); nothing is served or written before the
    /// first [`Handoff::after_pass`].
    pub fn start(settings: HandoffSettings, interface: &str) -> Handoff {
        let statuses: Statuses = Arc::new(RwLock::new(Vec::new()));
        let (jobs, rx) = watch::channel(Job {
            config: settings.integrations.clone(),
            interface: interface.to_owned(),
            view: None,
            generation: 0,
        });
        let worker = tokio::spawn(integration_worker(rx, statuses.clone()));
        let (split, split_rx) = watch::channel(None);
        let split_worker = tokio::spawn(split_dns_worker(split_rx));
        Handoff {
            settings,
            jobs: Some(jobs),
            worker: Some(worker),
            statuses,
            records: shared_records(None),
            dns: None,
            split: Some(split),
            split_worker: Some(split_worker),
            metrics: Arc::new(Metrics::new()),
            metrics_server: None,
            metrics_loopback: None,
            dns_bind_failed: None,
            metrics_bind_failed: None,
            loopback_bind_failed: None,
            passes_seen: 0,
            view: None,
            generation: 0,
        }
    }

    pub fn settings(&self) -> &HandoffSettings {
        &self.settings
    }

    /// The configuration was reloaded: the files are applied again (templates re-read), a
    /// changed `[integrations]` rebuilds the engine, a changed `[dns]`/`[metrics]` moves or
    /// stops the servers at the next pass.
    pub fn reload(&mut self, settings: HandoffSettings) {
        if settings != self.settings {
            tracing::info!("dns, metrics or integrations settings changed");
        }
        self.settings = settings;
        self.generation += 1;
    }

    /// The integrations' statuses (for `meshctl status` and `meshctl doctor`).
    pub fn statuses(&self) -> Vec<IntegrationStatus> {
        match self.statuses.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Where mesh DNS and `/metrics` listen now.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.as_ref().map(|(d, _)| d.local_addr())
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(|m| m.at.addr)
    }

    /// After every loop turn: hand a changed mesh view to the integrations and DNS, start or
    /// move the servers once our address is on the interface, and update the metrics after
    /// a new pass.
    pub async fn after_pass<W: WgBackend, L: LinkBackend>(&mut self, agent: &mut Agent<W, L>) {
        let st = agent.status();
        let view = current_view(agent, self.settings.static_view.as_ref());
        if !same_mesh(view.as_ref(), self.view.as_ref()) {
            if let Some(v) = &view {
                if update_records(&self.records, v) {
                    tracing::debug!(
                        version = v.version,
                        hosts = v.hosts.len(),
                        "mesh DNS records updated"
                    );
                }
            }
            self.view = view;
        }
        if let Some(jobs) = &self.jobs {
            let job = Job {
                config: self.settings.integrations.clone(),
                interface: st.interface.clone(),
                view: self.view.clone(),
                generation: self.generation,
            };
            jobs.send_if_modified(|j| {
                let changed = *j != job;
                if changed {
                    *j = job;
                }
                changed
            });
        }
        // Our address is on the interface once a pass configured the link.
        let on_link = st.ifindex.and(st.address).map(|a| a.addr());
        let link = OnLink {
            ip: on_link,
            interface: &st.interface,
            ifindex: st.ifindex,
        };
        self.ensure_dns(link, &st).await;
        self.ensure_metrics(link).await;
        if st.passes != self.passes_seen {
            self.passes_seen = st.passes;
            self.observe(agent, &st).await;
        }
    }

    async fn ensure_dns(&mut self, link: OnLink<'_>, st: &AgentStatus) {
        let want = want_listen(self.settings.dns, link);
        if self.dns.as_ref().map(|(_, at)| at) != want.as_ref() {
            if let Some((old, at)) = self.dns.take() {
                if let Err(e) = old.shutdown().await {
                    tracing::warn!(addr = %at.addr, error = %e, "mesh DNS did not stop cleanly");
                }
            }
            if let Some(at) = want {
                match MeshDns::bind_on(at.addr, at.device(), self.records.clone()) {
                    Ok(dns) => {
                        self.dns = Some((dns, at));
                        self.dns_bind_failed = None;
                    }
                    Err(e) => {
                        if self.dns_bind_failed.as_ref() != Some(&at) {
                            tracing::warn!(addr = %at.addr, error = %e, "cannot serve mesh DNS; retrying after each pass (set [dns] listen_port or enable = false)");
                        }
                        self.dns_bind_failed = Some(at);
                    }
                }
            }
        }
        if let Some(split) = &self.split {
            let want = self
                .dns_addr()
                .filter(|a| a.port() == 53)
                .map(|a| (st.interface.clone(), a.ip()));
            split.send_if_modified(|s| {
                let changed = *s != want;
                if changed {
                    *s = want;
                }
                changed
            });
        }
    }

    async fn ensure_metrics(&mut self, link: OnLink<'_>) {
        let want = want_listen(self.settings.metrics, link);
        ensure_metrics_server(
            &mut self.metrics_server,
            &mut self.metrics_bind_failed,
            want,
            &self.metrics,
        )
        .await;
        let cfg = self.settings.metrics;
        let loopback = (cfg.enable && cfg.loopback).then(|| Listen {
            addr: SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, cfg.listen_port)),
            device: None,
        });
        ensure_metrics_server(
            &mut self.metrics_loopback,
            &mut self.loopback_bind_failed,
            loopback,
            &self.metrics,
        )
        .await;
    }

    async fn observe<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &mut Agent<W, L>,
        st: &AgentStatus,
    ) {
        let m = &self.metrics;
        let failed = st.last_error.is_some() || st.last_pass_failed_ops > 0;
        // `last_pass` is when the pass started: the time since is the pass (and the little
        // that ran after it in the same loop turn).
        let took = st
            .last_pass
            .map(|started| now().saturating_sub(started))
            .unwrap_or_default();
        m.observe_pass(took, failed, now().as_secs());
        m.set_integrations(
            self.statuses()
                .into_iter()
                .map(|s| (s.name, s.ok, s.failures))
                .collect(),
        );
        m.set_netmap_version(st.netmap_version);
        m.set_coordinator_reachable(st.mesh.reachable == Some(true));
        m.set_key_created(
            key_created_unix(&agent.settings().private_key_file),
            agent.settings().rotate_every,
        );
        if !self.settings.metrics.enable || st.address.is_none() {
            return;
        }
        let device: ObservedDevice = match agent.wg.observe().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "metrics: device not observable");
                return;
            }
        };
        let mut labels = match agent.netmap() {
            Some(nm) => labels_from_netmap(nm, &device),
            None => Default::default(),
        };
        // Static peers: the configuration's names win (as in `meshctl peers`).
        labels.extend(labels_from_names(
            agent
                .settings()
                .peers
                .iter()
                .map(|p| (p.spec.public_key, p.name.as_str())),
            &device,
        ));
        m.observe_device(&st.interface, &device, &labels);
    }

    /// Stop everything (before `meshctl down` removes what we own, so no apply in flight
    /// writes the hosts block back): the workers finish their current step, the servers close.
    pub async fn stop(&mut self) {
        self.jobs = None;
        self.split = None;
        for task in [self.worker.take(), self.split_worker.take()]
            .into_iter()
            .flatten()
        {
            let abort = task.abort_handle();
            if tokio::time::timeout(STOP_WAIT, task).await.is_err() {
                tracing::warn!("an integration step is still running; abandoning it");
                abort.abort();
            }
        }
        if let Some((dns, _)) = self.dns.take() {
            let _ = dns.shutdown().await;
        }
        for m in [self.metrics_server.take(), self.metrics_loopback.take()]
            .into_iter()
            .flatten()
        {
            let _ = m.stop.send(());
            let _ = m.task.await;
        }
    }
}

/// Our mesh address and interface after the last pass.
#[derive(Debug, Clone, Copy)]
struct OnLink<'a> {
    /// `None` until a pass put our address on the interface.
    ip: Option<IpAddr>,
    interface: &'a str,
    ifindex: Option<u32>,
}

/// Where a server listens: the address and, when bound to the mesh interface, that
/// interface and its index at the time (a recreated interface has a new index: the sockets
/// bound to the old one receive nothing, so the server binds again).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listen {
    addr: SocketAddr,
    device: Option<(String, Option<u32>)>,
}

impl Listen {
    fn device(&self) -> Option<&str> {
        self.device.as_ref().map(|(d, _)| d.as_str())
    }
}

/// Start, move or stop one `/metrics` server so that it listens at `want`.
async fn ensure_metrics_server(
    slot: &mut Option<MetricsServer>,
    bind_failed: &mut Option<Listen>,
    want: Option<Listen>,
    metrics: &Arc<Metrics>,
) {
    if slot.as_ref().map(|m| &m.at) == want.as_ref() {
        return;
    }
    if let Some(old) = slot.take() {
        let _ = old.stop.send(());
        let _ = old.task.await;
    }
    let Some(at) = want else {
        return;
    };
    match crate::runtime::serve::bind_tcp(at.addr, at.device(), 128, "metrics") {
        Ok(listener) => {
            let (stop, stop_rx) = oneshot::channel::<()>();
            let metrics = metrics.clone();
            let task = tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop_rx.await;
                };
                crate::handoff::metrics::serve(listener, metrics, shutdown).await;
            });
            *slot = Some(MetricsServer { at, stop, task });
            *bind_failed = None;
        }
        Err(e) => {
            if bind_failed.as_ref() != Some(&at) {
                tracing::warn!(addr = %at.addr, error = %e, "cannot serve /metrics; retrying after each pass (set [metrics] listen_port or enable = false)");
            }
            *bind_failed = Some(at);
        }
    }
}

fn want_listen(cfg: ServiceConfig, link: OnLink<'_>) -> Option<Listen> {
    let addr = want_addr(cfg, link.ip)?;
    Some(Listen {
        addr,
        device: cfg
            .mesh_interface_only
            .then(|| (link.interface.to_owned(), link.ifindex)),
    })
}

fn want_addr(cfg: ServiceConfig, on_link: Option<IpAddr>) -> Option<SocketAddr> {
    on_link
        .filter(|_| cfg.enable)
        .map(|ip| SocketAddr::new(ip, cfg.listen_port))
}

/// Remove what meshd put into shared system files for `meshctl down`: the `/etc/hosts` block
/// and the split DNS on our interface. Returns what was removed and what failed.
pub fn teardown(interface: &str, integrations: &IntegrationsConfig) -> (Vec<String>, Vec<String>) {
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    if let Some(h) = &integrations.hosts {
        let engine = IntegrationEngine::with_system_runner(integrations, interface);
        match engine.remove_hosts_block() {
            Ok(()) => removed.push(format!("removed the meshd block of {}", h.path.display())),
            Err(e) => failed.push(format!(
                "cannot remove the meshd block of {}: {e}",
                h.path.display()
            )),
        }
    }
    // Split DNS lives on the link: with the interface gone, resolved has dropped it already.
    let link_exists = std::path::Path::new("/sys/class/net")
        .join(interface)
        .exists();
    if let Some(r) = crate::handoff::resolved::SystemResolvectl::find().filter(|_| link_exists) {
        match crate::handoff::resolved::revert_split_dns(&r, interface) {
            Ok(()) => removed.push(format!("reverted split DNS on {interface}")),
            Err(e) => failed.push(e.to_string()),
        }
    }
    (removed, failed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn want_addr_follows_the_settings_and_the_link() {
        let ip: IpAddr = "10.99.99.1".parse().unwrap();
        let on = ServiceConfig {
            enable: true,
            listen_port: 5353,
            mesh_interface_only: true,
            loopback: false,
        };
        assert_eq!(want_addr(on, Some(ip)), Some(SocketAddr::new(ip, 5353)));
        // Bound to the mesh interface: a new ifindex (the interface was recreated) is a new
        // place to listen; without the binding it is not.
        let link = |ifindex| OnLink {
            ip: Some(ip),
            interface: "wgmesh0",
            ifindex: Some(ifindex),
        };
        let first = want_listen(on, link(7)).unwrap();
        assert_eq!(first.device(), Some("wgmesh0"));
        assert_ne!(want_listen(on, link(9)), Some(first.clone()));
        assert_eq!(want_listen(on, link(7)), Some(first));
        let anywhere = ServiceConfig {
            mesh_interface_only: false,
            ..on
        };
        assert_eq!(
            want_listen(anywhere, link(7)),
            want_listen(anywhere, link(9))
        );
        assert_eq!(want_listen(anywhere, link(7)).unwrap().device(), None);
        assert_eq!(want_addr(on, None), None);
        let off = ServiceConfig {
            enable: false,
            ..on
        };
        assert_eq!(want_addr(off, Some(ip)), None);
    }

    #[test]
    fn a_version_bump_alone_is_no_mesh_change() {
        let view = |version: u64, extra: bool| {
            let mut peers = vec![mesh_proto::config::PeerConfig {
                name: "dock-prod".into(),
                public_key: mesh_proto::PublicKey([2; 32]),
                endpoint: None,
                allowed_ips: vec!["10.99.99.2/32".parse().unwrap()],
                persistent_keepalive: None,
            }];
            if extra {
                peers.push(mesh_proto::config::PeerConfig {
                    name: "dock-mirror".into(),
                    public_key: mesh_proto::PublicKey([3; 32]),
                    endpoint: None,
                    allowed_ips: vec!["10.99.99.3/32".parse().unwrap()],
                    persistent_keepalive: None,
                });
            }
            let mut v =
                MeshView::from_static("dock-load", "10.99.99.1/24".parse().unwrap(), &peers);
            v.version = version;
            v
        };
        assert!(same_mesh(Some(&view(1, false)), Some(&view(7, false))));
        assert!(!same_mesh(Some(&view(1, false)), Some(&view(1, true))));
        assert!(!same_mesh(None, Some(&view(1, false))));
        assert!(same_mesh(None, None));
    }

    #[test]
    fn teardown_removes_only_our_block() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(
            &hosts,
            "127.0.0.1 localhost\n# BEGIN meshd (managed by meshd)\n10.99.99.1\tdock-load.mesh.internal dock-load\n# END meshd\n::1 localhost\n",
        )
        .unwrap();
        let cfg = mesh_proto::config::integrations::parse_integrations(
            &format!(
                "[integrations.hosts]\npath = {:?}\n",
                hosts.display().to_string()
            ),
            "t.toml",
        )
        .unwrap();
        let (removed, failed) = teardown("wgtest0", &cfg);
        assert!(failed.is_empty(), "{failed:?}");
        assert!(removed[0].contains("meshd block"), "{removed:?}");
        assert_eq!(
            std::fs::read_to_string(&hosts).unwrap(),
            "127.0.0.1 localhost\n::1 localhost\n"
        );
    }
}
