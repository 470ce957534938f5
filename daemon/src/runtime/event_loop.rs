//! The tokio shell: the agent loop with its timer, SIGHUP, control requests and shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::{interval, MissedTickBehavior};

use mesh_proto::wire::control::{Request, Response};

use crate::agent::{now, Agent, AgentStatus};
use crate::backend::{LinkBackend, WgBackend};
use crate::disk::state::StateDir;
use crate::error::{Error, Result};
use crate::handoff::Handoff;
use crate::member::{JoinOrigin, MemberRuntime, MeshEvent};
use crate::runtime::control_socket::{accept_loop, Command};
use crate::runtime::dispatch::{
    admin_route, handle_request, is_admin, relay_admin, AdminCall, Answer,
};
use crate::runtime::sd_notify::Notifier;

/// Serves admin requests in-process (the coordinator host).
pub type AdminHandler = Arc<dyn Fn(Request) -> AdminCall + Send + Sync>;

/// How the loop is connected to the mesh: the event channel (netmaps from the follower or
/// the in-process coordinator, reachability, endpoint reports) and, on the coordinator host,
/// the in-process admin handler.
pub struct MeshWiring {
    pub tx: mpsc::Sender<MeshEvent>,
    pub rx: mpsc::Receiver<MeshEvent>,
    pub admin: Option<AdminHandler>,
    /// The coordinator host's registry (its own key rotates through it).
    pub coordinator: Option<crate::coordinator::Coordinator>,
}

impl Default for MeshWiring {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(64);
        MeshWiring {
            tx,
            rx,
            admin: None,
            coordinator: None,
        }
    }
}

fn ticker(period: Duration) -> tokio::time::Interval {
    let mut t = interval(period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

/// Why the loop returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM/SIGINT (or the caller's shutdown future): everything stays up.
    Signal,
    /// `meshctl down`: everything we own was removed (`removed` lists it); exit 0.
    Down { removed: Vec<String> },
}

/// Run the agent until `shutdown` resolves: a pass at start, one every reconcile interval, a
/// reload and pass on SIGHUP or `meshctl reload`, and control requests in between. Returns the
/// agent so a caller (or test) can inspect it.
pub async fn run<W: WgBackend, L: LinkBackend>(
    agent: Agent<W, L>,
    listener: &UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<Agent<W, L>> {
    Ok(run_with(agent, listener, shutdown, MeshWiring::default())
        .await?
        .0)
}

/// Readiness (sd_notify `READY=1`): the interface exists with our address and the last pass
/// configured it and the peers without an error; on a member of a managed mesh (or the
/// coordinator host) a netmap has been applied too (the one cached from the last run counts:
/// the mesh comes back while the coordinator is down). A host not joined yet has no address,
/// so it is never ready: units ordered after `meshd-online.target` wait for the join.
pub fn is_ready(st: &AgentStatus, managed: bool) -> bool {
    st.passes > 0
        && st.ifindex.is_some()
        && st.address.is_some()
        && st.last_error.is_none()
        && st.last_pass_failed_ops == 0
        && (!managed || st.netmap_version.is_some())
}

/// The `STATUS=` line for systemd.
pub fn status_line(st: &AgentStatus, managed: bool) -> String {
    match (st.address, &st.last_error) {
        (None, _) => "not joined: waiting for `meshctl join -` (the token on stdin)".to_owned(),
        (Some(_), Some(e)) => format!("last pass failed: {e}"),
        (Some(a), None) if st.ifindex.is_none() => format!("bringing {} up with {a}", st.interface),
        (Some(_), None) if managed && st.netmap_version.is_none() => {
            "waiting for the netmap from the coordinator".to_owned()
        }
        (Some(a), None) => format!(
            "{} up with {a}, {} peers configured",
            st.interface, st.configured_peers
        ),
    }
}

fn managed<W: WgBackend, L: LinkBackend>(agent: &Agent<W, L>) -> bool {
    agent.membership().is_some() || agent.settings().coordinator.is_some()
}

fn notify_state<W: WgBackend, L: LinkBackend>(agent: &Agent<W, L>, notifier: &mut Notifier) {
    let st = agent.status();
    let managed = managed(agent);
    let line = status_line(&st, managed);
    if !notifier.is_ready() && is_ready(&st, managed) {
        tracing::info!(status = %line, "ready");
        notifier.ready(&line);
    } else {
        notifier.status(&line);
    }
}

/// `meshctl down` inside the daemon: everything we own on this host. Returns what was
/// removed, or what failed.
async fn down<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    handoff: &mut Handoff,
) -> std::result::Result<Vec<String>, String> {
    let settings = agent.settings().clone();
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    // Stop writing files and serving first, so nothing puts the hosts block back.
    handoff.stop().await;
    let (r, f) = crate::handoff::teardown(&settings.interface, &handoff.settings().integrations);
    removed.extend(r);
    failed.extend(f);
    match crate::runtime::startup::teardown_owned(&settings).await {
        Ok(list) => removed.extend(list),
        Err(e) => failed.push(e.to_string()),
    }
    match agent.link.delete(&settings.interface).await {
        Ok(()) => removed.push(format!("removed interface {}", settings.interface)),
        Err(e) => failed.push(e.to_string()),
    }
    if failed.is_empty() {
        Ok(removed)
    } else {
        Err(format!(
            "{}; failed: {}",
            if removed.is_empty() {
                "removed nothing".to_owned()
            } else {
                removed.join(", ")
            },
            failed.join("; ")
        ))
    }
}

/// Join from `[daemon] join_token_file` when not a member yet (unattended installs): the join
/// starts now and ends on the loop (`MemberRuntime::start_join`), which removes the spent file
/// or has the policy try again later (`member.file_join_due`) when the coordinator did not
/// answer. A token file refused
/// (a symbolic link, not root's, group- or world-readable) is kept in `refusal` for `meshctl
/// status`.
async fn join_from_file<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    member: &mut MemberRuntime,
    refusal: &mut Option<mesh_proto::wire::control::Refusal>,
) {
    let Some(path) = agent.settings().join_token_file.clone() else {
        return;
    };
    if agent.membership().is_some() || agent.settings().coordinator.is_some() || member.joining() {
        return;
    }
    let token = match crate::disk::read_secret_file(&path) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "cannot use the join token file");
            *refusal = Some(mesh_proto::wire::control::Refusal {
                at_unix: now().as_secs(),
                what: format!("join_token_file: {e}"),
            });
            return;
        }
    };
    *refusal = None;
    member
        .start_join(agent, &token, JoinOrigin::File(path))
        .await;
}

/// Answer a control request from a task once `answer` is ready; the loop goes on meanwhile.
fn reply_later(
    reply: tokio::sync::oneshot::Sender<Response>,
    answer: impl Future<Output = Response> + Send + 'static,
) {
    tokio::spawn(async move {
        let _ = reply.send(answer.await);
    });
}

/// SIGHUP: reload the configuration (the agent's part and the hand-offs', from one parse),
/// then a pass; a changed routes.advertise reaches the coordinator now.
async fn sighup<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    member: &mut MemberRuntime,
    handoff: &mut Handoff,
) {
    tracing::info!("SIGHUP: reloading {}", agent.config_path().display());
    if agent.handle_reload().is_ok() {
        handoff.reload(agent.settings().handoff.clone());
    }
    agent.reconcile(now()).await;
    member.check_endpoints(agent).await;
}

/// `run` with the mesh wiring (coordinator host: in-process admin and netmaps).
pub async fn run_with<W: WgBackend, L: LinkBackend>(
    mut agent: Agent<W, L>,
    listener: &UnixListener,
    shutdown: impl Future<Output = ()>,
    wiring: MeshWiring,
) -> Result<(Agent<W, L>, Stop)> {
    let mut notifier = Notifier::from_env();
    let mut stop = Stop::Signal;
    let MeshWiring {
        tx: mesh_tx,
        rx: mut mesh_rx,
        admin,
        coordinator,
    } = wiring;
    let mut member = MemberRuntime::new(StateDir::new(&agent.settings().state_dir), mesh_tx);
    member.coordinator = coordinator;
    member.restore(&mut agent).await;
    // The coordinator host's own netmap before the first pass: without it the pass would plan
    // every peer away on a restart (and drop their WireGuard sessions) until the feed's first
    // netmap arrives.
    if let Some(coord) = &member.coordinator {
        match crate::runtime::blocking::run(|| coord.own_netmap(std::time::Instant::now())) {
            Ok(Some((nm, _))) => {
                agent.set_netmap(nm);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot compute the coordinator's own netmap"),
        }
    }
    let mut handoff = Handoff::start(
        agent.settings().handoff.clone(),
        &agent.settings().interface,
    );
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
    handoff.after_pass(&mut agent).await;
    notify_state(&agent, &mut notifier);
    let mut join_refusal = None;
    join_from_file(&mut agent, &mut member, &mut join_refusal).await;
    // The member policy's timer (endpoint checks, the rotation schedule, retries).
    let policy_timer = tokio::time::sleep(member.timer_in());
    tokio::pin!(policy_timer);
    let mut reload_after_join = false;
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = &mut accept => {}
            _ = hup.recv() => {
                if member.joining() {
                    // The join runs with its bootstrap key and peer: reload once it ended.
                    tracing::info!("SIGHUP during a join: reloading once the join has ended");
                    reload_after_join = true;
                } else {
                    sighup(&mut agent, &mut member, &mut handoff).await;
                }
            }
            Some(event) = mesh_rx.recv() => {
                member.on_event(&mut agent, event).await;
            }
            Some(cmd) = rx.recv() => {
                if cmd.request == Request::Down {
                    tracing::info!("meshctl down: removing everything meshd owns on this host");
                    notifier.stopping("meshctl down: removing the interface, routes and firewall table");
                    let result = down(&mut agent, &mut handoff).await;
                    let reply = match &result {
                        Ok(removed) => Response::done(
                            format!("{}; meshd exits", removed.join(", ")),
                            mesh_proto::wire::control::Done::Down {
                                removed: removed.clone(),
                            },
                        ),
                        Err(e) => Response::error(format!("{e}; meshd exits")),
                    };
                    match &result {
                        Ok(removed) => tracing::info!(removed = ?removed, "down"),
                        Err(e) => tracing::error!(error = %e, "down"),
                    }
                    let _ = cmd.reply.send(reply);
                    // meshd exits next: let the connection write the answer first.
                    let _ = tokio::time::timeout(Duration::from_secs(2), cmd.written).await;
                    stop = Stop::Down {
                        removed: result.unwrap_or_default(),
                    };
                    break;
                } else if cmd.request == Request::Doctor {
                    // The probes take seconds: answered from a task, the loop goes on.
                    let mut input = crate::doctor::gather(&mut agent).await;
                    input.integrations = handoff.statuses();
                    reply_later(cmd.reply, async move {
                        Response::Doctor(crate::doctor::run(input).await)
                    });
                } else if is_admin(&cmd.request) {
                    // Admin calls may take a while (the coordinator API): answered from a task.
                    let Command { request, reply, .. } = cmd;
                    let call = match (&admin, admin_route(&agent)) {
                        (Some(handler), _) => handler(request),
                        (None, Ok(api)) => match agent.signer() {
                            Ok(signer) => relay_admin(api, signer, request),
                            Err(e) => {
                                let e = e.to_string();
                                Box::pin(async move { Response::error(e) })
                            }
                        },
                        (None, Err(e)) => Box::pin(async move { Response::error(e.to_string()) }),
                    };
                    reply_later(reply, call);
                } else {
                    let reload = cmd.request == Request::Reload;
                    match handle_request(&mut agent, &mut member, cmd.request).await {
                        // A join or a rotation: answered when it ends, the loop goes on.
                        Answer::Later(call) => reply_later(cmd.reply, call),
                        Answer::Now(response) => {
                            let mut response = *response;
                            if reload && matches!(response, Response::Ok { .. }) {
                                handoff.reload(agent.settings().handoff.clone());
                            }
                            if let Response::Status(st) = &mut response {
                                st.integrations = handoff.statuses();
                                if agent.membership().is_none() {
                                    st.refused.extend(join_refusal.clone());
                                }
                            }
                            let _ = cmd.reply.send(response);
                        }
                    }
                }
            }
            _ = timer.tick() => {
                agent.reconcile(now()).await;
            }
            () = &mut policy_timer => {
                member.on_timer(&mut agent).await;
            }
        }
        if std::mem::take(&mut member.file_join_due) && agent.membership().is_none() {
            join_from_file(&mut agent, &mut member, &mut join_refusal).await;
        }
        policy_timer
            .as_mut()
            .reset(tokio::time::Instant::now() + member.timer_in());
        if reload_after_join && !member.joining() {
            reload_after_join = false;
            sighup(&mut agent, &mut member, &mut handoff).await;
        }
        handoff.after_pass(&mut agent).await;
        handoff.metrics().set_member_counts(member.counts);
        if let Some(coord) = &member.coordinator {
            match crate::runtime::blocking::run(|| coord.stats()) {
                Ok(stats) => handoff.metrics().set_coordinator(Some(stats)),
                Err(e) => tracing::debug!(error = %e, "metrics: coordinator figures unavailable"),
            }
        }
        if agent.settings().reconcile_interval != period {
            period = agent.settings().reconcile_interval;
            timer = ticker(period);
            timer.reset();
        }
        notify_state(&agent, &mut notifier);
    }
    if stop == Stop::Signal {
        handoff.stop().await;
        tracing::info!("stopping; the interface and its engine stay up");
        notifier.stopping("stopping; the interface and its peers stay up");
    }
    Ok((agent, stop))
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
    use crate::runtime::control_socket::ControlSocket;
    use mesh_proto::wire::control::{Request, Response};
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

    #[tokio::test]
    async fn down_removes_the_interface_and_stops_the_loop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/meshd.sock");
        let socket = ControlSocket::bind(&path).expect("bind");
        let agent = Agent::new(
            FakeBackend::default(),
            FakeLink::default(),
            crate::agent::tests::settings(vec![crate::agent::tests::peer(1, None)]),
            PrivateKey::from_bytes([3; 32]),
        );
        let never = std::future::pending::<()>();
        let client = async {
            let r = exchange(&path, &Request::Down.to_line())
                .await
                .expect("reply");
            match Response::from_line(&r).expect("decode") {
                Response::Ok { message, done } => {
                    assert!(message.contains("interface wgtest0"), "{message}");
                    match done {
                        Some(mesh_proto::wire::control::Done::Down { removed }) => assert!(
                            removed.iter().any(|r| r.contains("interface wgtest0")),
                            "{removed:?}"
                        ),
                        other => panic!("down without its typed outcome: {other:?}"),
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        };
        let (out, ()) = tokio::join!(
            run_with(agent, &socket.listener, never, MeshWiring::default()),
            client
        );
        let (agent, stop) = out.expect("run");
        assert!(matches!(stop, Stop::Down { .. }), "{stop:?}");
        assert!(agent.link.deleted);
    }

    #[tokio::test]
    async fn ready_once_the_interface_has_its_address_and_peers() {
        let mut agent = Agent::new(
            FakeBackend::default(),
            FakeLink::default(),
            crate::agent::tests::settings(vec![crate::agent::tests::peer(1, None)]),
            PrivateKey::from_bytes([3; 32]),
        );
        assert!(!is_ready(&agent.status(), false));
        agent.reconcile(now()).await;
        let st = agent.status();
        assert!(is_ready(&st, false), "{st:?}");
        assert_eq!(agent.wg.device.peers.len(), 1);
        // A member of a managed mesh also waits for a netmap.
        assert!(!is_ready(&st, true));
        assert_eq!(
            status_line(&st, true),
            "waiting for the netmap from the coordinator"
        );
        assert!(
            status_line(&st, false).contains("up with"),
            "{}",
            status_line(&st, false)
        );
        let mut unjoined = st.clone();
        unjoined.address = None;
        assert!(!is_ready(&unjoined, false));
        assert!(status_line(&unjoined, false).starts_with("not joined"));
    }

    /// A coordinator API that accepts connections and never answers: a join or a rotation
    /// waits on it for as long as the test likes. Sends each request's first line; aborting
    /// the task closes every connection.
    async fn silent_api(
        ip: &str,
    ) -> (
        std::net::SocketAddr,
        mpsc::UnboundedReceiver<String>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                let mut r = BufReader::new(stream);
                let mut line = String::new();
                if r.read_line(&mut line).await.is_ok() {
                    let _ = tx.send(line);
                }
                held.push(r);
            }
        });
        (addr, rx, task)
    }

    async fn wait_for_request(seen: &mut mpsc::UnboundedReceiver<String>, path: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, seen.recv()).await {
                Ok(Some(line)) if line.contains(path) => return,
                Ok(Some(_)) => {}
                _ => panic!("no request for {path} reached the coordinator in time"),
            }
        }
    }

    /// `meshctl status` five times; every answer's latency.
    async fn status_latencies(path: &std::path::Path) -> Vec<Duration> {
        let mut out = Vec::new();
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let reply = tokio::time::timeout(
                Duration::from_secs(5),
                exchange(path, &Request::Status.to_line()),
            )
            .await
            .expect("status answered within 5 s while the loop is busy")
            .expect("reply");
            out.push(t.elapsed());
            assert!(
                matches!(Response::from_line(&reply), Ok(Response::Status(_))),
                "{reply}"
            );
        }
        out
    }

    fn assert_prompt(what: &str, mut latencies: Vec<Duration>) {
        latencies.sort();
        println!("MEASURED meshctl status during {what}: {latencies:?}");
        assert!(
            latencies[latencies.len() / 2] < Duration::from_millis(100),
            "status took {latencies:?} (median over 100 ms) while {what} was in flight"
        );
    }

    fn key_file(dir: &std::path::Path, key: &PrivateKey) -> std::path::PathBuf {
        let path = dir.join("private.key");
        crate::disk::state::write_atomic(&path, format!("{}\n", key.to_base64()).as_bytes())
            .expect("key file");
        path
    }

    #[tokio::test]
    async fn status_answers_while_a_rotation_waits_on_the_coordinator() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("run/meshd.sock");
        let socket = ControlSocket::bind(&sock).expect("bind");
        let (api, mut seen, server) = silent_api("127.0.0.1").await;
        let key = PrivateKey::from_bytes([60; 32]);
        let mut settings = crate::agent::tests::settings(Vec::new());
        settings.private_key_file = key_file(dir.path(), &key);
        settings.state_dir = dir.path().join("state");
        crate::disk::state::StateDir::new(&settings.state_dir)
            .save_membership(&crate::disk::state::Membership {
                host_name: "dock-mirror".into(),
                address: "10.99.99.3".parse().expect("ip"),
                mesh_cidr: "10.99.99.0/24".parse().expect("net"),
                coordinator_public_key: PrivateKey::from_bytes([100; 32]).public_key(),
                // Loopback only: nothing leaves the machine.
                coordinator_endpoints: vec!["127.0.0.1:9".parse().expect("sa")],
                coordinator_address: api.ip(),
                api_port: api.port(),
                admin: false,
                joined_unix: 1,
            })
            .expect("membership");
        let agent = Agent::new(FakeBackend::default(), FakeLink::default(), settings, key);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stop_rx.await;
        };
        let client = async {
            let path = sock.clone();
            let rotate =
                tokio::spawn(async move { exchange(&path, &Request::Rotate.to_line()).await });
            wait_for_request(&mut seen, "/v1/rotate/prepare").await;
            let latencies = status_latencies(&sock).await;
            assert!(!rotate.is_finished(), "the rotation is still waiting");
            assert_prompt("a key rotation", latencies);
            // The coordinator goes away: the rotation is deferred, and says so.
            server.abort();
            let reply = tokio::time::timeout(Duration::from_secs(20), rotate)
                .await
                .expect("the rotation ended")
                .expect("task")
                .expect("reply");
            match Response::from_line(&reply).expect("decode") {
                Response::Ok { message, done } => {
                    assert!(message.starts_with("rotation deferred"), "{message}");
                    assert!(
                        matches!(
                            done,
                            Some(mesh_proto::wire::control::Done::RotationDeferred { .. })
                        ),
                        "{done:?}"
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
            let _ = stop_tx.send(());
        };
        let (out, ()) = tokio::join!(run(agent, &socket.listener, shutdown), client);
        out.expect("run");
    }

    #[tokio::test]
    async fn status_answers_while_a_join_waits_on_the_coordinator() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("run/meshd.sock");
        let socket = ControlSocket::bind(&sock).expect("bind");
        // The whole mesh on loopback (127.0.0.0/8): nothing leaves the machine.
        let (api, mut seen, _server) = silent_api("127.0.0.2").await;
        let body = mesh_proto::wire::token::TokenBody {
            invite_id: "00ff".into(),
            coordinator_public_key: PrivateKey::from_bytes([100; 32]).public_key(),
            coordinator_endpoints: vec!["127.0.0.2:9".parse().expect("sa")],
            coordinator_address: api.ip(),
            api_port: api.port(),
            mesh_cidr: "127.0.0.0/8".parse().expect("net"),
            host_name: "dock-mirror".into(),
            host_address: "127.0.0.3".parse().expect("ip"),
            throwaway_private_key: PrivateKey::from_bytes([77; 32]).to_base64(),
            expires_unix: now().as_secs() + 3600,
            admin: false,
        };
        let token = mesh_proto::wire::token::Token::sign(body, &[9; 32]).encode();
        let mut settings = crate::agent::tests::settings(Vec::new());
        settings.host_name = None;
        settings.address = None;
        settings.private_key_file = key_file(dir.path(), &PrivateKey::from_bytes([60; 32]));
        settings.state_dir = dir.path().join("state");
        let wg = FakeBackend {
            absent: true,
            ..FakeBackend::default()
        };
        let agent = Agent::new(
            wg,
            FakeLink::default(),
            settings,
            PrivateKey::from_bytes([60; 32]),
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stop_rx.await;
        };
        let client = async {
            let path = sock.clone();
            let join =
                tokio::spawn(
                    async move { exchange(&path, &Request::Join { token }.to_line()).await },
                );
            wait_for_request(&mut seen, "/v1/join").await;
            let latencies = status_latencies(&sock).await;
            assert!(!join.is_finished(), "the join is still waiting");
            assert_prompt("a join", latencies);
            // A second join meanwhile is refused, not queued behind the first.
            let again = exchange(&sock, &Request::Join { token: "x".into() }.to_line())
                .await
                .expect("reply");
            match Response::from_line(&again).expect("decode") {
                Response::Error { message } => {
                    assert!(message.contains("already in progress"), "{message}")
                }
                other => panic!("unexpected {other:?}"),
            }
            // So is a reload: the join runs with its bootstrap key.
            let rl = exchange(&sock, &Request::Reload.to_line())
                .await
                .expect("reply");
            match Response::from_line(&rl).expect("decode") {
                Response::Error { message } => {
                    assert!(message.contains("join is in progress"), "{message}")
                }
                other => panic!("unexpected {other:?}"),
            }
            // meshd stops while the join waits: the caller hears it.
            let _ = stop_tx.send(());
            let reply = tokio::time::timeout(Duration::from_secs(5), join)
                .await
                .expect("answered")
                .expect("task")
                .expect("reply");
            match Response::from_line(&reply).expect("decode") {
                Response::Error { message } => {
                    assert!(
                        message.contains("stopped before the join ended"),
                        "{message}"
                    )
                }
                other => panic!("unexpected {other:?}"),
            }
        };
        let (out, ()) = tokio::join!(run(agent, &socket.listener, shutdown), client);
        out.expect("run");
    }
}
