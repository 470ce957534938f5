//! Choosing the WireGuard backend at start (`daemon.backend`), and the one type the daemon
//! runs with either kind.
//!
//! An interface that already exists is adopted as what it is, never recreated: a kernel
//! WireGuard link stays with the kernel, an interface whose UAPI socket answers stays with its
//! engine. A configured backend that contradicts the live interface is refused with the way
//! out, rather than tearing down what K3s or flannel may be bound to. With no interface,
//! `auto` asks the kernel to create a WireGuard link and falls back to our engine if it cannot.

use std::path::{Path, PathBuf};

use mesh_proto::config::BackendKind;
use mesh_proto::{ObservedDevice, Op};

use crate::backend::WgBackend;
use crate::error::{Error, Result};
use crate::netsys::link::NetlinkLink;
use crate::wg::kernel::KernelBackend;
use crate::wg::userspace::UapiBackend;

/// The backend the daemon runs with.
#[derive(Debug)]
pub enum Backend {
    Kernel(KernelBackend),
    Userspace(UapiBackend),
}

impl WgBackend for Backend {
    async fn ensure_device(&mut self) -> Result<()> {
        match self {
            Backend::Kernel(b) => b.ensure_device().await,
            Backend::Userspace(b) => b.ensure_device().await,
        }
    }

    async fn observe(&mut self) -> Result<ObservedDevice> {
        match self {
            Backend::Kernel(b) => b.observe().await,
            Backend::Userspace(b) => b.observe().await,
        }
    }

    async fn apply(&mut self, ops: &[Op]) -> Result<()> {
        match self {
            Backend::Kernel(b) => b.apply(ops).await,
            Backend::Userspace(b) => b.apply(ops).await,
        }
    }
}

/// What was chosen, and why (logged at start and shown by `meshctl status`).
#[derive(Debug)]
pub struct Selected {
    pub backend: Backend,
    /// `kernel` or `userspace: /usr/bin/meshd-wg`.
    pub label: String,
    /// Why, in the operator's words.
    pub reason: String,
}

impl Selected {
    /// The line `meshctl status` shows.
    pub fn status_line(&self) -> String {
        format!("{} ({})", self.label, self.reason)
    }
}

/// Where the userspace engine comes from.
#[derive(Debug, Clone)]
pub struct EngineSpec {
    pub command: PathBuf,
    pub run_dir: PathBuf,
}

fn kernel(interface: &str, reason: String) -> Result<Selected> {
    Ok(Selected {
        backend: Backend::Kernel(KernelBackend::new(interface)?),
        label: "kernel".to_owned(),
        reason,
    })
}

fn userspace(interface: &str, engine: &EngineSpec, reason: String) -> Selected {
    Selected {
        backend: Backend::Userspace(UapiBackend::new(
            interface,
            engine.command.clone(),
            &engine.run_dir,
        )),
        label: format!("userspace: {}", engine.command.display()),
        reason,
    }
}

/// Pick the backend for `interface` as `wanted` says, adopting what already exists.
pub async fn select(
    wanted: BackendKind,
    interface: &str,
    engine: &EngineSpec,
    link: &NetlinkLink,
) -> Result<Selected> {
    let conflict = |live: &str| Error::Engine {
        interface: interface.to_owned(),
        message: format!(
            "daemon.backend = \"{wanted}\" but {interface} is already up as {live}; meshd never \
             recreates a live interface. Set daemon.backend = \"auto\" to adopt it, or remove it \
             first (`ip link del {interface}` with meshd stopped) to switch backends"
        ),
    };
    let uapi = UapiBackend::new(interface, engine.command.clone(), &engine.run_dir);
    match link.kind(interface).await? {
        Some(kind) if kind == "wireguard" => match wanted {
            BackendKind::Userspace => Err(conflict("a kernel WireGuard interface")),
            _ => kernel(
                interface,
                format!("backend = {wanted}: adopted the existing kernel WireGuard interface"),
            ),
        },
        Some(kind) => {
            if uapi.answers().await {
                match wanted {
                    BackendKind::Kernel => Err(conflict(&format!(
                        "a userspace WireGuard interface (kind {kind}, UAPI socket {})",
                        uapi.socket().display()
                    ))),
                    _ => Ok(userspace(
                        interface,
                        engine,
                        format!("backend = {wanted}: adopted the running engine on {interface}"),
                    )),
                }
            } else {
                Err(Error::Engine {
                    interface: interface.to_owned(),
                    message: format!(
                        "{interface} exists (kind {kind}) but is not a WireGuard interface we can \
                         drive (no kernel WireGuard, no engine answering on {}); refusing to touch \
                         it. Pick another host.interface or remove that interface",
                        uapi.socket().display()
                    ),
                })
            }
        }
        None => match wanted {
            BackendKind::Userspace => Ok(userspace(
                interface,
                engine,
                "backend = userspace".to_owned(),
            )),
            BackendKind::Kernel => kernel(interface, "backend = kernel".to_owned()),
            BackendKind::Auto => {
                let mut k = KernelBackend::new(interface)?;
                match k.create() {
                    Ok(()) => Ok(Selected {
                        backend: Backend::Kernel(k),
                        label: "kernel".to_owned(),
                        reason: "backend = auto: the kernel has WireGuard".to_owned(),
                    }),
                    Err(e) => Ok(userspace(
                        interface,
                        engine,
                        format!(
                            "backend = auto: kernel WireGuard unavailable ({}), using the \
                                 userspace engine",
                            short_reason(&e)
                        ),
                    )),
                }
            }
        },
    }
}

fn short_reason(e: &Error) -> String {
    // defguard reports every creation failure alike; the module's absence is the usual cause
    // and the one an operator can act on.
    if !Path::new("/sys/module/wireguard").exists() {
        return "the wireguard kernel module is not loaded and the kernel could not load it"
            .to_owned();
    }
    match e {
        Error::Kernel { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// The run directory for UAPI sockets, for callers that do not override it.
pub fn default_engine_spec(command: PathBuf) -> EngineSpec {
    EngineSpec {
        command,
        run_dir: Path::new(crate::wg::userspace::DEFAULT_WG_RUN_DIR).to_path_buf(),
    }
}
