//! The coordinator moves to a replacement host (docs/OPERATIONS.md, "Backup and disaster
//! recovery"), done the way that section tells an operator:
//!
//! 1. a managed fleet: the coordinator on dock-load (public), dock-prod (public), dock-mirror
//!    and dock-edge behind the home NAT, the NAS as a static peer behind the same NAT; every
//!    pair pings;
//! 2. the coordinator is backed up while it runs: `sqlite3 coordinator.db ".backup COPY"`,
//!    `meshd.toml` and `private.key`, into a directory off the host (mode 0600, root);
//! 3. the coordinator's host dies: its underlay is cut (nothing more leaves it), meshd is
//!    SIGKILLed by PID, then the host itself (its namespaces, processes, interfaces and link)
//!    goes away;
//! 4. meanwhile every member notices the coordinator is unreachable and every pair of the rest
//!    still pings (their cached netmaps);
//! 5. a replacement host with the same public address and empty `/etc/meshd` and
//!    `/var/lib/meshd` gets the three files back (same paths, owners and modes) and starts
//!    meshd; every pair pings again (the time from its start is printed), `meshctl hosts` lists
//!    every host with the same address and key, a new host joins with a fresh invitation and
//!    pings everyone, a member behind the NAT rotates its key and its peers follow, and the
//!    NAS, given `meshctl static-config` of the new coordinator, reaches the new host and the
//!    rotated one.
//!
//! Needs meshd, meshctl and meshd-wg next to the test binary (or in `$MESHLAB_BIN_DIR`),
//! sqlite3, wg-quick and wireguard-go (tests/deps.sh installs them): `cargo build --workspace
//! --bins && cargo test -p meshlab --test coordinator_move -- --nocapture` (as root). Figures
//! are printed with `eprintln!` (`MEASURED ...`).

use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use meshlab::coord::DATABASE;
use meshlab::fleet::{CONFIG_PATH, KEY_PATH};
use meshlab::{poll_for, HostEntry, JoinMode, Lab, LabOpts, ManagedFleet, COORDINATOR, NAS};
use serde_json::Value;

const PROD: &str = "dock-prod";
const MIRROR: &str = "dock-mirror";
const EDGE: &str = "dock-edge";
/// The host that joins the moved coordinator.
const DASH: &str = "dock-dash";
/// The meshd members of the fleet before the move.
const MEMBERS: [&str; 3] = [PROD, MIRROR, EDGE];
/// The fleet before the move: the coordinator, the members, the NAS.
const FLEET: [&str; 5] = [COORDINATOR, PROD, MIRROR, EDGE, NAS];
/// Every meshd host after the move (the new one included).
const DAEMONS: [&str; 5] = [COORDINATOR, PROD, MIRROR, EDGE, DASH];
/// Every host of the lab.
const LAB_HOSTS: [&str; 6] = [COORDINATOR, PROD, MIRROR, EDGE, DASH, NAS];
const LOAD_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

/// The fleet forms within this.
const MESH_TIMEOUT: Duration = Duration::from_secs(90);
/// Every member reports the dead coordinator unreachable within this (a long-poll is 25 s,
/// plus its 10 s grace and a connect timeout).
const NOTICE_TIMEOUT: Duration = Duration::from_secs(120);
/// With the coordinator gone, the pairs that pinged keep pinging within this.
const DOWN_TIMEOUT: Duration = Duration::from_secs(15);
/// After the replacement's meshd starts, every pair pings within this.
const MOVE_TIMEOUT: Duration = Duration::from_secs(90);
/// Joins, rotations and their settling, after the move.
const SETTLE: Duration = Duration::from_secs(60);

/// The three files of the procedure: where they live on the coordinator, their name in the
/// backup.
const FILES: [(&str, &str); 3] = [
    (DATABASE, "coordinator.db"),
    (CONFIG_PATH, "meshd.toml"),
    (KEY_PATH, "private.key"),
];

fn serial() -> std::sync::MutexGuard<'static, ()> {
    meshlab::one_lab_at_a_time()
}

/// Every ordered pair of `hosts`.
fn pairs<'a>(hosts: &[&'a str]) -> Vec<(&'a str, &'a str)> {
    hosts
        .iter()
        .flat_map(|a| hosts.iter().map(move |b| (*a, *b)))
        .filter(|(a, b)| a != b)
        .collect()
}

/// `meshctl status --json` of `host`.
fn status(lab: &Lab, host: &str) -> Result<Value> {
    let json = lab.status(host, &["--json"])?;
    serde_json::from_str(&json).with_context(|| format!("[{host}] meshctl status --json: {json}"))
}

/// Whether `host`'s meshd says the coordinator is reachable (`None`: not said).
fn coordinator_reachable(lab: &Lab, host: &str) -> Result<Option<bool>> {
    Ok(status(lab, host)?
        .get("coordinator")
        .and_then(|c| c.get("reachable"))
        .and_then(Value::as_bool))
}

/// `stat` of `paths` in `host`: one "MODE OWNER:GROUP" per path.
fn modes(lab: &Lab, host: &str, paths: &[&str]) -> Result<Vec<String>> {
    let mut argv = vec!["stat", "-c", "%a %U:%G"];
    argv.extend_from_slice(paths);
    Ok(lab
        .exec_ok(host, &argv)?
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Until each of `hosts` says the coordinator is `reachable`, at most `t` after `t0`: when
/// each did (after `t0`).
fn wait_reachable(
    lab: &Lab,
    hosts: &[&str],
    reachable: bool,
    t0: Instant,
    t: Duration,
) -> Result<Vec<(String, Duration)>> {
    let mut took = Vec::new();
    for h in hosts {
        poll_for(
            t.saturating_sub(t0.elapsed()),
            &format!("{h} to report the coordinator reachable={reachable}"),
            || Ok((coordinator_reachable(lab, h)? == Some(reachable)).then_some(())),
        )?;
        took.push((h.to_string(), t0.elapsed()));
    }
    Ok(took)
}

/// How long after `t0` each of `pairs` first pings (each polled in its own thread until
/// `timeout` after `t0`).
fn time_pairs(
    lab: &Lab,
    pairs: &[(&str, &str)],
    t0: Instant,
    timeout: Duration,
) -> Result<Vec<(String, Duration)>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|&(a, b)| {
                s.spawn(move || -> Result<(String, Duration)> {
                    let addr = lab.mesh_addr(b)?;
                    loop {
                        if lab.ping(a, addr)? {
                            return Ok((format!("{a}->{b}"), t0.elapsed()));
                        }
                        if t0.elapsed() > timeout {
                            bail!("{a} did not ping {b} ({addr}) within {timeout:?}");
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                })
            })
            .collect();
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for h in handles {
            match h.join() {
                Ok(Ok(r)) => done.push(r),
                Ok(Err(e)) => failed.push(format!("{e:#}")),
                Err(_) => failed.push("a ping thread panicked".into()),
            }
        }
        ensure!(
            failed.is_empty(),
            "{} of {} pairs failed:\n  {}",
            failed.len(),
            pairs.len(),
            failed.join("\n  ")
        );
        Ok(done)
    })
}

fn secs(times: &[(String, Duration)]) -> String {
    times
        .iter()
        .map(|(h, d)| format!("{h} {:.1} s", d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn coordinator_moves_to_a_replacement_host_from_its_backup() -> Result<()> {
    let _g = serial();
    let mut lab = Lab::build(LabOpts::with_hosts(&LAB_HOSTS))?;
    let r = move_coordinator(&mut lab);
    lab.with_logs(&DAEMONS, r)
}

fn move_coordinator(lab: &mut Lab) -> Result<()> {
    let started = Instant::now();
    // 1. The fleet: both ways of joining, members on both sides of the NAT, the NAS.
    let engine = meshlab::engine_command(lab.bin_dir());
    let mut f = ManagedFleet::default();
    f.meshd
        .insert(COORDINATOR.into(), lab.start_coordinator(&engine)?);
    for (h, mode) in [
        (PROD, JoinMode::Command),
        (MIRROR, JoinMode::Command),
        (EDGE, JoinMode::TokenFile),
    ] {
        let token = lab.invite(h, &[])?;
        f.meshd.insert(h.into(), lab.join_host(h, &token, mode)?);
        f.members.push(h.into());
    }
    let nas_conf = lab.invite_nas()?;
    lab.start_static_peer(NAS, &nas_conf)?;
    let t0 = Instant::now();
    lab.wait_pair_pings(&pairs(&FLEET), MESH_TIMEOUT)?;
    eprintln!(
        "MEASURED fleet: {} pairs ping {:.1} s after the NAS came up",
        pairs(&FLEET).len(),
        t0.elapsed().as_secs_f64()
    );
    let before = lab.registry()?;
    let hosts_before = lab.meshctl(COORDINATOR, &["hosts"])?;
    let load_key = lab.device_key(COORDINATOR)?;
    ensure!(
        before.len() == FLEET.len(),
        "the registry should hold the {} hosts of the fleet: {before:?}",
        FLEET.len()
    );
    eprintln!("$ meshctl hosts (dock-load, before)\n{hosts_before}");

    // 2. The backup, while meshd runs, into a directory off the host.
    let backup = lab.dir().join("coordinator-backup");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&backup)
        .with_context(|| format!("creating {}", backup.display()))?;
    let dir = backup
        .to_str()
        .filter(|s| !s.contains(['\'', '"', ' ', '\\']))
        .ok_or_else(|| anyhow!("{} cannot be quoted for sqlite3", backup.display()))?
        .to_owned();
    let sqlite = lab.exec(COORDINATOR, &["sh", "-c", "command -v sqlite3"])?;
    ensure!(
        sqlite.status.success(),
        "sqlite3 is missing: the documented online backup needs it (apt-get install sqlite3; \
         tests/deps.sh installs it)"
    );
    let originals: Vec<&str> = FILES.iter().map(|(p, _)| *p).collect();
    let original_modes = modes(lab, COORDINATOR, &originals)?;
    eprintln!(
        "on {COORDINATOR} before the backup:\n{}",
        lab.sh(COORDINATOR, "ls -la /etc/meshd /var/lib/meshd")?
    );
    let version_at_backup = status(lab, COORDINATOR)?.get("netmap_version").cloned();
    lab.sh(
        COORDINATOR,
        &format!(
            "umask 077 && sqlite3 {DATABASE} \".backup '{dir}/coordinator.db'\" && \
             cp {CONFIG_PATH} {KEY_PATH} '{dir}/' && chmod 0600 '{dir}'/*"
        ),
    )?;
    ensure!(
        lab.is_running(f.meshd[COORDINATOR]),
        "the coordinator's meshd stopped during the backup"
    );
    let check = lab.sh(
        COORDINATOR,
        &format!("sqlite3 '{dir}/coordinator.db' 'PRAGMA integrity_check'"),
    )?;
    ensure!(
        check.trim() == "ok",
        "the backup copy fails its integrity check: {check}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&backup)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    ensure!(
        names == ["coordinator.db", "meshd.toml", "private.key"],
        "the backup directory holds {names:?}"
    );
    for (_, name) in FILES {
        let m = std::fs::metadata(backup.join(name))?;
        ensure!(
            m.mode() & 0o777 == 0o600 && m.uid() == 0,
            "{name} in the backup has mode {:o}, uid {}",
            m.mode() & 0o777,
            m.uid()
        );
    }

    // 3. The coordinator's host dies: meshd by its PID, then the host and all it ran.
    let version_at_death = status(lab, COORDINATOR)?.get("netmap_version").cloned();
    eprintln!(
        "coordinator netmap version at the backup {version_at_backup:?}, at its death {version_at_death:?}"
    );
    // Like a power cut: nothing more leaves the host (no FIN for the members' connections to
    // its API), then its meshd is killed by PID and the host is taken away.
    lab.cut_underlay(COORDINATOR)?;
    let dead = Instant::now();
    lab.stop_meshd(f.meshd[COORDINATOR], libc::SIGKILL)?;
    f.meshd.remove(COORDINATOR);
    let old_state = lab.destroy_host(COORDINATOR)?;
    eprintln!(
        "{COORDINATOR} destroyed (its old state moved to {})",
        old_state.display()
    );
    ensure!(
        lab.exec(COORDINATOR, &["true"]).is_err(),
        "{COORDINATOR} can still be entered"
    );
    ensure!(
        !lab.ping(PROD, LOAD_UNDERLAY)?,
        "{LOAD_UNDERLAY} still answers on the underlay"
    );
    ensure!(
        !lab.ping(PROD, lab.mesh_addr(COORDINATOR)?)?,
        "the coordinator's mesh address still answers"
    );

    // 4. Meanwhile the rest of the fleet keeps pinging, at once and once every member has
    // noticed that the coordinator is gone.
    let rest = [PROD, MIRROR, EDGE, NAS];
    lab.wait_pair_pings(&pairs(&rest), DOWN_TIMEOUT)
        .context("right after the coordinator died")?;
    let noticed = wait_reachable(lab, &MEMBERS, false, dead, NOTICE_TIMEOUT)?;
    eprintln!(
        "MEASURED coordinator down: members reported it unreachable {} after its death",
        secs(&noticed)
    );
    let t1 = Instant::now();
    lab.wait_pair_pings(&pairs(&rest), DOWN_TIMEOUT)?;
    for h in MEMBERS {
        let peers = lab.wg_peers(h)?;
        ensure!(
            peers.contains(&load_key),
            "{h} dropped the coordinator's peer while it was away: {peers:?}"
        );
    }
    eprintln!(
        "MEASURED coordinator down: {} pairs of the rest ping ({:.1} s to check) {:.1} s after its death",
        pairs(&rest).len(),
        t1.elapsed().as_secs_f64(),
        dead.elapsed().as_secs_f64()
    );

    // 5. The replacement: same public address, nothing of the old host.
    lab.replace_host(COORDINATOR)?;
    let leftovers = lab.exec_ok(
        COORDINATOR,
        &["find", "/etc/meshd", "/var/lib/meshd", "-mindepth", "1"],
    )?;
    ensure!(
        leftovers.trim().is_empty(),
        "the replacement is not empty: {leftovers}"
    );
    ensure!(
        lab.exec(COORDINATOR, &["ip", "link", "show", meshlab::MESH_IFACE])?
            .status
            .code()
            != Some(0),
        "the replacement already has {}",
        meshlab::MESH_IFACE
    );
    // The three files back in place, with the originals' owners and modes.
    for ((path, name), mode_owner) in FILES.iter().zip(&original_modes) {
        let (mode, owner) = mode_owner
            .split_once(' ')
            .ok_or_else(|| anyhow!("stat printed {mode_owner:?}"))?;
        let (user, group) = owner
            .split_once(':')
            .ok_or_else(|| anyhow!("stat printed {mode_owner:?}"))?;
        lab.exec_ok(
            COORDINATOR,
            &[
                "install",
                "-m",
                mode,
                "-o",
                user,
                "-g",
                group,
                &format!("{dir}/{name}"),
                path,
            ],
        )?;
    }
    ensure!(
        modes(lab, COORDINATOR, &originals)? == original_modes,
        "restored modes differ: {:?} vs {original_modes:?}",
        modes(lab, COORDINATOR, &originals)?
    );
    let start = Instant::now();
    let p = lab.start_meshd(COORDINATOR)?;
    lab.wait_meshctl(COORDINATOR, p, &["hosts"], Duration::from_secs(30))?;
    f.meshd.insert(COORDINATOR.into(), p);
    let answering = start.elapsed();
    let (pings, api) = std::thread::scope(|s| {
        let api = s.spawn(|| wait_reachable(lab, &MEMBERS, true, start, MOVE_TIMEOUT));
        let pings = time_pairs(lab, &pairs(&FLEET), start, MOVE_TIMEOUT);
        (pings, api.join())
    });
    let mut pings = pings.context("after the move")?;
    let api = api
        .map_err(|_| anyhow!("the status poller panicked"))?
        .context("after the move")?;
    pings.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
    let all_ping = pings.first().map(|(_, d)| *d).unwrap_or_default();
    // The meshd hosts apart: the NAS (wireguard-go from a wg-quick file) has no daemon to
    // start a handshake, WireGuard's own timers bring it back.
    let daemons_ping = pings
        .iter()
        .find(|(p, _)| !p.split("->").any(|h| h == NAS))
        .map(|(_, d)| *d)
        .unwrap_or_default();
    eprintln!(
        "MEASURED move: the replacement's meshd answered meshctl hosts {:.2} s after its start; \
         the pairs of meshd hosts (members behind NAT included) ping {:.2} s after its start, \
         all {} pairs (the NAS too) {:.2} s after its start ({:.1} s after the old host died); \
         slowest pairs: {}; members reached its API after {} (from its start)",
        answering.as_secs_f64(),
        daemons_ping.as_secs_f64(),
        pings.len(),
        all_ping.as_secs_f64(),
        (dead.elapsed() - start.elapsed() + all_ping).as_secs_f64(),
        secs(&pings[..pings.len().min(6)]),
        secs(&api)
    );

    // The registry came back whole: every host, same address and key; same coordinator key.
    let after = lab.registry()?;
    let hosts_after = lab.meshctl(COORDINATOR, &["hosts"])?;
    eprintln!("$ meshctl hosts (the replacement)\n{hosts_after}");
    ensure!(
        after == before,
        "the registry changed in the move:\nbefore {before:?}\nafter  {after:?}"
    );
    for h in &before {
        ensure!(
            hosts_after.contains(&h.name) && hosts_after.contains(&h.address),
            "meshctl hosts on the replacement does not list {} at {}",
            h.name,
            h.address
        );
    }
    ensure!(
        lab.device_key(COORDINATOR)? == load_key,
        "the replacement runs another key"
    );

    // A fresh invitation, and a new (public) host joins and pings every daemon host.
    let token = lab.invite(DASH, &[])?;
    let j0 = Instant::now();
    f.meshd
        .insert(DASH.into(), lab.join_host(DASH, &token, JoinMode::Command)?);
    let joined: Vec<(&str, &str)> = DAEMONS
        .iter()
        .filter(|h| **h != DASH)
        .flat_map(|h| [(*h, DASH), (DASH, *h)])
        .collect();
    lab.wait_pair_pings(&joined, SETTLE)?;
    let dash = entry(&lab.registry()?, DASH)?;
    ensure!(
        dash.address == lab.mesh_addr(DASH)?.to_string() && !dash.removed,
        "{DASH} in the registry: {dash:?}"
    );
    eprintln!(
        "MEASURED join after the move: {DASH} joined and pings the {} daemon hosts both ways {:.2} s after its meshd started",
        DAEMONS.len() - 1,
        j0.elapsed().as_secs_f64()
    );

    // A member behind the NAT rotates its key; the registry and its peers follow.
    let old_key = lab.registry_key(EDGE)?;
    let r0 = Instant::now();
    let reply = meshlab::check_output(
        lab.meshctl_output(EDGE, &["rotate"])?,
        "[dock-edge] meshctl rotate",
    )?;
    eprintln!("meshctl rotate on {EDGE}: {}", reply.trim());
    let new_key = lab.wait_key_consistent(EDGE, &DAEMONS, SETTLE)?;
    ensure!(new_key != old_key, "{EDGE}'s key did not change");
    lab.wait_pair_pings(&pairs(&DAEMONS), SETTLE)?;
    eprintln!(
        "MEASURED rotation after the move: {EDGE}'s new key in the registry and every peer, and all {} daemon pairs ping, {:.2} s after meshctl rotate",
        pairs(&DAEMONS).len(),
        r0.elapsed().as_secs_f64()
    );

    // The NAS follows from the new coordinator's `meshctl static-config` (its own key filled
    // in, as its operator would): it then reaches the new host and the rotated one.
    update_nas(lab)?;
    lab.wait_pair_pings(&pairs(&LAB_HOSTS), SETTLE)?;
    eprintln!(
        "MEASURED all {} pairs of the {} hosts ping after the NAS took meshctl static-config; the whole test took {:.0} s",
        pairs(&LAB_HOSTS).len(),
        LAB_HOSTS.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn entry(reg: &[HostEntry], name: &str) -> Result<HostEntry> {
    reg.iter()
        .find(|h| h.name == name)
        .cloned()
        .ok_or_else(|| anyhow!("{name} is not in the registry: {reg:?}"))
}

/// `meshctl static-config nas` on the coordinator, with the NAS's own private key put in for
/// the placeholder, applied to its running interface (`wg syncconf`).
fn update_nas(lab: &Lab) -> Result<()> {
    let old = lab.read_file(NAS, meshlab::coord::WG_QUICK_CONF)?;
    let private = old
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "PrivateKey").then(|| v.trim().to_owned())
        })
        .ok_or_else(|| anyhow!("the NAS's config has no PrivateKey"))?;
    let conf = lab.meshctl(COORDINATOR, &["static-config", NAS])?;
    let mut placed = false;
    let conf: String = conf
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("# PrivateKey") {
                placed = true;
                format!("PrivateKey = {private}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    if !placed && !conf.contains("PrivateKey = ") {
        bail!("meshctl static-config {NAS} has no PrivateKey line:\n{conf}");
    }
    lab.write_file_mode(NAS, meshlab::coord::WG_QUICK_CONF, conf.as_bytes(), 0o600)?;
    let path = Path::new(meshlab::coord::WG_QUICK_CONF);
    lab.sh(
        NAS,
        &format!(
            "set -e; wg-quick strip {p} > /run/nas.stripped; wg syncconf {i} /run/nas.stripped; rm -f /run/nas.stripped",
            p = path.display(),
            i = meshlab::MESH_IFACE
        ),
    )?;
    Ok(())
}
