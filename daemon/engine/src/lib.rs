//! meshd's userspace WireGuard engine.
//!
//! The protocol core is boringtun's `noise::Tunn` (one per peer); everything around it is ours:
//! cryptokey routing with a device-wide longest-prefix match (outbound) and a source check after
//! decryption (inbound), batched UDP I/O (`recvmmsg`/`sendmmsg`), TUN offloads (virtio-net
//! header: TSO/GSO split on read, GRO coalescing on write), timers, roaming, and a UAPI server
//! that follows the cross-platform spec so `wg`, `wg-quick` and meshd drive it like
//! wireguard-go.
//!
//! Threads: one TUN reader (outbound: read, route, encrypt, send), one UDP reader (inbound:
//! receive, demultiplex, decrypt, check, write), one timer thread, one UAPI acceptor.

pub mod allowed_ips;
pub mod cli;
pub mod device;
pub mod gate;
pub mod uapi;
pub mod udp;

pub use device::{Device, EngineOptions};
