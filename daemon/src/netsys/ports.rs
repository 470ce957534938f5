//! Who holds our UDP listen port. At start meshd refuses a port held by anything but its own
//! interface (flannel-wg's 51820, another WireGuard, any process), before it creates or adopts
//! the device; `meshctl doctor` runs the same check.
//!
//! The test is a bind: UDP on 0.0.0.0:PORT and [::]:PORT (v6-only). When either is taken, the
//! owner is looked for among WireGuard interfaces (userspace engines answering on
//! `/var/run/wireguard/*.sock`, kernel links of kind wireguard) by their listen port, then among
//! processes (`/proc/net/udp*` inode → `/proc/PID/fd`).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use mesh_proto::ObservedDevice;
use socket2::{Domain, Protocol, Socket, Type};

use crate::backend::WgBackend;
use crate::wg::kernel::KernelBackend;
use crate::wg::userspace::{UapiBackend, DEFAULT_WG_RUN_DIR};

/// Who holds the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortState {
    /// Nothing: both binds succeeded.
    Free,
    /// Our own interface (a restart adopting it).
    Ours,
    /// Something else; the description names it when it could be found.
    Taken(String),
}

/// Whether binding UDP `addr` fails because the address is in use. Other failures (no IPv6
/// on this host) count as free.
fn in_use(addr: SocketAddr) -> bool {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let Ok(sock) = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)) else {
        return false;
    };
    if addr.is_ipv6() && sock.set_only_v6(true).is_err() {
        return false;
    }
    matches!(sock.bind(&addr.into()), Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
}

/// Whether UDP `port` can be bound on v4 and v6 right now.
pub fn port_in_use(port: u16) -> bool {
    in_use(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        || in_use(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
}

/// WireGuard interfaces and their listen ports: userspace engines by their UAPI sockets in
/// `run_dir`, kernel ones by the links of kind wireguard.
pub async fn wireguard_ports(run_dir: &Path) -> Vec<(String, u16, &'static str)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(run_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(iface) = name.strip_suffix(".sock") else {
                continue;
            };
            let mut b = UapiBackend::new(iface, "meshd-wg".into(), run_dir);
            if let Ok(ObservedDevice { listen_port, .. }) = b.observe().await {
                out.push((iface.to_owned(), listen_port, "userspace WireGuard"));
            }
        }
    }
    // Kernel links of kind wireguard, from a netlink dump: /sys/class/net shows the network
    // namespace /sys was mounted in, which need not be ours (a namespace lab, a container).
    for iface in kernel_wireguard_links().await {
        if let Ok(mut k) = KernelBackend::new(&iface) {
            if let Ok(dev) = k.observe().await {
                out.push((iface, dev.listen_port, "kernel WireGuard"));
            }
        }
    }
    out
}

/// Names of this network namespace's links of kind `wireguard`.
async fn kernel_wireguard_links() -> Vec<String> {
    use futures::TryStreamExt;
    use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
    let Ok(netlink) = crate::netsys::netlink::Scoped::open() else {
        return Vec::new();
    };
    let mut names = Vec::new();
    let mut links = netlink.handle.link().get().execute();
    while let Ok(Some(link)) = links.try_next().await {
        let mut name = None;
        let mut wireguard = false;
        for attr in &link.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    wireguard |= infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Wireguard)));
                }
                _ => {}
            }
        }
        if let (Some(n), true) = (name, wireguard) {
            names.push(n);
        }
    }
    names
}

/// Socket inodes bound to UDP `port` (any address), from `/proc/net/udp` and `udp6`.
fn udp_inodes(port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(inode)) = (cols.get(1), cols.get(9)) else {
                continue;
            };
            let p = local
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if p == Some(port) {
                if let Ok(i) = inode.parse::<u64>() {
                    if i != 0 {
                        out.push(i);
                    }
                }
            }
        }
    }
    out
}

/// Processes holding one of these socket inodes: `name (pid N)`.
fn holders(inodes: &[u64]) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| {
                    l.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse::<u64>()
                        .ok()
                })
                .is_some_and(|i| inodes.contains(&i))
        });
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("{} (pid {pid})", comm.trim()));
        }
    }
    out
}

/// Who holds UDP `port`, with `our_interface` counting as ours.
pub async fn port_state(port: u16, our_interface: &str) -> PortState {
    port_state_in(port, our_interface, Path::new(DEFAULT_WG_RUN_DIR)).await
}

/// [`port_state`] with the UAPI socket directory given.
pub async fn port_state_in(port: u16, our_interface: &str, run_dir: &Path) -> PortState {
    if !port_in_use(port) {
        return PortState::Free;
    }
    let wg = wireguard_ports(run_dir).await;
    let mut owners: Vec<String> = Vec::new();
    for (iface, p, kind) in &wg {
        if *p != port {
            continue;
        }
        if iface == our_interface {
            return PortState::Ours;
        }
        owners.push(format!("{kind} interface {iface}"));
    }
    if owners.is_empty() {
        owners = holders(&udp_inodes(port));
    }
    if owners.is_empty() {
        // A kernel socket (vxlan, another kernel WireGuard we could not read) or a process
        // in another namespace sharing this one.
        return PortState::Taken(format!(
            "another socket (no process found; see `ss -lunp 'sport = :{port}'` and \
             `wg show all listen-port`)"
        ));
    }
    PortState::Taken(owners.join(", "))
}

/// The refusal at start, or `Ok` when the port is free or held by our own interface.
pub fn refusal(port: u16, state: &PortState) -> Option<String> {
    match state {
        PortState::Free | PortState::Ours => None,
        PortState::Taken(owner) => Some(format!(
            "UDP port {port} (host.listen_port) is already in use by {owner}; refusing to start. \
             Stop that, or set another listen_port in [host] of meshd.toml (meshd's default is \
             {}; flannel-wg uses 51820/51821)",
            mesh_proto::DEFAULT_LISTEN_PORT
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_bound_socket_is_found_with_its_process() {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        match port_state_in(port, "wgmesh-test0", dir.path()).await {
            PortState::Taken(owner) => {
                assert!(
                    owner.contains(&format!("(pid {})", std::process::id())),
                    "{owner}"
                )
            }
            other => panic!("{other:?}"),
        }
        let msg = refusal(port, &PortState::Taken("x".into())).unwrap();
        assert!(msg.contains(&format!("UDP port {port}")), "{msg}");
        drop(sock);
        assert_eq!(
            port_state_in(port, "wgmesh-test0", dir.path()).await,
            PortState::Free
        );
        assert_eq!(refusal(port, &PortState::Ours), None);
    }
}
