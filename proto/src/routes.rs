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

use std::collections::BTreeSet;
use std::fmt;

use ipnet::IpNet;

use crate::device::PeerSpec;

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
