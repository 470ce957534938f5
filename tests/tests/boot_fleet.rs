//! The booted fleet: the daemon hosts as Debian 12 containers booted with systemd as PID 1,
//! the Debian package installed with apt, meshd started by its unit; the coordinator configured
//! in its `/etc/meshd/meshd.toml`, the others joined with `meshctl invite` / `meshctl join -`
//! (`meshlab::boot`). Real consumers: systemd-resolved answers the mesh names through meshd's
//! split DNS; Prometheus from Debian on dock-dash scrapes every meshd through meshd's file_sd
//! hand-off and answers every query of the shipped Grafana dashboard; a K3s stand-in
//! (`flannel-standin`, a unit ordered after meshd-online.target that reads node-ip and
//! flannel-iface from meshd's K3s drop-in and makes flannel's objects: `flannel.1` doing VXLAN
//! from the mesh address, `cni0`, the FLANNEL-* chains) carries pod-to-pod pings over the mesh.
//! Then lifecycle under traffic (a 10 ms ping and an iperf3 TCP stream across the mesh):
//! `systemctl restart meshd` (no ping lost, same ifindex, the K3s objects byte-identical); the
//! upgrade from the previous package (`MESHLAB_DEB_PREV`) with `apt-get install` host after
//! host; with the coordinator stopped, ten reboots of a member that come back from its cached
//! netmap, each time with a unit of ours ordered after meshd-online.target that binds the mesh
//! address and the K3s objects as before; `apt remove`, then `apt purge`, as
//! packaging/README.md promises them and nothing else changed (a manifest of the container's
//! files and its network state before and after); then `apt install` again and a join, timed.
//!
//! Needs the package and the cached Debian root: `packaging/test-deb.sh` builds both and runs
//! this with `--ignored` and `MESHLAB_DEB`; by hand: `MESHLAB_DEB=target/debian/meshd_*.deb
//! cargo test -p meshlab --test boot_fleet -- --ignored`.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meshlab::boot::{find_deb, form_booted_fleet};
use meshlab::{
    one_lab_at_a_time, poll_for, poll_until, Lab, LabOpts, COORDINATOR, DAEMON_HOSTS, MESH_IFACE,
};

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

    // The K3s stand-in on two hosts, a server and an agent (see [`K3sNode`]).
    let k3s = [
        K3sNode {
            host: "dock-prod",
            integration: "role = \"server\"",
            subnet: 0,
        },
        K3sNode {
            host: "dock-mirror",
            integration: "server = \"dock-prod\"",
            subnet: 1,
        },
    ];
    for node in &k3s {
        node.install(&lab, containers[node.host], &k3s)?;
    }
    let k3s_before = k3s
        .iter()
        .map(|n| n.settled_objects(&lab, containers[n.host]))
        .collect::<Result<Vec<_>>>()?;
    let (a, b) = (&k3s[0], &k3s[1]);
    let (crossed, over_mesh) = a.vxlan_ping(&lab, containers[a.host], b)?;
    println!(
        "K3s stand-in on {} and {}: flannel.1 VXLAN from node-ip {} on {MESH_IFACE} (read from \
         meshd's drop-in), cni0, FLANNEL-FWD/FLANNEL-POSTRTG; {crossed} pod-to-pod pings \
         crossed, {over_mesh} bytes more on {MESH_IFACE}",
        a.host,
        b.host,
        lab.mesh_addr(a.host)?
    );

    // systemctl restart meshd on dock-prod while dock-load pings it every 10 ms.
    let target = "dock-prod";
    let index = lab.ifindex(target, MESH_IFACE)?;
    let nspawn = containers[target];
    let pid_before = main_pid(&lab, target, nspawn)?;
    let traffic = Traffic::start(&lab, COORDINATOR, target, 8)?;
    lab.container_ok(target, nspawn, &["systemctl", "restart", "meshd"])?;
    wait_restarted(&lab, target, nspawn, &pid_before)?;
    let t = traffic.finish()?;
    let (sent, lost) = (t.sent, t.lost);
    println!("systemctl restart meshd on {target}: {t}");
    let index_after = lab.ifindex(target, MESH_IFACE)?;
    if index_after != index {
        bail!("the restart recreated {MESH_IFACE}: ifindex {index} -> {index_after}");
    }
    println!("{MESH_IFACE} kept its ifindex {index}");
    if lost != 0 {
        bail!("{lost} of {sent} pings lost across systemctl restart meshd");
    }
    for (node, before) in k3s.iter().zip(&k3s_before) {
        let after = node.objects(&lab, containers[node.host])?;
        if &after != before {
            bail!(
                "the K3s objects on {} changed across the restart of meshd on {target}:\n{}",
                node.host,
                changed_lines(before, &after).join("\n")
            );
        }
    }
    a.vxlan_ping(&lab, containers[a.host], b)?;
    println!(
        "K3s stand-in objects byte-identical across the restart; VXLAN over the mesh still flows"
    );

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
                let t = upgrade(&lab, h, containers[h], &deb, from)?;
                println!("apt install of the new package on {h}: {t}");
                if t.lost > 2 {
                    bail!("{} pings lost while {h} was upgraded (at most 2)", t.lost);
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
        // The K3s stand-in came back as it was, started after meshd-online.target.
        let (node, before) = (&k3s[1], &k3s_before[1]);
        poll_until(
            TIMEOUT,
            &format!("round {round}: the K3s objects on {member} to be as before"),
            || Ok(&node.objects(&lab, nspawn)? == before),
        )
        .with_context(|| {
            let now = node.objects(&lab, nspawn).unwrap_or_default();
            changed_lines(before, &now).join("\n")
        })?;
        node.vxlan_ping(&lab, nspawn, &k3s[0])?;
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
             all its pairs ping {} ms after the reboot began; K3s objects identical, VXLAN flows",
            online.as_millis(),
            meshed.as_millis()
        );
    }
    println!(
        "slowest reboot to all pairs pinging: {} ms",
        worst.as_millis()
    );
    journal_is_native(&lab, member, nspawn)?;
    remove_then_purge(&lab, "dock-dash", containers["dock-dash"])?;
    // The coordinator runs again for the new install to join.
    lab.container_ok(
        COORDINATOR,
        containers[COORDINATOR],
        &["systemctl", "start", "meshd"],
    )?;
    lab.wait_unit(
        COORDINATOR,
        containers[COORDINATOR],
        "meshd-online.target",
        TIMEOUT,
    )?;
    reinstall_and_join(
        &lab,
        "dock-dash",
        containers["dock-dash"],
        containers[COORDINATOR],
        &deb,
    )?;
    down_then_up(&lab, "dock-edge", containers["dock-edge"], &containers)
}

/// `meshctl down` under systemd: meshd stops (the unit does not restart it) and takes the
/// interface with it; a second `meshctl down` has nothing to remove and succeeds; `meshctl
/// up` starts the unit again and every pair of `host` pings.
fn down_then_up(
    lab: &Lab,
    host: &str,
    nspawn: meshlab::ProcId,
    containers: &std::collections::BTreeMap<String, meshlab::ProcId>,
) -> Result<()> {
    down_then_up_steps(lab, host, nspawn).map_err(|e| {
        let peers: String = ["dock-edge", "dock-mirror"]
            .iter()
            .map(|h| {
                let p = lab
                    .container_ok(h, containers[*h], &["meshctl", "peers"])
                    .unwrap_or_default();
                let wg = lab
                    .command(h, &["wg", "show"])
                    .ok()
                    .and_then(|mut c| c.output().ok());
                let wg = wg
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                format!("{h}: meshctl peers:\n{p}\nwg show:\n{wg}\n")
            })
            .collect();
        let journal = lab
            .container_ok(
                host,
                nspawn,
                &[
                    "journalctl",
                    "-u",
                    "meshd",
                    "-n",
                    "60",
                    "--no-pager",
                    "-o",
                    "short-precise",
                ],
            )
            .unwrap_or_default();
        anyhow::anyhow!("{e:#}\n{host}'s journal:\n{journal}\n{peers}")
    })
}

fn down_then_up_steps(lab: &Lab, host: &str, nspawn: meshlab::ProcId) -> Result<()> {
    let said = lab.container_ok(host, nspawn, &["meshctl", "down"])?;
    println!("meshctl down on {host}: {}", said.trim());
    poll_until(
        Duration::from_secs(15),
        &format!("meshd on {host} to stop after meshctl down"),
        || {
            let out = lab.container_output(host, nspawn, &["systemctl", "is-active", "meshd"])?;
            Ok(String::from_utf8_lossy(&out.stdout).trim() == "inactive")
        },
    )?;
    let link = lab.container_output(host, nspawn, &["ip", "link", "show", MESH_IFACE])?;
    if link.status.success() {
        bail!("{MESH_IFACE} is still on {host} after meshctl down");
    }
    let again = lab.container_ok(host, nspawn, &["meshctl", "down"])?;
    if !again.contains("nothing to remove") {
        bail!("a second meshctl down on {host} said: {again}");
    }
    let t = std::time::Instant::now();
    lab.container_ok(host, nspawn, &["meshctl", "up"])?;
    lab.wait_unit(host, nspawn, "meshd-online.target", TIMEOUT)?;
    // dock-dash was reinstalled under another name and address just before.
    let own = lab.mesh_addr(host)?;
    for other in ["dock-load", "dock-prod", "dock-mirror"] {
        let addr = lab.mesh_addr(other)?;
        poll_until(TIMEOUT, &format!("{host} to ping {other}"), || {
            lab.ping(host, addr)
        })?;
        poll_until(TIMEOUT, &format!("{other} to ping {host}"), || {
            lab.ping(other, own)
        })?;
    }
    println!(
        "meshctl down on {host}: meshd stopped, {MESH_IFACE} gone; again: nothing to remove \
         (exit 0); meshctl up to all its pairs pinging: {} ms",
        t.elapsed().as_millis()
    );
    Ok(())
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
/// interface still up. Nothing else changes: the container's files (type, mode, owner, path;
/// the content of everything under /etc) and its network state (links, addresses, routes,
/// rules, nftables) are the same after the purge as before the remove, apart from the
/// package's own files and the records apt, dpkg and systemd keep of it ([`PACKAGE_RECORDS`]).
fn remove_then_purge(lab: &Lab, host: &str, nspawn: meshlab::ProcId) -> Result<()> {
    let addr = lab.mesh_addr(host)?;
    let index = lab.ifindex(host, MESH_IFACE)?;
    let owned: Vec<String> = lab
        .container_ok(host, nspawn, &["dpkg-query", "-L", "meshd"])?
        .lines()
        .map(str::to_owned)
        .collect();
    let files_before = manifest(lab, host, nspawn)?;
    let net_before = network_state(lab, host, nspawn)?;
    let apt = |args: &[&str]| {
        let mut argv = vec!["apt-get", "-o", "Dpkg::Use-Pty=0", "-y", "-q"];
        argv.extend_from_slice(args);
        lab.container_output(host, nspawn, &argv)
    };
    let remove = apt(&["remove", "meshd"])?;
    if !remove.status.success() {
        bail!("apt remove on {host} failed: {remove:?}");
    }
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
    let purge = apt(&["purge", "meshd"])?;
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

    let files_after = manifest(lab, host, nspawn)?;
    let changed = changed_lines(&files_before, &files_after);
    let package_owned = |path: &str| {
        owned.iter().any(|o| o == path)
            || ["/etc/meshd", "/var/lib/meshd", "/run/meshd"]
                .iter()
                .any(|d| path == *d || path.starts_with(&format!("{d}/")))
    };
    let foreign: Vec<&String> = changed
        .iter()
        .filter(|line| {
            let path = manifest_path(line);
            !package_owned(path)
                && !PACKAGE_RECORDS.iter().any(|r| path.starts_with(r))
                && !private_tmp_of_meshd(path)
        })
        .collect();
    if !foreign.is_empty() {
        bail!(
            "apt remove + purge on {host} changed files that are not the package's (-: before, \
             +: after):\n{}",
            foreign
                .iter()
                .map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let net_after = network_state(lab, host, nspawn)?;
    let net_changed = changed_lines(&net_before, &net_after);
    if !net_changed.is_empty() {
        bail!(
            "apt remove + purge on {host} changed the network state (-: before, +: after):\n{}",
            net_changed.join("\n")
        );
    }
    println!(
        "apt remove + purge on {host}: {} of {} paths changed, all the package's own or apt's, \
         dpkg's and systemd's records of it; links, addresses, routes, rules and nftables \
         unchanged",
        changed.len(),
        files_before.len()
    );
    Ok(())
}

/// Where apt, dpkg and systemd keep their own records of a package (its file list, status,
/// the unit's enablement), which installing, removing and purging it change by design. Logs
/// are left out of the comparison too.
const PACKAGE_RECORDS: &[&str] = &[
    "/var/lib/dpkg/",
    "/var/cache/debconf/",
    "/var/cache/apt/",
    "/var/lib/apt/",
    "/var/log/",
    "/var/cache/ldconfig/",
    "/var/lib/systemd/deb-systemd-helper-enabled/",
    "/var/lib/systemd/deb-systemd-helper-masked/",
    "/etc/systemd/system/multi-user.target.wants/meshd.service",
    "/etc/systemd/system/meshd.service.d",
    "/etc/ld.so.cache",
];

/// The unit's `PrivateTmp=` directory, which systemd makes under /var/tmp when meshd starts
/// and removes when it stops: `/var/tmp/systemd-private-BOOTID-meshd.service-RANDOM[/tmp]`.
fn private_tmp_of_meshd(path: &str) -> bool {
    path.strip_prefix("/var/tmp/systemd-private-")
        .is_some_and(|rest| rest.contains("-meshd.service-"))
}

/// Every file of `host`'s container on its root file system (`/run`, `/tmp`, `/proc` and the
/// like are other file systems): `TYPE MODE OWNER GROUP PATH`, with the SHA-256 of each regular
/// file under /etc, sorted.
fn manifest(lab: &Lab, host: &str, nspawn: meshlab::ProcId) -> Result<Vec<String>> {
    let script = "find / -xdev \\( -path /var/log -o -path /var/cache/apt -o -path /var/lib/apt \\) -prune \
                  -o -printf '%y %m %u %g - %p\\n'; \
                  find /etc -xdev -type f -exec sha256sum {} + | awk '{ print \"h - - - \" $1 \" \" $2 }'";
    let out = lab.container_ok(host, nspawn, &["sh", "-c", script])?;
    let mut lines: Vec<String> = out.lines().map(str::to_owned).collect();
    lines.sort();
    Ok(lines)
}

/// The path of a [`manifest`] line (`-`/`+` marked or not).
fn manifest_path(line: &str) -> &str {
    line.trim_start_matches(['-', '+', ' '])
        .splitn(6, ' ')
        .nth(5)
        .unwrap_or(line)
}

/// What the network of `host`'s container is: links (without counters), addresses, routes of
/// every table, rules, the nftables ruleset.
fn network_state(lab: &Lab, host: &str, nspawn: meshlab::ProcId) -> Result<Vec<String>> {
    // Numeric (`ip -N`): the package ships the name of its route protocol (rt_protos.d), so
    // after a purge the same route prints as `proto 171` instead of `proto meshd`.
    let script = "ip -o link show | sed 's/^[0-9]*: //'; ip -o addr show; \
                  ip -N route show table all; ip -N -6 route show table all; ip -N rule; \
                  ip -N -6 rule; nft list ruleset";
    let out = lab.container_ok(host, nspawn, &["sh", "-c", script])?;
    let mut lines: Vec<String> = out.lines().map(str::to_owned).collect();
    lines.sort();
    Ok(lines)
}

/// Lines only in `before` (marked `-`) and only in `after` (`+`); both sorted.
fn changed_lines(before: &[String], after: &[String]) -> Vec<String> {
    let (b, a): (
        std::collections::BTreeSet<&String>,
        std::collections::BTreeSet<&String>,
    ) = (before.iter().collect(), after.iter().collect());
    b.difference(&a)
        .map(|l| format!("-{l}"))
        .chain(a.difference(&b).map(|l| format!("+{l}")))
        .collect()
}

/// After the purge, the host is installed and joined again the way an operator sets up a new
/// host: the purge's hint followed (the old interface and table removed), the coordinator
/// forgets the old membership (`meshctl remove`) and makes a token, then on the host
/// `apt install ./meshd_*.deb` and `meshctl join -`. Prints the time from the start of the
/// `apt install` to a joined, ready host (meshd-online.target active, all its pairs ping).
fn reinstall_and_join(
    lab: &Lab,
    host: &str,
    nspawn: meshlab::ProcId,
    coordinator: meshlab::ProcId,
    deb: &std::path::Path,
) -> Result<()> {
    lab.container_ok(host, nspawn, &["ip", "link", "del", MESH_IFACE])?;
    // meshd's table, where this host had one (only a firewalled mesh has it).
    lab.container_ok(
        host,
        nspawn,
        &[
            "sh",
            "-c",
            "if nft list table inet meshd >/dev/null 2>&1; then nft delete table inet meshd; fi",
        ],
    )?;
    lab.container_ok(COORDINATOR, coordinator, &["meshctl", "remove", host])?;
    // A new name: the coordinator's config pins the old name to its old address, and an
    // address once given is never given again (the invite under the old name says so).
    let name = format!("{host}-new");
    let invite = lab.container_ok(COORDINATOR, coordinator, &["meshctl", "invite", &name])?;
    let token = meshlab::coord::parse_token(&invite)?;
    std::fs::copy(deb, lab.container_root(host).join("root/meshd.deb"))
        .with_context(|| format!("copying {} into {host}'s root", deb.display()))?;
    let t = std::time::Instant::now();
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
            "/root/meshd.deb",
        ],
    )?;
    // The package starts meshd (it waits for the join); the join needs it answering.
    poll_until(
        TIMEOUT,
        &format!("meshctl status to answer on {host}"),
        || {
            Ok(lab
                .container_output(host, nspawn, &["meshctl", "status"])
                .is_ok_and(|o| meshlab::status_answered(&o)))
        },
    )?;
    let installed = t.elapsed();
    let joined = lab.container_input(
        host,
        nspawn,
        &["meshctl", "join", "-"],
        &format!("{token}\n"),
    )?;
    let address: std::net::Ipv4Addr = joined
        .split("with address ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address in meshctl join's answer: {joined}"))?;
    lab.wait_unit(host, nspawn, "meshd-online.target", TIMEOUT)?;
    let online = t.elapsed();
    pairs_ping_at(lab, host, address, TIMEOUT)?;
    let meshed = t.elapsed();
    println!(
        "apt install to a joined, ready {host} (as {name}, {address}): {} ms (apt install until meshctl answers {} ms, \
         meshctl join to meshd-online.target {} ms, then all its pairs ping {} ms)",
        meshed.as_millis(),
        installed.as_millis(),
        (online - installed).as_millis(),
        (meshed - online).as_millis()
    );
    Ok(())
}

/// `apt-get install` of `deb` over the installed package in `host`'s container while `from`
/// pings it every 10 ms and sends it a TCP stream; checks that meshd was restarted by the
/// upgrade (a new main PID, the new version installed) and kept its interface.
fn upgrade(
    lab: &Lab,
    host: &str,
    nspawn: meshlab::ProcId,
    deb: &std::path::Path,
    from: &str,
) -> Result<TrafficReport> {
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
    let traffic = Traffic::start(lab, from, host, 6)?;
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
    let t = traffic.finish()?;
    let new_version = version(lab)?;
    if new_version == old_version {
        bail!("{host} still has meshd {old_version} after the upgrade");
    }
    let index_after = lab.ifindex(host, MESH_IFACE)?;
    if index_after != index {
        bail!("the upgrade recreated {MESH_IFACE} on {host}: ifindex {index} -> {index_after}");
    }
    Ok(t)
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

/// Traffic across the mesh during a lifecycle step: a 10 ms ping and an iperf3 TCP stream
/// (100 ms intervals) from one lab host to another's mesh address. The stream is paced at
/// [`STREAM_MBIT`], well under what the userspace tunnel carries on a loaded 2-core CI
/// machine, so that a lost ping is the lifecycle step's doing and not a queue the stream
/// filled.
struct Traffic {
    ping: std::process::Child,
    client: std::process::Child,
    server: std::process::Child,
}

const STREAM_MBIT: u32 = 50;

/// What the traffic saw.
struct TrafficReport {
    sent: u32,
    lost: u32,
    /// The longest run of 100 ms intervals in which the stream moved no byte.
    stall_ms: u64,
    retransmits: u64,
    mbit_per_s: f64,
}

impl std::fmt::Display for TrafficReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} pings (10 ms) lost; TCP stream (paced at {STREAM_MBIT} Mbit/s) {:.0} Mbit/s, \
             longest stall {} ms, {} retransmits",
            self.lost, self.sent, self.mbit_per_s, self.stall_ms, self.retransmits
        )
    }
}

impl Traffic {
    /// Start both for `secs` seconds (the lab's iperf3 and ping, in the hosts' network
    /// namespaces, which the containers share).
    fn start(lab: &Lab, from: &str, to: &str, secs: u32) -> Result<Traffic> {
        let addr = lab.mesh_addr(to)?.to_string();
        let server = lab
            .command(to, &["iperf3", "--server", "--one-off", "--bind", &addr])?
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the iperf3 server")?;
        poll_until(
            Duration::from_secs(10),
            "the iperf3 server to listen",
            || {
                Ok(lab
                    .exec_ok(to, &["ss", "-Hltn", "sport = :5201"])?
                    .contains("5201"))
            },
        )?;
        let (secs, rate) = (secs.to_string(), format!("{STREAM_MBIT}M"));
        let ping = lab
            .command(
                from,
                &["ping", "-n", "-q", "-i", "0.01", "-w", &secs, &addr],
            )?
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ping")?;
        let client = lab
            .command(
                from,
                &[
                    "iperf3",
                    "--client",
                    &addr,
                    "--time",
                    &secs,
                    "--bitrate",
                    &rate,
                    "--interval",
                    "0.1",
                    "--json",
                ],
            )?
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the iperf3 client")?;
        Ok(Traffic {
            ping,
            client,
            server,
        })
    }

    /// Wait for the end of both.
    fn finish(self) -> Result<TrafficReport> {
        let Traffic {
            ping,
            client,
            mut server,
        } = self;
        let out = ping.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (sent, received) =
            ping_counts(&text).with_context(|| format!("no ping summary in {text:?}"))?;
        let out = client.wait_with_output()?;
        let _ = server.kill();
        let _ = server.wait();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "iperf3 printed no JSON: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let (stall_ms, retransmits, mbit_per_s) = stream_figures(&json)
            .with_context(|| format!("iperf3's JSON lacks intervals or totals: {json}"))?;
        Ok(TrafficReport {
            sent,
            lost: sent - received,
            stall_ms,
            retransmits,
            mbit_per_s,
        })
    }
}

/// From iperf3's JSON: the longest run of intervals with no byte moved (ms), the sender's
/// retransmits, and the mean throughput in Mbit/s.
fn stream_figures(json: &serde_json::Value) -> Option<(u64, u64, f64)> {
    let intervals = json.get("intervals")?.as_array()?;
    let (mut run, mut worst) = (0.0_f64, 0.0_f64);
    for i in intervals {
        let sum = i.get("sum")?;
        let seconds = sum.get("seconds")?.as_f64()?;
        if sum.get("bytes")?.as_u64()? == 0 {
            run += seconds;
            worst = worst.max(run);
        } else {
            run = 0.0;
        }
    }
    let sent = json.get("end")?.get("sum_sent")?;
    let retransmits = sent
        .get("retransmits")
        .and_then(|r| r.as_u64())
        .unwrap_or(0);
    let mbit = sent.get("bits_per_second")?.as_f64()? / 1e6;
    Some(((worst * 1000.0).round() as u64, retransmits, mbit))
}

/// A node of the K3s stand-in: meshd's K3s integration (`[integrations.k3s]` with this
/// body) renders the drop-in, and a unit of ours ordered after meshd-online.target
/// (`k3s-standin.service`, running meshlab's `flannel-standin`) reads `node-ip` and
/// `flannel-iface` from it and makes what flannel makes: `flannel.1` VXLAN from the mesh
/// address, `cni0` with `10.42.SUBNET.1/24`, and flannel's nftables chains. This kernel has no
/// vxlan module, so the stand-in encapsulates in user space (see its source).
struct K3sNode {
    host: &'static str,
    integration: &'static str,
    subnet: u8,
}

const K3S_DROPIN: &str = "/etc/rancher/k3s/config.yaml.d/90-meshd.yaml";

impl K3sNode {
    fn install(&self, lab: &Lab, nspawn: meshlab::ProcId, all: &[K3sNode]) -> Result<()> {
        let root = lab.container_root(self.host);
        std::fs::copy(
            env!("CARGO_BIN_EXE_flannel-standin"),
            root.join("usr/local/bin/flannel-standin"),
        )?;
        let mut argv = format!(
            "/usr/local/bin/flannel-standin --dropin {K3S_DROPIN} --subnet 10.42.{}.0/24",
            self.subnet
        );
        for other in all.iter().filter(|o| o.host != self.host) {
            argv.push_str(&format!(
                " --node 10.42.{}.0/24={}",
                other.subnet,
                lab.mesh_addr(other.host)?
            ));
        }
        let dir = root.join("etc/systemd/system");
        std::fs::write(
            dir.join("k3s-standin.service"),
            format!(
                "[Unit]\nDescription=K3s stand-in (flannel's objects from meshd's drop-in)\n\
                 Wants=meshd-online.target\nAfter=meshd-online.target\n\n\
                 [Service]\nExecStart={argv}\nRestart=on-failure\nRestartSec=1\n\n\
                 [Install]\nWantedBy=multi-user.target\n"
            ),
        )?;
        let wants = dir.join("multi-user.target.wants");
        std::fs::create_dir_all(&wants)?;
        let link = wants.join("k3s-standin.service");
        if !link.exists() {
            std::os::unix::fs::symlink("/etc/systemd/system/k3s-standin.service", link)?;
        }
        // The operator's part, as the conffile says: the directory first (the unit's sandbox
        // only opens paths that exist when meshd starts), then the integration, then a restart.
        let script = format!(
            "set -e; mkdir -p /etc/rancher/k3s/config.yaml.d; \
             printf '\\n[integrations.k3s]\\n%s\\n' '{}' >> /etc/meshd/meshd.toml; \
             systemctl daemon-reload; systemctl restart meshd",
            self.integration
        );
        lab.container_ok(self.host, nspawn, &["sh", "-c", &script])?;
        lab.wait_unit(self.host, nspawn, "meshd-online.target", TIMEOUT)?;
        let mesh = lab.mesh_addr(self.host)?;
        poll_until(
            TIMEOUT,
            &format!("meshd's K3s drop-in on {}", self.host),
            || {
                let out = lab.container_output(self.host, nspawn, &["cat", K3S_DROPIN])?;
                let text = String::from_utf8_lossy(&out.stdout);
                Ok(text.contains(&format!("node-ip: {mesh}\n"))
                    && text.contains(&format!("flannel-iface: {MESH_IFACE}\n")))
            },
        )?;
        lab.container_ok(self.host, nspawn, &["systemctl", "start", "k3s-standin"])?;
        lab.wait_unit(self.host, nspawn, "k3s-standin.service", TIMEOUT)?;
        poll_until(TIMEOUT, &format!("flannel.1 on {}", self.host), || {
            Ok(!lab
                .container_output(
                    self.host,
                    nspawn,
                    &["ip", "route", "show", "dev", "flannel.1"],
                )?
                .stdout
                .is_empty())
        })?;
        Ok(())
    }

    /// What flannel made, as `ip` and `nft` print it (without ifindexes and counters), and
    /// meshd's drop-in.
    /// [`Self::objects`] once the kernel has finished duplicate address detection on the new
    /// devices' IPv6 link-local addresses (until then `ip addr` marks them `tentative`, a
    /// flag that goes away by itself and is no change of ours or flannel's).
    fn settled_objects(&self, lab: &Lab, nspawn: meshlab::ProcId) -> Result<Vec<String>> {
        poll_for(
            Duration::from_secs(10),
            &format!("DAD to finish on flannel.1 and cni0 on {}", self.host),
            || {
                let objects = self.objects(lab, nspawn)?;
                Ok((!objects.iter().any(|l| l.contains(" tentative"))).then_some(objects))
            },
        )
    }

    fn objects(&self, lab: &Lab, nspawn: meshlab::ProcId) -> Result<Vec<String>> {
        let script = format!(
            "set -e; for d in flannel.1 cni0; do ip -o link show dev $d | sed 's/^[0-9]*: //'; \
             ip -o addr show dev $d | sed 's/^[0-9]*: //'; ip route show dev $d; done; \
             ip neigh show dev flannel.1 nud permanent; \
             nft -s list chain ip filter FORWARD; nft -s list chain ip filter FLANNEL-FWD; \
             nft -s list chain ip nat POSTROUTING; nft -s list chain ip nat FLANNEL-POSTRTG; \
             cat {K3S_DROPIN}"
        );
        Ok(lab
            .container_ok(self.host, nspawn, &["sh", "-c", &script])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Pings from this node's cni0 address to the other's, through flannel.1: VXLAN to the
    /// other node's mesh address. Returns the pings answered and how many bytes more left
    /// through the mesh interface meanwhile (at least the encapsulated echo requests).
    fn vxlan_ping(
        &self,
        lab: &Lab,
        nspawn: meshlab::ProcId,
        other: &K3sNode,
    ) -> Result<(u32, u64)> {
        let tx = |l: &Lab| -> Result<u64> {
            Ok(l.container_ok(
                self.host,
                nspawn,
                &[
                    "cat",
                    &format!("/sys/class/net/{MESH_IFACE}/statistics/tx_bytes"),
                ],
            )?
            .trim()
            .parse()?)
        };
        let before = tx(lab)?;
        let (from, to) = (
            format!("10.42.{}.1", self.subnet),
            format!("10.42.{}.1", other.subnet),
        );
        // The lab's ping in the host's network namespace, which the container shares (the
        // container's minimal root has none).
        let out = lab
            .command(
                self.host,
                &[
                    "ping", "-n", "-q", "-c", "10", "-i", "0.05", "-W", "2", "-s", "1000", "-I",
                    &from, &to,
                ],
            )?
            .output()
            .context("running ping")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (sent, received) =
            ping_counts(&text).with_context(|| format!("no ping summary in {text:?}"))?;
        if received == 0 {
            bail!(
                "no pod-to-pod ping from {from} on {} to {to} on {} crossed: {text}",
                self.host,
                other.host
            );
        }
        let more = tx(lab)? - before;
        if more < u64::from(received) * 1000 {
            bail!("{received} pings of 1000 bytes from {from} to {to} crossed, but only {more} bytes left through {MESH_IFACE}");
        }
        let _ = sent;
        Ok((received, more))
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
    pairs_ping_at(lab, host, lab.mesh_addr(host)?, timeout)
}

/// [`pairs_ping`] for `host` at mesh address `own`.
fn pairs_ping_at(lab: &Lab, host: &str, own: std::net::Ipv4Addr, timeout: Duration) -> Result<()> {
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
