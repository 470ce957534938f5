//! Registry and API tests. The API tests run a real server on loopback: the mesh is
//! 127.16.0.0/16, so each simulated host connects from its own 127.16.x.y source address.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proto::wire::api::{
    EndpointReport, InviteRequest, JoinRequest, RotateRequest, RotateResponse, MAX_BODY,
};
use mesh_proto::wire::token::Token;
use mesh_proto::{PrivateKey, PublicKey};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

const NOW: u64 = 1_800_000_000;

fn settings(dir: &std::path::Path, cidr: &str, own: &str) -> CoordinatorSettings {
    CoordinatorSettings {
        mesh_cidr: cidr.parse().unwrap(),
        api_port: mesh_proto::wire::api::DEFAULT_API_PORT,
        public_endpoints: vec!["192.0.2.1:51871".parse().unwrap()],
        reserved: vec![],
        static_assignments: BTreeMap::new(),
        keepalive_secs: 25,
        database: dir.join("registry.sqlite"),
        own_name: "dock-load".into(),
        own_address: own.parse().unwrap(),
        own_public_key: PrivateKey::from_bytes([1; 32]).public_key(),
    }
}

fn open(dir: &std::path::Path) -> Coordinator {
    Coordinator::open(settings(dir, "10.99.99.0/24", "10.99.99.1"), NOW).unwrap()
}

fn invite(c: &Coordinator, name: &str) -> mesh_proto::wire::api::InviteResponse {
    c.invite(InviteRequest::host(name), NOW).unwrap()
}

fn join_req(token: &str, key: PublicKey) -> JoinRequest {
    JoinRequest {
        token: token.into(),
        public_key: key,
        listen_port: 51871,
        addresses: vec!["192.168.1.20".parse().unwrap()],
    }
}

/// Invite and join `name`; returns its address and key.
fn invite_join(c: &Coordinator, name: &str) -> (IpAddr, PrivateKey) {
    let inv = invite(c, name);
    let key = PrivateKey::generate();
    c.join(
        inv.address,
        join_req(inv.token.as_deref().unwrap(), key.public_key()),
        NOW + 1,
    )
    .unwrap();
    (inv.address, key)
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn fresh_database_migrates_and_reopen_keeps_data_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    assert!(c.version() >= 1);
    let (a, key) = invite_join(&c, "dock-mirror");
    let v = c.version();
    let hosts = c.hosts().unwrap();
    drop(c);

    let c = open(dir.path());
    assert_eq!(c.version(), v, "re-open without changes keeps the version");
    assert_eq!(c.hosts().unwrap(), hosts);
    let nm = c.netmap_for_address(a).unwrap().unwrap();
    assert_eq!(nm.public_key, key.public_key());
    {
        let conn = rusqlite::Connection::open(dir.path().join("registry.sqlite")).unwrap();
        let sv: u32 = conn
            .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sv as usize, super::schema::MIGRATIONS.len());
    }
    // A changed own key bumps the version, persisted across another re-open.
    let mut s = settings(dir.path(), "10.99.99.0/24", "10.99.99.1");
    s.own_public_key = PrivateKey::from_bytes([2; 32]).public_key();
    let c = Coordinator::open(s.clone(), NOW + 5).unwrap();
    assert_eq!(c.version(), v + 1);
    drop(c);
    let c = Coordinator::open(s, NOW + 6).unwrap();
    assert_eq!(c.version(), v + 1);
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let conn = rusqlite::Connection::open(dir.path().join("registry.sqlite")).unwrap();
    conn.execute("INSERT INTO schema_version (version) VALUES (999)", [])
        .unwrap();
    drop(conn);
    let err = Coordinator::open(settings(dir.path(), "10.99.99.0/24", "10.99.99.1"), NOW)
        .err()
        .unwrap();
    assert!(err.to_string().contains("newer"), "{err}");
}

#[test]
fn allocation_never_reuses_after_remove_or_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (a, _) = invite_join(&c, "a");
    assert_eq!(a, addr("10.99.99.2"));
    c.remove("a", NOW + 2).unwrap();
    let b = invite(&c, "b");
    assert_eq!(b.address, addr("10.99.99.3"));
    c.revoke_invite("b", NOW + 3).unwrap();
    let a2 = invite(&c, "a");
    assert_eq!(
        a2.address,
        addr("10.99.99.4"),
        "removed and revoked addresses stay reserved"
    );
    // Asking for a used address explicitly is refused.
    let err = c
        .invite(
            InviteRequest {
                name: "x".into(),
                address: Some(addr("10.99.99.2")),
                ttl_secs: None,
                admin: false,
                static_peer: false,
                public_key: None,
                endpoint: None,
                near: None,
            },
            NOW,
        )
        .unwrap_err();
    assert_eq!(err.http_status(), 409, "{err}");
}

#[test]
fn static_assignments_and_reserved_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), "10.99.99.0/24", "10.99.99.1");
    s.reserved = vec!["10.99.99.2/31".parse().unwrap()];
    s.static_assignments
        .insert("nas".into(), addr("10.99.99.4"));
    let c = Coordinator::open(s, NOW).unwrap();
    assert_eq!(invite(&c, "one").address, addr("10.99.99.5"));
    assert_eq!(invite(&c, "nas").address, addr("10.99.99.4"));
}

#[test]
fn invite_join_happy_path() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let v0 = c.version();
    let inv = invite(&c, "dock-mirror");
    assert!(c.version() > v0);
    let token = Token::decode(inv.token.as_deref().unwrap()).unwrap();
    let throwaway = token.throwaway_public_key().unwrap();
    assert_eq!(token.body.host_address, inv.address);
    assert_eq!(token.body.coordinator_address, addr("10.99.99.1"));
    // Pending: in the netmaps with the throwaway key, listed as a pending invitation.
    let snap = c.snapshot().unwrap();
    let pending = snap.hosts.iter().find(|h| h.name == "dock-mirror").unwrap();
    assert_eq!(pending.public_key, throwaway);
    assert_eq!(c.invites(NOW).unwrap().len(), 1);
    assert!(!c.is_admin(inv.address));

    let key = PrivateKey::generate();
    let resp = c
        .join(
            inv.address,
            join_req(inv.token.as_deref().unwrap(), key.public_key()),
            NOW + 10,
        )
        .unwrap();
    assert_eq!(resp.netmap.name, "dock-mirror");
    assert_eq!(resp.netmap.public_key, key.public_key());
    assert!(resp.netmap.peers.iter().any(|p| p.name == "dock-load"));
    let snap = c.snapshot().unwrap();
    assert!(
        snap.hosts.iter().all(|h| h.public_key != throwaway),
        "throwaway key is dead"
    );
    let host = snap.hosts.iter().find(|h| h.name == "dock-mirror").unwrap();
    assert_eq!(
        host.reported,
        vec!["192.168.1.20:51871".parse::<SocketAddr>().unwrap()]
    );
    let coord_nm = c.netmap_for_name("dock-load").unwrap().unwrap();
    let peer = coord_nm
        .peers
        .iter()
        .find(|p| p.name == "dock-mirror")
        .unwrap();
    assert_eq!(peer.public_key, key.public_key());
    assert!(c.invites(NOW + 10).unwrap().is_empty());
    let actions: Vec<String> = c.audit_log().unwrap().into_iter().map(|a| a.1).collect();
    assert_eq!(actions, vec!["coordinator", "invite", "join"]);
    // The name is now taken.
    let err = c
        .invite(InviteRequest::host("dock-mirror"), NOW)
        .unwrap_err();
    assert_eq!(err.http_status(), 409);
}

/// Assert that `f` fails with `status` and a message containing `text`, and that the
/// registry and version did not change.
fn refused(c: &Coordinator, status: u16, text: &str, f: impl FnOnce() -> Result<(), CoordError>) {
    let before = c.snapshot().unwrap();
    let hosts_before = c.hosts().unwrap();
    let err = f().unwrap_err();
    assert_eq!(err.http_status(), status, "{err}");
    assert!(err.to_string().contains(text), "{err:?} lacks {text:?}");
    assert_eq!(c.snapshot().unwrap(), before);
    assert_eq!(c.hosts().unwrap(), hosts_before);
}

#[test]
fn bad_tokens_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let key = PrivateKey::generate().public_key();

    // Reused.
    let inv = invite(&c, "dock-mirror");
    let tok = inv.token.clone().unwrap();
    c.join(inv.address, join_req(&tok, key), NOW + 1).unwrap();
    let other = PrivateKey::generate().public_key();
    refused(
        &c,
        410,
        "invitation for dock-mirror was already used",
        || {
            c.join(inv.address, join_req(&tok, other), NOW + 2)
                .map(|_| ())
        },
    );

    // Expired.
    let inv = c
        .invite(
            InviteRequest {
                name: "late".into(),
                address: None,
                ttl_secs: Some(60),
                admin: false,
                static_peer: false,
                public_key: None,
                endpoint: None,
                near: None,
            },
            NOW,
        )
        .unwrap();
    let tok = inv.token.clone().unwrap();
    refused(&c, 410, "invitation for late has expired", || {
        c.join(inv.address, join_req(&tok, other), NOW + 61)
            .map(|_| ())
    });

    // Tampered: another address in the body, the original MAC.
    let inv = invite(&c, "edge");
    let t = Token::decode(inv.token.as_deref().unwrap()).unwrap();
    let mut body = t.body.clone();
    body.host_address = addr("10.99.99.200");
    body.admin = true;
    let forged = Token {
        signed: serde_json::to_vec(&body).unwrap(),
        body,
        mac: t.mac,
    }
    .encode();
    refused(&c, 403, "tampered", || {
        c.join(addr("10.99.99.200"), join_req(&forged, other), NOW + 1)
            .map(|_| ())
    });

    // Foreign: signed by another coordinator's secret.
    let foreign = Token::sign(t.body.clone(), &[42u8; 32]).encode();
    refused(&c, 403, "tampered", || {
        c.join(inv.address, join_req(&foreign, other), NOW + 1)
            .map(|_| ())
    });

    // Garbage.
    refused(&c, 400, "not a meshd invitation token", || {
        c.join(inv.address, join_req("hello", other), NOW + 1)
            .map(|_| ())
    });

    // From the wrong address.
    refused(&c, 403, "must come from its invited address", || {
        c.join(
            addr("10.99.99.1"),
            join_req(inv.token.as_deref().unwrap(), other),
            NOW + 1,
        )
        .map(|_| ())
    });

    // With a key another host holds.
    refused(&c, 409, "already registered", || {
        c.join(
            inv.address,
            join_req(inv.token.as_deref().unwrap(), key),
            NOW + 1,
        )
        .map(|_| ())
    });

    // Revoked: the revoke itself changes the registry, the join after it does not.
    c.revoke_invite("edge", NOW + 2).unwrap();
    assert!(c.snapshot().unwrap().hosts.iter().all(|h| h.name != "edge"));
    refused(&c, 410, "invitation for edge was revoked", || {
        c.join(
            inv.address,
            join_req(inv.token.as_deref().unwrap(), other),
            NOW + 3,
        )
        .map(|_| ())
    });
    refused(&c, 404, "no pending invitation for edge", || {
        c.revoke_invite("edge", NOW + 3)
    });
}

#[test]
fn expired_invitations_leave_the_netmaps() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let inv = c
        .invite(
            InviteRequest {
                name: "late".into(),
                address: None,
                ttl_secs: Some(60),
                admin: false,
                static_peer: false,
                public_key: None,
                endpoint: None,
                near: None,
            },
            NOW,
        )
        .unwrap();
    assert!(c.invites(NOW + 59).unwrap().len() == 1);
    assert!(c.invites(NOW + 60).unwrap().is_empty());
    assert_eq!(c.expire_invites(NOW + 60).unwrap(), 1);
    assert!(c.snapshot().unwrap().hosts.iter().all(|h| h.name != "late"));
    // The name is free again, the address is not.
    assert_ne!(invite(&c, "late").address, inv.address);
}

#[test]
fn remove_hides_the_host_and_refuses_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (a, key) = invite_join(&c, "dock-mirror");
    let (_b, _) = invite_join(&c, "dock-edge");
    let v = c.version();
    c.remove("dock-mirror", NOW + 5).unwrap();
    assert!(c.version() > v);
    let snap = c.snapshot().unwrap();
    assert!(snap
        .hosts
        .iter()
        .all(|h| h.address != a && h.public_key != key.public_key()));
    assert!(c.netmap_for_name("dock-mirror").unwrap().is_none());
    assert!(c.netmap_for_address(a).unwrap().is_none());
    for name in ["dock-load", "dock-edge"] {
        let nm = c.netmap_for_name(name).unwrap().unwrap();
        assert!(nm
            .peers
            .iter()
            .all(|p| p.address != a && p.public_key != key.public_key()));
    }
    assert_eq!(c.remove("dock-mirror", NOW).unwrap_err().http_status(), 404);
    assert_eq!(c.remove("dock-load", NOW).unwrap_err().http_status(), 409);
    assert!(c
        .hosts()
        .unwrap()
        .iter()
        .any(|h| h.name == "dock-mirror" && h.removed));
    // Its key is refused for a new host.
    let inv = invite(&c, "again");
    refused(&c, 409, "removed host dock-mirror", || {
        c.join(
            inv.address,
            join_req(inv.token.as_deref().unwrap(), key.public_key()),
            NOW + 6,
        )
        .map(|_| ())
    });
    // It cannot report endpoints any more.
    let err = c
        .report_endpoints(
            a,
            "198.51.100.1:1".parse().unwrap(),
            EndpointReport {
                listen_port: 51871,
                addresses: vec![],
                advertise: vec![],
            },
            NOW,
        )
        .unwrap_err();
    assert_eq!(err.http_status(), 403);
}

#[test]
fn removing_a_pending_host_kills_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let inv = invite(&c, "dock-mirror");
    c.remove("dock-mirror", NOW + 1).unwrap();
    let key = PrivateKey::generate().public_key();
    refused(&c, 410, "revoked", || {
        c.join(
            inv.address,
            join_req(inv.token.as_deref().unwrap(), key),
            NOW + 2,
        )
        .map(|_| ())
    });
}

#[test]
fn endpoint_reports_bump_only_on_change() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (a, _) = invite_join(&c, "dock-mirror");
    let report = EndpointReport {
        listen_port: 51871,
        addresses: vec![addr("192.168.1.20"), addr("127.0.0.1"), addr("10.99.99.2")],
        advertise: vec![],
    };
    let obs: SocketAddr = "203.0.113.5:40000".parse().unwrap();
    let v = c.version();
    c.report_endpoints(a, obs, report.clone(), NOW + 2).unwrap();
    assert_eq!(c.version(), v + 1, "observed address is new");
    c.report_endpoints(a, obs, report.clone(), NOW + 3).unwrap();
    assert_eq!(c.version(), v + 1, "nothing changed");
    let h = c
        .hosts()
        .unwrap()
        .into_iter()
        .find(|h| h.name == "dock-mirror")
        .unwrap();
    assert_eq!(h.last_seen_unix, Some(NOW + 3));
    assert_eq!(h.observed, Some(obs));
    let snap = c.snapshot().unwrap();
    let rec = snap.hosts.iter().find(|h| h.name == "dock-mirror").unwrap();
    assert_eq!(
        rec.reported,
        vec!["192.168.1.20:51871".parse::<SocketAddr>().unwrap()],
        "loopback and mesh addresses are no endpoints"
    );
    let mut moved = report.clone();
    moved.addresses = vec![addr("192.168.7.7")];
    c.report_endpoints(a, obs, moved, NOW + 4).unwrap();
    assert_eq!(c.version(), v + 2);
    let err = c
        .report_endpoints(addr("10.99.99.77"), obs, report, NOW)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "10.99.99.77 is not a joined host of this mesh"
    );
}

#[test]
fn advertised_subnets_reach_the_netmaps_only_once_approved() {
    use mesh_proto::routes::{RouteDecision, RouteState};
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (edge, _) = invite_join(&c, "dock-edge");
    let (mirror, _) = invite_join(&c, "dock-mirror");
    let obs: SocketAddr = "203.0.113.5:40000".parse().unwrap();
    let report = |advertise: &[&str]| EndpointReport {
        listen_port: 51871,
        addresses: vec![addr("192.168.1.4")],
        advertise: advertise.iter().map(|s| s.parse().unwrap()).collect(),
    };
    let nas: ipnet::IpNet = "192.168.1.20/32".parse().unwrap();
    let edge_extra = |c: &Coordinator| {
        let snap = c.snapshot().unwrap();
        snap.hosts
            .iter()
            .find(|h| h.name == "dock-edge")
            .unwrap()
            .extra_allowed_ips
            .clone()
    };
    c.report_endpoints(edge, obs, report(&["192.168.1.20/32"]), NOW + 2)
        .unwrap();
    // Advertised: pending, in no netmap.
    assert!(edge_extra(&c).is_empty());
    let routes = c.routes().unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(
        (
            routes[0].host.as_str(),
            routes[0].prefix,
            routes[0].state,
            routes[0].advertised
        ),
        ("dock-edge", nas, RouteState::Pending, true)
    );
    // Approved: in the other hosts' netmaps, with a new version.
    let v = c.version();
    let info = c
        .decide_route("dock-edge", nas, RouteDecision::Approve, NOW + 3)
        .unwrap();
    assert_eq!(info.state, RouteState::Approved);
    assert_eq!(c.version(), v + 1);
    assert_eq!(edge_extra(&c), vec![nas]);
    let nm = c.netmap_for_name("dock-mirror").unwrap().unwrap();
    let peer = nm
        .peers
        .into_iter()
        .find(|p| p.name == "dock-edge")
        .unwrap();
    assert!(peer.allowed_ips.contains(&nas), "{:?}", peer.allowed_ips);
    // Approving again changes nothing.
    c.decide_route("dock-edge", nas, RouteDecision::Approve, NOW + 4)
        .unwrap();
    assert_eq!(c.version(), v + 1);
    // The same report again: no new version.
    c.report_endpoints(edge, obs, report(&["192.168.1.20/32"]), NOW + 3)
        .unwrap();
    assert_eq!(c.version(), v + 1);
    // Another host may advertise the same space (its report goes through: endpoints must
    // never be blocked by a prefix), but an approval of it is refused while dock-edge's holds.
    c.report_endpoints(mirror, obs, report(&["192.168.1.0/24"]), NOW + 4)
        .unwrap();
    let err = c
        .decide_route(
            "dock-mirror",
            "192.168.1.0/24".parse().unwrap(),
            RouteDecision::Approve,
            NOW + 4,
        )
        .unwrap_err();
    assert_eq!(err.http_status(), 409);
    assert!(err.to_string().contains("approved for dock-edge"), "{err}");
    // Unknown prefix, unknown host, host bits: refused, nothing changes.
    let v = c.version();
    for (host, prefix, status) in [
        ("dock-edge", "8.8.8.8/32", 404),
        ("nobody", "8.8.8.8/32", 404),
        ("dock-edge", "192.168.1.20/24", 400),
    ] {
        let err = c
            .decide_route(
                host,
                prefix.parse().unwrap(),
                RouteDecision::Approve,
                NOW + 5,
            )
            .unwrap_err();
        assert_eq!(err.http_status(), status, "{host} {prefix}: {err}");
    }
    assert_eq!(c.version(), v);
    // The mesh and /0 are refused in reports.
    for bad in ["0.0.0.0/0", "10.99.99.0/25"] {
        assert!(
            c.report_endpoints(mirror, obs, report(&[bad]), NOW + 4)
                .is_err(),
            "{bad}"
        );
    }
    // Withdrawn: gone from the netmaps; the approval stays and applies when it comes back.
    c.report_endpoints(edge, obs, report(&[]), NOW + 5).unwrap();
    assert!(edge_extra(&c).is_empty());
    let listed = c.routes().unwrap();
    assert!(listed
        .iter()
        .any(|r| r.host == "dock-edge" && r.state == RouteState::Approved && !r.advertised));
    c.report_endpoints(edge, obs, report(&["192.168.1.20/32"]), NOW + 6)
        .unwrap();
    assert_eq!(edge_extra(&c), vec![nas]);
    // Revoked: out of the netmaps, and it stays out when advertised again.
    let v = c.version();
    c.decide_route("dock-edge", nas, RouteDecision::Revoke, NOW + 7)
        .unwrap();
    assert_eq!(c.version(), v + 1);
    assert!(edge_extra(&c).is_empty());
    c.report_endpoints(edge, obs, report(&[]), NOW + 8).unwrap();
    c.report_endpoints(edge, obs, report(&["192.168.1.20/32"]), NOW + 9)
        .unwrap();
    assert!(edge_extra(&c).is_empty());
    // Now dock-mirror's /24 can be approved; decisions survive a restart.
    c.decide_route(
        "dock-mirror",
        "192.168.1.0/24".parse().unwrap(),
        RouteDecision::Approve,
        NOW + 10,
    )
    .unwrap();
    let before = c.routes().unwrap();
    drop(c);
    let c = open(dir.path());
    assert_eq!(c.routes().unwrap(), before);
}

/// The coordinator host's own routes.advertise (it reports to no API) is pending like any
/// other host's.
#[test]
fn the_coordinators_own_advertisement_is_pending_too() {
    use mesh_proto::routes::{RouteDecision, RouteState};
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    invite_join(&c, "dock-mirror");
    let lan: ipnet::IpNet = "192.168.9.0/24".parse().unwrap();
    assert!(c.advertise_own(&[lan], NOW).unwrap());
    assert!(!c.advertise_own(&[lan], NOW + 1).unwrap(), "unchanged");
    let own = c.settings().own_name.clone();
    let listed = c.routes().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].host.as_str(), listed[0].state),
        (own.as_str(), RouteState::Pending)
    );
    let nm = c.netmap_for_name("dock-mirror").unwrap().unwrap();
    assert!(nm.peers.iter().all(|p| !p.allowed_ips.contains(&lan)));
    c.decide_route(&own, lan, RouteDecision::Approve, NOW + 2)
        .unwrap();
    let nm = c.netmap_for_name("dock-mirror").unwrap().unwrap();
    assert!(nm.peers.iter().any(|p| p.allowed_ips.contains(&lan)));
    for bad in ["0.0.0.0/0", "10.99.99.0/25", "192.168.9.1/24"] {
        let net: ipnet::IpNet = bad.parse().unwrap();
        assert!(c.advertise_own(&[net], NOW + 3).is_err(), "{bad}");
    }
    // The host itself learns what is not granted.
    assert!(c
        .advertise_own(&[lan, "192.168.10.0/24".parse().unwrap()], NOW + 4)
        .unwrap());
    let mine = c.netmap_for_name(&own).unwrap().unwrap();
    assert_eq!(
        mine.ungranted_routes,
        vec!["192.168.10.0/24".parse::<ipnet::IpNet>().unwrap()]
    );
}

/// A registry from before route approvals (schema 6) with an advertised prefix: the hosts keep
/// names, addresses and keys; the prefix is pending (out of the netmaps) until approved.
#[test]
fn prefixes_advertised_before_the_upgrade_are_pending() {
    use mesh_proto::routes::RouteState;
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (edge, key) = invite_join(&c, "dock-edge");
    let hosts = c.hosts().unwrap();
    drop(c);
    {
        // Back to schema 6, as an older meshd left it: the prefix in hosts.advertise.
        let conn = rusqlite::Connection::open(dir.path().join("registry.sqlite")).unwrap();
        conn.execute_batch(
            "DROP TABLE route_decisions;
             DELETE FROM schema_version WHERE version > 6;
             UPDATE hosts SET advertise = '192.168.1.20/32' WHERE name = 'dock-edge';",
        )
        .unwrap();
    }
    let c = open(dir.path());
    assert_eq!(c.hosts().unwrap(), hosts);
    let nm = c.netmap_for_address(edge).unwrap().unwrap();
    assert_eq!(nm.public_key, key.public_key());
    let routes = c.routes().unwrap();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].state, RouteState::Pending);
    let snap = c.snapshot().unwrap();
    assert!(snap.hosts.iter().all(|h| h.extra_allowed_ips.is_empty()));
}

#[test]
fn static_peer_gets_a_wg_quick_config_and_appears_in_netmaps() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    invite_join(&c, "dock-mirror");
    let resp = c
        .invite(
            InviteRequest {
                name: "nas".into(),
                address: None,
                ttl_secs: None,
                admin: false,
                static_peer: true,
                public_key: None,
                endpoint: None,
                near: None,
            },
            NOW,
        )
        .unwrap();
    assert!(resp.token.is_none());
    let conf = resp.wg_quick_config.unwrap();
    assert!(
        conf.contains(&format!("Address = {}/24", resp.address)),
        "{conf}"
    );
    assert!(conf.contains("PrivateKey = "), "{conf}");
    assert_eq!(conf.matches("[Peer]").count(), 2, "{conf}");
    assert!(conf.contains("Endpoint = 192.0.2.1:51871"), "{conf}");
    assert!(conf.contains("AllowedIPs = 10.99.99.1/32"), "{conf}");
    assert!(conf.contains("PersistentKeepalive = 25"), "{conf}");
    let nm = c.netmap_for_name("dock-mirror").unwrap().unwrap();
    assert!(nm.peers.iter().any(|p| p.name == "nas" && p.static_peer));

    // With a supplied key: no private key in the config.
    let k = PrivateKey::generate().public_key();
    let resp = c
        .invite(
            InviteRequest {
                name: "printer".into(),
                address: None,
                ttl_secs: None,
                admin: false,
                static_peer: true,
                public_key: Some(k),
                endpoint: None,
                near: None,
            },
            NOW,
        )
        .unwrap();
    let conf = resp.wg_quick_config.unwrap();
    assert!(!conf.contains("\nPrivateKey = "), "{conf}");
    assert_eq!(
        c.netmap_for_address(resp.address)
            .unwrap()
            .unwrap()
            .public_key,
        k
    );
}

fn invite_static_near(
    c: &Coordinator,
    name: &str,
    endpoint: Option<&str>,
    near: Option<&str>,
) -> Result<mesh_proto::wire::api::InviteResponse, CoordError> {
    c.invite(
        InviteRequest {
            name: name.into(),
            address: None,
            ttl_secs: None,
            admin: false,
            static_peer: true,
            public_key: None,
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            near: near.map(String::from),
        },
        NOW,
    )
}

/// Join `name` and report it behind the NAT at 198.51.100.100, at `lan`:51871.
fn join_behind_nat(c: &Coordinator, name: &str, lan: &str, nat_port: u16) -> IpAddr {
    let (a, _) = invite_join(c, name);
    c.report_endpoints(
        a,
        SocketAddr::new(addr("198.51.100.100"), nat_port),
        EndpointReport {
            listen_port: 51871,
            addresses: vec![addr(lan)],
            advertise: vec![],
        },
        NOW + 2,
    )
    .unwrap();
    a
}

fn nas_endpoints(c: &Coordinator, from: &str) -> Vec<mesh_proto::netmap::EndpointCandidate> {
    let nm = c.netmap_for_name(from).unwrap().unwrap();
    nm.peers
        .into_iter()
        .find(|p| p.name == "nas")
        .unwrap()
        .endpoints
}

#[test]
fn static_peer_near_a_host_behind_the_same_nat() {
    use mesh_proto::netmap::{EndpointCandidate, EndpointKind};
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let mirror = join_behind_nat(&c, "dock-mirror", "192.168.1.3", 40001);
    join_behind_nat(&c, "dock-edge", "192.168.1.4", 40002);
    let resp =
        invite_static_near(&c, "nas", Some("192.168.1.20:51820"), Some("dock-mirror")).unwrap();
    let conf = resp.wg_quick_config.unwrap();
    // The NAS's config: LAN neighbours at their LAN addresses, the coordinator at its public one.
    for (name, ep) in [
        ("dock-edge", "192.168.1.4:51871"),
        ("dock-load", "192.0.2.1:51871"),
        ("dock-mirror", "192.168.1.3:51871"),
    ] {
        let section = conf.split("\n# ").find(|s| s.starts_with(name)).unwrap();
        assert!(section.contains(&format!("Endpoint = {ep}\n")), "{conf}");
        assert!(section.contains("PersistentKeepalive = 25"), "{conf}");
    }
    assert!(!conf.contains("198.51.100.100"), "{conf}");
    assert!(conf.contains("\nListenPort = 51820\n"), "{conf}");
    // The neighbours reach the NAS on the LAN; the coordinator (not behind that NAT) gets no
    // endpoint: it learns the NAS's address from its keepalives.
    let lan = vec![EndpointCandidate {
        addr: "192.168.1.20:51820".parse().unwrap(),
        kind: EndpointKind::Lan,
    }];
    assert_eq!(nas_endpoints(&c, "dock-mirror"), lan);
    assert_eq!(nas_endpoints(&c, "dock-edge"), lan);
    assert_eq!(nas_endpoints(&c, "dock-load"), vec![]);
    let nm = c.netmap_for_name("dock-edge").unwrap().unwrap();
    let nas = nm.peers.iter().find(|p| p.name == "nas").unwrap();
    assert_eq!(nas.persistent_keepalive, Some(25));
    assert!(c
        .audit_log()
        .unwrap()
        .iter()
        .any(|(_, action, subject, detail)| action == "static_peer"
            && subject == "nas"
            && detail.contains("endpoint 192.168.1.20:51820, near dock-mirror")));

    // Kept across a restart (migration 2 holds `near`).
    drop(c);
    let c = open(dir.path());
    assert_eq!(nas_endpoints(&c, "dock-edge"), lan);

    // The marker follows the neighbour: dock-mirror moves to another NAT (version bump).
    let v = c.version();
    c.report_endpoints(
        mirror,
        "203.0.113.7:1000".parse().unwrap(),
        EndpointReport {
            listen_port: 51871,
            addresses: vec![addr("192.168.1.3")],
            advertise: vec![],
        },
        NOW + 3,
    )
    .unwrap();
    assert_eq!(c.version(), v + 1);
    assert_eq!(nas_endpoints(&c, "dock-mirror"), lan);
    assert_eq!(nas_endpoints(&c, "dock-edge"), vec![]);
}

#[test]
fn bad_static_endpoints_and_neighbours_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    join_behind_nat(&c, "dock-mirror", "192.168.1.3", 40001);
    invite_static_near(&c, "printer", None, None).unwrap();
    refused(&c, 404, "nobody", || {
        invite_static_near(&c, "nas", None, Some("nobody")).map(|_| ())
    });
    refused(&c, 400, "static peer cannot mark", || {
        invite_static_near(&c, "nas", None, Some("printer")).map(|_| ())
    });
    refused(&c, 400, "near itself", || {
        invite_static_near(&c, "nas", None, Some("nas")).map(|_| ())
    });
    for bad in [
        "192.168.1.20:0",
        "10.99.99.9:51820",
        "127.0.0.1:51820",
        "0.0.0.0:1",
    ] {
        refused(&c, 400, "unusable", || {
            invite_static_near(&c, "nas", Some(bad), None).map(|_| ())
        });
    }
    refused(&c, 400, "only for static peers", || {
        c.invite(
            InviteRequest {
                name: "laptop".into(),
                address: None,
                ttl_secs: None,
                admin: false,
                static_peer: false,
                public_key: None,
                endpoint: Some("192.168.1.20:51820".parse().unwrap()),
                near: None,
            },
            NOW,
        )
        .map(|_| ())
    });
    // A public endpoint without a neighbour is offered to everyone.
    invite_static_near(&c, "nas", Some("203.0.113.20:51820"), None).unwrap();
    for from in ["dock-load", "dock-mirror"] {
        let eps = nas_endpoints(&c, from);
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].addr, "203.0.113.20:51820".parse().unwrap());
    }
}

#[test]
fn admin_flag_and_own_key_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    assert!(c.is_admin(addr("10.99.99.1")));
    let inv = c
        .invite(
            InviteRequest {
                name: "laptop".into(),
                address: None,
                ttl_secs: None,
                admin: true,
                static_peer: false,
                public_key: None,
                endpoint: None,
                near: None,
            },
            NOW,
        )
        .unwrap();
    assert!(!c.is_admin(inv.address), "not before the join");
    c.join(
        inv.address,
        join_req(
            inv.token.as_deref().unwrap(),
            PrivateKey::generate().public_key(),
        ),
        NOW + 1,
    )
    .unwrap();
    assert!(c.is_admin(inv.address));
    let (plain, _) = invite_join(&c, "plain");
    assert!(!c.is_admin(plain));
    let v = c.version();
    let k = PrivateKey::generate().public_key();
    c.set_own_public_key(k, NOW + 2).unwrap();
    assert_eq!(c.version(), v + 1);
    c.set_own_public_key(k, NOW + 3).unwrap();
    assert_eq!(c.version(), v + 1);
    assert_eq!(
        c.netmap_for_name("dock-load").unwrap().unwrap().public_key,
        k
    );
}

/// A whole rotation of `caller`'s key, as a member's meshd makes it: prepare, then commit.
fn prepare_commit(
    c: &Coordinator,
    caller: IpAddr,
    req: RotateRequest,
    now_unix: u64,
) -> Result<RotateResponse, CoordError> {
    c.prepare_rotation(caller, req.clone(), now_unix)?;
    c.commit_rotation(caller, req, now_unix)
}

fn rotate(key: PublicKey) -> RotateRequest {
    RotateRequest { public_key: key }
}

fn host_info(c: &Coordinator, name: &str) -> mesh_proto::wire::api::HostInfo {
    c.hosts()
        .unwrap()
        .into_iter()
        .find(|h| h.name == name)
        .unwrap()
}

fn key_created(c: &Coordinator, name: &str) -> u64 {
    c.snapshot()
        .unwrap()
        .hosts
        .iter()
        .find(|h| h.name == name)
        .unwrap()
        .key_created_unix
}

#[test]
fn a_rotation_replaces_the_key_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (a, old) = invite_join(&c, "dock-mirror");
    let (b, _) = invite_join(&c, "dock-edge");
    let v = c.version();
    let new_key = PrivateKey::generate().public_key();
    let resp = prepare_commit(&c, a, rotate(new_key), NOW + 100).unwrap();
    // One version for the prepare (peers learn the next key), one for the commit.
    assert_eq!(c.version(), v + 2);
    assert_eq!(resp.netmap.public_key, new_key);
    assert_eq!(resp.netmap.version, v + 2);
    assert_eq!(resp.netmap, c.netmap_for_address(a).unwrap().unwrap());
    // Every other host's netmap (the registry's view of the coordinator's too) has the new key.
    for from in [b, addr("10.99.99.1")] {
        let nm = c.netmap_for_address(from).unwrap().unwrap();
        let p = nm.peers.iter().find(|p| p.address == a).unwrap();
        assert_eq!(p.public_key, new_key);
        assert!(nm.peers.iter().all(|p| p.public_key != old.public_key()));
    }
    assert_eq!(host_info(&c, "dock-mirror").public_key, new_key);
    assert_eq!(key_created(&c, "dock-mirror"), NOW + 100);
    assert_eq!(key_created(&c, "dock-edge"), NOW + 1);
    let (at, action, subject, detail) = c.audit_log().unwrap().pop().unwrap();
    assert_eq!(
        (at, action.as_str(), subject.as_str()),
        (NOW + 100, "rotate", "dock-mirror")
    );
    assert_eq!(
        detail,
        format!("key {} -> {}", old.public_key().short(), new_key.short())
    );
    // A second rotation works the same way.
    let newer = PrivateKey::generate().public_key();
    prepare_commit(&c, a, rotate(newer), NOW + 200).unwrap();
    assert_eq!(c.version(), v + 4);
    assert_eq!(host_info(&c, "dock-mirror").public_key, newer);
}

#[test]
fn prepare_then_commit_moves_the_key_in_two_steps() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (a, old) = invite_join(&c, "dock-mirror");
    let (b, _) = invite_join(&c, "dock-edge");
    let v = c.version();
    let next = PrivateKey::generate().public_key();
    // Commit before prepare is refused.
    let err = c.commit_rotation(a, rotate(next), NOW + 50).unwrap_err();
    assert!(err.to_string().contains("not prepared"), "{err}");
    assert_eq!(c.version(), v);

    // Prepare: peers see the next key, the old key still holds the address.
    let resp = c.prepare_rotation(a, rotate(next), NOW + 100).unwrap();
    assert_eq!(resp.netmap.public_key, old.public_key());
    assert_eq!(c.version(), v + 1);
    let nm = c.netmap_for_address(b).unwrap().unwrap();
    let p = nm.peers.iter().find(|p| p.address == a).unwrap();
    assert_eq!(
        (p.public_key, p.next_public_key),
        (old.public_key(), Some(next))
    );
    // Idempotent; another host cannot take the prepared key.
    c.prepare_rotation(a, rotate(next), NOW + 101).unwrap();
    assert_eq!(c.version(), v + 1);
    let err = c.prepare_rotation(b, rotate(next), NOW + 102).unwrap_err();
    assert!(err.to_string().contains("already registered"), "{err}");
    assert_eq!(key_created(&c, "dock-mirror"), NOW + 1);

    // Commit: the next key holds the address everywhere, the old key is gone.
    let resp = c.commit_rotation(a, rotate(next), NOW + 200).unwrap();
    assert_eq!(resp.netmap.public_key, next);
    assert_eq!(c.version(), v + 2);
    let nm = c.netmap_for_address(b).unwrap().unwrap();
    let p = nm.peers.iter().find(|p| p.address == a).unwrap();
    assert_eq!((p.public_key, p.next_public_key), (next, None));
    assert!(nm.peers.iter().all(|p| p.public_key != old.public_key()));
    assert_eq!(key_created(&c, "dock-mirror"), NOW + 200);
    // The coordinator's own interface keeps the old key for the grace, and accepts the next.
    let (own, _) = c.own_netmap(Instant::now()).unwrap().unwrap();
    let p = own.peers.iter().find(|p| p.address == a).unwrap();
    assert_eq!(
        (p.public_key, p.next_public_key),
        (old.public_key(), Some(next))
    );
    // A retried commit or prepare (lost reply, crash) is a no-op that names the key.
    let resp = c.commit_rotation(a, rotate(next), NOW + 201).unwrap();
    assert_eq!(resp.netmap.public_key, next);
    let resp = c.prepare_rotation(a, rotate(next), NOW + 202).unwrap();
    assert_eq!(resp.netmap.public_key, next);
    assert_eq!(c.version(), v + 2);
    // The old key can never come back.
    let err = c
        .prepare_rotation(a, rotate(old.public_key()), NOW + 300)
        .unwrap_err();
    assert!(err.to_string().contains("rotated away"), "{err}");
}

#[test]
fn a_rotation_keeps_the_old_key_on_the_coordinator_during_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (a, old) = invite_join(&c, "dock-mirror");
    // Let the join's own grace end first.
    let deadline = Instant::now() + JOIN_KEY_GRACE + Duration::from_secs(5);
    while !c.recent_joins(Instant::now()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(c.recent_joins(Instant::now()).is_empty());
    let new_key = PrivateKey::generate().public_key();
    let before = Instant::now();
    prepare_commit(&c, a, rotate(new_key), NOW + 100).unwrap();
    let after = Instant::now();

    let joins = c.recent_joins(after);
    assert_eq!(joins.len(), 1);
    let j = &joins[0];
    assert_eq!(j.name, "dock-mirror");
    assert_eq!(j.address, a);
    assert_eq!(j.throwaway, old.public_key());
    assert_eq!(j.new_key, new_key);
    assert!(j.at >= before && j.at <= after);

    let registry = c.netmap_for_name("dock-load").unwrap().unwrap();
    let (own, next) = c.own_netmap(after).unwrap().unwrap();
    let p = own.peers.iter().find(|p| p.address == a).unwrap();
    assert_eq!(p.public_key, old.public_key(), "old key inside the grace");
    assert!(p.endpoints.is_empty());
    assert_eq!(next, Some(j.until()));

    let (own, next) = c.own_netmap(j.until()).unwrap().unwrap();
    assert_eq!(own, registry, "the new key once the grace is over");
    assert_eq!(next, None);
    assert!(c.recent_joins(j.until()).is_empty());
}

#[test]
fn bad_rotations_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (a, key_a) = invite_join(&c, "dock-mirror");
    let (b, _) = invite_join(&c, "dock-edge");
    let (gone, _) = invite_join(&c, "dock-old");
    let gone_key = c.netmap_for_address(gone).unwrap().unwrap().public_key;
    c.remove("dock-old", NOW + 2).unwrap();
    let pending = invite(&c, "dock-later");
    let nas = c
        .invite(
            InviteRequest {
                name: "nas".into(),
                address: None,
                ttl_secs: None,
                admin: false,
                static_peer: true,
                public_key: None,
                endpoint: None,
                near: None,
            },
            NOW,
        )
        .unwrap();
    // dock-edge rotates once; its current key is then b2.
    let b2 = PrivateKey::generate().public_key();
    prepare_commit(&c, b, rotate(b2), NOW + 3).unwrap();
    let audit_len = c.audit_log().unwrap().len();
    let deadline = Instant::now() + JOIN_KEY_GRACE + Duration::from_secs(5);
    while !c.recent_joins(Instant::now()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let fresh = || rotate(PrivateKey::generate().public_key());
    let at = NOW + 10;

    // Keys in use, or held by a removed host.
    refused(&c, 409, "already registered to host dock-edge", || {
        prepare_commit(&c, a, rotate(b2), at).map(drop)
    });
    refused(&c, 409, "already registered to host dock-load", || {
        prepare_commit(
            &c,
            a,
            rotate(PrivateKey::from_bytes([1; 32]).public_key()),
            at,
        )
        .map(drop)
    });
    refused(&c, 409, "removed host dock-old", || {
        prepare_commit(&c, a, rotate(gone_key), at).map(drop)
    });
    // Unknown caller, a pending (not yet joined) host, a removed host.
    refused(&c, 403, "10.99.99.77 is not a joined host", || {
        prepare_commit(&c, addr("10.99.99.77"), fresh(), at).map(drop)
    });
    refused(&c, 403, "is not a joined host", || {
        prepare_commit(&c, pending.address, fresh(), at).map(drop)
    });
    refused(&c, 410, "host dock-old was removed", || {
        prepare_commit(&c, gone, fresh(), at).map(drop)
    });
    // A static peer, and the coordinator itself.
    refused(&c, 409, "nas is a static peer", || {
        prepare_commit(&c, nas.address, fresh(), at).map(drop)
    });
    refused(&c, 409, "is the coordinator itself", || {
        prepare_commit(&c, addr("10.99.99.1"), fresh(), at).map(drop)
    });
    refused(&c, 409, "is the coordinator itself", || {
        prepare_commit(&c, "::ffff:10.99.99.1".parse().unwrap(), fresh(), at).map(drop)
    });
    // The key the caller already holds: a retried step whose reply was lost, so a no-op.
    let v = c.version();
    let resp = prepare_commit(&c, a, rotate(key_a.public_key()), at).unwrap();
    assert_eq!(resp.netmap.public_key, key_a.public_key());
    assert_eq!(c.version(), v, "no new version");
    assert_eq!(c.audit_log().unwrap().len(), audit_len, "no audit rows");
    assert!(c.recent_joins(Instant::now()).is_empty(), "no grace");
    assert_eq!(key_created(&c, "dock-mirror"), NOW + 1);
}

#[test]
fn bad_invites_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    for (name, ttl, status) in [
        ("Bad_Name", None, 400),
        ("ok", Some(0), 400),
        ("-x", None, 400),
    ] {
        let err = c
            .invite(
                InviteRequest {
                    name: name.into(),
                    address: None,
                    ttl_secs: ttl,
                    admin: false,
                    static_peer: false,
                    public_key: None,
                    endpoint: None,
                    near: None,
                },
                NOW,
            )
            .unwrap_err();
        assert_eq!(err.http_status(), status, "{err}");
    }
    let err = c
        .invite(
            InviteRequest {
                name: "far".into(),
                address: Some(addr("10.1.1.1")),
                ttl_secs: None,
                admin: false,
                static_peer: false,
                public_key: None,
                endpoint: None,
                near: None,
            },
            NOW,
        )
        .unwrap_err();
    assert_eq!(err.http_status(), 400, "{err}");
}

// ---------------------------------------------------------------- API over loopback

struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// One raw HTTP exchange from `src` with extra request headers.
async fn http_with(
    src: IpAddr,
    dst: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(String, String)],
) -> Reply {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    let mut s = sock.connect(dst).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: coord\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (413) before reading the whole body.
    let _ = s.write_all(body).await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_string(), b.to_string()))
        .unwrap_or_default();
    Reply { status, head, body }
}

/// An unsigned request (what a local process without the host's key can send).
async fn http(src: IpAddr, dst: SocketAddr, method: &str, path: &str, body: &[u8]) -> Reply {
    http_with(src, dst, method, path, body, &[]).await
}

fn error_text(r: &Reply) -> String {
    let v: mesh_proto::wire::api::ApiError = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("not an ApiError ({e}): {:?}", r.body));
    v.error
}

/// The coordinator's private key in the API tests.
fn coord_private() -> PrivateKey {
    PrivateKey::from_bytes([1; 32])
}

/// A simulated host: its mesh address and key.
struct Host {
    address: IpAddr,
    key: PrivateKey,
}

/// The headers of a request signed by `from` (and proving `next`), at time `ts`.
fn proof_headers(
    from: &PrivateKey,
    next: Option<&PrivateKey>,
    method: &str,
    path: &str,
    body: &[u8],
    ts: u64,
    nonce: [u8; 16],
) -> (Vec<(String, String)>, mesh_proto::wire::auth::AuthKey) {
    use mesh_proto::wire::auth::{AuthKey, AUTH_HEADER, NEXT_HEADER};
    let coord = coord_private().public_key();
    let auth = AuthKey::for_host(from, &coord).unwrap();
    let mut h = vec![(
        AUTH_HEADER.to_string(),
        auth.sign(method, path, body, ts, nonce).header_value(),
    )];
    if let Some(n) = next {
        let nk = AuthKey::for_host(n, &coord).unwrap();
        h.push((
            NEXT_HEADER.to_string(),
            nk.sign(method, path, body, ts, nonce).header_value(),
        ));
    }
    (h, auth)
}

fn fresh_nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut n);
    n
}

/// A signed request from `from`; the answer's proof of the coordinator's key is checked.
async fn signed(
    s: &Server,
    from: &Host,
    next: Option<&PrivateKey>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Reply {
    let nonce = fresh_nonce();
    let (headers, auth) = proof_headers(&from.key, next, method, path, body, now_real(), nonce);
    let r = http_with(from.address, s.addr, method, path, body, &headers).await;
    let proof = r.head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(mesh_proto::wire::auth::AUTH_HEADER)
            .then(|| v.trim().to_string())
    });
    // Refusals before the key was proven carry no proof; everything else must.
    if proof.is_some() || ![400, 401, 413, 429].contains(&r.status) {
        auth.verify_response(proof.as_deref(), &nonce, r.status, r.body.as_bytes())
            .unwrap_or_else(|e| {
                panic!(
                    "{method} {path}: the answer is not proven ({e}): {}",
                    r.body
                )
            });
    }
    r
}

struct Server {
    coord: Coordinator,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), CoordError>>,
    _dir: tempfile::TempDir,
}

async fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let coord =
        Coordinator::open(settings(dir.path(), "127.16.0.0/16", "127.16.0.1"), NOW).unwrap();
    coord.set_own_private_key(&coord_private());
    let listener = bind_api_listener("127.16.0.1:0".parse().unwrap(), None).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let observed: ObservedFn = Arc::new(|ip| Some(SocketAddr::new(ip, 51871)));
    let task = tokio::spawn(serve_api_on(coord.clone(), listener, observed, async {
        let _ = rx.await;
    }));
    Server {
        coord,
        addr,
        stop: Some(tx),
        task,
        _dir: dir,
    }
}

impl Server {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("server stops promptly")
            .unwrap()
            .unwrap();
    }

    /// Invite and join `name` through the registry; its key is its own.
    fn member(&self, name: &str, admin: bool) -> Host {
        let inv = self
            .coord
            .invite(
                InviteRequest {
                    name: name.into(),
                    address: None,
                    ttl_secs: None,
                    admin,
                    static_peer: false,
                    public_key: None,
                    endpoint: None,
                    near: None,
                },
                now_real(),
            )
            .unwrap();
        let key = PrivateKey::generate();
        self.coord
            .join(
                inv.address,
                join_req(inv.token.as_deref().unwrap(), key.public_key()),
                now_real(),
            )
            .unwrap();
        Host {
            address: inv.address,
            key,
        }
    }
}

fn now_real() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn plain_invite(name: &str, admin: bool) -> InviteRequest {
    InviteRequest {
        name: name.into(),
        address: None,
        ttl_secs: None,
        admin,
        static_peer: false,
        public_key: None,
        endpoint: None,
        near: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_join_netmap_and_admin_checks() {
    let s = server().await;
    let admin = s.member("dock-admin", true);
    let inv = s
        .coord
        .invite(plain_invite("dock-mirror", false), now_real())
        .unwrap();
    let before = s.coord.stats().unwrap();
    assert_eq!(before.pending_invitations, 1, "{before:?}");
    assert_eq!(before.joins, 0, "{before:?}");
    assert!(before.registry_bytes > 0, "{before:?}");
    let token = inv.token.clone().unwrap();
    let throwaway = Token::decode(&token).unwrap().throwaway_key().unwrap();
    let own = PrivateKey::generate();
    let body = serde_json::to_vec(&join_req(&token, own.public_key())).unwrap();
    let joiner = Host {
        address: inv.address,
        key: throwaway,
    };

    // Without proof of the token's key: refused, unsigned.
    let r = http(inv.address, s.addr, "POST", "/v1/join", &body).await;
    assert_eq!(r.status, 401, "{}", r.body);
    // With the throwaway key but without proving the new key.
    let r = signed(&s, &joiner, None, "POST", "/v1/join", &body).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        error_text(&r).contains("does not prove the key"),
        "{}",
        r.body
    );
    // Proving a different new key than the body names.
    let other = PrivateKey::generate();
    let r = signed(&s, &joiner, Some(&other), "POST", "/v1/join", &body).await;
    assert_eq!(r.status, 403, "{}", r.body);
    // From the wrong source address, properly signed: the address is a second check.
    let nonce = fresh_nonce();
    let (h, _) = proof_headers(
        &joiner.key,
        Some(&own),
        "POST",
        "/v1/join",
        &body,
        now_real(),
        nonce,
    );
    let r = http_with(addr("127.16.0.99"), s.addr, "POST", "/v1/join", &body, &h).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        error_text(&r).contains("request came from 127.16.0.99"),
        "{}",
        r.body
    );

    let r = signed(&s, &joiner, Some(&own), "POST", "/v1/join", &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let jr: mesh_proto::wire::api::JoinResponse = serde_json::from_str(&r.body).unwrap();
    assert_eq!(jr.netmap.public_key, own.public_key());
    let member = Host {
        address: inv.address,
        key: own,
    };
    // The throwaway key is dead now.
    let r = signed(
        &s,
        &joiner,
        Some(&PrivateKey::generate()),
        "POST",
        "/v1/join",
        &body,
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);
    // The coordinator's figures: one join, the refusals counted as errors, nobody pending.
    let after = s.coord.stats().unwrap();
    assert_eq!(after.joins, 1, "{after:?}");
    assert_eq!(after.pending_invitations, 0, "{after:?}");
    assert_eq!(after.hosts, before.hosts + 1, "{after:?}");
    assert_eq!(
        after.requests_failed - before.requests_failed,
        5,
        "401, 403, 403, 401 before the join, 401 after: {after:?}"
    );
    assert_eq!(after.requests_ok - before.requests_ok, 1, "{after:?}");

    // Netmap with since=0 answers at once.
    let r = signed(&s, &member, None, "GET", "/v1/netmap?since=0", b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let nm: mesh_proto::netmap::Netmap = serde_json::from_str(&r.body).unwrap();
    assert_eq!(nm.version, s.coord.version());
    // A stranger (unknown key) gets no netmap.
    let stranger = Host {
        address: addr("127.16.0.99"),
        key: PrivateKey::generate(),
    };
    let r = signed(&s, &stranger, None, "GET", "/v1/netmap?since=0", b"").await;
    assert_eq!(r.status, 401);

    // Endpoint report: 204, observed from the provider.
    let rep = serde_json::to_vec(&EndpointReport {
        listen_port: 51871,
        addresses: vec![addr("192.168.1.20")],
        advertise: vec![],
    })
    .unwrap();
    let r = signed(&s, &member, None, "POST", "/v1/endpoints", &rep).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let h = s
        .coord
        .hosts()
        .unwrap()
        .into_iter()
        .find(|h| h.name == "dock-mirror")
        .unwrap();
    assert_eq!(h.observed, Some(SocketAddr::new(inv.address, 51871)));

    // Admin calls: refused to the plain host, served to the admin host.
    for (method, path) in [
        ("GET", "/v1/admin/hosts"),
        ("GET", "/v1/admin/invites"),
        ("DELETE", "/v1/admin/hosts/dock-mirror"),
        ("DELETE", "/v1/admin/invites/x"),
    ] {
        let r = signed(&s, &member, None, method, path, b"").await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        assert_eq!(
            error_text(&r),
            format!("{} is not an admin host", inv.address)
        );
    }
    let inv_body = br#"{"name":"dock-edge","address":null,"ttl_secs":600}"#;
    let r = signed(&s, &member, None, "POST", "/v1/admin/invite", inv_body).await;
    assert_eq!(r.status, 403);
    let r = signed(&s, &admin, None, "POST", "/v1/admin/invite", inv_body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ir: mesh_proto::wire::api::InviteResponse = serde_json::from_str(&r.body).unwrap();
    assert!(ir.token.unwrap().starts_with("meshd1."));
    let r = signed(&s, &admin, None, "GET", "/v1/admin/invites", b"").await;
    assert_eq!(r.status, 200);
    let list: Vec<mesh_proto::wire::api::InviteInfo> = serde_json::from_str(&r.body).unwrap();
    assert_eq!(list.len(), 1);
    let r = signed(
        &s,
        &admin,
        None,
        "DELETE",
        "/v1/admin/invites/dock-edge",
        b"",
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = signed(
        &s,
        &admin,
        None,
        "DELETE",
        "/v1/admin/invites/dock-edge",
        b"",
    )
    .await;
    assert_eq!(r.status, 404);
    let r = signed(
        &s,
        &admin,
        None,
        "DELETE",
        "/v1/admin/hosts/dock-mirror",
        b"",
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = signed(&s, &admin, None, "GET", "/v1/admin/hosts", b"").await;
    let hosts: Vec<mesh_proto::wire::api::HostInfo> = serde_json::from_str(&r.body).unwrap();
    assert!(hosts.iter().any(|h| h.name == "dock-mirror" && h.removed));
    // The removed host is no longer served.
    let r = signed(&s, &member, None, "GET", "/v1/netmap?since=0", b"").await;
    assert_eq!(r.status, 401);
    s.stop().await;
}

/// The attacks on the proof itself: no proof, a local process on the coordinator host (its
/// own mesh address, no key), a forged or tampered MAC, a replay, a stale time, another
/// version. Each is refused and changes nothing; the refusals show in `api_refusals`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_requests_without_a_valid_proof_of_key() {
    let s = server().await;
    let member = s.member("dock-prod", false);
    let before = s.coord.snapshot().unwrap();
    let inv_body = br#"{"name":"intruder","address":null,"ttl_secs":600}"#;

    // An unprivileged process on the coordinator host reaches the API from the coordinator's
    // own mesh address, which used to be the admin test: no key, nothing.
    for (method, path, body) in [
        ("POST", "/v1/admin/invite", &inv_body[..]),
        ("GET", "/v1/admin/hosts", b""),
        ("GET", "/v1/netmap?since=0", b""),
    ] {
        let r = http(addr("127.16.0.1"), s.addr, method, path, body).await;
        assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
        assert!(error_text(&r).contains("not signed"), "{}", r.body);
        assert!(
            r.head
                .to_ascii_lowercase()
                .contains("x-meshd-auth-versions: v1"),
            "{}",
            r.head
        );
        assert!(
            !r.head.to_ascii_lowercase().contains("x-meshd-auth:"),
            "refusals are unsigned"
        );
    }
    // Even signed with the coordinator's own key: the coordinator host uses its socket.
    let own = Host {
        address: addr("127.16.0.1"),
        key: coord_private(),
    };
    let nonce = fresh_nonce();
    let (h, _) = proof_headers(
        &own.key,
        None,
        "GET",
        "/v1/admin/hosts",
        b"",
        now_real(),
        nonce,
    );
    let r = http_with(own.address, s.addr, "GET", "/v1/admin/hosts", b"", &h).await;
    assert_eq!(r.status, 401, "{}", r.body);

    // A member's proof on another body (tampered in flight) or path.
    let rep = br#"{"listen_port":51871,"addresses":["192.168.1.2"]}"#;
    let nonce = fresh_nonce();
    let (h, _) = proof_headers(
        &member.key,
        None,
        "POST",
        "/v1/endpoints",
        rep,
        now_real(),
        nonce,
    );
    let tampered = br#"{"listen_port":51872,"addresses":["192.168.1.2"]}"#;
    let r = http_with(
        member.address,
        s.addr,
        "POST",
        "/v1/endpoints",
        tampered,
        &h,
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        error_text(&r).contains("signature does not verify"),
        "{}",
        r.body
    );
    let r = http_with(member.address, s.addr, "POST", "/v1/admin/invite", rep, &h).await;
    assert_eq!(r.status, 401, "{}", r.body);

    // A replay: the first passes, the same bytes again are refused.
    let nonce = fresh_nonce();
    let path = "/v1/netmap?since=0";
    let (h, _) = proof_headers(&member.key, None, "GET", path, b"", now_real(), nonce);
    let r = http_with(member.address, s.addr, "GET", path, b"", &h).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http_with(member.address, s.addr, "GET", path, b"", &h).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(error_text(&r).contains("replayed"), "{}", r.body);

    // A stale time (an old captured request), and one from the future.
    for ts in [now_real() - 3600, now_real() + 3600] {
        let (h, _) = proof_headers(&member.key, None, "GET", path, b"", ts, fresh_nonce());
        let r = http_with(member.address, s.addr, "GET", path, b"", &h).await;
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(
            error_text(&r).contains("off this host's clock"),
            "{}",
            r.body
        );
    }

    // Garbage, another version, a key for another coordinator.
    for (v, status, text) in [
        ("v1 key=AAAA", 400, "malformed"),
        ("v9 whatever", 400, "not spoken here"),
        (&"x".repeat(4000)[..], 400, "malformed"),
    ] {
        let h = vec![("x-meshd-auth".to_string(), v.to_string())];
        let r = http_with(member.address, s.addr, "GET", path, b"", &h).await;
        assert_eq!(r.status, status, "{v}: {}", r.body);
        assert!(error_text(&r).contains(text), "{v}: {}", r.body);
    }
    let elsewhere = PrivateKey::generate().public_key();
    let auth = mesh_proto::wire::auth::AuthKey::for_host(&member.key, &elsewhere).unwrap();
    let p = auth.sign("GET", path, b"", now_real(), fresh_nonce());
    let h = vec![("x-meshd-auth".to_string(), p.header_value())];
    let r = http_with(member.address, s.addr, "GET", path, b"", &h).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        error_text(&r).contains("not this coordinator's"),
        "{}",
        r.body
    );

    assert_eq!(s.coord.snapshot().unwrap(), before, "nothing changed");
    let (refused, recent) = s.coord.api_refusals();
    assert!(refused >= 10, "{refused}");
    assert!(
        recent.iter().any(|(_, w)| w.contains("replayed")),
        "{recent:?}"
    );
    // Still serving the member.
    let r = signed(&s, &member, None, "GET", path, b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    s.stop().await;
}

/// `meshctl routes` over the API: admins only (a signed request from an admin host); every
/// malformed decision is a 4xx that changes nothing; an approval is what puts a prefix into
/// the netmaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_routes_list_approve_revoke() {
    use mesh_proto::routes::{RouteInfo, RouteState};
    let s = server().await;
    let admin = s.member("dock-admin", true);
    let edge = s.member("dock-edge", false);
    s.coord
        .report_endpoints(
            edge.address,
            SocketAddr::new(edge.address, 51871),
            EndpointReport {
                listen_port: 51871,
                addresses: vec![addr("192.168.1.4")],
                advertise: vec!["8.8.8.8/32".parse().unwrap()],
            },
            now_real(),
        )
        .unwrap();

    // The advertiser itself (no admin) may neither list nor approve its own prefix; nor may
    // an unsigned request from the admin's address.
    let approve = br#"{"host":"dock-edge","prefix":"8.8.8.8/32"}"#;
    for (method, path, body) in [
        ("GET", "/v1/admin/routes", &b""[..]),
        ("POST", "/v1/admin/routes/approve", &approve[..]),
        ("POST", "/v1/admin/routes/revoke", &approve[..]),
    ] {
        let r = signed(&s, &edge, None, method, path, body).await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        let r = http(admin.address, s.addr, method, path, body).await;
        assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
    }
    let r = signed(&s, &admin, None, "GET", "/v1/admin/routes", b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let list: Vec<RouteInfo> = serde_json::from_str(&r.body).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].state, RouteState::Pending);

    // Hostile bodies: refused with 400/404, nothing changes.
    let v = s.coord.version();
    for (body, status) in [
        (&b"not json"[..], 400),
        (br#"{"host":"dock-edge"}"#, 400),
        (br#"{"host":"dock-edge","prefix":"8.8.8.8/33"}"#, 400),
        (br#"{"host":"dock-edge","prefix":"8.8.8.8"}"#, 400),
        (br#"{"host":"dock-edge","prefix":"8.8.8.0/8"}"#, 400),
        (
            br#"{"host":"dock-edge","prefix":"8.8.8.8/32","state":"approved"}"#,
            400,
        ),
        (br#"{"host":"dock-edge","prefix":"9.9.9.9/32"}"#, 404),
        (br#"{"host":"nobody","prefix":"8.8.8.8/32"}"#, 404),
    ] {
        let r = signed(&s, &admin, None, "POST", "/v1/admin/routes/approve", body).await;
        assert_eq!(
            r.status,
            status,
            "{}: {}",
            String::from_utf8_lossy(body),
            r.body
        );
        assert!(!error_text(&r).is_empty());
    }
    assert_eq!(s.coord.version(), v);
    let pending = |c: &Coordinator| {
        c.snapshot()
            .unwrap()
            .hosts
            .iter()
            .all(|h| h.extra_allowed_ips.is_empty())
    };
    assert!(pending(&s.coord));

    let r = signed(
        &s,
        &admin,
        None,
        "POST",
        "/v1/admin/routes/approve",
        approve,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let info: RouteInfo = serde_json::from_str(&r.body).unwrap();
    assert_eq!(info.state, RouteState::Approved);
    assert_eq!(s.coord.version(), v + 1);
    assert!(!pending(&s.coord));
    let r = signed(&s, &admin, None, "POST", "/v1/admin/routes/revoke", approve).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(pending(&s.coord));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_rotate() {
    let s = server().await;
    let member = s.member("dock-mirror", false);
    let v = s.coord.version();
    let next = PrivateKey::generate();
    let body = serde_json::to_vec(&rotate(next.public_key())).unwrap();

    // Without proof of the current key (a local process on the member): nothing.
    let r = http(member.address, s.addr, "POST", "/v1/rotate/prepare", &body).await;
    assert_eq!(r.status, 401, "{}", r.body);
    // Without proof of the next key: whoever chose it may not hold it.
    let r = signed(&s, &member, None, "POST", "/v1/rotate/prepare", &body).await;
    assert_eq!(r.status, 403, "{}", r.body);
    // The one-step rotation is gone.
    let r = signed(&s, &member, Some(&next), "POST", "/v1/rotate", &body).await;
    assert_eq!(r.status, 404, "{}", r.body);
    // Malformed, unknown fields, oversized, wrong method.
    for (method, b, status) in [
        ("POST", b"{not json".to_vec(), 400),
        ("POST", br#"{"public_key":"AAAA","x":1}"#.to_vec(), 400),
        ("GET", vec![], 405),
    ] {
        let r = signed(&s, &member, Some(&next), method, "/v1/rotate/prepare", &b).await;
        assert_eq!(r.status, status, "{method}: {}", r.body);
        assert!(!error_text(&r).is_empty());
    }
    let r = http(
        member.address,
        s.addr,
        "POST",
        "/v1/rotate/prepare",
        &vec![b' '; MAX_BODY + 1],
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(s.coord.version(), v);

    let r = signed(
        &s,
        &member,
        Some(&next),
        "POST",
        "/v1/rotate/prepare",
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = signed(&s, &member, Some(&next), "POST", "/v1/rotate/commit", &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let rr: mesh_proto::wire::api::RotateResponse = serde_json::from_str(&r.body).unwrap();
    assert_eq!(rr.netmap.public_key, next.public_key());
    // The old key is refused from now on; the new one is served.
    let r = signed(&s, &member, None, "GET", "/v1/netmap?since=0", b"").await;
    assert_eq!(r.status, 401, "{}", r.body);
    let moved = Host {
        address: member.address,
        key: next,
    };
    let r = signed(&s, &moved, None, "GET", "/v1/netmap?since=0", b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    s.stop().await;
}

/// A member flooding endpoint reports: at most one applied (one netmap version) per second,
/// the last one wins, and nothing else is disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_endpoint_reports_are_debounced() {
    let s = server().await;
    let member = s.member("dock-prod", false);
    let v0 = s.coord.version();
    let audit0 = s.coord.audit_log().unwrap().len();
    let started = Instant::now();
    let mut codes = std::collections::BTreeMap::new();
    let n = 200u16;
    for i in 0..n {
        let rep = serde_json::to_vec(&EndpointReport {
            listen_port: 20000 + i,
            addresses: vec![addr("192.168.1.2")],
            advertise: vec![],
        })
        .unwrap();
        let r = signed(&s, &member, None, "POST", "/v1/endpoints", &rep).await;
        *codes.entry(r.status).or_insert(0u32) += 1;
    }
    let took = started.elapsed();
    assert_eq!(
        codes.keys().copied().collect::<Vec<_>>(),
        vec![202, 204],
        "{codes:?}"
    );
    // The last report lands within a second of the flood's end.
    let want = format!("{}", 20000 + n - 1);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let nm = s.coord.netmap_for_name("dock-load").unwrap().unwrap();
        let p = nm.peers.iter().find(|p| p.name == "dock-prod").unwrap();
        if p.endpoints
            .iter()
            .any(|e| e.addr.port().to_string() == want)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the last report never applied: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let versions = s.coord.version() - v0;
    let budget = took.as_secs() + 2;
    eprintln!(
        "{n} reports in {took:?}: {codes:?}, {versions} netmap versions, {} audit rows",
        s.coord.audit_log().unwrap().len() - audit0
    );
    assert!(
        versions <= budget,
        "{versions} versions for {n} reports in {took:?}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_malformed_oversized_and_unknown_requests() {
    let s = server().await;
    let admin = s.member("dock-admin", true);
    let before = s.coord.snapshot().unwrap();
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("POST", "/v1/join", b"{not json".to_vec(), 400),
        ("POST", "/v1/join", br#"{"token":"meshd1.x"}"#.to_vec(), 400),
        (
            "POST",
            "/v1/admin/invite",
            br#"{"name":"a","bogus":1}"#.to_vec(),
            400,
        ),
        ("POST", "/v1/endpoints", b"[]".to_vec(), 400),
        ("GET", "/v1/netmap?since=minus-one", vec![], 400),
        ("GET", "/v2/netmap", vec![], 404),
        ("GET", "/", vec![], 404),
        ("GET", "/v1/join", vec![], 405),
    ];
    for (method, path, body, status) in cases {
        let r = signed(&s, &admin, None, method, path, &body).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        assert!(!error_text(&r).is_empty());
    }
    for (path, size) in [
        ("/v1/join", MAX_BODY + 1),
        ("/v1/admin/invite", 4 * MAX_BODY),
    ] {
        let r = http(admin.address, s.addr, "POST", path, &vec![b' '; size]).await;
        assert_eq!(r.status, 413, "{path}: {}", r.body);
    }
    assert_eq!(s.coord.snapshot().unwrap(), before, "nothing changed");
    // Still serving.
    let r = signed(&s, &admin, None, "GET", "/v1/netmap?since=0", b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_long_poll_returns_within_a_second_of_a_change() {
    let s = Arc::new(tokio::sync::Mutex::new(Some(server().await)));
    let (coord, member) = {
        let g = s.lock().await;
        let srv = g.as_ref().unwrap();
        (srv.coord.clone(), srv.member("dock-prod", false))
    };
    let member = Arc::new(member);
    let v = coord.version();
    let poll = tokio::spawn({
        let s = s.clone();
        let member = member.clone();
        async move {
            let g = s.lock().await;
            let r = signed(
                g.as_ref().unwrap(),
                &member,
                None,
                "GET",
                &format!("/v1/netmap?since={v}"),
                b"",
            )
            .await;
            (r, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !poll.is_finished(),
        "the long-poll waits while nothing changes"
    );
    let parked = coord.stats().unwrap();
    assert_eq!(parked.long_poll_clients, 1, "{parked:?}");
    let changed_at = Instant::now();
    let c = coord.clone();
    tokio::task::spawn_blocking(move || {
        c.invite(plain_invite("new-host", false), now_real())
            .unwrap()
    })
    .await
    .unwrap();
    let (r, at) = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let nm: mesh_proto::netmap::Netmap = serde_json::from_str(&r.body).unwrap();
    assert!(nm.version > v);
    // A pending host is listed on the coordinator only, not in a member's netmap.
    assert!(nm.peers.iter().all(|p| p.name != "new-host"));
    assert!(at.duration_since(changed_at) < Duration::from_secs(1));
    // Shutdown ends a pending long-poll promptly.
    let v = coord.version();
    let (dst, nonce) = {
        let g = s.lock().await;
        (g.as_ref().unwrap().addr, fresh_nonce())
    };
    let path = format!("/v1/netmap?since={v}");
    let (h, _) = proof_headers(&member.key, None, "GET", &path, b"", now_real(), nonce);
    let address = member.address;
    let pending = tokio::spawn(async move { http_with(address, dst, "GET", &path, b"", &h).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let srv = s.lock().await.take().unwrap();
    srv.stop().await;
    let r = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 304);
}

#[test]
fn netmap_json_is_what_serde_gives_with_a_warm_cache() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let mut addrs = vec![addr("10.99.99.1")];
    for i in 0..6 {
        let (a, _) = invite_join(&c, &format!("h{i}"));
        // Different NATs and LANs, so peers differ per viewer.
        let obs: SocketAddr = format!("203.0.113.{}:4000{i}", i % 2 + 1).parse().unwrap();
        c.report_endpoints(
            a,
            obs,
            EndpointReport {
                listen_port: 51871,
                addresses: vec![format!("192.168.{}.{}", i % 2, i + 10).parse().unwrap()],
                advertise: vec![],
            },
            NOW + 2,
        )
        .unwrap();
        addrs.push(a);
    }
    for _round in 0..2 {
        for a in &addrs {
            let (v, bytes) = c.netmap_json_for_address(*a).unwrap().unwrap();
            let nm = c.netmap_for_address(*a).unwrap().unwrap();
            assert_eq!(v, nm.version);
            assert_eq!(
                String::from_utf8(bytes).unwrap(),
                serde_json::to_string(&nm).unwrap()
            );
        }
    }
    assert!(c
        .netmap_json_for_address(addr("10.99.99.250"))
        .unwrap()
        .is_none());
}

/// SO_BINDTODEVICE: a listener bound to another interface never serves a connection that
/// arrives on loopback (the analogue of a spoofed mesh source sent to the underlay address).
/// Needs CAP_NET_RAW and a non-loopback interface; skipped (with a note) otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_bound_to_another_device_is_not_reachable_over_loopback() {
    let other = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .find(|n| n != "lo");
    let Some(other) = other else {
        eprintln!("skipped: no interface besides lo");
        return;
    };
    // Bound to lo: served.
    let lo = match bind_api_listener("127.16.0.1:0".parse().unwrap(), Some("lo")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("skipped: cannot bind to a device here: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let coord =
        Coordinator::open(settings(dir.path(), "127.16.0.0/16", "127.16.0.1"), NOW).unwrap();
    let lo_addr = lo.local_addr().unwrap();
    let observed: ObservedFn = Arc::new(|_| None);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_api_on(coord.clone(), lo, observed.clone(), async {
        let _ = rx.await;
    }));
    // Served (refused for want of a proof, which shows it answered).
    let r = http(
        addr("127.16.0.1"),
        lo_addr,
        "GET",
        "/v1/netmap?since=0",
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    let _ = tx.send(());
    task.await.unwrap().unwrap();

    // Bound to another interface: a connection over lo is never served.
    let away = bind_api_listener("127.16.0.1:0".parse().unwrap(), Some(&other)).unwrap();
    let away_addr = away.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_api_on(coord, away, observed, async {
        let _ = rx.await;
    }));
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.16.0.1:0".parse().unwrap()).unwrap();
    let conn = tokio::time::timeout(Duration::from_secs(2), sock.connect(away_addr)).await;
    assert!(
        !matches!(conn, Ok(Ok(_))),
        "a listener bound to {other} accepted a connection over lo"
    );
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

#[test]
fn binding_to_a_missing_device_fails_clearly() {
    match bind_api_listener("127.16.0.1:0".parse().unwrap(), Some("nosuchdev0")) {
        Ok(_) => panic!("bound to a missing device"),
        Err(e) => assert!(e.to_string().contains("nosuchdev0"), "{e}"),
    }
}

fn peer_in(c: &Coordinator, of: &str, name: &str) -> mesh_proto::netmap::NetmapPeer {
    c.netmap_for_name(of)
        .unwrap()
        .unwrap()
        .peers
        .into_iter()
        .find(|p| p.name == name)
        .unwrap()
}

#[test]
fn the_coordinators_own_rotation_prepares_commits_and_leaves_notices_for_every_host() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let own_old = PrivateKey::from_bytes([1; 32]);
    let (_, mirror) = invite_join(&c, "dock-mirror");
    let (_, edge) = invite_join(&c, "dock-edge");
    invite_static_near(&c, "nas", Some("192.168.1.20:51820"), None).unwrap();
    let next = PrivateKey::generate();

    // A key that was not prepared is refused.
    let err = c
        .commit_own_rotation(next.public_key(), &own_old, NOW + 5)
        .unwrap_err();
    assert!(err.to_string().contains("not prepared"), "{err}");

    let v1 = c.prepare_own_rotation(next.public_key(), NOW + 10).unwrap();
    let p = peer_in(&c, "dock-mirror", "dock-load");
    assert_eq!(
        p.public_key,
        own_old.public_key(),
        "nothing routes to it yet"
    );
    assert_eq!(p.next_public_key, Some(next.public_key()));
    assert_eq!(
        c.prepare_own_rotation(next.public_key(), NOW + 11).unwrap(),
        v1,
        "idempotent"
    );

    let v2 = c
        .commit_own_rotation(next.public_key(), &own_old, NOW + 20)
        .unwrap();
    assert!(v2 > v1);
    let p = peer_in(&c, "dock-edge", "dock-load");
    assert_eq!(p.public_key, next.public_key());
    assert_eq!(p.next_public_key, None);
    assert_eq!(key_created(&c, "dock-load"), NOW + 20);
    assert_eq!(
        c.commit_own_rotation(next.public_key(), &own_old, NOW + 21)
            .unwrap(),
        v2,
        "a repeated commit changes nothing"
    );
    // The old key is retired: nobody may register it again.
    let err = c
        .prepare_own_rotation(own_old.public_key(), NOW + 30)
        .unwrap_err();
    assert!(err.to_string().contains("rotated away"), "{err}");

    // Every daemon host got a notice it can check with its own key; the static peer none.
    for host in [&mirror, &edge] {
        let notices = c.key_notices_for(&host.public_key()).unwrap();
        assert_eq!(notices.len(), 1);
        assert_eq!(
            mesh_proto::wire::notice::follow(&notices, host, own_old.public_key()),
            Ok(next.public_key())
        );
    }
    let nas_key = c
        .snapshot()
        .unwrap()
        .hosts
        .iter()
        .find(|h| h.name == "nas")
        .unwrap()
        .public_key;
    assert!(c.key_notices_for(&nas_key).unwrap().is_empty());
    // The static peer cannot follow; its configuration, printed again, has the new key.
    let conf = c.static_config("nas").unwrap();
    assert!(
        conf.contains(&format!("PublicKey = {}", next.public_key().to_base64())),
        "{conf}"
    );
    assert!(!conf.contains(&own_old.public_key().to_base64()), "{conf}");
    assert!(conf.contains("ListenPort = 51820"), "{conf}");
    assert!(conf.contains("# PrivateKey = <"), "{conf}");
    let err = c.static_config("dock-mirror").unwrap_err();
    assert!(err.to_string().contains("not a static peer"), "{err}");
    assert!(matches!(
        c.static_config("nope"),
        Err(CoordError::NoSuchHost(_))
    ));
    // Someone else's notice does not check out with our key.
    let theirs = c.key_notices_for(&edge.public_key()).unwrap();
    assert!(mesh_proto::wire::notice::follow(&theirs, &mirror, own_old.public_key()).is_err());

    // A second rotation chains on the first.
    let third = PrivateKey::generate();
    c.prepare_own_rotation(third.public_key(), NOW + 40)
        .unwrap();
    c.commit_own_rotation(third.public_key(), &next, NOW + 41)
        .unwrap();
    let notices = c.key_notices_for(&mirror.public_key()).unwrap();
    assert_eq!(notices.len(), 2);
    assert_eq!(
        mesh_proto::wire::notice::follow(&notices, &mirror, own_old.public_key()),
        Ok(third.public_key())
    );

    // Across a restart, the registry says which key the coordinator holds.
    drop(c);
    let (held, pending) = registered_key(&dir.path().join("registry.sqlite"), "dock-load")
        .unwrap()
        .unwrap();
    assert_eq!(held, third.public_key());
    assert_eq!(pending, None);
    assert_eq!(
        registered_key(&dir.path().join("missing.sqlite"), "dock-load").unwrap(),
        None
    );
}

#[test]
fn an_admins_rotation_request_rides_in_the_hosts_netmap_until_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (a, _) = invite_join(&c, "dock-mirror");
    let pending = invite(&c, "dock-dash");
    let _ = pending;
    let nm = |name: &str| c.netmap_for_name(name).unwrap().unwrap();
    assert!(!nm("dock-mirror").rotate_requested);

    let v = c.version();
    assert!(matches!(
        c.request_rotation("nope", NOW + 1),
        Err(CoordError::NoSuchHost(_))
    ));
    let err = c.request_rotation("dock-dash", NOW + 1).unwrap_err();
    assert!(err.to_string().contains("has not joined"), "{err}");
    assert_eq!(c.version(), v, "refusals change nothing");

    c.request_rotation("dock-mirror", NOW + 2).unwrap();
    assert!(nm("dock-mirror").rotate_requested);
    assert!(!nm("dock-load").rotate_requested, "only the named host");
    let v = c.version();
    c.request_rotation("dock-mirror", NOW + 3).unwrap();
    assert_eq!(c.version(), v, "asking twice is one request");

    let next = PrivateKey::generate().public_key();
    c.prepare_rotation(a, rotate(next), NOW + 4).unwrap();
    assert!(nm("dock-mirror").rotate_requested, "until the commit");
    c.commit_rotation(a, rotate(next), NOW + 5).unwrap();
    assert!(!nm("dock-mirror").rotate_requested);

    // The coordinator host itself can be asked too (its own meshd sees its netmap).
    c.request_rotation("dock-load", NOW + 6).unwrap();
    assert!(nm("dock-load").rotate_requested);
}

// ---------------------------------------------------------------- serving limits

/// The key-notice port answers its one GET (here with the handler's refusal: the request
/// proves no key) and refuses everything else before the router.
#[tokio::test]
async fn key_notice_port_answers_only_its_get() {
    let dir = tempfile::tempdir().unwrap();
    let coord =
        Coordinator::open(settings(dir.path(), "127.16.0.0/16", "127.16.0.1"), NOW).unwrap();
    let listener = tokio::net::TcpListener::bind("127.16.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(crate::runtime::serve::serve_http(
        listener,
        key_notice_router(coord),
        crate::runtime::serve::Limits::KEY_NOTICES,
        "key notices",
        async {
            let _ = rx.await;
        },
    ));
    let src: IpAddr = "127.0.0.9".parse().unwrap();
    let key = PrivateKey::from_bytes([5; 32]).public_key().to_hex();
    let path = format!("/v1/key-notices/{key}");
    let unproven = http(src, addr, "GET", &path, b"").await;
    assert_eq!(unproven.status, 403, "{}", unproven.body);
    assert!(
        error_text(&unproven).contains("proving its key"),
        "{}",
        unproven.body
    );
    for (method, path, body, want) in [
        ("POST", path.as_str(), &b"{}"[..], 405),
        ("DELETE", path.as_str(), b"", 405),
        ("GET", path.as_str(), b"x", 413),
        ("GET", "/v1/netmap", b"", 404),
        ("GET", "/v1/admin/hosts", b"", 404),
        ("GET", "/v1/key-notices/zz", b"", 403),
    ] {
        let r = http(src, addr, method, path, body).await;
        assert_eq!(r.status, want, "{method} {path}: {}", r.body);
        assert!(!error_text(&r).is_empty());
    }
    let q = http(src, addr, "GET", &format!("{path}?x=1"), b"").await;
    assert_eq!(q.status, 404, "{}", q.body);
    let _ = tx.send(());
    task.await.unwrap();
}

/// A member holding its whole share of half-sent requests: the next connection from it is
/// closed at once, another host's call is served meanwhile, and the member is served again
/// once its half-sent requests are gone.
#[tokio::test]
async fn api_caps_connections_per_source() {
    let server = server().await;
    let flooder: IpAddr = "127.16.0.50".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..crate::runtime::serve::Limits::API.max_per_source {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(flooder, 0)).unwrap();
        let mut s = sock.connect(server.addr).await.unwrap();
        s.write_all(b"GET /v1/netmap HTTP/1.1\r\nHost: c")
            .await
            .unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(flooder, 0)).unwrap();
    let mut extra = sock.connect(server.addr).await.unwrap();
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(1), extra.read(&mut b))
        .await
        .expect("over-cap connection closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // Another source gets an answer (a refusal by name: the request is not signed), not a
    // closed socket.
    let other = http(
        "127.16.0.60".parse().unwrap(),
        server.addr,
        "GET",
        "/v1/netmap",
        b"",
    )
    .await;
    assert_eq!(other.status, 401, "{}", other.body);
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = http(flooder, server.addr, "GET", "/v1/netmap", b"").await;
    assert_eq!(again.status, 401, "{}", again.body);
    server.stop().await;
}
