//! The real meshd binary against Debian's wireguard-go, inside a network namespace and a
//! private mount namespace (own /run) that this test creates and removes.
//!
//! Safety: every namespace is named with this process's PID; nothing is configured in the root
//! namespace; only processes we started (and the engine they started, found by membership in
//! our private mount namespace) are killed, by PID.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mesh_proto::PrivateKey;

const DEADLINE: Duration = Duration::from_secs(30);
const IFACE: &str = "wgmesh0";

fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn bin(name: &str) -> PathBuf {
    let meshd = PathBuf::from(env!("CARGO_BIN_EXE_meshd"));
    let path = meshd.with_file_name(name);
    if !path.exists() {
        let package = match name {
            "meshd-wg" => "meshd-engine",
            other => other,
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", package])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p {name} failed");
    }
    path
}

struct Lab {
    netns: String,
    holder: Child,
    dir: tempfile::TempDir,
    daemons: Vec<Child>,
    engine: PathBuf,
}

impl Lab {
    fn new(engine: PathBuf) -> Lab {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let netns = format!("meshd-it-{}-{n}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &netns])
            .status()
            .expect("ip netns add");
        assert!(ok.success(), "ip netns add {netns}");
        // The holder keeps a mount namespace with a private /run alive; everything else enters
        // it with nsenter, so restarts of meshd see the same /run (engine socket, control socket).
        let holder = Command::new("ip")
            .args(["netns", "exec", &netns, "unshare", "--mount", "--propagation", "private"])
            .args([
                "sh",
                "-c",
                "mount -t tmpfs tmpfs /run && mkdir -p /run/wireguard /run/meshd && exec sleep 100000",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn namespace holder");
        let dir = tempfile::tempdir().expect("tempdir");
        let lab = Lab {
            netns,
            holder,
            dir,
            daemons: Vec::new(),
            engine,
        };
        let pid = lab.holder.id();
        poll("private /run in the lab namespace", || {
            Path::new(&format!("/proc/{pid}/root/run/wireguard"))
                .is_dir()
                .then_some(())
        });
        lab
    }

    fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("--target")
            .arg(self.holder.id().to_string())
            .args(["--mount", "--net", "--"]);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut c = self.nsenter();
        c.args(args);
        c.output().expect("run command in lab")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("meshd.toml")
    }

    fn write_config(&self, peers: &[(String, String, String)]) {
        let engine = self.engine.display();
        let key_file = self.dir.path().join("etc/private.key");
        let mut text = format!(
            r#"[host]
name = "dock-load"
address = "10.99.99.1/24"
interface = "{IFACE}"
listen_port = 51871
private_key_file = "{}"
mtu = 1420

[daemon]
backend = "userspace"
engine_command = "{engine}"
reconcile_interval_secs = 1
"#,
            key_file.display(),
        );
        for (name, key, ip) in peers {
            text.push_str(&format!(
                "\n[[peer]]\nname = \"{name}\"\npublic_key = \"{key}\"\nendpoint = \"198.51.100.2:51871\"\nallowed_ips = [\"{ip}/32\"]\npersistent_keepalive = 25\n"
            ));
        }
        fs::write(self.config_path(), text).expect("write config");
    }

    fn spawn_meshd(&mut self) -> u32 {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("meshd.log"))
            .expect("log file");
        let mut c = self.nsenter();
        c.arg(bin("meshd"))
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "meshd=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let child = c.spawn().expect("spawn meshd");
        let pid = child.id();
        self.daemons.push(child);
        pid
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("meshd.log")).unwrap_or_default()
    }

    fn meshctl(&self, args: &[&str]) -> Output {
        let ctl = bin("meshctl");
        let mut all = vec![ctl.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Peers on the device, according to `wg show IFACE dump` (independent of meshd).
    fn wg_peers(&self) -> Option<Vec<String>> {
        let out = self.run(&["wg", "show", IFACE, "dump"]);
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Some(
            text.lines()
                .skip(1)
                .filter_map(|l| l.split('\t').next().map(str::to_owned))
                .collect(),
        )
    }

    fn ifindex(&self) -> Option<u32> {
        let out = self.run(&["cat", &format!("/sys/class/net/{IFACE}/ifindex")]);
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    fn link_info(&self) -> String {
        let out = self.run(&["ip", "addr", "show", "dev", IFACE]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_daemon(&mut self, pid: u32) -> std::process::ExitStatus {
        let idx = self
            .daemons
            .iter()
            .position(|c| c.id() == pid)
            .expect("our daemon");
        let mut child = self.daemons.remove(idx);
        poll("meshd to exit", || child.try_wait().expect("try_wait"))
    }

    fn signal(&self, pid: u32, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
        nix::sys::signal::kill(pid, sig).expect("kill our daemon");
    }

    /// Processes in our private mount namespace (all started by this test, directly or by meshd).
    fn processes_in_our_mount_ns(&self) -> Vec<i32> {
        let holder = self.holder.id();
        let Ok(ours) = fs::metadata(format!("/proc/{holder}/ns/mnt")) else {
            return Vec::new();
        };
        let mut pids = Vec::new();
        if let Ok(entries) = fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                if pid as u32 == holder {
                    continue;
                }
                if let Ok(m) = fs::metadata(format!("/proc/{pid}/ns/mnt")) {
                    if m.ino() == ours.ino() && m.dev() == ours.dev() {
                        pids.push(pid);
                    }
                }
            }
        }
        pids
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.daemons {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in self.processes_in_our_mount_ns() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = Command::new("ip")
            .args(["-n", &self.netns, "link", "del", IFACE])
            .stderr(Stdio::null())
            .status();
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        if std::thread::panicking() {
            eprintln!("---- meshd log ----\n{}", self.log());
        }
    }
}

fn json_peer_names(out: &Output) -> Option<Vec<String>> {
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let list = v
        .as_array()
        .cloned()
        .or_else(|| v.get("peers")?.as_array().cloned())?;
    Some(
        list.iter()
            .filter_map(|p| p.get("name")?.as_str().map(str::to_owned))
            .collect(),
    )
}

/// The tools these tests drive. Missing ones fail the test (tests/run.sh installs them); as
/// a non-root user the tests are ignored at build time (build-support/unprivileged.rs).
fn require_environment() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (built as root, run as another user?)"
    );
    let missing: Vec<&str> = [
        "/usr/bin/wireguard-go",
        "/usr/bin/wg",
        "/usr/bin/nsenter",
        "/usr/bin/unshare",
    ]
    .into_iter()
    .filter(|p| !Path::new(p).exists())
    .collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?}: apt-get install wireguard-go wireguard-tools util-linux"
    );
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn meshd_with_wireguard_go_adopts_engine_across_restart_and_sigkill() {
    require_environment();
    scenario(PathBuf::from("/usr/bin/wireguard-go"));
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn meshd_with_meshd_wg_adopts_engine_across_restart_and_sigkill() {
    require_environment();
    scenario(bin("meshd-wg"));
}

fn scenario(engine: PathBuf) {
    let mut lab = Lab::new(engine);
    let peers: Vec<(String, String, String)> = (2..4)
        .map(|i| {
            (
                format!("dock-{i}"),
                PrivateKey::generate().public_key().to_string(),
                format!("10.99.99.{i}"),
            )
        })
        .collect();
    lab.write_config(&peers);
    let mut want_keys: Vec<String> = peers.iter().map(|p| p.1.clone()).collect();
    want_keys.sort();
    let want_names: Vec<String> = peers.iter().map(|p| p.0.clone()).collect();

    // --check-config validates without starting anything.
    let check = lab.run(&[
        bin("meshd").to_str().expect("path"),
        "--check-config",
        "--config",
        lab.config_path().to_str().expect("path"),
    ]);
    assert!(check.status.success(), "check-config: {check:?}");
    assert!(
        lab.ifindex().is_none(),
        "check-config must not create the interface"
    );

    // A bad config at startup: exit non-zero, nothing applied.
    let good = fs::read_to_string(lab.config_path()).expect("config");
    fs::write(
        lab.config_path(),
        good.replace("mtu = 1420", "mtu = \"big\""),
    )
    .expect("write");
    let bad = lab.run(&[
        bin("meshd").to_str().expect("path"),
        "--config",
        lab.config_path().to_str().expect("path"),
    ]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("meshd.toml") && stderr.contains("mtu"),
        "{stderr}"
    );
    assert!(lab.ifindex().is_none(), "a bad config must apply nothing");
    fs::write(lab.config_path(), &good).expect("write");

    // First start: the engine is started, peers configured, address and MTU set.
    let pid = lab.spawn_meshd();
    let names = poll("meshctl peers --json to list the peers", || {
        json_peer_names(&lab.meshctl(&["peers", "--json"])).filter(|n| n.len() == peers.len())
    });
    assert_eq!(names, want_names);
    let keys = poll("wg show to list the peers", || {
        lab.wg_peers().filter(|k| k.len() == peers.len())
    });
    let mut keys = keys;
    keys.sort();
    assert_eq!(keys, want_keys);
    let ifindex = lab.ifindex().expect("interface exists");
    let info = lab.link_info();
    assert!(info.contains("inet 10.99.99.1/24"), "{info}");
    assert!(info.contains("mtu 1420"), "{info}");
    let key_file = lab.dir.path().join("etc/private.key");
    assert_eq!(
        fs::metadata(&key_file).expect("key generated").mode() & 0o777,
        0o600
    );

    // Text output for people.
    let table = lab.meshctl(&["peers"]);
    assert!(table.status.success(), "{table:?}");
    assert!(String::from_utf8_lossy(&table.stdout).contains("dock-2"));
    let status = lab.meshctl(&["status", "--json"]);
    assert!(status.status.success(), "{status:?}");

    // A second meshd on the same interface is refused and changes nothing.
    let second = lab.run(&[
        bin("meshd").to_str().expect("path"),
        "--config",
        lab.config_path().to_str().expect("path"),
    ]);
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already managed by another meshd"),
        "{second:?}"
    );
    assert!(
        lab.meshctl(&["status"]).status.success(),
        "first meshd still serves"
    );

    // SIGHUP with a broken config: refused, reported, old config kept, daemon alive.
    fs::write(
        lab.config_path(),
        good.replace("listen_port = 51871", "listen_port = 0x"),
    )
    .expect("write");
    lab.signal(pid, nix::sys::signal::Signal::SIGHUP);
    let err = poll("status to report the refused reload", || {
        let out = lab.meshctl(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.get("last_error")?.as_str().map(str::to_owned)
    });
    assert!(err.contains("meshd.toml"), "{err}");
    assert_eq!(lab.wg_peers().map(|k| k.len()), Some(peers.len()));
    // meshctl reload with a fixed config that adds a peer: applied at once.
    let mut more = peers.clone();
    more.push((
        "dock-9".into(),
        PrivateKey::generate().public_key().to_string(),
        "10.99.99.9".into(),
    ));
    lab.write_config(&more);
    let rl = lab.meshctl(&["reload"]);
    assert!(rl.status.success(), "{rl:?}");
    assert_eq!(lab.wg_peers().map(|k| k.len()), Some(more.len()));
    let st = lab.meshctl(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status json");
    assert!(v.get("last_error").is_some_and(|e| e.is_null()), "{v}");
    lab.write_config(&peers);
    assert!(lab.meshctl(&["reload"]).status.success());
    assert_eq!(lab.wg_peers().map(|k| k.len()), Some(peers.len()));

    // SIGTERM: the control socket goes, the interface and engine stay.
    lab.signal(pid, nix::sys::signal::Signal::SIGTERM);
    let st = lab.wait_daemon(pid);
    assert!(st.success(), "meshd exit on SIGTERM: {st:?}");
    let holder = lab.holder.id();
    assert!(!Path::new(&format!("/proc/{holder}/root/run/meshd/meshd.sock")).exists());
    assert_eq!(lab.ifindex(), Some(ifindex), "interface must survive meshd");
    let err = lab.meshctl(&["peers"]);
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("meshd is not running"),
        "{err:?}"
    );

    // Restart: adopt, same ifindex, no duplicate peers.
    let pid = lab.spawn_meshd();
    poll("restarted meshd to answer", || {
        json_peer_names(&lab.meshctl(&["peers", "--json"])).filter(|n| n.len() == peers.len())
    });
    assert_eq!(
        lab.ifindex(),
        Some(ifindex),
        "restart must adopt, not recreate"
    );
    assert_eq!(lab.wg_peers().map(|k| k.len()), Some(peers.len()));
    assert!(lab
        .log()
        .contains(concat!("meshd ", env!("CARGO_PKG_VERSION"), " started")));

    // SIGKILL leaves a stale socket and lock file; the next start must cope.
    lab.signal(pid, nix::sys::signal::Signal::SIGKILL);
    lab.wait_daemon(pid);
    let _pid = lab.spawn_meshd();
    poll("meshd after SIGKILL to answer", || {
        json_peer_names(&lab.meshctl(&["peers", "--json"])).filter(|n| n.len() == peers.len())
    });
    assert_eq!(
        lab.ifindex(),
        Some(ifindex),
        "restart after SIGKILL must adopt"
    );
    assert_eq!(lab.wg_peers().map(|k| k.len()), Some(peers.len()));
    let info = lab.link_info();
    assert_eq!(info.matches("inet 10.99.99.1/24").count(), 1, "{info}");

    // The engine dies (crash, OOM kill): the next pass starts a new one and re-applies peers.
    let engine_name = lab
        .engine
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_owned();
    let engines: Vec<i32> = lab
        .processes_in_our_mount_ns()
        .into_iter()
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == engine_name)
        })
        .collect();
    assert_eq!(engines.len(), 1, "one engine running: {engines:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(engines[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the engine we caused to start");
    poll("the interface to go away with its engine", || {
        (lab.ifindex() != Some(ifindex)).then_some(())
    });
    poll("meshd to restart the engine and restore the peers", || {
        lab.wg_peers().filter(|k| k.len() == peers.len())
    });
    let info = poll("the address to be restored", || {
        let info = lab.link_info();
        info.contains("inet 10.99.99.1/24").then_some(info)
    });
    assert!(info.contains("mtu 1420"), "{info}");
}
