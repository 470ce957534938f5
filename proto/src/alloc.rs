//! Address allocation for the mesh: static assignments first, otherwise the lowest free
//! address outside the reserved ranges. An address once given is never given again.
//!
//! Host addresses of a mesh CIDR:
//! - IPv4 with a prefix shorter than /31: every address but the network and broadcast ones;
//!   /31 and /32: every address (RFC 3021).
//! - IPv6 with a prefix shorter than /127: every address but the subnet-router anycast one
//!   (the all-zero host part); /127 and /128: every address.
//!
//! Addresses of the other family (in `reserved` or `ever_used`) are ignored.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        // Callers only pass values taken from an IPv4 range.
        IpAddr::V4(Ipv4Addr::from(u32::try_from(v).unwrap_or(u32::MAX)))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

/// The first and last host address of `cidr` (see the module documentation), as integers.
fn host_range(cidr: IpNet) -> (u128, u128) {
    let lo = to_u128(cidr.network());
    let hi = to_u128(cidr.broadcast());
    match cidr {
        IpNet::V4(n) if n.prefix_len() < 31 => (lo + 1, hi - 1),
        IpNet::V4(_) => (lo, hi),
        IpNet::V6(n) if n.prefix_len() < 127 => (lo + 1, hi),
        IpNet::V6(_) => (lo, hi),
    }
}

/// Whether `ip` is a usable host address of `cidr` (inside it, and not its network or
/// broadcast address; see the module documentation).
pub fn is_host_address(cidr: IpNet, ip: IpAddr) -> bool {
    if !cidr.contains(&ip) {
        return false;
    }
    let (first, last) = host_range(cidr);
    let v = to_u128(ip);
    first <= v && v <= last
}

/// Check that `ip` could be handed out in `cidr` given `reserved` (without looking at which
/// addresses were already used).
pub fn check_address(cidr: IpNet, reserved: &[IpNet], ip: IpAddr) -> Result<(), AllocError> {
    if !cidr.contains(&ip) {
        return Err(AllocError::OutsideMesh(ip, cidr));
    }
    if !is_host_address(cidr, ip) {
        return Err(AllocError::NotAHostAddress(ip));
    }
    if reserved.iter().any(|r| r.contains(&ip)) {
        return Err(AllocError::Reserved(ip));
    }
    Ok(())
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
    if let Some(ip) = requested {
        check_address(cidr, reserved, ip)?;
        if ever_used.contains(&ip) {
            return Err(AllocError::AlreadyUsed(ip));
        }
        return Ok(ip);
    }
    let v4 = matches!(cidr, IpNet::V4(_));
    let (first, last) = host_range(cidr);
    if first > last {
        return Err(AllocError::Exhausted(cidr));
    }
    // Reserved ranges of the same family, as integer intervals.
    let reserved: Vec<(u128, u128)> = reserved
        .iter()
        .filter(|r| matches!(r, IpNet::V4(_)) == v4)
        .map(|r| (to_u128(r.network()), to_u128(r.broadcast())))
        .collect();
    let mut candidate = first;
    // Every step either moves past one reserved range (each at most once, since the candidate
    // only grows) or past one used address, so this terminates even on a huge IPv6 mesh.
    loop {
        if candidate > last {
            return Err(AllocError::Exhausted(cidr));
        }
        if let Some(&(_, end)) = reserved
            .iter()
            .filter(|(s, e)| *s <= candidate && candidate <= *e)
            .max_by_key(|(_, e)| *e)
        {
            match end.checked_add(1) {
                Some(next) => candidate = next,
                None => return Err(AllocError::Exhausted(cidr)),
            }
            continue;
        }
        let ip = from_u128(candidate, v4);
        if ever_used.contains(&ip) {
            match candidate.checked_add(1) {
                Some(next) => candidate = next,
                None => return Err(AllocError::Exhausted(cidr)),
            }
            continue;
        }
        return Ok(ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lowest_free_skips_network_reserved_and_used() {
        let cidr = net("10.99.99.0/24");
        let used = BTreeSet::new();
        assert_eq!(allocate(cidr, &[], &used, None), Ok(ip("10.99.99.1")));
        let reserved = [net("10.99.99.0/28")];
        assert_eq!(
            allocate(cidr, &reserved, &used, None),
            Ok(ip("10.99.99.16"))
        );
        let used: BTreeSet<IpAddr> = [ip("10.99.99.16"), ip("10.99.99.17")].into();
        assert_eq!(
            allocate(cidr, &reserved, &used, None),
            Ok(ip("10.99.99.18"))
        );
    }

    #[test]
    fn requested_is_checked() {
        let cidr = net("10.99.99.0/24");
        let reserved = [net("10.99.99.0/28")];
        let used: BTreeSet<IpAddr> = [ip("10.99.99.20")].into();
        let a = |s: &str| allocate(cidr, &reserved, &used, Some(ip(s)));
        assert_eq!(a("10.99.99.30"), Ok(ip("10.99.99.30")));
        assert_eq!(
            a("10.99.99.20"),
            Err(AllocError::AlreadyUsed(ip("10.99.99.20")))
        );
        assert_eq!(a("10.99.99.5"), Err(AllocError::Reserved(ip("10.99.99.5"))));
        assert_eq!(
            a("10.99.99.255"),
            Err(AllocError::NotAHostAddress(ip("10.99.99.255")))
        );
        assert_eq!(
            allocate(cidr, &[], &used, Some(ip("10.99.99.0"))),
            Err(AllocError::NotAHostAddress(ip("10.99.99.0")))
        );
        assert_eq!(
            a("10.99.98.1"),
            Err(AllocError::OutsideMesh(ip("10.99.98.1"), cidr))
        );
        assert_eq!(
            a("fd00::1"),
            Err(AllocError::OutsideMesh(ip("fd00::1"), cidr))
        );
    }

    #[test]
    fn small_prefixes() {
        let used = BTreeSet::new();
        assert_eq!(
            allocate(net("10.0.0.0/31"), &[], &used, None),
            Ok(ip("10.0.0.0"))
        );
        assert_eq!(
            allocate(net("10.0.0.7/32"), &[], &used, None),
            Ok(ip("10.0.0.7"))
        );
        let used: BTreeSet<IpAddr> = [ip("10.0.0.1"), ip("10.0.0.2")].into();
        assert_eq!(
            allocate(net("10.0.0.0/30"), &[], &used, None),
            Err(AllocError::Exhausted(net("10.0.0.0/30")))
        );
    }

    #[test]
    fn ipv6_and_whole_mesh_reserved() {
        let used = BTreeSet::new();
        assert_eq!(
            allocate(net("fd99::/64"), &[], &used, None),
            Ok(ip("fd99::1"))
        );
        // A reserved range covering nearly all of a /64 is skipped in one step.
        assert_eq!(
            allocate(net("fd99::/64"), &[net("fd99::/65")], &used, None),
            Ok(ip("fd99::8000:0:0:0"))
        );
        assert_eq!(
            allocate(net("10.0.0.0/24"), &[net("10.0.0.0/16")], &used, None),
            Err(AllocError::Exhausted(net("10.0.0.0/24")))
        );
        assert_eq!(
            allocate(net("::/0"), &[net("::/1"), net("8000::/1")], &used, None),
            Err(AllocError::Exhausted(net("::/0")))
        );
    }

    fn arb_v4_net() -> impl Strategy<Value = IpNet> {
        (any::<u32>(), 24u8..=32).prop_map(|(a, p)| {
            IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(a), p).unwrap().trunc())
        })
    }

    fn arb_inside(cidr: IpNet) -> impl Strategy<Value = IpAddr> {
        let (lo, hi) = (to_u128(cidr.network()), to_u128(cidr.broadcast()));
        // A little outside too, to exercise the checks.
        (lo.saturating_sub(2)..=hi.saturating_add(2).min(u128::from(u32::MAX)))
            .prop_map(|v| from_u128(v, true))
    }

    fn arb_case() -> impl Strategy<Value = (IpNet, Vec<IpNet>, BTreeSet<IpAddr>, Option<IpAddr>)> {
        arb_v4_net().prop_flat_map(|cidr| {
            let reserved = prop::collection::vec(
                (arb_inside(cidr), 24u8..=32).prop_map(|(a, p)| match a {
                    IpAddr::V4(a) => IpNet::V4(ipnet::Ipv4Net::new(a, p).unwrap().trunc()),
                    IpAddr::V6(_) => unreachable!(),
                }),
                0..3,
            );
            let used = prop::collection::btree_set(arb_inside(cidr), 0..40);
            let requested = prop::option::of(arb_inside(cidr));
            (Just(cidr), reserved, used, requested)
        })
    }

    proptest! {
        #[test]
        fn never_hands_out_a_bad_address((cidr, reserved, used, requested) in arb_case()) {
            let first = allocate(cidr, &reserved, &used, requested);
            // Deterministic.
            prop_assert_eq!(&first, &allocate(cidr, &reserved, &used, requested));
            if let Ok(a) = first {
                prop_assert!(cidr.contains(&a));
                prop_assert!(is_host_address(cidr, a));
                prop_assert!(!used.contains(&a));
                prop_assert!(!reserved.iter().any(|r| r.contains(&a)));
            }
        }

        #[test]
        fn repeated_allocation_never_reuses((cidr, reserved, used, _r) in arb_case()) {
            let mut used = used;
            let mut given = BTreeSet::new();
            loop {
                match allocate(cidr, &reserved, &used, None) {
                    Ok(a) => {
                        prop_assert!(given.insert(a), "{} given twice", a);
                        prop_assert!(!used.contains(&a));
                        prop_assert!(!reserved.iter().any(|r| r.contains(&a)));
                        prop_assert!(is_host_address(cidr, a));
                        used.insert(a);
                    }
                    Err(AllocError::Exhausted(n)) => {
                        prop_assert_eq!(n, cidr);
                        // Exhausted means really nothing is left.
                        let (lo, hi) = host_range(cidr);
                        for v in lo..=hi {
                            let a = from_u128(v, true);
                            prop_assert!(used.contains(&a) || reserved.iter().any(|r| r.contains(&a)));
                        }
                        break;
                    }
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                }
            }
        }
    }
}
