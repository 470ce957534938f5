//! A stand-in for K3s' flannel in the booted fleet (tests/tests/boot_fleet.rs), where K3s
//! cannot be installed (no registry this project reaches ships it). Run by a unit ordered
//! after `meshd-online.target`, it reads `node-ip` and `flannel-iface` from meshd's K3s
//! drop-in and makes the objects flannel makes on a node:
//!
//! - `flannel.1`, VXLAN (VNI 1, UDP 8472) from the node IP, with `10.42.N.0/32`, an onlink
//!   route and a permanent neighbour per other node, MTU of the flannel interface minus 50;
//! - `cni0`, the pod bridge, with `10.42.N.1/24`;
//!
//! (MAC addresses are derived from the subnet, so a reboot recreates every object as it was.)
//! - flannel's forward and masquerade chains (`FLANNEL-FWD`, `FLANNEL-POSTRTG`) in the `ip
//!   filter` and `ip nat` tables, as iptables-nft writes them.
//!
//! This machine's kernel has no vxlan module, so `flannel.1` is a TAP device and this process
//! does the VXLAN encapsulation (RFC 7348 framing, to the other node's node IP, UDP 8472) in
//! user space; the datagrams take the same route the kernel's would: over the mesh interface
//! to the other node's mesh address. Kernel VXLAN next to meshd is covered in the VM lab
//! (tests/tests/coexist.rs). Datagrams from anything but a configured node, or not VXLAN
//! VNI 1, are dropped.
//!
//! ```text
//! flannel-standin --dropin FILE --subnet 10.42.N.0/24 [--node 10.42.M.0/24=NODE_IP]...
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _};
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;

const VXLAN_PORT: u16 = 8472;
const VNI: u32 = 1;
const DEV: &str = "flannel.1";

#[derive(Parser)]
struct Args {
    /// meshd's K3s drop-in (node-ip, flannel-iface).
    #[arg(long)]
    dropin: String,
    /// This node's pod subnet, 10.42.N.0/24.
    #[arg(long)]
    subnet: String,
    /// Another node: its pod subnet and node IP, `10.42.M.0/24=10.99.99.X`.
    #[arg(long = "node")]
    nodes: Vec<String>,
}

/// A /24 pod subnet's network address.
fn subnet_base(s: &str) -> Result<Ipv4Addr> {
    let (net, len) = s.split_once('/').context("a subnet is NET/24")?;
    if len != "24" {
        bail!("{s}: only /24 pod subnets");
    }
    let net: Ipv4Addr = net
        .parse()
        .with_context(|| format!("{s}: not an address"))?;
    if net.octets()[3] != 0 {
        bail!("{s}: not a network address");
    }
    Ok(net)
}

/// flannel.1's MAC on the node with this subnet (fixed, so a reboot recreates it as it was).
fn mac_for(subnet: Ipv4Addr) -> [u8; 6] {
    let o = subnet.octets();
    [0x02, 0x42, o[0], o[1], o[2], 0x00]
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `node-ip` and `flannel-iface` from the drop-in, as K3s reads them.
fn read_dropin(path: &str) -> Result<(Ipv4Addr, String)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .map(|v| v.trim().trim_matches('"').to_owned())
            .with_context(|| format!("{path} has no {key}"))
    };
    let ip = value("node-ip")?;
    let ip: Ipv4Addr = ip
        .parse()
        .with_context(|| format!("{path}: node-ip {ip} is not an IPv4 address"))?;
    Ok((ip, value("flannel-iface")?))
}

fn run(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("running {argv:?}"))?;
    if !out.status.success() {
        bail!(
            "{argv:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running nft")?;
    child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(script.as_bytes())?;
    if !child.wait()?.success() {
        bail!("nft -f refused:\n{script}");
    }
    Ok(())
}

/// A TAP device named `name` (gone when the returned file is closed).
fn open_tap(name: &str) -> Result<File> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    // SAFETY: a plain open(2) of a path; the descriptor is checked and owned by the File.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening /dev/net/tun");
    }
    // SAFETY: fd is a fresh descriptor of ours.
    let file = unsafe { File::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out (40 bytes).
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
    }
    Ok(file)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (node_ip, iface) = read_dropin(&args.dropin)?;
    // flannel refuses an interface that does not hold the node IP.
    let addrs = run(&["ip", "-4", "-o", "addr", "show", "dev", &iface])?;
    if !addrs.contains(&format!(" {node_ip}/")) {
        bail!("{iface} does not hold node-ip {node_ip}: {addrs}");
    }
    let mtu: u32 = std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu"))?
        .trim()
        .parse()?;
    let own = subnet_base(&args.subnet)?;
    let mut peers_by_mac: HashMap<[u8; 6], Ipv4Addr> = HashMap::new();
    let mut nodes = Vec::new();
    for n in &args.nodes {
        let (subnet, ip) = n.split_once('=').context("--node is SUBNET=NODE_IP")?;
        let base = subnet_base(subnet)?;
        let ip: Ipv4Addr = ip.parse().with_context(|| format!("{n}: node IP"))?;
        peers_by_mac.insert(mac_for(base), ip);
        nodes.push((base, ip));
    }

    let tap = open_tap(DEV)?;
    let o = own.octets();
    let vtep = own.to_string();
    let bridge = Ipv4Addr::new(o[0], o[1], o[2], 1);
    run(&[
        "ip",
        "link",
        "set",
        DEV,
        "address",
        &mac_str(mac_for(own)),
        "mtu",
        &(mtu - 50).to_string(),
        "arp",
        "off",
        "up",
    ])?;
    run(&["ip", "addr", "replace", &format!("{vtep}/32"), "dev", DEV])?;
    for (base, _) in &nodes {
        let b = base.to_string();
        run(&[
            "ip",
            "neigh",
            "replace",
            &b,
            "lladdr",
            &mac_str(mac_for(*base)),
            "dev",
            DEV,
            "nud",
            "permanent",
        ])?;
        run(&[
            "ip",
            "route",
            "replace",
            &format!("{b}/24"),
            "via",
            &b,
            "dev",
            DEV,
            "onlink",
        ])?;
    }
    if run(&["ip", "link", "show", "cni0"]).is_err() {
        run(&["ip", "link", "add", "cni0", "type", "bridge"])?;
    }
    run(&[
        "ip",
        "addr",
        "replace",
        &format!("{bridge}/24"),
        "dev",
        "cni0",
    ])?;
    let mut bridge_mac = mac_for(own);
    bridge_mac[5] = 1;
    run(&[
        "ip",
        "link",
        "set",
        "cni0",
        "address",
        &mac_str(bridge_mac),
        "up",
    ])?;
    // The chains flannel owns are rewritten whole; the jumps into them are added once.
    nft("add table ip filter\n\
         add chain ip filter FORWARD { type filter hook forward priority filter; policy accept; }\n\
         add chain ip filter FLANNEL-FWD\nflush chain ip filter FLANNEL-FWD\n\
         add rule ip filter FLANNEL-FWD ip saddr 10.42.0.0/16 counter accept\n\
         add rule ip filter FLANNEL-FWD ip daddr 10.42.0.0/16 counter accept\n\
         add table ip nat\n\
         add chain ip nat POSTROUTING { type nat hook postrouting priority srcnat; policy accept; }\n\
         add chain ip nat FLANNEL-POSTRTG\nflush chain ip nat FLANNEL-POSTRTG\n\
         add rule ip nat FLANNEL-POSTRTG ip saddr 10.42.0.0/16 ip daddr 10.42.0.0/16 counter return\n\
         add rule ip nat FLANNEL-POSTRTG ip saddr 10.42.0.0/16 ip daddr != 224.0.0.0/4 counter masquerade fully-random\n")?;
    for (table, chain, jump) in [
        ("filter", "FORWARD", "FLANNEL-FWD"),
        ("nat", "POSTROUTING", "FLANNEL-POSTRTG"),
    ] {
        if !run(&["nft", "list", "chain", "ip", table, chain])?.contains(&format!("jump {jump}")) {
            nft(&format!(
                "add rule ip {table} {chain} counter jump {jump} comment \"flanneld\"\n"
            ))?;
        }
    }

    let sock = Arc::new(
        UdpSocket::bind(SocketAddrV4::new(node_ip, VXLAN_PORT))
            .with_context(|| format!("binding {node_ip}:{VXLAN_PORT}"))?,
    );
    eprintln!(
        "flannel-standin: {DEV} {vtep}/32 (VXLAN {node_ip}:{VXLAN_PORT} on {iface}), cni0 {bridge}/24, {} other nodes",
        nodes.len()
    );
    let known: Vec<Ipv4Addr> = nodes.iter().map(|(_, ip)| *ip).collect();
    let (mut tap_in, mut tap_out) = (tap.try_clone()?, tap);
    let rx = {
        let sock = Arc::clone(&sock);
        std::thread::spawn(move || -> Result<()> {
            let mut buf = [0u8; 65536];
            loop {
                let (n, from) = sock.recv_from(&mut buf)?;
                let ok = matches!(from, SocketAddr::V4(a) if known.contains(a.ip()))
                    && n >= 8 + 14
                    && buf[0] & 0x08 != 0
                    && u32::from_be_bytes([0, buf[4], buf[5], buf[6]]) == VNI;
                if ok {
                    tap_out.write_all(&buf[8..n])?;
                }
            }
        })
    };
    let mut buf = [0u8; 65536];
    let header = [0x08, 0, 0, 0, 0, 0, VNI as u8, 0];
    loop {
        let n = tap_in.read(&mut buf[8..])?;
        if rx.is_finished() {
            bail!("the receiving thread ended");
        }
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&buf[8..14]);
        if let Some(ip) = peers_by_mac.get(&dst) {
            buf[..8].copy_from_slice(&header);
            sock.send_to(&buf[..8 + n], SocketAddrV4::new(*ip, VXLAN_PORT))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_and_macs() {
        assert_eq!(
            subnet_base("10.42.3.0/24").ok(),
            Some(Ipv4Addr::new(10, 42, 3, 0))
        );
        assert!(subnet_base("10.42.3.1/24").is_err());
        assert!(subnet_base("10.42.0.0/16").is_err());
        assert_eq!(
            mac_str(mac_for(Ipv4Addr::new(10, 42, 3, 0))),
            "02:42:0a:2a:03:00"
        );
    }
}
