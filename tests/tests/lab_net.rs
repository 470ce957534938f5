//! The plain lab, without WireGuard: the underlay behaves like the fleet's real networks, hosts
//! are separated from each other and from the root namespace, and teardown leaves nothing.
//! Run as root: `cargo test -p meshlab --test lab_net`.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use meshlab::{poll_until, state, Lab, LabOpts, ProcId, RootSnapshot};

const INTERNET_LOAD: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const ROUTER_WAN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
const MIRROR: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 3);
const EDGE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 4);
const NAS: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 20);

fn full_lab() -> Result<Lab> {
    Lab::build(LabOpts::default())
}

/// A private state root, so cleanup tests never see other runs' labs.
fn private_root(tag: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("meshlab-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn home_hosts_reach_the_internet_through_nat() -> Result<()> {
    let lab = full_lab()?;
    // Count echo requests dock-load receives from the router's public address.
    lab.exec_input(
        "dock-load",
        &["nft", "-f", "-"],
        format!(
            "table ip probe {{\n chain input {{\n  type filter hook input priority 0;\n  \
             ip saddr {ROUTER_WAN} icmp type echo-request counter\n  \
             ip saddr 192.168.1.0/24 icmp type echo-request counter\n }}\n}}\n"
        )
        .as_bytes(),
    )
    .and_then(|o| meshlab::check_output(o, "nft probe"))?;

    for home in ["dock-mirror", "dock-edge", "nas"] {
        assert!(
            lab.ping(home, INTERNET_LOAD)?,
            "{home} cannot reach 198.51.100.1"
        );
    }
    let rules = lab.exec_ok("dock-load", &["nft", "-j", "list", "table", "ip", "probe"])?;
    let v: serde_json::Value = serde_json::from_str(&rules)?;
    let counters: Vec<u64> = v["nftables"]
        .as_array()
        .context("nft -j output")?
        .iter()
        .filter_map(|e| e.get("rule"))
        .map(|r| {
            r["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.get("counter"))
                .filter_map(|c| c["packets"].as_u64())
                .sum()
        })
        .collect();
    assert_eq!(counters.len(), 2, "{rules}");
    assert!(
        counters[0] >= 3,
        "dock-load saw {} pings from the router's address, want >= 3",
        counters[0]
    );
    assert_eq!(
        counters[1], 0,
        "dock-load saw LAN source addresses: NAT is not masquerading"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn internet_hosts_cannot_reach_the_home_lan() -> Result<()> {
    let lab = full_lab()?;
    for public in ["dock-load", "dock-prod", "dock-dash"] {
        let routes = lab.exec_ok(public, &["ip", "-4", "route", "show", "table", "all"])?;
        assert!(
            !routes.contains("192.168.1."),
            "{public} has a route into the home LAN:\n{routes}"
        );
        assert!(
            !lab.ping(public, MIRROR)?,
            "{public} reached 192.168.1.3 directly"
        );
    }
    // Even a host that routes the LAN via the router's WAN address gets nothing through:
    // the router forwards only answers from the internet to the LAN, like a consumer router.
    lab.exec_ok(
        "dock-prod",
        &[
            "ip",
            "route",
            "add",
            "192.168.1.0/24",
            "via",
            &ROUTER_WAN.to_string(),
        ],
    )?;
    assert!(
        !lab.ping("dock-prod", MIRROR)?,
        "the router forwarded a new connection into the LAN"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn lan_hosts_reach_each_other_directly() -> Result<()> {
    let lab = Lab::build(LabOpts::with_hosts(&["dock-mirror", "dock-edge", "nas"]))?;
    assert!(lab.ping("dock-mirror", EDGE)?);
    assert!(lab.ping("dock-edge", MIRROR)?);
    assert!(lab.ping("nas", MIRROR)?);
    assert!(lab.ping("dock-mirror", NAS)?);
    // Directly on the LAN: the route is the connected one, not via the router.
    let route = lab.exec_ok("dock-mirror", &["ip", "route", "get", &EDGE.to_string()])?;
    assert!(
        !route.contains("via"),
        "dock-mirror reaches dock-edge through a gateway: {route}"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn root_namespace_is_untouched() -> Result<()> {
    let before = RootSnapshot::take()?;
    let lab = full_lab()?;
    // Exercise the lab: NAT traffic, a file, a hostname-dependent command.
    assert!(lab.ping("dock-mirror", INTERNET_LOAD)?);
    lab.write_file("dock-prod", "/etc/meshd/probe", b"x")?;
    lab.sh("dock-prod", "echo '10.99.99.2 probe' >> /etc/hosts")?;
    let during = RootSnapshot::take()?;
    let diff = before.diff(&during);
    assert!(
        diff.is_empty(),
        "root namespace changed while the lab ran:\n{}",
        diff.join("\n")
    );
    let id = lab.id().to_owned();
    drop(lab);
    let after = RootSnapshot::take()?;
    let diff = before.diff(&after);
    assert!(
        diff.is_empty(),
        "root namespace changed after teardown:\n{}",
        diff.join("\n")
    );
    let left: Vec<String> = state::our_netns_names()
        .into_iter()
        .filter(|n| state::id_of_netns(n) == Some(id.as_str()))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn hosts_have_private_run_etc_and_hostname() -> Result<()> {
    let lab = Lab::build(LabOpts::with_hosts(&["dock-load", "dock-prod"]))?;
    lab.write_file("dock-prod", "/etc/meshd/only-prod", b"prod\n")?;
    lab.write_file("dock-prod", "/run/wireguard/only-prod.sock", b"")?;
    lab.write_file("dock-prod", "/var/lib/meshd/state", b"s\n")?;
    assert_eq!(
        lab.exec_ok("dock-prod", &["cat", "/etc/meshd/only-prod"])?,
        "prod\n"
    );
    assert_eq!(
        lab.exec_ok("dock-prod", &["cat", "/var/lib/meshd/state"])?,
        "s\n"
    );
    assert!(lab
        .exec_ok("dock-prod", &["ls", "/var/run/wireguard"])?
        .contains("only-prod.sock"));
    for path in [
        "/etc/meshd/only-prod",
        "/run/wireguard/only-prod.sock",
        "/var/lib/meshd/state",
    ] {
        let seen = lab
            .exec("dock-load", &["test", "-e", path])?
            .status
            .success();
        assert!(!seen, "dock-load sees dock-prod's {path}");
        assert!(!Path::new(path).exists(), "the root filesystem has {path}");
    }
    assert_eq!(lab.exec_ok("dock-prod", &["hostname"])?.trim(), "dock-prod");
    assert_eq!(
        lab.exec_ok("dock-load", &["uname", "-n"])?.trim(),
        "dock-load"
    );
    // The key file mode is kept.
    lab.write_file_mode("dock-prod", "/etc/meshd/private.key", b"k\n", 0o600)?;
    let mode = lab.exec_ok("dock-prod", &["stat", "-c", "%a", "/etc/meshd/private.key"])?;
    assert_eq!(mode.trim(), "600");
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn drop_removes_processes_namespaces_and_state() -> Result<()> {
    let lab = Lab::build(LabOpts::with_hosts(&["dock-mirror"]))?;
    let id = lab.id().to_owned();
    let dir = lab.dir().to_path_buf();
    let holders: Vec<ProcId> = lab.state().hosts.values().map(|h| h.holder).collect();
    // A tracked process, and one that detaches from it (like an engine daemonizing).
    let tracked = lab.spawn("dock-mirror", &["sleep", "1000"], None)?;
    lab.sh(
        "dock-mirror",
        "setsid sleep 1001 >/dev/null 2>&1 < /dev/null &",
    )?;
    let mut detached = Vec::new();
    poll_until(
        Duration::from_secs(5),
        "the detached sleep to show up",
        || {
            detached = lab
                .processes("dock-mirror")?
                .into_iter()
                .filter(|p| *p != tracked)
                .collect();
            Ok(!detached.is_empty())
        },
    )?;
    assert!(tracked.is_alive());
    drop(lab);
    for p in holders.iter().chain(&detached).chain([&tracked]) {
        assert!(!p.is_alive(), "process {} survived the teardown", p.pid);
    }
    assert!(!dir.exists(), "{} survived the teardown", dir.display());
    assert!(
        !state::our_netns_names()
            .iter()
            .any(|n| state::id_of_netns(n) == Some(id.as_str())),
        "namespaces of lab {id} survived"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn cleanup_removes_a_crashed_run_and_spares_live_ones() -> Result<()> {
    let root = private_root("cleanup")?;
    let meshlab = env!("CARGO_BIN_EXE_meshlab");
    let hold = |hosts: &str| -> Result<(std::process::Child, String)> {
        let mut child = Command::new(meshlab)
            .args(["--state"])
            .arg(&root)
            .args(["hold", "--hosts", hosts])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        Ok((child, line.trim().to_owned()))
    };
    let (mut crashed, crashed_id) = hold("dock-prod")?;
    let (mut live, live_id) = hold("dock-load")?;
    assert_eq!(
        crashed_id.len(),
        4,
        "no lab id from meshlab hold: {crashed_id:?}"
    );
    let crashed_state = meshlab::LabState::load(&root.join(&crashed_id))?;
    // A crash: SIGKILL, no teardown runs.
    crashed.kill()?;
    crashed.wait()?;
    for h in crashed_state.hosts.values() {
        assert!(
            h.holder.is_alive(),
            "the holder should outlive a crashed builder"
        );
    }

    let out = Command::new(meshlab)
        .args(["--state"])
        .arg(&root)
        .arg("cleanup")
        .output()?;
    meshlab::check_output(out, "meshlab cleanup")?;
    for h in crashed_state.hosts.values() {
        assert!(
            !h.holder.is_alive(),
            "cleanup left holder {} of {}",
            h.holder.pid,
            h.netns
        );
        assert!(
            !Path::new("/run/netns").join(&h.netns).exists(),
            "cleanup left {}",
            h.netns
        );
    }
    assert!(!root.join(&crashed_id).exists());
    // The live lab was not touched.
    let live_state = meshlab::LabState::load(&root.join(&live_id))?;
    for h in live_state.hosts.values() {
        assert!(h.holder.is_alive(), "cleanup killed a live lab's holder");
    }
    drop(live.stdin.take());
    let status = live.wait()?;
    assert!(
        status.success(),
        "meshlab hold failed to tear down: {status}"
    );
    assert!(!root.join(&live_id).exists());
    for h in live_state.hosts.values() {
        assert!(!h.holder.is_alive());
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
