//! Backend conformance: one behavioural suite, run against the in-memory fake, our userspace
//! engine (`meshd-wg` over UAPI) and the kernel's WireGuard (netlink, through
//! defguard_wireguard_rs). Whatever the reconciler relies on must hold for all three.
//!
//! The real backends run on a thread of their own that has unshared its network namespace (and
//! its mount namespace, with a private `/run` for the UAPI socket), so nothing is created in the
//! root namespace and everything disappears with the thread. The kernel backend needs the
//! WireGuard module, which this machine lacks: it is `#[ignore]`d (counted as ignored, never
//! passed without running), and the VM lab (tests/tests/kernel_lab.rs) runs it with
//! `--include-ignored` inside a VM, where a missing module is a failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use mesh_proto::{plan, DeviceSpec, ObservedDevice, Op, PeerSpec, PrivateKey, PublicKey};
use meshd::netsys::link::NetlinkLink;
use meshd::wg::kernel::KernelBackend;
use meshd::wg::userspace::UapiBackend;
use meshd::{FakeBackend, LinkBackend, WgBackend};

mod common;
use common::in_private_namespaces;

const IFACE: &str = "wgconf0";

fn net(s: &str) -> IpNet {
    s.parse().expect("test network")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn key(n: u8) -> PrivateKey {
    PrivateKey::from_bytes([n; 32])
}

fn spec(n: u8, endpoint: Option<&str>, ips: &[&str], keepalive: Option<u16>) -> PeerSpec {
    let mut allowed_ips: Vec<IpNet> = ips.iter().map(|s| net(s)).collect();
    allowed_ips.sort();
    PeerSpec {
        public_key: key(n).public_key(),
        preshared_key: None,
        endpoint: endpoint.map(addr),
        allowed_ips,
        persistent_keepalive: keepalive,
    }
}

fn now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
}

/// A backend under test, and how to open a second instance on the same device.
trait Subject {
    type B: WgBackend;
    fn open(&mut self) -> Self::B;
    /// The interface index, where there is an interface.
    async fn ifindex(&mut self) -> Option<u32>;
}

async fn observe<B: WgBackend>(b: &mut B, step: &str) -> ObservedDevice {
    b.observe()
        .await
        .unwrap_or_else(|e| panic!("{step}: observe failed: {e}"))
}

async fn apply<B: WgBackend>(b: &mut B, ops: &[Op], step: &str) -> ObservedDevice {
    b.apply(ops)
        .await
        .unwrap_or_else(|e| panic!("{step}: apply {ops:?} failed: {e}"));
    observe(b, step).await
}

fn peer<'a>(d: &'a ObservedDevice, n: u8, step: &str) -> &'a mesh_proto::ObservedPeer {
    d.peers
        .get(&key(n).public_key())
        .unwrap_or_else(|| panic!("{step}: peer {n} missing from {d:#?}"))
}

/// The suite. Each step names the behaviour it checks; a failure names the step.
async fn suite<S: Subject>(subject: &mut S, label: &str) {
    println!("conformance suite on the {label} backend");
    let mut b = subject.open();

    let step = "a fresh device exists after ensure_device and has no peers";
    b.ensure_device()
        .await
        .unwrap_or_else(|e| panic!("{step}: {e}"));
    let d = observe(&mut b, step).await;
    assert!(d.peers.is_empty(), "{step}: {d:#?}");
    let first_index = subject.ifindex().await;

    let step = "device settings: private key and listen port";
    let d = apply(
        &mut b,
        &[Op::SetPrivateKey(key(1)), Op::SetListenPort(51871)],
        step,
    )
    .await;
    assert_eq!(d.public_key, Some(key(1).public_key()), "{step}");
    assert_eq!(d.listen_port, 51871, "{step}");

    let step = "peers are added with every field";
    let mut a = spec(
        2,
        Some("198.51.100.2:51871"),
        &["10.99.99.2/32", "192.168.50.0/24"],
        Some(25),
    );
    a.preshared_key = Some([7; 32]);
    let bb = spec(
        3,
        Some("[2001:db8::3]:51871"),
        &["10.99.99.3/32", "fd99::3/128"],
        None,
    );
    let d = apply(
        &mut b,
        &[Op::AddPeer(a.clone()), Op::AddPeer(bb.clone())],
        step,
    )
    .await;
    assert_eq!(d.peers.len(), 2, "{step}: {d:#?}");
    let pa = peer(&d, 2, step);
    assert_eq!(pa.endpoint, a.endpoint, "{step}: endpoint");
    assert_eq!(pa.allowed_ips, a.allowed_ips, "{step}: allowed IPs");
    assert_eq!(pa.persistent_keepalive, Some(25), "{step}: keepalive");
    assert_eq!(pa.preshared_key, Some([7; 32]), "{step}: preshared key");
    let pb = peer(&d, 3, step);
    assert_eq!(pb.endpoint, bb.endpoint, "{step}: IPv6 endpoint");
    assert_eq!(pb.allowed_ips, bb.allowed_ips, "{step}: IPv6 allowed IPs");
    assert_eq!(pb.persistent_keepalive, None, "{step}: no keepalive");
    assert_eq!(pb.preshared_key, None, "{step}: no preshared key");
    assert_eq!(pb.last_handshake, None, "{step}: no handshake yet");

    let step = "an update that sets only the endpoint keeps everything else";
    let d = apply(
        &mut b,
        &[Op::UpdatePeer {
            public_key: a.public_key,
            preshared_key: None,
            endpoint: Some(addr("198.51.100.22:51900")),
            allowed_ips: None,
            persistent_keepalive: None,
        }],
        step,
    )
    .await;
    let pa = peer(&d, 2, step);
    assert_eq!(pa.endpoint, Some(addr("198.51.100.22:51900")), "{step}");
    assert_eq!(pa.allowed_ips, a.allowed_ips, "{step}: allowed IPs kept");
    assert_eq!(pa.persistent_keepalive, Some(25), "{step}: keepalive kept");
    assert_eq!(
        pa.preshared_key,
        Some([7; 32]),
        "{step}: preshared key kept"
    );

    let step = "an update replaces the allowed IPs and clears keepalive and preshared key";
    let d = apply(
        &mut b,
        &[Op::UpdatePeer {
            public_key: a.public_key,
            preshared_key: Some(None),
            endpoint: None,
            allowed_ips: Some(vec![net("10.99.99.2/32")]),
            persistent_keepalive: Some(None),
        }],
        step,
    )
    .await;
    let pa = peer(&d, 2, step);
    assert_eq!(pa.allowed_ips, vec![net("10.99.99.2/32")], "{step}");
    assert_eq!(pa.persistent_keepalive, None, "{step}: keepalive off");
    assert_eq!(pa.preshared_key, None, "{step}: preshared key removed");
    assert_eq!(
        pa.endpoint,
        Some(addr("198.51.100.22:51900")),
        "{step}: endpoint kept"
    );

    let step = "an allowed IP belongs to one peer: giving it to another takes it away";
    let d = apply(
        &mut b,
        &[Op::UpdatePeer {
            public_key: bb.public_key,
            preshared_key: None,
            endpoint: None,
            allowed_ips: Some(vec![
                net("10.99.99.2/32"),
                net("10.99.99.3/32"),
                net("fd99::3/128"),
            ]),
            persistent_keepalive: None,
        }],
        step,
    )
    .await;
    assert!(peer(&d, 2, step).allowed_ips.is_empty(), "{step}: {d:#?}");
    assert_eq!(peer(&d, 3, step).allowed_ips.len(), 3, "{step}: {d:#?}");

    let step = "an update of an unknown peer changes nothing";
    let before = observe(&mut b, step).await;
    let d = apply(
        &mut b,
        &[Op::UpdatePeer {
            public_key: key(9).public_key(),
            preshared_key: None,
            endpoint: Some(addr("198.51.100.9:1")),
            allowed_ips: Some(vec![net("10.99.99.9/32")]),
            persistent_keepalive: None,
        }],
        step,
    )
    .await;
    assert_eq!(d, before, "{step}");

    let step = "a new private key keeps the peers";
    let d = apply(&mut b, &[Op::SetPrivateKey(key(4))], step).await;
    assert_eq!(d.public_key, Some(key(4).public_key()), "{step}");
    assert_eq!(d.peers.len(), 2, "{step}");

    let step = "fwmark is set and cleared";
    let d = apply(&mut b, &[Op::SetFwmark(Some(0x800))], step).await;
    assert_eq!(d.fwmark, Some(0x800), "{step}: set");
    let d = apply(&mut b, &[Op::SetFwmark(None)], step).await;
    assert_eq!(d.fwmark, None, "{step}: cleared");

    let step = "the reconciler's plan converges in one pass and is then empty";
    let desired = DeviceSpec {
        private_key: key(5),
        listen_port: 51999,
        fwmark: None,
        peers: BTreeMap::from_iter(
            [
                spec(3, Some("[2001:db8::3]:51871"), &["10.99.99.3/32"], Some(25)),
                spec(6, None, &["10.99.99.6/32", "10.20.0.0/16"], None),
            ]
            .into_iter()
            .map(|p| (p.public_key, p)),
        ),
    };
    let d = observe(&mut b, step).await;
    let ops = plan(&desired, &d, now());
    let d = apply(&mut b, &ops, step).await;
    let again = plan(&desired, &d, now());
    assert!(again.is_empty(), "{step}: second plan {again:?} on {d:#?}");
    assert_eq!(d.public_key, Some(key(5).public_key()), "{step}");
    assert_eq!(d.listen_port, 51999, "{step}");
    let expected: Vec<PublicKey> = desired.peers.keys().copied().collect();
    assert_eq!(
        d.peers.keys().copied().collect::<Vec<_>>(),
        expected,
        "{step}"
    );

    let step = "a peer is removed";
    let d = apply(&mut b, &[Op::RemovePeer(key(6).public_key())], step).await;
    assert_eq!(d.peers.len(), 1, "{step}: {d:#?}");

    let step = "a second backend instance adopts the device as it is";
    let mut again = subject.open();
    again
        .ensure_device()
        .await
        .unwrap_or_else(|e| panic!("{step}: {e}"));
    let adopted = observe(&mut again, step).await;
    assert_eq!(adopted, observe(&mut b, step).await, "{step}");
    assert_eq!(
        subject.ifindex().await,
        first_index,
        "{step}: same interface"
    );
    println!("conformance suite on the {label} backend: every step passed");
}

// ---- the three subjects -------------------------------------------------------------------

/// The in-memory fake. Its state lives in the instance, so every `open` hands out a view of
/// the one shared device (what a real second instance would find).
#[derive(Default)]
struct Fake {
    shared: Arc<tokio::sync::Mutex<FakeBackend>>,
}

struct SharedFake(Arc<tokio::sync::Mutex<FakeBackend>>);

impl WgBackend for SharedFake {
    async fn ensure_device(&mut self) -> meshd::Result<()> {
        self.0.lock().await.ensure_device().await
    }
    async fn observe(&mut self) -> meshd::Result<ObservedDevice> {
        self.0.lock().await.observe().await
    }
    async fn apply(&mut self, ops: &[Op]) -> meshd::Result<()> {
        self.0.lock().await.apply(ops).await
    }
}

impl Subject for Fake {
    type B = SharedFake;
    fn open(&mut self) -> SharedFake {
        SharedFake(Arc::clone(&self.shared))
    }
    async fn ifindex(&mut self) -> Option<u32> {
        None
    }
}

/// Our engine, started by the UAPI backend in the test's namespaces.
struct Userspace {
    engine: PathBuf,
    link: NetlinkLink,
}

impl Subject for Userspace {
    type B = UapiBackend;
    fn open(&mut self) -> UapiBackend {
        UapiBackend::new(IFACE, self.engine.clone(), Path::new("/run/wireguard"))
    }
    async fn ifindex(&mut self) -> Option<u32> {
        self.link.ifindex(IFACE).await.ok()
    }
}

/// The kernel's WireGuard.
struct Kernel {
    link: NetlinkLink,
}

impl Subject for Kernel {
    type B = KernelBackend;
    fn open(&mut self) -> KernelBackend {
        KernelBackend::new(IFACE).expect("kernel backend")
    }
    async fn ifindex(&mut self) -> Option<u32> {
        self.link.ifindex(IFACE).await.ok()
    }
}

/// Wait (with a deadline) for the engine we started to exit once its interface is deleted: it
/// removes its UAPI socket on the way out, so no process is left behind.
async fn engine_gone() {
    let socket = Path::new("/run/wireguard").join(format!("{IFACE}.sock"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the engine did not exit within 10 s of its interface being deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `meshd-wg`, built beside meshd (built if a lone `cargo test -p meshd` skipped it).
fn engine() -> PathBuf {
    let meshd = PathBuf::from(env!("CARGO_BIN_EXE_meshd"));
    let path = meshd.with_file_name("meshd-wg");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "-p", "meshd-engine"])
            .status()
            .expect("run cargo build");
        assert!(ok.success(), "cargo build -p meshd-engine failed");
    }
    path
}

#[tokio::test]
async fn fake_backend_conforms() {
    suite(&mut Fake::default(), "in-memory fake").await;
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn userspace_backend_conforms() {
    let engine = engine();
    in_private_namespaces(move || async move {
        let mut link = NetlinkLink::connect().expect("netlink");
        let mut subject = Userspace {
            engine,
            link: link.clone(),
        };
        suite(&mut subject, "userspace (meshd-wg)").await;
        // Deleting the interface ends the engine we started; it removes its socket on the way
        // out, so wait for that (with a deadline) to leave no process behind.
        link.delete(IFACE).await.expect("delete the interface");
        engine_gone().await;
    });
}

/// Needs a kernel with WireGuard, which this lab machine's kernel lacks: ignored in the
/// ordinary run (so it is counted as such, never passed without running), and run with
/// `--include-ignored` inside the VM lab (`tests/tests/kernel_lab.rs`), where it must pass.
#[test]
#[ignore = "needs kernel WireGuard: the VM lab (tests/tests/kernel_lab.rs) runs it inside a VM"]
fn kernel_backend_conforms() {
    in_private_namespaces(move || async move {
        let mut link = NetlinkLink::connect().expect("netlink");
        let mut probe = KernelBackend::new(IFACE).expect("kernel backend");
        if let Err(e) = probe.create() {
            panic!("no kernel WireGuard here ({e}): run it where the kernel has it (the VM lab)");
        }
        link.delete(IFACE)
            .await
            .expect("delete the probe interface");
        let mut subject = Kernel { link: link.clone() };
        suite(&mut subject, "kernel").await;
        link.delete(IFACE).await.expect("delete the interface");
    });
}

/// `daemon.backend` selection: what exists is adopted as it is, a contradicting setting is
/// refused without touching the interface, a foreign interface of the same name is refused, and
/// `auto` picks the kernel exactly when it can create a WireGuard link.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn backend_selection_adopts_and_refuses() {
    use mesh_proto::config::BackendKind;
    use meshd::wg::select::{select, Backend, EngineSpec};
    let required = std::env::var("MESHD_REQUIRE_KERNEL_WG").as_deref() == Ok("1");
    let engine = EngineSpec {
        command: engine(),
        run_dir: PathBuf::from("/run/wireguard"),
    };
    in_private_namespaces(move || async move {
        let mut link = NetlinkLink::connect().expect("netlink");
        let ip = |args: &[&str]| {
            let ok = Command::new("ip").args(args).status().expect("run ip");
            assert!(ok.success(), "ip {args:?}");
        };

        // A foreign interface with our name (a bridge): refused whatever the setting, and left alone.
        ip(&["link", "add", IFACE, "type", "bridge"]);
        let index = link.ifindex(IFACE).await.expect("bridge index");
        for wanted in BackendKind::ALL {
            let e = select(wanted, IFACE, &engine, &link)
                .await
                .expect_err("a bridge named like our interface must be refused");
            assert!(e.to_string().contains("not a WireGuard interface"), "{e}");
        }
        assert_eq!(link.ifindex(IFACE).await.expect("still there"), index);
        assert_eq!(
            link.kind(IFACE).await.expect("kind").as_deref(),
            Some("bridge")
        );
        ip(&["link", "del", IFACE]);

        // Nothing there: auto decides by asking the kernel.
        let chosen = select(BackendKind::Auto, IFACE, &engine, &link)
            .await
            .expect("auto");
        println!("auto chose: {}", chosen.status_line());
        let kernel = matches!(chosen.backend, Backend::Kernel(_));
        assert!(
            kernel || !required,
            "MESHD_REQUIRE_KERNEL_WG=1 but auto chose {}",
            chosen.status_line()
        );
        if kernel {
            assert!(
                chosen.reason.contains("the kernel has WireGuard"),
                "{}",
                chosen.reason
            );
            assert_eq!(
                link.kind(IFACE).await.expect("kind").as_deref(),
                Some("wireguard")
            );
            let index = link.ifindex(IFACE).await.expect("index");
            // A live kernel interface: userspace is refused, auto and kernel adopt it.
            let e = select(BackendKind::Userspace, IFACE, &engine, &link)
                .await
                .expect_err("userspace over a kernel interface");
            assert!(e.to_string().contains("never recreates"), "{e}");
            for wanted in [BackendKind::Auto, BackendKind::Kernel] {
                let s = select(wanted, IFACE, &engine, &link).await.expect("adopt");
                assert!(matches!(s.backend, Backend::Kernel(_)), "{wanted}");
                assert!(s.reason.contains("adopted"), "{}", s.reason);
            }
            assert_eq!(
                link.ifindex(IFACE).await.expect("index"),
                index,
                "not recreated"
            );
            link.delete(IFACE).await.expect("delete");
        } else {
            assert!(
                chosen.reason.contains("kernel WireGuard unavailable"),
                "{}",
                chosen.reason
            );
            assert_eq!(
                link.kind(IFACE).await.expect("kind"),
                None,
                "auto left nothing behind"
            );
        }

        // A running engine: kernel is refused, auto and userspace adopt it.
        let mut userspace = select(BackendKind::Userspace, IFACE, &engine, &link)
            .await
            .expect("userspace");
        userspace
            .backend
            .ensure_device()
            .await
            .expect("start the engine");
        let index = link.ifindex(IFACE).await.expect("engine interface");
        let e = select(BackendKind::Kernel, IFACE, &engine, &link)
            .await
            .expect_err("kernel over a userspace interface");
        assert!(e.to_string().contains("never recreates"), "{e}");
        for wanted in [BackendKind::Auto, BackendKind::Userspace] {
            let s = select(wanted, IFACE, &engine, &link).await.expect("adopt");
            assert!(matches!(s.backend, Backend::Userspace(_)), "{wanted}");
            assert!(
                s.reason.contains("adopted the running engine"),
                "{}",
                s.reason
            );
        }
        assert_eq!(
            link.ifindex(IFACE).await.expect("index"),
            index,
            "not recreated"
        );
        link.delete(IFACE).await.expect("delete");
        engine_gone().await;
    });
}
