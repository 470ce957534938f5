//! The `meshd-wg` command line: create the interface, serve the UAPI until the interface is
//! deleted or a signal arrives. Without `-f` it detaches once the interface is up (like
//! wireguard-go), so `WG_QUICK_USERSPACE_IMPLEMENTATION=meshd-wg wg-quick up CONF` works.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::device::{Device, EngineOptions};
use crate::uapi::UapiServer;

/// What `meshd-wg --help` says after the options: the environment it reads.
const ENVIRONMENT_HELP: &str = "Environment:
  LOG_LEVEL=error|info|debug|trace  log level (default error; logs go to stderr)
  MESHD_WG_LOG=FILTER               a tracing filter (meshd_engine=debug); overrides LOG_LEVEL
  MESHD_WG_LOG_FILE=PATH            when detaching, append logs here instead of discarding them
  MESHD_WG_MTU=N                    initial MTU (default 1420)
  MESHD_WG_OFFLOAD=0                do not use TUN offloads (TSO/GSO on read, GRO on write)
  MESHD_WG_UDP_OFFLOAD=0            do not use UDP offloads (UDP_SEGMENT sends, UDP_GRO receives)";

/// The `meshd-wg` command line, used like wireguard-go's: `meshd-wg [-f] INTERFACE-NAME`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Parser)]
#[command(
    name = "meshd-wg",
    version,
    about = "meshd's userspace WireGuard engine",
    long_about = "meshd's userspace WireGuard engine. Creates the TUN interface INTERFACE-NAME \
                  and serves the WireGuard configuration protocol on \
                  /var/run/wireguard/INTERFACE-NAME.sock until the interface is deleted or the \
                  process is signalled. Configure it with wg(8) or wg-quick(8).",
    after_help = ENVIRONMENT_HELP
)]
pub struct Args {
    /// Stay in the foreground and log to standard error (without it, meshd-wg detaches once
    /// the interface is up, like wireguard-go).
    #[arg(short, long)]
    pub foreground: bool,
    /// The TUN interface to create (1 to 15 characters, no '/').
    #[arg(value_name = "INTERFACE-NAME")]
    pub interface: String,
}

/// The file descriptor through which a detached child reports readiness to its parent.
const READY_FD_ENV: &str = "MESHD_WG_READY_FD";

/// `meshd-wg`'s clap command (for its man page and completions).
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

pub fn main() -> ExitCode {
    // Usage errors exit 2, --help and --version 0 (clap's conventions, as meshd's and meshctl's).
    let args = <Args as clap::Parser>::parse();
    init_logging();
    let result = if args.foreground || std::env::var_os(READY_FD_ENV).is_some() {
        run(&args.interface)
    } else {
        detach(&args.interface)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd-wg: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let level = match std::env::var("LOG_LEVEL").as_deref() {
        Ok("debug") | Ok("verbose") => "debug",
        Ok("info") => "info",
        Ok("trace") => "trace",
        _ => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHD_WG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only on a terminal: logs usually go to a file (and are grepped).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

fn options() -> EngineOptions {
    let mut o = EngineOptions::default();
    if let Some(mtu) = std::env::var("MESHD_WG_MTU")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        o.mtu = mtu;
    }
    if std::env::var("MESHD_WG_OFFLOAD").as_deref() == Ok("0") {
        o.offload = false;
    }
    if std::env::var("MESHD_WG_UDP_OFFLOAD").as_deref() == Ok("0") {
        o.udp_offload = false;
    }
    o
}

/// Run the engine in this process until the interface is deleted or a signal arrives.
pub fn run(iface: &str) -> anyhow::Result<()> {
    if iface.is_empty() || iface.len() > 15 || iface.contains('/') {
        bail!("invalid interface name {iface:?} (1 to 15 characters, no '/')");
    }
    // Signals are blocked before any thread starts, so every thread inherits the mask and
    // only the wait below receives them.
    let mut mask = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::SIGTERM,
        nix::sys::signal::SIGINT,
        nix::sys::signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask.thread_block().context("blocking signals")?;
    // Refuse before touching anything if another engine serves this interface.
    let server = UapiServer::bind(iface)?;
    let device = Device::create(iface, &options())?;
    tracing::info!(
        interface = iface,
        ifindex = device.ifindex(),
        offload = device.offload(),
        "engine up"
    );
    let _threads = device.start().context("starting engine threads")?;
    let server = Arc::new(server);
    {
        let (d, s) = (Arc::clone(&device), Arc::clone(&server));
        std::thread::Builder::new()
            .name("uapi-accept".into())
            .spawn(move || s.serve(d))?;
    }
    report_ready();
    // Wait for a signal, or for the device to stop by itself (interface deleted).
    let d = Arc::clone(&device);
    std::thread::Builder::new()
        .name("watch".into())
        .spawn(move || {
            while !d.is_stopping() {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            // Wake the signal wait below.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGTERM);
        })?;
    let sig = mask.wait().context("waiting for signals")?;
    tracing::info!(signal = ?sig, "stopping");
    device.stop();
    // The acceptor thread holds a reference too, so remove the socket file explicitly.
    let _ = std::fs::remove_file(server.path());
    server.wake();
    // The TUN interface goes away with our file descriptor when the process exits.
    std::process::exit(0)
}

fn report_ready() {
    if let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        // SAFETY: the parent passed us this descriptor for exactly this use; we own it now.
        let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let _ = f.write_all(b"1");
    }
}

/// Start a detached copy of ourselves and wait until it reports the interface up.
fn detach(iface: &str) -> anyhow::Result<()> {
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    let exe = std::env::current_exe().context("finding our own executable")?;
    let log = match std::env::var_os("MESHD_WG_LOG_FILE") {
        Some(p) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("opening {}", p.to_string_lossy()))?,
        ),
        None => Stdio::null(),
    };
    let write_raw = std::os::fd::AsRawFd::as_raw_fd(&write_end);
    let mut cmd = Command::new(exe);
    cmd.arg("--foreground")
        .arg(iface)
        .env(READY_FD_ENV, write_raw.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: only async-signal-safe calls (setsid, fcntl) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // Keep the ready pipe open across exec.
            let flags = libc::fcntl(write_raw, libc::F_GETFD);
            libc::fcntl(write_raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the engine process")?;
    drop(write_end);
    let mut answer = Vec::new();
    let _ = std::fs::File::from(read_end).read_to_end(&mut answer);
    if answer == b"1" {
        return Ok(());
    }
    let status = child.wait().context("waiting for the engine process")?;
    bail!(
        "the engine process exited before the interface came up ({status}); run with -f to see why"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn command_line_as_wireguard_go() {
        for (argv, foreground) in [
            (&["meshd-wg", "wg9"][..], false),
            (&["meshd-wg", "-f", "wg9"], true),
            (&["meshd-wg", "--foreground", "wg9"], true),
            (&["meshd-wg", "wg9", "-f"], true),
        ] {
            let a = Args::try_parse_from(argv).expect("parses");
            assert_eq!(
                a,
                Args {
                    foreground,
                    interface: "wg9".into()
                },
                "{argv:?}"
            );
        }
        for argv in [
            &["meshd-wg"][..],
            &["meshd-wg", "a", "b"],
            &["meshd-wg", "--bogus", "a"],
        ] {
            let e = Args::try_parse_from(argv).expect_err("usage error");
            assert_eq!(e.exit_code(), 2, "{argv:?}");
        }
        for (flag, kind) in [
            ("-V", clap::error::ErrorKind::DisplayVersion),
            ("--version", clap::error::ErrorKind::DisplayVersion),
            ("-h", clap::error::ErrorKind::DisplayHelp),
        ] {
            let e = Args::try_parse_from(["meshd-wg", flag]).expect_err("exits");
            assert_eq!((e.kind(), e.exit_code()), (kind, 0), "{flag}");
        }
    }
}
