//! Cryptokey routing table: an allowed IP belongs to exactly one peer; lookups are
//! longest-prefix match across the whole device.

use std::net::IpAddr;

use ipnet::IpNet;

/// A longest-prefix-match table from prefixes to values of type `T`.
///
/// Entries are kept sorted by descending prefix length, so the first match is the longest.
/// Meshes have tens of prefixes, where a sorted scan beats a trie.
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: Vec<(IpNet, T)>,
    v6: Vec<(IpNet, T)>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

impl<T: Clone + PartialEq> AllowedIps<T> {
    fn table(&mut self, net: &IpNet) -> &mut Vec<(IpNet, T)> {
        match net {
            IpNet::V4(_) => &mut self.v4,
            IpNet::V6(_) => &mut self.v6,
        }
    }

    /// Insert `net` for `value`, taking it away from whichever value held it before.
    /// Returns the previous holder, if it was another value.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        let net = net.trunc();
        let table = self.table(&net);
        if let Some(slot) = table.iter_mut().find(|(n, _)| *n == net) {
            let prev = std::mem::replace(&mut slot.1, value.clone());
            return (prev != value).then_some(prev);
        }
        let pos = table
            .iter()
            .position(|(n, _)| n.prefix_len() < net.prefix_len())
            .unwrap_or(table.len());
        table.insert(pos, (net, value));
        None
    }

    /// Remove every prefix held by `value`.
    pub fn remove_value(&mut self, value: &T) {
        self.v4.retain(|(_, v)| v != value);
        self.v6.retain(|(_, v)| v != value);
    }

    /// The value owning the longest prefix that contains `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => self.v4.iter().find(|(n, _)| n.contains(&IpAddr::V4(a))),
            IpAddr::V6(a) => self.v6.iter().find(|(n, _)| n.contains(&IpAddr::V6(a))),
        }
        .map(|(_, v)| v)
    }

    /// The prefixes held by `value`, in table order.
    pub fn prefixes_of(&self, value: &T) -> Vec<IpNet> {
        self.v4
            .iter()
            .chain(self.v6.iter())
            .filter(|(_, v)| v == value)
            .map(|(n, _)| *n)
            .collect()
    }

    pub fn clear(&mut self) {
        self.v4.clear();
        self.v6.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    #[test]
    fn longest_prefix_wins_and_prefix_moves_between_owners() {
        let mut t = AllowedIps::default();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("::/0"), 3);
        assert_eq!(t.lookup("10.1.2.3".parse().expect("ip")), Some(&2));
        assert_eq!(t.lookup("10.2.2.3".parse().expect("ip")), Some(&1));
        assert_eq!(t.lookup("11.0.0.1".parse().expect("ip")), None);
        assert_eq!(t.lookup("fd00::1".parse().expect("ip")), Some(&3));
        assert_eq!(t.insert(net("10.1.0.0/16"), 1), Some(2));
        assert_eq!(t.lookup("10.1.2.3".parse().expect("ip")), Some(&1));
        assert!(t.prefixes_of(&2).is_empty());
        t.remove_value(&1);
        assert_eq!(t.lookup("10.1.2.3".parse().expect("ip")), None);
        // host bits are dropped on insert
        t.insert(net("192.168.1.7/24"), 4);
        assert_eq!(t.prefixes_of(&4), vec![net("192.168.1.0/24")]);
    }
}
