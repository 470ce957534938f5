//! The cross-platform WireGuard userspace API (UAPI) text protocol, as `wg(8)` speaks it over
//! `/var/run/wireguard/IFACE.sock` (spec: https://www.wireguard.com/xplatform/).
//!
//! Pure parsing and formatting; both our engine's UAPI server and the daemon's UAPI client use
//! it. TO BE IMPLEMENTED by helper: parsers must never panic on any input (fuzzed).

use std::net::SocketAddr;

use ipnet::IpNet;

/// A `set=1` request, decoded. Keys are raw 32-byte arrays (hex on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SetDevice {
    /// `Some([0; 32])` (all-zero key on the wire) removes the private key.
    pub private_key: Option<[u8; 32]>,
    pub listen_port: Option<u16>,
    /// `Some(0)` removes the fwmark.
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<SetPeer>,
}

/// One `public_key=` section of a `set=1` request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SetPeer {
    pub public_key: [u8; 32],
    pub remove: bool,
    pub update_only: bool,
    /// `Some([0; 32])` removes the preshared key.
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    /// `Some(0)` disables persistent keepalive.
    pub persistent_keepalive_interval: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNet>,
    /// Only 1 is accepted.
    pub protocol_version: Option<u32>,
}

/// A `get=1` response, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GetDevice {
    pub private_key: Option<[u8; 32]>,
    pub listen_port: u16,
    pub fwmark: Option<u32>,
    pub peers: Vec<GetPeer>,
}

/// One peer in a `get=1` response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GetPeer {
    pub public_key: [u8; 32],
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive_interval: u16,
    pub allowed_ips: Vec<IpNet>,
    pub last_handshake_time_sec: u64,
    pub last_handshake_time_nsec: u32,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub protocol_version: u32,
}

/// A malformed UAPI message. `errno()` is the positive errno the server replies with
/// (`errno=N`), as wireguard-go does: EINVAL for bad values, EPROTO for bad structure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    #[error("invalid value for {key}: {value:?}")]
    InvalidValue { key: String, value: String },
    #[error("unknown or misplaced key {key:?}")]
    UnexpectedKey { key: String },
    #[error("malformed line {line:?}")]
    MalformedLine { line: String },
    #[error("server replied errno={0}")]
    Errno(i32),
}

impl UapiError {
    /// The positive errno a server replies with for this error.
    pub fn errno(&self) -> i32 {
        todo!("helper")
    }
}

/// Parse the body of a `set=1` request: the lines after `set=1`, up to (not including) the
/// blank line that ends it. Never panics.
pub fn parse_set(body: &str) -> Result<SetDevice, UapiError> {
    let _ = body;
    todo!("helper")
}

/// Format a complete `set=1` request including the leading `set=1\n` and the final blank line.
pub fn format_set(set: &SetDevice) -> String {
    let _ = set;
    todo!("helper")
}

/// Format a complete successful `get=1` response: the key=value lines, `errno=0\n`, blank line.
pub fn format_get(get: &GetDevice) -> String {
    let _ = get;
    todo!("helper")
}

/// Parse a `get=1` response (everything up to the blank line; a non-zero `errno=` gives
/// `UapiError::Errno`). Never panics.
pub fn parse_get(text: &str) -> Result<GetDevice, UapiError> {
    let _ = text;
    todo!("helper")
}

/// The `errno=N\n\n` reply that ends a `set=1` exchange (0 = success).
pub fn format_errno(errno: i32) -> String {
    format!("errno={errno}\n\n")
}
