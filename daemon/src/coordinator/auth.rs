//! The API's proof of key (`mesh_proto::wire::auth`), server side: our own private keys (current and
//! the one before the last rotation, for callers that have not taken the new one yet), the
//! replay cache, and the axum layer that proves every request's key, names its caller, and
//! signs every answer.
//!
//! The source address stays a second check: the key's host must call from its own mesh
//! address. An answer to a request whose key was not proven carries no proof (the caller
//! treats it as no answer).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, RwLock};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use mesh_proto::wire::api::{ApiError, MAX_BODY};
use mesh_proto::wire::auth::{
    check_time, AuthError, AuthKey, NonceCache, Proof, AUTH_HEADER, NEXT_HEADER, VERSION,
    VERSIONS_HEADER,
};
use mesh_proto::{PrivateKey, PublicKey};

use super::Coordinator;

/// Nonces one key may have in the replay window (about 3 requests a second sustained for the
/// 10-minute window; a member makes a few a minute).
const NONCES_PER_KEY: usize = 2048;
/// Nonces all keys together may have.
const NONCES_TOTAL: usize = 262_144;
/// Largest answer that is signed (a netmap of thousands of hosts fits).
const MAX_ANSWER: usize = 32 * 1024 * 1024;

#[derive(Default)]
struct OwnKeys {
    current: Option<PrivateKey>,
    previous: Option<PrivateKey>,
}

/// How many recent refusals `meshctl status` shows.
const REFUSALS_KEPT: usize = 8;

/// Our private keys, the replay cache, and the last refusals (for `meshctl status`).
pub struct ApiAuth {
    keys: RwLock<OwnKeys>,
    nonces: Mutex<NonceCache>,
    refusals: Mutex<std::collections::VecDeque<(u64, String)>>,
    refused_total: std::sync::atomic::AtomicU64,
}

impl Default for ApiAuth {
    fn default() -> Self {
        ApiAuth {
            keys: RwLock::new(OwnKeys::default()),
            nonces: Mutex::new(NonceCache::new(NONCES_PER_KEY, NONCES_TOTAL)),
            refusals: Mutex::new(std::collections::VecDeque::new()),
            refused_total: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl ApiAuth {
    /// Remember a refused request (the newest few are kept). Returns whether to log it at
    /// info: the first refusal of each second is, the rest go to debug, so a caller sending
    /// thousands of bad requests cannot flood the log (they are all counted).
    pub fn note_refusal(&self, what: String) -> bool {
        self.refused_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = now_unix();
        let mut g = match self.refusals.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let loud = g.back().is_none_or(|(at, _)| *at != now);
        if g.len() == REFUSALS_KEPT {
            g.pop_front();
        }
        g.push_back((now, what));
        loud
    }

    /// The refusals since start, and the newest few (Unix time, what).
    pub fn refusals(&self) -> (u64, Vec<(u64, String)>) {
        let g = match self.refusals.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        (
            self.refused_total
                .load(std::sync::atomic::Ordering::Relaxed),
            g.iter().cloned().collect(),
        )
    }

    /// Our key is now `key` (at start, and when our own rotation switches); the key before
    /// stays usable for proofs until the next change.
    pub fn set_own_key(&self, key: &PrivateKey) {
        let mut g = match self.keys.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.current.as_ref().map(PrivateKey::public_key) == Some(key.public_key()) {
            return;
        }
        g.previous = g.current.take();
        g.current = Some(key.clone());
    }

    /// The MAC key shared with `host` for our key `coordinator`.
    pub fn auth_key(
        &self,
        coordinator: &PublicKey,
        host: &PublicKey,
    ) -> Result<AuthKey, AuthError> {
        let g = match self.keys.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let own = [g.current.as_ref(), g.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.public_key() == *coordinator)
            .ok_or_else(|| AuthError::WrongCoordinator(coordinator.short()))?;
        AuthKey::for_coordinator(own, host)
    }

    /// Refuse a replayed `(key, nonce)`.
    pub fn check_nonce(
        &self,
        key: PublicKey,
        nonce: [u8; 16],
        ts: u64,
        now_unix: u64,
    ) -> Result<(), AuthError> {
        let mut g = match self.nonces.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.check_and_insert(key, nonce, ts, now_unix)
    }
}

/// Who called, as the request proved it. Put into the request's extensions by [`authenticate`].
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    /// The caller's mesh address (equal to the request's source address).
    pub address: IpAddr,
    pub key: PublicKey,
    pub admin: bool,
    /// Invited, not joined: it holds the token's throwaway key.
    pub pending: bool,
    /// The second key the request proved (a join's new key, a rotation's next key).
    pub next: Option<PublicKey>,
}

/// A refusal before the caller was identified: never signed.
fn refuse(e: &AuthError) -> Response {
    let status = match e {
        AuthError::UnsupportedVersion(_) | AuthError::Malformed(_) => StatusCode::BAD_REQUEST,
        AuthError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::UNAUTHORIZED,
    };
    let mut resp = (
        status,
        Json(ApiError {
            error: e.to_string(),
        }),
    )
        .into_response();
    resp.headers_mut()
        .insert(VERSIONS_HEADER, HeaderValue::from_static(VERSION));
    resp
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, AuthError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| AuthError::Malformed(format!("{name} is not ASCII"))),
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What proving a request yields: the caller, and the key that signs the answer.
struct Proven {
    caller: Caller,
    key: AuthKey,
    nonce: [u8; 16],
}

/// Prove a request's key(s) against the registry: the parts of [`authenticate`] that do not
/// touch the HTTP types, so the API tests can call them.
fn prove(
    coord: &Coordinator,
    source: IpAddr,
    method: &str,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
    now: u64,
) -> Result<Proven, AuthError> {
    let proof = Proof::parse(header(headers, AUTH_HEADER)?.ok_or(AuthError::Missing)?)?;
    let key = coord.auth.auth_key(&proof.coordinator, &proof.key)?;
    let snapshot = coord
        .snapshot_arc()
        .map_err(|e| AuthError::Malformed(format!("registry unavailable: {e}")))?;
    let host = snapshot
        .hosts
        .iter()
        .find(|h| h.public_key == proof.key && !h.removed)
        .ok_or_else(|| AuthError::UnknownKey(proof.key.short()))?;
    if host.name == coord.settings().own_name {
        // Our own key: the coordinator host's admin calls go through its control socket,
        // in-process; nothing calls the API with it.
        return Err(AuthError::UnknownKey(proof.key.short()));
    }
    if host.static_peer {
        return Err(AuthError::UnknownKey(proof.key.short()));
    }
    if host.address != source {
        return Err(AuthError::WrongAddress {
            key: proof.key.short(),
            expected: host.address.to_string(),
            caller: source.to_string(),
        });
    }
    key.verify(&proof, method, path, body)?;
    check_time(proof.ts, now)?;
    let next = match header(headers, NEXT_HEADER)? {
        None => None,
        Some(h) => {
            let np = Proof::parse(h)?;
            proof.check_next(&np)?;
            coord
                .auth
                .auth_key(&np.coordinator, &np.key)?
                .verify(&np, method, path, body)?;
            Some(np.key)
        }
    };
    coord
        .auth
        .check_nonce(proof.key, proof.nonce, proof.ts, now)?;
    Ok(Proven {
        caller: Caller {
            name: host.name.clone(),
            address: host.address,
            key: proof.key,
            admin: host.admin && !host.pending,
            pending: host.pending,
            next,
        },
        key,
        nonce: proof.nonce,
    })
}

/// Paths served without a proof of key: Prometheus's HTTP service discovery (Prometheus
/// cannot sign; it gets the mesh's host list, which every member's netmap holds too, and only
/// from a mesh host's address, see `api::prometheus_targets`).
fn unsigned_path(path: &str) -> bool {
    path == super::api::PROMETHEUS_SD_PATH
}

/// The axum layer: prove the request's key, put its [`Caller`] into the extensions, run the
/// handler, sign its answer.
pub async fn authenticate(
    State(coord): State<Coordinator>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if unsigned_path(request.uri().path()) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                Json(ApiError {
                    error: format!("the request body is larger than {MAX_BODY} bytes"),
                }),
            )
                .into_response()
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| parts.uri.path().to_string());
    let source = peer.ip().to_canonical();
    let proven = match prove(
        &coord,
        source,
        parts.method.as_str(),
        &path,
        &parts.headers,
        &body,
        now_unix(),
    ) {
        Ok(p) => p,
        Err(e) => {
            let loud = coord.auth.note_refusal(format!(
                "{source} {} {}: {e}",
                parts.method,
                parts.uri.path()
            ));
            if loud {
                tracing::info!(caller = %source, path = %parts.uri.path(), "refused an API request: {e}");
            } else {
                tracing::debug!(caller = %source, path = %parts.uri.path(), "refused an API request: {e}");
            }
            return refuse(&e);
        }
    };
    parts.extensions.insert(proven.caller);
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    sign_answer(response, &proven.key, &proven.nonce).await
}

/// Sign `response` for the request with `nonce` proven under `key`.
pub(super) async fn sign_answer(response: Response, key: &AuthKey, nonce: &[u8; 16]) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes: Bytes = match axum::body::to_bytes(body, MAX_ANSWER).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read an API answer to sign it");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(ApiError {
                    error: "the answer could not be signed".into(),
                }),
            )
                .into_response();
        }
    };
    let value = key.sign_response(nonce, parts.status.as_u16(), &bytes);
    match HeaderValue::from_str(&value) {
        Ok(v) => {
            parts.headers.insert(AUTH_HEADER, v);
        }
        Err(e) => tracing::warn!(error = %e, "cannot put the answer's proof into a header"),
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// Prove a key-notice request (outside the tunnel): the requester signs toward the coordinator
/// key it knows, which may be one we rotated away; for those we kept the MAC key for each host
/// when we rotated (`stored`). Any failure is the same refusal, so nobody learns whether a key
/// has notices waiting.
pub fn prove_notice_request(
    auth: &ApiAuth,
    stored: impl Fn(&PublicKey, &PublicKey) -> Option<[u8; 32]>,
    method: &str,
    path: &str,
    headers: &HeaderMap,
    now: u64,
) -> Result<(PublicKey, AuthKey, [u8; 16]), AuthError> {
    let proof = Proof::parse(header(headers, AUTH_HEADER)?.ok_or(AuthError::Missing)?)?;
    let key = match auth.auth_key(&proof.coordinator, &proof.key) {
        Ok(k) => k,
        Err(_) => {
            let raw = stored(&proof.key, &proof.coordinator)
                .ok_or_else(|| AuthError::BadMac(proof.key.short()))?;
            AuthKey::from_raw(raw, proof.key, proof.coordinator)
        }
    };
    key.verify(&proof, method, path, b"")
        .map_err(|_| AuthError::BadMac(proof.key.short()))?;
    check_time(proof.ts, now)?;
    auth.check_nonce(proof.key, proof.nonce, proof.ts, now)?;
    Ok((proof.key, key, proof.nonce))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_keys_keep_the_one_before() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let c = PrivateKey::generate();
        let host = PrivateKey::generate().public_key();
        let auth = ApiAuth::default();
        assert!(matches!(
            auth.auth_key(&a.public_key(), &host),
            Err(AuthError::WrongCoordinator(_))
        ));
        auth.set_own_key(&a);
        assert!(auth.auth_key(&a.public_key(), &host).is_ok());
        auth.set_own_key(&a);
        auth.set_own_key(&b);
        assert!(auth.auth_key(&a.public_key(), &host).is_ok());
        assert!(auth.auth_key(&b.public_key(), &host).is_ok());
        auth.set_own_key(&c);
        assert!(
            auth.auth_key(&a.public_key(), &host).is_err(),
            "two rotations ago"
        );
        assert!(auth.auth_key(&c.public_key(), &host).is_ok());
    }
}
