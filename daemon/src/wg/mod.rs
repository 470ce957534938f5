//! The WireGuard device: the kernel's module over netlink (`kernel`), a userspace engine over
//! its UAPI socket (`userspace`, usually `meshd-wg`), and choosing between them at start
//! (`select`). Both implement `crate::backend::WgBackend`.

pub mod kernel;
pub mod select;
pub mod userspace;
