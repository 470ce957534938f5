//! The daemon as a whole, for `main` (and tests) to call: validate a configuration, or take
//! the instance lock, load the key, bind the control socket and run the agent until shutdown.

use std::path::Path;

use anyhow::Result;

use crate::control::{prepare_dir, ControlSocket};
use crate::keyfile::{self, KeyFileState};
use crate::link::NetlinkLink;
use crate::lock::InstanceLock;
use crate::uapi::{default_engine_command, UapiBackend, DEFAULT_WG_RUN_DIR};
use crate::{Agent, Settings};

/// `meshd --check-config`: validate the configuration and the key file, print a summary.
pub fn check_config(path: &Path) -> Result<()> {
    let settings = Settings::load(path)?;
    match keyfile::inspect(&settings.private_key_file)? {
        KeyFileState::Valid(key) => println!(
            "{}: ok (host {}, {} peers, public key {})",
            path.display(),
            settings.host_name,
            settings.peers.len(),
            key.public_key()
        ),
        KeyFileState::Missing => println!(
            "{}: ok (host {}, {} peers; {} is missing and will be generated at start)",
            path.display(),
            settings.host_name,
            settings.peers.len(),
            settings.private_key_file.display()
        ),
    }
    Ok(())
}

/// Run the daemon until SIGTERM/SIGINT. Fails before touching anything when another meshd
/// holds the interface or the configuration is unusable.
pub async fn serve(settings: Settings) -> Result<()> {
    // Fail before touching anything: lock, then key, then the engine.
    prepare_dir(&settings.control_socket)?;
    let lock = InstanceLock::acquire(&settings.control_socket, &settings.interface)?;
    let key = keyfile::load_or_generate(&settings.private_key_file)?;
    let shutdown = crate::daemon::shutdown_signal()?;
    let engine = settings
        .engine_command
        .clone()
        .unwrap_or_else(default_engine_command);
    let link = NetlinkLink::connect()?;
    let socket = ControlSocket::bind(&settings.control_socket)?;
    tracing::info!(
        host = %settings.host_name,
        interface = %settings.interface,
        public_key = %key.public_key(),
        control_socket = %socket.path().display(),
        locks = ?lock.paths(),
        "meshd started"
    );
    let label = format!("userspace: {}", engine.display());
    let wg = UapiBackend::new(&settings.interface, engine, Path::new(DEFAULT_WG_RUN_DIR));
    let mut agent = Agent::new(wg, link, settings, key);
    agent.set_backend_label(label);
    crate::daemon::run(agent, &socket.listener, shutdown).await?;
    drop(socket);
    drop(lock);
    Ok(())
}
