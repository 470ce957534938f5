//! Coordinator load benchmark (no data plane): a coordinator on loopback with the mesh
//! 127.16.0.0/16, N hosts registered through invite + join, N simulated daemons (a child
//! process, so the coordinator's peak RSS is its own) each holding a netmap long-poll from its
//! own 127.16.x.y source address; then one change (one more invitation) and, per client, the
//! time until it holds the new version. Prints figures; asserts nothing about timing.
//!
//! `cargo run --release -p meshd --bin meshd-coord-bench -- --hosts 1000`

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use mesh_proto::wire::api::{EndpointReport, InviteRequest, JoinRequest};
use mesh_proto::PrivateKey;
use meshd::coordinator::{
    bind_api_listener, serve_api_on, Coordinator, CoordinatorSettings, ObservedFn,
};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::mpsc;

const NOFILE: u64 = 8192;

fn raise_nofile() -> anyhow::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: NOFILE,
        rlim_max: NOFILE,
    };
    // SAFETY: setrlimit with a valid pointer to an initialised struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    if rc != 0 {
        bail!(
            "raising RLIMIT_NOFILE to {NOFILE}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The i-th simulated host's private key: fixed bytes, so the client process can sign for
/// every host without being handed a thousand keys (a benchmark on loopback, nothing else).
fn host_key(i: usize) -> PrivateKey {
    let mut b = [0x42u8; 32];
    b[8..16].copy_from_slice(&(i as u64).to_le_bytes());
    PrivateKey::from_bytes(b)
}

/// The i-th simulated host's mesh address: 127.16.0.2 upward (127.16.0.1 is the coordinator).
fn host_address(i: usize) -> IpAddr {
    let n = 2 + i as u32;
    IpAddr::V4(Ipv4Addr::new(127, 16, (n >> 8) as u8, (n & 0xff) as u8))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut hosts = 1000usize;
    let mut clients_mode: Option<String> = None;
    let mut coordinator_key: Option<mesh_proto::PublicKey> = None;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--hosts" => {
                hosts = args
                    .get(i + 1)
                    .ok_or_else(|| anyhow!("--hosts needs a number"))?
                    .parse()
                    .context("--hosts")?;
                i += 2;
            }
            "--clients-of" => {
                clients_mode = Some(
                    args.get(i + 1)
                        .ok_or_else(|| anyhow!("--clients-of needs an address"))?
                        .clone(),
                );
                i += 2;
            }
            "--coordinator-key" => {
                let hex = args
                    .get(i + 1)
                    .ok_or_else(|| anyhow!("--coordinator-key needs a key in hex"))?;
                coordinator_key = Some(
                    mesh_proto::PublicKey::from_hex(hex)
                        .map_err(|e| anyhow!("--coordinator-key: {e}"))?,
                );
                i += 2;
            }
            "-h" | "--help" => {
                println!("usage: meshd-coord-bench [--hosts N]");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (usage: meshd-coord-bench [--hosts N])"),
        }
    }
    if hosts == 0 || hosts > 60_000 {
        bail!("--hosts must be between 1 and 60000");
    }
    raise_nofile()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    match clients_mode {
        Some(server) => rt.block_on(clients_main(
            server.parse().context("server address")?,
            coordinator_key.ok_or_else(|| anyhow!("--clients-of needs --coordinator-key"))?,
            hosts,
        )),
        None => rt.block_on(coordinator_main(hosts)),
    }
}

// ------------------------------------------------------------------ coordinator side

async fn coordinator_main(hosts: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("meshd-coord-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("bench directory")?;
    let result = coordinator_run(hosts, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn coordinator_run(hosts: usize, dir: &std::path::Path) -> anyhow::Result<()> {
    let own_key = PrivateKey::generate();
    let settings = CoordinatorSettings {
        mesh_cidr: "127.16.0.0/16".parse()?,
        api_port: 0,
        public_endpoints: vec!["192.0.2.1:51871".parse()?],
        reserved: vec![],
        static_assignments: Default::default(),
        keepalive_secs: 25,
        database: dir.join("registry.sqlite"),
        own_name: "coordinator".into(),
        own_address: "127.16.0.1".parse()?,
        own_public_key: own_key.public_key(),
    };
    let coord = Coordinator::open(settings, now_unix())?;
    coord.set_own_private_key(&own_key);

    let started = Instant::now();
    let reg = coord.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for i in 0..hosts {
            let inv = reg.invite(InviteRequest::host(format!("host-{i:05}")), now_unix())?;
            if inv.address != host_address(i) {
                bail!(
                    "host {i} got {} instead of {}",
                    inv.address,
                    host_address(i)
                );
            }
            let lan = IpAddr::V4(Ipv4Addr::new(
                192,
                168,
                (i / 250) as u8,
                (i % 250 + 1) as u8,
            ));
            let token = inv.token.ok_or_else(|| anyhow!("no token"))?;
            reg.join(
                inv.address,
                JoinRequest {
                    token,
                    public_key: host_key(i).public_key(),
                    listen_port: 51871,
                    addresses: vec![lan],
                },
                now_unix(),
            )?;
            let observed = SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, (i % 250 + 1) as u8)),
                40000 + i as u16,
            );
            reg.report_endpoints(
                inv.address,
                observed,
                EndpointReport {
                    listen_port: 51871,
                    addresses: vec![lan],
                    advertise: vec![],
                },
                now_unix(),
            )?;
        }
        Ok(())
    })
    .await??;
    let registration = started.elapsed();
    println!(
        "registered {hosts} hosts (invite + join + endpoint report each) in {:.2} s; version {}",
        registration.as_secs_f64(),
        coord.version()
    );

    let listener = bind_api_listener("127.16.0.1:0".parse()?, None)?;
    let api = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let observed: ObservedFn = Arc::new(|_| None);
    let server = tokio::spawn(serve_api_on(coord.clone(), listener, observed, async {
        let _ = stop_rx.await;
    }));

    let exe = std::env::current_exe().context("own executable")?;
    let mut child = tokio::process::Command::new(exe)
        .arg("--hosts")
        .arg(hosts.to_string())
        .arg("--clients-of")
        .arg(api.to_string())
        .arg("--coordinator-key")
        .arg(own_key.public_key().to_hex())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the client process")?;
    let mut child_in = child.stdin.take().ok_or_else(|| anyhow!("child stdin"))?;
    let mut lines =
        BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("child stdout"))?).lines();

    let before = coord.version();
    // Wait for READY: every client holds the current version.
    let ready_at = Instant::now();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .context("clients did not get ready within 120 s")??
            .ok_or_else(|| anyhow!("client process ended early"))?;
        if let Some(v) = line.strip_prefix("READY ") {
            println!(
                "{hosts} clients hold version {v} (current {before}) after {:.2} s",
                ready_at.elapsed().as_secs_f64()
            );
            break;
        }
        println!("clients: {line}");
    }
    // Let every long-poll park on the server.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hwm_idle = vm_hwm_kib().unwrap_or(0);

    let t0 = now_nanos();
    let c = coord.clone();
    tokio::task::spawn_blocking(move || c.invite(InviteRequest::host("one-more"), now_unix()))
        .await??;
    let target = coord.version();
    child_in
        .write_all(format!("CHANGED {t0} {target}\n").as_bytes())
        .await?;
    child_in.flush().await?;

    while let Some(line) = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .context("no result from the clients within 120 s")??
    {
        println!("{line}");
        if line.starts_with("DONE") {
            break;
        }
    }
    let hwm = vm_hwm_kib().unwrap_or(0);
    println!(
        "coordinator peak RSS (VmHWM): {:.1} MiB ({:.1} MiB before the change)",
        hwm as f64 / 1024.0,
        hwm_idle as f64 / 1024.0
    );
    drop(child_in);
    let _ = stop_tx.send(());
    cpu_breakdown(&coord)?;
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    let _ = child.wait().await;
    Ok(())
}

/// Single-threaded cost of the fan-out: computing and serialising every host's netmap once.
fn cpu_breakdown(coord: &Coordinator) -> anyhow::Result<()> {
    let snap = coord.snapshot_arc()?;
    let names: Vec<String> = snap.hosts.iter().map(|h| h.name.clone()).collect();
    let t = Instant::now();
    let maps: Vec<_> = names
        .iter()
        .filter_map(|n| mesh_proto::netmap::compute_netmap(&snap, n))
        .collect();
    let compute = t.elapsed();
    let t = Instant::now();
    let mut bytes = 0usize;
    for m in &maps {
        bytes += serde_json::to_vec(m)?.len();
    }
    let serialize = t.elapsed();
    let addresses: Vec<IpAddr> = snap.hosts.iter().map(|h| h.address).collect();
    let t = Instant::now();
    for a in &addresses {
        coord.netmap_json_for_address(*a)?;
    }
    let served = t.elapsed();
    println!(
        "one core, all {} netmaps: compute {:.0} ms, plain serde serialise {:.0} ms ({:.0} MiB of JSON); as the API does it (compute + cached peer JSON) {:.0} ms",
        maps.len(),
        compute.as_secs_f64() * 1e3,
        serialize.as_secs_f64() * 1e3,
        bytes as f64 / 1048576.0,
        served.as_secs_f64() * 1e3
    );
    Ok(())
}

// ------------------------------------------------------------------ simulated daemons

struct Event {
    client: usize,
    version: u64,
    at_nanos: u128,
    body_len: usize,
}

async fn clients_main(
    server: SocketAddr,
    coordinator: mesh_proto::PublicKey,
    hosts: usize,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    for i in 0..hosts {
        let tx = tx.clone();
        tokio::spawn(async move {
            // Stagger connection set-up a little so the accept queue is not flooded at once.
            tokio::time::sleep(Duration::from_micros((i as u64 % 100) * 200)).await;
            let mut since = 0u64;
            let auth = match mesh_proto::wire::auth::AuthKey::for_host(&host_key(i), &coordinator) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("client {i}: {e}");
                    return;
                }
            };
            loop {
                match poll_loop(i, server, &auth, &mut since, &tx).await {
                    Ok(()) => return,
                    Err(e) => {
                        eprintln!("client {i}: {e:#}; reconnecting");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
    }
    drop(tx);

    // Ready when every client holds a version.
    let mut held = vec![0u64; hosts];
    let mut ready = 0usize;
    while ready < hosts {
        let ev = rx.recv().await.ok_or_else(|| anyhow!("clients ended"))?;
        if held[ev.client] == 0 {
            ready += 1;
        }
        held[ev.client] = held[ev.client].max(ev.version);
    }
    let max_held = held.iter().copied().max().unwrap_or(0);
    println!("READY {max_held}");

    // Standard input is read on a plain thread (no io-std feature needed).
    let (line_tx, mut stdin) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut early: Vec<Event> = Vec::new();
    let (t0, target) = loop {
        tokio::select! {
            line = stdin.recv() => {
                let line = line.ok_or_else(|| anyhow!("coordinator went away"))?;
                let mut parts = line.split_whitespace().skip(1);
                let t0: u128 = parts.next().ok_or_else(|| anyhow!("no t0"))?.parse()?;
                let target: u64 = parts.next().ok_or_else(|| anyhow!("no version"))?.parse()?;
                break (t0, target);
            }
            ev = rx.recv() => {
                if let Some(ev) = ev { early.push(ev); }
            }
        }
    };
    let mut got: Vec<Option<u128>> = vec![None; hosts];
    let mut body_len = 0usize;
    let mut count = 0usize;
    let mut record = |ev: Event, got: &mut Vec<Option<u128>>| {
        if ev.version >= target && got[ev.client].is_none() {
            got[ev.client] = Some(ev.at_nanos.saturating_sub(t0));
            body_len = body_len.max(ev.body_len);
            count += 1;
        }
    };
    for ev in early {
        record(ev, &mut got);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.iter().any(|g| g.is_none()) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) => record(ev, &mut got),
            _ => break,
        }
    }
    let mut lat: Vec<u128> = got.iter().flatten().copied().collect();
    lat.sort_unstable();
    let missing = hosts - lat.len();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let idx = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[idx] as f64 / 1e6
    };
    println!(
        "new version {target} reached {}/{hosts} clients; latency from the change: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (min {:.1} ms); netmap body {:.0} KiB per host",
        lat.len(),
        pct(0.50),
        pct(0.99),
        pct(1.0),
        lat.first().map_or(f64::NAN, |v| *v as f64 / 1e6),
        body_len as f64 / 1024.0
    );
    if missing > 0 {
        println!("{missing} clients did not get the new version within 60 s");
    }
    println!(
        "client process peak RSS (VmHWM): {:.1} MiB",
        vm_hwm_kib().unwrap_or(0) as f64 / 1024.0
    );
    println!("DONE");
    Ok(())
}

/// One connection: long-poll until the process ends. Returns Err on connection trouble.
async fn poll_loop(
    i: usize,
    server: SocketAddr,
    auth: &mesh_proto::wire::auth::AuthKey,
    since: &mut u64,
    tx: &mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(host_address(i), 0))
        .with_context(|| format!("binding {}", host_address(i)))?;
    let mut s = sock.connect(server).await.context("connect")?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut scratch = vec![0u8; 16 * 1024];
    loop {
        // Signed like a daemon's request (the answer's proof is not checked here).
        let path = format!("/v1/netmap?since={since}");
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&(now_nanos() as u64).to_le_bytes());
        nonce[8..].copy_from_slice(&(i as u64).to_le_bytes());
        let proof = auth.sign("GET", &path, b"", now_unix(), nonce);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: coordinator\r\n{}: {}\r\n\r\n",
            mesh_proto::wire::auth::AUTH_HEADER,
            proof.header_value()
        );
        s.write_all(req.as_bytes()).await.context("write")?;
        // Headers.
        let hdr_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = s.read(&mut scratch).await.context("read")?;
            if n == 0 {
                bail!("server closed the connection");
            }
            buf.extend_from_slice(&scratch[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..hdr_end]).to_ascii_lowercase();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line"))?;
        let header = |name: &str| -> Option<u64> {
            head.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim_start_matches(':').trim().parse().ok())
        };
        let len = header("content-length").unwrap_or(0) as usize;
        let version = header(meshd::coordinator::VERSION_HEADER);
        // Body: counted and dropped.
        let mut have = buf.len() - hdr_end;
        buf.clear();
        while have < len {
            let want = (len - have).min(scratch.len());
            let n = s.read(&mut scratch[..want]).await.context("read body")?;
            if n == 0 {
                bail!("server closed the connection mid-body");
            }
            have += n;
        }
        match status {
            200 => {
                let v = version.ok_or_else(|| anyhow!("200 without a version header"))?;
                *since = v;
                let _ = tx.send(Event {
                    client: i,
                    version: v,
                    at_nanos: now_nanos(),
                    body_len: len,
                });
            }
            304 => {}
            other => bail!("status {other}"),
        }
    }
}
