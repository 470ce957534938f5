//! The control protocol between `meshctl` and `meshd` over the Unix control socket: one JSON
//! request line, one JSON response line. Plus the pure rendering helpers meshctl uses.
//!
//! ```text
//! -> {"request":"peers"}
//! <- {"response":"peers","peers":[{"name":"dock-prod","public_key":"...", ...}]}
//! -> {"request":"status"}
//! <- {"response":"status","host":"dock-load", ...}
//! -> {"request":"reload"}
//! <- {"response":"ok","message":"reloaded: 2 peers updated"}
//! <- {"response":"error","message":"..."}
//! ```

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::device::ObservedPeer;
use crate::key::PublicKey;

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
    /// Join a mesh with an invitation token (`meshctl join TOKEN`).
    Join {
        token: String,
    },
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
}

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
        }
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

/// The `meshctl peers` table: NAME, ADDRESS, ENDPOINT, HANDSHAKE, RX, TX, KEEPALIVE.
/// Missing values show as "-", a peer that never completed a handshake as "never".
/// A peer without a name shows its short key in parentheses.
pub fn render_peers_table(peers: &[PeerStatus], now_unix: u64) -> String {
    let mut rows = vec![[
        "NAME",
        "ADDRESS",
        "ENDPOINT",
        "HANDSHAKE",
        "RX",
        "TX",
        "KEEPALIVE",
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
            handshake_cell(p.latest_handshake_unix, now_unix),
            format_bytes(p.rx_bytes),
            format_bytes(p.tx_bytes),
            match p.persistent_keepalive {
                Some(k) if k != 0 => format!("{k}s"),
                _ => "-".to_string(),
            },
        ]);
    }
    render_table(&rows)
}

/// The `meshctl status` text: one aligned `label: value` line per field.
pub fn render_status(status: &Status, now_unix: u64) -> String {
    let fields: Vec<(&str, String)> = vec![
        ("host", status.host.clone()),
        ("interface", status.interface.clone()),
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
        ("version", status.version.clone()),
    ];
    let width = fields.iter().map(|(l, _)| l.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (label, value) in fields {
        let _ = writeln!(out, "{:<width$} {value}", format!("{label}:"));
    }
    out
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
        }
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
            "NAME        ADDRESS        ENDPOINT            HANDSHAKE  RX       TX        KEEPALIVE"
        );
        assert_eq!(
            lines[1],
            "dock-prod   10.99.99.2     198.51.100.2:51871  5s ago     1.5 KiB  12.3 MiB  25s"
        );
        assert_eq!(
            lines[2],
            format!(
                "({short})  10.99.99.2/32  -                   never      0 B      0 B       -"
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
}
