//! `UapiBackend`: a WireGuard device served by a userspace engine (`meshd-wg`, or anything with
//! wireguard-go's command line) over the standard UAPI socket `/var/run/wireguard/IFACE.sock`.
//!
//! If the socket answers `get=1`, the running engine is adopted (same interface, same ifindex,
//! same peers). Otherwise `ENGINE IFACE` is run; like wireguard-go it detaches once the
//! interface is up, and we poll for the socket with a deadline.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use mesh_proto::wire::uapi::{format_set, ops_to_set, parse_get};
use mesh_proto::{ObservedDevice, Op};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::backend::WgBackend;
use crate::error::{Error, Result};

/// Where wireguard-go, meshd-wg and `wg(8)` put UAPI sockets.
pub const DEFAULT_WG_RUN_DIR: &str = "/var/run/wireguard";

/// How long one UAPI exchange may take.
const UAPI_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an engine may take to bring its interface and socket up.
const ENGINE_START_TIMEOUT: Duration = Duration::from_secs(15);

/// Find the engine binary: `meshd-wg` next to the current executable, else `meshd-wg` on PATH.
pub fn default_engine_command() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let candidate = dir.join("meshd-wg");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("meshd-wg")
}

/// A UAPI-speaking engine for one interface.
#[derive(Debug)]
pub struct UapiBackend {
    interface: String,
    socket: PathBuf,
    engine_command: PathBuf,
    engine_child: Option<Child>,
}

impl UapiBackend {
    pub fn new(interface: &str, engine_command: PathBuf, run_dir: &Path) -> Self {
        UapiBackend {
            interface: interface.to_owned(),
            socket: run_dir.join(format!("{interface}.sock")),
            engine_command,
            engine_child: None,
        }
    }

    /// Whether an engine answers `get=1` on the socket now.
    pub async fn answers(&self) -> bool {
        self.get().await.is_ok()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn uapi_err(&self, message: impl Into<String>) -> Error {
        Error::Uapi {
            socket: self.socket.clone(),
            message: message.into(),
        }
    }

    fn engine_err(&self, message: impl Into<String>) -> Error {
        Error::Engine {
            interface: self.interface.clone(),
            message: message.into(),
        }
    }

    /// One request/response exchange: send `request`, read lines up to the blank line.
    async fn exchange(&self, request: &str) -> Result<String> {
        let fut = async {
            let mut stream = UnixStream::connect(&self.socket)
                .await
                .map_err(|e| self.uapi_err(format!("cannot connect: {e}")))?;
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| self.uapi_err(format!("cannot send request: {e}")))?;
            let mut reader = BufReader::new(stream);
            let mut text = String::new();
            loop {
                let mut line = String::new();
                let n = reader
                    .read_line(&mut line)
                    .await
                    .map_err(|e| self.uapi_err(format!("cannot read reply: {e}")))?;
                if n == 0 {
                    return Err(self.uapi_err("connection closed before the end of the reply"));
                }
                if line == "\n" {
                    break;
                }
                text.push_str(&line);
            }
            Ok(text)
        };
        tokio::time::timeout(UAPI_TIMEOUT, fut)
            .await
            .map_err(|_| self.uapi_err(format!("no reply within {UAPI_TIMEOUT:?}")))?
    }

    async fn get(&self) -> Result<ObservedDevice> {
        let text = self.exchange("get=1\n\n").await?;
        let get = parse_get(&text).map_err(|e| self.uapi_err(format!("bad get=1 reply: {e}")))?;
        Ok(ObservedDevice::from(get))
    }

    async fn start_engine(&mut self) -> Result<()> {
        tracing::info!(
            interface = %self.interface,
            engine = %self.engine_command.display(),
            "no engine answers on {}; starting one",
            self.socket.display()
        );
        // A socket file nobody listens on was left by a dead engine; engines refuse to start
        // while it exists (it would look like a live one), so remove it.
        if let Err(e) = std::os::unix::net::UnixStream::connect(&self.socket) {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                tracing::info!(socket = %self.socket.display(), "removing stale UAPI socket");
                let _ = std::fs::remove_file(&self.socket);
            }
        }
        let mut cmd = Command::new(&self.engine_command);
        cmd.arg(&self.interface)
            .stdin(Stdio::null())
            // Our own process group: a Ctrl-C aimed at meshd must not reach the engine, which
            // outlives meshd on purpose.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| {
            self.engine_err(format!(
                "cannot run `{} {}`: {e} (set daemon.engine_command)",
                self.engine_command.display(),
                self.interface
            ))
        })?;
        let deadline = Instant::now() + ENGINE_START_TIMEOUT;
        let mut exited_ok = false;
        loop {
            if !exited_ok {
                match child.try_wait() {
                    Ok(Some(status)) if status.success() => exited_ok = true,
                    Ok(Some(status)) => {
                        return Err(self.engine_err(format!(
                            "`{} {}` exited with {status} before its UAPI socket answered",
                            self.engine_command.display(),
                            self.interface
                        )));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(self.engine_err(format!("cannot wait for engine: {e}"))),
                }
            }
            if self.get().await.is_ok() {
                tracing::info!(interface = %self.interface, "engine is up");
                if !exited_ok {
                    // Foreground engine (or still detaching): keep the handle to reap it later.
                    self.engine_child = Some(child);
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.engine_err(format!(
                    "UAPI socket {} did not answer within {ENGINE_START_TIMEOUT:?}",
                    self.socket.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl WgBackend for UapiBackend {
    async fn ensure_device(&mut self) -> Result<()> {
        if let Some(child) = self.engine_child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                tracing::debug!(%status, "reaped engine launcher");
                self.engine_child = None;
            }
        }
        match self.get().await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "no engine answers");
                self.start_engine().await
            }
        }
    }

    async fn observe(&mut self) -> Result<ObservedDevice> {
        self.get().await
    }

    async fn apply(&mut self, ops: &[Op]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let request = format_set(&ops_to_set(ops));
        let reply = self.exchange(&request).await?;
        let errno = reply
            .lines()
            .find_map(|l| l.strip_prefix("errno="))
            .ok_or_else(|| self.uapi_err(format!("set=1 reply has no errno: {reply:?}")))?;
        match errno.trim().parse::<i32>() {
            Ok(0) => Ok(()),
            Ok(n) => Err(self.uapi_err(format!(
                "set=1 refused with errno={n} ({})",
                std::io::Error::from_raw_os_error(n)
            ))),
            Err(_) => Err(self.uapi_err(format!("set=1 reply has a bad errno: {errno:?}"))),
        }
    }
}
