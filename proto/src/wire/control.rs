//! The control protocol between `meshctl` and `meshd` over the Unix control socket: one JSON
//! request line, one JSON response line. The wire types only; meshctl's tables and text are
//! rendered in `crate::render`.
//!
//! ```text
//! -> {"request":"peers"}
//! <- {"response":"peers","peers":[{"name":"dock-prod","public_key":"...", ...}]}
//! -> {"request":"status"}
//! <- {"response":"status","host":"dock-load", ...}
//! -> {"request":"doctor"}
//! <- {"response":"doctor","host":"dock-load","interface":"wgmesh0","source":"daemon", ...}
//! -> {"request":"down"}
//! <- {"response":"ok","message":"removed wgmesh0, ...; meshd exits"}
//! -> {"request":"reload"}
//! <- {"response":"ok","message":"reloaded: 2 peers updated"}
//! <- {"response":"error","message":"..."}
//! ```
//!
//! Fields added after the first release carry `#[serde(default)]`, so an older meshctl or
//! meshd (which does not send them) still interoperates: they read as `None`/`false`.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::device::ObservedPeer;
use crate::key::PublicKey;
use crate::netmap::{EndpointCandidate, EndpointKind, NetmapPeer};

/// A handshake younger than this counts as "recent" (WireGuard's REJECT_AFTER_TIME: a session
/// older than this cannot carry data any more).
pub const RECENT_HANDSHAKE_SECS: u64 = 180;

/// One request line from meshctl.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Peers,
    Status,
    Reload,
    /// Join a mesh with an invitation token (`meshctl join -`, the token on stdin).
    Join {
        token: String,
    },
    /// Rotate this host's static key now (`meshctl rotate`; see `crate::rotation`).
    Rotate,
    /// Coordinator admin calls (served on the coordinator host, or relayed from admin hosts).
    Invite(crate::wire::api::InviteRequest),
    Invites,
    RevokeInvite {
        name: String,
    },
    Hosts,
    Remove {
        name: String,
    },
    /// Ask a host to rotate its key (`meshctl rotate NAME`): it does so when its netmap says
    /// so; the coordinator host itself rotates at once.
    RotateHost {
        name: String,
    },
    /// A static peer's current wg-quick configuration (`meshctl static-config NAME`),
    /// answered with `ok` carrying the text.
    StaticConfig {
        name: String,
    },
    /// The advertised prefixes of every host with their approval state (`meshctl routes`);
    /// answered with [`Response::Routes`].
    Routes,
    /// Approve or revoke one prefix of one host (`meshctl routes approve|revoke HOST PREFIX`);
    /// answered with `ok`.
    RouteDecision {
        decision: crate::routes::RouteDecision,
        host: String,
        prefix: IpNet,
    },
    /// Run the doctor's checks (`meshctl doctor`); answered with [`Response::Doctor`].
    Doctor,
    /// Remove everything meshd owns on this host (interface, routes, nftables table,
    /// forwarding settings) and exit 0 (`meshctl down`); answered with `ok` before exiting.
    Down,
}

/// One response line from meshd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // one per connection; the shape is the wire contract
pub enum Response {
    Peers {
        peers: Vec<PeerStatus>,
    },
    Status(Status),
    Ok {
        message: String,
        /// What was done, typed (for `meshctl --json`); absent from an older meshd.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        done: Option<Done>,
    },
    Error {
        message: String,
    },
    Invite(crate::wire::api::InviteResponse),
    Invites {
        invites: Vec<crate::wire::api::InviteInfo>,
    },
    Hosts {
        hosts: Vec<crate::wire::api::HostInfo>,
    },
    Doctor(crate::doctor::Report),
    Routes {
        routes: Vec<crate::routes::RouteInfo>,
    },
}

/// What a request that changes something did, for scripts (`meshctl join --json`, ...): the
/// `message` beside it says the same in words. Tagged by `outcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Done {
    /// `meshctl join`: this host is a member now.
    Joined {
        mesh: IpNet,
        host: String,
        /// This host's mesh address.
        address: IpAddr,
    },
    /// `meshctl rotate`: the new key is live and the old one gone from disk.
    Rotated {
        old_public_key: PublicKey,
        new_public_key: PublicKey,
        took_ms: u64,
        /// Static peers that list the old key by hand (the operator updates them).
        static_peers: Vec<String>,
        /// The pass right after the switch had errors; later passes retry.
        switch_error: Option<String>,
        /// The commit's reply was lost and the coordinator answered through the new key.
        reply_lost: Option<String>,
    },
    /// `meshctl rotate`: the coordinator did not answer; the key is unchanged and the
    /// rotation resumes by itself.
    RotationDeferred { step: String, reason: String },
    /// `meshctl rotate NAME`: the coordinator asked NAME to rotate.
    RotationRequested { host: String },
    /// `meshctl reload`.
    Reloaded {
        config: String,
        ops_applied: usize,
        /// The pass after the reload had errors (later passes retry).
        error: Option<String>,
        /// routes.advertise changed and went to the coordinator.
        advertise_reported: bool,
    },
    /// `meshctl revoke NAME`.
    InvitationRevoked { name: String },
    /// `meshctl remove NAME`.
    Removed { host: String },
    /// `meshctl static-config NAME`.
    StaticConfig {
        name: String,
        wg_quick_config: String,
    },
    /// `meshctl routes approve|revoke`.
    RouteDecided { route: crate::routes::RouteInfo },
    /// `meshctl down`: what was removed (empty: nothing was left); meshd exits.
    Down { removed: Vec<String> },
}

impl Done {
    /// What `--json` prints for a request that changed something: the typed outcome with the
    /// message beside it (`{"outcome":"joined","mesh":...,"message":"joined the mesh ..."}`);
    /// from a meshd that sends no outcome, `outcome` is null.
    pub fn report(message: &str, done: Option<&Done>) -> serde_json::Value {
        let mut v = match done.map(serde_json::to_value) {
            Some(Ok(serde_json::Value::Object(map))) => map,
            _ => {
                let mut map = serde_json::Map::new();
                map.insert("outcome".into(), serde_json::Value::Null);
                map
            }
        };
        v.insert("message".into(), serde_json::Value::from(message));
        serde_json::Value::Object(v)
    }
}

/// One peer as `meshctl peers` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Name from the configuration, `None` for a peer we do not know by name.
    pub name: Option<String>,
    pub public_key: PublicKey,
    pub mesh_address: Option<IpAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the UNIX epoch; `None` = never.
    pub latest_handshake_unix: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
    /// Which netmap candidate the current endpoint is (`None`: no netmap, no endpoint, or an
    /// endpoint that is none of the candidates, e.g. one learned from a roaming peer).
    #[serde(default)]
    pub endpoint_kind: Option<EndpointKind>,
    /// Whether the path to the peer is direct: `Some(true)` when the current endpoint is one
    /// of the peer's own interface addresses (a `Lan` or `Public` candidate), `Some(false)`
    /// when it is the address observed in front of the peer (`Observed`: through its NAT);
    /// `None` when unknown (see `endpoint_kind`). See [`endpoint_path`].
    #[serde(default)]
    pub direct: Option<bool>,
    /// Age of the peer's current public key in seconds (from the netmap).
    #[serde(default)]
    pub key_age_secs: Option<u64>,
    /// A device that cannot run meshd (configured from a wg-quick file).
    #[serde(default)]
    pub static_peer: bool,
}

/// The coordinator as the daemon sees it (`meshctl status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorStatus {
    /// The coordinator's API address (its mesh address and API port).
    pub address: SocketAddr,
    /// Whether the last call to the coordinator succeeded.
    pub reachable: bool,
    /// Last successful contact, seconds since the UNIX epoch.
    pub last_contact_unix: Option<u64>,
    /// [`ROLE_COORDINATOR`] on the coordinator host itself, [`ROLE_MEMBER`] elsewhere.
    pub role: String,
}

/// `CoordinatorStatus::role` of the coordinator host.
pub const ROLE_COORDINATOR: &str = "coordinator";
/// `CoordinatorStatus::role` of every other host of a managed mesh.
pub const ROLE_MEMBER: &str = "member";

/// Where this host stands, for scripts (`meshctl status --json`'s `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Installed, not a member yet: `meshctl join` is what is missing.
    NeedsJoin,
    /// A member of a managed mesh.
    Member,
    /// The coordinator's host.
    Coordinator,
    /// Static `[[peer]]` configuration, no coordinator.
    Static,
    /// Said by an older meshd that did not report it.
    #[default]
    Unknown,
}

/// What `meshctl status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `None` until the host joined (a token brings the name).
    pub host: Option<String>,
    #[serde(default)]
    pub state: HostState,
    pub interface: String,
    pub public_key: PublicKey,
    /// `None` until the host joined.
    pub mesh_address: Option<IpNet>,
    pub listen_port: u16,
    pub backend: String,
    pub config_path: String,
    pub peers_total: usize,
    pub peers_recent_handshake: usize,
    pub last_reconcile_unix: Option<u64>,
    pub last_error: Option<String>,
    pub version: String,
    /// Kernel index of the mesh interface, when it is up.
    #[serde(default)]
    pub ifindex: Option<u32>,
    /// Version of the netmap this host holds (`None`: static configuration, or none yet).
    #[serde(default)]
    pub netmap_version: Option<u64>,
    /// `None` for a host running from a static configuration.
    #[serde(default)]
    pub coordinator: Option<CoordinatorStatus>,
    /// The files meshd keeps for K3s, DRBD, Prometheus, `/etc/hosts` and user templates.
    #[serde(default)]
    pub integrations: Vec<crate::handoff::IntegrationStatus>,
    /// Peers' prefixes this host did not take, and why (`routes.accept`,
    /// `mesh_proto::routes::refusal`); the rest of the netmap applies.
    #[serde(default)]
    pub skipped_routes: Vec<crate::routes::SkippedRoute>,
    /// This host's advertised prefixes that no netmap carries: pending an admin's approval on
    /// the coordinator, or revoked (`meshctl routes` there).
    #[serde(default)]
    pub ungranted_routes: Vec<IpNet>,
    /// Input refused lately, newest last: on the coordinator, API requests without a valid
    /// proof of key; on a member, netmaps it would not take.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refusal>,
    /// How many requests the coordinator API refused since meshd started (coordinator only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_total: Option<u64>,
}

/// One refused input, for `meshctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub at_unix: u64,
    pub what: String,
}

/// A control line that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed control message: {0}")]
pub struct ControlError(#[from] serde_json::Error);

/// Encode one message as a JSON line (with the trailing `\n`).
pub fn encode_line<T: Serialize>(msg: &T) -> Result<String, ControlError> {
    let mut s = serde_json::to_string(msg)?;
    s.push('\n');
    Ok(s)
}

/// Decode one JSON line (surrounding whitespace, including the `\n`, is ignored).
pub fn decode_line<T: DeserializeOwned>(line: &str) -> Result<T, ControlError> {
    Ok(serde_json::from_str(line.trim())?)
}

impl Request {
    /// The JSON line for this request (with `\n`).
    pub fn to_line(&self) -> String {
        // Requests hold only strings, numbers and addresses: serialising cannot fail; should it
        // ever, the daemon answers the empty object with an error naming the request.
        encode_line(self).unwrap_or_else(|_| "{}\n".to_string())
    }

    pub fn from_line(line: &str) -> Result<Self, ControlError> {
        decode_line(line)
    }
}

impl Response {
    /// The JSON line for this response (with `\n`). Never fails: should encoding ever fail,
    /// an `error` response saying so is returned instead.
    pub fn to_line(&self) -> String {
        encode_line(self).unwrap_or_else(|e| {
            let msg = serde_json::to_string(&e.to_string()).unwrap_or_else(|_| "\"\"".into());
            format!("{{\"response\":\"error\",\"message\":{msg}}}\n")
        })
    }

    pub fn from_line(line: &str) -> Result<Self, ControlError> {
        decode_line(line)
    }

    /// `ok` with a message alone (nothing typed to report).
    pub fn ok(message: impl Into<String>) -> Self {
        Response::Ok {
            message: message.into(),
            done: None,
        }
    }

    /// `ok` with the message and what was done, typed.
    pub fn done(message: impl Into<String>, done: Done) -> Self {
        Response::Ok {
            message: message.into(),
            done: Some(done),
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Response::Error {
            message: message.into(),
        }
    }
}

impl PeerStatus {
    /// Build from what the device reports plus what the configuration knows.
    pub fn from_observed(
        peer: &ObservedPeer,
        name: Option<String>,
        mesh_address: Option<IpAddr>,
    ) -> Self {
        PeerStatus {
            name,
            public_key: peer.public_key,
            mesh_address,
            allowed_ips: peer.allowed_ips.clone(),
            endpoint: peer.endpoint,
            latest_handshake_unix: peer.last_handshake.map(|d| d.as_secs()),
            rx_bytes: peer.rx_bytes,
            tx_bytes: peer.tx_bytes,
            persistent_keepalive: peer.persistent_keepalive.filter(|k| *k != 0),
            endpoint_kind: None,
            direct: None,
            key_age_secs: None,
            static_peer: false,
        }
    }

    /// Fill in what the netmap knows about this peer: its name and mesh address (when not
    /// known yet), which candidate the current endpoint is, key age and the static flag.
    pub fn with_netmap(mut self, peer: &NetmapPeer, now_unix: u64) -> Self {
        if self.name.is_none() {
            self.name = Some(peer.name.clone());
        }
        if self.mesh_address.is_none() {
            self.mesh_address = Some(peer.address);
        }
        let (kind, direct) = endpoint_path(self.endpoint, &peer.endpoints);
        self.endpoint_kind = kind;
        self.direct = direct;
        self.key_age_secs = Some(now_unix.saturating_sub(peer.key_created_unix));
        self.static_peer = peer.static_peer;
        self
    }

    /// Whether the latest handshake is younger than [`RECENT_HANDSHAKE_SECS`] at `now_unix`.
    pub fn has_recent_handshake(&self, now_unix: u64) -> bool {
        self.latest_handshake_unix
            .is_some_and(|t| now_unix.saturating_sub(t) < RECENT_HANDSHAKE_SECS)
    }

    /// The name, or the short key for a peer without a name.
    pub fn display_name(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("({})", self.public_key.short()),
        }
    }
}

/// Which candidate `endpoint` is, and whether that path is direct (see
/// [`PeerStatus::direct`]): `Lan`/`Public` are direct, `Observed` is not; an endpoint that
/// is none of the candidates (or none at all) is unknown on both counts.
pub fn endpoint_path(
    endpoint: Option<SocketAddr>,
    candidates: &[EndpointCandidate],
) -> (Option<EndpointKind>, Option<bool>) {
    let kind = endpoint.and_then(|e| candidates.iter().find(|c| c.addr == e).map(|c| c.kind));
    let direct = kind.map(|k| k != EndpointKind::Observed);
    (kind, direct)
}

/// "lan", "public", "observed".
pub fn endpoint_kind_str(kind: EndpointKind) -> &'static str {
    match kind {
        EndpointKind::Lan => "lan",
        EndpointKind::Public => "public",
        EndpointKind::Observed => "observed",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::render::{render_peers_table, render_routes, render_status};
    use std::time::Duration;

    pub(crate) fn peer(name: Option<&str>) -> PeerStatus {
        PeerStatus {
            name: name.map(str::to_string),
            public_key: PublicKey([2; 32]),
            mesh_address: Some("10.99.99.2".parse().unwrap()),
            allowed_ips: vec!["10.99.99.2/32".parse().unwrap()],
            endpoint: Some("198.51.100.2:51871".parse().unwrap()),
            latest_handshake_unix: Some(995),
            rx_bytes: 1536,
            tx_bytes: 12_900_000,
            persistent_keepalive: Some(25),
            endpoint_kind: None,
            direct: None,
            key_age_secs: None,
            static_peer: false,
        }
    }

    pub(crate) fn status() -> Status {
        Status {
            host: Some("dock-load".into()),
            state: HostState::Static,
            interface: "wgmesh0".into(),
            public_key: PublicKey([1; 32]),
            mesh_address: Some("10.99.99.1/24".parse().unwrap()),
            listen_port: 51871,
            backend: "userspace".into(),
            config_path: "/etc/meshd/meshd.toml".into(),
            peers_total: 4,
            peers_recent_handshake: 3,
            last_reconcile_unix: Some(990),
            last_error: None,
            version: "0.1.0".into(),
            ifindex: None,
            netmap_version: None,
            coordinator: None,
            integrations: Vec::new(),
            skipped_routes: Vec::new(),
            ungranted_routes: Vec::new(),
            refused: Vec::new(),
            refused_total: None,
        }
    }

    #[test]
    fn routes_requests_round_trip_and_render() {
        use crate::routes::{RouteDecision, RouteInfo, RouteState, SkipReason, SkippedRoute};
        let req = Request::RouteDecision {
            decision: RouteDecision::Approve,
            host: "dock-edge".into(),
            prefix: "192.168.1.20/32".parse().unwrap(),
        };
        let line = req.to_line();
        assert_eq!(
            line,
            "{\"request\":\"route_decision\",\"decision\":\"approve\",\"host\":\"dock-edge\",\"prefix\":\"192.168.1.20/32\"}\n"
        );
        assert_eq!(Request::from_line(&line).unwrap(), req);
        assert_eq!(
            Request::from_line("{\"request\":\"routes\"}").unwrap(),
            Request::Routes
        );
        assert!(Request::from_line(
            "{\"request\":\"route_decision\",\"decision\":\"grant\",\"host\":\"a\",\"prefix\":\"1.1.1.0/24\"}"
        )
        .is_err());
        let routes = vec![RouteInfo {
            host: "dock-edge".into(),
            prefix: "192.168.1.20/32".parse().unwrap(),
            state: RouteState::Pending,
            advertised: true,
            decided_unix: None,
        }];
        let r = Response::Routes {
            routes: routes.clone(),
        };
        assert_eq!(Response::from_line(&r.to_line()).unwrap(), r);
        let table = render_routes(&routes, 0);
        assert!(table.starts_with("HOST"), "{table}");
        assert!(
            table.contains("dock-edge") && table.contains("pending"),
            "{table}"
        );
        let mut st = status();
        st.skipped_routes = vec![SkippedRoute {
            peer: "evil".into(),
            prefix: "127.0.0.0/8".parse().unwrap(),
            reason: SkipReason::Reserved {
                range: "127.0.0.0/8".parse().unwrap(),
                what: "loopback".into(),
            },
        }];
        let text = render_status(&st, 1000);
        assert!(
            text.contains("skipped route:  127.0.0.0/8 from evil: overlaps 127.0.0.0/8 (loopback)"),
            "{text}"
        );
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["skipped_routes"][0]["reason"], "reserved");
        // An older meshd's status (no skipped_routes) still reads.
        let mut o = v.clone();
        o.as_object_mut().unwrap().remove("skipped_routes");
        let back: Status = serde_json::from_value(o).unwrap();
        assert!(back.skipped_routes.is_empty());
        st.ungranted_routes = vec!["1.1.1.0/24".parse().unwrap()];
        let text = render_status(&st, 1000);
        assert!(
            text.contains("1.1.1.0/24 NOT GRANTED")
                && text.contains("meshctl routes approve dock-load 1.1.1.0/24"),
            "{text}"
        );
    }

    #[test]
    fn request_wire_format() {
        for (r, s) in [
            (Request::Peers, "{\"request\":\"peers\"}"),
            (Request::Status, "{\"request\":\"status\"}"),
            (Request::Reload, "{\"request\":\"reload\"}"),
        ] {
            assert_eq!(serde_json::to_string(&r).unwrap(), s);
            assert_eq!(r.to_line(), format!("{s}\n"));
            assert_eq!(Request::from_line(&format!("{s}\n")).unwrap(), r);
        }
        assert!(Request::from_line("{\"request\":\"nope\"}").is_err());
        assert!(Request::from_line("garbage").is_err());
    }

    #[test]
    fn response_wire_format() {
        let ok = Response::ok("reloaded");
        assert_eq!(
            ok.to_line(),
            "{\"response\":\"ok\",\"message\":\"reloaded\"}\n"
        );
        let err = Response::error("no");
        assert_eq!(
            err.to_line(),
            "{\"response\":\"error\",\"message\":\"no\"}\n"
        );
        let st = Response::Status(status());
        let line = st.to_line();
        assert!(
            line.starts_with("{\"response\":\"status\",\"host\":\"dock-load\""),
            "{line}"
        );
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        assert_eq!(Response::from_line(&line).unwrap(), st);
        let peers = Response::Peers {
            peers: vec![peer(Some("dock-prod")), peer(None)],
        };
        let line = peers.to_line();
        assert!(line.contains(&format!("\"public_key\":\"{}\"", PublicKey([2; 32]))));
        assert!(line.contains("\"allowed_ips\":[\"10.99.99.2/32\"]"));
        assert_eq!(Response::from_line(&line).unwrap(), peers);
        let v: Response = decode_line(&encode_line(&peers).unwrap()).unwrap();
        assert_eq!(v, peers);
    }

    #[test]
    fn typed_outcomes_travel_beside_the_message_and_old_replies_still_decode() {
        let done = Done::Joined {
            mesh: "10.99.99.0/24".parse().unwrap(),
            host: "dock-edge".into(),
            address: "10.99.99.7".parse().unwrap(),
        };
        let r = Response::done("joined the mesh", done.clone());
        let line = r.to_line();
        assert!(
            line.contains("\"done\":{\"outcome\":\"joined\",\"mesh\":\"10.99.99.0/24\""),
            "{line}"
        );
        assert_eq!(Response::from_line(&line).unwrap(), r);
        // A meshd from before typed outcomes.
        assert_eq!(
            Response::from_line("{\"response\":\"ok\",\"message\":\"x\"}").unwrap(),
            Response::ok("x")
        );
        let v = Done::report("joined the mesh", Some(&done));
        assert_eq!(v["outcome"], "joined");
        assert_eq!(v["address"], "10.99.99.7");
        assert_eq!(v["host"], "dock-edge");
        assert_eq!(v["message"], "joined the mesh");
        let v = Done::report("x", None);
        assert!(v["outcome"].is_null() && v["message"] == "x", "{v}");
        let v = Done::report(
            "nothing",
            Some(&Done::Reloaded {
                config: "/etc/meshd/meshd.toml".into(),
                ops_applied: 0,
                error: None,
                advertise_reported: false,
            }),
        );
        assert!(v["error"].is_null() && v["ops_applied"] == 0, "{v}");
    }

    #[test]
    fn from_observed() {
        let o = ObservedPeer {
            public_key: PublicKey([5; 32]),
            preshared_key: Some([9; 32]),
            endpoint: None,
            allowed_ips: vec!["10.99.99.5/32".parse().unwrap()],
            persistent_keepalive: Some(0),
            last_handshake: Some(Duration::new(1000, 5)),
            rx_bytes: 1,
            tx_bytes: 2,
        };
        let p = PeerStatus::from_observed(&o, Some("dock-dash".into()), None);
        assert_eq!(p.latest_handshake_unix, Some(1000));
        assert_eq!(p.persistent_keepalive, None);
        assert!(p.has_recent_handshake(1000 + RECENT_HANDSHAKE_SECS - 1));
        assert!(!p.has_recent_handshake(1000 + RECENT_HANDSHAKE_SECS));
        // Never carries the preshared key.
        assert!(!serde_json::to_string(&p).unwrap().contains("preshared"));
    }

    fn netmap_peer() -> NetmapPeer {
        NetmapPeer {
            name: "dock-edge".into(),
            address: "10.99.99.4".parse().unwrap(),
            public_key: PublicKey([2; 32]),
            allowed_ips: vec!["10.99.99.4/32".parse().unwrap()],
            endpoints: vec![
                EndpointCandidate {
                    addr: "192.168.1.4:51871".parse().unwrap(),
                    kind: EndpointKind::Lan,
                },
                EndpointCandidate {
                    addr: "198.51.100.2:51871".parse().unwrap(),
                    kind: EndpointKind::Observed,
                },
            ],
            persistent_keepalive: Some(25),
            static_peer: false,
            admin: false,
            key_created_unix: 0,
            next_public_key: None,
        }
    }

    #[test]
    fn netmap_fields() {
        let p = peer(None).with_netmap(&netmap_peer(), 1000);
        assert_eq!(p.name.as_deref(), Some("dock-edge"));
        // The configured mesh address is kept.
        assert_eq!(p.mesh_address, Some("10.99.99.2".parse().unwrap()));
        assert_eq!(p.endpoint_kind, Some(EndpointKind::Observed));
        assert_eq!(p.direct, Some(false));
        assert_eq!(p.key_age_secs, Some(1000));
        let mut lan = peer(Some("x"));
        lan.endpoint = Some("192.168.1.4:51871".parse().unwrap());
        let lan = lan.with_netmap(&netmap_peer(), 1000);
        assert_eq!(lan.name.as_deref(), Some("x"));
        assert_eq!(lan.endpoint_kind, Some(EndpointKind::Lan));
        assert_eq!(lan.direct, Some(true));
        let mut roamed = peer(None);
        roamed.endpoint = Some("203.0.113.9:1".parse().unwrap());
        let roamed = roamed.with_netmap(&netmap_peer(), 1000);
        assert_eq!((roamed.endpoint_kind, roamed.direct), (None, None));
        assert_eq!(endpoint_path(None, &netmap_peer().endpoints), (None, None));

        let mut st = lan.clone();
        st.static_peer = true;
        let table = render_peers_table(&[lan, roamed, st], 1000);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].contains("  lan  ") && lines[1].ends_with("  16m 40s"),
            "{table}"
        );
        assert!(lines[2].contains("  -  "), "{table}");
        assert!(lines[3].contains("  lan,static  "), "{table}");
    }

    #[test]
    fn doctor_and_down_lines() {
        assert_eq!(Request::Doctor.to_line(), "{\"request\":\"doctor\"}\n");
        assert_eq!(Request::Down.to_line(), "{\"request\":\"down\"}\n");
        let report = crate::doctor::Report {
            host: None,
            interface: "wgmesh0".into(),
            source: crate::doctor::SOURCE_DAEMON.into(),
            elapsed_ms: 3,
            checks: vec![crate::doctor::Check::ok("port", "free")],
        };
        let line = Response::Doctor(report.clone()).to_line();
        assert!(
            line.starts_with("{\"response\":\"doctor\",\"host\":null,"),
            "{line}"
        );
        assert_eq!(
            Response::from_line(&line).unwrap(),
            Response::Doctor(report)
        );
    }

    #[test]
    fn old_messages_still_decode() {
        // A status and a peer as a daemon before issue 3 sent them.
        let mut old = serde_json::to_value(status()).unwrap();
        let o = old.as_object_mut().unwrap();
        o.remove("ifindex");
        o.remove("netmap_version");
        o.remove("coordinator");
        let st: Status = serde_json::from_value(old).unwrap();
        assert_eq!(st, status());
        let mut old = serde_json::to_value(peer(None)).unwrap();
        let o = old.as_object_mut().unwrap();
        for k in ["endpoint_kind", "direct", "key_age_secs", "static_peer"] {
            assert!(o.remove(k).is_some(), "{k}");
        }
        let p: PeerStatus = serde_json::from_value(old).unwrap();
        assert_eq!(p, peer(None));
        let line = serde_json::to_string(&peer(None).with_netmap(&netmap_peer(), 1000)).unwrap();
        assert!(line.contains("\"endpoint_kind\":\"observed\""), "{line}");
    }
}
