//! The userspace engine against itself and against wireguard-go, in two network namespaces,
//! driven by the real `wg` tool over the UAPI socket.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{genkey, ok, poll_until, run, Impl, Pair, ENGINE, FLOOD};

fn tunnel(a: Impl, b: Impl) -> Pair {
    let mut p = Pair::new();
    p.start_engine('a', a);
    p.start_engine('b', b);
    p.configure();
    p
}

/// Send `mb` MiB of random bytes from `from` to `to_addr` over TCP; both ends hash what they
/// saw and the hashes must match.
fn tcp_transfer(p: &Pair, from: char, to: char, to_addr: &str, mb: usize) {
    let server = format!(
        "import socket,hashlib\ns=socket.socket(socket.AF_INET6 if ':' in '{to_addr}' else socket.AF_INET)\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{to_addr}',5201))\ns.listen(1)\n\
         print('ready',flush=True)\nc,_=s.accept()\nh=hashlib.sha256();n=0\nwhile True:\n d=c.recv(1<<20)\n if not d: break\n h.update(d);n+=len(d)\n\
         print(n,h.hexdigest(),flush=True)\n"
    );
    let mut srv = p
        .ns(to, &["python3", "-c", &server])
        .stdout(Stdio::piped())
        .spawn()
        .expect("server");
    let mut out = srv.stdout.take().expect("stdout");
    let mut first = [0u8; 6];
    use std::io::Read;
    out.read_exact(&mut first).expect("server ready");
    let client = format!(
        "import socket,hashlib,os\ns=socket.create_connection(('{to_addr}',5201),timeout=60)\nh=hashlib.sha256();n=0\n\
         for i in range({mb}):\n d=os.urandom(1<<20)\n h.update(d);s.sendall(d);n+=len(d)\ns.close()\nprint(n,h.hexdigest())\n"
    );
    let sent = ok(&mut p.ns(from, &["python3", "-c", &client]));
    let mut got = String::new();
    out.read_to_string(&mut got).expect("server output");
    let _ = srv.wait();
    assert_eq!(
        sent.trim(),
        got.trim(),
        "the transfer did not arrive intact"
    );
    assert!(sent.starts_with(&format!("{} ", mb << 20)), "sent {sent}");
}

fn interop(a: Impl, b: Impl) {
    let p = tunnel(a, b);
    p.wait_ping('a', p.b.mesh4);
    assert!(p.ping('a', p.b.mesh4, 3), "ping a->b");
    assert!(p.ping('b', p.a.mesh4, 3), "ping b->a");
    assert!(p.ping('a', p.b.mesh6, 3), "IPv6 ping a->b");
    assert!(p.ping('b', p.a.mesh6, 3), "IPv6 ping b->a");
    tcp_transfer(&p, 'a', 'b', p.b.mesh4, 50);
    tcp_transfer(&p, 'b', 'a', p.a.mesh6, 8);
    // A handshake happened, counters moved.
    let dump = p.wg_dump('a');
    assert_eq!(dump.len(), 2, "{dump:?}");
    assert_ne!(dump[1][4], "0", "latest handshake must be set");
    assert!(
        dump[1][6].parse::<u64>().expect("tx") > 50 << 20,
        "tx counter {dump:?}"
    );
    assert!(
        dump[1][5].parse::<u64>().expect("rx") > 8 << 20,
        "rx counter {dump:?}"
    );
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn ours_with_ours() {
    interop(Impl::Ours, Impl::Ours);
}

/// The engine's log line that says which offloads it runs with.
fn offload_line(p: &Pair, which: char) -> String {
    let log = std::fs::read_to_string(p.dir.path().join(format!("{which}.log"))).expect("log");
    log.lines()
        .find(|l| l.contains("offloads"))
        .unwrap_or_else(|| panic!("no offloads line in {which}'s log:\n{log}"))
        .to_string()
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn udp_and_tun_offloads_on_one_side_and_off_on_the_other_interoperate() {
    // A: every offload (UDP_SEGMENT sends, UDP_GRO receives, TUN TSO/GRO); B: none. Bulk
    // TCP both ways must arrive intact: A's segmented sends reach a socket that takes single
    // datagrams, B's single datagrams reach a UDP_GRO socket.
    const OFF: &[(&str, &str)] = &[("MESHD_WG_UDP_OFFLOAD", "0"), ("MESHD_WG_OFFLOAD", "0")];
    const ON: &[(&str, &str)] = &[("MESHD_WG_UDP_OFFLOAD", "1"), ("MESHD_WG_OFFLOAD", "1")];
    let p = tunnel(Impl::OursWith(ON), Impl::OursWith(OFF));
    p.wait_ping('a', p.b.mesh4);
    tcp_transfer(&p, 'a', 'b', p.b.mesh4, 40);
    tcp_transfer(&p, 'b', 'a', p.a.mesh6, 40);
    let (a, b) = (offload_line(&p, 'a'), offload_line(&p, 'b'));
    assert!(
        a.contains("tun_offload=true") && a.contains("gso: true, gro: true"),
        "A runs with every offload on this kernel: {a}"
    );
    assert!(
        b.contains("tun_offload=false") && b.contains("gso: false, gro: false"),
        "B runs without offloads: {b}"
    );
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn ours_with_wireguard_go() {
    interop(Impl::Ours, Impl::WireguardGo);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn wg_show_dump_matches_configuration_and_traffic() {
    let p = tunnel(Impl::Ours, Impl::Ours);
    p.wait_ping('a', p.b.mesh4);
    let before = p.wg_dump('a');
    assert!(p.ping('a', p.b.mesh4, 5));
    let dump = p.wg_dump('a');
    // interface line: private-key public-key listen-port fwmark
    assert_eq!(dump[0][0], p.a.private_key);
    assert_eq!(dump[0][1], p.a.public_key);
    assert_eq!(dump[0][2], p.a.port.to_string());
    assert_eq!(dump[0][3], "off");
    // peer line: public-key preshared-key endpoint allowed-ips latest-handshake rx tx keepalive
    let peer = &dump[1];
    assert_eq!(peer[0], p.b.public_key);
    assert_eq!(peer[1], "(none)");
    assert_eq!(peer[2], format!("{}:{}", p.b.underlay, p.b.port));
    assert_eq!(peer[3], format!("{}/32,{}/128", p.b.mesh4, p.b.mesh6));
    let hs: u64 = peer[4].parse().expect("handshake");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(
        hs > 0 && hs <= now && now - hs < 60,
        "handshake time {hs} vs now {now}"
    );
    let (rx0, tx0): (u64, u64) = (
        before[1][5].parse().expect("rx"),
        before[1][6].parse().expect("tx"),
    );
    let (rx1, tx1): (u64, u64) = (peer[5].parse().expect("rx"), peer[6].parse().expect("tx"));
    // 5 echo requests and 5 replies of 84 bytes inner + 32 bytes of WireGuard + padding.
    assert!(
        tx1 - tx0 >= 5 * (84 + 32) && rx1 - rx0 >= 5 * (84 + 32),
        "tx {tx0}->{tx1} rx {rx0}->{rx1}"
    );
    assert!(
        tx1 - tx0 < 5 * 200 + 400,
        "tx grew by more than the pings: {tx0}->{tx1}"
    );
    assert_eq!(peer[7], "off");
    // showconf carries the private key (boringtun's UAPI omits it; ours must not).
    let conf = ok(&mut p.ns('a', &["wg", "showconf", &p.a.iface]));
    assert!(
        conf.contains(&format!("PrivateKey = {}", p.a.private_key)),
        "{conf}"
    );
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn wg_set_changes_a_live_interface_while_traffic_flows() {
    let p = tunnel(Impl::Ours, Impl::Ours);
    p.wait_ping('a', p.b.mesh4);
    // Steady traffic during every change: a 4-second ping at 20 ms.
    let flow = p
        .ns(
            'a',
            &[
                "ping", "-c", "200", "-i", "0.02", "-W", "1", "-q", p.b.mesh4,
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("ping");
    let iface = p.a.iface.clone();
    // Add a third peer.
    let (_, c_pub) = genkey();
    ok(&mut p.ns(
        'a',
        &[
            "wg",
            "set",
            &iface,
            "peer",
            &c_pub,
            "endpoint",
            "192.0.2.9:40009",
            "allowed-ips",
            "10.99.99.9/32",
            "persistent-keepalive",
            "25",
        ],
    ));
    let dump = p.wg_dump('a');
    assert!(
        dump.iter().any(|l| l[0] == c_pub
            && l[2] == "192.0.2.9:40009"
            && l[3] == "10.99.99.9/32"
            && l[7] == "25"),
        "{dump:?}"
    );
    // Update the live peer's endpoint (same address, explicit) and allowed IPs.
    let b_pub = p.b.public_key.clone();
    ok(&mut p.ns(
        'a',
        &[
            "wg",
            "set",
            &iface,
            "peer",
            &b_pub,
            "endpoint",
            &format!("{}:{}", p.b.underlay, p.b.port),
            "allowed-ips",
            &format!("{}/32,{}/128,10.98.0.0/16", p.b.mesh4, p.b.mesh6),
        ],
    ));
    let dump = p.wg_dump('a');
    assert!(
        dump.iter()
            .any(|l| l[0] == b_pub && l[3].contains("10.98.0.0/16")),
        "{dump:?}"
    );
    // Move 10.98.0.0/16 to peer C: an allowed IP belongs to exactly one peer.
    ok(&mut p.ns(
        'a',
        &[
            "wg",
            "set",
            &iface,
            "peer",
            &c_pub,
            "allowed-ips",
            "10.99.99.9/32,10.98.0.0/16",
        ],
    ));
    let dump = p.wg_dump('a');
    assert!(
        dump.iter()
            .any(|l| l[0] == b_pub && !l[3].contains("10.98.0.0/16")),
        "{dump:?}"
    );
    // Update C's endpoint, then remove C.
    ok(&mut p.ns(
        'a',
        &[
            "wg",
            "set",
            &iface,
            "peer",
            &c_pub,
            "endpoint",
            "192.0.2.10:40010",
        ],
    ));
    assert!(p
        .wg_dump('a')
        .iter()
        .any(|l| l[0] == c_pub && l[2] == "192.0.2.10:40010"));
    ok(&mut p.ns('a', &["wg", "set", &iface, "peer", &c_pub, "remove"]));
    assert!(!p.wg_dump('a').iter().any(|l| l[0] == c_pub));
    let out = flow.wait_with_output().expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "traffic stopped during the changes: {text}"
    );
    // Allow a few losses at most; a reset session would lose far more.
    let lost: u32 = text
        .split(", ")
        .find(|s| s.ends_with("received"))
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse::<u32>().ok())
        .map(|rx| 200 - rx)
        .unwrap_or(200);
    assert!(
        lost <= 4,
        "lost {lost} of 200 packets during live changes: {text}"
    );
    assert!(p.ping('a', p.b.mesh6, 2));
}

/// A key change takes the device state, then each peer's noise state; the receive path once
/// held a peer's noise state while it read the device state, and a key change under traffic
/// deadlocked the engine for good (`wg set` hung, the tunnel went dead). Under floods both
/// ways (b's own traffic makes it handshake again at once after each change, so a's packets
/// keep being decrypted on b's receive path), every change of b's private key must finish.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn private_key_changes_during_a_flood_never_wedge_the_engine() {
    let mut p = tunnel(Impl::Ours, Impl::Ours);
    p.wait_ping('a', p.b.mesh4);
    for (from, to) in [('a', p.b.mesh4), ('b', p.a.mesh4)] {
        let flood = p
            .ns(from, &["ping", "-f", "-q", "-w", "600", to])
            .stdout(Stdio::null())
            .spawn()
            .expect("ping -f");
        // Ended (by PID) when the pair is torn down.
        p.adopt(flood);
    }
    let (iface, key) = (p.b.iface.clone(), p.key_file('b'));
    let received = |p: &Pair| -> u64 {
        p.wg_dump('b')
            .iter()
            .find(|l| l.len() > 5 && l[0] == p.a.public_key)
            .and_then(|l| l[5].parse().ok())
            .unwrap_or(0)
    };
    for round in 0..80 {
        // The same key: every session is reset all the same, and a's config stays right.
        let out = run(p.ns(
            'b',
            &["timeout", "5", "wg", "set", &iface, "private-key", &key],
        ));
        assert!(
            out.status.success(),
            "round {round}: `wg set private-key` did not finish within 5 s ({:?}); engine log:\n{}",
            out.status,
            p.log('b')
        );
        // Wait until a's packets are decrypted again before the next change.
        let before = received(&p);
        poll_until(
            &format!("round {round}: b to receive from a again"),
            Duration::from_secs(10),
            || received(&p) > before,
        );
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn cryptokey_routing_drops_spoofed_sources_and_unrouted_destinations() {
    let p = tunnel(Impl::Ours, Impl::Ours);
    p.wait_ping('a', p.b.mesh4);
    // A gets a second address that B does not allow for A, and routes a prefix to B so the
    // packet is encrypted and sent: B must drop it after decryption.
    ok(&mut p.ns(
        'a',
        &["ip", "addr", "add", "10.99.98.7/32", "dev", &p.a.iface],
    ));
    ok(&mut p.ns(
        'a',
        &[
            "wg",
            "set",
            &p.a.iface,
            "peer",
            &p.b.public_key,
            "allowed-ips",
            &format!("{}/32,{}/128", p.b.mesh4, p.b.mesh6),
        ],
    ));
    let rx_before = ok(&mut p.ns(
        'b',
        &[
            "cat",
            &format!("/sys/class/net/{}/statistics/rx_packets", p.b.iface),
        ],
    ));
    let spoofed = run(&mut p.ns(
        'a',
        &[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            "10.99.98.7",
            p.b.mesh4,
        ],
    ));
    assert!(
        !spoofed.status.success(),
        "a packet from outside A's allowed IPs got an answer"
    );
    let rx_after = ok(&mut p.ns(
        'b',
        &[
            "cat",
            &format!("/sys/class/net/{}/statistics/rx_packets", p.b.iface),
        ],
    ));
    assert_eq!(
        rx_before.trim(),
        rx_after.trim(),
        "B's engine delivered a spoofed packet to its TUN"
    );
    // A's traffic to an address no peer owns is dropped without harm.
    let nowhere = run(&mut p.ns(
        'a',
        &["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.99.99.200"],
    ));
    assert!(!nowhere.status.success());
    // Both engines still serve.
    assert!(p.ping('a', p.b.mesh4, 2));
    assert!(p.ping('b', p.a.mesh4, 2));
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn malformed_uapi_requests_get_an_errno_and_the_engine_keeps_running() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let p = tunnel(Impl::Ours, Impl::Ours);
    p.wait_ping('a', p.b.mesh4);
    let sock = format!("/var/run/wireguard/{}.sock", p.a.iface);
    for bad in [
        "set=1\nlisten_port=notaport\n\n",
        "set=1\nprivate_key=zz\n\n",
        "set=1\npublic_key=0000\n\n",
        "set=1\nbogus_key=1\n\n",
        "set=1\npublic_key=0101010101010101010101010101010101010101010101010101010101010101\nallowed_ip=10.0.0.0/99\n\n",
        "set=1\npublic_key=0101010101010101010101010101010101010101010101010101010101010101\nendpoint=nohost\n\n",
        "set=1\npublic_key=0101010101010101010101010101010101010101010101010101010101010101\nprotocol_version=2\n\n",
        "hello\n\n",
    ] {
        let mut s = UnixStream::connect(&sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        s.write_all(bad.as_bytes()).expect("write");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("reply");
        assert!(line.starts_with("errno=") && line.trim() != "errno=0", "{bad:?} got {line:?}");
    }
    // Nothing was applied: the peer set is unchanged, the tunnel works.
    let dump = p.wg_dump('a');
    assert_eq!(dump.len(), 2, "{dump:?}");
    assert!(p.ping('a', p.b.mesh4, 2));
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn a_second_engine_on_the_same_interface_is_refused() {
    let p = tunnel(Impl::Ours, Impl::Ours);
    let out = run(&mut p.ns('a', &[ENGINE, "-f", &p.a.iface]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already served"), "{err}");
    // The first engine is untouched.
    p.wait_ping('a', p.b.mesh4);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn wg_quick_up_with_meshd_wg_as_userspace_implementation() {
    let mut p = Pair::new();
    p.start_engine('b', Impl::Ours);
    // B as usual, A through wg-quick with meshd-wg detached (no -f).
    let b = &p.b;
    let key = p.key_file('b');
    ok(&mut p.ns(
        'b',
        &[
            "wg",
            "set",
            &b.iface,
            "listen-port",
            &b.port.to_string(),
            "private-key",
            &key,
            "peer",
            &p.a.public_key,
            "allowed-ips",
            &format!("{}/32", p.a.mesh4),
        ],
    ));
    ok(&mut p.ns(
        'b',
        &[
            "ip",
            "addr",
            "add",
            &format!("{}/24", b.mesh4),
            "dev",
            &b.iface,
        ],
    ));
    ok(&mut p.ns('b', &["ip", "link", "set", &b.iface, "up"]));
    let conf = p.dir.path().join(format!("{}.conf", p.a.iface));
    std::fs::write(
        &conf,
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = {}/24\nListenPort = {}\n\n[Peer]\nPublicKey = {}\nEndpoint = {}:{}\nAllowedIPs = {}/32\n",
            p.a.private_key, p.a.mesh4, p.a.port, b.public_key, b.underlay, b.port, b.mesh4
        ),
    )
    .expect("conf");
    let conf = conf.to_string_lossy().into_owned();
    let up = run(p
        .ns('a', &["wg-quick", "up", &conf])
        .env("WG_QUICK_USERSPACE_IMPLEMENTATION", ENGINE));
    assert!(
        up.status.success(),
        "wg-quick up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    p.wait_ping('a', p.b.mesh4);
    let show = ok(&mut p.ns('a', &["wg", "show", &p.a.iface]));
    assert!(show.contains("latest handshake"), "{show}");
    // wg-quick down deletes the interface; the detached engine notices and exits, removing
    // its socket.
    ok(&mut p.ns('a', &["wg-quick", "down", &conf]));
    let sock = format!("/var/run/wireguard/{}.sock", p.a.iface);
    poll_until(
        "the detached engine to exit",
        Duration::from_secs(10),
        || !std::path::Path::new(&sock).exists(),
    );
    let _ = Command::new("true").status();
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn ipv6_underlay_fwmark_and_preshared_key() {
    let p = Pair::new();
    let mut p = p;
    p.start_engine('a', Impl::Ours);
    p.start_engine('b', Impl::Ours);
    // Underlay over IPv6 this time.
    for (w, dev, addr) in [('a', "vt0", "2001:db8::1"), ('b', "vt1", "2001:db8::2")] {
        ok(p.ns(
            w,
            &[
                "ip",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                dev,
                "nodad",
            ],
        ));
    }
    let psk_file = p.dir.path().join("psk");
    std::fs::write(
        &psk_file,
        ok(std::process::Command::new("wg").arg("genpsk")).trim(),
    )
    .expect("psk");
    let psk_file = psk_file.to_string_lossy().into_owned();
    for (me, other, other6) in [('a', 'b', "2001:db8::2"), ('b', 'a', "2001:db8::1")] {
        let (s, o) = (p.side(me), p.side(other));
        let key = p.key_file(me);
        ok(p.ns(
            me,
            &[
                "wg",
                "set",
                &s.iface,
                "listen-port",
                &s.port.to_string(),
                "private-key",
                &key,
                "fwmark",
                "0x1234",
                "peer",
                &o.public_key,
                "preshared-key",
                &psk_file,
                "endpoint",
                &format!("[{other6}]:{}", o.port),
                "allowed-ips",
                &format!("{}/32", o.mesh4),
            ],
        ));
        ok(p.ns(
            me,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/24", s.mesh4),
                "dev",
                &s.iface,
            ],
        ));
        ok(p.ns(me, &["ip", "link", "set", &s.iface, "up"]));
    }
    p.wait_ping('a', p.b.mesh4);
    assert!(p.ping('b', p.a.mesh4, 2));
    let dump = p.wg_dump('a');
    assert_eq!(dump[0][3], "0x1234", "{dump:?}");
    assert_eq!(
        dump[1][1],
        std::fs::read_to_string(&psk_file).expect("psk").trim()
    );
    assert_eq!(dump[1][2], format!("[2001:db8::2]:{}", p.b.port));
    // Removing the fwmark shows "off" again.
    ok(p.ns('a', &["wg", "set", &p.a.iface, "fwmark", "0"]));
    assert_eq!(p.wg_dump('a')[0][3], "off");
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn the_engine_exits_when_its_interface_is_deleted() {
    let mut p = Pair::new();
    let pid = p.start_engine('a', Impl::Ours);
    ok(p.ns('a', &["ip", "link", "del", &p.a.iface]));
    let sock = format!("/var/run/wireguard/{}.sock", p.a.iface);
    poll_until("the engine to exit", Duration::from_secs(10), || {
        !std::path::Path::new(&format!("/proc/{pid}/status")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/status"))
                .is_ok_and(|s| s.contains("State:\tZ"))
    });
    assert!(
        !std::path::Path::new(&sock).exists(),
        "the UAPI socket was left behind"
    );
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn the_endpoint_follows_a_roaming_peer() {
    let p = tunnel(Impl::Ours, Impl::Ours);
    p.wait_ping('a', p.b.mesh4);
    assert_eq!(
        p.wg_dump('a')[1][2],
        format!("{}:{}", p.b.underlay, p.b.port)
    );
    // B moves to another underlay address; A was never told.
    ok(p.ns(
        'b',
        &[
            "ip",
            "addr",
            "del",
            &format!("{}/24", p.b.underlay),
            "dev",
            "vt1",
        ],
    ));
    ok(p.ns('b', &["ip", "addr", "add", "192.0.2.3/24", "dev", "vt1"]));
    // B's next authenticated packets come from the new address; A follows them.
    p.wait_ping('b', p.a.mesh4);
    assert_eq!(p.wg_dump('a')[1][2], format!("192.0.2.3:{}", p.b.port));
    assert!(p.ping('a', p.b.mesh4, 2), "A reaches B at its new address");
}

/// The endpoint B has for A, as `wg show dump` prints it.
fn endpoint_of_a_at_b(p: &Pair) -> String {
    p.wg_dump('b')[1][2].clone()
}

/// Make 198.18.0.0/16 the attacker's: local to A's namespace (the flooder binds any address
/// in it), routed there from B so that B's cookie replies come back to the flooder.
fn attacker_network_in_a(p: &Pair) {
    ok(p.ns(
        'a',
        &["ip", "route", "add", "local", "198.18.0.0/16", "dev", "lo"],
    ));
    ok(p.ns(
        'b',
        &["ip", "route", "add", "198.18.0.0/16", "via", p.a.underlay],
    ));
}

fn kv(out: &str, key: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {out}"))
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn forged_initiations_get_cookies_and_never_move_the_endpoint() {
    let p = tunnel(Impl::Ours, Impl::Ours);
    p.wait_ping('a', p.b.mesh4);
    let before = endpoint_of_a_at_b(&p);
    assert_eq!(before, format!("{}:{}", p.a.underlay, p.a.port));
    attacker_network_in_a(&p);
    // Initiations claiming A's key, valid MAC1 for B, from 64 attacker addresses, 4 s.
    let flood = p
        .ns(
            'a',
            &[
                FLOOD,
                "flood",
                "--target",
                &format!("{}:{}", p.b.underlay, p.b.port),
                "--target-key",
                &p.b.public_key,
                "--claim-key",
                &p.a.public_key,
                "--sources",
                "64",
                "--rate",
                "3000",
                "--duration",
                "4",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("flooder");
    // The path stays up during the flood.
    let during = run(p.ns(
        'a',
        &["ping", "-c", "15", "-i", "0.2", "-W", "1", p.b.mesh4],
    ));
    let out = flood.wait_with_output().expect("flooder output");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(kv(&out, "sent") > 5000, "{out}");
    assert!(
        kv(&out, "cookie_replies_received") > 1000,
        "under load B answers with cookies: {out}"
    );
    let during = String::from_utf8_lossy(&during.stdout).into_owned();
    let received: u32 = during
        .split(", ")
        .find_map(|f| f.strip_suffix(" received"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ping summary in {during}"));
    // Generous (a loaded two-core machine): the point is that the path does not break.
    assert!(received >= 12, "ping during the flood: {during}");
    assert_eq!(endpoint_of_a_at_b(&p), before, "the endpoint moved");
    assert!(p.ping('a', p.b.mesh4, 3) && p.ping('b', p.a.mesh4, 3));
    // B said what it did.
    poll_until(
        "B's gate totals in its log",
        Duration::from_secs(10),
        || p.log('b').contains("handshake gate totals"),
    );
    assert!(p.log('b').contains("under load"), "{}", p.log('b'));
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn a_replayed_initiation_is_answered_but_never_moves_the_endpoint() {
    let mut p = Pair::new();
    p.start_engine('a', Impl::Ours);
    p.start_engine('b', Impl::Ours);
    // A tap on B's side records the first handshake.
    let tap = p.dir.path().join("handshake.hex");
    let capture = p
        .ns(
            'b',
            &[
                FLOOD,
                "capture",
                "--port",
                &p.b.port.to_string(),
                "--out",
                &tap.to_string_lossy(),
                "--count",
                "2",
                "--timeout",
                "30",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("capture");
    std::thread::sleep(Duration::from_millis(300)); // let the AF_PACKET socket open
    p.configure();
    p.wait_ping('a', p.b.mesh4);
    let cap = capture.wait_with_output().expect("capture output");
    assert!(
        cap.status.success(),
        "{}",
        String::from_utf8_lossy(&cap.stderr)
    );
    let before = endpoint_of_a_at_b(&p);
    // B forgets A and learns it again: a fresh noise state that no longer remembers the
    // initiation's timestamp, so the captured initiation is accepted as new.
    ok(p.ns(
        'b',
        &["wg", "set", &p.b.iface, "peer", &p.a.public_key, "remove"],
    ));
    ok(p.ns(
        'b',
        &[
            "wg",
            "set",
            &p.b.iface,
            "peer",
            &p.a.public_key,
            "endpoint",
            &before,
            "allowed-ips",
            &format!("{}/32,{}/128", p.a.mesh4, p.a.mesh6),
        ],
    ));
    attacker_network_in_a(&p);
    let out = ok(p.ns(
        'a',
        &[
            FLOOD,
            "replay",
            "--target",
            &format!("{}:{}", p.b.underlay, p.b.port),
            "--in",
            &tap.to_string_lossy(),
            "--source",
            "198.18.7.7",
            "--repeat",
            "3",
        ],
    ));
    assert!(out.contains("replayed=6"), "{out}");
    // Give B time to handle them; the endpoint must not follow.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        endpoint_of_a_at_b(&p),
        before,
        "a replay moved the endpoint"
    );
    // Both directions work (B starts a fresh handshake with A).
    p.wait_ping('b', p.a.mesh4);
    assert!(p.ping('a', p.b.mesh4, 3));
    assert_eq!(endpoint_of_a_at_b(&p), before);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn a_real_peer_completes_a_handshake_through_cookies_during_a_flood() {
    handshake_through_cookies(Impl::Ours);
}

/// The cookie replies are the protocol's: wireguard-go takes them and retries with MAC2.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn wireguard_go_completes_a_handshake_through_our_cookies_during_a_flood() {
    handshake_through_cookies(Impl::WireguardGo);
}

/// A (`initiator`) handshakes with our engine B while B is under a flood.
fn handshake_through_cookies(initiator: Impl) {
    let p = tunnel(initiator, Impl::Ours);
    p.wait_ping('a', p.b.mesh4);
    attacker_network_in_a(&p);
    let flood = p
        .ns(
            'a',
            &[
                FLOOD,
                "flood",
                "--target",
                &format!("{}:{}", p.b.underlay, p.b.port),
                "--target-key",
                &p.b.public_key,
                "--claim-key",
                &p.a.public_key,
                "--sources",
                "64",
                "--rate",
                "3000",
                "--duration",
                "25",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("flooder");
    poll_until("B under load", Duration::from_secs(10), || {
        p.log('b')
            .contains("under load: handshake messages now need a cookie")
    });
    // A forgets B and learns it again: a fresh noise state, so A must handshake while B is
    // under load. B answers A's first initiation with a cookie; A's retry carries MAC2.
    ok(p.ns(
        'a',
        &["wg", "set", &p.a.iface, "peer", &p.b.public_key, "remove"],
    ));
    ok(p.ns(
        'a',
        &[
            "wg",
            "set",
            &p.a.iface,
            "peer",
            &p.b.public_key,
            "endpoint",
            &format!("{}:{}", p.b.underlay, p.b.port),
            "allowed-ips",
            &format!("{}/32,{}/128", p.b.mesh4, p.b.mesh6),
        ],
    ));
    let started = std::time::Instant::now();
    p.wait_ping('a', p.b.mesh4);
    let took = started.elapsed();
    println!("handshake through the cookie exchange under a flood took {took:?}");
    // The first initiation got a cookie, not a response: A's retry comes after its 5 s
    // rekey timeout (a mechanism check, not a performance bound). The flood ran throughout.
    assert!(
        took >= Duration::from_secs(4),
        "B handled A's first initiation although it was under load ({took:?})"
    );
    let out = flood.wait_with_output().expect("flooder output");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(kv(&out, "cookie_replies_received") > 1000, "{out}");
    assert!(p.ping('b', p.a.mesh4, 3));
}
