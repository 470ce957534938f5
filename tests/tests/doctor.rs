//! `meshctl doctor`, readiness, `meshctl down` and the listen-port check (issue 5), on a lab of
//! two public hosts running meshd from static configurations.
//!
//! Needs meshd, meshctl and meshd-wg next to the test binary (or in `$MESHLAB_BIN_DIR`), ping
//! (iputils), python3 and wireguard-go: `cargo build --workspace --bins && cargo test -p meshlab
//! --test doctor -- --test-threads=1` (as root). Figures are printed with `eprintln!`.

use std::os::unix::net::UnixDatagram;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use meshlab::{poll_until, Fleet, Lab, LabOpts, ProcId, MESH_IFACE, MESH_PORT};
use serde_json::Value;

const A: &str = "dock-load";
const B: &str = "dock-prod";
const MESH_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    meshlab::one_lab_at_a_time()
}

/// Two hosts with keys and configs installed, nothing started.
fn lab2() -> Result<(Lab, Fleet)> {
    let lab = Lab::build(LabOpts::with_hosts(&[A, B]))?;
    let fleet = Fleet::generate(&[A, B], &meshlab::engine_command(lab.bin_dir()))?;
    lab.install_fleet(&fleet)?;
    // A new network namespace inherits the root's IPv4 conf; pin rp_filter to loose so a
    // strict root does not fail the clean-host checks.
    for h in [A, B] {
        lab.sh(h, "sysctl -qw net.ipv4.conf.all.rp_filter=2")?;
    }
    Ok((lab, fleet))
}

/// Two hosts running meshd with the mesh verified.
fn up2() -> Result<(Lab, Fleet, ProcId, ProcId)> {
    let (lab, fleet) = lab2()?;
    let pa = lab.start_meshd(A)?;
    let pb = lab.start_meshd(B)?;
    lab.wait_mesh_pings(&[A, B], MESH_TIMEOUT)?;
    Ok((lab, fleet, pa, pb))
}

/// `meshctl ARGS` in `host`, whatever its exit status.
fn meshctl(lab: &Lab, host: &str, args: &[&str]) -> Result<Output> {
    let mut argv = vec!["meshctl"];
    argv.extend_from_slice(args);
    lab.exec(host, &argv)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `meshctl doctor --json` in `host`: the report and whether meshctl exited 0.
fn doctor_json(lab: &Lab, host: &str) -> Result<(Value, bool)> {
    let out = meshctl(lab, host, &["doctor", "--json"])?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("doctor --json output is not JSON: {}", text(&out)))?;
    Ok((v, out.status.success()))
}

/// The check named `name` in a JSON report.
fn check<'a>(report: &'a Value, name: &str) -> Result<&'a Value> {
    report["checks"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .ok_or_else(|| anyhow!("no check {name:?} in {report:#}"))
}

fn status_of(c: &Value) -> &str {
    c["status"].as_str().unwrap_or("?")
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn doctor_reports_all_ok_on_a_clean_static_mesh() -> Result<()> {
    let _g = serial();
    let (lab, _fleet, pa, _pb) = up2()?;
    let started = Instant::now();
    let out = meshctl(&lab, A, &["doctor"])?;
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<&str> = stdout.lines().collect();
    let checks = &lines[..lines.len() - 1];
    assert!(checks.len() >= 8, "{stdout}");
    for l in checks {
        assert!(l.starts_with("OK  "), "not OK: {l}\n{stdout}");
    }
    for name in [
        "meshd",
        "port",
        "interface",
        "routes",
        "rp_filter",
        "ip_forward",
        "k3s flannel-iface",
        "coordinator",
        "handshake dock-prod",
        "mtu dock-prod",
    ] {
        assert!(
            checks
                .iter()
                .any(|l| l.split("  ").any(|c| c.trim() == name)),
            "no {name} line in\n{stdout}"
        );
    }
    assert!(
        stdout.contains("UDP 51871 is held by wgmesh0 (ours)"),
        "{stdout}"
    );
    assert!(stdout.contains("1420-byte packets pass"), "{stdout}");
    eprintln!("doctor on a clean 2-host mesh: {took:?}\n{stdout}");

    // The JSON form parses and says the same.
    let (report, ok) = doctor_json(&lab, A)?;
    assert!(ok);
    assert_eq!(report["source"], "daemon");
    assert_eq!(report["interface"], MESH_IFACE);
    assert_eq!(report["host"], A);
    for c in report["checks"].as_array().context("checks")? {
        assert_eq!(status_of(c), "ok", "{c}");
        assert!(c["fix"].is_null(), "{c}");
    }
    assert!(lab.is_running(pa));

    // With K3s configured on the mesh interface (a later drop-in wins) it is still all OK;
    // with flannel on eth0 it warns and says what to set.
    lab.write_file(A, "/etc/rancher/k3s/config.yaml", b"flannel-iface: eth0\n")?;
    lab.write_file(
        A,
        "/etc/rancher/k3s/config.yaml.d/50-meshd.yaml",
        b"flannel-iface: \"wgmesh0\"\n",
    )?;
    let (report, _) = doctor_json(&lab, A)?;
    let k3s = check(&report, "k3s flannel-iface")?;
    assert_eq!(status_of(k3s), "ok", "{k3s}");
    lab.sh(A, "rm /etc/rancher/k3s/config.yaml.d/50-meshd.yaml")?;
    let (report, ok) = doctor_json(&lab, A)?;
    let k3s = check(&report, "k3s flannel-iface")?;
    assert_eq!(status_of(k3s), "warn", "{k3s}");
    assert!(k3s["fix"]
        .as_str()
        .unwrap_or_default()
        .contains("flannel-iface: wgmesh0"));
    assert!(ok, "a WARN alone exits 0");
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn doctor_flags_strict_rp_filter() -> Result<()> {
    let _g = serial();
    let (lab, _fleet, _pa, _pb) = up2()?;
    lab.sh(A, "sysctl -qw net.ipv4.conf.all.rp_filter=1")?;
    let out = meshctl(&lab, A, &["doctor"])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = stdout
        .lines()
        .find(|l| l.contains(" rp_filter "))
        .ok_or_else(|| anyhow!("no rp_filter line:\n{stdout}"))?;
    assert!(line.starts_with("WARN"), "{line}");
    assert!(line.contains("all=1"), "{line}");
    assert!(
        line.contains("fix: sysctl -w net.ipv4.conf.all.rp_filter=2"),
        "{line}"
    );
    // Loose on the interface is enough: the kernel uses the larger value.
    lab.sh(A, "sysctl -qw net.ipv4.conf.wgmesh0.rp_filter=2")?;
    let (report, _) = doctor_json(&lab, A)?;
    assert_eq!(status_of(check(&report, "rp_filter")?), "ok");
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn doctor_names_the_owner_of_an_overlapping_route() -> Result<()> {
    let _g = serial();
    let (lab, fleet, pa, _pb) = up2()?;
    // A Docker-like bridge on dock-load, and a peer allowed IP inside its network.
    lab.sh(
        A,
        "ip link add docker0 type bridge && ip addr add 172.17.0.1/16 dev docker0 && \
         ip link set docker0 up",
    )?;
    let conf = fleet.render(A)?;
    let want = "allowed_ips = [\"10.99.99.2/32\"]";
    assert!(conf.contains(want), "{conf}");
    let conf = conf.replace(want, "allowed_ips = [\"10.99.99.2/32\", \"172.17.5.0/24\"]");
    lab.write_file(A, "/etc/meshd/meshd.toml", conf.as_bytes())?;
    let _ = meshctl(&lab, A, &["reload"])?;
    let (report, ok) = doctor_json(&lab, A)?;
    assert!(!ok);
    let routes = check(&report, "routes")?;
    assert_eq!(status_of(routes), "fail", "{routes}");
    let detail = routes["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("172.17.5.0/24 overlaps 172.17.0.0/16 dev docker0"),
        "{routes}"
    );
    assert!(routes["fix"]
        .as_str()
        .unwrap_or_default()
        .contains("allowed_ips"));
    // Refused, not applied: no route into docker0's network, the peer keeps its old IPs.
    let r = lab.exec_ok(A, &["ip", "route", "show", "172.17.5.0/24"])?;
    assert_eq!(r.trim(), "", "{r}");
    let allowed = lab.exec_ok(A, &["wg", "show", MESH_IFACE, "allowed-ips"])?;
    assert!(!allowed.contains("172.17.5.0/24"), "{allowed}");
    lab.wait_mesh_pings(&[A, B], Duration::from_secs(10))?;
    // Offline, the same finding.
    lab.signal(pa, libc::SIGTERM);
    lab.wait_exit(pa, STOP_TIMEOUT)?;
    let out = meshctl(&lab, A, &["doctor"])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains(" routes ") && l.contains("dev docker0")),
        "{stdout}"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn doctor_finds_the_largest_mtu_the_path_carries() -> Result<()> {
    let _g = serial();
    let (lab, _fleet, _pa, _pb) = up2()?;
    // The receiving host's underlay drops anything over 1300 bytes: 1420-byte inner packets
    // (1480 on the wire) vanish without an ICMP error.
    lab.sh(B, "ip link set eth0 mtu 1300")?;
    let started = Instant::now();
    let (report, ok) = doctor_json(&lab, A)?;
    let took = started.elapsed();
    assert!(!ok, "a FAIL exits non-zero");
    let c = check(&report, "mtu dock-prod")?;
    assert_eq!(status_of(c), "fail", "{c}");
    let fix = c["fix"].as_str().unwrap_or_default();
    let n: u16 = fix
        .strip_prefix("mtu = ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("fix does not say `mtu = N`: {c}"))?;
    assert!((1200..1300).contains(&n), "mtu = {n}: {c}");
    // What doctor found is right: N passes with DF, N + 1 does not.
    let payload = |size: u16| (size - 28).to_string();
    let ping = |size: u16| -> Result<bool> {
        let out = lab.exec(
            A,
            &[
                "ping",
                "-n",
                "-q",
                "-M",
                "do",
                "-c",
                "2",
                "-i",
                "0.2",
                "-W",
                "1",
                "-s",
                &payload(size),
                "10.99.99.2",
            ],
        )?;
        Ok(out.status.success())
    };
    assert!(ping(n)?, "{n}-byte packets do not pass");
    assert!(!ping(n + 1)?, "{}-byte packets pass", n + 1);
    eprintln!("doctor with a 1300-byte underlay on {B}: mtu = {n}, found in {took:?}");
    // The text form says the same.
    let out = meshctl(&lab, A, &["doctor"])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.lines().any(|l| l.starts_with("FAIL")
            && l.contains("mtu dock-prod")
            && l.contains(&format!("fix: mtu = {n}"))),
        "{stdout}"
    );
    Ok(())
}

/// Start `argv` holding UDP 51871 in `host` and wait until the port is taken.
fn hold_port(lab: &Lab, host: &str, argv: &[&str]) -> Result<ProcId> {
    let p = lab.spawn(host, argv, None)?;
    poll_until(Duration::from_secs(10), "UDP 51871 to be taken", || {
        let out = lab.exec_ok(host, &["ss", "-Hlun", &format!("sport = :{MESH_PORT}")])?;
        Ok(!out.trim().is_empty())
    })?;
    Ok(p)
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn a_taken_listen_port_is_refused_and_named_by_doctor() -> Result<()> {
    let _g = serial();
    let (lab, _fleet) = lab2()?;
    let holder = hold_port(
        &lab,
        A,
        &[
            "/usr/bin/python3",
            "-c",
            "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.bind(('0.0.0.0',51871))\ntime.sleep(3600)",
        ],
    )?;
    // meshd refuses to start, with the port and the owner named, and creates nothing.
    let meshd = lab.start_meshd(A)?;
    let status = lab
        .wait_exit(meshd, STOP_TIMEOUT)?
        .context("meshd is the lab's child")?;
    assert!(!status.success(), "meshd started with its port taken");
    let log = std::fs::read_to_string(lab.meshd_log(A))?;
    assert!(
        log.contains("UDP port 51871 (host.listen_port) is already in use by python3"),
        "{log}"
    );
    assert!(log.contains("refusing to start"), "{log}");
    assert!(
        lab.exec(A, &["ip", "link", "show", MESH_IFACE])?
            .status
            .code()
            != Some(0)
    );

    // doctor, offline: FAIL naming the port and the process, and meshd not running.
    let out = meshctl(&lab, A, &["doctor"])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{}", text(&out));
    let port = stdout
        .lines()
        .find(|l| l.contains(" port "))
        .ok_or_else(|| anyhow!("no port line: {}", text(&out)))?;
    assert!(port.starts_with("FAIL"), "{port}");
    assert!(port.contains("UDP 51871 is held by python3 (pid"), "{port}");
    assert!(port.contains("fix: stop python3"), "{port}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("meshd is not running")),
        "{stdout}"
    );
    let (report, ok) = doctor_json(&lab, A)?;
    assert!(!ok);
    assert_eq!(report["source"], "offline");
    assert_eq!(status_of(check(&report, "port")?), "fail");
    lab.signal(holder, libc::SIGKILL);
    lab.wait_exit(holder, STOP_TIMEOUT)?;

    // Another WireGuard (wireguard-go) on the port: named as that interface.
    lab.spawn_env(
        A,
        &["wireguard-go", "-f", "wgother"],
        &[("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")],
        None,
    )?;
    poll_until(Duration::from_secs(10), "wgother to come up", || {
        Ok(lab.exec(A, &["wg", "show", "wgother"])?.status.success())
    })?;
    lab.exec_ok(A, &["wg", "set", "wgother", "listen-port", "51871"])?;
    let meshd = lab.start_meshd(A)?;
    let status = lab
        .wait_exit(meshd, STOP_TIMEOUT)?
        .context("meshd is the lab's child")?;
    assert!(!status.success());
    let log = std::fs::read_to_string(lab.meshd_log(A))?;
    assert!(
        log.contains("already in use by userspace WireGuard interface wgother"),
        "{log}"
    );
    let (report, _) = doctor_json(&lab, A)?;
    let port = check(&report, "port")?;
    assert_eq!(status_of(port), "fail");
    assert!(
        port["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("userspace WireGuard interface wgother"),
        "{port}"
    );
    lab.exec_ok(A, &["ip", "link", "del", "wgother"])?;

    // Once the port is free meshd starts; a restart adopting its own interface (which holds
    // the port) still works.
    poll_until(Duration::from_secs(10), "UDP 51871 to be free", || {
        let out = lab.exec_ok(A, &["ss", "-Hlun", &format!("sport = :{MESH_PORT}")])?;
        Ok(out.trim().is_empty())
    })?;
    let meshd = lab.start_meshd(A)?;
    let pb = lab.start_meshd(B)?;
    lab.wait_mesh_pings(&[A, B], MESH_TIMEOUT)?;
    let ifindex = lab.ifindex(A, MESH_IFACE)?;
    lab.signal(meshd, libc::SIGTERM);
    lab.wait_exit(meshd, STOP_TIMEOUT)?;
    let meshd = lab.start_meshd(A)?;
    poll_until(MESH_TIMEOUT, "meshd to answer after the restart", || {
        Ok(meshlab::status_answered(&meshctl(&lab, A, &["status"])?))
    })?;
    assert!(
        lab.is_running(meshd),
        "restart refused: {}",
        std::fs::read_to_string(lab.meshd_log(A))?
    );
    assert_eq!(lab.ifindex(A, MESH_IFACE)?, ifindex, "interface recreated");
    lab.wait_mesh_pings(&[A, B], MESH_TIMEOUT)?;
    assert!(lab.is_running(pb));
    Ok(())
}

/// A notification socket for meshd in `host`: on the host's state directory, which the host
/// sees at the same path (a pathname socket, reachable across network namespaces).
fn notify_socket(lab: &Lab, host: &str) -> Result<(UnixDatagram, String)> {
    let path = lab.host_dir(host).join("notify.sock");
    let sock = UnixDatagram::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok((sock, path.to_string_lossy().into_owned()))
}

/// Start meshd in `host` with `NOTIFY_SOCKET`.
fn start_meshd_notify(lab: &Lab, host: &str, notify: &str) -> Result<ProcId> {
    let meshd = lab.bin_dir().join("meshd");
    lab.spawn_env(
        host,
        &[
            meshd.to_string_lossy().as_ref(),
            "--config",
            "/etc/meshd/meshd.toml",
        ],
        &[("NOTIFY_SOCKET", notify), ("RUST_LOG", "info")],
        Some(&lab.meshd_log(host)),
    )
}

/// Every notification already queued on `sock`.
fn drain(sock: &UnixDatagram) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

/// Wait for `READY=1` on `sock`; returns that message, with every message seen in `seen`.
fn wait_ready(
    lab: &Lab,
    host: &str,
    sock: &UnixDatagram,
    seen: &mut Vec<String>,
) -> Result<String> {
    let deadline = Instant::now() + MESH_TIMEOUT;
    let mut buf = [0u8; 4096];
    loop {
        if Instant::now() > deadline {
            bail!(
                "no READY=1 within {MESH_TIMEOUT:?}; got {seen:?}; log:\n{}",
                std::fs::read_to_string(lab.meshd_log(host))?
            );
        }
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.push(msg.clone());
                if msg.lines().any(|l| l == "READY=1") {
                    return Ok(msg);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn a_joined_host_is_ready_only_after_its_netmap_is_applied() -> Result<()> {
    let _g = serial();
    let lab = Lab::build(LabOpts::with_hosts(&[A, B]))?;
    let engine = meshlab::engine_command(lab.bin_dir());
    lab.start_coordinator(&engine)?;
    lab.write_file(
        B,
        "/etc/meshd/meshd.toml",
        meshlab::coord::render_member_config(B, &engine, false).as_bytes(),
    )?;
    let (sock, notify) = notify_socket(&lab, B)?;
    let p = start_meshd_notify(&lab, B, &notify)?;
    lab.wait_meshctl(B, p, &["status"], MESH_TIMEOUT)?;
    // Not joined: a status saying so, and no READY.
    let mut seen = drain(&sock);
    assert!(
        seen.iter().any(|m| m.contains("STATUS=not joined")),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|m| m.contains("READY=1")), "{seen:?}");
    // Doctor on the unjoined host: the one thing to do is the join, not a reload.
    let doctor = lab.exec(B, &["meshctl", "doctor"])?;
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(!doctor.status.success(), "{text}");
    assert!(
        text.contains("not joined") && text.contains("meshctl join"),
        "{text}"
    );
    assert!(
        !text.contains("nothing listens") && !text.contains("meshctl reload"),
        "{text}"
    );
    let token = lab.invite(B, &[])?;
    lab.join(B, &token)?;
    let ready = wait_ready(&lab, B, &sock, &mut seen)?;
    // At that moment: an address, the coordinator as a peer, a netmap applied.
    let addr = lab.exec_ok(B, &["ip", "-4", "-o", "addr", "show", "dev", MESH_IFACE])?;
    assert!(addr.contains("10.99.99."), "{addr}");
    assert!(!lab.wg_peers(B)?.is_empty(), "no peers at READY");
    let st: Value = serde_json::from_str(&lab.status(B, &["--json"])?)?;
    assert!(st["netmap_version"].is_u64(), "{st}");
    assert!(
        ready.contains("STATUS=wgmesh0 up with 10.99.99."),
        "{ready}"
    );
    eprintln!("joined host notifications: {seen:?}");
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn ready_only_once_the_interface_has_its_address_and_peers() -> Result<()> {
    let _g = serial();
    let (lab, fleet) = lab2()?;
    let (sock, notify) = notify_socket(&lab, A)?;
    let p = start_meshd_notify(&lab, A, &notify)?;
    let mut seen = Vec::new();
    let ready = wait_ready(&lab, A, &sock, &mut seen)?;
    // At that moment: our address on the interface and the peer configured.
    let addr = lab.exec_ok(A, &["ip", "-4", "-o", "addr", "show", "dev", MESH_IFACE])?;
    let peers = lab.wg_peers(A)?;
    assert!(addr.contains("10.99.99.1/24"), "{addr}");
    assert_eq!(peers, vec![fleet.public_key(B)?.to_owned()]);
    assert!(
        ready.contains("STATUS=wgmesh0 up with 10.99.99.1/24, 1 peers configured"),
        "{ready}"
    );
    assert_eq!(
        seen.iter().filter(|m| m.contains("READY=1")).count(),
        1,
        "{seen:?}"
    );
    eprintln!("notifications up to READY: {seen:?}");
    // SIGTERM: STOPPING=1, and everything stays up.
    lab.signal(p, libc::SIGTERM);
    lab.wait_exit(p, STOP_TIMEOUT)?;
    let after = drain(&sock);
    assert!(
        after.iter().any(|m| m.contains("STOPPING=1")),
        "no STOPPING=1: {after:?}"
    );
    assert!(lab
        .exec_ok(A, &["ip", "-4", "-o", "addr", "show", "dev", MESH_IFACE])?
        .contains("10.99.99.1/24"));
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn down_removes_everything_meshd_owns_and_meshd_exits_0() -> Result<()> {
    let _g = serial();
    let (lab, fleet) = lab2()?;
    // dock-load advertises a LAN (a bridge, as the lab has no dummy module): meshd then owns
    // the nftables table and the forwarding settings too.
    lab.sh(
        A,
        "ip link add lan0 type bridge && ip addr add 192.0.2.1/24 dev lan0 && \
         ip link set lan0 up && sysctl -qw net.ipv4.conf.lan0.forwarding=0 \
         net.ipv4.conf.all.forwarding=0",
    )?;
    let conf = fleet.render(A)? + "\n[routes]\nadvertise = [\"192.0.2.0/24\"]\n";
    lab.write_file(A, "/etc/meshd/meshd.toml", conf.as_bytes())?;
    let pa = lab.start_meshd(A)?;
    let pb = lab.start_meshd(B)?;
    lab.wait_mesh_pings(&[A, B], MESH_TIMEOUT)?;
    poll_until(
        MESH_TIMEOUT,
        "table inet meshd and forwarding on lan0",
        || {
            Ok(lab
                .exec(A, &["nft", "list", "table", "inet", "meshd"])?
                .status
                .success()
                && lab
                    .exec_ok(A, &["sysctl", "-n", "net.ipv4.conf.lan0.forwarding"])?
                    .trim()
                    == "1")
        },
    )?;
    let (report, _) = doctor_json(&lab, A)?;
    let fwd = check(&report, "ip_forward")?;
    assert_eq!(status_of(fwd), "ok", "{fwd}");
    assert!(
        fwd["detail"].as_str().unwrap_or_default().contains("lan0"),
        "{fwd}"
    );

    let engines_before = lab.processes(A)?.len();
    let out = lab.meshctl(A, &["down"])?;
    eprintln!("meshctl down: {out}");
    assert!(out.contains("interface wgmesh0"), "{out}");
    let status = lab
        .wait_exit(pa, STOP_TIMEOUT)?
        .context("meshd is the lab's child")?;
    assert_eq!(
        status.code(),
        Some(0),
        "meshd after meshctl down: {status:?}"
    );
    poll_until(STOP_TIMEOUT, "wgmesh0 and its engine to be gone", || {
        Ok(!lab
            .exec(A, &["ip", "link", "show", MESH_IFACE])?
            .status
            .success())
    })?;
    let routes = lab.exec_ok(A, &["ip", "route", "show", "table", "all", "proto", "171"])?;
    assert_eq!(routes.trim(), "", "routes with our protocol left: {routes}");
    let v6 = lab.exec_ok(
        A,
        &["ip", "-6", "route", "show", "table", "all", "proto", "171"],
    )?;
    assert_eq!(v6.trim(), "", "{v6}");
    assert!(
        !lab.exec(A, &["nft", "list", "table", "inet", "meshd"])?
            .status
            .success(),
        "table inet meshd left"
    );
    assert!(
        lab.processes(A)?.len() < engines_before,
        "the engine still runs"
    );
    assert!(lab.is_running(pb), "the other host is untouched");
    for key in [
        "net.ipv4.conf.lan0.forwarding",
        "net.ipv4.conf.all.forwarding",
    ] {
        let v = lab.exec_ok(A, &["sysctl", "-n", key])?;
        assert_eq!(v.trim(), "0", "{key} not restored");
    }
    assert!(
        lab.exec(A, &["ip", "link", "show", "lan0"])?
            .status
            .success(),
        "lan0 is not ours"
    );

    // With meshd gone, down again is no error: nothing to remove (meshctl runs meshd --down).
    let out = meshctl(&lab, A, &["down"])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to remove"),
        "{}",
        text(&out)
    );
    let out = lab.exec_ok(A, &["meshd", "--down"])?;
    assert!(out.contains("nothing to remove"), "{out}");
    // No systemd in the lab's namespaces: up says what to do instead.
    let out = meshctl(&lab, A, &["up"])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not run by systemd"),
        "{}",
        text(&out)
    );

    // Offline down after a SIGTERM (which leaves everything up) removes it all too.
    let pa = lab.start_meshd(A)?;
    lab.wait_mesh_pings(&[A, B], MESH_TIMEOUT)?;
    lab.signal(pa, libc::SIGTERM);
    lab.wait_exit(pa, STOP_TIMEOUT)?;
    assert!(lab
        .exec(A, &["ip", "link", "show", MESH_IFACE])?
        .status
        .success());
    let out = lab.exec_ok(A, &["meshd", "--down"])?;
    assert!(out.contains("interface wgmesh0"), "{out}");
    poll_until(STOP_TIMEOUT, "wgmesh0 to be gone", || {
        Ok(!lab
            .exec(A, &["ip", "link", "show", MESH_IFACE])?
            .status
            .success())
    })?;
    Ok(())
}

/// `meshctl ping` and `meshctl bugreport` on a joined member. Ping: the path and endpoint,
/// replies through the mesh interface, exit 1 when nothing answers, a clear refusal for a
/// name that is no peer. Bugreport: one archive with the status, peers, doctor,
/// configuration, state, network and journal files, and none of the host's secrets: not its
/// private key, not the token it joined with, not a token pasted into its configuration.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn ping_and_a_bugreport_without_secrets() -> Result<()> {
    let _g = serial();
    let lab = Lab::build(LabOpts::with_hosts(&[A, B]))?;
    let engine = meshlab::engine_command(lab.bin_dir());
    lab.start_coordinator(&engine)?;
    // The log level from the configuration (RUST_LOG empty counts as unset), JSON lines.
    let config = meshlab::coord::render_member_config(B, &engine, false)
        .replace("[daemon]\n", "[daemon]\nlog_level = \"debug\"\n");
    lab.write_file(B, "/etc/meshd/meshd.toml", config.as_bytes())?;
    let p = lab.start_meshd_env(B, &[("RUST_LOG", ""), ("MESHD_LOG_FORMAT", "json")])?;
    lab.wait_meshctl(B, p, &["status"], MESH_TIMEOUT)?;
    // Not joined: typed states in the JSON, plain words in the text, no sentinels.
    let st: Value = serde_json::from_str(&lab.status(B, &["--json"])?)?;
    assert_eq!(st["state"], "needs_join", "{st}");
    assert!(st["host"].is_null() && st["mesh_address"].is_null(), "{st}");
    let shown = lab.status(B, &[])?;
    assert!(
        shown.contains("not joined") && !shown.contains("static configuration"),
        "{shown}"
    );
    assert!(!shown.contains("0.0.0.0"), "{shown}");
    let joined_with = lab.invite(B, &[])?;
    lab.join(B, &joined_with)?;
    let st: Value = serde_json::from_str(&lab.status(B, &["--json"])?)?;
    assert_eq!(st["state"], "member", "{st}");
    assert_eq!(st["host"], B, "{st}");
    lab.wait_mesh_pings(&[A, B], MESH_TIMEOUT)?;

    let ping = lab.meshctl(B, &["ping", A, "--count", "3"])?;
    eprintln!("{ping}");
    assert!(
        ping.starts_with(&format!(
            "PING {A} (10.99.99.1) through {MESH_IFACE}: endpoint "
        )),
        "{ping}"
    );
    assert!(
        ping.contains("reply from 10.99.99.1: seq=1 time="),
        "{ping}"
    );
    assert!(ping.contains("3 of 3 answered"), "{ping}");
    // By address too.
    let by_addr = lab.meshctl(B, &["ping", "10.99.99.1", "-c", "1"])?;
    assert!(by_addr.contains("1 of 1 answered"), "{by_addr}");
    let nosuch = meshctl(&lab, B, &["ping", "dock-nosuch"])?;
    assert!(!nosuch.status.success());
    assert!(
        String::from_utf8_lossy(&nosuch.stderr).contains("dock-nosuch is not a peer of this host"),
        "{}",
        text(&nosuch)
    );
    // Nothing answers: drop echo replies arriving through the mesh on B. Exit 1, said so.
    lab.exec_ok(
        B,
        &[
            "nft",
            "add table inet pingtest; add chain inet pingtest in { type filter hook input priority 0; };              add rule inet pingtest in iifname wgmesh0 icmp type echo-reply drop",
        ],
    )?;
    let lost = meshctl(&lab, B, &["ping", A, "-c", "1"])?;
    lab.exec_ok(B, &["nft", "delete", "table", "inet", "pingtest"])?;
    assert!(!lost.status.success(), "{}", text(&lost));
    assert!(
        String::from_utf8_lossy(&lost.stdout).contains("0 of 1 answered"),
        "{}",
        text(&lost)
    );

    // An operator pasted another invitation into the configuration, as a comment.
    let pasted = lab.invite("dock-spare", &[])?;
    lab.write_file(
        B,
        "/etc/meshd/meshd.toml",
        format!("{config}# for later: {pasted}\n").as_bytes(),
    )?;
    let key = lab.read_file(B, meshlab::fleet::KEY_PATH)?;
    let public = lab.status(B, &["--json"])?;
    let public: Value = serde_json::from_str(&public)?;
    let public = public["public_key"]
        .as_str()
        .context("public_key")?
        .to_owned();

    let archive = "/etc/meshd/bugreport.tar.gz";
    let out = lab.meshctl(B, &["bugreport", "--output", archive])?;
    assert!(out.contains(archive), "{out}");
    // Never overwritten.
    let again = meshctl(&lab, B, &["bugreport", "--output", archive])?;
    assert!(!again.status.success(), "{}", text(&again));
    let mode = lab.exec_ok(B, &["stat", "-c", "%a", archive])?;
    assert_eq!(mode.trim(), "600");
    let list = lab.exec_ok(B, &["tar", "-tzf", archive])?;
    for f in [
        "status.json",
        "peers.json",
        "doctor.json",
        "versions.txt",
        "meshd.toml",
        "state/membership.json",
        "state/netmap.json",
        "network.txt",
        "journal.txt",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(&format!("/{f}"))),
            "{f} missing:\n{list}"
        );
    }
    let all = lab.exec_ok(B, &["tar", "-xzOf", archive])?;
    assert!(all.contains(&public), "the status is in it");
    assert!(
        all.contains(MESH_IFACE) && all.contains("10.99.99."),
        "{all}"
    );
    assert!(
        all.contains("meshd1.<redacted>"),
        "the pasted token, redacted"
    );
    for (what, secret) in [
        ("the private key", key.trim()),
        ("the token it joined with", &joined_with["meshd1.".len()..]),
        ("the pasted token", &pasted["meshd1.".len()..]),
    ] {
        assert!(!all.contains(secret), "{what} is in the bug report");
        // Nor a piece of it long enough to matter.
        assert!(
            !all.contains(&secret[..20]),
            "part of {what} is in the bug report"
        );
    }
    // Every line of meshd's log is a JSON object; the start line carries the version; the
    // configured debug level is on.
    let log = std::fs::read_to_string(lab.meshd_log(B))?;
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l}")))
        .collect::<Result<_>>()?;
    assert!(lines
        .iter()
        .all(|v| v["level"].is_string() && v["timestamp"].is_string()));
    assert!(
        lines.iter().any(|v| v["fields"]["version"].is_string()),
        "no start line with the version:\n{log}"
    );
    assert!(lines.iter().any(|v| v["level"] == "DEBUG"), "{log}");
    eprintln!(
        "bugreport: {} files, {} bytes of text, no key or token",
        list.lines().count(),
        all.len()
    );
    Ok(())
}
