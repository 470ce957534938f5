//! Tests of the member side on the in-memory fakes: the desired device from netmap and static
//! peers, joins, restarts from the cache, netmaps queued around a rotation, key notices,
//! endpoint reports.

use std::net::IpAddr;

use ipnet::IpNet;

use super::*;
use crate::agent::desired::{desired_device, BOOTSTRAP_KEEPALIVE};
use crate::agent::tests::{peer, settings};
use crate::backend::{FakeBackend, FakeLink};
use crate::member::client::{Api, CallError};
use crate::member::join::join;
use mesh_proto::netmap::{EndpointCandidate, EndpointKind, NetmapPeer};
use mesh_proto::wire::api::{JoinRequest, JoinResponse};
use mesh_proto::wire::token::{Token, TokenBody};
use mesh_proto::PrivateKey;
use std::os::unix::fs::MetadataExt;

fn key(i: u8) -> PrivateKey {
    PrivateKey::from_bytes([i; 32])
}

fn netmap_peer(name: &str, i: u8, ip: &str, ep: &str) -> NetmapPeer {
    NetmapPeer {
        name: name.into(),
        address: ip.parse().expect("ip"),
        public_key: key(i).public_key(),
        allowed_ips: vec![format!("{ip}/32").parse().expect("net")],
        endpoints: vec![
            EndpointCandidate {
                addr: ep.parse().expect("ep"),
                kind: EndpointKind::Lan,
            },
            EndpointCandidate {
                addr: "203.0.113.9:40000".parse().expect("ep"),
                kind: EndpointKind::Observed,
            },
        ],
        persistent_keepalive: Some(25),
        static_peer: false,
        admin: false,
        key_created_unix: 1_700_000_000,
        next_public_key: None,
    }
}

fn netmap(own: &PrivateKey, version: u64, peers: Vec<NetmapPeer>) -> Netmap {
    Netmap {
        version,
        mesh_cidr: "10.99.99.0/24".parse().expect("net"),
        name: "dock-mirror".into(),
        address: "10.99.99.3".parse().expect("ip"),
        public_key: own.public_key(),
        peers,
        rotate_requested: false,
        ungranted_routes: Vec::new(),
    }
}

fn membership() -> Membership {
    Membership {
        host_name: "dock-mirror".into(),
        address: "10.99.99.3".parse().expect("ip"),
        mesh_cidr: "10.99.99.0/24".parse().expect("net"),
        coordinator_public_key: key(100).public_key(),
        coordinator_endpoints: vec!["192.0.2.1:51871".parse().expect("sa")],
        coordinator_address: "10.99.99.1".parse().expect("ip"),
        api_port: 51872,
        admin: false,
        joined_unix: 1,
    }
}

#[test]
fn netmap_and_static_peers_merge_and_the_config_wins() {
    let own = key(50);
    // Static peer-1 holds 10.99.99.11/32 with key [2;32].
    let s = settings(vec![peer(1, None)]);
    let static_key = peer(1, None).spec.public_key;
    let mut same_key = netmap_peer("dup", 2, "10.99.99.40", "192.168.1.40:51871");
    same_key.public_key = static_key;
    let overlap = netmap_peer("thief", 21, "10.99.99.11", "192.168.1.11:51871");
    let mut coord = netmap_peer("dock-load", 100, "10.99.99.1", "192.168.1.1:51871");
    coord.persistent_keepalive = None;
    let edge = netmap_peer("dock-edge", 22, "10.99.99.5", "192.168.1.5:51871");
    let me = netmap_peer("dock-mirror", 50, "10.99.99.3", "192.168.1.3:51871");
    let nm = netmap(&own, 4, vec![same_key, overlap, coord, edge, me]);
    let (spec, conflicts) = desired_device(
        &s,
        &own,
        Some(&membership()),
        Some(&nm),
        &Default::default(),
    );
    assert_eq!(conflicts.len(), 2, "{conflicts:?}");
    assert!(conflicts[0].contains("dup") && conflicts[1].contains("thief"));
    assert_eq!(spec.private_key, own);
    // static + dock-load + dock-edge; not ourselves, not the conflicting ones.
    assert_eq!(spec.peers.len(), 3, "{:?}", spec.peers.keys());
    assert_eq!(spec.peers[&static_key], peer(1, None).spec);
    let e = &spec.peers[&key(22).public_key()];
    assert_eq!(e.endpoint, Some("192.168.1.5:51871".parse().expect("sa")));
    assert_eq!(e.persistent_keepalive, Some(25));
    assert_eq!(
        e.allowed_ips,
        vec!["10.99.99.5/32".parse::<IpNet>().expect("net")]
    );
    let c = &spec.peers[&key(100).public_key()];
    assert_eq!(
        c.persistent_keepalive, None,
        "the netmap's coordinator entry is used"
    );

    // Without a netmap the coordinator comes from the membership.
    let (spec, _) = desired_device(&s, &own, Some(&membership()), None, &Default::default());
    assert_eq!(spec.peers.len(), 2);
    let c = &spec.peers[&key(100).public_key()];
    assert_eq!(c.endpoint, Some("192.0.2.1:51871".parse().expect("sa")));
    assert_eq!(c.persistent_keepalive, Some(BOOTSTRAP_KEEPALIVE));
}

#[test]
fn a_peers_next_key_is_accepted_but_routes_nothing() {
    let own = key(50);
    let s = settings(Vec::new());
    let mut edge = netmap_peer("dock-edge", 22, "10.99.99.5", "192.168.1.5:51871");
    edge.next_public_key = Some(key(23).public_key());
    let nm = netmap(&own, 4, vec![edge.clone()]);
    let (spec, _) = desired_device(&s, &own, None, Some(&nm), &Default::default());
    let old = &spec.peers[&key(22).public_key()];
    assert_eq!(
        old.allowed_ips,
        vec!["10.99.99.5/32".parse::<IpNet>().expect("net")]
    );
    let next = &spec.peers[&key(23).public_key()];
    assert!(next.allowed_ips.is_empty(), "no traffic before the commit");
    assert_eq!(next.endpoint, old.endpoint);
    // Committed: the next key holds the address, the old key is gone.
    edge.public_key = key(23).public_key();
    edge.next_public_key = None;
    let nm = netmap(&own, 5, vec![edge]);
    let (spec, _) = desired_device(&s, &own, None, Some(&nm), &Default::default());
    assert_eq!(spec.peers.len(), 1);
    assert!(!spec.peers[&key(23).public_key()].allowed_ips.is_empty());
}

fn unjoined(dir: &std::path::Path) -> Agent<FakeBackend, FakeLink> {
    let mut s = settings(Vec::new());
    s.host_name = None;
    s.address = None;
    s.private_key_file = dir.join("private.key");
    s.state_dir = dir.join("state");
    let wg = FakeBackend {
        absent: true,
        ..FakeBackend::default()
    };
    let link = FakeLink {
        underlay: vec![
            "192.168.1.3".parse().expect("ip"),
            "127.0.0.1".parse().expect("ip"),
        ],
        ..FakeLink::default()
    };
    Agent::new(wg, link, s, key(60))
}

fn token(expires_unix: u64) -> String {
    let body = TokenBody {
        invite_id: "00ff".into(),
        coordinator_public_key: key(100).public_key(),
        coordinator_endpoints: vec!["192.0.2.1:51871".parse().expect("sa")],
        coordinator_address: "10.99.99.1".parse().expect("ip"),
        api_port: 51872,
        mesh_cidr: "10.99.99.0/24".parse().expect("net"),
        host_name: "dock-mirror".into(),
        host_address: "10.99.99.3".parse().expect("ip"),
        throwaway_private_key: key(77).to_base64(),
        expires_unix,
        admin: false,
    };
    Token::sign(body, &[9; 32]).encode()
}

/// Answers a join like the coordinator would, or refuses it.
struct FakeApi {
    refuse: Option<CallError>,
    seen: std::sync::Mutex<Vec<(SocketAddr, JoinRequest)>>,
}

impl FakeApi {
    fn new(refuse: Option<CallError>) -> Self {
        FakeApi {
            refuse,
            seen: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl Api for FakeApi {
    fn join_deadline(&self) -> Duration {
        Duration::from_millis(600)
    }

    async fn join(
        &self,
        at: SocketAddr,
        signer: &client::Signer,
        req: &JoinRequest,
        _timeout: Duration,
    ) -> Result<JoinResponse, CallError> {
        // Signed with the token's throwaway key (never the host's new key).
        assert_ne!(signer.key(), req.public_key);
        self.seen.lock().expect("lock").push((at, req.clone()));
        if let Some(e) = &self.refuse {
            return Err(e.clone());
        }
        let mut nm = netmap(
            &key(0),
            3,
            vec![
                netmap_peer("dock-load", 100, "10.99.99.1", "192.0.2.1:51871"),
                netmap_peer("dock-edge", 22, "10.99.99.5", "192.168.1.5:51871"),
            ],
        );
        nm.public_key = req.public_key;
        Ok(JoinResponse { netmap: nm })
    }
}

fn far_future() -> u64 {
    now().as_secs() + 3600
}

#[tokio::test]
async fn join_switches_to_a_fresh_key_and_saves_the_membership() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = unjoined(dir.path());
    a.reconcile(now()).await;
    assert!(a.wg.absent, "an unjoined host leaves the interface alone");
    let st = StateDir::new(dir.path().join("state"));
    let api = FakeApi::new(None);
    let m = join(&mut a, &st, &token(far_future()), &api)
        .await
        .expect("join");
    assert_eq!(m.host_name, "dock-mirror");
    let seen = api.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    let (at, req) = &seen[0];
    assert_eq!(at.to_string(), "10.99.99.1:51872");
    assert_eq!(req.listen_port, 51871);
    assert_ne!(
        req.public_key,
        key(77).public_key(),
        "not the throwaway key"
    );
    assert_eq!(
        req.addresses,
        vec!["192.168.1.3".parse::<IpAddr>().expect("ip")]
    );
    // The interface runs with the new key and the netmap's peers.
    assert_eq!(a.wg.device.public_key, Some(req.public_key));
    assert_eq!(a.key().public_key(), req.public_key);
    assert_eq!(a.wg.device.peers.len(), 2);
    assert!(a
        .link
        .addresses
        .contains(&"10.99.99.3/24".parse().expect("net")));
    // Saved: key file (0600), membership, netmap.
    let key_path = dir.path().join("private.key");
    assert_eq!(
        std::fs::metadata(&key_path).expect("key").mode() & 0o777,
        0o600
    );
    let on_disk: PrivateKey = std::fs::read_to_string(&key_path)
        .expect("read")
        .trim()
        .parse()
        .expect("key");
    assert_eq!(on_disk.public_key(), req.public_key);
    assert_eq!(st.load_membership().expect("load"), Some(m));
    assert_eq!(st.load_netmap().expect("load").map(|n| n.version), Some(3));
    let status = a.status();
    assert_eq!(status.host_name.as_deref(), Some("dock-mirror"));
    assert_eq!(status.netmap_version, Some(3));
    // A second join is refused and changes nothing.
    let err = join(&mut a, &st, &token(far_future()), &api)
        .await
        .expect_err("already joined");
    assert!(err.message.contains("already a member"), "{err}");
}

#[tokio::test]
async fn a_refused_join_restores_everything_and_passes_the_reason_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = unjoined(dir.path());
    let st = StateDir::new(dir.path().join("state"));
    let before = a.key().clone();
    let api = FakeApi::new(Some(CallError::Refused {
        status: 410,
        message: "invitation for dock-mirror was already used".into(),
    }));
    let err = join(&mut a, &st, &token(far_future()), &api)
        .await
        .expect_err("refused");
    assert_eq!(err.message, "invitation for dock-mirror was already used");
    assert!(!err.retryable);
    assert!(a.link.deleted, "the interface the join created is deleted");
    assert!(a.link.addresses.is_empty());
    assert_eq!(a.key(), &before);
    assert_eq!(a.address(), None);
    assert!(a.membership().is_none());
    assert!(a.desired().peers.is_empty());
    assert!(!dir.path().join("private.key").exists());
    assert_eq!(st.load_membership().expect("load"), None);
    assert_eq!(st.load_netmap().expect("load"), None);
    // And the agent does not bring the interface back by itself.
    a.wg.absent = true;
    a.reconcile(now()).await;
    assert!(a.wg.absent);

    let api = FakeApi::new(Some(CallError::Unreachable {
        addr: "10.99.99.1:51872".parse().expect("sa"),
        message: "no answer within 10s".into(),
    }));
    let err = join(&mut a, &st, &token(far_future()), &api)
        .await
        .expect_err("unreachable");
    assert!(err.message.contains("another mesh"), "{err}");
    assert!(err.retryable);
}

#[tokio::test]
async fn bad_tokens_are_refused_before_touching_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = unjoined(dir.path());
    let st = StateDir::new(dir.path().join("state"));
    let api = FakeApi::new(None);
    let err = join(&mut a, &st, "hello", &api).await.expect_err("prefix");
    assert!(err.message.contains("invalid token"), "{err}");
    let err = join(&mut a, &st, "meshd1.@@@", &api)
        .await
        .expect_err("damaged");
    assert!(err.message.contains("invalid token"), "{err}");
    let err = join(&mut a, &st, &token(1000), &api)
        .await
        .expect_err("expired");
    assert!(err.message.contains("expired"), "{err}");
    assert!(api.seen.lock().expect("lock").is_empty());
    assert_eq!(a.wg.ensure_calls, 0);
    assert!(a.wg.absent);
}

#[tokio::test]
async fn restart_restores_the_mesh_from_the_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = StateDir::new(dir.path().join("state"));
    let own = key(60);
    // The cached netmap names the coordinator at an address nobody answers on.
    let mut m = membership();
    m.coordinator_address = "127.0.0.1".parse().expect("ip");
    m.api_port = 9; // discard: nothing listens
                    // Key notices are asked for there too (loopback: nothing leaves the machine).
    m.coordinator_endpoints = vec!["127.0.0.1:9".parse().expect("sa")];
    st.save_membership(&m).expect("save");
    let nm = netmap(
        &own,
        9,
        vec![netmap_peer(
            "dock-edge",
            22,
            "10.99.99.5",
            "192.168.1.5:51871",
        )],
    );
    st.save_netmap(&nm).expect("save");
    let mut a = unjoined(dir.path());
    let (tx, mut rx) = mpsc::channel(8);
    let mut rt = MemberRuntime::new(st.clone(), tx);
    rt.restore(&mut a).await;
    let r = a.reconcile(now()).await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(a.wg.device.peers.contains_key(&key(22).public_key()));
    assert!(a.wg.device.peers.contains_key(&key(100).public_key()));
    assert!(a
        .link
        .addresses
        .contains(&"10.99.99.3/24".parse().expect("net")));
    assert_eq!(a.status().netmap_version, Some(9));
    // The follower reports the coordinator unreachable; the netmap is kept.
    let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("event in time")
        .expect("event");
    assert!(matches!(ev, MeshEvent::Unreachable(_)), "{ev:?}");
    rt.on_event(&mut a, ev).await;
    assert_eq!(a.mesh_state().reachable, Some(false));
    assert_eq!(a.status().netmap_version, Some(9));
    // Unreachable: the host asks the coordinator's endpoint for key notices (nobody
    // answers here), in the background.
    let ev = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("event in time")
            .expect("event");
        if matches!(ev, MeshEvent::CoordinatorKey(_)) {
            break ev;
        }
    };
    assert!(matches!(ev, MeshEvent::CoordinatorKey(Err(_))), "{ev:?}");
    rt.on_event(&mut a, ev).await;
    // A newer netmap is applied at once and cached.
    let nm2 = netmap(&own, 10, Vec::new());
    rt.on_event(&mut a, MeshEvent::Netmap(Box::new(nm2))).await;
    assert!(!a.wg.device.peers.contains_key(&key(22).public_key()));
    assert_eq!(st.load_netmap().expect("load").map(|n| n.version), Some(10));
    assert_eq!(
        std::fs::metadata(st.netmap_path()).expect("meta").mode() & 0o777,
        0o600
    );
}

/// A rotation holds the loop while the follower queues the prepare's netmap (naming our
/// old key); the commit's reply already gave us a newer one. The queued one is skipped:
/// the device does not step back.
#[tokio::test]
async fn a_netmap_queued_before_our_rotation_is_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = StateDir::new(dir.path().join("state"));
    let mut a = unjoined(dir.path());
    a.set_membership(Some(membership()));
    let (old, new) = (key(61), key(62));
    a.set_key(new.clone());
    let (tx, _rx) = mpsc::channel(8);
    let mut rt = MemberRuntime::new(st.clone(), tx);
    let edge = netmap_peer("dock-edge", 22, "10.99.99.5", "192.168.1.5:51871");
    // The commit's reply, applied at the switch.
    let committed = netmap(&new, 10, vec![edge]);
    rt.on_event(&mut a, MeshEvent::Netmap(Box::new(committed)))
        .await;
    rt.policy.handle_rotation_ended(Some(10));
    // The prepare's netmap, queued behind the rotation.
    let stale = netmap(&old, 9, Vec::new());
    rt.on_event(&mut a, MeshEvent::Netmap(Box::new(stale)))
        .await;
    assert_eq!(a.status().netmap_version, Some(10));
    assert!(a.wg.device.peers.contains_key(&key(22).public_key()));
    // An older netmap naming the key we run is still the coordinator's word (a registry
    // restored from a backup): taken.
    let restored = netmap(&new, 8, Vec::new());
    rt.on_event(&mut a, MeshEvent::Netmap(Box::new(restored)))
        .await;
    assert_eq!(a.status().netmap_version, Some(8));
    assert!(!a.wg.device.peers.contains_key(&key(22).public_key()));
}

#[tokio::test]
async fn a_verified_key_notice_moves_the_coordinator_to_its_new_key_and_is_cached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = StateDir::new(dir.path().join("state"));
    let own = key(60);
    // A mesh on loopback, so the follower's calls (to 127.0.0.1:9) never leave the host.
    let mut m = membership();
    m.mesh_cidr = "127.0.0.0/8".parse().expect("net");
    m.address = "127.16.0.3".parse().expect("ip");
    m.coordinator_address = "127.0.0.1".parse().expect("ip");
    m.api_port = 9;
    m.coordinator_endpoints = vec!["127.0.0.1:9".parse().expect("sa")];
    st.save_membership(&m).expect("save");
    let mut coord = netmap_peer("dock-load", 100, "127.0.0.1", "127.0.0.1:9");
    coord.next_public_key = None;
    coord.endpoints.clear();
    let mut nm = netmap(&own, 9, vec![coord]);
    nm.mesh_cidr = m.mesh_cidr;
    nm.address = m.address;
    st.save_netmap(&nm).expect("save");
    let mut a = unjoined(dir.path());
    let (tx, _rx) = mpsc::channel(8);
    let mut rt = MemberRuntime::new(st.clone(), tx);
    rt.restore(&mut a).await;
    a.reconcile(now()).await;
    let old = key(100).public_key();
    let new = key(101).public_key();
    assert!(a.wg.device.peers.contains_key(&old));

    // A notice for a key we do not hold for the coordinator changes nothing.
    let other = key(102).public_key();
    rt.on_event(&mut a, MeshEvent::CoordinatorKey(Ok((other, new))))
        .await;
    assert!(a.wg.device.peers.contains_key(&old));

    rt.on_event(&mut a, MeshEvent::CoordinatorKey(Ok((old, new))))
        .await;
    assert!(a.wg.device.peers.contains_key(&new), "{:?}", a.wg.device);
    assert!(!a.wg.device.peers.contains_key(&old));
    let cached = st.load_netmap().expect("load").expect("netmap");
    assert_eq!(cached.peers[0].public_key, new);
    let saved = st.load_membership().expect("load").expect("membership");
    assert_eq!(saved.coordinator_public_key, new);
}

#[test]
fn endpoint_reports_leave_out_loopback_link_local_and_the_mesh() {
    let r = endpoint_report(
        51871,
        vec![
            "192.168.1.3".parse().expect("ip"),
            "127.0.0.1".parse().expect("ip"),
            "fe80::1".parse().expect("ip"),
            "10.99.99.3".parse().expect("ip"),
            "2001:db8::3".parse().expect("ip"),
            "192.168.1.3".parse().expect("ip"),
        ],
        Some("10.99.99.3/24".parse().expect("net")),
    );
    assert_eq!(
        r.addresses,
        vec![
            "192.168.1.3".parse::<IpAddr>().expect("ip"),
            "2001:db8::3".parse().expect("ip")
        ]
    );
}

/// A netmap long-poll parked when the key rotated comes back refused (the coordinator no
/// longer knows the key it was signed with): the follower asks again at once with the new
/// key and reports nothing, rather than calling the coordinator unreachable (status and the
/// alerting rules would show an error after every rotation).
#[tokio::test]
async fn a_poll_refused_because_the_key_rotated_meanwhile_is_asked_again_not_reported() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = listener.local_addr().expect("addr");
    let coordinator = key(100).public_key();
    let cell = client::SignerCell::default();
    cell.set(Some(
        client::Signer::new(&key(1), &coordinator).expect("signer"),
    ));
    let (tx, mut rx) = mpsc::channel(8);
    let follower = spawn_follower(api, cell.clone(), 0, tx);
    // The first request: the key rotates while it is parked, then the answer is a refusal.
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("first request in time")
        .expect("accept");
    let mut buf = [0u8; 4096];
    let _ = conn.read(&mut buf).await;
    cell.set(Some(
        client::Signer::new(&key(2), &coordinator).expect("signer"),
    ));
    conn.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    drop(conn);
    // Asked again at once (no back-off), and nothing reported meanwhile.
    let second = tokio::time::timeout(Duration::from_millis(900), listener.accept()).await;
    assert!(second.is_ok(), "the follower did not ask again at once");
    assert!(
        rx.try_recv().is_err(),
        "a refusal of a rotated-away key was reported"
    );
    // A refusal with the current key is real: reported.
    let (mut conn, _) = second.expect("in time").expect("accept");
    let _ = conn.read(&mut buf).await;
    conn.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    drop(conn);
    let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("event in time")
        .expect("event");
    assert!(
        matches!(ev, MeshEvent::KeyRefused { used, .. } if used == key(2).public_key()),
        "{ev:?}"
    );
    follower.abort();
}

/// The loop's side: a refusal of a key we no longer sign with (the coordinator committed our
/// rotation before we switched) leaves the coordinator reachable; a refusal of the key we
/// sign with now is what it says.
#[tokio::test]
async fn a_key_refusal_counts_only_for_the_key_signed_with_now() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = StateDir::new(dir.path().join("state"));
    let mut a = unjoined(dir.path());
    a.set_membership(Some(membership()));
    let (tx, _rx) = mpsc::channel(8);
    let mut rt = MemberRuntime::new(st, tx);
    rt.on_event(&mut a, MeshEvent::Reachable).await;
    let (old, new) = (key(61), key(62));
    a.set_key(new.clone());
    let refused = |k: &PrivateKey| MeshEvent::KeyRefused {
        used: k.public_key(),
        error: "HTTP 401".into(),
    };
    rt.on_event(&mut a, refused(&old)).await;
    assert_eq!(a.mesh_state().reachable, Some(true));
    assert!(a.mesh_state().last_error.is_none());
    rt.on_event(&mut a, refused(&new)).await;
    assert_eq!(a.mesh_state().reachable, Some(false));
    assert!(a.mesh_state().last_error.is_some());
}

/// After a restart the endpoint a peer's handshakes came from before is tried first (the
/// netmap's observed mapping is good towards the coordinator only behind a symmetric NAT);
/// once the hints' time is up without a handshake, the netmap's candidate comes back; and the
/// endpoints that carry handshakes are kept in the state directory for the next restart.
#[tokio::test]
async fn a_restart_tries_the_learned_endpoints_first_then_the_netmap() {
    use mesh_proto::learned::{Learned, LearnedEndpoints, HINT_GRACE};
    let dir = tempfile::tempdir().expect("tempdir");
    let st = StateDir::new(dir.path().join("state"));
    let own = key(60);
    st.save_membership(&membership()).expect("save");
    let nm = netmap(
        &own,
        9,
        vec![netmap_peer(
            "dock-laptop",
            22,
            "10.99.99.6",
            "192.168.2.10:51871",
        )],
    );
    st.save_netmap(&nm).expect("save");
    let laptop = key(22).public_key();
    let learned_at: SocketAddr = "198.51.100.101:40123".parse().expect("sa");
    let mut kept = LearnedEndpoints::default();
    kept.peers.insert(
        laptop,
        Learned {
            endpoint: learned_at,
            seen_unix: now().as_secs() - 60,
        },
    );
    st.save_learned(&kept).expect("save");
    let mut a = unjoined(dir.path());
    let (tx, _rx) = mpsc::channel(8);
    let mut rt = MemberRuntime::new(st.clone(), tx);
    rt.restore(&mut a).await;
    let t0 = now();
    a.reconcile(t0).await;
    assert_eq!(
        a.wg.device.peers[&laptop].endpoint,
        Some(learned_at),
        "the learned endpoint first"
    );
    // No handshake through it within the grace: the netmap's first candidate again.
    a.reconcile(t0 + HINT_GRACE + Duration::from_secs(1)).await;
    assert_eq!(
        a.wg.device.peers[&laptop].endpoint,
        Some("192.168.2.10:51871".parse().expect("sa"))
    );
    // A handshake from where the laptop's NAT maps it towards us now: kept on disk.
    let roamed: SocketAddr = "198.51.100.101:40999".parse().expect("sa");
    let t1 = t0 + HINT_GRACE + Duration::from_secs(5);
    if let Some(p) = a.wg.device.peers.get_mut(&laptop) {
        p.endpoint = Some(roamed);
        p.last_handshake = Some(t1 - Duration::from_secs(2));
    }
    a.reconcile(t1).await;
    let on_disk = st.load_learned().expect("read").expect("file");
    assert_eq!(on_disk.peers[&laptop].endpoint, roamed);
    assert_eq!(
        a.wg.device.peers[&laptop].endpoint,
        Some(roamed),
        "an endpoint with fresh handshakes stays"
    );
    // A damaged file is ignored (hints only), and a failed join's clear() removes it.
    std::fs::write(st.learned_path(), "{not json").expect("write");
    let mut b = unjoined(dir.path());
    let (tx, _rx) = mpsc::channel(8);
    MemberRuntime::new(st.clone(), tx).restore(&mut b).await;
    assert!(b.reconcile(now()).await.error.is_none());
    st.clear().expect("clear");
    assert!(!st.learned_path().exists());
}
