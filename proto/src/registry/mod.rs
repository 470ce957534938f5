//! The coordinator's registry as a pure model: hosts, invitations and retired keys, and the
//! transitions on them (invite, join, revocation and expiry of invitations, removal, rotation
//! prepare and commit, an admin's rotation request, the coordinator's own key). A transition
//! reads the model and returns a [`Change`] (the rows to write and the audit entries) or a
//! [`RegistryError`]; the daemon loads the model inside a database transaction and persists
//! the change. No I/O and no clock: time, invitation ids and generated keys come in as
//! arguments.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::alloc::{self, AllocError};
use crate::wire::api::{InviteRequest, JoinRequest};
use crate::{PrivateKey, PublicKey};

#[cfg(test)]
mod tests;

/// Default invitation lifetime: 24 h.
pub const DEFAULT_INVITE_TTL_SECS: u64 = 24 * 3600;
/// Longest invitation lifetime accepted: 30 days.
pub const MAX_INVITE_TTL_SECS: u64 = 30 * 24 * 3600;
/// Most endpoint addresses one host may report.
pub const MAX_REPORTED_ADDRESSES: usize = 32;

/// A host row's identity (the database assigns it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(pub i64);

/// One host, in any state (invited, joined, removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub id: HostId,
    pub name: String,
    pub address: IpAddr,
    pub public_key: PublicKey,
    /// The prepared next key of a rotation in progress.
    pub next_public_key: Option<PublicKey>,
    pub admin: bool,
    pub static_peer: bool,
    /// Invited, not joined yet (its key is the token's throwaway key).
    pub pending: bool,
    pub removed: bool,
    pub created_unix: u64,
    pub last_seen_unix: Option<u64>,
    pub key_created_unix: u64,
    /// When an admin asked the host to rotate (`meshctl rotate NAME`), until its commit.
    pub rotate_requested_unix: Option<u64>,
    /// Where the coordinator last saw the host's packets come from.
    pub observed: Option<SocketAddr>,
    /// The subnets the host routes for the mesh, as it last reported them.
    pub advertise: Vec<IpNet>,
}

impl Host {
    pub fn rotate_requested(&self) -> bool {
        self.rotate_requested_unix.is_some()
    }
}

/// Where an invitation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InviteState {
    Pending,
    Used,
    Revoked,
    Expired,
}

impl InviteState {
    pub fn as_str(self) -> &'static str {
        match self {
            InviteState::Pending => "pending",
            InviteState::Used => "used",
            InviteState::Revoked => "revoked",
            InviteState::Expired => "expired",
        }
    }

    /// The stored word; `None` for an unknown one.
    pub fn parse(s: &str) -> Option<InviteState> {
        [
            InviteState::Pending,
            InviteState::Used,
            InviteState::Revoked,
            InviteState::Expired,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// One invitation of a daemon host (static peers have none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    pub id: String,
    pub name: String,
    pub address: IpAddr,
    /// Its pending host.
    pub host: HostId,
    pub admin: bool,
    pub created_unix: u64,
    pub expires_unix: u64,
    pub state: InviteState,
}

/// What the registry is configured with (the coordinator's settings the transitions need).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub mesh_cidr: IpNet,
    /// Ranges automatic assignment never hands out.
    pub reserved: Vec<IpNet>,
    /// Name to address, used when that name is invited.
    pub static_assignments: BTreeMap<String, IpAddr>,
    /// The coordinator host's own name and address.
    pub own_name: String,
    pub own_address: IpAddr,
}

/// The registry's rows the transitions decide on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    pub settings: Settings,
    /// Every host ever registered, by ascending id.
    pub hosts: Vec<Host>,
    /// Every invitation, oldest first.
    pub invitations: Vec<Invitation>,
    /// Keys rotations retired (refused forever), with the host that held each.
    pub retired: Vec<(PublicKey, String)>,
}

/// One row of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub at_unix: u64,
    pub action: &'static str,
    pub subject: String,
    pub detail: String,
}

/// A host to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewHost {
    pub name: String,
    pub address: IpAddr,
    pub public_key: PublicKey,
    pub admin: bool,
    pub static_peer: bool,
    pub pending: bool,
    /// Also its key's creation time.
    pub created_unix: u64,
    pub last_seen_unix: Option<u64>,
    /// A static peer's neighbour behind the same NAT.
    pub near: Option<String>,
    /// Its endpoints (a static peer's given one).
    pub reported: Vec<SocketAddr>,
    /// A daemon host's invitation (same name, address, admin flag and creation time).
    pub invitation: Option<NewInvitation>,
}

/// The invitation of a [`NewHost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInvitation {
    pub id: String,
    pub expires_unix: u64,
}

/// A coordinator key notice to store for one host (`crate::wire::notice`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyNoticeRow {
    pub host_key: PublicKey,
    pub notice: crate::wire::notice::KeyNotice,
    /// The MAC key the host proves its key with toward the old coordinator key (none for a
    /// low-order host key).
    pub auth_key: Option<[u8; 32]>,
}

/// One write a transition asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    AddHost(NewHost),
    /// The host's new state. The store writes the fields transitions change: address, key,
    /// next key, key time, last seen, flags and rotation request (not name, observed address
    /// or advertised routes, which no transition here changes).
    UpdateHost(Host),
    /// A pending invitation is used, revoked or expired at `at_unix`.
    CloseInvitation {
        id: String,
        state: InviteState,
        at_unix: u64,
    },
    /// A key rotated away, refused from then on (kept if already retired).
    RetireKey {
        key: PublicKey,
        host: String,
        at_unix: u64,
    },
    /// The host's reported endpoints are replaced.
    SetReported {
        host: HostId,
        endpoints: Vec<SocketAddr>,
    },
    /// A coordinator key notice (replacing one for the same host and old key).
    KeyNotice(KeyNoticeRow),
}

/// A host's key replaced by a join or a committed rotation: the coordinator's own interface
/// keeps the old key for a grace period, so the reply reaches the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySwap {
    pub name: String,
    pub address: IpAddr,
    pub old: PublicKey,
    pub new: PublicKey,
}

/// What a transition changes. Empty: nothing (the netmap version stays).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    pub edits: Vec<Edit>,
    pub audit: Vec<AuditEntry>,
    pub key_swap: Option<KeySwap>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty() && self.audit.is_empty()
    }

    fn with_edit(mut self, e: Edit) -> Change {
        self.edits.push(e);
        self
    }

    fn with_audit(
        mut self,
        at_unix: u64,
        action: &'static str,
        subject: &str,
        detail: String,
    ) -> Self {
        self.audit.push(AuditEntry {
            at_unix,
            action,
            subject: subject.to_string(),
            detail,
        });
        self
    }
}

/// Why a transition is refused. The daemon maps each onto its API error (the HTTP status).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    // The request itself is unusable.
    #[error("host name {0:?} is not valid (1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-')")]
    BadName(String),
    #[error("ttl of {0} s is out of range (1 s to {MAX_INVITE_TTL_SECS} s)")]
    BadTtl(u64),
    #[error("a static peer cannot be an admin host (it cannot call the API)")]
    StaticAdmin,
    #[error("public_key is only for static peers (a daemon host generates its own key)")]
    KeyForDaemonHost,
    #[error("endpoint and near are only for static peers (a daemon host reports its own)")]
    EndpointForDaemonHost,
    #[error(
        "endpoint {0} is unusable (port 0, unspecified, loopback, multicast or inside the mesh)"
    )]
    UnusableEndpoint(SocketAddr),
    #[error("{0} cannot be near itself")]
    NearItself(String),
    #[error("near {0}: a static peer cannot mark a NAT (name a daemon host)")]
    NearStaticPeer(String),
    #[error("listen_port must not be 0")]
    ListenPortZero,
    #[error("{0} addresses reported; at most {MAX_REPORTED_ADDRESSES} are accepted")]
    TooManyAddresses(usize),

    // The request conflicts with the registry.
    #[error("{name} has the static assignment {assigned}, not {asked}")]
    StaticAssignment {
        name: String,
        assigned: IpAddr,
        asked: IpAddr,
    },
    #[error("the name {name} is already taken by {} host {address}", if *.pending { "the invited" } else { "the" })]
    NameTaken {
        name: String,
        address: IpAddr,
        pending: bool,
    },
    #[error("public key {} is a key host {host} rotated away and is refused", .key.short())]
    KeyRetired { key: PublicKey, host: String },
    #[error("public key {} belonged to the removed host {host} and is refused", .key.short())]
    KeyOfRemovedHost { key: PublicKey, host: String },
    #[error("public key {} is already registered to host {host}", .key.short())]
    KeyInUse { key: PublicKey, host: String },
    #[error("{0} is the coordinator itself and cannot be removed")]
    RemoveCoordinator(String),
    #[error("{0} is the coordinator itself; its key is rotated by its own meshd (set_own_public_key), not over the API")]
    CoordinatorOverApi(IpAddr),
    #[error(
        "{0} is a static peer; its key is managed by re-inviting it, not rotated over the API"
    )]
    StaticPeerRotates(String),
    #[error("{0} is a static peer: its key is set by hand in its wg-quick configuration (re-invite it with a new key), not rotated by meshd")]
    StaticPeerRotationRequest(String),
    #[error("{0} has not joined yet; it gets a fresh key when it joins")]
    NotJoinedYet(String),
    #[error("key {} was not prepared for {name}; prepare it first (POST /v1/rotate/prepare)", .key.short())]
    NotPrepared { key: PublicKey, name: String },
    #[error("key {} was not prepared for the coordinator {name}", .key.short())]
    NotPreparedOwn { key: PublicKey, name: String },
    #[error("the coordinator's registered key is {}, not the running {}", .registered.short(), .running.short())]
    NotRunningKey {
        registered: PublicKey,
        running: PublicKey,
    },
    #[error("the coordinator's new address {0} was already given to another host")]
    CoordinatorAddressUsed(IpAddr),
    #[error("the coordinator's address {address} belongs to host {host}")]
    CoordinatorAddressHeld { address: IpAddr, host: String },
    #[error("address refused: {0}")]
    Alloc(#[from] AllocError),

    // Unknown things.
    #[error("no host named {0}")]
    NoSuchHost(String),
    #[error("no pending invitation for {0}")]
    NoSuchInvite(String),
    #[error("{0} is not a joined host of this mesh")]
    NotAHost(IpAddr),

    // Joins that are refused.
    /// A token signed by us that names no invitation (the registry was replaced), or one
    /// whose name or address differ from its invitation's.
    #[error("token has been tampered with (its signature does not match this coordinator's)")]
    ForeignToken,
    #[error("invitation for {0} has expired")]
    Expired(String),
    #[error("invitation for {0} was already used")]
    AlreadyUsed(String),
    #[error("invitation for {0} was revoked")]
    Revoked(String),
    #[error("host {0} was removed from the mesh")]
    Removed(String),
    #[error("join for {name} must come from its invited address {expected}, not from {caller}")]
    WrongCaller {
        name: String,
        expected: IpAddr,
        caller: IpAddr,
    },

    // The registry itself is inconsistent.
    #[error("the coordinator host {0} is missing")]
    CoordinatorMissing(String),
    #[error("invitation {0} names a host that does not exist")]
    InvitationWithoutHost(String),
}

/// Host names are DNS labels: 1 to 63 of `a-z0-9-`, not starting or ending with `-`.
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    if crate::netmap::valid_name(name) {
        Ok(())
    } else {
        Err(RegistryError::BadName(name.to_string()))
    }
}

/// The checks of an endpoint report (or a join's addresses) that need no registry.
pub fn check_report(listen_port: u16, addresses: &[IpAddr]) -> Result<(), RegistryError> {
    if listen_port == 0 {
        return Err(RegistryError::ListenPortZero);
    }
    if addresses.len() > MAX_REPORTED_ADDRESSES {
        return Err(RegistryError::TooManyAddresses(addresses.len()));
    }
    Ok(())
}

/// Underlay endpoint candidates from reported interface addresses: drops addresses that
/// cannot be endpoints (unspecified, loopback, multicast, IPv6 link-local, inside the mesh).
pub fn candidate_endpoints(mesh: IpNet, addresses: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in addresses {
        let a = a.to_canonical();
        let unusable = a.is_unspecified()
            || a.is_loopback()
            || a.is_multicast()
            || mesh.contains(&a)
            || matches!(a, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
            || matches!(a, IpAddr::V4(v4) if v4.is_broadcast() || v4.is_link_local());
        let sa = SocketAddr::new(a, port);
        if !unusable && !out.contains(&sa) {
            out.push(sa);
        }
    }
    out
}

/// An invitation request that passed the checks needing no registry ([`check_invite`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    pub name: String,
    pub ttl_secs: u64,
    pub admin: bool,
    pub static_peer: bool,
    /// A static peer's endpoint, its address canonical.
    pub endpoint: Option<SocketAddr>,
    pub near: Option<String>,
    /// The address asked for, or the name's static assignment.
    pub requested: Option<IpAddr>,
}

/// Check an invitation request against the settings alone (name, lifetime, which fields a
/// static peer or a daemon host may carry, the static assignment).
pub fn check_invite(req: &InviteRequest, settings: &Settings) -> Result<Invite, RegistryError> {
    check_name(&req.name)?;
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_INVITE_TTL_SECS);
    if ttl == 0 || ttl > MAX_INVITE_TTL_SECS {
        return Err(RegistryError::BadTtl(ttl));
    }
    if req.static_peer && req.admin {
        return Err(RegistryError::StaticAdmin);
    }
    if !req.static_peer && req.public_key.is_some() {
        return Err(RegistryError::KeyForDaemonHost);
    }
    if !req.static_peer && (req.endpoint.is_some() || req.near.is_some()) {
        return Err(RegistryError::EndpointForDaemonHost);
    }
    let endpoint = req
        .endpoint
        .map(|e| SocketAddr::new(e.ip().to_canonical(), e.port()));
    if let Some(e) = endpoint {
        let ip = e.ip();
        if e.port() == 0
            || ip.is_unspecified()
            || ip.is_loopback()
            || ip.is_multicast()
            || settings.mesh_cidr.contains(&ip)
        {
            return Err(RegistryError::UnusableEndpoint(e));
        }
    }
    if req.near.as_deref() == Some(req.name.as_str()) {
        return Err(RegistryError::NearItself(req.name.clone()));
    }
    let requested = match (settings.static_assignments.get(&req.name), req.address) {
        (Some(s), Some(a)) if *s != a => {
            return Err(RegistryError::StaticAssignment {
                name: req.name.clone(),
                assigned: *s,
                asked: a,
            })
        }
        (Some(s), _) => Some(*s),
        (None, a) => a,
    };
    Ok(Invite {
        name: req.name.clone(),
        ttl_secs: ttl,
        admin: req.admin,
        static_peer: req.static_peer,
        endpoint,
        near: req.near.clone(),
        requested,
    })
}

/// What a daemon host's token carries beside what the caller drew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenTerms {
    pub expires_unix: u64,
    /// The coordinator's key as registered now (it rotates; the key it started with may be
    /// long gone).
    pub coordinator_key: PublicKey,
}

/// An accepted invitation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invited {
    pub address: IpAddr,
    /// For a daemon host (none for a static peer).
    pub token: Option<TokenTerms>,
    pub change: Change,
}

/// What a verified token says the join is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTicket {
    pub invite_id: String,
    pub host_name: String,
    pub host_address: IpAddr,
}

/// A rotation step on a host, and the host's name (for its netmap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub name: String,
    pub change: Change,
}

fn host_update(h: &Host, f: impl FnOnce(&mut Host)) -> Edit {
    let mut h = h.clone();
    f(&mut h);
    Edit::UpdateHost(h)
}

fn key_change(old: &PublicKey, new: &PublicKey) -> String {
    format!("key {} -> {}", old.short(), new.short())
}

impl Registry {
    /// The live (not removed) host called `name`.
    pub fn live_by_name(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name && !h.removed)
    }

    /// The live (not removed) host at `address`.
    pub fn live_by_address(&self, address: IpAddr) -> Option<&Host> {
        self.hosts
            .iter()
            .find(|h| h.address == address && !h.removed)
    }

    fn host(&self, id: HostId) -> Option<&Host> {
        self.hosts.iter().find(|h| h.id == id)
    }

    /// The coordinator host's own row (`Coordinator::open` registers it).
    pub fn own_host(&self) -> Result<&Host, RegistryError> {
        let own = &self.settings.own_name;
        self.live_by_name(own)
            .ok_or_else(|| RegistryError::CoordinatorMissing(own.clone()))
    }

    /// Every address ever handed out: hosts' (removed ones included) and invitations'.
    pub fn ever_used(&self) -> BTreeSet<IpAddr> {
        self.hosts
            .iter()
            .map(|h| h.address)
            .chain(self.invitations.iter().map(|i| i.address))
            .collect()
    }

    /// A key may be registered only once, ever: not retired, not any host's key or next key
    /// (removed hosts' included).
    pub fn check_key_unused(&self, key: &PublicKey) -> Result<(), RegistryError> {
        if let Some((_, host)) = self.retired.iter().find(|(k, _)| k == key) {
            return Err(RegistryError::KeyRetired {
                key: *key,
                host: host.clone(),
            });
        }
        let holder = self
            .hosts
            .iter()
            .find(|h| h.public_key == *key || h.next_public_key == Some(*key));
        match holder {
            None => Ok(()),
            Some(h) if h.removed => Err(RegistryError::KeyOfRemovedHost {
                key: *key,
                host: h.name.clone(),
            }),
            Some(h) => Err(RegistryError::KeyInUse {
                key: *key,
                host: h.name.clone(),
            }),
        }
    }

    /// At start, the coordinator host registers itself (admin, `key`, `endpoints` as its
    /// reported endpoints), or its row follows the configuration. `reported`: its row's
    /// stored endpoints (none before it has one).
    pub fn register_coordinator(
        &self,
        key: PublicKey,
        endpoints: &[SocketAddr],
        reported: &[SocketAddr],
        now_unix: u64,
    ) -> Result<Change, RegistryError> {
        let own = &self.settings.own_name;
        let address = self.settings.own_address;
        let Some(h) = self.live_by_name(own) else {
            if let Some(other) = self.live_by_address(address) {
                return Err(RegistryError::CoordinatorAddressHeld {
                    address,
                    host: other.name.clone(),
                });
            }
            if self.ever_used().contains(&address) {
                return Err(RegistryError::CoordinatorAddressUsed(address));
            }
            self.check_key_unused(&key)?;
            return Ok(Change::default()
                .with_edit(Edit::AddHost(NewHost {
                    name: own.clone(),
                    address,
                    public_key: key,
                    admin: true,
                    static_peer: false,
                    pending: false,
                    created_unix: now_unix,
                    last_seen_unix: Some(now_unix),
                    near: None,
                    reported: endpoints.to_vec(),
                    invitation: None,
                }))
                .with_audit(
                    now_unix,
                    "coordinator",
                    own,
                    format!("address {address}, key {}", key.short()),
                ));
        };
        let mut change = Change::default();
        let mut host = h.clone();
        if h.address != address {
            if self.ever_used().contains(&address) {
                return Err(RegistryError::CoordinatorAddressUsed(address));
            }
            host.address = address;
            change = change.with_audit(now_unix, "coordinator_address", own, address.to_string());
        }
        if h.public_key != key {
            self.check_key_unused(&key)?;
            host.public_key = key;
            host.key_created_unix = now_unix;
            change = change.with_audit(now_unix, "coordinator_key", own, key.short());
        }
        host.admin = true;
        host.pending = false;
        host.static_peer = false;
        if host != *h {
            change = change.with_edit(Edit::UpdateHost(host));
        }
        if reported != endpoints {
            change = change
                .with_edit(Edit::SetReported {
                    host: h.id,
                    endpoints: endpoints.to_vec(),
                })
                .with_audit(
                    now_unix,
                    "coordinator_endpoints",
                    own,
                    format!("{endpoints:?}"),
                );
        }
        Ok(change)
    }

    /// Invite a host (checked by [`check_invite`]). A daemon host gets a pending host row
    /// with `key`, its token's throwaway key, and the invitation `invite_id`; a static peer is
    /// registered at once with `key` (its given or generated key).
    pub fn invite(
        &self,
        inv: &Invite,
        key: PublicKey,
        invite_id: &str,
        now_unix: u64,
    ) -> Result<Invited, RegistryError> {
        if let Some(h) = self.live_by_name(&inv.name) {
            return Err(RegistryError::NameTaken {
                name: inv.name.clone(),
                address: h.address,
                pending: h.pending,
            });
        }
        // Other names' static assignments are never handed to this one.
        let mut reserved = self.settings.reserved.clone();
        for (other, addr) in &self.settings.static_assignments {
            if *other != inv.name {
                reserved.push(IpNet::from(*addr));
            }
        }
        let address = alloc::allocate(
            self.settings.mesh_cidr,
            &reserved,
            &self.ever_used(),
            inv.requested,
        )?;
        self.check_key_unused(&key)?;
        let mut host = NewHost {
            name: inv.name.clone(),
            address,
            public_key: key,
            admin: inv.admin,
            static_peer: inv.static_peer,
            pending: !inv.static_peer,
            created_unix: now_unix,
            last_seen_unix: None,
            near: None,
            reported: Vec::new(),
            invitation: None,
        };
        if inv.static_peer {
            if let Some(near) = &inv.near {
                match self.live_by_name(near) {
                    Some(h) if !h.static_peer => {}
                    Some(_) => return Err(RegistryError::NearStaticPeer(near.clone())),
                    None => return Err(RegistryError::NoSuchHost(near.clone())),
                }
            }
            host.near = inv.near.clone();
            host.reported = inv.endpoint.into_iter().collect();
            let detail = format!(
                "address {address}, key {}, endpoint {}, near {}",
                key.short(),
                inv.endpoint
                    .map_or_else(|| "-".to_string(), |e| e.to_string()),
                inv.near.as_deref().unwrap_or("-")
            );
            let change = Change::default().with_edit(Edit::AddHost(host)).with_audit(
                now_unix,
                "static_peer",
                &inv.name,
                detail,
            );
            return Ok(Invited {
                address,
                token: None,
                change,
            });
        }
        let expires = now_unix.saturating_add(inv.ttl_secs);
        host.invitation = Some(NewInvitation {
            id: invite_id.to_string(),
            expires_unix: expires,
        });
        let coordinator_key = self.own_host()?.public_key;
        let detail = format!(
            "address {address}, expires {expires}, admin {}, invitation {invite_id}",
            inv.admin
        );
        let change = Change::default()
            .with_edit(Edit::AddHost(host))
            .with_audit(now_unix, "invite", &inv.name, detail);
        Ok(Invited {
            address,
            token: Some(TokenTerms {
                expires_unix: expires,
                coordinator_key,
            }),
            change,
        })
    }

    /// Close `inv` as `state`, taking its host out of the netmaps if it is still pending
    /// (the address stays reserved).
    fn close_invitation(&self, inv: &Invitation, state: InviteState, now_unix: u64) -> Vec<Edit> {
        let mut edits = vec![Edit::CloseInvitation {
            id: inv.id.clone(),
            state,
            at_unix: now_unix,
        }];
        if let Some(h) = self.host(inv.host).filter(|h| h.pending) {
            edits.push(host_update(h, |h| h.removed = true));
        }
        edits
    }

    /// Pending invitations past their expiry expire; their pending hosts leave the netmaps.
    /// One audit entry per expired invitation.
    pub fn expire_invites(&self, now_unix: u64) -> Change {
        let mut change = Change::default();
        for inv in self
            .invitations
            .iter()
            .filter(|i| i.state == InviteState::Pending && i.expires_unix <= now_unix)
        {
            change
                .edits
                .extend(self.close_invitation(inv, InviteState::Expired, now_unix));
            change = change.with_audit(
                now_unix,
                "invite_expired",
                &inv.name,
                format!("invitation {}", inv.id),
            );
        }
        change
    }

    /// Revoke the pending invitation for `name`.
    pub fn revoke_invite(&self, name: &str, now_unix: u64) -> Result<Change, RegistryError> {
        let inv = self
            .invitations
            .iter()
            .find(|i| i.name == name && i.state == InviteState::Pending)
            .ok_or_else(|| RegistryError::NoSuchInvite(name.to_string()))?;
        let change = Change {
            edits: self.close_invitation(inv, InviteState::Revoked, now_unix),
            ..Change::default()
        };
        Ok(change.with_audit(
            now_unix,
            "revoke_invite",
            name,
            format!("invitation {}", inv.id),
        ))
    }

    /// A host joins with its verified token from `caller` (canonical): its throwaway key is
    /// replaced by `req.public_key`, its endpoints are recorded, the invitation is used up.
    pub fn join(
        &self,
        ticket: &JoinTicket,
        caller: IpAddr,
        req: &JoinRequest,
        now_unix: u64,
    ) -> Result<Change, RegistryError> {
        let inv = self
            .invitations
            .iter()
            .find(|i| i.id == ticket.invite_id)
            .ok_or(RegistryError::ForeignToken)?;
        let name = inv.name.clone();
        match inv.state {
            InviteState::Pending => {}
            InviteState::Used => return Err(RegistryError::AlreadyUsed(name)),
            InviteState::Expired => return Err(RegistryError::Expired(name)),
            InviteState::Revoked => return Err(RegistryError::Revoked(name)),
        }
        if inv.expires_unix <= now_unix {
            return Err(RegistryError::Expired(name));
        }
        if inv.name != ticket.host_name || inv.address != ticket.host_address {
            return Err(RegistryError::ForeignToken);
        }
        if caller != inv.address {
            return Err(RegistryError::WrongCaller {
                name,
                expected: inv.address,
                caller,
            });
        }
        let host = self
            .host(inv.host)
            .ok_or_else(|| RegistryError::InvitationWithoutHost(inv.id.clone()))?;
        if host.removed {
            return Err(RegistryError::Removed(name));
        }
        let key = req.public_key;
        self.check_key_unused(&key)?;
        let endpoints =
            candidate_endpoints(self.settings.mesh_cidr, &req.addresses, req.listen_port);
        let mut change = Change::default()
            .with_edit(host_update(host, |h| {
                h.public_key = key;
                h.key_created_unix = now_unix;
                h.pending = false;
                h.last_seen_unix = Some(now_unix);
            }))
            .with_edit(Edit::SetReported {
                host: host.id,
                endpoints,
            })
            .with_edit(Edit::CloseInvitation {
                id: inv.id.clone(),
                state: InviteState::Used,
                at_unix: now_unix,
            })
            .with_audit(
                now_unix,
                "join",
                &name,
                format!("address {}, key {}", inv.address, key.short()),
            );
        change.key_swap = Some(KeySwap {
            name: name.clone(),
            address: inv.address,
            old: host.public_key,
            new: key,
        });
        Ok(change)
    }

    /// The joined daemon host at `caller` (canonical) that asks to rotate its key.
    fn rotating_host(&self, caller: IpAddr) -> Result<&Host, RegistryError> {
        if caller == self.settings.own_address {
            return Err(RegistryError::CoordinatorOverApi(caller));
        }
        let host = match self.live_by_address(caller) {
            Some(h) if !h.pending => h,
            Some(_) => return Err(RegistryError::NotAHost(caller)),
            None => {
                let removed = self
                    .hosts
                    .iter()
                    .find(|h| h.address == caller && h.removed && !h.pending);
                return Err(match removed {
                    Some(h) => RegistryError::Removed(h.name.clone()),
                    None => RegistryError::NotAHost(caller),
                });
            }
        };
        if host.static_peer {
            return Err(RegistryError::StaticPeerRotates(host.name.clone()));
        }
        Ok(host)
    }

    /// Rotation, first half (`crate::rotation`): `key` becomes the caller's next key.
    /// Idempotent (also once committed); a different next key replaces an earlier one.
    pub fn prepare_rotation(
        &self,
        caller: IpAddr,
        key: PublicKey,
        now_unix: u64,
    ) -> Result<Rotation, RegistryError> {
        let host = self.rotating_host(caller)?;
        let name = host.name.clone();
        // Prepared already, or even committed (the host crashed before it saw the commit's
        // reply): nothing to do; the reply's netmap says which.
        if host.next_public_key == Some(key) || host.public_key == key {
            return Ok(Rotation {
                name,
                change: Change::default(),
            });
        }
        self.check_key_unused(&key)?;
        let change = Change::default()
            .with_edit(host_update(host, |h| {
                h.next_public_key = Some(key);
                h.last_seen_unix = Some(now_unix);
            }))
            .with_audit(
                now_unix,
                "rotate-prepare",
                &name,
                key_change(&host.public_key, &key),
            );
        Ok(Rotation { name, change })
    }

    /// Rotation, second half: the prepared `key` replaces the caller's key, the old key is
    /// retired. Committing the key the caller already holds changes nothing (a retried
    /// commit); a key that was not prepared is refused.
    pub fn commit_rotation(
        &self,
        caller: IpAddr,
        key: PublicKey,
        now_unix: u64,
    ) -> Result<Rotation, RegistryError> {
        let host = self.rotating_host(caller)?;
        let name = host.name.clone();
        if host.public_key == key {
            return Ok(Rotation {
                name,
                change: Change::default(),
            });
        }
        if host.next_public_key != Some(key) {
            return Err(RegistryError::NotPrepared { key, name });
        }
        let mut change = Change::default()
            .with_edit(Edit::RetireKey {
                key: host.public_key,
                host: name.clone(),
                at_unix: now_unix,
            })
            .with_edit(host_update(host, |h| {
                h.public_key = key;
                h.next_public_key = None;
                h.key_created_unix = now_unix;
                h.last_seen_unix = Some(now_unix);
                h.rotate_requested_unix = None;
            }))
            .with_audit(
                now_unix,
                "rotate",
                &name,
                key_change(&host.public_key, &key),
            );
        change.key_swap = Some(KeySwap {
            name: name.clone(),
            address: host.address,
            old: host.public_key,
            new: key,
        });
        Ok(Rotation { name, change })
    }

    /// Remove a host: it leaves every netmap, its key is refused from then on, its address
    /// stays reserved; a pending host's invitation is revoked with it.
    pub fn remove(&self, name: &str, now_unix: u64) -> Result<Change, RegistryError> {
        if name == self.settings.own_name {
            return Err(RegistryError::RemoveCoordinator(name.to_string()));
        }
        let host = self
            .live_by_name(name)
            .ok_or_else(|| RegistryError::NoSuchHost(name.to_string()))?;
        let mut change = Change::default().with_edit(host_update(host, |h| h.removed = true));
        for inv in self
            .invitations
            .iter()
            .filter(|i| i.host == host.id && i.state == InviteState::Pending)
        {
            change = change.with_edit(Edit::CloseInvitation {
                id: inv.id.clone(),
                state: InviteState::Revoked,
                at_unix: now_unix,
            });
        }
        Ok(change.with_audit(
            now_unix,
            "remove",
            name,
            format!("address {}, key {}", host.address, host.public_key.short()),
        ))
    }

    /// An admin asks the joined daemon host `name` to rotate; asking again before its commit
    /// changes nothing.
    pub fn request_rotation(&self, name: &str, now_unix: u64) -> Result<Change, RegistryError> {
        let host = self
            .live_by_name(name)
            .ok_or_else(|| RegistryError::NoSuchHost(name.to_string()))?;
        if host.static_peer {
            return Err(RegistryError::StaticPeerRotationRequest(name.to_string()));
        }
        if host.pending {
            return Err(RegistryError::NotJoinedYet(name.to_string()));
        }
        if host.rotate_requested() {
            return Ok(Change::default());
        }
        Ok(Change::default()
            .with_edit(host_update(host, |h| {
                h.rotate_requested_unix = Some(now_unix)
            }))
            .with_audit(
                now_unix,
                "rotate-request",
                name,
                "asked by an admin".to_string(),
            ))
    }

    /// The coordinator's own key is replaced outright by `key`.
    pub fn set_own_key(&self, key: PublicKey, now_unix: u64) -> Result<Change, RegistryError> {
        let host = self.own_host()?;
        if host.public_key == key {
            return Ok(Change::default());
        }
        self.check_key_unused(&key)?;
        Ok(Change::default()
            .with_edit(host_update(host, |h| {
                h.public_key = key;
                h.key_created_unix = now_unix;
            }))
            .with_audit(
                now_unix,
                "rotate_key",
                &host.name,
                format!("key {}", key.short()),
            ))
    }

    /// The coordinator's own rotation, first half: `next` becomes its next key. Idempotent.
    pub fn prepare_own_rotation(
        &self,
        next: PublicKey,
        now_unix: u64,
    ) -> Result<Change, RegistryError> {
        let host = self.own_host()?;
        if host.next_public_key == Some(next) || host.public_key == next {
            return Ok(Change::default());
        }
        self.check_key_unused(&next)?;
        Ok(Change::default()
            .with_edit(host_update(host, |h| h.next_public_key = Some(next)))
            .with_audit(
                now_unix,
                "rotate-prepare",
                &host.name,
                key_change(&host.public_key, &next),
            ))
    }

    /// The coordinator's own rotation, second half: the prepared `next` replaces its key, the
    /// old key (`old_private`'s) is retired, and every other live daemon host (pending ones
    /// included) gets a key notice authenticated with the old private key. Idempotent once
    /// committed.
    pub fn commit_own_rotation(
        &self,
        next: PublicKey,
        old_private: &PrivateKey,
        now_unix: u64,
    ) -> Result<Change, RegistryError> {
        let host = self.own_host()?;
        let old = old_private.public_key();
        if host.public_key == next {
            return Ok(Change::default());
        }
        if host.next_public_key != Some(next) {
            return Err(RegistryError::NotPreparedOwn {
                key: next,
                name: host.name.clone(),
            });
        }
        if host.public_key != old {
            return Err(RegistryError::NotRunningKey {
                registered: host.public_key,
                running: old,
            });
        }
        let mut change = Change::default();
        for h in self
            .hosts
            .iter()
            .filter(|h| !h.removed && !h.static_peer && h.id != host.id)
        {
            let notice = crate::wire::notice::issue(old_private, &h.public_key, next, now_unix);
            // The host asks for its notices proving its key toward `old`, whose private half
            // is about to go: keep that MAC key.
            let auth_key = crate::wire::auth::AuthKey::for_coordinator(old_private, &h.public_key)
                .ok()
                .map(|k| k.raw());
            change = change.with_edit(Edit::KeyNotice(KeyNoticeRow {
                host_key: h.public_key,
                notice,
                auth_key,
            }));
        }
        let notices = change.edits.len();
        Ok(change
            .with_edit(Edit::RetireKey {
                key: old,
                host: host.name.clone(),
                at_unix: now_unix,
            })
            .with_edit(host_update(host, |h| {
                h.public_key = next;
                h.next_public_key = None;
                h.key_created_unix = now_unix;
                h.rotate_requested_unix = None;
            }))
            .with_audit(
                now_unix,
                "rotate",
                &host.name,
                format!("{}; {notices} key notices", key_change(&old, &next)),
            ))
    }

    /// Apply `change` to the model as the store applies it to its rows (endpoint reports and
    /// key notices are not part of the model). New hosts get the next free id.
    pub fn apply(&mut self, change: &Change) {
        for edit in &change.edits {
            match edit {
                Edit::AddHost(n) => {
                    let id = HostId(self.hosts.iter().map(|h| h.id.0).max().unwrap_or(0) + 1);
                    self.hosts.push(Host {
                        id,
                        name: n.name.clone(),
                        address: n.address,
                        public_key: n.public_key,
                        next_public_key: None,
                        admin: n.admin,
                        static_peer: n.static_peer,
                        pending: n.pending,
                        removed: false,
                        created_unix: n.created_unix,
                        last_seen_unix: n.last_seen_unix,
                        key_created_unix: n.created_unix,
                        rotate_requested_unix: None,
                        observed: None,
                        advertise: Vec::new(),
                    });
                    if let Some(inv) = &n.invitation {
                        self.invitations.push(Invitation {
                            id: inv.id.clone(),
                            name: n.name.clone(),
                            address: n.address,
                            host: id,
                            admin: n.admin,
                            created_unix: n.created_unix,
                            expires_unix: inv.expires_unix,
                            state: InviteState::Pending,
                        });
                    }
                }
                Edit::UpdateHost(new) => {
                    if let Some(h) = self.hosts.iter_mut().find(|h| h.id == new.id) {
                        *h = new.clone();
                    }
                }
                Edit::CloseInvitation { id, state, .. } => {
                    if let Some(i) = self.invitations.iter_mut().find(|i| i.id == *id) {
                        i.state = *state;
                    }
                }
                Edit::RetireKey { key, host, .. } => {
                    if !self.retired.iter().any(|(k, _)| k == key) {
                        self.retired.push((*key, host.clone()));
                    }
                }
                Edit::SetReported { .. } | Edit::KeyNotice(_) => {}
            }
        }
    }
}
