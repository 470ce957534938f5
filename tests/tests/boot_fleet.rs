//! The booted fleet: the daemon hosts as Debian 12 containers booted with systemd as PID 1,
//! the Debian package installed with apt, meshd started by its unit; the coordinator configured
//! in its `/etc/meshd/meshd.toml`, the others joined with `meshctl invite` / `meshctl join -`
//! (`meshlab::boot`); systemd-resolved answers the mesh names through meshd's split DNS.
//! Then lifecycle under traffic: `systemctl restart meshd` while a 10 ms
//! ping crosses the mesh; the upgrade from the previous package (`MESHLAB_DEB_PREV`) with
//! `apt-get install` host after host; with the coordinator stopped, ten reboots of a member that come back
//! from its cached netmap, each time with a unit of ours ordered after meshd-online.target
//! that binds the mesh address; `apt remove`, then `apt purge`, as packaging/README.md
//! promises them.
//!
//! Needs the package and the cached Debian root: `packaging/test-deb.sh` builds both and runs
//! this with `--ignored` and `MESHLAB_DEB`; by hand: `MESHLAB_DEB=target/debian/meshd_*.deb
//! cargo test -p meshlab --test boot_fleet -- --ignored`.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meshlab::boot::{find_deb, form_booted_fleet};
use meshlab::{one_lab_at_a_time, poll_until, Lab, LabOpts, COORDINATOR, DAEMON_HOSTS, MESH_IFACE};

const TIMEOUT: Duration = Duration::from_secs(120);

/// `ping` summary: (transmitted, received).
fn ping_counts(out: &str) -> Option<(u32, u32)> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut words = line.split_whitespace();
    let sent = words.next()?.parse().ok()?;
    let received = line
        .split(", ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((sent, received))
}

#[test]
#[ignore = "needs the Debian package and the cached Debian root: packaging/test-deb.sh runs it"]
fn booted_fleet_forms_from_the_package_and_a_restart_loses_no_ping() -> Result<()> {
    let _one = one_lab_at_a_time();
    let lab = Lab::build(LabOpts::default())?;
    let deb = find_deb()?;
    // With an older package to start from, the fleet boots it and is upgraded to `deb`.
    let prev = std::env::var_os("MESHLAB_DEB_PREV").map(std::path::PathBuf::from);
    let (containers, timings) = form_booted_fleet(&lab, prev.as_deref().unwrap_or(&deb), TIMEOUT)?;
    println!("{}", timings.summary());

    // `meshctl peers` in every container, run as an operator would there, names every other host.
    for h in DAEMON_HOSTS {
        let out = lab.container_ok(h, containers[h], &["meshctl", "peers"])?;
        for other in DAEMON_HOSTS.iter().filter(|o| **o != h) {
            if !out.contains(other) {
                bail!("meshctl peers on {h} does not list {other}:\n{out}");
            }
        }
    }
    println!(
        "meshctl peers in each of the {} containers lists the other hosts",
        DAEMON_HOSTS.len()
    );

    // systemd-resolved in every container answers the mesh names through meshd's DNS on
    // the mesh interface (per-link split DNS), and only those: other names are not sent to
    // the mesh (no default route on wgmesh0; the lab has no uplink resolver, so they fail).
    for h in DAEMON_HOSTS {
        let other = if h == "dock-prod" {
            "dock-dash"
        } else {
            "dock-prod"
        };
        let name = format!("{other}.mesh.internal");
        let out = lab.container_ok(h, containers[h], &["resolvectl", "query", &name])?;
        let want = format!("{name}: {}", lab.mesh_addr(other)?);
        if !out.contains(&want) || !out.contains(&format!("link: {MESH_IFACE}")) {
            bail!("resolvectl query {name} on {h}: want {want:?} via {MESH_IFACE}, got:\n{out}");
        }
        let link = lab.container_ok(h, containers[h], &["resolvectl", "status", MESH_IFACE])?;
        if !link.contains("-DefaultRoute") || !link.contains("~mesh.internal") {
            bail!("{MESH_IFACE}'s DNS in systemd-resolved on {h} is not split DNS:\n{link}");
        }
        let foreign =
            lab.container_output(h, containers[h], &["resolvectl", "query", "example.org"])?;
        let foreign = String::from_utf8_lossy(&foreign.stdout).into_owned()
            + &String::from_utf8_lossy(&foreign.stderr);
        if !foreign.contains("No appropriate name servers") {
            bail!("example.org on {h} went somewhere: {foreign}");
        }
    }
    println!("systemd-resolved in each container answers NAME.mesh.internal from meshd's DNS on {MESH_IFACE} (split DNS, no default route)");

    prometheus_scrapes_the_mesh(&lab, containers["dock-dash"])?;

    // Figures an operator asks for: the sandbox's exposure as systemd rates it, and meshd's
    // memory on the coordinator and on an idle member.
    let security = lab.container_output(
        COORDINATOR,
        containers[COORDINATOR],
        &["systemd-analyze", "security", "--no-pager", "meshd.service"],
    )?;
    let security = String::from_utf8_lossy(&security.stdout);
    if let Some(line) = security
        .lines()
        .find(|l| l.contains("Overall exposure level"))
    {
        println!(
            "systemd-analyze security in the container: {}",
            line.trim_start_matches(['→', ' '])
        );
    }
    for h in [COORDINATOR, "dock-dash"] {
        let pid = lab.container_ok(
            h,
            containers[h],
            &["systemctl", "show", "-p", "MainPID", "--value", "meshd"],
        )?;
        let status = lab.container_ok(
            h,
            containers[h],
            &["cat", &format!("/proc/{}/status", pid.trim())],
        )?;
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap_or("VmRSS: ?");
        println!(
            "meshd's memory on {h}: {}",
            rss.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
        );
    }

    // systemctl restart meshd on dock-prod while dock-load pings it every 10 ms.
    let target = "dock-prod";
    let addr = lab.mesh_addr(target)?;
    let index = lab.ifindex(target, MESH_IFACE)?;
    let nspawn = containers[target];
    let pid_before = main_pid(&lab, target, nspawn)?;
    let ping = Ping::start(&lab, COORDINATOR, addr, 8)?;
    lab.container_ok(target, nspawn, &["systemctl", "restart", "meshd"])?;
    wait_restarted(&lab, target, nspawn, &pid_before)?;
    let (sent, lost) = ping.finish()?;
    println!("systemctl restart meshd on {target}: {lost} of {sent} pings (10 ms) lost");
    let index_after = lab.ifindex(target, MESH_IFACE)?;
    if index_after != index {
        bail!("the restart recreated {MESH_IFACE}: ifindex {index} -> {index_after}");
    }
    println!("{MESH_IFACE} kept its ifindex {index}");
    if lost != 0 {
        bail!("{lost} of {sent} pings lost across systemctl restart meshd");
    }

    // The upgrade, host after host, as an operator does it: `apt install ./meshd_NEW.deb`
    // under the running systemd (postinst try-restarts meshd), while the host is pinged.
    match &prev {
        Some(_) => {
            for h in DAEMON_HOSTS {
                let from = if h == COORDINATOR {
                    "dock-prod"
                } else {
                    COORDINATOR
                };
                let lost = upgrade(&lab, h, containers[h], &deb, from)?;
                println!("apt install of the new package on {h}: {lost} pings (10 ms) lost");
                if lost > 2 {
                    bail!("{lost} pings lost while {h} was upgraded (at most 2)");
                }
            }
        }
        None => println!(
            "upgrade: SKIPPED (MESHLAB_DEB_PREV not set; packaging/test-deb.sh sets it to the \
             previous version it builds)"
        ),
    }

    // A unit of our own ordered after meshd-online.target binds a listener to the mesh
    // address; the coordinator is stopped; the member reboots (its interface and engine go,
    // /run is emptied) and must come back from its cached netmap, the listener with it.
    let member = "dock-mirror";
    let mesh = lab.mesh_addr(member)?;
    install_listener(&lab, member, &mesh.to_string())?;
    lab.container_ok(
        COORDINATOR,
        containers[COORDINATOR],
        &["systemctl", "stop", "meshd"],
    )?;
    let mut nspawn = containers[member];
    let mut worst = Duration::ZERO;
    for round in 1..=REBOOTS {
        let index = lab.ifindex(member, MESH_IFACE)?;
        let t = std::time::Instant::now();
        nspawn = lab.reboot(member, nspawn, TIMEOUT)?;
        lab.wait_unit(member, nspawn, "mesh-listen.service", TIMEOUT)
            .with_context(|| {
                format!("round {round}: the unit ordered after meshd-online.target did not start")
            })?;
        let online = t.elapsed();
        pairs_ping(&lab, member, TIMEOUT)?;
        let meshed = t.elapsed();
        worst = worst.max(meshed);
        // A reboot, not a restart: the interface went with the old boot's engine.
        let index_after = lab.ifindex(member, MESH_IFACE)?;
        if index_after == index {
            bail!("round {round}: {MESH_IFACE} kept ifindex {index}: the container did not reboot");
        }
        let answer = lab.exec_ok(
            "dock-prod",
            &[
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{mesh}/7777 && cat <&3"),
            ],
        )?;
        if answer.trim() != "mesh" {
            bail!("round {round}: the listener on {mesh}:7777 answered {answer:?}");
        }
        println!(
            "reboot {round}/{REBOOTS} of {member} (coordinator stopped): listener up {} ms, \
             all its pairs ping {} ms after the reboot began",
            online.as_millis(),
            meshed.as_millis()
        );
    }
    println!(
        "slowest reboot to all pairs pinging: {} ms",
        worst.as_millis()
    );
    journal_is_native(&lab, member, nspawn)?;
    remove_then_purge(&lab, "dock-dash", containers["dock-dash"])
}

/// meshd logs to journald natively under its unit: the coordinator's absence (this boot of
/// `host`, the coordinator stopped) is a warning (PRIORITY 4) that `journalctl -p warning`
/// shows, the start line is informational (6) and names the version, fields are journal
/// fields (`journalctl INTERFACE=wgmesh0`), and no message carries colour codes.
fn journal_is_native(lab: &Lab, host: &str, nspawn: meshlab::ProcId) -> Result<()> {
    let read = || -> Result<Vec<serde_json::Value>> {
        let json = lab.container_ok(
            host,
            nspawn,
            &[
                "journalctl",
                "-b",
                "-u",
                "meshd",
                "-o",
                "json",
                "--no-pager",
            ],
        )?;
        Ok(json
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    };
    // The follower's first failed poll comes a moment after the start.
    poll_until(
        Duration::from_secs(30),
        &format!("the unreachable coordinator in {host}'s journal"),
        || {
            Ok(read()?.iter().any(|e| {
                e.get("MESSAGE")
                    .and_then(|m| m.as_str())
                    .is_some_and(|m| m.contains("coordinator unreachable"))
            }))
        },
    )?;
    let entries = read()?;
    let field =
        |e: &serde_json::Value, k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    let find = |text: &str, priority: &str| {
        entries
            .iter()
            .any(|e| field(e, "MESSAGE").contains(text) && field(e, "PRIORITY") == priority)
    };
    let version = format!("meshd {} started", env!("CARGO_PKG_VERSION"));
    if !find(&version, "6") {
        bail!(
            "no {version:?} at priority 6 in {host}'s journal ({} entries)",
            entries.len()
        );
    }
    if !find("coordinator unreachable", "4") {
        bail!("the unreachable coordinator is not a priority-4 warning in {host}'s journal");
    }
    if let Some(e) = entries
        .iter()
        .find(|e| field(e, "MESSAGE").contains('\u{1b}'))
    {
        bail!("a colour code in {host}'s journal: {e}");
    }
    let warnings = lab.container_ok(
        host,
        nspawn,
        &[
            "journalctl",
            "-b",
            "-u",
            "meshd",
            "-p",
            "warning",
            "--no-pager",
            "-o",
            "cat",
        ],
    )?;
    if !warnings.contains("coordinator unreachable") {
        bail!("journalctl -p warning on {host} does not show the warning:\n{warnings}");
    }
    let by_interface = lab.container_ok(
        host,
        nspawn,
        &[
            "journalctl",
            "-b",
            "-u",
            "meshd",
            "--no-pager",
            "-o",
            "cat",
            &format!("INTERFACE={MESH_IFACE}"),
        ],
    )?;
    if by_interface.trim().is_empty() {
        bail!("journalctl INTERFACE={MESH_IFACE} finds nothing on {host}");
    }
    println!(
        "{host}'s journal: {} meshd entries, priorities 4 and 6 as logged, INTERFACE={MESH_IFACE} finds {} lines, no colour codes",
        entries.len(),
        by_interface.lines().count()
    );
    Ok(())
}

/// Prometheus from Debian's package on the dashboard host, set up as the README tells an
/// operator: the file_sd directory made before meshd starts (its sandbox only opens what
/// exists), `[integrations.prometheus]` in meshd.toml, a scrape job reading meshd's file. Every
/// meshd's /metrics is then `up == 1` over the mesh, and every query of the Grafana dashboard
/// the project ships returns series (asked of Prometheus's HTTP API from the host's namespace).
fn prometheus_scrapes_the_mesh(lab: &Lab, nspawn: meshlab::ProcId) -> Result<()> {
    let host = "dock-dash";
    let root = lab.container_root(host);
    let file_sd = "/etc/prometheus/file_sd/meshd.json";
    lab.container_ok(host, nspawn, &["mkdir", "-p", "/etc/prometheus/file_sd"])?;
    let conf = root.join("etc/meshd/meshd.toml");
    let mut text = std::fs::read_to_string(&conf)?;
    text.push_str("\n[integrations.prometheus]\n");
    std::fs::write(&conf, text)?;
    let pid = main_pid(lab, host, nspawn)?;
    lab.container_ok(host, nspawn, &["systemctl", "restart", "meshd"])?;
    wait_restarted(lab, host, nspawn, &pid)?;
    let written = root.join(file_sd.trim_start_matches('/'));
    poll_until(
        TIMEOUT,
        &format!("meshd to write {file_sd} on {host}"),
        || {
            let Ok(text) = std::fs::read_to_string(&written) else {
                return Ok(false);
            };
            Ok(DAEMON_HOSTS.iter().all(|h| {
                lab.mesh_addr(h)
                    .is_ok_and(|a| text.contains(&a.to_string()))
            }))
        },
    )?;

    // The operator's scrape job, appended to the scrape_configs of Debian's prometheus.yml.
    let yml = root.join("etc/prometheus/prometheus.yml");
    let mut text = std::fs::read_to_string(&yml)?;
    text.push_str(&format!(
        "\n  - job_name: meshd\n    scrape_interval: 2s\n    file_sd_configs:\n      \
         - files: ['{file_sd}']\n"
    ));
    std::fs::write(&yml, text)?;
    lab.container_ok(
        host,
        nspawn,
        &[
            "promtool",
            "check",
            "config",
            "/etc/prometheus/prometheus.yml",
        ],
    )?;
    lab.container_ok(host, nspawn, &["systemctl", "restart", "prometheus"])?;
    lab.wait_unit(host, nspawn, "prometheus.service", TIMEOUT)?;

    let query = |q: &str| -> Result<Vec<serde_json::Value>> {
        let out = lab.exec_ok(
            host,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:9090/api/v1/query",
                "--data-urlencode",
                &format!("query={q}"),
            ],
        )?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("Prometheus answered {out:?}"))?;
        if v["status"] != "success" {
            bail!("Prometheus rejected {q:?}: {v}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    };
    let up = r#"up{job="meshd"}"#;
    poll_until(
        TIMEOUT,
        &format!("every meshd target to be up in Prometheus on {host}"),
        || {
            let series = query(up).unwrap_or_default();
            Ok(series.len() == DAEMON_HOSTS.len() && series.iter().all(|s| s["value"][1] == "1"))
        },
    )
    .with_context(|| format!("{up}: {:?}", query(up)))?;
    println!(
        "Prometheus {} on {host}: {up} == 1 for all {} meshd targets (file_sd from meshd)",
        lab.container_ok(
            host,
            nspawn,
            &["dpkg-query", "-W", "-f", "${Version}", "prometheus"]
        )?,
        DAEMON_HOSTS.len()
    );

    // The dashboard's queries, with Grafana's variables as "All" and a rate window that holds
    // several 2 s scrapes.
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/grafana-meshd.json"
    ))?)?;
    let mut exprs: Vec<String> = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = target["expr"].as_str() {
                exprs.push(
                    e.replace("$__rate_interval", "30s")
                        .replace("$instance", ".*")
                        .replace("$interface", ".*"),
                );
            }
        }
    }
    if exprs.is_empty() {
        bail!("no queries found in configs/grafana-meshd.json");
    }
    for e in &exprs {
        poll_until(TIMEOUT, &format!("series for {e}"), || {
            Ok(!query(e)?.is_empty())
        })?;
    }
    println!(
        "every query of configs/grafana-meshd.json ({}) returns series from that Prometheus",
        exprs.len()
    );
    Ok(())
}

/// `apt remove`, then `apt purge`, as packaging/README.md promises them: remove stops meshd
/// and leaves the interface, its peers and routes up, and the configuration and state; purge
/// deletes `/etc/meshd`, `/var/lib/meshd` and `/run/meshd` and says how to remove the
/// interface still up.
fn remove_then_purge(lab: &Lab, host: &str, nspawn: meshlab::ProcId) -> Result<()> {
    let addr = lab.mesh_addr(host)?;
    let index = lab.ifindex(host, MESH_IFACE)?;
    let apt = |args: &[&str]| {
        let mut argv = vec!["apt-get", "-o", "Dpkg::Use-Pty=0", "-y", "-q"];
        argv.extend_from_slice(args);
        lab.container_ok(host, nspawn, &argv)
    };
    apt(&["remove", "meshd"])?;
    let state = lab.container_output(host, nspawn, &["systemctl", "is-active", "meshd"])?;
    let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
    if state == "active" {
        bail!("meshd still runs on {host} after apt remove");
    }
    if lab.ifindex(host, MESH_IFACE)? != index {
        bail!("apt remove changed {MESH_IFACE} on {host}");
    }
    poll_until(
        Duration::from_secs(10),
        &format!("{COORDINATOR} to still reach {host} after apt remove"),
        || lab.ping(COORDINATOR, addr),
    )?;
    let kept = lab.container_ok(host, nspawn, &["ls", "/etc/meshd", "/var/lib/meshd"])?;
    println!(
        "apt remove on {host}: meshd {state}; {MESH_IFACE} and the mesh still up; kept: {}",
        kept.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    let purge = lab.container_output(
        host,
        nspawn,
        &[
            "apt-get",
            "-o",
            "Dpkg::Use-Pty=0",
            "-y",
            "-q",
            "purge",
            "meshd",
        ],
    )?;
    if !purge.status.success() {
        bail!("apt purge on {host} failed: {purge:?}");
    }
    // postrm's hint goes to stderr.
    let purge = format!(
        "{}{}",
        String::from_utf8_lossy(&purge.stdout),
        String::from_utf8_lossy(&purge.stderr)
    );
    for gone in ["/etc/meshd", "/var/lib/meshd", "/run/meshd"] {
        let out = lab.container_output(host, nspawn, &["test", "-e", gone])?;
        if out.status.success() {
            bail!("{gone} is still there after apt purge on {host}");
        }
    }
    if !purge.contains(MESH_IFACE) {
        bail!("apt purge did not say how to remove the {MESH_IFACE} still up:\n{purge}");
    }
    println!(
        "apt purge on {host}: /etc/meshd, /var/lib/meshd and /run/meshd removed; it said how \
         to remove {MESH_IFACE}"
    );
    Ok(())
}

/// `apt-get install` of `deb` over the installed package in `host`'s container while `from`
/// pings it every 10 ms; checks that meshd was restarted by the upgrade (a new main PID, the
/// new version installed) and kept its interface. Returns the pings lost.
fn upgrade(
    lab: &Lab,
    host: &str,
    nspawn: meshlab::ProcId,
    deb: &std::path::Path,
    from: &str,
) -> Result<u32> {
    std::fs::copy(deb, lab.container_root(host).join("root/meshd-new.deb"))
        .with_context(|| format!("copying {} into {host}'s root", deb.display()))?;
    let version = |l: &Lab| {
        l.container_ok(
            host,
            nspawn,
            &["dpkg-query", "-W", "-f", "${Version}", "meshd"],
        )
    };
    let old_version = version(lab)?;
    let pid_before = main_pid(lab, host, nspawn)?;
    let index = lab.ifindex(host, MESH_IFACE)?;
    let addr = lab.mesh_addr(host)?;
    let ping = Ping::start(lab, from, addr, 6)?;
    lab.container_ok(
        host,
        nspawn,
        &[
            "apt-get",
            "-o",
            "Dpkg::Use-Pty=0",
            "-y",
            "-q",
            "install",
            "--no-install-recommends",
            "/root/meshd-new.deb",
        ],
    )?;
    wait_restarted(lab, host, nspawn, &pid_before)?;
    let (_, lost) = ping.finish()?;
    let new_version = version(lab)?;
    if new_version == old_version {
        bail!("{host} still has meshd {old_version} after the upgrade");
    }
    let index_after = lab.ifindex(host, MESH_IFACE)?;
    if index_after != index {
        bail!("the upgrade recreated {MESH_IFACE} on {host}: ifindex {index} -> {index_after}");
    }
    Ok(lost)
}

/// meshd's main PID in `host`'s container ("0" when it is not running).
fn main_pid(lab: &Lab, host: &str, nspawn: meshlab::ProcId) -> Result<String> {
    Ok(lab
        .container_ok(
            host,
            nspawn,
            &["systemctl", "show", "-p", "MainPID", "--value", "meshd"],
        )?
        .trim()
        .to_owned())
}

/// Wait until meshd in `host`'s container runs again under a main PID other than `before`.
fn wait_restarted(lab: &Lab, host: &str, nspawn: meshlab::ProcId, before: &str) -> Result<()> {
    poll_until(
        Duration::from_secs(30),
        &format!("meshd to run again on {host}"),
        || {
            let pid = main_pid(lab, host, nspawn)?;
            Ok(pid != before && pid != "0")
        },
    )?;
    lab.wait_unit(host, nspawn, "meshd.service", Duration::from_secs(30))
}

/// A 10 ms ping from one lab host to an address for a number of seconds.
struct Ping(std::process::Child);

impl Ping {
    fn start(lab: &Lab, from: &str, addr: std::net::Ipv4Addr, secs: u32) -> Result<Ping> {
        let (secs, addr) = (secs.to_string(), addr.to_string());
        let child = lab
            .command(
                from,
                &["ping", "-n", "-q", "-i", "0.01", "-w", &secs, &addr],
            )?
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ping")?;
        Ok(Ping(child))
    }

    /// Wait for its end: (sent, lost).
    fn finish(self) -> Result<(u32, u32)> {
        let out = self.0.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (sent, received) =
            ping_counts(&text).with_context(|| format!("no ping summary in {text:?}"))?;
        Ok((sent, sent - received))
    }
}

/// Reboots of the member in the ordering test.
const REBOOTS: u32 = 10;

/// A service that binds a TCP listener to the host's mesh address, ordered after (and
/// requiring) meshd-online.target, enabled at boot; each connection gets "mesh". (A socket
/// unit would need `DefaultDependencies=no`: by default sockets come before basic.target,
/// which meshd.service itself comes after, and systemd breaks that cycle by dropping a job.)
fn install_listener(lab: &Lab, host: &str, mesh: &str) -> Result<()> {
    let dir = lab.container_root(host).join("etc/systemd/system");
    std::fs::write(
        dir.join("mesh-listen.service"),
        format!(
            "[Unit]\nDescription=a listener on the mesh address\n\
             After=meshd-online.target\nRequires=meshd-online.target\n\n\
             [Service]\nExecStart=/usr/bin/systemd-socket-activate --listen={mesh}:7777 \
             --accept --inetd /bin/echo mesh\n\n\
             [Install]\nWantedBy=multi-user.target\n"
        ),
    )?;
    let wants = dir.join("multi-user.target.wants");
    std::fs::create_dir_all(&wants)?;
    let link = wants.join("mesh-listen.service");
    if !link.exists() {
        std::os::unix::fs::symlink("/etc/systemd/system/mesh-listen.service", link)?;
    }
    Ok(())
}

/// Every pair that involves `host` pings over the mesh, both ways.
fn pairs_ping(lab: &Lab, host: &str, timeout: Duration) -> Result<()> {
    let own = lab.mesh_addr(host)?;
    for other in DAEMON_HOSTS.iter().filter(|o| **o != host) {
        let addr = lab.mesh_addr(other)?;
        poll_until(timeout, &format!("{host} to ping {other}"), || {
            lab.ping(host, addr)
        })?;
        poll_until(timeout, &format!("{other} to ping {host}"), || {
            lab.ping(other, own)
        })?;
    }
    Ok(())
}

#[test]
fn ping_summaries_are_read() {
    let out = "--- 10.99.99.2 ping statistics ---\n790 packets transmitted, 788 received, 0.253165% packet loss, time 7990ms\n";
    assert_eq!(ping_counts(out), Some((790, 788)));
    assert_eq!(ping_counts("nothing"), None);
}
