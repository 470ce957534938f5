//! Routes over real netlink, IPv4 forwarding sysctls and our nftables table (`nft -f -`).
//!
//! Ownership is marked: our routes carry `rtm_protocol` [`RT_PROTO_MESHD`] on our interface,
//! our rules live in `table inet <routes.nft_table>` only, and the forwarding sysctls we turned
//! on are recorded (with their previous values) in `<state_dir>/forwarding.json`. Nothing else
//! is ever removed or restored. The decisions are mesh-proto's (`mesh_proto::routes`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnet::IpNet;
use mesh_proto::routes::{
    conflicts, desired_routes, Firewall, RouteConflict, RouteOp, SystemRoute, RT_PROTO_MESHD,
    TABLE_MAIN,
};
use mesh_proto::PeerSpec;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::error::{Error, Result};
use crate::netsys::firewall::{self, FirewallState};
use crate::runtime::settings::Settings;

fn nl(what: &str, e: rtnetlink::Error) -> Error {
    Error::Netlink(format!("{what}: {e}"))
}

/// Interface index → name, for every interface.
pub async fn link_names(handle: &Handle) -> Result<BTreeMap<u32, String>> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut out = BTreeMap::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links
        .try_next()
        .await
        .map_err(|e| nl("cannot list interfaces", e))?
    {
        if let Some(name) = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        }) {
            out.insert(msg.header.index, name);
        }
    }
    Ok(out)
}

fn kind_name(kind: RouteType) -> String {
    match kind {
        RouteType::Unicast => "unicast".into(),
        RouteType::Local => "local".into(),
        RouteType::Broadcast => "broadcast".into(),
        RouteType::Anycast => "anycast".into(),
        RouteType::Multicast => "multicast".into(),
        RouteType::BlackHole => "blackhole".into(),
        RouteType::Unreachable => "unreachable".into(),
        RouteType::Prohibit => "prohibit".into(),
        RouteType::Throw => "throw".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn to_system(msg: &RouteMessage, names: &BTreeMap<u32, String>) -> Option<SystemRoute> {
    let len = msg.header.destination_prefix_length;
    let mut dst = None;
    let mut table = u32::from(msg.header.table);
    let mut oif = None;
    let mut gateway = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => dst = Some(IpAddr::V4(*v4)),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => dst = Some(IpAddr::V6(*v6)),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(v4)) => gateway = Some(IpAddr::V4(*v4)),
            RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => gateway = Some(IpAddr::V6(*v6)),
            _ => {}
        }
    }
    let dst = match (dst, msg.header.address_family) {
        (Some(ip), _) => ip,
        (None, AddressFamily::Inet) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        (None, _) => return None,
    };
    Some(SystemRoute {
        table,
        dst: IpNet::new(dst, len).ok()?.trunc(),
        dev: oif.map(|i| names.get(&i).cloned().unwrap_or_else(|| format!("if{i}"))),
        protocol: u8::from(msg.header.protocol),
        kind: kind_name(msg.header.kind),
        gateway,
    })
}

/// Every route of every table, IPv4 and IPv6, with the kernel's messages (for deletion).
async fn list(handle: &Handle) -> Result<Vec<(SystemRoute, RouteMessage)>> {
    let names = link_names(handle).await?;
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        // A zeroed header: table 0, protocol 0, type 0 means "all" under strict checking (the
        // builder's defaults would filter on main/static/unicast and return nothing).
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        let mut stream = handle.route().get(msg).execute();
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(|e| nl("cannot list routes", e))?
        {
            if let Some(r) = to_system(&m, &names) {
                out.push((r, m));
            }
        }
    }
    Ok(out)
}

/// All routes of all tables, v4 and v6.
pub async fn system_routes(handle: &Handle) -> Result<Vec<SystemRoute>> {
    Ok(list(handle).await?.into_iter().map(|(r, _)| r).collect())
}

async fn ifindex(handle: &Handle, name: &str) -> Result<Option<u32>> {
    Ok(link_names(handle)
        .await?
        .into_iter()
        .find(|(_, n)| n == name)
        .map(|(i, _)| i))
}

fn our_route(dst: IpNet, index: u32) -> RouteMessage {
    let scope = match dst {
        IpNet::V4(_) => RouteScope::Link,
        IpNet::V6(_) => RouteScope::Universe,
    };
    let mut msg = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .map(|b| b.build())
        .unwrap_or_default();
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::from(RT_PROTO_MESHD);
    msg.header.scope = scope;
    msg.header.kind = RouteType::Unicast;
    msg.attributes.push(RouteAttribute::Oif(index));
    msg
}

/// Apply route ops on `interface`. Removals touch only routes with our mark on our interface
/// (checked again here). Returns one line per failed op; the others are applied.
pub async fn apply_routes(
    handle: &Handle,
    interface: &str,
    ops: &[RouteOp],
) -> Result<Vec<String>> {
    let Some(index) = ifindex(handle, interface).await? else {
        return Err(Error::Netlink(format!(
            "interface {interface} does not exist"
        )));
    };
    let mut failed = Vec::new();
    let existing = if ops.iter().any(|o| matches!(o, RouteOp::Remove(_))) {
        list(handle).await?
    } else {
        Vec::new()
    };
    for op in ops {
        let res = match op {
            RouteOp::Add(dst) => handle.route().add(our_route(*dst, index)).execute().await,
            RouteOp::TakeOver(dst) => {
                let mut msg = our_route(*dst, index);
                if let IpNet::V6(_) = dst {
                    // The kernel's IPv6 prefix route has metric 256: replace that one.
                    msg.attributes.push(RouteAttribute::Priority(256));
                }
                handle.route().add(msg).replace().execute().await
            }
            RouteOp::Remove(r) => {
                if !r.is_ours(interface) || r.table != TABLE_MAIN {
                    failed.push(format!("{op}: not ours, left alone"));
                    continue;
                }
                let mut res = Ok(());
                for (_, m) in existing.iter().filter(|(s, _)| s == r) {
                    if u8::from(m.header.protocol) != RT_PROTO_MESHD {
                        continue;
                    }
                    res = handle.route().del(m.clone()).execute().await;
                    if res.is_err() {
                        break;
                    }
                }
                res
            }
        };
        match res {
            Ok(()) => tracing::info!(interface, op = %op, "route"),
            Err(e) => {
                tracing::error!(interface, op = %op, error = %e, "route op failed");
                failed.push(format!("{op}: {e}"));
            }
        }
    }
    Ok(failed)
}

/// The interface the kernel sends `net`'s traffic through now (`ip route get`).
pub async fn egress_interface(handle: &Handle, net: IpNet) -> Result<Option<String>> {
    let mut msg = RouteMessage::default();
    msg.header.address_family = match net {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    msg.header.destination_prefix_length = net.max_prefix_len();
    msg.attributes
        .push(RouteAttribute::Destination(match net.addr() {
            IpAddr::V4(a) => RouteAddress::Inet(a),
            IpAddr::V6(a) => RouteAddress::Inet6(a),
        }));
    let mut stream = handle.route().get(msg).execute();
    let found = match stream.try_next().await {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(None),
        // No route (ENETUNREACH and friends): nothing to forward through.
        Err(rtnetlink::Error::NetlinkError(_)) => return Ok(None),
        Err(e) => return Err(nl(&format!("cannot look up the route to {net}"), e)),
    };
    let oif = found.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    let Some(oif) = oif else { return Ok(None) };
    Ok(link_names(handle).await?.get(&oif).cloned())
}

// ---- forwarding sysctls ----

const FORWARDING_RECORD: &str = "forwarding.json";

fn forwarding_path(interface: &str) -> PathBuf {
    crate::netsys::sysctl::ipv4_conf(interface, "forwarding")
}

/// The forwarding sysctls meshd changed: `/proc/sys/...` path → value before meshd.
pub type ForwardingRecord = BTreeMap<String, String>;

fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join(FORWARDING_RECORD)
}

pub fn load_record(state_dir: &Path) -> Result<ForwardingRecord> {
    let path = record_path(state_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::State {
            path,
            message: format!("not a forwarding record: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ForwardingRecord::new()),
        Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
    }
}

fn save_record(state_dir: &Path, record: &ForwardingRecord) -> Result<()> {
    let path = record_path(state_dir);
    if record.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("cannot remove {}", path.display()), e))
            }
            _ => Ok(()),
        };
    }
    let text = serde_json::to_string_pretty(record).unwrap_or_default();
    crate::disk::write_file(&path, text.as_bytes(), crate::disk::WriteOptions::PRIVATE)
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

/// Turn IPv4 forwarding on for `needed` interfaces where it is off, recording the previous
/// value; restore the ones we changed that are no longer needed. Returns the changes and the
/// interfaces whose forwarding meshd turned on (to be limited by our table).
pub fn converge_forwarding(
    state_dir: &Path,
    needed: &BTreeSet<String>,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut record = load_record(state_dir)?;
    let mut changes = Vec::new();
    for iface in needed {
        let path = forwarding_path(iface);
        let key = path.display().to_string();
        let now = crate::netsys::sysctl::read(&path)?;
        if now == "0" {
            record.entry(key.clone()).or_insert_with(|| now.clone());
            // Record first: a crash between the two leaves a record, never an unknown change.
            save_record(state_dir, &record)?;
            crate::netsys::sysctl::write(&path, "1")?;
            changes.push(format!("{key} = 1 (was 0)"));
        }
    }
    let stale: Vec<String> = record
        .keys()
        .filter(|k| {
            !needed
                .iter()
                .any(|i| forwarding_path(i).display().to_string() == **k)
        })
        .cloned()
        .collect();
    for key in stale {
        let prior = record.remove(&key).unwrap_or_default();
        let path = PathBuf::from(&key);
        if path.exists() {
            crate::netsys::sysctl::write(&path, &prior)?;
            changes.push(format!("{key} = {prior} (restored)"));
        }
        save_record(state_dir, &record)?;
    }
    let ours = record
        .keys()
        .filter_map(|k| {
            k.strip_prefix("/proc/sys/net/ipv4/conf/")
                .and_then(|r| r.strip_suffix("/forwarding"))
                .map(str::to_string)
        })
        .collect();
    Ok((changes, ours))
}

/// Converge forwarding and our table for the subnets this host advertises: forwarding on our
/// interface and on each subnet's egress interface (only where it is off, recorded), our table
/// (masquerade, and forwarding limits where we turned forwarding on). Returns the changes.
pub async fn converge_advertise(
    handle: &Handle,
    settings: &Settings,
    firewall: &mut FirewallState,
) -> Result<Vec<String>> {
    let advertise = &settings.routes.advertise;
    let mut needed = BTreeSet::new();
    if advertise.iter().any(|n| matches!(n, IpNet::V4(_))) {
        needed.insert(settings.interface.clone());
        for net in advertise.iter().filter(|n| matches!(n, IpNet::V4(_))) {
            match egress_interface(handle, *net).await? {
                Some(dev) if dev != settings.interface => {
                    needed.insert(dev);
                }
                Some(_) => {
                    tracing::warn!(subnet = %net, "advertised subnet is routed over the mesh itself; not forwarding it")
                }
                None => {
                    tracing::warn!(subnet = %net, "no route to the advertised subnet on this host")
                }
            }
        }
    }
    if advertise.iter().any(|n| matches!(n, IpNet::V6(_)))
        && crate::netsys::sysctl::read(Path::new("/proc/sys/net/ipv6/conf/all/forwarding"))
            .is_ok_and(|v| v == "0")
    {
        tracing::warn!("IPv6 subnets are advertised but net.ipv6.conf.all.forwarding is 0; meshd does not turn IPv6 forwarding on");
    }
    let (mut changes, ours) = converge_forwarding(&settings.state_dir, &needed)?;
    let fw = Firewall {
        table: settings.routes.nft_table.clone(),
        interface: settings.interface.clone(),
        advertise: advertise.clone(),
        limit_forwarding_from: ours,
    };
    changes.extend(firewall.converge(&fw)?);
    Ok(changes)
}

/// The mesh CIDR and the routes `peers` need, checked against the live system now (for
/// `meshctl doctor`). Empty when nothing clashes or no address is known yet.
pub async fn check(settings: &Settings, peers: &[PeerSpec]) -> Result<Vec<RouteConflict>> {
    let Some(address) = settings.address else {
        return Ok(Vec::new());
    };
    let handle = crate::netsys::netlink::connect()?;
    let existing = system_routes(&handle).await?;
    Ok(conflicts(
        &desired_routes(address, peers),
        &existing,
        &settings.interface,
        &settings.routes.protected,
    ))
}

/// Remove everything of ours but the interface (`meshctl down`): our nftables table, our
/// marked routes on our interface, the forwarding sysctls we turned on (restored). Returns
/// what it did.
pub async fn teardown(settings: &Settings) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let table = &settings.routes.nft_table;
    if firewall::remove(table)? {
        done.push(format!("removed nftables table inet {table}"));
    }
    let handle = crate::netsys::netlink::connect()?;
    for (r, m) in list(&handle).await? {
        if r.is_ours(&settings.interface) && u8::from(m.header.protocol) == RT_PROTO_MESHD {
            handle
                .route()
                .del(m)
                .execute()
                .await
                .map_err(|e| nl(&format!("cannot remove our route {r}"), e))?;
            done.push(format!("removed route {r}"));
        }
    }
    let record = load_record(&settings.state_dir)?;
    for (key, prior) in &record {
        let path = PathBuf::from(key);
        if path.exists() {
            crate::netsys::sysctl::write(&path, prior)?;
            done.push(format!("restored {key} = {prior}"));
        }
    }
    save_record(&settings.state_dir, &ForwardingRecord::new())?;
    Ok(done)
}
