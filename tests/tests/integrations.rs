//! The mesh handed to K3s, DRBD, Prometheus, `/etc/hosts` and DNS (issue 7, "Must show"):
//! dock-load runs the coordinator and the K3s server, the others join as K3s agents; every
//! host keeps the integration files, serves mesh DNS on its mesh address and `/metrics` on
//! :51873.
//!
//! Needs meshd, meshctl and meshd-wg next to the test binary (or in `$MESHLAB_BIN_DIR`), curl,
//! dig (dnsutils), promtool and drbdadm: `cargo build --workspace --bins && cargo test -p
//! meshlab --test integrations -- --test-threads=1 --nocapture` (as root). Measured times are
//! printed with `eprintln!`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use meshlab::coord::API_PORT;
use meshlab::{poll_for, poll_until, JoinMode, Lab, LabOpts, COORDINATOR, MESH_IFACE};
use serde_json::Value;

/// After `meshctl join` returns, every file and every DNS server knows the new host (issue 7).
const JOIN_BUDGET: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_secs(60);
/// How long the reload counters are watched after a change (they must not move again).
const QUIET: Duration = Duration::from_secs(4);

const K3S_DROPIN: &str = "/etc/rancher/k3s/config.yaml.d/90-meshd.yaml";
const FILE_SD: &str = "/etc/prometheus/file_sd/meshd.json";
const HOSTS: &str = "/etc/hosts";
const DRBD_RES: &str = "/etc/drbd.d/r0.res";
const TEMPLATE_SRC: &str = "/etc/meshd/peers.j2";
const TEMPLATE_OUT: &str = "/etc/meshd-test/peers.txt";
/// Each reload command appends a line to `RELOADS/NAME`.
const RELOADS: &str = "/etc/meshd-test/reloads";
const GOOD_TEMPLATE: &str =
    "{% for h in hosts %}{{ h.name }} {{ h.address }} {{ h.role }}\n{% endfor %}";
/// What /etc/hosts holds before meshd adds its block (and after `meshctl down`).
const KEPT_HOSTS: &str = "127.0.0.1\tlocalhost\n# kept by meshd\n";
/// `nmae`: undefined variables are errors, not empty strings.
const BROKEN_TEMPLATE: &str = "{% for h in hosts %}{{ h.nmae }}\n{% endfor %}";
/// The outputs every host keeps, as status and doctor name them, with their reload counter.
const OUTPUTS: [(&str, &str); 5] = [
    ("k3s", "k3s"),
    ("drbd:r0", "drbd"),
    ("prometheus", "prometheus"),
    ("hosts", "hosts"),
    ("template:peers", "peers"),
];

fn serial() -> std::sync::MutexGuard<'static, ()> {
    meshlab::one_lab_at_a_time()
}

fn mesh(host: &str) -> Ipv4Addr {
    meshlab::topology::mesh_addr(host).unwrap_or(Ipv4Addr::UNSPECIFIED)
}

fn reload(name: &str) -> String {
    format!("reload = [\"sh\", \"-c\", \"echo reload >> {RELOADS}/{name}\"]")
}

/// `host`'s `[dns]` and `[integrations]`: K3s server on the coordinator, agents elsewhere;
/// DRBD r0 between dock-load and dock-prod (its dry run is `drbdadm dump`: no kernel module
/// here); every command logs itself.
fn integrations_toml(host: &str) -> String {
    let k3s = if host == COORDINATOR {
        "role = \"server\"".to_owned()
    } else {
        format!("server = \"{COORDINATOR}\"")
    };
    // /metrics on loopback too: the coordinator only (the others keep the default, off).
    let loopback = host == COORDINATOR;
    format!(
        r#"
[dns]
listen_port = 53

[metrics]
loopback = {loopback}

[integrations.k3s]
{k3s}
{k3s_reload}

[[integrations.drbd]]
resource = "r0"
hosts = ["dock-load", "dock-prod"]
disk = "/dev/vg0/r0"
check = ["drbdadm", "-c", "{DRBD_RES}", "dump", "r0"]
{drbd_reload}

[integrations.prometheus]
{prom_reload}

[integrations.hosts]
{hosts_reload}

[[integrations.template]]
name = "peers"
source = "{TEMPLATE_SRC}"
path = "{TEMPLATE_OUT}"
{peers_reload}
"#,
        k3s_reload = reload("k3s"),
        drbd_reload = reload("drbd"),
        prom_reload = reload("prometheus"),
        hosts_reload = reload("hosts"),
        peers_reload = reload("peers"),
    )
}

/// The template and the reload log directory, before meshd starts.
fn prepare(lab: &Lab, host: &str) -> Result<()> {
    lab.sh(host, &format!("mkdir -p {RELOADS}"))?;
    lab.write_file(host, HOSTS, KEPT_HOSTS.as_bytes())?;
    lab.write_file(host, TEMPLATE_SRC, GOOD_TEMPLATE.as_bytes())
}

fn start_coordinator(lab: &Lab) -> Result<meshlab::ProcId> {
    prepare(lab, COORDINATOR)?;
    let engine = meshlab::engine_command(lab.bin_dir());
    lab.start_coordinator_with(&engine, &integrations_toml(COORDINATOR))
}

fn join(lab: &Lab, host: &str) -> Result<meshlab::ProcId> {
    prepare(lab, host)?;
    let token = lab.invite(host, &[])?;
    lab.join_host_with(host, &token, JoinMode::Command, &integrations_toml(host))
}

/// How many times each reload command ran on `host`.
fn reload_counts(lab: &Lab, host: &str) -> Result<BTreeMap<&'static str, usize>> {
    let mut out = BTreeMap::new();
    for (_, counter) in OUTPUTS {
        let n = lab
            .read_file(host, &format!("{RELOADS}/{counter}"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        out.insert(counter, n);
    }
    Ok(out)
}

/// The lines of the `# BEGIN meshd` block of `host`'s /etc/hosts (without the markers).
fn hosts_block(lab: &Lab, host: &str) -> Result<Vec<String>> {
    let text = lab.read_file(host, HOSTS)?;
    let mut inside = false;
    let mut lines = Vec::new();
    for l in text.lines() {
        if l.starts_with("# BEGIN meshd") {
            inside = true;
        } else if l.starts_with("# END meshd") {
            inside = false;
        } else if inside {
            lines.push(l.to_owned());
        }
    }
    Ok(lines)
}

fn want_hosts_block(hosts: &[&str]) -> Vec<String> {
    let mut hosts = hosts.to_vec();
    hosts.sort();
    hosts
        .iter()
        .map(|h| format!("{}\t{h}.mesh.internal {h}", mesh(h)))
        .collect()
}

/// The file_sd groups as (target, job, host, role).
fn file_sd(lab: &Lab, host: &str) -> Result<BTreeSet<(String, String, String, String)>> {
    let text = lab.read_file(host, FILE_SD)?;
    parse_sd(&text).with_context(|| format!("{host}:{FILE_SD}"))
}

/// The coordinator's http_sd, fetched over the mesh from `from`.
fn http_sd(lab: &Lab, from: &str) -> Result<BTreeSet<(String, String, String, String)>> {
    let text = lab.exec_ok(
        from,
        &[
            "curl",
            "-sf",
            "--max-time",
            "5",
            &format!(
                "http://{}:{API_PORT}/v1/prometheus/targets",
                mesh(COORDINATOR)
            ),
        ],
    )?;
    parse_sd(&text).with_context(|| format!("http_sd from {from}"))
}

fn parse_sd(text: &str) -> Result<BTreeSet<(String, String, String, String)>> {
    let v: Value = serde_json::from_str(text).with_context(|| text.to_owned())?;
    let mut out = BTreeSet::new();
    for g in v
        .as_array()
        .ok_or_else(|| anyhow!("not an array: {text}"))?
    {
        let labels = g
            .get("labels")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("a group without labels: {g}"))?;
        let keys: BTreeSet<&str> = labels.keys().map(String::as_str).collect();
        assert_eq!(keys, BTreeSet::from(["host", "job", "role"]), "{g}");
        let targets = g
            .get("targets")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("a group without targets: {g}"))?;
        for t in targets {
            let s = |k: &str| labels[k].as_str().unwrap_or_default().to_owned();
            out.insert((
                t.as_str().unwrap_or_default().to_owned(),
                s("job"),
                s("host"),
                s("role"),
            ));
        }
    }
    Ok(out)
}

fn want_file_sd(hosts: &[&str]) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for h in hosts {
        let role = if *h == COORDINATOR {
            "coordinator"
        } else {
            "member"
        };
        for (job, port) in [("node", 9100), ("meshd", 51873)] {
            out.insert((
                format!("{}:{port}", mesh(h)),
                job.to_owned(),
                h.to_string(),
                role.to_owned(),
            ));
        }
    }
    out
}

fn want_template(hosts: &[&str]) -> String {
    let mut hosts = hosts.to_vec();
    hosts.sort();
    hosts
        .iter()
        .map(|h| {
            let role = if *h == COORDINATOR {
                "coordinator"
            } else {
                "member"
            };
            format!("{h} {} {role}\n", mesh(h))
        })
        .collect()
}

/// `dig @server NAME` from `from`: the status and the A answers.
fn dig(lab: &Lab, from: &str, server: Ipv4Addr, name: &str) -> Result<(String, Vec<String>)> {
    let out = lab.exec(
        from,
        &[
            "dig",
            "+time=1",
            "+tries=1",
            "+norecurse",
            &format!("@{server}"),
            name,
            "A",
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or_default().to_owned())
        .unwrap_or_else(|| format!("no answer ({})", text.trim()));
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[3] == "A").then(|| f[4].to_owned())
        })
        .collect();
    Ok((status, answers))
}

/// Everything `host` should hold for a mesh of `hosts`: the files, and its DNS answering for
/// each of them.
fn host_is_current(lab: &Lab, host: &str, hosts: &[&str]) -> Result<bool> {
    if hosts_block(lab, host)? != want_hosts_block(hosts) {
        return Ok(false);
    }
    if file_sd(lab, host).unwrap_or_default() != want_file_sd(hosts) {
        return Ok(false);
    }
    if lab.read_file(host, TEMPLATE_OUT).unwrap_or_default() != want_template(hosts) {
        return Ok(false);
    }
    for h in hosts {
        let (status, answers) = dig(lab, host, mesh(host), &format!("{h}.mesh.internal"))?;
        if status != "NOERROR" || answers != [mesh(h).to_string()] {
            return Ok(false);
        }
    }
    Ok(true)
}

fn k3s_yaml(lab: &Lab, host: &str) -> Result<BTreeMap<String, serde_yaml::Value>> {
    let text = lab.read_file(host, K3S_DROPIN)?;
    serde_yaml::from_str(&text).with_context(|| format!("{host}:{K3S_DROPIN}:\n{text}"))
}

fn yaml_str(v: &serde_yaml::Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

fn check_k3s(lab: &Lab, host: &str) -> Result<()> {
    let y = k3s_yaml(lab, host)?;
    let keys: Vec<&str> = y.keys().map(String::as_str).collect();
    let addr = mesh(host).to_string();
    assert_eq!(yaml_str(&y["node-ip"]), addr, "{host}: {y:?}");
    assert_eq!(yaml_str(&y["flannel-iface"]), MESH_IFACE, "{host}: {y:?}");
    if host == COORDINATOR {
        let mut want = vec!["advertise-address", "flannel-iface", "node-ip", "tls-san+"];
        want.sort();
        assert_eq!(keys, want, "{host}: {y:?}");
        assert_eq!(yaml_str(&y["advertise-address"]), addr);
        let san: Vec<String> = y["tls-san+"]
            .as_sequence()
            .map(|s| s.iter().map(yaml_str).collect())
            .unwrap_or_default();
        assert_eq!(
            san,
            [addr, format!("{host}.mesh.internal")],
            "{host}: {y:?}"
        );
    } else {
        assert_eq!(
            keys,
            ["flannel-iface", "node-ip", "server"],
            "{host}: {y:?}"
        );
        assert_eq!(
            yaml_str(&y["server"]),
            format!("https://{}:6443", mesh(COORDINATOR)),
            "{host}: {y:?}"
        );
    }
    Ok(())
}

/// The resource parses with drbd-utils (on this host: the lab host's name is its UTS name),
/// with each host at its mesh address. A two-host resource carries no `node-id` (drbd 8.4's
/// drbdadm refuses it); DRBD 9's drbdadm assigns them itself (0 and 1, by address).
fn check_drbd(lab: &Lab, host: &str) -> Result<()> {
    let res = lab.read_file(host, DRBD_RES)?;
    assert!(!res.contains("node-id"), "{host}: {res}");
    let dump = lab.exec_ok(host, &["drbdadm", "-c", DRBD_RES, "dump", "r0"])?;
    let mut ids = Vec::new();
    for h in ["dock-load", "dock-prod"] {
        let on = dump
            .split(&format!("on {h} {{"))
            .nth(1)
            .ok_or_else(|| anyhow!("{host}: no `on {h}` in drbdadm dump:\n{dump}"))?;
        let on = on
            .split('}')
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        ids.push(
            on.split("node-id ")
                .nth(1)
                .and_then(|r| r.split(';').next())
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("{host}: no node-id for {h} in drbdadm dump:\n{dump}"))?,
        );
        assert!(
            on.contains(&format!("address ipv4 {}:7788;", mesh(h))),
            "{host}: {h}:\n{dump}"
        );
    }
    ids.sort();
    assert_eq!(
        ids,
        ["0", "1"],
        "{host}: node-ids drbdadm assigned:\n{dump}"
    );
    Ok(())
}

/// `meshctl status` lists each integration on one line, all ok.
fn check_status_lines(lab: &Lab, host: &str) -> Result<()> {
    let st = lab.status(host, &[])?;
    let lines: Vec<&str> = st
        .lines()
        .filter(|l| l.starts_with("integration:"))
        .collect();
    assert_eq!(lines.len(), OUTPUTS.len(), "{host}:\n{st}");
    for (name, _) in OUTPUTS {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!(" {name} /")) && l.contains(" ok")),
            "{host}: {name}:\n{st}"
        );
    }
    Ok(())
}

/// Watch the reload counters for [`QUIET`]: they must reach `want` and not pass it.
fn expect_counts(lab: &Lab, host: &str, want: &BTreeMap<&'static str, usize>) -> Result<()> {
    let end = Instant::now() + QUIET;
    loop {
        let got = reload_counts(lab, host)?;
        if got.iter().any(|(k, n)| *n > want[k]) {
            bail!("{host}: a reload ran more than once: got {got:?}, want {want:?}");
        }
        if Instant::now() >= end {
            if got != *want {
                bail!("{host}: reloads: got {got:?}, want {want:?}");
            }
            return Ok(());
        }
        std::thread::sleep(meshlab::poll::POLL_INTERVAL);
    }
}

// ------------------------------------------------------------------------------------ tests

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn files_dns_and_metrics_follow_the_mesh() -> Result<()> {
    let _g = serial();
    let lab = Lab::build(LabOpts::with_hosts(&[
        "dock-load",
        "dock-prod",
        "dock-mirror",
    ]))?;
    start_coordinator(&lab)?;
    join(&lab, "dock-prod")?;
    let two = ["dock-load", "dock-prod"];
    for h in two {
        poll_until(SETTLE, &format!("{h}'s files and DNS for {two:?}"), || {
            host_is_current(&lab, h, &two)
        })?;
    }

    // The files of each role parse and hold exactly what K3s, DRBD and Prometheus need.
    for h in two {
        check_k3s(&lab, h)?;
        check_drbd(&lab, h)?;
        assert_eq!(file_sd(&lab, h)?, want_file_sd(&two), "{h}");
        // The rest of /etc/hosts is kept.
        let hosts = lab.read_file(h, HOSTS)?;
        assert!(hosts.starts_with(KEPT_HOSTS), "{h}:\n{hosts}");
        check_status_lines(&lab, h)?;
    }
    // Prometheus accepts a configuration that reads the file_sd output.
    lab.write_file(
        COORDINATOR,
        "/etc/prometheus/prometheus.yml",
        format!(
            "scrape_configs:\n  - job_name: mesh\n    file_sd_configs:\n      - files: [\"{FILE_SD}\"]\n  \
             - job_name: mesh-http\n    http_sd_configs:\n      - url: \"http://{}:{API_PORT}/v1/prometheus/targets\"\n",
            mesh(COORDINATOR)
        )
        .as_bytes(),
    )?;
    let out = lab.exec_ok(
        COORDINATOR,
        &[
            "promtool",
            "check",
            "config",
            "/etc/prometheus/prometheus.yml",
        ],
    )?;
    eprintln!("promtool check config: {}", out.trim());

    // Mesh DNS: every host answers for every host, NXDOMAIN for names it does not know.
    lab.wait_mesh_pings(&two, SETTLE)?;
    // The coordinator serves the whole mesh as Prometheus http_sd.
    assert_eq!(http_sd(&lab, "dock-prod")?, want_file_sd(&two));
    for from in two {
        for server in two {
            let (status, answers) = dig(&lab, from, mesh(server), "dock-prod.mesh.internal")?;
            assert_eq!(
                (status.as_str(), answers),
                ("NOERROR", vec![mesh("dock-prod").to_string()]),
                "dig @{server} from {from}"
            );
            let (status, answers) = dig(&lab, from, mesh(server), "nosuch.mesh.internal")?;
            assert_eq!(status, "NXDOMAIN", "dig @{server} nosuch from {from}");
            assert!(answers.is_empty());
        }
    }

    // /metrics over the mesh passes promtool and carries the peers by name.
    let metrics = lab.exec_ok(
        "dock-prod",
        &[
            "curl",
            "-sf",
            "--max-time",
            "5",
            &format!("http://{}:51873/metrics", mesh(COORDINATOR)),
        ],
    )?;
    lab.write_file(
        "dock-prod",
        "/etc/meshd-test/metrics.txt",
        metrics.as_bytes(),
    )?;
    let lint = lab.sh(
        "dock-prod",
        "promtool check metrics < /etc/meshd-test/metrics.txt 2>&1",
    )?;
    eprintln!("promtool check metrics: {}", lint.trim());
    for want in [
        "wireguard_sent_bytes_total{",
        "friendly_name=\"dock-prod\"",
        "meshd_netmap_version ",
        "meshd_coordinator_reachable 1",
        "meshd_reconcile_duration_seconds_bucket",
        "meshd_key_age_seconds",
        "meshd_peer_sent_bytes_total{interface=\"wgmesh0\",peer=\"dock-prod\"}",
        "meshd_peer_info{interface=\"wgmesh0\",peer=\"dock-prod\",public_key=",
        "meshd_build_info{version=",
        "meshd_reconcile_last_success_timestamp_seconds ",
        // The coordinator's own figures, on its host only.
        "meshd_coordinator_hosts ",
        "meshd_coordinator_long_poll_clients ",
        "meshd_coordinator_joins_total ",
        "meshd_coordinator_api_request_duration_seconds_count ",
    ] {
        assert!(metrics.contains(want), "{want} missing:\n{metrics}");
    }
    // `[metrics] loopback = true` on the coordinator: the same /metrics on 127.0.0.1; the
    // default (dock-prod) leaves loopback alone.
    let local = lab.exec_ok(
        COORDINATOR,
        &[
            "curl",
            "-sf",
            "--max-time",
            "5",
            "http://127.0.0.1:51873/metrics",
        ],
    )?;
    assert!(local.contains("meshd_coordinator_hosts "), "{local}");
    let refused = lab.exec(
        "dock-prod",
        &[
            "curl",
            "-sf",
            "--max-time",
            "5",
            "http://127.0.0.1:51873/metrics",
        ],
    )?;
    assert!(
        !refused.status.success(),
        "dock-prod serves /metrics on loopback without [metrics] loopback = true"
    );

    // dock-mirror joins: every file and every DNS server knows it within 2 s; each reload that
    // has something new to load runs exactly once (K3s and DRBD have nothing new: not at all).
    let before: BTreeMap<&str, BTreeMap<&'static str, usize>> = two
        .iter()
        .map(|h| Ok((*h, reload_counts(&lab, h)?)))
        .collect::<Result<_>>()?;
    prepare(&lab, "dock-mirror")?;
    let token = lab.invite("dock-mirror", &[])?;
    lab.start_unjoined_with("dock-mirror", &integrations_toml("dock-mirror"))?;
    let three = ["dock-load", "dock-prod", "dock-mirror"];
    lab.join("dock-mirror", &token)?;
    let t0 = Instant::now();
    let mut done: BTreeMap<&str, Duration> = BTreeMap::new();
    poll_until(SETTLE, "every host's files and DNS for the three", || {
        for h in three {
            if !done.contains_key(h) && host_is_current(&lab, h, &three)? {
                done.insert(h, t0.elapsed());
            }
        }
        Ok(done.len() == three.len())
    })?;
    let slowest = done.values().max().copied().unwrap_or_default();
    eprintln!(
        "MEASURED join -> files and DNS current: {}; slowest {:.2} s",
        done.iter()
            .map(|(h, t)| format!("{h} {:.2} s", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        slowest.as_secs_f64()
    );
    assert!(
        slowest <= JOIN_BUDGET,
        "files and DNS took {slowest:?} (budget {JOIN_BUDGET:?})"
    );
    for h in two {
        let mut want = before[h].clone();
        for c in ["prometheus", "hosts", "peers"] {
            *want.get_mut(c).ok_or_else(|| anyhow!("{c}"))? += 1;
        }
        expect_counts(&lab, h, &want)?;
    }
    check_k3s(&lab, "dock-mirror")?;
    // dock-mirror is not in r0: it gets no resource file and no DRBD status line.
    assert!(lab.read_file("dock-mirror", DRBD_RES).is_err());
    let counts = reload_counts(&lab, "dock-mirror")?;
    assert_eq!(counts["drbd"], 0, "{counts:?}");
    for c in ["k3s", "prometheus", "hosts", "peers"] {
        assert_eq!(counts[c], 1, "dock-mirror: {counts:?}");
    }
    lab.wait_mesh_pings(&three, SETTLE)?;
    assert_eq!(http_sd(&lab, "dock-mirror")?, want_file_sd(&three));
    for from in three {
        for server in three {
            let (status, answers) = dig(&lab, from, mesh(server), "dock-prod.mesh.internal")?;
            assert_eq!(status, "NOERROR", "dig @{server} from {from}");
            assert_eq!(answers, [mesh("dock-prod").to_string()]);
        }
    }
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn broken_template_keeps_the_old_file_and_doctor_reports_it() -> Result<()> {
    let _g = serial();
    let lab = Lab::build(LabOpts::with_hosts(&["dock-load", "dock-prod"]))?;
    start_coordinator(&lab)?;
    let one = [COORDINATOR];
    poll_until(SETTLE, "dock-load's files", || {
        host_is_current(&lab, COORDINATOR, &one)
    })?;
    let before = lab.read_file(COORDINATOR, TEMPLATE_OUT)?;

    // A broken template: the file stays, status and doctor say why.
    lab.write_file(COORDINATOR, TEMPLATE_SRC, BROKEN_TEMPLATE.as_bytes())?;
    lab.meshctl(COORDINATOR, &["reload"])?;
    let check = poll_for(SETTLE, "doctor to report the template", || {
        let out = lab.meshctl_output(COORDINATOR, &["doctor", "--json"])?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
        Ok(v["checks"].as_array().and_then(|c| {
            c.iter()
                .find(|c| c["name"] == "integration template:peers" && c["status"] == "fail")
                .cloned()
        }))
    })?;
    let detail = check["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("nmae"), "{check}");
    assert!(detail.contains("the old file is kept"), "{check}");
    let out = lab.meshctl_output(COORDINATOR, &["doctor"])?;
    assert!(!out.status.success(), "doctor exits non-zero on a FAIL");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("integration template:peers")),
        "{text}"
    );
    let st = lab.status(COORDINATOR, &[])?;
    assert!(
        st.lines()
            .any(|l| l.contains("template:peers") && l.contains("FAILED")),
        "{st}"
    );
    assert_eq!(lab.read_file(COORDINATOR, TEMPLATE_OUT)?, before);
    let reloads = reload_counts(&lab, COORDINATOR)?["peers"];

    // The mesh changes while the template is broken: the other files follow, this one stays.
    join(&lab, "dock-prod")?;
    let two = ["dock-load", "dock-prod"];
    poll_until(SETTLE, "dock-load's hosts block with dock-prod", || {
        Ok(hosts_block(&lab, COORDINATOR)? == want_hosts_block(&two))
    })?;
    assert_eq!(lab.read_file(COORDINATOR, TEMPLATE_OUT)?, before);
    assert_eq!(
        reload_counts(&lab, COORDINATOR)?["peers"],
        reloads,
        "no reload for a template that did not render"
    );

    // Fixed and reloaded: the file catches up, doctor is happy.
    lab.write_file(COORDINATOR, TEMPLATE_SRC, GOOD_TEMPLATE.as_bytes())?;
    lab.meshctl(COORDINATOR, &["reload"])?;
    poll_until(SETTLE, "the fixed template's output", || {
        Ok(lab.read_file(COORDINATOR, TEMPLATE_OUT)? == want_template(&two))
    })?;
    // The status follows once the reload command has run (just after the file).
    poll_until(SETTLE, "doctor to pass the fixed template", || {
        let out = lab.meshctl_output(COORDINATOR, &["doctor", "--json"])?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let c = v["checks"]
            .as_array()
            .and_then(|c| {
                c.iter()
                    .find(|c| c["name"] == "integration template:peers")
                    .cloned()
            })
            .ok_or_else(|| anyhow!("no template check: {v}"))?;
        Ok(c["status"] == "ok")
    })?;

    // `meshctl down` takes the hosts block out and leaves the rest of /etc/hosts.
    lab.meshctl(COORDINATOR, &["down"])?;
    assert_eq!(lab.read_file(COORDINATOR, HOSTS)?, KEPT_HOSTS);
    Ok(())
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn a_static_fleet_gets_dns_files_and_metrics_from_its_config() -> Result<()> {
    let _g = serial();
    let two = ["dock-load", "dock-prod"];
    let lab = Lab::build(LabOpts::with_hosts(&two))?;
    let mut procs = Vec::new();
    let fleet = meshlab::Fleet::generate(&two, &meshlab::engine_command(lab.bin_dir()))?;
    lab.install_fleet(&fleet)?;
    for h in two {
        prepare(&lab, h)?;
        // No coordinator: hosts, template and DNS come from host.* and the [[peer]] entries.
        let config = lab.read_file(h, meshlab::fleet::CONFIG_PATH)?;
        let extra = format!(
            "\n[integrations.hosts]\n{}\n\n[[integrations.template]]\nname = \"peers\"\n\
             source = \"{TEMPLATE_SRC}\"\npath = \"{TEMPLATE_OUT}\"\n{}\n",
            reload("hosts"),
            reload("peers")
        );
        lab.write_file(
            h,
            meshlab::fleet::CONFIG_PATH,
            format!("{config}{extra}").as_bytes(),
        )?;
        procs.push(lab.start_meshd(h)?);
    }
    let member = |h: &str| format!("{h} {} member\n", mesh(h));
    for h in two {
        poll_until(SETTLE, &format!("{h}'s files from its config"), || {
            Ok(hosts_block(&lab, h)? == want_hosts_block(&two)
                && lab.read_file(h, TEMPLATE_OUT).unwrap_or_default()
                    == format!("{}{}", member("dock-load"), member("dock-prod")))
        })?;
    }
    lab.wait_mesh_pings(&two, SETTLE)?;
    for from in two {
        for server in two {
            for name in two {
                let (status, answers) =
                    dig(&lab, from, mesh(server), &format!("{name}.mesh.internal"))?;
                assert_eq!(status, "NOERROR", "dig @{server} {name} from {from}");
                assert_eq!(answers, [mesh(name).to_string()]);
            }
        }
    }
    for h in two {
        let counts = reload_counts(&lab, h)?;
        assert_eq!(
            (counts["hosts"], counts["peers"]),
            (1, 1),
            "{h}: {counts:?}"
        );
    }
    let metrics = lab.exec_ok(
        "dock-load",
        &[
            "curl",
            "-sf",
            "--max-time",
            "5",
            &format!("http://{}:51873/metrics", mesh("dock-prod")),
        ],
    )?;
    assert!(
        metrics.contains("friendly_name=\"dock-load\"")
            && metrics.contains("meshd_netmap_version 0")
            && !metrics.contains("meshd_coordinator_hosts"),
        "{metrics}"
    );

    // SIGHUP with a new integration: the engine is rebuilt and writes it.
    let config = lab.read_file("dock-prod", meshlab::fleet::CONFIG_PATH)?;
    lab.write_file(
        "dock-prod",
        meshlab::fleet::CONFIG_PATH,
        format!(
            "{config}\n[integrations.prometheus]\n{}\n",
            reload("prometheus")
        )
        .as_bytes(),
    )?;
    assert!(
        lab.signal(procs[1], libc::SIGHUP),
        "SIGHUP to dock-prod's meshd"
    );
    // A static view names every host a member (no coordinator).
    let want: BTreeSet<_> = want_file_sd(&two)
        .into_iter()
        .map(|(t, j, h, _)| (t, j, h, "member".to_owned()))
        .collect();
    poll_until(SETTLE, "dock-prod's file_sd after SIGHUP", || {
        Ok(file_sd(&lab, "dock-prod").unwrap_or_default() == want)
    })?;
    expect_counts(
        &lab,
        "dock-prod",
        &BTreeMap::from([
            ("k3s", 0),
            ("drbd", 0),
            ("prometheus", 1),
            ("hosts", 1),
            ("peers", 1),
        ]),
    )?;
    Ok(())
}
