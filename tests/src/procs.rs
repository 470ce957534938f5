//! Processes: identify them safely (PID + start time, so a recycled PID is never killed),
//! signal them, and find the ones living in one of our namespaces.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::poll::POLL_INTERVAL;

/// A process we started (or that lives in a namespace we created), identified by PID and the
/// kernel start time from `/proc/PID/stat`, so a PID reused by someone else is never touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcId {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcId {
    /// Identify a live PID now.
    pub fn of(pid: u32) -> Result<ProcId> {
        let stat = read_stat(pid).with_context(|| format!("process {pid} is gone"))?;
        Ok(ProcId {
            pid,
            start_time: stat.start_time,
        })
    }

    /// This very process.
    pub fn current() -> Result<ProcId> {
        ProcId::of(std::process::id())
    }

    /// True while this exact process exists and has not exited (zombies count as exited).
    pub fn is_alive(&self) -> bool {
        match read_stat(self.pid) {
            Some(s) => s.start_time == self.start_time && s.state != 'Z' && s.state != 'X',
            None => false,
        }
    }

    /// Send a signal if (and only if) this exact process is still alive.
    pub fn signal(&self, sig: i32) -> bool {
        if !self.is_alive() {
            return false;
        }
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, sig) == 0 }
    }

    /// SIGTERM, wait up to `grace` for exit, then SIGKILL and wait a little more.
    /// Returns true if the process is gone.
    pub fn terminate(&self, grace: Duration) -> bool {
        if !self.is_alive() {
            return true;
        }
        self.signal(libc::SIGTERM);
        if wait_gone(self, grace) {
            return true;
        }
        self.signal(libc::SIGKILL);
        wait_gone(self, Duration::from_secs(5))
    }
}

fn wait_gone(p: &ProcId, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !p.is_alive() {
            return true;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    !p.is_alive()
}

struct Stat {
    state: char,
    start_time: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    let state = fields.first()?.chars().next()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some(Stat { state, start_time })
}

/// The namespace identity of a process, e.g. `net:[4026532300]`.
pub fn ns_of(pid: u32, kind: &str) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Every live process whose network namespace is `net_ns` (as `ns_of` spells it).
pub fn procs_in_netns(net_ns: &str) -> Vec<ProcId> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        if ns_of(pid, "net").as_deref() == Some(net_ns) {
            if let Ok(p) = ProcId::of(pid) {
                if p.is_alive() {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// The executable of a process, if readable.
pub fn exe_of(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Processes in `net_ns` running the executable `exe`.
pub fn procs_running(net_ns: &str, exe: &Path) -> Vec<ProcId> {
    let want = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    procs_in_netns(net_ns)
        .into_iter()
        .filter(|p| exe_of(p.pid).is_some_and(|e| e == want))
        .collect()
}
