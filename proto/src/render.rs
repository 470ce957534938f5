//! What meshctl prints: the tables and text for peers, status, invitations, hosts and routes,
//! and the small formatters (ages, durations, bytes, UTC times) they and doctor share. Pure:
//! `now_unix` comes in as an argument. The wire types are in `crate::wire::control`.

use std::fmt::Write as _;

use crate::wire::api::{HostInfo, InviteInfo, InviteResponse};
use crate::wire::control::{
    endpoint_kind_str, HostState, PeerStatus, Status, RECENT_HANDSHAKE_SECS, ROLE_COORDINATOR,
};

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
        (
            "host",
            status
                .host
                .clone()
                .unwrap_or_else(|| "- (not joined: meshctl join -)".to_string()),
        ),
        (
            "interface",
            match status.ifindex {
                Some(i) => format!("{} (ifindex {i})", status.interface),
                None => status.interface.clone(),
            },
        ),
        ("public key", status.public_key.to_string()),
        (
            "mesh address",
            status
                .mesh_address
                .map_or_else(|| "-".to_string(), |a| a.to_string()),
        ),
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
                status.host.as_deref().unwrap_or("THIS-HOST")
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
pub fn integration_cell(i: &crate::handoff::IntegrationStatus, now_unix: u64) -> String {
    let changed = match i.last_change_unix {
        Some(t) => format!("changed {}", format_age(now_unix.saturating_sub(t))),
        None => "unchanged since start".to_string(),
    };
    match (&i.last_error, i.ok) {
        (Some(e), false) if i.reload_pending => format!(
            "{} {} FAILED: {e} (the new file is in place; the reload is retried)",
            i.name,
            i.path.display()
        ),
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
        return match status.state {
            HostState::NeedsJoin => "- (not joined yet)".to_string(),
            _ => "- (static configuration)".to_string(),
        };
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
    use crate::key::PublicKey;
    use crate::wire::control::tests::{peer, status};
    use crate::wire::control::{CoordinatorStatus, Response, ROLE_MEMBER};

    #[test]
    fn status_shows_one_line_per_integration() {
        use crate::handoff::IntegrationStatus;
        let mut st = status();
        st.integrations = vec![
            IntegrationStatus {
                name: "k3s".into(),
                path: "/etc/rancher/k3s/config.yaml.d/90-meshd.yaml".into(),
                ok: true,
                last_error: None,
                last_change_unix: Some(880),
                last_reload_unix: None,
                reload_pending: false,
                failures: 0,
            },
            IntegrationStatus {
                name: "template:haproxy".into(),
                path: "/etc/haproxy/mesh.cfg".into(),
                ok: false,
                last_error: Some("template template:haproxy: syntax error".into()),
                last_change_unix: None,
                last_reload_unix: None,
                reload_pending: false,
                failures: 0,
            },
            IntegrationStatus {
                name: "drbd:r0".into(),
                path: "/etc/drbd.d/r0.res".into(),
                ok: false,
                last_error: Some("reload: drbdadm adjust r0 exited with 1".into()),
                last_change_unix: Some(990),
                last_reload_unix: None,
                reload_pending: true,
                failures: 0,
            },
        ];
        let text = render_status(&st, 1000);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("integration:"))
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
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
        assert!(
            lines[2].contains("drbd:r0 /etc/drbd.d/r0.res FAILED: reload: drbdadm adjust r0 exited with 1 (the new file is in place; the reload is retried)"),
            "{text}"
        );
        // Older daemons send no integrations: still decodes.
        let mut v = serde_json::to_value(status()).unwrap();
        v.as_object_mut().unwrap().remove("integrations");
        let back: Status = serde_json::from_value(v).unwrap();
        assert!(back.integrations.is_empty());
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
