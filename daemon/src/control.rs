//! The control socket: JSON lines (`mesh_proto::control::{Request, Response}`), one request
//! line, one response line. A malformed request gets `Response::Error` and the connection is
//! closed; the daemon is unaffected.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mesh_proto::control::{Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// A request from a control connection to the agent loop.
#[derive(Debug)]
pub struct Command {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

/// Create the control socket's directory (0755) if missing.
pub fn prepare_dir(socket: &Path) -> Result<()> {
    if let Some(dir) = socket.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        }
    }
    Ok(())
}

/// A bound control socket; the socket file is removed on drop.
#[derive(Debug)]
pub struct ControlSocket {
    pub listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Bind the socket (mode 0660). The caller must hold the instance lock, so a socket file
    /// already there is stale (left by a killed meshd) and is replaced.
    pub fn bind(path: &Path) -> Result<Self> {
        prepare_dir(path)?;
        match fs::remove_file(path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed stale control socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io(
                    format!("cannot remove stale control socket {}", path.display()),
                    e,
                ))
            }
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| Error::io(format!("cannot bind control socket {}", path.display()), e))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o660))
            .map_err(|e| Error::io(format!("cannot chmod {}", path.display()), e))?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Accept connections forever, forwarding requests to the agent loop.
pub async fn accept_loop(listener: &UnixListener, commands: mpsc::Sender<Command>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let commands = commands.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle_connection(stream, commands).await {
                        tracing::debug!(error = %e, "control connection ended with an error");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept on control socket failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn write_response(
    stream: &mut (impl AsyncWriteExt + Unpin),
    response: &Response,
) -> std::io::Result<()> {
    stream.write_all(response.to_line().as_bytes()).await?;
    stream.flush().await
}

async fn handle_connection(
    stream: UnixStream,
    commands: mpsc::Sender<Command>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_REQUEST).read_line(&mut line).await;
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                let resp = Response::error(format!("unreadable request: {e}"));
                return write_response(&mut write, &resp).await;
            }
        };
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_REQUEST {
            let resp = Response::error(format!("request longer than {MAX_REQUEST} bytes"));
            return write_response(&mut write, &resp).await;
        }
        if line.trim().is_empty() {
            continue;
        }
        let request = match Request::from_line(&line) {
            Ok(r) => r,
            Err(e) => {
                let resp = Response::error(format!("malformed request: {e}"));
                return write_response(&mut write, &resp).await;
            }
        };
        let (reply, rx) = oneshot::channel();
        if commands.send(Command { request, reply }).await.is_err() {
            let resp = Response::error("meshd is shutting down");
            return write_response(&mut write, &resp).await;
        }
        let resp = rx
            .await
            .unwrap_or_else(|_| Response::error("meshd is shutting down"));
        write_response(&mut write, &resp).await?;
    }
}
