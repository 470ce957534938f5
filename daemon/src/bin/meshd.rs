//! meshd: the WireGuard mesh daemon.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use meshd::runtime::startup::{check_config, doctor_offline, down_offline, serve};
use meshd::Settings;

#[derive(Debug, Parser)]
#[command(name = "meshd", version, about = "WireGuard mesh daemon")]
struct Args {
    /// Configuration file.
    #[arg(long, env = "MESHD_CONFIG", default_value = mesh_proto::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Validate the configuration and exit: every error of the file as
    /// FILE:LINE:COL: KEY: message with the source line, and the private key file if
    /// present; the integrations' template sources and programs are checked too and reported
    /// as warnings (they fail that integration at run time, not the mesh). Exit status 0:
    /// valid (warnings may be printed); 1: invalid.
    #[arg(long)]
    check_config: bool,
    /// Run the doctor's checks without a daemon (what `meshctl doctor` does when meshd is
    /// not running); exits 1 if any check fails.
    #[arg(long, conflicts_with_all = ["check_config", "down"])]
    doctor: bool,
    /// With --doctor: print JSON.
    #[arg(long, requires = "doctor")]
    json: bool,
    /// Remove everything meshd owns on this host (interface, routes, nftables table,
    /// forwarding settings) with no daemon running (what `meshctl down` does through one).
    #[arg(long, conflicts_with = "check_config")]
    down: bool,
}

fn main() -> std::process::ExitCode {
    if let Some(dir) = meshd_docgen::requested() {
        return meshd_docgen::generate(Args::command(), &dir);
    }
    init_logging();
    // Everything meshd creates is private unless it says otherwise (files other programs read
    // get their mode set explicitly): the state directory, the registry, its WAL. The packaged
    // unit sets UMask=0077 too; this covers meshd started any other way.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let args = Args::parse();
    match real_main(args) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("meshd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Log to stderr (journald under systemd): `RUST_LOG` filters (default `info`); colour codes
/// only on a terminal, never into a file or the journal. netlink-packet-route warns on every
/// netlink dump on kernels newer than it knows (`IFLA_INET6_CONF` holding more than it
/// expects): noise to an operator, kept out unless `RUST_LOG` names that crate.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let rust_log = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if !rust_log.contains("netlink_packet_route") {
        if let Ok(quiet) = "netlink_packet_route=error".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

/// `Ok(false)`: ran, but the outcome is a failure (a doctor check failed).
fn real_main(args: Args) -> Result<bool> {
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
    if args.doctor {
        let report = runtime.block_on(doctor_offline(settings));
        let text = if args.json {
            serde_json::to_string_pretty(&report).context("cannot encode the report")? + "\n"
        } else {
            report.render()
        };
        print!("{text}");
        return Ok(!report.failed());
    }
    if args.down {
        let removed = runtime.block_on(down_offline(&settings))?;
        if removed.is_empty() {
            println!("nothing to remove: meshd owns nothing on this host");
        } else {
            println!("{}", removed.join(", "));
        }
        return Ok(true);
    }
    meshd::disk::state::StateDir::new(&settings.state_dir)
        .ensure_private()
        .context("preparing the state directory")?;
    runtime.block_on(serve(settings)).map(|()| true)
}
