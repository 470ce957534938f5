//! Routes are granted, not taken: the registry's side. A host's advertised prefixes are what
//! it last reported (`hosts.advertise`); an admin's decision on each is a row of
//! `route_decisions` (approved or revoked). A prefix without a decision is pending. Netmaps
//! carry advertised, approved prefixes only (`mesh_proto::routes::granted`); the policy itself
//! (which transitions, which overlaps) is `mesh_proto::routes::decide`.

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;
use mesh_proto::registry::Host;
use mesh_proto::routes::{decide, DecisionError, RouteDecision, RouteInfo, RouteState};
use rusqlite::{params, Connection};

use super::store::{audit_row, host_rows, live_host_row};
use super::{CoordError, Coordinator};

/// The decisions on one host's prefixes: prefix → (state, decided at).
pub(super) type HostDecisions = BTreeMap<IpNet, (RouteState, u64)>;

/// Every decision, per host id.
pub(super) fn decisions(conn: &Connection) -> Result<HashMap<i64, HostDecisions>, CoordError> {
    let mut stmt =
        conn.prepare_cached("SELECT host_id, prefix, state, decided_unix FROM route_decisions")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut out: HashMap<i64, HostDecisions> = HashMap::new();
    for row in rows {
        let (id, prefix, state, at) = row?;
        let (Ok(prefix), Ok(state)) = (prefix.parse::<IpNet>(), state.parse::<RouteState>()) else {
            return Err(CoordError::Internal(format!(
                "route_decisions holds an unreadable row for host id {id}: {prefix:?} {state:?}"
            )));
        };
        out.entry(id)
            .or_default()
            .insert(prefix, (state, at as u64));
    }
    Ok(out)
}

/// The prefixes of host `id` that go into the netmaps.
pub(super) fn granted_for(
    all: &HashMap<i64, HostDecisions>,
    id: i64,
    advertised: &[IpNet],
) -> Vec<IpNet> {
    let states: BTreeMap<IpNet, RouteState> = all
        .get(&id)
        .map(|m| m.iter().map(|(p, (s, _))| (*p, *s)).collect())
        .unwrap_or_default();
    mesh_proto::routes::granted(advertised, &states)
}

/// Log what a host's new advertisement means: its new prefixes are in no netmap until an admin
/// approves them (unless an approval from before still holds).
pub(super) fn note_advertised(name: &str, before: &[IpNet], now: &[IpNet]) {
    for p in now.iter().filter(|p| !before.contains(p)) {
        tracing::info!(host = %name, prefix = %p, "prefix advertised; it reaches no netmap unless an admin approves it (meshctl routes approve {name} {p})");
    }
    for p in before.iter().filter(|p| !now.contains(p)) {
        tracing::info!(host = %name, prefix = %p, "prefix withdrawn; it leaves the netmaps (an approval stays recorded)");
    }
}

fn decision_error(e: DecisionError) -> CoordError {
    match e {
        DecisionError::NotAdvertised { .. } | DecisionError::Unknown { .. } => {
            CoordError::NoSuchRoute(e.to_string())
        }
        DecisionError::Overlap { .. } => CoordError::Conflict(e.to_string()),
    }
}

impl Coordinator {
    /// The coordinator host's own `routes.advertise` (it reports to no API): recorded like a
    /// member's report, pending until an admin approves each prefix. Returns whether it
    /// changed.
    pub fn advertise_own(&self, advertise: &[IpNet], now_unix: u64) -> Result<bool, CoordError> {
        let mesh = self.settings().mesh_cidr;
        let mut nets: Vec<IpNet> = Vec::with_capacity(advertise.len());
        for net in advertise {
            if *net != net.trunc()
                || net.prefix_len() == 0
                || mesh_proto::routes::overlaps(net, &mesh)
            {
                return Err(CoordError::Malformed(format!(
                    "advertised {net} is not a subnet outside the mesh {mesh}"
                )));
            }
            nets.push(*net);
        }
        nets.sort();
        nets.dedup();
        let own = self.settings().own_name.clone();
        self.write(|tx| {
            let host = live_host_row(tx, &own)?.ok_or_else(|| {
                CoordError::Internal(format!("the coordinator host {own} is missing"))
            })?;
            if host.advertise == nets {
                return Ok((false, false));
            }
            let text = nets
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            tx.execute(
                "UPDATE hosts SET advertise = ?2 WHERE id = ?1",
                params![host.id.0, text],
            )?;
            note_advertised(&own, &host.advertise, &nets);
            audit_row(tx, now_unix, "advertise", &own, &format!("[{text}]"))?;
            Ok((true, true))
        })
    }

    /// Every live host's prefixes (advertised ones, pending unless decided, and decided ones
    /// it no longer advertises), sorted by host and prefix.
    pub fn routes(&self) -> Result<Vec<RouteInfo>, CoordError> {
        let guard = self.lock()?;
        let all = decisions(&guard.conn)?;
        let mut out = Vec::new();
        for h in host_rows(&guard.conn)?
            .into_iter()
            .filter(|h| !h.removed && !h.pending)
        {
            let empty = BTreeMap::new();
            let d = all.get(&h.id.0).unwrap_or(&empty);
            out.extend(mesh_proto::routes::route_list(&h.name, &h.advertise, d));
        }
        out.sort();
        Ok(out)
    }

    /// An admin approves or revokes `prefix` of host `name`. The netmap version moves when
    /// what the netmaps carry changes. Returns the prefix as it stands afterwards.
    pub fn decide_route(
        &self,
        name: &str,
        prefix: IpNet,
        decision: RouteDecision,
        now_unix: u64,
    ) -> Result<RouteInfo, CoordError> {
        if prefix != prefix.trunc() {
            return Err(CoordError::Malformed(format!(
                "{prefix} has host bits set; name the prefix as the host advertises it ({})",
                prefix.trunc()
            )));
        }
        let info = self.write(|tx| {
            let host: Host = match live_host_row(tx, name)? {
                Some(h) if !h.pending => h,
                Some(_) => {
                    return Err(CoordError::Conflict(format!(
                    "{name} has not joined yet; its routes can be decided once it advertises them"
                )))
                }
                None => return Err(CoordError::NoSuchHost(name.to_string())),
            };
            let all = decisions(tx)?;
            let live: HashMap<i64, String> = host_rows(tx)?
                .into_iter()
                .filter(|h| !h.removed)
                .map(|h| (h.id.0, h.name))
                .collect();
            let approved_elsewhere: Vec<(String, IpNet)> = all
                .iter()
                .filter(|(id, _)| **id != host.id.0)
                .filter_map(|(id, m)| live.get(id).map(|n| (n, m)))
                .flat_map(|(n, m)| {
                    m.iter()
                        .filter(|(_, (s, _))| *s == RouteState::Approved)
                        .map(move |(p, _)| (n.clone(), *p))
                })
                .collect();
            let current = all
                .get(&host.id.0)
                .and_then(|m| m.get(&prefix))
                .map(|(s, _)| *s);
            let advertised = host.advertise.contains(&prefix);
            let next = decide(
                name,
                prefix,
                current,
                advertised,
                &approved_elsewhere,
                decision,
            )
            .map_err(decision_error)?;
            let Some(state) = next else {
                let at = all
                    .get(&host.id.0)
                    .and_then(|m| m.get(&prefix))
                    .map(|d| d.1);
                return Ok((
                    RouteInfo {
                        host: name.to_string(),
                        prefix,
                        state: mesh_proto::routes::state_of(current),
                        advertised,
                        decided_unix: at,
                    },
                    false,
                ));
            };
            tx.execute(
                "INSERT INTO route_decisions (host_id, prefix, state, decided_unix)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(host_id, prefix) DO UPDATE SET state = excluded.state,
                    decided_unix = excluded.decided_unix",
                params![
                    host.id.0,
                    prefix.to_string(),
                    state.as_str(),
                    now_unix as i64
                ],
            )?;
            audit_row(
                tx,
                now_unix,
                &format!("route {decision}"),
                name,
                &format!(
                    "{prefix}: {} -> {state}",
                    mesh_proto::routes::state_of(current)
                ),
            )?;
            // The netmaps change only when an advertised prefix enters or leaves them.
            let was = current == Some(RouteState::Approved);
            let is = state == RouteState::Approved;
            Ok((
                RouteInfo {
                    host: name.to_string(),
                    prefix,
                    state,
                    advertised,
                    decided_unix: Some(now_unix),
                },
                advertised && was != is,
            ))
        })?;
        tracing::info!(host = %name, prefix = %prefix, decision = %decision, state = %info.state, "route decided");
        Ok(info)
    }
}
