//! The host's network system, touched only where meshd owns it: the interface's addresses
//! (`link`), our routes (`routing`), our nftables table (`firewall`), sysctls (`sysctl`), the
//! one rtnetlink connection helper (`netlink`), and who holds our UDP port (`ports`).

pub mod firewall;
pub mod link;
pub mod netlink;
pub mod ports;
pub mod routing;
pub mod sysctl;
