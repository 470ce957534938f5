//! The VM lab: one command run inside Debian 12's own kernel under qemu (tests/README.md, "The VM
//! lab"), for what the host kernel cannot do here (its WireGuard module is not loaded).
//!
//! `tests/vm/prepare.sh` caches the kernel package, its modules and a small initramfs; qemu
//! boots it with TCG (KVM does not work on these machines) and no network device, the host's
//! root shared read-only over 9p. The initramfs' `init` mounts that root, gives it tmpfs on
//! `/run`, `/tmp`, `/var/tmp`, `/dev/shm`, loads the lab's modules (wireguard, veth, bridge,
//! nf_tables, …) and runs the job in a chroot of it, so the host's `ip`, `wg`, `nft` and the
//! workspace's freshly built binaries (read-only, at their host paths) all work in there; so
//! does the namespace lab itself (`meshlab up --no-daemons`, exec, ping through the NAT, down:
//! verified). The job's stdin is /dev/null, its stdout and stderr the console. The share is
//! mounted with `cache=loose`: files the host changes while the VM runs may look stale inside.
//!
//! ```no_run
//! use meshlab::vm::{run_in_vm, VmOpts};
//! # fn main() -> anyhow::Result<()> {
//! let cmd = ["sh", "-c", "ip link add wg0 type wireguard && wg show wg0"].map(String::from);
//! let run = run_in_vm(&cmd, &VmOpts::default())?;   // console streamed as it arrives
//! run.check()?;                                     // exit code 0, or why not
//! println!("booted in {:.1} s, {:.1} s in all", run.boot_secs.unwrap_or(0.0), run.total_secs);
//! # Ok(()) }
//! ```
//!
//! Two VMs can share an Ethernet segment ([`VmLink::pair`], [`run_pair_in_vm`]): each gets a
//! virtio NIC, `eth0` inside, whose frames qemu carries over a pair of Unix datagram sockets
//! in a host directory (`-netdev dgram`). The underlay addresses are configured inside the VMs
//! only; the host has no interface, address or route for that link.
//!
//! Safety: the VM has no network device, or only that link to another VM, so nothing it does
//! reaches the host's network; the host's root is read-only to it; qemu is killed by the PID
//! of the child we spawned (never by name) when the timeout passes, when the harness unwinds,
//! or when the spawning thread dies.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::poll::POLL_INTERVAL;
use crate::procs::ProcId;

/// Printed by `tests/vm/init` right before the job starts (boot time is measured up to it).
pub const MARK_START: &str = "MESHVM-START";
/// Printed by `tests/vm/init` with the job's exit code: `MESHVM-EXIT=<n>`.
pub const MARK_EXIT: &str = "MESHVM-EXIT=";
/// Printed by `tests/vm/init` when the VM could not get as far as running the job.
pub const MARK_ERROR: &str = "MESHVM-ERROR: ";

/// Host variables passed into the VM when set (besides `PATH`, which always is).
pub const PASSED_ENV: &[&str] = &[
    "RUST_LOG",
    "RUST_BACKTRACE",
    "MESHLAB_BIN_DIR",
    "MESHLAB_ENGINE",
    "MESHLAB_KEEP_LOGS",
];

/// How to run a command in the VM.
#[derive(Debug, Clone)]
pub struct VmOpts {
    /// Boot, job and power-off together; qemu is killed when it passes.
    pub timeout: Duration,
    /// Guest memory. 1024 MiB leaves room for a whole lab's namespaces, daemons and tmpfs
    /// state; it boots as fast as 256 MiB, and the host only backs the pages the guest touches.
    pub memory_mib: u32,
    /// Guest CPUs. TCG runs one host thread per vCPU (MTTCG), yet on these 2-core machines 2
    /// vCPUs were never faster: the smoke test took 5.6-7.9 s with 1 and 6.1-11.7 s with 2
    /// (boot 2.9-4.4 s against 3.3-6.3 s), the host being busy with another test or a build.
    pub cpus: u32,
    /// The job's whole environment besides `HOME=/root`, `TERM=dumb` and `WG_COLOR_MODE=never`
    /// (set first, so these may override them). Default: the host's `PATH` and those of [`PASSED_ENV`] that are set.
    pub env: Vec<(String, String)>,
    /// The job's working directory, a host path (the VM sees the host's tree read-only).
    /// Default: the current directory.
    pub cwd: PathBuf,
    /// Host directories under `/tmp`, `/var/tmp` or `/run` the job needs to read: those are
    /// fresh tmpfs in the VM, so the listed ones are bind-mounted back (read-only, same path).
    /// Everything else of the host is visible anyway.
    pub visible: Vec<PathBuf>,
    /// Print the console as it arrives (job output on stdout, qemu's own complaints on
    /// stderr, through the test harness' capture).
    pub echo: bool,
    /// Names this VM in echoed lines (`[label] ...`) and reports; empty: no prefix.
    pub label: String,
    /// Kernel modules to load besides the lab's own list (tests/vm/init), e.g. `drbd`, `loop`.
    /// A module that does not load is reported on the console, not fatal: the job decides.
    pub modules: Vec<String>,
    /// One end of a link to another VM ([`VmLink::pair`]): `eth0` in the VM, up, with the
    /// end's address, before the job starts.
    pub link: Option<VmLink>,
}

/// One end of an Ethernet link between two VMs: qemu's `-netdev dgram` over Unix datagram
/// sockets in a host directory (made by [`VmLink::pair`], removed with the last end). Each
/// qemu binds its own socket and sends to the other's; frames sent before the other VM is up
/// are dropped, as on a cable.
#[derive(Debug, Clone)]
pub struct VmLink {
    /// The socket this end's qemu binds.
    pub local: PathBuf,
    /// The other end's socket.
    pub remote: PathBuf,
    /// The NIC's MAC address.
    pub mac: String,
    /// `ADDR/PREFIX` configured on `eth0` inside the VM (never on the host).
    pub address: String,
    _dir: Arc<LinkDir>,
}

/// The host directory holding a link's sockets; removed when the last end is dropped.
#[derive(Debug)]
struct LinkDir(PathBuf);

impl Drop for LinkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl VmLink {
    /// The two ends of a new link, with the given addresses inside the VMs (`10.0.0.1/24`).
    pub fn pair(a_address: &str, b_address: &str) -> Result<(VmLink, VmLink)> {
        let dir = Arc::new(LinkDir(fresh_dir("meshvm-link")?));
        let sock = |n: &str| dir.0.join(format!("{n}.sock"));
        let end = |me: &str, other: &str, mac: &str, address: &str| VmLink {
            local: sock(me),
            remote: sock(other),
            mac: mac.to_string(),
            address: address.to_string(),
            _dir: dir.clone(),
        };
        Ok((
            end("a", "b", "52:54:00:6d:00:01", a_address),
            end("b", "a", "52:54:00:6d:00:02", b_address),
        ))
    }

    /// qemu's arguments for this end.
    fn qemu_args(&self) -> Result<Vec<String>> {
        let path = |p: &Path| {
            p.to_str()
                .filter(|s| !s.contains(','))
                .map(str::to_string)
                .ok_or_else(|| anyhow!("{} cannot be a qemu socket path", p.display()))
        };
        Ok(vec![
            "-netdev".into(),
            format!(
                "dgram,id=link0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                path(&self.local)?,
                path(&self.remote)?
            ),
            "-device".into(),
            format!("virtio-net-pci,netdev=link0,mac={}", self.mac),
        ])
    }
}

impl Default for VmOpts {
    fn default() -> Self {
        let mut env = vec![(
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_else(|_| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
            }),
        )];
        for name in PASSED_ENV {
            if let Ok(v) = std::env::var(name) {
                env.push((name.to_string(), v));
            }
        }
        VmOpts {
            timeout: Duration::from_secs(300),
            memory_mib: 1024,
            cpus: 1,
            env,
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            visible: Vec::new(),
            echo: true,
            label: String::new(),
            modules: Vec::new(),
            link: None,
        }
    }
}

impl VmOpts {
    /// Set (or replace) one variable of the job's environment.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_string(), value.to_string()));
        self
    }
}

/// What a VM run gave.
#[derive(Debug, Clone)]
pub struct VmRun {
    /// The job's exit code; `None` if it never reported one (timeout, crash, boot failure).
    pub exit_code: Option<i32>,
    /// Everything the VM printed, `\r` removed.
    pub console: String,
    /// The job's own output: the console between the start and exit markers.
    pub output: String,
    /// Seconds from spawning qemu until the job started (`None` if it never did).
    pub boot_secs: Option<f64>,
    /// Seconds from spawning qemu until it was gone.
    pub total_secs: f64,
    /// The timeout passed and qemu was killed.
    pub timed_out: bool,
    /// Why the VM could not run the job, as its init said (`MESHVM-ERROR: …`).
    pub vm_error: Option<String>,
    /// The qemu process this run spawned (gone by the time the run is returned).
    pub qemu: ProcId,
    /// The host directory that held the job script (removed by the time the run is returned).
    pub job_dir: PathBuf,
}

/// True (after saying so) when `MESHD_SKIP_VM=1` switches the VM tests off; by default they
/// run.
pub fn skip_requested(what: &str) -> bool {
    if std::env::var("MESHD_SKIP_VM").is_ok_and(|v| v == "1") {
        eprintln!("MESHD_SKIP_VM=1: skipping {what}");
        return true;
    }
    false
}

impl VmRun {
    /// What a VM test prints and checks of every run: the wall times, that the qemu process it
    /// spawned is gone, and the job's exit code ([`VmRun::check`]).
    pub fn report(&self, what: &str, opts: &VmOpts) -> Result<&VmRun> {
        let what = match opts.label.as_str() {
            "" => what.to_string(),
            l => format!("{what} [{l}]"),
        };
        println!(
            "{what}: boot {} s, boot plus job {:.1} s ({} MiB, {} CPUs, TCG)",
            self.boot_secs.map_or("-".into(), |b| format!("{b:.1}")),
            self.total_secs,
            opts.memory_mib,
            opts.cpus
        );
        assert!(
            !self.qemu.is_alive(),
            "qemu (pid {}) was left running",
            self.qemu.pid
        );
        self.check()
    }

    /// Ok if the job exited 0; otherwise an error saying what happened instead.
    pub fn check(&self) -> Result<&VmRun> {
        match (self.exit_code, &self.vm_error) {
            (Some(0), _) => Ok(self),
            (Some(n), _) => bail!("the command in the VM exited with {n}"),
            (None, Some(e)) => bail!("the VM could not run the command: {e}"),
            (None, None) if self.timed_out => bail!(
                "the VM did not finish within its timeout ({:.0} s; {})",
                self.total_secs,
                match self.boot_secs {
                    Some(b) => format!("the command started after {b:.1} s"),
                    None => "it never got to the command".into(),
                }
            ),
            (None, None) => bail!("qemu ended without the command's exit code (kernel panic?)"),
        }
    }
}

/// The cached kernel and initramfs (`tests/vm/prepare.sh`'s output).
#[derive(Debug, Clone)]
pub struct VmImage {
    pub kver: String,
    /// The package's compressed kernel.
    pub vmlinuz: PathBuf,
    /// What qemu boots: the uncompressed vmlinux (PVH entry, about 2.7 s faster to boot under
    /// TCG) when prepare.sh could extract it, else `vmlinuz`.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Holds `lib/modules/<kver>`: `modprobe -d MODROOT -S KVER`.
    pub modroot: PathBuf,
}

/// `tests/vm/prepare.sh` of this source tree.
pub fn prepare_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/prepare.sh")
}

static IMAGE: Mutex<Option<VmImage>> = Mutex::new(None);

/// Run `tests/vm/prepare.sh` (once per process) and return what it prepared. Downloads the
/// kernel package on first use (into `$MESHD_VM_CACHE`, default `/var/cache/meshd-vm`).
pub fn prepare() -> Result<VmImage> {
    let mut cached = IMAGE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(img) = cached.as_ref() {
        return Ok(img.clone());
    }
    let script = prepare_script();
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |key: &str| -> Result<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{} printed no {key}= line: {text}", script.display()))
    };
    let img = VmImage {
        kver: get("KVER")?,
        vmlinuz: get("VMLINUZ")?.into(),
        kernel: get("KERNEL")?.into(),
        initrd: get("INITRD")?.into(),
        modroot: get("MODROOT")?.into(),
    };
    *cached = Some(img.clone());
    Ok(img)
}

/// Quote for a POSIX shell: one word, nothing expanded.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The job script the VM's init runs (`/bin/sh run.sh` in the chroot, under `env -i`).
fn job_script(cmd: &[String], opts: &VmOpts) -> Result<String> {
    let mut s = String::from("# written by meshlab::vm for one VM run\n");
    for (k, v) in &opts.env {
        let valid = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            bail!("{k:?} is not a valid environment variable name");
        }
        s.push_str(&format!("export {k}={}\n", sh_quote(v)));
    }
    let cwd = opts
        .cwd
        .to_str()
        .ok_or_else(|| anyhow!("working directory {} is not UTF-8", opts.cwd.display()))?;
    s.push_str(&format!(
        "cd {} || {{ echo \"meshvm: cannot enter {cwd}\" >&2; exit 125; }}\n",
        sh_quote(cwd)
    ));
    if let Some(link) = &opts.link {
        s.push_str(&format!(
            "ip link set eth0 up && ip addr add {} dev eth0 || \
             {{ echo \"meshvm: cannot set up the link (eth0)\" >&2; exit 125; }}\n",
            sh_quote(&link.address)
        ));
    }
    let words: Vec<String> = cmd.iter().map(|w| sh_quote(w)).collect();
    s.push_str(&format!("exec {}\n", words.join(" ")));
    Ok(s)
}

/// A host directory holding the job script, visible to the VM through the share; removed
/// when dropped.
struct JobDir(PathBuf);

/// A new directory `PREFIX-PID-SEQ-NANOS` (0700) in the host's temp directory.
fn fresh_dir(prefix: &str) -> Result<PathBuf> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

impl JobDir {
    fn create() -> Result<JobDir> {
        Ok(JobDir(fresh_dir("meshvm")?))
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The qemu child; SIGKILLed (by its PID, which stays ours until we reap it) and reaped when
/// dropped, whatever path the harness leaves by.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

enum Event {
    /// A console line (from qemu's stdout, the guest's serial port), `\r` removed.
    Console(String),
    /// A line qemu itself printed on stderr.
    Qemu(String),
}

/// Send every line of `r` as `wrap(line)` until EOF.
fn forward<R: Read + Send + 'static>(
    r: R,
    tx: mpsc::Sender<Event>,
    wrap: fn(String) -> Event,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf)
                .replace('\r', "")
                .trim_end_matches('\n')
                .to_string();
            if tx.send(wrap(line)).is_err() {
                return;
            }
        }
    })
}

/// Host paths the VM hides (fresh tmpfs inside).
const HIDDEN_ROOTS: [&str; 4] = ["/tmp", "/var/tmp", "/run", "/dev/shm"];

/// `visible` plus what the job itself needs when it lives under a hidden root: its working
/// directory, the lab's binaries and this test executable (a checkout or a target directory
/// under /tmp, as CI may use). Each is shown from its top directory under the root
/// (`/tmp/fresh/tests` shows `/tmp/fresh`), so a checkout and its target come back together.
fn with_own_dirs(visible: &[PathBuf], cwd: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = visible.to_vec();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    let candidates = [
        Some(cwd.to_path_buf()),
        Some(crate::lab::bin_dir()),
        exe_dir,
    ];
    for dir in candidates.into_iter().flatten() {
        for root in HIDDEN_ROOTS {
            let Ok(rest) = dir.strip_prefix(root) else {
                continue;
            };
            let Some(first) = rest.components().next() else {
                continue;
            };
            let top = Path::new(root).join(first);
            if top.is_dir() && !out.iter().any(|v| top.starts_with(v)) {
                out.retain(|v| !v.starts_with(&top));
                out.push(top);
            }
        }
    }
    out
}

/// Boot the VM, run `cmd` (program and arguments; a host path or a name found on
/// `opts.env`'s `PATH` inside) and return its exit code and the console. Errors are the
/// harness' own (nothing to boot, qemu would not start); what happens inside the VM,
/// including a timeout, is in the [`VmRun`] (see [`VmRun::check`]).
pub fn run_in_vm(cmd: &[String], opts: &VmOpts) -> Result<VmRun> {
    if cmd.is_empty() {
        bail!("run_in_vm: no command");
    }
    let img = prepare()?;
    let job = JobDir::create()?;
    let script = job.0.join("run.sh");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&script)
            .with_context(|| format!("creating {}", script.display()))?;
        f.write_all(job_script(cmd, opts)?.as_bytes())
            .with_context(|| format!("writing {}", script.display()))?;
    }
    let visible = with_own_dirs(&opts.visible, &opts.cwd);
    if !visible.is_empty() {
        let mut list = String::new();
        for d in &visible {
            let s = d
                .to_str()
                .filter(|s| d.is_absolute() && !s.contains('\n'))
                .ok_or_else(|| {
                    anyhow!(
                        "cannot show {} in the VM: not an absolute UTF-8 path without newlines",
                        d.display()
                    )
                })?;
            if !d.is_dir() {
                bail!("cannot show {} in the VM: not a directory", d.display());
            }
            list.push_str(s);
            list.push('\n');
        }
        let path = job.0.join("visible");
        std::fs::write(&path, list).with_context(|| format!("writing {}", path.display()))?;
    }
    // Both paths travel on the kernel command line, which splits at whitespace.
    for p in [&job.0, &img.modroot] {
        let s = p.to_string_lossy();
        if s.chars().any(char::is_whitespace) || p.to_str().is_none() {
            bail!("{s:?} cannot be passed on the kernel command line (whitespace or not UTF-8)");
        }
    }
    let mut modules = opts.modules.clone();
    if opts.link.is_some() {
        modules.push("virtio_net".into());
    }
    if let Some(m) = modules.iter().find(|m| {
        m.is_empty()
            || !m
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }) {
        bail!("{m:?} is not a kernel module name");
    }
    let mut append = format!(
        "console=ttyS0 panic=-1 oops=panic quiet meshvm.job={} meshvm.modroot={}",
        job.0.display(),
        img.modroot.display()
    );
    if !modules.is_empty() {
        append.push_str(&format!(" meshvm.modules={}", modules.join(",")));
    }
    let link_args = match &opts.link {
        Some(l) => l.qemu_args()?,
        None => vec!["-nic".into(), "none".into()],
    };
    let prefix = match opts.label.as_str() {
        "" => String::new(),
        l => format!("[{l}] "),
    };

    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max"])
        .args([
            "-smp",
            &opts.cpus.to_string(),
            "-m",
            &opts.memory_mib.to_string(),
        ])
        // The serial console on stdio and nothing else: no monitor, no display, no network
        // (or only the link to the other VM).
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(&link_args)
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initrd)
        .args(["-append", &append])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of ours. It makes the
    // kernel SIGKILL qemu should the spawning thread die without running our Drop guard.
    unsafe {
        qemu.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = qemu
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let proc_id = ProcId::of(child.id()).unwrap_or(ProcId {
        pid: child.id(),
        start_time: 0,
    });
    let (tx, rx) = mpsc::channel();
    let readers = [
        child
            .stdout
            .take()
            .map(|o| forward(o, tx.clone(), Event::Console)),
        child
            .stderr
            .take()
            .map(|e| forward(e, tx.clone(), Event::Qemu)),
    ];
    drop(tx);
    let mut guard = Qemu(child);

    let deadline = started + opts.timeout;
    let mut run = VmRun {
        exit_code: None,
        console: String::new(),
        output: String::new(),
        boot_secs: None,
        total_secs: 0.0,
        timed_out: false,
        vm_error: None,
        qemu: proc_id,
        job_dir: job.0.clone(),
    };
    let mut in_job = false;
    let mut qemu_errors = Vec::new();
    // Until both pipes close (qemu is gone) or the deadline passes.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            run.timed_out = true;
            break;
        }
        match rx.recv_timeout(left.min(POLL_INTERVAL)) {
            Ok(Event::Console(line)) => {
                if opts.echo {
                    println!("{prefix}{line}");
                }
                if line == MARK_START && run.boot_secs.is_none() {
                    run.boot_secs = Some(started.elapsed().as_secs_f64());
                    in_job = true;
                } else if let Some(n) = line.strip_prefix(MARK_EXIT) {
                    run.exit_code = n.trim().parse().ok();
                    in_job = false;
                } else if let Some(e) = line.strip_prefix(MARK_ERROR) {
                    run.vm_error = Some(e.to_string());
                } else if in_job {
                    run.output.push_str(&line);
                    run.output.push('\n');
                }
                run.console.push_str(&line);
                run.console.push('\n');
            }
            Ok(Event::Qemu(line)) => {
                if opts.echo {
                    eprintln!("{prefix}qemu: {line}");
                }
                qemu_errors.push(line);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    // init prints an empty line before the exit marker, in case the job's output did not end
    // with a newline.
    if run.output.ends_with("\n\n") || run.output == "\n" {
        run.output.pop();
    }
    // The pipes are closed (or we give up): qemu exits by itself, or is killed at the deadline.
    let status = loop {
        if let Some(st) = guard.0.try_wait().context("waiting for qemu")? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            run.timed_out = true;
            break None;
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    drop(guard);
    for r in readers.into_iter().flatten() {
        let _ = r.join();
    }
    drop(job);
    run.total_secs = started.elapsed().as_secs_f64();
    if run.exit_code.is_none() && run.vm_error.is_none() {
        // panic=-1 and -no-reboot turn a panic (or an oops: oops=panic) into qemu's exit.
        run.vm_error = run
            .console
            .lines()
            .find(|l| l.contains("Kernel panic - not syncing"))
            .map(|l| l.trim().to_string());
    }
    if let Some(st) = status {
        if !st.success() && run.exit_code.is_none() && run.vm_error.is_none() {
            run.vm_error = Some(format!(
                "qemu-system-x86_64 exited with {st}: {}",
                qemu_errors.join("; ")
            ));
        }
    }
    Ok(run)
}

/// Boot two VMs at once (each on its own thread) and return both runs, `a`'s first. Give
/// them the two ends of a [`VmLink::pair`] to join them.
pub fn run_pair_in_vm(a: (&[String], &VmOpts), b: (&[String], &VmOpts)) -> Result<(VmRun, VmRun)> {
    std::thread::scope(|s| {
        let ta = s.spawn(|| run_in_vm(a.0, a.1));
        let tb = s.spawn(|| run_in_vm(b.0, b.1));
        let ra = ta
            .join()
            .map_err(|_| anyhow!("the thread of VM a panicked"));
        let rb = tb
            .join()
            .map_err(|_| anyhow!("the thread of VM b panicked"));
        Ok((ra??, rb??))
    })
}

/// The newest test executable `name-<hash>` in `target/<profile>/deps` (cargo builds every
/// test binary before it runs any).
pub fn test_binary(name: &str) -> Result<PathBuf> {
    let deps = crate::lab::bin_dir().join("deps");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&deps)
        .with_context(|| format!("listing {}", deps.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(&format!("{name}-")))
                .is_some_and(|hash| hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| {
        anyhow!(
            "no test binary {name}-* in {}: build the tests first (cargo test --workspace --no-run)",
            deps.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_script_quotes_everything() -> Result<()> {
        let opts = VmOpts {
            env: vec![("A_1".into(), "it's $HOME".into())],
            cwd: PathBuf::from("/work/my dir"),
            ..VmOpts::default()
        };
        let s = job_script(&["echo".into(), "a b".into(), "'".into()], &opts)?;
        assert!(s.contains("export A_1='it'\\''s $HOME'\n"), "{s}");
        assert!(s.contains("cd '/work/my dir' ||"), "{s}");
        assert!(s.ends_with("exec 'echo' 'a b' ''\\'''\n"), "{s}");
        assert!(job_script(&["true".into()], &VmOpts::default().env("1X", "")).is_err());
        assert!(job_script(&["true".into()], &VmOpts::default().env("A-B", "")).is_err());
        Ok(())
    }

    #[test]
    fn a_link_pair_points_each_end_at_the_other() -> Result<()> {
        let (a, b) = VmLink::pair("10.0.0.1/24", "10.0.0.2/24")?;
        let dir = a.local.parent().map(Path::to_path_buf).unwrap_or_default();
        assert!(dir.is_dir());
        assert_eq!((&a.local, &a.remote), (&b.remote, &b.local));
        assert_ne!(a.mac, b.mac);
        let args = a.qemu_args()?.join(" ");
        assert!(
            args.contains(&format!(
                "local.path={},remote.type=unix,remote.path={}",
                a.local.display(),
                b.local.display()
            )),
            "{args}"
        );
        assert!(args.contains(&format!("mac={}", a.mac)), "{args}");
        let opts = VmOpts {
            link: Some(a),
            ..VmOpts::default()
        };
        let s = job_script(&["true".into()], &opts)?;
        assert!(
            s.contains("ip link set eth0 up && ip addr add '10.0.0.1/24' dev eth0 ||"),
            "{s}"
        );
        drop((opts, b));
        assert!(!dir.exists(), "the link's directory outlived both ends");
        Ok(())
    }
}
