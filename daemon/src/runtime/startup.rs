//! The daemon as a whole, for `main` (and tests) to call: validate a configuration, or take
//! the instance lock, load the key, bind the control socket and run the agent until shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_proto::wire::control::{Request, Response};
use tokio::sync::mpsc;

use crate::agent::{now, ObservedEndpoints};
use crate::backend::LinkBackend;
use crate::coordinator::{serve_api, Coordinator, CoordinatorSettings};
use crate::disk::keyfile::{self, KeyFileState};
use crate::member::MeshEvent;
use crate::netsys::link::NetlinkLink;
use crate::runtime::control_socket::{prepare_dir, ControlSocket};
use crate::runtime::dispatch::{admin_reply, AdminCall};
use crate::runtime::event_loop::{AdminHandler, MeshWiring};
use crate::runtime::instance_lock::InstanceLock;
use crate::wg::select::{default_engine_spec, select};
use crate::wg::userspace::default_engine_command;
use crate::{Agent, Settings};

/// What `meshd --check-config` found, as text (errors and warnings to stderr, the summary to
/// stdout) or as JSON (`--json`).
#[derive(Debug, serde::Serialize)]
pub struct CheckReport {
    pub config: String,
    /// Whether meshd would start with this file and key.
    pub valid: bool,
    /// Every error of the file (`location` is null where the error has no place in it).
    pub errors: Vec<mesh_proto::config::ConfigError>,
    /// What an integration needs and does not find: that integration fails at run time, the
    /// mesh comes up.
    pub warnings: Vec<mesh_proto::config::ConfigError>,
    /// The host's name (null until it joins a managed mesh).
    pub host: Option<String>,
    /// Static peers configured (null when the file is invalid).
    pub peers: Option<usize>,
    /// The private key file (null when the file is invalid).
    pub private_key: Option<KeyCheck>,
}

/// The private key file as `--check-config` finds it.
#[derive(Debug, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KeyCheck {
    Valid {
        file: String,
        public_key: mesh_proto::PublicKey,
    },
    /// Generated at the first start.
    Missing { file: String },
    /// Unusable (permissions, not a key): meshd refuses to start.
    Invalid { file: String, error: String },
}

impl CheckReport {
    /// The report as `meshd --check-config` prints it: (stdout, stderr).
    pub fn render(&self) -> (String, String) {
        use std::fmt::Write as _;
        let mut err = String::new();
        if !self.errors.is_empty() {
            let all = mesh_proto::config::ConfigErrors {
                file: self.config.clone(),
                errors: self.errors.clone(),
            };
            let _ = writeln!(err, "{all}");
        }
        if !self.warnings.is_empty() {
            let n = self.warnings.len();
            let warnings = mesh_proto::config::ConfigErrors {
                file: self.config.clone(),
                errors: self.warnings.clone(),
            };
            let _ = writeln!(err, "{warnings}");
            let _ = writeln!(
                err,
                "warning: {} is valid, but {n} integration {} will fail when meshd runs it \
                 (see above)",
                self.config,
                if n == 1 { "setting" } else { "settings" }
            );
        }
        let host = self.host.as_deref().unwrap_or("(learned when it joins)");
        let peers = self.peers.unwrap_or(0);
        let out = match &self.private_key {
            Some(KeyCheck::Valid { public_key, .. }) => format!(
                "{}: ok (host {host}, {peers} peers, public key {public_key})\n",
                self.config
            ),
            Some(KeyCheck::Missing { file }) => format!(
                "{}: ok (host {host}, {peers} peers; {file} is missing and will be generated at \
                 start)\n",
                self.config
            ),
            Some(KeyCheck::Invalid { error, .. }) => {
                let _ = writeln!(err, "{error}");
                String::new()
            }
            None => String::new(),
        };
        (out, err)
    }
}

/// `meshd --check-config`: validate the configuration, what its integrations need (template
/// sources, programs) and the key file. Invalid: `valid` is false and `errors` (or
/// `private_key`) say why (`FILE:LINE:COL: KEY: message` with the source line, as text).
/// What the integrations need is checked too, and reported as warnings: a missing program or
/// template fails that hand-off at run time, not the mesh.
pub fn check_config(path: &Path) -> CheckReport {
    let origin = path.display().to_string();
    let mut report = CheckReport {
        config: origin.clone(),
        valid: false,
        errors: Vec::new(),
        warnings: Vec::new(),
        host: None,
        peers: None,
        private_key: None,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            report.errors.push(mesh_proto::config::ConfigError {
                file: origin,
                key: None,
                message: format!("cannot read: {e}"),
                location: None,
            });
            return report;
        }
    };
    let (config, map) = match mesh_proto::config::parse_located(&text, &origin) {
        Ok(parsed) => parsed,
        Err(errors) => {
            report.errors = errors.errors;
            return report;
        }
    };
    // Commands run with meshd's own PATH (under systemd, the unit's). The configuration
    // itself is valid and the mesh comes up with it: these only make an integration fail when
    // meshd runs it (it then reports them in `meshctl status` and `meshctl doctor`). Warnings,
    // so that the unit's ExecStartPre does not keep the mesh down for a hand-off.
    let search_path = std::env::var("PATH").ok();
    report.warnings = crate::handoff::preflight::check(&config, &map, search_path.as_deref());
    let settings = Settings::from_config(config, path);
    report.host = settings.host_name.clone();
    report.peers = Some(settings.peers.len());
    let file = settings.private_key_file.display().to_string();
    let key = match keyfile::inspect(&settings.private_key_file) {
        Ok(KeyFileState::Valid(key)) => KeyCheck::Valid {
            file,
            public_key: key.public_key(),
        },
        Ok(KeyFileState::Missing) => KeyCheck::Missing { file },
        Err(e) => KeyCheck::Invalid {
            file,
            error: e.to_string(),
        },
    };
    report.valid = !matches!(key, KeyCheck::Invalid { .. });
    report.private_key = Some(key);
    report
}

/// Routes, the nftables table and the forwarding settings meshd made (everything it owns but
/// the interface). Returns what was removed.
pub async fn teardown_owned(settings: &Settings) -> Result<Vec<String>> {
    Ok(crate::netsys::routing::teardown(settings).await?)
}

/// `meshd --down`: with no daemon running, remove everything meshd owns on this host (routes,
/// nftables table, forwarding settings, the interface and so its engine). Refused while a
/// meshd runs for this interface (that one is stopped with `meshctl down`).
pub async fn down_offline(settings: &Settings) -> Result<Vec<String>> {
    prepare_dir(&settings.control_socket)?;
    let lock = InstanceLock::acquire(&settings.control_socket, &settings.interface).context(
        "meshd is running for this interface: use `meshctl down` (it removes everything and \
         stops meshd)",
    )?;
    let mut removed = teardown_owned(settings).await?;
    // The hosts block and split DNS (the configuration's [integrations]).
    let (r, failed) = crate::handoff::teardown(&settings.interface, &settings.handoff.integrations);
    removed.extend(r);
    for f in failed {
        tracing::warn!(error = %f, "down");
    }
    let mut link = NetlinkLink::connect()?;
    match link.kind(&settings.interface).await? {
        None => {}
        Some(kind) => {
            link.delete(&settings.interface).await?;
            removed.push(format!("removed interface {} ({kind})", settings.interface));
        }
    }
    drop(lock);
    Ok(removed)
}

/// `meshd --doctor`: the doctor's checks with no daemon running.
pub async fn doctor_offline(settings: Settings) -> mesh_proto::doctor::Report {
    crate::doctor::run_offline(settings).await
}

/// Run the daemon until SIGTERM/SIGINT or `meshctl down`. Fails before touching anything
/// when another meshd holds the interface, the listen port is taken by something else, or the
/// configuration is unusable.
pub async fn serve(settings: Settings) -> Result<()> {
    // Fail before touching anything: lock, then port, then key, then the engine.
    prepare_dir(&settings.control_socket)?;
    let lock = InstanceLock::acquire(&settings.control_socket, &settings.interface)?;
    let port = crate::netsys::ports::port_state(settings.listen_port, &settings.interface).await;
    if let Some(refusal) = crate::netsys::ports::refusal(settings.listen_port, &port) {
        anyhow::bail!(refusal);
    }
    if port == crate::netsys::ports::PortState::Ours {
        tracing::info!(port = settings.listen_port, interface = %settings.interface, "listen port held by our own interface; adopting it");
    }
    let key = recover_key(&settings)?;
    // The servers' connection caps are sized from the descriptor limit (the unit's
    // LimitNOFILE is the hard limit; the soft one is often 1024).
    let nofile = crate::runtime::serve::raise_fd_limit();
    tracing::debug!(nofile, "file descriptor limit");
    let shutdown = crate::runtime::event_loop::shutdown_signal()?;
    let engine = settings
        .engine_command
        .clone()
        .unwrap_or_else(default_engine_command);
    let link = NetlinkLink::connect()?;
    let socket = ControlSocket::bind(&settings.control_socket)?;
    tracing::info!(
        host = settings.host_name.as_deref().unwrap_or("(from the membership, once joined)"),
        interface = %settings.interface,
        public_key = %key.public_key(),
        control_socket = %socket.path().display(),
        locks = ?lock.paths(),
        version = env!("CARGO_PKG_VERSION"),
        "meshd {} started",
        env!("CARGO_PKG_VERSION")
    );
    let selected = select(
        settings.backend,
        &settings.interface,
        &default_engine_spec(engine),
        &link,
    )
    .await?;
    tracing::info!(
        interface = %settings.interface,
        backend = %selected.label,
        reason = %selected.reason,
        "backend selected"
    );
    let label = selected.status_line();
    let wg = selected.backend;
    let mut wiring = MeshWiring::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut agent = Agent::new(wg, link, settings.clone(), key.clone());
    agent.set_backend_label(label);
    if settings.coordinator.is_some() {
        let coord = start_coordinator(
            &settings,
            &key,
            agent.observed_endpoints(),
            wiring.tx.clone(),
            stop_rx,
        )?;
        wiring.admin = Some(admin_handler(coord.clone()));
        wiring.coordinator = Some(coord);
        let st = agent.mesh_state_mut();
        st.is_coordinator = true;
        st.reachable = Some(true);
        st.api = settings
            .coordinator
            .as_ref()
            .zip(settings.address)
            .map(|(c, a)| SocketAddr::new(a.addr(), c.api_port));
    }
    let result =
        crate::runtime::event_loop::run_with(agent, &socket.listener, shutdown, wiring).await;
    let _ = stop_tx.send(true);
    let (_agent, stop) = result?;
    if let crate::runtime::event_loop::Stop::Down { removed } = stop {
        tracing::info!(removed = ?removed, "down: everything meshd owned is removed; exiting");
        // Let the connection task write the reply to `meshctl down` before the runtime ends.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(socket);
    drop(lock);
    Ok(())
}

/// The coordinator role: open the registry, register our own key, serve the API on our mesh
/// address (bound to the mesh interface), and feed our own netmap to the agent loop.
fn start_coordinator(
    settings: &crate::Settings,
    key: &mesh_proto::PrivateKey,
    observed: ObservedEndpoints,
    events: mpsc::Sender<MeshEvent>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Coordinator> {
    let cc = settings
        .coordinator
        .clone()
        .context("no [coordinator] in the configuration")?;
    let own_name = settings
        .host_name
        .clone()
        .context("the coordinator needs host.name")?;
    let own_address = settings
        .address
        .context("the coordinator needs host.address")?
        .addr();
    let now_unix = now().as_secs();
    let coord = Coordinator::open(
        CoordinatorSettings {
            mesh_cidr: cc.mesh_cidr,
            api_port: cc.api_port,
            public_endpoints: cc.public_endpoints.clone(),
            reserved: cc.reserved.clone(),
            static_assignments: cc.static_assignments.clone(),
            keepalive_secs: cc.keepalive_secs,
            database: cc.database.clone(),
            own_name: own_name.clone(),
            own_address,
            own_public_key: key.public_key(),
        },
        now_unix,
    )
    .with_context(|| {
        format!(
            "cannot open the coordinator registry {}",
            cc.database.display()
        )
    })?;
    coord
        .set_own_public_key(key.public_key(), now_unix)
        .context("cannot register the coordinator's own key")?;
    coord.set_own_private_key(key);
    tracing::info!(database = %cc.database.display(), mesh = %cc.mesh_cidr, version = coord.version(), "coordinator");

    // Our own netmap, re-read on every registry change and when a join's grace ends.
    tokio::spawn(feed_own_netmap(coord.clone(), events, stop.clone()));

    // Key notices, outside the tunnel on TCP at our WireGuard port number, for hosts that
    // missed a rotation of our key (`mesh_proto::wire::notice`). Without it those hosts need a new
    // token, so a failure is loud but not fatal, and the bind is tried again (the port may be
    // free later).
    {
        let notices = coord.clone();
        let port = settings.listen_port;
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let mut stop_notices = stop.clone();
                let shutdown = async move {
                    let _ = stop_notices.wait_for(|s| *s).await;
                };
                match crate::coordinator::serve_key_notices(notices.clone(), port, shutdown).await {
                    Ok(()) => failures = 0,
                    Err(e) if failures.is_multiple_of(60) => {
                        failures += 1;
                        tracing::error!(error = %e, "cannot serve coordinator key notices (retrying): hosts that miss a rotation of this coordinator's key will need a new token");
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::debug!(error = %e, "cannot serve coordinator key notices; retrying");
                    }
                }
                if *stop.borrow() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }

    // The API, inside the tunnel, bound to the mesh interface. The interface may not exist
    // yet (first pass) or may be deleted and created again (`ip link del`, an engine
    // restart): `serve_api` returns when the interface's index changes, and this loop binds
    // again until it works.
    let bind = SocketAddr::new(own_address, cc.api_port);
    let device = settings.interface.clone();
    let observed_fn: Arc<dyn Fn(std::net::IpAddr) -> Option<SocketAddr> + Send + Sync> =
        Arc::new(move |ip| observed.read().ok().and_then(|m| m.get(&ip).copied()));
    let api_coord = coord.clone();
    tokio::spawn(async move {
        let mut stop = stop;
        let mut failures = 0u32;
        loop {
            let mut stop_api = stop.clone();
            let shutdown = async move {
                let _ = stop_api.wait_for(|s| *s).await;
            };
            match serve_api(
                api_coord.clone(),
                bind,
                Some(device.clone()),
                observed_fn.clone(),
                shutdown,
            )
            .await
            {
                Ok(()) => failures = 0,
                // Expected until the first pass created the interface: retry quickly, and
                // warn only when it lasts (50 tries, about 10 s), then once in a while.
                Err(e) if failures > 0 && failures.is_multiple_of(50) => {
                    failures += 1;
                    tracing::warn!(error = %e, "coordinator API not serving yet; retrying")
                }
                Err(e) => {
                    failures += 1;
                    tracing::debug!(error = %e, "coordinator API not serving yet; retrying")
                }
            }
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.changed() => return,
            }
        }
    });
    Ok(coord)
}

/// Feed the coordinator host's own netmap to the agent loop: now, on every registry change,
/// and again when a join's grace ends (inside it our interface keeps the joiner's throwaway
/// key so the join reply reaches it; see coordinator/grace.rs), so the swap to the new key
/// does not wait for the periodic pass. Returns when stopped or when the loop is gone.
pub async fn feed_own_netmap(
    coord: Coordinator,
    events: mpsc::Sender<MeshEvent>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut changes = coord.subscribe();
    loop {
        changes.borrow_and_update();
        let mut grace_ends = None;
        // SQLite: off the async workers.
        let now = tokio::time::Instant::now().into_std();
        match crate::runtime::blocking::run(|| coord.own_netmap(now)) {
            Ok(Some((nm, next))) => {
                grace_ends = next;
                if events.send(MeshEvent::Netmap(Box::new(nm))).await.is_err() {
                    return;
                }
            }
            Ok(None) => tracing::error!(
                host = %coord.settings().own_name,
                "the registry has no netmap for the coordinator host"
            ),
            Err(e) => tracing::error!(error = %e, "cannot compute the coordinator's netmap"),
        }
        let regrace = async {
            match grace_ends {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = regrace => {}
            _ = stop.changed() => return,
        }
    }
}

/// Admin control requests served in-process on the coordinator host.
fn admin_handler(coord: Coordinator) -> AdminHandler {
    Arc::new(move |request: Request| -> AdminCall {
        let coord = coord.clone();
        Box::pin(async move {
            let now_unix = now().as_secs();
            let result = tokio::task::spawn_blocking(move || match request {
                Request::Invite(req) => coord.invite(req, now_unix).map(Response::Invite),
                Request::Invites => coord
                    .invites(now_unix)
                    .map(|invites| Response::Invites { invites }),
                Request::RevokeInvite { name } => coord
                    .revoke_invite(&name, now_unix)
                    .map(|()| admin_reply::revoked(name)),
                Request::Hosts => coord.hosts().map(|hosts| Response::Hosts { hosts }),
                Request::Remove { name } => coord
                    .remove(&name, now_unix)
                    .map(|()| admin_reply::removed(name)),
                Request::RotateHost { name } => coord
                    .request_rotation(&name, now_unix)
                    .map(|_| admin_reply::rotation_asked(name)),
                Request::StaticConfig { name } => coord
                    .static_config(&name)
                    .map(|config| admin_reply::static_config(name, config)),
                Request::Routes => coord.routes().map(|routes| Response::Routes { routes }),
                Request::RouteDecision {
                    decision,
                    host,
                    prefix,
                } => coord
                    .decide_route(&host, prefix, decision, now_unix)
                    .map(admin_reply::route_decided),
                _ => Ok(Response::error("not an admin request")),
            })
            .await;
            match result {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => Response::error(e.to_string()),
                Err(e) => Response::error(format!("internal error: {e}")),
            }
        })
    })
}

/// The live key at start, after finishing or keeping an interrupted rotation
/// (`mesh_proto::rotation::recover`). The coordinator's word is, on a member, the key of our
/// cached netmap (none for a static fleet or before the first netmap); on the coordinator
/// host, the key its own registry holds for it.
pub fn recover_key(settings: &Settings) -> anyhow::Result<mesh_proto::PrivateKey> {
    use mesh_proto::rotation::Recovery;
    let registered = match (&settings.coordinator, &settings.host_name) {
        (Some(cc), Some(name)) => crate::coordinator::registered_key(&cc.database, name)
            .with_context(|| {
                format!(
                    "cannot read the coordinator registry {}",
                    cc.database.display()
                )
            })?
            .map(|(key, _next)| key),
        _ => crate::disk::state::StateDir::new(&settings.state_dir)
            .load_netmap()
            .ok()
            .flatten()
            .map(|nm| nm.public_key),
    };
    let r = keyfile::recover(&settings.private_key_file, registered)?;
    match r.decision {
        Recovery::CurrentResume(next) | Recovery::CurrentUndecided(next) => tracing::warn!(
            next = %next,
            "a key rotation was interrupted; running the current key, the next key is kept and \
             the rotation resumes once the coordinator answers"
        ),
        Recovery::PromoteNext => tracing::info!("finished an interrupted key rotation"),
        _ => {}
    }
    Ok(r.live)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;
    use std::time::Instant;

    use mesh_proto::netmap::Netmap;
    use mesh_proto::wire::api::{InviteRequest, JoinRequest};
    use mesh_proto::{PrivateKey, PublicKey};

    use super::*;
    use crate::coordinator::JOIN_KEY_GRACE;

    /// `meshd --check-config`: a valid file whose integration names a missing program is
    /// valid (the warning is printed, the mesh would start); a bad value makes it invalid.
    #[test]
    fn check_config_refuses_bad_values_and_only_warns_about_integration_programs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meshd.toml");
        let head = format!(
            "[host]\nname = \"dock-load\"\naddress = \"10.99.99.1/24\"\n\
             private_key_file = \"{}/private.key\"\n",
            dir.path().display()
        );
        std::fs::write(
            &path,
            format!("{head}\n[integrations.k3s]\nrole = \"server\"\nreload = [\"no-such-program-here\"]\n"),
        )
        .expect("write");
        let r = check_config(&path);
        assert!(r.valid, "a missing program is a warning: {r:?}");
        assert_eq!(r.warnings.len(), 1, "{r:?}");
        assert!(
            matches!(r.private_key, Some(KeyCheck::Missing { .. })),
            "{r:?}"
        );
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["valid"], true);
        assert_eq!(json["host"], "dock-load");
        assert_eq!(json["private_key"]["state"], "missing");
        assert_eq!(json["warnings"][0]["key"], "integrations.k3s.reload");
        std::fs::write(&path, format!("{head}listen_port = 99999\n")).expect("write");
        let r = check_config(&path);
        assert!(!r.valid, "a port out of range is an error");
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["errors"][0]["key"], "host.listen_port", "{json}");
        assert_eq!(json["errors"][0]["location"]["line"], 5, "{json}");
        assert_eq!(json["private_key"], serde_json::Value::Null);
        let (out, err) = r.render();
        assert!(out.is_empty(), "{out}");
        assert!(err.contains(":5:"), "{err}");
        let r = check_config(&dir.path().join("absent.toml"));
        assert!(!r.valid);
        assert!(r.errors[0].message.starts_with("cannot read"), "{r:?}");
    }

    const NOW: u64 = 1_800_000_000;

    async fn next_netmap(rx: &mut mpsc::Receiver<MeshEvent>) -> Netmap {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(MeshEvent::Netmap(nm))) => *nm,
            _ => panic!("no netmap from the feed"),
        }
    }

    fn key_at(nm: &Netmap, address: std::net::IpAddr) -> Option<PublicKey> {
        nm.peers
            .iter()
            .find(|p| p.address == address)
            .map(|p| p.public_key)
    }

    /// The coordinator's own feed keeps a joiner's throwaway key for the grace, then sends the
    /// new key by itself (no registry change needed).
    #[tokio::test]
    async fn own_feed_swaps_to_the_new_key_when_the_grace_ends() {
        let dir = tempfile::tempdir().unwrap();
        let coord = Coordinator::open(
            CoordinatorSettings {
                mesh_cidr: "10.99.99.0/24".parse().unwrap(),
                api_port: mesh_proto::wire::api::DEFAULT_API_PORT,
                public_endpoints: vec!["192.0.2.1:51871".parse().unwrap()],
                reserved: vec![],
                static_assignments: BTreeMap::new(),
                keepalive_secs: 25,
                database: dir.path().join("registry.sqlite"),
                own_name: "dock-load".into(),
                own_address: "10.99.99.1".parse().unwrap(),
                own_public_key: PrivateKey::from_bytes([1; 32]).public_key(),
            },
            NOW,
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let feed = tokio::spawn(feed_own_netmap(coord.clone(), tx, stop_rx));
        next_netmap(&mut rx).await;

        let req: InviteRequest = serde_json::from_value(serde_json::json!({
            "name": "dock-dash", "admin": false, "static_peer": false,
        }))
        .unwrap();
        let inv = coord.invite(req, NOW).unwrap();
        let invited = next_netmap(&mut rx).await;
        let throwaway = key_at(&invited, inv.address).unwrap();

        let new_key = PrivateKey::generate().public_key();
        let joined_at = Instant::now();
        coord
            .join(
                inv.address,
                JoinRequest {
                    token: inv.token.clone().unwrap(),
                    public_key: new_key,
                    listen_port: 51871,
                    addresses: vec!["198.51.100.5".parse().unwrap()],
                },
                NOW + 1,
            )
            .unwrap();
        let in_grace = next_netmap(&mut rx).await;
        assert!(joined_at.elapsed() < JOIN_KEY_GRACE);
        assert_eq!(key_at(&in_grace, inv.address), Some(throwaway));
        assert_eq!(in_grace.version, coord.version());

        let after = next_netmap(&mut rx).await;
        let waited = joined_at.elapsed();
        assert!(waited >= JOIN_KEY_GRACE, "swapped after {waited:?}");
        assert!(
            waited < JOIN_KEY_GRACE + Duration::from_millis(500),
            "swapped after {waited:?}"
        );
        assert_eq!(key_at(&after, inv.address), Some(new_key));
        assert_eq!(after, coord.netmap_for_name("dock-load").unwrap().unwrap());

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), feed)
            .await
            .unwrap()
            .unwrap();
    }
}
