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
/// Returns the operator's message; a rotation the coordinator could not be reached for is
/// deferred (the next key is kept and the rotation resumes when the coordinator answers),
/// which is not an error.
pub async fn rotate<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    state: &StateDir,
    registrar: Registrar<'_>,
) -> Result<String, String> {
    let path = agent.settings().private_key_file.clone();
    let old = agent.key().public_key();
    let pending = match crate::keyfile::inspect(&crate::keyfile::next_path(&path)) {
        Ok(crate::keyfile::KeyFileState::Valid(k)) if k.public_key() != old => Some(k),
        Ok(_) => None,
        Err(e) => return Err(e.to_string()),
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
            Err(StepError::Refused(e)) => {
                if rot.handle_refused().is_ok() {
                    if let Err(de) = crate::keyfile::discard_next(&path) {
                        tracing::warn!(error = %de, "cannot delete the abandoned next key");
                    }
                    return Err(format!(
                        "the coordinator refused the rotation ({action}): {e}; the key is unchanged"
                    ));
                }
                return Err(format!(
                    "the rotation ({action}) failed: {e}; the next key is kept and the rotation \
                     resumes by itself"
                ));
            }
            Err(StepError::Unreachable(e)) => {
                // A commit without an answer may still have gone through; then nobody accepts
                // the old key any more and we could not even ask. Try the next key now.
                if let (Action::Commit(_), Registrar::Remote(api)) = (action, &registrar) {
                    if probe_next_key(agent, state, *api).await {
                        return Ok(format!(
                            "key rotated: {} -> {}; the commit's reply was lost ({e}), and the \
                             coordinator answered through the new key; the old key is gone \
                             from disk",
                            old.short(),
                            next.public_key().short()
                        ));
                    }
                }
                tracing::warn!(error = %e, step = %action, "key rotation deferred");
                return Ok(format!(
                    "rotation deferred: the coordinator did not answer ({e}); the key is \
                     unchanged, the next key is kept, and the rotation resumes by itself when \
                     the coordinator answers"
                ));
            }
            Err(StepError::Failed(e)) => {
                return Err(format!(
                    "the rotation ({action}) failed: {e}; the next key is kept and the rotation \
                     resumes by itself"
                ))
            }
        }
    }
    let took = started.elapsed();
    tracing::info!(old = %old, new = %rot.live_key(), took_ms = took.as_millis() as u64, "key rotated");
    let mut message = format!(
        "key rotated: {} -> {} in {} ms; the old key is gone from disk",
        old.short(),
        rot.live_key().short(),
        took.as_millis()
    );
    if let Some(hint) = static_peer_hint(&static_peer_names(agent.netmap())) {
        tracing::warn!("{hint}");
        message.push_str("; ");
        message.push_str(&hint);
    }
    Ok(message)
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
