//! `KernelBackend`: a WireGuard device served by the Linux kernel's module.
//!
//! Interface and peer operations go through defguard_wireguard_rs (`WGApi::<Kernel>`): creating
//! the link, reading the device, adding, updating and removing one peer at a time. Its route and
//! DNS helpers are never used (addresses and routes are ours, in [`crate::netsys::link`]), and neither is
//! `configure_interface`, which flushes the interface's addresses and replaces every peer.
//! Device-level settings (private key, listen port, fwmark) have no peer-preserving call in
//! defguard, so they are one generic-netlink `WG_CMD_SET_DEVICE` of our own, without
//! `WGDEVICE_F_REPLACE_PEERS`.
//!
//! The calls are synchronous netlink round trips of a few microseconds; they run through
//! [`crate::runtime::blocking::run`], off the async workers.

use std::time::UNIX_EPOCH;

use defguard_wireguard_rs::host::Host;
use defguard_wireguard_rs::key::Key;
use defguard_wireguard_rs::net::IpAddrMask;
use defguard_wireguard_rs::peer::Peer;
use defguard_wireguard_rs::{Kernel, WGApi, WireguardInterfaceApi};
use ipnet::IpNet;
use mesh_proto::{ObservedDevice, ObservedPeer, Op, PeerSpec, PrivateKey, PublicKey};

use crate::backend::WgBackend;
use crate::error::{Error, Result};

/// The kernel's WireGuard device for one interface.
pub struct KernelBackend {
    interface: String,
    api: WGApi<Kernel>,
}

impl std::fmt::Debug for KernelBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelBackend")
            .field("interface", &self.interface)
            .finish()
    }
}

fn key(k: &PublicKey) -> Key {
    Key::new(k.0)
}

fn mask(net: &IpNet) -> IpAddrMask {
    IpAddrMask::new(net.addr(), net.prefix_len())
}

/// The kernel reports "no preshared key" as 32 zero bytes.
const NO_PSK: [u8; 32] = [0; 32];

fn observed_peer(p: &Peer) -> ObservedPeer {
    let reported: Vec<IpNet> = p
        .allowed_ips
        .iter()
        .filter_map(|m| IpNet::new(m.address, m.cidr).ok())
        .collect();
    let allowed_ips = mesh_proto::plan::normalize_allowed_ips(&reported);
    ObservedPeer {
        public_key: PublicKey(p.public_key.as_array()),
        preshared_key: p
            .preshared_key
            .as_ref()
            .map(|k| k.as_array())
            .filter(|k| *k != NO_PSK),
        endpoint: p.endpoint,
        allowed_ips,
        persistent_keepalive: p.persistent_keepalive_interval.filter(|s| *s != 0),
        last_handshake: p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .filter(|d| !d.is_zero()),
        rx_bytes: p.rx_bytes,
        tx_bytes: p.tx_bytes,
    }
}

fn observed_device(host: &Host) -> ObservedDevice {
    ObservedDevice {
        public_key: host
            .private_key
            .as_ref()
            .map(|k| k.as_array())
            .filter(|k| *k != [0; 32])
            .map(|k| PrivateKey::from_bytes(k).public_key()),
        listen_port: host.listen_port,
        fwmark: host.fwmark.filter(|m| *m != 0),
        peers: host
            .peers
            .values()
            .map(|p| {
                let o = observed_peer(p);
                (o.public_key, o)
            })
            .collect(),
    }
}

/// The defguard peer for a whole spec (an added peer).
fn peer_from_spec(spec: &PeerSpec) -> Peer {
    let mut p = Peer::new(key(&spec.public_key));
    p.preshared_key = spec.preshared_key.map(Key::new);
    p.endpoint = spec.endpoint;
    p.allowed_ips = spec.allowed_ips.iter().map(mask).collect();
    // 0 switches keepalive off; sent explicitly so an old value never survives.
    p.persistent_keepalive_interval = Some(spec.persistent_keepalive.unwrap_or(0));
    p
}

impl KernelBackend {
    pub fn new(interface: &str) -> Result<Self> {
        let api = WGApi::<Kernel>::new(interface).map_err(|e| Error::Kernel {
            interface: interface.to_owned(),
            message: e.to_string(),
        })?;
        Ok(KernelBackend {
            interface: interface.to_owned(),
            api,
        })
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::Kernel {
            interface: self.interface.clone(),
            message: message.into(),
        }
    }

    fn read(&self) -> Result<Host> {
        self.api
            .read_interface_data()
            .map_err(|e| self.err(format!("cannot read the WireGuard device: {e}")))
    }

    /// Create the kernel WireGuard link (up, no address yet). Fails when the kernel has no
    /// WireGuard (module missing), which is how `backend = "auto"` decides.
    pub fn create(&mut self) -> Result<()> {
        self.api
            .create_interface()
            .map_err(|e| self.err(format!("the kernel cannot create a WireGuard link: {e}")))?;
        // defguard treats "exists" as success: make sure what exists is a WireGuard device.
        self.read().map(|_| ()).map_err(|_| {
            self.err(format!(
                "{} exists but is not a kernel WireGuard interface",
                self.interface
            ))
        })
    }

    /// Device-level settings without touching peers: one `WG_CMD_SET_DEVICE` without
    /// `WGDEVICE_F_REPLACE_PEERS`.
    fn set_device(
        &self,
        private_key: Option<&PrivateKey>,
        listen_port: Option<u16>,
        fwmark: Option<Option<u32>>,
    ) -> Result<()> {
        genl::set_device(&self.interface, private_key, listen_port, fwmark)
            .map_err(|e| self.err(format!("cannot set the device: {e}")))
    }

    fn apply_one(&self, op: &Op, current: &mut Host) -> Result<()> {
        match op {
            Op::SetPrivateKey(k) => self.set_device(Some(k), None, None),
            Op::SetListenPort(p) => self.set_device(None, Some(*p), None),
            Op::SetFwmark(m) => self.set_device(None, None, Some(*m)),
            Op::AddPeer(spec) => {
                let peer = peer_from_spec(spec);
                self.api
                    .configure_peer(&peer)
                    .map_err(|e| self.err(format!("cannot add peer {}: {e}", spec.public_key)))?;
                current.peers.insert(peer.public_key.clone(), peer);
                Ok(())
            }
            Op::UpdatePeer {
                public_key,
                preshared_key,
                endpoint,
                allowed_ips,
                persistent_keepalive,
            } => {
                // An update never creates a peer (UAPI's update_only, as the other backends).
                let k = key(public_key);
                let Some(existing) = current.peers.get(&k) else {
                    tracing::debug!(peer = %public_key, "update of a peer the device lacks: skipped");
                    return Ok(());
                };
                // defguard always replaces the allowed IPs, so an update that leaves them alone
                // sends the ones the device has; unset fields are not sent and stay.
                let mut peer = Peer::new(k.clone());
                peer.allowed_ips = match allowed_ips {
                    Some(ips) => ips.iter().map(mask).collect(),
                    None => existing.allowed_ips.clone(),
                };
                peer.preshared_key = preshared_key.map(|p| Key::new(p.unwrap_or(NO_PSK)));
                peer.endpoint = *endpoint;
                peer.persistent_keepalive_interval = persistent_keepalive.map(|k| k.unwrap_or(0));
                self.api
                    .configure_peer(&peer)
                    .map_err(|e| self.err(format!("cannot update peer {public_key}: {e}")))?;
                if let Some(p) = current.peers.get_mut(&k) {
                    p.allowed_ips = peer.allowed_ips;
                }
                Ok(())
            }
            Op::RemovePeer(public_key) => {
                let k = key(public_key);
                self.api
                    .remove_peer(&k)
                    .map_err(|e| self.err(format!("cannot remove peer {public_key}: {e}")))?;
                current.peers.remove(&k);
                Ok(())
            }
        }
    }
}

impl WgBackend for KernelBackend {
    async fn ensure_device(&mut self) -> Result<()> {
        crate::runtime::blocking::run(|| {
            if self.read().is_ok() {
                return Ok(());
            }
            tracing::info!(interface = %self.interface, "creating the kernel WireGuard interface");
            self.create()
        })
    }

    async fn observe(&mut self) -> Result<ObservedDevice> {
        crate::runtime::blocking::run(|| Ok(observed_device(&self.read()?)))
    }

    async fn apply(&mut self, ops: &[Op]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        crate::runtime::blocking::run(|| {
            // One read gives the allowed IPs an update without new ones must resend.
            let mut current = self.read()?;
            for op in ops {
                self.apply_one(op, &mut current)?;
            }
            Ok(())
        })
    }
}

/// Our one generic-netlink request (see the module docs).
mod genl {
    use netlink_packet_core::{
        NetlinkDeserializable, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK,
        NLM_F_REQUEST,
    };
    use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
    use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
    use netlink_packet_generic::GenlMessage;
    use netlink_packet_wireguard::{WireguardAttribute, WireguardCmd, WireguardMessage};
    use netlink_sys::constants::NETLINK_GENERIC;
    use netlink_sys::{Socket, SocketAddr};

    use mesh_proto::PrivateKey;

    /// Why our generic-netlink request failed.
    #[derive(Debug, thiserror::Error)]
    pub enum GenlError {
        /// A socket call, or the kernel's answer to the request, failed.
        #[error("netlink {step}: {source}")]
        Io {
            step: &'static str,
            #[source]
            source: std::io::Error,
        },
        /// The reply could not be decoded.
        #[error("bad netlink reply: {0}")]
        Decode(netlink_packet_core::DecodeError),
        /// The kernel has no WireGuard module loaded.
        #[error("the kernel has no WireGuard netlink family: {0}")]
        NoFamily(#[source] Box<GenlError>),
        /// The kernel answered the family lookup without an id.
        #[error("the kernel did not report the WireGuard family id")]
        NoFamilyId,
    }

    fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> GenlError {
        move |source| GenlError::Io { step, source }
    }

    fn roundtrip<M>(socket: &Socket, msg: M) -> Result<Vec<M>, GenlError>
    where
        M: NetlinkSerializable + NetlinkDeserializable + std::fmt::Debug,
        NetlinkPayload<M>: From<M>,
    {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        socket.send(&buf, 0).map_err(io("send"))?;
        let mut out = Vec::new();
        let mut rbuf = vec![0u8; 16384];
        loop {
            let n = socket.recv(&mut &mut rbuf[..], 0).map_err(io("receive"))?;
            let mut off = 0;
            while off < n {
                let msg =
                    NetlinkMessage::<M>::deserialize(&rbuf[off..n]).map_err(GenlError::Decode)?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(_) => Err(GenlError::Io {
                                step: "request",
                                source: e.to_io(),
                            }),
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }

    fn family_id(socket: &Socket) -> Result<u16, GenlError> {
        let req = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".to_owned())],
        });
        let replies = roundtrip(socket, req).map_err(|e| GenlError::NoFamily(Box::new(e)))?;
        replies
            .iter()
            .flat_map(|m| m.payload.nlas.iter())
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or(GenlError::NoFamilyId)
    }

    /// `WG_CMD_SET_DEVICE` with only the given device attributes.
    pub fn set_device(
        interface: &str,
        private_key: Option<&PrivateKey>,
        listen_port: Option<u16>,
        fwmark: Option<Option<u32>>,
    ) -> Result<(), GenlError> {
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(io("socket"))?;
        socket.bind_auto().map_err(io("bind"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(io("connect"))?;
        let family = family_id(&socket)?;
        let mut attributes = vec![WireguardAttribute::IfName(interface.to_owned())];
        if let Some(k) = private_key {
            attributes.push(WireguardAttribute::PrivateKey(*k.as_bytes()));
        }
        if let Some(p) = listen_port {
            attributes.push(WireguardAttribute::ListenPort(p));
        }
        if let Some(m) = fwmark {
            attributes.push(WireguardAttribute::Fwmark(m.unwrap_or(0)));
        }
        let mut msg = GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        });
        msg.set_resolved_family_id(family);
        roundtrip(&socket, msg).map(|_| ())
    }
}
