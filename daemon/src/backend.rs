//! Small traits, one per outside system, speaking mesh-proto's types. The in-memory fakes
//! (`fake`) are compiled for tests only.

use std::future::Future;
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_proto::routes::{RouteOp, SystemRoute};
use mesh_proto::{ObservedDevice, Op};

use crate::error::Result;
use crate::runtime::settings::Settings;

/// A WireGuard device: our userspace engine over UAPI, the kernel, or the in-memory fake.
pub trait WgBackend {
    /// Make sure the device exists and answers. Adopts a running device; never recreates one.
    fn ensure_device(&mut self) -> impl Future<Output = Result<()>> + Send;
    /// Read the device as it really is.
    fn observe(&mut self) -> impl Future<Output = Result<ObservedDevice>> + Send;
    /// Apply a batch of ops. A failure may leave part of the batch applied (as UAPI does); the
    /// caller retries op by op.
    fn apply(&mut self, ops: &[Op]) -> impl Future<Output = Result<()>> + Send;
}

/// What we want on the network interface besides WireGuard itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    pub interface: String,
    pub mtu: u16,
    /// The mesh address with its prefix (host bits kept), e.g. 10.99.99.1/24.
    pub address: IpNet,
}

/// What we found on (and did to) the interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkReport {
    pub ifindex: u32,
    /// Human-readable changes made in this pass (empty when nothing changed).
    pub changes: Vec<String>,
}

/// Interface addressing: MTU, our mesh address, link state.
pub trait LinkBackend {
    /// Converge the interface to `spec`. Never flushes addresses; removes `previous` only if it
    /// was ours (the previous config's address) and differs from `spec.address`.
    fn configure(
        &mut self,
        spec: &LinkSpec,
        previous: Option<IpNet>,
    ) -> impl Future<Output = Result<LinkReport>> + Send;
    /// The host's addresses on every interface but `exclude` (the mesh interface): the
    /// candidates for our endpoints.
    fn underlay_addresses(
        &mut self,
        exclude: &str,
    ) -> impl Future<Output = Result<Vec<IpAddr>>> + Send;
    /// Delete the interface (a failed join removes the interface it created).
    fn delete(&mut self, interface: &str) -> impl Future<Output = Result<()>> + Send;
    /// Every route of every table, IPv4 and IPv6.
    fn system_routes(&mut self) -> impl Future<Output = Result<Vec<SystemRoute>>> + Send;
    /// Apply route ops on `interface` (our protocol, main table). One failed op does not stop
    /// the others; returns one line per failed op.
    fn apply_routes(
        &mut self,
        interface: &str,
        ops: &[RouteOp],
    ) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// Converge forwarding and our nftables table to `settings.routes.advertise` (nothing to
    /// advertise: our changes undone, our table absent). Returns the changes made.
    fn advertise(
        &mut self,
        settings: &Settings,
    ) -> impl Future<Output = Result<Vec<String>>> + Send;
}

#[cfg(any(test, feature = "test-fakes"))]
mod fake;
#[cfg(any(test, feature = "test-fakes"))]
pub use fake::{FakeBackend, FakeLink};
