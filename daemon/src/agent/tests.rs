//! Tests of the agent on the in-memory fakes: passes, reloads, routes, restarts and what the
//! device is left with.

use super::*;
use crate::backend::{FakeBackend, FakeLink};
use crate::runtime::settings::PeerSettings;
use mesh_proto::PeerSpec;
use proptest::prelude::*;

pub(crate) fn peer(i: u8, keepalive: Option<u16>) -> PeerSettings {
    let key = PrivateKey::from_bytes([i.wrapping_add(1); 32]).public_key();
    PeerSettings {
        name: format!("peer-{i}"),
        spec: PeerSpec {
            public_key: key,
            preshared_key: None,
            endpoint: Some(format!("198.51.100.{i}:51871").parse().expect("endpoint")),
            allowed_ips: vec![format!("10.99.99.{}/32", 10 + u16::from(i))
                .parse()
                .expect("net")],
            persistent_keepalive: keepalive,
        },
    }
}

pub(crate) fn settings(peers: Vec<PeerSettings>) -> Settings {
    Settings {
        config_path: PathBuf::from("/nonexistent/meshd.toml"),
        host_name: Some("dock-load".into()),
        interface: "wgtest0".into(),
        address: Some("10.99.99.1/24".parse().expect("address")),
        listen_port: 51871,
        mtu: 1420,
        private_key_file: PathBuf::from("/nonexistent/private.key"),
        control_socket: PathBuf::from("/nonexistent/meshd.sock"),
        backend: mesh_proto::config::BackendKind::Auto,
        engine_command: None,
        reconcile_interval: Duration::from_secs(10),
        peers,
        state_dir: PathBuf::from("/nonexistent/state"),
        join_token_file: None,
        coordinator: None,
        routes: Default::default(),
        rotate_every: None,
        handoff: Default::default(),
    }
}

fn agent(
    peers: Vec<PeerSettings>,
    device: mesh_proto::ObservedDevice,
) -> Agent<FakeBackend, FakeLink> {
    let wg = FakeBackend {
        device,
        ..FakeBackend::default()
    };
    Agent::new(
        wg,
        FakeLink::default(),
        settings(peers),
        PrivateKey::from_bytes([200; 32]),
    )
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

const NOW: Duration = Duration::from_secs(1_700_000_000);

#[test]
fn first_pass_converges_and_second_is_a_no_op() {
    block_on(async {
        let mut a = agent(vec![peer(1, Some(25)), peer(2, None)], Default::default());
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        assert!(!r.ops.is_empty());
        assert_eq!(a.wg.device.peers.len(), 2);
        assert_eq!(a.wg.device.listen_port, 51871);
        assert_eq!(a.link.mtu, 1420);
        assert!(a.link.up);
        let st = a.status();
        assert_eq!(st.ifindex, Some(7));
        assert_eq!(st.passes, 1);
        let r2 = a.reconcile(NOW).await;
        assert!(r2.ops.is_empty(), "second pass must be a no-op: {r2:?}");
        let peers = a.peers().await.expect("peers");
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].name, "peer-1");
        assert_eq!(
            peers[0].mesh_address,
            Some("10.99.99.11/32".parse().expect("net"))
        );
        assert!(peers.iter().all(|p| p.observed.is_some()));
    });
}

#[test]
fn a_failing_op_does_not_abort_the_others() {
    block_on(async {
        let mut a = agent(
            vec![peer(1, None), peer(2, None), peer(3, None)],
            Default::default(),
        );
        let bad = peer(2, None).spec.public_key;
        a.wg.fail_peers.insert(bad);
        let r = a.reconcile(NOW).await;
        assert_eq!(r.failed.len(), 1, "{r:?}");
        assert!(
            r.error.as_deref().is_some_and(|e| e.contains("1 of")),
            "{r:?}"
        );
        assert_eq!(a.wg.device.peers.len(), 2);
        assert!(!a.wg.device.peers.contains_key(&bad));
        assert!(a.status().last_error.is_some());
        // The fault clears: the next pass (level-triggered) adds the missing peer.
        a.wg.fail_peers.clear();
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none() && r.failed.is_empty(), "{r:?}");
        assert_eq!(a.wg.device.peers.len(), 3);
        assert!(a.status().last_error.is_none());
    });
}

#[test]
fn unreachable_device_fails_the_pass_not_the_agent() {
    block_on(async {
        let mut a = agent(vec![peer(1, None)], Default::default());
        a.wg.fail_observe = true;
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_some());
        assert_eq!(a.wg.ensure_calls, 1, "must try to (re)start the device");
        a.wg.fail_observe = false;
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        assert_eq!(a.wg.device.peers.len(), 1);
    });
}

#[test]
fn foreign_peers_on_our_interface_are_removed() {
    block_on(async {
        let mut a = agent(vec![peer(1, None)], Default::default());
        a.reconcile(NOW).await;
        // Someone adds a peer by hand, stealing peer 1's allowed IP.
        let mut thief = peer(9, None).spec;
        thief.allowed_ips = peer(1, None).spec.allowed_ips;
        mesh_proto::plan::apply(&mut a.wg.device, &[Op::AddPeer(thief)]);
        a.reconcile(NOW).await;
        let p1 = peer(1, None).spec;
        assert_eq!(a.wg.device.peers.len(), 1);
        assert_eq!(
            a.wg.device.peers[&p1.public_key].allowed_ips,
            p1.allowed_ips
        );
    });
}

fn config_text(dir: &Path, address: &str, peers: &[PeerSettings]) -> String {
    let mut t = format!(
        "[host]\nname = \"dock-load\"\naddress = \"{address}\"\ninterface = \"wgtest0\"\n\
         listen_port = 51871\nprivate_key_file = \"{}\"\nmtu = 1420\n",
        dir.join("private.key").display()
    );
    for p in peers {
        t.push_str(&format!(
            "\n[[peer]]\nname = \"{}\"\npublic_key = \"{}\"\nallowed_ips = [\"{}\"]\n",
            p.name, p.spec.public_key, p.spec.allowed_ips[0]
        ));
    }
    t
}

#[test]
fn reload_with_bad_config_keeps_the_old_one_and_reports_it() {
    block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meshd.toml");
        std::fs::write(
            &path,
            config_text(dir.path(), "10.99.99.1/24", &[peer(1, None)]),
        )
        .expect("write");
        let settings = Settings::load(&path).expect("valid config");
        let key = crate::disk::keyfile::load_or_generate(&settings.private_key_file).expect("key");
        let mut a = Agent::new(FakeBackend::default(), FakeLink::default(), settings, key);
        a.reconcile(NOW).await;
        assert_eq!(a.wg.device.peers.len(), 1);

        // A broken edit: reload refused, old config kept, error names file and key.
        let mut bad = config_text(dir.path(), "10.99.99.1/24", &[peer(1, None), peer(2, None)]);
        bad = bad.replace("listen_port = 51871", "listen_port = \"many\"");
        std::fs::write(&path, bad).expect("write");
        let err = a.handle_reload().expect_err("bad config must be refused");
        let msg = a.status().last_error.expect("reported in status");
        assert!(
            msg.contains("meshd.toml") && msg.contains("listen_port"),
            "{msg} / {err}"
        );
        let r = a.reconcile(NOW).await;
        assert!(r.ops.is_empty(), "old config still in force: {r:?}");
        assert_eq!(a.wg.device.peers.len(), 1);
        assert!(
            a.status().last_error.is_some(),
            "still reported after a good pass"
        );

        // Fixed, with a new peer and a new address: applied, old address removed.
        std::fs::write(
            &path,
            config_text(dir.path(), "10.99.99.7/24", &[peer(1, None), peer(2, None)]),
        )
        .expect("write");
        a.handle_reload().expect("good config");
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        assert_eq!(a.wg.device.peers.len(), 2);
        assert!(a.status().last_error.is_none());
        let addrs: Vec<String> = a.link.addresses.iter().map(|n| n.to_string()).collect();
        assert_eq!(addrs, vec!["10.99.99.7/24".to_string()]);
    });
}

#[test]
fn a_reload_takes_the_hand_off_settings_from_the_same_parse_or_none_of_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meshd.toml");
    let text = |port: &str| {
        format!(
            "{}\n[metrics]\nlisten_port = {port}\n",
            config_text(dir.path(), "10.99.99.1/24", &[peer(1, None)])
        )
    };
    std::fs::write(&path, text("9101")).expect("write");
    let settings = Settings::load(&path).expect("valid config");
    assert_eq!(settings.handoff.metrics.listen_port, 9101);
    let key = crate::disk::keyfile::load_or_generate(&settings.private_key_file).expect("key");
    let mut a = Agent::new(FakeBackend::default(), FakeLink::default(), settings, key);
    std::fs::write(&path, text("9102")).expect("write");
    a.handle_reload().expect("valid");
    assert_eq!(a.settings().handoff.metrics.listen_port, 9102);
    // A file whose hand-off part is invalid is refused as a whole: neither part changes.
    let mut bad = text("99999");
    bad = bad.replace("[[peer]]", "[[peer]]\npersistent_keepalive = 25");
    std::fs::write(&path, bad).expect("write");
    a.handle_reload().expect_err("port 99999 refused");
    assert_eq!(a.settings().handoff.metrics.listen_port, 9102);
    assert_eq!(a.settings().peers[0].spec.persistent_keepalive, None);
}

#[test]
fn reload_refuses_an_interface_change() {
    block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meshd.toml");
        let text = config_text(dir.path(), "10.99.99.1/24", &[peer(1, None)]);
        std::fs::write(&path, &text).expect("write");
        let settings = Settings::load(&path).expect("valid config");
        let key = crate::disk::keyfile::load_or_generate(&settings.private_key_file).expect("key");
        let mut a = Agent::new(FakeBackend::default(), FakeLink::default(), settings, key);
        std::fs::write(&path, text.replace("wgtest0", "wgother0")).expect("write");
        let err = a
            .handle_reload()
            .expect_err("interface change needs a restart");
        assert!(err.to_string().contains("needs a restart"), "{err}");
        assert_eq!(a.settings().interface, "wgtest0");
    });
}

fn foreign(dst: &str, dev: &str) -> SystemRoute {
    SystemRoute {
        table: mesh_proto::routes::TABLE_MAIN,
        dst: dst.parse().expect("net"),
        dev: Some(dev.into()),
        protocol: 2,
        kind: "unicast".into(),
        gateway: None,
    }
}

fn our_routes(a: &Agent<FakeBackend, FakeLink>) -> Vec<String> {
    let mut v: Vec<String> = a
        .link
        .routes
        .iter()
        .filter(|r| r.is_ours("wgtest0"))
        .map(|r| r.dst.to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn routes_are_ours_and_a_restart_writes_none() {
    block_on(async {
        let mut p = peer(1, None);
        p.spec
            .allowed_ips
            .push("192.168.1.20/32".parse().expect("net"));
        let mut a = agent(vec![p.clone()], Default::default());
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        assert_eq!(our_routes(&a), vec!["10.99.99.0/24", "192.168.1.20/32"]);
        let writes = a.link.route_writes;
        // A restart: a new agent over the same system.
        let mut b = Agent::new(
            a.wg.clone(),
            a.link.clone(),
            settings(vec![p]),
            PrivateKey::from_bytes([200; 32]),
        );
        let r = b.reconcile(NOW).await;
        assert!(r.ops.is_empty() && r.error.is_none(), "{r:?}");
        assert_eq!(
            b.link.route_writes, writes,
            "a restart must not touch routes"
        );
    });
}

#[test]
fn a_clashing_desired_state_is_refused_as_a_whole() {
    block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meshd.toml");
        std::fs::write(
            &path,
            config_text(dir.path(), "10.99.99.1/24", &[peer(1, None)]),
        )
        .expect("write");
        let settings = Settings::load(&path).expect("valid config");
        let key = crate::disk::keyfile::load_or_generate(&settings.private_key_file).expect("key");
        let mut link = FakeLink::default();
        link.routes.push(foreign("10.42.0.0/16", "flannel-wg"));
        let mut a = Agent::new(FakeBackend::default(), link, settings, key);
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        let before_dev = a.wg.device.clone();
        let before_routes = a.link.routes.clone();

        // A new peer (fine) and one whose allowed IPs take flannel's space.
        let mut text = config_text(dir.path(), "10.99.99.1/24", &[peer(1, None), peer(2, None)]);
        text.push_str(&format!(
            "\n[[peer]]\nname = \"k3s-node\"\npublic_key = \"{}\"\nallowed_ips = [\"10.99.99.30/32\", \"10.42.5.0/24\"]\n",
            peer(3, None).spec.public_key
        ));
        std::fs::write(&path, text).expect("write");
        a.handle_reload().expect("the file itself is valid");
        let r = a.reconcile(NOW).await;
        let err = r.error.clone().expect("refused");
        assert!(
            err.contains("flannel-wg") && err.contains("10.42.5.0/24"),
            "{err}"
        );
        assert_eq!(
            a.wg.device, before_dev,
            "no peer of the refused state applied"
        );
        assert_eq!(
            a.link.routes, before_routes,
            "no route of the refused state applied"
        );
        let st = a.status().last_error.expect("in the status");
        assert!(st.contains("flannel-wg"), "{st}");
        // Still refused on the next pass, still nothing applied.
        let r = a.reconcile(NOW).await;
        assert!(r.ops.is_empty(), "{r:?}");

        // The clash goes away (flannel removed): the state is taken.
        a.link
            .routes
            .retain(|r| r.dev.as_deref() != Some("flannel-wg"));
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        assert_eq!(a.wg.device.peers.len(), 3);
        assert!(our_routes(&a).contains(&"10.42.5.0/24".to_string()));
        assert!(a.status().last_error.is_none());
    });
}

fn netmap_peer(name: &str, i: u8, extra: &[&str]) -> mesh_proto::netmap::NetmapPeer {
    let address: std::net::IpAddr = format!("10.99.99.{}", 40 + i).parse().expect("ip");
    let mut allowed_ips = vec![IpNet::from(address)];
    allowed_ips.extend(extra.iter().map(|p| p.parse::<IpNet>().expect("net")));
    mesh_proto::netmap::NetmapPeer {
        name: name.into(),
        address,
        public_key: PrivateKey::from_bytes([i; 32]).public_key(),
        allowed_ips,
        endpoints: vec![],
        persistent_keepalive: None,
        static_peer: false,
        admin: false,
        key_created_unix: 0,
        next_public_key: None,
    }
}

/// Routes are granted, not taken: a netmap carrying a peer's prefix this host does not opt
/// in to, or one it must never take (loopback, its own LAN), is applied without them; the
/// rest of it (peers, accepted routes) applies, and later netmaps still apply.
#[test]
fn refused_peer_routes_are_skipped_and_the_rest_of_the_netmap_applies() {
    block_on(async {
        let mut a = agent(vec![peer(1, None)], Default::default());
        a.settings.routes.accept = vec!["192.168.1.0/24".parse().expect("net")];
        a.link.routes.push(foreign("192.168.7.0/24", "eth0"));
        let own = PrivateKey::from_bytes([200; 32]).public_key();
        let netmap = |version: u64, peers| Netmap {
            version,
            mesh_cidr: "10.99.99.0/24".parse().expect("net"),
            name: "dock-load".into(),
            address: "10.99.99.1".parse().expect("ip"),
            public_key: own,
            peers,
            rotate_requested: false,
            ungranted_routes: Vec::new(),
        };
        a.set_netmap(netmap(
            1,
            vec![
                netmap_peer("dock-edge", 51, &["192.168.1.20/32"]),
                netmap_peer(
                    "evil",
                    52,
                    &["127.0.0.0/8", "8.8.8.8/32", "1.1.1.0/24", "192.168.7.0/25"],
                ),
            ],
        ));
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        let routes = our_routes(&a);
        assert!(
            routes.contains(&"192.168.1.20/32".to_string()),
            "{routes:?}"
        );
        for refused in ["127.0.0.0/8", "8.8.8.8/32", "1.1.1.0/24", "192.168.7.0/25"] {
            assert!(!routes.contains(&refused.to_string()), "{refused} routed");
        }
        let evil = PrivateKey::from_bytes([52; 32]).public_key();
        let on_device = &a.wg.device.peers[&evil].allowed_ips;
        assert_eq!(
            on_device,
            &vec!["10.99.99.92/32".parse::<IpNet>().expect("net")]
        );
        let skipped: Vec<String> = a
            .status()
            .skipped_routes
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert!(
            skipped
                .iter()
                .any(|s| s.starts_with("127.0.0.0/8 from evil: overlaps 127.0.0.0/8 (loopback)")),
            "{skipped:?}"
        );
        assert!(
            skipped.iter().any(|s| s.starts_with(
                "192.168.7.0/25 from evil: overlaps this host's route 192.168.7.0/24 dev eth0"
            )),
            "{skipped:?}"
        );
        assert!(
            skipped
                .iter()
                .any(|s| s.starts_with("8.8.8.8/32 from evil: not opted in")),
            "{skipped:?}"
        );
        // A later netmap (a new host joins) still applies.
        a.set_netmap(netmap(
            2,
            vec![
                netmap_peer("dock-edge", 51, &["192.168.1.20/32"]),
                netmap_peer("evil", 52, &["127.0.0.0/8"]),
                netmap_peer("dock-new", 53, &[]),
            ],
        ));
        let r = a.reconcile(NOW).await;
        assert!(r.error.is_none(), "{r:?}");
        let new = PrivateKey::from_bytes([53; 32]).public_key();
        assert!(a.wg.device.peers.contains_key(&new));
        assert_eq!(a.status().skipped_routes.len(), 1);
    });
}

#[test]
fn a_clashing_first_state_applies_nothing() {
    block_on(async {
        let mut p = peer(1, None);
        p.spec
            .allowed_ips
            .push("10.43.0.0/24".parse().expect("net"));
        let mut a = agent(vec![p], Default::default());
        a.settings.routes.protected = vec!["10.43.0.0/16".parse().expect("net")];
        let r = a.reconcile(NOW).await;
        let err = r.error.expect("refused");
        assert!(err.contains("routes.protected 10.43.0.0/16"), "{err}");
        assert!(a.wg.device.peers.is_empty());
        assert!(a.link.routes.is_empty() && a.link.addresses.is_empty());
    });
}

#[test]
fn reconcile_removes_only_our_stale_routes_and_re_adds_deleted_ones() {
    block_on(async {
        let mut a = agent(vec![peer(1, None)], Default::default());
        let mut stale = foreign("192.168.50.0/24", "wgtest0");
        stale.protocol = mesh_proto::routes::RT_PROTO_MESHD;
        let admin = SystemRoute {
            protocol: 4,
            ..foreign("192.168.60.0/24", "wgtest0")
        };
        a.link.routes.push(stale);
        a.link.routes.push(admin.clone());
        a.reconcile(NOW).await;
        assert_eq!(our_routes(&a), vec!["10.99.99.0/24"]);
        assert!(
            a.link.routes.contains(&admin),
            "a foreign route on our interface stays"
        );
        // Someone deletes our route: the next pass puts it back.
        a.link.routes.retain(|r| !r.is_ours("wgtest0"));
        a.reconcile(NOW).await;
        assert_eq!(our_routes(&a), vec!["10.99.99.0/24"]);
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// From any starting device (random peers, some overlapping with the config), one pass
    /// converges to the config and the next pass plans nothing, even with injected
    /// failures on some peers (those are retried once the fault clears).
    #[test]
    fn converges_from_any_start(
        wanted in proptest::collection::btree_set(0u8..12, 0..6),
        present in proptest::collection::btree_set(0u8..12, 0..6),
        failing in proptest::collection::btree_set(0u8..12, 0..3),
        ka in proptest::option::of(1u16..60),
    ) {
        block_on(async {
            let mut start = mesh_proto::ObservedDevice::default();
            let ops: Vec<Op> = present.iter().map(|i| {
                let mut s = peer(*i, None).spec;
                s.endpoint = None;
                Op::AddPeer(s)
            }).collect();
            mesh_proto::plan::apply(&mut start, &ops);
            let peers: Vec<_> = wanted.iter().map(|i| peer(*i, ka)).collect();
            let mut a = agent(peers, start);
            a.wg.fail_peers = failing.iter().map(|i| peer(*i, None).spec.public_key).collect();
            let r = a.reconcile(NOW).await;
            let expected_failures = wanted.union(&present).filter(|i| failing.contains(i)).count();
            // Every op on a failing peer fails, and nothing else does.
            prop_assert!(r.failed.len() <= expected_failures, "{:?}", r);
            for (k, p) in &a.wg.device.peers {
                if !a.wg.fail_peers.contains(k) {
                    prop_assert_eq!(a.desired().peers.get(k).map(|d| &d.allowed_ips), Some(&p.allowed_ips));
                }
            }
            a.wg.fail_peers.clear();
            a.reconcile(NOW).await;
            let r = a.reconcile(NOW).await;
            prop_assert!(r.ops.is_empty(), "not converged: {:?}", r);
            let keys: Vec<_> = a.wg.device.peers.keys().copied().collect();
            let want: Vec<_> = a.desired().peers.keys().copied().collect();
            prop_assert_eq!(keys, want);
            Ok(())
        })?;
    }
}
