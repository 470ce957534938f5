//! sd_notify(3) without a crate: one datagram per state change to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). Without the variable
//! (not started by systemd with Type=notify) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

/// Where to send notifications (`None`: nowhere).
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<Target>,
    /// The last STATUS= sent, so an unchanged status is not sent again.
    last_status: Option<String>,
    ready: bool,
}

#[derive(Debug)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`.
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|v| {
            let bytes = v.as_encoded_bytes();
            match bytes.first() {
                Some(b'@') => Some(Target::Abstract(bytes[1..].to_vec())),
                Some(b'/') => Some(Target::Path(PathBuf::from(v))),
                _ => None,
            }
        });
        Notifier {
            target,
            last_status: None,
            ready: false,
        }
    }

    /// Whether `READY=1` was sent.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Send one message (`KEY=VALUE` lines). Failures are logged, never fatal.
    pub fn send(&self, message: &str) {
        let Some(target) = &self.target else {
            return;
        };
        let result = UnixDatagram::unbound().and_then(|sock| match target {
            Target::Path(p) => sock.send_to(message.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(message.as_bytes(), &addr)
            }
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot notify systemd ({message:?})");
        }
    }

    /// `STATUS=...`, when it changed.
    pub fn status(&mut self, status: &str) {
        if self.last_status.as_deref() != Some(status) {
            self.send(&format!("STATUS={status}"));
            self.last_status = Some(status.to_owned());
        }
    }

    /// `READY=1` with a status, once.
    pub fn ready(&mut self, status: &str) {
        if !self.ready {
            self.ready = true;
            self.last_status = Some(status.to_owned());
            self.send(&format!("READY=1\nSTATUS={status}"));
        }
    }

    /// `STOPPING=1` with a status.
    pub fn stopping(&mut self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sends_datagrams_once_per_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_nonblocking(true).unwrap();
        let mut n = Notifier {
            target: Some(Target::Path(path)),
            ..Notifier::default()
        };
        n.status("starting");
        n.status("starting");
        n.ready("up");
        n.ready("up again");
        n.stopping("bye");
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(len) = rx.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        assert_eq!(
            got,
            [
                "STATUS=starting",
                "READY=1\nSTATUS=up",
                "STOPPING=1\nSTATUS=bye"
            ]
        );
        assert!(n.is_ready());
        assert!(Notifier::default().target.is_none());
    }
}
