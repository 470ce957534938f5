//! What the mesh hands to K3s, Prometheus, `/etc/hosts` and DNS, computed from a netmap.
//!
//! Pure: each function takes the netmap (and the integration's settings) and returns the text
//! to write or the records to serve; the daemon writes files atomically, runs reload commands
//! only when the content changed, and serves DNS. The same [`MeshView`] is the context user
//! templates see, so built-ins and templates agree on names and addresses.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::netmap::Netmap;

/// The DNS zone mesh names live in (`.internal` is reserved for private use).
pub const MESH_DOMAIN: &str = "mesh.internal";
/// The registered port of the WireGuard exporter, where meshd serves `/metrics`.
pub const METRICS_PORT: u16 = 9586;
/// node_exporter's port.
pub const NODE_EXPORTER_PORT: u16 = 9100;
/// The markers of the managed block in `/etc/hosts`.
pub const HOSTS_BEGIN: &str = "# BEGIN meshd";
pub const HOSTS_END: &str = "# END meshd";

/// One host as integrations see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostView {
    pub name: String,
    pub address: IpAddr,
    /// `NAME.mesh.internal`.
    pub fqdn: String,
    /// `coordinator`, `member` or `static` (a device without meshd, like the NAS).
    pub role: &'static str,
    pub admin: bool,
    /// This is the host the view was made on.
    pub me: bool,
}

/// The netmap as integrations and user templates see it: every host, this one included,
/// sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeshView {
    pub version: u64,
    pub mesh_cidr: IpNet,
    pub domain: String,
    pub me: HostView,
    pub hosts: Vec<HostView>,
}

impl MeshView {
    /// `coordinator` names the coordinator host (its netmap entry is a member like the others).
    pub fn new(netmap: &Netmap, coordinator: Option<&str>) -> MeshView {
        let role = |name: &str, static_peer: bool| {
            if static_peer {
                "static"
            } else if Some(name) == coordinator {
                "coordinator"
            } else {
                "member"
            }
        };
        let me = HostView {
            name: netmap.name.clone(),
            address: netmap.address,
            fqdn: fqdn(&netmap.name),
            role: role(&netmap.name, false),
            admin: false,
            me: true,
        };
        let mut hosts: Vec<HostView> = netmap
            .peers
            .iter()
            .map(|p| HostView {
                name: p.name.clone(),
                address: p.address,
                fqdn: fqdn(&p.name),
                role: role(&p.name, p.static_peer),
                admin: p.admin,
                me: false,
            })
            .collect();
        hosts.push(me.clone());
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        MeshView {
            version: netmap.version,
            mesh_cidr: netmap.mesh_cidr,
            domain: MESH_DOMAIN.to_owned(),
            me,
            hosts,
        }
    }

    pub fn host(&self, name: &str) -> Option<&HostView> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

fn fqdn(name: &str) -> String {
    format!("{name}.{MESH_DOMAIN}")
}

/// This host's part in the K3s cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum K3sRole {
    /// The server: also advertises its mesh address and adds it (and its mesh name) to the
    /// API certificate.
    Server,
    /// An agent joining the server at `server` (a host name in the mesh).
    Agent { server: String },
}

/// Why an integration could not be rendered (the old file stays; doctor shows this).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("K3s server {0:?} is not in the mesh")]
    UnknownServer(String),
    #[error("/etc/hosts has {HOSTS_BEGIN:?} without a matching {HOSTS_END:?} after it; fix the file by hand (meshd will not guess which lines are its own)")]
    UnbalancedHostsBlock,
}

/// `/etc/rancher/k3s/config.yaml.d/90-meshd.yaml`: K3s reads the drop-ins after config.yaml,
/// later scalars win and `key+:` appends, so this never needs config.yaml itself.
pub fn k3s_dropin(view: &MeshView, interface: &str, role: &K3sRole) -> Result<String, RenderError> {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Written by meshd from the mesh netmap (version {}); meshd rewrites it on change.",
        view.version
    );
    let _ = writeln!(s, "node-ip: {}", view.me.address);
    let _ = writeln!(s, "flannel-iface: {interface}");
    match role {
        K3sRole::Server => {
            let _ = writeln!(s, "advertise-address: {}", view.me.address);
            let _ = writeln!(s, "tls-san+:");
            let _ = writeln!(s, "  - {}", view.me.address);
            let _ = writeln!(s, "  - {}", view.me.fqdn);
        }
        K3sRole::Agent { server } => {
            let host = view
                .host(server)
                .ok_or_else(|| RenderError::UnknownServer(server.clone()))?;
            let _ = writeln!(s, "server: https://{}:6443", url_host(host.address));
        }
    }
    Ok(s)
}

fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

#[derive(Serialize)]
struct FileSdGroup {
    targets: Vec<String>,
    labels: BTreeMap<&'static str, String>,
}

/// Prometheus `file_sd_configs` JSON: node_exporter (:9100) and meshd (:9586) on every host
/// that runs meshd, labelled with `host` and `role` (static peers run neither). Also what the
/// coordinator serves as http_sd.
pub fn prometheus_targets(view: &MeshView) -> String {
    let mut groups = Vec::new();
    for h in view.hosts.iter().filter(|h| h.role != "static") {
        for (job, port) in [("node", NODE_EXPORTER_PORT), ("meshd", METRICS_PORT)] {
            let labels = BTreeMap::from([
                ("job", job.to_owned()),
                ("host", h.name.clone()),
                ("role", h.role.to_owned()),
            ]);
            groups.push(FileSdGroup {
                targets: vec![format!("{}:{port}", url_host(h.address))],
                labels,
            });
        }
    }
    let mut text = serde_json::to_string_pretty(&groups).unwrap_or_else(|_| "[]".to_owned());
    text.push('\n');
    text
}

/// The managed block of `/etc/hosts`: every mesh host as `ADDR\tNAME.mesh.internal NAME`.
pub fn hosts_block(view: &MeshView) -> String {
    let mut s =
        format!("{HOSTS_BEGIN} (managed by meshd; edits between these lines are replaced)\n");
    for h in &view.hosts {
        let _ = writeln!(s, "{}\t{} {}", h.address, h.fqdn, h.name);
    }
    s.push_str(HOSTS_END);
    s.push('\n');
    s
}

/// `existing` (the whole `/etc/hosts`) with its meshd block replaced by `block`, or `block`
/// appended when there is none. Every other line is kept byte for byte. `None` for `block`
/// removes ours (`meshctl down`).
pub fn replace_hosts_block(existing: &str, block: Option<&str>) -> Result<String, RenderError> {
    let lines: Vec<&str> = existing.split_inclusive('\n').collect();
    let begin = lines
        .iter()
        .position(|l| l.trim_end().starts_with(HOSTS_BEGIN));
    let mut out = String::with_capacity(existing.len() + block.map_or(0, str::len));
    match begin {
        None => {
            out.push_str(existing);
            if let Some(b) = block {
                if !out.is_empty() && !out.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str(b);
            }
        }
        Some(b_idx) => {
            let end = lines[b_idx..]
                .iter()
                .position(|l| l.trim_end() == HOSTS_END)
                .map(|i| b_idx + i)
                .ok_or(RenderError::UnbalancedHostsBlock)?;
            for l in &lines[..b_idx] {
                out.push_str(l);
            }
            if let Some(b) = block {
                out.push_str(b);
            }
            for l in &lines[end + 1..] {
                out.push_str(l);
            }
        }
    }
    Ok(out)
}

/// What mesh DNS answers: `NAME.mesh.internal` → address (A or AAAA) and the reverse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsRecords {
    forward: BTreeMap<String, IpAddr>,
    reverse: BTreeMap<IpAddr, String>,
}

impl DnsRecords {
    pub fn new(view: &MeshView) -> DnsRecords {
        let mut r = DnsRecords::default();
        for h in &view.hosts {
            r.forward.insert(h.fqdn.to_ascii_lowercase(), h.address);
            r.reverse.insert(h.address, h.fqdn.clone());
        }
        r
    }

    /// The address of `name` (case-insensitive, trailing dot allowed); `None`: NXDOMAIN.
    pub fn lookup(&self, name: &str) -> Option<IpAddr> {
        let n = name.trim_end_matches('.').to_ascii_lowercase();
        self.forward.get(&n).copied()
    }

    /// The name for `addr` (PTR).
    pub fn reverse(&self, addr: IpAddr) -> Option<&str> {
        self.reverse.get(&addr).map(String::as_str)
    }

    /// Whether `name` is inside the zone we are authoritative for.
    pub fn in_zone(name: &str) -> bool {
        let n = name.trim_end_matches('.').to_ascii_lowercase();
        n == MESH_DOMAIN || n.ends_with(&format!(".{MESH_DOMAIN}"))
    }

    pub fn len(&self) -> usize {
        self.forward.len()
    }

    pub fn is_empty(&self) -> bool {
        self.forward.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netmap::NetmapPeer;
    use crate::PublicKey;

    fn peer(name: &str, last: u8, static_peer: bool) -> NetmapPeer {
        NetmapPeer {
            name: name.into(),
            address: IpAddr::from([10, 99, 99, last]),
            public_key: PublicKey([last; 32]),
            allowed_ips: vec![format!("10.99.99.{last}/32").parse().unwrap()],
            endpoints: vec![],
            persistent_keepalive: None,
            static_peer,
            admin: false,
            key_created_unix: 0,
        }
    }

    fn view(on: &str) -> MeshView {
        let all = [
            ("dock-load", 1, false),
            ("dock-prod", 2, false),
            ("nas", 20, true),
        ];
        let (_, last, _) = all.iter().find(|h| h.0 == on).copied().unwrap();
        let netmap = Netmap {
            version: 7,
            mesh_cidr: "10.99.99.0/24".parse().unwrap(),
            name: on.into(),
            address: IpAddr::from([10, 99, 99, last]),
            public_key: PublicKey([last; 32]),
            peers: all
                .iter()
                .filter(|h| h.0 != on)
                .map(|h| peer(h.0, h.1, h.2))
                .collect(),
        };
        MeshView::new(&netmap, Some("dock-load"))
    }

    #[test]
    fn view_lists_everyone_with_roles() {
        let v = view("dock-prod");
        let roles: Vec<(&str, &str, bool)> = v
            .hosts
            .iter()
            .map(|h| (h.name.as_str(), h.role, h.me))
            .collect();
        assert_eq!(
            roles,
            [
                ("dock-load", "coordinator", false),
                ("dock-prod", "member", true),
                ("nas", "static", false)
            ]
        );
        assert_eq!(v.me.fqdn, "dock-prod.mesh.internal");
    }

    #[test]
    fn k3s_server_and_agent() {
        let server = k3s_dropin(&view("dock-load"), "wgmesh0", &K3sRole::Server).unwrap();
        assert_eq!(
            server.lines().skip(1).collect::<Vec<_>>(),
            [
                "node-ip: 10.99.99.1",
                "flannel-iface: wgmesh0",
                "advertise-address: 10.99.99.1",
                "tls-san+:",
                "  - 10.99.99.1",
                "  - dock-load.mesh.internal"
            ]
        );
        let agent = k3s_dropin(
            &view("dock-prod"),
            "wgmesh0",
            &K3sRole::Agent {
                server: "dock-load".into(),
            },
        )
        .unwrap();
        assert!(agent.contains("node-ip: 10.99.99.2\n"), "{agent}");
        assert!(
            agent.contains("server: https://10.99.99.1:6443\n"),
            "{agent}"
        );
        assert!(!agent.contains("tls-san"), "{agent}");
        assert_eq!(
            k3s_dropin(
                &view("dock-prod"),
                "wgmesh0",
                &K3sRole::Agent {
                    server: "nope".into()
                }
            ),
            Err(RenderError::UnknownServer("nope".into()))
        );
    }

    #[test]
    fn prometheus_targets_skip_static_peers() {
        let text = prometheus_targets(&view("dock-prod"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let groups = v.as_array().unwrap();
        assert_eq!(groups.len(), 4, "{text}");
        assert_eq!(groups[0]["targets"][0], "10.99.99.1:9100");
        assert_eq!(groups[1]["targets"][0], "10.99.99.1:9586");
        assert_eq!(groups[1]["labels"]["role"], "coordinator");
        assert_eq!(groups[3]["labels"]["host"], "dock-prod");
        assert!(!text.contains("10.99.99.20"), "{text}");
    }

    #[test]
    fn hosts_block_is_replaced_in_place_and_removed() {
        let v = view("dock-prod");
        let block = hosts_block(&v);
        let original = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n";
        let once = replace_hosts_block(original, Some(&block)).unwrap();
        assert!(once.starts_with(original));
        assert!(
            once.contains("10.99.99.20\tnas.mesh.internal nas\n"),
            "{once}"
        );
        // Idempotent, and the lines after the block survive a rewrite.
        let with_tail = format!("{once}192.168.1.1\trouter\n");
        let twice = replace_hosts_block(&with_tail, Some(&block)).unwrap();
        assert_eq!(twice, with_tail);
        let removed = replace_hosts_block(&with_tail, None).unwrap();
        assert_eq!(removed, format!("{original}192.168.1.1\trouter\n"));
        // No trailing newline in the file: ours starts on a line of its own.
        let no_nl = replace_hosts_block("127.0.0.1 localhost", Some(&block)).unwrap();
        assert!(
            no_nl.starts_with("127.0.0.1 localhost\n# BEGIN meshd"),
            "{no_nl}"
        );
        assert_eq!(
            replace_hosts_block("# BEGIN meshd\n1.2.3.4 x\n", Some(&block)),
            Err(RenderError::UnbalancedHostsBlock)
        );
    }

    #[test]
    fn dns_answers_names_and_addresses() {
        let r = DnsRecords::new(&view("dock-load"));
        assert_eq!(r.len(), 3);
        assert_eq!(
            r.lookup("Dock-Prod.mesh.internal."),
            Some(IpAddr::from([10, 99, 99, 2]))
        );
        assert_eq!(r.lookup("unknown.mesh.internal"), None);
        assert_eq!(
            r.reverse(IpAddr::from([10, 99, 99, 20])),
            Some("nas.mesh.internal")
        );
        assert!(DnsRecords::in_zone("x.mesh.internal."));
        assert!(!DnsRecords::in_zone("mesh.internal.example.com"));
    }
}
