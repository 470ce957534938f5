//! WireGuard keys as newtypes. Keys cross crate boundaries as `[u8; 32]`.
//!
//! TO BE IMPLEMENTED (helper): base64 (standard, 44 chars with padding) Display/FromStr,
//! serde as base64 strings, hex for UAPI (`to_hex`/`from_hex`), generation, public-from-private.

/// A Curve25519 public key. `Display`/`FromStr`/serde use standard base64 (44 chars).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

/// A Curve25519 private key. Never printed: `Debug` shows `PrivateKey(<redacted>)`;
/// zeroized on drop. `to_base64()` is explicit for writing the key file only.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

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

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({:02x}{:02x}{:02x}{:02x}..)", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}
