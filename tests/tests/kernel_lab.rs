//! Kernel WireGuard in the lab (issue 4), run inside a VM of Debian 12's kernel (meshlab::vm):
//! this machine's kernel has no WireGuard module, the VM's has.
//!
//! `kernel_lab_in_vm` boots one VM and runs, inside it, the kernel half of the backend
//! conformance suite (daemon/tests/conformance.rs, with `MESHD_REQUIRE_KERNEL_WG=1` so a
//! missing module fails instead of skipping) and then this binary's `inner_*` scenarios. Those
//! are `#[ignore]`d on the host, where they cannot work; the VM runs them with `--ignored`.
//! It prints boot and total wall time. `MESHD_SKIP_VM=1` skips it (saying so).
//!
//! Scenarios: a kernel-only fleet with the NAS on wireguard-go; a daemon restart (SIGTERM and
//! SIGKILL) that keeps the kernel interface, its index and its peers; a mixed fleet of kernel
//! and userspace hosts; and `meshctl peers` of the same shape on both backends.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use meshlab::vm::{run_in_vm, skip_requested, test_binary, VmOpts};
use meshlab::{JoinMode, Lab, LabOpts, ProcId, COORDINATOR, MESH_IFACE, NAS};
use serde_json::Value;

const MESH_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------- the host side

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn kernel_lab_in_vm() -> Result<()> {
    if skip_requested("the kernel lab in the VM") {
        return Ok(());
    }
    let conformance = test_binary("conformance")?;
    let me = std::env::current_exe()?;
    let script = format!(
        "set -e\n\
         echo '== backend conformance and selection on the kernel'\n\
         {conf} --include-ignored --test-threads=1 --nocapture kernel_backend_conforms backend_selection_adopts_and_refuses\n\
         echo '== kernel lab scenarios'\n\
         {me} --ignored --test-threads=1 --nocapture inner_\n",
        conf = conformance.display(),
        me = me.display(),
    );
    let opts = VmOpts {
        timeout: Duration::from_secs(1200),
        memory_mib: 2048,
        ..VmOpts::default()
    }
    .env("MESHD_REQUIRE_KERNEL_WG", "1")
    .env("MESHLAB_BIN_DIR", &meshlab::bin_dir().to_string_lossy())
    .env("RUST_BACKTRACE", "1");
    run_in_vm(&["sh".to_owned(), "-c".to_owned(), script], &opts)?
        .report("kernel lab in the VM", &opts)?;
    Ok(())
}

// ---------------------------------------------------------------- inside the VM (ignored)

/// The scenarios need kernel WireGuard; say clearly when it is missing.
fn require_kernel(lab: &Lab, host: &str) -> Result<()> {
    let out = lab.exec(
        host,
        &["ip", "link", "add", "wgprobe0", "type", "wireguard"],
    )?;
    if !out.status.success() {
        bail!(
            "no kernel WireGuard here ({}): these scenarios run inside the VM (kernel_lab_in_vm)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    lab.exec_ok(host, &["ip", "link", "del", "wgprobe0"])?;
    Ok(())
}

fn status(lab: &Lab, host: &str) -> Result<Value> {
    serde_json::from_str(&lab.status(host, &["--json"])?).context("status --json")
}

fn backend_of(lab: &Lab, host: &str) -> Result<String> {
    let s = status(lab, host)?;
    s.get("backend")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("[{host}] status has no backend: {s}"))
}

/// `(ifindex, kind)` of the mesh interface, from `ip -d -j link`.
fn mesh_link(lab: &Lab, host: &str) -> Result<(u64, String)> {
    let out = lab.exec_ok(host, &["ip", "-d", "-j", "link", "show", MESH_IFACE])?;
    let v: Value = serde_json::from_str(&out).context("ip -j link")?;
    let l = &v[0];
    let index = l["ifindex"]
        .as_u64()
        .ok_or_else(|| anyhow!("no ifindex: {out}"))?;
    let kind = l["linkinfo"]["info_kind"]
        .as_str()
        .unwrap_or("none")
        .to_owned();
    Ok((index, kind))
}

/// The peers' public keys as the device itself reports them (`wg show IFACE peers`), which
/// works for both backends without meshd.
fn device_peers(lab: &Lab, host: &str) -> Result<Vec<String>> {
    let mut v: Vec<String> = lab
        .exec_ok(host, &["wg", "show", MESH_IFACE, "peers"])?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    v.sort();
    Ok(v)
}

fn all_pairs<'a>(hosts: &[&'a str]) -> Vec<(&'a str, &'a str)> {
    let mut v = Vec::new();
    for a in hosts {
        for b in hosts {
            if a != b {
                v.push((*a, *b));
            }
        }
    }
    v
}

fn stop(lab: &Lab, p: ProcId, sig: i32) -> Result<()> {
    if !lab.signal(p, sig) {
        bail!("could not signal meshd (pid {})", p.pid);
    }
    lab.wait_exit(p, STOP_TIMEOUT)?;
    Ok(())
}

/// A JSON value's shape: objects keep their keys, arrays the shape of their elements,
/// scalars collapse to one word (a handshake time and "never" are the same shape).
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => {
            let mut shapes: Vec<Value> = a.iter().map(shape).collect();
            shapes.dedup();
            Value::Array(shapes)
        }
        _ => Value::String("scalar".into()),
    }
}

/// The kernel fleet: every daemon host on the kernel, the NAS on wireguard-go, then a daemon
/// restart (SIGTERM and SIGKILL) that leaves the kernel interface and its peers in place.
#[test]
#[ignore = "needs kernel WireGuard: runs inside the VM (kernel_lab_in_vm)"]
fn inner_kernel_fleet_with_wireguard_go_peer_and_restart() -> Result<()> {
    let t0 = Instant::now();
    let lab = Lab::build(LabOpts::default())?;
    require_kernel(&lab, COORDINATOR)?;
    let members = ["dock-prod", "dock-mirror", "dock-edge", "dock-dash"];
    let mut fleet = lab.form_managed_fleet(&members, JoinMode::Command, false)?;
    let conf = lab.invite_nas()?;
    lab.start_static_peer_userspace(NAS, &conf, "wireguard-go")?;
    let daemons = [
        COORDINATOR,
        "dock-prod",
        "dock-mirror",
        "dock-edge",
        "dock-dash",
    ];
    let mut everyone = daemons.to_vec();
    everyone.push(NAS);
    let pairs = all_pairs(&everyone);
    lab.wait_pair_pings(&pairs, MESH_TIMEOUT)?;
    println!(
        "kernel fleet + wireguard-go NAS: {} pairs ping after {:.1} s",
        pairs.len(),
        t0.elapsed().as_secs_f64()
    );
    for h in daemons {
        let backend = backend_of(&lab, h)?;
        assert!(backend.starts_with("kernel"), "[{h}] backend: {backend}");
        assert!(
            backend.contains("backend = auto"),
            "[{h}] reason missing: {backend}"
        );
        assert_eq!(mesh_link(&lab, h)?.1, "wireguard", "[{h}] kernel link");
    }
    assert_eq!(
        mesh_link(&lab, NAS)?.1,
        "tun",
        "the NAS runs wireguard-go (a TUN)"
    );

    // Restart dock-prod's daemon both ways: the kernel interface, its index and its peers stay
    // while meshd is gone (traffic keeps flowing), and the new meshd adopts them.
    let host = "dock-prod";
    for (how, sig) in [("SIGTERM", libc::SIGTERM), ("SIGKILL", libc::SIGKILL)] {
        let (index, _) = mesh_link(&lab, host)?;
        let peers = device_peers(&lab, host)?;
        assert_eq!(
            peers.len(),
            everyone.len() - 1,
            "[{host}] peers before {how}"
        );
        let p = fleet
            .meshd
            .remove(host)
            .ok_or_else(|| anyhow!("no meshd for {host}"))?;
        stop(&lab, p, sig)?;
        assert_eq!(
            mesh_link(&lab, host)?,
            (index, "wireguard".into()),
            "{how}: interface kept"
        );
        assert_eq!(
            device_peers(&lab, host)?,
            peers,
            "{how}: peers kept without meshd"
        );
        let load = lab.mesh_addr(COORDINATOR)?;
        assert!(
            lab.ping(host, load)?,
            "{how}: the mesh carries traffic with meshd stopped"
        );
        let p = lab.start_meshd(host)?;
        fleet.meshd.insert(host.into(), p);
        lab.wait_meshctl(host, p, &["status"], Duration::from_secs(60))?;
        let backend = backend_of(&lab, host)?;
        assert!(
            backend.contains("adopted"),
            "{how}: restarted meshd adopts: {backend}"
        );
        assert_eq!(
            mesh_link(&lab, host)?.0,
            index,
            "{how}: same ifindex after restart"
        );
        assert_eq!(
            device_peers(&lab, host)?,
            peers,
            "{how}: same peers after restart"
        );
        let others: Vec<(&str, &str)> = everyone
            .iter()
            .filter(|h| **h != host)
            .flat_map(|h| [(host, *h), (*h, host)])
            .collect();
        lab.wait_pair_pings(&others, MESH_TIMEOUT)?;
        println!("{how} + restart of meshd on {host}: interface {index} and its peers kept");
    }
    Ok(())
}

/// A mixed fleet: dock-prod and dock-mirror on the userspace engine, the others on the
/// kernel; everyone pings everyone, and `meshctl peers` has one shape on both backends.
#[test]
#[ignore = "needs kernel WireGuard: runs inside the VM (kernel_lab_in_vm)"]
fn inner_mixed_fleet_and_peers_shape() -> Result<()> {
    let t0 = Instant::now();
    // Read by the config renderers; the VM runs these tests one at a time.
    std::env::set_var(
        "MESHLAB_BACKENDS",
        "dock-prod=userspace,dock-mirror=userspace",
    );
    let hosts = [COORDINATOR, "dock-prod", "dock-mirror", "dock-edge"];
    let lab = Lab::build(LabOpts::with_hosts(&hosts))?;
    require_kernel(&lab, COORDINATOR)?;
    let _fleet = lab.form_managed_fleet(&hosts[1..], JoinMode::Command, false)?;
    let pairs = all_pairs(&hosts);
    let result = lab.wait_pair_pings(&pairs, MESH_TIMEOUT);
    std::env::remove_var("MESHLAB_BACKENDS");
    result?;
    println!(
        "mixed fleet: {} pairs ping after {:.1} s",
        pairs.len(),
        t0.elapsed().as_secs_f64()
    );
    let mut kinds = BTreeMap::new();
    for h in hosts {
        let backend = backend_of(&lab, h)?;
        let (_, kind) = mesh_link(&lab, h)?;
        let want_user = h == "dock-prod" || h == "dock-mirror";
        assert_eq!(
            backend.starts_with("userspace"),
            want_user,
            "[{h}] backend: {backend}"
        );
        assert_eq!(kind == "tun", want_user, "[{h}] link kind {kind}");
        kinds.insert(h, backend);
    }
    println!("backends: {kinds:?}");

    // `meshctl peers` has the same shape on a kernel host and a userspace host.
    let kernel_host = COORDINATOR;
    let user_host = "dock-prod";
    let jk: Value = serde_json::from_str(&lab.meshctl(kernel_host, &["peers", "--json"])?)?;
    let ju: Value = serde_json::from_str(&lab.meshctl(user_host, &["peers", "--json"])?)?;
    assert_eq!(
        shape(&jk),
        shape(&ju),
        "meshctl peers --json differs in shape:\nkernel: {jk:#}\nuserspace: {ju:#}"
    );
    let tk = lab.meshctl(kernel_host, &["peers"])?;
    let tu = lab.meshctl(user_host, &["peers"])?;
    let header = |t: &str| {
        t.lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(header(&tk), header(&tu), "peers header:\n{tk}\n---\n{tu}");
    assert_eq!(
        tk.lines().count(),
        tu.lines().count(),
        "peers lines:\n{tk}\n---\n{tu}"
    );
    println!("meshctl peers on the kernel host {kernel_host}:\n{tk}");
    println!("meshctl peers on the userspace host {user_host}:\n{tu}");

    // Key rotation across both backends: a kernel member, the kernel coordinator, a userspace
    // member. After each, the host's device runs the key the registry holds, every peer's
    // device lists it, and every pair pings.
    for host in ["dock-edge", COORDINATOR, "dock-prod"] {
        let before = lab.exec_ok(host, &["wg", "show", "wgmesh0", "public-key"])?;
        let t = Instant::now();
        let reply = lab.meshctl(host, &["rotate"])?;
        assert!(reply.starts_with("key rotated"), "[{host}] {reply}");
        let after = lab.exec_ok(host, &["wg", "show", "wgmesh0", "public-key"])?;
        assert_ne!(
            before.trim(),
            after.trim(),
            "[{host}] the device key changed"
        );
        meshlab::poll_until(
            Duration::from_secs(10),
            &format!("every peer lists {host}'s new key and not its old one"),
            || {
                for peer in hosts.iter().filter(|h| **h != host) {
                    let listed = lab.exec_ok(peer, &["wg", "show", "wgmesh0", "peers"])?;
                    let has = |k: &str| listed.lines().any(|l| l.trim() == k.trim());
                    if !has(&after) || has(&before) {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?;
        lab.wait_pair_pings(&pairs, MESH_TIMEOUT)?;
        println!(
            "rotation of {host} ({}): {}; all {} pairs ping {:.1} s after the call",
            backend_of(&lab, host)?,
            reply.trim(),
            pairs.len(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
