//! The five-daemon fleet on the lab: static configs, meshd on every daemon host, the userspace
//! engine (or `MESHLAB_ENGINE=wireguard-go`), across the home NAT.
//!
//! Needs meshd, meshctl and meshd-wg next to the test binary (or in `$MESHLAB_BIN_DIR`):
//! `cargo build --workspace --bins && cargo test -p meshlab --test fleet` (as root).
//! The tests run one at a time (each builds its own lab of eight namespaces and five daemons,
//! which is plenty for a 2-core machine).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use meshlab::{poll_for, poll_until, procs, Fleet, Lab, LabOpts, ProcId, DAEMON_HOSTS, MESH_IFACE};
use serde_json::Value;

const MESH_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const ROUTER_WAN: &str = "198.51.100.100";

static ONE_FLEET_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A lab with meshd running on the five daemon hosts and the mesh verified (every pair pings).
struct Running {
    lab: Lab,
    fleet: Fleet,
    meshd: BTreeMap<String, ProcId>,
}

fn up() -> Result<Running> {
    let lab = Lab::build(LabOpts::default())?;
    let fleet = Fleet::standard(lab.bin_dir())?;
    lab.install_fleet(&fleet)?;
    let mut meshd = BTreeMap::new();
    for h in DAEMON_HOSTS {
        meshd.insert(h.to_string(), lab.start_meshd(h)?);
    }
    lab.wait_mesh_pings(&DAEMON_HOSTS, MESH_TIMEOUT)?;
    Ok(Running { lab, fleet, meshd })
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_FLEET_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The first JSON object anywhere in `v` whose "name" is `name`.
fn find_named<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => {
            if m.get("name").and_then(Value::as_str) == Some(name) {
                return Some(v);
            }
            m.values().find_map(|x| find_named(x, name))
        }
        Value::Array(a) => a.iter().find_map(|x| find_named(x, name)),
        _ => None,
    }
}

fn pubkey<'a>(r: &'a Running, host: &str) -> Result<&'a str> {
    r.fleet.public_key(host)
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn every_ordered_pair_pings_over_the_mesh() -> Result<()> {
    let _g = serial();
    let r = up()?;
    // `up` already waited for all 20 ordered pairs; check once more that it holds, and that
    // each host's interface carries exactly its four peers.
    r.lab
        .wait_mesh_pings(&DAEMON_HOSTS, Duration::from_secs(10))?;
    for h in DAEMON_HOSTS {
        let peers = r.lab.wg_peers(h)?;
        let mut want: Vec<String> = DAEMON_HOSTS
            .iter()
            .filter(|p| **p != h)
            .map(|p| pubkey(&r, p).map(str::to_owned))
            .collect::<Result<_>>()?;
        want.sort();
        assert_eq!(peers, want, "{h}'s peers");
        assert!(r.lab.is_running(r.meshd[h]), "meshd on {h} exited");
        // The log an operator reads (a file here, the journal under systemd): no colour
        // codes, and no dependency's warning on every netlink dump.
        let log = std::fs::read_to_string(r.lab.meshd_log(h))?;
        assert!(log.contains("INFO"), "{h}'s meshd log is empty");
        assert!(!log.contains('\x1b'), "{h}'s meshd log has colour codes");
        assert!(
            !log.contains("IFLA_INET6_CONF"),
            "{h}'s meshd log has netlink-packet-route's noise"
        );
    }
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn home_hosts_reach_each_other_over_the_lan() -> Result<()> {
    let _g = serial();
    let r = up()?;
    let json = r.lab.meshctl("dock-mirror", &["peers", "--json"])?;
    let v: Value =
        serde_json::from_str(&json).with_context(|| format!("meshctl peers --json: {json}"))?;
    let edge =
        find_named(&v, "dock-edge").ok_or_else(|| anyhow!("dock-edge missing from {json}"))?;
    assert_eq!(
        edge.get("endpoint").and_then(Value::as_str),
        Some("192.168.1.4:51871"),
        "dock-mirror's endpoint for dock-edge: {edge}"
    );
    // And the other side sees dock-mirror at its LAN address, not the router's.
    let mirror_key = pubkey(&r, "dock-mirror")?;
    let eps = r.lab.wg_endpoints("dock-edge")?;
    let ep = eps
        .iter()
        .find(|(k, _)| k == mirror_key)
        .map(|(_, e)| e.as_str())
        .ok_or_else(|| anyhow!("dock-edge has no peer dock-mirror: {eps:?}"))?;
    assert_eq!(
        ep, "192.168.1.3:51871",
        "dock-edge reaches dock-mirror hairpinned"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn public_hosts_reach_home_hosts_through_the_nat() -> Result<()> {
    let _g = serial();
    let r = up()?;
    assert!(
        r.lab.ping("dock-prod", "10.99.99.3".parse()?)?,
        "dock-prod cannot ping dock-mirror"
    );
    let mirror_key = pubkey(&r, "dock-mirror")?.to_owned();
    let ep = poll_for(
        Duration::from_secs(30),
        "dock-prod to learn dock-mirror's endpoint",
        || {
            let eps = r.lab.wg_endpoints("dock-prod")?;
            Ok(eps
                .into_iter()
                .find(|(k, e)| *k == mirror_key && e != "(none)")
                .map(|(_, e)| e))
        },
    )?;
    assert!(
        ep.starts_with(&format!("{ROUTER_WAN}:")),
        "dock-prod reaches dock-mirror at {ep}, want the router's {ROUTER_WAN}"
    );
    // The underlay still has no path from the internet into the LAN: it is the NAT mapping.
    assert!(!r.lab.ping("dock-prod", "192.168.1.3".parse()?)?);
    Ok(())
}

/// The state a restart must not change.
#[derive(Debug, PartialEq, Eq)]
struct Iface {
    ifindex: u64,
    peers: Vec<String>,
}

fn observe(lab: &Lab, host: &str) -> Result<Iface> {
    Ok(Iface {
        ifindex: lab.ifindex(host, MESH_IFACE)?,
        peers: lab.wg_peers(host)?,
    })
}

fn engine_processes(r: &Running, host: &str) -> Result<Vec<ProcId>> {
    let engine = std::path::PathBuf::from(&r.fleet.engine_command);
    Ok(procs::procs_running(&r.lab.net_ns(host)?, &engine))
}

fn restart_keeps_interface(signal: i32) -> Result<()> {
    let host = "dock-prod";
    let r = up()?;
    let before = observe(&r.lab, host)?;
    assert_eq!(before.peers.len(), 4, "{host} before restart: {before:?}");
    let engines_before = engine_processes(&r, host)?;
    assert_eq!(
        engines_before.len(),
        1,
        "engine processes in {host}: {engines_before:?}"
    );

    let old = r.meshd[host];
    assert!(
        r.lab.signal(old, signal),
        "could not signal meshd {}",
        old.pid
    );
    r.lab.wait_exit(old, STOP_TIMEOUT)?;
    let new = r.lab.start_meshd(host)?;
    poll_until(
        Duration::from_secs(30),
        "the restarted meshd to answer meshctl",
        || {
            if !r.lab.is_running(new) {
                bail!(
                    "meshd exited after the restart (see {})",
                    r.lab.meshd_log(host).display()
                );
            }
            Ok(meshlab::status_answered(
                &r.lab.exec("dock-prod", &["meshctl", "status"])?,
            ))
        },
    )?;
    // Give the daemon a reconcile pass or two to do something wrong, observing all along:
    // the interface must never be recreated and the peer set must stay exactly the same.
    let mut passes = 0;
    poll_until(
        Duration::from_secs(20),
        "three identical observations after the restart",
        || {
            let now = observe(&r.lab, host)?;
            if now.ifindex != before.ifindex {
                bail!(
                    "{host}'s {MESH_IFACE} was recreated: ifindex {} -> {}",
                    before.ifindex,
                    now.ifindex
                );
            }
            if now.peers != before.peers {
                passes = 0;
                return Ok(false);
            }
            passes += 1;
            Ok(passes >= 3)
        },
    )?;
    let after = observe(&r.lab, host)?;
    assert_eq!(after, before, "{host}'s interface after the restart");
    let engines_after = engine_processes(&r, host)?;
    assert_eq!(
        engines_after.len(),
        1,
        "duplicate engines in {host} after the restart: {engines_after:?}"
    );
    assert!(r.lab.is_running(new));
    // The mesh from and to the restarted host still works.
    for other in DAEMON_HOSTS.iter().filter(|h| **h != host) {
        r.lab
            .wait_mesh_pings(&[host, other], Duration::from_secs(30))?;
    }
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn sigterm_restart_keeps_interface_and_peers() -> Result<()> {
    let _g = serial();
    restart_keeps_interface(libc::SIGTERM)
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn sigkill_restart_recovers_without_duplicates() -> Result<()> {
    let _g = serial();
    restart_keeps_interface(libc::SIGKILL)
}
