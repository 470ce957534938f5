//! The Debian package in the lab (issue 8, "Must show"): one host runs meshd, meshctl and
//! meshd-wg as the package installed them in a Debian 12 chroot, with the package's own
//! `/etc/meshd/meshd.toml` unmodified, and joins the mesh with a token from the coordinator,
//! which runs the build's binaries.
//!
//! `packaging/test-deb.sh` copies `/usr/bin/{meshd,meshctl,meshd-wg}` and
//! `/etc/meshd/meshd.toml` out of the installed chroot and runs this test with
//! `MESHD_PACKAGE_ROOT` pointing there (`usr/bin/...`, `etc/meshd/meshd.toml` under it).
//! It is `#[ignore]`d in a plain `cargo test` (listed and counted as ignored); without the
//! variable it fails. As root:
//! `MESHD_PACKAGE_ROOT=DIR cargo test -p meshlab --test package -- --ignored`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meshlab::fleet::CONFIG_PATH;
use meshlab::{check_output, poll_until, Lab, LabOpts, RootSnapshot, COORDINATOR};

/// The host that runs the package's binaries.
const HOST: &str = "dock-prod";
const TIMEOUT: Duration = Duration::from_secs(60);

/// `$MESHD_PACKAGE_ROOT`, checked: the package's three binaries and its conffile are there.
fn package_root() -> Result<Option<PathBuf>> {
    let Some(root) = std::env::var_os("MESHD_PACKAGE_ROOT") else {
        return Ok(None);
    };
    let root = PathBuf::from(root);
    for f in [
        "usr/bin/meshd",
        "usr/bin/meshctl",
        "usr/bin/meshd-wg",
        "etc/meshd/meshd.toml",
    ] {
        if !root.join(f).is_file() {
            bail!(
                "MESHD_PACKAGE_ROOT={}: {f} is missing (packaging/test-deb.sh copies it out of \
                 the installed chroot)",
                root.display()
            );
        }
    }
    Ok(Some(root))
}

fn arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
#[ignore = "needs the installed package: packaging/test-deb.sh runs it with MESHD_PACKAGE_ROOT"]
fn a_host_running_the_packaged_meshd_joins_with_a_token() -> Result<()> {
    let Some(pkg) = package_root()? else {
        bail!(
            "MESHD_PACKAGE_ROOT is not set; packaging/test-deb.sh runs this test with the \
             binaries of the installed package"
        );
    };
    let meshd = arg(&pkg.join("usr/bin/meshd"));
    let meshctl = arg(&pkg.join("usr/bin/meshctl"));
    let engine = arg(&pkg.join("usr/bin/meshd-wg"));
    let conffile = std::fs::read(pkg.join("etc/meshd/meshd.toml"))
        .context("reading the package's meshd.toml")?;

    let before = RootSnapshot::take()?;
    let lab = Lab::build(LabOpts::with_hosts(&[COORDINATOR, HOST]))?;
    // The coordinator: the build's binaries (Lab::bin_dir()).
    lab.start_coordinator(&meshlab::engine_command(lab.bin_dir()))?;

    // The packaged host: the installed default configuration, as shipped, and the package's
    // meshd, which finds the package's meshd-wg next to itself (backend = auto; the lab has
    // no kernel WireGuard).
    lab.write_file(HOST, CONFIG_PATH, &conffile)?;
    let log = lab.meshd_log(HOST);
    let p = lab.spawn_env(
        HOST,
        &[meshd.as_str(), "--config", CONFIG_PATH],
        &[("RUST_LOG", "info")],
        Some(&log),
    )?;
    poll_until(
        TIMEOUT,
        "the packaged meshd to answer meshctl status",
        || {
            if !lab.is_running(p) {
                bail!(
                    "the packaged meshd exited; {}:\n{}",
                    log.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            Ok(meshlab::status_answered(
                &lab.exec(HOST, &[meshctl.as_str(), "status"])?,
            ))
        },
    )?;
    let out = lab.exec(HOST, &[meshctl.as_str(), "status"])?;
    let status = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(4),
        "meshctl status on a host that has not joined exits 4 (meshctl(8)):\n{status}"
    );
    assert!(
        status.contains("not joined"),
        "as installed, meshd must wait for a join, not form a mesh:\n{status}"
    );
    // No interface yet (userspace backend here: nothing is created before the join).
    let link = lab.exec(HOST, &["ip", "link", "show", meshlab::MESH_IFACE])?;
    assert!(
        !link.status.success(),
        "an unjoined meshd brought up {}:\n{}",
        meshlab::MESH_IFACE,
        String::from_utf8_lossy(&link.stdout)
    );

    let token = lab.invite(HOST, &[])?;
    let t0 = std::time::Instant::now();
    check_output(
        lab.exec_input(
            HOST,
            &["timeout", "60", meshctl.as_str(), "join", "-"],
            format!("{token}\n").as_bytes(),
        )?,
        &format!("[{HOST}] packaged meshctl join"),
    )?;
    lab.wait_pair_pings(&[(HOST, COORDINATOR), (COORDINATOR, HOST)], TIMEOUT)?;
    eprintln!(
        "packaged host joined and pings both ways {:.2?} after meshctl join started",
        t0.elapsed()
    );

    let status = lab.exec_ok(HOST, &[meshctl.as_str(), "status"])?;
    assert!(
        status.contains(&engine),
        "the packaged meshd should drive the packaged engine {engine}:\n{status}"
    );
    let version = lab.exec_ok(HOST, &[meshd.as_str(), "--version"])?;
    assert!(version.starts_with("meshd "), "{version}");

    drop(lab);
    let diff = before.diff(&RootSnapshot::take()?);
    assert!(
        diff.is_empty(),
        "the root namespace changed:\n{}",
        diff.join("\n")
    );
    Ok(())
}
