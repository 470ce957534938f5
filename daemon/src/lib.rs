//! meshd: the I/O shell around mesh-proto. Backends (userspace engine over UAPI, in-memory
//! fake), interface addressing over netlink, the agent loop, the control socket.

pub mod agent;
pub mod backend;
pub mod blocking;
pub mod client;
pub mod control;
pub mod coordinator;
pub mod daemon;
pub mod disk;
pub mod dns;
pub mod doctor;
pub mod error;
pub mod firewall;
pub mod handoff;
pub mod integrate;
pub mod join;
pub mod kernel;
pub mod keyfile;
pub mod link;
pub mod lock;
pub mod member;
pub mod metrics;
pub mod netlink;
pub mod notify;
pub mod ports;
pub mod protocol;
pub mod resolved;
pub mod rotate;
pub mod routes;
pub mod select;
pub mod serve;
pub mod service;
pub mod settings;
pub mod state;
pub mod sysctl;
pub mod uapi;

pub use agent::{Agent, AgentStatus, PassReport, PeerView};
#[cfg(any(test, feature = "test-fakes"))]
pub use backend::{FakeBackend, FakeLink};
pub use backend::{LinkBackend, LinkReport, LinkSpec, WgBackend};
pub use error::{Error, Result};
pub use settings::{HandoffSettings, PeerSettings, Settings};
