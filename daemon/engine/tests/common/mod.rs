//! Two network namespaces on a veth pair, and engines inside them. Everything is named with a
//! per-run suffix, lives only inside namespaces this file creates, and is removed on drop
//! (processes killed by PID, namespaces deleted).
#![allow(dead_code)]

use std::borrow::BorrowMut;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

pub const ENGINE: &str = env!("CARGO_BIN_EXE_meshd-wg");
pub const FLOOD: &str = env!("CARGO_BIN_EXE_meshd-wg-flood");

pub fn poll_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn run(mut cmd: impl BorrowMut<Command>) -> Output {
    let cmd = cmd.borrow_mut();
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

pub fn ok(mut cmd: impl BorrowMut<Command>) -> String {
    let cmd = cmd.borrow_mut();
    let out = run(&mut *cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Impl {
    Ours,
    /// Ours with these environment variables (offload switches).
    OursWith(&'static [(&'static str, &'static str)]),
    WireguardGo,
}

pub struct Side {
    pub ns: String,
    pub iface: String,
    pub underlay: &'static str,
    pub mesh4: &'static str,
    pub mesh6: &'static str,
    pub port: u16,
    pub private_key: String,
    pub public_key: String,
}

pub struct Pair {
    pub a: Side,
    pub b: Side,
    pub dir: tempfile::TempDir,
    children: Vec<Child>,
}

pub fn genkey() -> (String, String) {
    let private = ok(Command::new("wg").arg("genkey")).trim().to_string();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(private.as_bytes())
        .expect("write key");
    let out = child.wait_with_output().expect("wg pubkey");
    (
        private,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

impl Pair {
    /// Two namespaces joined by a veth pair (192.0.2.1/24 and 192.0.2.2/24), no engines yet.
    pub fn new() -> Pair {
        let id = format!(
            "{}{}",
            std::process::id() % 100000,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let side = |n: &str, ul: &'static str, m4: &'static str, m6: &'static str, port: u16| {
            let (private_key, public_key) = genkey();
            Side {
                ns: format!("mwt{id}{n}"),
                iface: format!("wgt{id}{n}"),
                underlay: ul,
                mesh4: m4,
                mesh6: m6,
                port,
                private_key,
                public_key,
            }
        };
        let pair = Pair {
            a: side("a", "192.0.2.1", "10.99.99.1", "fd99::1", 40001),
            b: side("b", "192.0.2.2", "10.99.99.2", "fd99::2", 40002),
            dir: tempfile::tempdir().expect("tempdir"),
            children: Vec::new(),
        };
        for s in [&pair.a, &pair.b] {
            ok(Command::new("ip").args(["netns", "add", &s.ns]));
            ok(Command::new("ip").args(["-n", &s.ns, "link", "set", "lo", "up"]));
        }
        ok(Command::new("ip").args([
            "link", "add", "vt0", "netns", &pair.a.ns, "type", "veth", "peer", "name", "vt1",
            "netns", &pair.b.ns,
        ]));
        for (s, dev) in [(&pair.a, "vt0"), (&pair.b, "vt1")] {
            ok(Command::new("ip").args([
                "-n",
                &s.ns,
                "addr",
                "add",
                &format!("{}/24", s.underlay),
                "dev",
                dev,
            ]));
            ok(Command::new("ip").args(["-n", &s.ns, "link", "set", dev, "up"]));
        }
        pair
    }

    pub fn side(&self, which: char) -> &Side {
        if which == 'a' {
            &self.a
        } else {
            &self.b
        }
    }

    pub fn ns(&self, which: char, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.side(which).ns]).args(args);
        c
    }

    pub fn key_file(&self, which: char) -> String {
        let path = self.dir.path().join(format!("{which}.key"));
        std::fs::write(&path, &self.side(which).private_key).expect("write key");
        path.to_string_lossy().into_owned()
    }

    /// Start an engine (foreground) for side `which`, wait for its UAPI socket.
    pub fn start_engine(&mut self, which: char, imp: Impl) -> u32 {
        let (ns, iface) = (self.side(which).ns.clone(), self.side(which).iface.clone());
        let log = std::fs::File::create(self.dir.path().join(format!("{which}.log"))).expect("log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns]);
        match imp {
            Impl::Ours => cmd.args([ENGINE, "-f", &iface]),
            Impl::OursWith(env) => cmd.args([ENGINE, "-f", &iface]).envs(env.iter().copied()),
            Impl::WireguardGo => cmd.args(["wireguard-go", "-f", &iface]),
        };
        let child = cmd
            .env("LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start engine");
        let pid = child.id();
        self.children.push(child);
        let sock = format!("/var/run/wireguard/{iface}.sock");
        poll_until("the UAPI socket", Duration::from_secs(10), || {
            std::path::Path::new(&sock).exists()
        });
        pid
    }

    /// Configure both sides as peers of each other with `wg set`, address and bring up.
    pub fn configure(&self) {
        for (me, other) in [('a', 'b'), ('b', 'a')] {
            let (s, o) = (self.side(me), self.side(other));
            let key = self.key_file(me);
            ok(self.ns(
                me,
                &[
                    "wg",
                    "set",
                    &s.iface,
                    "listen-port",
                    &s.port.to_string(),
                    "private-key",
                    &key,
                    "peer",
                    &o.public_key,
                    "endpoint",
                    &format!("{}:{}", o.underlay, o.port),
                    "allowed-ips",
                    &format!("{}/32,{}/128", o.mesh4, o.mesh6),
                ],
            ));
            ok(self.ns(
                me,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", s.mesh4),
                    "dev",
                    &s.iface,
                ],
            ));
            ok(self.ns(
                me,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/64", s.mesh6),
                    "dev",
                    &s.iface,
                    "nodad",
                ],
            ));
            ok(self.ns(me, &["ip", "link", "set", &s.iface, "mtu", "1420", "up"]));
        }
    }

    pub fn ping(&self, from: char, to: &str, count: u32) -> bool {
        run(self.ns(
            from,
            &["ping", "-c", &count.to_string(), "-i", "0.2", "-W", "2", to],
        ))
        .status
        .success()
    }

    /// Ping until one answer arrives (the first packets trigger the handshake).
    pub fn wait_ping(&self, from: char, to: &str) {
        poll_until(
            &format!("ping {to} from {from}"),
            Duration::from_secs(20),
            || {
                run(self.ns(from, &["ping", "-c", "1", "-W", "1", to]))
                    .status
                    .success()
            },
        );
    }

    pub fn wg_dump(&self, which: char) -> Vec<Vec<String>> {
        let out = ok(self.ns(which, &["wg", "show", &self.side(which).iface, "dump"]));
        out.lines()
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect()
    }

    pub fn log(&self, which: char) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{which}.log"))).unwrap_or_default()
    }

    pub fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::SIGTERM,
            );
        }
        for c in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if matches!(c.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for s in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", &s.ns]).status();
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", s.iface));
        }
    }
}
