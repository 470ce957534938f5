//! The control protocol between `meshctl` and `meshd` over the Unix control socket: one JSON
//! request line, one JSON response line. Plus the pure rendering helpers meshctl uses.
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

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::api::{HostInfo, InviteInfo, InviteResponse};
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
    Invite(crate::api::InviteRequest),
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
    },
    Error {
        message: String,
    },
    Invite(crate::api::InviteResponse),
    Invites {
        invites: Vec<crate::api::InviteInfo>,
    },
    Hosts {
        hosts: Vec<crate::api::HostInfo>,
    },
    Doctor(crate::doctor::Report),
    Routes {
        routes: Vec<crate::routes::RouteInfo>,
    },
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

/// What `meshctl status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub host: String,
    pub interface: String,
    pub public_key: PublicKey,
    pub mesh_address: IpNet,
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
    pub integrations: Vec<crate::integrate::IntegrationStatus>,
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

    pub fn ok(message: impl Into<String>) -> Self {
        Response::Ok {
            message: message.into(),
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

/// "4s", "1m 5s", "2h 3m", "3d 4h" (a duration, see [`format_age`]).
pub fn format_duration(secs: u64) -> String {
    const MIN: u64 = 60;
    const HOUR: u64 = 60 * MIN;
    const DAY: u64 = 24 * HOUR;
    if secs < MIN {
        format!("{secs}s")
    } else if secs < HOUR {
        format!("{}m {}s", secs / MIN, secs % MIN)
    } else if secs < DAY {
        format!("{}h {}m", secs / HOUR, (secs % HOUR) / MIN)
    } else {
        format!("{}d {}h", secs / DAY, (secs % DAY) / HOUR)
    }
}

/// Seconds since the UNIX epoch as `2026-11-30 02:20:51 UTC`.
pub fn format_utc(unix: u64) -> String {
    let days = unix / 86400;
    let rem = unix % 86400;
    // Howard Hinnant's civil_from_days, on unsigned arithmetic (the epoch is after 0000-03-01).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// "in 23h 59m", or "expired 5s ago".
fn expiry_cell(expires_unix: u64, now_unix: u64) -> String {
    if expires_unix > now_unix {
        format!("in {}", format_duration(expires_unix - now_unix))
    } else {
        format!("expired {}", format_age(now_unix - expires_unix))
    }
}

/// "4s ago", "1m 5s ago", "2h 3m ago", "3d 4h ago".
pub fn format_age(secs: u64) -> String {
    const MIN: u64 = 60;
    const HOUR: u64 = 60 * MIN;
    const DAY: u64 = 24 * HOUR;
    if secs < MIN {
        format!("{secs}s ago")
    } else if secs < HOUR {
        format!("{}m {}s ago", secs / MIN, secs % MIN)
    } else if secs < DAY {
        format!("{}h {}m ago", secs / HOUR, (secs % HOUR) / MIN)
    } else {
        format!("{}d {}h ago", secs / DAY, (secs % DAY) / HOUR)
    }
}

/// "0 B", "1023 B", "1.5 KiB", "12.3 MiB", ... (binary units, one decimal).
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    // Move up when rounding to one decimal would print "1024.0".
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn handshake_cell(t: Option<u64>, now_unix: u64) -> String {
    match t {
        Some(t) => format_age(now_unix.saturating_sub(t)),
        None => "never".to_string(),
    }
}

/// Left-aligned columns separated by two spaces, no trailing spaces.
fn render_table(rows: &[Vec<String>]) -> String {
    let ncols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; ncols];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The KIND cell: the endpoint kind ("lan", "public", "observed"), "static" appended for a
/// static peer; "-" when unknown.
fn kind_cell(p: &PeerStatus) -> String {
    let kind = p.endpoint_kind.map(endpoint_kind_str);
    match (kind, p.static_peer) {
        (Some(k), true) => format!("{k},static"),
        (Some(k), false) => k.to_string(),
        (None, true) => "static".to_string(),
        (None, false) => "-".to_string(),
    }
}

/// The `meshctl peers` table: NAME, ADDRESS, ENDPOINT, KIND, HANDSHAKE, RX, TX, KEEPALIVE,
/// KEY AGE. Missing values show as "-", a peer that never completed a handshake as "never".
/// A peer without a name shows its short key in parentheses. KIND is the endpoint's netmap
/// candidate kind (`lan`, `public`: a direct path; `observed`: through the peer's NAT),
/// with `,static` for a static peer.
pub fn render_peers_table(peers: &[PeerStatus], now_unix: u64) -> String {
    let mut rows = vec![[
        "NAME",
        "ADDRESS",
        "ENDPOINT",
        "KIND",
        "HANDSHAKE",
        "RX",
        "TX",
        "KEEPALIVE",
        "KEY AGE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for p in peers {
        let address = match (p.mesh_address, p.allowed_ips.first()) {
            (Some(a), _) => a.to_string(),
            (None, Some(net)) => net.to_string(),
            (None, None) => "-".to_string(),
        };
        rows.push(vec![
            p.display_name(),
            address,
            p.endpoint
                .map(|e| e.to_string())
                .unwrap_or_else(|| "-".to_string()),
            kind_cell(p),
            handshake_cell(p.latest_handshake_unix, now_unix),
            format_bytes(p.rx_bytes),
            format_bytes(p.tx_bytes),
            match p.persistent_keepalive {
                Some(k) if k != 0 => format!("{k}s"),
                _ => "-".to_string(),
            },
            p.key_age_secs
                .map(format_duration)
                .unwrap_or_else(|| "-".to_string()),
        ]);
    }
    render_table(&rows)
}

/// The `meshctl status` text: one aligned `label: value` line per field.
pub fn render_status(status: &Status, now_unix: u64) -> String {
    let fields: Vec<(&str, String)> = vec![
        ("host", status.host.clone()),
        (
            "interface",
            match status.ifindex {
                Some(i) => format!("{} (ifindex {i})", status.interface),
                None => status.interface.clone(),
            },
        ),
        ("public key", status.public_key.to_string()),
        ("mesh address", status.mesh_address.to_string()),
        ("listen port", status.listen_port.to_string()),
        ("backend", status.backend.clone()),
        ("config", status.config_path.clone()),
        (
            "peers",
            format!(
                "{} ({} with a handshake in the last {}s)",
                status.peers_total, status.peers_recent_handshake, RECENT_HANDSHAKE_SECS
            ),
        ),
        (
            "last reconcile",
            handshake_cell(status.last_reconcile_unix, now_unix),
        ),
        (
            "last error",
            status.last_error.clone().unwrap_or_else(|| "-".to_string()),
        ),
        ("coordinator", coordinator_cell(status, now_unix)),
        (
            "netmap",
            match status.netmap_version {
                Some(v) => format!("version {v}"),
                None => "-".to_string(),
            },
        ),
        ("version", status.version.clone()),
    ];
    let mut fields = fields;
    for i in &status.integrations {
        fields.push(("integration", integration_cell(i, now_unix)));
    }
    for r in &status.skipped_routes {
        fields.push(("skipped route", r.to_string()));
    }
    for p in &status.ungranted_routes {
        fields.push((
            "advertised",
            format!(
                "{p} NOT GRANTED: pending an admin's approval on the coordinator, or revoked \
                 (meshctl routes approve {} {p})",
                status.host
            ),
        ));
    }
    if let Some(n) = status.refused_total {
        fields.push(("api refusals", format!("{n} since start")));
    }
    for r in &status.refused {
        fields.push((
            "refused",
            format!(
                "{}: {}",
                format_age(now_unix.saturating_sub(r.at_unix)),
                r.what
            ),
        ));
    }
    let width = fields.iter().map(|(l, _)| l.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (label, value) in fields {
        let _ = writeln!(out, "{:<width$} {value}", format!("{label}:"));
    }
    out
}

/// One integration on one line: `k3s /etc/rancher/k3s/config.yaml.d/90-meshd.yaml ok, changed
/// 3m 0s ago` or `template:haproxy /etc/haproxy/mesh.cfg FAILED: ... (the old file is kept)`.
pub fn integration_cell(i: &crate::integrate::IntegrationStatus, now_unix: u64) -> String {
    let changed = match i.last_change_unix {
        Some(t) => format!("changed {}", format_age(now_unix.saturating_sub(t))),
        None => "unchanged since start".to_string(),
    };
    match (&i.last_error, i.ok) {
        (Some(e), false) => format!(
            "{} {} FAILED: {e} (the old file is kept)",
            i.name,
            i.path.display()
        ),
        _ => format!("{} {} ok, {changed}", i.name, i.path.display()),
    }
}

/// "this host (10.99.99.1:51872)", "10.99.99.1:51872 reachable, last contact 3s ago",
/// "10.99.99.1:51872 UNREACHABLE, last contact 5m 0s ago", or "- (static configuration)".
fn coordinator_cell(status: &Status, now_unix: u64) -> String {
    let Some(c) = &status.coordinator else {
        return "- (static configuration)".to_string();
    };
    if c.role == ROLE_COORDINATOR {
        return format!("this host ({})", c.address);
    }
    let contact = match c.last_contact_unix {
        Some(t) => format!("last contact {}", format_age(now_unix.saturating_sub(t))),
        None => "never contacted".to_string(),
    };
    let state = if c.reachable {
        "reachable"
    } else {
        "UNREACHABLE"
    };
    format!("{} {state}, {contact}", c.address)
}

/// What `meshctl invite` prints: for a daemon host, a summary line and the token alone on
/// its own line; for a static peer, a comment line and the wg-quick configuration.
pub fn render_invite(inv: &InviteResponse) -> String {
    let mut out = String::new();
    let expires = inv
        .expires_unix
        .map(|e| format!(", expires {}", format_utc(e)))
        .unwrap_or_default();
    if let Some(conf) = &inv.wg_quick_config {
        let _ = writeln!(
            out,
            "# wg-quick configuration for static peer {} ({})",
            inv.name, inv.address
        );
        out.push_str(conf);
        if !conf.ends_with('\n') {
            out.push('\n');
        }
    }
    if let Some(token) = &inv.token {
        let _ = writeln!(
            out,
            "invitation for {} ({}), single use{expires}; on the new host run: meshctl join - and paste the token",
            inv.name, inv.address
        );
        let _ = writeln!(out, "{token}");
    }
    if out.is_empty() {
        let _ = writeln!(
            out,
            "{} ({}) registered{expires}; no token or configuration was returned",
            inv.name, inv.address
        );
    }
    out
}

/// The `meshctl invites` table: NAME, ADDRESS, ADMIN, CREATED, EXPIRES.
pub fn render_invites(invites: &[InviteInfo], now_unix: u64) -> String {
    if invites.is_empty() {
        return "no pending invitations\n".to_string();
    }
    let mut rows = vec![["NAME", "ADDRESS", "ADMIN", "CREATED", "EXPIRES"]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()];
    for i in invites {
        rows.push(vec![
            i.name.clone(),
            i.address.to_string(),
            if i.admin { "yes" } else { "no" }.to_string(),
            format_age(now_unix.saturating_sub(i.created_unix)),
            expiry_cell(i.expires_unix, now_unix),
        ]);
    }
    render_table(&rows)
}

/// The `meshctl routes` table: HOST, PREFIX, STATE, ADVERTISED, DECIDED.
pub fn render_routes(routes: &[crate::routes::RouteInfo], now_unix: u64) -> String {
    let mut rows = vec![["HOST", "PREFIX", "STATE", "ADVERTISED", "DECIDED"]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()];
    for r in routes {
        rows.push(vec![
            r.host.clone(),
            r.prefix.to_string(),
            r.state.to_string(),
            if r.advertised { "yes" } else { "no" }.to_string(),
            r.decided_unix
                .map(|t| format_age(now_unix.saturating_sub(t)))
                .unwrap_or_else(|| "-".to_string()),
        ]);
    }
    render_table(&rows)
}

/// The `meshctl hosts` table: NAME, ADDRESS, KEY, FLAGS, LAST SEEN, OBSERVED, CREATED.
/// FLAGS lists `admin`, `static` and `removed` (comma-separated, "-" for none).
pub fn render_hosts(hosts: &[HostInfo], now_unix: u64) -> String {
    let mut rows = vec![[
        "NAME",
        "ADDRESS",
        "KEY",
        "FLAGS",
        "LAST SEEN",
        "OBSERVED",
        "CREATED",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for h in hosts {
        let flags: Vec<&str> = [
            (h.admin, "admin"),
            (h.static_peer, "static"),
            (h.removed, "removed"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, f)| *f)
        .collect();
        rows.push(vec![
            h.name.clone(),
            h.address.to_string(),
            h.public_key.short(),
            if flags.is_empty() {
                "-".to_string()
            } else {
                flags.join(",")
            },
            handshake_cell(h.last_seen_unix, now_unix),
            h.observed
                .map(|o| o.to_string())
                .unwrap_or_else(|| "-".to_string()),
            format_age(now_unix.saturating_sub(h.created_unix)),
        ]);
    }
    render_table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn peer(name: Option<&str>) -> PeerStatus {
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

    fn status() -> Status {
        Status {
            host: "dock-load".into(),
            interface: "wgmesh0".into(),
            public_key: PublicKey([1; 32]),
            mesh_address: "10.99.99.1/24".parse().unwrap(),
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
    fn status_shows_one_line_per_integration() {
        use crate::integrate::IntegrationStatus;
        let mut st = status();
        st.integrations = vec![
            IntegrationStatus {
                name: "k3s".into(),
                path: "/etc/rancher/k3s/config.yaml.d/90-meshd.yaml".into(),
                ok: true,
                last_error: None,
                last_change_unix: Some(880),
                last_reload_unix: None,
            },
            IntegrationStatus {
                name: "template:haproxy".into(),
                path: "/etc/haproxy/mesh.cfg".into(),
                ok: false,
                last_error: Some("template template:haproxy: syntax error".into()),
                last_change_unix: None,
                last_reload_unix: None,
            },
        ];
        let text = render_status(&st, 1000);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("integration:"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].ends_with(
                "k3s /etc/rancher/k3s/config.yaml.d/90-meshd.yaml ok, changed 2m 0s ago"
            ),
            "{text}"
        );
        assert!(
            lines[1].contains("template:haproxy /etc/haproxy/mesh.cfg FAILED: template template:haproxy: syntax error (the old file is kept)"),
            "{text}"
        );
        // Older daemons send no integrations: still decodes.
        let mut v = serde_json::to_value(status()).unwrap();
        v.as_object_mut().unwrap().remove("integrations");
        let back: Status = serde_json::from_value(v).unwrap();
        assert!(back.integrations.is_empty());
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
    fn ages() {
        assert_eq!(format_age(0), "0s ago");
        assert_eq!(format_age(4), "4s ago");
        assert_eq!(format_age(59), "59s ago");
        assert_eq!(format_age(60), "1m 0s ago");
        assert_eq!(format_age(65), "1m 5s ago");
        assert_eq!(format_age(2 * 3600 + 3 * 60 + 9), "2h 3m ago");
        assert_eq!(format_age(3 * 86400 + 4 * 3600 + 5), "3d 4h ago");
        assert!(format_age(u64::MAX).ends_with("h ago"));
    }

    #[test]
    fn bytes() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.0 KiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(12_897_484), "12.3 MiB");
        assert_eq!(format_bytes(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(format_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn peers_table() {
        let mut unknown = peer(None);
        unknown.mesh_address = None;
        unknown.endpoint = None;
        unknown.latest_handshake_unix = None;
        unknown.persistent_keepalive = None;
        unknown.rx_bytes = 0;
        unknown.tx_bytes = 0;
        let table = render_peers_table(&[peer(Some("dock-prod")), unknown], 1000);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        let short = PublicKey([2; 32]).short();
        assert_eq!(
            lines[0],
            "NAME        ADDRESS        ENDPOINT            KIND  HANDSHAKE  RX       TX        \
             KEEPALIVE  KEY AGE"
        );
        assert_eq!(
            lines[1],
            "dock-prod   10.99.99.2     198.51.100.2:51871  -     5s ago     1.5 KiB  12.3 MiB  \
             25s        -"
        );
        assert_eq!(
            lines[2],
            format!(
                "({short})  10.99.99.2/32  -                   -     never      0 B      0 B       \
                 -          -"
            )
        );
        // Columns line up: every column starts at the same offset on every line.
        let col = |l: &str, name: &str| lines[0].find(name).map(|i| l.get(i - 2..i) == Some("  "));
        for l in &lines[1..] {
            assert_eq!(col(l, "ENDPOINT"), Some(true));
            assert_eq!(col(l, "KEEPALIVE"), Some(true));
        }
        assert_eq!(render_peers_table(&[], 0).lines().count(), 1);
    }

    #[test]
    fn status_text() {
        let text = render_status(&status(), 1000);
        assert!(text.contains("host:           dock-load\n"), "{text}");
        assert!(text.contains("last reconcile: 10s ago\n"), "{text}");
        assert!(text.contains("last error:     -\n"), "{text}");
        assert!(
            text.contains("peers:          4 (3 with a handshake in the last 180s)\n"),
            "{text}"
        );
        assert!(text.contains(&PublicKey([1; 32]).to_string()));
        let mut s = status();
        s.last_reconcile_unix = None;
        s.last_error = Some("route 10.42.0.0/16 overlaps flannel.1".into());
        let text = render_status(&s, 1000);
        assert!(text.contains("last reconcile: never\n"), "{text}");
        assert!(text.contains("last error:     route 10.42.0.0/16 overlaps flannel.1\n"));
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

    #[test]
    fn status_with_coordinator() {
        let mut s = status();
        s.ifindex = Some(7);
        s.netmap_version = Some(42);
        s.coordinator = Some(CoordinatorStatus {
            address: "10.99.99.1:51872".parse().unwrap(),
            reachable: true,
            last_contact_unix: Some(997),
            role: ROLE_MEMBER.into(),
        });
        let text = render_status(&s, 1000);
        assert!(
            text.contains("interface:      wgmesh0 (ifindex 7)\n"),
            "{text}"
        );
        assert!(text.contains("netmap:         version 42\n"), "{text}");
        assert!(
            text.contains("coordinator:    10.99.99.1:51872 reachable, last contact 3s ago\n"),
            "{text}"
        );
        if let Some(c) = s.coordinator.as_mut() {
            c.reachable = false;
            c.last_contact_unix = None;
        }
        let text = render_status(&s, 1000);
        assert!(text.contains("UNREACHABLE, never contacted"), "{text}");
        if let Some(c) = s.coordinator.as_mut() {
            c.role = ROLE_COORDINATOR.into();
        }
        assert!(render_status(&s, 1000).contains("coordinator:    this host (10.99.99.1:51872)\n"));
        let text = render_status(&status(), 1000);
        assert!(
            text.contains("coordinator:    - (static configuration)\n"),
            "{text}"
        );
        assert!(text.contains("netmap:         -\n"), "{text}");
        let line = Response::Status(s.clone()).to_line();
        assert_eq!(Response::from_line(&line).unwrap(), Response::Status(s));
    }

    #[test]
    fn utc_and_durations() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_796_005_251), "2026-11-30 02:20:51 UTC");
        assert!(format_utc(u64::MAX).ends_with("UTC"));
        assert_eq!(format_duration(59), "59s");
        assert_eq!(format_duration(86400 + 3600), "1d 1h");
    }

    #[test]
    fn admin_renderers() {
        let inv = InviteResponse {
            name: "dock-mirror".into(),
            address: "10.99.99.3".parse().unwrap(),
            token: Some("meshd1.abc_-".into()),
            wg_quick_config: None,
            expires_unix: Some(0),
        };
        let text = render_invite(&inv);
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "invitation for dock-mirror (10.99.99.3), single use, expires 1970-01-01 \
                 00:00:00 UTC; on the new host run: meshctl join - and paste the token",
                "meshd1.abc_-"
            ]
        );
        let st = InviteResponse {
            name: "nas".into(),
            address: "10.99.99.20".parse().unwrap(),
            token: None,
            wg_quick_config: Some("[Interface]\nAddress = 10.99.99.20/24".into()),
            expires_unix: None,
        };
        let text = render_invite(&st);
        assert!(text.starts_with("# wg-quick configuration for static peer nas (10.99.99.20)\n"));
        assert!(text.ends_with("Address = 10.99.99.20/24\n"), "{text}");
        let none = InviteResponse {
            token: None,
            wg_quick_config: None,
            ..st
        };
        assert!(render_invite(&none).contains("no token"));

        let invites = [
            InviteInfo {
                name: "dock-mirror".into(),
                address: "10.99.99.3".parse().unwrap(),
                created_unix: 900,
                expires_unix: 1000 + 86400 - 60,
                admin: false,
            },
            InviteInfo {
                name: "ops".into(),
                address: "10.99.99.6".parse().unwrap(),
                created_unix: 0,
                expires_unix: 990,
                admin: true,
            },
        ];
        let table = render_invites(&invites, 1000);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "NAME         ADDRESS     ADMIN  CREATED      EXPIRES"
        );
        assert_eq!(
            lines[1],
            "dock-mirror  10.99.99.3  no     1m 40s ago   in 23h 59m"
        );
        assert_eq!(
            lines[2],
            "ops          10.99.99.6  yes    16m 40s ago  expired 10s ago"
        );
        assert_eq!(render_invites(&[], 0), "no pending invitations\n");

        let hosts = [
            HostInfo {
                name: "dock-load".into(),
                address: "10.99.99.1".parse().unwrap(),
                public_key: PublicKey([1; 32]),
                admin: true,
                static_peer: false,
                removed: false,
                created_unix: 0,
                last_seen_unix: Some(999),
                observed: Some("198.51.100.1:51871".parse().unwrap()),
            },
            HostInfo {
                name: "nas".into(),
                address: "10.99.99.20".parse().unwrap(),
                public_key: PublicKey([9; 32]),
                admin: false,
                static_peer: true,
                removed: true,
                created_unix: 500,
                last_seen_unix: None,
                observed: None,
            },
        ];
        let table = render_hosts(&hosts, 1000);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("NAME       ADDRESS      KEY"),
            "{table}"
        );
        assert!(lines[1].contains(&PublicKey([1; 32]).short()), "{table}");
        assert!(lines[1].contains("  admin  "), "{table}");
        assert!(lines[1].contains("1s ago"), "{table}");
        assert!(lines[2].contains("  static,removed  never"), "{table}");
        assert_eq!(render_hosts(&[], 0).lines().count(), 1);
    }
}
