//! The coordinator's HTTP/JSON API, which listens on the coordinator's mesh address only, on a
//! socket bound to the mesh interface. Every request proves its caller's key and every answer
//! the coordinator's ([`crate::wire::auth`]); the source address must match the proven key's host.
//! Paths are versioned (`/v1/...`). Bodies are JSON; bodies over `MAX_BODY` get 413.
//!
//! ```text
//! POST /v1/join             JoinRequest    -> JoinResponse      (signed with the token's throwaway
//!                            key from the invited address, proving the new key too)
//! POST /v1/endpoints        EndpointReport -> 204 (applied) or 202 (kept: at most one report
//!                            per host and second is applied, the latest wins)
//! POST /v1/rotate/prepare   RotateRequest  -> RotateResponse    (the key becomes the caller's
//!                            next key: peers accept its handshakes; idempotent; proves the
//!                            current and the next key)
//! POST /v1/rotate/commit    RotateRequest  -> RotateResponse    (the prepared next key replaces
//!                            the caller's key everywhere; idempotent; see `crate::rotation`)
//! GET  /v1/netmap?since=V   (long-poll up to LONG_POLL_SECS; 200 Netmap when version > V,
//!                            304 when nothing changed in time)
//! GET  /v1/prometheus/targets             -> file_sd JSON (unsigned: Prometheus cannot sign;
//!                            only to a mesh host's source address; the host list every
//!                            member's netmap holds anyway)
//! POST /v1/admin/invite     InviteRequest  -> InviteResponse   (admin hosts only, proven key)
//! GET  /v1/admin/invites                   -> Vec<InviteInfo>
//! DELETE /v1/admin/invites/NAME            -> 204
//! GET  /v1/admin/hosts                     -> Vec<HostInfo>
//! DELETE /v1/admin/hosts/NAME              -> 204
//! POST /v1/admin/hosts/NAME/rotate         -> 204   (NAME rotates its key when its netmap
//!                            says so; see `crate::rotation`)
//! GET  /v1/admin/hosts/NAME/wg-quick       -> text   (a static peer's current wg-quick
//!                            configuration, private key left out)
//! GET  /v1/admin/routes                    -> Vec<RouteInfo> (every host's advertised
//!                            prefixes: pending, approved or revoked; `crate::routes`)
//! POST /v1/admin/routes/approve RouteDecisionRequest -> RouteInfo (into the netmaps while
//!                            advertised; 404 if not advertised, 409 if another host's
//!                            approved prefix overlaps)
//! POST /v1/admin/routes/revoke  RouteDecisionRequest -> RouteInfo (out of every netmap)
//!
//! Outside the tunnel, on TCP at the coordinator's WireGuard endpoint (same port number):
//! GET  /v1/key-notices/HOSTKEY              -> `crate::wire::notice::KeyNoticesResponse` (only to a
//!                            requester proving HOSTKEY toward the coordinator key it knows;
//!                            anything else gets the same 403)
//! errors: ApiError JSON with a 4xx/5xx status
//! ```

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::key::PublicKey;

pub const API_VERSION: &str = "v1";
pub const DEFAULT_API_PORT: u16 = 51872;
pub const MAX_BODY: usize = 64 * 1024;
pub const LONG_POLL_SECS: u64 = 25;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The whole token, so the coordinator can check its MAC and that it was not altered.
    pub token: String,
    /// The key generated on the host; its private half never leaves the host.
    pub public_key: PublicKey,
    pub listen_port: u16,
    /// The host's interface addresses (underlay), for endpoint candidates.
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinResponse {
    pub netmap: crate::netmap::Netmap,
}

/// Key rotation: the caller's new public key (generated on the host; never used before by any
/// host). The caller keeps using its old key until it has the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    pub public_key: PublicKey,
}

/// The caller's netmap after the rotation (carrying its new key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateResponse {
    pub netmap: crate::netmap::Netmap,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointReport {
    pub listen_port: u16,
    pub addresses: Vec<IpAddr>,
    /// The subnets this host routes for the mesh (`routes.advertise`); the coordinator puts
    /// them into the other hosts' netmaps as this host's extra allowed IPs. Left out when
    /// empty, so older coordinators keep accepting the report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertise: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    pub name: String,
    pub address: Option<IpAddr>,
    /// Seconds; default 24 h.
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub admin: bool,
    /// A device that cannot run meshd: the response carries a wg-quick config instead of a token.
    #[serde(default)]
    pub static_peer: bool,
    /// For static peers: use this public key instead of generating a key pair.
    pub public_key: Option<PublicKey>,
    /// For static peers: the device's own reachable address and WireGuard listen port (for
    /// a device on a home LAN, its LAN address). Hosts behind the same NAT as `near` (or, when
    /// the address is publicly routable, every host) get it as the device's endpoint.
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    /// For static peers: a registered host behind the same NAT (on the same LAN) as the
    /// device. Hosts behind that NAT reach the device at `endpoint`; the device's wg-quick
    /// config lists them at their LAN addresses. Other hosts learn the device's address when
    /// its keepalives arrive.
    #[serde(default)]
    pub near: Option<String>,
}

impl InviteRequest {
    /// An invitation for a host that runs meshd, with every default: the next free address,
    /// 24 h, not an admin.
    pub fn host(name: impl Into<String>) -> InviteRequest {
        InviteRequest {
            name: name.into(),
            ..InviteRequest::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteResponse {
    pub name: String,
    pub address: IpAddr,
    /// `meshd1....` for daemon hosts.
    pub token: Option<String>,
    /// A complete wg-quick configuration for static peers.
    pub wg_quick_config: Option<String>,
    pub expires_unix: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteInfo {
    pub name: String,
    pub address: IpAddr,
    pub created_unix: u64,
    pub expires_unix: u64,
    pub admin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub name: String,
    pub address: IpAddr,
    pub public_key: PublicKey,
    pub admin: bool,
    pub static_peer: bool,
    pub removed: bool,
    pub created_unix: u64,
    pub last_seen_unix: Option<u64>,
    pub observed: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}
