//! In-memory fakes of the backends, for tests only: compiled for the unit tests and, with the
//! `test-fakes` feature, for the integration tests (never in a build that ships).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_proto::routes::{RouteOp, SystemRoute, RT_PROTO_MESHD, TABLE_MAIN};
use mesh_proto::{ObservedDevice, Op, PublicKey};

use super::{LinkBackend, LinkReport, LinkSpec, WgBackend};
use crate::error::{Error, Result};
use crate::runtime::settings::Settings;

/// In-memory WireGuard device following WireGuard's rules (via `mesh_proto::plan::apply`:
/// an allowed IP belongs to exactly one peer). Failures can be injected per peer key.
#[derive(Debug, Default, Clone)]
pub struct FakeBackend {
    pub device: ObservedDevice,
    /// A batch containing any op on one of these peers fails as a whole, after applying
    /// nothing; single ops on them fail.
    pub fail_peers: BTreeSet<PublicKey>,
    /// When set, `observe` fails (engine unreachable).
    pub fail_observe: bool,
    /// When set, the device does not exist: `observe` fails until `ensure_device` creates it.
    pub absent: bool,
    /// Number of `apply` calls, and of `ensure_device` calls.
    pub apply_calls: usize,
    pub ensure_calls: usize,
}

fn op_peer(op: &Op) -> Option<PublicKey> {
    match op {
        Op::AddPeer(p) => Some(p.public_key),
        Op::UpdatePeer { public_key, .. } => Some(*public_key),
        Op::RemovePeer(k) => Some(*k),
        _ => None,
    }
}

impl WgBackend for FakeBackend {
    async fn ensure_device(&mut self) -> Result<()> {
        self.ensure_calls += 1;
        if self.absent {
            self.absent = false;
            self.device = ObservedDevice::default();
        }
        Ok(())
    }

    async fn observe(&mut self) -> Result<ObservedDevice> {
        if self.fail_observe || self.absent {
            return Err(Error::Injected("device unreachable".into()));
        }
        Ok(self.device.clone())
    }

    async fn apply(&mut self, ops: &[Op]) -> Result<()> {
        self.apply_calls += 1;
        if let Some(k) = ops
            .iter()
            .filter_map(op_peer)
            .find(|k| self.fail_peers.contains(k))
        {
            return Err(Error::Injected(format!("op on peer {k} refused")));
        }
        mesh_proto::plan::apply(&mut self.device, ops);
        Ok(())
    }
}

/// In-memory interface: records the address set and MTU.
#[derive(Debug, Default, Clone)]
pub struct FakeLink {
    pub ifindex: u32,
    pub mtu: u16,
    pub addresses: BTreeSet<IpNet>,
    pub up: bool,
    /// What `underlay_addresses` returns.
    pub underlay: Vec<IpAddr>,
    /// Set by `delete`.
    pub deleted: bool,
    /// Every route of the fake system: ours (added by `apply_routes`) and foreign ones a
    /// test plants.
    pub routes: Vec<SystemRoute>,
    /// Number of route ops applied (a restart must apply none).
    pub route_writes: usize,
    /// What `advertise` was last asked to put in place.
    pub advertised: Vec<IpNet>,
}

impl LinkBackend for FakeLink {
    async fn configure(&mut self, spec: &LinkSpec, previous: Option<IpNet>) -> Result<LinkReport> {
        let mut changes = Vec::new();
        if self.ifindex == 0 {
            self.ifindex = 7;
        }
        if self.mtu != spec.mtu {
            self.mtu = spec.mtu;
            changes.push(format!("mtu {}", spec.mtu));
        }
        if self.addresses.insert(spec.address) {
            changes.push(format!("add address {}", spec.address));
        }
        if let Some(prev) = previous {
            if prev != spec.address && self.addresses.remove(&prev) {
                changes.push(format!("remove address {prev}"));
            }
        }
        if !self.up {
            self.up = true;
            changes.push("up".into());
        }
        self.deleted = false;
        Ok(LinkReport {
            ifindex: self.ifindex,
            changes,
        })
    }

    async fn underlay_addresses(&mut self, _exclude: &str) -> Result<Vec<IpAddr>> {
        Ok(self.underlay.clone())
    }

    async fn delete(&mut self, interface: &str) -> Result<()> {
        let mut routes = std::mem::take(&mut self.routes);
        routes.retain(|r| r.dev.as_deref() != Some(interface));
        *self = FakeLink {
            underlay: std::mem::take(&mut self.underlay),
            deleted: true,
            routes,
            ..FakeLink::default()
        };
        Ok(())
    }

    async fn system_routes(&mut self) -> Result<Vec<SystemRoute>> {
        Ok(self.routes.clone())
    }

    async fn apply_routes(&mut self, interface: &str, ops: &[RouteOp]) -> Result<Vec<String>> {
        let ours = |dst: IpNet| SystemRoute {
            table: TABLE_MAIN,
            dst,
            dev: Some(interface.to_string()),
            protocol: RT_PROTO_MESHD,
            kind: "unicast".into(),
            gateway: None,
        };
        for op in ops {
            self.route_writes += 1;
            match op {
                RouteOp::Add(dst) => self.routes.push(ours(*dst)),
                RouteOp::TakeOver(dst) => {
                    self.routes.retain(|r| {
                        !(r.table == TABLE_MAIN
                            && r.dst == *dst
                            && r.protocol == 2
                            && r.dev.as_deref() == Some(interface))
                    });
                    self.routes.push(ours(*dst));
                }
                RouteOp::Remove(r) => {
                    if r.is_ours(interface) {
                        self.routes.retain(|x| x != r);
                    }
                }
            }
        }
        Ok(Vec::new())
    }

    async fn advertise(&mut self, settings: &Settings) -> Result<Vec<String>> {
        if self.advertised == settings.routes.advertise {
            return Ok(Vec::new());
        }
        self.advertised = settings.routes.advertise.clone();
        Ok(vec![format!("advertise {:?}", self.advertised)])
    }
}
