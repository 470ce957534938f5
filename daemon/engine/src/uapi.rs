//! The UAPI server: the standard cross-platform configuration protocol on
//! `/var/run/wireguard/IFACE.sock`, so `wg`, `wg-quick` and meshd drive the engine exactly as
//! they drive wireguard-go. A malformed request gets an `errno=` reply; the engine keeps running.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use mesh_proto::wire::uapi::{format_errno, format_get, parse_set};

use crate::device::Device;

/// Where `wg` looks for userspace implementations.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// Longest request body we accept (a few thousand peers).
const MAX_REQUEST: usize = 4 << 20;

pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// A bound UAPI socket; the file is removed on drop.
pub struct UapiServer {
    path: PathBuf,
    listener: UnixListener,
}

impl UapiServer {
    /// Bind the socket for `iface`, refusing if another live process serves it already.
    pub fn bind(iface: &str) -> anyhow::Result<UapiServer> {
        std::fs::create_dir_all(SOCKET_DIR).with_context(|| format!("creating {SOCKET_DIR}"))?;
        let _ = std::fs::set_permissions(SOCKET_DIR, std::fs::Permissions::from_mode(0o755));
        let path = socket_path(iface);
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                bail!("{} is already served by another process; refusing to start a second engine for {iface}", path.display());
            }
            std::fs::remove_file(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
        Ok(UapiServer { path, listener })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept connections until the device stops; each connection gets its own thread.
    pub fn serve(&self, device: Arc<Device>) {
        for conn in self.listener.incoming() {
            if device.is_stopping() {
                return;
            }
            let Ok(stream) = conn else { continue };
            let d = Arc::clone(&device);
            let _ = std::thread::Builder::new()
                .name("uapi".into())
                .spawn(move || {
                    if let Err(e) = handle(stream, &d) {
                        tracing::debug!(error = %e, "UAPI connection ended with an error");
                    }
                });
        }
    }

    /// Unblock `serve` (it checks the device's stop flag after each accept).
    pub fn wake(&self) {
        let _ = UnixStream::connect(&self.path);
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serve requests on one connection until the client closes it.
pub fn handle(stream: UnixStream, device: &Device) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        match line.trim_end_matches('\n') {
            "get=1" => {
                // The request ends with a blank line.
                let body = read_body(&mut reader)?;
                if body.is_some_and(|b| !b.is_empty()) {
                    writer.write_all(format_errno(libc::EINVAL).as_bytes())?;
                    return Ok(());
                }
                writer.write_all(format_get(&device.get()).as_bytes())?;
            }
            "set=1" => {
                let Some(body) = read_body(&mut reader)? else {
                    writer.write_all(format_errno(libc::EPROTO).as_bytes())?;
                    return Ok(());
                };
                let errno = match parse_set(&body).and_then(|set| device.set(set)) {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::info!(error = %e, "refused a UAPI set request");
                        e.errno()
                    }
                };
                writer.write_all(format_errno(errno).as_bytes())?;
            }
            "" => return Ok(()),
            _ => {
                writer.write_all(format_errno(libc::EINVAL).as_bytes())?;
                return Ok(());
            }
        }
    }
}

/// Read lines up to the blank line that ends a request. `None` if the stream ended first or
/// the request is too large.
fn read_body(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut body = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if line == "\n" {
            return Ok(Some(body));
        }
        body.push_str(&line);
        if body.len() > MAX_REQUEST {
            return Ok(None);
        }
    }
}
