//! The static fleet: keys and `/etc/meshd/meshd.toml` for the five daemon hosts, starting
//! meshd in them, and checking the mesh.
//!
//! Endpoints follow what a real operator would write: public hosts know each other's internet
//! addresses; home hosts know the public hosts' internet addresses and each other's LAN
//! address; public hosts know no endpoint for home hosts (those sit behind NAT and call in,
//! with a persistent keepalive that keeps the NAT mapping open).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;

use crate::lab::Lab;
use crate::poll::poll_until;
use crate::procs::ProcId;
use crate::topology::{self, Role};

/// Where each host finds its config and key (inside the host).
pub const CONFIG_PATH: &str = "/etc/meshd/meshd.toml";
pub const KEY_PATH: &str = "/etc/meshd/private.key";
/// Keepalive home hosts send to every peer.
pub const KEEPALIVE_SECS: u16 = 25;
/// The daemon's reconcile interval in the lab.
pub const RECONCILE_SECS: u32 = 2;

/// One daemon host of the fleet.
#[derive(Clone)]
pub struct FleetHost {
    pub name: String,
    pub role: Role,
    pub underlay: Ipv4Addr,
    pub mesh: Ipv4Addr,
    private_key: String,
    pub public_key: String,
}

impl std::fmt::Debug for FleetHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetHost")
            .field("name", &self.name)
            .field("mesh", &self.mesh)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl FleetHost {
    /// The private key, base64 (only for writing the key file).
    pub fn private_key_base64(&self) -> &str {
        &self.private_key
    }
}

/// A generated fleet: keys for each host, and the engine each daemon should start.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub hosts: Vec<FleetHost>,
    pub engine_command: String,
}

/// A fresh WireGuard key pair, base64 (standard, 44 chars): (private, public).
pub fn generate_keypair() -> (String, String) {
    let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
    let public = x25519_dalek::PublicKey::from(&secret);
    let b64 = base64::engine::general_purpose::STANDARD;
    (b64.encode(secret.to_bytes()), b64.encode(public.as_bytes()))
}

/// The engine meshd should run: `$MESHLAB_ENGINE` (a path, or a name looked up on PATH, e.g.
/// `wireguard-go`), else `meshd-wg` from `bin_dir`.
pub fn engine_command(bin_dir: &Path) -> String {
    match std::env::var("MESHLAB_ENGINE") {
        Ok(e) if !e.is_empty() => {
            if e.contains('/') {
                e
            } else {
                which(&e)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or(e)
            }
        }
        _ => bin_dir.join("meshd-wg").to_string_lossy().into_owned(),
    }
}

/// The `backend = "..."` line of `host`'s config: `$MESHLAB_BACKENDS` (`host=kind,...`, for a
/// mixed fleet), else `$MESHLAB_BACKEND` (every host), else nothing: meshd's default, `auto`.
pub fn backend_line(host: &str) -> String {
    let per_host = std::env::var("MESHLAB_BACKENDS").unwrap_or_default();
    let chosen = per_host
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .find(|(h, _)| h.trim() == host)
        .map(|(_, kind)| kind.trim().to_owned())
        .or_else(|| {
            std::env::var("MESHLAB_BACKEND")
                .ok()
                .filter(|b| !b.is_empty())
        });
    match chosen {
        Some(kind) => format!("backend = {}\n", toml_str(&kind)),
        None => String::new(),
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn toml_str(s: &str) -> String {
    // serde_json's string escaping is valid TOML basic-string escaping for what we write.
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

impl Fleet {
    /// Keys for the named daemon hosts (each must have a mesh address in the topology).
    pub fn generate(names: &[&str], engine_command: &str) -> Result<Fleet> {
        let mut hosts = Vec::new();
        for name in names {
            let def = topology::host(name).ok_or_else(|| anyhow!("unknown host {name}"))?;
            let (Some(mesh), Some(underlay)) = (def.mesh, def.addr) else {
                bail!("host {name} has no mesh or underlay address");
            };
            if !matches!(def.role, Role::Public | Role::Home) {
                bail!("host {name} cannot run meshd");
            }
            let (private_key, public_key) = generate_keypair();
            hosts.push(FleetHost {
                name: name.to_string(),
                role: def.role,
                underlay,
                mesh,
                private_key,
                public_key,
            });
        }
        Ok(Fleet {
            hosts,
            engine_command: engine_command.to_owned(),
        })
    }

    /// The five daemon hosts, with the engine from [`engine_command`].
    pub fn standard(bin_dir: &Path) -> Result<Fleet> {
        Fleet::generate(&topology::DAEMON_HOSTS, &engine_command(bin_dir))
    }

    pub fn host(&self, name: &str) -> Result<&FleetHost> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| anyhow!("host {name} is not in the fleet"))
    }

    pub fn names(&self) -> Vec<&str> {
        self.hosts.iter().map(|h| h.name.as_str()).collect()
    }

    /// `name`'s public key, base64.
    pub fn public_key(&self, name: &str) -> Result<&str> {
        Ok(&self.host(name)?.public_key)
    }

    /// The endpoint `from` is configured with for `to`, if any.
    pub fn endpoint(&self, from: &FleetHost, to: &FleetHost) -> Option<String> {
        match (from.role, to.role) {
            (_, Role::Public) => Some(format!("{}:{}", to.underlay, topology::MESH_PORT)),
            (Role::Home, Role::Home) => Some(format!("{}:{}", to.underlay, topology::MESH_PORT)),
            _ => None,
        }
    }

    /// The `meshd.toml` of one host.
    pub fn render(&self, name: &str) -> Result<String> {
        let me = self.host(name)?;
        let mut s = String::new();
        s.push_str("[host]\n");
        s.push_str(&format!("name = {}\n", toml_str(&me.name)));
        s.push_str(&format!(
            "address = \"{}/{}\"\n",
            me.mesh,
            topology::MESH_PREFIX
        ));
        s.push_str(&format!("interface = \"{}\"\n", topology::MESH_IFACE));
        s.push_str(&format!("listen_port = {}\n", topology::MESH_PORT));
        s.push_str(&format!("private_key_file = \"{KEY_PATH}\"\n"));
        s.push_str("\n[daemon]\n");
        s.push_str(&backend_line(&me.name));
        s.push_str(&format!(
            "engine_command = {}\n",
            toml_str(&self.engine_command)
        ));
        s.push_str(&format!("reconcile_interval_secs = {RECONCILE_SECS}\n"));
        for peer in self.hosts.iter().filter(|h| h.name != me.name) {
            s.push_str("\n[[peer]]\n");
            s.push_str(&format!("name = {}\n", toml_str(&peer.name)));
            s.push_str(&format!("public_key = \"{}\"\n", peer.public_key));
            if let Some(ep) = self.endpoint(me, peer) {
                s.push_str(&format!("endpoint = \"{ep}\"\n"));
            }
            s.push_str(&format!("allowed_ips = [\"{}/32\"]\n", peer.mesh));
            if me.role == Role::Home {
                s.push_str(&format!("persistent_keepalive = {KEEPALIVE_SECS}\n"));
            }
        }
        Ok(s)
    }
}

impl Lab {
    /// Write every fleet host's private key (0600) and meshd.toml into its /etc/meshd.
    pub fn install_fleet(&self, fleet: &Fleet) -> Result<()> {
        for h in &fleet.hosts {
            self.write_file_mode(
                &h.name,
                KEY_PATH,
                format!("{}\n", h.private_key).as_bytes(),
                0o600,
            )?;
            self.write_file_mode(
                &h.name,
                CONFIG_PATH,
                fleet.render(&h.name)?.as_bytes(),
                0o644,
            )?;
        }
        Ok(())
    }

    /// Path of a host's meshd log (in its state directory).
    pub fn meshd_log(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("meshd.log")
    }

    /// The userspace engine processes running in `host`'s network namespace.
    pub fn engine_processes(&self, host: &str) -> Result<Vec<ProcId>> {
        let engine = PathBuf::from(engine_command(self.bin_dir()));
        Ok(crate::procs::procs_running(&self.net_ns(host)?, &engine))
    }

    /// `host` goes down as in a reboot: meshd (`meshd`, by PID) stops on SIGTERM, its engine
    /// and interface go away; only the state directory is left.
    pub fn reboot_down(&self, host: &str, meshd: ProcId) -> Result<()> {
        if !self.signal(meshd, libc::SIGTERM) {
            bail!("could not signal meshd (pid {}) on {host}", meshd.pid);
        }
        self.wait_exit(meshd, Duration::from_secs(15))?;
        for e in self.engine_processes(host)? {
            e.terminate(Duration::from_secs(5));
        }
        poll_until(
            Duration::from_secs(10),
            &format!("{host}'s {} to disappear", topology::MESH_IFACE),
            || {
                Ok(!self
                    .exec(host, &["ip", "link", "show", topology::MESH_IFACE])?
                    .status
                    .success())
            },
        )
    }

    /// Start `meshd --config /etc/meshd/meshd.toml` in `host`, logging to `meshd.log`.
    pub fn start_meshd(&self, host: &str) -> Result<ProcId> {
        self.start_meshd_env(host, &[])
    }

    /// [`Lab::start_meshd`] with extra environment variables (e.g. the rotation tests'
    /// fault injection).
    pub fn start_meshd_env(&self, host: &str, env: &[(&str, &str)]) -> Result<ProcId> {
        let meshd = self.bin_dir().join("meshd");
        if !meshd.is_file() {
            bail!(
                "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
                meshd.display()
            );
        }
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        let meshd_s = meshd.to_string_lossy().into_owned();
        let mut all = vec![
            ("RUST_LOG", rust_log.as_str()),
            // wireguard-go refuses to run on Linux without it (MESHLAB_ENGINE=wireguard-go).
            ("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1"),
        ];
        all.extend_from_slice(env);
        self.spawn_env(
            host,
            &[meshd_s.as_str(), "--config", CONFIG_PATH],
            &all,
            Some(&self.meshd_log(host)),
        )
    }

    /// Run `meshctl ARGS...` in `host`; stdout, or an error.
    pub fn meshctl(&self, host: &str, args: &[&str]) -> Result<String> {
        let mut argv = vec!["meshctl"];
        argv.extend_from_slice(args);
        self.exec_ok(host, &argv)
    }

    /// Wait until every ordered pair of `hosts` pings over the mesh.
    pub fn wait_mesh_pings(&self, hosts: &[&str], timeout: Duration) -> Result<()> {
        let mut pairs = Vec::new();
        for a in hosts {
            for b in hosts {
                if a != b {
                    pairs.push((a.to_string(), b.to_string(), self.mesh_addr(b)?));
                }
            }
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = pairs
                .iter()
                .map(|(a, b, addr)| {
                    s.spawn(move || {
                        poll_until(
                            timeout,
                            &format!("{a} to ping {b} ({addr}) over the mesh"),
                            || self.ping(a, *addr),
                        )
                    })
                })
                .collect();
            let mut failed = Vec::new();
            for h in handles {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failed.push(format!("{e:#}")),
                    Err(_) => failed.push("a ping thread panicked".into()),
                }
            }
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

    /// `wg show wgmesh0 peers` in `host`, as a sorted list (duplicates kept).
    pub fn wg_peers(&self, host: &str) -> Result<Vec<String>> {
        let out = self.exec_ok(host, &["wg", "show", topology::MESH_IFACE, "peers"])?;
        let mut v: Vec<String> = out.split_whitespace().map(str::to_owned).collect();
        v.sort();
        Ok(v)
    }

    /// `wg show wgmesh0 endpoints` in `host`: public key -> endpoint (`(none)` if unset).
    pub fn wg_endpoints(&self, host: &str) -> Result<Vec<(String, String)>> {
        let out = self.exec_ok(host, &["wg", "show", topology::MESH_IFACE, "endpoints"])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_owned(), it.next()?.to_owned()))
            })
            .collect())
    }

    /// The ifindex of `iface` in `host` (from `ip -j link show`).
    pub fn ifindex(&self, host: &str, iface: &str) -> Result<u64> {
        let out = self.exec_ok(host, &["ip", "-j", "link", "show", iface])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parsing ip -j link")?;
        v.get(0)
            .and_then(|l| l.get("ifindex"))
            .and_then(|i| i.as_u64())
            .ok_or_else(|| anyhow!("[{host}] no ifindex for {iface} in {out}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(doc: &toml::Value) -> Vec<toml::Value> {
        doc.get("peer")
            .and_then(|p| p.as_array())
            .cloned()
            .unwrap_or_default()
    }

    fn peer<'a>(peers: &'a [toml::Value], name: &str) -> &'a toml::Value {
        peers
            .iter()
            .find(|p| p.get("name").and_then(|n| n.as_str()) == Some(name))
            .unwrap_or_else(|| panic!("no peer {name}"))
    }

    #[test]
    fn keys_are_44_char_base64_and_distinct() {
        let (a, pa) = generate_keypair();
        let (b, _) = generate_keypair();
        for k in [&a, &pa, &b] {
            assert_eq!(k.len(), 44);
            let raw = base64::engine::general_purpose::STANDARD
                .decode(k)
                .expect("base64");
            assert_eq!(raw.len(), 32);
        }
        assert_ne!(a, b);
        assert_ne!(a, pa);
    }

    #[test]
    fn configs_follow_the_fleet_rules() {
        let fleet = Fleet::generate(&topology::DAEMON_HOSTS, "/x/meshd-wg").expect("fleet");
        for h in &fleet.hosts {
            let text = fleet.render(&h.name).expect("render");
            assert!(
                !text.contains(h.private_key_base64()),
                "private key in the config"
            );
            let doc: toml::Value = toml::from_str(&text).expect("valid TOML");
            assert_eq!(doc["host"]["name"].as_str(), Some(h.name.as_str()));
            assert_eq!(
                doc["host"]["address"].as_str(),
                Some(format!("{}/24", h.mesh).as_str())
            );
            assert_eq!(doc["host"]["interface"].as_str(), Some("wgmesh0"));
            assert_eq!(doc["host"]["listen_port"].as_integer(), Some(51871));
            assert_eq!(doc["host"]["private_key_file"].as_str(), Some(KEY_PATH));
            assert_eq!(
                doc["daemon"]["engine_command"].as_str(),
                Some("/x/meshd-wg")
            );
            assert_eq!(
                doc["daemon"]["reconcile_interval_secs"].as_integer(),
                Some(2)
            );
            let ps = peers(&doc);
            assert_eq!(ps.len(), 4);
            for p in &ps {
                let other = fleet
                    .host(p["name"].as_str().expect("name"))
                    .expect("known");
                assert_eq!(p["public_key"].as_str(), Some(other.public_key.as_str()));
                let allowed = p["allowed_ips"].as_array().expect("allowed_ips");
                assert_eq!(allowed.len(), 1);
                assert_eq!(
                    allowed[0].as_str(),
                    Some(format!("{}/32", other.mesh).as_str())
                );
                let keepalive = p.get("persistent_keepalive").and_then(|k| k.as_integer());
                assert_eq!(
                    keepalive,
                    (h.role == Role::Home).then_some(25),
                    "{} -> {}",
                    h.name,
                    other.name
                );
            }
        }
        let load = fleet.render("dock-load").expect("render");
        let load: toml::Value = toml::from_str(&load).expect("toml");
        let lp = peers(&load);
        assert_eq!(
            peer(&lp, "dock-prod")["endpoint"].as_str(),
            Some("198.51.100.2:51871")
        );
        assert!(
            peer(&lp, "dock-mirror").get("endpoint").is_none(),
            "public host with a NATed endpoint"
        );
        assert!(peer(&lp, "dock-edge").get("endpoint").is_none());
        let mirror = fleet.render("dock-mirror").expect("render");
        let mirror: toml::Value = toml::from_str(&mirror).expect("toml");
        let mp = peers(&mirror);
        assert_eq!(
            peer(&mp, "dock-edge")["endpoint"].as_str(),
            Some("192.168.1.4:51871")
        );
        assert_eq!(
            peer(&mp, "dock-load")["endpoint"].as_str(),
            Some("198.51.100.1:51871")
        );
        assert_eq!(
            peer(&mp, "dock-dash")["endpoint"].as_str(),
            Some("198.51.100.5:51871")
        );
    }
}
