//! `meshctl doctor`: the checks' results, their verdicts and their rendering. Pure: the daemon
//! (or `meshd --doctor` offline) gathers the facts, the functions here judge them.
//!
//! ```text
//! OK    port           UDP 51871 is held by wgmesh0 (ours)
//! WARN  rp_filter      strict (all=1, wgmesh0=0) — fix: sysctl -w net.ipv4.conf.all.rp_filter=2
//! FAIL  mtu dock-prod  1420-byte packets are dropped; the largest that passes is 1220 — fix: mtu = 1220 in [host] of meshd.toml
//! ```
//!
//! JSON (`meshctl doctor --json`):
//!
//! ```text
//! {"host":"dock-load","interface":"wgmesh0","source":"daemon","elapsed_ms":812,
//!  "checks":[{"name":"port","status":"ok","detail":"...","fix":null}, ...]}
//! ```

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::config::integrations::DEFAULT_K3S_DROPIN;

/// How a check came out. Ordered: `Ok < Warn < Fail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Ok,
    Warn,
    Fail,
}

impl CheckStatus {
    /// `OK`, `WARN`, `FAIL`.
    pub fn label(self) -> &'static str {
        match self {
            CheckStatus::Ok => "OK",
            CheckStatus::Warn => "WARN",
            CheckStatus::Fail => "FAIL",
        }
    }
}

/// One check's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Short, stable name (`port`, `rp_filter`, `mtu dock-prod`, ...).
    pub name: String,
    pub status: CheckStatus,
    /// What was found, for people.
    pub detail: String,
    /// What to do about it (`None` when nothing needs doing).
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            status: CheckStatus::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Check::with_fix(CheckStatus::Warn, name, detail, fix)
    }

    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Check::with_fix(CheckStatus::Fail, name, detail, fix)
    }

    fn with_fix(
        status: CheckStatus,
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Check {
            name: name.into(),
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Who ran the checks.
pub const SOURCE_DAEMON: &str = "daemon";
/// `meshd --doctor`, with no daemon running.
pub const SOURCE_OFFLINE: &str = "offline";

/// Every check of one doctor run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// `None` on a host not joined yet.
    pub host: Option<String>,
    pub interface: String,
    /// [`SOURCE_DAEMON`] or [`SOURCE_OFFLINE`].
    pub source: String,
    /// How long the checks took.
    pub elapsed_ms: u64,
    pub checks: Vec<Check>,
}

impl Report {
    /// The worst status (`Ok` for no checks).
    pub fn worst(&self) -> CheckStatus {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(CheckStatus::Ok)
    }

    /// Whether any check failed (meshctl then exits non-zero).
    pub fn failed(&self) -> bool {
        self.worst() == CheckStatus::Fail
    }

    /// One line per check: `STATUS  name  detail[ — fix: ...]`, columns aligned, then a
    /// summary line.
    pub fn render(&self) -> String {
        let status_w = 4;
        let name_w = self
            .checks
            .iter()
            .map(|c| c.name.chars().count())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            let mut line = format!(
                "{:<status_w$}  {:<name_w$}  {}",
                c.status.label(),
                c.name,
                c.detail
            );
            if let Some(fix) = &c.fix {
                let _ = write!(line, " — fix: {fix}");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        let count = |s| self.checks.iter().filter(|c| c.status == s).count();
        let _ = writeln!(
            out,
            "{} ok, {} warn, {} fail ({}, {} ms)",
            count(CheckStatus::Ok),
            count(CheckStatus::Warn),
            count(CheckStatus::Fail),
            if self.source == SOURCE_OFFLINE {
                "checked by meshd --doctor; meshd is not running"
            } else {
                "checked by the running meshd"
            },
            self.elapsed_ms
        );
        out
    }
}

/// The `meshd` check when the daemon is not running (offline doctor).
pub fn daemon_not_running(what: &str) -> Check {
    Check::fail(
        what,
        "meshd is not running",
        "start it: systemctl start meshd (or run meshd --config PATH)",
    )
}

/// The kernel's `rp_filter` verdict for our interface: the effective value is the larger of
/// `all` and the interface's. 0 = off, 1 = strict, 2 = loose. Strict drops replies that come
/// back on another interface than the route out (asymmetric paths, advertised subnets).
pub fn rp_filter_check(interface: &str, all: Option<u8>, iface: Option<u8>) -> Check {
    let name = "rp_filter";
    let (Some(all), Some(ifv)) = (all, iface) else {
        return Check::warn(
            name,
            format!(
                "cannot read net.ipv4.conf.all.rp_filter / net.ipv4.conf.{interface}.rp_filter \
                 (interface missing?)"
            ),
            format!(
                "check `sysctl net.ipv4.conf.all.rp_filter net.ipv4.conf.{interface}.rp_filter`"
            ),
        );
    };
    let effective = all.max(ifv);
    let detail =
        format!("effective {effective} (all={all}, {interface}={ifv}; the kernel uses the larger)");
    match effective {
        0 => Check::ok(name, format!("{detail}: off")),
        2 => Check::ok(name, format!("{detail}: loose")),
        1 => {
            let fix = if all == 1 {
                format!(
                    "sysctl -w net.ipv4.conf.all.rp_filter=2 (or keep all strict and set \
                     net.ipv4.conf.{interface}.rp_filter=2; persist it in /etc/sysctl.d)"
                )
            } else {
                format!(
                    "sysctl -w net.ipv4.conf.{interface}.rp_filter=2 (persist it in /etc/sysctl.d)"
                )
            };
            Check::warn(
                name,
                format!("{detail}: strict drops mesh traffic on asymmetric paths"),
                fix,
            )
        }
        other => Check::warn(
            name,
            format!("{detail}: unknown value {other}"),
            "sysctl -w net.ipv4.conf.all.rp_filter=2",
        ),
    }
}

/// IPv4 + ICMP header bytes on top of a ping payload.
pub const ICMP4_OVERHEAD: u16 = 28;

/// What the path-MTU probe to one peer found (sizes are whole inner IPv4 packets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtuProbe {
    /// Not even a small ping came back: the peer is down or has no handshake; nothing to say
    /// about the MTU.
    Unreachable,
    /// Full-size packets (the interface MTU) pass.
    Passes { mtu: u16 },
    /// Full-size packets are dropped; `largest` is the largest that passes.
    TooLarge { mtu: u16, largest: u16 },
}

/// The ping payload sizes to try, in order, for a binary search of the largest packet that
/// passes: `lo` passes, `hi` does not. Returns the next size to try, or `None` when done
/// (`lo` is then the answer).
pub fn mtu_next_probe(lo: u16, hi: u16) -> Option<u16> {
    (hi > lo + 1).then(|| lo + (hi - lo) / 2)
}

/// The verdict on one peer's path MTU.
pub fn mtu_check(peer: &str, probe: MtuProbe) -> Check {
    let name = format!("mtu {peer}");
    match probe {
        MtuProbe::Unreachable => Check::warn(
            name,
            "no reply to a small ping over the mesh; path MTU not probed",
            "see the handshake check for this peer",
        ),
        MtuProbe::Passes { mtu } => Check::ok(
            name,
            format!("{mtu}-byte packets pass with DF set (probed)"),
        ),
        MtuProbe::TooLarge { mtu, largest } => Check::fail(
            name,
            format!(
                "{mtu}-byte packets are dropped on the path (probed with DF); the largest that \
                 passes is {largest}"
            ),
            format!(
                "mtu = {largest} in [host] of meshd.toml (on both ends), or raise the underlay MTU"
            ),
        ),
    }
}

/// The verdict on one peer's latest handshake (`age_secs` = `None`: never).
pub fn handshake_check(peer: &str, age_secs: Option<u64>) -> Check {
    let name = format!("handshake {peer}");
    let limit = crate::wire::control::RECENT_HANDSHAKE_SECS;
    match age_secs {
        Some(a) if a < limit => Check::ok(name, format!("latest {}", crate::render::format_age(a))),
        Some(a) => Check::warn(
            name,
            format!(
                "latest {} (older than {limit}s)",
                crate::render::format_age(a)
            ),
            "check the peer is up and its endpoint is reachable (meshctl peers)",
        ),
        None => Check::warn(
            name,
            "no handshake yet",
            "check the peer is up, its endpoint and the UDP port are reachable (meshctl peers)",
        ),
    }
}

/// What a peer's NAT does, judged from two views of its mapping: `endpoint`, where its packets
/// reach us now (with a handshake in the last [`RECENT_HANDSHAKE_SECS`] seconds:
/// `recent`), and `observed`, where the coordinator sees them come from (the netmap's
/// `Observed` candidate). Same address, another port: the NAT gives each destination its own
/// port (endpoint-dependent, "symmetric"), so the coordinator's view works towards the
/// coordinator only, and a host behind another NAT has no way to reach the peer directly.
/// `None` when there is nothing to say (no NAT, no recent handshake, different addresses).
///
/// [`RECENT_HANDSHAKE_SECS`]: crate::wire::control::RECENT_HANDSHAKE_SECS
pub fn nat_mapping_check(
    peer: &str,
    endpoint: Option<std::net::SocketAddr>,
    observed: Option<std::net::SocketAddr>,
    recent: bool,
) -> Option<Check> {
    let (endpoint, observed) = (endpoint?, observed?);
    if !recent || endpoint.ip() != observed.ip() {
        return None;
    }
    let name = format!("nat {peer}");
    Some(if endpoint.port() == observed.port() {
        Check::ok(
            name,
            format!(
                "behind a NAT that keeps one mapping for every destination ({endpoint}): public \
                 hosts, and hosts behind NATs of this kind, reach it directly"
            ),
        )
    } else {
        Check::ok(
            name,
            format!(
                "behind a NAT that maps each destination to its own port (symmetric): it reaches \
                 us from {endpoint}, the coordinator sees {observed}; hosts behind another NAT \
                 cannot reach it directly (no relay yet: meshd reaches it from public hosts and \
                 its own LAN)"
            ),
        )
    })
}

/// The verdict on the static key's age: `created_unix` from the key file (`None`: unknown),
/// `every_secs` the rotation period (`None`: scheduled rotation off), `pending_next` when a
/// next key file exists (an interrupted rotation). Warns once the key is older than the whole
/// period (the jittered due time lies before it, so a healthy schedule never gets here).
pub fn key_age_check(
    created_unix: Option<u64>,
    now_unix: u64,
    every_secs: Option<u64>,
    pending_next: bool,
    static_peers: &[String],
) -> Check {
    let name = "key age";
    if pending_next {
        return Check::warn(
            name,
            "a key rotation was interrupted: the next key file is still there",
            "meshctl rotate (it resumes the rotation); check the coordinator is reachable \
             (meshctl status)",
        );
    }
    let Some(created) = created_unix else {
        return Check::warn(
            name,
            "the key file's age cannot be read",
            "check the private_key_file in [host] of meshd.toml",
        );
    };
    let span = |secs: u64| {
        let text = crate::render::format_age(secs);
        text.trim_end_matches(" ago").to_string()
    };
    let age = now_unix.saturating_sub(created);
    let shown = format!("created {} ago", span(age));
    let statics = static_peers.join(", ");
    match every_secs {
        None => Check::ok(
            name,
            format!("{shown}; scheduled rotation is off (daemon.rotate_every_days = 0)"),
        ),
        Some(every) if age > every && !static_peers.is_empty() => Check::warn(
            name,
            format!(
                "{shown}, past its rotation schedule of {}; scheduled rotation is held because \
                 the static peers {statics} list this key by hand and cannot follow it",
                span(every)
            ),
            format!(
                "meshctl rotate, then on the coordinator `meshctl static-config NAME` for each of \
                 {statics} and install the printed configuration there"
            ),
        ),
        Some(every) if !static_peers.is_empty() => Check::ok(
            name,
            format!(
                "{shown}; due in {}, then held for an operator: the static peers {statics} \
                 list this key by hand",
                span(every - age)
            ),
        ),
        Some(every) if age > every => Check::warn(
            name,
            format!("{shown}, past its rotation schedule of {}", span(every)),
            "check the coordinator is reachable (meshctl status), then meshctl rotate",
        ),
        Some(every) => Check::ok(
            name,
            format!("{shown}; rotates within {}", span(every - age)),
        ),
    }
}

/// What a K3s configuration says about `flannel-iface`: the value of the last file that sets
/// it (`files` in the order K3s reads them: config.yaml, then config.yaml.d/*.yaml
/// alphabetically). Returns `(file, value)`. A simple line scan: `flannel-iface: VALUE` at the
/// start of a line, quotes stripped.
pub fn k3s_flannel_iface(files: &[(String, String)]) -> Option<(&str, String)> {
    let mut found = None;
    for (path, text) in files {
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("flannel-iface") else {
                continue;
            };
            let Some(value) = rest.trim_start().strip_prefix(':') else {
                continue;
            };
            let value = value.split(" #").next().unwrap_or_default().trim();
            let value = value.trim_matches(|c| c == '"' || c == '\'');
            found = Some((path.as_str(), value.to_string()));
        }
    }
    found
}

/// The K3s check: `files` as for [`k3s_flannel_iface`]; `None` for no K3s configuration.
pub fn k3s_check(interface: &str, files: &[(String, String)]) -> Check {
    let name = "k3s flannel-iface";
    if files.is_empty() {
        return Check::ok(
            name,
            "K3s is not configured on this host (no /etc/rancher/k3s/config.yaml)",
        );
    }
    match k3s_flannel_iface(files) {
        Some((file, v)) if v == interface => {
            Check::ok(name, format!("flannel-iface: {v} (from {file})"))
        }
        Some((file, v)) => Check::warn(
            name,
            format!("flannel-iface is {v} (from {file}), not the mesh interface {interface}"),
            format!(
                "add [integrations.k3s] to meshd.toml (meshd then writes `flannel-iface: \
                 {interface}` to {DEFAULT_K3S_DROPIN}) and restart K3s after meshd-online.target"
            ),
        ),
        None => Check::warn(
            name,
            "K3s is configured but sets no flannel-iface (flannel picks the default route's interface)",
            format!(
                "add [integrations.k3s] to meshd.toml (meshd then writes `flannel-iface: \
                 {interface}` to {DEFAULT_K3S_DROPIN}) and restart K3s after meshd-online.target"
            ),
        ),
    }
}

/// One integration's verdict: OK with when the file last changed, or FAIL with the error (the
/// old file stays in place until the next render succeeds).
pub fn integration_check(status: &crate::handoff::IntegrationStatus) -> Check {
    let name = format!("integration {}", status.name);
    let path = status.path.display();
    match (&status.last_error, status.ok) {
        (Some(e), false) if status.reload_pending => Check::fail(
            name,
            format!("{path}: {e}; the new file is in place and the reload is retried"),
            "make the service ready for the file (DRBD's first setup: `drbdadm create-md \
             RESOURCE` on each of its hosts), then `meshctl reload` or wait for the retry",
        ),
        (Some(e), false) => Check::fail(
            name,
            format!("{path}: {e}; the old file is kept"),
            "fix the template, the integration's settings or the command in [integrations] of \
             meshd.toml, then `meshctl reload`",
        ),
        _ => Check::ok(
            name,
            match status.last_change_unix {
                Some(_) => format!("{path} is up to date"),
                None => format!("{path} is up to date (unchanged since meshd started)"),
            },
        ),
    }
}

/// The route-overlap verdict: what meshd wants (the mesh CIDR and peers' allowed IPs) against
/// what other interfaces, protocols and `routes.protected` own.
pub fn routes_check(wanted: usize, conflicts: &[crate::routes::RouteConflict]) -> Check {
    let name = "routes";
    if conflicts.is_empty() {
        return Check::ok(
            name,
            format!("the mesh's {wanted} routes overlap no other interface's routes or routes.protected"),
        );
    }
    let list: Vec<String> = conflicts.iter().map(ToString::to_string).collect();
    Check::fail(
        name,
        format!("refused: {}", list.join("; ")),
        "remove the prefix from the peer's allowed_ips (or the advertising host's \
         routes.advertise), or free it on this host",
    )
}

/// The peers' routes this host skipped (`crate::routes::accept_netmap`): OK when none, else a
/// warning listing each with its reason; the rest of the netmap applies either way.
pub fn peer_routes_check(
    accept: &[ipnet::IpNet],
    skipped: &[crate::routes::SkippedRoute],
) -> Check {
    let name = "peer routes";
    if skipped.is_empty() {
        return Check::ok(
            name,
            if accept.is_empty() {
                "no peer route offered beyond the mesh (routes.accept is empty: none would be taken)"
                    .to_string()
            } else {
                format!(
                    "every peer route offered is taken (routes.accept {})",
                    accept
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        );
    }
    let list: Vec<String> = skipped.iter().map(ToString::to_string).collect();
    let only_opt_in = skipped
        .iter()
        .all(|r| r.reason == crate::routes::SkipReason::NotAccepted);
    Check::warn(
        name,
        format!(
            "skipped (the rest of the netmap applies): {}",
            list.join("; ")
        ),
        if only_opt_in {
            "to use one, add it to routes.accept in this host's configuration and meshctl reload"
        } else {
            "a refused prefix is never taken; on the coordinator, meshctl routes revoke HOST \
             PREFIX takes it out of the netmaps"
        },
    )
}

/// The forwarding verdict where we advertise subnets: `interfaces` are our interface and the
/// advertised subnets' egress interfaces with `net.ipv4.conf.IFACE.forwarding` (`None`:
/// unreadable).
pub fn ip_forward_check(
    advertise: &[ipnet::IpNet],
    interfaces: &[(String, Option<bool>)],
) -> Check {
    let name = "ip_forward";
    if advertise.is_empty() {
        return Check::ok(
            name,
            "this host advertises no subnets (routes.advertise is empty)",
        );
    }
    let off: Vec<&str> = interfaces
        .iter()
        .filter(|(_, on)| *on != Some(true))
        .map(|(i, _)| i.as_str())
        .collect();
    let nets: Vec<String> = advertise.iter().map(ToString::to_string).collect();
    if off.is_empty() {
        let on: Vec<&str> = interfaces.iter().map(|(i, _)| i.as_str()).collect();
        return Check::ok(
            name,
            format!(
                "forwarding on for {} (advertising {})",
                on.join(", "),
                nets.join(", ")
            ),
        );
    }
    Check::fail(
        name,
        format!(
            "advertising {} but forwarding is off on {}",
            nets.join(", "),
            off.join(", ")
        ),
        format!(
            "meshctl reload (meshd turns it on where it advertises), or {}",
            off.iter()
                .map(|i| format!("sysctl -w net.ipv4.conf.{i}.forwarding=1"))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    )
}

#[cfg(test)]
mod nat_tests {
    use super::*;

    #[test]
    fn a_peers_nat_is_judged_from_its_two_mappings() {
        let ep = |s: &str| Some(s.parse().unwrap());
        let sym = nat_mapping_check(
            "dock-laptop",
            ep("198.51.100.101:30403"),
            ep("198.51.100.101:36964"),
            true,
        )
        .expect("said");
        assert_eq!(sym.name, "nat dock-laptop");
        assert!(sym.detail.contains("symmetric"), "{}", sym.detail);
        assert!(
            sym.detail.contains("198.51.100.101:36964"),
            "{}",
            sym.detail
        );
        let cone = nat_mapping_check(
            "dock-edge",
            ep("198.51.100.100:51871"),
            ep("198.51.100.100:51871"),
            true,
        )
        .expect("said");
        assert!(cone.detail.contains("one mapping"), "{}", cone.detail);
        // Nothing to judge: no handshake lately, the LAN path, no NAT.
        assert!(
            nat_mapping_check("x", ep("198.51.100.101:1"), ep("198.51.100.101:2"), false).is_none()
        );
        assert!(nat_mapping_check(
            "x",
            ep("192.168.1.4:51871"),
            ep("198.51.100.100:51871"),
            true
        )
        .is_none());
        assert!(nat_mapping_check("x", ep("198.51.100.2:51871"), None, true).is_none());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rp_filter_uses_the_max() {
        assert_eq!(
            rp_filter_check("wgmesh0", Some(0), Some(0)).status,
            CheckStatus::Ok
        );
        assert_eq!(
            rp_filter_check("wgmesh0", Some(2), Some(0)).status,
            CheckStatus::Ok
        );
        // all strict, interface loose: the max is loose.
        assert_eq!(
            rp_filter_check("wgmesh0", Some(1), Some(2)).status,
            CheckStatus::Ok
        );
        let c = rp_filter_check("wgmesh0", Some(1), Some(0));
        assert_eq!(c.status, CheckStatus::Warn);
        assert!(c
            .fix
            .unwrap()
            .starts_with("sysctl -w net.ipv4.conf.all.rp_filter=2"));
        let c = rp_filter_check("wgmesh0", Some(0), Some(1));
        assert_eq!(c.status, CheckStatus::Warn);
        assert!(c
            .fix
            .unwrap()
            .starts_with("sysctl -w net.ipv4.conf.wgmesh0.rp_filter=2"));
        assert_eq!(
            rp_filter_check("wgmesh0", None, Some(0)).status,
            CheckStatus::Warn
        );
    }

    #[test]
    fn binary_search_finds_the_largest_size() {
        for limit in [57u16, 100, 1191, 1192, 1391] {
            let (mut lo, mut hi) = (56u16, 1392u16);
            let mut probes = 0;
            while let Some(s) = mtu_next_probe(lo, hi) {
                probes += 1;
                if s <= limit {
                    lo = s
                } else {
                    hi = s
                }
            }
            assert_eq!(lo, limit);
            assert!(probes <= 11, "{probes}");
        }
        let c = mtu_check(
            "dock-prod",
            MtuProbe::TooLarge {
                mtu: 1420,
                largest: 1220,
            },
        );
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.fix.unwrap().starts_with("mtu = 1220"));
        assert_eq!(
            mtu_check("p", MtuProbe::Passes { mtu: 1420 }).status,
            CheckStatus::Ok
        );
        assert_eq!(
            mtu_check("p", MtuProbe::Unreachable).status,
            CheckStatus::Warn
        );
    }

    #[test]
    fn routes_and_forwarding() {
        let c = routes_check(2, &[]);
        assert_eq!(c.status, CheckStatus::Ok);
        let conflict = crate::routes::RouteConflict {
            wanted: "172.17.5.0/24".parse().unwrap(),
            owner: "172.17.0.0/16 dev docker0 (table main, proto kernel)".into(),
        };
        let c = routes_check(2, &[conflict]);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(
            c.detail.contains("overlaps 172.17.0.0/16 dev docker0"),
            "{}",
            c.detail
        );
        let lan: Vec<ipnet::IpNet> = vec!["192.168.1.0/24".parse().unwrap()];
        assert_eq!(ip_forward_check(&[], &[]).status, CheckStatus::Ok);
        let on = [
            ("wgmesh0".to_string(), Some(true)),
            ("eth0".to_string(), Some(true)),
        ];
        assert_eq!(ip_forward_check(&lan, &on).status, CheckStatus::Ok);
        let off = [
            ("wgmesh0".to_string(), Some(true)),
            ("eth0".to_string(), Some(false)),
        ];
        let c = ip_forward_check(&lan, &off);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c
            .fix
            .unwrap()
            .contains("sysctl -w net.ipv4.conf.eth0.forwarding=1"));
    }

    #[test]
    fn handshake_ages() {
        assert_eq!(handshake_check("p", Some(3)).status, CheckStatus::Ok);
        assert_eq!(handshake_check("p", Some(180)).status, CheckStatus::Warn);
        assert_eq!(handshake_check("p", None).status, CheckStatus::Warn);
    }

    #[test]
    fn k3s_later_files_win() {
        let files = vec![
            (
                "/etc/rancher/k3s/config.yaml".to_string(),
                "node-ip: 10.99.99.1\nflannel-iface: eth0\n".to_string(),
            ),
            (
                "/etc/rancher/k3s/config.yaml.d/50-meshd.yaml".to_string(),
                "# mesh\nflannel-iface: \"wgmesh0\"  # ours\n".to_string(),
            ),
        ];
        assert_eq!(
            k3s_flannel_iface(&files),
            Some((
                "/etc/rancher/k3s/config.yaml.d/50-meshd.yaml",
                "wgmesh0".to_string()
            ))
        );
        assert_eq!(k3s_check("wgmesh0", &files).status, CheckStatus::Ok);
        assert_eq!(k3s_check("wgmesh0", &files[..1]).status, CheckStatus::Warn);
        assert_eq!(k3s_check("wgmesh0", &[]).status, CheckStatus::Ok);
        let none = vec![(
            "c".to_string(),
            "  flannel-iface: x\nflannel-ifaces: y\n".to_string(),
        )];
        assert_eq!(k3s_flannel_iface(&none), None);
    }

    #[test]
    fn render_and_json() {
        let r = Report {
            host: Some("dock-load".into()),
            interface: "wgmesh0".into(),
            source: SOURCE_DAEMON.into(),
            elapsed_ms: 12,
            checks: vec![
                Check::ok("port", "UDP 51871 held by wgmesh0 (ours)"),
                Check::warn(
                    "rp_filter",
                    "strict",
                    "sysctl -w net.ipv4.conf.all.rp_filter=2",
                ),
                Check::fail("mtu dock-prod", "dropped", "mtu = 1220"),
            ],
        };
        let text = r.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "OK    port           UDP 51871 held by wgmesh0 (ours)"
        );
        assert_eq!(
            lines[1],
            "WARN  rp_filter      strict — fix: sysctl -w net.ipv4.conf.all.rp_filter=2"
        );
        assert_eq!(lines[2], "FAIL  mtu dock-prod  dropped — fix: mtu = 1220");
        assert!(lines[3].starts_with("1 ok, 1 warn, 1 fail"), "{text}");
        assert!(r.failed());
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"status\":\"fail\""), "{json}");
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), r);
        let ok = Report {
            checks: vec![],
            ..r
        };
        assert!(!ok.failed());
    }

    #[test]
    fn integration_check_ok_and_fail() {
        use crate::handoff::IntegrationStatus;
        let mut st = IntegrationStatus {
            name: "hosts".into(),
            path: "/etc/hosts".into(),
            ok: true,
            last_error: None,
            last_change_unix: Some(1),
            last_reload_unix: None,
            reload_pending: false,
            failures: 0,
        };
        let c = integration_check(&st);
        assert_eq!(c.status, CheckStatus::Ok);
        assert_eq!(c.name, "integration hosts");
        st.ok = false;
        st.last_error = Some("template hosts: unexpected end".into());
        let c = integration_check(&st);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.detail.contains("unexpected end"), "{}", c.detail);
        assert!(c.detail.contains("the old file is kept"), "{}", c.detail);
        assert!(!c.fix.unwrap_or_default().contains("  "));
        // DRBD's first setup: the new file stays, the reload is retried; the fix says how.
        st.last_error = Some("reload: `drbdadm adjust r0` failed: No valid meta data found".into());
        st.reload_pending = true;
        let c = integration_check(&st);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(
            c.detail
                .contains("the new file is in place and the reload is retried"),
            "{}",
            c.detail
        );
        let fix = c.fix.unwrap_or_default();
        assert!(fix.contains("drbdadm create-md"), "{fix}");
        assert!(!fix.contains("  "), "{fix}");
    }

    #[test]
    fn key_age_warns_past_the_schedule_and_on_an_interrupted_rotation() {
        const DAY: u64 = 86_400;
        let now = 100 * DAY;
        let fresh = key_age_check(Some(now - DAY), now, Some(30 * DAY), false, &[]);
        assert_eq!(fresh.status, CheckStatus::Ok, "{fresh:?}");
        assert_eq!(fresh.detail, "created 1d 0h ago; rotates within 29d 0h");
        let old = key_age_check(Some(now - 31 * DAY), now, Some(30 * DAY), false, &[]);
        assert_eq!(old.status, CheckStatus::Warn, "{old:?}");
        assert!(old.detail.contains("past its rotation schedule"), "{old:?}");
        let off = key_age_check(Some(0), now + 300 * DAY, None, false, &[]);
        assert_eq!(off.status, CheckStatus::Ok, "{off:?}");
        let pending = key_age_check(Some(now - DAY), now, Some(30 * DAY), true, &[]);
        let nas = ["nas".to_string()];
        let held = key_age_check(Some(now - 31 * DAY), now, Some(30 * DAY), false, &nas);
        assert_eq!(held.status, CheckStatus::Warn, "{held:?}");
        assert!(held.detail.contains("held"), "{held:?}");
        assert!(
            held.fix
                .as_deref()
                .is_some_and(|f| f.contains("static-config")),
            "{held:?}"
        );
        let waits = key_age_check(Some(now - DAY), now, Some(30 * DAY), false, &nas);
        assert_eq!(waits.status, CheckStatus::Ok, "{waits:?}");
        assert!(waits.detail.contains("static peers nas"), "{waits:?}");
        assert_eq!(pending.status, CheckStatus::Warn, "{pending:?}");
        assert!(pending
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("meshctl rotate")));
        let unknown = key_age_check(None, now, Some(30 * DAY), false, &[]);
        assert_eq!(unknown.status, CheckStatus::Warn, "{unknown:?}");
    }
}
