//! The tokio shell: the agent loop with its timer, SIGHUP, control requests and shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::{interval, MissedTickBehavior};

use mesh_proto::control::{Request, Response};

use crate::agent::{now, Agent};
use crate::backend::{LinkBackend, WgBackend};
use crate::client::HttpApi;
use crate::control::{accept_loop, Command};
use crate::error::{Error, Result};
use crate::member::{MemberRuntime, MeshEvent, ENDPOINT_CHECK};
use crate::protocol::{admin_route, handle_request, is_admin, relay_admin, AdminCall};
use crate::state::StateDir;

/// Serves admin requests in-process (the coordinator host).
pub type AdminHandler = Arc<dyn Fn(Request) -> AdminCall + Send + Sync>;

/// How the loop is connected to the mesh: the event channel (netmaps from the follower or
/// the in-process coordinator, reachability, endpoint reports) and, on the coordinator host,
/// the in-process admin handler.
pub struct MeshWiring {
    pub tx: mpsc::Sender<MeshEvent>,
    pub rx: mpsc::Receiver<MeshEvent>,
    pub admin: Option<AdminHandler>,
}

impl Default for MeshWiring {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(64);
        MeshWiring {
            tx,
            rx,
            admin: None,
        }
    }
}

fn ticker(period: Duration) -> tokio::time::Interval {
    let mut t = interval(period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

/// Run the agent until `shutdown` resolves: a pass at start, one every reconcile interval, a
/// reload and pass on SIGHUP or `meshctl reload`, and control requests in between. Returns the
/// agent so a caller (or test) can inspect it.
pub async fn run<W: WgBackend, L: LinkBackend>(
    agent: Agent<W, L>,
    listener: &UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<Agent<W, L>> {
    run_with(agent, listener, shutdown, MeshWiring::default()).await
}

/// Join from `[daemon] join_token_file` when not a member yet (unattended installs). Returns
/// whether to try again later (the coordinator did not answer).
async fn join_from_file<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    member: &mut MemberRuntime,
) -> bool {
    let Some(path) = agent.settings().join_token_file.clone() else {
        return false;
    };
    if agent.membership().is_some() || agent.settings().coordinator.is_some() {
        return false;
    }
    let token = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "cannot read the join token file");
            return false;
        }
    };
    match crate::member::join(agent, &member.state, &token, &HttpApi).await {
        Ok(m) => {
            tracing::info!(file = %path.display(), host = %m.host_name, address = %m.address, "joined from the token file");
            member.joined(agent).await;
            false
        }
        Err(e) => {
            tracing::error!(
                file = %path.display(),
                error = %e,
                retry = e.retryable,
                "join from the token file failed"
            );
            e.retryable
        }
    }
}

/// `run` with the mesh wiring (coordinator host: in-process admin and netmaps).
pub async fn run_with<W: WgBackend, L: LinkBackend>(
    mut agent: Agent<W, L>,
    listener: &UnixListener,
    shutdown: impl Future<Output = ()>,
    wiring: MeshWiring,
) -> Result<Agent<W, L>> {
    let MeshWiring {
        tx: mesh_tx,
        rx: mut mesh_rx,
        admin,
    } = wiring;
    let mut member = MemberRuntime::new(StateDir::new(&agent.settings().state_dir), mesh_tx);
    member.restore(&mut agent);
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| Error::io("cannot install the SIGHUP handler", e))?;
    let (tx, mut rx) = mpsc::channel::<Command>(32);
    let accept = accept_loop(listener, tx);
    tokio::pin!(accept);
    tokio::pin!(shutdown);
    let mut period = agent.settings().reconcile_interval;
    let mut timer = ticker(period);
    // The first pass runs before any control request is answered.
    timer.tick().await;
    agent.reconcile(now()).await;
    let mut retry_join = join_from_file(&mut agent, &mut member).await;
    let mut endpoint_timer = ticker(ENDPOINT_CHECK);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = &mut accept => {}
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading {}", agent.config_path().display());
                let _ = agent.handle_reload();
                agent.reconcile(now()).await;
            }
            Some(event) = mesh_rx.recv() => {
                member.on_event(&mut agent, event).await;
            }
            Some(cmd) = rx.recv() => {
                if is_admin(&cmd.request) {
                    // Admin calls may take a while (the coordinator API): answered from a task.
                    let Command { request, reply } = cmd;
                    let call = match (&admin, admin_route(&agent)) {
                        (Some(handler), _) => handler(request),
                        (None, Ok(api)) => relay_admin(api, request),
                        (None, Err(e)) => Box::pin(async move { Response::error(e) }),
                    };
                    tokio::spawn(async move {
                        let _ = reply.send(call.await);
                    });
                } else {
                    let response = handle_request(&mut agent, &mut member, cmd.request).await;
                    let _ = cmd.reply.send(response);
                }
            }
            _ = timer.tick() => {
                agent.reconcile(now()).await;
            }
            _ = endpoint_timer.tick() => {
                if retry_join && agent.membership().is_none() {
                    retry_join = join_from_file(&mut agent, &mut member).await;
                }
                member.check_endpoints(&mut agent).await;
            }
        }
        if agent.settings().reconcile_interval != period {
            period = agent.settings().reconcile_interval;
            timer = ticker(period);
            timer.reset();
        }
    }
    tracing::info!("stopping; the interface and its engine stay up");
    Ok(agent)
}

/// Install the SIGTERM/SIGINT handlers now and return a future that resolves on either.
pub fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::io("cannot install the SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Error::io("cannot install the SIGINT handler", e))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{FakeBackend, FakeLink};
    use crate::control::ControlSocket;
    use mesh_proto::control::{Request, Response};
    use mesh_proto::PrivateKey;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixStream;

    async fn exchange(path: &std::path::Path, line: &str) -> Option<String> {
        let mut s = UnixStream::connect(path).await.expect("connect");
        s.write_all(line.as_bytes()).await.expect("write");
        let mut r = BufReader::new(s);
        let mut out = String::new();
        let n = r.read_line(&mut out).await.expect("read");
        // After an error the server closes the connection.
        (n > 0).then_some(out)
    }

    #[tokio::test]
    async fn control_socket_survives_malformed_requests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/meshd.sock");
        let socket = ControlSocket::bind(&path).expect("bind");
        let peers = vec![crate::agent::tests::peer(1, Some(25))];
        let agent = Agent::new(
            FakeBackend::default(),
            FakeLink::default(),
            crate::agent::tests::settings(peers),
            PrivateKey::from_bytes([3; 32]),
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stop_rx.await;
        };
        let client = async {
            let bad = exchange(&path, "this is not json\n").await.expect("reply");
            assert!(
                matches!(Response::from_line(&bad), Ok(Response::Error { .. })),
                "{bad}"
            );
            let bad = exchange(&path, "{\"request\":\"format_disk\"}\n")
                .await
                .expect("reply");
            assert!(matches!(
                Response::from_line(&bad),
                Ok(Response::Error { .. })
            ));
            let ok = exchange(&path, &Request::Peers.to_line())
                .await
                .expect("reply");
            match Response::from_line(&ok).expect("decode") {
                Response::Peers { peers } => {
                    assert_eq!(peers.len(), 1);
                    assert_eq!(peers[0].name.as_deref(), Some("peer-1"));
                    assert_eq!(
                        peers[0].mesh_address,
                        Some("10.99.99.11".parse().expect("ip"))
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
            let st = exchange(&path, &Request::Status.to_line())
                .await
                .expect("reply");
            match Response::from_line(&st).expect("decode") {
                Response::Status(s) => {
                    assert_eq!(s.peers_total, 1);
                    assert!(s.backend.contains("ifindex 7"), "{}", s.backend);
                    assert!(s.last_reconcile_unix.is_some());
                }
                other => panic!("unexpected {other:?}"),
            }
            // Reload of a config file that does not exist: refused, daemon keeps serving.
            let rl = exchange(&path, &Request::Reload.to_line())
                .await
                .expect("reply");
            assert!(
                matches!(Response::from_line(&rl), Ok(Response::Error { .. })),
                "{rl}"
            );
            let st = exchange(&path, &Request::Status.to_line())
                .await
                .expect("reply");
            match Response::from_line(&st).expect("decode") {
                Response::Status(s) => {
                    assert!(s.last_error.is_some_and(|e| e.contains("reload refused")));
                }
                other => panic!("unexpected {other:?}"),
            }
            let _ = stop_tx.send(());
        };
        let (agent, ()) = tokio::join!(run(agent, &socket.listener, shutdown), client);
        let agent = agent.expect("run");
        assert_eq!(agent.wg.device.peers.len(), 1);
        drop(socket);
        assert!(!path.exists(), "control socket removed on shutdown");
    }
}
