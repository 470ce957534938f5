//! The rotating host's shell around `mesh_proto::rotation`: one driver for a member (its
//! coordinator over the API) and for the coordinator host itself (its registry in-process),
//! the stranded-key probe, and the catch-up from coordinator key notices.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mesh_proto::netmap::Netmap;
use mesh_proto::rotation::{Action, Rotation};
use mesh_proto::{PrivateKey, PublicKey};

use crate::agent::{now, Agent};
use crate::backend::{LinkBackend, WgBackend};
use crate::client::{self, CallError};
use crate::coordinator::Coordinator;
use crate::state::StateDir;

/// How long the coordinator's own rotation waits for the hosts that follow it to take each
/// netmap (the next key, then the switch) before it goes on without the slow ones: those
/// catch up through key notices.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(3);

/// Test hook (fault injection for the crash-safety lab test): with
/// `MESHD_TEST_CRASH_AFTER=<step>`, meshd kills itself with SIGKILL right after that step of
/// a rotation: `next-key-written`, `prepared`, `committed`, `switched` or `promoted`.
pub const CRASH_ENV: &str = "MESHD_TEST_CRASH_AFTER";

fn crash_point(step: &str) {
    if std::env::var(CRASH_ENV).is_ok_and(|v| v == step) {
        tracing::error!(step, "{CRASH_ENV}: killing meshd now (fault injection)");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Who holds the registry for the rotating host.
pub enum Registrar<'a> {
    /// A member: the coordinator API, inside the tunnel.
    Remote(SocketAddr),
    /// The coordinator host: its registry, in-process.
    Local(&'a Coordinator),
}

/// How a rotation that did not fail ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new key is live, the coordinator holds it and the old key is gone from disk.
    Rotated {
        old: PublicKey,
        new: PublicKey,
        took: Duration,
        /// Static peers that list the old key by hand (the operator updates them).
        static_peers: Vec<String>,
        /// The pass right after the switch had errors (the device may not run the new key
        /// yet); later passes retry it.
        switch_error: Option<String>,
        /// The commit's reply was lost and the coordinator answered through the new key.
        reply_lost: Option<String>,
    },
    /// The coordinator did not answer at `step`: the key is unchanged, the next key is kept,
    /// and the rotation resumes by itself when the coordinator answers.
    Deferred { step: Action, reason: String },
}

impl Outcome {
    /// Whether the rotation finished (nothing is pending any more).
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Rotated { .. })
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Rotated {
                old,
                new,
                took,
                static_peers,
                switch_error,
                reply_lost,
            } => {
                match reply_lost {
                    Some(e) => write!(
                        f,
                        "key rotated: {} -> {}; the commit's reply was lost ({e}), and the \
                         coordinator answered through the new key; the old key is gone from disk",
                        old.short(),
                        new.short()
                    )?,
                    None => write!(
                        f,
                        "key rotated: {} -> {} in {} ms; the old key is gone from disk",
                        old.short(),
                        new.short(),
                        took.as_millis()
                    )?,
                }
                if let Some(e) = switch_error {
                    write!(
                        f,
                        "; but the pass after the switch had errors ({e}): meshd retries it on \
                         every pass, see `meshctl status`"
                    )?;
                }
                if let Some(hint) = static_peer_hint(static_peers) {
                    write!(f, "; {hint}")?;
                }
                Ok(())
            }
            Outcome::Deferred { step, reason } => write!(
                f,
                "rotation deferred at \"{step}\": the coordinator did not answer ({reason}); the \
                 key is unchanged, the next key is kept, and the rotation resumes by itself when \
                 the coordinator answers"
            ),
        }
    }
}

/// Why a rotation did not happen or did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotateError {
    /// Not a member of a managed mesh: nobody to rotate with.
    #[error(
        "not a member of a managed mesh: there is no coordinator to rotate with (a static fleet \
         changes keys by editing the configuration)"
    )]
    NotManaged,
    /// The next-key file left by an earlier rotation cannot be read.
    #[error("{0}")]
    NextKeyFile(String),
    /// The coordinator said no for good: the next key is discarded, the key is unchanged.
    #[error("the coordinator refused the rotation ({step}): {reason}; the key is unchanged")]
    Refused { step: Action, reason: String },
    /// A step failed here (a file, the state machine, a bad reply): the next key is kept and
    /// the rotation resumes by itself.
    #[error(
        "the rotation ({step}) failed: {reason}; the next key is kept and the rotation resumes \
         by itself"
    )]
    Failed { step: Action, reason: String },
}

/// A step that did not go through.
enum StepError {
    /// The coordinator said no for good: the rotation is abandoned before its commit.
    Refused(String),
    /// No answer: the rotation is kept and resumed later.
    Unreachable(String),
    /// Anything else (a file, the state machine).
    Failed(String),
}

impl From<CallError> for StepError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Refused { status, .. } if status < 500 => StepError::Refused(e.to_string()),
            CallError::Sign(_) => StepError::Failed(e.to_string()),
            e => StepError::Unreachable(e.to_string()),
        }
    }
}

fn failed(e: impl std::fmt::Display) -> StepError {
    StepError::Failed(e.to_string())
}

/// The static peers in a netmap: devices configured by hand from a wg-quick file, which list
/// our key and cannot follow a rotation of it.
pub fn static_peer_names(netmap: Option<&Netmap>) -> Vec<String> {
    netmap
        .map(|nm| {
            nm.peers
                .iter()
                .filter(|p| p.static_peer)
                .map(|p| p.name.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// What the operator must do for the static peers after we rotated.
pub fn static_peer_hint(statics: &[String]) -> Option<String> {
    (!statics.is_empty()).then(|| {
        format!(
            "the static peers {} still list the old key: on the coordinator, `meshctl \
             static-config NAME` prints each one's new wg-quick configuration to install there",
            statics.join(", ")
        )
    })
}

/// Make every peer handshake now: one datagram to each netmap peer's mesh address (discard
/// port) makes the device initiate a handshake with the key it now runs, whatever the backend.
pub async fn poke_peers(netmap: &Netmap) {
    let Ok(sock) = tokio::net::UdpSocket::bind("0.0.0.0:0").await else {
        return;
    };
    let sock6 = tokio::net::UdpSocket::bind("[::]:0").await.ok();
    for p in &netmap.peers {
        let to = SocketAddr::new(p.address, 9);
        let r = match (p.address, &sock6) {
            (IpAddr::V6(_), Some(s6)) => s6.send_to(&[0], to).await,
            _ => sock.send_to(&[0], to).await,
        };
        if let Err(e) = r {
            tracing::debug!(peer = %p.name, error = %e, "cannot poke the peer");
        }
    }
}

/// Rotate this host's static key now, following `mesh_proto::rotation`: write the next key,
/// prepare it (peers put it on their devices with no allowed IPs; the prepare returns once the
/// hosts that follow the coordinator took it), commit, switch the device and handshake every
/// peer, then promote the key file (the old key leaves the disk; the old `PrivateKey` is
/// dropped, which zeroizes it). A next key left by an interrupted rotation is resumed.
///
/// For the coordinator host the commit also writes the key notices, and the switch waits until
/// the followers took the netmap with the new key: they reach the coordinator (API included)
/// through it, so switching earlier would cut them off.
///
/// A rotation the coordinator could not be reached for is [`Outcome::Deferred`] (the next key
/// is kept and the rotation resumes when the coordinator answers), which is not an error.
pub async fn rotate<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    state: &StateDir,
    registrar: Registrar<'_>,
) -> Result<Outcome, RotateError> {
    let path = agent.settings().private_key_file.clone();
    let old = agent.key().public_key();
    let pending = match crate::keyfile::inspect(&crate::keyfile::next_path(&path)) {
        Ok(crate::keyfile::KeyFileState::Valid(k)) if k.public_key() != old => Some(k),
        Ok(_) => None,
        Err(e) => return Err(RotateError::NextKeyFile(e.to_string())),
    };
    let (mut rot, next) = match pending {
        Some(k) => {
            tracing::info!(next = %k.public_key(), "resuming an interrupted key rotation");
            (Rotation::resume(old, k.public_key()), k)
        }
        None => {
            let mut rot = Rotation::idle(old);
            rot.handle_request();
            (rot, PrivateKey::generate())
        }
    };
    let started = tokio::time::Instant::now();
    // The member's netmap from the commit's reply, applied at the switch.
    let mut committed_netmap: Option<Netmap> = None;
    // The coordinator's followers that did not take its prepare in time.
    let mut slow: Vec<IpAddr> = Vec::new();
    let mut switch_error = None;
    while let Some(action) = rot.poll_action() {
        tracing::info!(step = %action, "key rotation");
        let step: Result<&'static str, StepError> = match action {
            Action::WriteNextKey => {
                async {
                    crate::keyfile::write_next(&path, &next).map_err(failed)?;
                    rot.handle_next_key_written(next.public_key())
                        .map_err(failed)?;
                    Ok("next-key-written")
                }
                .await
            }
            Action::Prepare(k) => {
                async {
                    match &registrar {
                        Registrar::Remote(api) => {
                            let signer = agent.signer()?.with_next(&next)?;
                            client::rotate_prepare(*api, &signer, k).await?;
                        }
                        Registrar::Local(coord) => {
                            // Right after a restart, let the followers reconnect first: a
                            // rotation they do not see would cut them off.
                            let missing = coord.wait_followers_returned().await;
                            if !missing.is_empty() {
                                tracing::info!(missing = ?missing, "rotating without the hosts that have not polled since the coordinator started");
                            }
                            let version = coord
                                .prepare_own_rotation(k, now().as_secs())
                                .map_err(|e| StepError::Refused(e.to_string()))?;
                            slow = wait_for_followers(coord, version, "prepared", &[]).await;
                        }
                    }
                    rot.handle_prepared().map_err(failed)?;
                    Ok("prepared")
                }
                .await
            }
            Action::Commit(k) => {
                async {
                    match &registrar {
                        Registrar::Remote(api) => {
                            let signer = agent.signer()?.with_next(&next)?;
                            let nm = client::rotate_commit(*api, &signer, k).await?;
                            if nm.public_key != k {
                                return Err(StepError::Failed(format!(
                                "the coordinator's reply names key {} for us, not the committed {}",
                                nm.public_key.short(),
                                k.short()
                            )));
                            }
                            committed_netmap = Some(nm);
                        }
                        Registrar::Local(coord) => {
                            let version = coord
                                .commit_own_rotation(k, agent.key(), now().as_secs())
                                .map_err(|e| StepError::Failed(e.to_string()))?;
                            // Hosts too slow to take the prepare are not waited for again: they
                            // catch up from a key notice, and everyone else gets the switch now.
                            wait_for_followers(coord, version, "committed", &slow).await;
                        }
                    }
                    rot.handle_committed().map_err(failed)?;
                    Ok("committed")
                }
                .await
            }
            Action::Switch(_) => {
                agent.set_key(next.clone());
                if let Registrar::Local(coord) = &registrar {
                    // The API proves requests with the new key now (and the old one for
                    // hosts that have not taken the switch yet).
                    coord.set_own_private_key(&next);
                }
                if let Some(nm) = committed_netmap.take() {
                    agent.set_netmap(nm);
                }
                let report = agent.reconcile(now()).await;
                if let Some(nm) = agent.netmap() {
                    poke_peers(nm).await;
                }
                if let Some(e) = report.error {
                    tracing::warn!(error = %e, "the pass after the key switch had errors");
                    switch_error = Some(e.to_string());
                }
                if agent.membership().is_some() {
                    if let Some(nm) = agent.netmap() {
                        if let Err(e) = state.save_netmap(nm) {
                            tracing::warn!(error = %e, "cannot cache the netmap");
                        }
                    }
                }
                rot.handle_switched().map(|()| "switched").map_err(failed)
            }
            Action::Promote => crate::keyfile::promote(&path)
                .map_err(failed)
                .and_then(|()| rot.handle_promoted().map_err(failed))
                .map(|()| "promoted"),
        };
        match step {
            Ok(done) => crash_point(done),
            Err(StepError::Refused(reason)) => {
                if rot.handle_refused().is_ok() {
                    if let Err(de) = crate::keyfile::discard_next(&path) {
                        tracing::warn!(error = %de, "cannot delete the abandoned next key");
                    }
                    return Err(RotateError::Refused {
                        step: action,
                        reason,
                    });
                }
                return Err(RotateError::Failed {
                    step: action,
                    reason,
                });
            }
            Err(StepError::Unreachable(reason)) => {
                // A commit without an answer may still have gone through; then nobody accepts
                // the old key any more and we could not even ask. Try the next key now.
                if let (Action::Commit(_), Registrar::Remote(api)) = (action, &registrar) {
                    if probe_next_key(agent, state, *api).await {
                        return Ok(Outcome::Rotated {
                            old,
                            new: next.public_key(),
                            took: started.elapsed(),
                            static_peers: static_peer_names(agent.netmap()),
                            switch_error: None,
                            reply_lost: Some(reason),
                        });
                    }
                }
                tracing::warn!(error = %reason, step = %action, "key rotation deferred");
                return Ok(Outcome::Deferred {
                    step: action,
                    reason,
                });
            }
            Err(StepError::Failed(reason)) => {
                return Err(RotateError::Failed {
                    step: action,
                    reason,
                })
            }
        }
    }
    let took = started.elapsed();
    tracing::info!(old = %old, new = %rot.live_key(), took_ms = took.as_millis() as u64, "key rotated");
    let static_peers = static_peer_names(agent.netmap());
    if let Some(hint) = static_peer_hint(&static_peers) {
        tracing::warn!("{hint}");
    }
    Ok(Outcome::Rotated {
        old,
        new: rot.live_key(),
        took,
        static_peers,
        switch_error,
        reply_lost: None,
    })
}

/// Wait for the coordinator's followers (but `skip`) to take `version`; returns those that did
/// not in time.
async fn wait_for_followers(
    coord: &Coordinator,
    version: u64,
    what: &str,
    skip: &[IpAddr],
) -> Vec<IpAddr> {
    // Not ourselves: our own loop is busy with this rotation.
    let mut except = vec![coord.settings().own_address];
    except.extend_from_slice(skip);
    let out = coord.wait_acknowledged(version, &except, ACK_TIMEOUT).await;
    if out.missing.is_empty() {
        tracing::info!(
            step = what,
            hosts = out.acknowledged,
            waited_ms = out.waited.as_millis() as u64,
            "every following host took the netmap"
        );
    } else {
        tracing::warn!(
            step = what,
            missing = ?out.missing,
            waited_ms = out.waited.as_millis() as u64,
            "some hosts did not take the netmap in time; they catch up later"
        );
    }
    out.missing
}

/// A host whose rotation was committed by the coordinator but never switched (the commit's
/// reply was lost, or meshd died before it was cached) runs its old key, which the coordinator
/// and the peers no longer accept, so it cannot even ask. With a next key on disk and the
/// coordinator unreachable, try the next key: if the coordinator answers through it and holds
/// it, the rotation is finished (promote); otherwise the old key is put back. Returns whether
/// the next key is now live.
pub async fn probe_next_key<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    state: &StateDir,
    api: SocketAddr,
) -> bool {
    let path = agent.settings().private_key_file.clone();
    let old = agent.key().clone();
    let next = match crate::keyfile::inspect(&crate::keyfile::next_path(&path)) {
        Ok(crate::keyfile::KeyFileState::Valid(k)) if k.public_key() != old.public_key() => k,
        _ => return false,
    };
    tracing::info!(next = %next.public_key(), "coordinator unreachable with a rotation pending: trying the next key");
    agent.set_key(next.clone());
    agent.reconcile(now()).await;
    let answer = match agent.signer() {
        Ok(signer) => client::fetch_netmap(api, &signer, 0).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(Some(nm)) if nm.public_key == next.public_key() => {
            if let Err(e) = crate::keyfile::promote(&path) {
                tracing::error!(error = %e, "the coordinator holds the next key but promoting it failed");
            }
            if let Err(e) = state.save_netmap(&nm) {
                tracing::warn!(error = %e, "cannot cache the netmap");
            }
            agent.set_netmap(nm);
            agent.reconcile(now()).await;
            tracing::info!(key = %next.public_key(), "finished a rotation the coordinator had committed");
            true
        }
        other => {
            tracing::info!(answer = ?other.as_ref().map(|n| n.as_ref().map(|n| n.public_key.short())), "the next key is not the registered one; keeping the current key");
            agent.set_key(old);
            agent.reconcile(now()).await;
            false
        }
    }
}

/// Fetch the coordinator key notices for `host` from the coordinator's underlay `endpoints`
/// (first that answers) and follow them from the coordinator key we know. Returns the
/// coordinator's current key.
pub async fn coordinator_key_from_notices(
    endpoints: &[SocketAddr],
    host: &PrivateKey,
    known: PublicKey,
) -> Result<PublicKey, String> {
    let mut errors = Vec::new();
    // Signed toward the coordinator key we know (the old one): the coordinator kept that
    // key's proof for us when it rotated, and answers nobody else.
    let signer = client::Signer::new(host, &known).map_err(|e| e.to_string())?;
    for ep in endpoints {
        match client::key_notices(*ep, &signer, Duration::from_secs(5)).await {
            Ok(notices) => {
                return mesh_proto::notice::follow(&notices, host, known).map_err(|e| e.to_string())
            }
            Err(e) => errors.push(format!("{ep}: {e}")),
        }
    }
    Err(if errors.is_empty() {
        "no endpoint known for the coordinator".to_string()
    } else {
        errors.join("; ")
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::backend::{FakeBackend, FakeLink};
    use crate::coordinator::CoordinatorSettings;
    use crate::member::MemberRuntime;
    use crate::state::Membership;

    const NOW: u64 = 1_800_000_000;

    fn agent(dir: &std::path::Path, key: &PrivateKey) -> Agent<FakeBackend, FakeLink> {
        let mut s = crate::agent::tests::settings(Vec::new());
        s.private_key_file = dir.join("private.key");
        s.state_dir = dir.join("state");
        let mut text = key.to_base64();
        text.push('\n');
        crate::state::write_atomic(&s.private_key_file, text.as_bytes()).expect("key file");
        Agent::new(FakeBackend::default(), FakeLink::default(), s, key.clone())
    }

    fn coordinator(dir: &std::path::Path, own: &PrivateKey) -> Coordinator {
        let settings = CoordinatorSettings {
            mesh_cidr: "10.99.99.0/24".parse().expect("net"),
            api_port: mesh_proto::api::DEFAULT_API_PORT,
            public_endpoints: vec!["192.0.2.1:51871".parse().expect("sa")],
            reserved: vec![],
            static_assignments: BTreeMap::new(),
            keepalive_secs: 25,
            database: dir.join("registry.sqlite"),
            own_name: "dock-load".into(),
            own_address: "10.99.99.1".parse().expect("ip"),
            own_public_key: own.public_key(),
        };
        Coordinator::open(settings, NOW).expect("open")
    }

    fn runtime(dir: &std::path::Path) -> MemberRuntime {
        let (tx, _rx) = tokio::sync::mpsc::channel(8);
        MemberRuntime::new(StateDir::new(dir.join("state")), tx)
    }

    fn key_on_disk(agent: &Agent<FakeBackend, FakeLink>) -> PublicKey {
        match crate::keyfile::inspect(&agent.settings().private_key_file) {
            Ok(crate::keyfile::KeyFileState::Valid(k)) => k.public_key(),
            other => panic!("key file: {other:?}"),
        }
    }

    fn next_on_disk(agent: &Agent<FakeBackend, FakeLink>) -> Option<PublicKey> {
        match crate::keyfile::inspect(&crate::keyfile::next_path(
            &agent.settings().private_key_file,
        )) {
            Ok(crate::keyfile::KeyFileState::Valid(k)) => Some(k.public_key()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn the_coordinator_hosts_rotation_ends_rotated_with_the_new_key_everywhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let own = PrivateKey::from_bytes([1; 32]);
        let mut a = agent(dir.path(), &own);
        let mut rt = runtime(dir.path());
        rt.coordinator = Some(coordinator(dir.path(), &own));
        let out = rt.rotate_now(&mut a).await.expect("rotated");
        let Outcome::Rotated {
            old,
            new,
            switch_error,
            reply_lost,
            ..
        } = &out
        else {
            panic!("not rotated: {out}");
        };
        assert!(out.is_done());
        assert_eq!(*old, own.public_key());
        assert_ne!(*new, *old);
        assert_eq!((switch_error, reply_lost), (&None, &None));
        assert_eq!(a.key().public_key(), *new, "the agent runs the new key");
        assert_eq!(key_on_disk(&a), *new, "the key file holds the new key");
        assert_eq!(next_on_disk(&a), None, "no next key left");
        let registry = rt
            .coordinator
            .as_ref()
            .expect("coordinator")
            .netmap_for_name("dock-load")
            .expect("netmap")
            .expect("own netmap");
        assert_eq!(registry.public_key, *new);
        let text = out.to_string();
        assert!(text.starts_with("key rotated: "), "{text}");
        assert!(!text.contains("errors"), "{text}");
    }

    #[tokio::test]
    async fn a_switch_the_device_did_not_take_is_reported_not_hidden() {
        let dir = tempfile::tempdir().expect("tempdir");
        let own = PrivateKey::from_bytes([1; 32]);
        let mut a = agent(dir.path(), &own);
        // The engine stops answering: the pass that should put the new key on the device fails.
        a.wg.fail_observe = true;
        let mut rt = runtime(dir.path());
        rt.coordinator = Some(coordinator(dir.path(), &own));
        let out = rt.rotate_now(&mut a).await.expect("committed");
        match &out {
            Outcome::Rotated {
                switch_error: Some(e),
                ..
            } => assert!(e.contains("device unreachable"), "{e}"),
            other => panic!("the failed switch was not reported: {other:?}"),
        }
        let text = out.to_string();
        assert!(
            text.contains("the pass after the switch had errors"),
            "{text}"
        );
        // Level-triggered: the next pass that reaches the engine puts the new key on it.
        a.wg.fail_observe = false;
        let r = a.reconcile(now()).await;
        assert!(r.error.is_none(), "{r:?}");
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_defers_and_keeps_the_same_next_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let own = PrivateKey::from_bytes([60; 32]);
        let mut a = agent(dir.path(), &own);
        a.set_membership(Some(Membership {
            host_name: "dock-mirror".into(),
            address: "10.99.99.3".parse().expect("ip"),
            mesh_cidr: "10.99.99.0/24".parse().expect("net"),
            coordinator_public_key: PrivateKey::from_bytes([100; 32]).public_key(),
            coordinator_endpoints: vec!["127.0.0.1:9".parse().expect("sa")],
            // Loopback's discard port: nothing answers, nothing leaves the machine.
            coordinator_address: "127.0.0.1".parse().expect("ip"),
            api_port: 9,
            admin: false,
            joined_unix: 1,
        }));
        let mut rt = runtime(dir.path());
        let first = rt.rotate_now(&mut a).await.expect("deferred, not failed");
        let Outcome::Deferred {
            step: Action::Prepare(next),
            ..
        } = first
        else {
            panic!("not deferred at the prepare: {first:?}");
        };
        assert!(!first.is_done());
        assert!(
            first.to_string().starts_with("rotation deferred"),
            "{first}"
        );
        assert_eq!(a.key().public_key(), own.public_key(), "key unchanged");
        assert_eq!(key_on_disk(&a), own.public_key());
        assert_eq!(next_on_disk(&a), Some(next), "the next key is kept");
        // Asked again: the same next key is resumed, not a new one made.
        let again = rt.rotate_now(&mut a).await.expect("deferred");
        assert!(
            matches!(again, Outcome::Deferred { step: Action::Prepare(k), .. } if k == next),
            "{again:?}"
        );
    }

    #[tokio::test]
    async fn a_host_outside_a_managed_mesh_has_nothing_to_rotate_with() {
        let dir = tempfile::tempdir().expect("tempdir");
        let own = PrivateKey::from_bytes([60; 32]);
        let mut a = agent(dir.path(), &own);
        let mut rt = runtime(dir.path());
        assert_eq!(rt.rotate_now(&mut a).await, Err(RotateError::NotManaged));
        assert_eq!(next_on_disk(&a), None, "no next key written");
        assert_eq!(key_on_disk(&a), own.public_key());
    }
}
