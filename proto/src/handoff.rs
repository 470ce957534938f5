//! What the mesh hands to K3s, Prometheus, `/etc/hosts` and DNS, computed from a netmap.
//!
//! Pure: each function takes the netmap (and the integration's settings) and returns the text
//! to write or the records to serve; the daemon writes files atomically, runs reload commands
//! only when the content changed, and serves DNS. The same [`MeshView`] is the context user
//! templates see, so built-ins and templates agree on names and addresses.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::integrations::{DrbdIntegration, IntegrationsConfig, K3sIntegration};
use crate::config::{Config, PeerConfig};
use crate::netmap::Netmap;

/// The DNS zone mesh names live in (`.internal` is reserved for private use).
pub const MESH_DOMAIN: &str = "mesh.internal";
/// Where meshd serves `/metrics`: next to its WireGuard (51871) and API-in-the-tunnel (51872)
/// ports. Not 9586, the WireGuard exporter's registered port: operators run that exporter too.
pub const METRICS_PORT: u16 = 51873;
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

    /// The view of a host configured with static `[[peer]]` entries (no coordinator, no
    /// netmap): `address` is `host.address` (the mesh prefix comes from it); each peer's mesh
    /// address is its host route (/32, /128) inside the mesh, else the first of its allowed IPs
    /// inside the mesh; a peer with neither is left out (it has no mesh name to give). Every
    /// host is a `member`; the version is 0.
    pub fn from_static(name: &str, address: IpNet, peers: &[PeerConfig]) -> MeshView {
        let mesh_cidr = address.trunc();
        let me = HostView {
            name: name.to_owned(),
            address: address.addr(),
            fqdn: fqdn(name),
            role: "member",
            admin: false,
            me: true,
        };
        let mut hosts: Vec<HostView> = peers
            .iter()
            .filter_map(|p| {
                let inside: Vec<&IpNet> = p
                    .allowed_ips
                    .iter()
                    .filter(|n| mesh_cidr.contains(&n.addr()))
                    .collect();
                let addr = inside
                    .iter()
                    .find(|n| n.prefix_len() == n.max_prefix_len())
                    .or_else(|| inside.first())
                    .map(|n| n.addr())?;
                Some(HostView {
                    name: p.name.clone(),
                    address: addr,
                    fqdn: fqdn(&p.name),
                    role: "member",
                    admin: false,
                    me: false,
                })
            })
            .collect();
        hosts.push(me.clone());
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        MeshView {
            version: 0,
            mesh_cidr,
            domain: MESH_DOMAIN.to_owned(),
            me,
            hosts,
        }
    }

    /// [`MeshView::from_static`] for a static configuration (`None` without `host.name` and
    /// `host.address`: a host that has not joined yet has no view).
    pub fn from_config(config: &Config) -> Option<MeshView> {
        Some(MeshView::from_static(
            config.host.name.as_deref()?,
            config.host.address?,
            &config.peers,
        ))
    }

    pub fn host(&self, name: &str) -> Option<&HostView> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

/// What a user template sees: the view's fields at the top level (`me`, `hosts`, `version`,
/// `mesh_cidr`, `domain`) plus the mesh `interface`.
#[derive(Serialize)]
struct TemplateContext<'a> {
    version: u64,
    mesh_cidr: &'a IpNet,
    domain: &'a str,
    me: &'a HostView,
    hosts: &'a [HostView],
    interface: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a DrbdView>,
}

impl<'a> TemplateContext<'a> {
    fn new(view: &'a MeshView, interface: &'a str) -> Self {
        TemplateContext {
            version: view.version,
            mesh_cidr: &view.mesh_cidr,
            domain: &view.domain,
            me: &view.me,
            hosts: &view.hosts,
            interface,
            resource: None,
        }
    }
}

fn template_env() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    // A typo in a template is an error, not an empty string in a config file.
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .keep_trailing_newline(true)
        .build();
    if let Ok(syntax) = syntax {
        env.set_syntax(syntax);
    }
    env
}

fn render_ctx(name: &str, source: &str, ctx: &TemplateContext<'_>) -> Result<String, RenderError> {
    template_env()
        .render_str(source, minijinja::value::Serde(ctx))
        .map_err(|e| RenderError::Template {
            name: name.to_owned(),
            message: template_error(&e),
        })
}

fn template_error(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let _ = write!(msg, ": {s}");
        src = s.source();
    }
    msg
}

/// A user template (minijinja) rendered with the view as context (see `TemplateContext`'s
/// fields: `me`, `hosts`, `version`, `mesh_cidr`, `domain`, `interface`). Undefined
/// variables are errors. `name` only labels the error.
pub fn render_template(
    name: &str,
    source: &str,
    view: &MeshView,
    interface: &str,
) -> Result<String, RenderError> {
    render_ctx(name, source, &TemplateContext::new(view, interface))
}

/// Whether a template compiles, without rendering it: for checks made before there is a mesh
/// to render it with (`meshd --check-config` on a host that joins with a token). `name` only
/// labels the error.
pub fn check_template_syntax(name: &str, source: &str) -> Result<(), RenderError> {
    template_env()
        .template_from_str(source)
        .map(|_| ())
        .map_err(|e| RenderError::Template {
            name: name.to_owned(),
            message: template_error(&e),
        })
}

/// One DRBD resource as its template sees it (`resource` in the context).
#[derive(Debug, Clone, Serialize)]
pub struct DrbdView {
    pub name: String,
    pub port: u16,
    pub device: String,
    pub disk: Option<String>,
    pub meta_disk: String,
    pub hosts: Vec<DrbdHostView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrbdHostView {
    pub name: String,
    pub node_id: usize,
    pub address: IpAddr,
    /// What follows `address` in an `on` section: `10.99.99.2:7788` or `ipv6 [fd00::2]:7788`.
    pub drbd_address: String,
}

const K3S_HEADER: &str =
    "# Written by meshd from the mesh netmap; meshd rewrites it when the mesh changes.";

/// The built-in DRBD resource template: one `on NAME { address IP:PORT; }` per host (IP
/// literals only). With more than two hosts (DRBD 9 only) each `on` section also carries
/// `node-id N` (the host's position in `hosts`) and a `connection-mesh` follows. A two-host
/// resource has no `node-id`: DRBD 9 does not need one there, and drbd-utils' 8.4 mode
/// (`drbdadm-84`, used with the drbd 8.4 module of Debian's and other distribution kernels)
/// refuses the keyword.
pub const DRBD_TEMPLATE: &str = "\
# Written by meshd from the mesh netmap; meshd rewrites it when the mesh changes.
resource {{ resource.name }} {
  device {{ resource.device }};
  disk {{ resource.disk }};
  meta-disk {{ resource.meta_disk }};
{% for h in resource.hosts %}
  on {{ h.name }} {
{%- if resource.hosts | length > 2 %}
    node-id {{ h.node_id }};
{%- endif %}
    address {{ h.drbd_address }};
  }
{% endfor %}
{%- if resource.hosts | length > 2 %}
  connection-mesh {
    hosts{% for h in resource.hosts %} {{ h.name }}{% endfor %};
  }
{% endif -%}
}
";

/// Whether this host takes part in `resource` (a host outside it gets no file).
pub fn drbd_applies(view: &MeshView, resource: &DrbdIntegration) -> bool {
    resource.hosts.contains(&view.me.name)
}

/// A DRBD resource file: the built-in [`DRBD_TEMPLATE`], or `template` (a user's minijinja
/// source) with the same context. Every host of the resource must be in the mesh.
pub fn drbd_resource(
    view: &MeshView,
    resource: &DrbdIntegration,
    interface: &str,
    template: Option<&str>,
) -> Result<String, RenderError> {
    let hosts = resource
        .hosts
        .iter()
        .enumerate()
        .map(|(node_id, name)| {
            let h = view
                .host(name)
                .ok_or_else(|| RenderError::UnknownDrbdHost {
                    resource: resource.resource.clone(),
                    host: name.clone(),
                })?;
            let drbd_address = match h.address {
                IpAddr::V4(a) => format!("{a}:{}", resource.port),
                IpAddr::V6(a) => format!("ipv6 [{a}]:{}", resource.port),
            };
            Ok(DrbdHostView {
                name: name.clone(),
                node_id,
                address: h.address,
                drbd_address,
            })
        })
        .collect::<Result<Vec<_>, RenderError>>()?;
    let r = DrbdView {
        name: resource.resource.clone(),
        port: resource.port,
        device: resource.device.clone(),
        disk: resource.disk.clone(),
        meta_disk: resource.meta_disk.clone(),
        hosts,
    };
    let mut ctx = TemplateContext::new(view, interface);
    ctx.resource = Some(&r);
    let name = format!("drbd resource {}", resource.resource);
    render_ctx(&name, template.unwrap_or(DRBD_TEMPLATE), &ctx)
}

/// What one configured output is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputKind {
    K3s(K3sIntegration),
    Drbd(DrbdIntegration),
    Prometheus,
    /// Only our block of the file is ours.
    HostsBlock,
    /// A user template read from `source`.
    Template {
        source: PathBuf,
    },
}

/// One file meshd keeps, with the commands to run when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// `k3s`, `drbd:r0`, `prometheus`, `hosts`, `template:NAME`: what status and doctor show.
    pub name: String,
    pub path: PathBuf,
    pub kind: OutputKind,
    /// Run after the new file is in place, before `reload`; failing restores the old file
    /// (a dry run: `drbdadm -d adjust r0`).
    pub check: Option<Vec<String>>,
    /// Run once per change.
    pub reload: Option<Vec<String>>,
}

impl Output {
    /// The user template this output reads, if any (the daemon reads it and hands the text
    /// to [`Output::render`]).
    pub fn template_path(&self) -> Option<&Path> {
        match &self.kind {
            OutputKind::Template { source } => Some(source),
            OutputKind::Drbd(d) => d.template.as_deref(),
            _ => None,
        }
    }

    /// Whether this host gets this output at all (DRBD: only the resource's hosts).
    pub fn applies(&self, view: &MeshView) -> bool {
        match &self.kind {
            OutputKind::Drbd(d) => drbd_applies(view, d),
            _ => true,
        }
    }

    /// The output's text: the whole file, or for [`OutputKind::HostsBlock`] the block to put
    /// into the existing file with [`replace_hosts_block`].
    pub fn render(
        &self,
        view: &MeshView,
        interface: &str,
        template: Option<&str>,
    ) -> Result<String, RenderError> {
        match &self.kind {
            OutputKind::K3s(k) => k3s_dropin(
                view,
                k.flannel_iface.as_deref().unwrap_or(interface),
                &k.role,
            ),
            OutputKind::Drbd(d) => drbd_resource(view, d, interface, template),
            OutputKind::Prometheus => Ok(prometheus_targets(view)),
            OutputKind::HostsBlock => Ok(hosts_block(view)),
            OutputKind::Template { .. } => {
                render_template(&self.name, template.unwrap_or_default(), view, interface)
            }
        }
    }
}

/// Every output the configuration asks for, in a fixed order.
pub fn outputs(config: &IntegrationsConfig) -> Vec<Output> {
    let mut out = Vec::new();
    if let Some(k) = &config.k3s {
        out.push(Output {
            name: "k3s".into(),
            path: k.path.clone(),
            check: k.check.clone(),
            reload: k.reload.clone(),
            kind: OutputKind::K3s(k.clone()),
        });
    }
    for d in &config.drbd {
        out.push(Output {
            name: format!("drbd:{}", d.resource),
            path: d.path.clone(),
            check: d.check.clone(),
            reload: d.reload.clone(),
            kind: OutputKind::Drbd(d.clone()),
        });
    }
    for (name, file, kind) in [
        ("prometheus", &config.prometheus, OutputKind::Prometheus),
        ("hosts", &config.hosts, OutputKind::HostsBlock),
    ] {
        if let Some(f) = file {
            out.push(Output {
                name: name.into(),
                path: f.path.clone(),
                check: f.check.clone(),
                reload: f.reload.clone(),
                kind,
            });
        }
    }
    for t in &config.templates {
        out.push(Output {
            name: format!("template:{}", t.name),
            path: t.path.clone(),
            check: t.check.clone(),
            reload: t.reload.clone(),
            kind: OutputKind::Template {
                source: t.source.clone(),
            },
        });
    }
    out
}

/// How one integration fared, for `meshctl status` and `meshctl doctor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntegrationStatus {
    pub name: String,
    pub path: PathBuf,
    pub ok: bool,
    /// The latest render, write, check or reload error; the file kept its old content
    /// (unless `reload_pending`).
    pub last_error: Option<String>,
    /// When meshd last changed the file (seconds since the UNIX epoch).
    pub last_change_unix: Option<u64>,
    /// When the last reload command ran successfully.
    pub last_reload_unix: Option<u64>,
    /// The reload failed for a file with no reloaded version before it (DRBD before its
    /// metadata exists): the new file is in place and the reload is retried.
    #[serde(default)]
    pub reload_pending: bool,
    /// Applies that failed since meshd started (render, write, check or reload).
    #[serde(default)]
    pub failures: u64,
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
    #[error("DRBD resource {resource}: host {host:?} is not in the mesh (yet); the resource file is left as it was")]
    UnknownDrbdHost { resource: String, host: String },
    #[error("template {name}: {message}")]
    Template { name: String, message: String },
}

/// `/etc/rancher/k3s/config.yaml.d/90-meshd.yaml`: K3s reads the drop-ins after config.yaml,
/// later scalars win and `key+:` appends, so this never needs config.yaml itself.
pub fn k3s_dropin(view: &MeshView, interface: &str, role: &K3sRole) -> Result<String, RenderError> {
    let mut s = String::new();
    // No netmap version here: it moves for changes K3s does not care about, and a changed
    // file restarts K3s.
    s.push_str(K3S_HEADER);
    s.push('\n');
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

/// Prometheus `file_sd_configs` JSON: node_exporter (:9100) and meshd (:51873) on every host
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

/// What mesh DNS answers: `NAME.mesh.internal` → address (A or AAAA) and the reverse (PTR)
/// for addresses inside the mesh prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsRecords {
    forward: BTreeMap<String, IpAddr>,
    reverse: BTreeMap<IpAddr, String>,
    mesh_cidr: Option<IpNet>,
    serial: u32,
}

/// The record types mesh DNS knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsQuery {
    A,
    Aaaa,
    Ptr,
    Soa,
    Ns,
    /// Any other type: names that exist answer NODATA.
    Other,
}

/// The decision for one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsAnswer {
    /// An address record (A or AAAA, per the address family).
    Address(IpAddr),
    /// The name of a mesh address.
    Ptr(String),
    /// The zone's SOA (the apex of `mesh.internal` or of the reverse zone).
    Soa,
    /// The zone's NS (this server, `ns.mesh.internal`, which is not an address record).
    Ns,
    /// The name exists but has no record of that type.
    NoData,
    /// The name is in our zone and does not exist.
    NxDomain,
    /// Not our zone: we are no resolver.
    Refused,
}

impl DnsRecords {
    pub fn new(view: &MeshView) -> DnsRecords {
        let mut r = DnsRecords {
            mesh_cidr: Some(view.mesh_cidr.trunc()),
            // A serial that moves with the netmap (wraps after 4 billion versions).
            serial: (view.version & u64::from(u32::MAX)) as u32,
            ..DnsRecords::default()
        };
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

    /// The SOA serial (the netmap version).
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// The reverse zone of the mesh prefix (`99.99.10.in-addr.arpa` for a /24; for prefixes
    /// not on an octet (nibble) boundary, the enclosing one).
    pub fn reverse_zone(&self) -> Option<String> {
        let cidr = self.mesh_cidr?;
        Some(match cidr {
            IpNet::V4(n) => {
                let octets = usize::from(n.prefix_len() / 8);
                let mut labels: Vec<String> = n.network().octets()[..octets]
                    .iter()
                    .map(u8::to_string)
                    .collect();
                labels.reverse();
                labels.push("in-addr.arpa".into());
                labels.join(".")
            }
            IpNet::V6(n) => {
                let nibbles = usize::from(n.prefix_len() / 4);
                let mut labels: Vec<String> = n
                    .network()
                    .octets()
                    .iter()
                    .flat_map(|b| [b >> 4, b & 0xf])
                    .take(nibbles)
                    .map(|x| format!("{x:x}"))
                    .collect();
                labels.reverse();
                labels.push("ip6.arpa".into());
                labels.join(".")
            }
        })
    }

    /// The answer to `name`/`query`: forward names in `mesh.internal`, PTR for addresses in
    /// the mesh prefix, REFUSED for everything else.
    pub fn answer(&self, name: &str, query: DnsQuery) -> DnsAnswer {
        let n = name.trim_end_matches('.').to_ascii_lowercase();
        if Self::in_zone(&n) {
            if n == MESH_DOMAIN {
                return match query {
                    DnsQuery::Soa => DnsAnswer::Soa,
                    DnsQuery::Ns => DnsAnswer::Ns,
                    _ => DnsAnswer::NoData,
                };
            }
            return match (self.forward.get(&n), query) {
                (None, _) => DnsAnswer::NxDomain,
                (Some(a @ IpAddr::V4(_)), DnsQuery::A)
                | (Some(a @ IpAddr::V6(_)), DnsQuery::Aaaa) => DnsAnswer::Address(*a),
                (Some(_), _) => DnsAnswer::NoData,
            };
        }
        let Some(zone) = self.reverse_zone() else {
            return DnsAnswer::Refused;
        };
        if n == zone {
            return match query {
                DnsQuery::Soa => DnsAnswer::Soa,
                DnsQuery::Ns => DnsAnswer::Ns,
                _ => DnsAnswer::NoData,
            };
        }
        if !n.ends_with(&format!(".{zone}")) {
            return DnsAnswer::Refused;
        }
        match parse_reverse_name(&n) {
            Some(addr) if self.mesh_cidr.is_some_and(|c| c.contains(&addr)) => {
                match (self.reverse(addr), query) {
                    (Some(fqdn), DnsQuery::Ptr) => DnsAnswer::Ptr(fqdn.to_owned()),
                    (Some(_), _) => DnsAnswer::NoData,
                    (None, _) => DnsAnswer::NxDomain,
                }
            }
            // Inside the reverse zone but outside the prefix, or a partial name (an empty
            // non-terminal like `5.99.10.in-addr.arpa` in a /16 zone).
            _ => DnsAnswer::NxDomain,
        }
    }

    pub fn len(&self) -> usize {
        self.forward.len()
    }

    pub fn is_empty(&self) -> bool {
        self.forward.is_empty()
    }
}

/// `2.99.99.10.in-addr.arpa` → 10.99.99.2; the 32 nibbles of `ip6.arpa` → the IPv6 address.
pub fn parse_reverse_name(name: &str) -> Option<IpAddr> {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    if let Some(rest) = n.strip_suffix(".in-addr.arpa") {
        let mut octets: Vec<u8> = rest
            .split('.')
            .map(|l| l.parse::<u8>().ok())
            .collect::<Option<_>>()?;
        if octets.len() != 4 {
            return None;
        }
        octets.reverse();
        return Some(IpAddr::from([octets[0], octets[1], octets[2], octets[3]]));
    }
    let rest = n.strip_suffix(".ip6.arpa")?;
    let mut nibbles: Vec<u8> = rest
        .split('.')
        .map(|l| {
            if l.len() == 1 {
                u8::from_str_radix(l, 16).ok()
            } else {
                None
            }
        })
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    nibbles.reverse();
    let mut bytes = [0u8; 16];
    for (i, pair) in nibbles.chunks(2).enumerate() {
        bytes[i] = (pair[0] << 4) | pair[1];
    }
    Some(IpAddr::from(bytes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

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
            next_public_key: None,
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
            rotate_requested: false,
            ungranted_routes: Vec::new(),
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
        assert_eq!(groups[1]["targets"][0], "10.99.99.1:51873");
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

    fn drbd(hosts: &[&str]) -> DrbdIntegration {
        DrbdIntegration {
            resource: "r0".into(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            port: 7788,
            path: "/etc/drbd.d/r0.res".into(),
            device: "/dev/drbd0".into(),
            disk: Some("/dev/vg0/r0".into()),
            meta_disk: "internal".into(),
            template: None,
            check: None,
            reload: None,
        }
    }

    #[test]
    fn drbd_resource_two_hosts() {
        let v = view("dock-prod");
        let text = drbd_resource(&v, &drbd(&["dock-prod", "dock-load"]), "wgmesh0", None).unwrap();
        assert_eq!(
            text,
            "# Written by meshd from the mesh netmap; meshd rewrites it when the mesh changes.
resource r0 {
  device /dev/drbd0;
  disk /dev/vg0/r0;
  meta-disk internal;

  on dock-prod {
    address 10.99.99.2:7788;
  }

  on dock-load {
    address 10.99.99.1:7788;
  }
}
"
        );
        // drbdadm-84 (drbd-utils with the in-kernel drbd 8.4) rejects `node-id`.
        assert!(!text.contains("node-id"), "{text}");
        assert!(drbd_applies(&v, &drbd(&["dock-prod", "dock-load"])));
        assert!(!drbd_applies(&v, &drbd(&["nas", "dock-load"])));
    }

    #[test]
    fn drbd_resource_mesh_and_unknown_host() {
        let v = view("dock-prod");
        let text = drbd_resource(
            &v,
            &drbd(&["dock-prod", "dock-load", "nas"]),
            "wgmesh0",
            None,
        )
        .unwrap();
        assert!(
            text.ends_with("  connection-mesh {\n    hosts dock-prod dock-load nas;\n  }\n}\n"),
            "{text}"
        );
        // More than two hosts is DRBD 9: every host has its node-id, its position in `hosts`.
        for (id, h) in ["dock-prod", "dock-load", "nas"].iter().enumerate() {
            assert!(
                text.contains(&format!("  on {h} {{\n    node-id {id};\n    address ")),
                "{text}"
            );
        }
        assert_eq!(
            drbd_resource(&v, &drbd(&["dock-prod", "ghost"]), "wgmesh0", None),
            Err(RenderError::UnknownDrbdHost {
                resource: "r0".into(),
                host: "ghost".into()
            })
        );
        // IPv6 mesh addresses use DRBD's `ipv6 [ADDR]:PORT` form.
        let mut v6 = v.clone();
        for h in &mut v6.hosts {
            if h.name == "dock-load" {
                h.address = "fd00::1".parse().unwrap();
            }
        }
        let text = drbd_resource(&v6, &drbd(&["dock-prod", "dock-load"]), "wgmesh0", None).unwrap();
        assert!(text.contains("address ipv6 [fd00::1]:7788;"), "{text}");
    }

    #[test]
    fn user_templates_see_the_view() {
        let v = view("dock-prod");
        let src = "{% for h in hosts %}{{ h.name }}={{ h.address }}{% if h.me %}*{% endif %} {% endfor %}{{ interface }} {{ me.fqdn }} {{ mesh_cidr }} v{{ version }}\n";
        assert_eq!(
            render_template("t", src, &v, "wgmesh0").unwrap(),
            "dock-load=10.99.99.1 dock-prod=10.99.99.2* nas=10.99.99.20 wgmesh0 dock-prod.mesh.internal 10.99.99.0/24 v7\n"
        );
        let e = render_template("t", "{{ hosst }}", &v, "wgmesh0").unwrap_err();
        assert!(
            matches!(e, RenderError::Template { ref name, .. } if name == "t"),
            "{e}"
        );
        let e = render_template("t", "{% for %}", &v, "wgmesh0").unwrap_err();
        assert!(e.to_string().starts_with("template t: "), "{e}");
    }

    #[test]
    fn static_view_from_peers() {
        let key = |b: u8| PublicKey([b; 32]);
        let peers = vec![
            PeerConfig {
                name: "b".into(),
                public_key: key(2),
                endpoint: None,
                allowed_ips: vec![
                    "192.168.5.0/24".parse().unwrap(),
                    "10.99.99.0/30".parse().unwrap(),
                    "10.99.99.2/32".parse().unwrap(),
                ],
                persistent_keepalive: None,
            },
            PeerConfig {
                name: "outside".into(),
                public_key: key(3),
                endpoint: None,
                allowed_ips: vec!["192.168.6.0/24".parse().unwrap()],
                persistent_keepalive: None,
            },
        ];
        let v = MeshView::from_static("a", "10.99.99.1/24".parse().unwrap(), &peers);
        assert_eq!(v.mesh_cidr, "10.99.99.0/24".parse::<IpNet>().unwrap());
        let names: Vec<(&str, IpAddr, bool)> = v
            .hosts
            .iter()
            .map(|h| (h.name.as_str(), h.address, h.me))
            .collect();
        assert_eq!(
            names,
            [
                ("a", IpAddr::from([10, 99, 99, 1]), true),
                ("b", IpAddr::from([10, 99, 99, 2]), false)
            ]
        );
    }

    #[test]
    fn view_from_a_static_config_file() {
        let text = include_str!("../../configs/dock-mirror.toml");
        let config = crate::config::parse(text, "dock-mirror.toml").unwrap();
        let v =
            MeshView::from_config(&config).expect("dock-mirror.toml names its host and address");
        assert_eq!(v.me.name, "dock-mirror");
        assert_eq!(v.hosts.len(), config.peers.len() + 1, "{v:?}");
        assert!(v.hosts.iter().all(|h| v.mesh_cidr.contains(&h.address)));
        assert_eq!(
            v.host("dock-load").map(|h| h.address),
            Some(IpAddr::from([10, 99, 99, 1]))
        );
    }

    #[test]
    fn outputs_follow_the_config() {
        let text = r#"
            [integrations.k3s]
            role = "server"
            path = "/t/k3s.yaml"
            [[integrations.drbd]]
            resource = "r0"
            hosts = ["dock-prod", "dock-load"]
            disk = "/dev/vg0/r0"
            path = "/t/r0.res"
            [[integrations.drbd]]
            resource = "r1"
            hosts = ["nas", "dock-load"]
            disk = "/dev/vg0/r1"
            path = "/t/r1.res"
            [integrations.hosts]
            path = "/t/hosts"
            [[integrations.template]]
            name = "x"
            source = "/t/x.j2"
            path = "/t/x"
        "#;
        let cfg = crate::config::integrations::parse_integrations(text, "t.toml").unwrap();
        let outs = outputs(&cfg);
        let names: Vec<&str> = outs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["k3s", "drbd:r0", "drbd:r1", "hosts", "template:x"]);
        let view = view("dock-prod");
        assert!(outs[1].applies(&view));
        assert!(!outs[2].applies(&view));
        assert_eq!(outs[4].template_path(), Some(Path::new("/t/x.j2")));
        assert_eq!(
            outs[1].check.as_deref().unwrap(),
            ["drbdadm", "-d", "adjust", "r0"]
        );
        let k3s = outs[0].render(&view, "wgmesh0", None).unwrap();
        assert!(k3s.contains("node-ip: 10.99.99.2\n"), "{k3s}");
        assert_eq!(
            outs[4]
                .render(&view, "wgmesh0", Some("{{ me.name }}"))
                .unwrap(),
            "dock-prod"
        );
    }

    #[test]
    fn dns_answers_forward_reverse_and_refuses_the_rest() {
        let r = DnsRecords::new(&view("dock-load"));
        assert_eq!(r.serial(), 7);
        assert_eq!(
            r.answer("dock-prod.mesh.internal.", DnsQuery::A),
            DnsAnswer::Address(IpAddr::from([10, 99, 99, 2]))
        );
        assert_eq!(
            r.answer("dock-prod.mesh.internal", DnsQuery::Aaaa),
            DnsAnswer::NoData
        );
        assert_eq!(
            r.answer("ghost.mesh.internal", DnsQuery::A),
            DnsAnswer::NxDomain
        );
        assert_eq!(r.answer("mesh.internal", DnsQuery::Soa), DnsAnswer::Soa);
        assert_eq!(r.answer("mesh.internal", DnsQuery::A), DnsAnswer::NoData);
        assert_eq!(r.answer("example.com", DnsQuery::A), DnsAnswer::Refused);
        assert_eq!(r.reverse_zone().as_deref(), Some("99.99.10.in-addr.arpa"));
        assert_eq!(
            r.answer("20.99.99.10.in-addr.arpa.", DnsQuery::Ptr),
            DnsAnswer::Ptr("nas.mesh.internal".into())
        );
        assert_eq!(
            r.answer("21.99.99.10.in-addr.arpa", DnsQuery::Ptr),
            DnsAnswer::NxDomain
        );
        assert_eq!(
            r.answer("1.1.168.192.in-addr.arpa", DnsQuery::Ptr),
            DnsAnswer::Refused
        );
        assert_eq!(
            r.answer("99.99.10.in-addr.arpa", DnsQuery::Soa),
            DnsAnswer::Soa
        );
        assert_eq!(
            parse_reverse_name("2.99.99.10.in-addr.arpa"),
            Some(IpAddr::from([10, 99, 99, 2]))
        );
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let name = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa";
        assert_eq!(parse_reverse_name(name), Some(v6));
        assert_eq!(parse_reverse_name("x.in-addr.arpa"), None);
    }
}
