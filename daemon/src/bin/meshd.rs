//! meshd: the WireGuard mesh daemon.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use meshd::service::{check_config, serve};
use meshd::Settings;

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
