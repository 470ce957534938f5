//! Coordinator API and control-socket bodies: arbitrary bytes into every request type the
//! coordinator and meshd decode from the outside. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proto::api::{EndpointReport, InviteRequest, JoinRequest};
use mesh_proto::control::Request;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<JoinRequest>(data);
    let _ = serde_json::from_slice::<EndpointReport>(data);
    let _ = serde_json::from_slice::<InviteRequest>(data);
    if let Ok(r) = serde_json::from_slice::<Request>(data) {
        // What decodes re-encodes and decodes to the same request.
        assert_eq!(Request::from_line(&r.to_line()).ok(), Some(r));
    }
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = Request::from_line(line);
    }
});
