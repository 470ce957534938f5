//! Routes, forwarding and our nftables table against the real kernel, each test in its own
//! network namespace (a thread that unshares its network and mount namespaces; they go with
//! the thread). The WireGuard device is the in-memory fake; the interface is a bridge (this host's
//! kernel has no dummy or wireguard module), and so is the stand-in for flannel-wg.
//!
//! Needs root (unshare) and `ip` and `nft`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mesh_proto::routes::{SystemRoute, RT_PROTO_MESHD};
use mesh_proto::PrivateKey;
use meshd::{Agent, FakeBackend, Settings};

mod common;
use common::in_private_namespaces;

const IFACE: &str = "wgtest0";
const NOW: Duration = Duration::from_secs(1_700_000_000);

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run("ip", args)
}

fn nft(args: &[&str]) -> String {
    run("nft", args)
}

fn nft_in(text: &str) {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    assert!(child.wait().expect("nft").success(), "nft -f - {text}");
}

fn bridge(name: &str) {
    ip(&["link", "add", name, "type", "bridge"]);
    ip(&["link", "set", name, "up"]);
}

fn sysctl(path: &str) -> String {
    std::fs::read_to_string(path)
        .expect("sysctl")
        .trim()
        .to_string()
}

fn key(n: u8) -> String {
    PrivateKey::from_bytes([n; 32]).public_key().to_string()
}

/// Our configuration: peer 1 always; `extra` is more TOML (peers, `[routes]`).
fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("meshd.toml");
    let text = format!(
        "[host]\nname = \"dock-edge\"\naddress = \"10.99.99.1/24\"\ninterface = \"{IFACE}\"\n\
         private_key_file = \"{}\"\n\n[daemon]\nstate_dir = \"{}\"\n\n[[peer]]\nname = \"dock-load\"\n\
         public_key = \"{}\"\nallowed_ips = [\"10.99.99.2/32\", \"192.168.77.0/24\"]\n{extra}",
        dir.join("private.key").display(),
        dir.join("state").display(),
        key(1)
    );
    std::fs::write(&path, text).expect("write config");
    path
}

type RealAgent = Agent<FakeBackend, meshd::netsys::link::NetlinkLink>;

fn agent(path: &Path, wg: FakeBackend) -> RealAgent {
    let settings = Settings::load(path).expect("valid config");
    let key = meshd::disk::keyfile::load_or_generate(&settings.private_key_file).expect("key");
    let link = meshd::netsys::link::NetlinkLink::connect().expect("netlink");
    Agent::new(wg, link, settings, key)
}

async fn routes() -> Vec<SystemRoute> {
    let handle = meshd::netsys::netlink::connect().expect("netlink");
    meshd::netsys::routing::system_routes(&handle)
        .await
        .expect("routes")
}

async fn ours() -> Vec<String> {
    let mut v: Vec<String> = routes()
        .await
        .into_iter()
        .filter(|r| r.is_ours(IFACE))
        .map(|r| r.dst.to_string())
        .collect();
    v.sort();
    v
}

/// `nft -s list ruleset` (no counters: traffic moves them) without our table.
fn ruleset_without(table: &str) -> String {
    let text = nft(&["-s", "list", "ruleset"]);
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        if line == format!("table inet {table} {{") {
            skipping = true;
            continue;
        }
        if skipping {
            if line == "}" {
                skipping = false;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn our_routes_carry_our_protocol_and_the_mesh_route_is_not_the_kernels() {
    in_private_namespaces(|| async {
        let dir = tempfile::tempdir().expect("tempdir");
        bridge(IFACE);
        let path = write_config(dir.path(), "");
        let mut a = agent(&path, FakeBackend::default());
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        assert_eq!(ours().await, vec!["10.99.99.0/24", "192.168.77.0/24"]);
        let all = routes().await;
        let mesh: Vec<&SystemRoute> = all
            .iter()
            .filter(|r| r.dst.to_string() == "10.99.99.0/24")
            .collect();
        assert_eq!(mesh.len(), 1, "{mesh:?}");
        assert_eq!(mesh[0].protocol, RT_PROTO_MESHD, "{}", mesh[0]);
        assert_eq!(mesh[0].table, 254);
        let shown = ip(&["route", "show", "proto", "171"]);
        assert!(shown.contains("10.99.99.0/24 dev wgtest0"), "{shown}");
        assert!(
            !ip(&["route", "show", "proto", "kernel"]).contains("10.99.99.0/24"),
            "noprefixroute: no kernel prefix route"
        );

        // A restart over the same system: no route written, nothing planned.
        let before = ip(&["route", "show", "table", "all"]);
        let mut b = agent(&path, a.wg.clone());
        let r = b.reconcile(NOW).await;
        assert!(r.error.is_none() && r.ops.is_empty(), "{r:?}");
        assert_eq!(ip(&["route", "show", "table", "all"]), before);
    });
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn an_address_from_before_noprefixroute_has_its_kernel_route_taken_over() {
    in_private_namespaces(|| async {
        let dir = tempfile::tempdir().expect("tempdir");
        bridge(IFACE);
        ip(&["addr", "add", "10.99.99.1/24", "dev", IFACE]);
        let path = write_config(dir.path(), "");
        let mut a = agent(&path, FakeBackend::default());
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        assert_eq!(ours().await, vec!["10.99.99.0/24", "192.168.77.0/24"]);
        let kernel = ip(&["route", "show", "table", "main", "proto", "kernel"]);
        assert!(!kernel.contains("10.99.99.0/24"), "{kernel}");
        let r = a.reconcile(NOW).await;
        assert!(r.ops.is_empty(), "{r:?}");
    });
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn a_route_overlapping_flannel_is_refused_and_nothing_is_applied() {
    in_private_namespaces(|| async {
        let dir = tempfile::tempdir().expect("tempdir");
        bridge(IFACE);
        bridge("flannel-wg");
        ip(&["route", "add", "10.42.0.0/16", "dev", "flannel-wg"]);
        let path = write_config(dir.path(), "");
        let mut a = agent(&path, FakeBackend::default());
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        let device = a.wg.device.clone();
        let table = ip(&["route", "show", "table", "all"]);

        // A new good peer and a peer whose allowed IPs take flannel's pod space.
        write_config(
            dir.path(),
            &format!(
                "\n[[peer]]\nname = \"dock-prod\"\npublic_key = \"{}\"\nallowed_ips = [\"10.99.99.3/32\"]\n\
                 \n[[peer]]\nname = \"k3s-a\"\npublic_key = \"{}\"\nallowed_ips = [\"10.99.99.4/32\", \"10.42.5.0/24\"]\n",
                key(2),
                key(3)
            ),
        );
        a.handle_reload().expect("the file is valid");
        let r = a.reconcile(NOW).await;
        let err = r.error.expect("refused");
        assert!(
            err.contains("10.42.5.0/24 overlaps 10.42.0.0/16 dev flannel-wg"),
            "{err}"
        );
        let status = a.status().last_error.expect("in the status");
        assert!(status.contains("flannel-wg"), "{status}");
        assert_eq!(a.wg.device, device, "no peer of the refused config");
        assert_eq!(
            ip(&["route", "show", "table", "all"]),
            table,
            "no route of the refused config"
        );
    });
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn reconcile_removes_only_our_stale_routes() {
    in_private_namespaces(|| async {
        let dir = tempfile::tempdir().expect("tempdir");
        bridge(IFACE);
        let path = write_config(dir.path(), "");
        let mut a = agent(&path, FakeBackend::default());
        a.reconcile(NOW).await;
        // A stale route of ours (an old peer's subnet) and an operator's route on our
        // interface.
        ip(&[
            "route",
            "add",
            "192.168.50.0/24",
            "dev",
            IFACE,
            "proto",
            "171",
        ]);
        ip(&["route", "add", "192.168.60.0/24", "dev", IFACE]);
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        assert_eq!(ours().await, vec!["10.99.99.0/24", "192.168.77.0/24"]);
        let shown = ip(&["route", "show", "192.168.60.0/24"]);
        assert!(shown.contains("dev wgtest0"), "foreign route kept: {shown}");
        // Someone deletes one of ours: put back on the next pass.
        ip(&["route", "del", "192.168.77.0/24", "dev", IFACE]);
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        assert_eq!(ours().await, vec!["10.99.99.0/24", "192.168.77.0/24"]);
    });
}

const ADVERTISE: &str = "\n[routes]\nadvertise = [\"192.168.1.20/32\"]\n";

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn advertising_turns_forwarding_on_limits_it_and_teardown_restores_everything() {
    in_private_namespaces(|| async {
        let dir = tempfile::tempdir().expect("tempdir");
        bridge(IFACE);
        bridge("lan0");
        ip(&["addr", "add", "192.168.1.1/24", "dev", "lan0"]);
        let fwd = |i: &str| sysctl(&format!("/proc/sys/net/ipv4/conf/{i}/forwarding"));
        assert_eq!((fwd(IFACE), fwd("lan0")), ("0".into(), "0".into()));
        let path = write_config(dir.path(), ADVERTISE);
        let mut a = agent(&path, FakeBackend::default());
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        assert_eq!((fwd(IFACE), fwd("lan0")), ("1".into(), "1".into()));
        assert_eq!(fwd("all"), "0", "only the interfaces that need it");
        let table = nft(&["list", "table", "inet", "meshd"]);
        assert!(
            table.contains(
                "iifname \"wgtest0\" oifname != \"wgtest0\" ip daddr @advertised4 masquerade"
            ),
            "{table}"
        );
        assert!(table.contains("iifname \"wgtest0\" drop"), "{table}");
        assert!(table.contains("iifname \"lan0\" drop"), "{table}");
        assert!(dir.path().join("state/forwarding.json").exists());

        // A restart adopts the identical table instead of rewriting it.
        let handles = nft(&["-a", "list", "table", "inet", "meshd"]);
        let mut b = agent(&path, a.wg.clone());
        let r = b.reconcile(NOW).await;
        assert!(r.error.is_none() && r.ops.is_empty(), "{r:?}");
        assert_eq!(nft(&["-a", "list", "table", "inet", "meshd"]), handles);

        let settings = Settings::load(&path).expect("config");
        let done = meshd::netsys::routing::teardown(&settings)
            .await
            .expect("teardown");
        assert!(
            done.iter().any(|d| d.contains("table inet meshd")),
            "{done:?}"
        );
        assert!(nft(&["list", "tables"])
            .lines()
            .all(|l| !l.contains("meshd")));
        assert!(ours().await.is_empty());
        assert_eq!((fwd(IFACE), fwd("lan0")), ("0".into(), "0".into()));
        assert!(!dir.path().join("state/forwarding.json").exists());
        // Teardown again: nothing left to do.
        assert!(meshd::netsys::routing::teardown(&settings)
            .await
            .expect("again")
            .is_empty());
    });
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn forwarding_already_on_gets_no_drop_rules() {
    in_private_namespaces(|| async {
        let dir = tempfile::tempdir().expect("tempdir");
        bridge(IFACE);
        bridge("lan0");
        ip(&["addr", "add", "192.168.1.1/24", "dev", "lan0"]);
        // As on a K3s or Docker host.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("ip_forward");
        let path = write_config(dir.path(), ADVERTISE);
        let mut a = agent(&path, FakeBackend::default());
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        let table = nft(&["list", "table", "inet", "meshd"]);
        assert!(table.contains("masquerade"), "{table}");
        assert!(!table.contains("drop"), "{table}");
        assert!(!dir.path().join("state/forwarding.json").exists());
        let settings = Settings::load(&path).expect("config");
        meshd::netsys::routing::teardown(&settings)
            .await
            .expect("teardown");
        assert_eq!(sysctl("/proc/sys/net/ipv4/conf/lan0/forwarding"), "1");
    });
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn our_table_is_replaced_atomically_and_nothing_else_changes() {
    in_private_namespaces(|| async {
        let dir = tempfile::tempdir().expect("tempdir");
        bridge(IFACE);
        bridge("lan0");
        ip(&["addr", "add", "192.168.1.1/24", "dev", "lan0"]);
        // Other owners' tables, as iptables-nft and Docker leave them.
        nft_in(
            "table ip filter {\n chain FORWARD { type filter hook forward priority filter; policy accept;\n  counter jump FLANNEL-FWD\n }\n chain FLANNEL-FWD {\n  ip saddr 10.42.0.0/16 accept\n }\n}\n\
             table ip nat {\n chain POSTROUTING { type nat hook postrouting priority srcnat; policy accept;\n  counter jump FLANNEL-POSTRTG\n }\n chain FLANNEL-POSTRTG {\n  ip saddr 10.42.0.0/16 ip daddr != 10.42.0.0/16 masquerade\n }\n}\n",
        );
        let before = nft(&["-s", "list", "ruleset"]);
        let path = write_config(dir.path(), ADVERTISE);
        let mut a = agent(&path, FakeBackend::default());
        a.reconcile(NOW).await;
        assert_eq!(ruleset_without("meshd"), before);

        // A second subnet: our table is replaced (one `nft -f -` transaction), the others are
        // untouched.
        write_config(
            dir.path(),
            "\n[routes]\nadvertise = [\"192.168.1.20/32\", \"192.168.1.30/32\"]\n",
        );
        a.handle_reload().expect("reload");
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        let table = nft(&["list", "table", "inet", "meshd"]);
        assert!(table.contains("192.168.1.30"), "{table}");
        assert_eq!(ruleset_without("meshd"), before);
        // Someone edits our table: the next pass puts ours back.
        nft(&["flush", "chain", "inet", "meshd", "postrouting"]);
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        assert_eq!(nft(&["list", "table", "inet", "meshd"]), table);

        // Nothing to advertise any more: our table goes, nothing else changes.
        write_config(dir.path(), "");
        a.handle_reload().expect("reload");
        a.reconcile(NOW).await;
        assert_eq!(nft(&["-s", "list", "ruleset"]), before);
        assert_eq!(
            sysctl(&format!("/proc/sys/net/ipv4/conf/{IFACE}/forwarding")),
            "0"
        );
    });
}

/// Named namespaces for the far ends of veth pairs, removed on drop.
struct Netns(Vec<String>);

impl Netns {
    fn new(roles: &[&str]) -> Netns {
        let names: Vec<String> = roles
            .iter()
            .map(|r| format!("mdrt-{}-{r}", std::process::id()))
            .collect();
        for n in &names {
            ip(&["netns", "add", n]);
        }
        Netns(names)
    }

    fn exec(&self, i: usize, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0[i]])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    fn ok(&self, i: usize, args: &[&str]) {
        let out = self.exec(i, args);
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.0[i],
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Ping until it answers or the deadline passes.
fn pings(ns: &Netns, i: usize, target: &str, deadline: Duration) -> bool {
    let end = std::time::Instant::now() + deadline;
    loop {
        if ns
            .exec(i, &["ping", "-c1", "-W1", "-n", target])
            .status
            .success()
        {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn the_advertised_subnet_is_reachable_from_the_mesh_and_nothing_else_is() {
    in_private_namespaces(|| async {
        let dir = tempfile::tempdir().expect("tempdir");
        // 0: a mesh peer (its end of "the tunnel"), 1: the home LAN with the NAS (.20) and a
        // box that is not advertised (.30). The NAS has no route back to the mesh: only
        // masquerade makes it answer.
        let ns = Netns::new(&["peer", "lan"]);
        ip(&[
            "link", "add", IFACE, "type", "veth", "peer", "name", "cl0", "netns", &ns.0[0],
        ]);
        ip(&[
            "link", "add", "lan0", "type", "veth", "peer", "name", "nas0", "netns", &ns.0[1],
        ]);
        ip(&["addr", "add", "192.168.1.1/24", "dev", "lan0"]);
        ip(&["link", "set", "lan0", "up"]);
        ns.ok(0, &["ip", "addr", "add", "10.99.99.2/24", "dev", "cl0"]);
        ns.ok(0, &["ip", "link", "set", "cl0", "up"]);
        ns.ok(
            0,
            &["ip", "route", "add", "192.168.1.0/24", "via", "10.99.99.1"],
        );
        ns.ok(1, &["ip", "addr", "add", "192.168.1.20/24", "dev", "nas0"]);
        ns.ok(1, &["ip", "addr", "add", "192.168.1.30/24", "dev", "nas0"]);
        ns.ok(1, &["ip", "link", "set", "nas0", "up"]);
        // .30 could answer the mesh without masquerade (policy route back through us): only
        // our forwarding limit keeps it out.
        ns.ok(
            1,
            &["ip", "rule", "add", "from", "192.168.1.30", "table", "100"],
        );
        ns.ok(
            1,
            &[
                "ip",
                "route",
                "add",
                "10.99.99.0/24",
                "via",
                "192.168.1.1",
                "table",
                "100",
            ],
        );

        let path = write_config(dir.path(), ADVERTISE);
        let mut a = agent(&path, FakeBackend::default());
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        assert_eq!(sysctl("/proc/sys/net/ipv4/ip_forward"), "0");
        assert!(
            pings(&ns, 0, "192.168.1.20", Duration::from_secs(10)),
            "the advertised NAS answers the mesh"
        );
        assert!(
            !pings(&ns, 0, "192.168.1.30", Duration::from_secs(2)),
            "a host we do not advertise is not forwarded to"
        );
        // The same without our limit (the test's own check that .30 could answer at all).
        nft(&["flush", "chain", "inet", "meshd", "forward"]);
        assert!(
            pings(&ns, 0, "192.168.1.30", Duration::from_secs(10)),
            ".30 answers once our limit is gone"
        );
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        assert!(
            !pings(&ns, 0, "192.168.1.30", Duration::from_secs(2)),
            "the limit is back after a pass"
        );

        // Torn down: nothing is forwarded any more.
        let settings = Settings::load(&path).expect("config");
        meshd::netsys::routing::teardown(&settings)
            .await
            .expect("teardown");
        assert!(!pings(&ns, 0, "192.168.1.20", Duration::from_secs(2)));
    });
}
