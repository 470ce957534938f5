//! Serving TCP with limits: every server meshd runs (the coordinator API, the key-notice port,
//! `/metrics`, mesh DNS over TCP) accepts through a [`ConnLimiter`] (a cap on connections in
//! total and per source address; a connection over either cap is closed at once, before a byte
//! is read) and, for HTTP, [`serve_http`] adds a header-read timeout (which is also the idle
//! timeout between keep-alive requests), a deadline on each request (its body included), a
//! cap on requests per connection and on the connection's lifetime, and small header limits.
//! A client that sends half a request, never reads its answer or opens a thousand connections
//! holds at most its share for a bounded time; everyone else is still served.
//!
//! The sockets: [`bind_tcp`] and [`bind_udp`] optionally bind to an interface
//! (SO_BINDTODEVICE, so only packets that arrived on the mesh interface are served), and
//! [`ifindex`] lets a supervisor notice that the interface was recreated (a socket bound to
//! the old one no longer receives anything) and bind again.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long a stopping server waits for its open connections to finish.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Pause after a failed accept (out of file descriptors: let connections close first).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The limits of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, from everyone.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_per_source: usize,
    /// The whole request head must arrive within this; it is also the idle timeout of a
    /// keep-alive connection waiting for its next request.
    pub header_timeout: Duration,
    /// From the head to the answer: reading the body and running the handler.
    pub request_timeout: Duration,
    /// A connection is asked to close after this (the request in flight finishes, within
    /// `request_timeout`) and is dropped if it does not.
    pub max_lifetime: Duration,
    /// Requests served on one connection; the last answer says `Connection: close`.
    pub max_requests: u32,
    /// Keep connections open between requests at all.
    pub keep_alive: bool,
    /// hyper's read buffer, which bounds the request head (at least 8192).
    pub max_header_bytes: usize,
    /// Header fields in one request.
    pub max_headers: usize,
}

impl Limits {
    /// The coordinator API: every host of the mesh long-polls it (one connection each, a few
    /// while it reports endpoints or rotates), so the total is large; the per-source cap is
    /// per host (the source is the tunnel's authenticated inner address).
    pub const API: Limits = Limits {
        max_connections: 4096,
        max_per_source: 16,
        header_timeout: Duration::from_secs(10),
        // The longest handler is the netmap long-poll (LONG_POLL_SECS = 25 s).
        request_timeout: Duration::from_secs(mesh_proto::wire::api::LONG_POLL_SECS + 15),
        max_lifetime: Duration::from_secs(300),
        max_requests: 100,
        keep_alive: true,
        max_header_bytes: 16 * 1024,
        max_headers: 32,
    };

    /// The key-notice port faces the internet and answers one small GET: tiny limits.
    pub const KEY_NOTICES: Limits = Limits {
        max_connections: 64,
        max_per_source: 4,
        header_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        max_lifetime: Duration::from_secs(15),
        max_requests: 1,
        keep_alive: false,
        max_header_bytes: 8192,
        max_headers: 16,
    };

    /// `/metrics`: a scraper or two.
    pub const METRICS: Limits = Limits {
        max_connections: 32,
        max_per_source: 4,
        header_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        max_lifetime: Duration::from_secs(120),
        max_requests: 100,
        keep_alive: true,
        max_header_bytes: 8192,
        max_headers: 32,
    };

    /// Mesh DNS over TCP (the timeouts: for the next query's length and body).
    pub const DNS_TCP: Limits = Limits {
        max_connections: 128,
        max_per_source: 8,
        header_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(5),
        max_lifetime: Duration::from_secs(60),
        max_requests: 100,
        keep_alive: true,
        max_header_bytes: 8192,
        max_headers: 0,
    };
}

impl Limits {
    /// `max_connections` no larger than half the soft RLIMIT_NOFILE: a server full of
    /// connections still leaves descriptors for everything else (the control socket, the
    /// registry, netlink).
    pub fn within_fd_limit(self) -> Limits {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        let share = usize::try_from(soft / 2).unwrap_or(usize::MAX).max(16);
        Limits {
            max_connections: self.max_connections.min(share),
            ..self
        }
    }
}

/// Raise the soft RLIMIT_NOFILE to the hard one (what the unit's LimitNOFILE allows): the
/// servers' caps are sized from it. Returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "cannot raise the file descriptor limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` are open.
    Total,
    /// `max_per_source` are open from this address.
    PerSource,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Only sources with an open connection: never more entries than `total`.
    per_source: HashMap<IpAddr, usize>,
    refused: u64,
}

/// Counts open connections in total and per source address.
#[derive(Debug, Clone)]
pub struct ConnLimiter {
    max_total: usize,
    max_per_source: usize,
    counts: Arc<Mutex<Counts>>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnPermit {
    source: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

fn lock(m: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl ConnLimiter {
    pub fn new(limits: &Limits) -> ConnLimiter {
        ConnLimiter {
            max_total: limits.max_connections,
            max_per_source: limits.max_per_source,
            counts: Arc::default(),
        }
    }

    /// Admit a connection from `source`, or say which cap it hits.
    pub fn try_admit(&self, source: IpAddr) -> Result<ConnPermit, Refusal> {
        let mut c = lock(&self.counts);
        let from_source = c.per_source.get(&source).copied().unwrap_or(0);
        let refusal = if c.total >= self.max_total {
            Some(Refusal::Total)
        } else if from_source >= self.max_per_source {
            Some(Refusal::PerSource)
        } else {
            None
        };
        if let Some(r) = refusal {
            c.refused += 1;
            return Err(r);
        }
        c.total += 1;
        c.per_source.insert(source, from_source + 1);
        Ok(ConnPermit {
            source,
            counts: self.counts.clone(),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.counts).total
    }

    /// Sources with a connection open now.
    pub fn sources(&self) -> usize {
        lock(&self.counts).per_source.len()
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        lock(&self.counts).refused
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.per_source.remove(&self.source);
            }
        }
    }
}

/// The caller's address without an IPv4-mapped IPv6 disguise (a dual-stack socket reports
/// `::ffff:a.b.c.d`): one source, one count.
pub fn source_ip(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Accept connections on `listener` through `limiter` until `shutdown`, running
/// `handle(stream, peer, stop)` for each admitted one on its own task (`stop` turns true when
/// the server stops: finish the request in flight and return). Over-cap connections are
/// closed at once (logged at most once a second). On shutdown, waits up to three seconds for
/// the open connections.
pub async fn accept_loop<H, F>(
    listener: TcpListener,
    limiter: ConnLimiter,
    name: &'static str,
    handle: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut last_refusal_log: Option<tokio::time::Instant> = None;
    let mut refused_since_log = 0u64;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(server = name, error = %e, "accept failed; pausing");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        match limiter.try_admit(source_ip(peer)) {
            Ok(permit) => {
                let work = handle(stream, peer, stop_rx.clone());
                tasks.spawn(async move {
                    work.await;
                    drop(permit);
                });
            }
            Err(why) => {
                // Closed at once: no byte read, no task, no timer.
                drop(stream);
                refused_since_log += 1;
                let now = tokio::time::Instant::now();
                if last_refusal_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                {
                    tracing::warn!(
                        server = name,
                        source = %source_ip(peer),
                        cap = match why {
                            Refusal::Total => "total",
                            Refusal::PerSource => "per source",
                        },
                        refused = refused_since_log,
                        open = limiter.open(),
                        "connections over the cap closed"
                    );
                    last_refusal_log = Some(now);
                    refused_since_log = 0;
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(STOP_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            server = name,
            left = tasks.len(),
            "connections still open at stop; dropped"
        );
        tasks.abort_all();
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<axum::body::Body> {
    let mut r = Response::new(axum::body::Body::from(text));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Serve `router` over HTTP/1 on `listener` with `limits` until `shutdown`. Handlers get the
/// caller's address as `ConnectInfo<SocketAddr>`.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    name: &'static str,
    shutdown: impl Future<Output = ()>,
) {
    let limits = limits.within_fd_limit();
    let limiter = ConnLimiter::new(&limits);
    serve_http_with(listener, router, limits, limiter, name, shutdown).await
}

/// [`serve_http`] with a limiter the caller keeps (tests read its counts).
pub async fn serve_http_with(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    limiter: ConnLimiter,
    name: &'static str,
    shutdown: impl Future<Output = ()>,
) {
    let service = TowerToHyperService::new(router);
    let handle = move |stream: TcpStream, peer: SocketAddr, stop: watch::Receiver<bool>| {
        serve_connection(stream, peer, service.clone(), limits, stop)
    };
    accept_loop(listener, limiter, name, handle, shutdown).await
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    service: TowerToHyperService<Router>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let call = hyper::service::Service::call(&service, req);
        async move {
            let mut resp = match tokio::time::timeout(limits.request_timeout, call).await {
                Ok(Ok(r)) => r,
                Ok(Err(never)) => match never {},
                Err(_) => plain(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request took too long (its body arrived too slowly)\n",
                ),
            };
            if !limits.keep_alive || n >= limits.max_requests {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(limits.keep_alive)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = tokio::time::sleep(limits.max_lifetime) => None,
        _ = stop.wait_for(|s| *s) => None,
    };
    let result = match ended {
        Some(r) => r,
        None => {
            // Finish the request in flight (if any), then close; drop it if that stalls.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.request_timeout, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer = %peer, error = %e, "connection closed");
    }
}

/// A TCP listener on `bind` for `what` (named in errors). With `device`, SO_BINDTODEVICE to
/// that interface (needs CAP_NET_RAW): packets that arrive on any other interface (the mesh
/// address routed over the underlay, a spoofed mesh source) are never served. IP_FREEBIND lets
/// the socket bind before the address is on the interface.
pub fn bind_tcp(
    bind: SocketAddr,
    device: Option<&str>,
    backlog: i32,
    what: &str,
) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(bind), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| ctx(e, what, bind, "creating"))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| ctx(e, what, bind, "SO_REUSEADDR"))?;
    prepare(&socket, bind, device, what)?;
    socket
        .bind(&bind.into())
        .map_err(|e| ctx(e, what, bind, "bind"))?;
    socket
        .listen(backlog)
        .map_err(|e| ctx(e, what, bind, "listen"))?;
    TcpListener::from_std(socket.into()).map_err(|e| ctx(e, what, bind, "registering"))
}

/// A UDP socket on `bind` for `what`; `device` as in [`bind_tcp`].
pub fn bind_udp(
    bind: SocketAddr,
    device: Option<&str>,
    what: &str,
) -> io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| ctx(e, what, bind, "creating"))?;
    prepare(&socket, bind, device, what)?;
    socket
        .bind(&bind.into())
        .map_err(|e| ctx(e, what, bind, "bind"))?;
    tokio::net::UdpSocket::from_std(socket.into()).map_err(|e| ctx(e, what, bind, "registering"))
}

fn prepare(
    socket: &socket2::Socket,
    bind: SocketAddr,
    device: Option<&str>,
    what: &str,
) -> io::Result<()> {
    if let Some(dev) = device {
        socket
            .bind_device(Some(dev.as_bytes()))
            .map_err(|e| ctx(e, what, bind, &format!("binding to the interface {dev}")))?;
    }
    match bind {
        SocketAddr::V4(_) => socket
            .set_freebind_v4(true)
            .map_err(|e| ctx(e, what, bind, "IP_FREEBIND"))?,
        SocketAddr::V6(_) => {
            socket
                .set_only_v6(true)
                .map_err(|e| ctx(e, what, bind, "IPV6_V6ONLY"))?;
            socket
                .set_freebind_v6(true)
                .map_err(|e| ctx(e, what, bind, "IPV6_FREEBIND"))?
        }
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| ctx(e, what, bind, "non-blocking"))
}

fn ctx(e: io::Error, what: &str, bind: SocketAddr, step: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what} socket on {bind}: {step}: {e}"))
}

/// The interface's index now (`None`: it does not exist).
pub fn ifindex(interface: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(interface).ok()
}

/// How often a supervisor checks that the interface it bound to is still the same one.
pub const DEVICE_CHECK: Duration = Duration::from_secs(1);

/// Resolves once `interface` no longer has index `bound` (deleted, or deleted and created
/// again): a socket bound to the old interface then receives nothing and must be bound again.
pub async fn device_replaced(interface: &str, bound: u32) {
    let mut tick = tokio::time::interval(DEVICE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if ifindex(interface) != Some(bound) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> Limits {
        Limits {
            max_connections: 20,
            max_per_source: 5,
            header_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_millis(800),
            max_lifetime: Duration::from_secs(30),
            max_requests: 3,
            keep_alive: true,
            max_header_bytes: 8192,
            max_headers: 16,
        }
    }

    fn router() -> Router {
        Router::new()
            .route(
                "/hello",
                get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                    format!("hello {}", peer.ip())
                }),
            )
            .route("/echo", post(|body: String| async move { body }))
    }

    struct Server {
        addr: SocketAddr,
        limiter: ConnLimiter,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(limits: Limits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limiter = ConnLimiter::new(&limits);
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let l = limiter.clone();
        let task = tokio::spawn(async move {
            serve_http_with(listener, router(), limits, l, "test", async move {
                let _ = rx.await;
            })
            .await
        });
        Server {
            addr,
            limiter,
            stop: Some(stop),
            task,
        }
    }

    impl Server {
        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// One request on a new connection; the whole answer (the server closes: `Connection:
    /// close`).
    async fn get_hello(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("answered in time")
            .unwrap();
        out
    }

    /// Reads until the peer closes; how long that took (`None`: still open after `within`).
    async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(started + within, s.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn poll_open(limiter: &ConnLimiter, want: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while limiter.open() != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "open connections: {} (want {want})",
                limiter.open()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn limiter_counts_per_source_and_in_total() {
        let l = ConnLimiter::new(&Limits {
            max_connections: 3,
            max_per_source: 2,
            ..limits()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let a1 = l.try_admit(a).unwrap();
        let a2 = l.try_admit(a).unwrap();
        assert_eq!(l.try_admit(a).unwrap_err(), Refusal::PerSource);
        let b1 = l.try_admit(b).unwrap();
        assert_eq!(l.try_admit(c).unwrap_err(), Refusal::Total);
        assert_eq!((l.open(), l.sources(), l.refused()), (3, 2, 2));
        drop(a1);
        let c1 = l.try_admit(c).unwrap();
        drop((a2, b1, c1));
        // Nothing left behind: the map only holds sources with an open connection.
        assert_eq!((l.open(), l.sources()), (0, 0));
    }

    #[test]
    fn mapped_v4_counts_as_the_v4_source() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:5".parse().unwrap();
        assert_eq!(source_ip(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
        let v6: SocketAddr = "[fd00::1]:5".parse().unwrap();
        assert_eq!(source_ip(v6), "fd00::1".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn serves_with_the_callers_address() {
        let server = start(limits()).await;
        let out = get_hello(server.addr).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("hello 127.0.0.1"), "{out}");
        server.stop().await;
    }

    /// Slowloris: half a request head is closed after the header timeout.
    #[tokio::test]
    async fn half_sent_header_is_closed_after_the_timeout() {
        let server = start(limits()).await;
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        let took = closed_within(&mut s, Duration::from_secs(5))
            .await
            .expect("closed");
        assert!(took >= Duration::from_millis(400), "closed after {took:?}");
        poll_open(&server.limiter, 0).await;
        server.stop().await;
    }

    /// A head that arrives byte by byte, each byte just inside any per-read timeout, is still
    /// bounded by the header timeout as a whole.
    #[tokio::test]
    async fn trickled_header_is_bounded_as_a_whole() {
        let server = start(limits()).await;
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let started = tokio::time::Instant::now();
        let mut closed = false;
        for b in b"GET /hello HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx".iter() {
            if s.write_all(&[*b]).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if started.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        if !closed {
            closed = closed_within(&mut s, Duration::from_secs(2))
                .await
                .is_some();
        }
        assert!(closed, "a trickled head kept its connection");
        assert!(started.elapsed() < Duration::from_secs(3));
        server.stop().await;
    }

    /// A body that never arrives is cut by the request deadline (408).
    #[tokio::test]
    async fn slow_body_gets_408_and_the_connection_closes() {
        let server = start(limits()).await;
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("closed in time")
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
        poll_open(&server.limiter, 0).await;
        server.stop().await;
    }

    /// An idle keep-alive connection is closed after the header (idle) timeout, and one
    /// connection serves at most `max_requests`.
    #[tokio::test]
    async fn idle_keep_alive_is_closed_and_requests_per_connection_capped() {
        let server = start(limits()).await;
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let took = closed_within(&mut s, Duration::from_secs(5))
            .await
            .expect("idle connection closed");
        assert!(took >= Duration::from_millis(400), "closed after {took:?}");

        // Three requests pipelined on one connection, then a fourth: only three answers.
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let one = "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n";
        s.write_all(one.repeat(4).as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("closed after the cap")
            .unwrap();
        assert_eq!(out.matches("HTTP/1.1 200").count(), 3, "{out}");
        assert!(
            out.to_ascii_lowercase().contains("connection: close"),
            "{out}"
        );
        server.stop().await;
    }

    /// Over the caps: connections are closed at once, while an honest client from another
    /// address is still served; when the holders go, the source is served again.
    #[tokio::test]
    async fn over_cap_connections_are_closed_at_once_and_others_served() {
        let server = start(Limits {
            header_timeout: Duration::from_secs(30),
            ..limits()
        })
        .await;
        // Five half-open connections from 127.0.0.1 fill its share.
        let mut held = Vec::new();
        for _ in 0..5 {
            let mut s = TcpStream::connect(server.addr).await.unwrap();
            s.write_all(b"GET /hel").await.unwrap();
            held.push(s);
        }
        poll_open(&server.limiter, 5).await;
        // The sixth is closed at once, before it sends anything.
        let mut extra = TcpStream::connect(server.addr).await.unwrap();
        let took = closed_within(&mut extra, Duration::from_secs(2))
            .await
            .expect("over-cap connection closed");
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert!(server.limiter.refused() >= 1);
        // Another source (127.0.0.2 is loopback too) is served meanwhile.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(server.addr).await.unwrap();
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(out.ends_with("hello 127.0.0.2"), "{out}");
        drop(held);
        poll_open(&server.limiter, 0).await;
        assert!(get_hello(server.addr).await.starts_with("HTTP/1.1 200"));
        server.stop().await;
    }

    /// Many sources at once: the total cap holds and nothing is left counted afterwards.
    #[tokio::test]
    async fn total_cap_holds_across_sources() {
        let server = start(Limits {
            max_connections: 10,
            max_per_source: 10,
            header_timeout: Duration::from_secs(30),
            ..limits()
        })
        .await;
        let mut held = Vec::new();
        for i in 0..30u8 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::from(([127, 0, 1, i + 1], 0)))
                .unwrap();
            let s = sock.connect(server.addr).await.unwrap();
            held.push(s);
        }
        poll_open(&server.limiter, 10).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while server.limiter.refused() < 20 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}",
                server.limiter.refused()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.limiter.open(), 10);
        drop(held);
        poll_open(&server.limiter, 0).await;
        assert_eq!(server.limiter.sources(), 0);
        server.stop().await;
    }

    /// Stopping closes idle connections and returns.
    #[tokio::test]
    async fn stop_closes_open_connections() {
        let server = start(Limits {
            header_timeout: Duration::from_secs(30),
            ..limits()
        })
        .await;
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        poll_open(&server.limiter, 1).await;
        let limiter = server.limiter.clone();
        server.stop().await;
        assert!(closed_within(&mut s, Duration::from_secs(5))
            .await
            .is_some());
        assert_eq!(limiter.open(), 0);
    }
}
