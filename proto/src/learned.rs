//! Endpoints WireGuard learned per peer, kept across restarts.
//!
//! The netmap hands out for a peer behind a NAT the mapping the coordinator observed. Behind
//! an endpoint-dependent ("symmetric") NAT that mapping is good towards the coordinator only:
//! every other host reaches the peer at the mapping the peer's own packets came from, which
//! WireGuard learns from authenticated packets (roaming). A restart (a reboot: the interface
//! and its peers gone) forgets those, and until the peer's next handshake (up to its
//! keepalive plus the rekey timeout, 12–16 s measured) the pair is down.
//!
//! So the endpoints that carried a recent handshake are kept with the netmap, and after a
//! start they are tried first, as hints: for [`HINT_GRACE`] after the start, a peer's hint
//! comes before the netmap's candidates; after that the netmap's first candidate is what the
//! device should have again, and the reconciler keeps whichever endpoint carries handshakes
//! ([`crate::plan`] never replaces an endpoint with fresh handshakes).
//!
//! Policy only: no I/O and no clock (times come in as arguments).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::device::ObservedPeer;
use crate::key::PublicKey;

/// A handshake at most this old makes an endpoint worth keeping (WireGuard rekeys every two
/// minutes on a live session).
pub const LEARN_RECENT: Duration = Duration::from_secs(180);
/// An endpoint kept longer ago than this is not tried after a start (NATs forget idle
/// mappings within minutes; a stale hint would only cost the grace period).
pub const HINT_MAX_AGE: Duration = Duration::from_secs(30 * 60);
/// How long after a start hints come before the netmap's candidates.
pub const HINT_GRACE: Duration = Duration::from_secs(10);
/// A kept endpoint's time is refreshed when it is older than this (so that the file is not
/// rewritten at every handshake).
pub const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);

/// One peer's learned endpoint and when a handshake last confirmed it (UNIX seconds; at most
/// [`REFRESH_EVERY`] behind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learned {
    pub endpoint: SocketAddr,
    pub seen_unix: u64,
}

/// Every peer's learned endpoint, as kept in the state directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedEndpoints {
    pub peers: BTreeMap<PublicKey, Learned>,
}

/// Whether an address can be an endpoint at all (not unspecified, loopback, multicast, port
/// 0, or inside the mesh).
fn usable(addr: &SocketAddr, mesh: Option<IpNet>) -> bool {
    let ip = addr.ip();
    addr.port() != 0
        && !ip.is_unspecified()
        && !ip.is_loopback()
        && !ip.is_multicast()
        && !mesh.is_some_and(|m| m.contains(&ip))
}

impl LearnedEndpoints {
    /// `self` updated from what the device shows at `now`: a peer with a recent handshake
    /// and an endpoint is kept at that endpoint (its time refreshed every [`REFRESH_EVERY`]);
    /// the others keep what was learned before (a peer that is down now may come back at its
    /// old endpoint). Entries of peers not in `peers_now` are dropped.
    pub fn learn<'a>(
        &self,
        observed: impl IntoIterator<Item = &'a ObservedPeer>,
        peers_now: &BTreeSet<PublicKey>,
        now: Duration,
        mesh: Option<IpNet>,
    ) -> LearnedEndpoints {
        let mut next = LearnedEndpoints {
            peers: self
                .peers
                .iter()
                .filter(|(k, _)| peers_now.contains(k))
                .map(|(k, l)| (*k, *l))
                .collect(),
        };
        let now_unix = now.as_secs();
        for p in observed {
            let (Some(endpoint), Some(hs)) = (p.endpoint, p.last_handshake) else {
                continue;
            };
            if now.saturating_sub(hs) > LEARN_RECENT
                || !usable(&endpoint, mesh)
                || !peers_now.contains(&p.public_key)
            {
                continue;
            }
            let fresh = Learned {
                endpoint,
                seen_unix: now_unix,
            };
            match next.peers.get(&p.public_key) {
                Some(l)
                    if l.endpoint == endpoint
                        && now_unix.saturating_sub(l.seen_unix) < REFRESH_EVERY.as_secs() => {}
                _ => {
                    next.peers.insert(p.public_key, fresh);
                }
            }
        }
        next
    }

    /// The hints to start with at `now`: endpoints confirmed within [`HINT_MAX_AGE`], usable
    /// ones only.
    pub fn hints(&self, now: Duration, mesh: Option<IpNet>) -> BTreeMap<PublicKey, SocketAddr> {
        self.peers
            .iter()
            .filter(|(_, l)| now.as_secs().saturating_sub(l.seen_unix) <= HINT_MAX_AGE.as_secs())
            .filter(|(_, l)| usable(&l.endpoint, mesh))
            .map(|(k, l)| (*k, l.endpoint))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    fn seen(i: u8, ep: &str, hs: Option<u64>) -> ObservedPeer {
        ObservedPeer {
            public_key: key(i),
            preshared_key: None,
            endpoint: Some(ep.parse().unwrap()),
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
            last_handshake: hs.map(Duration::from_secs),
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    const T: u64 = 1_800_000_000;

    fn mesh() -> Option<IpNet> {
        Some("10.99.99.0/24".parse().unwrap())
    }

    #[test]
    fn endpoints_with_recent_handshakes_are_learned_and_the_rest_kept() {
        let peers = BTreeSet::from([key(1), key(2), key(3)]);
        let l = LearnedEndpoints::default().learn(
            &[
                seen(1, "198.51.100.101:40001", Some(T - 10)),
                seen(2, "198.51.100.100:51871", Some(T - 600)), // stale handshake
                seen(3, "192.168.1.4:51871", None),             // never
            ],
            &peers,
            Duration::from_secs(T),
            mesh(),
        );
        assert_eq!(l.peers.len(), 1);
        assert_eq!(
            l.peers[&key(1)].endpoint,
            "198.51.100.101:40001".parse().unwrap()
        );
        // Peer 1 down now: what it was learned at stays; a peer gone from the netmap goes.
        let later = l.learn(
            &[seen(1, "198.51.100.101:40001", Some(T - 10))],
            &peers,
            Duration::from_secs(T + 1000),
            mesh(),
        );
        assert_eq!(later, l, "a stale observation changes nothing");
        let gone = l.learn(
            &[],
            &BTreeSet::from([key(2)]),
            Duration::from_secs(T + 1),
            mesh(),
        );
        assert!(gone.peers.is_empty());
    }

    #[test]
    fn the_time_is_refreshed_seldom_and_a_new_endpoint_at_once() {
        let peers = BTreeSet::from([key(1)]);
        let at = |t: u64, ep: &str, l: &LearnedEndpoints| {
            l.learn(
                &[seen(1, ep, Some(t - 1))],
                &peers,
                Duration::from_secs(t),
                mesh(),
            )
        };
        let l = at(T, "198.51.100.101:40001", &LearnedEndpoints::default());
        assert_eq!(at(T + 60, "198.51.100.101:40001", &l), l, "not rewritten");
        let r = at(T + REFRESH_EVERY.as_secs(), "198.51.100.101:40001", &l);
        assert_eq!(r.peers[&key(1)].seen_unix, T + REFRESH_EVERY.as_secs());
        let moved = at(T + 5, "198.51.100.101:40777", &l);
        assert_eq!(
            moved.peers[&key(1)].endpoint,
            "198.51.100.101:40777".parse().unwrap()
        );
    }

    #[test]
    fn hints_are_recent_usable_endpoints_only() {
        let mut l = LearnedEndpoints::default();
        for (i, ep, age) in [
            (1, "198.51.100.101:40001", 60),
            (2, "198.51.100.102:40002", HINT_MAX_AGE.as_secs() + 1),
            (3, "10.99.99.7:51871", 1), // inside the mesh: never an endpoint
            (4, "127.0.0.1:51871", 1),
            (5, "0.0.0.0:51871", 1),
            (6, "198.51.100.106:0", 1),
        ] {
            l.peers.insert(
                key(i),
                Learned {
                    endpoint: ep.parse().unwrap(),
                    seen_unix: T - age,
                },
            );
        }
        let h = l.hints(Duration::from_secs(T), mesh());
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h[&key(1)], "198.51.100.101:40001".parse().unwrap());
        // A file from the future (clock stepped back) is not older than the limit.
        assert_eq!(l.hints(Duration::from_secs(T - 3600), mesh()).len(), 2);
    }

    #[test]
    fn the_file_format_round_trips() {
        let mut l = LearnedEndpoints::default();
        l.peers.insert(
            key(1),
            Learned {
                endpoint: "[2001:db8::1]:51871".parse().unwrap(),
                seen_unix: T,
            },
        );
        let text = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<LearnedEndpoints>(&text).unwrap(), l);
        assert!(serde_json::from_str::<LearnedEndpoints>("{\"peers\":{\"x\":1}}").is_err());
    }
}
