//! The wg-quick configuration handed to a static peer (a device that cannot run meshd).
//! It lists every host of the mesh at the time of the invitation; other hosts learn about the
//! static peer through their netmap, but the static peer does not learn about hosts that join
//! later: re-run the invitation flow (or edit the file) to add them.

use std::fmt::Write as _;

use mesh_proto::netmap::Netmap;
use mesh_proto::PrivateKey;

/// Render the configuration. `private_key` is the generated key, when the coordinator
/// generated one (printed once, never stored); otherwise a placeholder line tells the
/// operator where their own key goes. `listen_port` is the port of the endpoint the operator
/// gave (`--endpoint`): the device must listen there, since other hosts send to it.
///
/// Each peer's endpoint is its best candidate in the static peer's netmap: behind the same
/// NAT as the device (`--near`), that is the peer's LAN address.
pub fn render(
    netmap: &Netmap,
    private_key: Option<&PrivateKey>,
    listen_port: Option<u16>,
    keepalive_secs: u16,
    coordinator_name: &str,
) -> String {
    let keepalive = if keepalive_secs == 0 {
        25
    } else {
        keepalive_secs
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# meshd static peer {} (netmap version {}), issued by the coordinator {coordinator_name}.",
        netmap.name, netmap.version
    );
    let _ = writeln!(
        out,
        "# Hosts that join later are not listed here; they reach this device through their netmap."
    );
    let _ = writeln!(out, "[Interface]");
    let _ = writeln!(
        out,
        "Address = {}/{}",
        netmap.address,
        netmap.mesh_cidr.prefix_len()
    );
    if let Some(port) = listen_port {
        let _ = writeln!(out, "ListenPort = {port}");
    }
    match private_key {
        Some(k) => {
            let _ = writeln!(out, "PrivateKey = {}", k.to_base64());
        }
        None => {
            let _ = writeln!(
                out,
                "# PrivateKey = <the private key whose public half is {}>",
                netmap.public_key
            );
        }
    }
    for peer in &netmap.peers {
        let _ = writeln!(out);
        let _ = writeln!(out, "# {}", peer.name);
        let _ = writeln!(out, "[Peer]");
        let _ = writeln!(out, "PublicKey = {}", peer.public_key);
        let allowed: Vec<String> = peer.allowed_ips.iter().map(|n| n.to_string()).collect();
        let _ = writeln!(out, "AllowedIPs = {}", allowed.join(", "));
        if let Some(ep) = peer.endpoints.first() {
            let _ = writeln!(out, "Endpoint = {}", ep.addr);
        }
        let _ = writeln!(out, "PersistentKeepalive = {keepalive}");
    }
    out
}
