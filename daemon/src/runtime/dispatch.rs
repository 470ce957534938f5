//! Control requests → agent calls → control responses (`mesh_proto::wire::control` types).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use mesh_proto::wire::control::{
    CoordinatorStatus, Done, HostState, PeerStatus, Request, Response, Status, ROLE_COORDINATOR,
    ROLE_MEMBER,
};

use crate::agent::{now, Agent, AgentStatus, PeerView};
use crate::backend::{LinkBackend, WgBackend};
use crate::member::client;
use crate::member::MemberRuntime;

/// A desired peer as `meshctl peers` shows it (live data if the device has the peer, what the
/// netmap knows for netmap peers).
pub fn peer_status(view: &PeerView, now_unix: u64) -> PeerStatus {
    let base = base_peer_status(view);
    match &view.netmap {
        Some(np) => base.with_netmap(np, now_unix),
        None => base,
    }
}

fn base_peer_status(view: &PeerView) -> PeerStatus {
    let mesh_address = view.mesh_address.map(|n| n.addr());
    match &view.observed {
        Some(obs) => PeerStatus::from_observed(obs, Some(view.name.clone()), mesh_address),
        None => PeerStatus {
            name: Some(view.name.clone()),
            public_key: view.public_key,
            mesh_address,
            allowed_ips: view.allowed_ips.clone(),
            endpoint: None,
            latest_handshake_unix: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: view.configured_keepalive,
            endpoint_kind: None,
            direct: None,
            key_age_secs: None,
            static_peer: false,
        },
    }
}

/// The daemon status as `meshctl status` shows it.
pub fn status(st: &AgentStatus, peers: &[PeerStatus], now_unix: u64) -> Status {
    let backend = match st.ifindex {
        Some(i) => format!("{} (ifindex {i})", st.backend),
        None => format!("{} (interface not up yet)", st.backend),
    };
    let state = match (st.mesh.api, st.address) {
        (Some(_), _) if st.mesh.is_coordinator => HostState::Coordinator,
        (Some(_), _) => HostState::Member,
        (None, None) => HostState::NeedsJoin,
        (None, Some(_)) => HostState::Static,
    };
    Status {
        host: st.host_name.clone(),
        state,
        interface: st.interface.clone(),
        public_key: st.public_key,
        mesh_address: st.address,
        listen_port: st.listen_port,
        backend,
        config_path: st.config_path.display().to_string(),
        peers_total: st.configured_peers,
        peers_recent_handshake: peers
            .iter()
            .filter(|p| p.has_recent_handshake(now_unix))
            .count(),
        last_reconcile_unix: st.last_pass.map(|d| d.as_secs()),
        last_error: st.last_error.clone().or_else(|| {
            st.mesh
                .last_error
                .as_ref()
                .map(|e| format!("coordinator: {e}"))
        }),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ifindex: st.ifindex,
        netmap_version: st.netmap_version,
        coordinator: st.mesh.api.map(|address| CoordinatorStatus {
            address,
            reachable: st.mesh.reachable.unwrap_or(false),
            last_contact_unix: st.mesh.last_contact_unix,
            role: if st.mesh.is_coordinator {
                ROLE_COORDINATOR
            } else {
                ROLE_MEMBER
            }
            .to_string(),
        }),
        // Filled in by the daemon loop, which holds the integration engine.
        integrations: Vec::new(),
        skipped_routes: st.skipped_routes.clone(),
        ungranted_routes: st.ungranted_routes.clone(),
        refused: st
            .refused
            .iter()
            .map(|(at_unix, what)| mesh_proto::wire::control::Refusal {
                at_unix: *at_unix,
                what: what.clone(),
            })
            .collect(),
        refused_total: None,
    }
}

/// The answer to a control request: now, or from a future the loop spawns (a join or a key
/// rotation waits on the coordinator, and the loop must not).
pub enum Answer {
    Now(Box<Response>),
    Later(AdminCall),
}

/// Answer one control request.
pub async fn handle_request<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    member: &mut MemberRuntime,
    request: Request,
) -> Answer {
    let now_response =
        match request {
            Request::Join { token } => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                member
                    .start_join(agent, &token, crate::member::JoinOrigin::Control(tx))
                    .await;
                return Answer::Later(Box::pin(async move {
                    match rx.await {
                        Ok(Ok(m)) => Response::done(
                            format!(
                                "joined the mesh {} as {} with address {}",
                                m.mesh_cidr, m.host_name, m.address
                            ),
                            Done::Joined {
                                mesh: m.mesh_cidr,
                                host: m.host_name.clone(),
                                address: m.address,
                            },
                        ),
                        Ok(Err(e)) => Response::error(e.message),
                        Err(_) => Response::error("meshd stopped before the join ended"),
                    }
                }));
            }
            Request::Rotate => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                member.rotate_now(agent, Some(tx)).await;
                return Answer::Later(Box::pin(async move {
                    match rx.await {
                        Ok(Ok(outcome)) => Response::done(outcome.to_string(), outcome.done()),
                        Ok(Err(e)) => Response::error(e.to_string()),
                        Err(_) => Response::error("meshd stopped before the key rotation ended"),
                    }
                }));
            }
            Request::Peers => match agent.peers().await {
                Ok(views) => Response::Peers {
                    peers: views
                        .iter()
                        .map(|v| peer_status(v, now().as_secs()))
                        .collect(),
                },
                Err(e) => Response::error(format!("cannot read the interface: {e}")),
            },
            Request::Status => {
                let peers: Vec<PeerStatus> = match agent.peers().await {
                    Ok(views) => views
                        .iter()
                        .map(|v| peer_status(v, now().as_secs()))
                        .collect(),
                    Err(_) => Vec::new(),
                };
                let mut st = status(&agent.status(), &peers, now().as_secs());
                if let Some(coord) = &member.coordinator {
                    let (total, recent) = coord.api_refusals();
                    st.refused_total = Some(total);
                    st.refused.extend(recent.into_iter().map(|(at_unix, what)| {
                        mesh_proto::wire::control::Refusal { at_unix, what }
                    }));
                }
                Response::Status(st)
            }
            // The join runs with its bootstrap key and peer; a reload would put the configured
            // key back under it.
            Request::Reload if member.joining() => Response::error(
                "a join is in progress: reload once it has ended (see meshctl status)",
            ),
            Request::Reload => match agent.handle_reload() {
                Ok(()) => {
                    let report = agent.reconcile(now()).await;
                    // A changed routes.advertise reaches the coordinator now, not at the next
                    // endpoint check.
                    let advertise = member.advertise_unreported(agent);
                    member.check_endpoints(agent).await;
                    let note = if advertise {
                        "; routes.advertise changed: reported to the coordinator (new prefixes are \
                     pending until an admin approves them: meshctl routes)"
                    } else {
                        ""
                    };
                    let config = agent.config_path().display().to_string();
                    let message = match &report.error {
                        None => {
                            format!("reloaded {config}: {} ops applied{note}", report.ops.len())
                        }
                        Some(e) => format!("reloaded {config}, but the pass had errors: {e}{note}"),
                    };
                    Response::done(
                        message,
                        Done::Reloaded {
                            config,
                            ops_applied: report.ops.len(),
                            error: report.error,
                            advertise_reported: advertise,
                        },
                    )
                }
                Err(e) => Response::error(format!("{e}")),
            },
            Request::Doctor => Response::Doctor(crate::doctor::run_daemon(agent).await),
            // The loop answers `down` itself (it has to stop after answering).
            Request::Down => Response::error("down is handled by the daemon loop"),
            Request::Invite(_)
            | Request::Invites
            | Request::RevokeInvite { .. }
            | Request::Hosts
            | Request::Remove { .. }
            | Request::RotateHost { .. }
            | Request::StaticConfig { .. }
            | Request::Routes
            | Request::RouteDecision { .. } => Response::error("not an admin request".to_string()),
        };
    Answer::Now(Box::new(now_response))
}

/// The reply to `meshctl rotate NAME` once the coordinator took the request.
pub fn rotation_asked_message(name: &str) -> String {
    format!(
        "asked {name} to rotate its key: it rotates as soon as its netmap says so (now, if it \
         is online; otherwise when it comes back)"
    )
}

/// The replies to admin calls that change something, the same whether the coordinator runs
/// here or the call was relayed: the message in words and the typed outcome.
pub mod admin_reply {
    use mesh_proto::wire::control::{Done, Response};

    pub fn revoked(name: String) -> Response {
        Response::done(
            format!("invitation for {name} revoked"),
            Done::InvitationRevoked { name },
        )
    }

    pub fn removed(name: String) -> Response {
        Response::done(
            format!("{name} removed from the mesh"),
            Done::Removed { host: name },
        )
    }

    pub fn rotation_asked(name: String) -> Response {
        Response::done(
            super::rotation_asked_message(&name),
            Done::RotationRequested { host: name },
        )
    }

    pub fn static_config(name: String, config: String) -> Response {
        Response::done(
            config.clone(),
            Done::StaticConfig {
                name,
                wg_quick_config: config,
            },
        )
    }

    pub fn route_decided(route: mesh_proto::routes::RouteInfo) -> Response {
        Response::done(
            super::route_decided_message(&route),
            Done::RouteDecided { route },
        )
    }
}

/// Whether a request is a coordinator admin call.
pub fn is_admin(request: &Request) -> bool {
    matches!(
        request,
        Request::Invite(_)
            | Request::Invites
            | Request::RevokeInvite { .. }
            | Request::Hosts
            | Request::Remove { .. }
            | Request::RotateHost { .. }
            | Request::StaticConfig { .. }
            | Request::Routes
            | Request::RouteDecision { .. }
    )
}

/// The reply to `meshctl routes approve|revoke HOST PREFIX`.
pub fn route_decided_message(info: &mesh_proto::routes::RouteInfo) -> String {
    use mesh_proto::routes::RouteState;
    let effect = match (info.state, info.advertised) {
        (RouteState::Approved, true) => {
            "it is in the netmaps now; hosts whose routes.accept covers it route it to"
        }
        (RouteState::Approved, false) => "it reaches the netmaps when it is advertised again by",
        (_, _) => "it is in no netmap; hosts that routed it stop routing it to",
    };
    let mut msg = format!(
        "{} of {} is {}: {effect} {}",
        info.prefix, info.host, info.state, info.host
    );
    if info.state == RouteState::Approved {
        if let Some((range, what)) = mesh_proto::routes::always_refused()
            .into_iter()
            .find(|(r, _)| mesh_proto::routes::overlaps(r, &info.prefix))
        {
            msg.push_str(&format!(
                " (but every host refuses it: it overlaps {range}, {what}; revoke it)"
            ));
        }
    }
    msg
}

/// An admin request as a future that does not borrow the agent (it may run in a task).
pub type AdminCall = Pin<Box<dyn Future<Output = Response> + Send>>;

/// Relay an admin request to the coordinator API (this host is flagged admin).
pub fn relay_admin(api: SocketAddr, signer: client::Signer, request: Request) -> AdminCall {
    Box::pin(async move {
        let signer = &signer;
        let refused = |e: client::CallError| Response::error(format!("coordinator: {e}"));
        match request {
            Request::Invite(req) => match client::invite(api, signer, &req).await {
                Ok(r) => Response::Invite(r),
                Err(e) => refused(e),
            },
            Request::Invites => match client::invites(api, signer).await {
                Ok(invites) => Response::Invites { invites },
                Err(e) => refused(e),
            },
            Request::RevokeInvite { name } => match client::revoke_invite(api, signer, &name).await
            {
                Ok(()) => admin_reply::revoked(name),
                Err(e) => refused(e),
            },
            Request::Hosts => match client::hosts(api, signer).await {
                Ok(hosts) => Response::Hosts { hosts },
                Err(e) => refused(e),
            },
            Request::Remove { name } => match client::remove(api, signer, &name).await {
                Ok(()) => admin_reply::removed(name),
                Err(e) => refused(e),
            },
            Request::RotateHost { name } => {
                match client::request_rotation(api, signer, &name).await {
                    Ok(()) => admin_reply::rotation_asked(name),
                    Err(e) => refused(e),
                }
            }
            Request::StaticConfig { name } => match client::static_config(api, signer, &name).await
            {
                Ok(config) => admin_reply::static_config(name, config),
                Err(e) => refused(e),
            },
            Request::Routes => match client::routes(api, signer).await {
                Ok(routes) => Response::Routes { routes },
                Err(e) => refused(e),
            },
            Request::RouteDecision {
                decision,
                host,
                prefix,
            } => {
                let req = mesh_proto::routes::RouteDecisionRequest { host, prefix };
                match client::decide_route(api, signer, decision, &req).await {
                    Ok(info) => admin_reply::route_decided(info),
                    Err(e) => refused(e),
                }
            }
            _ => Response::error("not an admin request"),
        }
    })
}

/// Why a host cannot serve admin requests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAdmin {
    /// A member, but not invited with `--admin`.
    #[error(
        "{host} is not an admin host of the mesh: run this on the coordinator host, or invite an \
         admin host with `meshctl invite NAME --admin`"
    )]
    Member { host: String },
    /// Neither a coordinator nor a member.
    #[error(
        "this meshd is not part of a managed mesh (no [coordinator] in its configuration and \
         not joined); run this on the coordinator host"
    )]
    NotManaged,
}

/// Where this host relays admin requests (the coordinator's API), or why it cannot.
pub fn admin_route<W: WgBackend, L: LinkBackend>(
    agent: &Agent<W, L>,
) -> Result<SocketAddr, NotAdmin> {
    match agent.membership() {
        Some(m) if m.admin => Ok(m.api_addr()),
        Some(m) => Err(NotAdmin::Member {
            host: m.host_name.clone(),
        }),
        None => Err(NotAdmin::NotManaged),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-connection-per-answer HTTP server holding the coordinator key `coord`: answers
    /// each request with the next canned (status, body), signed for the request's proof, and
    /// records the request line.
    async fn canned(
        coord: mesh_proto::PrivateKey,
        answers: Vec<(u16, &'static str)>,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let at = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (status, body) in answers {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.expect("read");
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                seen.push(req.lines().next().unwrap_or_default().to_string());
                let proof = req
                    .lines()
                    .find_map(|l| l.strip_prefix("x-meshd-auth: "))
                    .map(|v| mesh_proto::wire::auth::Proof::parse(v.trim()).expect("proof"))
                    .expect("the request is signed");
                let key = mesh_proto::wire::auth::AuthKey::for_coordinator(&coord, &proof.key)
                    .expect("auth key");
                let sig = key.sign_response(&proof.nonce, status, body.as_bytes());
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\nx-meshd-auth: {sig}\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(resp.as_bytes()).await.expect("write");
            }
            seen
        });
        (at, task)
    }

    #[test]
    fn an_approval_of_space_every_host_refuses_says_so() {
        use mesh_proto::routes::{RouteInfo, RouteState};
        let info = RouteInfo {
            host: "dock-dash".into(),
            prefix: "127.0.0.0/8".parse().expect("net"),
            state: RouteState::Approved,
            advertised: true,
            decided_unix: Some(1),
        };
        let msg = route_decided_message(&info);
        assert!(
            msg.contains("every host refuses it: it overlaps 127.0.0.0/8, loopback"),
            "{msg}"
        );
        let fine = RouteInfo {
            prefix: "192.168.1.20/32".parse().expect("net"),
            ..info
        };
        assert!(!route_decided_message(&fine).contains("refuses"));
    }

    #[tokio::test]
    async fn route_requests_are_relayed_to_the_coordinator_api() {
        let coord = mesh_proto::PrivateKey::generate();
        let signer = client::Signer::new(&mesh_proto::PrivateKey::generate(), &coord.public_key())
            .expect("signer");
        let (at, server) = canned(coord, vec![
            (200, "[]"),
            (
                200,
                r#"{"host":"dock-edge","prefix":"192.168.1.20/32","state":"approved","advertised":true,"decided_unix":5}"#,
            ),
            (404, r#"{"error":"dock-edge does not advertise 9.9.9.9/32"}"#),
        ])
        .await;
        assert!(is_admin(&Request::Routes));
        let r = relay_admin(at, signer.clone(), Request::Routes).await;
        assert_eq!(r, Response::Routes { routes: Vec::new() });
        let decide = |prefix: &str, decision| Request::RouteDecision {
            decision,
            host: "dock-edge".into(),
            prefix: prefix.parse().expect("net"),
        };
        use mesh_proto::routes::RouteDecision;
        match relay_admin(
            at,
            signer.clone(),
            decide("192.168.1.20/32", RouteDecision::Approve),
        )
        .await
        {
            Response::Ok { message, done } => {
                assert!(
                    message.starts_with(
                        "192.168.1.20/32 of dock-edge is approved: it is in the netmaps now"
                    ),
                    "{message}"
                );
                match done {
                    Some(Done::RouteDecided { route }) => {
                        assert_eq!(route.prefix.to_string(), "192.168.1.20/32");
                        assert_eq!(route.host, "dock-edge");
                    }
                    other => panic!("no typed outcome: {other:?}"),
                }
            }
            other => panic!("unexpected {other:?}"),
        }
        match relay_admin(
            at,
            signer.clone(),
            decide("9.9.9.9/32", RouteDecision::Revoke),
        )
        .await
        {
            Response::Error { message } => {
                assert!(
                    message.contains("does not advertise 9.9.9.9/32"),
                    "{message}"
                )
            }
            other => panic!("unexpected {other:?}"),
        }
        let seen = server.await.expect("server");
        assert_eq!(
            seen,
            vec![
                "GET /v1/admin/routes HTTP/1.1",
                "POST /v1/admin/routes/approve HTTP/1.1",
                "POST /v1/admin/routes/revoke HTTP/1.1",
            ]
        );
    }

    #[tokio::test]
    async fn admin_requests_are_relayed_to_the_coordinator_api() {
        let coord = mesh_proto::PrivateKey::generate();
        let signer = client::Signer::new(&mesh_proto::PrivateKey::generate(), &coord.public_key())
            .expect("signer");
        let (at, server) = canned(
            coord,
            vec![
                (200, "[]"),
                (204, ""),
                (403, r#"{"error":"10.99.99.3 is not an admin host"}"#),
            ],
        )
        .await;
        let r = relay_admin(at, signer.clone(), Request::Hosts).await;
        assert_eq!(r, Response::Hosts { hosts: Vec::new() });
        let r = relay_admin(
            at,
            signer.clone(),
            Request::RevokeInvite {
                name: "dock-dash".into(),
            },
        )
        .await;
        assert!(matches!(r, Response::Ok { .. }), "{r:?}");
        let r = relay_admin(
            at,
            signer.clone(),
            Request::Remove {
                name: "dock-dash".into(),
            },
        )
        .await;
        match r {
            Response::Error { message } => {
                assert!(message.contains("is not an admin host"), "{message}")
            }
            other => panic!("unexpected {other:?}"),
        }
        let seen = server.await.expect("server");
        assert_eq!(
            seen,
            vec![
                "GET /v1/admin/hosts HTTP/1.1",
                "DELETE /v1/admin/invites/dock-dash HTTP/1.1",
                "DELETE /v1/admin/hosts/dock-dash HTTP/1.1",
            ]
        );
    }
}
