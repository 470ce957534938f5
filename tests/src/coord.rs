//! The managed fleet (issue 3): dock-load runs the coordinator, the other daemon hosts join
//! with invitation tokens, the NAS joins as a static peer from a wg-quick config the
//! coordinator prints.
//!
//! Configs follow the documented format: the coordinator has a full `[host]` and a
//! `[coordinator]` table; a joining host has no name or address (the token brings them) and
//! either a `join_token_file` (unattended install) or a `meshctl join -` (token on stdin) after
//! start.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::fleet::{generate_keypair, CONFIG_PATH, KEEPALIVE_SECS, KEY_PATH, RECONCILE_SECS};
use crate::lab::{check_output, status_answered, Lab};
use crate::procs::ProcId;
use crate::topology::{self, MESH_IFACE, MESH_PORT};

/// The host that runs the coordinator.
pub const COORDINATOR: &str = "dock-load";
/// The coordinator's API port (on its mesh address, inside the tunnel).
pub const API_PORT: u16 = 51872;
/// The mesh the coordinator hands addresses out of.
pub const MESH_CIDR: &str = "10.99.99.0/24";
/// Where a joining host finds its token for an unattended join.
pub const TOKEN_PATH: &str = "/etc/meshd/join.token";
/// The daemon's state directory (membership, cached netmap, the coordinator's database).
pub const STATE_DIR: &str = "/var/lib/meshd";
/// The coordinator's SQLite registry.
pub const DATABASE: &str = "/var/lib/meshd/coordinator.db";
/// The static peer's wg-quick config.
pub const WG_QUICK_CONF: &str = "/etc/wireguard/wgmesh0.conf";
/// The static peer of the fleet.
pub const NAS: &str = "nas";
/// The port wireguard-go listens on in the NAS (its wg-quick `ListenPort`, from the
/// invitation's `--endpoint`).
pub const NAS_LISTEN_PORT: u16 = 51820;
/// The home host that routes the NAS's LAN address for the mesh (`routes.advertise`).
pub const NAS_ROUTER: &str = "dock-edge";
/// The NAS's LAN address as dock-edge advertises it.
pub const NAS_ROUTE: &str = "192.168.1.20/32";
/// What the hosts outside the home LAN opt in to (`routes.accept`).
pub const HOME_LAN: &str = "192.168.1.0/24";

/// The `[routes]` table of a managed host: dock-edge advertises the NAS, the hosts outside the
/// home LAN accept it (dock-mirror shares the LAN: its own LAN route reaches the NAS).
pub fn routes_toml(host: &str) -> String {
    if host == NAS_ROUTER {
        format!("[routes]\nadvertise = [\"{NAS_ROUTE}\"]\n")
    } else if topology::host(host).is_some_and(|h| h.role == topology::Role::Public) {
        format!("[routes]\naccept = [\"{HOME_LAN}\"]\n")
    } else {
        String::new()
    }
}

/// How long `meshctl join` / `meshctl invite` may take before the lab calls it hung.
pub const CLI_TIMEOUT_SECS: u32 = 60;

/// The address plan of the fleet: every host but the coordinator gets its planned address as a
/// static assignment, so the lab's addresses match the fleet table.
pub fn static_assignments() -> Vec<(&'static str, Ipv4Addr)> {
    ["dock-prod", "dock-mirror", "dock-edge", "dock-dash", NAS]
        .into_iter()
        .filter_map(|h| topology::mesh_addr(h).map(|a| (h, a)))
        .collect()
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// dock-load's `meshd.toml`: the coordinator role switched on.
pub fn render_coordinator_config(engine_command: &str) -> String {
    let load = topology::mesh_addr(COORDINATOR).unwrap_or(Ipv4Addr::new(10, 99, 99, 1));
    let underlay = topology::host(COORDINATOR)
        .and_then(|h| h.addr)
        .unwrap_or(Ipv4Addr::new(198, 51, 100, 1));
    let mut s = String::new();
    s.push_str("[host]\n");
    s.push_str(&format!("name = {}\n", toml_str(COORDINATOR)));
    s.push_str(&format!("address = \"{load}/{}\"\n", topology::MESH_PREFIX));
    s.push_str(&format!("interface = \"{MESH_IFACE}\"\n"));
    s.push_str(&format!("listen_port = {MESH_PORT}\n"));
    s.push_str(&format!("private_key_file = \"{KEY_PATH}\"\n"));
    s.push_str("\n[daemon]\n");
    s.push_str(&crate::fleet::backend_line(COORDINATOR));
    s.push_str(&format!("engine_command = {}\n", toml_str(engine_command)));
    s.push_str(&format!("reconcile_interval_secs = {RECONCILE_SECS}\n"));
    s.push_str(&format!("state_dir = \"{STATE_DIR}\"\n"));
    s.push_str("\n[coordinator]\n");
    s.push_str(&format!("mesh_cidr = \"{MESH_CIDR}\"\n"));
    s.push_str(&format!("api_port = {API_PORT}\n"));
    s.push_str(&format!(
        "public_endpoints = [\"{underlay}:{MESH_PORT}\"]\n"
    ));
    s.push_str(&format!("keepalive_secs = {KEEPALIVE_SECS}\n"));
    s.push_str(&format!("database = \"{DATABASE}\"\n"));
    s.push_str("\n[coordinator.static_assignments]\n");
    for (name, addr) in static_assignments() {
        s.push_str(&format!("{} = \"{addr}\"\n", toml_str(name)));
    }
    s
}

/// A joining host's `meshd.toml`: no name, no address, no peers; its key is generated on the
/// host at first start. With `token_file`, meshd joins from `TOKEN_PATH` at first start.
pub fn render_member_config(host: &str, engine_command: &str, token_file: bool) -> String {
    let mut s = String::new();
    s.push_str("[host]\n");
    s.push_str(&format!("interface = \"{MESH_IFACE}\"\n"));
    s.push_str(&format!("listen_port = {MESH_PORT}\n"));
    s.push_str(&format!("private_key_file = \"{KEY_PATH}\"\n"));
    s.push_str("\n[daemon]\n");
    s.push_str(&crate::fleet::backend_line(host));
    s.push_str(&format!("engine_command = {}\n", toml_str(engine_command)));
    s.push_str(&format!("reconcile_interval_secs = {RECONCILE_SECS}\n"));
    s.push_str(&format!("state_dir = \"{STATE_DIR}\"\n"));
    if token_file {
        s.push_str(&format!("join_token_file = \"{TOKEN_PATH}\"\n"));
    }
    s
}

/// How a daemon host joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinMode {
    /// `join_token_file` in the config, read by meshd at first start.
    TokenFile,
    /// meshd started without a token, then `meshctl join -` with the token on stdin.
    Command,
}

/// One host of the registry as `meshctl hosts --json` lists it (the fields a restart or a
/// refused join must not change).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostEntry {
    pub name: String,
    pub address: String,
    pub public_key: String,
    pub admin: bool,
    pub static_peer: bool,
    pub removed: bool,
}

/// The array of hosts in `meshctl hosts --json` output (a bare array, or `{"hosts": [...]}`).
fn hosts_array(json: &str) -> Result<Vec<Value>> {
    let v: Value =
        serde_json::from_str(json).with_context(|| format!("meshctl hosts --json: {json}"))?;
    match v {
        Value::Array(a) => Ok(a),
        Value::Object(mut m) => match m.remove("hosts") {
            Some(Value::Array(a)) => Ok(a),
            _ => bail!("no hosts array in {json}"),
        },
        _ => bail!("unexpected meshctl hosts --json output: {json}"),
    }
}

/// The hosts in `meshctl hosts --json` output, sorted.
pub fn parse_hosts(json: &str) -> Result<Vec<HostEntry>> {
    let arr = hosts_array(json)?;
    let s = |h: &Value, k: &str| h.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let b = |h: &Value, k: &str| h.get(k).and_then(Value::as_bool).unwrap_or(false);
    let mut out: Vec<HostEntry> = arr
        .iter()
        .map(|h| HostEntry {
            name: s(h, "name"),
            address: s(h, "address"),
            public_key: s(h, "public_key"),
            admin: b(h, "admin"),
            static_peer: b(h, "static_peer"),
            removed: b(h, "removed"),
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The observed address of each host in `meshctl hosts --json` output that has one.
pub fn observed_hosts(json: &str) -> Result<BTreeMap<String, String>> {
    let arr = hosts_array(json)?;
    Ok(arr
        .iter()
        .filter_map(|h| {
            let name = h.get("name")?.as_str()?;
            let observed = h.get("observed")?.as_str()?;
            Some((name.to_owned(), observed.to_owned()))
        })
        .collect())
}

/// The first `meshd1.` token in `meshctl invite` output.
pub fn parse_token(out: &str) -> Result<String> {
    out.split_whitespace()
        .find(|w| w.starts_with("meshd1."))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no meshd1. token in meshctl invite output: {out:?}"))
}

/// The `Address = ` of a wg-quick config (first one, without the prefix).
pub fn wg_quick_address(conf: &str) -> Option<String> {
    conf.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        if k.trim().eq_ignore_ascii_case("address") {
            let first = v.split(',').next()?.trim();
            Some(first.split('/').next()?.to_owned())
        } else {
            None
        }
    })
}

/// A managed fleet running in a lab: the meshd process of each daemon host.
#[derive(Debug, Default)]
pub struct ManagedFleet {
    pub meshd: BTreeMap<String, ProcId>,
    /// The hosts that joined (daemon hosts and static peers), in order.
    pub members: Vec<String>,
}

impl Lab {
    /// Write dock-load's key and coordinator config, start meshd, wait until the coordinator
    /// answers `meshctl hosts`.
    pub fn start_coordinator(&self, engine_command: &str) -> Result<ProcId> {
        self.start_coordinator_with(engine_command, "")
    }

    /// [`Lab::start_coordinator`] with `extra` TOML appended to the config (`[dns]`,
    /// `[integrations]`, ...).
    pub fn start_coordinator_with(&self, engine_command: &str, extra: &str) -> Result<ProcId> {
        let (private, _public) = generate_keypair();
        self.write_file_mode(
            COORDINATOR,
            KEY_PATH,
            format!("{private}\n").as_bytes(),
            0o600,
        )?;
        let config = format!("{}\n{extra}", render_coordinator_config(engine_command));
        self.write_file(COORDINATOR, CONFIG_PATH, config.as_bytes())?;
        let p = self.start_meshd(COORDINATOR)?;
        self.wait_meshctl(COORDINATOR, p, &["hosts"], Duration::from_secs(30))?;
        Ok(p)
    }

    /// Poll `meshctl ARGS` in `host` until it succeeds, failing at once (with the end of its
    /// log) if meshd `p` exits.
    pub fn wait_meshctl(&self, host: &str, p: ProcId, args: &[&str], t: Duration) -> Result<()> {
        let mut argv = vec!["meshctl"];
        argv.extend_from_slice(args);
        let deadline = Instant::now() + t;
        loop {
            if !self.is_running(p) {
                bail!(
                    "meshd on {host} exited; end of {}:\n{}",
                    self.meshd_log(host).display(),
                    self.log_tail(host, 15)
                );
            }
            let out = self.exec(host, &argv)?;
            // `status` answers with 4 (not joined) or 5 (in error) too.
            if out.status.success() || (args.first() == Some(&"status") && status_answered(&out)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "meshctl {} did not answer on {host} within {t:?}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            std::thread::sleep(crate::poll::POLL_INTERVAL);
        }
    }

    /// The last `n` lines of `host`'s meshd log.
    pub fn log_tail(&self, host: &str, n: usize) -> String {
        let text = std::fs::read_to_string(self.meshd_log(host)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Run `meshctl ARGS` in `host` under `timeout`, returning its output whatever the status.
    pub fn meshctl_output(&self, host: &str, args: &[&str]) -> Result<Output> {
        let t = CLI_TIMEOUT_SECS.to_string();
        let mut argv = vec!["timeout", t.as_str(), "meshctl"];
        argv.extend_from_slice(args);
        self.exec(host, &argv)
    }

    /// `meshctl invite NAME EXTRA...` on the coordinator: the token.
    pub fn invite(&self, name: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["invite", name];
        args.extend_from_slice(extra);
        let out = self.meshctl_output(COORDINATOR, &args)?;
        parse_token(&check_output(
            out,
            &format!("[{COORDINATOR}] meshctl invite {name}"),
        )?)
    }

    /// `meshctl invite NAME --static EXTRA...` on the coordinator: the wg-quick config.
    pub fn invite_static(&self, name: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["invite", name, "--static"];
        args.extend_from_slice(extra);
        let out = self.meshctl_output(COORDINATOR, &args)?;
        let what = format!("[{COORDINATOR}] meshctl {}", args.join(" "));
        let text = check_output(out, &what)?;
        if !text.contains("[Interface]") || !text.contains("PrivateKey") {
            bail!("{what} printed no wg-quick config: {text:?}");
        }
        Ok(text)
    }

    /// Invite the NAS as a static peer where it sits: `--endpoint` its LAN address and
    /// wireguard-go's port, `--near` a registered home host (behind the same NAT). First waits
    /// until the coordinator has observed every registered home host (so the NAS's wg-quick
    /// config lists them at their LAN addresses). With no home host registered: plain
    /// `--static`. Returns the wg-quick config.
    pub fn invite_nas(&self) -> Result<String> {
        let homes: Vec<String> = self
            .registry()?
            .into_iter()
            .filter(|h| {
                !h.static_peer
                    && !h.removed
                    && topology::host(&h.name).is_some_and(|d| d.role == topology::Role::Home)
            })
            .map(|h| h.name)
            .collect();
        let Some(near) = homes.first() else {
            return self.invite_static(NAS, &[]);
        };
        crate::poll::poll_until(
            Duration::from_secs(30),
            &format!("the coordinator to observe {}", homes.join(", ")),
            || {
                let observed = observed_hosts(&self.meshctl(COORDINATOR, &["hosts", "--json"])?)?;
                Ok(homes.iter().all(|h| observed.contains_key(h)))
            },
        )?;
        let lan = topology::host(NAS)
            .and_then(|d| d.addr)
            .ok_or_else(|| anyhow!("{NAS} has no LAN address in the topology"))?;
        let endpoint = format!("{lan}:{NAS_LISTEN_PORT}");
        self.invite_static(NAS, &["--endpoint", &endpoint, "--near", near])
    }

    /// The registry as the coordinator lists it (`meshctl hosts --json` on dock-load).
    pub fn registry(&self) -> Result<Vec<HostEntry>> {
        parse_hosts(&self.meshctl(COORDINATOR, &["hosts", "--json"])?)
    }

    /// Write a joining host's config (and token file), start meshd; in `Command` mode run
    /// `meshctl join -` (token on stdin) once meshd answers. Returns meshd's process.
    pub fn join_host(&self, host: &str, token: &str, mode: JoinMode) -> Result<ProcId> {
        self.join_host_with(host, token, mode, "")
    }

    /// [`Lab::join_host`] with `extra` TOML appended to the member config.
    pub fn join_host_with(
        &self,
        host: &str,
        token: &str,
        mode: JoinMode,
        extra: &str,
    ) -> Result<ProcId> {
        let engine = crate::fleet::engine_command(self.bin_dir());
        let config = format!(
            "{}\n{extra}",
            render_member_config(host, &engine, mode == JoinMode::TokenFile)
        );
        self.write_file(host, CONFIG_PATH, config.as_bytes())?;
        if mode == JoinMode::TokenFile {
            self.write_file_mode(host, TOKEN_PATH, format!("{token}\n").as_bytes(), 0o600)?;
        }
        let p = self.start_meshd(host)?;
        if mode == JoinMode::Command {
            self.wait_meshctl(host, p, &["status"], Duration::from_secs(30))?;
            self.join(host, token)?;
        }
        Ok(p)
    }

    /// Start meshd on `host` with a member config and no token (ready for `meshctl join`).
    pub fn start_unjoined(&self, host: &str) -> Result<ProcId> {
        self.start_unjoined_with(host, "")
    }

    /// [`Lab::start_unjoined`] with `extra` TOML appended to the member config.
    pub fn start_unjoined_with(&self, host: &str, extra: &str) -> Result<ProcId> {
        let engine = crate::fleet::engine_command(self.bin_dir());
        let config = format!("{}\n{extra}", render_member_config(host, &engine, false));
        self.write_file(host, CONFIG_PATH, config.as_bytes())?;
        let p = self.start_meshd(host)?;
        self.wait_meshctl(host, p, &["status"], Duration::from_secs(30))?;
        Ok(p)
    }

    /// `meshctl routes --json` on the coordinator: every host's prefixes with their state.
    pub fn routes(&self) -> Result<Vec<Value>> {
        let out = self.meshctl_output(COORDINATOR, &["routes", "--json"])?;
        let text = check_output(out, &format!("[{COORDINATOR}] meshctl routes --json"))?;
        match serde_json::from_str::<Value>(&text)
            .with_context(|| format!("meshctl routes --json printed {text:?}"))?
        {
            Value::Array(a) => Ok(a),
            other => bail!("meshctl routes --json printed no array: {other}"),
        }
    }

    /// The state of `prefix` of `host` in `meshctl routes --json` (`pending`, `approved`,
    /// `revoked`), `None` when not listed.
    pub fn route_state(&self, host: &str, prefix: &str) -> Result<Option<String>> {
        Ok(self
            .routes()?
            .iter()
            .find(|r| r["host"] == host && r["prefix"] == prefix)
            .and_then(|r| r["state"].as_str().map(str::to_owned)))
    }

    /// What an operator does: wait until `host` advertises `prefix` (listed by `meshctl
    /// routes`), then `meshctl routes approve HOST PREFIX` on the coordinator.
    pub fn approve_route(&self, host: &str, prefix: &str, timeout: Duration) -> Result<String> {
        crate::poll::poll_until(
            timeout,
            &format!("{host} to advertise {prefix} (meshctl routes on {COORDINATOR})"),
            || Ok(self.route_state(host, prefix)?.is_some()),
        )?;
        let out = self.meshctl_output(COORDINATOR, &["routes", "approve", host, prefix])?;
        check_output(
            out,
            &format!("[{COORDINATOR}] meshctl routes approve {host} {prefix}"),
        )
    }

    /// `meshctl join -` in `host` with `token` on stdin (never in argv, where other local
    /// users could read it); an error (with meshctl's message) if it fails.
    pub fn join(&self, host: &str, token: &str) -> Result<String> {
        let out = self.join_output(host, token)?;
        check_output(out, &format!("[{host}] meshctl join"))
    }

    /// `meshctl join -` in `host` with `token` on stdin, under the CLI timeout: its output.
    pub fn join_output(&self, host: &str, token: &str) -> Result<Output> {
        let t = CLI_TIMEOUT_SECS.to_string();
        self.exec_input(
            host,
            &["timeout", t.as_str(), "meshctl", "join", "-"],
            format!("{token}\n").as_bytes(),
        )
    }

    /// Bring the static peer up from the coordinator's wg-quick config: wg-quick with
    /// wireguard-go as the userspace implementation (no kernel WireGuard here).
    pub fn start_static_peer(&self, host: &str, conf: &str) -> Result<()> {
        self.write_file_mode(host, WG_QUICK_CONF, conf.as_bytes(), 0o600)?;
        let log = self.host_dir(host).join("wg-quick.log");
        let mut c = self.command(host, &["wg-quick", "up", WG_QUICK_CONF])?;
        c.env("WG_QUICK_USERSPACE_IMPLEMENTATION", "wireguard-go")
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdin(std::process::Stdio::null());
        let out = c.output().context("running wg-quick")?;
        let _ = std::fs::write(
            &log,
            [out.stdout.as_slice(), out.stderr.as_slice()].concat(),
        );
        check_output(out, &format!("[{host}] wg-quick up"))?;
        Ok(())
    }

    /// Bring the static peer up from its wg-quick config on the userspace `implementation`
    /// (`wireguard-go`) even where the kernel has WireGuard, which wg-quick would prefer: the
    /// implementation creates the interface, `wg setconf` takes `wg-quick strip`'s output, then
    /// the config's address and link up (the address' prefix route covers the mesh).
    pub fn start_static_peer_userspace(
        &self,
        host: &str,
        conf: &str,
        implementation: &str,
    ) -> Result<()> {
        self.write_file_mode(host, WG_QUICK_CONF, conf.as_bytes(), 0o600)?;
        let address = conf
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                k.trim()
                    .eq_ignore_ascii_case("address")
                    .then(|| v.split(',').next().unwrap_or_default().trim().to_owned())
            })
            .ok_or_else(|| anyhow!("no Address in the wg-quick config:\n{conf}"))?;
        let script = format!(
            "set -eu\n\
             WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 {implementation} {MESH_IFACE}\n\
             wg-quick strip {WG_QUICK_CONF} > /run/{MESH_IFACE}.stripped\n\
             wg setconf {MESH_IFACE} /run/{MESH_IFACE}.stripped\n\
             rm -f /run/{MESH_IFACE}.stripped\n\
             ip address add {address} dev {MESH_IFACE}\n\
             ip link set {MESH_IFACE} up\n"
        );
        self.sh(host, &script)
            .with_context(|| format!("[{host}] {implementation} from the wg-quick config"))?;
        Ok(())
    }

    /// Build the managed fleet: the coordinator on dock-load, then each of `members` joins
    /// (in order, in `mode`), then, with `nas`, the NAS as a static peer. Waits until each
    /// joined daemon answers `meshctl status`; does not wait for the mesh.
    pub fn form_managed_fleet(
        &self,
        members: &[&str],
        mode: JoinMode,
        nas: bool,
    ) -> Result<ManagedFleet> {
        let engine = crate::fleet::engine_command(self.bin_dir());
        let mut f = ManagedFleet::default();
        f.meshd
            .insert(COORDINATOR.into(), self.start_coordinator(&engine)?);
        for h in members {
            let token = self.invite(h, &[])?;
            let p = self.join_host(h, &token, mode)?;
            f.meshd.insert(h.to_string(), p);
            f.members.push(h.to_string());
        }
        if nas {
            let conf = self.invite_nas()?;
            self.start_static_peer(NAS, &conf)?;
            f.members.push(NAS.into());
        }
        Ok(f)
    }

    /// Wait until every ordered pair `(a, b)` pings over the mesh (`a` pings `b`'s planned
    /// mesh address), in parallel; an error lists the pairs that did not within `timeout`.
    pub fn wait_pair_pings(&self, pairs: &[(&str, &str)], timeout: Duration) -> Result<()> {
        std::thread::scope(|s| {
            let handles: Vec<_> = pairs
                .iter()
                .map(|&(a, b)| {
                    s.spawn(move || -> Result<()> {
                        let addr = self.mesh_addr(b)?;
                        crate::poll::poll_until(
                            timeout,
                            &format!("{a} to ping {b} ({addr}) over the mesh"),
                            || self.ping(a, addr),
                        )
                    })
                })
                .collect();
            let failed: Vec<String> = handles
                .into_iter()
                .filter_map(|h| match h.join() {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some("a ping thread panicked".into()),
                })
                .collect();
            if failed.is_empty() {
                Ok(())
            } else {
                bail!(
                    "{} of {} mesh pairs failed:\n  {}",
                    failed.len(),
                    pairs.len(),
                    failed.join("\n  ")
                )
            }
        })
    }

    /// Time from now until every host in `from` has a ping answered by `to` (each tried every
    /// 50 ms, in parallel), or an error naming the ones that did not within `timeout`.
    pub fn time_until_reachable(
        &self,
        from: &[&str],
        to: Ipv4Addr,
        timeout: Duration,
    ) -> Result<Vec<(String, Duration)>> {
        let t0 = Instant::now();
        let deadline = format!("{}", timeout.as_secs_f64());
        std::thread::scope(|s| {
            let handles: Vec<_> = from
                .iter()
                .map(|h| {
                    let deadline = deadline.clone();
                    s.spawn(move || -> Result<(String, Duration)> {
                        // One ping process probing every 50 ms until the first reply.
                        let out = self.exec(
                            h,
                            &[
                                "ping",
                                "-n",
                                "-q",
                                "-c",
                                "1",
                                "-i",
                                "0.05",
                                "-W",
                                "1",
                                "-w",
                                &deadline,
                                &to.to_string(),
                            ],
                        )?;
                        if out.status.success() {
                            Ok((h.to_string(), t0.elapsed()))
                        } else {
                            bail!("{h} got no answer from {to} within {timeout:?}")
                        }
                    })
                })
                .collect();
            let mut res = Vec::new();
            let mut failed = Vec::new();
            for h in handles {
                match h.join() {
                    Ok(Ok(r)) => res.push(r),
                    Ok(Err(e)) => failed.push(format!("{e:#}")),
                    Err(_) => failed.push("a ping thread panicked".into()),
                }
            }
            if failed.is_empty() {
                Ok(res)
            } else {
                bail!("{}", failed.join("; "))
            }
        })
    }

    /// An HTTP request with curl from `host`: the status code, or `None` if no HTTP answer came
    /// (refused, reset, timed out). `body` is sent as JSON (stdin), `extra` are curl options.
    pub fn http(
        &self,
        host: &str,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
        extra: &[&str],
    ) -> Result<Option<u16>> {
        let mut argv = vec![
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
            // No `Expect: 100-continue` dance for larger bodies.
            "-H",
            "Expect:",
        ];
        argv.extend_from_slice(extra);
        if body.is_some() {
            argv.extend_from_slice(&[
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ]);
        }
        argv.push(url);
        let out = self.exec_input(host, &argv, body.unwrap_or_default())?;
        let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        match code.parse::<u16>() {
            Ok(0) | Err(_) => Ok(None),
            Ok(c) => Ok(Some(c)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_config_holds_the_address_plan() {
        let text = render_coordinator_config("/x/meshd-wg");
        let doc: toml::Value = toml::from_str(&text).expect("valid TOML");
        assert_eq!(doc["host"]["name"].as_str(), Some("dock-load"));
        assert_eq!(doc["host"]["address"].as_str(), Some("10.99.99.1/24"));
        assert_eq!(doc["daemon"]["state_dir"].as_str(), Some(STATE_DIR));
        let c = &doc["coordinator"];
        assert_eq!(c["mesh_cidr"].as_str(), Some("10.99.99.0/24"));
        assert_eq!(c["api_port"].as_integer(), Some(51872));
        assert_eq!(
            c["public_endpoints"].as_array().map(|a| a.len()),
            Some(1),
            "{text}"
        );
        assert_eq!(
            c["public_endpoints"][0].as_str(),
            Some("198.51.100.1:51871")
        );
        let sa = c["static_assignments"].as_table().expect("table");
        let plan: Vec<(&str, &str)> = sa
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or("")))
            .collect();
        for (name, addr) in [
            ("dock-prod", "10.99.99.2"),
            ("dock-mirror", "10.99.99.3"),
            ("dock-edge", "10.99.99.4"),
            ("dock-dash", "10.99.99.5"),
            ("nas", "10.99.99.20"),
        ] {
            assert!(plan.contains(&(name, addr)), "{name} {addr} in {plan:?}");
        }
        assert_eq!(plan.len(), 5);
        assert!(doc.get("peer").is_none());
    }

    #[test]
    fn member_config_has_no_name_address_or_peers() {
        for token_file in [false, true] {
            let text = render_member_config("dock-prod", "/x/meshd-wg", token_file);
            let doc: toml::Value = toml::from_str(&text).expect("valid TOML");
            assert!(doc["host"].get("name").is_none());
            assert!(doc["host"].get("address").is_none());
            assert!(doc.get("peer").is_none());
            assert!(doc.get("coordinator").is_none());
            assert_eq!(
                doc["daemon"]
                    .get("join_token_file")
                    .and_then(|v| v.as_str()),
                token_file.then_some(TOKEN_PATH)
            );
        }
    }

    #[test]
    fn parses_hosts_tokens_and_wg_quick() {
        let bare = r#"[{"name":"b","address":"10.99.99.2","public_key":"K2","admin":false,"static_peer":true,"removed":false},
                      {"name":"a","address":"10.99.99.1","public_key":"K1","admin":true,"static_peer":false,"removed":false}]"#;
        let wrapped = format!("{{\"hosts\":{bare}}}");
        let a = parse_hosts(bare).expect("bare");
        assert_eq!(a, parse_hosts(&wrapped).expect("wrapped"));
        assert_eq!(a[0].name, "a");
        assert!(a[1].static_peer);
        assert!(parse_hosts("nope").is_err());
        assert_eq!(
            parse_token("invitation for x:\n  meshd1.abc_-\n").expect("token"),
            "meshd1.abc_-"
        );
        assert!(parse_token("error").is_err());
        let conf = "[Interface]\nPrivateKey = x\nAddress = 10.99.99.20/24, fd00::1/64\n[Peer]\n";
        assert_eq!(wg_quick_address(conf).as_deref(), Some("10.99.99.20"));
    }
}
