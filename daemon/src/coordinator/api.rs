//! The HTTP/JSON API (axum), served on the coordinator's mesh address from a socket bound to
//! the mesh interface (SO_BINDTODEVICE). Every request proves its caller's key and every answer
//! the coordinator's (`mesh_proto::wire::auth`, checked by `super::auth::authenticate`); the source
//! address must be the proven key's mesh address too. Paths and bodies: see
//! `mesh_proto::wire::api`. Every error is `{"error": "..."}` with a 4xx/5xx status.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Extension;
use axum::{Json, Router};
use mesh_proto::wire::api::{
    ApiError, EndpointReport, InviteRequest, JoinRequest, RotateRequest, RotateResponse,
    LONG_POLL_SECS, MAX_BODY,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::watch;

use super::auth::Caller;
use super::{CoordError, Coordinator};

/// Where the coordinator's WireGuard sees a mesh address's packets come from (the peer's
/// underlay endpoint, e.g. from `wg show endpoints`). Through the tunnel the TCP peer is the
/// mesh address, so the observed underlay address must come from here.
pub type ObservedFn = Arc<dyn Fn(IpAddr) -> Option<SocketAddr> + Send + Sync>;

/// How often expired invitations are swept out of the registry.
const EXPIRY_SWEEP: Duration = Duration::from_secs(30);

/// Prometheus `http_sd_configs` URL path (JSON in the file_sd format).
pub const PROMETHEUS_SD_PATH: &str = "/v1/prometheus/targets";

/// Response header carrying the netmap version (also in the body), for cheap clients.
pub const VERSION_HEADER: &str = "x-meshd-netmap-version";

#[derive(Clone)]
struct AppState {
    coord: Coordinator,
    observed: ObservedFn,
    stopping: watch::Receiver<bool>,
}

struct Failure(CoordError);

impl From<CoordError> for Failure {
    fn from(e: CoordError) -> Self {
        Failure(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let code = self.0.http_status();
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if code >= 500 {
            tracing::warn!(error = %self.0, "API request failed");
        } else {
            tracing::debug!(error = %self.0, status = code, "API request refused");
        }
        (
            status,
            Json(ApiError {
                error: self.0.to_string(),
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, Failure>;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn caller_ip(peer: SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, CoordError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            CoordError::TooLarge(MAX_BODY)
        } else {
            CoordError::Malformed(r.body_text())
        }
    })?;
    if bytes.len() > MAX_BODY {
        return Err(CoordError::TooLarge(MAX_BODY));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| CoordError::Malformed(format!("invalid JSON body: {e}")))
}

/// Run a registry call off the async workers (SQLite writes fsync).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CoordError> + Send + 'static,
) -> Result<T, CoordError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CoordError::Internal(format!("registry task failed: {e}")))?
}

/// Admin calls come from admin hosts proving their key (the coordinator host's own go through
/// its control socket, in-process).
fn require_admin(caller: &Caller) -> Result<(), CoordError> {
    if caller.admin {
        Ok(())
    } else {
        Err(CoordError::NotAdmin(caller.address))
    }
}

/// A request that introduces a key must prove it too (`mesh_proto::wire::auth`, second proof).
fn require_proven_next(caller: &Caller, key: &mesh_proto::PublicKey) -> Result<(), CoordError> {
    if caller.next == Some(*key) {
        Ok(())
    } else {
        Err(CoordError::Unproven(format!(
            "the request does not prove the key {} it introduces (a second proof of key is \
             required)",
            key.short()
        )))
    }
}

async fn join(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req: JoinRequest = parse_json(body)?;
    if !who.pending {
        return Err(CoordError::Conflict(format!("{} has joined already", who.name)).into());
    }
    require_proven_next(&who, &req.public_key)?;
    let caller = who.address;
    let coord = st.coord.clone();
    let stats = st.coord.api_stats.clone();
    let resp = blocking(move || coord.join(caller, req, now_unix())).await?;
    stats.joined();
    Ok(Json(resp).into_response())
}

async fn endpoints(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let report: EndpointReport = parse_json(body)?;
    st.coord.check_report(&report)?;
    let caller = who.address;
    let observed = (st.observed)(caller);
    match st.coord.reports.handle(caller, observed, report) {
        super::reports::Gate::Apply(observed, report) => {
            let coord = st.coord.clone();
            blocking(move || coord.report_endpoints_observed(caller, observed, report, now_unix()))
                .await?;
            Ok(StatusCode::NO_CONTENT)
        }
        super::reports::Gate::Later { wait, schedule } => {
            if schedule {
                let coord = st.coord.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    for (ip, observed, report) in coord.reports.due() {
                        let c = coord.clone();
                        let r = blocking(move || {
                            c.report_endpoints_observed(ip, observed, report, now_unix())
                        })
                        .await;
                        if let Err(e) = r {
                            tracing::warn!(caller = %ip, error = %e, "a debounced endpoint report was refused");
                        }
                    }
                });
            }
            // Taken; applied within a second.
            Ok(StatusCode::ACCEPTED)
        }
    }
}

/// The rotation calls differ only in the registry method they run.
type RotationStep =
    fn(&Coordinator, IpAddr, RotateRequest, u64) -> Result<RotateResponse, CoordError>;

async fn rotation_call(
    st: AppState,
    who: Caller,
    body: Result<Bytes, BytesRejection>,
    step: RotationStep,
) -> ApiResult<Response> {
    let req: RotateRequest = parse_json(body)?;
    require_proven_next(&who, &req.public_key)?;
    let caller = who.address;
    let coord = st.coord.clone();
    let resp = blocking(move || step(&coord, caller, req, now_unix())).await?;
    Ok(Json(resp).into_response())
}

/// How long a prepare waits for the other hosts to take the netmap with the next key.
pub const PREPARE_ACK_TIMEOUT: Duration = Duration::from_secs(3);

/// The prepare's reply waits until every host that follows the coordinator has taken the
/// netmap listing the caller's next key (at most [`PREPARE_ACK_TIMEOUT`]; a host that is
/// slower or offline then catches up from its next netmap), so the caller commits as soon as
/// its peers' devices accept the next key, and never before.
async fn rotate_prepare(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req: RotateRequest = parse_json(body)?;
    require_proven_next(&who, &req.public_key)?;
    let caller = who.address;
    let coord = st.coord.clone();
    let resp = blocking(move || coord.prepare_rotation(caller, req, now_unix())).await?;
    let out = st
        .coord
        .wait_acknowledged(resp.netmap.version, &[caller], PREPARE_ACK_TIMEOUT)
        .await;
    if out.missing.is_empty() {
        tracing::debug!(caller = %caller, hosts = out.acknowledged, waited_ms = out.waited.as_millis() as u64, "rotation prepared on every follower");
    } else {
        tracing::info!(caller = %caller, missing = ?out.missing, waited_ms = out.waited.as_millis() as u64, "rotation prepared; some hosts have not taken it yet");
    }
    Ok(Json(resp).into_response())
}

async fn rotate_commit(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    rotation_call(st, who, body, Coordinator::commit_rotation).await
}

/// Marks a long-poll as returned however the handler ends (a reply, an error, or the client
/// hanging up, which drops the handler).
struct PollEnded {
    acks: Arc<super::acks::Acks>,
    caller: IpAddr,
    since: u64,
}

impl Drop for PollEnded {
    fn drop(&mut self) {
        self.acks.poll_ended(self.caller, self.since);
    }
}

#[derive(Debug, Deserialize)]
struct NetmapQuery {
    since: Option<u64>,
}

async fn netmap(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    query: Result<Query<NetmapQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let since = query
        .map_err(|r| CoordError::Malformed(r.body_text()))?
        .0
        .since
        .unwrap_or(0);
    let caller = who.address;
    let coord = &st.coord;
    let mut rx = coord.subscribe();
    let current = *rx.borrow_and_update();
    let known = coord
        .snapshot_arc()?
        .hosts
        .iter()
        .any(|h| h.address == caller && !h.removed);
    if !known {
        return Err(CoordError::NotAHost(caller).into());
    }
    coord.acks.poll_started(caller, since);
    let _ended = PollEnded {
        acks: coord.acks.clone(),
        caller,
        since,
    };
    if current == since {
        let mut stopping = st.stopping.clone();
        let wait = tokio::time::timeout(
            Duration::from_secs(LONG_POLL_SECS),
            rx.wait_for(|v| *v > since),
        );
        tokio::select! {
            r = wait => match r {
                Err(_) => return Ok(StatusCode::NOT_MODIFIED.into_response()),
                Ok(Err(_)) => {
                    return Err(CoordError::Internal("the coordinator is shutting down".into()).into())
                }
                Ok(Ok(_)) => {}
            },
            _ = stopping.wait_for(|s| *s) => {
                return Ok(StatusCode::NOT_MODIFIED.into_response());
            }
        }
    }
    // Computed and serialised right here (about a millisecond at 1000 hosts, no I/O): a change
    // wakes every long-poll at once, and the runtime's few workers then serve them one after
    // the other, which keeps latency and memory lower than a thread per request would.
    let Some((version, body)) = coord.netmap_json_for_address(caller)? else {
        return Err(CoordError::NotAHost(caller).into());
    };
    let mut resp = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&version.to_string()) {
        resp.headers_mut().insert(VERSION_HEADER, v);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Prometheus HTTP service discovery: node_exporter and meshd on every host of the mesh
/// (static peers left out), labelled with host and role, in the file_sd format the hosts
/// write too. For any host of the mesh (Prometheus on dock-dash asks over the tunnel).
async fn prometheus_targets(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> ApiResult<Response> {
    let caller = caller_ip(peer);
    let known = st
        .coord
        .snapshot_arc()?
        .hosts
        .iter()
        .any(|h| h.address == caller && !h.removed);
    if !known {
        return Err(CoordError::NotAHost(caller).into());
    }
    let own = st.coord.settings().own_name.clone();
    let Some(nm) = st.coord.netmap_for_name(&own)? else {
        return Err(CoordError::Internal(format!("the registry has no netmap for {own}")).into());
    };
    let view = mesh_proto::handoff::MeshView::new(&nm, Some(&own));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        mesh_proto::handoff::prometheus_targets(&view),
    )
        .into_response())
}

async fn admin_invite(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    require_admin(&who)?;
    let caller = &who.name;
    let req: InviteRequest = parse_json(body)?;
    let coord = st.coord.clone();
    tracing::info!(caller = %caller, name = %req.name, "invite requested over the API");
    let resp = blocking(move || coord.invite(req, now_unix())).await?;
    Ok(Json(resp).into_response())
}

async fn admin_invites(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
) -> ApiResult<Response> {
    require_admin(&who)?;
    let coord = st.coord.clone();
    let list = blocking(move || coord.invites(now_unix())).await?;
    Ok(Json(list).into_response())
}

fn path_name(p: Result<Path<String>, PathRejection>) -> Result<String, CoordError> {
    p.map(|Path(n)| n)
        .map_err(|r| CoordError::Malformed(r.body_text()))
}

async fn admin_revoke(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    require_admin(&who)?;
    let caller = &who.name;
    let name = path_name(name)?;
    let coord = st.coord.clone();
    tracing::info!(caller = %caller, name = %name, "revoke requested over the API");
    blocking(move || coord.revoke_invite(&name, now_unix())).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn admin_hosts(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
) -> ApiResult<Response> {
    require_admin(&who)?;
    let coord = st.coord.clone();
    let list = blocking(move || coord.hosts()).await?;
    Ok(Json(list).into_response())
}

/// An admin call on one host by name that answers 204: check the caller, log, run `f`.
async fn admin_on_host(
    st: AppState,
    who: Caller,
    name: Result<Path<String>, PathRejection>,
    what: &'static str,
    f: fn(&Coordinator, &str, u64) -> Result<(), CoordError>,
) -> ApiResult<StatusCode> {
    require_admin(&who)?;
    let caller = &who.name;
    let name = path_name(name)?;
    let coord = st.coord.clone();
    tracing::info!(caller = %caller, name = %name, "{what} requested over the API");
    blocking(move || f(&coord, &name, now_unix())).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn admin_remove(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    admin_on_host(st, who, name, "removal", Coordinator::remove).await
}

async fn admin_rotate(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    admin_on_host(st, who, name, "key rotation", Coordinator::request_rotation).await
}

async fn admin_static_config(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    require_admin(&who)?;
    let name = path_name(name)?;
    let coord = st.coord.clone();
    let config = blocking(move || coord.static_config(&name)).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        config,
    )
        .into_response())
}

async fn admin_routes(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
) -> ApiResult<Response> {
    require_admin(&who)?;
    let coord = st.coord.clone();
    let list = blocking(move || coord.routes()).await?;
    Ok(Json(list).into_response())
}

/// `POST /v1/admin/routes/{approve,revoke}` with a `RouteDecisionRequest`: answers the
/// prefix's `RouteInfo` afterwards.
async fn admin_route_decision(
    st: AppState,
    who: Caller,
    body: Result<Bytes, BytesRejection>,
    decision: mesh_proto::routes::RouteDecision,
) -> ApiResult<Response> {
    require_admin(&who)?;
    let caller = &who.name;
    let req: mesh_proto::routes::RouteDecisionRequest = parse_json(body)?;
    let coord = st.coord.clone();
    tracing::info!(caller = %caller, host = %req.host, prefix = %req.prefix, decision = %decision, "route decision over the API");
    let info =
        blocking(move || coord.decide_route(&req.host, req.prefix, decision, now_unix())).await?;
    Ok(Json(info).into_response())
}

async fn admin_route_approve(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    admin_route_decision(st, who, body, mesh_proto::routes::RouteDecision::Approve).await
}

async fn admin_route_revoke(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    admin_route_decision(st, who, body, mesh_proto::routes::RouteDecision::Revoke).await
}

async fn not_found(uri: Uri) -> Failure {
    Failure(CoordError::NotFound(uri.path().to_string()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Failure {
    Failure(CoordError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    })
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/join", post(join))
        .route("/v1/endpoints", post(endpoints))
        .route("/v1/rotate/prepare", post(rotate_prepare))
        .route("/v1/rotate/commit", post(rotate_commit))
        .route("/v1/netmap", get(netmap))
        .route(PROMETHEUS_SD_PATH, get(prometheus_targets))
        .route("/v1/admin/invite", post(admin_invite))
        .route("/v1/admin/invites", get(admin_invites))
        .route("/v1/admin/invites/{name}", delete(admin_revoke))
        .route("/v1/admin/hosts", get(admin_hosts))
        .route("/v1/admin/hosts/{name}", delete(admin_remove))
        .route("/v1/admin/hosts/{name}/rotate", post(admin_rotate))
        .route("/v1/admin/hosts/{name}/wg-quick", get(admin_static_config))
        .route("/v1/admin/routes", get(admin_routes))
        .route("/v1/admin/routes/approve", post(admin_route_approve))
        .route("/v1/admin/routes/revoke", post(admin_route_revoke))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.coord.clone(),
            super::auth::authenticate,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            state.coord.api_stats.clone(),
            super::stats::record,
        ))
        .with_state(state)
}

/// Bind the API's TCP listener on `bind`; with `bind_device`, SO_BINDTODEVICE to that
/// interface (needs CAP_NET_RAW) so packets that arrive on any other interface (a spoofed
/// mesh source sent to the underlay address) are never served. IP_FREEBIND lets the socket
/// bind before the mesh address is on the interface.
pub fn bind_api_listener(
    bind: SocketAddr,
    bind_device: Option<&str>,
) -> Result<tokio::net::TcpListener, CoordError> {
    crate::runtime::serve::bind_tcp(bind, bind_device, 4096, "API")
        .map_err(|e| CoordError::io(format!("API socket on {bind}"), e))
}

/// Serve the API on `bind` (the coordinator's mesh address and API port) until `shutdown`
/// completes; see `bind_api_listener` for `bind_device`. Bound to a device, it also returns
/// (`Ok`) when that interface is deleted or recreated: a socket bound to the old interface
/// receives nothing, so the caller binds again.
pub async fn serve_api(
    coord: Coordinator,
    bind: SocketAddr,
    bind_device: Option<String>,
    observed: ObservedFn,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordError> {
    let Some(dev) = bind_device else {
        let listener = bind_api_listener(bind, None)?;
        return serve_api_on(coord, listener, observed, shutdown).await;
    };
    let before = crate::runtime::serve::ifindex(&dev);
    let listener = bind_api_listener(bind, Some(&dev))?;
    let Some(index) = before.filter(|i| crate::runtime::serve::ifindex(&dev) == Some(*i)) else {
        return Err(CoordError::io(
            format!("API socket on {bind}"),
            std::io::Error::other(format!("the interface {dev} changed while binding")),
        ));
    };
    let replaced = {
        let dev = dev.clone();
        async move {
            crate::runtime::serve::device_replaced(&dev, index).await;
            tracing::info!(interface = %dev, old_ifindex = index, "the mesh interface was recreated: binding the coordinator API again");
        }
    };
    let until = async move {
        tokio::select! {
            () = shutdown => {}
            () = replaced => {}
        }
    };
    serve_api_on(coord, listener, observed, until).await
}

/// Serve the API on an already bound listener (tests and benchmarks bind port 0), with the
/// limits of `serve::Limits::API`.
pub async fn serve_api_on(
    coord: Coordinator,
    listener: tokio::net::TcpListener,
    observed: ObservedFn,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordError> {
    serve_api_with(
        coord,
        listener,
        observed,
        crate::runtime::serve::Limits::API,
        shutdown,
    )
    .await
}

/// [`serve_api_on`] with other limits (tests).
pub async fn serve_api_with(
    coord: Coordinator,
    listener: tokio::net::TcpListener,
    observed: ObservedFn,
    limits: crate::runtime::serve::Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordError> {
    let local = listener
        .local_addr()
        .map_err(|e| CoordError::io("API listener address", e))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let state = AppState {
        coord,
        observed,
        stopping: stop_rx,
    };
    tracing::info!(address = %local, "coordinator API listening");
    // Expired invitations leave the netmaps (their throwaway keys stop being accepted) even
    // when nobody calls the registry.
    let expiry = {
        let coord = state.coord.clone();
        let mut stopping = state.stopping.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXPIRY_SWEEP);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopping.wait_for(|s| *s) => return,
                }
                let c = coord.clone();
                match blocking(move || c.expire_invites(now_unix())).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(expired = n, "invitations expired"),
                    Err(e) => tracing::warn!(error = %e, "cannot expire invitations"),
                }
            }
        })
    };
    let graceful = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    crate::runtime::serve::serve_http(listener, router(state), limits, "coordinator API", graceful)
        .await;
    expiry.abort();
    tracing::info!(address = %local, "coordinator API stopped");
    Ok(())
}

/// The API for an in-process network (`crate::member::client::in_process`; tests only): the
/// router `serve_api_with` serves, without a listener, its limits or the expiry sweep. Its
/// long-polls run while this is kept; [`InProcessApi::stop`] ends them as a shutdown does.
#[cfg(any(test, feature = "test-fakes"))]
pub struct InProcessApi {
    pub router: Router,
    stop: watch::Sender<bool>,
}

#[cfg(any(test, feature = "test-fakes"))]
impl InProcessApi {
    pub fn new(coord: Coordinator, observed: ObservedFn) -> InProcessApi {
        let (stop, stopping) = watch::channel(false);
        let state = AppState {
            coord,
            observed,
            stopping,
        };
        InProcessApi {
            router: router(state),
            stop,
        }
    }

    /// Stop as a shutdown does: waiting long-polls answer at once.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// `GET /v1/key-notices/HOSTKEY` (hex): the coordinator key notices for that host. Served
/// outside the tunnel, only to a requester that proves HOSTKEY toward the coordinator key it
/// knows (`mesh_proto::wire::auth`; for a key we rotated away, with the MAC key kept at that
/// rotation). Every failure gets the same refusal, so nobody learns whether a key has notices.
async fn key_notices(
    State(coord): State<Coordinator>,
    headers: axum::http::HeaderMap,
    uri: Uri,
    key: Result<Path<String>, PathRejection>,
) -> Response {
    let refused = || {
        (
            StatusCode::FORBIDDEN,
            Json(ApiError {
                error: "key notices are given only to a host proving its key (auth v1)".into(),
            }),
        )
            .into_response()
    };
    let Ok(Path(hex)) = key else {
        return refused();
    };
    let Ok(host) = mesh_proto::PublicKey::from_hex(&hex) else {
        return refused();
    };
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let c = coord.clone();
    let proven = blocking(move || {
        Ok(super::auth::prove_notice_request(
            &c.auth,
            |h, old| c.key_notice_auth(h, old),
            "GET",
            &path,
            &headers,
            now_unix(),
        ))
    })
    .await;
    let (proven_key, auth_key, nonce) = match proven {
        Ok(Ok(p)) if p.0 == host => p,
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {
            if let Ok(Err(e)) = &proven {
                tracing::debug!(error = %e, "key notice request refused");
            }
            return refused();
        }
    };
    let c = coord.clone();
    let notices = match blocking(move || c.key_notices_for(&proven_key)).await {
        Ok(n) => n,
        Err(e) => return Failure(e).into_response(),
    };
    let answer = (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(mesh_proto::wire::notice::KeyNoticesResponse { notices }),
    )
        .into_response();
    super::auth::sign_answer(answer, &auth_key, &nonce).await
}

/// The key-notice port answers one thing: `GET /v1/key-notices/HOSTKEY` without a body.
/// Anything else is refused before the router sees it (and the connection closes).
async fn key_notice_gate(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let refuse = |status: StatusCode, why: &'static str| {
        let mut r = (
            status,
            Json(ApiError {
                error: why.to_owned(),
            }),
        )
            .into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    };
    if req.method() != Method::GET {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET /v1/key-notices/HOSTKEY is served on this port",
        );
    }
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "a key-notice request has no body",
        );
    }
    if req.uri().query().is_some() || req.uri().path().len() > KEY_NOTICE_PATH_MAX {
        return refuse(
            StatusCode::NOT_FOUND,
            "only GET /v1/key-notices/HOSTKEY is served on this port",
        );
    }
    next.run(req).await
}

/// `/v1/key-notices/` and 64 hex digits.
const KEY_NOTICE_PATH_MAX: usize = "/v1/key-notices/".len() + 64;

/// The key-notice router (also for tests on loopback).
pub fn key_notice_router(coord: Coordinator) -> Router {
    Router::new()
        .route("/v1/key-notices/{key}", get(key_notices))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(1024))
        .layer(axum::middleware::from_fn(key_notice_gate))
        .with_state(coord)
}

/// Serve the key notices on TCP `port` of every address (the coordinator's WireGuard port
/// number: hosts find it at the endpoint they already know), until `shutdown`. Nothing else is
/// served there, with the tiny limits of `serve::Limits::KEY_NOTICES`: the port faces the
/// internet.
pub async fn serve_key_notices(
    coord: Coordinator,
    port: u16,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    let ctx = |what: &str| format!("key notice socket on TCP port {port}: {what}");
    // Dual-stack where IPv6 exists, else IPv4 only.
    let socket = match Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)) {
        Ok(s) => {
            s.set_only_v6(false)
                .map_err(|e| CoordError::io(ctx("IPV6_V6ONLY"), e))?;
            s.set_reuse_address(true)
                .map_err(|e| CoordError::io(ctx("SO_REUSEADDR"), e))?;
            match s.bind(&bind6.into()) {
                Ok(()) => s,
                Err(_) => bind_v4(port)?,
            }
        }
        Err(_) => bind_v4(port)?,
    };
    // A deep accept queue: over-cap connections are accepted and closed at once, so a burst
    // of them is not left waiting in the kernel's queues (where honest clients would wait
    // behind them).
    socket
        .listen(1024)
        .map_err(|e| CoordError::io(ctx("listen"), e))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| CoordError::io(ctx("non-blocking"), e))?;
    let listener = tokio::net::TcpListener::from_std(socket.into())
        .map_err(|e| CoordError::io(ctx("registering with the runtime"), e))?;
    tracing::info!(
        port,
        "coordinator key notices served (TCP, outside the tunnel)"
    );
    crate::runtime::serve::serve_http(
        listener,
        key_notice_router(coord),
        crate::runtime::serve::Limits::KEY_NOTICES,
        "key notices",
        shutdown,
    )
    .await;
    Ok(())
}

fn bind_v4(port: u16) -> Result<socket2::Socket, CoordError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let ctx = |what: &str| format!("key notice socket on TCP port {port}: {what}");
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| CoordError::io(ctx("creating"), e))?;
    s.set_reuse_address(true)
        .map_err(|e| CoordError::io(ctx("SO_REUSEADDR"), e))?;
    s.bind(&SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)).into())
        .map_err(|e| CoordError::io(ctx("bind"), e))?;
    Ok(s)
}
