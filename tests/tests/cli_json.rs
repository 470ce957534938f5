//! Scripts drive meshd (issue 19, item 4): `--json` on every command that reports something,
//! typed outcomes rather than display strings, and exit codes a script can tell apart
//! (meshctl(8): 1 refused, 3 meshd could not be asked, 4 not joined, 5 in error).
//!
//! The real daemon on the namespace lab: dock-load runs the coordinator, dock-prod joins with
//! `meshctl join --json`, then reloads, rotates, goes down and is removed, each with `--json`.
//! Needs meshd, meshctl and meshd-wg next to the test binary (or in `$MESHLAB_BIN_DIR`):
//! `cargo build --workspace --bins && cargo test -p meshlab --test cli_json` (as root).

use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meshlab::coord::CLI_TIMEOUT_SECS;
use meshlab::{poll_until, Lab, LabOpts, COORDINATOR};
use serde_json::Value;

const MEMBER: &str = "dock-prod";
const CONFIG_PATH: &str = "/etc/meshd/meshd.toml";
const TIMEOUT: Duration = Duration::from_secs(60);

/// stdout of `out` as JSON, or an error saying what was printed.
fn json(out: &Output, what: &str) -> Result<Value> {
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{what} printed no JSON (exit {:?}): {} / {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `meshctl ARGS` on `host` must exit `code` and print JSON: the JSON.
fn meshctl_json(lab: &Lab, host: &str, args: &[&str], code: i32) -> Result<Value> {
    let out = lab.meshctl_output(host, args)?;
    let what = format!("[{host}] meshctl {}", args.join(" "));
    if out.status.code() != Some(code) {
        bail!(
            "{what} exited {:?}, not {code}: {} / {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    json(&out, &what)
}

fn exit_code(lab: &Lab, host: &str, args: &[&str]) -> Result<Option<i32>> {
    Ok(lab.meshctl_output(host, args)?.status.code())
}

#[test]
fn scripts_get_typed_json_and_distinct_exit_codes() -> Result<()> {
    let _serial = meshlab::one_lab_at_a_time();
    let lab = Lab::build(LabOpts::with_hosts(&[COORDINATOR, MEMBER]))?;
    let engine = meshlab::engine_command(lab.bin_dir());
    lab.start_coordinator(&engine)?;
    let member = lab.start_unjoined(MEMBER)?;

    // meshd --check-config --json: the member's file as installed, then a broken one.
    let out = lab.exec(
        MEMBER,
        &["meshd", "--check-config", "--json", "--config", CONFIG_PATH],
    )?;
    let v = json(&out, "meshd --check-config --json")?;
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["errors"], Value::Array(Vec::new()), "{v}");
    assert_eq!(
        v["private_key"]["state"], "valid",
        "meshd made its key: {v}"
    );
    let bad = format!("{}.bad", CONFIG_PATH);
    lab.write_file(MEMBER, &bad, b"[host]\nlisten_port = 99999\n")?;
    let out = lab.exec(
        MEMBER,
        &["meshd", "--check-config", "--json", "--config", &bad],
    )?;
    let v = json(&out, "meshd --check-config --json (broken)")?;
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert_eq!(v["valid"], false, "{v}");
    let errors = v["errors"].as_array().context("errors is a list")?;
    let port = errors
        .iter()
        .find(|e| e["key"] == "host.listen_port")
        .with_context(|| format!("no error for host.listen_port: {v}"))?;
    assert_eq!(port["file"], bad.as_str(), "{v}");
    assert_eq!(port["location"]["line"], 2, "{v}");
    assert_eq!(port["location"]["column"], 15, "{v}");
    assert!(v["private_key"].is_null(), "{v}");

    // Not joined: status exits 4 with a typed state and nulls, not sentinels.
    let st = meshctl_json(&lab, MEMBER, &["status", "--json"], 4)?;
    assert_eq!(st["state"], "needs_join", "{st}");
    assert!(st["host"].is_null() && st["mesh_address"].is_null(), "{st}");

    // invite --json, join --json.
    let inv = meshctl_json(&lab, COORDINATOR, &["invite", MEMBER, "--json"], 0)?;
    let token = inv["token"]
        .as_str()
        .context("invite --json has the token")?;
    assert_eq!(inv["name"], MEMBER, "{inv}");
    assert!(inv["expires_unix"].as_u64().is_some(), "{inv}");
    let t = CLI_TIMEOUT_SECS.to_string();
    let out = lab.exec_input(
        MEMBER,
        &["timeout", t.as_str(), "meshctl", "join", "-", "--json"],
        format!("{token}\n").as_bytes(),
    )?;
    let joined = json(&out, "meshctl join --json")?;
    assert_eq!(out.status.code(), Some(0), "{joined}");
    assert_eq!(joined["outcome"], "joined", "{joined}");
    assert_eq!(joined["host"], MEMBER, "{joined}");
    assert_eq!(joined["address"], inv["address"], "{joined} vs {inv}");
    assert!(joined["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("joined")));

    // Joined and healthy: status exits 0 (once the first pass after the join is done).
    poll_until(TIMEOUT, "meshctl status to exit 0 after the join", || {
        Ok(exit_code(&lab, MEMBER, &["status"])? == Some(0))
    })?;
    let st = meshctl_json(&lab, MEMBER, &["status", "--json"], 0)?;
    assert_eq!(st["state"], "member", "{st}");
    assert!(st["last_error"].is_null(), "{st}");

    let r = meshctl_json(&lab, MEMBER, &["reload", "--json"], 0)?;
    assert_eq!(r["outcome"], "reloaded", "{r}");
    assert_eq!(r["config"], CONFIG_PATH, "{r}");
    assert!(r["error"].is_null() && r["ops_applied"].is_u64(), "{r}");

    let r = meshctl_json(&lab, MEMBER, &["rotate", "--json"], 0)?;
    assert_eq!(r["outcome"], "rotated", "{r}");
    assert_ne!(r["old_public_key"], r["new_public_key"], "{r}");
    let st = meshctl_json(&lab, MEMBER, &["status", "--json"], 0)?;
    assert_eq!(st["public_key"], r["new_public_key"], "{st} vs {r}");

    // Admin commands on the coordinator.
    meshctl_json(&lab, COORDINATOR, &["invite", "dock-mirror", "--json"], 0)?;
    let r = meshctl_json(&lab, COORDINATOR, &["revoke", "dock-mirror", "--json"], 0)?;
    assert_eq!(r["outcome"], "invitation_revoked", "{r}");
    assert_eq!(r["name"], "dock-mirror", "{r}");
    let inv = meshctl_json(
        &lab,
        COORDINATOR,
        &["invite", "nas", "--static", "--json"],
        0,
    )?;
    assert!(inv["token"].is_null(), "{inv}");
    let conf = inv["wg_quick_config"]
        .as_str()
        .context("a static invite has its config")?;
    assert!(conf.contains("[Interface]"), "{conf}");
    let r = meshctl_json(&lab, COORDINATOR, &["static-config", "nas", "--json"], 0)?;
    assert_eq!(r["outcome"], "static_config", "{r}");
    assert!(
        r["wg_quick_config"]
            .as_str()
            .is_some_and(|c| c.contains("[Peer]")),
        "{r}"
    );
    // Refused by the coordinator: exit 1, the reason on stderr, nothing on stdout.
    let out = lab.meshctl_output(COORDINATOR, &["remove", "no-such-host", "--json"])?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(!out.stderr.is_empty(), "{out:?}");

    // down --json through meshd, then again with meshd gone (meshd --down --json).
    let r = meshctl_json(&lab, MEMBER, &["down", "--json"], 0)?;
    assert_eq!(r["outcome"], "down", "{r}");
    assert!(
        r["removed"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.contains("interface")))),
        "{r}"
    );
    lab.wait_exit(member, TIMEOUT)?;
    let out = lab.meshctl_output(MEMBER, &["status"])?;
    assert_eq!(out.status.code(), Some(3), "meshd gone: exit 3: {out:?}");
    let r = meshctl_json(&lab, MEMBER, &["down", "--json"], 0)?;
    assert_eq!(r["outcome"], "down", "{r}");
    assert_eq!(r["removed"], Value::Array(Vec::new()), "nothing left: {r}");
    // The doctor that cannot run at all (meshd down, configuration unreadable): exit 3,
    // distinct from a failed check (1).
    let out = lab.meshctl_output(MEMBER, &["doctor", "--config", "/nonexistent/meshd.toml"])?;
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    let r = meshctl_json(&lab, COORDINATOR, &["remove", MEMBER, "--json"], 0)?;
    assert_eq!(r["outcome"], "removed", "{r}");
    assert_eq!(r["host"], MEMBER, "{r}");
    Ok(())
}
