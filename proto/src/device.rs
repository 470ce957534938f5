//! The WireGuard device model that the reconciler works on: what we want (`DeviceSpec`) and
//! what is really there (`ObservedDevice`). Both backends (our engine over UAPI, the kernel over
//! netlink) and the in-memory fake translate to and from these types.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::key::{PrivateKey, PublicKey};

/// One peer as we want it configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: PublicKey,
    pub preshared_key: Option<[u8; 32]>,
    /// `None` means "we do not know it; learn it from the peer" (e.g. a host behind NAT):
    /// the reconciler never clears an endpoint the device learned.
    pub endpoint: Option<SocketAddr>,
    /// Kept sorted and de-duplicated (`IpNet::trunc` applied) by constructors/validation.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds; `None` or `Some(0)` means off. Normalised to `None` for off.
    pub persistent_keepalive: Option<u16>,
}

/// The whole device as we want it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub private_key: PrivateKey,
    pub listen_port: u16,
    /// `None` = no fwmark (a /24 mesh needs none).
    pub fwmark: Option<u32>,
    pub peers: BTreeMap<PublicKey, PeerSpec>,
}

/// One peer as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedPeer {
    pub public_key: PublicKey,
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// Wall-clock time of the latest handshake since the UNIX epoch; `None` = never.
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The device as it really is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedDevice {
    /// Public key of the configured private key, `None` if no private key is set.
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub fwmark: Option<u32>,
    pub peers: BTreeMap<PublicKey, ObservedPeer>,
}
