//! Control requests → agent calls → control responses (`mesh_proto::control` types).

use mesh_proto::control::{PeerStatus, Request, Response, Status};

use crate::agent::{now, Agent, AgentStatus, PeerView};
use crate::backend::{LinkBackend, WgBackend};

/// A configured peer as `meshctl peers` shows it (live data if the device has the peer).
pub fn peer_status(view: &PeerView) -> PeerStatus {
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
    Status {
        host: st.host_name.clone(),
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
        last_error: st.last_error.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ifindex: None,
        netmap_version: None,
        coordinator: None,
    }
}

/// Answer one control request.
pub async fn handle_request<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    request: Request,
) -> Response {
    match request {
        Request::Peers => match agent.peers().await {
            Ok(views) => Response::Peers {
                peers: views.iter().map(peer_status).collect(),
            },
            Err(e) => Response::error(format!("cannot read the interface: {e}")),
        },
        Request::Status => {
            let peers: Vec<PeerStatus> = match agent.peers().await {
                Ok(views) => views.iter().map(peer_status).collect(),
                Err(_) => Vec::new(),
            };
            Response::Status(status(&agent.status(), &peers, now().as_secs()))
        }
        Request::Reload => match agent.handle_reload() {
            Ok(()) => {
                let report = agent.reconcile(now()).await;
                match report.error {
                    None => Response::ok(format!(
                        "reloaded {}: {} ops applied",
                        agent.config_path().display(),
                        report.ops.len()
                    )),
                    Some(e) => Response::ok(format!(
                        "reloaded {}, but the pass had errors: {e}",
                        agent.config_path().display()
                    )),
                }
            }
            Err(e) => Response::error(format!("{e}")),
        },
        Request::Join { .. }
        | Request::Invite(_)
        | Request::Invites
        | Request::RevokeInvite { .. }
        | Request::Hosts
        | Request::Remove { .. } => Response::error(
            "this meshd has no coordinator: it runs from a static configuration".to_string(),
        ),
    }
}
