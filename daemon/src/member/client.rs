//! The coordinator API client (inside the tunnel): hyper's HTTP/1.1 client, one request per
//! connection, JSON bodies, a deadline on the whole exchange. Every request is signed with the
//! host's key and every answer must prove the coordinator's key (`mesh_proto::wire::auth`): an
//! answer without that proof is [`CallError::Unverified`] and is never acted on.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use mesh_proto::netmap::Netmap;
use mesh_proto::routes::{RouteDecision, RouteDecisionRequest, RouteInfo};
use mesh_proto::wire::api::{
    ApiError, EndpointReport, HostInfo, InviteInfo, InviteRequest, InviteResponse, JoinRequest,
    JoinResponse, RotateRequest, RotateResponse, LONG_POLL_SECS,
};
use mesh_proto::wire::auth::AuthKey;
use mesh_proto::{PrivateKey, PublicKey};
use rand_core::RngCore as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;

/// Largest response we accept (a netmap of a few thousand hosts fits easily).
const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// How long a join may take to reach the coordinator through the tunnel.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for ordinary calls.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a netmap long-poll: longer than the server holds it.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(LONG_POLL_SECS + 10);
/// Deadline for the TCP connection itself: through a working tunnel it takes milliseconds
/// (one handshake at most, retried after 5 s when its first packet is lost), so a connect
/// that takes longer means the tunnel to the coordinator is broken (e.g. it rotated its key
/// while we were away), and the caller should know now, not after the long-poll deadline.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(8);

/// Why an API call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No answer (connect failed or the deadline passed): the coordinator is unreachable.
    #[error("coordinator API at {addr} unreachable: {message}")]
    Unreachable { addr: SocketAddr, message: String },
    /// The coordinator answered with an error (a proven answer); `message` is its own words.
    #[error("{message}")]
    Refused { status: u16, message: String },
    /// An answer that does not prove the coordinator's key: something else answers at that
    /// address (or the coordinator could not identify us). Never acted on; treated like no
    /// answer by the callers.
    #[error(
        "the answer from {addr} (HTTP {status}) does not prove the coordinator's key, so it \
         is ignored: {message}"
    )]
    Unverified {
        addr: SocketAddr,
        status: u16,
        message: String,
    },
    /// The answer could not be understood.
    #[error("bad answer from the coordinator API at {addr}: {message}")]
    Protocol { addr: SocketAddr, message: String },
    /// We cannot sign (a low-order key).
    #[error("cannot sign the request: {0}")]
    Sign(String),
}

impl CallError {
    /// No usable answer: unreachable, or an answer without the coordinator's proof.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            CallError::Unreachable { .. } | CallError::Unverified { .. }
        )
    }
}

/// Who signs a request: the host's key toward the coordinator's key, and for joins and
/// rotations a second key whose possession the request proves too.
#[derive(Debug, Clone)]
pub struct Signer {
    auth: AuthKey,
    next: Option<AuthKey>,
}

impl Signer {
    /// `host` signs toward `coordinator`.
    pub fn new(host: &PrivateKey, coordinator: &PublicKey) -> Result<Signer, CallError> {
        Ok(Signer {
            auth: AuthKey::for_host(host, coordinator)
                .map_err(|e| CallError::Sign(e.to_string()))?,
            next: None,
        })
    }

    /// The request also proves `next` (a join's new key, a rotation's next key).
    pub fn with_next(mut self, next: &PrivateKey) -> Result<Signer, CallError> {
        self.next = Some(
            AuthKey::for_host(next, &self.auth.coordinator())
                .map_err(|e| CallError::Sign(e.to_string()))?,
        );
        Ok(self)
    }

    /// The key we sign with.
    pub fn key(&self) -> PublicKey {
        self.auth.host()
    }
}

/// The signer of a member's API calls, shared between the loop (which replaces it whenever
/// our key or the coordinator's changes) and the tasks that call the API.
#[derive(Debug, Clone, Default)]
pub struct SignerCell(std::sync::Arc<std::sync::RwLock<Option<Signer>>>);

impl SignerCell {
    pub fn set(&self, signer: Option<Signer>) {
        match self.0.write() {
            Ok(mut g) => *g = signer,
            Err(poisoned) => *poisoned.into_inner() = signer,
        }
    }

    /// The current signer, or why there is none.
    pub fn get(&self) -> Result<Signer, CallError> {
        let g = match self.0.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        g.clone().ok_or_else(|| {
            CallError::Sign("not a member of a managed mesh: no key to sign with".into())
        })
    }
}

/// A raw HTTP answer (its proof checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The coordinator API, as the joining code needs it (faked in tests).
pub trait Api: Send + Sync {
    fn join(
        &self,
        at: SocketAddr,
        signer: &Signer,
        req: &JoinRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<JoinResponse, CallError>> + Send;

    /// How long a join keeps trying to reach the coordinator through the tunnel.
    fn join_deadline(&self) -> Duration {
        JOIN_TIMEOUT
    }
}

/// The real client.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpApi;

impl Api for HttpApi {
    async fn join(
        &self,
        at: SocketAddr,
        signer: &Signer,
        req: &JoinRequest,
        timeout: Duration,
    ) -> Result<JoinResponse, CallError> {
        call_json(at, signer, "POST", "/v1/join", Some(req), timeout).await
    }
}

/// `GET /v1/netmap?since=V`: `Some` when a newer netmap arrived, `None` on 304.
pub async fn fetch_netmap(
    at: SocketAddr,
    signer: &Signer,
    since: u64,
) -> Result<Option<Netmap>, CallError> {
    let path = format!("/v1/netmap?since={since}");
    let raw = request(at, signer, "GET", &path, None, POLL_TIMEOUT).await?;
    if raw.status == 304 {
        return Ok(None);
    }
    decode(at, raw).map(Some)
}

pub async fn report_endpoints(
    at: SocketAddr,
    signer: &Signer,
    report: &EndpointReport,
) -> Result<(), CallError> {
    let body = encode(at, report)?;
    let raw = request(
        at,
        signer,
        "POST",
        "/v1/endpoints",
        Some(body),
        CALL_TIMEOUT,
    )
    .await?;
    check(at, raw).map(|_| ())
}

/// `POST /v1/rotate/prepare`: `signer`'s next key becomes our next key (peers accept its
/// handshakes).
pub async fn rotate_prepare(
    at: SocketAddr,
    signer: &Signer,
    key: PublicKey,
) -> Result<Netmap, CallError> {
    rotation_step(at, signer, key, "/v1/rotate/prepare").await
}

/// `POST /v1/rotate/commit`: the prepared key replaces ours everywhere.
pub async fn rotate_commit(
    at: SocketAddr,
    signer: &Signer,
    key: PublicKey,
) -> Result<Netmap, CallError> {
    rotation_step(at, signer, key, "/v1/rotate/commit").await
}

async fn rotation_step(
    at: SocketAddr,
    signer: &Signer,
    key: PublicKey,
    path: &str,
) -> Result<Netmap, CallError> {
    let req = RotateRequest { public_key: key };
    call_json::<_, RotateResponse>(at, signer, "POST", path, Some(&req), CALL_TIMEOUT)
        .await
        .map(|r| r.netmap)
}

pub async fn invite(
    at: SocketAddr,
    signer: &Signer,
    req: &InviteRequest,
) -> Result<InviteResponse, CallError> {
    call_json(
        at,
        signer,
        "POST",
        "/v1/admin/invite",
        Some(req),
        CALL_TIMEOUT,
    )
    .await
}

pub async fn invites(at: SocketAddr, signer: &Signer) -> Result<Vec<InviteInfo>, CallError> {
    call_json::<(), _>(at, signer, "GET", "/v1/admin/invites", None, CALL_TIMEOUT).await
}

pub async fn revoke_invite(at: SocketAddr, signer: &Signer, name: &str) -> Result<(), CallError> {
    let path = format!("/v1/admin/invites/{}", path_segment(name));
    check(
        at,
        request(at, signer, "DELETE", &path, None, CALL_TIMEOUT).await?,
    )
    .map(|_| ())
}

pub async fn hosts(at: SocketAddr, signer: &Signer) -> Result<Vec<HostInfo>, CallError> {
    call_json::<(), _>(at, signer, "GET", "/v1/admin/hosts", None, CALL_TIMEOUT).await
}

pub async fn remove(at: SocketAddr, signer: &Signer, name: &str) -> Result<(), CallError> {
    let path = format!("/v1/admin/hosts/{}", path_segment(name));
    check(
        at,
        request(at, signer, "DELETE", &path, None, CALL_TIMEOUT).await?,
    )
    .map(|_| ())
}

/// `meshctl routes` relayed from an admin host.
pub async fn routes(at: SocketAddr, signer: &Signer) -> Result<Vec<RouteInfo>, CallError> {
    call_json::<(), _>(at, signer, "GET", "/v1/admin/routes", None, CALL_TIMEOUT).await
}

/// `meshctl routes approve|revoke HOST PREFIX` relayed from an admin host.
pub async fn decide_route(
    at: SocketAddr,
    signer: &Signer,
    decision: RouteDecision,
    req: &RouteDecisionRequest,
) -> Result<RouteInfo, CallError> {
    let path = match decision {
        RouteDecision::Approve => "/v1/admin/routes/approve",
        RouteDecision::Revoke => "/v1/admin/routes/revoke",
    };
    call_json(at, signer, "POST", path, Some(req), CALL_TIMEOUT).await
}

/// `meshctl rotate NAME` relayed from an admin host.
pub async fn request_rotation(
    at: SocketAddr,
    signer: &Signer,
    name: &str,
) -> Result<(), CallError> {
    let path = format!("/v1/admin/hosts/{}/rotate", path_segment(name));
    check(
        at,
        request(at, signer, "POST", &path, None, CALL_TIMEOUT).await?,
    )
    .map(|_| ())
}

/// `meshctl static-config NAME` relayed from an admin host.
pub async fn static_config(
    at: SocketAddr,
    signer: &Signer,
    name: &str,
) -> Result<String, CallError> {
    let path = format!("/v1/admin/hosts/{}/wg-quick", path_segment(name));
    let raw = check(
        at,
        request(at, signer, "GET", &path, None, CALL_TIMEOUT).await?,
    )?;
    String::from_utf8(raw.body).map_err(|e| CallError::Protocol {
        addr: at,
        message: format!("the configuration is not UTF-8: {e}"),
    })
}

/// The coordinator's key notices for the signer's host (`mesh_proto::wire::notice`), from `at`: the
/// coordinator's WireGuard endpoint, over TCP outside the tunnel. `signer` signs toward the
/// *old* coordinator key the host knows: only a requester proving the host's key is answered.
pub async fn key_notices(
    at: SocketAddr,
    signer: &Signer,
    timeout: Duration,
) -> Result<Vec<mesh_proto::wire::notice::KeyNotice>, CallError> {
    call_json::<(), mesh_proto::wire::notice::KeyNoticesResponse>(
        at,
        signer,
        "GET",
        &mesh_proto::wire::notice::path(&signer.key()),
        None,
        timeout,
    )
    .await
    .map(|r| r.notices)
}

/// Host names are `[a-z0-9-]`; anything else is percent-encoded so it cannot change the path.
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn call_json<B: Serialize, T: DeserializeOwned>(
    at: SocketAddr,
    signer: &Signer,
    method: &str,
    path: &str,
    body: Option<&B>,
    timeout: Duration,
) -> Result<T, CallError> {
    let body = match body {
        Some(b) => Some(encode(at, b)?),
        None => None,
    };
    let raw = request(at, signer, method, path, body, timeout).await?;
    decode(at, raw)
}

fn encode<B: Serialize>(at: SocketAddr, b: &B) -> Result<Vec<u8>, CallError> {
    serde_json::to_vec(b).map_err(|e| CallError::Protocol {
        addr: at,
        message: format!("cannot encode the request: {e}"),
    })
}

fn check(at: SocketAddr, raw: RawResponse) -> Result<RawResponse, CallError> {
    if (200..300).contains(&raw.status) {
        return Ok(raw);
    }
    Err(CallError::Refused {
        status: raw.status,
        message: error_text(at, raw.status, &raw.body),
    })
}

fn decode<T: DeserializeOwned>(at: SocketAddr, raw: RawResponse) -> Result<T, CallError> {
    let raw = check(at, raw)?;
    serde_json::from_slice(&raw.body).map_err(|e| CallError::Protocol {
        addr: at,
        message: format!("cannot decode the answer: {e}"),
    })
}

/// One signed HTTP exchange with a deadline on the whole of it; the answer must prove the
/// coordinator's key (`mesh_proto::wire::auth`), else it is [`CallError::Unverified`].
pub async fn request(
    at: SocketAddr,
    signer: &Signer,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<RawResponse, CallError> {
    match tokio::time::timeout(timeout, exchange(at, signer, method, path, body)).await {
        Ok(r) => r,
        Err(_) => Err(CallError::Unreachable {
            addr: at,
            message: format!("no answer within {}s", timeout.as_secs()),
        }),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn exchange(
    at: SocketAddr,
    signer: &Signer,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<RawResponse, CallError> {
    use http_body_util::Full;
    use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE, HOST};
    let unreachable = |message: String| CallError::Unreachable { addr: at, message };
    let protocol = |message: String| CallError::Protocol { addr: at, message };
    let body = body.unwrap_or_default();
    let mut nonce = [0u8; mesh_proto::wire::auth::NONCE_LEN];
    rand_core::OsRng.fill_bytes(&mut nonce);
    let ts = unix_now();
    let proof = signer.auth.sign(method, path, &body, ts, nonce);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, at.to_string())
        .header(ACCEPT, "application/json")
        .header(mesh_proto::wire::auth::AUTH_HEADER, proof.header_value());
    if let Some(next) = &signer.next {
        let p = next.sign(method, path, &body, ts, nonce);
        req = req.header(mesh_proto::wire::auth::NEXT_HEADER, p.header_value());
    }
    if !body.is_empty() || method == "POST" {
        req = req.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| protocol(format!("cannot build the request: {e}")))?;
    #[cfg(any(test, feature = "test-fakes"))]
    if let Some(net) = in_process::installed() {
        let resp = net
            .exchange(at, signer.key(), req)
            .await
            .map_err(unreachable)?;
        return verified(at, signer, &nonce, resp).await;
    }
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(at)).await {
        Ok(r) => r.map_err(|e| unreachable(e.to_string()))?,
        Err(_) => {
            return Err(unreachable(format!(
                "no connection within {}s",
                CONNECT_TIMEOUT.as_secs()
            )))
        }
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
    let driver = tokio::spawn(async move {
        // Its error shows in send_request or in the body; nothing to add here.
        let _ = conn.await;
    });
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(format!("the connection failed: {e}")))?;
        verified(at, signer, &nonce, resp).await
    }
    .await;
    driver.abort();
    result
}

/// Read an answer's body (at most [`MAX_RESPONSE`]) and check that it proves the
/// coordinator's key for our request's `nonce`.
async fn verified<B>(
    at: SocketAddr,
    signer: &Signer,
    nonce: &[u8; mesh_proto::wire::auth::NONCE_LEN],
    resp: hyper::Response<B>,
) -> Result<RawResponse, CallError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::{BodyExt as _, Limited};
    let protocol = |message: String| CallError::Protocol { addr: at, message };
    let (parts, body) = resp.into_parts();
    let status = parts.status.as_u16();
    let header = parts
        .headers
        .get(mesh_proto::wire::auth::AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = Limited::new(body, MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                protocol(format!("answer larger than {MAX_RESPONSE} bytes"))
            } else {
                protocol(format!("the answer was cut short: {e}"))
            }
        })?
        .to_bytes()
        .to_vec();
    if let Err(e) = signer
        .auth
        .verify_response(header.as_deref(), nonce, status, &body)
    {
        // What an unproven error answer says may help the operator (e.g. a clock
        // skew); a would-be netmap is not shown.
        let message = if (200..300).contains(&status) {
            e.to_string()
        } else {
            format!("{e}; it said: {}", error_text(at, status, &body))
        };
        return Err(CallError::Unverified {
            addr: at,
            status,
            message,
        });
    }
    Ok(RawResponse { status, body })
}

/// What an error answer says: the coordinator's own words when it sent `ApiError` JSON.
fn error_text(at: SocketAddr, status: u16, body: &[u8]) -> String {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => e.error,
        Err(_) => {
            let text: String = String::from_utf8_lossy(body)
                .trim()
                .chars()
                .take(300)
                .collect();
            if text.is_empty() {
                format!("coordinator API at {at} answered HTTP {status}")
            } else {
                text
            }
        }
    }
}

/// The in-process network of a simulation (tests only; absent from a build without the
/// `test-fakes` feature): installed on a thread, it carries that thread's API calls to axum
/// routers in the same process instead of TCP, so a fleet of members and a coordinator run
/// on one current-thread runtime (all its tasks run on the thread that drives it) with a
/// paused clock and no sockets. Requests keep their signatures and answers their proofs;
/// which caller the server sees comes from a [`SourceFn`] (the tunnel: a key's packets come
/// from that key's mesh address). An address with no router is unreachable, as is every
/// address while nothing is served there; a router can be taken down (an outage) and another
/// put in its place (a restart), and requests in flight to the old one then fail.
#[cfg(any(test, feature = "test-fakes"))]
pub mod in_process {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex, PoisonError};

    use axum::body::{Body, Bytes};
    use axum::extract::ConnectInfo;
    use axum::Router;
    use http_body_util::Full;
    use hyper_util::service::TowerToHyperService;
    use mesh_proto::PublicKey;
    use tokio::sync::watch;

    /// The address the server at `at` sees a request signed with `key` come from, or why
    /// the request does not arrive (no tunnel to that server with that key).
    pub type SourceFn =
        Arc<dyn Fn(SocketAddr, &PublicKey) -> Result<SocketAddr, String> + Send + Sync>;

    struct Server {
        router: Option<Router>,
        /// Bumped when the router goes down or is replaced: requests in flight fail.
        epoch: watch::Sender<u64>,
    }

    /// Routers by address, shared by every clone.
    #[derive(Clone)]
    pub struct Network {
        servers: Arc<Mutex<HashMap<SocketAddr, Server>>>,
        source: SourceFn,
    }

    impl std::fmt::Debug for Network {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Network").finish_non_exhaustive()
        }
    }

    impl Network {
        pub fn new(source: SourceFn) -> Network {
            Network {
                servers: Arc::default(),
                source,
            }
        }

        fn with_server<T>(&self, at: SocketAddr, f: impl FnOnce(&mut Server) -> T) -> T {
            let mut g = self.servers.lock().unwrap_or_else(PoisonError::into_inner);
            let server = g.entry(at).or_insert_with(|| Server {
                router: None,
                epoch: watch::channel(0).0,
            });
            f(server)
        }

        /// Serve `router` at `at` from now on, in place of whatever served there.
        pub fn serve(&self, at: SocketAddr, router: Router) {
            self.with_server(at, |s| {
                s.router = Some(router);
                s.epoch.send_modify(|e| *e += 1);
            });
        }

        /// Nothing answers at `at` any more; requests in flight there fail.
        pub fn down(&self, at: SocketAddr) {
            self.with_server(at, |s| {
                s.router = None;
                s.epoch.send_modify(|e| *e += 1);
            });
        }

        /// Whether a router answers at `at`.
        pub fn is_up(&self, at: SocketAddr) -> bool {
            self.with_server(at, |s| s.router.is_some())
        }

        /// Carry this thread's API calls (until the guard is dropped).
        pub fn install(&self) -> Installed {
            INSTALLED.with(|n| *n.borrow_mut() = Some(self.clone()));
            Installed(std::marker::PhantomData)
        }

        /// One exchange: the request to the router at `at`, as if it came from the address
        /// the [`SourceFn`] gives. `Err` is why nothing answered.
        pub(super) async fn exchange(
            &self,
            at: SocketAddr,
            key: PublicKey,
            mut req: hyper::Request<Full<Bytes>>,
        ) -> Result<hyper::Response<Body>, String> {
            let from = (self.source)(at, &key)?;
            let (router, mut epoch) = self.with_server(at, |s| {
                let mut epoch = s.epoch.subscribe();
                epoch.borrow_and_update();
                (s.router.clone(), epoch)
            });
            let router = router.ok_or_else(|| format!("nothing answers at {at}"))?;
            req.extensions_mut().insert(ConnectInfo(from));
            let service = TowerToHyperService::new(router);
            let call = hyper::service::Service::call(&service, req);
            tokio::select! {
                r = call => match r {
                    Ok(resp) => Ok(resp),
                    Err(never) => match never {},
                },
                _ = epoch.changed() => Err(format!("the connection to {at} was reset")),
            }
        }
    }

    thread_local! {
        static INSTALLED: RefCell<Option<Network>> = const { RefCell::new(None) };
    }

    /// The network installed on this thread, if any.
    pub fn installed() -> Option<Network> {
        INSTALLED.with(|n| n.borrow().clone())
    }

    /// Uninstalls the thread's network when dropped; bound to its thread.
    pub struct Installed(std::marker::PhantomData<*const ()>);

    impl Drop for Installed {
        fn drop(&mut self) {
            INSTALLED.with(|n| *n.borrow_mut() = None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers one request with whatever `answer` makes of the request's proof.
    async fn one_answer(
        answer: impl FnOnce(mesh_proto::wire::auth::Proof) -> Vec<u8> + Send + 'static,
    ) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let at = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = vec![0u8; 8192];
            let n = s.read(&mut buf).await.expect("read");
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let proof = req
                .lines()
                .find_map(|l| l.strip_prefix("x-meshd-auth: "))
                .map(|v| mesh_proto::wire::auth::Proof::parse(v.trim()).expect("proof"))
                .expect("signed");
            let _ = s.write_all(&answer(proof)).await;
            let _ = s.shutdown().await;
            req
        });
        (at, task)
    }

    fn keys() -> (PrivateKey, PrivateKey, Signer) {
        let host = PrivateKey::generate();
        let coord = PrivateKey::generate();
        let signer = Signer::new(&host, &coord.public_key()).expect("signer");
        (host, coord, signer)
    }

    fn answer(status: u16, sig: Option<String>, body: &str) -> Vec<u8> {
        let sig = sig
            .map(|s| format!("x-meshd-auth: {s}\r\n"))
            .unwrap_or_default();
        format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{sig}content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn a_proven_answer_is_taken() {
        let (_host, coord, signer) = keys();
        let (at, server) = one_answer(move |p| {
            let k = AuthKey::for_coordinator(&coord, &p.key).expect("key");
            answer(304, Some(k.sign_response(&p.nonce, 304, b"")), "")
        })
        .await;
        assert_eq!(fetch_netmap(at, &signer, 7).await.expect("call"), None);
        let req = server.await.expect("server");
        assert!(
            req.starts_with("GET /v1/netmap?since=7 HTTP/1.1\r\n"),
            "{req}"
        );
    }

    #[tokio::test]
    async fn a_squatter_cannot_answer() {
        // No proof at all (something else listens on the port while meshd is down).
        let (_host, _coord, signer) = keys();
        let (at, _s) = one_answer(|_| answer(200, None, r#"{"version":1}"#)).await;
        let err = fetch_netmap(at, &signer, 0).await.expect_err("unverified");
        assert!(
            matches!(err, CallError::Unverified { status: 200, .. }),
            "{err}"
        );
        assert!(err.is_unreachable());
        // A proof under another key.
        let (_host, _coord, signer) = keys();
        let (at, _s) = one_answer(|p| {
            let squatter = PrivateKey::generate();
            let k = AuthKey::for_coordinator(&squatter, &p.key).expect("key");
            answer(304, Some(k.sign_response(&p.nonce, 304, b"")), "")
        })
        .await;
        let err = fetch_netmap(at, &signer, 0).await.expect_err("forged");
        assert!(
            err.to_string()
                .contains("does not come from the coordinator"),
            "{err}"
        );
        // A proof for another request (replayed answer).
        let (_host, coord, signer) = keys();
        let (at, _s) = one_answer(move |p| {
            let k = AuthKey::for_coordinator(&coord, &p.key).expect("key");
            answer(304, Some(k.sign_response(&[0; 16], 304, b"")), "")
        })
        .await;
        assert!(matches!(
            fetch_netmap(at, &signer, 0).await,
            Err(CallError::Unverified { .. })
        ));
    }

    #[tokio::test]
    async fn hostile_framing_is_an_error_not_a_panic() {
        let cases: Vec<Vec<u8>> = vec![
            // A chunk size near usize::MAX.
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n0\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nfffffffffffffffffffff\r\n".to_vec(),
            // Content-Length beyond what arrives, and absurd.
            b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n{}".to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n{}".to_vec(),
            // Larger than we take.
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", MAX_RESPONSE + 1).into_bytes(),
            b"garbage\r\n\r\n".to_vec(),
            Vec::new(),
        ];
        for raw in cases {
            let (_host, _coord, signer) = keys();
            let shown = String::from_utf8_lossy(&raw)
                .chars()
                .take(60)
                .collect::<String>();
            let (at, _s) = one_answer(move |_| raw).await;
            let r = request(
                at,
                &signer,
                "GET",
                "/v1/netmap?since=0",
                None,
                Duration::from_secs(5),
            )
            .await;
            assert!(r.is_err(), "{shown:?} was taken: {r:?}");
        }
    }

    #[tokio::test]
    async fn errors_are_passed_on_verbatim_and_nobody_is_unreachable() {
        let (_host, coord, signer) = keys();
        let body = r#"{"error":"invitation for dock-mirror was already used"}"#;
        let (at, _s) = one_answer(move |p| {
            let k = AuthKey::for_coordinator(&coord, &p.key).expect("key");
            answer(
                410,
                Some(k.sign_response(&p.nonce, 410, body.as_bytes())),
                body,
            )
        })
        .await;
        let err = hosts(at, &signer).await.expect_err("refused");
        assert_eq!(
            err,
            CallError::Refused {
                status: 410,
                message: "invitation for dock-mirror was already used".into()
            }
        );
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dead = closed.local_addr().expect("addr");
        drop(closed);
        let err = fetch_netmap(dead, &signer, 0)
            .await
            .expect_err("unreachable");
        assert!(matches!(err, CallError::Unreachable { .. }), "{err}");
    }
}
