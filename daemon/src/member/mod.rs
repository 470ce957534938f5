//! The member side of a managed mesh, as a shell around `mesh_proto::member::Member` (the
//! policy): joining with a token (docs/ARCHITECTURE.md, "Walk: a join"), following the
//! netmap, reporting endpoints, rotating the key, asking for key notices. The device the
//! agent builds from all that is `crate::agent::desired`'s.

pub mod client;
pub mod join;
pub mod rotate;

use std::net::SocketAddr;
use std::time::Duration;

use mesh_proto::member::{endpoint_report, Action, Backoff, KeyFacts, Member, NetmapVerdict, Role};
use mesh_proto::netmap::Netmap;
use mesh_proto::wire::api::EndpointReport;
use mesh_proto::PublicKey;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::agent::{now, Agent};
use crate::backend::{LinkBackend, WgBackend};
use crate::disk::state::{Membership, StateDir};
use crate::member::join::JoinError;
use crate::member::rotate::{Outcome, RotateError};

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
    /// The coordinator refused the key a netmap request was signed with (HTTP 401 without
    /// its proof): during a rotation, the moment between the coordinator's commit and our own
    /// switch to the new key; otherwise the same as [`MeshEvent::Unreachable`].
    KeyRefused { used: PublicKey, error: String },
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
            let (used, result) = match signer.get() {
                Ok(signer) => (
                    Some(signer.key()),
                    client::fetch_netmap(api, &signer, ask).await,
                ),
                Err(e) => (None, Err(e)),
            };
            // Signed with a key that rotated away while the request was parked: the
            // coordinator now refuses that key, which says nothing about reachability. Ask
            // again at once with the new key, and report nothing.
            if result.is_err() && used.is_some() && signer.get().ok().map(|s| s.key()) != used {
                tracing::debug!("netmap request signed with a key rotated meanwhile; asking again");
                continue;
            }
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
                Err(e) => match (&e, used) {
                    (client::CallError::Unverified { status: 401, .. }, Some(used)) => {
                        MeshEvent::KeyRefused {
                            used,
                            error: e.to_string(),
                        }
                    }
                    _ => MeshEvent::Unreachable(e.to_string()),
                },
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
        // A key that rotates away while the report is under way is refused by the
        // coordinator: report once more with the new key (once: a second refusal is real).
        let mut again = true;
        loop {
            let now = signer.get()?;
            match client::report_endpoints(api, &now, &report).await {
                Ok(()) => return Ok(report),
                Err(e) if again && signer.get().ok().map(|s| s.key()) != Some(now.key()) => {
                    tracing::debug!(error = %e, "endpoint report signed with a key rotated meanwhile; reporting again");
                    again = false;
                }
                Err(e) => return Err(e),
            }
        }
    };
    spawn_for_loop(&tx, work, MeshEvent::EndpointsReported);
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
    /// Outcomes since start, for `/metrics`.
    pub counts: MemberCounts,
}

/// What this host's member runtime did since meshd started (`/metrics` counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberCounts {
    /// Key rotations that committed the new key.
    pub rotations_done: u64,
    /// Key rotations that ended with an error (retried at the next check).
    pub rotations_failed: u64,
    /// Joins that ended with an error (`meshctl join` or the token file).
    pub joins_failed: u64,
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
            counts: MemberCounts::default(),
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
                        match self.state.load_learned() {
                            Ok(Some(l)) => agent.set_learned(l, now()),
                            Ok(None) => {}
                            // Only hints: a damaged file costs the speed-up, nothing else.
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read the learned endpoints; ignored")
                            }
                        }
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
            MeshEvent::KeyRefused { used, error }
                if self.rotating() || agent.signer().ok().map(|s| s.key()) != Some(used) =>
            {
                // Our key is switching (or has): the next poll goes with the new one.
                tracing::debug!(error = %error, "netmap request refused during our key rotation");
            }
            MeshEvent::Unreachable(e) | MeshEvent::KeyRefused { error: e, .. } => {
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
                self.counts.rotations_done += 1;
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
                self.counts.rotations_failed += 1;
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
        if r.is_err() {
            self.counts.joins_failed += 1;
        }
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
mod tests;
