//! Coordinator API and control-socket bodies: arbitrary bytes into every request type the
//! coordinator and meshd decode from the outside. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proto::wire::api::{EndpointReport, InviteRequest, JoinRequest, RotateRequest};
use mesh_proto::wire::control::Request;
use mesh_proto::wire::notice::KeyNoticesResponse;
use mesh_proto::{PrivateKey, PublicKey};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<JoinRequest>(data);
    let _ = serde_json::from_slice::<EndpointReport>(data);
    let _ = serde_json::from_slice::<InviteRequest>(data);
    let _ = serde_json::from_slice::<RotateRequest>(data);
    // Key notices come from outside the tunnel: following any list must not panic, and a
    // list nobody holding the old key wrote never yields a key.
    if let Ok(r) = serde_json::from_slice::<KeyNoticesResponse>(data) {
        let host = PrivateKey::from_bytes([7; 32]);
        assert!(mesh_proto::wire::notice::follow(&r.notices, &host, PublicKey([9; 32])).is_err());
    }
    if let Ok(r) = serde_json::from_slice::<Request>(data) {
        // What decodes re-encodes and decodes to the same request.
        assert_eq!(Request::from_line(&r.to_line()).ok(), Some(r));
    }
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = Request::from_line(line);
    }
});
