//! The join grace: the coordinator host keeps talking to a host that has just joined with the
//! throwaway key the host still uses until the join's reply has reached it.
//!
//! `POST /v1/join` replaces the invited host's throwaway key with its new key and bumps the
//! netmap version. The coordinator host's own meshd reconciles within milliseconds; were it to
//! swap the peer on its own interface to the new key at once, the HTTP reply (still travelling
//! back through the tunnel, which the joiner runs with the throwaway key until it has the
//! reply) would be lost and the join would fail on the joiner with a spent token. So the
//! coordinator's *own* desired state keeps the throwaway key for [`JOIN_KEY_GRACE`] after the
//! join, then swaps. Everyone else's netmap carries the new key immediately. Nothing here is
//! persisted: after a restart the grace is simply over.
//!
//! `POST /v1/rotate` records the same kind of entry: the caller's old key plays the throwaway
//! key's part (its reply, too, travels through a tunnel still keyed with the old key).

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mesh_proto::netmap::Netmap;
use mesh_proto::PublicKey;

use super::{CoordError, Coordinator};

/// How long after a join the coordinator host's own interface keeps the joiner's throwaway
/// key. The join reply needs one trip through the tunnel (milliseconds; 1 s leaves room for a
/// loaded host and a TCP retransmission). It must also stay well under the 2 s in which every
/// peer, the coordinator included, has to reach a new host after its join returned: the
/// coordinator reaches it only after the swap.
pub const JOIN_KEY_GRACE: Duration = Duration::from_secs(1);

/// A join inside its grace period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentJoin {
    pub name: String,
    pub address: IpAddr,
    /// The key the host used to join (from its token), or its old key after a rotation, still
    /// on the coordinator's interface.
    pub throwaway: PublicKey,
    /// The key the host joined with, in the registry and everyone else's netmap.
    pub new_key: PublicKey,
    /// When the join was committed.
    pub at: Instant,
}

impl RecentJoin {
    /// When the grace of this join ends.
    pub fn until(&self) -> Instant {
        self.at + JOIN_KEY_GRACE
    }
}

/// The joins of the last [`JOIN_KEY_GRACE`], in memory.
#[derive(Debug, Default)]
pub(super) struct RecentJoins(Mutex<Vec<RecentJoin>>);

impl RecentJoins {
    /// Remember a join (called inside the join's transaction, before the version bump is
    /// published, so the coordinator's own netmap feed never sees the new key without it).
    pub(super) fn record(&self, join: RecentJoin) {
        let Ok(mut joins) = self.0.lock() else {
            tracing::error!("the recent-joins lock is poisoned; no join grace");
            return;
        };
        let now = join.at;
        joins.retain(|j| j.until() > now && j.address != join.address);
        joins.push(join);
    }

    /// The joins whose grace has not ended at `now` (older ones are forgotten).
    pub(super) fn current(&self, now: Instant) -> Vec<RecentJoin> {
        let Ok(mut joins) = self.0.lock() else {
            return Vec::new();
        };
        joins.retain(|j| j.until() > now);
        joins.clone()
    }
}

/// Put the throwaway keys of `joins` into the coordinator's own netmap `nm`: a peer whose key
/// and address are a recent join's new key and address gets the throwaway key back, with no
/// endpoint (as while the host was pending: the device keeps what it learned from the
/// joiner's handshakes). Returns when the earliest applied grace ends.
pub fn apply_join_grace(nm: &mut Netmap, joins: &[RecentJoin]) -> Option<Instant> {
    let mut next: Option<Instant> = None;
    for p in &mut nm.peers {
        if let Some(j) = joins
            .iter()
            .find(|j| j.new_key == p.public_key && j.address == p.address)
        {
            p.public_key = j.throwaway;
            // The host switches to the new key when the reply arrives: accept its handshakes
            // meanwhile (no allowed IPs until the grace ends).
            p.next_public_key = Some(j.new_key);
            p.endpoints.clear();
            next = Some(next.map_or(j.until(), |n| n.min(j.until())));
        }
    }
    next
}

impl Coordinator {
    /// The joins whose grace has not ended at `now`.
    pub fn recent_joins(&self, now: Instant) -> Vec<RecentJoin> {
        self.recent.current(now)
    }

    /// The coordinator host's own netmap as its interface should have it at `now`: like
    /// [`Coordinator::netmap_for_name`], but hosts that joined less than [`JOIN_KEY_GRACE`]
    /// ago keep their throwaway key. Also returns when to compute it again (the end of the
    /// earliest grace), if any grace applies.
    pub fn own_netmap(
        &self,
        now: Instant,
    ) -> Result<Option<(Netmap, Option<Instant>)>, CoordError> {
        let Some(mut nm) = self.netmap_for_name(&self.settings().own_name)? else {
            return Ok(None);
        };
        let joins = self.recent_joins(now);
        let next = apply_join_grace(&mut nm, &joins);
        Ok(Some((nm, next)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use mesh_proto::wire::api::{InviteRequest, JoinRequest};
    use mesh_proto::PrivateKey;

    use super::*;
    use crate::coordinator::CoordinatorSettings;

    const NOW: u64 = 1_800_000_000;

    fn open(dir: &std::path::Path) -> Coordinator {
        Coordinator::open(
            CoordinatorSettings {
                mesh_cidr: "10.99.99.0/24".parse().unwrap(),
                api_port: mesh_proto::wire::api::DEFAULT_API_PORT,
                public_endpoints: vec!["192.0.2.1:51871".parse().unwrap()],
                reserved: vec![],
                static_assignments: BTreeMap::new(),
                keepalive_secs: 25,
                database: dir.join("registry.sqlite"),
                own_name: "dock-load".into(),
                own_address: "10.99.99.1".parse().unwrap(),
                own_public_key: PrivateKey::from_bytes([1; 32]).public_key(),
            },
            NOW,
        )
        .unwrap()
    }

    /// Invite `name` (built from JSON: the request grows optional fields).
    fn invite(c: &Coordinator, name: &str) -> mesh_proto::wire::api::InviteResponse {
        let req: InviteRequest = serde_json::from_value(serde_json::json!({
            "name": name, "admin": false, "static_peer": false,
        }))
        .unwrap();
        c.invite(req, NOW).unwrap()
    }

    fn peer_key(nm: &Netmap, address: IpAddr) -> PublicKey {
        nm.peers
            .iter()
            .find(|p| p.address == address)
            .unwrap()
            .public_key
    }

    #[test]
    fn the_coordinator_keeps_the_throwaway_key_during_the_grace_only() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path());
        let (other, _) = {
            let inv = invite(&c, "dock-prod");
            let key = PrivateKey::generate();
            let req = JoinRequest {
                token: inv.token.clone().unwrap(),
                public_key: key.public_key(),
                listen_port: 51871,
                addresses: vec!["192.168.1.20".parse().unwrap()],
            };
            c.join(inv.address, req, NOW + 1).unwrap();
            (inv.address, key)
        };
        let inv = invite(&c, "dock-dash");
        let (own_before, _) = c.own_netmap(Instant::now()).unwrap().unwrap();
        let throwaway = peer_key(&own_before, inv.address);

        let new_key = PrivateKey::generate().public_key();
        let before = Instant::now();
        let mut changes = c.subscribe();
        changes.borrow_and_update();
        c.join(
            inv.address,
            JoinRequest {
                token: inv.token.clone().unwrap(),
                public_key: new_key,
                listen_port: 51871,
                addresses: vec!["192.168.1.21".parse().unwrap()],
            },
            NOW + 2,
        )
        .unwrap();
        let after = Instant::now();
        assert!(changes.has_changed().unwrap(), "the join bumps the version");

        // Everyone else (and the registry) has the new key at once.
        let nm_other = c.netmap_for_address(other).unwrap().unwrap();
        assert_eq!(peer_key(&nm_other, inv.address), new_key);
        let registry = c.netmap_for_name("dock-load").unwrap().unwrap();
        assert_eq!(peer_key(&registry, inv.address), new_key);
        assert!(!registry
            .peers
            .iter()
            .find(|p| p.address == inv.address)
            .unwrap()
            .endpoints
            .is_empty());

        // The coordinator's own interface keeps the throwaway key inside the grace, with no
        // endpoint (the device keeps the one it learned), and knows when to look again.
        // (dock-prod's join may still be in its grace too.)
        let joins = c.recent_joins(after);
        let j = joins.iter().find(|j| j.name == "dock-dash").unwrap();
        assert_eq!(j.address, inv.address);
        assert_eq!(j.throwaway, throwaway);
        assert_eq!(j.new_key, new_key);
        assert!(j.at >= before && j.at <= after);
        let (own, next) = c.own_netmap(after).unwrap().unwrap();
        let p = own.peers.iter().find(|p| p.address == inv.address).unwrap();
        assert_eq!(p.public_key, throwaway);
        assert!(p.endpoints.is_empty());
        let next = next.unwrap();
        assert!(next > after && next <= after + JOIN_KEY_GRACE);
        let (own_late_in_grace, _) = c
            .own_netmap(before + JOIN_KEY_GRACE - Duration::from_millis(1))
            .unwrap()
            .unwrap();
        assert_eq!(peer_key(&own_late_in_grace, inv.address), throwaway);

        // After the grace: the new key, nothing left to wait for.
        let (own, next) = c.own_netmap(j.until()).unwrap().unwrap();
        assert_eq!(own, registry);
        assert_eq!(next, None);
        assert!(c.recent_joins(after + JOIN_KEY_GRACE).is_empty());
    }

    #[test]
    fn a_failed_join_leaves_no_grace() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path());
        let inv = invite(&c, "dock-dash");
        let req = JoinRequest {
            token: inv.token.clone().unwrap(),
            public_key: PrivateKey::generate().public_key(),
            listen_port: 51871,
            addresses: vec![],
        };
        // From the wrong address: refused before anything is recorded.
        c.join("10.99.99.77".parse().unwrap(), req, NOW + 1)
            .unwrap_err();
        assert!(c.recent_joins(Instant::now()).is_empty());
        let (own, next) = c.own_netmap(Instant::now()).unwrap().unwrap();
        assert_eq!(own, c.netmap_for_name("dock-load").unwrap().unwrap());
        assert_eq!(next, None);
    }
}
