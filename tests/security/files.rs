//! Security suite (files): attacks from docs/SECURITY.md run against the lab, each asserting that
//! the attack fails and that the mesh still works afterwards.
//!
//! - the owner of an integration's output directory (`nobody`, owning the Prometheus file_sd
//!   directory) plants symbolic links where meshd writes (the output file, the temp names the
//!   old writer used) to make root truncate or chown a file of theirs choosing: refused, the
//!   victim file unchanged;
//! - the state directory, the registry and its WAL/SHM (which hold the token secret) are
//!   owner-only, and `nobody` cannot read them;
//! - a join token on the command line, a group/world-readable token file (for `meshctl join
//!   --token-file` and for `[daemon] join_token_file`) are refused with a message that says
//!   how to pass it; a good token file is removed after the join.
//!
//! Needs meshd, meshctl and meshd-wg next to the test binary (or in `$MESHLAB_BIN_DIR`) and
//! setpriv (util-linux): `cargo build --workspace --bins && cargo test -p meshlab --test
//! security_files -- --test-threads=1 --nocapture` (as root).

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meshlab::coord::{render_member_config, TOKEN_PATH};
use meshlab::fleet::CONFIG_PATH;
use meshlab::{poll_for, poll_until, JoinMode, Lab, LabOpts, COORDINATOR};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);
const FILE_SD_DIR: &str = "/etc/prometheus/file_sd";
const FILE_SD: &str = "/etc/prometheus/file_sd/meshd.json";
/// A root-only file the attacker wants truncated or chowned (in the host's own /etc overlay).
const VICTIM: &str = "/etc/meshlab-victim.secret";
const VICTIM_TEXT: &str = "root:only:do-not-touch\n";
const PROD: &str = "dock-prod";
const DASH: &str = "dock-dash";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    meshlab::one_lab_at_a_time()
}

fn mesh(host: &str) -> Ipv4Addr {
    meshlab::topology::mesh_addr(host).unwrap_or(Ipv4Addr::UNSPECIFIED)
}

/// `script` run by `sh` as `nobody` inside `host`.
fn as_nobody(lab: &Lab, host: &str, script: &str) -> Result<std::process::Output> {
    lab.exec(
        host,
        &[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ],
    )
}

fn as_nobody_ok(lab: &Lab, host: &str, script: &str) -> Result<String> {
    let out = as_nobody(lab, host, script)?;
    meshlab::check_output(out, &format!("[{host}] as nobody: {script}"))
}

/// `stat -c FORMAT PATH` inside `host` (`%a %u %g %F`...).
fn stat(lab: &Lab, host: &str, format: &str, path: &str) -> Result<String> {
    Ok(lab
        .exec_ok(host, &["stat", "-c", format, path])?
        .trim()
        .to_owned())
}

/// The victim's content, mode, owner and type: must never change.
fn victim(lab: &Lab, host: &str) -> Result<(String, String)> {
    Ok((
        lab.exec_ok(host, &["cat", VICTIM])?,
        stat(lab, host, "%a %u:%g %F", VICTIM)?,
    ))
}

/// The prometheus integration in `meshctl status --json` on `host`: (ok, last_error).
fn prometheus_status(lab: &Lab, host: &str) -> Result<Option<(bool, String)>> {
    let text = lab.status(host, &["--json"])?;
    let v: Value = serde_json::from_str(&text).with_context(|| text.clone())?;
    let Some(list) = v.get("integrations").and_then(Value::as_array) else {
        return Ok(None);
    };
    Ok(list
        .iter()
        .find(|i| i.get("name").and_then(Value::as_str) == Some("prometheus"))
        .map(|i| {
            (
                i.get("ok").and_then(Value::as_bool).unwrap_or(false),
                i.get("last_error")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            )
        }))
}

fn pings_both_ways(lab: &Lab, hosts: &[&str]) -> Result<()> {
    let pairs: Vec<(&str, &str)> = hosts
        .iter()
        .flat_map(|a| hosts.iter().map(move |b| (*a, *b)))
        .filter(|(a, b)| a != b)
        .collect();
    lab.wait_pair_pings(&pairs, TIMEOUT)
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn planted_symlinks_in_an_output_directory_are_refused() -> Result<()> {
    let _g = serial();
    let lab = Lab::build(LabOpts::with_hosts(&[COORDINATOR, PROD, DASH]))?;
    let engine = meshlab::engine_command(lab.bin_dir());
    lab.start_coordinator(&engine)?;

    // dock-prod: a root-only victim, and the file_sd directory owned by prometheus (nobody
    // here), as a Prometheus package makes it.
    lab.write_file_mode(PROD, VICTIM, VICTIM_TEXT.as_bytes(), 0o600)?;
    // The lab's /etc overlay root takes its upper directory's 0700; a real /etc is 0755.
    lab.sh(
        PROD,
        &format!(
            "chmod 755 /etc && install -d -m 755 /etc/prometheus && install -d -m 755 -o nobody -g nogroup {FILE_SD_DIR}"
        ),
    )?;
    let before = victim(&lab, PROD)?;
    assert_eq!(before.0, VICTIM_TEXT);
    // The attack: the output file is a link to the victim.
    as_nobody_ok(&lab, PROD, &format!("ln -s {VICTIM} {FILE_SD}"))?;

    let token = lab.invite(PROD, &[])?;
    // Unattended join (the token file): the same for every meshd version, so this test also
    // runs against an older build (MESHLAB_BIN_DIR) to show that it catches the old writer.
    let prod = lab.join_host_with(
        PROD,
        &token,
        JoinMode::TokenFile,
        "\n[integrations.prometheus]\n",
    )?;
    pings_both_ways(&lab, &[COORDINATOR, PROD])?;
    let error = poll_for(
        TIMEOUT,
        "dock-prod to report the prometheus output refused",
        || {
            Ok(prometheus_status(&lab, PROD)?
                .filter(|(ok, e)| !ok && !e.is_empty())
                .map(|(_, e)| e))
        },
    )?;
    eprintln!("refusal in meshctl status: {error}");
    assert!(
        error.contains("symbolic link") && error.contains(FILE_SD),
        "the refusal must name the path and say why: {error}"
    );
    assert_eq!(victim(&lab, PROD)?, before, "the victim changed");
    assert_eq!(
        stat(&lab, PROD, "%F", FILE_SD)?,
        "symbolic link",
        "the planted link was replaced instead of refused"
    );
    let log = lab.meshd_log_lines(PROD).join("\n");
    assert!(
        log.contains("symbolic link"),
        "the refusal is not in meshd's log:\n{log}"
    );

    // The attacker removes the link and plants the temp names the old writer used (pid-based)
    // and a few guesses: meshd's next write must still land in a regular file of its own.
    let pid = prod.pid;
    as_nobody_ok(
        &lab,
        PROD,
        &format!(
            "cd {FILE_SD_DIR} && rm meshd.json && \
             ln -s {VICTIM} .meshd.json.meshd-{pid}.tmp && \
             ln -s {VICTIM} .meshd.json.tmp.{pid} && \
             ln -s {VICTIM} .meshd.json.tmp.0000000000000000"
        ),
    )?;
    // A netmap change makes meshd render the file again: dock-dash joins.
    let token = lab.invite(DASH, &[])?;
    lab.join_host(DASH, &token, JoinMode::TokenFile)?;
    poll_until(TIMEOUT, "dock-prod's file_sd to list dock-dash", || {
        Ok(
            stat(&lab, PROD, "%F", FILE_SD).ok().as_deref() == Some("regular file")
                && lab
                    .exec_ok(PROD, &["cat", FILE_SD])?
                    .contains(&mesh(DASH).to_string()),
        )
    })?;
    assert_eq!(victim(&lab, PROD)?, before, "the victim changed");
    assert_eq!(
        stat(&lab, PROD, "%a %u", FILE_SD)?,
        "644 0",
        "a new output file is root's, 0644"
    );
    let names = lab.exec_ok(PROD, &["ls", "-A", FILE_SD_DIR])?;
    let mut names: Vec<&str> = names.lines().collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            ".meshd.json.meshd-".to_owned() + &pid.to_string() + ".tmp",
            ".meshd.json.tmp.0000000000000000".to_owned(),
            ".meshd.json.tmp.".to_owned() + &pid.to_string(),
            "meshd.json".to_owned(),
        ]
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
        "meshd left a temp file or touched the planted links"
    );
    poll_until(TIMEOUT, "the prometheus output to report ok", || {
        Ok(prometheus_status(&lab, PROD)?.is_some_and(|(ok, _)| ok))
    })?;
    pings_both_ways(&lab, &[COORDINATOR, PROD, DASH])?;
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn state_registry_and_tokens_are_private() -> Result<()> {
    let _g = serial();
    let lab = Lab::build(LabOpts::with_hosts(&[COORDINATOR, PROD, DASH]))?;
    let engine = meshlab::engine_command(lab.bin_dir());
    lab.start_coordinator(&engine)?;
    // dock-prod joins unattended from a 0600 token file: the file is gone after the join.
    let token = lab.invite(PROD, &[])?;
    lab.join_host(PROD, &token, JoinMode::TokenFile)?;
    pings_both_ways(&lab, &[COORDINATOR, PROD])?;
    poll_until(TIMEOUT, "dock-prod to remove its spent token file", || {
        Ok(!lab
            .exec(PROD, &["test", "-e", TOKEN_PATH])?
            .status
            .success())
    })?;

    // State directory 0700, registry, WAL and SHM 0600; nobody reads none of them.
    assert_eq!(stat(&lab, COORDINATOR, "%a %u", "/var/lib/meshd")?, "700 0");
    assert_eq!(stat(&lab, PROD, "%a %u", "/var/lib/meshd")?, "700 0");
    assert_eq!(
        stat(&lab, PROD, "%a", "/var/lib/meshd/membership.json")?,
        "600"
    );
    let files = lab.exec_ok(COORDINATOR, &["ls", "/var/lib/meshd"])?;
    eprintln!(
        "coordinator state directory: {}",
        files.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", meshlab::coord::DATABASE);
        assert_eq!(
            stat(&lab, COORDINATOR, "%a %u", &path)?,
            "600 0",
            "{path} must be owner-only (the WAL holds the token secret)"
        );
        let out = as_nobody(&lab, COORDINATOR, &format!("cat {path}"))?;
        assert!(!out.status.success(), "nobody read {path}");
    }
    let out = as_nobody(&lab, COORDINATOR, "ls /var/lib/meshd")?;
    assert!(!out.status.success(), "nobody listed the state directory");

    // dock-dash: meshd with join_token_file pointing at a world-readable token: refused.
    let token = lab.invite(DASH, &[])?;
    let config = render_member_config(DASH, &engine, true);
    lab.write_file(DASH, CONFIG_PATH, config.as_bytes())?;
    lab.write_file_mode(DASH, TOKEN_PATH, format!("{token}\n").as_bytes(), 0o644)?;
    let dash = lab.start_meshd(DASH)?;
    lab.wait_meshctl(DASH, dash, &["status"], TIMEOUT)?;
    let line = poll_for(
        TIMEOUT,
        "dock-dash's meshd to refuse the 0644 token file",
        || {
            Ok(lab
                .meshd_log_lines(DASH)
                .into_iter()
                .find(|l| l.contains("cannot use the join token file")))
        },
    )?;
    eprintln!("meshd's refusal: {line}");
    assert!(line.contains("0644") && line.contains(TOKEN_PATH), "{line}");
    assert!(!line.contains(&token), "the refusal logs the token: {line}");
    let status = lab.status(DASH, &[])?;
    assert!(status.contains("not joined"), "{status}");
    let refused = status
        .lines()
        .find(|l| l.contains("join_token_file"))
        .unwrap_or_default();
    eprintln!("meshctl status: {}", refused.trim());
    assert!(
        refused.contains("refused") && refused.contains("0644"),
        "meshctl status does not report the refused token file:\n{status}"
    );

    // The token in argv: refused before anything is sent, with the way to pass it.
    let out = lab.meshctl_output(DASH, &["join", &token])?;
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("meshctl join TOKEN: {}", msg.trim());
    assert!(!out.status.success(), "a token in argv was accepted");
    assert!(
        msg.contains("command line") && msg.contains("meshctl join -"),
        "{msg}"
    );
    assert!(!msg.contains(&token), "the refusal echoes the token: {msg}");

    // meshctl join --token-file with the 0644 file: refused, the file stays.
    let out = lab.meshctl_output(DASH, &["join", "--token-file", TOKEN_PATH])?;
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("meshctl join --token-file (0644): {}", msg.trim());
    assert!(!out.status.success(), "a 0644 token file was accepted");
    assert!(msg.contains("0644") && msg.contains("chmod 600"), "{msg}");
    // Planted as a symlink to a root-only file: refused too.
    lab.sh(DASH, &format!("ln -sf {TOKEN_PATH} /etc/meshd/link.token"))?;
    let out = lab.meshctl_output(DASH, &["join", "--token-file", "/etc/meshd/link.token"])?;
    assert!(!out.status.success(), "a symlinked token file was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("symbolic link"));
    let out = lab.meshctl_output(DASH, &["status"])?;
    assert_eq!(out.status.code(), Some(4), "not joined: exit 4");
    assert!(String::from_utf8_lossy(&out.stdout).contains("not joined"));

    // Made private: the join works and the file is removed.
    lab.sh(DASH, &format!("chmod 600 {TOKEN_PATH}"))?;
    let out = lab.meshctl_output(DASH, &["join", "--token-file", TOKEN_PATH])?;
    meshlab::check_output(out, "[dock-dash] meshctl join --token-file")?;
    if lab
        .exec(DASH, &["test", "-e", TOKEN_PATH])?
        .status
        .success()
    {
        bail!("meshctl join left the spent token file {TOKEN_PATH}");
    }
    pings_both_ways(&lab, &[COORDINATOR, PROD, DASH])?;
    Ok(())
}
