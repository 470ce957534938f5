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
mod tests;
