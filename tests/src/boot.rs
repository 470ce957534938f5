//! The booted fleet: the lab's daemon hosts as Debian 12 containers booted with systemd as
//! PID 1 (`systemd-nspawn -b`), the Debian package installed, meshd started by its unit.
//!
//! One root is prepared per package (the package test's cached debootstrap root, the .deb
//! installed with `apt-get install ./meshd_*.deb` from the cached archives) and kept in
//! [`ROOT_CACHE`]; each host gets a copy under its lab directory. A container is started inside
//! its lab host (the host's network, mount and UTS namespaces, like any lab process), so it
//! shares that host's network namespace: the lab's topology (internet, home NAT) is the
//! containers' topology, and the lab's teardown (processes recorded and everything left in
//! its namespaces) stops them. Commands run inside a container by entering the namespaces
//! of its PID 1 ([`Lab::in_container`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::lab::{check_output, Lab};
use crate::poll::poll_until;
use crate::procs::ProcId;
use crate::topology::{self, MESH_IFACE, MESH_PORT};

/// Where the package test caches its debootstrapped Debian 12 root and the .debs apt fetched
/// (`packaging/debian-root.sh` makes them; these names must match it).
pub const DEB_CACHE: &str = "/var/cache/meshd-deb";
/// The cached root tarball (made by `packaging/test-deb.sh`).
pub const BASE_TARBALL: &str = "bookworm-minbase-man-db-systemd-procps.tar.gz";
/// Prepared roots, one per package: `root-<first 16 hex of the .deb's SHA-256>`.
pub const ROOT_CACHE: &str = "/var/cache/meshd-boot";

/// Installs Debian packages into a root, the way an operator runs `apt install` on the host:
/// `$1` = the root, `$2` = the cached archives, then the packages (names or `.deb` paths inside
/// the root). Offline from the cached archives first; when that fails, the root borrows the
/// host's `/etc/resolv.conf` (its own may point at systemd-resolved, which does not run in a
/// chroot), refreshes its lists (deb.debian.org) and fetches, and what it fetched joins the
/// cache. Package scripts start nothing (`policy-rc.d`); services they enable start when the
/// container boots.
const INSTALL_PACKAGES: &str = r#"set -eu
root=$1 archives=$2
shift 2
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
mkdir -p "$archives"
find "$archives" -name '*.deb' -exec cp -t "$root/var/cache/apt/archives/" {} +
apt="apt-get -o Dpkg::Use-Pty=0 -y -q"
if ! in_root $apt install --no-install-recommends "$@"; then
  conf="$root/etc/resolv.conf"
  kept=
  if [ -e "$conf" ] || [ -L "$conf" ]; then mv "$conf" "$conf.meshlab"; kept=1; fi
  cp /etc/resolv.conf "$conf"
  ok=0
  in_root $apt update && in_root $apt install --no-install-recommends "$@" && ok=1
  rm -f "$conf"
  if [ -n "$kept" ]; then mv "$conf.meshlab" "$conf"; fi
  [ $ok = 1 ]
fi
cp -n "$root"/var/cache/apt/archives/*.deb "$archives/" 2>/dev/null || true
in_root $apt clean
rm -f "$root/usr/sbin/policy-rc.d"
"#;

/// [`INSTALL_PACKAGES`] into `root`; an error with apt's output unless it succeeded.
fn install_packages(root: &Path, packages: &[&str]) -> Result<()> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(INSTALL_PACKAGES)
        .arg("install-packages")
        .arg(root)
        .arg(Path::new(DEB_CACHE).join("archives"))
        .args(packages)
        .stdin(Stdio::null())
        .output()
        .context("running apt-get in a root")?;
    check_output(
        out,
        &format!("installing {packages:?} in {}", root.display()),
    )?;
    Ok(())
}

/// What the booted fleet installs on a host besides the root's packages: Prometheus from
/// Debian on the dashboard host, to scrape every meshd through meshd's own file_sd hand-off.
pub fn host_packages(host: &str) -> &'static [&'static str] {
    match host {
        "dock-dash" => &["prometheus"],
        _ => &[],
    }
}

/// A root with `deb` installed, prepared once per package and kept in [`ROOT_CACHE`] (older
/// prepared roots are removed when a new one is made).
pub fn prepared_root(deb: &Path) -> Result<PathBuf> {
    let out = Command::new("sha256sum")
        .arg(deb)
        .output()
        .context("running sha256sum")?;
    let digest = check_output(out, &format!("sha256sum {}", deb.display()))?;
    let digest = digest
        .split_whitespace()
        .next()
        .filter(|d| d.len() == 64)
        .ok_or_else(|| anyhow!("sha256sum printed no digest for {}", deb.display()))?
        .to_owned();
    let cache = Path::new(ROOT_CACHE);
    let root = cache.join(format!("root-{}", &digest[..16]));
    if root.join("usr/bin/meshd").exists() {
        return Ok(root);
    }
    let base = Path::new(DEB_CACHE).join(BASE_TARBALL);
    if !base.exists() {
        bail!(
            "{} is missing: `tests/lab.sh up --boot` or packaging/test-deb.sh makes it once \
             (debootstrap, packaging/debian-root.sh)",
            base.display()
        );
    }
    std::fs::create_dir_all(cache)?;
    if let Ok(entries) = std::fs::read_dir(cache) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("root-") {
                std::fs::remove_dir_all(e.path())
                    .with_context(|| format!("removing the old root {}", e.path().display()))?;
            }
        }
    }
    let partial = cache.join(format!("partial-{}", &digest[..16]));
    let _ = std::fs::remove_dir_all(&partial);
    let made = (|| -> Result<()> {
        std::fs::create_dir_all(&partial)?;
        let out = Command::new("tar")
            .arg("-C")
            .arg(&partial)
            .args(["--numeric-owner", "-xzf"])
            .arg(&base)
            .output()
            .context("running tar")?;
        check_output(out, &format!("unpacking {}", base.display()))?;
        std::fs::copy(deb, partial.join("tmp/meshd.deb"))
            .with_context(|| format!("copying {}", deb.display()))?;
        // systemd-resolved: meshd's split DNS is checked against the real one.
        install_packages(&partial, &["/tmp/meshd.deb", "systemd-resolved"])?;
        std::fs::remove_file(partial.join("tmp/meshd.deb"))?;
        std::fs::write(partial.join("etc/hosts"), "127.0.0.1\tlocalhost\n")?;
        Ok(())
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e.context(format!("preparing a Debian 12 root with {}", deb.display())));
    }
    std::fs::rename(&partial, &root)?;
    Ok(root)
}

/// The package to boot: `$MESHLAB_DEB`, else the newest `target/debian/meshd_*.deb` of the
/// workspace.
pub fn find_deb() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MESHLAB_DEB") {
        return Ok(PathBuf::from(p));
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    let mut debs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)
        .with_context(|| {
            format!(
                "no {}: build the package (packaging/build-deb.sh)",
                dir.display()
            )
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with("meshd_") && n.to_string_lossy().ends_with(".deb")
            })
        })
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    debs.sort();
    debs.pop().map(|(_, p)| p).ok_or_else(|| {
        anyhow!(
            "no meshd_*.deb in {}: build the package (packaging/build-deb.sh)",
            dir.display()
        )
    })
}

/// The coordinator's `/etc/meshd/meshd.toml` in the booted fleet: what the README tells an
/// operator to set (name, address, the coordinator's mesh and public endpoint), the fleet's
/// fixed addresses, and every other setting at its packaged default.
pub fn coordinator_config() -> String {
    let name = crate::COORDINATOR;
    let mesh = topology::mesh_addr(name).unwrap_or(std::net::Ipv4Addr::new(10, 99, 99, 1));
    let underlay = topology::host(name)
        .and_then(|h| h.addr)
        .unwrap_or(std::net::Ipv4Addr::new(198, 51, 100, 1));
    let mut s = format!(
        "[host]\nname = \"{name}\"\naddress = \"{mesh}/{}\"\ninterface = \"{MESH_IFACE}\"\n\
         listen_port = {MESH_PORT}\nprivate_key_file = \"/etc/meshd/private.key\"\n\n\
         [coordinator]\nmesh_cidr = \"{}\"\npublic_endpoints = [\"{underlay}:{MESH_PORT}\"]\n\
         database = \"/var/lib/meshd/coordinator.db\"\n\n[coordinator.static_assignments]\n",
        topology::MESH_PREFIX,
        crate::coord::MESH_CIDR,
    );
    for (host, addr) in crate::coord::static_assignments() {
        s.push_str(&format!("\"{host}\" = \"{addr}\"\n"));
    }
    s
}

impl Lab {
    /// Copy `root` for `host` and boot it inside the host: systemd as PID 1, meshd started by
    /// its unit. `config`: an `/etc/meshd/meshd.toml` to put in place first (else the
    /// package's); the host's [`host_packages`] are installed into the copy. The console goes
    /// to the host's `console.log`.
    pub fn boot(&self, host: &str, root: &Path, config: Option<&str>) -> Result<ProcId> {
        let dir = self.container_root(host);
        let out = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(root)
            .arg(&dir)
            .output()
            .context("copying the root")?;
        check_output(out, &format!("copying the root for {host}"))?;
        std::fs::write(dir.join("etc/hostname"), format!("{host}\n"))?;
        std::fs::write(
            dir.join("etc/hosts"),
            format!("127.0.0.1\tlocalhost\n127.0.1.1\t{host}\n"),
        )?;
        if let Some(text) = config {
            std::fs::write(dir.join("etc/meshd/meshd.toml"), text)?;
        }
        let packages = host_packages(host);
        if !packages.is_empty() {
            install_packages(&dir, packages)?;
        }
        self.boot_again(host)
    }

    /// The root `host`'s container boots from (its copy, kept across reboots).
    pub fn container_root(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("root")
    }

    /// Boot `host`'s container again from its root as it was left (a reboot: a new PID 1, an
    /// empty `/run`, the interface and engine of the last boot gone with its processes).
    pub fn boot_again(&self, host: &str) -> Result<ProcId> {
        let dir = self.container_root(host);
        let console = self.host_dir(host).join("console.log");
        let argv: Vec<String> = vec![
            "systemd-nspawn".into(),
            "--quiet".into(),
            "--boot".into(),
            format!("--directory={}", dir.display()),
            format!("--machine={host}"),
            "--register=no".into(),
            "--keep-unit".into(),
            // The host's network namespace is the container's: meshd needs to manage its
            // interface and routes there.
            "--capability=CAP_NET_ADMIN,CAP_NET_RAW".into(),
            "--bind=/dev/net/tun".into(),
            "--property=DeviceAllow=/dev/net/tun rwm".into(),
            "--console=pipe".into(),
        ];
        self.spawn(host, &argv, Some(&console))
    }

    /// PID 1 of the container booted in `host` (the child of its `systemd-nspawn`).
    pub fn container_leader(&self, host: &str, nspawn: ProcId) -> Result<u32> {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", nspawn.pid))
            .with_context(|| format!("{host}'s systemd-nspawn is gone"))?;
        children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .next()
            .ok_or_else(|| anyhow!("{host}'s container has not started yet"))
    }

    /// A command run inside the container booted in `host` (all of PID 1's namespaces).
    pub fn in_container(&self, host: &str, nspawn: ProcId, argv: &[&str]) -> Result<Command> {
        let leader = self.container_leader(host, nspawn)?;
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &leader.to_string(),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "--",
        ])
        .args([
            "/usr/bin/env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL=C.UTF-8",
        ])
        .args(argv)
        .stdin(Stdio::null());
        Ok(c)
    }

    /// [`Lab::in_container`], run to the end.
    pub fn container_output(&self, host: &str, nspawn: ProcId, argv: &[&str]) -> Result<Output> {
        self.in_container(host, nspawn, argv)?
            .output()
            .with_context(|| format!("running {argv:?} in {host}'s container"))
    }

    /// [`Lab::in_container`] with `input` on stdin, run to the end; an error unless it
    /// succeeded.
    pub fn container_input(
        &self,
        host: &str,
        nspawn: ProcId,
        argv: &[&str],
        input: &str,
    ) -> Result<String> {
        use std::io::Write as _;
        let mut c = self.in_container(host, nspawn, argv)?;
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {argv:?} in {host}'s container"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        check_output(out, &format!("{argv:?} in {host}'s container"))
    }

    /// The container booted in `host` (its running `systemd-nspawn`), if there is one.
    pub fn container(&self, host: &str) -> Option<ProcId> {
        self.state()
            .spawned
            .iter()
            .rev()
            .find(|s| s.host == host && s.cmd.first().is_some_and(|c| c == "systemd-nspawn"))
            .map(|s| s.proc)
            .filter(|p| p.is_alive())
    }

    /// [`Lab::container_output`]; an error unless it succeeded.
    pub fn container_ok(&self, host: &str, nspawn: ProcId, argv: &[&str]) -> Result<String> {
        let out = self.container_output(host, nspawn, argv)?;
        check_output(out, &format!("{argv:?} in {host}'s container"))
    }

    /// `systemctl reboot` in `host`'s container and wait until it is down (systemd-nspawn
    /// exits on a reboot of its container), then boot it again. Returns the new container.
    pub fn reboot(&self, host: &str, nspawn: ProcId, timeout: Duration) -> Result<ProcId> {
        // The reboot may cut the command's own connection short: its status says nothing.
        let _ = self.container_output(host, nspawn, &["systemctl", "reboot"]);
        self.wait_exit(nspawn, timeout)
            .with_context(|| format!("{host}'s container did not go down"))?;
        self.boot_again(host)
    }

    /// Wait until the container's `unit` is active; on failure the error carries the unit's
    /// status and the boot's journal tail.
    pub fn wait_unit(
        &self,
        host: &str,
        nspawn: ProcId,
        unit: &str,
        timeout: Duration,
    ) -> Result<()> {
        poll_until(
            timeout,
            &format!("{unit} to be active in {host}'s container"),
            || {
                Ok(self
                    .container_output(host, nspawn, &["systemctl", "is-active", unit])
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "active")
                    .unwrap_or(false))
            },
        )
        .with_context(|| {
            let run = |argv: &[&str]| {
                self.container_output(host, nspawn, argv)
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_else(|e| format!("{e:#}"))
            };
            format!(
                "in {host}'s container:\n{}\n{}",
                run(&[
                    "systemctl",
                    "status",
                    "--no-pager",
                    "--lines=0",
                    unit,
                    "meshd.service"
                ]),
                run(&["journalctl", "-b", "--no-pager", "-n", "40"])
            )
        })
    }
}

/// How long each part of forming the booted fleet took (one run).
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Preparing the root (`apt-get install` of the package), or finding it cached.
    pub root: Duration,
    /// Per host: from starting its container to meshd answering `meshctl status`.
    pub boot_to_answer: Vec<(String, Duration)>,
    /// Per joining host: from `meshctl join -` to `meshd-online.target` active.
    pub join_to_online: Vec<(String, Duration)>,
    /// From the last join to every ordered pair pinging over the mesh.
    pub mesh: Duration,
}

impl Timings {
    pub fn summary(&self) -> String {
        let list = |v: &[(String, Duration)]| {
            v.iter()
                .map(|(h, d)| format!("{h} {} ms", d.as_millis()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "root with the package: {} ms\ncontainer start to meshctl answering: {}\nmeshctl join to meshd-online.target: {}\nlast join to all pairs pinging: {} ms",
            self.root.as_millis(),
            list(&self.boot_to_answer),
            list(&self.join_to_online),
            self.mesh.as_millis()
        )
    }
}

/// Boot every daemon host of the lab from `deb`, configure the coordinator the way the README
/// tells an operator (its `/etc/meshd/meshd.toml`), join every other host with a token from
/// `meshctl invite` passed to `meshctl join -`, and wait until every ordered pair pings over
/// the mesh. Returns each host's container.
pub fn form_booted_fleet(
    lab: &Lab,
    deb: &Path,
    timeout: Duration,
) -> Result<(std::collections::BTreeMap<String, ProcId>, Timings)> {
    use std::time::Instant;
    let coordinator = crate::COORDINATOR;
    let mut timings = Timings::default();
    let t = Instant::now();
    let root = prepared_root(deb)?;
    timings.root = t.elapsed();
    println!(
        "root with {} ready in {} ms",
        deb.display(),
        timings.root.as_millis()
    );
    let mut containers = std::collections::BTreeMap::new();
    let mut started = Vec::new();
    for h in topology::DAEMON_HOSTS {
        let config = (h == coordinator).then(coordinator_config);
        started.push((h, Instant::now()));
        containers.insert(h.to_owned(), lab.boot(h, &root, config.as_deref())?);
    }
    // A host that has not joined answers meshctl but is not online (it has no mesh yet):
    // wait for its control socket; the coordinator is online by itself.
    for (h, at) in &started {
        poll_until(
            timeout,
            &format!("meshctl status to answer in {h}'s container"),
            || {
                Ok(lab
                    .container_output(h, containers[*h], &["meshctl", "status"])
                    .is_ok_and(|o| crate::lab::status_answered(&o)))
            },
        )
        .with_context(|| {
            format!(
                "{h}'s console: {}",
                lab.host_dir(h).join("console.log").display()
            )
        })?;
        timings.boot_to_answer.push((h.to_string(), at.elapsed()));
    }
    lab.wait_unit(
        coordinator,
        containers[coordinator],
        "meshd-online.target",
        timeout,
    )?;
    for h in topology::DAEMON_HOSTS.iter().filter(|h| **h != coordinator) {
        let invite = lab.container_ok(
            coordinator,
            containers[coordinator],
            &["meshctl", "invite", h],
        )?;
        let token = crate::coord::parse_token(&invite)?;
        let t = Instant::now();
        let out = lab.container_input(
            h,
            containers[*h],
            &["meshctl", "join", "-"],
            &format!("{token}\n"),
        )?;
        println!("{h}: {}", out.trim());
        lab.wait_unit(h, containers[*h], "meshd-online.target", timeout)?;
        timings.join_to_online.push((h.to_string(), t.elapsed()));
    }
    let t = Instant::now();
    lab.wait_mesh_pings(&topology::DAEMON_HOSTS, timeout)?;
    timings.mesh = t.elapsed();
    Ok((containers, timings))
}
