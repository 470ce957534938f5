//! WireGuard keys as newtypes. Keys cross crate boundaries as `[u8; 32]`.
//!
//! Text forms: standard base64 with padding (exactly 44 characters, as `wg(8)` prints them) for
//! `Display`/`FromStr`/serde, lowercase hex (64 characters) for the UAPI.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand_core::RngCore as _;
use zeroize::Zeroize as _;

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a key in base64 (with padding).
pub const KEY_BASE64_LEN: usize = 44;

/// A Curve25519 public key. `Display`/`FromStr`/serde use standard base64 (44 chars).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

/// A Curve25519 private key. Never printed: `Debug` shows `PrivateKey(<redacted>)`;
/// zeroized on drop. `to_base64()` is explicit for writing the key file only.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64: {0}")]
    Base64(String),
    #[error("not valid hex: {0}")]
    Hex(String),
    #[error("a WireGuard key is 32 bytes, this one is {0}")]
    Length(usize),
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PublicKey({:02x}{:02x}{:02x}{:02x}..)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

fn decode_base64(s: &str) -> Result<[u8; 32], KeyError> {
    let s = s.trim();
    if s.len() != KEY_BASE64_LEN {
        // Report the decoded length when it is decodable, else the character count.
        return match STANDARD.decode(s) {
            Ok(bytes) => Err(KeyError::Length(bytes.len())),
            Err(_) => Err(KeyError::Base64(format!(
                "expected {KEY_BASE64_LEN} characters of standard base64, got {}",
                s.len()
            ))),
        };
    }
    let bytes = STANDARD
        .decode(s)
        .map_err(|e| KeyError::Base64(e.to_string()))?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| KeyError::Length(len))
}

fn encode_hex(bytes: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decode 64 hex characters (either case) into 32 bytes.
pub fn decode_hex(s: &str) -> Result<[u8; 32], KeyError> {
    let raw = s.as_bytes();
    if raw.len() != 64 {
        if raw.len().is_multiple_of(2) && raw.iter().all(|&c| hex_val(c).is_some()) {
            return Err(KeyError::Length(raw.len() / 2));
        }
        return Err(KeyError::Hex(format!(
            "expected 64 hex characters, got {}",
            s.chars().count()
        )));
    }
    let mut out = [0u8; 32];
    for (i, pair) in raw.chunks_exact(2).enumerate() {
        match (hex_val(pair[0]), hex_val(pair[1])) {
            (Some(hi), Some(lo)) => out[i] = (hi << 4) | lo,
            _ => {
                return Err(KeyError::Hex(format!(
                    "invalid hex digit near position {}",
                    i * 2
                )))
            }
        }
    }
    Ok(out)
}

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Lowercase hex, 64 characters (UAPI form).
    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    /// Parse 64 hex characters (UAPI form).
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        decode_hex(s).map(PublicKey)
    }

    /// The first 8 base64 characters, for tables and logs.
    pub fn short(&self) -> String {
        let mut s = self.to_base64();
        s.truncate(8);
        s
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode_base64(s).map(PublicKey)
    }
}

impl From<[u8; 32]> for PublicKey {
    fn from(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }
}

impl From<PublicKey> for [u8; 32] {
    fn from(k: PublicKey) -> Self {
        k.0
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PublicKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a WireGuard public key in standard base64 (44 characters)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PublicKey, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(V)
    }
}

impl PrivateKey {
    /// A fresh random key from the operating system's RNG, clamped as X25519 does (the same
    /// as `wg genkey`).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut bytes);
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        let key = PrivateKey(bytes);
        bytes.zeroize();
        key
    }

    /// Wrap raw bytes (not clamped; X25519 clamps when it uses the key, as WireGuard does).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PrivateKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Base64 for writing the key file (the same format as `wg genkey`). Never log it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Parse the key file format (`wg genkey` output; surrounding whitespace is ignored).
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode_base64(s).map(PrivateKey)
    }

    /// Lowercase hex (UAPI form). Never log it.
    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        decode_hex(s).map(PrivateKey)
    }

    /// The X25519 shared secret with `peer` (the same value the peer computes from its
    /// private key and our public key). The caller zeroizes it when done.
    pub fn shared_secret(&self, peer: &PublicKey) -> [u8; 32] {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer.0))
            .to_bytes()
    }

    /// The matching public key (X25519 base-point multiplication of the clamped scalar).
    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        PrivateKey::from_base64(s)
    }
}

impl From<[u8; 32]> for PrivateKey {
    fn from(bytes: [u8; 32]) -> Self {
        PrivateKey(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7748 section 6.1 (X25519 Diffie-Hellman) test vector: Alice's key pair.
    const ALICE_PRIV_HEX: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
    const ALICE_PUB_HEX: &str = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";

    #[test]
    fn rfc7748_vector() {
        let sk = PrivateKey::from_hex(ALICE_PRIV_HEX).unwrap();
        assert_eq!(sk.public_key().to_hex(), ALICE_PUB_HEX);
    }

    #[test]
    fn wg_pubkey_vector() {
        // The same RFC 7748 key pair in the base64 form `wg genkey` / `wg pubkey` use.
        let sk: PrivateKey = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo="
            .parse()
            .unwrap();
        assert_eq!(sk.to_hex(), ALICE_PRIV_HEX);
        assert_eq!(
            sk.public_key().to_string(),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
    }

    #[test]
    fn base64_round_trip() {
        let k = PublicKey([7; 32]);
        let s = k.to_string();
        assert_eq!(s.len(), 44);
        assert_eq!(s.parse::<PublicKey>().unwrap(), k);
        assert_eq!(k.short(), s[..8]);
    }

    #[test]
    fn hex_round_trip() {
        let k = PublicKey([0xab; 32]);
        let h = k.to_hex();
        assert_eq!(h, "ab".repeat(32));
        assert_eq!(PublicKey::from_hex(&h).unwrap(), k);
        assert_eq!(PublicKey::from_hex(&"AB".repeat(32)).unwrap(), k);
        assert!(PublicKey::from_hex(&"ab".repeat(31)).is_err());
        assert!(PublicKey::from_hex(&"zz".repeat(32)).is_err());
        assert!(PublicKey::from_hex("é").is_err());
    }

    #[test]
    fn rejects_bad_base64() {
        let good = PublicKey([1; 32]).to_string();
        assert!(good[..43].parse::<PublicKey>().is_err());
        assert!(format!("{good}A").parse::<PublicKey>().is_err());
        assert!("!".repeat(44).parse::<PublicKey>().is_err());
        assert!("".parse::<PublicKey>().is_err());
        // 31 bytes also encode to 44 characters: refused by length, not by alphabet.
        let short = STANDARD.encode([1u8; 31]);
        assert_eq!(short.len(), 44);
        assert_eq!(short.parse::<PublicKey>(), Err(KeyError::Length(31)));
        let long = STANDARD.encode([1u8; 33]);
        assert_eq!(long.parse::<PublicKey>(), Err(KeyError::Length(33)));
    }

    #[test]
    fn generate_and_derive() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        assert_ne!(a, b);
        assert_eq!(a.public_key(), a.public_key());
        assert_ne!(a.public_key(), b.public_key());
        let back = PrivateKey::from_base64(&a.to_base64()).unwrap();
        assert_eq!(back, a);
        assert_eq!(format!("{a:?}"), "PrivateKey(<redacted>)");
        // Generated keys are clamped.
        assert_eq!(a.as_bytes()[0] & 7, 0);
        assert_eq!(a.as_bytes()[31] & 0x80, 0);
        assert_eq!(a.as_bytes()[31] & 0x40, 0x40);
    }

    #[test]
    fn serde_as_base64() {
        let k = PublicKey([9; 32]);
        let j = serde_json::to_string(&k).unwrap();
        assert_eq!(j, format!("\"{k}\""));
        assert_eq!(serde_json::from_str::<PublicKey>(&j).unwrap(), k);
        assert!(serde_json::from_str::<PublicKey>("\"abc\"").is_err());
    }
}
