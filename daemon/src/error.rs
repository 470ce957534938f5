//! The daemon library's error type. Every variant tells the operator what was refused and why.

use std::path::PathBuf;

/// Errors of the meshd library. Binaries wrap these with `anyhow` context.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file could not be read or is invalid.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// The configuration file is invalid (every error of the file, each naming the file, the
    /// line and column, and the key).
    #[error(transparent)]
    ConfigInvalid(#[from] mesh_proto::config::ConfigErrors),
    /// The private key file is unusable (bad permissions, bad content, cannot be written).
    #[error("private key file {path}: {message}")]
    KeyFile { path: PathBuf, message: String },
    /// Another meshd already holds this interface or control socket.
    #[error("{what} is already managed by another meshd (lock {path} is held); refusing to start and changing nothing")]
    AlreadyRunning { what: String, path: PathBuf },
    /// The WireGuard engine could not be started or reached.
    #[error("engine for {interface}: {message}")]
    Engine { interface: String, message: String },
    /// The kernel's WireGuard refused or failed an operation.
    #[error("kernel WireGuard on {interface}: {message}")]
    Kernel { interface: String, message: String },
    /// A UAPI exchange failed.
    #[error("UAPI {socket}: {message}")]
    Uapi { socket: PathBuf, message: String },
    /// A netlink operation failed.
    #[error("netlink: {0}")]
    Netlink(String),
    /// A file in the state directory (membership, cached netmap) is unusable.
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
    /// A program meshd needs for a configured feature is not installed.
    #[error("{program} is not installed; it is needed for {needed_for}")]
    NotInstalled {
        program: &'static str,
        needed_for: &'static str,
    },
    /// An operation on the in-memory fake was made to fail (tests only).
    #[cfg(any(test, feature = "test-fakes"))]
    #[error("injected failure: {0}")]
    Injected(String),
    /// A program meshd runs (`nft`, `resolvectl`, an integration's check or reload) failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// Any other I/O error, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// A program meshd ran did not do its job: it could not start, ran too long, or exited
/// non-zero (with the tail of what it said on stderr).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("an empty command (nothing to run)")]
    Empty,
    #[error("`{command}` could not start: {source}")]
    Start {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}`: cannot wait for it: {source}")]
    Wait {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` ran longer than {}s and was killed", .limit.as_secs())]
    TimedOut {
        command: String,
        limit: std::time::Duration,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        /// The last lines of its stderr, trimmed.
        stderr: String,
    },
}

impl CommandError {
    /// A finished command's stdout, or [`CommandError::Failed`] with its stderr.
    pub fn stdout_of(command: String, out: std::process::Output) -> Result<String, CommandError> {
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(CommandError::Failed {
                command,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// A command that exited with `code` (for test doubles of a runner).
    #[cfg(any(test, feature = "test-fakes"))]
    pub fn exited(command: impl Into<String>, code: i32, stderr: impl Into<String>) -> Self {
        use std::os::unix::process::ExitStatusExt as _;
        CommandError::Failed {
            command: command.into(),
            status: std::process::ExitStatus::from_raw(code << 8),
            stderr: stderr.into(),
        }
    }
}

/// Result alias for the meshd library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
