//! meshd's TOML configuration (`/etc/meshd/meshd.toml`): types, parsing and validation.
//! Pure: the daemon reads the file and hands the text and its path here. Every error of a
//! file is reported at once ([`ConfigErrors`]), each at the line and column of its value.
//!
//! ```toml
//! [host]                             # optional as a whole (all defaults)
//! name = "dock-load"                 # [a-z0-9-], 1..=63, no leading/trailing '-'
//! address = "10.99.99.1/24"          # own mesh address and the mesh prefix
//! interface = "wgmesh0"              # default wgmesh0
//! listen_port = 51871                # default 51871
//! private_key_file = "/etc/meshd/private.key"
//! mtu = 1420                         # 1280..=9000
//!
//! [daemon]                           # optional
//! control_socket = "/run/meshd/meshd.sock"
//! backend = "auto"                  # auto | kernel | userspace (default auto)
//! engine_command = "/usr/bin/meshd-wg"  # the userspace engine
//! reconcile_interval_secs = 10       # 1..=3600
//! state_dir = "/var/lib/meshd"       # membership, cached netmap
//! join_token_file = "/etc/meshd/join.token"  # optional: join with this token at first start
//! rotate_every_days = 30             # 0 = never, else 1..=3650 (default 30): key rotation
//!                                    # schedule, a few percent early by a per-host jitter
//!
//! [coordinator]                      # optional: this host runs the coordinator
//! mesh_cidr = "10.99.99.0/24"        # required; host bits zero; must contain host.address
//! api_port = 51872                   # default mesh_proto::wire::api::DEFAULT_API_PORT
//! public_endpoints = ["198.51.100.1:51871"]  # required, non-empty: what tokens carry
//! reserved = ["10.99.99.0/28"]       # default []: never handed out automatically
//! keepalive_secs = 25                # 1..=65535, default 25: toward peers from NATed hosts
//! database = "/var/lib/meshd/coordinator.db"
//!
//! [coordinator.static_assignments]   # name -> address, inside mesh_cidr, not reserved, unique
//! dock-prod = "10.99.99.2"
//!
//! [routes]                         # optional
//! advertise = ["192.168.1.20/32"]    # subnets this host routes for the mesh (forwarding,
//!                                    # masquerade); host bits zero, never /0, not the mesh
//! protected = ["10.42.0.0/16", "10.43.0.0/16"]  # never routed over the mesh (K3s pods,
//!                                    # services): routes overlapping them are refused
//! accept = ["192.168.1.0/24"]        # default []: the peers' routes (approved on the
//!                                    # coordinator) this host takes, each inside one of these;
//!                                    # see mesh_proto::routes::refusal for what is never taken
//! nft_table = "meshd"                # our nftables table (family inet), default meshd
//!
//! [dns]                              # optional: mesh DNS on this host's mesh address
//! enable = true                      # default true
//! listen_port = 53                   # default 53 (UDP and TCP)
//! mesh_interface_only = true         # default true: answer only what arrives over the mesh
//!                                    # interface (and this host's own processes); false:
//!                                    # also the mesh address reached over other interfaces
//!
//! [metrics]                          # optional: Prometheus /metrics on the mesh address
//! enable = true                      # default true
//! listen_port = 51873                # default 51873 (not 9586: the WireGuard exporter's)
//! mesh_interface_only = true         # default true, as for [dns]
//! loopback = false                   # default false: also serve 127.0.0.1:listen_port (any
//!                                    # local user can read it then)
//!
//! [integrations.k3s]                 # optional: files meshd keeps for K3s, DRBD, Prometheus,
//! role = "server"                    # /etc/hosts and user templates; see
//!                                    # mesh_proto::config::integrations for every key
//!
//! [[peer]]
//! name = "dock-prod"
//! public_key = "base64..."
//! endpoint = "198.51.100.2:51871"    # optional, IP:port only
//! allowed_ips = ["10.99.99.2/32"]    # host bits must be zero; no overlap between peers
//! persistent_keepalive = 25          # optional, 0 = off
//! ```
//!
//! `host.name` and `host.address` are required on the coordinator (`[coordinator]` present)
//! and when static `[[peer]]` entries are configured; otherwise they may be left out: a host
//! that joins with a token (`meshctl join`, or `daemon.join_token_file`) learns them from the
//! token. Whether a host without them may start (it needs a token or an existing membership)
//! is the daemon's decision.

pub mod error;
pub mod integrations;
pub mod keys;
mod reader;
pub mod secret_file;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::config::error::{ConfigError, ConfigErrors, Location};
use crate::config::integrations::{read_integrations, IntegrationsConfig};
pub use crate::config::keys::{KeyDefault, KnownKey, KnownTable, KNOWN_KEYS, KNOWN_TABLES};
pub use crate::config::reader::SourceMap;
use crate::config::reader::{Reader, Tbl};
use crate::device::{DeviceSpec, PeerSpec};
use crate::key::{PrivateKey, PublicKey};
use crate::{DEFAULT_CONTROL_SOCKET, DEFAULT_INTERFACE, DEFAULT_LISTEN_PORT, DEFAULT_MTU};

/// Default path of the private key file.
pub const DEFAULT_PRIVATE_KEY_FILE: &str = "/etc/meshd/private.key";
/// Default reconcile interval in seconds.
pub const DEFAULT_RECONCILE_INTERVAL_SECS: u64 = 10;
/// Default state directory (membership, cached netmap).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshd";
/// Default path of the coordinator's registry.
pub const DEFAULT_DATABASE: &str = "/var/lib/meshd/coordinator.db";
/// Default persistent keepalive (seconds) from hosts behind NAT.
pub const DEFAULT_KEEPALIVE_SECS: u16 = 25;

/// A validated configuration. Build it with [`parse`]; `Serialize` writes the same TOML format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub host: HostConfig,
    pub daemon: DaemonConfig,
    /// `[coordinator]`: present only on the coordinator host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<CoordinatorConfig>,
    /// `[routes]`: advertised subnets, protected CIDRs, our nftables table.
    pub routes: RoutesConfig,
    /// `[dns]`: mesh DNS.
    pub dns: ServiceConfig,
    /// `[metrics]`: `/metrics`.
    pub metrics: ServiceConfig,
    /// `[integrations]`: the files meshd keeps for K3s, DRBD, Prometheus, `/etc/hosts`.
    /// Not written by `Serialize`: its validated form (defaults resolved, `drbdadm` expanded
    /// into commands) is not the file format.
    #[serde(skip)]
    pub integrations: IntegrationsConfig,
    #[serde(rename = "peer")]
    pub peers: Vec<PeerConfig>,
}

/// Default port of mesh DNS.
pub const DEFAULT_DNS_PORT: u16 = 53;

/// `[dns]` and `[metrics]`: a server on this host's mesh address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ServiceConfig {
    pub enable: bool,
    pub listen_port: u16,
    /// Bind the server's sockets to the mesh interface (SO_BINDTODEVICE): a packet for the
    /// mesh address that arrives on any other interface (an underlay neighbour routing the
    /// mesh prefix to this host) is not answered. Default true.
    pub mesh_interface_only: bool,
    /// `[metrics]` only: also serve `127.0.0.1:listen_port` (for a local Prometheus or agent;
    /// every local user can read it then). Default false; left out when false, as `[dns]`
    /// does not know the key.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub loopback: bool,
}

impl ServiceConfig {
    /// `[dns]` defaults: on, port 53.
    pub fn dns_default() -> Self {
        ServiceConfig {
            enable: true,
            listen_port: DEFAULT_DNS_PORT,
            mesh_interface_only: true,
            loopback: false,
        }
    }

    /// `[metrics]` defaults: on, port 51873.
    pub fn metrics_default() -> Self {
        ServiceConfig {
            enable: true,
            listen_port: crate::handoff::METRICS_PORT,
            mesh_interface_only: true,
            loopback: false,
        }
    }
}

/// `[routes]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoutesConfig {
    /// Subnets this host forwards for the mesh (e.g. the home LAN's NAS).
    pub advertise: Vec<IpNet>,
    /// CIDRs the mesh must never route (K3s pods and services, ...).
    pub protected: Vec<IpNet>,
    /// The peers' routes this host takes (opt-in): a peer's prefix must lie inside one of
    /// these (and clear of everything `mesh_proto::routes::refusal` refuses).
    pub accept: Vec<IpNet>,
    /// Our nftables table, family `inet`.
    pub nft_table: String,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        RoutesConfig {
            advertise: Vec::new(),
            protected: Vec::new(),
            accept: Vec::new(),
            nft_table: crate::routes::DEFAULT_NFT_TABLE.to_string(),
        }
    }
}

/// `[host]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostConfig {
    /// `None` on a host that learns its name when it joins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// This host's mesh address with the mesh prefix length (host bits kept: `10.99.99.1/24`);
    /// `None` on a host that learns its address when it joins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpNet>,
    pub interface: String,
    pub listen_port: u16,
    pub private_key_file: PathBuf,
    pub mtu: u16,
}

/// `[daemon]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DaemonConfig {
    pub control_socket: PathBuf,
    pub backend: BackendKind,
    /// `None`: the daemon picks its default engine binary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_command: Option<PathBuf>,
    pub reconcile_interval_secs: u64,
    /// Membership and cached netmap live here.
    pub state_dir: PathBuf,
    /// Join with the token in this file at first start (unattended installs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join_token_file: Option<PathBuf>,
    /// Rotate the static key this many days after it was created (0: never); see
    /// `crate::rotation::rotation_due_unix`.
    pub rotate_every_days: u32,
    /// The log level when neither `--log-level` nor `RUST_LOG` gives one.
    pub log_level: LogLevel,
}

/// `daemon.log_level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub const ALL: [LogLevel; 5] = [
        LogLevel::Error,
        LogLevel::Warn,
        LogLevel::Info,
        LogLevel::Debug,
        LogLevel::Trace,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Default key rotation period (`daemon.rotate_every_days`).
pub const DEFAULT_ROTATE_EVERY_DAYS: u32 = 30;

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            backend: BackendKind::Auto,
            engine_command: None,
            reconcile_interval_secs: DEFAULT_RECONCILE_INTERVAL_SECS,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            join_token_file: None,
            rotate_every_days: DEFAULT_ROTATE_EVERY_DAYS,
            log_level: LogLevel::Info,
        }
    }
}

/// `[coordinator]`: this host runs the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CoordinatorConfig {
    /// The mesh addresses are handed out of (host bits zero; contains `host.address`).
    pub mesh_cidr: IpNet,
    /// TCP port of the API on the coordinator's mesh address.
    pub api_port: u16,
    /// The coordinator's underlay endpoints, as invitation tokens carry them (non-empty).
    pub public_endpoints: Vec<SocketAddr>,
    /// Never handed out automatically (nor by request).
    pub reserved: Vec<IpNet>,
    /// Persistent keepalive (seconds) used toward peers from hosts behind NAT.
    pub keepalive_secs: u16,
    /// Host name -> address; each inside `mesh_cidr`, not reserved, unique.
    pub static_assignments: BTreeMap<String, IpAddr>,
    /// The registry (SQLite).
    pub database: PathBuf,
}

impl DaemonConfig {
    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_secs(self.reconcile_interval_secs)
    }
}

/// Which WireGuard implementation drives the interface (`daemon.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The kernel's WireGuard when a WireGuard link can be created, else our engine. An
    /// existing interface of either kind is adopted as it is.
    #[default]
    Auto,
    /// The Linux kernel's WireGuard (netlink).
    Kernel,
    /// Our userspace engine (`meshd-wg`, or wireguard-go), driven over UAPI.
    Userspace,
}

impl BackendKind {
    pub const ALL: [BackendKind; 3] = [
        BackendKind::Auto,
        BackendKind::Kernel,
        BackendKind::Userspace,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Kernel => "kernel",
            BackendKind::Userspace => "userspace",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[peer]]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerConfig {
    pub name: String,
    pub public_key: PublicKey,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    /// Host bits are zero (validated); in file order.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds; `Some(0)` means off, as in the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
}

impl Config {
    /// The peers as the reconciler wants them (allowed IPs sorted and de-duplicated, keepalive
    /// 0 normalised to `None`, no preshared key).
    pub fn peer_specs(&self) -> BTreeMap<PublicKey, PeerSpec> {
        self.peers
            .iter()
            .map(|p| {
                let mut allowed_ips: Vec<IpNet> = p.allowed_ips.iter().map(IpNet::trunc).collect();
                allowed_ips.sort();
                allowed_ips.dedup();
                (
                    p.public_key,
                    PeerSpec {
                        public_key: p.public_key,
                        preshared_key: None,
                        endpoint: p.endpoint,
                        allowed_ips,
                        persistent_keepalive: p.persistent_keepalive.filter(|k| *k != 0),
                    },
                )
            })
            .collect()
    }

    /// The whole device spec, given the private key the daemon read from `private_key_file`.
    pub fn device_spec(&self, private_key: PrivateKey) -> DeviceSpec {
        DeviceSpec {
            private_key,
            listen_port: self.host.listen_port,
            fwmark: None,
            peers: self.peer_specs(),
        }
    }

    /// This host's name, when configured (`None` on a host that learns it when it joins).
    pub fn host_name(&self) -> Option<&str> {
        self.host.name.as_deref()
    }

    /// This host's mesh address (without prefix length), when configured.
    pub fn mesh_address(&self) -> Option<IpAddr> {
        self.host.address.map(|a| a.addr())
    }

    /// The mesh prefix (`10.99.99.0/24`): from `host.address`, else `[coordinator] mesh_cidr`.
    pub fn mesh_prefix(&self) -> Option<IpNet> {
        self.host
            .address
            .map(|a| a.trunc())
            .or_else(|| self.coordinator.as_ref().map(|c| c.mesh_cidr))
    }

    /// Whether this host runs the coordinator.
    pub fn is_coordinator(&self) -> bool {
        self.coordinator.is_some()
    }

    /// The configured name of a peer.
    pub fn peer_name(&self, key: &PublicKey) -> Option<&str> {
        self.peers
            .iter()
            .find(|p| p.public_key == *key)
            .map(|p| p.name.as_str())
    }

    /// The configured peer with this public key.
    pub fn peer(&self, key: &PublicKey) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.public_key == *key)
    }
}

// ---- reading the file ----

const TOP_KEYS: [&str; 8] = [
    "host",
    "daemon",
    "coordinator",
    "routes",
    "dns",
    "metrics",
    "integrations",
    "peer",
];

/// Parse and validate a configuration. `origin` names the file in error messages. Every
/// error of the file is reported (a syntax error alone: the rest cannot be read).
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
    parse_located(text, origin).map(|(config, _)| config)
}

/// [`parse`], and where each key read sits in the file: for checks made after parsing (the
/// daemon's `--check-config` looks for the integrations' programs and templates) to report
/// in the same `FILE:LINE:COL: KEY: message` form.
pub fn parse_located(text: &str, origin: &str) -> Result<(Config, SourceMap), ConfigErrors> {
    let doc = Reader::document(origin, text)?;
    let mut r = Reader::new(origin, text);
    let root = r.root(&doc);
    r.known_keys(&root, &TOP_KEYS);

    let host_table = r.table(&root, "host");
    let host = read_host(&mut r, host_table.as_ref());
    let daemon = match r.table(&root, "daemon") {
        None => DaemonConfig::default(),
        Some(t) => read_daemon(&mut r, &t),
    };
    let mut peers: Vec<(String, PeerConfig)> = Vec::new();
    let peer_tables = r.tables(&root, "peer");
    let peer_count = peer_tables.len();
    let mut names_seen = BTreeSet::new();
    for t in peer_tables {
        if let Some(p) = read_peer(&mut r, t, &mut names_seen) {
            peers.push(p);
        }
    }
    let coordinator = r
        .table(&root, "coordinator")
        .and_then(|t| read_coordinator(&mut r, &t));
    let why = if root.has("coordinator") {
        Some("on the coordinator ([coordinator] is present)")
    } else if peer_count > 0 {
        Some("with static [[peer]] entries")
    } else {
        None
    };
    if let Some(why) = why {
        // Only when absent: a present but refused value has its own error.
        let has = |k: &str| host_table.as_ref().is_some_and(|t| t.has(k));
        if !has("name") {
            r.error(
                "host.name",
                format!(
                    "is missing: this host's name is required {why}, e.g. name = \"dock-load\"; \
                     only a host that joins with a token may leave it out"
                ),
            );
        }
        if !has("address") {
            r.error(
                "host.address",
                format!(
                    "is missing: this host's mesh address is required {why}, e.g. address = \
                     \"10.99.99.1/24\"; only a host that joins with a token may leave it out"
                ),
            );
        }
    }
    if let Some(c) = &coordinator {
        check_coordinator(&mut r, &host, c);
    }
    check_peers(&mut r, &host, &peers);
    let routes = match r.table(&root, "routes") {
        None => RoutesConfig::default(),
        Some(t) => read_routes(&mut r, &t, &host, &peers),
    };
    let dns = read_service(&mut r, &root, "dns", ServiceConfig::dns_default());
    let metrics = read_service(&mut r, &root, "metrics", ServiceConfig::metrics_default());
    if dns.enable && metrics.enable && dns.listen_port == metrics.listen_port {
        r.error(
            "metrics.listen_port",
            format!(
                "{} is dns.listen_port too; give the two servers different ports",
                metrics.listen_port
            ),
        );
    }
    let integrations = match r.table(&root, "integrations") {
        None => IntegrationsConfig::default(),
        Some(t) => read_integrations(&mut r, &t),
    };
    let map = r.finish()?;
    let config = Config {
        host,
        daemon,
        coordinator,
        routes,
        dns,
        metrics,
        integrations,
        peers: peers.into_iter().map(|(_, p)| p).collect(),
    };
    Ok((config, map))
}

fn read_service(
    r: &mut Reader<'_>,
    root: &Tbl<'_>,
    name: &str,
    default: ServiceConfig,
) -> ServiceConfig {
    let Some(t) = r.table(root, name) else {
        return default;
    };
    // Mesh DNS is for the mesh (and the host's resolver, which reaches the mesh address);
    // only /metrics offers loopback.
    let keys: &[&str] = match name {
        "metrics" => &["enable", "listen_port", "mesh_interface_only", "loopback"],
        _ => &["enable", "listen_port", "mesh_interface_only"],
    };
    r.known_keys(&t, keys);
    ServiceConfig {
        enable: r.bool(&t, "enable").unwrap_or(default.enable),
        listen_port: ranged(r, &t, "listen_port", 1, 65535, "a port", "")
            .unwrap_or(default.listen_port),
        mesh_interface_only: r
            .bool(&t, "mesh_interface_only")
            .unwrap_or(default.mesh_interface_only),
        loopback: match name {
            "metrics" => r.bool(&t, "loopback").unwrap_or(default.loopback),
            _ => false,
        },
    }
}

/// A whole number in `lo..=hi`; out of range it is refused in words: `{what} is {lo} to
/// {hi}{hint}` ("a port is 1 to 65535").
fn ranged<T: TryFrom<i64>>(
    r: &mut Reader<'_>,
    t: &Tbl<'_>,
    name: &str,
    lo: i64,
    hi: i64,
    what: &str,
    hint: &str,
) -> Option<T> {
    let value = r.int(t, name)?;
    if value < lo || value > hi {
        r.error(
            t.child(name),
            format!("{value} is out of range; {what} is {lo} to {hi}{hint}"),
        );
        return None;
    }
    T::try_from(value).ok()
}

/// A path that must not be empty.
fn path(r: &mut Reader<'_>, t: &Tbl<'_>, name: &str) -> Option<PathBuf> {
    let value = r.string(t, name)?;
    if value.trim().is_empty() {
        r.error(t.child(name), "must not be empty; give a path");
        return None;
    }
    Some(PathBuf::from(value))
}

/// A string checked by `check`; its refusal is the error of `t.name`.
fn checked<T, E: ToString>(
    r: &mut Reader<'_>,
    t: &Tbl<'_>,
    name: &str,
    check: impl FnOnce(&str) -> Result<T, E>,
) -> Option<T> {
    let value = r.string(t, name)?;
    match check(&value) {
        Ok(v) => Some(v),
        Err(e) => {
            r.error(t.child(name), e);
            None
        }
    }
}

fn read_host(r: &mut Reader<'_>, t: Option<&Tbl<'_>>) -> HostConfig {
    let default = HostConfig {
        name: None,
        address: None,
        interface: DEFAULT_INTERFACE.to_string(),
        listen_port: DEFAULT_LISTEN_PORT,
        private_key_file: PathBuf::from(DEFAULT_PRIVATE_KEY_FILE),
        mtu: DEFAULT_MTU,
    };
    let Some(t) = t else {
        return default;
    };
    r.known_keys(
        t,
        &[
            "name",
            "address",
            "interface",
            "listen_port",
            "private_key_file",
            "mtu",
        ],
    );
    HostConfig {
        name: checked(r, t, "name", |n| validate_name(n).map(|()| n.to_string())),
        address: checked(r, t, "address", validate_host_address),
        interface: checked(r, t, "interface", |n| {
            validate_interface(n).map(|()| n.to_string())
        })
        .unwrap_or(default.interface),
        listen_port: ranged(
            r,
            t,
            "listen_port",
            1,
            65535,
            "a port",
            " (0 would pick a random port; peers need a fixed one)",
        )
        .unwrap_or(default.listen_port),
        private_key_file: path(r, t, "private_key_file").unwrap_or(default.private_key_file),
        mtu: ranged(
            r,
            t,
            "mtu",
            1280,
            9000,
            "the MTU",
            " (IPv6 needs at least 1280; WireGuard over a 1500 underlay is 1420)",
        )
        .unwrap_or(default.mtu),
    }
}

fn validate_host_address(text: &str) -> Result<IpNet, String> {
    let address: IpNet = text.parse().map_err(|_| {
        format!(
            "{text:?} is not an address with prefix length; write this host's mesh address \
             and the mesh prefix, e.g. \"10.99.99.1/24\""
        )
    })?;
    if let IpNet::V4(v4) = address {
        if v4.prefix_len() < 31 && (v4.addr() == v4.network() || v4.addr() == v4.broadcast()) {
            return Err(format!(
                "{address} is the network or broadcast address of {}; use a host address \
                 inside the mesh prefix, e.g. \"10.99.99.1/24\"",
                address.trunc()
            ));
        }
    }
    Ok(address)
}

fn read_daemon(r: &mut Reader<'_>, t: &Tbl<'_>) -> DaemonConfig {
    let d = DaemonConfig::default();
    r.known_keys(
        t,
        &[
            "control_socket",
            "backend",
            "engine_command",
            "reconcile_interval_secs",
            "state_dir",
            "join_token_file",
            "rotate_every_days",
            "log_level",
        ],
    );
    let log_level = checked(r, t, "log_level", |text| {
        LogLevel::ALL
            .into_iter()
            .find(|l| l.as_str() == text)
            .ok_or_else(|| {
                format!("{text:?} is not a log level; use error, warn, info, debug or trace")
            })
    });
    let backend = checked(r, t, "backend", |text| {
        BackendKind::ALL
            .into_iter()
            .find(|b| b.as_str() == text)
            .ok_or_else(|| {
                format!("{text:?} is not a backend; use \"auto\", \"kernel\" or \"userspace\"")
            })
    });
    DaemonConfig {
        control_socket: path(r, t, "control_socket").unwrap_or(d.control_socket),
        backend: backend.unwrap_or(d.backend),
        engine_command: path(r, t, "engine_command"),
        reconcile_interval_secs: ranged(
            r,
            t,
            "reconcile_interval_secs",
            1,
            3600,
            "the reconcile interval",
            " seconds",
        )
        .unwrap_or(d.reconcile_interval_secs),
        state_dir: path(r, t, "state_dir").unwrap_or(d.state_dir),
        join_token_file: path(r, t, "join_token_file"),
        rotate_every_days: ranged(
            r,
            t,
            "rotate_every_days",
            0,
            3650,
            "the rotation period",
            " days (0 turns scheduled rotation off)",
        )
        .unwrap_or(d.rotate_every_days),
        log_level: log_level.unwrap_or(d.log_level),
    }
}

fn read_coordinator(r: &mut Reader<'_>, t: &Tbl<'_>) -> Option<CoordinatorConfig> {
    r.known_keys(
        t,
        &[
            "mesh_cidr",
            "api_port",
            "public_endpoints",
            "reserved",
            "keepalive_secs",
            "static_assignments",
            "database",
        ],
    );
    if !t.has("mesh_cidr") {
        r.missing(
            t,
            "mesh_cidr",
            "the coordinator hands out addresses from it, e.g. mesh_cidr = \"10.99.99.0/24\"",
        );
    }
    let mesh_cidr = checked(r, t, "mesh_cidr", |s| parse_prefix(s, "10.99.99.0/24"));
    let api_port = ranged(r, t, "api_port", 1, 65535, "a port", "")
        .unwrap_or(crate::wire::api::DEFAULT_API_PORT);
    let endpoints_example = "[\"198.51.100.1:51871\"]";
    let mut public_endpoints: Vec<SocketAddr> = Vec::new();
    if !t.has("public_endpoints") {
        r.missing(
            t,
            "public_endpoints",
            "list the IP:port where joining hosts reach this host, e.g. public_endpoints = \
             [\"198.51.100.1:51871\"]",
        );
    } else if let Some(list) = r.strings(t, "public_endpoints", endpoints_example) {
        if list.is_empty() {
            r.error(
                t.child("public_endpoints"),
                "must list at least one IP:port where joining hosts reach this host, e.g. \
                 [\"198.51.100.1:51871\"]",
            );
        }
        for (i, e) in list.iter().enumerate() {
            let key = format!("{}[{i}]", t.child("public_endpoints"));
            match parse_endpoint(e) {
                Err(m) => r.error(key, m),
                Ok(a) if public_endpoints.contains(&a) => {
                    r.error(key, format!("{a} is listed twice"))
                }
                Ok(a) => public_endpoints.push(a),
            }
        }
    }
    let mut reserved = Vec::new();
    for (i, s) in r
        .strings(t, "reserved", "[\"10.99.99.0/28\"]")
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        match parse_allowed_ip(s) {
            Ok(n) => reserved.push(n),
            Err(m) => r.error(format!("{}[{i}]", t.child("reserved")), m),
        }
    }
    let keepalive_secs = ranged(
        r,
        t,
        "keepalive_secs",
        1,
        65535,
        "the keepalive",
        " seconds (25 is usual behind NAT)",
    )
    .unwrap_or(DEFAULT_KEEPALIVE_SECS);
    let mut static_assignments = BTreeMap::new();
    if let Some(sa) = r.table(t, "static_assignments") {
        let mut by_address: BTreeMap<IpAddr, String> = BTreeMap::new();
        for (name, _) in sa.entries() {
            let key = sa.child(name);
            let Some(addr) = r.string(&sa, name) else {
                continue;
            };
            if let Err(m) = validate_name(name) {
                r.error(key, m);
                continue;
            }
            let ip: IpAddr = match addr.parse() {
                Ok(ip) => ip,
                Err(_) => {
                    r.error(
                        key,
                        format!(
                            "{addr:?} is not an address (no prefix length), e.g. \"10.99.99.2\""
                        ),
                    );
                    continue;
                }
            };
            if let Some(mesh_cidr) = mesh_cidr {
                if let Err(e) = crate::alloc::check_address(mesh_cidr, &reserved, ip) {
                    r.error(key, e);
                    continue;
                }
            }
            if let Some(other) = by_address.insert(ip, name.to_string()) {
                r.error(
                    key,
                    format!(
                        "{ip} is already assigned to {other:?}; each host needs its own address"
                    ),
                );
                continue;
            }
            static_assignments.insert(name.to_string(), ip);
        }
    }
    let database = path(r, t, "database").unwrap_or_else(|| PathBuf::from(DEFAULT_DATABASE));
    Some(CoordinatorConfig {
        mesh_cidr: mesh_cidr?,
        api_port,
        public_endpoints,
        reserved,
        keepalive_secs,
        static_assignments,
        database,
    })
}

/// The coordinator's own address must be inside the mesh and agree with the assignments.
fn check_coordinator(r: &mut Reader<'_>, host: &HostConfig, c: &CoordinatorConfig) {
    let Some(address) = host.address else {
        return;
    };
    let own = address.addr();
    if !c.mesh_cidr.contains(&own) {
        r.error(
            "host.address",
            format!(
                "{own} is not inside the mesh {} (coordinator.mesh_cidr)",
                c.mesh_cidr
            ),
        );
    }
    for (name, ip) in &c.static_assignments {
        let key = format!("coordinator.static_assignments.{name}");
        let ours = host.name.as_deref() == Some(name.as_str());
        if ours && *ip != own {
            r.error(
                key,
                format!("{ip} is not this host's own address {own} (host.address)"),
            );
        } else if !ours && *ip == own {
            r.error(
                key,
                format!("{ip} is this host's own address (host.address)"),
            );
        }
    }
}

/// One `[[peer]]`, keyed by its name (`peer "nas"`) once the name is valid and not taken by
/// an earlier peer, else by its position (`peer[3]`).
fn read_peer(
    r: &mut Reader<'_>,
    t: Tbl<'_>,
    names_seen: &mut BTreeSet<String>,
) -> Option<(String, PeerConfig)> {
    let name = r.string(&t, "name");
    let t = match &name {
        Some(n) if validate_name(n).is_ok() && names_seen.contains(n) => {
            r.error(
                t.child("name"),
                format!("{n:?} is already the name of peer {n:?}; each peer needs its own name"),
            );
            t
        }
        Some(n) if validate_name(n).is_ok() => {
            names_seen.insert(n.clone());
            let named = format!("peer {n:?}");
            r.alias(&named, &t.key);
            r.alias(&format!("{named}.name"), &t.child("name"));
            t.renamed(named)
        }
        _ => t,
    };
    r.known_keys(
        &t,
        &[
            "name",
            "public_key",
            "endpoint",
            "allowed_ips",
            "persistent_keepalive",
        ],
    );
    let name = match name {
        None => {
            if !t.has("name") {
                r.missing(
                    &t,
                    "name",
                    "each [[peer]] needs a name (a DNS label), e.g. name = \"nas\"",
                );
            }
            None
        }
        Some(n) => match validate_name(&n) {
            Ok(()) => Some(n),
            Err(m) => {
                r.error(t.child("name"), m);
                None
            }
        },
    };
    if !t.has("public_key") {
        r.missing(
            &t,
            "public_key",
            "each [[peer]] needs its WireGuard public key, as `wg pubkey` prints it",
        );
    }
    let public_key = checked(r, &t, "public_key", |s| {
        s.parse::<PublicKey>().map_err(|_| {
            format!(
                "{s:?} is not a WireGuard public key; expected 44 characters of base64 as \
                 printed by `wg pubkey`"
            )
        })
    });
    let endpoint = checked(r, &t, "endpoint", parse_endpoint);
    let mut allowed_ips = Vec::new();
    let mut allowed_ok = true;
    if !t.has("allowed_ips") {
        allowed_ok = false;
        r.missing(
            &t,
            "allowed_ips",
            "each [[peer]] needs the addresses it routes, e.g. allowed_ips = \
             [\"10.99.99.2/32\"]",
        );
    } else if let Some(list) = r.strings(&t, "allowed_ips", "[\"10.99.99.2/32\"]") {
        if list.is_empty() {
            allowed_ok = false;
            r.error(
                t.child("allowed_ips"),
                "must list at least one prefix, e.g. [\"10.99.99.2/32\"]",
            );
        }
        for (j, s) in list.iter().enumerate() {
            match parse_allowed_ip(s) {
                Ok(net) => allowed_ips.push(net),
                Err(m) => {
                    allowed_ok = false;
                    r.error(format!("{}[{j}]", t.child("allowed_ips")), m);
                }
            }
        }
    } else {
        allowed_ok = false;
    }
    let keepalive_ok = !t.has("persistent_keepalive");
    let persistent_keepalive = ranged(
        r,
        &t,
        "persistent_keepalive",
        0,
        65535,
        "the keepalive",
        " seconds (0 = off, 25 is usual behind NAT)",
    );
    let keepalive_ok = keepalive_ok || persistent_keepalive.is_some();
    if !(allowed_ok && keepalive_ok) {
        return None;
    }
    Some((
        t.key.clone(),
        PeerConfig {
            name: name?,
            public_key: public_key?,
            endpoint: match t.has("endpoint") {
                true => Some(endpoint?),
                false => None,
            },
            allowed_ips,
            persistent_keepalive,
        },
    ))
}

/// Checks across the peers (names, keys, overlaps), each error at the later peer's value.
fn check_peers(r: &mut Reader<'_>, host: &HostConfig, peers: &[(String, PeerConfig)]) {
    let own = host.address.map(|a| a.addr());
    let mut keys: BTreeMap<PublicKey, usize> = BTreeMap::new();
    for (i, (key, p)) in peers.iter().enumerate() {
        if host.name.as_deref() == Some(p.name.as_str()) {
            r.error(
                format!("{key}.name"),
                format!("{:?} is this host's own name (host.name)", p.name),
            );
        }
        if let Some(j) = keys.insert(p.public_key, i) {
            r.error(
                format!("{key}.public_key"),
                format!(
                    "{} is already the key of {}; each peer needs its own key",
                    p.public_key, peers[j].0
                ),
            );
        }
        for (k, net) in p.allowed_ips.iter().enumerate() {
            if let Some(own) = own.filter(|own| net.contains(own)) {
                r.error(
                    format!("{key}.allowed_ips[{k}]"),
                    format!(
                        "{net} contains this host's own address {own} (host.address); traffic \
                         to ourselves would be sent to peer {:?}",
                        p.name
                    ),
                );
            }
        }
    }
    // Overlaps between peers: WireGuard maps an allowed IP to exactly one peer.
    for (i, (key, p)) in peers.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for (qkey, q) in peers.iter().take(i) {
            for a in &q.allowed_ips {
                for (k, b) in p.allowed_ips.iter().enumerate() {
                    if (a.contains(b) || b.contains(a)) && seen.insert(k) {
                        r.error(
                            format!("{key}.allowed_ips[{k}]"),
                            format!(
                                "{b} of peer {:?} overlaps {a} of {qkey}; an address can route \
                                 to one peer only",
                                p.name
                            ),
                        );
                    }
                }
            }
        }
    }
}

fn read_routes(
    r: &mut Reader<'_>,
    t: &Tbl<'_>,
    host: &HostConfig,
    peers: &[(String, PeerConfig)],
) -> RoutesConfig {
    use crate::routes::overlaps;
    r.known_keys(t, &["advertise", "protected", "accept", "nft_table"]);
    let mesh = host.address.map(|a| a.trunc());
    let prefixes = |r: &mut Reader<'_>, name: &str, example: &str| -> Vec<(String, IpNet)> {
        let mut out = Vec::new();
        for (i, s) in r
            .strings(t, name, example)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let key = format!("{}[{i}]", t.child(name));
            match parse_allowed_ip(s) {
                Ok(net) => out.push((key, net)),
                Err(m) => r.error(key, m),
            }
        }
        out
    };
    let mut protected = Vec::new();
    for (key, net) in prefixes(r, "protected", "[\"10.42.0.0/16\"]") {
        if let Some(m) = mesh.filter(|m| overlaps(m, &net)) {
            r.error(
                key,
                format!(
                    "{net} overlaps the mesh {m} (host.address); the mesh itself cannot be \
                     protected from the mesh"
                ),
            );
            continue;
        }
        protected.push(net);
    }
    let mut advertise: Vec<IpNet> = Vec::new();
    for (key, net) in prefixes(r, "advertise", "[\"192.168.1.0/24\"]") {
        let why = if net.prefix_len() == 0 {
            Some(format!(
                "{net} is a default route; meshd advertises subnets, never a /0"
            ))
        } else if let Some(m) = mesh.filter(|m| overlaps(m, &net)) {
            Some(format!(
                "{net} overlaps the mesh {m} (host.address); advertise subnets outside it"
            ))
        } else if let Some(p) = protected.iter().find(|p| overlaps(p, &net)) {
            Some(format!(
                "{net} overlaps routes.protected {p}; remove one of them"
            ))
        } else {
            advertise
                .iter()
                .find(|o| overlaps(o, &net))
                .map(|o| format!("{net} overlaps {o}, listed before it"))
        };
        match why {
            Some(why) => r.error(key, why),
            None => advertise.push(net),
        }
    }
    let mut accept: Vec<IpNet> = Vec::new();
    for (key, net) in prefixes(r, "accept", "[\"192.168.1.0/24\"]") {
        let why = if net.prefix_len() == 0 {
            Some(format!(
                "{net} is a default route; meshd never takes a default route from a peer: \
                 list the subnets to accept"
            ))
        } else if let Some(m) = mesh.filter(|m| overlaps(m, &net)) {
            Some(format!(
                "{net} overlaps the mesh {m} (host.address); the mesh needs no accepting, list \
                 subnets outside it"
            ))
        } else if let Some(p) = protected.iter().find(|p| overlaps(p, &net)) {
            Some(format!(
                "{net} overlaps routes.protected {p}; remove one of them"
            ))
        } else {
            advertise.iter().find(|o| overlaps(o, &net)).map(|o| {
                format!("{net} overlaps routes.advertise {o}: this host routes that subnet itself")
            })
        };
        match why {
            Some(why) => r.error(key, why),
            None => accept.push(net),
        }
    }
    for (pkey, p) in peers {
        for (k, net) in p.allowed_ips.iter().enumerate() {
            if let Some(pr) = protected.iter().find(|pr| overlaps(pr, net)) {
                r.error(
                    format!("{pkey}.allowed_ips[{k}]"),
                    format!(
                        "{net} of peer {:?} overlaps routes.protected {pr}; it would be routed \
                         over the mesh",
                        p.name
                    ),
                );
            }
        }
    }
    let nft_table = checked(r, t, "nft_table", |t| {
        let ok = !t.is_empty()
            && t.len() <= 64
            && t.starts_with(|c: char| c.is_ascii_alphabetic())
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if ok {
            Ok(t.to_string())
        } else {
            Err(format!(
                "{t:?} is not a table name: a letter, then letters, digits, '_' or '-' (at most \
                 64), e.g. \"meshd\""
            ))
        }
    })
    .unwrap_or_else(|| crate::routes::DEFAULT_NFT_TABLE.to_string());
    RoutesConfig {
        advertise,
        protected,
        accept,
        nft_table,
    }
}

/// Why one value of the file is refused: the message a [`ConfigError`] carries for its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{0:?} must be 1 to 63 characters long (it is {len})", len = .0.len())]
    NameLength(String),
    #[error(
        "{name:?} contains {found:?}; use lowercase letters, digits and '-' only (a DNS label)"
    )]
    NameCharacter { name: String, found: char },
    #[error("{0:?} must not start or end with '-'")]
    NameDash(String),
    #[error("{0:?} must be 1 to 15 characters long (Linux IFNAMSIZ), it is {len}", len = .0.len())]
    InterfaceLength(String),
    #[error("{0:?} is not a valid interface name")]
    InterfaceDots(String),
    #[error("{name:?} contains {found:?}; use letters, digits, '_', '.' and '-' only")]
    InterfaceCharacter { name: String, found: char },
    #[error("{0:?} has port 0; give the peer's listen port")]
    EndpointPortZero(String),
    #[error("{0:?} has no port; {ENDPOINT_FORMS}")]
    EndpointNoPort(String),
    #[error("{0:?} is not an IP:port; {ENDPOINT_FORMS}")]
    EndpointNotAddress(String),
    #[error("port {port} is out of range; a port is 1 to 65535")]
    EndpointPortRange { port: String },
    #[error("{text:?} has no prefix length; did you mean \"{text}/{host_len}\"?")]
    PrefixNoLength { text: String, host_len: u8 },
    #[error("{text:?} is not a prefix like \"{example}\"")]
    NotPrefix { text: String, example: &'static str },
    #[error(
        "{net} has host bits set; did you mean \"{addr}/{host_len}\" (one host) or \"{network}\" \
         (the whole network)?",
        addr = .net.addr(),
        network = .net.trunc()
    )]
    PrefixHostBits { net: IpNet, host_len: u8 },
}

const ENDPOINT_FORMS: &str = "only IP:port is accepted (hostnames are not resolved), e.g. \
                              \"198.51.100.2:51871\" or \"[2001:db8::1]:51871\"";

fn validate_name(name: &str) -> Result<(), ValueError> {
    if name.is_empty() || name.len() > 63 {
        return Err(ValueError::NameLength(name.to_string()));
    }
    if let Some(found) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(ValueError::NameCharacter {
            name: name.to_string(),
            found,
        });
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(ValueError::NameDash(name.to_string()));
    }
    Ok(())
}

fn validate_interface(name: &str) -> Result<(), ValueError> {
    if name.is_empty() || name.len() > 15 {
        return Err(ValueError::InterfaceLength(name.to_string()));
    }
    if name == "." || name == ".." {
        return Err(ValueError::InterfaceDots(name.to_string()));
    }
    if let Some(found) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(ValueError::InterfaceCharacter {
            name: name.to_string(),
            found,
        });
    }
    Ok(())
}

fn parse_endpoint(s: &str) -> Result<SocketAddr, ValueError> {
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => Err(ValueError::EndpointPortZero(s.to_string())),
        Ok(a) => Ok(a),
        Err(_) if s.parse::<IpAddr>().is_ok() => Err(ValueError::EndpointNoPort(s.to_string())),
        Err(_) => {
            Err(endpoint_port_range(s)
                .unwrap_or_else(|| ValueError::EndpointNotAddress(s.to_string())))
        }
    }
}

/// An IP address and a port number too large for a port (`192.168.1.20:99999`): said so,
/// rather than "not an IP:port".
fn endpoint_port_range(s: &str) -> Option<ValueError> {
    let (ip, port) = s.rsplit_once(':')?;
    let ip = ip
        .strip_prefix('[')
        .and_then(|i| i.strip_suffix(']'))
        .unwrap_or(ip);
    let is_ip = ip.parse::<std::net::Ipv4Addr>().is_ok()
        || (s.starts_with('[') && ip.parse::<std::net::Ipv6Addr>().is_ok());
    let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    (is_ip && digits).then(|| ValueError::EndpointPortRange {
        port: port.to_string(),
    })
}

fn host_len(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn parse_allowed_ip(s: &str) -> Result<IpNet, ValueError> {
    parse_prefix(s, "10.99.99.2/32")
}

/// A prefix without host bits; `example` is shown when `s` is not a prefix at all.
fn parse_prefix(s: &str, example: &'static str) -> Result<IpNet, ValueError> {
    let net: IpNet = match s.parse() {
        Ok(n) => n,
        Err(_) => {
            return Err(match s.parse::<IpAddr>() {
                Ok(a) => ValueError::PrefixNoLength {
                    text: s.to_string(),
                    host_len: host_len(&a),
                },
                Err(_) => ValueError::NotPrefix {
                    text: s.to_string(),
                    example,
                },
            })
        }
    };
    if net != net.trunc() {
        return Err(ValueError::PrefixHostBits {
            host_len: host_len(&net.addr()),
            net,
        });
    }
    Ok(net)
}

// ---- locating syntax errors ----

fn strip_comment(line: &str) -> &str {
    // Good enough for locating keys: '#' inside strings is rare in this format.
    match line.find('#') {
        Some(i) => &line[..i],
        None => line,
    }
}

fn bare_key(s: &str) -> Option<String> {
    let k = s.trim().trim_matches('"').trim_matches('\'');
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        Some(k.to_string())
    } else {
        None
    }
}

/// The dotted key path (`peer[1].endpoint`, `host`) of the line `line_no` (1-based): the
/// key a syntax error names, found without the parser (which refused the file).
fn locate_key(text: &str, line_no: usize) -> Option<String> {
    let mut table: Option<String> = None;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut last_key: Option<String> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = strip_comment(raw).trim();
        let is_target = n + 1 == line_no;
        if let Some(inner) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            let name = inner.trim().to_string();
            let c = counts.entry(name.clone()).or_insert(0);
            table = Some(format!("{name}[{c}]"));
            *c += 1;
            last_key = None;
        } else if let Some(inner) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = Some(inner.trim().to_string());
            last_key = None;
        } else if let Some((k, _)) = line.split_once('=') {
            if let Some(k) = bare_key(k) {
                last_key = Some(k);
            }
        }
        if is_target {
            return match (&table, &last_key) {
                (Some(t), Some(k)) => Some(format!("{t}.{k}")),
                (Some(t), None) => Some(t.clone()),
                (None, Some(k)) => Some(k.clone()),
                (None, None) => None,
            };
        }
    }
    table
}

#[cfg(test)]
mod tests;
