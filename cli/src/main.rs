//! meshctl: the operator CLI. Parse, send one request over the control socket, render.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use mesh_proto::control::{render_peers_table, render_status, Request, Response};

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
    Reload,
}

fn request(socket: &Path, req: &Request) -> Result<Response> {
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => bail!(
            "cannot reach meshd at {}: {e}; is meshd running?",
            socket.display()
        ),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .context("cannot set a timeout on the control socket")?;
    let line = req.to_line();
    stream
        .write_all(line.as_bytes())
        .with_context(|| format!("cannot send the request to {}", socket.display()))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .with_context(|| format!("no reply from meshd at {}", socket.display()))?;
    if reply.trim().is_empty() {
        bail!(
            "meshd at {} closed the connection without a reply",
            socket.display()
        );
    }
    Response::from_line(&reply).context("meshd sent a reply this meshctl does not understand")
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("cannot encode JSON")?;
    text.push('\n');
    out(&text)
}

/// Write to stdout; a reader that went away (`meshctl peers | head`) is not an error.
fn out(text: &str) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

fn run(cli: Cli) -> Result<()> {
    let req = match cli.command {
        Cmd::Peers { .. } => Request::Peers,
        Cmd::Status { .. } => Request::Status,
        Cmd::Reload => Request::Reload,
    };
    let resp = request(&cli.socket, &req)?;
    match (cli.command, resp) {
        (_, Response::Error { message }) => bail!("meshd refused: {message}"),
        (Cmd::Peers { json: true }, Response::Peers { peers }) => print_json(&peers),
        (Cmd::Peers { json: false }, Response::Peers { peers }) => {
            out(&render_peers_table(&peers, now()))
        }
        (Cmd::Status { json: true }, Response::Status(status)) => print_json(&status),
        (Cmd::Status { json: false }, Response::Status(status)) => {
            out(&render_status(&status, now()))
        }
        (Cmd::Reload, Response::Ok { message }) => out(&format!("{message}\n")),
        (_, other) => bail!("unexpected reply from meshd: {other:?}"),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}
