//! The coordinator role: the registry (hosts, invitations, endpoint reports, audit log) in
//! SQLite, the netmap version that long-polls wait on, and the HTTP/JSON API served inside the
//! tunnel (docs/ARCHITECTURE.md).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use ipnet::IpNet;
use mesh_proto::PublicKey;

mod acks;
mod api;
mod auth;
mod error;
mod grace;
mod render;
mod reports;
mod routes;
mod schema;
mod stats;
mod store;
mod wgquick;

#[cfg(test)]
mod tests;

pub use acks::AckOutcome;
#[cfg(any(test, feature = "test-fakes"))]
pub use api::InProcessApi;
pub use api::{
    bind_api_listener, key_notice_router, serve_api, serve_api_on, serve_api_with,
    serve_key_notices, ObservedFn, VERSION_HEADER,
};
pub use auth::Caller;
pub use error::CoordError;
pub use grace::{apply_join_grace, RecentJoin, JOIN_KEY_GRACE};
pub use stats::CoordinatorStats;
pub use store::{
    registered_key, validate_name, Coordinator, DEFAULT_INVITE_TTL_SECS, MAX_INVITE_TTL_SECS,
    MAX_REPORTED_ADDRESSES,
};

/// What the coordinator needs to know from the configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// The mesh, e.g. 10.99.99.0/24.
    pub mesh_cidr: IpNet,
    /// Where the API listens on the coordinator's mesh address.
    pub api_port: u16,
    /// The coordinator's underlay endpoints (IP:listen port), put into tokens and netmaps.
    pub public_endpoints: Vec<SocketAddr>,
    /// Ranges automatic assignment never hands out.
    pub reserved: Vec<IpNet>,
    /// Name to address, used when that name is invited.
    pub static_assignments: BTreeMap<String, IpAddr>,
    /// Persistent keepalive toward peers for hosts behind NAT (and in static peers' configs).
    pub keepalive_secs: u16,
    /// The registry file (SQLite), in the state directory.
    pub database: PathBuf,
    /// The coordinator host's own name, mesh address and public key.
    pub own_name: String,
    pub own_address: IpAddr,
    pub own_public_key: PublicKey,
}
