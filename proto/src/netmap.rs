//! The netmap: what one host must know about every other host, computed by the coordinator
//! from its registry by a pure function, and pushed to every daemon.
//!
//! TO BE IMPLEMENTED (issue 3): `compute_netmap`, endpoint ordering, property tests
//! (deterministic; symmetric: A lists B exactly when B lists A, with consistent keys and
//! addresses; removed hosts appear in no netmap).

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
    /// Extra prefixes the host routes for the mesh (beyond its /32); empty for now.
    pub extra_allowed_ips: Vec<IpNet>,
    /// When the host's current public key was registered (seconds since the UNIX epoch).
    pub key_created_unix: u64,
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
}

/// One peer in a host's netmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetmapPeer {
    pub name: String,
    pub address: IpAddr,
    pub public_key: PublicKey,
    /// The peer's /32 (or /128) plus its extra prefixes; sorted.
    pub allowed_ips: Vec<IpNet>,
    /// Best first: the LAN address when both hosts are behind the same NAT, then public, then
    /// observed.
    pub endpoints: Vec<EndpointCandidate>,
    /// Set when the host this netmap is for is behind NAT (so the NAT mapping stays open).
    pub persistent_keepalive: Option<u16>,
    pub static_peer: bool,
    pub admin: bool,
    pub key_created_unix: u64,
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
}

/// The netmap for host `name`, or `None` if there is no such (non-removed) host.
pub fn compute_netmap(reg: &RegistrySnapshot, name: &str) -> Option<Netmap> {
    let _ = (reg, name);
    todo!("issue 3")
}
