//! The engine's UDP socket: dual-stack (one IPv6 socket that also carries IPv4 as mapped
//! addresses, IPv4-only where IPv6 is disabled), large buffers, and batched I/O with
//! `recvmmsg`/`sendmmsg` so that one system call moves many datagrams.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Socket buffer size asked for (SO_RCVBUFFORCE/SO_SNDBUFFORCE as root, else capped by sysctl).
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// A bound UDP socket.
#[derive(Debug)]
pub struct UdpSocket {
    fd: OwnedFd,
    v6: bool,
    port: u16,
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
    /// Bind `port` (0 = any) on all addresses, dual-stack when the host has IPv6.
    pub fn bind(port: u16, fwmark: u32) -> io::Result<UdpSocket> {
        match Self::bind_family(port, true, fwmark) {
            Ok(s) => Ok(s),
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                Self::bind_family(port, false, fwmark)
            }
            Err(e) => Err(e),
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
        Ok(UdpSocket { fd, v6, port })
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

    /// Send a batch of datagrams with as few `sendmmsg` calls as possible. Datagrams the kernel
    /// refuses are dropped (like a lossy link); returns how many were sent.
    pub fn send_batch(&self, batch: &mut SendBatch) -> usize {
        let n = batch.len;
        if n == 0 {
            return 0;
        }
        for i in 0..n {
            let (sa, len) = to_sockaddr(batch.addrs[i], self.v6);
            batch.names[i] = sa;
            batch.iovs[i] = libc::iovec {
                iov_base: batch.bufs[i].as_mut_ptr().cast(),
                iov_len: batch.lens[i],
            };
            // SAFETY: zeroed mmsghdr is a valid "empty" header.
            batch.hdrs[i] = unsafe { zeroed() };
            batch.hdrs[i].msg_hdr.msg_name =
                (&mut batch.names[i] as *mut libc::sockaddr_storage).cast();
            batch.hdrs[i].msg_hdr.msg_namelen = len;
            batch.hdrs[i].msg_hdr.msg_iov = &mut batch.iovs[i];
            batch.hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: hdrs[sent..n] point at iovecs/names/buffers owned by `batch` that stay
            // alive and unaliased for the duration of the call.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    batch.hdrs[sent..].as_mut_ptr(),
                    (n - sent) as libc::c_uint,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Skip the datagram that failed (unreachable, bad address) and go on.
                sent += 1;
                continue;
            }
            sent += r as usize;
        }
        batch.len = 0;
        n
    }

    /// Receive up to `batch.capacity()` datagrams without blocking. Returns the number
    /// received (0 if none were waiting).
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        let cap = batch.bufs.len();
        for i in 0..cap {
            batch.iovs[i] = libc::iovec {
                iov_base: batch.bufs[i].as_mut_ptr().cast(),
                iov_len: batch.bufs[i].len(),
            };
            // SAFETY: zeroed mmsghdr is a valid "empty" header.
            batch.hdrs[i] = unsafe { zeroed() };
            batch.hdrs[i].msg_hdr.msg_name =
                (&mut batch.names[i] as *mut libc::sockaddr_storage).cast();
            batch.hdrs[i].msg_hdr.msg_namelen =
                size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            batch.hdrs[i].msg_hdr.msg_iov = &mut batch.iovs[i];
            batch.hdrs[i].msg_hdr.msg_iovlen = 1;
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
            batch.lens[i] = batch.hdrs[i].msg_len as usize;
            batch.addrs[i] =
                from_sockaddr(&batch.names[i]).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        }
        Ok(n)
    }
}

/// Reusable buffers for `send_batch`.
pub struct SendBatch {
    pub bufs: Vec<Vec<u8>>,
    pub lens: Vec<usize>,
    pub addrs: Vec<SocketAddr>,
    pub len: usize,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
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
            names: vec![name; count],
            iovs: vec![iov; count],
            hdrs: vec![hdr; count],
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
    pub bufs: Vec<Vec<u8>>,
    pub lens: Vec<usize>,
    pub addrs: Vec<SocketAddr>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
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
            names: vec![name; count],
            iovs: vec![iov; count],
            hdrs: vec![hdr; count],
        }
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

    #[test]
    fn batch_round_trip_on_loopback() {
        let a = UdpSocket::bind(0, 0).expect("bind a");
        let b = UdpSocket::bind(0, 0).expect("bind b");
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
            for i in 0..n {
                assert_eq!(rb.lens[i], 3);
                assert_eq!(rb.addrs[i], SocketAddr::from(([127, 0, 0, 1], a.port())));
            }
            got += n;
        }
        assert_eq!(got, 5);
    }
}
