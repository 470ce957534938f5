//! Living next to K3s, libvirt and Docker (issue 5, "Must show"): a lab host set up like a
//! K3s + libvirt + Docker node, where meshd must touch nothing it does not own.
//!
//! dock-prod gets flannel.1 (vxlan, UDP 8472) with onlink routes to 10.42.1.0/24 and
//! 10.42.2.0/24, cni0 10.42.0.1/24, flannel-wg (kernel WireGuard on UDP 51820) with
//! 10.42.0.0/16, docker0 172.17.0.0/16, virbr0 192.168.122.0/24, and FLANNEL-POSTRTG,
//! FLANNEL-FWD and KUBE-* chains through iptables-nft. Then, with dock-load as its peer: mesh
//! up, a config change, a restart, SIGKILL plus restart and `meshctl down`; after each,
//! `ip route show table all` (v4 and v6), `nft -s list ruleset` and the link list, minus our own
//! marked objects (routes `proto meshd`, anything on wgmesh0, `table inet meshd`), are
//! byte-identical to before. A peer subnet overlapping flannel's 10.42.0.0/16 is refused with
//! flannel-wg named and nothing applied; a listen port flannel-wg holds is refused at start.
//!
//! vxlan and kernel WireGuard are not in this machine's kernel, so the scenario runs inside the
//! VM lab (meshlab::vm): `coexist_in_vm` boots it and runs the `#[ignore]`d `inner_*` test
//! there. `MESHD_SKIP_VM=1` skips it (saying so).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use meshlab::vm::{run_in_vm, skip_requested, VmOpts};
use meshlab::{poll_until, Fleet, Lab, LabOpts, MESH_IFACE};

const HOST: &str = "dock-prod";
const PEER: &str = "dock-load";
const MESH_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const CONFIG: &str = "/etc/meshd/meshd.toml";

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn coexist_in_vm() -> Result<()> {
    if skip_requested("the coexistence lab in the VM") {
        return Ok(());
    }
    let me = std::env::current_exe()?;
    let script = format!(
        "set -e\n{} --ignored --test-threads=1 --nocapture inner_\n",
        me.display()
    );
    let opts = VmOpts {
        timeout: Duration::from_secs(900),
        memory_mib: 1536,
        ..VmOpts::default()
    }
    .env("MESHLAB_BIN_DIR", &meshlab::bin_dir().to_string_lossy())
    .env("RUST_BACKTRACE", "1");
    run_in_vm(&["sh".to_owned(), "-c".to_owned(), script], &opts)?
        .report("coexistence lab in the VM", &opts)?;
    Ok(())
}

/// The K3s + libvirt + Docker node, as the issue lists it.
const K3S_NODE: &str = r#"set -eu
# IPv6 link-local addresses without duplicate address detection, so they (and their local
# routes) exist at once instead of showing up seconds later in the middle of a comparison.
sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
underlay=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
# flannel vxlan: flannel.1 on the underlay, onlink routes to the other nodes' pod subnets.
ip link add flannel.1 type vxlan id 1 dstport 8472 dev eth0 local "$underlay" nolearning
ip addr add 10.42.0.0/32 dev flannel.1
ip link set flannel.1 up
ip route add 10.42.1.0/24 via 10.42.1.0 dev flannel.1 onlink
ip route add 10.42.2.0/24 via 10.42.2.0 dev flannel.1 onlink
# the pod bridge
ip link add cni0 type bridge
ip addr add 10.42.0.1/24 dev cni0
ip link set cni0 up
# flannel's wireguard-native backend: kernel WireGuard on 51820 routing the pod CIDR
ip link add flannel-wg type wireguard
umask 077
wg genkey > /run/flannel-wg.key
wg set flannel-wg listen-port 51820 private-key /run/flannel-wg.key
ip addr add 10.42.0.0/32 dev flannel-wg
ip link set flannel-wg up
ip route add 10.42.0.0/16 dev flannel-wg
# Docker and libvirt bridges
ip link add docker0 type bridge
ip addr add 172.17.0.1/16 dev docker0
ip link set docker0 up
ip link add virbr0 type bridge
ip addr add 192.168.122.1/24 dev virbr0
ip link set virbr0 up
# flannel's and kube-proxy's chains, through iptables-nft
iptables -t nat -N FLANNEL-POSTRTG
iptables -t nat -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
iptables -t nat -A FLANNEL-POSTRTG -s 10.42.0.0/16 -d 10.42.0.0/16 -j RETURN
iptables -t nat -A FLANNEL-POSTRTG -s 10.42.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully
iptables -N FLANNEL-FWD
iptables -A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
iptables -A FLANNEL-FWD -s 10.42.0.0/16 -j ACCEPT
iptables -A FLANNEL-FWD -d 10.42.0.0/16 -j ACCEPT
iptables -N KUBE-FORWARD
iptables -A FORWARD -j KUBE-FORWARD
iptables -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
iptables -A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
iptables -t nat -N KUBE-SERVICES
iptables -t nat -A PREROUTING -j KUBE-SERVICES
iptables -t nat -A OUTPUT -j KUBE-SERVICES
iptables -t nat -N KUBE-POSTROUTING
iptables -t nat -A POSTROUTING -j KUBE-POSTROUTING
iptables -t nat -A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
iptables -N KUBE-FIREWALL
iptables -A INPUT -j KUBE-FIREWALL
# the route-protocol name, as the package installs it
mkdir -p /etc/iproute2/rt_protos.d
echo "171 meshd" > /etc/iproute2/rt_protos.d/meshd.conf
"#;

/// Routes of every table (this iproute2 lists v4 and v6), the ruleset (stateless: counters
/// move with traffic) and the links, minus what is ours: routes marked `proto meshd`, anything
/// on our interface, `table inet meshd`.
const SNAPSHOT: &str = r#"set -eu
echo '# ip route show table all'
ip route show table all | grep -v -e ' proto meshd' -e 'dev wgmesh0' || true
echo '# nft -s list ruleset'
nft -s list ruleset | awk '/^table inet meshd \{/ {skip=1; next} skip && /^\}/ {skip=0; next} !skip'
echo '# links'
ip -o link show | grep -v ': wgmesh0[:@]' | awk '{print $1, $2, $3}'
echo '# flannel-wg'
wg show flannel-wg listen-port
"#;

fn snapshot(lab: &Lab) -> Result<String> {
    lab.sh(HOST, SNAPSHOT)
}

/// The snapshot once the kernel has finished settling the planted node (IPv6 link-local
/// addresses and their local routes arrive asynchronously): the first one that is unchanged a
/// poll interval later, with no tentative address left.
fn settled_snapshot(lab: &Lab) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = snapshot(lab)?;
    loop {
        std::thread::sleep(meshlab::poll::POLL_INTERVAL * 4);
        let now = snapshot(lab)?;
        let tentative = lab.exec_ok(HOST, &["ip", "-6", "addr", "show", "tentative"])?;
        if now == last && tentative.trim().is_empty() {
            return Ok(now);
        }
        if Instant::now() > deadline {
            bail!(
                "the planted node did not settle within 20 s:\n{}",
                diff_lines(&last, &now).join("\n")
            );
        }
        last = now;
    }
}

fn same(lab: &Lab, before: &str, when: &str) -> Result<()> {
    let now = snapshot(lab)?;
    if now != before {
        let diff: Vec<String> = diff_lines(before, &now);
        bail!(
            "after {when}, the host's routes/ruleset/links (minus ours) changed:\n{}",
            diff.join("\n")
        );
    }
    println!("after {when}: routes, ruleset and links byte-identical (minus ours)");
    Ok(())
}

/// Lines only in `a` (prefixed -) or only in `b` (prefixed +).
fn diff_lines(a: &str, b: &str) -> Vec<String> {
    let al: Vec<&str> = a.lines().collect();
    let bl: Vec<&str> = b.lines().collect();
    let mut out: Vec<String> = al
        .iter()
        .filter(|l| !bl.contains(l))
        .map(|l| format!("- {l}"))
        .collect();
    out.extend(
        bl.iter()
            .filter(|l| !al.contains(l))
            .map(|l| format!("+ {l}")),
    );
    if out.is_empty() {
        out.push("(same lines, different order)".into());
    }
    out
}

fn ours_present(lab: &Lab) -> Result<(bool, bool, bool)> {
    let routes = lab.sh(HOST, "ip route show table all")?;
    let link = lab
        .exec(HOST, &["ip", "link", "show", MESH_IFACE])?
        .status
        .success();
    let table = lab
        .exec(HOST, &["nft", "list", "table", "inet", "meshd"])?
        .status
        .success();
    Ok((routes.contains("proto meshd"), link, table))
}

fn wait_mesh(lab: &Lab, what: &str) -> Result<()> {
    let t0 = Instant::now();
    lab.wait_mesh_pings(&[HOST, PEER], MESH_TIMEOUT)
        .with_context(|| format!("mesh after {what}"))?;
    println!("{what}: meshed in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn stop(lab: &Lab, p: meshlab::ProcId, sig: i32) -> Result<()> {
    if !lab.signal(p, sig) {
        bail!("could not signal meshd (pid {})", p.pid);
    }
    lab.wait_exit(p, STOP_TIMEOUT)?;
    Ok(())
}

#[test]
#[ignore = "needs vxlan and kernel WireGuard: runs inside the VM (coexist_in_vm)"]
fn inner_k3s_libvirt_docker_node_is_untouched() -> Result<()> {
    let lab = Lab::build(LabOpts::with_hosts(&[HOST, PEER]))?;
    lab.sh(HOST, K3S_NODE).context("planting the K3s node")?;
    let before = settled_snapshot(&lab)?;
    println!("the K3s + libvirt + Docker node, before meshd:\n{before}");
    assert!(before.contains("10.42.0.0/16 dev flannel-wg"), "{before}");

    let fleet = Fleet::generate(&[HOST, PEER], &meshlab::engine_command(lab.bin_dir()))?;
    lab.install_fleet(&fleet)?;
    let _peer = lab.start_meshd(PEER)?;
    let mut p = lab.start_meshd(HOST)?;
    wait_mesh(&lab, "mesh up")?;
    let (routes, link, _) = ours_present(&lab)?;
    assert!(routes && link, "our marked route and interface are there");
    same(&lab, &before, "mesh up")?;

    // A config change: keepalive toward the peer, then `meshctl reload`.
    let config = lab.read_file(HOST, CONFIG)?;
    let changed = config.replace("[[peer]]\n", "[[peer]]\npersistent_keepalive = 15\n");
    assert_ne!(changed, config, "config change applied to the text");
    lab.write_file(HOST, CONFIG, changed.as_bytes())?;
    lab.meshctl(HOST, &["reload"])?;
    poll_until(MESH_TIMEOUT, "keepalive 15 on the device", || {
        Ok(lab
            .exec_ok(HOST, &["wg", "show", MESH_IFACE, "persistent-keepalive"])?
            .contains("15"))
    })?;
    wait_mesh(&lab, "config change")?;
    same(&lab, &before, "a config change")?;

    // A peer subnet overlapping flannel's pod CIDR: refused, flannel-wg named, nothing applied.
    let device_before = lab.exec_ok(HOST, &["wg", "show", MESH_IFACE, "allowed-ips"])?;
    let overlapping = lab.read_file(HOST, CONFIG)?.replacen(
        "allowed_ips = [\"",
        "allowed_ips = [\"10.42.7.0/24\", \"",
        1,
    );
    lab.write_file(HOST, CONFIG, overlapping.as_bytes())?;
    let reload = lab.meshctl_output(HOST, &["reload"])?;
    let said = format!(
        "{}{}{}",
        String::from_utf8_lossy(&reload.stdout),
        String::from_utf8_lossy(&reload.stderr),
        lab.status(HOST, &[])?
    );
    assert!(
        said.contains("flannel-wg") && said.contains("10.42.7.0/24"),
        "the refusal names the other owner and the subnet:\n{said}"
    );
    assert_eq!(
        lab.exec_ok(HOST, &["wg", "show", MESH_IFACE, "allowed-ips"])?,
        device_before,
        "nothing of the refused config reached the device"
    );
    same(&lab, &before, "a refused overlapping subnet")?;
    lab.write_file(HOST, CONFIG, changed.as_bytes())?;
    lab.meshctl(HOST, &["reload"])?;

    // Restart, then SIGKILL plus restart.
    for (how, sig) in [
        ("restart", libc::SIGTERM),
        ("SIGKILL plus restart", libc::SIGKILL),
    ] {
        let index = lab.ifindex(HOST, MESH_IFACE)?;
        stop(&lab, p, sig)?;
        p = lab.start_meshd(HOST)?;
        lab.wait_meshctl(HOST, p, &["status"], Duration::from_secs(60))?;
        wait_mesh(&lab, how)?;
        assert_eq!(
            lab.ifindex(HOST, MESH_IFACE)?,
            index,
            "{how}: interface kept"
        );
        same(&lab, &before, how)?;
    }

    // `meshctl down`: ours is gone, theirs is as it was, meshd exited 0.
    lab.meshctl(HOST, &["down"])?;
    let status = lab.wait_exit(p, STOP_TIMEOUT)?;
    assert!(
        status.is_some_and(|s| s.success()),
        "meshd exits 0 after meshctl down: {status:?}"
    );
    assert_eq!(
        ours_present(&lab)?,
        (false, false, false),
        "(marked routes, wgmesh0, table inet meshd) after meshctl down"
    );
    same(&lab, &before, "meshctl down")?;

    // A listen port flannel-wg holds: refused at start, nothing created.
    let on_51820 = lab
        .read_file(HOST, CONFIG)?
        .replace("listen_port = 51871", "listen_port = 51820");
    assert!(on_51820.contains("listen_port = 51820"), "{on_51820}");
    lab.write_file(HOST, CONFIG, on_51820.as_bytes())?;
    let p = lab.start_meshd(HOST)?;
    let status = lab.wait_exit(p, STOP_TIMEOUT)?;
    assert!(
        status.is_some_and(|s| !s.success()),
        "meshd must refuse a port flannel-wg holds: {status:?}"
    );
    let log = std::fs::read_to_string(lab.meshd_log(HOST)).unwrap_or_default();
    assert!(
        log.contains("51820") && log.contains("flannel-wg"),
        "the refusal names the port and its owner:\n{log}"
    );
    assert_eq!(
        ours_present(&lab)?,
        (false, false, false),
        "nothing created"
    );
    same(&lab, &before, "a refused port")?;
    Ok(())
}
