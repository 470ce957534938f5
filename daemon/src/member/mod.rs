//! The member side of a managed mesh: the desired device from configuration + netmap, joining
//! with a token (innernet-style bootstrap; docs/ARCHITECTURE.md, "Walk: a join"), following the netmap and reporting
//! endpoints.

pub mod client;
pub mod join;
pub mod rotate;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use mesh_proto::member::{Action, Backoff, KeyFacts, Member, NetmapVerdict, Role};
use mesh_proto::netmap::Netmap;
use mesh_proto::wire::api::EndpointReport;
use mesh_proto::{DeviceSpec, PeerSpec, PrivateKey, PublicKey};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::agent::{now, Agent};
use crate::backend::{LinkBackend, WgBackend};
use crate::disk::state::{Membership, StateDir};
use crate::member::join::JoinError;
use crate::member::rotate::{Outcome, RotateError};
use crate::runtime::settings::Settings;

/// Keepalive toward the coordinator while joining (and before the first netmap).
pub const BOOTSTRAP_KEEPALIVE: u16 = 25;
pub use mesh_proto::member::ENDPOINT_CHECK;

/// Something from the mesh side for the agent loop.
#[derive(Debug)]
pub enum MeshEvent {
    /// A newer netmap (from the coordinator API, or from the in-process coordinator).
    Netmap(Box<Netmap>),
    /// An API call succeeded.
    Reachable,
    /// An API call failed.
    Unreachable(String),
    /// An endpoint report finished: what was reported, or why it failed.
    EndpointsReported(Result<EndpointReport, client::CallError>),
    /// A key notice request finished: the coordinator key we knew and its current one.
    CoordinatorKey(Result<(PublicKey, PublicKey), crate::member::rotate::NoticeFetchError>),
    /// A step of our key rotation that waited on the coordinator finished.
    RotationStep(Box<crate::member::rotate::StepDone>),
    /// The coordinator answered our join (or did not, in time).
    JoinAnswer(Box<crate::member::join::Answer>),
    /// The coordinator answered (or not) through the next key we are trying.
    NextKeyProbed(Box<Result<Option<Netmap>, client::CallError>>),
}

/// Where a join came from, and so who hears how it ended.
#[derive(Debug)]
pub enum JoinOrigin {
    /// `meshctl join`: the reply waits for the outcome.
    Control(oneshot::Sender<Result<Membership, JoinError>>),
    /// `[daemon] join_token_file`: removed once spent, tried again later when the coordinator
    /// did not answer.
    File(std::path::PathBuf),
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// The coordinator as a peer, from the membership (until a netmap names it).
pub fn coordinator_peer(m: &Membership) -> PeerSpec {
    PeerSpec {
        public_key: m.coordinator_public_key,
        preshared_key: None,
        endpoint: m.coordinator_endpoints.first().copied(),
        allowed_ips: vec![host_net(m.coordinator_address)],
        persistent_keepalive: Some(BOOTSTRAP_KEEPALIVE),
    }
}

/// The netmap this host applies, and the peers' prefixes it skips: `routes.accept` opts in,
/// `mesh_proto::routes::refusal` refuses the mesh, loopback, link-local, multicast, K3s's
/// CIDRs, `routes.protected`, the underlay (`system_routes` not on our interface, the default
/// gateway) and the addresses the tunnel itself travels to (the coordinator's endpoints and
/// the configured peers' endpoints).
pub fn accepted_netmap(
    settings: &Settings,
    membership: Option<&Membership>,
    netmap: &Netmap,
    system_routes: &[mesh_proto::routes::SystemRoute],
) -> (Netmap, Vec<mesh_proto::routes::SkippedRoute>) {
    // Only endpoints no member can choose: a member's reported addresses are its own word,
    // and counting them would let it veto another host's approved route.
    let mut endpoints: Vec<IpAddr> = Vec::new();
    if let Some(m) = membership {
        endpoints.extend(m.coordinator_endpoints.iter().map(|e| e.ip()));
    }
    endpoints.extend(
        settings
            .peers
            .iter()
            .filter_map(|p| p.spec.endpoint.map(|e| e.ip())),
    );
    endpoints.sort();
    endpoints.dedup();
    let static_peers: Vec<(String, IpNet)> = settings
        .peers
        .iter()
        .flat_map(|p| p.spec.allowed_ips.iter().map(|n| (p.name.clone(), *n)))
        .collect();
    let policy = mesh_proto::routes::AcceptPolicy {
        accept: &settings.routes.accept,
        protected: &settings.routes.protected,
        our_dev: &settings.interface,
        system_routes,
        endpoints: &endpoints,
        static_peers: &static_peers,
    };
    mesh_proto::routes::accept_netmap(netmap, &policy)
}

/// The desired device: the static `[[peer]]`s of the configuration plus the netmap's peers
/// (endpoint = first candidate). A netmap peer with the key of a static peer, or with an
/// allowed IP a static peer holds, is left out: the configuration wins. Returns the device and
/// the conflicts found (for the log).
pub fn desired_device(
    settings: &Settings,
    key: &PrivateKey,
    membership: Option<&Membership>,
    netmap: Option<&Netmap>,
) -> (DeviceSpec, Vec<String>) {
    let mut spec = settings.desired(key);
    let own = key.public_key();
    let mut conflicts = Vec::new();
    let static_ips: Vec<(String, IpNet)> = settings
        .peers
        .iter()
        .flat_map(|p| p.spec.allowed_ips.iter().map(|n| (p.name.clone(), *n)))
        .collect();
    if let Some(nm) = netmap {
        for p in &nm.peers {
            if p.public_key == own {
                continue;
            }
            if let Some(s) = settings
                .peers
                .iter()
                .find(|s| s.spec.public_key == p.public_key)
            {
                conflicts.push(format!(
                    "netmap peer {} has the key of static peer {}; using the static peer",
                    p.name, s.name
                ));
                continue;
            }
            if let Some((name, net)) = static_ips
                .iter()
                .find(|(_, n)| p.allowed_ips.iter().any(|a| overlaps(a, n)))
            {
                conflicts.push(format!(
                    "netmap peer {} overlaps static peer {name} ({net}); left out",
                    p.name
                ));
                continue;
            }
            let mut allowed_ips: Vec<IpNet> = p.allowed_ips.iter().map(IpNet::trunc).collect();
            if allowed_ips.is_empty() {
                allowed_ips.push(host_net(p.address));
            }
            allowed_ips.sort();
            allowed_ips.dedup();
            spec.peers.insert(
                p.public_key,
                PeerSpec {
                    public_key: p.public_key,
                    preshared_key: None,
                    endpoint: p.endpoints.first().map(|c| c.addr),
                    allowed_ips,
                    persistent_keepalive: p.persistent_keepalive.filter(|k| *k != 0),
                },
            );
            // A rotation in progress: accept handshakes from the peer's next key, route
            // nothing to it (mesh_proto::rotation, "Prepared").
            if let Some(next) = p
                .next_public_key
                .filter(|n| *n != own && *n != p.public_key)
            {
                if !settings.peers.iter().any(|s| s.spec.public_key == next) {
                    spec.peers.entry(next).or_insert(PeerSpec {
                        public_key: next,
                        preshared_key: None,
                        endpoint: p.endpoints.first().map(|c| c.addr),
                        allowed_ips: Vec::new(),
                        persistent_keepalive: None,
                    });
                }
            }
        }
    }
    if let Some(m) = membership {
        let coord = coordinator_peer(m);
        let taken = spec.peers.values().any(|p| {
            p.allowed_ips
                .iter()
                .any(|a| coord.allowed_ips.iter().any(|c| overlaps(a, c)))
        });
        if coord.public_key != own && !spec.peers.contains_key(&coord.public_key) && !taken {
            spec.peers.insert(coord.public_key, coord);
        }
    }
    (spec, conflicts)
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Who this host rotates its key with: its own registry on the coordinator host, the
/// coordinator's API on a member.
pub fn registrar<W: WgBackend, L: LinkBackend>(
    agent: &Agent<W, L>,
    member: &MemberRuntime,
) -> Result<crate::member::rotate::Registrar, RotateError> {
    use crate::member::rotate::Registrar;
    match (&member.coordinator, agent.membership()) {
        (Some(coord), _) => Ok(Registrar::Local(coord.clone())),
        (None, Some(m)) => Ok(Registrar::Remote(m.api_addr())),
        (None, None) => Err(RotateError::NotManaged),
    }
}

/// Follow the netmap: long-poll the coordinator, send each newer netmap to the loop; on
/// errors back off ([`Backoff`]: 0.5 s doubling to 5 s, jittered) and keep going.
pub fn spawn_follower(
    api: SocketAddr,
    signer: client::SignerCell,
    since: u64,
    tx: mpsc::Sender<MeshEvent>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut since = since;
        let mut backoff = Backoff::default();
        let mut reachable = None;
        loop {
            // Until the coordinator has answered (at start, and after failures) ask for the
            // current netmap without parking: the answer comes at once, so the loop learns the
            // coordinator is back now, not when a long-poll on an unchanged netmap ends.
            let ask = if reachable == Some(true) { since } else { 0 };
            let result = match signer.get() {
                Ok(signer) => client::fetch_netmap(api, &signer, ask).await,
                Err(e) => Err(e),
            };
            let ok = result.is_ok();
            let event = match result {
                Ok(Some(nm)) => {
                    since = nm.version;
                    backoff.reset();
                    if tx.send(MeshEvent::Netmap(Box::new(nm))).await.is_err() {
                        return;
                    }
                    MeshEvent::Reachable
                }
                Ok(None) => {
                    backoff.reset();
                    MeshEvent::Reachable
                }
                Err(e) => MeshEvent::Unreachable(e.to_string()),
            };
            if reachable != Some(ok) || !ok {
                reachable = Some(ok);
                if tx.send(event).await.is_err() {
                    return;
                }
            }
            if !ok {
                tokio::time::sleep(
                    backoff.next_wait(rand_core::RngCore::next_u32(&mut rand_core::OsRng)),
                )
                .await;
            }
        }
    })
}

/// Report `report` to the coordinator in the background; the outcome comes back as an event.
/// Run `work` as a task and hand what it returns to the loop as the event `event` makes, so
/// the loop never waits on it. Nothing is sent once the loop is gone.
fn spawn_for_loop<T: Send + 'static>(
    tx: &mpsc::Sender<MeshEvent>,
    work: impl std::future::Future<Output = T> + Send + 'static,
    event: impl FnOnce(T) -> MeshEvent + Send + 'static,
) {
    let tx = tx.clone();
    tokio::spawn(async move {
        let _ = tx.send(event(work.await)).await;
    });
}

pub fn spawn_report(
    api: SocketAddr,
    signer: client::SignerCell,
    report: EndpointReport,
    tx: mpsc::Sender<MeshEvent>,
) {
    let work = async move {
        match signer.get() {
            Ok(signer) => client::report_endpoints(api, &signer, &report)
                .await
                .map(|()| report),
            Err(e) => Err(e),
        }
    };
    spawn_for_loop(&tx, work, MeshEvent::EndpointsReported);
}

/// Our underlay addresses, ready to report: sorted, without loopback/link-local/mesh.
pub fn endpoint_report(
    listen_port: u16,
    mut addresses: Vec<IpAddr>,
    mesh: Option<IpNet>,
) -> EndpointReport {
    addresses.retain(|a| usable_underlay(a) && !mesh.is_some_and(|m| m.contains(a)));
    addresses.sort();
    addresses.dedup();
    EndpointReport {
        listen_port,
        addresses,
        advertise: Vec::new(),
    }
}

fn usable_underlay(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => {
            !(v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// The member side of the loop: the policy ([`mesh_proto::member::Member`]) and what carries
/// out its actions (the follower task, the rotation and join in progress, the state directory).
pub struct MemberRuntime {
    pub state: StateDir,
    pub tx: mpsc::Sender<MeshEvent>,
    /// On the coordinator host: its registry (it rotates its own key through it).
    pub coordinator: Option<crate::coordinator::Coordinator>,
    /// The decisions: when to take a netmap, rotate, probe, ask for notices, report.
    policy: Member,
    follower: Option<JoinHandle<()>>,
    /// Our key rotation in progress, and who waits for its outcome.
    rotation: Option<(crate::member::rotate::Run, Vec<RotationWaiter>)>,
    /// Our join in progress (waiting for the coordinator's answer).
    join: Option<(crate::member::join::Pending, JoinOrigin)>,
    /// The next-key probe in progress (the device runs the next key meanwhile).
    probe: Option<crate::member::rotate::Probe>,
    /// The policy asked to try the join from `join_token_file` again (the loop does it).
    pub file_join_due: bool,
}

/// Someone waiting for the outcome of our key rotation (`meshctl rotate`).
pub type RotationWaiter = oneshot::Sender<Result<Outcome, RotateError>>;

impl std::fmt::Debug for MemberRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberRuntime")
            .field("state", &self.state)
            .field("coordinator", &self.coordinator.is_some())
            .field("policy", &self.policy)
            .field("rotation", &self.rotation.as_ref().map(|(run, _)| run))
            .finish_non_exhaustive()
    }
}

/// The policy's clock: the wall clock at the first use, advanced by tokio's monotonic clock
/// (so a paused test clock drives the policy too, and a wall-clock step does not).
pub fn policy_now() -> Duration {
    static ANCHOR: std::sync::OnceLock<(Duration, tokio::time::Instant)> =
        std::sync::OnceLock::new();
    let (wall, mono) = ANCHOR.get_or_init(|| (now(), tokio::time::Instant::now()));
    *wall + mono.elapsed()
}

/// What the policy needs to know about our key files.
fn key_facts<W: WgBackend, L: LinkBackend>(agent: &Agent<W, L>) -> KeyFacts {
    let path = &agent.settings().private_key_file;
    KeyFacts {
        public_key: agent.key().public_key(),
        created_unix: crate::disk::keyfile::created_unix(path),
        next_on_disk: crate::disk::keyfile::next_path(path).exists(),
    }
}

impl MemberRuntime {
    pub fn new(state: StateDir, tx: mpsc::Sender<MeshEvent>) -> Self {
        MemberRuntime {
            state,
            tx,
            coordinator: None,
            policy: Member::new(Role::Unmanaged),
            follower: None,
            rotation: None,
            join: None,
            probe: None,
            file_join_due: false,
        }
    }

    /// Give the policy the facts it decides on: our role, the configuration, the key files.
    /// Cheap (two `stat`s); done before each input so the policy never decides on stale facts.
    fn sync<W: WgBackend, L: LinkBackend>(&mut self, agent: &Agent<W, L>) {
        let role = match (&self.coordinator, agent.membership()) {
            (Some(_), _) => Role::Coordinator,
            (None, Some(_)) => Role::Member,
            (None, None) => Role::Unmanaged,
        };
        if role != self.policy.role() {
            self.policy.handle_joined(role);
        }
        self.policy.handle_config(
            agent.settings().rotate_every,
            agent.settings().routes.advertise.clone(),
        );
        self.policy.handle_key(key_facts(agent));
        if let Some(coord) = &self.coordinator {
            self.policy
                .handle_followers_returned(coord.followers_returned());
        }
    }

    /// At start: load the membership and the cached netmap (so the mesh comes back even while
    /// the coordinator is down), then follow the coordinator.
    pub async fn restore<W: WgBackend, L: LinkBackend>(&mut self, agent: &mut Agent<W, L>) {
        match self.state.load_membership() {
            Ok(Some(m)) => {
                tracing::info!(host = %m.host_name, address = %m.address, "member of a mesh");
                agent.set_membership(Some(m));
                match self.state.load_netmap() {
                    Ok(Some(nm)) => {
                        tracing::info!(version = nm.version, "restored the cached netmap");
                        agent.set_netmap(nm);
                    }
                    Ok(None) => tracing::warn!("no cached netmap; waiting for the coordinator"),
                    Err(e) => tracing::warn!(error = %e, "cannot read the cached netmap"),
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot load the membership; not following a mesh")
            }
        }
        self.sync(agent);
        self.policy.handle_start(key_facts(agent));
        self.drive(agent).await;
    }

    /// Carry out what the policy decided, until it has nothing more.
    async fn drive<W: WgBackend, L: LinkBackend>(&mut self, agent: &mut Agent<W, L>) {
        while let Some(action) = self.policy.poll_action() {
            match action {
                Action::Follow => self.follow(agent),
                Action::Rotate(why) => {
                    tracing::info!(
                        due = why.due,
                        pending = why.pending,
                        asked = why.asked,
                        "key rotation"
                    );
                    self.rotate_now(agent, None).await;
                }
                Action::RotationHeld { static_peers } => tracing::warn!(
                    static_peers = ?static_peers,
                    "scheduled key rotation held: these static peers list our key by hand and \
                     would lose us; rotate with `meshctl rotate`, then update them with \
                     `meshctl static-config NAME` on the coordinator"
                ),
                Action::ProbeNextKey => self.start_probe(agent).await,
                Action::FetchKeyNotices => self.fetch_notices(agent),
                Action::ReportEndpoints(report) => {
                    let Some(api) = agent.membership().map(Membership::api_addr) else {
                        self.policy.handle_report_done(None);
                        continue;
                    };
                    spawn_report(api, agent.signer_cell(), report, self.tx.clone());
                }
                Action::RetryFileJoin => self.file_join_due = true,
            }
        }
    }

    /// (Re)start following the coordinator of the current membership.
    fn follow<W: WgBackend, L: LinkBackend>(&mut self, agent: &Agent<W, L>) {
        if let Some(h) = self.follower.take() {
            h.abort();
        }
        let Some(api) = agent.membership().map(Membership::api_addr) else {
            return;
        };
        let since = agent.netmap().map(|n| n.version).unwrap_or(0);
        self.follower = Some(spawn_follower(
            api,
            agent.signer_cell(),
            since,
            self.tx.clone(),
        ));
    }

    /// Apply an event from the follower, a task or a report.
    pub async fn on_event<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &mut Agent<W, L>,
        event: MeshEvent,
    ) {
        self.sync(agent);
        let at = policy_now();
        match event {
            MeshEvent::Netmap(nm) => {
                let nm = *nm;
                let version = nm.version;
                if self.policy.handle_netmap(at, &nm) == NetmapVerdict::Stale {
                    tracing::debug!(version, "skipped a netmap from before our rotation");
                    return;
                }
                if nm.rotate_requested && self.policy.rotation_asked() == Some(version) {
                    tracing::info!(version, "an admin asked this host to rotate its key");
                }
                // Taken before the rotation the policy may have asked for starts.
                if agent.set_netmap(nm.clone()) {
                    if agent.membership().is_some() {
                        if let Err(e) = self.state.save_netmap(&nm) {
                            tracing::warn!(error = %e, "cannot cache the netmap");
                        }
                    }
                    agent.reconcile(now()).await;
                }
                if let Some(coord) = &self.coordinator {
                    coord.applied_own(version);
                }
            }
            MeshEvent::Reachable => {
                if agent.mesh_state().reachable != Some(true) {
                    tracing::info!("coordinator reachable");
                }
                let st = agent.mesh_state_mut();
                st.reachable = Some(true);
                st.last_error = None;
                st.last_contact_unix = Some(now().as_secs());
                self.policy.handle_reachable(at);
            }
            MeshEvent::Unreachable(e) => {
                if agent.mesh_state().reachable != Some(false) {
                    tracing::warn!(error = %e, "coordinator unreachable; keeping the last netmap");
                }
                let st = agent.mesh_state_mut();
                st.reachable = Some(false);
                st.last_error = Some(e);
                self.policy.handle_unreachable(at);
            }
            MeshEvent::EndpointsReported(r) => match r {
                Ok(rep) => {
                    tracing::info!(addresses = ?rep.addresses, port = rep.listen_port, "endpoints reported");
                    self.policy.handle_report_done(Some(rep));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot report endpoints; retrying later");
                    self.policy.handle_report_done(None);
                }
            },
            MeshEvent::JoinAnswer(answer) => {
                let Some((pending, origin)) = self.join.take() else {
                    return;
                };
                let r = crate::member::join::finish(agent, &self.state, pending, *answer).await;
                self.join_ended(agent, r, origin).await;
            }
            MeshEvent::RotationStep(done) => {
                let Some((mut run, waiters)) = self.rotation.take() else {
                    return;
                };
                let progress = run.step_done(agent, &self.state, *done).await;
                self.rotation = Some((run, waiters));
                self.rotation_progress(agent, progress);
            }
            MeshEvent::CoordinatorKey(r) => {
                let updated = match r {
                    Ok((known, new)) => self.take_coordinator_key(agent, known, new).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "no usable coordinator key notice");
                        false
                    }
                };
                self.sync(agent);
                self.policy.handle_notices_done(updated);
            }
            MeshEvent::NextKeyProbed(answer) => {
                let live = match self.probe.take() {
                    Some(probe) => probe.finish(agent, &self.state, *answer).await,
                    None => false,
                };
                self.sync(agent);
                self.policy.handle_probe_done(live);
            }
        }
        self.drive(agent).await;
    }

    /// Time passed: the endpoint check, the rotation schedule, notice retries, a file join.
    pub async fn on_timer<W: WgBackend, L: LinkBackend>(&mut self, agent: &mut Agent<W, L>) {
        self.check_endpoints(agent).await;
        self.sync(agent);
        self.policy.handle_timeout(policy_now());
        self.drive(agent).await;
    }

    /// When [`MemberRuntime::on_timer`] is due, from now.
    pub fn timer_in(&self) -> Duration {
        let now = policy_now();
        self.policy.poll_timeout(now).saturating_sub(now)
    }

    /// The coordinator does not answer and a next key was on disk at start: try it
    /// (`crate::member::rotate::Probe`); its answer comes back as [`MeshEvent::NextKeyProbed`].
    async fn start_probe<W: WgBackend, L: LinkBackend>(&mut self, agent: &mut Agent<W, L>) {
        let Some(api) = agent.membership().map(Membership::api_addr) else {
            self.policy.handle_probe_done(false);
            return;
        };
        match crate::member::rotate::Probe::start(agent, api).await {
            Some((probe, call)) => {
                self.probe = Some(probe);
                spawn_for_loop(&self.tx, call, |answer| {
                    MeshEvent::NextKeyProbed(Box::new(answer))
                });
            }
            None => self.policy.handle_probe_done(false),
        }
    }

    /// Ask the coordinator's underlay endpoints for key notices in the background (it may have
    /// rotated its key while we were away); the answer comes back as
    /// [`MeshEvent::CoordinatorKey`].
    fn fetch_notices<W: WgBackend, L: LinkBackend>(&mut self, agent: &Agent<W, L>) {
        let Some(m) = agent.membership() else {
            self.policy.handle_notices_done(false);
            return;
        };
        let coord_peer = agent
            .netmap()
            .and_then(|nm| nm.peers.iter().find(|p| p.address == m.coordinator_address));
        let (known, endpoints) = match coord_peer {
            Some(p) => (
                p.public_key,
                p.endpoints.iter().map(|c| c.addr).collect::<Vec<_>>(),
            ),
            None => (m.coordinator_public_key, m.coordinator_endpoints.clone()),
        };
        let key = agent.key().clone();
        let work = async move {
            crate::member::rotate::coordinator_key_from_notices(&endpoints, &key, known)
                .await
                .map(|new| (known, new))
        };
        spawn_for_loop(&self.tx, work, MeshEvent::CoordinatorKey);
    }

    /// A verified key notice says the coordinator's key `known` is now `new`: put it into the
    /// netmap and the membership (both cached), so the tunnel to the coordinator works again.
    /// Returns whether anything changed (the policy then follows again).
    async fn take_coordinator_key<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &mut Agent<W, L>,
        known: PublicKey,
        new: PublicKey,
    ) -> bool {
        let Some(mut m) = agent.membership().cloned() else {
            return false;
        };
        if let Some(mut nm) = agent.netmap().cloned() {
            let mut changed = false;
            for p in nm
                .peers
                .iter_mut()
                .filter(|p| p.address == m.coordinator_address && p.public_key == known)
            {
                p.public_key = new;
                p.next_public_key = None;
                changed = true;
            }
            if !changed {
                return false;
            }
            if let Err(e) = self.state.save_netmap(&nm) {
                tracing::warn!(error = %e, "cannot cache the netmap");
            }
            agent.set_netmap(nm);
        }
        if m.coordinator_public_key == known {
            m.coordinator_public_key = new;
            if let Err(e) = self.state.save_membership(&m) {
                tracing::warn!(error = %e, "cannot save the membership");
            }
            agent.set_membership(Some(m));
        }
        tracing::info!(old = %known, new = %new, "coordinator key updated from a key notice");
        agent.reconcile(now()).await;
        true
    }

    /// Whether our `routes.advertise` differs from what the coordinator last took.
    pub fn advertise_unreported<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &Agent<W, L>,
    ) -> bool {
        self.sync(agent);
        self.policy.advertise_unreported()
    }

    /// Report our endpoints when they changed since the last successful report (the policy
    /// decides); on the coordinator host, record our `routes.advertise` in the registry.
    pub async fn check_endpoints<W: WgBackend, L: LinkBackend>(&mut self, agent: &mut Agent<W, L>) {
        if let Some(coord) = &self.coordinator {
            let advertise = agent.settings().routes.advertise.clone();
            let coord = coord.clone();
            let now_unix = now().as_secs();
            match tokio::task::spawn_blocking(move || coord.advertise_own(&advertise, now_unix))
                .await
            {
                Ok(Ok(true)) => tracing::info!("routes.advertise recorded in the registry; pending until an admin approves each prefix"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot record our routes.advertise"),
                Err(e) => tracing::warn!(error = %e, "cannot record our routes.advertise"),
            }
        }
        if agent.membership().is_none() {
            return;
        }
        let interface = agent.settings().interface.clone();
        let addresses = match agent.link.underlay_addresses(&interface).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list interface addresses");
                return;
            }
        };
        let mut report = endpoint_report(agent.settings().listen_port, addresses, agent.address());
        report.advertise = agent.settings().routes.advertise.clone();
        self.sync(agent);
        self.policy.handle_endpoints(report);
        self.drive(agent).await;
    }

    /// Rotate now (`meshctl rotate`, the schedule, an admin's request): start a
    /// [`crate::member::rotate::Run`], or join the one in progress. The steps on this host run now;
    /// the ones that wait on the coordinator run as tasks whose results come back as
    /// [`MeshEvent::RotationStep`], so the loop is never held. `waiter` gets the outcome.
    pub async fn rotate_now<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &mut Agent<W, L>,
        waiter: Option<RotationWaiter>,
    ) {
        if let Some((_, waiters)) = &mut self.rotation {
            waiters.extend(waiter);
            return;
        }
        let started = registrar(agent, self)
            .and_then(|registrar| crate::member::rotate::Run::start(agent, registrar));
        let mut run = match started {
            Ok(run) => run,
            Err(e) => {
                self.rotation_ended(agent, Err(e), waiter.into_iter().collect());
                return;
            }
        };
        self.policy.handle_rotation_started();
        let progress = run.advance(agent, &self.state).await;
        self.rotation = Some((run, waiter.into_iter().collect()));
        self.rotation_progress(agent, progress);
    }

    /// Whether a key rotation is in progress.
    pub fn rotating(&self) -> bool {
        self.rotation.is_some()
    }

    fn rotation_progress<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &Agent<W, L>,
        progress: crate::member::rotate::Progress,
    ) {
        match progress {
            crate::member::rotate::Progress::Waiting(wait) => {
                spawn_for_loop(&self.tx, wait, |done| {
                    MeshEvent::RotationStep(Box::new(done))
                });
            }
            crate::member::rotate::Progress::Done(r) => {
                let waiters = self.rotation.take().map(|(_, w)| w).unwrap_or_default();
                self.rotation_ended(agent, r, waiters);
            }
        }
    }

    fn rotation_ended<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &Agent<W, L>,
        r: Result<Outcome, RotateError>,
        waiters: Vec<RotationWaiter>,
    ) {
        let committed = match &r {
            Ok(outcome) if outcome.is_done() => {
                tracing::info!(%outcome, "key rotation done");
                Some(
                    self.coordinator
                        .as_ref()
                        .map(|c| c.version())
                        .or_else(|| agent.netmap().map(|n| n.version))
                        .unwrap_or(0),
                )
            }
            Ok(outcome) => {
                tracing::info!(%outcome, "key rotation deferred");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "key rotation failed; retrying at the next check");
                None
            }
        };
        self.policy.handle_rotation_ended(committed);
        for w in waiters {
            let _ = w.send(r.clone());
        }
    }

    /// Join the mesh of `token`: [`crate::member::join::start`] now, the coordinator asked from a task
    /// (its answer comes back as [`MeshEvent::JoinAnswer`]), so the loop is never held.
    pub async fn start_join<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &mut Agent<W, L>,
        token: &str,
        origin: JoinOrigin,
    ) {
        if self.join.is_some() {
            let e = JoinError::from("a join is already in progress; wait for its outcome");
            self.join_ended(agent, Err(e), origin).await;
            return;
        }
        match crate::member::join::start(agent, &self.state, token).await {
            Ok((pending, call)) => {
                let work = async move { call.run(&client::HttpApi).await };
                spawn_for_loop(&self.tx, work, |answer| {
                    MeshEvent::JoinAnswer(Box::new(answer))
                });
                self.join = Some((pending, origin));
                self.policy.handle_join_started();
            }
            Err(e) => self.join_ended(agent, Err(e), origin).await,
        }
    }

    /// Whether a join is in progress.
    pub fn joining(&self) -> bool {
        self.join.is_some()
    }

    async fn join_ended<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &mut Agent<W, L>,
        r: Result<Membership, JoinError>,
        origin: JoinOrigin,
    ) {
        let retry_file = match (&origin, &r) {
            (JoinOrigin::File(_), Err(e)) => e.retryable,
            _ => false,
        };
        self.policy.handle_join_ended(retry_file);
        if r.is_ok() {
            self.joined(agent).await;
        }
        match origin {
            JoinOrigin::Control(tx) => {
                let _ = tx.send(r);
            }
            JoinOrigin::File(path) => match r {
                Ok(m) => {
                    tracing::info!(file = %path.display(), host = %m.host_name, address = %m.address, "joined from the token file");
                    // The token is spent: do not leave it on disk.
                    match std::fs::remove_file(&path) {
                        Ok(()) => {
                            tracing::info!(file = %path.display(), "removed the spent join token file")
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(file = %path.display(), error = %e, "cannot remove the spent join token file")
                        }
                    }
                }
                Err(e) => tracing::error!(
                    file = %path.display(),
                    error = %e,
                    retry = e.retryable,
                    "join from the token file failed"
                ),
            },
        }
    }

    /// After a successful join: follow, report.
    pub async fn joined<W: WgBackend, L: LinkBackend>(&mut self, agent: &mut Agent<W, L>) {
        self.sync(agent);
        self.drive(agent).await;
        self.check_endpoints(agent).await;
    }
}

impl Drop for MemberRuntime {
    fn drop(&mut self) {
        if let Some(h) = self.follower.take() {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::tests::{peer, settings};
    use crate::backend::{FakeBackend, FakeLink};
    use crate::member::client::{Api, CallError};
    use crate::member::join::join;
    use mesh_proto::netmap::{EndpointCandidate, EndpointKind, NetmapPeer};
    use mesh_proto::wire::api::{JoinRequest, JoinResponse};
    use mesh_proto::wire::token::{Token, TokenBody};
    use std::os::unix::fs::MetadataExt;

    fn key(i: u8) -> PrivateKey {
        PrivateKey::from_bytes([i; 32])
    }

    fn netmap_peer(name: &str, i: u8, ip: &str, ep: &str) -> NetmapPeer {
        NetmapPeer {
            name: name.into(),
            address: ip.parse().expect("ip"),
            public_key: key(i).public_key(),
            allowed_ips: vec![format!("{ip}/32").parse().expect("net")],
            endpoints: vec![
                EndpointCandidate {
                    addr: ep.parse().expect("ep"),
                    kind: EndpointKind::Lan,
                },
                EndpointCandidate {
                    addr: "203.0.113.9:40000".parse().expect("ep"),
                    kind: EndpointKind::Observed,
                },
            ],
            persistent_keepalive: Some(25),
            static_peer: false,
            admin: false,
            key_created_unix: 1_700_000_000,
            next_public_key: None,
        }
    }

    fn netmap(own: &PrivateKey, version: u64, peers: Vec<NetmapPeer>) -> Netmap {
        Netmap {
            version,
            mesh_cidr: "10.99.99.0/24".parse().expect("net"),
            name: "dock-mirror".into(),
            address: "10.99.99.3".parse().expect("ip"),
            public_key: own.public_key(),
            peers,
            rotate_requested: false,
            ungranted_routes: Vec::new(),
        }
    }

    fn membership() -> Membership {
        Membership {
            host_name: "dock-mirror".into(),
            address: "10.99.99.3".parse().expect("ip"),
            mesh_cidr: "10.99.99.0/24".parse().expect("net"),
            coordinator_public_key: key(100).public_key(),
            coordinator_endpoints: vec!["192.0.2.1:51871".parse().expect("sa")],
            coordinator_address: "10.99.99.1".parse().expect("ip"),
            api_port: 51872,
            admin: false,
            joined_unix: 1,
        }
    }

    #[test]
    fn netmap_and_static_peers_merge_and_the_config_wins() {
        let own = key(50);
        // Static peer-1 holds 10.99.99.11/32 with key [2;32].
        let s = settings(vec![peer(1, None)]);
        let static_key = peer(1, None).spec.public_key;
        let mut same_key = netmap_peer("dup", 2, "10.99.99.40", "192.168.1.40:51871");
        same_key.public_key = static_key;
        let overlap = netmap_peer("thief", 21, "10.99.99.11", "192.168.1.11:51871");
        let mut coord = netmap_peer("dock-load", 100, "10.99.99.1", "192.168.1.1:51871");
        coord.persistent_keepalive = None;
        let edge = netmap_peer("dock-edge", 22, "10.99.99.5", "192.168.1.5:51871");
        let me = netmap_peer("dock-mirror", 50, "10.99.99.3", "192.168.1.3:51871");
        let nm = netmap(&own, 4, vec![same_key, overlap, coord, edge, me]);
        let (spec, conflicts) = desired_device(&s, &own, Some(&membership()), Some(&nm));
        assert_eq!(conflicts.len(), 2, "{conflicts:?}");
        assert!(conflicts[0].contains("dup") && conflicts[1].contains("thief"));
        assert_eq!(spec.private_key, own);
        // static + dock-load + dock-edge; not ourselves, not the conflicting ones.
        assert_eq!(spec.peers.len(), 3, "{:?}", spec.peers.keys());
        assert_eq!(spec.peers[&static_key], peer(1, None).spec);
        let e = &spec.peers[&key(22).public_key()];
        assert_eq!(e.endpoint, Some("192.168.1.5:51871".parse().expect("sa")));
        assert_eq!(e.persistent_keepalive, Some(25));
        assert_eq!(
            e.allowed_ips,
            vec!["10.99.99.5/32".parse::<IpNet>().expect("net")]
        );
        let c = &spec.peers[&key(100).public_key()];
        assert_eq!(
            c.persistent_keepalive, None,
            "the netmap's coordinator entry is used"
        );

        // Without a netmap the coordinator comes from the membership.
        let (spec, _) = desired_device(&s, &own, Some(&membership()), None);
        assert_eq!(spec.peers.len(), 2);
        let c = &spec.peers[&key(100).public_key()];
        assert_eq!(c.endpoint, Some("192.0.2.1:51871".parse().expect("sa")));
        assert_eq!(c.persistent_keepalive, Some(BOOTSTRAP_KEEPALIVE));
    }

    #[test]
    fn a_peers_next_key_is_accepted_but_routes_nothing() {
        let own = key(50);
        let s = settings(Vec::new());
        let mut edge = netmap_peer("dock-edge", 22, "10.99.99.5", "192.168.1.5:51871");
        edge.next_public_key = Some(key(23).public_key());
        let nm = netmap(&own, 4, vec![edge.clone()]);
        let (spec, _) = desired_device(&s, &own, None, Some(&nm));
        let old = &spec.peers[&key(22).public_key()];
        assert_eq!(
            old.allowed_ips,
            vec!["10.99.99.5/32".parse::<IpNet>().expect("net")]
        );
        let next = &spec.peers[&key(23).public_key()];
        assert!(next.allowed_ips.is_empty(), "no traffic before the commit");
        assert_eq!(next.endpoint, old.endpoint);
        // Committed: the next key holds the address, the old key is gone.
        edge.public_key = key(23).public_key();
        edge.next_public_key = None;
        let nm = netmap(&own, 5, vec![edge]);
        let (spec, _) = desired_device(&s, &own, None, Some(&nm));
        assert_eq!(spec.peers.len(), 1);
        assert!(!spec.peers[&key(23).public_key()].allowed_ips.is_empty());
    }

    fn unjoined(dir: &std::path::Path) -> Agent<FakeBackend, FakeLink> {
        let mut s = settings(Vec::new());
        s.host_name = None;
        s.address = None;
        s.private_key_file = dir.join("private.key");
        s.state_dir = dir.join("state");
        let wg = FakeBackend {
            absent: true,
            ..FakeBackend::default()
        };
        let link = FakeLink {
            underlay: vec![
                "192.168.1.3".parse().expect("ip"),
                "127.0.0.1".parse().expect("ip"),
            ],
            ..FakeLink::default()
        };
        Agent::new(wg, link, s, key(60))
    }

    fn token(expires_unix: u64) -> String {
        let body = TokenBody {
            invite_id: "00ff".into(),
            coordinator_public_key: key(100).public_key(),
            coordinator_endpoints: vec!["192.0.2.1:51871".parse().expect("sa")],
            coordinator_address: "10.99.99.1".parse().expect("ip"),
            api_port: 51872,
            mesh_cidr: "10.99.99.0/24".parse().expect("net"),
            host_name: "dock-mirror".into(),
            host_address: "10.99.99.3".parse().expect("ip"),
            throwaway_private_key: key(77).to_base64(),
            expires_unix,
            admin: false,
        };
        Token::sign(body, &[9; 32]).encode()
    }

    /// Answers a join like the coordinator would, or refuses it.
    struct FakeApi {
        refuse: Option<CallError>,
        seen: std::sync::Mutex<Vec<(SocketAddr, JoinRequest)>>,
    }

    impl FakeApi {
        fn new(refuse: Option<CallError>) -> Self {
            FakeApi {
                refuse,
                seen: std::sync::Mutex::new(Vec::new()),
            }
        }
    }

    impl Api for FakeApi {
        fn join_deadline(&self) -> Duration {
            Duration::from_millis(600)
        }

        async fn join(
            &self,
            at: SocketAddr,
            signer: &client::Signer,
            req: &JoinRequest,
            _timeout: Duration,
        ) -> Result<JoinResponse, CallError> {
            // Signed with the token's throwaway key (never the host's new key).
            assert_ne!(signer.key(), req.public_key);
            self.seen.lock().expect("lock").push((at, req.clone()));
            if let Some(e) = &self.refuse {
                return Err(e.clone());
            }
            let mut nm = netmap(
                &key(0),
                3,
                vec![
                    netmap_peer("dock-load", 100, "10.99.99.1", "192.0.2.1:51871"),
                    netmap_peer("dock-edge", 22, "10.99.99.5", "192.168.1.5:51871"),
                ],
            );
            nm.public_key = req.public_key;
            Ok(JoinResponse { netmap: nm })
        }
    }

    fn far_future() -> u64 {
        now().as_secs() + 3600
    }

    #[tokio::test]
    async fn join_switches_to_a_fresh_key_and_saves_the_membership() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = unjoined(dir.path());
        a.reconcile(now()).await;
        assert!(a.wg.absent, "an unjoined host leaves the interface alone");
        let st = StateDir::new(dir.path().join("state"));
        let api = FakeApi::new(None);
        let m = join(&mut a, &st, &token(far_future()), &api)
            .await
            .expect("join");
        assert_eq!(m.host_name, "dock-mirror");
        let seen = api.seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 1);
        let (at, req) = &seen[0];
        assert_eq!(at.to_string(), "10.99.99.1:51872");
        assert_eq!(req.listen_port, 51871);
        assert_ne!(
            req.public_key,
            key(77).public_key(),
            "not the throwaway key"
        );
        assert_eq!(
            req.addresses,
            vec!["192.168.1.3".parse::<IpAddr>().expect("ip")]
        );
        // The interface runs with the new key and the netmap's peers.
        assert_eq!(a.wg.device.public_key, Some(req.public_key));
        assert_eq!(a.key().public_key(), req.public_key);
        assert_eq!(a.wg.device.peers.len(), 2);
        assert!(a
            .link
            .addresses
            .contains(&"10.99.99.3/24".parse().expect("net")));
        // Saved: key file (0600), membership, netmap.
        let key_path = dir.path().join("private.key");
        assert_eq!(
            std::fs::metadata(&key_path).expect("key").mode() & 0o777,
            0o600
        );
        let on_disk: PrivateKey = std::fs::read_to_string(&key_path)
            .expect("read")
            .trim()
            .parse()
            .expect("key");
        assert_eq!(on_disk.public_key(), req.public_key);
        assert_eq!(st.load_membership().expect("load"), Some(m));
        assert_eq!(st.load_netmap().expect("load").map(|n| n.version), Some(3));
        let status = a.status();
        assert_eq!(status.host_name.as_deref(), Some("dock-mirror"));
        assert_eq!(status.netmap_version, Some(3));
        // A second join is refused and changes nothing.
        let err = join(&mut a, &st, &token(far_future()), &api)
            .await
            .expect_err("already joined");
        assert!(err.message.contains("already a member"), "{err}");
    }

    #[tokio::test]
    async fn a_refused_join_restores_everything_and_passes_the_reason_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = unjoined(dir.path());
        let st = StateDir::new(dir.path().join("state"));
        let before = a.key().clone();
        let api = FakeApi::new(Some(CallError::Refused {
            status: 410,
            message: "invitation for dock-mirror was already used".into(),
        }));
        let err = join(&mut a, &st, &token(far_future()), &api)
            .await
            .expect_err("refused");
        assert_eq!(err.message, "invitation for dock-mirror was already used");
        assert!(!err.retryable);
        assert!(a.link.deleted, "the interface the join created is deleted");
        assert!(a.link.addresses.is_empty());
        assert_eq!(a.key(), &before);
        assert_eq!(a.address(), None);
        assert!(a.membership().is_none());
        assert!(a.desired().peers.is_empty());
        assert!(!dir.path().join("private.key").exists());
        assert_eq!(st.load_membership().expect("load"), None);
        assert_eq!(st.load_netmap().expect("load"), None);
        // And the agent does not bring the interface back by itself.
        a.wg.absent = true;
        a.reconcile(now()).await;
        assert!(a.wg.absent);

        let api = FakeApi::new(Some(CallError::Unreachable {
            addr: "10.99.99.1:51872".parse().expect("sa"),
            message: "no answer within 10s".into(),
        }));
        let err = join(&mut a, &st, &token(far_future()), &api)
            .await
            .expect_err("unreachable");
        assert!(err.message.contains("another mesh"), "{err}");
        assert!(err.retryable);
    }

    #[tokio::test]
    async fn bad_tokens_are_refused_before_touching_anything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = unjoined(dir.path());
        let st = StateDir::new(dir.path().join("state"));
        let api = FakeApi::new(None);
        let err = join(&mut a, &st, "hello", &api).await.expect_err("prefix");
        assert!(err.message.contains("invalid token"), "{err}");
        let err = join(&mut a, &st, "meshd1.@@@", &api)
            .await
            .expect_err("damaged");
        assert!(err.message.contains("invalid token"), "{err}");
        let err = join(&mut a, &st, &token(1000), &api)
            .await
            .expect_err("expired");
        assert!(err.message.contains("expired"), "{err}");
        assert!(api.seen.lock().expect("lock").is_empty());
        assert_eq!(a.wg.ensure_calls, 0);
        assert!(a.wg.absent);
    }

    #[tokio::test]
    async fn restart_restores_the_mesh_from_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = StateDir::new(dir.path().join("state"));
        let own = key(60);
        // The cached netmap names the coordinator at an address nobody answers on.
        let mut m = membership();
        m.coordinator_address = "127.0.0.1".parse().expect("ip");
        m.api_port = 9; // discard: nothing listens
                        // Key notices are asked for there too (loopback: nothing leaves the machine).
        m.coordinator_endpoints = vec!["127.0.0.1:9".parse().expect("sa")];
        st.save_membership(&m).expect("save");
        let nm = netmap(
            &own,
            9,
            vec![netmap_peer(
                "dock-edge",
                22,
                "10.99.99.5",
                "192.168.1.5:51871",
            )],
        );
        st.save_netmap(&nm).expect("save");
        let mut a = unjoined(dir.path());
        let (tx, mut rx) = mpsc::channel(8);
        let mut rt = MemberRuntime::new(st.clone(), tx);
        rt.restore(&mut a).await;
        let r = a.reconcile(now()).await;
        assert!(r.error.is_none(), "{r:?}");
        assert!(a.wg.device.peers.contains_key(&key(22).public_key()));
        assert!(a.wg.device.peers.contains_key(&key(100).public_key()));
        assert!(a
            .link
            .addresses
            .contains(&"10.99.99.3/24".parse().expect("net")));
        assert_eq!(a.status().netmap_version, Some(9));
        // The follower reports the coordinator unreachable; the netmap is kept.
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("event in time")
            .expect("event");
        assert!(matches!(ev, MeshEvent::Unreachable(_)), "{ev:?}");
        rt.on_event(&mut a, ev).await;
        assert_eq!(a.mesh_state().reachable, Some(false));
        assert_eq!(a.status().netmap_version, Some(9));
        // Unreachable: the host asks the coordinator's endpoint for key notices (nobody
        // answers here), in the background.
        let ev = loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("event in time")
                .expect("event");
            if matches!(ev, MeshEvent::CoordinatorKey(_)) {
                break ev;
            }
        };
        assert!(matches!(ev, MeshEvent::CoordinatorKey(Err(_))), "{ev:?}");
        rt.on_event(&mut a, ev).await;
        // A newer netmap is applied at once and cached.
        let nm2 = netmap(&own, 10, Vec::new());
        rt.on_event(&mut a, MeshEvent::Netmap(Box::new(nm2))).await;
        assert!(!a.wg.device.peers.contains_key(&key(22).public_key()));
        assert_eq!(st.load_netmap().expect("load").map(|n| n.version), Some(10));
        assert_eq!(
            std::fs::metadata(st.netmap_path()).expect("meta").mode() & 0o777,
            0o600
        );
    }

    /// A rotation holds the loop while the follower queues the prepare's netmap (naming our
    /// old key); the commit's reply already gave us a newer one. The queued one is skipped:
    /// the device does not step back.
    #[tokio::test]
    async fn a_netmap_queued_before_our_rotation_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = StateDir::new(dir.path().join("state"));
        let mut a = unjoined(dir.path());
        a.set_membership(Some(membership()));
        let (old, new) = (key(61), key(62));
        a.set_key(new.clone());
        let (tx, _rx) = mpsc::channel(8);
        let mut rt = MemberRuntime::new(st.clone(), tx);
        let edge = netmap_peer("dock-edge", 22, "10.99.99.5", "192.168.1.5:51871");
        // The commit's reply, applied at the switch.
        let committed = netmap(&new, 10, vec![edge]);
        rt.on_event(&mut a, MeshEvent::Netmap(Box::new(committed)))
            .await;
        rt.policy.handle_rotation_ended(Some(10));
        // The prepare's netmap, queued behind the rotation.
        let stale = netmap(&old, 9, Vec::new());
        rt.on_event(&mut a, MeshEvent::Netmap(Box::new(stale)))
            .await;
        assert_eq!(a.status().netmap_version, Some(10));
        assert!(a.wg.device.peers.contains_key(&key(22).public_key()));
        // An older netmap naming the key we run is still the coordinator's word (a registry
        // restored from a backup): taken.
        let restored = netmap(&new, 8, Vec::new());
        rt.on_event(&mut a, MeshEvent::Netmap(Box::new(restored)))
            .await;
        assert_eq!(a.status().netmap_version, Some(8));
        assert!(!a.wg.device.peers.contains_key(&key(22).public_key()));
    }

    #[tokio::test]
    async fn a_verified_key_notice_moves_the_coordinator_to_its_new_key_and_is_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = StateDir::new(dir.path().join("state"));
        let own = key(60);
        // A mesh on loopback, so the follower's calls (to 127.0.0.1:9) never leave the host.
        let mut m = membership();
        m.mesh_cidr = "127.0.0.0/8".parse().expect("net");
        m.address = "127.16.0.3".parse().expect("ip");
        m.coordinator_address = "127.0.0.1".parse().expect("ip");
        m.api_port = 9;
        m.coordinator_endpoints = vec!["127.0.0.1:9".parse().expect("sa")];
        st.save_membership(&m).expect("save");
        let mut coord = netmap_peer("dock-load", 100, "127.0.0.1", "127.0.0.1:9");
        coord.next_public_key = None;
        coord.endpoints.clear();
        let mut nm = netmap(&own, 9, vec![coord]);
        nm.mesh_cidr = m.mesh_cidr;
        nm.address = m.address;
        st.save_netmap(&nm).expect("save");
        let mut a = unjoined(dir.path());
        let (tx, _rx) = mpsc::channel(8);
        let mut rt = MemberRuntime::new(st.clone(), tx);
        rt.restore(&mut a).await;
        a.reconcile(now()).await;
        let old = key(100).public_key();
        let new = key(101).public_key();
        assert!(a.wg.device.peers.contains_key(&old));

        // A notice for a key we do not hold for the coordinator changes nothing.
        let other = key(102).public_key();
        rt.on_event(&mut a, MeshEvent::CoordinatorKey(Ok((other, new))))
            .await;
        assert!(a.wg.device.peers.contains_key(&old));

        rt.on_event(&mut a, MeshEvent::CoordinatorKey(Ok((old, new))))
            .await;
        assert!(a.wg.device.peers.contains_key(&new), "{:?}", a.wg.device);
        assert!(!a.wg.device.peers.contains_key(&old));
        let cached = st.load_netmap().expect("load").expect("netmap");
        assert_eq!(cached.peers[0].public_key, new);
        let saved = st.load_membership().expect("load").expect("membership");
        assert_eq!(saved.coordinator_public_key, new);
    }

    #[test]
    fn endpoint_reports_leave_out_loopback_link_local_and_the_mesh() {
        let r = endpoint_report(
            51871,
            vec![
                "192.168.1.3".parse().expect("ip"),
                "127.0.0.1".parse().expect("ip"),
                "fe80::1".parse().expect("ip"),
                "10.99.99.3".parse().expect("ip"),
                "2001:db8::3".parse().expect("ip"),
                "192.168.1.3".parse().expect("ip"),
            ],
            Some("10.99.99.3/24".parse().expect("net")),
        );
        assert_eq!(
            r.addresses,
            vec![
                "192.168.1.3".parse::<IpAddr>().expect("ip"),
                "2001:db8::3".parse().expect("ip")
            ]
        );
    }
}
