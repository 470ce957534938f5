//! A small HTTP/1.1 client for the coordinator API (inside the tunnel): one request per
//! connection (`Connection: close`), JSON bodies, a deadline on the whole exchange. The
//! coordinator is our own axum server, so this needs no more than status line, headers,
//! `Content-Length` or chunked bodies.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_proto::api::{
    ApiError, EndpointReport, HostInfo, InviteInfo, InviteRequest, InviteResponse, JoinRequest,
    JoinResponse, RotateRequest, RotateResponse, LONG_POLL_SECS,
};
use mesh_proto::netmap::Netmap;
use mesh_proto::routes::{RouteDecision, RouteDecisionRequest, RouteInfo};
use mesh_proto::PublicKey;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response we accept (a netmap of a few thousand hosts fits easily).
const MAX_RESPONSE: usize = 16 * 1024 * 1024;
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
    /// The coordinator answered with an error; `message` is its own words.
    #[error("{message}")]
    Refused { status: u16, message: String },
    /// The answer could not be understood.
    #[error("bad answer from the coordinator API at {addr}: {message}")]
    Protocol { addr: SocketAddr, message: String },
}

/// A raw HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The coordinator API, as the joining and following code needs it (faked in tests).
pub trait Api: Send + Sync {
    fn join(
        &self,
        at: SocketAddr,
        req: &JoinRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<JoinResponse, CallError>> + Send;

    /// How long a join keeps trying to reach the coordinator through the tunnel.
    fn join_deadline(&self) -> Duration {
        crate::member::JOIN_TIMEOUT
    }
}

/// The real client.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpApi;

impl Api for HttpApi {
    async fn join(
        &self,
        at: SocketAddr,
        req: &JoinRequest,
        timeout: Duration,
    ) -> Result<JoinResponse, CallError> {
        call_json(at, "POST", "/v1/join", Some(req), timeout).await
    }
}

/// `GET /v1/netmap?since=V`: `Some` when a newer netmap arrived, `None` on 304.
pub async fn fetch_netmap(at: SocketAddr, since: u64) -> Result<Option<Netmap>, CallError> {
    let raw = request(
        at,
        "GET",
        &format!("/v1/netmap?since={since}"),
        None,
        POLL_TIMEOUT,
    )
    .await?;
    if raw.status == 304 {
        return Ok(None);
    }
    decode(at, raw).map(Some)
}

pub async fn report_endpoints(at: SocketAddr, report: &EndpointReport) -> Result<(), CallError> {
    let body = encode(at, report)?;
    let raw = request(at, "POST", "/v1/endpoints", Some(body), CALL_TIMEOUT).await?;
    check(at, raw).map(|_| ())
}

/// `POST /v1/rotate/prepare`: `key` becomes our next key (peers accept its handshakes).
pub async fn rotate_prepare(at: SocketAddr, key: PublicKey) -> Result<Netmap, CallError> {
    let req = RotateRequest { public_key: key };
    call_json::<_, RotateResponse>(at, "POST", "/v1/rotate/prepare", Some(&req), CALL_TIMEOUT)
        .await
        .map(|r| r.netmap)
}

/// `POST /v1/rotate/commit`: the prepared `key` replaces ours everywhere.
pub async fn rotate_commit(at: SocketAddr, key: PublicKey) -> Result<Netmap, CallError> {
    let req = RotateRequest { public_key: key };
    call_json::<_, RotateResponse>(at, "POST", "/v1/rotate/commit", Some(&req), CALL_TIMEOUT)
        .await
        .map(|r| r.netmap)
}

pub async fn invite(at: SocketAddr, req: &InviteRequest) -> Result<InviteResponse, CallError> {
    call_json(at, "POST", "/v1/admin/invite", Some(req), CALL_TIMEOUT).await
}

pub async fn invites(at: SocketAddr) -> Result<Vec<InviteInfo>, CallError> {
    call_json::<(), _>(at, "GET", "/v1/admin/invites", None, CALL_TIMEOUT).await
}

pub async fn revoke_invite(at: SocketAddr, name: &str) -> Result<(), CallError> {
    let path = format!("/v1/admin/invites/{}", path_segment(name));
    check(at, request(at, "DELETE", &path, None, CALL_TIMEOUT).await?).map(|_| ())
}

pub async fn hosts(at: SocketAddr) -> Result<Vec<HostInfo>, CallError> {
    call_json::<(), _>(at, "GET", "/v1/admin/hosts", None, CALL_TIMEOUT).await
}

pub async fn remove(at: SocketAddr, name: &str) -> Result<(), CallError> {
    let path = format!("/v1/admin/hosts/{}", path_segment(name));
    check(at, request(at, "DELETE", &path, None, CALL_TIMEOUT).await?).map(|_| ())
}

/// `meshctl routes` relayed from an admin host.
pub async fn routes(at: SocketAddr) -> Result<Vec<RouteInfo>, CallError> {
    call_json::<(), _>(at, "GET", "/v1/admin/routes", None, CALL_TIMEOUT).await
}

/// `meshctl routes approve|revoke HOST PREFIX` relayed from an admin host.
pub async fn decide_route(
    at: SocketAddr,
    decision: RouteDecision,
    req: &RouteDecisionRequest,
) -> Result<RouteInfo, CallError> {
    let path = match decision {
        RouteDecision::Approve => "/v1/admin/routes/approve",
        RouteDecision::Revoke => "/v1/admin/routes/revoke",
    };
    call_json(at, "POST", path, Some(req), CALL_TIMEOUT).await
}

/// `meshctl rotate NAME` relayed from an admin host.
pub async fn request_rotation(at: SocketAddr, name: &str) -> Result<(), CallError> {
    let path = format!("/v1/admin/hosts/{}/rotate", path_segment(name));
    check(at, request(at, "POST", &path, None, CALL_TIMEOUT).await?).map(|_| ())
}

/// `meshctl static-config NAME` relayed from an admin host.
pub async fn static_config(at: SocketAddr, name: &str) -> Result<String, CallError> {
    let path = format!("/v1/admin/hosts/{}/wg-quick", path_segment(name));
    let raw = check(at, request(at, "GET", &path, None, CALL_TIMEOUT).await?)?;
    String::from_utf8(raw.body).map_err(|e| CallError::Protocol {
        addr: at,
        message: format!("the configuration is not UTF-8: {e}"),
    })
}

/// The coordinator's key notices for `host` (`mesh_proto::notice`), from `at`: the
/// coordinator's WireGuard endpoint, over TCP outside the tunnel.
pub async fn key_notices(
    at: SocketAddr,
    host: &PublicKey,
    timeout: Duration,
) -> Result<Vec<mesh_proto::notice::KeyNotice>, CallError> {
    call_json::<(), mesh_proto::notice::KeyNoticesResponse>(
        at,
        "GET",
        &mesh_proto::notice::path(host),
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
    method: &str,
    path: &str,
    body: Option<&B>,
    timeout: Duration,
) -> Result<T, CallError> {
    let body = match body {
        Some(b) => Some(encode(at, b)?),
        None => None,
    };
    let raw = request(at, method, path, body, timeout).await?;
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
    let message = match serde_json::from_slice::<ApiError>(&raw.body) {
        Ok(e) => e.error,
        Err(_) => {
            let text = String::from_utf8_lossy(&raw.body).trim().to_string();
            if text.is_empty() {
                format!("coordinator API at {at} answered HTTP {}", raw.status)
            } else {
                text
            }
        }
    };
    Err(CallError::Refused {
        status: raw.status,
        message,
    })
}

fn decode<T: DeserializeOwned>(at: SocketAddr, raw: RawResponse) -> Result<T, CallError> {
    let raw = check(at, raw)?;
    serde_json::from_slice(&raw.body).map_err(|e| CallError::Protocol {
        addr: at,
        message: format!("cannot decode the answer: {e}"),
    })
}

/// One HTTP exchange with a deadline on the whole of it.
pub async fn request(
    at: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<RawResponse, CallError> {
    match tokio::time::timeout(timeout, exchange(at, method, path, body)).await {
        Ok(r) => r,
        Err(_) => Err(CallError::Unreachable {
            addr: at,
            message: format!("no answer within {}s", timeout.as_secs()),
        }),
    }
}

async fn exchange(
    at: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<RawResponse, CallError> {
    let unreachable = |e: std::io::Error| CallError::Unreachable {
        addr: at,
        message: e.to_string(),
    };
    let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(at)).await {
        Ok(r) => r.map_err(unreachable)?,
        Err(_) => {
            return Err(CallError::Unreachable {
                addr: at,
                message: format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
            })
        }
    };
    let body = body.unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {at}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    stream.write_all(&out).await.map_err(unreachable)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(unreachable)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(CallError::Protocol {
                addr: at,
                message: format!("answer larger than {MAX_RESPONSE} bytes"),
            });
        }
    }
    parse_response(&buf).map_err(|message| CallError::Protocol { addr: at, message })
}

/// Parse a complete HTTP/1.1 response (the connection was closed after it).
pub fn parse_response(buf: &[u8]) -> Result<RawResponse, String> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer has no complete header")?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "the header is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 answer: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    let rest = &buf[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = content_length {
        if rest.len() < n {
            return Err(format!(
                "the answer was cut short ({} of {n} bytes)",
                rest.len()
            ));
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(RawResponse { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunked body")?;
        let size_text = std::str::from_utf8(&data[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("the chunked answer was cut short".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").expect("ok");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let r = parse_response(
            b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .expect("ok");
        assert_eq!((r.status, r.body.as_slice()), (409, &b"abcde"[..]));
        let r = parse_response(b"HTTP/1.1 304 Not Modified\r\n\r\n").expect("ok");
        assert_eq!(r.status, 304);
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}").is_err());
    }

    #[test]
    fn coordinator_errors_are_passed_on_verbatim() {
        let at: SocketAddr = "10.99.99.1:51872".parse().expect("sa");
        let raw = RawResponse {
            status: 409,
            body: br#"{"error":"invitation for dock-mirror was already used"}"#.to_vec(),
        };
        let err = check(at, raw).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "invitation for dock-mirror was already used"
        );
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }

    #[tokio::test]
    async fn round_trip_against_a_tiny_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let at = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.expect("read");
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            s.write_all(b"HTTP/1.1 304 Not Modified\r\n\r\n")
                .await
                .expect("write");
            req
        });
        let got = fetch_netmap(at, 7).await.expect("call");
        assert_eq!(got, None);
        let req = server.await.expect("join");
        assert!(
            req.starts_with("GET /v1/netmap?since=7 HTTP/1.1\r\n"),
            "{req}"
        );
        // Nobody listening: unreachable, quickly.
        drop(got);
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dead = closed.local_addr().expect("addr");
        drop(closed);
        let err = fetch_netmap(dead, 0).await.expect_err("unreachable");
        assert!(matches!(err, CallError::Unreachable { .. }), "{err}");
    }
}
