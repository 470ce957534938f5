//! The lab: hosts made of namespaces, wired like the fleet (tests/README.md).
//!
//! Every host (and the switch holding the two bridges) is a long-lived *holder* process created
//! by `unshare --net --mount --uts`: inside, `/run` is a fresh tmpfs (so `/var/run/wireguard`,
//! `/run/meshd` are private), `/etc` and `/var/lib` are overlays whose writes land in the
//! host's state directory, and `/etc/meshd` and `/var/lib/meshd` are bind mounts of plain
//! directories under it. Commands enter a host with `nsenter -t HOLDER -n -m -u`. The network
//! namespaces are also registered as `mlab-<id>-<host>` so `ip netns list` shows them and
//! `meshlab cleanup` can find leftovers. Nothing is configured in the root namespace: veth
//! pairs are created from inside the switch namespace straight into the host's namespace.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::poll::{poll_until, POLL_INTERVAL};
use crate::procs::{self, ProcId};
use crate::state::{self, HostState, LabState, SpawnRecord};
use crate::topology::{self, Role};

/// How long a holder may take to set its namespaces up.
const HOLDER_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long every host may take to answer on the underlay after the wiring.
const UNDERLAY_TIMEOUT: Duration = Duration::from_secs(15);
/// SIGTERM grace before SIGKILL at teardown.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// The shell script a holder runs: private /run, overlays on /etc and /var/lib, bind-mounted
/// /etc/meshd and /var/lib/meshd, its own hostname, then it sleeps until killed.
/// `$1` = host name, `$2` = host state directory.
const HOLDER_SCRIPT: &str = r#"set -eu
h="$2"
mount --make-rprivate /
mount -t tmpfs -o mode=0755,size=64m meshlab-run /run
mkdir -p /run/wireguard /run/meshd /run/lock
mount -t overlay meshlab-etc -o "lowerdir=/etc,upperdir=$h/ovl/etc-upper,workdir=$h/ovl/etc-work" /etc
mount -t overlay meshlab-varlib -o "lowerdir=/var/lib,upperdir=$h/ovl/lib-upper,workdir=$h/ovl/lib-work" /var/lib
mkdir -p /etc/meshd /var/lib/meshd
mount --bind "$h/etc-meshd" /etc/meshd
mount --bind "$h/var-lib-meshd" /var/lib/meshd
hostname "$1"
ip link set lo up
: > "$h/ready"
exec sleep infinity
"#;

/// What to build.
#[derive(Debug, Clone)]
pub struct LabOpts {
    /// Hosts to create (names from [`topology::HOSTS`]); `None` = the whole fleet. The switch is
    /// always added, and the home router whenever a home host is present.
    pub hosts: Option<Vec<String>>,
    /// Where the lab is recorded (`$MESHLAB_STATE` or `/tmp/meshlab`).
    pub state_root: PathBuf,
    /// Where meshd, meshctl and meshd-wg are (see [`bin_dir`]).
    pub bin_dir: PathBuf,
    /// Leave everything running when the `Lab` is dropped (`meshlab up`).
    pub persistent: bool,
}

impl Default for LabOpts {
    fn default() -> Self {
        LabOpts {
            hosts: None,
            state_root: state::state_root(),
            bin_dir: bin_dir(),
            persistent: false,
        }
    }
}

impl LabOpts {
    /// A lab with only these hosts (plus switch, and router if needed).
    pub fn with_hosts(hosts: &[&str]) -> Self {
        LabOpts {
            hosts: Some(hosts.iter().map(|s| s.to_string()).collect()),
            ..LabOpts::default()
        }
    }
}

/// The directory holding meshd, meshctl and meshd-wg: `$MESHLAB_BIN_DIR`, else the directory of
/// the running executable (for test binaries in `target/<profile>/deps`, its parent).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MESHLAB_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name() == Some(OsStr::new("deps")) {
        if let Some(p) = dir.parent() {
            dir = p.to_path_buf();
        }
    }
    dir
}

/// A running lab. Dropping an owned lab tears it down (unless built `persistent`).
pub struct Lab {
    id: String,
    dir: PathBuf,
    bin_dir: PathBuf,
    state: Mutex<LabState>,
    children: Mutex<Vec<Child>>,
    holders: Mutex<Vec<Child>>,
    owned: bool,
    persistent: bool,
    torn_down: bool,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn random_id() -> Result<String> {
    use rand_core::RngCore;
    let mut b = [0u8; 2];
    rand_core::OsRng
        .try_fill_bytes(&mut b)
        .map_err(|e| anyhow!("no randomness for the lab id: {e}"))?;
    Ok(format!("{:02x}{:02x}", b[0], b[1]))
}

/// Turn a finished command into its stdout, or an error carrying its stderr.
/// Whether `meshctl status` got an answer from meshd: exit 0, 4 (not joined) or 5 (the last
/// pass had an error); 3 is "meshd could not be asked" (meshctl(8)).
pub fn status_answered(out: &Output) -> bool {
    matches!(out.status.code(), Some(0 | 4 | 5))
}

pub fn check_output(out: Output, what: &str) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            if out.stdout.is_empty() {
                String::new()
            } else {
                format!(" [stdout: {}]", String::from_utf8_lossy(&out.stdout).trim())
            }
        )
    }
}

fn run_root(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", argv[0]))?;
    check_output(out, &argv.join(" "))
}

impl Lab {
    /// Build the lab described by `opts`. On any error everything made so far is removed.
    pub fn build(opts: LabOpts) -> Result<Lab> {
        preflight()?;
        let names = resolve_hosts(opts.hosts.as_deref())?;
        std::fs::create_dir_all(&opts.state_root)
            .with_context(|| format!("creating {}", opts.state_root.display()))?;

        // A fresh id: the directory creation is the lock, and no netns may carry it already.
        let mut tries = 0;
        let (id, dir) = loop {
            tries += 1;
            let id = random_id()?;
            let dir = opts.state_root.join(&id);
            let taken_ns = state::our_netns_names()
                .iter()
                .any(|n| state::id_of_netns(n) == Some(id.as_str()));
            if !taken_ns && std::fs::DirBuilder::new().mode(0o700).create(&dir).is_ok() {
                break (id, dir);
            }
            if tries > 64 {
                bail!(
                    "could not find a free lab id under {}",
                    opts.state_root.display()
                );
            }
        };

        let st = LabState {
            id: id.clone(),
            dir: dir.clone(),
            bin_dir: opts.bin_dir.clone(),
            owner: ProcId::current()?,
            persistent: opts.persistent,
            hosts: BTreeMap::new(),
            spawned: Vec::new(),
        };
        st.save()?;
        let mut lab = Lab {
            id,
            dir,
            bin_dir: opts.bin_dir.clone(),
            state: Mutex::new(st),
            children: Mutex::new(Vec::new()),
            holders: Mutex::new(Vec::new()),
            owned: true,
            persistent: false, // until fully built: an error must clean up
            torn_down: false,
        };
        lab.start_holders(&names)?;
        lab.wire()?;
        lab.wait_underlay()?;
        lab.persistent = opts.persistent;
        Ok(lab)
    }

    /// Open a lab recorded on disk (by another process) without owning it: dropping it does
    /// nothing; call [`Lab::down`] to remove it.
    pub fn attach(state_root: &Path, id: &str) -> Result<Lab> {
        let dir = state_root.join(id);
        let st = LabState::load(&dir)
            .with_context(|| format!("no lab {id} under {}", state_root.display()))?;
        Ok(Lab {
            id: st.id.clone(),
            dir,
            bin_dir: st.bin_dir.clone(),
            state: Mutex::new(st),
            children: Mutex::new(Vec::new()),
            holders: Mutex::new(Vec::new()),
            owned: false,
            persistent: true,
            torn_down: false,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Print the last `lines` lines of each log of `hosts` (meshd, the engine, helpers): what
    /// a test shows before it fails on something slow, to say where the time went.
    pub fn print_logs(&self, hosts: &[&str], lines: usize) {
        dump_logs(&lock(&self.state), Some(hosts), lines);
    }

    /// The lab's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory holding meshd, meshctl, meshd-wg for this lab.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A host's state directory (its /etc/meshd is `etc-meshd/` in it, logs go here too).
    pub fn host_dir(&self, host: &str) -> PathBuf {
        self.dir.join(host)
    }

    /// Names of the lab's hosts (switch and router included).
    pub fn hosts(&self) -> Vec<String> {
        lock(&self.state).hosts.keys().cloned().collect()
    }

    pub fn has_host(&self, host: &str) -> bool {
        lock(&self.state).hosts.contains_key(host)
    }

    /// A copy of the lab's record.
    pub fn state(&self) -> LabState {
        lock(&self.state).clone()
    }

    fn host_state(&self, host: &str) -> Result<HostState> {
        lock(&self.state)
            .hosts
            .get(host)
            .cloned()
            .ok_or_else(|| anyhow!("lab {} has no host {host:?}", self.id))
    }

    /// The host's underlay address (the router: its WAN address).
    pub fn host_addr(&self, host: &str) -> Result<Ipv4Addr> {
        self.host_state(host)?
            .addr
            .ok_or_else(|| anyhow!("host {host} has no address"))
    }

    /// The host's planned mesh address.
    pub fn mesh_addr(&self, host: &str) -> Result<Ipv4Addr> {
        topology::mesh_addr(host).ok_or_else(|| anyhow!("host {host} has no mesh address"))
    }

    /// PID of the process holding the host's namespaces.
    pub fn holder_pid(&self, host: &str) -> Result<u32> {
        Ok(self.host_state(host)?.holder.pid)
    }

    /// `net:[N]` identity of the host's network namespace.
    pub fn net_ns(&self, host: &str) -> Result<String> {
        Ok(self.host_state(host)?.net_ns)
    }

    /// PATH inside hosts: the lab's binaries first.
    fn path_env(&self) -> std::ffi::OsString {
        let mut parts = vec![self.bin_dir.clone()];
        if let Some(p) = std::env::var_os("PATH") {
            parts.extend(std::env::split_paths(&p));
        } else {
            parts.extend(
                [
                    "/usr/local/sbin",
                    "/usr/local/bin",
                    "/usr/sbin",
                    "/usr/bin",
                    "/sbin",
                    "/bin",
                ]
                .map(PathBuf::from),
            );
        }
        std::env::join_paths(parts).unwrap_or_default()
    }

    /// A `Command` that runs `argv` inside `host` (network, mount and UTS namespaces), with
    /// the lab's binaries on PATH. Stdio is left to the caller.
    pub fn command<S: AsRef<OsStr>>(&self, host: &str, argv: &[S]) -> Result<Command> {
        if argv.is_empty() {
            bail!("empty command for host {host}");
        }
        let h = self.host_state(host)?;
        if !h.holder.is_alive() {
            bail!(
                "host {host} of lab {} is gone (holder {} exited): rebuild the lab",
                self.id,
                h.holder.pid
            );
        }
        // -r/-w: entering a mount namespace resets root and cwd to the namespace's own; take
        // the holder's instead, which differ when the lab runs chrooted (the VM lab).
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(h.holder.pid.to_string())
            .args(["-n", "-m", "-u", "-r", "-w", "--"])
            .args(argv)
            .env("PATH", self.path_env())
            .env("MESHLAB_LAB", &self.id)
            .env("MESHLAB_HOST", host);
        Ok(c)
    }

    /// Run `argv` in `host`, wait, and return its output (stdin is empty).
    pub fn exec<S: AsRef<OsStr>>(&self, host: &str, argv: &[S]) -> Result<Output> {
        let mut c = self.command(host, argv)?;
        c.stdin(Stdio::null());
        c.output()
            .with_context(|| format!("running nsenter for {host}"))
    }

    /// Like [`Lab::exec`], feeding `input` on stdin.
    pub fn exec_input<S: AsRef<OsStr>>(
        &self,
        host: &str,
        argv: &[S],
        input: &[u8],
    ) -> Result<Output> {
        let mut c = self.command(host, argv)?;
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .with_context(|| format!("running nsenter for {host}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input)?;
        }
        Ok(child.wait_with_output()?)
    }

    /// `meshctl status ARGS` in `host`: its stdout when meshd answered, whatever the host's
    /// state (exit 0, 4 not joined, 5 in error); an error when meshd could not be asked.
    pub fn status(&self, host: &str, args: &[&str]) -> Result<String> {
        let mut argv = vec!["meshctl", "status"];
        argv.extend_from_slice(args);
        let out = self.exec(host, &argv)?;
        if status_answered(&out) {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            check_output(out, &format!("[{host}] {}", argv.join(" ")))
        }
    }

    /// Run `argv` in `host`; its stdout if it succeeded, else an error with its stderr.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, host: &str, argv: &[S]) -> Result<String> {
        let what = format!(
            "[{host}] {}",
            argv.iter()
                .map(|a| a.as_ref().to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        check_output(self.exec(host, argv)?, &what)
    }

    /// Run a shell script in `host` (`sh -c SCRIPT`); stdout, or an error with stderr.
    pub fn sh(&self, host: &str, script: &str) -> Result<String> {
        check_output(
            self.exec(host, &["sh", "-c", script])?,
            &format!("[{host}] sh -c {script:?}"),
        )
    }

    /// True if one ping from `host` to `addr` is answered within a second.
    pub fn ping(&self, host: &str, addr: Ipv4Addr) -> Result<bool> {
        let out = self.exec(
            host,
            &["ping", "-n", "-q", "-c", "1", "-W", "1", &addr.to_string()],
        )?;
        Ok(out.status.success())
    }

    /// Start `argv` in `host` in the background, tracked: it is recorded in the lab's state
    /// and killed by PID at teardown. Output is appended to `log` (or discarded).
    pub fn spawn<S: AsRef<OsStr>>(
        &self,
        host: &str,
        argv: &[S],
        log: Option<&Path>,
    ) -> Result<ProcId> {
        self.spawn_env(host, argv, &[], log)
    }

    /// [`Lab::spawn`] with extra environment variables.
    pub fn spawn_env<S: AsRef<OsStr>>(
        &self,
        host: &str,
        argv: &[S],
        env: &[(&str, &str)],
        log: Option<&Path>,
    ) -> Result<ProcId> {
        let mut c = self.command(host, argv)?;
        c.stdin(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        match log {
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)
                    .with_context(|| format!("opening log {}", path.display()))?;
                c.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                c.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        // Own session: a Ctrl-C meant for the caller's terminal does not hit the daemons
        // (teardown stops them by PID), and `meshlab up` can leave them running.
        new_session(&mut c);
        let cmd: Vec<String> = argv
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        let child = c
            .spawn()
            .with_context(|| format!("starting {cmd:?} in {host}"))?;
        let pid = child.id();
        lock(&self.children).push(child);
        // nsenter execs the command in place (it only forks for a PID namespace), so the
        // child's PID is the command's PID.
        let proc =
            ProcId::of(pid).or_else(|_| -> Result<ProcId> { Ok(ProcId { pid, start_time: 0 }) })?;
        let mut st = lock(&self.state);
        st.spawned.push(SpawnRecord {
            host: host.to_owned(),
            proc,
            cmd,
        });
        st.save()?;
        Ok(proc)
    }

    /// Send `sig` to a process (only if that exact process still runs).
    pub fn signal(&self, p: ProcId, sig: i32) -> bool {
        p.signal(sig)
    }

    /// Wait until process `p` has exited. Returns its status when it is our child.
    pub fn wait_exit(&self, p: ProcId, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut children = lock(&self.children);
                if let Some(i) = children.iter().position(|c| c.id() == p.pid) {
                    if let Some(status) = children[i].try_wait()? {
                        children.retain(|c| c.id() != p.pid);
                        return Ok(Some(status));
                    }
                } else if !p.is_alive() {
                    return Ok(None);
                }
            }
            if Instant::now() >= deadline {
                bail!("process {} did not exit within {timeout:?}", p.pid);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// True if `p` still runs (reaping it if it is our child and has exited).
    pub fn is_running(&self, p: ProcId) -> bool {
        let mut children = lock(&self.children);
        if let Some(i) = children.iter().position(|c| c.id() == p.pid) {
            if let Ok(Some(_)) = children[i].try_wait() {
                children.retain(|c| c.id() != p.pid);
                return false;
            }
        }
        p.is_alive()
    }

    /// Processes currently living in `host`'s network namespace (the holder excluded).
    pub fn processes(&self, host: &str) -> Result<Vec<ProcId>> {
        let h = self.host_state(host)?;
        Ok(procs::procs_in_netns(&h.net_ns)
            .into_iter()
            .filter(|p| p.pid != h.holder.pid)
            .collect())
    }

    /// Write a file inside `host`. Paths under /etc/meshd and /var/lib/meshd go straight to
    /// the host's backing directories; anything else is written from inside the host.
    pub fn write_file(&self, host: &str, path: &str, contents: &[u8]) -> Result<()> {
        self.write_file_mode(host, path, contents, 0o644)
    }

    /// [`Lab::write_file`] with an explicit mode (e.g. 0o600 for keys).
    pub fn write_file_mode(
        &self,
        host: &str,
        path: &str,
        contents: &[u8],
        mode: u32,
    ) -> Result<()> {
        if let Some(backing) = self.backing_path(host, path)? {
            if let Some(parent) = backing.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let tmp = backing.with_extension("meshlab-tmp");
            {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .mode(mode)
                    .open(&tmp)
                    .with_context(|| format!("writing {}", tmp.display()))?;
                f.write_all(contents)?;
            }
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&tmp, &backing)?;
            return Ok(());
        }
        let script = format!(
            "umask 077; mkdir -p \"$(dirname \"$1\")\" && cat > \"$1\" && chmod {mode:o} \"$1\""
        );
        let out = self.exec_input(host, &["sh", "-c", &script, "sh", path], contents)?;
        check_output(out, &format!("[{host}] writing {path}"))?;
        Ok(())
    }

    /// Read a file as `host` sees it.
    pub fn read_file(&self, host: &str, path: &str) -> Result<String> {
        if let Some(backing) = self.backing_path(host, path)? {
            return std::fs::read_to_string(&backing)
                .with_context(|| format!("[{host}] reading {path}"));
        }
        self.exec_ok(host, &["cat", path])
    }

    fn backing_path(&self, host: &str, path: &str) -> Result<Option<PathBuf>> {
        self.host_state(host)?;
        for (prefix, dir) in [
            ("/etc/meshd/", "etc-meshd"),
            ("/var/lib/meshd/", "var-lib-meshd"),
        ] {
            if let Some(rest) = path.strip_prefix(prefix) {
                if rest.is_empty() || rest.split('/').any(|c| c == ".." || c.is_empty()) {
                    bail!("refusing path {path:?}");
                }
                return Ok(Some(self.host_dir(host).join(dir).join(rest)));
            }
        }
        Ok(None)
    }

    /// Keep everything running after this `Lab` is dropped (what `meshlab up` does);
    /// `meshlab down` or [`Lab::down`] removes it later.
    pub fn persist(&mut self) -> Result<()> {
        let mut st = lock(&self.state);
        st.persistent = true;
        st.save()?;
        self.persistent = true;
        Ok(())
    }

    /// Remove everything this lab made: its processes (by recorded PID and by membership in
    /// its namespaces), its holders, its registered namespaces, its state directory.
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let st = lock(&self.state).clone();
        let mut errors = teardown_state(&st);
        for mut c in lock(&self.children).drain(..) {
            let _ = c.try_wait();
        }
        for mut c in lock(&self.holders).drain(..) {
            let _ = c.wait();
        }
        if std::thread::panicking() || std::env::var_os("MESHLAB_KEEP_LOGS").is_some() {
            dump_logs(&st, None, DUMP_LINES);
        }
        if let Some(to) = std::env::var_os("MESHLAB_SAVE_DIR") {
            // A post-mortem copy of everything the lab wrote (configs, logs, state).
            match std::process::Command::new("cp")
                .arg("-a")
                .arg(&self.dir)
                .arg(&to)
                .status()
            {
                Ok(st) if st.success() => {
                    eprintln!("lab {} saved to {}", self.id, Path::new(&to).display())
                }
                other => errors.push(format!("saving the lab to {to:?}: {other:?}")),
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if self.dir.exists() {
                errors.push(format!("removing {}: {e}", self.dir.display()));
            }
        }
        if let Some(root) = self.dir.parent() {
            state::clear_current(root, &self.id);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("tearing down lab {}: {}", self.id, errors.join("; "))
        }
    }

    // ---------------------------------------------------------------- building

    fn start_holders(&mut self, names: &[&'static str]) -> Result<()> {
        let mut pending = Vec::new();
        for name in names {
            let def = topology::host(name).ok_or_else(|| anyhow!("unknown host {name}"))?;
            let hdir = self.host_dir(name);
            for sub in [
                "etc-meshd",
                "var-lib-meshd",
                "ovl/etc-upper",
                "ovl/etc-work",
                "ovl/lib-upper",
                "ovl/lib-work",
            ] {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(hdir.join(sub))?;
            }
            std::fs::set_permissions(
                hdir.join("etc-meshd"),
                std::fs::Permissions::from_mode(0o755),
            )?;
            let log = std::fs::File::create(hdir.join("holder.log"))?;
            let mut c = Command::new("unshare");
            c.args([
                "--net",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                HOLDER_SCRIPT,
            ])
            .arg(format!("meshlab-holder-{}", self.id))
            .arg(name)
            .arg(&hdir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
            new_session(&mut c);
            let child = c
                .spawn()
                .context("starting unshare (util-linux) for a lab host")?;
            let pid = child.id();
            let holder = ProcId::of(pid).unwrap_or(ProcId { pid, start_time: 0 });
            lock(&self.holders).push(child);
            // Record at once, so a failure from here on still finds this process.
            {
                let mut st = lock(&self.state);
                st.hosts.insert(
                    name.to_string(),
                    HostState {
                        role: def.role,
                        holder,
                        netns: state::netns_name(&self.id, name),
                        net_ns: String::new(),
                        mnt_ns: String::new(),
                        addr: def.addr,
                    },
                );
                st.save()?;
            }
            pending.push((name.to_string(), pid, hdir));
        }

        for (name, pid, hdir) in pending {
            let ready = hdir.join("ready");
            poll_until(
                HOLDER_READY_TIMEOUT,
                &format!("host {name} to set up its namespaces"),
                || {
                    if ready.exists() {
                        return Ok(true);
                    }
                    let mut holders = lock(&self.holders);
                    if let Some(c) = holders.iter_mut().find(|c| c.id() == pid) {
                        if let Some(status) = c.try_wait()? {
                            let log = std::fs::read_to_string(hdir.join("holder.log"))
                                .unwrap_or_default();
                            bail!("holder of {name} exited ({status}): {}", log.trim());
                        }
                    }
                    Ok(false)
                },
            )?;
            let net_ns =
                procs::ns_of(pid, "net").ok_or_else(|| anyhow!("no net ns for holder {pid}"))?;
            let mnt_ns =
                procs::ns_of(pid, "mnt").ok_or_else(|| anyhow!("no mnt ns for holder {pid}"))?;
            if Some(&net_ns) == procs::ns_of(std::process::id(), "net").as_ref() {
                bail!("holder of {name} shares the root network namespace: refusing to go on");
            }
            let netns = state::netns_name(&self.id, &name);
            // The real start time, now that the holder has exec'ed its way to `sleep`.
            let holder = ProcId::of(pid)?;
            {
                let mut st = lock(&self.state);
                if let Some(h) = st.hosts.get_mut(&name) {
                    h.net_ns = net_ns;
                    h.mnt_ns = mnt_ns;
                    h.holder = holder;
                }
                st.save()?;
            }
            run_root(&["ip", "netns", "attach", &netns, &pid.to_string()])?;
        }
        Ok(())
    }

    fn wire(&self) -> Result<()> {
        let hosts = self.state().hosts;
        let sw = topology::SWITCH;
        let mut batch = String::new();
        for br in [
            topology::BRIDGE_INTERNET,
            topology::BRIDGE_HOME,
            topology::BRIDGE_HOME2,
        ] {
            batch.push_str(&format!("link add {br} type bridge\nlink set {br} up\n"));
        }
        for (name, h) in &hosts {
            let pid = h.holder.pid;
            let def = topology::host(name).ok_or_else(|| anyhow!("unknown host {name}"))?;
            match h.role {
                Role::Switch => {}
                Role::Router | Role::Router2 => {
                    let (lan_port, lan_br) = if h.role == Role::Router {
                        ("h-router", topology::BRIDGE_HOME)
                    } else {
                        ("h2-router", topology::BRIDGE_HOME2)
                    };
                    batch.push_str(&format!(
                        "link add {p} type veth peer name {wan} netns {pid}\nlink set {p} master {br} up\n",
                        p = def.port,
                        wan = topology::ROUTER_WAN,
                        br = topology::BRIDGE_INTERNET,
                    ));
                    batch.push_str(&format!(
                        "link add {lan_port} type veth peer name {lan} netns {pid}\nlink set {lan_port} master {lan_br} up\n",
                        lan = topology::ROUTER_LAN,
                    ));
                }
                Role::Public | Role::Home | Role::Home2 => {
                    let br = match h.role {
                        Role::Public => topology::BRIDGE_INTERNET,
                        Role::Home2 => topology::BRIDGE_HOME2,
                        _ => topology::BRIDGE_HOME,
                    };
                    batch.push_str(&format!(
                        "link add {p} type veth peer name {eth} netns {pid}\nlink set {p} master {br} up\n",
                        p = def.port,
                        eth = topology::HOST_IFACE,
                    ));
                }
            }
        }
        check_output(
            self.exec_input(sw, &["ip", "-batch", "-"], batch.as_bytes())?,
            "[switch] ip -batch",
        )?;

        for (name, h) in &hosts {
            let mut b = String::new();
            match h.role {
                Role::Switch => continue,
                Role::Router | Role::Router2 => {
                    let (wan_addr, lan_addr) = if h.role == Role::Router {
                        (topology::ROUTER_WAN_ADDR, topology::ROUTER_LAN_ADDR)
                    } else {
                        (topology::ROUTER2_WAN_ADDR, topology::ROUTER2_LAN_ADDR)
                    };
                    b.push_str(&format!(
                        "addr add {wan_addr}/{} dev {wan}\nlink set {wan} up\naddr add {lan_addr}/{} dev {lan}\nlink set {lan} up\n",
                        topology::INTERNET_PREFIX,
                        topology::HOME_PREFIX,
                        wan = topology::ROUTER_WAN,
                        lan = topology::ROUTER_LAN,
                    ));
                }
                Role::Public | Role::Home | Role::Home2 => {
                    let addr = h
                        .addr
                        .ok_or_else(|| anyhow!("host {name} has no address"))?;
                    let prefix = if h.role == Role::Public {
                        topology::INTERNET_PREFIX
                    } else {
                        topology::HOME_PREFIX
                    };
                    b.push_str(&format!(
                        "addr add {addr}/{prefix} dev {eth}\nlink set {eth} up\n",
                        eth = topology::HOST_IFACE
                    ));
                    match h.role {
                        Role::Home => b.push_str(&format!(
                            "route add default via {}\n",
                            topology::ROUTER_LAN_ADDR
                        )),
                        Role::Home2 => b.push_str(&format!(
                            "route add default via {}\n",
                            topology::ROUTER2_LAN_ADDR
                        )),
                        _ => {}
                    }
                }
            }
            check_output(
                self.exec_input(name, &["ip", "-batch", "-"], b.as_bytes())?,
                &format!("[{name}] ip -batch"),
            )?;
            if h.role.is_router() {
                self.setup_router(name, h.role == Role::Router2)?;
            }
        }
        Ok(())
    }

    /// ip_forward in the router's namespace only, and a consumer router's NAT: masquerade
    /// LAN -> WAN, answers back in, nothing new from the WAN to the LAN. `symmetric`: every
    /// new flow gets a random port (`masquerade random`), so each destination sees its own
    /// mapping (an endpoint-dependent NAT); otherwise the LAN host's port is kept where free.
    fn setup_router(&self, router: &str, symmetric: bool) -> Result<()> {
        self.exec_ok(router, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        let masquerade = if symmetric {
            "masquerade random"
        } else {
            "masquerade"
        };
        let rules = format!(
            r#"table ip meshlab_nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{wan}" {masquerade}
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    iifname "{lan}" oifname "{wan}" accept
    iifname "{wan}" oifname "{lan}" ct state established,related accept
  }}
}}
"#,
            wan = topology::ROUTER_WAN,
            lan = topology::ROUTER_LAN,
        );
        check_output(
            self.exec_input(router, &["nft", "-f", "-"], rules.as_bytes())?,
            "[router] nft -f",
        )?;
        Ok(())
    }

    /// Wait until the underlay works: the router reaches every host (or, without a router,
    /// the first host reaches the others).
    fn wait_underlay(&self) -> Result<()> {
        let hosts = self.state().hosts;
        // Each router reaches the public hosts and its own LAN.
        let routers: Vec<(String, Role)> = hosts
            .iter()
            .filter(|(_, h)| h.role.is_router())
            .map(|(n, h)| (n.clone(), h.role))
            .collect();
        if !routers.is_empty() {
            let mut checks: Vec<(String, Ipv4Addr)> = Vec::new();
            for (router, role) in &routers {
                let lan = if *role == Role::Router {
                    Role::Home
                } else {
                    Role::Home2
                };
                checks.extend(
                    hosts
                        .values()
                        .filter(|h| h.role == Role::Public || h.role == lan)
                        .filter_map(|h| h.addr)
                        .map(|a| (router.clone(), a)),
                );
            }
            return self.wait_pings(&checks);
        }
        let mut it = hosts.iter().filter(|(_, h)| h.role == Role::Public);
        let Some((first, _)) = it.next() else {
            return Ok(());
        };
        let checks: Vec<(String, Ipv4Addr)> = it
            .filter_map(|(_, h)| h.addr)
            .map(|a| (first.clone(), a))
            .collect();
        self.wait_pings(&checks)
    }

    /// Wait until each (host, address) of `checks` pings on the underlay, all at once.
    fn wait_pings(&self, checks: &[(String, Ipv4Addr)]) -> Result<()> {
        std::thread::scope(|s| {
            let handles: Vec<_> = checks
                .iter()
                .map(|(from, t)| {
                    s.spawn(move || {
                        poll_until(
                            UNDERLAY_TIMEOUT,
                            &format!("{from} to reach {t} on the underlay"),
                            || self.ping(from, *t),
                        )
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| anyhow!("underlay check panicked"))??;
            }
            Ok(())
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.owned || self.persistent || self.torn_down {
            return;
        }
        if let Err(e) = self.teardown() {
            eprintln!("meshlab: {e:#}");
        }
    }
}

/// The tools the lab drives, and the Debian package that has each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("unshare", "util-linux"),
    ("nsenter", "util-linux"),
    ("ping", "iputils-ping"),
    ("wg", "wireguard-tools"),
    ("sysctl", "procps"),
];

/// Refuse to start without root or without the tools, naming what to install.
fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the lab creates namespaces and mounts: run it as root");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| {
            !std::env::split_paths(&path)
                .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
                .any(|d| d.join(tool).is_file())
        })
        .map(|(tool, pkg)| format!("{tool} (Debian package {pkg})"))
        .collect();
    if !missing.is_empty() {
        bail!("the lab needs {}: apt-get install them", missing.join(", "));
    }
    Ok(())
}

/// Put a child in its own session, away from the caller's terminal and process group.
fn new_session(c: &mut Command) {
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        c.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn resolve_hosts(wanted: Option<&[String]>) -> Result<Vec<&'static str>> {
    let Some(wanted) = wanted else {
        return Ok(topology::all_host_names());
    };
    let mut names = vec![topology::SWITCH];
    for w in wanted {
        let def = topology::host(w).ok_or_else(|| {
            anyhow!(
                "unknown lab host {w:?}; the lab has: {}",
                topology::all_host_names().join(", ")
            )
        })?;
        if let Some(router) = topology::router_of(def.role) {
            if !names.contains(&router) {
                names.push(router);
            }
        }
        if !names.contains(&def.name) {
            names.push(def.name);
        }
    }
    Ok(names)
}

/// The namespace identity is still the one we made: its holder lives, or our registered
/// name still pins the very same namespace (a freed namespace's number can be reused).
fn ns_still_ours(h: &HostState) -> bool {
    if h.net_ns.is_empty() {
        return false;
    }
    if h.holder.is_alive()
        && procs::ns_of(h.holder.pid, "net").as_deref() == Some(h.net_ns.as_str())
    {
        return true;
    }
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(Path::new("/run/netns").join(&h.netns)) {
        Ok(m) => h.net_ns == format!("net:[{}]", m.ino()),
        Err(_) => false,
    }
}

/// Remove what a recorded lab made. Returns the errors (teardown goes on past each one).
pub fn teardown_state(st: &LabState) -> Vec<String> {
    let mut errors = Vec::new();
    // 1. Everything we started first (meshd): a daemon that sees its engine die starts a new
    //    one, so engines are only collected once no daemon is left to restart them.
    let spawned: Vec<ProcId> = st
        .spawned
        .iter()
        .map(|s| s.proc)
        .filter(|p| p.is_alive())
        .collect();
    terminate_all(&spawned, TERM_GRACE, &mut errors);
    // 1b. Then everything still living in our namespaces (detached engines, wireguard-go).
    let holders: Vec<ProcId> = st.hosts.values().map(|h| h.holder).collect();
    let mut victims: Vec<ProcId> = Vec::new();
    for h in st.hosts.values() {
        if ns_still_ours(h) {
            for p in procs::procs_in_netns(&h.net_ns) {
                if !holders.contains(&p) && !victims.contains(&p) {
                    victims.push(p);
                }
            }
        }
    }
    terminate_all(&victims, TERM_GRACE, &mut errors);
    // 2. The holders (they only sleep).
    for h in &holders {
        h.signal(libc::SIGKILL);
    }
    terminate_all(&holders, Duration::from_secs(5), &mut errors);
    // 3. The registered names (this frees the namespaces, and with them veths and bridges).
    for h in st.hosts.values() {
        let path = Path::new("/run/netns").join(&h.netns);
        if path.exists() {
            // A concurrent `meshlab cleanup` may delete it between the check and the call.
            if let Err(e) = run_root(&["ip", "netns", "delete", &h.netns]) {
                if path.exists() {
                    errors.push(format!("{e:#}"));
                }
            }
        }
    }
    errors
}

fn terminate_all(procs: &[ProcId], grace: Duration, errors: &mut Vec<String>) {
    for p in procs {
        p.signal(libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && procs.iter().any(|p| p.is_alive()) {
        std::thread::sleep(POLL_INTERVAL);
    }
    for p in procs.iter().filter(|p| p.is_alive()) {
        if !p.terminate(Duration::ZERO) {
            errors.push(format!("process {} survived SIGKILL", p.pid));
        }
    }
}

/// How many lines of each log a panicking test prints.
const DUMP_LINES: usize = 40;

/// Print the last `lines` lines of every log of `hosts` (all hosts when `None`); called when
/// a test panics.
fn dump_logs(st: &LabState, hosts: Option<&[&str]>, lines: usize) {
    for host in st.hosts.keys() {
        if hosts.is_some_and(|h| !h.contains(&host.as_str())) {
            continue;
        }
        let Ok(dir) = std::fs::read_dir(st.dir.join(host)) else {
            continue;
        };
        for e in dir.flatten() {
            let p = e.path();
            if p.extension() != Some(OsStr::new("log")) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            if text.trim().is_empty() {
                continue;
            }
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            eprintln!(
                "----- lab {} {host}: {} (last {} lines)",
                st.id,
                p.display(),
                tail.len()
            );
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

/// What `meshlab cleanup` removes: labs recorded under `state_root` whose builder died without
/// a teardown (or all of them with `all`), and empty namespaces still registered under our
/// prefix that no record accounts for.
pub fn cleanup(state_root: &Path, all: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut skipped = Vec::new();
    let mut errors = Vec::new();
    let mut live_ids = Vec::new();
    for (id, st) in state::list_labs(state_root) {
        match st {
            Ok(st) if all || st.is_orphaned() => {
                errors.extend(teardown_state(&st));
                let _ = std::fs::remove_dir_all(&st.dir);
                state::clear_current(state_root, &id);
                removed.push(format!("lab {id}"));
            }
            Ok(_) => live_ids.push(id),
            Err(e) => {
                // A directory without a readable record: only ours if it is named like a lab
                // id, and then only its namespaces can be found (by name).
                if id.len() == 4 && id.chars().all(|c| c.is_ascii_hexdigit()) {
                    let dir = state_root.join(&id);
                    let _ = std::fs::remove_dir_all(&dir);
                    removed.push(format!("unreadable lab dir {} ({e:#})", dir.display()));
                }
            }
        }
    }
    // Registered names of ours that no record under this root accounts for. They may belong
    // to a run recorded under another state root, so only a name pinning an *empty* namespace
    // (its holder and everything else gone: a crashed run) is removed; nothing is killed.
    for name in state::our_netns_names() {
        let Some(id) = state::id_of_netns(&name) else {
            continue;
        };
        if live_ids.iter().any(|l| l == id) {
            continue;
        }
        let path = Path::new("/run/netns").join(&name);
        use std::os::unix::fs::MetadataExt;
        let Ok(m) = std::fs::metadata(&path) else {
            continue;
        };
        let ident = format!("net:[{}]", m.ino());
        let inside = procs::procs_in_netns(&ident);
        if !inside.is_empty() {
            let pids: Vec<String> = inside.iter().map(|p| p.pid.to_string()).collect();
            skipped.push(format!(
                "netns {name} has no record under {} but processes {} live in it: left alone",
                state_root.display(),
                pids.join(",")
            ));
            continue;
        }
        match run_root(&["ip", "netns", "delete", &name]) {
            Ok(_) => removed.push(format!("netns {name}")),
            // Its own lab, tearing down concurrently, deleted it first: nothing left to do.
            Err(_) if !path.exists() => {}
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    for s in &skipped {
        eprintln!("meshlab cleanup: {s}");
    }
    if errors.is_empty() {
        Ok(removed)
    } else {
        bail!(
            "cleanup removed [{}] but: {}",
            removed.join(", "),
            errors.join("; ")
        )
    }
}

/// Replace the current process by `argv` running inside `host` (for `meshlab exec`).
pub fn exec_replace(lab: &Lab, host: &str, argv: &[String]) -> anyhow::Error {
    match lab.command(host, argv) {
        Ok(mut c) => anyhow!(c.exec()).context("exec nsenter"),
        Err(e) => e,
    }
}

/// Labs of one test binary run one at a time (each forms a fleet; two at once would fight for
/// the 2 cores and blur the timings). Hold the guard for the test's whole lab.
pub fn one_lab_at_a_time() -> MutexGuard<'static, ()> {
    static ONE_LAB: Mutex<()> = Mutex::new(());
    lock(&ONE_LAB)
}

// ------------------------------------------------------- a host that dies and is replaced

impl Lab {
    /// Take `host` (a public or home host) away as a machine that dies: every process living
    /// in its network namespace is SIGKILLed (only while that namespace is still the one this
    /// lab made), then its holder; its registered namespace is deleted and its link to the
    /// switch removed (the kernel frees the emptied namespace once the killed processes'
    /// orphaned sockets have timed out). Its state directory is moved aside to
    /// `<host>.gone[-N]` in the lab directory (removed with the lab), so that
    /// [`Lab::replace_host`] starts from an empty one. Returns where the old state went.
    pub fn destroy_host(&self, host: &str) -> Result<PathBuf> {
        let h = self.host_state(host)?;
        if !matches!(h.role, Role::Public | Role::Home) {
            bail!(
                "only a public or home host can be destroyed, not {host} ({:?})",
                h.role
            );
        }
        let def = topology::host(host).ok_or_else(|| anyhow!("unknown host {host}"))?;
        if ns_still_ours(&h) {
            let victims: Vec<ProcId> = procs::procs_in_netns(&h.net_ns)
                .into_iter()
                .filter(|p| p.pid != h.holder.pid)
                .collect();
            for p in &victims {
                p.signal(libc::SIGKILL);
            }
            poll_until(
                Duration::from_secs(5),
                &format!("the processes of {host} to die"),
                || Ok(victims.iter().all(|p| !p.is_alive())),
            )?;
        }
        h.holder.signal(libc::SIGKILL);
        poll_until(
            Duration::from_secs(5),
            &format!("the holder of {host} to die"),
            || Ok(!h.holder.is_alive()),
        )?;
        // Reap what of ours has exited (the holder, the host's daemons).
        lock(&self.holders).retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        lock(&self.children).retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        let registered = Path::new("/run/netns").join(&h.netns);
        if registered.exists() {
            run_root(&["ip", "netns", "delete", &h.netns])?;
        }
        // The namespace is freed once nothing refers to it any more, which orphaned TCP
        // sockets of the killed processes may delay for minutes: take the link away now (the
        // switch's end goes, and with it the host's end), the host is unreachable from here on.
        let port = self.exec(topology::SWITCH, &["ip", "link", "show", def.port])?;
        if port.status.success() {
            self.exec_ok(topology::SWITCH, &["ip", "link", "del", def.port])?;
        }
        poll_until(
            Duration::from_secs(10),
            &format!("{host}'s link {} to leave the switch", def.port),
            || {
                Ok(!self
                    .exec(topology::SWITCH, &["ip", "link", "show", def.port])?
                    .status
                    .success())
            },
        )?;
        let mut gone = self.dir.join(format!("{host}.gone"));
        let mut n = 1;
        while gone.exists() {
            n += 1;
            gone = self.dir.join(format!("{host}.gone-{n}"));
        }
        std::fs::rename(self.host_dir(host), &gone)
            .with_context(|| format!("moving {host}'s state aside"))?;
        Ok(gone)
    }

    /// A new machine where `host` was (after [`Lab::destroy_host`]): a new holder with a fresh
    /// state directory (empty `/etc/meshd` and `/var/lib/meshd`), plugged into the same bridge
    /// through the same switch port, with the same underlay address (and, at home, the same
    /// default route). Waits until the underlay reaches it.
    pub fn replace_host(&mut self, host: &str) -> Result<()> {
        let def = topology::host(host).ok_or_else(|| anyhow!("unknown host {host}"))?;
        let old = self.host_state(host)?;
        if old.holder.is_alive() {
            bail!("{host} is still there: destroy_host it first");
        }
        if self.host_dir(host).exists() {
            bail!(
                "{} exists: destroy_host moves it aside",
                self.host_dir(host).display()
            );
        }
        let (bridge, prefix) = match def.role {
            Role::Public => (topology::BRIDGE_INTERNET, topology::INTERNET_PREFIX),
            Role::Home => (topology::BRIDGE_HOME, topology::HOME_PREFIX),
            other => bail!("only a public or home host can be replaced, not {host} ({other:?})"),
        };
        let addr = def
            .addr
            .ok_or_else(|| anyhow!("host {host} has no address"))?;
        self.start_holders(&[def.name])?;
        let pid = self.holder_pid(host)?;
        let eth = topology::HOST_IFACE;
        let switch = format!(
            "link add {p} type veth peer name {eth} netns {pid}\nlink set {p} master {bridge} up\n",
            p = def.port,
        );
        check_output(
            self.exec_input(topology::SWITCH, &["ip", "-batch", "-"], switch.as_bytes())?,
            "[switch] ip -batch",
        )?;
        // The new machine announces its address when its link comes up (a gratuitous ARP, as
        // many systems send): the neighbours' caches still hold the dead machine's MAC, and
        // without it each finds out only once its own probes of that MAC fail (a router
        // forwarding traffic to the old address was seen still probing after 15 s).
        self.exec_ok(
            host,
            &[
                "sysctl",
                "-q",
                "-w",
                &format!("net.ipv4.conf.{eth}.arp_notify=1"),
            ],
        )?;
        let mut b = format!("addr add {addr}/{prefix} dev {eth}\nlink set {eth} up\n");
        if def.role == Role::Home {
            b.push_str(&format!(
                "route add default via {}\n",
                topology::ROUTER_LAN_ADDR
            ));
        }
        check_output(
            self.exec_input(host, &["ip", "-batch", "-"], b.as_bytes())?,
            &format!("[{host}] ip -batch"),
        )?;
        // Reached from the router (when the lab has one) or from another public host.
        let hosts = self.state().hosts;
        let (from, to) = if hosts.contains_key(topology::ROUTER) {
            (topology::ROUTER.to_string(), addr)
        } else if let Some((other, h)) = hosts
            .iter()
            .find(|(n, h)| n.as_str() != host && h.role == Role::Public)
        {
            if def.role == Role::Public {
                (host.to_string(), h.addr.unwrap_or(addr))
            } else {
                (other.clone(), addr)
            }
        } else {
            return Ok(());
        };
        poll_until(
            UNDERLAY_TIMEOUT,
            &format!("{from} to reach {to} on the underlay"),
            || self.ping(&from, to),
        )
        .map_err(|e| {
            let show = |h: &str, argv: &[&str]| {
                self.exec_ok(h, argv)
                    .unwrap_or_else(|e| format!("{e:#}"))
                    .trim()
                    .to_owned()
            };
            e.context(format!(
                "[{host}] ip addr:\n{}\n[switch] bridge links:\n{}\n[{from}] ip neigh:\n{}",
                show(host, &["ip", "-br", "addr"]),
                show(topology::SWITCH, &["ip", "-br", "link"]),
                show(&from, &["ip", "neigh"]),
            ))
        })
    }
}
