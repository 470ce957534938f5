//! Rotations asked for from elsewhere or at a bad time (issue 6, deliverables 1 and 3):
//! `meshctl rotate NAME` on the coordinator or an admin host makes that host rotate, at once or
//! when it comes back (an unknown name, a static peer, or a non-admin asking is refused and
//! changes nothing; a host's own rotation names the static peers to update); `meshctl rotate`
//! on a member while the coordinator is down is deferred, keeps its next key, and completes by
//! itself once the coordinator is back.
//!
//! Needs meshd, meshctl and meshd-wg next to the test binary (or in `$MESHLAB_BIN_DIR`), `wg`,
//! `wireguard-go` and `ping`: `cargo build --workspace --bins && cargo test -p meshlab --test
//! rotation_requests -- --test-threads=1 --nocapture` (as root).

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use meshlab::{poll_for, JoinMode, Lab, LabOpts, ManagedFleet, COORDINATOR, NAS};

const MESH_TIMEOUT: Duration = Duration::from_secs(90);
/// The named host rotates within this.
const ASKED_ROTATION: Duration = Duration::from_secs(10);
/// A deferred rotation completes within this after the coordinator is back.
const DEFERRED_ROTATION: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(30);
const PROD: &str = "dock-prod";
const MIRROR: &str = "dock-mirror";
const HOSTS: [&str; 3] = [COORDINATOR, PROD, MIRROR];

fn serial() -> std::sync::MutexGuard<'static, ()> {
    meshlab::one_lab_at_a_time()
}

/// The coordinator, dock-prod, and dock-mirror (an admin host with `admin`).
fn fleet(admin: bool) -> Result<(Lab, ManagedFleet)> {
    let lab = Lab::build(LabOpts::with_hosts(&HOSTS))?;
    let engine = meshlab::engine_command(lab.bin_dir());
    let mut f = ManagedFleet::default();
    f.meshd
        .insert(COORDINATOR.into(), lab.start_coordinator(&engine)?);
    for h in [PROD, MIRROR] {
        let extra: &[&str] = if admin && h == MIRROR {
            &["--admin"]
        } else {
            &[]
        };
        let token = lab.invite(h, extra)?;
        f.meshd
            .insert(h.into(), lab.join_host(h, &token, JoinMode::Command)?);
        f.members.push(h.into());
    }
    lab.wait_mesh_pings(&HOSTS, MESH_TIMEOUT)?;
    Ok((lab, f))
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn rotate_name_reaches_the_host_even_offline_and_bad_names_are_refused() -> Result<()> {
    let _g = serial();
    let (lab, mut f) = fleet(true)?;
    let r = rotate_by_name(&lab).and_then(|()| ask_offline_host(&lab, &mut f));
    drop(f);
    lab.with_logs(&HOSTS, r)
}

/// `meshctl rotate TARGET` on `from`: the reply comes at once, the target's key changes in the
/// registry within [`ASKED_ROTATION`], then everything agrees and every pair pings.
fn ask_rotation(lab: &Lab, from: &str, target: &str) -> Result<()> {
    let before = lab.registry_key(target)?;
    let t0 = Instant::now();
    let out = lab.meshctl_output(from, &["rotate", target])?;
    let answered = t0.elapsed();
    assert!(
        out.status.success(),
        "meshctl rotate {target} on {from} failed: {}",
        text(&out)
    );
    let reply = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        reply.contains(&format!("asked {target} to rotate its key")),
        "unexpected reply: {reply}"
    );
    let after = poll_for(
        ASKED_ROTATION,
        &format!("{target}'s key to change in the registry"),
        || {
            let k = lab.registry_key(target)?;
            Ok((k != before).then_some(k))
        },
    )?;
    let rotated = t0.elapsed();
    assert_eq!(lab.wait_key_consistent(target, &HOSTS, SETTLE)?, after);
    lab.wait_mesh_pings(&HOSTS, SETTLE)?;
    eprintln!(
        "MEASURED meshctl rotate {target} on {from}: answered in {:.0} ms, the registry had {target}'s new key after {:.2} s, all pairs ping after {:.2} s",
        answered.as_secs_f64() * 1000.0,
        rotated.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn rotate_by_name(lab: &Lab) -> Result<()> {
    ask_rotation(lab, COORDINATOR, PROD)?;
    // dock-mirror is an admin host: it may ask too (relayed to the coordinator).
    ask_rotation(lab, MIRROR, PROD)?;

    // A static peer (the NAS, registered with its public key; it need not run here).
    let (_nas_private, nas_public) = meshlab::generate_keypair();
    lab.meshctl(
        COORDINATOR,
        &["invite", NAS, "--static", "--public-key", &nas_public],
    )?;
    let registry = lab.registry()?;
    let keys: Vec<(String, String)> = HOSTS
        .iter()
        .map(|h| Ok((h.to_string(), lab.key_files(h)?.current.unwrap_or_default())))
        .collect::<Result<_>>()?;
    // Refused: an unknown name, a static peer, and any name asked by a host that is not an
    // admin (dock-prod).
    for (from, name) in [
        (COORDINATOR, "no-such-host"),
        (COORDINATOR, NAS),
        (PROD, MIRROR),
    ] {
        let out = lab.meshctl_output(from, &["rotate", name])?;
        eprintln!(
            "meshctl rotate {name} on {from}: {:?}: {}",
            out.status.code(),
            text(&out).trim()
        );
        assert!(
            !out.status.success(),
            "meshctl rotate {name} on {from} succeeded: {}",
            text(&out)
        );
    }
    // Nothing changed: the registry, and every host's key file (no next key anywhere).
    assert_eq!(
        lab.registry()?,
        registry,
        "a refused rotate changed the registry"
    );
    for (h, k) in &keys {
        let files = lab.key_files(h)?;
        assert_eq!(files.current.as_ref(), Some(k), "{h}'s key changed");
        assert_eq!(
            files.next, None,
            "{h} has a next key after a refused rotate"
        );
    }
    assert!(
        lab.registry()?
            .iter()
            .any(|h| h.name == NAS && h.static_peer && h.public_key == nas_public),
        "the NAS's entry changed"
    );
    lab.wait_mesh_pings(&HOSTS, SETTLE)?;

    // An operator's own `meshctl rotate` on a host with a static peer goes ahead and names
    // the static peer to update; `meshctl static-config` then has the new key.
    let out = lab.meshctl_output(PROD, &["rotate"])?;
    let reply = meshlab::check_output(out, "[dock-prod] meshctl rotate")?;
    eprintln!(
        "meshctl rotate on {PROD} with a static peer: {}",
        reply.trim()
    );
    assert!(
        reply.contains(NAS),
        "the reply does not name the static peer {NAS} to update: {reply}"
    );
    let prod_key = lab.wait_key_consistent(PROD, &HOSTS, SETTLE)?;
    let conf = lab.meshctl(COORDINATOR, &["static-config", NAS])?;
    assert!(
        conf.contains(&prod_key),
        "meshctl static-config {NAS} lacks {PROD}'s new key {prod_key}:\n{conf}"
    );
    Ok(())
}

/// `meshctl rotate NAME` for a host whose meshd is down: the request waits in its netmap and
/// the host rotates once it is back.
fn ask_offline_host(lab: &Lab, f: &mut ManagedFleet) -> Result<()> {
    let before = lab.registry_key(MIRROR)?;
    lab.stop_meshd(f.meshd[MIRROR], libc::SIGTERM)?;
    let out = lab.meshctl_output(COORDINATOR, &["rotate", MIRROR])?;
    assert!(
        out.status.success(),
        "meshctl rotate {MIRROR} (offline) on the coordinator failed: {}",
        text(&out)
    );
    assert_eq!(
        lab.registry_key(MIRROR)?,
        before,
        "{MIRROR}'s key changed while its meshd was down"
    );
    let t0 = Instant::now();
    f.meshd.insert(MIRROR.into(), lab.start_meshd(MIRROR)?);
    let after = poll_for(
        SETTLE,
        &format!("{MIRROR} to rotate after its return"),
        || {
            let k = lab.registry_key(MIRROR)?;
            Ok((k != before).then_some(k))
        },
    )?;
    let rotated = t0.elapsed();
    assert_eq!(lab.wait_key_consistent(MIRROR, &HOSTS, SETTLE)?, after);
    lab.wait_mesh_pings(&HOSTS, SETTLE)?;
    eprintln!(
        "MEASURED {MIRROR}, asked to rotate while its meshd was down, rotated {:.2} s after it started; all pairs ping after {:.2} s",
        rotated.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// History: on main f51f44a this took about 42 s (a member noticed the coordinator was back
/// only when its 25 s long-poll returned; fixed by 776a58b), then about 17 s (the restarted
/// coordinator removed and re-added every peer, dropping their sessions for about 15 s; fixed
/// by 77d3f54). "pinged the restarted coordinator" is printed to catch the latter.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn rotation_asked_while_the_coordinator_is_down_is_deferred_then_completes() -> Result<()> {
    let _g = serial();
    let (lab, mut f) = fleet(false)?;
    let r = deferred(&lab, &mut f);
    drop(f);
    lab.with_logs(&HOSTS, r)
}

fn deferred(lab: &Lab, f: &mut ManagedFleet) -> Result<()> {
    let before = lab
        .key_files(PROD)?
        .current
        .ok_or_else(|| anyhow!("{PROD} has no key file"))?;

    lab.stop_meshd(f.meshd[COORDINATOR], libc::SIGTERM)?;
    let out = lab.meshctl_output(PROD, &["rotate"])?;
    assert!(
        out.status.success(),
        "meshctl rotate with the coordinator down failed: {}",
        text(&out)
    );
    let reply = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("meshctl rotate with the coordinator down: {}", reply.trim());
    assert!(
        reply.contains("deferred"),
        "the reply does not say the rotation is deferred: {reply}"
    );
    let files = lab.key_files(PROD)?;
    assert_eq!(
        files.current.as_ref(),
        Some(&before),
        "the key changed while the coordinator was down"
    );
    let kept = files
        .next
        .ok_or_else(|| anyhow!("{PROD} kept no next key for the deferred rotation"))?;

    let t0 = Instant::now();
    let p = lab.start_meshd(COORDINATOR)?;
    lab.wait_meshctl(COORDINATOR, p, &["hosts"], Duration::from_secs(30))?;
    f.meshd.insert(COORDINATOR.into(), p);
    // How long the members' tunnels to the restarted coordinator take to carry traffic again
    // (printed: it bounds how soon a member can notice that the coordinator is back).
    let back = lab.time_until_reachable(
        &[PROD, MIRROR],
        lab.mesh_addr(COORDINATOR)?,
        DEFERRED_ROTATION * 2,
    )?;
    for (h, d) in &back {
        eprintln!(
            "MEASURED {h} pinged the restarted coordinator {:.2} s after its meshd started",
            d.as_secs_f64()
        );
    }
    // Waits past the budget so that a late completion is measured, then holds it to the
    // budget.
    let after = poll_for(
        DEFERRED_ROTATION * 3,
        &format!("the deferred rotation of {PROD} to reach the registry"),
        || {
            let k = lab.registry_key(PROD)?;
            Ok((k != before).then_some(k))
        },
    )?;
    let registered = t0.elapsed();
    assert_eq!(
        after, kept,
        "the deferred rotation did not use the kept next key"
    );
    assert_eq!(lab.wait_key_consistent(PROD, &HOSTS, SETTLE)?, kept);
    lab.wait_mesh_pings(&HOSTS, SETTLE)?;
    let settled = t0.elapsed();
    eprintln!(
        "MEASURED deferred rotation: the registry had {PROD}'s new key {:.2} s after the coordinator's meshd started, one key file and all pairs ping after {:.2} s (budget {DEFERRED_ROTATION:?})",
        registered.as_secs_f64(),
        settled.as_secs_f64()
    );
    ensure!(
        settled <= DEFERRED_ROTATION,
        "the deferred rotation completed {:.1} s after the coordinator came back, past the {DEFERRED_ROTATION:?} budget",
        settled.as_secs_f64()
    );
    Ok(())
}

/// `meshctl doctor` on `host`: its report, whatever its exit status (it fails on warnings).
fn doctor(lab: &Lab, host: &str) -> Result<String> {
    Ok(text(&lab.meshctl_output(host, &["doctor"])?))
}

/// The schedule (issue 6, deliverables 1 and 4): a key past `rotate_every_days` (30 by default;
/// the key file's age is its mtime, set 40 days back here) is rotated by the daemon's periodic
/// check without anyone asking, unless a static peer lists the key by hand: then the rotation
/// is held, the log and `meshctl doctor` say so, and the key stays. `meshctl doctor` warns
/// while the key is past its schedule and stops once it rotated.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn scheduled_rotation_runs_when_due_and_is_held_by_a_static_peer() -> Result<()> {
    let _g = serial();
    let (lab, mut f) = fleet(false)?;
    let r = scheduled(&lab, &mut f);
    drop(f);
    lab.with_logs(&HOSTS, r)
}

fn scheduled(lab: &Lab, f: &mut ManagedFleet) -> Result<()> {
    const HELD_LOG: &str = "scheduled key rotation held";
    const PAST: &str = "past its rotation schedule";
    /// The daemon's periodic check (`member::ENDPOINT_CHECK`, 30 s), with room.
    const CHECK: Duration = Duration::from_secs(40);
    let key_path = meshlab::fleet::KEY_PATH;
    let before = lab.registry_key(PROD)?;

    // A static peer in everyone's netmap.
    let (_nas_private, nas_public) = meshlab::generate_keypair();
    lab.meshctl(
        COORDINATOR,
        &["invite", NAS, "--static", "--public-key", &nas_public],
    )?;
    meshlab::poll_until(SETTLE, "dock-prod to add the static peer", || {
        Ok(lab.wg_peers(PROD)?.contains(&nas_public))
    })?;

    // The key is 40 days old; meshd restarted (its first contact with the coordinator runs
    // the schedule check at once): held.
    let forty_days_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        - 40 * 86_400;
    lab.exec_ok(
        PROD,
        &["touch", "-d", &format!("@{forty_days_ago}"), key_path],
    )?;
    let p = lab.restart_meshd_env(PROD, f.meshd[PROD], &[])?;
    f.meshd.insert(PROD.into(), p);
    meshlab::poll_until(CHECK, &format!("{PROD} to log {HELD_LOG:?}"), || {
        Ok(lab
            .meshd_log_lines(PROD)
            .iter()
            .any(|l| l.contains(HELD_LOG)))
    })?;
    let report = doctor(lab, PROD)?;
    eprintln!(
        "meshctl doctor on {PROD} with the key held:\n{}",
        report.trim()
    );
    assert!(
        report.contains(PAST) && report.contains("held"),
        "meshctl doctor does not say the overdue key is held: {report}"
    );
    assert_eq!(lab.registry_key(PROD)?, before, "a held key rotated");
    assert_eq!(
        lab.key_files(PROD)?.current.as_deref(),
        Some(before.as_str()),
        "a held key rotated on disk"
    );

    // The static peer goes: the next periodic check rotates the key, nobody asking.
    let t0 = Instant::now();
    lab.meshctl(COORDINATOR, &["remove", NAS])?;
    let after = poll_for(
        CHECK,
        &format!("{PROD}'s overdue key to rotate by the schedule"),
        || {
            let k = lab.registry_key(PROD)?;
            Ok((k != before).then_some(k))
        },
    )?;
    let rotated = t0.elapsed();
    assert_eq!(lab.wait_key_consistent(PROD, &HOSTS, SETTLE)?, after);
    lab.wait_mesh_pings(&HOSTS, SETTLE)?;
    eprintln!(
        "MEASURED scheduled rotation: {PROD}'s 40-day-old key rotated {:.1} s after its static peer was removed (periodic check every 30 s)",
        rotated.as_secs_f64()
    );
    let report = doctor(lab, PROD)?;
    assert!(
        !report.contains(PAST),
        "meshctl doctor still warns about the key's age after the rotation: {report}"
    );
    Ok(())
}
