//! The booted fleet: the daemon hosts as Debian 12 containers booted with systemd as PID 1,
//! the Debian package installed with apt, meshd started by its unit; the coordinator configured
//! in its `/etc/meshd/meshd.toml`, the others joined with `meshctl invite` / `meshctl join -`
//! (`meshlab::boot`). Then lifecycle under traffic: `systemctl restart meshd` while a 10 ms
//! ping crosses the mesh.
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
    let (containers, timings) = form_booted_fleet(&lab, &deb, TIMEOUT)?;
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

    // systemctl restart meshd on dock-prod while dock-load pings it every 10 ms.
    let target = "dock-prod";
    let addr = lab.mesh_addr(target)?;
    let index = lab.ifindex(target, MESH_IFACE)?;
    let nspawn = containers[target];
    let pid_before = lab.container_ok(
        target,
        nspawn,
        &["systemctl", "show", "-p", "MainPID", "--value", "meshd"],
    )?;
    let ping = lab
        .command(
            COORDINATOR,
            &[
                "ping",
                "-n",
                "-q",
                "-i",
                "0.01",
                "-w",
                "8",
                &addr.to_string(),
            ],
        )?
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ping")?;
    lab.container_ok(target, nspawn, &["systemctl", "restart", "meshd"])?;
    poll_until(
        Duration::from_secs(30),
        "meshd to be active again after the restart",
        || {
            let pid = lab.container_ok(
                target,
                nspawn,
                &["systemctl", "show", "-p", "MainPID", "--value", "meshd"],
            )?;
            Ok(pid.trim() != pid_before.trim() && pid.trim() != "0")
        },
    )?;
    lab.wait_unit(target, nspawn, "meshd.service", Duration::from_secs(30))?;
    let out = ping.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (sent, received) =
        ping_counts(&text).with_context(|| format!("no ping summary in {text:?}"))?;
    let lost = sent - received;
    println!("systemctl restart meshd on {target}: {lost} of {sent} pings (10 ms) lost");
    let index_after = lab.ifindex(target, MESH_IFACE)?;
    if index_after != index {
        bail!("the restart recreated {MESH_IFACE}: ifindex {index} -> {index_after}");
    }
    println!("{MESH_IFACE} kept its ifindex {index}");
    if lost != 0 {
        bail!("{lost} of {sent} pings lost across systemctl restart meshd");
    }
    Ok(())
}

#[test]
fn ping_summaries_are_read() {
    let out = "--- 10.99.99.2 ping statistics ---\n790 packets transmitted, 788 received, 0.253165% packet loss, time 7990ms\n";
    assert_eq!(ping_counts(out), Some((790, 788)));
    assert_eq!(ping_counts("nothing"), None);
}
