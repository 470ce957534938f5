//! The reconciler: `plan(desired, observed, now) -> Vec<Op>`.
//!
//! Contract (checked by the property tests below):
//! - minimal: no op for a field that is already equal;
//! - ordered for continuity: device ops, then AddPeer/UpdatePeer, then RemovePeer last;
//! - deterministic (BTreeMap order);
//! - an endpoint the device learned (roaming, NAT) is kept when the spec has `None`; when the
//!   spec has `Some(e)` and the device shows another endpoint, the endpoint is only reset if the
//!   latest handshake is older than `ENDPOINT_STALE` at `now` (the peer roamed and still works);
//! - applying the ops to `observed` (see `apply`) and planning again gives no ops.
//!
//! Comparisons are normalised the way WireGuard stores values: allowed IPs are compared as sets
//! of truncated prefixes (`10.0.0.5/24` is `10.0.0.0/24`), a keepalive of 0 is off (`None`), an
//! all-zero preshared key is none, an fwmark of 0 is none.
//!
//! Desired peers must not share an allowed IP (config validation refuses overlaps); if they
//! did, the last one applied would win and the plan would never converge.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::device::{DeviceSpec, ObservedDevice, ObservedPeer, PeerSpec};
use crate::key::{PrivateKey, PublicKey};

/// After this long without a handshake, a roamed endpoint is replaced by the configured one.
pub const ENDPOINT_STALE: Duration = Duration::from_secs(135);

/// One change to a WireGuard device. `Display` gives a one-line, key-abbreviated description
/// that never contains a private or preshared key (used by logs and meshctl).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    SetPrivateKey(PrivateKey),
    SetListenPort(u16),
    SetFwmark(Option<u32>),
    AddPeer(PeerSpec),
    /// Only the `Some` fields change.
    UpdatePeer {
        public_key: PublicKey,
        preshared_key: Option<Option<[u8; 32]>>,
        endpoint: Option<SocketAddr>,
        /// Replace the allowed IPs with exactly this list.
        allowed_ips: Option<Vec<IpNet>>,
        persistent_keepalive: Option<Option<u16>>,
    },
    RemovePeer(PublicKey),
}

fn write_ips(f: &mut fmt::Formatter<'_>, ips: &[IpNet]) -> fmt::Result {
    f.write_str("[")?;
    for (i, ip) in ips.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{ip}")?;
    }
    f.write_str("]")
}

fn write_keepalive(f: &mut fmt::Formatter<'_>, k: Option<u16>) -> fmt::Result {
    match k {
        Some(s) if s != 0 => write!(f, "{s}s"),
        _ => f.write_str("off"),
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::SetPrivateKey(k) => {
                write!(f, "set private key (public key {})", k.public_key().short())
            }
            Op::SetListenPort(p) => write!(f, "set listen port {p}"),
            Op::SetFwmark(None) | Op::SetFwmark(Some(0)) => f.write_str("clear fwmark"),
            Op::SetFwmark(Some(m)) => write!(f, "set fwmark {m:#x}"),
            Op::AddPeer(p) => {
                write!(f, "add peer {} allowed_ips=", p.public_key.short())?;
                write_ips(f, &p.allowed_ips)?;
                match p.endpoint {
                    Some(e) => write!(f, " endpoint={e}")?,
                    None => f.write_str(" endpoint=(learn)")?,
                }
                f.write_str(" keepalive=")?;
                write_keepalive(f, p.persistent_keepalive)?;
                if norm_psk(p.preshared_key).is_some() {
                    f.write_str(" preshared_key=(set)")?;
                }
                Ok(())
            }
            Op::UpdatePeer {
                public_key,
                preshared_key,
                endpoint,
                allowed_ips,
                persistent_keepalive,
            } => {
                write!(f, "update peer {}:", public_key.short())?;
                let mut any = false;
                if let Some(e) = endpoint {
                    write!(f, " endpoint={e}")?;
                    any = true;
                }
                if let Some(ips) = allowed_ips {
                    f.write_str(" allowed_ips=")?;
                    write_ips(f, ips)?;
                    any = true;
                }
                if let Some(k) = persistent_keepalive {
                    f.write_str(" keepalive=")?;
                    write_keepalive(f, *k)?;
                    any = true;
                }
                if let Some(psk) = preshared_key {
                    match norm_psk(*psk) {
                        Some(_) => f.write_str(" preshared_key=(changed)")?,
                        None => f.write_str(" preshared_key=(removed)")?,
                    }
                    any = true;
                }
                if !any {
                    f.write_str(" (nothing)")?;
                }
                Ok(())
            }
            Op::RemovePeer(k) => write!(f, "remove peer {}", k.short()),
        }
    }
}

impl Op {
    /// The peer this op is about, `None` for device-level ops.
    pub fn peer(&self) -> Option<&PublicKey> {
        match self {
            Op::AddPeer(p) => Some(&p.public_key),
            Op::UpdatePeer { public_key, .. } | Op::RemovePeer(public_key) => Some(public_key),
            Op::SetPrivateKey(_) | Op::SetListenPort(_) | Op::SetFwmark(_) => None,
        }
    }
}

fn norm_psk(k: Option<[u8; 32]>) -> Option<[u8; 32]> {
    k.filter(|k| *k != [0; 32])
}

fn norm_keepalive(k: Option<u16>) -> Option<u16> {
    k.filter(|k| *k != 0)
}

fn norm_fwmark(m: Option<u32>) -> Option<u32> {
    m.filter(|m| *m != 0)
}

/// Allowed IPs as WireGuard stores them: truncated, sorted, de-duplicated.
pub fn normalize_allowed_ips(ips: &[IpNet]) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = ips.iter().map(IpNet::trunc).collect();
    v.sort();
    v.dedup();
    v
}

/// A peer spec with every field in the form WireGuard reports it.
fn normalize_spec(p: &PeerSpec) -> PeerSpec {
    PeerSpec {
        public_key: p.public_key,
        preshared_key: norm_psk(p.preshared_key),
        endpoint: p.endpoint,
        allowed_ips: normalize_allowed_ips(&p.allowed_ips),
        persistent_keepalive: norm_keepalive(p.persistent_keepalive),
    }
}

/// Whether a configured endpoint should replace the one the device shows.
fn endpoint_needs_reset(want: SocketAddr, seen: &ObservedPeer, now: Duration) -> bool {
    match seen.endpoint {
        Some(e) if e == want => false,
        None => true,
        Some(_) => match seen.last_handshake {
            None => true,
            Some(t) => now.saturating_sub(t) > ENDPOINT_STALE,
        },
    }
}

/// Compute the ops that take `observed` to `desired`. `now` is wall-clock time since the UNIX
/// epoch (same clock as `ObservedPeer::last_handshake`).
pub fn plan(desired: &DeviceSpec, observed: &ObservedDevice, now: Duration) -> Vec<Op> {
    let mut ops = Vec::new();
    if observed.public_key != Some(desired.private_key.public_key()) {
        ops.push(Op::SetPrivateKey(desired.private_key.clone()));
    }
    if observed.listen_port != desired.listen_port {
        ops.push(Op::SetListenPort(desired.listen_port));
    }
    let want_mark = norm_fwmark(desired.fwmark);
    if norm_fwmark(observed.fwmark) != want_mark {
        ops.push(Op::SetFwmark(want_mark));
    }

    for (key, spec) in &desired.peers {
        let want = normalize_spec(spec);
        // The map key is authoritative; a spec whose own key disagrees follows the map.
        let want = PeerSpec {
            public_key: *key,
            ..want
        };
        let Some(seen) = observed.peers.get(key) else {
            ops.push(Op::AddPeer(want));
            continue;
        };
        let preshared_key =
            (norm_psk(seen.preshared_key) != want.preshared_key).then_some(want.preshared_key);
        let endpoint = want
            .endpoint
            .filter(|e| endpoint_needs_reset(*e, seen, now));
        let allowed_ips = (normalize_allowed_ips(&seen.allowed_ips) != want.allowed_ips)
            .then(|| want.allowed_ips.clone());
        let persistent_keepalive = (norm_keepalive(seen.persistent_keepalive)
            != want.persistent_keepalive)
            .then_some(want.persistent_keepalive);
        if preshared_key.is_some()
            || endpoint.is_some()
            || allowed_ips.is_some()
            || persistent_keepalive.is_some()
        {
            ops.push(Op::UpdatePeer {
                public_key: *key,
                preshared_key,
                endpoint,
                allowed_ips,
                persistent_keepalive,
            });
        }
    }

    for key in observed.peers.keys() {
        if !desired.peers.contains_key(key) {
            ops.push(Op::RemovePeer(*key));
        }
    }
    ops
}

/// Remove `ips` from every peer except `owner` (WireGuard: an allowed IP has one peer).
fn steal(observed: &mut ObservedDevice, owner: &PublicKey, ips: &[IpNet]) {
    for (key, peer) in observed.peers.iter_mut() {
        if key != owner {
            peer.allowed_ips.retain(|ip| !ips.contains(ip));
        }
    }
}

/// Apply ops to an observed device as a WireGuard device would (an allowed IP belongs to exactly
/// one peer: adding it to one peer removes it from any other). Used by the fake backend and by
/// the property tests.
///
/// Values are stored normalised as WireGuard reports them (truncated sorted allowed IPs, zero
/// keepalive/preshared key/fwmark as `None`). `AddPeer` of an existing key updates it (keeping
/// its learned endpoint when the spec has none, and its counters); `UpdatePeer` of a missing
/// key does nothing (`update_only`).
pub fn apply(observed: &mut ObservedDevice, ops: &[Op]) {
    for op in ops {
        match op {
            Op::SetPrivateKey(k) => observed.public_key = Some(k.public_key()),
            Op::SetListenPort(p) => observed.listen_port = *p,
            Op::SetFwmark(m) => observed.fwmark = norm_fwmark(*m),
            Op::AddPeer(spec) => {
                let spec = normalize_spec(spec);
                steal(observed, &spec.public_key, &spec.allowed_ips);
                let peer = observed
                    .peers
                    .entry(spec.public_key)
                    .or_insert_with(|| ObservedPeer {
                        public_key: spec.public_key,
                        preshared_key: None,
                        endpoint: None,
                        allowed_ips: Vec::new(),
                        persistent_keepalive: None,
                        last_handshake: None,
                        rx_bytes: 0,
                        tx_bytes: 0,
                    });
                peer.preshared_key = spec.preshared_key;
                if spec.endpoint.is_some() {
                    peer.endpoint = spec.endpoint;
                }
                peer.allowed_ips = spec.allowed_ips;
                peer.persistent_keepalive = spec.persistent_keepalive;
            }
            Op::UpdatePeer {
                public_key,
                preshared_key,
                endpoint,
                allowed_ips,
                persistent_keepalive,
            } => {
                if !observed.peers.contains_key(public_key) {
                    continue;
                }
                let ips = allowed_ips.as_deref().map(normalize_allowed_ips);
                if let Some(ips) = &ips {
                    steal(observed, public_key, ips);
                }
                if let Some(peer) = observed.peers.get_mut(public_key) {
                    if let Some(psk) = preshared_key {
                        peer.preshared_key = norm_psk(*psk);
                    }
                    if let Some(e) = endpoint {
                        peer.endpoint = Some(*e);
                    }
                    if let Some(ips) = ips {
                        peer.allowed_ips = ips;
                    }
                    if let Some(k) = persistent_keepalive {
                        peer.persistent_keepalive = norm_keepalive(*k);
                    }
                }
            }
            Op::RemovePeer(k) => {
                observed.peers.remove(k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const NOW: Duration = Duration::from_secs(1_000_000);

    fn pk(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn spec(i: u8, ips: &[&str], endpoint: Option<&str>) -> PeerSpec {
        PeerSpec {
            public_key: pk(i),
            preshared_key: None,
            endpoint: endpoint.map(ep),
            allowed_ips: ips.iter().map(|s| net(s)).collect(),
            persistent_keepalive: None,
        }
    }

    fn device(peers: Vec<PeerSpec>) -> DeviceSpec {
        DeviceSpec {
            private_key: PrivateKey::from_bytes([0x40; 32]),
            listen_port: 51871,
            fwmark: None,
            peers: peers.into_iter().map(|p| (p.public_key, p)).collect(),
        }
    }

    fn observed_from(d: &DeviceSpec) -> ObservedDevice {
        let mut o = ObservedDevice::default();
        let ops = plan(d, &o, NOW);
        apply(&mut o, &ops);
        o
    }

    #[test]
    fn from_empty_in_order() {
        let d = device(vec![
            spec(2, &["10.99.99.2/32"], Some("198.51.100.2:51871")),
            spec(1, &["10.99.99.1/32"], None),
        ]);
        let mut o = ObservedDevice {
            peers: BTreeMap::new(),
            ..ObservedDevice::default()
        };
        o.fwmark = Some(51820);
        o.peers.insert(
            pk(0),
            ObservedPeer {
                public_key: pk(0),
                preshared_key: None,
                endpoint: None,
                allowed_ips: vec![],
                persistent_keepalive: None,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
            },
        );
        let ops = plan(&d, &o, NOW);
        let shown: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
        assert!(matches!(ops[0], Op::SetPrivateKey(_)), "{shown:?}");
        assert_eq!(ops[1], Op::SetListenPort(51871));
        assert_eq!(ops[2], Op::SetFwmark(None));
        assert!(matches!(&ops[3], Op::AddPeer(p) if p.public_key == pk(1)));
        assert!(matches!(&ops[4], Op::AddPeer(p) if p.public_key == pk(2)));
        assert_eq!(ops[5], Op::RemovePeer(pk(0)));
        assert_eq!(ops.len(), 6);
        apply(&mut o, &ops);
        assert_eq!(plan(&d, &o, NOW), vec![]);
    }

    #[test]
    fn learned_endpoint_kept_when_spec_has_none() {
        let d = device(vec![spec(1, &["10.99.99.3/32"], None)]);
        let mut o = observed_from(&d);
        o.peers.get_mut(&pk(1)).unwrap().endpoint = Some(ep("203.0.113.9:4000"));
        assert_eq!(plan(&d, &o, NOW), vec![]);
    }

    #[test]
    fn roamed_endpoint_kept_while_handshakes_are_fresh() {
        let d = device(vec![spec(
            1,
            &["10.99.99.2/32"],
            Some("198.51.100.2:51871"),
        )]);
        let mut o = observed_from(&d);
        let p = o.peers.get_mut(&pk(1)).unwrap();
        p.endpoint = Some(ep("198.51.100.77:1234"));
        p.last_handshake = Some(NOW - Duration::from_secs(30));
        assert_eq!(plan(&d, &o, NOW), vec![]);
        // Exactly at the limit: still fresh.
        o.peers.get_mut(&pk(1)).unwrap().last_handshake = Some(NOW - ENDPOINT_STALE);
        assert_eq!(plan(&d, &o, NOW), vec![]);

        let reset = vec![Op::UpdatePeer {
            public_key: pk(1),
            preshared_key: None,
            endpoint: Some(ep("198.51.100.2:51871")),
            allowed_ips: None,
            persistent_keepalive: None,
        }];
        // Stale: reset.
        o.peers.get_mut(&pk(1)).unwrap().last_handshake =
            Some(NOW - ENDPOINT_STALE - Duration::from_secs(1));
        assert_eq!(plan(&d, &o, NOW), reset);
        // Never: reset.
        o.peers.get_mut(&pk(1)).unwrap().last_handshake = None;
        assert_eq!(plan(&d, &o, NOW), reset);
        // Handshake in the future (clock step): treated as fresh.
        o.peers.get_mut(&pk(1)).unwrap().last_handshake = Some(NOW + Duration::from_secs(5));
        assert_eq!(plan(&d, &o, NOW), vec![]);
    }

    #[test]
    fn allowed_ips_compared_as_sets() {
        let d = device(vec![spec(1, &["10.0.0.2/32", "10.0.0.1/32"], None)]);
        let mut o = observed_from(&d);
        o.peers.get_mut(&pk(1)).unwrap().allowed_ips = vec![net("10.0.0.1/32"), net("10.0.0.2/32")];
        assert_eq!(plan(&d, &o, NOW), vec![]);
        o.peers.get_mut(&pk(1)).unwrap().allowed_ips =
            vec![net("10.0.0.2/32"), net("10.0.0.1/32"), net("10.0.0.1/32")];
        assert_eq!(plan(&d, &o, NOW), vec![]);
        // Host bits are truncated as WireGuard does.
        let d = device(vec![spec(1, &["10.0.0.5/24"], None)]);
        let o = observed_from(&d);
        assert_eq!(o.peers[&pk(1)].allowed_ips, vec![net("10.0.0.0/24")]);
        assert_eq!(plan(&d, &o, NOW), vec![]);
    }

    #[test]
    fn only_changed_fields() {
        let mut d = device(vec![spec(1, &["10.0.0.1/32"], Some("192.0.2.1:1"))]);
        let o = observed_from(&d);
        d.peers.get_mut(&pk(1)).unwrap().persistent_keepalive = Some(25);
        assert_eq!(
            plan(&d, &o, NOW),
            vec![Op::UpdatePeer {
                public_key: pk(1),
                preshared_key: None,
                endpoint: None,
                allowed_ips: None,
                persistent_keepalive: Some(Some(25)),
            }]
        );
        // Zero keepalive is off, zero psk is none, zero fwmark is none.
        let mut d2 = device(vec![spec(1, &["10.0.0.1/32"], Some("192.0.2.1:1"))]);
        let p = d2.peers.get_mut(&pk(1)).unwrap();
        p.persistent_keepalive = Some(0);
        p.preshared_key = Some([0; 32]);
        d2.fwmark = Some(0);
        assert_eq!(plan(&d2, &o, NOW), vec![]);
    }

    #[test]
    fn ip_moves_between_peers() {
        let d1 = device(vec![spec(1, &["10.0.0.1/32"], None), spec(2, &[], None)]);
        let mut o = observed_from(&d1);
        let d2 = device(vec![spec(1, &[], None), spec(2, &["10.0.0.1/32"], None)]);
        let ops = plan(&d2, &o, NOW);
        apply(&mut o, &ops);
        assert_eq!(plan(&d2, &o, NOW), vec![]);
        // A new peer takes an IP from a peer that goes away: add first, remove last.
        let d3 = device(vec![spec(3, &["10.0.0.1/32"], None), spec(1, &[], None)]);
        let ops = plan(&d3, &o, NOW);
        assert!(matches!(&ops[0], Op::AddPeer(p) if p.public_key == pk(3)));
        assert_eq!(ops.last(), Some(&Op::RemovePeer(pk(2))));
        apply(&mut o, &ops);
        assert_eq!(plan(&d3, &o, NOW), vec![]);
    }

    #[test]
    fn display_examples() {
        let k = pk(1).short();
        assert_eq!(Op::SetListenPort(5).to_string(), "set listen port 5");
        assert_eq!(Op::SetFwmark(None).to_string(), "clear fwmark");
        assert_eq!(Op::SetFwmark(Some(0x2000)).to_string(), "set fwmark 0x2000");
        assert_eq!(
            Op::RemovePeer(pk(1)).to_string(),
            format!("remove peer {k}")
        );
        let mut s = spec(
            1,
            &["10.0.0.1/32", "fd00::/64"],
            Some("[2001:db8::1]:51871"),
        );
        s.persistent_keepalive = Some(25);
        s.preshared_key = Some([9; 32]);
        assert_eq!(
            Op::AddPeer(s).to_string(),
            format!(
                "add peer {k} allowed_ips=[10.0.0.1/32, fd00::/64] endpoint=[2001:db8::1]:51871 \
                 keepalive=25s preshared_key=(set)"
            )
        );
        let up = Op::UpdatePeer {
            public_key: pk(1),
            preshared_key: Some(None),
            endpoint: Some(ep("192.0.2.1:5")),
            allowed_ips: Some(vec![]),
            persistent_keepalive: Some(None),
        };
        assert_eq!(
            up.to_string(),
            format!(
                "update peer {k}: endpoint=192.0.2.1:5 allowed_ips=[] keepalive=off \
                 preshared_key=(removed)"
            )
        );
    }

    // ---- property tests ----

    const NKEYS: u8 = 6;

    fn pool() -> Vec<IpNet> {
        [
            "10.99.99.1/32",
            "10.99.99.2/32",
            "10.99.99.3/32",
            "10.99.99.20/32",
            "10.42.0.0/16",
            "10.43.7.9/16", // host bits set: must be normalised
            "192.168.1.0/24",
            "fd00::1/128",
            "fd00:1::/64",
        ]
        .iter()
        .map(|s| net(s))
        .collect()
    }

    fn endpoints() -> Vec<SocketAddr> {
        [
            "198.51.100.1:51871",
            "198.51.100.2:51871",
            "[2001:db8::5]:51871",
        ]
        .iter()
        .map(|s| ep(s))
        .collect()
    }

    #[derive(Debug, Clone)]
    struct Fields {
        psk: Option<[u8; 32]>,
        endpoint: Option<SocketAddr>,
        keepalive: Option<u16>,
        handshake: Option<Duration>,
        rx: u64,
    }

    fn fields() -> impl Strategy<Value = Fields> {
        (
            prop_oneof![Just(None), Just(Some([0; 32])), Just(Some([0xaa; 32]))],
            proptest::option::of(proptest::sample::select(endpoints())),
            prop_oneof![Just(None), Just(Some(0)), Just(Some(25))],
            prop_oneof![
                Just(None),
                Just(Some(NOW - Duration::from_secs(10))),
                Just(Some(NOW - Duration::from_secs(1000))),
            ],
            0u64..1000,
        )
            .prop_map(|(psk, endpoint, keepalive, handshake, rx)| Fields {
                psk,
                endpoint,
                keepalive,
                handshake,
                rx,
            })
    }

    /// Peers (slot i = key i+1 present or not) and an owner for every pool prefix, so that no
    /// prefix belongs to two peers.
    fn peers_with_owners() -> impl Strategy<Value = (Vec<Option<Fields>>, Vec<Option<u8>>)> {
        (
            proptest::collection::vec(proptest::option::of(fields()), NKEYS as usize),
            proptest::collection::vec(proptest::option::of(0..NKEYS), pool().len()),
        )
    }

    fn ips_of(owners: &[Option<u8>], slot: u8, truncate: bool) -> Vec<IpNet> {
        pool()
            .into_iter()
            .zip(owners)
            .filter(|(_, o)| **o == Some(slot))
            .map(|(ip, _)| if truncate { ip.trunc() } else { ip })
            .rev() // unsorted on purpose
            .collect()
    }

    fn desired_strategy() -> impl Strategy<Value = DeviceSpec> {
        (
            any::<[u8; 32]>(),
            prop_oneof![Just(51871u16), Just(51872u16)],
            prop_oneof![Just(None), Just(Some(0u32)), Just(Some(0x1000u32))],
            peers_with_owners(),
        )
            .prop_map(|(sk, listen_port, fwmark, (peers, owners))| DeviceSpec {
                private_key: PrivateKey::from_bytes(sk),
                listen_port,
                fwmark,
                peers: peers
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, f)| {
                        let f = f?;
                        let slot = i as u8;
                        let key = pk(slot + 1);
                        Some((
                            key,
                            PeerSpec {
                                public_key: key,
                                preshared_key: f.psk,
                                endpoint: f.endpoint,
                                allowed_ips: ips_of(&owners, slot, false),
                                persistent_keepalive: f.keepalive,
                            },
                        ))
                    })
                    .collect(),
            })
    }

    fn observed_strategy() -> impl Strategy<Value = ObservedDevice> {
        (
            proptest::option::of(prop_oneof![
                Just(PrivateKey::from_bytes([0x40; 32]).public_key()),
                Just(pk(99)),
            ]),
            prop_oneof![Just(0u16), Just(51871u16)],
            prop_oneof![Just(None), Just(Some(0x1000u32)), Just(Some(51820u32))],
            peers_with_owners(),
        )
            .prop_map(|(public_key, listen_port, fwmark, (peers, owners))| {
                ObservedDevice {
                    public_key,
                    listen_port,
                    fwmark,
                    peers: peers
                        .into_iter()
                        .enumerate()
                        .filter_map(|(i, f)| {
                            let f = f?;
                            let slot = i as u8;
                            let key = pk(slot + 1);
                            let mut ips = ips_of(&owners, slot, true);
                            ips.sort();
                            Some((
                                key,
                                ObservedPeer {
                                    public_key: key,
                                    preshared_key: norm_psk(f.psk),
                                    endpoint: f.endpoint,
                                    allowed_ips: ips,
                                    persistent_keepalive: norm_keepalive(f.keepalive),
                                    last_handshake: f.handshake,
                                    rx_bytes: f.rx,
                                    tx_bytes: f.rx * 2,
                                },
                            ))
                        })
                        .collect(),
                }
            })
    }

    /// Phase of an op: 0 device, 1 add/update, 2 remove.
    fn phase(op: &Op) -> u8 {
        match op {
            Op::SetPrivateKey(_) | Op::SetListenPort(_) | Op::SetFwmark(_) => 0,
            Op::AddPeer(_) | Op::UpdatePeer { .. } => 1,
            Op::RemovePeer(_) => 2,
        }
    }

    proptest! {
        #[test]
        fn converges(d in desired_strategy(), o in observed_strategy()) {
            let ops = plan(&d, &o, NOW);
            let mut after = o.clone();
            apply(&mut after, &ops);
            prop_assert_eq!(plan(&d, &after, NOW), vec![]);
            // And the device now matches the spec.
            prop_assert_eq!(after.public_key, Some(d.private_key.public_key()));
            prop_assert_eq!(after.listen_port, d.listen_port);
            prop_assert_eq!(after.fwmark, norm_fwmark(d.fwmark));
            prop_assert_eq!(
                after.peers.keys().collect::<Vec<_>>(),
                d.peers.keys().collect::<Vec<_>>()
            );
            for (k, p) in &d.peers {
                let seen = &after.peers[k];
                prop_assert_eq!(&seen.allowed_ips, &normalize_allowed_ips(&p.allowed_ips));
                prop_assert_eq!(seen.persistent_keepalive, norm_keepalive(p.persistent_keepalive));
                prop_assert_eq!(seen.preshared_key, norm_psk(p.preshared_key));
                if p.endpoint.is_some() {
                    prop_assert!(seen.endpoint.is_some());
                }
            }
        }

        #[test]
        fn rerunning_is_a_no_op(d in desired_strategy(), o in observed_strategy()) {
            let ops = plan(&d, &o, NOW);
            let mut once = o.clone();
            apply(&mut once, &ops);
            let mut twice = once.clone();
            apply(&mut twice, &ops);
            prop_assert_eq!(&once, &twice);
            prop_assert_eq!(plan(&d, &once, NOW), plan(&d, &twice, NOW));
        }

        #[test]
        fn ordered(d in desired_strategy(), o in observed_strategy()) {
            let ops = plan(&d, &o, NOW);
            let phases: Vec<u8> = ops.iter().map(phase).collect();
            let mut sorted = phases.clone();
            sorted.sort();
            prop_assert_eq!(&phases, &sorted);
            // Peer ops within a phase are in key order, one op per peer at most.
            let keys: Vec<PublicKey> = ops.iter().filter_map(|op| op.peer().copied()).collect();
            let adds: Vec<PublicKey> = ops.iter()
                .filter(|op| phase(op) == 1).filter_map(|op| op.peer().copied()).collect();
            let mut s = adds.clone();
            s.sort();
            prop_assert_eq!(&adds, &s);
            let mut uniq = keys.clone();
            uniq.sort();
            uniq.dedup();
            prop_assert_eq!(uniq.len(), keys.len());
        }

        #[test]
        fn minimal_and_untouched(
            d in desired_strategy(),
            o in observed_strategy(),
            victim in 1..=NKEYS,
            change in 0u8..3,
        ) {
            // Bring the device in sync, then disturb one peer.
            let mut synced = o.clone();
            apply(&mut synced, &plan(&d, &o, NOW));
            let mut disturbed = synced.clone();
            let key = pk(victim);
            let present = disturbed.peers.contains_key(&key);
            if let Some(p) = disturbed.peers.get_mut(&key) {
                match change {
                    0 => p.persistent_keepalive = Some(7),
                    1 => p.allowed_ips.push(net("172.16.0.0/12")),
                    _ => p.preshared_key = Some([0x55; 32]),
                }
            }
            let ops = plan(&d, &disturbed, NOW);
            if present {
                // Exactly one op, for the victim, changing exactly the disturbed field.
                prop_assert_eq!(ops.len(), 1);
                match &ops[0] {
                    Op::UpdatePeer { public_key, preshared_key, endpoint, allowed_ips, persistent_keepalive } => {
                        prop_assert_eq!(*public_key, key);
                        prop_assert!(endpoint.is_none());
                        prop_assert_eq!(persistent_keepalive.is_some(), change == 0);
                        prop_assert_eq!(allowed_ips.is_some(), change == 1);
                        prop_assert_eq!(preshared_key.is_some(), change == 2);
                    }
                    other => prop_assert!(false, "unexpected op {:?}", other),
                }
            } else {
                prop_assert_eq!(ops, vec![]);
            }
        }

        #[test]
        fn untouched_peers_stay_untouched(d in desired_strategy(), o in observed_strategy()) {
            let ops = plan(&d, &o, NOW);
            let mut after = o.clone();
            apply(&mut after, &ops);
            let touched: Vec<PublicKey> = ops.iter().filter_map(|op| op.peer().copied()).collect();
            for (k, p) in &o.peers {
                if !touched.contains(k) {
                    prop_assert_eq!(Some(p), after.peers.get(k));
                }
            }
            // Nothing that is desired is ever removed.
            for op in &ops {
                if let Op::RemovePeer(k) = op {
                    prop_assert!(!d.peers.contains_key(k));
                }
            }
        }

        #[test]
        fn deterministic(d in desired_strategy(), o in observed_strategy()) {
            // Rebuild the maps in reverse insertion order: same plan.
            let mut d2 = d.clone();
            d2.peers = d.peers.iter().rev().map(|(k, v)| (*k, v.clone())).collect();
            let mut o2 = o.clone();
            o2.peers = o.peers.iter().rev().map(|(k, v)| (*k, v.clone())).collect();
            prop_assert_eq!(plan(&d, &o, NOW), plan(&d2, &o2, NOW));
        }

        #[test]
        fn display_never_leaks_secrets(
            sk in any::<[u8; 32]>(),
            psk in any::<[u8; 32]>(),
            o in observed_strategy(),
            d in desired_strategy(),
        ) {
            let mut d = d;
            d.private_key = PrivateKey::from_bytes(sk);
            for p in d.peers.values_mut() {
                p.preshared_key = Some(psk);
            }
            let mut ops = plan(&d, &o, NOW);
            ops.push(Op::SetPrivateKey(PrivateKey::from_bytes(sk)));
            ops.push(Op::UpdatePeer {
                public_key: pk(1),
                preshared_key: Some(Some(psk)),
                endpoint: None,
                allowed_ips: None,
                persistent_keepalive: None,
            });
            let secrets = [
                PrivateKey::from_bytes(sk).to_base64(),
                PrivateKey::from_bytes(sk).to_hex(),
                PublicKey(psk).to_base64(),
                PublicKey(psk).to_hex(),
            ];
            for op in &ops {
                let shown = op.to_string();
                for s in &secrets {
                    prop_assert!(!shown.contains(s.as_str()), "{} leaks a secret", shown);
                    // Not even a recognisable prefix of it.
                    prop_assert!(!shown.contains(&s[..12]), "{} leaks a secret prefix", shown);
                }
            }
        }
    }
}
