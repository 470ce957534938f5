//! Mesh DNS: an authoritative server for `mesh.internal` (A, AAAA) and the mesh prefix's
//! reverse zone (PTR) on this host's mesh address, built on hickory-server 0.26.
//!
//! The decisions are `mesh_proto::handoff::DnsRecords::answer` (pure); this module turns them
//! into DNS messages. Names in the zone that do not exist get NXDOMAIN with the zone's SOA (for
//! negative caching); every other zone gets REFUSED: we are no resolver and forward nothing.
//! The records live behind a [`SharedRecords`] the daemon replaces when the netmap changes
//! ([`update_records`]); queries in flight see either the old or the new set.

use hickory_server::net::runtime::Time;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{
    Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA, NS, PTR, SOA};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use mesh_proto::handoff::{DnsAnswer, DnsQuery, DnsRecords, MeshView, MESH_DOMAIN};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use crate::runtime::serve::{ConnLimiter, Limits};

/// Time to live of our answers: short, the mesh changes when hosts join.
pub const TTL: u32 = 30;

/// The records the server answers from; swap them with [`update_records`].
pub type SharedRecords = Arc<RwLock<DnsRecords>>;

/// Records for `view`, ready to share with the server.
pub fn shared_records(view: Option<&MeshView>) -> SharedRecords {
    Arc::new(RwLock::new(view.map(DnsRecords::new).unwrap_or_default()))
}

/// Replace the records after a netmap change; returns whether they changed.
pub fn update_records(shared: &SharedRecords, view: &MeshView) -> bool {
    let new = DnsRecords::new(view);
    let mut guard = match shared.write() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if *guard == new {
        return false;
    }
    *guard = new;
    true
}

/// The hickory request handler over [`SharedRecords`].
#[derive(Clone)]
pub struct MeshDnsHandler {
    records: SharedRecords,
}

impl MeshDnsHandler {
    pub fn new(records: SharedRecords) -> Self {
        MeshDnsHandler { records }
    }
}

fn name(s: &str) -> Name {
    let mut n = Name::from_ascii(s).unwrap_or_else(|_| Name::root());
    n.set_fqdn(true);
    n
}

/// The zone's SOA: `ns.mesh.internal. hostmaster.mesh.internal. SERIAL ...`.
fn soa(zone: &str, serial: u32) -> Record {
    Record::from_rdata(
        name(zone),
        TTL,
        RData::SOA(SOA::new(
            name(&format!("ns.{MESH_DOMAIN}")),
            name(&format!("hostmaster.{MESH_DOMAIN}")),
            serial,
            3600,
            600,
            86400,
            TTL,
        )),
    )
}

fn query_kind(t: RecordType) -> DnsQuery {
    match t {
        RecordType::A => DnsQuery::A,
        RecordType::AAAA => DnsQuery::Aaaa,
        RecordType::PTR => DnsQuery::Ptr,
        RecordType::SOA => DnsQuery::Soa,
        RecordType::NS => DnsQuery::Ns,
        _ => DnsQuery::Other,
    }
}

/// The zone `qname` falls in (for the SOA of negative answers).
fn zone_of(qname: &str, records: &DnsRecords) -> String {
    if DnsRecords::in_zone(qname) {
        MESH_DOMAIN.to_owned()
    } else {
        records
            .reverse_zone()
            .unwrap_or_else(|| MESH_DOMAIN.to_owned())
    }
}

#[async_trait::async_trait]
impl RequestHandler for MeshDnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let meta = &request.metadata;
        if meta.message_type != MessageType::Query || meta.op_code != OpCode::Query {
            return send(
                &mut response_handle,
                builder.error_msg(meta, ResponseCode::NotImp),
                meta,
            )
            .await;
        }
        let queries = request.queries.queries();
        let [query] = queries else {
            return send(
                &mut response_handle,
                builder.error_msg(meta, ResponseCode::FormErr),
                meta,
            )
            .await;
        };
        let qname_lower = query.name().to_string();
        let qname = query.original().name().clone();
        let (answer, serial, zone) = {
            let records = match self.records.read() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            let answer = records.answer(&qname_lower, query_kind(query.query_type()));
            (answer, records.serial(), zone_of(&qname_lower, &records))
        };
        let mut metadata = Metadata::response_from_request(meta);
        let mut answers: Vec<Record> = Vec::new();
        let mut negative: Vec<Record> = Vec::new();
        match answer {
            DnsAnswer::Refused => {
                metadata.response_code = ResponseCode::Refused;
            }
            DnsAnswer::Address(IpAddr::V4(a)) => {
                answers.push(Record::from_rdata(qname, TTL, RData::A(A(a))));
            }
            DnsAnswer::Address(IpAddr::V6(a)) => {
                answers.push(Record::from_rdata(qname, TTL, RData::AAAA(AAAA(a))));
            }
            DnsAnswer::Ptr(target) => {
                answers.push(Record::from_rdata(
                    qname,
                    TTL,
                    RData::PTR(PTR(name(&target))),
                ));
            }
            DnsAnswer::Soa => answers.push(soa(&zone, serial)),
            DnsAnswer::Ns => answers.push(Record::from_rdata(
                qname,
                TTL,
                RData::NS(NS(name(&format!("ns.{MESH_DOMAIN}")))),
            )),
            DnsAnswer::NoData => negative.push(soa(&zone, serial)),
            DnsAnswer::NxDomain => {
                metadata.response_code = ResponseCode::NXDomain;
                negative.push(soa(&zone, serial));
            }
        }
        if metadata.response_code != ResponseCode::Refused {
            metadata.authoritative = true;
        }
        let response = builder.build(
            metadata,
            answers.iter(),
            std::iter::empty(),
            negative.iter(),
            std::iter::empty(),
        );
        send(&mut response_handle, response, meta).await
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Metadata,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "mesh DNS: could not send a response");
            let mut metadata = Metadata::response_from_request(request);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        }
    }
}

/// Captures the encoded answer of one query (DNS over TCP is served by [`serve_tcp`]).
#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Option<Vec<u8>>>>);

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: hickory_server::zone_handler::MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, hickory_server::net::NetError> {
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(u16::MAX);
        let info = response
            .destructive_emit(&mut encoder)
            .map_err(|e| hickory_server::net::NetError::from(format!("encoding: {e}")))?;
        match self.0.lock() {
            Ok(mut g) => *g = Some(bytes),
            Err(poisoned) => *poisoned.into_inner() = Some(bytes),
        }
        Ok(info)
    }
}

impl Capture {
    fn take(&self) -> Option<Vec<u8>> {
        match self.0.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }
}

/// One DNS-over-TCP connection: length-prefixed queries, each answered before the next is
/// read; closed when a length does not arrive within the idle timeout, a query within the
/// request timeout, after `max_requests` queries or the lifetime, or on a malformed query.
async fn dns_tcp_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    handler: Arc<MeshDnsHandler>,
    limits: Limits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let started = tokio::time::Instant::now();
    let (mut rd, mut wr) = stream.into_split();
    for _ in 0..limits.max_requests {
        let mut len = [0u8; 2];
        tokio::select! {
            r = tokio::time::timeout(limits.header_timeout, rd.read_exact(&mut len)) => match r {
                Ok(Ok(_)) => {}
                _ => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        }
        let n = usize::from(u16::from_be_bytes(len));
        let mut buf = vec![0u8; n];
        match tokio::time::timeout(limits.request_timeout, rd.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let request = match Request::from_bytes(buf, peer, Protocol::Tcp) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "malformed DNS query over TCP");
                return;
            }
        };
        let capture = Capture::default();
        handler
            .handle_request::<_, TokioTime>(&request, capture.clone())
            .await;
        let Some(answer) = capture.take() else {
            return;
        };
        let Ok(alen) = u16::try_from(answer.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(answer.len() + 2);
        out.extend_from_slice(&alen.to_be_bytes());
        out.extend_from_slice(&answer);
        match tokio::time::timeout(limits.request_timeout, wr.write_all(&out)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        if started.elapsed() >= limits.max_lifetime {
            return;
        }
    }
}

/// A running mesh DNS server (UDP and TCP on the same address).
pub struct MeshDns {
    server: Server<MeshDnsHandler>,
    tcp: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
    local_addr: SocketAddr,
}

impl MeshDns {
    /// Serve `records` on `addr` (production: the mesh address, port 53; tests: port 0, the
    /// TCP listener then takes the UDP socket's port). Needs a tokio runtime.
    pub async fn bind(addr: SocketAddr, records: SharedRecords) -> io::Result<MeshDns> {
        Self::bind_on(addr, None, records)
    }

    /// [`MeshDns::bind`], the sockets bound to `device` when given (SO_BINDTODEVICE: queries
    /// that arrive on other interfaces are not answered). TCP has the limits of
    /// `serve::Limits::DNS_TCP`.
    pub fn bind_on(
        addr: SocketAddr,
        device: Option<&str>,
        records: SharedRecords,
    ) -> io::Result<MeshDns> {
        Self::bind_with(addr, device, records, Limits::DNS_TCP.within_fd_limit())
    }

    /// [`MeshDns::bind_on`] with other TCP limits (tests).
    pub fn bind_with(
        addr: SocketAddr,
        device: Option<&str>,
        records: SharedRecords,
        limits: Limits,
    ) -> io::Result<MeshDns> {
        let udp = crate::runtime::serve::bind_udp(addr, device, "mesh DNS (UDP)")?;
        let local_addr = udp.local_addr()?;
        let tcp = crate::runtime::serve::bind_tcp(local_addr, device, 128, "mesh DNS (TCP)")?;
        let mut server = Server::new(MeshDnsHandler::new(records.clone()));
        server.register_socket(udp);
        let handler = Arc::new(MeshDnsHandler::new(records));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let limiter = ConnLimiter::new(&limits);
        let task = tokio::spawn(async move {
            let handle = move |stream, peer, stop| {
                dns_tcp_connection(stream, peer, handler.clone(), limits, stop)
            };
            crate::runtime::serve::accept_loop(tcp, limiter, "mesh DNS (TCP)", handle, async move {
                let _ = stop_rx.await;
            })
            .await
        });
        tracing::info!(addr = %local_addr, device = device.unwrap_or("(any)"), zone = MESH_DOMAIN, "mesh DNS listening");
        Ok(MeshDns {
            server,
            tcp: Some((stop_tx, task)),
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stop serving and wait for the sockets to close.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some((stop, task)) = self.tcp.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
        self.server
            .shutdown_gracefully()
            .await
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use hickory_server::proto::op::{Message, Query};
    use mesh_proto::netmap::{Netmap, NetmapPeer};
    use mesh_proto::PublicKey;
    use std::time::Duration;
    use tokio::net::UdpSocket;

    fn view(peers: &[(&str, u8)], version: u64) -> MeshView {
        let netmap = Netmap {
            version,
            mesh_cidr: "10.99.99.0/24".parse().unwrap(),
            name: "dock-load".into(),
            address: IpAddr::from([10, 99, 99, 1]),
            public_key: PublicKey([1; 32]),
            peers: peers
                .iter()
                .map(|(n, l)| NetmapPeer {
                    name: (*n).into(),
                    address: IpAddr::from([10, 99, 99, *l]),
                    public_key: PublicKey([*l; 32]),
                    allowed_ips: vec![format!("10.99.99.{l}/32").parse().unwrap()],
                    endpoints: vec![],
                    persistent_keepalive: None,
                    static_peer: false,
                    admin: false,
                    key_created_unix: 0,
                    next_public_key: None,
                })
                .collect(),
            rotate_requested: false,
            ungranted_routes: Vec::new(),
        };
        MeshView::new(&netmap, Some("dock-load"))
    }

    async fn ask(server: SocketAddr, qname: &str, qtype: RecordType) -> Message {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut msg = Message::query();
        msg.metadata.id = 4242;
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(Name::from_ascii(qname).unwrap(), qtype));
        sock.send_to(&msg.to_vec().unwrap(), server).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .expect("no DNS answer within 5 s")
            .unwrap();
        let resp = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(resp.metadata.id, 4242);
        resp
    }

    #[tokio::test]
    async fn answers_a_ptr_nxdomain_refused_over_udp() {
        let records = shared_records(Some(&view(&[("dock-prod", 2)], 3)));
        let dns = MeshDns::bind("127.0.0.1:0".parse().unwrap(), records.clone())
            .await
            .unwrap();
        let at = dns.local_addr();

        let r = ask(at, "dock-prod.mesh.internal.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert!(!r.metadata.recursion_available);
        assert_eq!(r.answers.len(), 1, "{r:?}");
        assert_eq!(
            r.answers[0].data,
            RData::A(A([10, 99, 99, 2].into())),
            "{r:?}"
        );

        let r = ask(at, "DOCK-PROD.Mesh.Internal.", RecordType::A).await;
        assert_eq!(r.answers.len(), 1, "case-insensitive: {r:?}");

        let r = ask(at, "2.99.99.10.in-addr.arpa.", RecordType::PTR).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            r.answers[0].data,
            RData::PTR(PTR(Name::from_ascii("dock-prod.mesh.internal.").unwrap()))
        );

        let r = ask(at, "ghost.mesh.internal.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert!(r.metadata.authoritative);
        assert!(r.answers.is_empty());
        assert!(
            matches!(r.authorities.first().map(|a| &a.data), Some(RData::SOA(s)) if s.serial == 3),
            "{r:?}"
        );

        let r = ask(at, "dock-prod.mesh.internal.", RecordType::AAAA).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty(), "NODATA: {r:?}");

        let r = ask(at, "example.com.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert!(r.answers.is_empty());

        // A host joins: the running server answers for it.
        assert!(update_records(
            &records,
            &view(&[("dock-prod", 2), ("dock-edge", 4)], 4)
        ));
        assert!(!update_records(
            &records,
            &view(&[("dock-prod", 2), ("dock-edge", 4)], 4)
        ));
        let r = ask(at, "dock-edge.mesh.internal.", RecordType::A).await;
        assert_eq!(r.answers[0].data, RData::A(A([10, 99, 99, 4].into())));

        dns.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn answers_over_tcp_too() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let records = shared_records(Some(&view(&[("dock-prod", 2)], 9)));
        let dns = MeshDns::bind("127.0.0.1:0".parse().unwrap(), records)
            .await
            .unwrap();
        let mut msg = Message::query();
        msg.metadata.id = 7;
        msg.add_query(Query::query(
            Name::from_ascii("mesh.internal.").unwrap(),
            RecordType::SOA,
        ));
        let bytes = msg.to_vec().unwrap();
        let mut s = tokio::net::TcpStream::connect(dns.local_addr())
            .await
            .unwrap();
        let len = u16::try_from(bytes.len()).unwrap().to_be_bytes();
        s.write_all(&len).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let mut len = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut len))
            .await
            .expect("no TCP answer within 5 s")
            .unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).await.unwrap();
        let r = Message::from_vec(&buf).unwrap();
        assert_eq!(r.metadata.id, 7);
        assert!(r.metadata.authoritative);
        assert!(
            matches!(r.answers.first().map(|a| &a.data), Some(RData::SOA(s)) if s.serial == 9),
            "{r:?}"
        );
        dns.shutdown().await.unwrap();
    }

    /// DNS over TCP: a connection that sends half a length prefix is closed after the idle
    /// timeout, one over the per-source cap is closed at once, and a query from another
    /// source is answered meanwhile.
    #[tokio::test]
    async fn tcp_half_queries_are_cut_and_over_cap_closed() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let records = shared_records(Some(&view(&[("dock-prod", 2)], 9)));
        let limits = Limits {
            max_per_source: 3,
            header_timeout: Duration::from_millis(500),
            ..Limits::DNS_TCP
        };
        let dns =
            MeshDns::bind_with("127.0.0.1:0".parse().unwrap(), None, records, limits).unwrap();
        let at = dns.local_addr();
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut s = tokio::net::TcpStream::connect(at).await.unwrap();
            s.write_all(&[0]).await.unwrap();
            held.push(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = tokio::net::TcpStream::connect(at).await.unwrap();
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_millis(300), extra.read(&mut b))
            .await
            .expect("over-cap connection closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        // Another source is answered.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(at).await.unwrap();
        let mut msg = Message::query();
        msg.metadata.id = 9;
        msg.add_query(Query::query(
            Name::from_ascii("dock-prod.mesh.internal.").unwrap(),
            RecordType::A,
        ));
        let bytes = msg.to_vec().unwrap();
        s.write_all(&u16::try_from(bytes.len()).unwrap().to_be_bytes())
            .await
            .unwrap();
        s.write_all(&bytes).await.unwrap();
        let mut len = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut len))
            .await
            .expect("answered")
            .unwrap();
        // The half-sent ones are closed by the idle timeout.
        for mut h in held {
            let n = tokio::time::timeout(Duration::from_secs(3), h.read(&mut b))
                .await
                .expect("half query closed after the timeout");
            assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        }
        dns.shutdown().await.unwrap();
    }
}
