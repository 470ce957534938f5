//! The engine's UDP socket: dual-stack (one IPv6 socket that also carries IPv4 as mapped
//! addresses, IPv4-only where IPv6 is disabled), large buffers, and batched I/O with
//! `recvmmsg`/`sendmmsg` so that one system call moves many datagrams.
//!
//! Where the kernel allows, the socket also uses UDP segmentation offloads: consecutive
//! datagrams of one size to one address leave as one message with `UDP_SEGMENT` (the kernel,
//! or the NIC, cuts it into datagrams), and with `UDP_GRO` one received message can carry many
//! datagrams of one flow, cut here by the segment size the kernel reports. Either is dropped
//! cleanly where refused: `UDP_GRO` when the option is not accepted, `UDP_SEGMENT` when the
//! kernel does not know it or a send with it fails with `EIO` or `EINVAL` (no checksum offload
//! on the route, segments above its MTU). A refused message is resent datagram by datagram.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Socket buffer size asked for (SO_RCVBUFFORCE/SO_SNDBUFFORCE as root, else capped by sysctl).
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// `SOL_UDP` options (linux/udp.h); not in every libc target.
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Most datagrams in one `UDP_SEGMENT` send (the kernel's `UDP_MAX_SEGMENTS` is 64 on older
/// kernels, 128 on newer ones).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one `UDP_SEGMENT` send: an IP packet's 64 KiB less the IPv6 and UDP
/// headers.
const GSO_MAX_BYTES: usize = 65535 - 40 - 8;
/// Control space for one `UDP_SEGMENT` (u16) or `UDP_GRO` (int) message: CMSG_SPACE(4).
const CONTROL_WORDS: usize = 4;

/// A bound UDP socket.
#[derive(Debug)]
pub struct UdpSocket {
    fd: OwnedFd,
    v6: bool,
    port: u16,
    /// Send with `UDP_SEGMENT` (cleared for good when a send with it fails with `EIO`).
    gso: AtomicBool,
    /// `UDP_GRO` is on: a received message may hold many datagrams.
    gro: bool,
}

/// What the socket's offloads are doing (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    pub gso: bool,
    pub gro: bool,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: fd is a valid socket; the option value is a c_int that lives for the call.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

impl UdpSocket {
    /// Bind `port` (0 = any) on all addresses, dual-stack when the host has IPv6. With
    /// `offload`, turn on `UDP_SEGMENT` sends and `UDP_GRO` receives where the kernel has them.
    pub fn bind(port: u16, fwmark: u32, offload: bool) -> io::Result<UdpSocket> {
        let mut s = match Self::bind_family(port, true, fwmark) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                Self::bind_family(port, false, fwmark)?
            }
            Err(e) => return Err(e),
        };
        if offload {
            let raw = s.fd.as_raw_fd();
            // The kernel knows UDP_SEGMENT if it can read it back (0: no default size).
            let mut v: libc::c_int = 0;
            let mut len = size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: valid fd; v and len live for the call and len is v's size.
            let gso = unsafe {
                libc::getsockopt(
                    raw,
                    SOL_UDP,
                    UDP_SEGMENT,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            } == 0;
            s.gso.store(gso, Ordering::Relaxed);
            s.gro = setsockopt_int(raw, SOL_UDP, UDP_GRO, 1).is_ok();
            if !gso || !s.gro {
                tracing::info!(
                    gso,
                    gro = s.gro,
                    "UDP offloads partly refused by the kernel"
                );
            }
        }
        Ok(s)
    }

    /// Which UDP offloads the socket uses now.
    pub fn offloads(&self) -> Offloads {
        Offloads {
            gso: self.gso.load(Ordering::Relaxed),
            gro: self.gro,
        }
    }

    fn bind_family(port: u16, v6: bool, fwmark: u32) -> io::Result<UdpSocket> {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: plain socket(2) call.
        let raw = cvt(unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: raw is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if v6 {
            setsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
        }
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if setsockopt_int(raw, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
                let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
            }
        }
        if fwmark != 0 {
            setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_MARK, fwmark as libc::c_int)?;
        }
        // A receive timeout lets the reader notice a socket swap without any other wake-up.
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: valid fd, valid timeval for the duration of the call.
        cvt(unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        let bind_addr = if v6 {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
        } else {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
        };
        let (sa, len) = to_sockaddr(bind_addr, v6);
        // SAFETY: sa is a properly initialised sockaddr of length len.
        cvt(unsafe { libc::bind(raw, (&sa as *const libc::sockaddr_storage).cast(), len) })?;
        let port = local_port(raw)?;
        Ok(UdpSocket {
            fd,
            v6,
            port,
            gso: AtomicBool::new(false),
            gro: false,
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        setsockopt_int(
            self.fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            mark as libc::c_int,
        )
    }

    /// Wake a reader blocked on this socket (used when the socket is replaced).
    pub fn shutdown(&self) {
        // SAFETY: valid fd.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Send one datagram.
    pub fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        let (sa, len) = to_sockaddr(to, self.v6);
        // SAFETY: buf and sa are valid for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&sa as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Send a batch of datagrams with as few system calls as possible: consecutive datagrams
    /// of one size to one address (the last may be shorter) go as one `UDP_SEGMENT` message
    /// where the socket has it, and all messages go in `sendmmsg` calls. Datagrams the kernel
    /// refuses are dropped (like a lossy link); returns how many datagrams were handed over.
    pub fn send_batch(&self, batch: &mut SendBatch) -> usize {
        let n = batch.len;
        if n == 0 {
            return 0;
        }
        let gso = self.gso.load(Ordering::Relaxed);
        for i in 0..n {
            batch.iovs[i] = libc::iovec {
                iov_base: batch.bufs[i].as_mut_ptr().cast(),
                iov_len: batch.lens[i],
            };
        }
        batch.msgs.clear();
        let mut i = 0;
        while i < n {
            let start = i;
            let seg = batch.lens[i];
            let mut total = seg;
            i += 1;
            if gso {
                while i < n
                    && i - start < GSO_MAX_SEGMENTS
                    && batch.addrs[i] == batch.addrs[start]
                    && batch.lens[i] <= seg
                    && batch.lens[i] > 0
                    && total + batch.lens[i] <= GSO_MAX_BYTES
                {
                    total += batch.lens[i];
                    i += 1;
                    if batch.lens[i - 1] < seg {
                        break; // a shorter datagram ends a message
                    }
                }
            }
            batch.msgs.push((start, i - start));
        }
        let m = batch.msgs.len();
        for (k, &(start, count)) in batch.msgs.iter().enumerate() {
            let (sa, len) = to_sockaddr(batch.addrs[start], self.v6);
            batch.names[k] = sa;
            // SAFETY: zeroed mmsghdr is a valid "empty" header.
            batch.hdrs[k] = unsafe { zeroed() };
            let h = &mut batch.hdrs[k].msg_hdr;
            h.msg_name = (&mut batch.names[k] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = len;
            h.msg_iov = &mut batch.iovs[start];
            h.msg_iovlen = count;
            if count > 1 {
                // u16::try_from cannot fail: a segment is at most GSO_MAX_BYTES long.
                let seg = u16::try_from(batch.lens[start]).unwrap_or(u16::MAX);
                set_control(h, &mut batch.ctrl[k], UDP_SEGMENT, &seg.to_ne_bytes());
            }
        }
        let mut sent = 0;
        while sent < m {
            // SAFETY: hdrs[sent..m] point at names, iovecs, control data and buffers owned by
            // `batch` that stay alive and unaliased for the duration of the call.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    batch.hdrs[sent..].as_mut_ptr(),
                    (m - sent) as libc::c_uint,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                let (start, count) = batch.msgs[sent];
                if count > 1 {
                    if matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) {
                        // Segmentation cannot work here (no checksum offload on the route,
                        // UDP checksums off, segments above the route's MTU): stop trying.
                        self.gso.store(false, Ordering::Relaxed);
                        tracing::info!(error = %e, "UDP_SEGMENT refused; sending datagram by datagram");
                    }
                    for j in start..start + count {
                        let _ = self.send_to(&batch.bufs[j][..batch.lens[j]], batch.addrs[j]);
                    }
                }
                // Skip the message that failed (unreachable, bad address) and go on.
                sent += 1;
                continue;
            }
            sent += r as usize;
        }
        batch.len = 0;
        n
    }

    /// Receive up to `batch.capacity()` messages without blocking; `batch.datagrams` then lists
    /// every datagram (a `UDP_GRO` message holds several). Returns the number of messages
    /// received (0 if none were waiting).
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        let cap = batch.bufs.len();
        batch.datagrams.clear();
        for i in 0..cap {
            batch.iovs[i] = libc::iovec {
                iov_base: batch.bufs[i].as_mut_ptr().cast(),
                iov_len: batch.bufs[i].len(),
            };
            // SAFETY: zeroed mmsghdr is a valid "empty" header.
            batch.hdrs[i] = unsafe { zeroed() };
            let h = &mut batch.hdrs[i].msg_hdr;
            h.msg_name = (&mut batch.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut batch.iovs[i];
            h.msg_iovlen = 1;
            if self.gro {
                h.msg_control = batch.ctrl[i].as_mut_ptr().cast();
                h.msg_controllen = size_of::<[u64; CONTROL_WORDS]>();
            }
        }
        // SAFETY: every header points at buffers owned by `batch`, alive for the call.
        let r = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                batch.hdrs.as_mut_ptr(),
                cap as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let n = r as usize;
        for i in 0..n {
            let len = batch.hdrs[i].msg_len as usize;
            batch.lens[i] = len;
            batch.addrs[i] =
                from_sockaddr(&batch.names[i]).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
            if batch.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                continue; // larger than any datagram we take: dropped
            }
            let seg = if self.gro {
                gro_segment(&batch.hdrs[i].msg_hdr).unwrap_or(len)
            } else {
                len
            };
            if seg == 0 || len == 0 {
                batch.datagrams.push(Datagram {
                    msg: i,
                    start: 0,
                    len,
                });
                continue;
            }
            let mut off = 0;
            while off < len {
                let l = seg.min(len - off);
                batch.datagrams.push(Datagram {
                    msg: i,
                    start: off,
                    len: l,
                });
                off += l;
            }
        }
        Ok(n)
    }
}

/// Put one `SOL_UDP` control message (`kind`, `data`) into `ctrl` and point `h` at it.
fn set_control(
    h: &mut libc::msghdr,
    ctrl: &mut [u64; CONTROL_WORDS],
    kind: libc::c_int,
    data: &[u8],
) {
    h.msg_control = ctrl.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    h.msg_controllen = unsafe { libc::CMSG_SPACE(data.len() as u32) } as usize;
    // SAFETY: msg_control points at `ctrl` (32 bytes, 8-aligned), which holds one header and
    // `data` (at most 4 bytes) as CMSG_SPACE says; CMSG_FIRSTHDR is non-null for that length.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(h);
        (*c).cmsg_level = SOL_UDP;
        (*c).cmsg_type = kind;
        (*c).cmsg_len = libc::CMSG_LEN(data.len() as u32) as usize;
        std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(c), data.len());
    }
}

/// The segment size of a `UDP_GRO` message, if the kernel coalesced several datagrams.
fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    if h.msg_controllen == 0 {
        return None;
    }
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of control messages;
    // the CMSG_* walkers stay inside that length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP
                && (*c).cmsg_type == UDP_GRO
                && (*c).cmsg_len as usize
                    >= libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as usize
            {
                let v: libc::c_int = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                return usize::try_from(v).ok().filter(|&v| v > 0);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// One received datagram: `len` bytes at `start` in message `msg`'s buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    pub msg: usize,
    pub start: usize,
    pub len: usize,
}

/// Reusable buffers for `send_batch`.
pub struct SendBatch {
    pub bufs: Vec<Vec<u8>>,
    pub lens: Vec<usize>,
    pub addrs: Vec<SocketAddr>,
    pub len: usize,
    /// Messages of the current send: (first datagram, datagram count).
    msgs: Vec<(usize, usize)>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    ctrl: Vec<[u64; CONTROL_WORDS]>,
}

// SAFETY: the raw pointers inside are only scratch space rebuilt before every call.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new(count: usize, buf_size: usize) -> Self {
        // SAFETY: all-zero sockaddr_storage/iovec/mmsghdr are valid values.
        let (name, iov, hdr) = unsafe { (zeroed(), zeroed(), zeroed()) };
        SendBatch {
            bufs: vec![vec![0u8; buf_size]; count],
            lens: vec![0; count],
            addrs: vec![SocketAddr::from(([0, 0, 0, 0], 0)); count],
            len: 0,
            msgs: Vec::with_capacity(count),
            names: vec![name; count],
            iovs: vec![iov; count],
            hdrs: vec![hdr; count],
            ctrl: vec![[0; CONTROL_WORDS]; count],
        }
    }

    pub fn is_full(&self) -> bool {
        self.len == self.bufs.len()
    }

    /// The next free buffer.
    pub fn next_buf(&mut self) -> &mut [u8] {
        &mut self.bufs[self.len]
    }

    /// Commit `len` bytes written into the buffer returned by `next_buf`.
    pub fn commit(&mut self, len: usize, to: SocketAddr) {
        self.lens[self.len] = len;
        self.addrs[self.len] = to;
        self.len += 1;
    }
}

/// Reusable buffers for `recv_batch`.
pub struct RecvBatch {
    /// One buffer per message.
    pub bufs: Vec<Vec<u8>>,
    pub lens: Vec<usize>,
    /// The sender of each message (all datagrams of a message share it).
    pub addrs: Vec<SocketAddr>,
    /// The datagrams of the last receive, in order.
    pub datagrams: Vec<Datagram>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    ctrl: Vec<[u64; CONTROL_WORDS]>,
}

// SAFETY: the raw pointers inside are only scratch space rebuilt before every call.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(count: usize, buf_size: usize) -> Self {
        // SAFETY: all-zero sockaddr_storage/iovec/mmsghdr are valid values.
        let (name, iov, hdr) = unsafe { (zeroed(), zeroed(), zeroed()) };
        RecvBatch {
            bufs: vec![vec![0u8; buf_size]; count],
            lens: vec![0; count],
            addrs: vec![SocketAddr::from(([0, 0, 0, 0], 0)); count],
            datagrams: Vec::with_capacity(count),
            names: vec![name; count],
            iovs: vec![iov; count],
            hdrs: vec![hdr; count],
            ctrl: vec![[0; CONTROL_WORDS]; count],
        }
    }

    /// The bytes of a datagram listed in `datagrams`.
    pub fn datagram(&self, d: Datagram) -> &[u8] {
        &self.bufs[d.msg][d.start..d.start + d.len]
    }
}

fn local_port(fd: RawFd) -> io::Result<u16> {
    // SAFETY: zeroed storage is valid; getsockname fills at most `len` bytes.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    cvt(unsafe {
        libc::getsockname(
            fd,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    from_sockaddr(&ss)
        .map(|a| a.port())
        .ok_or_else(|| io::Error::other("getsockname returned an unknown address family"))
}

/// Unmap `::ffff:a.b.c.d` so endpoints show as IPv4, like `wg show` prints them.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

fn to_sockaddr(addr: SocketAddr, v6_socket: bool) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero sockaddr_storage is valid; we write a sockaddr_in/in6 into its prefix.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let addr = match (addr, v6_socket) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        (a, _) => a,
    };
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            (ss, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            (ss, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(canonical(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            ))))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Send `sizes` (datagram i filled with byte i) from a socket with `send_offload` to one
    /// with `recv_offload`, and return what arrived (length, first byte) in order, plus the
    /// number of messages it took.
    fn round_trip(
        send_offload: bool,
        recv_offload: bool,
        sizes: &[usize],
    ) -> (Vec<(usize, u8)>, usize) {
        let a = UdpSocket::bind(0, 0, send_offload).expect("bind a");
        let b = UdpSocket::bind(0, 0, recv_offload).expect("bind b");
        assert_eq!(
            a.offloads().gso,
            send_offload,
            "this kernel refuses UDP_SEGMENT"
        );
        assert_eq!(
            b.offloads().gro,
            recv_offload,
            "this kernel refuses UDP_GRO"
        );
        let to = SocketAddr::from(([127, 0, 0, 1], b.port()));
        let mut sb = SendBatch::new(sizes.len(), 2048);
        for (i, &len) in sizes.iter().enumerate() {
            sb.next_buf()[..len].fill(i as u8);
            sb.commit(len, to);
        }
        assert_eq!(a.send_batch(&mut sb), sizes.len());
        let mut rb = RecvBatch::new(8, MAX_DATAGRAM_FOR_TESTS);
        let mut got = Vec::new();
        let mut messages = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < sizes.len() && std::time::Instant::now() < deadline {
            messages += b.recv_batch(&mut rb).expect("recv");
            for &d in &rb.datagrams {
                assert_eq!(
                    rb.addrs[d.msg],
                    SocketAddr::from(([127, 0, 0, 1], a.port()))
                );
                let bytes = rb.datagram(d);
                assert!(
                    bytes.iter().all(|&x| x == bytes[0]),
                    "a datagram was cut wrong"
                );
                got.push((bytes.len(), bytes[0]));
            }
        }
        (got, messages)
    }

    const MAX_DATAGRAM_FOR_TESTS: usize = 65535;

    /// A TSO-like run: equal segments, a shorter last one, then another size.
    fn sizes() -> Vec<usize> {
        let mut v = vec![1452; 20];
        v.push(700);
        v.extend([1000, 1000, 3]);
        v
    }

    fn expected() -> Vec<(usize, u8)> {
        sizes()
            .into_iter()
            .enumerate()
            .map(|(i, l)| (l, i as u8))
            .collect()
    }

    #[test]
    fn gso_send_and_gro_receive_keep_every_datagram_in_order() {
        let (got, messages) = round_trip(true, true, &sizes());
        assert_eq!(got, expected());
        // Loopback keeps a segmented send whole for a UDP_GRO socket: fewer messages than
        // datagrams shows both offloads at work.
        assert!(
            messages < got.len(),
            "{messages} messages for {} datagrams",
            got.len()
        );
    }

    #[test]
    fn gso_send_to_a_plain_receiver_arrives_as_single_datagrams() {
        let (got, messages) = round_trip(true, false, &sizes());
        assert_eq!(got, expected());
        assert_eq!(messages, got.len());
    }

    #[test]
    fn without_offloads_every_datagram_is_its_own_message() {
        let (got, messages) = round_trip(false, false, &sizes());
        assert_eq!(got, expected());
        assert_eq!(messages, got.len());
        let (got, _) = round_trip(false, true, &sizes());
        assert_eq!(got, expected());
    }

    #[test]
    fn a_refused_segmented_send_falls_back_to_single_datagrams() {
        // Without UDP checksums (SO_NO_CHECK) the kernel refuses UDP_SEGMENT with EINVAL: the
        // batch must still arrive whole, datagram by datagram, and segmentation stays off.
        let a = UdpSocket::bind(0, 0, true).expect("bind a");
        setsockopt_int(a.raw_fd(), libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).expect("SO_NO_CHECK");
        let b = UdpSocket::bind(0, 0, false).expect("bind b");
        let to = SocketAddr::from(([127, 0, 0, 1], b.port()));
        let mut rb = RecvBatch::new(8, MAX_DATAGRAM_FOR_TESTS);
        for round in 0..2 {
            let mut sb = SendBatch::new(8, 2048);
            for i in 0..6u8 {
                sb.next_buf()[..1200].fill(i);
                sb.commit(1200, to);
            }
            assert_eq!(a.send_batch(&mut sb), 6);
            let mut got = Vec::new();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while got.len() < 6 && std::time::Instant::now() < deadline {
                b.recv_batch(&mut rb).expect("recv");
                got.extend(rb.datagrams.iter().map(|&d| (d.len, rb.datagram(d)[0])));
            }
            assert_eq!(
                got,
                (0..6u8).map(|i| (1200, i)).collect::<Vec<_>>(),
                "round {round}"
            );
            assert!(!a.offloads().gso, "segmentation must be off once refused");
        }
    }

    #[test]
    fn batch_round_trip_on_loopback() {
        let a = UdpSocket::bind(0, 0, false).expect("bind a");
        let b = UdpSocket::bind(0, 0, false).expect("bind b");
        let to = SocketAddr::from(([127, 0, 0, 1], b.port()));
        let mut sb = SendBatch::new(8, 64);
        for i in 0..5u8 {
            let buf = sb.next_buf();
            buf[..3].copy_from_slice(&[i, i, i]);
            sb.commit(3, to);
        }
        assert_eq!(a.send_batch(&mut sb), 5);
        let mut rb = RecvBatch::new(8, 64);
        let mut got = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got < 5 && std::time::Instant::now() < deadline {
            let n = b.recv_batch(&mut rb).expect("recv");
            assert_eq!(rb.datagrams.len(), n);
            for &d in &rb.datagrams {
                assert_eq!(d.len, 3);
                assert_eq!(
                    rb.addrs[d.msg],
                    SocketAddr::from(([127, 0, 0, 1], a.port()))
                );
            }
            got += n;
        }
        assert_eq!(got, 5);
    }
}
