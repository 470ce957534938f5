//! `meshctl ping PEER`: ICMP echo to a peer's mesh address through the mesh interface (the
//! socket is bound to it, so nothing goes around the tunnel), with the path and endpoint
//! WireGuard uses to reach that peer, and the round-trip time of each reply.

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mesh_proto::wire::control::{endpoint_kind_str, PeerStatus, Request, Response};
use mesh_proto::wire::icmp;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const PAYLOAD: &[u8] = b"meshctl ping";

/// How the path to `p` looks from here.
fn path(p: &PeerStatus) -> String {
    match (p.endpoint, p.endpoint_kind, p.direct) {
        (None, ..) => "no endpoint yet (the peer has to reach us first)".into(),
        (Some(_), Some(kind), Some(true)) => format!("direct ({})", endpoint_kind_str(kind)),
        (Some(_), Some(_), _) => {
            "through the peer's NAT (the address the coordinator observed)".into()
        }
        (Some(_), None, _) => "an endpoint WireGuard learned from the peer (roaming)".into(),
    }
}

/// A socket for ICMP echo: an unprivileged ping socket where the system allows it
/// (`net.ipv4.ping_group_range`), else a raw one (root). `true` when raw (replies then come
/// with their IPv4 header, and our identifier is ours to check).
fn icmp_socket() -> Result<(Socket, bool)> {
    match Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4)) {
        Ok(s) => Ok((s, false)),
        Err(_) => Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
            .map(|s| (s, true))
            .context("cannot open an ICMP socket (meshctl ping needs root)"),
    }
}

/// Ping `peer` (its name or mesh address) `count` times, one second apart. Returns whether
/// any reply came.
pub fn run(socket: &Path, peer: &str, count: u16) -> Result<bool> {
    let peers = match crate::request(socket, &Request::Peers)? {
        Response::Peers { peers } => peers,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected reply from meshd: {other:?}"),
    };
    let interface = match crate::request(socket, &Request::Status)? {
        Response::Status(s) => s.interface,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected reply from meshd: {other:?}"),
    };
    let p = peers
        .iter()
        .find(|p| {
            p.name.as_deref() == Some(peer)
                || p.mesh_address.map(|a| a.to_string()).as_deref() == Some(peer)
        })
        .ok_or_else(|| anyhow!("{peer} is not a peer of this host (meshctl peers lists them)"))?;
    let name = p.name.clone().unwrap_or_else(|| peer.to_owned());
    let Some(IpAddr::V4(addr)) = p.mesh_address else {
        bail!("{name} has no IPv4 mesh address to ping");
    };
    let endpoint = p
        .endpoint
        .map_or_else(|| "none".to_owned(), |e| e.to_string());
    crate::out(&format!(
        "PING {name} ({addr}) through {interface}: endpoint {endpoint}, path {}\n",
        path(p)
    ))?;

    let (sock, raw) = icmp_socket()?;
    sock.bind_device(Some(interface.as_bytes()))
        .with_context(|| format!("cannot bind the ICMP socket to {interface}"))?;
    sock.connect(&SockAddr::from(SocketAddr::new(IpAddr::V4(addr), 0)))
        .with_context(|| format!("cannot address {addr} through {interface}"))?;
    let id = (std::process::id() & 0xffff) as u16;
    let mut rtts = Vec::new();
    let mut buf = [0u8; 1500];
    for seq in 1..=count {
        let sent = Instant::now();
        sock.send(&icmp::echo_request(id, seq, PAYLOAD))
            .with_context(|| format!("cannot send to {addr}"))?;
        let deadline = sent + Duration::from_secs(1);
        let mut got = None;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left))?;
            let n = match (&sock).read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(e).context("receiving the reply"),
            };
            let packet = if raw {
                icmp::strip_ipv4(&buf[..n])
            } else {
                Some(&buf[..n])
            };
            let want_id = raw.then_some(id);
            if packet.and_then(|p| icmp::echo_reply_seq(p, want_id, PAYLOAD)) == Some(seq) {
                got = Some(sent.elapsed());
                break;
            }
        }
        match got {
            Some(rtt) => {
                crate::out(&format!(
                    "reply from {addr}: seq={seq} time={:.2} ms\n",
                    rtt.as_secs_f64() * 1000.0
                ))?;
                rtts.push(rtt);
            }
            None => crate::out(&format!("no reply from {addr}: seq={seq} (1 s)\n"))?,
        }
        if seq < count {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let summary = match (rtts.iter().min(), rtts.iter().max()) {
        (Some(min), Some(max)) => {
            let avg = rtts.iter().sum::<Duration>() / rtts.len() as u32;
            format!(
                ", rtt min/avg/max {:.2}/{:.2}/{:.2} ms",
                ms(*min),
                ms(avg),
                ms(*max)
            )
        }
        _ => String::new(),
    };
    crate::out(&format!(
        "{name}: {} of {count} answered through {interface}{summary}\n",
        rtts.len()
    ))?;
    Ok(!rtts.is_empty())
}
