//! mesh-proto: meshd's deterministic core.
//!
//! Everything here is pure: no sockets, no files, no clock reads, no async runtime. Time comes
//! in as an argument. The daemon (`meshd`) does the I/O and calls into this crate to decide.
//!
//! - `wire`: what crosses a process boundary (API, proof of key, control socket, tokens,
//!   key notices, UAPI); `render`: what meshctl prints from it;
//! - `config`: the configuration file's meaning and errors (with `[integrations]` and the
//!   policy for secret files);
//! - `plan` (the reconciler), `device`, `key`; `netmap`, `alloc` and `registry` (the
//!   coordinator's decisions and its registry's transitions); `rotation`; `routes`; `handoff`
//!   (what K3s, DRBD, Prometheus and DNS get); `doctor`'s verdicts; `debounce`;
//! - `member`: the member's policy as a sans-I/O state machine (when to take a netmap,
//!   rotate, probe a pending key, ask for key notices, report endpoints).

pub mod alloc;
pub mod config;
pub mod debounce;
pub mod device;
pub mod doctor;
pub mod handoff;
pub mod key;
pub mod learned;
pub mod member;
pub mod netmap;
pub mod plan;
pub mod redact;
pub mod registry;
pub mod render;
pub mod rotation;
pub mod routes;
pub mod wire;

pub use device::{DeviceSpec, ObservedDevice, ObservedPeer, PeerSpec};
pub use key::{KeyError, PrivateKey, PublicKey};
pub use plan::{plan, Op};

/// Default WireGuard interface name for the mesh (distinct from flannel-wg, wg0, ...).
pub const DEFAULT_INTERFACE: &str = "wgmesh0";
/// Default UDP listen port (not 51820/51821 used by flannel-wg and Kilo, not 8472 used by vxlan).
pub const DEFAULT_LISTEN_PORT: u16 = 51871;
/// Default tunnel MTU (1500 underlay minus 80 bytes of WireGuard overhead).
pub const DEFAULT_MTU: u16 = 1420;
/// Default control socket path.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/meshd/meshd.sock";
/// Default configuration file path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/meshd/meshd.toml";
