//! Invitation tokens: one line, versioned, single use, expiring. A token carries everything a
//! new host needs to reach the coordinator through the tunnel, plus a throwaway private key
//! that the coordinator has already registered as that host's key (dead after the join).
//!
//! Wire form: `meshd1.` followed by base64url without padding (RFC 4648 §5) of
//!
//! ```text
//! json_len: u32 big-endian || json: json_len bytes (the JSON of TokenBody) || mac: 32 bytes
//! ```
//!
//! where `mac` is HMAC-SHA256, under a 32-byte secret only the coordinator holds, over exactly
//! those `json` bytes. The coordinator checks the MAC (in constant time) at join time, so a
//! tampered token is refused by name. Surrounding whitespace is ignored when decoding; anything
//! else that does not frame exactly (wrong length, trailing bytes, non-canonical base64) is
//! `Malformed`, or `Incomplete` where it was cut short; whitespace inside (a wrapped line) is
//! dropped first.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::key::{PrivateKey, PublicKey};

type HmacSha256 = Hmac<Sha256>;

/// Tokens longer than this (characters after the prefix) are refused before decoding.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

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
    #[error(
        "the token is incomplete: it was probably copied only partly (copy the whole line \
         `meshctl invite` printed, from {TOKEN_PREFIX} to its end)"
    )]
    Incomplete,
    #[error("the token has been tampered with (its signature does not match)")]
    Tampered,
    #[error("the token expired")]
    Expired,
}

fn hmac(secret: &[u8; 32]) -> Option<HmacSha256> {
    // HMAC accepts keys of any length: this never fails.
    HmacSha256::new_from_slice(secret).ok()
}

impl Token {
    /// Sign `body` with `secret` (coordinator side).
    pub fn sign(body: TokenBody, secret: &[u8; 32]) -> Token {
        // Serializing a struct of strings, numbers and addresses cannot fail.
        let signed = serde_json::to_vec(&body).unwrap_or_default();
        let mut mac = [0u8; 32];
        if let Some(mut m) = hmac(secret) {
            m.update(&signed);
            mac.copy_from_slice(&m.finalize().into_bytes());
        }
        Token { body, signed, mac }
    }

    /// The one-line wire form.
    pub fn encode(&self) -> String {
        let len = u32::try_from(self.signed.len()).unwrap_or(u32::MAX);
        let mut raw = Vec::with_capacity(4 + self.signed.len() + 32);
        raw.extend_from_slice(&len.to_be_bytes());
        raw.extend_from_slice(&self.signed);
        raw.extend_from_slice(&self.mac);
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw))
    }

    /// Parse the wire form (joining side; the MAC is not checked here). Never panics.
    pub fn decode(s: &str) -> Result<Token, TokenError> {
        // A terminal wraps a long line and a mail client breaks it: whitespace anywhere is
        // not part of a token (the alphabet has none), so it goes.
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        let Some(rest) = s.strip_prefix(TOKEN_PREFIX) else {
            return Err(TokenError::Prefix);
        };
        if rest.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed(format!(
                "it is {} characters long, a token at most {MAX_TOKEN_LEN}; was something \
                 else copied with it?",
                rest.len()
            )));
        }
        let raw = match URL_SAFE_NO_PAD.decode(rest) {
            Ok(raw) => raw,
            Err(base64::DecodeError::InvalidByte(_, b)) => {
                return Err(TokenError::Malformed(format!(
                    "it contains {:?}, which a token never has; was something else copied \
                     with it?",
                    char::from(b)
                )))
            }
            // A length or a last character no token has: it was cut short.
            Err(_) => return Err(TokenError::Incomplete),
        };
        let Some((len, rest)) = raw.split_first_chunk::<4>() else {
            return Err(TokenError::Incomplete);
        };
        let len = usize::try_from(u32::from_be_bytes(*len)).unwrap_or(usize::MAX);
        let follow = rest.len().saturating_sub(32);
        if rest.len() < 32 || follow < len {
            return Err(TokenError::Incomplete);
        }
        if follow > len {
            return Err(TokenError::Malformed(
                "it goes on after its end; was something else copied with it?".into(),
            ));
        }
        let (signed, mac) = rest.split_at(len);
        let mac: [u8; 32] = mac.try_into().map_err(|_| TokenError::Incomplete)?;
        let body: TokenBody = serde_json::from_slice(signed).map_err(|_| {
            TokenError::Malformed("its contents do not read as an invitation".into())
        })?;
        Ok(Token {
            body,
            signed: signed.to_vec(),
            mac,
        })
    }

    /// Check the MAC and expiry (coordinator side, `now` in seconds since the UNIX epoch).
    /// The MAC is checked first (in constant time), then that `body` is what `signed` says,
    /// then expiry: a token is expired from `expires_unix` on.
    pub fn verify(&self, secret: &[u8; 32], now_unix: u64) -> Result<(), TokenError> {
        let Some(mut m) = hmac(secret) else {
            return Err(TokenError::Tampered);
        };
        m.update(&self.signed);
        m.verify_slice(&self.mac)
            .map_err(|_| TokenError::Tampered)?;
        match serde_json::from_slice::<TokenBody>(&self.signed) {
            Ok(body) if body == self.body => {}
            _ => return Err(TokenError::Tampered),
        }
        if now_unix >= self.body.expires_unix {
            return Err(TokenError::Expired);
        }
        Ok(())
    }

    pub fn throwaway_key(&self) -> Result<PrivateKey, TokenError> {
        PrivateKey::from_base64(&self.body.throwaway_private_key)
            .map_err(|e| TokenError::Malformed(format!("throwaway key: {e}")))
    }

    pub fn throwaway_public_key(&self) -> Result<PublicKey, TokenError> {
        Ok(self.throwaway_key()?.public_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [7u8; 32];

    fn body() -> TokenBody {
        let throwaway = PrivateKey::from_bytes([3u8; 32]);
        TokenBody {
            invite_id: "0123456789abcdef".into(),
            coordinator_public_key: PrivateKey::from_bytes([9u8; 32]).public_key(),
            coordinator_endpoints: vec!["192.168.1.10:51871".parse().unwrap()],
            coordinator_address: "10.99.99.1".parse().unwrap(),
            api_port: 51872,
            mesh_cidr: "10.99.99.0/24".parse().unwrap(),
            host_name: "dock-mirror".into(),
            host_address: "10.99.99.3".parse().unwrap(),
            throwaway_private_key: throwaway.to_base64(),
            expires_unix: 1_000_000,
            admin: false,
        }
    }

    #[test]
    fn round_trip() {
        let t = Token::sign(body(), &SECRET);
        let s = t.encode();
        assert!(s.starts_with(TOKEN_PREFIX));
        assert!(!s.contains(char::is_whitespace));
        let d = Token::decode(&s).unwrap();
        assert_eq!(d, t);
        assert_eq!(Token::decode(&format!("  {s}\n")).unwrap(), t);
        assert_eq!(d.verify(&SECRET, 999_999), Ok(()));
        assert_eq!(
            d.throwaway_public_key().unwrap(),
            PrivateKey::from_bytes([3u8; 32]).public_key()
        );
        assert_eq!(d.throwaway_key().unwrap().as_bytes(), &[3u8; 32]);
    }

    #[test]
    fn expired_and_foreign() {
        let t = Token::decode(&Token::sign(body(), &SECRET).encode()).unwrap();
        assert_eq!(t.verify(&SECRET, 1_000_000), Err(TokenError::Expired));
        assert_eq!(t.verify(&SECRET, u64::MAX), Err(TokenError::Expired));
        assert_eq!(t.verify(&[8u8; 32], 0), Err(TokenError::Tampered));
        // A foreign token that is also expired is refused as foreign.
        assert_eq!(t.verify(&[8u8; 32], u64::MAX), Err(TokenError::Tampered));
    }

    #[test]
    fn body_swapped_under_a_valid_mac_is_tampered() {
        let mut t = Token::sign(body(), &SECRET);
        t.body.admin = true;
        assert_eq!(t.verify(&SECRET, 0), Err(TokenError::Tampered));
    }

    #[test]
    fn wrong_prefix_and_garbage() {
        let s = Token::sign(body(), &SECRET).encode();
        assert_eq!(
            Token::decode(&s.replacen("meshd1", "meshd2", 1)),
            Err(TokenError::Prefix)
        );
        assert_eq!(Token::decode(""), Err(TokenError::Prefix));
        for bad in [
            "meshd1.",
            "meshd1.AAAA",
            "meshd1.!!!!",
            "meshd1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(
                matches!(
                    Token::decode(bad),
                    Err(TokenError::Malformed(_) | TokenError::Incomplete)
                ),
                "{bad}"
            );
        }
        // Trailing bytes after the MAC.
        let t = Token::sign(body(), &SECRET);
        let mut raw = URL_SAFE_NO_PAD.decode(&s[TOKEN_PREFIX.len()..]).unwrap();
        raw.push(0);
        let long = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(&raw));
        assert!(matches!(
            Token::decode(&long),
            Err(TokenError::Malformed(_))
        ));
        // A bad throwaway key.
        let mut b = body();
        b.throwaway_private_key = "nope".into();
        let t2 = Token::sign(b, &SECRET);
        assert!(matches!(t2.throwaway_key(), Err(TokenError::Malformed(_))));
        assert_eq!(t.verify(&SECRET, 0), Ok(()));
    }

    /// What an operator's terminal or mail client does to a token: wrapped lines work; cut
    /// short or run together with other text, the error says so in plain words.
    #[test]
    fn wrapped_cut_and_run_on_tokens() {
        let s = Token::sign(body(), &SECRET).encode();
        let wrapped: String = s
            .as_bytes()
            .chunks(40)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\n  ");
        assert_eq!(Token::decode(&format!(" {wrapped}\r\n")), Token::decode(&s));
        assert!(Token::decode(&wrapped).is_ok());
        for cut in [
            s.len() - 1,
            s.len() - 5,
            s.len() / 2,
            TOKEN_PREFIX.len() + 3,
        ] {
            let e = Token::decode(&s[..cut]).unwrap_err().to_string();
            assert!(
                e.contains("incomplete") && e.contains("copied only partly"),
                "{cut}: {e}"
            );
            assert!(!e.contains("length field") && !e.contains("bytes"), "{e}");
        }
        let e = Token::decode(&format!("{s}.extra"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'.'") && e.contains("copied with it"), "{e}");
        let e = Token::decode(&format!("{s}AAAA")).unwrap_err().to_string();
        assert!(e.contains("copied with it"), "{e}");
    }

    #[test]
    fn every_single_byte_change_is_refused() {
        let s = Token::sign(body(), &SECRET).encode();
        let alphabet: Vec<u8> =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ ".to_vec();
        let mut checked = 0;
        for i in 0..s.len() {
            for &c in &alphabet {
                let mut b = s.clone().into_bytes();
                if b[i] == c {
                    continue;
                }
                b[i] = c;
                let m = String::from_utf8(b).unwrap();
                // A space anywhere is dropped (a wrapped line), so a space at either end
                // is no change at all.
                if m.trim() != m {
                    continue;
                }
                checked += 1;
                match Token::decode(&m) {
                    Err(TokenError::Prefix) => assert!(i < TOKEN_PREFIX.len(), "{i}"),
                    Err(TokenError::Malformed(_) | TokenError::Incomplete) => {}
                    Err(e) => panic!("decode gave {e} at {i}"),
                    Ok(t) => match t.verify(&SECRET, 0) {
                        Err(TokenError::Tampered) => {}
                        other => panic!("byte {i} changed to {c}: verify gave {other:?}"),
                    },
                }
            }
        }
        assert!(checked > 1000);
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(s in "(meshd1\\.)?[A-Za-z0-9_=+/.-]{0,200}") {
            if let Ok(t) = Token::decode(&s) {
                let _ = t.verify(&SECRET, 0);
                let _ = t.throwaway_public_key();
            }
        }
    }

    /// The fuzz seed was made by an independent implementation (Python's hmac/base64/json,
    /// see proto/fuzz/README.md): the wire format is what the module documentation says.
    #[test]
    fn independent_implementation_agrees() {
        let text = include_str!("../../fuzz/seeds/token_decode/valid.txt");
        let t = Token::decode(text).unwrap();
        assert_eq!(t.verify(&[0x5a; 32], 0), Ok(()));
        assert_eq!(t.verify(&SECRET, 0), Err(TokenError::Tampered));
        assert_eq!(t.body.host_name, "dock-mirror");
        assert_eq!(t.body.coordinator_endpoints.len(), 2);
        assert_eq!(t.encode(), text);
        assert_eq!(
            t.throwaway_public_key().unwrap(),
            PrivateKey::from_bytes([3u8; 32]).public_key()
        );
    }
}
