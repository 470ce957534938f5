//! Coordinator key notices: how a host that was offline while the coordinator's key rotated
//! learns the new key without a new token.
//!
//! The coordinator API lives inside the tunnel, and the tunnel to the coordinator needs the
//! coordinator's current public key. A host that missed the rotation still holds the old key,
//! so it cannot reach the API to ask. When the coordinator commits a rotation of its own key,
//! it therefore writes, for every host it knows, a *notice*: `old key -> new key`,
//! authenticated with a MAC whose key is the X25519 shared secret of the coordinator's *old*
//! private key and the host's public key. Only the old coordinator key's holder and the host
//! can compute that secret, so the notice can travel over an untrusted channel (the
//! coordinator serves notices outside the tunnel, on TCP at its WireGuard endpoint). The host
//! checks it with its own private key and the old coordinator key it already trusts, then
//! follows the chain when it missed several rotations. A notice reveals nothing secret: the
//! coordinator's public keys and a MAC.
//!
//! The MAC is HMAC-SHA256 over a domain label, the host's key, the old and the new key.

use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroize as _;

use crate::key::{PrivateKey, PublicKey};

type HmacSha256 = Hmac<Sha256>;

const LABEL: &[u8] = b"meshd coordinator key notice v1";

/// Longest chain a host follows (one link per coordinator rotation it missed).
pub const MAX_CHAIN: usize = 64;

/// One rotation of the coordinator's key, for one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyNotice {
    pub old_key: PublicKey,
    pub new_key: PublicKey,
    /// HMAC-SHA256, base64 (see the module doc).
    pub tag: String,
    pub at_unix: u64,
}

/// `GET /v1/key-notices/HOSTKEY` (HOSTKEY in hex): the notices for that host, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyNoticesResponse {
    pub notices: Vec<KeyNotice>,
}

/// The path the coordinator serves notices on, outside the tunnel.
pub fn path(host: &PublicKey) -> String {
    format!("/v1/key-notices/{}", host.to_hex())
}

fn mac(shared: &[u8; 32], host: &PublicKey, old: &PublicKey, new: &PublicKey) -> [u8; 32] {
    let mut m = match HmacSha256::new_from_slice(shared) {
        Ok(m) => m,
        // HMAC takes keys of any length; unreachable.
        Err(_) => return [0; 32],
    };
    m.update(LABEL);
    m.update(&host.0);
    m.update(&old.0);
    m.update(&new.0);
    m.finalize().into_bytes().into()
}

/// The coordinator's side: a notice for `host` that the coordinator's key `old` (whose private
/// half is `old_private`) is replaced by `new`.
pub fn issue(
    old_private: &PrivateKey,
    host: &PublicKey,
    new: PublicKey,
    at_unix: u64,
) -> KeyNotice {
    use base64::Engine as _;
    let old = old_private.public_key();
    let mut shared = old_private.shared_secret(host);
    let tag = mac(&shared, host, &old, &new);
    shared.zeroize();
    KeyNotice {
        old_key: old,
        new_key: new,
        tag: base64::engine::general_purpose::STANDARD.encode(tag),
        at_unix,
    }
}

/// Why a host cannot take the notices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoticeError {
    #[error("no notice continues from the coordinator key {0} we know")]
    NoChain(String),
    #[error("the notice {old} -> {new} does not authenticate (wrong MAC): ignored")]
    BadTag { old: String, new: String },
    #[error("the notices form a chain longer than {MAX_CHAIN} links or a loop")]
    TooLong,
}

/// The host's side: follow the chain from the coordinator key `known` through `notices`,
/// checking each link with `host_private`. Returns the newest key the chain reaches (at least
/// one link must continue from `known`). A link with a wrong MAC stops everything: a forged
/// notice is never followed, whatever else the list holds.
pub fn follow(
    notices: &[KeyNotice],
    host_private: &PrivateKey,
    known: PublicKey,
) -> Result<PublicKey, NoticeError> {
    use base64::Engine as _;
    let host = host_private.public_key();
    let mut current = known;
    let mut steps = 0;
    while let Some(n) = notices.iter().find(|n| n.old_key == current) {
        if steps >= MAX_CHAIN {
            return Err(NoticeError::TooLong);
        }
        let mut shared = host_private.shared_secret(&n.old_key);
        let want = mac(&shared, &host, &n.old_key, &n.new_key);
        shared.zeroize();
        let got = base64::engine::general_purpose::STANDARD
            .decode(&n.tag)
            .unwrap_or_default();
        if !constant_eq(&got, &want) {
            return Err(NoticeError::BadTag {
                old: n.old_key.short(),
                new: n.new_key.short(),
            });
        }
        current = n.new_key;
        steps += 1;
    }
    if steps == 0 {
        return Err(NoticeError::NoChain(known.short()));
    }
    Ok(current)
}

use crate::wire::auth::constant_eq;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_follows_a_chain_of_notices_to_the_newest_key() {
        let host = PrivateKey::generate();
        let c1 = PrivateKey::generate();
        let c2 = PrivateKey::generate();
        let c3 = PrivateKey::generate();
        let h = host.public_key();
        let notices = vec![
            issue(&c1, &h, c2.public_key(), 10),
            issue(&c2, &h, c3.public_key(), 20),
        ];
        assert_eq!(
            follow(&notices, &host, c1.public_key()),
            Ok(c3.public_key())
        );
        assert_eq!(
            follow(&notices, &host, c2.public_key()),
            Ok(c3.public_key())
        );
        assert!(matches!(
            follow(&notices, &host, c3.public_key()),
            Err(NoticeError::NoChain(_))
        ));
    }

    #[test]
    fn forged_or_foreign_notices_are_refused() {
        let host = PrivateKey::generate();
        let other = PrivateKey::generate();
        let c1 = PrivateKey::generate();
        let attacker = PrivateKey::generate();
        let h = host.public_key();
        // Issued for another host: the MAC does not fit ours.
        let foreign = vec![issue(&c1, &other.public_key(), attacker.public_key(), 1)];
        assert!(matches!(
            follow(&foreign, &host, c1.public_key()),
            Err(NoticeError::BadTag { .. })
        ));
        // Signed by someone who does not hold the old coordinator key.
        let mut forged = issue(&attacker, &h, attacker.public_key(), 1);
        forged.old_key = c1.public_key();
        assert!(matches!(
            follow(&[forged], &host, c1.public_key()),
            Err(NoticeError::BadTag { .. })
        ));
        // A real notice whose new key was swapped.
        let mut swapped = issue(&c1, &h, PrivateKey::generate().public_key(), 1);
        swapped.new_key = attacker.public_key();
        assert!(follow(&[swapped], &host, c1.public_key()).is_err());
        // Garbage tags.
        let mut junk = issue(&c1, &h, attacker.public_key(), 1);
        junk.tag = "not base64!".into();
        assert!(follow(&[junk], &host, c1.public_key()).is_err());
    }

    #[test]
    fn a_loop_is_cut() {
        let host = PrivateKey::generate();
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let h = host.public_key();
        let notices = vec![
            issue(&a, &h, b.public_key(), 1),
            issue(&b, &h, a.public_key(), 2),
        ];
        assert_eq!(
            follow(&notices, &host, a.public_key()),
            Err(NoticeError::TooLong)
        );
    }

    #[test]
    fn notices_round_trip_as_json() {
        let host = PrivateKey::generate();
        let c1 = PrivateKey::generate();
        let n = issue(
            &c1,
            &host.public_key(),
            PrivateKey::generate().public_key(),
            5,
        );
        let resp = KeyNoticesResponse {
            notices: vec![n.clone()],
        };
        let json = serde_json::to_string(&resp).expect("json");
        let back: KeyNoticesResponse = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.notices, vec![n]);
        assert!(serde_json::from_str::<KeyNoticesResponse>(r#"{"notices":[],"x":1}"#).is_err());
    }
}
