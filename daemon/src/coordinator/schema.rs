//! The registry's SQLite schema and its versioned migrations. Migration N (1-based) is
//! `MIGRATIONS[N - 1]`; `schema_version` holds the highest applied one. Never edit a released
//! migration: append a new one.

use rusqlite::{Connection, OptionalExtension};

use super::CoordError;

/// The migrations, in order.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the first registry.
    "CREATE TABLE meta (
        key TEXT PRIMARY KEY NOT NULL,
        value BLOB NOT NULL
    );
    CREATE TABLE hosts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        address TEXT NOT NULL UNIQUE,
        public_key BLOB NOT NULL,
        admin INTEGER NOT NULL DEFAULT 0,
        static_peer INTEGER NOT NULL DEFAULT 0,
        pending INTEGER NOT NULL DEFAULT 0,
        removed INTEGER NOT NULL DEFAULT 0,
        created_unix INTEGER NOT NULL,
        last_seen_unix INTEGER,
        key_created_unix INTEGER NOT NULL,
        observed TEXT,
        invite_id TEXT
    );
    CREATE INDEX hosts_name ON hosts(name);
    CREATE TABLE invitations (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL,
        address TEXT NOT NULL,
        host_id INTEGER NOT NULL REFERENCES hosts(id),
        admin INTEGER NOT NULL DEFAULT 0,
        created_unix INTEGER NOT NULL,
        expires_unix INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'used', 'revoked', 'expired')),
        closed_unix INTEGER
    );
    CREATE TABLE endpoint_reports (
        host_id INTEGER NOT NULL REFERENCES hosts(id),
        seq INTEGER NOT NULL,
        addr TEXT NOT NULL,
        PRIMARY KEY (host_id, addr)
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_unix INTEGER NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        detail TEXT NOT NULL
    );",
    // 2: a static peer may name a host behind the same NAT (`meshctl invite --near`).
    "ALTER TABLE hosts ADD COLUMN near TEXT;",
    // 3: the subnets a host routes for the mesh (`routes.advertise`), comma-separated CIDRs;
    // they become its extra allowed IPs in the other hosts' netmaps.
    "ALTER TABLE hosts ADD COLUMN advertise TEXT NOT NULL DEFAULT '';",
    // 4: the key a host is rotating to (`/v1/rotate/prepare`), until it commits; the keys
    // rotations retired, refused forever.
    "ALTER TABLE hosts ADD COLUMN next_public_key BLOB;
     CREATE TABLE retired_keys (
        public_key BLOB PRIMARY KEY NOT NULL,
        host TEXT NOT NULL,
        retired_unix INTEGER NOT NULL
     );",
    // 5: an admin's request that a host rotate (`meshctl rotate NAME`), until its commit; the
    // coordinator's own rotations as notices per host, so a host that missed one can follow
    // it without the tunnel (`mesh_proto::wire::notice`).
    "ALTER TABLE hosts ADD COLUMN rotate_requested_unix INTEGER;
     CREATE TABLE key_notices (
        host_key BLOB NOT NULL,
        old_key BLOB NOT NULL,
        new_key BLOB NOT NULL,
        tag TEXT NOT NULL,
        at_unix INTEGER NOT NULL,
        PRIMARY KEY (host_key, old_key)
     );",
    // 6: with each key notice, the MAC key the host proves its key with when it asks for its
    // notices (`mesh_proto::wire::auth`; the old coordinator key it signs toward is gone). Notices
    // written before have none: such a host needs a new token.
    "ALTER TABLE key_notices ADD COLUMN auth_key BLOB;",
    // 7: routes are granted, not taken: an admin's decision on each advertised prefix of a
    // host (`meshctl routes approve|revoke`). A prefix without a row is pending; so are the
    // prefixes advertised before this migration (they leave the netmaps until approved).
    "CREATE TABLE route_decisions (
        host_id INTEGER NOT NULL REFERENCES hosts(id),
        prefix TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('approved', 'revoked')),
        decided_unix INTEGER NOT NULL,
        PRIMARY KEY (host_id, prefix)
     );",
];

/// Bring the database up to the newest schema. Refuses a database written by a newer meshd.
pub(crate) fn migrate(conn: &mut Connection) -> Result<u32, CoordError> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);")?;
    let current: Option<u32> = conn
        .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
        .optional()?
        .flatten();
    let current = current.unwrap_or(0);
    let known = MIGRATIONS.len() as u32;
    if current > known {
        return Err(CoordError::Internal(format!(
            "the registry's schema version {current} is newer than this meshd supports ({known}); refusing to touch it"
        )));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = index as u32 + 1;
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [version],
        )?;
        tx.commit()?;
        tracing::info!(version, "registry schema migrated");
    }
    Ok(known)
}
