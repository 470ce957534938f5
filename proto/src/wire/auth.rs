//! Proof of key on every control-plane request (auth v1).
//!
//! A mesh source address alone is not an identity: any local process on a host can open a
//! connection through the host's tunnel. So every request to the coordinator API proves that
//! the caller holds the private key of the host it claims to be, and every answer proves that
//! it comes from the holder of the coordinator's private key.
//!
//! **Key.** Host and coordinator share the X25519 secret of their static keys, which only the
//! two key holders can compute. The MAC key is HMAC-SHA256 keyed with that secret over a label
//! and both public keys ([`AuthKey`]). An all-zero secret (a low-order public key) is refused.
//!
//! **Request.** Header [`AUTH_HEADER`]: `v1 key=K coord=C ts=T nonce=N mac=M` where `K` is the
//! caller's public key, `C` the coordinator key it signed for (both base64url), `T` the
//! caller's Unix time, `N` 16 random bytes (hex) and `M` HMAC-SHA256 (base64url) over the
//! label, the method, the path with query, `K`, `C`, `T`, `N` and SHA-256 of the body, each
//! length-prefixed. The coordinator accepts `T` within [`WINDOW_SECS`] of its own clock and
//! each `(K, N)` once ([`NonceCache`], which keeps nonces for twice the window).
//!
//! **A second key.** A request that introduces a key (a join's new key, a rotation's next key)
//! carries [`NEXT_HEADER`] as well: the same fields and the same `T` and `N`, with `K` the new
//! key and `M` computed with the new key's [`AuthKey`]. So nobody can register a key whose
//! private half they do not hold.
//!
//! **Answer.** Header [`AUTH_HEADER`] on the response: `v1 mac=M` with `M` HMAC-SHA256 under
//! the request's [`AuthKey`] over the label, the request's nonce, the status code and SHA-256
//! of the body. The caller checks it against the nonce it sent, so an answer cannot be replayed
//! to another request, and a process squatting the port while meshd is down cannot answer.
//!
//! **Versions.** The first word of the header is the scheme version. A coordinator answers an
//! unknown version with 400 and lists what it speaks in [`VERSIONS_HEADER`], so a later scheme
//! can be negotiated.
//!
//! Everything here is pure: time comes in as an argument, randomness (the nonce) too.

use std::collections::{BTreeMap, HashMap};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroize as _;

use crate::key::{PrivateKey, PublicKey};

type HmacSha256 = Hmac<Sha256>;

/// The request and response header carrying the proof.
pub const AUTH_HEADER: &str = "x-meshd-auth";
/// The request header proving a second key (a join's new key, a rotation's next key).
pub const NEXT_HEADER: &str = "x-meshd-auth-next";
/// The response header listing the auth versions the coordinator speaks (on 400 and 401).
pub const VERSIONS_HEADER: &str = "x-meshd-auth-versions";
/// The only version so far.
pub const VERSION: &str = "v1";
/// How far a request's time may be from the coordinator's clock, either way.
pub const WINDOW_SECS: u64 = 300;
/// Nonce length in bytes.
pub const NONCE_LEN: usize = 16;
/// Longest header value accepted (a v1 header is about 190 bytes).
pub const MAX_HEADER_LEN: usize = 512;

const KEY_LABEL: &[u8] = b"meshd control-plane key v1";
const REQUEST_LABEL: &[u8] = b"meshd request v1";
const RESPONSE_LABEL: &[u8] = b"meshd response v1";

/// Why a proof is refused. The messages are what an operator reads in the log and in the
/// caller's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "the request is not signed: the coordinator needs every request to prove the caller's \
         key (auth {VERSION}); update meshd on the calling host"
    )]
    Missing,
    #[error("auth scheme {0:?} is not spoken here (this side speaks {VERSION})")]
    UnsupportedVersion(String),
    #[error("malformed auth header: {0}")]
    Malformed(String),
    #[error("the public key {0} is of low order (no shared secret): refused")]
    WeakKey(String),
    #[error(
        "the request was signed for coordinator key {0}, which is not this coordinator's: the \
         caller follows another or an old coordinator key"
    )]
    WrongCoordinator(String),
    #[error("the key {0} is not a host of this mesh (or no longer: rotated away or removed)")]
    UnknownKey(String),
    #[error("the key {key} belongs to {expected}, but the request came from {caller}")]
    WrongAddress {
        key: String,
        expected: String,
        caller: String,
    },
    #[error("the signature does not verify for key {0}: refused")]
    BadMac(String),
    #[error(
        "the request's time is {skew_secs} s off this host's clock (at most {WINDOW_SECS} s \
         are accepted): check both clocks (NTP)"
    )]
    Stale { skew_secs: u64 },
    #[error("the request was replayed (its nonce was seen before): refused")]
    Replayed,
    #[error("too many signed requests from key {0} in the last {WINDOW_SECS} s: slow down")]
    TooMany(String),
    #[error("the second key proof does not match the request (it must repeat its ts and nonce)")]
    NextMismatch,
    #[error("the answer carries no proof of the coordinator's key")]
    AnswerUnsigned,
    #[error("the answer's proof does not verify: it does not come from the coordinator's key")]
    AnswerForged,
}

/// The MAC key a host and the coordinator share (see the module doc). Zeroized on drop.
#[derive(Clone)]
pub struct AuthKey {
    mac_key: [u8; 32],
    host: PublicKey,
    coordinator: PublicKey,
}

impl Drop for AuthKey {
    fn drop(&mut self) {
        self.mac_key.zeroize();
    }
}

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthKey")
            .field("host", &self.host)
            .field("coordinator", &self.coordinator)
            .finish_non_exhaustive()
    }
}

fn hmac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: this cannot fail.
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    }
}

#[cold]
fn unreachable_hmac() -> HmacSha256 {
    // new_from_slice only fails for fixed-size MACs; HMAC has none. Keyed with zeros rather
    // than panicking, which can only make every proof fail.
    <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default())
}

fn put(m: &mut HmacSha256, field: &[u8]) {
    m.update(&(field.len() as u32).to_be_bytes());
    m.update(field);
}

impl AuthKey {
    fn derive(mut shared: [u8; 32], host: PublicKey, coordinator: PublicKey) -> Option<AuthKey> {
        if shared == [0u8; 32] {
            return None;
        }
        let mut m = hmac(&shared);
        shared.zeroize();
        put(&mut m, KEY_LABEL);
        put(&mut m, &host.0);
        put(&mut m, &coordinator.0);
        Some(AuthKey {
            mac_key: m.finalize().into_bytes().into(),
            host,
            coordinator,
        })
    }

    /// The host's side: its private key and the coordinator's public key.
    pub fn for_host(host: &PrivateKey, coordinator: &PublicKey) -> Result<AuthKey, AuthError> {
        AuthKey::derive(
            host.shared_secret(coordinator),
            host.public_key(),
            *coordinator,
        )
        .ok_or_else(|| AuthError::WeakKey(coordinator.short()))
    }

    /// The coordinator's side: its private key and the host's public key.
    pub fn for_coordinator(
        coordinator: &PrivateKey,
        host: &PublicKey,
    ) -> Result<AuthKey, AuthError> {
        AuthKey::derive(
            coordinator.shared_secret(host),
            *host,
            coordinator.public_key(),
        )
        .ok_or_else(|| AuthError::WeakKey(host.short()))
    }

    /// A key kept by the coordinator past its own key's life (for key notices, see
    /// `crate::wire::notice`): the raw MAC key as [`AuthKey::raw`] returned it.
    pub fn from_raw(raw: [u8; 32], host: PublicKey, coordinator: PublicKey) -> AuthKey {
        AuthKey {
            mac_key: raw,
            host,
            coordinator,
        }
    }

    /// The raw MAC key, to store (it is as secret as the token secret).
    pub fn raw(&self) -> [u8; 32] {
        self.mac_key
    }

    pub fn host(&self) -> PublicKey {
        self.host
    }

    pub fn coordinator(&self) -> PublicKey {
        self.coordinator
    }

    fn request_mac(
        &self,
        method: &str,
        path: &str,
        ts: u64,
        nonce: &[u8; 16],
        body: &[u8],
    ) -> [u8; 32] {
        let mut m = hmac(&self.mac_key);
        put(&mut m, REQUEST_LABEL);
        put(&mut m, method.to_ascii_uppercase().as_bytes());
        put(&mut m, path.as_bytes());
        put(&mut m, &self.host.0);
        put(&mut m, &self.coordinator.0);
        put(&mut m, &ts.to_be_bytes());
        put(&mut m, nonce);
        put(&mut m, &Sha256::digest(body));
        m.finalize().into_bytes().into()
    }

    fn response_mac(&self, nonce: &[u8; 16], status: u16, body: &[u8]) -> [u8; 32] {
        let mut m = hmac(&self.mac_key);
        put(&mut m, RESPONSE_LABEL);
        put(&mut m, &self.host.0);
        put(&mut m, &self.coordinator.0);
        put(&mut m, nonce);
        put(&mut m, &status.to_be_bytes());
        put(&mut m, &Sha256::digest(body));
        m.finalize().into_bytes().into()
    }

    /// Sign a request. `nonce` must be fresh random bytes for every request.
    pub fn sign(&self, method: &str, path: &str, body: &[u8], ts: u64, nonce: [u8; 16]) -> Proof {
        Proof {
            key: self.host,
            coordinator: self.coordinator,
            ts,
            nonce,
            mac: self.request_mac(method, path, ts, &nonce, body),
        }
    }

    /// Check a request's MAC (only the MAC: time and replay are [`check_time`] and
    /// [`NonceCache`]). The proof must name this key's host and coordinator.
    pub fn verify(
        &self,
        proof: &Proof,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(), AuthError> {
        if proof.key != self.host {
            return Err(AuthError::UnknownKey(proof.key.short()));
        }
        if proof.coordinator != self.coordinator {
            return Err(AuthError::WrongCoordinator(proof.coordinator.short()));
        }
        let want = self.request_mac(method, path, proof.ts, &proof.nonce, body);
        if constant_eq(&want, &proof.mac) {
            Ok(())
        } else {
            Err(AuthError::BadMac(proof.key.short()))
        }
    }

    /// The answer's header value for a request with `nonce`.
    pub fn sign_response(&self, nonce: &[u8; 16], status: u16, body: &[u8]) -> String {
        format!(
            "{VERSION} mac={}",
            URL_SAFE_NO_PAD.encode(self.response_mac(nonce, status, body))
        )
    }

    /// Check an answer's header (`None`: it had none) against the nonce we sent.
    pub fn verify_response(
        &self,
        header: Option<&str>,
        nonce: &[u8; 16],
        status: u16,
        body: &[u8],
    ) -> Result<(), AuthError> {
        let header = header.ok_or(AuthError::AnswerUnsigned)?;
        let fields = fields(header)?;
        let mac = fields
            .get("mac")
            .ok_or_else(|| AuthError::Malformed("no mac".into()))
            .and_then(|v| decode32(v, "mac"))?;
        if constant_eq(&self.response_mac(nonce, status, body), &mac) {
            Ok(())
        } else {
            Err(AuthError::AnswerForged)
        }
    }
}

/// A request's proof, as carried in [`AUTH_HEADER`] (or [`NEXT_HEADER`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    pub key: PublicKey,
    pub coordinator: PublicKey,
    pub ts: u64,
    pub nonce: [u8; 16],
    pub mac: [u8; 32],
}

fn decode32(v: &str, what: &str) -> Result<[u8; 32], AuthError> {
    URL_SAFE_NO_PAD
        .decode(v)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| AuthError::Malformed(format!("{what} is not 32 bytes of base64url")))
}

/// `v1 a=b c=d`: the version checked, the fields in a map (each at most once).
fn fields(header: &str) -> Result<BTreeMap<&str, &str>, AuthError> {
    if header.len() > MAX_HEADER_LEN {
        return Err(AuthError::Malformed(format!(
            "longer than {MAX_HEADER_LEN} bytes"
        )));
    }
    let mut words = header.split_ascii_whitespace();
    let version = words.next().ok_or(AuthError::Missing)?;
    if version != VERSION {
        let shown: String = version.chars().take(16).collect();
        return Err(AuthError::UnsupportedVersion(shown));
    }
    let mut out = BTreeMap::new();
    for w in words {
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| AuthError::Malformed("expected key=value fields".into()))?;
        if out.insert(k, v).is_some() {
            return Err(AuthError::Malformed(format!("field {k} given twice")));
        }
    }
    Ok(out)
}

impl Proof {
    /// The header value.
    pub fn header_value(&self) -> String {
        format!(
            "{VERSION} key={} coord={} ts={} nonce={} mac={}",
            URL_SAFE_NO_PAD.encode(self.key.0),
            URL_SAFE_NO_PAD.encode(self.coordinator.0),
            self.ts,
            hex(&self.nonce),
            URL_SAFE_NO_PAD.encode(self.mac),
        )
    }

    /// Parse a header value. Unknown fields are refused (a later version uses a new version
    /// word instead).
    pub fn parse(header: &str) -> Result<Proof, AuthError> {
        let f = fields(header)?;
        for k in f.keys() {
            if !matches!(*k, "key" | "coord" | "ts" | "nonce" | "mac") {
                let shown: String = k.chars().take(16).collect();
                return Err(AuthError::Malformed(format!("unknown field {shown:?}")));
            }
        }
        let get = |k: &str| {
            f.get(k)
                .copied()
                .ok_or_else(|| AuthError::Malformed(format!("no {k} field")))
        };
        let ts_text = get("ts")?;
        if ts_text.is_empty() || ts_text.len() > 20 || !ts_text.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(AuthError::Malformed(
                "ts is not a Unix time in seconds".into(),
            ));
        }
        let ts = ts_text
            .parse()
            .map_err(|_| AuthError::Malformed("ts is not a Unix time in seconds".into()))?;
        let nonce_text = get("nonce")?;
        let nonce = unhex16(nonce_text).ok_or_else(|| {
            AuthError::Malformed(format!("nonce is not {NONCE_LEN} bytes of hex"))
        })?;
        Ok(Proof {
            key: PublicKey(decode32(get("key")?, "key")?),
            coordinator: PublicKey(decode32(get("coord")?, "coord")?),
            ts,
            nonce,
            mac: decode32(get("mac")?, "mac")?,
        })
    }

    /// The second proof of a request must repeat its time and nonce.
    pub fn check_next(&self, next: &Proof) -> Result<(), AuthError> {
        if next.ts != self.ts || next.nonce != self.nonce || next.coordinator != self.coordinator {
            return Err(AuthError::NextMismatch);
        }
        Ok(())
    }
}

/// Is `ts` within [`WINDOW_SECS`] of `now`?
pub fn check_time(ts: u64, now_unix: u64) -> Result<(), AuthError> {
    let skew = ts.abs_diff(now_unix);
    if skew > WINDOW_SECS {
        Err(AuthError::Stale { skew_secs: skew })
    } else {
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 2 * NONCE_LEN || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Equal lengths and bytes, in time independent of where they differ.
pub(crate) fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Nonces seen in the last `2 ×` [`WINDOW_SECS`], per key, to refuse replays. Only requests
/// whose MAC verified are recorded, so only key holders can fill it; each key may hold at most
/// `per_key` nonces and all keys together `total` (then requests are refused with
/// [`AuthError::TooMany`] until old nonces expire: never evicted early, which would reopen
/// the replay window).
#[derive(Debug)]
pub struct NonceCache {
    seen: HashMap<(PublicKey, [u8; 16]), u64>,
    by_expiry: BTreeMap<(u64, PublicKey, [u8; 16]), ()>,
    per_key: HashMap<PublicKey, usize>,
    per_key_cap: usize,
    total_cap: usize,
}

impl NonceCache {
    pub fn new(per_key_cap: usize, total_cap: usize) -> Self {
        NonceCache {
            seen: HashMap::new(),
            by_expiry: BTreeMap::new(),
            per_key: HashMap::new(),
            per_key_cap,
            total_cap,
        }
    }

    /// How many nonces are held.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn expire(&mut self, now_unix: u64) {
        while let Some((&(at, key, nonce), ())) = self.by_expiry.first_key_value() {
            if at > now_unix {
                break;
            }
            self.by_expiry.pop_first();
            self.seen.remove(&(key, nonce));
            if let Some(n) = self.per_key.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.per_key.remove(&key);
                }
            }
        }
    }

    /// Record `(key, nonce)` of a verified request with time `ts`; refuse a replay.
    pub fn check_and_insert(
        &mut self,
        key: PublicKey,
        nonce: [u8; 16],
        ts: u64,
        now_unix: u64,
    ) -> Result<(), AuthError> {
        self.expire(now_unix);
        if self.seen.contains_key(&(key, nonce)) {
            return Err(AuthError::Replayed);
        }
        let held = self.per_key.get(&key).copied().unwrap_or(0);
        if held >= self.per_key_cap || self.seen.len() >= self.total_cap {
            return Err(AuthError::TooMany(key.short()));
        }
        // Kept until the request's time has left the window for sure.
        let until = ts.max(now_unix).saturating_add(2 * WINDOW_SECS);
        self.seen.insert((key, nonce), until);
        self.by_expiry.insert((until, key, nonce), ());
        *self.per_key.entry(key).or_insert(0) += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (PrivateKey, PrivateKey) {
        (PrivateKey::generate(), PrivateKey::generate())
    }

    #[test]
    fn host_and_coordinator_derive_the_same_key_and_verify() {
        let (host, coord) = pair();
        let h = AuthKey::for_host(&host, &coord.public_key()).expect("host key");
        let c = AuthKey::for_coordinator(&coord, &host.public_key()).expect("coord key");
        assert_eq!(h.raw(), c.raw());
        let p = h.sign("POST", "/v1/endpoints", b"{}", 1000, [7; 16]);
        let parsed = Proof::parse(&p.header_value()).expect("parse");
        assert_eq!(parsed, p);
        c.verify(&parsed, "POST", "/v1/endpoints", b"{}")
            .expect("verifies");
        let resp = c.sign_response(&p.nonce, 200, b"ok");
        h.verify_response(Some(&resp), &p.nonce, 200, b"ok")
            .expect("answer verifies");
    }

    #[test]
    fn any_change_to_the_request_breaks_the_mac() {
        let (host, coord) = pair();
        let h = AuthKey::for_host(&host, &coord.public_key()).expect("host key");
        let c = AuthKey::for_coordinator(&coord, &host.public_key()).expect("coord key");
        let p = h.sign("POST", "/v1/rotate/commit", b"body", 1000, [1; 16]);
        assert!(c.verify(&p, "POST", "/v1/rotate/commit", b"body").is_ok());
        for (m, path, body) in [
            ("GET", "/v1/rotate/commit", &b"body"[..]),
            ("POST", "/v1/rotate/prepare", b"body"),
            ("POST", "/v1/rotate/commit", b"bodz"),
        ] {
            assert!(matches!(
                c.verify(&p, m, path, body),
                Err(AuthError::BadMac(_))
            ));
        }
        let mut later = p.clone();
        later.ts += 1;
        assert!(matches!(
            c.verify(&later, "POST", "/v1/rotate/commit", b"body"),
            Err(AuthError::BadMac(_))
        ));
        let mut other_nonce = p.clone();
        other_nonce.nonce[0] ^= 1;
        assert!(c
            .verify(&other_nonce, "POST", "/v1/rotate/commit", b"body")
            .is_err());
    }

    #[test]
    fn another_key_cannot_sign_for_a_host() {
        let (host, coord) = pair();
        let thief = PrivateKey::generate();
        let c = AuthKey::for_coordinator(&coord, &host.public_key()).expect("coord key");
        let t = AuthKey::for_host(&thief, &coord.public_key()).expect("thief key");
        let mut p = t.sign("GET", "/v1/admin/hosts", b"", 1000, [2; 16]);
        // Claiming the host's key with a MAC under the thief's key fails.
        p.key = host.public_key();
        assert!(matches!(
            c.verify(&p, "GET", "/v1/admin/hosts", b""),
            Err(AuthError::BadMac(_))
        ));
    }

    #[test]
    fn answers_are_bound_to_the_request_and_the_key() {
        let (host, coord) = pair();
        let h = AuthKey::for_host(&host, &coord.public_key()).expect("host key");
        let c = AuthKey::for_coordinator(&coord, &host.public_key()).expect("coord key");
        let v = c.sign_response(&[3; 16], 200, b"netmap");
        assert_eq!(
            h.verify_response(Some(&v), &[4; 16], 200, b"netmap"),
            Err(AuthError::AnswerForged)
        );
        assert_eq!(
            h.verify_response(Some(&v), &[3; 16], 304, b"netmap"),
            Err(AuthError::AnswerForged)
        );
        assert_eq!(
            h.verify_response(Some(&v), &[3; 16], 200, b"netmaq"),
            Err(AuthError::AnswerForged)
        );
        assert_eq!(
            h.verify_response(None, &[3; 16], 200, b"netmap"),
            Err(AuthError::AnswerUnsigned)
        );
        // A squatter with its own key cannot answer for the coordinator.
        let squatter = PrivateKey::generate();
        let s = AuthKey::for_coordinator(&squatter, &host.public_key()).expect("squatter");
        let forged = s.sign_response(&[3; 16], 200, b"netmap");
        assert_eq!(
            h.verify_response(Some(&forged), &[3; 16], 200, b"netmap"),
            Err(AuthError::AnswerForged)
        );
    }

    #[test]
    fn low_order_keys_are_refused() {
        let host = PrivateKey::generate();
        let zero = PublicKey([0; 32]);
        assert!(matches!(
            AuthKey::for_host(&host, &zero),
            Err(AuthError::WeakKey(_))
        ));
        assert!(matches!(
            AuthKey::for_coordinator(&host, &zero),
            Err(AuthError::WeakKey(_))
        ));
    }

    #[test]
    fn malformed_headers_get_clear_errors() {
        let (host, coord) = pair();
        let h = AuthKey::for_host(&host, &coord.public_key()).expect("host key");
        let good = h.sign("GET", "/", b"", 5, [9; 16]).header_value();
        assert_eq!(Proof::parse(""), Err(AuthError::Missing));
        assert!(
            matches!(Proof::parse("v2 key=x"), Err(AuthError::UnsupportedVersion(v)) if v == "v2")
        );
        assert!(matches!(
            Proof::parse("v1 key"),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            Proof::parse(&format!("{good} key=x")),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            Proof::parse(&format!("{good} extra=1")),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            Proof::parse(&good.replace("ts=5", "ts=-5")),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            Proof::parse(&good.replace("ts=5", "ts=99999999999999999999999")),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            Proof::parse(&good.replace("nonce=09", "nonce=zz")),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            Proof::parse(&"v1 ".repeat(300)),
            Err(AuthError::Malformed(_))
        ));
        let no_mac: String = good.split(" mac=").next().unwrap_or_default().to_string();
        assert!(matches!(
            Proof::parse(&no_mac),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn time_window() {
        assert!(check_time(1000, 1000 + WINDOW_SECS).is_ok());
        assert!(check_time(1000 + WINDOW_SECS, 1000).is_ok());
        assert_eq!(
            check_time(1000, 1001 + WINDOW_SECS),
            Err(AuthError::Stale {
                skew_secs: WINDOW_SECS + 1
            })
        );
        assert!(check_time(u64::MAX, 0).is_err());
    }

    #[test]
    fn nonce_cache_refuses_replays_caps_and_expires() {
        let k1 = PrivateKey::generate().public_key();
        let k2 = PrivateKey::generate().public_key();
        let mut c = NonceCache::new(2, 3);
        assert!(c.check_and_insert(k1, [1; 16], 100, 100).is_ok());
        assert_eq!(
            c.check_and_insert(k1, [1; 16], 100, 101),
            Err(AuthError::Replayed)
        );
        // The same nonce under another key is another request.
        assert!(c.check_and_insert(k2, [1; 16], 100, 101).is_ok());
        assert!(c.check_and_insert(k1, [2; 16], 100, 101).is_ok());
        assert!(matches!(
            c.check_and_insert(k1, [3; 16], 100, 101),
            Err(AuthError::TooMany(_))
        ));
        assert!(matches!(
            c.check_and_insert(k2, [3; 16], 100, 101),
            Err(AuthError::TooMany(_))
        ));
        // A replay inside the window is still refused just before expiry...
        let end = 100 + 2 * WINDOW_SECS;
        assert_eq!(
            c.check_and_insert(k1, [1; 16], 100, end - 1),
            Err(AuthError::Replayed)
        );
        // ...and after it the time check refuses it anyway; the cache is empty again.
        assert!(check_time(100, end).is_err());
        assert!(c.check_and_insert(k1, [5; 16], end + 1, end + 1).is_ok());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_next_proof_must_repeat_time_and_nonce() {
        let (host, coord) = pair();
        let next = PrivateKey::generate();
        let h = AuthKey::for_host(&host, &coord.public_key()).expect("host");
        let n = AuthKey::for_host(&next, &coord.public_key()).expect("next");
        let p = h.sign("POST", "/v1/rotate/prepare", b"x", 10, [1; 16]);
        assert!(p
            .check_next(&n.sign("POST", "/v1/rotate/prepare", b"x", 10, [1; 16]))
            .is_ok());
        assert_eq!(
            p.check_next(&n.sign("POST", "/v1/rotate/prepare", b"x", 11, [1; 16])),
            Err(AuthError::NextMismatch)
        );
        assert_eq!(
            p.check_next(&n.sign("POST", "/v1/rotate/prepare", b"x", 10, [2; 16])),
            Err(AuthError::NextMismatch)
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,600}") {
            let _ = Proof::parse(&s);
        }

        #[test]
        fn header_round_trips(ts in proptest::num::u64::ANY, nonce in proptest::array::uniform16(0u8..), mac in proptest::array::uniform32(0u8..)) {
            let p = Proof { key: PublicKey([1; 32]), coordinator: PublicKey([2; 32]), ts, nonce, mac };
            proptest::prop_assert_eq!(Proof::parse(&p.header_value()), Ok(p));
        }
    }
}
