//! The cross-platform WireGuard userspace API (UAPI) text protocol, as `wg(8)` speaks it over
//! `/var/run/wireguard/IFACE.sock` (spec: <https://www.wireguard.com/xplatform/>).
//!
//! Pure parsing and formatting; both our engine's UAPI server and the daemon's UAPI client use
//! it. Parsers never panic on any input (fuzzed by property tests).
//!
//! Error replies follow wireguard-go and `wg(8)`: on the wire the server sends the *negative*
//! errno (`errno=-22`), and `wg` sets `errno = -value`. [`UapiError::errno`] gives the positive
//! number and [`format_errno`] writes the wire form.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use crate::device::{ObservedDevice, ObservedPeer};
use crate::key::{decode_hex, PrivateKey, PublicKey};
use crate::plan::Op;

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

/// `EINVAL`: an invalid key or value.
pub const EINVAL: i32 = 22;
/// `EPROTO`: a line that is not `key=value`.
pub const EPROTO: i32 = 71;

impl UapiError {
    /// The positive errno a server replies with for this error (`EINVAL` for bad keys and
    /// values, `EPROTO` for a line that is not `key=value`, as wireguard-go does).
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::InvalidValue { .. } | UapiError::UnexpectedKey { .. } => EINVAL,
            UapiError::MalformedLine { .. } => EPROTO,
            UapiError::Errno(n) => n.checked_abs().unwrap_or(EPROTO),
        }
    }

    fn invalid(key: &str, value: &str) -> Self {
        UapiError::InvalidValue {
            key: key.to_string(),
            value: truncate(value),
        }
    }

    fn unexpected(key: &str) -> Self {
        UapiError::UnexpectedKey { key: truncate(key) }
    }
}

/// Keep error messages bounded even for hostile input.
fn truncate(s: &str) -> String {
    const MAX: usize = 100;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn split_line(line: &str) -> Result<(&str, &str), UapiError> {
    line.split_once('=')
        .ok_or_else(|| UapiError::MalformedLine {
            line: truncate(line),
        })
}

/// Unsigned decimal as Go's `strconv.ParseUint` accepts it: digits only, no sign.
fn parse_uint<T: FromStr>(key: &str, value: &str) -> Result<T, UapiError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UapiError::invalid(key, value));
    }
    value.parse().map_err(|_| UapiError::invalid(key, value))
}

fn parse_key(key: &str, value: &str) -> Result<[u8; 32], UapiError> {
    decode_hex(value).map_err(|_| UapiError::invalid(key, value))
}

fn parse_true(key: &str, value: &str) -> Result<bool, UapiError> {
    if value == "true" {
        Ok(true)
    } else {
        Err(UapiError::invalid(key, value))
    }
}

fn parse_endpoint(key: &str, value: &str) -> Result<SocketAddr, UapiError> {
    value
        .parse::<SocketAddr>()
        .map_err(|_| UapiError::invalid(key, value))
}

fn parse_allowed_ip(key: &str, value: &str) -> Result<IpNet, UapiError> {
    value
        .parse::<IpNet>()
        .map_err(|_| UapiError::invalid(key, value))
}

fn parse_protocol_version(key: &str, value: &str) -> Result<u32, UapiError> {
    let v: u32 = parse_uint(key, value)?;
    if v == 1 {
        Ok(v)
    } else {
        Err(UapiError::invalid(key, value))
    }
}

/// Lines of a message up to (not including) the first blank line.
fn body_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n').take_while(|l| !l.is_empty())
}

/// Parse the body of a `set=1` request: the lines after `set=1`, up to (not including) the
/// blank line that ends it. Never panics.
///
/// Device keys (`private_key`, `listen_port`, `fwmark`, `replace_peers`) must come before the
/// first `public_key`; every key after it belongs to that peer. An unknown or misplaced key
/// and a bad value give `EINVAL`; a line without `=` gives `EPROTO`.
pub fn parse_set(body: &str) -> Result<SetDevice, UapiError> {
    let mut dev = SetDevice::default();
    let mut peer: Option<SetPeer> = None;
    for line in body_lines(body) {
        let (key, value) = split_line(line)?;
        if key == "public_key" {
            if let Some(p) = peer.take() {
                dev.peers.push(p);
            }
            peer = Some(SetPeer {
                public_key: parse_key(key, value)?,
                ..SetPeer::default()
            });
            continue;
        }
        match peer.as_mut() {
            None => match key {
                "private_key" => dev.private_key = Some(parse_key(key, value)?),
                "listen_port" => dev.listen_port = Some(parse_uint(key, value)?),
                "fwmark" => dev.fwmark = Some(parse_uint(key, value)?),
                "replace_peers" => dev.replace_peers = parse_true(key, value)?,
                _ => return Err(UapiError::unexpected(key)),
            },
            Some(p) => match key {
                "remove" => p.remove = parse_true(key, value)?,
                "update_only" => p.update_only = parse_true(key, value)?,
                "preshared_key" => p.preshared_key = Some(parse_key(key, value)?),
                "endpoint" => p.endpoint = Some(parse_endpoint(key, value)?),
                "persistent_keepalive_interval" => {
                    p.persistent_keepalive_interval = Some(parse_uint(key, value)?)
                }
                "replace_allowed_ips" => p.replace_allowed_ips = parse_true(key, value)?,
                "allowed_ip" => p.allowed_ips.push(parse_allowed_ip(key, value)?),
                "protocol_version" => {
                    p.protocol_version = Some(parse_protocol_version(key, value)?)
                }
                _ => return Err(UapiError::unexpected(key)),
            },
        }
    }
    if let Some(p) = peer {
        dev.peers.push(p);
    }
    Ok(dev)
}

fn hex(bytes: &[u8; 32]) -> String {
    PublicKey(*bytes).to_hex()
}

/// Format a complete `set=1` request including the leading `set=1\n` and the final blank line.
pub fn format_set(set: &SetDevice) -> String {
    let mut out = String::from("set=1\n");
    // `write!` to a String cannot fail.
    if let Some(k) = &set.private_key {
        let _ = writeln!(out, "private_key={}", hex(k));
    }
    if let Some(port) = set.listen_port {
        let _ = writeln!(out, "listen_port={port}");
    }
    if let Some(mark) = set.fwmark {
        let _ = writeln!(out, "fwmark={mark}");
    }
    if set.replace_peers {
        out.push_str("replace_peers=true\n");
    }
    for p in &set.peers {
        let _ = writeln!(out, "public_key={}", hex(&p.public_key));
        if p.remove {
            out.push_str("remove=true\n");
        }
        if p.update_only {
            out.push_str("update_only=true\n");
        }
        if let Some(v) = p.protocol_version {
            let _ = writeln!(out, "protocol_version={v}");
        }
        if let Some(k) = &p.preshared_key {
            let _ = writeln!(out, "preshared_key={}", hex(k));
        }
        if let Some(e) = p.endpoint {
            let _ = writeln!(out, "endpoint={e}");
        }
        if let Some(k) = p.persistent_keepalive_interval {
            let _ = writeln!(out, "persistent_keepalive_interval={k}");
        }
        if p.replace_allowed_ips {
            out.push_str("replace_allowed_ips=true\n");
        }
        for ip in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
    }
    out.push('\n');
    out
}

/// Format a complete successful `get=1` response: the key=value lines, `errno=0\n`, blank line.
///
/// Order and omissions as wireguard-go: `private_key` (omitted when unset or all-zero),
/// `listen_port` (omitted when 0), `fwmark` (omitted when none or 0), then per peer
/// `public_key`, `preshared_key` (all-zero when none), `protocol_version=1`, `endpoint` (when
/// known), handshake time, `tx_bytes`, `rx_bytes`, `persistent_keepalive_interval`, the
/// `allowed_ip` lines.
pub fn format_get(get: &GetDevice) -> String {
    let mut out = String::new();
    if let Some(k) = get.private_key.as_ref().filter(|k| **k != [0; 32]) {
        let _ = writeln!(out, "private_key={}", hex(k));
    }
    if get.listen_port != 0 {
        let _ = writeln!(out, "listen_port={}", get.listen_port);
    }
    if let Some(mark) = get.fwmark.filter(|m| *m != 0) {
        let _ = writeln!(out, "fwmark={mark}");
    }
    for p in &get.peers {
        let _ = writeln!(out, "public_key={}", hex(&p.public_key));
        let psk = p.preshared_key.unwrap_or([0; 32]);
        let _ = writeln!(out, "preshared_key={}", hex(&psk));
        out.push_str("protocol_version=1\n");
        if let Some(e) = p.endpoint {
            let _ = writeln!(out, "endpoint={e}");
        }
        let _ = writeln!(out, "last_handshake_time_sec={}", p.last_handshake_time_sec);
        let _ = writeln!(
            out,
            "last_handshake_time_nsec={}",
            p.last_handshake_time_nsec
        );
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive_interval
        );
        for ip in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
    }
    out.push_str("errno=0\n\n");
    out
}

fn parse_errno(value: &str) -> Result<i32, UapiError> {
    let digits = value.strip_prefix('-').unwrap_or(value);
    let n: i32 = parse_uint("errno", digits)?;
    Ok(if value.starts_with('-') { -n } else { n })
}

/// Parse a `get=1` response (everything up to the blank line; a non-zero `errno=` gives
/// `UapiError::Errno`). Never panics.
///
/// The `errno=` line is required (a response without it is truncated). Unknown keys are
/// ignored for forward compatibility; known keys with bad values are refused. A zero
/// `preshared_key` is reported as `None`.
pub fn parse_get(text: &str) -> Result<GetDevice, UapiError> {
    let mut dev = GetDevice::default();
    let mut peer: Option<GetPeer> = None;
    let mut errno = None;
    for line in body_lines(text) {
        let (key, value) = split_line(line)?;
        if errno.is_some() {
            return Err(UapiError::unexpected(key));
        }
        match key {
            "errno" => {
                errno = Some(parse_errno(value)?);
                continue;
            }
            "public_key" => {
                if let Some(p) = peer.take() {
                    dev.peers.push(p);
                }
                peer = Some(GetPeer {
                    public_key: parse_key(key, value)?,
                    protocol_version: 1,
                    ..GetPeer::default()
                });
                continue;
            }
            _ => {}
        }
        match peer.as_mut() {
            None => match key {
                "private_key" => {
                    let k = parse_key(key, value)?;
                    dev.private_key = (k != [0; 32]).then_some(k);
                }
                "listen_port" => dev.listen_port = parse_uint(key, value)?,
                "fwmark" => {
                    let m: u32 = parse_uint(key, value)?;
                    dev.fwmark = (m != 0).then_some(m);
                }
                _ => {}
            },
            Some(p) => match key {
                "preshared_key" => {
                    let k = parse_key(key, value)?;
                    p.preshared_key = (k != [0; 32]).then_some(k);
                }
                "protocol_version" => p.protocol_version = parse_uint(key, value)?,
                "endpoint" => p.endpoint = Some(parse_endpoint(key, value)?),
                "last_handshake_time_sec" => p.last_handshake_time_sec = parse_uint(key, value)?,
                "last_handshake_time_nsec" => {
                    let n: u32 = parse_uint(key, value)?;
                    if n >= 1_000_000_000 {
                        return Err(UapiError::invalid(key, value));
                    }
                    p.last_handshake_time_nsec = n;
                }
                "tx_bytes" => p.tx_bytes = parse_uint(key, value)?,
                "rx_bytes" => p.rx_bytes = parse_uint(key, value)?,
                "persistent_keepalive_interval" => {
                    p.persistent_keepalive_interval = parse_uint(key, value)?
                }
                "allowed_ip" => p.allowed_ips.push(parse_allowed_ip(key, value)?),
                _ => {}
            },
        }
    }
    if let Some(p) = peer {
        dev.peers.push(p);
    }
    match errno {
        Some(0) => Ok(dev),
        Some(n) => Err(UapiError::Errno(n)),
        None => Err(UapiError::MalformedLine {
            line: "(response ended without errno=)".to_string(),
        }),
    }
}

/// The `errno=N\n\n` reply that ends a `set=1` or failed `get=1` exchange (0 = success).
///
/// Pass the positive errno ([`UapiError::errno`]); it is written negated (`errno=-22`), which
/// is what wireguard-go sends and what `wg(8)` expects. A negative argument is written as is.
pub fn format_errno(errno: i32) -> String {
    let wire = if errno > 0 { -errno } else { errno };
    format!("errno={wire}\n\n")
}

/// Parse the reply to a `set=1` request (`errno=N` and a blank line). `errno=0` is success;
/// anything else is `UapiError::Errno(n)` as sent (wireguard-go sends it negative: use
/// [`UapiError::errno`] for the positive number). Never panics.
pub fn parse_errno_reply(text: &str) -> Result<(), UapiError> {
    let Some(line) = body_lines(text).next() else {
        return Err(UapiError::MalformedLine {
            line: "(reply ended without errno=)".to_string(),
        });
    };
    match split_line(line)? {
        ("errno", value) => match parse_errno(value)? {
            0 => Ok(()),
            n => Err(UapiError::Errno(n)),
        },
        (key, _) => Err(UapiError::unexpected(key)),
    }
}

/// Translate reconciler ops into one `set=1` request.
///
/// - `SetPrivateKey`, `SetListenPort` set those fields; `SetFwmark(None)` sends `fwmark=0`.
/// - `AddPeer` sends every field: `replace_allowed_ips=true`, the allowed IPs, the endpoint
///   when known, the preshared key (all-zero = none) and the keepalive (0 = off), so that it
///   also fully updates a peer that already exists.
/// - `UpdatePeer` sends `update_only=true` and only the changed fields
///   (`replace_allowed_ips=true` when the allowed IPs change).
/// - `RemovePeer` sends `remove=true`.
pub fn ops_to_set(ops: &[Op]) -> SetDevice {
    let mut set = SetDevice::default();
    for op in ops {
        match op {
            Op::SetPrivateKey(k) => set.private_key = Some(*k.as_bytes()),
            Op::SetListenPort(p) => set.listen_port = Some(*p),
            Op::SetFwmark(m) => set.fwmark = Some(m.unwrap_or(0)),
            Op::AddPeer(spec) => set.peers.push(SetPeer {
                public_key: spec.public_key.0,
                preshared_key: Some(spec.preshared_key.unwrap_or([0; 32])),
                endpoint: spec.endpoint,
                persistent_keepalive_interval: Some(spec.persistent_keepalive.unwrap_or(0)),
                replace_allowed_ips: true,
                allowed_ips: spec.allowed_ips.clone(),
                ..SetPeer::default()
            }),
            Op::UpdatePeer {
                public_key,
                preshared_key,
                endpoint,
                allowed_ips,
                persistent_keepalive,
            } => set.peers.push(SetPeer {
                public_key: public_key.0,
                update_only: true,
                preshared_key: preshared_key.map(|k| k.unwrap_or([0; 32])),
                endpoint: *endpoint,
                persistent_keepalive_interval: persistent_keepalive.map(|k| k.unwrap_or(0)),
                replace_allowed_ips: allowed_ips.is_some(),
                allowed_ips: allowed_ips.clone().unwrap_or_default(),
                ..SetPeer::default()
            }),
            Op::RemovePeer(k) => set.peers.push(SetPeer {
                public_key: k.0,
                remove: true,
                ..SetPeer::default()
            }),
        }
    }
    set
}

impl From<GetPeer> for ObservedPeer {
    fn from(p: GetPeer) -> Self {
        let last_handshake = if p.last_handshake_time_sec == 0 && p.last_handshake_time_nsec == 0 {
            None
        } else {
            Some(Duration::new(
                p.last_handshake_time_sec,
                p.last_handshake_time_nsec,
            ))
        };
        let mut allowed_ips = p.allowed_ips;
        allowed_ips.sort();
        allowed_ips.dedup();
        ObservedPeer {
            public_key: PublicKey(p.public_key),
            preshared_key: p.preshared_key.filter(|k| *k != [0; 32]),
            endpoint: p.endpoint,
            allowed_ips,
            persistent_keepalive: (p.persistent_keepalive_interval != 0)
                .then_some(p.persistent_keepalive_interval),
            last_handshake,
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
        }
    }
}

impl From<GetDevice> for ObservedDevice {
    fn from(g: GetDevice) -> Self {
        let public_key = g
            .private_key
            .filter(|k| *k != [0; 32])
            .map(|k| PrivateKey::from_bytes(k).public_key());
        let peers: BTreeMap<PublicKey, ObservedPeer> = g
            .peers
            .into_iter()
            .map(|p| (PublicKey(p.public_key), ObservedPeer::from(p)))
            .collect();
        ObservedDevice {
            public_key,
            listen_port: g.listen_port,
            fwmark: g.fwmark.filter(|m| *m != 0),
            peers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k(b: u8) -> [u8; 32] {
        [b; 32]
    }

    fn sample_set() -> SetDevice {
        SetDevice {
            private_key: Some(k(1)),
            listen_port: Some(51871),
            fwmark: Some(0),
            replace_peers: true,
            peers: vec![
                SetPeer {
                    public_key: k(2),
                    preshared_key: Some(k(3)),
                    endpoint: Some("198.51.100.2:51871".parse().unwrap()),
                    persistent_keepalive_interval: Some(25),
                    replace_allowed_ips: true,
                    allowed_ips: vec![
                        "10.99.99.2/32".parse().unwrap(),
                        "fd00::/64".parse().unwrap(),
                    ],
                    protocol_version: Some(1),
                    ..SetPeer::default()
                },
                SetPeer {
                    public_key: k(4),
                    remove: true,
                    ..SetPeer::default()
                },
                SetPeer {
                    public_key: k(5),
                    update_only: true,
                    endpoint: Some("[2001:db8::1]:51820".parse().unwrap()),
                    ..SetPeer::default()
                },
            ],
        }
    }

    fn sample_get() -> GetDevice {
        GetDevice {
            private_key: Some(k(1)),
            listen_port: 51871,
            fwmark: Some(7),
            peers: vec![
                GetPeer {
                    public_key: k(2),
                    preshared_key: Some(k(3)),
                    endpoint: Some("198.51.100.2:51871".parse().unwrap()),
                    persistent_keepalive_interval: 25,
                    allowed_ips: vec!["10.99.99.2/32".parse().unwrap()],
                    last_handshake_time_sec: 1_700_000_000,
                    last_handshake_time_nsec: 123,
                    rx_bytes: 10,
                    tx_bytes: 20,
                    protocol_version: 1,
                },
                GetPeer {
                    public_key: k(4),
                    protocol_version: 1,
                    ..GetPeer::default()
                },
            ],
        }
    }

    #[test]
    fn set_round_trip() {
        let set = sample_set();
        let text = format_set(&set);
        assert!(text.starts_with("set=1\n"));
        assert!(text.ends_with("\n\n"));
        let body = text.strip_prefix("set=1\n").unwrap();
        assert_eq!(parse_set(body).unwrap(), set);
        assert_eq!(parse_set("").unwrap(), SetDevice::default());
    }

    #[test]
    fn get_round_trip_and_order() {
        let get = sample_get();
        let text = format_get(&get);
        assert_eq!(parse_get(&text).unwrap(), get);
        let keys: Vec<&str> = text
            .lines()
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        assert_eq!(
            &keys[..14],
            &[
                "private_key",
                "listen_port",
                "fwmark",
                "public_key",
                "preshared_key",
                "protocol_version",
                "endpoint",
                "last_handshake_time_sec",
                "last_handshake_time_nsec",
                "tx_bytes",
                "rx_bytes",
                "persistent_keepalive_interval",
                "allowed_ip",
                "public_key",
            ]
        );
        assert!(text.ends_with("errno=0\n\n"));
        // Zero preshared key of the second peer is written and read back as None.
        assert!(text.contains(&format!("preshared_key={}", "0".repeat(64))));
    }

    #[test]
    fn get_omits_unset_fields() {
        let text = format_get(&GetDevice::default());
        assert_eq!(text, "errno=0\n\n");
        assert_eq!(parse_get(&text).unwrap(), GetDevice::default());
    }

    #[test]
    fn get_errors() {
        assert_eq!(parse_get("errno=-22\n\n"), Err(UapiError::Errno(-22)));
        assert_eq!(parse_get("errno=-22\n\n").unwrap_err().errno(), EINVAL);
        assert!(parse_get("listen_port=1\n\n").is_err());
        assert!(parse_get("listen_port=x\nerrno=0\n\n").is_err());
        assert!(parse_get("tx_bytes=1\nerrno=0\n\n").is_ok()); // unknown before a peer: ignored
        assert!(parse_get("some_future_key=1\nerrno=0\n\n").is_ok());
    }

    #[test]
    fn set_refusals() {
        let pk = format!("public_key={}\n", "02".repeat(32));
        let cases: Vec<(String, i32)> = vec![
            ("listen_port=65536".into(), EINVAL),
            ("listen_port=-1".into(), EINVAL),
            ("listen_port=+1".into(), EINVAL),
            ("listen_port=".into(), EINVAL),
            ("fwmark=abc".into(), EINVAL),
            ("private_key=abcd".into(), EINVAL),
            ("replace_peers=false".into(), EINVAL),
            ("replace_peers=1".into(), EINVAL),
            ("nonsense=1".into(), EINVAL),
            ("endpoint=1.2.3.4:5".into(), EINVAL), // peer key before public_key
            ("no equals sign".into(), EPROTO),
            (format!("{pk}listen_port=1"), EINVAL), // device key after public_key
            (format!("{pk}endpoint=example.com:51820"), EINVAL),
            (format!("{pk}endpoint=1.2.3.4"), EINVAL),
            (format!("{pk}endpoint=2001:db8::1:51820"), EINVAL),
            (format!("{pk}allowed_ip=10.0.0.1"), EINVAL),
            (format!("{pk}allowed_ip=10.0.0.0/33"), EINVAL),
            (format!("{pk}protocol_version=2"), EINVAL),
            (format!("{pk}remove=false"), EINVAL),
            (format!("{pk}update_only=yes"), EINVAL),
            (format!("{pk}replace_allowed_ips=TRUE"), EINVAL),
            (format!("{pk}persistent_keepalive_interval=70000"), EINVAL),
            (format!("{pk}bogus"), EPROTO),
        ];
        for (body, errno) in cases {
            let err = parse_set(&body).expect_err(&body);
            assert_eq!(err.errno(), errno, "{body}: {err}");
        }
    }

    #[test]
    fn set_accepts_endpoints() {
        let body = format!(
            "public_key={}\nendpoint=[2001:db8::1]:51871\npublic_key={}\nendpoint=192.0.2.1:1\n",
            "02".repeat(32),
            "03".repeat(32)
        );
        let set = parse_set(&body).unwrap();
        assert_eq!(
            set.peers[0].endpoint,
            Some("[2001:db8::1]:51871".parse().unwrap())
        );
        assert_eq!(set.peers[1].endpoint, Some("192.0.2.1:1".parse().unwrap()));
    }

    #[test]
    fn errno_replies() {
        assert_eq!(parse_errno_reply("errno=0\n\n"), Ok(()));
        assert_eq!(parse_errno_reply(&format_errno(0)), Ok(()));
        let e = parse_errno_reply(&format_errno(EINVAL)).unwrap_err();
        assert_eq!(e, UapiError::Errno(-22));
        assert_eq!(e.errno(), EINVAL);
        assert_eq!(
            parse_errno_reply("errno=71\n\n").unwrap_err().errno(),
            EPROTO
        );
        assert!(parse_errno_reply("").is_err());
        assert!(parse_errno_reply("errno=x\n\n").is_err());
        assert!(parse_errno_reply("listen_port=1\nerrno=0\n\n").is_err());
    }

    #[test]
    fn errno_wire_form() {
        assert_eq!(format_errno(0), "errno=0\n\n");
        assert_eq!(format_errno(EINVAL), "errno=-22\n\n");
        assert_eq!(format_errno(-71), "errno=-71\n\n");
        let err = parse_set("x").unwrap_err();
        assert_eq!(format_errno(err.errno()), "errno=-71\n\n");
    }

    #[test]
    fn ops_translation() {
        use crate::device::PeerSpec;
        let spec = PeerSpec {
            public_key: PublicKey(k(2)),
            preshared_key: None,
            endpoint: None,
            allowed_ips: vec!["10.99.99.2/32".parse().unwrap()],
            persistent_keepalive: None,
        };
        let ops = vec![
            Op::SetPrivateKey(PrivateKey::from_bytes(k(1))),
            Op::SetListenPort(51871),
            Op::SetFwmark(None),
            Op::AddPeer(spec),
            Op::UpdatePeer {
                public_key: PublicKey(k(3)),
                preshared_key: None,
                endpoint: Some("192.0.2.1:5".parse().unwrap()),
                allowed_ips: None,
                persistent_keepalive: Some(None),
            },
            Op::UpdatePeer {
                public_key: PublicKey(k(5)),
                preshared_key: Some(None),
                endpoint: None,
                allowed_ips: Some(vec![]),
                persistent_keepalive: None,
            },
            Op::RemovePeer(PublicKey(k(4))),
        ];
        let set = ops_to_set(&ops);
        assert_eq!(set.private_key, Some(k(1)));
        assert_eq!(set.listen_port, Some(51871));
        assert_eq!(set.fwmark, Some(0));
        assert!(!set.replace_peers);
        let p = &set.peers;
        assert_eq!(p.len(), 4);
        assert!(p[0].replace_allowed_ips && !p[0].update_only);
        assert_eq!(p[0].preshared_key, Some([0; 32]));
        assert_eq!(p[0].persistent_keepalive_interval, Some(0));
        assert_eq!(p[0].allowed_ips.len(), 1);
        assert!(p[1].update_only && !p[1].replace_allowed_ips);
        assert_eq!(p[1].persistent_keepalive_interval, Some(0));
        assert_eq!(p[1].preshared_key, None);
        assert!(p[2].replace_allowed_ips && p[2].allowed_ips.is_empty());
        assert_eq!(p[2].preshared_key, Some([0; 32]));
        assert!(p[3].remove);
        // And the request survives the wire.
        let text = format_set(&set);
        assert_eq!(parse_set(&text["set=1\n".len()..]).unwrap(), set);
    }

    #[test]
    fn get_to_observed() {
        let obs = ObservedDevice::from(sample_get());
        assert_eq!(
            obs.public_key,
            Some(PrivateKey::from_bytes(k(1)).public_key())
        );
        assert_eq!(obs.fwmark, Some(7));
        let p2 = &obs.peers[&PublicKey(k(2))];
        assert_eq!(p2.persistent_keepalive, Some(25));
        assert_eq!(p2.last_handshake, Some(Duration::new(1_700_000_000, 123)));
        let p4 = &obs.peers[&PublicKey(k(4))];
        assert_eq!(p4.last_handshake, None);
        assert_eq!(p4.persistent_keepalive, None);
        assert_eq!(p4.preshared_key, None);
        assert_eq!(
            ObservedDevice::from(GetDevice::default()),
            ObservedDevice::default()
        );
    }

    const VOCAB: &[&str] = &[
        "private_key",
        "listen_port",
        "fwmark",
        "replace_peers",
        "public_key",
        "remove",
        "update_only",
        "preshared_key",
        "endpoint",
        "persistent_keepalive_interval",
        "replace_allowed_ips",
        "allowed_ip",
        "protocol_version",
        "errno",
        "last_handshake_time_sec",
        "last_handshake_time_nsec",
        "tx_bytes",
        "rx_bytes",
        "true",
        "=",
        "\n",
        "1",
        "-",
        "/",
        ":",
        "[",
        "]",
        "%",
        "0",
        "ff",
        "é",
    ];

    fn mutate(text: &str, edits: &[(usize, u8, String)]) -> String {
        let mut s: Vec<char> = text.chars().collect();
        for (pos, kind, ins) in edits {
            if s.is_empty() {
                s.extend(ins.chars());
                continue;
            }
            let i = pos % s.len();
            match kind % 3 {
                0 => {
                    s.remove(i);
                }
                1 => {
                    for (j, c) in ins.chars().enumerate() {
                        s.insert(i + j, c);
                    }
                }
                _ => {
                    let end = (i + ins.len()).min(s.len());
                    s.drain(i..end);
                }
            }
        }
        s.into_iter().collect()
    }

    fn edit() -> impl Strategy<Value = (usize, u8, String)> {
        (
            any::<usize>(),
            any::<u8>(),
            prop_oneof![
                proptest::sample::select(VOCAB).prop_map(String::from),
                ".{0,8}",
            ],
        )
    }

    proptest! {
        #[test]
        fn fuzz_arbitrary_strings(s in ".*") {
            let _ = parse_set(&s);
            let _ = parse_get(&s);
            let _ = parse_errno_reply(&s);
        }

        #[test]
        fn fuzz_vocabulary_lines(
            lines in proptest::collection::vec(
                (proptest::sample::select(VOCAB), "[ -~]{0,70}"), 0..20)
        ) {
            let text: String = lines.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
            let _ = parse_set(&text);
            let _ = parse_get(&text);
        }

        #[test]
        fn fuzz_mutated_requests(edits in proptest::collection::vec(edit(), 1..8)) {
            let set = format_set(&sample_set());
            let m = mutate(&set["set=1\n".len()..], &edits);
            if let Err(e) = parse_set(&m) {
                prop_assert!(e.errno() == EINVAL || e.errno() == EPROTO);
            }
            let get = format_get(&sample_get());
            let m = mutate(&get, &edits);
            let _ = parse_get(&m);
        }
    }
}
