//! meshd: the I/O shell around mesh-proto (docs/ARCHITECTURE.md has the map).
//!
//! - `runtime`: the process: startup, the event loop, control requests, settings;
//! - `agent`: observe → `mesh_proto::plan` → apply, the reconciler's shell;
//! - `backend`: one small trait per outside system (and in-memory fakes for tests);
//! - `wg`: the WireGuard device (kernel, or a userspace engine over UAPI);
//! - `netsys`: addresses, routes, our nftables table, sysctls: only what meshd owns;
//! - `disk`: the one file writer, the key file, the state directory;
//! - `member`: the member side of a managed mesh: join, netmap follower, key rotation, the
//!   coordinator API client;
//! - `coordinator`: the coordinator role: the SQLite registry and the HTTP API;
//! - `handoff`: what meshd hands to other software: integration files, mesh DNS, split DNS,
//!   `/metrics`;
//! - `doctor`: gathering the facts `mesh_proto::doctor` judges.

pub mod agent;
pub mod backend;
pub mod coordinator;
pub mod disk;
pub mod doctor;
pub mod error;
pub mod handoff;
pub mod member;
pub mod netsys;
pub mod runtime;
pub mod wg;

pub use agent::{Agent, AgentStatus, PassReport, PeerView};
#[cfg(any(test, feature = "test-fakes"))]
pub use backend::{FakeBackend, FakeLink};
pub use backend::{LinkBackend, LinkReport, LinkSpec, WgBackend};
pub use error::{Error, Result};
pub use runtime::settings::{HandoffSettings, PeerSettings, Settings};
