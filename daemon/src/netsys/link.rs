//! Interface addressing over real netlink (rtnetlink): MTU, our mesh address, link up.
//! Never flushes addresses: only the address we configured (now or in the previous config) is
//! ever removed.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use mesh_proto::routes::{RouteOp, SystemRoute};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};

use crate::backend::{LinkBackend, LinkReport, LinkSpec};
use crate::error::{Error, Result};
use crate::netsys::firewall::FirewallState;
use crate::runtime::settings::Settings;

/// The real interface, through a netlink connection owned by this value.
#[derive(Debug, Clone)]
pub struct NetlinkLink {
    handle: Handle,
    firewall: FirewallState,
}

fn nl(what: &str, e: rtnetlink::Error) -> Error {
    Error::Netlink(format!("{what}: {e}"))
}

fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    // IPv4 puts the interface's own address in IFA_LOCAL; IPv6 only has IFA_ADDRESS.
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address
}

impl NetlinkLink {
    /// Open a netlink connection; its driver runs as a tokio task. Must be called inside a
    /// tokio runtime.
    pub fn connect() -> Result<Self> {
        Ok(NetlinkLink {
            handle: crate::netsys::netlink::connect()?,
            firewall: FirewallState::default(),
        })
    }

    async fn link(&self, name: &str) -> Result<LinkMessage> {
        let mut links = self
            .handle
            .clone()
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link),
            Ok(None) => Err(Error::Netlink(format!("interface {name} does not exist"))),
            Err(e) => Err(nl(&format!("cannot read interface {name}"), e)),
        }
    }

    async fn addresses(&self, index: u32) -> Result<Vec<(IpNet, AddressMessage)>> {
        let mut out = Vec::new();
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| nl("cannot list addresses", e))?
        {
            if let Some(ip) = address_of(&msg) {
                if let Ok(net) = IpNet::new(ip, msg.header.prefix_len) {
                    out.push((net, msg));
                }
            }
        }
        Ok(out)
    }

    /// What kind of interface `name` is, as the kernel names it (`wireguard`, `tun`,
    /// `bridge`, ...; `other` when it reports none); `None` when there is no such interface.
    pub async fn kind(&self, name: &str) -> Result<Option<String>> {
        let mut links = self
            .handle
            .clone()
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        let link = match links.try_next().await {
            Ok(Some(link)) => link,
            Ok(None) => return Ok(None),
            // ENODEV: no such interface.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                return Ok(None)
            }
            Err(e) => return Err(nl(&format!("cannot read interface {name}"), e)),
        };
        let kind = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Kind(k) => Some(match k {
                    InfoKind::Wireguard => "wireguard".to_owned(),
                    InfoKind::Tun => "tun".to_owned(),
                    InfoKind::Other(s) => s.clone(),
                    other => format!("{other:?}").to_lowercase(),
                }),
                _ => None,
            }),
            _ => None,
        });
        Ok(Some(kind.unwrap_or_else(|| "other".to_owned())))
    }

    /// The interface index of `name`.
    pub async fn ifindex(&self, name: &str) -> Result<u32> {
        Ok(self.link(name).await?.header.index)
    }
}

impl LinkBackend for NetlinkLink {
    async fn configure(&mut self, spec: &LinkSpec, previous: Option<IpNet>) -> Result<LinkReport> {
        let link = self.link(&spec.interface).await?;
        let index = link.header.index;
        let mut changes = Vec::new();

        let mtu = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        if mtu != Some(u32::from(spec.mtu)) {
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .mtu(u32::from(spec.mtu))
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| {
                    nl(
                        &format!("cannot set MTU {} on {}", spec.mtu, spec.interface),
                        e,
                    )
                })?;
            changes.push(format!("set mtu {} (was {:?})", spec.mtu, mtu));
        }

        let present = self.addresses(index).await?;
        if !present.iter().any(|(net, _)| *net == spec.address) {
            // noprefixroute: the kernel adds no `proto kernel` route for the mesh; meshd adds
            // its own, marked, after checking it clashes with nothing (crate::netsys::routing).
            let mut add =
                self.handle
                    .address()
                    .add(index, spec.address.addr(), spec.address.prefix_len());
            add.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Noprefixroute));
            add.execute().await.map_err(|e| {
                nl(
                    &format!("cannot add address {} to {}", spec.address, spec.interface),
                    e,
                )
            })?;
            changes.push(format!("add address {}", spec.address));
        }
        if let Some(prev) = previous.filter(|p| *p != spec.address) {
            if let Some((_, msg)) = present.into_iter().find(|(net, _)| *net == prev) {
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(|e| {
                        nl(
                            &format!(
                                "cannot remove our previous address {prev} from {}",
                                spec.interface
                            ),
                            e,
                        )
                    })?;
                changes.push(format!("remove previous address {prev}"));
            }
        }

        if !link.header.flags.contains(LinkFlags::Up) {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(|e| nl(&format!("cannot set {} up", spec.interface), e))?;
            changes.push("set link up".to_owned());
        }
        Ok(LinkReport {
            ifindex: index,
            changes,
        })
    }

    async fn underlay_addresses(&mut self, exclude: &str) -> Result<Vec<IpAddr>> {
        let skip = self.link(exclude).await.ok().map(|l| l.header.index);
        // Pod, container and VM networks are no way to reach this host from another
        // (mesh_proto::member::underlay_interface).
        let mut overlays = std::collections::HashSet::new();
        let mut links = self.handle.link().get().execute();
        while let Some(l) = links
            .try_next()
            .await
            .map_err(|e| nl("cannot list links", e))?
        {
            let name = l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.as_str()),
                _ => None,
            });
            if name.is_some_and(|n| !mesh_proto::member::underlay_interface(n)) {
                overlays.insert(l.header.index);
            }
        }
        let mut out = Vec::new();
        let mut stream = self.handle.address().get().execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| nl("cannot list addresses", e))?
        {
            if Some(msg.header.index) == skip || overlays.contains(&msg.header.index) {
                continue;
            }
            if let Some(ip) = address_of(&msg) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    async fn delete(&mut self, interface: &str) -> Result<()> {
        let index = self.link(interface).await?.header.index;
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| nl(&format!("cannot delete {interface}"), e))
    }

    async fn system_routes(&mut self) -> Result<Vec<SystemRoute>> {
        crate::netsys::routing::system_routes(&self.handle).await
    }

    async fn apply_routes(&mut self, interface: &str, ops: &[RouteOp]) -> Result<Vec<String>> {
        crate::netsys::routing::apply_routes(&self.handle, interface, ops).await
    }

    async fn advertise(&mut self, settings: &Settings) -> Result<Vec<String>> {
        crate::netsys::routing::converge_advertise(&self.handle, settings, &mut self.firewall).await
    }
}
