//! Invitation tokens: one line, versioned, single use, expiring. A token carries everything a
//! new host needs to reach the coordinator through the tunnel, plus a throwaway private key
//! that the coordinator has already registered as that host's key (dead after the join).
//!
//! Wire form: `meshd1.` followed by base64url (no padding) of the JSON of `TokenBody` and a
//! 32-byte MAC (HMAC-SHA256 under a secret only the coordinator holds) over that JSON; the
//! coordinator checks the MAC at join time, so a tampered token is refused by name.
//!
//! TO BE IMPLEMENTED (issue 3).

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::key::{PrivateKey, PublicKey};

pub const TOKEN_PREFIX: &str = "meshd1.";

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBody {
    /// Random id of the invitation (hex), unique per coordinator.
    pub invite_id: String,
    pub coordinator_public_key: PublicKey,
    /// The coordinator's underlay endpoints (IP:port).
    pub coordinator_endpoints: Vec<SocketAddr>,
    /// The coordinator's mesh address, where its API listens (through the tunnel).
    pub coordinator_address: IpAddr,
    pub api_port: u16,
    pub mesh_cidr: IpNet,
    pub host_name: String,
    pub host_address: IpAddr,
    /// Base64 private key, registered on the coordinator as this host's key until the join.
    pub throwaway_private_key: String,
    pub expires_unix: u64,
    pub admin: bool,
}

/// A decoded token: the body, the exact JSON bytes the MAC covers, and the MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub body: TokenBody,
    pub signed: Vec<u8>,
    pub mac: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a meshd invitation token (it must start with {TOKEN_PREFIX})")]
    Prefix,
    #[error("the token is damaged: {0}")]
    Malformed(String),
    #[error("the token has been tampered with (its signature does not match)")]
    Tampered,
    #[error("the token expired")]
    Expired,
}

impl Token {
    /// Sign `body` with `secret` (coordinator side).
    pub fn sign(body: TokenBody, secret: &[u8; 32]) -> Token {
        let _ = (body, secret);
        todo!("issue 3")
    }
    /// The one-line wire form.
    pub fn encode(&self) -> String {
        todo!("issue 3")
    }
    /// Parse the wire form (joining side; the MAC is not checked here). Never panics.
    pub fn decode(s: &str) -> Result<Token, TokenError> {
        let _ = s;
        todo!("issue 3")
    }
    /// Check the MAC and expiry (coordinator side, `now` in seconds since the UNIX epoch).
    pub fn verify(&self, secret: &[u8; 32], now_unix: u64) -> Result<(), TokenError> {
        let _ = (secret, now_unix);
        todo!("issue 3")
    }
    pub fn throwaway_key(&self) -> Result<PrivateKey, TokenError> {
        todo!("issue 3")
    }
    pub fn throwaway_public_key(&self) -> Result<PublicKey, TokenError> {
        todo!("issue 3")
    }
}
