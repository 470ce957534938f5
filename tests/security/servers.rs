//! Security suite (servers): attacks from docs/SECURITY.md run against the lab, each asserting that
//! the attack fails and that the mesh still works afterwards.
//!
//! - ~1000 half-sent requests from an underlay neighbour to the coordinator's key-notice port
//!   and from a mesh member to the coordinator API, its /metrics and its mesh DNS over TCP: the
//!   connections over the caps are closed at once, the rest after the header timeout; meanwhile and afterwards `meshctl status`
//!   answers, a host joins, key-notice requests from elsewhere are answered, every pair pings, and
//!   meshd's descriptors come back to where they were.
//! - DNS and /metrics do not answer an underlay neighbour (neither at the underlay address nor
//!   at the mesh address routed over the underlay) but do over the mesh and on the host itself.
//! - `ip link del wgmesh0` on the coordinator: once meshd has recreated it, the API (a join,
//!   `meshctl hosts` from an admin host), DNS and /metrics answer again.
//!
//! `cargo build --workspace --bins && cargo test -p meshlab --test security_servers --
//! --nocapture` (as root; needs curl and dig). Figures are printed.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use meshlab::coord::API_PORT;
use meshlab::{poll_until, JoinMode, Lab, LabOpts, COORDINATOR, MESH_IFACE, MESH_PORT};

const MESH_TIMEOUT: Duration = Duration::from_secs(90);
const LOAD: Ipv4Addr = Ipv4Addr::new(10, 99, 99, 1);
const LOAD_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const METRICS_PORT: u16 = 51873;
/// How many half-sent requests each flood opens.
const FLOOD: usize = 1000;

/// The limits meshd promises (docs/SECURITY.md, "Servers"): connections one source may hold
/// and how long a half-sent request head may take, per server.
const KEY_NOTICES_PER_SOURCE: usize = 4;
const KEY_NOTICES_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const API_PER_SOURCE: usize = 16;
const API_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const METRICS_PER_SOURCE: usize = 4;
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DNS_TCP_PER_SOURCE: usize = 8;
const DNS_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    meshlab::one_lab_at_a_time()
}

fn mesh(host: &str) -> Ipv4Addr {
    meshlab::topology::mesh_addr(host).unwrap_or(Ipv4Addr::UNSPECIFIED)
}

/// Run `f` on a thread inside `host`'s network namespace (setns is per thread): the sockets
/// it opens are the host's.
fn spawn_in_host<T: Send + 'static>(
    lab: &Lab,
    host: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    let pid = lab.holder_pid(host)?;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("opening the network namespace of {host}"))?;
    let host = host.to_owned();
    Ok(std::thread::spawn(move || {
        // SAFETY: setns with a valid descriptor of a network namespace; it changes this
        // thread's namespace only, and the thread ends with `f`.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!("setns into {host}: {}", std::io::Error::last_os_error());
        }
        f()
    }))
}

/// Let this process hold a flood's sockets.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// What became of a flood's connections.
#[derive(Debug, Default)]
struct FloodReport {
    opened: usize,
    /// The connect itself failed (refused, timed out).
    not_connected: usize,
    /// Closed by the server long before its timeout (within half of it): refused over the cap,
    /// however slowly a loaded machine got round to accepting and closing it.
    closed_at_once: usize,
    /// Closed by the server later: how long each stayed open.
    closed_later: Vec<Duration>,
    /// Still open when the flood gave up waiting.
    still_open: usize,
}

impl FloodReport {
    fn longest(&self) -> Duration {
        self.closed_later.iter().max().copied().unwrap_or_default()
    }
}

/// Open `count` connections to `target`, each sending `half` (half a request) and nothing
/// more; watch them until the server has closed every one or `timeout` (the server's own, for
/// a half-sent request) plus 10 s have passed. A connection closed within half of `timeout`
/// counts as closed at once.
fn flood(target: SocketAddr, count: usize, half: &'static [u8], timeout: Duration) -> FloodReport {
    let watch = timeout + Duration::from_secs(10);
    let at_once = timeout / 2;
    let mut r = FloodReport::default();
    let mut open: Vec<(TcpStream, Instant)> = Vec::new();
    for _ in 0..count {
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(mut s) => {
                let _ = s.write_all(half);
                let _ = s.set_nonblocking(true);
                r.opened += 1;
                open.push((s, Instant::now()));
            }
            Err(_) => r.not_connected += 1,
        }
    }
    let deadline = Instant::now() + watch;
    let mut buf = [0u8; 512];
    while !open.is_empty() && Instant::now() < deadline {
        open.retain_mut(|(s, since)| match s.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            // Closed (EOF or reset), or an answer (a 408 and close): the server let go.
            _ => {
                let held = since.elapsed();
                if held < at_once {
                    r.closed_at_once += 1;
                } else {
                    r.closed_later.push(held);
                }
                false
            }
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    r.still_open = open.len();
    r
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `dig @server NAME A` from `host` (UDP, or TCP with `tcp`): the status, or "no answer".
fn dig(lab: &Lab, host: &str, server: Ipv4Addr, name: &str, tcp: bool) -> Result<String> {
    let at = format!("@{server}");
    let mut argv = vec!["dig", "+time=1", "+tries=1", "+norecurse", at.as_str()];
    if tcp {
        argv.push("+tcp");
    }
    argv.extend_from_slice(&[name, "A"]);
    let out = lab.exec(host, &argv)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or_default().to_owned())
        .unwrap_or_else(|| "no answer".to_owned()))
}

fn metrics_code(lab: &Lab, host: &str, at: Ipv4Addr) -> Result<Option<u16>> {
    lab.http(
        host,
        "GET",
        &format!("http://{at}:{METRICS_PORT}/metrics"),
        None,
        &["--max-time", "2"],
    )
}

/// DNS (UDP and TCP) and /metrics of `server` answer from `from`.
fn served_over_mesh(lab: &Lab, from: &str, server: Ipv4Addr) -> Result<bool> {
    Ok(
        dig(lab, from, server, "dock-prod.mesh.internal", false)? == "NOERROR"
            && dig(lab, from, server, "dock-prod.mesh.internal", true)? == "NOERROR"
            && metrics_code(lab, from, server)? == Some(200),
    )
}

fn all_pairs_ping(lab: &Lab, hosts: &[&str]) -> Result<()> {
    lab.wait_mesh_pings(hosts, MESH_TIMEOUT)
}

// ------------------------------------------------------------------------------------ tests

/// ~1000 half-sent requests to the key-notice port (from an underlay neighbour) and to the API
/// (from a member): the caps hold, everything else keeps working.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn half_sent_request_floods_do_not_starve_anyone() -> Result<()> {
    let _g = serial();
    raise_nofile();
    let lab = Lab::build(LabOpts::with_hosts(&[
        "dock-load",
        "dock-prod",
        "dock-dash",
        "dock-mirror",
    ]))?;
    let engine = meshlab::engine_command(lab.bin_dir());
    let coord = lab.start_coordinator(&engine)?;
    let token = lab.invite("dock-prod", &["--admin"])?;
    lab.join_host("dock-prod", &token, JoinMode::Command)?;
    all_pairs_ping(&lab, &["dock-load", "dock-prod"])?;
    let fds_before = fd_count(coord.pid);

    // The key-notice port faces the internet: dock-dash (no member) floods it.
    let notice_flood = spawn_in_host(&lab, "dock-dash", || {
        Ok(flood(
            SocketAddr::from((LOAD_UNDERLAY, MESH_PORT)),
            FLOOD,
            b"GET /v1/key-notices/00 HTTP/1.1\r\nHost: x\r\nX-Slow: ",
            KEY_NOTICES_HEADER_TIMEOUT,
        ))
    })?;
    // The API: dock-prod, a member, floods it through the tunnel.
    let api_flood = spawn_in_host(&lab, "dock-prod", || {
        Ok(flood(
            SocketAddr::from((LOAD, API_PORT)),
            FLOOD,
            b"GET /v1/netmap HTTP/1.1\r\nHost: x\r\nX-Slow: ",
            API_HEADER_TIMEOUT,
        ))
    })?;

    // And its /metrics and mesh DNS over TCP (half a length prefix).
    let metrics_flood = spawn_in_host(&lab, "dock-prod", || {
        Ok(flood(
            SocketAddr::from((LOAD, METRICS_PORT)),
            FLOOD,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ",
            METRICS_HEADER_TIMEOUT,
        ))
    })?;
    let dns_flood = spawn_in_host(&lab, "dock-prod", || {
        Ok(flood(
            SocketAddr::from((LOAD, 53)),
            FLOOD,
            b"\x00",
            DNS_TCP_IDLE_TIMEOUT,
        ))
    })?;

    // Meanwhile: the coordinator answers its control socket, serves an honest key-notice
    // request from another underlay address, and a new host joins.
    std::thread::sleep(Duration::from_secs(1));
    let fds_during = fd_count(coord.pid);
    let t = Instant::now();
    lab.status(COORDINATOR, &[])
        .context("meshctl status on the coordinator during the floods")?;
    let status_took = t.elapsed();
    let key = "11".repeat(32);
    let notice = lab.http(
        "dock-prod",
        "GET",
        &format!("http://{LOAD_UNDERLAY}:{MESH_PORT}/v1/key-notices/{key}"),
        None,
        &[],
    )?;
    // curl proves no key, so the answer is the handler's refusal (403): what counts here is
    // that another source gets an HTTP answer at all while the port is flooded.
    assert_eq!(
        notice,
        Some(403),
        "a key-notice request from another address during the flood"
    );
    let t = Instant::now();
    let token = lab.invite("dock-mirror", &[])?;
    lab.join_host("dock-mirror", &token, JoinMode::Command)
        .context("a join during the floods")?;
    let join_took = t.elapsed();
    // The new host (another source) gets DNS and /metrics while dock-prod floods them.
    poll_until(
        Duration::from_secs(10),
        "DNS and /metrics of dock-load from dock-mirror during the floods",
        || served_over_mesh(&lab, "dock-mirror", LOAD),
    )?;

    let notices = notice_flood
        .join()
        .map_err(|_| anyhow!("the key-notice flood panicked"))??;
    let api = api_flood
        .join()
        .map_err(|_| anyhow!("the API flood panicked"))??;
    let metrics = metrics_flood
        .join()
        .map_err(|_| anyhow!("the /metrics flood panicked"))??;
    let dns = dns_flood
        .join()
        .map_err(|_| anyhow!("the DNS flood panicked"))??;
    for (what, r) in [
        ("key-notice flood from dock-dash", &notices),
        ("API flood from dock-prod", &api),
        ("/metrics flood from dock-prod", &metrics),
        ("DNS-over-TCP flood from dock-prod", &dns),
    ] {
        eprintln!(
            "{what}: {} opened ({} not), {} closed at once, {} later (longest held {:?}), {} \
             left open",
            r.opened,
            r.not_connected,
            r.closed_at_once,
            r.closed_later.len(),
            r.longest(),
            r.still_open
        );
    }
    eprintln!(
        "coordinator meshd descriptors: {fds_before} before, {fds_during} during; meshctl \
         status took {status_took:?}, the join {join_took:?}"
    );
    for (what, r, per_source, header) in [
        (
            "key notices",
            &notices,
            KEY_NOTICES_PER_SOURCE,
            KEY_NOTICES_HEADER_TIMEOUT,
        ),
        ("API", &api, API_PER_SOURCE, API_HEADER_TIMEOUT),
        (
            "/metrics",
            &metrics,
            METRICS_PER_SOURCE,
            METRICS_HEADER_TIMEOUT,
        ),
        (
            "DNS over TCP",
            &dns,
            DNS_TCP_PER_SOURCE,
            DNS_TCP_IDLE_TIMEOUT,
        ),
    ] {
        assert!(
            r.opened >= FLOOD * 9 / 10,
            "{what}: the flood did not get going: {r:?}"
        );
        assert_eq!(r.still_open, 0, "{what}: connections left open: {r:?}");
        assert!(
            r.closed_later.len() <= per_source,
            "{what}: more than {per_source} half-sent requests were held: {r:?}"
        );
        assert!(
            r.closed_at_once >= r.opened - per_source,
            "{what}: over-cap connections were not closed at once: {r:?}"
        );
        assert!(
            r.longest() <= header + Duration::from_secs(3),
            "{what}: a half-sent request was held {:?}",
            r.longest()
        );
    }
    assert!(
        fds_during < fds_before + 100,
        "meshd held {fds_during} descriptors during the floods ({fds_before} before)"
    );

    // Afterwards: everything as before.
    all_pairs_ping(&lab, &["dock-load", "dock-prod", "dock-mirror"])?;
    lab.status(COORDINATOR, &[])?;
    lab.meshctl("dock-prod", &["hosts"])
        .context("meshctl hosts from the admin host after the flood")?;
    let fds_after = fd_count(coord.pid);
    eprintln!("coordinator meshd descriptors after: {fds_after}");
    assert!(
        fds_after < fds_before + 20,
        "descriptors left behind: {fds_before} before, {fds_after} after"
    );
    Ok(())
}

/// Mesh DNS and /metrics answer over the mesh (and the host itself) but not an underlay
/// neighbour, even one that routes the mesh address over the underlay.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn dns_and_metrics_do_not_answer_the_underlay() -> Result<()> {
    let _g = serial();
    let lab = Lab::build(LabOpts::with_hosts(&[
        "dock-load",
        "dock-prod",
        "dock-dash",
    ]))?;
    let engine = meshlab::engine_command(lab.bin_dir());
    lab.start_coordinator(&engine)?;
    let token = lab.invite("dock-prod", &[])?;
    lab.join_host("dock-prod", &token, JoinMode::Command)?;
    all_pairs_ping(&lab, &["dock-load", "dock-prod"])?;
    // Over the mesh and on the host itself.
    poll_until(
        MESH_TIMEOUT,
        "DNS and /metrics of dock-load over the mesh",
        || served_over_mesh(&lab, "dock-prod", LOAD),
    )?;
    assert!(
        served_over_mesh(&lab, "dock-load", LOAD)?,
        "dock-load's own processes"
    );
    assert!(served_over_mesh(&lab, "dock-load", mesh("dock-prod"))?);

    // dock-dash, on the underlay: the coordinator's underlay address, then its mesh address
    // routed over the underlay (the kernel takes that as a local address; only sockets bound
    // to the mesh interface refuse it).
    let dash = "dock-dash";
    assert!(lab.ping(dash, LOAD_UNDERLAY)?, "the underlay itself works");
    lab.exec_ok(
        dash,
        &[
            "ip",
            "route",
            "add",
            "10.99.99.0/24",
            "via",
            "198.51.100.1",
            "dev",
            "eth0",
        ],
    )?;
    assert!(
        lab.ping(dash, LOAD)?,
        "dock-load's mesh address answers pings over the underlay (the kernel's weak host \
         model): the test reaches it"
    );
    for target in [LOAD_UNDERLAY, LOAD] {
        for tcp in [false, true] {
            let status = dig(&lab, dash, target, "dock-prod.mesh.internal", tcp)?;
            eprintln!(
                "dig {} @{target} from the underlay: {status}",
                if tcp { "+tcp" } else { "(udp)" }
            );
            assert_eq!(status, "no answer", "DNS at {target} answered the underlay");
        }
        let code = metrics_code(&lab, dash, target)?;
        eprintln!("GET http://{target}:{METRICS_PORT}/metrics from the underlay: {code:?}");
        assert_eq!(code, None, "/metrics at {target} answered the underlay");
    }
    // Still served over the mesh; the mesh still works.
    assert!(served_over_mesh(&lab, "dock-prod", LOAD)?);
    all_pairs_ping(&lab, &["dock-load", "dock-prod"])?;

    // The binding is what refused them: with `mesh_interface_only = false` (and a reload) the
    // same requests are answered.
    let config = lab.read_file(COORDINATOR, meshlab::fleet::CONFIG_PATH)?;
    let opened = format!(
        "{config}\n[dns]\nmesh_interface_only = false\n\n[metrics]\nmesh_interface_only = false\n"
    );
    lab.write_file(COORDINATOR, meshlab::fleet::CONFIG_PATH, opened.as_bytes())?;
    lab.meshctl(COORDINATOR, &["reload"])?;
    poll_until(
        Duration::from_secs(30),
        "DNS and /metrics at the mesh address to answer the underlay once allowed",
        || {
            Ok(
                dig(&lab, dash, LOAD, "dock-prod.mesh.internal", false)? == "NOERROR"
                    && dig(&lab, dash, LOAD, "dock-prod.mesh.internal", true)? == "NOERROR"
                    && metrics_code(&lab, dash, LOAD)? == Some(200),
            )
        },
    )?;
    assert!(served_over_mesh(&lab, "dock-prod", LOAD)?);
    Ok(())
}

/// `ip link del wgmesh0` on the coordinator: meshd recreates it, and the API (bound to the
/// old interface) is bound again: a join and `meshctl hosts` from an admin host succeed, DNS
/// and /metrics answer over the mesh again.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn api_dns_and_metrics_rebind_when_the_interface_comes_back() -> Result<()> {
    let _g = serial();
    let lab = Lab::build(LabOpts::with_hosts(&[
        "dock-load",
        "dock-prod",
        "dock-dash",
    ]))?;
    let engine = meshlab::engine_command(lab.bin_dir());
    lab.start_coordinator(&engine)?;
    let token = lab.invite("dock-prod", &["--admin"])?;
    lab.join_host("dock-prod", &token, JoinMode::Command)?;
    all_pairs_ping(&lab, &["dock-load", "dock-prod"])?;
    lab.meshctl("dock-prod", &["hosts"])?;
    poll_until(
        MESH_TIMEOUT,
        "DNS and /metrics of dock-load over the mesh",
        || served_over_mesh(&lab, "dock-prod", LOAD),
    )?;

    let before = lab.ifindex(COORDINATOR, MESH_IFACE)?;
    lab.exec_ok(COORDINATOR, &["ip", "link", "del", MESH_IFACE])?;
    let t = Instant::now();
    let after = meshlab::poll_for(MESH_TIMEOUT, "meshd to recreate wgmesh0", || {
        Ok(lab
            .ifindex(COORDINATOR, MESH_IFACE)
            .ok()
            .filter(|i| *i != before))
    })?;
    let recreated = t.elapsed();
    all_pairs_ping(&lab, &["dock-load", "dock-prod"])?;
    poll_until(
        Duration::from_secs(30),
        "meshctl hosts from the admin host",
        || {
            Ok(lab
                .meshctl_output("dock-prod", &["hosts"])?
                .status
                .success())
        },
    )?;
    let api_back = t.elapsed();
    poll_until(
        Duration::from_secs(30),
        "DNS and /metrics of dock-load over the mesh",
        || served_over_mesh(&lab, "dock-prod", LOAD),
    )?;
    let dns_back = t.elapsed();
    eprintln!(
        "wgmesh0 on dock-load: ifindex {before} -> {after}, recreated after {recreated:?}; \
         API answering after {api_back:?}, DNS and /metrics after {dns_back:?}"
    );
    // A join through the rebound API.
    let token = lab.invite("dock-dash", &[])?;
    lab.join_host("dock-dash", &token, JoinMode::Command)
        .context("a join after the interface came back")?;
    all_pairs_ping(&lab, &["dock-load", "dock-prod", "dock-dash"])?;
    Ok(())
}
