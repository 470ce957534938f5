//! Security suite (control plane, docs/SECURITY.md): every request to the coordinator proves
//! its key, and every answer the coordinator's. Each test runs the attack in the lab, asserts
//! that it fails and changes nothing, and that every pair still pings afterwards.
//!
//! Needs meshd, meshctl and meshd-wg next to the test binary (or in `$MESHLAB_BIN_DIR`), curl,
//! python3 and setpriv (util-linux); as root: `cargo build --workspace --bins && cargo test -p
//! meshlab --test security_auth`.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use base64::Engine as _;
use meshlab::coord::API_PORT;
use meshlab::{poll_until, JoinMode, Lab, LabOpts, COORDINATOR, MESH_PORT};

const MESH_TIMEOUT: Duration = Duration::from_secs(90);
const LOAD: Ipv4Addr = Ipv4Addr::new(10, 99, 99, 1);
const LOAD_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// What an unprivileged local user runs commands as.
const NOBODY: [&str; 4] = [
    "setpriv",
    "--reuid=nobody",
    "--regid=nogroup",
    "--clear-groups",
];

fn api(path: &str) -> String {
    format!("http://{LOAD}:{API_PORT}{path}")
}

/// `argv` as the unprivileged user `nobody` on `host`.
fn as_nobody(lab: &Lab, host: &str, argv: &[&str]) -> Result<std::process::Output> {
    let mut all: Vec<&str> = NOBODY.to_vec();
    all.extend_from_slice(argv);
    lab.exec(host, &all)
}

/// An HTTP request by `nobody` with curl: the status code (0: no HTTP answer).
fn curl_as_nobody(lab: &Lab, host: &str, method: &str, url: &str, body: &str) -> Result<u16> {
    let out = as_nobody(
        lab,
        host,
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "-X",
            method,
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
            url,
        ],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0))
}

/// The coordinator, dock-prod joined as an admin host, dock-mirror as a plain member.
fn fleet() -> Result<(Lab, meshlab::ManagedFleet)> {
    let lab = Lab::build(LabOpts::with_hosts(&[
        "dock-load",
        "dock-prod",
        "dock-mirror",
        "dock-dash",
    ]))?;
    let engine = meshlab::engine_command(lab.bin_dir());
    let mut f = meshlab::ManagedFleet::default();
    f.meshd
        .insert(COORDINATOR.into(), lab.start_coordinator(&engine)?);
    let token = lab.invite("dock-prod", &["--admin"])?;
    f.meshd.insert(
        "dock-prod".into(),
        lab.join_host("dock-prod", &token, JoinMode::Command)?,
    );
    let token = lab.invite("dock-mirror", &[])?;
    f.meshd.insert(
        "dock-mirror".into(),
        lab.join_host("dock-mirror", &token, JoinMode::Command)?,
    );
    lab.wait_mesh_pings(&["dock-load", "dock-prod", "dock-mirror"], MESH_TIMEOUT)?;
    Ok((lab, f))
}

const MEMBERS: [&str; 3] = ["dock-load", "dock-prod", "dock-mirror"];

fn public_key(lab: &Lab, host: &str) -> Result<String> {
    Ok(lab
        .exec_ok(host, &["wg", "show", "wgmesh0", "public-key"])?
        .trim()
        .to_string())
}

fn key_hex(b64: &str) -> Result<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .context("a WireGuard key in base64")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Local unprivileged users on the coordinator, an admin host and a member: no invitation, no
/// registry listing, no re-keying, no control socket, no private key; nothing changes.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn local_users_get_nothing_from_the_control_plane() -> Result<()> {
    let _g = meshlab::one_lab_at_a_time();
    let (lab, f) = fleet()?;
    let r = (|| -> Result<()> {
        let before = lab.registry()?;
        let mirror_key = public_key(&lab, "dock-mirror")?;
        let invite = r#"{"name":"intruder","address":null,"ttl_secs":600}"#;
        let next = r#"{"public_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}"#;
        for host in ["dock-load", "dock-prod"] {
            // Through the tunnel, from the host's own mesh address: which used to be enough.
            let code = curl_as_nobody(&lab, host, "POST", &api("/v1/admin/invite"), invite)?;
            ensure!(
                code == 401,
                "nobody on {host}: POST /v1/admin/invite got {code}, want 401"
            );
            let code = curl_as_nobody(&lab, host, "GET", &api("/v1/admin/hosts"), "")?;
            ensure!(
                code == 401,
                "nobody on {host}: GET /v1/admin/hosts got {code}, want 401"
            );
        }
        for path in ["/v1/rotate/prepare", "/v1/rotate/commit"] {
            let code = curl_as_nobody(&lab, "dock-mirror", "POST", &api(path), next)?;
            ensure!(
                code == 401,
                "nobody on dock-mirror: POST {path} got {code}, want 401"
            );
        }
        // meshctl needs the root-owned control socket; the key file is the root's alone (0600,
        // whatever the directories around it allow).
        for host in MEMBERS {
            let mode = lab.exec_ok(host, &["stat", "-c", "%a:%U", "/etc/meshd/private.key"])?;
            ensure!(mode.trim() == "600:root", "{host}'s private key is {mode}");
            let out = as_nobody(&lab, host, &["meshctl", "invite", "intruder"])?;
            ensure!(!out.status.success(), "nobody ran meshctl invite on {host}");
            let out = as_nobody(&lab, host, &["cat", "/etc/meshd/private.key"])?;
            ensure!(
                !out.status.success(),
                "nobody read the private key on {host}"
            );
        }
        ensure!(lab.registry()? == before, "the registry changed");
        ensure!(
            public_key(&lab, "dock-mirror")? == mirror_key,
            "dock-mirror's key changed"
        );
        let invites = lab.meshctl(COORDINATOR, &["invites", "--json"])?;
        ensure!(!invites.contains("intruder"), "{invites}");
        // The refusals show on the coordinator.
        let status = lab.status(COORDINATOR, &[])?;
        ensure!(status.contains("api refusals:"), "{status}");
        ensure!(status.contains("not signed"), "{status}");
        lab.wait_mesh_pings(&MEMBERS, Duration::from_secs(10))
    })();
    drop(f);
    lab.with_logs(&MEMBERS, r)
}

/// An underlay neighbour (dock-dash, not a member) asks the key-notice port, which faces the
/// internet, about dock-prod's key and about a made-up key: the same refusal for both, so it
/// learns nothing, not even whether notices wait.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn key_notices_are_only_for_a_host_proving_its_key() -> Result<()> {
    let _g = meshlab::one_lab_at_a_time();
    let (lab, f) = fleet()?;
    let r = (|| -> Result<()> {
        // A coordinator rotation leaves a notice for every host.
        lab.meshctl(COORDINATOR, &["rotate"])?;
        let prod = key_hex(&public_key(&lab, "dock-prod")?)?;
        let made_up = "11".repeat(32);
        let mut answers = Vec::new();
        for key in [&prod, &made_up] {
            let out = lab.exec(
                "dock-dash",
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "-w",
                    " %{http_code}",
                    &format!("http://{LOAD_UNDERLAY}:{MESH_PORT}/v1/key-notices/{key}"),
                ],
            )?;
            answers.push(String::from_utf8_lossy(&out.stdout).to_string());
        }
        ensure!(
            answers[0].ends_with(" 403"),
            "dock-prod's notices: {}",
            answers[0]
        );
        ensure!(answers[0] == answers[1], "the answers differ: {answers:?}");
        lab.wait_mesh_pings(&MEMBERS, Duration::from_secs(15))
    })();
    drop(f);
    lab.with_logs(&MEMBERS, r)
}

/// Invitations name the coordinator's current key: a host invited after the coordinator
/// rotated its key joins.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn a_join_works_after_the_coordinator_rotated() -> Result<()> {
    let _g = meshlab::one_lab_at_a_time();
    let lab = Lab::build(LabOpts::with_hosts(&["dock-load", "dock-prod"]))?;
    let engine = meshlab::engine_command(lab.bin_dir());
    let mut f = meshlab::ManagedFleet::default();
    let r = (|| -> Result<()> {
        f.meshd
            .insert(COORDINATOR.into(), lab.start_coordinator(&engine)?);
        let before = public_key(&lab, COORDINATOR)?;
        lab.meshctl(COORDINATOR, &["rotate"])?;
        let after = public_key(&lab, COORDINATOR)?;
        ensure!(before != after, "the coordinator's key did not change");
        let token = lab.invite("dock-prod", &[])?;
        f.meshd.insert(
            "dock-prod".into(),
            lab.join_host("dock-prod", &token, JoinMode::Command)?,
        );
        lab.wait_mesh_pings(&["dock-load", "dock-prod"], MESH_TIMEOUT)
    })();
    drop(f);
    lab.with_logs(&["dock-load", "dock-prod"], r)
}

/// With the coordinator's meshd stopped, an unprivileged process on the coordinator host takes
/// the API port and answers every netmap request with an empty netmap. Members ignore it (no
/// proof of the coordinator's key), keep their netmap and say why in `meshctl status`.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn a_squatter_on_the_api_port_cannot_serve_a_netmap() -> Result<()> {
    let _g = meshlab::one_lab_at_a_time();
    let (lab, mut f) = fleet()?;
    let r = (|| -> Result<()> {
        let peers_before = lab.exec_ok("dock-mirror", &["wg", "show", "wgmesh0", "peers"])?;
        lab.stop_meshd(f.meshd[COORDINATOR], libc::SIGTERM)?;
        let script = format!(
            r#"
import http.server, json
body = json.dumps({{"version": 999999, "mesh_cidr": "10.99.99.0/24", "name": "dock-mirror",
    "address": "10.99.99.3", "public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "peers": []}}).encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
http.server.HTTPServer(("{LOAD}", {API_PORT}), H).serve_forever()
"#
        );
        let mut argv: Vec<&str> = NOBODY.to_vec();
        // Debian's python3: a per-user toolchain under /root is not for `nobody`.
        argv.extend_from_slice(&["/usr/bin/python3", "-c", &script]);
        let squatter_log = lab.host_dir(COORDINATOR).join("squatter.log");
        let squatter = lab.spawn(COORDINATOR, &argv, Some(&squatter_log))?;
        let result = (|| -> Result<()> {
            // The squatter answers (unsigned) ...
            poll_until(Duration::from_secs(10), "the squatter to answer", || {
                let out = lab.exec(
                    "dock-mirror",
                    &["curl", "-s", "--max-time", "2", &api("/v1/netmap")],
                )?;
                Ok(String::from_utf8_lossy(&out.stdout).contains("999999"))
            })?;
            // ... and dock-mirror, which asks every few seconds, says it does not prove the key.
            poll_until(
                Duration::from_secs(30),
                "dock-mirror's status to name the unproven answer",
                || {
                    let st = lab.status("dock-mirror", &[])?;
                    Ok(st.contains("does not prove the coordinator's key"))
                },
            )?;
            let peers_now = lab.exec_ok("dock-mirror", &["wg", "show", "wgmesh0", "peers"])?;
            ensure!(
                peers_now == peers_before,
                "dock-mirror's peers changed:\n{peers_before}\n->\n{peers_now}"
            );
            let st = lab.status("dock-mirror", &["--json"])?;
            ensure!(
                !st.contains("999999"),
                "dock-mirror took the squatter's netmap: {st}"
            );
            Ok(())
        })();
        lab.signal(squatter, libc::SIGKILL);
        let _ = lab.wait_exit(squatter, Duration::from_secs(5))?;
        result.with_context(|| {
            format!(
                "the squatter's output: {}",
                std::fs::read_to_string(&squatter_log).unwrap_or_default()
            )
        })?;
        let p = lab.start_meshd(COORDINATOR)?;
        f.meshd.insert(COORDINATOR.into(), p);
        lab.wait_meshctl(COORDINATOR, p, &["hosts"], Duration::from_secs(30))?;
        lab.wait_mesh_pings(&MEMBERS, Duration::from_secs(30))
    })();
    drop(f);
    lab.with_logs(&MEMBERS, r)
}
