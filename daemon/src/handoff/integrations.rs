//! The integration engine: keeps the files meshd hands to K3s, DRBD, Prometheus, `/etc/hosts`
//! and user templates in step with the mesh.
//!
//! On every [`IntegrationEngine::apply`] each configured output is rendered from the
//! [`MeshView`] (pure, in `mesh_proto::handoff`). When the text differs from the file, the
//! file is replaced atomically (temp file in the same directory, fsync, rename; the old file's
//! mode and owner are kept), then the output's `check` command runs (a dry run, e.g.
//! `drbdadm -d adjust r0`), then its `reload` command. A render error leaves the file alone;
//! a failing check or reload puts the old content back. Either way the output's
//! [`IntegrationStatus`] carries the error for `meshctl status` and `meshctl doctor`, and the
//! same rendered content is not tried again until it changes, so each reload runs exactly once
//! per change.
//!
//! One exception: a reload that fails for a file with no reloaded version before it (the
//! output's first file, or one whose reload never succeeded) leaves the file in place and is
//! retried at every later apply (each netmap change, every [`super::RECHECK`], `meshctl
//! reload`) until it succeeds. There is nothing to put back, and the service may need the file
//! to become ready: DRBD's first setup creates the metadata from the resource file
//! (`drbdadm create-md r0`) before `drbdadm adjust r0` can bring the resource up.
//!
//! The engine blocks (file writes, commands with a timeout): call it from
//! `tokio::task::spawn_blocking`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_proto::config::integrations::IntegrationsConfig;
use mesh_proto::handoff::{
    outputs, replace_hosts_block, IntegrationStatus, MeshView, Output, OutputKind,
};

use crate::disk::WriteOptions;
use crate::error::CommandError;

/// How long a check or reload command may run before it is killed and counted as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs an integration's check and reload commands. Tests record the calls instead.
pub trait CommandRunner: Send + Sync {
    /// Run `argv` (no shell); the error carries what the operator needs to see (exit status
    /// and the tail of stderr).
    fn run(&self, argv: &[String]) -> Result<(), CommandError>;
}

/// Runs commands with [`std::process::Command`], killing them after `timeout`.
#[derive(Debug, Clone)]
pub struct SystemRunner {
    pub timeout: Duration,
}

impl Default for SystemRunner {
    fn default() -> Self {
        SystemRunner {
            timeout: COMMAND_TIMEOUT,
        }
    }
}

impl CommandRunner for SystemRunner {
    fn run(&self, argv: &[String]) -> Result<(), CommandError> {
        let (program, args) = argv.split_first().ok_or(CommandError::Empty)?;
        let command = argv.join(" ");
        let mut child = match Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(source) => return Err(CommandError::Start { command, source }),
        };
        // Drain stderr while waiting, so a chatty command cannot block on a full pipe.
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = io::Read::read_to_string(&mut e, &mut s);
                s
            })
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(CommandError::TimedOut {
                        command,
                        limit: self.timeout,
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(source) => return Err(CommandError::Wait { command, source }),
            }
        };
        let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(CommandError::Failed {
            command,
            status,
            stderr: tail.join(" / "),
        })
    }
}

/// Write `content` to `path` with the one writer ([`crate::disk::write_file`], options
/// [`WriteOptions::SHARED`]): a random temp file created `O_EXCL|O_NOFOLLOW` in the same
/// directory, fsync, rename over `path`, fsync the directory. An existing file's mode and owner
/// carry over (set on the descriptor); a new file gets 0644 (its parent directories are
/// created, 0755). A symbolic link at `path` (or a symlinked directory not owned by root) is
/// refused with an error naming it: the owner of an output directory cannot steer root's
/// write elsewhere.
///
/// An existing file that cannot be replaced is written in place (opened `O_NOFOLLOW`): a
/// bind-mounted file (EBUSY or EXDEV on rename: a container's /etc/hosts), and a writable file
/// in a read-only directory (EROFS on the temp file: /etc/hosts under systemd's
/// `ProtectSystem=strict` with `ReadWritePaths=/etc/hosts`, which bind-mounts the file
/// writable over a read-only /etc).
pub fn write_atomic(path: &Path, content: &[u8]) -> io::Result<()> {
    crate::disk::write_file(path, content, WriteOptions::SHARED)
}

/// "cannot write PATH: ERROR", with the way out when the file system is read-only: under the
/// packaged systemd unit (`ProtectSystem=strict`) only listed paths are writable. An existing
/// file needs only itself listed (it is then written in place); a new one, its directory.
fn write_error(path: &Path, e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::InvalidInput {
        // The writer's refusal ("refusing to write PATH: it is a symbolic link ...").
        return e.to_string();
    }
    let mut message = format!("cannot write {}: {e}", path.display());
    if e.raw_os_error() == Some(libc::EROFS) {
        let (allow, listed) = if path.exists() {
            (format!("add {}", path.display()), path)
        } else {
            let dir = path.parent().unwrap_or(Path::new("/"));
            (format!("create {} and add it", dir.display()), dir)
        };
        message.push_str(&format!(
            "; meshd may write only where its systemd unit allows (ProtectSystem=strict): \
             {allow} with `systemctl edit meshd` ([Service] ReadWritePaths={}), then \
             `systemctl restart meshd`",
            listed.display()
        ));
    }
    message
}

/// Put `old` back after a failed check or reload (`None`: there was no file; remove ours).
fn restore(path: &Path, old: Option<&str>) -> io::Result<()> {
    match old {
        Some(text) => write_atomic(path, text.as_bytes()),
        None => match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// The output's current text (`None`: no file); a symbolic link is refused, not followed.
fn read_existing(path: &Path) -> io::Result<Option<String>> {
    crate::disk::read_to_string_nofollow(path)
}

#[derive(Debug, Clone)]
struct OutputState {
    status: IntegrationStatus,
    /// Content whose write, check or reload failed: not tried again until the render changes.
    failed: Option<String>,
    /// Content left in place after its check passed and its reload failed, with no reloaded
    /// file before it: its reload is retried at every apply until it succeeds.
    pending_reload: Option<String>,
}

/// What one [`IntegrationEngine::apply`] did to one output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Unchanged,
    /// Written, checked and reloaded.
    Changed,
    /// Rendering, writing, checking or reloading failed; the old file is in place.
    Failed(String),
    /// The same content failed before; nothing was run.
    StillFailing,
    /// Not for this host (a DRBD resource it is not part of).
    NotApplicable,
}

/// Keeps the configured outputs in step with the mesh. One per daemon.
pub struct IntegrationEngine {
    outputs: Vec<Output>,
    interface: String,
    runner: Box<dyn CommandRunner>,
    state: BTreeMap<String, OutputState>,
}

impl IntegrationEngine {
    /// `interface` is the mesh interface (K3s's `flannel-iface` unless configured otherwise).
    pub fn new(
        config: &IntegrationsConfig,
        interface: impl Into<String>,
        runner: Box<dyn CommandRunner>,
    ) -> Self {
        IntegrationEngine {
            outputs: outputs(config),
            interface: interface.into(),
            runner,
            state: BTreeMap::new(),
        }
    }

    /// With [`SystemRunner`].
    pub fn with_system_runner(config: &IntegrationsConfig, interface: impl Into<String>) -> Self {
        Self::new(config, interface, Box::new(SystemRunner::default()))
    }

    /// Whether anything is configured (the daemon may skip calling [`Self::apply`]).
    pub fn is_empty(&self) -> bool {
        self.outputs.is_empty()
    }

    /// Bring every output in line with `view`; `now_unix` stamps changes. Call after every
    /// netmap change (and once at start); cheap when nothing changed (one read per file).
    pub fn apply(&mut self, view: &MeshView, now_unix: u64) -> BTreeMap<String, Applied> {
        let mut report = BTreeMap::new();
        for out in &self.outputs {
            let prev = self.state.get(&out.name).cloned();
            let mut st = prev.clone().unwrap_or_else(|| OutputState {
                status: IntegrationStatus {
                    name: out.name.clone(),
                    path: out.path.clone(),
                    ok: true,
                    last_error: None,
                    last_change_unix: None,
                    last_reload_unix: None,
                    reload_pending: false,
                    failures: 0,
                },
                failed: None,
                pending_reload: None,
            });
            let applied = if out.applies(view) {
                apply_one(
                    out,
                    view,
                    &self.interface,
                    self.runner.as_ref(),
                    &mut st,
                    now_unix,
                )
            } else {
                Applied::NotApplicable
            };
            match &applied {
                // Once per error: a broken template fails again at every re-apply.
                Applied::Failed(e)
                    if prev.as_ref().and_then(|p| p.status.last_error.as_ref()) != Some(e) =>
                {
                    tracing::warn!(integration = %out.name, path = %out.path.display(), error = %e, "integration failed; the old file stays");
                }
                Applied::Failed(e) => {
                    tracing::debug!(integration = %out.name, error = %e, "integration still failing");
                }
                Applied::Changed => {
                    tracing::info!(integration = %out.name, path = %out.path.display(), "integration updated");
                }
                _ => {}
            }
            if applied == Applied::NotApplicable {
                self.state.remove(&out.name);
            } else {
                self.state.insert(out.name.clone(), st);
            }
            report.insert(out.name.clone(), applied);
        }
        report
    }

    /// Every applicable output's status, by name.
    pub fn statuses(&self) -> Vec<IntegrationStatus> {
        self.state.values().map(|s| s.status.clone()).collect()
    }

    /// Remove what meshd wrote for `/etc/hosts` (its block; the rest of the file stays), for
    /// `meshctl down`. Other outputs stay: K3s and DRBD need them to keep running.
    pub fn remove_hosts_block(&self) -> io::Result<()> {
        for out in &self.outputs {
            if out.kind == OutputKind::HostsBlock {
                if let Some(existing) = read_existing(&out.path)? {
                    let without = replace_hosts_block(&existing, None)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                    if without != existing {
                        write_atomic(&out.path, without.as_bytes())?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn fail(st: &mut OutputState, message: String, failed: Option<String>) -> Applied {
    st.status.ok = false;
    st.status.failures += 1;
    st.status.reload_pending = st.pending_reload.is_some();
    st.status.last_error = Some(message.clone());
    st.failed = failed;
    Applied::Failed(message)
}

fn apply_one(
    out: &Output,
    view: &MeshView,
    interface: &str,
    runner: &dyn CommandRunner,
    st: &mut OutputState,
    now_unix: u64,
) -> Applied {
    let template = match out.template_path() {
        Some(p) => match fs::read_to_string(p) {
            Ok(t) => Some(t),
            Err(e) => {
                return fail(
                    st,
                    format!("cannot read template {}: {e}", p.display()),
                    None,
                )
            }
        },
        None => None,
    };
    let rendered = match out.render(view, interface, template.as_deref()) {
        Ok(r) => r,
        Err(e) => return fail(st, e.to_string(), None),
    };
    let existing = match read_existing(&out.path) {
        Ok(e) => e,
        // A refusal (a symbolic link) names the path already.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => return fail(st, e.to_string(), None),
        Err(e) => return fail(st, format!("cannot read {}: {e}", out.path.display()), None),
    };
    let desired = if out.kind == OutputKind::HostsBlock {
        match replace_hosts_block(existing.as_deref().unwrap_or(""), Some(&rendered)) {
            Ok(d) => d,
            Err(e) => return fail(st, e.to_string(), None),
        }
    } else {
        rendered
    };
    if existing.as_deref() == Some(desired.as_str()) {
        if st.pending_reload.as_deref() == Some(desired.as_str()) {
            return retry_reload(out, runner, st, now_unix);
        }
        st.status.ok = true;
        st.status.last_error = None;
        st.status.reload_pending = false;
        st.failed = None;
        return Applied::Unchanged;
    }
    if st.failed.as_deref() == Some(desired.as_str()) {
        return Applied::StillFailing;
    }
    // No reloaded file to go back to: none at all, or ours still waiting for its reload.
    let first = existing.is_none() || st.pending_reload.is_some() && st.pending_reload == existing;
    st.pending_reload = None;
    if let Err(e) = write_atomic(&out.path, desired.as_bytes()) {
        return fail(st, write_error(&out.path, &e), Some(desired));
    }
    for (what, cmd) in [("check", &out.check), ("reload", &out.reload)] {
        let Some(argv) = cmd.as_ref().filter(|a| !a.is_empty()) else {
            continue;
        };
        if let Err(e) = runner.run(argv) {
            if what == "reload" && first {
                st.pending_reload = Some(desired);
                st.status.last_change_unix = Some(now_unix);
                return fail(st, pending_message(&e), None);
            }
            let mut message = format!("{what}: {e}; the previous file was put back");
            if let Err(re) = restore(&out.path, existing.as_deref()) {
                message = format!("{what}: {e}; putting the previous file back failed too: {re}");
            }
            return fail(st, message, Some(desired));
        }
        if what == "reload" {
            st.status.last_reload_unix = Some(now_unix);
        }
    }
    st.status.ok = true;
    st.status.last_error = None;
    st.status.reload_pending = false;
    st.status.last_change_unix = Some(now_unix);
    st.failed = None;
    Applied::Changed
}

fn pending_message(e: &CommandError) -> String {
    format!("reload: {e}")
}

/// The file is ours and checked, its reload failed before: run the reload again.
fn retry_reload(
    out: &Output,
    runner: &dyn CommandRunner,
    st: &mut OutputState,
    now_unix: u64,
) -> Applied {
    if let Some(argv) = out.reload.as_ref().filter(|a| !a.is_empty()) {
        if let Err(e) = runner.run(argv) {
            return fail(st, pending_message(&e), None);
        }
        st.status.last_reload_unix = Some(now_unix);
    }
    st.pending_reload = None;
    st.status.ok = true;
    st.status.last_error = None;
    st.status.reload_pending = false;
    st.failed = None;
    Applied::Changed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use mesh_proto::config::integrations::parse_integrations;
    use mesh_proto::netmap::{Netmap, NetmapPeer};
    use mesh_proto::PublicKey;
    use std::net::IpAddr;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    use std::sync::{Arc, Mutex};

    /// Records commands; fails those whose program (or whole command line) is in `fail`.
    #[derive(Clone, Default)]
    struct Recorder {
        calls: Arc<Mutex<Vec<Vec<String>>>>,
        fail: Arc<Mutex<Vec<String>>>,
    }

    impl CommandRunner for Recorder {
        fn run(&self, argv: &[String]) -> Result<(), CommandError> {
            self.calls.lock().unwrap().push(argv.to_vec());
            let whole = argv.join(" ");
            if self
                .fail
                .lock()
                .unwrap()
                .iter()
                .any(|f| *f == argv[0] || *f == whole)
            {
                Err(CommandError::exited(argv.join(" "), 1, ""))
            } else {
                Ok(())
            }
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<String> {
            self.calls
                .lock()
                .unwrap()
                .drain(..)
                .map(|a| a.join(" "))
                .collect()
        }
    }

    fn peer(name: &str, last: u8) -> NetmapPeer {
        NetmapPeer {
            name: name.into(),
            address: IpAddr::from([10, 99, 99, last]),
            public_key: PublicKey([last; 32]),
            allowed_ips: vec![format!("10.99.99.{last}/32").parse().unwrap()],
            endpoints: vec![],
            persistent_keepalive: None,
            static_peer: false,
            admin: false,
            key_created_unix: 0,
            next_public_key: None,
        }
    }

    fn view(version: u64, peers: &[(&str, u8)]) -> MeshView {
        let netmap = Netmap {
            version,
            mesh_cidr: "10.99.99.0/24".parse().unwrap(),
            name: "dock-prod".into(),
            address: IpAddr::from([10, 99, 99, 2]),
            public_key: PublicKey([2; 32]),
            peers: peers.iter().map(|(n, l)| peer(n, *l)).collect(),
            rotate_requested: false,
            ungranted_routes: Vec::new(),
        };
        MeshView::new(&netmap, Some("dock-load"))
    }

    fn config(dir: &Path) -> IntegrationsConfig {
        let d = dir.display();
        let text = format!(
            r#"
            [integrations.k3s]
            server = "dock-load"
            path = "{d}/k3s/config.yaml.d/90-meshd.yaml"
            reload = ["k3s-reload"]
            [[integrations.drbd]]
            resource = "r0"
            hosts = ["dock-prod", "dock-mirror"]
            disk = "/dev/vg0/r0"
            path = "{d}/drbd.d/r0.res"
            drbdadm = "drbdadm-fake"
            [integrations.prometheus]
            path = "{d}/file_sd/meshd.json"
            [integrations.hosts]
            path = "{d}/hosts"
            [[integrations.template]]
            name = "list"
            source = "{d}/list.j2"
            path = "{d}/list.txt"
            reload = ["list-reload"]
            "#
        );
        parse_integrations(&text, "t.toml").unwrap()
    }

    fn setup() -> (tempfile::TempDir, IntegrationEngine, Recorder) {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("list.j2"),
            "{% for h in hosts %}{{ h.name }} {{ h.address }}\n{% endfor %}",
        )
        .unwrap();
        fs::write(dir.path().join("hosts"), "127.0.0.1\tlocalhost\n").unwrap();
        let rec = Recorder::default();
        let engine = IntegrationEngine::new(&config(dir.path()), "wgmesh0", Box::new(rec.clone()));
        (dir, engine, rec)
    }

    #[test]
    fn writes_everything_and_reloads_once_per_change() {
        let (dir, mut engine, rec) = setup();
        let p = dir.path();
        let v1 = view(1, &[("dock-load", 1), ("dock-mirror", 3)]);
        let r = engine.apply(&v1, 100);
        assert!(r.values().all(|a| *a == Applied::Changed), "{r:?}");
        assert_eq!(
            rec.take(),
            [
                "k3s-reload",
                "drbdadm-fake -d adjust r0",
                "drbdadm-fake adjust r0",
                "list-reload"
            ]
        );
        let k3s = fs::read_to_string(p.join("k3s/config.yaml.d/90-meshd.yaml")).unwrap();
        let y: serde_yaml::Value = serde_yaml::from_str(&k3s).unwrap();
        assert_eq!(y["node-ip"], "10.99.99.2");
        assert_eq!(y["server"], "https://10.99.99.1:6443");
        let res = fs::read_to_string(p.join("drbd.d/r0.res")).unwrap();
        assert!(
            res.contains("  on dock-mirror {\n    address 10.99.99.3:7788;\n"),
            "{res}"
        );
        let hosts = fs::read_to_string(p.join("hosts")).unwrap();
        assert!(
            hosts.starts_with("127.0.0.1\tlocalhost\n# BEGIN meshd"),
            "{hosts}"
        );
        assert_eq!(
            fs::read_to_string(p.join("list.txt")).unwrap(),
            "dock-load 10.99.99.1\ndock-mirror 10.99.99.3\ndock-prod 10.99.99.2\n"
        );
        let sd: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(p.join("file_sd/meshd.json")).unwrap())
                .unwrap();
        assert_eq!(sd.as_array().unwrap().len(), 6);
        // No temp files left behind.
        for d in ["k3s/config.yaml.d", "drbd.d", "file_sd", ""] {
            for e in fs::read_dir(p.join(d)).unwrap() {
                let name = e.unwrap().file_name();
                assert!(!name.to_string_lossy().ends_with(".tmp"), "{name:?}");
            }
        }

        // Same view: nothing runs.
        let r = engine.apply(&v1, 200);
        assert!(r.values().all(|a| *a == Applied::Unchanged), "{r:?}");
        assert!(rec.take().is_empty());

        // A host joins: only what mentions it changes (no version in the K3s drop-in or the
        // DRBD resource: neither K3s nor DRBD is touched when a host outside them joins).
        let v2 = view(2, &[("dock-load", 1), ("dock-mirror", 3), ("dock-edge", 4)]);
        engine.apply(&v2, 300);
        let calls = rec.take();
        assert_eq!(
            calls.iter().filter(|c| *c == "list-reload").count(),
            1,
            "{calls:?}"
        );
        assert!(
            !calls
                .iter()
                .any(|c| c.contains("adjust r0") || c == "k3s-reload"),
            "{calls:?}"
        );
        assert!(fs::read_to_string(p.join("hosts"))
            .unwrap()
            .contains("dock-edge.mesh.internal"));
        let st = engine.statuses();
        for s in &st {
            let want = if s.name == "k3s" || s.name == "drbd:r0" {
                Some(100)
            } else {
                Some(300)
            };
            assert!(s.ok && s.last_change_unix == want, "{st:?}");
        }
        engine.apply(&v2, 400);
        assert!(rec.take().is_empty());
    }

    #[test]
    fn broken_template_keeps_the_old_file_and_records_the_error() {
        let (dir, mut engine, rec) = setup();
        let p = dir.path();
        engine.apply(&view(1, &[("dock-load", 1), ("dock-mirror", 3)]), 100);
        rec.take();
        let before = fs::read_to_string(p.join("list.txt")).unwrap();
        fs::write(
            p.join("list.j2"),
            "{% for h in hosts %}{{ h.nmae }}{% endfor %}",
        )
        .unwrap();
        let v2 = view(2, &[("dock-load", 1), ("dock-mirror", 3), ("dock-edge", 4)]);
        let r = engine.apply(&v2, 200);
        assert!(matches!(r["template:list"], Applied::Failed(_)), "{r:?}");
        assert_eq!(fs::read_to_string(p.join("list.txt")).unwrap(), before);
        assert!(!rec.take().contains(&"list-reload".to_owned()));
        let st = engine
            .statuses()
            .into_iter()
            .find(|s| s.name == "template:list")
            .unwrap();
        assert!(!st.ok);
        assert_eq!(st.failures, 1, "counted for /metrics: {st:?}");
        assert!(
            st.last_error.as_deref().unwrap().contains("template:list"),
            "{st:?}"
        );
        assert_eq!(st.last_change_unix, Some(100));
        // Fixed: written and reloaded once, status ok again; the count stays.
        fs::write(p.join("list.j2"), "{{ hosts | length }}\n").unwrap();
        engine.apply(&v2, 300);
        assert_eq!(fs::read_to_string(p.join("list.txt")).unwrap(), "4\n");
        assert_eq!(rec.take().iter().filter(|c| *c == "list-reload").count(), 1);
        assert!(engine.statuses().iter().all(|s| s.ok));
        assert!(engine
            .statuses()
            .iter()
            .any(|s| s.name == "template:list" && s.failures == 1));
    }

    #[test]
    fn failed_dry_run_puts_the_old_file_back_and_is_not_retried() {
        let (dir, mut engine, rec) = setup();
        let p = dir.path();
        engine.apply(&view(1, &[("dock-load", 1), ("dock-mirror", 3)]), 100);
        rec.take();
        let before = fs::read_to_string(p.join("drbd.d/r0.res")).unwrap();
        rec.fail.lock().unwrap().push("drbdadm-fake".into());
        let v2 = view(2, &[("dock-load", 1), ("dock-mirror", 33)]);
        let r = engine.apply(&v2, 200);
        assert!(matches!(r["drbd:r0"], Applied::Failed(_)), "{r:?}");
        assert_eq!(fs::read_to_string(p.join("drbd.d/r0.res")).unwrap(), before);
        let calls = rec.take();
        assert!(calls.contains(&"drbdadm-fake -d adjust r0".to_owned()));
        assert!(
            !calls.contains(&"drbdadm-fake adjust r0".to_owned()),
            "{calls:?}"
        );
        // Same content again: not retried.
        assert_eq!(engine.apply(&v2, 300)["drbd:r0"], Applied::StillFailing);
        assert!(!rec.take().iter().any(|c| c.starts_with("drbdadm")));
        let st = engine
            .statuses()
            .into_iter()
            .find(|s| s.name == "drbd:r0")
            .unwrap();
        assert!(st.last_error.unwrap().starts_with("check: "));
    }

    /// DRBD's first setup: the resource has no metadata yet, so `drbdadm adjust r0` fails
    /// until `drbdadm create-md r0` (which needs the file) has run. The file stays and the
    /// reload is retried at each apply; once it succeeds, a later failing reload puts the
    /// reloaded file back as before.
    #[test]
    fn first_reload_failure_keeps_the_file_and_retries_the_reload() {
        let (dir, mut engine, rec) = setup();
        let res = dir.path().join("drbd.d/r0.res");
        let status = |e: &IntegrationEngine| {
            e.statuses()
                .into_iter()
                .find(|s| s.name == "drbd:r0")
                .unwrap()
        };
        rec.fail
            .lock()
            .unwrap()
            .push("drbdadm-fake adjust r0".into());
        let v1 = view(1, &[("dock-load", 1), ("dock-mirror", 3)]);
        let r = engine.apply(&v1, 100);
        assert!(matches!(r["drbd:r0"], Applied::Failed(_)), "{r:?}");
        let calls = rec.take();
        assert!(calls.contains(&"drbdadm-fake -d adjust r0".to_owned()));
        assert!(calls.contains(&"drbdadm-fake adjust r0".to_owned()));
        let first = fs::read_to_string(&res).expect("the first file stays");
        let st = status(&engine);
        assert!(!st.ok);
        assert!(st.reload_pending, "{st:?}");
        assert!(
            st.last_error.as_deref().unwrap().starts_with("reload: "),
            "{st:?}"
        );
        assert_eq!(st.last_reload_unix, None);

        // Every apply retries the reload alone (no dry run, no rewrite) while it fails.
        for now in [130, 160] {
            let r = engine.apply(&v1, now);
            assert!(matches!(r["drbd:r0"], Applied::Failed(_)), "{r:?}");
            let drbd: Vec<String> = rec
                .take()
                .into_iter()
                .filter(|c| c.starts_with("drbdadm"))
                .collect();
            assert_eq!(drbd, ["drbdadm-fake adjust r0"]);
            assert_eq!(fs::read_to_string(&res).unwrap(), first);
        }
        // A change while still waiting: the new file replaces ours and stays too.
        let v2 = view(2, &[("dock-load", 1), ("dock-mirror", 33)]);
        assert!(matches!(
            engine.apply(&v2, 170)["drbd:r0"],
            Applied::Failed(_)
        ));
        let second = fs::read_to_string(&res).unwrap();
        assert_ne!(second, first);
        rec.take();

        // The metadata exists now: the retry succeeds, once.
        rec.fail.lock().unwrap().clear();
        assert_eq!(engine.apply(&v2, 190)["drbd:r0"], Applied::Changed);
        assert_eq!(rec.take(), ["drbdadm-fake adjust r0"]);
        let st = status(&engine);
        assert!(
            st.ok && st.last_error.is_none() && !st.reload_pending,
            "{st:?}"
        );
        assert_eq!(st.last_reload_unix, Some(190));
        assert_eq!(engine.apply(&v2, 220)["drbd:r0"], Applied::Unchanged);
        assert!(rec.take().is_empty());

        // With a reloaded file in place, a failing reload puts it back and is not retried.
        rec.fail
            .lock()
            .unwrap()
            .push("drbdadm-fake adjust r0".into());
        let v3 = view(3, &[("dock-load", 1), ("dock-mirror", 44)]);
        assert!(matches!(
            engine.apply(&v3, 250)["drbd:r0"],
            Applied::Failed(_)
        ));
        assert_eq!(fs::read_to_string(&res).unwrap(), second);
        assert!(!status(&engine).reload_pending);
        rec.take();
        assert_eq!(engine.apply(&v3, 280)["drbd:r0"], Applied::StillFailing);
        assert!(!rec.take().iter().any(|c| c.starts_with("drbdadm")));
    }

    #[test]
    fn drbd_resource_skipped_on_other_hosts_and_unknown_hosts_keep_the_file() {
        let (dir, mut engine, _rec) = setup();
        // dock-mirror is not in the mesh yet: the resource cannot be written.
        let r = engine.apply(&view(1, &[("dock-load", 1)]), 100);
        assert!(
            matches!(r["drbd:r0"], Applied::Failed(ref e) if e.contains("dock-mirror")),
            "{r:?}"
        );
        assert!(!dir.path().join("drbd.d/r0.res").exists());
    }

    #[test]
    fn atomic_write_keeps_mode_and_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a/b/file");
        write_atomic(&f, b"one").unwrap();
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o777, 0o644);
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "two");
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path().join("a/b")).unwrap().count(), 1);
    }

    #[test]
    fn hosts_block_removed_on_down() {
        let (dir, mut engine, _rec) = setup();
        engine.apply(&view(1, &[("dock-load", 1), ("dock-mirror", 3)]), 100);
        engine.remove_hosts_block().unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("hosts")).unwrap(),
            "127.0.0.1\tlocalhost\n"
        );
    }

    #[test]
    fn system_runner_reports_failures() {
        let r = SystemRunner {
            timeout: Duration::from_secs(5),
        };
        assert!(r.run(&["true".into()]).is_ok());
        let e = r
            .run(&["sh".into(), "-c".into(), "echo broken >&2; exit 3".into()])
            .unwrap_err();
        assert!(
            matches!(&e, CommandError::Failed { status, stderr, .. }
                if status.code() == Some(3) && stderr == "broken"),
            "{e:?}"
        );
        assert!(e.to_string().contains("broken"), "{e}");
        assert!(matches!(r.run(&[]), Err(CommandError::Empty)));
        let r = SystemRunner {
            timeout: Duration::from_millis(100),
        };
        let e = r.run(&["sleep".into(), "5".into()]).unwrap_err();
        assert!(matches!(e, CommandError::TimedOut { .. }), "{e:?}");
        assert!(e.to_string().contains("killed"), "{e}");
        let e = r.run(&["/nonexistent/x".into()]).unwrap_err();
        assert!(matches!(e, CommandError::Start { .. }), "{e:?}");
        assert!(e.to_string().contains("could not start"), "{e}");
    }

    fn yaml_keys(text: &str) -> Vec<String> {
        let y: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
        y.as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn k3s_dropins_parse_as_yaml_with_exact_keys() {
        use mesh_proto::handoff::{k3s_dropin, K3sRole};
        let load = MeshView::new(
            &Netmap {
                version: 1,
                mesh_cidr: "10.99.99.0/24".parse().unwrap(),
                name: "dock-load".into(),
                address: IpAddr::from([10, 99, 99, 1]),
                public_key: PublicKey([1; 32]),
                peers: vec![peer("dock-prod", 2)],
                rotate_requested: false,
                ungranted_routes: Vec::new(),
            },
            Some("dock-load"),
        );
        let server = k3s_dropin(&load, "wgmesh0", &K3sRole::Server).unwrap();
        assert_eq!(
            yaml_keys(&server),
            ["node-ip", "flannel-iface", "advertise-address", "tls-san+"]
        );
        let y: serde_yaml::Value = serde_yaml::from_str(&server).unwrap();
        assert_eq!(y["node-ip"], "10.99.99.1");
        assert_eq!(y["flannel-iface"], "wgmesh0");
        assert_eq!(y["advertise-address"], "10.99.99.1");
        assert_eq!(
            y["tls-san+"],
            serde_yaml::from_str::<serde_yaml::Value>("[10.99.99.1, dock-load.mesh.internal]")
                .unwrap()
        );
        let agent = k3s_dropin(
            &view(1, &[("dock-load", 1)]),
            "wgmesh0",
            &K3sRole::Agent {
                server: "dock-load".into(),
            },
        )
        .unwrap();
        assert_eq!(yaml_keys(&agent), ["node-ip", "flannel-iface", "server"]);
        let y: serde_yaml::Value = serde_yaml::from_str(&agent).unwrap();
        assert_eq!(y["node-ip"], "10.99.99.2");
        assert_eq!(y["server"], "https://10.99.99.1:6443");
    }

    #[test]
    fn prometheus_file_sd_has_exact_keys() {
        let text = mesh_proto::handoff::prometheus_targets(&view(1, &[("dock-load", 1)]));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let groups = v.as_array().unwrap();
        assert_eq!(groups.len(), 4);
        for g in groups {
            let keys: Vec<&String> = g.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["labels", "targets"]);
            let labels: Vec<&String> = g["labels"].as_object().unwrap().keys().collect();
            assert_eq!(labels, ["host", "job", "role"]);
        }
        let targets: Vec<(&str, &str)> = groups
            .iter()
            .map(|g| {
                (
                    g["targets"][0].as_str().unwrap(),
                    g["labels"]["job"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            targets,
            [
                ("10.99.99.1:9100", "node"),
                ("10.99.99.1:51873", "meshd"),
                ("10.99.99.2:9100", "node"),
                ("10.99.99.2:51873", "meshd")
            ]
        );
    }

    /// A tool from drbd-utils or prometheus, if installed (`tests/deps.sh` installs both).
    fn tool(name: &str) -> Option<PathBuf> {
        ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.exists())
    }

    #[test]
    fn drbdadm_parses_the_rendered_resource() {
        let Some(drbdadm) = tool("drbdadm") else {
            eprintln!("SKIP: drbdadm not installed (Debian package drbd-utils)");
            return;
        };
        let (dir, mut engine, _rec) = setup();
        engine.apply(&view(1, &[("dock-load", 1), ("dock-mirror", 3)]), 100);
        let res = dir.path().join("drbd.d/r0.res");
        // No kernel module needed: `dump` only parses; __DRBD_NODE__ stands in for `uname -n`.
        let out = Command::new(&drbdadm)
            .args([
                "-c".as_ref(),
                res.as_os_str(),
                "dump".as_ref(),
                "r0".as_ref(),
            ])
            .env("__DRBD_NODE__", "dock-prod")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}\n{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("address          ipv4 10.99.99.3:7788;"),
            "{stdout}"
        );
        assert!(stdout.contains("node-id 1;"), "{stdout}");

        // drbd-utils in its 8.4 mode (what drbdadm runs against the drbd 8.4 module of
        // Debian 12's kernel) parses it too: a two-host resource carries no `node-id`.
        let drbdadm84 = ["/usr/lib/drbd/drbdadm-84", "/lib/drbd/drbdadm-84"]
            .iter()
            .map(Path::new)
            .find(|p| p.exists());
        let Some(drbdadm84) = drbdadm84 else {
            eprintln!("SKIP: no drbdadm-84 in this drbd-utils");
            return;
        };
        let out = Command::new(drbdadm84)
            .args([
                "-c".as_ref(),
                res.as_os_str(),
                "dump".as_ref(),
                "r0".as_ref(),
            ])
            .env("__DRBD_NODE__", "dock-prod")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "drbdadm-84: {}\n{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("10.99.99.3:7788;"), "{stdout}");
    }

    #[test]
    fn promtool_accepts_a_config_using_the_file_sd_output() {
        let Some(promtool) = tool("promtool") else {
            eprintln!("SKIP: promtool not installed (Debian package prometheus)");
            return;
        };
        let (dir, mut engine, _rec) = setup();
        engine.apply(&view(1, &[("dock-load", 1), ("dock-mirror", 3)]), 100);
        let sd = dir.path().join("file_sd/meshd.json");
        let cfg = dir.path().join("prometheus.yml");
        fs::write(
            &cfg,
            format!(
                "scrape_configs:\n  - job_name: mesh\n    file_sd_configs:\n      - files: [\"{}\"]\n",
                sd.display()
            ),
        )
        .unwrap();
        let out = Command::new(&promtool)
            .arg("check")
            .arg("config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Run `body` on a thread in a mount namespace of its own (root only), where `dir` is
    /// read-only and `dir/hosts` is bind-mounted writable over it: what systemd's
    /// `ProtectSystem=strict` with `ReadWritePaths=/etc/hosts` makes of /etc. The namespace
    /// goes with the thread.
    fn in_read_only_dir_with_writable_hosts(dir: &Path, body: impl FnOnce() + Send + 'static) {
        use nix::mount::{mount, MsFlags};
        let dir = dir.to_path_buf();
        let handle = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare");
            let none = None::<&str>;
            mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).expect("private");
            let bind = |p: &Path, ro: bool| {
                mount(Some(p), p, none, MsFlags::MS_BIND, none).expect("bind");
                let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND;
                if ro {
                    flags |= MsFlags::MS_RDONLY;
                }
                mount(none, p, none, flags, none).expect("remount");
            };
            bind(&dir, true);
            bind(&dir.join("hosts"), false);
            body();
        });
        if let Err(panic) = handle.join() {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn writable_file_in_read_only_dir_is_written_in_place_and_others_fail_with_the_way_out() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: needs root (a mount namespace)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().to_path_buf();
        let long = "127.0.0.1\tlocalhost\n# BEGIN meshd\n10.99.99.2\tdock-prod\n# END meshd\n";
        fs::write(p.join("hosts"), long).unwrap();
        fs::write(p.join("other"), "old\n").unwrap();
        let q = p.clone();
        in_read_only_dir_with_writable_hosts(&p, move || {
            // The directory really is read-only here.
            let e = fs::write(q.join("probe"), "x").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
            // The hosts file: written in place, shorter content cut to length.
            write_atomic(&q.join("hosts"), b"127.0.0.1\tlocalhost\n").unwrap();
            assert_eq!(
                fs::read_to_string(q.join("hosts")).unwrap(),
                "127.0.0.1\tlocalhost\n"
            );
            write_atomic(&q.join("hosts"), long.as_bytes()).unwrap();
            assert_eq!(fs::read_to_string(q.join("hosts")).unwrap(), long);
            // Any other file there: refused, and the message says what to allow: the file
            // itself if it exists (it would be written in place), else its directory.
            for (name, allow) in [("other", q.join("other")), ("new", q.clone())] {
                let path = q.join(name);
                let e = write_atomic(&path, b"new\n").unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{name}: {e}");
                let m = write_error(&path, &e);
                assert!(
                    m.contains("Read-only file system")
                        && m.contains(&format!("ReadWritePaths={})", allow.display())),
                    "{m}"
                );
            }
            assert_eq!(fs::read_to_string(q.join("other")).unwrap(), "old\n");
        });
        // Outside the namespace nothing was left behind: no temp files, no "new".
        let mut names: Vec<String> = fs::read_dir(&p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["hosts", "other"]);
    }

    #[test]
    fn write_errors_other_than_read_only_carry_no_systemd_hint() {
        let e = io::Error::from_raw_os_error(libc::EACCES);
        let m = write_error(Path::new("/etc/x/y"), &e);
        assert!(m.starts_with("cannot write /etc/x/y: "), "{m}");
        assert!(!m.contains("ReadWritePaths"), "{m}");
    }
}
