//! The device the agent wants: the configuration's static peers plus the netmap's peers (the
//! configuration wins a conflict), the coordinator as a peer until a netmap names it, and the
//! netmap as this host applies it (`routes.accept` and the refusals of
//! `mesh_proto::routes`). The agent's decisions, made from its settings, the membership and
//! the netmap; the member side only supplies those.

use std::net::IpAddr;

use ipnet::IpNet;
use mesh_proto::netmap::Netmap;
use mesh_proto::{DeviceSpec, PeerSpec, PrivateKey};

use crate::disk::state::Membership;
use crate::runtime::settings::Settings;

/// Keepalive toward the coordinator while joining (and before the first netmap).
pub const BOOTSTRAP_KEEPALIVE: u16 = 25;

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
    hints: &std::collections::BTreeMap<mesh_proto::PublicKey, std::net::SocketAddr>,
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
                    // The endpoint learned before a restart first (`mesh_proto::learned`).
                    endpoint: hints
                        .get(&p.public_key)
                        .copied()
                        .or_else(|| p.endpoints.first().map(|c| c.addr)),
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
