//! Routes, forwarding and the firewall table, decided without I/O.
//!
//! meshd marks every route it creates with its own `rtm_protocol` ([`RT_PROTO_MESHD`], named
//! `meshd` in `/etc/iproute2/rt_protos.d/meshd.conf`) and only ever removes routes carrying that
//! mark on its own interface. Before a route is added, [`conflicts`] compares it with every route
//! of every table: a route that overlaps one owned by another interface (flannel.1, flannel-wg,
//! cni0, docker0, virbr0, ...) or a `routes.protected` CIDR is refused, naming the owner.
//!
//! The daemon lists routes and runs `nft`; this module says what to want ([`desired_routes`]),
//! what clashes ([`conflicts`]), what to change ([`plan_routes`]) and what our nftables table
//! holds ([`Firewall::render`]).
//!
//! Routes are granted, not taken. A prefix a host advertises (`routes.advertise`) is
//! [`RouteState::Pending`] on the coordinator until an admin approves it (`meshctl routes
//! approve`, [`decide`]); netmaps carry approved prefixes only ([`granted`]). Each receiver then
//! accepts a granted prefix only where its own `routes.accept` opts in, and never one that
//! touches the mesh, loopback, link-local, multicast, its own underlay routes, its default
//! gateway, the coordinator's endpoint or K3s's cluster/service CIDRs ([`accept_netmap`]). A prefix it
//! refuses is skipped with a reason ([`SkippedRoute`]); the rest of the netmap applies.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::device::PeerSpec;
use crate::netmap::Netmap;

/// Our `rtm_protocol` value. 171 is unassigned in the kernel's and iproute2's lists
/// (`/etc/iproute2/rt_protos`), far from the daemons' numbers (bird 12, zebra 11, babel 42,
/// bgp 186, isis 187, ospf 188, rip 189, eigrp 192).
pub const RT_PROTO_MESHD: u8 = 171;
/// The name iproute2 shows for [`RT_PROTO_MESHD`].
pub const RT_PROTO_NAME: &str = "meshd";
/// Our nftables table (family `inet`) unless `routes.nft_table` says otherwise.
pub const DEFAULT_NFT_TABLE: &str = "meshd";

/// The line for `/etc/iproute2/rt_protos.d/meshd.conf`: `171 meshd`.
pub fn protocol_name_line() -> String {
    format!("{RT_PROTO_MESHD} {RT_PROTO_NAME}")
}

/// The kernel's main routing table.
pub const TABLE_MAIN: u32 = 254;
/// The kernel's local table (addresses of this host, broadcast).
pub const TABLE_LOCAL: u32 = 255;

/// One route of the system, from any table, as the daemon read it over netlink.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SystemRoute {
    pub table: u32,
    pub dst: IpNet,
    /// The output interface; `None` for routes without one (blackhole, unreachable,
    /// multipath).
    pub dev: Option<String>,
    pub protocol: u8,
    /// `unicast`, `local`, `broadcast`, `multicast`, `blackhole`, `unreachable`, ...
    pub kind: String,
    /// The next hop (`via`), if the route has one: a default route's gateway.
    pub gateway: Option<IpAddr>,
}

/// iproute2's name for a table number.
pub fn table_name(table: u32) -> String {
    match table {
        TABLE_MAIN => "main".to_string(),
        TABLE_LOCAL => "local".to_string(),
        253 => "default".to_string(),
        t => t.to_string(),
    }
}

/// iproute2's name for a route protocol number.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        0 => "unspec",
        1 => "redirect",
        2 => "kernel",
        3 => "boot",
        4 => "static",
        8 => "gated",
        9 => "ra",
        10 => "mrt",
        11 => "zebra",
        12 => "bird",
        13 => "dnrouted",
        14 => "xorp",
        15 => "ntk",
        16 => "dhcp",
        17 => "mrouted",
        18 => "keepalived",
        42 => "babel",
        186 => "bgp",
        187 => "isis",
        188 => "ospf",
        189 => "rip",
        192 => "eigrp",
        RT_PROTO_MESHD => RT_PROTO_NAME,
        p => return p.to_string(),
    }
    .to_string()
}

impl SystemRoute {
    /// Carries our mark and sits on our interface: the only routes meshd may remove.
    pub fn is_ours(&self, our_dev: &str) -> bool {
        self.protocol == RT_PROTO_MESHD && self.dev.as_deref() == Some(our_dev)
    }
}

impl fmt::Display for SystemRoute {
    /// `10.42.0.0/16 dev flannel-wg (table main, proto kernel)`; `local`, `broadcast`, ...
    /// routes carry their type first, as `ip route` shows them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind != "unicast" {
            write!(f, "{} ", self.kind)?;
        }
        write!(f, "{}", self.dst)?;
        if let Some(dev) = &self.dev {
            write!(f, " dev {dev}")?;
        }
        write!(
            f,
            " (table {}, proto {})",
            table_name(self.table),
            protocol_name(self.protocol)
        )
    }
}

/// A route we want that overlaps something that is not ours.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteConflict {
    pub wanted: IpNet,
    /// Who owns the overlapping space: a route (`10.42.0.0/16 dev flannel-wg (table main,
    /// proto kernel)`) or `routes.protected 10.43.0.0/16`.
    pub owner: String,
}

impl fmt::Display for RouteConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} overlaps {}", self.wanted, self.owner)
    }
}

/// Whether two prefixes share any address (one contains the other); never across families.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Conflicts of `wanted` with routes that are not ours (not on `our_dev`), ignoring default
/// routes (prefix 0), plus overlaps with `protected` CIDRs. Sorted and de-duplicated.
pub fn conflicts(
    wanted: &[IpNet],
    existing: &[SystemRoute],
    our_dev: &str,
    protected: &[IpNet],
) -> Vec<RouteConflict> {
    let mut out = BTreeSet::new();
    for w in wanted {
        for r in existing {
            if r.dev.as_deref() == Some(our_dev) || r.dst.prefix_len() == 0 {
                continue;
            }
            if overlaps(w, &r.dst) {
                out.insert(RouteConflict {
                    wanted: *w,
                    owner: r.to_string(),
                });
            }
        }
        for p in protected {
            if overlaps(w, p) {
                out.insert(RouteConflict {
                    wanted: *w,
                    owner: format!("routes.protected {p}"),
                });
            }
        }
    }
    out.into_iter().collect()
}

/// One error message for a refused set of routes: what, why, and what to do.
pub fn refusal_message(conflicts: &[RouteConflict]) -> String {
    let list: Vec<String> = conflicts.iter().map(ToString::to_string).collect();
    format!(
        "refused: route {}; meshd never takes address space another interface or \
         routes.protected owns. Remove the prefix from the peer's allowed IPs (or the \
         advertising host's routes.advertise), or free it on this host",
        list.join("; ")
    )
}

/// The routes meshd wants on its interface: the mesh CIDR (the address' network) plus every
/// peer allowed IP outside it (never a /0). Sorted, de-duplicated.
pub fn desired_routes(mesh_cidr: IpNet, peers: &[PeerSpec]) -> Vec<IpNet> {
    let mesh = mesh_cidr.trunc();
    let mut out = BTreeSet::new();
    if mesh.prefix_len() != 0 {
        out.insert(mesh);
    }
    for p in peers {
        for a in &p.allowed_ips {
            let a = a.trunc();
            if a.prefix_len() != 0 && !mesh.contains(&a) {
                out.insert(a);
            }
        }
    }
    out.into_iter().collect()
}

/// One change to the routes on our interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteOp {
    /// Add `dst dev <ours> proto meshd` (main table).
    Add(IpNet),
    /// Take over the kernel's prefix route for our own address on our interface (an address
    /// added before meshd used `noprefixroute`): replace it in place by ours, no gap.
    TakeOver(IpNet),
    /// Remove one of our routes that is no longer wanted.
    Remove(SystemRoute),
}

impl fmt::Display for RouteOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteOp::Add(n) => write!(f, "add route {n} proto {RT_PROTO_NAME}"),
            RouteOp::TakeOver(n) => {
                write!(
                    f,
                    "replace kernel route {n} by ours (proto {RT_PROTO_NAME})"
                )
            }
            RouteOp::Remove(r) => write!(f, "remove our route {r}"),
        }
    }
}

/// What to change so our interface carries exactly `wanted` (main table), adds first.
/// Only routes with our mark on `our_dev` are ever removed; a wanted route that a foreign
/// owner holds on our interface (same prefix, other protocol) is left alone, except the
/// kernel prefix route (`proto kernel`) which we take over. Routes in `skip` (conflicts) are
/// neither added nor removed.
pub fn plan_routes(
    wanted: &[IpNet],
    existing: &[SystemRoute],
    our_dev: &str,
    skip: &[IpNet],
) -> Vec<RouteOp> {
    let on_ours = |r: &&SystemRoute| {
        r.table == TABLE_MAIN && r.dev.as_deref() == Some(our_dev) && r.kind == "unicast"
    };
    let ours: BTreeSet<IpNet> = existing
        .iter()
        .filter(on_ours)
        .filter(|r| r.protocol == RT_PROTO_MESHD)
        .map(|r| r.dst)
        .collect();
    let foreign: BTreeSet<(IpNet, u8)> = existing
        .iter()
        .filter(on_ours)
        .filter(|r| r.protocol != RT_PROTO_MESHD)
        .map(|r| (r.dst, r.protocol))
        .collect();
    let wanted: BTreeSet<IpNet> = wanted.iter().map(IpNet::trunc).collect();
    let mut ops = Vec::new();
    for w in &wanted {
        if ours.contains(w) || skip.contains(w) {
            continue;
        }
        let held: Vec<u8> = foreign
            .iter()
            .filter(|(d, _)| d == w)
            .map(|(_, p)| *p)
            .collect();
        if held.is_empty() {
            ops.push(RouteOp::Add(*w));
        } else if held.contains(&2) {
            ops.push(RouteOp::TakeOver(*w));
        }
        // Held by another protocol on our interface (an operator's static route): theirs.
    }
    let mut removals: Vec<&SystemRoute> = existing
        .iter()
        .filter(|r| r.table == TABLE_MAIN && r.is_ours(our_dev))
        .filter(|r| !wanted.contains(&r.dst))
        .collect();
    removals.sort();
    removals.dedup();
    ops.extend(removals.into_iter().cloned().map(RouteOp::Remove));
    ops
}

/// Our nftables table for this host: masquerade and forwarding limits for the subnets we
/// advertise. Empty (`is_empty`) when the host advertises nothing: then the table is absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firewall {
    pub table: String,
    /// Our mesh interface.
    pub interface: String,
    /// The subnets this host routes for the mesh (`routes.advertise`).
    pub advertise: Vec<IpNet>,
    /// Interfaces whose forwarding meshd turned on itself (it was off): forwarding in from
    /// them is limited to the advertised subnets (and their replies). Interfaces that already
    /// forwarded get no rule at all: K3s and Docker rely on them.
    pub limit_forwarding_from: Vec<String>,
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace(['"', '\\'], ""))
}

impl Firewall {
    pub fn is_empty(&self) -> bool {
        self.advertise.is_empty()
    }

    /// A short fingerprint of the rendered table (the first 8 bytes of its SHA-256, the hash
    /// mesh-proto uses everywhere), stored as the table's comment so a restarted daemon
    /// recognises its own table and does not rewrite it.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest as _, Sha256};
        let digest = Sha256::digest(self.render().as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("meshd {hex}")
    }

    /// The whole table as one `nft -f -` transaction that replaces it atomically (create it
    /// if absent, delete it, define it again), or only removes it when empty. Nothing outside
    /// our table is named.
    pub fn render(&self) -> String {
        let t = &self.table;
        let mut s = format!("table inet {t} {{}}\ndelete table inet {t}\n");
        if self.is_empty() {
            return s;
        }
        let iface = quote(&self.interface);
        let v4: Vec<String> = self
            .advertise
            .iter()
            .filter(|n| matches!(n, IpNet::V4(_)))
            .map(ToString::to_string)
            .collect();
        let v6: Vec<String> = self
            .advertise
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)))
            .map(ToString::to_string)
            .collect();
        s.push_str(&format!("table inet {t} {{\n"));
        if !v4.is_empty() {
            s.push_str(&format!(
                "\tset advertised4 {{\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}\n",
                v4.join(", ")
            ));
        }
        if !v6.is_empty() {
            s.push_str(&format!(
                "\tset advertised6 {{\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}\n",
                v6.join(", ")
            ));
        }
        // Devices on the advertised subnets answer their own gateway, not the mesh: hide the
        // mesh source behind this host's address there.
        s.push_str(
            "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n",
        );
        if !v4.is_empty() {
            s.push_str(&format!(
                "\t\tiifname {iface} oifname != {iface} ip daddr @advertised4 masquerade\n"
            ));
        }
        if !v6.is_empty() {
            s.push_str(&format!(
                "\t\tiifname {iface} oifname != {iface} ip6 daddr @advertised6 masquerade\n"
            ));
        }
        s.push_str("\t}\n");
        if !self.limit_forwarding_from.is_empty() {
            s.push_str(
                "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n",
            );
            for dev in &self.limit_forwarding_from {
                let d = quote(dev);
                if *dev == self.interface {
                    if !v4.is_empty() {
                        s.push_str(&format!("\t\tiifname {d} ip daddr @advertised4 accept\n"));
                    }
                    if !v6.is_empty() {
                        s.push_str(&format!("\t\tiifname {d} ip6 daddr @advertised6 accept\n"));
                    }
                } else {
                    s.push_str(&format!(
                        "\t\tiifname {d} oifname {iface} ct state established,related accept\n"
                    ));
                }
                s.push_str(&format!("\t\tiifname {d} drop\n"));
            }
            s.push_str("\t}\n");
        }
        s.push_str("}\n");
        s
    }

    /// The transaction that removes our table (and only it), whether or not it exists.
    pub fn render_removal(table: &str) -> String {
        format!("table inet {table} {{}}\ndelete table inet {table}\n")
    }
}

// ---------------------------------------------------------------------------------------------
// Routes are granted, not taken: the coordinator's approvals and each receiver's acceptance.

/// Where an advertised prefix stands on the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteState {
    /// Advertised, no admin decided yet: in no netmap.
    Pending,
    /// An admin approved it: in the netmaps while its host advertises it.
    Approved,
    /// An admin revoked (or refused) it: in no netmap, even when advertised again, until an
    /// admin approves it.
    Revoked,
}

impl RouteState {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteState::Pending => "pending",
            RouteState::Approved => "approved",
            RouteState::Revoked => "revoked",
        }
    }
}

impl fmt::Display for RouteState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A route state that is none of `pending`, `approved`, `revoked`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown route state {0:?}")]
pub struct UnknownRouteState(pub String);

impl FromStr for RouteState {
    type Err = UnknownRouteState;
    fn from_str(s: &str) -> Result<Self, UnknownRouteState> {
        match s {
            "pending" => Ok(RouteState::Pending),
            "approved" => Ok(RouteState::Approved),
            "revoked" => Ok(RouteState::Revoked),
            other => Err(UnknownRouteState(other.to_string())),
        }
    }
}

/// What an admin decides about one prefix of one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteDecision {
    Approve,
    Revoke,
}

impl fmt::Display for RouteDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RouteDecision::Approve => "approve",
            RouteDecision::Revoke => "revoke",
        })
    }
}

/// An admin's decision as it travels (`meshctl routes approve|revoke HOST PREFIX`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDecisionRequest {
    pub host: String,
    pub prefix: IpNet,
}

/// One prefix of one host as `meshctl routes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteInfo {
    pub host: String,
    pub prefix: IpNet,
    pub state: RouteState,
    /// Whether the host advertises it now (an approval outlives a withdrawal: it applies
    /// again when the host advertises the prefix again).
    pub advertised: bool,
    /// When an admin last decided (seconds since the UNIX epoch); `None`: never.
    #[serde(default)]
    pub decided_unix: Option<u64>,
}

/// Why a decision is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    #[error("{host} does not advertise {prefix}; approve only what a host advertises (its routes.advertise, listed by `meshctl routes`)")]
    NotAdvertised { host: String, prefix: IpNet },
    #[error("{host} neither advertises {prefix} nor has a decision on it; nothing to revoke")]
    Unknown { host: String, prefix: IpNet },
    #[error("{prefix} of {host} overlaps {other_prefix}, approved for {other_host}; an address routes to one host only: revoke that one first")]
    Overlap {
        host: String,
        prefix: IpNet,
        other_host: String,
        other_prefix: IpNet,
    },
}

/// The state of a prefix from the admin's last decision (none yet: pending).
pub fn state_of(decision: Option<RouteState>) -> RouteState {
    decision.unwrap_or(RouteState::Pending)
}

/// The approval state machine. `current` is the recorded decision (none: pending),
/// `advertised` whether the host advertises `prefix` now, `approved_elsewhere` the prefixes
/// approved for other live hosts. Returns the new state to record, or `None` when nothing
/// changes (approving an approved prefix, revoking a revoked one).
///
/// - approve: pending or revoked → approved, only while advertised and clear of every prefix
///   approved for another host;
/// - revoke: pending or approved → revoked (a pending one is thereby refused); a prefix the
///   host never advertised and nobody decided is unknown.
pub fn decide(
    host: &str,
    prefix: IpNet,
    current: Option<RouteState>,
    advertised: bool,
    approved_elsewhere: &[(String, IpNet)],
    decision: RouteDecision,
) -> Result<Option<RouteState>, DecisionError> {
    let state = state_of(current);
    match decision {
        RouteDecision::Approve => {
            if state == RouteState::Approved {
                return Ok(None);
            }
            if !advertised {
                return Err(DecisionError::NotAdvertised {
                    host: host.to_string(),
                    prefix,
                });
            }
            if let Some((other_host, other_prefix)) = approved_elsewhere
                .iter()
                .find(|(h, p)| h != host && overlaps(p, &prefix))
            {
                return Err(DecisionError::Overlap {
                    host: host.to_string(),
                    prefix,
                    other_host: other_host.clone(),
                    other_prefix: *other_prefix,
                });
            }
            Ok(Some(RouteState::Approved))
        }
        RouteDecision::Revoke => {
            if state == RouteState::Revoked {
                return Ok(None);
            }
            if current.is_none() && !advertised {
                return Err(DecisionError::Unknown {
                    host: host.to_string(),
                    prefix,
                });
            }
            Ok(Some(RouteState::Revoked))
        }
    }
}

/// The prefixes of a host that go into the netmaps: advertised and approved. Sorted.
pub fn granted(advertised: &[IpNet], decisions: &BTreeMap<IpNet, RouteState>) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = advertised
        .iter()
        .filter(|p| decisions.get(p) == Some(&RouteState::Approved))
        .copied()
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The listing of one host's prefixes: every advertised one (pending unless decided) and every
/// decided one it no longer advertises. Sorted by prefix.
pub fn route_list(
    host: &str,
    advertised: &[IpNet],
    decisions: &BTreeMap<IpNet, (RouteState, u64)>,
) -> Vec<RouteInfo> {
    let mut prefixes: BTreeSet<IpNet> = advertised.iter().copied().collect();
    prefixes.extend(decisions.keys().copied());
    prefixes
        .into_iter()
        .map(|prefix| {
            let d = decisions.get(&prefix);
            RouteInfo {
                host: host.to_string(),
                prefix,
                state: state_of(d.map(|(s, _)| *s)),
                advertised: advertised.contains(&prefix),
                decided_unix: d.map(|(_, at)| *at),
            }
        })
        .collect()
}

/// K3s's default cluster (pod) CIDR: never routed over the mesh.
pub const K3S_CLUSTER_CIDR: &str = "10.42.0.0/16";
/// K3s's default service CIDR: never routed over the mesh.
pub const K3S_SERVICE_CIDR: &str = "10.43.0.0/16";

/// Address space no peer's route may ever take on a receiver, whatever its configuration:
/// (prefix, what it is).
pub fn always_refused() -> Vec<(IpNet, &'static str)> {
    [
        ("0.0.0.0/8", "the unspecified/\"this network\" range"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("::/128", "the unspecified address"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
        (K3S_CLUSTER_CIDR, "K3s's cluster (pod) CIDR"),
        (K3S_SERVICE_CIDR, "K3s's service CIDR"),
    ]
    .into_iter()
    .filter_map(|(p, what)| p.parse().ok().map(|n| (n, what)))
    .collect()
}

/// Why a receiver skips a peer's prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum SkipReason {
    /// Not inside any `routes.accept` entry of the receiver.
    NotAccepted,
    /// A default route (/0).
    DefaultRoute,
    /// Inside (or containing) the mesh.
    Mesh { mesh: IpNet },
    /// Loopback, link-local, multicast, K3s's CIDRs, ...
    Reserved { range: IpNet, what: String },
    /// Overlaps the receiver's `routes.protected`.
    Protected { range: IpNet },
    /// Overlaps a route of the receiver's own that is not on the mesh interface (its LAN,
    /// flannel, docker, ...).
    Underlay { route: String },
    /// Contains the receiver's default gateway or an endpoint the tunnel travels to: the
    /// tunnel would carry its own underlay.
    UnderlayAddress { address: IpAddr, what: String },
    /// Overlaps an allowed IP of a `[[peer]]` in the receiver's own configuration (which
    /// wins).
    StaticPeer { peer: String, range: IpNet },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::NotAccepted => {
                f.write_str("not opted in (add it to routes.accept on this host to use it)")
            }
            SkipReason::DefaultRoute => f.write_str("a default route is never taken from a peer"),
            SkipReason::Mesh { mesh } => write!(f, "overlaps the mesh {mesh}"),
            SkipReason::Reserved { range, what } => write!(f, "overlaps {range} ({what})"),
            SkipReason::Protected { range } => write!(f, "overlaps routes.protected {range}"),
            SkipReason::Underlay { route } => write!(f, "overlaps this host's route {route}"),
            SkipReason::UnderlayAddress { address, what } => {
                write!(f, "contains {address} ({what})")
            }
            SkipReason::StaticPeer { peer, range } => write!(
                f,
                "overlaps {range} of the configured peer {peer} (the configuration wins)"
            ),
        }
    }
}

/// A peer's prefix the receiver did not take.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SkippedRoute {
    pub peer: String,
    pub prefix: IpNet,
    #[serde(flatten)]
    pub reason: SkipReason,
}

impl fmt::Display for SkippedRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} from {}: {}", self.prefix, self.peer, self.reason)
    }
}

/// What a receiver takes from peers, and what it knows about its own underlay.
#[derive(Debug, Clone, Copy)]
pub struct AcceptPolicy<'a> {
    /// `routes.accept`: the prefixes this host opts in to (a peer's prefix must lie inside
    /// one of them).
    pub accept: &'a [IpNet],
    /// `routes.protected`.
    pub protected: &'a [IpNet],
    /// The mesh interface: routes on it are ours, not the underlay.
    pub our_dev: &'a str,
    /// Every route of the system (all tables), as listed last.
    pub system_routes: &'a [SystemRoute],
    /// Addresses the tunnel itself travels to that no member chooses: the coordinator's
    /// endpoints, the configured peers' endpoints.
    pub endpoints: &'a [IpAddr],
    /// The allowed IPs of the `[[peer]]`s of the receiver's configuration, by peer name.
    pub static_peers: &'a [(String, IpNet)],
}

/// The first reason `prefix` (from a peer) must be refused, if any. The hard refusals come
/// before the opt-in, so the reason names the real obstacle.
pub fn refusal(prefix: &IpNet, mesh: IpNet, policy: &AcceptPolicy<'_>) -> Option<SkipReason> {
    let prefix = prefix.trunc();
    if prefix.prefix_len() == 0 {
        return Some(SkipReason::DefaultRoute);
    }
    if overlaps(&prefix, &mesh.trunc()) {
        return Some(SkipReason::Mesh { mesh: mesh.trunc() });
    }
    if let Some((range, what)) = always_refused()
        .into_iter()
        .find(|(r, _)| overlaps(r, &prefix))
    {
        return Some(SkipReason::Reserved {
            range,
            what: what.to_string(),
        });
    }
    if let Some(p) = policy.protected.iter().find(|p| overlaps(p, &prefix)) {
        return Some(SkipReason::Protected { range: *p });
    }
    for r in policy.system_routes {
        if r.dev.as_deref() == Some(policy.our_dev) {
            continue;
        }
        if r.dst.prefix_len() == 0 {
            if let Some(gw) = r.gateway.filter(|g| prefix.contains(g)) {
                return Some(SkipReason::UnderlayAddress {
                    address: gw,
                    what: "this host's default gateway".into(),
                });
            }
            continue;
        }
        if overlaps(&prefix, &r.dst) {
            return Some(SkipReason::Underlay {
                route: r.to_string(),
            });
        }
    }
    if let Some((peer, range)) = policy
        .static_peers
        .iter()
        .find(|(_, r)| overlaps(r, &prefix))
    {
        return Some(SkipReason::StaticPeer {
            peer: peer.clone(),
            range: *range,
        });
    }
    if let Some(a) = policy.endpoints.iter().find(|a| prefix.contains(*a)) {
        return Some(SkipReason::UnderlayAddress {
            address: *a,
            what: "an endpoint the tunnel travels to".into(),
        });
    }
    if !policy.accept.iter().any(|a| a.contains(&prefix)) {
        return Some(SkipReason::NotAccepted);
    }
    None
}

/// The netmap this receiver applies: every peer's prefixes beyond its own mesh address are
/// checked with [`refusal`]; refused ones are left out of that peer's allowed IPs (so neither
/// WireGuard nor the routes carry them) and returned, sorted. Everything else is untouched.
pub fn accept_netmap(netmap: &Netmap, policy: &AcceptPolicy<'_>) -> (Netmap, Vec<SkippedRoute>) {
    let mut out = netmap.clone();
    let mut skipped = Vec::new();
    for p in &mut out.peers {
        let own = IpNet::from(p.address);
        p.allowed_ips.retain(|prefix| {
            if *prefix == own {
                return true;
            }
            match refusal(prefix, netmap.mesh_cidr, policy) {
                None => true,
                Some(reason) => {
                    skipped.push(SkippedRoute {
                        peer: p.name.clone(),
                        prefix: *prefix,
                        reason,
                    });
                    false
                }
            }
        });
    }
    skipped.sort();
    skipped.dedup();
    (out, skipped)
}

#[cfg(test)]
mod grant_tests {
    use super::*;
    use crate::key::PublicKey;
    use crate::netmap::NetmapPeer;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    #[test]
    fn approval_state_machine() {
        let p = net("192.168.1.20/32");
        let d = |cur, adv, dec| decide("dock-edge", p, cur, adv, &[], dec);
        // Advertised, undecided: pending; approve → approved; again: no change.
        assert_eq!(state_of(None), RouteState::Pending);
        assert_eq!(
            d(None, true, RouteDecision::Approve),
            Ok(Some(RouteState::Approved))
        );
        assert_eq!(
            d(Some(RouteState::Approved), true, RouteDecision::Approve),
            Ok(None)
        );
        // Revoke approved or pending → revoked; again: no change; approve again → approved.
        assert_eq!(
            d(Some(RouteState::Approved), true, RouteDecision::Revoke),
            Ok(Some(RouteState::Revoked))
        );
        assert_eq!(
            d(None, true, RouteDecision::Revoke),
            Ok(Some(RouteState::Revoked))
        );
        assert_eq!(
            d(Some(RouteState::Revoked), true, RouteDecision::Revoke),
            Ok(None)
        );
        assert_eq!(
            d(Some(RouteState::Revoked), true, RouteDecision::Approve),
            Ok(Some(RouteState::Approved))
        );
        // Not advertised: no approval; revoking an approval it no longer advertises works.
        let e = d(None, false, RouteDecision::Approve).unwrap_err();
        assert!(
            e.to_string().contains("does not advertise 192.168.1.20/32"),
            "{e}"
        );
        assert!(matches!(
            d(None, false, RouteDecision::Revoke),
            Err(DecisionError::Unknown { .. })
        ));
        assert_eq!(
            d(Some(RouteState::Approved), false, RouteDecision::Revoke),
            Ok(Some(RouteState::Revoked))
        );
        // One address routes to one host only.
        let taken = vec![("dock-mirror".to_string(), net("192.168.1.0/24"))];
        let e = decide("dock-edge", p, None, true, &taken, RouteDecision::Approve).unwrap_err();
        assert!(e.to_string().contains("approved for dock-mirror"), "{e}");
        assert_eq!(
            decide("dock-mirror", p, None, true, &taken, RouteDecision::Approve),
            Ok(Some(RouteState::Approved)),
            "its own approvals do not count"
        );
    }

    #[test]
    fn only_advertised_and_approved_prefixes_are_granted() {
        let mut decisions = BTreeMap::new();
        decisions.insert(net("192.168.1.20/32"), RouteState::Approved);
        decisions.insert(net("8.8.8.8/32"), RouteState::Revoked);
        decisions.insert(net("10.1.0.0/16"), RouteState::Approved);
        let advertised = [net("8.8.8.8/32"), net("1.1.1.0/24"), net("192.168.1.20/32")];
        assert_eq!(
            granted(&advertised, &decisions),
            vec![net("192.168.1.20/32")]
        );
        let mut with_at = BTreeMap::new();
        for (k, v) in &decisions {
            with_at.insert(*k, (*v, 7));
        }
        let list = route_list("h", &advertised, &with_at);
        let shown: Vec<String> = list
            .iter()
            .map(|r| format!("{} {} {}", r.prefix, r.state, r.advertised))
            .collect();
        assert_eq!(
            shown,
            [
                "1.1.1.0/24 pending true",
                "8.8.8.8/32 revoked true",
                "10.1.0.0/16 approved false",
                "192.168.1.20/32 approved true"
            ]
        );
    }

    fn sysroute(dst: &str, dev: &str, gateway: Option<&str>) -> SystemRoute {
        SystemRoute {
            table: TABLE_MAIN,
            dst: net(dst),
            dev: Some(dev.into()),
            protocol: 2,
            kind: "unicast".into(),
            gateway: gateway.map(|g| g.parse().expect("ip")),
        }
    }

    fn netmap_with(extra: &[(&str, &[&str])]) -> Netmap {
        Netmap {
            version: 1,
            mesh_cidr: net("10.99.99.0/24"),
            name: "dock-load".into(),
            address: "10.99.99.1".parse().expect("ip"),
            public_key: PublicKey([1; 32]),
            peers: extra
                .iter()
                .enumerate()
                .map(|(i, (name, prefixes))| {
                    let address: IpAddr = format!("10.99.99.{}", i + 2).parse().expect("ip");
                    let mut allowed_ips = vec![IpNet::from(address)];
                    allowed_ips.extend(prefixes.iter().map(|p| net(p)));
                    NetmapPeer {
                        name: name.to_string(),
                        address,
                        public_key: PublicKey([i as u8 + 2; 32]),
                        allowed_ips,
                        endpoints: vec![],
                        persistent_keepalive: None,
                        static_peer: false,
                        admin: false,
                        key_created_unix: 0,
                        next_public_key: None,
                    }
                })
                .collect(),
            rotate_requested: false,
            ungranted_routes: Vec::new(),
        }
    }

    #[test]
    fn receivers_take_only_what_they_opt_in_to_and_never_the_forbidden_space() {
        let routes = vec![
            sysroute("0.0.0.0/0", "eth0", Some("198.51.100.254")),
            sysroute("198.51.100.0/24", "eth0", None),
            sysroute("10.99.99.0/24", "wgmesh0", None),
        ];
        let accept = [
            net("192.168.1.0/24"),
            net("8.0.0.0/8"),
            net("203.0.113.0/24"),
        ];
        let endpoints: Vec<IpAddr> = vec!["203.0.113.9".parse().expect("ip")];
        let policy = AcceptPolicy {
            accept: &accept,
            protected: &[],
            our_dev: "wgmesh0",
            system_routes: &routes,
            endpoints: &endpoints,
            static_peers: &[],
        };
        let nm = netmap_with(&[
            ("dock-edge", &["192.168.1.20/32"]),
            (
                "evil",
                &[
                    "127.0.0.0/8",
                    "8.8.8.8/32",
                    "1.1.1.0/24",
                    "10.42.0.0/24",
                    "198.51.100.0/25",
                    "198.51.100.100/32",
                    "224.0.0.0/8",
                    "169.254.0.0/16",
                    "203.0.113.0/24",
                    "10.99.99.128/25",
                    "0.0.0.0/0",
                ],
            ),
        ]);
        let (applied, skipped) = accept_netmap(&nm, &policy);
        let edge = &applied.peers[0];
        assert_eq!(
            edge.allowed_ips,
            vec![net("10.99.99.2/32"), net("192.168.1.20/32")]
        );
        let evil = &applied.peers[1];
        // 8.8.8.8/32 is inside an accept entry and clear of everything: taken.
        assert_eq!(
            evil.allowed_ips,
            vec![net("10.99.99.3/32"), net("8.8.8.8/32")]
        );
        let text: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        for want in [
            "127.0.0.0/8 from evil: overlaps 127.0.0.0/8 (loopback)",
            "1.1.1.0/24 from evil: not opted in",
            "10.42.0.0/24 from evil: overlaps 10.42.0.0/16 (K3s's cluster (pod) CIDR)",
            "198.51.100.0/25 from evil: overlaps this host's route 198.51.100.0/24 dev eth0",
            "224.0.0.0/8 from evil: overlaps 224.0.0.0/4 (multicast)",
            "169.254.0.0/16 from evil: overlaps 169.254.0.0/16 (link-local)",
            "203.0.113.0/24 from evil: contains 203.0.113.9 (an endpoint the tunnel travels to)",
            "10.99.99.128/25 from evil: overlaps the mesh 10.99.99.0/24",
            "0.0.0.0/0 from evil: a default route",
        ] {
            assert!(text.iter().any(|t| t.starts_with(want)), "{want}: {text:?}");
        }
        assert_eq!(skipped.len(), 10, "{text:?}");
        // The gateway rule, on its own (no connected route holds it).
        let gw_only = vec![sysroute("0.0.0.0/0", "eth0", Some("192.0.2.1"))];
        let accept = [net("192.0.2.0/24")];
        let p = AcceptPolicy {
            accept: &accept,
            system_routes: &gw_only,
            endpoints: &[],
            ..policy
        };
        assert_eq!(
            refusal(&net("192.0.2.0/24"), nm.mesh_cidr, &p).map(|r| r.to_string()),
            Some("contains 192.0.2.1 (this host's default gateway)".into())
        );
        // A configured [[peer]] holds the space: the configuration wins, only the prefix goes.
        let statics = vec![("nas".to_string(), net("8.8.8.0/24"))];
        let p = AcceptPolicy {
            static_peers: &statics,
            ..policy
        };
        assert_eq!(
            refusal(&net("8.8.8.8/32"), nm.mesh_cidr, &p).map(|r| r.to_string()),
            Some("overlaps 8.8.8.0/24 of the configured peer nas (the configuration wins)".into())
        );
        // Nothing opted in: nothing beyond the mesh addresses.
        let none = AcceptPolicy {
            accept: &[],
            ..policy
        };
        let (applied, _) = accept_netmap(&nm, &none);
        assert!(applied.peers.iter().all(|p| p.allowed_ips.len() == 1));
    }

    fn arb_prefix() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, l)| IpNet::from(
                ipnet::Ipv4Net::new(a.into(), l).expect("len").trunc()
            )),
            (prop::sample::select(vec![
                "127.0.0.0/8",
                "10.99.99.0/25",
                "192.168.1.0/24",
                "10.42.3.0/24",
                "0.0.0.0/0",
                "198.51.100.0/24",
                "8.8.8.8/32",
                "1.1.1.0/24",
                "169.254.1.0/24"
            ]))
            .prop_map(net),
        ]
    }

    #[derive(Debug, Clone)]
    enum RegOp {
        Advertise(usize, Vec<IpNet>),
        Decide(usize, IpNet, RouteDecision),
    }

    fn arb_reg_op() -> impl Strategy<Value = RegOp> {
        let prefix = prop::sample::select(vec![
            "192.168.1.0/24",
            "192.168.1.20/32",
            "8.8.8.8/32",
            "10.1.0.0/16",
            "10.1.2.0/24",
        ])
        .prop_map(net);
        prop_oneof![
            (0usize..3, prop::collection::vec(prefix.clone(), 0..3))
                .prop_map(|(h, ps)| RegOp::Advertise(h, ps)),
            (
                0usize..3,
                prefix,
                prop::sample::select(vec![RouteDecision::Approve, RouteDecision::Revoke])
            )
                .prop_map(|(h, p, d)| RegOp::Decide(h, p, d)),
        ]
    }

    proptest! {
        /// Whatever hosts advertise and admins decide, in any order: a host's granted prefixes
        /// are ones it advertises and an admin approved, nothing is approved that was not
        /// advertised at the time, and no two hosts' approved prefixes ever overlap.
        #[test]
        fn approvals_never_grant_unadvertised_or_overlapping_space(
            ops in prop::collection::vec(arb_reg_op(), 0..24),
        ) {
            let names = ["a", "b", "c"];
            let mut advertised: Vec<Vec<IpNet>> = vec![Vec::new(); 3];
            let mut decisions: Vec<BTreeMap<IpNet, RouteState>> = vec![BTreeMap::new(); 3];
            for op in ops {
                match op {
                    RegOp::Advertise(h, ps) => advertised[h] = ps,
                    RegOp::Decide(h, p, d) => {
                        let elsewhere: Vec<(String, IpNet)> = (0..3)
                            .filter(|o| *o != h)
                            .flat_map(|o| {
                                decisions[o]
                                    .iter()
                                    .filter(|(_, s)| **s == RouteState::Approved)
                                    .map(move |(q, _)| (names[o].to_string(), *q))
                            })
                            .collect();
                        let cur = decisions[h].get(&p).copied();
                        match decide(names[h], p, cur, advertised[h].contains(&p), &elsewhere, d) {
                            Ok(Some(next)) => {
                                if next == RouteState::Approved {
                                    prop_assert!(advertised[h].contains(&p));
                                }
                                decisions[h].insert(p, next);
                            }
                            Ok(None) => {}
                            Err(_) => {}
                        }
                    }
                }
                for h in 0..3 {
                    for g in granted(&advertised[h], &decisions[h]) {
                        prop_assert!(advertised[h].contains(&g));
                        prop_assert_eq!(decisions[h].get(&g), Some(&RouteState::Approved));
                    }
                    for o in (0..3).filter(|o| *o != h) {
                        for (p, s) in &decisions[h] {
                            for (q, t) in &decisions[o] {
                                if *s == RouteState::Approved && *t == RouteState::Approved {
                                    prop_assert!(!overlaps(p, q), "{} and {} both approved", p, q);
                                }
                            }
                        }
                    }
                }
            }
        }

        /// A refused prefix never reaches the applied netmap (nor, through it, a route); every
        /// other entry of the netmap is applied unchanged.
        #[test]
        fn refused_prefixes_never_apply_and_the_rest_does(
            prefixes in prop::collection::vec(prop::collection::vec(arb_prefix(), 0..5), 1..4),
            accept in prop::collection::vec(arb_prefix(), 0..3),
            protected in prop::collection::vec(arb_prefix(), 0..2),
        ) {
            let routes = vec![
                sysroute("0.0.0.0/0", "eth0", Some("192.168.1.1")),
                sysroute("192.168.1.0/24", "eth0", None),
            ];
            let policy = AcceptPolicy {
                accept: &accept,
                protected: &protected,
                our_dev: "wgmesh0",
                system_routes: &routes,
                endpoints: &[],
                static_peers: &[],
            };
            let owned: Vec<(String, Vec<String>)> = prefixes
                .iter()
                .enumerate()
                .map(|(i, ps)| (format!("p{i}"), ps.iter().map(ToString::to_string).collect()))
                .collect();
            let borrowed: Vec<Vec<&str>> =
                owned.iter().map(|(_, ps)| ps.iter().map(String::as_str).collect()).collect();
            let spec: Vec<(&str, &[&str])> = owned
                .iter()
                .zip(&borrowed)
                .map(|((n, _), ps)| (n.as_str(), ps.as_slice()))
                .collect();
            let nm = netmap_with(&spec);
            let (applied, skipped) = accept_netmap(&nm, &policy);
            prop_assert_eq!(applied.peers.len(), nm.peers.len());
            for (a, orig) in applied.peers.iter().zip(&nm.peers) {
                prop_assert!(a.allowed_ips.contains(&IpNet::from(a.address)));
                prop_assert_eq!(&a.endpoints, &orig.endpoints);
                prop_assert_eq!(a.public_key, orig.public_key);
                for p in &orig.allowed_ips {
                    let refused = skipped.iter().any(|s| s.peer == orig.name && s.prefix == *p);
                    prop_assert_eq!(a.allowed_ips.contains(p), !refused || *p == IpNet::from(a.address));
                    if a.allowed_ips.contains(p) && *p != IpNet::from(a.address) {
                        prop_assert!(refusal(p, nm.mesh_cidr, &policy).is_none());
                        prop_assert!(accept.iter().any(|x| x.contains(p)));
                        prop_assert!(!overlaps(p, &net("127.0.0.0/8")));
                        prop_assert!(!overlaps(p, &net("192.168.1.0/24")));
                        prop_assert!(!overlaps(p, &nm.mesh_cidr));
                        prop_assert!(p.prefix_len() != 0);
                    }
                }
            }
            // The routes the receiver wants never include a refused prefix.
            let specs: Vec<PeerSpec> = applied
                .peers
                .iter()
                .map(|p| PeerSpec {
                    public_key: p.public_key,
                    preshared_key: None,
                    endpoint: None,
                    allowed_ips: p.allowed_ips.clone(),
                    persistent_keepalive: None,
                })
                .collect();
            for r in desired_routes(net("10.99.99.1/24"), &specs) {
                if r == nm.mesh_cidr {
                    continue;
                }
                prop_assert!(refusal(&r, nm.mesh_cidr, &policy).is_none(), "{} routed", r);
            }
            prop_assert_eq!(accept_netmap(&nm, &policy), (applied, skipped));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::PrivateKey;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn route(dst: &str, dev: Option<&str>, protocol: u8) -> SystemRoute {
        SystemRoute {
            table: TABLE_MAIN,
            dst: net(dst),
            dev: dev.map(str::to_string),
            protocol,
            kind: "unicast".into(),
            gateway: None,
        }
    }

    fn peer(i: u8, allowed: &[&str]) -> PeerSpec {
        PeerSpec {
            public_key: PrivateKey::from_bytes([i; 32]).public_key(),
            preshared_key: None,
            endpoint: None,
            allowed_ips: allowed.iter().map(|s| net(s)).collect(),
            persistent_keepalive: None,
        }
    }

    #[test]
    fn the_packaged_rt_protos_file_names_our_number() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/iproute2/rt_protos.d/meshd.conf"
        );
        let file =
            std::fs::read_to_string(path).expect("packaging/iproute2/rt_protos.d/meshd.conf");
        let lines: Vec<&str> = file.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines, vec![protocol_name_line().as_str()]);
    }

    #[test]
    fn protocol_line_names_our_number() {
        assert_eq!(protocol_name_line(), "171 meshd");
        assert_eq!(protocol_name(RT_PROTO_MESHD), "meshd");
        assert_eq!(protocol_name(2), "kernel");
        assert_eq!(protocol_name(200), "200");
    }

    #[test]
    fn conflict_names_the_other_owner() {
        let existing = vec![
            route("10.42.0.0/16", Some("flannel-wg"), 2),
            route("0.0.0.0/0", Some("eth0"), 16),
            route("10.99.99.0/24", Some("wgmesh0"), RT_PROTO_MESHD),
        ];
        let c = conflicts(
            &[net("10.99.99.0/24"), net("10.42.5.0/24")],
            &existing,
            "wgmesh0",
            &[],
        );
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(
            c[0].to_string(),
            "10.42.5.0/24 overlaps 10.42.0.0/16 dev flannel-wg (table main, proto kernel)"
        );
    }

    #[test]
    fn protected_cidrs_conflict_too_and_other_tables_count() {
        let mut local = route("172.17.0.1/32", Some("docker0"), 2);
        local.table = TABLE_LOCAL;
        local.kind = "local".into();
        let c = conflicts(
            &[net("10.43.0.0/24"), net("172.16.0.0/12")],
            &[local],
            "wgmesh0",
            &[net("10.43.0.0/16")],
        );
        let s: Vec<String> = c.iter().map(ToString::to_string).collect();
        assert_eq!(
            s,
            vec![
                "10.43.0.0/24 overlaps routes.protected 10.43.0.0/16".to_string(),
                "172.16.0.0/12 overlaps local 172.17.0.1/32 dev docker0 (table local, proto kernel)"
                    .to_string(),
            ]
        );
    }

    #[test]
    fn families_never_overlap() {
        assert!(!overlaps(&net("::/0"), &net("10.0.0.0/8")));
        assert!(overlaps(&net("fd00::/8"), &net("fd00:1::/64")));
    }

    #[test]
    fn desired_routes_are_the_mesh_plus_outside_allowed_ips() {
        let peers = vec![
            peer(1, &["10.99.99.2/32", "192.168.1.20/32"]),
            peer(2, &["10.99.99.3/32", "0.0.0.0/0", "10.99.99.0/25"]),
            peer(3, &["10.99.99.4/32", "fd00::4/128"]),
        ];
        let got = desired_routes(net("10.99.99.1/24"), &peers);
        assert_eq!(
            got,
            vec![
                net("10.99.99.0/24"),
                net("192.168.1.20/32"),
                net("fd00::4/128")
            ]
        );
    }

    #[test]
    fn plan_adds_missing_removes_only_our_stale_and_takes_over_the_kernel_prefix() {
        let existing = vec![
            route("10.99.99.0/24", Some("wgmesh0"), 2),
            route("192.168.9.0/24", Some("wgmesh0"), RT_PROTO_MESHD),
            route("192.168.7.0/24", Some("wgmesh0"), 4),
            route("192.168.8.0/24", Some("eth0"), RT_PROTO_MESHD),
            route("192.168.6.0/24", Some("wgmesh0"), 4),
        ];
        let wanted = [
            net("10.99.99.0/24"),
            net("192.168.1.0/24"),
            net("192.168.6.0/24"),
        ];
        let ops = plan_routes(&wanted, &existing, "wgmesh0", &[]);
        assert_eq!(
            ops,
            vec![
                RouteOp::TakeOver(net("10.99.99.0/24")),
                RouteOp::Add(net("192.168.1.0/24")),
                RouteOp::Remove(route("192.168.9.0/24", Some("wgmesh0"), RT_PROTO_MESHD)),
            ]
        );
        assert_eq!(
            ops[2].to_string(),
            "remove our route 192.168.9.0/24 dev wgmesh0 (table main, proto meshd)"
        );
    }

    #[test]
    fn firewall_renders_an_atomic_replacement_of_our_table_only() {
        let fw = Firewall {
            table: "meshd".into(),
            interface: "wgmesh0".into(),
            advertise: vec![net("192.168.1.20/32")],
            limit_forwarding_from: vec!["wgmesh0".into(), "eth0".into()],
        };
        let text = fw.render();
        assert!(
            text.starts_with("table inet meshd {}\ndelete table inet meshd\ntable inet meshd {\n")
        );
        assert!(text.contains(
            "iifname \"wgmesh0\" oifname != \"wgmesh0\" ip daddr @advertised4 masquerade"
        ));
        assert!(text.contains(
            "iifname \"wgmesh0\" ip daddr @advertised4 accept\n\t\tiifname \"wgmesh0\" drop"
        ));
        assert!(text
            .contains("iifname \"eth0\" oifname \"wgmesh0\" ct state established,related accept"));
        for line in text.lines() {
            assert!(
                !line.contains("table") || line.contains("inet meshd"),
                "{line}"
            );
            assert!(!line.contains("flush"), "{line}");
        }
        let none = Firewall {
            limit_forwarding_from: vec![],
            ..fw.clone()
        };
        assert!(
            !none.render().contains("chain forward"),
            "no drops unless we enabled forwarding"
        );
        // The fingerprint follows the content and only the content.
        let print = fw.fingerprint();
        assert_eq!(print, fw.clone().fingerprint());
        assert_ne!(print, none.fingerprint());
        let hex = print.strip_prefix("meshd ").expect("prefix");
        assert_eq!(hex.len(), 16);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{print}");
        let empty = Firewall {
            advertise: vec![],
            ..fw
        };
        assert_eq!(empty.render(), Firewall::render_removal("meshd"));
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        (0u8..4, 0u8..4, 8u8..=32).prop_map(|(a, b, len)| {
            IpNet::new(std::net::Ipv4Addr::new(10, a * 16, b, 0).into(), len)
                .expect("len")
                .trunc()
        })
    }

    fn arb_route() -> impl Strategy<Value = SystemRoute> {
        (
            arb_net(),
            prop::sample::select(vec!["wgmesh0", "flannel-wg", "eth0"]),
            prop::sample::select(vec![2u8, 4, RT_PROTO_MESHD]),
            prop::sample::select(vec![TABLE_MAIN, TABLE_LOCAL, 100]),
        )
            .prop_map(|(dst, dev, protocol, table)| SystemRoute {
                table,
                dst,
                dev: Some(dev.to_string()),
                protocol,
                kind: "unicast".into(),
                gateway: None,
            })
    }

    /// Apply a plan the way the kernel would.
    fn apply(existing: &mut Vec<SystemRoute>, ops: &[RouteOp], dev: &str) {
        for op in ops {
            match op {
                RouteOp::Add(n) => existing.push(route(&n.to_string(), Some(dev), RT_PROTO_MESHD)),
                RouteOp::TakeOver(n) => {
                    existing.retain(|r| {
                        !(r.table == TABLE_MAIN
                            && r.dst == *n
                            && r.protocol == 2
                            && r.dev.as_deref() == Some(dev))
                    });
                    existing.push(route(&n.to_string(), Some(dev), RT_PROTO_MESHD));
                }
                RouteOp::Remove(r) => existing.retain(|x| x != r),
            }
        }
    }

    proptest! {
        /// Conflicts never involve our own interface or default routes, and every
        /// non-conflicting wanted route really is clear of foreign routes.
        #[test]
        fn conflicts_are_exact(
            wanted in prop::collection::vec(arb_net(), 0..5),
            existing in prop::collection::vec(arb_route(), 0..8),
            protected in prop::collection::vec(arb_net(), 0..2),
        ) {
            let c = conflicts(&wanted, &existing, "wgmesh0", &protected);
            for w in &wanted {
                let expect = existing.iter().any(|r| r.dev.as_deref() != Some("wgmesh0") && overlaps(w, &r.dst))
                    || protected.iter().any(|p| overlaps(w, p));
                prop_assert_eq!(expect, c.iter().any(|x| x.wanted == *w));
            }
            prop_assert!(c.iter().all(|x| !x.owner.contains("dev wgmesh0")));
            prop_assert_eq!(c.clone(), conflicts(&wanted, &existing, "wgmesh0", &protected));
        }

        /// The plan converges, re-running it is a no-op, and it never removes a route that is
        /// not ours.
        #[test]
        fn plan_converges_and_spares_foreign_routes(
            wanted in prop::collection::vec(arb_net(), 0..5),
            existing in prop::collection::vec(arb_route(), 0..8),
        ) {
            let mut sys = existing.clone();
            sys.sort();
            sys.dedup();
            let ops = plan_routes(&wanted, &sys, "wgmesh0", &[]);
            for op in &ops {
                if let RouteOp::Remove(r) = op {
                    prop_assert!(r.is_ours("wgmesh0"));
                }
            }
            apply(&mut sys, &ops, "wgmesh0");
            let again = plan_routes(&wanted, &sys, "wgmesh0", &[]);
            prop_assert!(again.is_empty(), "{:?}", again);
            for r in &existing {
                let taken_over = r.protocol == 2 && r.table == TABLE_MAIN && r.dev.as_deref() == Some("wgmesh0");
                if !r.is_ours("wgmesh0") && !taken_over {
                    prop_assert!(sys.contains(r), "foreign route {} removed", r);
                }
            }
        }
    }
}
