//! meshd: the WireGuard mesh daemon.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use meshd::control::{prepare_dir, ControlSocket};
use meshd::keyfile::{self, KeyFileState};
use meshd::link::NetlinkLink;
use meshd::lock::InstanceLock;
use meshd::uapi::{default_engine_command, UapiBackend, DEFAULT_WG_RUN_DIR};
use meshd::{Agent, Settings};

#[derive(Debug, Parser)]
#[command(name = "meshd", version, about = "WireGuard mesh daemon")]
struct Args {
    /// Configuration file.
    #[arg(long, env = "MESHD_CONFIG", default_value = mesh_proto::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Validate the configuration (and the private key file, if present) and exit.
    #[arg(long)]
    check_config: bool,
}

fn check_config(path: &Path) -> Result<()> {
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

async fn serve(settings: Settings) -> Result<()> {
    // Fail before touching anything: lock, then key, then the engine.
    prepare_dir(&settings.control_socket)?;
    let lock = InstanceLock::acquire(&settings.control_socket, &settings.interface)?;
    let key = keyfile::load_or_generate(&settings.private_key_file)?;
    let shutdown = meshd::daemon::shutdown_signal()?;
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
    meshd::daemon::run(agent, &socket.listener, shutdown).await?;
    drop(socket);
    drop(lock);
    Ok(())
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match real_main(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> Result<()> {
    if args.check_config {
        return check_config(&args.config);
    }
    let settings =
        Settings::load(&args.config).context("refusing to start with an invalid configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(settings))
}
