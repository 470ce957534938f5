//! The member's side of an answer from the coordinator API (`mesh_proto::wire::auth`): arbitrary
//! bytes as the answer's proof header, status and body. Nothing may panic; no answer made
//! without the coordinator's key verifies; a netmap that decodes is validated before use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proto::wire::auth::{AuthKey, Proof};
use mesh_proto::netmap::Netmap;
use mesh_proto::PrivateKey;

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let header = String::from_utf8_lossy(head);
    let _ = Proof::parse(&header);
    let host = PrivateKey::from_bytes([7; 32]);
    let coordinator = PrivateKey::from_bytes([9; 32]).public_key();
    if let Ok(key) = AuthKey::for_host(&host, &coordinator) {
        let status = body.first().map_or(200, |b| 100 + u16::from(*b));
        assert!(key
            .verify_response(Some(&header), &[3; 16], status, body)
            .is_err());
    }
    if let Ok(nm) = serde_json::from_slice::<Netmap>(body) {
        let _ = nm.validate();
    }
});
