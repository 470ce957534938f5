//! The reconciler: `plan(desired, observed, now) -> Vec<Op>`.
//!
//! Contract (TO BE IMPLEMENTED by helper, with property tests):
//! - minimal: no op for a field that is already equal;
//! - ordered for continuity: device ops, then AddPeer/UpdatePeer, then RemovePeer last;
//! - deterministic (BTreeMap order);
//! - an endpoint the device learned (roaming, NAT) is kept when the spec has `None`; when the
//!   spec has `Some(e)` and the device shows another endpoint, the endpoint is only reset if the
//!   latest handshake is older than `ENDPOINT_STALE` at `now` (the peer roamed and still works);
//! - applying the ops to `observed` (see `apply`) and planning again gives no ops.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::device::{DeviceSpec, ObservedDevice, PeerSpec};
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

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let _ = f;
        todo!("helper")
    }
}

/// Compute the ops that take `observed` to `desired`. `now` is wall-clock time since the UNIX
/// epoch (same clock as `ObservedPeer::last_handshake`).
pub fn plan(desired: &DeviceSpec, observed: &ObservedDevice, now: Duration) -> Vec<Op> {
    let _ = (desired, observed, now);
    todo!("helper")
}

/// Apply ops to an observed device as a WireGuard device would (an allowed IP belongs to exactly
/// one peer: adding it to one peer removes it from any other). Used by the fake backend and by
/// the property tests.
pub fn apply(observed: &mut ObservedDevice, ops: &[Op]) {
    let _ = (observed, ops);
    todo!("helper")
}
