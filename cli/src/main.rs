//! meshctl: the operator CLI. Parse, send one request over the control socket, render.

mod bugreport;
mod ping;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use mesh_proto::doctor::Report;
use mesh_proto::render::{
    render_hosts, render_invite, render_invites, render_peers_table, render_routes, render_status,
};
use mesh_proto::routes::RouteDecision;
use mesh_proto::wire::api::InviteRequest;
use mesh_proto::wire::control::{Done, Request, Response};
use mesh_proto::PublicKey;

#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about = "Operator CLI for meshd")]
struct Cli {
    /// meshd's control socket.
    #[arg(long, global = true, env = "MESHCTL_SOCKET", default_value = mesh_proto::DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List the mesh peers with live handshake and traffic data.
    Peers {
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the daemon's status.
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the configuration file (like SIGHUP).
    Reload {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Join a mesh with an invitation token (from `meshctl invite` on the coordinator). The
    /// token is read from stdin (`meshctl join -`, or `meshctl join` with stdin not a
    /// terminal) or from a file (`--token-file F`: mode 0600, owned by root; removed after a
    /// successful join), never from the command line, where any local user can read it.
    Join {
        /// `-`: read the token from stdin.
        #[arg(conflicts_with = "token_file", value_name = "-")]
        token: Option<String>,
        /// Read the token from this file (mode 0600, owned by root); removed after the join.
        #[arg(long, alias = "file", value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Rotate this host's WireGuard key now, through the coordinator (peers switch with it);
    /// with NAME (on the coordinator or an admin host), ask that host to rotate its key.
    Rotate {
        /// The host to ask (default: this host, at once).
        name: Option<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print a static peer's current wg-quick configuration (after rotations, to install on
    /// the device; its private key stays a placeholder).
    StaticConfig {
        /// The static peer's name.
        name: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Invite a host: prints its one-line token (or, with --static, a wg-quick config).
    Invite {
        /// The new host's name.
        name: String,
        /// Its mesh address (default: the lowest free one).
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
        /// How long the token stays valid: 24h, 1h30m, 90s, 7d, 1w (default 24h).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<u64>,
        /// The host may run admin commands (invite, remove, ...).
        #[arg(long)]
        admin: bool,
        /// A device that cannot run meshd: print a complete wg-quick config for it.
        #[arg(long = "static")]
        static_peer: bool,
        /// With --static: the device's own public key (otherwise a key pair is generated).
        #[arg(long, requires = "static_peer")]
        public_key: Option<PublicKey>,
        /// With --static: where the device listens, ADDR:PORT (its LAN address and WireGuard
        /// listen port when it sits on a home LAN). Hosts behind the same NAT as --near use it;
        /// if it is publicly routable, every host does.
        #[arg(long, requires = "static_peer", value_name = "ADDR:PORT")]
        endpoint: Option<std::net::SocketAddr>,
        /// With --static: a registered host behind the same NAT (on the same LAN) as the
        /// device. Hosts behind that NAT reach the device at --endpoint, and its wg-quick config
        /// lists them at their LAN addresses; other hosts learn its address from its
        /// keepalives.
        #[arg(long, requires = "static_peer", value_name = "HOST")]
        near: Option<String>,
        /// Print JSON for scripts (name, address, token or wg_quick_config, expires_unix).
        #[arg(long)]
        json: bool,
    },
    /// List pending invitations, or revoke one (`invites revoke NAME`).
    Invites {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<InvitesCmd>,
    },
    /// Revoke a pending invitation.
    Revoke {
        name: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List the hosts of the mesh (coordinator registry).
    Hosts {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Remove a host from the mesh: out of every netmap, its key refused from then on.
    Remove {
        name: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// The prefixes hosts advertise (routes.advertise) and their state: pending until an admin
    /// approves them; only approved ones reach the netmaps, and each host takes only those
    /// its routes.accept opts in to. Without an action: list them.
    Routes {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<RoutesCmd>,
    },
    /// Ping a peer through the mesh (ICMP echo on the mesh interface): which path and
    /// endpoint WireGuard uses for it, and the round-trip time. Exits 1 when nothing answers.
    Ping {
        /// The peer's name (as `meshctl peers` shows it) or mesh address.
        peer: String,
        /// How many echo requests, one second apart.
        #[arg(short, long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=3600))]
        count: u16,
    },
    /// Write one archive for a bug report: status, peers, doctor, versions, the
    /// configuration, the state, the network and meshd's journal, with this host's private
    /// keys, join token and every invitation token removed.
    Bugreport {
        /// The archive to write (default: meshd-bugreport-UNIXTIME.tar.gz here); never
        /// overwritten.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// meshd's configuration (where the key and token files are).
        #[arg(long, env = "MESHD_CONFIG", default_value = mesh_proto::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Check this host: listen port, interface and address, routes, rp_filter, K3s,
    /// coordinator, handshakes and the path MTU to every peer. One line per check (OK, WARN,
    /// FAIL) with the fix; exits 1 if any check fails. Runs `meshd --doctor` when meshd is not
    /// running.
    Doctor {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        /// meshd's configuration, for the offline checks (`meshd --doctor --config PATH`).
        #[arg(long, env = "MESHD_CONFIG", default_value = mesh_proto::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Remove everything meshd owns on this host (the interface, its routes, its nftables
    /// table and forwarding settings) and stop meshd. Stopping meshd alone leaves all of it up.
    /// With meshd not running, runs `meshd --down` instead; nothing left to remove is no
    /// error. A down lasts until meshd starts again: `meshctl up`, or the next boot.
    Down {
        /// meshd's configuration (for `meshd --down` when meshd is not running).
        #[arg(long, env = "MESHD_CONFIG", default_value = mesh_proto::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Undo `meshctl down`: start meshd again (`systemctl start meshd`) and wait until it
    /// answers. Nothing to do when it runs.
    Up,
    /// Print the completion script for SHELL (no daemon needed): e.g. `source <(meshctl
    /// completion bash)`, or save it where the shell looks for completions. The package
    /// installs the same scripts.
    Completion {
        /// bash, zsh or fish.
        #[arg(value_enum)]
        shell: meshd_docgen::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum RoutesCmd {
    /// List every host's advertised prefixes with their state (the default).
    List,
    /// Approve PREFIX of host NAME: it goes into the netmaps while NAME advertises it.
    Approve {
        name: String,
        /// The prefix as the host advertises it (a bare address means /32 or /128).
        #[arg(value_parser = parse_prefix)]
        prefix: ipnet::IpNet,
    },
    /// Revoke (or refuse) PREFIX of host NAME: it leaves the netmaps until approved again.
    Revoke {
        name: String,
        /// The prefix as the host advertises it (a bare address means /32 or /128).
        #[arg(value_parser = parse_prefix)]
        prefix: ipnet::IpNet,
    },
}

#[derive(Debug, Subcommand)]
enum InvitesCmd {
    /// Revoke a pending invitation.
    Revoke { name: String },
}

/// Why a command-line value is refused (clap prints it with the argument's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum ArgError {
    #[error("{text:?} is not a duration like 24h, 1h30m, 90s, 7d or 1w ({why})")]
    NotDuration { text: String, why: String },
    #[error("{0:?} is not a whole number of seconds")]
    NotWholeSeconds(String),
    #[error("the duration must be positive")]
    ZeroDuration,
    #[error("{0:?} is too long")]
    DurationTooLong(String),
    #[error("{0:?} is not a prefix (e.g. 192.168.1.20/32)")]
    NotPrefix(String),
    #[error("{0:?} is neither a prefix nor an address (e.g. 192.168.1.20/32)")]
    NotPrefixOrAddress(String),
}

/// A duration as humantime reads it (`24h`, `1h30m`, `90s`, `7d`, `1w`), or plain seconds;
/// whole seconds, above zero.
fn parse_duration(s: &str) -> Result<u64, ArgError> {
    let s = s.trim();
    let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs = s
            .parse::<u64>()
            .map_err(|_| ArgError::DurationTooLong(s.to_string()))?;
        std::time::Duration::from_secs(secs)
    } else {
        humantime::parse_duration(s).map_err(|e| ArgError::NotDuration {
            text: s.to_string(),
            why: e.to_string(),
        })?
    };
    if d.subsec_nanos() != 0 {
        return Err(ArgError::NotWholeSeconds(s.to_string()));
    }
    match d.as_secs() {
        0 => Err(ArgError::ZeroDuration),
        v => Ok(v),
    }
}

/// Why the control socket cannot be reached, in the operator's terms: permission (meshctl
/// needs root, or the socket's group), no socket (meshd not running), refused (meshd gone).
fn unreachable_reason(socket: &Path, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "meshctl needs root: {} is meshd's control socket, for root (and its group) only; \
             run it with sudo",
            socket.display()
        ),
        std::io::ErrorKind::NotFound => format!(
            "meshd is not running: there is no control socket at {} (systemctl status meshd)",
            socket.display()
        ),
        _ => format!(
            "cannot reach meshd at {}: {e}; is meshd running? (systemctl status meshd)",
            socket.display()
        ),
    }
}

/// `meshctl down` with meshd not running: `meshd --down` does it (and says "nothing to
/// remove" when nothing is left, which is success too).
fn down_offline(config: &Path, json: bool) -> Result<Exit> {
    let meshd = meshd_command();
    let mut cmd = std::process::Command::new(&meshd);
    cmd.arg("--down").arg("--config").arg(config);
    if json {
        cmd.arg("--json");
    }
    let st = cmd
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| {
            NoAnswer(format!(
                "meshd is not running, and `{} --down` could not be run: {e}",
                meshd.display()
            ))
        })?;
    Ok(if st.success() { Exit::Ok } else { Exit::Failed })
}

/// `meshctl up`: start meshd through systemd and wait until its control socket answers.
fn up(socket: &Path) -> Result<Exit> {
    if daemon_up(socket)? {
        out("meshd is running; nothing to do\n")?;
        return Ok(Exit::Ok);
    }
    if !Path::new("/run/systemd/system").is_dir() {
        bail!(
            "meshd is not running and this system is not run by systemd: start meshd yourself \
             (meshd --config /etc/meshd/meshd.toml)"
        );
    }
    let st = std::process::Command::new("systemctl")
        .args(["start", "--no-block", "meshd"])
        .stdin(std::process::Stdio::null())
        .status()
        .context("cannot run systemctl")?;
    if !st.success() {
        bail!("systemctl start meshd failed ({st}); systemctl status meshd says why");
    }
    let progress = Progress::start("starting meshd: waiting for its control socket");
    let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
    while std::time::Instant::now() < deadline {
        if daemon_up(socket)? {
            drop(progress);
            out("meshd started; the mesh comes up as it reconciles (meshctl status)\n")?;
            return Ok(Exit::Ok);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(NoAnswer(format!(
        "meshd did not answer within {} s of systemctl start meshd; systemctl status meshd, \
         journalctl -u meshd",
        REPLY_TIMEOUT.as_secs()
    ))
    .into())
}

/// How long meshctl waits for meshd's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why no answer came: a timeout says what goes on in meshd meanwhile (a rotation waits for
/// hosts that are offline), rather than the socket's EAGAIN.
fn no_reply_reason(req: &Request, e: &std::io::Error) -> String {
    if !matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ) {
        return format!("no reply from meshd: {e}");
    }
    let secs = REPLY_TIMEOUT.as_secs();
    match req {
        Request::Rotate | Request::RotateHost { .. } => format!(
            "meshd has not finished the rotation within {secs} s; it goes on in meshd (a \
             rotation waits for every host to take the new key, and an offline host catches up \
             when it is back): meshctl status shows where it stands, journalctl -u meshd the steps"
        ),
        _ => format!(
            "meshd has not answered within {secs} s; the request may still be running in meshd \
             (meshctl status, journalctl -u meshd)"
        ),
    }
}

/// meshctl's exit status, as meshctl(8) documents it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Done; `status`: joined and the last pass had no error.
    Ok = 0,
    /// The request failed: meshd or the coordinator refused it, a doctor check failed, a ping
    /// got no answer, or meshctl's own input (the token) was refused.
    Failed = 1,
    // 2: a usage error, from clap.
    /// meshd could not be asked: it is not running, its socket is root's, or it gave no
    /// answer in time; `doctor`: the checks could not run at all.
    NoAnswer = 3,
    /// `status`: the host has not joined a mesh (`meshctl join`).
    NotJoined = 4,
    /// `status`: the last reconcile pass had an error (`last_error`).
    InError = 5,
}

/// An error meaning meshd could not be asked (exit status 3), not that it refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NoAnswer(String);

/// What `meshctl status` exits with for this status.
fn status_exit(status: &mesh_proto::wire::control::Status) -> Exit {
    use mesh_proto::wire::control::HostState;
    if status.state == HostState::NeedsJoin {
        Exit::NotJoined
    } else if status.last_error.is_some() {
        Exit::InError
    } else {
        Exit::Ok
    }
}

/// A spinner with the elapsed time on stderr while a long request runs (join, rotation,
/// doctor), on a terminal only; cleared when dropped.
struct Progress(indicatif::ProgressBar);

impl Progress {
    fn start(what: &str) -> Progress {
        use std::io::IsTerminal as _;
        let bar = if std::io::stderr().is_terminal() {
            indicatif::ProgressBar::new_spinner()
        } else {
            indicatif::ProgressBar::hidden()
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress(bar)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// What a request waits for, shown on a terminal while it runs (`None`: it is quick).
fn progress_label(req: &Request) -> Option<&'static str> {
    match req {
        Request::Join { .. } => {
            Some("joining: meshd registers with the coordinator and waits for its first netmap")
        }
        Request::Rotate => {
            Some("rotating the key: the coordinator and every online peer take the new key")
        }
        Request::Doctor => Some("running the checks (the path MTU probes take a few seconds)"),
        _ => None,
    }
}

fn request(socket: &Path, req: &Request) -> Result<Response> {
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => return Err(NoAnswer(unreachable_reason(socket, &e)).into()),
    };
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .context("cannot set a timeout on the control socket")?;
    let line = req.to_line();
    stream
        .write_all(line.as_bytes())
        .with_context(|| format!("cannot send the request to {}", socket.display()))?;
    let progress = progress_label(req).map(Progress::start);
    let mut reply = String::new();
    let read = BufReader::new(&stream).read_line(&mut reply);
    drop(progress);
    if let Err(e) = read {
        return Err(NoAnswer(no_reply_reason(req, &e)).into());
    }
    if reply.trim().is_empty() {
        return Err(NoAnswer(format!(
            "meshd at {} closed the connection without a reply",
            socket.display()
        ))
        .into());
    }
    Response::from_line(&reply).context("meshd sent a reply this meshctl does not understand")
}

/// Whether a meshd answers connections on `socket`: `false` when nothing listens there (no
/// socket file, or a stale one); other failures (permission denied) are errors, not "down".
fn daemon_up(socket: &Path) -> Result<bool> {
    match UnixStream::connect(socket) {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(NoAnswer(unreachable_reason(socket, &e)).into()),
    }
}

/// `meshd` beside this meshctl, else from PATH.
fn meshd_command() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("meshd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("meshd"))
}

/// `meshctl doctor`: through the daemon, else `meshd --doctor --json`. Exit 1 if a check
/// failed, 3 if the checks could not run.
fn doctor(socket: &Path, json: bool, config: &Path) -> Result<Exit> {
    let report = if daemon_up(socket)? {
        match request(socket, &Request::Doctor)? {
            Response::Doctor(r) => r,
            Response::Error { message } => return Err(NoAnswer(message).into()),
            other => bail!("unexpected reply from meshd: {other:?}"),
        }
    } else {
        let meshd = meshd_command();
        let progress = Progress::start("running the checks without meshd (meshd --doctor)");
        let run = std::process::Command::new(&meshd)
            .arg("--doctor")
            .arg("--json")
            .arg("--config")
            .arg(config)
            .stdin(std::process::Stdio::null())
            .output();
        drop(progress);
        let out = run.map_err(|e| {
            NoAnswer(format!(
                "meshd is not running and `{} --doctor` could not be run: {e}",
                meshd.display()
            ))
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        match serde_json::from_str::<Report>(&text) {
            Ok(r) => r,
            Err(_) => {
                return Err(NoAnswer(format!(
                    "meshd is not running, and `{} --doctor --config {}` failed: {}",
                    meshd.display(),
                    config.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
                .into())
            }
        }
    };
    if json {
        print_json(&report)?;
    } else {
        out(&report.render())?;
    }
    Ok(if report.failed() {
        Exit::Failed
    } else {
        Exit::Ok
    })
}

/// meshctl(8) less what clap knows (see meshd_docgen::man_page).
const MAN_TEMPLATE: &str = include_str!("../../packaging/man/meshctl.8.in");

fn main() -> std::process::ExitCode {
    if let Some(dir) = meshd_docgen::requested() {
        return meshd_docgen::generate(Cli::command(), MAN_TEMPLATE, &[], &dir);
    }
    let cli = Cli::parse();
    if let Cmd::Completion { shell } = cli.command {
        // No daemon needed; the package installs the same text.
        return match out_bytes(&meshd_docgen::completion(Cli::command(), shell)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshctl: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let code = match run(cli) {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            if e.downcast_ref::<NoAnswer>().is_some() {
                Exit::NoAnswer
            } else {
                Exit::Failed
            }
        }
    };
    std::process::ExitCode::from(code as u8)
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("cannot encode JSON")?;
    text.push('\n');
    out(&text)
}

/// Write to stdout; a reader that went away (`meshctl peers | head`) is not an error.
fn out(text: &str) -> Result<()> {
    out_bytes(text.as_bytes())
}

/// [`out`] for bytes.
fn out_bytes(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

fn run(cli: Cli) -> Result<Exit> {
    match &cli.command {
        Cmd::Doctor { json, config } => return doctor(&cli.socket, *json, config),
        Cmd::Ping { peer, count } => {
            return ping::run(&cli.socket, peer, *count).map(|ok| {
                if ok {
                    Exit::Ok
                } else {
                    Exit::Failed
                }
            })
        }
        Cmd::Bugreport { output, config } => {
            let path = bugreport::write(&cli.socket, config, output.as_deref())?;
            out(&format!(
                "wrote {} (secrets removed; look through it before you share it)\n",
                path.display()
            ))?;
            return Ok(Exit::Ok);
        }
        Cmd::Down { config, json } if !daemon_up(&cli.socket)? => {
            return down_offline(config, *json)
        }
        Cmd::Up => return up(&cli.socket),
        _ => {}
    }
    send(cli)
}

impl Cmd {
    /// Whether `--json` was asked for.
    fn json(&self) -> bool {
        match self {
            Cmd::Peers { json }
            | Cmd::Status { json }
            | Cmd::Reload { json }
            | Cmd::Join { json, .. }
            | Cmd::Rotate { json, .. }
            | Cmd::StaticConfig { json, .. }
            | Cmd::Invite { json, .. }
            | Cmd::Invites { json, .. }
            | Cmd::Revoke { json, .. }
            | Cmd::Hosts { json }
            | Cmd::Remove { json, .. }
            | Cmd::Routes { json, .. }
            | Cmd::Doctor { json, .. }
            | Cmd::Down { json, .. } => *json,
            Cmd::Ping { .. } | Cmd::Bugreport { .. } | Cmd::Up | Cmd::Completion { .. } => false,
        }
    }
}

fn send(cli: Cli) -> Result<Exit> {
    let req = match &cli.command {
        Cmd::Completion { .. } => bail!("meshctl completion needs no daemon"),
        Cmd::Bugreport { .. } => bail!("meshctl bugreport is written by meshctl itself"),
        Cmd::Ping { .. } => bail!("meshctl ping sends its own echo requests"),
        Cmd::Up => bail!("meshctl up starts meshd itself"),
        Cmd::Doctor { .. } => Request::Doctor,
        Cmd::Down { .. } => Request::Down,
        Cmd::Peers { .. } => Request::Peers,
        Cmd::Status { .. } => Request::Status,
        Cmd::Reload { .. } => Request::Reload,
        Cmd::Rotate { name: None, .. } => Request::Rotate,
        Cmd::Rotate {
            name: Some(name), ..
        } => Request::RotateHost { name: name.clone() },
        Cmd::StaticConfig { name, .. } => Request::StaticConfig { name: name.clone() },
        Cmd::Join {
            token, token_file, ..
        } => Request::Join {
            token: join_token(token.as_deref(), token_file.as_deref())?,
        },
        Cmd::Invite {
            name,
            ip,
            ttl,
            admin,
            static_peer,
            public_key,
            endpoint,
            near,
            ..
        } => Request::Invite(InviteRequest {
            name: name.clone(),
            address: *ip,
            ttl_secs: *ttl,
            admin: *admin,
            static_peer: *static_peer,
            public_key: *public_key,
            endpoint: *endpoint,
            near: near.clone(),
        }),
        Cmd::Invites {
            action: Some(InvitesCmd::Revoke { name }),
            ..
        }
        | Cmd::Revoke { name, .. } => Request::RevokeInvite { name: name.clone() },
        Cmd::Invites { .. } => Request::Invites,
        Cmd::Hosts { .. } => Request::Hosts,
        Cmd::Remove { name, .. } => Request::Remove { name: name.clone() },
        Cmd::Routes {
            action: None | Some(RoutesCmd::List),
            ..
        } => Request::Routes,
        Cmd::Routes {
            action: Some(RoutesCmd::Approve { name, prefix }),
            ..
        } => Request::RouteDecision {
            decision: RouteDecision::Approve,
            host: name.clone(),
            prefix: *prefix,
        },
        Cmd::Routes {
            action: Some(RoutesCmd::Revoke { name, prefix }),
            ..
        } => Request::RouteDecision {
            decision: RouteDecision::Revoke,
            host: name.clone(),
            prefix: *prefix,
        },
    };
    let resp = request(&cli.socket, &req)?;
    if let (
        Cmd::Join {
            token_file: Some(f),
            ..
        },
        Response::Ok { .. },
    ) = (&cli.command, &resp)
    {
        // Joined: the token is spent; do not leave it on disk.
        if let Err(e) = std::fs::remove_file(f) {
            eprintln!(
                "meshctl: joined, but cannot remove the token file {}: {e}",
                f.display()
            );
        }
    }
    render(&cli.command, resp)
}

/// Print meshd's answer to `cmd` (as JSON with `--json`) and say how meshctl exits.
fn render(cmd: &Cmd, resp: Response) -> Result<Exit> {
    let json = cmd.json();
    match (cmd, resp) {
        (_, Response::Error { message }) => bail!("{message}"),
        (Cmd::Status { .. }, Response::Status(status)) => {
            if json {
                print_json(&status)?;
            } else {
                out(&render_status(&status, now()))?;
            }
            return Ok(status_exit(&status));
        }
        (Cmd::Invite { .. }, Response::Invite(inv)) if json => print_json(&inv)?,
        (Cmd::Invite { .. }, Response::Invite(inv)) => match &inv.token {
            // The token alone on stdout (for scripts); the summary on stderr.
            Some(token) if inv.wg_quick_config.is_none() => {
                for line in render_invite(&inv).lines().filter(|l| l != token) {
                    eprintln!("{line}");
                }
                out(&format!("{token}\n"))?
            }
            _ => out(&render_invite(&inv))?,
        },
        (Cmd::Invites { .. }, Response::Invites { invites }) if json => print_json(&invites)?,
        (Cmd::Invites { .. }, Response::Invites { invites }) => {
            out(&render_invites(&invites, now()))?
        }
        (Cmd::Hosts { .. }, Response::Hosts { hosts }) if json => print_json(&hosts)?,
        (Cmd::Hosts { .. }, Response::Hosts { hosts }) => out(&render_hosts(&hosts, now()))?,
        (Cmd::Routes { .. }, Response::Routes { routes }) if json => print_json(&routes)?,
        (Cmd::Routes { .. }, Response::Routes { routes }) => out(&render_routes(&routes, now()))?,
        (Cmd::Peers { .. }, Response::Peers { peers }) if json => print_json(&peers)?,
        (Cmd::Peers { .. }, Response::Peers { peers }) => out(&render_peers_table(&peers, now()))?,
        (
            Cmd::Join { .. }
            | Cmd::Invites { .. }
            | Cmd::Revoke { .. }
            | Cmd::Remove { .. }
            | Cmd::Routes { .. }
            | Cmd::StaticConfig { .. }
            | Cmd::Reload { .. }
            | Cmd::Rotate { .. }
            | Cmd::Down { .. },
            Response::Ok { message, done },
        ) => {
            if json {
                print_json(&Done::report(&message, done.as_ref()))?
            } else if matches!(cmd, Cmd::StaticConfig { .. }) {
                // A wg-quick file, already ending in a newline.
                out(&message)?
            } else {
                out(&format!("{message}\n"))?
            }
        }
        (_, other) => bail!("unexpected reply from meshd: {other:?}"),
    }
    Ok(Exit::Ok)
}

/// The join token: from stdin (`-`, or no argument with stdin not a terminal) or from a
/// root-owned 0600 file; a token given on the command line is refused (it is visible to every
/// local user in `ps` and /proc/PID/cmdline while meshctl runs).
fn join_token(arg: Option<&str>, file: Option<&Path>) -> Result<String> {
    use std::io::{IsTerminal as _, Read as _};
    let text = match (arg, file) {
        (Some(a), _) if a != "-" => bail!(
            "refusing a token on the command line: every local user can read it there \
             (ps, /proc/PID/cmdline). Pass it on stdin: `meshctl join -` and paste it, or \
             `meshctl join - < FILE`; or from a file: `meshctl join --token-file FILE` (mode \
             0600, owned by root; removed after the join)"
        ),
        (None, Some(f)) => read_token_file(f)?,
        (Some(_), _) | (None, None) => {
            let stdin = std::io::stdin();
            if arg.is_none() && stdin.is_terminal() {
                bail!(
                    "no token: pass it on stdin (`meshctl join -`, then paste it and press \
                     Enter and Ctrl-D) or with `--token-file FILE`"
                );
            }
            let mut buf = String::new();
            stdin
                .lock()
                .take(mesh_proto::config::secret_file::MAX_TOKEN_FILE_BYTES + 1)
                .read_to_string(&mut buf)
                .context("cannot read the token from stdin")?;
            if buf.len() as u64 > mesh_proto::config::secret_file::MAX_TOKEN_FILE_BYTES {
                bail!("refusing stdin: more than a token");
            }
            buf
        }
    };
    let token = text.trim();
    if token.is_empty() {
        bail!("no token: stdin or the token file was empty");
    }
    Ok(token.to_owned())
}

/// Read a token file that is not a symbolic link, is owned by root and readable by root only.
fn read_token_file(path: &Path) -> Result<String> {
    use std::io::Read as _;
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                anyhow::anyhow!(
                    "refusing the token file {}: it is a symbolic link",
                    path.display()
                )
            } else {
                anyhow::anyhow!("cannot read the token file {}: {e}", path.display())
            }
        })?;
    let meta = f
        .metadata()
        .with_context(|| format!("cannot stat the token file {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "refusing the token file {}: not a regular file",
            path.display()
        );
    }
    mesh_proto::config::secret_file::check_secret_file(
        &path.display().to_string(),
        meta.mode(),
        meta.uid(),
        meta.len(),
    )
    .map_err(anyhow::Error::msg)?;
    let mut text = String::new();
    f.read_to_string(&mut text)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    Ok(text)
}

/// A CIDR, or a bare address as its host prefix.
fn parse_prefix(s: &str) -> std::result::Result<ipnet::IpNet, ArgError> {
    if s.contains('/') {
        s.parse().map_err(|_| ArgError::NotPrefix(s.to_string()))
    } else {
        s.parse::<std::net::IpAddr>()
            .map(ipnet::IpNet::from)
            .map_err(|_| ArgError::NotPrefixOrAddress(s.to_string()))
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_man_page_has_every_command_and_renders_without_warnings() {
        let page = meshd_docgen::man_page(Cli::command(), MAN_TEMPLATE).expect("renders");
        for sub in Cli::command().get_subcommands() {
            let name = format!(".SS \"meshctl {}\"", sub.get_name().replace('-', "\\-"));
            assert!(page.contains(&name), "{name} missing");
        }
        assert!(page.contains(".SS \"meshctl routes approve\""));
        for section in [
            "SYNOPSIS",
            "OPTIONS",
            "COMMANDS",
            "FILES",
            "ENVIRONMENT",
            "EXIT STATUS",
            "EXAMPLES",
            "SEE ALSO",
        ] {
            assert!(
                page.contains(&format!(".SH {section}"))
                    || page.contains(&format!(".SH \"{section}\"")),
                "{section}"
            );
        }
        let warnings = meshd_docgen::groff_warnings(&page).expect("groff runs");
        assert!(warnings.is_empty(), "{warnings}");
    }

    #[test]
    fn completion_scripts_are_printed_for_each_shell() {
        for (shell, word) in [("bash", "bash"), ("zsh", "zsh"), ("fish", "fish")] {
            let cli = Cli::try_parse_from(["meshctl", "completion", shell]).expect("parses");
            let Cmd::Completion { shell } = cli.command else {
                panic!("{word}: not the completion command");
            };
            let text =
                String::from_utf8(meshd_docgen::completion(Cli::command(), shell)).expect("utf-8");
            assert!(text.contains("invite") && text.contains("socket"), "{word}");
            assert!(!text.contains("generate-docs"), "{word}");
        }
        assert!(Cli::try_parse_from(["meshctl", "completion", "tcsh"]).is_err());
        // The bash script is valid bash.
        let script = meshd_docgen::completion(Cli::command(), meshd_docgen::Shell::Bash);
        let dir = tempfile_dir();
        let path = dir.join("meshctl.bash");
        std::fs::write(&path, script).expect("write");
        let status = std::process::Command::new("bash")
            .arg("-n")
            .arg(&path)
            .status()
            .expect("bash runs");
        assert!(status.success(), "bash -n {}", path.display());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshctl-completion-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn a_token_in_argv_is_refused_with_the_way_to_pass_it() {
        let e = join_token(Some("meshd1.secret"), None)
            .expect_err("argv")
            .to_string();
        assert!(e.contains("command line"), "{e}");
        assert!(e.contains("meshctl join -"), "{e}");
        assert!(e.contains("--token-file"), "{e}");
        assert!(!e.contains("secret"), "the refusal echoes the token: {e}");
    }

    #[test]
    fn token_files_must_be_private_regular_and_not_links() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("meshctl-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("join.token");
        std::fs::write(&f, "meshd1.abc\n").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = read_token_file(&f).expect_err("0644").to_string();
        // A file we wrote is ours: root's when run as root, else refused by owner first.
        let ours_is_roots = std::os::unix::fs::MetadataExt::uid(&f.metadata().expect("stat")) == 0;
        if ours_is_roots {
            assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
        } else {
            assert!(e.contains("not root"), "{e}");
            eprintln!(
                "skipped: the mode half needs root (a file not owned by root is refused first)"
            );
        }
        let link = dir.join("link.token");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&f, &link).expect("symlink");
        let e = read_token_file(&link).expect_err("link").to_string();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        // Owned by whoever runs the test: root passes, anyone else is refused by owner.
        match read_token_file(&f) {
            Ok(t) => assert_eq!(join_token(None, Some(&f)).expect("token"), t.trim()),
            Err(e) => assert!(e.to_string().contains("not root"), "{e}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn route_prefixes() {
        assert_eq!(
            parse_prefix("192.168.1.20").map(|n| n.to_string()),
            Ok("192.168.1.20/32".to_string())
        );
        assert_eq!(
            parse_prefix("fd00::1").map(|n| n.to_string()),
            Ok("fd00::1/128".to_string())
        );
        assert_eq!(
            parse_prefix("1.1.1.0/24").map(|n| n.to_string()),
            Ok("1.1.1.0/24".to_string())
        );
        assert!(parse_prefix("1.1.1.0/33").is_err());
        assert!(parse_prefix("nas").is_err());
        let cli =
            Cli::try_parse_from(["meshctl", "routes", "approve", "dock-edge", "192.168.1.20"])
                .expect("parses");
        assert!(matches!(
            cli.command,
            Cmd::Routes {
                action: Some(RoutesCmd::Approve { .. }),
                ..
            }
        ));
    }

    #[test]
    fn a_slow_answer_says_what_goes_on() {
        let timeout = std::io::Error::from(std::io::ErrorKind::WouldBlock);
        let e = no_reply_reason(&Request::Rotate, &timeout);
        assert!(
            e.contains("goes on in meshd") && e.contains("offline host"),
            "{e}"
        );
        assert!(
            !e.contains("temporarily unavailable") && !e.contains("os error"),
            "{e}"
        );
        let e = no_reply_reason(&Request::Status, &timeout);
        assert!(e.contains("has not answered within 30 s"), "{e}");
    }

    #[test]
    fn unreachable_socket_says_why() {
        let p = Path::new("/run/meshd/control.sock");
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let e = unreachable_reason(p, &denied);
        assert!(e.starts_with("meshctl needs root"), "{e}");
        assert!(!e.contains("is meshd running"), "{e}");
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(unreachable_reason(p, &missing).starts_with("meshd is not running"));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(unreachable_reason(p, &refused).contains("is meshd running?"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(86400));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("7d"), Ok(604800));
        assert_eq!(parse_duration("1w"), Ok(604800));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration(" 2h 15m "), Ok(8100));
        assert_eq!(parse_duration("0h"), Err(ArgError::ZeroDuration));
        assert_eq!(parse_duration("0"), Err(ArgError::ZeroDuration));
        assert_eq!(
            parse_duration("1500ms"),
            Err(ArgError::NotWholeSeconds("1500ms".into()))
        );
        assert!(matches!(
            parse_duration("99999999999999999999"),
            Err(ArgError::DurationTooLong(_))
        ));
        for bad in ["h", "", "5 parsecs", "-3h", "1h-"] {
            match parse_duration(bad) {
                Err(e) => assert!(
                    e.to_string().contains("is not a duration like"),
                    "{bad:?}: {e}"
                ),
                Ok(v) => panic!("{bad:?} read as {v} s"),
            }
        }
    }

    #[test]
    fn commands_parse() {
        let cli =
            Cli::try_parse_from(["meshctl", "invites", "revoke", "dock-mirror"]).expect("parse");
        assert!(matches!(
            cli.command,
            Cmd::Invites {
                action: Some(InvitesCmd::Revoke { .. }),
                ..
            }
        ));
        let cli = Cli::try_parse_from(["meshctl", "invite", "nas", "--static", "--ttl", "30m"])
            .expect("parse");
        assert!(matches!(
            cli.command,
            Cmd::Invite {
                static_peer: true,
                ttl: Some(1800),
                ..
            }
        ));
        assert!(Cli::try_parse_from(["meshctl", "invite", "nas", "--public-key", "x"]).is_err());
        let cli = Cli::try_parse_from([
            "meshctl",
            "invite",
            "nas",
            "--static",
            "--endpoint",
            "192.168.1.20:51820",
            "--near",
            "dock-mirror",
        ])
        .expect("parse");
        assert!(matches!(
            &cli.command,
            Cmd::Invite { endpoint: Some(e), near: Some(n), .. }
                if e.to_string() == "192.168.1.20:51820" && n == "dock-mirror"
        ));
        for flag in ["--endpoint", "--near"] {
            assert!(Cli::try_parse_from(["meshctl", "invite", "nas", flag, "x"]).is_err());
        }
        assert!(Cli::try_parse_from([
            "meshctl",
            "invite",
            "nas",
            "--static",
            "--endpoint",
            "192.168.1.20"
        ])
        .is_err());
        let cli = Cli::try_parse_from(["meshctl", "rotate"]).expect("parse");
        assert!(matches!(
            cli.command,
            Cmd::Rotate {
                name: None,
                json: false
            }
        ));
        let cli = Cli::try_parse_from(["meshctl", "rotate", "dock-prod"]).expect("parse");
        assert!(matches!(cli.command, Cmd::Rotate { name: Some(ref n), .. } if n == "dock-prod"));
        assert!(Cli::try_parse_from(["meshctl", "rotate", "a", "b"]).is_err());
        let cli = Cli::try_parse_from(["meshctl", "join"]).expect("parse");
        assert!(matches!(
            cli.command,
            Cmd::Join {
                token: None,
                token_file: None,
                json: false
            }
        ));
        for flag in ["--file", "--token-file"] {
            let cli = Cli::try_parse_from(["meshctl", "join", flag, "/tmp/t"]).expect("parse");
            assert!(matches!(
                cli.command,
                Cmd::Join {
                    token_file: Some(_),
                    ..
                }
            ));
        }
        assert!(Cli::try_parse_from(["meshctl", "join", "-", "--token-file", "/t"]).is_err());
        let cli = Cli::try_parse_from(["meshctl", "doctor", "--json", "--config", "/x.toml"])
            .expect("parse");
        assert!(
            matches!(&cli.command, Cmd::Doctor { json: true, config } if config == Path::new("/x.toml"))
        );
        let cli = Cli::try_parse_from(["meshctl", "down"]).expect("parse");
        assert!(
            matches!(&cli.command, Cmd::Down { config, .. } if config == Path::new(mesh_proto::DEFAULT_CONFIG_PATH))
        );
    }

    /// Every command that reports something takes --json (issue: scripts parse them).
    #[test]
    fn every_reporting_command_takes_json() {
        for args in [
            &["peers"][..],
            &["status"],
            &["reload"],
            &["join", "-"],
            &["rotate"],
            &["rotate", "dock-prod"],
            &["static-config", "nas"],
            &["invite", "dock-prod"],
            &["invites"],
            &["revoke", "dock-prod"],
            &["hosts"],
            &["remove", "dock-prod"],
            &["routes"],
            &["doctor"],
            &["down"],
        ] {
            let mut argv = vec!["meshctl"];
            argv.extend_from_slice(args);
            argv.push("--json");
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert!(cli.command.json(), "{argv:?}");
            argv.pop();
            let cli = Cli::try_parse_from(&argv).expect("parse");
            assert!(!cli.command.json(), "{argv:?}");
        }
    }

    fn status_in(state: mesh_proto::wire::control::HostState, error: Option<&str>) -> Response {
        let line = format!(
            "{{\"response\":\"status\",\"host\":null,\"state\":\"{}\",\"interface\":\"wgmesh0\",\
             \"public_key\":\"{}\",\"mesh_address\":null,\"listen_port\":51871,\"backend\":\"kernel\",\
             \"config_path\":\"/etc/meshd/meshd.toml\",\"peers_total\":0,\"peers_recent_handshake\":0,\
             \"last_reconcile_unix\":null,\"last_error\":{},\"version\":\"0.1.0\",\"ifindex\":null,\
             \"netmap_version\":null,\"coordinator\":null}}",
            serde_json::to_value(state).expect("state").as_str().expect("str"),
            PublicKey([1; 32]),
            serde_json::to_string(&error).expect("json"),
        );
        Response::from_line(&line).expect("status line")
    }

    #[test]
    fn status_exits_distinctly_when_not_joined_or_in_error() {
        use mesh_proto::wire::control::HostState;
        let status = Cli::try_parse_from(["meshctl", "status", "--json"]).expect("parse");
        for (state, error, exit) in [
            (HostState::Member, None, Exit::Ok),
            (HostState::Coordinator, None, Exit::Ok),
            (HostState::Static, None, Exit::Ok),
            (HostState::NeedsJoin, None, Exit::NotJoined),
            (HostState::Member, Some("cannot add route"), Exit::InError),
        ] {
            let r = render(&status.command, status_in(state, error)).expect("rendered");
            assert_eq!(r, exit, "{state:?} {error:?}");
        }
        assert_eq!(
            [
                Exit::Ok,
                Exit::Failed,
                Exit::NoAnswer,
                Exit::NotJoined,
                Exit::InError
            ]
            .map(|e| e as u8),
            [0, 1, 3, 4, 5],
            "the codes meshctl(8) documents"
        );
    }

    #[test]
    fn refusals_and_unreachable_meshd_exit_differently() {
        let cmd = Cli::try_parse_from(["meshctl", "remove", "x"]).expect("parse");
        let e =
            render(&cmd.command, Response::error("coordinator: no host x")).expect_err("refused");
        assert!(
            e.downcast_ref::<NoAnswer>().is_none(),
            "a refusal is exit 1"
        );
        let dir = std::env::temp_dir().join(format!("meshctl-test-{}", std::process::id()));
        let e = request(&dir.join("absent.sock"), &Request::Status).expect_err("no socket");
        assert!(e.downcast_ref::<NoAnswer>().is_some(), "{e:#}");
        assert!(format!("{e:#}").contains("meshd is not running"), "{e:#}");
        // No meshd beside the test binary; from PATH, if any, it cannot read the
        // configuration: either way the checks did not run (exit 3, not "a check failed").
        let e = doctor(&dir.join("absent.sock"), false, &dir.join("absent.toml"))
            .expect_err("no checks ran");
        assert!(e.downcast_ref::<NoAnswer>().is_some(), "{e:#}");
    }
}
