//! Security suite (routes): attacks from docs/SECURITY.md run against the lab, each asserting that
//! the attack fails and that the mesh still works afterwards.
//!
//! "Routes are granted, not taken": a member with a hostile configuration advertises other
//! people's address space (8.8.8.8/32, 1.1.1.0/24) and then loopback (127.0.0.0/8). Nothing is
//! routed before an admin approves it; a receiver takes an approved prefix only where its
//! `routes.accept` opts in; loopback is refused by every receiver even once approved, reported
//! in `meshctl status` and `meshctl doctor`, and joins, rotations and removals elsewhere still
//! go through.
//!
//! Needs meshd, meshctl and meshd-wg next to the test binary (`cargo build --workspace --bins`)
//! and root: `cargo test -p meshlab --test security_routes -- --nocapture`.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use meshlab::{poll_for, poll_until, JoinMode, Lab, LabOpts, COORDINATOR, MESH_IFACE};
use serde_json::Value;

const MESH_TIMEOUT: Duration = Duration::from_secs(90);
const SETTLE: Duration = Duration::from_secs(30);
/// A `meshctl reload` must bring a changed `routes.advertise` to the coordinator well before
/// the periodic endpoint check (30 s) would.
const RELOAD_REPORT: Duration = Duration::from_secs(10);

const PROD: &str = "dock-prod";
const MIRROR: &str = "dock-mirror";
const HOSTILE: &str = "dock-dash";
const LATE: &str = "dock-edge";

/// Receivers that opt in to the attacker's space: only the approval stands in its way.
const ACCEPT_THEM: &str = "[routes]\naccept = [\"8.8.8.0/24\", \"1.1.1.0/24\"]\n";
const TAKEN: [&str; 2] = ["8.8.8.8/32", "1.1.1.0/24"];
const LOOPBACK: &str = "127.0.0.0/8";

fn status_json(lab: &Lab, host: &str) -> Result<Value> {
    let text = lab.status(host, &["--json"])?;
    serde_json::from_str(&text).with_context(|| format!("[{host}] meshctl status --json: {text}"))
}

/// Wait until every host in `hosts` holds the coordinator's current netmap version.
fn settle(lab: &Lab, hosts: &[&str]) -> Result<u64> {
    poll_for(
        SETTLE,
        "every host to hold the coordinator's netmap",
        || {
            let want = status_json(lab, COORDINATOR)?["netmap_version"].as_u64();
            let Some(want) = want else { return Ok(None) };
            for h in hosts {
                if status_json(lab, h)?["netmap_version"].as_u64() != Some(want) {
                    return Ok(None);
                }
            }
            Ok(Some(want))
        },
    )
}

/// The routes on the mesh interface of `host` (every table) and its WireGuard allowed IPs that
/// mention `prefix`.
fn routed(lab: &Lab, host: &str, prefix: &str) -> Result<Vec<String>> {
    let routes = lab.exec_ok(host, &["ip", "-o", "route", "show", "table", "all"])?;
    let allowed = lab.exec_ok(host, &["wg", "show", MESH_IFACE, "allowed-ips"])?;
    let dev = format!("dev {MESH_IFACE}");
    let mut out: Vec<String> = routes
        .lines()
        .filter(|l| l.contains(&dev) && l.split_whitespace().any(|w| w == prefix))
        .map(|l| format!("route: {l}"))
        .collect();
    out.extend(
        allowed
            .lines()
            .filter(|l| l.split_whitespace().any(|w| w == prefix))
            .map(|l| format!("wg allowed-ips: {l}")),
    );
    Ok(out)
}

fn skipped(lab: &Lab, host: &str) -> Result<Vec<Value>> {
    Ok(status_json(lab, host)?["skipped_routes"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn skip_reason(lab: &Lab, host: &str, prefix: &str) -> Result<Option<String>> {
    Ok(skipped(lab, host)?
        .iter()
        .find(|r| r["prefix"] == prefix && r["peer"] == HOSTILE)
        .and_then(|r| r["reason"].as_str().map(str::to_owned)))
}

fn route_decision(lab: &Lab, action: &str, host: &str, prefix: &str) -> Result<String> {
    let out = lab.meshctl_output(COORDINATOR, &["routes", action, host, prefix])?;
    meshlab::check_output(
        out,
        &format!("[{COORDINATOR}] meshctl routes {action} {host} {prefix}"),
    )
}

fn mesh(host: &str) -> Ipv4Addr {
    meshlab::topology::mesh_addr(host).unwrap_or(Ipv4Addr::UNSPECIFIED)
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn routes_are_granted_not_taken() -> Result<()> {
    let _g = meshlab::one_lab_at_a_time();
    let lab = Lab::build(LabOpts::with_hosts(&[
        COORDINATOR,
        PROD,
        MIRROR,
        HOSTILE,
        LATE,
    ]))?;
    let engine = meshlab::engine_command(lab.bin_dir());
    lab.start_coordinator_with(&engine, ACCEPT_THEM)?;
    for (h, extra) in [
        (PROD, ACCEPT_THEM.to_string()),
        (MIRROR, String::new()),
        (
            HOSTILE,
            format!(
                "[routes]\nadvertise = [{}]\n",
                TAKEN.map(|p| format!("\"{p}\"")).join(", ")
            ),
        ),
    ] {
        let token = lab.invite(h, &[])?;
        lab.join_host_with(h, &token, JoinMode::Command, &extra)?;
    }
    let four = [COORDINATOR, PROD, MIRROR, HOSTILE];
    let receivers = [COORDINATOR, PROD, MIRROR];
    lab.wait_mesh_pings(&four, MESH_TIMEOUT)?;

    // 1. Advertised is not granted: both prefixes are pending, and once every host holds the
    //    newest netmap, none routes them (the receivers opted in: the approval is the gate).
    poll_until(
        SETTLE,
        "the hostile prefixes to be listed as pending",
        || {
            Ok(TAKEN
                .iter()
                .map(|p| lab.route_state(HOSTILE, p))
                .collect::<Result<Vec<_>>>()?
                .iter()
                .all(|s| s.as_deref() == Some("pending")))
        },
    )?;
    let table = lab.meshctl(COORDINATOR, &["routes"])?;
    for p in TAKEN {
        assert!(
            table
                .lines()
                .any(|l| l.contains(HOSTILE) && l.contains(p) && l.contains("pending")),
            "meshctl routes must list {p} as pending:\n{table}"
        );
    }
    settle(&lab, &four)?;
    for h in receivers {
        for p in TAKEN {
            let r = routed(&lab, h, p)?;
            assert!(r.is_empty(), "{h} routes the unapproved {p}: {r:?}");
        }
    }
    // The advertiser is told: its status says neither prefix is granted.
    let ungranted = status_json(&lab, HOSTILE)?["ungranted_routes"].clone();
    for p in TAKEN {
        assert!(
            ungranted
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == p)),
            "{HOSTILE}'s status must list {p} as not granted: {ungranted}"
        );
    }
    let text = lab.status(HOSTILE, &[])?;
    assert!(
        text.contains("NOT GRANTED"),
        "{HOSTILE}'s meshctl status:\n{text}"
    );
    // An approval of what the host does not advertise is refused and changes nothing.
    let out = lab.meshctl_output(COORDINATOR, &["routes", "approve", HOSTILE, "9.9.9.9/32"])?;
    let msg = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && msg.contains("does not advertise 9.9.9.9/32"),
        "approving an unadvertised prefix: {msg}"
    );

    // 2. Approved: taken only where routes.accept opts in (dock-prod, dock-load), skipped and
    //    reported where it does not (dock-mirror). 1.1.1.0/24 stays pending and unrouted.
    let said = route_decision(&lab, "approve", HOSTILE, TAKEN[0])?;
    assert!(said.contains("approved"), "{said}");
    settle(&lab, &four)?;
    for h in [COORDINATOR, PROD] {
        poll_until(
            SETTLE,
            &format!("{h} to route the approved {}", TAKEN[0]),
            || Ok(!routed(&lab, h, TAKEN[0])?.is_empty()),
        )?;
    }
    assert!(routed(&lab, MIRROR, TAKEN[0])?.is_empty());
    assert_eq!(
        skip_reason(&lab, MIRROR, TAKEN[0])?.as_deref(),
        Some("not_accepted"),
        "dock-mirror reports why it skips {}",
        TAKEN[0]
    );
    for h in receivers {
        assert!(
            routed(&lab, h, TAKEN[1])?.is_empty(),
            "{h} routes {}",
            TAKEN[1]
        );
    }
    // Revoked: out of every netmap, no longer routed.
    route_decision(&lab, "revoke", HOSTILE, TAKEN[0])?;
    for h in receivers {
        poll_until(
            SETTLE,
            &format!("{h} to stop routing the revoked {}", TAKEN[0]),
            || Ok(routed(&lab, h, TAKEN[0])?.is_empty()),
        )?;
    }

    // 3. The hostile member now advertises loopback; `meshctl reload` brings it to the
    //    coordinator at once.
    let cfg = lab.read_file(HOSTILE, meshlab::fleet::CONFIG_PATH)?;
    let start = cfg
        .find("[routes]")
        .ok_or_else(|| anyhow!("no [routes] in {HOSTILE}'s config:\n{cfg}"))?;
    let cfg = format!("{}[routes]\nadvertise = [\"{LOOPBACK}\"]\n", &cfg[..start]);
    lab.write_file(HOSTILE, meshlab::fleet::CONFIG_PATH, cfg.as_bytes())?;
    let t0 = Instant::now();
    let said = lab.meshctl(HOSTILE, &["reload"])?;
    assert!(
        said.contains("routes.advertise changed"),
        "meshctl reload must say it reported the change: {said}"
    );
    poll_until(
        RELOAD_REPORT,
        "the coordinator to list 127.0.0.0/8 after the reload",
        || Ok(lab.route_state(HOSTILE, LOOPBACK)?.is_some()),
    )?;
    eprintln!(
        "MEASURED reload to coordinator: {LOOPBACK} listed {:.2} s after meshctl reload",
        t0.elapsed().as_secs_f64()
    );
    // An admin approves it, even: every receiver refuses it, says why, and applies the rest.
    let said = route_decision(&lab, "approve", HOSTILE, LOOPBACK)?;
    assert!(said.contains("approved"), "{said}");
    settle(&lab, &four)?;
    for h in receivers {
        poll_until(
            SETTLE,
            &format!("{h} to report {LOOPBACK} as skipped"),
            || Ok(skip_reason(&lab, h, LOOPBACK)?.as_deref() == Some("reserved")),
        )?;
        assert!(routed(&lab, h, LOOPBACK)?.is_empty(), "{h} routes loopback");
        let st = status_json(&lab, h)?;
        assert!(
            st["last_error"].is_null(),
            "{h} refuses its netmap: {}",
            st["last_error"]
        );
        let text = lab.status(h, &[])?;
        assert!(
            text.contains("skipped route:") && text.contains("127.0.0.0/8 from dock-dash"),
            "{h}'s meshctl status:\n{text}"
        );
        let doctor = lab.meshctl_output(h, &["doctor", "--json"])?;
        let report: Value = serde_json::from_slice(&doctor.stdout)
            .with_context(|| format!("[{h}] meshctl doctor --json"))?;
        let check = report["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "peer routes"))
            .ok_or_else(|| anyhow!("{h}'s doctor has no peer routes check: {report}"))?;
        assert!(
            check["status"] == "warn" && check["detail"].as_str().unwrap_or("").contains(LOOPBACK),
            "{h}'s doctor: {check}"
        );
        if !lab.ping(h, Ipv4Addr::LOCALHOST)? {
            bail!("{h} no longer reaches its own loopback");
        }
    }

    // 4. Fleet-wide progress is not stalled: a join, a rotation and a removal elsewhere.
    let t0 = Instant::now();
    let token = lab.invite(LATE, &[])?;
    lab.join_host(LATE, &token, JoinMode::Command)?;
    let five = [COORDINATOR, PROD, MIRROR, HOSTILE, LATE];
    lab.wait_mesh_pings(&five, MESH_TIMEOUT)?;
    eprintln!(
        "MEASURED join with an approved loopback route in the mesh: all 20 pairs ping {:.2} s after the invite",
        t0.elapsed().as_secs_f64()
    );
    let old = lab.registry_key(MIRROR)?;
    let t0 = Instant::now();
    lab.meshctl(COORDINATOR, &["rotate", MIRROR])?;
    let new = poll_for(MESH_TIMEOUT, "dock-mirror's rotation", || {
        let k = lab.registry_key(MIRROR)?;
        Ok((k != old).then_some(k))
    })?;
    let peers = lab.wait_key_consistent(MIRROR, &five, MESH_TIMEOUT)?;
    assert_eq!(peers, new);
    eprintln!(
        "MEASURED rotation of dock-mirror with an approved loopback route in the mesh: consistent on every host {:.2} s after meshctl rotate",
        t0.elapsed().as_secs_f64()
    );
    let late_key = lab.registry_key(LATE)?;
    let t0 = Instant::now();
    lab.meshctl(COORDINATOR, &["remove", LATE])?;
    for h in four {
        poll_until(SETTLE, &format!("{h} to drop the removed {LATE}"), || {
            Ok(!lab.wg_peers(h)?.contains(&late_key))
        })?;
    }
    eprintln!(
        "MEASURED removal with an approved loopback route in the mesh: gone from every host {:.2} s after meshctl remove",
        t0.elapsed().as_secs_f64()
    );

    // 5. All pairs still ping; the refusal is still reported, nothing of it is routed.
    lab.wait_mesh_pings(&four, MESH_TIMEOUT)?;
    for h in receivers {
        assert_eq!(skip_reason(&lab, h, LOOPBACK)?.as_deref(), Some("reserved"));
        assert!(routed(&lab, h, LOOPBACK)?.is_empty());
        assert!(lab.ping(h, mesh(HOSTILE))?, "{h} to {HOSTILE}");
    }
    Ok(())
}
