//! Invitation token decoding: `Token::decode` on arbitrary text, then `verify` with a fixed
//! secret and the throwaway key parse. None may panic; a decoded token re-encodes to a token
//! that decodes to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proto::wire::token::Token;

const SECRET: [u8; 32] = [0x5a; 32];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for s in [text.to_string(), format!("meshd1.{text}")] {
        if let Ok(token) = Token::decode(&s) {
            let _ = token.verify(&SECRET, 0);
            let _ = token.verify(&SECRET, u64::MAX);
            let _ = token.throwaway_public_key();
            let again = Token::decode(&token.encode());
            assert_eq!(again.as_ref(), Ok(&token));
        }
    }
});
