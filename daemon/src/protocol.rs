//! Control requests → agent calls → control responses (mesh_proto::control types).

use crate::agent::Agent;
use crate::backend::{LinkBackend, WgBackend};
use crate::shim::control::{Request, Response};

/// Answer one control request.
pub async fn handle_request<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    request: Request,
) -> Response {
    match request {
        Request::Peers => match agent.peers().await {
            Ok(peers) => Response::Peers(peers.iter().map(|p| p.name.clone()).collect()),
            Err(e) => Response::Error(e.to_string()),
        },
        Request::Status => Response::Status(format!("{:?}", agent.status())),
        Request::Reload => match agent.handle_reload() {
            Ok(()) => {
                agent.reconcile(crate::agent::now()).await;
                Response::Ok
            }
            Err(e) => Response::Error(e.to_string()),
        },
    }
}
