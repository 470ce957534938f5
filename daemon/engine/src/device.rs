//! The engine's device: peers, cryptokey routing, the data-plane threads and the timers.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey as XPublic, StaticSecret};
use ipnet::IpNet;
use mesh_proto::wire::uapi::{GetDevice, GetPeer, SetDevice, SetPeer, UapiError};
use parking_lot::{Mutex, RwLock};
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::allowed_ips::AllowedIps;
use crate::gate::{Admit, GateConfig, HandshakeGate};
use crate::udp::{canonical, RecvBatch, SendBatch, UdpSocket};

/// A `RateLimiter` limit that is never reached: the limiter only checks MAC1.
const NEVER_UNDER_LOAD: u64 = u64::MAX;
/// A `RateLimiter` limit that is always reached: the limiter demands a valid MAC2 (cookie) and
/// formats the cookie reply when there is none.
const ALWAYS_UNDER_LOAD: u64 = 0;
/// Largest datagram or IP packet we handle.
const MAX_PACKET: usize = 65535;
/// WireGuard data overhead: 16 header + 16 tag.
const WG_OVERHEAD: usize = 32;
/// Datagrams read per `recvmmsg`.
const UDP_BATCH: usize = 64;
/// Decrypted packets written to the TUN at a time (its GRO coalesces within one write).
const TUN_FLUSH: usize = 128;

/// How the engine is set up at start.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub mtu: u16,
    /// Try TUN offloads (virtio-net header, TSO/GSO, GRO); falls back when refused.
    pub offload: bool,
    /// Try UDP offloads (`UDP_SEGMENT` sends, `UDP_GRO` receives); falls back when refused.
    pub udp_offload: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            mtu: mesh_proto::DEFAULT_MTU,
            offload: true,
            udp_offload: true,
        }
    }
}

/// Data-plane worker threads; each serves both directions.
const DATA_WORKERS: usize = 2;

/// A worker's buffers for the outbound direction (TUN to UDP).
struct OutBufs {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    out: SendBatch,
    targets: Vec<Option<Arc<Peer>>>,
}

impl OutBufs {
    fn new(offload: bool) -> Self {
        // Room for one read's worth of TSO segments beyond a batch of single-packet reads.
        let batch = 2 * IDEAL_BATCH_SIZE;
        // With offloads a read is split into MTU-sized segments; without, one packet of any size.
        let seg_size = if offload { 9216 } else { MAX_PACKET };
        OutBufs {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + MAX_PACKET],
            bufs: (0..batch).map(|_| vec![0u8; seg_size]).collect(),
            sizes: vec![0usize; batch],
            out: SendBatch::new(batch, (seg_size + WG_OVERHEAD).max(148)),
            targets: Vec::with_capacity(batch),
        }
    }
}

/// A worker's buffers for the inbound direction (UDP to TUN).
struct InBufs {
    rx: RecvBatch,
    scratch: Vec<u8>,
    /// Decrypted packets waiting for the TUN, each behind room for a virtio-net header.
    tun_bufs: Vec<Vec<u8>>,
    gro: GROTable,
    peers: Vec<Option<(Arc<Peer>, Kind)>>,
}

impl InBufs {
    fn new() -> Self {
        InBufs {
            rx: RecvBatch::new(UDP_BATCH, MAX_PACKET),
            scratch: vec![0u8; MAX_PACKET],
            // Grown on demand: a UDP_GRO batch can hold many more datagrams than messages
            // (at most 64 each).
            tun_bufs: Vec::new(),
            gro: GROTable::default(),
            peers: Vec::with_capacity(UDP_BATCH),
        }
    }
}

/// Batches served back to back while a descriptor keeps having data, before polling again.
const DRAIN_ROUNDS: usize = 8;

/// Serve one direction again while it says more may be waiting (it stopped for lack of room,
/// not because the descriptor was empty), at most `DRAIN_ROUNDS` times, before polling again.
fn drain(mut serve: impl FnMut() -> bool) {
    for _ in 0..DRAIN_ROUNDS {
        if !serve() {
            break;
        }
    }
}

fn set_nonblocking(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One peer: its noise state and what the UAPI reports about it.
pub struct Peer {
    pub public_key: [u8; 32],
    index: u32,
    tunn: Mutex<Tunn>,
    endpoint: Mutex<Option<SocketAddr>>,
    preshared_key: Mutex<Option<[u8; 32]>>,
    keepalive: AtomicU16,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    /// Engine-clock milliseconds of the last datagram sent to this peer (for keepalive).
    last_tx_ms: AtomicU64,
}

impl Peer {
    fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.lock()
    }
}

struct Keys {
    secret: StaticSecret,
    public: XPublic,
}

struct State {
    keys: Option<Keys>,
    fwmark: u32,
    peers: BTreeMap<[u8; 32], Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    routes: AllowedIps<PeerRef>,
    next_index: u32,
    limiters: Limiters,
}

/// boringtun's `RateLimiter` checks a handshake message's MACs and formats cookie replies, but
/// decides "under load" by its own packet count. The engine decides that itself (the
/// [`HandshakeGate`]) and picks one of two limiters keyed with our public key: `mac1` never
/// under load (MAC1 only; also given to every `Tunn`, whose `decapsulate` re-checks MAC1 and so
/// can never answer with a cookie of its own), `cookie` always under load (MAC1 and a valid
/// MAC2, or a cookie reply to send).
struct Limiters {
    mac1: Arc<RateLimiter>,
    cookie: Arc<RateLimiter>,
}

impl Limiters {
    fn new(public: &XPublic) -> Self {
        Limiters {
            mac1: Arc::new(RateLimiter::new(public, NEVER_UNDER_LOAD)),
            cookie: Arc::new(RateLimiter::new(public, ALWAYS_UNDER_LOAD)),
        }
    }
}

/// What the engine did with handshake messages (for logs, tests and the flood benchmark).
#[derive(Default)]
pub struct HandshakeStats {
    /// Cookie replies sent (under load, or to a source past its budget).
    pub cookies_sent: AtomicU64,
    /// Handshake messages dropped for a bad MAC1.
    pub bad_mac: AtomicU64,
    /// Handshake messages with valid MACs refused by the per-source limit.
    pub rate_limited: AtomicU64,
    /// Handshake messages with valid MACs refused because the device's handshake budget was
    /// spent (senders holding cookies for many addresses).
    pub busy: AtomicU64,
    /// Handshake messages passed on to the noise state (Diffie-Hellman work).
    pub processed: AtomicU64,
    /// Times a peer's endpoint moved (only ever on an authenticated packet).
    pub endpoint_moves: AtomicU64,
}

impl HandshakeStats {
    fn snapshot(&self) -> [u64; 6] {
        [
            self.cookies_sent.load(Ordering::Relaxed),
            self.bad_mac.load(Ordering::Relaxed),
            self.rate_limited.load(Ordering::Relaxed),
            self.busy.load(Ordering::Relaxed),
            self.processed.load(Ordering::Relaxed),
            self.endpoint_moves.load(Ordering::Relaxed),
        ]
    }
}

/// What kind of datagram a demultiplexed packet is (decides what may move an endpoint).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Initiation,
    Response,
    CookieReply,
    Data,
}

/// A peer compared by identity, for the routing table.
#[derive(Clone)]
struct PeerRef(Arc<Peer>);

impl PartialEq for PeerRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The running engine for one interface.
pub struct Device {
    pub name: String,
    ifindex: u32,
    tun: SyncDevice,
    offload: bool,
    udp_offload: bool,
    tun_lock: Mutex<()>,
    udp_lock: Mutex<()>,
    state: RwLock<State>,
    socket: RwLock<Arc<UdpSocket>>,
    epoch: Instant,
    stopping: AtomicBool,
    /// Counters of packets dropped by cryptokey routing (for tests and diagnostics).
    pub dropped_no_route: AtomicU64,
    pub dropped_bad_source: AtomicU64,
    /// Which handshake messages get Diffie-Hellman work. Used by the inbound path, which
    /// `udp_lock` serialises, and for a moment by the timer thread (load state, sweeps).
    gate: Mutex<HandshakeGate>,
    pub handshakes: HandshakeStats,
}

fn placeholder_keys() -> Keys {
    let secret = StaticSecret::from([0x42u8; 32]);
    let public = XPublic::from(&secret);
    Keys { secret, public }
}

impl Device {
    /// Create the TUN interface `name` and bind a UDP socket on a random port (until the UAPI
    /// sets `listen_port`). The interface is left down, as wireguard-go does.
    pub fn create(name: &str, opts: &EngineOptions) -> anyhow::Result<Arc<Device>> {
        use anyhow::Context;
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(name)
                .mtu(opts.mtu)
                .offload(offload)
                .enable(false)
                .build_sync()
        };
        let (tun, offload) = match build(opts.offload) {
            Ok(t) => (t, opts.offload),
            Err(e) if opts.offload => {
                tracing::warn!(error = %e, "TUN offloads refused; running without them");
                (
                    build(false).with_context(|| format!("creating TUN interface {name}"))?,
                    false,
                )
            }
            Err(e) => return Err(e).with_context(|| format!("creating TUN interface {name}")),
        };
        let ifindex = tun
            .if_index()
            .context("reading the new interface's index")?;
        let socket = UdpSocket::bind(0, 0, opts.udp_offload).context("binding the UDP socket")?;
        tracing::info!(tun_offload = offload, udp = ?socket.offloads(), "offloads");
        let limiters = Limiters::new(&placeholder_keys().public);
        Ok(Arc::new(Device {
            name: name.to_string(),
            ifindex,
            tun,
            offload,
            udp_offload: opts.udp_offload,
            tun_lock: Mutex::new(()),
            udp_lock: Mutex::new(()),
            state: RwLock::new(State {
                keys: None,
                fwmark: 0,
                peers: BTreeMap::new(),
                by_index: HashMap::new(),
                routes: AllowedIps::default(),
                next_index: rand_index(),
                limiters,
            }),
            socket: RwLock::new(Arc::new(socket)),
            epoch: Instant::now(),
            stopping: AtomicBool::new(false),
            dropped_no_route: AtomicU64::new(0),
            dropped_bad_source: AtomicU64::new(0),
            gate: Mutex::new(HandshakeGate::new(GateConfig::default(), Duration::ZERO)),
            handshakes: HandshakeStats::default(),
        }))
    }

    pub fn offload(&self) -> bool {
        self.offload
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.socket.read().shutdown();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Start the data-plane workers and the timer thread.
    pub fn start(self: &Arc<Self>) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
        set_nonblocking(std::os::fd::AsRawFd::as_raw_fd(&self.tun))?;
        let mut handles = Vec::new();
        for i in 0..DATA_WORKERS {
            let d = Arc::clone(self);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("data-{i}"))
                    .spawn(move || d.worker_loop())?,
            );
        }
        let d = Arc::clone(self);
        handles.push(
            std::thread::Builder::new()
                .name("timers".into())
                .spawn(move || d.timer_loop())?,
        );
        Ok(handles)
    }

    // ------------------------------------------------------------------ data plane

    /// A data-plane worker. Every worker waits on both the TUN and the UDP descriptor and
    /// serves whichever is ready; one lock per direction keeps each direction in order. The
    /// worker that writes a packet into the TUN finds the kernel's answer (an echo reply, an
    /// ACK) ready on its next poll and sends it on without sleeping in between.
    fn worker_loop(self: Arc<Self>) {
        let mut out = OutBufs::new(self.offload);
        let mut inb = InBufs::new();
        let tun_fd = std::os::fd::AsRawFd::as_raw_fd(&self.tun);
        while !self.is_stopping() {
            let sock = Arc::clone(&self.socket.read());
            let mut fds = [
                libc::pollfd {
                    fd: tun_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: sock.raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds; the socket is kept alive by `sock` during the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
            if r <= 0 {
                continue;
            }
            let tun_ready = fds[0].revents != 0;
            let udp_ready = fds[1].revents != 0;
            let mut served = false;
            if tun_ready {
                if let Some(_guard) = self.tun_lock.try_lock() {
                    drain(|| self.outbound_batch(&mut out));
                    served = true;
                }
            }
            if udp_ready {
                if let Some(_guard) = self.udp_lock.try_lock() {
                    drain(|| self.inbound_batch(&sock, &mut inb));
                    served = true;
                }
            }
            if !served {
                // The other worker holds what is ready: wait for it rather than spin.
                if tun_ready {
                    let _guard = self.tun_lock.lock();
                    drain(|| self.outbound_batch(&mut out));
                } else {
                    let _guard = self.udp_lock.lock();
                    drain(|| self.inbound_batch(&sock, &mut inb));
                }
            }
        }
    }

    /// Read what the TUN has (a TSO super-packet is split into segments), route, encrypt and
    /// send it in one `sendmmsg`. Returns whether more may be waiting.
    fn outbound_batch(&self, b: &mut OutBufs) -> bool {
        // Read until the TUN is empty or too little room is left for one more read (a TSO
        // super-packet splits into up to IDEAL_BATCH_SIZE segments): packets that come one
        // per read (UDP, or no offloads) still leave in one `sendmmsg`.
        let mut n = 0;
        let mut more = false;
        loop {
            match self
                .tun
                .recv_multiple(&mut b.original, &mut b.bufs[n..], &mut b.sizes[n..], 0)
            {
                Ok(k) => {
                    n += k;
                    if k == 0 {
                        break;
                    }
                    if b.bufs.len() - n < IDEAL_BATCH_SIZE {
                        more = true;
                        break;
                    }
                }
                Err(e) => {
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                        Some(libc::EBADFD) | Some(libc::EIO) | Some(libc::ENODEV) => {
                            tracing::info!(error = %e, "TUN interface is gone; stopping");
                            self.stop();
                        }
                        _ => tracing::debug!(error = %e, "TUN read failed"),
                    }
                    break;
                }
            }
        }
        if n == 0 {
            return false;
        }
        b.targets.clear();
        {
            let st = self.state.read();
            if st.keys.is_none() {
                return more;
            }
            for i in 0..n {
                let pkt = &b.bufs[i][..b.sizes[i]];
                let peer = Tunn::dst_address(pkt)
                    .and_then(|dst| st.routes.lookup(dst))
                    .map(|p| Arc::clone(&p.0));
                if peer.is_none() {
                    self.dropped_no_route.fetch_add(1, Ordering::Relaxed);
                }
                b.targets.push(peer);
            }
        }
        let now_ms = self.now_ms();
        let mut i = 0;
        while i < n {
            let Some(peer) = b.targets[i].clone() else {
                i += 1;
                continue;
            };
            let endpoint = peer.endpoint();
            let mut tunn = peer.tunn.lock();
            // Encrypt this peer's consecutive packets under one lock.
            while i < n && b.targets[i].as_ref().is_some_and(|p| Arc::ptr_eq(p, &peer)) {
                if b.out.is_full() {
                    drop(tunn);
                    self.flush(&mut b.out);
                    tunn = peer.tunn.lock();
                }
                let pkt = &b.bufs[i][..b.sizes[i]];
                match tunn.encapsulate(pkt, b.out.next_buf()) {
                    TunnResult::WriteToNetwork(d) => {
                        let len = d.len();
                        if let Some(ep) = endpoint {
                            peer.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                            peer.last_tx_ms.store(now_ms, Ordering::Relaxed);
                            b.out.commit(len, ep);
                        }
                    }
                    TunnResult::Err(e) => tracing::trace!(error = ?e, "encapsulate failed"),
                    _ => {}
                }
                i += 1;
            }
        }
        self.flush(&mut b.out);
        more
    }

    fn flush(&self, out: &mut SendBatch) {
        if out.len > 0 {
            let sock = Arc::clone(&self.socket.read());
            sock.send_batch(out);
        }
    }

    /// Receive a batch of datagrams, decrypt, check the inner source, and write the packets
    /// to the TUN (GRO-coalesced where offloads are on).
    ///
    /// A peer's endpoint moves only on a packet that proves it came from the peer: a transport
    /// packet (data or keepalive) that decrypted under a session key, or a handshake response
    /// that completed our own initiation. Both are bound to keys only the peer holds and to
    /// fresh state of ours (a session counter window, our ephemeral key), so neither can be
    /// forged or replayed from elsewhere. A handshake *initiation* is answered at its source
    /// but moves nothing: its only freshness is the TAI64N timestamp remembered in the noise
    /// state, and that memory is lost whenever the state is rebuilt (a new preshared key, the
    /// peer removed and added again, an engine restart), after which a captured initiation
    /// replays cleanly. The initiator's first transport packet, which the protocol makes it
    /// send before the responder may send anything, moves the endpoint one round trip later.
    /// Cookie replies (encrypted under a key derived from a public key) never move anything.
    ///
    /// Returns whether more may be waiting (the batch was full).
    fn inbound_batch(&self, sock: &Arc<UdpSocket>, b: &mut InBufs) -> bool {
        let n = match sock.recv_batch(&mut b.rx) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                return false;
            }
        };
        if n == 0 {
            return false;
        }
        let offset = if self.offload { VIRTIO_NET_HDR_LEN } else { 0 };
        let now = self.epoch.elapsed();
        b.peers.clear();
        {
            let st = self.state.read();
            let mut gate = self.gate.lock();
            let mut handshakes = 0;
            for &d in &b.rx.datagrams {
                b.peers.push(self.demux(
                    &st,
                    &mut gate,
                    now,
                    sock,
                    b.rx.datagram(d),
                    b.rx.addrs[d.msg],
                    &mut b.scratch,
                    &mut handshakes,
                ));
            }
            gate.note_backlog(now, n, UDP_BATCH, handshakes);
        }
        let mut ready = 0;
        for (i, slot) in b.peers.iter_mut().enumerate() {
            let Some((peer, kind)) = slot.take() else {
                continue;
            };
            let d = b.rx.datagrams[i];
            let from = b.rx.addrs[d.msg];
            let datagram = b.rx.datagram(d);
            let mut tunn = peer.tunn.lock();
            // The noise state accepted the packet.
            let mut accepted = false;
            // The packet proves it came from the peer (see above): it may move the endpoint.
            let mut authenticated = false;
            let handshake = matches!(kind, Kind::Initiation | Kind::Response);
            let started = handshake.then(Instant::now);
            // Data decrypts straight into the next TUN buffer, behind room for the virtio-net
            // header; anything else (a handshake reply) goes to the scratch buffer.
            if b.tun_bufs.len() <= ready {
                // Full capacity: the TUN's GRO coalesces a flow's packets into its first
                // buffer only where that buffer has room for a whole super-packet. Pages no
                // packet touches stay unallocated.
                b.tun_bufs
                    .push(Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + MAX_PACKET));
            }
            let dst: &mut [u8] = if kind == Kind::Data {
                let buf = &mut b.tun_bufs[ready];
                buf.resize(offset + datagram.len().max(148), 0);
                &mut buf[offset..]
            } else {
                &mut b.scratch
            };
            let result = tunn.decapsulate(Some(from.ip()), datagram, dst);
            if let Some(t) = started {
                // Handshake work counts against the device's time budget.
                self.gate.lock().charge_work(now, t.elapsed());
            }
            let packet = match result {
                TunnResult::WriteToNetwork(reply) => {
                    // Our response to an initiation, or the keepalive that confirms a
                    // handshake our initiation started (the `Tunn`'s limiter never answers with
                    // a cookie: the gate did that already).
                    accepted = true;
                    authenticated = kind == Kind::Response;
                    let _ = sock.send_to(reply, from);
                    peer.tx_bytes
                        .fetch_add(reply.len() as u64, Ordering::Relaxed);
                    // Packets queued while the handshake was pending go where the peer is: the
                    // source of a completed handshake, else the endpoint we already trust.
                    let target = if authenticated {
                        Some(from)
                    } else {
                        peer.endpoint().or(Some(from))
                    };
                    while let TunnResult::WriteToNetwork(p) =
                        tunn.decapsulate(None, &[], &mut b.scratch)
                    {
                        if let Some(to) = target {
                            let _ = sock.send_to(p, to);
                            peer.tx_bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
                        }
                    }
                    peer.last_tx_ms.store(self.now_ms(), Ordering::Relaxed);
                    None
                }
                TunnResult::WriteToTunnelV4(p, src) => Some((p.len(), IpAddr::V4(src))),
                TunnResult::WriteToTunnelV6(p, src) => Some((p.len(), IpAddr::V6(src))),
                TunnResult::Done => {
                    // A keepalive, or a cookie reply stored for our next initiation.
                    accepted = true;
                    authenticated = kind == Kind::Data;
                    None
                }
                TunnResult::Err(e) => {
                    tracing::trace!(error = ?e, %from, ?kind, "decapsulate failed");
                    None
                }
            };
            if packet.is_some() {
                // A data packet on a session we answered confirms that session: what we queued
                // for the peer while the handshake was pending goes out now (boringtun sends
                // its queue only when asked), not whenever our next handshake event comes.
                while let TunnResult::WriteToNetwork(p) =
                    tunn.decapsulate(None, &[], &mut b.scratch)
                {
                    let _ = sock.send_to(p, from);
                    peer.tx_bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
                }
            }
            // Before the source check: it reads the device state, and `set` takes the state
            // before each peer's noise lock, so holding both the other way round deadlocks
            // (seen: a key change under traffic wedged the engine for good).
            drop(tunn);
            if let Some((len, src)) = packet {
                // Decrypted under a session key: authentic, whatever its inner source.
                accepted = true;
                authenticated = kind == Kind::Data;
                if self.source_allowed(&peer, src) {
                    // The packet is in place: the TUN buffer keeps it (and a zeroed header).
                    let buf = &mut b.tun_bufs[ready];
                    buf.truncate(offset + len);
                    buf[..offset].fill(0);
                    ready += 1;
                }
            }
            if accepted {
                peer.rx_bytes
                    .fetch_add(datagram.len() as u64, Ordering::Relaxed);
            }
            if authenticated {
                // Roaming: the endpoint follows authenticated packets.
                let mut ep = peer.endpoint.lock();
                if *ep != Some(from) {
                    let old = ep.replace(from);
                    drop(ep);
                    self.handshakes
                        .endpoint_moves
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(peer_index = peer.index, from = ?old, to = %from, ?kind,
                        "peer endpoint moved on an authenticated packet");
                }
            }
            if ready == TUN_FLUSH {
                // A UDP_GRO batch can hold thousands of packets: hand them on in chunks so
                // the first are not held back (TCP's loss probes fire on a few ms of delay).
                self.write_tun(&mut b.gro, &mut b.tun_bufs[..ready], offset);
                ready = 0;
            }
        }
        self.write_tun(&mut b.gro, &mut b.tun_bufs[..ready], offset);
        // A full batch: more may be waiting.
        n == UDP_BATCH
    }

    /// Write decrypted packets to the TUN (GRO-coalesced where offloads are on).
    fn write_tun(&self, gro: &mut GROTable, bufs: &mut [Vec<u8>], offset: usize) {
        if bufs.is_empty() {
            return;
        }
        if let Err(e) = self.tun.send_multiple(gro, bufs, offset) {
            tracing::debug!(error = %e, "TUN write failed");
        }
    }

    /// Find the peer a datagram belongs to. Handshake messages first pass the gate: MAC1 is
    /// checked, the message counts towards the load, and under load (or past its source's
    /// anonymous budget) it must carry a valid cookie or gets a cookie reply and nothing more;
    /// then the per-source limit. Only then does an initiation cost a Diffie-Hellman (to learn
    /// the sender's static key, by which it is matched); everything else is matched by
    /// receiver index.
    #[allow(clippy::too_many_arguments)]
    fn demux(
        &self,
        st: &State,
        gate: &mut HandshakeGate,
        now: Duration,
        sock: &UdpSocket,
        datagram: &[u8],
        from: SocketAddr,
        scratch: &mut [u8],
        handshakes: &mut usize,
    ) -> Option<(Arc<Peer>, Kind)> {
        let keys = st.keys.as_ref()?;
        let by_index =
            |idx: u32, kind: Kind| st.by_index.get(&(idx >> 8)).cloned().map(|p| (p, kind));
        match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(_)) | Ok(Packet::HandshakeResponse(_)) => {
                let ip = from.ip();
                let need_cookie = gate.cookie_required(ip, now);
                let limiter = if need_cookie {
                    &st.limiters.cookie
                } else {
                    &st.limiters.mac1
                };
                let packet = match limiter.verify_packet(Some(ip), datagram, scratch) {
                    Ok(p) => p,
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        *handshakes += 1;
                        gate.note_handshake(now);
                        let _ = sock.send_to(cookie, from);
                        self.handshakes.cookies_sent.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    Err(_) => {
                        self.handshakes.bad_mac.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                };
                *handshakes += 1;
                gate.note_handshake(now);
                match gate.admit(ip, now, need_cookie) {
                    Admit::Process => {}
                    Admit::RateLimited => {
                        self.handshakes.rate_limited.fetch_add(1, Ordering::Relaxed);
                        tracing::trace!(%from, "handshake refused: source over its limit");
                        return None;
                    }
                    Admit::Busy => {
                        self.handshakes.busy.fetch_add(1, Ordering::Relaxed);
                        tracing::trace!(%from, "handshake refused: device handshake budget spent");
                        return None;
                    }
                }
                self.handshakes.processed.fetch_add(1, Ordering::Relaxed);
                match packet {
                    Packet::HandshakeInit(init) => {
                        let started = Instant::now();
                        let half = parse_handshake_anon(&keys.secret, &keys.public, &init);
                        gate.charge_work(now, started.elapsed());
                        let half = half.ok()?;
                        st.peers
                            .get(&half.peer_static_public)
                            .cloned()
                            .map(|p| (p, Kind::Initiation))
                    }
                    Packet::HandshakeResponse(p) => by_index(p.receiver_idx, Kind::Response),
                    _ => None,
                }
            }
            Ok(Packet::PacketCookieReply(p)) => by_index(p.receiver_idx, Kind::CookieReply),
            Ok(Packet::PacketData(p)) => by_index(p.receiver_idx, Kind::Data),
            Err(_) => None,
        }
    }

    /// Cryptokey routing on the way in: the inner source must route back to the same peer.
    fn source_allowed(&self, peer: &Arc<Peer>, src: IpAddr) -> bool {
        let ok = self
            .state
            .read()
            .routes
            .lookup(src)
            .is_some_and(|p| Arc::ptr_eq(&p.0, peer));
        if !ok {
            self.dropped_bad_source.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%src, "dropped a packet whose inner source is not in the peer's allowed IPs");
        }
        ok
    }

    // ------------------------------------------------------------------ timers

    fn timer_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_PACKET];
        let mut last_iface_check = Instant::now();
        let mut last_report = Instant::now();
        let mut reported = self.handshakes.snapshot();
        let mut was_under_load = false;
        while !self.is_stopping() {
            std::thread::sleep(Duration::from_millis(250));
            let under_load = self.gate.lock().under_load(self.epoch.elapsed());
            if under_load != was_under_load {
                was_under_load = under_load;
                if under_load {
                    tracing::warn!("under load: handshake messages now need a cookie");
                } else {
                    tracing::info!("no longer under load");
                }
            }
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = Instant::now();
                self.gate.lock().sweep(self.epoch.elapsed());
                let now = self.handshakes.snapshot();
                if now != reported {
                    reported = now;
                    let [cookies_sent, bad_mac, rate_limited, busy, processed, endpoint_moves] =
                        now;
                    tracing::info!(
                        cookies_sent,
                        bad_mac,
                        rate_limited,
                        busy,
                        processed,
                        endpoint_moves,
                        "handshake gate totals"
                    );
                }
            }
            if last_iface_check.elapsed() >= Duration::from_secs(1) {
                last_iface_check = Instant::now();
                if !interface_exists(&self.name, self.ifindex) {
                    tracing::info!(interface = %self.name, "interface was deleted; stopping");
                    self.stop();
                    return;
                }
            }
            let peers: Vec<Arc<Peer>> = {
                let st = self.state.read();
                if st.keys.is_none() {
                    continue;
                }
                st.peers.values().cloned().collect()
            };
            let sock = Arc::clone(&self.socket.read());
            let now_ms = self.now_ms();
            for peer in peers {
                let endpoint = peer.endpoint();
                let mut tunn = peer.tunn.lock();
                let mut sent = false;
                match tunn.update_timers(&mut buf) {
                    TunnResult::WriteToNetwork(p) => {
                        if let Some(ep) = endpoint {
                            let _ = sock.send_to(p, ep);
                            peer.tx_bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
                            sent = true;
                        }
                    }
                    TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                    TunnResult::Err(e) => tracing::trace!(error = ?e, "timer error"),
                    _ => {}
                }
                // Persistent keepalive, kept here so it can change without resetting the session.
                let ka = u64::from(peer.keepalive.load(Ordering::Relaxed));
                if !sent && ka > 0 {
                    if let Some(ep) = endpoint {
                        let last = peer.last_tx_ms.load(Ordering::Relaxed);
                        if last == 0 || now_ms.saturating_sub(last) >= ka * 1000 {
                            if let TunnResult::WriteToNetwork(p) = tunn.encapsulate(&[], &mut buf) {
                                let _ = sock.send_to(p, ep);
                                peer.tx_bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
                            }
                            sent = true;
                        }
                    }
                }
                if sent {
                    peer.last_tx_ms.store(now_ms.max(1), Ordering::Relaxed);
                }
            }
        }
    }

    // ------------------------------------------------------------------ configuration

    /// The UAPI `get=1` view.
    pub fn get(&self) -> GetDevice {
        let st = self.state.read();
        let now = SystemTime::now();
        let peers = st
            .peers
            .values()
            .map(|p| {
                let since = p.tunn.lock().time_since_last_handshake();
                let (sec, nsec) = match since.and_then(|d| now.checked_sub(d)) {
                    Some(t) => {
                        let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                        (d.as_secs(), d.subsec_nanos())
                    }
                    None => (0, 0),
                };
                GetPeer {
                    public_key: p.public_key,
                    preshared_key: *p.preshared_key.lock(),
                    endpoint: p.endpoint(),
                    persistent_keepalive_interval: p.keepalive.load(Ordering::Relaxed),
                    allowed_ips: st.routes.prefixes_of(&PeerRef(Arc::clone(p))),
                    last_handshake_time_sec: sec,
                    last_handshake_time_nsec: nsec,
                    rx_bytes: p.rx_bytes.load(Ordering::Relaxed),
                    tx_bytes: p.tx_bytes.load(Ordering::Relaxed),
                    protocol_version: 1,
                }
            })
            .collect();
        GetDevice {
            private_key: st.keys.as_ref().map(|k| k.secret.to_bytes()),
            listen_port: self.socket.read().port(),
            fwmark: (st.fwmark != 0).then_some(st.fwmark),
            peers,
        }
    }

    /// Apply a UAPI `set=1` request. Values were validated by the parser; what remains can
    /// fail is binding the port.
    pub fn set(&self, set: SetDevice) -> Result<(), UapiError> {
        let mut st = self.state.write();
        if let Some(key) = set.private_key {
            if key == [0u8; 32] {
                st.keys = None;
            } else {
                let secret = StaticSecret::from(key);
                let public = XPublic::from(&secret);
                st.limiters = Limiters::new(&public);
                // A peer with our own public key is removed, as the kernel does.
                if let Some(p) = st.peers.get(public.as_bytes()).cloned() {
                    remove_peer(&mut st, &p);
                }
                for p in st.peers.values() {
                    p.tunn.lock().set_static_private(
                        secret.clone(),
                        public,
                        Some(Arc::clone(&st.limiters.mac1)),
                    );
                }
                st.keys = Some(Keys { secret, public });
            }
        }
        if let Some(fwmark) = set.fwmark {
            st.fwmark = fwmark;
            let _ = self.socket.read().set_fwmark(fwmark);
        }
        if let Some(port) = set.listen_port {
            let current = self.socket.read().port();
            if port == 0 || port != current {
                let sock = UdpSocket::bind(port, st.fwmark, self.udp_offload).map_err(|e| {
                    tracing::warn!(port, error = %e, "cannot bind listen port");
                    UapiError::Errno(libc::EADDRINUSE)
                })?;
                let old = std::mem::replace(&mut *self.socket.write(), Arc::new(sock));
                old.shutdown();
            }
        }
        if set.replace_peers {
            for p in st.peers.values().cloned().collect::<Vec<_>>() {
                remove_peer(&mut st, &p);
            }
        }
        for peer in set.peers {
            self.set_peer(&mut st, peer);
        }
        Ok(())
    }

    fn set_peer(&self, st: &mut State, sp: SetPeer) {
        if let Some(keys) = &st.keys {
            if keys.public.as_bytes() == &sp.public_key {
                return; // our own key: ignored, as the kernel does
            }
        }
        let existing = st.peers.get(&sp.public_key).cloned();
        if sp.remove {
            if let Some(p) = existing {
                remove_peer(st, &p);
            }
            return;
        }
        if existing.is_none() && sp.update_only {
            return;
        }
        let psk_change = sp
            .preshared_key
            .map(|k| if k == [0u8; 32] { None } else { Some(k) });
        let peer = match existing {
            Some(p) if psk_change.is_none_or(|k| k == *p.preshared_key.lock()) => p,
            Some(old) => {
                // A new preshared key needs a new noise state: same index, same counters.
                let psk = psk_change.flatten();
                let fresh = Arc::new(Peer {
                    public_key: old.public_key,
                    index: old.index,
                    tunn: Mutex::new(new_tunn(st, old.public_key, psk, old.index)),
                    endpoint: Mutex::new(old.endpoint()),
                    preshared_key: Mutex::new(psk),
                    keepalive: AtomicU16::new(old.keepalive.load(Ordering::Relaxed)),
                    rx_bytes: AtomicU64::new(old.rx_bytes.load(Ordering::Relaxed)),
                    tx_bytes: AtomicU64::new(old.tx_bytes.load(Ordering::Relaxed)),
                    last_tx_ms: AtomicU64::new(0),
                });
                let prefixes = st.routes.prefixes_of(&PeerRef(Arc::clone(&old)));
                remove_peer(st, &old);
                insert_peer(st, &fresh);
                for net in prefixes {
                    st.routes.insert(net, PeerRef(Arc::clone(&fresh)));
                }
                fresh
            }
            None => {
                let index = alloc_index(st);
                let psk = psk_change.flatten();
                let p = Arc::new(Peer {
                    public_key: sp.public_key,
                    index,
                    tunn: Mutex::new(new_tunn(st, sp.public_key, psk, index)),
                    endpoint: Mutex::new(None),
                    preshared_key: Mutex::new(psk),
                    keepalive: AtomicU16::new(0),
                    rx_bytes: AtomicU64::new(0),
                    tx_bytes: AtomicU64::new(0),
                    last_tx_ms: AtomicU64::new(0),
                });
                insert_peer(st, &p);
                p
            }
        };
        if let Some(ep) = sp.endpoint {
            *peer.endpoint.lock() = Some(canonical(ep));
        }
        if let Some(ka) = sp.persistent_keepalive_interval {
            peer.keepalive.store(ka, Ordering::Relaxed);
            // Send the first keepalive right away, as the kernel does.
            peer.last_tx_ms.store(0, Ordering::Relaxed);
        }
        if sp.replace_allowed_ips {
            st.routes.remove_value(&PeerRef(Arc::clone(&peer)));
        }
        for net in sp.allowed_ips {
            st.routes.insert(net, PeerRef(Arc::clone(&peer)));
        }
    }
}

fn new_tunn(st: &State, peer_public: [u8; 32], psk: Option<[u8; 32]>, index: u32) -> Tunn {
    let keys = st
        .keys
        .as_ref()
        .map(|k| (k.secret.clone(), k.public))
        .unwrap_or_else(|| {
            let k = placeholder_keys();
            (k.secret, k.public)
        });
    let _ = keys.1;
    Tunn::new(
        keys.0,
        XPublic::from(peer_public),
        psk,
        None,
        index,
        Some(Arc::clone(&st.limiters.mac1)),
    )
}

fn insert_peer(st: &mut State, p: &Arc<Peer>) {
    st.peers.insert(p.public_key, Arc::clone(p));
    st.by_index.insert(p.index, Arc::clone(p));
}

fn remove_peer(st: &mut State, p: &Arc<Peer>) {
    st.routes.remove_value(&PeerRef(Arc::clone(p)));
    st.peers.remove(&p.public_key);
    st.by_index.remove(&p.index);
}

fn rand_index() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom_fill(&mut b);
    u32::from_le_bytes(b) & 0x00ff_ffff
}

fn getrandom_fill(b: &mut [u8]) -> Result<(), rand_core::Error> {
    use rand_core::RngCore;
    rand_core::OsRng.try_fill_bytes(b)
}

fn alloc_index(st: &mut State) -> u32 {
    loop {
        let i = st.next_index & 0x00ff_ffff;
        st.next_index = st.next_index.wrapping_add(1);
        if !st.by_index.contains_key(&i) {
            return i;
        }
    }
}

/// Whether the interface still exists with the index we created (in our network namespace).
pub fn interface_exists(name: &str, ifindex: u32) -> bool {
    match nix::net::if_::if_nametoindex(name) {
        Ok(i) => i == ifindex,
        Err(_) => false,
    }
}

/// Parse helper for tests and callers that need an `IpNet` list.
pub fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().filter_map(|s| s.parse().ok()).collect()
}
