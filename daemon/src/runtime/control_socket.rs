//! The control socket: JSON lines (`mesh_proto::wire::control::{Request, Response}`), one request
//! line, one response line. A malformed request gets `Response::Error` and the connection is
//! closed; the daemon is unaffected.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::wire::control::{Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::{Error, Result};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// Control connections served at once; one more is told so and closed at once.
pub const MAX_CLIENTS: usize = 32;
/// A request line must arrive within this (also the idle time allowed between requests on
/// one connection): a client that connects and sends nothing, or half a line, cannot hold a
/// place for long.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// An answer must be taken within this (a client that never reads is dropped).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A request from a control connection to the agent loop.
#[derive(Debug)]
pub struct Command {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
    /// Resolves once the reply is written to the client (or the connection is gone): the
    /// loop waits on it before meshd exits after `meshctl down`, so the answer is not lost.
    pub written: oneshot::Receiver<()>,
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

/// Accept connections forever, forwarding requests to the agent loop. At most
/// [`MAX_CLIENTS`] are served at once (one more gets an error line and is closed), and each
/// must send its request within [`READ_TIMEOUT`]: a stuck or hostile local client cannot keep
/// `meshctl` from the others.
pub async fn accept_loop(listener: &UnixListener, commands: mpsc::Sender<Command>) {
    accept_loop_with(listener, commands, MAX_CLIENTS, READ_TIMEOUT).await
}

/// [`accept_loop`] with other limits (tests).
pub async fn accept_loop_with(
    listener: &UnixListener,
    commands: mpsc::Sender<Command>,
    max_clients: usize,
    read_timeout: Duration,
) {
    let places = Arc::new(Semaphore::new(max_clients));
    let mut last_refusal_log: Option<tokio::time::Instant> = None;
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let Ok(permit) = places.clone().try_acquire_owned() else {
                    let now = tokio::time::Instant::now();
                    if last_refusal_log
                        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                    {
                        tracing::warn!(
                            max = max_clients,
                            "control socket: too many clients at once; refusing"
                        );
                        last_refusal_log = Some(now);
                    }
                    // A short line fits the socket buffer: this never waits on the client.
                    tokio::spawn(async move {
                        let resp = Response::error(format!(
                            "meshd is serving {max_clients} control connections already; try again"
                        ));
                        let _ = tokio::time::timeout(
                            Duration::from_millis(100),
                            write_response(&mut stream, &resp),
                        )
                        .await;
                    });
                    continue;
                };
                let commands = commands.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle_connection(stream, commands, read_timeout).await {
                        tracing::debug!(error = %e, "control connection ended with an error");
                    }
                    drop(permit);
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
    let write = async {
        stream.write_all(response.to_line().as_bytes()).await?;
        stream.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client did not take its answer",
        )),
    }
}

async fn handle_connection(
    stream: UnixStream,
    commands: mpsc::Sender<Command>,
    read_timeout: Duration,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = String::new();
        let mut limited = (&mut reader).take(MAX_REQUEST);
        let n = match tokio::time::timeout(read_timeout, limited.read_line(&mut line)).await {
            Err(_) => {
                let resp = Response::error(format!(
                    "no complete request line within {} s; closing",
                    read_timeout.as_secs()
                ));
                return write_response(&mut write, &resp).await;
            }
            Ok(n) => n,
        };
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
        let (written_tx, written) = oneshot::channel();
        if commands
            .send(Command {
                request,
                reply,
                written,
            })
            .await
            .is_err()
        {
            let resp = Response::error("meshd is shutting down");
            return write_response(&mut write, &resp).await;
        }
        let resp = rx
            .await
            .unwrap_or_else(|_| Response::error("meshd is shutting down"));
        write_response(&mut write, &resp).await?;
        let _ = written_tx.send(());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::AsyncReadExt;

    /// The accept loop with a stand-in agent loop that answers every request with "ok".
    fn serve(
        dir: &Path,
        max_clients: usize,
        read_timeout: Duration,
    ) -> (PathBuf, tokio::task::JoinHandle<()>) {
        let path = dir.join("meshd.sock");
        let socket = ControlSocket::bind(&path).unwrap();
        let (tx, mut rx) = mpsc::channel::<Command>(8);
        tokio::spawn(async move {
            while let Some(c) = rx.recv().await {
                let _ = c.reply.send(Response::ok("ok"));
            }
        });
        let task = tokio::spawn(async move {
            accept_loop_with(&socket.listener, tx, max_clients, read_timeout).await
        });
        (path, task)
    }

    async fn ask(path: &Path) -> String {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(Request::Status.to_line().as_bytes())
            .await
            .unwrap();
        let mut r = BufReader::new(s);
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut out))
            .await
            .expect("answered in time")
            .unwrap();
        out
    }

    /// Clients that connect and send half a line hold no more than their places, for no
    /// longer than the read timeout; one over the cap is told so at once; the others are
    /// served meanwhile and afterwards.
    #[tokio::test]
    async fn stuck_clients_cannot_block_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (path, task) = serve(dir.path(), 4, Duration::from_millis(600));
        // Three stuck clients: one place is left, and an honest client gets it.
        let mut stuck = Vec::new();
        for _ in 0..3 {
            let mut s = UnixStream::connect(&path).await.unwrap();
            s.write_all(b"{\"request\":").await.unwrap();
            stuck.push(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(ask(&path).await.contains("ok"));
        // A fourth stuck one fills the places: the next is refused at once, by name.
        let mut fourth = UnixStream::connect(&path).await.unwrap();
        fourth.write_all(b"{").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = ask(&path).await;
        assert!(refused.contains("control connections already"), "{refused}");
        // The stuck ones are closed after the read timeout, with a reason.
        let started = tokio::time::Instant::now();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), fourth.read_to_string(&mut out))
            .await
            .expect("closed in time")
            .unwrap();
        assert!(out.contains("no complete request line"), "{out}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // Then everyone is served again.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(ask(&path).await.contains("ok"));
        drop(stuck);
        task.abort();
    }
}
