//! Key rotation in the lab (issue 6): reading and checking key files, restarting a daemon with
//! fault injection, taking a host offline, a long-lived TCP stream over the mesh, and a probe
//! that tries a WireGuard handshake with a given key.
//!
//! Everything here acts inside the lab's namespaces: the offline switch is an nftables table in
//! the host's own namespace, the probe interface lives in the probe host.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;

use crate::coord::{parse_hosts, COORDINATOR};
use crate::fleet::KEY_PATH;
use crate::lab::Lab;
use crate::poll::poll_for;
use crate::procs::ProcId;
use crate::topology::{MESH_IFACE, MESH_PORT};

/// Where an interrupted rotation keeps the next key (next to the key file).
pub const NEXT_KEY_PATH: &str = "/etc/meshd/private.key.next";
/// The environment variable that makes meshd SIGKILL itself right after a rotation step.
pub const CRASH_ENV: &str = "MESHD_TEST_CRASH_AFTER";
/// The rotation steps `MESHD_TEST_CRASH_AFTER` names, in protocol order.
pub const CRASH_STEPS: [&str; 5] = [
    "next-key-written",
    "prepared",
    "committed",
    "switched",
    "promoted",
];
/// The nftables table that cuts a host off its underlay (ours: only the lab creates it).
const OFFLINE_TABLE: &str = "meshlab_offline";
/// The python receiver/sender of [`TcpStream`].
const PYTHON: &str = "/usr/bin/python3";

/// The public key (base64) of a private key (base64, as in a key file).
pub fn public_of(private_b64: &str) -> Result<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let bytes = b64
        .decode(private_b64.trim())
        .context("key file is not base64")?;
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow!("key file does not hold 32 bytes"))?;
    let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(arr));
    Ok(b64.encode(public.as_bytes()))
}

/// `(transmitted, received)` from ping's summary line.
pub fn ping_summary(log: &str) -> Result<(u32, u32)> {
    let line = log
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .ok_or_else(|| anyhow!("no ping summary in:\n{log}"))?;
    let num = |word: &str| -> Result<u32> {
        let before = line
            .split(',')
            .find(|p| p.contains(word))
            .ok_or_else(|| anyhow!("no {word:?} in {line:?}"))?;
        before
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("cannot read {word:?} in {line:?}"))
    };
    Ok((num("transmitted")?, num("received")?))
}

/// A host's key files: the current key's public half (if the file exists) and the next key's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFiles {
    pub current: Option<String>,
    pub next: Option<String>,
}

/// What a WireGuard handshake probe runs with (see [`Lab::probe_handshake`]).
#[derive(Debug, Clone)]
pub struct Probe<'a> {
    /// The host the probe interface is created in (it must not need its mesh routes meanwhile).
    pub host: &'a str,
    /// The probe interface's name.
    pub iface: &'a str,
    /// The private key the probe claims (base64).
    pub private_key: &'a str,
    /// The peer it talks to: public key, `ip:port` endpoint and mesh address.
    pub peer_key: &'a str,
    pub peer_endpoint: &'a str,
    pub peer_addr: std::net::Ipv4Addr,
    /// The probe's own address on its interface.
    pub own_addr: std::net::Ipv4Addr,
}

/// A TCP stream over the mesh between two hosts, for the length of a test: one connection,
/// a patterned byte stream (byte i is `i mod 251`) sent every 10 ms, checked by the receiver.
#[derive(Debug)]
pub struct TcpStream {
    pub sender: ProcId,
    pub receiver: ProcId,
    pub sender_log: PathBuf,
    pub receiver_log: PathBuf,
}

/// Pings from one host to another every 10 ms, in the background, counted at the end.
#[derive(Debug)]
pub struct PingWindow {
    pub proc: ProcId,
    pub log: PathBuf,
    pub count: u32,
}

/// What the stream carried: bytes the sender wrote, bytes the receiver got and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReport {
    pub sent: u64,
    pub received: u64,
    pub corrupt_chunks: u64,
    pub duration: Duration,
}

const RECEIVER: &str = r#"
import socket, sys
port = int(sys.argv[1])
pat = bytes(range(251)) * 600
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(1)
print("LISTENING", flush=True)
c, peer = s.accept()
print("ACCEPTED", peer, flush=True)
n = bad = 0
try:
    while True:
        d = c.recv(65536)
        if not d:
            break
        o = n % 251
        if d != pat[o:o + len(d)]:
            bad += 1
        n += len(d)
    c.sendall(("%d %d\n" % (n, bad)).encode())
    c.shutdown(socket.SHUT_WR)
    c.settimeout(10)
    c.recv(1)
except Exception as e:
    print("RECEIVER ERROR %r after %d bytes" % (e, n), flush=True)
    sys.exit(1)
print("RECEIVED %d CORRUPT %d" % (n, bad), flush=True)
"#;

const SENDER: &str = r#"
import signal, socket, sys, time
addr, port, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
pat = bytes(range(251)) * 600
s = socket.create_connection((addr, port), timeout=10)
print("CONNECTED", flush=True)
n = 0
t0 = time.monotonic()
try:
    while not stop:
        o = n % 251
        s.sendall(pat[o:o + chunk])
        n += chunk
        time.sleep(0.01)
    s.shutdown(socket.SHUT_WR)
    s.settimeout(30)
    reply = b""
    while not reply.endswith(b"\n"):
        d = s.recv(100)
        if not d:
            break
        reply += d
    s.close()
except Exception as e:
    print("SENDER ERROR %r after %d bytes, %.1f s" % (e, n, time.monotonic() - t0), flush=True)
    sys.exit(1)
print("SENT %d ACKED %s SECONDS %.1f" % (n, reply.decode().strip(), time.monotonic() - t0), flush=True)
"#;

/// `line` without ANSI escape sequences (tracing's colours).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn exit_ok(status: Option<ExitStatus>) -> bool {
    status.is_none_or(|s| s.success())
}

fn field<T: std::str::FromStr>(text: &str, word: &str) -> Option<T> {
    let mut it = text.split_whitespace();
    while let Some(w) = it.next() {
        if w == word {
            return it.next()?.parse().ok();
        }
    }
    None
}

impl Lab {
    /// `r`, with the end of each of `hosts`' meshd logs added to an error (what a failed lab
    /// test needs to be diagnosed after its lab is gone).
    pub fn with_logs<T>(&self, hosts: &[&str], r: Result<T>) -> Result<T> {
        r.map_err(|e| {
            let mut logs = String::new();
            for h in hosts {
                logs.push_str(&format!(
                    "\n----- end of {h}'s meshd log\n{}",
                    self.meshd_log_tail(h, 40)
                ));
            }
            e.context(format!("meshd logs:{logs}"))
        })
    }

    /// The last `n` lines of `host`'s meshd log without colours and without the netlink
    /// crate's warnings about newer kernels (two every reconcile pass).
    pub fn meshd_log_tail(&self, host: &str, n: usize) -> String {
        let lines = self.meshd_log_lines(host);
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `host`'s meshd log as lines without colours (so `op=remove peer` matches) and without
    /// the netlink crate's warnings.
    pub fn meshd_log_lines(&self, host: &str) -> Vec<String> {
        let text = std::fs::read_to_string(self.meshd_log(host)).unwrap_or_default();
        text.lines()
            .filter(|l| !l.contains("netlink_packet_route"))
            .map(strip_ansi)
            .collect()
    }

    /// Stop meshd `p` with `sig` and wait until it has gone (SIGTERM leaves the interface up).
    pub fn stop_meshd(&self, p: ProcId, sig: i32) -> Result<()> {
        if !self.signal(p, sig) {
            bail!("could not signal meshd (pid {})", p.pid);
        }
        self.wait_exit(p, Duration::from_secs(15))?;
        Ok(())
    }

    /// Restart `host`'s meshd (SIGTERM, then start with `env`) and wait until it answers
    /// `meshctl status` (`meshctl hosts` on the coordinator).
    pub fn restart_meshd_env(&self, host: &str, p: ProcId, env: &[(&str, &str)]) -> Result<ProcId> {
        self.stop_meshd(p, libc::SIGTERM)?;
        let p = self.start_meshd_env(host, env)?;
        let probe: &[&str] = if host == COORDINATOR {
            &["hosts"]
        } else {
            &["status"]
        };
        self.wait_meshctl(host, p, probe, Duration::from_secs(30))?;
        Ok(p)
    }

    /// The public halves of `host`'s key file and next-key file (`None` where a file is
    /// missing).
    pub fn key_files(&self, host: &str) -> Result<KeyFiles> {
        let read = |path: &str| -> Result<Option<String>> {
            match self.read_file(host, path) {
                Ok(text) => Ok(Some(public_of(&text)?)),
                Err(_) => Ok(None),
            }
        };
        Ok(KeyFiles {
            current: read(KEY_PATH)?,
            next: read(NEXT_KEY_PATH)?,
        })
    }

    /// The key `host`'s interface runs (`wg show wgmesh0 public-key`).
    pub fn device_key(&self, host: &str) -> Result<String> {
        Ok(self
            .exec_ok(host, &["wg", "show", MESH_IFACE, "public-key"])?
            .trim()
            .to_owned())
    }

    /// `host`'s key where the coordinator's registry lists it.
    pub fn registry_key(&self, host: &str) -> Result<String> {
        let reg = parse_hosts(&self.meshctl(COORDINATOR, &["hosts", "--json"])?)?;
        reg.into_iter()
            .find(|h| h.name == host)
            .map(|h| h.public_key)
            .ok_or_else(|| anyhow!("{host} is not in the coordinator's registry"))
    }

    /// Why `host`'s key is not consistent across the fleet, or `None` if it is: exactly one key
    /// file (no next key), its public key is what the interface runs, what the registry lists,
    /// and a peer of every host in `peers`.
    pub fn key_inconsistency(&self, host: &str, peers: &[&str]) -> Result<Option<String>> {
        let files = self.key_files(host)?;
        let Some(file) = files.current else {
            return Ok(Some(format!("{host} has no {KEY_PATH}")));
        };
        if let Some(next) = files.next {
            return Ok(Some(format!("{host} still has {NEXT_KEY_PATH} ({next})")));
        }
        let device = self.device_key(host)?;
        if device != file {
            return Ok(Some(format!(
                "{host}'s interface runs {device}, its key file holds {file}"
            )));
        }
        let registry = self.registry_key(host)?;
        if registry != file {
            return Ok(Some(format!(
                "the registry lists {registry} for {host}, its key file holds {file}"
            )));
        }
        for p in peers.iter().filter(|p| **p != host) {
            if !self.wg_peers(p)?.contains(&file) {
                return Ok(Some(format!("{p} has no peer {file} ({host})")));
            }
        }
        Ok(None)
    }

    /// Wait until `host`'s key is consistent (see [`Lab::key_inconsistency`]); its key.
    pub fn wait_key_consistent(&self, host: &str, peers: &[&str], t: Duration) -> Result<String> {
        let mut last = String::new();
        let r = poll_for(t, &format!("{host}'s key to be consistent"), || match self
            .key_inconsistency(host, peers)?
        {
            None => Ok(Some(())),
            Some(why) => {
                last = why;
                Ok(None)
            }
        });
        r.with_context(|| format!("last seen: {last}"))?;
        self.key_files(host)?
            .current
            .ok_or_else(|| anyhow!("{host} lost its key file"))
    }

    /// Cut `host` off its underlay: an nftables table in its own namespace drops everything
    /// in and out of its underlay interface (the loopback and the mesh interface itself stay;
    /// nothing crosses the underlay, so the mesh is dead too).
    pub fn cut_underlay(&self, host: &str) -> Result<()> {
        let eth = crate::topology::HOST_IFACE;
        let rules = format!(
            "table inet {OFFLINE_TABLE} {{\n\
             \tchain in {{ type filter hook input priority -400; policy accept; iifname \"{eth}\" drop; }}\n\
             \tchain out {{ type filter hook output priority -400; policy accept; oifname \"{eth}\" drop; }}\n\
             }}\n"
        );
        let out = self.exec_input(host, &["nft", "-f", "-"], rules.as_bytes())?;
        crate::lab::check_output(out, &format!("[{host}] nft -f (cut the underlay)"))?;
        Ok(())
    }

    /// Undo [`Lab::cut_underlay`].
    pub fn restore_underlay(&self, host: &str) -> Result<()> {
        self.exec_ok(host, &["nft", "delete", "table", "inet", OFFLINE_TABLE])?;
        Ok(())
    }

    /// Bring up a wireguard-go interface in the probe host holding `probe.private_key`, with
    /// one peer, and report whether a handshake completes within `wait`. The interface is
    /// removed afterwards.
    pub fn probe_handshake(&self, probe: &Probe<'_>, wait: Duration) -> Result<bool> {
        let (host, iface) = (probe.host, probe.iface);
        let _ = self.exec(host, &["ip", "link", "del", iface]);
        self.exec_ok(host, &["wireguard-go", iface])?;
        let peer_cidr = format!("{}/32", probe.peer_addr);
        let out = self.exec_input(
            host,
            &[
                "wg",
                "set",
                iface,
                "private-key",
                "/dev/stdin",
                "peer",
                probe.peer_key,
                "endpoint",
                probe.peer_endpoint,
                "allowed-ips",
                &peer_cidr,
                "persistent-keepalive",
                "1",
            ],
            format!("{}\n", probe.private_key.trim()).as_bytes(),
        )?;
        crate::lab::check_output(out, &format!("[{host}] wg set {iface}"))?;
        let own = format!("{}/32", probe.own_addr);
        self.exec_ok(host, &["ip", "addr", "add", &own, "dev", iface])?;
        self.exec_ok(host, &["ip", "link", "set", iface, "up"])?;
        self.exec_ok(host, &["ip", "route", "add", &peer_cidr, "dev", iface])?;
        let deadline = Instant::now() + wait;
        let mut shook = false;
        while Instant::now() < deadline {
            let out = self.exec_ok(host, &["wg", "show", iface, "latest-handshakes"])?;
            if out
                .split_whitespace()
                .nth(1)
                .is_some_and(|t| t != "0" && !t.is_empty())
            {
                shook = true;
                break;
            }
            // Traffic toward the peer makes the probe initiate (and retry) handshakes.
            let _ = self.exec(
                host,
                &[
                    "ping",
                    "-n",
                    "-q",
                    "-c",
                    "1",
                    "-W",
                    "1",
                    &probe.peer_addr.to_string(),
                ],
            );
        }
        let show = self.exec(host, &["wg", "show", iface])?;
        eprintln!(
            "probe {iface} in {host} after {wait:?}: {}{}",
            String::from_utf8_lossy(&show.stdout),
            String::from_utf8_lossy(&show.stderr)
        );
        let _ = self.exec(host, &["ip", "link", "del", iface]);
        Ok(shook)
    }

    /// Start `count` pings from `from` to `to`'s mesh address, one every 10 ms (each waits at
    /// most 1 s for its answer); `tag` names the log.
    pub fn start_ping_window(
        &self,
        from: &str,
        to: &str,
        count: u32,
        tag: &str,
    ) -> Result<PingWindow> {
        let log = self.dir().join(format!("ping-{tag}-{from}-{to}.log"));
        let addr = self.mesh_addr(to)?.to_string();
        let proc = self.spawn(
            from,
            &[
                "ping",
                "-n",
                "-q",
                "-i",
                "0.01",
                "-c",
                &count.to_string(),
                "-W",
                "1",
                &addr,
            ],
            Some(&log),
        )?;
        Ok(PingWindow { proc, log, count })
    }

    /// Wait for the window's pings to end: `(transmitted, received)`.
    pub fn finish_ping_window(&self, w: &PingWindow) -> Result<(u32, u32)> {
        let t = Duration::from_millis(u64::from(w.count) * 10) + Duration::from_secs(30);
        if self.wait_exit(w.proc, t).is_err() {
            self.signal(w.proc, libc::SIGINT);
            self.wait_exit(w.proc, Duration::from_secs(5))?;
        }
        ping_summary(&std::fs::read_to_string(&w.log)?)
    }

    /// Start a TCP stream from `from` to `to`'s mesh address, port `port`: `chunk` bytes every
    /// 10 ms on one connection, until [`Lab::finish_tcp_stream`].
    pub fn start_tcp_stream(
        &self,
        from: &str,
        to: &str,
        port: u16,
        chunk: usize,
    ) -> Result<TcpStream> {
        let receiver_log = self.dir().join(format!("tcp-{to}-{port}.log"));
        let sender_log = self.dir().join(format!("tcp-{from}-{port}.log"));
        let port_s = port.to_string();
        let receiver = self.spawn(
            to,
            &[PYTHON, "-u", "-c", RECEIVER, &port_s],
            Some(&receiver_log),
        )?;
        crate::poll::poll_until(
            Duration::from_secs(10),
            &format!("the TCP receiver in {to} to listen"),
            || {
                if !self.is_running(receiver) {
                    bail!(
                        "the receiver exited: {}",
                        std::fs::read_to_string(&receiver_log).unwrap_or_default()
                    );
                }
                Ok(std::fs::read_to_string(&receiver_log)
                    .unwrap_or_default()
                    .contains("LISTENING"))
            },
        )?;
        let addr = self.mesh_addr(to)?.to_string();
        let sender = self.spawn(
            from,
            &[
                PYTHON,
                "-u",
                "-c",
                SENDER,
                &addr,
                &port_s,
                &chunk.to_string(),
            ],
            Some(&sender_log),
        )?;
        crate::poll::poll_until(
            Duration::from_secs(10),
            &format!("the TCP sender in {from} to connect to {to}"),
            || {
                if !self.is_running(sender) {
                    bail!(
                        "the sender exited: {}",
                        std::fs::read_to_string(&sender_log).unwrap_or_default()
                    );
                }
                Ok(std::fs::read_to_string(&sender_log)
                    .unwrap_or_default()
                    .contains("CONNECTED"))
            },
        )?;
        Ok(TcpStream {
            sender,
            receiver,
            sender_log,
            receiver_log,
        })
    }

    /// Stop the stream's sender (it closes its half, the receiver answers with what it got)
    /// and check the whole run: both ends exited cleanly (no reset, no timeout), the receiver
    /// got every byte sent, and each byte was the one sent.
    pub fn finish_tcp_stream(&self, s: &TcpStream) -> Result<StreamReport> {
        let sender_alive = self.is_running(s.sender);
        self.signal(s.sender, libc::SIGTERM);
        let sent_status = self.wait_exit(s.sender, Duration::from_secs(40))?;
        let recv_status = self.wait_exit(s.receiver, Duration::from_secs(20))?;
        let sent_log = std::fs::read_to_string(&s.sender_log).unwrap_or_default();
        let recv_log = std::fs::read_to_string(&s.receiver_log).unwrap_or_default();
        if !sender_alive || !exit_ok(sent_status) || !exit_ok(recv_status) {
            bail!(
                "the TCP stream broke (sender exited on its own: {}):\nsender: {}\nreceiver: {}",
                !sender_alive,
                sent_log.trim(),
                recv_log.trim()
            );
        }
        let sent: u64 = field(&sent_log, "SENT")
            .ok_or_else(|| anyhow!("no SENT line in the sender's log: {sent_log}"))?;
        let acked: u64 = field(&sent_log, "ACKED")
            .ok_or_else(|| anyhow!("no ACKED count in the sender's log: {sent_log}"))?;
        let secs: f64 = field(&sent_log, "SECONDS").unwrap_or(0.0);
        let received: u64 = field(&recv_log, "RECEIVED")
            .ok_or_else(|| anyhow!("no RECEIVED line in the receiver's log: {recv_log}"))?;
        let corrupt_chunks: u64 = field(&recv_log, "CORRUPT").unwrap_or(u64::MAX);
        if acked != received {
            bail!("the receiver acknowledged {acked} bytes but logged {received}");
        }
        Ok(StreamReport {
            sent,
            received,
            corrupt_chunks,
            duration: Duration::from_secs_f64(secs),
        })
    }
}

/// The coordinator's WireGuard endpoint as members know it (`underlay:51871`).
pub fn coordinator_endpoint() -> String {
    let underlay = crate::topology::host(COORDINATOR)
        .and_then(|h| h.addr)
        .map(|a| a.to_string())
        .unwrap_or_default();
    format!("{underlay}:{MESH_PORT}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ping_summaries_fields_and_keys() {
        let log = "--- 10.99.99.2 ping statistics ---\n300 packets transmitted, 299 received, 0.333% packet loss, time 3012ms\n";
        assert_eq!(ping_summary(log).expect("summary"), (300, 299));
        assert!(ping_summary("nothing").is_err());
        assert_eq!(
            field::<u64>("SENT 123 ACKED 123 0 SECONDS 4.5", "ACKED"),
            Some(123)
        );
        assert_eq!(
            field::<f64>("SENT 123 ACKED 123 0 SECONDS 4.5", "SECONDS"),
            Some(4.5)
        );
        assert_eq!(field::<u64>("SENT x", "SENT"), None);
        let (private, public) = crate::fleet::generate_keypair();
        assert_eq!(public_of(&format!("{private}\n")).expect("public"), public);
        assert!(public_of("not a key").is_err());
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m key rotated"),
            "2026  INFO key rotated"
        );
        assert_eq!(coordinator_endpoint(), "198.51.100.1:51871");
    }
}
