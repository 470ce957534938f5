//! Rotations asked for from elsewhere or at a bad time (issue 6, deliverables 1 and 3):
//! `meshctl rotate NAME` on the coordinator makes that host rotate (an unknown name or a static
//! peer is refused and changes nothing); `meshctl rotate` on a member while the coordinator is
//! down is deferred, keeps its next key, and completes by itself once the coordinator is back.
//!
//! Needs meshd, meshctl and meshd-wg next to the test binary (or in `$MESHLAB_BIN_DIR`), `wg`,
//! `wireguard-go` and `ping`: `cargo build --workspace --bins && cargo test -p meshlab --test
//! rotation_requests -- --test-threads=1 --nocapture` (as root).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use meshlab::{poll_for, JoinMode, Lab, LabOpts, ManagedFleet, COORDINATOR, NAS};

const MESH_TIMEOUT: Duration = Duration::from_secs(90);
/// C4: the named host rotates within this.
const ASKED_ROTATION: Duration = Duration::from_secs(10);
/// C5: a deferred rotation completes within this after the coordinator is back.
const DEFERRED_ROTATION: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(30);
const PROD: &str = "dock-prod";
const MIRROR: &str = "dock-mirror";
const HOSTS: [&str; 3] = [COORDINATOR, PROD, MIRROR];

static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn fleet() -> Result<(Lab, ManagedFleet)> {
    let lab = Lab::build(LabOpts::with_hosts(&HOSTS))?;
    let f = lab.form_managed_fleet(&[PROD, MIRROR], JoinMode::Command, false)?;
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
fn coordinator_asks_a_host_to_rotate_and_refuses_unknown_and_static_names() -> Result<()> {
    let _g = serial();
    let (lab, f) = fleet()?;
    let before = lab.registry_key(PROD)?;

    let t0 = Instant::now();
    let out = lab.meshctl_output(COORDINATOR, &["rotate", PROD])?;
    let answered = t0.elapsed();
    assert!(
        out.status.success(),
        "meshctl rotate {PROD} on the coordinator failed: {}",
        text(&out)
    );
    let reply = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        reply.contains(&format!("asked {PROD} to rotate its key")),
        "unexpected reply: {reply}"
    );
    let after = poll_for(
        ASKED_ROTATION,
        &format!("{PROD}'s key to change in the registry"),
        || {
            let k = lab.registry_key(PROD)?;
            Ok((k != before).then_some(k))
        },
    )?;
    let rotated = t0.elapsed();
    assert_eq!(lab.wait_key_consistent(PROD, &HOSTS, SETTLE)?, after);
    lab.wait_mesh_pings(&HOSTS, SETTLE)?;
    eprintln!(
        "MEASURED meshctl rotate {PROD} on the coordinator: answered in {:.0} ms, the registry had {PROD}'s new key after {:.2} s, all pairs ping after {:.2} s",
        answered.as_secs_f64() * 1000.0,
        rotated.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );

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
    for name in ["no-such-host", NAS] {
        let out = lab.meshctl_output(COORDINATOR, &["rotate", name])?;
        eprintln!(
            "meshctl rotate {name} on the coordinator: {:?}: {}",
            out.status.code(),
            text(&out).trim()
        );
        assert!(
            !out.status.success(),
            "meshctl rotate {name} succeeded: {}",
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
    drop(f);
    Ok(())
}

#[test]
fn rotation_asked_while_the_coordinator_is_down_is_deferred_then_completes() -> Result<()> {
    let _g = serial();
    let (lab, mut f) = fleet()?;
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
    let after = poll_for(
        DEFERRED_ROTATION,
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
    assert_eq!(
        lab.wait_key_consistent(PROD, &HOSTS, DEFERRED_ROTATION.saturating_sub(t0.elapsed()))?,
        kept
    );
    lab.wait_mesh_pings(&HOSTS, DEFERRED_ROTATION.saturating_sub(t0.elapsed()))?;
    eprintln!(
        "MEASURED deferred rotation: the registry had {PROD}'s new key {:.2} s after the coordinator's meshd started, one key file and all pairs ping after {:.2} s",
        registered.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    drop(f);
    Ok(())
}
