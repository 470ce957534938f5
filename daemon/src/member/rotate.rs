//! The rotating host's shell around `mesh_proto::rotation`: one driver for a member (its
//! coordinator over the API) and for the coordinator host itself (its registry in-process),
//! the stranded-key probe, and the catch-up from coordinator key notices.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use mesh_proto::netmap::Netmap;
use mesh_proto::rotation::{Action, Rotation};
use mesh_proto::{PrivateKey, PublicKey};

use crate::agent::{now, Agent};
use crate::backend::{LinkBackend, WgBackend};
use crate::coordinator::{CoordError, Coordinator};
use crate::disk::state::StateDir;
use crate::member::client::{self, CallError};

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
#[derive(Clone)]
pub enum Registrar {
    /// A member: the coordinator API, inside the tunnel.
    Remote(SocketAddr),
    /// The coordinator host: its registry, in-process.
    Local(Coordinator),
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

    /// The outcome typed for `meshctl rotate --json`.
    pub fn done(&self) -> mesh_proto::wire::control::Done {
        use mesh_proto::wire::control::Done;
        match self {
            Outcome::Rotated {
                old,
                new,
                took,
                static_peers,
                switch_error,
                reply_lost,
            } => Done::Rotated {
                old_public_key: *old,
                new_public_key: *new,
                took_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                static_peers: static_peers.clone(),
                switch_error: switch_error.clone(),
                reply_lost: reply_lost.clone(),
            },
            Outcome::Deferred { step, reason } => Done::RotationDeferred {
                step: step.to_string(),
                reason: reason.clone(),
            },
        }
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
    // A simulated fleet has no sockets (and no tunnel to poke).
    #[cfg(any(test, feature = "test-fakes"))]
    if client::in_process::installed().is_some() {
        return;
    }
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

/// A rotation in progress, following `mesh_proto::rotation`: write the next key, prepare it
/// (peers put it on their devices with no allowed IPs; the prepare returns once the hosts that
/// follow the coordinator took it), commit, switch the device and handshake every peer, then
/// promote the key file (the old key leaves the disk; the old `PrivateKey` is dropped, which
/// zeroizes it). A next key left by an interrupted rotation is resumed.
///
/// For the coordinator host the commit also writes the key notices, and the switch waits until
/// the followers took the netmap with the new key: they reach the coordinator (API included)
/// through it, so switching earlier would cut them off.
///
/// The steps on this host (files, the device) run on the agent loop in [`Run::advance`]; the
/// two that wait on the coordinator (prepare, commit) are [`Progress::Waiting`] futures that
/// need no agent, so the loop runs them as tasks and goes on; their [`StepDone`] comes back
/// to [`Run::step_done`].
pub struct Run {
    rot: Rotation,
    next: PrivateKey,
    old: PublicKey,
    path: PathBuf,
    registrar: Registrar,
    started: tokio::time::Instant,
    /// The member's netmap from the commit's reply, applied at the switch.
    committed_netmap: Option<Netmap>,
    /// The coordinator's followers that did not take its prepare in time.
    slow: Vec<IpAddr>,
    switch_error: Option<String>,
    /// A commit went unanswered and the next key is being tried (`Probe`), with why.
    probe: Option<(Probe, String)>,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("phase", &self.rot.phase())
            .field("old", &self.old)
            .field("next", &self.next.public_key())
            .finish_non_exhaustive()
    }
}

/// A prepare or commit waiting on the coordinator, for the loop to run as a task.
pub type Wait = Pin<Box<dyn Future<Output = StepDone> + Send>>;

/// What a waiting step brought back.
pub struct StepDone {
    action: Action,
    result: Result<StepOut, StepError>,
}

impl std::fmt::Debug for StepDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StepDone({}, ok: {})", self.action, self.result.is_ok())
    }
}

enum StepOut {
    Prepared {
        slow: Vec<IpAddr>,
    },
    Committed {
        netmap: Option<Netmap>,
    },
    /// The coordinator's answer through the next key, after a commit went unanswered.
    Probed(Result<Option<Netmap>, CallError>),
}

/// Where a rotation stands after a step.
pub enum Progress {
    /// A step waits on the coordinator: run this, then give its result to [`Run::step_done`].
    Waiting(Wait),
    /// The rotation ended (a deferred one resumes later from its kept next key).
    Done(Result<Outcome, RotateError>),
}

impl Run {
    /// A new rotation, or the resumption of one whose next key is on disk.
    pub fn start<W: WgBackend, L: LinkBackend>(
        agent: &Agent<W, L>,
        registrar: Registrar,
    ) -> Result<Run, RotateError> {
        let path = agent.settings().private_key_file.clone();
        let old = agent.key().public_key();
        let pending = match crate::disk::keyfile::inspect(&crate::disk::keyfile::next_path(&path)) {
            Ok(crate::disk::keyfile::KeyFileState::Valid(k)) if k.public_key() != old => Some(k),
            Ok(_) => None,
            Err(e) => return Err(RotateError::NextKeyFile(e.to_string())),
        };
        let (rot, next) = match pending {
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
        Ok(Run {
            rot,
            next,
            old,
            path,
            registrar,
            started: tokio::time::Instant::now(),
            committed_netmap: None,
            slow: Vec::new(),
            switch_error: None,
            probe: None,
        })
    }

    /// Run this host's steps until one waits on the coordinator, or the rotation ends.
    pub async fn advance<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &mut Agent<W, L>,
        state: &StateDir,
    ) -> Progress {
        while let Some(action) = self.rot.poll_action() {
            tracing::info!(step = %action, "key rotation");
            let step: Result<&'static str, StepError> = match action {
                Action::WriteNextKey => crate::disk::keyfile::write_next(&self.path, &self.next)
                    .map_err(failed)
                    .and_then(|()| {
                        self.rot
                            .handle_next_key_written(self.next.public_key())
                            .map_err(failed)
                    })
                    .map(|()| "next-key-written"),
                Action::Prepare(k) => match self.prepare(agent, k) {
                    Ok(wait) => return Progress::Waiting(wait),
                    Err(e) => Err(e),
                },
                Action::Commit(k) => match self.commit(agent, k) {
                    Ok(wait) => return Progress::Waiting(wait),
                    Err(e) => Err(e),
                },
                Action::Switch(_) => self.switch(agent, state).await,
                Action::Promote => crate::disk::keyfile::promote(&self.path)
                    .map_err(failed)
                    .and_then(|()| self.rot.handle_promoted().map_err(failed))
                    .map(|()| "promoted"),
            };
            match step {
                Ok(done) => crash_point(done),
                Err(e) => return self.stopped(agent, action, e).await,
            }
        }
        let took = self.started.elapsed();
        tracing::info!(old = %self.old, new = %self.rot.live_key(), took_ms = took.as_millis() as u64, "key rotated");
        let static_peers = static_peer_names(agent.netmap());
        if let Some(hint) = static_peer_hint(&static_peers) {
            tracing::warn!("{hint}");
        }
        Progress::Done(Ok(Outcome::Rotated {
            old: self.old,
            new: self.rot.live_key(),
            took,
            static_peers,
            switch_error: self.switch_error.take(),
            reply_lost: None,
        }))
    }

    /// The result of a step that waited on the coordinator; then on to the next steps.
    pub async fn step_done<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &mut Agent<W, L>,
        state: &StateDir,
        done: StepDone,
    ) -> Progress {
        let StepDone { action, result } = done;
        if let Ok(StepOut::Probed(answer)) = result {
            return Progress::Done(self.probed(agent, state, action, answer).await);
        }
        let step = result.and_then(|out| match out {
            StepOut::Prepared { slow } => {
                self.slow = slow;
                self.rot
                    .handle_prepared()
                    .map(|()| "prepared")
                    .map_err(failed)
            }
            StepOut::Committed { netmap } => {
                self.committed_netmap = netmap;
                self.rot
                    .handle_committed()
                    .map(|()| "committed")
                    .map_err(failed)
            }
            StepOut::Probed(_) => Err(failed("a probe answer without a probe")),
        });
        match step {
            Ok(done) => crash_point(done),
            Err(e) => return self.stopped(agent, action, e).await,
        }
        self.advance(agent, state).await
    }

    fn prepare<W: WgBackend, L: LinkBackend>(
        &self,
        agent: &Agent<W, L>,
        k: PublicKey,
    ) -> Result<Wait, StepError> {
        let action = Action::Prepare(k);
        match &self.registrar {
            Registrar::Remote(api) => {
                let api = *api;
                let signer = agent.signer()?.with_next(&self.next)?;
                Ok(Box::pin(async move {
                    let result = client::rotate_prepare(api, &signer, k)
                        .await
                        .map(|_| StepOut::Prepared { slow: Vec::new() })
                        .map_err(StepError::from);
                    StepDone { action, result }
                }))
            }
            Registrar::Local(coord) => {
                let coord = coord.clone();
                Ok(Box::pin(async move {
                    // Right after a restart, let the followers reconnect first: a rotation
                    // they do not see would cut them off.
                    let missing = coord.wait_followers_returned().await;
                    if !missing.is_empty() {
                        tracing::info!(missing = ?missing, "rotating without the hosts that have not polled since the coordinator started");
                    }
                    let result =
                        match registry(&coord, move |c| c.prepare_own_rotation(k, now().as_secs()))
                            .await
                        {
                            Ok(version) => Ok(StepOut::Prepared {
                                slow: wait_for_followers(&coord, version, "prepared", &[]).await,
                            }),
                            Err(e) => Err(StepError::Refused(e.to_string())),
                        };
                    StepDone { action, result }
                }))
            }
        }
    }

    fn commit<W: WgBackend, L: LinkBackend>(
        &self,
        agent: &Agent<W, L>,
        k: PublicKey,
    ) -> Result<Wait, StepError> {
        let action = Action::Commit(k);
        match &self.registrar {
            Registrar::Remote(api) => {
                let api = *api;
                let signer = agent.signer()?.with_next(&self.next)?;
                Ok(Box::pin(async move {
                    let result = match client::rotate_commit(api, &signer, k).await {
                        Ok(nm) if nm.public_key != k => Err(StepError::Failed(format!(
                            "the coordinator's reply names key {} for us, not the committed {}",
                            nm.public_key.short(),
                            k.short()
                        ))),
                        Ok(nm) => Ok(StepOut::Committed { netmap: Some(nm) }),
                        Err(e) => Err(StepError::from(e)),
                    };
                    StepDone { action, result }
                }))
            }
            Registrar::Local(coord) => {
                let coord = coord.clone();
                let old = agent.key().clone();
                let slow = self.slow.clone();
                Ok(Box::pin(async move {
                    let result = match registry(&coord, move |c| {
                        c.commit_own_rotation(k, &old, now().as_secs())
                    })
                    .await
                    {
                        Ok(version) => {
                            // Hosts too slow to take the prepare are not waited for again:
                            // they catch up from a key notice, and everyone else gets the
                            // switch now.
                            wait_for_followers(&coord, version, "committed", &slow).await;
                            Ok(StepOut::Committed { netmap: None })
                        }
                        Err(e) => Err(StepError::Failed(e.to_string())),
                    };
                    StepDone { action, result }
                }))
            }
        }
    }

    async fn switch<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &mut Agent<W, L>,
        state: &StateDir,
    ) -> Result<&'static str, StepError> {
        agent.set_key(self.next.clone());
        if let Registrar::Local(coord) = &self.registrar {
            // The API proves requests with the new key now (and the old one for hosts that
            // have not taken the switch yet).
            coord.set_own_private_key(&self.next);
        }
        if let Some(nm) = self.committed_netmap.take() {
            // The loop went on while the commit was out: a netmap the follower brought since
            // may be newer than the commit's reply.
            if agent.netmap().is_none_or(|held| held.version <= nm.version) {
                agent.set_netmap(nm);
            }
        }
        let report = agent.reconcile(now()).await;
        if let Some(nm) = agent.netmap() {
            poke_peers(nm).await;
        }
        if let Some(e) = report.error {
            tracing::warn!(error = %e, "the pass after the key switch had errors");
            self.switch_error = Some(e.to_string());
        }
        if agent.membership().is_some() {
            if let Some(nm) = agent.netmap() {
                if let Err(e) = state.save_netmap(nm) {
                    tracing::warn!(error = %e, "cannot cache the netmap");
                }
            }
        }
        self.rot
            .handle_switched()
            .map(|()| "switched")
            .map_err(failed)
    }

    /// A step did not go through: how the rotation ends, or the probe of the next key that
    /// decides it (a commit without an answer may still have gone through; then nobody
    /// accepts the old key any more and we could not even ask).
    async fn stopped<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &mut Agent<W, L>,
        action: Action,
        e: StepError,
    ) -> Progress {
        if let (StepError::Unreachable(reason), Action::Commit(_), Registrar::Remote(api)) =
            (&e, action, &self.registrar)
        {
            if let Some((probe, call)) = Probe::start(agent, *api).await {
                self.probe = Some((probe, reason.clone()));
                return Progress::Waiting(Box::pin(async move {
                    StepDone {
                        action,
                        result: Ok(StepOut::Probed(call.await)),
                    }
                }));
            }
        }
        Progress::Done(self.ended(action, e))
    }

    /// The next key's probe answered: the rotation went through (the commit's reply was
    /// lost), or it is deferred with the old key back in place.
    async fn probed<W: WgBackend, L: LinkBackend>(
        &mut self,
        agent: &mut Agent<W, L>,
        state: &StateDir,
        action: Action,
        answer: Result<Option<Netmap>, CallError>,
    ) -> Result<Outcome, RotateError> {
        let Some((probe, reason)) = self.probe.take() else {
            return Err(RotateError::Failed {
                step: action,
                reason: "a probe answer without a probe".into(),
            });
        };
        if probe.finish(agent, state, answer).await {
            return Ok(Outcome::Rotated {
                old: self.old,
                new: self.next.public_key(),
                took: self.started.elapsed(),
                static_peers: static_peer_names(agent.netmap()),
                switch_error: None,
                reply_lost: Some(reason),
            });
        }
        self.ended(action, StepError::Unreachable(reason))
    }

    /// How the rotation ends after a step that did not go through.
    fn ended(&mut self, action: Action, e: StepError) -> Result<Outcome, RotateError> {
        match e {
            StepError::Refused(reason) => {
                if self.rot.handle_refused().is_ok() {
                    if let Err(de) = crate::disk::keyfile::discard_next(&self.path) {
                        tracing::warn!(error = %de, "cannot delete the abandoned next key");
                    }
                    return Err(RotateError::Refused {
                        step: action,
                        reason,
                    });
                }
                Err(RotateError::Failed {
                    step: action,
                    reason,
                })
            }
            StepError::Unreachable(reason) => {
                tracing::warn!(error = %reason, step = %action, "key rotation deferred");
                Ok(Outcome::Deferred {
                    step: action,
                    reason,
                })
            }
            StepError::Failed(reason) => Err(RotateError::Failed {
                step: action,
                reason,
            }),
        }
    }
}

/// A registry write (SQLite, synchronous=FULL) off the async workers.
async fn registry<T: Send + 'static>(
    coord: &Coordinator,
    f: impl FnOnce(&Coordinator) -> Result<T, CoordError> + Send + 'static,
) -> Result<T, CoordError> {
    let coord = coord.clone();
    match tokio::task::spawn_blocking(move || f(&coord)).await {
        Ok(r) => r,
        Err(e) => Err(CoordError::Internal(format!(
            "the registry task failed: {e}"
        ))),
    }
}

/// Rotate now and wait for the end: [`Run::start`], then every step in turn (the waiting ones
/// awaited here). The daemon loop drives a [`Run`] itself instead, so it is never held.
pub async fn rotate<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    state: &StateDir,
    registrar: Registrar,
) -> Result<Outcome, RotateError> {
    let mut run = Run::start(agent, registrar)?;
    let mut progress = run.advance(agent, state).await;
    loop {
        match progress {
            Progress::Done(r) => return r,
            Progress::Waiting(wait) => {
                let done = wait.await;
                progress = run.step_done(agent, state, done).await;
            }
        }
    }
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
/// coordinator unreachable, try the next key: [`Probe::start`] puts it on the device, the
/// returned call asks the coordinator through it (run it as a task), and [`Probe::finish`]
/// promotes it if the coordinator holds it, or puts the old key back.
#[derive(Debug)]
pub struct Probe {
    old: PrivateKey,
    next: PrivateKey,
}

impl Probe {
    /// Switch the device to the next key on disk, if there is a usable one, and return the
    /// call that asks the coordinator at `api` through it.
    pub async fn start<W: WgBackend, L: LinkBackend>(
        agent: &mut Agent<W, L>,
        api: SocketAddr,
    ) -> Option<(
        Probe,
        impl std::future::Future<Output = Result<Option<Netmap>, CallError>> + Send + 'static,
    )> {
        let path = agent.settings().private_key_file.clone();
        let old = agent.key().clone();
        let next = match crate::disk::keyfile::inspect(&crate::disk::keyfile::next_path(&path)) {
            Ok(crate::disk::keyfile::KeyFileState::Valid(k))
                if k.public_key() != old.public_key() =>
            {
                k
            }
            _ => return None,
        };
        tracing::info!(next = %next.public_key(), "coordinator unreachable with a rotation pending: trying the next key");
        agent.set_key(next.clone());
        agent.reconcile(now()).await;
        let signer = agent.signer();
        let call = async move {
            match signer {
                Ok(signer) => client::fetch_netmap(api, &signer, 0).await,
                Err(e) => Err(e),
            }
        };
        Some((Probe { old, next }, call))
    }

    /// The coordinator's answer through the next key: promote it when the coordinator holds
    /// it, else put the old key back. Returns whether the next key is now live.
    pub async fn finish<W: WgBackend, L: LinkBackend>(
        self,
        agent: &mut Agent<W, L>,
        state: &StateDir,
        answer: Result<Option<Netmap>, CallError>,
    ) -> bool {
        let Probe { old, next } = self;
        let path = agent.settings().private_key_file.clone();
        match answer {
            Ok(Some(nm)) if nm.public_key == next.public_key() => {
                if let Err(e) = crate::disk::keyfile::promote(&path) {
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
}

/// Why no new coordinator key came from the key notices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoticeFetchError {
    #[error("no endpoint known for the coordinator")]
    NoEndpoint,
    /// The request could not be signed.
    #[error("{0}")]
    Sign(CallError),
    /// No endpoint answered; each one's failure.
    #[error("{}", .0.iter().map(|(ep, e)| format!("{ep}: {e}")).collect::<Vec<_>>().join("; "))]
    Unanswered(Vec<(SocketAddr, CallError)>),
    /// An endpoint answered, but its notices do not lead from our key to a new one.
    #[error(transparent)]
    Follow(#[from] mesh_proto::wire::notice::NoticeError),
}

/// Fetch the coordinator key notices for `host` from the coordinator's underlay `endpoints`
/// (first that answers) and follow them from the coordinator key we know. Returns the
/// coordinator's current key.
pub async fn coordinator_key_from_notices(
    endpoints: &[SocketAddr],
    host: &PrivateKey,
    known: PublicKey,
) -> Result<PublicKey, NoticeFetchError> {
    if endpoints.is_empty() {
        return Err(NoticeFetchError::NoEndpoint);
    }
    let mut errors = Vec::new();
    // Signed toward the coordinator key we know (the old one): the coordinator kept that
    // key's proof for us when it rotated, and answers nobody else.
    let signer = client::Signer::new(host, &known).map_err(NoticeFetchError::Sign)?;
    for ep in endpoints {
        match client::key_notices(*ep, &signer, Duration::from_secs(5)).await {
            Ok(notices) => return Ok(mesh_proto::wire::notice::follow(&notices, host, known)?),
            Err(e) => errors.push((*ep, e)),
        }
    }
    Err(NoticeFetchError::Unanswered(errors))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::backend::{FakeBackend, FakeLink};
    use crate::coordinator::CoordinatorSettings;
    use crate::disk::state::Membership;
    use crate::member::MemberRuntime;

    const NOW: u64 = 1_800_000_000;

    fn agent(dir: &std::path::Path, key: &PrivateKey) -> Agent<FakeBackend, FakeLink> {
        let mut s = crate::agent::tests::settings(Vec::new());
        s.private_key_file = dir.join("private.key");
        s.state_dir = dir.join("state");
        let mut text = key.to_base64();
        text.push('\n');
        crate::disk::state::write_atomic(&s.private_key_file, text.as_bytes()).expect("key file");
        Agent::new(FakeBackend::default(), FakeLink::default(), s, key.clone())
    }

    fn coordinator(dir: &std::path::Path, own: &PrivateKey) -> Coordinator {
        let settings = CoordinatorSettings {
            mesh_cidr: "10.99.99.0/24".parse().expect("net"),
            api_port: mesh_proto::wire::api::DEFAULT_API_PORT,
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

    struct Loop {
        rt: MemberRuntime,
        rx: tokio::sync::mpsc::Receiver<crate::member::MeshEvent>,
    }

    fn runtime(dir: &std::path::Path) -> Loop {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        Loop {
            rt: MemberRuntime::new(StateDir::new(dir.join("state")), tx),
            rx,
        }
    }

    impl Loop {
        /// `meshctl rotate` as the daemon loop runs it: the rotation starts, the loop takes
        /// the events of its waiting steps, the waiter gets the outcome.
        async fn rotate(
            &mut self,
            a: &mut Agent<FakeBackend, FakeLink>,
        ) -> Result<Outcome, RotateError> {
            let (tx, mut done) = tokio::sync::oneshot::channel();
            self.rt.rotate_now(a, Some(tx)).await;
            loop {
                tokio::select! {
                    r = &mut done => return r.expect("an outcome"),
                    Some(ev) = self.rx.recv() => self.rt.on_event(a, ev).await,
                }
            }
        }
    }

    fn key_on_disk(agent: &Agent<FakeBackend, FakeLink>) -> PublicKey {
        match crate::disk::keyfile::inspect(&agent.settings().private_key_file) {
            Ok(crate::disk::keyfile::KeyFileState::Valid(k)) => k.public_key(),
            other => panic!("key file: {other:?}"),
        }
    }

    fn next_on_disk(agent: &Agent<FakeBackend, FakeLink>) -> Option<PublicKey> {
        match crate::disk::keyfile::inspect(&crate::disk::keyfile::next_path(
            &agent.settings().private_key_file,
        )) {
            Ok(crate::disk::keyfile::KeyFileState::Valid(k)) => Some(k.public_key()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn the_coordinator_hosts_rotation_ends_rotated_with_the_new_key_everywhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let own = PrivateKey::from_bytes([1; 32]);
        let mut a = agent(dir.path(), &own);
        let mut rt = runtime(dir.path());
        rt.rt.coordinator = Some(coordinator(dir.path(), &own));
        let out = rt.rotate(&mut a).await.expect("rotated");
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
            .rt
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
        rt.rt.coordinator = Some(coordinator(dir.path(), &own));
        let out = rt.rotate(&mut a).await.expect("committed");
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

    /// A member whose coordinator is loopback's discard port: nothing answers, nothing
    /// leaves the machine.
    fn unanswered_membership() -> Membership {
        Membership {
            host_name: "dock-mirror".into(),
            address: "10.99.99.3".parse().expect("ip"),
            mesh_cidr: "10.99.99.0/24".parse().expect("net"),
            coordinator_public_key: PrivateKey::from_bytes([100; 32]).public_key(),
            coordinator_endpoints: vec!["127.0.0.1:9".parse().expect("sa")],
            coordinator_address: "127.0.0.1".parse().expect("ip"),
            api_port: 9,
            admin: false,
            joined_unix: 1,
        }
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_defers_and_keeps_the_same_next_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let own = PrivateKey::from_bytes([60; 32]);
        let mut a = agent(dir.path(), &own);
        a.set_membership(Some(unanswered_membership()));
        let mut rt = runtime(dir.path());
        let first = rt.rotate(&mut a).await.expect("deferred, not failed");
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
        let again = rt.rotate(&mut a).await.expect("deferred");
        assert!(
            matches!(again, Outcome::Deferred { step: Action::Prepare(k), .. } if k == next),
            "{again:?}"
        );
    }

    /// A commit that went unanswered: the next key is tried from a task (the loop is not
    /// held meanwhile, and the device runs the next key during the probe); the coordinator
    /// answering through it finishes the rotation, no answer puts the old key back.
    #[tokio::test]
    async fn a_lost_commit_reply_is_settled_by_probing_the_next_key_without_holding_the_loop() {
        for coordinator_holds_next in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let own = PrivateKey::from_bytes([70; 32]);
            let mut a = agent(dir.path(), &own);
            a.set_membership(Some(unanswered_membership()));
            let state = StateDir::new(dir.path().join("state"));
            let api = a.membership().expect("member").api_addr();
            let mut run = Run::start(&a, Registrar::Remote(api)).expect("start");
            let next = run.next.public_key();
            // The prepare and the commit are answered here, not by a coordinator.
            let Progress::Waiting(_) = run.advance(&mut a, &state).await else {
                panic!("the prepare waits on the coordinator");
            };
            let prepared = StepDone {
                action: Action::Prepare(next),
                result: Ok(StepOut::Prepared { slow: Vec::new() }),
            };
            let Progress::Waiting(_) = run.step_done(&mut a, &state, prepared).await else {
                panic!("the commit waits on the coordinator");
            };
            let lost = StepDone {
                action: Action::Commit(next),
                result: Err(StepError::Unreachable("reply lost".into())),
            };
            let Progress::Waiting(_) = run.step_done(&mut a, &state, lost).await else {
                panic!("the probe runs as a task");
            };
            assert_eq!(a.key().public_key(), next, "the device tries the next key");
            let answer = if coordinator_holds_next {
                let mut nm: Netmap = serde_json::from_value(serde_json::json!({
                    "version": 4,
                    "mesh_cidr": "10.99.99.0/24",
                    "name": "dock-mirror",
                    "address": "10.99.99.3",
                    "public_key": next.to_base64(),
                    "peers": [],
                }))
                .expect("netmap");
                nm.peers.clear();
                Ok(Some(nm))
            } else {
                Err(CallError::Unreachable {
                    addr: api,
                    message: "no answer".into(),
                })
            };
            let probed = StepDone {
                action: Action::Commit(next),
                result: Ok(StepOut::Probed(answer)),
            };
            let Progress::Done(outcome) = run.step_done(&mut a, &state, probed).await else {
                panic!("the probe's answer ends the rotation");
            };
            let outcome = outcome.expect("an outcome, not an error");
            if coordinator_holds_next {
                assert!(
                    matches!(&outcome, Outcome::Rotated { reply_lost: Some(r), new, .. } if r == "reply lost" && *new == next),
                    "{outcome:?}"
                );
                assert_eq!(a.key().public_key(), next);
                assert_eq!(key_on_disk(&a), next, "promoted");
                assert_eq!(next_on_disk(&a), None);
            } else {
                assert!(
                    matches!(
                        &outcome,
                        Outcome::Deferred {
                            step: Action::Commit(_),
                            ..
                        }
                    ),
                    "{outcome:?}"
                );
                assert_eq!(
                    a.key().public_key(),
                    own.public_key(),
                    "the old key is back"
                );
                assert_eq!(key_on_disk(&a), own.public_key());
                assert_eq!(next_on_disk(&a), Some(next), "kept for the next try");
            }
        }
    }

    #[tokio::test]
    async fn a_host_outside_a_managed_mesh_has_nothing_to_rotate_with() {
        let dir = tempfile::tempdir().expect("tempdir");
        let own = PrivateKey::from_bytes([60; 32]);
        let mut a = agent(dir.path(), &own);
        let mut rt = runtime(dir.path());
        assert_eq!(rt.rotate(&mut a).await, Err(RotateError::NotManaged));
        assert_eq!(next_on_disk(&a), None, "no next key written");
        assert_eq!(key_on_disk(&a), own.public_key());
    }
}
