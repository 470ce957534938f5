//! The registry's transitions on a model held in memory, time from a simulated clock.

#![allow(clippy::unwrap_used)]

use super::*;

const T0: u64 = 1_700_000_000;

fn key(n: u8) -> PublicKey {
    PublicKey([n; 32])
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A registry of 10.99.0.0/29 (six host addresses) with the coordinator at .1.
fn registry() -> Registry {
    let settings = Settings {
        mesh_cidr: "10.99.0.0/29".parse().unwrap(),
        reserved: Vec::new(),
        static_assignments: BTreeMap::new(),
        own_name: "coord".into(),
        own_address: ip("10.99.0.1"),
    };
    let mut r = Registry {
        settings,
        hosts: Vec::new(),
        invitations: Vec::new(),
        retired: Vec::new(),
    };
    r.apply(&Change::default().with_edit(Edit::AddHost(NewHost {
        name: "coord".into(),
        address: ip("10.99.0.1"),
        public_key: key(1),
        admin: true,
        static_peer: false,
        pending: false,
        created_unix: T0,
        last_seen_unix: Some(T0),
        near: None,
        reported: Vec::new(),
        invitation: None,
    })));
    r
}

fn daemon_req(name: &str) -> InviteRequest {
    InviteRequest {
        name: name.into(),
        address: None,
        ttl_secs: Some(3600),
        admin: false,
        static_peer: false,
        public_key: None,
        endpoint: None,
        near: None,
    }
}

fn static_req(name: &str) -> InviteRequest {
    InviteRequest {
        static_peer: true,
        ..daemon_req(name)
    }
}

/// Invite `name` as a daemon host with throwaway key `throwaway` and invitation `id`.
fn invite(r: &mut Registry, name: &str, throwaway: u8, id: &str, now: u64) -> Invited {
    let inv = check_invite(&daemon_req(name), &r.settings).unwrap();
    let out = r.invite(&inv, key(throwaway), id, now).unwrap();
    r.apply(&out.change);
    out
}

fn ticket(r: &Registry, id: &str) -> JoinTicket {
    let inv = r.invitations.iter().find(|i| i.id == id).unwrap();
    JoinTicket {
        invite_id: id.into(),
        host_name: inv.name.clone(),
        host_address: inv.address,
    }
}

fn join_req(k: u8) -> JoinRequest {
    JoinRequest {
        token: String::new(),
        public_key: key(k),
        listen_port: 51871,
        addresses: vec![ip("192.0.2.7"), ip("127.0.0.1"), ip("10.99.0.3")],
    }
}

/// A joined daemon host `name` with key `k` (throwaway `k + 100`).
fn joined(r: &mut Registry, name: &str, k: u8, now: u64) -> IpAddr {
    let id = format!("inv-{name}");
    let out = invite(r, name, k + 100, &id, now);
    let t = ticket(r, &id);
    let change = r.join(&t, out.address, &join_req(k), now + 1).unwrap();
    r.apply(&change);
    out.address
}

fn host<'a>(r: &'a Registry, name: &str) -> &'a Host {
    r.hosts.iter().rev().find(|h| h.name == name).unwrap()
}

#[test]
fn a_daemon_invitation_registers_a_pending_host_with_the_throwaway_key() {
    let mut r = registry();
    let out = invite(&mut r, "web", 50, "abc", T0);
    assert_eq!(out.address, ip("10.99.0.2"));
    assert_eq!(
        out.token,
        Some(TokenTerms {
            expires_unix: T0 + 3600,
            coordinator_key: key(1)
        })
    );
    let h = host(&r, "web");
    assert!(h.pending && !h.removed && !h.static_peer);
    assert_eq!(h.public_key, key(50));
    assert_eq!(r.invitations[0].state, InviteState::Pending);
    assert_eq!(out.change.audit.len(), 1);
    assert_eq!(out.change.audit[0].action, "invite");
    assert_eq!(
        out.change.audit[0].detail,
        format!(
            "address 10.99.0.2, expires {}, admin false, invitation abc",
            T0 + 3600
        )
    );
}

#[test]
fn invitation_requests_are_checked_before_the_registry() {
    let s = registry().settings;
    let bad = |req: InviteRequest| check_invite(&req, &s).unwrap_err();
    assert_eq!(bad(daemon_req("Web")), RegistryError::BadName("Web".into()));
    assert_eq!(
        bad(daemon_req("-web")),
        RegistryError::BadName("-web".into())
    );
    assert_eq!(
        bad(InviteRequest {
            ttl_secs: Some(0),
            ..daemon_req("web")
        }),
        RegistryError::BadTtl(0)
    );
    assert_eq!(
        bad(InviteRequest {
            ttl_secs: Some(MAX_INVITE_TTL_SECS + 1),
            ..daemon_req("web")
        }),
        RegistryError::BadTtl(MAX_INVITE_TTL_SECS + 1)
    );
    assert_eq!(
        bad(InviteRequest {
            admin: true,
            ..static_req("phone")
        }),
        RegistryError::StaticAdmin
    );
    assert_eq!(
        bad(InviteRequest {
            public_key: Some(key(9)),
            ..daemon_req("web")
        }),
        RegistryError::KeyForDaemonHost
    );
    assert_eq!(
        bad(InviteRequest {
            near: Some("coord".into()),
            ..daemon_req("web")
        }),
        RegistryError::EndpointForDaemonHost
    );
    for e in [
        "10.99.0.5:51820",
        "127.0.0.1:51820",
        "192.0.2.1:0",
        "0.0.0.0:1",
    ] {
        let e: SocketAddr = e.parse().unwrap();
        assert_eq!(
            bad(InviteRequest {
                endpoint: Some(e),
                ..static_req("phone")
            }),
            RegistryError::UnusableEndpoint(e)
        );
    }
    assert_eq!(
        bad(InviteRequest {
            near: Some("phone".into()),
            ..static_req("phone")
        }),
        RegistryError::NearItself("phone".into())
    );
    // An IPv4-mapped endpoint is taken as its IPv4 address.
    let ok = check_invite(
        &InviteRequest {
            endpoint: Some("[::ffff:192.0.2.1]:51820".parse().unwrap()),
            ..static_req("phone")
        },
        &s,
    )
    .unwrap();
    assert_eq!(ok.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
}

#[test]
fn static_assignments_are_kept_for_their_name_only() {
    let mut r = registry();
    r.settings
        .static_assignments
        .insert("db".into(), ip("10.99.0.2"));
    let e = check_invite(
        &InviteRequest {
            address: Some(ip("10.99.0.3")),
            ..daemon_req("db")
        },
        &r.settings,
    )
    .unwrap_err();
    assert!(matches!(e, RegistryError::StaticAssignment { .. }), "{e}");
    // Another name never gets db's address.
    let web = invite(&mut r, "web", 50, "a", T0);
    assert_eq!(web.address, ip("10.99.0.3"));
    let db = invite(&mut r, "db", 51, "b", T0);
    assert_eq!(db.address, ip("10.99.0.2"));
}

#[test]
fn a_taken_name_is_refused_while_its_host_lives() {
    let mut r = registry();
    invite(&mut r, "web", 50, "a", T0);
    let inv = check_invite(&daemon_req("web"), &r.settings).unwrap();
    assert_eq!(
        r.invite(&inv, key(51), "b", T0).unwrap_err(),
        RegistryError::NameTaken {
            name: "web".into(),
            address: ip("10.99.0.2"),
            pending: true
        }
    );
    assert_eq!(
        r.invite(&inv, key(51), "b", T0).unwrap_err().to_string(),
        "the name web is already taken by the invited host 10.99.0.2"
    );
    // Once removed, the name is free again, with a new address.
    r.apply(&r.remove("web", T0).unwrap());
    let again = invite(&mut r, "web", 52, "c", T0);
    assert_eq!(again.address, ip("10.99.0.3"));
}

#[test]
fn addresses_run_out_and_are_never_reused() {
    let mut r = registry();
    for (i, name) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        invite(&mut r, name, 50 + i as u8, name, T0);
    }
    let inv = check_invite(&daemon_req("f"), &r.settings).unwrap();
    assert_eq!(
        r.invite(&inv, key(60), "f", T0).unwrap_err(),
        RegistryError::Alloc(AllocError::Exhausted(r.settings.mesh_cidr))
    );
    // A revoked invitation's address stays taken.
    r.apply(&r.revoke_invite("a", T0).unwrap());
    assert!(matches!(
        r.invite(&inv, key(60), "f", T0).unwrap_err(),
        RegistryError::Alloc(AllocError::Exhausted(_))
    ));
    let asked = check_invite(
        &InviteRequest {
            address: Some(ip("10.99.0.2")),
            ..daemon_req("f")
        },
        &r.settings,
    )
    .unwrap();
    assert_eq!(
        r.invite(&asked, key(60), "f", T0).unwrap_err(),
        RegistryError::Alloc(AllocError::AlreadyUsed(ip("10.99.0.2")))
    );
}

#[test]
fn a_key_is_registered_once_ever() {
    let mut r = registry();
    let inv = check_invite(&daemon_req("web"), &r.settings).unwrap();
    // The coordinator's own key.
    assert_eq!(
        r.invite(&inv, key(1), "a", T0).unwrap_err().to_string(),
        format!(
            "public key {} is already registered to host coord",
            key(1).short()
        )
    );
    joined(&mut r, "db", 7, T0);
    r.apply(&r.remove("db", T0 + 5).unwrap());
    assert_eq!(
        r.invite(&inv, key(7), "a", T0).unwrap_err(),
        RegistryError::KeyOfRemovedHost {
            key: key(7),
            host: "db".into()
        }
    );
    r.retired.push((key(8), "old".into()));
    assert_eq!(
        r.invite(&inv, key(8), "a", T0).unwrap_err(),
        RegistryError::KeyRetired {
            key: key(8),
            host: "old".into()
        }
    );
}

#[test]
fn a_static_peer_is_registered_at_once_with_its_endpoint_and_neighbour() {
    let mut r = registry();
    joined(&mut r, "nas", 7, T0);
    let req = InviteRequest {
        public_key: Some(key(30)),
        endpoint: Some("192.168.1.20:51820".parse().unwrap()),
        near: Some("nas".into()),
        ..static_req("phone")
    };
    let inv = check_invite(&req, &r.settings).unwrap();
    let out = r.invite(&inv, key(30), "unused", T0 + 10).unwrap();
    assert_eq!(out.token, None);
    let Edit::AddHost(h) = &out.change.edits[0] else {
        panic!("{:?}", out.change.edits)
    };
    assert!(h.static_peer && !h.pending && h.invitation.is_none());
    assert_eq!(h.near.as_deref(), Some("nas"));
    assert_eq!(h.reported, vec!["192.168.1.20:51820".parse().unwrap()]);
    assert_eq!(
        out.change.audit[0].detail,
        format!(
            "address {}, key {}, endpoint 192.168.1.20:51820, near nas",
            out.address,
            key(30).short()
        )
    );
    r.apply(&out.change);
    // Near a static peer, or near nobody: refused.
    let near_static = check_invite(
        &InviteRequest {
            near: Some("phone".into()),
            ..static_req("tablet")
        },
        &r.settings,
    )
    .unwrap();
    assert_eq!(
        r.invite(&near_static, key(31), "x", T0).unwrap_err(),
        RegistryError::NearStaticPeer("phone".into())
    );
    let near_nobody = check_invite(
        &InviteRequest {
            near: Some("ghost".into()),
            ..static_req("tablet")
        },
        &r.settings,
    )
    .unwrap();
    assert_eq!(
        r.invite(&near_nobody, key(31), "x", T0).unwrap_err(),
        RegistryError::NoSuchHost("ghost".into())
    );
}

#[test]
fn a_daemon_invitation_needs_the_coordinator_row() {
    let mut r = registry();
    r.hosts.clear();
    let inv = check_invite(&daemon_req("web"), &r.settings).unwrap();
    assert_eq!(
        r.invite(&inv, key(50), "a", T0).unwrap_err(),
        RegistryError::CoordinatorMissing("coord".into())
    );
}

#[test]
fn a_join_replaces_the_throwaway_key_and_uses_up_the_invitation() {
    let mut r = registry();
    let out = invite(&mut r, "web", 50, "abc", T0);
    let t = ticket(&r, "abc");
    let change = r.join(&t, out.address, &join_req(7), T0 + 60).unwrap();
    assert_eq!(
        change.key_swap,
        Some(KeySwap {
            name: "web".into(),
            address: out.address,
            old: key(50),
            new: key(7)
        })
    );
    // Only the usable underlay address is kept.
    assert!(change.edits.contains(&Edit::SetReported {
        host: host(&r, "web").id,
        endpoints: vec!["192.0.2.7:51871".parse().unwrap()],
    }));
    assert_eq!(change.audit[0].action, "join");
    assert_eq!(
        change.audit[0].detail,
        format!("address 10.99.0.2, key {}", key(7).short())
    );
    r.apply(&change);
    let h = host(&r, "web");
    assert!(!h.pending);
    assert_eq!(
        (h.public_key, h.key_created_unix, h.last_seen_unix),
        (key(7), T0 + 60, Some(T0 + 60))
    );
    assert_eq!(r.invitations[0].state, InviteState::Used);
    // Replayed: refused, even with another key.
    assert_eq!(
        r.join(&t, out.address, &join_req(8), T0 + 61).unwrap_err(),
        RegistryError::AlreadyUsed("web".into())
    );
}

#[test]
fn a_join_is_refused_for_a_foreign_expired_or_revoked_invitation() {
    let mut r = registry();
    let web = invite(&mut r, "web", 50, "a", T0);
    let t = ticket(&r, "a");
    // An invitation this registry never made.
    let foreign = JoinTicket {
        invite_id: "zzz".into(),
        ..t.clone()
    };
    assert_eq!(
        r.join(&foreign, web.address, &join_req(7), T0).unwrap_err(),
        RegistryError::ForeignToken
    );
    // A ticket whose name or address differ from its invitation's.
    for bad in [
        JoinTicket {
            host_name: "db".into(),
            ..t.clone()
        },
        JoinTicket {
            host_address: ip("10.99.0.5"),
            ..t.clone()
        },
    ] {
        assert_eq!(
            r.join(&bad, web.address, &join_req(7), T0).unwrap_err(),
            RegistryError::ForeignToken
        );
    }
    // From another address.
    assert_eq!(
        r.join(&t, ip("10.99.0.5"), &join_req(7), T0).unwrap_err(),
        RegistryError::WrongCaller {
            name: "web".into(),
            expected: web.address,
            caller: ip("10.99.0.5")
        }
    );
    // With a key in use.
    assert!(matches!(
        r.join(&t, web.address, &join_req(1), T0).unwrap_err(),
        RegistryError::KeyInUse { .. }
    ));
    // At its expiry, even before anything marked it expired.
    assert_eq!(
        r.join(&t, web.address, &join_req(7), T0 + 3600)
            .unwrap_err(),
        RegistryError::Expired("web".into())
    );
    let expired = r.expire_invites(T0 + 3600);
    r.apply(&expired);
    assert_eq!(
        r.join(&t, web.address, &join_req(7), T0 + 10).unwrap_err(),
        RegistryError::Expired("web".into())
    );
    let db = invite(&mut r, "db", 51, "b", T0);
    r.apply(&r.revoke_invite("db", T0 + 1).unwrap());
    assert_eq!(
        r.join(&ticket(&r, "b"), db.address, &join_req(8), T0 + 2)
            .unwrap_err(),
        RegistryError::Revoked("db".into())
    );
}

#[test]
fn a_join_after_the_host_was_removed_is_refused() {
    let mut r = registry();
    let web = invite(&mut r, "web", 50, "a", T0);
    // The host row removed while its invitation is still pending (an older registry).
    let h = host(&r, "web").clone();
    r.apply(&Change::default().with_edit(Edit::UpdateHost(Host { removed: true, ..h })));
    assert_eq!(
        r.join(&ticket(&r, "a"), web.address, &join_req(7), T0)
            .unwrap_err(),
        RegistryError::Removed("web".into())
    );
}

#[test]
fn expiry_takes_pending_hosts_out_and_keeps_their_addresses() {
    let mut r = registry();
    invite(&mut r, "a", 50, "ia", T0);
    let b = joined(&mut r, "b", 7, T0);
    invite(&mut r, "c", 51, "ic", T0 + 100);
    assert!(r.expire_invites(T0 + 3599).is_empty());
    let change = r.expire_invites(T0 + 3600);
    // One per expired pending invitation: b's was used.
    assert_eq!(change.audit.len(), 1);
    assert_eq!(
        (change.audit[0].action, change.audit[0].detail.as_str()),
        ("invite_expired", "invitation ia")
    );
    r.apply(&change);
    assert!(host(&r, "a").removed);
    assert!(!host(&r, "b").removed);
    assert_eq!(r.live_by_address(b).unwrap().name, "b");
    assert!(r.ever_used().contains(&ip("10.99.0.2")));
    // Nothing left to expire at the same time; c expires later.
    assert!(r.expire_invites(T0 + 3600).is_empty());
    assert_eq!(r.expire_invites(T0 + 3700).audit.len(), 1);
}

#[test]
fn revoking_needs_a_pending_invitation() {
    let mut r = registry();
    assert_eq!(
        r.revoke_invite("web", T0).unwrap_err(),
        RegistryError::NoSuchInvite("web".into())
    );
    joined(&mut r, "web", 7, T0);
    assert_eq!(
        r.revoke_invite("web", T0).unwrap_err(),
        RegistryError::NoSuchInvite("web".into())
    );
    invite(&mut r, "db", 50, "b", T0);
    let change = r.revoke_invite("db", T0 + 5).unwrap();
    assert!(change.edits.contains(&Edit::CloseInvitation {
        id: "b".into(),
        state: InviteState::Revoked,
        at_unix: T0 + 5
    }));
    r.apply(&change);
    assert!(host(&r, "db").removed);
    assert!(r.revoke_invite("db", T0 + 6).is_err());
}

#[test]
fn removal_refuses_the_coordinator_and_unknown_hosts() {
    let mut r = registry();
    assert_eq!(
        r.remove("coord", T0).unwrap_err(),
        RegistryError::RemoveCoordinator("coord".into())
    );
    assert_eq!(
        r.remove("ghost", T0).unwrap_err(),
        RegistryError::NoSuchHost("ghost".into())
    );
    joined(&mut r, "web", 7, T0);
    r.apply(&r.remove("web", T0).unwrap());
    // Removed twice: the second finds no live host.
    assert_eq!(
        r.remove("web", T0).unwrap_err(),
        RegistryError::NoSuchHost("web".into())
    );
}

#[test]
fn removing_a_pending_host_revokes_its_invitation() {
    let mut r = registry();
    let web = invite(&mut r, "web", 50, "a", T0);
    let change = r.remove("web", T0 + 3).unwrap();
    assert_eq!(change.audit[0].action, "remove");
    assert_eq!(
        change.audit[0].detail,
        format!("address {}, key {}", web.address, key(50).short())
    );
    r.apply(&change);
    assert_eq!(r.invitations[0].state, InviteState::Revoked);
    assert_eq!(
        r.join(&ticket(&r, "a"), web.address, &join_req(7), T0 + 4)
            .unwrap_err(),
        RegistryError::Revoked("web".into())
    );
}

#[test]
fn a_rotation_prepares_then_commits_and_retires_the_old_key() {
    let mut r = registry();
    let web = joined(&mut r, "web", 7, T0);
    let p = r.prepare_rotation(web, key(8), T0 + 10).unwrap();
    assert_eq!(p.name, "web");
    assert_eq!(p.change.audit[0].action, "rotate-prepare");
    r.apply(&p.change);
    assert_eq!(host(&r, "web").next_public_key, Some(key(8)));
    // Prepared again: nothing changes.
    assert!(r
        .prepare_rotation(web, key(8), T0 + 11)
        .unwrap()
        .change
        .is_empty());
    let c = r.commit_rotation(web, key(8), T0 + 20).unwrap();
    assert_eq!(
        c.change.key_swap,
        Some(KeySwap {
            name: "web".into(),
            address: web,
            old: key(7),
            new: key(8)
        })
    );
    assert_eq!(
        c.change.audit[0].detail,
        format!("key {} -> {}", key(7).short(), key(8).short())
    );
    r.apply(&c.change);
    let h = host(&r, "web");
    assert_eq!((h.public_key, h.next_public_key), (key(8), None));
    assert_eq!(h.key_created_unix, T0 + 20);
    // A retried commit and a late prepare change nothing; the old key is refused forever.
    assert!(r
        .commit_rotation(web, key(8), T0 + 21)
        .unwrap()
        .change
        .is_empty());
    assert!(r
        .prepare_rotation(web, key(8), T0 + 21)
        .unwrap()
        .change
        .is_empty());
    assert!(matches!(
        r.prepare_rotation(web, key(7), T0 + 22).unwrap_err(),
        RegistryError::KeyRetired { .. }
    ));
}

#[test]
fn a_commit_needs_its_prepare() {
    let mut r = registry();
    let web = joined(&mut r, "web", 7, T0);
    assert_eq!(
        r.commit_rotation(web, key(8), T0).unwrap_err(),
        RegistryError::NotPrepared {
            key: key(8),
            name: "web".into()
        }
    );
    r.apply(&r.prepare_rotation(web, key(8), T0).unwrap().change);
    // The wrong key.
    assert!(matches!(
        r.commit_rotation(web, key(9), T0).unwrap_err(),
        RegistryError::NotPrepared { .. }
    ));
    // A new prepare replaces the first (the host started over).
    r.apply(&r.prepare_rotation(web, key(9), T0).unwrap().change);
    assert!(matches!(
        r.commit_rotation(web, key(8), T0).unwrap_err(),
        RegistryError::NotPrepared { .. }
    ));
    assert!(!r
        .commit_rotation(web, key(9), T0)
        .unwrap()
        .change
        .is_empty());
}

#[test]
fn only_joined_daemon_hosts_rotate_over_the_api() {
    let mut r = registry();
    assert_eq!(
        r.prepare_rotation(ip("10.99.0.1"), key(8), T0).unwrap_err(),
        RegistryError::CoordinatorOverApi(ip("10.99.0.1"))
    );
    assert_eq!(
        r.prepare_rotation(ip("10.99.0.6"), key(8), T0).unwrap_err(),
        RegistryError::NotAHost(ip("10.99.0.6"))
    );
    let pending = invite(&mut r, "new", 50, "a", T0).address;
    assert_eq!(
        r.prepare_rotation(pending, key(8), T0).unwrap_err(),
        RegistryError::NotAHost(pending)
    );
    let web = joined(&mut r, "web", 7, T0);
    r.apply(&r.remove("web", T0).unwrap());
    assert_eq!(
        r.prepare_rotation(web, key(8), T0).unwrap_err(),
        RegistryError::Removed("web".into())
    );
    assert_eq!(
        r.commit_rotation(web, key(8), T0).unwrap_err(),
        RegistryError::Removed("web".into())
    );
    let inv = check_invite(&static_req("phone"), &r.settings).unwrap();
    let phone = r.invite(&inv, key(30), "x", T0).unwrap();
    r.apply(&phone.change);
    assert_eq!(
        r.prepare_rotation(phone.address, key(8), T0).unwrap_err(),
        RegistryError::StaticPeerRotates("phone".into())
    );
}

#[test]
fn an_admin_request_rides_until_the_commit() {
    let mut r = registry();
    assert_eq!(
        r.request_rotation("ghost", T0).unwrap_err(),
        RegistryError::NoSuchHost("ghost".into())
    );
    invite(&mut r, "new", 50, "a", T0);
    assert_eq!(
        r.request_rotation("new", T0).unwrap_err(),
        RegistryError::NotJoinedYet("new".into())
    );
    let inv = check_invite(&static_req("phone"), &r.settings).unwrap();
    r.apply(&r.invite(&inv, key(30), "x", T0).unwrap().change);
    assert_eq!(
        r.request_rotation("phone", T0).unwrap_err(),
        RegistryError::StaticPeerRotationRequest("phone".into())
    );
    let web = joined(&mut r, "web", 7, T0);
    let change = r.request_rotation("web", T0 + 5).unwrap();
    assert_eq!(change.audit[0].detail, "asked by an admin");
    r.apply(&change);
    assert_eq!(host(&r, "web").rotate_requested_unix, Some(T0 + 5));
    assert!(r.request_rotation("web", T0 + 6).unwrap().is_empty());
    // The coordinator may be asked too.
    assert!(!r.request_rotation("coord", T0).unwrap().is_empty());
    r.apply(&r.prepare_rotation(web, key(8), T0 + 7).unwrap().change);
    r.apply(&r.commit_rotation(web, key(8), T0 + 8).unwrap().change);
    assert!(!host(&r, "web").rotate_requested());
    // A removed host cannot be asked.
    r.apply(&r.remove("web", T0 + 9).unwrap());
    assert_eq!(
        r.request_rotation("web", T0 + 10).unwrap_err(),
        RegistryError::NoSuchHost("web".into())
    );
}

#[test]
fn the_coordinator_rotates_its_own_key_with_notices_for_daemon_hosts() {
    let mut r = registry();
    let old = PrivateKey::from_bytes([3; 32]);
    r.apply(&r.set_own_key(old.public_key(), T0).unwrap());
    assert!(r.set_own_key(old.public_key(), T0).unwrap().is_empty());
    joined(&mut r, "web", 7, T0);
    invite(&mut r, "new", 50, "a", T0);
    let inv = check_invite(&static_req("phone"), &r.settings).unwrap();
    r.apply(&r.invite(&inv, key(30), "x", T0).unwrap().change);
    joined(&mut r, "gone", 9, T0);
    r.apply(&r.remove("gone", T0).unwrap());

    let next = key(40);
    assert_eq!(
        r.commit_own_rotation(next, &old, T0).unwrap_err(),
        RegistryError::NotPreparedOwn {
            key: next,
            name: "coord".into()
        }
    );
    r.apply(&r.prepare_own_rotation(next, T0 + 1).unwrap());
    assert!(r.prepare_own_rotation(next, T0 + 2).unwrap().is_empty());
    let stranger = PrivateKey::from_bytes([4; 32]);
    assert_eq!(
        r.commit_own_rotation(next, &stranger, T0).unwrap_err(),
        RegistryError::NotRunningKey {
            registered: old.public_key(),
            running: stranger.public_key()
        }
    );
    let change = r.commit_own_rotation(next, &old, T0 + 3).unwrap();
    // Notices for the joined and the pending daemon host; not the static peer, not the
    // removed host.
    let noticed: Vec<PublicKey> = change
        .edits
        .iter()
        .filter_map(|e| match e {
            Edit::KeyNotice(n) => Some(n.host_key),
            _ => None,
        })
        .collect();
    assert_eq!(noticed, vec![key(7), key(50)]);
    assert!(change.audit[0].detail.ends_with("; 2 key notices"));
    r.apply(&change);
    assert_eq!(host(&r, "coord").public_key, next);
    assert!(r.retired.contains(&(old.public_key(), "coord".into())));
    assert!(r
        .commit_own_rotation(next, &old, T0 + 4)
        .unwrap()
        .is_empty());
}

#[test]
fn reports_and_candidates_are_checked_without_the_registry() {
    assert_eq!(
        check_report(0, &[]).unwrap_err(),
        RegistryError::ListenPortZero
    );
    let many = vec![ip("192.0.2.1"); MAX_REPORTED_ADDRESSES + 1];
    assert_eq!(
        check_report(1, &many).unwrap_err(),
        RegistryError::TooManyAddresses(MAX_REPORTED_ADDRESSES + 1)
    );
    let got = candidate_endpoints(
        "10.99.0.0/24".parse().unwrap(),
        &[
            ip("192.0.2.1"),
            ip("::ffff:192.0.2.1"),
            ip("fe80::1"),
            ip("169.254.1.1"),
            ip("10.99.0.9"),
            ip("2001:db8::1"),
        ],
        7,
    );
    assert_eq!(
        got,
        vec![
            "192.0.2.1:7".parse().unwrap(),
            "[2001:db8::1]:7".parse().unwrap()
        ]
    );
}

#[test]
fn invitation_states_round_trip_their_stored_words() {
    for s in [
        InviteState::Pending,
        InviteState::Used,
        InviteState::Revoked,
        InviteState::Expired,
    ] {
        assert_eq!(InviteState::parse(s.as_str()), Some(s));
    }
    assert_eq!(InviteState::parse("lost"), None);
}

#[test]
fn the_coordinator_registers_itself_once_and_then_follows_its_configuration() {
    let mut r = registry();
    let endpoints: Vec<SocketAddr> = vec!["198.51.100.1:51871".parse().unwrap()];
    // As it stands: only the endpoints are new.
    let change = r
        .register_coordinator(key(1), &endpoints, &[], T0 + 1)
        .unwrap();
    assert_eq!(change.audit.len(), 1);
    assert_eq!(change.audit[0].action, "coordinator_endpoints");
    assert!(r
        .register_coordinator(key(1), &endpoints, &endpoints, T0 + 1)
        .unwrap()
        .is_empty());
    // A new key, and a new address never handed out.
    r.settings.own_address = ip("10.99.0.6");
    let change = r
        .register_coordinator(key(2), &endpoints, &endpoints, T0 + 2)
        .unwrap();
    let actions: Vec<&str> = change.audit.iter().map(|a| a.action).collect();
    assert_eq!(actions, vec!["coordinator_address", "coordinator_key"]);
    r.apply(&change);
    let own = host(&r, "coord");
    assert_eq!((own.address, own.public_key), (ip("10.99.0.6"), key(2)));
    // An address another host had is refused, so is a key in use.
    let web = invite(&mut r, "web", 50, "a", T0).address;
    r.settings.own_address = web;
    assert_eq!(
        r.register_coordinator(key(2), &endpoints, &endpoints, T0)
            .unwrap_err(),
        RegistryError::CoordinatorAddressUsed(web)
    );
    r.settings.own_address = ip("10.99.0.6");
    assert!(matches!(
        r.register_coordinator(key(50), &endpoints, &endpoints, T0)
            .unwrap_err(),
        RegistryError::KeyInUse { .. }
    ));
}

#[test]
fn a_fresh_registry_gets_the_coordinator_row() {
    let mut r = registry();
    r.hosts.clear();
    let endpoints: Vec<SocketAddr> = vec!["198.51.100.1:51871".parse().unwrap()];
    let change = r.register_coordinator(key(1), &endpoints, &[], T0).unwrap();
    let Edit::AddHost(h) = &change.edits[0] else {
        panic!("{:?}", change.edits)
    };
    assert!(h.admin && !h.pending && !h.static_peer);
    assert_eq!((h.last_seen_unix, &h.reported), (Some(T0), &endpoints));
    assert_eq!(change.audit[0].action, "coordinator");
    // Its address held by another live host: refused.
    r.apply(&Change::default().with_edit(Edit::AddHost(NewHost {
        name: "web".into(),
        ..h.clone()
    })));
    assert_eq!(
        r.register_coordinator(key(3), &endpoints, &[], T0)
            .unwrap_err(),
        RegistryError::CoordinatorAddressHeld {
            address: ip("10.99.0.1"),
            host: "web".into()
        }
    );
}
