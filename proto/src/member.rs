//! The member's policy as one sans-I/O state machine: when to take a netmap, when to rotate
//! the key (schedule, an admin's request, an interrupted rotation), when to try a pending next
//! key, when to ask for the coordinator's key notices, when to report endpoints, when to retry a
//! join from a token file, and how long the netmap follower backs off.
//!
//! Inputs are `handle_*` calls with `now` (time since the Unix epoch) passed in; outputs are
//! [`Member::poll_action`] and [`Member::poll_timeout`]. No clock read, no RNG, no I/O: the
//! daemon (`meshd`'s `member` module) performs each [`Action`] and feeds the results back.
//! The steps of one rotation are [`crate::rotation::Rotation`]'s; this machine decides when a
//! rotation starts and what its end means for the netmaps still queued.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::netmap::Netmap;
use crate::wire::api::EndpointReport;
use crate::PublicKey;

/// How often a host that cannot reach its coordinator asks for key notices (the coordinator
/// may have rotated its key while the host was away; [`crate::wire::notice`]).
pub const NOTICE_RETRY: Duration = Duration::from_secs(15);
/// How often the interface addresses are checked for changes, and the rotation schedule.
pub const ENDPOINT_CHECK: Duration = Duration::from_secs(30);
/// How soon an interrupted rotation (a next key on disk) is tried again.
pub const RESUME_CHECK: Duration = Duration::from_secs(10);
/// The follower's first wait after a failed poll; doubled on each failure up to
/// [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// The follower's longest wait between failed polls.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Whom this host answers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not in a managed mesh (static peers only, or not joined yet).
    Unmanaged,
    /// A member that follows a coordinator over its API.
    Member,
    /// The coordinator's own host: its registry is in-process, always reachable.
    Coordinator,
}

/// What the daemon knows about the host's key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFacts {
    /// The key the device runs.
    pub public_key: PublicKey,
    /// When the key file was written (the schedule counts from it); `None` if unknown.
    pub created_unix: Option<u64>,
    /// A next key file exists: a rotation was started and not finished.
    pub next_on_disk: bool,
}

/// Why a rotation starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotateReason {
    /// The schedule says it is time.
    pub due: bool,
    /// A rotation was interrupted (a crash, an unreachable coordinator).
    pub pending: bool,
    /// An admin asked (`meshctl rotate NAME`).
    pub asked: bool,
}

/// What the daemon should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a key rotation.
    Rotate(RotateReason),
    /// The schedule is held: these static peers list our key by hand and would lose us.
    /// Reported once.
    RotationHeld { static_peers: Vec<String> },
    /// Once after a start with a next key on disk, with the coordinator unreachable: try the
    /// next key (the commit may have happened just before a crash). Answer with
    /// [`Member::handle_probe_done`].
    ProbeNextKey,
    /// Ask the coordinator's underlay endpoints for key notices. Answer with
    /// [`Member::handle_notices_done`].
    FetchKeyNotices,
    /// Report these endpoints to the coordinator. Answer with [`Member::handle_report_done`].
    ReportEndpoints(EndpointReport),
    /// (Re)start following the coordinator's netmap.
    Follow,
    /// Try the join from the token file again.
    RetryFileJoin,
}

/// Whether a netmap from the follower is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetmapVerdict {
    /// Apply it (and cache it).
    Take,
    /// Fetched before our own rotation's commit and queued meanwhile: it names our old key, and
    /// the commit's reply already gave us a newer netmap. Taking it would step the device back.
    Stale,
}

/// How the coordinator answers, as far as the member knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    Unknown,
    Reachable,
    Unreachable,
}

/// The member's policy state.
#[derive(Debug, Clone)]
pub struct Member {
    role: Role,
    reachability: Reachability,
    key: Option<KeyFacts>,
    rotate_every: Option<Duration>,
    advertise: Vec<IpNet>,
    /// Static peers in the current netmap (they hold the schedule).
    static_peers: Vec<String>,
    /// A netmap asked us to rotate, at this version.
    rotation_asked: Option<u64>,
    /// The netmap version our last rotation's commit produced.
    rotated_at_version: u64,
    rotating: bool,
    held_reported: bool,
    /// On the coordinator host: its followers polled again since its start.
    followers_returned: bool,
    probe_next_at_start: bool,
    probing: bool,
    notice_in_flight: bool,
    last_notice_try: Option<Duration>,
    last_reported: Option<EndpointReport>,
    report_in_flight: bool,
    /// The last [`Member::handle_timeout`].
    last_timeout: Option<Duration>,
    joining: bool,
    file_join_retry: bool,
    actions: VecDeque<Action>,
}

impl Member {
    /// A host in `role`.
    pub fn new(role: Role) -> Member {
        Member {
            role,
            reachability: Reachability::Unknown,
            key: None,
            rotate_every: None,
            advertise: Vec::new(),
            static_peers: Vec::new(),
            rotation_asked: None,
            rotated_at_version: 0,
            rotating: false,
            held_reported: false,
            followers_returned: true,
            probe_next_at_start: false,
            probing: false,
            notice_in_flight: false,
            last_notice_try: None,
            last_reported: None,
            report_in_flight: false,
            last_timeout: None,
            joining: false,
            file_join_retry: false,
            actions: VecDeque::new(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn reachability(&self) -> Reachability {
        self.reachability
    }

    /// A key rotation is running.
    pub fn rotating(&self) -> bool {
        self.rotating
    }

    /// A join is waiting for the coordinator's answer.
    pub fn joining(&self) -> bool {
        self.joining
    }

    /// An admin's rotation request is waiting to be served, at this netmap version.
    pub fn rotation_asked(&self) -> Option<u64> {
        self.rotation_asked
    }

    /// At start, after the membership was restored: follow the coordinator; if a next key is
    /// on disk, try it once should the coordinator not answer.
    pub fn handle_start(&mut self, key: KeyFacts) {
        self.probe_next_at_start = self.role == Role::Member && key.next_on_disk;
        self.key = Some(key);
        if self.role == Role::Member {
            self.follow();
        }
    }

    /// The configuration (at start and on each reload).
    pub fn handle_config(&mut self, rotate_every: Option<Duration>, advertise: Vec<IpNet>) {
        self.rotate_every = rotate_every;
        self.advertise = advertise;
    }

    /// The key files changed (a join, a rotation's step, a probe).
    pub fn handle_key(&mut self, key: KeyFacts) {
        self.key = Some(key);
    }

    /// The host joined a mesh (or became the coordinator's host): follow it and report.
    pub fn handle_joined(&mut self, role: Role) {
        self.role = role;
        self.file_join_retry = false;
        if role == Role::Member {
            self.follow();
        }
    }

    /// A join started.
    pub fn handle_join_started(&mut self) {
        self.joining = true;
    }

    /// A join ended; `retry_file` when it came from the token file and may work later (the
    /// coordinator did not answer).
    pub fn handle_join_ended(&mut self, retry_file: bool) {
        self.joining = false;
        self.file_join_retry = retry_file;
    }

    /// A netmap from the follower (or the in-process coordinator).
    pub fn handle_netmap(&mut self, now: Duration, netmap: &Netmap) -> NetmapVerdict {
        let own = self.key.as_ref().map(|k| k.public_key);
        let names_us = own == Some(netmap.public_key);
        if netmap.version < self.rotated_at_version && !names_us {
            return NetmapVerdict::Stale;
        }
        if netmap.rotate_requested
            && netmap.version > self.rotated_at_version
            && names_us
            && self.rotation_asked.is_none()
        {
            self.rotation_asked = Some(netmap.version);
        }
        self.static_peers = netmap
            .peers
            .iter()
            .filter(|p| p.static_peer)
            .map(|p| p.name.clone())
            .collect();
        if self.rotation_asked.is_some() {
            self.check_rotation(now);
        }
        NetmapVerdict::Take
    }

    /// An API call to the coordinator succeeded.
    pub fn handle_reachable(&mut self, now: Duration) {
        let was = self.reachability;
        self.reachability = Reachability::Reachable;
        self.probe_next_at_start = false;
        // A rotation deferred while the coordinator was away resumes now.
        if was != Reachability::Reachable {
            self.check_rotation(now);
        }
    }

    /// An API call to the coordinator failed.
    pub fn handle_unreachable(&mut self, now: Duration) {
        self.reachability = Reachability::Unreachable;
        if self.role != Role::Member {
            return;
        }
        // Not while our own rotation runs: its next key is that rotation's, not a leftover.
        if !self.rotating && !self.probing && std::mem::take(&mut self.probe_next_at_start) {
            self.probing = true;
            self.actions.push_back(Action::ProbeNextKey);
            return;
        }
        self.maybe_fetch_notices(now);
    }

    /// The next-key probe ended; `live` when the coordinator holds the next key and it is now
    /// the host's key.
    pub fn handle_probe_done(&mut self, live: bool) {
        self.probing = false;
        if live {
            self.follow();
        }
    }

    /// The key notice request ended; `updated` when it moved the coordinator to a new key.
    pub fn handle_notices_done(&mut self, updated: bool) {
        self.notice_in_flight = false;
        if updated {
            self.follow();
        }
    }

    /// On the coordinator host: whether the followers polled again since its start (until
    /// they did, a rotation would cut off those that missed it).
    pub fn handle_followers_returned(&mut self, returned: bool) {
        self.followers_returned = returned;
    }

    /// The host's current endpoints (addresses on the underlay, port, `routes.advertise`):
    /// reported when they differ from what the coordinator last took.
    pub fn handle_endpoints(&mut self, report: EndpointReport) {
        if self.role != Role::Member || self.report_in_flight {
            return;
        }
        if self.last_reported.as_ref() == Some(&report) {
            return;
        }
        self.report_in_flight = true;
        self.actions.push_back(Action::ReportEndpoints(report));
    }

    /// An endpoint report ended: what the coordinator took, or `None` on failure.
    pub fn handle_report_done(&mut self, taken: Option<EndpointReport>) {
        self.report_in_flight = false;
        if taken.is_some() {
            self.last_reported = taken;
        }
    }

    /// Whether our `routes.advertise` differs from what the coordinator last took.
    pub fn advertise_unreported(&self) -> bool {
        if self.role != Role::Member {
            // The coordinator host records its own in-process.
            return false;
        }
        match &self.last_reported {
            Some(r) => r.advertise != self.advertise,
            None => !self.advertise.is_empty(),
        }
    }

    /// A rotation started (from the schedule, a request, or `meshctl rotate`).
    pub fn handle_rotation_started(&mut self) {
        self.rotating = true;
    }

    /// The rotation ended. `committed`: the netmap version its commit produced (any request
    /// queued before it is served); `None` when it was deferred or failed.
    pub fn handle_rotation_ended(&mut self, committed: Option<u64>) {
        self.rotating = false;
        if let Some(version) = committed {
            self.rotation_asked = None;
            self.rotated_at_version = version;
        }
    }

    /// Time passed (at [`Member::poll_timeout`] or any later moment).
    pub fn handle_timeout(&mut self, now: Duration) {
        self.last_timeout = Some(now);
        if self.file_join_retry && self.role == Role::Unmanaged && !self.joining {
            self.file_join_retry = false;
            self.actions.push_back(Action::RetryFileJoin);
        }
        if self.reachability == Reachability::Unreachable && self.role == Role::Member {
            self.maybe_fetch_notices(now);
        }
        self.check_rotation(now);
    }

    /// The next action for the daemon.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Member::handle_timeout`] should be called next: the next endpoint check
    /// ([`ENDPOINT_CHECK`] after the last timeout; at once before the first), the rotation's
    /// due time, an interrupted rotation's retry ([`RESUME_CHECK`]) or the next key notice
    /// try, whichever is first (never before `now`).
    pub fn poll_timeout(&self, now: Duration) -> Duration {
        let Some(last) = self.last_timeout else {
            return now;
        };
        let mut at = last + ENDPOINT_CHECK;
        if let Some(due) = self.due_unix() {
            at = at.min(Duration::from_secs(due));
        }
        if self.role != Role::Unmanaged
            && !self.rotating
            && self.key.as_ref().is_some_and(|k| k.next_on_disk)
        {
            at = at.min(last + RESUME_CHECK);
        }
        if self.reachability == Reachability::Unreachable && self.role == Role::Member {
            if let Some(t) = self.last_notice_try {
                at = at.min(t + NOTICE_RETRY);
            }
        }
        at.max(now)
    }

    fn follow(&mut self) {
        self.last_reported = None;
        self.report_in_flight = false;
        if !self.actions.contains(&Action::Follow) {
            self.actions.push_back(Action::Follow);
        }
    }

    fn maybe_fetch_notices(&mut self, now: Duration) {
        if self.notice_in_flight || self.probing {
            return;
        }
        if self
            .last_notice_try
            .is_some_and(|t| now.saturating_sub(t) < NOTICE_RETRY)
        {
            return;
        }
        self.notice_in_flight = true;
        self.last_notice_try = Some(now);
        self.actions.push_back(Action::FetchKeyNotices);
    }

    /// When the schedule makes the key due, if there is a schedule.
    fn due_unix(&self) -> Option<u64> {
        let key = self.key.as_ref()?;
        let every = self.rotate_every?;
        crate::rotation::rotation_due_unix(key.created_unix?, every.as_secs(), &key.public_key)
    }

    /// Rotate when it is time, when an admin asked, or to finish an interrupted rotation; only
    /// while the coordinator answers (always, on its own host, once its followers are back).
    fn check_rotation(&mut self, now: Duration) {
        if self.rotating || self.probing {
            return;
        }
        let ready = match self.role {
            Role::Unmanaged => false,
            Role::Member => self.reachability == Reachability::Reachable,
            Role::Coordinator => self.followers_returned,
        };
        if !ready {
            return;
        }
        let pending = self.key.as_ref().is_some_and(|k| k.next_on_disk);
        let asked = self.rotation_asked.is_some();
        let due = self.due_unix().is_some_and(|at| now.as_secs() >= at);
        if !(due || pending || asked) {
            return;
        }
        // A schedule never breaks a static peer's tunnel: it lists our key by hand.
        if due && !pending && !asked && !self.static_peers.is_empty() {
            if !std::mem::replace(&mut self.held_reported, true) {
                self.actions.push_back(Action::RotationHeld {
                    static_peers: self.static_peers.clone(),
                });
            }
            return;
        }
        if self.actions.iter().any(|a| matches!(a, Action::Rotate(_))) {
            return;
        }
        self.actions.push_back(Action::Rotate(RotateReason {
            due,
            pending,
            asked,
        }));
    }
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

/// Interfaces whose addresses are never endpoint candidates: container, pod and VM networks
/// and other overlays (flannel's `flannel.1`, K3s's `cni0`, Docker's `docker0` and `br-*`,
/// `veth*` pairs, libvirt's `virbr*`, Calico, Cilium, Weave, other WireGuard and VPN
/// interfaces) and loopback. Their addresses are not reachable from other hosts, and a peer
/// that tries one first (after a restart, before it learns the real one) gets no handshake.
pub const NOT_UNDERLAY_PREFIXES: &[&str] = &[
    "lo",
    "docker",
    "br-",
    "veth",
    "virbr",
    "cni",
    "flannel",
    "cali",
    "tunl",
    "vxlan",
    "kube-",
    "weave",
    "cilium",
    "lxc",
    "podman",
    "wg",
    "tailscale",
    "zt",
    "nebula",
];

/// Whether the addresses of the interface called `name` may be endpoint candidates.
pub fn underlay_interface(name: &str) -> bool {
    !NOT_UNDERLAY_PREFIXES.iter().any(|p| name.starts_with(p))
}

fn usable_underlay(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => {
            !(v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// The follower's wait between failed polls: [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`], each
/// wait spread by `jitter` (a random value from the caller) over its upper half, so a thousand
/// followers do not retry in lock step after a coordinator restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// A poll succeeded: the next failure waits the least again.
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// A poll failed: how long to wait before the next, between half and all of the current
    /// step (`jitter` picks where), and double the step.
    pub fn next_wait(&mut self, jitter: u32) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(BACKOFF_MAX);
        let half = step / 2;
        let spread = half.as_micros() as u64;
        let extra = if spread == 0 {
            0
        } else {
            u64::from(jitter) % (spread + 1)
        };
        half + Duration::from_micros(extra)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn overlay_interfaces_offer_no_endpoint() {
        for name in [
            "flannel.1",
            "cni0",
            "docker0",
            "br-3f2a",
            "veth12ab",
            "virbr0",
            "cali123",
            "tunl0",
            "vxlan.calico",
            "kube-ipvs0",
            "cilium_host",
            "lxc1",
            "wg0",
            "flannel-wg",
            "tailscale0",
            "lo",
        ] {
            assert!(!underlay_interface(name), "{name}");
        }
        for name in [
            "eth0", "enp3s0", "wlan0", "br0", "bond0", "lan0", "ens18", "vmbr0",
        ] {
            assert!(underlay_interface(name), "{name}");
        }
    }

    use super::*;
    use crate::netmap::NetmapPeer;

    const T0: Duration = Duration::from_secs(1_800_000_000);
    const DAY: u64 = 86_400;

    fn k(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    fn facts(i: u8, created: u64, next: bool) -> KeyFacts {
        KeyFacts {
            public_key: k(i),
            created_unix: Some(created),
            next_on_disk: next,
        }
    }

    fn netmap(version: u64, own: u8, rotate_requested: bool, statics: &[&str]) -> Netmap {
        let peers = statics
            .iter()
            .enumerate()
            .map(|(n, name)| {
                let address: std::net::IpAddr = format!("10.99.99.{}", 10 + n).parse().expect("ip");
                NetmapPeer {
                    name: (*name).to_string(),
                    address,
                    public_key: k(100 + n as u8),
                    allowed_ips: vec![IpNet::from(address)],
                    endpoints: Vec::new(),
                    persistent_keepalive: None,
                    static_peer: true,
                    admin: false,
                    key_created_unix: 0,
                    next_public_key: None,
                }
            })
            .collect();
        Netmap {
            version,
            mesh_cidr: "10.99.99.0/24".parse().expect("net"),
            name: "m".into(),
            address: "10.99.99.2".parse().expect("ip"),
            public_key: k(own),
            peers,
            rotate_requested,
            ungranted_routes: Vec::new(),
        }
    }

    fn drain(m: &mut Member) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    fn member(created: u64) -> Member {
        let mut m = Member::new(Role::Member);
        m.handle_config(Some(Duration::from_secs(30 * DAY)), Vec::new());
        m.handle_start(facts(1, created, false));
        m
    }

    fn rotate(due: bool, pending: bool, asked: bool) -> Action {
        Action::Rotate(RotateReason {
            due,
            pending,
            asked,
        })
    }

    #[test]
    fn a_member_follows_at_start_and_rotates_only_once_due_and_reachable() {
        let created = T0.as_secs();
        let mut m = member(created);
        assert_eq!(drain(&mut m), vec![Action::Follow]);
        let due = crate::rotation::rotation_due_unix(created, 30 * DAY, &k(1)).expect("due");
        assert_eq!(m.poll_timeout(T0), T0, "the first check is at once");
        // The schedule's deadline is the next timeout once it is the nearest.
        m.handle_timeout(Duration::from_secs(due - 10));
        assert_eq!(
            m.poll_timeout(Duration::from_secs(due - 10)),
            Duration::from_secs(due)
        );
        m.handle_timeout(Duration::from_secs(due));
        assert_eq!(
            drain(&mut m),
            vec![],
            "not while the coordinator is unknown"
        );
        m.handle_reachable(Duration::from_secs(due - 1));
        assert_eq!(drain(&mut m), vec![], "not before it is due");
        m.handle_timeout(Duration::from_secs(due));
        assert_eq!(drain(&mut m), vec![rotate(true, false, false)]);
        m.handle_rotation_started();
        m.handle_timeout(Duration::from_secs(due + 30));
        assert_eq!(drain(&mut m), vec![], "one rotation at a time");
    }

    #[test]
    fn an_admin_request_rotates_once_and_older_queued_netmaps_are_stale() {
        let mut m = member(T0.as_secs());
        drain(&mut m);
        m.handle_reachable(T0);
        assert_eq!(
            m.handle_netmap(T0, &netmap(5, 1, true, &[])),
            NetmapVerdict::Take
        );
        assert_eq!(m.rotation_asked(), Some(5));
        assert_eq!(drain(&mut m), vec![rotate(false, false, true)]);
        m.handle_rotation_started();
        // The same request, seen again while rotating, is not a second one.
        m.handle_netmap(T0, &netmap(6, 1, true, &[]));
        assert_eq!(drain(&mut m), vec![]);
        m.handle_rotation_ended(Some(8));
        m.handle_key(facts(2, T0.as_secs(), false));
        assert_eq!(m.rotation_asked(), None);
        // A netmap fetched before the commit (names the old key) is stale ...
        assert_eq!(
            m.handle_netmap(T0, &netmap(7, 1, true, &[])),
            NetmapVerdict::Stale
        );
        // ... one naming the new key is taken even if older, and does not ask again.
        assert_eq!(
            m.handle_netmap(T0, &netmap(7, 2, false, &[])),
            NetmapVerdict::Take
        );
        assert_eq!(
            m.handle_netmap(T0, &netmap(9, 2, false, &[])),
            NetmapVerdict::Take
        );
        assert_eq!(drain(&mut m), vec![]);
    }

    #[test]
    fn a_deferred_rotation_resumes_when_the_coordinator_is_back() {
        let mut m = member(T0.as_secs());
        drain(&mut m);
        m.handle_key(facts(1, T0.as_secs(), true));
        m.handle_unreachable(T0);
        // No next key at start: the notices are asked instead of a probe.
        assert_eq!(drain(&mut m), vec![Action::FetchKeyNotices]);
        m.handle_timeout(T0 + ENDPOINT_CHECK);
        assert_eq!(drain(&mut m), vec![], "a notice request is in flight");
        m.handle_notices_done(false);
        m.handle_reachable(T0 + ENDPOINT_CHECK);
        assert_eq!(drain(&mut m), vec![rotate(false, true, false)]);
    }

    #[test]
    fn checks_come_every_30_s_whatever_else_happens_and_sooner_for_a_pending_rotation() {
        let mut m = member(T0.as_secs());
        drain(&mut m);
        m.handle_timeout(T0);
        // Events in between do not push the next check back.
        m.handle_reachable(T0 + Duration::from_secs(20));
        assert_eq!(
            m.poll_timeout(T0 + Duration::from_secs(20)),
            T0 + ENDPOINT_CHECK
        );
        assert_eq!(
            m.poll_timeout(T0 + Duration::from_secs(40)),
            T0 + Duration::from_secs(40)
        );
        m.handle_key(facts(1, T0.as_secs(), true));
        assert_eq!(m.poll_timeout(T0), T0 + RESUME_CHECK);
        m.handle_rotation_started();
        assert_eq!(m.poll_timeout(T0), T0 + ENDPOINT_CHECK, "not while it runs");
    }

    #[test]
    fn static_peers_hold_the_schedule_but_not_a_request() {
        let created = T0.as_secs();
        let mut m = member(created);
        drain(&mut m);
        m.handle_reachable(T0);
        m.handle_netmap(T0, &netmap(3, 1, false, &["nas"]));
        let due = crate::rotation::rotation_due_unix(created, 30 * DAY, &k(1)).expect("due");
        m.handle_timeout(Duration::from_secs(due));
        assert_eq!(
            drain(&mut m),
            vec![Action::RotationHeld {
                static_peers: vec!["nas".into()]
            }]
        );
        m.handle_timeout(Duration::from_secs(due + 30));
        assert_eq!(drain(&mut m), vec![], "reported once");
        m.handle_netmap(Duration::from_secs(due + 60), &netmap(4, 1, true, &["nas"]));
        assert_eq!(drain(&mut m), vec![rotate(true, false, true)]);
    }

    #[test]
    fn a_next_key_at_start_is_probed_once_then_notices_every_15_s() {
        let mut m = Member::new(Role::Member);
        m.handle_start(facts(1, T0.as_secs(), true));
        assert_eq!(drain(&mut m), vec![Action::Follow]);
        m.handle_unreachable(T0);
        assert_eq!(drain(&mut m), vec![Action::ProbeNextKey]);
        m.handle_unreachable(T0 + Duration::from_secs(1));
        assert_eq!(drain(&mut m), vec![], "nothing while the probe runs");
        m.handle_probe_done(false);
        m.handle_unreachable(T0 + Duration::from_secs(2));
        assert_eq!(drain(&mut m), vec![Action::FetchKeyNotices]);
        m.handle_notices_done(false);
        m.handle_timeout(T0 + Duration::from_secs(3));
        assert_eq!(drain(&mut m), vec![], "15 s between tries");
        // The pending rotation's retry comes first (it waits for a reachable coordinator) ...
        assert_eq!(
            m.poll_timeout(T0 + Duration::from_secs(10)),
            T0 + Duration::from_secs(13)
        );
        m.handle_timeout(T0 + Duration::from_secs(13));
        assert_eq!(drain(&mut m), vec![]);
        // ... then the next notice try.
        assert_eq!(
            m.poll_timeout(T0 + Duration::from_secs(13)),
            T0 + Duration::from_secs(17)
        );
        m.handle_timeout(T0 + Duration::from_secs(17));
        assert_eq!(drain(&mut m), vec![Action::FetchKeyNotices]);
        m.handle_notices_done(true);
        assert_eq!(drain(&mut m), vec![Action::Follow]);
    }

    #[test]
    fn a_successful_probe_follows_again_and_a_reachable_coordinator_cancels_it() {
        let mut m = Member::new(Role::Member);
        m.handle_start(facts(1, T0.as_secs(), true));
        drain(&mut m);
        m.handle_unreachable(T0);
        assert_eq!(drain(&mut m), vec![Action::ProbeNextKey]);
        m.handle_probe_done(true);
        assert_eq!(drain(&mut m), vec![Action::Follow]);

        let mut m = Member::new(Role::Member);
        m.handle_start(facts(1, T0.as_secs(), true));
        m.handle_reachable(T0);
        m.handle_unreachable(T0);
        assert!(!drain(&mut m).contains(&Action::ProbeNextKey));
    }

    #[test]
    fn endpoints_are_reported_when_changed_one_report_at_a_time() {
        let mut m = member(T0.as_secs());
        drain(&mut m);
        let report = |port| EndpointReport {
            listen_port: port,
            addresses: vec!["192.0.2.7".parse().expect("ip")],
            advertise: Vec::new(),
        };
        m.handle_endpoints(report(1));
        m.handle_endpoints(report(2));
        assert_eq!(drain(&mut m), vec![Action::ReportEndpoints(report(1))]);
        m.handle_report_done(None);
        m.handle_endpoints(report(1));
        assert_eq!(drain(&mut m), vec![Action::ReportEndpoints(report(1))]);
        m.handle_report_done(Some(report(1)));
        m.handle_endpoints(report(1));
        assert_eq!(drain(&mut m), vec![], "unchanged");
        // Following again (a new key, a new coordinator key) reports again.
        m.handle_probe_done(true);
        m.handle_endpoints(report(1));
        assert_eq!(
            drain(&mut m),
            vec![Action::Follow, Action::ReportEndpoints(report(1))]
        );
    }

    #[test]
    fn advertise_is_unreported_until_the_coordinator_took_it() {
        let net: IpNet = "192.168.50.0/24".parse().expect("net");
        let mut m = member(T0.as_secs());
        assert!(!m.advertise_unreported());
        m.handle_config(None, vec![net]);
        assert!(m.advertise_unreported());
        m.handle_report_done(Some(EndpointReport {
            listen_port: 1,
            addresses: Vec::new(),
            advertise: vec![net],
        }));
        assert!(!m.advertise_unreported());
        let mut c = Member::new(Role::Coordinator);
        c.handle_config(None, vec![net]);
        assert!(!c.advertise_unreported(), "recorded in-process");
    }

    #[test]
    fn the_coordinator_host_waits_for_its_followers_before_rotating() {
        let mut c = Member::new(Role::Coordinator);
        c.handle_start(facts(1, T0.as_secs(), true));
        assert_eq!(drain(&mut c), vec![], "it follows nobody");
        c.handle_followers_returned(false);
        c.handle_timeout(T0);
        assert_eq!(drain(&mut c), vec![]);
        c.handle_unreachable(T0);
        assert_eq!(
            drain(&mut c),
            vec![],
            "no probes, no notices on its own host"
        );
        c.handle_followers_returned(true);
        c.handle_timeout(T0);
        assert_eq!(drain(&mut c), vec![rotate(false, true, false)]);
    }

    #[test]
    fn a_file_join_is_retried_at_the_next_timeout_until_joined() {
        let mut m = Member::new(Role::Unmanaged);
        m.handle_join_started();
        assert!(m.joining());
        m.handle_join_ended(true);
        m.handle_timeout(T0);
        assert_eq!(drain(&mut m), vec![Action::RetryFileJoin]);
        m.handle_timeout(T0 + ENDPOINT_CHECK);
        assert_eq!(drain(&mut m), vec![], "once per failure");
        m.handle_join_started();
        m.handle_join_ended(false);
        m.handle_joined(Role::Member);
        m.handle_timeout(T0 + ENDPOINT_CHECK * 2);
        assert_eq!(drain(&mut m), vec![Action::Follow]);
    }

    #[test]
    fn backoff_doubles_to_its_cap_spread_by_jitter() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..6).map(|_| b.next_wait(u32::MAX)).collect();
        for w in &waits {
            assert!(*w <= BACKOFF_MAX && *w >= BACKOFF_MIN / 2, "{w:?}");
        }
        let mut lo = Backoff::default();
        assert_eq!(lo.next_wait(0), BACKOFF_MIN / 2);
        let mut full = Backoff::default();
        for _ in 0..10 {
            full.next_wait(0);
        }
        assert_eq!(full.next_wait(0), BACKOFF_MAX / 2);
        full.reset();
        assert_eq!(full.next_wait(0), BACKOFF_MIN / 2);
    }
}
