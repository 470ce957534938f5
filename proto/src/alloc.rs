//! Address allocation for the mesh: static assignments first, otherwise the lowest free
//! address outside the reserved ranges. An address once given is never given again.
//!
//! TO BE IMPLEMENTED (issue 3), with property tests (never reuses, never hands out a reserved,
//! network or broadcast address, deterministic).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("{0} is not inside the mesh {1}")]
    OutsideMesh(IpAddr, IpNet),
    #[error("{0} is reserved")]
    Reserved(IpAddr),
    #[error("{0} was already given to a host (addresses are never reused)")]
    AlreadyUsed(IpAddr),
    #[error("{0} is the network or broadcast address")]
    NotAHostAddress(IpAddr),
    #[error("the mesh {0} has no free address left")]
    Exhausted(IpNet),
}

/// Pick an address. `requested` (from `--ip` or a static assignment) is checked and used;
/// otherwise the lowest free one. `ever_used` holds every address ever handed out (including
/// removed hosts' and pending invitations').
pub fn allocate(
    cidr: IpNet,
    reserved: &[IpNet],
    ever_used: &BTreeSet<IpAddr>,
    requested: Option<IpAddr>,
) -> Result<IpAddr, AllocError> {
    let _ = (cidr, reserved, ever_used, requested);
    todo!("issue 3")
}
