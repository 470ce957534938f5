//! `/metrics` on the mesh address (port 51873 by default; 9586 is the WireGuard exporter's,
//! which operators may run beside meshd), in the Prometheus text format.
//!
//! Two kinds of per-peer series. `meshd_peer_*` name the peer by its mesh host name (`peer`),
//! so they survive a key rotation; the key is a label of the info series `meshd_peer_info`
//! only. The WireGuard exporter's names and labels (`wireguard_sent_bytes_total`,
//! `wireguard_received_bytes_total`, `wireguard_latest_handshake_seconds`; `interface`,
//! `public_key`, `allowed_ips`, `friendly_name`) are kept too, so dashboards made for it work;
//! those series change with every rotation. The agent hands in what it observed after each
//! pass ([`Metrics::observe_device`], [`Metrics::observe_pass`], ...); a scrape reads the
//! latest snapshot and never touches the device.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use mesh_proto::netmap::{EndpointKind, Netmap};
use mesh_proto::{ObservedDevice, PublicKey};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// How traffic to a peer travels, as far as meshd knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerPath {
    /// Directly over the LAN (an address the peer reported, behind the same NAT).
    Lan,
    /// Directly over the internet (a public or NAT-observed address).
    Public,
    /// Through a relay.
    Relay,
    /// No endpoint yet, or one meshd did not offer (learned by roaming).
    Unknown,
}

impl PeerPath {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerPath::Lan => "lan",
            PeerPath::Public => "public",
            PeerPath::Relay => "relay",
            PeerPath::Unknown => "unknown",
        }
    }

    /// The path of the endpoint WireGuard uses now, from the kind of the netmap candidate it
    /// matches; an endpoint no candidate offered is judged by its address (private: LAN).
    pub fn of_endpoint(
        endpoint: Option<SocketAddr>,
        candidates: &[mesh_proto::netmap::EndpointCandidate],
    ) -> PeerPath {
        let Some(ep) = endpoint else {
            return PeerPath::Unknown;
        };
        match candidates.iter().find(|c| c.addr == ep).map(|c| c.kind) {
            Some(EndpointKind::Lan) => PeerPath::Lan,
            Some(EndpointKind::Public | EndpointKind::Observed) => PeerPath::Public,
            None if is_private(ep.ip()) => PeerPath::Lan,
            None => PeerPath::Public,
        }
    }
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_private() || a.is_link_local() || a.is_loopback(),
        IpAddr::V6(a) => {
            (a.segments()[0] & 0xfe00) == 0xfc00 || (a.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// What the metrics know about a peer beyond the device's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLabels {
    pub friendly_name: String,
    pub path: PeerPath,
}

/// Names and paths for the device's peers from the netmap (member hosts).
pub fn labels_from_netmap(
    netmap: &Netmap,
    device: &ObservedDevice,
) -> BTreeMap<PublicKey, PeerLabels> {
    netmap
        .peers
        .iter()
        .map(|p| {
            let endpoint = device.peers.get(&p.public_key).and_then(|o| o.endpoint);
            (
                p.public_key,
                PeerLabels {
                    friendly_name: p.name.clone(),
                    path: PeerPath::of_endpoint(endpoint, &p.endpoints),
                },
            )
        })
        .collect()
}

/// Names for the device's peers from static `[[peer]]` entries (path by address only).
pub fn labels_from_names<'a>(
    names: impl IntoIterator<Item = (PublicKey, &'a str)>,
    device: &ObservedDevice,
) -> BTreeMap<PublicKey, PeerLabels> {
    names
        .into_iter()
        .map(|(key, name)| {
            let endpoint = device.peers.get(&key).and_then(|o| o.endpoint);
            (
                key,
                PeerLabels {
                    friendly_name: name.to_owned(),
                    path: PeerPath::of_endpoint(endpoint, &[]),
                },
            )
        })
        .collect()
}

#[derive(Debug, Clone)]
struct PeerSample {
    public_key: String,
    allowed_ips: String,
    friendly_name: String,
    path: PeerPath,
    sent: u64,
    received: u64,
    /// UNIX time of the latest handshake, 0 = never (the exporter's convention).
    latest_handshake: i64,
}

#[derive(Debug, Default)]
struct Snapshot {
    interface: String,
    peers: Vec<PeerSample>,
    key_created_unix: Option<u64>,
    /// `daemon.rotate_every_days` in seconds (`None`: scheduled rotation off).
    key_rotation_period: Option<u64>,
    /// Each integration's name, whether its last apply succeeded, and its failed applies.
    integrations: Vec<(String, bool, u64)>,
    /// On the coordinator host: its figures.
    coordinator: Option<crate::coordinator::CoordinatorStats>,
}

/// A handshake this recent (WireGuard's REJECT_AFTER_TIME: a session key lives at most this
/// long) counts in `meshd_peers_handshake_recent`.
pub const HANDSHAKE_RECENT: Duration = Duration::from_secs(180);

/// Encodes the per-peer series from the latest snapshot at scrape time.
#[derive(Debug)]
struct DeviceCollector {
    snapshot: Arc<RwLock<Snapshot>>,
}

type Labels = Vec<(&'static str, String)>;

/// One counter family (`name` without `_total`), a sample per label set.
fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One gauge family, a sample per label set.
fn gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl DeviceCollector {
    fn peer_labels(interface: &str, p: &PeerSample) -> Labels {
        vec![
            ("interface", interface.to_owned()),
            ("public_key", p.public_key.clone()),
            ("allowed_ips", p.allowed_ips.clone()),
            ("friendly_name", p.friendly_name.clone()),
        ]
    }
}

impl Collector for DeviceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = match self.snapshot.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let iface = snap.interface.as_str();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let recent = snap
            .peers
            .iter()
            .filter(|p| {
                p.latest_handshake > 0
                    && now.saturating_sub(u64::try_from(p.latest_handshake).unwrap_or(0))
                        <= HANDSHAKE_RECENT.as_secs()
            })
            .count();
        for (name, help, value) in [
            ("meshd_peers", "Peers on the mesh interface", snap.peers.len()),
            (
                "meshd_peers_handshake_recent",
                "Peers with a handshake in the last 180 s (idle peers without keepalive rekey only when traffic flows)",
                recent,
            ),
        ] {
            let family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(family)?;
        }
        if !snap.peers.is_empty() {
            let by_name = |p: &PeerSample| -> Labels {
                vec![
                    ("interface", iface.to_owned()),
                    ("peer", p.friendly_name.clone()),
                ]
            };
            let peers = &snap.peers;
            counters(
                &mut encoder,
                "meshd_peer_sent_bytes",
                "Bytes sent to the peer (by peer name; survives key rotation)",
                peers.iter().map(|p| (by_name(p), p.sent)),
            )?;
            counters(
                &mut encoder,
                "meshd_peer_received_bytes",
                "Bytes received from the peer (by peer name; survives key rotation)",
                peers.iter().map(|p| (by_name(p), p.received)),
            )?;
            gauges(
                &mut encoder,
                "meshd_peer_latest_handshake_seconds",
                "UNIX timestamp of the latest handshake with the peer (0: never)",
                peers.iter().map(|p| (by_name(p), p.latest_handshake)),
            )?;
            gauges(
                &mut encoder,
                "meshd_peer_info",
                "The peer's current public key and allowed IPs (always 1)",
                peers.iter().map(|p| {
                    let mut labels = by_name(p);
                    labels.push(("public_key", p.public_key.clone()));
                    labels.push(("allowed_ips", p.allowed_ips.clone()));
                    (labels, 1)
                }),
            )?;
            gauges(
                &mut encoder,
                "meshd_peer_path",
                "How traffic to the peer travels (1 for the current path: lan, public, relay, unknown)",
                peers.iter().map(|p| {
                    let mut labels = by_name(p);
                    labels.push(("path", p.path.as_str().to_owned()));
                    (labels, 1)
                }),
            )?;
            // The WireGuard exporter's names and labels.
            counters(
                &mut encoder,
                "wireguard_sent_bytes",
                "Bytes sent to the peer",
                peers.iter().map(|p| (Self::peer_labels(iface, p), p.sent)),
            )?;
            counters(
                &mut encoder,
                "wireguard_received_bytes",
                "Bytes received from the peer",
                peers
                    .iter()
                    .map(|p| (Self::peer_labels(iface, p), p.received)),
            )?;
            gauges(
                &mut encoder,
                "wireguard_latest_handshake_seconds",
                "UNIX timestamp of the latest handshake with the peer (0: never)",
                peers
                    .iter()
                    .map(|p| (Self::peer_labels(iface, p), p.latest_handshake)),
            )?;
        }
        if !snap.integrations.is_empty() {
            let by_name = |name: &String| -> Labels { vec![("integration", name.clone())] };
            gauges(
                &mut encoder,
                "meshd_integration_ok",
                "1 when the integration's last render, write, check and reload succeeded",
                snap.integrations
                    .iter()
                    .map(|(name, ok, _)| (by_name(name), i64::from(*ok))),
            )?;
            counters(
                &mut encoder,
                "meshd_integration_failures",
                "Applies of the integration that failed (render, write, check or reload)",
                snap.integrations
                    .iter()
                    .map(|(name, _, failures)| (by_name(name), *failures)),
            )?;
        }
        if let Some(c) = &snap.coordinator {
            let gauges: [(&str, &str, u64); 4] = [
                (
                    "meshd_coordinator_hosts",
                    "Hosts in the registry that joined (daemon hosts and static peers)",
                    c.hosts,
                ),
                (
                    "meshd_coordinator_pending_invitations",
                    "Invited hosts that have not joined yet",
                    c.pending_invitations,
                ),
                (
                    "meshd_coordinator_long_poll_clients",
                    "Followers whose long-poll for the next netmap is parked now",
                    c.long_poll_clients,
                ),
                (
                    "meshd_coordinator_registry_bytes",
                    "Size of the registry (SQLite file and its write-ahead log)",
                    c.registry_bytes,
                ),
            ];
            for (name, help, value) in gauges {
                let family = encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    prometheus_client::metrics::MetricType::Gauge,
                )?;
                ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(family)?;
            }
            let family = encoder.encode_descriptor(
                "meshd_coordinator_joins",
                "Hosts that joined through this coordinator since it started",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            ConstCounter::new(c.joins).encode(family)?;
            counters(
                &mut encoder,
                "meshd_coordinator_api_requests",
                "API requests answered since start, by outcome (ok: status below 400)",
                [("ok", c.requests_ok), ("error", c.requests_failed)]
                    .into_iter()
                    .map(|(outcome, n)| (vec![("outcome", outcome.to_owned())], n)),
            )?;
            let family = encoder.encode_descriptor(
                "meshd_coordinator_api_request_duration_seconds",
                "Duration of API requests, long-polls for the netmap left out",
                None,
                prometheus_client::metrics::MetricType::Histogram,
            )?;
            c.request_duration.encode(family)?;
        }
        if let Some(created) = snap.key_created_unix {
            let age = i64::try_from(now.saturating_sub(created)).unwrap_or(i64::MAX);
            let family = encoder.encode_descriptor(
                "meshd_key_age_seconds",
                "Age of this host's WireGuard key",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            ConstGauge::new(age).encode(family)?;
        }
        let family = encoder.encode_descriptor(
            "meshd_key_rotation_period_seconds",
            "How old this host's key may get before meshd rotates it (0: scheduled rotation off)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(snap.key_rotation_period.unwrap_or(0)).unwrap_or(i64::MAX))
            .encode(family)?;
        Ok(())
    }
}

/// The registry and everything the agent updates. Share it as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    snapshot: Arc<RwLock<Snapshot>>,
    netmap_version: Gauge,
    coordinator_reachable: Gauge,
    reconcile_duration: Histogram,
    reconcile_errors: Counter,
    last_success: Gauge,
    rotations_done: Counter,
    rotations_failed: Counter,
    joins_failed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let snapshot = Arc::new(RwLock::new(Snapshot::default()));
        let netmap_version = Gauge::default();
        let coordinator_reachable = Gauge::default();
        // 1 ms .. ~16 s.
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let reconcile_errors = Counter::default();
        let last_success = Gauge::default();
        let (rotations_done, rotations_failed, joins_failed) =
            (Counter::default(), Counter::default(), Counter::default());
        let mut registry = Registry::default();
        registry.register(
            "meshd_build",
            "meshd's version (always 1)",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(DeviceCollector {
            snapshot: snapshot.clone(),
        }));
        registry.register(
            "meshd_netmap_version",
            "Version of the netmap this host applies (0: none, static configuration)",
            netmap_version.clone(),
        );
        registry.register(
            "meshd_coordinator_reachable",
            "1 when the last exchange with the coordinator succeeded",
            coordinator_reachable.clone(),
        );
        registry.register(
            "meshd_reconcile_duration_seconds",
            "Duration of reconcile passes",
            reconcile_duration.clone(),
        );
        registry.register(
            "meshd_reconcile_errors",
            "Reconcile passes that ended with an error",
            reconcile_errors.clone(),
        );
        registry.register(
            "meshd_reconcile_last_success_timestamp_seconds",
            "UNIX time of the last reconcile pass that succeeded (0: none since start)",
            last_success.clone(),
        );
        registry.register(
            "meshd_key_rotations",
            "Key rotations of this host that committed the new key",
            rotations_done.clone(),
        );
        registry.register(
            "meshd_key_rotation_failures",
            "Key rotations of this host that failed (each is retried at the next check)",
            rotations_failed.clone(),
        );
        registry.register(
            "meshd_join_failures",
            "Joins that failed (meshctl join or the join token file)",
            joins_failed.clone(),
        );
        Metrics {
            registry,
            snapshot,
            netmap_version,
            coordinator_reachable,
            reconcile_duration,
            reconcile_errors,
            last_success,
            rotations_done,
            rotations_failed,
            joins_failed,
        }
    }

    /// After each loop turn: the member runtime's counts since start (counters only grow).
    pub fn set_member_counts(&self, counts: crate::member::MemberCounts) {
        for (counter, total) in [
            (&self.rotations_done, counts.rotations_done),
            (&self.rotations_failed, counts.rotations_failed),
            (&self.joins_failed, counts.joins_failed),
        ] {
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        }
    }

    /// After each pass: the device as observed, with names and paths (see
    /// [`labels_from_netmap`], [`labels_from_names`]; peers without labels get their short key).
    pub fn observe_device(
        &self,
        interface: &str,
        device: &ObservedDevice,
        labels: &BTreeMap<PublicKey, PeerLabels>,
    ) {
        let peers = device
            .peers
            .values()
            .map(|p| {
                let l = labels.get(&p.public_key);
                PeerSample {
                    public_key: p.public_key.to_base64(),
                    allowed_ips: p
                        .allowed_ips
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    friendly_name: l
                        .map_or_else(|| p.public_key.short(), |l| l.friendly_name.clone()),
                    path: l.map_or(PeerPath::Unknown, |l| l.path),
                    sent: p.tx_bytes,
                    received: p.rx_bytes,
                    latest_handshake: p
                        .last_handshake
                        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
                }
            })
            .collect();
        let mut snap = match self.snapshot.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        snap.interface = interface.to_owned();
        snap.peers = peers;
    }

    /// After each pass: how long it took, whether it failed, and the time (UNIX seconds).
    pub fn observe_pass(&self, duration: Duration, failed: bool, now_unix: u64) {
        self.reconcile_duration.observe(duration.as_secs_f64());
        if failed {
            self.reconcile_errors.inc();
        } else {
            self.last_success
                .set(i64::try_from(now_unix).unwrap_or(i64::MAX));
        }
    }

    /// After each loop turn on the coordinator host: its figures (`None` elsewhere).
    pub fn set_coordinator(&self, stats: Option<crate::coordinator::CoordinatorStats>) {
        let mut snap = match self.snapshot.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        snap.coordinator = stats;
    }

    /// After each pass: the integrations' statuses (name, last apply succeeded, failed
    /// applies since start).
    pub fn set_integrations(&self, integrations: Vec<(String, bool, u64)>) {
        let mut snap = match self.snapshot.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        snap.integrations = integrations;
    }

    /// When a netmap is applied (`None`: static configuration, 0).
    pub fn set_netmap_version(&self, version: Option<u64>) {
        self.netmap_version
            .set(i64::try_from(version.unwrap_or(0)).unwrap_or(i64::MAX));
    }

    /// After each exchange with the coordinator.
    pub fn set_coordinator_reachable(&self, reachable: bool) {
        self.coordinator_reachable.set(i64::from(reachable));
    }

    /// When this host's key was created (UNIX seconds; `key_created_unix` of its netmap
    /// entry, or the key file's mtime); `meshd_key_age_seconds` is computed at scrape time.
    /// With it the rotation period (`daemon.rotate_every_days`; `None`: off).
    pub fn set_key_created(&self, unix: Option<u64>, rotation_period: Option<Duration>) {
        let mut snap = match self.snapshot.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        snap.key_created_unix = unix;
        snap.key_rotation_period = rotation_period.map(|d| d.as_secs());
    }

    /// The exposition text (Prometheus text format 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        metrics.encode(),
    )
}

/// `GET /metrics`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(metrics)
}

/// Serve `/metrics` on `listener` (production: bound to the mesh address and interface,
/// port `mesh_proto::handoff::METRICS_PORT`) until `shutdown` completes, with the limits of
/// `serve::Limits::METRICS`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let local = listener.local_addr().ok();
    tracing::info!(address = ?local, "metrics listening on /metrics");
    crate::runtime::serve::serve_http(
        listener,
        router(metrics),
        crate::runtime::serve::Limits::METRICS,
        "metrics",
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use mesh_proto::netmap::{EndpointCandidate, NetmapPeer};
    use mesh_proto::ObservedPeer;
    use std::path::Path;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn device() -> (ObservedDevice, Netmap) {
        let lan: SocketAddr = "192.168.1.20:51871".parse().unwrap();
        let public: SocketAddr = "198.51.100.7:51871".parse().unwrap();
        let mut peers = BTreeMap::new();
        for (b, ep) in [(2u8, Some(lan)), (3, Some(public)), (4, None)] {
            let k = PublicKey([b; 32]);
            peers.insert(
                k,
                ObservedPeer {
                    public_key: k,
                    preshared_key: None,
                    endpoint: ep,
                    allowed_ips: vec![format!("10.99.99.{b}/32").parse().unwrap()],
                    persistent_keepalive: None,
                    last_handshake: (b != 4).then(|| Duration::from_secs(1_700_000_000)),
                    rx_bytes: 1000 * u64::from(b),
                    tx_bytes: 100 * u64::from(b),
                },
            );
        }
        let np = |b: u8, name: &str, endpoints: Vec<EndpointCandidate>| NetmapPeer {
            name: name.into(),
            address: IpAddr::from([10, 99, 99, b]),
            public_key: PublicKey([b; 32]),
            allowed_ips: vec![],
            endpoints,
            persistent_keepalive: None,
            static_peer: false,
            admin: false,
            key_created_unix: 0,
            next_public_key: None,
        };
        let netmap = Netmap {
            version: 12,
            mesh_cidr: "10.99.99.0/24".parse().unwrap(),
            name: "dock-load".into(),
            address: IpAddr::from([10, 99, 99, 1]),
            public_key: PublicKey([1; 32]),
            peers: vec![
                np(
                    2,
                    "dock-prod",
                    vec![EndpointCandidate {
                        addr: lan,
                        kind: EndpointKind::Lan,
                    }],
                ),
                np(
                    3,
                    "dock-edge",
                    vec![EndpointCandidate {
                        addr: public,
                        kind: EndpointKind::Observed,
                    }],
                ),
                np(4, "dock-mirror", vec![]),
            ],
            rotate_requested: false,
            ungranted_routes: Vec::new(),
        };
        (
            ObservedDevice {
                public_key: Some(PublicKey([1; 32])),
                listen_port: 51871,
                fwmark: None,
                peers,
            },
            netmap,
        )
    }

    fn filled() -> Arc<Metrics> {
        let m = Arc::new(Metrics::new());
        let (dev, netmap) = device();
        m.observe_device("wgmesh0", &dev, &labels_from_netmap(&netmap, &dev));
        m.observe_pass(Duration::from_millis(12), false, 1_700_000_100);
        m.observe_pass(Duration::from_millis(40), true, 1_700_000_200);
        m.set_integrations(vec![("hosts".into(), true, 0), ("k3s".into(), false, 3)]);
        m.set_member_counts(crate::member::MemberCounts {
            rotations_done: 2,
            rotations_failed: 1,
            joins_failed: 0,
        });
        let request_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 15));
        request_duration.observe(0.002);
        m.set_coordinator(Some(crate::coordinator::CoordinatorStats {
            hosts: 5,
            pending_invitations: 1,
            long_poll_clients: 4,
            registry_bytes: 65536,
            joins: 4,
            requests_ok: 40,
            requests_failed: 2,
            request_duration,
        }));
        m.set_member_counts(crate::member::MemberCounts {
            rotations_done: 3,
            rotations_failed: 1,
            joins_failed: 0,
        });
        m.set_netmap_version(Some(netmap.version));
        m.set_coordinator_reachable(true);
        m.set_key_created(Some(1_700_000_000), Some(Duration::from_secs(30 * 86_400)));
        m
    }

    /// The names of the series in an exposition (`name{...} value`).
    pub(crate) fn series_names(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_owned())
            .collect()
    }

    #[test]
    fn exposition_has_the_established_names_and_ours() {
        let text = filled().encode();
        let names = series_names(&text);
        for n in [
            "wireguard_sent_bytes_total",
            "wireguard_received_bytes_total",
            "wireguard_latest_handshake_seconds",
            "meshd_peer_path",
            "meshd_key_age_seconds",
            "meshd_netmap_version",
            "meshd_coordinator_reachable",
            "meshd_reconcile_duration_seconds_bucket",
            "meshd_reconcile_duration_seconds_count",
            "meshd_reconcile_errors_total",
            "meshd_reconcile_last_success_timestamp_seconds",
            "meshd_build_info",
            "meshd_peers",
            "meshd_peers_handshake_recent",
            "meshd_peer_sent_bytes_total",
            "meshd_peer_received_bytes_total",
            "meshd_peer_latest_handshake_seconds",
            "meshd_peer_info",
            "meshd_integration_ok",
            "meshd_key_rotation_period_seconds",
        ] {
            assert!(names.contains(n), "{n} missing:\n{text}");
        }
        let k2 = PublicKey([2; 32]).to_base64();
        assert!(
            text.contains(&format!(
                "wireguard_sent_bytes_total{{interface=\"wgmesh0\",public_key=\"{k2}\",allowed_ips=\"10.99.99.2/32\",friendly_name=\"dock-prod\"}} 200\n"
            )),
            "{text}"
        );
        for line in [
            "meshd_peer_path{interface=\"wgmesh0\",peer=\"dock-prod\",path=\"lan\"} 1\n",
            "meshd_peer_path{interface=\"wgmesh0\",peer=\"dock-edge\",path=\"public\"} 1\n",
            "meshd_peer_path{interface=\"wgmesh0\",peer=\"dock-mirror\",path=\"unknown\"} 1\n",
            // By name, without the key: these survive a rotation.
            "meshd_peer_sent_bytes_total{interface=\"wgmesh0\",peer=\"dock-prod\"} 200\n",
            "meshd_peer_received_bytes_total{interface=\"wgmesh0\",peer=\"dock-edge\"} 3000\n",
            "meshd_peer_latest_handshake_seconds{interface=\"wgmesh0\",peer=\"dock-mirror\"} 0\n",
            "meshd_peers 3\n",
            // The fixture's handshakes are from 2023.
            "meshd_peers_handshake_recent 0\n",
            "meshd_reconcile_last_success_timestamp_seconds 1700000100\n",
            "meshd_integration_ok{integration=\"hosts\"} 1\n",
            "meshd_integration_ok{integration=\"k3s\"} 0\n",
            "meshd_integration_failures_total{integration=\"k3s\"} 3\n",
            "meshd_integration_failures_total{integration=\"hosts\"} 0\n",
            "meshd_key_rotation_period_seconds 2592000\n",
            "meshd_key_rotations_total 3\n",
            "meshd_key_rotation_failures_total 1\n",
            "meshd_join_failures_total 0\n",
            "meshd_coordinator_hosts 5\n",
            "meshd_coordinator_pending_invitations 1\n",
            "meshd_coordinator_long_poll_clients 4\n",
            "meshd_coordinator_registry_bytes 65536\n",
            "meshd_coordinator_joins_total 4\n",
            "meshd_coordinator_api_requests_total{outcome=\"ok\"} 40\n",
            "meshd_coordinator_api_requests_total{outcome=\"error\"} 2\n",
            "meshd_coordinator_api_request_duration_seconds_count 1\n",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        assert!(
            text.contains(&format!(
                "meshd_peer_info{{interface=\"wgmesh0\",peer=\"dock-prod\",public_key=\"{k2}\",allowed_ips=\"10.99.99.2/32\"}} 1\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "meshd_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        for line in text.lines().filter(|l| l.starts_with("meshd_peer_")) {
            if !line.starts_with("meshd_peer_info") {
                assert!(!line.contains("public_key"), "a key label on {line}");
            }
        }
        assert!(
            text.contains("friendly_name=\"dock-mirror\"} 0\n"),
            "never: 0\n{text}"
        );
        assert!(text.contains("meshd_netmap_version 12\n"), "{text}");
        assert!(text.contains("meshd_reconcile_errors_total 1\n"), "{text}");
        assert!(
            text.contains("meshd_reconcile_duration_seconds_count 2\n"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF"),
            "Prometheus text format, not OpenMetrics"
        );
    }

    #[test]
    fn peer_path_from_the_endpoint() {
        let c = |a: &str, kind| EndpointCandidate {
            addr: a.parse().unwrap(),
            kind,
        };
        let cands = [
            c("192.168.1.2:1", EndpointKind::Lan),
            c("203.0.113.1:1", EndpointKind::Public),
        ];
        let of = |e: &str| PeerPath::of_endpoint(Some(e.parse().unwrap()), &cands);
        assert_eq!(of("192.168.1.2:1"), PeerPath::Lan);
        assert_eq!(of("203.0.113.1:1"), PeerPath::Public);
        assert_eq!(of("10.1.1.1:5"), PeerPath::Lan);
        assert_eq!(of("198.51.100.1:5"), PeerPath::Public);
        assert_eq!(PeerPath::of_endpoint(None, &cands), PeerPath::Unknown);
    }

    async fn http_get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("no HTTP answer within 5 s")
            .unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_over_http_and_promtool_accepts_them() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, filled(), async {
            let _ = stop_rx.await;
        }));
        let resp = http_get(addr, "/metrics").await;
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(body.contains("wireguard_received_bytes_total{"), "{body}");
        assert!(http_get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        let _ = stop_tx.send(());
        server.await.unwrap();

        let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(promtool) = promtool else {
            eprintln!(
                "SKIP promtool check metrics: promtool not installed (Debian package prometheus)"
            );
            return;
        };
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics refused /metrics:\n{}{}\n{body}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every metric the Grafana dashboard in `configs/` queries exists in our exposition.
    #[test]
    fn grafana_dashboard_uses_only_our_metrics() {
        let text = include_str!("../../../configs/grafana-meshd.json");
        let dash: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
        assert_eq!(dash["uid"], "meshd-mesh");
        let mut exprs: Vec<String> = Vec::new();
        for p in dash["panels"].as_array().expect("panels") {
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
            for t in targets {
                exprs.push(t["expr"].as_str().expect("expr").to_owned());
            }
        }
        for v in dash["templating"]["list"].as_array().expect("templating") {
            if let Some(d) = v["definition"].as_str() {
                exprs.push(d.to_owned());
            }
        }
        let exposed = series_names(&filled().encode());
        let used = metric_names_in(&exprs.join("\n"));
        assert!(used.len() >= 8, "{used:?}");
        for m in &used {
            assert!(
                exposed.contains(m),
                "the dashboard queries {m}, which /metrics does not have"
            );
        }
    }

    /// The `wireguard_*` and `meshd_*` names a PromQL text mentions.
    fn metric_names_in(text: &str) -> std::collections::BTreeSet<String> {
        let mut used = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(i) = rest.find(|c: char| c.is_ascii_lowercase()) {
            rest = &rest[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let word = &rest[..end];
            if word.starts_with("wireguard_") || word.starts_with("meshd_") {
                used.insert(word.to_owned());
            }
            rest = &rest[end..];
        }
        used
    }

    /// The alerting rules in `configs/` query only series /metrics has, and pass
    /// `promtool check rules` and their own `promtool test rules` (each alert fires on its
    /// failure and stays quiet on a healthy or idle mesh).
    #[test]
    fn alerting_rules_use_our_metrics_and_pass_promtool() {
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let rules = std::fs::read_to_string(configs.join("prometheus-meshd-rules.yml")).unwrap();
        let exprs: String = rules
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let exposed = series_names(&filled().encode());
        let used = metric_names_in(&exprs);
        assert!(used.len() >= 8, "{used:?}");
        for m in &used {
            assert!(
                exposed.contains(m),
                "the alerting rules query {m}, which /metrics does not have"
            );
        }
        let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(promtool) = promtool else {
            eprintln!("SKIP promtool check/test rules: promtool not installed (Debian package prometheus)");
            return;
        };
        for args in [
            ["check", "rules", "prometheus-meshd-rules.yml"],
            ["test", "rules", "prometheus-meshd-rules.test.yml"],
        ] {
            let out = std::process::Command::new(promtool)
                .args(args)
                .current_dir(&configs)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "promtool {}:\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
