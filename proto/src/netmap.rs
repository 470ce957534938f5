//! The netmap: what one host must know about every other host, computed by the coordinator
//! from its registry by a pure function, and pushed to every daemon.
//!
//! `compute_netmap` gives host H every other non-removed host P as a peer, sorted by name.
//!
//! Endpoint candidates of P as seen from H (deduplicated by address, first kind wins):
//! - H and P are *behind the same NAT* when the coordinator observed both at the same IP. Then
//!   P's private reported addresses come first (`Lan`), then its publicly routable reported
//!   ones (`Public`), then its observed address if P is behind NAT (`Observed`, a hairpin).
//! - Otherwise: P's publicly routable reported addresses (`Public`), then P's observed address
//!   if P is behind NAT (`Observed`), then its remaining reported addresses (`Lan`).
//!
//! A host is *behind NAT* when its observed IP is not among its reported IPs. "Publicly
//! routable" means anything but RFC 1918, CGNAT (100.64/10), loopback, link-local, unique local
//! (fc00::/7) and unspecified addresses (documentation ranges count as public: the lab uses
//! them as its internet). Unusable addresses (unspecified, loopback, multicast, port 0, or
//! inside the mesh CIDR) are dropped. Static peers send no reports: their `reported` list is
//! used as given (it may be empty: the endpoint the operator gave at the invitation, if any).
//!
//! A static peer's `observed` address is only a *same-NAT marker* (the coordinator sets it to
//! the observed address of the host the operator named as its neighbour): it is never offered
//! as an `Observed` candidate (its port is the neighbour's NAT mapping, not the device's).
//! When a static peer has a marker, its private reported addresses are offered (`Lan`) to the
//! hosts behind the same NAT only; the other hosts get no private candidate for it, so they
//! keep the endpoint WireGuard learns from the device's keepalives.
//!
//! Persistent keepalive toward P is `keepalive_secs` when H is behind NAT, or when P is a
//! static peer behind the same NAT as H; otherwise none.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::key::PublicKey;

/// Where an endpoint candidate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointKind {
    /// An interface address the host reported, usable from the same LAN (behind the same NAT).
    Lan,
    /// An interface address the host reported that is publicly routable (no NAT in between).
    Public,
    /// The source address the coordinator observed (the NAT's public side for hosts behind NAT).
    Observed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointCandidate {
    pub addr: SocketAddr,
    pub kind: EndpointKind,
}

/// One host as the coordinator's registry holds it (input of `compute_netmap`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    pub address: IpAddr,
    pub public_key: PublicKey,
    pub admin: bool,
    /// A device that cannot run meshd (the NAS): configured by hand from a wg-quick file.
    pub static_peer: bool,
    /// Removed hosts keep their address reserved but appear in no netmap.
    pub removed: bool,
    /// Interface addresses and listen port the host reported.
    pub reported: Vec<SocketAddr>,
    /// The address the coordinator saw the host's last report come from.
    pub observed: Option<SocketAddr>,
    /// The prefixes the host routes for the mesh (beyond its /32) that an admin approved:
    /// the only ones the other hosts' netmaps carry (see `crate::routes`).
    pub extra_allowed_ips: Vec<IpNet>,
    /// The prefixes the host advertises that are in no netmap (pending an admin's approval,
    /// or revoked): told to the host itself only, so it can say so.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ungranted_routes: Vec<IpNet>,
    /// When the host's current public key was registered (seconds since the UNIX epoch).
    pub key_created_unix: u64,
    /// The key the host is rotating to (prepared, not committed); see `crate::rotation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<PublicKey>,
    /// An admin asked this host to rotate its key (`meshctl rotate NAME`); cleared by the
    /// rotation's commit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rotate_requested: bool,
    /// Invited, not joined yet: its key is the token's throwaway key, which only the
    /// coordinator's own interface accepts (no other host's netmap lists a pending host).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

/// The registry as the netmap computation sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrySnapshot {
    pub mesh_cidr: IpNet,
    /// Monotonically increasing; bumped by the coordinator on every change.
    pub version: u64,
    /// Persistent keepalive, seconds, used toward peers from hosts behind NAT.
    pub keepalive_secs: u16,
    pub hosts: Vec<HostRecord>,
    /// The coordinator host's name: the only netmap that lists pending hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
}

/// One peer in a host's netmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetmapPeer {
    pub name: String,
    pub address: IpAddr,
    pub public_key: PublicKey,
    /// The peer's /32 (or /128) plus its extra prefixes (the subnets it advertises; not
    /// toward hosts behind the same NAT); sorted.
    pub allowed_ips: Vec<IpNet>,
    /// Best first: the LAN address when both hosts are behind the same NAT, then public, then
    /// observed.
    pub endpoints: Vec<EndpointCandidate>,
    /// Set when the host this netmap is for is behind NAT (so the NAT mapping stays open).
    pub persistent_keepalive: Option<u16>,
    pub static_peer: bool,
    pub admin: bool,
    pub key_created_unix: u64,
    /// The key the peer is rotating to: put on the device as a peer with no allowed IPs, so a
    /// handshake from it is accepted before the cut-over (see `crate::rotation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<PublicKey>,
}

/// What one host needs: itself and its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Netmap {
    pub version: u64,
    pub mesh_cidr: IpNet,
    pub name: String,
    pub address: IpAddr,
    pub public_key: PublicKey,
    /// Sorted by name.
    pub peers: Vec<NetmapPeer>,
    /// An admin asked this host to rotate its key (`meshctl rotate NAME`): it rotates as soon
    /// as it sees this.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rotate_requested: bool,
    /// This host's advertised prefixes that no netmap carries: pending an admin's approval
    /// on the coordinator, or revoked (`meshctl routes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ungranted_routes: Vec<IpNet>,
}

/// Host names are DNS labels: 1 to 63 of `a-z0-9-`, not starting or ending with `-`. They end
/// up in `/etc/hosts`, DNS answers, file names and templates, so nothing else is accepted,
/// from an operator or from a coordinator.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Why a member refuses a netmap (it changes nothing and keeps the one it has).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused a netmap from the coordinator (version {version}): {reason}")]
pub struct NetmapError {
    pub version: u64,
    pub reason: String,
}

impl Netmap {
    /// Check everything a member writes somewhere (device, routes, `/etc/hosts`, DNS,
    /// templates) before it takes the netmap: names are DNS labels, addresses sit in the mesh
    /// and are unique, each peer's allowed IPs hold its address, endpoints are usable.
    pub fn validate(&self) -> Result<(), NetmapError> {
        let fail = |reason: String| NetmapError {
            version: self.version,
            reason,
        };
        let shown = |s: &str| {
            s.chars()
                .take(64)
                .collect::<String>()
                .escape_debug()
                .to_string()
        };
        if !valid_name(&self.name) {
            return Err(fail(format!(
                "our own name \"{}\" is not a valid host name",
                shown(&self.name)
            )));
        }
        if !self.mesh_cidr.contains(&self.address) {
            return Err(fail(format!(
                "our address {} is outside the mesh {}",
                self.address, self.mesh_cidr
            )));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut addresses = std::collections::BTreeSet::new();
        names.insert(self.name.as_str());
        addresses.insert(self.address);
        for p in &self.peers {
            if !valid_name(&p.name) {
                return Err(fail(format!(
                    "peer name \"{}\" is not a valid host name",
                    shown(&p.name)
                )));
            }
            if !names.insert(p.name.as_str()) {
                return Err(fail(format!("the name {} is listed twice", p.name)));
            }
            if !self.mesh_cidr.contains(&p.address) {
                return Err(fail(format!(
                    "peer {} has the address {}, outside the mesh {}",
                    p.name, p.address, self.mesh_cidr
                )));
            }
            if !addresses.insert(p.address) {
                return Err(fail(format!("the address {} is listed twice", p.address)));
            }
            if !p.allowed_ips.contains(&IpNet::from(p.address)) {
                return Err(fail(format!(
                    "peer {}'s allowed IPs do not hold its address {}",
                    p.name, p.address
                )));
            }
            if p.allowed_ips.len() > 1024 || p.endpoints.len() > 64 {
                return Err(fail(format!(
                    "peer {} lists too many allowed IPs or endpoints",
                    p.name
                )));
            }
            for e in &p.endpoints {
                let ip = e.addr.ip();
                if e.addr.port() == 0
                    || ip.is_unspecified()
                    || ip.is_multicast()
                    || ip.is_loopback()
                {
                    return Err(fail(format!(
                        "peer {} has the unusable endpoint {}",
                        p.name, e.addr
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Whether `h` is behind NAT: the coordinator observed it at an IP it did not report.
pub fn behind_nat(h: &HostRecord) -> bool {
    match h.observed {
        Some(o) => !h.reported.iter().any(|r| r.ip() == o.ip()),
        None => false,
    }
}

/// Whether `a` and `b` sit behind the same NAT (observed at the same IP).
pub fn same_nat(a: &HostRecord, b: &HostRecord) -> bool {
    match (a.observed, b.observed) {
        (Some(x), Some(y)) => x.ip() == y.ip(),
        _ => false,
    }
}

/// Whether `ip` is publicly routable (see the module documentation).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let cgnat = o[0] == 100 && (o[1] & 0xc0) == 64;
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || cgnat)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg0 = v6.segments()[0];
            let ula = (seg0 & 0xfe00) == 0xfc00;
            let link_local = (seg0 & 0xffc0) == 0xfe80;
            !(v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || ula || link_local)
        }
    }
}

/// Whether `addr` can be an endpoint at all.
fn usable(addr: &SocketAddr, mesh: IpNet) -> bool {
    let ip = addr.ip();
    addr.port() != 0
        && !ip.is_unspecified()
        && !ip.is_loopback()
        && !ip.is_multicast()
        && !mesh.contains(&ip)
}

/// Endpoint candidates of `p` as seen from `h`, best first.
pub fn endpoint_candidates(h: &HostRecord, p: &HostRecord, mesh: IpNet) -> Vec<EndpointCandidate> {
    let reported: Vec<SocketAddr> = p
        .reported
        .iter()
        .copied()
        .filter(|a| usable(a, mesh))
        .collect();
    let public = reported.iter().filter(|a| is_public(a.ip()));
    let private = reported.iter().filter(|a| !is_public(a.ip()));
    // A static peer's observed address is only a same-NAT marker, never an endpoint.
    let observed = p
        .observed
        .filter(|o| !p.static_peer && behind_nat(p) && usable(o, mesh));
    // A static peer placed behind a NAT is reachable at its private addresses from that NAT's
    // side only.
    let private_from_afar = !(p.static_peer && p.observed.is_some());
    let mut out: Vec<EndpointCandidate> = Vec::new();
    let mut push = |addr: SocketAddr, kind: EndpointKind| {
        if !out.iter().any(|c| c.addr == addr) {
            out.push(EndpointCandidate { addr, kind });
        }
    };
    if same_nat(h, p) {
        for a in private {
            push(*a, EndpointKind::Lan);
        }
        for a in public {
            push(*a, EndpointKind::Public);
        }
        if let Some(o) = observed {
            push(o, EndpointKind::Observed);
        }
    } else {
        for a in public {
            push(*a, EndpointKind::Public);
        }
        if let Some(o) = observed {
            push(o, EndpointKind::Observed);
        }
        if private_from_afar {
            for a in private {
                push(*a, EndpointKind::Lan);
            }
        }
    }
    out
}

fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn peer_of(reg: &RegistrySnapshot, h: &HostRecord, p: &HostRecord) -> NetmapPeer {
    let mut allowed_ips = vec![host_prefix(p.address)];
    // The subnets `p` routes for the mesh (its `routes.advertise`), except toward hosts behind
    // the same NAT: those sit on the same LAN and reach the subnet directly (their own LAN
    // route owns that space; routing it over the mesh would clash with it).
    if !same_nat(h, p) {
        allowed_ips.extend(p.extra_allowed_ips.iter().copied());
    }
    allowed_ips.sort();
    allowed_ips.dedup();
    let keepalive = behind_nat(h) || (p.static_peer && same_nat(h, p));
    NetmapPeer {
        name: p.name.clone(),
        address: p.address,
        public_key: p.public_key,
        allowed_ips,
        endpoints: endpoint_candidates(h, p, reg.mesh_cidr),
        persistent_keepalive: keepalive.then_some(reg.keepalive_secs),
        static_peer: p.static_peer,
        admin: p.admin,
        key_created_unix: p.key_created_unix,
        next_public_key: p.next_public_key,
    }
}

/// The netmap for host `name`, or `None` if there is no such (non-removed) host.
pub fn compute_netmap(reg: &RegistrySnapshot, name: &str) -> Option<Netmap> {
    let (me_idx, me) = reg
        .hosts
        .iter()
        .enumerate()
        .find(|(_, h)| !h.removed && h.name == name)?;
    let mut peers: Vec<NetmapPeer> = reg
        .hosts
        .iter()
        .enumerate()
        .filter(|(i, p)| *i != me_idx && !p.removed)
        // A pending host's throwaway key is accepted by the coordinator alone: it only needs
        // to reach the coordinator's API, and a leaked token then reaches nobody else.
        .filter(|(_, p)| !p.pending || reg.coordinator.as_deref() == Some(me.name.as_str()))
        .map(|(_, p)| peer_of(reg, me, p))
        .collect();
    peers.sort_by(|a, b| {
        (&a.name, a.address, a.public_key).cmp(&(&b.name, b.address, b.public_key))
    });
    Some(Netmap {
        version: reg.version,
        mesh_cidr: reg.mesh_cidr,
        name: me.name.clone(),
        address: me.address,
        public_key: me.public_key,
        peers,
        rotate_requested: me.rotate_requested,
        ungranted_routes: me.ungranted_routes.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }
    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn host(name: &str, n: u8, reported: &[&str], observed: Option<&str>) -> HostRecord {
        HostRecord {
            name: name.into(),
            address: IpAddr::from([10, 99, 99, n]),
            public_key: key(n),
            admin: false,
            static_peer: false,
            removed: false,
            reported: reported.iter().map(|s| sa(s)).collect(),
            observed: observed.map(sa),
            extra_allowed_ips: vec![],
            ungranted_routes: vec![],
            key_created_unix: 100 + u64::from(n),
            next_public_key: None,
            rotate_requested: false,
            pending: false,
        }
    }

    /// The lab: dock-load on the internet, dock-mirror and dock-edge behind one NAT, the NAS
    /// (static) on their LAN.
    fn lab() -> RegistrySnapshot {
        let mut nas = host("nas", 9, &["192.168.1.20:51820"], None);
        nas.static_peer = true;
        let mut removed = host(
            "old",
            7,
            &["198.51.100.7:51871"],
            Some("198.51.100.7:51871"),
        );
        removed.removed = true;
        RegistrySnapshot {
            mesh_cidr: "10.99.99.0/24".parse().unwrap(),
            version: 42,
            keepalive_secs: 25,
            hosts: vec![
                host(
                    "dock-mirror",
                    3,
                    &["192.168.1.3:51871", "10.99.99.3:51871"],
                    Some("198.51.100.1:40001"),
                ),
                host(
                    "dock-load",
                    1,
                    &["198.51.100.5:51871"],
                    Some("198.51.100.5:51871"),
                ),
                host(
                    "dock-edge",
                    4,
                    &["192.168.1.4:51871"],
                    Some("198.51.100.1:40002"),
                ),
                nas,
                removed,
            ],
            coordinator: Some("dock-load".into()),
        }
    }

    #[test]
    fn members_refuse_hostile_netmaps() {
        let reg = lab();
        let good = compute_netmap(&reg, "dock-mirror").unwrap();
        assert_eq!(good.validate(), Ok(()));
        type Mangle = Box<dyn Fn(&mut Netmap)>;
        let hostile: Vec<(&str, Mangle)> = vec![
            (
                "our own name",
                Box::new(|m| m.name = "x\n10.0.0.1 evil".into()),
            ),
            (
                "not a valid host name",
                Box::new(|m| m.peers[0].name = "../../etc/passwd".into()),
            ),
            (
                "not a valid host name",
                Box::new(|m| m.peers[0].name = "{{ 7*7 }}".into()),
            ),
            (
                "not a valid host name",
                Box::new(|m| m.peers[0].name = "Dock".into()),
            ),
            (
                "not a valid host name",
                Box::new(|m| m.peers[0].name = String::new()),
            ),
            (
                "outside the mesh",
                Box::new(|m| m.peers[0].address = "8.8.8.8".parse().unwrap()),
            ),
            (
                "outside the mesh",
                Box::new(|m| m.address = "127.0.0.1".parse().unwrap()),
            ),
            (
                "listed twice",
                Box::new(|m| {
                    let n = m.peers[0].name.clone();
                    m.peers[1].name = n;
                }),
            ),
            (
                "do not hold its address",
                Box::new(|m| m.peers[0].allowed_ips.clear()),
            ),
            (
                "unusable endpoint",
                Box::new(|m| {
                    if let Some(e) = m
                        .peers
                        .iter_mut()
                        .flat_map(|p| p.endpoints.iter_mut())
                        .next()
                    {
                        e.addr = "0.0.0.0:51871".parse().unwrap();
                    }
                }),
            ),
        ];
        for (want, f) in hostile {
            let mut m = good.clone();
            f(&mut m);
            let err = m.validate().expect_err(want);
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn pending_hosts_reach_the_coordinator_only() {
        let mut reg = lab();
        let mut joiner = host("dock-dash", 5, &[], None);
        joiner.pending = true;
        reg.hosts.push(joiner);
        let on_load = compute_netmap(&reg, "dock-load").unwrap();
        assert!(on_load.peers.iter().any(|p| p.name == "dock-dash"));
        for other in ["dock-mirror", "dock-edge"] {
            let m = compute_netmap(&reg, other).unwrap();
            assert!(
                m.peers.iter().all(|p| p.name != "dock-dash"),
                "{other}: {m:?}"
            );
        }
        // Without a known coordinator, nobody lists it.
        reg.coordinator = None;
        let m = compute_netmap(&reg, "dock-load").unwrap();
        assert!(m.peers.iter().all(|p| p.name != "dock-dash"));
    }

    fn peer<'a>(m: &'a Netmap, name: &str) -> &'a NetmapPeer {
        m.peers.iter().find(|p| p.name == name).unwrap()
    }

    #[test]
    fn advertised_subnets_go_to_hosts_outside_the_nat_only() {
        let mut reg = lab();
        let nas: IpNet = "192.168.1.20/32".parse().unwrap();
        for h in &mut reg.hosts {
            if h.name == "dock-edge" {
                h.extra_allowed_ips = vec![nas];
            }
        }
        let far = compute_netmap(&reg, "dock-load").unwrap();
        assert!(peer(&far, "dock-edge").allowed_ips.contains(&nas));
        // dock-mirror shares dock-edge's NAT and LAN: it reaches the NAS directly.
        let near = compute_netmap(&reg, "dock-mirror").unwrap();
        assert!(!peer(&near, "dock-edge").allowed_ips.contains(&nas));
    }

    #[test]
    fn same_nat_uses_lan_first() {
        let reg = lab();
        let m = compute_netmap(&reg, "dock-mirror").unwrap();
        assert_eq!(m.version, 42);
        assert_eq!(
            m.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["dock-edge", "dock-load", "nas"]
        );
        let edge = peer(&m, "dock-edge");
        assert_eq!(
            edge.endpoints,
            vec![
                EndpointCandidate {
                    addr: sa("192.168.1.4:51871"),
                    kind: EndpointKind::Lan
                },
                EndpointCandidate {
                    addr: sa("198.51.100.1:40002"),
                    kind: EndpointKind::Observed
                },
            ]
        );
        assert_eq!(edge.persistent_keepalive, Some(25));
        assert_eq!(
            edge.allowed_ips,
            vec!["10.99.99.4/32".parse::<IpNet>().unwrap()]
        );
        let load = peer(&m, "dock-load");
        assert_eq!(
            load.endpoints,
            vec![EndpointCandidate {
                addr: sa("198.51.100.5:51871"),
                kind: EndpointKind::Public
            }]
        );
        let nas = peer(&m, "nas");
        assert!(nas.static_peer);
        assert_eq!(
            nas.endpoints,
            vec![EndpointCandidate {
                addr: sa("192.168.1.20:51820"),
                kind: EndpointKind::Lan
            }]
        );
    }

    #[test]
    fn from_the_internet_nat_hosts_are_reached_at_their_observed_address() {
        let reg = lab();
        let m = compute_netmap(&reg, "dock-load").unwrap();
        let mirror = peer(&m, "dock-mirror");
        // The mesh address it reported is dropped; the observed one comes before the LAN one.
        assert_eq!(
            mirror.endpoints,
            vec![
                EndpointCandidate {
                    addr: sa("198.51.100.1:40001"),
                    kind: EndpointKind::Observed
                },
                EndpointCandidate {
                    addr: sa("192.168.1.3:51871"),
                    kind: EndpointKind::Lan
                },
            ]
        );
        // dock-load is not behind NAT: no keepalive.
        assert!(m.peers.iter().all(|p| p.persistent_keepalive.is_none()));
        assert!(m.peers.iter().all(|p| p.name != "old"));
        assert_eq!(compute_netmap(&reg, "old"), None);
        assert_eq!(compute_netmap(&reg, "nobody"), None);
    }

    #[test]
    fn static_peer_behind_the_same_nat_gets_keepalive() {
        let mut reg = lab();
        // The NAS observed at the NAT too (set by the admin); dock-mirror reaches the
        // coordinator directly (observed = reported).
        reg.hosts[3].observed = Some(sa("198.51.100.1:51820"));
        reg.hosts[0].observed = Some(sa("198.51.100.1:40001"));
        reg.hosts[0].reported.push(sa("198.51.100.1:40001"));
        let m = compute_netmap(&reg, "dock-mirror").unwrap();
        assert_eq!(peer(&m, "nas").persistent_keepalive, Some(25));
        assert_eq!(peer(&m, "dock-load").persistent_keepalive, None);
    }

    /// `meshctl invite nas --static --endpoint 192.168.1.20:51820 --near dock-mirror`: the
    /// coordinator gives the NAS dock-mirror's observed address as its same-NAT marker.
    #[test]
    fn static_peer_near_a_nat_host() {
        let mut reg = lab();
        reg.hosts[3].observed = reg.hosts[0].observed;
        let nas_lan = vec![EndpointCandidate {
            addr: sa("192.168.1.20:51820"),
            kind: EndpointKind::Lan,
        }];
        for neighbour in ["dock-mirror", "dock-edge"] {
            let m = compute_netmap(&reg, neighbour).unwrap();
            let nas = peer(&m, "nas");
            assert_eq!(nas.endpoints, nas_lan, "{neighbour}");
            assert_eq!(nas.persistent_keepalive, Some(25), "{neighbour}");
        }
        // From the internet: neither the LAN address nor the marker (the NAT's address with
        // dock-mirror's port); dock-load learns the NAS's address from its keepalives.
        let m = compute_netmap(&reg, "dock-load").unwrap();
        let nas = peer(&m, "nas");
        assert!(nas.endpoints.is_empty(), "{:?}", nas.endpoints);
        assert_eq!(nas.persistent_keepalive, None);
        // The NAS's own netmap (its wg-quick config): LAN neighbours at their LAN addresses,
        // the public host at its public address.
        let m = compute_netmap(&reg, "nas").unwrap();
        assert_eq!(
            peer(&m, "dock-mirror").endpoints.first(),
            Some(&EndpointCandidate {
                addr: sa("192.168.1.3:51871"),
                kind: EndpointKind::Lan
            })
        );
        assert_eq!(
            peer(&m, "dock-edge").endpoints.first(),
            Some(&EndpointCandidate {
                addr: sa("192.168.1.4:51871"),
                kind: EndpointKind::Lan
            })
        );
        assert_eq!(
            peer(&m, "dock-load").endpoints,
            vec![EndpointCandidate {
                addr: sa("198.51.100.5:51871"),
                kind: EndpointKind::Public
            }]
        );
        // A public endpoint is offered to everyone; the marker still never is.
        reg.hosts[3].reported = vec![sa("203.0.113.20:51820")];
        for from in ["dock-mirror", "dock-load"] {
            let m = compute_netmap(&reg, from).unwrap();
            assert_eq!(
                peer(&m, "nas").endpoints,
                vec![EndpointCandidate {
                    addr: sa("203.0.113.20:51820"),
                    kind: EndpointKind::Public
                }],
                "{from}"
            );
        }
    }

    #[test]
    fn classification() {
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.0.1",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.1.1",
            "fd00::1",
            "fe80::1",
            "::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "198.51.100.1",
            "8.8.8.8",
            "2001:db8::1",
            "2a01::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    fn arb_sockaddr() -> impl Strategy<Value = SocketAddr> {
        let ips = prop_oneof![
            (0u8..4).prop_map(|d| IpAddr::from([192, 168, 1, d])),
            (0u8..4).prop_map(|d| IpAddr::from([198, 51, 100, d])),
            (0u8..4).prop_map(|d| IpAddr::from([10, 99, 99, d])),
            (0u8..2).prop_map(|d| IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, u16::from(d)])),
        ];
        (ips, prop_oneof![Just(0u16), Just(51871u16), Just(40000u16)])
            .prop_map(|(ip, port)| SocketAddr::new(ip, port))
    }

    fn arb_registry() -> impl Strategy<Value = RegistrySnapshot> {
        let host = (
            "[a-e]{1,2}",
            any::<u8>(),
            any::<[bool; 3]>(),
            prop::collection::vec(arb_sockaddr(), 0..4),
            prop::option::of(arb_sockaddr()),
            prop::collection::vec(
                (any::<u8>(), 24u8..=32).prop_map(|(a, p)| {
                    IpNet::from(
                        ipnet::Ipv4Net::new([172, 20, a, 0].into(), p)
                            .unwrap()
                            .trunc(),
                    )
                }),
                0..3,
            ),
        )
            .prop_map(
                |(name, n, [admin, static_peer, removed], reported, observed, extra)| HostRecord {
                    name,
                    address: IpAddr::from([10, 99, 99, n]),
                    public_key: key(n),
                    admin,
                    static_peer,
                    removed,
                    reported,
                    observed,
                    extra_allowed_ips: extra,
                    ungranted_routes: vec![],
                    key_created_unix: u64::from(n),
                    next_public_key: None,
                    rotate_requested: false,
                    pending: false,
                },
            );
        (any::<u64>(), 1u16..100, prop::collection::vec(host, 0..8)).prop_map(
            |(version, ka, mut hosts)| {
                // The registry holds unique names.
                let mut seen = std::collections::BTreeSet::new();
                hosts.retain(|h| seen.insert(h.name.clone()));
                RegistrySnapshot {
                    mesh_cidr: "10.99.99.0/24".parse().unwrap(),
                    version,
                    keepalive_secs: ka,
                    hosts,
                    coordinator: None,
                }
            },
        )
    }

    proptest! {
        #[test]
        fn deterministic_symmetric_and_without_removed(reg in arb_registry()) {
            for h in &reg.hosts {
                let m = compute_netmap(&reg, &h.name);
                prop_assert_eq!(&m, &compute_netmap(&reg, &h.name));
                // Host order in the registry does not matter either.
                let mut rev = reg.clone();
                rev.hosts.reverse();
                prop_assert_eq!(&m, &compute_netmap(&rev, &h.name));
                if h.removed {
                    prop_assert!(m.is_none());
                    continue;
                }
                let Some(m) = m else { return Err(TestCaseError::fail("missing netmap")) };
                prop_assert_eq!(m.version, reg.version);
                prop_assert_eq!(m.address, h.address);
                prop_assert_eq!(m.public_key, h.public_key);
                let names: Vec<&str> = m.peers.iter().map(|p| p.name.as_str()).collect();
                let mut sorted = names.clone();
                sorted.sort();
                prop_assert_eq!(&names, &sorted);
                for other in &reg.hosts {
                    let listed = m.peers.iter().find(|p| p.name == other.name);
                    if other.removed || other.name == h.name {
                        prop_assert!(listed.is_none());
                        continue;
                    }
                    let Some(p) = listed else { return Err(TestCaseError::fail("peer missing")) };
                    prop_assert_eq!(p.public_key, other.public_key);
                    prop_assert_eq!(p.address, other.address);
                    prop_assert!(p.allowed_ips.contains(&IpNet::from(other.address)));
                    prop_assert!(p.allowed_ips.windows(2).all(|w| w[0] < w[1]));
                    // Symmetric: the other host lists this one, with its registry key and address.
                    let back = compute_netmap(&reg, &other.name)
                        .and_then(|o| o.peers.into_iter().find(|q| q.name == h.name));
                    let Some(back) = back else { return Err(TestCaseError::fail("not symmetric")) };
                    prop_assert_eq!(back.public_key, h.public_key);
                    prop_assert_eq!(back.address, h.address);
                    // Endpoints: no duplicates, all usable.
                    for (i, c) in p.endpoints.iter().enumerate() {
                        prop_assert!(c.addr.port() != 0);
                        prop_assert!(!reg.mesh_cidr.contains(&c.addr.ip()));
                        prop_assert!(p.endpoints[..i].iter().all(|d| d.addr != c.addr));
                        // A static peer's observed address is a same-NAT marker only.
                        if other.static_peer {
                            prop_assert!(c.kind != EndpointKind::Observed);
                            prop_assert!(other.reported.contains(&c.addr));
                            if other.observed.is_some() && !same_nat(h, other) {
                                prop_assert!(c.kind == EndpointKind::Public);
                            }
                        }
                    }
                    prop_assert_eq!(
                        p.persistent_keepalive.is_some(),
                        behind_nat(h) || (other.static_peer && same_nat(h, other))
                    );
                }
            }
        }
    }
}
