//! The coordinator's error type. Every variant says what was refused and why; `http_status`
//! maps it onto the API's status codes.

use std::net::IpAddr;

use mesh_proto::alloc::AllocError;
use mesh_proto::registry::RegistryError;

/// Errors of the coordinator (registry and API).
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The request itself is unusable (bad JSON, bad name, bad field value).
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The token is not a meshd invitation token or is damaged.
    #[error("{0}")]
    BadToken(String),
    /// The token's MAC does not match (altered, or signed by another coordinator).
    #[error("token has been tampered with (its signature does not match this coordinator's)")]
    Tampered,
    /// The token or invitation expired.
    #[error("invitation for {0} has expired")]
    Expired(String),
    /// The invitation was already used for a join.
    #[error("invitation for {0} was already used")]
    AlreadyUsed(String),
    /// The invitation was revoked (or its host removed before it joined).
    #[error("invitation for {0} was revoked")]
    Revoked(String),
    /// The host was removed from the mesh; its key is refused from then on.
    #[error("host {0} was removed from the mesh")]
    Removed(String),
    /// The request body is larger than the API allows.
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// An admin call from a host that is not an admin.
    #[error("{0} is not an admin host")]
    NotAdmin(IpAddr),
    /// A request that introduces a key without proving it.
    #[error("{0}")]
    Unproven(String),
    /// A call from an address that is no (joined) host of this mesh.
    #[error("{0} is not a joined host of this mesh")]
    NotAHost(IpAddr),
    /// A join that does not come from the invited address.
    #[error("join for {name} must come from its invited address {expected}, not from {caller}")]
    WrongCaller {
        name: String,
        expected: IpAddr,
        caller: IpAddr,
    },
    /// No such pending invitation.
    #[error("no pending invitation for {0}")]
    NoSuchInvite(String),
    /// No such host.
    #[error("no host named {0}")]
    NoSuchHost(String),
    /// A route decision on a prefix the host does not advertise (and nobody decided).
    #[error("{0}")]
    NoSuchRoute(String),
    /// Unknown API path.
    #[error("no such API path: {0}")]
    NotFound(String),
    /// Known path, wrong method.
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// The request conflicts with the registry (name taken, key in use, ...).
    #[error("{0}")]
    Conflict(String),
    /// The address plan refused the address.
    #[error("address refused: {0}")]
    Alloc(#[from] AllocError),
    /// The registry database failed.
    #[error("registry database: {0}")]
    Db(#[from] rusqlite::Error),
    /// The API socket could not be set up or served.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Anything else that is our fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoordError {
    /// The HTTP status for this error: 400 malformed, 403 not allowed, 404 unknown, 405 wrong
    /// method, 409 conflict, 410 expired/used/revoked/removed, 413 too large, 500 internal.
    pub fn http_status(&self) -> u16 {
        match self {
            CoordError::Malformed(_) | CoordError::BadToken(_) => 400,
            CoordError::Tampered
            | CoordError::NotAdmin(_)
            | CoordError::Unproven(_)
            | CoordError::NotAHost(_)
            | CoordError::WrongCaller { .. } => 403,
            CoordError::NoSuchInvite(_)
            | CoordError::NoSuchHost(_)
            | CoordError::NoSuchRoute(_)
            | CoordError::NotFound(_) => 404,
            CoordError::MethodNotAllowed { .. } => 405,
            CoordError::Conflict(_) => 409,
            CoordError::Alloc(e) => match e {
                AllocError::OutsideMesh(..) | AllocError::NotAHostAddress(_) => 400,
                AllocError::Reserved(_) | AllocError::AlreadyUsed(_) | AllocError::Exhausted(_) => {
                    409
                }
            },
            CoordError::Expired(_)
            | CoordError::AlreadyUsed(_)
            | CoordError::Revoked(_)
            | CoordError::Removed(_) => 410,
            CoordError::TooLarge(_) => 413,
            CoordError::Db(_) | CoordError::Io { .. } | CoordError::Internal(_) => 500,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CoordError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A registry transition's refusal as the API answers it (the same message as its own).
impl From<RegistryError> for CoordError {
    fn from(e: RegistryError) -> Self {
        use RegistryError as R;
        match e {
            R::BadName(_)
            | R::BadTtl(_)
            | R::StaticAdmin
            | R::KeyForDaemonHost
            | R::EndpointForDaemonHost
            | R::UnusableEndpoint(_)
            | R::NearItself(_)
            | R::NearStaticPeer(_)
            | R::ListenPortZero
            | R::TooManyAddresses(_) => CoordError::Malformed(e.to_string()),
            R::StaticAssignment { .. }
            | R::NameTaken { .. }
            | R::KeyRetired { .. }
            | R::KeyOfRemovedHost { .. }
            | R::KeyInUse { .. }
            | R::RemoveCoordinator(_)
            | R::CoordinatorOverApi(_)
            | R::StaticPeerRotates(_)
            | R::StaticPeerRotationRequest(_)
            | R::NotJoinedYet(_)
            | R::NotPrepared { .. }
            | R::NotPreparedOwn { .. }
            | R::NotRunningKey { .. }
            | R::CoordinatorAddressUsed(_)
            | R::CoordinatorAddressHeld { .. } => CoordError::Conflict(e.to_string()),
            R::Alloc(a) => CoordError::Alloc(a),
            R::NoSuchHost(name) => CoordError::NoSuchHost(name),
            R::NoSuchInvite(name) => CoordError::NoSuchInvite(name),
            R::NotAHost(ip) => CoordError::NotAHost(ip),
            R::ForeignToken => CoordError::Tampered,
            R::Expired(name) => CoordError::Expired(name),
            R::AlreadyUsed(name) => CoordError::AlreadyUsed(name),
            R::Revoked(name) => CoordError::Revoked(name),
            R::Removed(name) => CoordError::Removed(name),
            R::WrongCaller {
                name,
                expected,
                caller,
            } => CoordError::WrongCaller {
                name,
                expected,
                caller,
            },
            R::CoordinatorMissing(_) | R::InvitationWithoutHost(_) => {
                CoordError::Internal(e.to_string())
            }
        }
    }
}
