//! Endpoint reports, debounced per host (`mesh_proto::debounce`): a host's report is applied at
//! once when its last one was applied a second ago or more, else kept (the latest wins) and
//! applied when the second is up. A member posting a thousand reports a second costs one
//! registry write and at most one netmap version a second.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mesh_proto::debounce::{Debouncer, Decision};
use mesh_proto::wire::api::EndpointReport;

/// At most one applied report per host per this.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

type Pending = (Option<SocketAddr>, EndpointReport);

/// The per-host gate.
pub struct ReportGate {
    start: Instant,
    inner: Mutex<Debouncer<IpAddr, Pending>>,
}

impl Default for ReportGate {
    fn default() -> Self {
        ReportGate {
            start: Instant::now(),
            inner: Mutex::new(Debouncer::new(REPORT_INTERVAL)),
        }
    }
}

/// What the API does with a report.
pub enum Gate {
    /// Apply it now.
    Apply(Option<SocketAddr>, EndpointReport),
    /// Kept; when `schedule`, the caller arranges [`ReportGate::due`] after `wait`.
    Later { wait: Duration, schedule: bool },
}

impl ReportGate {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Debouncer<IpAddr, Pending>> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn handle(
        &self,
        caller: IpAddr,
        observed: Option<SocketAddr>,
        report: EndpointReport,
    ) -> Gate {
        let now = self.now();
        let mut g = self.lock();
        // Hosts not heard from in an hour are forgotten (memory stays bounded by the hosts
        // that report).
        g.prune(now, Duration::from_secs(3600));
        match g.handle(caller, (observed, report), now) {
            Decision::Apply((o, r)) => Gate::Apply(o, r),
            Decision::Deferred { at, schedule } => Gate::Later {
                wait: at.saturating_sub(now),
                schedule,
            },
        }
    }

    /// The kept reports whose second is up.
    pub fn due(&self) -> Vec<(IpAddr, Option<SocketAddr>, EndpointReport)> {
        let now = self.now();
        self.lock()
            .poll_due(now)
            .into_iter()
            .map(|(ip, (o, r))| (ip, o, r))
            .collect()
    }
}
