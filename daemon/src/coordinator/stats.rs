//! The coordinator's own figures for `/metrics`: hosts, pending invitations, long-poll
//! clients and registry size from its state, plus what the API counts as it serves (joins,
//! requests by outcome, the duration of requests other than long-polls).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use super::{CoordError, Coordinator};

/// What the API counts; shared by its handlers and [`Coordinator::stats`].
#[derive(Debug)]
pub struct ApiStats {
    joins: AtomicU64,
    requests_ok: AtomicU64,
    requests_failed: AtomicU64,
    /// Seconds per request, long-polls (`/v1/netmap`) left out: they wait by design.
    duration: Histogram,
}

impl Default for ApiStats {
    fn default() -> Self {
        ApiStats {
            joins: AtomicU64::new(0),
            requests_ok: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            // 0.5 ms .. ~8 s.
            duration: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
        }
    }
}

impl ApiStats {
    pub(super) fn joined(&self) {
        self.joins.fetch_add(1, Ordering::Relaxed);
    }

    fn served(&self, path: &str, status: u16, took: f64) {
        if status < 400 {
            self.requests_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.requests_failed.fetch_add(1, Ordering::Relaxed);
        }
        if path != "/v1/netmap" {
            self.duration.observe(took);
        }
    }
}

/// Outermost layer of the API router: counts every request (authenticated or not) by
/// outcome and times it.
pub(super) async fn record(
    State(stats): State<Arc<ApiStats>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    let started = Instant::now();
    let resp = next.run(req).await;
    stats.served(
        &path,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// The coordinator's figures at one moment.
#[derive(Debug, Clone)]
pub struct CoordinatorStats {
    /// Hosts that joined (daemon hosts and static peers), not removed.
    pub hosts: u64,
    /// Invited daemon hosts that have not joined yet.
    pub pending_invitations: u64,
    /// Long-polls parked right now (followers waiting for the next netmap).
    pub long_poll_clients: u64,
    /// The registry file with its write-ahead log, bytes.
    pub registry_bytes: u64,
    /// Successful joins since the coordinator started.
    pub joins: u64,
    /// API requests answered below 400 / 400 and above, since start.
    pub requests_ok: u64,
    pub requests_failed: u64,
    /// Duration of API requests other than long-polls (shared with the API; live).
    pub request_duration: Histogram,
}

impl Coordinator {
    /// The figures for `/metrics` (a registry snapshot, cached per version, and two `stat`s).
    pub fn stats(&self) -> Result<CoordinatorStats, CoordError> {
        let snap = self.snapshot_arc()?;
        let live = snap.hosts.iter().filter(|h| !h.removed);
        let (pending, hosts): (Vec<_>, Vec<_>) = live.partition(|h| h.pending);
        let db = &self.settings().database;
        let mut wal = db.clone().into_os_string();
        wal.push("-wal");
        let registry_bytes = [db.as_os_str(), wal.as_os_str()]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        let api = &self.api_stats;
        Ok(CoordinatorStats {
            hosts: hosts.len() as u64,
            pending_invitations: pending.len() as u64,
            long_poll_clients: self.acks.parked() as u64,
            registry_bytes,
            joins: api.joins.load(Ordering::Relaxed),
            requests_ok: api.requests_ok.load(Ordering::Relaxed),
            requests_failed: api.requests_failed.load(Ordering::Relaxed),
            request_duration: api.duration.clone(),
        })
    }
}
