//! The lab's fixed topology (tests/README.md): which hosts exist, where they sit and their addresses.
//!
//! ```text
//!  "internet" bridge 198.51.100.0/24: dock-load .1, dock-prod .2, dock-dash .5, home router .100
//!  home router netns: NAT (nftables masquerade) between the internet bridge and home LAN
//!  home LAN bridge 192.168.1.0/24: router .1, dock-mirror .3, dock-edge .4, nas .20
//!  second home router netns ("home2-router", WAN .101): NAT with a new random port for every
//!    destination (endpoint-dependent, "symmetric") between the internet and home-2's LAN
//!  home-2 LAN bridge 192.168.2.0/24: router .1, dock-laptop .10
//! ```
//!
//! The first home's NAT keeps a LAN host's port for every destination (endpoint-independent
//! mapping) and lets in only answers (conntrack); the second home's maps each destination to
//! its own random port, so the mapping the coordinator observes is good towards the
//! coordinator only.
//!
//! Both bridges live in a dedicated "switch" namespace; nothing is ever configured in the root
//! namespace.

use std::net::Ipv4Addr;

/// Where a host is plugged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The namespace holding both bridges. No addresses.
    Switch,
    /// The home router: WAN on the internet bridge, LAN on the home bridge, NAT between them.
    Router,
    /// A host with a public address on the internet bridge.
    Public,
    /// A host on the home LAN, behind the router's NAT.
    Home,
    /// The second home's router: WAN on the internet bridge, LAN on the home-2 bridge, a
    /// symmetric NAT between them.
    Router2,
    /// A host on the second home's LAN, behind its symmetric NAT.
    Home2,
}

impl Role {
    /// A host behind a NAT (either home).
    pub fn behind_nat(self) -> bool {
        matches!(self, Role::Home | Role::Home2)
    }

    /// A router (either home's).
    pub fn is_router(self) -> bool {
        matches!(self, Role::Router | Role::Router2)
    }
}

/// One lab host.
#[derive(Debug, Clone, Copy)]
pub struct HostDef {
    pub name: &'static str,
    pub role: Role,
    /// Underlay address (for the router: its WAN address).
    pub addr: Option<Ipv4Addr>,
    /// Mesh address, for the hosts that run meshd.
    pub mesh: Option<Ipv4Addr>,
    /// Name of the host's end of its link, inside the switch namespace (at most 15 chars).
    pub port: &'static str,
}

pub const SWITCH: &str = "switch";
pub const ROUTER: &str = "home-router";
pub const BRIDGE_INTERNET: &str = "br-inet";
pub const BRIDGE_HOME: &str = "br-home";
pub const ROUTER2: &str = "home2-router";
pub const BRIDGE_HOME2: &str = "br-home2";
pub const ROUTER2_WAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 101);
pub const ROUTER2_LAN_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 1);
/// The host behind the second home's symmetric NAT (not one of the five fleet hosts).
pub const LAPTOP: &str = "dock-laptop";
/// The underlay interface inside every host (the router has `wan` and `lan` instead).
pub const HOST_IFACE: &str = "eth0";
pub const ROUTER_WAN: &str = "wan";
pub const ROUTER_LAN: &str = "lan";
pub const INTERNET_PREFIX: u8 = 24;
pub const HOME_PREFIX: u8 = 24;
pub const ROUTER_WAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
pub const ROUTER_LAN_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
pub const MESH_PREFIX: u8 = 24;
pub const MESH_IFACE: &str = "wgmesh0";
pub const MESH_PORT: u16 = 51871;

/// The five hosts that run meshd, in the order of the fleet table.
pub const DAEMON_HOSTS: [&str; 5] = [
    "dock-load",
    "dock-prod",
    "dock-mirror",
    "dock-edge",
    "dock-dash",
];

/// Every host of the full lab, switch and router included.
pub const HOSTS: &[HostDef] = &[
    HostDef {
        name: SWITCH,
        role: Role::Switch,
        addr: None,
        mesh: None,
        port: "",
    },
    HostDef {
        name: ROUTER,
        role: Role::Router,
        addr: Some(ROUTER_WAN_ADDR),
        mesh: None,
        port: "i-router",
    },
    HostDef {
        name: "dock-load",
        role: Role::Public,
        addr: Some(Ipv4Addr::new(198, 51, 100, 1)),
        mesh: Some(Ipv4Addr::new(10, 99, 99, 1)),
        port: "i-load",
    },
    HostDef {
        name: "dock-prod",
        role: Role::Public,
        addr: Some(Ipv4Addr::new(198, 51, 100, 2)),
        mesh: Some(Ipv4Addr::new(10, 99, 99, 2)),
        port: "i-prod",
    },
    HostDef {
        name: "dock-dash",
        role: Role::Public,
        addr: Some(Ipv4Addr::new(198, 51, 100, 5)),
        mesh: Some(Ipv4Addr::new(10, 99, 99, 5)),
        port: "i-dash",
    },
    HostDef {
        name: "dock-mirror",
        role: Role::Home,
        addr: Some(Ipv4Addr::new(192, 168, 1, 3)),
        mesh: Some(Ipv4Addr::new(10, 99, 99, 3)),
        port: "h-mirror",
    },
    HostDef {
        name: "dock-edge",
        role: Role::Home,
        addr: Some(Ipv4Addr::new(192, 168, 1, 4)),
        mesh: Some(Ipv4Addr::new(10, 99, 99, 4)),
        port: "h-edge",
    },
    HostDef {
        name: "nas",
        role: Role::Home,
        addr: Some(Ipv4Addr::new(192, 168, 1, 20)),
        mesh: Some(Ipv4Addr::new(10, 99, 99, 20)),
        port: "h-nas",
    },
    HostDef {
        name: ROUTER2,
        role: Role::Router2,
        addr: Some(ROUTER2_WAN_ADDR),
        mesh: None,
        port: "i-router2",
    },
    HostDef {
        name: LAPTOP,
        role: Role::Home2,
        addr: Some(Ipv4Addr::new(192, 168, 2, 10)),
        mesh: Some(Ipv4Addr::new(10, 99, 99, 6)),
        port: "h2-laptop",
    },
];

/// The router in front of hosts of `role` (none for public hosts).
pub fn router_of(role: Role) -> Option<&'static str> {
    match role {
        Role::Home => Some(ROUTER),
        Role::Home2 => Some(ROUTER2),
        _ => None,
    }
}

/// Look a host up by name.
pub fn host(name: &str) -> Option<&'static HostDef> {
    HOSTS.iter().find(|h| h.name == name)
}

/// Names of every host (switch and router included).
pub fn all_host_names() -> Vec<&'static str> {
    HOSTS.iter().map(|h| h.name).collect()
}

/// The mesh address planned for a host.
pub fn mesh_addr(name: &str) -> Option<Ipv4Addr> {
    host(name).and_then(|h| h.mesh)
}
