//! Joining a mesh with a token (innernet-style bootstrap), in three parts so the agent loop is
//! never held while the coordinator is asked:
//!
//! 1. [`start`] (on the loop): check the token, put the coordinator on the device with the
//!    token's throwaway key, and return the [`Pending`] join and the [`Call`] to make;
//! 2. [`Call::run`] (off the loop, no agent): ask the coordinator, retrying until the deadline;
//! 3. [`finish`] (on the loop): take the answer (own key, membership, netmap), or put
//!    everything back.
//!
//! [`join`] runs the three in a row (tests, and callers that may wait).

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use mesh_proto::wire::api::{JoinRequest, JoinResponse};
use mesh_proto::wire::token::{Token, TokenBody};
use mesh_proto::{PeerSpec, PrivateKey};

use crate::agent::desired::BOOTSTRAP_KEEPALIVE;
use crate::agent::{now, Agent, AgentSnapshot};
use crate::backend::{LinkBackend, WgBackend};
use crate::disk::state::{write_atomic, Membership, StateDir};
use crate::member::client::{self, Api, CallError};
use mesh_proto::member::endpoint_report;

const JOIN_RETRY: Duration = Duration::from_millis(250);

/// Why a join failed, for the operator; `retryable` when trying again later may work (the
/// coordinator did not answer), not when the token itself was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinError {
    pub message: String,
    pub retryable: bool,
}

impl JoinError {
    fn retryable(message: String) -> Self {
        JoinError {
            message,
            retryable: true,
        }
    }
}

impl From<String> for JoinError {
    fn from(message: String) -> Self {
        JoinError {
            message,
            retryable: false,
        }
    }
}

impl From<&str> for JoinError {
    fn from(message: &str) -> Self {
        JoinError::from(message.to_string())
    }
}

impl std::fmt::Display for JoinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A join between [`start`] and [`finish`]: what it needs to take the answer or to put
/// everything back.
pub struct Pending {
    body: TokenBody,
    own: PrivateKey,
    snapshot: AgentSnapshot,
    /// The interface existed before the join (else a failed join deletes it).
    existed: bool,
    interface: String,
    at: SocketAddr,
    now_unix: u64,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("host", &self.body.host_name)
            .field("coordinator", &self.at)
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// The host name the token names.
    pub fn host_name(&self) -> &str {
        &self.body.host_name
    }
}

/// The request to the coordinator: needs no agent, so it runs off the loop.
pub struct Call {
    at: SocketAddr,
    signer: client::Signer,
    req: JoinRequest,
}

/// The coordinator's answer (or why there was none) and how long it was waited for.
pub struct Answer {
    result: Result<JoinResponse, CallError>,
    waited: Duration,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("ok", &self.result.is_ok())
            .field("waited", &self.waited)
            .finish()
    }
}

impl Call {
    /// Ask the coordinator, retrying what looks like "not there yet" (no handshake yet, the
    /// API not up yet) until `api.join_deadline()`.
    pub async fn run<A: Api>(self, api: &A) -> Answer {
        let window = api.join_deadline();
        let deadline = tokio::time::Instant::now() + window;
        let result = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match api.join(self.at, &self.signer, &self.req, left).await {
                Err(e @ (CallError::Unreachable { .. } | CallError::Unverified { .. }))
                    if deadline.saturating_duration_since(tokio::time::Instant::now())
                        > JOIN_RETRY =>
                {
                    tracing::debug!(error = %e, "coordinator not reachable yet; retrying");
                    tokio::time::sleep(JOIN_RETRY).await;
                }
                other => break other,
            }
        };
        Answer {
            result,
            waited: window,
        }
    }
}

/// Check `token_text` and bring the interface up with the token's throwaway key and the
/// coordinator as the one peer. Refused before anything changes when the host is the
/// coordinator, already a member, or the token is unusable; a failure after the bootstrap puts
/// everything back.
pub async fn start<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    state: &StateDir,
    token_text: &str,
) -> Result<(Pending, Call), JoinError> {
    let token_text = token_text.trim();
    if agent.settings().coordinator.is_some() {
        return Err("this host runs the coordinator; it is already the mesh".into());
    }
    if let Some(m) = agent.membership() {
        return Err(JoinError::from(format!(
            "already a member of mesh {} as {} ({}); remove {} to join another mesh",
            m.mesh_cidr,
            m.host_name,
            m.address,
            state.membership_path().display()
        )));
    }
    let token =
        Token::decode(token_text).map_err(|e| JoinError::from(format!("invalid token: {e}")))?;
    let body = token.body.clone();
    let now_unix = now().as_secs();
    if body.expires_unix <= now_unix {
        return Err(JoinError::from(format!(
            "the invitation for {} expired {}s ago (by this host's clock); ask for a new one",
            body.host_name,
            now_unix - body.expires_unix
        )));
    }
    let throwaway = token
        .throwaway_key()
        .map_err(|e| JoinError::from(format!("invalid token: {e}")))?;
    let address = IpNet::new(body.host_address, body.mesh_cidr.prefix_len())
        .map_err(|e| JoinError::from(format!("invalid token: bad address: {e}")))?;
    if body.coordinator_endpoints.is_empty() {
        return Err("invalid token: it names no coordinator endpoint".into());
    }
    // What the token names is written into the membership, the interface and /etc/hosts.
    if !mesh_proto::netmap::valid_name(&body.host_name)
        || !body.mesh_cidr.contains(&body.host_address)
        || !body.mesh_cidr.contains(&body.coordinator_address)
        || body.host_address == body.coordinator_address
        || body.api_port == 0
    {
        return Err(JoinError::from(format!(
            "invalid token: its host name, addresses or port are not usable (name {:?}, address \
             {}, coordinator {}, mesh {})",
            body.host_name.chars().take(64).collect::<String>(),
            body.host_address,
            body.coordinator_address,
            body.mesh_cidr
        )));
    }
    let interface = agent.settings().interface.clone();
    let existed = agent.wg.observe().await.is_ok();
    let snapshot = agent.snapshot();
    tracing::info!(
        host = %body.host_name,
        address = %address,
        coordinator = %body.coordinator_address,
        "joining the mesh"
    );
    let bootstrap = PeerSpec {
        public_key: body.coordinator_public_key,
        preshared_key: None,
        endpoint: body.coordinator_endpoints.first().copied(),
        allowed_ips: vec![IpNet::from(body.coordinator_address)],
        persistent_keepalive: Some(BOOTSTRAP_KEEPALIVE),
    };
    agent.set_bootstrap(throwaway.clone(), address, bootstrap);
    let own = PrivateKey::generate();
    let at = SocketAddr::new(body.coordinator_address, body.api_port);
    let pending = Pending {
        body,
        own,
        snapshot,
        existed,
        interface,
        at,
        now_unix,
    };

    let report = agent.reconcile(now()).await;
    if let Some(e) = report.error {
        let e = JoinError::retryable(format!(
            "cannot bring {} up for the join: {e}",
            pending.interface
        ));
        return Err(put_back(agent, state, pending, e).await);
    }
    let underlay = agent
        .link
        .underlay_addresses(&pending.interface)
        .await
        .unwrap_or_default();
    let req = JoinRequest {
        token: token_text.to_string(),
        public_key: pending.own.public_key(),
        listen_port: agent.settings().listen_port,
        addresses: endpoint_report(0, underlay, Some(address)).addresses,
    };
    // Signed with the throwaway key the invitation registered, proving the new key too.
    let signer = match client::Signer::new(&throwaway, &pending.body.coordinator_public_key)
        .and_then(|s| s.with_next(&pending.own))
    {
        Ok(s) => s,
        Err(e) => {
            let e = JoinError::from(e.to_string());
            return Err(put_back(agent, state, pending, e).await);
        }
    };
    Ok((pending, Call { at, signer, req }))
}

/// Take the coordinator's answer: the host's own key, the membership and the netmap, saved
/// and applied. On failure everything is put back (an interface the join created is deleted)
/// and the error says why, in the coordinator's own words when it refused.
pub async fn finish<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    state: &StateDir,
    pending: Pending,
    answer: Answer,
) -> Result<Membership, JoinError> {
    match take(agent, state, &pending, answer).await {
        Ok((membership, netmap)) => {
            agent.set_key(pending.own);
            agent.set_membership(Some(membership.clone()));
            agent.set_netmap(netmap);
            let st = agent.mesh_state_mut();
            st.reachable = Some(true);
            st.last_error = None;
            st.last_contact_unix = Some(now().as_secs());
            let report = agent.reconcile(now()).await;
            if let Some(e) = report.error {
                tracing::warn!(error = %e, "first pass after the join had errors");
            }
            tracing::info!(host = %membership.host_name, address = %membership.address, "joined");
            Ok(membership)
        }
        Err(e) => Err(put_back(agent, state, pending, e).await),
    }
}

/// Check the answer and save what it gives (the key file, the netmap, the membership).
async fn take<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    state: &StateDir,
    pending: &Pending,
    answer: Answer,
) -> Result<(Membership, mesh_proto::netmap::Netmap), JoinError> {
    let body = &pending.body;
    let at = pending.at;
    let resp = match answer.result {
        Ok(r) => r,
        Err(e @ (CallError::Unreachable { .. } | CallError::Unverified { .. })) => {
            let message = e.to_string();
            // Did the coordinator accept the token's key (a WireGuard handshake)?
            let handshake = agent.wg.observe().await.ok().and_then(|d| {
                d.peers
                    .get(&body.coordinator_public_key)
                    .and_then(|p| p.last_handshake)
            });
            let endpoints = body
                .coordinator_endpoints
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let secs = answer.waited.as_secs();
            return Err(JoinError::retryable(match handshake {
                Some(_) => format!(
                    "the coordinator accepted the token's key but its API at {at} did not \
                     answer within {secs}s ({message}); is the coordinator running?"
                ),
                None => format!(
                    "no answer from the coordinator {at} through the tunnel within {secs}s \
                     ({message}), not even a WireGuard handshake: the coordinator does not \
                     accept this token's key, so the invitation was already used, revoked \
                     or expired, or the token belongs to another mesh; or the coordinator's \
                     endpoint {endpoints} is unreachable from here"
                ),
            }));
        }
        Err(CallError::Refused { status, message }) if status >= 500 => {
            return Err(JoinError::retryable(message))
        }
        Err(e) => return Err(e.to_string().into()),
    };
    if resp.netmap.public_key != pending.own.public_key()
        || resp.netmap.address != body.host_address
    {
        return Err(JoinError::from(format!(
            "the coordinator answered with a netmap for {} ({}), not for us",
            resp.netmap.name, resp.netmap.address
        )));
    }
    resp.netmap
        .validate()
        .map_err(|e| JoinError::from(e.to_string()))?;
    let mut key_text = pending.own.to_base64();
    key_text.push('\n');
    write_atomic(&agent.settings().private_key_file, key_text.as_bytes())
        .map_err(|e| JoinError::from(e.to_string()))?;
    let membership = Membership {
        host_name: body.host_name.clone(),
        address: body.host_address,
        mesh_cidr: body.mesh_cidr,
        coordinator_public_key: body.coordinator_public_key,
        coordinator_endpoints: body.coordinator_endpoints.clone(),
        coordinator_address: body.coordinator_address,
        api_port: body.api_port,
        admin: body.admin,
        joined_unix: pending.now_unix,
    };
    state
        .save_netmap(&resp.netmap)
        .map_err(|e| JoinError::from(e.to_string()))?;
    state
        .save_membership(&membership)
        .map_err(|e| JoinError::from(e.to_string()))?;
    Ok((membership, resp.netmap))
}

/// A failed join: the agent as it was, the state directory cleared, and an interface the join
/// created deleted. Returns `e`.
async fn put_back<W: WgBackend, L: LinkBackend>(
    agent: &mut Agent<W, L>,
    state: &StateDir,
    pending: Pending,
    e: JoinError,
) -> JoinError {
    tracing::warn!(error = %e, "join failed; restoring the previous state");
    agent.restore(pending.snapshot);
    if let Err(se) = state.clear() {
        tracing::warn!(error = %se, "cannot clear the state directory");
    }
    if pending.existed {
        agent.reconcile(now()).await;
    } else if let Err(de) = agent.link.delete(&pending.interface).await {
        tracing::warn!(error = %de, interface = %pending.interface, "cannot delete the interface the join created");
    }
    e
}

/// Join the mesh of `token_text` in one go: [`start`], [`Call::run`], [`finish`].
pub async fn join<W: WgBackend, L: LinkBackend, A: Api>(
    agent: &mut Agent<W, L>,
    state: &StateDir,
    token_text: &str,
    api: &A,
) -> Result<Membership, JoinError> {
    let (pending, call) = start(agent, state, token_text).await?;
    let answer = call.run(api).await;
    finish(agent, state, pending, answer).await
}
