//! ICMP echo (RFC 792) for `meshctl ping`: the request it sends and the reply it accepts. No
//! I/O here; the caller owns the socket.

/// Echo request type; echo reply type.
const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request with identifier `id`, sequence `seq` and `payload`, checksummed.
pub fn echo_request(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + payload.len());
    p.extend_from_slice(&[ECHO_REQUEST, 0, 0, 0]);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(payload);
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The sequence number of `packet` if it is an echo reply to `id` carrying `payload` with a
/// correct checksum. `packet` starts at the ICMP header; a raw socket's IPv4 header is
/// skipped first with [`strip_ipv4`]. `id` is `None` on a ping socket, where the kernel
/// picks and checks the identifier itself.
pub fn echo_reply_seq(packet: &[u8], id: Option<u16>, payload: &[u8]) -> Option<u16> {
    if packet.len() < 8 || packet[0] != ECHO_REPLY || packet[1] != 0 || checksum(packet) != 0 {
        return None;
    }
    let got_id = u16::from_be_bytes([packet[4], packet[5]]);
    if id.is_some_and(|id| id != got_id) || &packet[8..] != payload {
        return None;
    }
    Some(u16::from_be_bytes([packet[6], packet[7]]))
}

/// The IPv4 payload of a datagram as a raw socket returns it (the header's length from IHL).
pub fn strip_ipv4(datagram: &[u8]) -> Option<&[u8]> {
    let first = *datagram.first()?;
    if first >> 4 != 4 {
        return None;
    }
    datagram.get(usize::from(first & 0x0f) * 4..)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reply a peer sends: the request with type 0 and the checksum fixed.
    fn reply_to(req: &[u8]) -> Vec<u8> {
        let mut r = req.to_vec();
        r[0] = ECHO_REPLY;
        r[2..4].copy_from_slice(&[0, 0]);
        let sum = checksum(&r);
        r[2..4].copy_from_slice(&sum.to_be_bytes());
        r
    }

    #[test]
    fn request_and_reply() {
        let req = echo_request(0x1234, 7, b"meshctl ping");
        assert_eq!(checksum(&req), 0, "a correct checksum sums to zero");
        assert_eq!(&req[..2], &[8, 0]);
        let rep = reply_to(&req);
        assert_eq!(echo_reply_seq(&rep, Some(0x1234), b"meshctl ping"), Some(7));
        assert_eq!(echo_reply_seq(&rep, None, b"meshctl ping"), Some(7));
        // Someone else's ping, another payload, our own request, damage: not ours.
        assert_eq!(echo_reply_seq(&rep, Some(0x4321), b"meshctl ping"), None);
        assert_eq!(echo_reply_seq(&rep, Some(0x1234), b"other"), None);
        assert_eq!(echo_reply_seq(&req, Some(0x1234), b"meshctl ping"), None);
        let mut bad = rep.clone();
        bad[9] ^= 1;
        assert_eq!(echo_reply_seq(&bad, Some(0x1234), b"meshctl ping"), None);
        assert_eq!(echo_reply_seq(&rep[..5], Some(0x1234), b""), None);
        // Odd lengths checksum too.
        let odd = echo_request(1, 1, b"abc");
        assert_eq!(checksum(&odd), 0);
    }

    #[test]
    fn raw_datagrams_lose_their_ipv4_header() {
        let mut d = vec![0x45u8; 20];
        d.extend_from_slice(b"icmp");
        assert_eq!(strip_ipv4(&d), Some(&b"icmp"[..]));
        assert_eq!(strip_ipv4(&[0x60, 0, 0]), None, "not IPv4");
        assert_eq!(strip_ipv4(&[0x4f]), None, "header longer than the datagram");
        assert_eq!(strip_ipv4(&[]), None);
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(p in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = echo_reply_seq(&p, Some(1), b"x");
            let _ = strip_ipv4(&p);
        }
    }
}
