//! `meshctl doctor`: gather the facts (sysctls, sockets, interface, K3s files, pings over the
//! mesh) and let `mesh_proto::doctor` judge them. The running daemon answers `Request::Doctor`
//! with [`gather`] + [`run`]; `meshd --doctor` runs [`run_offline`] with no daemon, marking
//! what only the daemon knows (handshakes, the coordinator) as FAIL "meshd is not running".

use std::net::IpAddr;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use ipnet::IpNet;
use mesh_proto::doctor::{
    daemon_not_running, handshake_check, ip_forward_check, k3s_check, mtu_check, mtu_next_probe,
    routes_check, rp_filter_check, Check, MtuProbe, Report, ICMP4_OVERHEAD, SOURCE_DAEMON,
    SOURCE_OFFLINE,
};
use mesh_proto::render::format_age;
use mesh_proto::PeerSpec;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkFlags;

use crate::agent::{mesh_address, now, Agent, AgentStatus};
use crate::backend::{LinkBackend, WgBackend};
use crate::disk::state::StateDir;
use crate::netsys::ports::{port_state, PortState};
use crate::runtime::settings::Settings;

/// Where K3s reads its configuration.
pub const K3S_CONFIG: &str = "/etc/rancher/k3s/config.yaml";
pub const K3S_CONFIG_DIR: &str = "/etc/rancher/k3s/config.yaml.d";

/// Smallest ping payload (ping's default): if this does not come back, the peer is down.
const SMALL_PAYLOAD: u16 = 56;

/// One peer as the doctor sees it.
#[derive(Debug, Clone)]
pub struct PeerFact {
    pub name: String,
    pub mesh_address: Option<IpAddr>,
    /// Latest handshake, seconds since the epoch (`None`: never). Daemon only.
    pub latest_handshake_unix: Option<u64>,
    /// Where the device sends to the peer now. Daemon only.
    pub endpoint: Option<std::net::SocketAddr>,
    /// The coordinator's view of the peer's address (the netmap's observed candidate).
    pub observed: Option<std::net::SocketAddr>,
}

/// What only the running daemon knows.
#[derive(Debug, Clone)]
pub struct DaemonFacts {
    pub status: AgentStatus,
    pub managed: bool,
    pub pid: u32,
}

/// Everything the checks need, taken from the agent (or the configuration) up front so the
/// slow part ([`run`]: pings) does not hold the agent.
#[derive(Debug, Clone)]
pub struct Input {
    pub settings: Settings,
    pub host: Option<String>,
    pub address: Option<IpNet>,
    pub peers: Vec<PeerFact>,
    /// The peers as configured on the device (for the routes they need).
    pub peer_specs: Vec<PeerSpec>,
    /// `None`: offline (`meshd --doctor`).
    pub daemon: Option<DaemonFacts>,
    /// The integrations' latest results (daemon only: offline there are none).
    pub integrations: Vec<mesh_proto::handoff::IntegrationStatus>,
    /// Static peers in the netmap: they list our key by hand, so scheduled rotation waits.
    pub static_peers: Vec<String>,
    /// Peers' prefixes this host does not take (`mesh_proto::routes::accept_netmap`).
    pub skipped_routes: Vec<mesh_proto::routes::SkippedRoute>,
}

/// The facts from the running agent.
pub async fn gather<W: WgBackend, L: LinkBackend>(agent: &mut Agent<W, L>) -> Input {
    let peers = match agent.peers().await {
        Ok(views) => views
            .iter()
            .map(|v| PeerFact {
                name: v.name.clone(),
                mesh_address: v.mesh_address.map(|n| n.addr()),
                latest_handshake_unix: v
                    .observed
                    .as_ref()
                    .and_then(|o| o.last_handshake)
                    .map(|d| d.as_secs()),
                endpoint: v.observed.as_ref().and_then(|o| o.endpoint),
                observed: v.netmap.as_ref().and_then(|n| {
                    n.endpoints
                        .iter()
                        .find(|c| c.kind == mesh_proto::netmap::EndpointKind::Observed)
                        .map(|c| c.addr)
                }),
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    let status = agent.status();
    let skipped_routes = status.skipped_routes.clone();
    Input {
        settings: agent.settings().clone(),
        host: agent.host_name(),
        address: agent.address(),
        peers,
        peer_specs: agent.desired().peers.values().cloned().collect(),
        daemon: Some(DaemonFacts {
            managed: agent.membership().is_some() || agent.settings().coordinator.is_some(),
            status,
            pid: std::process::id(),
        }),
        integrations: Vec::new(),
        static_peers: crate::member::rotate::static_peer_names(agent.netmap()),
        skipped_routes,
    }
}

/// The running daemon's doctor (for callers that hold the agent anyway).
pub async fn run_daemon<W: WgBackend, L: LinkBackend>(agent: &mut Agent<W, L>) -> Report {
    run(gather(agent).await).await
}

/// `meshd --doctor`: the same checks from the configuration and the state directory.
pub async fn run_offline(settings: Settings) -> Report {
    let state = StateDir::new(&settings.state_dir);
    let membership = state.load_membership().ok().flatten();
    let netmap = state.load_netmap().ok().flatten();
    // The netmap as the daemon applies it: the peers' prefixes this host does not take are
    // left out (and reported).
    let system_routes = match crate::netsys::netlink::connect() {
        Ok(handle) => crate::netsys::routing::system_routes(&handle)
            .await
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let (netmap, skipped_routes) = match netmap {
        Some(nm) => {
            let underlay: Vec<_> = system_routes
                .into_iter()
                .filter(|r| r.dev.as_deref() != Some(settings.interface.as_str()))
                .collect();
            let (nm, skipped) = crate::agent::desired::accepted_netmap(
                &settings,
                membership.as_ref(),
                &nm,
                &underlay,
            );
            (Some(nm), skipped)
        }
        None => (None, Vec::new()),
    };
    let mut peer_specs: Vec<PeerSpec> = settings.peers.iter().map(|p| p.spec.clone()).collect();
    let mut peers: Vec<PeerFact> = settings
        .peers
        .iter()
        .map(|p| PeerFact {
            name: p.name.clone(),
            mesh_address: mesh_address(&p.spec.allowed_ips).map(|n| n.addr()),
            latest_handshake_unix: None,
            endpoint: None,
            observed: None,
        })
        .collect();
    if let Some(nm) = &netmap {
        for p in &nm.peers {
            if !peer_specs.iter().any(|q| q.public_key == p.public_key) {
                peer_specs.push(PeerSpec {
                    public_key: p.public_key,
                    preshared_key: None,
                    endpoint: None,
                    allowed_ips: p.allowed_ips.clone(),
                    persistent_keepalive: None,
                });
            }
            if !peers.iter().any(|q| q.mesh_address == Some(p.address)) {
                peers.push(PeerFact {
                    name: p.name.clone(),
                    mesh_address: Some(p.address),
                    latest_handshake_unix: None,
                    endpoint: None,
                    observed: None,
                });
            }
        }
    }
    let address = settings
        .address
        .or_else(|| membership.as_ref().map(|m| m.interface_address()));
    let host = settings
        .host_name
        .clone()
        .or_else(|| membership.as_ref().map(|m| m.host_name.clone()));
    let managed = membership.is_some() || settings.coordinator.is_some();
    let mut report = run(Input {
        settings,
        host,
        address,
        peers,
        peer_specs,
        daemon: None,
        integrations: Vec::new(),
        static_peers: crate::member::rotate::static_peer_names(netmap.as_ref()),
        skipped_routes,
    })
    .await;
    if !managed {
        // `run` cannot tell a static host from a managed one offline.
        report.checks.retain(|c| c.name != "coordinator");
        report.checks.push(Check::ok(
            "coordinator",
            "static configuration (no coordinator)",
        ));
    }
    report
}

/// Run every check.
pub async fn run(input: Input) -> Report {
    let started = Instant::now();
    let s = &input.settings;
    let iface = s.interface.as_str();
    let mut checks = Vec::new();
    let now_unix = now().as_secs();

    // The daemon itself.
    match &input.daemon {
        Some(d) => checks.push(daemon_check(d, now_unix)),
        None => checks.push(daemon_not_running("meshd")),
    }

    // Our UDP port.
    let port = s.listen_port;
    let online = input.daemon.is_some();
    checks.push(match port_state(port, iface).await {
        PortState::Ours => Check::ok("port", format!("UDP {port} is held by {iface} (ours)")),
        // Not joined yet: no interface, by design (the interface check says what to do).
        PortState::Free if input.address.is_none() => Check::ok(
            "port",
            format!("UDP {port} is free; meshd takes it when this host joins"),
        ),
        PortState::Free if online => Check::fail(
            "port",
            format!("nothing listens on UDP {port}: {iface} has no WireGuard device"),
            "meshctl reload, or restart meshd",
        ),
        PortState::Free => Check::ok("port", format!("UDP {port} is free")),
        PortState::Taken(owner) => Check::fail(
            "port",
            format!("UDP {port} is held by {owner}, not by {iface}"),
            format!(
                "stop {owner}, or set another listen_port in [host] of {}",
                s.config_path.display()
            ),
        ),
    });

    // The interface and our address.
    let link = read_link(iface).await;
    checks.push(interface_check(iface, input.address, s.mtu, &link));

    // Route overlaps: the mesh CIDR and the peers' routes against everyone else's routes.
    checks.push(routes(&input).await);
    // The peers' routes this host skipped (routes.accept, the always-refused space).
    checks.push(mesh_proto::doctor::peer_routes_check(
        &s.routes.accept,
        &input.skipped_routes,
    ));

    // rp_filter (the kernel uses the larger of `all` and the interface's).
    checks.push(rp_filter_check(
        iface,
        read_sysctl("all", "rp_filter"),
        read_sysctl(iface, "rp_filter"),
    ));

    // Forwarding where we advertise subnets.
    checks.push(ip_forward(s).await);

    // K3s.
    checks.push(k3s_check(iface, &k3s_files()));

    // The static key's age against its rotation schedule.
    checks.push(mesh_proto::doctor::key_age_check(
        crate::disk::keyfile::created_unix(&s.private_key_file),
        now_unix,
        s.rotate_every.map(|d| d.as_secs()),
        crate::disk::keyfile::next_path(&s.private_key_file).exists(),
        &input.static_peers,
    ));

    // The files meshd keeps (one check each: OK, or FAIL with the error; the old file stays).
    checks.extend(
        input
            .integrations
            .iter()
            .map(mesh_proto::doctor::integration_check),
    );

    // The coordinator.
    if let Some(d) = &input.daemon {
        if d.managed {
            checks.extend(coordinator_checks(&d.status, now_unix));
        } else {
            checks.push(Check::ok(
                "coordinator",
                "static configuration (no coordinator)",
            ));
        }
    } else {
        checks.push(daemon_not_running("coordinator"));
    }

    // Handshakes.
    if input.daemon.is_some() {
        for p in &input.peers {
            let age = p.latest_handshake_unix.map(|t| now_unix.saturating_sub(t));
            checks.push(handshake_check(&p.name, age));
            let recent = age.is_some_and(|a| a < mesh_proto::wire::control::RECENT_HANDSHAKE_SECS);
            checks.extend(mesh_proto::doctor::nat_mapping_check(
                &p.name, p.endpoint, p.observed, recent,
            ));
        }
    } else if !input.peers.is_empty() {
        checks.push(daemon_not_running("handshakes"));
    }

    // Path MTU to each peer, probed over the mesh (in parallel).
    if link.is_some() {
        let mtu = s.mtu;
        let probes = input.peers.iter().map(|p| async move {
            match p.mesh_address {
                Some(IpAddr::V4(a)) => mtu_check(&p.name, probe_mtu(IpAddr::V4(a), mtu).await),
                Some(IpAddr::V6(_)) => {
                    Check::ok(format!("mtu {}", p.name), "IPv6 mesh address; not probed")
                }
                None => Check::warn(
                    format!("mtu {}", p.name),
                    "no mesh address (no /32 in allowed_ips); not probed",
                    "give the peer its mesh address as a /32 in allowed_ips",
                ),
            }
        });
        checks.extend(futures::future::join_all(probes).await);
    } else if !input.peers.is_empty() {
        checks.push(Check::fail(
            "mtu",
            format!("{iface} is not up; path MTU not probed"),
            "start meshd",
        ));
    }

    Report {
        host: input.host.clone(),
        interface: iface.to_owned(),
        source: if online {
            SOURCE_DAEMON
        } else {
            SOURCE_OFFLINE
        }
        .to_owned(),
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        checks,
    }
}

async fn routes(input: &Input) -> Check {
    let mut settings = input.settings.clone();
    settings.address = input.address;
    let Some(address) = input.address else {
        return Check::warn(
            "routes",
            "no mesh address yet (not joined): nothing to route",
            "meshctl join - (the token from `meshctl invite NAME` on stdin)",
        );
    };
    let wanted = mesh_proto::routes::desired_routes(address, &input.peer_specs).len();
    match crate::netsys::routing::check(&settings, &input.peer_specs).await {
        Ok(conflicts) => routes_check(wanted, &conflicts),
        Err(e) => Check::warn(
            "routes",
            format!("cannot list the routes: {e}"),
            "run meshctl doctor as root",
        ),
    }
}

async fn ip_forward(s: &Settings) -> Check {
    let advertise = &s.routes.advertise;
    let mut interfaces = vec![s.interface.clone()];
    if !advertise.is_empty() {
        if let Ok(handle) = crate::netsys::netlink::connect() {
            for net in advertise.iter().filter(|n| matches!(n, IpNet::V4(_))) {
                if let Ok(Some(dev)) = crate::netsys::routing::egress_interface(&handle, *net).await
                {
                    if !interfaces.contains(&dev) {
                        interfaces.push(dev);
                    }
                }
            }
        }
    }
    let states: Vec<(String, Option<bool>)> = interfaces
        .into_iter()
        .map(|i| {
            let on = read_sysctl(&i, "forwarding").map(|v| v == 1);
            (i, on)
        })
        .collect();
    ip_forward_check(advertise, &states)
}

fn daemon_check(d: &DaemonFacts, now_unix: u64) -> Check {
    let st = &d.status;
    let last = st
        .last_pass
        .map(|p| {
            format!(
                "last pass {}",
                format_age(now_unix.saturating_sub(p.as_secs()))
            )
        })
        .unwrap_or_else(|| "no pass yet".to_owned());
    match &st.last_error {
        None => Check::ok(
            "meshd",
            format!("running (pid {}), {}, {last}", d.pid, st.backend),
        ),
        Some(e) => Check::warn(
            "meshd",
            format!("running (pid {}), {last}, with an error: {e}", d.pid),
            "see the log (journalctl -u meshd) and meshctl status",
        ),
    }
}

fn coordinator_checks(st: &AgentStatus, now_unix: u64) -> Vec<Check> {
    let m = &st.mesh;
    let mut out = Vec::new();
    let contact = m
        .last_contact_unix
        .map(|t| format!("last contact {}", format_age(now_unix.saturating_sub(t))))
        .unwrap_or_else(|| "never contacted".to_owned());
    let at = m
        .api
        .map(|a| a.to_string())
        .unwrap_or_else(|| "(unknown address)".to_owned());
    out.push(if m.is_coordinator {
        Check::ok("coordinator", format!("this host ({at})"))
    } else {
        match m.reachable {
            Some(true) => Check::ok("coordinator", format!("{at} reachable, {contact}")),
            Some(false) => Check::fail(
                "coordinator",
                format!(
                    "{at} unreachable ({}), {contact}; the last netmap stays in force",
                    m.last_error.as_deref().unwrap_or("no detail")
                ),
                "check the coordinator host runs meshd and that this host has a handshake with it",
            ),
            None => Check::warn(
                "coordinator",
                format!("{at}: no answer yet"),
                "wait a few seconds and run doctor again",
            ),
        }
    });
    out.push(match st.netmap_version {
        Some(v) => Check::ok(
            "netmap",
            format!("version {v}, current as of the {contact}"),
        ),
        None => Check::fail(
            "netmap",
            "no netmap yet: peers from the coordinator are not configured",
            "check the coordinator check above; meshctl status",
        ),
    });
    out
}

/// What the interface looks like.
#[derive(Debug, Clone)]
pub struct LinkFacts {
    pub up: bool,
    pub mtu: Option<u32>,
    pub addresses: Vec<IpNet>,
}

/// The interface, over netlink (`None`: no such interface).
pub async fn read_link(iface: &str) -> Option<LinkFacts> {
    let netlink = crate::netsys::netlink::Scoped::open().ok()?;
    let handle = &netlink.handle;
    async {
        let link = handle
            .link()
            .get()
            .match_name(iface.to_owned())
            .execute()
            .try_next()
            .await
            .ok()??;
        let mtu = link.attributes.iter().find_map(|a| match a {
            rtnetlink::packet_route::link::LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        let mut addresses = Vec::new();
        let mut stream = handle
            .address()
            .get()
            .set_link_index_filter(link.header.index)
            .execute();
        while let Ok(Some(msg)) = stream.try_next().await {
            let mut ip = None;
            for attr in &msg.attributes {
                match attr {
                    AddressAttribute::Local(a) => ip = Some(*a),
                    AddressAttribute::Address(a) if ip.is_none() => ip = Some(*a),
                    _ => {}
                }
            }
            if let Some(net) = ip.and_then(|a| IpNet::new(a, msg.header.prefix_len).ok()) {
                addresses.push(net);
            }
        }
        Some(LinkFacts {
            up: link.header.flags.contains(LinkFlags::Up),
            mtu,
            addresses,
        })
    }
    .await
}

fn interface_check(
    iface: &str,
    address: Option<IpNet>,
    mtu: u16,
    link: &Option<LinkFacts>,
) -> Check {
    let Some(address) = address else {
        return Check::fail(
            "interface",
            "this host has no mesh address yet (not joined)",
            "meshctl join - (paste the token from `meshctl invite NAME` on the coordinator)",
        );
    };
    let Some(l) = link else {
        return Check::fail(
            "interface",
            format!("{iface} does not exist"),
            "start meshd (systemctl start meshd)",
        );
    };
    if !l.addresses.contains(&address) {
        return Check::fail(
            "interface",
            format!(
                "{iface} exists but does not carry {address} (has: {})",
                if l.addresses.is_empty() {
                    "none".to_owned()
                } else {
                    l.addresses
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
            "meshctl reload (meshd adds it on its next pass)",
        );
    }
    if !l.up {
        return Check::fail(
            "interface",
            format!("{iface} carries {address} but is down"),
            "meshctl reload (meshd sets it up on its next pass)",
        );
    }
    match l.mtu {
        Some(m) if m != u32::from(mtu) => Check::warn(
            "interface",
            format!("{iface} is up with {address}, but its MTU is {m}, not the configured {mtu}"),
            "meshctl reload",
        ),
        _ => Check::ok(
            "interface",
            format!("{iface} is up with {address}, mtu {mtu}"),
        ),
    }
}

/// `/proc/sys/net/ipv4/conf/DEV/KEY` as a number.
fn read_sysctl(dev: &str, key: &str) -> Option<u8> {
    crate::netsys::sysctl::read_number(&crate::netsys::sysctl::ipv4_conf(dev, key))
}

/// K3s configuration files in the order K3s reads them, with their text.
fn k3s_files() -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Ok(t) = std::fs::read_to_string(K3S_CONFIG) {
        out.push((K3S_CONFIG.to_owned(), t));
    }
    if let Ok(entries) = std::fs::read_dir(K3S_CONFIG_DIR) {
        let mut paths: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        paths.sort();
        for p in paths {
            if let Ok(t) = std::fs::read_to_string(&p) {
                out.push((p.display().to_string(), t));
            }
        }
    }
    out
}

/// One ping with DF set and `payload` bytes; true if answered within a second.
async fn ping_df(addr: IpAddr, payload: u16) -> bool {
    let out = tokio::process::Command::new("ping")
        .args(["-n", "-q", "-M", "do", "-c", "1", "-W", "1", "-s"])
        .arg(payload.to_string())
        .arg(addr.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(Duration::from_secs(3), out).await {
        Ok(Ok(status)) => status.success(),
        _ => false,
    }
}

/// Twice before saying no (the first packet to a peer may wait for a handshake).
async fn ping_df_retry(addr: IpAddr, payload: u16) -> bool {
    ping_df(addr, payload).await || ping_df(addr, payload).await
}

/// Probe the path MTU to `addr` over the mesh: does an `mtu`-byte packet pass with DF set;
/// if not, binary-search the largest that does.
pub async fn probe_mtu(addr: IpAddr, mtu: u16) -> MtuProbe {
    if !ping_df_retry(addr, SMALL_PAYLOAD).await {
        return MtuProbe::Unreachable;
    }
    let full = mtu.saturating_sub(ICMP4_OVERHEAD);
    if full <= SMALL_PAYLOAD || ping_df_retry(addr, full).await {
        return MtuProbe::Passes { mtu };
    }
    let (mut lo, mut hi) = (SMALL_PAYLOAD, full);
    while let Some(size) = mtu_next_probe(lo, hi) {
        if ping_df(addr, size).await {
            lo = size;
        } else {
            hi = size;
        }
    }
    MtuProbe::TooLarge {
        mtu,
        largest: lo + ICMP4_OVERHEAD,
    }
}
