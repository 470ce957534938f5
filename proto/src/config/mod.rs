//! meshd's TOML configuration (`/etc/meshd/meshd.toml`): types, parsing and validation.
//! Pure: the daemon reads the file and hands the text and its path here.
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
//! listen_port = 9586                 # default 9586 (the WireGuard exporter's port)
//! mesh_interface_only = true         # default true, as for [dns]
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

pub mod integrations;
pub mod secret_file;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::integrations::{parse_integrations, IntegrationsConfig};
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
}

impl ServiceConfig {
    /// `[dns]` defaults: on, port 53.
    pub fn dns_default() -> Self {
        ServiceConfig {
            enable: true,
            listen_port: DEFAULT_DNS_PORT,
            mesh_interface_only: true,
        }
    }

    /// `[metrics]` defaults: on, port 9586.
    pub fn metrics_default() -> Self {
        ServiceConfig {
            enable: true,
            listen_port: crate::handoff::METRICS_PORT,
            mesh_interface_only: true,
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

/// A refused configuration: which file, which key (`peer[2].public_key`, `host.address`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}: {}: {}", self.file, key, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

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

// ---- raw file format ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    host: Option<RawHost>,
    #[serde(default)]
    daemon: Option<RawDaemon>,
    #[serde(default)]
    coordinator: Option<RawCoordinator>,
    #[serde(default)]
    routes: Option<RawRoutes>,
    #[serde(default)]
    dns: Option<RawService>,
    #[serde(default)]
    metrics: Option<RawService>,
    /// Validated by `integrations::parse_integrations` (its errors name the key).
    #[serde(default)]
    integrations: Option<toml::Value>,
    #[serde(default, rename = "peer")]
    peers: Vec<RawPeer>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawService {
    enable: Option<bool>,
    listen_port: Option<i64>,
    mesh_interface_only: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: Option<String>,
    address: Option<String>,
    interface: Option<String>,
    listen_port: Option<i64>,
    private_key_file: Option<String>,
    mtu: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    control_socket: Option<String>,
    backend: Option<String>,
    engine_command: Option<String>,
    reconcile_interval_secs: Option<i64>,
    state_dir: Option<String>,
    join_token_file: Option<String>,
    rotate_every_days: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    mesh_cidr: String,
    api_port: Option<i64>,
    public_endpoints: Vec<String>,
    #[serde(default)]
    reserved: Vec<String>,
    keepalive_secs: Option<i64>,
    #[serde(default)]
    static_assignments: BTreeMap<String, String>,
    database: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRoutes {
    #[serde(default)]
    advertise: Vec<String>,
    #[serde(default)]
    protected: Vec<String>,
    #[serde(default)]
    accept: Vec<String>,
    nft_table: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    public_key: String,
    endpoint: Option<String>,
    allowed_ips: Vec<String>,
    persistent_keepalive: Option<i64>,
}

struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn err(&self, key: impl Into<String>, message: impl ToString) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            key: Some(key.into()),
            message: message.to_string(),
        }
    }
}

/// Parse and validate a configuration. `origin` names the file in error messages.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(text, origin, &e))?;
    let cx = Ctx { file: origin };

    let host = validate_host(&cx, raw.host.unwrap_or_default())?;
    let daemon = validate_daemon(&cx, raw.daemon.unwrap_or_default())?;
    let mut peers = Vec::with_capacity(raw.peers.len());
    for (i, p) in raw.peers.into_iter().enumerate() {
        peers.push(validate_peer(&cx, i, p)?);
    }
    let coordinator = match raw.coordinator {
        None => None,
        Some(c) => Some(validate_coordinator(&cx, c)?),
    };
    let why = if coordinator.is_some() {
        Some("on the coordinator ([coordinator] is present)")
    } else if !peers.is_empty() {
        Some("with static [[peer]] entries")
    } else {
        None
    };
    if let Some(why) = why {
        if host.name.is_none() {
            return Err(cx.err(
                "host.name",
                format!(
                    "missing field `name`: this host's name is required {why}; only a host \
                     that joins with a token may leave it out"
                ),
            ));
        }
        if host.address.is_none() {
            return Err(cx.err(
                "host.address",
                format!(
                    "missing field `address`: this host's mesh address is required {why}, \
                     e.g. \"10.99.99.1/24\"; only a host that joins with a token may leave it out"
                ),
            ));
        }
    }
    if let Some(c) = &coordinator {
        check_coordinator(&cx, &host, c)?;
    }
    check_peers(&cx, &host, &peers)?;
    let routes = validate_routes(&cx, &host, &peers, raw.routes.unwrap_or_default())?;
    let dns = validate_service(&cx, "dns", raw.dns, ServiceConfig::dns_default())?;
    let metrics = validate_service(
        &cx,
        "metrics",
        raw.metrics,
        ServiceConfig::metrics_default(),
    )?;
    if dns.enable && metrics.enable && dns.listen_port == metrics.listen_port {
        return Err(cx.err(
            "metrics.listen_port",
            format!(
                "{} is dns.listen_port too; give the two servers different ports",
                metrics.listen_port
            ),
        ));
    }
    let integrations = match raw.integrations {
        None => IntegrationsConfig::default(),
        Some(v) => parse_integrations(&v).map_err(|e| cx.err(e.key, e.message))?,
    };
    Ok(Config {
        host,
        daemon,
        coordinator,
        routes,
        dns,
        metrics,
        integrations,
        peers,
    })
}

fn validate_service(
    cx: &Ctx<'_>,
    table: &str,
    raw: Option<RawService>,
    default: ServiceConfig,
) -> Result<ServiceConfig, ConfigError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    let listen_port = match raw.listen_port {
        None => default.listen_port,
        Some(p) => ranged(cx, &format!("{table}.listen_port"), p, 1, 65535, "")?,
    };
    Ok(ServiceConfig {
        enable: raw.enable.unwrap_or(default.enable),
        listen_port,
        mesh_interface_only: raw
            .mesh_interface_only
            .unwrap_or(default.mesh_interface_only),
    })
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

fn ranged<T: TryFrom<i64>>(
    cx: &Ctx<'_>,
    key: &str,
    value: i64,
    lo: i64,
    hi: i64,
    hint: &str,
) -> Result<T, ConfigError> {
    if value < lo || value > hi {
        return Err(cx.err(key, format!("{value} is out of range {lo}..={hi}{hint}")));
    }
    T::try_from(value).map_err(|_| cx.err(key, format!("{value} is out of range {lo}..={hi}")))
}

fn non_empty_path(cx: &Ctx<'_>, key: &str, value: String) -> Result<PathBuf, ConfigError> {
    if value.trim().is_empty() {
        return Err(cx.err(key, "must not be empty"));
    }
    Ok(PathBuf::from(value))
}

fn validate_host_address(cx: &Ctx<'_>, text: &str) -> Result<IpNet, ConfigError> {
    let address: IpNet = text.parse().map_err(|_| {
        cx.err(
            "host.address",
            format!(
                "{text:?} is not an address with prefix length; write this host's mesh address \
                 and the mesh prefix, e.g. \"10.99.99.1/24\""
            ),
        )
    })?;
    if let IpNet::V4(v4) = address {
        if v4.prefix_len() < 31 && (v4.addr() == v4.network() || v4.addr() == v4.broadcast()) {
            return Err(cx.err(
                "host.address",
                format!(
                    "{address} is the network or broadcast address of {}; use a host address \
                     inside the mesh prefix, e.g. \"10.99.99.1/24\"",
                    address.trunc()
                ),
            ));
        }
    }
    Ok(address)
}

fn validate_host(cx: &Ctx<'_>, raw: RawHost) -> Result<HostConfig, ConfigError> {
    if let Some(name) = &raw.name {
        validate_name(name).map_err(|m| cx.err("host.name", m))?;
    }
    let address = match &raw.address {
        None => None,
        Some(a) => Some(validate_host_address(cx, a)?),
    };
    let interface = raw
        .interface
        .unwrap_or_else(|| DEFAULT_INTERFACE.to_string());
    validate_interface(&interface).map_err(|m| cx.err("host.interface", m))?;
    let listen_port = match raw.listen_port {
        None => DEFAULT_LISTEN_PORT,
        Some(p) => ranged(
            cx,
            "host.listen_port",
            p,
            1,
            65535,
            " (0 would pick a random port; peers need a fixed one)",
        )?,
    };
    let private_key_file = non_empty_path(
        cx,
        "host.private_key_file",
        raw.private_key_file
            .unwrap_or_else(|| DEFAULT_PRIVATE_KEY_FILE.to_string()),
    )?;
    let mtu = match raw.mtu {
        None => DEFAULT_MTU,
        Some(m) => ranged(
            cx,
            "host.mtu",
            m,
            1280,
            9000,
            " (IPv6 needs at least 1280; WireGuard over a 1500 underlay is 1420)",
        )?,
    };
    Ok(HostConfig {
        name: raw.name,
        address,
        interface,
        listen_port,
        private_key_file,
        mtu,
    })
}

fn validate_daemon(cx: &Ctx<'_>, raw: RawDaemon) -> Result<DaemonConfig, ConfigError> {
    let d = DaemonConfig::default();
    let control_socket = match raw.control_socket {
        None => d.control_socket,
        Some(s) => non_empty_path(cx, "daemon.control_socket", s)?,
    };
    let backend = match raw.backend.as_deref() {
        None => d.backend,
        Some(text) => BackendKind::ALL
            .into_iter()
            .find(|b| b.as_str() == text)
            .ok_or_else(|| {
                cx.err(
                    "daemon.backend",
                    format!("{text:?} is not a backend; use \"auto\", \"kernel\" or \"userspace\""),
                )
            })?,
    };
    let engine_command = match raw.engine_command {
        None => None,
        Some(s) => Some(non_empty_path(cx, "daemon.engine_command", s)?),
    };
    let reconcile_interval_secs = match raw.reconcile_interval_secs {
        None => d.reconcile_interval_secs,
        Some(s) => ranged(cx, "daemon.reconcile_interval_secs", s, 1, 3600, "")?,
    };
    let state_dir = match raw.state_dir {
        None => d.state_dir,
        Some(s) => non_empty_path(cx, "daemon.state_dir", s)?,
    };
    let join_token_file = match raw.join_token_file {
        None => None,
        Some(s) => Some(non_empty_path(cx, "daemon.join_token_file", s)?),
    };
    let rotate_every_days = match raw.rotate_every_days {
        None => d.rotate_every_days,
        Some(s) => ranged(
            cx,
            "daemon.rotate_every_days",
            s,
            0,
            3650,
            " (0 turns scheduled rotation off)",
        )?,
    };
    Ok(DaemonConfig {
        control_socket,
        backend,
        engine_command,
        reconcile_interval_secs,
        state_dir,
        join_token_file,
        rotate_every_days,
    })
}

fn validate_coordinator(
    cx: &Ctx<'_>,
    raw: RawCoordinator,
) -> Result<CoordinatorConfig, ConfigError> {
    let mesh_cidr = parse_prefix(&raw.mesh_cidr, "10.99.99.0/24")
        .map_err(|m| cx.err("coordinator.mesh_cidr", m))?;
    let api_port = match raw.api_port {
        None => crate::wire::api::DEFAULT_API_PORT,
        Some(p) => ranged(cx, "coordinator.api_port", p, 1, 65535, "")?,
    };
    if raw.public_endpoints.is_empty() {
        return Err(cx.err(
            "coordinator.public_endpoints",
            "must list at least one IP:port where joining hosts reach this host, e.g. \
             [\"198.51.100.1:51871\"]",
        ));
    }
    let mut public_endpoints = Vec::with_capacity(raw.public_endpoints.len());
    for (i, e) in raw.public_endpoints.iter().enumerate() {
        let a = parse_endpoint(e)
            .map_err(|m| cx.err(format!("coordinator.public_endpoints[{i}]"), m))?;
        if public_endpoints.contains(&a) {
            return Err(cx.err(
                format!("coordinator.public_endpoints[{i}]"),
                format!("{a} is listed twice"),
            ));
        }
        public_endpoints.push(a);
    }
    let mut reserved = Vec::with_capacity(raw.reserved.len());
    for (i, r) in raw.reserved.iter().enumerate() {
        reserved.push(
            parse_allowed_ip(r).map_err(|m| cx.err(format!("coordinator.reserved[{i}]"), m))?,
        );
    }
    let keepalive_secs = match raw.keepalive_secs {
        None => DEFAULT_KEEPALIVE_SECS,
        Some(k) => ranged(
            cx,
            "coordinator.keepalive_secs",
            k,
            1,
            65535,
            " (seconds; 25 is usual behind NAT)",
        )?,
    };
    let mut static_assignments = BTreeMap::new();
    let mut by_address: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (name, addr) in raw.static_assignments {
        let key = format!("coordinator.static_assignments.{name}");
        validate_name(&name).map_err(|m| cx.err(key.clone(), m))?;
        let ip: IpAddr = addr.parse().map_err(|_| {
            cx.err(
                key.clone(),
                format!("{addr:?} is not an address (no prefix length), e.g. \"10.99.99.2\""),
            )
        })?;
        crate::alloc::check_address(mesh_cidr, &reserved, ip)
            .map_err(|e| cx.err(key.clone(), e.to_string()))?;
        if let Some(other) = by_address.insert(ip, name.clone()) {
            return Err(cx.err(
                key,
                format!("{ip} is already assigned to {other:?}; each host needs its own address"),
            ));
        }
        static_assignments.insert(name, ip);
    }
    let database = match raw.database {
        None => PathBuf::from(DEFAULT_DATABASE),
        Some(s) => non_empty_path(cx, "coordinator.database", s)?,
    };
    Ok(CoordinatorConfig {
        mesh_cidr,
        api_port,
        public_endpoints,
        reserved,
        keepalive_secs,
        static_assignments,
        database,
    })
}

/// The coordinator's own address must be inside the mesh and agree with the assignments.
fn check_coordinator(
    cx: &Ctx<'_>,
    host: &HostConfig,
    c: &CoordinatorConfig,
) -> Result<(), ConfigError> {
    let Some(address) = host.address else {
        return Ok(());
    };
    let own = address.addr();
    if !c.mesh_cidr.contains(&own) {
        return Err(cx.err(
            "host.address",
            format!(
                "{own} is not inside the mesh {} (coordinator.mesh_cidr)",
                c.mesh_cidr
            ),
        ));
    }
    for (name, ip) in &c.static_assignments {
        let ours = host.name.as_deref() == Some(name.as_str());
        if ours && *ip != own {
            return Err(cx.err(
                format!("coordinator.static_assignments.{name}"),
                format!("{ip} is not this host's own address {own} (host.address)"),
            ));
        }
        if !ours && *ip == own {
            return Err(cx.err(
                format!("coordinator.static_assignments.{name}"),
                format!("{ip} is this host's own address (host.address)"),
            ));
        }
    }
    Ok(())
}

fn parse_endpoint(s: &str) -> Result<SocketAddr, ValueError> {
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => Err(ValueError::EndpointPortZero(s.to_string())),
        Ok(a) => Ok(a),
        Err(_) if s.parse::<IpAddr>().is_ok() => Err(ValueError::EndpointNoPort(s.to_string())),
        Err(_) => Err(ValueError::EndpointNotAddress(s.to_string())),
    }
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

fn validate_peer(cx: &Ctx<'_>, i: usize, raw: RawPeer) -> Result<PeerConfig, ConfigError> {
    let key = |field: &str| format!("peer[{i}].{field}");
    validate_name(&raw.name).map_err(|m| cx.err(key("name"), m))?;
    let public_key: PublicKey = raw.public_key.parse().map_err(|e| {
        cx.err(
            key("public_key"),
            format!(
                "{:?} is not a WireGuard public key ({e}); expected 44 characters of base64 as \
                 printed by `wg pubkey`",
                raw.public_key
            ),
        )
    })?;
    let endpoint = match raw.endpoint {
        None => None,
        Some(s) => Some(parse_endpoint(&s).map_err(|m| cx.err(key("endpoint"), m))?),
    };
    if raw.allowed_ips.is_empty() {
        return Err(cx.err(
            key("allowed_ips"),
            "must list at least one prefix, e.g. [\"10.99.99.2/32\"]",
        ));
    }
    let mut allowed_ips = Vec::with_capacity(raw.allowed_ips.len());
    for (j, s) in raw.allowed_ips.iter().enumerate() {
        let net =
            parse_allowed_ip(s).map_err(|m| cx.err(format!("peer[{i}].allowed_ips[{j}]"), m))?;
        allowed_ips.push(net);
    }
    let persistent_keepalive = match raw.persistent_keepalive {
        None => None,
        Some(k) => Some(ranged(
            cx,
            &key("persistent_keepalive"),
            k,
            0,
            65535,
            " (seconds; 0 = off, 25 is usual behind NAT)",
        )?),
    };
    Ok(PeerConfig {
        name: raw.name,
        public_key,
        endpoint,
        allowed_ips,
        persistent_keepalive,
    })
}

fn validate_routes(
    cx: &Ctx<'_>,
    host: &HostConfig,
    peers: &[PeerConfig],
    raw: RawRoutes,
) -> Result<RoutesConfig, ConfigError> {
    use crate::routes::overlaps;
    let mut protected = Vec::with_capacity(raw.protected.len());
    for (i, p) in raw.protected.iter().enumerate() {
        let key = format!("routes.protected[{i}]");
        let net = parse_allowed_ip(p).map_err(|m| cx.err(key.clone(), m))?;
        if let Some(a) = host.address.filter(|a| overlaps(&a.trunc(), &net)) {
            return Err(cx.err(
                key,
                format!(
                    "{net} overlaps the mesh {} (host.address); the mesh itself cannot be \
                     protected from the mesh",
                    a.trunc()
                ),
            ));
        }
        protected.push(net);
    }
    let mut advertise: Vec<IpNet> = Vec::with_capacity(raw.advertise.len());
    for (i, a) in raw.advertise.iter().enumerate() {
        let key = format!("routes.advertise[{i}]");
        let net = parse_allowed_ip(a).map_err(|m| cx.err(key.clone(), m))?;
        if net.prefix_len() == 0 {
            return Err(cx.err(
                key,
                format!("{net} is a default route; meshd advertises subnets, never a /0"),
            ));
        }
        if let Some(m) = host.address.filter(|m| overlaps(&m.trunc(), &net)) {
            return Err(cx.err(
                key,
                format!(
                    "{net} overlaps the mesh {} (host.address); advertise subnets outside it",
                    m.trunc()
                ),
            ));
        }
        if let Some(p) = protected.iter().find(|p| overlaps(p, &net)) {
            return Err(cx.err(
                key,
                format!("{net} overlaps routes.protected {p}; remove one of them"),
            ));
        }
        if let Some(o) = advertise.iter().find(|o| overlaps(o, &net)) {
            return Err(cx.err(key, format!("{net} overlaps {o}, listed before it")));
        }
        advertise.push(net);
    }
    let mut accept: Vec<IpNet> = Vec::with_capacity(raw.accept.len());
    for (i, a) in raw.accept.iter().enumerate() {
        let key = format!("routes.accept[{i}]");
        let net = parse_allowed_ip(a).map_err(|m| cx.err(key.clone(), m))?;
        if net.prefix_len() == 0 {
            return Err(cx.err(
                key,
                format!(
                    "{net} is a default route; meshd never takes a default route from a peer: \
                     list the subnets to accept"
                ),
            ));
        }
        if let Some(m) = host.address.filter(|m| overlaps(&m.trunc(), &net)) {
            return Err(cx.err(
                key,
                format!(
                    "{net} overlaps the mesh {} (host.address); the mesh needs no accepting, \
                     list subnets outside it",
                    m.trunc()
                ),
            ));
        }
        if let Some(p) = protected.iter().find(|p| overlaps(p, &net)) {
            return Err(cx.err(
                key,
                format!("{net} overlaps routes.protected {p}; remove one of them"),
            ));
        }
        if let Some(o) = advertise.iter().find(|o| overlaps(o, &net)) {
            return Err(cx.err(
                key,
                format!("{net} overlaps routes.advertise {o}: this host routes that subnet itself"),
            ));
        }
        accept.push(net);
    }
    for (i, p) in peers.iter().enumerate() {
        for (k, net) in p.allowed_ips.iter().enumerate() {
            if let Some(pr) = protected.iter().find(|pr| overlaps(pr, net)) {
                return Err(cx.err(
                    format!("peer[{i}].allowed_ips[{k}]"),
                    format!(
                        "{net} of peer {:?} overlaps routes.protected {pr}; it would be routed \
                         over the mesh",
                        p.name
                    ),
                ));
            }
        }
    }
    let nft_table = match raw.nft_table {
        None => crate::routes::DEFAULT_NFT_TABLE.to_string(),
        Some(t) => {
            let ok = !t.is_empty()
                && t.len() <= 64
                && t.starts_with(|c: char| c.is_ascii_alphabetic())
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                return Err(cx.err(
                    "routes.nft_table",
                    format!(
                        "{t:?} is not a table name: a letter, then letters, digits, '_' or '-' \
                         (at most 64), e.g. \"meshd\""
                    ),
                ));
            }
            t
        }
    };
    Ok(RoutesConfig {
        advertise,
        protected,
        accept,
        nft_table,
    })
}

fn check_peers(cx: &Ctx<'_>, host: &HostConfig, peers: &[PeerConfig]) -> Result<(), ConfigError> {
    let own = host.address.map(|a| a.addr());
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut keys: BTreeMap<PublicKey, usize> = BTreeMap::new();
    for (i, p) in peers.iter().enumerate() {
        if host.name.as_deref() == Some(p.name.as_str()) {
            return Err(cx.err(
                format!("peer[{i}].name"),
                format!("{:?} is this host's own name (host.name)", p.name),
            ));
        }
        if let Some(j) = names.insert(&p.name, i) {
            return Err(cx.err(
                format!("peer[{i}].name"),
                format!("{:?} is already the name of peer[{j}]", p.name),
            ));
        }
        if let Some(j) = keys.insert(p.public_key, i) {
            return Err(cx.err(
                format!("peer[{i}].public_key"),
                format!(
                    "{} is already the key of peer[{j}] ({:?}); each peer needs its own key",
                    p.public_key, peers[j].name
                ),
            ));
        }
        for (k, net) in p.allowed_ips.iter().enumerate() {
            if let Some(own) = own.filter(|own| net.contains(own)) {
                return Err(cx.err(
                    format!("peer[{i}].allowed_ips[{k}]"),
                    format!(
                        "{net} contains this host's own address {own} (host.address); traffic \
                         to ourselves would be sent to peer {:?}",
                        p.name
                    ),
                ));
            }
        }
    }
    // Overlaps between peers: WireGuard maps an allowed IP to exactly one peer.
    for (i, p) in peers.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for (j, q) in peers.iter().enumerate().take(i) {
            for a in &q.allowed_ips {
                for (k, b) in p.allowed_ips.iter().enumerate() {
                    if (a.contains(b) || b.contains(a)) && seen.insert(k) {
                        return Err(cx.err(
                            format!("peer[{i}].allowed_ips[{k}]"),
                            format!(
                                "{b} of peer {:?} overlaps {a} of peer {:?} (peer[{j}]); an \
                                 address can route to one peer only",
                                p.name, q.name
                            ),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

// ---- locating TOML errors ----

fn toml_error(text: &str, origin: &str, e: &toml::de::Error) -> ConfigError {
    let msg = e.message().trim().to_string();
    let Some(span) = e.span() else {
        let key = backticked_field(&msg, "missing field");
        return ConfigError {
            file: origin.to_string(),
            key,
            message: msg,
        };
    };
    let pos = span.start.min(text.len());
    let line_no = text
        .get(..pos)
        .map(|t| t.matches('\n').count() + 1)
        .unwrap_or(1);
    let mut key = locate_key(text, line_no);
    if let Some(field) = backticked_field(&msg, "missing field") {
        key = Some(match key {
            Some(k) if k.contains('.') || k.contains('[') && !k.ends_with(']') => {
                // The span was a key=value line: name the table instead.
                format!("{}.{field}", table_of(&k))
            }
            Some(k) => format!("{k}.{field}"),
            None => field,
        });
    }
    ConfigError {
        file: origin.to_string(),
        key,
        message: format!("line {line_no}: {msg}"),
    }
}

/// `missing field `name`` -> `name`.
fn backticked_field(msg: &str, prefix: &str) -> Option<String> {
    let rest = msg.strip_prefix(prefix)?.trim_start();
    let rest = rest.strip_prefix('`')?;
    let end = rest.find('`')?;
    Some(rest[..end].to_string())
}

fn table_of(key: &str) -> &str {
    match key.rfind('.') {
        Some(i) => &key[..i],
        None => key,
    }
}

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

/// The dotted key path (`peer[1].endpoint`, `host`) of the line `line_no` (1-based).
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
mod tests {
    use super::*;

    const FILE: &str = "/etc/meshd/meshd.toml";

    fn key(i: u8) -> String {
        PublicKey([i; 32]).to_string()
    }

    fn base() -> String {
        format!(
            r#"# test config
[host]
name = "dock-load"
address = "10.99.99.1/24"

[[peer]]
name = "dock-prod"
public_key = "{}"
endpoint = "198.51.100.2:51871"
allowed_ips = ["10.99.99.2/32"]

[[peer]]
name = "dock-mirror"
public_key = "{}"
allowed_ips = ["10.99.99.3/32"]
persistent_keepalive = 25
"#,
            key(2),
            key(3)
        )
    }

    fn refuse(text: &str, want_key: &str, want_in_message: &str) -> ConfigError {
        let err = parse(text, FILE).expect_err(text);
        let shown = err.to_string();
        assert_eq!(err.file, FILE);
        assert!(shown.starts_with(&format!("{FILE}: ")), "{shown}");
        assert_eq!(err.key.as_deref(), Some(want_key), "{shown}");
        assert!(
            shown.contains(want_in_message),
            "{shown:?} should contain {want_in_message:?}"
        );
        err
    }

    #[test]
    fn parses_with_defaults() {
        let c = parse(&base(), FILE).unwrap();
        assert_eq!(c.host.name.as_deref(), Some("dock-load"));
        assert_eq!(c.host_name(), Some("dock-load"));
        assert!(c.coordinator.is_none());
        assert!(!c.is_coordinator());
        assert_eq!(c.host.interface, "wgmesh0");
        assert_eq!(c.host.listen_port, 51871);
        assert_eq!(c.host.mtu, 1420);
        assert_eq!(
            c.host.private_key_file,
            PathBuf::from("/etc/meshd/private.key")
        );
        assert_eq!(c.daemon, DaemonConfig::default());
        assert_eq!(c.daemon.reconcile_interval(), Duration::from_secs(10));
        assert_eq!(
            c.mesh_address(),
            Some("10.99.99.1".parse::<IpAddr>().unwrap())
        );
        assert_eq!(
            c.mesh_prefix(),
            Some("10.99.99.0/24".parse::<IpNet>().unwrap())
        );
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peer_name(&PublicKey([3; 32])), Some("dock-mirror"));
        assert_eq!(c.peer_name(&PublicKey([9; 32])), None);
        let specs = c.peer_specs();
        assert_eq!(specs.len(), 2);
        let prod = &specs[&PublicKey([2; 32])];
        assert_eq!(prod.endpoint, Some("198.51.100.2:51871".parse().unwrap()));
        assert_eq!(prod.persistent_keepalive, None);
        assert_eq!(specs[&PublicKey([3; 32])].persistent_keepalive, Some(25));
        let spec = c.device_spec(PrivateKey::from_bytes([1; 32]));
        assert_eq!(spec.listen_port, 51871);
        assert_eq!(spec.peers, specs);
    }

    #[test]
    fn parses_everything_explicit() {
        let text = format!(
            r#"
[host]
name = "dock-edge"
address = "10.99.99.4/24"
interface = "wg.mesh_1"
listen_port = 51999
private_key_file = "/var/lib/meshd/key"
mtu = 1380

[daemon]
control_socket = "/tmp/x/meshd.sock"
backend = "userspace"
engine_command = "/usr/local/bin/meshd-wg"
reconcile_interval_secs = 3

[[peer]]
name = "nas"
public_key = "{}"
endpoint = "[2001:db8::20]:51820"
allowed_ips = ["10.99.99.20/32", "fd00::/64"]
persistent_keepalive = 0
"#,
            key(7)
        );
        let c = parse(&text, FILE).unwrap();
        assert_eq!(c.host.interface, "wg.mesh_1");
        assert_eq!(c.host.mtu, 1380);
        assert_eq!(c.daemon.backend, BackendKind::Userspace);
        assert_eq!(
            c.daemon.engine_command,
            Some(PathBuf::from("/usr/local/bin/meshd-wg"))
        );
        assert_eq!(c.daemon.reconcile_interval_secs, 3);
        assert_eq!(c.peers[0].persistent_keepalive, Some(0));
        assert_eq!(
            c.peer_specs()[&PublicKey([7; 32])].persistent_keepalive,
            None
        );
        // Serialize writes the same format back.
        let again = toml::to_string(&c).unwrap();
        assert_eq!(parse(&again, FILE).unwrap(), c);
    }

    #[test]
    fn no_peers_is_fine() {
        let c = parse("[host]\nname = \"a\"\naddress = \"10.0.0.1/24\"\n", FILE).unwrap();
        assert!(c.peers.is_empty());
    }

    #[test]
    fn refuses_unknown_keys_with_line() {
        let t = base().replace("mtu", "x").replace(
            "address = \"10.99.99.1/24\"",
            "address = \"10.99.99.1/24\"\nlisten_prot = 1",
        );
        let e = refuse(&t, "host.listen_prot", "unknown field `listen_prot`");
        assert!(e.message.contains("line 5"), "{e}");

        let t = base().replace(
            "persistent_keepalive = 25",
            "persistent_keepalive = 25\nkeepalive = 3",
        );
        refuse(&t, "peer[1].keepalive", "line 17");

        let t = format!("{}\n[deamon]\nbackend = \"userspace\"\n", base());
        refuse(&t, "deamon", "unknown field `deamon`");

        let t = base().replace("[host]", "[host]\n[daemon]\nsocket = \"/x\"\n[host]");
        assert!(parse(&t, FILE).is_err());
        let t = format!("{}\n[daemon]\nsocket = \"/x\"\n", base());
        refuse(&t, "daemon.socket", "unknown field");
    }

    #[test]
    fn refuses_syntax_errors_with_line() {
        let t = base().replace("name = \"dock-prod\"", "name = dock-prod");
        let e = refuse(&t, "peer[0].name", "line 7");
        assert!(e.to_string().contains(FILE));
        let t = base().replace("listen", "").replace(
            "[[peer]]\nname = \"dock-mirror\"",
            "[[peer]\nname = \"dock-mirror\"",
        );
        let e = parse(&t, FILE).unwrap_err();
        assert!(e.message.contains("line 12"), "{e}");
    }

    #[test]
    fn refuses_wrong_types_and_missing_fields() {
        let t = base().replace("persistent_keepalive = 25", "persistent_keepalive = \"25\"");
        refuse(&t, "peer[1].persistent_keepalive", "line 16");
        let t = base().replace("name = \"dock-load\"\n", "");
        refuse(&t, "host.name", "missing field `name`");
        let t = base().replace("allowed_ips = [\"10.99.99.3/32\"]\n", "");
        refuse(&t, "peer[1].allowed_ips", "missing field `allowed_ips`");
        let t = base().replace("address = \"10.99.99.1/24\"\n", "");
        refuse(&t, "host.address", "missing field `address`");
        // Without static peers or [coordinator], a host may get everything from a join.
        let c = parse("", FILE).unwrap();
        assert_eq!(c.host.name, None);
        assert_eq!(c.mesh_address(), None);
        assert_eq!(c.mesh_prefix(), None);
        assert_eq!(c.daemon, DaemonConfig::default());
    }

    #[test]
    fn refuses_bad_host_values() {
        let b = base();
        refuse(
            &b.replace("\"dock-load\"", "\"Dock-Load\""),
            "host.name",
            "lowercase",
        );
        refuse(
            &b.replace("\"dock-load\"", "\"-dock\""),
            "host.name",
            "start or end",
        );
        refuse(&b.replace("\"dock-load\"", "\"\""), "host.name", "1 to 63");
        refuse(
            &b.replace("\"dock-load\"", &format!("\"{}\"", "a".repeat(64))),
            "host.name",
            "1 to 63",
        );
        refuse(
            &b.replace("10.99.99.1/24", "10.99.99.1"),
            "host.address",
            "prefix length",
        );
        refuse(
            &b.replace("10.99.99.1/24", "10.99.99.0/24"),
            "host.address",
            "network or broadcast",
        );
        let with = |k: &str| {
            b.replace(
                "address = \"10.99.99.1/24\"",
                &format!("address = \"10.99.99.1/24\"\n{k}"),
            )
        };
        refuse(&with("listen_port = 0"), "host.listen_port", "1..=65535");
        refuse(
            &with("listen_port = 65536"),
            "host.listen_port",
            "1..=65535",
        );
        refuse(&with("mtu = 1279"), "host.mtu", "1280..=9000");
        refuse(&with("mtu = 9001"), "host.mtu", "1280..=9000");
        refuse(
            &with("interface = \"a-very-long-name0\""),
            "host.interface",
            "1 to 15",
        );
        refuse(
            &with("interface = \"wg 0\""),
            "host.interface",
            "contains ' '",
        );
        refuse(&with("interface = \"..\""), "host.interface", "not a valid");
        refuse(&with("interface = \"\""), "host.interface", "1 to 15");
        refuse(
            &with("private_key_file = \"\""),
            "host.private_key_file",
            "empty",
        );
    }

    #[test]
    fn refuses_bad_daemon_values() {
        let b = base();
        refuse(
            &format!("{b}\n[daemon]\nbackend = \"wireguard-go\"\n"),
            "daemon.backend",
            "not a backend",
        );
        refuse(
            &format!("{b}\n[daemon]\nreconcile_interval_secs = 0\n"),
            "daemon.reconcile_interval_secs",
            "1..=3600",
        );
        refuse(
            &format!("{b}\n[daemon]\nreconcile_interval_secs = 3601\n"),
            "daemon.reconcile_interval_secs",
            "1..=3600",
        );
        refuse(
            &format!("{b}\n[daemon]\ncontrol_socket = \"\"\n"),
            "daemon.control_socket",
            "empty",
        );
        refuse(
            &format!("{b}\n[daemon]\nengine_command = \" \"\n"),
            "daemon.engine_command",
            "empty",
        );
    }

    #[test]
    fn refuses_bad_peer_values() {
        let b = base();
        refuse(
            &b.replace(&key(3), "not-a-key"),
            "peer[1].public_key",
            "wg pubkey",
        );
        refuse(
            &b.replace(&key(3), &key(3)[..43]),
            "peer[1].public_key",
            "base64",
        );
        refuse(
            &b.replace(&key(3), &format!("{}A", key(3))),
            "peer[1].public_key",
            "base64",
        );
        refuse(
            &b.replace("198.51.100.2:51871", "dock-prod.example.com:51871"),
            "peer[0].endpoint",
            "only IP:port is accepted",
        );
        refuse(
            &b.replace("198.51.100.2:51871", "198.51.100.2"),
            "peer[0].endpoint",
            "no port",
        );
        refuse(
            &b.replace("198.51.100.2:51871", "198.51.100.2:0"),
            "peer[0].endpoint",
            "port 0",
        );
        refuse(
            &b.replace("198.51.100.2:51871", "2001:db8::1:51871"),
            "peer[0].endpoint",
            "[2001:db8::1]:51871",
        );
        refuse(
            &b.replace("[\"10.99.99.2/32\"]", "[]"),
            "peer[0].allowed_ips",
            "at least one",
        );
        refuse(
            &b.replace("10.99.99.2/32", "10.99.99.2/24"),
            "peer[0].allowed_ips[0]",
            "host bits set; did you mean \"10.99.99.2/32\"",
        );
        refuse(
            &b.replace("10.99.99.2/32", "10.99.99.2"),
            "peer[0].allowed_ips[0]",
            "10.99.99.2/32",
        );
        refuse(
            &b.replace("10.99.99.2/32", "nope"),
            "peer[0].allowed_ips[0]",
            "not a prefix",
        );
        refuse(
            &b.replace("persistent_keepalive = 25", "persistent_keepalive = -1"),
            "peer[1].persistent_keepalive",
            "0..=65535",
        );
        refuse(
            &b.replace("persistent_keepalive = 25", "persistent_keepalive = 65536"),
            "peer[1].persistent_keepalive",
            "0..=65535",
        );
        refuse(
            &b.replace("\"dock-prod\"", "\"dock_prod\""),
            "peer[0].name",
            "lowercase",
        );
    }

    #[test]
    fn refuses_duplicates_and_overlaps() {
        let b = base();
        refuse(
            &b.replace("\"dock-mirror\"", "\"dock-prod\""),
            "peer[1].name",
            "already the name of peer[0]",
        );
        refuse(
            &b.replace("\"dock-mirror\"", "\"dock-load\""),
            "peer[1].name",
            "own name",
        );
        refuse(
            &b.replace(&key(3), &key(2)),
            "peer[1].public_key",
            "already the key of peer[0]",
        );
        let e = refuse(
            &b.replace("10.99.99.3/32", "10.99.99.0/25"),
            "peer[1].allowed_ips[0]",
            "contains this host's own address 10.99.99.1",
        );
        assert!(e.message.contains("dock-mirror"));
        let e = refuse(
            &b.replace(
                "[\"10.99.99.3/32\"]",
                "[\"10.99.99.3/32\", \"10.99.99.2/31\"]",
            ),
            "peer[1].allowed_ips[1]",
            "overlaps",
        );
        for part in [
            "10.99.99.2/31",
            "10.99.99.2/32",
            "\"dock-prod\"",
            "\"dock-mirror\"",
        ] {
            assert!(e.message.contains(part), "{e} should name {part}");
        }
        refuse(
            &b.replace("10.99.99.3/32", "10.99.99.2/32"),
            "peer[1].allowed_ips[0]",
            "overlaps",
        );
    }

    #[test]
    fn display_format() {
        let e = ConfigError {
            file: "f.toml".into(),
            key: Some("host.address".into()),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "f.toml: host.address: bad");
        let e = ConfigError {
            file: "f.toml".into(),
            key: None,
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "f.toml: bad");
    }

    fn coordinator_base() -> String {
        r#"
[host]
name = "dock-load"
address = "10.99.99.1/24"

[coordinator]
mesh_cidr = "10.99.99.0/24"
public_endpoints = ["198.51.100.1:51871"]
"#
        .to_string()
    }

    #[test]
    fn joining_host_config() {
        let c = parse(
            "[daemon]\njoin_token_file = \"/etc/meshd/join.token\"\nstate_dir = \"/srv/meshd\"\n",
            FILE,
        )
        .unwrap();
        assert_eq!(c.host_name(), None);
        assert_eq!(c.host.address, None);
        assert_eq!(c.host.interface, "wgmesh0");
        assert_eq!(
            c.daemon.join_token_file,
            Some(PathBuf::from("/etc/meshd/join.token"))
        );
        assert_eq!(c.daemon.state_dir, PathBuf::from("/srv/meshd"));
        let again = toml::to_string(&c).unwrap();
        assert_eq!(parse(&again, FILE).unwrap(), c);
        // [host] without name and address, as the lab writes it.
        let c = parse("[host]\nlisten_port = 51871\n\n[daemon]\n", FILE).unwrap();
        assert_eq!(c.daemon.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.daemon.join_token_file, None);
        refuse(
            "[daemon]\njoin_token_file = \"\"\n",
            "daemon.join_token_file",
            "empty",
        );
        refuse("[daemon]\nstate_dir = \"\"\n", "daemon.state_dir", "empty");
    }

    #[test]
    fn coordinator_defaults_and_full() {
        let c = parse(&coordinator_base(), FILE).unwrap();
        let co = c.coordinator.clone().unwrap();
        assert!(c.is_coordinator());
        assert_eq!(co.mesh_cidr, "10.99.99.0/24".parse::<IpNet>().unwrap());
        assert_eq!(co.api_port, crate::wire::api::DEFAULT_API_PORT);
        assert_eq!(co.keepalive_secs, 25);
        assert!(co.reserved.is_empty());
        assert!(co.static_assignments.is_empty());
        assert_eq!(co.database, PathBuf::from(DEFAULT_DATABASE));
        let text = format!(
            "{}api_port = 4000\nreserved = [\"10.99.99.0/28\"]\nkeepalive_secs = 15\n\
             database = \"/srv/c.db\"\n\n[coordinator.static_assignments]\ndock-prod = \
             \"10.99.99.20\"\nnas = \"10.99.99.30\"\ndock-load = \"10.99.99.1\"\n",
            coordinator_base().replace("reserved", "x")
        );
        // The assignment of the coordinator itself must match its address: 10.99.99.1 is
        // reserved here, so it is refused.
        refuse(
            &text,
            "coordinator.static_assignments.dock-load",
            "reserved",
        );
        let text = text.replace("dock-load = \"10.99.99.1\"\n", "");
        let c = parse(&text, FILE).unwrap();
        let co = c.coordinator.clone().unwrap();
        assert_eq!(co.api_port, 4000);
        assert_eq!(co.keepalive_secs, 15);
        assert_eq!(co.reserved, vec!["10.99.99.0/28".parse::<IpNet>().unwrap()]);
        assert_eq!(co.database, PathBuf::from("/srv/c.db"));
        assert_eq!(
            co.static_assignments.get("nas"),
            Some(&"10.99.99.30".parse::<IpAddr>().unwrap())
        );
        let again = toml::to_string(&c).unwrap();
        assert_eq!(parse(&again, FILE).unwrap(), c);
    }

    #[test]
    fn refuses_bad_coordinator_values() {
        let b = coordinator_base();
        refuse(
            &b.replace("name = \"dock-load\"\n", ""),
            "host.name",
            "coordinator",
        );
        refuse(
            &b.replace("address = \"10.99.99.1/24\"\n", ""),
            "host.address",
            "coordinator",
        );
        refuse(
            &b.replace("10.99.99.1/24", "10.98.0.1/24"),
            "host.address",
            "not inside the mesh",
        );
        refuse(
            &b.replace("mesh_cidr = \"10.99.99.0/24\"\n", ""),
            "coordinator.mesh_cidr",
            "missing field",
        );
        refuse(
            &b.replace("\"10.99.99.0/24\"", "\"10.99.99.1/24\""),
            "coordinator.mesh_cidr",
            "host bits",
        );
        refuse(
            &b.replace("[\"198.51.100.1:51871\"]", "[]"),
            "coordinator.public_endpoints",
            "at least one",
        );
        refuse(
            &b.replace("[\"198.51.100.1:51871\"]", "[\"vps.example.com:51871\"]"),
            "coordinator.public_endpoints[0]",
            "IP:port",
        );
        refuse(
            &b.replace("public_endpoints = [\"198.51.100.1:51871\"]\n", ""),
            "coordinator.public_endpoints",
            "missing field",
        );
        refuse(
            &format!("{b}api_port = 0\n"),
            "coordinator.api_port",
            "1..=65535",
        );
        refuse(
            &format!("{b}keepalive_secs = 0\n"),
            "coordinator.keepalive_secs",
            "1..=65535",
        );
        refuse(
            &format!("{b}reserved = [\"10.99.99.1\"]\n"),
            "coordinator.reserved[0]",
            "prefix length",
        );
        refuse(
            &format!("{b}database = \"\"\n"),
            "coordinator.database",
            "empty",
        );
        refuse(
            &format!("{b}bogus = 1\n"),
            "coordinator.bogus",
            "unknown field",
        );
        let sa = |body: &str| {
            format!(
                "{b}reserved = [\"10.99.99.240/28\"]\n\n[coordinator.static_assignments]\n{body}"
            )
        };
        refuse(
            &sa("nas = \"10.98.0.2\"\n"),
            "coordinator.static_assignments.nas",
            "not inside the mesh",
        );
        refuse(
            &sa("nas = \"10.99.99.241\"\n"),
            "coordinator.static_assignments.nas",
            "reserved",
        );
        refuse(
            &sa("nas = \"10.99.99.0\"\n"),
            "coordinator.static_assignments.nas",
            "network or broadcast",
        );
        refuse(
            &sa("nas = \"10.99.99.2/32\"\n"),
            "coordinator.static_assignments.nas",
            "not an address",
        );
        refuse(
            &sa("nas = \"10.99.99.2\"\nbox = \"10.99.99.2\"\n"),
            "coordinator.static_assignments.nas",
            "already assigned to \"box\"",
        );
        refuse(
            &sa("nas = \"10.99.99.1\"\n"),
            "coordinator.static_assignments.nas",
            "own address",
        );
        refuse(
            &sa("dock-load = \"10.99.99.9\"\n"),
            "coordinator.static_assignments.dock-load",
            "own address",
        );
        refuse(
            &sa("Bad_Name = \"10.99.99.9\"\n"),
            "coordinator.static_assignments.Bad_Name",
            "lowercase",
        );
        parse(
            &sa("dock-load = \"10.99.99.1\"\nnas = \"10.99.99.20\"\n"),
            FILE,
        )
        .unwrap();
    }

    #[test]
    fn routes_section_parses_and_defaults() {
        let c = parse(&base(), FILE).unwrap();
        assert_eq!(c.routes, RoutesConfig::default());
        assert_eq!(c.routes.nft_table, "meshd");
        let text = format!(
            "{}\n[routes]\nadvertise = [\"192.168.1.20/32\", \"fd00:1::/64\"]\nprotected = [\"10.42.0.0/16\", \"10.43.0.0/16\"]\nnft_table = \"meshd_lab\"\n",
            base()
        );
        let c = parse(&text, FILE).unwrap();
        let nets: Vec<String> = c.routes.advertise.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, vec!["192.168.1.20/32", "fd00:1::/64"]);
        assert_eq!(c.routes.protected.len(), 2);
        assert_eq!(c.routes.nft_table, "meshd_lab");
    }

    #[test]
    fn routes_section_refusals_name_the_key() {
        let r = |body: &str| format!("{}\n[routes]\n{body}\n", base());
        refuse(&r("advertize = []"), "routes.advertize", "unknown field");
        refuse(
            &r("advertise = [\"192.168.1.20\"]"),
            "routes.advertise[0]",
            "/32",
        );
        refuse(
            &r("advertise = [\"192.168.1.0/16\"]"),
            "routes.advertise[0]",
            "host bits",
        );
        refuse(
            &r("advertise = [\"0.0.0.0/0\"]"),
            "routes.advertise[0]",
            "never a /0",
        );
        refuse(
            &r("advertise = [\"10.99.0.0/16\"]"),
            "routes.advertise[0]",
            "overlaps the mesh",
        );
        refuse(
            &r("advertise = [\"192.168.1.0/24\", \"192.168.1.20/32\"]"),
            "routes.advertise[1]",
            "overlaps 192.168.1.0/24",
        );
        refuse(
            &r("advertise = [\"10.42.0.0/24\"]\nprotected = [\"10.42.0.0/16\"]"),
            "routes.advertise[0]",
            "routes.protected 10.42.0.0/16",
        );
        refuse(
            &r("protected = [\"10.99.99.0/24\"]"),
            "routes.protected[0]",
            "overlaps the mesh",
        );
        refuse(
            &r("nft_table = \"bad name\""),
            "routes.nft_table",
            "not a table name",
        );
        refuse(
            &r("accept = [\"0.0.0.0/0\"]"),
            "routes.accept[0]",
            "default route",
        );
        refuse(
            &r("accept = [\"10.99.0.0/16\"]"),
            "routes.accept[0]",
            "overlaps the mesh",
        );
        refuse(
            &r("accept = [\"192.168.1.1/24\"]"),
            "routes.accept[0]",
            "host bits",
        );
        refuse(&r("accept = [\"banana\"]"), "routes.accept[0]", "");
        refuse(
            &r("accept = [\"10.42.0.0/24\"]\nprotected = [\"10.42.0.0/16\"]"),
            "routes.accept[0]",
            "routes.protected 10.42.0.0/16",
        );
        refuse(
            &r("advertise = [\"192.168.1.0/24\"]\naccept = [\"192.168.1.20/32\"]"),
            "routes.accept[0]",
            "routes.advertise 192.168.1.0/24",
        );
        let c = parse(&r("accept = [\"192.168.1.0/24\", \"fd00:1::/64\"]"), FILE).unwrap();
        assert_eq!(c.routes.accept.len(), 2);
        let peer_in_protected =
            base().replace("10.99.99.3/32\"]", "10.99.99.3/32\", \"10.42.5.0/24\"]");
        refuse(
            &format!("{peer_in_protected}\n[routes]\nprotected = [\"10.42.0.0/16\"]\n"),
            "peer[1].allowed_ips[1]",
            "routes.protected 10.42.0.0/16",
        );
    }

    #[test]
    fn dns_metrics_and_integrations_parse() {
        let c = parse(&base(), FILE).expect("base");
        assert_eq!(c.dns, ServiceConfig::dns_default());
        assert_eq!(c.metrics.listen_port, 9586);
        assert!(c.metrics.enable);
        assert_eq!(c.integrations, IntegrationsConfig::default());

        let text = format!(
            "{}\n[dns]\nlisten_port = 5353\n\n[metrics]\nenable = false\n\n\
             [integrations.k3s]\nrole = \"server\"\n\n[integrations.hosts]\n",
            base()
        );
        let c = parse(&text, FILE).expect("full");
        assert_eq!(
            c.dns,
            ServiceConfig {
                enable: true,
                listen_port: 5353,
                mesh_interface_only: true,
            }
        );
        assert!(!c.metrics.enable);
        assert!(c.metrics.mesh_interface_only);
        assert!(c.integrations.k3s.is_some());
        assert!(c.integrations.hosts.is_some());
        let c = parse(
            &format!("{}\n[metrics]\nmesh_interface_only = false\n", base()),
            FILE,
        )
        .expect("metrics off the mesh interface too");
        assert!(!c.metrics.mesh_interface_only);
        assert!(c.dns.mesh_interface_only);
    }

    #[test]
    fn dns_metrics_and_integrations_refusals_name_the_key() {
        refuse(
            &format!("{}\n[dns]\nlisten_port = 0\n", base()),
            "dns.listen_port",
            "out of range",
        );
        refuse(
            &format!("{}\n[metrics]\nport = 1\n", base()),
            "metrics.port",
            "unknown field",
        );
        refuse(
            &format!("{}\n[dns]\nmesh_interface_only = \"yes\"\n", base()),
            "dns.mesh_interface_only",
            "bool",
        );
        refuse(
            &format!("{}\n[dns]\nlisten_port = 9586\n", base()),
            "metrics.listen_port",
            "different ports",
        );
        refuse(
            &format!(
                "{}\n[integrations.k3s]\nrole = \"server\"\nserver = \"x\"\n",
                base()
            ),
            "integrations.k3s.server",
            "only agents",
        );
        refuse(
            &format!("{}\n[integrations.nfs]\n", base()),
            "integrations.nfs",
            "unknown integration",
        );
    }

    #[test]
    fn rotate_every_days_defaults_to_30_and_is_ranged() {
        let base = "[host]\nname = \"dock-prod\"\n";
        let c = parse(base, "/etc/meshd/meshd.toml").expect("default");
        assert_eq!(c.daemon.rotate_every_days, DEFAULT_ROTATE_EVERY_DAYS);
        let c = parse(
            &format!("{base}[daemon]\nrotate_every_days = 0\n"),
            "/etc/meshd/meshd.toml",
        )
        .expect("never");
        assert_eq!(c.daemon.rotate_every_days, 0);
        let err = parse(
            &format!("{base}[daemon]\nrotate_every_days = 4000\n"),
            "/etc/meshd/meshd.toml",
        )
        .expect_err("too long");
        let msg = err.to_string();
        assert!(
            msg.contains("daemon.rotate_every_days") && msg.contains("0..=3650"),
            "{msg}"
        );
    }
}
