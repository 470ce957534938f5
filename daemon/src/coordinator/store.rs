//! The registry's storage: hosts, invitations, endpoint reports and the audit log in SQLite,
//! plus the persisted netmap version and the token secret. The transitions themselves are
//! decided by `mesh_proto::registry`: each write loads that model, asks it, and persists the
//! change it returns.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;
use mesh_proto::netmap::{compute_netmap, HostRecord, Netmap, RegistrySnapshot};
use mesh_proto::registry::{
    self, Change, Edit, Host, HostId, Invitation, InviteState, JoinTicket, Registry, RegistryError,
};
use mesh_proto::wire::api::{
    EndpointReport, HostInfo, InviteInfo, InviteRequest, InviteResponse, JoinRequest, JoinResponse,
    RotateRequest, RotateResponse,
};
use mesh_proto::wire::token::{Token, TokenBody, TokenError};
use mesh_proto::{PrivateKey, PublicKey};
use rand_core::RngCore as _;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::watch;

use super::acks::{AckOutcome, Acks};
use super::grace::{RecentJoin, RecentJoins};
use super::render::PeerJsonCache;
use super::{schema, wgquick, CoordError, CoordinatorSettings};

pub use mesh_proto::registry::{
    DEFAULT_INVITE_TTL_SECS, MAX_INVITE_TTL_SECS, MAX_REPORTED_ADDRESSES,
};

const META_VERSION: &str = "netmap_version";
const META_SECRET: &str = "token_secret";

pub(super) struct Inner {
    pub(super) conn: Connection,
    /// The snapshot of the current version, built on first use after a change.
    snapshot: Option<Arc<RegistrySnapshot>>,
}

/// The coordinator: the registry behind a mutex, and a watch channel carrying the netmap
/// version to long-polls. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Mutex<Inner>>,
    settings: Arc<CoordinatorSettings>,
    /// What the registry model is configured with (from `settings`).
    model_settings: Arc<registry::Settings>,
    secret: Arc<[u8; 32]>,
    version_tx: Arc<watch::Sender<u64>>,
    peer_json: Arc<PeerJsonCache>,
    /// Joins inside their grace (the coordinator's own interface keeps the throwaway key).
    pub(super) recent: Arc<RecentJoins>,
    /// The netmap version each host has taken (from its long-polls).
    pub(super) acks: Arc<Acks>,
    /// Our own private keys and the replay cache, for the API's proof of key.
    pub(super) auth: Arc<super::auth::ApiAuth>,
    /// Endpoint reports, at most one applied per host and second.
    pub(super) reports: Arc<super::reports::ReportGate>,
    /// What the API counts (joins, requests, their duration) for `/metrics`.
    pub(super) api_stats: Arc<super::stats::ApiStats>,
}

/// Which part of a rotation a call performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RotationStep {
    Prepare,
    Commit,
}

const HOST_COLUMNS: &str = "id, name, address, public_key, admin, static_peer, pending, removed, \
     created_unix, last_seen_unix, key_created_unix, observed, advertise, next_public_key, \
     rotate_requested_unix";

/// At most this many advertised subnets per host.
const MAX_ADVERTISED: usize = 64;

fn advertise_col(idx: usize, s: String) -> rusqlite::Result<Vec<IpNet>> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| parse_col(idx, p.to_string()))
        .collect()
}

fn advertise_text(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A host's advertised subnets: real subnets (host bits zero, never /0) outside the mesh,
/// sorted and de-duplicated.
fn check_advertise(mesh: IpNet, advertise: &[IpNet]) -> Result<Vec<IpNet>, CoordError> {
    if advertise.len() > MAX_ADVERTISED {
        return Err(CoordError::Malformed(format!(
            "{} subnets advertised; at most {MAX_ADVERTISED} are accepted",
            advertise.len()
        )));
    }
    let mut out: Vec<IpNet> = Vec::with_capacity(advertise.len());
    for net in advertise {
        if *net != net.trunc() || net.prefix_len() == 0 {
            return Err(CoordError::Malformed(format!(
                "advertised {net} is not a subnet (host bits set, or a default route)"
            )));
        }
        if mesh_proto::routes::overlaps(net, &mesh) {
            return Err(CoordError::Malformed(format!(
                "advertised {net} overlaps the mesh {mesh}"
            )));
        }
        out.push(*net);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn parse_col<T: std::str::FromStr>(idx: usize, s: String) -> rusqlite::Result<T> {
    s.parse::<T>().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Text,
            format!("unparsable value {s:?}").into(),
        )
    })
}

fn key_col(idx: usize, bytes: Vec<u8>) -> rusqlite::Result<PublicKey> {
    let arr: [u8; 32] = bytes.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Blob,
            "public key is not 32 bytes".into(),
        )
    })?;
    Ok(PublicKey(arr))
}

fn host_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Host> {
    let observed: Option<String> = r.get(11)?;
    Ok(Host {
        id: HostId(r.get(0)?),
        name: r.get(1)?,
        address: parse_col(2, r.get::<_, String>(2)?)?,
        public_key: key_col(3, r.get(3)?)?,
        admin: r.get(4)?,
        static_peer: r.get(5)?,
        pending: r.get(6)?,
        removed: r.get(7)?,
        created_unix: r.get::<_, i64>(8)? as u64,
        last_seen_unix: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
        key_created_unix: r.get::<_, i64>(10)? as u64,
        observed: observed.map(|s| parse_col(11, s)).transpose()?,
        advertise: advertise_col(12, r.get(12)?)?,
        next_public_key: r
            .get::<_, Option<Vec<u8>>>(13)?
            .map(|b| key_col(13, b))
            .transpose()?,
        rotate_requested_unix: r.get::<_, Option<i64>>(14)?.map(|v| v as u64),
    })
}

fn live_host_by_name(tx: &Connection, name: &str) -> Result<Option<Host>, CoordError> {
    Ok(tx
        .query_row(
            &format!("SELECT {HOST_COLUMNS} FROM hosts WHERE name = ?1 AND removed = 0"),
            [name],
            host_from_row,
        )
        .optional()?)
}

fn live_host_by_address(tx: &Connection, address: IpAddr) -> Result<Option<Host>, CoordError> {
    Ok(tx
        .query_row(
            &format!("SELECT {HOST_COLUMNS} FROM hosts WHERE address = ?1 AND removed = 0"),
            [address.to_string()],
            host_from_row,
        )
        .optional()?)
}

/// The registry model (`mesh_proto::registry`): every host, invitation and retired key.
fn load_registry(tx: &Connection, settings: &registry::Settings) -> Result<Registry, CoordError> {
    let mut stmt = tx.prepare_cached(
        "SELECT id, name, address, host_id, admin, created_unix, expires_unix, state
         FROM invitations ORDER BY rowid",
    )?;
    let invitations = stmt
        .query_map([], |r| {
            let state: String = r.get(7)?;
            Ok(Invitation {
                id: r.get(0)?,
                name: r.get(1)?,
                address: parse_col(2, r.get::<_, String>(2)?)?,
                host: HostId(r.get(3)?),
                admin: r.get(4)?,
                created_unix: r.get::<_, i64>(5)? as u64,
                expires_unix: r.get::<_, i64>(6)? as u64,
                state: InviteState::parse(&state).ok_or_else(|| {
                    rusqlite::Error::FromSqlConversionFailure(
                        7,
                        rusqlite::types::Type::Text,
                        format!("unknown invitation state {state:?}").into(),
                    )
                })?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = tx.prepare_cached("SELECT public_key, host FROM retired_keys ORDER BY rowid")?;
    let retired = stmt
        .query_map([], |r| Ok((key_col(0, r.get(0)?)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Registry {
        settings: settings.clone(),
        hosts: host_rows(tx)?,
        invitations,
        retired,
    })
}

/// Write what a transition decided, in the caller's transaction. Returns whether anything
/// changed.
fn persist(tx: &Connection, change: &Change) -> Result<bool, CoordError> {
    for edit in &change.edits {
        match edit {
            Edit::AddHost(h) => {
                tx.execute(
                    "INSERT INTO hosts (name, address, public_key, admin, static_peer, pending,
                        removed, created_unix, key_created_unix, last_seen_unix, near, invite_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?7, ?8, ?9, ?10)",
                    params![
                        h.name,
                        h.address.to_string(),
                        h.public_key.0.as_slice(),
                        h.admin,
                        h.static_peer,
                        h.pending,
                        h.created_unix as i64,
                        h.last_seen_unix.map(|t| t as i64),
                        h.near,
                        h.invitation.as_ref().map(|i| &i.id),
                    ],
                )?;
                let host_id = tx.last_insert_rowid();
                set_reported(tx, host_id, &h.reported)?;
                if let Some(inv) = &h.invitation {
                    tx.execute(
                        "INSERT INTO invitations (id, name, address, host_id, admin, created_unix,
                            expires_unix, state)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending')",
                        params![
                            inv.id,
                            h.name,
                            h.address.to_string(),
                            host_id,
                            h.admin,
                            h.created_unix as i64,
                            inv.expires_unix as i64
                        ],
                    )?;
                }
            }
            Edit::UpdateHost(h) => {
                tx.execute(
                    "UPDATE hosts SET address = ?2, public_key = ?3, next_public_key = ?4,
                        admin = ?5, static_peer = ?6, pending = ?7, removed = ?8,
                        key_created_unix = ?9, last_seen_unix = ?10, rotate_requested_unix = ?11
                     WHERE id = ?1",
                    params![
                        h.id.0,
                        h.address.to_string(),
                        h.public_key.0.as_slice(),
                        h.next_public_key.as_ref().map(|k| k.0.to_vec()),
                        h.admin,
                        h.static_peer,
                        h.pending,
                        h.removed,
                        h.key_created_unix as i64,
                        h.last_seen_unix.map(|t| t as i64),
                        h.rotate_requested_unix.map(|t| t as i64),
                    ],
                )?;
            }
            Edit::CloseInvitation { id, state, at_unix } => {
                tx.execute(
                    "UPDATE invitations SET state = ?2, closed_unix = ?3 WHERE id = ?1",
                    params![id, state.as_str(), *at_unix as i64],
                )?;
            }
            Edit::RetireKey { key, host, at_unix } => {
                tx.execute(
                    "INSERT OR IGNORE INTO retired_keys (public_key, host, retired_unix)
                     VALUES (?1, ?2, ?3)",
                    params![key.0.as_slice(), host, *at_unix as i64],
                )?;
            }
            Edit::SetReported { host, endpoints } => {
                set_reported(tx, host.0, endpoints)?;
            }
            Edit::KeyNotice(n) => {
                tx.execute(
                    "INSERT OR REPLACE INTO key_notices
                        (host_key, old_key, new_key, tag, at_unix, auth_key)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        n.host_key.0.as_slice(),
                        n.notice.old_key.0.as_slice(),
                        n.notice.new_key.0.as_slice(),
                        n.notice.tag,
                        n.notice.at_unix as i64,
                        n.auth_key.map(|k| k.to_vec())
                    ],
                )?;
            }
        }
    }
    for a in &change.audit {
        audit(tx, a.at_unix, a.action, &a.subject, &a.detail)?;
    }
    Ok(!change.is_empty())
}

/// How many audit rows the registry keeps: the newest; older ones are pruned as new ones are
/// written (a member cannot grow the registry without bound by making it audit).
pub const AUDIT_KEEP: i64 = 10_000;

fn audit(
    tx: &Connection,
    now_unix: u64,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<(), CoordError> {
    audit_bounded(tx, AUDIT_KEEP, now_unix, action, subject, detail)
}

/// Append an audit row and, in the same transaction, delete all but the newest `keep` (ids
/// only grow: AUTOINCREMENT; the delete walks the primary key, usually one row).
fn audit_bounded(
    tx: &Connection,
    keep: i64,
    now_unix: u64,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<(), CoordError> {
    tx.execute(
        "INSERT INTO audit (at_unix, action, subject, detail) VALUES (?1, ?2, ?3, ?4)",
        params![now_unix as i64, action, subject, detail],
    )?;
    let id = tx.last_insert_rowid();
    tx.execute("DELETE FROM audit WHERE id <= ?1", [id - keep])?;
    Ok(())
}

fn reported_endpoints(tx: &Connection, host_id: i64) -> Result<Vec<SocketAddr>, CoordError> {
    let mut stmt =
        tx.prepare_cached("SELECT addr FROM endpoint_reports WHERE host_id = ?1 ORDER BY seq")?;
    let rows = stmt.query_map([host_id], |r| parse_col(0, r.get::<_, String>(0)?))?;
    Ok(rows.collect::<Result<Vec<SocketAddr>, _>>()?)
}

fn set_reported(tx: &Connection, host_id: i64, addrs: &[SocketAddr]) -> Result<bool, CoordError> {
    if reported_endpoints(tx, host_id)? == addrs {
        return Ok(false);
    }
    tx.execute("DELETE FROM endpoint_reports WHERE host_id = ?1", [host_id])?;
    for (seq, addr) in addrs.iter().enumerate() {
        tx.execute(
            "INSERT OR IGNORE INTO endpoint_reports (host_id, seq, addr) VALUES (?1, ?2, ?3)",
            params![host_id, seq as i64, addr.to_string()],
        )?;
    }
    Ok(true)
}

fn meta_get_u64(tx: &Connection, key: &str) -> Result<Option<u64>, CoordError> {
    Ok(tx
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, i64>(0)
        })
        .optional()?
        .map(|v| v as u64))
}

fn bump_version(tx: &Connection) -> Result<u64, CoordError> {
    let next = meta_get_u64(tx, META_VERSION)?.unwrap_or(0) + 1;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![META_VERSION, next as i64],
    )?;
    Ok(next)
}

fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand_core::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Host names are DNS labels: 1 to 63 of `a-z0-9-`, not starting or ending with `-`.
pub fn validate_name(name: &str) -> Result<(), CoordError> {
    Ok(registry::check_name(name)?)
}

impl Coordinator {
    /// Open (create or migrate) the registry at `settings.database`, load or generate the
    /// token secret, and register or update the coordinator host itself (admin, own key,
    /// `public_endpoints` as its reported endpoints).
    pub fn open(settings: CoordinatorSettings, now_unix: u64) -> Result<Coordinator, CoordError> {
        if !settings.mesh_cidr.contains(&settings.own_address) {
            return Err(CoordError::Malformed(format!(
                "the coordinator's address {} is not inside the mesh {}",
                settings.own_address, settings.mesh_cidr
            )));
        }
        validate_name(&settings.own_name)?;
        if let Some(dir) = settings.database.parent() {
            if !dir.as_os_str().is_empty() {
                crate::disk::create_dir_all(dir, 0o700).map_err(|e| {
                    CoordError::io(format!("creating the state directory {}", dir.display()), e)
                })?;
            }
        }
        prepare_database_files(&settings.database)?;
        let mut conn = Connection::open(&settings.database)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        schema::migrate(&mut conn)?;

        let tx = conn.transaction()?;
        let secret: Option<Vec<u8>> = tx
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [META_SECRET],
                |r| r.get(0),
            )
            .optional()?;
        let secret: [u8; 32] = match secret {
            Some(bytes) => bytes.try_into().map_err(|_| {
                CoordError::Internal("the stored token secret is not 32 bytes".into())
            })?,
            None => {
                let mut s = [0u8; 32];
                rand_core::OsRng.fill_bytes(&mut s);
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                    params![META_SECRET, s.as_slice()],
                )?;
                tracing::info!("generated the invitation token secret");
                s
            }
        };
        let model_settings = registry::Settings {
            mesh_cidr: settings.mesh_cidr,
            reserved: settings.reserved.clone(),
            static_assignments: settings.static_assignments.clone(),
            own_name: settings.own_name.clone(),
            own_address: settings.own_address,
        };
        let changed = register_self(&tx, &settings, &model_settings, now_unix)?;
        let mut version = meta_get_u64(&tx, META_VERSION)?.unwrap_or(0);
        if changed || version == 0 {
            version = bump_version(&tx)?;
        }
        tx.commit()?;
        tracing::info!(
            version,
            name = %settings.own_name,
            address = %settings.own_address,
            database = %settings.database.display(),
            "coordinator registry open"
        );
        let (version_tx, _) = watch::channel(version);
        Ok(Coordinator {
            inner: Arc::new(Mutex::new(Inner {
                conn,
                snapshot: None,
            })),
            settings: Arc::new(settings),
            model_settings: Arc::new(model_settings),
            secret: Arc::new(secret),
            version_tx: Arc::new(version_tx),
            peer_json: Arc::new(PeerJsonCache::default()),
            recent: Arc::new(RecentJoins::default()),
            acks: Arc::new(Acks::default()),
            auth: Arc::new(super::auth::ApiAuth::default()),
            reports: Arc::new(super::reports::ReportGate::default()),
            api_stats: Arc::new(super::stats::ApiStats::default()),
        })
    }

    pub fn settings(&self) -> &CoordinatorSettings {
        &self.settings
    }

    pub(super) fn lock(&self) -> Result<MutexGuard<'_, Inner>, CoordError> {
        self.inner
            .lock()
            .map_err(|_| CoordError::Internal("the registry lock is poisoned".into()))
    }

    /// Run `f` in one transaction; when it reports a change, bump and persist the version,
    /// commit, and wake the long-polls.
    pub(super) fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<(T, bool), CoordError>,
    ) -> Result<T, CoordError> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let tx = inner.conn.transaction()?;
        let (value, changed) = f(&tx)?;
        let version = if changed {
            Some(bump_version(&tx)?)
        } else {
            None
        };
        tx.commit()?;
        if let Some(v) = version {
            inner.snapshot = None;
            self.version_tx.send_replace(v);
        }
        Ok(value)
    }

    /// Run a registry transition in one write: load the model, let `decide` ask it, persist
    /// the change. A key swap (a join, a committed rotation) starts its grace before the
    /// version bump is published (see grace.rs; should the commit still fail, the entry's
    /// new key matches no host and is ignored).
    fn transition<T>(
        &self,
        decide: impl FnOnce(&Registry) -> Result<(T, Change), RegistryError>,
    ) -> Result<T, CoordError> {
        self.write(|tx| {
            let model = load_registry(tx, &self.model_settings)?;
            let (value, change) = decide(&model)?;
            let changed = persist(tx, &change)?;
            if let Some(swap) = change.key_swap {
                self.recent.record(RecentJoin {
                    name: swap.name,
                    address: swap.address,
                    throwaway: swap.old,
                    new_key: swap.new,
                    at: std::time::Instant::now(),
                });
            }
            Ok((value, changed))
        })
    }

    /// Invite a host. Daemon hosts get a signed one-line token (and a pending host row with
    /// the token's throwaway public key, so the coordinator's WireGuard accepts it and every
    /// netmap lists it); static peers are registered at once and get a complete wg-quick
    /// configuration. Other hosts learn about a static peer through their netmap.
    pub fn invite(&self, req: InviteRequest, now_unix: u64) -> Result<InviteResponse, CoordError> {
        let inv = registry::check_invite(&req, &self.model_settings)?;
        self.expire_invites(now_unix)?;
        // A daemon host's throwaway key (its token carries the private half), or a static
        // peer's key pair when it brought no public key.
        let drawn = PrivateKey::generate();
        let key = match req.public_key {
            Some(k) if inv.static_peer => k,
            _ => drawn.public_key(),
        };
        let invite_id = random_hex(16);
        let (address, terms) = self.transition(|r| {
            let out = r.invite(&inv, key, &invite_id, now_unix)?;
            Ok(((out.address, out.token), out.change))
        })?;
        tracing::info!(name = %inv.name, address = %address, static_peer = inv.static_peer, "invited");
        let settings = &self.settings;
        let Some(terms) = terms else {
            let netmap = self.netmap_for_name(&inv.name)?.ok_or_else(|| {
                CoordError::Internal(format!("no netmap for the new static peer {}", inv.name))
            })?;
            let generated = req.public_key.is_none().then_some(&drawn);
            let config = wgquick::render(
                &netmap,
                generated,
                inv.endpoint.map(|e| e.port()),
                settings.keepalive_secs,
                &settings.own_name,
            );
            return Ok(InviteResponse {
                name: inv.name,
                address,
                token: None,
                wg_quick_config: Some(config),
                expires_unix: None,
            });
        };
        let body = TokenBody {
            invite_id,
            coordinator_public_key: terms.coordinator_key,
            coordinator_endpoints: settings.public_endpoints.clone(),
            coordinator_address: settings.own_address,
            api_port: settings.api_port,
            mesh_cidr: settings.mesh_cidr,
            host_name: inv.name.clone(),
            host_address: address,
            throwaway_private_key: drawn.to_base64(),
            expires_unix: terms.expires_unix,
            admin: inv.admin,
        };
        Ok(InviteResponse {
            name: inv.name,
            address,
            token: Some(Token::sign(body, &self.secret).encode()),
            wg_quick_config: None,
            expires_unix: Some(terms.expires_unix),
        })
    }

    /// Mark pending invitations past their expiry as expired and take their pending hosts
    /// out of the netmaps (the addresses stay reserved). Returns how many expired.
    pub fn expire_invites(&self, now_unix: u64) -> Result<usize, CoordError> {
        self.transition(|r| {
            let change = r.expire_invites(now_unix);
            // One audit entry per expired invitation.
            Ok((change.audit.len(), change))
        })
    }

    /// Pending invitations: not used, not revoked, not expired.
    pub fn invites(&self, now_unix: u64) -> Result<Vec<InviteInfo>, CoordError> {
        let guard = self.lock()?;
        let mut stmt = guard.conn.prepare(
            "SELECT name, address, created_unix, expires_unix, admin FROM invitations
             WHERE state = 'pending' AND expires_unix > ?1 ORDER BY name",
        )?;
        let rows = stmt.query_map([now_unix as i64], |r| {
            Ok(InviteInfo {
                name: r.get(0)?,
                address: parse_col(1, r.get::<_, String>(1)?)?,
                created_unix: r.get::<_, i64>(2)? as u64,
                expires_unix: r.get::<_, i64>(3)? as u64,
                admin: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Revoke the pending invitation for `name`: its pending host leaves every netmap; the
    /// address stays reserved.
    pub fn revoke_invite(&self, name: &str, now_unix: u64) -> Result<(), CoordError> {
        self.transition(|r| Ok(((), r.revoke_invite(name, now_unix)?)))?;
        tracing::info!(name, "invitation revoked");
        Ok(())
    }

    /// A host joins with its token from its invited address: its throwaway key is replaced by
    /// `req.public_key` (the throwaway key is dead from then on), its reported endpoints are
    /// recorded, the invitation is used up. Returns the host's netmap.
    pub fn join(
        &self,
        caller: IpAddr,
        req: JoinRequest,
        now_unix: u64,
    ) -> Result<JoinResponse, CoordError> {
        let caller = caller.to_canonical();
        let token = Token::decode(req.token.trim()).map_err(|e| match e {
            TokenError::Tampered => CoordError::Tampered,
            other => CoordError::BadToken(other.to_string()),
        })?;
        let name = token.body.host_name.clone();
        token.verify(&self.secret, now_unix).map_err(|e| match e {
            TokenError::Tampered => CoordError::Tampered,
            TokenError::Expired => CoordError::Expired(name.clone()),
            other => CoordError::BadToken(other.to_string()),
        })?;
        registry::check_report(req.listen_port, &req.addresses)?;
        let ticket = JoinTicket {
            invite_id: token.body.invite_id.clone(),
            host_name: name.clone(),
            host_address: token.body.host_address,
        };
        self.transition(|r| Ok(((), r.join(&ticket, caller, &req, now_unix)?)))?;
        tracing::info!(name = %name, caller = %caller, "host joined");
        let netmap = self
            .netmap_for_name(&name)?
            .ok_or_else(|| CoordError::Internal(format!("no netmap for the new host {name}")))?;
        Ok(JoinResponse { netmap })
    }

    /// Rotation, first half (`mesh_proto::rotation`): `req.public_key` becomes the caller's
    /// *next* key. Every peer's netmap lists it (`next_public_key`), so peers accept a
    /// handshake from it; nothing routes to it yet. Idempotent; a different next key replaces
    /// an earlier prepared one (the host crashed and started over). Returns the caller's
    /// netmap.
    pub fn prepare_rotation(
        &self,
        caller: IpAddr,
        req: RotateRequest,
        now_unix: u64,
    ) -> Result<RotateResponse, CoordError> {
        self.rotation_step(caller, req, now_unix, RotationStep::Prepare)
    }

    /// Rotation, second half: the prepared next key `req.public_key` replaces the caller's key
    /// everywhere (allowed IPs move to it, the old key leaves every netmap). The coordinator's
    /// own interface keeps the old key for [`super::JOIN_KEY_GRACE`], as after a join, so the
    /// reply reaches the caller through the tunnel it still runs with the old key. Committing
    /// the key the caller already holds is a no-op (a retried commit whose reply was lost);
    /// a key that was not prepared is refused. The coordinator host itself rotates with
    /// [`Coordinator::set_own_public_key`]. Returns the caller's netmap.
    pub fn commit_rotation(
        &self,
        caller: IpAddr,
        req: RotateRequest,
        now_unix: u64,
    ) -> Result<RotateResponse, CoordError> {
        self.rotation_step(caller, req, now_unix, RotationStep::Commit)
    }

    fn rotation_step(
        &self,
        caller: IpAddr,
        req: RotateRequest,
        now_unix: u64,
        step: RotationStep,
    ) -> Result<RotateResponse, CoordError> {
        let caller = caller.to_canonical();
        let name = self.transition(|r| {
            let rotation = match step {
                RotationStep::Prepare => r.prepare_rotation(caller, req.public_key, now_unix)?,
                RotationStep::Commit => r.commit_rotation(caller, req.public_key, now_unix)?,
            };
            Ok((rotation.name, rotation.change))
        })?;
        tracing::info!(name = %name, caller = %caller, step = ?step, "host rotation step");
        let netmap = self.netmap_for_name(&name)?.ok_or_else(|| {
            CoordError::Internal(format!("no netmap for {name} after its key rotation"))
        })?;
        Ok(RotateResponse { netmap })
    }

    /// The checks of a report that need no registry (so a debounced report is refused at
    /// once, not when it is applied).
    pub fn check_report(&self, report: &EndpointReport) -> Result<(), CoordError> {
        registry::check_report(report.listen_port, &report.addresses)?;
        check_advertise(self.settings.mesh_cidr, &report.advertise).map(drop)
    }

    /// A host reports its interface addresses and listen port; `observed` is where the
    /// coordinator sees its WireGuard packets come from. The version moves only when the
    /// endpoints changed; `last_seen` is always updated.
    pub fn report_endpoints(
        &self,
        caller: IpAddr,
        observed: SocketAddr,
        report: EndpointReport,
        now_unix: u64,
    ) -> Result<(), CoordError> {
        self.report_endpoints_observed(caller, Some(observed), report, now_unix)
    }

    /// As `report_endpoints`, when the observed address may be unknown (no handshake yet):
    /// `None` keeps the last observed address.
    pub fn report_endpoints_observed(
        &self,
        caller: IpAddr,
        observed: Option<SocketAddr>,
        report: EndpointReport,
        now_unix: u64,
    ) -> Result<(), CoordError> {
        let caller = caller.to_canonical();
        registry::check_report(report.listen_port, &report.addresses)?;
        let mesh = self.settings.mesh_cidr;
        let advertise = check_advertise(mesh, &report.advertise)?;
        let changed = self.write(|tx| {
            let host = match live_host_by_address(tx, caller)? {
                Some(h) if !h.pending => h,
                _ => return Err(CoordError::NotAHost(caller)),
            };
            let mut advertise_changed = false;
            if advertise != host.advertise {
                // Advertised prefixes are pending until an admin approves them (one address
                // routes to one host only: checked at the approval, `super::routes`), so an
                // advertisement alone never blocks another host's report.
                tx.execute(
                    "UPDATE hosts SET advertise = ?2 WHERE id = ?1",
                    params![host.id.0, advertise_text(&advertise)],
                )?;
                super::routes::note_advertised(&host.name, &host.advertise, &advertise);
                audit(
                    tx,
                    now_unix,
                    "advertise",
                    &host.name,
                    &format!("[{}]", advertise_text(&advertise)),
                )?;
                advertise_changed = true;
            }
            let mut changed = set_reported(
                tx,
                host.id.0,
                &registry::candidate_endpoints(mesh, &report.addresses, report.listen_port),
            )?;
            let observed = observed.map(|o| SocketAddr::new(o.ip().to_canonical(), o.port()));
            if observed.is_some() && observed != host.observed {
                tx.execute(
                    "UPDATE hosts SET observed = ?2 WHERE id = ?1",
                    params![host.id.0, observed.map(|o| o.to_string())],
                )?;
                changed = true;
            }
            tx.execute(
                "UPDATE hosts SET last_seen_unix = ?2 WHERE id = ?1",
                params![host.id.0, now_unix as i64],
            )?;
            if changed {
                audit(
                    tx,
                    now_unix,
                    "endpoints",
                    &host.name,
                    &format!(
                        "port {}, {} addresses, observed {}",
                        report.listen_port,
                        report.addresses.len(),
                        observed.map_or_else(|| "-".to_string(), |o| o.to_string())
                    ),
                )?;
            }
            let changed = changed || advertise_changed;
            Ok((changed, changed))
        })?;
        if changed {
            tracing::debug!(caller = %caller, "endpoints changed");
        }
        Ok(())
    }

    /// Remove a host: it leaves every netmap, its key is refused from then on, its address
    /// stays reserved. A pending host's invitation is revoked with it.
    pub fn remove(&self, name: &str, now_unix: u64) -> Result<(), CoordError> {
        self.transition(|r| Ok(((), r.remove(name, now_unix)?)))?;
        tracing::info!(name, "host removed");
        Ok(())
    }

    /// Every host ever registered (removed ones included, marked).
    pub fn hosts(&self) -> Result<Vec<HostInfo>, CoordError> {
        let guard = self.lock()?;
        let mut stmt = guard.conn.prepare(&format!(
            "SELECT {HOST_COLUMNS} FROM hosts ORDER BY name, id"
        ))?;
        let rows = stmt.query_map([], host_from_row)?;
        let mut out = Vec::new();
        for row in rows {
            let h = row?;
            out.push(HostInfo {
                name: h.name,
                address: h.address,
                public_key: h.public_key,
                admin: h.admin,
                static_peer: h.static_peer,
                removed: h.removed,
                created_unix: h.created_unix,
                last_seen_unix: h.last_seen_unix,
                observed: h.observed,
            });
        }
        Ok(out)
    }

    /// Whether `caller` may make admin calls: the coordinator itself, or a joined, live host
    /// flagged admin.
    pub fn is_admin(&self, caller: IpAddr) -> bool {
        let caller = caller.to_canonical();
        if caller == self.settings.own_address {
            return true;
        }
        let Ok(guard) = self.lock() else {
            return false;
        };
        matches!(
            live_host_by_address(&guard.conn, caller),
            Ok(Some(h)) if h.admin && !h.pending
        )
    }

    /// The registry as the netmap computation sees it: live hosts only (removed hosts, and
    /// pending hosts of revoked or expired invitations, are left out entirely).
    pub fn snapshot(&self) -> Result<RegistrySnapshot, CoordError> {
        Ok((*self.snapshot_arc()?).clone())
    }

    /// The current snapshot, shared (built once per version).
    pub fn snapshot_arc(&self) -> Result<Arc<RegistrySnapshot>, CoordError> {
        let mut guard = self.lock()?;
        if let Some(s) = &guard.snapshot {
            return Ok(s.clone());
        }
        let snap = Arc::new(build_snapshot(&guard.conn, &self.settings)?);
        guard.snapshot = Some(snap.clone());
        Ok(snap)
    }

    /// The netmap of the live host at `caller`, if there is one.
    pub fn netmap_for_address(&self, caller: IpAddr) -> Result<Option<Netmap>, CoordError> {
        let caller = caller.to_canonical();
        let snap = self.snapshot_arc()?;
        let Some(host) = snap
            .hosts
            .iter()
            .find(|h| h.address == caller && !h.removed)
        else {
            return Ok(None);
        };
        Ok(compute_netmap(&snap, &host.name))
    }

    /// The JSON of the netmap of the live host at `caller` (what the API sends), and its
    /// version. Serialised peers are shared between hosts within a version.
    pub fn netmap_json_for_address(
        &self,
        caller: IpAddr,
    ) -> Result<Option<(u64, Vec<u8>)>, CoordError> {
        let Some(nm) = self.netmap_for_address(caller)? else {
            return Ok(None);
        };
        let version = nm.version;
        Ok(Some((version, self.peer_json.render(nm)?)))
    }

    /// The netmap of the live host `name`, if there is one.
    pub fn netmap_for_name(&self, name: &str) -> Result<Option<Netmap>, CoordError> {
        let snap = self.snapshot_arc()?;
        Ok(compute_netmap(&snap, name))
    }

    /// The current netmap version.
    pub fn version(&self) -> u64 {
        *self.version_tx.borrow()
    }

    /// A receiver that sees every version bump.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }

    /// Replace the coordinator's own public key (key rotation).
    pub fn set_own_public_key(&self, key: PublicKey, now_unix: u64) -> Result<(), CoordError> {
        self.transition(|r| Ok(((), r.set_own_key(key, now_unix)?)))
    }

    /// `meshctl rotate NAME`: ask a joined daemon host (the coordinator host included) to
    /// rotate its key. The flag rides in the host's netmap (`rotate_requested`) until the
    /// host's commit clears it, so a host that is offline now rotates when it comes back.
    /// Asking again before that changes nothing.
    pub fn request_rotation(&self, name: &str, now_unix: u64) -> Result<(), CoordError> {
        self.transition(|r| Ok(((), r.request_rotation(name, now_unix)?)))
    }

    /// `meshctl static-config NAME`: the static peer's wg-quick configuration as it should be
    /// now (current keys of every host, after rotations), with its private key left as a
    /// placeholder (the coordinator never stored it).
    pub fn static_config(&self, name: &str) -> Result<String, CoordError> {
        let port = {
            let guard = self.lock()?;
            let Some(host) = live_host_by_name(&guard.conn, name)? else {
                return Err(CoordError::NoSuchHost(name.to_string()));
            };
            if !host.static_peer {
                return Err(CoordError::Conflict(format!(
                    "{name} is not a static peer: meshd on it follows its netmap by itself"
                )));
            }
            reported_endpoints(&guard.conn, host.id.0)?
                .first()
                .map(|e| e.port())
        };
        let netmap = self
            .netmap_for_name(name)?
            .ok_or_else(|| CoordError::NoSuchHost(name.to_string()))?;
        Ok(wgquick::render(
            &netmap,
            None,
            port,
            self.settings.keepalive_secs,
            &self.settings.own_name,
        ))
    }

    /// The coordinator's own rotation, first half: `next` becomes its next key, so every
    /// peer's netmap lists it and peers accept handshakes from it. Idempotent. Returns the
    /// netmap version that carries it.
    pub fn prepare_own_rotation(&self, next: PublicKey, now_unix: u64) -> Result<u64, CoordError> {
        self.transition(|r| Ok(((), r.prepare_own_rotation(next, now_unix)?)))?;
        Ok(self.version())
    }

    /// The coordinator's own rotation, second half: the prepared `next` replaces its key in
    /// every netmap, the old key is retired, and for every other host (static peers aside, which
    /// cannot follow) a key notice is stored, authenticated with the old private key
    /// `old_private` (`mesh_proto::wire::notice`): a host that misses this netmap follows the notice
    /// instead. Idempotent once committed. Returns the netmap version that carries it.
    pub fn commit_own_rotation(
        &self,
        next: PublicKey,
        old_private: &PrivateKey,
        now_unix: u64,
    ) -> Result<u64, CoordError> {
        self.transition(|r| Ok(((), r.commit_own_rotation(next, old_private, now_unix)?)))?;
        Ok(self.version())
    }

    /// Wait until every host that follows the coordinator (but `except`) has taken netmap
    /// `version`, at most `timeout` (see `acks.rs`).
    pub async fn wait_acknowledged(
        &self,
        version: u64,
        except: &[IpAddr],
        timeout: std::time::Duration,
    ) -> AckOutcome {
        self.acks.wait(version, except, timeout).await
    }

    /// Before the coordinator's own rotation: wait until the joined daemon hosts have polled
    /// once since this process started (see `Acks::wait_returned`). Returns the missing ones.
    pub async fn wait_followers_returned(&self) -> Vec<IpAddr> {
        self.acks.wait_returned(&self.joined_daemon_hosts()).await
    }

    /// Whether [`Coordinator::wait_followers_returned`] would return at once.
    pub fn followers_returned(&self) -> bool {
        self.acks.returned(&self.joined_daemon_hosts())
    }

    /// The mesh addresses of the joined daemon hosts other than the coordinator itself.
    fn joined_daemon_hosts(&self) -> Vec<IpAddr> {
        let pending = self.pending_addresses().unwrap_or_default();
        match self.snapshot_arc() {
            Ok(snap) => snap
                .hosts
                .iter()
                .filter(|h| !h.static_peer && !h.removed && h.name != self.settings.own_name)
                .map(|h| h.address)
                .filter(|a| !pending.contains(a))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    fn pending_addresses(&self) -> Result<Vec<IpAddr>, CoordError> {
        let guard = self.lock()?;
        let mut stmt = guard
            .conn
            .prepare("SELECT address FROM hosts WHERE pending = 1 AND removed = 0")?;
        let rows = stmt.query_map([], |r| parse_col::<IpAddr>(0, r.get(0)?))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The coordinator host's own meshd applied netmap `version` (it takes its netmaps
    /// in-process, not over a long-poll).
    pub fn applied_own(&self, version: u64) {
        self.acks.poll_ended(self.settings.own_address, version);
    }

    /// The MAC key kept for `host_key` proving its key toward our rotated-away key `old`.
    pub fn key_notice_auth(&self, host_key: &PublicKey, old: &PublicKey) -> Option<[u8; 32]> {
        let guard = self.lock().ok()?;
        let raw: Option<Vec<u8>> = guard
            .conn
            .query_row(
                "SELECT auth_key FROM key_notices WHERE host_key = ?1 AND old_key = ?2",
                params![host_key.0.as_slice(), old.0.as_slice()],
                |r| r.get(0),
            )
            .optional()
            .ok()
            .flatten()
            .flatten();
        raw.and_then(|b| <[u8; 32]>::try_from(b).ok())
    }

    /// Our own private key is now `key` (at start and at our rotation's switch): the API
    /// proves requests and signs answers with it (and with the one before, for a while).
    pub fn set_own_private_key(&self, key: &PrivateKey) {
        self.auth.set_own_key(key);
    }

    /// The API's refusals since start and the newest few (Unix time, what).
    pub fn api_refusals(&self) -> (u64, Vec<(u64, String)>) {
        self.auth.refusals()
    }

    /// The coordinator key notices for the host holding `host_key`, oldest first (empty for
    /// a key the registry does not know).
    pub fn key_notices_for(
        &self,
        host_key: &PublicKey,
    ) -> Result<Vec<mesh_proto::wire::notice::KeyNotice>, CoordError> {
        let guard = self.lock()?;
        let mut stmt = guard.conn.prepare(
            "SELECT old_key, new_key, tag, at_unix FROM key_notices WHERE host_key = ?1
             ORDER BY at_unix, rowid",
        )?;
        let rows = stmt.query_map([host_key.0.as_slice()], |r| {
            Ok(mesh_proto::wire::notice::KeyNotice {
                old_key: key_col(0, r.get(0)?)?,
                new_key: key_col(1, r.get(1)?)?,
                tag: r.get(2)?,
                at_unix: r.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The audit log, oldest first: (at_unix, action, subject, detail).
    pub fn audit_log(&self) -> Result<Vec<(u64, String, String, String)>, CoordError> {
        let guard = self.lock()?;
        let mut stmt = guard
            .conn
            .prepare("SELECT at_unix, action, subject, detail FROM audit ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

/// The key the registry at `database` holds for the host `name` (its current key, and the
/// prepared next key if a rotation is under way), read without changing anything: the
/// coordinator host's word at start, for key recovery (`mesh_proto::rotation::recover`).
/// `None` when the database does not exist yet.
pub fn registered_key(
    database: &std::path::Path,
    name: &str,
) -> Result<Option<(PublicKey, Option<PublicKey>)>, CoordError> {
    if !database.exists() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(
        database,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let row = conn
        .query_row(
            "SELECT public_key, next_public_key FROM hosts WHERE name = ?1 AND removed = 0",
            [name],
            |r| {
                Ok((
                    key_col(0, r.get(0)?)?,
                    r.get::<_, Option<Vec<u8>>>(1)?
                        .map(|b| key_col(1, b))
                        .transpose()?,
                ))
            },
        )
        .optional();
    match row {
        Ok(r) => Ok(r),
        // A registry from before rotations (no next_public_key column) holds no next key.
        Err(rusqlite::Error::SqliteFailure(_, Some(m))) if m.contains("no such column") => Ok(conn
            .query_row(
                "SELECT public_key FROM hosts WHERE name = ?1 AND removed = 0",
                [name],
                |r| key_col(0, r.get(0)?),
            )
            .optional()?
            .map(|k| (k, None))),
        Err(e) => Err(e.into()),
    }
}

fn build_snapshot(
    conn: &Connection,
    settings: &CoordinatorSettings,
) -> Result<RegistrySnapshot, CoordError> {
    let version = meta_get_u64(conn, META_VERSION)?.unwrap_or(0);
    let mut reported: std::collections::HashMap<i64, Vec<SocketAddr>> = Default::default();
    {
        let mut stmt = conn.prepare(
            "SELECT e.host_id, e.addr FROM endpoint_reports e JOIN hosts h ON h.id = e.host_id
             WHERE h.removed = 0 ORDER BY e.host_id, e.seq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)?, parse_col::<SocketAddr>(1, r.get(1)?)?))
        })?;
        for row in rows {
            let (id, addr) = row?;
            reported.entry(id).or_default().push(addr);
        }
    }
    let decisions = super::routes::decisions(conn)?;
    let mut stmt = conn.prepare(&format!(
        "SELECT {HOST_COLUMNS} FROM hosts WHERE removed = 0 ORDER BY name"
    ))?;
    let rows = stmt.query_map([], host_from_row)?;
    let mut hosts = Vec::new();
    for row in rows {
        let h = row?;
        // Only what an admin approved (and the host still advertises) reaches the netmaps.
        let granted = super::routes::granted_for(&decisions, h.id.0, &h.advertise);
        let ungranted: Vec<IpNet> = h
            .advertise
            .iter()
            .filter(|p| !granted.contains(p))
            .copied()
            .collect();
        hosts.push(HostRecord {
            reported: reported.remove(&h.id.0).unwrap_or_default(),
            name: h.name,
            address: h.address,
            public_key: h.public_key,
            admin: h.admin,
            static_peer: h.static_peer,
            removed: h.removed,
            observed: h.observed,
            extra_allowed_ips: granted,
            ungranted_routes: ungranted,
            key_created_unix: h.key_created_unix,
            next_public_key: h.next_public_key,
            rotate_requested: h.rotate_requested_unix.is_some(),
            pending: h.pending,
        });
    }
    resolve_near(conn, &mut hosts)?;
    Ok(RegistrySnapshot {
        mesh_cidr: settings.mesh_cidr,
        version,
        keepalive_secs: settings.keepalive_secs,
        hosts,
        coordinator: Some(settings.own_name.clone()),
    })
}

/// A static peer invited with `near` gets that host's observed address as its observed
/// address: only a same-NAT marker (the netmap never offers a static peer's observed address
/// as an endpoint). Resolved at every snapshot, so it follows the neighbour's NAT; none while
/// the neighbour is unknown, removed, or not observed yet.
fn resolve_near(conn: &Connection, hosts: &mut [HostRecord]) -> Result<(), CoordError> {
    let mut stmt = conn.prepare(
        "SELECT name, near FROM hosts WHERE removed = 0 AND static_peer = 1 AND near IS NOT NULL",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut near: std::collections::HashMap<String, String> = Default::default();
    for row in rows {
        let (name, n) = row?;
        near.insert(name, n);
    }
    if near.is_empty() {
        return Ok(());
    }
    let observed: std::collections::HashMap<String, SocketAddr> = hosts
        .iter()
        .filter(|h| !h.static_peer)
        .filter_map(|h| h.observed.map(|o| (h.name.clone(), o)))
        .collect();
    for h in hosts.iter_mut().filter(|h| h.static_peer) {
        if let Some(n) = near.get(&h.name) {
            h.observed = observed.get(n).copied();
        }
    }
    Ok(())
}

/// Register or update the coordinator's own host row. Returns whether anything changed.
fn register_self(
    tx: &Transaction<'_>,
    settings: &CoordinatorSettings,
    model_settings: &registry::Settings,
    now_unix: u64,
) -> Result<bool, CoordError> {
    let model = load_registry(tx, model_settings)?;
    let reported = match model.live_by_name(&settings.own_name) {
        Some(h) => reported_endpoints(tx, h.id.0)?,
        None => Vec::new(),
    };
    let change = model.register_coordinator(
        settings.own_public_key,
        &settings.public_endpoints,
        &reported,
        now_unix,
    )?;
    persist(tx, &change)
}

/// The registry holds the token secret, and so may its WAL: every file owner-only from its
/// creation. SQLite creates `-wal` and `-shm` with the database file's mode, so the database
/// is created 0600 here (`O_NOFOLLOW`: a symlink is refused) before SQLite opens it, and an
/// existing one (an older meshd made it 0644) and its leftover `-wal`/`-shm` are narrowed to
/// 0600 on their descriptors.
fn prepare_database_files(db: &std::path::Path) -> Result<(), CoordError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut paths = vec![db.to_path_buf()];
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        paths.push(p.into());
    }
    for (i, path) in paths.iter().enumerate() {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(i == 0)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path);
        let f = match f {
            Ok(f) => f,
            Err(e) if i > 0 && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(CoordError::io(
                    format!(
                        "refusing to open the registry file {}: it is a symbolic link",
                        path.display()
                    ),
                    e,
                ))
            }
            Err(e) => {
                return Err(CoordError::io(
                    format!("opening the registry file {}", path.display()),
                    e,
                ))
            }
        };
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| CoordError::io(format!("restricting {}", path.display()), e))?;
    }
    Ok(())
}

// The registry access `super::routes` (route approvals) builds on.

pub(super) fn live_host_row(tx: &Connection, name: &str) -> Result<Option<Host>, CoordError> {
    live_host_by_name(tx, name)
}

/// Every host row, removed ones included.
pub(super) fn host_rows(conn: &Connection) -> Result<Vec<Host>, CoordError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY id"))?;
    let rows = stmt.query_map([], host_from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

pub(super) fn audit_row(
    tx: &Connection,
    now_unix: u64,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<(), CoordError> {
    audit(tx, now_unix, action, subject, detail)
}

#[cfg(test)]
mod file_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn the_audit_table_keeps_the_newest_rows_only() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrate(&mut conn).unwrap();
        for i in 0..250u64 {
            let tx = conn.transaction().unwrap();
            audit_bounded(&tx, 100, i, "endpoints", &format!("h{i}"), "").unwrap();
            tx.commit().unwrap();
        }
        let (n, min, max): (i64, i64, i64) = conn
            .query_row(
                "SELECT COUNT(*), MIN(at_unix), MAX(at_unix) FROM audit",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((n, min, max), (100, 150, 249));
    }

    #[test]
    fn the_database_and_its_wal_and_shm_are_0600_from_creation() {
        // A umask that would leave them world-readable; restored afterwards.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state/registry.sqlite");
        crate::disk::create_dir_all(&dir.path().join("state"), 0o700).unwrap();
        prepare_database_files(&db).unwrap();
        let conn = Connection::open(&db).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        nix::sys::stat::umask(old);
        for suffix in ["", "-wal", "-shm"] {
            let p = format!("{}{suffix}", db.display());
            let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{p}");
        }
        assert_eq!(
            std::fs::metadata(dir.path().join("state")).unwrap().mode() & 0o777,
            0o700
        );
        drop(conn);
        // An older database left 0644 with its WAL: narrowed on the next open.
        for suffix in ["", "-wal"] {
            let p = format!("{}{suffix}", db.display());
            std::fs::write(&p, b"").ok();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .unwrap();
        }
        prepare_database_files(&db).unwrap();
        for suffix in ["", "-wal"] {
            let p = format!("{}{suffix}", db.display());
            assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600, "{p}");
        }
        // A planted symlink is refused.
        let link = dir.path().join("link.sqlite");
        std::os::unix::fs::symlink(dir.path().join("victim"), &link).unwrap();
        let e = prepare_database_files(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!dir.path().join("victim").exists());
    }
}
